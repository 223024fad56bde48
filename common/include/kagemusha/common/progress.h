// Progress and event reporting for long operations, shared by every CLI.
//
// Human mode draws a single-line progress bar when stderr is a TTY and prints
// plain lines otherwise; JSON mode writes one JSON object per line to stdout
// ({"event": ..., ...}) so scripts and dashboards can follow an operation.
//
// Thread-safety: all methods lock internally.
#pragma once

#include <cstdint>
#include <cstdio>
#include <mutex>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>

namespace kagemusha {

struct ProgressSample {
  std::string phase;       // e.g. "fill", "precopy"
  uint64_t done = 0;       // units done (bytes unless unit says otherwise)
  uint64_t total = 0;      // 0 when unknown
  double rate = 0;         // units per second
  std::optional<double> eta_seconds;
  std::string unit = "B";
};

class ProgressReporter {
 public:
  enum class Mode { kAuto, kHuman, kJson };
  explicit ProgressReporter(Mode mode = Mode::kAuto, FILE* human = stderr, FILE* json = stdout);

  bool json() const { return json_; }
  void Update(const ProgressSample& s);
  // A discrete event: JSON mode prints {"event": name, ...fields}; human mode
  // prints "name: message".
  void Event(const std::string& name, const nlohmann::json& fields, const std::string& message);
  void Finish();  // ends a bar line on a TTY

  static std::string HumanBytes(double bytes);
  static std::string RenderBar(const ProgressSample& s, int width);

 private:
  std::mutex mu_;
  bool json_;
  bool tty_;
  bool bar_open_ = false;
  FILE* human_;
  FILE* json_out_;
};

}  // namespace kagemusha

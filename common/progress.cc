#include "kagemusha/common/progress.h"

#include <unistd.h>

#include <cmath>
#include <nlohmann/json.hpp>

namespace kagemusha {

ProgressReporter::ProgressReporter(Mode mode, FILE* human, FILE* json)
    : json_(mode == Mode::kJson),
      tty_(mode != Mode::kJson && isatty(fileno(human))),
      human_(human),
      json_out_(json) {}

std::string ProgressReporter::HumanBytes(double b) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", b, units[u]);
  return buf;
}

std::string ProgressReporter::RenderBar(const ProgressSample& s, int width) {
  double frac = s.total ? std::min(1.0, double(s.done) / double(s.total)) : 0.0;
  int filled = int(std::lround(frac * width));
  std::string bar = s.phase + " [";
  bar.append(size_t(filled), '#');
  bar.append(size_t(width - filled), '.');
  char tail[128];
  bool bytes = s.unit == "B";
  std::string done = bytes ? HumanBytes(double(s.done)) : std::to_string(s.done);
  std::string total = bytes ? HumanBytes(double(s.total)) : std::to_string(s.total);
  std::string rate = bytes ? HumanBytes(s.rate) + "/s" : std::to_string(int64_t(s.rate)) + "/s";
  std::snprintf(tail, sizeof tail, "] %5.1f%% %s/%s %s", frac * 100, done.c_str(), total.c_str(),
                rate.c_str());
  bar += tail;
  if (s.eta_seconds) bar += " ETA " + std::to_string(int64_t(std::ceil(*s.eta_seconds))) + "s";
  return bar;
}

void ProgressReporter::Update(const ProgressSample& s) {
  std::lock_guard lk(mu_);
  if (json_) {
    nlohmann::json j = {{"event", "progress"}, {"phase", s.phase}, {"done", s.done},
                        {"total", s.total},    {"rate", s.rate},   {"unit", s.unit}};
    if (s.eta_seconds) j["eta_seconds"] = *s.eta_seconds;
    std::fprintf(json_out_, "%s\n", j.dump().c_str());
    std::fflush(json_out_);
    return;
  }
  std::string line = RenderBar(s, 30);
  if (tty_) {
    std::fprintf(human_, "\r\033[K%s", line.c_str());
    bar_open_ = true;
  } else {
    std::fprintf(human_, "%s\n", line.c_str());
  }
  std::fflush(human_);
}

void ProgressReporter::Event(const std::string& name, const nlohmann::json& fields,
                             const std::string& message) {
  std::lock_guard lk(mu_);
  if (json_) {
    nlohmann::json j = fields.is_object() ? fields : nlohmann::json::object();
    j["event"] = name;
    if (!message.empty()) j["message"] = message;
    std::fprintf(json_out_, "%s\n", j.dump().c_str());
    std::fflush(json_out_);
    return;
  }
  if (bar_open_) {
    std::fputc('\n', human_);
    bar_open_ = false;
  }
  std::fprintf(human_, "%s: %s\n", name.c_str(), message.c_str());
  std::fflush(human_);
}

void ProgressReporter::Finish() {
  std::lock_guard lk(mu_);
  if (bar_open_) {
    std::fputc('\n', human_);
    bar_open_ = false;
  }
}

}  // namespace kagemusha

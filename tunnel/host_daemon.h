// The Kagemusha host daemon (kagemusha-tunneld serve): runs one
// MobilitySession per guest on real packet I/O, answers the control socket
// (activate, home, deactivate, status) and persists what a restart needs.
//
// Per session it opens a TAP enslaved to the VM's bridge (the guest link), an
// AF_PACKET socket on the uplink filtered to BAs/BRRs addressed to the
// care-of address, raw IPv6 sockets for protocols 41 and 4 bound to the
// care-of address (the tunnel), and an IPPROTO_RAW sender for BUs. One thread
// polls all of them and runs the sessions' timers; control handlers run on the
// control server's thread under the same mutex.
//
// State directory layout (all files 0600, written to a temporary name,
// fsync'ed and renamed, directory fsync'ed):
//   sessions/<name>.json   the session's parameters and mode (foreign|home);
//                          present while the session should run here, so a
//                          restarted daemon resumes it
//   seq/<name>.json        last BU sequence number sent per home address
//
// Thread-safety: Run() on one thread; the control handlers may run
// concurrently (they take the daemon mutex); RequestStop() from anywhere.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kagemusha/common/clock.h"
#include "kagemusha/common/control_socket.h"
#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/fastpath.h"
#include "kagemusha/tunnel/mobility_session.h"
#include "kagemusha/tunnel/packet_io.h"

namespace kagemusha::tunnel {

enum class SessionMode { kForeign, kHome };

// What `activate` / `home` carry: the session configuration plus where it is
// attached on this host.
struct HostSessionSpec {
  SessionConfig config;
  std::string uplink;
  std::string bridge;
  std::string key_file;  // empty when insecure
  SessionMode mode = SessionMode::kForeign;
};

// Parses control-request arguments (the JSON form of the CLI options; see
// docs/tunnel-host.md). Reads the key file. Validates the configuration.
Result<HostSessionSpec> ParseHostSessionSpec(const nlohmann::json& args);
// The inverse (without the key itself), as persisted in sessions/<name>.json.
nlohmann::json HostSessionSpecToJson(const HostSessionSpec& spec);

// Key file contents to key bytes, by kagemusha-ha's rule: hex text (even
// length, optionally ending in one newline) is decoded, anything else is
// taken as raw bytes.
std::vector<uint8_t> DecodeKeyFileBytes(const std::vector<uint8_t>& raw);

// Durable per-session sequence numbers in <dir>/<name>.json.
class FileSequenceStore final : public SequenceStore {
 public:
  FileSequenceStore(std::string path);
  std::optional<uint16_t> LastSent(const Ipv6Address& home_address) override;
  Status Record(const Ipv6Address& home_address, uint16_t sequence) override;

 private:
  std::string path_;
  std::map<Ipv6Address, uint16_t> values_;
};

// Writes `data` to `path` atomically and durably with mode 0600.
Status WriteFileDurably(const std::string& path, const std::string& data);

struct HostDaemonOptions {
  std::string state_dir;
  std::string control_path;
  // Install the nftables rule that keeps the kernel from answering BAs
  // (RH2) with ICMP errors.
  bool suppress_icmp_errors = true;
  size_t batch = 32;  // packets per receive call
  // The eBPF fast path (docs/tunnel-fastpath.md): auto = use it if it loads.
  FastPathMode fast_path = FastPathMode::kAuto;
};

class HostDaemon {
 public:
  static Result<std::unique_ptr<HostDaemon>> Create(HostDaemonOptions options, Clock& clock);
  ~HostDaemon();

  // Resumes persisted sessions, starts the control server and runs the event
  // loop until RequestStop(). Sessions are left registered (the binding
  // outlives a restart); their TAPs go away with the process.
  Status Run();
  void RequestStop();

  // Control operations (also exposed through the control socket).
  Result<nlohmann::json> Activate(const nlohmann::json& args);
  Result<nlohmann::json> Home(const nlohmann::json& args);
  Result<nlohmann::json> Deactivate(const std::string& name);
  nlohmann::json StatusJson();

  std::vector<ControlCommand> Commands();

 private:
  struct Live;
  HostDaemon(HostDaemonOptions options, Clock& clock);
  Result<std::unique_ptr<Live>> Open(const HostSessionSpec& spec);
  Status Persist(const HostSessionSpec& spec);
  void Unpersist(const std::string& name);
  void Wake();
  void ResumePersisted();
  void ReapFinished();
  nlohmann::json SessionJson(const Live& live) const;
  // Hands a foreign-mode session's IPv6 traffic to the fast path (if loaded);
  // a failure leaves the session on the user-space path.
  void FastPathAdd(Live& live);
  void FastPathRemove(const std::string& name);

  HostDaemonOptions options_;
  Clock& clock_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<Live>> sessions_;  // GUARDED_BY(mu_)
  std::map<std::string, nlohmann::json> finished_;         // GUARDED_BY(mu_)
  std::atomic<bool> stop_{false};
  int wake_fd_ = -1;
  std::unique_ptr<ControlServer> control_;
  std::unique_ptr<HostFastPath> fast_path_;  // null: user-space path only
};

}  // namespace kagemusha::tunnel

// NbdClient: the remote side of proxy mode, an NBD client that implements
// RemoteReader over a real connection to any compliant server (our own
// target, nbdkit, qemu-nbd). Fixed newstyle with NBD_OPT_GO; many requests in
// flight on one connection, replies matched by cookie, so out-of-order
// servers are handled correctly. On connection loss it reconnects with
// exponential back-off; reads wait for at most `wait_bound` meanwhile.
//
// Thread-safety: Read may be called from many threads at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "kagemusha/common/error.h"
#include "kagemusha/storage/remote.h"

namespace kagemusha::storage {

// nbd://host[:port]/[export], nbd+unix:///[export]?socket=PATH
// (IPv6 hosts in brackets). Percent-escapes in the export name are decoded.
struct NbdUri {
  enum class Transport { kTcp, kUnix } transport = Transport::kTcp;
  std::string host;
  uint16_t port = 10809;
  std::string socket_path;
  std::string export_name;
  std::string ToString() const;
};
Result<NbdUri> ParseNbdUri(const std::string& uri);

struct NbdClientOptions {
  std::chrono::milliseconds connect_timeout{5000};
  std::chrono::milliseconds request_timeout{30000};  // one request on a live link
  std::chrono::milliseconds wait_bound{60000};       // how long reads wait while disconnected
  std::chrono::milliseconds backoff_initial{100};
  std::chrono::milliseconds backoff_max{5000};
  uint32_t max_request_bytes = 4 * 1024 * 1024;      // larger reads are split
};

class NbdClient : public RemoteReader {
 public:
  // Connects once (failing fast with a clear error if the remote cannot be
  // reached or has no such export); later losses are retried in the background.
  static Result<std::unique_ptr<NbdClient>> Connect(const NbdUri& uri,
                                                    const NbdClientOptions& options);
  ~NbdClient() override = default;
};

}  // namespace kagemusha::storage

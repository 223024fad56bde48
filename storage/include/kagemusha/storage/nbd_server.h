// NbdServer: a fixed-newstyle NBD server over Boost.Asio. It serves named
// exports, each backed by a Backend, on TCP addresses and/or Unix sockets.
// Requests on one connection are read in order, run concurrently on a worker
// pool and answered out of order (matched by cookie); structured replies,
// base:allocation block status and several connections per export are
// supported. A misbehaving client is answered with the spec's error or
// disconnected alone.
//
// Thread-safety: AddExport/Listen before Run; Stop and Stats from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/storage/backend.h"

namespace kagemusha::storage {

struct ExportConfig {
  std::string name;         // "" is the default export
  std::string description;  // NBD_INFO_DESCRIPTION
  std::shared_ptr<Backend> backend;
  bool read_only = false;   // forced read-only even if the backend can write
};

struct ServerOptions {
  unsigned worker_threads = 8;       // backend calls run here
  unsigned io_threads = 2;           // socket I/O
  uint32_t max_requests_in_flight = 64;  // per connection; reading pauses beyond
  // Connections open at once, all listeners together; one more is closed
  // as soon as it is accepted (and counted). 0 = no limit.
  unsigned max_connections = 256;
  std::chrono::seconds handshake_timeout{30};
  // Pipes for zero-copy reads, all connections together (each holds two
  // descriptors); reads finding none are copied. 0: a quarter of the
  // RLIMIT_NOFILE soft limit, so pipes never take more than half the
  // descriptors and accept() keeps working.
  size_t max_splice_pipes = 0;
};

struct ServerStats {
  uint64_t connections_open = 0;
  uint64_t connections_total = 0;
  uint64_t connections_refused = 0;  // over max_connections
  uint64_t requests = 0;
  // Reads served on the connection's reader, with no hand-off to a worker
  // (short reads and, after a run of fast ones, large reads the backend
  // names as a file range; see docs/nbd-server.md).
  uint64_t requests_inline = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t protocol_errors = 0;
};

class NbdServer {
 public:
  static std::unique_ptr<NbdServer> Create(const ServerOptions& options);
  virtual ~NbdServer() = default;

  virtual Status AddExport(ExportConfig config) = 0;
  // "host:port" / "[v6]:port"; port 0 picks one (see BoundEndpoints).
  virtual Status ListenTcp(const std::string& host_port) = 0;
  // Creates the socket with mode 0600 (unlinking a stale one).
  virtual Status ListenUnix(const std::string& path) = 0;
  virtual std::vector<std::string> BoundEndpoints() const = 0;
  // Runs until Stop(). Returns after all connections are closed.
  virtual void Run() = 0;
  virtual void Stop() = 0;
  virtual ServerStats Stats() const = 0;
};

}  // namespace kagemusha::storage

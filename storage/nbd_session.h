// One NBD connection on the server side (private to kagemusha_storage).
//
// A Session runs on its own strand: the handshake coroutine drives the pure
// HandshakeMachine (nbd_server_codec.h) under a deadline, then a reader
// coroutine parses requests and hands them to the worker pool, where the
// backend is called; finished replies are posted back to the strand and a
// writer coroutine sends them, several at a time, with gather writes. Reply
// objects and their data buffers are recycled per session, so a steady
// stream of requests does not allocate.
//
// Thread-safety: all members are touched on the session strand only, except
// Reply objects, which a worker owns while it executes the request.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>  // boost 1.74 awaitable.hpp uses std::exchange unincluded
#include <vector>

#include <boost/asio.hpp>

#include "kagemusha/storage/backend.h"
#include "kagemusha/storage/nbd_server.h"
#include "nbd_server_codec.h"

namespace kagemusha::storage {

// Counters shared by all sessions of a server.
struct ServerCounters {
  std::atomic<uint64_t> connections_open{0};
  std::atomic<uint64_t> connections_total{0};
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytes_read{0};
  std::atomic<uint64_t> bytes_written{0};
  std::atomic<uint64_t> protocol_errors{0};
};

// What a session needs from its server. Outlives every session.
struct SessionEnvironment {
  const std::vector<ExportConfig>* exports = nullptr;
  boost::asio::thread_pool* workers = nullptr;
  ServerCounters* counters = nullptr;
  ServerOptions options;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  using Socket = boost::asio::generic::stream_protocol::socket;

  Session(Socket socket, std::string peer, const SessionEnvironment& env);
  ~Session();

  // Spawns the session on its strand. The session keeps itself alive until
  // the connection is closed and every request it started has finished.
  static void Start(std::shared_ptr<Session> self);
  // Closes the connection from any thread (server shutdown).
  void Close();

  struct Reply;

 private:
  static boost::asio::awaitable<void> Main(std::shared_ptr<Session> self);
  static boost::asio::awaitable<void> Writer(std::shared_ptr<Session> self);
  boost::asio::awaitable<bool> Handshake();
  boost::asio::awaitable<void> Transmission();
  boost::asio::awaitable<bool> Discard(uint64_t n);

  std::unique_ptr<Reply> AcquireReply();
  void ReleaseReply(std::unique_ptr<Reply> r);
  void Enqueue(std::unique_ptr<Reply> r);
  // Turns r into an error reply (structured ERROR chunk or simple reply).
  void FillError(Reply& r, uint32_t error, const std::string& what) const;
  void Execute(Reply& r);  // on a worker thread
  void ExecuteRead(Reply& r);
  void ProtocolError(const std::string& what);
  void CloseSocket();

  Socket socket_;
  boost::asio::strand<boost::asio::any_io_executor> strand_;
  std::string peer_;
  const SessionEnvironment& env_;

  // Chosen export (valid in transmission).
  std::shared_ptr<Backend> backend_;
  BackendCaps caps_;
  nbd::Negotiated negotiated_;

  boost::asio::steady_timer reader_wake_;  // flow control and drain
  boost::asio::steady_timer writer_wake_;  // replies queued or closing
  std::vector<std::unique_ptr<Reply>> queue_;
  std::vector<std::unique_ptr<Reply>> free_replies_;
  uint32_t running_ = 0;  // requests on the worker pool
  uint32_t pending_ = 0;  // running + queued, not yet written
  bool closing_ = false;
  bool writer_done_ = false;
  bool write_failed_ = false;
  uint64_t requests_ = 0;
};

}  // namespace kagemusha::storage

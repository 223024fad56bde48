// One NBD connection on the server side (private to kagemusha_storage).
//
// A Session runs on its own strand: the handshake coroutine drives the pure
// HandshakeMachine (nbd_server_codec.h) under a deadline, then a reader
// coroutine parses requests and hands them to the worker pool, where the
// backend is called (small reads of a fast backend run inline on the
// reader). Large reads of a backend that names a file (FileRangeFor) are
// spliced from the page cache into a pipe and from there into the socket,
// never copied by the server. The thread that finished a reply with few
// copied bytes (a small reply, or a spliced one) sends it itself when no one
// else is sending; larger ones, and whatever a full socket leaves over, go
// to a writer coroutine on the strand that sends several at a time. Reply
// objects, their data buffers and the pipes are recycled per session, so a
// steady stream of requests does not allocate.
//
// Thread-safety: the coroutines' state is touched on the session strand
// only; the send side (queue_, sender_) is GUARDED_BY(send_mu_), the reply
// and pipe pools by pool_mu_, the in-flight counts are atomics. A worker owns a Reply
// while it executes the request, the current sender while it sends it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
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
  std::atomic<uint64_t> connections_refused{0};
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> requests_inline{0};  // reads run on the session's reader
  std::atomic<uint64_t> bytes_read{0};
  std::atomic<uint64_t> bytes_written{0};
  std::atomic<uint64_t> protocol_errors{0};
  // Splice pipes alive in all sessions (ServerOptions::max_splice_pipes).
  std::atomic<size_t> splice_pipes{0};
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
  class SplicePipe;

 private:
  static boost::asio::awaitable<void> Main(std::shared_ptr<Session> self);
  static boost::asio::awaitable<void> Writer(std::shared_ptr<Session> self);
  boost::asio::awaitable<bool> Handshake();
  boost::asio::awaitable<void> Transmission();
  // Transmission reads go through rbuf_, so one recv() usually brings in
  // several pipelined request headers; large payloads bypass it.
  boost::asio::awaitable<bool> ReadExact(uint8_t* dst, size_t n);
  boost::asio::awaitable<bool> Discard(uint64_t n);
  // On the strand: until ready() holds, re-checked whenever a finishing
  // request wakes the reader (Retire, a worker's end).
  boost::asio::awaitable<void> WaitOnStrand(std::function<bool()> ready);
  // Worker side: is [offset, offset+length) known to hold no zero extents?
  bool KnownData(uint64_t offset, uint64_t length);
  void NoteData(uint64_t offset, uint64_t length);

  std::unique_ptr<Reply> AcquireReply();
  void ReleaseReply(std::unique_ptr<Reply> r);
  // Strand side: queue a reply for the strand writer.
  void Enqueue(std::unique_ptr<Reply> r);
  // Any thread: a request finished. Sends its reply straight from this
  // thread when nobody else is sending (see "send side" below), else queues
  // it; never waits for socket space (the strand writer does).
  void Complete(std::unique_ptr<Reply> r);
  // Non-blocking send of batch (gather writes of copied bytes, splices of
  // piped ones), resuming where an earlier call stopped. kSlow: the socket
  // is full. REQUIRES: the caller owns the send side.
  enum class SendResult { kDone, kSlow, kError };
  SendResult SendDirect(std::vector<std::unique_ptr<Reply>>& batch, int& err);
  // Zero-copy reads: moves [offset, offset+length) of the backend's file
  // into r's pipe (page references), after the backend brought it into the
  // file (Backend::PrepareFileRange). False: not possible (the backend names
  // no file, no pipe free, a short splice); the caller then copies, after
  // DiscardPipe if r's pipe may hold a partial fill. False with `*err` set:
  // the backend failed (the read's error).
  bool SpliceData(Reply& r, uint64_t offset, size_t length, Status* err);
  std::unique_ptr<SplicePipe> AcquirePipe();
  void DiscardPipe(Reply& r);
  // pending_ dropped by n (replies written or dropped): wake the reader if
  // it waits for that.
  void Retire(uint32_t n);
  void WakeStrandWaiter();
  // Turns r into an error reply (structured ERROR chunk or simple reply).
  void FillError(Reply& r, uint32_t error, const std::string& what) const;
  void Execute(Reply& r);  // on a worker thread (or inline on the reader)
  void ExecuteRead(Reply& r);
  // Whether a small read may run inline on the reader: only while this
  // session's reads have been fast (a cache miss to a remote must not stall
  // the reader, or the io thread it runs on).
  bool InlineAllowed(const nbd::RequestHeader& q);
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
  // Counts shared with the threads that finish requests. The reader sets
  // strand_waiting_ before it re-checks them and sleeps; a finisher changes
  // them before it looks at strand_waiting_ (both seq_cst), so a wake-up is
  // never lost and is only posted when somebody waits.
  std::atomic<uint32_t> running_{0};  // requests executing
  std::atomic<uint32_t> running_long_{0};  // of those, CACHE and large WRITE_ZEROES
  std::atomic<uint32_t> pending_{0};  // started, reply not yet written or dropped
  std::atomic<uint64_t> held_bytes_{0};  // Reply::held of those (reads' and writes' data)
  std::atomic<bool> strand_waiting_{false};
  bool handshake_done_ = false;
  bool closing_ = false;      // strand: no more requests will start
  bool writer_done_ = false;  // strand
  bool write_failed_ = false; // strand
  uint64_t requests_ = 0;
  std::vector<uint8_t> rbuf_;
  size_t rpos_ = 0, rend_ = 0;

  // Send side. One sender at a time owns the socket's write direction: a
  // thread that finished a request (and then sends whatever else got queued
  // meanwhile, so replies coalesce), or the strand writer, which takes over
  // when the socket stays full. queue_ non-empty implies an owner.
  enum class Sender { kNone, kThread, kStrand };
  std::mutex send_mu_;
  std::vector<std::unique_ptr<Reply>> queue_;  // GUARDED_BY(send_mu_)
  Sender sender_ = Sender::kNone;              // GUARDED_BY(send_mu_)
  bool send_closed_ = false;                   // GUARDED_BY(send_mu_)

  std::mutex pool_mu_;
  std::vector<std::unique_ptr<Reply>> free_replies_;     // GUARDED_BY(pool_mu_)
  uint64_t pooled_bytes_ = 0;  // their data_capacity; GUARDED_BY(pool_mu_)
  std::vector<std::unique_ptr<SplicePipe>> free_pipes_;  // GUARDED_BY(pool_mu_)
  size_t pipes_ = 0;  // pipes alive (free or on a reply); GUARDED_BY(pool_mu_)
  // Cleared when the backend's file cannot be spliced (EINVAL etc.).
  std::atomic<bool> splice_ok_{true};

  // Consecutive fast reads (capped); see InlineAllowed.
  std::atomic<uint32_t> fast_reads_{0};
  // Consecutive fast reads of kSpliceMinLength or more, timed whole (hole
  // probe included): the warm-up for running such reads inline.
  std::atomic<uint32_t> fast_large_reads_{0};

  // A range the backend recently reported as allocated data, so sequential
  // large reads skip the hole probe. Only data is remembered, never holes:
  // a stale entry costs a read of zeroes, never wrong data.
  std::mutex known_mu_;
  uint64_t known_lo_ = 0, known_hi_ = 0;  // GUARDED_BY(known_mu_)
};

}  // namespace kagemusha::storage

#include "nbd_session.h"

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>

#include "kagemusha/common/coding.h"

namespace kagemusha::storage {

namespace asio = boost::asio;
using asio::awaitable;
using boost::system::error_code;

namespace {

// Reads at least this long without DF probe the backend for holes first, so
// zero ranges travel as OFFSET_HOLE chunks. Small reads (4K random I/O) skip
// the probe: an extra extents call would cost more than the bytes saved.
constexpr uint32_t kHoleProbeMinLength = 64 * 1024;
// Buffers bigger than this are freed after use instead of kept for reuse.
constexpr size_t kMaxCachedBuffer = 4 * 1024 * 1024;
// Data buffers of unanswered requests one session may hold (a request's
// length for reads and writes, or the recycled buffer it came with if that
// is larger). Past it the reader takes no new request until replies go
// out, so a client that sends requests but never reads its replies pins at
// most this plus one request (32 MiB), not max_requests_in_flight of the
// largest size. nbdcopy (64 x 256 KiB) and qemu stay well under it.
constexpr uint64_t kMaxHeldBytes = 32 * 1024 * 1024;
// Buffer bytes kept in a session's pool of free replies.
constexpr uint64_t kMaxPooledBytes = 16 * 1024 * 1024;
// Long requests of one session running at once on the shared worker pool:
// CACHE (fetches up to 4 GiB from a proxy's remote) and large WRITE_ZEROES
// (where the device or file system cannot zero by itself the kernel or the
// backend writes the zeroes). Past this the session's reader waits, so that
// one client cannot occupy every worker and stall the others. Small zeroes
// stay uncapped: they are fast and, on a proxy, share a group commit.
constexpr uint32_t kMaxRunningLong = 2;
constexpr uint32_t kLongZeroBytes = 64 * 1024 * 1024;
bool IsLong(const nbd::RequestHeader& q) {
  return q.type == nbd::kCmdCache || (q.type == nbd::kCmdWriteZeroes && q.length > kLongZeroBytes);
}
constexpr size_t kMaxFreeReplies = 64;
// Replies sent in one gather write at most.
constexpr size_t kMaxRepliesPerWrite = 32;
// Receive buffer for request headers and small write payloads.
constexpr size_t kReadBufferSize = 64 * 1024;
// A hole probe asks the backend about this much beyond a read, so that the
// following sequential reads can skip the probe.
constexpr uint64_t kExtentsLookahead = 64ull << 20;
// Reads up to this long run inline on the reader (no hand-off to the worker
// pool and back) while the session's reads are fast: for a file in the page
// cache the hand-off costs more than the pread.
// Below kHoleProbeMinLength, so such an inline read never asks for extents.
constexpr uint32_t kInlineMaxLength = 32 * 1024;
// Longer reads, up to this, also run inline while the session's reads are
// fast, but only when the backend names a file range for the whole read
// without fetching anything (Backend::FileRangeFor: a target image, or
// blocks a proxy already holds): the splice from the page cache into the
// socket costs less than waking a worker for it (sequential 1 GiB read with
// nbdcopy -C 4: 0.26 s instead of 0.30, median of 8 interleaved runs). A
// proxy miss never runs inline, so it cannot hold up the reader.
constexpr uint32_t kInlineMaxSplicedLength = 1024 * 1024;
// Inline only after this many consecutive fast reads on the session; a read
// slower than kSlowReadNs (a cache miss, a remote fetch) starts the count
// again, so a backend that blocks keeps its reads on the pool.
constexpr uint32_t kInlineWarmupReads = 32;
constexpr int64_t kSlowReadNs = 200'000;
// Replies with up to this many copied bytes are sent by the thread that
// produced them (spliced bytes cost the sender no copy, so a spliced 256 KiB
// read counts only its header). Larger copied ones go to the strand writer:
// on the loaded 2-core machine its 32-reply gather writes, overlapping with
// the workers' preads, beat workers sending 256 KiB each themselves
// (nbdcopy 0.79x vs 0.71x of nbdkit, same run). A sender never waits for
// socket space: on EAGAIN the strand writer takes over (a worker waiting in
// poll() with a 10 ms budget was slower than no direct send at all).
constexpr size_t kDirectSendMax = 64 * 1024;
constexpr int kMaxIov = 256;
// Reads at least this long are spliced from the page cache into the socket
// when the backend names a file range (Backend::FileRangeFor): no pread copy
// and no send copy. Smaller ones are copied: for 4 KiB the extra syscall
// costs more than the copy, and they can run inline on the reader.
constexpr uint32_t kSpliceMinLength = 64 * 1024;
// A pipe's initial capacity; it grows (F_SETPIPE_SZ) up to kPipeMaxCapacity
// for larger reads (the unprivileged default of fs/pipe-max-size). A read
// that does not fit is copied.
constexpr size_t kPipeInitialCapacity = 256 * 1024;
constexpr size_t kPipeMaxCapacity = 1024 * 1024;
// Pipes a session may hold at once (at most one per request in flight); a
// read finding none free is copied. With 32 for 64 requests in flight,
// nbdcopy's queued replies ran out of pipes and half its reads were copied.
// For an unprivileged server the per-user pipe accounting
// (fs/pipe-user-pages-soft) may refuse the capacity, and reads are copied.
constexpr size_t kMaxPipesPerSession = 256;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

auto Nothrow(error_code& ec) { return asio::redirect_error(asio::use_awaitable, ec); }

const char* CommandName(uint16_t type) {
  switch (type) {
    case nbd::kCmdRead:
      return "read";
    case nbd::kCmdWrite:
      return "write";
    case nbd::kCmdDisc:
      return "disconnect";
    case nbd::kCmdFlush:
      return "flush";
    case nbd::kCmdTrim:
      return "trim";
    case nbd::kCmdCache:
      return "cache";
    case nbd::kCmdWriteZeroes:
      return "write-zeroes";
    case nbd::kCmdBlockStatus:
      return "block-status";
    default:
      return "unknown command";
  }
}

// SIGPIPE blocked on this thread for the guard's lifetime. splice() into a
// socket whose peer is gone raises SIGPIPE (there is no MSG_NOSIGNAL for
// it); a signal raised meanwhile is consumed unless it was already pending,
// so the server never depends on SIGPIPE being ignored.
class SigpipeBlock {
 public:
  SigpipeBlock() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGPIPE);
    sigset_t pending;
    sigemptyset(&pending);
    ::sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
    ::pthread_sigmask(SIG_BLOCK, &set_, &old_);
  }
  ~SigpipeBlock() {
    if (!was_pending_) {
      sigset_t pending;
      sigemptyset(&pending);
      ::sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        timespec zero{0, 0};
        while (::sigtimedwait(&set_, nullptr, &zero) < 0 && errno == EINTR) {
        }
      }
    }
    ::pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlock(const SigpipeBlock&) = delete;
  SigpipeBlock& operator=(const SigpipeBlock&) = delete;

 private:
  sigset_t set_, old_;
  bool was_pending_ = false;
};

}  // namespace

// A pipe that carries page references from the image file to the socket
// (splice on both sides), so read payloads are never copied by the server.
class Session::SplicePipe {
 public:
  static std::unique_ptr<SplicePipe> Create() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return nullptr;
    std::unique_ptr<SplicePipe> p(new SplicePipe(fds[0], fds[1]));
    int got = ::fcntl(fds[1], F_SETPIPE_SZ, int(kPipeInitialCapacity));
    if (got < 0) got = ::fcntl(fds[1], F_GETPIPE_SZ);
    if (got <= 0) return nullptr;
    p->capacity_ = size_t(got);
    return p;
  }
  ~SplicePipe() {
    ::close(r_);
    ::close(w_);
  }
  SplicePipe(const SplicePipe&) = delete;
  SplicePipe& operator=(const SplicePipe&) = delete;

  int read_fd() const { return r_; }
  // Makes room for n bytes in total (the pipe is empty when this is asked).
  bool Reserve(size_t n) {
    if (n <= capacity_) return true;
    if (n > kPipeMaxCapacity) return false;
    int got = ::fcntl(w_, F_SETPIPE_SZ, int(n));
    if (got < 0) return false;
    capacity_ = size_t(got);
    return capacity_ >= n;
  }
  // Moves exactly n bytes of fd from offset into the pipe (page references,
  // not copies). Returns 0, or the errno (-1 for end of file) when fewer
  // could be moved; the pipe then holds an unknown amount and must not be
  // reused.
  int Fill(int fd, uint64_t offset, size_t n) {
    loff_t off = loff_t(offset);
    while (n > 0) {
      ssize_t k = ::splice(fd, &off, w_, nullptr, n, SPLICE_F_NONBLOCK);
      if (k > 0) {
        n -= size_t(k);
        continue;
      }
      if (k == 0) return -1;
      if (errno == EINTR) continue;
      return errno;
    }
    return 0;
  }

 private:
  SplicePipe(int r, int w) : r_(r), w_(w) {}
  int r_, w_;
  size_t capacity_ = 0;
};

// A request and, once executed, its reply. `pieces` say which bytes go
// out, in order: from `head` (headers, small chunks), from `data` (copied
// payload) or from `pipe` (spliced payload, consumed in order).
struct Session::Reply {
  nbd::RequestHeader req;
  std::vector<uint8_t> head;
  std::unique_ptr<std::byte[]> data;
  size_t data_capacity = 0;
  std::unique_ptr<SplicePipe> pipe;
  size_t pipe_in = 0;     // bytes spliced into pipe for this reply
  size_t pipe_out = 0;    // of those, bytes spliced on into the socket
  size_t pipe_slots = 0;  // pipe buffers (pages) pipe_in may occupy
  enum class From : uint8_t { kHead, kData, kPipe };
  struct Piece {
    From from;
    uint32_t offset;
    uint32_t length;
  };
  std::vector<Piece> pieces;
  size_t total = 0;   // bytes in pieces, fixed once executed
  size_t copied = 0;  // of those, bytes not from the pipe
  size_t sent = 0;    // bytes already written (a send cut short)
  uint32_t held = 0;  // counted in held_bytes_ until released

  std::byte* Data(size_t n) {
    if (data_capacity < n) {
      data.reset(new std::byte[n]);  // uninitialised on purpose
      data_capacity = n;
    }
    return data.get();
  }
  void AddHead(size_t at, size_t len) {
    pieces.push_back({From::kHead, uint32_t(at), uint32_t(len)});
  }
  void AddData(size_t at, size_t len) {
    pieces.push_back({From::kData, uint32_t(at), uint32_t(len)});
  }
  void AddPipe(size_t len) { pieces.push_back({From::kPipe, 0, uint32_t(len)}); }
  // Replaces the reply with head bytes only (an error or a status reply).
  void HeadOnly() {
    pieces.clear();
    AddHead(0, head.size());
  }
  void Seal() {
    total = copied = 0;
    for (const auto& p : pieces) {
      total += p.length;
      if (p.from != From::kPipe) copied += p.length;
    }
    sent = 0;
  }
  const uint8_t* Base(const Piece& p) const {
    return (p.from == From::kData ? reinterpret_cast<const uint8_t*>(data.get()) : head.data()) +
           p.offset;
  }
};

Session::Session(Socket socket, std::string peer, const SessionEnvironment& env)
    : socket_(std::move(socket)),
      strand_(asio::make_strand(socket_.get_executor())),
      peer_(std::move(peer)),
      env_(env),
      reader_wake_(strand_),
      writer_wake_(strand_) {
  env_.counters->connections_open++;
  env_.counters->connections_total++;
}

Session::~Session() {
  // The pipes still alive (pooled, or on a reply dropped with the session)
  // go with the session's members.
  env_.counters->splice_pipes.fetch_sub(pipes_);
  env_.counters->connections_open--;
  spdlog::info("nbd: connection {} closed after {} requests", peer_, requests_);
}

void Session::Start(std::shared_ptr<Session> self) {
  auto strand = self->strand_;
  asio::co_spawn(strand, Main(std::move(self)), asio::detached);
}

void Session::Close() {
  asio::post(strand_, [self = shared_from_this()] { self->CloseSocket(); });
}

void Session::CloseSocket() {
  // shutdown, not close: a worker may be in sendmsg() on this descriptor,
  // and a closed (and reused) descriptor number must never be written to.
  // shutdown wakes every pending operation; ~Session closes.
  error_code ignored;
  socket_.shutdown(Socket::shutdown_both, ignored);
  socket_.cancel(ignored);
  reader_wake_.cancel();
  writer_wake_.cancel();
}

void Session::ProtocolError(const std::string& what) {
  env_.counters->protocol_errors++;
  spdlog::warn("nbd: {}: protocol error: {}", peer_, what);
}

awaitable<void> Session::Main(std::shared_ptr<Session> self) {
  spdlog::info("nbd: connection {} opened", self->peer_);
  // Not `if (co_await ...)`: GCC 12 miscompiles co_await in a condition.
  bool ok = co_await self->Handshake();
  if (ok) co_await self->Transmission();
  self->CloseSocket();
}

awaitable<bool> Session::ReadExact(uint8_t* dst, size_t n) {
  size_t have = std::min(n, rend_ - rpos_);
  if (have) std::memcpy(dst, rbuf_.data() + rpos_, have);
  rpos_ += have;
  if (have == n) co_return true;
  error_code ec;
  const size_t rest = n - have;
  if (rest >= rbuf_.size() / 2) {
    co_await asio::async_read(socket_, asio::buffer(dst + have, rest), Nothrow(ec));
    co_return !ec;
  }
  rpos_ = rend_ = 0;
  size_t got = co_await asio::async_read(socket_, asio::buffer(rbuf_),
                                         asio::transfer_at_least(rest), Nothrow(ec));
  if (got < rest) co_return false;
  rend_ = got;
  std::memcpy(dst + have, rbuf_.data(), rest);
  rpos_ = rest;
  co_return true;
}

awaitable<bool> Session::Discard(uint64_t n) {
  size_t have = size_t(std::min<uint64_t>(n, rend_ - rpos_));
  rpos_ += have;
  n -= have;
  std::array<uint8_t, 64 * 1024> scratch;
  while (n > 0) {
    error_code ec;
    size_t chunk = std::min<uint64_t>(n, scratch.size());
    co_await asio::async_read(socket_, asio::buffer(scratch.data(), chunk), Nothrow(ec));
    if (ec) co_return false;
    n -= chunk;
  }
  co_return true;
}

bool Session::KnownData(uint64_t offset, uint64_t length) {
  std::lock_guard lock(known_mu_);
  return offset >= known_lo_ && offset + length <= known_hi_;
}

void Session::NoteData(uint64_t offset, uint64_t length) {
  std::lock_guard lock(known_mu_);
  known_lo_ = offset;
  known_hi_ = offset + length;
}

awaitable<bool> Session::Handshake() {
  // The whole handshake runs under one deadline, so a client trickling
  // bytes cannot hold a connection (and its memory) forever.
  // The flag lives in the session, not in this frame: an expiry already
  // queued when the handshake ends may run after the frame is gone.
  asio::steady_timer deadline(strand_);
  deadline.expires_after(env_.options.handshake_timeout);
  deadline.async_wait([self = shared_from_this()](error_code ec) {
    if (!ec && !self->handshake_done_) {
      spdlog::warn("nbd: {}: handshake deadline passed, closing", self->peer_);
      self->CloseSocket();
    }
  });
  struct Cancel {
    Session* s;
    asio::steady_timer& t;
    ~Cancel() {
      s->handshake_done_ = true;
      t.cancel();
    }
  } cancel_on_exit{this, deadline};

  std::vector<nbd::ExportDescriptor> descriptors;
  for (const ExportConfig& e : *env_.exports) {
    BackendCaps c = e.backend->Caps();
    nbd::ExportDescriptor d;
    d.name = e.name;
    d.description = e.description.empty() ? e.backend->Describe() : e.description;
    d.size = e.backend->Size();
    d.read_only = e.read_only || c.read_only;
    d.can_flush = c.can_flush;
    d.can_fua = c.can_fua;
    d.can_trim = c.can_trim;
    d.can_zero = c.can_zero;
    d.can_fast_zero = c.can_fast_zero;
    d.can_cache = c.can_cache;
    d.can_multi_conn = c.can_multi_conn;
    d.rotational = c.rotational;
    descriptors.push_back(std::move(d));
  }
  nbd::HandshakeMachine machine(std::move(descriptors));

  error_code ec;
  auto greeting = nbd::EncodeGreeting();
  co_await asio::async_write(socket_, asio::buffer(greeting), Nothrow(ec));
  if (ec) co_return false;
  uint8_t flags[4];
  co_await asio::async_read(socket_, asio::buffer(flags), Nothrow(ec));
  if (ec) co_return false;
  if (machine.OnClientFlags(flags) != nbd::HandshakeStep::kContinue) {
    ProtocolError(machine.last_problem());
    co_return false;
  }

  std::vector<uint8_t> payload, out;
  for (;;) {
    uint8_t hdr[nbd::kOptionHeaderSize];
    co_await asio::async_read(socket_, asio::buffer(hdr), Nothrow(ec));
    if (ec) co_return false;
    auto h = nbd::ParseOptionHeader(hdr);
    if (!h) {
      ProtocolError(h.error().message());
      co_return false;
    }
    out.clear();
    nbd::HandshakeStep step;
    const auto action = machine.OnOptionHeader(*h);
    if (action == nbd::HandshakeMachine::PayloadAction::kDisconnect) {
      ProtocolError("option " + std::to_string(h->option) + " with absurd length " +
                    std::to_string(h->length));
      co_return false;
    }
    if (action == nbd::HandshakeMachine::PayloadAction::kDiscard) {
      // (GCC 12 miscompiles co_await inside an if condition; keep it out.)
      bool discarded = co_await Discard(h->length);
      if (!discarded) co_return false;
      step = machine.OnOversizedOption(*h, out);
    } else {
      payload.resize(h->length);
      co_await asio::async_read(socket_, asio::buffer(payload), Nothrow(ec));
      if (ec) co_return false;
      step = machine.OnOption(*h, payload, out);
    }
    if (step == nbd::HandshakeStep::kHardDisconnect) {
      ProtocolError(machine.last_problem());
      co_return false;
    }
    if (!out.empty()) {
      co_await asio::async_write(socket_, asio::buffer(out), Nothrow(ec));
      if (ec) co_return false;
    }
    if (step == nbd::HandshakeStep::kClose) co_return false;
    if (step == nbd::HandshakeStep::kTransmission) break;
  }
  negotiated_ = machine.negotiated();
  const ExportConfig& e = (*env_.exports)[negotiated_.export_index];
  backend_ = e.backend;
  caps_ = backend_->Caps();
  spdlog::info("nbd: {}: export '{}' size {} flags {:#06x}{}", peer_, e.name, negotiated_.size,
               negotiated_.tx_flags, negotiated_.structured_replies ? " structured" : "");
  co_return true;
}

std::unique_ptr<Session::Reply> Session::AcquireReply() {
  {
    std::lock_guard lock(pool_mu_);
    if (!free_replies_.empty()) {
      auto r = std::move(free_replies_.back());
      free_replies_.pop_back();
      pooled_bytes_ -= r->data_capacity;
      return r;
    }
  }
  return std::make_unique<Reply>();
}

void Session::ReleaseReply(std::unique_ptr<Reply> r) {
  if (r->held != 0) {  // before the Retire that follows every counted reply
    held_bytes_.fetch_sub(r->held);
    r->held = 0;
  }
  // A pipe still holding bytes (a reply dropped or cut short) is closed; an
  // empty one goes back to the session's pipes.
  if (r->pipe && r->pipe_in != r->pipe_out) DiscardPipe(*r);
  std::unique_ptr<SplicePipe> pipe = std::move(r->pipe);
  r->pipe_in = r->pipe_out = r->pipe_slots = 0;
  r->head.clear();
  r->pieces.clear();
  r->total = r->copied = r->sent = 0;
  if (r->data_capacity > kMaxCachedBuffer) {
    r->data.reset();
    r->data_capacity = 0;
  }
  std::lock_guard lock(pool_mu_);
  if (pipe) free_pipes_.push_back(std::move(pipe));
  if (free_replies_.size() >= kMaxFreeReplies) return;
  if (pooled_bytes_ + r->data_capacity > kMaxPooledBytes) {
    r->data.reset();
    r->data_capacity = 0;
  }
  pooled_bytes_ += r->data_capacity;
  free_replies_.push_back(std::move(r));
}

std::unique_ptr<Session::SplicePipe> Session::AcquirePipe() {
  {
    std::lock_guard lock(pool_mu_);
    if (!free_pipes_.empty()) {
      auto p = std::move(free_pipes_.back());
      free_pipes_.pop_back();
      return p;
    }
    if (pipes_ >= std::min<size_t>(kMaxPipesPerSession,
                                   std::max<uint32_t>(1, env_.options.max_requests_in_flight))) {
      return nullptr;
    }
    if (env_.counters->splice_pipes.fetch_add(1) >= env_.options.max_splice_pipes) {
      env_.counters->splice_pipes.fetch_sub(1);
      return nullptr;
    }
    ++pipes_;
  }
  auto p = SplicePipe::Create();
  if (!p) {
    std::lock_guard lock(pool_mu_);
    --pipes_;
    env_.counters->splice_pipes.fetch_sub(1);
  }
  return p;
}

void Session::DiscardPipe(Reply& r) {
  r.pipe_in = r.pipe_out = 0;
  r.pipe_slots = 0;
  if (!r.pipe) return;
  r.pipe.reset();
  env_.counters->splice_pipes.fetch_sub(1);
  std::lock_guard lock(pool_mu_);
  --pipes_;
}

bool Session::SpliceData(Reply& r, uint64_t offset, size_t length, Status* err) {
  if (!splice_ok_.load(std::memory_order_relaxed)) return false;
  auto prepared = backend_->PrepareFileRange(offset, length);
  if (!prepared) {
    *err = Fail(prepared.error());
    return false;
  }
  const std::optional<FileRange>& range = *prepared;
  if (!range) return false;
  if (!r.pipe) {
    r.pipe = AcquirePipe();
    if (!r.pipe) return false;
  }
  // A pipe slot holds at most one page: count the pages the range touches.
  static const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  const size_t slots = (size_t(range->offset % page) + length + page - 1) / page;
  if (!r.pipe->Reserve((r.pipe_slots + slots) * page)) return false;
  int fill_err = r.pipe->Fill(range->fd, range->offset, length);
  if (fill_err != 0) {
    // EINVAL: the file (system) cannot splice; stop trying on this session.
    if (fill_err == EINVAL || fill_err == ENOSYS || fill_err == EOPNOTSUPP) {
      splice_ok_.store(false, std::memory_order_relaxed);
    }
    DiscardPipe(r);
    return false;
  }
  r.pipe_in += length;
  r.pipe_slots += slots;
  return true;
}

void Session::WakeStrandWaiter() {
  if (strand_waiting_.load()) {
    asio::post(strand_, [self = shared_from_this()] { self->reader_wake_.cancel(); });
  }
}

void Session::Retire(uint32_t n) {
  if (n == 0) return;
  pending_.fetch_sub(n);
  WakeStrandWaiter();
}

void Session::Enqueue(std::unique_ptr<Reply> r) { Complete(std::move(r)); }

Session::SendResult Session::SendDirect(std::vector<std::unique_ptr<Reply>>& batch, int& err) {
  const int fd = socket_.native_handle();
  std::optional<SigpipeBlock> no_sigpipe;
  size_t first = 0;  // first reply not completely sent
  auto advance = [&](size_t k) {
    while (first < batch.size() && k > 0) {
      Reply& r = *batch[first];
      size_t take = std::min(k, r.total - r.sent);
      r.sent += take;
      k -= take;
      if (r.sent < r.total) break;
      ++first;
    }
    while (first < batch.size() && batch[first]->sent == batch[first]->total) ++first;
  };
  advance(0);
  while (first < batch.size()) {
    // Gather the unsent copied bytes up to the next spliced piece; a
    // spliced piece at the front goes out on its own.
    iovec iov[kMaxIov];
    int n = 0;
    Reply* splice_reply = nullptr;
    size_t splice_len = 0;
    bool more = false;  // bytes of this batch follow what is sent now
    for (size_t i = first; i < batch.size() && !more; ++i) {
      const Reply& r = *batch[i];
      size_t skip = r.sent;
      for (const auto& p : r.pieces) {
        if (skip >= p.length) {
          skip -= p.length;
          continue;
        }
        if (splice_reply || n == kMaxIov || (p.from == Reply::From::kPipe && n > 0)) {
          more = true;
          break;
        }
        if (p.from == Reply::From::kPipe) {
          splice_reply = batch[i].get();
          splice_len = p.length - skip;
        } else {
          iov[n++] = {const_cast<uint8_t*>(r.Base(p)) + skip, p.length - skip};
        }
        skip = 0;
      }
    }
    ssize_t k;
    if (splice_reply) {
      if (!no_sigpipe) no_sigpipe.emplace();
      k = ::splice(splice_reply->pipe->read_fd(), nullptr, fd, nullptr, splice_len,
                   SPLICE_F_NONBLOCK | (more ? SPLICE_F_MORE : 0));
      if (k > 0) splice_reply->pipe_out += size_t(k);
    } else {
      msghdr m{};
      m.msg_iov = iov;
      m.msg_iovlen = size_t(n);
      k = ::sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT | (more ? MSG_MORE : 0));
    }
    if (k < 0) {
      if (errno == EINTR) continue;
      // The pipe always holds the piece's bytes, so EAGAIN is the socket.
      if (errno == EAGAIN || errno == EWOULDBLOCK) return SendResult::kSlow;
      err = errno;
      return SendResult::kError;
    }
    if (k == 0) {  // cannot happen with bytes to send; never spin on it
      err = EPIPE;
      return SendResult::kError;
    }
    advance(size_t(k));
  }
  return SendResult::kDone;
}

void Session::Complete(std::unique_ptr<Reply> r) {
  r->Seal();
  const bool send_here = r->copied <= kDirectSendMax;
  std::unique_lock lock(send_mu_);
  if (send_closed_) {  // the client is gone; nobody to answer
    lock.unlock();
    ReleaseReply(std::move(r));
    Retire(1);
    return;
  }
  queue_.push_back(std::move(r));
  if (sender_ != Sender::kNone) return;  // the current sender will send it
  if (!send_here) {
    sender_ = Sender::kStrand;
    lock.unlock();
    asio::post(strand_, [self = shared_from_this()] { self->writer_wake_.cancel(); });
    return;
  }
  sender_ = Sender::kThread;
  // Not thread_local-free, but never re-entered: the sender role is held.
  thread_local std::vector<std::unique_ptr<Reply>> batch;
  while (!queue_.empty()) {
    const size_t n = std::min(queue_.size(), kMaxRepliesPerWrite);
    batch.assign(std::make_move_iterator(queue_.begin()),
                 std::make_move_iterator(queue_.begin() + n));
    queue_.erase(queue_.begin(), queue_.begin() + n);
    lock.unlock();
    int err = 0;
    const SendResult res = SendDirect(batch, err);
    size_t done = batch.size();
    if (res == SendResult::kSlow) {
      done = 0;
      while (done < batch.size() && batch[done]->sent == batch[done]->total) ++done;
    }
    for (size_t i = 0; i < done; ++i) ReleaseReply(std::move(batch[i]));
    Retire(uint32_t(done));
    lock.lock();
    if (res == SendResult::kError) {
      send_closed_ = true;
      sender_ = Sender::kNone;
      std::vector<std::unique_ptr<Reply>> dropped = std::move(queue_);
      queue_.clear();
      lock.unlock();
      batch.clear();
      for (auto& d : dropped) ReleaseReply(std::move(d));
      Retire(uint32_t(dropped.size()));  // the batch's n were retired above
      asio::post(strand_, [self = shared_from_this(), err] {
        if (err != EPIPE && err != ECONNRESET) {
          spdlog::info("nbd: {}: write failed: {}", self->peer_, std::strerror(err));
        }
        self->write_failed_ = true;
        self->CloseSocket();
      });
      return;
    }
    if (res == SendResult::kSlow) {
      // The client is not reading fast enough: the strand writer waits for
      // it asynchronously instead of this thread.
      queue_.insert(queue_.begin(), std::make_move_iterator(batch.begin() + done),
                    std::make_move_iterator(batch.end()));
      batch.clear();
      sender_ = Sender::kStrand;
      lock.unlock();
      asio::post(strand_, [self = shared_from_this()] { self->writer_wake_.cancel(); });
      return;
    }
    batch.clear();
  }
  sender_ = Sender::kNone;
}

void Session::FillError(Reply& r, uint32_t error, const std::string& what) const {
  r.head.clear();
  if (negotiated_.structured_replies) {
    nbd::AppendErrorChunk(r.head, r.req.cookie, error,
                          std::string(CommandName(r.req.type)) + ": " + what);
  } else {
    r.head.resize(nbd::kSimpleReplySize);
    nbd::EncodeSimpleReply(r.head.data(), error, r.req.cookie);
  }
  r.HeadOnly();
}

awaitable<void> Session::Writer(std::shared_ptr<Session> self) {
  // Sends only while it owns the send side (sender_ == kStrand), which a
  // thread hands over when the socket stays full.
  std::vector<std::unique_ptr<Reply>> batch;
  for (;;) {
    std::unique_lock lock(self->send_mu_);
    if (self->send_closed_) break;
    if (self->sender_ == Sender::kStrand) {
      if (!self->queue_.empty()) {
        const size_t n = std::min(self->queue_.size(), kMaxRepliesPerWrite);
        batch.assign(std::make_move_iterator(self->queue_.begin()),
                     std::make_move_iterator(self->queue_.begin() + n));
        self->queue_.erase(self->queue_.begin(), self->queue_.begin() + n);
        lock.unlock();
        // The same non-blocking send as the threads use (gather writes and
        // splices), waiting for socket space in between without a thread.
        int err = 0;
        for (;;) {
          const SendResult res = self->SendDirect(batch, err);
          if (res != SendResult::kSlow) break;
          error_code ec;
          co_await self->socket_.async_wait(Socket::wait_write, Nothrow(ec));
          if (ec) {
            err = ec == asio::error::operation_aborted ? ECANCELED : ec.value();
            break;
          }
        }
        for (auto& r : batch) self->ReleaseReply(std::move(r));
        batch.clear();
        self->Retire(uint32_t(n));
        if (err != 0) {
          if (err != ECANCELED && err != EPIPE && err != ECONNRESET) {
            spdlog::info("nbd: {}: write failed: {}", self->peer_, std::strerror(err));
          }
          self->write_failed_ = true;
          break;
        }
        continue;
      }
      self->sender_ = Sender::kNone;
    }
    if (self->closing_ && self->sender_ == Sender::kNone) break;
    lock.unlock();
    error_code ec;
    self->writer_wake_.expires_at(asio::steady_timer::time_point::max());
    co_await self->writer_wake_.async_wait(Nothrow(ec));
  }
  // Replies still queued can no longer be sent; later ones are dropped.
  std::vector<std::unique_ptr<Reply>> dropped;
  {
    std::lock_guard lock(self->send_mu_);
    self->send_closed_ = true;
    dropped = std::move(self->queue_);
    self->queue_.clear();
  }
  for (auto& r : dropped) self->ReleaseReply(std::move(r));
  self->Retire(uint32_t(dropped.size()));
  self->writer_done_ = true;
  if (self->write_failed_) self->CloseSocket();
  self->reader_wake_.cancel();
}

awaitable<void> Session::Transmission() {
  auto self = shared_from_this();
  rbuf_.resize(kReadBufferSize);
  // No bigger SO_SNDBUF for Unix sockets: 4 MiB cut this server's CPU per
  // GiB but made nbdcopy slower overall (the client then copies out of skbs
  // that have left the cache; both share the same two cores).
  // Non-blocking, for the direct sends and splices (splice into a socket
  // blocks unless the socket itself is O_NONBLOCK).
  {
    error_code ec;
    socket_.non_blocking(true, ec);
    if (ec) {
      spdlog::warn("nbd: {}: cannot make the socket non-blocking: {}", peer_, ec.message());
      co_return;
    }
  }
  asio::co_spawn(strand_, Writer(self), asio::detached);
  const uint32_t max_in_flight = std::max<uint32_t>(1, env_.options.max_requests_in_flight);
  auto may_read = [&] {
    return (pending_.load() < max_in_flight && held_bytes_.load() < kMaxHeldBytes) ||
           writer_done_;
  };
  for (;;) {
    // Checked here first: a coroutine frame per request only when it waits.
    if (!may_read()) co_await WaitOnStrand(may_read);
    if (writer_done_) break;
    uint8_t hdr[nbd::kRequestHeaderSize];
    bool got_header = co_await ReadExact(hdr, sizeof hdr);
    if (!got_header) break;  // EOF or error: the client is gone
    auto parsed = nbd::ParseRequestHeader(hdr);
    if (!parsed) {
      ProtocolError(parsed.error().message());
      break;
    }
    const nbd::RequestHeader& req = *parsed;
    nbd::RequestCheck check = nbd::ValidateRequest(req, negotiated_);
    if (check.disconnect) {
      ProtocolError("write payload of " + std::to_string(req.length) + " bytes");
      break;
    }
    if (req.type == nbd::kCmdDisc && check.error == 0) break;
    ++requests_;
    env_.counters->requests++;
    auto r = AcquireReply();
    r->req = req;
    if (check.error != 0) {
      bool consumed = true;
      if (check.payload_to_read) consumed = co_await Discard(check.payload_to_read);
      if (!consumed) {
        ReleaseReply(std::move(r));
        break;
      }
      spdlog::debug("nbd: {}: {} rejected with error {}", peer_, CommandName(req.type),
                    check.error);
      ++pending_;
      FillError(*r, check.error, "request rejected");
      Enqueue(std::move(r));
      continue;
    }
    {
      uint64_t held = r->data_capacity;
      if (req.type == nbd::kCmdRead || req.type == nbd::kCmdWrite)
        held = std::max<uint64_t>(held, req.length);
      r->held = uint32_t(held);  // at most 32 MiB (kMaxPayload) or 4 MiB (kMaxCachedBuffer)
      held_bytes_ += held;
    }
    if (req.type == nbd::kCmdWrite) {
      std::byte* buf = r->Data(req.length);
      bool got_payload = co_await ReadExact(reinterpret_cast<uint8_t*>(buf), req.length);
      if (!got_payload) {
        ReleaseReply(std::move(r));
        break;
      }
    }
    ++pending_;
    if (InlineAllowed(req)) {
      ++env_.counters->requests_inline;
      Execute(*r);
      Complete(std::move(r));
      continue;
    }
    const bool is_long = IsLong(req);
    if (is_long) {
      co_await WaitOnStrand([&] { return running_long_.load() < kMaxRunningLong || writer_done_; });
      // The client may have gone while this waited: a CACHE it can no
      // longer see answered is not started.
      bool gone = writer_done_;
      {
        std::lock_guard lock(send_mu_);
        gone = gone || send_closed_;
      }
      if (gone) {
        ReleaseReply(std::move(r));
        Retire(1);
        break;
      }
      ++running_long_;
    }
    ++running_;
    asio::post(*env_.workers, [self, rp = r.release(), is_long]() mutable {
      std::unique_ptr<Reply> reply(rp);
      self->Execute(*reply);
      self->Complete(std::move(reply));
      if (is_long) self->running_long_.fetch_sub(1);
      self->running_.fetch_sub(1);
      self->WakeStrandWaiter();
    });
  }
  // Stop reading; let every started request finish and its reply go out
  // (NBD_CMD_DISC requires it), then close.
  co_await WaitOnStrand([&] { return running_.load() == 0; });
  closing_ = true;
  writer_wake_.cancel();
  while (!writer_done_) {
    error_code ec;
    reader_wake_.expires_at(asio::steady_timer::time_point::max());
    co_await reader_wake_.async_wait(Nothrow(ec));
  }
}

awaitable<void> Session::WaitOnStrand(std::function<bool()> ready) {
  // strand_waiting_ before the re-check: see its comment in the header.
  for (;;) {
    error_code ec;
    strand_waiting_.store(true);
    if (ready()) break;
    reader_wake_.expires_at(asio::steady_timer::time_point::max());
    co_await reader_wake_.async_wait(Nothrow(ec));
  }
  strand_waiting_.store(false);
}

// --- Worker side -------------------------------------------------------------

bool Session::InlineAllowed(const nbd::RequestHeader& q) {
  if (q.type != nbd::kCmdRead || q.length > kInlineMaxSplicedLength) return false;
  if (q.length <= kInlineMaxLength)
    return fast_reads_.load(std::memory_order_relaxed) >= kInlineWarmupReads;
  // A large read inline: only after a run of fast large reads (pages not in
  // the page cache, e.g. blocks a proxy's fill stored with O_DIRECT or an
  // image larger than memory, make them slow and send them back to the
  // pool), never on a rotational disk, page-aligned (so it splices rather
  // than falling back to a copy), with no hole probe to run (not
  // structured, DF, or data already known), and only for a range the
  // backend names without fetching.
  if (q.length < kSpliceMinLength || caps_.rotational || q.offset % 4096 != 0) return false;
  if (fast_large_reads_.load(std::memory_order_relaxed) < kInlineWarmupReads) return false;
  if (negotiated_.structured_replies && !(q.flags & nbd::kCmdFlagDf) && caps_.can_extents &&
      !KnownData(q.offset, q.length))
    return false;
  return backend_->FileRangeFor(q.offset, q.length).has_value();
}

void Session::Execute(Reply& r) {
  const nbd::RequestHeader& q = r.req;
  const bool fua = (q.flags & nbd::kCmdFlagFua) != 0;
  Status st;
  switch (q.type) {
    case nbd::kCmdRead: {
      // Timed whole (hole probe included) for the inline warm-ups: every
      // read counts for the short ones, reads of kSpliceMinLength or more
      // for the long ones.
      const int64_t t0 = NowNs();
      ExecuteRead(r);
      const bool fast = NowNs() - t0 <= kSlowReadNs;
      auto note = [fast](std::atomic<uint32_t>& run) {
        if (!fast)
          run.store(0, std::memory_order_relaxed);
        else if (run.load(std::memory_order_relaxed) < kInlineWarmupReads)
          run.fetch_add(1, std::memory_order_relaxed);
      };
      note(fast_reads_);
      if (q.length >= kSpliceMinLength) note(fast_large_reads_);
      return;
    }
    case nbd::kCmdWrite:
      st = backend_->Write(std::span<const std::byte>(r.data.get(), q.length), q.offset, fua);
      if (st) env_.counters->bytes_written += q.length;
      break;
    case nbd::kCmdFlush:
      st = backend_->Flush();
      break;
    case nbd::kCmdTrim:
      NoteData(0, 0);  // the range may now hold holes
      st = backend_->Trim(q.offset, q.length, fua);
      break;
    case nbd::kCmdWriteZeroes:
      NoteData(0, 0);
      st = backend_->Zero(q.offset, q.length, (q.flags & nbd::kCmdFlagNoHole) == 0,
                          (q.flags & nbd::kCmdFlagFastZero) != 0, fua);
      break;
    case nbd::kCmdCache:
      st = backend_->Cache(q.offset, q.length);
      break;
    case nbd::kCmdBlockStatus: {
      std::vector<Extent> extents;
      if (caps_.can_extents) {
        auto ex = backend_->Extents(q.offset, q.length);
        if (!ex) {
          st = Fail(ex.error());
          break;
        }
        extents = std::move(*ex);
      }
      auto desc =
          nbd::BlockStatusFromExtents(extents, q.length, (q.flags & nbd::kCmdFlagReqOne) != 0);
      r.head.clear();
      nbd::AppendBlockStatusChunk(r.head, q.cookie, nbd::kBaseAllocationId, desc);
      r.HeadOnly();
      return;
    }
    default:
      st = Fail(Error::Invalid("unknown command"));
      break;
  }
  if (!st) {
    spdlog::debug("nbd: {}: {} failed: {}", peer_, CommandName(q.type), st.error().message());
    FillError(r, nbd::WireError(st.error().code()), std::strerror(st.error().code()));
    return;
  }
  r.head.resize(nbd::kSimpleReplySize);
  nbd::EncodeSimpleReply(r.head.data(), 0, q.cookie);
  r.HeadOnly();
}

void Session::ExecuteRead(Reply& r) {
  const nbd::RequestHeader& q = r.req;
  const bool structured = negotiated_.structured_replies;
  const bool try_splice = q.length >= kSpliceMinLength;
  r.head.clear();
  r.pieces.clear();
  auto fail = [&](const Error& err) {
    spdlog::debug("nbd: {}: read failed: {}", peer_, err.message());
    FillError(r, nbd::WireError(err.code()), std::strerror(err.code()));
  };

  if (structured && !(q.flags & nbd::kCmdFlagDf) && caps_.can_extents &&
      q.length >= kHoleProbeMinLength && !KnownData(q.offset, q.length)) {
    uint64_t span = std::min<uint64_t>(negotiated_.size - q.offset,
                                       std::max<uint64_t>(q.length, kExtentsLookahead));
    auto ex = backend_->Extents(q.offset, span);
    if (ex) {
      uint64_t data_run = 0;
      for (const Extent& e : *ex) {
        if (e.zero) break;
        data_run += e.length;
      }
      if (data_run > 0) NoteData(q.offset, data_run);
    }
    if (ex && !KnownData(q.offset, q.length)) {
      auto segs = nbd::PlanStructuredRead(*ex, q.offset, q.length);
      bool any_hole = std::any_of(segs.begin(), segs.end(), [](auto& s) { return s.hole; });
      if (any_hole) {
        // Read every data segment first (into the pipe, or else copied): a
        // failure must not follow chunks that already claimed success.
        bool spliced = try_splice;
        Status prepared;
        for (const auto& s : segs) {
          if (!spliced) break;
          if (!s.hole) spliced = SpliceData(r, s.offset, s.length, &prepared);
        }
        if (!prepared) {
          if (r.pipe_in > 0) DiscardPipe(r);
          return fail(prepared.error());
        }
        if (!spliced) {
          if (r.pipe_in > 0) DiscardPipe(r);  // drop the segments already piped
          std::byte* buf = r.Data(q.length);
          for (const auto& s : segs) {
            if (s.hole) continue;
            size_t at = size_t(s.offset - q.offset);
            auto st = backend_->Read(std::span<std::byte>(buf + at, s.length), s.offset);
            if (!st) return fail(st.error());
          }
        }
        for (size_t i = 0; i < segs.size(); ++i) {
          const auto& s = segs[i];
          uint16_t flags = i + 1 == segs.size() ? nbd::kReplyFlagDone : 0;
          size_t at = r.head.size();
          if (s.hole) {
            r.head.resize(at + nbd::kOffsetHoleChunkSize);
            nbd::EncodeOffsetHoleChunk(r.head.data() + at, flags, q.cookie, s.offset, s.length);
            r.AddHead(at, nbd::kOffsetHoleChunkSize);
          } else {
            r.head.resize(at + nbd::kOffsetDataHeaderSize);
            nbd::EncodeOffsetDataHeader(r.head.data() + at, flags, q.cookie, s.offset, s.length);
            r.AddHead(at, nbd::kOffsetDataHeaderSize);
            if (spliced) {
              r.AddPipe(s.length);
            } else {
              r.AddData(size_t(s.offset - q.offset), s.length);
            }
          }
        }
        env_.counters->bytes_read += q.length;
        return;
      }
    }
    // No holes, or extents unavailable: an ordinary read below.
  }
  Status st;
  bool spliced = try_splice && SpliceData(r, q.offset, q.length, &st);
  if (!spliced && st) {  // (a failed SpliceData leaves no bytes in the pipe)
    st = backend_->Read(std::span<std::byte>(r.Data(q.length), q.length), q.offset);
  }
  if (!st) return fail(st.error());
  if (structured) {
    r.head.resize(nbd::kOffsetDataHeaderSize);
    nbd::EncodeOffsetDataHeader(r.head.data(), nbd::kReplyFlagDone, q.cookie, q.offset, q.length);
  } else {
    r.head.resize(nbd::kSimpleReplySize);
    nbd::EncodeSimpleReply(r.head.data(), 0, q.cookie);
  }
  r.AddHead(0, r.head.size());
  if (spliced) {
    r.AddPipe(q.length);
  } else {
    r.AddData(0, q.length);
  }
  env_.counters->bytes_read += q.length;
}

}  // namespace kagemusha::storage

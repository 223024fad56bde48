#include "nbd_session.h"

#include <algorithm>
#include <array>
#include <cstring>

#include <spdlog/spdlog.h>

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
constexpr size_t kMaxFreeReplies = 64;
// Replies sent in one gather write at most.
constexpr size_t kMaxRepliesPerWrite = 32;
// Receive buffer for request headers and small write payloads.
constexpr size_t kReadBufferSize = 64 * 1024;
// A hole probe asks the backend about this much beyond a read, so that the
// following sequential reads can skip the probe.
constexpr uint64_t kExtentsLookahead = 64ull << 20;

auto Nothrow(error_code& ec) { return asio::redirect_error(asio::use_awaitable, ec); }

const char* CommandName(uint16_t type) {
  switch (type) {
    case nbd::kCmdRead: return "read";
    case nbd::kCmdWrite: return "write";
    case nbd::kCmdDisc: return "disconnect";
    case nbd::kCmdFlush: return "flush";
    case nbd::kCmdTrim: return "trim";
    case nbd::kCmdCache: return "cache";
    case nbd::kCmdWriteZeroes: return "write-zeroes";
    case nbd::kCmdBlockStatus: return "block-status";
    default: return "unknown command";
  }
}

}  // namespace

// A request and, once executed, its reply. `pieces` say which bytes of
// `head` (headers, small chunks) and `data` (payload) go out, in order.
struct Session::Reply {
  nbd::RequestHeader req;
  std::vector<uint8_t> head;
  std::unique_ptr<std::byte[]> data;
  size_t data_capacity = 0;
  struct Piece {
    bool from_data;
    uint32_t offset;
    uint32_t length;
  };
  std::vector<Piece> pieces;

  std::byte* Data(size_t n) {
    if (data_capacity < n) {
      data.reset(new std::byte[n]);  // uninitialised on purpose
      data_capacity = n;
    }
    return data.get();
  }
  void AddHead(size_t at, size_t len) { pieces.push_back({false, uint32_t(at), uint32_t(len)}); }
  void AddData(size_t at, size_t len) { pieces.push_back({true, uint32_t(at), uint32_t(len)}); }
  // Replaces the reply with head bytes only (an error or a status reply).
  void HeadOnly() {
    pieces.clear();
    AddHead(0, head.size());
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
  error_code ignored;
  socket_.shutdown(Socket::shutdown_both, ignored);
  socket_.close(ignored);
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
  if (free_replies_.empty()) return std::make_unique<Reply>();
  auto r = std::move(free_replies_.back());
  free_replies_.pop_back();
  return r;
}

void Session::ReleaseReply(std::unique_ptr<Reply> r) {
  if (free_replies_.size() >= kMaxFreeReplies) return;
  r->head.clear();
  r->pieces.clear();
  if (r->data_capacity > kMaxCachedBuffer) {
    r->data.reset();
    r->data_capacity = 0;
  }
  free_replies_.push_back(std::move(r));
}

void Session::Enqueue(std::unique_ptr<Reply> r) {
  if (writer_done_) {  // the client is gone; nobody to answer
    --pending_;
    reader_wake_.cancel();
    ReleaseReply(std::move(r));
    return;
  }
  queue_.push_back(std::move(r));
  writer_wake_.cancel();
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
  std::vector<asio::const_buffer> bufs;
  std::vector<std::unique_ptr<Reply>> batch;
  for (;;) {
    if (self->queue_.empty()) {
      if (self->closing_) break;
      error_code ec;
      self->writer_wake_.expires_at(asio::steady_timer::time_point::max());
      co_await self->writer_wake_.async_wait(Nothrow(ec));
      continue;
    }
    size_t n = std::min(self->queue_.size(), kMaxRepliesPerWrite);
    batch.assign(std::make_move_iterator(self->queue_.begin()),
                 std::make_move_iterator(self->queue_.begin() + n));
    self->queue_.erase(self->queue_.begin(), self->queue_.begin() + n);
    bufs.clear();
    for (auto& r : batch) {
      for (const auto& p : r->pieces) {
        const void* base = p.from_data ? static_cast<const void*>(r->data.get())
                                       : static_cast<const void*>(r->head.data());
        bufs.emplace_back(static_cast<const uint8_t*>(base) + p.offset, p.length);
      }
    }
    error_code ec;
    co_await asio::async_write(self->socket_, bufs, Nothrow(ec));
    for (auto& r : batch) self->ReleaseReply(std::move(r));
    batch.clear();
    self->pending_ -= uint32_t(n);
    self->reader_wake_.cancel();
    if (ec) {
      if (ec != asio::error::operation_aborted) {
        spdlog::info("nbd: {}: write failed: {}", self->peer_, ec.message());
      }
      self->write_failed_ = true;
      break;
    }
  }
  // Replies still queued can no longer be sent.
  self->pending_ -= uint32_t(self->queue_.size());
  for (auto& r : self->queue_) self->ReleaseReply(std::move(r));
  self->queue_.clear();
  self->writer_done_ = true;
  if (self->write_failed_) self->CloseSocket();
  self->reader_wake_.cancel();
}

awaitable<void> Session::Transmission() {
  auto self = shared_from_this();
  rbuf_.resize(kReadBufferSize);
  asio::co_spawn(strand_, Writer(self), asio::detached);
  const uint32_t max_in_flight = std::max<uint32_t>(1, env_.options.max_requests_in_flight);
  for (;;) {
    error_code ec;
    while (pending_ >= max_in_flight && !writer_done_) {
      reader_wake_.expires_at(asio::steady_timer::time_point::max());
      co_await reader_wake_.async_wait(Nothrow(ec));
    }
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
    if (req.type == nbd::kCmdWrite) {
      std::byte* buf = r->Data(req.length);
      bool got_payload = co_await ReadExact(reinterpret_cast<uint8_t*>(buf), req.length);
      if (!got_payload) {
        ReleaseReply(std::move(r));
        break;
      }
    }
    ++pending_;
    ++running_;
    asio::post(*env_.workers, [self, rp = r.release()]() mutable {
      std::unique_ptr<Reply> reply(rp);
      self->Execute(*reply);
      asio::post(self->strand_, [self, rp2 = reply.release()]() mutable {
        std::unique_ptr<Reply> done(rp2);
        --self->running_;
        self->reader_wake_.cancel();
        self->Enqueue(std::move(done));
      });
    });
  }
  // Stop reading; let every started request finish and its reply go out
  // (NBD_CMD_DISC requires it), then close.
  while (running_ > 0) {
    error_code ec;
    reader_wake_.expires_at(asio::steady_timer::time_point::max());
    co_await reader_wake_.async_wait(Nothrow(ec));
  }
  closing_ = true;
  writer_wake_.cancel();
  while (!writer_done_) {
    error_code ec;
    reader_wake_.expires_at(asio::steady_timer::time_point::max());
    co_await reader_wake_.async_wait(Nothrow(ec));
  }
}

// --- Worker side -------------------------------------------------------------

void Session::Execute(Reply& r) {
  const nbd::RequestHeader& q = r.req;
  const bool fua = (q.flags & nbd::kCmdFlagFua) != 0;
  Status st;
  switch (q.type) {
    case nbd::kCmdRead:
      ExecuteRead(r);
      return;
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
      auto desc = nbd::BlockStatusFromExtents(extents, q.length,
                                              (q.flags & nbd::kCmdFlagReqOne) != 0);
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
  std::byte* buf = r.Data(q.length);
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
        // Read every data segment first: a failure must not follow chunks
        // that already claimed success.
        for (const auto& s : segs) {
          if (s.hole) continue;
          size_t at = size_t(s.offset - q.offset);
          auto st = backend_->Read(std::span<std::byte>(buf + at, s.length), s.offset);
          if (!st) return fail(st.error());
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
            nbd::EncodeOffsetDataHeader(r.head.data() + at, flags, q.cookie, s.offset,
                                        s.length);
            r.AddHead(at, nbd::kOffsetDataHeaderSize);
            r.AddData(size_t(s.offset - q.offset), s.length);
          }
        }
        env_.counters->bytes_read += q.length;
        return;
      }
    }
    // No holes, or extents unavailable: an ordinary read below.
  }
  auto st = backend_->Read(std::span<std::byte>(buf, q.length), q.offset);
  if (!st) return fail(st.error());
  if (structured) {
    r.head.resize(nbd::kOffsetDataHeaderSize);
    nbd::EncodeOffsetDataHeader(r.head.data(), nbd::kReplyFlagDone, q.cookie, q.offset,
                                q.length);
  } else {
    r.head.resize(nbd::kSimpleReplySize);
    nbd::EncodeSimpleReply(r.head.data(), 0, q.cookie);
  }
  r.AddHead(0, r.head.size());
  r.AddData(0, q.length);
  env_.counters->bytes_read += q.length;
}

}  // namespace kagemusha::storage

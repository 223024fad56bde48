// The encoder session (source host): QEMU migration stream in, reuse
// protocol out; return-path bytes relayed back. See stream_proxy.h.
//
// Threads: the caller's thread reads the source QEMU, parses and sends frames
// (the forward path); a relay thread reads the decoder's frames (RETURN,
// END, ABORT) and writes return-path bytes to the source QEMU; the
// PageLearner's worker hashes and learns pages behind the forward path.
// Frames to the WAN go through one WanWriter (the relay never writes there
// except to abort, which the forward thread also may do).
//
// Hashing in line only where the decision needs it: with an empty SUMMARY
// (always on a first hop) no page can become a reference, so every page is
// sent as a literal at once and hashed later by the learner (END waits for
// it). With a non-empty SUMMARY the rewritable pages of one read are hashed
// together (PageHasher::HashMany) before that read's frames are sent.
#include <spdlog/spdlog.h>
#include <zstd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <optional>
#include <thread>
#include <unordered_set>

#include "kagemusha/memcache/migration_stream.h"
#include "kagemusha/memcache/reuse_protocol.h"
#include "kagemusha/memcache/stream_proxy.h"
#include "stream_proxy_session.h"

namespace kagemusha::memcache {
namespace {

using namespace reuse;
using Phase = MigrationStreamParser::Phase;

constexpr size_t kReadChunk = 256u << 10;

bool InWindow(Phase p) { return p == Phase::kHeader || p == Phase::kRam; }

class NullVisitor final : public MigrationStreamVisitor {
 public:
  void OnPassthrough(std::span<const uint8_t>) override {}
  void OnPage(const PageRecord&) override {}
  void OnFallback(const Fallback&) override {}
};

class EncoderSession final : public MigrationStreamVisitor {
 public:
  EncoderSession(ByteStream& qemu, ByteStream& wan, const EncoderOptions& o)
      : qemu_(qemu),
        wan_(wan),
        opt_(o),
        writer_(wan),
        learner_(detail::PageLearner::Options{o.store, o.learn_queue_bytes, 0, "encoder"}) {}
  ~EncoderSession() override {
    if (relay_.joinable()) relay_.join();
    if (cctx_) ZSTD_freeCCtx(cctx_);
  }

  Result<ProxyStats> Run(ProxyStats* partial) {
    auto st = RunInner();
    stats_.return_bytes = return_bytes_.load();
    stats_.wan_bytes_in = wan_in_.load();
    stats_.wan_bytes_out = writer_.bytes();
    stats_.forward_wan_bytes = stats_.wan_bytes_out;
    if (partial) *partial = stats_;
    if (!st) return Fail(st.error());
    return stats_;
  }

 private:
  Status RunInner() {
    if (!opt_.store) return Fail(Error::Invalid("encoder: no page store"));
    auto hasher = PageHasher::Create();
    if (!hasher) return Fail(hasher.error());
    hasher_.emplace(std::move(*hasher));
    wan_.SetReadTimeout(opt_.handshake_timeout);
    if (auto st = Handshake(); !st) return AbortAll(st.error());
    wan_.SetReadTimeout(std::chrono::milliseconds(0));
    // A silent source QEMU, or a decoder that stops taking bytes, fails the
    // migration after the idle timeout. Not the WAN's read side: the return
    // path may be silent for a whole precopy migration.
    qemu_.SetReadTimeout(opt_.idle_timeout);
    qemu_.SetWriteTimeout(opt_.idle_timeout);
    wan_.SetWriteTimeout(opt_.idle_timeout);
    relay_ = std::thread([this] { RelayLoop(); });

    std::vector<uint8_t> buf(kReadChunk);
    while (true) {
      if (credit_) {
        if (auto st = WaitForWindow(); !st) return AbortAll(st.error());
      }
      auto n = qemu_.Read(buf);
      if (stopping_.load()) break;  // the relay ended the session
      if (!n) {
        if (n.error().code() == ETIMEDOUT)
          return AbortAll(Error::Timeout("the source QEMU sent nothing for " +
                                         std::to_string(opt_.idle_timeout.count()) +
                                         " ms (idle timeout)"));
        return AbortAll(n.error().Context("reading the source QEMU"));
      }
      if (*n == 0) break;
      stats_.qemu_bytes += *n;
      read_total_ = stats_.qemu_bytes;
      if (auto st = FeedChunk(std::span<const uint8_t>(buf.data(), *n)); !st)
        return AbortAll(st.error());
    }
    if (stopping_.load()) {
      relay_.join();
      std::lock_guard lk(mu_);
      if (relay_error_) return AbortAll(*relay_error_);
      return AbortAll(
          Error::Protocol("the decoder closed the connection before the source "
                          "QEMU finished"));
    }
    // The source QEMU closed: the stream is complete (or it gave up).
    source_eof_ = true;
    Status finished = parser_.Finish(*this);
    if (visit_error_) return AbortAll(*visit_error_);
    if (!end_sent_) {
      if (auto st = AppendEndFrame(); !st) return AbortAll(st.error());
    }
    if (!finished) {
      // QEMU stopped mid-item: its migration failed. Make sure the
      // destination does not take a half stream for a whole one.
      return AbortAll(Error::Protocol("the source QEMU stream ended early (" +
                                      finished.error().message() + ")"));
    }
    FlushZeroRun();
    if (auto st = AppendDone(DoneFigures{stats_.qemu_bytes, stats_.pages, stats_.zero_pages}, out_);
        !st)
      return AbortAll(st.error());
    if (auto st = Flush(); !st) return AbortAll(st.error().Context("sending to the decoder"));
    wan_.ShutdownWrite();
    // The decoder closes its side once its QEMU has loaded the state; do not
    // wait forever for a decoder that went silent.
    {
      std::unique_lock lk(mu_);
      auto done = [&] { return relay_done_; };
      bool in_time = true;
      if (opt_.idle_timeout.count() > 0)
        in_time = relay_cv_.wait_for(lk, opt_.idle_timeout, done);
      else
        relay_cv_.wait(lk, done);
      if (!in_time) {
        lk.unlock();
        return AbortAll(Error::Timeout("the decoder did not confirm the end within " +
                                       std::to_string(opt_.idle_timeout.count()) +
                                       " ms (idle timeout)"));
      }
    }
    relay_.join();  // until the decoder closes its side
    {
      std::lock_guard lk(mu_);
      if (relay_error_) return AbortAll(*relay_error_);
      if (!peer_end_ok_)
        return AbortAll(Error::Protocol("the decoder closed without confirming END"));
    }
    qemu_.Abort();
    wan_.Abort();
    // Learn: the image of the VM that left. Pages are content-addressed, so
    // a manifest can only ever cost hits, never correctness. The learner
    // finishes before the session reports the migration done.
    learner_.Submit();
    learner_.Drain();
    stats_.learned_pages = learner_.stored_pages();
    stats_.learn_skipped_pages = learner_.skipped_pages();
    if (auto st = opt_.store->PutManifest(opt_.vm, learner_.BuildManifest()); !st) {
      spdlog::warn("encoder: cannot write the manifest for {}: {}", opt_.vm, st.error().message());
    } else {
      (void)opt_.store->Sync();
      stats_.learned = true;
    }
    return Ok();
  }

  Status Handshake() {
    Hello h;
    // Ask for DELIVERED only when flow control is on.
    h.capabilities = cap::kZstd | (opt_.window_bytes > 0 ? cap::kDelivered : 0);
    h.vm = opt_.vm;
    h.uuid = opt_.uuid;
    std::vector<uint8_t> out;
    if (auto st = AppendHello(h, out); !st) return st;
    if (auto st = writer_.Write(out); !st) return Fail(st.error().Context("sending HELLO"));
    bool got_hello = false;
    std::vector<uint8_t> buf(64u << 10);
    while (true) {
      auto f = frames_.Next();
      if (!f) return Fail(f.error());
      if (!*f) {
        auto n = wan_.Read(buf);
        if (!n) return Fail(n.error().Context("waiting for the decoder's SUMMARY"));
        if (*n == 0) return Fail(Error::Protocol("the decoder closed during the handshake"));
        wan_in_ += *n;
        frames_.Append(std::span<const uint8_t>(buf.data(), *n));
        continue;
      }
      switch ((*f)->type) {
        case FrameType::kHello: {
          auto peer = DecodeHello((*f)->payload);
          if (!peer) return Fail(peer.error());
          if (peer->version != kProtocolVersion)
            return Fail(Error::Protocol("the decoder speaks protocol version " +
                                        std::to_string(peer->version) + ", this encoder " +
                                        std::to_string(kProtocolVersion)));
          zstd_ = opt_.zstd && (peer->capabilities & cap::kZstd);
          credit_ = opt_.window_bytes > 0 && (peer->capabilities & cap::kDelivered);
          got_hello = true;
          break;
        }
        case FrameType::kSummary: {
          if (!got_hello) return Fail(Error::Protocol("SUMMARY before HELLO"));
          auto s = DecodeSummary((*f)->payload);
          if (!s) return Fail(s.error());
          summary_.insert(s->prefixes.begin(), s->prefixes.end());
          stats_.summary_entries += s->prefixes.size();
          if (s->last) {
            if (zstd_) {
              cctx_ = ZSTD_createCCtx();
              zbuf_.resize(ZSTD_compressBound(kPageBytes));
            }
            return Ok();
          }
          break;
        }
        case FrameType::kAbort: {
          auto why = DecodeAbort((*f)->payload);
          return Fail(
              Error(ECONNABORTED, "the decoder refused the migration: " + (why ? *why : "?")));
        }
        default:
          return Fail(Error::Protocol(std::string("unexpected ") + FrameTypeName((*f)->type) +
                                      " frame during the handshake"));
      }
    }
  }

  // The relay thread: decoder -> source QEMU.
  void RelayLoop() {
    std::vector<uint8_t> buf(64u << 10);
    std::optional<Error> err;
    while (!err) {
      auto f = frames_.Next();
      if (!f) {
        err = f.error();
        break;
      }
      if (!*f) {
        auto n = wan_.Read(buf);
        if (!n) {
          err = n.error().Context("reading from the decoder");
          break;
        }
        if (*n == 0) break;  // the decoder is done
        wan_in_ += *n;
        frames_.Append(std::span<const uint8_t>(buf.data(), *n));
        continue;
      }
      const Frame& fr = **f;
      switch (fr.type) {
        case FrameType::kReturn:
          return_bytes_ += fr.payload.size();
          // After the source closed there is nobody to tell; drop quietly.
          if (!source_eof_.load()) {
            if (auto st = qemu_.WriteAll(fr.payload); !st)
              spdlog::debug("encoder: return path to the source QEMU: {}", st.error().message());
          }
          break;
        case FrameType::kDelivered: {
          auto d = DecodeDelivered(fr.payload);
          if (!d) {
            err = d.error();
            break;
          }
          {
            std::lock_guard lk(mu_);
            if (!credit_)
              err = Error::Protocol("DELIVERED from a decoder that was not asked for it");
            else if (*d < delivered_ || *d > read_total_.load())
              err = Error::Protocol("DELIVERED " + std::to_string(*d) + " out of range (" +
                                    std::to_string(delivered_) + ".." +
                                    std::to_string(read_total_.load()) + ")");
            else
              delivered_ = *d;
          }
          relay_cv_.notify_all();
          break;
        }
        case FrameType::kEnd: {
          auto theirs = DecodeEnd(fr.payload);
          if (!theirs) {
            err = theirs.error();
            break;
          }
          std::lock_guard lk(mu_);
          if (!my_end_) {
            err = Error::Protocol("the decoder sent END before the encoder did");
          } else if (*my_end_ != *theirs) {
            err =
                Error::Protocol("END mismatch: " + detail::DescribeEndMismatch(*my_end_, *theirs));
          } else {
            peer_end_ok_ = true;
          }
          break;
        }
        case FrameType::kAbort: {
          auto why = DecodeAbort(fr.payload);
          err = Error(ECONNABORTED, "the decoder aborted: " + (why ? *why : why.error().message()));
          break;
        }
        default:
          err = Error::Protocol(std::string("unexpected ") + FrameTypeName(fr.type) +
                                " frame from the decoder");
      }
    }
    {
      std::lock_guard lk(mu_);
      if (err && !relay_error_) relay_error_ = *err;
      relay_done_ = true;
    }
    relay_cv_.notify_all();
    if (err || !source_eof_.load()) {
      // Wake the forward thread: the session is over.
      stopping_ = true;
      qemu_.Abort();
    }
  }

  // Flow control: do not read more from the source QEMU while `window`
  // stream bytes are still on their way to the destination QEMU.
  Status WaitForWindow() {
    const uint64_t window = std::max<uint64_t>(opt_.window_bytes, kMinFlowWindowBytes);
    std::unique_lock lk(mu_);
    auto open = [&] {
      return relay_done_ || stopping_.load() || stats_.qemu_bytes - delivered_ < window;
    };
    while (!open()) {
      const uint64_t before = delivered_;
      auto moved = [&] { return open() || delivered_ != before; };
      if (opt_.idle_timeout.count() > 0) {
        if (!relay_cv_.wait_for(lk, opt_.idle_timeout, moved))
          return Fail(Error::Timeout("the decoder delivered nothing to the destination QEMU for " +
                                     std::to_string(opt_.idle_timeout.count()) +
                                     " ms (idle timeout)"));
      } else {
        relay_cv_.wait(lk, moved);
      }
    }
    return Ok();
  }

  Status AbortAll(const Error& e) {
    stopping_ = true;
    std::vector<uint8_t> out;
    (void)AppendAbort(e.message(), out);
    (void)writer_.Write(out);  // best effort: the decoder may be gone
    qemu_.Abort();             // the source QEMU sees a failed migration; the VM keeps running
    wan_.Abort();
    if (relay_.joinable()) relay_.join();
    spdlog::warn("encoder: migration of {} aborted: {}", opt_.vm, e.message());
    return Fail(e);
  }

  Status FeedChunk(std::span<const uint8_t> chunk) {
    if (end_sent_ || !InWindow(parser_.phase())) {
      parser_.Feed(chunk, *this);
      return Flush();
    }
    // END must reach the decoder before the first byte outside the rewriting
    // window (the device state), so the decoder can refuse to hand the
    // destination a complete stream whose pages do not check out. Probe a
    // copy of the parser; if this chunk leaves the window, find the exact
    // byte by bisection (parsing without hashing is cheap).
    NullVisitor nv;
    MigrationStreamParser probe = parser_;
    probe.Feed(chunk, nv);
    if (InWindow(probe.phase())) {
      parser_.Feed(chunk, *this);
      return Flush();
    }
    size_t lo = 0, hi = chunk.size();  // prefix lo stays in the window, hi leaves it
    while (hi - lo > 1) {
      size_t mid = lo + (hi - lo) / 2;
      probe = parser_;
      probe.Feed(chunk.first(mid), nv);
      (InWindow(probe.phase()) ? lo : hi) = mid;
    }
    parser_.Feed(chunk.first(lo), *this);
    if (visit_error_) return Fail(*visit_error_);
    if (auto st = AppendEndFrame(); !st) return st;
    parser_.Feed(chunk.subspan(lo), *this);
    return Flush();
  }

  Status AppendEndFrame() {
    FlushZeroRun();
    ResolvePending();
    // END needs the digest of every page before it: let the learner catch up.
    // (It hashes its backlog first and stores it after END has gone.)
    auto wait_start = std::chrono::steady_clock::now();
    auto fig = learner_.DrainForEnd();
    stats_.end_wait_us = uint64_t(std::chrono::duration_cast<std::chrono::microseconds>(
                                      std::chrono::steady_clock::now() - wait_start)
                                      .count());
    auto pass = pass_acc_.Figures();
    fig.passthrough_bytes = pass.passthrough_bytes;
    fig.passthrough_crc = pass.passthrough_crc;
    {
      std::lock_guard lk(mu_);
      my_end_ = fig;
    }
    end_sent_ = true;
    return AppendEnd(fig, out_);
  }

  Status Flush() {
    FlushZeroRun();
    ResolvePending();
    if (visit_error_) return Fail(*visit_error_);
    auto st = writer_.Write(out_);
    out_.clear();
    if (!st) {
      if (st.error().code() == ETIMEDOUT)
        return Fail(Error::Timeout("the decoder took no data for " +
                                   std::to_string(opt_.idle_timeout.count()) +
                                   " ms (idle timeout)"));
      return Fail(st.error().Context("sending to the decoder"));
    }
    learner_.Submit();  // forwarded first, learned behind
    return Ok();
  }

  // Hashes the pages waiting for a decision (all at once) and puts their
  // frames, reference or literal, in their places in out_.
  void ResolvePending() {
    if (pending_.empty()) return;
    digests_.resize(pending_.size());
    hasher_->HashMany(pending_data_, digests_);
    std::vector<uint8_t>& merged = merged_;  // kept between calls (no fresh mmap each time)
    merged.clear();
    merged.reserve(out_.size() + pending_.size() * (kPageBytes + 32));
    size_t pos = 0;
    for (size_t i = 0; i < pending_.size(); ++i) {
      const Pending& p = pending_[i];
      merged.insert(merged.end(), out_.begin() + long(pos), out_.begin() + long(p.out_pos));
      pos = p.out_pos;
      const PageDigest& d = digests_[i];
      learner_.SetDigest(p.event, d);
      PageHeader h{p.continued, p.block, p.offset};
      if (summary_.contains(DigestPrefix(d))) {
        ++stats_.ref_pages;
        Record(AppendPageRef(PageRef{h, d}, merged));
      } else {
        EmitLiteral(h, std::span<const uint8_t>(pending_data_).subspan(i * kPageBytes, kPageBytes),
                    merged);
      }
    }
    merged.insert(merged.end(), out_.begin() + long(pos), out_.end());
    out_.swap(merged);
    pending_.clear();
    pending_data_.clear();
  }

  void EmitLiteral(const PageHeader& h, std::span<const uint8_t> data, std::vector<uint8_t>& out) {
    ++stats_.literal_pages;
    if (zstd_) {
      size_t n = ZSTD_compressCCtx(cctx_, zbuf_.data(), zbuf_.size(), data.data(), data.size(), 1);
      if (!ZSTD_isError(n) && n < kPageBytes) {
        ++stats_.zstd_pages;
        Record(AppendLiteral(Literal{h, std::span<const uint8_t>(zbuf_.data(), n)}, true, out));
        return;
      }
    }
    Record(AppendLiteral(Literal{h, data}, false, out));
  }

  // --- MigrationStreamVisitor ---
  void OnPassthrough(std::span<const uint8_t> bytes) override {
    FlushZeroRun();
    pass_acc_.Passthrough(bytes);
    while (!bytes.empty()) {
      size_t n = std::min(bytes.size(), kMaxPassthroughChunk);
      Record(AppendPassthrough(bytes.first(n), out_));
      bytes = bytes.subspan(n);
    }
  }

  void OnPage(const PageRecord& rec) override {
    ++stats_.pages;
    PageHeader h{rec.continued, rec.block_id, rec.offset};
    const bool in_window = !end_sent_;
    if (rec.zero) {
      ++stats_.zero_pages;
      learner_.AddZero(rec.block_id, rec.offset, rec.fill, in_window);
      // Runs of CONTINUE zero records at consecutive offsets become one frame.
      if (run_ && rec.continued && rec.offset == run_->next && rec.fill == run_->fill &&
          run_->count < kMaxZeroRun) {
        ++run_->count;
        run_->next += kPageBytes;
        return;
      }
      FlushZeroRun();
      run_ = ZeroRun{rec.continued,
                     std::string(rec.continued ? "" : rec.block_id),
                     rec.offset,
                     rec.fill,
                     1,
                     rec.offset + kPageBytes};
      return;
    }
    FlushZeroRun();
    if (!rec.rewritable) ++stats_.postcopy_pages;
    size_t ev = learner_.AddPage(rec.block_id, rec.offset, rec.data, in_window);
    if (rec.rewritable && !summary_.empty()) {
      // The decision needs the digest: hash with the rest of this read.
      pending_.push_back(Pending{ev, out_.size(), rec.continued,
                                 std::string(rec.continued ? "" : rec.block_id), rec.offset});
      pending_data_.insert(pending_data_.end(), rec.data.begin(), rec.data.end());
      return;
    }
    // Nothing the destination holds can match: a literal, now.
    EmitLiteral(h, rec.data, out_);
  }

  void OnFallback(const Fallback& why) override {
    FlushZeroRun();
    stats_.fell_back = true;
    stats_.fallback_reason = why.reason;
    spdlog::info("encoder: forwarding the rest of the stream raw from byte {}: {}",
                 why.stream_offset, why.reason);
  }

  void FlushZeroRun() {
    if (!run_) return;
    PageHeader h{run_->continued, run_->block, run_->offset};
    Record(AppendZero(ZeroPage{h, run_->fill, run_->count}, out_));
    run_.reset();
  }

  void Record(const Status& st) {
    if (!st && !visit_error_) visit_error_ = st.error();
  }

  ByteStream& qemu_;
  ByteStream& wan_;
  const EncoderOptions& opt_;
  detail::WanWriter writer_;
  FrameReader frames_;  // decoder -> encoder; the handshake, then the relay thread
  MigrationStreamParser parser_;
  std::vector<uint8_t> out_;
  std::unordered_set<uint64_t> summary_;
  bool zstd_ = false;
  bool credit_ = false;  // the decoder reports DELIVERED (set before the relay starts)
  ZSTD_CCtx* cctx_ = nullptr;
  std::vector<uint8_t> zbuf_;
  std::optional<PageHasher> hasher_;  // forward thread: pages awaiting a decision
  detail::EndAccumulator pass_acc_;   // passthrough part of END (pages: the learner)
  detail::PageLearner learner_;
  struct Pending {
    size_t event;    // in the learner's batch
    size_t out_pos;  // where its frame goes in out_
    bool continued;
    std::string block;
    uint64_t offset;
  };
  std::vector<Pending> pending_;
  std::vector<uint8_t> pending_data_;
  std::vector<uint8_t> merged_;
  std::vector<PageDigest> digests_;
  std::optional<Error> visit_error_;
  struct ZeroRun {
    bool continued;
    std::string block;
    uint64_t offset;
    uint8_t fill;
    uint32_t count;
    uint64_t next;
  };
  std::optional<ZeroRun> run_;  // ZERO records not sent yet
  bool end_sent_ = false;
  ProxyStats stats_;
  std::thread relay_;

  std::atomic<uint64_t> return_bytes_{0};
  std::atomic<uint64_t> wan_in_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> source_eof_{false};
  std::mutex mu_;
  std::optional<EndFigures> my_end_;     // GUARDED_BY(mu_)
  bool peer_end_ok_ = false;             // GUARDED_BY(mu_)
  std::optional<Error> relay_error_;     // GUARDED_BY(mu_)
  bool relay_done_ = false;              // GUARDED_BY(mu_)
  uint64_t delivered_ = 0;               // GUARDED_BY(mu_): the decoder's last DELIVERED
  std::atomic<uint64_t> read_total_{0};  // stream bytes read from the source QEMU
  std::condition_variable relay_cv_;
};

}  // namespace

Result<ProxyStats> RunEncoderSession(ByteStream& qemu, ByteStream& wan,
                                     const EncoderOptions& options, ProxyStats* partial) {
  EncoderSession s(qemu, wan, options);
  return s.Run(partial);
}

}  // namespace kagemusha::memcache

// The decoder session (destination host): reuse protocol in, the exact QEMU
// migration stream out to the destination QEMU; its return path relayed back
// to the encoder. See stream_proxy.h.
//
// Threads: the caller's thread reads frames from the encoder and writes the
// rebuilt stream to the destination QEMU (the forward path); a relay thread
// reads the destination QEMU's return path and sends it as RETURN frames;
// the PageLearner's worker hashes and learns literal pages behind the
// forward path (they go to QEMU first). At END the forward thread waits for
// the learner, so every page digest is known before the comparison, and
// nothing after END (device state) reaches QEMU unless it matched.
// Referenced pages are verified in line, all those of one flush together
// (PageHasher::HashMany), before any byte of that flush goes to QEMU.
#include <spdlog/spdlog.h>
#include <zstd.h>

#include <atomic>
#include <condition_variable>
#include <optional>
#include <set>
#include <thread>

#include "kagemusha/memcache/migration_stream.h"
#include "kagemusha/memcache/reuse_protocol.h"
#include "kagemusha/memcache/stream_proxy.h"
#include "stream_proxy_session.h"

namespace kagemusha::memcache {
namespace {

using namespace reuse;

constexpr size_t kReadChunk = 256u << 10;
// References expand 80-fold; bound what waits for the destination QEMU.
constexpr size_t kFlushBytes = 1u << 20;
// After DONE the decoder waits this long for the destination QEMU to close
// its side (it does once it has loaded the state). Generous: postcopy keeps
// the return path open until the last page arrived, but DONE comes after that.
constexpr auto kCloseWait = std::chrono::seconds(30);
// DELIVERED goes back after at most this many newly delivered bytes (well
// under kMinFlowWindowBytes, so an encoder waiting for its window always
// hears of progress once this side has written what it got).
constexpr uint64_t kDeliveredEvery = 256u << 10;

class DecoderSession {
 public:
  DecoderSession(ByteStream& wan, const QemuConnector& connect, const DecoderOptions& o)
      : wan_(wan),
        connect_(connect),
        opt_(o),
        writer_(wan),
        learner_(detail::PageLearner::Options{o.store, o.learn_queue_bytes, o.store_quota_bytes,
                                              "decoder"}) {}
  ~DecoderSession() {
    if (relay_.joinable()) relay_.join();
    if (dctx_) ZSTD_freeDCtx(dctx_);
  }

  Result<ProxyStats> Run(ProxyStats* partial) {
    auto st = RunInner();
    stats_.return_bytes = return_bytes_.load();
    stats_.wan_bytes_out = writer_.bytes();
    stats_.forward_wan_bytes = stats_.wan_bytes_in;
    if (partial) *partial = stats_;
    if (!st) return Fail(st.error());
    return stats_;
  }

 private:
  Status RunInner() {
    if (!opt_.store) return Fail(Error::Invalid("decoder: no page store"));
    auto hasher = PageHasher::Create();
    if (!hasher) return Fail(hasher.error());
    hasher_.emplace(std::move(*hasher));
    dctx_ = ZSTD_createDCtx();
    page_.resize(kPageBytes);

    std::vector<uint8_t> buf(kReadChunk);
    bool handshake_done = false;
    wan_.SetReadTimeout(opt_.handshake_timeout);  // until HELLO
    while (true) {
      auto f = frames_.Next();
      if (!f) return AbortAll(f.error());
      if (!*f) {
        if (auto st = FlushQemu(); !st) return AbortAll(st.error());
        auto n = wan_.Read(buf);
        if (!n) {
          if (n.error().code() == ETIMEDOUT && handshake_done)
            return AbortAll(Error::Timeout("the encoder sent nothing for " +
                                           std::to_string(opt_.idle_timeout.count()) +
                                           " ms (idle timeout)"));
          return AbortAll(n.error().Context("reading from the encoder"));
        }
        if (*n == 0)
          return AbortAll(Error::Protocol(handshake_done
                                              ? "the encoder's stream ended before DONE"
                                              : "the encoder closed during the handshake"));
        stats_.wan_bytes_in += *n;
        frames_.Append(std::span<const uint8_t>(buf.data(), *n));
        continue;
      }
      const Frame fr = **f;
      if (!handshake_done) {
        if (fr.type != FrameType::kHello)
          return AbortAll(
              Error::Protocol(std::string("expected HELLO, got ") + FrameTypeName(fr.type)));
        if (auto st = Handshake(fr.payload); !st) return AbortAll(st.error());
        handshake_done = true;
        continue;
      }
      auto done = Dispatch(fr);
      if (!done) return AbortAll(done.error());
      if (*done) break;
      if (qemu_out_.size() >= kFlushBytes) {
        if (auto st = FlushQemu(); !st) return AbortAll(st.error());
      }
    }
    return Finish();
  }

  Status Handshake(std::span<const uint8_t> payload) {
    auto h = DecodeHello(payload);
    if (!h) return Fail(h.error());
    if (h->version != kProtocolVersion)
      return Fail(Error::Protocol("the encoder speaks protocol version " +
                                  std::to_string(h->version) + ", this decoder " +
                                  std::to_string(kProtocolVersion)));
    if (!opt_.vm.empty() && h->vm != opt_.vm)
      return Fail(Error::Invalid("the encoder sends VM '" + h->vm + "', this decoder expects '" +
                                 opt_.vm + "'"));
    vm_ = h->vm;
    zstd_ok_ = (h->capabilities & cap::kZstd) != 0;
    report_delivered_ = (h->capabilities & cap::kDelivered) != 0;
    auto q = connect_();
    if (!q) return Fail(q.error().Context("connecting to the destination QEMU"));
    qemu_ = std::move(*q);

    // SUMMARY: digest prefixes of the pages this host holds for the VM.
    std::set<uint64_t> prefixes;
    if (auto m = opt_.store->GetManifest(vm_)) {
      for (const auto& e : m->entries) {
        if (opt_.store->Contains(e.digest)) prefixes.insert(DigestPrefix(e.digest));
      }
    } else if (m.error().code() != ENOENT) {
      spdlog::warn("decoder: manifest of {} unusable ({}); sending an empty summary", vm_,
                   m.error().message());
    }
    stats_.summary_entries = prefixes.size();
    // Pin what the SUMMARY offers until END (after it no reference comes).
    learner_.SetPinned(!prefixes.empty());
    std::vector<uint8_t> out;
    Hello mine;
    mine.capabilities = cap::kZstd | cap::kDelivered;
    mine.vm = vm_;
    if (auto st = AppendHello(mine, out); !st) return st;
    SummaryChunk chunk;
    for (auto it = prefixes.begin();;) {
      chunk.prefixes.clear();
      while (it != prefixes.end() && chunk.prefixes.size() < kMaxSummaryEntriesPerFrame)
        chunk.prefixes.push_back(*it++);
      chunk.last = it == prefixes.end();
      if (auto st = AppendSummary(chunk, out); !st) return st;
      if (auto st = writer_.Write(out); !st) return Fail(st.error().Context("sending SUMMARY"));
      out.clear();
      if (chunk.last) break;
    }
    // From here on a silent encoder, or a destination QEMU that stops taking
    // bytes, fails the migration after the idle timeout (set before the
    // relay thread shares the streams).
    wan_.SetReadTimeout(opt_.idle_timeout);
    wan_.SetWriteTimeout(opt_.idle_timeout);
    qemu_->SetWriteTimeout(opt_.idle_timeout);
    relay_ = std::thread([this] { RelayLoop(); });
    return Ok();
  }

  // The relay thread: destination QEMU return path -> encoder.
  void RelayLoop() {
    std::vector<uint8_t> buf(64u << 10);
    std::vector<uint8_t> out;
    while (true) {
      auto n = qemu_->Read(buf);
      if (!n || *n == 0) break;  // closed (normally after loading) or reset
      return_bytes_ += *n;
      out.clear();
      for (size_t off = 0; off < *n; off += kMaxPassthroughChunk) {
        size_t len = std::min(kMaxPassthroughChunk, *n - off);
        (void)AppendReturn(std::span<const uint8_t>(buf.data() + off, len), out);
      }
      if (auto st = writer_.Write(out); !st) break;  // the forward thread sees it too
    }
    {
      std::lock_guard lk(mu_);
      qemu_closed_ = true;
    }
    cv_.notify_all();
  }

  // Handles one frame; true once DONE arrived.
  Result<bool> Dispatch(const Frame& fr) {
    switch (fr.type) {
      case FrameType::kPassthrough:
        pass_acc_.Passthrough(fr.payload);
        ToQemu(fr.payload);
        return false;
      case FrameType::kPageRef: {
        auto r = DecodePageRef(fr.payload);
        if (!r) return Fail(r.error());
        size_t slot = ref_data_.size();
        ref_data_.resize(slot + kPageBytes);
        auto page = std::span<uint8_t>(ref_data_).subspan(slot, kPageBytes);
        auto got = opt_.store->Get(r->digest, page);
        if (!got) return Fail(got.error().Context("page store"));
        if (!*got)
          return Fail(
              Error(ENOENT, "referenced page " + r->digest.Hex().substr(0, 16) + " (" +
                                std::string(r->header.continued ? std::string_view(last_block_)
                                                                : r->header.block) +
                                " @ " + std::to_string(r->header.offset) +
                                ") is not in this host's page store"));
        // Never hand QEMU a page that is not the one referenced: checked
        // (with the others of this flush) in VerifyRefs before any write.
        ref_digests_.push_back(r->digest);
        ++stats_.ref_pages;
        return EmitPage(r->header, page, &r->digest);
      }
      case FrameType::kLiteral:
      case FrameType::kLiteralZstd: {
        bool z = fr.type == FrameType::kLiteralZstd;
        auto l = DecodeLiteral(fr.payload, z);
        if (!l) return Fail(l.error());
        if (z) {
          if (!zstd_ok_) return Fail(Error::Protocol("LITERAL_ZSTD without the zstd capability"));
          size_t n = ZSTD_decompressDCtx(dctx_, page_.data(), page_.size(), l->data.data(),
                                         l->data.size());
          if (ZSTD_isError(n) || n != kPageBytes)
            return Fail(Error::Protocol("LITERAL_ZSTD does not decompress to one page"));
          ++stats_.zstd_pages;
        }
        ++stats_.literal_pages;
        // To QEMU now; hashed (for END) and learned behind.
        return EmitPage(l->header, z ? std::span<const uint8_t>(page_) : l->data, nullptr);
      }
      case FrameType::kZero: {
        auto z = DecodeZero(fr.payload);
        if (!z) return Fail(z.error());
        auto block = ResolveBlock(z->header);
        if (!block) return Fail(block.error());
        PageRecord rec;
        rec.block_id = *block;
        rec.zero = true;
        rec.fill = z->fill;
        for (uint32_t i = 0; i < z->count; ++i) {
          rec.offset = z->header.offset + uint64_t(i) * kPageBytes;
          rec.continued = i > 0 || z->header.continued;
          ++stats_.pages;
          ++stats_.zero_pages;
          learner_.AddZero(*block, rec.offset, rec.fill, !end_seen_);
          if (auto e = EncodeToQemu(rec); !e) return e;
          if (qemu_out_.size() >= kFlushBytes) {
            if (auto st = FlushQemu(); !st) return Fail(st.error());
          }
        }
        return false;
      }
      case FrameType::kEnd: {
        if (end_seen_) return Fail(Error::Protocol("a second END"));
        auto theirs = DecodeEnd(fr.payload);
        if (!theirs) return Fail(theirs.error());
        if (auto st = VerifyRefs(); !st) return Fail(st.error());
        // Every digest before END is known after this (the worker hashes its
        // backlog first and stores it after END has gone).
        auto wait_start = std::chrono::steady_clock::now();
        auto mine = learner_.DrainForEnd();
        stats_.end_wait_us = uint64_t(std::chrono::duration_cast<std::chrono::microseconds>(
                                          std::chrono::steady_clock::now() - wait_start)
                                          .count());

        auto pass = pass_acc_.Figures();
        mine.passthrough_bytes = pass.passthrough_bytes;
        mine.passthrough_crc = pass.passthrough_crc;
        if (mine != *theirs)
          return Fail(
              Error::Protocol("END mismatch: " + detail::DescribeEndMismatch(mine, *theirs)));
        end_seen_ = true;
        learner_.SetPinned(false);  // no reference comes after END
        std::vector<uint8_t> out;
        (void)AppendEnd(mine, out);
        if (auto st = writer_.Write(out); !st) return Fail(st.error().Context("sending END"));
        return false;
      }
      case FrameType::kDone: {
        auto d = DecodeDone(fr.payload);
        if (!d) return Fail(d.error());
        if (!end_seen_) return Fail(Error::Protocol("DONE before END"));
        if (d->stream_bytes != stats_.qemu_bytes || d->pages != stats_.pages ||
            d->zero_pages != stats_.zero_pages)
          return Fail(Error::Protocol(
              "DONE mismatch: the encoder read " + std::to_string(d->stream_bytes) + " bytes / " +
              std::to_string(d->pages) + " pages, this decoder rebuilt " +
              std::to_string(stats_.qemu_bytes) + " / " + std::to_string(stats_.pages)));
        return true;
      }
      case FrameType::kAbort: {
        auto why = DecodeAbort(fr.payload);
        return Fail(
            Error(ECONNABORTED, "the encoder aborted: " + (why ? *why : why.error().message())));
      }
      default:
        return Fail(Error::Protocol(std::string("unexpected ") + FrameTypeName(fr.type) +
                                    " frame from the encoder"));
    }
  }

  // The block a page frame names, or for CONTINUE the previous frame's.
  Result<std::string_view> ResolveBlock(const PageHeader& h) {
    if (!h.continued) {
      last_block_.assign(h.block);
    } else if (last_block_.empty()) {
      return Fail(Error::Protocol("CONTINUE page frame with no previous block"));
    }
    return std::string_view(last_block_);
  }

  // `known`: the digest of a referenced page (already in the store).
  Result<bool> EmitPage(const PageHeader& h, std::span<const uint8_t> data,
                        const PageDigest* known) {
    auto block = ResolveBlock(h);
    if (!block) return Fail(block.error());
    ++stats_.pages;
    if (end_seen_) ++stats_.postcopy_pages;
    if (known)
      learner_.AddKnownPage(*block, h.offset, *known, !end_seen_);
    else
      learner_.AddPage(*block, h.offset, data, !end_seen_);
    PageRecord rec;
    rec.block_id = *block;
    rec.offset = h.offset;
    rec.continued = h.continued;
    rec.data = data;
    return EncodeToQemu(rec);
  }

  // Checks every referenced page fetched since the last call against its
  // digest, all in one batch.
  Status VerifyRefs() {
    if (ref_digests_.empty()) return Ok();
    ref_check_.resize(ref_digests_.size());
    hasher_->HashMany(ref_data_, ref_check_);
    for (size_t i = 0; i < ref_digests_.size(); ++i) {
      if (ref_check_[i] != ref_digests_[i])
        return Fail(Error::Io("stored page " + ref_digests_[i].Hex().substr(0, 16) +
                              " does not match its digest"));
    }
    ref_digests_.clear();
    ref_data_.clear();
    return Ok();
  }

  Result<bool> EncodeToQemu(const PageRecord& rec) {
    size_t before = qemu_out_.size();
    if (auto st = EncodePageRecord(rec, qemu_out_); !st) return Fail(st.error());
    stats_.qemu_bytes += qemu_out_.size() - before;
    return false;
  }

  void ToQemu(std::span<const uint8_t> b) {
    qemu_out_.insert(qemu_out_.end(), b.begin(), b.end());
    stats_.qemu_bytes += b.size();
  }

  Status FlushQemu() {
    if (auto v = VerifyRefs(); !v) return v;
    if (qemu_out_.empty() || !qemu_) return Ok();
    const size_t n = qemu_out_.size();
    auto st = qemu_->WriteAll(qemu_out_);
    qemu_out_.clear();
    learner_.Submit();  // delivered first, learned behind
    if (!st && st.error().code() == ETIMEDOUT)
      return Fail(Error::Timeout("the destination QEMU took no data for " +
                                 std::to_string(opt_.idle_timeout.count()) + " ms (idle timeout)"));
    if (!st) {
      // The destination QEMU closed before the stream ended: its incoming
      // migration failed. Let its last return-path bytes through first (a
      // postcopy SHUT must reach the source before our ABORT), then abort.
      WaitQemuClosed(std::chrono::seconds(5));
      return Fail(st.error().Context("the destination QEMU closed its connection early"));
    }
    delivered_ += n;
    if (report_delivered_ && delivered_ - reported_ >= kDeliveredEvery) {
      std::vector<uint8_t> out;
      (void)AppendDelivered(delivered_, out);
      reported_ = delivered_;
      if (auto w = writer_.Write(out); !w) return Fail(w.error().Context("sending DELIVERED"));
    }
    return Ok();
  }

  bool WaitQemuClosed(std::chrono::seconds limit) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, limit, [&] { return qemu_closed_; });
  }

  Status Finish() {
    if (auto st = FlushQemu(); !st) return AbortAll(st.error());
    qemu_->ShutdownWrite();
    // Learn the image as it arrived (content-addressed: a stale manifest
    // costs hits, never correctness). The destination QEMU is loading
    // meanwhile; the learner finishes before the session reports done.
    learner_.Submit();
    learner_.Drain();
    stats_.learned_pages = learner_.stored_pages();
    stats_.learn_skipped_pages = learner_.skipped_pages();
    if (auto st = opt_.store->PutManifest(vm_, learner_.BuildManifest()); !st) {
      spdlog::warn("decoder: cannot write the manifest for {}: {}", vm_, st.error().message());
    } else {
      (void)opt_.store->Sync();
      stats_.learned = true;
    }
    if (!WaitQemuClosed(kCloseWait))
      spdlog::warn("decoder: the destination QEMU kept its connection open after the stream");
    qemu_->Abort();
    relay_.join();
    wan_.ShutdownWrite();
    // The encoder closes once it has seen our side end.
    std::vector<uint8_t> buf(4096);
    while (true) {
      auto n = wan_.Read(buf);
      if (!n || *n == 0) break;
    }
    wan_.Abort();
    return Ok();
  }

  Status AbortAll(const Error& e) {
    // The destination QEMU must never complete on a stream we could not
    // vouch for: cut it off first.
    if (qemu_) qemu_->Abort();
    std::vector<uint8_t> out;
    (void)AppendAbort(e.message(), out);
    (void)writer_.Write(out);
    wan_.Abort();
    if (relay_.joinable()) relay_.join();
    spdlog::warn("decoder: migration{}{} aborted: {}", vm_.empty() ? "" : " of ", vm_, e.message());
    return Fail(e);
  }

  ByteStream& wan_;
  const QemuConnector& connect_;
  const DecoderOptions& opt_;
  detail::WanWriter writer_;
  std::unique_ptr<ByteStream> qemu_;
  FrameReader frames_;
  std::vector<uint8_t> qemu_out_;
  std::vector<uint8_t> page_;
  std::string vm_;
  std::string last_block_;  // for CONTINUE page frames
  bool zstd_ok_ = false;
  bool report_delivered_ = false;  // the encoder asked for DELIVERED (flow control)
  uint64_t delivered_ = 0;         // stream bytes written to the destination QEMU
  uint64_t reported_ = 0;          // ... as last told to the encoder
  bool end_seen_ = false;
  ZSTD_DCtx* dctx_ = nullptr;
  std::optional<PageHasher> hasher_;  // forward thread: referenced pages
  std::vector<uint8_t> ref_data_;     // referenced pages not verified yet
  std::vector<PageDigest> ref_digests_, ref_check_;
  detail::EndAccumulator pass_acc_;  // passthrough part of END (pages: the learner)
  detail::PageLearner learner_;
  ProxyStats stats_;
  std::thread relay_;
  std::atomic<uint64_t> return_bytes_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool qemu_closed_ = false;  // GUARDED_BY(mu_)
};

}  // namespace

Result<ProxyStats> RunDecoderSession(ByteStream& wan, const QemuConnector& connect_qemu,
                                     const DecoderOptions& options, ProxyStats* partial) {
  DecoderSession s(wan, connect_qemu, options);
  return s.Run(partial);
}

}  // namespace kagemusha::memcache

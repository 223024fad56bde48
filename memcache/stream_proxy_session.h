// Private helpers shared by the encoder and decoder sessions (encoder.cc,
// decoder.cc): the END figures both sides accumulate, the manifest both sides
// learn, the PageLearner that hashes and stores pages behind the forward path,
// and a mutex-guarded WAN writer (the forward thread and the relay thread
// both send frames).
#pragma once

#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kagemusha/common/coding.h"
#include "kagemusha/memcache/page_store.h"
#include "kagemusha/memcache/reuse_protocol.h"
#include "kagemusha/memcache/stream_proxy.h"

namespace kagemusha::memcache::detail {

// What END carries: counters, a CRC-32C over passthrough bytes, and a
// SHA-256 over every page record delivered, in order, naming where it goes:
//   'P' | u8 len | block | be64 offset | digest[32]   (PAGE)
//   'Z' | u8 len | block | be64 offset | u8 fill      (ZERO)
// so a page's content, its place and a zero page's fill are all covered.
class EndAccumulator {
 public:
  EndAccumulator();
  ~EndAccumulator();
  EndAccumulator(const EndAccumulator&) = delete;
  EndAccumulator& operator=(const EndAccumulator&) = delete;
  void Page(std::string_view block, uint64_t offset, const PageDigest& d);
  void Zero(std::string_view block, uint64_t offset, uint8_t fill);
  void Passthrough(std::span<const uint8_t> b) {
    passthrough_bytes_ += b.size();
    crc_ = Crc32c(b, crc_);
  }
  // The figures so far (does not disturb the running digest).
  reuse::EndFigures Figures() const;

 private:
  void Place(char kind, std::string_view block, uint64_t offset);
  void* ctx_;  // EVP_MD_CTX*
  uint64_t pages_ = 0, zero_pages_ = 0, passthrough_bytes_ = 0;
  uint32_t crc_ = 0;
};

// (block, offset) -> digest of the latest content; ZERO pages remove entries.
class ManifestBuilder {
 public:
  void Set(std::string_view block, uint64_t offset, const PageDigest& d);
  void Erase(std::string_view block, uint64_t offset);
  Manifest Build() const;

 private:
  std::map<std::string, std::map<uint64_t, PageDigest>, std::less<>> blocks_;
};

// Hashes and learns pages BEHIND the forward path (docs/memcache-proxies.md
// §3). The forward thread adds page events in stream order to a batch and
// Submit()s it after it has forwarded the bytes; a worker thread hashes the
// pages that have no digest yet and learns them into the store
// (PageStore::PutMany, so PageHasher::HashMany sees whole batches), then
// feeds the END page chain and the manifest in stream order. Drain() waits
// until everything submitted is done; only then are PageFigures() and
// BuildManifest() read (by the forward thread).
//
// The stream never waits for the store: if more than max_queued_bytes of
// page data are queued, Submit() hashes the batch on the calling thread
// (the END chain needs every digest) and hands over digests only; those
// pages are not learned (counted in skipped_pages()).
//
// Pinning (decoder): a batch submitted with pinned = true never makes the
// store grow past quota_bytes, so a quota eviction cannot drop a page the
// SUMMARY offered while references to it may still arrive; the pages that
// do not fit are hashed but not learned (skipped_pages()). This relies on
// this process being the only one that adds to the store while the
// migration runs (the CLI runs one migration at a time per proxy).
//
// Thread-safety: the Add*/Submit/Drain/Set*/Build calls come from one
// thread (the forward thread); the worker is internal.
class PageLearner {
 public:
  struct Options {
    PageStore* store = nullptr;  // null: hash only
    size_t max_queued_bytes = 64u << 20;
    uint64_t quota_bytes = 0;  // the store's quota, for pinned batches (0: none)
    const char* who = "proxy";
  };
  explicit PageLearner(const Options& o);
  ~PageLearner();
  PageLearner(const PageLearner&) = delete;
  PageLearner& operator=(const PageLearner&) = delete;

  // A non-zero page; `data` is copied. Its digest comes from the worker,
  // unless SetDigest() gives it before Submit(). Returns its event index.
  size_t AddPage(std::string_view block, uint64_t offset, std::span<const uint8_t> data,
                 bool in_window);
  // A page the store already holds, digest known (a resolved reference).
  void AddKnownPage(std::string_view block, uint64_t offset, const PageDigest& d, bool in_window);
  void AddZero(std::string_view block, uint64_t offset, uint8_t fill, bool in_window);
  void SetDigest(size_t event, const PageDigest& d);
  // Batches submitted from now on are pinned (see above).
  void SetPinned(bool pinned) { pinned_ = pinned; }
  // Hands the current batch to the worker (no-op when empty).
  void Submit();
  // Waits until every submitted batch is processed.
  void Drain();
  // For END (inside the migration's downtime): submits the current batch
  // and waits only until every page submitted so far is HASHED and folded
  // into the END chain and the manifest; storing the backlog goes on
  // behind (Drain() still waits for it). The worker hashes the whole queue
  // first and stores it afterwards, so END never waits for store writes.
  // Returns PageFigures() as of that point.
  reuse::EndFigures DrainForEnd();
  // After Drain(): the page part of END (passthrough fields zero) and the
  // manifest, over everything submitted.
  reuse::EndFigures PageFigures() const { return end_acc_.Figures(); }
  Manifest BuildManifest() const { return manifest_.Build(); }
  // After Drain().
  uint64_t stored_pages() const { return stored_; }
  uint64_t skipped_pages() const { return skipped_ + skipped_inline_; }

 private:
  static constexpr uint32_t kNoData = ~uint32_t{0};
  struct Event {
    std::string block;
    uint64_t offset = 0;
    PageDigest digest;
    uint32_t data = kNoData;  // page index in Batch::data
    bool zero = false;
    uint8_t fill = 0;
    bool in_window = false;
    bool has_digest = false;
  };
  static Event NewEvent(std::string_view block, uint64_t offset, bool in_window);
  struct Batch {
    std::vector<Event> events;
    std::vector<uint8_t> data;  // pages, back to back
    bool pinned = false;
  };
  void WorkerLoop();
  void Process(Batch& b);
  // Process() in two halves, for the END rush: digests (hashing only) and
  // the END chain / manifest, then the store writes.
  void HashAndFold(Batch& b, std::vector<PageDigest>& digests);
  void StoreHashed(Batch& b);
  void Fold(const Batch& b, const std::vector<PageDigest>& digests);
  void StoreKnown(std::span<const uint8_t> known, bool pinned);
  // Digests for `pages` (consecutive 4 KiB pages) into `out`, learning them
  // if allowed. Worker thread.
  void HashAndLearn(std::span<const uint8_t> pages, std::span<PageDigest> out, bool pinned);
  size_t StoreBudget(size_t n, bool pinned);

  Options opt_;
  Batch batch_;  // forward thread
  bool pinned_ = false;
  std::optional<PageHasher> inline_hasher_;  // forward thread
  std::optional<PageHasher> worker_hasher_;  // worker thread

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Batch> queue_;      // GUARDED_BY(mu_)
  std::vector<Batch> spare_;     // GUARDED_BY(mu_): processed, buffers kept
  size_t queued_bytes_ = 0;      // GUARDED_BY(mu_)
  bool busy_ = false;            // GUARDED_BY(mu_)
  bool stop_ = false;            // GUARDED_BY(mu_)
  bool rush_ = false;            // GUARDED_BY(mu_): DrainForEnd is waiting
  uint64_t submitted_ = 0;       // GUARDED_BY(mu_): batches queued so far
  uint64_t folded_ = 0;          // GUARDED_BY(mu_): batches in the END chain
  uint64_t skipped_inline_ = 0;  // forward thread
  // Worker thread; read by the forward thread after Drain().
  EndAccumulator end_acc_;
  ManifestBuilder manifest_;
  uint64_t stored_ = 0, skipped_ = 0;
  bool store_failed_ = false;
  std::thread worker_;
};

// Serializes whole-frame writes to the WAN and counts them.
class WanWriter {
 public:
  explicit WanWriter(ByteStream& wan) : wan_(wan) {}
  Status Write(std::span<const uint8_t> frames) {
    std::lock_guard lk(mu_);
    if (frames.empty()) return Ok();
    bytes_ += frames.size();
    return wan_.WriteAll(frames);
  }
  uint64_t bytes() {
    std::lock_guard lk(mu_);
    return bytes_;
  }

 private:
  std::mutex mu_;
  ByteStream& wan_;
  uint64_t bytes_ = 0;
};

std::string DescribeEndMismatch(const reuse::EndFigures& mine, const reuse::EndFigures& theirs);

}  // namespace kagemusha::memcache::detail

// CopyOnReadBackend implementation. See copy_on_read.h for the contract and
// docs/bitmap-format.md for the on-disk ordering rules.
//
// Block state, per block b:
//   missing            !present_[b]
//   claimed            !present_[b] and inflight_[b] set: someone is fetching
//                      it from the remote or overwriting it locally, or its
//                      fetched data waits for the cache writer (write-behind);
//                      others wait on the claim instead of fetching it again
//   present            present_[b]: the cache holds its data (maybe only in
//                      the page cache); reads serve it from the cache
//   durable            bitmap_->Test(b): its bit is in the bitmap file, written
//                      after an fdatasync of the cache (group commit)
// present_ only ever goes 0 -> 1, and durable implies present.
//
// Lock order: no two of inflight_mu_, commit_mu_, fill_mu_, error_mu_,
// store_mu_ are held together, except that Preallocate takes inflight_mu_
// inside prealloc_mu_ (taken nowhere else). Reads that hit take no lock.
#include "kagemusha/storage/copy_on_read.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_bitmap.h"
#include "kagemusha/storage/file_backend.h"
#include "rate_limiter.h"

namespace kagemusha::storage {
namespace {

using St = kagemusha::Status;  // CopyOnReadBackend::Status() hides the type name

constexpr uint64_t kMaxRemoteRequest = 4 * 1024 * 1024;  // NbdClient's default split
constexpr size_t kCommitBatchBlocks = 1024;              // commit early past this many
constexpr auto kCommitInterval = std::chrono::milliseconds(500);
constexpr uint64_t kPreallocRegion = 64ull << 20;            // see Preallocate
constexpr auto kSplicedMissPause = std::chrono::seconds(5);  // see FetchRun
constexpr auto kBackoffInitial = std::chrono::milliseconds(100);
constexpr auto kBackoffMax = std::chrono::milliseconds(5000);
constexpr unsigned kGuestFetchThreads = 8;
constexpr uint64_t kCacheOpChunk = 64 * 1024 * 1024;  // NBD_CMD_CACHE is done in pieces

// A fixed pool of threads running guest-side remote fetches, so that one
// fragmented read keeps many requests in flight on the (pipelined) remote.
class TaskPool {
 public:
  explicit TaskPool(unsigned n) {
    for (unsigned i = 0; i < n; ++i) threads_.emplace_back([this] { Loop(); });
  }
  ~TaskPool() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void Submit(std::function<void()> f) {
    {
      std::lock_guard lk(mu_);
      q_.push_back(std::move(f));
    }
    cv_.notify_one();
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;
        f = std::move(q_.front());
        q_.pop_front();
      }
      f();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// Counts finished tasks of one request and keeps the first error.
class TaskGroup {
 public:
  explicit TaskGroup(size_t n) : remaining_(n) {}
  void Done(const St& s) {
    std::lock_guard lk(mu_);
    if (!s && status_) status_ = s;
    if (--remaining_ == 0) cv_.notify_all();
  }
  St Wait() {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] { return remaining_ == 0; });
    return status_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  size_t remaining_;
  St status_ = Ok();
};

constexpr size_t kDirectAlign = 4096;  // O_DIRECT buffer, offset and length alignment

// A per-thread buffer of at least n bytes aligned for O_DIRECT; `slot`
// selects one of two independent buffers (fetch target, bounce).
std::span<std::byte> AlignedScratch(int slot, size_t n) {
  struct Buf {
    std::byte* p = nullptr;
    size_t size = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[2];
  Buf& b = bufs[slot];
  if (b.size < n) {
    std::free(b.p);
    size_t sz = (n + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    b.p = static_cast<std::byte*>(std::aligned_alloc(kDirectAlign, sz));
    if (!b.p) {
      spdlog::critical("copy-on-read: out of memory for a {} byte buffer", sz);
      std::abort();
    }
    b.size = sz;
  }
  return {b.p, n};
}

// An O_DIRECT-aligned heap buffer (a write-behind job's copy of its data).
struct AlignedBuffer {
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> p;
  size_t cap = 0;
};

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

bool AllZero(std::span<const std::byte> d) {
  // The first byte is zero and every byte equals its successor.
  return d.empty() ||
         (d[0] == std::byte{0} && std::memcmp(d.data(), d.data() + 1, d.size() - 1) == 0);
}

class CopyOnReadImpl final : public CopyOnReadBackend {
 public:
  CopyOnReadImpl(std::unique_ptr<RemoteReader> remote, const CopyOnReadOptions& options,
                 Clock& clock, std::unique_ptr<FileBackend> cache,
                 std::unique_ptr<BlockBitmap> bitmap, uint64_t image_size);
  ~CopyOnReadImpl() override;

  uint64_t Size() const override { return size_; }
  BackendCaps Caps() const override;
  std::string Describe() const override;
  St Read(std::span<std::byte> buf, uint64_t offset) override;
  St Write(std::span<const std::byte> buf, uint64_t offset, bool fua) override;
  St Flush() override;
  St Trim(uint64_t offset, uint64_t length, bool fua) override;
  St Zero(uint64_t offset, uint64_t length, bool may_trim, bool fast, bool fua) override;
  St Cache(uint64_t offset, uint64_t length) override;
  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) override;
  std::optional<FileRange> FileRangeFor(uint64_t offset, uint64_t length) override;
  Result<std::optional<FileRange>> PrepareFileRange(uint64_t offset, uint64_t length) override;

  void StartFill() override;
  void StopFill() override;
  void SetFillRate(uint64_t bytes_per_second) override;
  FillStatus Status() const override;
  St SwitchToTarget() override;
  St ReconnectRemote() override;

 private:
  enum Mode : int { kProxy, kTarget };

  // One claim: a run of consecutive blocks someone is fetching or overwriting.
  struct Claim {
    bool done = false;  // guarded by inflight_mu_
    std::condition_variable cv;
  };
  struct Run {
    uint64_t first = 0;
    uint64_t count = 0;
    std::shared_ptr<Claim> claim;
  };

  bool proxy() const { return mode_.load(std::memory_order_acquire) == kProxy; }
  uint64_t BlockOffset(uint64_t b) const { return b * bs_; }
  uint64_t BlockBytes(uint64_t b) const { return std::min<uint64_t>(bs_, size_ - b * bs_); }
  uint64_t RunBytes(const Run& r) const {
    return std::min<uint64_t>(r.count * bs_, size_ - BlockOffset(r.first));
  }
  uint64_t FirstBlock(uint64_t offset) const { return offset / bs_; }
  uint64_t EndBlock(uint64_t offset, uint64_t length) const {
    return length == 0 ? offset / bs_ : (offset + length + bs_ - 1) / bs_;
  }
  bool FullyCovers(uint64_t b, uint64_t offset, uint64_t length) const {
    return offset <= BlockOffset(b) && offset + length >= BlockOffset(b) + BlockBytes(b);
  }

  // A guest read's buffer: runs this request fetches that lie wholly inside
  // it are read from the remote straight into it (and stored in the cache
  // from there), so those bytes need no pread from the cache afterwards.
  struct ReadTarget {
    std::span<std::byte> buf;
    uint64_t offset = 0;
    std::vector<std::pair<uint64_t, uint64_t>> filled;  // (offset, length) already in buf
  };
  // Why a run is fetched. kClient: a client request reads or merges the data
  // right after, so it goes through the page cache. kClientFromCache: a
  // client read is then answered from the cache file (spliced from the page
  // cache), so the remote's payload is received straight into the file, with
  // no buffer in between. kPrefetch and kFill: the data is only stored, with
  // O_DIRECT where possible (StoreDirect).
  enum class FetchFor { kClient, kClientFromCache, kPrefetch, kFill };
  // Makes the given blocks present: fetches missing ones (adjacent ones
  // merged, split at kMaxRemoteRequest, runs in parallel) and waits for
  // blocks others are fetching. Counts as guest I/O (the fill yields).
  St EnsurePresent(std::span<const uint64_t> blocks, ReadTarget* target = nullptr,
                   FetchFor why = FetchFor::kClient);
  St EnsurePresentRange(uint64_t first, uint64_t last, ReadTarget* target = nullptr,
                        FetchFor why = FetchFor::kClient);
  // Claims every missing block of [first, last) for a local overwrite, all
  // or nothing: if any is claimed by someone else, waits for it and retries.
  std::vector<Run> ClaimForOverwrite(uint64_t first, uint64_t last);
  // Registers `b` in the run list (REQUIRES: inflight_mu_ held).
  void ClaimBlockLocked(std::vector<Run>& runs, uint64_t b, uint64_t max_blocks);
  void ReleaseRuns(std::span<const Run> runs);
  // Fetches a run into `into` (exactly RunBytes(run) long) or, if empty, a
  // per-thread buffer, then stores it in the cache and marks it present
  // (kClientFromCache: straight into the cache file, `into` unused).
  // `handed_off` (kClient into a client buffer only): set when the store was
  // handed to the cache writer, which then also releases the run's claim;
  // otherwise the caller releases it.
  St FetchRun(const Run& run, FetchFor why, std::span<std::byte> into = {},
              bool* handed_off = nullptr);
  // Fetches a run for EnsurePresent and releases its claim unless the cache
  // writer took it over.
  St FetchAndRelease(const Run& run, FetchFor why, std::span<std::byte> into);
  // Queues a copy of `data` (run's fetched bytes) for the cache writer. False
  // if the queue is full (or write-behind is off): store inline then.
  bool TryWriteBehind(const Run& run, std::span<const std::byte> data);
  // The cache writer: stores queued runs, marks them present, releases them.
  void WriterLoop();
  // Waits until every store queued before the call is done.
  void DrainStores();
  // Writes fetched data (starting at a block boundary) to the cache.
  // `direct`: nobody is about to read the data back (fill, NBD_CMD_CACHE), so
  // it may bypass the page cache.
  St StoreFetched(std::span<const std::byte> data, uint64_t first_block, bool direct);
  // Writes fetched data with O_DIRECT (no page cache). False: not possible
  // here (no direct descriptor, misaligned tail, EINVAL); the caller then
  // writes through the page cache. A real I/O error is returned in `*err`.
  bool StoreDirect(std::span<const std::byte> data, uint64_t offset, St* err);
  // Allocates (fallocate) the missing, unclaimed blocks of the
  // kPreallocRegion-sized region holding `block`, once per region.
  void Preallocate(uint64_t block);
  void MarkPresent(uint64_t first, uint64_t count);
  // Waits until every block of [first, last) is durable (bit in the file).
  // REQUIRES: every block in the range is present.
  St WaitDurable(uint64_t first, uint64_t last);
  St SyncAll();  // fdatasync cache, then bitmap

  void CommitterLoop();
  void FillSupervisor();
  void FillWorker();
  std::optional<Run> ClaimFillChunk();
  // Records the last error for Status().last_error (remote, cache or commit).
  void NoteError(const Error& e);
  St DoSwitch();

  const CopyOnReadOptions opts_;
  Clock& clock_;
  std::unique_ptr<RemoteReader> remote_;
  std::unique_ptr<FileBackend> cache_;
  std::unique_ptr<BlockBitmap> bitmap_;
  const uint64_t size_;
  const uint64_t bs_;
  const uint64_t blocks_;
  const uint64_t max_run_blocks_;
  const uint64_t prealloc_region_blocks_;  // blocks per Preallocate region

  std::atomic<int> mode_{kProxy};
  AtomicBitset present_;
  std::atomic<uint64_t> present_count_{0};

  std::mutex inflight_mu_;
  std::unordered_map<uint64_t, std::shared_ptr<Claim>> inflight_;  // GUARDED_BY(inflight_mu_)
  uint64_t fill_cursor_ = 0;                                       // GUARDED_BY(inflight_mu_)

  // Group commit.
  std::mutex commit_mu_;
  std::condition_variable commit_cv_;   // wakes the committer
  std::condition_variable durable_cv_;  // wakes WaitDurable
  std::vector<uint64_t> pending_;       // present, not yet durable; GUARDED_BY(commit_mu_)
  bool urgent_ = false;                 // a client waits; GUARDED_BY(commit_mu_)
  bool stop_committer_ = false;         // GUARDED_BY(commit_mu_)
  uint64_t commit_failures_ = 0;        // GUARDED_BY(commit_mu_)
  std::optional<Error> commit_error_;   // GUARDED_BY(commit_mu_)
  std::thread committer_;

  // Fill.
  std::mutex fill_mu_;
  std::condition_variable fill_cv_;
  std::thread fill_thread_;  // GUARDED_BY(fill_mu_)
  std::atomic<bool> fill_stop_{false};
  std::atomic<bool> fill_running_{false};
  std::atomic<uint32_t> guest_misses_{0};  // guest fetches in flight
  RateLimiter limiter_;
  RateMeter meter_;
  Clock::TimePoint backoff_until_{};  // GUARDED_BY(fill_mu_)
  Clock::Duration backoff_{0};        // GUARDED_BY(fill_mu_)

  std::atomic<uint64_t> bytes_fetched_{0};
  std::atomic<uint64_t> bytes_fetched_fill_{0};
  mutable std::mutex error_mu_;
  std::string last_error_;  // GUARDED_BY(error_mu_)
  std::mutex switch_mu_;

  // The cache image opened a second time with O_DIRECT, -1 if the file
  // system refuses it. Fetched data written through it costs no page-cache
  // allocation, which on this kind of machine is most of a store's CPU.
  int direct_fd_ = -1;
  std::atomic<bool> direct_ok_{false};
  // Clock time (ns since its epoch) until which PrepareFileRange fetches no
  // misses (after a failed store; see there).
  std::atomic<int64_t> spliced_misses_paused_until_{0};
  // Regions of kPreallocRegion bytes already allocated (fallocate) for
  // direct stores; see Preallocate. GUARDED_BY(prealloc_mu_) for writes.
  std::vector<std::atomic<bool>> preallocated_;
  std::mutex prealloc_mu_;

  // Write-behind: client misses wait here for the one cache writer. One
  // writer because concurrent buffered writes to one file serialise on its
  // inode lock, and spinning on it cost more CPU than the copies.
  struct StoreJob {
    Run run;
    AlignedBuffer buf;
    size_t len = 0;
  };
  std::mutex store_mu_;
  std::condition_variable store_cv_;       // wakes the writer
  std::condition_variable store_done_cv_;  // wakes DrainStores
  std::deque<StoreJob> store_q_;           // GUARDED_BY(store_mu_)
  uint64_t store_bytes_ = 0;               // queued or being stored; GUARDED_BY(store_mu_)
  uint64_t store_queued_ = 0;              // jobs ever queued; GUARDED_BY(store_mu_)
  uint64_t store_finished_ = 0;            // jobs ever finished; GUARDED_BY(store_mu_)
  // Recycled job buffers (already touched: a fresh allocation's first touch
  // costs more than the copy on this kind of VM); GUARDED_BY(store_mu_).
  std::vector<AlignedBuffer> store_pool_;
  uint64_t store_pool_bytes_ = 0;  // GUARDED_BY(store_mu_)
  bool stop_writer_ = false;       // GUARDED_BY(store_mu_)
  std::thread writer_;

  TaskPool guest_pool_;
};

CopyOnReadImpl::CopyOnReadImpl(std::unique_ptr<RemoteReader> remote,
                               const CopyOnReadOptions& options, Clock& clock,
                               std::unique_ptr<FileBackend> cache,
                               std::unique_ptr<BlockBitmap> bitmap, uint64_t image_size)
    : opts_(options),
      clock_(clock),
      remote_(std::move(remote)),
      cache_(std::move(cache)),
      bitmap_(std::move(bitmap)),
      size_(image_size),
      bs_(options.block_size),
      blocks_(bitmap::BlockCount(image_size, options.block_size)),
      max_run_blocks_(std::max<uint64_t>(1, kMaxRemoteRequest / options.block_size)),
      prealloc_region_blocks_(std::max<uint64_t>(1, kPreallocRegion / options.block_size)),
      present_(blocks_),
      limiter_(clock, options.fill_rate_limit),
      meter_(clock),
      guest_pool_(kGuestFetchThreads) {
  for (uint64_t b = 0; b < blocks_; ++b)
    if (bitmap_->Test(b)) present_.Set(b);
  present_count_ = bitmap_->Count();
  if (!remote_) mode_ = kTarget;  // Open checked the bitmap is complete
  if (remote_) {
    // Direct stores only where a block is whole pages: the rule that keeps
    // direct and buffered writes apart (never both on one block) works per
    // page, and a direct write cannot replace a page a buffered write of a
    // neighbouring block keeps dirty (block size 4 KiB on 64 KiB pages).
    const long page = ::sysconf(_SC_PAGESIZE);
    if (page > 0 && bs_ % uint64_t(page) == 0)
      direct_fd_ = ::open(cache_->path().c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
    direct_ok_ = direct_fd_ >= 0;
    preallocated_ = std::vector<std::atomic<bool>>(
        size_t((blocks_ + prealloc_region_blocks_ - 1) / prealloc_region_blocks_));
    if (opts_.write_behind_bytes > 0) writer_ = std::thread([this] { WriterLoop(); });
  }
  committer_ = std::thread([this] { CommitterLoop(); });
}

CopyOnReadImpl::~CopyOnReadImpl() {
  fill_stop_ = true;
  // Closing the remote first makes fill reads blocked on it fail at once.
  if (remote_) remote_->Close();
  StopFill();
  // The writer stores what is queued (the committer is still running, so
  // those bits reach the bitmap too), then exits.
  {
    std::lock_guard lk(store_mu_);
    stop_writer_ = true;
  }
  store_cv_.notify_all();
  if (writer_.joinable()) writer_.join();
  {
    std::lock_guard lk(commit_mu_);
    stop_committer_ = true;
  }
  commit_cv_.notify_all();
  committer_.join();
  if (direct_fd_ >= 0) ::close(direct_fd_);
}

BackendCaps CopyOnReadImpl::Caps() const {
  BackendCaps c = cache_->Caps();
  c.can_cache = true;
  c.can_extents = true;
  c.can_multi_conn = true;  // one shared object; Flush syncs the cache and bitmap for all
  return c;
}

std::string CopyOnReadImpl::Describe() const {
  if (!proxy()) return "copy-on-read cache " + cache_->path() + " (target mode)";
  uint64_t pct = blocks_ ? present_count_.load() * 100 / blocks_ : 100;
  return "copy-on-read cache " + cache_->path() + " over " + remote_->Describe() + " (proxy, " +
         std::to_string(pct) + "% present)";
}

// --- Claims and fetches -------------------------------------------------------

void CopyOnReadImpl::ClaimBlockLocked(std::vector<Run>& runs, uint64_t b, uint64_t max_blocks) {
  if (!runs.empty() && runs.back().first + runs.back().count == b &&
      runs.back().count < max_blocks) {
    ++runs.back().count;
  } else {
    runs.push_back({b, 1, std::make_shared<Claim>()});
  }
  inflight_[b] = runs.back().claim;
}

void CopyOnReadImpl::ReleaseRuns(std::span<const Run> runs) {
  if (runs.empty()) return;
  std::lock_guard lk(inflight_mu_);
  for (const auto& r : runs) {
    for (uint64_t b = r.first; b < r.first + r.count; ++b) inflight_.erase(b);
    r.claim->done = true;
    r.claim->cv.notify_all();
  }
}

St CopyOnReadImpl::FetchRun(const Run& run, FetchFor why, std::span<std::byte> into,
                            bool* handed_off) {
  if (!remote_) return Fail(Error::Shutdown("no remote (target mode)"));
  const uint64_t off = BlockOffset(run.first);
  const uint64_t len = RunBytes(run);
  if (why == FetchFor::kClientFromCache) {
    // Into the page cache directly. No all-zero check here (that would mean
    // reading the data back): such blocks are stored as data, not holes.
    ReadToFileFault fault = ReadToFileFault::kRemote;
    if (auto s = remote_->ReadToFile(cache_->fd(), off, len, off, &fault); !s) {
      Error e = s.error().Context("fetching " + std::to_string(len) + " bytes at " +
                                  std::to_string(off) + " from the remote into the cache");
      NoteError(e);
      if (fault == ReadToFileFault::kFile) {
        // The cache's fault (full disk, I/O error, file size limit): misses
        // go through Read() for a while, which answers from its buffer even
        // when the store fails, so that a failing cache does not cost every
        // miss a second fetch.
        spdlog::warn(
            "copy-on-read: storing a fetched range in the cache failed ({}); reads that miss "
            "go through a buffer for the next {} s",
            s.error().message(),
            std::chrono::duration_cast<std::chrono::seconds>(kSplicedMissPause).count());
        spliced_misses_paused_until_.store(
            (clock_.Now() + kSplicedMissPause).time_since_epoch().count());
      }
      return Fail(e);
    }
    MarkPresent(run.first, run.count);
    bytes_fetched_ += len;
    meter_.Add(len);
    return Ok();
  }
  std::span<std::byte> data = into;
  if (data.empty()) data = AlignedScratch(0, len);
  if (auto s = remote_->Read(data, off); !s) {
    Error e = s.error().Context("fetching " + std::to_string(len) + " bytes at " +
                                std::to_string(off) + " from the remote");
    NoteError(e);
    return Fail(e);
  }
  // The data is in the client's buffer: the reply need not wait for the
  // store, nor for other stores on the file's lock.
  if (handed_off && why == FetchFor::kClient && !into.empty() && TryWriteBehind(run, data)) {
    *handed_off = true;
    bytes_fetched_ += len;
    meter_.Add(len);
    return Ok();
  }
  if (auto s = StoreFetched(data, run.first, why != FetchFor::kClient); !s)
    return Fail(s.error().Context("storing fetched blocks in the cache"));
  MarkPresent(run.first, run.count);
  bytes_fetched_ += len;
  if (why == FetchFor::kFill) bytes_fetched_fill_ += len;
  meter_.Add(len);
  return Ok();
}

St CopyOnReadImpl::FetchAndRelease(const Run& run, FetchFor why, std::span<std::byte> into) {
  bool handed_off = false;
  St s = FetchRun(run, why, into, &handed_off);
  if (!handed_off) ReleaseRuns(std::span(&run, 1));
  return s;
}

bool CopyOnReadImpl::TryWriteBehind(const Run& run, std::span<const std::byte> data) {
  AlignedBuffer buf;
  {
    std::unique_lock lk(store_mu_);
    // A run larger than the whole queue is stored inline. Otherwise a full
    // queue makes the fetching thread wait for room (backpressure): storing
    // inline instead would put a second buffered writer on the file, and
    // writers of one file only take turns on its inode lock, spinning on it.
    if (!writer_.joinable() || stop_writer_ || data.size() > opts_.write_behind_bytes) return false;
    store_done_cv_.wait(
        lk, [&] { return stop_writer_ || store_bytes_ + data.size() <= opts_.write_behind_bytes; });
    if (stop_writer_) return false;
    store_bytes_ += data.size();
    // The smallest pooled buffer that fits.
    size_t best = store_pool_.size();
    for (size_t i = 0; i < store_pool_.size(); ++i)
      if (store_pool_[i].cap >= data.size() &&
          (best == store_pool_.size() || store_pool_[i].cap < store_pool_[best].cap))
        best = i;
    if (best != store_pool_.size()) {
      buf = std::move(store_pool_[best]);
      store_pool_[best] = std::move(store_pool_.back());
      store_pool_.pop_back();
      store_pool_bytes_ -= buf.cap;
    }
  }
  if (!buf.p) {
    buf.cap = (data.size() + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    buf.p.reset(static_cast<std::byte*>(std::aligned_alloc(kDirectAlign, buf.cap)));
    if (!buf.p) {
      spdlog::critical("copy-on-read: out of memory for a {} byte buffer", buf.cap);
      std::abort();
    }
  }
  std::memcpy(buf.p.get(), data.data(), data.size());
  {
    std::lock_guard lk(store_mu_);
    store_q_.push_back({run, std::move(buf), data.size()});
    ++store_queued_;
  }
  store_cv_.notify_one();
  return true;
}

void CopyOnReadImpl::WriterLoop() {
  std::unique_lock lk(store_mu_);
  for (;;) {
    store_cv_.wait(lk, [&] { return stop_writer_ || !store_q_.empty(); });
    if (store_q_.empty()) return;  // stopping, and everything is stored
    StoreJob job = std::move(store_q_.front());
    store_q_.pop_front();
    lk.unlock();
    if (opts_.before_write_behind_store_for_test) opts_.before_write_behind_store_for_test();
    // Through the page cache, not O_DIRECT: the warm read that often follows
    // is then served from memory (O_DIRECT here measured 0.56x target warm).
    St s = StoreFetched({job.buf.p.get(), job.len}, job.run.first, /*direct=*/false);
    // Present only once stored, so the committer's flush covers the data
    // before the bit; on failure the blocks stay missing (the client has its
    // data already) and a later read fetches them again.
    if (s)
      MarkPresent(job.run.first, job.run.count);
    else
      NoteError(s.error().Context("storing fetched blocks in the cache"));
    ReleaseRuns(std::span(&job.run, 1));
    lk.lock();
    store_bytes_ -= job.len;
    ++store_finished_;
    if (store_pool_bytes_ + job.buf.cap <= opts_.write_behind_bytes) {
      store_pool_bytes_ += job.buf.cap;
      store_pool_.push_back(std::move(job.buf));
    }
    store_done_cv_.notify_all();
  }
}

void CopyOnReadImpl::DrainStores() {
  std::unique_lock lk(store_mu_);
  const uint64_t queued = store_queued_;
  store_done_cv_.wait(lk, [&] { return store_finished_ >= queued; });
}

bool CopyOnReadImpl::StoreDirect(std::span<const std::byte> data, uint64_t offset, St* err) {
  if (!direct_ok_.load(std::memory_order_relaxed)) return false;
  if (offset % kDirectAlign != 0 || data.size() % kDirectAlign != 0) return false;
  if (reinterpret_cast<uintptr_t>(data.data()) % kDirectAlign != 0) {
    auto bounce = AlignedScratch(1, data.size());
    std::memcpy(bounce.data(), data.data(), data.size());
    data = bounce;
  }
  // Where Preallocate allocated the range, the write is an overwrite of
  // unwritten extents, which ext4 and XFS let run in parallel under a shared
  // inode lock; a direct write into a hole holds the lock exclusively for the
  // whole I/O. Unsupported (block device, tmpfs): written all the same.
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pwrite(direct_fd_, data.data() + done, data.size() - done, off_t(offset + done));
    if (n > 0) {
      done += size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EINVAL && done == 0) {
      // The file system takes O_DIRECT at open but not this alignment.
      if (direct_ok_.exchange(false))
        spdlog::info("copy-on-read: direct writes to {} refused ({}); using the page cache",
                     cache_->path(), std::strerror(errno));
      return false;
    }
    *err = Fail(Error::Errno(n < 0 ? errno : EIO,
                             "write " + cache_->path() + " at " + std::to_string(offset + done)));
    return true;
  }
  *err = Ok();
  return true;
}

void CopyOnReadImpl::Preallocate(uint64_t block) {
  // A whole region at a time: fallocate takes the inode lock exclusively,
  // so it waits for every direct write in flight and holds up the next ones.
  // Once per 64 MiB instead of once per fill request (1 MiB): loopback fill
  // of 1 GiB in a median 0.75 s instead of 0.87 (9 interleaved runs each).
  //
  // Only blocks that are missing and unclaimed are allocated, with
  // inflight_mu_ held so that none is claimed meanwhile: a present block may
  // be a hole on purpose (trimmed, or punched because it was all zeroes), and
  // a claimed one may be punched by its fetcher at any moment, so allocating
  // either would turn a hole back into (unwritten) data. The blocks allocated
  // here are stored later, after this, and punched then if they are zeroes.
  const uint64_t region = block / prealloc_region_blocks_;
  if (region >= preallocated_.size() || preallocated_[region].load(std::memory_order_acquire))
    return;
  std::lock_guard plk(prealloc_mu_);
  if (preallocated_[region].load(std::memory_order_relaxed)) return;
  const uint64_t first = region * prealloc_region_blocks_;
  const uint64_t last = std::min(blocks_, first + prealloc_region_blocks_);
  std::lock_guard lk(inflight_mu_);
  for (uint64_t b = first; b < last;) {
    if (present_.Test(b) || inflight_.count(b)) {
      ++b;
      continue;
    }
    uint64_t e = b + 1;
    while (e < last && !present_.Test(e) && !inflight_.count(e)) ++e;
    const uint64_t from = BlockOffset(b), to = std::min(size_, BlockOffset(e));
    // Failure (no space for the whole run, unsupported): the writes go ahead
    // without it, and a real lack of space shows in the write.
    (void)::fallocate(direct_fd_, 0, off_t(from), off_t(to - from));
    b = e;
  }
  preallocated_[region].store(true, std::memory_order_release);
}

St CopyOnReadImpl::StoreFetched(std::span<const std::byte> data, uint64_t first_block,
                                bool direct) {
  // Blocks that are all zeroes on the remote become holes in the cache (a
  // punched or zeroed range, guaranteed to read as zeroes), so the cache stays
  // as sparse as the source and Extents can report them as holes.
  if (direct && direct_ok_.load(std::memory_order_relaxed)) Preallocate(first_block);
  size_t pos = 0;
  while (pos < data.size()) {
    const bool zero = AllZero(data.subspan(pos, std::min<size_t>(bs_, data.size() - pos)));
    size_t end = pos;
    while (end < data.size()) {
      auto blk = data.subspan(end, std::min<size_t>(bs_, data.size() - end));
      if (AllZero(blk) != zero) break;
      end += blk.size();
    }
    const uint64_t off = BlockOffset(first_block) + pos;
    St s = Ok();
    if (zero)
      s = cache_->Zero(off, end - pos, /*may_trim=*/true, /*fast=*/false, false);
    else if (!(direct && StoreDirect(data.subspan(pos, end - pos), off, &s)))
      s = cache_->Write(data.subspan(pos, end - pos), off, false);
    if (!s) return s;
    pos = end;
  }
  return Ok();
}

void CopyOnReadImpl::MarkPresent(uint64_t first, uint64_t count) {
  uint64_t added = 0;
  for (uint64_t b = first; b < first + count; ++b)
    if (present_.Set(b)) ++added;
  present_count_ += added;
  bool wake;
  {
    std::lock_guard lk(commit_mu_);
    for (uint64_t b = first; b < first + count; ++b) pending_.push_back(b);
    wake = pending_.size() >= kCommitBatchBlocks;
  }
  if (wake) commit_cv_.notify_one();
}

St CopyOnReadImpl::EnsurePresentRange(uint64_t first, uint64_t last, ReadTarget* target,
                                      FetchFor why) {
  if (present_.AllSet(first, last)) return Ok();
  std::vector<uint64_t> blocks;
  blocks.reserve(last - first);
  for (uint64_t b = first; b < last; ++b) blocks.push_back(b);
  return EnsurePresent(blocks, target, why);
}

St CopyOnReadImpl::EnsurePresent(std::span<const uint64_t> blocks, ReadTarget* target,
                                 FetchFor why) {
  struct GuestMiss {  // the fill backs off while guest misses are in flight
    CopyOnReadImpl* self;
    explicit GuestMiss(CopyOnReadImpl* s) : self(s) { self->guest_misses_.fetch_add(1); }
    ~GuestMiss() {
      if (self->guest_misses_.fetch_sub(1) == 1) {
        std::lock_guard lk(self->fill_mu_);
        self->fill_cv_.notify_all();
      }
    }
  } guest_miss(this);

  // Blocks still to see present. Runs this request fetched itself drop out
  // after the first pass: their data is in the reader's buffer or the cache
  // even while a write-behind store of them is pending (and still claimed).
  std::vector<uint64_t> todo(blocks.begin(), blocks.end());
  for (int attempt = 0; attempt < 16; ++attempt) {
    std::vector<Run> mine;
    std::vector<std::shared_ptr<Claim>> others;
    {
      std::lock_guard lk(inflight_mu_);
      for (uint64_t b : todo) {
        if (present_.Test(b)) continue;
        if (auto it = inflight_.find(b); it != inflight_.end()) {
          if (others.empty() || others.back() != it->second) others.push_back(it->second);
          continue;
        }
        ClaimBlockLocked(mine, b, max_run_blocks_);
      }
    }
    if (mine.empty() && others.empty()) return Ok();

    St mine_status = Ok();
    if (!mine.empty()) {
      // Where a run lies wholly inside the reader's buffer, fetch into it.
      std::vector<std::span<std::byte>> into(mine.size());
      if (target) {
        const uint64_t end = target->offset + target->buf.size();
        for (size_t i = 0; i < mine.size(); ++i) {
          const uint64_t off = BlockOffset(mine[i].first), len = RunBytes(mine[i]);
          if (off < target->offset || off + len > end) continue;
          into[i] = target->buf.subspan(off - target->offset, len);
        }
      }
      TaskGroup group(mine.size());
      for (size_t i = 1; i < mine.size(); ++i) {
        guest_pool_.Submit([this, &group, why, run = mine[i], dst = into[i]] {
          group.Done(FetchAndRelease(run, why, dst));
        });
      }
      group.Done(FetchAndRelease(mine[0], why, into[0]));  // the first run on this thread
      mine_status = group.Wait();
      if (mine_status && target)
        for (size_t i = 0; i < mine.size(); ++i)
          if (!into[i].empty())
            target->filled.emplace_back(BlockOffset(mine[i].first), into[i].size());
    }
    if (!others.empty()) {
      std::unique_lock lk(inflight_mu_);
      for (auto& c : others) c->cv.wait(lk, [&] { return c->done; });
    }
    if (!mine_status) return mine_status;
    if (others.empty()) return Ok();
    // A claim we waited on may have failed (remote error, fill stopped):
    // loop and fetch those blocks ourselves.
    std::erase_if(todo, [&](uint64_t b) {
      return std::any_of(mine.begin(), mine.end(),
                         [&](const Run& r) { return b >= r.first && b < r.first + r.count; });
    });
  }
  return Fail(Error::Io("blocks stayed missing after repeated fetch attempts by other requests"));
}

std::vector<CopyOnReadImpl::Run> CopyOnReadImpl::ClaimForOverwrite(uint64_t first, uint64_t last) {
  for (;;) {
    std::shared_ptr<Claim> busy;
    std::vector<Run> mine;
    {
      std::lock_guard lk(inflight_mu_);
      for (uint64_t b = first; b < last && !busy; ++b) {
        if (present_.Test(b)) continue;
        if (auto it = inflight_.find(b); it != inflight_.end()) busy = it->second;
      }
      if (!busy) {
        for (uint64_t b = first; b < last; ++b)
          if (!present_.Test(b)) ClaimBlockLocked(mine, b, UINT64_MAX);
        return mine;
      }
    }
    // Someone is fetching a block we would overwrite: let it land first, or
    // its remote data would overwrite ours.
    std::unique_lock lk(inflight_mu_);
    busy->cv.wait(lk, [&] { return busy->done; });
  }
}

// --- Group commit ---------------------------------------------------------------

void CopyOnReadImpl::CommitterLoop() {
  std::unique_lock lk(commit_mu_);
  for (;;) {
    commit_cv_.wait_for(lk, kCommitInterval, [&] {
      return stop_committer_ || urgent_ || pending_.size() >= kCommitBatchBlocks;
    });
    urgent_ = false;
    if (pending_.empty()) {
      if (stop_committer_) return;
      continue;
    }
    std::vector<uint64_t> batch;
    batch.swap(pending_);
    lk.unlock();
    // The ordering that makes the bitmap crash safe: the data of every block
    // in the batch reaches stable storage before any of their bits is written.
    St s = cache_->Flush();
    if (s) s = bitmap_->SetAndWrite(batch);
    if (!s) NoteError(s.error().Context("committing the block bitmap"));
    lk.lock();
    if (s) {
      durable_cv_.notify_all();
      continue;
    }
    pending_.insert(pending_.end(), batch.begin(), batch.end());
    ++commit_failures_;
    Error e = s.error().Context("committing the block bitmap");
    // Once a sync failed for good (posix::StickySync) every retry fails the
    // same way: say so once, not every second.
    const bool repeat = commit_error_ && commit_error_->message() == e.message();
    commit_error_ = std::move(e);
    if (repeat)
      spdlog::debug("copy-on-read: {}", commit_error_->message());
    else
      spdlog::error("copy-on-read: {}", commit_error_->message());
    durable_cv_.notify_all();
    if (stop_committer_) return;
    commit_cv_.wait_for(lk, std::chrono::seconds(1), [&] { return stop_committer_; });
  }
}

St CopyOnReadImpl::WaitDurable(uint64_t first, uint64_t last) {
  if (bitmap_->bits().AllSet(first, last)) return Ok();
  std::unique_lock lk(commit_mu_);
  const uint64_t failures = commit_failures_;
  urgent_ = true;
  commit_cv_.notify_one();
  durable_cv_.wait(lk, [&] {
    return bitmap_->bits().AllSet(first, last) || commit_failures_ != failures || stop_committer_;
  });
  if (bitmap_->bits().AllSet(first, last)) return Ok();
  if (commit_error_) return Fail(*commit_error_);
  return Fail(Error::Shutdown("copy-on-read backend is shutting down"));
}

St CopyOnReadImpl::SyncAll() {
  if (auto s = cache_->Flush(); !s) return s;
  // A no-op when no bit was written since the bitmap's last sync.
  return bitmap_->Sync();
}

// --- Data path ------------------------------------------------------------------

St CopyOnReadImpl::Read(std::span<std::byte> buf, uint64_t offset) {
  if (buf.empty()) return Ok();
  if (!proxy()) return cache_->Read(buf, offset);
  const uint64_t first = FirstBlock(offset), last = EndBlock(offset, buf.size());
  if (present_.AllSet(first, last)) return cache_->Read(buf, offset);  // a hit: no lock
  // A miss. Runs this request fetches land in `buf` directly (one copy less
  // than fetch, store, pread) and are stored behind the reply by the cache
  // writer; the rest (blocks present before, fetched by someone else,
  // partial edge blocks) is read from the cache after.
  ReadTarget target{buf, offset, {}};
  if (auto s = EnsurePresentRange(first, last, &target); !s) return s;
  std::sort(target.filled.begin(), target.filled.end());
  uint64_t pos = offset;
  const uint64_t end = offset + buf.size();
  auto read_gap = [&](uint64_t to) -> St {
    if (to <= pos) return Ok();
    return cache_->Read(buf.subspan(pos - offset, to - pos), pos);
  };
  for (auto [off, len] : target.filled) {
    if (auto s = read_gap(off); !s) return s;
    pos = std::max(pos, off + len);
  }
  return read_gap(end);
}

St CopyOnReadImpl::Write(std::span<const std::byte> buf, uint64_t offset, bool fua) {
  if (buf.empty()) return fua ? Flush() : Ok();
  if (!proxy()) return cache_->Write(buf, offset, fua);
  const uint64_t first = FirstBlock(offset), last = EndBlock(offset, buf.size());
  // Partially written blocks that are missing are fetched first and merged.
  std::vector<uint64_t> edges;
  for (uint64_t b : {first, last - 1})
    if (!FullyCovers(b, offset, buf.size()) && !present_.Test(b) &&
        (edges.empty() || edges.back() != b))
      edges.push_back(b);
  if (!edges.empty()) {
    if (auto s = EnsurePresent(edges); !s) return s;
  }
  auto claimed = ClaimForOverwrite(first, last);
  St s = cache_->Write(buf, offset, false);
  if (s)
    for (const auto& r : claimed) MarkPresent(r.first, r.count);
  ReleaseRuns(claimed);
  if (!s) return s;
  // Acknowledge only once the bits are in the bitmap file (survives kill -9).
  if (auto d = WaitDurable(first, last); !d) return d;
  return fua ? SyncAll() : Ok();
}

St CopyOnReadImpl::Flush() {
  if (!proxy()) return cache_->Flush();
  // Every acknowledged write has its bit in the bitmap file already; make the
  // data durable, then the bits. Pending write-behind stores are no client
  // writes, but a flush covering them too is simpler to reason about.
  DrainStores();
  return SyncAll();
}

St CopyOnReadImpl::Trim(uint64_t offset, uint64_t length, bool fua) {
  if (!proxy()) return cache_->Trim(offset, length, fua);
  if (length == 0) return Ok();
  // Only whole blocks: trimming part of a block is advisory, so skip it.
  uint64_t first = (offset + bs_ - 1) / bs_;
  uint64_t last = EndBlock(offset, length);
  if (last > first && !FullyCovers(last - 1, offset, length)) --last;
  if (last <= first) return Ok();
  auto claimed = ClaimForOverwrite(first, last);
  uint64_t from = BlockOffset(first);
  uint64_t to = std::min(size_, BlockOffset(last));
  St s = cache_->Trim(from, to - from, false);
  // A trimmed block needs nothing from the remote any more. Its bit is
  // committed lazily: losing it in a crash only means fetching it again.
  if (s)
    for (const auto& r : claimed) MarkPresent(r.first, r.count);
  ReleaseRuns(claimed);
  if (!s) return s;
  return fua ? SyncAll() : Ok();
}

St CopyOnReadImpl::Zero(uint64_t offset, uint64_t length, bool may_trim, bool fast, bool fua) {
  if (!proxy()) return cache_->Zero(offset, length, may_trim, fast, fua);
  if (length == 0) return Ok();
  const uint64_t first = FirstBlock(offset), last = EndBlock(offset, length);
  std::vector<uint64_t> edges;
  for (uint64_t b : {first, last - 1})
    if (!FullyCovers(b, offset, length) && !present_.Test(b) &&
        (edges.empty() || edges.back() != b))
      edges.push_back(b);
  if (!edges.empty()) {
    // Merging a partial block needs a remote round trip: not fast.
    if (fast) return Fail(Error::NotSupported("fast zero of a partly missing block"));
    if (auto s = EnsurePresent(edges); !s) return s;
  }
  auto claimed = ClaimForOverwrite(first, last);
  St s = cache_->Zero(offset, length, may_trim, fast, false);
  if (s)
    for (const auto& r : claimed) MarkPresent(r.first, r.count);
  ReleaseRuns(claimed);
  if (!s) return s;
  if (auto d = WaitDurable(first, last); !d) return d;
  return fua ? SyncAll() : Ok();
}

St CopyOnReadImpl::Cache(uint64_t offset, uint64_t length) {
  if (!proxy()) return Ok();
  const uint64_t end = std::min(size_, offset + length);
  for (uint64_t pos = offset; pos < end; pos += kCacheOpChunk) {
    uint64_t n = std::min(kCacheOpChunk, end - pos);
    if (auto s =
            EnsurePresentRange(FirstBlock(pos), EndBlock(pos, n), nullptr, FetchFor::kPrefetch);
        !s)
      return s;
  }
  return Ok();
}

Result<std::vector<Extent>> CopyOnReadImpl::Extents(uint64_t offset, uint64_t length) {
  if (!proxy()) return cache_->Extents(offset, length);
  std::vector<Extent> out;
  auto push = [&](const Extent& e) {
    if (e.length == 0) return;
    if (!out.empty() && out.back().hole == e.hole && out.back().zero == e.zero)
      out.back().length += e.length;
    else
      out.push_back(e);
  };
  const uint64_t end = std::min(size_, offset + length);
  uint64_t pos = offset;
  while (pos < end && out.size() < FileBackend::kMaxExtentsPerCall) {
    uint64_t b = FirstBlock(pos);
    bool present = present_.Test(b);
    uint64_t e = b + 1;
    while (e < blocks_ && BlockOffset(e) < end && present_.Test(e) == present) ++e;
    uint64_t run_end = std::min(end, BlockOffset(e));
    if (!present) {
      // Unknown until fetched: report data, never a hole or zeroes.
      push({run_end - pos, false, false});
    } else {
      auto ext = cache_->Extents(pos, run_end - pos);
      if (!ext) return Fail(ext.error());
      for (const auto& x : *ext) push(x);
      uint64_t covered = 0;
      for (const auto& x : *ext) covered += x.length;
      if (covered < run_end - pos) break;  // the cache stopped early; so do we
    }
    pos = run_end;
  }
  return out;
}

std::optional<FileRange> CopyOnReadImpl::FileRangeFor(uint64_t offset, uint64_t length) {
  // Present blocks are the cache's bytes and stay so (present_ never goes
  // back, and only this object writes the cache), so the server may splice
  // them from the page cache: a warm read costs what a target read costs.
  // A miss is not offered here; PrepareFileRange fetches it first.
  if (!proxy() || length == 0) return cache_->FileRangeFor(offset, length);
  if (!present_.AllSet(FirstBlock(offset), EndBlock(offset, length))) return std::nullopt;
  return cache_->FileRangeFor(offset, length);
}

Result<std::optional<FileRange>> CopyOnReadImpl::PrepareFileRange(uint64_t offset,
                                                                  uint64_t length) {
  // A miss the server will splice: the remote's payload is received straight
  // into the cache file (socket -> pipe -> page cache), marked present, and
  // spliced from the page cache into the client's socket. The proxy copies
  // each byte once, into the page cache; through Read() it would copy it
  // three times (receive, reply, store).
  if (offset > size_ || length > size_ - offset)
    return Fail(Error::Invalid("range of " + std::to_string(length) + " bytes at " +
                               std::to_string(offset) + " is past the end of the image"));
  if (proxy() && length > 0) {
    const uint64_t first = FirstBlock(offset), last = EndBlock(offset, length);
    if (!present_.AllSet(first, last) &&
        clock_.Now().time_since_epoch().count() >= spliced_misses_paused_until_.load()) {
      St s = EnsurePresentRange(first, last, nullptr, FetchFor::kClientFromCache);
      if (!s) {
        // The remote unreachable (the bounded wait ran out) or the backend
        // closing: that is the read's answer.
        const int code = s.error().code();
        if (code == ETIMEDOUT || code == ESHUTDOWN) return Fail(s.error());
        // Anything else may be the cache's fault (FetchRun then paused
        // spliced misses): the read must still be answered. Read() fetches
        // into the reply buffer and only notes a failed store, so the server
        // is told to use it (a remote error reply just comes back once more
        // there).
        return std::optional<FileRange>{};
      }
    }
  }
  return FileRangeFor(offset, length);
}

// --- Fill -----------------------------------------------------------------------

void CopyOnReadImpl::StartFill() {
  std::lock_guard lk(fill_mu_);
  if (!proxy() || fill_running_) return;
  if (fill_thread_.joinable()) fill_thread_.join();  // a finished earlier fill
  fill_stop_ = false;
  fill_running_ = true;
  fill_thread_ = std::thread([this] { FillSupervisor(); });
}

void CopyOnReadImpl::StopFill() {
  std::thread t;
  {
    std::lock_guard lk(fill_mu_);
    fill_stop_ = true;
    t = std::move(fill_thread_);
  }
  fill_cv_.notify_all();
  if (t.joinable()) t.join();
}

void CopyOnReadImpl::SetFillRate(uint64_t bytes_per_second) { limiter_.SetRate(bytes_per_second); }

void CopyOnReadImpl::FillSupervisor() {
  spdlog::info("copy-on-read: fill started, {} of {} blocks present, window {} x {} blocks",
               present_count_.load(), blocks_, opts_.fill_window, opts_.fill_chunk_blocks);
  std::vector<std::thread> workers;
  for (uint32_t i = 0; i < std::max<uint32_t>(1, opts_.fill_window); ++i)
    workers.emplace_back([this] { FillWorker(); });
  for (auto& w : workers) w.join();
  bool complete = present_count_.load() == blocks_;
  if (complete) {
    spdlog::info("copy-on-read: fill complete ({} bytes fetched by the fill)",
                 bytes_fetched_fill_.load());
    if (opts_.auto_switch && !fill_stop_) {
      if (auto s = DoSwitch(); !s)
        spdlog::error("copy-on-read: automatic switch to target failed: {}", s.error().message());
    }
  } else {
    spdlog::info("copy-on-read: fill stopped, {} of {} blocks present", present_count_.load(),
                 blocks_);
  }
  fill_running_ = false;
}

std::optional<CopyOnReadImpl::Run> CopyOnReadImpl::ClaimFillChunk() {
  std::lock_guard lk(inflight_mu_);
  for (int pass = 0; pass < 2; ++pass) {
    uint64_t b = fill_cursor_;
    for (;;) {
      b = present_.FindClear(b);
      if (b >= blocks_) break;
      if (inflight_.count(b)) {
        ++b;
        continue;
      }
      std::vector<Run> runs;
      for (uint64_t n = 0; n < std::max<uint32_t>(1, opts_.fill_chunk_blocks) && b + n < blocks_ &&
                           !present_.Test(b + n) && !inflight_.count(b + n);
           ++n)
        ClaimBlockLocked(runs, b + n, UINT64_MAX);
      fill_cursor_ = runs[0].first + runs[0].count;
      return runs[0];
    }
    fill_cursor_ = 0;  // wrap: blocks skipped earlier (failed, in flight) get another go
  }
  return std::nullopt;
}

void CopyOnReadImpl::FillWorker() {
  const uint64_t chunk_bytes = uint64_t(std::max<uint32_t>(1, opts_.fill_chunk_blocks)) * bs_;
  auto stopped = [this] { return fill_stop_.load() || present_count_.load() == blocks_; };
  while (!stopped()) {
    {  // Guest I/O first: yield while guest misses are in flight.
      std::unique_lock lk(fill_mu_);
      fill_cv_.wait(lk, [&] { return fill_stop_ || guest_misses_.load() == 0; });
      if (fill_stop_) return;
    }
    Clock::TimePoint until;
    {
      std::lock_guard lk(fill_mu_);
      until = backoff_until_;
    }
    if (clock_.Now() < until) {  // remote failed recently: wait before retrying
      clock_.SleepFor(
          std::min<Clock::Duration>(until - clock_.Now(), std::chrono::milliseconds(20)));
      continue;
    }
    if (present_count_.load() == blocks_) return;
    // Take tokens before claiming, so a guest read never waits on a claim
    // that is only sleeping in the rate limiter.
    if (!limiter_.Acquire(chunk_bytes, stopped)) return;
    auto run = ClaimFillChunk();
    if (!run) {
      if (present_count_.load() == blocks_) return;
      // Everything left is being fetched by someone else; wait for it.
      std::unique_lock lk(fill_mu_);
      fill_cv_.wait_for(lk, std::chrono::milliseconds(10), [&] { return fill_stop_.load(); });
      continue;
    }
    St s = FetchRun(*run, FetchFor::kFill);
    ReleaseRuns(std::span(&*run, 1));
    if (!s) NoteError(s.error());  // remote errors are noted already; local ones (ENOSPC) too
    std::lock_guard lk(fill_mu_);
    if (s) {
      if (backoff_.count() != 0) {
        spdlog::info("copy-on-read: remote reads succeed again; fill resumes");
        backoff_ = Clock::Duration(0);
      }
    } else {
      // Workers fail together; only the first failure after a pause grows it.
      if (clock_.Now() >= backoff_until_) {
        if (backoff_.count() == 0)
          spdlog::warn("copy-on-read: fill paused: {}", s.error().message());
        backoff_ = backoff_.count() == 0 ? Clock::Duration(kBackoffInitial)
                                         : std::min<Clock::Duration>(backoff_ * 2, kBackoffMax);
        backoff_until_ = clock_.Now() + backoff_;
      }
    }
  }
}

void CopyOnReadImpl::NoteError(const Error& e) {
  std::lock_guard lk(error_mu_);
  last_error_ = e.message();
}

// --- Control --------------------------------------------------------------------

FillStatus CopyOnReadImpl::Status() const {
  FillStatus st;
  st.mode = proxy() ? "proxy" : "target";
  st.fill_running = fill_running_.load();
  st.blocks_total = blocks_;
  // Committed first: a group commit between the two reads must not show
  // more committed than present.
  st.blocks_committed = bitmap_->Count();
  st.blocks_present = present_count_.load();
  st.complete = st.blocks_present == blocks_;
  st.remote_connected = proxy() && remote_ && remote_->Connected();
  st.block_size = uint32_t(bs_);
  st.bytes_fetched = bytes_fetched_.load();
  st.bytes_fetched_fill = bytes_fetched_fill_.load();
  st.rate = meter_.Rate();
  if (!st.complete && st.rate > 0)
    st.eta_seconds = double((blocks_ - st.blocks_present) * bs_) / st.rate;
  else if (st.complete)
    st.eta_seconds = 0;
  st.rate_limit = limiter_.rate();
  std::lock_guard lk(error_mu_);
  st.last_error = last_error_;
  return st;
}

St CopyOnReadImpl::SwitchToTarget() {
  if (!proxy()) return Ok();
  DrainStores();  // blocks read by clients become present once stored
  if (present_count_.load() != blocks_)
    return Fail(Error(EAGAIN, std::to_string(blocks_ - present_count_.load()) + " of " +
                                  std::to_string(blocks_) +
                                  " blocks are still missing; wait for the fill to complete"));
  StopFill();
  return DoSwitch();
}

St CopyOnReadImpl::DoSwitch() {
  std::lock_guard lk(switch_mu_);
  if (!proxy()) return Ok();
  if (present_count_.load() != blocks_) return Fail(Error(EAGAIN, "blocks are still missing"));
  // Every bit must be durable first, so a restart opens in target mode.
  if (auto s = WaitDurable(0, blocks_); !s) return s;
  if (auto s = SyncAll(); !s) return s;
  mode_.store(kTarget, std::memory_order_release);
  remote_->Close();
  spdlog::info("copy-on-read: switched to target mode; the remote is no longer used");
  return Ok();
}

St CopyOnReadImpl::ReconnectRemote() {
  if (!proxy()) return Fail(Error::Invalid("in target mode: there is no remote to reconnect"));
  auto s = remote_->Reconnect();
  if (s) {
    std::lock_guard lk(fill_mu_);
    backoff_until_ = Clock::TimePoint{};  // retry at once
  } else {
    NoteError(s.error());
  }
  return s;
}

}  // namespace

// --- Factory --------------------------------------------------------------------

Result<std::shared_ptr<CopyOnReadBackend>> CopyOnReadBackend::Open(
    std::unique_ptr<RemoteReader> remote, const CopyOnReadOptions& options) {
  return Open(std::move(remote), options, SteadyClock::Instance());
}

Result<std::shared_ptr<CopyOnReadBackend>> CopyOnReadBackend::Open(
    std::unique_ptr<RemoteReader> remote, const CopyOnReadOptions& options, Clock& clock) {
  if (!IsPowerOfTwo(options.block_size) || options.block_size < bitmap::kMinBlockSize ||
      options.block_size > bitmap::kMaxBlockSize)
    return Fail(Error::Invalid("block size " + std::to_string(options.block_size) +
                               " must be a power of two between 4096 and 2^30"));
  if (options.cache_path.empty() || options.bitmap_path.empty())
    return Fail(Error::Invalid("copy-on-read needs a cache path and a bitmap path"));

  struct stat st {};
  const bool bitmap_exists = ::stat(options.bitmap_path.c_str(), &st) == 0;
  const bool cache_exists = ::stat(options.cache_path.c_str(), &st) == 0;
  const bool cache_is_blockdev = cache_exists && S_ISBLK(st.st_mode);

  uint64_t image_size;
  if (remote) {
    image_size = remote->Size();
  } else {
    if (!bitmap_exists)
      return Fail(Error::Invalid("no remote given and no bitmap at " + options.bitmap_path));
    auto h = BlockBitmap::ReadHeader(options.bitmap_path);
    if (!h) return Fail(h.error());
    image_size = h->image_size;
  }
  if (bitmap_exists && !cache_exists)
    return Fail(Error::Invalid("bitmap " + options.bitmap_path + " exists but the cache image " +
                               options.cache_path +
                               " does not: the bitmap would claim data that is gone. Delete the "
                               "bitmap to start over."));
  if (!bitmap_exists && cache_exists && !cache_is_blockdev) {
    // A cache without a bitmap has no known-good block; discard its content
    // so nothing stale can ever be served (the bitmap is created after this).
    if (::truncate(options.cache_path.c_str(), 0) != 0)
      return Fail(Error::Errno(errno, "discard stale cache " + options.cache_path));
  }
  if (!cache_exists || !bitmap_exists) {
    if (!cache_is_blockdev) {
      int fd = ::open(options.cache_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
      if (fd < 0) return Fail(Error::Errno(errno, "create cache " + options.cache_path));
      int rc = ::ftruncate(fd, off_t(image_size));
      int err = errno;
      ::close(fd);
      if (rc != 0) return Fail(Error::Errno(err, "size cache " + options.cache_path));
    }
  }
  auto cache = FileBackend::Open(options.cache_path, {.sync_for_test = options.cache_sync_for_test});
  if (!cache) return Fail(cache.error().Context("opening cache image"));
  if ((*cache)->is_block_device() ? (*cache)->Size() < image_size : (*cache)->Size() != image_size)
    return Fail(Error::Invalid("cache image " + options.cache_path + " has " +
                               std::to_string((*cache)->Size()) + " bytes but the image has " +
                               std::to_string(image_size) +
                               ". Delete the cache image and the bitmap to start over."));
  auto bm = BlockBitmap::Open(options.bitmap_path, image_size, options.block_size);
  if (!bm) return Fail(bm.error());
  if (!remote && (*bm)->Count() != (*bm)->blocks())
    return Fail(Error::Invalid("the cache is incomplete (" + std::to_string((*bm)->Count()) +
                               " of " + std::to_string((*bm)->blocks()) +
                               " blocks); a remote is needed to serve it"));
  spdlog::info(
      "copy-on-read: cache {} ({} bytes, block size {}), bitmap {} {} with {} of {} "
      "blocks present",
      options.cache_path, image_size, options.block_size, options.bitmap_path,
      (*bm)->created() ? "created" : "opened", (*bm)->Count(), (*bm)->blocks());
  auto impl = std::make_shared<CopyOnReadImpl>(std::move(remote), options, clock, std::move(*cache),
                                               std::move(*bm), image_size);
  if (options.fill_on_start) impl->StartFill();
  return std::shared_ptr<CopyOnReadBackend>(std::move(impl));
}

}  // namespace kagemusha::storage

#include "kagemusha/storage/copy_on_read.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "bitmap_format.h"
#include "fake_remote.h"
#include "kagemusha/storage/file_backend.h"
#include "stepped_clock_for_test.h"
#include "test_util.h"

namespace kagemusha::storage {
namespace {

using namespace std::chrono_literals;
using testing::ReadFileBytes;
using testing::ScratchDir;
using testing::WaitUntil;
using testing::WriteFileBytes;

constexpr uint64_t kMiB = 1024 * 1024;

std::span<const std::byte> Slice(const std::vector<std::byte>& v, uint64_t off, uint64_t len) {
  return std::span<const std::byte>(v).subspan(off, len);
}
bool SameBytes(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

// One proxy under test: a FakeRemote over a pattern image, a cache and a
// bitmap in a scratch directory.
class CopyOnReadTest : public ::testing::Test {
 protected:
  // The remote holds PatternImage(image_size), changed by `edit` if given.
  void Init(uint64_t image_size, uint32_t block_size, bool fill_on_start = false,
            Clock& clock = SteadyClock::Instance(),
            const std::function<void(std::vector<std::byte>&)>& edit = {}) {
    image_ = FakeRemote::PatternImage(image_size);
    if (edit) edit(image_);
    opts_.cache_path = dir_ / "cache.img";
    opts_.bitmap_path = dir_ / "cache.bitmap";
    opts_.block_size = block_size;
    opts_.fill_on_start = fill_on_start;
    OpenBackend(clock);
  }
  void OpenBackend(Clock& clock = SteadyClock::Instance()) {
    auto remote = std::make_unique<FakeRemote>(image_, opts_.block_size);
    remote_ = remote->shared();
    auto b = CopyOnReadBackend::Open(std::move(remote), opts_, clock);
    ASSERT_TRUE(b.has_value()) << b.error().message();
    cor_ = *b;
  }
  std::vector<std::byte> ReadAt(uint64_t off, uint64_t len) {
    std::vector<std::byte> buf(len);
    auto s = cor_->Read(buf, off);
    EXPECT_TRUE(s) << s.error().message();
    return buf;
  }
  uint32_t ReadsOf(uint64_t block) { return FakeRemote::ReadsOfBlock(*remote_, block); }
  uint64_t Requests() {
    std::lock_guard lk(remote_->mu);
    return remote_->requests;
  }
  bool WaitComplete(std::chrono::milliseconds timeout = 5s) {
    return WaitUntil([&] { return cor_->Status().complete; }, timeout);
  }

  ScratchDir dir_;
  CopyOnReadOptions opts_;
  std::vector<std::byte> image_;
  std::shared_ptr<FakeRemote::Shared> remote_;
  std::shared_ptr<CopyOnReadBackend> cor_;
};

TEST_F(CopyOnReadTest, MissIsFetchedOnceAndThenServedFromTheCache) {
  Init(4 * kMiB, 65536);
  EXPECT_TRUE(SameBytes(ReadAt(3 * 65536 + 100, 1000), Slice(image_, 3 * 65536 + 100, 1000)));
  EXPECT_EQ(ReadsOf(3), 1u);
  EXPECT_EQ(cor_->Status().blocks_present, 1u);
  EXPECT_TRUE(SameBytes(ReadAt(3 * 65536, 65536), Slice(image_, 3 * 65536, 65536)));
  EXPECT_EQ(ReadsOf(3), 1u);
  EXPECT_EQ(Requests(), 1u);
  EXPECT_EQ(cor_->Status().bytes_fetched, 65536u);
}

TEST_F(CopyOnReadTest, AdjacentMissingBlocksAreMergedIntoOneRemoteRequest) {
  Init(4 * kMiB, 65536);
  EXPECT_TRUE(SameBytes(ReadAt(65536 + 5, 8 * 65536), Slice(image_, 65536 + 5, 8 * 65536)));
  std::lock_guard lk(remote_->mu);
  ASSERT_EQ(remote_->request_log.size(), 1u);
  EXPECT_EQ(remote_->request_log[0], std::make_pair(uint64_t(65536), uint64_t(9 * 65536)));
}

TEST_F(CopyOnReadTest, AlignedMissesFilledInPlaceAlsoReachTheCache) {
  // A block-aligned read has its missing runs fetched straight into the
  // reply buffer; the bytes returned, and those stored in the cache, must
  // both be the remote's, around blocks that were present already.
  Init(4 * kMiB, 65536);
  ReadAt(0, 65536);
  ReadAt(3 * 65536, 65536);
  EXPECT_TRUE(SameBytes(ReadAt(0, 6 * 65536), Slice(image_, 0, 6 * 65536)));
  {
    std::lock_guard lk(remote_->mu);
    ASSERT_EQ(remote_->request_log.size(), 4u);  // 0, 3, then runs 1-2 and 4-5
  }
  ASSERT_TRUE(cor_->Flush());
  auto cache = ReadFileBytes(opts_.cache_path);
  EXPECT_TRUE(SameBytes(Slice(cache, 0, 6 * 65536), Slice(image_, 0, 6 * 65536)));
  EXPECT_TRUE(SameBytes(ReadAt(0, 6 * 65536), Slice(image_, 0, 6 * 65536)));
  EXPECT_EQ(Requests(), 4u);  // the second read was served by the cache
}

TEST_F(CopyOnReadTest, LargeMissingRunsAreSplitAtFourMiB) {
  Init(16 * kMiB, 65536);
  EXPECT_TRUE(SameBytes(ReadAt(0, 12 * kMiB), Slice(image_, 0, 12 * kMiB)));
  std::lock_guard lk(remote_->mu);
  EXPECT_EQ(remote_->request_log.size(), 3u);
  for (auto [off, len] : remote_->request_log) EXPECT_EQ(len, 4 * kMiB);
}

TEST_F(CopyOnReadTest, FragmentedLargeReadIsCorrectAndPipelined) {
  Init(32 * kMiB, 65536);
  for (uint64_t b = 0; b < 512; b += 2) ReadAt(b * 65536, 65536);  // every other block present
  ASSERT_TRUE(cor_->Flush());  // present once the cache writer has stored them
  ASSERT_EQ(cor_->Status().blocks_present, 256u);
  FakeRemote::Hold(*remote_);  // requests pile up until released
  auto read = std::async(std::launch::async, [&] { return ReadAt(0, 32 * kMiB); });
  // The 256 single-block holes go out in parallel: the guest fetch pool (8
  // threads) plus the reading thread keep 9 requests outstanding at once.
  EXPECT_TRUE(FakeRemote::WaitHeld(*remote_, 9, 10s)) << "the holes were not fetched in parallel";
  FakeRemote::Release(*remote_);
  EXPECT_TRUE(SameBytes(read.get(), image_));
  for (uint64_t b = 0; b < 512; ++b) ASSERT_EQ(ReadsOf(b), 1u) << "block " << b;
  std::lock_guard lk(remote_->mu);
  EXPECT_EQ(remote_->requests, 512u);
  EXPECT_EQ(remote_->max_waiting, 9u);
}

TEST_F(CopyOnReadTest, ConcurrentReadsOfSameBlockFetchOnce) {
  Init(4 * kMiB, 65536);
  FakeRemote::Hold(*remote_);
  std::vector<std::future<std::vector<std::byte>>> readers;
  for (int i = 0; i < 8; ++i)
    readers.push_back(
        std::async(std::launch::async, [&, i] { return ReadAt(5 * 65536 + i, 4096); }));
  ASSERT_TRUE(FakeRemote::WaitHeld(*remote_, 1, 2s));
  std::this_thread::sleep_for(20ms);  // let the other readers pile up on the claim
  {
    std::lock_guard lk(remote_->mu);
    EXPECT_EQ(remote_->waiting, 1u);
  }
  FakeRemote::Release(*remote_);
  for (int i = 0; i < 8; ++i)
    EXPECT_TRUE(SameBytes(readers[size_t(i)].get(), Slice(image_, 5 * 65536 + uint64_t(i), 4096)));
  EXPECT_EQ(ReadsOf(5), 1u);
  EXPECT_EQ(Requests(), 1u);
}

TEST_F(CopyOnReadTest, HitNeverWaitsBehindAMiss) {
  Init(4 * kMiB, 65536);
  ReadAt(0, 65536);  // block 0 present
  FakeRemote::Hold(*remote_);
  auto miss = std::async(std::launch::async, [&] { return ReadAt(10 * 65536, 65536); });
  ASSERT_TRUE(FakeRemote::WaitHeld(*remote_, 1, 2s));
  auto hit = std::async(std::launch::async, [&] { return ReadAt(100, 4096); });
  ASSERT_EQ(hit.wait_for(2s), std::future_status::ready) << "hit blocked behind a remote fetch";
  EXPECT_TRUE(SameBytes(hit.get(), Slice(image_, 100, 4096)));
  // Writes and zeroes of present blocks do not wait either.
  std::vector<std::byte> data(4096, std::byte{9});
  EXPECT_TRUE(cor_->Write(data, 8192, false));
  EXPECT_EQ(miss.wait_for(0ms), std::future_status::timeout);
  FakeRemote::Release(*remote_);
  EXPECT_TRUE(SameBytes(miss.get(), Slice(image_, 10 * 65536, 65536)));
}

TEST_F(CopyOnReadTest, PartialWriteToMissingBlockMergesRemoteData) {
  Init(4 * kMiB, 65536);
  std::vector<std::byte> data(100, std::byte{0xee});
  ASSERT_TRUE(cor_->Write(data, 2 * 65536 + 10, false));
  EXPECT_EQ(ReadsOf(2), 1u);
  auto expect = std::vector<std::byte>(image_.begin() + 2 * 65536, image_.begin() + 3 * 65536);
  std::fill(expect.begin() + 10, expect.begin() + 110, std::byte{0xee});
  EXPECT_EQ(ReadAt(2 * 65536, 65536), expect);
  // A write spanning two partial blocks merges both edges.
  ASSERT_TRUE(cor_->Write(data, 5 * 65536 - 50, false));
  EXPECT_EQ(ReadsOf(4), 1u);
  EXPECT_EQ(ReadsOf(5), 1u);
  auto got = ReadAt(5 * 65536 - 100, 200);
  EXPECT_TRUE(SameBytes(std::span(got).first(50), Slice(image_, 5 * 65536 - 100, 50)));
  EXPECT_TRUE(SameBytes(std::span(got).subspan(50, 100), data));
  EXPECT_TRUE(SameBytes(std::span(got).subspan(150), Slice(image_, 5 * 65536 + 50, 50)));
  EXPECT_EQ(Requests(), 2u);  // the two adjacent edge blocks went in one request
}

TEST_F(CopyOnReadTest, FullBlockWritesNeverFetch) {
  Init(4 * kMiB, 65536);
  std::vector<std::byte> data(3 * 65536, std::byte{0x42});
  ASSERT_TRUE(cor_->Write(data, 4 * 65536, /*fua=*/true));
  EXPECT_EQ(Requests(), 0u);
  EXPECT_EQ(ReadAt(4 * 65536, 3 * 65536), data);
  EXPECT_EQ(Requests(), 0u);
  EXPECT_EQ(cor_->Status().blocks_present, 3u);
}

TEST_F(CopyOnReadTest, TrimAndZeroMarkWholeBlocksWithoutFetching) {
  Init(4 * kMiB, 65536);
  ASSERT_TRUE(cor_->Zero(65536, 3 * 65536, /*may_trim=*/true, /*fast=*/false, /*fua=*/false));
  ASSERT_TRUE(cor_->Trim(10 * 65536, 2 * 65536, false));
  EXPECT_EQ(Requests(), 0u);
  EXPECT_EQ(cor_->Status().blocks_present, 5u);
  EXPECT_EQ(ReadAt(65536, 3 * 65536), std::vector<std::byte>(3 * 65536));
  EXPECT_EQ(Requests(), 0u);
  // Trim of part of a block is advisory: no fetch, block stays missing.
  ASSERT_TRUE(cor_->Trim(20 * 65536 + 1, 1000, false));
  EXPECT_EQ(Requests(), 0u);
  EXPECT_EQ(cor_->Status().blocks_present, 5u);
}

TEST_F(CopyOnReadTest, ZeroOfPartialBlocksFetchesAndMergesTheEdges) {
  Init(4 * kMiB, 65536);
  ASSERT_TRUE(cor_->Zero(30 * 65536 + 1000, 65536, /*may_trim=*/false, false, false));
  EXPECT_EQ(ReadsOf(30), 1u);
  EXPECT_EQ(ReadsOf(31), 1u);
  auto got = ReadAt(30 * 65536, 2 * 65536);
  for (uint64_t i = 0; i < got.size(); ++i) {
    bool zero = i >= 1000 && i < 1000 + 65536;
    ASSERT_EQ(got[i], zero ? std::byte{0} : image_[30 * 65536 + i]) << i;
  }
}

TEST_F(CopyOnReadTest, FastZeroOfAPartlyMissingBlockIsNotSupported) {
  Init(4 * kMiB, 65536);
  auto s = cor_->Zero(100, 1000, false, /*fast=*/true, false);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ENOTSUP);
  EXPECT_EQ(Requests(), 0u);
  EXPECT_TRUE(cor_->Zero(65536, 65536, false, /*fast=*/true, false));  // whole block: fine
}

TEST_F(CopyOnReadTest, CacheCommandFetchesTheRange) {
  Init(4 * kMiB, 65536);
  ASSERT_TRUE(cor_->Cache(65536, 4 * 65536));
  EXPECT_EQ(cor_->Status().blocks_present, 4u);
  ReadAt(65536, 4 * 65536);
  EXPECT_EQ(Requests(), 1u);
}

TEST_F(CopyOnReadTest, ExtentsReportMissingBlocksAsDataAndPresentOnesFromTheCache) {
  Init(4 * kMiB, 65536);
  ASSERT_TRUE(cor_->Zero(0, 2 * 65536, /*may_trim=*/true, false, false));  // present, punched
  ReadAt(2 * 65536, 65536);                                                // present, data
  auto ext = cor_->Extents(0, 4 * kMiB);
  ASSERT_TRUE(ext.has_value());
  std::vector<Extent> want = {{2 * 65536, true, true}, {4 * kMiB - 2 * 65536, false, false}};
  EXPECT_EQ(*ext, want);
  auto caps = cor_->Caps();
  EXPECT_TRUE(caps.can_multi_conn);
  EXPECT_TRUE(caps.can_cache);
}

TEST_F(CopyOnReadTest, FillCompletesAndCacheEqualsSource) {
  Init(8 * kMiB, 65536);
  {
    std::lock_guard lk(remote_->mu);
    remote_->jitter = 3ms;  // replies come back out of order
  }
  cor_->StartFill();
  ASSERT_TRUE(WaitComplete(5s));
  auto st = cor_->Status();
  EXPECT_EQ(st.blocks_present, 128u);
  EXPECT_EQ(st.bytes_fetched_fill, 8 * kMiB);
  EXPECT_GT(st.rate, 0.0);
  EXPECT_EQ(st.eta_seconds, 0.0);
  for (uint64_t b = 0; b < 128; ++b) ASSERT_EQ(ReadsOf(b), 1u) << b;
  {
    std::lock_guard lk(remote_->mu);
    EXPECT_GT(remote_->max_in_flight, 1u);  // the window keeps several requests out
    EXPECT_LE(remote_->max_in_flight, opts_.fill_window);
    for (auto [off, len] : remote_->request_log) EXPECT_EQ(len, 16 * 65536u);
  }
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(ReadFileBytes(opts_.cache_path), image_);
  WaitUntil([&] { return !cor_->Status().fill_running; }, 2s);
  EXPECT_FALSE(cor_->Status().fill_running);
}

TEST_F(CopyOnReadTest, FillNeverOverwritesConcurrentGuestWrites) {
  opts_.fill_chunk_blocks = 4;
  Init(8 * kMiB, 65536);
  {
    std::lock_guard lk(remote_->mu);
    remote_->jitter = 2ms;
  }
  cor_->StartFill();
  std::mt19937 rng(7);
  std::map<uint64_t, uint8_t> written;
  for (int i = 0; i < 60; ++i) {
    uint64_t b = rng() % 128;
    uint8_t v = uint8_t(1 + rng() % 250);
    std::vector<std::byte> data(65536, std::byte{v});
    ASSERT_TRUE(cor_->Write(data, b * 65536, false));
    written[b] = v;
  }
  ASSERT_TRUE(WaitComplete(5s));
  for (uint64_t b = 0; b < 128; ++b) {
    auto got = ReadAt(b * 65536, 65536);
    if (written.count(b))
      ASSERT_EQ(got, std::vector<std::byte>(65536, std::byte{written[b]})) << "block " << b;
    else
      ASSERT_TRUE(SameBytes(got, Slice(image_, b * 65536, 65536))) << "block " << b;
  }
}

TEST_F(CopyOnReadTest, FillYieldsWhileGuestMissesAreInFlight) {
  Init(4 * kMiB, 65536);
  FakeRemote::Hold(*remote_);
  auto miss = std::async(std::launch::async, [&] { return ReadAt(0, 4096); });
  ASSERT_TRUE(FakeRemote::WaitHeld(*remote_, 1, 2s));
  cor_->StartFill();
  std::this_thread::sleep_for(100ms);
  {
    std::lock_guard lk(remote_->mu);
    EXPECT_EQ(remote_->waiting, 1u) << "the fill sent requests while a guest miss was waiting";
  }
  FakeRemote::Release(*remote_);
  miss.get();
  EXPECT_TRUE(WaitComplete(5s));
}

TEST_F(CopyOnReadTest, FillRateLimitIsHonouredOnAFakeClock) {
  // One worker, so only the rate limiter moves the fake clock.
  opts_.fill_window = 1;
  opts_.fill_rate_limit = 1 * kMiB;
  FakeClock clock;
  Init(4 * kMiB, 65536, false, clock);
  auto start = clock.Now();
  cor_->StartFill();
  ASSERT_TRUE(WaitComplete(5s));
  ASSERT_TRUE(WaitUntil([&] { return !cor_->Status().fill_running; }, 2s));
  // 4 MiB at 1 MiB/s in 1 MiB chunks: the first goes at once, the last at 3 s.
  double secs = std::chrono::duration<double>(clock.Now() - start).count();
  EXPECT_NEAR(secs, 3.0, 0.03);
  auto st = cor_->Status();
  EXPECT_EQ(st.rate_limit, 1 * kMiB);
  EXPECT_NEAR(st.rate, double(4 * kMiB) / 3.0, 0.1 * kMiB);
}

TEST_F(CopyOnReadTest, FillRateLimitHoldsWithAFullWindowOnASteppedClock) {
  // 8 workers, 32 chunks of 64 KiB at 4 MiB/s: one chunk may start every
  // 1/64 s. Time moves only when all 8 workers sleep in the limiter, so the
  // bytes admitted at each simulated instant are exact, whatever the load.
  opts_.fill_window = 8;
  opts_.fill_chunk_blocks = 1;
  opts_.fill_rate_limit = 4 * kMiB;
  SteppedClock clock;
  image_ = FakeRemote::PatternImage(2 * kMiB);
  opts_.cache_path = dir_ / "cache.img";
  opts_.bitmap_path = dir_ / "cache.bitmap";
  opts_.block_size = 65536;
  opts_.fill_on_start = false;
  OpenBackend(clock);
  constexpr uint64_t kChunks = 32, kChunk = 65536;
  const auto step = std::chrono::nanoseconds(1'000'000'000 / 64);  // 15.625 ms, exact
  cor_->StartFill();
  for (uint64_t k = 0; k < kChunks; ++k) {
    // At k/64 s chunks 0..k have started, and no more: every other worker
    // sleeps on a later reservation.
    ASSERT_TRUE(
        WaitUntil([&] { return cor_->Status().bytes_fetched_fill == (k + 1) * kChunk; }, 10s))
        << "at " << k << "/64 s: " << cor_->Status().bytes_fetched_fill << " bytes fetched";
    if (k + 1 < kChunks) {
      ASSERT_TRUE(clock.WaitAsleep(opts_.fill_window, 10s));
      EXPECT_EQ(cor_->Status().bytes_fetched_fill, (k + 1) * kChunk) << "over the rate at " << k;
    }
    if (k == 15) {
      // Half way, at 15/64 s: 1 MiB in 15/64 s, 1 MiB to go.
      auto mid = cor_->Status();
      EXPECT_TRUE(mid.fill_running);
      EXPECT_NEAR(mid.rate, double(1 * kMiB) / (15.0 / 64), 1.0);
      ASSERT_TRUE(mid.eta_seconds.has_value());
      EXPECT_NEAR(*mid.eta_seconds, double(1 * kMiB) / mid.rate, 1e-9);
      EXPECT_NEAR(*mid.eta_seconds, 15.0 / 64, 1e-6);
    }
    if (k + 1 < kChunks) clock.Advance(step);
  }
  // The last chunk started at 31/64 s: exactly 4 MiB/s.
  EXPECT_EQ(clock.Now() - Clock::TimePoint{}, 31 * step);
  ASSERT_TRUE(WaitComplete(10s));
  EXPECT_EQ(cor_->Status().eta_seconds, 0.0);
  // Workers still holding reservations notice completion when they wake.
  for (int i = 0; i < 1000 && cor_->Status().fill_running; ++i) {
    clock.Advance(std::chrono::milliseconds(20));
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_FALSE(cor_->Status().fill_running);
  EXPECT_EQ(Requests(), kChunks);
  cor_.reset();  // before the clock it uses goes away
}

TEST_F(CopyOnReadTest, RaisingTheFillRateTakesEffectAtOnce) {
  image_ = FakeRemote::PatternImage(4 * kMiB);
  opts_.cache_path = dir_ / "cache.img";
  opts_.bitmap_path = dir_ / "cache.bitmap";
  opts_.block_size = 65536;
  opts_.fill_on_start = false;
  opts_.fill_rate_limit = 1024;  // 1 KiB/s: 4 MiB would take 68 minutes
  OpenBackend();                 // real clock
  cor_->StartFill();
  std::this_thread::sleep_for(100ms);
  EXPECT_LT(cor_->Status().blocks_present, 64u);
  cor_->SetFillRate(0);
  EXPECT_TRUE(WaitComplete(3s));
  EXPECT_EQ(cor_->Status().rate_limit, 0u);
}

TEST_F(CopyOnReadTest, RemoteFailurePausesFillAndRecoveryResumesIt) {
  Init(4 * kMiB, 65536);
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kDisconnected);
  cor_->StartFill();
  ASSERT_TRUE(WaitUntil([&] { return !cor_->Status().last_error.empty(); }, 2s));
  std::this_thread::sleep_for(200ms);
  auto st = cor_->Status();
  EXPECT_EQ(st.blocks_present, 0u);
  EXPECT_FALSE(st.remote_connected);
  EXPECT_TRUE(st.fill_running);
  EXPECT_NE(st.last_error.find("disconnected"), std::string::npos) << st.last_error;
  // A guest miss meanwhile fails with the remote's error instead of hanging.
  std::vector<std::byte> buf(4096);
  auto r = cor_->Read(buf, 0);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ETIMEDOUT);
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kNone);
  ASSERT_TRUE(WaitComplete(5s));
  EXPECT_TRUE(cor_->Status().remote_connected);
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(ReadFileBytes(opts_.cache_path), image_);
}

TEST_F(CopyOnReadTest, ReadErrorFromRemoteIsReturnedAndLaterReadsSucceed) {
  Init(4 * kMiB, 65536);
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kIoError);
  std::vector<std::byte> buf(4096);
  auto r = cor_->Read(buf, 65536);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), EIO);
  EXPECT_EQ(cor_->Status().blocks_present, 0u);
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kNone);
  EXPECT_TRUE(SameBytes(ReadAt(65536, 4096), Slice(image_, 65536, 4096)));
}

// The server asks for a file range before reading (to splice the reply).
// Only present blocks are offered: a miss is left to Read(), which answers
// from the fetched buffer and stores behind the reply.
TEST_F(CopyOnReadTest, FileRangeForNamesPresentRangesAndLeavesMissesToRead) {
  Init(4 * kMiB, 65536);
  ASSERT_TRUE(cor_->Write(std::vector<std::byte>(65536, std::byte{9}), 65536, false));
  EXPECT_FALSE(cor_->FileRangeFor(30000, 200000).has_value());  // blocks 0, 2, 3 missing
  EXPECT_EQ(Requests(), 0u);
  auto r = cor_->FileRangeFor(65536 + 100, 1000);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->offset, 65536u + 100);
  std::vector<std::byte> got(1000);
  ASSERT_EQ(::pread(r->fd, got.data(), got.size(), off_t(r->offset)), ssize_t(got.size()));
  EXPECT_EQ(got, std::vector<std::byte>(1000, std::byte{9}));
  std::vector<std::byte> want(image_.begin() + 30000, image_.begin() + 230000);
  std::fill(want.begin() + (65536 - 30000), want.begin() + (131072 - 30000), std::byte{9});
  EXPECT_EQ(ReadAt(30000, 200000), want);
  ASSERT_TRUE(cor_->Flush());  // stores behind the reply are done
  EXPECT_TRUE(cor_->FileRangeFor(30000, 200000).has_value());
  for (uint64_t b : {0u, 2u, 3u}) EXPECT_EQ(ReadsOf(b), 1u) << b;
  EXPECT_EQ(ReadsOf(1), 0u);
}

TEST_F(CopyOnReadTest, SwitchRefusesBeforeCompleteAndWorksAfter) {
  Init(2 * kMiB, 65536);
  auto early = cor_->SwitchToTarget();
  ASSERT_FALSE(early);
  EXPECT_EQ(early.error().code(), EAGAIN);
  EXPECT_EQ(cor_->Status().mode, "proxy");
  cor_->StartFill();
  ASSERT_TRUE(WaitComplete());
  ASSERT_TRUE(cor_->SwitchToTarget());
  auto st = cor_->Status();
  EXPECT_EQ(st.mode, "target");
  EXPECT_FALSE(st.remote_connected);
  EXPECT_FALSE(st.fill_running);
  {
    std::lock_guard lk(remote_->mu);
    EXPECT_TRUE(remote_->closed);
  }
  uint64_t before = Requests();
  EXPECT_TRUE(SameBytes(ReadAt(0, 2 * kMiB), image_));
  std::vector<std::byte> data(1000, std::byte{1});
  ASSERT_TRUE(cor_->Write(data, 77, true));
  EXPECT_EQ(Requests(), before);
  EXPECT_TRUE(cor_->SwitchToTarget());  // idempotent
  EXPECT_FALSE(cor_->ReconnectRemote());
  // After a restart the complete cache opens in target mode with no remote.
  cor_.reset();
  auto again = CopyOnReadBackend::Open(nullptr, opts_, SteadyClock::Instance());
  ASSERT_TRUE(again.has_value()) << again.error().message();
  EXPECT_EQ((*again)->Status().mode, "target");
  std::vector<std::byte> got(1000);
  ASSERT_TRUE((*again)->Read(got, 77));
  EXPECT_EQ(got, data);
}

TEST_F(CopyOnReadTest, AutoSwitchHappensWhenTheFillCompletes) {
  image_ = FakeRemote::PatternImage(1 * kMiB);
  opts_.cache_path = dir_ / "cache.img";
  opts_.bitmap_path = dir_ / "cache.bitmap";
  opts_.block_size = 65536;
  opts_.fill_on_start = true;
  opts_.auto_switch = true;
  OpenBackend();
  ASSERT_TRUE(WaitUntil([&] { return cor_->Status().mode == "target"; }, 5s));
  EXPECT_TRUE(SameBytes(ReadAt(0, kMiB), image_));
}

TEST_F(CopyOnReadTest, OpeningWithoutRemoteNeedsACompleteCache) {
  Init(1 * kMiB, 65536);
  ReadAt(0, 65536);
  cor_.reset();
  auto b = CopyOnReadBackend::Open(nullptr, opts_, SteadyClock::Instance());
  ASSERT_FALSE(b.has_value());
  EXPECT_NE(b.error().message().find("incomplete"), std::string::npos);
}

TEST_F(CopyOnReadTest, ReopenWithDifferentBlockSizeFailsWithInstructions) {
  Init(1 * kMiB, 65536);
  cor_.reset();
  opts_.block_size = 4096;
  auto b = CopyOnReadBackend::Open(std::make_unique<FakeRemote>(image_), opts_);
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error().code(), EINVAL);
  EXPECT_NE(b.error().message().find("--block-size 65536"), std::string::npos)
      << b.error().message();
}

TEST_F(CopyOnReadTest, BitmapWithoutItsCacheIsRefused) {
  Init(1 * kMiB, 65536);
  cor_.reset();
  ASSERT_EQ(::unlink(opts_.cache_path.c_str()), 0);
  auto b = CopyOnReadBackend::Open(std::make_unique<FakeRemote>(image_), opts_);
  ASSERT_FALSE(b.has_value());
  EXPECT_NE(b.error().message().find("Delete the bitmap"), std::string::npos);
}

TEST_F(CopyOnReadTest, PresentBlocksSurviveACleanRestart) {
  Init(2 * kMiB, 65536);
  ReadAt(0, 4 * 65536);
  cor_.reset();  // clean shutdown commits pending bits
  OpenBackend();
  EXPECT_EQ(cor_->Status().blocks_present, 4u);
  ReadAt(0, 4 * 65536);
  EXPECT_EQ(Requests(), 0u);
}

TEST_F(CopyOnReadTest, FillKeepsItsWindowOfRequestsInFlight) {
  // On a 20 ms RTT link the fill is only as fast as the number of requests
  // it keeps outstanding. Hold every request at the remote: the fill must
  // put exactly fill_window of them in flight, never more, and complete once
  // they are answered. (Throughput over a real WAN is in bench/storage.sh.)
  Init(32 * kMiB, 65536);
  FakeRemote::Hold(*remote_);
  cor_->StartFill();
  ASSERT_TRUE(FakeRemote::WaitHeld(*remote_, opts_.fill_window, 10s))
      << "the fill did not keep " << opts_.fill_window << " requests in flight";
  FakeRemote::Release(*remote_);
  ASSERT_TRUE(WaitComplete(10s));
  std::lock_guard lk(remote_->mu);
  EXPECT_EQ(remote_->max_waiting, opts_.fill_window);
  EXPECT_LE(remote_->max_in_flight, opts_.fill_window);
  EXPECT_EQ(remote_->requests, 32u);  // 1 MiB each: 16 blocks a request
}

TEST_F(CopyOnReadTest, WarmReadsAreServedFromTheCacheAlone) {
  // Once every block is present, reads touch only the cache: the remote sees
  // no request and the bytes equal the cache file's. (Their cost against the
  // plain file is measured by bench/storage.sh, proxy warm read.)
  Init(64 * kMiB, 65536);
  cor_->StartFill();
  ASSERT_TRUE(WaitComplete(10s));
  const uint64_t before = Requests();
  auto plain = FileBackend::Open(opts_.cache_path, {});
  ASSERT_TRUE(plain.has_value());
  std::mt19937_64 rng(3);
  std::vector<std::byte> a(4096), b(4096);
  for (int i = 0; i < 2000; ++i) {
    uint64_t o = (rng() % (64 * kMiB / 4096)) * 4096;
    ASSERT_TRUE(cor_->Read(a, o));
    ASSERT_TRUE((*plain)->Read(b, o));
    ASSERT_EQ(a, b) << "offset " << o;
  }
  EXPECT_EQ(Requests(), before);  // the reads fetched nothing
  EXPECT_EQ(before, 64u);         // and the fill fetched every 1 MiB chunk once
}

TEST_F(CopyOnReadTest, StopFillPausesAndStartFillResumes) {
  opts_.fill_window = 1;
  opts_.fill_chunk_blocks = 1;
  Init(8 * kMiB, 65536);
  {
    std::lock_guard lk(remote_->mu);
    remote_->delay = 2ms;
  }
  cor_->StartFill();
  ASSERT_TRUE(WaitUntil([&] { return cor_->Status().blocks_present > 0; }, 2s));
  cor_->StopFill();
  auto st = cor_->Status();
  EXPECT_FALSE(st.fill_running);
  EXPECT_FALSE(st.complete);
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(cor_->Status().blocks_present, st.blocks_present);  // nothing moves while stopped
  cor_->StartFill();
  ASSERT_TRUE(WaitComplete());
  for (uint64_t b = 0; b < 128; ++b) ASSERT_EQ(ReadsOf(b), 1u) << b;
}

TEST_F(CopyOnReadTest, ZeroBlocksFromTheRemoteStaySparseInTheCache) {
  Init(2 * kMiB, 65536, false, SteadyClock::Instance(), [](std::vector<std::byte>& image) {
    std::fill(image.begin() + 4 * 65536, image.begin() + 12 * 65536, std::byte{0});
  });
  EXPECT_TRUE(SameBytes(ReadAt(0, 2 * kMiB), image_));
  ASSERT_TRUE(cor_->Flush());  // the cache writer has stored the read's blocks
  auto ext = cor_->Extents(0, 2 * kMiB);
  ASSERT_TRUE(ext.has_value());
  std::vector<Extent> want = {
      {4 * 65536, false, false}, {8 * 65536, true, true}, {2 * kMiB - 12 * 65536, false, false}};
  EXPECT_EQ(*ext, want);
}

TEST_F(CopyOnReadTest, ZeroBlocksStaySparseAfterAFillThatPreallocatesTheCache) {
  // The fill allocates the cache a 64 MiB region at a time before its direct
  // writes; blocks that turn out all zeroes must still end up as holes.
  Init(2 * kMiB, 65536, true, SteadyClock::Instance(), [](std::vector<std::byte>& image) {
    std::fill(image.begin() + 4 * 65536, image.begin() + 20 * 65536, std::byte{0});
  });
  ASSERT_TRUE(WaitComplete());
  ASSERT_TRUE(cor_->Flush());
  EXPECT_TRUE(SameBytes(ReadAt(0, 2 * kMiB), image_));
  auto ext = cor_->Extents(0, 2 * kMiB);
  ASSERT_TRUE(ext.has_value());
  std::vector<Extent> want = {
      {4 * 65536, false, false}, {16 * 65536, true, true}, {2 * kMiB - 20 * 65536, false, false}};
  EXPECT_EQ(*ext, want);
  struct stat st {};
  ASSERT_EQ(::stat(opts_.cache_path.c_str(), &st), 0);
  EXPECT_LE(uint64_t(st.st_blocks) * 512, 2 * kMiB - 16 * 65536)
      << "the preallocated zero blocks were not given back";
}

TEST_F(CopyOnReadTest, SecondBackendOnTheSameCacheIsRefused) {
  Init(1 * kMiB, 65536);
  auto second = CopyOnReadBackend::Open(std::make_unique<FakeRemote>(image_), opts_);
  ASSERT_FALSE(second.has_value());
  EXPECT_EQ(second.error().code(), EBUSY);
}

TEST_F(CopyOnReadTest, ReconnectRemoteReportsTheRemoteAnswer) {
  Init(1 * kMiB, 65536);
  EXPECT_TRUE(cor_->ReconnectRemote());
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kDisconnected);
  auto s = cor_->ReconnectRemote();
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ETIMEDOUT);
  EXPECT_FALSE(cor_->Status().last_error.empty());
}

// --- Crash safety -----------------------------------------------------------------
// kill -9 leaves the files as the page cache holds them at that instant.
// Copying the bitmap and then the cache while the proxy runs gives a state at
// least as strict as that: the cache copy is newer than the bitmap copy.

struct Snapshot {
  std::vector<std::byte> bitmap, cache;
};

Snapshot TakeSnapshot(const CopyOnReadOptions& o) {
  Snapshot s;
  s.bitmap = ReadFileBytes(o.bitmap_path);
  s.cache = ReadFileBytes(o.cache_path);
  return s;
}

bool BitSet(const Snapshot& s, uint64_t block) {
  return (uint8_t(s.bitmap[bitmap::kHeaderSize + bitmap::ByteOfBlock(block)]) &
          bitmap::MaskOfBlock(block)) != 0;
}

TEST_F(CopyOnReadTest, StatusBlocksCommittedCountsOnlyTheBitsWrittenToTheBitmapFile) {
  Init(4 * kMiB, 65536);
  // Just fetched: present at once, committed only after the next group commit
  // (up to 500 ms later). Five tries, so a commit tick landing between one
  // read and its status cannot make this flaky.
  bool trailed = false;
  for (uint64_t i = 0; i < 5 && !trailed; ++i) {
    ASSERT_TRUE(SameBytes(ReadAt(i * 65536, 4096), Slice(image_, i * 65536, 4096)));
    auto st = cor_->Status();
    EXPECT_LE(st.blocks_committed, st.blocks_present);
    trailed = st.blocks_committed < st.blocks_present;
  }
  EXPECT_TRUE(trailed) << "a block fetched a moment ago already counted as committed";
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto st = cor_->Status();
        return st.blocks_committed == st.blocks_present;
      },
      5000ms));
  const auto st = cor_->Status();
  EXPECT_GE(st.blocks_present, 1u);
  auto snap = TakeSnapshot(opts_);
  uint64_t in_file = 0;
  for (uint64_t b = 0; b < st.blocks_total; ++b) in_file += BitSet(snap, b) ? 1 : 0;
  EXPECT_EQ(st.blocks_committed, in_file) << "blocks_committed is not what the bitmap file holds";
}

TEST_F(CopyOnReadTest, CrashSafetyBitImpliesDataAtEveryMomentOfAFill) {
  // A rate-limited fill of one block per request (8 MiB at 12 MiB/s, about
  // 0.7 s whatever the machine load), replies out of order, and a guest
  // writing the last blocks meanwhile so commits are forced mid-fetch.
  opts_.fill_chunk_blocks = 1;
  opts_.fill_rate_limit = 12 * kMiB;
  Init(8 * kMiB, 65536);
  {
    std::lock_guard lk(remote_->mu);
    remote_->delay = 2ms;
    remote_->jitter = 5ms;
  }
  constexpr uint64_t kBlocks = 128;
  constexpr uint64_t kWritten = 112;  // blocks >= this are written by the guest
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (uint64_t b = kWritten; b < kBlocks && !done; ++b) {
      std::vector<std::byte> data(65536, std::byte(uint8_t(b)));
      EXPECT_TRUE(cor_->Write(data, b * 65536, false));
      std::this_thread::sleep_for(15ms);
    }
  });
  cor_->StartFill();
  int snapshots = 0;
  uint64_t partial_snapshots = 0;
  while (!cor_->Status().complete && snapshots < 5000) {
    auto snap = TakeSnapshot(opts_);
    ++snapshots;
    uint64_t bits = 0;
    for (uint64_t b = 0; b < kBlocks; ++b) {
      if (!BitSet(snap, b)) continue;
      ++bits;
      auto want = b >= kWritten ? std::vector<std::byte>(65536, std::byte(uint8_t(b)))
                                : std::vector<std::byte>(Slice(image_, b * 65536, 65536).begin(),
                                                         Slice(image_, b * 65536, 65536).end());
      ASSERT_TRUE(SameBytes(Slice(snap.cache, b * 65536, 65536), want))
          << "snapshot " << snapshots << ": bitmap claims block " << b << " but its data is wrong";
    }
    if (bits > 0 && bits < kBlocks) ++partial_snapshots;
  }
  done = true;
  writer.join();
  ASSERT_TRUE(cor_->Flush());
  ASSERT_TRUE(WaitComplete());
  ASSERT_TRUE(cor_->SwitchToTarget());  // commits every bit
  auto final_snap = TakeSnapshot(opts_);
  for (uint64_t b = 0; b < kBlocks; ++b) ASSERT_TRUE(BitSet(final_snap, b)) << b;
  // The check is only meaningful if it saw the bitmap part-way.
  EXPECT_GE(partial_snapshots, 3u) << snapshots << " snapshots";
}

TEST_F(CopyOnReadTest, CrashSafetyAcknowledgedWritesSurviveAKillWithoutFlush) {
  Init(4 * kMiB, 65536);
  ReadAt(20 * 65536, 65536);  // present but not yet committed (commits are lazy)
  std::vector<std::byte> full(65536, std::byte{0x11}), part(300, std::byte{0x22});
  // Each operation's blocks must be in the bitmap file the moment it is
  // acknowledged: "kill -9" right after each one by copying the files as
  // they are, with the proxy still running.
  struct Op {
    std::string name;
    std::function<kagemusha::Status()> run;
    uint64_t block;
  };
  std::vector<Op> ops = {
      {"full-block write to a missing block", [&] { return cor_->Write(full, 3 * 65536, false); },
       3},
      {"partial write to a missing block",
       [&] { return cor_->Write(part, 7 * 65536 + 1000, false); }, 7},
      {"write to a fetched, uncommitted block",
       [&] { return cor_->Write(part, 20 * 65536 + 5, false); }, 20},
      {"zero of a missing block",
       [&] { return cor_->Zero(40 * 65536, 65536, false, false, false); }, 40},
  };
  Snapshot snap;
  for (const auto& op : ops) {
    ASSERT_TRUE(op.run()) << op.name;
    snap = TakeSnapshot(opts_);
    EXPECT_TRUE(BitSet(snap, op.block))
        << op.name << " was acknowledged before its bit was written";
  }
  ScratchDir crash_dir;
  CopyOnReadOptions o2 = opts_;
  o2.cache_path = crash_dir / "cache.img";
  o2.bitmap_path = crash_dir / "cache.bitmap";
  WriteFileBytes(o2.cache_path, snap.cache);
  WriteFileBytes(o2.bitmap_path, snap.bitmap);
  auto restarted = CopyOnReadBackend::Open(std::make_unique<FakeRemote>(image_), o2);
  ASSERT_TRUE(restarted.has_value()) << restarted.error().message();
  std::vector<std::byte> got(4 * kMiB);
  ASSERT_TRUE((*restarted)->Read(got, 0));
  auto expect = image_;
  std::fill(expect.begin() + 3 * 65536, expect.begin() + 4 * 65536, std::byte{0x11});
  std::fill(expect.begin() + 7 * 65536 + 1000, expect.begin() + 7 * 65536 + 1300, std::byte{0x22});
  std::fill(expect.begin() + 20 * 65536 + 5, expect.begin() + 20 * 65536 + 305, std::byte{0x22});
  std::fill(expect.begin() + 40 * 65536, expect.begin() + 41 * 65536, std::byte{0});
  for (uint64_t b = 0; b < 64; ++b)
    ASSERT_TRUE(SameBytes(Slice(got, b * 65536, 65536), Slice(expect, b * 65536, 65536)))
        << "block " << b << " differs after the simulated crash";
}

// Makes cache writes beyond `limit` bytes fail with EFBIG (RLIMIT_FSIZE),
// a deterministic stand-in for a cache write that fails or never happens.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(uint64_t limit) {
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &old_);
    rlimit r = old_;
    r.rlim_cur = limit;
    ::setrlimit(RLIMIT_FSIZE, &r);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    std::signal(SIGXFSZ, old_handler_);
  }

 private:
  rlimit old_{};
  void (*old_handler_)(int) = nullptr;
};

TEST_F(CopyOnReadTest, CrashSafetyFailedCacheWriteNeverSetsTheBit) {
  Init(4 * kMiB, 65536);  // the cache file is created (sparse) before the limit
  Snapshot snap;
  {
    FileSizeLimit limit(2 * kMiB);
    std::vector<std::byte> buf(4096);
    auto r = cor_->Read(buf, 3 * kMiB);  // fetched, but cannot be stored
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code(), EFBIG) << r.error().message();
    std::vector<std::byte> data(65536, std::byte{5});
    auto w = cor_->Write(data, 3 * kMiB + 65536, false);
    ASSERT_FALSE(w);
    EXPECT_EQ(w.error().code(), EFBIG);
    // A successful write forces a commit of everything pending.
    ASSERT_TRUE(cor_->Write(data, 0, false));
    ASSERT_TRUE(cor_->Flush());
    snap = TakeSnapshot(opts_);
  }
  EXPECT_TRUE(BitSet(snap, 0));
  EXPECT_FALSE(BitSet(snap, 48)) << "bit set for a block whose data never reached the cache";
  EXPECT_FALSE(BitSet(snap, 49)) << "bit set for a block whose write failed";
  EXPECT_EQ(cor_->Status().blocks_present, 1u);
  // Once the cache can be written again the same blocks work.
  EXPECT_TRUE(SameBytes(ReadAt(3 * kMiB, 4096), Slice(image_, 3 * kMiB, 4096)));
}

TEST_F(CopyOnReadTest, CrashSafetySurvivesARealKill9DuringFillAndWrites) {
  // A child process runs the proxy (fill on, guest writing full blocks) and
  // reports each acknowledged write on a pipe; the parent SIGKILLs it after
  // a while and checks the files it left behind.
  image_ = FakeRemote::PatternImage(16 * kMiB);
  opts_.cache_path = dir_ / "cache.img";
  opts_.bitmap_path = dir_ / "cache.bitmap";
  opts_.block_size = 65536;
  opts_.fill_on_start = true;
  opts_.fill_chunk_blocks = 2;
  constexpr uint64_t kFirstWritten = 100, kWrites = 100;
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    auto remote = std::make_unique<FakeRemote>(image_, 65536);
    {
      std::lock_guard lk(remote->shared()->mu);
      remote->shared()->delay = 3ms;
    }
    auto b = CopyOnReadBackend::Open(std::move(remote), opts_);
    if (!b) ::_exit(2);
    for (uint32_t i = 0; i < kWrites; ++i) {
      std::vector<std::byte> data(65536, std::byte(uint8_t(i + 1)));
      if (!(*b)->Write(data, (kFirstWritten + i) * 65536, false)) ::_exit(3);
      if (::write(fds[1], &i, sizeof i) != sizeof i) ::_exit(4);
      std::this_thread::sleep_for(1ms);
    }
    ::pause();  // wait to be killed
    ::_exit(0);
  }
  ::close(fds[1]);
  uint32_t acked = 0, idx;
  while (acked < 30 && ::read(fds[0], &idx, sizeof idx) == sizeof idx) acked = idx + 1;
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus)) << "child exited early with " << WEXITSTATUS(wstatus);
  while (::read(fds[0], &idx, sizeof idx) == sizeof idx) acked = idx + 1;
  ::close(fds[0]);
  ASSERT_GE(acked, 30u);

  auto snap = TakeSnapshot(opts_);
  uint64_t bits = 0;
  for (uint64_t b = 0; b < 256; ++b) {
    bool written = b >= kFirstWritten && b < kFirstWritten + kWrites;
    uint64_t i = b - kFirstWritten;
    if (written && i < acked) {
      ASSERT_TRUE(BitSet(snap, b)) << "acknowledged write to block " << b << " lost its bit";
    }
    if (!BitSet(snap, b)) continue;
    ++bits;
    auto cached = Slice(snap.cache, b * 65536, 65536);
    std::vector<std::byte> mine(65536, std::byte(uint8_t(i + 1)));
    if (written && i < acked) {
      ASSERT_TRUE(SameBytes(cached, mine)) << "acknowledged write to block " << b << " lost";
    } else if (written) {  // not acknowledged: the fill's copy or the write, nothing else
      ASSERT_TRUE(SameBytes(cached, mine) || SameBytes(cached, Slice(image_, b * 65536, 65536)))
          << "block " << b;
    } else {
      ASSERT_TRUE(SameBytes(Slice(snap.cache, b * 65536, 65536), Slice(image_, b * 65536, 65536)))
          << "bitmap claims fill block " << b << " but its data is wrong";
    }
  }
  EXPECT_GE(bits, acked);
  // The files reopen, and reads give the acknowledged writes.
  opts_.fill_on_start = false;
  OpenBackend();
  for (uint64_t i = 0; i < acked; ++i)
    ASSERT_EQ(ReadAt((kFirstWritten + i) * 65536, 65536),
              std::vector<std::byte>(65536, std::byte(uint8_t(i + 1))));
}

TEST_F(CopyOnReadTest, FillReportsALocalWriteErrorAndResumesAfterIt) {
  Init(4 * kMiB, 65536);
  {
    FileSizeLimit limit(2 * kMiB);  // the upper half of the cache cannot be written
    cor_->StartFill();
    ASSERT_TRUE(WaitUntil([&] { return cor_->Status().blocks_present == 32; }, 3s));
    ASSERT_TRUE(WaitUntil([&] { return !cor_->Status().last_error.empty(); }, 3s));
    auto st = cor_->Status();
    EXPECT_NE(st.last_error.find("storing fetched blocks in the cache"), std::string::npos)
        << st.last_error;
    EXPECT_FALSE(st.complete);
    EXPECT_TRUE(st.fill_running);
  }
  ASSERT_TRUE(WaitComplete(5s));
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(ReadFileBytes(opts_.cache_path), image_);
}

// The fill and NBD_CMD_CACHE store with O_DIRECT where the file system
// allows it, client misses through the page cache, and a tail that is not a
// multiple of 4096 bytes always through the page cache: whatever the path,
// the cache file and reads through the backend hold the remote's bytes.
TEST_F(CopyOnReadTest, FillAndCacheCommandStoreExactBytesOnEveryWritePath) {
  Init(2 * kMiB + 5000, 65536);  // 33 blocks, the last one 5000 bytes
  EXPECT_TRUE(SameBytes(ReadAt(70000, 3000), Slice(image_, 70000, 3000)));  // client miss
  ASSERT_TRUE(cor_->Cache(200000, 300000));                                 // prefetch
  std::vector<std::byte> data(4096, std::byte{7});
  ASSERT_TRUE(cor_->Write(data, 2 * kMiB - 4096, false));
  std::vector<std::byte> expected = image_;
  std::memcpy(expected.data() + 2 * kMiB - 4096, data.data(), data.size());
  cor_->StartFill();
  ASSERT_TRUE(WaitComplete());
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(ReadFileBytes(opts_.cache_path), expected);
  EXPECT_EQ(ReadAt(0, expected.size()), expected);
  for (uint64_t b = 0; b < 33; ++b) EXPECT_LE(ReadsOf(b), 1u) << b;
}

TEST_F(CopyOnReadTest, BlockSizeMayExceedTheTailOfTheImage) {
  Init(3 * 65536 + 1000, 65536);  // last block is 1000 bytes
  EXPECT_TRUE(SameBytes(ReadAt(3 * 65536, 1000), Slice(image_, 3 * 65536, 1000)));
  std::vector<std::byte> data(1000, std::byte{3});
  ASSERT_TRUE(cor_->Write(data, 3 * 65536, false));
  cor_->StartFill();
  ASSERT_TRUE(WaitComplete());
  ASSERT_TRUE(cor_->SwitchToTarget());
  EXPECT_EQ(ReadAt(3 * 65536, 1000), data);
}

// --- Write-behind of client misses ------------------------------------------

// Holds the cache writer before each write-behind store until opened.
class WriterGate {
 public:
  void Pass() {
    std::unique_lock lk(mu_);
    ++waiting_;
    cv_.notify_all();
    cv_.wait(lk, [&] { return open_; });
    --waiting_;
  }
  void Open() {
    std::lock_guard lk(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool WaitHeld(std::chrono::milliseconds timeout) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, timeout, [&] { return waiting_ > 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
  int waiting_ = 0;
};

class CopyOnReadWriteBehindTest : public CopyOnReadTest {
 protected:
  ~CopyOnReadWriteBehindTest() override { gate_->Open(); }  // never leave the writer stuck
  void InitGated(uint64_t image_size, uint32_t block_size, uint64_t queue_bytes = 64 * kMiB) {
    opts_.write_behind_bytes = queue_bytes;
    opts_.before_write_behind_store_for_test = [g = gate_] { g->Pass(); };
    Init(image_size, block_size);
  }
  std::shared_ptr<WriterGate> gate_ = std::make_shared<WriterGate>();
};

// A block-aligned miss is answered before its store; until the store is
// done the blocks stay claimed, so another reader waits for them instead of
// fetching again or reading the cache's hole.
TEST_F(CopyOnReadWriteBehindTest, ReadOfABlockWhoseStoreIsPendingWaitsAndIsCorrect) {
  InitGated(4 * kMiB, 65536);
  EXPECT_TRUE(SameBytes(ReadAt(2 * 65536, 2 * 65536), Slice(image_, 2 * 65536, 2 * 65536)));
  ASSERT_TRUE(gate_->WaitHeld(5s));
  EXPECT_EQ(cor_->Status().blocks_present, 0u);  // not stored yet, so not present
  EXPECT_FALSE(cor_->FileRangeFor(2 * 65536, 65536).has_value());
  auto again = std::async(std::launch::async, [&] { return ReadAt(2 * 65536 + 100, 70000); });
  EXPECT_EQ(again.wait_for(100ms), std::future_status::timeout)
      << "a read of a pending block finished while its store was still held";
  gate_->Open();
  EXPECT_TRUE(SameBytes(again.get(), Slice(image_, 2 * 65536 + 100, 70000)));
  EXPECT_EQ(ReadsOf(2), 1u);
  EXPECT_EQ(ReadsOf(3), 1u);
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(cor_->Status().blocks_present, 2u);
  EXPECT_TRUE(SameBytes(Slice(ReadFileBytes(opts_.cache_path), 2 * 65536, 2 * 65536),
                        Slice(image_, 2 * 65536, 2 * 65536)));
}

// A client write and a zero over blocks whose fetched data waits for the
// writer: they wait for the store, so the stale remote data never lands over
// them, and the cache ends up with the client's data.
TEST_F(CopyOnReadWriteBehindTest, ClientWriteOverAPendingStoreWins) {
  InitGated(4 * kMiB, 65536);
  EXPECT_TRUE(SameBytes(ReadAt(5 * 65536, 2 * 65536), Slice(image_, 5 * 65536, 2 * 65536)));
  ASSERT_TRUE(gate_->WaitHeld(5s));
  const std::vector<std::byte> mine(65536, std::byte{0x5a});
  auto w = std::async(std::launch::async, [&] { return cor_->Write(mine, 5 * 65536, false); });
  auto z = std::async(std::launch::async,
                      [&] { return cor_->Zero(6 * 65536, 65536, false, false, false); });
  EXPECT_EQ(w.wait_for(100ms), std::future_status::timeout)
      << "a write over a pending block did not wait for its store";
  gate_->Open();
  ASSERT_TRUE(w.get());
  ASSERT_TRUE(z.get());
  ASSERT_TRUE(cor_->Flush());
  auto cache = ReadFileBytes(opts_.cache_path);
  EXPECT_TRUE(SameBytes(Slice(cache, 5 * 65536, 65536), mine));
  EXPECT_TRUE(SameBytes(Slice(cache, 6 * 65536, 65536), std::vector<std::byte>(65536)));
  EXPECT_EQ(ReadAt(5 * 65536, 65536), mine);
  EXPECT_EQ(ReadAt(6 * 65536, 65536), std::vector<std::byte>(65536));
  EXPECT_EQ(ReadsOf(5), 1u);
}

// A miss larger than the whole queue is stored inline by the fetching
// thread (the blocks are present when the read returns); nothing is dropped.
TEST_F(CopyOnReadWriteBehindTest, RunLargerThanTheQueueIsStoredInlineAndLosesNothing) {
  InitGated(4 * kMiB, 65536, /*queue_bytes=*/2 * 65536);
  EXPECT_TRUE(SameBytes(ReadAt(0, 2 * 65536), Slice(image_, 0, 2 * 65536)));  // fills the queue
  ASSERT_TRUE(gate_->WaitHeld(5s));
  EXPECT_TRUE(SameBytes(ReadAt(8 * 65536, 3 * 65536), Slice(image_, 8 * 65536, 3 * 65536)));
  EXPECT_EQ(cor_->Status().blocks_present, 3u) << "the second read should have stored inline";
  gate_->Open();
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(cor_->Status().blocks_present, 5u);
  auto cache = ReadFileBytes(opts_.cache_path);
  EXPECT_TRUE(SameBytes(Slice(cache, 0, 2 * 65536), Slice(image_, 0, 2 * 65536)));
  EXPECT_TRUE(SameBytes(Slice(cache, 8 * 65536, 3 * 65536), Slice(image_, 8 * 65536, 3 * 65536)));
  EXPECT_EQ(Requests(), 2u);
}

// With the queue full, a miss that fits waits for room instead of storing
// inline beside the writer; it is answered once the writer moves on, and
// both runs end up in the cache.
TEST_F(CopyOnReadWriteBehindTest, FullQueueMakesTheNextMissWaitForRoom) {
  InitGated(4 * kMiB, 65536, /*queue_bytes=*/2 * 65536);
  EXPECT_TRUE(SameBytes(ReadAt(0, 2 * 65536), Slice(image_, 0, 2 * 65536)));  // fills the queue
  ASSERT_TRUE(gate_->WaitHeld(5s));
  auto next = std::async(std::launch::async, [&] { return ReadAt(8 * 65536, 65536); });
  EXPECT_EQ(next.wait_for(100ms), std::future_status::timeout)
      << "a miss was answered while the full queue had no room for it";
  EXPECT_EQ(cor_->Status().blocks_present, 0u) << "the waiting miss was stored inline";
  gate_->Open();
  EXPECT_TRUE(SameBytes(next.get(), Slice(image_, 8 * 65536, 65536)));
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(cor_->Status().blocks_present, 3u);
  auto cache = ReadFileBytes(opts_.cache_path);
  EXPECT_TRUE(SameBytes(Slice(cache, 0, 2 * 65536), Slice(image_, 0, 2 * 65536)));
  EXPECT_TRUE(SameBytes(Slice(cache, 8 * 65536, 65536), Slice(image_, 8 * 65536, 65536)));
}

// SwitchToTarget right after the last blocks were read waits for their
// stores instead of refusing (they are missing until stored).
TEST_F(CopyOnReadWriteBehindTest, SwitchToTargetWaitsForPendingStores) {
  InitGated(kMiB, 65536);
  EXPECT_EQ(ReadAt(0, kMiB), image_);
  ASSERT_TRUE(gate_->WaitHeld(5s));
  auto sw = std::async(std::launch::async, [&] { return cor_->SwitchToTarget(); });
  EXPECT_EQ(sw.wait_for(100ms), std::future_status::timeout)
      << "the switch answered before the pending stores were done";
  gate_->Open();
  auto s = sw.get();
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(cor_->Status().mode, "target");
  EXPECT_EQ(ReadFileBytes(opts_.cache_path), image_);
}

// Destroying the backend stores what is queued and commits its bits: after
// a reopen the blocks are present and need no fetch.
TEST_F(CopyOnReadWriteBehindTest, DestructionStoresAndCommitsPendingRuns) {
  InitGated(2 * kMiB, 65536);
  EXPECT_TRUE(SameBytes(ReadAt(0, kMiB), Slice(image_, 0, kMiB)));
  ASSERT_TRUE(gate_->WaitHeld(5s));
  auto gone = std::async(std::launch::async, [&] { cor_.reset(); });
  EXPECT_EQ(gone.wait_for(100ms), std::future_status::timeout);
  gate_->Open();
  gone.get();
  OpenBackend();
  EXPECT_EQ(cor_->Status().blocks_present, 16u);
  EXPECT_TRUE(SameBytes(ReadAt(0, kMiB), Slice(image_, 0, kMiB)));
  EXPECT_EQ(Requests(), 0u);
}

// A write-behind store that fails leaves the blocks missing (the reply had
// the right data already) and the error in the status; the next read of
// them fetches again and stores them.
TEST_F(CopyOnReadTest, FailedWriteBehindStoreLeavesBlocksMissingAndTheyAreFetchedAgain) {
  Init(4 * kMiB, 65536);
  {
    FileSizeLimit limit(2 * kMiB);
    EXPECT_TRUE(SameBytes(ReadAt(3 * kMiB, 2 * 65536), Slice(image_, 3 * kMiB, 2 * 65536)));
    ASSERT_TRUE(cor_->Flush());  // waits for the (failing) store
    auto st = cor_->Status();
    EXPECT_EQ(st.blocks_present, 0u);
    EXPECT_NE(st.last_error.find("storing fetched blocks in the cache"), std::string::npos)
        << st.last_error;
  }
  EXPECT_TRUE(SameBytes(ReadAt(3 * kMiB, 2 * 65536), Slice(image_, 3 * kMiB, 2 * 65536)));
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(cor_->Status().blocks_present, 2u);
  EXPECT_EQ(ReadsOf(48), 2u);
  EXPECT_TRUE(SameBytes(Slice(ReadFileBytes(opts_.cache_path), 3 * kMiB, 2 * 65536),
                        Slice(image_, 3 * kMiB, 2 * 65536)));
}

// --- PrepareFileRange: a miss the server will splice ------------------------

// The bytes of `range` (a file range) as the file holds them now.
std::vector<std::byte> PreadRange(const FileRange& range, uint64_t length) {
  std::vector<std::byte> got(length);
  ssize_t n = ::pread(range.fd, got.data(), got.size(), off_t(range.offset));
  EXPECT_EQ(n, ssize_t(length));
  return got;
}

TEST_F(CopyOnReadTest, PrepareFileRangeFetchesAMissOnceStraightIntoTheCacheFile) {
  Init(4 * kMiB, 65536);
  const uint64_t off = 2 * 65536 + 100, len = 3 * 65536;  // blocks 2-5
  EXPECT_FALSE(cor_->FileRangeFor(off, len).has_value());
  auto r = cor_->PrepareFileRange(off, len);
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_TRUE(r->has_value()) << "a prepared proxy range must name the cache file";
  EXPECT_EQ((*r)->offset, off);
  EXPECT_TRUE(SameBytes(PreadRange(**r, len), Slice(image_, off, len)));
  {
    std::lock_guard lk(remote_->mu);
    ASSERT_EQ(remote_->request_log.size(), 1u);  // the four blocks in one request
    EXPECT_EQ(remote_->request_log[0], std::make_pair(uint64_t(2 * 65536), uint64_t(4 * 65536)));
  }
  for (uint64_t b = 2; b < 6; ++b) EXPECT_EQ(ReadsOf(b), 1u) << b;
  EXPECT_EQ(cor_->Status().blocks_present, 4u);
  EXPECT_EQ(cor_->Status().bytes_fetched, 4u * 65536);

  // Present now: offered without preparing, and preparing again is free.
  auto again = cor_->FileRangeFor(off, len);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->fd, (*r)->fd);
  auto second = cor_->PrepareFileRange(2 * 65536, 4 * 65536);
  ASSERT_TRUE(second && second->has_value());
  EXPECT_TRUE(SameBytes(PreadRange(**second, 4 * 65536), Slice(image_, 2 * 65536, 4 * 65536)));
  EXPECT_TRUE(SameBytes(ReadAt(off, len), Slice(image_, off, len)));
  EXPECT_EQ(Requests(), 1u);

  // The cache image on disk holds the blocks, and they survive a restart.
  ASSERT_TRUE(cor_->Flush());
  EXPECT_TRUE(SameBytes(Slice(ReadFileBytes(opts_.cache_path), 2 * 65536, 4 * 65536),
                        Slice(image_, 2 * 65536, 4 * 65536)));
  cor_.reset();
  OpenBackend();
  EXPECT_EQ(cor_->Status().blocks_present, 4u);
  EXPECT_TRUE(cor_->FileRangeFor(off, len).has_value());
}

TEST_F(CopyOnReadTest, PrepareFileRangeFetchesOnlyTheMissingBlocksAndKeepsLocalWrites) {
  Init(4 * kMiB, 65536);
  const std::vector<std::byte> local(65536, std::byte{9});
  ASSERT_TRUE(cor_->Write(local, 65536, false));  // block 1 written here, never fetched
  auto r = cor_->PrepareFileRange(0, 3 * 65536);
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_TRUE(r->has_value());
  auto got = PreadRange(**r, 3 * 65536);
  EXPECT_TRUE(SameBytes(Slice(got, 0, 65536), Slice(image_, 0, 65536)));
  EXPECT_TRUE(SameBytes(Slice(got, 65536, 65536), local));
  EXPECT_TRUE(SameBytes(Slice(got, 2 * 65536, 65536), Slice(image_, 2 * 65536, 65536)));
  EXPECT_EQ(ReadsOf(0), 1u);
  EXPECT_EQ(ReadsOf(1), 0u);
  EXPECT_EQ(ReadsOf(2), 1u);
  EXPECT_EQ(cor_->Status().blocks_present, 3u);
}

TEST_F(CopyOnReadTest, PrepareFileRangeWithAFailingRemoteLeavesBlocksMissingAndTheReadFails) {
  FakeClock clock;
  Init(4 * kMiB, 65536, false, clock);
  // An error reply (EIO) might as well be the cache's: the server is sent to
  // Read(), which asks the remote once more and fails with its error. EIO
  // does not pause spliced misses (only errors the cache alone can cause do):
  // the last part below is spliced again at once.
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kIoError);
  auto r = cor_->PrepareFileRange(65536, 2 * 65536);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_FALSE(r->has_value());
  std::vector<std::byte> buf(2 * 65536);
  auto read = cor_->Read(buf, 65536);
  ASSERT_FALSE(read) << "a remote failure must be the read's error";
  EXPECT_EQ(read.error().code(), EIO) << read.error().message();
  EXPECT_FALSE(cor_->FileRangeFor(65536, 2 * 65536).has_value());
  EXPECT_FALSE(cor_->FileRangeFor(65536, 1).has_value());
  EXPECT_EQ(cor_->Status().blocks_present, 0u);
  EXPECT_FALSE(cor_->Status().last_error.empty());

  // The remote unreachable (its bounded wait ran out): that is the answer
  // at once, not a second wait through Read().
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kDisconnected);
  auto t = cor_->PrepareFileRange(65536, 2 * 65536);
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code(), ETIMEDOUT) << t.error().message();
  EXPECT_EQ(cor_->Status().blocks_present, 0u);

  // The claims were released: once the remote is back the same range works.
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kNone);
  auto ok = cor_->PrepareFileRange(65536, 2 * 65536);
  ASSERT_TRUE(ok) << ok.error().message();
  ASSERT_TRUE(ok->has_value());
  EXPECT_TRUE(SameBytes(PreadRange(**ok, 2 * 65536), Slice(image_, 65536, 2 * 65536)));
  EXPECT_EQ(cor_->Status().blocks_present, 2u);
}

// The cache's fdatasync fails once (a writeback error, which Linux reports
// once) and would succeed after: no bit may be written for the blocks stored
// before it, and no flush acknowledged, however often the committer retries.
TEST_F(CopyOnReadTest, AFailedCacheSyncIsNeverFollowedByBitsOrAnAcknowledgedFlush) {
  std::atomic<int> calls{0};
  opts_.cache_sync_for_test = [&calls](int) -> Status {
    return ++calls == 1 ? Fail(Error::Errno(EIO, "fdatasync cache")) : Ok();
  };
  Init(4 * kMiB, 65536);
  EXPECT_TRUE(SameBytes(ReadAt(0, 2 * 65536), Slice(image_, 0, 2 * 65536)));  // fetched, stored
  auto flush = cor_->Flush();
  ASSERT_FALSE(flush);
  EXPECT_EQ(flush.error().code(), EIO) << flush.error().message();
  // The committer runs every 0.5 s and retries a failed commit after 1 s.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  EXPECT_EQ(cor_->Status().blocks_committed, 0u) << "bits written after a failed cache sync";
  EXPECT_FALSE(cor_->Flush()) << "a flush acknowledged after a failed cache sync";
  EXPECT_EQ(calls.load(), 1);
  EXPECT_NE(cor_->Status().last_error.find("fdatasync"), std::string::npos)
      << cor_->Status().last_error;
}

TEST_F(CopyOnReadTest, PrepareFileRangeWhoseRemoteAnswersENOSPCDoesNotPauseSplicedMisses) {
  // ENOSPC is what a full cache disk gives, but here the remote answered it:
  // the read goes to Read() (and fails there with the remote's error), and
  // the cache is fine, so the next miss is spliced again at once.
  FakeClock clock;
  Init(4 * kMiB, 65536, false, clock);
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kNoSpace);
  auto r = cor_->PrepareFileRange(65536, 2 * 65536);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_FALSE(r->has_value());
  std::vector<std::byte> buf(2 * 65536);
  auto read = cor_->Read(buf, 65536);
  ASSERT_FALSE(read);
  EXPECT_EQ(read.error().code(), ENOSPC) << read.error().message();
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kNone);
  auto again = cor_->PrepareFileRange(65536, 2 * 65536);  // no clock advance
  ASSERT_TRUE(again) << again.error().message();
  ASSERT_TRUE(again->has_value()) << "a remote's ENOSPC paused spliced misses";
  EXPECT_TRUE(SameBytes(PreadRange(**again, 2 * 65536), Slice(image_, 65536, 2 * 65536)));
  EXPECT_EQ(cor_->Status().blocks_present, 2u);
}

TEST_F(CopyOnReadTest, PrepareFileRangeWhoseCacheWriteFailsFallsBackToReadAndPausesSplicedMisses) {
  // A full disk (here a file size limit) must not fail the client's read:
  // PrepareFileRange says "use Read()" and Read() answers from its buffer.
  FakeClock clock;
  Init(4 * kMiB, 65536, false, clock);  // the cache file is created (sparse) before the limit
  {
    FileSizeLimit limit(2 * kMiB);
    auto r = cor_->PrepareFileRange(3 * kMiB, 2 * 65536);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_FALSE(r->has_value()) << "a failed store must send the read to Read()";
    EXPECT_FALSE(cor_->FileRangeFor(3 * kMiB, 2 * 65536).has_value());
    EXPECT_EQ(cor_->Status().blocks_present, 0u);
    EXPECT_EQ(ReadsOf(48), 1u);
    EXPECT_TRUE(SameBytes(ReadAt(3 * kMiB, 2 * 65536), Slice(image_, 3 * kMiB, 2 * 65536)));
    ASSERT_TRUE(cor_->Flush());
    EXPECT_EQ(cor_->Status().blocks_present, 0u) << "the buffered store failed too";
    EXPECT_EQ(ReadsOf(48), 2u);
  }
  // Paused: a miss is not fetched into the cache, the server reads instead.
  auto paused = cor_->PrepareFileRange(3 * kMiB, 2 * 65536);
  ASSERT_TRUE(paused) << paused.error().message();
  EXPECT_FALSE(paused->has_value());
  EXPECT_EQ(ReadsOf(48), 2u);
  // Hits are not affected by the pause.
  ASSERT_TRUE(cor_->Cache(0, 65536));
  auto hit = cor_->PrepareFileRange(0, 65536);
  ASSERT_TRUE(hit) << hit.error().message();
  EXPECT_TRUE(hit->has_value());
  // After the pause, spliced misses resume.
  clock.Advance(std::chrono::seconds(6));
  auto r = cor_->PrepareFileRange(3 * kMiB, 2 * 65536);
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_TRUE(r->has_value());
  EXPECT_TRUE(SameBytes(PreadRange(**r, 2 * 65536), Slice(image_, 3 * kMiB, 2 * 65536)));
  EXPECT_EQ(ReadsOf(48), 3u);
}

TEST_F(CopyOnReadTest, ConcurrentPrepareFileRangeCallsFetchEachBlockOnce) {
  Init(4 * kMiB, 65536);
  FakeRemote::Hold(*remote_);
  const uint64_t off = 4 * 65536, len = 8 * 65536;
  std::vector<std::future<Result<std::optional<FileRange>>>> callers;
  for (int i = 0; i < 8; ++i)
    callers.push_back(std::async(std::launch::async, [&, i] {
      return cor_->PrepareFileRange(off + uint64_t(i) * 100, len - uint64_t(i) * 100);
    }));
  ASSERT_TRUE(FakeRemote::WaitHeld(*remote_, 1, 2s));
  std::this_thread::sleep_for(20ms);  // let the other callers pile up on the claims
  {
    std::lock_guard lk(remote_->mu);
    EXPECT_EQ(remote_->waiting, 1u);
  }
  FakeRemote::Release(*remote_);
  for (int i = 0; i < 8; ++i) {
    auto r = callers[size_t(i)].get();
    ASSERT_TRUE(r) << r.error().message();
    ASSERT_TRUE(r->has_value());
    const uint64_t o = off + uint64_t(i) * 100, n = len - uint64_t(i) * 100;
    EXPECT_EQ((*r)->offset, o);
    EXPECT_TRUE(SameBytes(PreadRange(**r, n), Slice(image_, o, n))) << i;
  }
  for (uint64_t b = 4; b < 12; ++b) EXPECT_EQ(ReadsOf(b), 1u) << b;
  EXPECT_EQ(Requests(), 1u);
}

TEST_F(CopyOnReadTest, ConcurrentOverlappingPrepareFileRangeAndReadFetchEachBlockOnce) {
  Init(8 * kMiB, 65536);
  {
    std::lock_guard lk(remote_->mu);
    remote_->jitter = std::chrono::microseconds(2000);  // replies out of order
  }
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t b = uint64_t(t); b < 100; b += 3) {
        const uint64_t off = b * 65536 + 7, len = 5 * 65536;
        if (t % 2 == 0) {
          auto r = cor_->PrepareFileRange(off, len);
          if (!r || !r->has_value() || !SameBytes(PreadRange(**r, len), Slice(image_, off, len)))
            ++bad;
        } else if (!SameBytes(ReadAt(off, len), Slice(image_, off, len))) {
          ++bad;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  ASSERT_TRUE(cor_->Flush());
  for (uint64_t b = 0; b < 105; ++b) EXPECT_EQ(ReadsOf(b), 1u) << "block " << b;
}

TEST_F(CopyOnReadTest, PrepareFileRangeOfThePartialTailBlockDoesNotGrowTheCache) {
  Init(3 * 65536 + 1000, 65536);  // last block is 1000 bytes
  auto r = cor_->PrepareFileRange(3 * 65536 + 10, 990);
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_TRUE(r->has_value());
  EXPECT_TRUE(SameBytes(PreadRange(**r, 990), Slice(image_, 3 * 65536 + 10, 990)));
  {
    std::lock_guard lk(remote_->mu);
    ASSERT_EQ(remote_->request_log.size(), 1u);
    EXPECT_EQ(remote_->request_log[0], std::make_pair(uint64_t(3 * 65536), uint64_t(1000)));
  }
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(ReadFileBytes(opts_.cache_path).size(), image_.size());
}

TEST_F(CopyOnReadTest, PrepareFileRangeAfterTheSwitchNeverAsksTheRemote) {
  Init(2 * kMiB, 65536);
  cor_->StartFill();
  ASSERT_TRUE(WaitComplete());
  ASSERT_TRUE(cor_->SwitchToTarget());
  const uint64_t before = Requests();
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kIoError);
  auto r = cor_->PrepareFileRange(100, 300000);
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_TRUE(r->has_value());
  EXPECT_TRUE(SameBytes(PreadRange(**r, 300000), Slice(image_, 100, 300000)));
  EXPECT_EQ(Requests(), before);
}

TEST_F(CopyOnReadTest, PrepareFileRangeDuringTheFillFetchesEveryBlockOnceAndTheCacheIsExact) {
  Init(16 * kMiB, 65536);
  {
    std::lock_guard lk(remote_->mu);
    remote_->jitter = std::chrono::microseconds(1000);
  }
  cor_->StartFill();
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t b = 254 - uint64_t(t); b >= 4; b -= 4) {  // against the fill's direction
        const uint64_t off = b * 65536 - 3000, len = 2 * 65536;
        auto r = cor_->PrepareFileRange(off, len);
        if (!r || !r->has_value() || !SameBytes(PreadRange(**r, len), Slice(image_, off, len)))
          ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  ASSERT_TRUE(WaitComplete(20s));
  ASSERT_TRUE(cor_->Flush());
  for (uint64_t b = 0; b < 256; ++b) EXPECT_EQ(ReadsOf(b), 1u) << "block " << b;
  EXPECT_TRUE(SameBytes(ReadFileBytes(opts_.cache_path), image_));
}

}  // namespace
}  // namespace kagemusha::storage

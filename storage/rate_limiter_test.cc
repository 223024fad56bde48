#include "rate_limiter.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "stepped_clock_for_test.h"

namespace kagemusha::storage {
namespace {

double Seconds(Clock::Duration d) { return std::chrono::duration<double>(d).count(); }

TEST(RateLimiter, SpacesChunksAtTheConfiguredRate) {
  FakeClock clock;
  RateLimiter limiter(clock, 1 << 20);  // 1 MiB/s
  auto start = clock.Now();
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(limiter.Acquire(1 << 20, nullptr));
  // The first chunk goes at once, each later one a second after the previous.
  EXPECT_NEAR(Seconds(clock.Now() - start), 9.0, 0.05);
}

TEST(RateLimiter, UnlimitedNeverWaits) {
  FakeClock clock;
  RateLimiter limiter(clock, 0);
  auto start = clock.Now();
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(limiter.Acquire(1 << 30, nullptr));
  EXPECT_EQ(clock.Now(), start);
}

TEST(RateLimiter, IdleTimeDoesNotBuildUpABurst) {
  FakeClock clock;
  RateLimiter limiter(clock, 1000);
  ASSERT_TRUE(limiter.Acquire(1000, nullptr));
  clock.Advance(std::chrono::seconds(100));
  auto t0 = clock.Now();
  ASSERT_TRUE(limiter.Acquire(1000, nullptr));
  ASSERT_TRUE(limiter.Acquire(1000, nullptr));
  EXPECT_NEAR(Seconds(clock.Now() - t0), 1.0, 0.05);
}

TEST(RateLimiter, CancelledWaitReturnsFalse) {
  FakeClock clock;
  RateLimiter limiter(clock, 10);
  ASSERT_TRUE(limiter.Acquire(1000, nullptr));  // reserves 100 s
  int polls = 0;
  EXPECT_FALSE(limiter.Acquire(10, [&] { return ++polls > 3; }));
}

TEST(RateLimiter, ConcurrentAcquirersShareTheRate) {
  // Four threads take 8 chunks of 256 KiB each at 1 MiB/s. On a SteppedClock
  // time moves only when every thread is asleep (or done), so each admission
  // happens at a known simulated instant, whatever the machine load.
  SteppedClock clock;
  RateLimiter limiter(clock, 1 << 20);
  constexpr int kThreads = 4, kChunks = 8;
  constexpr uint64_t kChunk = 256 << 10;
  std::mutex mu;
  std::vector<Clock::Duration> admitted;  // simulated time of each admission
  std::atomic<int> done{0};
  const auto start = clock.Now();
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&] {
      for (int i = 0; i < kChunks; ++i) {
        EXPECT_TRUE(limiter.Acquire(kChunk, nullptr));
        std::lock_guard lk(mu);
        admitted.push_back(clock.Now() - start);
      }
      ++done;
    });
  // Advance in 5 ms steps (the chunk cost, 250 ms, and the limiter's 20 ms
  // sleep slices are multiples of it) once every live thread sleeps.
  auto quiet = [&] { return clock.Asleep() + size_t(done.load()) == kThreads; };
  bool stuck = false;
  while (done.load() < kThreads && !stuck) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);  // liveness
    while (!quiet() && !(stuck = std::chrono::steady_clock::now() > deadline))
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    if (done.load() < kThreads && !stuck) clock.Advance(std::chrono::milliseconds(5));
  }
  ASSERT_FALSE(stuck) << "threads neither slept nor finished";
  for (auto& t : ts) t.join();
  ASSERT_EQ(admitted.size(), size_t(kThreads * kChunks));
  std::sort(admitted.begin(), admitted.end());
  // Chunk k starts exactly at k * 250 ms: never earlier (the rate holds with
  // four takers) and never later (the takers do not slow each other down).
  for (size_t k = 0; k < admitted.size(); ++k)
    EXPECT_EQ(admitted[k], std::chrono::milliseconds(250 * k)) << "chunk " << k;
  // So each simulated second admits exactly 1 MiB.
  std::map<int64_t, uint64_t> bytes_per_second;
  for (auto a : admitted)
    bytes_per_second[std::chrono::duration_cast<std::chrono::seconds>(a).count()] += kChunk;
  ASSERT_EQ(bytes_per_second.size(), 8u);
  for (auto [sec, bytes] : bytes_per_second) EXPECT_EQ(bytes, 1u << 20) << "second " << sec;
}

TEST(RateMeter, ReportsBytesPerSecondOverTheWindow) {
  FakeClock clock;
  RateMeter meter(clock, std::chrono::seconds(5));
  for (int i = 0; i < 10; ++i) {
    clock.Advance(std::chrono::seconds(1));
    meter.Add(2000);
  }
  EXPECT_NEAR(meter.Rate(), 2000.0, 450.0);  // 5 s window holds 5 or 6 samples
  clock.Advance(std::chrono::seconds(10));
  EXPECT_EQ(meter.Rate(), 0.0);
}

}  // namespace
}  // namespace kagemusha::storage

#include "rate_limiter.h"

#include <gtest/gtest.h>

#include <thread>

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
  FakeClock clock;
  RateLimiter limiter(clock, 1 << 20);
  auto start = clock.Now();
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&] {
      for (int i = 0; i < 8; ++i) ASSERT_TRUE(limiter.Acquire(256 << 10, nullptr));
    });
  for (auto& t : ts) t.join();
  // 32 chunks of 256 KiB = 8 MiB: the last starts at 7.75 s. Concurrent fake
  // sleepers can overshoot by a few slices.
  double secs = Seconds(clock.Now() - start);
  EXPECT_GE(secs, 7.74);
  EXPECT_LE(secs, 8.2);
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

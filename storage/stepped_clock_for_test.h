// SteppedClock: a test-only Clock whose time moves only when the test says so.
// Unlike FakeClock (where every SleepFor advances the shared time, so several
// concurrent sleepers make it jump unpredictably), a sleeper here blocks until
// the test has advanced the clock past its wake-up time. The test can wait
// until a given number of threads are asleep before it advances, so what
// happens at each simulated instant is deterministic whatever the machine load.
//
// Thread-safety: internally locked.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <set>

#include "kagemusha/common/clock.h"

namespace kagemusha::storage {

class SteppedClock final : public Clock {
 public:
  TimePoint Now() const override {
    std::lock_guard lk(mu_);
    return now_;
  }
  void SleepFor(Duration d) override {
    std::unique_lock lk(mu_);
    if (d <= Duration::zero()) return;
    const TimePoint until = now_ + d;
    sleepers_.insert(until);
    cv_.notify_all();
    cv_.wait(lk, [&] { return now_ >= until; });
  }
  // Moves time forward. Sleepers whose wake-up time has come stop counting as
  // asleep at once (before they actually run), so Asleep() never counts a
  // thread that is about to wake.
  void Advance(Duration d) {
    std::lock_guard lk(mu_);
    now_ += d;
    sleepers_.erase(sleepers_.begin(), sleepers_.upper_bound(now_));
    cv_.notify_all();
  }
  size_t Asleep() const {
    std::lock_guard lk(mu_);
    return sleepers_.size();
  }
  // Waits (real time, bounded) until at least n threads sleep on this clock.
  bool WaitAsleep(size_t n, std::chrono::milliseconds timeout) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, timeout, [&] { return sleepers_.size() >= n; });
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  TimePoint now_{};
  std::multiset<TimePoint> sleepers_;  // wake-up times of threads in SleepFor
};

}  // namespace kagemusha::storage

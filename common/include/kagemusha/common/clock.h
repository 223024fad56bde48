// Clock seam. Production code takes a Clock& so tests can drive time by hand
// (FakeClock) instead of sleeping.
//
// Thread-safety: SteadyClock is stateless; FakeClock is internally locked.
#pragma once

#include <chrono>
#include <mutex>

namespace kagemusha {

class Clock {
 public:
  using Duration = std::chrono::nanoseconds;
  using TimePoint = std::chrono::time_point<std::chrono::steady_clock, Duration>;
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
  // Real clocks block; FakeClock advances its own time instead.
  virtual void SleepFor(Duration d) = 0;
};

class SteadyClock final : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }
  void SleepFor(Duration d) override;
  static SteadyClock& Instance();
};

class FakeClock final : public Clock {
 public:
  TimePoint Now() const override {
    std::lock_guard lk(mu_);
    return now_;
  }
  void SleepFor(Duration d) override { Advance(d); }
  void Advance(Duration d) {
    std::lock_guard lk(mu_);
    now_ += d;
  }

 private:
  mutable std::mutex mu_;
  TimePoint now_{};
};

}  // namespace kagemusha

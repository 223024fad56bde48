// Token-bucket style rate limiting and rate measurement for the background
// fill, both driven by a Clock so tests can use FakeClock instead of sleeping.
//
// RateLimiter reserves transmission slots: a chunk of n bytes may start once
// the previous reservations have drained at `rate` bytes/s, so over any
// interval T at most rate*T + one chunk goes out. Idle time does not build up
// credit (no burst after a pause). Changing the rate wakes waiters so a
// raised limit takes effect at once.
//
// Thread-safety: both classes lock internally.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>

#include "kagemusha/common/clock.h"

namespace kagemusha::storage {

class RateLimiter {
 public:
  RateLimiter(Clock& clock, uint64_t bytes_per_second);
  void SetRate(uint64_t bytes_per_second);  // 0 = unlimited
  uint64_t rate() const;
  // Waits (via the clock, in slices of at most `slice`) until n bytes may go.
  // Returns false if `cancelled` became true while waiting.
  bool Acquire(uint64_t n, const std::function<bool()>& cancelled,
               Clock::Duration slice = std::chrono::milliseconds(20));

 private:
  Clock& clock_;
  mutable std::mutex mu_;
  uint64_t rate_;
  uint64_t epoch_ = 0;            // bumped by SetRate; invalidates reservations
  Clock::TimePoint next_free_{};  // when the reserved bytes have drained
};

// Bytes per second over a sliding window.
class RateMeter {
 public:
  explicit RateMeter(Clock& clock, Clock::Duration window = std::chrono::seconds(5));
  void Add(uint64_t bytes);
  double Rate() const;

 private:
  struct Sample {
    Clock::TimePoint at;
    uint64_t bytes;
  };
  void Trim(Clock::TimePoint now) const;
  Clock& clock_;
  const Clock::Duration window_;
  const Clock::TimePoint start_;
  mutable std::mutex mu_;
  mutable std::deque<Sample> samples_;
  mutable uint64_t sum_ = 0;
};

}  // namespace kagemusha::storage

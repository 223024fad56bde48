#include "rate_limiter.h"

#include <algorithm>

namespace kagemusha::storage {

RateLimiter::RateLimiter(Clock& clock, uint64_t bytes_per_second)
    : clock_(clock), rate_(bytes_per_second) {}

void RateLimiter::SetRate(uint64_t bytes_per_second) {
  std::lock_guard lk(mu_);
  rate_ = bytes_per_second;
  ++epoch_;
  next_free_ = clock_.Now();
}

uint64_t RateLimiter::rate() const {
  std::lock_guard lk(mu_);
  return rate_;
}

bool RateLimiter::Acquire(uint64_t n, const std::function<bool()>& cancelled,
                          Clock::Duration slice) {
  for (;;) {
    Clock::TimePoint ready;
    uint64_t epoch;
    {
      std::lock_guard lk(mu_);
      if (rate_ == 0) return true;
      auto now = clock_.Now();
      ready = std::max(next_free_, now);
      auto cost = std::chrono::duration_cast<Clock::Duration>(
          std::chrono::duration<double>(double(n) / double(rate_)));
      next_free_ = ready + cost;
      epoch = epoch_;
    }
    for (;;) {
      if (cancelled && cancelled()) return false;
      auto now = clock_.Now();
      if (now >= ready) return true;
      {
        std::lock_guard lk(mu_);
        if (epoch_ != epoch) break;  // rate changed: reserve again under the new rate
      }
      clock_.SleepFor(std::min<Clock::Duration>(ready - now, slice));
    }
  }
}

RateMeter::RateMeter(Clock& clock, Clock::Duration window)
    : clock_(clock), window_(window), start_(clock.Now()) {}

void RateMeter::Add(uint64_t bytes) {
  auto now = clock_.Now();
  std::lock_guard lk(mu_);
  samples_.push_back({now, bytes});
  sum_ += bytes;
  Trim(now);
}

void RateMeter::Trim(Clock::TimePoint now) const {
  while (!samples_.empty() && now - samples_.front().at > window_) {
    sum_ -= samples_.front().bytes;
    samples_.pop_front();
  }
}

double RateMeter::Rate() const {
  auto now = clock_.Now();
  std::lock_guard lk(mu_);
  Trim(now);
  // Early on, divide by the time since start rather than the full window.
  auto span = std::min<Clock::Duration>(window_, now - start_);
  double secs = std::chrono::duration<double>(span).count();
  if (secs < 0.05) secs = 0.05;
  return double(sum_) / secs;
}

}  // namespace kagemusha::storage

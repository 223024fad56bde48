#include "wanem_shaper.h"

#include <algorithm>

namespace kagemusha::wanem {

LinkShaper::LinkShaper(const ShaperConfig& config)
    : config_(config), rng_(config.seed), lose_(std::clamp(config.loss, 0.0, 1.0)) {}

Nanos LinkShaper::SerializationTime(size_t frame_bytes) const {
  if (config_.rate_bps == 0) return Nanos{0};
  // frame_bytes <= 64 KiB, so bits * 1e9 stays far below 2^64.
  const uint64_t bits = static_cast<uint64_t>(frame_bytes + kEthernetWireOverhead) * 8;
  return Nanos{static_cast<int64_t>(bits * 1'000'000'000ULL / config_.rate_bps)};
}

Decision LinkShaper::Admit(TimePoint arrival, size_t frame_bytes) {
  if (config_.loss > 0.0 && lose_(rng_)) return {Verdict::kDropLoss, {}};
  if (config_.rate_bps == 0) return {Verdict::kForward, arrival + config_.delay};

  const TimePoint start = std::max(arrival, busy_until_);
  const Nanos serialize = SerializationTime(frame_bytes);
  // Bits still waiting in front of this frame, converted back to bytes. A frame
  // is always accepted by an idle link, whatever the limit.
  const auto backlog_ns = static_cast<uint64_t>((start - arrival).count());
  // (double: backlog_ns * rate_bps can exceed 2^64 for multi-second queues.)
  const double backlog_bytes =
      static_cast<double>(backlog_ns) * 1e-9 * static_cast<double>(config_.rate_bps) / 8.0;
  if (backlog_ns > 0 &&
      backlog_bytes + static_cast<double>(frame_bytes) > static_cast<double>(config_.queue_bytes)) {
    return {Verdict::kDropQueue, {}};
  }
  busy_until_ = start + serialize;
  return {Verdict::kForward, busy_until_ + config_.delay};
}

}  // namespace kagemusha::wanem

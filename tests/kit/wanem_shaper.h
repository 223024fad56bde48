// LinkShaper: the pure timing model of one direction of an emulated WAN link.
//
// A frame that arrives at time t is either dropped (random loss, or tail drop
// at a full bottleneck queue) or given a release time at which the forwarder
// puts it on the far interface. The model is a FIFO bottleneck of fixed rate
// followed by a fixed propagation delay:
//
//   arrival --> [loss] --> [drop-tail queue | serializer at rate R] --> delay D --> release
//
// The serializer is tracked in virtual time (busy_until_), which is equivalent
// to a token bucket whose depth is one frame plus a bounded backlog: a frame
// may start serializing when the previous one is done; the backlog in front of
// it is (busy_until_ - arrival) * R, and a frame that would push the backlog
// over the queue limit is tail-dropped, like a router's output queue.
// Release times are non-decreasing, so the forwarder's queue is a plain FIFO.
//
// No clock is read here: callers pass the arrival time. That keeps the model
// deterministic and unit-testable (wanem_shaper_test.cc).
//
// Thread-safety: none; one LinkShaper per direction, used by one thread.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <random>

namespace kagemusha::wanem {

using Nanos = std::chrono::nanoseconds;
using TimePoint = std::chrono::time_point<std::chrono::steady_clock, Nanos>;

// Bytes an Ethernet frame costs on the wire beyond what a packet socket sees:
// preamble + SFD (8), FCS (4) and the inter-frame gap (12). Counting them makes
// --rate-mbit 100 behave like a real 100 Mbit/s Ethernet bottleneck.
inline constexpr size_t kEthernetWireOverhead = 24;

struct ShaperConfig {
  Nanos delay{0};            // one-way propagation delay
  uint64_t rate_bps = 0;     // 0 = no rate limit
  uint64_t queue_bytes = 0;  // backlog limit in front of the serializer (rate_bps > 0)
  double loss = 0.0;         // probability in [0, 1] that a frame is lost
  uint64_t seed = 1;         // seed of the loss generator
};

enum class Verdict { kForward, kDropLoss, kDropQueue };

struct Decision {
  Verdict verdict = Verdict::kForward;
  TimePoint release{};  // meaningful for kForward only
};

class LinkShaper {
 public:
  explicit LinkShaper(const ShaperConfig& config);

  // Decides the fate of a frame of `frame_bytes` (as seen by a packet socket,
  // i.e. destination MAC to end of payload) arriving at `arrival`.
  // REQUIRES: arrival times are non-decreasing across calls.
  Decision Admit(TimePoint arrival, size_t frame_bytes);

  // Time the serializer needs for a frame of this size (0 without a rate).
  Nanos SerializationTime(size_t frame_bytes) const;

  const ShaperConfig& config() const { return config_; }

 private:
  ShaperConfig config_;
  TimePoint busy_until_{};
  std::mt19937_64 rng_;
  std::bernoulli_distribution lose_;
};

}  // namespace kagemusha::wanem

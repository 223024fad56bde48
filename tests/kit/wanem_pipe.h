// DirectionPipe: one direction of the emulated WAN link (port `in` to port
// `out`), run by one dedicated thread.
//
// Frames are received in batches straight into a ring of fixed-size slots,
// stamped by the LinkShaper with a release time (or dropped), and sent in
// batches once their release time has come. Because the shaper's release
// times never decrease, the ring is the delay line: the oldest frame is always
// the next one due. The ring bounds memory (--queue-frames); a full ring drops
// new frames and counts them as `drop_overflow` (raise the limit if that
// happens without a rate limit: it means the delay-bandwidth product is bigger
// than the ring).
//
// Timing: the thread sleeps in ppoll() until the next frame is due or a frame
// arrives. Frames are never released early; they may leave up to
// PipeConfig::timer_slack late (the thread's timer slack), which is what
// batches sends at high packet rates: the larger the slack, the more frames
// one wake-up releases with one sendmmsg.
//
// Thread-safety: Run() on one thread; stats() may be read from any thread.
#pragma once

#include <sys/socket.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kagemusha/common/clock.h"
#include "kagemusha/common/error.h"
#include "wanem_port.h"
#include "wanem_shaper.h"

namespace kagemusha::wanem {

struct DirectionStats {
  std::atomic<uint64_t> rx_frames{0};
  std::atomic<uint64_t> rx_bytes{0};
  std::atomic<uint64_t> tx_frames{0};
  std::atomic<uint64_t> tx_bytes{0};
  std::atomic<uint64_t> drop_loss{0};      // random loss (--loss)
  std::atomic<uint64_t> drop_queue{0};     // tail drop at the rate-limited bottleneck
  std::atomic<uint64_t> drop_overflow{0};  // delay line (ring) full
  std::atomic<uint64_t> drop_oversize{0};  // frame larger than a slot (offloads left on?)
  std::atomic<uint64_t> drop_down{0};      // lost while the link was cut (SetLinkUp(false))
  std::atomic<uint64_t> tx_errors{0};      // the kernel refused a frame on send
  std::atomic<uint64_t> csum_partial{0};  // frames with an unfinished L4 checksum (peer offload on)
  std::atomic<uint64_t> vlan_restored{0};  // frames whose stripped VLAN tag was put back
  std::atomic<uint64_t> max_frame{0};      // largest frame seen, bytes
  std::atomic<uint64_t> queued{0};         // frames in the delay line now
};

struct PipeConfig {
  size_t slots = 16384;      // delay-line capacity in frames
  size_t slot_bytes = 2048;  // per-frame buffer; frames above it are dropped
  size_t batch = 64;         // frames per recvmmsg/sendmmsg
  Nanos timer_slack{std::chrono::microseconds(100)};  // max lateness of a release
};

class DirectionPipe {
 public:
  DirectionPipe(std::string label, PacketPort& in, PacketPort& out, const ShaperConfig& shaper,
                const PipeConfig& config, Clock& clock);

  // Forwards frames until `stop` becomes true (checked at least every 100 ms).
  // Returns an error if a socket fails for good (e.g. the interface vanished).
  Status Run(const std::atomic<bool>& stop);

  const std::string& label() const { return label_; }
  const DirectionStats& stats() const { return stats_; }

  // Cuts or restores the link (any thread). While cut, arriving frames and
  // frames still in flight are lost, like on a severed cable; the bottleneck
  // queue empties as it would behind a dead link.
  void SetLinkUp(bool up) { link_up_.store(up, std::memory_order_relaxed); }

 private:
  struct Slot {
    uint32_t len = 0;
    TimePoint release{};
  };

  std::byte* SlotData(uint64_t seq) {
    return data_.get() + (seq % config_.slots) * config_.slot_bytes;
  }
  Slot& SlotMeta(uint64_t seq) { return slots_[seq % config_.slots]; }
  // Reads one batch; returns how many frames were read (dropped ones too).
  Result<size_t> ReceiveBatch();
  // Reads the frame's auxdata: puts a VLAN tag the kernel stripped back into
  // the frame (updating len; false if it no longer fits) and counts frames
  // whose checksum the sender left to an offload we do not have.
  bool ApplyAuxData(const msghdr& hdr, std::byte* frame, size_t& len);
  Status ReleaseDue(TimePoint now);

  std::string label_;
  PacketPort& in_;
  PacketPort& out_;
  LinkShaper shaper_;
  PipeConfig config_;
  Clock& clock_;
  DirectionStats stats_;

  // Ring of frames: [head_, tail_) are waiting, as monotonically increasing
  // sequence numbers (index = seq % slots). The extra `batch` slots past the
  // ring are a scratch area used to drain the socket when the ring is full.
  std::unique_ptr<std::byte[]> data_;
  std::vector<Slot> slots_;
  uint64_t head_ = 0;
  uint64_t tail_ = 0;
  std::vector<mmsghdr> msgs_;
  std::vector<iovec> iovs_;
  std::vector<uint64_t> control_;  // per-message cmsg buffers (8-byte aligned)
  size_t control_words_ = 0;       // uint64_t words per message
  bool warned_csum_ = false;
  std::atomic<bool> link_up_{true};
};

}  // namespace kagemusha::wanem

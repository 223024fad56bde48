#include "wanem_pipe.h"

#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <poll.h>
#include <sys/prctl.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace kagemusha::wanem {
namespace {

constexpr Nanos kIdlePoll{std::chrono::milliseconds(100)};

void Add(std::atomic<uint64_t>& counter, uint64_t n) {
  counter.fetch_add(n, std::memory_order_relaxed);
}

bool IsFatalSendError(int code) {
  return code == ENXIO || code == ENODEV || code == ENETDOWN || code == EBADF;
}

}  // namespace

DirectionPipe::DirectionPipe(std::string label, PacketPort& in, PacketPort& out,
                             const ShaperConfig& shaper, const PipeConfig& config, Clock& clock)
    : label_(std::move(label)),
      in_(in),
      out_(out),
      shaper_(shaper),
      config_(config),
      clock_(clock),
      // Not zero-filled: pages are touched only as the delay line fills.
      data_(std::make_unique_for_overwrite<std::byte[]>((config.slots + config.batch) *
                                                        config.slot_bytes)),
      slots_(config.slots),
      msgs_(config.batch),
      iovs_(config.batch),
      control_words_((PacketPort::kAuxDataSpace + 7) / 8) {
  control_.resize(control_words_ * config.batch);
}

Status DirectionPipe::Run(const std::atomic<bool>& stop) {
  // The kernel may fire our ppoll timeout up to this much late (>= 1 ns).
  (void)::prctl(PR_SET_TIMERSLACK,
                static_cast<unsigned long>(std::max<int64_t>(config_.timer_slack.count(), 1)));
  pollfd pfd{in_.rx_fd(), POLLIN, 0};
  bool backlog = false;  // the last receive filled a whole batch: read again without polling
  while (!stop.load(std::memory_order_relaxed)) {
    TimePoint now = clock_.Now();
    if (auto s = ReleaseDue(now); !s) return s;
    if (backlog) {
      auto got = ReceiveBatch();
      if (!got) return Fail(got.error());
      backlog = *got == config_.batch;
      continue;
    }

    Nanos wait = kIdlePoll;
    if (head_ != tail_) wait = std::clamp(SlotMeta(head_).release - now, Nanos{0}, kIdlePoll);
    timespec ts{static_cast<time_t>(wait.count() / 1'000'000'000),
                static_cast<long>(wait.count() % 1'000'000'000)};
    const int r = ::ppoll(&pfd, 1, &ts, nullptr);
    if (r < 0) {
      if (errno == EINTR) continue;
      return Fail(Error::Errno(errno, label_ + ": ppoll"));
    }
    if (r > 0) {
      if (pfd.revents & POLLNVAL) return Fail(Error::Io(label_ + ": receive socket closed"));
      auto got = ReceiveBatch();
      if (!got) return Fail(got.error());
      backlog = *got == config_.batch;
    }
  }
  return Ok();
}

Result<size_t> DirectionPipe::ReceiveBatch() {
  const uint64_t free_slots = config_.slots - (tail_ - head_);
  const bool overflow = free_slots == 0;
  const size_t want = overflow ? config_.batch : std::min<size_t>(config_.batch, free_slots);
  for (size_t i = 0; i < want; ++i) {
    // When the ring is full, read into the scratch area past the ring just to
    // count and discard, so the kernel socket does not silently overflow.
    std::byte* buf =
        overflow ? data_.get() + (config_.slots + i) * config_.slot_bytes : SlotData(tail_ + i);
    iovs_[i] = {buf, config_.slot_bytes};
    std::memset(&msgs_[i], 0, sizeof(mmsghdr));
    msgs_[i].msg_hdr.msg_iov = &iovs_[i];
    msgs_[i].msg_hdr.msg_iovlen = 1;
    msgs_[i].msg_hdr.msg_control = &control_[i * control_words_];
    msgs_[i].msg_hdr.msg_controllen = control_words_ * 8;
  }
  auto got = in_.Receive(std::span(msgs_.data(), want));
  if (!got) return Fail(got.error().Context(label_));
  const int n = *got;
  if (n == 0) return 0;
  const TimePoint now = clock_.Now();

  uint64_t kept = 0;  // frames kept so far in this batch, compacted at tail_
  uint64_t bytes = 0;
  for (int i = 0; i < n; ++i) {
    size_t len = msgs_[i].msg_len;
    bytes += len;
    if (len > stats_.max_frame.load(std::memory_order_relaxed))
      stats_.max_frame.store(len, std::memory_order_relaxed);
    if (overflow) {
      Add(stats_.drop_overflow, 1);
      continue;
    }
    if ((msgs_[i].msg_hdr.msg_flags & MSG_TRUNC) || len > config_.slot_bytes ||
        !ApplyAuxData(msgs_[i].msg_hdr, SlotData(tail_ + static_cast<uint64_t>(i)), len)) {
      Add(stats_.drop_oversize, 1);
      continue;
    }
    if (!link_up_.load(std::memory_order_relaxed)) {
      Add(stats_.drop_down, 1);
      continue;
    }
    const Decision d = shaper_.Admit(now, len);
    if (d.verdict == Verdict::kDropLoss) {
      Add(stats_.drop_loss, 1);
      continue;
    }
    if (d.verdict == Verdict::kDropQueue) {
      Add(stats_.drop_queue, 1);
      continue;
    }
    // Keep frames contiguous in the ring: move this one down over the
    // dropped ones (rare: only after a drop in the same batch).
    if (kept != static_cast<uint64_t>(i))
      std::memmove(SlotData(tail_ + kept), SlotData(tail_ + i), len);
    Slot& slot = SlotMeta(tail_ + kept);
    slot.len = static_cast<uint32_t>(len);
    slot.release = d.release;
    ++kept;
  }
  tail_ += kept;
  Add(stats_.rx_frames, static_cast<uint64_t>(n));
  Add(stats_.rx_bytes, bytes);
  stats_.queued.store(tail_ - head_, std::memory_order_relaxed);
  return static_cast<size_t>(n);
}

bool DirectionPipe::ApplyAuxData(const msghdr& hdr, std::byte* frame, size_t& len) {
  for (const cmsghdr* c = CMSG_FIRSTHDR(&hdr); c != nullptr;
       c = CMSG_NXTHDR(const_cast<msghdr*>(&hdr), const_cast<cmsghdr*>(c))) {
    if (c->cmsg_level != SOL_PACKET || c->cmsg_type != PACKET_AUXDATA) continue;
    tpacket_auxdata aux;
    std::memcpy(&aux, CMSG_DATA(c), sizeof aux);
    if (aux.tp_status & TP_STATUS_CSUMNOTREADY) {
      Add(stats_.csum_partial, 1);
      if (!warned_csum_) {
        warned_csum_ = true;
        std::fprintf(stderr,
                     "kagemusha-wanem: %s: frames with unfinished checksums arrive (transmit "
                     "checksum offload of "
                     "the sending peer is on); they will be dropped by their receiver. Run "
                     "`kagemusha-wanem --offloads-off IF` on the peer interface.\n",
                     label_.c_str());
      }
    }
    if ((aux.tp_status & TP_STATUS_VLAN_VALID) && len >= 12) {
      // Re-insert the 802.1Q tag after the two MAC addresses.
      if (len + 4 > config_.slot_bytes) return false;
      const uint16_t tpid =
          (aux.tp_status & TP_STATUS_VLAN_TPID_VALID) ? aux.tp_vlan_tpid : ETH_P_8021Q;
      const uint16_t tag[2] = {htons(tpid), htons(aux.tp_vlan_tci)};
      std::memmove(frame + 16, frame + 12, len - 12);
      std::memcpy(frame + 12, tag, sizeof tag);
      len += 4;
      Add(stats_.vlan_restored, 1);
    }
  }
  return true;
}

Status DirectionPipe::ReleaseDue(TimePoint now) {
  if (!link_up_.load(std::memory_order_relaxed)) {
    // In flight when the link was cut: lost.
    while (head_ != tail_ && SlotMeta(head_).release <= now) {
      Add(stats_.drop_down, 1);
      ++head_;
    }
    stats_.queued.store(tail_ - head_, std::memory_order_relaxed);
    return Ok();
  }
  while (head_ != tail_) {
    size_t k = 0;
    uint64_t bytes = 0;
    while (k < config_.batch && head_ + k != tail_ && SlotMeta(head_ + k).release <= now) {
      const Slot& slot = SlotMeta(head_ + k);
      iovs_[k] = {SlotData(head_ + k), slot.len};
      std::memset(&msgs_[k], 0, sizeof(mmsghdr));
      msgs_[k].msg_hdr.msg_iov = &iovs_[k];
      msgs_[k].msg_hdr.msg_iovlen = 1;
      bytes += slot.len;
      ++k;
    }
    if (k == 0) break;
    auto sent = out_.Send(std::span(msgs_.data(), k));
    if (!sent) {
      if (IsFatalSendError(sent.error().code())) return Fail(sent.error().Context(label_));
      // ENOBUFS, EMSGSIZE, ...: a real link loses the frame too. Skip it.
      Add(stats_.tx_errors, 1);
      ++head_;
      continue;
    }
    uint64_t sent_bytes = bytes;
    if (static_cast<size_t>(*sent) < k) {
      sent_bytes = 0;
      for (int i = 0; i < *sent; ++i) sent_bytes += SlotMeta(head_ + static_cast<uint64_t>(i)).len;
    }
    head_ += static_cast<uint64_t>(*sent);
    Add(stats_.tx_frames, static_cast<uint64_t>(*sent));
    Add(stats_.tx_bytes, sent_bytes);
  }
  stats_.queued.store(tail_ - head_, std::memory_order_relaxed);
  return Ok();
}

}  // namespace kagemusha::wanem

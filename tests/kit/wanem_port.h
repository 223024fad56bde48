// PacketPort: one network interface opened at layer 2 for the WAN emulator.
//
// A port owns two AF_PACKET sockets bound to the interface:
//  - a receive socket (ETH_P_ALL, promiscuous, PACKET_IGNORE_OUTGOING so the
//    frames we transmit ourselves are not read back, which would loop them);
//  - a transmit socket bound with protocol 0, which therefore receives nothing.
// Frames are moved in batches with recvmmsg/sendmmsg.
//
// Offloads: a veth peer with TSO/GSO enabled hands over frames far larger than
// the MTU (the stack segments only at a device that lacks the feature). Such
// frames cannot be re-sent through a packet socket (EMSGSIZE). The emulator
// therefore turns GRO/LRO off on its own interfaces, and the test-bed turns
// TSO/GSO and transmit checksum offload off on the interfaces that transmit
// into the emulator (a CHECKSUM_PARTIAL frame would be re-sent with an
// unfinished checksum), with
// SetOffloads() below (`kagemusha-wanem --offloads-off IF`), so no ethtool
// binary is needed. Oversized frames that still arrive are counted and dropped.
//
// Thread-safety: Receive() and Send() may be called from different threads
// (they use different sockets); each from one thread at a time.
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <span>
#include <string>

#include "kagemusha/common/error.h"

namespace kagemusha::wanem {

class PacketPort {
 public:
  static const size_t kAuxDataSpace;

  static Result<PacketPort> Open(const std::string& ifname);

  PacketPort(PacketPort&& other) noexcept;
  PacketPort& operator=(PacketPort&&) = delete;
  PacketPort(const PacketPort&) = delete;
  ~PacketPort();

  const std::string& name() const { return name_; }
  int mtu() const { return mtu_; }
  int rx_fd() const { return rx_fd_; }

  // Non-blocking batch receive into msgs (iovecs prepared by the caller; give
  // each a control buffer of kAuxDataSpace bytes to get its tpacket_auxdata).
  // Returns the number of frames read, 0 when none is pending.
  Result<int> Receive(std::span<mmsghdr> msgs);
  // Sends the frames; returns how many the kernel took (>= 1 unless an error).
  Result<int> Send(std::span<mmsghdr> msgs);
  // Frames the kernel dropped on the receive socket since the previous call
  // (PACKET_STATISTICS resets on read).
  uint64_t TakeKernelDrops();

 private:
  PacketPort(std::string name, int ifindex, int mtu, int rx_fd, int tx_fd)
      : name_(std::move(name)), ifindex_(ifindex), mtu_(mtu), rx_fd_(rx_fd), tx_fd_(tx_fd) {}

  std::string name_;
  int ifindex_ = 0;
  int mtu_ = 0;
  int rx_fd_ = -1;
  int tx_fd_ = -1;
};

// Turns the named offload features on or off for an interface of the current
// network namespace (legacy ETHTOOL_S{TSO,GSO,GRO,SG,...} ioctls, which the
// kernel maps onto netdev features). Features the driver cannot change are
// skipped silently; other failures are errors.
Status SetOffloads(const std::string& ifname, bool enable);

}  // namespace kagemusha::wanem

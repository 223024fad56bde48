// Packet I/O for the tunnel module: the OS seams between the mobility logic
// (host-side session, home agent) and the kernel.
//
//   TapDevice        an Ethernet TAP (IFF_TAP|IFF_NO_PI, optionally
//                    IFF_VNET_HDR) that can be brought up and enslaved to a
//                    bridge: how a host speaks on a VM's link as its router.
//   PacketSocket     AF_PACKET bound to one interface with a classic BPF
//                    filter: how BUs (HAO) and BAs (RH2) are received, since
//                    the kernel without CONFIG_IPV6_MIP6 drops them. Can also
//                    send whole Ethernet frames.
//   RawIpv6Socket    a raw IPv6 socket for one protocol (41: IPv6-in-IPv6, 4:
//                    IPv4-in-IPv6) bound to a local address: the kernel adds
//                    and strips the outer header, so sends and receives carry
//                    only the inner packet. Batched with sendmmsg/recvmmsg.
//   Ipv6RawSender    IPPROTO_RAW (IPV6_HDRINCL): sends a complete IPv6 packet
//                    we built ourselves (a BU with a Home Address option, a
//                    BA with a type 2 routing header).
//   SuppressMobilityIcmpErrors  an nftables table that keeps the kernel from
//                    answering HAO/RH2 packets with ICMP Parameter Problem.
//
// Everything the mobility logic calls goes through the small interfaces
// PacketSink, PacketSource and Ipv6DatagramSink, so unit tests swap in
// FakePacketPort (in memory, records what was sent, replays what is queued).
//
// Data path rules: no exceptions, no allocation per packet in the real
// implementations (callers own the receive buffers); EAGAIN is "nothing now",
// not an error. All sockets and the TAP are non-blocking; fd() is for poll.
//
// Thread-safety: one object per thread; the fake is internally locked so a
// test may inspect it from another thread.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/ip_packet.h"

namespace kagemusha::tunnel {

// GSO/checksum metadata of IFF_VNET_HDR (struct virtio_net_hdr, 10 bytes).
struct VnetHeader {
  uint8_t flags = 0;     // VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
  uint8_t gso_type = 0;  // 0 none, 1 TCPv4, 3 UDP, 4 TCPv6, 0x80 ECN
  uint16_t hdr_len = 0;
  uint16_t gso_size = 0;
  uint16_t csum_start = 0;
  uint16_t csum_offset = 0;
};

// One receive slot. The caller owns `storage`; a receive fills `length` and
// the metadata its source knows about.
struct PacketBuffer {
  std::span<uint8_t> storage;
  size_t length = 0;
  // RawIpv6Socket: the outer source and destination addresses.
  Ipv6Address peer{};
  Ipv6Address local{};
  // PacketSocket: the interface index the frame arrived on.
  int ifindex = 0;
  // TapDevice with vnet_hdr: the header that preceded the frame.
  VnetHeader vnet{};

  std::span<const uint8_t> data() const { return storage.first(length); }
};

// A reusable set of receive buffers backed by one allocation.
class PacketBufferPool {
 public:
  PacketBufferPool(size_t count, size_t buffer_size);
  std::span<PacketBuffer> buffers() { return buffers_; }

 private:
  std::vector<uint8_t> memory_;
  std::vector<PacketBuffer> buffers_;
};

// Somewhere whole packets (or frames) go. The destination is fixed by the
// implementation: a TAP, a connected tunnel socket, an interface.
class PacketSink {
 public:
  virtual ~PacketSink() = default;
  virtual Status Send(std::span<const uint8_t> packet) = 0;
  // Sends in order; returns how many went out before the first failure (the
  // failure itself is returned only if none went out).
  virtual Result<size_t> SendBatch(std::span<const std::span<const uint8_t>> packets);
};

// Somewhere packets come from.
class PacketSource {
 public:
  virtual ~PacketSource() = default;
  // For poll(2); -1 for sources that are not file descriptors (fakes).
  virtual int fd() const = 0;
  // Fills up to buffers.size() slots without blocking and returns how many;
  // 0 when nothing is pending. A packet longer than its slot is truncated
  // to the slot and reported with length == storage.size() + 1 so callers
  // can count and drop it.
  virtual Result<size_t> Receive(std::span<PacketBuffer> buffers) = 0;
};

// Datagrams to a per-call IPv6 destination (a home agent sends each binding's
// traffic to its own care-of address).
class Ipv6DatagramSink {
 public:
  virtual ~Ipv6DatagramSink() = default;
  virtual Status SendTo(const Ipv6Address& dst, std::span<const uint8_t> packet) = 0;
  virtual Result<size_t> SendBatchTo(const Ipv6Address& dst,
                                     std::span<const std::span<const uint8_t>> packets);
};

// Interface helpers (ioctl-based; no external tools).
Result<int> InterfaceIndex(const std::string& name);
Result<MacAddress> InterfaceMac(const std::string& name);
Result<int> InterfaceMtu(const std::string& name);
Status SetInterfaceUp(const std::string& name, bool up);
Status SetInterfaceMtu(const std::string& name, int mtu);
// Generic receive offload (SIOCETHTOOL ETHTOOL_GGRO / ETHTOOL_SGRO).
Result<bool> InterfaceGro(const std::string& name);
Status SetInterfaceGro(const std::string& name, bool on);
// Enslaves `interface` to the Linux bridge `bridge` (SIOCBRADDIF).
Status AttachToBridge(const std::string& interface, const std::string& bridge);

// ---- TAP ---------------------------------------------------------------------

struct TapOptions {
  std::string name;    // requested name ("" lets the kernel pick tapN); max 15 chars
  std::string bridge;  // enslave to this bridge if not empty
  bool up = true;
  std::optional<int> mtu;
  // IFF_VNET_HDR: every frame is preceded by a 10-byte virtio_net_hdr. With
  // `offloads`, the kernel may hand us GSO super-frames and unchecksummed
  // packets (TUNSETOFFLOAD CSUM|TSO4|TSO6); the caller must then handle them.
  bool vnet_hdr = false;
  bool offloads = false;
  // Keep the device after close (TUNSETPERSIST); off: it vanishes with the fd.
  bool persist = false;
};

class TapDevice final : public PacketSink, public PacketSource {
 public:
  static Result<std::unique_ptr<TapDevice>> Open(const TapOptions& options);
  ~TapDevice() override;
  TapDevice(const TapDevice&) = delete;
  TapDevice& operator=(const TapDevice&) = delete;

  const std::string& name() const { return name_; }
  int fd() const override { return fd_; }
  // Writes one frame (a zero vnet header is prepended when vnet_hdr is on).
  Status Send(std::span<const uint8_t> frame) override;
  // One read(2) per frame (a TAP has no recvmmsg).
  Result<size_t> Receive(std::span<PacketBuffer> buffers) override;
  // Removes a persistent device (TUNSETPERSIST 0) when the fd closes.
  Status ClearPersist();

 private:
  TapDevice(int fd, std::string name, bool vnet_hdr)
      : fd_(fd), name_(std::move(name)), vnet_hdr_(vnet_hdr) {}
  int fd_ = -1;
  std::string name_;
  bool vnet_hdr_ = false;
};

// ---- AF_PACKET with classic BPF -------------------------------------------------

// One classic BPF instruction (struct sock_filter).
struct BpfInstruction {
  uint16_t code = 0;
  uint8_t jt = 0;
  uint8_t jf = 0;
  uint32_t k = 0;
};
using BpfProgram = std::vector<BpfInstruction>;

// Accepts untagged IPv6 frames whose first Next Header (in the fixed IPv6
// header) is one of `next_headers`, optionally only when the IPv6
// destination equals `destination`. E.g. {43, 135} for a mobile host (BA with
// RH2, BRR), {60} for a home agent (BU with HAO).
BpfProgram BpfIpv6NextHeaderFilter(std::span<const uint8_t> next_headers,
                                   std::optional<Ipv6Address> destination = std::nullopt);
// Accepts every frame with this EtherType (untagged).
BpfProgram BpfEtherTypeFilter(uint16_t ether_type);
// Runs a program over a frame in user space (the kernel's semantics for the
// instructions the builders above emit); returns the accepted length, 0 for
// drop. For unit tests of filters.
uint32_t RunBpf(const BpfProgram& program, std::span<const uint8_t> frame);

struct PacketSocketOptions {
  std::string interface;
  uint16_t protocol = 0x0003;    // ETH_P_ALL; or e.g. ethertype::kIpv6
  BpfProgram filter;             // empty: no filter
  bool ignore_outgoing = true;   // PACKET_IGNORE_OUTGOING: do not see our own sends
  int receive_buffer_bytes = 0;  // SO_RCVBUF if > 0
};

class PacketSocket final : public PacketSink, public PacketSource {
 public:
  static Result<std::unique_ptr<PacketSocket>> Open(const PacketSocketOptions& options);
  ~PacketSocket() override;
  PacketSocket(const PacketSocket&) = delete;
  PacketSocket& operator=(const PacketSocket&) = delete;

  int fd() const override { return fd_; }
  int ifindex() const { return ifindex_; }
  // Sends a complete Ethernet frame out of the bound interface.
  Status Send(std::span<const uint8_t> frame) override;
  Result<size_t> SendBatch(std::span<const std::span<const uint8_t>> frames) override;
  Result<size_t> Receive(std::span<PacketBuffer> buffers) override;

 private:
  PacketSocket(int fd, int ifindex) : fd_(fd), ifindex_(ifindex) {}
  int fd_ = -1;
  int ifindex_ = 0;
};

// ---- Raw IPv6 tunnel socket (kernel builds the outer header) -------------------

struct RawIpv6SocketOptions {
  uint8_t protocol = ipproto::kIpv6;        // 41 (IPv6 inner) or 4 (IPv4 inner)
  std::optional<Ipv6Address> bind_address;  // the outer source (care-of / HA address)
  std::optional<Ipv6Address> connect_to;    // fixes the destination for Send()
  std::string bind_device;                  // SO_BINDTODEVICE if not empty
  // false: the kernel fragments outer packets larger than the path MTU
  // (IPV6_PMTUDISC_DONT; RFC 2473 §7.1 allows tunnel-entry fragmentation);
  // true: such sends fail with EMSGSIZE.
  bool path_mtu_discovery = false;
  int receive_buffer_bytes = 0;
  int send_buffer_bytes = 0;
};

class RawIpv6Socket final : public PacketSink, public PacketSource, public Ipv6DatagramSink {
 public:
  static Result<std::unique_ptr<RawIpv6Socket>> Open(const RawIpv6SocketOptions& options);
  ~RawIpv6Socket() override;
  RawIpv6Socket(const RawIpv6Socket&) = delete;
  RawIpv6Socket& operator=(const RawIpv6Socket&) = delete;

  int fd() const override { return fd_; }
  uint8_t protocol() const { return protocol_; }
  // Send/SendBatch need connect_to. The payload is the inner packet only.
  Status Send(std::span<const uint8_t> inner) override;
  Result<size_t> SendBatch(std::span<const std::span<const uint8_t>> inner) override;
  Status SendTo(const Ipv6Address& dst, std::span<const uint8_t> inner) override;
  Result<size_t> SendBatchTo(const Ipv6Address& dst,
                             std::span<const std::span<const uint8_t>> inner) override;
  // recvmmsg: each slot gets the inner packet, peer = outer source, local =
  // outer destination.
  Result<size_t> Receive(std::span<PacketBuffer> buffers) override;

 private:
  RawIpv6Socket(int fd, uint8_t protocol, std::optional<Ipv6Address> connected)
      : fd_(fd), protocol_(protocol), connected_(connected) {}
  int fd_ = -1;
  uint8_t protocol_ = 0;
  std::optional<Ipv6Address> connected_;
};

// ---- Complete IPv6 packets we built (IPPROTO_RAW, IPV6_HDRINCL) ---------------

class Ipv6RawSender final : public PacketSink {
 public:
  // `bind_device` (optional) pins the egress interface.
  static Result<std::unique_ptr<Ipv6RawSender>> Open(const std::string& bind_device = {});
  ~Ipv6RawSender() override;
  Ipv6RawSender(const Ipv6RawSender&) = delete;
  Ipv6RawSender& operator=(const Ipv6RawSender&) = delete;
  // `packet` is a whole IPv6 packet; it is routed by its destination address.
  Status Send(std::span<const uint8_t> packet) override;

 private:
  explicit Ipv6RawSender(int fd) : fd_(fd) {}
  int fd_ = -1;
};

// ---- nftables ------------------------------------------------------------------

// Installs (replacing) table `inet <table>` in the current network namespace
// that drops, in the input hook (before the kernel's extension-header
// processing), locally delivered IPv6 packets with a type 2 routing header or
// a Mobility Header behind a Destination Options header (the HAO carrier), so
// the kernel neither discards them noisily nor answers with ICMPv6 Parameter
// Problem. AF_PACKET sockets still see them (they tap in before netfilter),
// also on a bridge with br_netfilter on (which runs prerouting, not input,
// for bridged frames). Runs `nft -f -`.
Status SuppressMobilityIcmpErrors(const std::string& table = "kagemusha_mip6");
Status RemoveNftTable(const std::string& table = "kagemusha_mip6");

// ---- In-memory fake ------------------------------------------------------------

// A sink and source for unit tests: Send/SendTo record copies; Receive
// replays queued packets. Internally locked.
class FakePacketPort final : public PacketSink, public PacketSource, public Ipv6DatagramSink {
 public:
  struct Sent {
    std::optional<Ipv6Address> dst;  // set by SendTo
    std::vector<uint8_t> bytes;
  };
  int fd() const override { return -1; }
  Status Send(std::span<const uint8_t> packet) override;
  Status SendTo(const Ipv6Address& dst, std::span<const uint8_t> packet) override;
  Result<size_t> Receive(std::span<PacketBuffer> buffers) override;

  // Test controls.
  void Queue(std::vector<uint8_t> packet, Ipv6Address peer = {}, Ipv6Address local = {});
  std::vector<Sent> TakeSent();
  size_t sent_count() const;
  // Makes the next `n` sends fail with `error`.
  void FailNextSends(size_t n, Error error);

 private:
  struct Incoming {
    std::vector<uint8_t> bytes;
    Ipv6Address peer{};
    Ipv6Address local{};
  };
  mutable std::mutex mu_;
  std::vector<Sent> sent_;
  std::deque<Incoming> incoming_;
  size_t fail_next_ = 0;
  Error fail_error_;
};

}  // namespace kagemusha::tunnel

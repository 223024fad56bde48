// Real and fake implementations of the packet I/O seams (packet_io.h).
#include "kagemusha/tunnel/packet_io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/ethtool.h>
#include <linux/filter.h>
#include <linux/if.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

namespace kagemusha::tunnel {
namespace {

constexpr size_t kVnetHeaderSize = 10;
constexpr size_t kMaxBatch = 64;

Result<ifreq> NamedRequest(const std::string& name) {
  ifreq ifr{};
  if (name.empty() || name.size() >= IFNAMSIZ)
    return Fail(Error::Invalid("interface name '" + name + "' is empty or longer than 15"));
  std::memcpy(ifr.ifr_name, name.data(), name.size());
  return ifr;
}

// A throwaway datagram socket for interface ioctls.
class IoctlSocket {
 public:
  IoctlSocket() : fd_(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)) {}
  ~IoctlSocket() {
    if (fd_ >= 0) close(fd_);
  }
  IoctlSocket(const IoctlSocket&) = delete;
  IoctlSocket& operator=(const IoctlSocket&) = delete;
  Status Run(unsigned long request, ifreq& ifr, const std::string& what) {
    if (fd_ < 0) return Fail(Error::Errno(errno, "socket for ioctl"));
    if (ioctl(fd_, request, &ifr) < 0) return Fail(Error::Errno(errno, what));
    return Ok();
  }

 private:
  int fd_;
};

sockaddr_in6 MakeSockaddr(const Ipv6Address& a) {
  sockaddr_in6 sa{};
  sa.sin6_family = AF_INET6;
  std::memcpy(&sa.sin6_addr, a.data(), 16);
  return sa;
}

Ipv6Address FromSockaddr(const sockaddr_in6& sa) {
  Ipv6Address a{};
  std::memcpy(a.data(), &sa.sin6_addr, 16);
  return a;
}

}  // namespace

// ---- Pool and default batch methods -------------------------------------------

PacketBufferPool::PacketBufferPool(size_t count, size_t buffer_size)
    : memory_(count * buffer_size), buffers_(count) {
  for (size_t i = 0; i < count; ++i)
    buffers_[i].storage = std::span<uint8_t>(memory_.data() + i * buffer_size, buffer_size);
}

Result<size_t> PacketSink::SendBatch(std::span<const std::span<const uint8_t>> packets) {
  size_t sent = 0;
  for (const auto& p : packets) {
    auto st = Send(p);
    if (!st) {
      if (sent == 0) return Fail(st.error());
      break;
    }
    ++sent;
  }
  return sent;
}

Result<size_t> Ipv6DatagramSink::SendBatchTo(const Ipv6Address& dst,
                                             std::span<const std::span<const uint8_t>> packets) {
  size_t sent = 0;
  for (const auto& p : packets) {
    auto st = SendTo(dst, p);
    if (!st) {
      if (sent == 0) return Fail(st.error());
      break;
    }
    ++sent;
  }
  return sent;
}

// ---- Interface helpers --------------------------------------------------------

Result<int> InterfaceIndex(const std::string& name) {
  auto ifr = NamedRequest(name);
  if (!ifr) return Fail(ifr.error());
  IoctlSocket s;
  if (auto st = s.Run(SIOCGIFINDEX, *ifr, "interface " + name); !st) return Fail(st.error());
  return ifr->ifr_ifindex;
}

Result<MacAddress> InterfaceMac(const std::string& name) {
  auto ifr = NamedRequest(name);
  if (!ifr) return Fail(ifr.error());
  IoctlSocket s;
  if (auto st = s.Run(SIOCGIFHWADDR, *ifr, "hardware address of " + name); !st)
    return Fail(st.error());
  MacAddress mac{};
  std::memcpy(mac.data(), ifr->ifr_hwaddr.sa_data, 6);
  return mac;
}

Result<int> InterfaceMtu(const std::string& name) {
  auto ifr = NamedRequest(name);
  if (!ifr) return Fail(ifr.error());
  IoctlSocket s;
  if (auto st = s.Run(SIOCGIFMTU, *ifr, "MTU of " + name); !st) return Fail(st.error());
  return ifr->ifr_mtu;
}

Status SetInterfaceUp(const std::string& name, bool up) {
  auto ifr = NamedRequest(name);
  if (!ifr) return Fail(ifr.error());
  IoctlSocket s;
  if (auto st = s.Run(SIOCGIFFLAGS, *ifr, "flags of " + name); !st) return st;
  if (up)
    ifr->ifr_flags |= IFF_UP;
  else
    ifr->ifr_flags &= ~IFF_UP;
  return s.Run(SIOCSIFFLAGS, *ifr, std::string("setting ") + name + (up ? " up" : " down"));
}

Status SetInterfaceMtu(const std::string& name, int mtu) {
  auto ifr = NamedRequest(name);
  if (!ifr) return Fail(ifr.error());
  ifr->ifr_mtu = mtu;
  IoctlSocket s;
  return s.Run(SIOCSIFMTU, *ifr, "setting MTU of " + name);
}

Result<bool> InterfaceGro(const std::string& name) {
  auto ifr = NamedRequest(name);
  if (!ifr) return Fail(ifr.error());
  ethtool_value v{};
  v.cmd = ETHTOOL_GGRO;
  ifr->ifr_data = reinterpret_cast<char*>(&v);
  IoctlSocket s;
  if (auto st = s.Run(SIOCETHTOOL, *ifr, "GRO state of " + name); !st) return Fail(st.error());
  return v.data != 0;
}

Status SetInterfaceGro(const std::string& name, bool on) {
  auto ifr = NamedRequest(name);
  if (!ifr) return Fail(ifr.error());
  ethtool_value v{};
  v.cmd = ETHTOOL_SGRO;
  v.data = on ? 1 : 0;
  ifr->ifr_data = reinterpret_cast<char*>(&v);
  IoctlSocket s;
  return s.Run(SIOCETHTOOL, *ifr,
               std::string("turning GRO ") + (on ? "on" : "off") + " on " + name);
}

Status AttachToBridge(const std::string& interface, const std::string& bridge) {
  auto index = InterfaceIndex(interface);
  if (!index) return Fail(index.error());
  auto ifr = NamedRequest(bridge);
  if (!ifr) return Fail(ifr.error());
  ifr->ifr_ifindex = *index;
  IoctlSocket s;
  return s.Run(SIOCBRADDIF, *ifr, "adding " + interface + " to bridge " + bridge);
}

// ---- TAP -------------------------------------------------------------------------

Result<std::unique_ptr<TapDevice>> TapDevice::Open(const TapOptions& options) {
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return Fail(Error::Errno(errno, "opening /dev/net/tun"));
  ifreq ifr{};
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (options.vnet_hdr ? IFF_VNET_HDR : 0);
  if (options.name.size() >= IFNAMSIZ) {
    close(fd);
    return Fail(Error::Invalid("TAP name '" + options.name + "' longer than 15"));
  }
  std::memcpy(ifr.ifr_name, options.name.data(), options.name.size());
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    int e = errno;
    close(fd);
    return Fail(Error::Errno(e, "TUNSETIFF " + options.name));
  }
  std::unique_ptr<TapDevice> tap(new TapDevice(fd, ifr.ifr_name, options.vnet_hdr));
  if (options.persist && ioctl(fd, TUNSETPERSIST, 1) < 0)
    return Fail(Error::Errno(errno, "TUNSETPERSIST " + tap->name_));
  if (options.vnet_hdr) {
    int size = static_cast<int>(kVnetHeaderSize);
    if (ioctl(fd, TUNSETVNETHDRSZ, &size) < 0)
      return Fail(Error::Errno(errno, "TUNSETVNETHDRSZ " + tap->name_));
    unsigned offloads = options.offloads ? (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) : 0;
    if (ioctl(fd, TUNSETOFFLOAD, offloads) < 0)
      return Fail(Error::Errno(errno, "TUNSETOFFLOAD " + tap->name_));
  }
  if (options.mtu) {
    if (auto st = SetInterfaceMtu(tap->name_, *options.mtu); !st) return Fail(st.error());
  }
  if (!options.bridge.empty()) {
    if (auto st = AttachToBridge(tap->name_, options.bridge); !st) return Fail(st.error());
  }
  if (options.up) {
    if (auto st = SetInterfaceUp(tap->name_, true); !st) return Fail(st.error());
  }
  return tap;
}

TapDevice::~TapDevice() {
  if (fd_ >= 0) close(fd_);
}

Status TapDevice::ClearPersist() {
  if (ioctl(fd_, TUNSETPERSIST, 0) < 0) return Fail(Error::Errno(errno, "TUNSETPERSIST 0"));
  return Ok();
}

Status TapDevice::Send(std::span<const uint8_t> frame) {
  ssize_t n;
  if (vnet_hdr_) {
    static const uint8_t kZero[kVnetHeaderSize] = {};
    iovec iov[2] = {{const_cast<uint8_t*>(kZero), kVnetHeaderSize},
                    {const_cast<uint8_t*>(frame.data()), frame.size()}};
    n = writev(fd_, iov, 2);
  } else {
    n = write(fd_, frame.data(), frame.size());
  }
  if (n < 0) return Fail(Error::Errno(errno, "writing to TAP " + name_));
  return Ok();
}

Result<size_t> TapDevice::Receive(std::span<PacketBuffer> buffers) {
  size_t count = 0;
  for (auto& b : buffers) {
    ssize_t n;
    if (vnet_hdr_) {
      uint8_t hdr[kVnetHeaderSize];
      iovec iov[2] = {{hdr, kVnetHeaderSize}, {b.storage.data(), b.storage.size()}};
      n = readv(fd_, iov, 2);
      if (n >= static_cast<ssize_t>(kVnetHeaderSize)) {
        b.vnet.flags = hdr[0];
        b.vnet.gso_type = hdr[1];
        // virtio_net_hdr fields are in the guest's (here: host) byte order.
        std::memcpy(&b.vnet.hdr_len, hdr + 2, 2);
        std::memcpy(&b.vnet.gso_size, hdr + 4, 2);
        std::memcpy(&b.vnet.csum_start, hdr + 6, 2);
        std::memcpy(&b.vnet.csum_offset, hdr + 8, 2);
        n -= kVnetHeaderSize;
      } else if (n >= 0) {
        n = 0;
      }
    } else {
      n = read(fd_, b.storage.data(), b.storage.size());
    }
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      if (count > 0) break;
      return Fail(Error::Errno(errno, "reading TAP " + name_));
    }
    b.length = static_cast<size_t>(n);
    ++count;
  }
  return count;
}

// ---- BPF ---------------------------------------------------------------------------

namespace {
BpfInstruction Stmt(uint16_t code, uint32_t k) { return {code, 0, 0, k}; }
BpfInstruction Jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) { return {code, jt, jf, k}; }
constexpr uint32_t kAcceptAll = 0x40000;  // the kernel caps at the frame length
}  // namespace

BpfProgram BpfEtherTypeFilter(uint16_t ether_type) {
  return {Stmt(BPF_LD | BPF_H | BPF_ABS, 12), Jump(BPF_JMP | BPF_JEQ | BPF_K, ether_type, 0, 1),
          Stmt(BPF_RET | BPF_K, kAcceptAll), Stmt(BPF_RET | BPF_K, 0)};
}

BpfProgram BpfIpv6NextHeaderFilter(std::span<const uint8_t> next_headers,
                                   std::optional<Ipv6Address> destination) {
  // Layout: [ethertype check] [destination: 4 word compares] [nh compares]
  // [accept] [drop]. Jumps are relative, so build then patch offsets.
  BpfProgram p;
  p.push_back(Stmt(BPF_LD | BPF_H | BPF_ABS, 12));
  p.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, ethertype::kIpv6, 0, 0));  // jf -> drop
  std::vector<size_t> to_drop = {1};
  if (destination) {
    for (int w = 0; w < 4; ++w) {
      uint32_t word = (uint32_t{(*destination)[w * 4]} << 24) |
                      (uint32_t{(*destination)[w * 4 + 1]} << 16) |
                      (uint32_t{(*destination)[w * 4 + 2]} << 8) | (*destination)[w * 4 + 3];
      p.push_back(Stmt(BPF_LD | BPF_W | BPF_ABS, 14 + 24 + 4 * w));
      p.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, word, 0, 0));
      to_drop.push_back(p.size() - 1);
    }
  }
  p.push_back(Stmt(BPF_LD | BPF_B | BPF_ABS, 14 + 6));
  std::vector<size_t> to_accept;
  for (uint8_t nh : next_headers) {
    p.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, nh, 0, 0));
    to_accept.push_back(p.size() - 1);
  }
  p.push_back(Stmt(BPF_RET | BPF_K, 0));  // no next header matched
  size_t accept = p.size();
  p.push_back(Stmt(BPF_RET | BPF_K, kAcceptAll));
  size_t drop = p.size();
  p.push_back(Stmt(BPF_RET | BPF_K, 0));
  for (size_t i : to_drop) p[i].jf = static_cast<uint8_t>(drop - i - 1);
  for (size_t i : to_accept) p[i].jt = static_cast<uint8_t>(accept - i - 1);
  return p;
}

uint32_t RunBpf(const BpfProgram& program, std::span<const uint8_t> frame) {
  uint32_t a = 0;
  size_t pc = 0;
  while (pc < program.size()) {
    const auto& in = program[pc];
    switch (in.code) {
      case BPF_LD | BPF_W | BPF_ABS:
        if (in.k + 4 > frame.size()) return 0;
        a = (uint32_t{frame[in.k]} << 24) | (uint32_t{frame[in.k + 1]} << 16) |
            (uint32_t{frame[in.k + 2]} << 8) | frame[in.k + 3];
        break;
      case BPF_LD | BPF_H | BPF_ABS:
        if (in.k + 2 > frame.size()) return 0;
        a = (uint32_t{frame[in.k]} << 8) | frame[in.k + 1];
        break;
      case BPF_LD | BPF_B | BPF_ABS:
        if (in.k + 1 > frame.size()) return 0;
        a = frame[in.k];
        break;
      case BPF_JMP | BPF_JEQ | BPF_K:
        pc += (a == in.k) ? in.jt : in.jf;
        break;
      case BPF_RET | BPF_K:
        return std::min<uint32_t>(in.k, static_cast<uint32_t>(frame.size()));
      default:
        return 0;  // not emitted by our builders
    }
    ++pc;
  }
  return 0;
}

// ---- AF_PACKET ---------------------------------------------------------------------

Result<std::unique_ptr<PacketSocket>> PacketSocket::Open(const PacketSocketOptions& options) {
  auto index = InterfaceIndex(options.interface);
  if (!index) return Fail(index.error());
  // Protocol 0 at socket() and the real one at bind(): a socket created with
  // a protocol is already hooked in, and bind() must then wait for an RCU
  // grace period to re-hook it (8 ms median, 21 ms max here, against 0.08 ms),
  // which every activate and home would pay. Nothing is received before bind.
  int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return Fail(Error::Errno(errno, "AF_PACKET socket"));
  std::unique_ptr<PacketSocket> s(new PacketSocket(fd, *index));
  {
    // TP_STATUS_CSUMNOTREADY tells which frames still lack their TCP/UDP
    // checksum (a local or veth sender left it to an offload).
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_AUXDATA, &one, sizeof one) < 0)
      return Fail(Error::Errno(errno, "PACKET_AUXDATA"));
  }
  if (!options.filter.empty()) {
    std::vector<sock_filter> code;
    code.reserve(options.filter.size());
    for (const auto& i : options.filter) code.push_back({i.code, i.jt, i.jf, i.k});
    sock_fprog prog{static_cast<unsigned short>(code.size()), code.data()};
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) < 0)
      return Fail(Error::Errno(errno, "SO_ATTACH_FILTER"));
  }
  if (options.ignore_outgoing) {
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0)
      return Fail(Error::Errno(errno, "PACKET_IGNORE_OUTGOING"));
  }
  if (options.receive_buffer_bytes > 0) {
    int v = options.receive_buffer_bytes;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
  }
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(options.protocol);
  sll.sll_ifindex = *index;
  if (bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll) < 0)
    return Fail(Error::Errno(errno, "binding AF_PACKET to " + options.interface));
  // Frames that arrived between socket() and SO_ATTACH_FILTER/bind may have
  // bypassed the filter; drain them.
  uint8_t scratch[64];
  while (recv(fd, scratch, sizeof scratch, MSG_DONTWAIT | MSG_TRUNC) >= 0) {
  }
  return s;
}

PacketSocket::~PacketSocket() {
  if (fd_ >= 0) close(fd_);
}

Status PacketSocket::Send(std::span<const uint8_t> frame) {
  if (frame.size() < kEthernetHeaderSize) return Fail(Error::Invalid("frame shorter than 14"));
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_ifindex = ifindex_;
  sll.sll_halen = 6;
  std::memcpy(sll.sll_addr, frame.data(), 6);
  if (sendto(fd_, frame.data(), frame.size(), 0, reinterpret_cast<sockaddr*>(&sll), sizeof sll) < 0)
    return Fail(Error::Errno(errno, "AF_PACKET send"));
  return Ok();
}

Result<size_t> PacketSocket::SendBatch(std::span<const std::span<const uint8_t>> frames) {
  size_t done = 0;
  while (done < frames.size()) {
    const size_t n = std::min(frames.size() - done, kMaxBatch);
    std::array<mmsghdr, kMaxBatch> msgs{};
    std::array<iovec, kMaxBatch> iov{};
    sockaddr_ll sll{};
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = ifindex_;
    sll.sll_halen = 6;
    for (size_t i = 0; i < n; ++i) {
      auto f = frames[done + i];
      iov[i] = {const_cast<uint8_t*>(f.data()), f.size()};
      msgs[i].msg_hdr.msg_iov = &iov[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
      msgs[i].msg_hdr.msg_name = &sll;  // the kernel takes the address from the header
      msgs[i].msg_hdr.msg_namelen = sizeof sll;
    }
    int r = sendmmsg(fd_, msgs.data(), static_cast<unsigned>(n), 0);
    if (r < 0) {
      if (done == 0) return Fail(Error::Errno(errno, "AF_PACKET sendmmsg"));
      break;
    }
    done += static_cast<size_t>(r);
    if (static_cast<size_t>(r) < n) break;
  }
  return done;
}

Result<size_t> PacketSocket::Receive(std::span<PacketBuffer> buffers) {
  size_t done = 0;
  while (done < buffers.size()) {
    const size_t n = std::min(buffers.size() - done, kMaxBatch);
    std::array<mmsghdr, kMaxBatch> msgs{};
    std::array<iovec, kMaxBatch> iov{};
    std::array<sockaddr_ll, kMaxBatch> from{};
    union Control {
      cmsghdr align;
      char bytes[CMSG_SPACE(sizeof(tpacket_auxdata))];
    };
    std::array<Control, kMaxBatch> control{};
    for (size_t i = 0; i < n; ++i) {
      auto& b = buffers[done + i];
      iov[i] = {b.storage.data(), b.storage.size()};
      msgs[i].msg_hdr.msg_iov = &iov[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
      msgs[i].msg_hdr.msg_name = &from[i];
      msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_ll);
      msgs[i].msg_hdr.msg_control = control[i].bytes;
      msgs[i].msg_hdr.msg_controllen = sizeof control[i].bytes;
    }
    int r = recvmmsg(fd_, msgs.data(), static_cast<unsigned>(n), MSG_DONTWAIT | MSG_TRUNC, nullptr);
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR || done > 0) break;
      return Fail(Error::Errno(errno, "AF_PACKET recvmmsg"));
    }
    for (int i = 0; i < r; ++i) {
      auto& b = buffers[done + i];
      b.length = std::min<size_t>(msgs[i].msg_len, b.storage.size() + 1);
      b.ifindex = from[i].sll_ifindex;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c != nullptr;
           c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)) {
        if (c->cmsg_level != SOL_PACKET || c->cmsg_type != PACKET_AUXDATA ||
            c->cmsg_len < CMSG_LEN(sizeof(tpacket_auxdata)))
          continue;
        tpacket_auxdata aux;
        std::memcpy(&aux, CMSG_DATA(c), sizeof aux);
        // Forwarded as it is, such a frame would reach its receiver with a
        // wrong checksum and be dropped there (TCP through the user-space
        // path, e.g. IPv4 guests, failed this way with veth offloads on).
        if ((aux.tp_status & TP_STATUS_CSUMNOTREADY) && b.length <= b.storage.size())
          CompleteTransportChecksum(b.storage.first(b.length));
      }
    }
    done += static_cast<size_t>(r);
    if (static_cast<size_t>(r) < n) break;
  }
  return done;
}

// ---- Raw IPv6 tunnel socket ------------------------------------------------------

Result<std::unique_ptr<RawIpv6Socket>> RawIpv6Socket::Open(const RawIpv6SocketOptions& options) {
  if (options.protocol != ipproto::kIpv6 && options.protocol != ipproto::kIpv4)
    return Fail(Error::Invalid("raw tunnel socket protocol must be 41 or 4"));
  int fd = socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, options.protocol);
  if (fd < 0) return Fail(Error::Errno(errno, "raw IPv6 socket"));
  std::unique_ptr<RawIpv6Socket> s(new RawIpv6Socket(fd, options.protocol, options.connect_to));
  int one = 1;
  if (setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &one, sizeof one) < 0)
    return Fail(Error::Errno(errno, "IPV6_RECVPKTINFO"));
  int pmtu = options.path_mtu_discovery ? IPV6_PMTUDISC_DO : IPV6_PMTUDISC_DONT;
  if (setsockopt(fd, IPPROTO_IPV6, IPV6_MTU_DISCOVER, &pmtu, sizeof pmtu) < 0)
    return Fail(Error::Errno(errno, "IPV6_MTU_DISCOVER"));
  if (!options.path_mtu_discovery) {
    // Let the kernel fragment to the interface MTU instead of failing.
    int dontfrag = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_DONTFRAG, &dontfrag, sizeof dontfrag);
  }
  if (options.receive_buffer_bytes > 0) {
    int v = options.receive_buffer_bytes;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v, sizeof v);
  }
  if (options.send_buffer_bytes > 0) {
    int v = options.send_buffer_bytes;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v);
  }
  if (!options.bind_device.empty() &&
      setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, options.bind_device.data(),
                 static_cast<socklen_t>(options.bind_device.size())) < 0)
    return Fail(Error::Errno(errno, "SO_BINDTODEVICE " + options.bind_device));
  if (options.bind_address) {
    auto sa = MakeSockaddr(*options.bind_address);
    if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0)
      return Fail(
          Error::Errno(errno, "binding raw socket to " + FormatIpv6(*options.bind_address)));
  }
  // Not connect(2): a connected raw socket would also filter receives by
  // source, which callers want to see (and count) themselves.
  return s;
}

RawIpv6Socket::~RawIpv6Socket() {
  if (fd_ >= 0) close(fd_);
}

Status RawIpv6Socket::Send(std::span<const uint8_t> inner) {
  if (!connected_) return Fail(Error::Invalid("raw tunnel socket has no destination"));
  return SendTo(*connected_, inner);
}

Result<size_t> RawIpv6Socket::SendBatch(std::span<const std::span<const uint8_t>> inner) {
  if (!connected_) return Fail(Error::Invalid("raw tunnel socket has no destination"));
  return SendBatchTo(*connected_, inner);
}

Status RawIpv6Socket::SendTo(const Ipv6Address& dst, std::span<const uint8_t> inner) {
  auto sa = MakeSockaddr(dst);
  if (sendto(fd_, inner.data(), inner.size(), 0, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0)
    return Fail(Error::Errno(errno, "tunnel send to " + FormatIpv6(dst)));
  return Ok();
}

Result<size_t> RawIpv6Socket::SendBatchTo(const Ipv6Address& dst,
                                          std::span<const std::span<const uint8_t>> inner) {
  auto sa = MakeSockaddr(dst);
  size_t done = 0;
  while (done < inner.size()) {
    const size_t n = std::min(inner.size() - done, kMaxBatch);
    std::array<mmsghdr, kMaxBatch> msgs{};
    std::array<iovec, kMaxBatch> iov{};
    for (size_t i = 0; i < n; ++i) {
      auto p = inner[done + i];
      iov[i] = {const_cast<uint8_t*>(p.data()), p.size()};
      msgs[i].msg_hdr.msg_iov = &iov[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
      msgs[i].msg_hdr.msg_name = &sa;
      msgs[i].msg_hdr.msg_namelen = sizeof sa;
    }
    int r = sendmmsg(fd_, msgs.data(), static_cast<unsigned>(n), 0);
    if (r < 0) {
      if (done == 0) return Fail(Error::Errno(errno, "tunnel sendmmsg to " + FormatIpv6(dst)));
      break;
    }
    done += static_cast<size_t>(r);
    if (static_cast<size_t>(r) < n) break;
  }
  return done;
}

Result<size_t> RawIpv6Socket::Receive(std::span<PacketBuffer> buffers) {
  size_t done = 0;
  constexpr size_t kControl = CMSG_SPACE(sizeof(in6_pktinfo));
  while (done < buffers.size()) {
    const size_t n = std::min(buffers.size() - done, kMaxBatch);
    std::array<mmsghdr, kMaxBatch> msgs{};
    std::array<iovec, kMaxBatch> iov{};
    std::array<sockaddr_in6, kMaxBatch> from{};
    alignas(cmsghdr) std::array<std::array<uint8_t, kControl>, kMaxBatch> control{};
    for (size_t i = 0; i < n; ++i) {
      auto& b = buffers[done + i];
      iov[i] = {b.storage.data(), b.storage.size()};
      msgs[i].msg_hdr.msg_iov = &iov[i];
      msgs[i].msg_hdr.msg_iovlen = 1;
      msgs[i].msg_hdr.msg_name = &from[i];
      msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6);
      msgs[i].msg_hdr.msg_control = control[i].data();
      msgs[i].msg_hdr.msg_controllen = kControl;
    }
    int r = recvmmsg(fd_, msgs.data(), static_cast<unsigned>(n), MSG_DONTWAIT, nullptr);
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR || done > 0) break;
      return Fail(Error::Errno(errno, "tunnel recvmmsg"));
    }
    for (int i = 0; i < r; ++i) {
      auto& b = buffers[done + i];
      b.length = msgs[i].msg_len;
      if (msgs[i].msg_hdr.msg_flags & MSG_TRUNC) b.length = b.storage.size() + 1;
      b.peer = FromSockaddr(from[i]);
      b.local = {};
      for (cmsghdr* c = CMSG_FIRSTHDR(&msgs[i].msg_hdr); c != nullptr;
           c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)) {
        if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
          in6_pktinfo info;
          std::memcpy(&info, CMSG_DATA(c), sizeof info);
          std::memcpy(b.local.data(), &info.ipi6_addr, 16);
          b.ifindex = static_cast<int>(info.ipi6_ifindex);
        }
      }
    }
    done += static_cast<size_t>(r);
    if (static_cast<size_t>(r) < n) break;
  }
  return done;
}

// ---- IPPROTO_RAW sender ------------------------------------------------------------

Result<std::unique_ptr<Ipv6RawSender>> Ipv6RawSender::Open(const std::string& bind_device) {
  int fd = socket(AF_INET6, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, IPPROTO_RAW);
  if (fd < 0) return Fail(Error::Errno(errno, "IPPROTO_RAW socket"));
  std::unique_ptr<Ipv6RawSender> s(new Ipv6RawSender(fd));
  if (!bind_device.empty() && setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, bind_device.data(),
                                         static_cast<socklen_t>(bind_device.size())) < 0)
    return Fail(Error::Errno(errno, "SO_BINDTODEVICE " + bind_device));
  return s;
}

Ipv6RawSender::~Ipv6RawSender() {
  if (fd_ >= 0) close(fd_);
}

Status Ipv6RawSender::Send(std::span<const uint8_t> packet) {
  if (packet.size() < kIpv6HeaderSize || (packet[0] >> 4) != 6)
    return Fail(Error::Invalid("not an IPv6 packet"));
  Ipv6Address dst{};
  std::copy(packet.begin() + 24, packet.begin() + 40, dst.begin());
  auto sa = MakeSockaddr(dst);
  // IPPROTO_RAW implies IPV6_HDRINCL: the kernel sends our header as is. The
  // sockaddr port field must be 0 (it would be the protocol otherwise).
  if (sendto(fd_, packet.data(), packet.size(), 0, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0)
    return Fail(Error::Errno(errno, "raw IPv6 send to " + FormatIpv6(dst)));
  return Ok();
}

// ---- nftables --------------------------------------------------------------------

namespace {
Status RunNft(const std::string& script) {
  FILE* p = popen("nft -f - 2>&1", "w");
  if (p == nullptr) return Fail(Error::Errno(errno, "running nft"));
  std::fwrite(script.data(), 1, script.size(), p);
  int rc = pclose(p);
  if (rc == -1) return Fail(Error::Errno(errno, "waiting for nft"));
  if (!WIFEXITED(rc) || WEXITSTATUS(rc) != 0)
    return Fail(Error::Io("nft exited with status " + std::to_string(WEXITSTATUS(rc))));
  return Ok();
}
}  // namespace

Status SuppressMobilityIcmpErrors(const std::string& table) {
  for (char c : table)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_')
      return Fail(Error::Invalid("nft table name must be [A-Za-z0-9_]"));
  // Idempotent: add, flush, then define the chain contents. The input hook
  // runs after AF_PACKET taps and before ip6_input's extension-header walk,
  // and (unlike prerouting) is not run by br_netfilter for bridged frames,
  // so a packet socket on a bridge still sees the BA. The rules match the
  // fixed header's Next Header: 43 followed by routing type 2, or 60
  // (Destination Options) directly carrying a Mobility Header (135), which is
  // how BUs with a Home Address option look.
  std::string script = "add table inet " + table + "\n" + "flush table inet " + table + "\n" +
                       "table inet " + table +
                       " {\n"
                       "  chain input {\n"
                       "    type filter hook input priority -300; policy accept;\n"
                       "    ip6 nexthdr 43 @nh,336,8 2 counter drop\n"
                       "    ip6 nexthdr 60 @nh,320,8 135 counter drop\n"
                       "  }\n"
                       "}\n";
  return RunNft(script);
}

Status RemoveNftTable(const std::string& table) {
  return RunNft("delete table inet " + table + "\n");
}

// ---- Fake ----------------------------------------------------------------------

Status FakePacketPort::Send(std::span<const uint8_t> packet) {
  std::lock_guard lk(mu_);
  if (fail_next_ > 0) {
    --fail_next_;
    return Fail(fail_error_);
  }
  sent_.push_back({std::nullopt, {packet.begin(), packet.end()}});
  return Ok();
}

Status FakePacketPort::SendTo(const Ipv6Address& dst, std::span<const uint8_t> packet) {
  std::lock_guard lk(mu_);
  if (fail_next_ > 0) {
    --fail_next_;
    return Fail(fail_error_);
  }
  sent_.push_back({dst, {packet.begin(), packet.end()}});
  return Ok();
}

Result<size_t> FakePacketPort::Receive(std::span<PacketBuffer> buffers) {
  std::lock_guard lk(mu_);
  size_t n = 0;
  while (n < buffers.size() && !incoming_.empty()) {
    auto& in = incoming_.front();
    auto& b = buffers[n];
    size_t copy = std::min(in.bytes.size(), b.storage.size());
    std::copy_n(in.bytes.begin(), copy, b.storage.begin());
    b.length = in.bytes.size() > b.storage.size() ? b.storage.size() + 1 : in.bytes.size();
    b.peer = in.peer;
    b.local = in.local;
    incoming_.pop_front();
    ++n;
  }
  return n;
}

void FakePacketPort::Queue(std::vector<uint8_t> packet, Ipv6Address peer, Ipv6Address local) {
  std::lock_guard lk(mu_);
  incoming_.push_back({std::move(packet), peer, local});
}

std::vector<FakePacketPort::Sent> FakePacketPort::TakeSent() {
  std::lock_guard lk(mu_);
  return std::exchange(sent_, {});
}

size_t FakePacketPort::sent_count() const {
  std::lock_guard lk(mu_);
  return sent_.size();
}

void FakePacketPort::FailNextSends(size_t n, Error error) {
  std::lock_guard lk(mu_);
  fail_next_ = n;
  fail_error_ = std::move(error);
}

}  // namespace kagemusha::tunnel

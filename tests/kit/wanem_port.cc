#include "wanem_port.h"

#include <arpa/inet.h>
#include <linux/ethtool.h>
#include <linux/if_packet.h>
#include <linux/sockios.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace kagemusha::wanem {
namespace {

// Closes fds on every early return of Open().
class FdGuard {
 public:
  explicit FdGuard(int fd) : fd_(fd) {}
  ~FdGuard() {
    if (fd_ >= 0) ::close(fd_);
  }
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

Result<int> InterfaceIndex(int fd, const std::string& ifname, int* mtu) {
  if (ifname.empty() || ifname.size() >= IFNAMSIZ)
    return Fail(Error::Invalid("bad interface name '" + ifname + "'"));
  ifreq ifr{};
  std::memcpy(ifr.ifr_name, ifname.c_str(), ifname.size());
  if (::ioctl(fd, SIOCGIFINDEX, &ifr) < 0) return Fail(Error::Errno(errno, "interface " + ifname));
  const int index = ifr.ifr_ifindex;
  if (::ioctl(fd, SIOCGIFMTU, &ifr) < 0) return Fail(Error::Errno(errno, "MTU of " + ifname));
  *mtu = ifr.ifr_mtu;
  return index;
}

Status Bind(int fd, int ifindex, uint16_t protocol, const std::string& ifname) {
  sockaddr_ll sll{};
  sll.sll_family = AF_PACKET;
  sll.sll_protocol = htons(protocol);
  sll.sll_ifindex = ifindex;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll) < 0) {
    return Fail(Error::Errno(errno, "binding packet socket to " + ifname));
  }
  return Ok();
}

Status SetIntOption(int fd, int level, int option, int value, const char* what) {
  if (::setsockopt(fd, level, option, &value, sizeof value) < 0)
    return Fail(Error::Errno(errno, what));
  return Ok();
}

}  // namespace

const size_t PacketPort::kAuxDataSpace = CMSG_SPACE(sizeof(tpacket_auxdata));

Result<PacketPort> PacketPort::Open(const std::string& ifname) {
  FdGuard rx(::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL)));
  if (rx.get() < 0) return Fail(Error::Errno(errno, "AF_PACKET socket (needs CAP_NET_RAW)"));
  int mtu = 0;
  auto index = InterfaceIndex(rx.get(), ifname, &mtu);
  if (!index) return Fail(index.error());

  // Without this, everything we send on the other port's interface would be
  // read back by that port's receive socket and bounce forever.
  if (auto s =
          SetIntOption(rx.get(), SOL_PACKET, PACKET_IGNORE_OUTGOING, 1, "PACKET_IGNORE_OUTGOING");
      !s) {
    return Fail(s.error());
  }
  // A deep receive buffer absorbs bursts while the thread is busy sending.
  // SO_RCVBUFFORCE needs CAP_NET_ADMIN; fall back to the capped SO_RCVBUF.
  const int rcvbuf = 32 << 20;
  if (::setsockopt(rx.get(), SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0) {
    (void)::setsockopt(rx.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  }
  // Per-frame metadata: the VLAN tag the kernel took out of the frame, and
  // whether the L4 checksum is still unfinished (CHECKSUM_PARTIAL).
  if (auto s = SetIntOption(rx.get(), SOL_PACKET, PACKET_AUXDATA, 1, "PACKET_AUXDATA"); !s)
    return Fail(s.error());
  if (auto s = Bind(rx.get(), *index, ETH_P_ALL, ifname); !s) return Fail(s.error());
  packet_mreq mreq{};
  mreq.mr_ifindex = *index;
  mreq.mr_type = PACKET_MR_PROMISC;
  if (::setsockopt(rx.get(), SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mreq, sizeof mreq) < 0) {
    return Fail(Error::Errno(errno, "promiscuous mode on " + ifname));
  }
  // Frames queued for the emulated link before bind() may belong to another
  // interface; drain whatever arrived so far (cheap, and the link is new).
  char scratch[64];
  while (::recv(rx.get(), scratch, sizeof scratch, MSG_DONTWAIT) >= 0) {
  }

  FdGuard tx(::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0));
  if (tx.get() < 0) return Fail(Error::Errno(errno, "AF_PACKET transmit socket"));
  const int sndbuf = 8 << 20;
  if (::setsockopt(tx.get(), SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) < 0) {
    (void)::setsockopt(tx.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  }
  if (auto s = Bind(tx.get(), *index, 0, ifname); !s) return Fail(s.error());

  return PacketPort(ifname, *index, mtu, rx.release(), tx.release());
}

PacketPort::PacketPort(PacketPort&& other) noexcept
    : name_(std::move(other.name_)),
      ifindex_(other.ifindex_),
      mtu_(other.mtu_),
      rx_fd_(std::exchange(other.rx_fd_, -1)),
      tx_fd_(std::exchange(other.tx_fd_, -1)) {}

PacketPort::~PacketPort() {
  if (rx_fd_ >= 0) ::close(rx_fd_);
  if (tx_fd_ >= 0) ::close(tx_fd_);
}

Result<int> PacketPort::Receive(std::span<mmsghdr> msgs) {
  for (;;) {
    const int n =
        ::recvmmsg(rx_fd_, msgs.data(), static_cast<unsigned>(msgs.size()), MSG_DONTWAIT, nullptr);
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    // ENETDOWN: the interface went down (e.g. test-bed teardown). Report it.
    return Fail(Error::Errno(errno, "receiving on " + name_));
  }
}

Result<int> PacketPort::Send(std::span<mmsghdr> msgs) {
  for (;;) {
    const int n = ::sendmmsg(tx_fd_, msgs.data(), static_cast<unsigned>(msgs.size()), 0);
    if (n > 0) return n;
    if (n == 0) return Fail(Error::Io("sendmmsg on " + name_ + " sent nothing"));
    if (errno == EINTR) continue;
    return Fail(Error::Errno(errno, "sending on " + name_));
  }
}

uint64_t PacketPort::TakeKernelDrops() {
  tpacket_stats st{};
  socklen_t len = sizeof st;
  if (::getsockopt(rx_fd_, SOL_PACKET, PACKET_STATISTICS, &st, &len) < 0) return 0;
  return st.tp_drops;
}

Status SetOffloads(const std::string& ifname, bool enable) {
  if (ifname.empty() || ifname.size() >= IFNAMSIZ)
    return Fail(Error::Invalid("bad interface name '" + ifname + "'"));
  int raw = ::socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (raw < 0) raw = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);  // IPv6 disabled
  FdGuard fd(raw);
  if (fd.get() < 0) return Fail(Error::Errno(errno, "control socket"));
  struct Feature {
    uint32_t cmd;
    const char* name;
  };
  // Every segmentation/coalescing offload that can produce frames above the
  // MTU, and transmit checksumming: a veth hands over CHECKSUM_PARTIAL frames
  // whose L4 checksum is still unfinished, and re-sent through a packet socket
  // they would arrive with a bad checksum and be dropped by the receiver.
  static constexpr Feature kFeatures[] = {
      {ETHTOOL_STSO, "tso"},
      {ETHTOOL_SGSO, "gso"},
      {ETHTOOL_SGRO, "gro"},
      {ETHTOOL_SUFO, "ufo"},
      {ETHTOOL_STXCSUM, "tx-checksumming"},
  };
  for (const auto& f : kFeatures) {
    ethtool_value value{};
    value.cmd = f.cmd;
    value.data = enable ? 1 : 0;
    ifreq ifr{};
    std::memcpy(ifr.ifr_name, ifname.c_str(), ifname.size());
    ifr.ifr_data = reinterpret_cast<char*>(&value);
    if (::ioctl(fd.get(), SIOCETHTOOL, &ifr) < 0) {
      if (errno == EOPNOTSUPP || errno == EINVAL) continue;  // not changeable on this driver
      return Fail(Error::Errno(errno, std::string("setting ") + f.name + " on " + ifname));
    }
  }
  // LRO lives in the flags word; clear it when disabling.
  if (!enable) {
    ethtool_value flags{};
    flags.cmd = ETHTOOL_GFLAGS;
    ifreq ifr{};
    std::memcpy(ifr.ifr_name, ifname.c_str(), ifname.size());
    ifr.ifr_data = reinterpret_cast<char*>(&flags);
    if (::ioctl(fd.get(), SIOCETHTOOL, &ifr) == 0 && (flags.data & ETH_FLAG_LRO)) {
      flags.cmd = ETHTOOL_SFLAGS;
      flags.data &= ~static_cast<uint32_t>(ETH_FLAG_LRO);
      (void)::ioctl(fd.get(), SIOCETHTOOL, &ifr);
    }
  }
  return Ok();
}

}  // namespace kagemusha::wanem

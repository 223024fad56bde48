// kagemusha-mh-tool: a thin command line over the Mobility Header codecs, used
// by the wire-compatibility test (tests/tunnel/test_wire_compat.sh) to hand
// our encodings to tshark and scapy and to judge theirs.
//
//   kagemusha-mh-tool write-pcap OUT.pcap
//       Writes two Ethernet frames: a Binding Update (HAO, IPv4 Home Address
//       option, MN-HA authentication) and a Binding Acknowledgement (type 2
//       routing header, IPv4 Address Acknowledgement, MN-HA authentication),
//       using the fixed scenario printed on stdout as key=value lines.
//   kagemusha-mh-tool write-link-pcap OUT.pcap
//       Writes the other frames a mobile host emits, in this order: an
//       unsolicited NA, a DAD Neighbor Solicitation, a Router Advertisement
//       (prefix, MTU, source link-layer), a gratuitous ARP request, an
//       IPv6-in-IPv6 and an IPv4-in-IPv6 packet, an ICMPv6 Packet Too Big
//       and an ICMPv4 fragmentation-needed, so tshark can verify their
//       checksums independently.
//   kagemusha-mh-tool announce IFACE MAC IPV6 IPV4
//       Sends an unsolicited Neighbor Advertisement and a gratuitous ARP for
//       a guest with MAC/IPV6/IPV4 out of IFACE (AF_PACKET), as the mobile
//       host does after a move.
//   kagemusha-mh-tool pmtu IFACE HOST_MAC ROUTER6 HOST6 REMOTE6 ROUTER4 HOST4 REMOTE4 MTU
//       Sends HOST an ICMPv6 Packet Too Big (from ROUTER6) and an ICMPv4
//       fragmentation-needed (from ROUTER4), each quoting an ICMP echo
//       (request for IPv6, reply for IPv4) HOST supposedly sent to REMOTE,
//       reporting MTU.
//   kagemusha-mh-tool capture-nd IFACE SECONDS
//       Captures ND and ARP frames on IFACE for SECONDS and prints one line
//       per frame with our decoders' verdict.
//   kagemusha-mh-tool decode [--ethernet] [--key K --spi N] FILE
//       Decodes one raw IPv6 packet (or Ethernet frame) from FILE and prints
//       "OK ..." (exit 0) or "REJECT: reason" (exit 2). With --key the MN-HA
//       authenticator is verified (HMAC-SHA256-128) as well.
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "kagemusha/tunnel/arp.h"
#include "kagemusha/tunnel/mh_auth.h"
#include "kagemusha/tunnel/mobility_header.h"
#include "kagemusha/tunnel/neighbor_discovery.h"

namespace {

using namespace kagemusha::tunnel;
using Bytes = std::vector<uint8_t>;

Ipv6Address V6(const char* text) {
  Ipv6Address a{};
  if (inet_pton(AF_INET6, text, a.data()) != 1)
    throw std::runtime_error(std::string("bad IPv6 address ") + text);
  return a;
}

// The scenario both sides of the test agree on.
const char* const kHoaText = "2001:db8:1::10";
const char* const kCoaText = "2001:db8:2::20";
const char* const kHaText = "2001:db8:1::1";
const char* const kKey = "kagemusha-wire-test";
constexpr uint32_t kSpi = 256;
constexpr uint16_t kSeq = 4242;
constexpr uint16_t kLifetime = 150;
const Ipv4Address kIpv4Hoa = {192, 0, 2, 10};
const MacAddress kMnMac = {0x02, 0, 0, 0, 0, 0x20};
const MacAddress kHaMac = {0x02, 0, 0, 0, 0, 0x01};

void Put32(std::ostream& o, uint32_t v) { o.write(reinterpret_cast<const char*>(&v), 4); }
void Put16(std::ostream& o, uint16_t v) { o.write(reinterpret_cast<const char*>(&v), 2); }

// Classic libpcap file, host byte order (the magic tells readers which).
void WritePcap(const std::string& path, const std::vector<Bytes>& frames) {
  std::ofstream o(path, std::ios::binary);
  if (!o) throw std::runtime_error("cannot open " + path);
  Put32(o, 0xa1b2c3d4);
  Put16(o, 2);
  Put16(o, 4);
  Put32(o, 0);
  Put32(o, 0);
  Put32(o, 65535);
  Put32(o, 1);  // LINKTYPE_ETHERNET
  uint32_t t = 1700000000;
  for (const auto& f : frames) {
    Put32(o, t++);
    Put32(o, 0);
    Put32(o, uint32_t(f.size()));
    Put32(o, uint32_t(f.size()));
    o.write(reinterpret_cast<const char*>(f.data()), std::streamsize(f.size()));
  }
  if (!o) throw std::runtime_error("write failed: " + path);
}

template <class T>
T Must(kagemusha::Result<T> r, const char* what) {
  if (!r) throw std::runtime_error(std::string(what) + ": " + r.error().message());
  return std::move(*r);
}

int WriteScenario(const std::string& out) {
  Ipv6Address hoa = V6(kHoaText), coa = V6(kCoaText), ha = V6(kHaText);
  Bytes key(kKey, kKey + std::strlen(kKey));
  MhAuthParams auth{kSpi, key, coa, hoa, MhAuthAlgorithm::kHmacSha256_128};

  BindingUpdate bu{kSeq,
                   uint16_t(bu_flag::kAcknowledge | bu_flag::kHomeRegistration),
                   kLifetime,
                   {Ipv4HomeAddress{24, false, kIpv4Hoa}}};
  Bytes bu_mh = Must(EncodeAuthenticatedMobilityHeader(bu, auth, {hoa, ha}), "encode BU");
  Bytes bu_pkt = Must(BuildMobilityPacket(coa, ha, hoa, std::nullopt, bu_mh), "build BU packet");

  BindingAcknowledgement ba{ba_status::kAccepted,
                            0,
                            kSeq,
                            kLifetime,
                            {Ipv4AddressAcknowledgement{ipv4_ack_status::kSuccess, 24, kIpv4Hoa}}};
  Bytes ba_mh = Must(EncodeAuthenticatedMobilityHeader(ba, auth, {ha, hoa}), "encode BA");
  Bytes ba_pkt = Must(BuildMobilityPacket(ha, coa, std::nullopt, hoa, ba_mh), "build BA packet");

  WritePcap(out, {BuildEthernetFrame(kHaMac, kMnMac, ethertype::kIpv6, bu_pkt),
                  BuildEthernetFrame(kMnMac, kHaMac, ethertype::kIpv6, ba_pkt)});
  std::printf(
      "hoa=%s\ncoa=%s\nha=%s\nseq=%u\nlifetime=%u\nipv4_hoa=%s\nipv4_prefix=24\nspi=%u\nkey=%s\n"
      "bu_checksum=0x%04x\nba_checksum=0x%04x\n",
      kHoaText, kCoaText, kHaText, kSeq, kLifetime, FormatIpv4(kIpv4Hoa).c_str(), kSpi, kKey,
      bu_mh[4] << 8 | bu_mh[5], ba_mh[4] << 8 | ba_mh[5]);
  return 0;
}

Ipv4Address V4(const char* text) {
  Ipv4Address a{};
  if (inet_pton(AF_INET, text, a.data()) != 1)
    throw std::runtime_error(std::string("bad IPv4 address ") + text);
  return a;
}

int WriteLinkScenario(const std::string& out) {
  Ipv6Address guest = V6("2001:db8:1::10"), ll = V6("fe80::1"), coa = V6(kCoaText),
              ha = V6(kHaText);
  std::vector<Bytes> frames;
  frames.push_back(BuildUnsolicitedNeighborAdvertisementFrame(kMnMac, guest));
  frames.push_back(BuildNeighborSolicitationFrame(kMnMac, Ipv6Address{}, guest));
  RouterAdvertisement ra;
  ra.home_agent = true;
  ra.router_lifetime = 1800;
  ra.source_link_layer = kHaMac;
  ra.mtu = 1400;
  ra.prefixes.push_back({64, true, true, true, 86400, 14400, V6("2001:db8:1::")});
  Ipv6Header h;
  h.src = ll;
  h.dst = kAllNodesMulticast;
  h.next_header = ipproto::kIcmpv6;
  h.hop_limit = kNdHopLimit;
  Bytes ra_pkt =
      Must(BuildIpv6Packet(h, EncodeRouterAdvertisement(ra, ll, kAllNodesMulticast)), "RA");
  frames.push_back(
      BuildEthernetFrame(MulticastMac(kAllNodesMulticast), kHaMac, ethertype::kIpv6, ra_pkt));
  frames.push_back(BuildGratuitousArpFrame(kMnMac, V4("192.0.2.10")));

  // A small UDP datagram from the guest, tunnelled both ways.
  Bytes udp = {0x9c, 0x40, 0x9c, 0x41, 0x00, 0x0c, 0x00, 0x00, 'p', 'i', 'n', 'g'};
  Ipv6Header in6;
  in6.src = guest;
  in6.dst = V6("2001:db8:9::9");
  in6.next_header = ipproto::kUdp;
  uint16_t c6 = Ipv6PseudoHeaderChecksum(in6.src, in6.dst, ipproto::kUdp, udp);
  Bytes udp6 = udp;
  udp6[6] = uint8_t(c6 >> 8);
  udp6[7] = uint8_t(c6);
  Bytes inner6 = Must(BuildIpv6Packet(in6, udp6), "inner IPv6");
  Bytes tun6 = Must(EncapsulateInIpv6({ha, coa, 64, 0}, inner6), "6in6");
  frames.push_back(BuildEthernetFrame(kMnMac, kHaMac, ethertype::kIpv6, tun6));
  Ipv4Header in4;
  in4.src = V4("192.0.2.10");
  in4.dst = V4("198.51.100.9");
  in4.protocol = ipproto::kUdp;
  in4.dont_fragment = true;
  Bytes udp4 = udp;
  udp4[6] = udp4[7] = 0;  // UDP over IPv4 may omit its checksum
  Bytes inner4 = Must(BuildIpv4Packet(in4, udp4), "inner IPv4");
  Bytes tun4 = Must(EncapsulateInIpv6({ha, coa, 64, 0}, inner4), "4in6");
  frames.push_back(BuildEthernetFrame(kMnMac, kHaMac, ethertype::kIpv6, tun4));
  Bytes big_udp(1500 - 40, 0x42);
  Ipv6Header bigh = in6;
  Bytes big = Must(BuildIpv6Packet(bigh, big_udp), "big");
  Bytes ptb = Must(BuildIcmpv6PacketTooBig(ha, guest, 1400, big), "PTB");
  frames.push_back(BuildEthernetFrame(kMnMac, kHaMac, ethertype::kIpv6, ptb));
  Bytes fn =
      Must(BuildIcmpv4FragmentationNeeded(V4("192.0.2.1"), in4.src, 1380, inner4), "frag needed");
  frames.push_back(BuildEthernetFrame(kMnMac, kHaMac, ethertype::kIpv4, fn));
  WritePcap(out, frames);
  std::printf("frames=%zu\n", frames.size());
  return 0;
}

MacAddress ParseMac(const std::string& text) {
  MacAddress m{};
  unsigned v[6];
  if (std::sscanf(text.c_str(), "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6)
    throw std::runtime_error("bad MAC address " + text);
  for (int i = 0; i < 6; ++i) m[i] = uint8_t(v[i]);
  return m;
}

// An AF_PACKET socket bound to one interface; closes on scope exit.
struct PacketSocket {
  int fd = -1;
  int ifindex = 0;
  explicit PacketSocket(const std::string& iface) {
    ifindex = int(if_nametoindex(iface.c_str()));
    if (ifindex == 0) throw std::runtime_error("no interface " + iface);
    fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0) throw std::runtime_error("AF_PACKET socket: " + std::string(std::strerror(errno)));
    sockaddr_ll sll{};
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = ifindex;
    if (bind(fd, reinterpret_cast<sockaddr*>(&sll), sizeof sll) != 0)
      throw std::runtime_error("bind to " + iface + ": " + std::strerror(errno));
  }
  ~PacketSocket() {
    if (fd >= 0) close(fd);
  }
  void Send(const Bytes& frame) const {
    if (send(fd, frame.data(), frame.size(), 0) != ssize_t(frame.size()))
      throw std::runtime_error("send: " + std::string(std::strerror(errno)));
  }
};

int Announce(const std::string& iface, const std::string& mac, const std::string& v6,
             const std::string& v4) {
  PacketSocket s(iface);
  MacAddress m = ParseMac(mac);
  s.Send(BuildUnsolicitedNeighborAdvertisementFrame(m, V6(v6.c_str())));
  s.Send(BuildGratuitousArpFrame(m, V4(v4.c_str())));
  std::printf("sent unsolicited NA and gratuitous ARP for %s %s at %s on %s\n", v6.c_str(),
              v4.c_str(), FormatMac(m).c_str(), iface.c_str());
  return 0;
}

int SendPmtuErrors(const std::vector<std::string>& a) {
  PacketSocket s(a[1]);
  MacAddress host_mac = ParseMac(a[2]);
  const MacAddress router_mac = {0x02, 0, 0, 0, 0, 0x01};
  Ipv6Address router6 = V6(a[3].c_str()), host6 = V6(a[4].c_str()), remote6 = V6(a[5].c_str());
  Ipv4Address router4 = V4(a[6].c_str()), host4 = V4(a[7].c_str()), remote4 = V4(a[8].c_str());
  uint32_t mtu = uint32_t(std::stoul(a[9]));
  Bytes echo_body(1452, 0x61);  // an echo request too big for `mtu`
  Ipv6Header h6;
  h6.src = host6;
  h6.dst = remote6;
  h6.next_header = ipproto::kIcmpv6;
  Bytes echo6 = Must(
      BuildIpv6Packet(h6, BuildIcmpv6(host6, remote6, 128, 0, 0x12340001, echo_body)), "echo6");
  Bytes ptb = Must(BuildIcmpv6PacketTooBig(router6, host6, mtu, echo6), "PTB");
  s.Send(BuildEthernetFrame(host_mac, router_mac, ethertype::kIpv6, ptb));
  // Linux only updates the IPv4 PMTU from an ICMP error quoting ICMP when the
  // quoted message is an echo reply (icmp_err); replies need no socket.
  Bytes icmp4 = {0, 0, 0, 0, 0x12, 0x34, 0, 1};
  icmp4.insert(icmp4.end(), echo_body.begin(), echo_body.end());
  uint16_t c = InternetChecksum(icmp4);
  icmp4[2] = uint8_t(c >> 8);
  icmp4[3] = uint8_t(c);
  Ipv4Header h4;
  h4.src = host4;
  h4.dst = remote4;
  h4.protocol = ipproto::kIcmpv4;
  h4.dont_fragment = true;
  Bytes echo4 = Must(BuildIpv4Packet(h4, icmp4), "echo4");
  Bytes fn =
      Must(BuildIcmpv4FragmentationNeeded(router4, host4, uint16_t(mtu), echo4), "frag needed");
  s.Send(BuildEthernetFrame(host_mac, router_mac, ethertype::kIpv4, fn));
  std::printf("sent Packet Too Big and fragmentation-needed (mtu %u) to %s / %s\n", mtu,
              a[4].c_str(), a[7].c_str());
  return 0;
}

// One line per ND/ARP frame: what our decoders make of what the kernel sent.
void DescribeLinkFrame(std::span<const uint8_t> frame) {
  auto eth = ParseEthernetFrame(frame);
  if (!eth) return;
  if (eth->ether_type == ethertype::kArp) {
    auto a = DecodeArp(eth->payload);
    if (!a) {
      std::printf("ARP REJECT: %s\n", a.error().message().c_str());
    } else {
      std::printf("ARP %s sender=%s/%s target=%s\n",
                  a->operation == kArpOpRequest ? "request" : "reply",
                  FormatIpv4(a->sender_ip).c_str(), FormatMac(a->sender_mac).c_str(),
                  FormatIpv4(a->target_ip).c_str());
    }
    return;
  }
  if (eth->ether_type != ethertype::kIpv6) return;
  auto ip = ParseIpv6Packet(eth->payload);
  if (!ip || ip->header.next_header != ipproto::kIcmpv6 || ip->payload.empty()) return;
  NdContext ctx{ip->header.src, ip->header.dst, ip->header.hop_limit};
  auto mac_or_none = [](const std::optional<MacAddress>& m) {
    return m ? FormatMac(*m) : std::string("none");
  };
  switch (ip->payload[0]) {
    case icmpv6_type::kNeighborSolicitation: {
      auto ns = DecodeNeighborSolicitation(ip->payload, ctx);
      if (!ns)
        std::printf("NS REJECT: %s\n", ns.error().message().c_str());
      else
        std::printf("NS src=%s target=%s sll=%s\n", FormatIpv6(ctx.src).c_str(),
                    FormatIpv6(ns->target).c_str(), mac_or_none(ns->source_link_layer).c_str());
      break;
    }
    case icmpv6_type::kNeighborAdvertisement: {
      auto na = DecodeNeighborAdvertisement(ip->payload, ctx);
      if (!na)
        std::printf("NA REJECT: %s\n", na.error().message().c_str());
      else
        std::printf("NA target=%s R=%d S=%d O=%d tll=%s\n", FormatIpv6(na->target).c_str(),
                    na->router, na->solicited, na->override,
                    mac_or_none(na->target_link_layer).c_str());
      break;
    }
    case icmpv6_type::kRouterSolicitation: {
      auto rs = DecodeRouterSolicitation(ip->payload, ctx);
      if (!rs)
        std::printf("RS REJECT: %s\n", rs.error().message().c_str());
      else
        std::printf("RS src=%s sll=%s\n", FormatIpv6(ctx.src).c_str(),
                    mac_or_none(rs->source_link_layer).c_str());
      break;
    }
    case icmpv6_type::kRouterAdvertisement: {
      auto ra = DecodeRouterAdvertisement(ip->payload, ctx);
      if (!ra)
        std::printf("RA REJECT: %s\n", ra.error().message().c_str());
      else
        std::printf("RA lifetime=%u prefixes=%zu\n", ra->router_lifetime, ra->prefixes.size());
      break;
    }
    default:
      break;
  }
  std::fflush(stdout);
}

int CaptureNd(const std::string& iface, int seconds) {
  PacketSocket s(iface);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  std::vector<uint8_t> buf(65536);
  std::printf("capturing\n");
  std::fflush(stdout);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) break;
    pollfd p{s.fd, POLLIN, 0};
    if (poll(&p, 1, int(left.count())) <= 0) continue;
    ssize_t n = recv(s.fd, buf.data(), buf.size(), 0);
    if (n > 0) DescribeLinkFrame(std::span<const uint8_t>(buf.data(), size_t(n)));
  }
  return 0;
}

std::string Describe(const MobilityOptions& options) {
  std::ostringstream s;
  for (const auto& o : options) {
    std::visit(
        [&](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, Ipv4HomeAddress>)
            s << " ipv4_hoa=" << FormatIpv4(v.address) << "/" << int(v.prefix_length);
          else if constexpr (std::is_same_v<T, Ipv4AddressAcknowledgement>)
            s << " ipv4_ack=" << int(v.status) << ":" << FormatIpv4(v.address) << "/"
              << int(v.prefix_length);
          else if constexpr (std::is_same_v<T, Ipv4CareOfAddress>)
            s << " ipv4_coa=" << FormatIpv4(v.address);
          else if constexpr (std::is_same_v<T, MobilityMessageAuthentication>)
            s << " auth_spi=" << v.spi << " auth_len=" << v.authenticator.size();
          else if constexpr (std::is_same_v<T, AlternateCareOfAddress>)
            s << " alt_coa=" << FormatIpv6(v.address);
          else if constexpr (std::is_same_v<T, BindingRefreshAdvice>)
            s << " refresh=" << v.refresh_interval;
          else if constexpr (std::is_same_v<T, NonceIndices>)
            s << " nonces=" << v.home_nonce_index << "," << v.care_of_nonce_index;
          else if constexpr (std::is_same_v<T, BindingAuthorizationData>)
            s << " bad_len=" << v.authenticator.size();
          else
            s << " unknown_option=" << int(v.type);
        },
        o);
  }
  return s.str();
}

int Decode(const std::vector<std::string>& args) {
  bool ethernet = false;
  std::string key, file;
  uint32_t spi = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--ethernet") {
      ethernet = true;
    } else if (args[i] == "--key" && i + 1 < args.size()) {
      key = args[++i];
    } else if (args[i] == "--spi" && i + 1 < args.size()) {
      spi = uint32_t(std::stoul(args[++i]));
    } else {
      file = args[i];
    }
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + file);
  Bytes data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto p = ethernet ? ParseMobilityFrame(data) : ParseMobilityPacket(data);
  if (!p) {
    std::printf("REJECT: %s\n", p.error().message().c_str());
    return 2;
  }
  std::ostringstream s;
  s << "OK";
  if (p->ip.home_address) s << " hao=" << FormatIpv6(*p->ip.home_address);
  if (p->ip.routing) s << " rh2=" << FormatIpv6(p->ip.routing->home_address);
  std::visit(
      [&](const auto& m) {
        using T = std::decay_t<decltype(m)>;
        if constexpr (std::is_same_v<T, BindingUpdate>) {
          char flags[8];
          std::snprintf(flags, sizeof flags, "0x%04x", m.flags);
          s << " type=BU seq=" << m.sequence << " flags=" << flags << " lifetime=" << m.lifetime
            << Describe(m.options);
        } else if constexpr (std::is_same_v<T, BindingAcknowledgement>) {
          s << " type=BA status=" << int(m.status) << " seq=" << m.sequence
            << " lifetime=" << m.lifetime << Describe(m.options);
        } else if constexpr (std::is_same_v<T, BindingError>) {
          s << " type=BE status=" << int(m.status) << " home=" << FormatIpv6(m.home_address);
        } else if constexpr (std::is_same_v<T, BindingRefreshRequest>) {
          s << " type=BRR";
        } else {
          s << " type=unrecognized mh_type=" << int(m.mh_type);
        }
      },
      p->header.message);
  if (!key.empty()) {
    Bytes k(key.begin(), key.end());
    // Mobility Data uses the care-of and home addresses: for a BU they are the
    // source and the HAO, for a BA the destination and the RH2 address.
    Ipv6Address coa = p->ip.home_address ? p->ip.header.src : p->ip.header.dst;
    Ipv6Address hoa = p->ip.home_address
                          ? *p->ip.home_address
                          : (p->ip.routing ? p->ip.routing->home_address : p->ip.header.src);
    auto v = VerifyMobilityMessageAuthentication(
        p->mh, {spi, k, coa, hoa, MhAuthAlgorithm::kHmacSha256_128});
    if (!v) {
      std::printf("REJECT: %s\n", v.error().message().c_str());
      return 2;
    }
    s << " auth=valid";
  }
  std::printf("%s\n", s.str().c_str());
  return 0;
}

int Usage() {
  std::fprintf(
      stderr,
      "usage: kagemusha-mh-tool write-pcap OUT.pcap\n"
      "       kagemusha-mh-tool write-link-pcap OUT.pcap\n"
      "       kagemusha-mh-tool announce IFACE MAC IPV6 IPV4\n"
      "       kagemusha-mh-tool pmtu IFACE HOST_MAC ROUTER6 HOST6 REMOTE6 ROUTER4 HOST4 REMOTE4 "
      "MTU\n"
      "       kagemusha-mh-tool capture-nd IFACE SECONDS\n"
      "       kagemusha-mh-tool decode [--ethernet] [--key K --spi N] FILE\n");
  return 64;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) return Usage();
  try {
    if (args[0] == "write-pcap" && args.size() == 2) return WriteScenario(args[1]);
    if (args[0] == "write-link-pcap" && args.size() == 2) return WriteLinkScenario(args[1]);
    if (args[0] == "announce" && args.size() == 5)
      return Announce(args[1], args[2], args[3], args[4]);
    if (args[0] == "pmtu" && args.size() == 10) return SendPmtuErrors(args);
    if (args[0] == "capture-nd" && args.size() == 3) return CaptureNd(args[1], std::stoi(args[2]));
    if (args[0] == "decode" && args.size() >= 2) return Decode({args.begin() + 1, args.end()});
  } catch (const std::exception& e) {  // CLI boundary: report and fail
    std::fprintf(stderr, "kagemusha-mh-tool: %s\n", e.what());
    return 1;
  }
  return Usage();
}

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
//   kagemusha-mh-tool decode [--ethernet] [--key K --spi N] FILE
//       Decodes one raw IPv6 packet (or Ethernet frame) from FILE and prints
//       "OK ..." (exit 0) or "REJECT: reason" (exit 2). With --key the MN-HA
//       authenticator is verified (HMAC-SHA256-128) as well.
#include <arpa/inet.h>

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
  std::fprintf(stderr,
               "usage: kagemusha-mh-tool write-pcap OUT.pcap\n"
               "       kagemusha-mh-tool write-link-pcap OUT.pcap\n"
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
    if (args[0] == "decode" && args.size() >= 2) return Decode({args.begin() + 1, args.end()});
  } catch (const std::exception& e) {  // CLI boundary: report and fail
    std::fprintf(stderr, "kagemusha-mh-tool: %s\n", e.what());
    return 1;
  }
  return Usage();
}

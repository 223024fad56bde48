// IPv6/IPv4/Ethernet codecs. See ip_packet.h. Pure: no I/O.
#include <algorithm>
#include <cstdio>

#include "kagemusha/common/coding.h"
#include "kagemusha/tunnel/ip_packet.h"

namespace kagemusha::tunnel {
namespace {

Error Bad(const std::string& what) { return Error::Protocol(what); }

std::span<const uint8_t> AsSpan(const Ipv6Address& a) { return {a.data(), a.size()}; }

}  // namespace

// ---- Checksums --------------------------------------------------------------

uint32_t ChecksumAdd(uint32_t sum, std::span<const uint8_t> data) {
  // Accumulate in 64 bits so arbitrarily long inputs cannot overflow before
  // the fold; the return value is folded back into 32 bits.
  uint64_t s = sum;
  size_t i = 0;
  for (; i + 1 < data.size(); i += 2) s += uint32_t(data[i]) << 8 | data[i + 1];
  if (i < data.size()) s += uint32_t(data[i]) << 8;
  while (s >> 32) s = (s & 0xffffffff) + (s >> 32);
  return uint32_t(s);
}

namespace {
// The pseudo-header's part of a TCP or UDP checksum, IPv4 (RFC 793) or IPv6
// (RFC 8200 §8.1, the same sum for a length below 64 KiB): `addresses` are
// the source and destination as they sit in the IP header.
uint32_t PseudoHeaderSum(std::span<const uint8_t> addresses, uint8_t proto, size_t l4_len) {
  uint8_t tail[4] = {0, proto, 0, 0};
  StoreBe16(tail + 2, static_cast<uint16_t>(l4_len));
  return ChecksumAdd(ChecksumAdd(0, addresses), tail);
}
}  // namespace

uint16_t ChecksumFinish(uint32_t sum) {
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return uint16_t(~sum);
}

uint16_t InternetChecksum(std::span<const uint8_t> data) {
  return ChecksumFinish(ChecksumAdd(0, data));
}

uint16_t Ipv6PseudoHeaderChecksum(const Ipv6Address& src, const Ipv6Address& dst,
                                  uint8_t next_header, std::span<const uint8_t> upper) {
  uint32_t sum = ChecksumAdd(0, AsSpan(src));
  sum = ChecksumAdd(sum, AsSpan(dst));
  uint8_t tail[8];
  StoreBe32(tail, uint32_t(upper.size()));
  tail[4] = tail[5] = tail[6] = 0;
  tail[7] = next_header;
  sum = ChecksumAdd(sum, tail);
  return ChecksumFinish(ChecksumAdd(sum, upper));
}

// ---- Ethernet ---------------------------------------------------------------

Result<EthernetFrame> ParseEthernetFrame(std::span<const uint8_t> frame) {
  ByteReader r(frame);
  EthernetFrame f;
  auto dst = r.Bytes(6);
  auto src = r.Bytes(6);
  auto type = r.U16();
  if (!dst || !src || !type) return Fail(Bad("Ethernet frame shorter than 14 bytes"));
  std::copy(dst->begin(), dst->end(), f.dst.begin());
  std::copy(src->begin(), src->end(), f.src.begin());
  int tags = 0;
  while (*type == ethertype::kVlan || *type == ethertype::kQinQ) {
    if (++tags > 2) return Fail(Bad("Ethernet frame with more than two VLAN tags"));
    auto tci = r.U16();
    type = r.U16();
    if (!tci || !type) return Fail(Bad("Ethernet VLAN tag truncated"));
    if (!f.vlan_tci) f.vlan_tci = *tci;
  }
  if (*type < 0x0600) return Fail(Bad("802.3 length frame, not Ethernet II"));
  f.ether_type = *type;
  f.payload = r.Rest();
  return f;
}

std::vector<uint8_t> BuildEthernetFrame(const MacAddress& dst, const MacAddress& src,
                                        uint16_t ether_type, std::span<const uint8_t> payload,
                                        std::optional<uint16_t> vlan_tci) {
  std::vector<uint8_t> out;
  out.reserve(kEthernetHeaderSize + 4 + payload.size());
  ByteWriter w(out);
  w.Bytes(dst);
  w.Bytes(src);
  if (vlan_tci) {
    w.U16(ethertype::kVlan);
    w.U16(*vlan_tci);
  }
  w.U16(ether_type);
  w.Bytes(payload);
  return out;
}

// ---- IPv6 -------------------------------------------------------------------

Result<Ipv6Packet> ParseIpv6Packet(std::span<const uint8_t> packet) {
  if (packet.size() < kIpv6HeaderSize)
    return Fail(Bad("IPv6 packet shorter than its 40-byte header"));
  ByteReader r(packet);
  uint32_t first = *r.U32();
  if (first >> 28 != 6)
    return Fail(Bad("IP version is " + std::to_string(first >> 28) + ", not 6"));
  Ipv6Packet p;
  p.header.traffic_class = uint8_t(first >> 20);
  p.header.flow_label = first & 0xfffff;
  p.header.payload_length = *r.U16();
  p.header.next_header = *r.U8();
  p.header.hop_limit = *r.U8();
  auto src = *r.Bytes(16);
  auto dst = *r.Bytes(16);
  std::copy(src.begin(), src.end(), p.header.src.begin());
  std::copy(dst.begin(), dst.end(), p.header.dst.begin());
  if (p.header.payload_length == 0 && p.header.next_header == ipproto::kHopByHop)
    return Fail(Error::NotSupported("IPv6 jumbogram"));
  auto payload = r.Bytes(p.header.payload_length);
  if (!payload)
    return Fail(Bad("IPv6 Payload Length " + std::to_string(p.header.payload_length) +
                    " exceeds the " + std::to_string(packet.size() - kIpv6HeaderSize) +
                    " bytes present"));
  p.payload = *payload;
  return p;
}

Result<std::vector<uint8_t>> BuildIpv6Packet(Ipv6Header header, std::span<const uint8_t> payload) {
  if (payload.size() > 0xffff) return Fail(Error::Invalid("IPv6 payload larger than 65535 bytes"));
  header.payload_length = uint16_t(payload.size());
  std::vector<uint8_t> out;
  out.reserve(kIpv6HeaderSize + payload.size());
  ByteWriter w(out);
  w.U32(6u << 28 | uint32_t(header.traffic_class) << 20 | (header.flow_label & 0xfffff));
  w.U16(header.payload_length);
  w.U8(header.next_header);
  w.U8(header.hop_limit);
  w.Bytes(header.src);
  w.Bytes(header.dst);
  w.Bytes(payload);
  return out;
}

bool IsMulticast(const Ipv6Address& a) { return a[0] == 0xff; }
bool IsLinkLocalUnicast(const Ipv6Address& a) { return a[0] == 0xfe && (a[1] & 0xc0) == 0x80; }
bool IsUnspecified(const Ipv6Address& a) {
  for (uint8_t b : a)
    if (b) return false;
  return true;
}

std::string FormatIpv6(const Ipv6Address& a) {
  uint16_t g[8];
  for (int i = 0; i < 8; ++i) g[i] = LoadBe16(&a[2 * i]);
  // RFC 5952: compress the longest run (>= 2) of zero groups, first on ties.
  int best = -1, best_len = 0;
  for (int i = 0; i < 8;) {
    if (g[i] != 0) {
      ++i;
      continue;
    }
    int j = i;
    while (j < 8 && g[j] == 0) ++j;
    if (j - i > best_len && j - i >= 2) best = i, best_len = j - i;
    i = j;
  }
  std::string s;
  char buf[8];
  for (int i = 0; i < 8; ++i) {
    if (i == best) {
      s += "::";
      i += best_len - 1;
      continue;
    }
    if (!s.empty() && s.back() != ':') s += ':';
    std::snprintf(buf, sizeof buf, "%x", g[i]);
    s += buf;
  }
  return s;
}

std::string FormatIpv4(const Ipv4Address& a) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%u.%u.%u.%u", a[0], a[1], a[2], a[3]);
  return buf;
}

std::string FormatMac(const MacAddress& m) {
  char buf[18];
  std::snprintf(buf, sizeof buf, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4],
                m[5]);
  return buf;
}

// ---- Extension headers ------------------------------------------------------

std::vector<uint8_t> EncodeHomeAddressDestinationOptions(uint8_t next_header,
                                                         const Ipv6Address& home_address) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.U8(next_header);
  w.U8(2);  // (2 + 1) * 8 = 24 bytes
  // The HAO must start at 8n+6: after the 2-byte header a 4-byte PadN (type,
  // length 2, two zero octets) puts it at offset 6.
  w.U8(kOptPadN);
  w.U8(2);
  w.Zeros(2);
  w.U8(kOptHomeAddress);
  w.U8(16);
  w.Bytes(home_address);
  return out;
}

Result<DestinationOptions> DecodeDestinationOptions(std::span<const uint8_t> data) {
  if (data.size() < 8) return Fail(Bad("Destination Options header shorter than 8 bytes"));
  DestinationOptions d;
  d.next_header = data[0];
  d.length = (size_t(data[1]) + 1) * 8;
  if (d.length > data.size())
    return Fail(Bad("Destination Options Hdr Ext Len " + std::to_string(data[1]) +
                    " runs past the packet"));
  ByteReader r(data.subspan(2, d.length - 2));
  while (!r.empty()) {
    uint8_t type = *r.U8();
    if (type == kOptPad1) continue;
    auto len = r.U8();
    if (!len)
      return Fail(Bad("destination option type " + std::to_string(type) + " has no length byte"));
    auto body = r.Bytes(*len);
    if (!body)
      return Fail(Bad("destination option type " + std::to_string(type) + " length " +
                      std::to_string(*len) + " overruns the header"));
    switch (type) {
      case kOptPadN:
        break;
      case kOptHomeAddress:
        if (*len != 16)
          return Fail(Bad("Home Address option length " + std::to_string(*len) + ", expected 16"));
        if (d.home_address) return Fail(Bad("more than one Home Address option"));
        d.home_address.emplace();
        std::copy(body->begin(), body->end(), d.home_address->begin());
        break;
      case kOptTunnelEncapsulationLimit:
        if (*len != 1) return Fail(Bad("Tunnel Encapsulation Limit option length must be 1"));
        d.tunnel_encapsulation_limit = (*body)[0];
        break;
      default:
        // RFC 8200 §4.2: the two high-order bits say what to do with an
        // option we do not recognise; only 00 means "skip it".
        if ((type >> 6) != 0)
          return Fail(Bad("unrecognised destination option type " + std::to_string(type) +
                          " whose action bits require discarding the packet"));
        break;
    }
  }
  return d;
}

std::vector<uint8_t> EncodeType2RoutingHeader(uint8_t next_header, const Ipv6Address& home_address,
                                              uint8_t segments_left) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.U8(next_header);
  w.U8(2);
  w.U8(kRoutingType2);
  w.U8(segments_left);
  w.U32(0);
  w.Bytes(home_address);
  return out;
}

Result<Type2RoutingHeader> DecodeType2RoutingHeader(std::span<const uint8_t> data) {
  if (data.size() < 24) return Fail(Bad("type 2 routing header shorter than 24 bytes"));
  if (data[2] != kRoutingType2)
    return Fail(Bad("routing type " + std::to_string(data[2]) + ", expected 2"));
  if (data[1] != 2)
    return Fail(
        Bad("type 2 routing header Hdr Ext Len " + std::to_string(data[1]) + ", expected 2"));
  if (data[3] > 1)
    return Fail(Bad("type 2 routing header Segments Left " + std::to_string(data[3]) + " > 1"));
  Type2RoutingHeader h;
  h.next_header = data[0];
  h.segments_left = data[3];
  std::copy(data.begin() + 8, data.begin() + 24, h.home_address.begin());
  return h;
}

Result<Ipv6UpperLayer> FindUpperLayer(const Ipv6Packet& packet) {
  Ipv6UpperLayer u;
  u.header = packet.header;
  uint8_t nh = packet.header.next_header;
  std::span<const uint8_t> rest = packet.payload;
  bool seen_routing = false;
  for (int headers = 0;; ++headers) {
    if (headers > 8) return Fail(Bad("more than 8 IPv6 extension headers"));
    if (nh == ipproto::kHopByHop || nh == ipproto::kDestinationOptions) {
      if (nh == ipproto::kHopByHop && headers != 0) return Fail(Bad("Hop-by-Hop header not first"));
      auto d = DecodeDestinationOptions(rest);
      if (!d)
        return Fail(
            d.error().Context(nh == ipproto::kHopByHop ? "Hop-by-Hop" : "Destination Options"));
      if (d->home_address) {
        if (nh == ipproto::kHopByHop)
          return Fail(Bad("Home Address option in a Hop-by-Hop header"));
        if (u.home_address) return Fail(Bad("two Home Address options"));
        u.home_address = d->home_address;
      }
      if (d->tunnel_encapsulation_limit)
        u.tunnel_encapsulation_limit = d->tunnel_encapsulation_limit;
      nh = d->next_header;
      rest = rest.subspan(d->length);
    } else if (nh == ipproto::kRouting) {
      if (rest.size() < 8) return Fail(Bad("routing header truncated"));
      if (seen_routing) return Fail(Bad("two routing headers"));
      seen_routing = true;
      size_t len = (size_t(rest[1]) + 1) * 8;
      if (len > rest.size()) return Fail(Bad("routing header length runs past the packet"));
      if (rest[2] == kRoutingType2) {
        auto rh = DecodeType2RoutingHeader(rest);
        if (!rh) return Fail(rh.error());
        u.routing = *rh;
      } else if (rest[3] != 0) {
        return Fail(Error::NotSupported("routing header type " + std::to_string(rest[2]) +
                                        " with segments left"));
      }
      nh = rest[0];
      rest = rest.subspan(len);
    } else if (nh == ipproto::kFragment) {
      return Fail(Error::NotSupported("fragmented IPv6 packet"));
    } else {
      break;
    }
  }
  u.protocol = nh;
  u.data = rest;
  u.checksum_src = u.home_address ? *u.home_address : packet.header.src;
  u.checksum_dst =
      (u.routing && u.routing->segments_left > 0) ? u.routing->home_address : packet.header.dst;
  return u;
}

// ---- Encapsulation ----------------------------------------------------------

Result<std::vector<uint8_t>> EncapsulateInIpv6(const TunnelEndpoints& tunnel,
                                               std::span<const uint8_t> inner) {
  if (inner.empty()) return Fail(Error::Invalid("empty inner packet"));
  Ipv6Header h;
  h.src = tunnel.src;
  h.dst = tunnel.dst;
  h.hop_limit = tunnel.hop_limit;
  h.traffic_class = tunnel.traffic_class;
  switch (inner[0] >> 4) {
    case 6:
      h.next_header = ipproto::kIpv6;
      break;
    case 4:
      h.next_header = ipproto::kIpv4;
      break;
    default:
      return Fail(Error::Invalid("inner packet is neither IPv4 nor IPv6"));
  }
  return BuildIpv6Packet(h, inner);
}

Result<Decapsulated> Decapsulate(std::span<const uint8_t> outer_packet) {
  auto p = ParseIpv6Packet(outer_packet);
  if (!p) return Fail(p.error().Context("outer header"));
  auto u = FindUpperLayer(*p);
  if (!u) return Fail(u.error().Context("outer header"));
  Decapsulated d;
  d.outer = p->header;
  d.inner_protocol = u->protocol;
  d.tunnel_encapsulation_limit = u->tunnel_encapsulation_limit;
  if (u->protocol == ipproto::kIpv6) {
    auto in = ParseIpv6Packet(u->data);
    if (!in) return Fail(in.error().Context("inner IPv6 packet"));
    if (in->payload.size() + kIpv6HeaderSize != u->data.size())
      return Fail(Bad("inner IPv6 Payload Length disagrees with the tunnel payload"));
  } else if (u->protocol == ipproto::kIpv4) {
    auto in = ParseIpv4Packet(u->data);
    if (!in) return Fail(in.error().Context("inner IPv4 packet"));
    if (in->header.total_length != u->data.size())
      return Fail(Bad("inner IPv4 Total Length disagrees with the tunnel payload"));
  } else {
    return Fail(Bad("next header " + std::to_string(u->protocol) +
                    " is not a tunnelled IPv6 or IPv4 packet"));
  }
  d.inner = u->data;
  return d;
}

// ---- IPv4 -------------------------------------------------------------------

Result<Ipv4Packet> ParseIpv4Packet(std::span<const uint8_t> packet) {
  if (packet.size() < kIpv4MinHeaderSize) return Fail(Bad("IPv4 packet shorter than 20 bytes"));
  if (packet[0] >> 4 != 4)
    return Fail(Bad("IP version is " + std::to_string(packet[0] >> 4) + ", not 4"));
  Ipv4Packet p;
  p.header_length = size_t(packet[0] & 0xf) * 4;
  if (p.header_length < kIpv4MinHeaderSize) return Fail(Bad("IPv4 IHL below 5"));
  auto& h = p.header;
  h.tos = packet[1];
  h.total_length = LoadBe16(&packet[2]);
  if (h.total_length < p.header_length)
    return Fail(Bad("IPv4 Total Length smaller than its header"));
  if (h.total_length > packet.size())
    return Fail(Bad("IPv4 Total Length " + std::to_string(h.total_length) + " exceeds the " +
                    std::to_string(packet.size()) + " bytes present"));
  if (InternetChecksum(packet.subspan(0, p.header_length)) != 0)
    return Fail(Bad("IPv4 header checksum mismatch"));
  h.identification = LoadBe16(&packet[4]);
  uint16_t frag = LoadBe16(&packet[6]);
  h.dont_fragment = frag & 0x4000;
  h.more_fragments = frag & 0x2000;
  h.fragment_offset = frag & 0x1fff;
  h.ttl = packet[8];
  h.protocol = packet[9];
  std::copy(packet.data() + 12, packet.data() + 16, h.src.begin());
  std::copy(packet.data() + 16, packet.data() + 20, h.dst.begin());
  p.payload = packet.subspan(p.header_length, h.total_length - p.header_length);
  return p;
}

Result<std::vector<uint8_t>> BuildIpv4Packet(Ipv4Header h, std::span<const uint8_t> payload) {
  if (payload.size() > 0xffff - kIpv4MinHeaderSize)
    return Fail(Error::Invalid("IPv4 payload too large"));
  h.total_length = uint16_t(kIpv4MinHeaderSize + payload.size());
  std::vector<uint8_t> out;
  out.reserve(h.total_length);
  ByteWriter w(out);
  w.U8(0x45);
  w.U8(h.tos);
  w.U16(h.total_length);
  w.U16(h.identification);
  w.U16(uint16_t((h.dont_fragment ? 0x4000 : 0) | (h.more_fragments ? 0x2000 : 0) |
                 (h.fragment_offset & 0x1fff)));
  w.U8(h.ttl);
  w.U8(h.protocol);
  w.U16(0);
  w.Bytes(h.src);
  w.Bytes(h.dst);
  w.PatchU16(10, InternetChecksum({out.data(), kIpv4MinHeaderSize}));
  w.Bytes(payload);
  return out;
}

// ---- ICMP -------------------------------------------------------------------

std::vector<uint8_t> BuildIcmpv6(const Ipv6Address& src, const Ipv6Address& dst, uint8_t type,
                                 uint8_t code, uint32_t word, std::span<const uint8_t> body) {
  std::vector<uint8_t> out;
  out.reserve(8 + body.size());
  ByteWriter w(out);
  w.U8(type);
  w.U8(code);
  w.U16(0);
  w.U32(word);
  w.Bytes(body);
  w.PatchU16(2, Ipv6PseudoHeaderChecksum(src, dst, ipproto::kIcmpv6, out));
  return out;
}

Result<std::vector<uint8_t>> BuildIcmpv6PacketTooBig(const Ipv6Address& src, const Ipv6Address& dst,
                                                     uint32_t mtu,
                                                     std::span<const uint8_t> invoking_packet) {
  if (mtu < kIpv6MinimumMtu)
    return Fail(Error::Invalid("Packet Too Big MTU below the IPv6 minimum of 1280"));
  // RFC 4443 §3.2: quote as much as possible without the error packet
  // exceeding the minimum MTU.
  size_t room = kIpv6MinimumMtu - kIpv6HeaderSize - 8;
  auto quoted = invoking_packet.subspan(0, std::min(room, invoking_packet.size()));
  Ipv6Header h;
  h.src = src;
  h.dst = dst;
  h.next_header = ipproto::kIcmpv6;
  h.hop_limit = 64;
  return BuildIpv6Packet(h, BuildIcmpv6(src, dst, kIcmpv6PacketTooBig, 0, mtu, quoted));
}

Result<std::vector<uint8_t>> BuildIcmpv4FragmentationNeeded(
    const Ipv4Address& src, const Ipv4Address& dst, uint16_t next_hop_mtu,
    std::span<const uint8_t> invoking_packet) {
  auto inv = ParseIpv4Packet(invoking_packet);
  if (!inv) return Fail(inv.error().Context("invoking packet"));
  size_t quote = inv->header_length + std::min<size_t>(8, inv->payload.size());
  std::vector<uint8_t> icmp;
  ByteWriter w(icmp);
  w.U8(kIcmpv4DestinationUnreachable);
  w.U8(kIcmpv4FragmentationNeeded);
  w.U16(0);
  w.U16(0);  // unused
  w.U16(next_hop_mtu);
  w.Bytes(invoking_packet.subspan(0, quote));
  w.PatchU16(2, InternetChecksum(icmp));
  Ipv4Header h;
  h.src = src;
  h.dst = dst;
  h.protocol = ipproto::kIcmpv4;
  h.ttl = 64;
  return BuildIpv4Packet(h, icmp);
}

Result<IcmpMessage> ParseIcmpv6(const Ipv6Address& src, const Ipv6Address& dst,
                                std::span<const uint8_t> icmp) {
  if (icmp.size() < 8) return Fail(Bad("ICMPv6 message shorter than 8 bytes"));
  if (Ipv6PseudoHeaderChecksum(src, dst, ipproto::kIcmpv6, icmp) != 0)
    return Fail(Bad("ICMPv6 checksum mismatch"));
  return IcmpMessage{icmp[0], icmp[1], LoadBe32(&icmp[4]), icmp.subspan(8)};
}

Result<IcmpMessage> ParseIcmpv4(std::span<const uint8_t> icmp) {
  if (icmp.size() < 8) return Fail(Bad("ICMP message shorter than 8 bytes"));
  if (InternetChecksum(icmp) != 0) return Fail(Bad("ICMP checksum mismatch"));
  return IcmpMessage{icmp[0], icmp[1], LoadBe32(&icmp[4]), icmp.subspan(8)};
}

std::vector<std::vector<uint8_t>> SegmentIpv4Tcp(std::span<const uint8_t> packet, size_t mtu) {
  std::vector<std::vector<uint8_t>> out;
  if (packet.size() < 20 || (packet[0] >> 4) != 4) return out;
  const size_t ihl = size_t{packet[0] & 0x0fu} * 4;
  const size_t total = LoadBe16(&packet[2]);
  const bool fragment = (LoadBe16(&packet[6]) & 0x3fff) != 0;  // MF or offset
  if (ihl < 20 || total > packet.size() || total <= mtu || fragment || packet[9] != ipproto::kTcp)
    return out;
  if (total < ihl + 20) return out;
  const size_t thl = size_t{packet[ihl + 12]} / 16 * 4;
  if (thl < 20 || total < ihl + thl || mtu <= ihl + thl) return out;
  const size_t mss = mtu - ihl - thl;
  const size_t payload = total - ihl - thl;
  const uint16_t id0 = LoadBe16(&packet[4]);
  const uint32_t seq0 = LoadBe32(&packet[ihl + 4]);
  constexpr uint8_t kFin = 0x01, kPsh = 0x08, kCwr = 0x80;
  for (size_t off = 0, k = 0; off < payload; off += mss, ++k) {
    const size_t n = std::min(mss, payload - off);
    const size_t len = ihl + thl + n;
    std::vector<uint8_t> seg(packet.begin(), packet.begin() + static_cast<ptrdiff_t>(ihl + thl));
    seg.insert(seg.end(), packet.begin() + static_cast<ptrdiff_t>(ihl + thl + off),
               packet.begin() + static_cast<ptrdiff_t>(ihl + thl + off + n));
    StoreBe16(&seg[2], static_cast<uint16_t>(len));
    StoreBe16(&seg[4], static_cast<uint16_t>(id0 + k));
    StoreBe16(&seg[10], 0);
    StoreBe16(&seg[10], InternetChecksum(std::span<const uint8_t>(seg).first(ihl)));
    StoreBe32(&seg[ihl + 4], seq0 + static_cast<uint32_t>(off));
    if (off + n < payload) seg[ihl + 13] &= static_cast<uint8_t>(~(kFin | kPsh));
    if (k > 0) seg[ihl + 13] &= static_cast<uint8_t>(~kCwr);
    StoreBe16(&seg[ihl + 16], 0);
    const std::span<const uint8_t> view(seg);
    const uint32_t sum = PseudoHeaderSum(view.subspan(12, 8), ipproto::kTcp, thl + n);
    StoreBe16(&seg[ihl + 16], ChecksumFinish(ChecksumAdd(sum, view.subspan(ihl))));
    out.push_back(std::move(seg));
  }
  return out;
}

bool CompleteTransportChecksum(std::span<uint8_t> frame) {
  size_t l3 = 12;
  if (frame.size() < l3 + 2) return false;
  uint16_t type = LoadBe16(&frame[l3]);
  l3 += 2;
  if (type == ethertype::kVlan) {
    if (frame.size() < l3 + 4) return false;
    type = LoadBe16(&frame[l3 + 2]);
    l3 += 4;
  }
  std::span<const uint8_t> addresses;  // source, destination
  size_t l4 = 0, l4_len = 0;
  uint8_t proto = 0;
  if (type == ethertype::kIpv4) {
    if (frame.size() < l3 + 20 || (frame[l3] >> 4) != 4) return false;
    const size_t ihl = size_t{frame[l3] & 0x0fu} * 4;
    const size_t total = LoadBe16(&frame[l3 + 2]);
    const bool fragment = (LoadBe16(&frame[l3 + 6]) & 0x3fff) != 0;  // MF or offset
    if (ihl < 20 || total < ihl || frame.size() < l3 + total || fragment) return false;
    proto = frame[l3 + 9];
    l4 = l3 + ihl;
    l4_len = total - ihl;
    addresses = frame.subspan(l3 + 12, 8);
  } else if (type == ethertype::kIpv6) {
    if (frame.size() < l3 + 40 || (frame[l3] >> 4) != 6) return false;
    l4_len = LoadBe16(&frame[l3 + 4]);
    proto = frame[l3 + 6];
    l4 = l3 + 40;
    if (frame.size() < l4 + l4_len) return false;
    addresses = frame.subspan(l3 + 8, 32);
  } else {
    return false;
  }
  size_t field;
  if (proto == ipproto::kTcp) {
    if (l4_len < 20) return false;
    field = l4 + 16;
  } else if (proto == ipproto::kUdp) {
    if (l4_len < 8) return false;
    field = l4 + 6;
  } else {
    return false;
  }
  const uint32_t sum = PseudoHeaderSum(addresses, proto, l4_len);
  StoreBe16(&frame[field], 0);
  uint16_t c = ChecksumFinish(ChecksumAdd(sum, frame.subspan(l4, l4_len)));
  if (proto == ipproto::kUdp && c == 0) c = 0xffff;  // RFC 768: 0 means "no checksum"
  StoreBe16(&frame[field], c);
  return true;
}

}  // namespace kagemusha::tunnel

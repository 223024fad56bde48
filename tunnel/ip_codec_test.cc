// IPv6/IPv4/Ethernet codec tests: checksum known answers (RFC 1071), the
// extension headers Mobile IPv6 uses, RFC 2473 encapsulation, PMTU ICMP
// errors, and malformed input tables.
#include <gtest/gtest.h>

#include "kagemusha/tunnel/ip_packet.h"

namespace kagemusha::tunnel {
namespace {

using Bytes = std::vector<uint8_t>;

const Ipv6Address kA = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
const Ipv6Address kB = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2};
const Ipv6Address kHoa = {0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10};

Bytes Ipv6With(uint8_t next_header, const Bytes& payload, const Ipv6Address& src = kA,
               const Ipv6Address& dst = kB) {
  Ipv6Header h;
  h.src = src;
  h.dst = dst;
  h.next_header = next_header;
  return *BuildIpv6Packet(h, payload);
}

Bytes Ipv4With(uint8_t protocol, const Bytes& payload) {
  Ipv4Header h;
  h.src = {192, 0, 2, 1};
  h.dst = {198, 51, 100, 2};
  h.protocol = protocol;
  h.dont_fragment = true;
  return *BuildIpv4Packet(h, payload);
}

TEST(InternetChecksum, MatchesRfc1071Example) {
  // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2; the checksum is ~ddf2.
  Bytes d = {0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7};
  EXPECT_EQ(ChecksumFinish(ChecksumAdd(0, d)), 0x220d);
  Bytes odd = {0x01};  // padded to 0100
  EXPECT_EQ(InternetChecksum(odd), 0xfeff);
}

TEST(InternetChecksum, PseudoHeaderMatchesHandComputedSum) {
  // src ::1, dst ::2, length 4, next header 58, data 0000 0000:
  // 1 + 2 + 4 + 58 = 65 = 0x41, checksum ~0x0041 = 0xffbe.
  Ipv6Address s{}, d{};
  s[15] = 1;
  d[15] = 2;
  Bytes data(4, 0);
  EXPECT_EQ(Ipv6PseudoHeaderChecksum(s, d, 58, data), 0xffbe);
}

TEST(Ipv6Packet, RoundTripsHeaderFields) {
  Ipv6Header h;
  h.traffic_class = 0xb8;
  h.flow_label = 0xabcde;
  h.next_header = ipproto::kUdp;
  h.hop_limit = 3;
  h.src = kA;
  h.dst = kB;
  Bytes payload = {1, 2, 3};
  auto pkt = BuildIpv6Packet(h, payload);
  ASSERT_TRUE(pkt);
  EXPECT_EQ((*pkt)[0], 0x6b);
  EXPECT_EQ((*pkt)[1], 0x8a);
  auto p = ParseIpv6Packet(*pkt);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->header.traffic_class, 0xb8);
  EXPECT_EQ(p->header.flow_label, 0xabcdeu);
  EXPECT_EQ(p->header.payload_length, 3);
  EXPECT_EQ(p->header.hop_limit, 3);
  EXPECT_EQ(Bytes(p->payload.begin(), p->payload.end()), payload);
}

TEST(Ipv6Packet, IgnoresEthernetPaddingAfterPayload) {
  auto pkt = Ipv6With(ipproto::kNoNextHeader, {9});
  pkt.insert(pkt.end(), 5, 0);
  auto p = ParseIpv6Packet(pkt);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->payload.size(), 1u);
}

TEST(Ipv6Packet, RejectsMalformedHeaders) {
  auto good = Ipv6With(ipproto::kNoNextHeader, {1, 2, 3, 4});
  EXPECT_FALSE(ParseIpv6Packet(std::span<const uint8_t>(good.data(), 39)));
  Bytes v4 = good;
  v4[0] = 0x45;
  EXPECT_FALSE(ParseIpv6Packet(v4));
  Bytes lying = good;
  lying[5] = 5;  // payload length 5, 4 present
  EXPECT_FALSE(ParseIpv6Packet(lying));
  Bytes jumbo = Ipv6With(ipproto::kHopByHop, {});
  EXPECT_FALSE(ParseIpv6Packet(jumbo));
  EXPECT_FALSE(BuildIpv6Packet({}, Bytes(70000, 0)));
}

TEST(Ipv6Address, FormatsPerRfc5952) {
  EXPECT_EQ(FormatIpv6(kA), "2001:db8::1");
  EXPECT_EQ(FormatIpv6(Ipv6Address{}), "::");
  Ipv6Address a = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1};
  EXPECT_EQ(FormatIpv6(a), "2001:db8::1:0:0:1");  // RFC 5952 §4.2.3: first longest run
  Ipv6Address b = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1};
  EXPECT_EQ(FormatIpv6(b), "2001:db8:0:1:1:1:1:1");  // a single zero group is not compressed
  EXPECT_EQ(FormatIpv4({192, 0, 2, 33}), "192.0.2.33");
  EXPECT_EQ(FormatMac({0x02, 0, 0, 0xab, 0xcd, 0xef}), "02:00:00:ab:cd:ef");
}

TEST(HomeAddressOption, EncodesAtEightNPlusSixWithPadN) {
  auto d = EncodeHomeAddressDestinationOptions(ipproto::kMobility, kHoa);
  Bytes want = {135, 2, 1, 2, 0, 0, 0xc9, 16};
  want.insert(want.end(), kHoa.begin(), kHoa.end());
  EXPECT_EQ(d, want);
  auto dec = DecodeDestinationOptions(d);
  ASSERT_TRUE(dec);
  EXPECT_EQ(dec->next_header, ipproto::kMobility);
  EXPECT_EQ(dec->length, 24u);
  EXPECT_EQ(dec->home_address, kHoa);
}

TEST(DestinationOptions, SkipsUnknownOptionWhoseActionBitsSaySkip) {
  Bytes d = {59, 0, 0x05, 2, 0xaa, 0xbb, 0x00, 0x00};  // type 5 (00 action), Pad1, Pad1
  auto dec = DecodeDestinationOptions(d);
  ASSERT_TRUE(dec) << dec.error().message();
  EXPECT_FALSE(dec->home_address);
}

TEST(DestinationOptions, RejectsMalformedHeaders) {
  Bytes hao = EncodeHomeAddressDestinationOptions(59, kHoa);
  Bytes len_lies = hao;
  len_lies[1] = 3;
  EXPECT_FALSE(DecodeDestinationOptions(len_lies));
  Bytes short_hao = hao;
  short_hao[7] = 15;  // HAO length 15, then one stray byte
  EXPECT_FALSE(DecodeDestinationOptions(short_hao));
  Bytes overrun = hao;
  overrun[7] = 17;
  EXPECT_FALSE(DecodeDestinationOptions(overrun));
  Bytes dup = {59, 5, 1, 2, 0, 0, 0xc9, 16};
  dup.insert(dup.end(), kHoa.begin(), kHoa.end());
  dup.insert(dup.end(), {1, 4, 0, 0, 0, 0, 0xc9, 16});
  dup.insert(dup.end(), kHoa.begin(), kHoa.end());
  EXPECT_EQ(dup.size(), 48u);
  auto r = DecodeDestinationOptions(dup);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message().find("more than one"), std::string::npos);
  Bytes discard = {59, 0, 0x85, 2, 0, 0, 1, 0};  // action bits 10: discard
  EXPECT_FALSE(DecodeDestinationOptions(discard));
  Bytes no_len = {59, 0, 1, 2, 0, 0, 0, 0x05};  // last option lacks its length byte
  EXPECT_FALSE(DecodeDestinationOptions(no_len));
  EXPECT_FALSE(DecodeDestinationOptions(Bytes{59, 0, 0, 0}));
}

TEST(Type2RoutingHeader, EncodesKnownAnswerAndRoundTrips) {
  auto rh = EncodeType2RoutingHeader(ipproto::kMobility, kHoa);
  Bytes want = {135, 2, 2, 1, 0, 0, 0, 0};
  want.insert(want.end(), kHoa.begin(), kHoa.end());
  EXPECT_EQ(rh, want);
  auto d = DecodeType2RoutingHeader(rh);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->segments_left, 1);
  EXPECT_EQ(d->home_address, kHoa);
}

TEST(Type2RoutingHeader, RejectsWrongTypeLengthAndSegments) {
  auto rh = EncodeType2RoutingHeader(ipproto::kMobility, kHoa);
  Bytes t0 = rh;
  t0[2] = 0;
  EXPECT_FALSE(DecodeType2RoutingHeader(t0));
  Bytes len4 = rh;
  len4[1] = 4;
  EXPECT_FALSE(DecodeType2RoutingHeader(len4));
  Bytes seg2 = rh;
  seg2[3] = 2;
  EXPECT_FALSE(DecodeType2RoutingHeader(seg2));
  EXPECT_FALSE(DecodeType2RoutingHeader(std::span<const uint8_t>(rh.data(), 23)));
}

TEST(FindUpperLayer, UsesHomeAddressAndRoutingDestinationForPseudoHeader) {
  Bytes payload = EncodeType2RoutingHeader(ipproto::kDestinationOptions, kHoa);
  auto hao = EncodeHomeAddressDestinationOptions(ipproto::kUdp, kHoa);
  payload.insert(payload.end(), hao.begin(), hao.end());
  payload.insert(payload.end(), {1, 2, 3, 4});
  auto pkt = Ipv6With(ipproto::kRouting, payload);
  auto u = FindUpperLayer(*ParseIpv6Packet(pkt));
  ASSERT_TRUE(u) << u.error().message();
  EXPECT_EQ(u->protocol, ipproto::kUdp);
  EXPECT_EQ(u->data.size(), 4u);
  EXPECT_EQ(u->checksum_src, kHoa);
  EXPECT_EQ(u->checksum_dst, kHoa);
  // Segments left 0: the routing header has been processed; the IPv6
  // destination is final.
  Bytes processed = pkt;
  processed[40 + 3] = 0;
  auto v = FindUpperLayer(*ParseIpv6Packet(processed));
  ASSERT_TRUE(v);
  EXPECT_EQ(v->checksum_dst, kB);
}

TEST(FindUpperLayer, RefusesFragmentsAndUnknownRoutingWithSegmentsLeft) {
  EXPECT_EQ(
      FindUpperLayer(*ParseIpv6Packet(Ipv6With(ipproto::kFragment, Bytes(16, 0)))).error().code(),
      ENOTSUP);
  Bytes rh0 = {ipproto::kUdp, 0, 0, 1, 0, 0, 0, 0};
  EXPECT_FALSE(FindUpperLayer(*ParseIpv6Packet(Ipv6With(ipproto::kRouting, rh0))));
  Bytes hbh_late = EncodeHomeAddressDestinationOptions(ipproto::kHopByHop, kHoa);
  hbh_late.insert(hbh_late.end(), {59, 0, 1, 4, 0, 0, 0, 0});
  EXPECT_FALSE(FindUpperLayer(*ParseIpv6Packet(Ipv6With(ipproto::kDestinationOptions, hbh_late))));
}

TEST(Encapsulation, RoundTripsIpv6InIpv6) {
  auto inner = Ipv6With(ipproto::kUdp, {1, 2, 3, 4, 5, 6, 7, 8}, kHoa, kB);
  auto outer = EncapsulateInIpv6({kA, kB, 32, 0}, inner);
  ASSERT_TRUE(outer);
  EXPECT_EQ((*outer)[6], ipproto::kIpv6);
  EXPECT_EQ((*outer)[7], 32);
  auto d = Decapsulate(*outer);
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->inner_protocol, ipproto::kIpv6);
  EXPECT_EQ(d->outer.src, kA);
  EXPECT_EQ(Bytes(d->inner.begin(), d->inner.end()), inner);
}

TEST(Encapsulation, RoundTripsIpv4InIpv6) {
  auto inner = Ipv4With(ipproto::kUdp, {1, 2, 3, 4});
  auto outer = EncapsulateInIpv6({kA, kB, 64, 0}, inner);
  ASSERT_TRUE(outer);
  EXPECT_EQ((*outer)[6], ipproto::kIpv4);
  auto d = Decapsulate(*outer);
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->inner_protocol, ipproto::kIpv4);
  EXPECT_EQ(Bytes(d->inner.begin(), d->inner.end()), inner);
}

TEST(Encapsulation, SkipsTunnelEncapsulationLimitOption) {
  auto inner = Ipv6With(ipproto::kNoNextHeader, {});
  Bytes payload = {ipproto::kIpv6, 0, kOptTunnelEncapsulationLimit, 1, 4, 1, 1, 0};
  payload.insert(payload.end(), inner.begin(), inner.end());
  auto d = Decapsulate(Ipv6With(ipproto::kDestinationOptions, payload));
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->tunnel_encapsulation_limit, 4);
}

TEST(Encapsulation, RejectsNonTunnelAndLyingInnerPackets) {
  EXPECT_FALSE(Decapsulate(Ipv6With(ipproto::kUdp, {1, 2, 3, 4})));
  auto inner = Ipv6With(ipproto::kUdp, {1, 2, 3, 4});
  Bytes trailing = inner;
  trailing.push_back(0);  // outer carries one byte more than the inner declares
  EXPECT_FALSE(Decapsulate(Ipv6With(ipproto::kIpv6, trailing)));
  Bytes v4_in_41 = Ipv4With(ipproto::kUdp, {1});
  EXPECT_FALSE(Decapsulate(Ipv6With(ipproto::kIpv6, v4_in_41)));
  auto v4 = Ipv4With(ipproto::kUdp, {1, 2});
  v4[10] ^= 1;  // corrupt header checksum
  EXPECT_FALSE(Decapsulate(Ipv6With(ipproto::kIpv4, v4)));
  EXPECT_FALSE(EncapsulateInIpv6({}, Bytes{0x10, 0}));
  EXPECT_FALSE(EncapsulateInIpv6({}, Bytes{}));
}

TEST(Ipv4Packet, BuildsValidHeaderChecksumAndRejectsCorruption) {
  auto p = Ipv4With(ipproto::kUdp, {1, 2, 3});
  EXPECT_EQ(InternetChecksum(std::span<const uint8_t>(p.data(), 20)), 0);
  auto d = ParseIpv4Packet(p);
  ASSERT_TRUE(d);
  EXPECT_TRUE(d->header.dont_fragment);
  EXPECT_EQ(d->payload.size(), 3u);
  Bytes bad = p;
  bad[8] ^= 1;  // TTL changed, checksum not
  EXPECT_FALSE(ParseIpv4Packet(bad));
  Bytes ihl4 = p;
  ihl4[0] = 0x44;
  EXPECT_FALSE(ParseIpv4Packet(ihl4));
  Bytes long_total = p;
  long_total[3] += 1;
  EXPECT_FALSE(ParseIpv4Packet(long_total));
  EXPECT_FALSE(ParseIpv4Packet(std::span<const uint8_t>(p.data(), 19)));
}

TEST(Ipv4Packet, SkipsHeaderOptionsCountedByIhl) {
  // IHL 6: one 4-byte option (NOP x3 + EOL) before the payload.
  Bytes p = {0x46, 0, 0,   27, 0,   1, 0, 0, 64, 17, 0, 0, 192, 0,
             2,    1, 198, 51, 100, 2, 1, 1, 1,  0,  7, 8, 9};
  uint16_t c = InternetChecksum(std::span<const uint8_t>(p.data(), 24));
  p[10] = uint8_t(c >> 8);
  p[11] = uint8_t(c);
  auto d = ParseIpv4Packet(p);
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->header_length, 24u);
  EXPECT_EQ(Bytes(d->payload.begin(), d->payload.end()), (Bytes{7, 8, 9}));
  Bytes ihl_past_total = p;
  ihl_past_total[0] = 0x47;  // 28-byte header in a 27-byte packet
  EXPECT_FALSE(ParseIpv4Packet(ihl_past_total));
}

TEST(InternetChecksum, ChainedEvenChunksEqualOneShot) {
  Bytes a = {1, 2, 3, 4}, b = {5, 6, 7};
  Bytes ab = {1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(ChecksumFinish(ChecksumAdd(ChecksumAdd(0, a), b)), InternetChecksum(ab));
  Bytes ones(100000, 0xff);  // long input: no overflow before folding
  EXPECT_EQ(InternetChecksum(ones), 0);
}

TEST(PacketTooBig, QuotesInvokingPacketUpToMinimumMtu) {
  auto big = Ipv6With(ipproto::kUdp, Bytes(1400, 0x5a), kHoa, kB);
  auto ptb = BuildIcmpv6PacketTooBig(kA, kHoa, 1280, big);
  ASSERT_TRUE(ptb);
  EXPECT_EQ(ptb->size(), 1280u);
  auto p = ParseIpv6Packet(*ptb);
  ASSERT_TRUE(p);
  auto icmp = ParseIcmpv6(p->header.src, p->header.dst, p->payload);
  ASSERT_TRUE(icmp) << icmp.error().message();
  EXPECT_EQ(icmp->type, kIcmpv6PacketTooBig);
  EXPECT_EQ(icmp->code, 0);
  EXPECT_EQ(icmp->word, 1280u);
  EXPECT_TRUE(std::equal(icmp->body.begin(), icmp->body.end(), big.begin()));
  auto small = Ipv6With(ipproto::kUdp, Bytes(10, 1));
  auto ptb2 = BuildIcmpv6PacketTooBig(kA, kHoa, 1400, small);
  EXPECT_EQ(ptb2->size(), 40u + 8 + small.size());
  EXPECT_FALSE(BuildIcmpv6PacketTooBig(kA, kHoa, 1000, small));
  Bytes corrupt = *ptb2;
  corrupt.back() ^= 1;
  auto pc = ParseIpv6Packet(corrupt);
  EXPECT_FALSE(ParseIcmpv6(pc->header.src, pc->header.dst, pc->payload));
}

TEST(FragmentationNeeded, QuotesHeaderPlusEightBytesWithValidChecksums) {
  auto inv = Ipv4With(ipproto::kUdp, Bytes(1000, 7));
  auto fn = BuildIcmpv4FragmentationNeeded({192, 0, 2, 254}, {192, 0, 2, 1}, 1400, inv);
  ASSERT_TRUE(fn);
  auto p = ParseIpv4Packet(*fn);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->header.protocol, ipproto::kIcmpv4);
  auto icmp = ParseIcmpv4(p->payload);
  ASSERT_TRUE(icmp) << icmp.error().message();
  EXPECT_EQ(icmp->type, 3);
  EXPECT_EQ(icmp->code, 4);
  EXPECT_EQ(icmp->word & 0xffff, 1400u);
  EXPECT_EQ(icmp->body.size(), 28u);
  EXPECT_TRUE(std::equal(icmp->body.begin(), icmp->body.end(), inv.begin()));
  EXPECT_FALSE(BuildIcmpv4FragmentationNeeded({}, {}, 1400, Bytes{0x60, 0, 0}));
  Bytes c(fn->begin() + 20, fn->end());
  c[9] ^= 0xff;
  EXPECT_FALSE(ParseIcmpv4(c));
}

TEST(EthernetFrame, SkipsVlanAndQinQTags) {
  Bytes payload = {1, 2, 3};
  auto f =
      BuildEthernetFrame({1, 2, 3, 4, 5, 6}, {6, 5, 4, 3, 2, 1}, ethertype::kIpv6, payload, 0x2064);
  auto p = ParseEthernetFrame(f);
  ASSERT_TRUE(p);
  EXPECT_EQ(p->ether_type, ethertype::kIpv6);
  EXPECT_EQ(p->vlan_tci, 0x2064);
  EXPECT_EQ(p->src, (MacAddress{6, 5, 4, 3, 2, 1}));
  EXPECT_EQ(Bytes(p->payload.begin(), p->payload.end()), payload);
  // S-tag then C-tag.
  Bytes qinq = {1,    2,    3,    4,    5,    6,    6,    5,    4,    3,    2, 1,
                0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x14, 0x08, 0x06, 9};
  auto q = ParseEthernetFrame(qinq);
  ASSERT_TRUE(q);
  EXPECT_EQ(q->ether_type, ethertype::kArp);
  EXPECT_EQ(q->vlan_tci, 0x000a);
  EXPECT_EQ(q->payload.size(), 1u);
}

TEST(EthernetFrame, RejectsTruncatedAndOddFrames) {
  Bytes three = {1, 2, 3, 4,    5, 6, 6, 5,    4, 3, 2, 1,    0x81,
                 0, 0, 1, 0x81, 0, 0, 2, 0x81, 0, 0, 3, 0x86, 0xdd};
  EXPECT_FALSE(ParseEthernetFrame(three));
  Bytes cut_tag = {1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1, 0x81, 0, 0};
  EXPECT_FALSE(ParseEthernetFrame(cut_tag));
  Bytes dot3 = {1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1, 0x00, 0x40};
  EXPECT_FALSE(ParseEthernetFrame(dot3));
  EXPECT_FALSE(ParseEthernetFrame(Bytes(13, 0)));
}

// ---- CompleteTransportChecksum ------------------------------------------------

Bytes Ipv4TcpFrame(size_t payload, uint16_t vlan = 0) {
  Bytes f = {2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2};
  if (vlan) {
    f.insert(f.end(), {0x81, 0x00, static_cast<uint8_t>(vlan >> 8), static_cast<uint8_t>(vlan)});
  }
  f.insert(f.end(), {0x08, 0x00});
  const size_t total = 20 + 20 + payload;
  Bytes ip = {0x45,
              0,
              static_cast<uint8_t>(total >> 8),
              static_cast<uint8_t>(total),
              0,
              1,
              0x40,
              0,
              64,
              6,
              0,
              0,
              192,
              0,
              2,
              1,
              198,
              51,
              100,
              7};
  const uint16_t hc = InternetChecksum(ip);
  ip[10] = static_cast<uint8_t>(hc >> 8);
  ip[11] = static_cast<uint8_t>(hc);
  f.insert(f.end(), ip.begin(), ip.end());
  Bytes tcp = {
      0x13, 0x89, 0xc0, 0x01, 0,    0,
      0,    1,    0,    0,    0,    0,
      0x50, 0x18, 0xff, 0xff, 0x12, 0x34 /* a partial (pseudo-header) sum, as offload leaves it */,
      0,    0};
  f.insert(f.end(), tcp.begin(), tcp.end());
  for (size_t i = 0; i < payload; ++i) f.push_back(static_cast<uint8_t>(i * 7 + 3));
  return f;
}

// Verifies an IPv4 TCP/UDP checksum independently: the sum over the
// pseudo-header and the segment, checksum included, folds to 0.
bool Ipv4TransportChecksumOk(const Bytes& f, size_t l3) {
  const size_t ihl = size_t{f[l3] & 0x0fu} * 4;
  const size_t len = (size_t{f[l3 + 2]} << 8 | f[l3 + 3]) - ihl;
  Bytes pseudo(f.begin() + static_cast<long>(l3 + 12), f.begin() + static_cast<long>(l3 + 20));
  pseudo.insert(pseudo.end(),
                {0, f[l3 + 9], static_cast<uint8_t>(len >> 8), static_cast<uint8_t>(len)});
  pseudo.insert(pseudo.end(), f.begin() + static_cast<long>(l3 + ihl), f.end());
  return InternetChecksum(pseudo) == 0;
}

TEST(TransportChecksum, CompletesAnIpv4TcpChecksumLeftToOffload) {
  for (size_t payload : {0u, 1u, 2u, 1379u, 1460u}) {
    auto f = Ipv4TcpFrame(payload);
    ASSERT_FALSE(Ipv4TransportChecksumOk(f, 14));
    ASSERT_TRUE(CompleteTransportChecksum(f)) << payload;
    EXPECT_TRUE(Ipv4TransportChecksumOk(f, 14)) << payload;
  }
  auto tagged = Ipv4TcpFrame(100, 42);
  ASSERT_TRUE(CompleteTransportChecksum(tagged));
  EXPECT_TRUE(Ipv4TransportChecksumOk(tagged, 18));
}

TEST(SegmentIpv4Tcp, CutsAMergedSegmentBackToTheMtu) {
  // 20 IPv4 + 32 TCP (12 bytes of options, as with timestamps) + payload.
  auto frame = Ipv4TcpFrame(0);
  Bytes ip(frame.begin() + 14, frame.end());
  ip[32] = 0x80;                // data offset 8 words
  ip[33] = 0x18 | 0x01 | 0x80;  // PSH ACK FIN CWR
  ip.insert(ip.end(), {1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2});
  const size_t payload = 3 * 1448 + 7;
  for (size_t i = 0; i < payload; ++i) ip.push_back(static_cast<uint8_t>(i * 13 + 1));
  const size_t total = ip.size();
  ip[2] = static_cast<uint8_t>(total >> 8), ip[3] = static_cast<uint8_t>(total);
  ip[4] = 0xff, ip[5] = 0xfe;  // identification wraps
  ip[10] = ip[11] = 0;
  const uint16_t hc = InternetChecksum(std::span<const uint8_t>(ip).first(20));
  ip[10] = static_cast<uint8_t>(hc >> 8), ip[11] = static_cast<uint8_t>(hc);
  ip[24] = 0xff, ip[25] = 0xff, ip[26] = 0xfa, ip[27] = 0x00;  // sequence wraps too

  auto segs = SegmentIpv4Tcp(ip, 1500);
  ASSERT_EQ(segs.size(), 4u);
  Bytes joined;
  for (size_t k = 0; k < segs.size(); ++k) {
    const Bytes& s = segs[k];
    auto p = ParseIpv4Packet(s);
    ASSERT_TRUE(p) << k;  // length and header checksum
    EXPECT_EQ(s.size(), k < 3 ? 1500u : 20u + 32u + 7u);
    EXPECT_EQ(p->header.identification, static_cast<uint16_t>(0xfffe + k));
    EXPECT_TRUE(p->header.dont_fragment);
    const uint32_t seq =
        uint32_t{s[24]} << 24 | uint32_t{s[25]} << 16 | uint32_t{s[26]} << 8 | s[27];
    EXPECT_EQ(seq, static_cast<uint32_t>(0xfffffa00u + 1448u * k));
    EXPECT_EQ(s[33] & 0x09, k == 3 ? 0x09 : 0) << "FIN and PSH on the last segment only";
    EXPECT_EQ(s[33] & 0x80, k == 0 ? 0x80 : 0) << "CWR on the first only";
    EXPECT_EQ(s[33] & 0x10, 0x10);
    EXPECT_TRUE(std::equal(s.begin() + 40, s.begin() + 52, ip.begin() + 40)) << "options kept";
    Bytes f(14, 0);
    f.insert(f.end(), s.begin(), s.end());
    EXPECT_TRUE(Ipv4TransportChecksumOk(f, 14)) << k;
    joined.insert(joined.end(), s.begin() + 52, s.end());
  }
  EXPECT_TRUE(std::equal(joined.begin(), joined.end(), ip.begin() + 52, ip.end()));
  EXPECT_TRUE(SegmentIpv4Tcp(ip, total).empty()) << "fits";
  EXPECT_TRUE(SegmentIpv4Tcp(ip, 52).empty()) << "no room for payload";
  Bytes udp = ip;
  udp[9] = ipproto::kUdp;
  EXPECT_TRUE(SegmentIpv4Tcp(udp, 1500).empty());
  Bytes frag = ip;
  frag[6] |= 0x20;  // MF
  EXPECT_TRUE(SegmentIpv4Tcp(frag, 1500).empty());
  EXPECT_TRUE(SegmentIpv4Tcp(std::span<const uint8_t>(ip).first(30), 20).empty());
}

TEST(TransportChecksum, CompletesAnIpv6UdpChecksumAndNeverWritesZero) {
  Ipv6Address src{}, dst{};
  src[0] = 0x20, src[1] = 0x01, src[2] = 0x0d, src[3] = 0xb8, src[15] = 1;
  dst[0] = 0x20, dst[1] = 0x01, dst[2] = 0x0d, dst[3] = 0xb8, dst[15] = 2;
  Bytes udp = {0x30, 0x39, 0x00, 0x35, 0, 12, 0xab, 0xcd, 'k', 'a', 'g', 'e'};
  Bytes f = {2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd, 0x60, 0, 0, 0, 0, 12, 17, 64};
  f.insert(f.end(), src.begin(), src.end());
  f.insert(f.end(), dst.begin(), dst.end());
  f.insert(f.end(), udp.begin(), udp.end());
  ASSERT_TRUE(CompleteTransportChecksum(f));
  std::span<const uint8_t> upper(f.data() + 54, 12);
  EXPECT_EQ(Ipv6PseudoHeaderChecksum(src, dst, 17, upper), 0);
  EXPECT_NE(f[60] | f[61], 0);
}

TEST(TransportChecksum, LeavesOtherAndMalformedFramesAlone) {
  auto good = Ipv4TcpFrame(10);
  std::vector<Bytes> bad;
  bad.push_back(Bytes(good.begin(), good.begin() + 13));  // no ether type
  bad.push_back(Bytes(good.begin(), good.begin() + 40));  // truncated IPv4
  bad.push_back(Bytes(good.begin(), good.end() - 1));     // shorter than total length
  auto frag = good;
  frag[14 + 6] |= 0x20;  // more fragments
  bad.push_back(frag);
  auto icmp = good;
  icmp[14 + 9] = 1;  // ICMP
  bad.push_back(icmp);
  auto arp = good;
  arp[12] = 0x08, arp[13] = 0x06;  // ARP
  bad.push_back(arp);
  auto ihl = good;
  ihl[14] = 0x44;  // IHL 16 bytes
  bad.push_back(ihl);
  for (auto& f : bad) {
    auto before = f;
    EXPECT_FALSE(CompleteTransportChecksum(f));
    EXPECT_EQ(f, before);
  }
}

}  // namespace
}  // namespace kagemusha::tunnel

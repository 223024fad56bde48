// Neighbor Discovery and ARP codec tests: known answers from the RFC 4861 /
// RFC 826 layouts, round trips, the §6.1/§7.1 validity rules, and the
// gratuitous announcements a host sends after a guest moves.
#include <gtest/gtest.h>

#include "kagemusha/tunnel/arp.h"
#include "kagemusha/tunnel/neighbor_discovery.h"

namespace kagemusha::tunnel {
namespace {

using Bytes = std::vector<uint8_t>;

const Ipv6Address kLl = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
const Ipv6Address kGuest = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 1, 0x23, 0x45, 0x67, 0x89};
const MacAddress kMac = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};

TEST(SolicitedNode, DerivesGroupAndMulticastMac) {
  auto g = SolicitedNodeMulticast(kGuest);
  Ipv6Address want = {0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0x45, 0x67, 0x89};
  EXPECT_EQ(g, want);
  EXPECT_EQ(FormatIpv6(g), "ff02::1:ff45:6789");
  EXPECT_EQ(MulticastMac(g), (MacAddress{0x33, 0x33, 0xff, 0x45, 0x67, 0x89}));
  EXPECT_EQ(MulticastMac(kAllNodesMulticast), (MacAddress{0x33, 0x33, 0, 0, 0, 1}));
}

TEST(NeighborAdvertisement, EncodesKnownAnswerLayout) {
  NeighborAdvertisement na{false, true, true, kGuest, kMac};
  auto m = EncodeNeighborAdvertisement(na, kGuest, kLl);
  Bytes want = {136, 0, 0, 0, 0x60, 0, 0, 0};  // S|O
  want.insert(want.end(), kGuest.begin(), kGuest.end());
  want.insert(want.end(), {2, 1});
  want.insert(want.end(), kMac.begin(), kMac.end());
  Bytes got = m;
  got[2] = got[3] = 0;
  EXPECT_EQ(got, want);
  EXPECT_EQ(Ipv6PseudoHeaderChecksum(kGuest, kLl, ipproto::kIcmpv6, m), 0);
}

TEST(NeighborAdvertisement, RoundTripsFlags) {
  for (int f = 0; f < 8; ++f) {
    NeighborAdvertisement na{bool(f & 4), bool(f & 2), bool(f & 1), kGuest, std::nullopt};
    auto m = EncodeNeighborAdvertisement(na, kGuest, kLl);
    auto d = DecodeNeighborAdvertisement(m, {kGuest, kLl, 255});
    ASSERT_TRUE(d) << d.error().message();
    EXPECT_EQ(*d, na);
  }
}

TEST(NeighborSolicitation, RoundTripsWithSourceLinkLayer) {
  NeighborSolicitation ns{kGuest, kMac};
  auto dst = SolicitedNodeMulticast(kGuest);
  auto m = EncodeNeighborSolicitation(ns, kLl, dst);
  EXPECT_EQ(m.size(), 32u);
  auto d = DecodeNeighborSolicitation(m, {kLl, dst, 255});
  ASSERT_TRUE(d);
  EXPECT_EQ(*d, ns);
}

TEST(RouterAdvertisement, RoundTripsPrefixMtuAndHomeAgentFlag) {
  RouterAdvertisement ra;
  ra.cur_hop_limit = 64;
  ra.managed = true;
  ra.home_agent = true;
  ra.router_lifetime = 1800;
  ra.reachable_time = 30000;
  ra.retrans_timer = 1000;
  ra.source_link_layer = kMac;
  ra.mtu = 1400;
  ra.prefixes.push_back({64, true, true, true, 86400, 14400, kGuest});
  ra.prefixes.push_back({48, false, true, false, 100, 50, kLl});
  auto m = EncodeRouterAdvertisement(ra, kLl, kAllNodesMulticast);
  EXPECT_EQ(m.size(), 16u + 8 + 8 + 32 + 32);
  EXPECT_EQ(m[5], 0xa0);  // M | H
  auto d = DecodeRouterAdvertisement(m, {kLl, kAllNodesMulticast, 255});
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(*d, ra);
}

TEST(RouterSolicitation, RoundTripsAndSkipsUnknownOptions) {
  auto m = EncodeRouterSolicitation({kMac}, kLl, kAllRoutersMulticast);
  // Append an unknown option (type 200, one 8-octet unit) and fix the checksum.
  m.insert(m.end(), {200, 1, 0, 0, 0, 0, 0, 0});
  m[2] = m[3] = 0;
  uint16_t c = Ipv6PseudoHeaderChecksum(kLl, kAllRoutersMulticast, ipproto::kIcmpv6, m);
  m[2] = uint8_t(c >> 8);
  m[3] = uint8_t(c);
  auto d = DecodeRouterSolicitation(m, {kLl, kAllRoutersMulticast, 255});
  ASSERT_TRUE(d) << d.error().message();
  EXPECT_EQ(d->source_link_layer, kMac);
}

// Re-checksums a mutated message so a test exercises the rule it names, not the
// checksum.
Bytes Resum(Bytes m, const Ipv6Address& s, const Ipv6Address& d) {
  m[2] = m[3] = 0;
  uint16_t c = Ipv6PseudoHeaderChecksum(s, d, ipproto::kIcmpv6, m);
  m[2] = uint8_t(c >> 8);
  m[3] = uint8_t(c);
  return m;
}

TEST(NeighborDiscovery, RejectsEveryRfc4861ValidityViolation) {
  auto sn = SolicitedNodeMulticast(kGuest);
  auto ns = EncodeNeighborSolicitation({kGuest, kMac}, kLl, sn);
  NdContext ok{kLl, sn, 255};
  ASSERT_TRUE(DecodeNeighborSolicitation(ns, ok));
  EXPECT_FALSE(DecodeNeighborSolicitation(ns, {kLl, sn, 254})) << "hop limit";
  Bytes code = ns;
  code[1] = 1;
  EXPECT_FALSE(DecodeNeighborSolicitation(Resum(code, kLl, sn), ok)) << "code";
  Bytes sum = ns;
  sum[20] ^= 1;
  EXPECT_FALSE(DecodeNeighborSolicitation(sum, ok)) << "checksum";
  EXPECT_FALSE(DecodeNeighborSolicitation(Resum(Bytes(ns.begin(), ns.begin() + 23), kLl, sn), ok))
      << "short";
  Bytes zero_len = ns;
  zero_len[25] = 0;
  EXPECT_FALSE(DecodeNeighborSolicitation(Resum(zero_len, kLl, sn), ok)) << "zero-length option";
  Bytes overrun = ns;
  overrun[25] = 2;
  EXPECT_FALSE(DecodeNeighborSolicitation(Resum(overrun, kLl, sn), ok)) << "option overrun";
  Bytes truncated_opt = ns;
  truncated_opt.push_back(1);
  EXPECT_FALSE(DecodeNeighborSolicitation(Resum(truncated_opt, kLl, sn), ok))
      << "option missing length";
  auto mc = EncodeNeighborSolicitation({kAllNodesMulticast, std::nullopt}, kLl, sn);
  EXPECT_FALSE(DecodeNeighborSolicitation(mc, ok)) << "multicast target";
  Ipv6Address unspec{};
  auto dad_sll = EncodeNeighborSolicitation({kGuest, kMac}, unspec, sn);
  EXPECT_FALSE(DecodeNeighborSolicitation(dad_sll, {unspec, sn, 255})) << "DAD with source LL";
  auto dad_wrong = EncodeNeighborSolicitation({kGuest, std::nullopt}, unspec, kAllNodesMulticast);
  EXPECT_FALSE(DecodeNeighborSolicitation(dad_wrong, {unspec, kAllNodesMulticast, 255}))
      << "DAD dst";
  auto dad = EncodeNeighborSolicitation({kGuest, std::nullopt}, unspec, sn);
  EXPECT_TRUE(DecodeNeighborSolicitation(dad, {unspec, sn, 255}));
  auto na_s = EncodeNeighborAdvertisement({false, true, false, kGuest, std::nullopt}, kGuest,
                                          kAllNodesMulticast);
  EXPECT_FALSE(DecodeNeighborAdvertisement(na_s, {kGuest, kAllNodesMulticast, 255}))
      << "multicast NA with S";
  EXPECT_FALSE(DecodeNeighborAdvertisement(ns, ok)) << "NS decoded as NA";
  auto ra = EncodeRouterAdvertisement({}, kGuest, kAllNodesMulticast);
  EXPECT_FALSE(DecodeRouterAdvertisement(ra, {kGuest, kAllNodesMulticast, 255}))
      << "RA from global source";
  RouterAdvertisement with_prefix;
  with_prefix.prefixes.push_back({});
  auto rp = EncodeRouterAdvertisement(with_prefix, kLl, kAllNodesMulticast);
  rp[17] = 3;  // prefix option claims 3 units
  EXPECT_FALSE(DecodeRouterAdvertisement(Resum(rp, kLl, kAllNodesMulticast),
                                         {kLl, kAllNodesMulticast, 255}));
  RouterAdvertisement with_mtu;
  with_mtu.mtu = 1400;
  auto rm = EncodeRouterAdvertisement(with_mtu, kLl, kAllNodesMulticast);
  rm.insert(rm.end(), 8, 0);
  rm[17] = 2;  // MTU option claims 2 units
  EXPECT_FALSE(
      DecodeRouterAdvertisement(Resum(rm, kLl, kAllNodesMulticast), {kLl, kAllNodesMulticast, 255}))
      << "MTU option length";
  Bytes big_lla = EncodeNeighborSolicitation({kGuest, std::nullopt}, kLl, sn);
  big_lla.insert(big_lla.end(), {1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  EXPECT_FALSE(DecodeNeighborSolicitation(Resum(big_lla, kLl, sn), ok))
      << "16-byte link-layer option";
  auto rs = EncodeRouterSolicitation({kMac}, unspec, kAllRoutersMulticast);
  EXPECT_FALSE(DecodeRouterSolicitation(rs, {unspec, kAllRoutersMulticast, 255}))
      << "RS from :: with SLLA";
}

TEST(UnsolicitedNeighborAdvertisement, AnnouncesTargetToAllNodes) {
  auto frame = BuildUnsolicitedNeighborAdvertisementFrame(kMac, kGuest);
  auto eth = ParseEthernetFrame(frame);
  ASSERT_TRUE(eth);
  EXPECT_EQ(eth->dst, (MacAddress{0x33, 0x33, 0, 0, 0, 1}));
  EXPECT_EQ(eth->src, kMac);
  auto ip = ParseIpv6Packet(eth->payload);
  ASSERT_TRUE(ip);
  EXPECT_EQ(ip->header.hop_limit, 255);
  EXPECT_EQ(ip->header.dst, kAllNodesMulticast);
  auto na = DecodeNeighborAdvertisement(ip->payload,
                                        {ip->header.src, ip->header.dst, ip->header.hop_limit});
  ASSERT_TRUE(na) << na.error().message();
  EXPECT_TRUE(na->override);
  EXPECT_FALSE(na->solicited);
  EXPECT_FALSE(na->router);
  EXPECT_EQ(na->target, kGuest);
  EXPECT_EQ(na->target_link_layer, kMac);
}

TEST(NeighborSolicitationFrame, DadProbeOmitsSourceLinkLayer) {
  auto frame = BuildNeighborSolicitationFrame(kMac, Ipv6Address{}, kGuest);
  auto eth = ParseEthernetFrame(frame);
  EXPECT_EQ(eth->dst, (MacAddress{0x33, 0x33, 0xff, 0x45, 0x67, 0x89}));
  auto ip = ParseIpv6Packet(eth->payload);
  auto ns = DecodeNeighborSolicitation(ip->payload,
                                       {ip->header.src, ip->header.dst, ip->header.hop_limit});
  ASSERT_TRUE(ns) << ns.error().message();
  EXPECT_FALSE(ns->source_link_layer);
}

// ---- ARP -----------------------------------------------------------------------

TEST(Arp, EncodesKnownAnswerLayout) {
  ArpPacket p{kArpOpReply, kMac, {192, 0, 2, 7}, {2, 0, 0, 0, 0, 9}, {192, 0, 2, 9}};
  Bytes want = {0,   1, 8, 0, 6, 4, 0, 2, 0x52, 0x54, 0,   0x12, 0x34, 0x56,
                192, 0, 2, 7, 2, 0, 0, 0, 0,    9,    192, 0,    2,    9};
  EXPECT_EQ(EncodeArp(p), want);
  auto d = DecodeArp(want);
  ASSERT_TRUE(d);
  EXPECT_EQ(*d, p);
  EXPECT_FALSE(IsGratuitous(p));
}

TEST(Arp, GratuitousRequestIsBroadcastWithEqualAddresses) {
  auto frame = BuildGratuitousArpFrame(kMac, {203, 0, 113, 5});
  auto eth = ParseEthernetFrame(frame);
  ASSERT_TRUE(eth);
  EXPECT_EQ(eth->dst, kBroadcastMac);
  EXPECT_EQ(eth->ether_type, ethertype::kArp);
  auto a = DecodeArp(eth->payload);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->operation, kArpOpRequest);
  EXPECT_TRUE(IsGratuitous(*a));
  EXPECT_EQ(a->target_mac, MacAddress{});
  auto reply =
      DecodeArp(ParseEthernetFrame(BuildGratuitousArpFrame(kMac, {203, 0, 113, 5}, true))->payload);
  EXPECT_EQ(reply->operation, kArpOpReply);
  EXPECT_EQ(reply->target_mac, kMac);
}

TEST(Arp, IgnoresEthernetPaddingAndRejectsMalformed) {
  Bytes p = EncodeArp({kArpOpRequest, kMac, {192, 0, 2, 1}, {}, {192, 0, 2, 2}});
  Bytes padded = p;
  padded.resize(46, 0);
  EXPECT_TRUE(DecodeArp(padded));
  EXPECT_FALSE(DecodeArp(Bytes(p.begin(), p.end() - 1))) << "truncated";
  auto mutate = [&](size_t i, uint8_t v) {
    Bytes b = p;
    b[i] = v;
    return DecodeArp(b).has_value();
  };
  EXPECT_FALSE(mutate(1, 6)) << "hardware type";
  EXPECT_FALSE(mutate(2, 0x86)) << "protocol type";
  EXPECT_FALSE(mutate(4, 8)) << "hardware length";
  EXPECT_FALSE(mutate(5, 16)) << "protocol length";
  EXPECT_FALSE(mutate(7, 3)) << "RARP operation";
}

}  // namespace
}  // namespace kagemusha::tunnel

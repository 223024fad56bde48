// Unit tests of the fast path's pure parts: the binding mirror (which kernel
// map entries change when the cache did), BindingCache::generation(), the
// HA's Packet Too Big decision and the mode parser. The eBPF programs
// themselves are exercised end to end by tests/tunnel/test_fastpath.sh.
#include "kagemusha/tunnel/fastpath.h"

#include <gtest/gtest.h>

#include <algorithm>

#include "kagemusha/tunnel/packet_io.h"

namespace kagemusha::tunnel {
namespace {

using namespace std::chrono_literals;

const Ipv6Address kHoa1 = *ParseIpv6("2001:db8:1::100");
const Ipv6Address kHoa2 = *ParseIpv6("2001:db8:1::101");
const Ipv6Address kCoaA = *ParseIpv6("2001:db8:a::10");
const Ipv6Address kCoaB = *ParseIpv6("2001:db8:b::10");
const Ipv6Address kHa = *ParseIpv6("2001:db8:1::2");
const Ipv6Address kCn = *ParseIpv6("2001:db8:c::10");
const MacAddress kHaMac = {0x02, 0x4b, 0x4d, 0, 0, 2};
const MacAddress kRouterMac = {0x02, 0x4b, 0x4d, 0, 0, 1};

CacheEntry Entry(const Ipv6Address& hoa, const Ipv6Address& coa, int expires_s = 100) {
  CacheEntry e;
  e.home_address = hoa;
  e.care_of = coa;
  e.expires = Clock::TimePoint{} + std::chrono::seconds(expires_s);
  return e;
}

TEST(BindingMirror, PublishesNewBindingsOnce) {
  BindingCache cache;
  BindingMirror mirror;
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA)));
  ASSERT_TRUE(cache.Upsert(Entry(kHoa2, kCoaA)));
  auto ch = mirror.Update(cache);
  EXPECT_EQ(ch.upserts.size(), 2u);
  EXPECT_TRUE(ch.removals.empty());
  EXPECT_EQ(mirror.size(), 2u);
  EXPECT_TRUE(mirror.Update(cache).empty()) << "nothing changed, nothing to write";
}

TEST(FastPathKey4, IsTheIpv4MappedAddress) {
  EXPECT_EQ(FastPathKey4({192, 0, 2, 7}), *ParseIpv6("::ffff:192.0.2.7"));
  EXPECT_NE(FastPathKey4({192, 0, 2, 7}), FastPathKey4({192, 0, 2, 8}));
}

TEST(FastPathKeys, Ipv6HomeAddressesThenTheIpv4Key) {
  HostFastPathSession s;
  s.home_addresses = {kHoa1, kHoa2};
  EXPECT_EQ(FastPathKeys(s), (std::vector<Ipv6Address>{kHoa1, kHoa2}));
  s.home_address4 = Ipv4Address{10, 1, 0, 100};
  EXPECT_EQ(FastPathKeys(s),
            (std::vector<Ipv6Address>{kHoa1, kHoa2, *ParseIpv6("::ffff:10.1.0.100")}));
}

TEST(BindingMirror, PublishesTheIpv4HomeAddressUnderItsMappedKey) {
  BindingCache cache;
  BindingMirror mirror;
  const Ipv6Address key4 = FastPathKey4({10, 1, 0, 100});
  CacheEntry e = Entry(kHoa1, kCoaA);
  e.home_address4 = Ipv4Address{10, 1, 0, 100};
  ASSERT_TRUE(cache.Upsert(e));
  auto ch = mirror.Update(cache);
  ASSERT_EQ(ch.upserts.size(), 2u);
  EXPECT_TRUE(std::count(ch.upserts.begin(), ch.upserts.end(), std::pair(key4, kCoaA)) == 1);
  // A move takes both keys to the new care-of address.
  e.care_of = kCoaB;
  ASSERT_TRUE(cache.Upsert(e));
  ch = mirror.Update(cache);
  ASSERT_EQ(ch.upserts.size(), 2u);
  EXPECT_TRUE(std::count(ch.upserts.begin(), ch.upserts.end(), std::pair(key4, kCoaB)) == 1);
  // The IPv4 address dropped on a refresh (e.g. refused): only its key goes.
  e.home_address4.reset();
  ASSERT_TRUE(cache.Upsert(e));
  ch = mirror.Update(cache);
  EXPECT_TRUE(ch.upserts.empty());
  EXPECT_EQ(ch.removals, std::vector<Ipv6Address>{key4});
  // Deregistration removes the rest.
  ASSERT_TRUE(cache.Remove(kHoa1));
  ch = mirror.Update(cache);
  EXPECT_EQ(ch.removals, std::vector<Ipv6Address>{kHoa1});
}

TEST(BindingMirror, RefreshWithTheSameCareOfChangesNothing) {
  BindingCache cache;
  BindingMirror mirror;
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA, 100)));
  mirror.Update(cache);
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA, 700)));  // a refresh: new expiry only
  EXPECT_TRUE(mirror.Update(cache).empty());
}

TEST(BindingMirror, MoveToAnotherCareOfIsAnUpsert) {
  BindingCache cache;
  BindingMirror mirror;
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA)));
  mirror.Update(cache);
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaB)));
  auto ch = mirror.Update(cache);
  ASSERT_EQ(ch.upserts.size(), 1u);
  EXPECT_EQ(ch.upserts[0].first, kHoa1);
  EXPECT_EQ(ch.upserts[0].second, kCoaB);
  EXPECT_TRUE(ch.removals.empty());
}

TEST(BindingMirror, DeregistrationAndExpiryAreRemovals) {
  BindingCache cache;
  BindingMirror mirror;
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA, 10)));
  ASSERT_TRUE(cache.Upsert(Entry(kHoa2, kCoaB, 50)));
  mirror.Update(cache);
  ASSERT_TRUE(cache.Remove(kHoa1));
  auto ch = mirror.Update(cache);
  ASSERT_EQ(ch.removals.size(), 1u);
  EXPECT_EQ(ch.removals[0], kHoa1);
  EXPECT_TRUE(ch.upserts.empty());
  ASSERT_EQ(cache.Expire(Clock::TimePoint{} + 60s).size(), 1u);
  ch = mirror.Update(cache);
  ASSERT_EQ(ch.removals.size(), 1u);
  EXPECT_EQ(ch.removals[0], kHoa2);
  EXPECT_EQ(mirror.size(), 0u);
}

TEST(BindingMirror, ResetRepublishesEverything) {
  BindingCache cache;
  BindingMirror mirror;
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA)));
  mirror.Update(cache);
  mirror.Reset();
  EXPECT_EQ(mirror.Update(cache).upserts.size(), 1u);
}

TEST(BindingCacheGeneration, MovesOnEveryChangeAndOnlyThen) {
  BindingCache cache(1);
  uint64_t g = cache.generation();
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA, 10)));
  EXPECT_GT(cache.generation(), g);
  g = cache.generation();
  EXPECT_FALSE(cache.Upsert(Entry(kHoa2, kCoaA)));  // full: refused
  EXPECT_EQ(cache.generation(), g);
  EXPECT_FALSE(cache.Remove(kHoa2));  // not there
  EXPECT_EQ(cache.generation(), g);
  EXPECT_NE(cache.Find(kHoa1), nullptr);
  EXPECT_EQ(cache.generation(), g);
  EXPECT_TRUE(cache.SetState(kHoa1, CacheEntryState::kOptimistic));
  EXPECT_GT(cache.generation(), g);
  g = cache.generation();
  EXPECT_TRUE(cache.Expire(Clock::TimePoint{} + 5s).empty());
  EXPECT_EQ(cache.generation(), g);
  EXPECT_EQ(cache.Expire(Clock::TimePoint{} + 10s).size(), 1u);
  EXPECT_GT(cache.generation(), g);
}

// A frame from the home router to the HA's MAC, carrying an IPv6 packet of
// `size` bytes from the CN to `dst`.
std::vector<uint8_t> Frame(const Ipv6Address& dst, size_t size, uint8_t next_header = 6,
                           const MacAddress& to = kHaMac, uint8_t first_byte = 0) {
  Ipv6Header h;
  h.src = kCn;
  h.dst = dst;
  h.next_header = next_header;
  std::vector<uint8_t> payload(size - kIpv6HeaderSize, 0xab);
  payload[0] = first_byte;
  auto ip = BuildIpv6Packet(h, payload);
  return BuildEthernetFrame(to, kRouterMac, ethertype::kIpv6, *ip);
}

TEST(HaPacketTooBigFor, AnswersAnOversizePacketForABoundHomeAddress) {
  BindingCache cache;
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA)));
  auto frame = Frame(kHoa1, 1500);
  auto ptb = HaPacketTooBigFor(frame, kHaMac, kHa, 1460, cache);
  ASSERT_TRUE(ptb.has_value());
  auto ip = ParseIpv6Packet(*ptb);
  ASSERT_TRUE(ip);
  EXPECT_EQ(ip->header.src, kHa);
  EXPECT_EQ(ip->header.dst, kCn);
  EXPECT_EQ(ip->header.next_header, ipproto::kIcmpv6);
  auto icmp = ParseIcmpv6(ip->header.src, ip->header.dst, ip->payload);
  ASSERT_TRUE(icmp) << "checksum must verify";
  EXPECT_EQ(icmp->type, kIcmpv6PacketTooBig);
  EXPECT_EQ(icmp->word, 1460u);
  EXPECT_LE(ptb->size(), 1280u);
  // The quote starts with the invoking packet's header.
  ASSERT_GE(icmp->body.size(), kIpv6HeaderSize);
  EXPECT_TRUE(std::equal(icmp->body.begin(), icmp->body.begin() + 40, frame.begin() + 14));
}

TEST(HaPacketTooBigFor, LeavesEverythingElseAlone) {
  BindingCache cache;
  ASSERT_TRUE(cache.Upsert(Entry(kHoa1, kCoaA)));
  EXPECT_FALSE(HaPacketTooBigFor(Frame(kHoa1, 1460), kHaMac, kHa, 1460, cache))
      << "fits the tunnel";
  EXPECT_FALSE(HaPacketTooBigFor(Frame(kHoa2, 1500), kHaMac, kHa, 1460, cache)) << "not bound";
  EXPECT_FALSE(HaPacketTooBigFor(Frame(kHoa1, 1500, 6, kRouterMac), kHaMac, kHa, 1460, cache))
      << "not sent to the HA's MAC";
  EXPECT_FALSE(
      HaPacketTooBigFor(Frame(kHoa1, 1500, ipproto::kIcmpv6, kHaMac, 1), kHaMac, kHa, 1460, cache))
      << "an ICMPv6 error (destination unreachable) is never answered with one";
  EXPECT_TRUE(HaPacketTooBigFor(Frame(kHoa1, 1500, ipproto::kIcmpv6, kHaMac, 128), kHaMac, kHa,
                                1460, cache))
      << "an oversize echo request is";
  EXPECT_FALSE(HaPacketTooBigFor(Frame(kHoa1, 1500), kHaMac, kHa, 1200, cache))
      << "below 1280 the HA fragments instead (RFC 2473 7.1)";
  std::vector<uint8_t> garbage(1500, 0x60);
  EXPECT_FALSE(HaPacketTooBigFor(garbage, kHaMac, kHa, 1460, cache));
  EXPECT_FALSE(HaPacketTooBigFor(std::span<const uint8_t>(), kHaMac, kHa, 1460, cache));
}

// A frame to the HA's MAC carrying an IPv4 TCP packet of `size` bytes from
// the CN's IPv4 address to `dst`.
const Ipv4Address kHoa4 = {10, 1, 0, 100};
const Ipv4Address kHa4 = {10, 1, 0, 2};
const Ipv4Address kCn4 = {10, 3, 0, 10};
std::vector<uint8_t> Frame4(const Ipv4Address& dst, size_t size, bool df = true,
                            uint8_t protocol = 6, uint8_t first_byte = 0) {
  std::vector<uint8_t> payload(size - kIpv4MinHeaderSize, 0xab);
  payload[0] = first_byte;
  auto ip = BuildIpv4Packet({.dont_fragment = df, .protocol = protocol, .src = kCn4, .dst = dst},
                            payload);
  return BuildEthernetFrame(kHaMac, kRouterMac, ethertype::kIpv4, *ip);
}

TEST(HaPacketTooBigFor, AnswersAnOversizeDfIpv4PacketWithFragmentationNeeded) {
  BindingCache cache;
  CacheEntry e = Entry(kHoa1, kCoaA);
  e.home_address4 = kHoa4;
  ASSERT_TRUE(cache.Upsert(e));
  auto frame = Frame4(kHoa4, 1500);
  auto err = HaPacketTooBigFor(frame, kHaMac, kHa, 1460, cache, kHa4);
  ASSERT_TRUE(err.has_value());
  auto ip = ParseIpv4Packet(*err);
  ASSERT_TRUE(ip) << "header checksum must verify";
  EXPECT_EQ(ip->header.src, kHa4);
  EXPECT_EQ(ip->header.dst, kCn4);
  EXPECT_EQ(ip->header.protocol, 1);
  ASSERT_GE(ip->payload.size(), 8u + kIpv4MinHeaderSize);
  EXPECT_EQ(ip->payload[0], 3);  // destination unreachable
  EXPECT_EQ(ip->payload[1], 4);  // fragmentation needed
  EXPECT_EQ((ip->payload[6] << 8) | ip->payload[7], 1460);
  EXPECT_TRUE(std::equal(ip->payload.begin() + 8, ip->payload.begin() + 28, frame.begin() + 14));

  EXPECT_FALSE(HaPacketTooBigFor(frame, kHaMac, kHa, 1460, cache))
      << "no IPv4 address for the HA: nothing";
  EXPECT_FALSE(HaPacketTooBigFor(Frame4(kHoa4, 1460), kHaMac, kHa, 1460, cache, kHa4))
      << "fits the tunnel";
  EXPECT_FALSE(HaPacketTooBigFor(Frame4(kHoa4, 1500, false), kHaMac, kHa, 1460, cache, kHa4))
      << "without DF it is only forwarded (the outer packet is fragmented)";
  EXPECT_FALSE(HaPacketTooBigFor(Frame4({10, 1, 0, 101}, 1500), kHaMac, kHa, 1460, cache, kHa4))
      << "not bound";
  EXPECT_FALSE(HaPacketTooBigFor(Frame4(kHoa4, 1500, true, 1, 3), kHaMac, kHa, 1460, cache, kHa4))
      << "an ICMP error is never answered with one";
  EXPECT_TRUE(HaPacketTooBigFor(Frame4(kHoa4, 1500, true, 1, 8), kHaMac, kHa, 1460, cache, kHa4))
      << "an oversize echo request is";
}

TEST(FastPathMode, ParsesTheThreeModes) {
  EXPECT_EQ(*ParseFastPathMode("auto"), FastPathMode::kAuto);
  EXPECT_EQ(*ParseFastPathMode("on"), FastPathMode::kOn);
  EXPECT_EQ(*ParseFastPathMode("off"), FastPathMode::kOff);
  EXPECT_FALSE(ParseFastPathMode("yes"));
  EXPECT_FALSE(ParseFastPathMode(""));
  EXPECT_STREQ(FastPathModeName(FastPathMode::kOff), "off");
}

// ETHTOOL_GGRO needs no privilege; every namespace has a loopback.
TEST(InterfaceGro, ReadsTheLoopbackAndFailsForAMissingInterface) {
  auto lo = InterfaceGro("lo");
  ASSERT_TRUE(lo.has_value()) << lo.error().message();
  auto missing = InterfaceGro("kgm-no-such0");
  EXPECT_FALSE(missing.has_value());
  EXPECT_FALSE(SetInterfaceGro("kgm-no-such0", true).has_value());
}

}  // namespace
}  // namespace kagemusha::tunnel

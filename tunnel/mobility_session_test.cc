#include "kagemusha/tunnel/mobility_session.h"

#include <gtest/gtest.h>

#include <vector>

#include "kagemusha/tunnel/arp.h"
#include "kagemusha/tunnel/mh_auth.h"
#include "kagemusha/tunnel/mobility_header.h"
#include "kagemusha/tunnel/neighbor_discovery.h"

namespace kagemusha::tunnel {
namespace {

using namespace std::chrono_literals;

Ipv6Address V6(std::initializer_list<uint16_t> groups_and_tail) {
  // Tiny helper: the first four groups, then the last group (::x).
  std::vector<uint16_t> g(groups_and_tail);
  Ipv6Address a{};
  for (size_t i = 0; i + 1 < g.size() && i < 4; ++i) {
    a[i * 2] = static_cast<uint8_t>(g[i] >> 8);
    a[i * 2 + 1] = static_cast<uint8_t>(g[i]);
  }
  a[14] = static_cast<uint8_t>(g.back() >> 8);
  a[15] = static_cast<uint8_t>(g.back());
  return a;
}

const Ipv6Address kHomePrefix = V6({0x2001, 0xdb8, 1, 0, 0});
const Ipv6Address kHoa = V6({0x2001, 0xdb8, 1, 0, 0x10});
const Ipv6Address kHoa2 = V6({0x2001, 0xdb8, 1, 0, 0x11});
const Ipv6Address kHa = V6({0x2001, 0xdb8, 1, 0, 1});
const Ipv6Address kRouterGlobal = V6({0x2001, 0xdb8, 1, 0, 0xfe});
const Ipv6Address kRouterLl = V6({0xfe80, 0, 0, 0, 1});
const Ipv6Address kCoa = V6({0x2001, 0xdb8, 2, 0, 2});
const Ipv6Address kCorrespondent = V6({0x2001, 0xdb8, 9, 0, 9});
const Ipv6Address kGuestLl = V6({0xfe80, 0, 0, 0, 0x10});
const Ipv4Address kHoa4 = {192, 0, 2, 10};
const Ipv4Address kGateway4 = {192, 0, 2, 1};
const Ipv4Address kRemote4 = {203, 0, 113, 5};
const MacAddress kGuestMac = {0x52, 0x54, 0, 0, 0, 0x10};
const MacAddress kRouterMac = {0x02, 0, 0, 0, 0, 0xfe};
const MacAddress kOtherMac = {0x02, 0, 0, 0, 0, 0x77};

SessionConfig BaseConfig() {
  SessionConfig c;
  c.name = "vm1";
  c.guest_mac = kGuestMac;
  c.home_addresses = {kHoa};
  c.home_address4 = kHoa4;
  c.home_prefix = kHomePrefix;
  c.home_prefix_length = 64;
  c.router_mac = kRouterMac;
  c.router_link_local = kRouterLl;
  c.router_global = kRouterGlobal;
  c.router_v4 = kGateway4;
  c.home_agent = kHa;
  c.care_of = kCoa;
  c.tunnel_mtu = 1400;
  c.lifetime_seconds = 400;
  return c;
}

struct Harness {
  explicit Harness(SessionConfig config = BaseConfig())
      : session(std::move(config), SessionIo{&guest, &tunnel6, &tunnel4, &mobility}, clock, store,
                [this](const SessionEvent& e) { events.push_back(e); }) {}
  FakeClock clock;
  MemorySequenceStore store;
  FakePacketPort guest, tunnel6, tunnel4, mobility;
  std::vector<SessionEvent> events;
  MobilitySession session;

  // Parses every BU sent so far (and clears the record).
  std::vector<MobilityPacket> TakeBindingUpdates(std::vector<std::vector<uint8_t>>* raw = nullptr) {
    std::vector<MobilityPacket> out;
    auto sent = mobility.TakeSent();
    static std::vector<std::vector<uint8_t>> keep;
    keep.clear();
    for (auto& s : sent) keep.push_back(s.bytes);
    for (auto& bytes : keep) {
      auto p = ParseMobilityPacket(bytes);
      EXPECT_TRUE(p) << p.error().message();
      if (p) out.push_back(*p);
    }
    if (raw) *raw = keep;
    return out;
  }
  uint16_t LastBuSequence() {
    auto bus = TakeBindingUpdates();
    EXPECT_FALSE(bus.empty());
    return std::get<BindingUpdate>(bus.back().header.message).sequence;
  }
};

std::vector<uint8_t> BaFrame(const BindingAcknowledgement& ba, const Ipv6Address& src = kHa,
                             const Ipv6Address& hoa = kHoa) {
  auto pkt = BuildBindingAcknowledgementPacket(src, kCoa, hoa, ba);
  EXPECT_TRUE(pkt);
  return BuildEthernetFrame(kRouterMac, kOtherMac, ethertype::kIpv6, *pkt);
}

BindingAcknowledgement Ba(uint16_t seq, uint8_t status = 0, uint16_t lifetime_units = 100) {
  BindingAcknowledgement ba;
  ba.sequence = seq;
  ba.status = status;
  ba.lifetime = lifetime_units;
  return ba;
}

std::vector<uint8_t> GuestIpv6Frame(const Ipv6Address& src, const Ipv6Address& dst, size_t payload,
                                    const MacAddress& eth_src = kGuestMac,
                                    const MacAddress& eth_dst = kRouterMac) {
  Ipv6Header h;
  h.next_header = ipproto::kUdp;
  h.src = src;
  h.dst = dst;
  std::vector<uint8_t> body(payload, 0xab);
  auto pkt = BuildIpv6Packet(h, body);
  return BuildEthernetFrame(eth_dst, eth_src, ethertype::kIpv6, *pkt);
}

std::vector<uint8_t> GuestIpv4Frame(size_t payload, bool df, Ipv4Address src = kHoa4) {
  Ipv4Header h;
  h.protocol = ipproto::kUdp;
  h.src = src;
  h.dst = kRemote4;
  h.dont_fragment = df;
  std::vector<uint8_t> body(payload, 0xcd);
  auto pkt = BuildIpv4Packet(h, body);
  return BuildEthernetFrame(kRouterMac, kGuestMac, ethertype::kIpv4, *pkt);
}

// ---- Registration ------------------------------------------------------------------

TEST(MobilitySession, ActivateSendsBindingUpdateWithAckHomeFlagsHaoAndIpv4Option) {
  Harness h;
  h.session.Activate();
  auto bus = h.TakeBindingUpdates();
  ASSERT_EQ(bus.size(), 1u);
  const auto& p = bus[0];
  EXPECT_EQ(p.ip.header.src, kCoa);
  EXPECT_EQ(p.ip.header.dst, kHa);
  ASSERT_TRUE(p.ip.home_address);
  EXPECT_EQ(*p.ip.home_address, kHoa);
  const auto& bu = std::get<BindingUpdate>(p.header.message);
  EXPECT_EQ(bu.flags, bu_flag::kAcknowledge | bu_flag::kHomeRegistration);
  EXPECT_EQ(bu.lifetime, 100);  // 400 s in 4 s units
  ASSERT_EQ(bu.options.size(), 1u);
  const auto& v4 = std::get<Ipv4HomeAddress>(bu.options[0]);
  EXPECT_EQ(v4.address, kHoa4);
  EXPECT_EQ(h.session.state(), SessionState::kRegistering);
}

TEST(MobilitySession, ActivateAnnouncesRouterAddressesWithRouterMac) {
  Harness h;
  h.session.Activate();
  auto frames = h.guest.TakeSent();
  ASSERT_EQ(frames.size(), 3u);  // NA link-local, NA global, gratuitous ARP
  for (int i = 0; i < 2; ++i) {
    auto eth = ParseEthernetFrame(frames[i].bytes);
    ASSERT_TRUE(eth);
    EXPECT_EQ(eth->src, kRouterMac);
    auto ip = ParseIpv6Packet(eth->payload);
    ASSERT_TRUE(ip);
    auto na = DecodeNeighborAdvertisement(ip->payload, {ip->header.src, ip->header.dst, 255});
    ASSERT_TRUE(na) << na.error().message();
    EXPECT_TRUE(na->router);
    EXPECT_EQ(*na->target_link_layer, kRouterMac);
    EXPECT_EQ(na->target, i == 0 ? kRouterLl : kRouterGlobal);
  }
  auto eth = ParseEthernetFrame(frames[2].bytes);
  auto arp = DecodeArp(eth->payload);
  ASSERT_TRUE(arp);
  EXPECT_EQ(arp->sender_mac, kRouterMac);
  EXPECT_EQ(arp->sender_ip, kGateway4);
}

TEST(MobilitySession, AnnouncementsRepeatThreeTimesOneSecondApart) {
  Harness h;
  h.session.Activate();
  EXPECT_EQ(h.guest.TakeSent().size(), 3u);  // NA ll, NA global, ARP
  h.clock.Advance(999ms);
  h.session.OnTimer();
  EXPECT_EQ(h.guest.sent_count(), 0u);
  h.clock.Advance(1ms);
  h.session.OnTimer();
  EXPECT_EQ(h.guest.TakeSent().size(), 3u);
  h.clock.Advance(1s);
  h.session.OnTimer();
  EXPECT_EQ(h.guest.TakeSent().size(), 3u);
  h.clock.Advance(1s);
  h.session.OnTimer();
  EXPECT_EQ(h.guest.TakeSent().size(), 0u) << "three in all";

  // At home, likewise with the guest's MAC; then no timer is left, which is
  // what lets the daemon remove the TAP.
  h.session.ReturnHome();
  auto bus = h.TakeBindingUpdates();
  h.session.HandleUplinkFrame(
      BaFrame(Ba(std::get<BindingUpdate>(bus.back().header.message).sequence, 0, 0)));
  int frames = static_cast<int>(h.guest.TakeSent().size());
  while (auto d = h.session.NextDeadline()) {
    h.clock.Advance(*d - h.clock.Now());
    h.session.OnTimer();
  }
  frames += static_cast<int>(h.guest.TakeSent().size());
  EXPECT_EQ(frames, 6);  // (NA + ARP) x 3
  EXPECT_EQ(h.session.state(), SessionState::kHome);
}

TEST(MobilitySession, AuthenticatedBindingUpdateVerifiesWithConfiguredKey) {
  auto cfg = BaseConfig();
  cfg.auth = MobilityAuthConfig{0x1234, {1, 2, 3, 4, 5, 6, 7, 8}, MhAuthAlgorithm::kHmacSha256_128};
  Harness h(cfg);
  h.session.Activate();
  auto bus = h.TakeBindingUpdates();
  ASSERT_EQ(bus.size(), 1u);
  const std::vector<uint8_t> key = {1, 2, 3, 4, 5, 6, 7, 8};
  MhAuthParams params{0x1234, key, kCoa, kHoa, MhAuthAlgorithm::kHmacSha256_128};
  EXPECT_TRUE(VerifyMobilityMessageAuthentication(bus[0].mh, params));
  const std::vector<uint8_t> wrong = {9, 9, 9};
  params.key = wrong;
  EXPECT_FALSE(VerifyMobilityMessageAuthentication(bus[0].mh, params));
}

// Activate's exchange starts at InitialBindackTimeoutFirstReg (1.5 s), every
// other one (refresh, deregistration) at INITIAL_BINDACK_TIMEOUT (1 s); both
// double up to MAX_BINDACK_TIMEOUT (RFC 6275 §11.8, §13).
std::vector<int> RetransmissionIntervalsMs(Harness& h, size_t n) {
  std::vector<int> observed;
  auto last = h.clock.Now();
  for (size_t i = 0; i < n; ++i) {
    auto deadline = h.session.NextDeadline();
    EXPECT_TRUE(deadline);
    if (!deadline) break;
    // Nothing happens just before the deadline.
    h.clock.Advance(*deadline - h.clock.Now() - 1ms);
    h.session.OnTimer();
    EXPECT_EQ(h.mobility.sent_count(), 0u);
    h.clock.Advance(1ms);
    h.session.OnTimer();
    EXPECT_EQ(h.mobility.sent_count(), 1u);
    h.mobility.TakeSent();
    observed.push_back(static_cast<int>(
        std::chrono::duration_cast<std::chrono::milliseconds>(h.clock.Now() - last).count()));
    last = h.clock.Now();
  }
  return observed;
}

TEST(MobilitySession, FirstRegistrationBacksOffFromOneAndAHalfSecondsUpToThirtyTwo) {
  auto cfg = BaseConfig();
  cfg.timers.announcements = 1;  // only BU deadlines in NextDeadline()
  Harness h(cfg);
  h.session.Activate();
  ASSERT_EQ(h.TakeBindingUpdates().size(), 1u);
  EXPECT_EQ(RetransmissionIntervalsMs(h, 8),
            (std::vector<int>{1500, 3000, 6000, 12000, 24000, 32000, 32000, 32000}));
}

TEST(MobilitySession, FirstRegistrationTimerOutlastsTheHomeAgentsDad) {
  // An rfc-mode HA answers a new binding after RetransTimer (1 s): the BA
  // must still find its BU outstanding, not a retransmission.
  Harness h;
  h.session.Activate();
  auto seq = h.LastBuSequence();
  h.clock.Advance(1013ms);  // the BA's delay measured against kagemusha-ha --dad rfc
  h.session.OnTimer();
  EXPECT_EQ(h.mobility.sent_count(), 0u);
  h.session.HandleUplinkFrame(BaFrame(Ba(seq)));
  EXPECT_EQ(h.session.state(), SessionState::kRegistered);
  EXPECT_EQ(h.session.counters().ba_wrong_sequence, 0u);
}

TEST(MobilitySession, RetransmissionBacksOffOneTwoFourUpToThirtyTwoSeconds) {
  auto cfg = BaseConfig();
  cfg.timers.announcements = 1;  // only BU deadlines in NextDeadline()
  Harness h(cfg);
  h.session.Activate();
  auto seq = h.LastBuSequence();
  h.session.HandleUplinkFrame(BaFrame(Ba(seq, 0, 100)));
  h.clock.Advance(320s);  // the refresh: a new exchange, not a first registration
  h.session.OnTimer();
  ASSERT_EQ(h.TakeBindingUpdates().size(), 1u);
  EXPECT_EQ(RetransmissionIntervalsMs(h, 8),
            (std::vector<int>{1000, 2000, 4000, 8000, 16000, 32000, 32000, 32000}));
}

TEST(MobilitySession, EachBindingUpdateUsesANewSequenceNumber) {
  Harness h;
  h.session.Activate();
  auto s1 = h.LastBuSequence();
  h.clock.Advance(1500ms);
  h.session.OnTimer();
  auto s2 = h.LastBuSequence();
  EXPECT_EQ(static_cast<uint16_t>(s1 + 1), s2);
}

TEST(MobilitySession, AcceptedAckRegistersAndRefreshesAtEightyPercent) {
  Harness h;
  h.session.Activate();
  auto seq = h.LastBuSequence();
  h.session.HandleUplinkFrame(BaFrame(Ba(seq, 0, 100)));  // 400 s
  EXPECT_EQ(h.session.state(), SessionState::kRegistered);
  EXPECT_EQ(h.session.counters().ba_accepted, 1u);
  ASSERT_FALSE(h.events.empty());
  EXPECT_EQ(h.events.back().kind, SessionEvent::Kind::kRegistered);
  auto st = h.session.Status();
  ASSERT_TRUE(st.bindings[0].lifetime_left);
  EXPECT_EQ(st.bindings[0].lifetime_left->count(), 400);

  h.clock.Advance(319s);
  h.session.OnTimer();
  EXPECT_EQ(h.mobility.sent_count(), 0u);
  h.clock.Advance(1s);  // 320 s = 80 % of 400 s
  h.session.OnTimer();
  EXPECT_EQ(h.mobility.sent_count(), 1u);
  EXPECT_EQ(h.session.state(), SessionState::kRegistering);
}

TEST(MobilitySession, BindingRefreshAdviceShortensRefresh) {
  Harness h;
  h.session.Activate();
  auto seq = h.LastBuSequence();
  auto ba = Ba(seq, 0, 100);
  ba.options.push_back(BindingRefreshAdvice{10});  // 40 s
  h.session.HandleUplinkFrame(BaFrame(ba));
  h.clock.Advance(40s);
  h.session.OnTimer();
  EXPECT_EQ(h.mobility.sent_count(), 1u);
}

TEST(MobilitySession, BindingRefreshRequestTriggersBindingUpdate) {
  Harness h;
  h.session.Activate();
  auto seq = h.LastBuSequence();
  h.session.HandleUplinkFrame(BaFrame(Ba(seq)));
  ASSERT_EQ(h.session.state(), SessionState::kRegistered);
  // BRR from the HA straight to the CoA.
  auto mh = EncodeMobilityHeader(BindingRefreshRequest{}, ChecksumAddresses{kHa, kCoa});
  auto pkt = BuildMobilityPacket(kHa, kCoa, std::nullopt, std::nullopt, *mh);
  h.session.HandleUplinkFrame(BuildEthernetFrame(kRouterMac, kOtherMac, ethertype::kIpv6, *pkt));
  EXPECT_EQ(h.session.counters().brr_received, 1u);
  EXPECT_EQ(h.LastBuSequence(), static_cast<uint16_t>(seq + 1));
  // A BRR from someone else is ignored.
  auto spoof = BuildMobilityPacket(
      kCorrespondent, kCoa, std::nullopt, std::nullopt,
      *EncodeMobilityHeader(BindingRefreshRequest{}, ChecksumAddresses{kCorrespondent, kCoa}));
  h.session.HandleUplinkFrame(BuildEthernetFrame(kRouterMac, kOtherMac, ethertype::kIpv6, *spoof));
  EXPECT_EQ(h.session.counters().brr_received, 1u);
  EXPECT_EQ(h.session.counters().ba_wrong_source, 1u);
}

TEST(MobilitySession, Status135ResynchronisesSequenceFromHomeAgent) {
  Harness h;
  h.session.Activate();
  auto seq = h.LastBuSequence();
  h.session.HandleUplinkFrame(BaFrame(Ba(5000, ba_status::kSequenceNumberOutOfWindow, 0)));
  auto bus = h.TakeBindingUpdates();
  ASSERT_EQ(bus.size(), 1u) << "retried immediately";
  EXPECT_EQ(std::get<BindingUpdate>(bus[0].header.message).sequence, 5001);
  EXPECT_NE(seq, 5001);
  EXPECT_EQ(h.store.values[kHoa], 5001);
  ASSERT_FALSE(h.events.empty());
  EXPECT_EQ(h.events.back().kind, SessionEvent::Kind::kResynchronised);
  h.session.HandleUplinkFrame(BaFrame(Ba(5001)));
  EXPECT_EQ(h.session.state(), SessionState::kRegistered);
}

TEST(MobilitySession, Repeated135StopsRetryingImmediately) {
  Harness h;
  h.session.Activate();
  h.mobility.TakeSent();
  for (int i = 0; i < 10; ++i)
    h.session.HandleUplinkFrame(BaFrame(Ba(7, ba_status::kSequenceNumberOutOfWindow, 0)));
  EXPECT_EQ(h.mobility.sent_count(), 3u);
}

TEST(MobilitySession, OtherNonZeroStatusIsReportedAndStopsRetrying) {
  Harness h;
  h.session.Activate();
  auto seq = h.LastBuSequence();
  h.session.HandleUplinkFrame(BaFrame(Ba(seq, ba_status::kAdministrativelyProhibited, 0)));
  EXPECT_EQ(h.session.state(), SessionState::kRejected);
  ASSERT_FALSE(h.events.empty());
  EXPECT_EQ(h.events.back().kind, SessionEvent::Kind::kRejected);
  EXPECT_EQ(h.events.back().status, 129);
  EXPECT_EQ(*h.session.Status().last_ba_status, 129);
  h.clock.Advance(100s);
  h.session.OnTimer();
  EXPECT_EQ(h.mobility.sent_count(), 0u);
}

TEST(MobilitySession, Ipv4AddressRejectionIsReported) {
  Harness h;
  h.session.Activate();
  auto ba = Ba(h.LastBuSequence());
  ba.options.push_back(
      Ipv4AddressAcknowledgement{ipv4_ack_status::kAdministrativelyProhibited, 24, kHoa4});
  h.session.HandleUplinkFrame(BaFrame(ba));
  bool seen = false;
  for (const auto& e : h.events) seen |= e.kind == SessionEvent::Kind::kIpv4Rejected;
  EXPECT_TRUE(seen);
}

TEST(MobilitySession, SpoofedWrongSequenceBadAuthAndGarbageAcksAreIgnoredAndCounted) {
  auto cfg = BaseConfig();
  const std::vector<uint8_t> key = {7, 7, 7, 7};
  cfg.auth = MobilityAuthConfig{42, key, MhAuthAlgorithm::kHmacSha256_128};
  Harness h(cfg);
  h.session.Activate();
  auto seq = h.LastBuSequence();

  auto signed_ba = [&](const BindingAcknowledgement& ba, std::span<const uint8_t> k,
                       const Ipv6Address& src) {
    MhAuthParams params{42, k, kCoa, kHoa, MhAuthAlgorithm::kHmacSha256_128};
    auto mh = EncodeAuthenticatedMobilityHeader(ba, params, {src, kHoa});
    auto pkt = BuildMobilityPacket(src, kCoa, std::nullopt, kHoa, *mh);
    return BuildEthernetFrame(kRouterMac, kOtherMac, ethertype::kIpv6, *pkt);
  };
  // Spoofed source.
  h.session.HandleUplinkFrame(signed_ba(Ba(seq), key, kCorrespondent));
  // Wrong key.
  const std::vector<uint8_t> bad = {1, 1, 1, 1};
  h.session.HandleUplinkFrame(signed_ba(Ba(seq), bad, kHa));
  // No auth option at all.
  h.session.HandleUplinkFrame(BaFrame(Ba(seq)));
  // Wrong sequence.
  h.session.HandleUplinkFrame(signed_ba(Ba(static_cast<uint16_t>(seq + 7)), key, kHa));
  // Garbage: truncated, corrupted checksum, oversize, empty.
  auto good = signed_ba(Ba(seq), key, kHa);
  h.session.HandleUplinkFrame(std::span<const uint8_t>(good).first(good.size() - 3));
  auto corrupt = good;
  corrupt.back() ^= 0x40;
  h.session.HandleUplinkFrame(corrupt);
  std::vector<uint8_t> huge(9000, 0x60);
  h.session.HandleUplinkFrame(huge);
  h.session.HandleUplinkFrame({});

  const auto& c = h.session.counters();
  EXPECT_EQ(c.ba_wrong_source, 1u);
  EXPECT_EQ(c.ba_auth_failed, 2u);
  EXPECT_EQ(c.ba_wrong_sequence, 1u);
  EXPECT_EQ(c.mh_malformed, 4u);
  EXPECT_EQ(c.ba_accepted, 0u);
  EXPECT_EQ(h.session.state(), SessionState::kRegistering);
  // The genuine one still works afterwards.
  h.session.HandleUplinkFrame(good);
  EXPECT_EQ(h.session.state(), SessionState::kRegistered);
}

TEST(MobilitySession, SequenceNumbersPersistAcrossRestart) {
  FakeClock clock;
  MemorySequenceStore store;
  FakePacketPort guest, t6, t4, mob;
  uint16_t last = 0;
  {
    MobilitySession s(BaseConfig(), {&guest, &t6, &t4, &mob}, clock, store);
    s.Activate();
    clock.Advance(1500ms);
    s.OnTimer();
    clock.Advance(3s);
    s.OnTimer();
    auto sent = mob.TakeSent();
    ASSERT_EQ(sent.size(), 3u);
    auto p = ParseMobilityPacket(sent.back().bytes);
    last = std::get<BindingUpdate>(p->header.message).sequence;
  }
  EXPECT_EQ(store.values[kHoa], last);
  MobilitySession s2(BaseConfig(), {&guest, &t6, &t4, &mob}, clock, store);
  s2.Activate();
  auto sent = mob.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  auto p = ParseMobilityPacket(sent[0].bytes);
  EXPECT_EQ(std::get<BindingUpdate>(p->header.message).sequence, static_cast<uint16_t>(last + 1));
  EXPECT_EQ(store.values[kHoa], static_cast<uint16_t>(last + 1));
}

// Records, for each Record call, how many BUs had left and how many frames
// had gone to the guest link by then.
class OrderingStore final : public SequenceStore {
 public:
  OrderingStore(FakePacketPort& mobility, FakePacketPort& guest)
      : mobility_(mobility), guest_(guest) {}
  std::optional<uint16_t> LastSent(const Ipv6Address& hoa) override { return inner.LastSent(hoa); }
  Status Record(const Ipv6Address& hoa, uint16_t sequence) override {
    records.push_back({sequence, mobility_.sent_count(), guest_.sent_count()});
    return inner.Record(hoa, sequence);
  }
  struct Entry {
    uint16_t sequence;
    size_t bus_sent_before;
    size_t guest_frames_before;
  };
  std::vector<Entry> records;
  MemorySequenceStore inner;

 private:
  FakePacketPort& mobility_;
  FakePacketPort& guest_;
};

TEST(MobilitySession, SequenceIsStoredAfterTheBindingUpdateLeaves) {
  FakeClock clock;
  FakePacketPort guest, t6, t4, mob;
  OrderingStore store(mob, guest);
  {
    MobilitySession s(BaseConfig(), {&guest, &t6, &t4, &mob}, clock, store);
    s.Activate();  // nothing stored yet: this first number is stored before it is used
    ASSERT_EQ(store.records.size(), 1u);
    EXPECT_EQ(store.records[0].bus_sent_before, 0u);
    clock.Advance(1500ms);
    s.OnTimer();  // a retransmission: sent first, stored right after
    ASSERT_EQ(store.records.size(), 2u);
    EXPECT_EQ(store.records[1].bus_sent_before, 2u);
    EXPECT_EQ(store.records[1].sequence, store.records[0].sequence + 1);
  }
  // The next activation on this host (a new session): its first BU, the
  // one a handover waits for, is not held up by the durable write either.
  store.records.clear();
  MobilitySession s2(BaseConfig(), {&guest, &t6, &t4, &mob}, clock, store);
  size_t before = mob.sent_count();
  s2.Activate();
  ASSERT_EQ(store.records.size(), 1u);
  EXPECT_EQ(store.records[0].bus_sent_before, before + 1);
  EXPECT_EQ(store.inner.values[kHoa], store.records[0].sequence);
}

TEST(MobilitySession, DeregistrationStoresItsSequenceAfterTheBaAndTheAnnouncement) {
  FakeClock clock;
  FakePacketPort guest, t6, t4, mob;
  OrderingStore store(mob, guest);
  ASSERT_TRUE(store.inner.Record(kHoa, 41));  // an earlier visit
  MobilitySession s(BaseConfig(), {&guest, &t6, &t4, &mob}, clock, store);
  s.ReturnHome();
  EXPECT_EQ(mob.sent_count(), 1u);
  EXPECT_TRUE(store.records.empty()) << "the BA, across the home link, comes first";
  EXPECT_EQ(*s.NextDeadline(), clock.Now() + 200ms);
  s.HandleUplinkFrame(BaFrame(Ba(42, 0, 0)));
  ASSERT_EQ(store.records.size(), 1u);
  EXPECT_EQ(store.records[0].sequence, 42);
  EXPECT_EQ(store.records[0].guest_frames_before, 2u) << "after the NA and the gratuitous ARP";
  EXPECT_EQ(store.inner.values[kHoa], 42);
}

TEST(MobilitySession, DeregistrationStoresItsSequenceWithinADeadlineWithoutABa) {
  FakeClock clock;
  FakePacketPort guest, t6, t4, mob;
  OrderingStore store(mob, guest);
  ASSERT_TRUE(store.inner.Record(kHoa, 41));
  MobilitySession s(BaseConfig(), {&guest, &t6, &t4, &mob}, clock, store);
  s.ReturnHome();
  // A 135 is not the end of the exchange: the resent BU waits for its BA.
  s.HandleUplinkFrame(BaFrame(Ba(500, ba_status::kSequenceNumberOutOfWindow, 0)));
  EXPECT_EQ(mob.sent_count(), 2u);
  EXPECT_TRUE(store.records.empty());
  clock.Advance(199ms);
  s.OnTimer();
  EXPECT_TRUE(store.records.empty());
  clock.Advance(1ms);
  s.OnTimer();
  ASSERT_EQ(store.records.size(), 1u);
  EXPECT_EQ(store.records[0].sequence, 501);
  // Deactivate stores a pending number too.
  MobilitySession s2(BaseConfig(), {&guest, &t6, &t4, &mob}, clock, store);
  s2.ReturnHome();
  s2.Deactivate();
  ASSERT_EQ(store.records.size(), 2u);
  EXPECT_EQ(store.records[1].sequence, 502);
}

TEST(MobilitySession, PersistFailureIsReportedButBindingUpdateStillSent) {
  Harness h;
  h.store.fail = true;
  h.session.Activate();
  EXPECT_EQ(h.mobility.sent_count(), 1u);
  ASSERT_FALSE(h.events.empty());
  EXPECT_EQ(h.events.front().kind, SessionEvent::Kind::kPersistFailed);
}

TEST(MobilitySession, EachHomeAddressHasItsOwnBinding) {
  auto cfg = BaseConfig();
  cfg.home_addresses = {kHoa, kHoa2};
  Harness h(cfg);
  h.session.Activate();
  auto bus = h.TakeBindingUpdates();
  ASSERT_EQ(bus.size(), 2u);
  EXPECT_EQ(*bus[0].ip.home_address, kHoa);
  EXPECT_EQ(*bus[1].ip.home_address, kHoa2);
  EXPECT_EQ(std::get<BindingUpdate>(bus[1].header.message).options.size(), 0u)
      << "IPv4 HoA only on the first binding";
  h.session.HandleUplinkFrame(BaFrame(Ba(0)));
  EXPECT_EQ(h.session.state(), SessionState::kRegistering);
  h.session.HandleUplinkFrame(BaFrame(Ba(0), kHa, kHoa2));
  EXPECT_EQ(h.session.state(), SessionState::kRegistered);
}

// ---- Returning home -------------------------------------------------------------

TEST(MobilitySession, ReturnHomeDeregistersThenAnnouncesGuestMac) {
  Harness h;
  h.session.ReturnHome();
  auto bus = h.TakeBindingUpdates();
  ASSERT_EQ(bus.size(), 1u);
  const auto& bu = std::get<BindingUpdate>(bus[0].header.message);
  EXPECT_EQ(bu.lifetime, 0);
  EXPECT_EQ(bu.flags & (bu_flag::kAcknowledge | bu_flag::kHomeRegistration),
            bu_flag::kAcknowledge | bu_flag::kHomeRegistration);
  EXPECT_EQ(h.guest.sent_count(), 0u) << "no announcement before the BA";
  h.session.HandleUplinkFrame(BaFrame(Ba(bu.sequence, 0, 0)));
  EXPECT_EQ(h.session.state(), SessionState::kHome);
  auto frames = h.guest.TakeSent();
  ASSERT_EQ(frames.size(), 2u);  // NA for the HoA, gratuitous ARP for the IPv4 HoA
  auto eth = ParseEthernetFrame(frames[0].bytes);
  EXPECT_EQ(eth->src, kGuestMac);
  auto ip = ParseIpv6Packet(eth->payload);
  auto na = DecodeNeighborAdvertisement(ip->payload, {ip->header.src, ip->header.dst, 255});
  ASSERT_TRUE(na);
  EXPECT_EQ(na->target, kHoa);
  EXPECT_EQ(*na->target_link_layer, kGuestMac);
  EXPECT_TRUE(na->override);
  EXPECT_FALSE(na->router);
  auto arp = DecodeArp(ParseEthernetFrame(frames[1].bytes)->payload);
  EXPECT_EQ(arp->sender_mac, kGuestMac);
  EXPECT_EQ(arp->sender_ip, kHoa4);
  EXPECT_EQ(h.events.back().kind, SessionEvent::Kind::kDeregistered);
}

TEST(MobilitySession, ReturnHomeAnnouncesAfterRetriesWithoutAck) {
  Harness h;
  h.session.ReturnHome();
  for (int i = 0; i < 10 && h.session.state() != SessionState::kHome; ++i) {
    h.clock.Advance(*h.session.NextDeadline() - h.clock.Now());
    h.session.OnTimer();
  }
  EXPECT_EQ(h.session.state(), SessionState::kHome);
  EXPECT_EQ(h.mobility.sent_count(), 3u);
  EXPECT_EQ(h.guest.sent_count(), 2u);
  bool timed_out = false;
  for (const auto& e : h.events) timed_out |= e.kind == SessionEvent::Kind::kDeregistrationTimedOut;
  EXPECT_TRUE(timed_out);
}

TEST(MobilitySession, DeactivateStopsSignallingAndForwarding) {
  Harness h;
  h.session.Activate();
  h.mobility.TakeSent();
  h.session.Deactivate();
  EXPECT_FALSE(h.session.NextDeadline());
  h.clock.Advance(100s);
  h.session.OnTimer();
  h.session.HandleGuestFrame(GuestIpv6Frame(kHoa, kCorrespondent, 100));
  EXPECT_EQ(h.mobility.sent_count(), 0u);
  EXPECT_EQ(h.tunnel6.sent_count(), 0u);
  EXPECT_EQ(h.session.state(), SessionState::kStopped);
}

// ---- Guest link: ND, ARP ---------------------------------------------------------

std::vector<uint8_t> NsFrame(const Ipv6Address& target, const Ipv6Address& src = kGuestLl) {
  NeighborSolicitation ns;
  ns.target = target;
  if (!IsUnspecified(src)) ns.source_link_layer = kGuestMac;
  Ipv6Header h;
  h.next_header = ipproto::kIcmpv6;
  h.hop_limit = 255;
  h.src = src;
  h.dst = SolicitedNodeMulticast(target);
  auto pkt = BuildIpv6Packet(h, EncodeNeighborSolicitation(ns, h.src, h.dst));
  return BuildEthernetFrame(MulticastMac(h.dst), kGuestMac, ethertype::kIpv6, *pkt);
}

TEST(MobilitySession, AnswersNeighborSolicitationForRouterAddressesOnly) {
  Harness h;
  h.session.Activate();
  h.guest.TakeSent();
  for (const auto& target : {kRouterLl, kRouterGlobal}) {
    h.session.HandleGuestFrame(NsFrame(target));
    auto sent = h.guest.TakeSent();
    ASSERT_EQ(sent.size(), 1u);
    auto eth = ParseEthernetFrame(sent[0].bytes);
    EXPECT_EQ(eth->dst, kGuestMac);
    EXPECT_EQ(eth->src, kRouterMac);
    auto ip = ParseIpv6Packet(eth->payload);
    EXPECT_EQ(ip->header.dst, kGuestLl);
    auto na = DecodeNeighborAdvertisement(ip->payload, {ip->header.src, ip->header.dst, 255});
    ASSERT_TRUE(na) << na.error().message();
    EXPECT_EQ(na->target, target);
    EXPECT_TRUE(na->solicited);
    EXPECT_TRUE(na->router);
    EXPECT_EQ(*na->target_link_layer, kRouterMac);
  }
  // Not the router: another home address, a correspondent, the guest's own
  // DAD probe.
  h.session.HandleGuestFrame(NsFrame(kHoa2));
  h.session.HandleGuestFrame(NsFrame(kCorrespondent));
  h.session.HandleGuestFrame(NsFrame(kHoa, Ipv6Address{}));
  EXPECT_EQ(h.guest.sent_count(), 0u);
  EXPECT_EQ(h.session.counters().nd_ignored, 3u);
  EXPECT_EQ(h.session.counters().nd_answered, 2u);
  EXPECT_EQ(h.tunnel6.sent_count(), 0u);
}

TEST(MobilitySession, RouterSolicitationAnsweredOnlyWithRaFlag) {
  RouterSolicitation rs;
  Ipv6Header ih;
  ih.next_header = ipproto::kIcmpv6;
  ih.hop_limit = 255;
  ih.src = kGuestLl;
  ih.dst = kAllRoutersMulticast;
  auto pkt = BuildIpv6Packet(ih, EncodeRouterSolicitation(rs, ih.src, ih.dst));
  auto frame = BuildEthernetFrame(MulticastMac(ih.dst), kGuestMac, ethertype::kIpv6, *pkt);
  {
    Harness h;
    h.session.Activate();
    h.guest.TakeSent();
    h.session.HandleGuestFrame(frame);
    EXPECT_EQ(h.guest.sent_count(), 0u);
  }
  auto cfg = BaseConfig();
  cfg.send_router_advertisements = true;
  Harness h(cfg);
  h.session.Activate();
  h.guest.TakeSent();
  h.session.HandleGuestFrame(frame);
  auto sent = h.guest.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  auto ip = ParseIpv6Packet(ParseEthernetFrame(sent[0].bytes)->payload);
  auto ra = DecodeRouterAdvertisement(ip->payload, {ip->header.src, ip->header.dst, 255});
  ASSERT_TRUE(ra) << ra.error().message();
  EXPECT_EQ(ip->header.src, kRouterLl);
  ASSERT_EQ(ra->prefixes.size(), 1u);
  EXPECT_EQ(ra->prefixes[0].prefix, kHomePrefix);
  EXPECT_EQ(*ra->mtu, 1400u);
}

std::vector<uint8_t> ArpRequestFrame(const Ipv4Address& target) {
  ArpPacket req;
  req.operation = kArpOpRequest;
  req.sender_mac = kGuestMac;
  req.sender_ip = kHoa4;
  req.target_ip = target;
  return BuildEthernetFrame(kBroadcastMac, kGuestMac, ethertype::kArp, EncodeArp(req));
}

TEST(MobilitySession, AtHomeTheSessionNeitherAnswersForTheRouterNorTunnels) {
  Harness h;
  h.session.ReturnHome();
  h.session.HandleUplinkFrame(BaFrame(Ba(h.LastBuSequence(), 0, 0)));
  h.guest.TakeSent();  // the announcement of the guest at home
  // The real router is on this link: no NA or ARP reply with its MAC from
  // here (the home host's bridge would learn the router on our TAP).
  h.session.HandleGuestFrame(NsFrame(kRouterLl));
  h.session.HandleGuestFrame(ArpRequestFrame(kGateway4));
  EXPECT_EQ(h.guest.sent_count(), 0u);
  h.session.HandleGuestFrame(GuestIpv6Frame(kHoa, kCorrespondent, 100));
  EXPECT_EQ(h.tunnel6.sent_count(), 0u);
  EXPECT_EQ(h.session.counters().nd_answered, 0u);
  // Activated again (the guest left home): the router is ours to answer.
  h.session.Activate();
  h.guest.TakeSent();
  h.session.HandleGuestFrame(NsFrame(kRouterLl));
  EXPECT_EQ(h.guest.sent_count(), 1u);
}

TEST(MobilitySession, AnswersArpForGatewayOnly) {
  Harness h;
  h.session.Activate();
  h.guest.TakeSent();
  h.session.HandleGuestFrame(ArpRequestFrame(kGateway4));
  auto sent = h.guest.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  auto eth = ParseEthernetFrame(sent[0].bytes);
  EXPECT_EQ(eth->dst, kGuestMac);
  auto arp = DecodeArp(eth->payload);
  ASSERT_TRUE(arp);
  EXPECT_EQ(arp->operation, kArpOpReply);
  EXPECT_EQ(arp->sender_mac, kRouterMac);
  EXPECT_EQ(arp->sender_ip, kGateway4);
  EXPECT_EQ(arp->target_ip, kHoa4);
  h.session.HandleGuestFrame(ArpRequestFrame({192, 0, 2, 77}));
  h.session.HandleGuestFrame(BuildGratuitousArpFrame(kGuestMac, kHoa4));
  EXPECT_EQ(h.guest.sent_count(), 0u);
  EXPECT_EQ(h.session.counters().arp_ignored, 2u);
}

// ---- Guest link: forwarding -----------------------------------------------------

TEST(MobilitySession, TunnelsGuestGlobalUnicastToHomeAgent) {
  Harness h;
  h.session.Activate();
  auto frame = GuestIpv6Frame(kHoa, kCorrespondent, 200);
  h.session.HandleGuestFrame(frame);
  auto sent = h.tunnel6.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].bytes, std::vector<uint8_t>(frame.begin() + 14, frame.end()))
      << "the inner packet is the guest's packet unchanged";
  EXPECT_EQ(h.session.counters().tunnelled6, 1u);
}

TEST(MobilitySession, LinkLocalAndMulticastStayOnTheLink) {
  Harness h;
  h.session.Activate();
  h.session.HandleGuestFrame(GuestIpv6Frame(kGuestLl, kRouterLl, 50));
  h.session.HandleGuestFrame(GuestIpv6Frame(kHoa, kRouterLl, 50));
  h.session.HandleGuestFrame(GuestIpv6Frame(kGuestLl, kCorrespondent, 50));
  h.session.HandleGuestFrame(GuestIpv6Frame(kHoa, kAllNodesMulticast, 50));
  EXPECT_EQ(h.tunnel6.sent_count(), 0u);
  EXPECT_EQ(h.session.counters().link_local_kept, 4u);
}

TEST(MobilitySession, OnlyTheGuestsHomeTrafficSentToTheRouterIsTunnelled) {
  Harness h;
  h.session.Activate();
  h.session.HandleGuestFrame(GuestIpv6Frame(kHoa, kCorrespondent, 50, kOtherMac));
  h.session.HandleGuestFrame(GuestIpv6Frame(kCoa, kCorrespondent, 50));
  h.session.HandleGuestFrame(GuestIpv6Frame(kHoa, kCorrespondent, 50, kGuestMac, kOtherMac));
  EXPECT_EQ(h.tunnel6.sent_count(), 0u);
  EXPECT_EQ(h.session.counters().guest_foreign_mac, 1u);
  EXPECT_EQ(h.session.counters().not_home_source, 1u);
}

TEST(MobilitySession, OversizedIpv6GetsPacketTooBigWithTunnelMtu) {
  Harness h;
  h.session.Activate();
  h.guest.TakeSent();
  h.session.HandleGuestFrame(GuestIpv6Frame(kHoa, kCorrespondent, 1400 - 40));  // exactly fits
  EXPECT_EQ(h.tunnel6.sent_count(), 1u);
  h.session.HandleGuestFrame(GuestIpv6Frame(kHoa, kCorrespondent, 1400 - 40 + 1));
  EXPECT_EQ(h.tunnel6.sent_count(), 1u);
  auto sent = h.guest.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  auto eth = ParseEthernetFrame(sent[0].bytes);
  EXPECT_EQ(eth->dst, kGuestMac);
  EXPECT_EQ(eth->src, kRouterMac);
  auto ip = ParseIpv6Packet(eth->payload);
  ASSERT_TRUE(ip);
  EXPECT_EQ(ip->header.src, kRouterGlobal);
  EXPECT_EQ(ip->header.dst, kHoa);
  auto icmp = ParseIcmpv6(ip->header.src, ip->header.dst, ip->payload);
  ASSERT_TRUE(icmp) << icmp.error().message();
  EXPECT_EQ(icmp->type, kIcmpv6PacketTooBig);
  EXPECT_EQ(icmp->word, 1400u);
  EXPECT_EQ(h.session.counters().too_big, 1u);
}

TEST(MobilitySession, Ipv4TunnelledAndOversizedDfGetsFragNeeded) {
  Harness h;
  h.session.Activate();
  h.guest.TakeSent();
  h.session.HandleGuestFrame(GuestIpv4Frame(100, true));
  ASSERT_EQ(h.tunnel4.sent_count(), 1u);
  h.session.HandleGuestFrame(GuestIpv4Frame(1500, false));  // no DF: outer fragments
  EXPECT_EQ(h.tunnel4.sent_count(), 2u);
  h.session.HandleGuestFrame(GuestIpv4Frame(1500, true));
  EXPECT_EQ(h.tunnel4.sent_count(), 2u);
  auto sent = h.guest.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  auto ip = ParseIpv4Packet(ParseEthernetFrame(sent[0].bytes)->payload);
  ASSERT_TRUE(ip);
  EXPECT_EQ(ip->header.src, kGateway4);
  EXPECT_EQ(ip->header.dst, kHoa4);
  auto icmp = ParseIcmpv4(ip->payload);
  ASSERT_TRUE(icmp);
  EXPECT_EQ(icmp->type, kIcmpv4DestinationUnreachable);
  EXPECT_EQ(icmp->code, kIcmpv4FragmentationNeeded);
  EXPECT_EQ(icmp->word & 0xffff, 1400u);
  // Not from the IPv4 home address: dropped.
  h.session.HandleGuestFrame(GuestIpv4Frame(100, true, {192, 0, 2, 99}));
  EXPECT_EQ(h.tunnel4.sent_count(), 2u);
}

TEST(MobilitySession, GarbageOnTheGuestLinkIsCountedNotFatal) {
  Harness h;
  h.session.Activate();
  std::vector<std::vector<uint8_t>> garbage = {
      {},
      {1, 2, 3},
      BuildEthernetFrame(kRouterMac, kGuestMac, ethertype::kIpv6, std::vector<uint8_t>(10, 0x60)),
      BuildEthernetFrame(kRouterMac, kGuestMac, ethertype::kIpv4, std::vector<uint8_t>(30, 0x45)),
      BuildEthernetFrame(kBroadcastMac, kGuestMac, ethertype::kArp, std::vector<uint8_t>(8, 0)),
  };
  for (auto& g : garbage) h.session.HandleGuestFrame(g);
  EXPECT_EQ(h.session.counters().guest_malformed, 5u);
  EXPECT_EQ(h.tunnel6.sent_count() + h.tunnel4.sent_count(), 0u);
}

// ---- From the home agent ----------------------------------------------------------

std::vector<uint8_t> WithHeadroom(std::span<const uint8_t> inner) {
  std::vector<uint8_t> v(kEthernetHeaderSize + inner.size(), 0);
  std::copy(inner.begin(), inner.end(), v.begin() + kEthernetHeaderSize);
  return v;
}

TEST(MobilitySession, DecapsulatedPacketsReachGuestWithRouterSourceMac) {
  Harness h;
  h.session.Activate();
  h.guest.TakeSent();
  Ipv6Header ih;
  ih.next_header = ipproto::kUdp;
  ih.src = kCorrespondent;
  ih.dst = kHoa;
  auto inner = BuildIpv6Packet(ih, std::vector<uint8_t>(64, 1));
  auto room = WithHeadroom(*inner);
  h.session.HandleTunnelled(kHa, ipproto::kIpv6, room);
  auto sent = h.guest.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  auto eth = ParseEthernetFrame(sent[0].bytes);
  EXPECT_EQ(eth->dst, kGuestMac);
  EXPECT_EQ(eth->src, kRouterMac);
  EXPECT_EQ(eth->ether_type, ethertype::kIpv6);
  EXPECT_EQ(std::vector<uint8_t>(eth->payload.begin(), eth->payload.end()), *inner);

  Ipv4Header h4;
  h4.protocol = ipproto::kUdp;
  h4.src = kRemote4;
  h4.dst = kHoa4;
  auto inner4 = BuildIpv4Packet(h4, std::vector<uint8_t>(20, 2));
  auto room4 = WithHeadroom(*inner4);
  h.session.HandleTunnelled(kHa, ipproto::kIpv4, room4);
  sent = h.guest.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  eth = ParseEthernetFrame(sent[0].bytes);
  EXPECT_EQ(eth->ether_type, ethertype::kIpv4);
  EXPECT_EQ(eth->dst, kGuestMac);
}

TEST(MobilitySession, DecapFromWrongSourceOrForOtherAddressIsDropped) {
  Harness h;
  h.session.Activate();
  h.guest.TakeSent();
  Ipv6Header ih;
  ih.next_header = ipproto::kUdp;
  ih.src = kCorrespondent;
  ih.dst = kHoa;
  auto inner = BuildIpv6Packet(ih, std::vector<uint8_t>(8, 1));
  auto room = WithHeadroom(*inner);
  h.session.HandleTunnelled(kCorrespondent, ipproto::kIpv6, room);
  ih.dst = kHoa2;
  auto other = WithHeadroom(*BuildIpv6Packet(ih, std::vector<uint8_t>(8, 1)));
  h.session.HandleTunnelled(kHa, ipproto::kIpv6, other);
  auto junk = WithHeadroom(std::vector<uint8_t>(30, 0x60));
  h.session.HandleTunnelled(kHa, ipproto::kIpv6, junk);
  h.session.HandleTunnelled(kHa, 17, room);
  EXPECT_EQ(h.guest.sent_count(), 0u);
  EXPECT_EQ(h.session.counters().decap_spoofed, 1u);
  EXPECT_EQ(h.session.counters().decap_not_ours, 1u);
  EXPECT_EQ(h.session.counters().decap_malformed, 2u);
}

TEST(SessionConfigValidation, RejectsMissingOrMalformedFields) {
  EXPECT_TRUE(ValidateSessionConfig(BaseConfig()));
  auto c = BaseConfig();
  c.home_addresses.clear();
  EXPECT_FALSE(ValidateSessionConfig(c));
  c = BaseConfig();
  c.router_link_local = kRouterGlobal;
  EXPECT_FALSE(ValidateSessionConfig(c));
  c = BaseConfig();
  c.tunnel_mtu = 1000;
  EXPECT_FALSE(ValidateSessionConfig(c));
  c = BaseConfig();
  c.auth = MobilityAuthConfig{};
  EXPECT_FALSE(ValidateSessionConfig(c));
}

}  // namespace
}  // namespace kagemusha::tunnel

namespace kagemusha::tunnel {
namespace {

// Random bytes and single-byte mutations of valid frames on every input of
// the session: nothing may crash, and every frame must be accounted for by
// some counter or an answer, never by an exception or a stuck state.
TEST(MobilitySession, RandomAndMutatedInputNeverCrashes) {
  auto cfg = BaseConfig();
  cfg.home_addresses = {kHoa, kHoa2};
  cfg.send_router_advertisements = true;
  Harness h(cfg);
  h.session.Activate();
  std::vector<std::vector<uint8_t>> seeds = {
      BaFrame(Ba(0)),
      BaFrame(Ba(0, ba_status::kSequenceNumberOutOfWindow)),
      NsFrame(kRouterLl),
      NsFrame(kHoa, Ipv6Address{}),
      ArpRequestFrame(kGateway4),
      GuestIpv6Frame(kHoa, kCorrespondent, 100),
      GuestIpv4Frame(100, true),
  };
  uint32_t state = 12345;
  auto rnd = [&state] {
    state = state * 1664525u + 1013904223u;
    return state >> 8;
  };
  for (int i = 0; i < 20000; ++i) {
    std::vector<uint8_t> f;
    if (i % 4 == 0) {
      f.resize(rnd() % 200);
      for (auto& b : f) b = static_cast<uint8_t>(rnd());
    } else {
      f = seeds[rnd() % seeds.size()];
      const int flips = 1 + static_cast<int>(rnd() % 3);
      for (int k = 0; k < flips && !f.empty(); ++k)
        f[rnd() % f.size()] ^= static_cast<uint8_t>(1 + rnd() % 255);
      if (rnd() % 5 == 0) f.resize(rnd() % (f.size() + 1));
    }
    switch (rnd() % 3) {
      case 0:
        h.session.HandleGuestFrame(f);
        break;
      case 1:
        h.session.HandleUplinkFrame(f);
        break;
      default: {
        auto room =
            WithHeadroom(std::span<const uint8_t>(f).subspan(std::min<size_t>(14, f.size())));
        h.session.HandleTunnelled(rnd() % 2 ? kHa : kCorrespondent,
                                  rnd() % 2 ? ipproto::kIpv6 : ipproto::kIpv4, room);
      }
    }
    if (i % 1000 == 0) {
      h.clock.Advance(std::chrono::seconds(1));
      h.session.OnTimer();
    }
  }
  const auto& c = h.session.counters();
  EXPECT_GT(c.guest_malformed + c.mh_malformed + c.decap_malformed, 1000u);
  // Still functional afterwards: a fresh exchange completes.
  h.mobility.TakeSent();
  h.session.Activate();
  auto bus = h.TakeBindingUpdates();
  ASSERT_EQ(bus.size(), 2u);
  for (const auto& p : bus)
    h.session.HandleUplinkFrame(
        BaFrame(Ba(std::get<BindingUpdate>(p.header.message).sequence), kHa, *p.ip.home_address));
  EXPECT_EQ(h.session.state(), SessionState::kRegistered);
}

}  // namespace
}  // namespace kagemusha::tunnel

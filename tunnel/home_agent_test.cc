#include "kagemusha/tunnel/home_agent.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>

#include "kagemusha/tunnel/arp.h"
#include "kagemusha/tunnel/mh_auth.h"
#include "kagemusha/tunnel/neighbor_discovery.h"

namespace kagemusha::tunnel {
namespace {

using namespace std::chrono_literals;

const Ipv6Address kHa = *ParseIpv6("2001:db8:a::2");
const Ipv6Address kHoa = *ParseIpv6("2001:db8:a::20");
const Ipv6Address kHoa2 = *ParseIpv6("2001:db8:a::21");
const Ipv6Address kCoa = *ParseIpv6("2001:db8:b::10");
const Ipv6Address kCoa2 = *ParseIpv6("2001:db8:c::10");
const MacAddress kHaMac = {0x02, 0, 0, 0, 0, 0x02};
const MacAddress kRouterMac = {0x02, 0, 0, 0, 0, 0x01};
const MacAddress kNeighborMac = {0x02, 0, 0, 0, 0, 0x33};
const std::vector<uint8_t> kKey(32, 0x5a);
constexpr uint32_t kSpi = 1000;

struct Ports {
  FakePacketPort link, mobility, tunnel6, tunnel4, deliver6, deliver4;
  HomeAgentPorts view() { return {&link, &mobility, &tunnel6, &tunnel4, &deliver6, &deliver4}; }
};

HomeAgentConfig BaseConfig() {
  HomeAgentConfig c;
  c.address = kHa;
  c.mac = kHaMac;
  c.home_prefix = *ParseIpv6Prefix("2001:db8:a::/64");
  c.home_prefix4 = *ParseIpv4Prefix("192.0.2.0/24");
  c.address4 = *ParseIpv4("192.0.2.2");
  c.insecure = true;
  c.dad = DadMode::kOff;
  c.max_lifetime = 600s;
  c.bu_rate = 0;
  return c;
}

struct BuSpec {
  Ipv6Address coa = kCoa;
  Ipv6Address hoa = kHoa;
  uint16_t seq = 1;
  uint16_t flags = bu_flag::kAcknowledge | bu_flag::kHomeRegistration;
  uint16_t lifetime = 150;  // 600 s
  std::optional<Ipv4Address> hoa4;
  std::optional<uint32_t> spi;  // authenticate with kKey under this SPI
  std::vector<uint8_t> key = kKey;
};

BuSpec WithSeq(uint16_t seq) {
  BuSpec s;
  s.seq = seq;
  return s;
}

std::vector<uint8_t> BuPacket(const BuSpec& s) {
  BindingUpdate bu;
  bu.sequence = s.seq;
  bu.flags = s.flags;
  bu.lifetime = s.lifetime;
  if (s.hoa4) bu.options.push_back(Ipv4HomeAddress{24, false, *s.hoa4});
  if (!s.spi) return *BuildBindingUpdatePacket(s.coa, kHa, s.hoa, bu);
  MhAuthParams p;
  p.spi = *s.spi;
  p.key = s.key;
  p.care_of = s.coa;
  p.home_address = s.hoa;
  auto mh = EncodeAuthenticatedMobilityHeader(bu, p, {s.hoa, kHa});
  EXPECT_TRUE(mh) << mh.error().message();
  return *BuildMobilityPacket(s.coa, kHa, s.hoa, std::nullopt, *mh);
}

std::vector<uint8_t> Frame(const std::vector<uint8_t>& ip, const MacAddress& dst = kHaMac,
                           uint16_t type = ethertype::kIpv6) {
  return BuildEthernetFrame(dst, kRouterMac, type, ip);
}

struct Ba {
  Ipv6Address dst{};
  std::optional<Ipv6Address> rh2;
  BindingAcknowledgement ba;
  std::vector<uint8_t> mh;
};

std::vector<Ba> TakeBas(FakePacketPort& port) {
  std::vector<Ba> out;
  for (auto& sent : port.TakeSent()) {
    auto p = ParseMobilityPacket(sent.bytes);
    EXPECT_TRUE(p) << p.error().message();
    if (!p) continue;
    Ba b;
    b.dst = p->ip.header.dst;
    if (p->ip.routing) b.rh2 = p->ip.routing->home_address;
    b.ba = std::get<BindingAcknowledgement>(p->header.message);
    b.mh.assign(p->mh.begin(), p->mh.end());
    out.push_back(std::move(b));
  }
  return out;
}

class HomeAgentTest : public ::testing::Test {
 protected:
  void Make(HomeAgentConfig c, BindingJournal* journal = nullptr) {
    ha_ = std::make_unique<HomeAgent>(std::move(c), ports_.view(), clock_, journal,
                                      [this] { return wall_; });
  }
  // Sends a BU and returns the single BA it produced.
  Ba Send(const BuSpec& s) {
    ha_->HandleLinkFrame(Frame(BuPacket(s)));
    auto bas = TakeBas(ports_.mobility);
    EXPECT_EQ(bas.size(), 1u);
    return bas.empty() ? Ba{} : bas[0];
  }
  std::vector<FakePacketPort::Sent> LinkFrames() { return ports_.link.TakeSent(); }

  Ports ports_;
  FakeClock clock_;
  std::chrono::system_clock::time_point wall_ =
      std::chrono::system_clock::time_point(std::chrono::seconds(1'800'000'000));
  std::unique_ptr<HomeAgent> ha_;
};

// ---- §10.3.1 status codes --------------------------------------------------------

TEST_F(HomeAgentTest, AcceptsANewBindingWithStatus0AndBaThroughRh2ToTheCareOf) {
  Make(BaseConfig());
  Ba ba = Send({});
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  EXPECT_EQ(ba.ba.sequence, 1);
  EXPECT_EQ(ba.ba.lifetime, 150);
  EXPECT_EQ(ba.dst, kCoa);
  ASSERT_TRUE(ba.rh2);
  EXPECT_EQ(*ba.rh2, kHoa);
  const CacheEntry* b = ha_->cache().Find(kHoa);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->care_of, kCoa);
  EXPECT_EQ(ha_->counters().accepted, 1u);
}

TEST_F(HomeAgentTest, RefreshIsAcceptedWithStatus0AndUpdatesTheCareOf) {
  Make(BaseConfig());
  Send({});
  LinkFrames();
  BuSpec s;
  s.seq = 2;
  s.coa = kCoa2;
  Ba ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  EXPECT_EQ(ba.dst, kCoa2);
  EXPECT_EQ(ha_->cache().Find(kHoa)->care_of, kCoa2);
  EXPECT_EQ(ha_->counters().refreshed, 1u);
  EXPECT_TRUE(LinkFrames().empty()) << "a refresh is not re-announced";
}

TEST_F(HomeAgentTest, NoBaForAnAcceptedBuWithoutTheAFlag) {
  Make(BaseConfig());
  BuSpec s;
  s.flags = bu_flag::kHomeRegistration;
  ha_->HandleLinkFrame(Frame(BuPacket(s)));
  EXPECT_EQ(ports_.mobility.sent_count(), 0u);
  EXPECT_NE(ha_->cache().Find(kHoa), nullptr);
}

TEST_F(HomeAgentTest, RejectsABuWithoutTheHFlagWith133) {
  Make(BaseConfig());
  BuSpec s;
  s.flags = bu_flag::kAcknowledge;
  EXPECT_EQ(Send(s).ba.status, ba_status::kNotHomeAgentForThisMobileNode);
  EXPECT_EQ(ha_->cache().size(), 0u);
}

TEST_F(HomeAgentTest, RejectsAHomeAddressOutsideTheHomePrefixWith132) {
  Make(BaseConfig());
  BuSpec s;
  s.hoa = *ParseIpv6("2001:db8:ff::20");
  EXPECT_EQ(Send(s).ba.status, ba_status::kNotHomeSubnet);
  EXPECT_EQ(ha_->cache().size(), 0u);
}

TEST_F(HomeAgentTest, RejectsAHomeAddressNotInTheAllowListWith129) {
  auto c = BaseConfig();
  c.allow = {kHoa};
  Make(c);
  BuSpec s;
  s.hoa = kHoa2;
  EXPECT_EQ(Send(s).ba.status, ba_status::kAdministrativelyProhibited);
  EXPECT_EQ(Send({}).ba.status, ba_status::kAccepted);
  EXPECT_EQ(ha_->cache().size(), 1u);
}

TEST_F(HomeAgentTest, RejectsAnOldSequenceWith135CarryingTheCurrentSequence) {
  Make(BaseConfig());
  BuSpec s;
  s.seq = 100;
  Send(s);
  s.seq = 100;  // replay
  Ba ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kSequenceNumberOutOfWindow);
  EXPECT_EQ(ba.ba.sequence, 100);
  s.seq = 60;
  s.coa = kCoa2;
  ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kSequenceNumberOutOfWindow);
  EXPECT_EQ(ba.ba.sequence, 100);
  EXPECT_EQ(ha_->cache().Find(kHoa)->care_of, kCoa) << "a rejected BU must not move the binding";
}

TEST_F(HomeAgentTest, AcceptsASequenceThatWrapsAround) {
  Make(BaseConfig());
  BuSpec s;
  s.seq = 65535;
  EXPECT_EQ(Send(s).ba.status, ba_status::kAccepted);
  s.seq = 0;
  EXPECT_EQ(Send(s).ba.status, ba_status::kAccepted);
  s.seq = 3;
  EXPECT_EQ(Send(s).ba.status, ba_status::kAccepted);
  s.seq = 65534;
  EXPECT_EQ(Send(s).ba.status, ba_status::kSequenceNumberOutOfWindow);
  EXPECT_EQ(ha_->cache().Find(kHoa)->sequence, 3);
}

TEST_F(HomeAgentTest, CapsTheLifetimeToMaxLifetime) {
  auto c = BaseConfig();
  c.max_lifetime = 100s;
  Make(c);
  BuSpec s;
  s.lifetime = 1000;  // 4000 s asked
  Ba ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  EXPECT_EQ(ba.ba.lifetime, 25);  // 100 s granted
  EXPECT_EQ(ha_->cache().Find(kHoa)->granted_lifetime, 100s);
}

TEST_F(HomeAgentTest, ExpiresABindingWhenItsLifetimeEnds) {
  Make(BaseConfig());
  BuSpec s;
  s.lifetime = 5;  // 20 s
  Send(s);
  EXPECT_EQ(*ha_->NextDeadline(), clock_.Now() + 20s);
  clock_.Advance(19s);
  ha_->OnTimer();
  EXPECT_NE(ha_->cache().Find(kHoa), nullptr);
  clock_.Advance(1s);
  ha_->OnTimer();
  EXPECT_EQ(ha_->cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha_->counters().expired, 1u);
}

TEST_F(HomeAgentTest, DeregistersWithLifetimeZero) {
  Make(BaseConfig());
  Send({});
  BuSpec s;
  s.seq = 2;
  s.lifetime = 0;
  Ba ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  EXPECT_EQ(ba.ba.lifetime, 0);
  EXPECT_EQ(ha_->cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha_->counters().deregistered, 1u);
}

TEST_F(HomeAgentTest, DeregistersWhenTheCareOfIsTheHomeAddressAndAnswersWithoutRh2) {
  Make(BaseConfig());
  Send({});
  BuSpec s;
  s.seq = 2;
  s.coa = kHoa;  // sent from home: no HAO, source = home address
  Ba ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  EXPECT_EQ(ba.dst, kHoa);
  EXPECT_FALSE(ba.rh2);
  EXPECT_EQ(ha_->cache().Find(kHoa), nullptr);
}

TEST_F(HomeAgentTest, DeregistrationWithoutABindingGets133) {
  Make(BaseConfig());
  BuSpec s;
  s.lifetime = 0;
  EXPECT_EQ(Send(s).ba.status, ba_status::kNotHomeAgentForThisMobileNode);
}

TEST_F(HomeAgentTest, AcknowledgesAnIpv4HomeAddress) {
  Make(BaseConfig());
  BuSpec s;
  s.hoa4 = *ParseIpv4("192.0.2.20");
  Ba ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  ASSERT_EQ(ba.ba.options.size(), 1u);
  auto ack = std::get<Ipv4AddressAcknowledgement>(ba.ba.options[0]);
  EXPECT_EQ(ack.status, ipv4_ack_status::kSuccess);
  EXPECT_EQ(ack.address, *s.hoa4);
  EXPECT_EQ(ack.prefix_length, 24);
  EXPECT_NE(ha_->cache().FindByHomeAddress4(*s.hoa4), nullptr);
}

TEST_F(HomeAgentTest, RefusesAnIpv4HomeAddressOutsideItsPrefixButKeepsTheIpv6Binding) {
  Make(BaseConfig());
  BuSpec s;
  s.hoa4 = *ParseIpv4("198.51.100.20");
  Ba ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  auto ack = std::get<Ipv4AddressAcknowledgement>(ba.ba.options.at(0));
  EXPECT_EQ(ack.status, ipv4_ack_status::kIncorrectIpv4HomeAddress);
  EXPECT_NE(ha_->cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha_->cache().Find(kHoa)->home_address4, std::nullopt);
  s.seq = 2;
  s.hoa4 = *ParseIpv4("192.0.2.2");  // the HA's own
  ack = std::get<Ipv4AddressAcknowledgement>(Send(s).ba.options.at(0));
  EXPECT_EQ(ack.status, ipv4_ack_status::kInvalidIpv4Address);
  s.seq = 3;
  s.hoa4 = Ipv4Address{};
  ack = std::get<Ipv4AddressAcknowledgement>(Send(s).ba.options.at(0));
  EXPECT_EQ(ack.status, ipv4_ack_status::kDynamicIpv4HomeAddressNotAvailable);
}

TEST_F(HomeAgentTest, RefusesAnIpv4HomeAddressBoundToAnotherMobile) {
  Make(BaseConfig());
  BuSpec s;
  s.hoa4 = *ParseIpv4("192.0.2.20");
  Send(s);
  s.hoa = kHoa2;
  auto ack = std::get<Ipv4AddressAcknowledgement>(Send(s).ba.options.at(0));
  EXPECT_EQ(ack.status, ipv4_ack_status::kAdministrativelyProhibited);
  EXPECT_EQ(ha_->cache().FindByHomeAddress4(*s.hoa4)->home_address, kHoa);
}

std::vector<uint8_t> Udp6(const Ipv6Address& src, const Ipv6Address& dst, uint8_t hop = 64) {
  Ipv6Header h;
  h.next_header = ipproto::kUdp;
  h.hop_limit = hop;
  h.src = src;
  h.dst = dst;
  std::vector<uint8_t> udp = {0x30, 0x39, 0x30, 0x39, 0, 12, 0, 0, 'a', 'b', 'c', 'd'};
  return *BuildIpv6Packet(h, udp);
}

std::vector<uint8_t> Udp4(const Ipv4Address& src, const Ipv4Address& dst) {
  Ipv4Header h;
  h.protocol = ipproto::kUdp;
  h.src = src;
  h.dst = dst;
  std::vector<uint8_t> udp = {0x30, 0x39, 0x30, 0x39, 0, 12, 0, 0, 'a', 'b', 'c', 'd'};
  return *BuildIpv4Packet(h, udp);
}

// ---- DAD -------------------------------------------------------------------------

std::vector<uint8_t> NaFrameFrom(const Ipv6Address& target, const MacAddress& mac) {
  return BuildUnsolicitedNeighborAdvertisementFrame(mac, target);
}

const Ipv4Address kRouterIp4 = *ParseIpv4("192.0.2.1");

// The router's broadcast ARP request for `target`.
std::vector<uint8_t> ArpRequestFrameFor(const Ipv4Address& target) {
  ArpPacket req;
  req.operation = kArpOpRequest;
  req.sender_mac = kRouterMac;
  req.sender_ip = kRouterIp4;
  req.target_ip = target;
  return Frame(EncodeArp(req), kBroadcastMac, ethertype::kArp);
}

// A neighbour's Neighbor Solicitation for `target` from `src`, to the
// target's solicited-node group; `sllao`: its source link-layer option.
std::vector<uint8_t> NsFrameFor(const Ipv6Address& target, const Ipv6Address& src,
                                std::optional<MacAddress> sllao = kRouterMac) {
  NeighborSolicitation ns;
  ns.target = target;
  ns.source_link_layer = sllao;
  Ipv6Header h;
  h.next_header = ipproto::kIcmpv6;
  h.hop_limit = 255;
  h.src = src;
  h.dst = SolicitedNodeMulticast(target);
  return Frame(*BuildIpv6Packet(h, EncodeNeighborSolicitation(ns, h.src, h.dst)),
               MulticastMac(h.dst));
}

// An unsolicited NA to all-nodes with Override set, announcing `target` at
// the HA's MAC.
bool IsOverrideNaFor(const std::vector<uint8_t>& frame, const Ipv6Address& target) {
  auto eth = ParseEthernetFrame(frame);
  if (!eth || eth->ether_type != ethertype::kIpv6) return false;
  auto ip = ParseIpv6Packet(eth->payload);
  if (!ip || ip->header.dst != kAllNodesMulticast) return false;
  auto na = DecodeNeighborAdvertisement(ip->payload,
                                        {ip->header.src, ip->header.dst, ip->header.hop_limit});
  return na && na->target == target && na->override && !na->solicited &&
         na->target_link_layer == kHaMac;
}

bool IsDadProbeFor(const std::vector<uint8_t>& frame, const Ipv6Address& target) {
  auto eth = ParseEthernetFrame(frame);
  if (!eth || eth->ether_type != ethertype::kIpv6) return false;
  auto ip = ParseIpv6Packet(eth->payload);
  if (!ip || !IsUnspecified(ip->header.src)) return false;
  auto ns = DecodeNeighborSolicitation(ip->payload,
                                       {ip->header.src, ip->header.dst, ip->header.hop_limit});
  return ns && ns->target == target && eth->dst == MulticastMac(SolicitedNodeMulticast(target));
}

TEST_F(HomeAgentTest, RfcDadWaitsRetransTimerBeforeAccepting) {
  auto c = BaseConfig();
  c.dad = DadMode::kRfc;
  Make(c);
  ha_->HandleLinkFrame(Frame(BuPacket({})));
  EXPECT_EQ(ports_.mobility.sent_count(), 0u) << "no BA before DAD completes";
  auto frames = LinkFrames();
  ASSERT_EQ(frames.size(), 1u);
  EXPECT_TRUE(IsDadProbeFor(frames[0].bytes, kHoa));
  EXPECT_EQ(ha_->cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha_->Status().dad_pending.size(), 1u);
  // A retransmitted BU during the probe is not answered twice.
  ha_->HandleLinkFrame(Frame(BuPacket({})));
  EXPECT_EQ(ha_->counters().bu_during_dad, 1u);
  EXPECT_EQ(*ha_->NextDeadline(), clock_.Now() + 1s);
  clock_.Advance(999ms);
  ha_->OnTimer();
  EXPECT_EQ(ports_.mobility.sent_count(), 0u);
  clock_.Advance(1ms);
  ha_->OnTimer();
  auto bas = TakeBas(ports_.mobility);
  ASSERT_EQ(bas.size(), 1u);
  EXPECT_EQ(bas[0].ba.status, ba_status::kAccepted);
  EXPECT_NE(ha_->cache().Find(kHoa), nullptr);
}

TEST_F(HomeAgentTest, RfcDadRejectsWith134WhenTheAddressAnswers) {
  auto c = BaseConfig();
  c.dad = DadMode::kRfc;
  Make(c);
  ha_->HandleLinkFrame(Frame(BuPacket({})));
  ha_->HandleLinkFrame(NaFrameFrom(kHoa, kNeighborMac));  // the address is still in use
  auto bas = TakeBas(ports_.mobility);
  ASSERT_EQ(bas.size(), 1u);
  EXPECT_EQ(bas[0].ba.status, ba_status::kDuplicateAddressDetectionFailed);
  clock_.Advance(2s);
  ha_->OnTimer();
  EXPECT_EQ(ports_.mobility.sent_count(), 0u);
  EXPECT_EQ(ha_->cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha_->counters().dad_conflicts, 1u);
}

TEST_F(HomeAgentTest, RfcDadRejectsWhenAnotherNodeProbesTheSameAddress) {
  auto c = BaseConfig();
  c.dad = DadMode::kRfc;
  Make(c);
  ha_->HandleLinkFrame(Frame(BuPacket({})));
  auto probe = BuildNeighborSolicitationFrame(kNeighborMac, Ipv6Address{}, kHoa);
  ha_->HandleLinkFrame(probe);
  auto bas = TakeBas(ports_.mobility);
  ASSERT_EQ(bas.size(), 1u);
  EXPECT_EQ(bas[0].ba.status, ba_status::kDuplicateAddressDetectionFailed);
}

TEST_F(HomeAgentTest, OptimisticDadAcceptsAtOnceThenRevokesOnConflict) {
  auto c = BaseConfig();
  c.dad = DadMode::kOptimistic;
  Make(c);
  Ba ba = Send({});
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  ASSERT_NE(ha_->cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha_->cache().Find(kHoa)->state, CacheEntryState::kOptimistic);
  auto frames = LinkFrames();
  ASSERT_EQ(frames.size(), 2u) << "the Override NA, then the probe";
  EXPECT_TRUE(IsOverrideNaFor(frames[0].bytes, kHoa));
  EXPECT_TRUE(IsDadProbeFor(frames[1].bytes, kHoa));
  ha_->HandleLinkFrame(NaFrameFrom(kHoa, kNeighborMac));
  EXPECT_EQ(ha_->cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha_->counters().dad_revoked, 1u);
  EXPECT_TRUE(LinkFrames().empty()) << "nothing more is announced for a revoked binding";
  EXPECT_FALSE(ha_->NextDeadline()) << "no probe and no binding left";
  BuSpec s;
  s.seq = 2;
  EXPECT_EQ(Send(s).ba.status, ba_status::kDuplicateAddressDetectionFailed);
  s.seq = 3;  // the mark is consumed; a new attempt probes again
  EXPECT_EQ(Send(s).ba.status, ba_status::kAccepted);
}

// Every frame and packet the HA sends, tagged with its port, in one sequence:
// the order across ports (BA on the mobility port, NA and probe on the link).
class OrderLog {
 public:
  class Port final : public PacketSink {
   public:
    Port(OrderLog& log, std::string tag, PacketSink& inner) : log_(log), tag_(tag), inner_(inner) {}
    Status Send(std::span<const uint8_t> packet) override {
      log_.entries.push_back({tag_, std::vector<uint8_t>(packet.begin(), packet.end())});
      return inner_.Send(packet);
    }

   private:
    OrderLog& log_;
    std::string tag_;
    PacketSink& inner_;
  };
  struct Entry {
    std::string port;
    std::vector<uint8_t> bytes;
  };
  // "BA", "NA", "probe" or "other" for each entry, in order.
  std::vector<std::string> Kinds(const Ipv6Address& hoa) const {
    std::vector<std::string> out;
    for (const auto& e : entries) {
      if (e.port == "mobility")
        out.push_back("BA");
      else if (IsOverrideNaFor(e.bytes, hoa))
        out.push_back("NA");
      else if (IsDadProbeFor(e.bytes, hoa))
        out.push_back("probe");
      else
        out.push_back("other");
    }
    return out;
  }
  std::vector<Entry> entries;
};

// A home agent in DAD mode `dad` over the fixture's ports, with the link and
// mobility sinks recorded, in order, into one log; it has just received a
// BU for a new binding.
struct OrderedHomeAgent {
  OrderedHomeAgent(Ports& p, DadMode dad, FakeClock& clock)
      : link(log, "link", p.link),
        mobility(log, "mobility", p.mobility),
        view(WithRecordedSinks(p.view())),
        ha(WithDad(dad), view, clock) {
    ha.HandleLinkFrame(Frame(BuPacket({})));
  }
  HomeAgentPorts WithRecordedSinks(HomeAgentPorts v) {
    v.link = &link;
    v.mobility = &mobility;
    return v;
  }
  static HomeAgentConfig WithDad(DadMode dad) {
    auto c = BaseConfig();
    c.dad = dad;
    return c;
  }
  OrderLog log;
  OrderLog::Port link, mobility;
  HomeAgentPorts view;
  HomeAgent ha;
};

TEST_F(HomeAgentTest, OptimisticDadSendsTheBaAndTheNaBeforeTheProbeCompletes) {
  OrderedHomeAgent ordered(ports_, DadMode::kOptimistic, clock_);
  OrderLog& log = ordered.log;
  HomeAgent& ha = ordered.ha;
  // All at once, no time passing: the binding is usable before the probe's
  // RetransTimer runs out, and the NA precedes the probe.
  EXPECT_EQ(log.Kinds(kHoa), (std::vector<std::string>{"NA", "BA", "probe"}));
  auto bas = TakeBas(ports_.mobility);
  ASSERT_EQ(bas.size(), 1u);
  EXPECT_EQ(bas[0].ba.status, ba_status::kAccepted);
  EXPECT_EQ(bas[0].ba.lifetime, 150);
  ASSERT_NE(ha.cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha.cache().Find(kHoa)->state, CacheEntryState::kOptimistic);
  EXPECT_EQ(*ha.NextDeadline(), clock_.Now() + 1s) << "the probe is still running";
  EXPECT_EQ(ha.counters().proxy_na_sent, 1u);
  EXPECT_EQ(ha.counters().dad_probes, 1u);

  // While optimistic the binding already carries the home link's traffic.
  ha.HandleLinkFrame(Frame(Udp6(*ParseIpv6("2001:db8:ff::1"), kHoa)));
  EXPECT_EQ(ports_.tunnel6.sent_count(), 1u);

  // The probe passes: active, announced once more.
  log.entries.clear();
  clock_.Advance(1s);
  ha.OnTimer();
  EXPECT_EQ(ha.cache().Find(kHoa)->state, CacheEntryState::kActive);
  EXPECT_EQ(log.Kinds(kHoa), (std::vector<std::string>{"NA"}));
  EXPECT_EQ(ha.counters().dad_revoked, 0u);
}

TEST_F(HomeAgentTest, RfcDadStillSendsNothingButTheProbeUntilItCompletes) {
  OrderedHomeAgent ordered(ports_, DadMode::kRfc, clock_);
  OrderLog& log = ordered.log;
  HomeAgent& ha = ordered.ha;
  EXPECT_EQ(log.Kinds(kHoa), (std::vector<std::string>{"probe"}));
  clock_.Advance(1s);
  ha.OnTimer();
  EXPECT_EQ(log.Kinds(kHoa), (std::vector<std::string>{"probe", "NA", "BA"}));
}

TEST_F(HomeAgentTest, AnOptimisticBindingIsProxiedWithOverrideAndRevokedOnAConflict) {
  auto c = BaseConfig();
  c.dad = DadMode::kOptimistic;
  Make(c);
  BuSpec s;
  s.hoa4 = *ParseIpv4("192.0.2.20");
  EXPECT_EQ(Send(s).ba.status, ba_status::kAccepted);
  auto frames = LinkFrames();
  ASSERT_EQ(frames.size(), 3u);  // NA, gratuitous ARP, probe
  EXPECT_TRUE(IsOverrideNaFor(frames[0].bytes, kHoa));
  auto garp = DecodeArp(ParseEthernetFrame(frames[1].bytes)->payload);
  ASSERT_TRUE(garp);
  EXPECT_TRUE(IsGratuitous(*garp));
  EXPECT_EQ(garp->sender_mac, kHaMac);
  EXPECT_TRUE(IsDadProbeFor(frames[2].bytes, kHoa));

  // A neighbour's NS (not a DAD probe) is answered with S = 1, O = 1.
  const auto ns = NsFrameFor(kHoa, *ParseIpv6("2001:db8:a::1"));
  ha_->HandleLinkFrame(ns);
  frames = LinkFrames();
  ASSERT_EQ(frames.size(), 1u);
  auto rip = ParseIpv6Packet(ParseEthernetFrame(frames[0].bytes)->payload);
  auto na = DecodeNeighborAdvertisement(rip->payload, {rip->header.src, rip->header.dst, 255});
  ASSERT_TRUE(na);
  EXPECT_TRUE(na->solicited);
  EXPECT_TRUE(na->override);
  // ARP for the IPv4 home address is answered too.
  const auto arp = ArpRequestFrameFor(*s.hoa4);
  ha_->HandleLinkFrame(arp);
  EXPECT_EQ(LinkFrames().size(), 1u);

  // The owner defends the address: revoked, and the proxy stops at once.
  ha_->HandleLinkFrame(NaFrameFrom(kHoa, kNeighborMac));
  EXPECT_EQ(ha_->counters().dad_revoked, 1u);
  EXPECT_EQ(ha_->cache().Find(kHoa), nullptr);
  EXPECT_EQ(ha_->cache().FindByHomeAddress4(*s.hoa4), nullptr);
  ha_->HandleLinkFrame(ns);
  ha_->HandleLinkFrame(arp);
  EXPECT_TRUE(LinkFrames().empty());
  ha_->HandleLinkFrame(Frame(Udp6(*ParseIpv6("2001:db8:ff::1"), kHoa)));
  EXPECT_EQ(ports_.tunnel6.sent_count(), 0u);
  clock_.Advance(1s);
  ha_->OnTimer();
  EXPECT_TRUE(LinkFrames().empty()) << "no promotion or NA after the revocation";
  s.seq = 2;
  EXPECT_EQ(Send(s).ba.status, ba_status::kDuplicateAddressDetectionFailed);
}

TEST_F(HomeAgentTest, OptimisticDadRevocationOutlivesAShortMaxLifetime) {
  auto c = BaseConfig();
  c.dad = DadMode::kOptimistic;
  c.max_lifetime = 8s;
  Make(c);
  Send({});
  ha_->HandleLinkFrame(NaFrameFrom(kHoa, kNeighborMac));
  clock_.Advance(60s);  // the MN retries long after the lifetime it asked for
  ha_->OnTimer();
  EXPECT_EQ(Send(WithSeq(2)).ba.status, ba_status::kDuplicateAddressDetectionFailed);
  clock_.Advance(601s);
  ha_->OnTimer();
  Send(WithSeq(3));                                       // accepted optimistically again...
  ha_->HandleLinkFrame(NaFrameFrom(kHoa, kNeighborMac));  // ...and revoked again
  clock_.Advance(601s);
  ha_->OnTimer();  // a mark nobody asked about for 10 minutes is forgotten
  EXPECT_EQ(Send(WithSeq(4)).ba.status, ba_status::kAccepted);
}

TEST_F(HomeAgentTest, OptimisticDadPromotesAndAnnouncesAfterAQuietProbe) {
  auto c = BaseConfig();
  c.dad = DadMode::kOptimistic;
  Make(c);
  Send({});
  EXPECT_EQ(LinkFrames().size(), 2u);  // NA at once, and the probe
  clock_.Advance(1s);
  ha_->OnTimer();
  EXPECT_EQ(ha_->cache().Find(kHoa)->state, CacheEntryState::kActive);
  auto frames = LinkFrames();
  ASSERT_EQ(frames.size(), 1u);
  auto eth = ParseEthernetFrame(frames[0].bytes);
  auto ip = ParseIpv6Packet(eth->payload);
  auto na = DecodeNeighborAdvertisement(ip->payload, {ip->header.src, ip->header.dst, 255});
  ASSERT_TRUE(na);
  EXPECT_TRUE(na->override);
  EXPECT_EQ(na->target, kHoa);
}

// ---- Proxy ND / ARP -------------------------------------------------------------------

TEST_F(HomeAgentTest, AnnouncesANewBindingWithAnUnsolicitedOverrideNa) {
  Make(BaseConfig());
  Send({});
  auto frames = LinkFrames();
  ASSERT_EQ(frames.size(), 1u);
  auto eth = ParseEthernetFrame(frames[0].bytes);
  ASSERT_TRUE(eth);
  EXPECT_EQ(eth->dst, (MacAddress{0x33, 0x33, 0, 0, 0, 1}));
  EXPECT_EQ(eth->src, kHaMac);
  auto ip = ParseIpv6Packet(eth->payload);
  ASSERT_TRUE(ip);
  EXPECT_EQ(ip->header.hop_limit, 255);
  EXPECT_EQ(ip->header.dst, kAllNodesMulticast);
  auto na = DecodeNeighborAdvertisement(ip->payload,
                                        {ip->header.src, ip->header.dst, ip->header.hop_limit});
  ASSERT_TRUE(na) << na.error().message();
  EXPECT_EQ(na->target, kHoa);
  EXPECT_TRUE(na->override);
  EXPECT_FALSE(na->solicited);
  EXPECT_FALSE(na->router);
  EXPECT_EQ(na->target_link_layer, kHaMac);
}

TEST_F(HomeAgentTest, AnswersANeighborSolicitationForABoundHomeAddress) {
  Make(BaseConfig());
  Send({});
  LinkFrames();
  Ipv6Address neighbor = *ParseIpv6("2001:db8:a::1");
  ha_->HandleLinkFrame(NsFrameFor(kHoa, neighbor));
  auto frames = LinkFrames();
  ASSERT_EQ(frames.size(), 1u);
  auto eth = ParseEthernetFrame(frames[0].bytes);
  EXPECT_EQ(eth->dst, kRouterMac);
  auto rip = ParseIpv6Packet(eth->payload);
  EXPECT_EQ(rip->header.dst, neighbor);
  auto na = DecodeNeighborAdvertisement(rip->payload, {rip->header.src, rip->header.dst, 255});
  ASSERT_TRUE(na);
  EXPECT_EQ(na->target, kHoa);
  EXPECT_TRUE(na->solicited);
  EXPECT_TRUE(na->override);
  EXPECT_EQ(na->target_link_layer, kHaMac);
  // Not for an unbound address.
  ha_->HandleLinkFrame(NsFrameFor(kHoa2, neighbor));
  EXPECT_TRUE(LinkFrames().empty());
}

TEST_F(HomeAgentTest, ProxiesTheLinkLocalAddressOnlyWhenTheLFlagIsSet) {
  Make(BaseConfig());
  BuSpec s;
  s.flags |= bu_flag::kLinkLocal;
  Send(s);
  EXPECT_EQ(LinkFrames().size(), 2u);  // NA for the HoA and for fe80::20
  s.seq = 2;
  s.flags &= uint16_t(~bu_flag::kLinkLocal);
  Send(s);
  ha_->HandleLinkFrame(NsFrameFor(*ParseIpv6("fe80::20"), *ParseIpv6("fe80::1"), std::nullopt));
  EXPECT_TRUE(LinkFrames().empty());
}

TEST_F(HomeAgentTest, StopsProxyingAfterDeregistration) {
  Make(BaseConfig());
  BuSpec s;
  s.hoa4 = *ParseIpv4("192.0.2.20");
  Send(s);
  LinkFrames();
  s.seq = 2;
  s.lifetime = 0;
  Send(s);
  ha_->HandleLinkFrame(ArpRequestFrameFor(*ParseIpv4("192.0.2.20")));
  EXPECT_TRUE(LinkFrames().empty());
}

TEST_F(HomeAgentTest, AnswersArpAndSendsGratuitousArpForAnIpv4HomeAddress) {
  Make(BaseConfig());
  BuSpec s;
  s.hoa4 = *ParseIpv4("192.0.2.20");
  Send(s);
  auto frames = LinkFrames();
  ASSERT_EQ(frames.size(), 2u);  // NA + gratuitous ARP
  auto garp = DecodeArp(ParseEthernetFrame(frames[1].bytes)->payload);
  ASSERT_TRUE(garp);
  EXPECT_TRUE(IsGratuitous(*garp));
  EXPECT_EQ(garp->sender_mac, kHaMac);
  EXPECT_EQ(garp->sender_ip, *s.hoa4);

  ha_->HandleLinkFrame(ArpRequestFrameFor(*s.hoa4));
  frames = LinkFrames();
  ASSERT_EQ(frames.size(), 1u);
  auto eth = ParseEthernetFrame(frames[0].bytes);
  EXPECT_EQ(eth->dst, kRouterMac);
  auto reply = DecodeArp(eth->payload);
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->operation, kArpOpReply);
  EXPECT_EQ(reply->sender_mac, kHaMac);
  EXPECT_EQ(reply->sender_ip, *s.hoa4);
  EXPECT_EQ(reply->target_ip, kRouterIp4);
}

// ---- Tunnels ---------------------------------------------------------------------

TEST_F(HomeAgentTest, TunnelsHomeLinkTrafficForABoundAddressToTheCareOf) {
  Make(BaseConfig());
  Send({});
  Ipv6Address cn = *ParseIpv6("2001:db8:d::5");
  ha_->HandleLinkFrame(Frame(Udp6(cn, kHoa)));
  auto sent = ports_.tunnel6.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  ASSERT_TRUE(sent[0].dst);
  EXPECT_EQ(*sent[0].dst, kCoa);
  auto inner = ParseIpv6Packet(sent[0].bytes);
  ASSERT_TRUE(inner);
  EXPECT_EQ(inner->header.dst, kHoa);
  EXPECT_EQ(inner->header.hop_limit, 63) << "the HA forwards: hop limit decremented";
  // Not for frames addressed to another MAC, nor for unbound addresses.
  ha_->HandleLinkFrame(Frame(Udp6(cn, kHoa), kNeighborMac));
  ha_->HandleLinkFrame(Frame(Udp6(cn, kHoa2)));
  EXPECT_EQ(ports_.tunnel6.sent_count(), 0u);
  EXPECT_EQ(ha_->counters().encapsulated, 1u);
}

TEST_F(HomeAgentTest, TunnelsIpv4TrafficForABoundIpv4HomeAddressAs4in6) {
  Make(BaseConfig());
  BuSpec s;
  s.hoa4 = *ParseIpv4("192.0.2.20");
  Send(s);
  auto pkt = Udp4(*ParseIpv4("198.51.100.5"), *s.hoa4);
  ha_->HandleLinkFrame(Frame(pkt, kHaMac, ethertype::kIpv4));
  auto sent = ports_.tunnel4.TakeSent();
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(*sent[0].dst, kCoa);
  auto inner = ParseIpv4Packet(sent[0].bytes);
  ASSERT_TRUE(inner) << "TTL decrement must keep the header checksum valid";
  EXPECT_EQ(inner->header.ttl, 63);
}

TEST_F(HomeAgentTest, SendsAGroMergedIpv4TcpFrameOnAsItsSegments) {
  Make(BaseConfig());  // link_mtu 1500
  BuSpec s;
  s.hoa4 = *ParseIpv4("192.0.2.20");
  Send(s);
  Ipv4Header h;
  h.protocol = ipproto::kTcp;
  h.dont_fragment = true;
  h.src = *ParseIpv4("198.51.100.5");
  h.dst = *s.hoa4;
  std::vector<uint8_t> tcp = {0x13, 0x89, 0xc0, 0x01, 0,    0,    0, 1, 0, 0,
                              0,    0,    0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0};
  tcp.resize(20 + 3 * 1460 + 100, 0x5a);  // three full segments and a short one
  auto pkt = BuildIpv4Packet(h, tcp);
  ASSERT_TRUE(pkt);
  ha_->HandleLinkFrame(Frame(*pkt, kHaMac, ethertype::kIpv4));
  auto sent = ports_.tunnel4.TakeSent();
  ASSERT_EQ(sent.size(), 4u);
  for (const auto& p : sent) {
    EXPECT_LE(p.bytes.size(), 1500u);
    auto inner = ParseIpv4Packet(p.bytes);
    ASSERT_TRUE(inner);
    EXPECT_EQ(inner->header.ttl, 63);
  }
  EXPECT_EQ(ha_->counters().resegmented, 1u);
  EXPECT_EQ(ha_->counters().encapsulated, 4u);
  // A frame that fits goes on whole.
  tcp.resize(20 + 1460);
  ha_->HandleLinkFrame(Frame(*BuildIpv4Packet(h, tcp), kHaMac, ethertype::kIpv4));
  EXPECT_EQ(ports_.tunnel4.TakeSent().size(), 1u);
  EXPECT_EQ(ha_->counters().resegmented, 1u);
}

TEST_F(HomeAgentTest, DecapsulatesOnlyFromTheCareOfBoundToTheInnerSource) {
  Make(BaseConfig());
  Send({});
  Ipv6Address cn = *ParseIpv6("2001:db8:d::5");
  ha_->HandleTunnelPacket(ipproto::kIpv6, kCoa, Udp6(kHoa, cn));
  auto out = ports_.deliver6.TakeSent();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(ParseIpv6Packet(out[0].bytes)->header.hop_limit, 63);
  // Spoofing: a bound HoA from another care-of, an unbound HoA from the CoA.
  ha_->HandleTunnelPacket(ipproto::kIpv6, kCoa2, Udp6(kHoa, cn));
  ha_->HandleTunnelPacket(ipproto::kIpv6, kCoa, Udp6(kHoa2, cn));
  EXPECT_EQ(ports_.deliver6.sent_count(), 0u);
  EXPECT_EQ(ha_->counters().decap_spoofed, 2u);
  // Garbage.
  ha_->HandleTunnelPacket(ipproto::kIpv6, kCoa, std::vector<uint8_t>{0x60, 0, 0});
  EXPECT_EQ(ha_->counters().decap_malformed, 1u);
  // Hop limit 1 is not forwarded.
  ha_->HandleTunnelPacket(ipproto::kIpv6, kCoa, Udp6(kHoa, cn, 1));
  EXPECT_EQ(ha_->counters().hop_limit_exceeded, 1u);
  EXPECT_EQ(ports_.deliver6.sent_count(), 0u);
}

TEST_F(HomeAgentTest, DecapsulatesIpv4FromTheBoundCareOfOnly) {
  Make(BaseConfig());
  BuSpec s;
  s.hoa4 = *ParseIpv4("192.0.2.20");
  Send(s);
  ha_->HandleTunnelPacket(ipproto::kIpv4, kCoa, Udp4(*s.hoa4, *ParseIpv4("198.51.100.5")));
  EXPECT_EQ(ports_.deliver4.sent_count(), 1u);
  ha_->HandleTunnelPacket(ipproto::kIpv4, kCoa2, Udp4(*s.hoa4, *ParseIpv4("198.51.100.5")));
  ha_->HandleTunnelPacket(ipproto::kIpv4, kCoa,
                          Udp4(*ParseIpv4("192.0.2.99"), *ParseIpv4("198.51.100.5")));
  EXPECT_EQ(ports_.deliver4.sent_count(), 1u);
  EXPECT_EQ(ha_->counters().decap_spoofed, 2u);
}

// ---- Authentication ---------------------------------------------------------------

HomeAgentConfig SecureConfig() {
  auto c = BaseConfig();
  c.insecure = false;
  c.keys = {HomeKey{kHoa, kSpi, kKey, MhAuthAlgorithm::kHmacSha256_128}};
  return c;
}

TEST_F(HomeAgentTest, AcceptsAnAuthenticatedBuAndAuthenticatesTheBa) {
  Make(SecureConfig());
  BuSpec s;
  s.spi = kSpi;
  Ba ba = Send(s);
  EXPECT_EQ(ba.ba.status, ba_status::kAccepted);
  MhAuthParams p;
  p.spi = kSpi;
  p.key = kKey;
  p.care_of = kCoa;
  p.home_address = kHoa;
  EXPECT_TRUE(VerifyMobilityMessageAuthentication(ba.mh, p));
  std::vector<uint8_t> wrong(32, 1);
  p.key = wrong;
  EXPECT_FALSE(VerifyMobilityMessageAuthentication(ba.mh, p));
  EXPECT_EQ(ha_->cache().Find(kHoa)->spi, kSpi);
}

TEST_F(HomeAgentTest, RejectsAWrongKeyWith146) {
  Make(SecureConfig());
  BuSpec s;
  s.spi = kSpi;
  s.key = std::vector<uint8_t>(32, 0x11);
  EXPECT_EQ(Send(s).ba.status, ba_status::kAuthenticationFailed);
  EXPECT_EQ(ha_->cache().size(), 0u);
  EXPECT_EQ(ha_->counters().bu_auth_failed, 1u);
}

TEST_F(HomeAgentTest, RejectsAWrongSpiWith146) {
  Make(SecureConfig());
  BuSpec s;
  s.spi = kSpi + 1;
  EXPECT_EQ(Send(s).ba.status, ba_status::kAuthenticationFailed);
  EXPECT_EQ(ha_->cache().size(), 0u);
}

TEST_F(HomeAgentTest, DropsAnUnauthenticatedBuSilently) {
  Make(SecureConfig());
  ha_->HandleLinkFrame(Frame(BuPacket({})));
  EXPECT_EQ(ports_.mobility.sent_count(), 0u);
  EXPECT_EQ(ha_->cache().size(), 0u);
  EXPECT_EQ(ha_->counters().bu_auth_missing, 1u);
}

TEST_F(HomeAgentTest, AKeyedHomeAddressIsAllowedAndOthersGet129) {
  Make(SecureConfig());
  BuSpec s;
  s.hoa = kHoa2;
  s.spi = kSpi;
  EXPECT_EQ(Send(s).ba.status, ba_status::kAdministrativelyProhibited);
}

TEST(LoadHomeKey, ReadsHexKeyFilesAndRefusesLooseModes) {
  char tmpl[] = "/tmp/kagemusha-ha-key.XXXXXX";
  int fd = ::mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  std::string hex(64, 'a');
  ASSERT_EQ(::write(fd, (hex + "\n").data(), 65), 65);
  ::close(fd);
  ::chmod(tmpl, 0600);
  auto k = LoadHomeKey(std::string("2001:db8:a::20:1000:") + tmpl);
  ASSERT_TRUE(k) << k.error().message();
  EXPECT_EQ(k->home_address, kHoa);
  EXPECT_EQ(k->spi, 1000u);
  EXPECT_EQ(k->key, std::vector<uint8_t>(32, 0xaa));
  auto b = LoadHomeKey(std::string("[2001:db8:a::20]:1000:") + tmpl);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->key, k->key);
  ::chmod(tmpl, 0640);
  auto loose = LoadHomeKey(std::string("2001:db8:a::20:1000:") + tmpl);
  ASSERT_FALSE(loose);
  EXPECT_EQ(loose.error().code(), EPERM);
  EXPECT_NE(loose.error().message().find("chmod 600"), std::string::npos);
  EXPECT_EQ(loose.error().message().find(hex), std::string::npos) << "never print the key";
  ::chmod(tmpl, 0600);
  EXPECT_FALSE(LoadHomeKey(std::string("2001:db8:a::20:12:") + tmpl));  // reserved SPI
  EXPECT_FALSE(LoadHomeKey("2001:db8:a::20:1000"));
  EXPECT_FALSE(LoadHomeKey("2001:db8:a::20:1000:/nonexistent/key"));
  ::unlink(tmpl);
}

// ---- Robustness -------------------------------------------------------------------

TEST_F(HomeAgentTest, RateLimitsBurstsPerSource) {
  auto c = BaseConfig();
  c.bu_rate = 5;
  Make(c);
  for (int i = 1; i <= 20; ++i) {
    BuSpec s;
    s.seq = uint16_t(i);
    ha_->HandleLinkFrame(Frame(BuPacket(s)));
  }
  EXPECT_EQ(ports_.mobility.TakeSent().size(), 5u);
  EXPECT_EQ(ha_->counters().bu_rate_limited, 15u);
  // Another source is not affected.
  BuSpec other;
  other.coa = kCoa2;
  other.hoa = kHoa2;
  EXPECT_EQ(Send(other).ba.status, ba_status::kAccepted);
  clock_.Advance(1s);  // refills 5 tokens
  for (int i = 21; i <= 30; ++i) {
    BuSpec s;
    s.seq = uint16_t(i);
    ha_->HandleLinkFrame(Frame(BuPacket(s)));
  }
  EXPECT_EQ(ports_.mobility.TakeSent().size(), 5u);
  EXPECT_EQ(ha_->cache().Find(kHoa)->sequence, 25);
}

TEST(BuRateLimiter, BoundsItsTableByEvictingTheLeastRecentSource) {
  BuRateLimiter l(1, 1, 3);
  Clock::TimePoint t{};
  Ipv6Address a = kCoa, b = kCoa2, c = kHoa, d = kHoa2;
  EXPECT_TRUE(l.Allow(a, t));
  EXPECT_TRUE(l.Allow(b, t));
  EXPECT_TRUE(l.Allow(c, t));
  EXPECT_FALSE(l.Allow(a, t));  // a is now most recent
  EXPECT_TRUE(l.Allow(d, t));   // evicts b
  EXPECT_EQ(l.size(), 3u);
  EXPECT_TRUE(l.Allow(b, t));  // b starts afresh
  EXPECT_FALSE(l.Allow(d, t));
}

TEST_F(HomeAgentTest, SurvivesMalformedBindingUpdatesWithBindingsIntact) {
  Make(BaseConfig());
  Send({});
  auto good = BuPacket(WithSeq(2));
  // Every truncation of a valid BU, inside a frame.
  for (size_t n = 0; n < good.size(); ++n) {
    std::vector<uint8_t> cut(good.begin(), good.begin() + ptrdiff_t(n));
    ha_->HandleLinkFrame(Frame(cut));
    ha_->HandleMobilityPacket(cut);
  }
  // A bad checksum.
  auto bad = good;
  bad.back() ^= 0x01;
  ha_->HandleLinkFrame(Frame(bad));
  EXPECT_GE(ha_->counters().bu_bad_checksum, 1u);
  // An oversized (lying) payload length and random garbage.
  auto lying = good;
  lying[4] = 0xff;
  ha_->HandleLinkFrame(Frame(lying));
  std::vector<uint8_t> garbage(3000, 0xA5);
  ha_->HandleLinkFrame(garbage);
  ha_->HandleLinkFrame(Frame(garbage));
  EXPECT_EQ(ports_.mobility.sent_count(), 0u);
  const CacheEntry* b = ha_->cache().Find(kHoa);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->sequence, 1);
  EXPECT_EQ(b->care_of, kCoa);
  EXPECT_EQ(ha_->cache().size(), 1u);
  EXPECT_EQ(Send(WithSeq(2)).ba.status, ba_status::kAccepted);
}

TEST_F(HomeAgentTest, HandlesTenThousandBindings) {
  auto c = BaseConfig();
  Make(c);
  for (uint32_t i = 0; i < 10000; ++i) {
    Ipv6Address hoa = kHoa;
    hoa[13] = uint8_t(i >> 8);
    hoa[14] = uint8_t(i);
    BuSpec s;
    s.hoa = hoa;
    s.flags = bu_flag::kHomeRegistration;  // no BA
    s.lifetime = uint16_t(10 + i % 50);
    ha_->HandleLinkFrame(Frame(BuPacket(s)));
  }
  EXPECT_EQ(ha_->cache().size(), 10000u);
  EXPECT_EQ(ha_->Status().bindings.size(), 10000u);
  clock_.Advance(std::chrono::seconds(4 * 59));
  ha_->OnTimer();
  EXPECT_EQ(ha_->cache().size(), 0u);
  EXPECT_EQ(ha_->counters().expired, 10000u);
}

// ---- Persistence ----------------------------------------------------------------

TEST_F(HomeAgentTest, BindingsSurviveARestartAndAreReannounced) {
  char tmpl[] = "/tmp/kagemusha-ha-state.XXXXXX";
  std::string dir = ::mkdtemp(tmpl);
  {
    auto j = BindingJournal::Open(dir);
    ASSERT_TRUE(j);
    Make(BaseConfig(), j->get());
    BuSpec s;
    s.hoa4 = *ParseIpv4("192.0.2.20");
    s.seq = 7;
    Send(s);
    BuSpec shortlived;
    shortlived.hoa = kHoa2;
    shortlived.lifetime = 5;  // 20 s
    Send(shortlived);
    ha_.reset();
  }
  // The process is gone for 30 s: the short binding expired meanwhile.
  wall_ += 30s;
  Ports fresh;
  FakeClock clock2;
  clock2.Advance(12345s);  // a new steady clock epoch
  auto j = BindingJournal::Open(dir);
  ASSERT_TRUE(j);
  auto loaded = (*j)->Load();
  ASSERT_TRUE(loaded);
  HomeAgent ha(BaseConfig(), fresh.view(), clock2, j->get(), [this] { return wall_; });
  auto restored = ha.Restore(loaded->bindings);
  ASSERT_TRUE(restored) << restored.error().message();
  EXPECT_EQ(*restored, 1u);
  const CacheEntry* b = ha.cache().Find(kHoa);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->care_of, kCoa);
  EXPECT_EQ(b->sequence, 7);
  EXPECT_EQ(b->home_address4, *ParseIpv4("192.0.2.20"));
  EXPECT_EQ(b->expires - clock2.Now(), 570s);
  EXPECT_EQ(ha.cache().Find(kHoa2), nullptr);
  EXPECT_EQ(fresh.link.TakeSent().size(), 2u);  // NA + gratuitous ARP
  // The sequence window survived: a replay is refused.
  ha.HandleLinkFrame(Frame(BuPacket(WithSeq(7))));
  auto bas = TakeBas(fresh.mobility);
  ASSERT_EQ(bas.size(), 1u);
  EXPECT_EQ(bas[0].ba.status, ba_status::kSequenceNumberOutOfWindow);
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(HomeAgentConfig, RefusesSecureModeWithoutKeysAndBadPrefixes) {
  auto c = BaseConfig();
  EXPECT_TRUE(ValidateHomeAgentConfig(c));
  c.insecure = false;
  EXPECT_FALSE(ValidateHomeAgentConfig(c));
  c = BaseConfig();
  c.address = *ParseIpv6("2001:db8:b::2");
  EXPECT_FALSE(ValidateHomeAgentConfig(c));
  c = BaseConfig();
  c.max_lifetime = 0s;
  EXPECT_FALSE(ValidateHomeAgentConfig(c));
  EXPECT_FALSE(ParseIpv6Prefix("2001:db8::/129"));
  EXPECT_FALSE(ParseIpv4Prefix("192.0.2.0"));
  EXPECT_FALSE(ParseDadMode("fast"));
}

}  // namespace
}  // namespace kagemusha::tunnel

#include "kagemusha/tunnel/packet_io.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <vector>

#include "kagemusha/tunnel/mobility_header.h"

namespace kagemusha::tunnel {
namespace {

const Ipv6Address kHa = {0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
const Ipv6Address kCoa = {0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2};
const Ipv6Address kHoa = {0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10};
const MacAddress kMacA = {2, 0, 0, 0, 0, 1};
const MacAddress kMacB = {2, 0, 0, 0, 0, 2};

std::vector<uint8_t> Frame(std::span<const uint8_t> ipv6) {
  return BuildEthernetFrame(kMacA, kMacB, ethertype::kIpv6, ipv6);
}

TEST(BpfFilter, Ipv6NextHeaderFilterAcceptsBindingAckAndRejectsOthers) {
  const uint8_t nhs[] = {ipproto::kRouting, ipproto::kMobility};
  auto prog = BpfIpv6NextHeaderFilter(nhs);
  BindingAcknowledgement ba;
  ba.sequence = 7;
  auto ba_pkt = BuildBindingAcknowledgementPacket(kHa, kCoa, kHoa, ba);
  ASSERT_TRUE(ba_pkt);
  EXPECT_GT(RunBpf(prog, Frame(*ba_pkt)), 0u);

  BindingUpdate bu;
  auto bu_pkt = BuildBindingUpdatePacket(kCoa, kHa, kHoa, bu);
  ASSERT_TRUE(bu_pkt);
  EXPECT_EQ(RunBpf(prog, Frame(*bu_pkt)), 0u) << "BU has next header 60, not in the set";

  const uint8_t hao_only[] = {ipproto::kDestinationOptions};
  EXPECT_GT(RunBpf(BpfIpv6NextHeaderFilter(hao_only), Frame(*bu_pkt)), 0u);

  // ARP EtherType with the same bytes is refused.
  auto arp = BuildEthernetFrame(kMacA, kMacB, ethertype::kArp, *ba_pkt);
  EXPECT_EQ(RunBpf(prog, arp), 0u);
  // Truncated frames are refused, not read past.
  EXPECT_EQ(RunBpf(prog, std::span<const uint8_t>(Frame(*ba_pkt)).first(16)), 0u);
}

TEST(BpfFilter, DestinationMatchSelectsOnlyThatAddress) {
  const uint8_t nhs[] = {ipproto::kRouting};
  auto prog = BpfIpv6NextHeaderFilter(nhs, kCoa);
  BindingAcknowledgement ba;
  auto to_coa = BuildBindingAcknowledgementPacket(kHa, kCoa, kHoa, ba);
  auto to_other = BuildBindingAcknowledgementPacket(kHa, kHa, kHoa, ba);
  ASSERT_TRUE(to_coa && to_other);
  EXPECT_GT(RunBpf(prog, Frame(*to_coa)), 0u);
  EXPECT_EQ(RunBpf(prog, Frame(*to_other)), 0u);
}

TEST(BpfFilter, EtherTypeFilter) {
  auto prog = BpfEtherTypeFilter(ethertype::kArp);
  std::vector<uint8_t> payload(28, 0);
  EXPECT_GT(RunBpf(prog, BuildEthernetFrame(kMacA, kMacB, ethertype::kArp, payload)), 0u);
  EXPECT_EQ(RunBpf(prog, BuildEthernetFrame(kMacA, kMacB, ethertype::kIpv4, payload)), 0u);
}

TEST(FakePacketPort, RecordsSendsAndReplaysQueuedPacketsWithTruncationFlag) {
  FakePacketPort port;
  const uint8_t a[] = {1, 2, 3};
  ASSERT_TRUE(port.Send(a));
  ASSERT_TRUE(port.SendTo(kHa, a));
  auto sent = port.TakeSent();
  ASSERT_EQ(sent.size(), 2u);
  EXPECT_FALSE(sent[0].dst);
  EXPECT_EQ(*sent[1].dst, kHa);

  port.Queue({9, 9, 9, 9, 9}, kHa, kCoa);
  port.Queue({1});
  PacketBufferPool pool(4, 4);
  auto n = port.Receive(pool.buffers());
  ASSERT_TRUE(n);
  ASSERT_EQ(*n, 2u);
  EXPECT_EQ(pool.buffers()[0].length, 5u) << "longer than slot => storage.size()+1";
  EXPECT_EQ(pool.buffers()[0].peer, kHa);
  EXPECT_EQ(pool.buffers()[1].length, 1u);

  port.FailNextSends(1, Error::Io("boom"));
  EXPECT_FALSE(port.Send(a));
  EXPECT_TRUE(port.Send(a));
}

TEST(PacketSinkBatch, StopsAtFirstFailureAndReportsCount) {
  FakePacketPort port;
  const uint8_t a[] = {1};
  std::vector<std::span<const uint8_t>> batch(3, std::span<const uint8_t>(a));
  auto n = port.SendBatch(batch);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 3u);
  port.FailNextSends(1, Error::Io("x"));
  EXPECT_FALSE(port.SendBatch(batch));
}

// Needs root and /dev/net/tun; skipped otherwise. A TAP we write a frame
// into is seen by an AF_PACKET socket bound to it, and the filter applies.
TEST(TapDevice, FrameWrittenToTapIsCapturedByFilteredPacketSocket) {
  if (geteuid() != 0 || access("/dev/net/tun", R_OK | W_OK) != 0) GTEST_SKIP() << "needs root";
  TapOptions opts;
  opts.name = "kmtest" + std::to_string(getpid() % 100000);
  auto tap = TapDevice::Open(opts);
  if (!tap && tap.error().code() == EPERM) GTEST_SKIP() << tap.error().message();
  ASSERT_TRUE(tap) << tap.error().message();
  const uint8_t nhs[] = {ipproto::kRouting};
  PacketSocketOptions po;
  po.interface = (*tap)->name();
  po.filter = BpfIpv6NextHeaderFilter(nhs);
  po.ignore_outgoing = false;
  auto ps = PacketSocket::Open(po);
  ASSERT_TRUE(ps) << ps.error().message();

  BindingAcknowledgement ba;
  ba.sequence = 42;
  auto pkt = BuildBindingAcknowledgementPacket(kHa, kCoa, kHoa, ba);
  BindingUpdate bu;
  auto other = BuildBindingUpdatePacket(kCoa, kHa, kHoa, bu);
  ASSERT_TRUE(pkt && other);
  ASSERT_TRUE((*tap)->Send(Frame(*other)));
  ASSERT_TRUE((*tap)->Send(Frame(*pkt)));
  PacketBufferPool pool(8, 2048);
  size_t got = 0;
  std::vector<uint8_t> first;
  for (int i = 0; i < 100 && got == 0; ++i) {
    auto n = (*ps)->Receive(pool.buffers());
    ASSERT_TRUE(n);
    got = *n;
    if (got == 0) usleep(10000);
  }
  ASSERT_EQ(got, 1u) << "only the BA passes the filter";
  auto parsed = ParseMobilityFrame(pool.buffers()[0].data());
  ASSERT_TRUE(parsed) << parsed.error().message();
  EXPECT_EQ(std::get<BindingAcknowledgement>(parsed->header.message).sequence, 42);
}

}  // namespace
}  // namespace kagemusha::tunnel

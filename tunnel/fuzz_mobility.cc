// libFuzzer target for the tunnel codecs. The first byte picks a decoder, the
// rest is its input. Besides "never crash, never read out of bounds", it
// checks two properties:
//   - a Mobility Header that decodes re-encodes to one that decodes to the
//     same message (padding may differ, content may not);
//   - a Mobility Header packet that parses has a checksum that verifies.
// ND inputs get a correct checksum patched in so the fuzzer reaches option
// parsing instead of stopping at the checksum.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "kagemusha/common/coding.h"
#include "kagemusha/tunnel/arp.h"
#include "kagemusha/tunnel/ip_packet.h"
#include "kagemusha/tunnel/mobility_header.h"
#include "kagemusha/tunnel/neighbor_discovery.h"

using kagemusha::LoadBe16;
using namespace kagemusha::tunnel;

namespace {

const Ipv6Address kSrc = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
const Ipv6Address kDst = {0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1};

void MobilityRoundTrip(std::span<const uint8_t> in) {
  auto d = DecodeMobilityHeader(in);
  if (!d) return;
  (void)LocateAuthenticator(in);
  auto again = EncodeMobilityHeader(d->message, ChecksumAddresses{kSrc, kDst});
  if (!again) {
    // Only legitimate refusal: realignment pushed a near-maximal header past
    // 2048 bytes.
    if (in.size() + 8 * 64 < 2048) std::abort();
    return;
  }
  auto d2 = DecodeMobilityHeader(*again);
  if (!d2 || !(d2->message == d->message)) std::abort();
  if (!VerifyMobilityHeaderChecksum(*again, {kSrc, kDst})) std::abort();
}

void NeighborDiscovery(std::span<const uint8_t> in, uint8_t which) {
  if (in.size() < 4) return;
  std::vector<uint8_t> m(in.begin(), in.end());
  m[0] = uint8_t(icmpv6_type::kRouterSolicitation + which % 4);
  m[1] = 0;
  m[2] = m[3] = 0;
  uint16_t c = Ipv6PseudoHeaderChecksum(kSrc, kDst, ipproto::kIcmpv6, m);
  m[2] = uint8_t(c >> 8);
  m[3] = uint8_t(c);
  NdContext ctx{kSrc, kDst, kNdHopLimit};
  switch (which % 4) {
    case 0: {
      auto r = DecodeRouterSolicitation(m, ctx);
      if (r && !(*DecodeRouterSolicitation(EncodeRouterSolicitation(*r, kSrc, kDst), ctx) == *r))
        std::abort();
      break;
    }
    case 1: {
      auto r = DecodeRouterAdvertisement(m, ctx);
      if (r && !(*DecodeRouterAdvertisement(EncodeRouterAdvertisement(*r, kSrc, kDst), ctx) == *r))
        std::abort();
      break;
    }
    case 2: {
      auto r = DecodeNeighborSolicitation(m, ctx);
      if (r &&
          !(*DecodeNeighborSolicitation(EncodeNeighborSolicitation(*r, kSrc, kDst), ctx) == *r))
        std::abort();
      break;
    }
    case 3: {
      auto r = DecodeNeighborAdvertisement(m, ctx);
      if (r) {
        auto back = DecodeNeighborAdvertisement(EncodeNeighborAdvertisement(*r, kSrc, kDst), ctx);
        if (!back || !(*back == *r)) std::abort();
      }
      break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  uint8_t selector = data[0];
  std::span<const uint8_t> in(data + 1, size - 1);
  switch (selector % 8) {
    case 0:
      MobilityRoundTrip(in);
      break;
    case 1: {
      auto p = ParseMobilityPacket(in);
      if (p && !VerifyMobilityHeaderChecksum(p->mh, {p->ip.checksum_src, p->ip.checksum_dst}))
        std::abort();
      if (p) MobilityRoundTrip(p->mh);
      break;
    }
    case 2:
      (void)ParseMobilityFrame(in);
      (void)ParseEthernetFrame(in);
      break;
    case 3:
      (void)DecodeDestinationOptions(in);
      (void)DecodeType2RoutingHeader(in);
      break;
    case 4: {
      if (auto d = Decapsulate(in); d && d->inner.size() > in.size()) std::abort();
      (void)ParseIpv4Packet(in);
      (void)ParseIcmpv4(in);
      (void)ParseIcmpv6(kSrc, kDst, in);
      // The HA's captured-frame handling: resegmenting a merged IPv4 TCP
      // frame (every segment fits and says its own length) and completing a
      // CHECKSUM_PARTIAL frame's checksum in place.
      const size_t mtu = 68 + size_t(selector >> 3) * 64;
      for (const auto& seg : SegmentIpv4Tcp(in, mtu))
        if (seg.size() > mtu || seg.size() < 40 || LoadBe16(&seg[2]) != seg.size()) std::abort();
      std::vector<uint8_t> frame(in.begin(), in.end());
      (void)CompleteTransportChecksum(frame);
      break;
    }
    case 5:
      NeighborDiscovery(in, uint8_t(selector >> 3));
      break;
    case 6: {
      auto a = DecodeArp(in);
      if (a && !(*DecodeArp(EncodeArp(*a)) == *a)) std::abort();
      break;
    }
    case 7:
      if (auto p = ParseIpv6Packet(in)) (void)FindUpperLayer(*p);
      break;
  }
  return 0;
}

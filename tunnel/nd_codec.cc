// Neighbor Discovery codec. See neighbor_discovery.h. Pure: no I/O.
#include <algorithm>
#include <string>

#include "kagemusha/common/coding.h"
#include "kagemusha/tunnel/neighbor_discovery.h"

namespace kagemusha::tunnel {
namespace {

Error Bad(const std::string& what) { return Error::Protocol(what); }

struct ParsedOptions {
  std::optional<MacAddress> source_link_layer;
  std::optional<MacAddress> target_link_layer;
  std::optional<uint32_t> mtu;
  std::vector<PrefixInformation> prefixes;
};

void PutLinkLayer(ByteWriter& w, uint8_t type, const MacAddress& mac) {
  w.U8(type);
  w.U8(1);  // 8 octets: type, length, 6-byte MAC (RFC 4861 §4.6.1, RFC 2464 §8)
  w.Bytes(mac);
}

// Common checks of RFC 4861 §6.1/§7.1 and option parsing. `fixed` is the
// message length before options (ICMP header included).
Result<ParsedOptions> Validate(std::span<const uint8_t> icmp, const NdContext& ctx, uint8_t type,
                               size_t fixed) {
  std::string name = "ND type " + std::to_string(type);
  if (ctx.hop_limit != kNdHopLimit)
    return Fail(
        Bad(name + " arrived with hop limit " + std::to_string(ctx.hop_limit) + ", not 255"));
  if (icmp.size() < fixed)
    return Fail(Bad(name + " is " + std::to_string(icmp.size()) + " bytes, shorter than " +
                    std::to_string(fixed)));
  if (icmp[0] != type)
    return Fail(Bad("ICMPv6 type " + std::to_string(icmp[0]) + " where " + name + " expected"));
  if (icmp[1] != 0) return Fail(Bad(name + " with non-zero code " + std::to_string(icmp[1])));
  if (Ipv6PseudoHeaderChecksum(ctx.src, ctx.dst, ipproto::kIcmpv6, icmp) != 0)
    return Fail(Bad(name + " checksum mismatch"));
  ParsedOptions o;
  ByteReader r(icmp.subspan(fixed));
  while (!r.empty()) {
    auto t = r.U8();
    auto units = r.U8();
    if (!units) return Fail(Bad(name + " option truncated"));
    if (*units == 0) return Fail(Bad(name + " option " + std::to_string(*t) + " has length zero"));
    auto body = r.Bytes(size_t(*units) * 8 - 2);
    if (!body) return Fail(Bad(name + " option " + std::to_string(*t) + " overruns the message"));
    const uint8_t* b = body->data();
    switch (*t) {
      case nd_option::kSourceLinkLayerAddress:
      case nd_option::kTargetLinkLayerAddress: {
        if (*units != 1)
          return Fail(Bad("link-layer address option longer than an Ethernet address"));
        MacAddress mac;
        std::copy(b, b + 6, mac.begin());
        (*t == nd_option::kSourceLinkLayerAddress ? o.source_link_layer : o.target_link_layer) =
            mac;
        break;
      }
      case nd_option::kPrefixInformation: {
        if (*units != 4)
          return Fail(
              Bad("Prefix Information option length " + std::to_string(*units) + ", not 4"));
        PrefixInformation p;
        p.prefix_length = b[0];
        if (p.prefix_length > 128) return Fail(Bad("Prefix Information prefix length above 128"));
        p.on_link = b[1] & 0x80;
        p.autonomous = b[1] & 0x40;
        p.router_address = b[1] & 0x20;
        p.valid_lifetime = LoadBe32(b + 2);
        p.preferred_lifetime = LoadBe32(b + 6);
        std::copy(b + 14, b + 30, p.prefix.begin());
        o.prefixes.push_back(p);
        break;
      }
      case nd_option::kMtu:
        if (*units != 1)
          return Fail(Bad("MTU option length " + std::to_string(*units) + ", not 1"));
        o.mtu = LoadBe32(b + 2);
        break;
      default:
        break;  // RFC 4861 §4.6: unknown options are silently ignored
    }
  }
  return o;
}

std::vector<uint8_t> Finish(std::vector<uint8_t> out, const Ipv6Address& src,
                            const Ipv6Address& dst) {
  StoreBe16(out.data() + 2, Ipv6PseudoHeaderChecksum(src, dst, ipproto::kIcmpv6, out));
  return out;
}

Ipv6Address ReadAddress(std::span<const uint8_t> icmp, size_t at) {
  Ipv6Address a;
  std::copy(icmp.begin() + at, icmp.begin() + at + 16, a.begin());
  return a;
}

std::vector<uint8_t> Ipv6Frame(const MacAddress& src_mac, const MacAddress& dst_mac,
                               const Ipv6Address& src, const Ipv6Address& dst,
                               std::span<const uint8_t> icmp) {
  Ipv6Header h;
  h.src = src;
  h.dst = dst;
  h.next_header = ipproto::kIcmpv6;
  h.hop_limit = kNdHopLimit;
  // An ND message is far below 64 KiB, so the build cannot fail.
  auto packet = *BuildIpv6Packet(h, icmp);
  return BuildEthernetFrame(dst_mac, src_mac, ethertype::kIpv6, packet);
}

}  // namespace

Ipv6Address SolicitedNodeMulticast(const Ipv6Address& address) {
  Ipv6Address a = {0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, 0, 0, 0};
  a[13] = address[13];
  a[14] = address[14];
  a[15] = address[15];
  return a;
}

MacAddress MulticastMac(const Ipv6Address& m) { return {0x33, 0x33, m[12], m[13], m[14], m[15]}; }

std::vector<uint8_t> EncodeRouterSolicitation(const RouterSolicitation& m, const Ipv6Address& src,
                                              const Ipv6Address& dst) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.U8(icmpv6_type::kRouterSolicitation);
  w.U8(0);
  w.U16(0);
  w.U32(0);
  if (m.source_link_layer)
    PutLinkLayer(w, nd_option::kSourceLinkLayerAddress, *m.source_link_layer);
  return Finish(std::move(out), src, dst);
}

std::vector<uint8_t> EncodeRouterAdvertisement(const RouterAdvertisement& m, const Ipv6Address& src,
                                               const Ipv6Address& dst) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.U8(icmpv6_type::kRouterAdvertisement);
  w.U8(0);
  w.U16(0);
  w.U8(m.cur_hop_limit);
  w.U8(uint8_t((m.managed ? 0x80 : 0) | (m.other ? 0x40 : 0) | (m.home_agent ? 0x20 : 0)));
  w.U16(m.router_lifetime);
  w.U32(m.reachable_time);
  w.U32(m.retrans_timer);
  if (m.source_link_layer)
    PutLinkLayer(w, nd_option::kSourceLinkLayerAddress, *m.source_link_layer);
  if (m.mtu) {
    w.U8(nd_option::kMtu);
    w.U8(1);
    w.U16(0);
    w.U32(*m.mtu);
  }
  for (const auto& p : m.prefixes) {
    w.U8(nd_option::kPrefixInformation);
    w.U8(4);
    w.U8(p.prefix_length);
    w.U8(uint8_t((p.on_link ? 0x80 : 0) | (p.autonomous ? 0x40 : 0) |
                 (p.router_address ? 0x20 : 0)));
    w.U32(p.valid_lifetime);
    w.U32(p.preferred_lifetime);
    w.U32(0);
    w.Bytes(p.prefix);
  }
  return Finish(std::move(out), src, dst);
}

std::vector<uint8_t> EncodeNeighborSolicitation(const NeighborSolicitation& m,
                                                const Ipv6Address& src, const Ipv6Address& dst) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.U8(icmpv6_type::kNeighborSolicitation);
  w.U8(0);
  w.U16(0);
  w.U32(0);
  w.Bytes(m.target);
  if (m.source_link_layer)
    PutLinkLayer(w, nd_option::kSourceLinkLayerAddress, *m.source_link_layer);
  return Finish(std::move(out), src, dst);
}

std::vector<uint8_t> EncodeNeighborAdvertisement(const NeighborAdvertisement& m,
                                                 const Ipv6Address& src, const Ipv6Address& dst) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.U8(icmpv6_type::kNeighborAdvertisement);
  w.U8(0);
  w.U16(0);
  w.U32((m.router ? 0x80000000u : 0) | (m.solicited ? 0x40000000u : 0) |
        (m.override ? 0x20000000u : 0));
  w.Bytes(m.target);
  if (m.target_link_layer)
    PutLinkLayer(w, nd_option::kTargetLinkLayerAddress, *m.target_link_layer);
  return Finish(std::move(out), src, dst);
}

Result<RouterSolicitation> DecodeRouterSolicitation(std::span<const uint8_t> icmp,
                                                    const NdContext& ctx) {
  auto o = Validate(icmp, ctx, icmpv6_type::kRouterSolicitation, 8);
  if (!o) return Fail(o.error());
  if (IsUnspecified(ctx.src) && o->source_link_layer)
    return Fail(Bad("Router Solicitation from :: carries a source link-layer option"));
  return RouterSolicitation{o->source_link_layer};
}

Result<RouterAdvertisement> DecodeRouterAdvertisement(std::span<const uint8_t> icmp,
                                                      const NdContext& ctx) {
  if (!IsLinkLocalUnicast(ctx.src))
    return Fail(Bad("Router Advertisement source is not link-local"));
  auto o = Validate(icmp, ctx, icmpv6_type::kRouterAdvertisement, 16);
  if (!o) return Fail(o.error());
  RouterAdvertisement m;
  m.cur_hop_limit = icmp[4];
  m.managed = icmp[5] & 0x80;
  m.other = icmp[5] & 0x40;
  m.home_agent = icmp[5] & 0x20;
  m.router_lifetime = LoadBe16(&icmp[6]);
  m.reachable_time = LoadBe32(&icmp[8]);
  m.retrans_timer = LoadBe32(&icmp[12]);
  m.source_link_layer = o->source_link_layer;
  m.mtu = o->mtu;
  m.prefixes = std::move(o->prefixes);
  return m;
}

Result<NeighborSolicitation> DecodeNeighborSolicitation(std::span<const uint8_t> icmp,
                                                        const NdContext& ctx) {
  auto o = Validate(icmp, ctx, icmpv6_type::kNeighborSolicitation, 24);
  if (!o) return Fail(o.error());
  NeighborSolicitation m;
  m.target = ReadAddress(icmp, 8);
  if (IsMulticast(m.target)) return Fail(Bad("Neighbor Solicitation target is multicast"));
  if (IsUnspecified(ctx.src)) {
    if (ctx.dst != SolicitedNodeMulticast(m.target))
      return Fail(Bad("DAD Neighbor Solicitation not sent to the target's solicited-node group"));
    if (o->source_link_layer)
      return Fail(Bad("DAD Neighbor Solicitation carries a source link-layer option"));
  }
  m.source_link_layer = o->source_link_layer;
  return m;
}

Result<NeighborAdvertisement> DecodeNeighborAdvertisement(std::span<const uint8_t> icmp,
                                                          const NdContext& ctx) {
  auto o = Validate(icmp, ctx, icmpv6_type::kNeighborAdvertisement, 24);
  if (!o) return Fail(o.error());
  NeighborAdvertisement m;
  uint32_t flags = LoadBe32(&icmp[4]);
  m.router = flags & 0x80000000u;
  m.solicited = flags & 0x40000000u;
  m.override = flags & 0x20000000u;
  m.target = ReadAddress(icmp, 8);
  if (IsMulticast(m.target)) return Fail(Bad("Neighbor Advertisement target is multicast"));
  if (IsMulticast(ctx.dst) && m.solicited)
    return Fail(Bad("Neighbor Advertisement to a multicast address has the Solicited flag set"));
  m.target_link_layer = o->target_link_layer;
  return m;
}

std::vector<uint8_t> BuildUnsolicitedNeighborAdvertisementFrame(const MacAddress& mac,
                                                                const Ipv6Address& address,
                                                                bool router) {
  NeighborAdvertisement na;
  na.router = router;
  na.solicited = false;
  na.override = true;
  na.target = address;
  na.target_link_layer = mac;
  auto icmp = EncodeNeighborAdvertisement(na, address, kAllNodesMulticast);
  return Ipv6Frame(mac, MulticastMac(kAllNodesMulticast), address, kAllNodesMulticast, icmp);
}

std::vector<uint8_t> BuildNeighborSolicitationFrame(const MacAddress& mac, const Ipv6Address& src,
                                                    const Ipv6Address& target) {
  NeighborSolicitation ns;
  ns.target = target;
  if (!IsUnspecified(src)) ns.source_link_layer = mac;
  Ipv6Address group = SolicitedNodeMulticast(target);
  auto icmp = EncodeNeighborSolicitation(ns, src, group);
  return Ipv6Frame(mac, MulticastMac(group), src, group, icmp);
}

}  // namespace kagemusha::tunnel

// IPv6 Neighbor Discovery codec (RFC 4861): Router Solicitation/Advertisement,
// Neighbor Solicitation/Advertisement and their options, plus the helpers the
// mobile host needs to announce a guest at its new location (an unsolicited
// Neighbor Advertisement, RFC 4861 §7.2.6) and solicited-node multicast
// addressing (RFC 4291 §2.7.1, RFC 2464 §7).
//
// Encoders return the ICMPv6 message with its checksum over the given
// addresses. Decoders take the enclosing IPv6 addresses and hop limit and
// apply the validity checks of RFC 4861 §6.1 and §7.1 (hop limit 255, code 0,
// checksum, minimum length, no zero-length option, the address rules);
// options a decoder does not know are skipped.
//
// Thread-safety: pure functions and plain value types.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/ip_packet.h"

namespace kagemusha::tunnel {

namespace icmpv6_type {
inline constexpr uint8_t kRouterSolicitation = 133;
inline constexpr uint8_t kRouterAdvertisement = 134;
inline constexpr uint8_t kNeighborSolicitation = 135;
inline constexpr uint8_t kNeighborAdvertisement = 136;
}  // namespace icmpv6_type

namespace nd_option {
inline constexpr uint8_t kSourceLinkLayerAddress = 1;
inline constexpr uint8_t kTargetLinkLayerAddress = 2;
inline constexpr uint8_t kPrefixInformation = 3;
inline constexpr uint8_t kRedirectedHeader = 4;
inline constexpr uint8_t kMtu = 5;
}  // namespace nd_option

inline constexpr uint8_t kNdHopLimit = 255;
inline const Ipv6Address kAllNodesMulticast = {0xff, 0x02, 0, 0, 0, 0, 0, 0,
                                               0,    0,    0, 0, 0, 0, 0, 1};
inline const Ipv6Address kAllRoutersMulticast = {0xff, 0x02, 0, 0, 0, 0, 0, 0,
                                                 0,    0,    0, 0, 0, 0, 0, 2};

// ff02::1:ffXX:XXXX from the low 24 bits of `address`.
Ipv6Address SolicitedNodeMulticast(const Ipv6Address& address);
// 33:33 followed by the low 32 bits of an IPv6 multicast address.
MacAddress MulticastMac(const Ipv6Address& multicast);

struct PrefixInformation {
  uint8_t prefix_length = 64;
  bool on_link = true;          // L
  bool autonomous = true;       // A
  bool router_address = false;  // R (RFC 6275 §7.2)
  uint32_t valid_lifetime = 0;
  uint32_t preferred_lifetime = 0;
  Ipv6Address prefix{};
  bool operator==(const PrefixInformation&) const = default;
};

struct RouterSolicitation {
  std::optional<MacAddress> source_link_layer;
  bool operator==(const RouterSolicitation&) const = default;
};
struct RouterAdvertisement {
  uint8_t cur_hop_limit = 64;
  bool managed = false;     // M
  bool other = false;       // O
  bool home_agent = false;  // H (RFC 6275 §7.1)
  uint16_t router_lifetime = 0;
  uint32_t reachable_time = 0;
  uint32_t retrans_timer = 0;
  std::optional<MacAddress> source_link_layer;
  std::optional<uint32_t> mtu;
  std::vector<PrefixInformation> prefixes;
  bool operator==(const RouterAdvertisement&) const = default;
};
struct NeighborSolicitation {
  Ipv6Address target{};
  std::optional<MacAddress> source_link_layer;
  bool operator==(const NeighborSolicitation&) const = default;
};
struct NeighborAdvertisement {
  bool router = false;     // R
  bool solicited = false;  // S
  bool override = false;   // O
  Ipv6Address target{};
  std::optional<MacAddress> target_link_layer;
  bool operator==(const NeighborAdvertisement&) const = default;
};

// The addresses and hop limit of the IPv6 packet an ND message arrived in.
struct NdContext {
  Ipv6Address src{};
  Ipv6Address dst{};
  uint8_t hop_limit = kNdHopLimit;
};

std::vector<uint8_t> EncodeRouterSolicitation(const RouterSolicitation& m, const Ipv6Address& src,
                                              const Ipv6Address& dst);
std::vector<uint8_t> EncodeRouterAdvertisement(const RouterAdvertisement& m, const Ipv6Address& src,
                                               const Ipv6Address& dst);
std::vector<uint8_t> EncodeNeighborSolicitation(const NeighborSolicitation& m,
                                                const Ipv6Address& src, const Ipv6Address& dst);
std::vector<uint8_t> EncodeNeighborAdvertisement(const NeighborAdvertisement& m,
                                                 const Ipv6Address& src, const Ipv6Address& dst);

Result<RouterSolicitation> DecodeRouterSolicitation(std::span<const uint8_t> icmp,
                                                    const NdContext& ctx);
Result<RouterAdvertisement> DecodeRouterAdvertisement(std::span<const uint8_t> icmp,
                                                      const NdContext& ctx);
Result<NeighborSolicitation> DecodeNeighborSolicitation(std::span<const uint8_t> icmp,
                                                        const NdContext& ctx);
Result<NeighborAdvertisement> DecodeNeighborAdvertisement(std::span<const uint8_t> icmp,
                                                          const NdContext& ctx);

// An Ethernet frame holding an unsolicited Neighbor Advertisement for
// `address` (R=0, S=0, O=1, target link-layer option = `mac`) sent from
// `address` to all-nodes, hop limit 255: what a moved guest's host emits so
// on-link neighbours update their caches (RFC 4861 §7.2.6).
std::vector<uint8_t> BuildUnsolicitedNeighborAdvertisementFrame(const MacAddress& mac,
                                                                const Ipv6Address& address,
                                                                bool router = false);
// An Ethernet frame holding a Neighbor Solicitation for `target` sent to its
// solicited-node group; `src` unspecified (::) makes it a DAD probe, which
// carries no source link-layer option.
std::vector<uint8_t> BuildNeighborSolicitationFrame(const MacAddress& mac, const Ipv6Address& src,
                                                    const Ipv6Address& target);

}  // namespace kagemusha::tunnel

// IPv6/IPv4/Ethernet wire codecs used by the tunnel module: Internet
// checksums, the IPv6 header and the extension headers Mobile IPv6 needs
// (Home Address destination option, type 2 routing header), IPv6-in-IPv6 and
// IPv4-in-IPv6 encapsulation (RFC 2473), ICMPv6 Packet Too Big, ICMPv4
// fragmentation-needed, and Ethernet framing with VLAN tag skipping.
//
// Everything here is a pure function over byte spans: no sockets, no clock,
// no allocation beyond the returned vectors. Decoders never read past the
// span they are given and return kagemusha::Result with an EPROTO error that
// says which field was wrong. Parsed views (std::span members) point into the
// caller's buffer and live only as long as it does.
//
// Thread-safety: pure functions and plain value types.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kagemusha/common/error.h"

namespace kagemusha::tunnel {

using Ipv6Address = std::array<uint8_t, 16>;
using Ipv4Address = std::array<uint8_t, 4>;
using MacAddress = std::array<uint8_t, 6>;

// IP protocol / IPv6 Next Header numbers (IANA "Assigned Internet Protocol
// Numbers").
namespace ipproto {
inline constexpr uint8_t kHopByHop = 0;
inline constexpr uint8_t kIcmpv4 = 1;
inline constexpr uint8_t kIpv4 = 4;  // IPv4 encapsulated (RFC 2473 §3 uses it for IPv4-in-IPv6)
inline constexpr uint8_t kTcp = 6;
inline constexpr uint8_t kUdp = 17;
inline constexpr uint8_t kIpv6 = 41;  // IPv6 encapsulated (RFC 2473)
inline constexpr uint8_t kRouting = 43;
inline constexpr uint8_t kFragment = 44;
inline constexpr uint8_t kIcmpv6 = 58;
inline constexpr uint8_t kNoNextHeader = 59;
inline constexpr uint8_t kDestinationOptions = 60;
inline constexpr uint8_t kMobility = 135;  // RFC 6275 §6.1
}  // namespace ipproto

namespace ethertype {
inline constexpr uint16_t kIpv4 = 0x0800;
inline constexpr uint16_t kArp = 0x0806;
inline constexpr uint16_t kVlan = 0x8100;  // IEEE 802.1Q C-tag
inline constexpr uint16_t kQinQ = 0x88A8;  // IEEE 802.1ad S-tag
inline constexpr uint16_t kIpv6 = 0x86DD;
}  // namespace ethertype

inline constexpr size_t kIpv6HeaderSize = 40;
inline constexpr size_t kIpv4MinHeaderSize = 20;
inline constexpr size_t kEthernetHeaderSize = 14;
inline constexpr uint32_t kIpv6MinimumMtu = 1280;  // RFC 8200 §5

// Destination option types (RFC 8200 §4.2 TLVs).
inline constexpr uint8_t kOptPad1 = 0;
inline constexpr uint8_t kOptPadN = 1;
inline constexpr uint8_t kOptTunnelEncapsulationLimit = 4;  // RFC 2473 §5.1
inline constexpr uint8_t kOptHomeAddress = 201;             // 0xC9, RFC 6275 §6.3
inline constexpr uint8_t kRoutingType2 = 2;                 // RFC 6275 §6.4

// ---- Checksums --------------------------------------------------------------

// One's-complement sum of 16-bit big-endian words (an odd trailing byte is
// padded with zero), not yet folded or complemented. Chain calls by passing the
// previous sum; every chunk but the last must have even length.
uint32_t ChecksumAdd(uint32_t sum, std::span<const uint8_t> data);
// Folds a running sum to 16 bits and complements it: the value to store in a
// checksum field. Over data that already holds a correct checksum the result
// is 0.
uint16_t ChecksumFinish(uint32_t sum);
// RFC 1071 Internet checksum of `data`.
uint16_t InternetChecksum(std::span<const uint8_t> data);

// Upper-layer checksum with the IPv6 pseudo-header of RFC 8200 §8.1 (source,
// destination, 32-bit upper-layer length, 24 zero bits, next header).
// `upper` must hold zero in its checksum field when computing; over a packet
// with a correct checksum in place the result is 0.
uint16_t Ipv6PseudoHeaderChecksum(const Ipv6Address& src, const Ipv6Address& dst,
                                  uint8_t next_header, std::span<const uint8_t> upper);

// Writes the full TCP or UDP checksum of an Ethernet frame that carries
// IPv4 (unfragmented) or IPv6 (TCP/UDP directly after the fixed header),
// untagged or with one 802.1Q tag. For frames the kernel hands to an
// AF_PACKET socket before their checksum was computed
// (TP_STATUS_CSUMNOTREADY: the sender left it to an offload, as a veth or a
// local socket does), which must not be forwarded as they are. Returns false
// and leaves the frame alone if it is not such a packet or is truncated.
bool CompleteTransportChecksum(std::span<uint8_t> frame);

// ---- Ethernet ---------------------------------------------------------------

inline constexpr MacAddress kBroadcastMac = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

struct EthernetFrame {
  MacAddress dst{};
  MacAddress src{};
  // Outermost VLAN tag control information, if the frame carried 802.1Q or
  // 802.1ad tags (all tags are skipped; up to two are accepted).
  std::optional<uint16_t> vlan_tci;
  uint16_t ether_type = 0;  // after the tags
  std::span<const uint8_t> payload;
};

Result<EthernetFrame> ParseEthernetFrame(std::span<const uint8_t> frame);
// Builds dst|src|[0x8100 tci]|ether_type|payload. No FCS and no minimum-size
// padding (the kernel or NIC pads).
std::vector<uint8_t> BuildEthernetFrame(const MacAddress& dst, const MacAddress& src,
                                        uint16_t ether_type, std::span<const uint8_t> payload,
                                        std::optional<uint16_t> vlan_tci = std::nullopt);

// ---- IPv6 -------------------------------------------------------------------

struct Ipv6Header {
  uint8_t traffic_class = 0;
  uint32_t flow_label = 0;      // 20 bits
  uint16_t payload_length = 0;  // filled in by the builders
  uint8_t next_header = ipproto::kNoNextHeader;
  uint8_t hop_limit = 64;
  Ipv6Address src{};
  Ipv6Address dst{};
};

struct Ipv6Packet {
  Ipv6Header header;
  std::span<const uint8_t> payload;  // exactly payload_length bytes
};

// Decodes the fixed header and bounds the payload by Payload Length; bytes
// after it (Ethernet padding) are ignored. Jumbograms (length 0) are refused.
Result<Ipv6Packet> ParseIpv6Packet(std::span<const uint8_t> packet);
// Serialises `header` with Payload Length set from payload.size() followed by
// `payload`. Fails if the payload does not fit in 16 bits.
Result<std::vector<uint8_t>> BuildIpv6Packet(Ipv6Header header, std::span<const uint8_t> payload);

bool IsMulticast(const Ipv6Address& a);
bool IsLinkLocalUnicast(const Ipv6Address& a);  // fe80::/10
bool IsUnspecified(const Ipv6Address& a);
std::string FormatIpv6(const Ipv6Address& a);  // RFC 5952 text
std::string FormatIpv4(const Ipv4Address& a);
std::string FormatMac(const MacAddress& m);

// ---- Extension headers used by Mobile IPv6 ----------------------------------

// A Destination Options header holding only a Home Address option, padded so
// the option sits at 8n+6 (RFC 6275 §6.3): NH, len=2, PadN(2), C9 10 HoA.
std::vector<uint8_t> EncodeHomeAddressDestinationOptions(uint8_t next_header,
                                                         const Ipv6Address& home_address);

struct DestinationOptions {
  uint8_t next_header = 0;
  size_t length = 0;  // bytes occupied by the header
  std::optional<Ipv6Address> home_address;
  std::optional<uint8_t> tunnel_encapsulation_limit;
};
// Walks the TLVs. Rejects: truncation, an option running past the header, a
// Home Address option whose length is not 16 or that appears twice, and an
// unknown option whose action bits (top two) say "discard" (RFC 8200 §4.2).
Result<DestinationOptions> DecodeDestinationOptions(std::span<const uint8_t> data);

struct Type2RoutingHeader {
  uint8_t next_header = 0;
  uint8_t segments_left = 1;
  Ipv6Address home_address{};
};
std::vector<uint8_t> EncodeType2RoutingHeader(uint8_t next_header, const Ipv6Address& home_address,
                                              uint8_t segments_left = 1);
// Requires routing type 2, Hdr Ext Len 2 and Segments Left 0 or 1 (RFC 6275 §6.4).
Result<Type2RoutingHeader> DecodeType2RoutingHeader(std::span<const uint8_t> data);

// The result of walking an IPv6 packet's extension headers up to the first
// upper-layer header, with the addresses its pseudo-header must use.
struct Ipv6UpperLayer {
  Ipv6Header header;
  std::optional<Ipv6Address> home_address;    // from a Home Address option
  std::optional<Type2RoutingHeader> routing;  // a type 2 routing header
  std::optional<uint8_t> tunnel_encapsulation_limit;
  uint8_t protocol = ipproto::kNoNextHeader;
  std::span<const uint8_t> data;  // the upper-layer header and its payload
  // Pseudo-header addresses (RFC 6275 §6.1.1, §6.3, §6.4; RFC 8200 §8.1):
  // the home address replaces the source when an HAO is present, and the final
  // destination is the routing header's address while segments remain.
  Ipv6Address checksum_src{};
  Ipv6Address checksum_dst{};
};
// Skips Hop-by-Hop, Destination Options and type 2 routing headers. Fragments
// and other routing types with segments left are refused (NotSupported).
Result<Ipv6UpperLayer> FindUpperLayer(const Ipv6Packet& packet);

// ---- Encapsulation (RFC 2473) -----------------------------------------------

struct TunnelEndpoints {
  Ipv6Address src{};
  Ipv6Address dst{};
  uint8_t hop_limit = 64;
  uint8_t traffic_class = 0;
};
// Wraps a whole inner IPv6 packet (Next Header 41) or IPv4 packet (Next Header
// 4) in an outer IPv6 header. The inner packet's version nibble is checked.
Result<std::vector<uint8_t>> EncapsulateInIpv6(const TunnelEndpoints& tunnel,
                                               std::span<const uint8_t> inner_packet);

struct Decapsulated {
  Ipv6Header outer;
  uint8_t inner_protocol = 0;  // ipproto::kIpv6 or ipproto::kIpv4
  std::optional<uint8_t> tunnel_encapsulation_limit;
  std::span<const uint8_t> inner;  // the whole inner packet, length-checked
};
// Strips the outer header and any extension headers. Fails if the payload is
// not IPv6 or IPv4, or if the inner packet's own length field disagrees with
// what the outer header carried.
Result<Decapsulated> Decapsulate(std::span<const uint8_t> outer_packet);

// ---- IPv4 -------------------------------------------------------------------

struct Ipv4Header {
  uint8_t tos = 0;
  uint16_t total_length = 0;  // filled in by the builder
  uint16_t identification = 0;
  bool dont_fragment = false;
  bool more_fragments = false;
  uint16_t fragment_offset = 0;  // in 8-octet units
  uint8_t ttl = 64;
  uint8_t protocol = 0;
  Ipv4Address src{};
  Ipv4Address dst{};
};
struct Ipv4Packet {
  Ipv4Header header;
  size_t header_length = 0;          // IHL * 4, options included
  std::span<const uint8_t> payload;  // total_length - header_length bytes
};
// Checks version, IHL >= 5, Total Length against the span, and the header
// checksum.
Result<Ipv4Packet> ParseIpv4Packet(std::span<const uint8_t> packet);
// Builds a 20-byte header (no options) with its checksum, then the payload.
Result<std::vector<uint8_t>> BuildIpv4Packet(Ipv4Header header, std::span<const uint8_t> payload);

// Splits an IPv4 TCP packet longer than `mtu` into packets of at most `mtu`
// bytes, as the sender's segmentation had them before a receive offload
// (GRO) merged them into one frame for an AF_PACKET socket. Each segment
// carries the original IPv4 and TCP headers (options kept) with its own
// Total Length, Identification (+1 a segment, as Linux GSO does), header
// checksum, sequence number and full TCP checksum; FIN and PSH stay on the
// last segment only, CWR on the first only. Empty when the packet fits in
// `mtu`, is not TCP, is a fragment, is malformed, or `mtu` leaves no room
// for payload: the caller then forwards the packet as it is.
std::vector<std::vector<uint8_t>> SegmentIpv4Tcp(std::span<const uint8_t> packet, size_t mtu);

// ---- ICMP errors for path MTU -----------------------------------------------

inline constexpr uint8_t kIcmpv6PacketTooBig = 2;
inline constexpr uint8_t kIcmpv4DestinationUnreachable = 3;
inline constexpr uint8_t kIcmpv4FragmentationNeeded = 4;  // code

// A whole IPv6 packet: ICMPv6 Packet Too Big (RFC 4443 §3.2) from `src` to
// `dst` quoting as much of `invoking_packet` as fits in 1280 bytes.
Result<std::vector<uint8_t>> BuildIcmpv6PacketTooBig(const Ipv6Address& src, const Ipv6Address& dst,
                                                     uint32_t mtu,
                                                     std::span<const uint8_t> invoking_packet);
// A whole IPv4 packet: ICMP Destination Unreachable / Fragmentation Needed
// (RFC 792, RFC 1191 next-hop MTU) quoting the invoking IPv4 header plus 8
// bytes of its payload. The invoking packet must parse as IPv4.
Result<std::vector<uint8_t>> BuildIcmpv4FragmentationNeeded(
    const Ipv4Address& src, const Ipv4Address& dst, uint16_t next_hop_mtu,
    std::span<const uint8_t> invoking_packet);

struct IcmpMessage {
  uint8_t type = 0;
  uint8_t code = 0;
  uint32_t word = 0;              // the 32 bits after the checksum (MTU for PTB/frag-needed)
  std::span<const uint8_t> body;  // after those 8 bytes
};
// Verifies the ICMPv6 checksum with the pseudo-header built from the packet.
Result<IcmpMessage> ParseIcmpv6(const Ipv6Address& src, const Ipv6Address& dst,
                                std::span<const uint8_t> icmp);
// Verifies the ICMPv4 checksum (no pseudo-header).
Result<IcmpMessage> ParseIcmpv4(std::span<const uint8_t> icmp);
// Builds type|code|checksum|word|body with the ICMPv6 checksum filled in.
std::vector<uint8_t> BuildIcmpv6(const Ipv6Address& src, const Ipv6Address& dst, uint8_t type,
                                 uint8_t code, uint32_t word, std::span<const uint8_t> body);

}  // namespace kagemusha::tunnel

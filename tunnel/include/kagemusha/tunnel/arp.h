// ARP for IPv4 over Ethernet (RFC 826), and gratuitous ARP (RFC 5227 §3
// "ARP Announcement"), which a host sends after a guest moves so switches and
// neighbours relearn where its IPv4 address lives.
//
// Thread-safety: pure functions and plain value types.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/ip_packet.h"

namespace kagemusha::tunnel {

inline constexpr uint16_t kArpHardwareEthernet = 1;
inline constexpr uint16_t kArpOpRequest = 1;
inline constexpr uint16_t kArpOpReply = 2;
inline constexpr size_t kArpPacketSize = 28;

struct ArpPacket {
  uint16_t operation = kArpOpRequest;
  MacAddress sender_mac{};
  Ipv4Address sender_ip{};
  MacAddress target_mac{};
  Ipv4Address target_ip{};
  bool operator==(const ArpPacket&) const = default;
};

std::vector<uint8_t> EncodeArp(const ArpPacket& packet);
// Requires hardware type Ethernet, protocol IPv4, lengths 6/4 and operation
// request or reply. Bytes after the 28-byte packet (Ethernet padding) are
// ignored.
Result<ArpPacket> DecodeArp(std::span<const uint8_t> data);
// Sender and target protocol addresses equal.
bool IsGratuitous(const ArpPacket& packet);

// Broadcast frame: an ARP request (or, with `reply`, a reply) whose sender and
// target IP are both `ip`, target MAC zero for a request and `mac` for a reply.
std::vector<uint8_t> BuildGratuitousArpFrame(const MacAddress& mac, const Ipv4Address& ip,
                                             bool reply = false);

}  // namespace kagemusha::tunnel

// Mobile IPv6 Mobility Header codec (RFC 6275 §6.1-6.2) with the DSMIPv6
// options of RFC 5555 and the Mobility Message Authentication option of
// RFC 4285: the messages a mobile host and a user-space home agent exchange.
//
// Encoding lays options out in the order given, inserting Pad1/PadN so each
// option meets its xn+y alignment (measured from the start of the Mobility
// Header) and so the header is a multiple of 8 octets; Header Len and the
// checksum are filled in. Decoding checks every length against the bytes
// present, rejects known options with the wrong length, skips padding, and
// keeps unrecognised options (type and body) so a caller can see or relay
// them. Checksum verification is separate because it needs the pseudo-header
// addresses (see ip_packet.h FindUpperLayer).
//
// The whole-packet helpers at the end build and parse "IPv6 + HAO + BU" and
// "IPv6 + RH2 + BA", as a home agent or mobile host sees them on the wire.
//
// Thread-safety: pure functions and plain value types.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <variant>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/ip_packet.h"

namespace kagemusha::tunnel {

// MH Type values (RFC 6275 §6.1.2-6.1.9).
namespace mh_type {
inline constexpr uint8_t kBindingRefreshRequest = 0;
inline constexpr uint8_t kHomeTestInit = 1;
inline constexpr uint8_t kCareOfTestInit = 2;
inline constexpr uint8_t kHomeTest = 3;
inline constexpr uint8_t kCareOfTest = 4;
inline constexpr uint8_t kBindingUpdate = 5;
inline constexpr uint8_t kBindingAcknowledgement = 6;
inline constexpr uint8_t kBindingError = 7;
}  // namespace mh_type

// Mobility option types (IANA "Mobility Options").
namespace mh_option {
inline constexpr uint8_t kPad1 = 0;
inline constexpr uint8_t kPadN = 1;
inline constexpr uint8_t kBindingRefreshAdvice = 2;
inline constexpr uint8_t kAlternateCareOfAddress = 3;
inline constexpr uint8_t kNonceIndices = 4;
inline constexpr uint8_t kBindingAuthorizationData = 5;
inline constexpr uint8_t kMobilityMessageAuthentication = 9;  // RFC 4285 §5
inline constexpr uint8_t kIpv4HomeAddress = 29;               // RFC 5555 §3.1.1
inline constexpr uint8_t kIpv4AddressAcknowledgement = 30;    // RFC 5555 §3.2.1
inline constexpr uint8_t kNatDetection = 31;                  // RFC 5555 §3.2.2
inline constexpr uint8_t kIpv4CareOfAddress = 32;             // RFC 5555 §3.1.2
}  // namespace mh_option

// Binding Update flags, as bits of the 16-bit word after the sequence number.
namespace bu_flag {
inline constexpr uint16_t kAcknowledge = 0x8000;       // A
inline constexpr uint16_t kHomeRegistration = 0x4000;  // H
inline constexpr uint16_t kLinkLocal = 0x2000;         // L
inline constexpr uint16_t kKeyManagement = 0x1000;     // K
inline constexpr uint16_t kMapRegistration = 0x0800;   // M (RFC 5380)
inline constexpr uint16_t kMobileRouter = 0x0400;      // R (RFC 3963)
inline constexpr uint16_t kProxy = 0x0200;             // P (RFC 5213)
inline constexpr uint16_t kForceUdp = 0x0100;          // F (RFC 5555)
}  // namespace bu_flag

// Binding Acknowledgement flags (the byte after Status).
namespace ba_flag {
inline constexpr uint8_t kKeyManagement = 0x80;  // K
inline constexpr uint8_t kMobileRouter = 0x40;   // R (RFC 3963)
inline constexpr uint8_t kProxy = 0x20;          // P (RFC 5213)
}  // namespace ba_flag

// Binding Acknowledgement status (RFC 6275 §6.1.8, RFC 4285 §8). Values below
// 128 mean the binding was accepted.
namespace ba_status {
inline constexpr uint8_t kAccepted = 0;
inline constexpr uint8_t kAcceptedPrefixDiscoveryNecessary = 1;
inline constexpr uint8_t kReasonUnspecified = 128;
inline constexpr uint8_t kAdministrativelyProhibited = 129;
inline constexpr uint8_t kInsufficientResources = 130;
inline constexpr uint8_t kHomeRegistrationNotSupported = 131;
inline constexpr uint8_t kNotHomeSubnet = 132;
inline constexpr uint8_t kNotHomeAgentForThisMobileNode = 133;
inline constexpr uint8_t kDuplicateAddressDetectionFailed = 134;
inline constexpr uint8_t kSequenceNumberOutOfWindow = 135;
inline constexpr uint8_t kExpiredHomeNonceIndex = 136;
inline constexpr uint8_t kExpiredCareOfNonceIndex = 137;
inline constexpr uint8_t kExpiredNonces = 138;
inline constexpr uint8_t kRegistrationTypeChangeDisallowed = 139;
inline constexpr uint8_t kIdMismatch = 144;            // MIPV6-ID-MISMATCH
inline constexpr uint8_t kMessageIdRequired = 145;     // MIPV6-MESG-ID-REQD
inline constexpr uint8_t kAuthenticationFailed = 146;  // MIPV6-AUTH-FAIL
}  // namespace ba_status

// Binding Error status (RFC 6275 §6.1.9).
namespace be_status {
inline constexpr uint8_t kUnknownBindingForHomeAddressOption = 1;
inline constexpr uint8_t kUnrecognizedMhType = 2;
}  // namespace be_status

// IPv4 Address Acknowledgement status (RFC 5555 §3.2.1).
namespace ipv4_ack_status {
inline constexpr uint8_t kSuccess = 0;
inline constexpr uint8_t kFailureReasonUnspecified = 128;
inline constexpr uint8_t kAdministrativelyProhibited = 129;
inline constexpr uint8_t kIncorrectIpv4HomeAddress = 130;
inline constexpr uint8_t kInvalidIpv4Address = 131;
inline constexpr uint8_t kDynamicIpv4HomeAddressNotAvailable = 132;
}  // namespace ipv4_ack_status

// Mobility Message Authentication subtypes (RFC 4285 §5).
namespace mh_auth_subtype {
inline constexpr uint8_t kMnHa = 1;
inline constexpr uint8_t kMnAaa = 2;
}  // namespace mh_auth_subtype

// ---- Options ------------------------------------------------------------------

struct BindingRefreshAdvice {     // alignment 2n, length 2
  uint16_t refresh_interval = 0;  // 4-second units
  bool operator==(const BindingRefreshAdvice&) const = default;
};
struct AlternateCareOfAddress {  // alignment 8n+6, length 16
  Ipv6Address address{};
  bool operator==(const AlternateCareOfAddress&) const = default;
};
struct NonceIndices {  // alignment 2n, length 4
  uint16_t home_nonce_index = 0;
  uint16_t care_of_nonce_index = 0;
  bool operator==(const NonceIndices&) const = default;
};
struct BindingAuthorizationData {  // alignment 8n+2, any length
  std::vector<uint8_t> authenticator;
  bool operator==(const BindingAuthorizationData&) const = default;
};
struct Ipv4HomeAddress {               // RFC 5555: alignment 4n, length 6
  uint8_t prefix_length = 0;           // 6 bits
  bool mobile_network_prefix = false;  // P flag
  Ipv4Address address{};
  bool operator==(const Ipv4HomeAddress&) const = default;
};
struct Ipv4AddressAcknowledgement {  // RFC 5555: alignment 4n, length 6
  uint8_t status = ipv4_ack_status::kSuccess;
  uint8_t prefix_length = 0;  // 6 bits
  Ipv4Address address{};
  bool operator==(const Ipv4AddressAcknowledgement&) const = default;
};
struct Ipv4CareOfAddress {  // RFC 5555: alignment 4n, length 6
  Ipv4Address address{};
  bool operator==(const Ipv4CareOfAddress&) const = default;
};
// RFC 4285: alignment 4n+1, length 5 + authenticator; MUST be the last option.
struct MobilityMessageAuthentication {
  uint8_t subtype = mh_auth_subtype::kMnHa;
  uint32_t spi = 0;
  std::vector<uint8_t> authenticator;
  bool operator==(const MobilityMessageAuthentication&) const = default;
};
// Any option this codec does not interpret (NAT Detection, MN-ID, ...):
// kept verbatim, re-emitted without alignment padding.
struct UnknownMobilityOption {
  uint8_t type = 0;
  std::vector<uint8_t> data;
  bool operator==(const UnknownMobilityOption&) const = default;
};

using MobilityOption =
    std::variant<BindingRefreshAdvice, AlternateCareOfAddress, NonceIndices,
                 BindingAuthorizationData, Ipv4HomeAddress, Ipv4AddressAcknowledgement,
                 Ipv4CareOfAddress, MobilityMessageAuthentication, UnknownMobilityOption>;
using MobilityOptions = std::vector<MobilityOption>;

// ---- Messages -----------------------------------------------------------------

struct BindingRefreshRequest {  // MH type 0
  MobilityOptions options;
  bool operator==(const BindingRefreshRequest&) const = default;
};
struct BindingUpdate {  // MH type 5
  uint16_t sequence = 0;
  uint16_t flags = 0;     // bu_flag bits; the reserved low bits are sent as given
  uint16_t lifetime = 0;  // 4-second units
  MobilityOptions options;
  bool operator==(const BindingUpdate&) const = default;
};
struct BindingAcknowledgement {  // MH type 6
  uint8_t status = ba_status::kAccepted;
  uint8_t flags = 0;  // ba_flag bits
  uint16_t sequence = 0;
  uint16_t lifetime = 0;  // 4-second units
  MobilityOptions options;
  bool operator==(const BindingAcknowledgement&) const = default;
};
struct BindingError {  // MH type 7
  uint8_t status = be_status::kUnknownBindingForHomeAddressOption;
  Ipv6Address home_address{};
  MobilityOptions options;
  bool operator==(const BindingError&) const = default;
};
// A well-formed Mobility Header of a type this codec does not handle (e.g.
// HoTI). A home agent answers it with a Binding Error, status 2.
struct UnrecognizedMobilityMessage {
  uint8_t mh_type = 0;
  std::vector<uint8_t> data;  // message data after the checksum
  bool operator==(const UnrecognizedMobilityMessage&) const = default;
};

using MobilityMessage = std::variant<BindingRefreshRequest, BindingUpdate, BindingAcknowledgement,
                                     BindingError, UnrecognizedMobilityMessage>;

struct MobilityHeader {
  uint8_t payload_proto = ipproto::kNoNextHeader;
  uint16_t checksum = 0;  // as found on the wire
  MobilityMessage message;
};

// Pseudo-header addresses for the MH checksum: the home address as source when
// a Home Address option is present, the final destination (the home address
// in a type 2 routing header) as destination.
struct ChecksumAddresses {
  Ipv6Address src{};
  Ipv6Address dst{};
};

// Encodes a Mobility Header. With `addresses` the checksum is computed;
// without, it is left zero (the form RFC 4285 authenticates). Fails on an
// UnrecognizedMobilityMessage whose data is not 8n+2 bytes, on an option body
// longer than 255 bytes, on a header longer than 2048 bytes, and when a
// Mobility Message Authentication option is not last.
Result<std::vector<uint8_t>> EncodeMobilityHeader(const MobilityMessage& message,
                                                  std::optional<ChecksumAddresses> addresses);

// Decodes `mh`, which must be exactly the Mobility Header (8 * (Header Len +
// 1) bytes). Does not check the checksum.
Result<MobilityHeader> DecodeMobilityHeader(std::span<const uint8_t> mh);

// Recomputes the checksum over `mh` as found (checksum field included); true
// when it sums to zero.
bool VerifyMobilityHeaderChecksum(std::span<const uint8_t> mh, const ChecksumAddresses& addresses);
// The checksum value `mh` should carry (its checksum field is treated as zero).
uint16_t ComputeMobilityHeaderChecksum(std::span<const uint8_t> mh,
                                       const ChecksumAddresses& addresses);

// Offsets inside an encoded MH of its last option when that option is a
// Mobility Message Authentication option: the RFC 4285 "MH Data" is
// mh[0, authenticator_offset) with the checksum taken as zero, and the
// authenticator occupies [authenticator_offset, +authenticator_length).
struct AuthenticatorLocation {
  size_t authenticator_offset = 0;
  size_t authenticator_length = 0;
  uint32_t spi = 0;
  uint8_t subtype = 0;
};
Result<AuthenticatorLocation> LocateAuthenticator(std::span<const uint8_t> mh);

// ---- Whole packets ------------------------------------------------------------

// IPv6(src=care-of, dst=home agent) + Destination Options(HAO=home address)
// + MH(BU) with the checksum over the home address.
Result<std::vector<uint8_t>> BuildBindingUpdatePacket(const Ipv6Address& care_of,
                                                      const Ipv6Address& home_agent,
                                                      const Ipv6Address& home_address,
                                                      const BindingUpdate& bu);
// IPv6(src=home agent, dst=care-of) + type 2 routing header(home address,
// segments left 1) + MH(BA) with the checksum over the home address.
Result<std::vector<uint8_t>> BuildBindingAcknowledgementPacket(const Ipv6Address& home_agent,
                                                               const Ipv6Address& care_of,
                                                               const Ipv6Address& home_address,
                                                               const BindingAcknowledgement& ba);
// As above, with an already encoded MH (e.g. one carrying an authenticator).
Result<std::vector<uint8_t>> BuildMobilityPacket(const Ipv6Address& src, const Ipv6Address& dst,
                                                 std::optional<Ipv6Address> home_address_option,
                                                 std::optional<Ipv6Address> routing_home_address,
                                                 std::span<const uint8_t> mh);

struct MobilityPacket {
  Ipv6UpperLayer ip;            // header, HAO, RH2, pseudo-header addresses
  std::span<const uint8_t> mh;  // the encoded Mobility Header
  MobilityHeader header;
};
// Parses an IPv6 packet whose upper layer is a Mobility Header and verifies
// the checksum with the right pseudo-header. RFC 6275 §6.1 allows an HAO only
// on a BU and an RH2 only on a BA; an MH carrying either on another message
// is rejected. (A BU without an HAO, e.g. sent from home, is accepted.)
Result<MobilityPacket> ParseMobilityPacket(std::span<const uint8_t> ipv6_packet);
// The same from an Ethernet frame (VLAN tags skipped), as captured with
// AF_PACKET.
Result<MobilityPacket> ParseMobilityFrame(std::span<const uint8_t> frame);

}  // namespace kagemusha::tunnel

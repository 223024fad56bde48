// MN-HA Mobility Message Authentication (RFC 4285 §5): computes and checks the
// authenticator carried in the Mobility Message Authentication option.
//
//   Authenticator = First(N, HMAC(key, Mobility Data))
//   Mobility Data = care-of address | home address | MH Data
//
// where MH Data is the Mobility Header from its first octet up to and
// including the option's SPI field, with the MH checksum taken as zero. The MH
// checksum is computed after the authenticator is in place.
//
// RFC 4285 specifies HMAC-SHA1 truncated to 96 bits; Kagemusha's own home
// agent and mobile host default to HMAC-SHA256 truncated to 128 bits (both
// ends are ours; the SPI selects the key). Both are offered.
//
// This file uses OpenSSL and is therefore not part of the pure fuzz build.
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/mobility_header.h"

namespace kagemusha::tunnel {

enum class MhAuthAlgorithm { kHmacSha1_96, kHmacSha256_128 };

size_t AuthenticatorLength(MhAuthAlgorithm algorithm);

struct MhAuthParams {
  uint32_t spi = 0;
  std::span<const uint8_t> key;
  Ipv6Address care_of{};
  Ipv6Address home_address{};
  MhAuthAlgorithm algorithm = MhAuthAlgorithm::kHmacSha256_128;
};

// Encodes `message` with an MN-HA Mobility Message Authentication option
// appended as its last option, fills in the authenticator, then the checksum
// over `addresses`. `message` must not already carry that option.
Result<std::vector<uint8_t>> EncodeAuthenticatedMobilityHeader(const MobilityMessage& message,
                                                               const MhAuthParams& params,
                                                               const ChecksumAddresses& addresses);

// Checks the authenticator of an encoded MH (its last option must be the
// authentication option, with the SPI in `params` and the algorithm's length).
// Returns Permission on a mismatch, Protocol on a malformed header.
Status VerifyMobilityMessageAuthentication(std::span<const uint8_t> mh, const MhAuthParams& params);

}  // namespace kagemusha::tunnel

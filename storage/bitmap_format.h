// On-disk format of the copy-on-read block bitmap (docs/bitmap-format.md):
// pure encode/decode of the header and the bit addressing rule. No I/O, no
// logging, so it builds in the libFuzzer tree too.
//
// Layout (all integers big-endian):
//   0  magic        8 bytes  "KGMSBMAP"
//   8  version      u32      1
//  12  header_size  u32      offset of the bit array (4096 in version 1)
//  16  image_size   u64      bytes of the image the bitmap describes
//  24  block_size   u32      bytes per bit; power of two, 4096..2^30
//  28  flags        u32      0 in version 1; unknown bits are refused
//  32  block_count  u64      ceil(image_size / block_size), cross-check
//  40  header_crc   u32      CRC-32C of bytes [0, 40)
//  44  zero padding up to header_size
//  header_size: bit array, ceil(block_count / 8) bytes; block n is byte n/8,
//               bit n%8 (least significant bit first); 1 = present in cache.
//
// Thread-safety: pure functions.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>

#include "kagemusha/common/error.h"

namespace kagemusha::storage::bitmap {

inline constexpr std::array<uint8_t, 8> kMagic = {'K', 'G', 'M', 'S', 'B', 'M', 'A', 'P'};
inline constexpr uint32_t kVersion = 1;
inline constexpr uint32_t kHeaderSize = 4096;    // version 1 always writes this
inline constexpr size_t kHeaderFieldsSize = 44;  // bytes with meaning; the rest is padding
inline constexpr size_t kCrcOffset = 40;
inline constexpr uint32_t kMinBlockSize = 4096;
inline constexpr uint32_t kMaxBlockSize = 1u << 30;

struct Header {
  uint32_t version = kVersion;
  uint32_t header_size = kHeaderSize;
  uint64_t image_size = 0;
  uint32_t block_size = 0;
  uint32_t flags = 0;
  uint64_t block_count = 0;
  bool operator==(const Header&) const = default;
};

// A version-1 header for an image, with block_count filled in.
Header MakeHeader(uint64_t image_size, uint32_t block_size);

uint64_t BlockCount(uint64_t image_size, uint32_t block_size);
inline uint64_t BitArrayBytes(uint64_t block_count) { return (block_count + 7) / 8; }

// Encodes the full header_size bytes (fields, CRC, zero padding).
std::array<uint8_t, kHeaderSize> EncodeHeader(const Header& h);

// Decodes and validates a header: magic, version, CRC, header size, block
// size, flags and block count. `data` may be longer than the header.
// Errors are EINVAL (corrupt or not a bitmap) or ENOTSUP (newer version),
// with a message saying what to do.
Result<Header> DecodeHeader(std::span<const uint8_t> data);

// Checks a decoded header against the image it is being opened for.
Status CheckMatchesImage(const Header& h, uint64_t image_size, uint32_t block_size);

// The bit addressing rule, shared by the reader and writer.
inline uint64_t ByteOfBlock(uint64_t block) { return block / 8; }
inline uint8_t MaskOfBlock(uint64_t block) { return uint8_t(1u << (block % 8)); }

}  // namespace kagemusha::storage::bitmap

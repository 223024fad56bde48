#include "bitmap_format.h"

#include <algorithm>
#include <cstdio>

#include "kagemusha/common/coding.h"

namespace kagemusha::storage::bitmap {
namespace {

constexpr char kStartOver[] =
    " To start over, stop the proxy and delete both the cache image and the bitmap file"
    " (everything will be fetched again from the remote).";

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

uint64_t BlockCount(uint64_t image_size, uint32_t block_size) {
  return block_size == 0 ? 0 : (image_size + block_size - 1) / block_size;
}

Header MakeHeader(uint64_t image_size, uint32_t block_size) {
  Header h;
  h.image_size = image_size;
  h.block_size = block_size;
  h.block_count = BlockCount(image_size, block_size);
  return h;
}

std::array<uint8_t, kHeaderSize> EncodeHeader(const Header& h) {
  std::array<uint8_t, kHeaderSize> out{};
  std::copy(kMagic.begin(), kMagic.end(), out.begin());
  StoreBe32(&out[8], h.version);
  StoreBe32(&out[12], h.header_size);
  StoreBe64(&out[16], h.image_size);
  StoreBe32(&out[24], h.block_size);
  StoreBe32(&out[28], h.flags);
  StoreBe64(&out[32], h.block_count);
  StoreBe32(&out[kCrcOffset], Crc32c(std::span<const uint8_t>(out.data(), kCrcOffset)));
  return out;
}

Result<Header> DecodeHeader(std::span<const uint8_t> data) {
  if (data.size() < kHeaderFieldsSize)
    return Fail(Error::Invalid("bitmap file is truncated (" + std::to_string(data.size()) +
                               " bytes, the header alone needs " +
                               std::to_string(kHeaderFieldsSize) + ")." + kStartOver));
  if (!std::equal(kMagic.begin(), kMagic.end(), data.begin()))
    return Fail(Error::Invalid(
        "not a kagemusha bitmap file (bad magic); check the --bitmap path points at the bitmap "
        "and not at an image."));
  Header h;
  h.version = LoadBe32(&data[8]);
  if (h.version != kVersion)
    return Fail(Error::NotSupported("bitmap file has format version " + std::to_string(h.version) +
                                    ", this build reads version " + std::to_string(kVersion) +
                                    "; use a matching kagemusha-nbd." + kStartOver));
  uint32_t stored_crc = LoadBe32(&data[kCrcOffset]);
  uint32_t crc = Crc32c(data.first(kCrcOffset));
  if (stored_crc != crc)
    return Fail(Error::Invalid("bitmap header checksum mismatch (file corrupt)." +
                               std::string(kStartOver)));
  h.header_size = LoadBe32(&data[12]);
  h.image_size = LoadBe64(&data[16]);
  h.block_size = LoadBe32(&data[24]);
  h.flags = LoadBe32(&data[28]);
  h.block_count = LoadBe64(&data[32]);
  if (h.header_size != kHeaderSize)
    return Fail(Error::Invalid("bitmap header size " + std::to_string(h.header_size) + " is not " +
                               std::to_string(kHeaderSize) + "." + kStartOver));
  if (!IsPowerOfTwo(h.block_size) || h.block_size < kMinBlockSize || h.block_size > kMaxBlockSize)
    return Fail(Error::Invalid("bitmap block size " + std::to_string(h.block_size) +
                               " is not a power of two between 4096 and 2^30." + kStartOver));
  if (h.flags != 0)
    return Fail(Error::NotSupported("bitmap has unknown flags 0x" +
                                    [&] {
                                      char b[16];
                                      std::snprintf(b, sizeof b, "%x", h.flags);
                                      return std::string(b);
                                    }() +
                                    " (written by a newer version?)." + kStartOver));
  if (h.block_count != BlockCount(h.image_size, h.block_size))
    return Fail(Error::Invalid("bitmap block count " + std::to_string(h.block_count) +
                               " does not match image size / block size." + kStartOver));
  return h;
}

Status CheckMatchesImage(const Header& h, uint64_t image_size, uint32_t block_size) {
  if (h.image_size != image_size)
    return Fail(Error::Invalid("bitmap describes an image of " + std::to_string(h.image_size) +
                               " bytes but the remote export has " + std::to_string(image_size) +
                               " bytes: the cache belongs to another image." + kStartOver));
  if (h.block_size != block_size)
    return Fail(Error::Invalid("bitmap uses block size " + std::to_string(h.block_size) + " but " +
                               std::to_string(block_size) + " was requested; pass --block-size " +
                               std::to_string(h.block_size) + " to reuse this cache." +
                               kStartOver));
  return Ok();
}

}  // namespace kagemusha::storage::bitmap

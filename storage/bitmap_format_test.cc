#include "bitmap_format.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "kagemusha/common/coding.h"

namespace kagemusha::storage::bitmap {
namespace {

std::array<uint8_t, kHeaderSize> Valid() { return EncodeHeader(MakeHeader(10ull << 30, 65536)); }

void Reseal(std::array<uint8_t, kHeaderSize>& h) {  // recompute the CRC after an edit
  StoreBe32(&h[kCrcOffset], Crc32c(std::span<const uint8_t>(h.data(), kCrcOffset)));
}

TEST(BitmapFormat, HeaderRoundTrips) {
  Header h = MakeHeader((10ull << 30) + 12345, 65536);
  EXPECT_EQ(h.block_count, ((10ull << 30) + 12345 + 65535) / 65536);
  auto bytes = EncodeHeader(h);
  auto back = DecodeHeader(bytes);
  ASSERT_TRUE(back.has_value()) << back.error().message();
  EXPECT_EQ(*back, h);
}

TEST(BitmapFormat, LayoutIsBigEndianAtDocumentedOffsets) {
  Header h = MakeHeader(0x0102030405060000ull, 0x10000);
  auto b = EncodeHeader(h);
  EXPECT_EQ(std::string(b.begin(), b.begin() + 8), "KGMSBMAP");
  EXPECT_EQ(LoadBe32(&b[8]), 1u);
  EXPECT_EQ(LoadBe32(&b[12]), 4096u);
  EXPECT_EQ(b[16], 0x01);
  EXPECT_EQ(b[21], 0x06);
  EXPECT_EQ(LoadBe32(&b[24]), 0x10000u);
  EXPECT_EQ(LoadBe32(&b[28]), 0u);
  EXPECT_EQ(LoadBe64(&b[32]), 0x0102030405060000ull / 0x10000);
  EXPECT_EQ(LoadBe32(&b[40]), Crc32c(std::span<const uint8_t>(b.data(), 40)));
  for (size_t i = kHeaderFieldsSize; i < kHeaderSize; ++i) ASSERT_EQ(b[i], 0) << i;
}

TEST(BitmapFormat, BitAddressingIsLsbFirstWithinBytes) {
  EXPECT_EQ(ByteOfBlock(0), 0u);
  EXPECT_EQ(MaskOfBlock(0), 0x01);
  EXPECT_EQ(ByteOfBlock(7), 0u);
  EXPECT_EQ(MaskOfBlock(7), 0x80);
  EXPECT_EQ(ByteOfBlock(8), 1u);
  EXPECT_EQ(MaskOfBlock(8), 0x01);
  EXPECT_EQ(ByteOfBlock(8 * 1000 + 3), 1000u);
  EXPECT_EQ(MaskOfBlock(8 * 1000 + 3), 0x08);
  EXPECT_EQ(BitArrayBytes(0), 0u);
  EXPECT_EQ(BitArrayBytes(1), 1u);
  EXPECT_EQ(BitArrayBytes(8), 1u);
  EXPECT_EQ(BitArrayBytes(9), 2u);
}

struct MalformedCase {
  std::string name;
  std::function<void(std::array<uint8_t, kHeaderSize>&)> mutate;
  size_t keep;  // bytes of the header handed to the decoder
  int code;
  std::string message_part;
};

TEST(BitmapFormat, RejectsMalformedHeaders) {
  const std::vector<MalformedCase> cases = {
      {"empty", [](auto&) {}, 0, EINVAL, "truncated"},
      {"truncated before crc", [](auto&) {}, 43, EINVAL, "truncated"},
      {"bad magic", [](auto& h) { h[0] = 'X'; }, kHeaderSize, EINVAL, "bad magic"},
      {"image file instead of bitmap", [](auto& h) { std::fill(h.begin(), h.begin() + 44, 0); },
       kHeaderSize, EINVAL, "bad magic"},
      {"newer version",
       [](auto& h) {
         StoreBe32(&h[8], 2);
         Reseal(h);
       },
       kHeaderSize, ENOTSUP, "version 2"},
      {"version zero",
       [](auto& h) {
         StoreBe32(&h[8], 0);
         Reseal(h);
       },
       kHeaderSize, ENOTSUP, "version 0"},
      {"flipped bit in image size", [](auto& h) { h[20] ^= 0x10; }, kHeaderSize, EINVAL,
       "checksum"},
      {"flipped crc", [](auto& h) { h[kCrcOffset] ^= 1; }, kHeaderSize, EINVAL, "checksum"},
      {"header size changed",
       [](auto& h) {
         StoreBe32(&h[12], 512);
         Reseal(h);
       },
       kHeaderSize, EINVAL, "header size"},
      {"block size not a power of two",
       [](auto& h) {
         StoreBe32(&h[24], 65537);
         Reseal(h);
       },
       kHeaderSize, EINVAL, "block size"},
      {"block size too small",
       [](auto& h) {
         StoreBe32(&h[24], 512);
         Reseal(h);
       },
       kHeaderSize, EINVAL, "block size"},
      {"block size zero",
       [](auto& h) {
         StoreBe32(&h[24], 0);
         Reseal(h);
       },
       kHeaderSize, EINVAL, "block size"},
      {"unknown flags",
       [](auto& h) {
         StoreBe32(&h[28], 4);
         Reseal(h);
       },
       kHeaderSize, ENOTSUP, "flags 0x4"},
      {"block count disagrees",
       [](auto& h) {
         StoreBe64(&h[32], 5);
         Reseal(h);
       },
       kHeaderSize, EINVAL, "block count"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto h = Valid();
    c.mutate(h);
    std::span<const uint8_t> data(h);
    data = data.first(c.keep);
    auto r = DecodeHeader(data);
    ASSERT_FALSE(r.has_value());
    EXPECT_EQ(r.error().code(), c.code) << r.error().message();
    EXPECT_NE(r.error().message().find(c.message_part), std::string::npos) << r.error().message();
  }
}

TEST(BitmapFormat, CorruptHeaderErrorsTellTheOperatorHowToStartOver) {
  auto h = Valid();
  h[kCrcOffset] ^= 1;
  auto r = DecodeHeader(h);
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message().find("delete both the cache image and the bitmap"),
            std::string::npos);
}

TEST(BitmapFormat, GeometryMismatchWithTheImageIsExplained) {
  Header h = MakeHeader(1 << 30, 65536);
  EXPECT_TRUE(CheckMatchesImage(h, 1 << 30, 65536));
  auto size = CheckMatchesImage(h, 2u << 30, 65536);
  ASSERT_FALSE(size);
  EXPECT_NE(size.error().message().find("another image"), std::string::npos);
  auto bs = CheckMatchesImage(h, 1 << 30, 4096);
  ASSERT_FALSE(bs);
  EXPECT_NE(bs.error().message().find("--block-size 65536"), std::string::npos);
}

TEST(BitmapFormat, ZeroSizedImageHasNoBlocks) {
  auto back = DecodeHeader(EncodeHeader(MakeHeader(0, 4096)));
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->block_count, 0u);
}

}  // namespace
}  // namespace kagemusha::storage::bitmap

#include "kagemusha/common/coding.h"

#include <gtest/gtest.h>

namespace kagemusha {
namespace {

TEST(Coding, BigEndianRoundTrip) {
  uint8_t b[8];
  StoreBe64(b, 0x0102030405060708ULL);
  EXPECT_EQ(b[0], 1);
  EXPECT_EQ(b[7], 8);
  EXPECT_EQ(LoadBe64(b), 0x0102030405060708ULL);
  StoreBe16(b, 0xBEEF);
  EXPECT_EQ(LoadBe16(b), 0xBEEF);
}

TEST(ByteReader, RefusesToReadPastTheEnd) {
  const uint8_t data[5] = {0, 0, 0, 7, 9};
  ByteReader r(data);
  EXPECT_EQ(r.U32(), 7u);
  EXPECT_EQ(r.U32(), std::nullopt);
  EXPECT_EQ(r.U8(), 9);
  EXPECT_EQ(r.U8(), std::nullopt);
  EXPECT_TRUE(r.empty());
}

TEST(ByteWriter, PatchesEarlierFields) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.U16(0);
  w.Str("ab");
  w.PatchU16(0, 2);
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(LoadBe16(out.data()), 2);
}

TEST(Crc32c, MatchesKnownVector) {
  // RFC 3720 B.4: CRC32C of "123456789" is 0xE3069283.
  const std::string s = "123456789";
  EXPECT_EQ(Crc32c({reinterpret_cast<const uint8_t*>(s.data()), s.size()}), 0xE3069283u);
}

}  // namespace
}  // namespace kagemusha

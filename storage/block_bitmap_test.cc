#include "block_bitmap.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <thread>

#include "test_util.h"

namespace kagemusha::storage {
namespace {

using testing::ReadFileBytes;
using testing::ScratchDir;
using testing::WriteFileBytes;

TEST(AtomicBitset, FindsClearBitsAndRangesAcrossWords) {
  AtomicBitset b(200);
  EXPECT_EQ(b.FindClear(0), 0u);
  for (uint64_t i = 0; i < 130; ++i) b.Set(i);
  EXPECT_EQ(b.FindClear(0), 130u);
  EXPECT_EQ(b.FindClear(150), 150u);
  EXPECT_TRUE(b.AllSet(0, 130));
  EXPECT_TRUE(b.AllSet(63, 65));
  EXPECT_FALSE(b.AllSet(0, 131));
  EXPECT_TRUE(b.AllSet(5, 5));
  EXPECT_EQ(b.Count(), 130u);
  for (uint64_t i = 130; i < 200; ++i) b.Set(i);
  EXPECT_EQ(b.FindClear(0), 200u);  // none clear: size()
  EXPECT_EQ(b.Count(), 200u);
  EXPECT_FALSE(b.Set(3));  // already set
}

TEST(AtomicBitset, ConcurrentSettersCountEachBitOnce) {
  AtomicBitset b(4096);
  std::atomic<uint64_t> firsts{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&] {
      for (uint64_t i = 0; i < 4096; ++i)
        if (b.Set(i)) ++firsts;
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(firsts.load(), 4096u);
  EXPECT_EQ(b.Count(), 4096u);
}

TEST(BlockBitmap, CreatesAnEmptyBitmapAndPersistsBitsAcrossReopen) {
  ScratchDir dir;
  const uint64_t image = 100 * 65536 + 5;  // last block partial: 101 blocks
  {
    auto bm = BlockBitmap::Open(dir / "bm", image, 65536);
    ASSERT_TRUE(bm.has_value()) << bm.error().message();
    EXPECT_TRUE((*bm)->created());
    EXPECT_EQ((*bm)->blocks(), 101u);
    EXPECT_EQ((*bm)->Count(), 0u);
    std::vector<uint64_t> set = {0, 7, 8, 63, 64, 100};
    ASSERT_TRUE((*bm)->SetAndWrite(set));
    EXPECT_EQ((*bm)->Count(), 6u);
    ASSERT_TRUE((*bm)->Sync());
  }
  // The raw file follows the documented layout: header then LSB-first bits.
  auto raw = ReadFileBytes(dir / "bm");
  ASSERT_EQ(raw.size(), 4096u + 13u);
  EXPECT_EQ(raw[4096 + 0], std::byte{0x81});   // blocks 0 and 7
  EXPECT_EQ(raw[4096 + 1], std::byte{0x01});   // block 8
  EXPECT_EQ(raw[4096 + 7], std::byte{0x80});   // block 63
  EXPECT_EQ(raw[4096 + 8], std::byte{0x01});   // block 64
  EXPECT_EQ(raw[4096 + 12], std::byte{0x10});  // block 100
  auto bm = BlockBitmap::Open(dir / "bm", image, 65536);
  ASSERT_TRUE(bm.has_value());
  EXPECT_FALSE((*bm)->created());
  EXPECT_EQ((*bm)->Count(), 6u);
  for (uint64_t b = 0; b < 101; ++b)
    EXPECT_EQ((*bm)->Test(b), b == 0 || b == 7 || b == 8 || b == 63 || b == 64 || b == 100) << b;
}

TEST(BlockBitmap, ReopenWithDifferentGeometryFailsWithInstructions) {
  ScratchDir dir;
  ASSERT_TRUE(BlockBitmap::Open(dir / "bm", 1 << 20, 65536).has_value());
  auto size = BlockBitmap::Open(dir / "bm", 2 << 20, 65536);
  ASSERT_FALSE(size.has_value());
  EXPECT_EQ(size.error().code(), EINVAL);
  EXPECT_NE(size.error().message().find("delete both"), std::string::npos);
  auto bs = BlockBitmap::Open(dir / "bm", 1 << 20, 4096);
  ASSERT_FALSE(bs.has_value());
  EXPECT_NE(bs.error().message().find("--block-size"), std::string::npos);
}

TEST(BlockBitmap, TruncatedBitArrayIsRejected) {
  ScratchDir dir;
  ASSERT_TRUE(BlockBitmap::Open(dir / "bm", 64ull << 20, 4096).has_value());
  ASSERT_EQ(::truncate((dir / "bm").c_str(), 4096 + 100), 0);
  auto bm = BlockBitmap::Open(dir / "bm", 64ull << 20, 4096);
  ASSERT_FALSE(bm.has_value());
  EXPECT_NE(bm.error().message().find("truncated"), std::string::npos);
}

TEST(BlockBitmap, CorruptHeaderOnDiskIsRejected) {
  ScratchDir dir;
  ASSERT_TRUE(BlockBitmap::Open(dir / "bm", 1 << 20, 65536).has_value());
  auto raw = ReadFileBytes(dir / "bm");
  raw[17] ^= std::byte{0x40};
  WriteFileBytes(dir / "bm", raw);
  auto bm = BlockBitmap::Open(dir / "bm", 1 << 20, 65536);
  ASSERT_FALSE(bm.has_value());
  EXPECT_NE(bm.error().message().find("checksum"), std::string::npos);
  EXPECT_NE(bm.error().message().find(dir / "bm"), std::string::npos);
}

TEST(BlockBitmap, ReadHeaderReportsGeometry) {
  ScratchDir dir;
  ASSERT_TRUE(BlockBitmap::Open(dir / "bm", 3 << 20, 8192).has_value());
  auto h = BlockBitmap::ReadHeader(dir / "bm");
  ASSERT_TRUE(h.has_value());
  EXPECT_EQ(h->image_size, 3u << 20);
  EXPECT_EQ(h->block_size, 8192u);
}

}  // namespace
}  // namespace kagemusha::storage

#include "kagemusha/memcache/page_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>
#include <vector>

#include "kagemusha/common/coding.h"
#include "page_store_format.h"

namespace kagemusha::memcache {
namespace {

namespace fs = std::filesystem;
namespace fmt = store_format;
using Bytes = std::vector<uint8_t>;

Bytes MakePage(uint32_t seed) {
  Bytes p(kStorePageSize);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& b : p) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = uint8_t(x);
  }
  return p;
}

class PageStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kgm-pagestore-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    opt_.dir = root_ + "/store";
    opt_.fsync = false;  // durability is not what these tests measure
  }
  void TearDown() override { fs::remove_all(root_); }

  std::unique_ptr<PageStore> OpenStore() {
    auto s = PageStore::Open(opt_);
    EXPECT_TRUE(s.has_value()) << s.error().message();
    return s ? std::move(*s) : nullptr;
  }
  std::vector<fs::path> Segments() const {
    std::vector<fs::path> v;
    for (auto& e : fs::directory_iterator(opt_.dir + "/segments")) v.push_back(e.path());
    std::sort(v.begin(), v.end());
    return v;
  }
  static bool Has(PageStore& s, const PageDigest& d, const Bytes& expect) {
    Bytes out(kStorePageSize);
    auto r = s.Get(d, out);
    EXPECT_TRUE(r.has_value());
    if (!r || !*r) return false;
    EXPECT_EQ(out, expect);
    return out == expect;
  }

  std::string root_;
  PageStoreOptions opt_;
};

TEST(PageHasherTest, ComputesSha256OfThePage) {
  auto h = PageHasher::Create();
  ASSERT_TRUE(h.has_value());
  Bytes zero(kStorePageSize, 0);
  // sha256 of 4096 zero bytes (computed with `head -c 4096 /dev/zero | sha256sum`).
  EXPECT_EQ(h->Hash(zero).Hex(),
            "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7");
}

TEST(PageHasherTest, HashManyMatchesOpenSslForEveryCount) {
  auto h = PageHasher::Create();
  ASSERT_TRUE(h.has_value());
  for (size_t n = 0; n <= 5; ++n) {
    Bytes pages;
    for (size_t i = 0; i < n; ++i) {
      Bytes p = i == 2 ? Bytes(kStorePageSize, 0) : MakePage(uint32_t(1000 + i));
      pages.insert(pages.end(), p.begin(), p.end());
    }
    std::vector<PageDigest> many(n);
    h->HashMany(pages, many);
    for (size_t i = 0; i < n; ++i)
      EXPECT_EQ(many[i], h->Hash({pages.data() + i * kStorePageSize, kStorePageSize}))
          << "n=" << n << " i=" << i << " sha-ni=" << PageHasher::HasShaExtensions();
  }
}

TEST(PageCrc32cTest, HardwarePathMatchesTheCommonTableImplementation) {
  for (size_t n : {0u, 1u, 7u, 8u, 9u, 4096u, 4128u}) {
    Bytes b = MakePage(uint32_t(n));
    b.resize(n);
    EXPECT_EQ(PageCrc32c(b), Crc32c(b)) << n;
  }
}

TEST_F(PageStoreTest, PutThenGetReturnsThePageAndDedups) {
  auto s = OpenStore();
  Bytes a = MakePage(1), b = MakePage(2);
  auto da = s->Put(a), db = s->Put(b), da2 = s->Put(a);
  ASSERT_TRUE(da && db && da2);
  EXPECT_EQ(*da, *da2);
  EXPECT_NE(*da, *db);
  EXPECT_TRUE(Has(*s, *da, a));
  EXPECT_TRUE(Has(*s, *db, b));
  auto st = s->stats();
  EXPECT_EQ(st.pages, 2u);
  EXPECT_EQ(st.dedup_hits, 1u);
  PageDigest unknown;
  unknown.bytes[0] = 1;
  Bytes out(kStorePageSize);
  auto r = s->Get(unknown, out);
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(*r);
  EXPECT_FALSE(s->Put(Bytes(100)).has_value());
}

TEST_F(PageStoreTest, PutManyStoresEachPageOnceWithTheSameDigestsAsPut) {
  auto s = OpenStore();
  Bytes pages;
  for (uint32_t i : {1u, 2u, 3u, 2u, 5u}) {
    Bytes p = MakePage(i);
    pages.insert(pages.end(), p.begin(), p.end());
  }
  auto ds = s->PutMany(pages);
  ASSERT_TRUE(ds.has_value()) << ds.error().message();
  ASSERT_EQ(ds->size(), 5u);
  EXPECT_EQ((*ds)[1], (*ds)[3]);
  for (size_t i = 0; i < 5; ++i) {
    Bytes p(pages.begin() + long(i * kStorePageSize),
            pages.begin() + long((i + 1) * kStorePageSize));
    EXPECT_EQ(*s->Put(p), (*ds)[i]);
    EXPECT_TRUE(Has(*s, (*ds)[i], p));
  }
  auto st = s->stats();
  EXPECT_EQ(st.pages, 4u);
  EXPECT_EQ(st.dedup_hits, 1u + 5u);
  EXPECT_FALSE(s->PutMany(Bytes(100)).has_value());
}

TEST_F(PageStoreTest, PagesSurviveReopen) {
  Bytes a = MakePage(7);
  PageDigest d;
  {
    auto s = OpenStore();
    d = *s->Put(a);
    ASSERT_TRUE(s->Sync().has_value());
  }
  auto s = OpenStore();
  EXPECT_TRUE(Has(*s, d, a));
  EXPECT_EQ(s->stats().corrupt_records, 0u);
}

TEST_F(PageStoreTest, FilesArePrivate) {
  auto s = OpenStore();
  ASSERT_TRUE(s->Put(MakePage(1)).has_value());
  ASSERT_TRUE(s->PutManifest("vm1", {}).has_value());
  struct stat st;
  for (auto dir : {opt_.dir, opt_.dir + "/segments", opt_.dir + "/manifests"}) {
    ASSERT_EQ(stat(dir.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u) << dir;
  }
  for (auto& p : Segments()) {
    ASSERT_EQ(stat(p.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << p;
  }
  ASSERT_EQ(stat((opt_.dir + "/manifests/vm1.kmf").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(PageStoreTest, TornTailRecordIsDetectedAndNeverServed) {
  Bytes a = MakePage(1), b = MakePage(2);
  PageDigest da, db;
  {
    auto s = OpenStore();
    da = *s->Put(a);
    db = *s->Put(b);
  }
  auto segs = Segments();
  ASSERT_EQ(segs.size(), 1u);
  uint64_t full = fs::file_size(segs[0]);
  ASSERT_EQ(full, fmt::kSegmentHeaderSize + 2 * fmt::kRecordSize);
  // Crash in the middle of the second append.
  fs::resize_file(segs[0], full - 1000);
  {
    auto s = OpenStore();
    EXPECT_TRUE(Has(*s, da, a));
    EXPECT_FALSE(Has(*s, db, b));
    EXPECT_EQ(s->stats().torn_bytes, fmt::kRecordSize - 1000);
    // Appends continue at a record boundary, and the page can be stored again.
    EXPECT_EQ(*s->Put(b), db);
    EXPECT_TRUE(Has(*s, db, b));
  }
  auto s = OpenStore();
  EXPECT_TRUE(Has(*s, da, a));
  EXPECT_TRUE(Has(*s, db, b));
}

void FlipByte(const fs::path& p, uint64_t at) {
  int fd = open(p.c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  uint8_t c;
  ASSERT_EQ(pread(fd, &c, 1, off_t(at)), 1);
  c ^= 0x40;
  ASSERT_EQ(pwrite(fd, &c, 1, off_t(at)), 1);
  close(fd);
}

TEST_F(PageStoreTest, CorruptedByteMakesOnlyThatPageMissingAtOpen) {
  std::vector<Bytes> pages;
  std::vector<PageDigest> ds;
  {
    auto s = OpenStore();
    for (uint32_t i = 0; i < 3; ++i) {
      pages.push_back(MakePage(10 + i));
      ds.push_back(*s->Put(pages.back()));
    }
  }
  auto seg = Segments()[0];
  // A byte in the data of the middle record.
  FlipByte(seg, fmt::kSegmentHeaderSize + fmt::kRecordSize + fmt::kRecordHeaderSize + 123);
  auto s = OpenStore();
  EXPECT_TRUE(Has(*s, ds[0], pages[0]));
  EXPECT_FALSE(Has(*s, ds[1], pages[1]));
  EXPECT_TRUE(Has(*s, ds[2], pages[2]));
  EXPECT_EQ(s->stats().corrupt_records, 1u);
}

TEST_F(PageStoreTest, CorruptionAfterOpenIsCaughtByGet) {
  auto s = OpenStore();
  Bytes a = MakePage(1), b = MakePage(2);
  auto da = *s->Put(a), db = *s->Put(b);
  auto seg = Segments()[0];
  // Flip one byte of the first record's stored digest and one of b's data.
  FlipByte(seg, fmt::kSegmentHeaderSize + 8 + 5);
  FlipByte(seg, fmt::kSegmentHeaderSize + fmt::kRecordSize + fmt::kRecordSize - 1);
  EXPECT_FALSE(Has(*s, da, a));
  EXPECT_FALSE(Has(*s, db, b));
  EXPECT_FALSE(s->Contains(da));  // dropped from the index
  EXPECT_EQ(s->stats().corrupt_records, 2u);
}

TEST_F(PageStoreTest, QuotaEvictsLeastRecentlyUsedSegments) {
  opt_.segment_bytes = fmt::kSegmentHeaderSize + 4 * fmt::kRecordSize;  // 4 pages a segment
  opt_.quota_bytes = 3 * opt_.segment_bytes;
  auto s = OpenStore();
  std::vector<PageDigest> ds;
  std::vector<Bytes> pages;
  for (uint32_t i = 0; i < 8; ++i) {  // segments 1 and 2 full
    pages.push_back(MakePage(100 + i));
    ds.push_back(*s->Put(pages.back()));
  }
  // Use segment 1 so that segment 2 becomes the least recently used.
  EXPECT_TRUE(Has(*s, ds[0], pages[0]));
  for (uint32_t i = 8; i < 16; ++i) {  // segments 3 and 4: one must go
    pages.push_back(MakePage(100 + i));
    ds.push_back(*s->Put(pages.back()));
  }
  auto st = s->stats();
  EXPECT_LE(st.bytes, opt_.quota_bytes);
  EXPECT_EQ(st.evicted_segments, 1u);
  EXPECT_EQ(st.evicted_pages, 4u);
  for (uint32_t i = 0; i < 16; ++i) {
    bool in_lru_victim = i >= 4 && i < 8;
    EXPECT_EQ(s->Contains(ds[i]), !in_lru_victim) << i;
  }
  EXPECT_EQ(Segments().size(), 3u);
  // A smaller quota at reopen is enforced at once.
  s.reset();
  opt_.quota_bytes = opt_.segment_bytes;
  s = OpenStore();
  EXPECT_LE(s->stats().bytes, opt_.quota_bytes);
}

TEST_F(PageStoreTest, ManifestsPersistAcrossReopenAndRejectBadNames) {
  Manifest m;
  {
    auto s = OpenStore();
    for (uint32_t i = 0; i < 5; ++i)
      m.entries.push_back(
          {i % 2 ? "pc.ram" : "/rom@etc/acpi/tables", i * 4096ull, *s->Put(MakePage(i))});
    ASSERT_TRUE(s->PutManifest("guest-1.example", m).has_value());
    EXPECT_FALSE(s->PutManifest("../escape", m).has_value());
    EXPECT_FALSE(s->PutManifest(".hidden", m).has_value());
    EXPECT_FALSE(s->PutManifest("", m).has_value());
  }
  auto s = OpenStore();
  auto got = s->GetManifest("guest-1.example");
  ASSERT_TRUE(got.has_value()) << got.error().message();
  EXPECT_EQ(*got, m);
  auto vms = s->ListVms();
  ASSERT_TRUE(vms.has_value());
  EXPECT_EQ(*vms, std::vector<std::string>{"guest-1.example"});
  auto missing = s->GetManifest("other");
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code(), ENOENT);
  // A damaged manifest is an error, never a partial list.
  FlipByte(opt_.dir + "/manifests/guest-1.example.kmf", 30);
  EXPECT_FALSE(s->GetManifest("guest-1.example").has_value());
}

TEST_F(PageStoreTest, GarbageCollectionDropsOnlyUnreferencedPages) {
  opt_.segment_bytes = fmt::kSegmentHeaderSize + 4 * fmt::kRecordSize;
  auto s = OpenStore();
  std::vector<Bytes> pages;
  std::vector<PageDigest> ds;
  for (uint32_t i = 0; i < 10; ++i) {
    pages.push_back(MakePage(200 + i));
    ds.push_back(*s->Put(pages.back()));
  }
  Manifest a, b;
  for (uint32_t i = 0; i < 4; ++i) a.entries.push_back({"pc.ram", i * 4096ull, ds[i]});
  for (uint32_t i = 3; i < 7; ++i) b.entries.push_back({"pc.ram", i * 4096ull, ds[i]});
  ASSERT_TRUE(s->PutManifest("vm-a", a).has_value());
  ASSERT_TRUE(s->PutManifest("vm-b", b).has_value());

  auto gc = s->CollectGarbage();
  ASSERT_TRUE(gc.has_value()) << gc.error().message();
  EXPECT_EQ(gc->dropped_pages, 3u);  // pages 7, 8, 9
  EXPECT_EQ(gc->referenced_pages, 7u);
  for (uint32_t i = 0; i < 10; ++i) EXPECT_EQ(s->Contains(ds[i]), i < 7) << i;
  for (uint32_t i = 0; i < 7; ++i) EXPECT_TRUE(Has(*s, ds[i], pages[i])) << i;

  ASSERT_TRUE(s->DeleteVm("vm-a").has_value());
  EXPECT_EQ(s->DeleteVm("vm-a").error().code(), ENOENT);
  gc = s->CollectGarbage();
  ASSERT_TRUE(gc.has_value());
  EXPECT_EQ(gc->dropped_pages, 3u);  // pages 0, 1, 2; page 3 is also vm-b's
  for (uint32_t i = 0; i < 10; ++i) EXPECT_EQ(s->Contains(ds[i]), i >= 3 && i < 7) << i;
  uint64_t bytes = s->stats().bytes;
  EXPECT_LE(bytes, 2 * fmt::kSegmentHeaderSize + 4 * fmt::kRecordSize);

  // What GC left is what a reopen finds.
  s.reset();
  s = OpenStore();
  for (uint32_t i = 0; i < 10; ++i) EXPECT_EQ(s->Contains(ds[i]), i >= 3 && i < 7) << i;
  for (uint32_t i = 3; i < 7; ++i) EXPECT_TRUE(Has(*s, ds[i], pages[i])) << i;
}

TEST_F(PageStoreTest, ConcurrentPutsAndGetsAgree) {
  opt_.segment_bytes = fmt::kSegmentHeaderSize + 16 * fmt::kRecordSize;
  auto s = OpenStore();
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint32_t i = 0; i < 200; ++i) {
        Bytes p = MakePage(i % 50 + (t % 2) * 1000);  // overlapping content
        auto d = s->Put(p);
        Bytes out(kStorePageSize);
        auto g = d ? s->Get(*d, out) : Result<bool>(false);
        if (!g || !*g || out != p) failures++;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(s->stats().pages, 100u);
}

}  // namespace
}  // namespace kagemusha::memcache

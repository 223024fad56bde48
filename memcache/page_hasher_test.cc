// PageHasher's multi-page SHA-256 paths (sha256_pages.cc) against OpenSSL's
// one-shot SHA-256: every path this CPU supports, forced explicitly, for
// every batch size 0..40, unaligned input, lane independence, and known
// answers. A path the CPU lacks is reported and skipped, never faked.
#include <gtest/gtest.h>
#include <openssl/sha.h>

#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kagemusha/memcache/page_store.h"
#include "sha256_pages.h"

namespace kagemusha::memcache {
namespace {

using Bytes = std::vector<uint8_t>;
using Path = PageHasher::Path;

Bytes RandomPages(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes b(n * kStorePageSize);
  for (auto& x : b) x = uint8_t(rng());
  return b;
}

PageDigest OpenSslSha256(const uint8_t* page) {
  PageDigest d;
  SHA256(page, kStorePageSize, d.bytes.data());
  return d;
}

std::vector<Path> SupportedPaths() {
  std::vector<Path> v;
  for (Path p : PageHasher::kAllPaths) {
    if (PageHasher::Supports(p))
      v.push_back(p);
    else
      std::printf("[ SKIPPED  ] path %s: not supported by this CPU\n", PageHasher::PathName(p));
  }
  return v;
}

class PageHasherPathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto h = PageHasher::Create();
    ASSERT_TRUE(h.has_value());
    hasher_.emplace(std::move(*h));
  }
  std::vector<PageDigest> HashWith(Path p, std::span<const uint8_t> pages) {
    std::vector<PageDigest> out(pages.size() / kStorePageSize);
    // Pre-fill so a digest that is never written cannot pass by accident.
    for (auto& d : out) d.bytes.fill(0xA5);
    hasher_->HashManyWith(p, pages, out);
    return out;
  }
  std::optional<PageHasher> hasher_;
};

TEST_F(PageHasherPathTest, EveryPathMatchesOpenSslForEveryBatchSize) {
  const Bytes pages = RandomPages(40, 1);
  for (Path p : SupportedPaths()) {
    for (size_t n = 0; n <= 40; ++n) {
      auto got = HashWith(p, std::span<const uint8_t>(pages).first(n * kStorePageSize));
      ASSERT_EQ(got.size(), n);
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(got[i], OpenSslSha256(pages.data() + i * kStorePageSize))
            << PageHasher::PathName(p) << ", batch " << n << ", page " << i;
    }
  }
}

TEST_F(PageHasherPathTest, EveryPathAcceptsUnalignedPages) {
  const size_t n = 37;  // full batches of every width plus a tail
  Bytes buf = RandomPages(n + 1, 2);
  for (size_t shift : {1u, 3u, 8u, 31u, 63u}) {
    std::span<const uint8_t> pages(buf.data() + shift, n * kStorePageSize);
    for (Path p : SupportedPaths()) {
      auto got = HashWith(p, pages);
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(got[i], OpenSslSha256(pages.data() + i * kStorePageSize))
            << PageHasher::PathName(p) << ", shift " << shift << ", page " << i;
    }
  }
}

// Pages that differ in one byte each, at a different place per lane (first
// and last byte, block edges, the middle): a transposition or lane mix-up
// shows as a wrong or repeated digest.
TEST_F(PageHasherPathTest, LanesAreIndependent) {
  const size_t n = 36;
  Bytes pages(n * kStorePageSize, 0x5c);
  const size_t where[] = {0, 4095, 63, 64, 2048, 1, 4032, 127, 3, 4094, 65, 1000};
  for (size_t i = 0; i < n; ++i)
    pages[i * kStorePageSize + where[i % std::size(where)]] ^= uint8_t(1 + i);
  for (Path p : SupportedPaths()) {
    auto got = HashWith(p, pages);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(got[i], OpenSslSha256(pages.data() + i * kStorePageSize))
          << PageHasher::PathName(p) << ", page " << i;
      for (size_t j = 0; j < i; ++j) ASSERT_NE(got[i], got[j]) << i << " vs " << j;
    }
  }
}

// Known answers computed with sha256sum, independent of OpenSSL's library.
TEST_F(PageHasherPathTest, KnownAnswers) {
  struct Case {
    const char* name;
    uint8_t (*byte)(size_t);
    const char* hex;
  } cases[] = {
      {"zeros", [](size_t) { return uint8_t(0); },
       "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7"},
      {"'a'", [](size_t) { return uint8_t('a'); },
       "c93eee2d0db02f10acc7460d9576e122dcf8cd53c4bf8dfcae1b3e74ebcfff5a"},
      {"i % 256", [](size_t i) { return uint8_t(i); },
       "c8f5d0341d54d951a71b136e6e2afcb14d11ed8489a7ae126a8fee0df6ecf193"},
      {"0xff", [](size_t) { return uint8_t(0xff); },
       "f47a8ec3e9aff2318d896942282ad4fe37d6391c82914f54a5da8a37de1300c6"},
  };
  // 20 pages cycling through the cases: every lane of every kernel sees each.
  const size_t n = 20;
  Bytes pages(n * kStorePageSize);
  for (size_t i = 0; i < n; ++i)
    for (size_t b = 0; b < kStorePageSize; ++b)
      pages[i * kStorePageSize + b] = cases[i % std::size(cases)].byte(b);
  for (Path p : SupportedPaths()) {
    auto got = HashWith(p, pages);
    for (size_t i = 0; i < n; ++i)
      EXPECT_EQ(got[i].Hex(), cases[i % std::size(cases)].hex)
          << PageHasher::PathName(p) << ", page " << i << " (" << cases[i % std::size(cases)].name
          << ")";
  }
  EXPECT_EQ(hasher_->Hash(std::span<const uint8_t>(pages).first(kStorePageSize)).Hex(),
            cases[0].hex);
}

TEST_F(PageHasherPathTest, HashManyUsesASupportedPathAndAgreesWithHash) {
  EXPECT_TRUE(PageHasher::Supports(PageHasher::FastestPath()));
  EXPECT_TRUE(PageHasher::Supports(Path::kEvp));
  std::printf("[   INFO   ] fastest path here: %s\n",
              PageHasher::PathName(PageHasher::FastestPath()));
  const size_t n = 2 * PageHasher::kPreferredBatchPages + 5;
  const Bytes pages = RandomPages(n, 3);
  std::vector<PageDigest> out(n);
  hasher_->HashMany(pages, out);
  for (size_t i = 0; i < n; ++i)
    EXPECT_EQ(out[i], hasher_->Hash(std::span<const uint8_t>(pages).subspan(i * kStorePageSize,
                                                                            kStorePageSize)));
}

// The kernels directly: a page may sit in several lanes (HashMany pads a
// partial batch that way) and every such lane gets the same digest.
TEST(Sha256PagesTest, RepeatedInputsInLanes) {
  namespace mb = sha256_pages;
  const Bytes pages = RandomPages(3, 4);
  const PageDigest want[3] = {OpenSslSha256(pages.data()),
                              OpenSslSha256(pages.data() + kStorePageSize),
                              OpenSslSha256(pages.data() + 2 * kStorePageSize)};
  struct Kernel {
    const char* name;
    bool supported;
    size_t lanes;
    void (*fn)(const uint8_t* const*, uint8_t* const*);
  } kernels[] = {
      {"ShaNiX2", mb::CpuHasShaNi(), 2, mb::ShaNiX2},
      {"Avx2X8", mb::CpuHasAvx2(), 8, mb::Avx2X8},
      {"Avx512VlX8", mb::CpuHasAvx512(), 8, mb::Avx512VlX8},
      {"Avx512X16", mb::CpuHasAvx512(), 16, mb::Avx512X16},
      {"Avx512X16ShaNiX2", mb::CpuHasAvx512() && mb::CpuHasShaNi(), 18, mb::Avx512X16ShaNiX2},
  };
  for (const auto& k : kernels) {
    if (!k.supported) continue;
    const uint8_t* in[18];
    uint8_t out_bytes[18][32];
    uint8_t* out[18];
    for (size_t l = 0; l < k.lanes; ++l) {
      in[l] = pages.data() + (l * 7 % 3) * kStorePageSize;
      out[l] = out_bytes[l];
    }
    k.fn(in, out);
    for (size_t l = 0; l < k.lanes; ++l)
      EXPECT_EQ(0, std::memcmp(out[l], want[l * 7 % 3].bytes.data(), 32))
          << k.name << " lane " << l;
  }
}

}  // namespace
}  // namespace kagemusha::memcache

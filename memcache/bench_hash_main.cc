// Per-core hash rate over 4 KiB pages for the page store's digest candidates
// (docs/memcache.md, "Digest choice"). Single thread; prints GB/s and the
// ratio to SHA-256, the chosen digest, so the choice is re-checked on each
// machine. Usage: kagemusha_memcache_bench_hash [seconds_per_candidate]
#include <openssl/evp.h>
#include <openssl/params.h>
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kagemusha/common/coding.h"
#include "kagemusha/memcache/migration_stream.h"
#include "kagemusha/memcache/page_store.h"

namespace {

constexpr size_t kPage = 4096;
// 1.1 MiB working set: stays in L2, like a hot copy; a multiple of every
// kernel's batch (2, 8, 16, 18 pages).
constexpr size_t kPages = 288;

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) / 1e9;
}

// Rate per core = bytes / CPU time of this thread, so that other load on the
// machine (shared CI hosts) does not count against the candidate; the ratio
// to SHA-256 is what the choice rests on.
double Measure(const std::function<void(const uint8_t*)>& hash, const std::vector<uint8_t>& buf,
               double seconds) {
  for (size_t i = 0; i < kPages; ++i) hash(buf.data() + i * kPage);  // warm up
  double start = ThreadCpuSeconds();
  size_t n = 0;
  double elapsed = 0;
  do {
    for (size_t i = 0; i < kPages; ++i) hash(buf.data() + i * kPage);
    n += kPages;
    elapsed = ThreadCpuSeconds() - start;
  } while (elapsed < seconds);
  return double(n) * kPage / elapsed / 1e9;
}

std::function<void(const uint8_t*)> EvpDigest(const char* name) {
  EVP_MD* md = EVP_MD_fetch(nullptr, name, nullptr);
  if (!md) return nullptr;
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  return [md, ctx](const uint8_t* p) {
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    EVP_DigestInit_ex(ctx, md, nullptr);
    EVP_DigestUpdate(ctx, p, kPage);
    EVP_DigestFinal_ex(ctx, out, &len);
  };
}

std::function<void(const uint8_t*)> EvpMac(const char* mac_name, const char* digest,
                                           size_t key_len = 32) {
  EVP_MAC* mac = EVP_MAC_fetch(nullptr, mac_name, nullptr);
  if (!mac) return nullptr;
  EVP_MAC_CTX* ctx = EVP_MAC_CTX_new(mac);
  static unsigned char key[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  OSSL_PARAM params[2] = {OSSL_PARAM_construct_end(), OSSL_PARAM_construct_end()};
  if (digest) params[0] = OSSL_PARAM_construct_utf8_string("digest", const_cast<char*>(digest), 0);
  if (!EVP_MAC_init(ctx, key, key_len, params)) return nullptr;
  EVP_MAC_CTX* work = EVP_MAC_CTX_dup(ctx);
  return [ctx, work](const uint8_t* p) mutable {
    unsigned char out[EVP_MAX_MD_SIZE];
    size_t len = 0;
    // Re-init from the keyed template: what a per-host keyed digest costs.
    EVP_MAC_CTX_free(work);
    work = EVP_MAC_CTX_dup(ctx);
    EVP_MAC_init(work, nullptr, 0, nullptr);
    EVP_MAC_update(work, p, kPage);
    EVP_MAC_final(work, out, &len, sizeof out);
  };
}

// A page-dense QEMU 7.2 ram stream (one 32 MiB block, every page a PAGE
// record), to measure the parser on the records that matter for rewriting.
std::vector<uint8_t> DenseRamStream() {
  namespace mc = kagemusha::memcache;
  std::vector<uint8_t> b;
  kagemusha::ByteWriter w(b);
  w.U32(mc::kQemuVmFileMagic);
  w.U32(mc::kQemuVmFileVersion);
  w.U8(0x07);
  w.U32(2);
  w.Str("pc");
  w.U8(0x01);
  w.U32(2);
  w.U8(3);
  w.Str("ram");
  w.U32(0);
  w.U32(4);
  const uint64_t size = 32ull << 20;
  w.U64(size | mc::ram_flag::kMemSize);
  w.U8(6);
  w.Str("pc.ram");
  w.U64(size);
  w.U64(mc::ram_flag::kEos);
  w.U8(0x7e);
  w.U32(2);
  w.U8(0x02);
  w.U32(2);
  std::vector<uint8_t> page(kPage);
  for (uint64_t off = 0; off < size; off += kPage) {
    w.U64(off | mc::ram_flag::kPage | (off ? mc::ram_flag::kContinue : 0));
    if (!off) {
      w.U8(6);
      w.Str("pc.ram");
    }
    page[off / kPage % kPage] ^= 1;
    w.Bytes(page);
  }
  w.U64(mc::ram_flag::kEos);
  w.U8(0x7e);
  w.U32(2);
  w.U8(0x00);
  return b;
}

struct CountingVisitor : kagemusha::memcache::MigrationStreamVisitor {
  size_t bytes = 0, pages = 0, fallbacks = 0;
  void OnPassthrough(std::span<const uint8_t> b) override { bytes += b.size(); }
  void OnPage(const kagemusha::memcache::PageRecord& r) override {
    bytes += r.raw.size();
    ++pages;
  }
  void OnFallback(const kagemusha::memcache::Fallback&) override { ++fallbacks; }
};

void BenchParser(double seconds) {
  std::vector<uint8_t> in = DenseRamStream();
  std::printf("\n%-34s %10s %10s\n", "parser, page-dense stream, chunk", "GB/s(cpu)", "pages");
  for (size_t chunk : {size_t{1}, size_t{1460}, size_t{65536}}) {
    double start = ThreadCpuSeconds(), elapsed = 0;
    size_t total = 0;
    CountingVisitor v;
    do {
      kagemusha::memcache::MigrationStreamParser p;
      size_t limit = chunk == 1 ? in.size() / 64 : in.size();  // 1-byte feeds are slow
      for (size_t i = 0; i < limit; i += chunk)
        p.Feed(std::span<const uint8_t>(in).subspan(i, std::min(chunk, limit - i)), v);
      (void)p.Finish(v);
      total += limit;
      elapsed = ThreadCpuSeconds() - start;
    } while (elapsed < seconds);
    if (v.bytes != total || v.fallbacks) {
      std::fprintf(stderr, "parser bench: lost bytes or fell back\n");
      std::exit(1);
    }
    std::printf("%-34zu %10.2f %10zu\n", chunk, double(total) / elapsed / 1e9, v.pages);
  }
}

// The same over 64 MiB, far more than the caches hold: pages come from DRAM,
// as for a proxy hashing a stream that has been written out of cache (one
// stream per page for the 16-lane kernel).
void BenchCold(kagemusha::memcache::PageHasher& hasher, double seconds) {
  using kagemusha::memcache::PageDigest;
  constexpr size_t kColdPages = (64u << 20) / kPage;
  std::vector<uint8_t> big(kColdPages * kPage);
  for (size_t i = 0; i < big.size(); ++i) big[i] = uint8_t(i * 2654435761u >> 11);
  std::vector<PageDigest> out(kColdPages);
  std::printf("\n%-44s %10s %10s\n", "64 MiB working set (from DRAM)", "GB/s(cpu)", "vs SHA-256");
  double evp = 0;
  for (int which = 0; which < 2; ++which) {
    double start = ThreadCpuSeconds(), elapsed = 0;
    size_t n = 0;
    do {
      for (size_t i = 0; i < kColdPages; i += 16) {
        std::span<const uint8_t> pages(big.data() + i * kPage, 16 * kPage);
        if (which == 0)
          for (size_t k = 0; k < 16; ++k) out[i + k] = hasher.Hash(pages.subspan(k * kPage, kPage));
        else
          hasher.HashMany(pages, std::span<PageDigest>(out).subspan(i, 16));
      }
      n += kColdPages;
      elapsed = ThreadCpuSeconds() - start;
    } while (elapsed < seconds);
    const double r = double(n) * kPage / elapsed / 1e9;
    if (which == 0) evp = r;
    std::printf("%-44s %10.2f %9.2fx\n", which == 0 ? "SHA-256 (EVP)" : "HashMany auto, batch 16",
                r, r / evp);
  }
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = argc > 1 ? std::atof(argv[1]) : 0.5;
  std::vector<uint8_t> buf(kPage * kPages);
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = uint8_t(i * 2654435761u >> 13);

  auto store_hasher = kagemusha::memcache::PageHasher::Create();
  if (!store_hasher) {
    std::fprintf(stderr, "PageHasher: %s\n", store_hasher.error().message().c_str());
    return 1;
  }
  struct Candidate {
    std::string name;
    std::function<void(const uint8_t*)> fn;
  };
  std::vector<Candidate> cands = {
      {"PageHasher (store digest)",
       [&](const uint8_t* p) {
         (void)store_hasher->Hash({p, kPage});
       }},
      {"SHA-256 (EVP)", EvpDigest("SHA256")},
      {"SHA-512/256 (EVP)", EvpDigest("SHA512-256")},
      {"BLAKE2b-512 (EVP)", EvpDigest("BLAKE2B-512")},
      {"BLAKE2s-256 (EVP)", EvpDigest("BLAKE2S-256")},
      {"SHA-1 (EVP, not collision-safe)", EvpDigest("SHA1")},
      {"HMAC-SHA256 (EVP_MAC)", EvpMac("HMAC", "SHA256")},
      {"keyed BLAKE2b (BLAKE2BMAC)", EvpMac("BLAKE2BMAC", nullptr)},
      {"SipHash-2-4 128-bit (EVP_MAC)", EvpMac("SIPHASH", nullptr, 16)},
      {"CRC-32C (common, table)",
       [](const uint8_t* p) {
         (void)kagemusha::Crc32c({p, kPage});
       }},
      {"CRC-32C (PageStore, SSE4.2)",
       [](const uint8_t* p) {
         (void)kagemusha::memcache::PageCrc32c({p, kPage});
       }},
      // Measured again last: its spread against the first EVP row shows how
      // much the load on the machine moved the figures during the run.
      {"SHA-256 (EVP), again", EvpDigest("SHA256")},
  };
  // Every multi-page path this CPU has, each in batches of its own width
  // (Measure calls the candidate once per page: the first page of each batch
  // hashes the batch, the others return at once).
  using Path = kagemusha::memcache::PageHasher::Path;
  auto batched = [&](Path path, size_t batch) -> std::function<void(const uint8_t*)> {
    if (!kagemusha::memcache::PageHasher::Supports(path)) return nullptr;
    return [&, path, batch](const uint8_t* p) {
      if (((p - buf.data()) / kPage) % batch) return;
      kagemusha::memcache::PageDigest d[32];
      store_hasher->HashManyWith(path, {p, batch * kPage}, {d, batch});
    };
  };
  struct PathRow {
    Path path;
    size_t batch;
  };
  std::vector<Candidate> paths;
  for (PathRow r :
       {PathRow{Path::kShaNi2, 2}, PathRow{Path::kAvx2x8, 8}, PathRow{Path::kAvx512x8, 8},
        PathRow{Path::kAvx512x16, 16}, PathRow{Path::kAvx512x16ShaNi2, 18}})
    paths.push_back({std::string("HashMany ") + kagemusha::memcache::PageHasher::PathName(r.path),
                     batched(r.path, r.batch)});
  const Path fastest = kagemusha::memcache::PageHasher::FastestPath();
  // What the proxies get: HashMany (the run-time choice) on 16-page batches,
  // and on 9-page batches (a tail-heavy caller).
  for (size_t batch : {size_t{16}, size_t{9}}) {
    paths.push_back({std::string("HashMany auto (") +
                         kagemusha::memcache::PageHasher::PathName(fastest) + "), batch " +
                         std::to_string(batch),
                     [&, batch](const uint8_t* p) {
                       const size_t i = size_t(p - buf.data()) / kPage;
                       if (i % batch) return;
                       const size_t n = std::min(batch, kPages - i);
                       kagemusha::memcache::PageDigest d[32];
                       store_hasher->HashMany({p, n * kPage}, {d, n});
                     }});
  }
  cands.insert(cands.begin() + 2, paths.begin(), paths.end());

  double sha = 0;
  std::printf("%-44s %10s %10s\n", "candidate (4 KiB pages, 1 core)", "GB/s(cpu)", "vs SHA-256");
  for (auto& c : cands) {
    if (!c.fn) {
      std::printf("%-44s %10s\n", c.name.c_str(), "n/a");
      continue;
    }
    double r = Measure(c.fn, buf, seconds);
    if (c.name == "SHA-256 (EVP)") sha = r;
    std::printf("%-44s %10.2f %10s\n", c.name.c_str(), r,
                sha > 0 ? (std::to_string(r / sha).substr(0, 4) + "x").c_str() : "-");
  }
  BenchCold(*store_hasher, seconds);
  BenchParser(seconds);
  return 0;
}

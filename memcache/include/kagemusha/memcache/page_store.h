// PageStore: the per-host, content-addressed store of 4 KiB guest pages that
// MiyakoDori memory reuse draws on. When a VM returns to a host that still
// holds its pages, the encoder proxy sends a digest instead of a page the
// destination already has; the decoder proxy looks the digest up here.
//
//   * Pages are keyed by their SHA-256 digest (PageDigest; why SHA-256 and not
//     a keyed or faster hash: docs/memcache.md, "Digest choice", measured with
//     kagemusha_memcache_bench_hash).
//   * Per-VM manifests map (RAMBlock id, offset) -> digest; they are the
//     references that garbage collection keeps alive.
//   * On disk (versioned, specified in docs/memcache.md): append-only segment
//     files of fixed-size checksummed records, and one manifest file per VM
//     written atomically (temp file, fsync, rename, fsync dir). The in-memory
//     index is rebuilt and validated from the segments at Open; a torn or
//     corrupted record is detected (CRC-32C) and is never served: Get reports
//     it missing.
//   * A byte quota evicts whole segments, least recently used first (a put
//     that dedups or a get counts as a use). Evicted pages just go missing:
//     this is a cache, the migration then sends the full page.
//   * Directories are created 0700 and files 0600: guest memory is secret.
//
// Thread-safety: PageStore is thread-safe; all methods may be called
// concurrently. Hashing (Put) and reading page data (Get) run outside the
// store lock; index and file-append updates are serialized by it.
// CollectGarbage holds the lock for its whole run. PageHasher is NOT
// thread-safe: use one per thread.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kagemusha/common/error.h"

namespace kagemusha::memcache {

inline constexpr size_t kStorePageSize = 4096;

struct PageDigest {
  std::array<uint8_t, 32> bytes{};
  auto operator<=>(const PageDigest&) const = default;
  std::string Hex() const;
};

struct PageDigestHash {
  size_t operator()(const PageDigest& d) const noexcept {
    size_t h;
    std::memcpy(&h, d.bytes.data(), sizeof h);  // already uniformly distributed
    return h;
  }
};

// SHA-256 of 4 KiB pages. Hash() goes through OpenSSL EVP (SHA-NI where the
// CPU has it); HashMany() hashes a batch with the fastest multi-page kernel
// this CPU supports (chosen at run time from CPUID; AVX-512 puts 16 pages in
// the lanes of zmm registers, about twice OpenSSL's rate on a Xeon with
// SHA-NI, see docs/memcache.md "Digest choice"). Every path gives exactly the
// SHA-256 digest. Single-owner; create one per thread.
class PageHasher {
 public:
  // How HashManyWith computes the digests; all give the same bytes.
  enum class Path : uint8_t {
    kEvp,              // OpenSSL EVP, one page at a time
    kShaNi2,           // SHA-NI, two pages' rounds interleaved
    kAvx2x8,           // AVX2, 8 pages in the lanes of ymm registers
    kAvx512x8,         // AVX-512VL (rotate, ternary logic), 8 pages in ymm
    kAvx512x16,        // AVX-512, 16 pages in zmm; tails via x8 / SHA-NI / EVP
    kAvx512x16ShaNi2,  // 16 zmm lanes and 2 SHA-NI pages in one loop. Measured
                       // only: SHA-NI has no VEX form, and mixing its legacy
                       // SSE code with live zmm state is ~40x slower here.
  };
  static constexpr Path kAllPaths[] = {Path::kEvp,      Path::kShaNi2,    Path::kAvx2x8,
                                       Path::kAvx512x8, Path::kAvx512x16, Path::kAvx512x16ShaNi2};

  // Batches of a multiple of this many pages use the widest kernel fully;
  // callers that can should pass at least this many pages to HashMany.
  static constexpr size_t kPreferredBatchPages = 16;

  static Result<PageHasher> Create();
  PageHasher(PageHasher&&) noexcept;
  PageHasher& operator=(PageHasher&&) noexcept;
  PageHasher(const PageHasher&) = delete;
  PageHasher& operator=(const PageHasher&) = delete;
  ~PageHasher();

  // REQUIRES: page.size() == kStorePageSize.
  PageDigest Hash(std::span<const uint8_t> page);

  // SHA-256 of pages.size() / kStorePageSize consecutive pages into `out`,
  // through FastestPath(). Pages need no alignment.
  // REQUIRES: pages.size() == out.size() * kStorePageSize.
  void HashMany(std::span<const uint8_t> pages, std::span<PageDigest> out);

  // HashMany through one given path (tests and the bench force each one).
  // REQUIRES: Supports(path), and the sizes as for HashMany.
  void HashManyWith(Path path, std::span<const uint8_t> pages, std::span<PageDigest> out);

  static bool Supports(Path path);  // the CPU has the path's instructions
  static Path FastestPath();        // the fastest supported path, by measurement
  static const char* PathName(Path path);
  static bool HasShaExtensions();

 private:
  PageHasher() = default;
  void HashTail(std::span<const uint8_t> pages, std::span<PageDigest> out);
  void* md_ = nullptr;   // EVP_MD*
  void* ctx_ = nullptr;  // EVP_MD_CTX*
};

// CRC-32C with the SSE4.2 instruction when available; same values as
// kagemusha::Crc32c (the on-disk record checksum).
uint32_t PageCrc32c(std::span<const uint8_t> data);

struct ManifestEntry {
  std::string block;  // RAMBlock idstr, 1..255 bytes
  uint64_t offset = 0;
  PageDigest digest;
  bool operator==(const ManifestEntry&) const = default;
};

struct Manifest {
  std::vector<ManifestEntry> entries;
  bool operator==(const Manifest&) const = default;
};

struct PageStoreOptions {
  std::string dir;                       // created 0700 if missing
  uint64_t quota_bytes = 0;              // 0: unlimited. Counts segment files.
  uint64_t segment_bytes = 64ull << 20;  // rolled over at this size
  bool fsync = true;                     // fdatasync on Sync() and for manifests
};

struct PageStoreStats {
  uint64_t pages = 0;  // distinct pages indexed
  uint64_t bytes = 0;  // bytes of segment files (what the quota counts)
  uint64_t segments = 0;
  uint64_t puts = 0;
  uint64_t dedup_hits = 0;  // puts of a page already stored
  uint64_t gets = 0;
  uint64_t misses = 0;
  uint64_t corrupt_records = 0;  // found at Open or by Get; never served
  uint64_t torn_bytes = 0;       // truncated from segment tails at Open
  uint64_t evicted_segments = 0;
  uint64_t evicted_pages = 0;
};

struct GcResult {
  uint64_t referenced_pages = 0;
  uint64_t dropped_pages = 0;
  uint64_t moved_pages = 0;
  uint64_t removed_segments = 0;
};

class PageStore {
 public:
  static Result<std::unique_ptr<PageStore>> Open(const PageStoreOptions& options);
  ~PageStore();
  PageStore(const PageStore&) = delete;
  PageStore& operator=(const PageStore&) = delete;

  // Stores one page (hashing it first) unless it is already present.
  // EINVAL if page.size() != kStorePageSize.
  Result<PageDigest> Put(std::span<const uint8_t> page);

  // Put for pages.size() / kStorePageSize consecutive pages, hashed with
  // PageHasher::HashMany outside the lock; digests in page order.
  // EINVAL unless pages.size() is a multiple of kStorePageSize.
  Result<std::vector<PageDigest>> PutMany(std::span<const uint8_t> pages);

  // Copies the page into `out` (kStorePageSize bytes). false if the store
  // does not have it: never stored, evicted, collected, or its record failed
  // its checksum (then it is also dropped from the index).
  Result<bool> Get(const PageDigest& digest, std::span<uint8_t> out);
  bool Contains(const PageDigest& digest) const;

  // Makes every completed Put durable (fdatasync of the segment files).
  Status Sync();

  // Per-VM manifests. VM names: 1..128 of [A-Za-z0-9._-], not starting '.'.
  Status PutManifest(std::string_view vm, const Manifest& manifest);
  Result<Manifest> GetManifest(std::string_view vm) const;  // ENOENT if none
  Result<std::vector<std::string>> ListVms() const;
  Status DeleteVm(std::string_view vm);  // ENOENT if none

  // Drops every page no manifest references, rewriting segments that hold
  // any such page (referenced pages are copied to a fresh segment, made
  // durable, and only then is the old segment unlinked).
  Result<GcResult> CollectGarbage();

  PageStoreStats stats() const;

 private:
  struct Impl;
  explicit PageStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kagemusha::memcache

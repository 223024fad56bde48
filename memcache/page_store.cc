// PageStore implementation; the format is in page_store_format.h and
// docs/memcache.md.
#include "kagemusha/memcache/page_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <immintrin.h>
#include <nmmintrin.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "kagemusha/common/coding.h"
#include "page_store_format.h"
#include "sha256_pages.h"

namespace kagemusha::memcache {

namespace fmt = store_format;

// ---------------------------------------------------------------- digests --

std::string PageDigest::Hex() const {
  static const char* d = "0123456789abcdef";
  std::string s;
  s.reserve(64);
  for (uint8_t b : bytes) {
    s += d[b >> 4];
    s += d[b & 15];
  }
  return s;
}

Result<PageHasher> PageHasher::Create() {
  PageHasher h;
  h.md_ = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  h.ctx_ = EVP_MD_CTX_new();
  if (!h.md_ || !h.ctx_) return Fail(Error::NotSupported("OpenSSL SHA-256 is not available"));
  return h;
}

PageHasher::PageHasher(PageHasher&& o) noexcept
    : md_(std::exchange(o.md_, nullptr)), ctx_(std::exchange(o.ctx_, nullptr)) {}

PageHasher& PageHasher::operator=(PageHasher&& o) noexcept {
  if (this != &o) {
    this->~PageHasher();
    md_ = std::exchange(o.md_, nullptr);
    ctx_ = std::exchange(o.ctx_, nullptr);
  }
  return *this;
}

PageHasher::~PageHasher() {
  if (ctx_) EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_));
  if (md_) EVP_MD_free(static_cast<EVP_MD*>(md_));
  ctx_ = md_ = nullptr;
}

PageDigest PageHasher::Hash(std::span<const uint8_t> page) {
  PageDigest d;
  auto* ctx = static_cast<EVP_MD_CTX*>(ctx_);
  unsigned len = 0;
  // EVP failures here mean a broken OpenSSL install: an invariant, not input.
  if (!EVP_DigestInit_ex(ctx, static_cast<EVP_MD*>(md_), nullptr) ||
      !EVP_DigestUpdate(ctx, page.data(), page.size()) ||
      !EVP_DigestFinal_ex(ctx, d.bytes.data(), &len) || len != d.bytes.size()) {
    std::fprintf(stderr, "PageHasher: OpenSSL SHA-256 failed\n");
    std::abort();
  }
  return d;
}

namespace {

namespace mb = sha256_pages;

__attribute__((target("sse4.2"))) uint32_t Crc32cSse42(std::span<const uint8_t> data) {
  uint64_t c = 0xffffffffu;
  size_t i = 0;
  for (; i + 8 <= data.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, data.data() + i, 8);
    c = _mm_crc32_u64(c, w);
  }
  uint32_t c32 = uint32_t(c);
  for (; i < data.size(); ++i) c32 = _mm_crc32_u8(c32, data[i]);
  return ~c32;
}

// Function-local static: __builtin_cpu_supports needs __builtin_cpu_init
// when it might run before libgcc's own constructor.
bool HaveSse42() {
  static const bool v = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("sse4.2"));
  }();
  return v;
}

// Runs an n-lane kernel over `count` pages starting at page `first`; lanes
// beyond `count` repeat the last page and their digests are discarded (a
// partly filled wide kernel can still beat narrower ones, see HashTail).
template <size_t kLanes>
void RunKernel(void (*kernel)(const uint8_t* const*, uint8_t* const*),
               std::span<const uint8_t> pages, std::span<PageDigest> out, size_t first,
               size_t count) {
  const uint8_t* in[kLanes];
  uint8_t* dst[kLanes];
  PageDigest scratch;
  for (size_t l = 0; l < kLanes; ++l) {
    const size_t i = first + std::min(l, count - 1);
    in[l] = pages.data() + i * kStorePageSize;
    dst[l] = l < count ? out[first + l].bytes.data() : scratch.bytes.data();
  }
  kernel(in, dst);
}

}  // namespace

bool PageHasher::HasShaExtensions() { return mb::CpuHasShaNi(); }

bool PageHasher::Supports(Path path) {
  switch (path) {
    case Path::kEvp:
      return true;
    case Path::kShaNi2:
      return mb::CpuHasShaNi();
    case Path::kAvx2x8:
      return mb::CpuHasAvx2();
    case Path::kAvx512x8:
    case Path::kAvx512x16:
      return mb::CpuHasAvx512();
    case Path::kAvx512x16ShaNi2:
      return mb::CpuHasAvx512() && mb::CpuHasShaNi();
  }
  return false;
}

// Order measured with kagemusha_memcache_bench_hash on a Xeon with SHA-NI
// and AVX-512 (docs/memcache.md): AVX-512 x16 ~2.2x EVP, SHA-NI x2 ~1.2x,
// AVX2 x8 ~0.8x. Without SHA-NI, OpenSSL's one-page code is ~2.7x slower than the
// AVX2 lanes, hence AVX2 before EVP.
PageHasher::Path PageHasher::FastestPath() {
  static const Path best = [] {
    for (Path p : {Path::kAvx512x16, Path::kShaNi2, Path::kAvx2x8})
      if (Supports(p)) return p;
    return Path::kEvp;
  }();
  return best;
}

const char* PageHasher::PathName(Path path) {
  switch (path) {
    case Path::kEvp:
      return "EVP";
    case Path::kShaNi2:
      return "SHA-NI x2";
    case Path::kAvx2x8:
      return "AVX2 x8";
    case Path::kAvx512x8:
      return "AVX-512VL x8";
    case Path::kAvx512x16:
      return "AVX-512 x16";
    case Path::kAvx512x16ShaNi2:
      return "AVX-512 x16 + SHA-NI x2";
  }
  return "?";
}

void PageHasher::HashMany(std::span<const uint8_t> pages, std::span<PageDigest> out) {
  HashManyWith(FastestPath(), pages, out);
}

// Fewer pages than the widest kernel takes. Cost of one call on the bench
// machine, in single-page EVP hashes: AVX-512 x16 ~6.6, AVX-512VL x8 ~5.2,
// SHA-NI x2 ~1.4, EVP 1. So 10+ pages go through a partly filled x16, 8-9
// through x8, the rest in SHA-NI pairs and a last one through EVP.
void PageHasher::HashTail(std::span<const uint8_t> pages, std::span<PageDigest> out) {
  size_t i = 0, n = out.size();
  const bool avx512 = mb::CpuHasAvx512(), sha_ni = mb::CpuHasShaNi();
  while (i < n) {
    const size_t left = n - i;
    if (avx512 && left >= 10) {
      RunKernel<16>(mb::Avx512X16, pages, out, i, std::min<size_t>(left, 16));
      i += std::min<size_t>(left, 16);
    } else if (avx512 && left >= 8) {
      RunKernel<8>(mb::Avx512VlX8, pages, out, i, std::min<size_t>(left, 8));
      i += std::min<size_t>(left, 8);
    } else if (sha_ni && left >= 2) {
      RunKernel<2>(mb::ShaNiX2, pages, out, i, 2);
      i += 2;
    } else {
      out[i] = Hash(pages.subspan(i * kStorePageSize, kStorePageSize));
      ++i;
    }
  }
}

void PageHasher::HashManyWith(Path path, std::span<const uint8_t> pages,
                              std::span<PageDigest> out) {
  // A kernel the CPU lacks would die of SIGILL somewhere less obvious.
  if (!Supports(path)) {
    std::fprintf(stderr, "PageHasher: path %s is not supported by this CPU\n", PathName(path));
    std::abort();
  }
  const size_t n = out.size();
  size_t i = 0;
  auto full_batches = [&](size_t lanes, void (*kernel)(const uint8_t* const*, uint8_t* const*)) {
    for (; i + lanes <= n; i += lanes) {
      const uint8_t* in[18];
      uint8_t* dst[18];
      for (size_t l = 0; l < lanes; ++l) {
        in[l] = pages.data() + (i + l) * kStorePageSize;
        dst[l] = out[i + l].bytes.data();
      }
      kernel(in, dst);
    }
  };
  switch (path) {
    case Path::kEvp:
      break;
    case Path::kShaNi2:
      full_batches(2, mb::ShaNiX2);
      break;
    case Path::kAvx2x8:
      full_batches(8, mb::Avx2X8);
      break;
    case Path::kAvx512x8:
      full_batches(8, mb::Avx512VlX8);
      break;
    case Path::kAvx512x16:
      full_batches(16, mb::Avx512X16);
      break;
    case Path::kAvx512x16ShaNi2:
      full_batches(18, mb::Avx512X16ShaNiX2);
      break;
  }
  const auto rest_pages = pages.subspan(i * kStorePageSize);
  const auto rest_out = out.subspan(i);
  if (path == Path::kEvp) {
    for (size_t k = 0; k < rest_out.size(); ++k)
      rest_out[k] = Hash(rest_pages.subspan(k * kStorePageSize, kStorePageSize));
  } else {
    HashTail(rest_pages, rest_out);
  }
}

uint32_t PageCrc32c(std::span<const uint8_t> data) {
  return HaveSse42() ? Crc32cSse42(data) : Crc32c(data);
}

// ------------------------------------------------------------ file helpers --

namespace {

// crc32c(digest || page): both are contiguous in a record, from byte 8.
uint32_t RecordCrc(const uint8_t* record) { return PageCrc32c({record + 8, 32 + kStorePageSize}); }

Status MakePrivateDir(const std::string& path) {
  if (mkdir(path.c_str(), 0700) != 0 && errno != EEXIST)
    return Fail(Error::Errno(errno, "mkdir " + path));
  struct stat st;
  if (stat(path.c_str(), &st) != 0) return Fail(Error::Errno(errno, "stat " + path));
  if (!S_ISDIR(st.st_mode)) return Fail(Error::Invalid(path + " is not a directory"));
  if ((st.st_mode & 0777) != 0700 && chmod(path.c_str(), 0700) != 0)
    return Fail(Error::Errno(errno, "chmod 0700 " + path));
  return Ok();
}

Status WriteAll(int fd, const uint8_t* p, size_t n, off_t at, const std::string& what) {
  while (n > 0) {
    ssize_t w = pwrite(fd, p, n, at);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Fail(Error::Errno(errno, "write " + what));
    }
    p += w;
    n -= size_t(w);
    at += w;
  }
  return Ok();
}

// Reads up to n bytes; returns how many (short only at end of file).
Result<size_t> ReadAt(int fd, uint8_t* p, size_t n, off_t at, const std::string& what) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = pread(fd, p + got, n - got, at + off_t(got));
    if (r < 0) {
      if (errno == EINTR) continue;
      return Fail(Error::Errno(errno, "read " + what));
    }
    if (r == 0) break;
    got += size_t(r);
  }
  return got;
}

Status FsyncDir(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Fail(Error::Errno(errno, "open " + dir));
  int rc = fsync(fd);
  int e = errno;
  close(fd);
  if (rc != 0) return Fail(Error::Errno(e, "fsync " + dir));
  return Ok();
}

Result<std::vector<std::string>> ListDir(const std::string& dir, std::string_view suffix) {
  DIR* d = opendir(dir.c_str());
  if (!d) return Fail(Error::Errno(errno, "opendir " + dir));
  std::vector<std::string> names;
  while (dirent* e = readdir(d)) {
    std::string_view n = e->d_name;
    if (n.size() > suffix.size() && n.substr(n.size() - suffix.size()) == suffix && n[0] != '.')
      names.emplace_back(n);
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

bool ValidVmName(std::string_view vm) {
  if (vm.empty() || vm.size() > 128 || vm[0] == '.') return false;
  return std::all_of(vm.begin(), vm.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
  });
}

std::vector<uint8_t> EncodeManifest(const Manifest& m) {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.Str(fmt::kManifestMagic);
  w.U32(fmt::kVersion);
  w.U32(0);
  w.U64(m.entries.size());
  for (const auto& e : m.entries) {
    w.U8(uint8_t(e.block.size()));
    w.Str(e.block);
    w.U64(e.offset);
    w.Bytes(e.digest.bytes);
  }
  w.U32(Crc32c(out));
  return out;
}

Result<Manifest> DecodeManifest(std::span<const uint8_t> b, const std::string& what) {
  auto bad = [&](const char* why) { return Fail(Error::Io("manifest " + what + ": " + why)); };
  if (b.size() < fmt::kManifestHeaderSize + 4) return bad("truncated");
  if (LoadBe32(b.data() + b.size() - 4) != Crc32c(b.first(b.size() - 4))) return bad("checksum");
  ByteReader r(b.first(b.size() - 4));
  auto magic = r.Bytes(8);
  if (std::string_view(reinterpret_cast<const char*>(magic->data()), 8) != fmt::kManifestMagic)
    return bad("bad magic");
  if (*r.U32() != fmt::kVersion) return bad("unsupported version");
  r.U32();
  uint64_t count = *r.U64();
  if (count > r.remaining() / (1 + 1 + 8 + 32)) return bad("entry count");
  Manifest m;
  m.entries.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    auto len = r.U8();
    if (!len || *len == 0) return bad("entry");
    auto id = r.Bytes(*len);
    auto off = r.U64();
    auto dig = r.Bytes(32);
    if (!dig) return bad("entry");
    ManifestEntry e;
    e.block.assign(reinterpret_cast<const char*>(id->data()), id->size());
    e.offset = *off;
    std::memcpy(e.digest.bytes.data(), dig->data(), 32);
    m.entries.push_back(std::move(e));
  }
  if (!r.empty()) return bad("trailing bytes");
  return m;
}

}  // namespace

// ------------------------------------------------------------------- store --

struct Segment {
  uint32_t id = 0;
  int fd = -1;
  std::string path;
  uint64_t size = 0;                // bytes, header included
  uint64_t last_use = 0;            // LRU clock
  std::vector<PageDigest> digests;  // records appended (some may be stale)
  ~Segment() {
    if (fd >= 0) close(fd);
  }
};

struct Location {
  std::shared_ptr<Segment> segment;
  uint64_t offset = 0;  // of the record
};

struct PageStore::Impl {
  PageStoreOptions opt;
  std::string seg_dir, man_dir;

  mutable std::mutex mu;
  std::unordered_map<PageDigest, Location, PageDigestHash> index;  // GUARDED_BY(mu)
  std::map<uint32_t, std::shared_ptr<Segment>> segments;           // GUARDED_BY(mu)
  std::shared_ptr<Segment> active;                                 // GUARDED_BY(mu)
  uint64_t clock = 0;                                              // GUARDED_BY(mu)
  uint64_t total_bytes = 0;                                        // GUARDED_BY(mu)
  uint32_t next_id = 1;                                            // GUARDED_BY(mu)
  PageStoreStats st;                                               // GUARDED_BY(mu)
  std::atomic<uint64_t> tmp_counter{0};

  Status ScanSegment(const std::string& name);
  Result<std::shared_ptr<Segment>> NewSegment();                            // REQUIRES: mu held
  Status AppendLocked(const PageDigest& d, std::span<const uint8_t> page);  // REQUIRES: mu
  void EvictLocked();                                                       // REQUIRES: mu
  void DropSegmentLocked(const std::shared_ptr<Segment>& s);                // REQUIRES: mu
  std::string ManifestPath(std::string_view vm) const {
    return man_dir + "/" + std::string(vm) + std::string(fmt::kManifestSuffix);
  }
};

PageStore::PageStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PageStore::~PageStore() = default;

Status PageStore::Impl::ScanSegment(const std::string& name) {
  std::string path = seg_dir + "/" + name;
  unsigned id = 0;
  if (std::sscanf(name.c_str(), "%08x.seg", &id) != 1) return Ok();  // not ours
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return Fail(Error::Errno(errno, "open " + path));
  auto seg = std::make_shared<Segment>();
  seg->id = id;
  seg->fd = fd;
  seg->path = path;
  next_id = std::max(next_id, uint32_t(id) + 1);

  uint8_t hdr[fmt::kSegmentHeaderSize];
  auto got = ReadAt(fd, hdr, sizeof hdr, 0, path);
  if (!got) return Fail(got.error());
  bool header_ok = *got == sizeof hdr && std::memcmp(hdr, fmt::kSegmentMagic.data(), 8) == 0 &&
                   LoadBe32(hdr + 8) == fmt::kVersion && LoadBe32(hdr + 12) == Crc32c({hdr, 12});
  if (!header_ok) {
    // Unusable (torn creation or foreign file): it holds nothing we can trust.
    st.corrupt_records++;
    unlink(path.c_str());
    return Ok();
  }
  struct stat sb;
  if (fstat(fd, &sb) != 0) return Fail(Error::Errno(errno, "fstat " + path));
  uint64_t file_size = uint64_t(sb.st_size);
  uint64_t pos = fmt::kSegmentHeaderSize;
  std::vector<uint8_t> buf(fmt::kRecordSize * 64);
  while (pos + fmt::kRecordSize <= file_size) {
    size_t want = size_t(
        std::min<uint64_t>(buf.size(), (file_size - pos) / fmt::kRecordSize * fmt::kRecordSize));
    auto r = ReadAt(fd, buf.data(), want, off_t(pos), path);
    if (!r) return Fail(r.error());
    if (*r < want) want = *r / fmt::kRecordSize * fmt::kRecordSize;
    if (want == 0) break;
    for (size_t o = 0; o < want; o += fmt::kRecordSize) {
      const uint8_t* rec = buf.data() + o;
      uint64_t at = pos + o;
      if (LoadBe32(rec) != fmt::kRecordMagic || LoadBe32(rec + 4) != RecordCrc(rec)) {
        st.corrupt_records++;  // fixed-size records: skip just this one
        continue;
      }
      PageDigest d;
      std::memcpy(d.bytes.data(), rec + 8, 32);
      seg->digests.push_back(d);
      index.try_emplace(d, Location{seg, at});
    }
    pos += want;
  }
  if (pos != file_size) {
    // A torn append (crash mid-record): cut it off so appends stay aligned.
    st.torn_bytes += file_size - pos;
    if (ftruncate(fd, off_t(pos)) != 0) return Fail(Error::Errno(errno, "truncate " + path));
  }
  seg->size = pos;
  seg->last_use = ++clock;
  total_bytes += seg->size;
  segments[seg->id] = seg;
  return Ok();
}

Result<std::shared_ptr<Segment>> PageStore::Impl::NewSegment() {
  auto seg = std::make_shared<Segment>();
  seg->id = next_id++;
  char name[32];
  std::snprintf(name, sizeof name, "%08x.seg", seg->id);
  seg->path = seg_dir + "/" + name;
  seg->fd = open(seg->path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (seg->fd < 0) return Fail(Error::Errno(errno, "create " + seg->path));
  if (fchmod(seg->fd, 0600) != 0) return Fail(Error::Errno(errno, "chmod " + seg->path));
  uint8_t hdr[fmt::kSegmentHeaderSize];
  std::memcpy(hdr, fmt::kSegmentMagic.data(), 8);
  StoreBe32(hdr + 8, fmt::kVersion);
  StoreBe32(hdr + 12, Crc32c({hdr, 12}));
  if (auto s = WriteAll(seg->fd, hdr, sizeof hdr, 0, seg->path); !s) return Fail(s.error());
  seg->size = sizeof hdr;
  seg->last_use = ++clock;
  total_bytes += seg->size;
  segments[seg->id] = seg;
  return seg;
}

Status PageStore::Impl::AppendLocked(const PageDigest& d, std::span<const uint8_t> page) {
  if (!active ||
      active->size + fmt::kRecordSize >
          std::max<uint64_t>(opt.segment_bytes, fmt::kSegmentHeaderSize + fmt::kRecordSize)) {
    auto seg = NewSegment();
    if (!seg) return Fail(seg.error());
    active = *seg;
  }
  std::vector<uint8_t> rec(fmt::kRecordSize);
  StoreBe32(rec.data(), fmt::kRecordMagic);
  std::memcpy(rec.data() + 8, d.bytes.data(), 32);
  std::memcpy(rec.data() + 40, page.data(), kStorePageSize);
  StoreBe32(rec.data() + 4, RecordCrc(rec.data()));
  // One pwrite per record: a crash leaves at most one torn record at the
  // tail, which Open detects (short length or checksum) and cuts off.
  if (auto s = WriteAll(active->fd, rec.data(), rec.size(), off_t(active->size), active->path);
      !s) {
    // Leave the segment as it is; a partial record there fails its checksum.
    active.reset();
    return s;
  }
  index[d] = Location{active, active->size};
  active->digests.push_back(d);
  active->size += fmt::kRecordSize;
  active->last_use = ++clock;
  total_bytes += fmt::kRecordSize;
  return Ok();
}

void PageStore::Impl::DropSegmentLocked(const std::shared_ptr<Segment>& s) {
  uint64_t dropped = 0;
  for (const auto& d : s->digests) {
    auto it = index.find(d);
    if (it != index.end() && it->second.segment == s) {
      index.erase(it);
      ++dropped;
    }
  }
  st.evicted_pages += dropped;
  unlink(s->path.c_str());  // readers holding `s` keep the open fd
  total_bytes -= s->size;
  segments.erase(s->id);
  if (active == s) active.reset();
}

void PageStore::Impl::EvictLocked() {
  if (opt.quota_bytes == 0) return;
  while (total_bytes > opt.quota_bytes && !segments.empty()) {
    // Least recently used segment; the active one only if it is the last.
    std::shared_ptr<Segment> victim;
    for (auto& [id, s] : segments) {
      if (s == active && segments.size() > 1) continue;
      if (!victim || s->last_use < victim->last_use) victim = s;
    }
    DropSegmentLocked(victim);
    st.evicted_segments++;
  }
}

Result<std::unique_ptr<PageStore>> PageStore::Open(const PageStoreOptions& options) {
  if (options.dir.empty()) return Fail(Error::Invalid("page store directory not set"));
  auto impl = std::make_unique<Impl>();
  impl->opt = options;
  impl->seg_dir = options.dir + "/segments";
  impl->man_dir = options.dir + "/manifests";
  for (const auto& d : {options.dir, impl->seg_dir, impl->man_dir})
    if (auto s = MakePrivateDir(d); !s) return Fail(s.error().Context("opening page store"));
  auto names = ListDir(impl->seg_dir, fmt::kSegmentSuffix);
  if (!names) return Fail(names.error());
  {
    std::lock_guard lock(impl->mu);
    for (const auto& n : *names)
      if (auto s = impl->ScanSegment(n); !s) return Fail(s.error().Context("opening page store"));
    impl->EvictLocked();  // the quota may have shrunk since last time
  }
  return std::unique_ptr<PageStore>(new PageStore(std::move(impl)));
}

Result<PageDigest> PageStore::Put(std::span<const uint8_t> page) {
  if (page.size() != kStorePageSize) return Fail(Error::Invalid("page must be 4096 bytes"));
  thread_local std::optional<PageHasher> hasher;
  if (!hasher) {
    auto h = PageHasher::Create();
    if (!h) return Fail(h.error());
    hasher.emplace(std::move(*h));
  }
  PageDigest d = hasher->Hash(page);  // outside the lock
  std::lock_guard lock(impl_->mu);
  impl_->st.puts++;
  if (auto it = impl_->index.find(d); it != impl_->index.end()) {
    impl_->st.dedup_hits++;
    it->second.segment->last_use = ++impl_->clock;
    return d;
  }
  if (auto s = impl_->AppendLocked(d, page); !s) return Fail(s.error());
  impl_->EvictLocked();
  return d;
}

Result<std::vector<PageDigest>> PageStore::PutMany(std::span<const uint8_t> pages) {
  if (pages.size() % kStorePageSize != 0)
    return Fail(Error::Invalid("PutMany needs whole 4096-byte pages"));
  thread_local std::optional<PageHasher> hasher;
  if (!hasher) {
    auto h = PageHasher::Create();
    if (!h) return Fail(h.error());
    hasher.emplace(std::move(*h));
  }
  std::vector<PageDigest> digests(pages.size() / kStorePageSize);
  hasher->HashMany(pages, digests);  // outside the lock
  std::lock_guard lock(impl_->mu);
  for (size_t i = 0; i < digests.size(); ++i) {
    impl_->st.puts++;
    if (auto it = impl_->index.find(digests[i]); it != impl_->index.end()) {
      impl_->st.dedup_hits++;
      it->second.segment->last_use = ++impl_->clock;
      continue;
    }
    auto page = pages.subspan(i * kStorePageSize, kStorePageSize);
    if (auto s = impl_->AppendLocked(digests[i], page); !s) return Fail(s.error());
    impl_->EvictLocked();
  }
  return digests;
}

Result<bool> PageStore::Get(const PageDigest& digest, std::span<uint8_t> out) {
  if (out.size() != kStorePageSize) return Fail(Error::Invalid("output must be 4096 bytes"));
  Location loc;
  {
    std::lock_guard lock(impl_->mu);
    impl_->st.gets++;
    auto it = impl_->index.find(digest);
    if (it == impl_->index.end()) {
      impl_->st.misses++;
      return false;
    }
    loc = it->second;
    loc.segment->last_use = ++impl_->clock;
  }
  std::vector<uint8_t> rec(fmt::kRecordSize);
  auto got = ReadAt(loc.segment->fd, rec.data(), rec.size(), off_t(loc.offset), loc.segment->path);
  if (!got) return Fail(got.error());
  bool ok = *got == rec.size() && LoadBe32(rec.data()) == fmt::kRecordMagic &&
            std::memcmp(rec.data() + 8, digest.bytes.data(), 32) == 0 &&
            LoadBe32(rec.data() + 4) == RecordCrc(rec.data());
  if (!ok) {
    // Damaged after Open (bit rot, someone else's write): never serve it.
    std::lock_guard lock(impl_->mu);
    auto it = impl_->index.find(digest);
    if (it != impl_->index.end() && it->second.segment == loc.segment &&
        it->second.offset == loc.offset)
      impl_->index.erase(it);
    impl_->st.corrupt_records++;
    impl_->st.misses++;
    return false;
  }
  std::memcpy(out.data(), rec.data() + 40, kStorePageSize);
  return true;
}

bool PageStore::Contains(const PageDigest& digest) const {
  std::lock_guard lock(impl_->mu);
  return impl_->index.count(digest) > 0;
}

Status PageStore::Sync() {
  std::vector<std::shared_ptr<Segment>> segs;
  {
    std::lock_guard lock(impl_->mu);
    for (auto& [id, s] : impl_->segments) segs.push_back(s);
  }
  if (!impl_->opt.fsync) return Ok();
  for (auto& s : segs)
    if (fdatasync(s->fd) != 0) return Fail(Error::Errno(errno, "fdatasync " + s->path));
  return FsyncDir(impl_->seg_dir);
}

Status PageStore::PutManifest(std::string_view vm, const Manifest& manifest) {
  if (!ValidVmName(vm)) return Fail(Error::Invalid("invalid VM name '" + std::string(vm) + "'"));
  for (const auto& e : manifest.entries)
    if (e.block.empty() || e.block.size() > 255)
      return Fail(Error::Invalid("manifest RAMBlock id must be 1..255 bytes"));
  std::vector<uint8_t> bytes = EncodeManifest(manifest);
  std::string final_path = impl_->ManifestPath(vm);
  std::string tmp = impl_->man_dir + "/.tmp-" + std::to_string(getpid()) + "-" +
                    std::to_string(impl_->tmp_counter++);
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return Fail(Error::Errno(errno, "create " + tmp));
  Status s = WriteAll(fd, bytes.data(), bytes.size(), 0, tmp);
  if (s && impl_->opt.fsync && fsync(fd) != 0) s = Fail(Error::Errno(errno, "fsync " + tmp));
  close(fd);
  if (s && rename(tmp.c_str(), final_path.c_str()) != 0)
    s = Fail(Error::Errno(errno, "rename " + tmp));
  if (!s) {
    unlink(tmp.c_str());
    return s;
  }
  return impl_->opt.fsync ? FsyncDir(impl_->man_dir) : Ok();
}

Result<Manifest> PageStore::GetManifest(std::string_view vm) const {
  if (!ValidVmName(vm)) return Fail(Error::Invalid("invalid VM name '" + std::string(vm) + "'"));
  std::string path = impl_->ManifestPath(vm);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Fail(Error::Errno(errno, "open manifest " + path));
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    int e = errno;
    close(fd);
    return Fail(Error::Errno(e, "stat " + path));
  }
  std::vector<uint8_t> bytes(size_t(sb.st_size));
  auto got = ReadAt(fd, bytes.data(), bytes.size(), 0, path);
  close(fd);
  if (!got) return Fail(got.error());
  bytes.resize(*got);
  return DecodeManifest(bytes, path);
}

Result<std::vector<std::string>> PageStore::ListVms() const {
  auto names = ListDir(impl_->man_dir, fmt::kManifestSuffix);
  if (!names) return names;
  for (auto& n : *names) n.resize(n.size() - fmt::kManifestSuffix.size());
  return names;
}

Status PageStore::DeleteVm(std::string_view vm) {
  if (!ValidVmName(vm)) return Fail(Error::Invalid("invalid VM name '" + std::string(vm) + "'"));
  std::string path = impl_->ManifestPath(vm);
  if (unlink(path.c_str()) != 0) return Fail(Error::Errno(errno, "delete manifest " + path));
  return impl_->opt.fsync ? FsyncDir(impl_->man_dir) : Ok();
}

Result<GcResult> PageStore::CollectGarbage() {
  GcResult res;
  // Manifests are read before taking the lock; a manifest written during GC
  // may reference a page GC drops: such a page then reads as missing, which
  // the proxies treat as "send the full page". Documented, not silent.
  auto vms = ListVms();
  if (!vms) return Fail(vms.error());
  std::unordered_set<PageDigest, PageDigestHash> referenced;
  for (const auto& vm : *vms) {
    auto m = GetManifest(vm);
    if (!m) return Fail(m.error().Context("garbage collection"));
    for (const auto& e : m->entries) referenced.insert(e.digest);
  }
  std::lock_guard lock(impl_->mu);
  auto& I = *impl_;
  I.active.reset();  // everything below is written to fresh segments
  std::vector<std::shared_ptr<Segment>> old;
  for (auto& [id, s] : I.segments) old.push_back(s);
  std::vector<uint8_t> rec(fmt::kRecordSize);
  std::vector<std::shared_ptr<Segment>> written;
  for (auto& s : old) {
    bool all_live = true;
    std::vector<PageDigest> keep;
    for (const auto& d : s->digests) {
      auto it = I.index.find(d);
      if (it == I.index.end() || it->second.segment != s) continue;  // stale
      if (referenced.count(d)) {
        keep.push_back(d);
      } else {
        all_live = false;
      }
    }
    if (all_live && keep.size() == s->digests.size()) continue;  // nothing to reclaim
    for (const auto& d : keep) {
      auto loc = I.index[d];
      auto got = ReadAt(s->fd, rec.data(), rec.size(), off_t(loc.offset), s->path);
      if (!got) return Fail(got.error());
      if (*got != rec.size() || LoadBe32(rec.data() + 4) != RecordCrc(rec.data())) {
        I.index.erase(d);
        I.st.corrupt_records++;
        continue;
      }
      if (auto st = I.AppendLocked(d, {rec.data() + 40, kStorePageSize}); !st)
        return Fail(st.error());
      if (std::find(written.begin(), written.end(), I.active) == written.end())
        written.push_back(I.active);
      res.moved_pages++;
    }
    // Durable copies first, then the old segment goes.
    if (I.opt.fsync)
      for (auto& w : written)
        if (fdatasync(w->fd) != 0) return Fail(Error::Errno(errno, "fdatasync " + w->path));
    uint64_t before = I.index.size();
    uint64_t evicted_before = I.st.evicted_pages;
    I.DropSegmentLocked(s);
    I.st.evicted_pages = evicted_before;  // GC drops are not evictions
    res.dropped_pages += before - I.index.size();
    res.removed_segments++;
  }
  res.referenced_pages = 0;
  for (const auto& d : referenced) res.referenced_pages += I.index.count(d);
  return res;
}

PageStoreStats PageStore::stats() const {
  std::lock_guard lock(impl_->mu);
  PageStoreStats s = impl_->st;
  s.pages = impl_->index.size();
  s.bytes = impl_->total_bytes;
  s.segments = impl_->segments.size();
  return s;
}

}  // namespace kagemusha::memcache

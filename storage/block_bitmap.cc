#include "block_bitmap.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <vector>

#include "posix_io.h"

namespace kagemusha::storage {

// --- AtomicBitset ------------------------------------------------------------

AtomicBitset::AtomicBitset(uint64_t nbits)
    : nbits_(nbits), words_(new std::atomic<uint64_t>[(nbits + 63) / 64]) {
  for (uint64_t w = 0; w < words(); ++w) words_[w].store(0, std::memory_order_relaxed);
}

bool AtomicBitset::AllSet(uint64_t first, uint64_t last) const {
  while (first < last) {
    uint64_t w = first / 64;
    uint64_t lo = first % 64;
    uint64_t hi = std::min<uint64_t>(64, lo + (last - first));
    uint64_t mask =
        (hi == 64 ? ~uint64_t(0) : (uint64_t(1) << hi) - 1) & ~((uint64_t(1) << lo) - 1);
    if ((words_[w].load(std::memory_order_acquire) & mask) != mask) return false;
    first += hi - lo;
  }
  return true;
}

uint64_t AtomicBitset::FindClear(uint64_t from) const {
  while (from < nbits_) {
    uint64_t w = from / 64;
    uint64_t v = ~words_[w].load(std::memory_order_acquire) & (~uint64_t(0) << (from % 64));
    if (v != 0) return std::min<uint64_t>(w * 64 + uint64_t(std::countr_zero(v)), nbits_);
    from = (w + 1) * 64;
  }
  return nbits_;
}

uint64_t AtomicBitset::Count() const {
  uint64_t n = 0;
  for (uint64_t w = 0; w < words(); ++w) {
    uint64_t v = words_[w].load(std::memory_order_acquire);
    if (w == words() - 1 && nbits_ % 64) v &= (uint64_t(1) << (nbits_ % 64)) - 1;
    n += uint64_t(std::popcount(v));
  }
  return n;
}

// --- BlockBitmap ---------------------------------------------------------------

namespace {

Result<std::vector<uint8_t>> ReadWholeFile(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Fail(Error::Errno(errno, "stat " + path));
  std::vector<uint8_t> data(size_t(st.st_size));
  if (auto s = posix::PreadFull(fd, std::as_writable_bytes(std::span(data)), 0, path); !s)
    return Fail(s.error());
  return data;
}

// One proxy per cache: a second process (or object) on the same bitmap would
// corrupt both. The lock goes with the file descriptor, so kill -9 drops it.
Status LockExclusive(int fd, const std::string& path) {
  while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EINTR) continue;
    if (errno == EWOULDBLOCK)
      return Fail(Error(EBUSY, path + " is in use by another kagemusha-nbd (or another export "
                                      "in this one); each cache needs its own bitmap"));
    return Fail(Error::Errno(errno, "lock " + path));
  }
  return Ok();
}

}  // namespace

Result<bitmap::Header> BlockBitmap::ReadHeader(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Fail(Error::Errno(errno, "open bitmap " + path));
  std::vector<uint8_t> buf(bitmap::kHeaderSize);
  ssize_t n;
  do {
    n = ::pread(fd, buf.data(), buf.size(), 0);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  ::close(fd);
  if (n < 0) return Fail(Error::Errno(err, "read bitmap " + path));
  buf.resize(size_t(n));
  auto h = bitmap::DecodeHeader(buf);
  if (!h) return Fail(h.error().Context("bitmap " + path));
  return h;
}

Result<std::unique_ptr<BlockBitmap>> BlockBitmap::Open(const std::string& path, uint64_t image_size,
                                                       uint32_t block_size) {
  const auto expected = bitmap::MakeHeader(image_size, block_size);
  const uint64_t file_size = expected.header_size + bitmap::BitArrayBytes(expected.block_count);
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0 && errno != ENOENT) return Fail(Error::Errno(errno, "open bitmap " + path));
  if (fd < 0) {
    // Create atomically: a crash leaves either no bitmap or a complete one.
    if (auto s = bitmap::DecodeHeader(bitmap::EncodeHeader(expected)); !s)
      return Fail(s.error().Context("bitmap geometry"));
    std::string tmp = path + ".tmp";
    int tfd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (tfd < 0) return Fail(Error::Errno(errno, "create bitmap " + tmp));
    auto header = bitmap::EncodeHeader(expected);
    Status s = posix::PwriteFull(tfd, std::as_bytes(std::span(header)), 0, tmp);
    if (s && ::ftruncate(tfd, off_t(file_size)) != 0) s = Fail(Error::Errno(errno, "size " + tmp));
    if (s) s = LockExclusive(tfd, tmp);
    if (s) s = posix::DataSync(tfd, tmp);
    if (s && ::rename(tmp.c_str(), path.c_str()) != 0)
      s = Fail(Error::Errno(errno, "rename " + tmp + " to " + path));
    if (s) s = posix::SyncParentDir(path);
    if (!s) {
      ::close(tfd);
      ::unlink(tmp.c_str());
      return Fail(s.error());
    }
    return std::unique_ptr<BlockBitmap>(new BlockBitmap(path, tfd, expected, true));
  }
  auto fail = [&](Error e) {
    ::close(fd);
    return Fail(e.Context("bitmap " + path));
  };
  if (auto s = LockExclusive(fd, path); !s) return fail(s.error());
  auto data = ReadWholeFile(fd, path);
  if (!data) return fail(data.error());
  auto h = bitmap::DecodeHeader(*data);
  if (!h) return fail(h.error());
  if (auto s = bitmap::CheckMatchesImage(*h, image_size, block_size); !s) return fail(s.error());
  if (data->size() < file_size)
    return fail(Error::Invalid("bit array is truncated (" + std::to_string(data->size()) +
                               " bytes, expected " + std::to_string(file_size) +
                               "). To start over, delete both the cache image and the bitmap."));
  std::unique_ptr<BlockBitmap> bm(new BlockBitmap(path, fd, *h, false));
  uint64_t n = 0;
  for (uint64_t b = 0; b < h->block_count; ++b) {
    if ((*data)[h->header_size + bitmap::ByteOfBlock(b)] & bitmap::MaskOfBlock(b)) {
      bm->bits_.Set(b);
      ++n;
    }
  }
  bm->count_.store(n);
  return bm;
}

BlockBitmap::BlockBitmap(std::string path, int fd, const bitmap::Header& header, bool created)
    : path_(std::move(path)),
      fd_(fd),
      header_(header),
      created_(created),
      bits_(header.block_count),
      sync_(fd_, "bitmap " + path_) {}

BlockBitmap::~BlockBitmap() { ::close(fd_); }

Status BlockBitmap::SetAndWrite(std::span<const uint64_t> blocks) {
  if (blocks.empty()) return Ok();
  std::lock_guard lk(write_mu_);
  // (byte index, new bits in it). Memory is updated only after the file
  // write succeeded, so Test() never reports a bit the file may lack.
  std::vector<std::pair<uint64_t, uint8_t>> adds;
  adds.reserve(blocks.size());
  for (uint64_t b : blocks) {
    if (b >= bits_.size()) return Fail(Error::Invalid("bitmap: block out of range"));
    adds.emplace_back(bitmap::ByteOfBlock(b), bitmap::MaskOfBlock(b));
  }
  std::sort(adds.begin(), adds.end());
  dirty_ = true;  // before any write: the file may hold new bits from here on
  // Coalesce nearby bytes into one write; bytes in between are rewritten with
  // their current value.
  constexpr uint64_t kGap = 512;
  size_t run_begin = 0;
  for (size_t i = 1; i <= adds.size(); ++i) {
    if (i < adds.size() && adds[i].first <= adds[i - 1].first + kGap) continue;
    if (auto s = WriteBytes(std::span(adds).subspan(run_begin, i - run_begin)); !s) return s;
    run_begin = i;
  }
  for (uint64_t b : blocks)
    if (bits_.Set(b)) count_.fetch_add(1, std::memory_order_acq_rel);
  return Ok();
}

Status BlockBitmap::WriteBytes(std::span<const std::pair<uint64_t, uint8_t>> adds) {
  const uint64_t first_byte = adds.front().first;
  const uint64_t last_byte = adds.back().first + 1;
  std::vector<std::byte> out(last_byte - first_byte);
  for (uint64_t k = first_byte; k < last_byte; ++k)
    out[k - first_byte] = std::byte((bits_.Word(k / 8) >> (8 * (k % 8))) & 0xff);
  for (auto [k, mask] : adds) out[k - first_byte] |= std::byte(mask);
  return posix::PwriteFull(fd_, out, header_.header_size + first_byte, "bitmap " + path_);
}

Status BlockBitmap::Sync() {
  std::lock_guard lk(write_mu_);
  if (!dirty_) return Ok();
  Status s = sync_.Sync();
  if (s) dirty_ = false;
  return s;
}

}  // namespace kagemusha::storage

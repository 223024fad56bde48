// BlockBitmap: the persisted "which blocks of the image are in the cache"
// bitmap of CopyOnReadBackend, in the file format of bitmap_format.h
// (docs/bitmap-format.md). AtomicBitset is its lock-free in-memory bit array,
// also used by CopyOnReadBackend for the "present" set that reads test.
//
// BlockBitmap only knows bits and bytes; the ordering that makes it crash
// safe (cache data synced before bits are written) is the caller's job.
//
// Thread-safety: AtomicBitset tests and sets are lock-free and may race
// freely. BlockBitmap::Test/Count are lock-free; SetAndWrite/Sync lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>

#include "bitmap_format.h"
#include "kagemusha/common/error.h"
#include "posix_io.h"

namespace kagemusha::storage {

class AtomicBitset {
 public:
  explicit AtomicBitset(uint64_t nbits);
  uint64_t size() const { return nbits_; }
  bool Test(uint64_t i) const {
    return (words_[i / 64].load(std::memory_order_acquire) >> (i % 64)) & 1;
  }
  // Returns true if the bit was clear before.
  bool Set(uint64_t i) {
    uint64_t m = uint64_t(1) << (i % 64);
    return !(words_[i / 64].fetch_or(m, std::memory_order_acq_rel) & m);
  }
  // True if every bit in [first, last) is set.
  bool AllSet(uint64_t first, uint64_t last) const;
  // First clear bit in [from, size()), or size() if none.
  uint64_t FindClear(uint64_t from) const;
  uint64_t Count() const;
  uint64_t Word(uint64_t w) const { return words_[w].load(std::memory_order_acquire); }
  uint64_t words() const { return (nbits_ + 63) / 64; }

 private:
  uint64_t nbits_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

class BlockBitmap {
 public:
  // Opens `path`, validating its header against the image (a mismatch is an
  // error telling the operator what to do), or creates it with every bit
  // clear if it does not exist. Creation is atomic (temp file + rename).
  static Result<std::unique_ptr<BlockBitmap>> Open(const std::string& path, uint64_t image_size,
                                                   uint32_t block_size);
  // Reads and validates only the header (to learn the geometry).
  static Result<bitmap::Header> ReadHeader(const std::string& path);
  ~BlockBitmap();

  bool created() const { return created_; }  // true if Open made a new file
  uint64_t blocks() const { return bits_.size(); }
  uint32_t block_size() const { return header_.block_size; }
  uint64_t image_size() const { return header_.image_size; }
  const std::string& path() const { return path_; }
  bool Test(uint64_t block) const { return bits_.Test(block); }
  uint64_t Count() const { return count_.load(std::memory_order_acquire); }
  const AtomicBitset& bits() const { return bits_; }

  // Sets the bits of `blocks` and writes the bytes holding them to the file
  // (to the page cache: it survives kill -9, not power loss, until Sync()).
  // The in-memory bits (Test) are set only once the write succeeded; on
  // failure the file may hold some of the new bits and memory none.
  Status SetAndWrite(std::span<const uint64_t> blocks);
  // fdatasync of the bitmap file, skipped when no bit was written since the
  // last successful one. Any bit Test() reports is on stable storage once a
  // Sync() that started after Test() saw it returns Ok. After one fdatasync
  // fails, every later Sync fails (posix::StickySync).
  Status Sync();

 private:
  BlockBitmap(std::string path, int fd, const bitmap::Header& header, bool created);
  // Writes the bytes spanned by `adds` (sorted): current bits plus the new ones.
  Status WriteBytes(std::span<const std::pair<uint64_t, uint8_t>> adds);

  const std::string path_;
  const int fd_;
  const bitmap::Header header_;
  const bool created_;
  AtomicBitset bits_;
  std::atomic<uint64_t> count_{0};
  std::mutex write_mu_;  // serialises SetAndWrite so the bytes written are consistent
  // Bits written (or possibly written) since the last successful Sync.
  // GUARDED_BY(write_mu_): set before the in-memory bits and cleared only by
  // a Sync that holds the lock across its fdatasync, so no Sync can skip
  // bits that Test() already reports.
  bool dirty_ = false;
  posix::StickySync sync_;
};

}  // namespace kagemusha::storage

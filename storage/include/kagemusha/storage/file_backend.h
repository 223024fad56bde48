// FileBackend: serves an image file or a block device. It is the target-mode
// backend and the cache image under CopyOnReadBackend.
//
// All I/O is positional (pread/pwrite) on one shared file descriptor, so the
// object can be shared by every connection: a flush (fdatasync) on any of
// them covers writes from all of them, hence can_multi_conn.
//   Flush   fdatasync, final once it failed (posix::StickySync); concurrent
//           flushes share one
//   FUA     pwrite, then the same sync as Flush
//   Trim    fallocate(PUNCH_HOLE|KEEP_SIZE); advisory, a no-op if unsupported
//   Zero    fallocate(PUNCH_HOLE) if may_trim, else ZERO_RANGE; falls back to
//           writing zeroes unless `fast`, which fails with ENOTSUP instead
//   Extents SEEK_DATA/SEEK_HOLE (holes are reported hole+zero)
//   FileRangeFor  the image's own descriptor and offset (zero-copy reads)
// Errors carry the errno of the failing call (ENOSPC stays ENOSPC).
//
// Thread-safety: all methods are safe to call concurrently.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "kagemusha/storage/backend.h"

namespace kagemusha::storage {

namespace posix {
class StickySync;
}

struct FileBackendOptions {
  bool read_only = false;
  // Create a regular file if `path` does not exist, sized (sparse) to
  // create_size. An existing file is opened as it is.
  bool create = false;
  uint64_t create_size = 0;
  // Test seam: replaces fdatasync of the file (Flush).
  std::function<Status(int fd)> sync_for_test = nullptr;
};

class FileBackend final : public Backend {
 public:
  static Result<std::unique_ptr<FileBackend>> Open(const std::string& path,
                                                   const FileBackendOptions& options = {});
  ~FileBackend() override;
  FileBackend(const FileBackend&) = delete;
  FileBackend& operator=(const FileBackend&) = delete;

  uint64_t Size() const override { return size_; }
  BackendCaps Caps() const override;
  std::string Describe() const override;

  Status Read(std::span<std::byte> buf, uint64_t offset) override;
  Status Write(std::span<const std::byte> buf, uint64_t offset, bool fua) override;
  // fdatasync; after one fails, every later Flush fails too (see
  // posix::StickySync): the failed writeback may have lost acknowledged data.
  Status Flush() override;
  Status Trim(uint64_t offset, uint64_t length, bool fua) override;
  Status Zero(uint64_t offset, uint64_t length, bool may_trim, bool fast, bool fua) override;
  // A plain file has no cache layer below it: nothing to do.
  Status Cache(uint64_t offset, uint64_t length) override;
  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) override;
  // The image itself: the server may splice reads from the page cache.
  std::optional<FileRange> FileRangeFor(uint64_t offset, uint64_t length) override;

  const std::string& path() const { return path_; }
  int fd() const { return fd_; }  // open for the backend's lifetime
  bool is_block_device() const { return block_device_; }

  // Extents() reports at most this many runs per call (the rest is left to
  // the next call, as base:allocation allows).
  static constexpr size_t kMaxExtentsPerCall = 4096;

 private:
  FileBackend(std::string path, int fd, uint64_t size, bool read_only, bool block_device,
              std::function<Status(int fd)> sync_for_test);
  Status WriteZeroes(uint64_t offset, uint64_t length);

  const std::string path_;
  const int fd_;
  const uint64_t size_;
  const bool read_only_;
  const bool block_device_;
  std::unique_ptr<posix::StickySync> sync_;
};

}  // namespace kagemusha::storage

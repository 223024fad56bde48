// Small POSIX I/O helpers shared by FileBackend and BlockBitmap: full-length
// pread/pwrite loops that retry EINTR and short transfers, turning errno into
// kagemusha::Error.
//
// Thread-safety: stateless; safe on a shared fd (positional I/O only).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <span>
#include <string>

#include "kagemusha/common/error.h"

namespace kagemusha::storage::posix {

// Reads exactly buf.size() bytes; a read past end of file fills zeroes
// (a sparse image shorter than its nominal size reads as zeroes).
Status PreadFull(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& what);
// Writes exactly buf.size() bytes (FUA is a write plus StickySync::Sync).
Status PwriteFull(int fd, std::span<const std::byte> buf, uint64_t offset, const std::string& what);
Status DataSync(int fd, const std::string& what);

// fdatasync of one file whose first failure is final. Linux reports a
// writeback error once per open file and marks the failed pages clean, so a
// later fdatasync that succeeds says nothing about data written before the
// failure: a flush after it must not be acknowledged, nor a bitmap bit
// written on its strength. One fdatasync runs at a time (two at once could
// split one error between them: one fails, the other sees success), and
// callers coalesce: one arriving while a sync runs waits for the next one,
// which covers every caller that arrived before it started.
//
// Thread-safety: Sync() from any thread.
class StickySync {
 public:
  using SyncFn = std::function<Status(int fd)>;  // a test seam; default DataSync
  StickySync(int fd, std::string what, SyncFn sync = nullptr);
  Status Sync();
  bool failed() const;

 private:
  const int fd_;
  const std::string what_;
  const SyncFn sync_;
  mutable std::mutex mu_;
  std::condition_variable done_cv_;
  std::optional<Error> failed_;  // GUARDED_BY(mu_)
  uint64_t requested_ = 0;       // callers so far; GUARDED_BY(mu_)
  uint64_t covered_ = 0;         // callers a finished sync covered; GUARDED_BY(mu_)
  bool syncing_ = false;         // GUARDED_BY(mu_)
};
// fsync of the directory holding path, so a create/rename is durable.
Status SyncParentDir(const std::string& path);

}  // namespace kagemusha::storage::posix

// Small POSIX I/O helpers shared by FileBackend and BlockBitmap: full-length
// pread/pwrite loops that retry EINTR and short transfers, turning errno into
// kagemusha::Error.
//
// Thread-safety: stateless; safe on a shared fd (positional I/O only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "kagemusha/common/error.h"

namespace kagemusha::storage::posix {

// Reads exactly buf.size() bytes; a read past end of file fills zeroes
// (a sparse image shorter than its nominal size reads as zeroes).
Status PreadFull(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& what);
// Writes exactly buf.size() bytes. dsync: RWF_DSYNC per write (FUA), falling
// back to pwrite + fdatasync where pwritev2 flags are unsupported.
Status PwriteFull(int fd, std::span<const std::byte> buf, uint64_t offset, const std::string& what,
                  bool dsync = false);
Status DataSync(int fd, const std::string& what);
// fsync of the directory holding path, so a create/rename is durable.
Status SyncParentDir(const std::string& path);

}  // namespace kagemusha::storage::posix

// The remote side of a copy-on-read proxy: something that can read byte
// ranges of a remote export. NbdClient implements it over a real NBD
// connection; unit tests use a fake that answers out of order and fails on
// demand.
//
// Thread-safety: Read may be called from many threads at once. An
// implementation pipelines concurrent calls (many requests in flight on one
// connection) so that N concurrent callers keep N requests outstanding.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "kagemusha/common/error.h"

namespace kagemusha::storage {

// Whose fault a failed ReadToFile was: the remote's (unreachable, an error
// reply, a client closed or asked for a range it cannot serve) or the local
// file's (a write to it failed: full disk, I/O error, file size limit).
enum class ReadToFileFault { kRemote, kFile };

class RemoteReader {
 public:
  virtual ~RemoteReader() = default;
  virtual uint64_t Size() const = 0;
  virtual std::string Describe() const = 0;
  // Reads exactly buf.size() bytes at offset. While the remote is unreachable
  // the call waits (the implementation reconnects with back-off) for at most
  // the implementation's configured bound, then fails with ETIMEDOUT.
  virtual Status Read(std::span<std::byte> buf, uint64_t offset) = 0;
  // Reads exactly `length` bytes at `offset` and writes them to the open
  // file `fd` at `file_offset` (as pwrite: the file position is unused).
  // Waits and fails as Read does; a failed write to the file fails the call
  // with that error (ENOSPC, EIO), and then the file range holds some of
  // the bytes (pieces may be received in parallel), or none. The default reads into a buffer and
  // writes it; NbdClient receives the payload straight into the file (splice), so the bytes cross
  // no user-space buffer. On failure `*fault` (if not null) says whose it was; an errno cannot
  // tell (a remote may answer ENOSPC or EIO as well as a disk can).
  virtual Status ReadToFile(int fd, uint64_t file_offset, uint64_t length, uint64_t offset,
                            ReadToFileFault* fault);
  Status ReadToFile(int fd, uint64_t file_offset, uint64_t length, uint64_t offset) {
    return ReadToFile(fd, file_offset, length, offset, nullptr);
  }
  // Drops the current connection and reconnects now (operator `reconnect`).
  virtual Status Reconnect() = 0;
  // True while a connection is established.
  virtual bool Connected() const = 0;
  // Stops all I/O; pending and later reads fail with ESHUTDOWN.
  virtual void Close() = 0;
};

}  // namespace kagemusha::storage

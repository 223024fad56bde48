// The storage backend chain.
//
// A Backend is what the NBD server serves: a byte-addressed block device with
// the operations NBD can ask for. Backends form a chain, like nbdkit's
// filters: FileBackend serves an image file or block device, NbdClient (see
// remote.h) reads a remote NBD export, and CopyOnReadBackend layers a local
// cache image plus a block bitmap over a remote. The protocol server
// (nbd_server.h) sits apart and only calls this interface.
//
// Thread-safety: every method may be called concurrently from many threads
// (the server runs requests from all connections on a worker pool). Calls
// block until the operation is done; they never throw.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kagemusha/common/error.h"

namespace kagemusha::storage {

// One run of base:allocation state, as NBD_CMD_BLOCK_STATUS reports it.
struct Extent {
  uint64_t length = 0;
  bool hole = false;  // NBD_STATE_HOLE: no storage allocated
  bool zero = false;  // NBD_STATE_ZERO: reads as zeroes
  bool operator==(const Extent&) const = default;
};

struct BackendCaps {
  bool read_only = false;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = true;
  bool can_zero = true;
  bool can_fast_zero = true;  // zero() with fast=true either is fast or fails ENOTSUP
  bool can_cache = true;
  bool can_extents = true;
  // True only if a flush on any connection makes writes from every connection
  // durable and visible to all (NBD_FLAG_CAN_MULTI_CONN).
  bool can_multi_conn = false;
  bool rotational = false;
};

// Where a backend's bytes are stored in a file, for zero-copy reads (see
// Backend::FileRangeFor).
struct FileRange {
  int fd = -1;          // owned by the backend, open for its lifetime
  uint64_t offset = 0;  // file offset of the backend's first requested byte
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual uint64_t Size() const = 0;
  virtual BackendCaps Caps() const = 0;
  // Short human description for NBD_INFO_DESCRIPTION and `status`.
  virtual std::string Describe() const = 0;

  // REQUIRES: offset + buf.size() <= Size() (the server checks bounds).
  virtual Status Read(std::span<std::byte> buf, uint64_t offset) = 0;
  virtual Status Write(std::span<const std::byte> buf, uint64_t offset, bool fua) = 0;
  virtual Status Flush() = 0;
  virtual Status Trim(uint64_t offset, uint64_t length, bool fua) = 0;
  // may_trim: NBD_CMD_WRITE_ZEROES without NO_HOLE. fast: NBD_CMD_FLAG_FAST_ZERO
  // (return ENOTSUP rather than writing zeroes slowly).
  virtual Status Zero(uint64_t offset, uint64_t length, bool may_trim, bool fast, bool fua) = 0;
  // NBD_CMD_CACHE: bring the range into the local cache if there is one.
  virtual Status Cache(uint64_t offset, uint64_t length) = 0;
  // base:allocation extents covering at least [offset, offset+1) and at most
  // [offset, offset+length). Lengths sum to <= length.
  virtual Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) = 0;

  // Optional, for zero-copy reads. A backend whose bytes [offset,
  // offset+length) are, at the time of the call, bytes [range.offset,
  // range.offset+length) of an open file that only this process's Write,
  // Trim and Zero change (through the same page cache), returns that range;
  // the server may then splice() the pages into the socket instead of
  // calling Read(). Bytes past the file's end must read as zeroes, as Read()
  // does (the server falls back to Read() on a short splice). nullopt: use
  // Read() (the default, so backends that do not know a file keep working
  // unchanged). REQUIRES: offset + length <= Size(). It must not block: the
  // server calls it on a session's reader to decide whether a large read may
  // run there, and a range it names must then be servable without a fetch.
  virtual std::optional<FileRange> FileRangeFor(uint64_t offset, uint64_t length) {
    (void)offset;
    (void)length;
    return std::nullopt;
  }
  // Optional, for zero-copy reads of data the backend must first bring into
  // its file: like FileRangeFor, but may do that work first (a copy-on-read
  // proxy fetches missing blocks from its remote straight into its cache
  // file). An error is the read's error; nullopt: use Read(). The default is
  // FileRangeFor.
  virtual Result<std::optional<FileRange>> PrepareFileRange(uint64_t offset, uint64_t length) {
    return FileRangeFor(offset, length);
  }
};

}  // namespace kagemusha::storage

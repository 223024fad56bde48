// CopyOnReadBackend: the proxy mode of kagemusha-nbd (xNBD-style storage
// relocation). A local cache image plus a persisted block bitmap sit over a
// RemoteReader. Reads of blocks not yet present fetch them from the remote,
// store them in the cache and answer; a background fill copies the rest; once
// every block is present the backend can switch to target mode, after which
// it never touches the remote again. Clients stay connected throughout: the
// switch is a change of state inside this object, not a new server.
//
// Crash safety (see docs/bitmap-format.md): a block's bit reaches the bitmap
// file only after its data has been written to the cache image (and, for
// power-loss safety, synced), and a client write is acknowledged only after
// the bits it depends on are in the bitmap file. After kill -9 at any moment
// the bitmap never claims a block whose data is missing, and no acknowledged
// write is lost.
//
// Thread-safety: all methods are safe to call concurrently.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "kagemusha/common/clock.h"
#include "kagemusha/storage/backend.h"
#include "kagemusha/storage/remote.h"

namespace kagemusha::storage {

struct CopyOnReadOptions {
  std::string cache_path;           // local cache image; created (sparse) if missing
  std::string bitmap_path;          // bitmap file; created if missing, validated if present
  uint32_t block_size = 64 * 1024;  // power of two, >= 4096
  // Background fill.
  bool fill_on_start = true;
  uint64_t fill_rate_limit = 0;     // bytes/s, 0 = unlimited
  uint32_t fill_chunk_blocks = 16;  // blocks per remote request
  uint32_t fill_window = 8;         // remote requests in flight during fill
  bool auto_switch = false;         // switch to target when the fill completes
  // Write-behind of client misses: a client read gets its reply once the
  // fetched data is in its buffer; one cache-writer thread stores the data
  // and only then marks the blocks present (they stay claimed till then).
  // At most this many bytes wait for the writer; when the queue is full a
  // miss waits for room, and a run larger than the whole queue is stored
  // inline by the thread that fetched it. 0 = always inline.
  uint64_t write_behind_bytes = 64 * 1024 * 1024;
  // Test seam: runs on the cache writer before each write-behind store.
  std::function<void()> before_write_behind_store_for_test;
  // Test seam: replaces fdatasync of the cache image (FileBackendOptions).
  std::function<Status(int fd)> cache_sync_for_test;
};

struct FillStatus {
  std::string mode;  // "proxy" or "target"
  bool fill_running = false;
  bool complete = false;  // every block present
  bool remote_connected = false;
  uint64_t blocks_total = 0;
  uint64_t blocks_present = 0;
  // Present blocks whose bits are written to the bitmap file, after their
  // data was synced: a restart after the proxy process dies keeps them (a
  // power loss keeps at least those committed before the last completed
  // flush). Normally trails blocks_present by one group commit (500 ms or a
  // batch of 1024 blocks); longer while commits fail (see last_error).
  uint64_t blocks_committed = 0;
  uint32_t block_size = 0;
  uint64_t bytes_fetched = 0;  // from the remote since start, fill + on-demand
  uint64_t bytes_fetched_fill = 0;
  double rate = 0;  // recent fetch rate, bytes/s
  std::optional<double> eta_seconds;
  uint64_t rate_limit = 0;  // bytes/s, 0 = unlimited
  std::string last_error;   // last remote error, for the operator
};

class CopyOnReadBackend : public Backend {
 public:
  static Result<std::shared_ptr<CopyOnReadBackend>> Open(std::unique_ptr<RemoteReader> remote,
                                                         const CopyOnReadOptions& options);
  // As above, with the clock that drives the fill rate limit, back-off and
  // progress figures (tests pass a FakeClock). `clock` must outlive the backend.
  // `remote` may be null only if the bitmap says every block is present; the
  // backend then opens straight in target mode (restart after a switch).
  static Result<std::shared_ptr<CopyOnReadBackend>> Open(std::unique_ptr<RemoteReader> remote,
                                                         const CopyOnReadOptions& options,
                                                         Clock& clock);
  ~CopyOnReadBackend() override = default;

  virtual void StartFill() = 0;
  virtual void StopFill() = 0;
  virtual void SetFillRate(uint64_t bytes_per_second) = 0;  // 0 = unlimited
  virtual FillStatus Status() const = 0;
  // Switches to target mode. Fails with EAGAIN while blocks are missing.
  // In-flight requests finish; later ones are served from the cache alone.
  virtual kagemusha::Status SwitchToTarget() = 0;
  virtual kagemusha::Status ReconnectRemote() = 0;
};

}  // namespace kagemusha::storage

// MemoryBackend: a sparse in-memory Backend for unit tests of the NBD server.
// Storage is tracked in 4 KiB blocks; trimmed or never-written blocks are
// holes that read as zeroes and are reported as hole+zero extents. Tests can
// make it slow (a hook runs before every read) or fail (next error code).
//
// Thread-safety: all methods may be called concurrently.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#include "kagemusha/storage/backend.h"

namespace kagemusha::storage {

class MemoryBackend : public Backend {
 public:
  static constexpr uint64_t kBlock = 4096;

  explicit MemoryBackend(uint64_t size, BackendCaps caps = {})
      : size_(size), caps_(caps), data_(size), allocated_((size + kBlock - 1) / kBlock, false) {}

  // Runs before each Read, outside the lock (e.g. to sleep for some offsets).
  std::function<void(uint64_t offset, size_t length)> before_read;
  // If non-zero, the next data call fails with this errno.
  std::atomic<int> fail_next{0};
  std::atomic<int> reads{0}, writes{0}, flushes{0}, trims{0}, zeroes{0}, caches{0}, extents{0};

  uint64_t Size() const override { return size_; }
  BackendCaps Caps() const override { return caps_; }
  std::string Describe() const override { return "memory"; }

  Status Read(std::span<std::byte> buf, uint64_t offset) override {
    reads++;
    if (before_read) before_read(offset, buf.size());
    if (int e = fail_next.exchange(0)) return Fail(Error::Errno(e, "injected"));
    std::lock_guard lock(mu_);
    std::memcpy(buf.data(), data_.data() + offset, buf.size());
    return Ok();
  }
  Status Write(std::span<const std::byte> buf, uint64_t offset, bool) override {
    writes++;
    if (int e = fail_next.exchange(0)) return Fail(Error::Errno(e, "injected"));
    std::lock_guard lock(mu_);
    std::memcpy(data_.data() + offset, buf.data(), buf.size());
    Allocate(offset, buf.size());
    return Ok();
  }
  Status Flush() override {
    flushes++;
    return Ok();
  }
  Status Trim(uint64_t offset, uint64_t length, bool) override {
    trims++;
    std::lock_guard lock(mu_);
    Punch(offset, length);
    return Ok();
  }
  Status Zero(uint64_t offset, uint64_t length, bool may_trim, bool fast, bool) override {
    zeroes++;
    if (fast && !may_trim) return Fail(Error::NotSupported("slow zero"));
    std::lock_guard lock(mu_);
    if (may_trim) {
      Punch(offset, length);
    } else {
      std::memset(data_.data() + offset, 0, length);
      Allocate(offset, length);
    }
    return Ok();
  }
  Status Cache(uint64_t, uint64_t) override {
    caches++;
    return Ok();
  }
  Result<std::vector<Extent>> Extents(uint64_t offset, uint64_t length) override {
    extents++;
    std::lock_guard lock(mu_);
    std::vector<Extent> out;
    uint64_t pos = offset, end = offset + length;
    while (pos < end) {
      bool alloc = allocated_[pos / kBlock];
      uint64_t next = std::min(end, (pos / kBlock + 1) * kBlock);
      if (!out.empty() && out.back().hole == !alloc) {
        out.back().length += next - pos;
      } else {
        out.push_back({next - pos, !alloc, !alloc});
      }
      pos = next;
    }
    return out;
  }

  // Test access to contents.
  std::vector<std::byte> Contents(uint64_t offset, size_t length) {
    std::lock_guard lock(mu_);
    return {data_.begin() + offset, data_.begin() + offset + length};
  }

 private:
  void Allocate(uint64_t offset, uint64_t length) {
    if (length == 0) return;
    for (uint64_t b = offset / kBlock; b <= (offset + length - 1) / kBlock; ++b) allocated_[b] = true;
  }
  // Zeroes the range; whole blocks inside it become holes.
  void Punch(uint64_t offset, uint64_t length) {
    std::memset(data_.data() + offset, 0, length);
    uint64_t first = (offset + kBlock - 1) / kBlock, last = (offset + length) / kBlock;
    for (uint64_t b = first; b < last; ++b) allocated_[b] = false;
  }

  const uint64_t size_;
  const BackendCaps caps_;
  std::mutex mu_;
  std::vector<std::byte> data_;
  std::vector<bool> allocated_;
};

}  // namespace kagemusha::storage

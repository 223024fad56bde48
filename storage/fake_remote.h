// FakeRemote: a test-only RemoteReader over an in-memory image. It can delay
// replies (randomly, so concurrent requests complete out of order), count the
// requests that touch each block, hold every read until released, and fail on
// demand (disconnected: reads fail with ETIMEDOUT as NbdClient's bounded wait
// would; error: EIO). The image is shared with the test so it can check what
// the backend stored against what the remote holds.
//
// Thread-safety: every method locks internally; Read runs concurrently.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kagemusha/storage/remote.h"

namespace kagemusha::storage {

class FakeRemote final : public RemoteReader {
 public:
  // kNoSpace: the remote answers ENOSPC, an errno a full local disk gives too.
  enum class Failure { kNone, kDisconnected, kIoError, kNoSpace };

  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<std::byte> image;
    uint32_t count_block_size = 4096;
    std::map<uint64_t, uint32_t> reads_per_block;  // block index -> requests touching it
    uint64_t requests = 0;
    uint64_t bytes = 0;
    uint32_t in_flight = 0;
    uint32_t max_in_flight = 0;
    std::vector<std::pair<uint64_t, uint64_t>> request_log;  // offset, length
    Failure failure = Failure::kNone;
    bool held = false;         // reads wait while true
    uint32_t waiting = 0;      // reads currently held
    uint32_t max_waiting = 0;  // most reads ever held at once
    bool closed = false;
    std::chrono::microseconds delay{0};   // fixed part of every reply
    std::chrono::microseconds jitter{0};  // random extra, to reorder replies
    std::mt19937 rng{12345};
  };

  // A remote holding `image`; per-block counts use count_block_size.
  explicit FakeRemote(std::vector<std::byte> image, uint32_t count_block_size = 4096)
      : s_(std::make_shared<Shared>()) {
    s_->image = std::move(image);
    s_->count_block_size = count_block_size;
  }
  // The state, shared with the test after the backend takes ownership.
  std::shared_ptr<Shared> shared() const { return s_; }

  // Deterministic pseudo-random image content.
  static std::vector<std::byte> PatternImage(uint64_t size, uint32_t seed = 1) {
    std::vector<std::byte> img(size);
    uint64_t x = 0x9E3779B97F4A7C15ULL * (seed + 1);
    for (uint64_t i = 0; i < size; i += 8) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      std::memcpy(img.data() + i, &x, std::min<uint64_t>(8, size - i));
    }
    return img;
  }

  // Test controls (static helpers over the shared state).
  static void Hold(Shared& s) {
    std::lock_guard lk(s.mu);
    s.held = true;
  }
  static void Release(Shared& s) {
    std::lock_guard lk(s.mu);
    s.held = false;
    s.cv.notify_all();
  }
  static void SetFailure(Shared& s, Failure f) {
    std::lock_guard lk(s.mu);
    s.failure = f;
    s.cv.notify_all();
  }
  // Waits until at least n reads are held (or timeout); true on success.
  static bool WaitHeld(Shared& s, uint32_t n, std::chrono::milliseconds timeout) {
    std::unique_lock lk(s.mu);
    return s.cv.wait_for(lk, timeout, [&] { return s.waiting >= n; });
  }
  static uint32_t ReadsOfBlock(Shared& s, uint64_t block) {
    std::lock_guard lk(s.mu);
    auto it = s.reads_per_block.find(block);
    return it == s.reads_per_block.end() ? 0 : it->second;
  }

  uint64_t Size() const override {
    std::lock_guard lk(s_->mu);
    return s_->image.size();
  }
  std::string Describe() const override { return "fake remote"; }

  Status Read(std::span<std::byte> buf, uint64_t offset) override {
    std::chrono::microseconds sleep{0};
    {
      std::unique_lock lk(s_->mu);
      if (s_->closed) return Fail(Error::Shutdown("fake remote closed"));
      ++s_->waiting;
      s_->max_waiting = std::max(s_->max_waiting, s_->waiting);
      s_->cv.notify_all();
      s_->cv.wait(lk, [&] { return !s_->held || s_->closed; });
      --s_->waiting;
      if (s_->closed) return Fail(Error::Shutdown("fake remote closed"));
      if (auto st = FailureStatus(); !st) return st;
      if (offset + buf.size() > s_->image.size())
        return Fail(Error::Invalid("fake remote: read past end"));
      ++s_->requests;
      s_->bytes += buf.size();
      s_->request_log.emplace_back(offset, buf.size());
      for (uint64_t b = offset / s_->count_block_size;
           b * s_->count_block_size < offset + buf.size(); ++b)
        ++s_->reads_per_block[b];
      ++s_->in_flight;
      s_->max_in_flight = std::max(s_->max_in_flight, s_->in_flight);
      sleep = s_->delay;
      if (s_->jitter.count() > 0)
        sleep += std::chrono::microseconds(s_->rng() % uint64_t(s_->jitter.count()));
    }
    if (sleep.count() > 0) std::this_thread::sleep_for(sleep);
    std::lock_guard lk(s_->mu);
    --s_->in_flight;
    if (auto st = FailureStatus(); !st) return st;  // lost while "on the wire"
    std::memcpy(buf.data(), s_->image.data() + offset, buf.size());
    return Ok();
  }

  Status Reconnect() override {
    std::lock_guard lk(s_->mu);
    if (s_->failure == Failure::kDisconnected)
      return Fail(Error::Timeout("fake remote unreachable"));
    return Ok();
  }
  bool Connected() const override {
    std::lock_guard lk(s_->mu);
    return !s_->closed && s_->failure != Failure::kDisconnected;
  }
  void Close() override {
    std::lock_guard lk(s_->mu);
    s_->closed = true;
    s_->cv.notify_all();
  }

 private:
  Status FailureStatus() const {  // REQUIRES: s_->mu held
    switch (s_->failure) {
      case Failure::kDisconnected:
        return Fail(Error::Timeout("fake remote: disconnected"));
      case Failure::kIoError:
        return Fail(Error::Io("fake remote: read error"));
      case Failure::kNoSpace:
        return Fail(Error::NoSpace("fake remote: read error (no space on the remote's disk)"));
      case Failure::kNone:
        break;
    }
    return Ok();
  }
  std::shared_ptr<Shared> s_;
};

}  // namespace kagemusha::storage

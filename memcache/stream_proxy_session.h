// Private helpers shared by the encoder and decoder sessions (encoder.cc,
// decoder.cc): the END figures both sides accumulate, the manifest both sides
// learn, and a mutex-guarded WAN writer (the forward thread and the relay
// thread both send frames).
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kagemusha/common/coding.h"
#include "kagemusha/memcache/page_store.h"
#include "kagemusha/memcache/reuse_protocol.h"
#include "kagemusha/memcache/stream_proxy.h"

namespace kagemusha::memcache::detail {

// What END carries: counters, a CRC-32C over passthrough bytes, and a
// SHA-256 over every page record delivered, in order, naming where it goes:
//   'P' | u8 len | block | be64 offset | digest[32]   (PAGE)
//   'Z' | u8 len | block | be64 offset | u8 fill      (ZERO)
// so a page's content, its place and a zero page's fill are all covered.
class EndAccumulator {
 public:
  EndAccumulator();
  ~EndAccumulator();
  EndAccumulator(const EndAccumulator&) = delete;
  EndAccumulator& operator=(const EndAccumulator&) = delete;
  void Page(std::string_view block, uint64_t offset, const PageDigest& d);
  void Zero(std::string_view block, uint64_t offset, uint8_t fill);
  void Passthrough(std::span<const uint8_t> b) {
    passthrough_bytes_ += b.size();
    crc_ = Crc32c(b, crc_);
  }
  // The figures so far (does not disturb the running digest).
  reuse::EndFigures Figures() const;

 private:
  void Place(char kind, std::string_view block, uint64_t offset);
  void* ctx_;  // EVP_MD_CTX*
  uint64_t pages_ = 0, zero_pages_ = 0, passthrough_bytes_ = 0;
  uint32_t crc_ = 0;
};

// (block, offset) -> digest of the latest content; ZERO pages remove entries.
class ManifestBuilder {
 public:
  void Set(std::string_view block, uint64_t offset, const PageDigest& d);
  void Erase(std::string_view block, uint64_t offset);
  Manifest Build() const;

 private:
  std::map<std::string, std::map<uint64_t, PageDigest>, std::less<>> blocks_;
};

// Serializes whole-frame writes to the WAN and counts them.
class WanWriter {
 public:
  explicit WanWriter(ByteStream& wan) : wan_(wan) {}
  Status Write(std::span<const uint8_t> frames) {
    std::lock_guard lk(mu_);
    if (frames.empty()) return Ok();
    bytes_ += frames.size();
    return wan_.WriteAll(frames);
  }
  uint64_t bytes() {
    std::lock_guard lk(mu_);
    return bytes_;
  }

 private:
  std::mutex mu_;
  ByteStream& wan_;
  uint64_t bytes_ = 0;
};

std::string DescribeEndMismatch(const reuse::EndFigures& mine, const reuse::EndFigures& theirs);

}  // namespace kagemusha::memcache::detail

// Pure big-endian (network order) encode/decode helpers over byte spans, and
// a bounds-checked reader and an appending writer used by every wire codec.
//
// Thread-safety: pure functions; ByteReader/ByteWriter are single-owner.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace kagemusha {

inline uint16_t LoadBe16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
inline uint32_t LoadBe32(const uint8_t* p) {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}
inline uint64_t LoadBe64(const uint8_t* p) { return uint64_t(LoadBe32(p)) << 32 | LoadBe32(p + 4); }
inline void StoreBe16(uint8_t* p, uint16_t v) {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}
inline void StoreBe32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}
inline void StoreBe64(uint8_t* p, uint64_t v) {
  StoreBe32(p, uint32_t(v >> 32));
  StoreBe32(p + 4, uint32_t(v));
}

// Reads fixed-width fields from a span; every getter returns nullopt once the
// span is exhausted, so a truncated message can never be read past its end.
class ByteReader {
 public:
  explicit ByteReader(std::span<const uint8_t> data) : data_(data) {}

  size_t remaining() const { return data_.size() - pos_; }
  size_t position() const { return pos_; }
  bool empty() const { return remaining() == 0; }

  std::optional<uint8_t> U8() {
    if (remaining() < 1) return std::nullopt;
    return data_[pos_++];
  }
  std::optional<uint16_t> U16() { return Fixed<uint16_t>(2, LoadBe16); }
  std::optional<uint32_t> U32() { return Fixed<uint32_t>(4, LoadBe32); }
  std::optional<uint64_t> U64() { return Fixed<uint64_t>(8, LoadBe64); }
  std::optional<std::span<const uint8_t>> Bytes(size_t n) {
    if (remaining() < n) return std::nullopt;
    auto s = data_.subspan(pos_, n);
    pos_ += n;
    return s;
  }
  std::span<const uint8_t> Rest() {
    auto s = data_.subspan(pos_);
    pos_ = data_.size();
    return s;
  }

 private:
  template <class T, class F>
  std::optional<T> Fixed(size_t n, F load) {
    if (remaining() < n) return std::nullopt;
    T v = load(data_.data() + pos_);
    pos_ += n;
    return v;
  }
  std::span<const uint8_t> data_;
  size_t pos_ = 0;
};

// Appends network-order fields to a byte vector.
class ByteWriter {
 public:
  explicit ByteWriter(std::vector<uint8_t>& out) : out_(out) {}
  void U8(uint8_t v) { out_.push_back(v); }
  void U16(uint16_t v) { Put(v, 2, StoreBe16); }
  void U32(uint32_t v) { Put(v, 4, StoreBe32); }
  void U64(uint64_t v) { Put(v, 8, StoreBe64); }
  void Bytes(std::span<const uint8_t> b) { out_.insert(out_.end(), b.begin(), b.end()); }
  void Str(std::string_view s) { out_.insert(out_.end(), s.begin(), s.end()); }
  void Zeros(size_t n) { out_.insert(out_.end(), n, 0); }
  size_t size() const { return out_.size(); }
  // Overwrites a 16/32-bit field at an earlier position (lengths, checksums).
  void PatchU16(size_t at, uint16_t v) { StoreBe16(out_.data() + at, v); }
  void PatchU32(size_t at, uint32_t v) { StoreBe32(out_.data() + at, v); }

 private:
  template <class T, class F>
  void Put(T v, size_t n, F store) {
    size_t at = out_.size();
    out_.resize(at + n);
    store(out_.data() + at, v);
  }
  std::vector<uint8_t>& out_;
};

// CRC-32C (Castagnoli), used for on-disk header checksums.
uint32_t Crc32c(std::span<const uint8_t> data, uint32_t seed = 0);

}  // namespace kagemusha

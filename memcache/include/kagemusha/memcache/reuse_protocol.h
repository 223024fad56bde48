// The MiyakoDori reuse protocol: what the encoder proxy (source host) and the
// decoder proxy (destination host) say to each other over the WAN, in place
// of the raw QEMU migration stream. Specified, versioned, in
// docs/memcache-proxies.md.
//
// Every message is one frame:  u8 type | be32 payload length | payload.
// Integers are big-endian. A payload is at most kMaxFramePayload bytes; the
// FrameReader rejects larger lengths before buffering anything, so a peer
// cannot make us allocate more than one frame.
//
//   encoder -> decoder: HELLO, PASSTHROUGH, PAGE_REF, LITERAL, LITERAL_ZSTD,
//                       ZERO, END, DONE, ABORT
//   decoder -> encoder: HELLO, SUMMARY*, RETURN, END, ABORT
//
// The codec is pure (no I/O, no zstd, no OpenSSL) and is also built by clang
// for libFuzzer (fuzz_reuse_protocol.cc). zstd payloads are opaque here; the
// sessions (stream_proxy.h) compress and decompress them.
//
// Thread-safety: functions are pure; a FrameReader is single-owner.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/memcache/page_store.h"

namespace kagemusha::memcache::reuse {

inline constexpr uint32_t kHelloMagic = 0x4b475255;  // "KGRU"
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr size_t kFrameHeaderBytes = 5;
inline constexpr size_t kMaxFramePayload = 1u << 20;
// Encoders split passthrough runs and summaries so that frames stay small
// (a return-path message never waits behind a huge frame for long).
inline constexpr size_t kMaxPassthroughChunk = 64u << 10;
inline constexpr size_t kMaxSummaryEntriesPerFrame = (kMaxFramePayload - 8) / 8;
inline constexpr size_t kMaxVmNameBytes = 128;
inline constexpr size_t kMaxAbortReasonBytes = 1024;
inline constexpr size_t kPageBytes = 4096;

enum class FrameType : uint8_t {
  kHello = 1,
  kSummary = 2,
  kPassthrough = 3,
  kPageRef = 4,
  kLiteral = 5,
  kLiteralZstd = 6,
  kZero = 7,
  kEnd = 8,
  kDone = 9,
  kReturn = 10,
  kAbort = 11,
  // dec -> enc, only when both HELLOs carry cap::kDelivered: be64 stream
  // bytes written to the destination QEMU so far (flow control, see
  // docs/memcache-proxies.md §3).
  kDelivered = 12,
};
const char* FrameTypeName(FrameType t);

// Capability bits carried in HELLO.
namespace cap {
inline constexpr uint32_t kZstd = 1u << 0;       // may send / can receive LITERAL_ZSTD
inline constexpr uint32_t kDelivered = 1u << 1;  // may send / can receive DELIVERED
inline constexpr uint32_t kKnown = kZstd | kDelivered;
}  // namespace cap

// HELLO: be32 magic | be16 version | be32 capabilities | u8 vm_len | vm |
//        uuid[16] (all zero when unknown)
struct Hello {
  uint16_t version = kProtocolVersion;
  uint32_t capabilities = 0;
  std::string vm;
  std::array<uint8_t, 16> uuid{};
  bool operator==(const Hello&) const = default;
};

// SUMMARY: u8 flags (bit 0: last) | be32 n | n x be64 digest prefix.
// The prefix is the first 8 bytes of the SHA-256 digest, big-endian. A
// prefix hit is only a hint: PAGE_REF carries the full digest and the
// decoder re-hashes what it found; a false hit makes the decoder abort,
// never deliver wrong data (see docs/memcache-proxies.md for the odds).
struct SummaryChunk {
  bool last = false;
  std::vector<uint64_t> prefixes;
  bool operator==(const SummaryChunk&) const = default;
};
uint64_t DigestPrefix(const PageDigest& d);

// Page frames share a header: u8 flags (bit 0: CONTINUE) | [u8 len | block]
// unless CONTINUE | be64 offset. As in QEMU's own records, CONTINUE means
// "the block of the previous page frame" (the decoder tracks it). The
// decoder rebuilds the QEMU record (EncodePageRecord) with the same CONTINUE
// flag, so its output equals the source stream byte for byte.
struct PageHeader {
  bool continued = false;
  std::string_view block;  // 1..255 bytes unless continued (then not sent, and
                           // empty on decode); views the frame payload
  uint64_t offset = 0;     // page-aligned
};
struct PageRef {  // PAGE_REF: header | digest[32]
  PageHeader header;
  PageDigest digest;
};
struct Literal {  // LITERAL: header | page[4096]; LITERAL_ZSTD: header | zstd frame
  PageHeader header;
  std::span<const uint8_t> data;
};
// ZERO: header | u8 fill | be32 count. `count` consecutive ZERO records:
// the first as in the header, the others CONTINUE records at the following
// page offsets (a run of untouched guest memory costs one frame).
inline constexpr uint32_t kMaxZeroRun = 1u << 20;
struct ZeroPage {
  PageHeader header;
  uint8_t fill = 0;
  uint32_t count = 1;  // 1..kMaxZeroRun
};

// END (both directions): the figures of everything delivered up to the end
// of the rewriting window. be64 pages | be64 zero_pages | be64
// passthrough_bytes | be32 CRC-32C of the passthrough bytes | digest[32]
// (SHA-256 over the SHA-256 digests of the non-zero pages, in order).
struct EndFigures {
  uint64_t pages = 0;
  uint64_t zero_pages = 0;
  uint64_t passthrough_bytes = 0;
  uint32_t passthrough_crc = 0;
  PageDigest page_chain;
  bool operator==(const EndFigures&) const = default;
};

// DONE: the source stream ended. be64 stream_bytes (QEMU bytes read) |
// be64 pages | be64 zero_pages (all page records, both phases).
struct DoneFigures {
  uint64_t stream_bytes = 0;
  uint64_t pages = 0;
  uint64_t zero_pages = 0;
  bool operator==(const DoneFigures&) const = default;
};

// One frame as read off the wire; `payload` views the reader's buffer and is
// valid until the next call on the reader.
struct Frame {
  FrameType type;
  std::span<const uint8_t> payload;
};

// Incremental frame splitter: Append() bytes as they arrive, then call
// Next() until it returns nullopt. Errors (unknown type, oversized length)
// are sticky: the stream cannot be resynchronized.
class FrameReader {
 public:
  void Append(std::span<const uint8_t> bytes);
  Result<std::optional<Frame>> Next();
  size_t buffered() const { return buf_.size() - pos_; }

 private:
  std::vector<uint8_t> buf_;
  size_t pos_ = 0;
  std::optional<Error> error_;
};

// Returns the frame type if `t` is known.
std::optional<FrameType> ParseFrameType(uint8_t t);

// --- encoders: append one whole frame to `out` -------------------------------
// REQUIRES (checked, EINVAL otherwise): names and reasons within their limits,
// page data exactly kPageBytes for LITERAL, payload <= kMaxFramePayload.
Status AppendHello(const Hello& h, std::vector<uint8_t>& out);
Status AppendSummary(const SummaryChunk& s, std::vector<uint8_t>& out);
Status AppendPassthrough(std::span<const uint8_t> bytes, std::vector<uint8_t>& out);
Status AppendReturn(std::span<const uint8_t> bytes, std::vector<uint8_t>& out);
Status AppendPageRef(const PageRef& r, std::vector<uint8_t>& out);
Status AppendLiteral(const Literal& l, bool zstd, std::vector<uint8_t>& out);
Status AppendZero(const ZeroPage& z, std::vector<uint8_t>& out);
Status AppendEnd(const EndFigures& e, std::vector<uint8_t>& out);
Status AppendDone(const DoneFigures& d, std::vector<uint8_t>& out);
Status AppendAbort(std::string_view reason, std::vector<uint8_t>& out);
Status AppendDelivered(uint64_t stream_bytes, std::vector<uint8_t>& out);

// --- decoders: one payload each; EPROTO on any malformed field -----------------
Result<Hello> DecodeHello(std::span<const uint8_t> payload);
Result<SummaryChunk> DecodeSummary(std::span<const uint8_t> payload);
Result<PageRef> DecodePageRef(std::span<const uint8_t> payload);
// LITERAL: data is exactly kPageBytes. LITERAL_ZSTD: data is the (non-empty)
// compressed frame, not checked here.
Result<Literal> DecodeLiteral(std::span<const uint8_t> payload, bool zstd);
Result<ZeroPage> DecodeZero(std::span<const uint8_t> payload);
Result<EndFigures> DecodeEnd(std::span<const uint8_t> payload);
Result<DoneFigures> DecodeDone(std::span<const uint8_t> payload);
Result<std::string> DecodeAbort(std::span<const uint8_t> payload);
Result<uint64_t> DecodeDelivered(std::span<const uint8_t> payload);

}  // namespace kagemusha::memcache::reuse

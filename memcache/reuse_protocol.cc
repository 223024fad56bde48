#include "kagemusha/memcache/reuse_protocol.h"

#include <algorithm>
#include <cstring>

#include "kagemusha/common/coding.h"

namespace kagemusha::memcache::reuse {
namespace {

Error Bad(FrameType t, const std::string& what) {
  return Error::Protocol(std::string(FrameTypeName(t)) + " frame: " + what);
}

// Starts a frame in `out` and returns the offset of its length field.
size_t BeginFrame(FrameType t, std::vector<uint8_t>& out) {
  ByteWriter w(out);
  w.U8(uint8_t(t));
  size_t at = out.size();
  w.U32(0);
  return at;
}

Status EndFrame(size_t len_at, std::vector<uint8_t>& out) {
  size_t len = out.size() - (len_at + 4);
  if (len > kMaxFramePayload) {
    out.resize(len_at - 1);
    return Fail(Error::Invalid("frame payload of " + std::to_string(len) + " bytes exceeds " +
                               std::to_string(kMaxFramePayload)));
  }
  StoreBe32(out.data() + len_at, uint32_t(len));
  return Ok();
}

Status CheckHeader(const PageHeader& h) {
  if (!h.continued && (h.block.empty() || h.block.size() > 255))
    return Fail(Error::Invalid("RAMBlock id must be 1..255 bytes"));
  if (h.offset % kPageBytes != 0) return Fail(Error::Invalid("page offset not page-aligned"));
  return Ok();
}

void PutHeader(const PageHeader& h, ByteWriter& w) {
  w.U8(h.continued ? 1 : 0);
  if (!h.continued) {
    w.U8(uint8_t(h.block.size()));
    w.Str(h.block);
  }
  w.U64(h.offset);
}

Result<PageHeader> GetHeader(FrameType t, ByteReader& r) {
  auto flags = r.U8();
  if (!flags) return Fail(Bad(t, "truncated page header"));
  if (*flags & ~1u) return Fail(Bad(t, "unknown page flags"));
  PageHeader h;
  h.continued = (*flags & 1) != 0;
  if (!h.continued) {
    auto len = r.U8();
    if (!len) return Fail(Bad(t, "truncated page header"));
    if (*len == 0) return Fail(Bad(t, "empty RAMBlock id"));
    auto id = r.Bytes(*len);
    if (!id) return Fail(Bad(t, "truncated page header"));
    h.block = std::string_view(reinterpret_cast<const char*>(id->data()), id->size());
  }
  auto off = r.U64();
  if (!off) return Fail(Bad(t, "truncated page header"));
  if (*off % kPageBytes != 0) return Fail(Bad(t, "page offset not page-aligned"));
  h.offset = *off;
  return h;
}

Status AppendBytesFrame(FrameType t, std::span<const uint8_t> bytes, std::vector<uint8_t>& out) {
  if (bytes.size() > kMaxFramePayload)
    return Fail(Error::Invalid(std::string(FrameTypeName(t)) + " run too long"));
  size_t at = BeginFrame(t, out);
  out.insert(out.end(), bytes.begin(), bytes.end());
  return EndFrame(at, out);
}

}  // namespace

const char* FrameTypeName(FrameType t) {
  switch (t) {
    case FrameType::kHello:
      return "HELLO";
    case FrameType::kSummary:
      return "SUMMARY";
    case FrameType::kPassthrough:
      return "PASSTHROUGH";
    case FrameType::kPageRef:
      return "PAGE_REF";
    case FrameType::kLiteral:
      return "LITERAL";
    case FrameType::kLiteralZstd:
      return "LITERAL_ZSTD";
    case FrameType::kZero:
      return "ZERO";
    case FrameType::kEnd:
      return "END";
    case FrameType::kDone:
      return "DONE";
    case FrameType::kReturn:
      return "RETURN";
    case FrameType::kAbort:
      return "ABORT";
    case FrameType::kDelivered:
      return "DELIVERED";
  }
  return "UNKNOWN";
}

std::optional<FrameType> ParseFrameType(uint8_t t) {
  if (t >= uint8_t(FrameType::kHello) && t <= uint8_t(FrameType::kDelivered)) return FrameType(t);
  return std::nullopt;
}

uint64_t DigestPrefix(const PageDigest& d) { return LoadBe64(d.bytes.data()); }

// --- FrameReader -----------------------------------------------------------------

void FrameReader::Append(std::span<const uint8_t> bytes) {
  if (error_) return;
  // Drop consumed bytes first so the buffer holds at most one partial frame
  // plus what was just appended.
  if (pos_ > 0) {
    buf_.erase(buf_.begin(), buf_.begin() + long(pos_));
    pos_ = 0;
  }
  buf_.insert(buf_.end(), bytes.begin(), bytes.end());
}

Result<std::optional<Frame>> FrameReader::Next() {
  if (error_) return Fail(*error_);
  size_t avail = buf_.size() - pos_;
  if (avail < 1) return std::optional<Frame>();
  auto type = ParseFrameType(buf_[pos_]);
  if (!type) {
    error_ = Error::Protocol("unknown frame type " + std::to_string(buf_[pos_]));
    return Fail(*error_);
  }
  if (avail < kFrameHeaderBytes) return std::optional<Frame>();
  uint32_t len = LoadBe32(buf_.data() + pos_ + 1);
  if (len > kMaxFramePayload) {
    error_ = Error::Protocol(std::string(FrameTypeName(*type)) + " frame length " +
                             std::to_string(len) + " exceeds " + std::to_string(kMaxFramePayload));
    return Fail(*error_);
  }
  if (avail < kFrameHeaderBytes + len) return std::optional<Frame>();
  Frame f{*type, std::span<const uint8_t>(buf_.data() + pos_ + kFrameHeaderBytes, len)};
  pos_ += kFrameHeaderBytes + len;
  return std::optional<Frame>(f);
}

// --- encoders --------------------------------------------------------------------

Status AppendHello(const Hello& h, std::vector<uint8_t>& out) {
  if (h.vm.empty() || h.vm.size() > kMaxVmNameBytes)
    return Fail(Error::Invalid("VM name must be 1.." + std::to_string(kMaxVmNameBytes) + " bytes"));
  size_t at = BeginFrame(FrameType::kHello, out);
  ByteWriter w(out);
  w.U32(kHelloMagic);
  w.U16(h.version);
  w.U32(h.capabilities);
  w.U8(uint8_t(h.vm.size()));
  w.Str(h.vm);
  w.Bytes(h.uuid);
  return EndFrame(at, out);
}

Status AppendSummary(const SummaryChunk& s, std::vector<uint8_t>& out) {
  if (s.prefixes.size() > kMaxSummaryEntriesPerFrame)
    return Fail(Error::Invalid("too many SUMMARY entries for one frame"));
  size_t at = BeginFrame(FrameType::kSummary, out);
  ByteWriter w(out);
  w.U8(s.last ? 1 : 0);
  w.U32(uint32_t(s.prefixes.size()));
  for (uint64_t p : s.prefixes) w.U64(p);
  return EndFrame(at, out);
}

Status AppendPassthrough(std::span<const uint8_t> bytes, std::vector<uint8_t>& out) {
  return AppendBytesFrame(FrameType::kPassthrough, bytes, out);
}

Status AppendReturn(std::span<const uint8_t> bytes, std::vector<uint8_t>& out) {
  return AppendBytesFrame(FrameType::kReturn, bytes, out);
}

Status AppendPageRef(const PageRef& r, std::vector<uint8_t>& out) {
  if (auto st = CheckHeader(r.header); !st) return st;
  size_t at = BeginFrame(FrameType::kPageRef, out);
  ByteWriter w(out);
  PutHeader(r.header, w);
  w.Bytes(r.digest.bytes);
  return EndFrame(at, out);
}

Status AppendLiteral(const Literal& l, bool zstd, std::vector<uint8_t>& out) {
  if (auto st = CheckHeader(l.header); !st) return st;
  if (!zstd && l.data.size() != kPageBytes)
    return Fail(Error::Invalid("LITERAL page must be exactly 4096 bytes"));
  if (zstd && l.data.empty()) return Fail(Error::Invalid("empty LITERAL_ZSTD payload"));
  size_t at = BeginFrame(zstd ? FrameType::kLiteralZstd : FrameType::kLiteral, out);
  ByteWriter w(out);
  PutHeader(l.header, w);
  w.Bytes(l.data);
  return EndFrame(at, out);
}

Status AppendZero(const ZeroPage& z, std::vector<uint8_t>& out) {
  if (auto st = CheckHeader(z.header); !st) return st;
  if (z.count == 0 || z.count > kMaxZeroRun)
    return Fail(Error::Invalid("ZERO run must be 1.." + std::to_string(kMaxZeroRun) + " pages"));
  if (z.header.offset + uint64_t(z.count - 1) * kPageBytes < z.header.offset)
    return Fail(Error::Invalid("ZERO run wraps around"));
  size_t at = BeginFrame(FrameType::kZero, out);
  ByteWriter w(out);
  PutHeader(z.header, w);
  w.U8(z.fill);
  w.U32(z.count);
  return EndFrame(at, out);
}

Status AppendEnd(const EndFigures& e, std::vector<uint8_t>& out) {
  size_t at = BeginFrame(FrameType::kEnd, out);
  ByteWriter w(out);
  w.U64(e.pages);
  w.U64(e.zero_pages);
  w.U64(e.passthrough_bytes);
  w.U32(e.passthrough_crc);
  w.Bytes(e.page_chain.bytes);
  return EndFrame(at, out);
}

Status AppendDone(const DoneFigures& d, std::vector<uint8_t>& out) {
  size_t at = BeginFrame(FrameType::kDone, out);
  ByteWriter w(out);
  w.U64(d.stream_bytes);
  w.U64(d.pages);
  w.U64(d.zero_pages);
  return EndFrame(at, out);
}

Status AppendAbort(std::string_view reason, std::vector<uint8_t>& out) {
  // Reasons are for the operator; cut rather than fail, an abort must go out.
  reason = reason.substr(0, kMaxAbortReasonBytes);
  size_t at = BeginFrame(FrameType::kAbort, out);
  ByteWriter w(out);
  w.U16(uint16_t(reason.size()));
  w.Str(reason);
  return EndFrame(at, out);
}

Status AppendDelivered(uint64_t stream_bytes, std::vector<uint8_t>& out) {
  size_t at = BeginFrame(FrameType::kDelivered, out);
  ByteWriter w(out);
  w.U64(stream_bytes);
  return EndFrame(at, out);
}

// --- decoders --------------------------------------------------------------------

Result<Hello> DecodeHello(std::span<const uint8_t> payload) {
  constexpr auto t = FrameType::kHello;
  ByteReader r(payload);
  auto magic = r.U32();
  auto version = r.U16();
  auto caps = r.U32();
  auto vm_len = r.U8();
  if (!magic || !version || !caps || !vm_len) return Fail(Bad(t, "truncated"));
  if (*magic != kHelloMagic) return Fail(Bad(t, "bad magic (not a kagemusha-memcache peer)"));
  if (*vm_len == 0 || *vm_len > kMaxVmNameBytes) return Fail(Bad(t, "bad VM name length"));
  auto vm = r.Bytes(*vm_len);
  auto uuid = r.Bytes(16);
  if (!vm || !uuid) return Fail(Bad(t, "truncated"));
  if (!r.empty()) return Fail(Bad(t, "trailing bytes"));
  Hello h;
  h.version = *version;
  h.capabilities = *caps;
  h.vm.assign(reinterpret_cast<const char*>(vm->data()), vm->size());
  std::copy(uuid->begin(), uuid->end(), h.uuid.begin());
  return h;
}

Result<SummaryChunk> DecodeSummary(std::span<const uint8_t> payload) {
  constexpr auto t = FrameType::kSummary;
  ByteReader r(payload);
  auto flags = r.U8();
  auto n = r.U32();
  if (!flags || !n) return Fail(Bad(t, "truncated"));
  if (*flags & ~1u) return Fail(Bad(t, "unknown flags"));
  if (uint64_t(*n) * 8 != r.remaining()) return Fail(Bad(t, "entry count does not match length"));
  SummaryChunk s;
  s.last = (*flags & 1) != 0;
  s.prefixes.reserve(*n);
  for (uint32_t i = 0; i < *n; ++i) s.prefixes.push_back(*r.U64());
  return s;
}

Result<PageRef> DecodePageRef(std::span<const uint8_t> payload) {
  constexpr auto t = FrameType::kPageRef;
  ByteReader r(payload);
  auto h = GetHeader(t, r);
  if (!h) return Fail(h.error());
  auto d = r.Bytes(32);
  if (!d) return Fail(Bad(t, "truncated digest"));
  if (!r.empty()) return Fail(Bad(t, "trailing bytes"));
  PageRef ref;
  ref.header = *h;
  std::copy(d->begin(), d->end(), ref.digest.bytes.begin());
  return ref;
}

Result<Literal> DecodeLiteral(std::span<const uint8_t> payload, bool zstd) {
  const auto t = zstd ? FrameType::kLiteralZstd : FrameType::kLiteral;
  ByteReader r(payload);
  auto h = GetHeader(t, r);
  if (!h) return Fail(h.error());
  auto rest = r.Rest();
  if (!zstd && rest.size() != kPageBytes) return Fail(Bad(t, "page is not 4096 bytes"));
  if (zstd && rest.empty()) return Fail(Bad(t, "empty compressed page"));
  return Literal{*h, rest};
}

Result<ZeroPage> DecodeZero(std::span<const uint8_t> payload) {
  constexpr auto t = FrameType::kZero;
  ByteReader r(payload);
  auto h = GetHeader(t, r);
  if (!h) return Fail(h.error());
  auto fill = r.U8();
  auto count = r.U32();
  if (!fill || !count) return Fail(Bad(t, "truncated"));
  if (!r.empty()) return Fail(Bad(t, "trailing bytes"));
  if (*count == 0 || *count > kMaxZeroRun) return Fail(Bad(t, "run length out of range"));
  if (h->offset + uint64_t(*count - 1) * kPageBytes < h->offset)
    return Fail(Bad(t, "run wraps around"));
  return ZeroPage{*h, *fill, *count};
}

Result<EndFigures> DecodeEnd(std::span<const uint8_t> payload) {
  constexpr auto t = FrameType::kEnd;
  ByteReader r(payload);
  auto pages = r.U64();
  auto zeros = r.U64();
  auto pbytes = r.U64();
  auto crc = r.U32();
  auto chain = r.Bytes(32);
  if (!pages || !zeros || !pbytes || !crc || !chain) return Fail(Bad(t, "truncated"));
  if (!r.empty()) return Fail(Bad(t, "trailing bytes"));
  EndFigures e;
  e.pages = *pages;
  e.zero_pages = *zeros;
  e.passthrough_bytes = *pbytes;
  e.passthrough_crc = *crc;
  std::copy(chain->begin(), chain->end(), e.page_chain.bytes.begin());
  return e;
}

Result<DoneFigures> DecodeDone(std::span<const uint8_t> payload) {
  constexpr auto t = FrameType::kDone;
  ByteReader r(payload);
  auto bytes = r.U64();
  auto pages = r.U64();
  auto zeros = r.U64();
  if (!bytes || !pages || !zeros) return Fail(Bad(t, "truncated"));
  if (!r.empty()) return Fail(Bad(t, "trailing bytes"));
  return DoneFigures{*bytes, *pages, *zeros};
}

Result<std::string> DecodeAbort(std::span<const uint8_t> payload) {
  constexpr auto t = FrameType::kAbort;
  ByteReader r(payload);
  auto len = r.U16();
  if (!len) return Fail(Bad(t, "truncated"));
  if (*len > kMaxAbortReasonBytes) return Fail(Bad(t, "reason too long"));
  auto s = r.Bytes(*len);
  if (!s) return Fail(Bad(t, "truncated"));
  if (!r.empty()) return Fail(Bad(t, "trailing bytes"));
  return std::string(reinterpret_cast<const char*>(s->data()), s->size());
}

Result<uint64_t> DecodeDelivered(std::span<const uint8_t> payload) {
  constexpr auto t = FrameType::kDelivered;
  ByteReader r(payload);
  auto bytes = r.U64();
  if (!bytes) return Fail(Bad(t, "truncated"));
  if (!r.empty()) return Fail(Bad(t, "trailing bytes"));
  return *bytes;
}

}  // namespace kagemusha::memcache::reuse

// Server side NBD codec and handshake state machine. See nbd_server_codec.h;
// the protocol is NetworkBlockDevice/nbd doc/proto.md.
#include "nbd_server_codec.h"

#include <algorithm>
#include <cstring>

#include "kagemusha/common/coding.h"

namespace kagemusha::storage::nbd {
namespace {

// (Result<T> with kagemusha::Error rather than an error type of our own: the
// clang 14 fuzz build can only destroy std::expected<T, Error>, through the
// work-around header, when T or E is not trivially destructible.)
std::unexpected<Error> OptFail(uint32_t type, const char* reason) {
  return Fail(Error(type == kRepErrTooBig ? E2BIG : EINVAL, reason));
}

// Strings on the wire must not contain NUL and must be at most 4096 bytes.
bool ValidWireString(std::span<const uint8_t> s) {
  return s.size() <= kMaxNameLength && std::find(s.begin(), s.end(), 0) == s.end();
}

std::string ToString(std::span<const uint8_t> s) {
  return std::string(reinterpret_cast<const char*>(s.data()), s.size());
}

std::span<const uint8_t> AsBytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// Reads a u32-length-prefixed string. Names longer than 4096 are invalid.
Result<std::string> ReadLengthPrefixed(ByteReader& r) {
  auto len = r.U32();
  if (!len) return OptFail(kRepErrInvalid, "string length truncated");
  if (*len > kMaxNameLength) return OptFail(kRepErrInvalid, "string longer than 4096 bytes");
  auto bytes = r.Bytes(*len);
  if (!bytes) return OptFail(kRepErrInvalid, "string runs past the option end");
  if (!ValidWireString(*bytes)) return OptFail(kRepErrInvalid, "string contains NUL");
  return ToString(*bytes);
}

}  // namespace

// --- Handshake: parsing -----------------------------------------------------

std::vector<uint8_t> EncodeGreeting() {
  std::vector<uint8_t> out;
  ByteWriter w(out);
  w.U64(kNbdMagic);
  w.U64(kIHaveOpt);
  w.U16(kFlagFixedNewstyle | kFlagNoZeroes);
  return out;
}

Result<uint32_t> ParseClientFlags(std::span<const uint8_t> data) {
  ByteReader r(data);
  auto flags = r.U32();
  if (!flags) return Fail(Error::Protocol("client flags truncated"));
  if (*flags & ~(kClientFixedNewstyle | kClientNoZeroes)) {
    return Fail(Error::Protocol("client sent unknown handshake flags"));
  }
  return *flags;
}

Result<OptionHeader> ParseOptionHeader(std::span<const uint8_t> data) {
  ByteReader r(data);
  auto magic = r.U64();
  auto option = r.U32();
  auto length = r.U32();
  if (!length) return Fail(Error::Protocol("option header truncated"));
  if (*magic != kIHaveOpt) return Fail(Error::Protocol("option header without IHAVEOPT magic"));
  return OptionHeader{*option, *length};
}

uint32_t OptionErrorReply(const Error& e) {
  return e.code() == E2BIG ? kRepErrTooBig : kRepErrInvalid;
}

Result<std::string> ParseExportNameOption(std::span<const uint8_t> payload) {
  if (payload.size() > kMaxNameLength) return OptFail(kRepErrInvalid, "export name too long");
  if (!ValidWireString(payload)) return OptFail(kRepErrInvalid, "export name has NUL");
  return ToString(payload);
}

Result<InfoRequest> ParseInfoRequest(std::span<const uint8_t> payload) {
  ByteReader r(payload);
  InfoRequest req;
  auto name = ReadLengthPrefixed(r);
  if (!name) return std::unexpected(name.error());
  req.name = std::move(*name);
  auto count = r.U16();
  if (!count) return OptFail(kRepErrInvalid, "information request count missing");
  if (r.remaining() != size_t(*count) * 2) {
    return OptFail(kRepErrInvalid, "information request list does not match option length");
  }
  req.infos.reserve(*count);
  for (uint16_t i = 0; i < *count; ++i) req.infos.push_back(*r.U16());
  return req;
}

Result<MetaContextRequest> ParseMetaContextRequest(std::span<const uint8_t> payload) {
  ByteReader r(payload);
  MetaContextRequest req;
  auto name = ReadLengthPrefixed(r);
  if (!name) return std::unexpected(name.error());
  req.export_name = std::move(*name);
  auto count = r.U32();
  if (!count) return OptFail(kRepErrInvalid, "query count missing");
  if (*count > kMaxMetaQueries) return OptFail(kRepErrTooBig, "too many metadata queries");
  for (uint32_t i = 0; i < *count; ++i) {
    auto q = ReadLengthPrefixed(r);
    if (!q) return std::unexpected(q.error());
    req.queries.push_back(std::move(*q));
  }
  if (!r.empty()) return OptFail(kRepErrInvalid, "trailing bytes after metadata queries");
  return req;
}

// --- Handshake: encoding ----------------------------------------------------

void AppendOptionReply(std::vector<uint8_t>& out, uint32_t option, uint32_t type,
                       std::span<const uint8_t> payload) {
  ByteWriter w(out);
  w.U64(kOptReplyMagic);
  w.U32(option);
  w.U32(type);
  w.U32(uint32_t(payload.size()));
  w.Bytes(payload);
}

void AppendOptionReplyString(std::vector<uint8_t>& out, uint32_t option, uint32_t type,
                             std::string_view text) {
  AppendOptionReply(out, option, type, AsBytes(text.substr(0, kMaxNameLength)));
}

void AppendRepServer(std::vector<uint8_t>& out, uint32_t option, std::string_view name,
                     std::string_view description) {
  std::vector<uint8_t> p;
  ByteWriter w(p);
  w.U32(uint32_t(name.size()));
  w.Str(name);
  w.Str(description.substr(0, kMaxNameLength));
  AppendOptionReply(out, option, kRepServer, p);
}

void AppendInfoExport(std::vector<uint8_t>& out, uint32_t option, uint64_t size,
                      uint16_t tx_flags) {
  uint8_t p[12];
  StoreBe16(p, kInfoExport);
  StoreBe64(p + 2, size);
  StoreBe16(p + 10, tx_flags);
  AppendOptionReply(out, option, kRepInfo, p);
}

static void AppendInfoString(std::vector<uint8_t>& out, uint32_t option, uint16_t type,
                             std::string_view text) {
  std::vector<uint8_t> p;
  ByteWriter w(p);
  w.U16(type);
  w.Str(text.substr(0, kMaxNameLength));
  AppendOptionReply(out, option, kRepInfo, p);
}

void AppendInfoName(std::vector<uint8_t>& out, uint32_t option, std::string_view name) {
  AppendInfoString(out, option, kInfoName, name);
}

void AppendInfoDescription(std::vector<uint8_t>& out, uint32_t option, std::string_view text) {
  AppendInfoString(out, option, kInfoDescription, text);
}

void AppendInfoBlockSize(std::vector<uint8_t>& out, uint32_t option, uint32_t minimum,
                         uint32_t preferred, uint32_t maximum) {
  uint8_t p[14];
  StoreBe16(p, kInfoBlockSize);
  StoreBe32(p + 2, minimum);
  StoreBe32(p + 6, preferred);
  StoreBe32(p + 10, maximum);
  AppendOptionReply(out, option, kRepInfo, p);
}

void AppendRepMetaContext(std::vector<uint8_t>& out, uint32_t option, uint32_t id,
                          std::string_view name) {
  std::vector<uint8_t> p;
  ByteWriter w(p);
  w.U32(id);
  w.Str(name);
  AppendOptionReply(out, option, kRepMetaContext, p);
}

void AppendExportNameReply(std::vector<uint8_t>& out, uint64_t size, uint16_t tx_flags,
                           bool no_zeroes) {
  ByteWriter w(out);
  w.U64(size);
  w.U16(tx_flags);
  if (!no_zeroes) w.Zeros(124);
}

// --- Handshake: state machine ----------------------------------------------

uint16_t TransmissionFlags(const ExportDescriptor& e, bool structured_replies) {
  uint16_t f = kTxHasFlags;
  if (e.read_only) {
    f |= kTxReadOnly;
  } else {
    if (e.can_flush) f |= kTxSendFlush;
    if (e.can_fua) f |= kTxSendFua;
    if (e.can_trim) f |= kTxSendTrim;
    if (e.can_zero) {
      f |= kTxSendWriteZeroes;
      if (e.can_fast_zero) f |= kTxSendFastZero;
    }
  }
  if (e.rotational) f |= kTxRotational;
  if (structured_replies) f |= kTxSendDf;
  if (e.can_multi_conn) f |= kTxCanMultiConn;
  if (e.can_cache) f |= kTxSendCache;
  return f;
}

HandshakeStep HandshakeMachine::OnClientFlags(std::span<const uint8_t> data) {
  auto flags = ParseClientFlags(data);
  if (!flags) {
    last_problem_ = flags.error().message();
    return HandshakeStep::kHardDisconnect;
  }
  // We only speak fixed newstyle; a client that did not set the bit still
  // gets it (the spec allows honouring it), since oldstyle is not offered.
  no_zeroes_ = (*flags & kClientNoZeroes) != 0;
  return HandshakeStep::kContinue;
}

HandshakeMachine::PayloadAction HandshakeMachine::OnOptionHeader(const OptionHeader& h) const {
  if (h.option == kOptExportName) {
    // EXPORT_NAME cannot be answered with an error: a name we cannot accept
    // is a hard disconnect.
    return h.length <= kMaxNameLength ? PayloadAction::kRead : PayloadAction::kDisconnect;
  }
  if (h.length <= kMaxOptionLength) return PayloadAction::kRead;
  if (h.length <= kMaxOptionDiscard) return PayloadAction::kDiscard;
  return PayloadAction::kDisconnect;
}

HandshakeStep HandshakeMachine::Problem(std::vector<uint8_t>& out, uint32_t option,
                                        uint32_t type, std::string reason) {
  AppendOptionReplyString(out, option, type, reason);
  last_problem_ = std::move(reason);
  return HandshakeStep::kContinue;
}

HandshakeStep HandshakeMachine::OnOversizedOption(const OptionHeader& h,
                                                  std::vector<uint8_t>& out) {
  return Problem(out, h.option, kRepErrTooBig, "option payload too large");
}

std::optional<size_t> HandshakeMachine::FindExport(std::string_view name) const {
  for (size_t i = 0; i < exports_.size(); ++i) {
    if (exports_[i].name == name) return i;
  }
  return std::nullopt;
}

HandshakeStep HandshakeMachine::OnOption(const OptionHeader& h, std::span<const uint8_t> payload,
                                         std::vector<uint8_t>& out) {
  if (payload.size() != h.length) {
    last_problem_ = "option payload length mismatch";
    return HandshakeStep::kHardDisconnect;
  }
  switch (h.option) {
    case kOptExportName: {
      auto name = ParseExportNameOption(payload);
      std::optional<size_t> idx;
      if (name) idx = FindExport(*name);
      if (!idx) {
        last_problem_ = name ? "unknown export in EXPORT_NAME" : name.error().message();
        return HandshakeStep::kHardDisconnect;
      }
      const ExportDescriptor& e = exports_[*idx];
      negotiated_ = Negotiated{*idx, structured_,
                               structured_ && meta_export_ && *meta_export_ == e.name,
                               TransmissionFlags(e, structured_), e.size};
      AppendExportNameReply(out, e.size, negotiated_.tx_flags, no_zeroes_);
      return HandshakeStep::kTransmission;
    }
    case kOptAbort:
      AppendOptionReply(out, h.option, kRepAck);
      return HandshakeStep::kClose;
    case kOptList:
      if (!payload.empty()) {
        return Problem(out, h.option, kRepErrInvalid, "NBD_OPT_LIST carries no data");
      }
      for (const auto& e : exports_) AppendRepServer(out, h.option, e.name, e.description);
      AppendOptionReply(out, h.option, kRepAck);
      return HandshakeStep::kContinue;
    case kOptInfo:
    case kOptGo:
      return HandleInfoOrGo(h, payload, out);
    case kOptStructuredReply:
      if (!payload.empty()) {
        return Problem(out, h.option, kRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY carries no data");
      }
      if (structured_) {
        return Problem(out, h.option, kRepErrInvalid, "structured replies already negotiated");
      }
      structured_ = true;
      AppendOptionReply(out, h.option, kRepAck);
      return HandshakeStep::kContinue;
    case kOptListMetaContext:
    case kOptSetMetaContext:
      return HandleMetaContext(h, payload, out);
    default:
      return Problem(out, h.option, kRepErrUnsup, "option not supported");
  }
}

HandshakeStep HandshakeMachine::HandleInfoOrGo(const OptionHeader& h,
                                               std::span<const uint8_t> payload,
                                               std::vector<uint8_t>& out) {
  auto req = ParseInfoRequest(payload);
  if (!req) return Problem(out, h.option, OptionErrorReply(req.error()), req.error().message());
  auto idx = FindExport(req->name);
  if (!idx) return Problem(out, h.option, kRepErrUnknown, "no such export");
  const ExportDescriptor& e = exports_[*idx];
  uint16_t tx = TransmissionFlags(e, structured_);
  AppendInfoExport(out, h.option, e.size, tx);
  bool sent_name = false, sent_desc = false, sent_bs = false;
  for (uint16_t info : req->infos) {
    if (info == kInfoName && !sent_name) {
      AppendInfoName(out, h.option, e.name);
      sent_name = true;
    } else if (info == kInfoDescription && !sent_desc) {
      if (!e.description.empty()) AppendInfoDescription(out, h.option, e.description);
      sent_desc = true;
    } else if (info == kInfoBlockSize && !sent_bs) {
      AppendInfoBlockSize(out, h.option, kMinBlockSize, kPreferredBlockSize, kMaxPayload);
      sent_bs = true;
    }
    // Unknown information requests are ignored, as the spec requires.
  }
  AppendOptionReply(out, h.option, kRepAck);
  if (h.option == kOptInfo) return HandshakeStep::kContinue;
  negotiated_ = Negotiated{*idx, structured_,
                           structured_ && meta_export_ && *meta_export_ == e.name, tx, e.size};
  return HandshakeStep::kTransmission;
}

HandshakeStep HandshakeMachine::HandleMetaContext(const OptionHeader& h,
                                                  std::span<const uint8_t> payload,
                                                  std::vector<uint8_t>& out) {
  const bool set = h.option == kOptSetMetaContext;
  // SET replaces the selection even when it fails.
  if (set) meta_export_.reset();
  if (!structured_) {
    return Problem(out, h.option, kRepErrInvalid, "negotiate structured replies first");
  }
  auto req = ParseMetaContextRequest(payload);
  if (!req) return Problem(out, h.option, OptionErrorReply(req.error()), req.error().message());
  if (!FindExport(req->export_name)) {
    return Problem(out, h.option, kRepErrUnknown, "no such export");
  }
  bool match = false;
  if (req->queries.empty()) {
    match = !set;  // LIST with no query lists everything; SET selects nothing
  } else {
    for (const auto& q : req->queries) {
      // "base:" lists every context of the namespace (LIST only).
      if (q == kMetaBaseAllocation || (!set && q == "base:")) match = true;
    }
  }
  if (match) {
    AppendRepMetaContext(out, h.option, set ? kBaseAllocationId : 0, kMetaBaseAllocation);
    if (set) meta_export_ = req->export_name;
  }
  AppendOptionReply(out, h.option, kRepAck);
  return HandshakeStep::kContinue;
}

// --- Transmission: requests ------------------------------------------------

Result<RequestHeader> ParseRequestHeader(std::span<const uint8_t> data) {
  if (data.size() < kRequestHeaderSize) return Fail(Error::Protocol("request header truncated"));
  const uint8_t* p = data.data();
  if (LoadBe32(p) != kRequestMagic) return Fail(Error::Protocol("bad request magic"));
  RequestHeader r;
  r.flags = LoadBe16(p + 4);
  r.type = LoadBe16(p + 6);
  r.cookie = LoadBe64(p + 8);
  r.offset = LoadBe64(p + 16);
  r.length = LoadBe32(p + 24);
  return r;
}

RequestCheck ValidateRequest(const RequestHeader& r, const Negotiated& n) {
  RequestCheck c;
  const uint16_t tx = n.tx_flags;
  auto in_bounds = [&] { return r.offset <= n.size && r.length <= n.size - r.offset; };
  uint16_t allowed = (tx & kTxSendFua) ? kCmdFlagFua : 0;
  if (r.type == kCmdWrite) {
    c.payload_to_read = r.length;
    if (r.length > kMaxWriteDiscard) {
      c.disconnect = true;
      return c;
    }
  }
  switch (r.type) {
    case kCmdRead:
      if (n.structured_replies) allowed |= kCmdFlagDf;
      break;
    case kCmdWriteZeroes:
      allowed |= kCmdFlagNoHole;
      if (tx & kTxSendFastZero) allowed |= kCmdFlagFastZero;
      break;
    case kCmdBlockStatus:
      allowed |= kCmdFlagReqOne;
      break;
    case kCmdWrite:
    case kCmdDisc:
    case kCmdFlush:
    case kCmdTrim:
    case kCmdCache:
      break;
    default:
      c.error = kErrInval;
      return c;
  }
  if (r.flags & ~allowed) {
    c.error = kErrInval;
    return c;
  }
  const bool is_write = r.type == kCmdWrite || r.type == kCmdTrim || r.type == kCmdWriteZeroes;
  if (is_write && (tx & kTxReadOnly)) {
    c.error = kErrPerm;
    return c;
  }
  switch (r.type) {
    case kCmdDisc:
      return c;
    case kCmdFlush:
      if (!(tx & kTxSendFlush) || r.offset != 0 || r.length != 0) c.error = kErrInval;
      return c;
    case kCmdTrim:
      if (!(tx & kTxSendTrim)) c.error = kErrInval;
      break;
    case kCmdWriteZeroes:
      if (!(tx & kTxSendWriteZeroes)) c.error = kErrInval;
      break;
    case kCmdCache:
      if (!(tx & kTxSendCache)) c.error = kErrInval;
      break;
    case kCmdBlockStatus:
      if (!n.base_allocation) c.error = kErrInval;
      break;
    default:
      break;
  }
  if (c.error) return c;
  if (r.length == 0) {
    c.error = kErrInval;
    return c;
  }
  if ((r.type == kCmdRead || r.type == kCmdWrite) && r.length > kMaxPayload) {
    c.error = kErrOverflow;
    return c;
  }
  if (!in_bounds()) {
    // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
    c.error = (r.type == kCmdWrite || r.type == kCmdWriteZeroes) ? kErrNoSpc : kErrInval;
  }
  return c;
}

uint32_t WireError(int code) {
  switch (code) {
    case 0:
      return 0;
    case EPERM:
    case EROFS:
      return kErrPerm;
    case ENOMEM:
      return kErrNoMem;
    case EINVAL:
      return kErrInval;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return kErrNoSpc;
    case EOVERFLOW:
      return kErrOverflow;
    case ENOTSUP:
      return kErrNotSup;
    case ESHUTDOWN:
      return kErrShutdown;
    default:
      return kErrIo;
  }
}

// --- Transmission: replies -------------------------------------------------

void EncodeSimpleReply(uint8_t* out, uint32_t error, uint64_t cookie) {
  StoreBe32(out, kSimpleReplyMagic);
  StoreBe32(out + 4, error);
  StoreBe64(out + 8, cookie);
}

void EncodeChunkHeader(uint8_t* out, uint16_t flags, uint16_t type, uint64_t cookie,
                       uint32_t payload_length) {
  StoreBe32(out, kStructuredReplyMagic);
  StoreBe16(out + 4, flags);
  StoreBe16(out + 6, type);
  StoreBe64(out + 8, cookie);
  StoreBe32(out + 16, payload_length);
}

void EncodeOffsetDataHeader(uint8_t* out, uint16_t flags, uint64_t cookie, uint64_t offset,
                            uint32_t data_length) {
  EncodeChunkHeader(out, flags, kReplyTypeOffsetData, cookie, data_length + 8);
  StoreBe64(out + kStructuredReplyHeaderSize, offset);
}

void EncodeOffsetHoleChunk(uint8_t* out, uint16_t flags, uint64_t cookie, uint64_t offset,
                           uint32_t hole_length) {
  EncodeChunkHeader(out, flags, kReplyTypeOffsetHole, cookie, 12);
  StoreBe64(out + kStructuredReplyHeaderSize, offset);
  StoreBe32(out + kStructuredReplyHeaderSize + 8, hole_length);
}

void EncodeNoneChunk(uint8_t* out, uint64_t cookie) {
  EncodeChunkHeader(out, kReplyFlagDone, kReplyTypeNone, cookie, 0);
}

void AppendErrorChunk(std::vector<uint8_t>& out, uint64_t cookie, uint32_t error,
                      std::string_view message) {
  message = message.substr(0, kMaxNameLength);
  size_t at = out.size();
  out.resize(at + kStructuredReplyHeaderSize + 6 + message.size());
  uint8_t* p = out.data() + at;
  EncodeChunkHeader(p, kReplyFlagDone, kReplyTypeError, cookie, uint32_t(6 + message.size()));
  StoreBe32(p + 20, error);
  StoreBe16(p + 24, uint16_t(message.size()));
  if (!message.empty()) std::memcpy(p + 26, message.data(), message.size());
}

void AppendBlockStatusChunk(std::vector<uint8_t>& out, uint64_t cookie, uint32_t context_id,
                            std::span<const BlockStatusDescriptor> descriptors) {
  size_t at = out.size();
  uint32_t len = uint32_t(4 + 8 * descriptors.size());
  out.resize(at + kStructuredReplyHeaderSize + len);
  uint8_t* p = out.data() + at;
  EncodeChunkHeader(p, kReplyFlagDone, kReplyTypeBlockStatus, cookie, len);
  p += kStructuredReplyHeaderSize;
  StoreBe32(p, context_id);
  p += 4;
  for (const auto& d : descriptors) {
    StoreBe32(p, d.length);
    StoreBe32(p + 4, d.flags);
    p += 8;
  }
}

std::vector<BlockStatusDescriptor> BlockStatusFromExtents(std::span<const Extent> extents,
                                                          uint32_t length, bool req_one) {
  std::vector<BlockStatusDescriptor> out;
  uint64_t total = 0;
  for (const Extent& e : extents) {
    if (total >= length) break;
    if (e.length == 0) continue;
    uint32_t flags = (e.hole ? kStateHole : 0) | (e.zero ? kStateZero : 0);
    uint32_t n = uint32_t(std::min<uint64_t>(e.length, length - total));
    if (!out.empty() && out.back().flags == flags) {
      out.back().length += n;
    } else {
      if (out.size() == kMaxBlockStatusDescriptors) break;
      out.push_back({n, flags});
    }
    total += n;
  }
  if (out.empty()) out.push_back({length, 0});
  if (req_one) out.resize(1);
  return out;
}

std::vector<ReadSegment> PlanStructuredRead(std::span<const Extent> extents, uint64_t offset,
                                            uint32_t length) {
  std::vector<ReadSegment> out;
  uint64_t pos = 0;
  auto add = [&](uint64_t n, bool hole) {
    if (n == 0) return;
    if (!out.empty() && out.back().hole == hole) {
      out.back().length += uint32_t(n);
    } else {
      out.push_back({offset + pos, uint32_t(n), hole});
    }
    pos += n;
  };
  for (const Extent& e : extents) {
    if (pos >= length) break;
    add(std::min<uint64_t>(e.length, length - pos), e.zero);
  }
  add(length - pos, false);
  return out;
}

}  // namespace kagemusha::storage::nbd

#include "nbd_client_codec.h"

#include <algorithm>
#include <cerrno>

#include "kagemusha/common/coding.h"

namespace kagemusha::storage::nbd {
namespace {

std::string Hex(uint64_t v) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s = "0x";
  bool started = false;
  for (int shift = 60; shift >= 0; shift -= 4) {
    unsigned d = unsigned(v >> shift) & 0xf;
    if (d != 0 || started || shift == 0) {
      s += kDigits[d];
      started = true;
    }
  }
  return s;
}

bool IsPowerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

// Error replies may carry a UTF-8 message for a human; keep it printable and
// short so a hostile server cannot flood our logs.
std::string ServerMessage(std::span<const uint8_t> payload) {
  std::string s;
  for (uint8_t c : payload.first(std::min<size_t>(payload.size(), 512))) {
    s += (c >= 0x20 && c != 0x7f) || c >= 0x80 ? char(c) : '?';
  }
  return s;
}

}  // namespace

Result<ServerGreeting> ParseServerGreeting(std::span<const uint8_t> bytes) {
  ByteReader r(bytes);
  auto magic = r.U64();
  auto second = r.U64();
  if (!magic || !second) return Fail(Error::Protocol("server greeting truncated"));
  if (*magic != kNbdMagic) {
    return Fail(Error::Protocol("not an NBD server (greeting magic " + Hex(*magic) + ")"));
  }
  if (*second == kOldstyleMagic) {
    return Fail(Error::NotSupported("server uses oldstyle negotiation, which is not supported"));
  }
  if (*second != kIHaveOpt) {
    return Fail(Error::Protocol("bad newstyle magic " + Hex(*second)));
  }
  auto flags = r.U16();
  if (!flags || !r.empty()) return Fail(Error::Protocol("server greeting has the wrong length"));
  if (!(*flags & kFlagFixedNewstyle)) {
    return Fail(Error::NotSupported("server does not support fixed newstyle negotiation"));
  }
  return ServerGreeting{*flags};
}

uint32_t ChooseClientFlags(const ServerGreeting& greeting) {
  uint32_t flags = kClientFixedNewstyle;
  if (greeting.no_zeroes()) flags |= kClientNoZeroes;
  return flags;
}

std::vector<uint8_t> EncodeClientFlags(uint32_t flags) {
  std::vector<uint8_t> out;
  ByteWriter(out).U32(flags);
  return out;
}

std::vector<uint8_t> EncodeOption(uint32_t option, std::span<const uint8_t> data) {
  std::vector<uint8_t> out;
  out.reserve(kOptionHeaderSize + data.size());
  ByteWriter w(out);
  w.U64(kIHaveOpt);
  w.U32(option);
  w.U32(uint32_t(data.size()));
  w.Bytes(data);
  return out;
}

static Status CheckExportName(std::string_view name) {
  if (name.size() > kMaxNameLength) {
    return Fail(Error::Invalid("export name is " + std::to_string(name.size()) +
                               " bytes; NBD allows at most " + std::to_string(kMaxNameLength)));
  }
  if (name.find('\0') != std::string_view::npos) {
    return Fail(Error::Invalid("export name contains a NUL byte"));
  }
  return Ok();
}

Result<std::vector<uint8_t>> EncodeGoOption(uint32_t option, std::string_view export_name,
                                            std::span<const uint16_t> info_requests) {
  if (auto s = CheckExportName(export_name); !s) return Fail(s.error());
  if (info_requests.size() > 0xffff) return Fail(Error::Invalid("too many NBD_INFO requests"));
  std::vector<uint8_t> data;
  ByteWriter w(data);
  w.U32(uint32_t(export_name.size()));
  w.Str(export_name);
  w.U16(uint16_t(info_requests.size()));
  for (uint16_t info : info_requests) w.U16(info);
  return EncodeOption(option, data);
}

Result<std::vector<uint8_t>> EncodeExportNameOption(std::string_view export_name) {
  if (auto s = CheckExportName(export_name); !s) return Fail(s.error());
  return EncodeOption(
      kOptExportName,
      std::span(reinterpret_cast<const uint8_t*>(export_name.data()), export_name.size()));
}

Result<OptionReplyHeader> ParseOptionReplyHeader(std::span<const uint8_t> bytes) {
  if (bytes.size() != kOptionReplyHeaderSize) {
    return Fail(Error::Protocol("option reply header has the wrong length"));
  }
  ByteReader r(bytes);
  uint64_t magic = *r.U64();
  if (magic != kOptReplyMagic) {
    return Fail(Error::Protocol("bad option reply magic " + Hex(magic)));
  }
  OptionReplyHeader h;
  h.option = *r.U32();
  h.type = *r.U32();
  h.length = *r.U32();
  if (h.length > kMaxOptionLength) {
    return Fail(Error::Protocol("option reply of " + std::to_string(h.length) +
                                " bytes exceeds our limit of " + std::to_string(kMaxOptionLength)));
  }
  return h;
}

Result<InfoReply> ParseInfoReply(std::span<const uint8_t> payload) {
  ByteReader r(payload);
  auto type = r.U16();
  if (!type) return Fail(Error::Protocol("NBD_REP_INFO shorter than its type field"));
  InfoReply info;
  info.type = *type;
  switch (*type) {
    case kInfoExport: {
      if (payload.size() != 12) {
        return Fail(Error::Protocol("NBD_INFO_EXPORT has length " + std::to_string(payload.size()) +
                                    ", must be 12"));
      }
      ExportInfo e;
      e.size = *r.U64();
      e.transmission_flags = *r.U16();
      if (!(e.transmission_flags & kTxHasFlags)) {
        return Fail(Error::Protocol("NBD_INFO_EXPORT transmission flags lack NBD_FLAG_HAS_FLAGS"));
      }
      if (e.size > uint64_t(INT64_MAX)) {
        return Fail(Error::Protocol("export size " + std::to_string(e.size) + " is too large"));
      }
      info.export_info = e;
      break;
    }
    case kInfoBlockSize: {
      if (payload.size() != 14) {
        return Fail(Error::Protocol("NBD_INFO_BLOCK_SIZE has length " +
                                    std::to_string(payload.size()) + ", must be 14"));
      }
      BlockSizeInfo b;
      b.minimum = *r.U32();
      b.preferred = *r.U32();
      b.maximum = *r.U32();
      if (!IsPowerOfTwo(b.minimum) || b.minimum > 65536) {
        return Fail(Error::Protocol("server minimum block size " + std::to_string(b.minimum) +
                                    " is not a power of two <= 65536"));
      }
      if (!IsPowerOfTwo(b.preferred) || b.preferred < std::max<uint32_t>(b.minimum, 512)) {
        return Fail(Error::Protocol("server preferred block size " + std::to_string(b.preferred) +
                                    " is invalid"));
      }
      if (b.maximum < b.preferred || (b.maximum != 0xffffffffu && b.maximum % b.minimum != 0)) {
        return Fail(
            Error::Protocol("server maximum payload " + std::to_string(b.maximum) + " is invalid"));
      }
      info.block_size = b;
      break;
    }
    case kInfoName:
    case kInfoDescription: {
      auto rest = r.Rest();
      info.text = std::string(rest.begin(), rest.end());
      break;
    }
    default:
      break;  // proto.md: MUST ignore information types it does not recognize
  }
  return info;
}

std::string_view OptionReplyTypeName(uint32_t type) {
  switch (type) {
    case kRepAck:
      return "NBD_REP_ACK";
    case kRepServer:
      return "NBD_REP_SERVER";
    case kRepInfo:
      return "NBD_REP_INFO";
    case kRepMetaContext:
      return "NBD_REP_META_CONTEXT";
    case kRepErrUnsup:
      return "NBD_REP_ERR_UNSUP";
    case kRepErrPolicy:
      return "NBD_REP_ERR_POLICY";
    case kRepErrInvalid:
      return "NBD_REP_ERR_INVALID";
    case kRepErrPlatform:
      return "NBD_REP_ERR_PLATFORM";
    case kRepErrTlsReqd:
      return "NBD_REP_ERR_TLS_REQD";
    case kRepErrUnknown:
      return "NBD_REP_ERR_UNKNOWN";
    case kRepErrShutdown:
      return "NBD_REP_ERR_SHUTDOWN";
    case kRepErrBlockSizeReqd:
      return "NBD_REP_ERR_BLOCK_SIZE_REQD";
    case kRepErrTooBig:
      return "NBD_REP_ERR_TOO_BIG";
    default:
      return (type & kRepFlagError) ? "unknown NBD_REP_ERR" : "unknown NBD_REP";
  }
}

std::string_view OptionName(uint32_t option) {
  switch (option) {
    case kOptExportName:
      return "NBD_OPT_EXPORT_NAME";
    case kOptAbort:
      return "NBD_OPT_ABORT";
    case kOptList:
      return "NBD_OPT_LIST";
    case kOptStartTls:
      return "NBD_OPT_STARTTLS";
    case kOptInfo:
      return "NBD_OPT_INFO";
    case kOptGo:
      return "NBD_OPT_GO";
    case kOptStructuredReply:
      return "NBD_OPT_STRUCTURED_REPLY";
    default:
      return "NBD_OPT_?";
  }
}

Result<GoNegotiation::Step> GoNegotiation::Feed(const OptionReplyHeader& header,
                                                std::span<const uint8_t> payload) {
  if (header.option != option_) {
    return Fail(Error::Protocol("server answered " + std::string(OptionName(header.option)) +
                                " while we were waiting for " + std::string(OptionName(option_))));
  }
  if (payload.size() != header.length) {
    return Fail(Error::Protocol("option reply payload length does not match its header"));
  }
  std::string quoted = "'" + export_name_ + "'";
  auto with_message = [&](std::string what) {
    if (!payload.empty()) what += " (server says: " + ServerMessage(payload) + ")";
    return what;
  };
  switch (header.type) {
    case kRepInfo: {
      auto info = ParseInfoReply(payload);
      if (!info) return Fail(info.error());
      if (info->export_info) export_info_ = info->export_info;
      if (info->block_size) block_size_ = info->block_size;
      return Step::kNeedMore;
    }
    case kRepAck:
      if (!payload.empty()) return Fail(Error::Protocol("NBD_REP_ACK carries a payload"));
      if (!export_info_) {
        return Fail(Error::Protocol("server accepted export " + quoted +
                                    " without sending NBD_INFO_EXPORT"));
      }
      return Step::kDone;
    case kRepErrUnsup:
      return Step::kUnsupported;
    case kRepErrUnknown:
      return Fail(Error(ENOENT, with_message("export " + quoted + " not found" +
                                             (where_.empty() ? "" : " on " + where_))));
    case kRepErrTlsReqd:
      return Fail(Error(EACCES, with_message("export " + quoted +
                                             " requires TLS, which this client does not support")));
    case kRepErrPolicy:
      return Fail(Error(EACCES, with_message("server policy refuses export " + quoted)));
    case kRepErrShutdown:
      return Fail(Error::Shutdown(with_message("server is shutting down")));
    case kRepErrBlockSizeReqd:
      return Fail(Error::Protocol(
          with_message("server demands NBD_INFO_BLOCK_SIZE although we requested it")));
    default:
      if (header.is_error()) {
        return Fail(Error::Io(with_message("server refused export " + quoted + " with " +
                                           std::string(OptionReplyTypeName(header.type)) + " (" +
                                           Hex(header.type) + ")")));
      }
      return Fail(Error::Protocol("unexpected option reply " +
                                  std::string(OptionReplyTypeName(header.type)) + " (" +
                                  Hex(header.type) + ") to " + std::string(OptionName(option_))));
  }
}

size_t ExportNameReplySize(bool no_zeroes) { return 10 + (no_zeroes ? 0 : 124); }

Result<ExportInfo> ParseExportNameReply(std::span<const uint8_t> bytes, bool no_zeroes) {
  if (bytes.size() != ExportNameReplySize(no_zeroes)) {
    return Fail(Error::Protocol("NBD_OPT_EXPORT_NAME reply has the wrong length"));
  }
  ByteReader r(bytes);
  ExportInfo e;
  e.size = *r.U64();
  e.transmission_flags = *r.U16();
  if (!(e.transmission_flags & kTxHasFlags)) {
    return Fail(Error::Protocol("transmission flags lack NBD_FLAG_HAS_FLAGS"));
  }
  if (e.size > uint64_t(INT64_MAX)) {
    return Fail(Error::Protocol("export size " + std::to_string(e.size) + " is too large"));
  }
  // The 124 reserved bytes are not checked: old servers were sloppy, and
  // nothing depends on them.
  return e;
}

void EncodeRequestHeader(const RequestHeader& request, std::span<uint8_t, kRequestHeaderSize> out) {
  uint8_t* p = out.data();
  StoreBe32(p, kRequestMagic);
  StoreBe16(p + 4, request.flags);
  StoreBe16(p + 6, request.type);
  StoreBe64(p + 8, request.cookie);
  StoreBe64(p + 16, request.offset);
  StoreBe32(p + 24, request.length);
}

ReplyKind ClassifyReplyMagic(std::span<const uint8_t, 4> magic) {
  switch (LoadBe32(magic.data())) {
    case kSimpleReplyMagic:
      return ReplyKind::kSimple;
    case kStructuredReplyMagic:
      return ReplyKind::kStructured;
    default:
      return ReplyKind::kBad;
  }
}

Result<SimpleReply> ParseSimpleReply(std::span<const uint8_t> bytes) {
  if (bytes.size() != kSimpleReplySize) return Fail(Error::Protocol("simple reply truncated"));
  ByteReader r(bytes);
  uint32_t magic = *r.U32();
  if (magic != kSimpleReplyMagic) {
    return Fail(Error::Protocol("bad reply magic " + Hex(magic)));
  }
  SimpleReply s;
  s.error = *r.U32();
  s.cookie = *r.U64();
  return s;
}

Result<StructuredReplyHeader> ParseStructuredReplyHeader(std::span<const uint8_t> bytes) {
  if (bytes.size() != kStructuredReplyHeaderSize) {
    return Fail(Error::Protocol("structured reply header truncated"));
  }
  ByteReader r(bytes);
  uint32_t magic = *r.U32();
  if (magic != kStructuredReplyMagic) {
    return Fail(Error::Protocol("bad structured reply magic " + Hex(magic)));
  }
  StructuredReplyHeader h;
  h.flags = *r.U16();
  h.type = *r.U16();
  h.cookie = *r.U64();
  h.length = *r.U32();
  if (h.length > kMaxPayload + 8) {
    return Fail(Error::Protocol("structured reply chunk of " + std::to_string(h.length) +
                                " bytes is too large"));
  }
  if (h.type == kReplyTypeNone && (h.length != 0 || !h.done())) {
    return Fail(Error::Protocol("NBD_REPLY_TYPE_NONE must be final and empty"));
  }
  return h;
}

int NbdErrorToErrno(uint32_t nbd_error) {
  switch (nbd_error) {
    case kErrPerm:
      return EPERM;
    case kErrIo:
      return EIO;
    case kErrNoMem:
      return ENOMEM;
    case kErrInval:
      return EINVAL;
    case kErrNoSpc:
      return ENOSPC;
    case kErrOverflow:
      return EOVERFLOW;
    case kErrNotSup:
      return ENOTSUP;
    case kErrShutdown:
      return ESHUTDOWN;
    default:
      return EIO;
  }
}

std::vector<ReadPiece> SplitRead(uint64_t offset, uint64_t length, uint32_t max_piece,
                                 uint32_t alignment) {
  std::vector<ReadPiece> pieces;
  if (length == 0) return pieces;
  if (alignment == 0) alignment = 1;
  uint32_t step = std::max(alignment, max_piece - max_piece % alignment);
  pieces.reserve(size_t(length / step + 2));
  uint64_t pos = offset;
  const uint64_t end = offset + length;
  while (pos < end) {
    // Cut at the next multiple of `step`-aligned boundary so interior pieces
    // stay aligned even when the range starts unaligned.
    uint64_t next = pos + step;
    if (alignment > 1) next -= next % alignment;
    if (next <= pos) next = pos + step;
    next = std::min(next, end);
    pieces.push_back({pos, uint32_t(next - pos), size_t(pos - offset)});
    pos = next;
  }
  return pieces;
}

uint32_t EffectiveMaxRequest(uint32_t client_max, const std::optional<BlockSizeInfo>& server) {
  uint32_t limit = std::min(std::max<uint32_t>(client_max, 1), kMaxPayload);
  if (server) {
    limit = std::min(limit, server->maximum);
    if (limit >= server->minimum) limit -= limit % server->minimum;
    limit = std::max(limit, server->minimum);
  }
  return limit;
}

}  // namespace kagemusha::storage::nbd

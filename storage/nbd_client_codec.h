// Pure codec for the client side of NBD fixed-newstyle (doc/proto.md of
// NetworkBlockDevice/nbd): it encodes what a client sends (client flags,
// option requests, transmission request headers) and parses what a server
// sends (greeting, option replies and NBD_REP_INFO payloads, the
// NBD_OPT_EXPORT_NAME reply, simple replies and structured reply chunk
// headers). No I/O, no logging, no Boost: the libFuzzer build compiles this
// file with clang (storage/fuzz_nbd_client.cc).
//
// Every parser takes exactly the bytes of one fixed-size message or payload
// and fails with EPROTO (or the error the server reported) on anything a
// compliant server cannot send; callers then drop the connection.
//
// Thread-safety: pure functions; GoNegotiation is single-owner.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/storage/nbd_protocol.h"

namespace kagemusha::storage::nbd {

// --- Greeting and client flags --------------------------------------------

inline constexpr size_t kServerGreetingSize = 18;                // NBDMAGIC, IHAVEOPT, u16 flags
inline constexpr uint64_t kOldstyleMagic = 0x00420281861253ULL;  // cliserv_magic

struct ServerGreeting {
  uint16_t handshake_flags = 0;
  bool no_zeroes() const { return handshake_flags & kFlagNoZeroes; }
};

// Parses the 18-byte newstyle greeting. Oldstyle servers and servers without
// NBD_FLAG_FIXED_NEWSTYLE are refused (we only speak fixed newstyle).
Result<ServerGreeting> ParseServerGreeting(std::span<const uint8_t> bytes);

// The client flags we answer with: fixed newstyle, plus NO_ZEROES only when
// the server offered it (proto.md: MUST NOT be set otherwise).
uint32_t ChooseClientFlags(const ServerGreeting& greeting);
std::vector<uint8_t> EncodeClientFlags(uint32_t flags);

// --- Option requests -------------------------------------------------------

// IHAVEOPT, option, length, data.
std::vector<uint8_t> EncodeOption(uint32_t option, std::span<const uint8_t> data = {});

// NBD_OPT_GO / NBD_OPT_INFO: u32 name length, name, u16 count, u16 infos[].
// Fails with EINVAL for names longer than kMaxNameLength or containing NUL.
Result<std::vector<uint8_t>> EncodeGoOption(uint32_t option, std::string_view export_name,
                                            std::span<const uint16_t> info_requests);

// NBD_OPT_EXPORT_NAME: the name is the whole option payload.
Result<std::vector<uint8_t>> EncodeExportNameOption(std::string_view export_name);

// --- Option replies --------------------------------------------------------

struct OptionReplyHeader {
  uint32_t option = 0;
  uint32_t type = 0;
  uint32_t length = 0;
  bool is_error() const { return type & kRepFlagError; }
};

// Parses the 20-byte option reply header. Replies longer than
// kMaxOptionLength are refused, so a hostile length cannot make the client
// allocate gigabytes.
Result<OptionReplyHeader> ParseOptionReplyHeader(std::span<const uint8_t> bytes);

struct ExportInfo {
  uint64_t size = 0;
  uint16_t transmission_flags = 0;
  bool operator==(const ExportInfo&) const = default;
};

struct BlockSizeInfo {
  uint32_t minimum = 1;
  uint32_t preferred = kPreferredBlockSize;
  uint32_t maximum = kMaxPayload;
  bool operator==(const BlockSizeInfo&) const = default;
};

// One NBD_REP_INFO payload (u16 type + body). Unknown types are returned with
// only `type` set, to be ignored (proto.md: the client MUST ignore them).
struct InfoReply {
  uint16_t type = 0;
  std::optional<ExportInfo> export_info;
  std::optional<BlockSizeInfo> block_size;
  std::optional<std::string> text;  // NBD_INFO_NAME / NBD_INFO_DESCRIPTION
};
Result<InfoReply> ParseInfoReply(std::span<const uint8_t> payload);

// Human name of an option reply type ("NBD_REP_ERR_UNKNOWN").
std::string_view OptionReplyTypeName(uint32_t type);
std::string_view OptionName(uint32_t option);

// Accumulates the replies to one NBD_OPT_GO (or NBD_OPT_INFO) request.
// Feed() is called once per reply header + payload, in arrival order.
class GoNegotiation {
 public:
  enum class Step {
    kNeedMore,     // an NBD_REP_INFO was absorbed; read the next reply
    kDone,         // NBD_REP_ACK with an NBD_INFO_EXPORT: transmission begins
    kUnsupported,  // NBD_REP_ERR_UNSUP: fall back to NBD_OPT_EXPORT_NAME
  };

  // `where` names the server in error messages ("export 'x' not found on
  // nbd://h:10809/x").
  GoNegotiation(uint32_t option, std::string export_name, std::string where = {})
      : option_(option), export_name_(std::move(export_name)), where_(std::move(where)) {}

  // Errors: ENOENT for NBD_REP_ERR_UNKNOWN ("export 'x' not found"), EACCES for
  // policy/TLS refusals, ESHUTDOWN for NBD_REP_ERR_SHUTDOWN, EPROTO for
  // replies that break the protocol. The server's own message, if any, is
  // appended.
  Result<Step> Feed(const OptionReplyHeader& header, std::span<const uint8_t> payload);

  const std::optional<ExportInfo>& export_info() const { return export_info_; }
  const std::optional<BlockSizeInfo>& block_size() const { return block_size_; }

 private:
  uint32_t option_;
  std::string export_name_;
  std::string where_;
  std::optional<ExportInfo> export_info_;
  std::optional<BlockSizeInfo> block_size_;
};

// Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 flags, then 124 zero bytes
// unless NO_ZEROES was negotiated. `bytes` must be exactly that long.
size_t ExportNameReplySize(bool no_zeroes);
Result<ExportInfo> ParseExportNameReply(std::span<const uint8_t> bytes, bool no_zeroes);

// --- Transmission ----------------------------------------------------------

struct RequestHeader {
  uint16_t flags = 0;
  uint16_t type = kCmdRead;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};
// Writes exactly kRequestHeaderSize bytes to `out`.
void EncodeRequestHeader(const RequestHeader& request, std::span<uint8_t, kRequestHeaderSize> out);

enum class ReplyKind { kSimple, kStructured, kBad };
// Classifies a reply by its first four bytes.
ReplyKind ClassifyReplyMagic(std::span<const uint8_t, 4> magic);

struct SimpleReply {
  uint32_t error = 0;  // NBD error value, 0 on success
  uint64_t cookie = 0;
};
Result<SimpleReply> ParseSimpleReply(std::span<const uint8_t> bytes);  // 16 bytes

struct StructuredReplyHeader {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint32_t length = 0;
  bool done() const { return flags & kReplyFlagDone; }
};
// 20 bytes. Refuses chunk payloads longer than kMaxPayload + the 8-byte
// offset prefix of NBD_REPLY_TYPE_OFFSET_DATA.
Result<StructuredReplyHeader> ParseStructuredReplyHeader(std::span<const uint8_t> bytes);

// Maps an NBD wire error value to errno. Unknown values become EIO
// (proto.md: the client should treat unexpected values as EINVAL-like
// failures; EIO is what callers can act on).
int NbdErrorToErrno(uint32_t nbd_error);

// --- Request splitting -----------------------------------------------------

struct ReadPiece {
  uint64_t offset = 0;
  uint32_t length = 0;
  size_t buffer_offset = 0;  // where this piece lands in the caller's buffer
  bool operator==(const ReadPiece&) const = default;
};

// Splits [offset, offset+length) into pieces of at most `max_piece` bytes.
// When `alignment` > 1, piece boundaries other than the first and last are
// multiples of it (the caller aligns the range itself). REQUIRES: max_piece
// >= alignment > 0.
std::vector<ReadPiece> SplitRead(uint64_t offset, uint64_t length, uint32_t max_piece,
                                 uint32_t alignment = 1);

// The largest read the client may send: the smallest of our own limit, the
// server's advertised maximum payload (if any), and the protocol default of
// 32 MiB, rounded down to the server's minimum block size.
uint32_t EffectiveMaxRequest(uint32_t client_max, const std::optional<BlockSizeInfo>& server);

}  // namespace kagemusha::storage::nbd

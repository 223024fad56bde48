// Server side of the NBD wire protocol as pure functions over byte spans:
// parsing what a client sends (client flags, option headers and payloads,
// request headers) and encoding what the server sends (greeting, option
// replies, export-name reply, simple replies, structured reply chunks).
//
// HandshakeMachine is the whole fixed-newstyle option negotiation as a pure
// state machine: the session reads an option header and payload, hands them
// in, writes the bytes it gets back and acts on the outcome. It does no I/O,
// so the unit tests and the libFuzzer target drive it directly.
//
// No Boost, no spdlog: this file is also compiled by clang for libFuzzer.
//
// Thread-safety: pure functions; a HandshakeMachine belongs to one session.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/storage/backend.h"
#include "kagemusha/storage/nbd_protocol.h"

namespace kagemusha::storage::nbd {

// Option payloads above kMaxOptionLength are read and discarded (and answered
// with NBD_REP_ERR_TOO_BIG) up to this size; a client announcing more than
// this is treated as hostile and disconnected without reading it.
inline constexpr uint32_t kMaxOptionDiscard = 16 * kMaxOptionLength;
// Write payloads above kMaxPayload are read and discarded (answered with
// EOVERFLOW) up to this size; beyond it the client is disconnected.
inline constexpr uint64_t kMaxWriteDiscard = 4ull * kMaxPayload;
// Metadata context id we hand out for base:allocation.
inline constexpr uint32_t kBaseAllocationId = 1;
// At most this many metadata context queries in one option (ERR_TOO_BIG).
inline constexpr uint32_t kMaxMetaQueries = 128;

// --- Handshake: parsing -----------------------------------------------------

// 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags (FIXED_NEWSTYLE | NO_ZEROES).
std::vector<uint8_t> EncodeGreeting();

// The 4-byte client flags. Fails (the server must then drop the connection)
// on unknown bits.
Result<uint32_t> ParseClientFlags(std::span<const uint8_t> data);

struct OptionHeader {
  uint32_t option = 0;
  uint32_t length = 0;
};
// The 16-byte option header; fails on a short buffer or bad IHAVEOPT magic.
Result<OptionHeader> ParseOptionHeader(std::span<const uint8_t> data);

// Option payload parsers fail with Error code EINVAL (answer
// NBD_REP_ERR_INVALID) or E2BIG (answer NBD_REP_ERR_TOO_BIG);
// OptionErrorReply maps one to the other.
uint32_t OptionErrorReply(const Error& e);

// NBD_OPT_EXPORT_NAME: the whole payload is the name.
Result<std::string> ParseExportNameOption(std::span<const uint8_t> payload);

// NBD_OPT_INFO / NBD_OPT_GO.
struct InfoRequest {
  std::string name;
  std::vector<uint16_t> infos;
};
Result<InfoRequest> ParseInfoRequest(std::span<const uint8_t> payload);

// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
struct MetaContextRequest {
  std::string export_name;
  std::vector<std::string> queries;
};
Result<MetaContextRequest> ParseMetaContextRequest(std::span<const uint8_t> payload);

// --- Handshake: encoding ----------------------------------------------------

// Appends one option reply (20-byte header + payload) to out.
void AppendOptionReply(std::vector<uint8_t>& out, uint32_t option, uint32_t type,
                       std::span<const uint8_t> payload = {});
void AppendOptionReplyString(std::vector<uint8_t>& out, uint32_t option, uint32_t type,
                             std::string_view text);
void AppendRepServer(std::vector<uint8_t>& out, uint32_t option, std::string_view name,
                     std::string_view description);
void AppendInfoExport(std::vector<uint8_t>& out, uint32_t option, uint64_t size,
                      uint16_t tx_flags);
void AppendInfoName(std::vector<uint8_t>& out, uint32_t option, std::string_view name);
void AppendInfoDescription(std::vector<uint8_t>& out, uint32_t option, std::string_view text);
void AppendInfoBlockSize(std::vector<uint8_t>& out, uint32_t option, uint32_t minimum,
                         uint32_t preferred, uint32_t maximum);
void AppendRepMetaContext(std::vector<uint8_t>& out, uint32_t option, uint32_t id,
                          std::string_view name);
// Reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless the
// client set NBD_FLAG_C_NO_ZEROES.
void AppendExportNameReply(std::vector<uint8_t>& out, uint64_t size, uint16_t tx_flags,
                           bool no_zeroes);

// --- Handshake: state machine ----------------------------------------------

// What the handshake needs to know about one export.
struct ExportDescriptor {
  std::string name;
  std::string description;
  uint64_t size = 0;
  bool read_only = false;
  bool can_flush = false;
  bool can_fua = false;
  bool can_trim = false;
  bool can_zero = false;
  bool can_fast_zero = false;
  bool can_cache = false;
  bool can_multi_conn = false;
  bool rotational = false;
};

// Transmission flags for an export, given whether structured replies were
// negotiated (NBD_FLAG_SEND_DF requires them).
uint16_t TransmissionFlags(const ExportDescriptor& e, bool structured_replies);

// What the session must do after handing an option to the machine.
enum class HandshakeStep {
  kContinue,        // write `out`, read the next option
  kClose,           // write `out` (may be empty), then close (ABORT)
  kHardDisconnect,  // close now without writing (protocol violation)
  kTransmission,    // write `out`, then enter transmission with Negotiated()
};

// The result of a finished handshake.
struct Negotiated {
  size_t export_index = 0;
  bool structured_replies = false;
  bool base_allocation = false;  // block status with kBaseAllocationId
  uint16_t tx_flags = 0;
  uint64_t size = 0;
};

class HandshakeMachine {
 public:
  explicit HandshakeMachine(std::vector<ExportDescriptor> exports)
      : exports_(std::move(exports)) {}

  // Feeds the client flags (4 bytes). kHardDisconnect on unknown flags.
  HandshakeStep OnClientFlags(std::span<const uint8_t> data);

  // Decides what to do with an option header before its payload is read:
  // payloads <= kMaxOptionLength are read and passed to OnOption; bigger
  // ones up to kMaxOptionDiscard are skipped and OnOversizedOption answers
  // them; anything else (and an oversized EXPORT_NAME, which cannot be
  // answered with an error) is a hard disconnect.
  enum class PayloadAction { kRead, kDiscard, kDisconnect };
  PayloadAction OnOptionHeader(const OptionHeader& header) const;

  // Handles one complete option. Appends the reply bytes to out.
  HandshakeStep OnOption(const OptionHeader& header, std::span<const uint8_t> payload,
                         std::vector<uint8_t>& out);
  // Answers an option whose payload was discarded.
  HandshakeStep OnOversizedOption(const OptionHeader& header, std::vector<uint8_t>& out);

  // Valid after kTransmission.
  const Negotiated& negotiated() const { return negotiated_; }
  bool no_zeroes() const { return no_zeroes_; }
  // Short reason for the last kHardDisconnect or error reply (for logs).
  const std::string& last_problem() const { return last_problem_; }

 private:
  std::optional<size_t> FindExport(std::string_view name) const;
  HandshakeStep HandleInfoOrGo(const OptionHeader& h, std::span<const uint8_t> payload,
                               std::vector<uint8_t>& out);
  HandshakeStep HandleMetaContext(const OptionHeader& h, std::span<const uint8_t> payload,
                                  std::vector<uint8_t>& out);
  HandshakeStep Problem(std::vector<uint8_t>& out, uint32_t option, uint32_t type,
                        std::string reason);

  std::vector<ExportDescriptor> exports_;
  bool no_zeroes_ = false;
  bool structured_ = false;
  // Set by a successful SET_META_CONTEXT that selected base:allocation.
  std::optional<std::string> meta_export_;
  Negotiated negotiated_;
  std::string last_problem_;
};

// --- Transmission: requests ------------------------------------------------

struct RequestHeader {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};
// The 28-byte request header; fails on a short buffer or bad magic (the
// session must then disconnect: the stream can no longer be framed).
Result<RequestHeader> ParseRequestHeader(std::span<const uint8_t> data);

// How a request is to be handled after validation.
struct RequestCheck {
  uint32_t error = 0;  // wire error to reply with (0 = go ahead)
  // For NBD_CMD_WRITE: how many payload bytes follow and must be consumed
  // (even when error != 0), and whether they are to be read into a buffer.
  uint64_t payload_to_read = 0;
  bool disconnect = false;  // payload too large to even discard
};

// Validates a request against the negotiated state: known command, flags
// allowed for the command and advertised, bounds, length limits, read-only.
// Pure; the session acts on the result.
RequestCheck ValidateRequest(const RequestHeader& r, const Negotiated& n);

// Maps an errno-style code to one of the wire error values NBD allows.
uint32_t WireError(int code);

// --- Transmission: replies -------------------------------------------------

// 16 bytes into out.
void EncodeSimpleReply(uint8_t* out, uint32_t error, uint64_t cookie);
// 20-byte structured chunk header into out.
void EncodeChunkHeader(uint8_t* out, uint16_t flags, uint16_t type, uint64_t cookie,
                       uint32_t payload_length);
// OFFSET_DATA header (20 + 8 bytes); the data_length bytes follow separately.
inline constexpr size_t kOffsetDataHeaderSize = kStructuredReplyHeaderSize + 8;
void EncodeOffsetDataHeader(uint8_t* out, uint16_t flags, uint64_t cookie, uint64_t offset,
                            uint32_t data_length);
// OFFSET_HOLE chunk (20 + 12 bytes).
inline constexpr size_t kOffsetHoleChunkSize = kStructuredReplyHeaderSize + 12;
void EncodeOffsetHoleChunk(uint8_t* out, uint16_t flags, uint64_t cookie, uint64_t offset,
                           uint32_t hole_length);
// NONE chunk with DONE set (20 bytes).
void EncodeNoneChunk(uint8_t* out, uint64_t cookie);
// ERROR chunk with DONE set; message truncated to 4096 bytes.
void AppendErrorChunk(std::vector<uint8_t>& out, uint64_t cookie, uint32_t error,
                      std::string_view message);

// One base:allocation descriptor.
struct BlockStatusDescriptor {
  uint32_t length = 0;
  uint32_t flags = 0;
};
// BLOCK_STATUS chunk with DONE set.
void AppendBlockStatusChunk(std::vector<uint8_t>& out, uint64_t cookie, uint32_t context_id,
                            std::span<const BlockStatusDescriptor> descriptors);

// At most this many descriptors in one block status reply; clients ask again
// for the rest (the spec allows fewer descriptors than the range needs).
inline constexpr size_t kMaxBlockStatusDescriptors = 16384;

// Turns backend extents for a BLOCK_STATUS request of `length` bytes into
// wire descriptors: zero-length extents dropped, neighbours with equal flags
// merged, total clamped to `length`, one descriptor only with REQ_ONE. Never
// empty: without usable extents it reports the whole range as allocated data
// (status 0, which the spec says is always safe).
std::vector<BlockStatusDescriptor> BlockStatusFromExtents(std::span<const Extent> extents,
                                                          uint32_t length, bool req_one);

// A piece of a structured read reply: bytes to read and send, or a hole.
struct ReadSegment {
  uint64_t offset = 0;  // absolute
  uint32_t length = 0;
  bool hole = false;    // send OFFSET_HOLE: the range reads as zeroes
};
// Splits a read of [offset, offset+length) into data and hole segments from
// backend extents. Only extents that read as zero (NBD_STATE_ZERO) become
// holes; anything the extents do not cover is data. Adjacent segments of the
// same kind are merged, so a fully allocated range is one data segment.
std::vector<ReadSegment> PlanStructuredRead(std::span<const Extent> extents, uint64_t offset,
                                            uint32_t length);

}  // namespace kagemusha::storage::nbd

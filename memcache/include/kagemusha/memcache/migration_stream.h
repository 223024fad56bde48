// Incremental parser and page-record encoder for the QEMU 7.2 migration
// stream (the bytes QEMU writes to a "migrate" URI), used by the MiyakoDori
// memory-reuse proxies to find RAM page records they may rewrite.
//
// Push-style: Feed() any chunking of the stream (down to one byte at a time)
// and the parser calls a MigrationStreamVisitor with
//   * OnPassthrough(bytes): bytes to forward unchanged;
//   * OnPage(record): one RAM page record (PAGE or ZERO), with its exact raw
//     bytes and the decoded block id, offset and 4 KiB of data;
//   * OnFallback(why): from here on the parser no longer interprets the
//     stream; every later byte arrives through OnPassthrough only.
// Every input byte is reported exactly once, in order, either in a
// passthrough range or in a page record's `raw`, so concatenating them
// rebuilds the input, and EncodePageRecord(record) == record.raw for every
// unmodified record (the byte-exact guarantee the tests check).
//
// What is understood (see docs/memcache.md for the byte layouts):
//   file magic/version, CONFIGURATION (machine name; target-page-bits and
//   capabilities subsections), sections START/PART/END/FULL with optional
//   footers, COMMAND (return path, ping, postcopy advise/listen/run/discard,
//   PACKAGED as an opaque length-delimited blob, recv-bitmap, resume, colo),
//   EOF and the trailing VMDESCRIPTION, and inside the "ram" section the
//   records MEM_SIZE (RAMBlock list), PAGE, ZERO, EOS, CONTINUE.
// What triggers a fallback: any other section type or command, an iterable
// section other than "ram", RAM flags XBZRLE, COMPRESS_PAGE, HOOK (RDMA),
// MULTIFD_FLUSH (QEMU >= 8.0) or unknown bits, and malformed input (bad magic,
// unknown RAMBlock, offsets beyond a block, an empty or oversized idstr ...).
// Fallback is always emitted *before* the first byte it concerns, so the raw
// tail starts exactly at the record the parser could not read.
//
// Rewriting window: page records are `rewritable` only while the stream is in
// the iterative RAM phase. Once device state starts (a FULL section for any
// device, a PACKAGED postcopy blob, or the end of the "ram" section) nothing
// more is rewritable; postcopy pages that follow PACKAGED are still reported
// through OnPage (rewritable == false) so they can be counted, and must be
// forwarded as record.raw. Device state itself (FULL sections) is not
// self-delimiting, so after the first FULL section the rest of the stream is
// passthrough (no fallback is reported: that is the normal end).
//
// Thread-safety: a MigrationStreamParser is single-owner (one per stream);
// spans handed to the visitor are valid only during the callback.
// The parser is pure (no I/O, no allocation beyond one bounded item buffer)
// and is built for libFuzzer too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kagemusha/common/error.h"

namespace kagemusha::memcache {

// --- Wire constants (migration/savevm.c, migration/ram.c of QEMU 7.2) ---
inline constexpr uint32_t kQemuVmFileMagic = 0x5145564d;  // "QEVM"
inline constexpr uint32_t kQemuVmFileVersion = 3;
inline constexpr size_t kTargetPageSize = 4096;  // x86 TARGET_PAGE_SIZE
inline constexpr uint64_t kTargetPageMask = ~uint64_t{kTargetPageSize - 1};

enum class SectionType : uint8_t {
  kEof = 0x00,
  kStart = 0x01,
  kPart = 0x02,
  kEnd = 0x03,
  kFull = 0x04,
  kSubsection = 0x05,
  kVmDescription = 0x06,
  kConfiguration = 0x07,
  kCommand = 0x08,
  kFooter = 0x7e,
};

enum class MigCommand : uint16_t {
  kInvalid = 0,
  kOpenReturnPath = 1,
  kPing = 2,
  kPostcopyAdvise = 3,
  kPostcopyListen = 4,
  kPostcopyRun = 5,
  kPostcopyRamDiscard = 6,
  kPackaged = 7,
  kRecvBitmap = 8,
  kPostcopyResume = 9,
  kEnableColo = 10,
};

// RAM record flags: the low bits of the be64 that starts each record.
namespace ram_flag {
inline constexpr uint16_t kFull = 0x01;  // obsolete, never sent by 7.2
inline constexpr uint16_t kZero = 0x02;
inline constexpr uint16_t kMemSize = 0x04;
inline constexpr uint16_t kPage = 0x08;
inline constexpr uint16_t kEos = 0x10;
inline constexpr uint16_t kContinue = 0x20;
inline constexpr uint16_t kXbzrle = 0x40;
inline constexpr uint16_t kHook = 0x80;
inline constexpr uint16_t kCompressPage = 0x100;
inline constexpr uint16_t kMultifdFlush = 0x200;  // QEMU >= 8.0
}  // namespace ram_flag

inline constexpr std::string_view kRamSectionId = "ram";

// One RAMBlock from the MEM_SIZE record of the ram START section.
struct RamBlockInfo {
  std::string id;
  uint64_t used_length = 0;
  std::optional<uint64_t> page_size;  // only sent with postcopy + huge pages
  std::optional<uint64_t> addr;       // only sent with x-ignore-shared
};

// A PAGE or ZERO record of the ram section.
struct PageRecord {
  std::string_view block_id;      // the block the record belongs to
  uint64_t offset = 0;            // page-aligned offset inside the block
  bool zero = false;              // ZERO record (no data, one fill byte)
  uint8_t fill = 0;               // ZERO records: the fill byte (0 in 7.2)
  bool continued = false;         // CONTINUE: idstr omitted (same block as the
                                  // previous record: a proxy that replaces or
                                  // drops a record must clear it on the next)
  bool rewritable = false;        // inside the rewriting window (see above)
  std::span<const uint8_t> data;  // PAGE: kTargetPageSize bytes; ZERO: empty
  std::span<const uint8_t> raw;   // the record exactly as it was on the wire
};

enum class FallbackKind { kUnsupported, kMalformed };

struct Fallback {
  FallbackKind kind = FallbackKind::kUnsupported;
  uint64_t stream_offset = 0;  // offset of the first byte not understood
  std::string reason;
};

class MigrationStreamVisitor {
 public:
  virtual ~MigrationStreamVisitor() = default;
  virtual void OnPassthrough(std::span<const uint8_t> bytes) = 0;
  virtual void OnPage(const PageRecord& page) = 0;
  virtual void OnFallback(const Fallback& why) = 0;
};

struct MigrationStreamStats {
  uint64_t bytes = 0;       // input bytes consumed so far
  uint64_t pages = 0;       // PAGE records (rewritable or not)
  uint64_t zero_pages = 0;  // ZERO records
  uint64_t rewritable_pages = 0;
  uint64_t sections = 0;        // section headers seen
  uint64_t commands = 0;        // COMMAND sections seen
  uint64_t ram_iterations = 0;  // ram sections (START/PART/END) parsed
};

class MigrationStreamParser {
 public:
  // Where the parser is; exposed for tests, logs and the proxies' decisions.
  enum class Phase {
    kHeader,       // before / inside the file header and configuration
    kRam,          // between sections or inside ram sections (rewritable)
    kPostcopy,     // after PACKAGED: parsing continues, nothing rewritable
    kDeviceState,  // after the first FULL section: passthrough tail
    kAfterEof,     // EOF (and maybe VMDESCRIPTION) seen
    kFallback,     // gave up: passthrough tail
  };

  MigrationStreamParser() = default;

  // Consumes `data`; reports every byte to `visitor` (possibly later, when an
  // item straddles Feed calls: then its bytes are buffered, at most one item).
  void Feed(std::span<const uint8_t> data, MigrationStreamVisitor& visitor);

  // Call at end of input. Ok if the stream stopped at an item boundary in a
  // state where QEMU's stream may legitimately end (after EOF/VMDESCRIPTION,
  // in a passthrough tail); otherwise an EPROTO "truncated" error. Bytes still
  // buffered from an incomplete item are flushed to OnPassthrough either way,
  // so nothing is lost.
  Status Finish(MigrationStreamVisitor& visitor);

  Phase phase() const { return phase_; }
  bool postcopy_advised() const { return postcopy_advised_; }
  bool ignore_shared() const { return ignore_shared_; }
  const std::string& machine() const { return machine_; }
  const std::vector<RamBlockInfo>& ram_blocks() const { return blocks_; }
  uint64_t ram_total_bytes() const { return ram_total_; }
  const MigrationStreamStats& stats() const { return stats_; }
  const std::optional<Fallback>& fallback() const { return fallback_; }
  // Bytes of an item still waiting for more input.
  size_t buffered() const { return buf_.size(); }

 private:
  enum class State {
    kFileHeader,
    kConfigSubsectionOrSection,  // after CONFIGURATION: subsection or top level
    kTopLevel,
    kRamRecord,
    kRamBlockList,
    kFooter,
    kAfterEof,
    kSkip,  // length-delimited opaque payload, then back to skip_return_
    kTail,  // everything passthrough
  };
  enum class Step { kDone, kNeedMore };

  // Parses items from `in` until it needs more bytes; returns bytes consumed.
  size_t ParseSpan(std::span<const uint8_t> in, MigrationStreamVisitor& v);
  Step ParseOne(std::span<const uint8_t> in, size_t& used, MigrationStreamVisitor& v);
  Step ParseTopLevel(std::span<const uint8_t> in, size_t& used);
  Step ParseConfiguration(std::span<const uint8_t> in, size_t& used);
  Step ParseSubsection(std::span<const uint8_t> in, size_t& used);
  Step ParseCommand(std::span<const uint8_t> in, size_t& used);
  Step ParseSectionHeader(std::span<const uint8_t> in, size_t& used);
  Step ParseRamRecord(std::span<const uint8_t> in, size_t& used, MigrationStreamVisitor& v);
  Step ParseRamBlock(std::span<const uint8_t> in, size_t& used);
  Step ParseFooter(std::span<const uint8_t> in, size_t& used);
  Step ParseAfterEof(std::span<const uint8_t> in, size_t& used);

  void GiveUp(FallbackKind kind, std::string reason);
  void FlushPassthrough(MigrationStreamVisitor& v);
  const RamBlockInfo* FindBlock(std::string_view id) const;

  State state_ = State::kFileHeader;
  Phase phase_ = Phase::kHeader;
  std::vector<uint8_t> buf_;  // an incomplete item carried between Feeds

  // Passthrough coalescing within one ParseSpan call.
  const uint8_t* pass_begin_ = nullptr;
  size_t pass_len_ = 0;
  bool item_reported_ = false;  // the last item was reported via OnPage

  uint64_t stream_pos_ = 0;                   // stream offset of the next unparsed byte
  std::optional<Fallback> pending_fallback_;  // to report before passthrough
  std::optional<Fallback> fallback_;

  std::string machine_;
  bool postcopy_advised_ = false;
  bool ignore_shared_ = false;
  bool rewrite_closed_ = false;
  std::optional<bool> footers_;  // learnt from the first section end

  std::vector<RamBlockInfo> blocks_;
  uint64_t ram_total_ = 0;
  uint64_t ram_list_remaining_ = 0;
  std::optional<uint32_t> ram_section_id_;
  uint32_t current_section_ = 0;
  bool current_is_end_ = false;
  int last_block_ = -1;  // index into blocks_ for CONTINUE records

  uint64_t skip_remaining_ = 0;
  State skip_return_ = State::kTopLevel;
  bool vmdesc_seen_ = false;

  MigrationStreamStats stats_;
};

const char* PhaseName(MigrationStreamParser::Phase p);

// Rebuilds a PAGE or ZERO record from its fields (raw is ignored), appending
// to `out`: be64 (offset | flags), then [u8 len, idstr] unless `continued`,
// then one fill byte (ZERO) or kTargetPageSize bytes (PAGE).
// EINVAL if the offset is not page-aligned, the idstr is empty or longer
// than 255 bytes, or a PAGE record's data is not exactly one page.
Status EncodePageRecord(const PageRecord& record, std::vector<uint8_t>& out);

}  // namespace kagemusha::memcache

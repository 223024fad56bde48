// QEMU 7.2 migration stream parser; see the header for the contract and
// docs/memcache.md for the layouts. Pure: no I/O, no logging, fuzzed.
#include "kagemusha/memcache/migration_stream.h"

#include <algorithm>
#include <bit>
#include <utility>

#include "kagemusha/common/coding.h"

namespace kagemusha::memcache {
namespace {

// Largest item ever buffered between Feed calls: a PAGE record with a full
// idstr. Opaque payloads (command data, PACKAGED, VMDESCRIPTION) stream
// through without buffering, so this bounds the parser's memory.
constexpr size_t kAppendChunk = 8192;
// QEMU's own limits (savevm.c): machine names are short; packaged blobs are
// at most MAX_VM_CMD_PACKAGED_SIZE (16 MiB).
constexpr uint32_t kMaxMachineName = 256;
constexpr uint32_t kMaxPackaged = 1u << 24;
constexpr uint32_t kMaxCapabilities = 64;
constexpr size_t kMaxRamBlocks = 1024;
constexpr uint32_t kRamSectionVersion = 4;
constexpr uint32_t kTargetPageBits = 12;

std::string Hex(uint64_t v) {
  static const char* d = "0123456789abcdef";
  std::string s = "0x";
  bool started = false;
  for (int i = 60; i >= 0; i -= 4) {
    unsigned nib = (v >> i) & 0xf;
    if (nib || started || i == 0) {
      s += d[nib];
      started = true;
    }
  }
  return s;
}

std::string_view AsString(std::span<const uint8_t> b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

// Reads a u8-length-prefixed string; nullopt if incomplete.
std::optional<std::string_view> ReadShortString(ByteReader& r) {
  auto len = r.U8();
  if (!len) return std::nullopt;
  auto b = r.Bytes(*len);
  if (!b) return std::nullopt;
  return AsString(*b);
}

}  // namespace

const char* PhaseName(MigrationStreamParser::Phase p) {
  using P = MigrationStreamParser::Phase;
  switch (p) {
    case P::kHeader:
      return "header";
    case P::kRam:
      return "ram";
    case P::kPostcopy:
      return "postcopy";
    case P::kDeviceState:
      return "device-state";
    case P::kAfterEof:
      return "after-eof";
    case P::kFallback:
      return "fallback";
  }
  return "?";
}

void MigrationStreamParser::GiveUp(FallbackKind kind, std::string reason) {
  Fallback f{kind, stream_pos_, std::move(reason)};
  pending_fallback_ = f;
  fallback_ = std::move(f);
  state_ = State::kTail;
  phase_ = Phase::kFallback;
  rewrite_closed_ = true;
}

const RamBlockInfo* MigrationStreamParser::FindBlock(std::string_view id) const {
  for (const auto& b : blocks_)
    if (b.id == id) return &b;
  return nullptr;
}

void MigrationStreamParser::FlushPassthrough(MigrationStreamVisitor& v) {
  if (pass_len_ > 0) v.OnPassthrough({pass_begin_, pass_len_});
  pass_begin_ = nullptr;
  pass_len_ = 0;
}

void MigrationStreamParser::Feed(std::span<const uint8_t> data, MigrationStreamVisitor& v) {
  while (!data.empty()) {
    if (buf_.empty()) {
      size_t used = ParseSpan(data, v);
      data = data.subspan(used);
      if (!data.empty()) {
        // An incomplete item (smaller than one page record) waits for more.
        buf_.assign(data.begin(), data.end());
        data = {};
      }
      continue;
    }
    size_t old = buf_.size();
    size_t take = std::min(data.size(), kAppendChunk);
    buf_.insert(buf_.end(), data.begin(), data.begin() + take);
    size_t used = ParseSpan(buf_, v);
    if (used >= old) {
      // The buffered item completed: give the bytes not consumed back to
      // `data` and continue without copying.
      data = data.subspan(used - old);
      buf_.clear();
    } else {
      buf_.erase(buf_.begin(), buf_.begin() + used);
      data = data.subspan(take);
    }
  }
}

size_t MigrationStreamParser::ParseSpan(std::span<const uint8_t> in, MigrationStreamVisitor& v) {
  size_t pos = 0;
  while (pos < in.size()) {
    size_t used = 0;
    State before = state_;
    Step step = ParseOne(in.subspan(pos), used, v);
    if (pending_fallback_) {
      FlushPassthrough(v);
      v.OnFallback(*pending_fallback_);
      pending_fallback_.reset();
    }
    if (step == Step::kNeedMore) break;
    if (used == 0) {
      // A state change without consuming (e.g. into the tail); must progress.
      if (state_ == before) break;  // cannot happen; guards against a loop
      continue;
    }
    // Page records flush and report themselves; everything else coalesces.
    if (item_reported_) {
      item_reported_ = false;
    } else if (pass_len_ > 0 && pass_begin_ + pass_len_ == in.data() + pos) {
      pass_len_ += used;
    } else {
      FlushPassthrough(v);
      pass_begin_ = in.data() + pos;
      pass_len_ = used;
    }
    pos += used;
    stats_.bytes += used;
    stream_pos_ += used;
  }
  FlushPassthrough(v);
  return pos;
}

MigrationStreamParser::Step MigrationStreamParser::ParseOne(std::span<const uint8_t> in,
                                                            size_t& used,
                                                            MigrationStreamVisitor& v) {
  switch (state_) {
    case State::kFileHeader: {
      if (in.size() < 8) return Step::kNeedMore;
      uint32_t magic = LoadBe32(in.data());
      uint32_t version = LoadBe32(in.data() + 4);
      if (magic != kQemuVmFileMagic) {
        GiveUp(FallbackKind::kMalformed, "not a QEMU migration stream (magic " + Hex(magic) + ")");
        return Step::kDone;
      }
      if (version != kQemuVmFileVersion) {
        GiveUp(FallbackKind::kUnsupported, "stream version " + std::to_string(version));
        return Step::kDone;
      }
      used = 8;
      state_ = State::kTopLevel;
      return Step::kDone;
    }
    case State::kConfigSubsectionOrSection:
      if (in[0] == uint8_t(SectionType::kSubsection)) return ParseSubsection(in, used);
      state_ = State::kTopLevel;
      return Step::kDone;
    case State::kTopLevel:
      return ParseTopLevel(in, used);
    case State::kRamRecord: {
      Step s = ParseRamRecord(in, used, v);
      return s;
    }
    case State::kRamBlockList:
      return ParseRamBlock(in, used);
    case State::kFooter:
      return ParseFooter(in, used);
    case State::kAfterEof:
      return ParseAfterEof(in, used);
    case State::kSkip: {
      uint64_t n = std::min<uint64_t>(skip_remaining_, in.size());
      used = size_t(n);
      skip_remaining_ -= n;
      if (skip_remaining_ == 0) state_ = skip_return_;
      return Step::kDone;
    }
    case State::kTail:
      used = in.size();
      return Step::kDone;
  }
  return Step::kNeedMore;
}

MigrationStreamParser::Step MigrationStreamParser::ParseTopLevel(std::span<const uint8_t> in,
                                                                 size_t& used) {
  auto type = SectionType(in[0]);
  switch (type) {
    case SectionType::kConfiguration:
      return ParseConfiguration(in, used);
    case SectionType::kCommand:
      return ParseCommand(in, used);
    case SectionType::kStart:
    case SectionType::kPart:
    case SectionType::kEnd:
      return ParseSectionHeader(in, used);
    case SectionType::kFull:
      // Device state is not self-delimiting: the rest is passthrough. This is
      // the normal end of the rewriting window, not a fallback.
      rewrite_closed_ = true;
      phase_ = Phase::kDeviceState;
      state_ = State::kTail;
      used = 0;
      return Step::kDone;
    case SectionType::kEof:
      used = 1;
      phase_ = Phase::kAfterEof;
      state_ = State::kAfterEof;
      rewrite_closed_ = true;
      return Step::kDone;
    default:
      GiveUp(FallbackKind::kMalformed, "unknown section type " + Hex(in[0]));
      return Step::kDone;
  }
}

MigrationStreamParser::Step MigrationStreamParser::ParseConfiguration(std::span<const uint8_t> in,
                                                                      size_t& used) {
  ByteReader r(in);
  r.U8();
  auto len = r.U32();
  if (!len) return Step::kNeedMore;
  if (*len == 0 || *len > kMaxMachineName) {
    GiveUp(FallbackKind::kMalformed, "machine name length " + std::to_string(*len));
    return Step::kDone;
  }
  auto name = r.Bytes(*len);
  if (!name) return Step::kNeedMore;
  machine_ = std::string(AsString(*name));
  used = r.position();
  state_ = State::kConfigSubsectionOrSection;
  return Step::kDone;
}

MigrationStreamParser::Step MigrationStreamParser::ParseSubsection(std::span<const uint8_t> in,
                                                                   size_t& used) {
  ByteReader r(in);
  r.U8();
  auto name = ReadShortString(r);
  if (!name) return Step::kNeedMore;
  auto version = r.U32();
  if (!version) return Step::kNeedMore;
  if (*name == "configuration/target-page-bits") {
    auto bits = r.U32();
    if (!bits) return Step::kNeedMore;
    if (*bits != kTargetPageBits) {
      GiveUp(FallbackKind::kUnsupported, "target page bits " + std::to_string(*bits));
      return Step::kDone;
    }
  } else if (*name == "configuration/capabilities") {
    auto count = r.U32();
    if (!count) return Step::kNeedMore;
    if (*count > kMaxCapabilities) {
      GiveUp(FallbackKind::kMalformed, "capability count " + std::to_string(*count));
      return Step::kDone;
    }
    bool ignore_shared = false;
    for (uint32_t i = 0; i < *count; ++i) {
      auto cap = ReadShortString(r);
      if (!cap) return Step::kNeedMore;
      if (*cap == "x-ignore-shared") ignore_shared = true;
    }
    ignore_shared_ = ignore_shared;
  } else if (*name == "configuration/uuid") {
    if (!r.Bytes(16)) return Step::kNeedMore;
  } else {
    GiveUp(FallbackKind::kUnsupported, "configuration subsection '" + std::string(*name) + "'");
    return Step::kDone;
  }
  used = r.position();
  return Step::kDone;
}

MigrationStreamParser::Step MigrationStreamParser::ParseCommand(std::span<const uint8_t> in,
                                                                size_t& used) {
  ByteReader r(in);
  r.U8();
  auto cmd = r.U16();
  auto len = r.U16();
  if (!len) return Step::kNeedMore;
  switch (MigCommand(*cmd)) {
    case MigCommand::kPackaged: {
      if (*len != 4) {
        GiveUp(FallbackKind::kMalformed, "PACKAGED length " + std::to_string(*len));
        return Step::kDone;
      }
      auto size = r.U32();
      if (!size) return Step::kNeedMore;
      if (*size > kMaxPackaged) {
        GiveUp(FallbackKind::kMalformed, "PACKAGED size " + std::to_string(*size));
        return Step::kDone;
      }
      // The package holds LISTEN, the device state (FULL sections) and RUN:
      // forward it opaque. Pages after it are postcopy pages: not rewritten.
      rewrite_closed_ = true;
      phase_ = Phase::kPostcopy;
      skip_remaining_ = *size;
      skip_return_ = State::kTopLevel;
      state_ = *size ? State::kSkip : State::kTopLevel;
      break;
    }
    case MigCommand::kPostcopyAdvise:
      if (*len != 16 && *len != 0) {
        GiveUp(FallbackKind::kMalformed, "POSTCOPY_ADVISE length " + std::to_string(*len));
        return Step::kDone;
      }
      if (!r.Bytes(*len)) return Step::kNeedMore;
      // A zero-length advise is sent for dirty-bitmap-only postcopy.
      if (*len == 16) postcopy_advised_ = true;
      break;
    case MigCommand::kOpenReturnPath:
    case MigCommand::kPing:
    case MigCommand::kPostcopyListen:
    case MigCommand::kPostcopyRun:
    case MigCommand::kPostcopyRamDiscard:
    case MigCommand::kRecvBitmap:
    case MigCommand::kPostcopyResume:
    case MigCommand::kEnableColo:
      // Opaque payload: streamed, never buffered.
      skip_remaining_ = *len;
      skip_return_ = State::kTopLevel;
      if (*len) state_ = State::kSkip;
      break;
    default:
      GiveUp(FallbackKind::kUnsupported, "migration command " + std::to_string(*cmd));
      return Step::kDone;
  }
  if (phase_ == Phase::kHeader) phase_ = Phase::kRam;
  ++stats_.commands;
  used = r.position();
  return Step::kDone;
}

MigrationStreamParser::Step MigrationStreamParser::ParseSectionHeader(std::span<const uint8_t> in,
                                                                      size_t& used) {
  ByteReader r(in);
  auto type = SectionType(*r.U8());
  auto id = r.U32();
  if (!id) return Step::kNeedMore;
  if (type == SectionType::kStart) {
    auto idstr = ReadShortString(r);
    if (!idstr) return Step::kNeedMore;
    auto instance = r.U32();
    auto version = r.U32();
    if (!version) return Step::kNeedMore;
    if (*idstr != kRamSectionId) {
      GiveUp(FallbackKind::kUnsupported, "iterable section '" + std::string(*idstr) + "'");
      return Step::kDone;
    }
    if (ram_section_id_ || *instance != 0 || *version != kRamSectionVersion) {
      GiveUp(ram_section_id_ ? FallbackKind::kMalformed : FallbackKind::kUnsupported,
             "ram section start (again, or instance/version " + std::to_string(*instance) + "/" +
                 std::to_string(*version) + ")");
      return Step::kDone;
    }
    ram_section_id_ = *id;
  } else if (!ram_section_id_ || *id != *ram_section_id_) {
    GiveUp(FallbackKind::kUnsupported, "section id " + std::to_string(*id) + " is not ram");
    return Step::kDone;
  } else if (rewrite_closed_ && phase_ != Phase::kPostcopy) {
    GiveUp(FallbackKind::kMalformed, "ram section after its end");
    return Step::kDone;
  }
  current_section_ = *id;
  current_is_end_ = type == SectionType::kEnd;
  if (phase_ == Phase::kHeader) phase_ = Phase::kRam;
  ++stats_.sections;
  ++stats_.ram_iterations;
  state_ = State::kRamRecord;
  used = r.position();
  return Step::kDone;
}

MigrationStreamParser::Step MigrationStreamParser::ParseRamRecord(std::span<const uint8_t> in,
                                                                  size_t& used,
                                                                  MigrationStreamVisitor& v) {
  ByteReader r(in);
  auto word = r.U64();
  if (!word) return Step::kNeedMore;
  uint16_t flags = uint16_t(*word & ~kTargetPageMask);
  uint64_t addr = *word & kTargetPageMask;

  if (flags == ram_flag::kEos) {
    used = 8;
    state_ = State::kFooter;
    return Step::kDone;
  }
  if (flags & ram_flag::kMemSize) {
    if (flags != ram_flag::kMemSize || !blocks_.empty() || current_is_end_ ||
        stats_.ram_iterations != 1) {
      GiveUp(FallbackKind::kMalformed, "unexpected MEM_SIZE record, flags " + Hex(flags));
      return Step::kDone;
    }
    ram_total_ = addr;
    ram_list_remaining_ = addr;
    state_ = addr ? State::kRamBlockList : State::kRamRecord;
    used = 8;
    return Step::kDone;
  }
  uint16_t kind = flags & ~ram_flag::kContinue;
  if (kind != ram_flag::kZero && kind != ram_flag::kPage) {
    const char* what = (kind & ram_flag::kXbzrle)         ? "XBZRLE"
                       : (kind & ram_flag::kCompressPage) ? "COMPRESS_PAGE"
                       : (kind & ram_flag::kHook)         ? "HOOK (RDMA)"
                       : (kind & ram_flag::kMultifdFlush) ? "MULTIFD_FLUSH"
                                                          : "unknown";
    GiveUp(FallbackKind::kUnsupported, std::string(what) + " RAM record, flags " + Hex(flags));
    return Step::kDone;
  }
  int block_index = last_block_;
  bool continued = flags & ram_flag::kContinue;
  if (continued) {
    if (block_index < 0) {
      GiveUp(FallbackKind::kMalformed, "CONTINUE page record with no previous block");
      return Step::kDone;
    }
  } else {
    auto idstr = ReadShortString(r);
    if (!idstr) return Step::kNeedMore;
    const RamBlockInfo* b = FindBlock(*idstr);
    if (!b) {
      GiveUp(FallbackKind::kMalformed,
             "page record for unknown RAMBlock '" + std::string(*idstr) + "'");
      return Step::kDone;
    }
    block_index = int(b - blocks_.data());
  }
  const RamBlockInfo& block = blocks_[size_t(block_index)];
  if (addr >= block.used_length || block.used_length - addr < kTargetPageSize) {
    GiveUp(FallbackKind::kMalformed, "page offset " + Hex(addr) + " beyond RAMBlock '" + block.id +
                                         "' of " + Hex(block.used_length));
    return Step::kDone;
  }
  PageRecord rec;
  rec.block_id = block.id;
  rec.offset = addr;
  rec.continued = continued;
  rec.rewritable = !rewrite_closed_;
  if (kind == ram_flag::kZero) {
    auto fill = r.U8();
    if (!fill) return Step::kNeedMore;
    rec.zero = true;
    rec.fill = *fill;
    ++stats_.zero_pages;
  } else {
    auto data = r.Bytes(kTargetPageSize);
    if (!data) return Step::kNeedMore;
    rec.data = *data;
    ++stats_.pages;
  }
  if (rec.rewritable) ++stats_.rewritable_pages;
  last_block_ = block_index;
  rec.raw = in.first(r.position());
  // Page records are reported on their own; flush what came before them.
  FlushPassthrough(v);
  v.OnPage(rec);
  // Consumed, but already reported: ParseSpan must not add it to passthrough.
  used = r.position();
  item_reported_ = true;
  return Step::kDone;
}

MigrationStreamParser::Step MigrationStreamParser::ParseRamBlock(std::span<const uint8_t> in,
                                                                 size_t& used) {
  ByteReader r(in);
  auto idstr = ReadShortString(r);
  if (!idstr) return Step::kNeedMore;
  auto length = r.U64();
  if (!length) return Step::kNeedMore;
  RamBlockInfo b;
  b.id = std::string(*idstr);
  b.used_length = *length;
  if (postcopy_advised_) {
    // Sent only when the block's page size differs from the host's. The
    // alternatives here (next idstr: first byte non-zero; next record: low
    // flag bits set) are never a power of two >= 8 KiB, so peeking is exact.
    if (r.remaining() < 8) return Step::kNeedMore;
    uint64_t peek = LoadBe64(in.data() + r.position());
    if (std::has_single_bit(peek) && peek >= 2 * kTargetPageSize && peek <= (uint64_t{1} << 40)) {
      b.page_size = peek;
      r.U64();
    }
  }
  if (ignore_shared_) {
    auto a = r.U64();
    if (!a) return Step::kNeedMore;
    b.addr = *a;
  }
  if (idstr->empty() || *length == 0 || *length > ram_list_remaining_ || FindBlock(b.id) ||
      blocks_.size() >= kMaxRamBlocks) {
    GiveUp(FallbackKind::kMalformed, "bad RAMBlock entry '" + b.id + "' length " + Hex(*length));
    return Step::kDone;
  }
  ram_list_remaining_ -= *length;
  blocks_.push_back(std::move(b));
  if (ram_list_remaining_ == 0) state_ = State::kRamRecord;
  used = r.position();
  return Step::kDone;
}

MigrationStreamParser::Step MigrationStreamParser::ParseFooter(std::span<const uint8_t> in,
                                                               size_t& used) {
  bool present = in[0] == uint8_t(SectionType::kFooter);
  if (footers_ && *footers_ != present) {
    GiveUp(FallbackKind::kMalformed,
           present ? "unexpected section footer" : "missing section footer");
    return Step::kDone;
  }
  if (present) {
    if (in.size() < 5) return Step::kNeedMore;
    uint32_t id = LoadBe32(in.data() + 1);
    if (id != current_section_) {
      GiveUp(FallbackKind::kMalformed, "section footer for " + std::to_string(id) + " in section " +
                                           std::to_string(current_section_));
      return Step::kDone;
    }
    used = 5;
  }
  footers_ = present;
  if (current_is_end_) rewrite_closed_ = true;
  state_ = State::kTopLevel;
  return Step::kDone;
}

MigrationStreamParser::Step MigrationStreamParser::ParseAfterEof(std::span<const uint8_t> in,
                                                                 size_t& used) {
  if (in[0] != uint8_t(SectionType::kVmDescription) || vmdesc_seen_) {
    GiveUp(FallbackKind::kMalformed, "data after the end of the stream");
    return Step::kDone;
  }
  if (in.size() < 5) return Step::kNeedMore;
  vmdesc_seen_ = true;
  skip_remaining_ = LoadBe32(in.data() + 1);
  skip_return_ = State::kAfterEof;
  if (skip_remaining_) state_ = State::kSkip;
  used = 5;
  return Step::kDone;
}

Status MigrationStreamParser::Finish(MigrationStreamVisitor& v) {
  bool clean = buf_.empty() && (state_ == State::kAfterEof || state_ == State::kTail);
  std::string where = std::string(PhaseName(phase_));
  if (!buf_.empty()) {
    v.OnPassthrough(buf_);
    stats_.bytes += buf_.size();
    stream_pos_ += buf_.size();
    buf_.clear();
  }
  if (clean) return Ok();
  return Fail(Error::Protocol("migration stream truncated at offset " +
                              std::to_string(stream_pos_) + " (phase " + where + ")"));
}

Status EncodePageRecord(const PageRecord& rec, std::vector<uint8_t>& out) {
  if (rec.offset & ~kTargetPageMask) return Fail(Error::Invalid("page offset not aligned"));
  if (!rec.continued && (rec.block_id.empty() || rec.block_id.size() > 255))
    return Fail(Error::Invalid("RAMBlock idstr must be 1..255 bytes"));
  if (!rec.zero && rec.data.size() != kTargetPageSize)
    return Fail(Error::Invalid("PAGE record data must be one target page"));
  ByteWriter w(out);
  uint64_t flags = rec.zero ? ram_flag::kZero : ram_flag::kPage;
  if (rec.continued) flags |= ram_flag::kContinue;
  w.U64(rec.offset | flags);
  if (!rec.continued) {
    w.U8(uint8_t(rec.block_id.size()));
    w.Str(rec.block_id);
  }
  if (rec.zero) {
    w.U8(rec.fill);
  } else {
    w.Bytes(rec.data);
  }
  return Ok();
}

}  // namespace kagemusha::memcache

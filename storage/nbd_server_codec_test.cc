// Table-driven tests of the pure NBD server codec and handshake machine.
#include "nbd_server_codec.h"

#include <gtest/gtest.h>

#include "kagemusha/common/coding.h"

namespace kagemusha::storage::nbd {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes Be32(uint32_t v) {
  Bytes b(4);
  StoreBe32(b.data(), v);
  return b;
}
Bytes Be16(uint16_t v) {
  Bytes b(2);
  StoreBe16(b.data(), v);
  return b;
}
Bytes Cat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}
Bytes Str(std::string_view s) { return Bytes(s.begin(), s.end()); }
Bytes OptHeader(uint64_t magic, uint32_t option, uint32_t length) {
  Bytes b(16);
  StoreBe64(b.data(), magic);
  StoreBe32(b.data() + 8, option);
  StoreBe32(b.data() + 12, length);
  return b;
}
Bytes InfoPayload(std::string_view name, std::vector<uint16_t> infos) {
  Bytes b = Cat({Be32(uint32_t(name.size())), Str(name), Be16(uint16_t(infos.size()))});
  for (auto i : infos) b = Cat({b, Be16(i)});
  return b;
}
Bytes MetaPayload(std::string_view name, std::vector<std::string> queries) {
  Bytes b = Cat({Be32(uint32_t(name.size())), Str(name), Be32(uint32_t(queries.size()))});
  for (auto& q : queries) b = Cat({b, Be32(uint32_t(q.size())), Str(q)});
  return b;
}

struct OptionReply {
  uint32_t option, type;
  Bytes payload;
};
// Splits server output into option replies; fails the test on bad framing.
std::vector<OptionReply> ParseReplies(const Bytes& out) {
  std::vector<OptionReply> v;
  ByteReader r(out);
  while (!r.empty()) {
    auto magic = r.U64();
    auto opt = r.U32();
    auto type = r.U32();
    auto len = r.U32();
    EXPECT_TRUE(len.has_value());
    if (!len) break;
    EXPECT_EQ(*magic, kOptReplyMagic);
    auto p = r.Bytes(*len);
    EXPECT_TRUE(p.has_value());
    if (!p) break;
    v.push_back({*opt, *type, Bytes(p->begin(), p->end())});
  }
  return v;
}

ExportDescriptor Export(std::string name, uint64_t size = 1 << 20, bool ro = false) {
  ExportDescriptor e;
  e.name = std::move(name);
  e.description = "test export";
  e.size = size;
  e.read_only = ro;
  e.can_flush = e.can_fua = e.can_trim = e.can_zero = e.can_fast_zero = e.can_cache = true;
  return e;
}

HandshakeMachine Machine() {
  HandshakeMachine m({Export(""), Export("disk"), Export("ro", 8192, true)});
  uint8_t flags[4];
  StoreBe32(flags, kClientFixedNewstyle | kClientNoZeroes);
  EXPECT_EQ(m.OnClientFlags(flags), HandshakeStep::kContinue);
  return m;
}

HandshakeStep Send(HandshakeMachine& m, uint32_t option, const Bytes& payload, Bytes& out) {
  out.clear();
  return m.OnOption({option, uint32_t(payload.size())}, payload, out);
}

// --- Greeting and client flags ---------------------------------------------

TEST(NbdGreeting, CarriesBothMagicsAndFixedNewstyleNoZeroes) {
  Bytes g = EncodeGreeting();
  ASSERT_EQ(g.size(), 18u);
  EXPECT_EQ(LoadBe64(g.data()), kNbdMagic);
  EXPECT_EQ(LoadBe64(g.data() + 8), kIHaveOpt);
  EXPECT_EQ(LoadBe16(g.data() + 16), kFlagFixedNewstyle | kFlagNoZeroes);
}

TEST(NbdClientFlags, TableOfMalformedAndValidFlags) {
  struct Case {
    const char* what;
    Bytes in;
    bool ok;
  } cases[] = {
      {"empty", {}, false},
      {"three bytes", {0, 0, 1}, false},
      {"fixed newstyle", Be32(1), true},
      {"no zeroes", Be32(3), true},
      {"zero flags", Be32(0), true},
      {"unknown bit 2", Be32(4), false},
      {"high bit", Be32(0x80000001u), false},
  };
  for (const auto& c : cases) EXPECT_EQ(ParseClientFlags(c.in).has_value(), c.ok) << c.what;
}

// --- Option parsing ---------------------------------------------------------

TEST(NbdOptionHeader, RejectsShortBuffersAndBadMagic) {
  struct Case {
    const char* what;
    Bytes in;
    bool ok;
  } cases[] = {
      {"empty", {}, false},
      {"15 bytes", Bytes(15, 0), false},
      {"bad magic", OptHeader(kNbdMagic, kOptGo, 0), false},
      {"good", OptHeader(kIHaveOpt, kOptGo, 7), true},
  };
  for (const auto& c : cases) EXPECT_EQ(ParseOptionHeader(c.in).has_value(), c.ok) << c.what;
  auto h = ParseOptionHeader(OptHeader(kIHaveOpt, 77, 0xffffffffu));
  ASSERT_TRUE(h);
  EXPECT_EQ(h->option, 77u);
  EXPECT_EQ(h->length, 0xffffffffu);
}

TEST(NbdInfoRequest, TableOfMalformedPayloads) {
  std::string long_name(4097, 'x');
  struct Case {
    const char* what;
    Bytes in;
    bool ok;
    uint32_t err;
  } cases[] = {
      {"empty", {}, false, kRepErrInvalid},
      {"length only", Be32(0), false, kRepErrInvalid},
      {"name past end", Cat({Be32(10), Str("abc")}), false, kRepErrInvalid},
      {"name too long", InfoPayload(long_name, {}), false, kRepErrInvalid},
      {"NUL in name", InfoPayload(std::string("a\0b", 3), {}), false, kRepErrInvalid},
      {"count too big", Cat({Be32(0), Be16(2), Be16(1)}), false, kRepErrInvalid},
      {"trailing byte", Cat({InfoPayload("a", {1}), Bytes{0}}), false, kRepErrInvalid},
      {"default export", InfoPayload("", {}), true, 0},
      {"name and infos", InfoPayload("disk", {kInfoName, kInfoBlockSize, 99}), true, 0},
  };
  for (const auto& c : cases) {
    auto r = ParseInfoRequest(c.in);
    EXPECT_EQ(r.has_value(), c.ok) << c.what;
    if (!r) {
      EXPECT_EQ(OptionErrorReply(r.error()), c.err) << c.what;
    }
  }
  auto r = ParseInfoRequest(InfoPayload("disk", {1, 3}));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->name, "disk");
  EXPECT_EQ(r->infos, (std::vector<uint16_t>{1, 3}));
}

TEST(NbdMetaContextRequest, TableOfMalformedPayloads) {
  std::vector<std::string> many(kMaxMetaQueries + 1, "base:allocation");
  struct Case {
    const char* what;
    Bytes in;
    bool ok;
    uint32_t err;
  } cases[] = {
      {"empty", {}, false, kRepErrInvalid},
      {"no query count", Cat({Be32(1), Str("a")}), false, kRepErrInvalid},
      {"query past end", Cat({Be32(0), Be32(1), Be32(50), Str("base:")}), false, kRepErrInvalid},
      {"missing query", Cat({Be32(0), Be32(2), Be32(1), Str("x")}), false, kRepErrInvalid},
      {"query too long", MetaPayload("", {std::string(5000, 'q')}), false, kRepErrInvalid},
      {"too many queries", MetaPayload("", many), false, kRepErrTooBig},
      {"trailing", Cat({MetaPayload("", {}), Bytes{1}}), false, kRepErrInvalid},
      {"no queries", MetaPayload("disk", {}), true, 0},
      {"one query", MetaPayload("disk", {"base:allocation"}), true, 0},
  };
  for (const auto& c : cases) {
    auto r = ParseMetaContextRequest(c.in);
    EXPECT_EQ(r.has_value(), c.ok) << c.what;
    if (!r) {
      EXPECT_EQ(OptionErrorReply(r.error()), c.err) << c.what;
    }
  }
}

// --- Handshake machine ------------------------------------------------------

TEST(NbdHandshake, UnknownOptionGetsErrUnsupAndGoStillWorks) {
  auto m = Machine();
  Bytes out;
  EXPECT_EQ(Send(m, 4242, Str("junk"), out), HandshakeStep::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].option, 4242u);
  EXPECT_EQ(replies[0].type, kRepErrUnsup);
  EXPECT_EQ(Send(m, kOptStartTls, {}, out), HandshakeStep::kContinue);
  EXPECT_EQ(ParseReplies(out)[0].type, kRepErrUnsup);
  EXPECT_EQ(Send(m, kOptGo, InfoPayload("disk", {}), out), HandshakeStep::kTransmission);
  replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 2u);
  EXPECT_EQ(replies[0].type, kRepInfo);
  ASSERT_EQ(replies[0].payload.size(), 12u);
  EXPECT_EQ(LoadBe16(replies[0].payload.data()), kInfoExport);
  EXPECT_EQ(LoadBe64(replies[0].payload.data() + 2), 1u << 20);
  EXPECT_EQ(replies[1].type, kRepAck);
  EXPECT_EQ(m.negotiated().export_index, 1u);
}

TEST(NbdHandshake, GoForUnknownExportIsErrUnknownAndHandshakeContinues) {
  auto m = Machine();
  Bytes out;
  EXPECT_EQ(Send(m, kOptGo, InfoPayload("nope", {}), out), HandshakeStep::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kRepErrUnknown);
}

TEST(NbdHandshake, InfoAnswersNameDescriptionBlockSizeAndStaysInHandshake) {
  auto m = Machine();
  Bytes out;
  EXPECT_EQ(Send(m, kOptInfo, InfoPayload("disk", {kInfoName, kInfoDescription, kInfoBlockSize, 77}),
                 out),
            HandshakeStep::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 5u);
  EXPECT_EQ(LoadBe16(replies[1].payload.data()), kInfoName);
  EXPECT_EQ(Bytes(replies[1].payload.begin() + 2, replies[1].payload.end()), Str("disk"));
  EXPECT_EQ(LoadBe16(replies[2].payload.data()), kInfoDescription);
  ASSERT_EQ(replies[3].payload.size(), 14u);
  EXPECT_EQ(LoadBe16(replies[3].payload.data()), kInfoBlockSize);
  EXPECT_EQ(LoadBe32(replies[3].payload.data() + 2), kMinBlockSize);
  EXPECT_EQ(LoadBe32(replies[3].payload.data() + 6), kPreferredBlockSize);
  EXPECT_EQ(LoadBe32(replies[3].payload.data() + 10), kMaxPayload);
  EXPECT_EQ(replies[4].type, kRepAck);
}

TEST(NbdHandshake, OversizedOptionIsDiscardedAndAbsurdOneDisconnects) {
  auto m = Machine();
  using A = HandshakeMachine::PayloadAction;
  EXPECT_EQ(m.OnOptionHeader({kOptGo, kMaxOptionLength}), A::kRead);
  EXPECT_EQ(m.OnOptionHeader({kOptGo, kMaxOptionLength + 1}), A::kDiscard);
  EXPECT_EQ(m.OnOptionHeader({kOptGo, kMaxOptionDiscard + 1}), A::kDisconnect);
  EXPECT_EQ(m.OnOptionHeader({0xdead, 0xffffffffu}), A::kDisconnect);
  Bytes out;
  EXPECT_EQ(m.OnOversizedOption({kOptGo, kMaxOptionLength + 1}, out), HandshakeStep::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kRepErrTooBig);
}

TEST(NbdHandshake, RejectsOversizedExportName) {
  auto m = Machine();
  using A = HandshakeMachine::PayloadAction;
  EXPECT_EQ(m.OnOptionHeader({kOptExportName, 4096}), A::kRead);
  EXPECT_EQ(m.OnOptionHeader({kOptExportName, 4097}), A::kDisconnect);
  // Through INFO/GO a long name is an error reply, not a disconnect.
  Bytes out;
  EXPECT_EQ(Send(m, kOptGo, InfoPayload(std::string(4097, 'n'), {}), out), HandshakeStep::kContinue);
  EXPECT_EQ(ParseReplies(out)[0].type, kRepErrInvalid);
}

TEST(NbdHandshake, ExportNameReplyRespectsNoZeroes) {
  for (bool no_zeroes : {false, true}) {
    HandshakeMachine m({Export("disk", 12345)});
    uint8_t flags[4];
    StoreBe32(flags, kClientFixedNewstyle | (no_zeroes ? kClientNoZeroes : 0));
    ASSERT_EQ(m.OnClientFlags(flags), HandshakeStep::kContinue);
    Bytes out;
    EXPECT_EQ(Send(m, kOptExportName, Str("disk"), out), HandshakeStep::kTransmission);
    ASSERT_EQ(out.size(), no_zeroes ? 10u : 134u);
    EXPECT_EQ(LoadBe64(out.data()), 12345u);
    EXPECT_EQ(LoadBe16(out.data() + 8), m.negotiated().tx_flags);
  }
}

TEST(NbdHandshake, ExportNameForUnknownExportHardDisconnects) {
  auto m = Machine();
  Bytes out;
  EXPECT_EQ(Send(m, kOptExportName, Str("nope"), out), HandshakeStep::kHardDisconnect);
  EXPECT_TRUE(out.empty());
}

TEST(NbdHandshake, AbortIsAckedThenClosed) {
  auto m = Machine();
  Bytes out;
  EXPECT_EQ(Send(m, kOptAbort, {}, out), HandshakeStep::kClose);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 1u);
  EXPECT_EQ(replies[0].type, kRepAck);
}

TEST(NbdHandshake, ListNamesEveryExportAndRejectsData) {
  auto m = Machine();
  Bytes out;
  EXPECT_EQ(Send(m, kOptList, {}, out), HandshakeStep::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 4u);
  EXPECT_EQ(replies[1].type, kRepServer);
  EXPECT_EQ(LoadBe32(replies[1].payload.data()), 4u);
  EXPECT_EQ(Bytes(replies[1].payload.begin() + 4, replies[1].payload.begin() + 8), Str("disk"));
  EXPECT_EQ(replies[3].type, kRepAck);
  EXPECT_EQ(Send(m, kOptList, Str("x"), out), HandshakeStep::kContinue);
  EXPECT_EQ(ParseReplies(out)[0].type, kRepErrInvalid);
}

TEST(NbdHandshake, MetaContextNeedsStructuredRepliesAndMatchingExport) {
  auto m = Machine();
  Bytes out;
  EXPECT_EQ(Send(m, kOptSetMetaContext, MetaPayload("disk", {"base:allocation"}), out),
            HandshakeStep::kContinue);
  EXPECT_EQ(ParseReplies(out)[0].type, kRepErrInvalid);
  EXPECT_EQ(Send(m, kOptStructuredReply, {}, out), HandshakeStep::kContinue);
  EXPECT_EQ(ParseReplies(out)[0].type, kRepAck);
  // LIST with no query lists base:allocation with id 0.
  EXPECT_EQ(Send(m, kOptListMetaContext, MetaPayload("disk", {}), out), HandshakeStep::kContinue);
  auto replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 2u);
  EXPECT_EQ(replies[0].type, kRepMetaContext);
  EXPECT_EQ(LoadBe32(replies[0].payload.data()), 0u);
  // Unknown namespaces are ignored: only ACK.
  EXPECT_EQ(Send(m, kOptSetMetaContext, MetaPayload("disk", {"qemu:dirty-bitmap:x"}), out),
            HandshakeStep::kContinue);
  EXPECT_EQ(ParseReplies(out).size(), 1u);
  EXPECT_EQ(Send(m, kOptSetMetaContext, MetaPayload("disk", {"base:allocation"}), out),
            HandshakeStep::kContinue);
  replies = ParseReplies(out);
  ASSERT_EQ(replies.size(), 2u);
  EXPECT_EQ(LoadBe32(replies[0].payload.data()), kBaseAllocationId);
  // Selected for "disk", so GO to another export gets no block status.
  HandshakeMachine copy = m;
  EXPECT_EQ(Send(copy, kOptGo, InfoPayload("", {}), out), HandshakeStep::kTransmission);
  EXPECT_FALSE(copy.negotiated().base_allocation);
  EXPECT_EQ(Send(m, kOptGo, InfoPayload("disk", {}), out), HandshakeStep::kTransmission);
  EXPECT_TRUE(m.negotiated().base_allocation);
  EXPECT_TRUE(m.negotiated().structured_replies);
  EXPECT_TRUE(m.negotiated().tx_flags & kTxSendDf);
}

TEST(NbdHandshake, StructuredReplyRejectsPayloadAndRepeats) {
  auto m = Machine();
  Bytes out;
  EXPECT_EQ(Send(m, kOptStructuredReply, Str("x"), out), HandshakeStep::kContinue);
  EXPECT_EQ(ParseReplies(out)[0].type, kRepErrInvalid);
  EXPECT_EQ(Send(m, kOptStructuredReply, {}, out), HandshakeStep::kContinue);
  EXPECT_EQ(Send(m, kOptStructuredReply, {}, out), HandshakeStep::kContinue);
  EXPECT_EQ(ParseReplies(out)[0].type, kRepErrInvalid);
}

TEST(NbdHandshake, PayloadLengthMismatchIsHardDisconnect) {
  auto m = Machine();
  Bytes out, payload = Str("abc");
  EXPECT_EQ(m.OnOption({kOptGo, 10}, payload, out), HandshakeStep::kHardDisconnect);
}

TEST(NbdTransmissionFlags, FollowCapsAndReadOnly) {
  auto rw = Export("a");
  uint16_t f = TransmissionFlags(rw, false);
  EXPECT_TRUE(f & kTxHasFlags);
  EXPECT_TRUE(f & kTxSendFlush);
  EXPECT_TRUE(f & kTxSendTrim);
  EXPECT_TRUE(f & kTxSendWriteZeroes);
  EXPECT_TRUE(f & kTxSendFastZero);
  EXPECT_FALSE(f & kTxSendDf);
  EXPECT_FALSE(f & kTxCanMultiConn);
  EXPECT_TRUE(TransmissionFlags(rw, true) & kTxSendDf);
  rw.can_multi_conn = true;
  EXPECT_TRUE(TransmissionFlags(rw, false) & kTxCanMultiConn);
  auto ro = Export("b", 1, true);
  f = TransmissionFlags(ro, false);
  EXPECT_TRUE(f & kTxReadOnly);
  EXPECT_FALSE(f & (kTxSendTrim | kTxSendWriteZeroes | kTxSendFua));
}

// --- Requests ---------------------------------------------------------------

Bytes RequestBytes(uint32_t magic, uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                   uint32_t length) {
  Bytes b(28);
  StoreBe32(b.data(), magic);
  StoreBe16(b.data() + 4, flags);
  StoreBe16(b.data() + 6, type);
  StoreBe64(b.data() + 8, cookie);
  StoreBe64(b.data() + 16, offset);
  StoreBe32(b.data() + 24, length);
  return b;
}

TEST(NbdRequestHeader, RejectsShortAndBadMagic) {
  EXPECT_FALSE(ParseRequestHeader(Bytes(27, 0)));
  EXPECT_FALSE(ParseRequestHeader(RequestBytes(kSimpleReplyMagic, 0, 0, 1, 0, 1)));
  auto r = ParseRequestHeader(RequestBytes(kRequestMagic, 3, 7, 0x1122334455667788ull, 99, 4096));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->flags, 3);
  EXPECT_EQ(r->type, 7);
  EXPECT_EQ(r->cookie, 0x1122334455667788ull);
  EXPECT_EQ(r->offset, 99u);
  EXPECT_EQ(r->length, 4096u);
}

TEST(NbdValidateRequest, TableOfRequests) {
  const uint64_t size = 1 << 20;
  Negotiated rw{0, true, true, TransmissionFlags(Export("a", size), true), size};
  Negotiated simple{0, false, false, TransmissionFlags(Export("a", size), false), size};
  Negotiated ro{0, true, true, TransmissionFlags(Export("a", size, true), true), size};
  struct Case {
    const char* what;
    const Negotiated& n;
    RequestHeader r;
    uint32_t error;
    uint64_t payload;
    bool disconnect;
  } cases[] = {
      {"read ok", rw, {0, kCmdRead, 1, 0, 4096}, 0, 0, false},
      {"read at end", rw, {0, kCmdRead, 1, size - 1, 1}, 0, 0, false},
      {"read past end", rw, {0, kCmdRead, 1, size - 1, 2}, kErrInval, 0, false},
      {"read offset overflow", rw, {0, kCmdRead, 1, ~0ull - 10, 4096}, kErrInval, 0, false},
      {"read too long", rw, {0, kCmdRead, 1, 0, kMaxPayload + 1}, kErrOverflow, 0, false},
      {"read zero length", rw, {0, kCmdRead, 1, 0, 0}, kErrInval, 0, false},
      {"read DF structured", rw, {kCmdFlagDf, kCmdRead, 1, 0, 512}, 0, 0, false},
      {"read DF simple", simple, {kCmdFlagDf, kCmdRead, 1, 0, 512}, kErrInval, 0, false},
      {"read FUA", rw, {kCmdFlagFua, kCmdRead, 1, 0, 512}, 0, 0, false},
      {"read REQ_ONE", rw, {kCmdFlagReqOne, kCmdRead, 1, 0, 512}, kErrInval, 0, false},
      {"unknown flag", rw, {0x100, kCmdRead, 1, 0, 512}, kErrInval, 0, false},
      {"unknown command", rw, {0, 42, 1, 0, 512}, kErrInval, 0, false},
      {"resize", rw, {0, kCmdResize, 1, 0, 0}, kErrInval, 0, false},
      {"write ok", rw, {kCmdFlagFua, kCmdWrite, 1, 0, 4096}, 0, 4096, false},
      {"write read-only", ro, {0, kCmdWrite, 1, 0, 4096}, kErrPerm, 4096, false},
      {"write past end", rw, {0, kCmdWrite, 1, size, 1}, kErrNoSpc, 1, false},
      {"write too long", rw, {0, kCmdWrite, 1, 0, kMaxPayload + 1}, kErrOverflow, kMaxPayload + 1,
       false},
      {"write absurd", rw, {0, kCmdWrite, 1, 0, 0xffffffffu}, 0, 0xffffffffu, true},
      {"trim read-only", ro, {0, kCmdTrim, 1, 0, 4096}, kErrPerm, 0, false},
      {"trim past end", rw, {0, kCmdTrim, 1, size, 1}, kErrInval, 0, false},
      {"trim large", rw, {0, kCmdTrim, 1, 0, uint32_t(size)}, 0, 0, false},
      {"zero flags", rw, {kCmdFlagNoHole | kCmdFlagFastZero, kCmdWriteZeroes, 1, 0, 512}, 0, 0,
       false},
      {"zero DF", rw, {kCmdFlagDf, kCmdWriteZeroes, 1, 0, 512}, kErrInval, 0, false},
      {"zero read-only", ro, {0, kCmdWriteZeroes, 1, 0, 512}, kErrPerm, 0, false},
      {"flush", rw, {0, kCmdFlush, 1, 0, 0}, 0, 0, false},
      {"flush with length", rw, {0, kCmdFlush, 1, 0, 1}, kErrInval, 0, false},
      {"flush read-only", ro, {0, kCmdFlush, 1, 0, 0}, kErrInval, 0, false},
      {"cache", rw, {0, kCmdCache, 1, 0, 4096}, 0, 0, false},
      {"block status", rw, {kCmdFlagReqOne, kCmdBlockStatus, 1, 0, 4096}, 0, 0, false},
      {"block status past end", rw, {0, kCmdBlockStatus, 1, size, 1}, kErrInval, 0, false},
      {"block status unnegotiated", simple, {0, kCmdBlockStatus, 1, 0, 1}, kErrInval, 0, false},
      {"disc", rw, {0, kCmdDisc, 1, 0, 0}, 0, 0, false},
  };
  for (const auto& c : cases) {
    auto got = ValidateRequest(c.r, c.n);
    EXPECT_EQ(got.error, c.error) << c.what;
    EXPECT_EQ(got.payload_to_read, c.payload) << c.what;
    EXPECT_EQ(got.disconnect, c.disconnect) << c.what;
  }
}

TEST(NbdWireError, MapsErrnoToTheSpecSet) {
  EXPECT_EQ(WireError(0), 0u);
  EXPECT_EQ(WireError(EPERM), kErrPerm);
  EXPECT_EQ(WireError(EROFS), kErrPerm);
  EXPECT_EQ(WireError(EDQUOT), kErrNoSpc);
  EXPECT_EQ(WireError(EFBIG), kErrNoSpc);
  EXPECT_EQ(WireError(ENOTSUP), kErrNotSup);
  EXPECT_EQ(WireError(ESHUTDOWN), kErrShutdown);
  EXPECT_EQ(WireError(ETIMEDOUT), kErrIo);
  EXPECT_EQ(WireError(ENOENT), kErrIo);
}

// --- Replies ----------------------------------------------------------------

TEST(NbdReplies, EncodeSimpleStructuredErrorAndBlockStatus) {
  uint8_t s[16];
  EncodeSimpleReply(s, kErrInval, 0xabcdef);
  EXPECT_EQ(LoadBe32(s), kSimpleReplyMagic);
  EXPECT_EQ(LoadBe32(s + 4), kErrInval);
  EXPECT_EQ(LoadBe64(s + 8), 0xabcdefu);

  uint8_t d[kOffsetDataHeaderSize];
  EncodeOffsetDataHeader(d, kReplyFlagDone, 7, 4096, 512);
  EXPECT_EQ(LoadBe32(d), kStructuredReplyMagic);
  EXPECT_EQ(LoadBe16(d + 4), kReplyFlagDone);
  EXPECT_EQ(LoadBe16(d + 6), kReplyTypeOffsetData);
  EXPECT_EQ(LoadBe32(d + 16), 520u);
  EXPECT_EQ(LoadBe64(d + 20), 4096u);

  uint8_t h[kOffsetHoleChunkSize];
  EncodeOffsetHoleChunk(h, 0, 7, 8192, 65536);
  EXPECT_EQ(LoadBe16(h + 6), kReplyTypeOffsetHole);
  EXPECT_EQ(LoadBe32(h + 16), 12u);
  EXPECT_EQ(LoadBe32(h + 28), 65536u);

  Bytes e;
  AppendErrorChunk(e, 9, kErrIo, "boom");
  ASSERT_EQ(e.size(), 20u + 6 + 4);
  EXPECT_EQ(LoadBe16(e.data() + 6), kReplyTypeError);
  EXPECT_EQ(LoadBe32(e.data() + 16), 10u);
  EXPECT_EQ(LoadBe32(e.data() + 20), kErrIo);
  EXPECT_EQ(LoadBe16(e.data() + 24), 4u);
  Bytes longmsg;
  AppendErrorChunk(longmsg, 9, kErrIo, std::string(10000, 'm'));
  EXPECT_EQ(LoadBe16(longmsg.data() + 24), kMaxNameLength);

  Bytes b;
  BlockStatusDescriptor descs[] = {{4096, kStateHole | kStateZero}, {512, 0}};
  AppendBlockStatusChunk(b, 5, kBaseAllocationId, descs);
  ASSERT_EQ(b.size(), 20u + 4 + 16);
  EXPECT_EQ(LoadBe16(b.data() + 4), kReplyFlagDone);
  EXPECT_EQ(LoadBe16(b.data() + 6), kReplyTypeBlockStatus);
  EXPECT_EQ(LoadBe32(b.data() + 16), 20u);
  EXPECT_EQ(LoadBe32(b.data() + 20), kBaseAllocationId);
  EXPECT_EQ(LoadBe32(b.data() + 24), 4096u);
  EXPECT_EQ(LoadBe32(b.data() + 28), 3u);
}

TEST(NbdBlockStatus, MergesClampsAndHonoursReqOne) {
  std::vector<Extent> ex = {{0, false, false},  {4096, true, true},  {4096, true, true},
                            {8192, false, false}, {100000, true, true}};
  auto d = BlockStatusFromExtents(ex, 20000, false);
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d[0].length, 8192u);
  EXPECT_EQ(d[0].flags, kStateHole | kStateZero);
  EXPECT_EQ(d[1].length, 8192u);
  EXPECT_EQ(d[1].flags, 0u);
  EXPECT_EQ(d[2].length, 20000u - 16384u);
  auto one = BlockStatusFromExtents(ex, 20000, true);
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].length, 8192u);
  auto none = BlockStatusFromExtents({}, 777, false);
  ASSERT_EQ(none.size(), 1u);
  EXPECT_EQ(none[0].length, 777u);
  EXPECT_EQ(none[0].flags, 0u);
}

TEST(NbdReadPlan, HolesOnlyWhereExtentsReadAsZero) {
  // data 4K, hole+zero 8K, hole-without-zero 4K (must be read), short cover.
  std::vector<Extent> ex = {{4096, false, false}, {8192, true, true}, {4096, true, false}};
  auto segs = PlanStructuredRead(ex, 1 << 20, 20480);
  ASSERT_EQ(segs.size(), 3u);
  EXPECT_FALSE(segs[0].hole);
  EXPECT_EQ(segs[0].offset, 1u << 20);
  EXPECT_EQ(segs[0].length, 4096u);
  EXPECT_TRUE(segs[1].hole);
  EXPECT_EQ(segs[1].length, 8192u);
  EXPECT_FALSE(segs[2].hole);
  EXPECT_EQ(segs[2].offset, (1u << 20) + 12288);
  EXPECT_EQ(segs[2].length, 8192u);  // 4K unknown hole + 4K uncovered, merged
  auto all = PlanStructuredRead({}, 0, 100);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_FALSE(all[0].hole);
  EXPECT_EQ(all[0].length, 100u);
}

}  // namespace
}  // namespace kagemusha::storage::nbd

#include "nbd_client_codec.h"

#include <gtest/gtest.h>

#include "kagemusha/common/coding.h"

namespace kagemusha::storage::nbd {
namespace {

std::vector<uint8_t> Greeting(uint64_t magic, uint64_t second, uint16_t flags) {
  std::vector<uint8_t> b;
  ByteWriter w(b);
  w.U64(magic);
  w.U64(second);
  w.U16(flags);
  return b;
}

std::vector<uint8_t> ReplyHeader(uint32_t option, uint32_t type, uint32_t length,
                                 uint64_t magic = kOptReplyMagic) {
  std::vector<uint8_t> b;
  ByteWriter w(b);
  w.U64(magic);
  w.U32(option);
  w.U32(type);
  w.U32(length);
  return b;
}

std::vector<uint8_t> ExportInfoPayload(uint64_t size, uint16_t flags, size_t extra = 0) {
  std::vector<uint8_t> b;
  ByteWriter w(b);
  w.U16(kInfoExport);
  w.U64(size);
  w.U16(flags);
  w.Zeros(extra);
  return b;
}

std::vector<uint8_t> BlockSizePayload(uint32_t min, uint32_t pref, uint32_t max) {
  std::vector<uint8_t> b;
  ByteWriter w(b);
  w.U16(kInfoBlockSize);
  w.U32(min);
  w.U32(pref);
  w.U32(max);
  return b;
}

TEST(NbdClientCodec, AcceptsFixedNewstyleGreeting) {
  auto g = ParseServerGreeting(Greeting(kNbdMagic, kIHaveOpt, kFlagFixedNewstyle | kFlagNoZeroes));
  ASSERT_TRUE(g) << g.error().message();
  EXPECT_TRUE(g->no_zeroes());
  EXPECT_EQ(ChooseClientFlags(*g), kClientFixedNewstyle | kClientNoZeroes);
}

TEST(NbdClientCodec, SetsNoZeroesOnlyWhenServerOffersIt) {
  auto g = ParseServerGreeting(Greeting(kNbdMagic, kIHaveOpt, kFlagFixedNewstyle));
  ASSERT_TRUE(g);
  EXPECT_EQ(ChooseClientFlags(*g), kClientFixedNewstyle);
  EXPECT_EQ(EncodeClientFlags(kClientFixedNewstyle), (std::vector<uint8_t>{0, 0, 0, 1}));
}

TEST(NbdClientCodec, RejectsMalformedGreetings) {
  struct Case {
    const char* name;
    std::vector<uint8_t> bytes;
    int code;
    const char* text;
  } cases[] = {
      {"bad magic", Greeting(0x1122334455667788ULL, kIHaveOpt, 1), EPROTO, "not an NBD server"},
      {"oldstyle", Greeting(kNbdMagic, kOldstyleMagic, 0), ENOTSUP, "oldstyle"},
      {"bad second magic", Greeting(kNbdMagic, 42, 1), EPROTO, "bad newstyle magic"},
      {"not fixed newstyle", Greeting(kNbdMagic, kIHaveOpt, 0), ENOTSUP, "fixed newstyle"},
      {"truncated", std::vector<uint8_t>(10, 0x4e), EPROTO, "truncated"},
      {"one byte short", {}, EPROTO, "wrong length"},
      {"one byte long", {}, EPROTO, "wrong length"},
  };
  cases[5].bytes = Greeting(kNbdMagic, kIHaveOpt, 1);
  cases[5].bytes.pop_back();
  cases[6].bytes = Greeting(kNbdMagic, kIHaveOpt, 1);
  cases[6].bytes.push_back(0);
  for (const auto& c : cases) {
    auto g = ParseServerGreeting(c.bytes);
    ASSERT_FALSE(g) << c.name;
    EXPECT_EQ(g.error().code(), c.code) << c.name;
    EXPECT_NE(g.error().message().find(c.text), std::string::npos)
        << c.name << ": " << g.error().message();
  }
}

TEST(NbdClientCodec, EncodesGoOptionWithInfoRequests) {
  const uint16_t infos[] = {kInfoBlockSize};
  auto go = EncodeGoOption(kOptGo, "ab", infos);
  ASSERT_TRUE(go);
  std::vector<uint8_t> want;
  ByteWriter w(want);
  w.U64(kIHaveOpt);
  w.U32(kOptGo);
  w.U32(4 + 2 + 2 + 2);
  w.U32(2);
  w.Str("ab");
  w.U16(1);
  w.U16(kInfoBlockSize);
  EXPECT_EQ(*go, want);
}

TEST(NbdClientCodec, EncodesExportNameOptionAsBarePayload) {
  auto opt = EncodeExportNameOption("disk");
  ASSERT_TRUE(opt);
  std::vector<uint8_t> want;
  ByteWriter w(want);
  w.U64(kIHaveOpt);
  w.U32(kOptExportName);
  w.U32(4);
  w.Str("disk");
  EXPECT_EQ(*opt, want);
}

TEST(NbdClientCodec, RejectsOversizedOrNulExportNames) {
  std::string long_name(kMaxNameLength + 1, 'x');
  EXPECT_EQ(EncodeGoOption(kOptGo, long_name, {}).error().code(), EINVAL);
  EXPECT_EQ(EncodeExportNameOption(long_name).error().code(), EINVAL);
  EXPECT_EQ(EncodeGoOption(kOptGo, std::string("a\0b", 3), {}).error().code(), EINVAL);
  EXPECT_TRUE(EncodeGoOption(kOptGo, std::string(kMaxNameLength, 'x'), {}));
}

TEST(NbdClientCodec, ParsesOptionReplyHeaderAndRejectsMalformedOnes) {
  auto h = ParseOptionReplyHeader(ReplyHeader(kOptGo, kRepInfo, 12));
  ASSERT_TRUE(h);
  EXPECT_EQ(h->option, kOptGo);
  EXPECT_EQ(h->type, kRepInfo);
  EXPECT_EQ(h->length, 12u);
  EXPECT_FALSE(h->is_error());

  EXPECT_EQ(ParseOptionReplyHeader(ReplyHeader(kOptGo, kRepAck, 0, kNbdMagic)).error().code(),
            EPROTO);
  EXPECT_EQ(
      ParseOptionReplyHeader(ReplyHeader(kOptGo, kRepInfo, kMaxOptionLength + 1)).error().code(),
      EPROTO);
  auto short_header = ReplyHeader(kOptGo, kRepAck, 0);
  short_header.pop_back();
  EXPECT_FALSE(ParseOptionReplyHeader(short_header));
  EXPECT_TRUE(ParseOptionReplyHeader(ReplyHeader(kOptGo, kRepErrUnsup, 0))->is_error());
}

TEST(NbdClientCodec, ParsesInfoRepliesAndRejectsInvalidOnes) {
  auto e = ParseInfoReply(ExportInfoPayload(1 << 20, kTxHasFlags | kTxReadOnly));
  ASSERT_TRUE(e);
  ASSERT_TRUE(e->export_info);
  EXPECT_EQ(e->export_info->size, 1u << 20);
  EXPECT_EQ(e->export_info->transmission_flags, kTxHasFlags | kTxReadOnly);

  auto b = ParseInfoReply(BlockSizePayload(512, 4096, 65536));
  ASSERT_TRUE(b);
  ASSERT_TRUE(b->block_size);
  EXPECT_EQ(*b->block_size, (BlockSizeInfo{512, 4096, 65536}));
  EXPECT_TRUE(ParseInfoReply(BlockSizePayload(1, 4096, 0xffffffffu)));

  std::vector<uint8_t> name{0, kInfoName, 'd', 'i', 's', 'k'};
  EXPECT_EQ(ParseInfoReply(name)->text, "disk");
  std::vector<uint8_t> unknown{0x12, 0x34, 1, 2, 3};
  auto u = ParseInfoReply(unknown);
  ASSERT_TRUE(u) << "unknown info types must be ignored, not rejected";
  EXPECT_EQ(u->type, 0x1234);
  EXPECT_FALSE(u->export_info || u->block_size);

  struct Case {
    const char* name;
    std::vector<uint8_t> payload;
  } bad[] = {
      {"empty", {}},
      {"one byte", {0}},
      {"export too short", ExportInfoPayload(1, kTxHasFlags)},
      {"export too long", ExportInfoPayload(1, kTxHasFlags, 1)},
      {"export without HAS_FLAGS", ExportInfoPayload(1, kTxReadOnly)},
      {"export size beyond int64", ExportInfoPayload(~0ULL, kTxHasFlags)},
      {"min not power of two", BlockSizePayload(3, 4096, 65536)},
      {"min zero", BlockSizePayload(0, 4096, 65536)},
      {"min above 64K", BlockSizePayload(1 << 17, 1 << 17, 1 << 20)},
      {"preferred below 512", BlockSizePayload(1, 256, 65536)},
      {"preferred below min", BlockSizePayload(8192, 4096, 65536)},
      {"max below preferred", BlockSizePayload(512, 4096, 2048)},
      {"max not multiple of min", BlockSizePayload(512, 4096, 65537)},
  };
  bad[2].payload.pop_back();
  for (const auto& c : bad) {
    auto r = ParseInfoReply(c.payload);
    EXPECT_FALSE(r) << c.name;
    if (!r) {
      EXPECT_EQ(r.error().code(), EPROTO) << c.name;
    }
  }
  std::vector<uint8_t> truncated_block = BlockSizePayload(1, 4096, 65536);
  truncated_block.pop_back();
  EXPECT_FALSE(ParseInfoReply(truncated_block));
}

struct Reply {
  uint32_t type;
  std::vector<uint8_t> payload;
};

Result<GoNegotiation::Step> FeedAll(GoNegotiation& go, const std::vector<Reply>& replies,
                                    uint32_t option = kOptGo) {
  Result<GoNegotiation::Step> last = GoNegotiation::Step::kNeedMore;
  for (const auto& r : replies) {
    last = go.Feed({option, r.type, uint32_t(r.payload.size())}, r.payload);
    if (!last || *last != GoNegotiation::Step::kNeedMore) return last;
  }
  return last;
}

TEST(NbdClientCodec, GoSucceedsWithExportInfoThenAck) {
  GoNegotiation go(kOptGo, "disk");
  auto step = FeedAll(go, {{kRepInfo, BlockSizePayload(512, 4096, 1 << 20)},
                           {kRepInfo, {0, kInfoDescription, 'x'}},
                           {kRepInfo, ExportInfoPayload(4096, kTxHasFlags)},
                           {kRepAck, {}}});
  ASSERT_TRUE(step) << step.error().message();
  EXPECT_EQ(*step, GoNegotiation::Step::kDone);
  EXPECT_EQ(go.export_info(), (ExportInfo{4096, kTxHasFlags}));
  EXPECT_EQ(go.block_size(), (BlockSizeInfo{512, 4096, 1 << 20}));
}

TEST(NbdClientCodec, GoReportsUnsupportedSoCallerFallsBackToExportName) {
  GoNegotiation go(kOptGo, "disk");
  auto step = FeedAll(go, {{kRepErrUnsup, {}}});
  ASSERT_TRUE(step);
  EXPECT_EQ(*step, GoNegotiation::Step::kUnsupported);
}

TEST(NbdClientCodec, GoFailuresCarryClearMessages) {
  {
    GoNegotiation go(kOptGo, "x", "nbd://h:10809/x");
    auto step = FeedAll(go, {{kRepErrUnknown, {'n', 'o', '\n'}}});
    ASSERT_FALSE(step);
    EXPECT_EQ(step.error().code(), ENOENT);
    EXPECT_EQ(step.error().message(), "export 'x' not found on nbd://h:10809/x (server says: no?)");
  }
  struct Case {
    const char* name;
    std::vector<Reply> replies;
    int code;
    const char* text;
  } cases[] = {
      {"ack without export info", {{kRepAck, {}}}, EPROTO, "without sending NBD_INFO_EXPORT"},
      {"ack with payload",
       {{kRepInfo, ExportInfoPayload(1, 1)}, {kRepAck, {1}}},
       EPROTO,
       "payload"},
      {"tls required", {{kRepErrTlsReqd, {}}}, EACCES, "requires TLS"},
      {"policy", {{kRepErrPolicy, {}}}, EACCES, "policy"},
      {"shutdown", {{kRepErrShutdown, {}}}, ESHUTDOWN, "shutting down"},
      {"unknown error", {{kRepFlagError | 77, {}}}, EIO, "refused"},
      {"unexpected success type", {{kRepServer, {0, 0, 0, 0}}}, EPROTO, "unexpected option reply"},
      {"bad info", {{kRepInfo, ExportInfoPayload(1, 0)}}, EPROTO, "HAS_FLAGS"},
  };
  for (const auto& c : cases) {
    GoNegotiation go(kOptGo, "x");
    auto step = FeedAll(go, c.replies);
    ASSERT_FALSE(step) << c.name;
    EXPECT_EQ(step.error().code(), c.code) << c.name;
    EXPECT_NE(step.error().message().find(c.text), std::string::npos)
        << c.name << ": " << step.error().message();
  }
}

TEST(NbdClientCodec, GoRejectsReplyToAnotherOptionOrLengthMismatch) {
  GoNegotiation go(kOptGo, "x");
  auto step = go.Feed({kOptList, kRepAck, 0}, {});
  ASSERT_FALSE(step);
  EXPECT_EQ(step.error().code(), EPROTO);
  std::vector<uint8_t> payload = ExportInfoPayload(1, 1);
  auto mismatch = go.Feed({kOptGo, kRepInfo, 99}, payload);
  ASSERT_FALSE(mismatch);
  EXPECT_EQ(mismatch.error().code(), EPROTO);
}

TEST(NbdClientCodec, ParsesExportNameReplyWithAndWithoutZeroes) {
  std::vector<uint8_t> b;
  ByteWriter w(b);
  w.U64(123456);
  w.U16(kTxHasFlags | kTxSendFlush);
  auto no_zeroes = ParseExportNameReply(b, true);
  ASSERT_TRUE(no_zeroes);
  EXPECT_EQ(*no_zeroes, (ExportInfo{123456, kTxHasFlags | kTxSendFlush}));
  EXPECT_FALSE(ParseExportNameReply(b, false)) << "124 zero bytes are expected without NO_ZEROES";
  w.Zeros(124);
  EXPECT_TRUE(ParseExportNameReply(b, false));
  EXPECT_FALSE(ParseExportNameReply(b, true));
  std::vector<uint8_t> no_flags(10, 0);
  EXPECT_FALSE(ParseExportNameReply(no_flags, true));
}

TEST(NbdClientCodec, EncodesReadRequestHeader) {
  uint8_t out[kRequestHeaderSize];
  EncodeRequestHeader({0, kCmdRead, 0x0102030405060708ULL, 0x1000, 0x200}, out);
  const uint8_t want[kRequestHeaderSize] = {0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 1, 2,
                                            3,    4,    5,    6,    7, 8, 0, 0, 0, 0,
                                            0,    0,    0x10, 0,    0, 0, 2, 0};
  EXPECT_EQ(0, std::memcmp(out, want, sizeof want));
}

TEST(NbdClientCodec, ParsesSimpleRepliesAndRejectsMalformedOnes) {
  std::vector<uint8_t> b;
  ByteWriter w(b);
  w.U32(kSimpleReplyMagic);
  w.U32(kErrIo);
  w.U64(77);
  auto r = ParseSimpleReply(b);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, kErrIo);
  EXPECT_EQ(r->cookie, 77u);
  EXPECT_EQ(ClassifyReplyMagic(std::span<const uint8_t, 4>(b.data(), 4)), ReplyKind::kSimple);

  auto truncated = b;
  truncated.pop_back();
  EXPECT_FALSE(ParseSimpleReply(truncated));
  auto bad_magic = b;
  bad_magic[0] ^= 1;
  EXPECT_EQ(ParseSimpleReply(bad_magic).error().code(), EPROTO);
  EXPECT_EQ(ClassifyReplyMagic(std::span<const uint8_t, 4>(bad_magic.data(), 4)), ReplyKind::kBad);
}

TEST(NbdClientCodec, ParsesStructuredChunkHeadersAndRejectsMalformedOnes) {
  auto chunk = [](uint16_t flags, uint16_t type, uint32_t length) {
    std::vector<uint8_t> b;
    ByteWriter w(b);
    w.U32(kStructuredReplyMagic);
    w.U16(flags);
    w.U16(type);
    w.U64(9);
    w.U32(length);
    return b;
  };
  auto ok = ParseStructuredReplyHeader(chunk(kReplyFlagDone, kReplyTypeOffsetData, 8 + 4096));
  ASSERT_TRUE(ok);
  EXPECT_TRUE(ok->done());
  EXPECT_EQ(ok->cookie, 9u);
  EXPECT_EQ(ok->length, 8u + 4096);
  auto magic = chunk(0, 0, 0);
  EXPECT_EQ(ClassifyReplyMagic(std::span<const uint8_t, 4>(magic.data(), 4)),
            ReplyKind::kStructured);

  EXPECT_FALSE(ParseStructuredReplyHeader(chunk(0, kReplyTypeOffsetData, kMaxPayload + 9)));
  EXPECT_FALSE(ParseStructuredReplyHeader(chunk(0, kReplyTypeNone, 0))) << "NONE must be final";
  EXPECT_FALSE(ParseStructuredReplyHeader(chunk(kReplyFlagDone, kReplyTypeNone, 4)));
  auto truncated = chunk(0, 1, 1);
  truncated.resize(19);
  EXPECT_FALSE(ParseStructuredReplyHeader(truncated));
}

TEST(NbdClientCodec, MapsWireErrorsToErrno) {
  EXPECT_EQ(NbdErrorToErrno(kErrIo), EIO);
  EXPECT_EQ(NbdErrorToErrno(kErrInval), EINVAL);
  EXPECT_EQ(NbdErrorToErrno(kErrShutdown), ESHUTDOWN);
  EXPECT_EQ(NbdErrorToErrno(kErrOverflow), EOVERFLOW);
  EXPECT_EQ(NbdErrorToErrno(9999), EIO);
}

TEST(NbdClientCodec, SplitsReadsAtTheLimit) {
  EXPECT_TRUE(SplitRead(0, 0, 100).empty());
  EXPECT_EQ(SplitRead(10, 100, 100), (std::vector<ReadPiece>{{10, 100, 0}}));
  EXPECT_EQ(SplitRead(0, 250, 100),
            (std::vector<ReadPiece>{{0, 100, 0}, {100, 100, 100}, {200, 50, 200}}));
  // Unaligned start: the interior boundaries stay multiples of the alignment.
  EXPECT_EQ(SplitRead(1000, 5000, 2048, 512),
            (std::vector<ReadPiece>{{1000, 1560, 0}, {2560, 2048, 1560}, {4608, 1392, 3608}}));
  // Pieces cover the range exactly, in order, none above the limit.
  auto pieces = SplitRead(12345, 10 << 20, 1 << 20, 4096);
  uint64_t pos = 12345;
  for (const auto& p : pieces) {
    EXPECT_EQ(p.offset, pos);
    EXPECT_EQ(p.buffer_offset, pos - 12345);
    EXPECT_LE(p.length, 1u << 20);
    pos += p.length;
  }
  EXPECT_EQ(pos, 12345u + (10 << 20));
}

TEST(NbdClientCodec, EffectiveMaxRequestHonoursServerLimits) {
  EXPECT_EQ(EffectiveMaxRequest(4 << 20, std::nullopt), 4u << 20);
  EXPECT_EQ(EffectiveMaxRequest(64 << 20, std::nullopt), kMaxPayload);
  EXPECT_EQ(EffectiveMaxRequest(4 << 20, BlockSizeInfo{512, 4096, 65536}), 65536u);
  EXPECT_EQ(EffectiveMaxRequest(1000, BlockSizeInfo{512, 4096, 65536}), 512u);
  EXPECT_EQ(EffectiveMaxRequest(4 << 20, BlockSizeInfo{1, 4096, 0xffffffffu}), 4u << 20);
}

}  // namespace
}  // namespace kagemusha::storage::nbd

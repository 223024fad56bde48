#include "kagemusha/memcache/reuse_protocol.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "kagemusha/common/coding.h"

namespace kagemusha::memcache::reuse {
namespace {

using Bytes = std::vector<uint8_t>;

// Splits `wire` into frames, feeding it `chunk` bytes at a time.
std::vector<std::pair<FrameType, Bytes>> Split(const Bytes& wire, size_t chunk) {
  FrameReader r;
  std::vector<std::pair<FrameType, Bytes>> out;
  for (size_t i = 0; i < wire.size(); i += chunk) {
    r.Append(std::span<const uint8_t>(wire).subspan(i, std::min(chunk, wire.size() - i)));
    while (true) {
      auto f = r.Next();
      EXPECT_TRUE(f.has_value());
      if (!f || !*f) break;
      out.emplace_back((*f)->type, Bytes((*f)->payload.begin(), (*f)->payload.end()));
    }
  }
  EXPECT_EQ(r.buffered(), 0u);
  return out;
}

PageDigest DigestOf(uint8_t seed) {
  PageDigest d;
  for (size_t i = 0; i < d.bytes.size(); ++i) d.bytes[i] = uint8_t(seed + i);
  return d;
}

TEST(ReuseProtocol, EveryMessageRoundTripsThroughTheFrameReaderInAnyChunking) {
  Bytes wire;
  Hello h;
  h.capabilities = cap::kZstd;
  h.vm = "guest-1";
  h.uuid[0] = 0xab;
  ASSERT_TRUE(AppendHello(h, wire));
  SummaryChunk s{true, {1, 2, 0xffffffffffffffffull}};
  ASSERT_TRUE(AppendSummary(s, wire));
  Bytes pass = {1, 2, 3, 4, 5};
  ASSERT_TRUE(AppendPassthrough(pass, wire));
  PageRef ref{{true, "pc.ram", 0x2000}, DigestOf(7)};
  ASSERT_TRUE(AppendPageRef(ref, wire));
  Bytes page(kPageBytes, 0x5a);
  ASSERT_TRUE(AppendLiteral(Literal{{false, "pc.ram", 0x3000}, page}, false, wire));
  Bytes z = {9, 9, 9};
  ASSERT_TRUE(AppendLiteral(Literal{{false, "/rom@etc/acpi/tables", 0}, z}, true, wire));
  ASSERT_TRUE(AppendZero(ZeroPage{{true, "pc.ram", 0x4000}, 0, 77}, wire));
  EndFigures e{10, 20, 30, 0xdeadbeef, DigestOf(3)};
  ASSERT_TRUE(AppendEnd(e, wire));
  ASSERT_TRUE(AppendDone(DoneFigures{100, 200, 300}, wire));
  ASSERT_TRUE(AppendReturn(pass, wire));
  ASSERT_TRUE(AppendAbort("missing page", wire));
  ASSERT_TRUE(AppendDelivered(0x0123456789abcdefull, wire));

  for (size_t chunk : {size_t{1}, size_t{3}, size_t{4096}, wire.size()}) {
    auto frames = Split(wire, chunk);
    ASSERT_EQ(frames.size(), 12u) << chunk;
    EXPECT_EQ(*DecodeHello(frames[0].second), h);
    EXPECT_EQ(*DecodeSummary(frames[1].second), s);
    EXPECT_EQ(frames[2].first, FrameType::kPassthrough);
    EXPECT_EQ(frames[2].second, pass);
    auto r = DecodePageRef(frames[3].second);
    ASSERT_TRUE(r);
    EXPECT_TRUE(r->header.continued);
    EXPECT_EQ(r->header.block, "");  // CONTINUE: the block is not sent
    EXPECT_EQ(r->header.offset, 0x2000u);
    EXPECT_EQ(r->digest, DigestOf(7));
    auto l = DecodeLiteral(frames[4].second, false);
    ASSERT_TRUE(l);
    EXPECT_EQ(Bytes(l->data.begin(), l->data.end()), page);
    EXPECT_EQ(frames[5].first, FrameType::kLiteralZstd);
    auto lz = DecodeLiteral(frames[5].second, true);
    ASSERT_TRUE(lz);
    EXPECT_EQ(lz->header.block, "/rom@etc/acpi/tables");
    EXPECT_EQ(Bytes(lz->data.begin(), lz->data.end()), z);
    auto zp = DecodeZero(frames[6].second);
    ASSERT_TRUE(zp);
    EXPECT_EQ(zp->header.offset, 0x4000u);
    EXPECT_EQ(zp->count, 77u);
    EXPECT_EQ(*DecodeEnd(frames[7].second), e);
    EXPECT_EQ(*DecodeDone(frames[8].second), (DoneFigures{100, 200, 300}));
    EXPECT_EQ(frames[9].first, FrameType::kReturn);
    EXPECT_EQ(*DecodeAbort(frames[10].second), "missing page");
    EXPECT_EQ(frames[11].first, FrameType::kDelivered);
    EXPECT_EQ(*DecodeDelivered(frames[11].second), 0x0123456789abcdefull);
    EXPECT_FALSE(DecodeDelivered(std::span<const uint8_t>(frames[11].second).first(7)));
  }
}

TEST(ReuseProtocol, FrameReaderRejectsUnknownTypesAndOversizedLengthsForGood) {
  {
    FrameReader r;
    Bytes b = {0x00, 0, 0, 0, 0};
    r.Append(b);
    EXPECT_FALSE(r.Next());
    EXPECT_FALSE(r.Next());  // sticky
  }
  {
    FrameReader r;
    Bytes b = {0x0d};
    r.Append(b);
    EXPECT_FALSE(r.Next());  // type checked before the length arrives
  }
  {
    FrameReader r;
    Bytes b(5);
    b[0] = uint8_t(FrameType::kPassthrough);
    StoreBe32(b.data() + 1, uint32_t(kMaxFramePayload + 1));
    r.Append(b);
    auto f = r.Next();
    ASSERT_FALSE(f);
    EXPECT_EQ(f.error().code(), EPROTO);
  }
  {
    FrameReader r;  // a frame of exactly the limit is fine, and waits for its bytes
    Bytes b(5);
    b[0] = uint8_t(FrameType::kPassthrough);
    StoreBe32(b.data() + 1, uint32_t(kMaxFramePayload));
    r.Append(b);
    auto f = r.Next();
    ASSERT_TRUE(f);
    EXPECT_FALSE(*f);
  }
}

// Payload mutators for the malformed-input table.
Bytes HelloPayload() {
  Bytes w;
  Hello h;
  h.vm = "vm";
  EXPECT_TRUE(AppendHello(h, w));
  return Bytes(w.begin() + kFrameHeaderBytes, w.end());
}
Bytes PagePayload(FrameType t) {
  Bytes w, page(kPageBytes, 1);
  PageHeader h{false, "pc.ram", 0x1000};
  Status st = Ok();
  if (t == FrameType::kPageRef) st = AppendPageRef(PageRef{h, DigestOf(1)}, w);
  if (t == FrameType::kLiteral) st = AppendLiteral(Literal{h, page}, false, w);
  if (t == FrameType::kZero) st = AppendZero(ZeroPage{h, 0}, w);
  EXPECT_TRUE(st);
  return Bytes(w.begin() + kFrameHeaderBytes, w.end());
}

struct BadCase {
  const char* name;
  std::function<bool(const Bytes&)> decode_ok;  // true if decoding succeeded
  Bytes payload;
};

TEST(ReuseProtocol, MalformedPayloadsAreRejected) {
  auto hello = [](const Bytes& b) { return DecodeHello(b).has_value(); };
  auto summary = [](const Bytes& b) { return DecodeSummary(b).has_value(); };
  auto ref = [](const Bytes& b) { return DecodePageRef(b).has_value(); };
  auto lit = [](const Bytes& b) { return DecodeLiteral(b, false).has_value(); };
  auto litz = [](const Bytes& b) { return DecodeLiteral(b, true).has_value(); };
  auto zero = [](const Bytes& b) { return DecodeZero(b).has_value(); };
  auto end = [](const Bytes& b) { return DecodeEnd(b).has_value(); };
  auto done = [](const Bytes& b) { return DecodeDone(b).has_value(); };
  auto abort_ = [](const Bytes& b) { return DecodeAbort(b).has_value(); };

  Bytes h = HelloPayload();
  Bytes bad_magic = h;
  bad_magic[0] ^= 1;
  Bytes zero_vm = h;
  zero_vm[10] = 0;
  Bytes long_vm = h;
  long_vm[10] = 200;
  Bytes h_trail = h;
  h_trail.push_back(0);
  Bytes r = PagePayload(FrameType::kPageRef);
  Bytes r_unaligned = r;
  r_unaligned[2 + 6 + 7] = 1;  // low byte of the be64 offset
  Bytes r_flags = r;
  r_flags[0] = 2;
  Bytes r_empty = r;
  r_empty[1] = 0;
  Bytes r_long_id = r;
  r_long_id[1] = 255;
  Bytes l = PagePayload(FrameType::kLiteral);
  Bytes l_short(l.begin(), l.end() - 1);
  Bytes l_long = l;
  l_long.push_back(0);
  Bytes z = PagePayload(FrameType::kZero);
  Bytes z_trail = z;
  z_trail.push_back(0);
  Bytes hdr_only(r.begin(), r.begin() + 16);  // flags, len, id, offset

  std::vector<BadCase> cases = {
      {"hello: empty", hello, {}},
      {"hello: bad magic", hello, bad_magic},
      {"hello: zero-length VM name", hello, zero_vm},
      {"hello: VM name longer than the payload", hello, long_vm},
      {"hello: trailing byte", hello, h_trail},
      {"hello: truncated uuid", hello, Bytes(h.begin(), h.end() - 1)},
      {"summary: empty", summary, {}},
      {"summary: count larger than payload", summary, {1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1}},
      {"summary: count smaller than payload", summary, {1, 0, 0, 0, 0, 5}},
      {"summary: unknown flag", summary, {2, 0, 0, 0, 0}},
      {"ref: unaligned offset", ref, r_unaligned},
      {"ref: unknown flags", ref, r_flags},
      {"ref: empty block id", ref, r_empty},
      {"ref: block id runs past the end", ref, r_long_id},
      {"ref: truncated digest", ref, Bytes(r.begin(), r.end() - 1)},
      {"ref: trailing byte", ref,
       [&] {
         Bytes x = r;
         x.push_back(0);
         return x;
       }()},
      {"literal: one byte short", lit, l_short},
      {"literal: one byte long", lit, l_long},
      {"literal: header only", lit, hdr_only},
      {"literal_zstd: no compressed data", litz, hdr_only},
      {"zero: truncated count", zero, Bytes(z.begin(), z.end() - 1)},
      {"zero: run of 0 pages", zero,
       [&] {
         Bytes x = z;
         x[x.size() - 1] = 0;
         return x;
       }()},
      {"zero: run over the limit", zero,
       [&] {
         Bytes x = z;
         x[x.size() - 3] = 0x10;
         x[x.size() - 1] = 1;
         return x;
       }()},
      {"zero: run past 2^64", zero,
       [&] {
         Bytes x = z;
         for (size_t i = 8; i < 16; ++i) x[i] = 0xff;  // offset
         x[15] = 0xf0;
         x[x.size() - 1] = 0x20;
         return x;
       }()},
      {"continued header without offset", ref, {1, 0, 0, 0}},
      {"zero: trailing byte", zero, z_trail},
      {"end: truncated", end, Bytes(59, 0)},
      {"end: trailing", end, Bytes(61, 0)},
      {"done: truncated", done, Bytes(23, 0)},
      {"done: trailing", done, Bytes(25, 0)},
      {"abort: length beyond payload", abort_, {0, 5, 'a'}},
      {"abort: over the limit", abort_,
       [] {
         Bytes x = {0x04, 0x01};
         x.resize(2 + 1025, 'x');
         return x;
       }()},
      {"abort: trailing", abort_, {0, 1, 'a', 'b'}},
  };
  for (const auto& c : cases) EXPECT_FALSE(c.decode_ok(c.payload)) << c.name;
  // The unmodified payloads decode (so the table tests what it claims).
  EXPECT_TRUE(hello(h));
  EXPECT_TRUE(ref(r));
  EXPECT_TRUE(lit(l));
  EXPECT_TRUE(zero(z));
  EXPECT_TRUE(end(Bytes(8 + 8 + 8 + 4 + 32, 0)));
  EXPECT_TRUE(done(Bytes(24, 0)));
}

TEST(ReuseProtocol, EncodersRefuseWhatTheDecodersWouldReject) {
  Bytes w;
  Hello h;
  EXPECT_FALSE(AppendHello(h, w));  // no VM name
  h.vm = std::string(kMaxVmNameBytes + 1, 'a');
  EXPECT_FALSE(AppendHello(h, w));
  Bytes page(kPageBytes);
  EXPECT_FALSE(AppendLiteral(Literal{{false, "pc.ram", 1}, page}, false, w));
  EXPECT_FALSE(AppendLiteral(Literal{{false, "", 0}, page}, false, w));
  EXPECT_FALSE(AppendLiteral(Literal{{false, "pc.ram", 0}, Bytes(10)}, false, w));
  EXPECT_FALSE(AppendPageRef(PageRef{{false, std::string(256, 'b'), 0}, {}}, w));
  Bytes big(kMaxFramePayload + 1);
  EXPECT_FALSE(AppendPassthrough(big, w));
  EXPECT_TRUE(w.empty()) << "a refused frame must leave nothing behind";
  // Over-long abort reasons are cut, never refused: an abort must go out.
  EXPECT_TRUE(AppendAbort(std::string(5000, 'x'), w));
  FrameReader r;
  r.Append(w);
  auto f = r.Next();
  ASSERT_TRUE(f && *f);
  EXPECT_EQ(DecodeAbort((*f)->payload)->size(), kMaxAbortReasonBytes);
}

TEST(ReuseProtocol, DigestPrefixIsTheFirstEightBytesBigEndian) {
  PageDigest d = DigestOf(0);
  EXPECT_EQ(DigestPrefix(d), 0x0001020304050607ull);
}

}  // namespace
}  // namespace kagemusha::memcache::reuse

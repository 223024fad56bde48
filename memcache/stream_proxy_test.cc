// Encoder and decoder sessions over the in-memory transport, with
// hand-built QEMU 7.2 streams, fake QEMU peers and (where a test needs it) a
// tampering relay on the WAN leg.
#include "kagemusha/memcache/stream_proxy.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kagemusha/common/coding.h"
#include "kagemusha/memcache/migration_stream.h"
#include "kagemusha/memcache/reuse_protocol.h"
#include "stream_proxy_session.h"

namespace kagemusha::memcache {
namespace {

using Bytes = std::vector<uint8_t>;
namespace fs = std::filesystem;
using namespace reuse;

// --- hand-built QEMU streams -----------------------------------------------------------

class QemuStream {
 public:
  Bytes b;
  QemuStream& U8(uint8_t v) {
    ByteWriter(b).U8(v);
    return *this;
  }
  QemuStream& U32(uint32_t v) {
    ByteWriter(b).U32(v);
    return *this;
  }
  QemuStream& U64(uint64_t v) {
    ByteWriter(b).U64(v);
    return *this;
  }
  QemuStream& Str(std::string_view s) {
    ByteWriter(b).Str(s);
    return *this;
  }
  QemuStream& Head() {
    U32(kQemuVmFileMagic).U32(kQemuVmFileVersion);
    return U8(0x07).U32(13).Str("pc-i440fx-7.2");
  }
  // START "ram" (section 1) with the given blocks, then EOS and footer.
  QemuStream& RamStart(const std::vector<std::pair<std::string, uint64_t>>& blocks) {
    U8(0x01).U32(1).U8(3).Str("ram").U32(0).U32(4);
    uint64_t total = 0;
    for (auto& [n, l] : blocks) total += l;
    U64(total | ram_flag::kMemSize);
    for (auto& [n, l] : blocks) U8(uint8_t(n.size())).Str(n).U64(l);
    return U64(ram_flag::kEos).U8(0x7e).U32(1);
  }
  QemuStream& Part() { return U8(0x02).U32(1); }
  QemuStream& End() { return U8(0x03).U32(1); }
  QemuStream& Eos() { return U64(ram_flag::kEos).U8(0x7e).U32(1); }
  QemuStream& Page(std::string_view block, uint64_t off, const Bytes& data, bool cont = false) {
    U64(off | ram_flag::kPage | (cont ? ram_flag::kContinue : 0));
    if (!cont) U8(uint8_t(block.size())).Str(block);
    b.insert(b.end(), data.begin(), data.end());
    return *this;
  }
  QemuStream& Zero(std::string_view block, uint64_t off, bool cont = false) {
    U64(off | ram_flag::kZero | (cont ? ram_flag::kContinue : 0));
    if (!cont) U8(uint8_t(block.size())).Str(block);
    return U8(0);
  }
  // Device state (FULL "timer") and EOF: passthrough for the proxies.
  QemuStream& DeviceStateAndEof() {
    U8(0x04).U32(2).U8(5).Str("timer").U32(0).U32(2);
    for (int i = 0; i < 40; ++i) U8(uint8_t(0xd0 + i));
    return U8(0x7e).U32(2).U8(0x00);
  }
};

Bytes RandomPage(uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes p(kPageBytes);
  for (auto& x : p) x = uint8_t(rng());
  return p;
}

// N random pages of "pc.ram" (every third one zero), two precopy rounds
// (the second resends the first 4 pages changed), then device state.
struct Guest {
  Bytes stream;
  std::vector<Bytes> pages;  // final content, index = page number (empty = zero)
};
Guest MakeGuest(int n, uint32_t seed = 1) {
  Guest g;
  QemuStream s;
  s.Head().RamStart({{"pc.ram", uint64_t(n) * kPageBytes}, {"pc.bios", 2 * kPageBytes}});
  s.Part();
  for (int i = 0; i < n; ++i) {
    if (i % 3 == 2) {
      g.pages.emplace_back();
      s.Zero("pc.ram", uint64_t(i) * kPageBytes, i > 0);
    } else {
      g.pages.push_back(RandomPage(seed * 1000 + uint32_t(i)));
      s.Page("pc.ram", uint64_t(i) * kPageBytes, g.pages.back(), i > 0);
    }
  }
  s.Page("pc.bios", 0, RandomPage(seed * 1000 + 999)).Zero("pc.bios", kPageBytes, true);
  s.Eos();
  s.End();
  for (int i = 0; i < 4 && i < n; ++i) {
    g.pages[size_t(i)] = RandomPage(seed * 7777 + uint32_t(i));
    s.Page("pc.ram", uint64_t(i) * kPageBytes, g.pages[size_t(i)], i > 0);
  }
  s.Eos();
  s.DeviceStateAndEof();
  g.stream = std::move(s.b);
  return g;
}

// --- harness ---------------------------------------------------------------------------

class TempStore {
 public:
  explicit TempStore(uint64_t quota_bytes = 0, uint64_t segment_bytes = 64ull << 20)
      : quota_(quota_bytes), segment_bytes_(segment_bytes) {
    char tmpl[] = "/tmp/kgm-proxy-test-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    Open();
  }
  ~TempStore() {
    store.reset();
    fs::remove_all(dir_);
  }
  void Open() {
    store.reset();
    PageStoreOptions o;
    o.dir = dir_ + "/store";
    o.fsync = false;
    o.quota_bytes = quota_;
    o.segment_bytes = segment_bytes_;
    auto s = PageStore::Open(o);
    EXPECT_TRUE(s) << s.error().message();
    store = std::move(*s);
  }
  void SetQuota(uint64_t quota_bytes) {
    quota_ = quota_bytes;
    Open();
  }
  void Wipe() {
    store.reset();
    fs::remove_all(dir_ + "/store");
    Open();
  }
  std::unique_ptr<PageStore> store;

 private:
  std::string dir_;
  uint64_t quota_, segment_bytes_;
};

// Rewrites or drops encoder->decoder frames; returns false to cut the WAN
// there (both directions closed).
using Tamper = std::function<bool(FrameType&, Bytes&)>;

struct RunResult {
  Result<ProxyStats> enc = Fail(Error::Io("not run"));
  Result<ProxyStats> dec = Fail(Error::Io("not run"));
  ProxyStats enc_partial, dec_partial;
  Bytes delivered;          // what the destination QEMU received
  bool dest_reset = false;  // its connection was reset (not a clean EOF)
  Bytes source_got;         // return-path bytes the source QEMU received
  bool source_reset = false;
};

struct RunOptions {
  size_t chunk = 1460;
  bool zstd = false;
  Tamper tamper;
  Bytes dest_reply;  // the destination QEMU sends this once it got 1 KiB
  std::string decoder_vm = "vm1";
  // Stalls: the source QEMU goes silent after this many bytes (connection
  // kept open); the WAN relay stops reading after this many frames; the
  // destination QEMU stops reading after this many bytes.
  size_t source_stall_after = SIZE_MAX;
  size_t wan_stall_after_frames = SIZE_MAX;
  size_t dest_stall_after = SIZE_MAX;
  std::chrono::milliseconds enc_idle{60000}, dec_idle{60000};
  uint64_t dec_quota = 0;    // DecoderOptions::store_quota_bytes
  size_t window = 4u << 20;  // EncoderOptions::window_bytes
};

// Reads until EOF or reset.
void Drain(ByteStream& s, Bytes& into, bool& reset) {
  uint8_t buf[65536];
  while (true) {
    auto n = s.Read(buf);
    if (!n) {
      reset = true;
      return;
    }
    if (*n == 0) return;
    into.insert(into.end(), buf, buf + *n);
  }
}

// Waits (without touching any stream) until the harness says stop.
void StallUntil(const std::atomic<bool>& stop) {
  while (!stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
}

// A relay on the WAN leg that re-frames encoder->decoder traffic through `t`;
// after `stall_after` frames it stops reading (a stalled WAN peer).
void TamperRelay(ByteStream& from_enc, ByteStream& to_dec, const Tamper& t,
                 size_t stall_after = SIZE_MAX, const std::atomic<bool>* stop = nullptr) {
  FrameReader fr;
  uint8_t buf[65536];
  size_t frames = 0;
  while (true) {
    if (frames >= stall_after) {
      StallUntil(*stop);
      from_enc.Abort();
      to_dec.Abort();
      return;
    }
    auto n = from_enc.Read(buf);
    if (!n || *n == 0) break;
    fr.Append(std::span<const uint8_t>(buf, *n));
    while (true) {
      auto f = fr.Next();
      if (!f || !*f) break;
      FrameType type = (*f)->type;
      Bytes payload((*f)->payload.begin(), (*f)->payload.end());
      ++frames;
      if (t && !t(type, payload)) {
        from_enc.Abort();
        to_dec.Abort();
        return;
      }
      Bytes out = {uint8_t(type), 0, 0, 0, 0};
      StoreBe32(out.data() + 1, uint32_t(payload.size()));
      out.insert(out.end(), payload.begin(), payload.end());
      if (!to_dec.WriteAll(out)) return;
    }
  }
  to_dec.ShutdownWrite();
}

void Copy(ByteStream& from, ByteStream& to) {
  uint8_t buf[65536];
  while (true) {
    auto n = from.Read(buf);
    if (!n || *n == 0) break;
    if (!to.WriteAll(std::span<const uint8_t>(buf, *n))) {
      from.Abort();  // like a TCP reset travelling back
      break;
    }
  }
  to.ShutdownWrite();
}

RunResult RunMigration(const Bytes& stream, PageStore& src, PageStore& dst,
                       const RunOptions& opt = {}) {
  RunResult r;
  auto [src_qemu, enc_qemu] = MakeMemoryPipe();
  auto [enc_wan, relay_in] = MakeMemoryPipe();
  auto [relay_out, dec_wan] = MakeMemoryPipe();
  auto [dec_qemu, dst_qemu] = MakeMemoryPipe();
  std::unique_ptr<ByteStream> dec_qemu_owned = std::move(dec_qemu);
  std::atomic<bool> stop{false};

  std::thread source([&, s = src_qemu.get()] {
    const size_t len = std::min(stream.size(), opt.source_stall_after);
    for (size_t i = 0; i < len; i += opt.chunk) {
      if (!s->WriteAll(std::span<const uint8_t>(stream).subspan(i, std::min(opt.chunk, len - i))))
        break;
    }
    if (len < stream.size()) {  // silent, connection open, until the session ends
      Drain(*s, r.source_got, r.source_reset);
      return;
    }
    // Like QEMU with a return path: wait for the destination's reply
    // before closing (postcopy's SHUT), then close.
    if (!opt.dest_reply.empty()) {
      uint8_t buf[4096];
      while (r.source_got.size() < opt.dest_reply.size()) {
        auto n = s->Read(buf);
        if (!n || *n == 0) break;
        r.source_got.insert(r.source_got.end(), buf, buf + *n);
      }
    }
    s->ShutdownWrite();
    Drain(*s, r.source_got, r.source_reset);
  });
  std::thread dest([&, d = dst_qemu.get()] {
    uint8_t buf[65536];
    bool replied = false;
    while (true) {
      if (r.delivered.size() >= opt.dest_stall_after) {
        StallUntil(stop);
        bool ignored = false;
        Bytes rest;
        Drain(*d, rest, ignored);
        r.dest_reset = ignored;
        break;
      }
      auto n = d->Read(std::span<uint8_t>(
          buf, std::min(sizeof buf, opt.dest_stall_after -
                                        std::min(opt.dest_stall_after, r.delivered.size()))));
      if (!n) {
        r.dest_reset = true;
        break;
      }
      if (*n == 0) break;
      r.delivered.insert(r.delivered.end(), buf, buf + *n);
      if (!replied && !opt.dest_reply.empty() && r.delivered.size() >= 1024) {
        replied = true;
        (void)d->WriteAll(opt.dest_reply);
      }
    }
    d->ShutdownWrite();  // QEMU closes once it has loaded the state
  });
  std::thread fwd([&] {
    if (opt.tamper || opt.wan_stall_after_frames != SIZE_MAX)
      TamperRelay(*relay_in, *relay_out, opt.tamper, opt.wan_stall_after_frames, &stop);
    else
      Copy(*relay_in, *relay_out);
  });
  std::thread back([&] { Copy(*relay_out, *relay_in); });
  std::thread dec([&] {
    DecoderOptions o{&dst, opt.decoder_vm};
    o.idle_timeout = opt.dec_idle;
    o.store_quota_bytes = opt.dec_quota;
    QemuConnector connect = [&]() -> Result<std::unique_ptr<ByteStream>> {
      return std::move(dec_qemu_owned);
    };
    r.dec = RunDecoderSession(*dec_wan, connect, o, &r.dec_partial);
    dec_wan->Abort();
  });
  EncoderOptions eo;
  eo.store = &src;
  eo.vm = "vm1";
  eo.zstd = opt.zstd;
  eo.idle_timeout = opt.enc_idle;
  eo.window_bytes = opt.window;
  r.enc = RunEncoderSession(*enc_qemu, *enc_wan, eo, &r.enc_partial);
  enc_wan->Abort();
  stop = true;
  dec.join();
  if (dec_qemu_owned) dec_qemu_owned->Abort();  // the decoder never connected
  relay_in->Abort();
  relay_out->Abort();
  fwd.join();
  back.join();
  source.join();
  dest.join();
  return r;
}

// --- the tests ---------------------------------------------------------------------------

TEST(StreamProxy, FirstHopSendsLiteralsAndRebuildsTheStreamByteForByte) {
  TempStore a, b;
  Guest g = MakeGuest(60);
  auto r = RunMigration(g.stream, *a.store, *b.store);
  ASSERT_TRUE(r.enc) << r.enc.error().message();
  ASSERT_TRUE(r.dec) << r.dec.error().message();
  EXPECT_EQ(r.delivered, g.stream);
  EXPECT_FALSE(r.dest_reset);
  EXPECT_EQ(r.enc->ref_pages, 0u);
  EXPECT_EQ(r.enc->zero_pages, 21u);     // 20 in pc.ram, 1 in pc.bios
  EXPECT_EQ(r.enc->literal_pages, 45u);  // 40 + 1 bios + 4 resent
  EXPECT_EQ(r.enc->pages, 66u);
  EXPECT_EQ(r.dec->literal_pages, 45u);
  EXPECT_EQ(r.enc->qemu_bytes, g.stream.size());
  EXPECT_TRUE(r.enc->learned);
  EXPECT_TRUE(r.dec->learned);
  // Both hosts now hold the image, and the manifests say where each page was.
  auto ma = a.store->GetManifest("vm1");
  auto mb = b.store->GetManifest("vm1");
  ASSERT_TRUE(ma && mb);
  EXPECT_EQ(*ma, *mb);
  EXPECT_EQ(ma->entries.size(), 42u);  // non-zero pages (41 + bios), latest content only
}

TEST(StreamProxy, ReturnHopReferencesPagesTheDestinationStillHolds) {
  TempStore a, b;
  Guest g = MakeGuest(60);
  auto hop1 = RunMigration(g.stream, *a.store, *b.store);
  ASSERT_TRUE(hop1.enc && hop1.dec);
  // B -> A: same memory. Every non-zero page is known at A.
  auto hop2 = RunMigration(g.stream, *b.store, *a.store);
  ASSERT_TRUE(hop2.enc) << hop2.enc.error().message();
  ASSERT_TRUE(hop2.dec) << hop2.dec.error().message();
  EXPECT_EQ(hop2.delivered, g.stream);
  // First-round copies of pages 0, 1, 3 are stale (page 2 was zero then):
  // only their final content is in A's manifest.
  EXPECT_EQ(hop2.enc->literal_pages, 3u);
  EXPECT_EQ(hop2.enc->ref_pages, 42u);
  EXPECT_EQ(hop2.dec->ref_pages, 42u);
  EXPECT_LT(hop2.enc->wan_bytes_out * 5, hop1.enc->wan_bytes_out);
}

TEST(StreamProxy, ChangedPagesTravelInFullUnchangedOnesAsReferences) {
  TempStore a, b;
  Guest g1 = MakeGuest(30, 1);
  ASSERT_TRUE(RunMigration(g1.stream, *a.store, *b.store).enc);
  Guest g2 = MakeGuest(30, 2);  // a different guest image: nothing in common
  auto r = RunMigration(g2.stream, *b.store, *a.store);
  ASSERT_TRUE(r.enc && r.dec);
  EXPECT_EQ(r.delivered, g2.stream);
  EXPECT_EQ(r.enc->ref_pages, 0u);
  // And back with the first image: A's manifest now describes g2, but B
  // learnt g1 on the first hop and A still stores g1's pages (no GC ran):
  // the summary comes from A's manifest (g2), so g1's pages are literals.
  auto r2 = RunMigration(g1.stream, *b.store, *a.store);
  ASSERT_TRUE(r2.enc && r2.dec);
  EXPECT_EQ(r2.delivered, g1.stream);
}

TEST(StreamProxy, ZstdLiteralsDecompressToTheSamePages) {
  TempStore a, b;
  QemuStream s;
  s.Head().RamStart({{"pc.ram", 8 * kPageBytes}}).Part();
  for (int i = 0; i < 8; ++i) {
    Bytes p(kPageBytes, uint8_t(i + 1));  // compressible, non-zero
    p[100] = 7;
    s.Page("pc.ram", uint64_t(i) * kPageBytes, p, i > 0);
  }
  s.Eos().DeviceStateAndEof();
  RunOptions o;
  o.zstd = true;
  auto r = RunMigration(s.b, *a.store, *b.store, o);
  ASSERT_TRUE(r.enc && r.dec) << (r.enc ? r.dec.error().message() : r.enc.error().message());
  EXPECT_EQ(r.delivered, s.b);
  EXPECT_EQ(r.enc->zstd_pages, 8u);
  EXPECT_EQ(r.dec->zstd_pages, 8u);
  EXPECT_LT(r.enc->wan_bytes_out, s.b.size() / 4);
}

TEST(StreamProxy, RunsOfZeroPagesTravelAsOneFrameAndExpandExactly) {
  TempStore a, b;
  QemuStream s;
  s.Head().RamStart({{"pc.ram", 2000 * kPageBytes}, {"vga.vram", 8 * kPageBytes}}).Part();
  for (int i = 0; i < 1000; ++i) s.Zero("pc.ram", uint64_t(i) * kPageBytes, i > 0);
  s.Page("pc.ram", 1000 * kPageBytes, RandomPage(5), true);
  for (int i = 1001; i < 1500; ++i) s.Zero("pc.ram", uint64_t(i) * kPageBytes, true);
  s.Zero("pc.ram", 1600 * kPageBytes, true);                 // a gap: a new run
  s.Zero("vga.vram", 0).Zero("vga.vram", kPageBytes, true);  // another block
  s.Zero("pc.ram", 1601 * kPageBytes);                       // not CONTINUE: a new run
  s.Eos().DeviceStateAndEof();
  for (size_t chunk : {size_t{7}, size_t{1460}, s.b.size()}) {
    RunOptions o;
    o.chunk = chunk;
    auto r = RunMigration(s.b, *a.store, *b.store, o);
    ASSERT_TRUE(r.enc && r.dec);
    EXPECT_EQ(r.delivered, s.b) << chunk;
    EXPECT_EQ(r.enc->zero_pages, 1503u);
    EXPECT_EQ(r.dec->zero_pages, 1503u);
    if (chunk == s.b.size()) {  // one read: runs are not cut by batch ends
      EXPECT_LT(r.enc->wan_bytes_out, 4096u + 600u) << "the zero runs were not merged";
    }
  }
}

TEST(StreamProxy, UnknownRamFlagsFallBackToByteExactPassthrough) {
  TempStore a, b;
  Guest g = MakeGuest(12);
  ASSERT_TRUE(RunMigration(g.stream, *a.store, *b.store).enc);
  // Same pages, then an XBZRLE record: everything from there on is raw.
  QemuStream s;
  s.Head().RamStart({{"pc.ram", 12 * kPageBytes}, {"pc.bios", 2 * kPageBytes}}).Part();
  for (int i = 0; i < 4; ++i) s.Page("pc.ram", uint64_t(i) * kPageBytes, g.pages[size_t(i)], i > 0);
  s.U64(4 * kPageBytes | ram_flag::kXbzrle | ram_flag::kContinue);
  for (int i = 0; i < 100; ++i) s.U8(uint8_t(i));
  s.Page("pc.ram", 5 * kPageBytes, g.pages[5], true);  // never parsed any more
  auto r = RunMigration(s.b, *b.store, *a.store);
  ASSERT_TRUE(r.enc) << r.enc.error().message();
  ASSERT_TRUE(r.dec) << r.dec.error().message();
  EXPECT_EQ(r.delivered, s.b);
  EXPECT_TRUE(r.enc->fell_back);
  EXPECT_EQ(r.enc->ref_pages, 4u);  // the pages before the fallback were still reused
  EXPECT_EQ(r.enc->pages, 4u);
}

TEST(StreamProxy, ReturnPathBytesReachTheSourceQemu) {
  TempStore a, b;
  Guest g = MakeGuest(20);
  RunOptions o;
  o.dest_reply = {'S', 'H', 'U', 'T', 0, 1, 2, 3};
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  ASSERT_TRUE(r.enc) << r.enc.error().message();
  ASSERT_TRUE(r.dec) << r.dec.error().message();
  EXPECT_EQ(r.source_got, o.dest_reply);
  EXPECT_EQ(r.enc->return_bytes, o.dest_reply.size());
  EXPECT_EQ(r.delivered, g.stream);
}

TEST(StreamProxy, CorruptedLiteralFailsTheEndCheckBeforeDeviceState) {
  TempStore a, b;
  Guest g = MakeGuest(30);
  RunOptions o;
  int literals = 0;
  o.tamper = [&](FrameType& t, Bytes& p) {
    if (t == FrameType::kLiteral && ++literals == 5) p[p.size() - 1] ^= 0x01;
    return true;
  };
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  ASSERT_FALSE(r.dec);
  EXPECT_NE(r.dec.error().message().find("END mismatch"), std::string::npos)
      << r.dec.error().message();
  ASSERT_FALSE(r.enc);
  EXPECT_EQ(r.enc.error().code(), ECONNABORTED) << r.enc.error().message();
  EXPECT_TRUE(r.dest_reset);
  EXPECT_TRUE(r.source_reset);
  // The destination never saw the device state.
  Bytes tail(g.stream.end() - 20, g.stream.end());
  EXPECT_EQ(std::search(r.delivered.begin(), r.delivered.end(), tail.begin(), tail.end()),
            r.delivered.end());
  EXPECT_FALSE(r.dec_partial.learned);
  EXPECT_FALSE(r.enc_partial.learned);
}

// A page delivered to the wrong place, or a zero page with the wrong fill,
// has a correct digest: END must cover places and fills too.
TEST(StreamProxy, MisplacedPageOrWrongZeroFillFailsTheEndCheck) {
  struct Case {
    const char* name;
    Tamper tamper;
  };
  std::vector<Case> cases = {
      {"literal moved one page",
       [](FrameType& t, Bytes& p) {
         if (t == FrameType::kLiteral && p[0] == 1 && p[7] == 0x20)
           p[7] ^= 0x10;  // 0x20000 -> 0x30000
         return true;
       }},
      {"zero fill changed",
       [](FrameType& t, Bytes& p) {
         if (t == FrameType::kZero) p[p.size() - 5] = 0x01;
         return true;
       }},
  };
  for (const auto& c : cases) {
    TempStore a, b;
    Guest g = MakeGuest(30);
    RunOptions o;
    o.tamper = c.tamper;
    auto r = RunMigration(g.stream, *a.store, *b.store, o);
    ASSERT_FALSE(r.dec) << c.name;
    EXPECT_NE(r.dec.error().message().find("END mismatch"), std::string::npos)
        << c.name << ": " << r.dec.error().message();
    EXPECT_TRUE(r.dest_reset) << c.name;
    EXPECT_TRUE(r.source_reset) << c.name;
  }
}

TEST(StreamProxy, ReferenceToAPageTheDecoderLacksAborts) {
  TempStore a, b;
  Guest g = MakeGuest(30);
  ASSERT_TRUE(RunMigration(g.stream, *a.store, *b.store).enc);
  // B's summary says it has the pages, but its store lost them between the
  // SUMMARY and the references (eviction, wiped disk): simulate by keeping
  // the manifest and pointing the references at a page nobody has.
  RunOptions o;
  o.tamper = [&](FrameType& t, Bytes& p) {
    if (t == FrameType::kPageRef) p[p.size() - 1] ^= 0xff;  // another digest
    return true;
  };
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  ASSERT_FALSE(r.dec);
  EXPECT_EQ(r.dec.error().code(), ENOENT) << r.dec.error().message();
  ASSERT_FALSE(r.enc);
  EXPECT_TRUE(r.dest_reset);
  EXPECT_TRUE(r.source_reset);
  EXPECT_LT(r.delivered.size(), g.stream.size());
}

TEST(StreamProxy, WipedDecoderStoreMeansLiteralsNotFailures) {
  TempStore a, b;
  Guest g = MakeGuest(30);
  ASSERT_TRUE(RunMigration(g.stream, *a.store, *b.store).enc);
  a.Wipe();
  auto r = RunMigration(g.stream, *b.store, *a.store);
  ASSERT_TRUE(r.enc && r.dec);
  EXPECT_EQ(r.delivered, g.stream);
  EXPECT_EQ(r.enc->ref_pages, 0u);
  EXPECT_EQ(r.enc->summary_entries, 0u);
}

TEST(StreamProxy, WanCutMidStreamResetsBothQemus) {
  TempStore a, b;
  Guest g = MakeGuest(40);
  RunOptions o;
  int frames = 0;
  o.tamper = [&](FrameType&, Bytes&) { return ++frames < 20; };
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  EXPECT_FALSE(r.enc);
  EXPECT_FALSE(r.dec);
  EXPECT_TRUE(r.dest_reset);
  EXPECT_TRUE(r.source_reset);
  EXPECT_LT(r.delivered.size(), g.stream.size());
}

TEST(StreamProxy, SourceStreamEndingMidRecordAbortsTheDestination) {
  TempStore a, b;
  Guest g = MakeGuest(20);
  Bytes cut(g.stream.begin(), g.stream.begin() + 3000);  // inside a page record
  auto r = RunMigration(cut, *a.store, *b.store);
  ASSERT_FALSE(r.enc);
  EXPECT_NE(r.enc.error().message().find("ended early"), std::string::npos);
  ASSERT_FALSE(r.dec);
  EXPECT_TRUE(r.dest_reset);
}

TEST(StreamProxy, DecoderRefusesAnotherVm) {
  TempStore a, b;
  Guest g = MakeGuest(5);
  RunOptions o;
  o.decoder_vm = "other";
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  ASSERT_FALSE(r.dec);
  ASSERT_FALSE(r.enc);
  EXPECT_NE(r.enc.error().message().find("refused"), std::string::npos) << r.enc.error().message();
  EXPECT_TRUE(r.source_reset);
  EXPECT_TRUE(r.delivered.empty());
}

// Drives the decoder by hand: raw frames in, and what it does with them.
struct HandDriven {
  TempStore store;
  std::unique_ptr<ByteStream> enc_side, dec_side, dest_dec, dest_q;
  Result<ProxyStats> result = Fail(Error::Io("not run"));
  std::thread thread;
  HandDriven() {
    auto [e, d] = MakeMemoryPipe();
    enc_side = std::move(e);
    dec_side = std::move(d);
    auto [x, y] = MakeMemoryPipe();
    dest_dec = std::move(x);
    dest_q = std::move(y);
    thread = std::thread([this] {
      QemuConnector c = [this]() -> Result<std::unique_ptr<ByteStream>> {
        return std::move(dest_dec);
      };
      result = RunDecoderSession(*dec_side, c, DecoderOptions{store.store.get(), ""});
      dec_side->Abort();
    });
  }
  ~HandDriven() {
    enc_side->Abort();
    if (thread.joinable()) thread.join();
  }
  void Send(const Bytes& frames) { ASSERT_TRUE(enc_side->WriteAll(frames)); }
  // Collects the decoder's frames until it closes.
  std::vector<FrameType> Replies() {
    FrameReader fr;
    std::vector<FrameType> out;
    Bytes all;
    bool reset = false;
    Drain(*enc_side, all, reset);
    fr.Append(all);
    while (true) {
      auto f = fr.Next();
      if (!f || !*f) break;
      out.push_back((*f)->type);
      if ((*f)->type == FrameType::kAbort) last_abort = *DecodeAbort((*f)->payload);
    }
    return out;
  }
  std::string last_abort;
  Bytes Delivered(bool* reset) {
    Bytes got;
    bool r = false;
    Drain(*dest_q, got, r);
    if (reset) *reset = r;
    return got;
  }
};

Bytes HelloFrame(uint16_t version = kProtocolVersion) {
  Bytes w;
  Hello h;
  h.version = version;
  h.vm = "vm1";
  EXPECT_TRUE(AppendHello(h, w));
  return w;
}

TEST(StreamProxy, DecoderAbortsOnMalformedFramesAndClosesTheDestination) {
  struct Case {
    const char* name;
    Bytes frames;
  };
  Bytes bad_type = {0x42, 0, 0, 0, 0};
  Bytes bad_ref = {uint8_t(FrameType::kPageRef), 0, 0, 0, 3, 0, 0, 0};
  Bytes early_done;
  (void)AppendDone(DoneFigures{}, early_done);
  Bytes summary_from_encoder;
  (void)AppendSummary(SummaryChunk{true, {}}, summary_from_encoder);
  Bytes huge = {uint8_t(FrameType::kPassthrough), 0x7f, 0xff, 0xff, 0xff};
  std::vector<Case> cases = {
      {"unknown frame type", bad_type}, {"truncated PAGE_REF", bad_ref},
      {"DONE before END", early_done},  {"SUMMARY from the encoder", summary_from_encoder},
      {"oversized frame", huge},
  };
  for (const auto& c : cases) {
    HandDriven h;
    Bytes in = HelloFrame();
    Bytes pass;
    (void)AppendPassthrough(Bytes{'Q', 'E', 'V', 'M'}, pass);
    in.insert(in.end(), pass.begin(), pass.end());
    in.insert(in.end(), c.frames.begin(), c.frames.end());
    h.Send(in);
    auto replies = h.Replies();
    h.thread.join();
    EXPECT_FALSE(h.result) << c.name;
    ASSERT_FALSE(replies.empty()) << c.name;
    EXPECT_EQ(replies.back(), FrameType::kAbort) << c.name;
    bool reset = false;
    Bytes got = h.Delivered(&reset);
    EXPECT_TRUE(reset) << c.name << ": the destination QEMU must see a failure, not an EOF";
  }
}

TEST(StreamProxy, SilentPeersTimeOutInTheHandshake) {
  TempStore a;
  {  // an encoder whose decoder never answers
    auto [src, enc_q] = MakeMemoryPipe();
    auto [enc_w, dec_w] = MakeMemoryPipe();
    EncoderOptions o;
    o.store = a.store.get();
    o.vm = "vm1";
    o.handshake_timeout = std::chrono::milliseconds(200);
    auto r = RunEncoderSession(*enc_q, *enc_w, o);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code(), ETIMEDOUT) << r.error().message();
    Bytes got;
    bool reset = false;
    src->ShutdownWrite();
    Drain(*src, got, reset);
    EXPECT_TRUE(reset) << "the source QEMU must see its migration fail";
  }
  {  // a decoder whose encoder never says HELLO
    auto [enc_w, dec_w] = MakeMemoryPipe();
    bool connected = false;
    QemuConnector c = [&]() -> Result<std::unique_ptr<ByteStream>> {
      connected = true;
      return Fail(Error::Io("unused"));
    };
    DecoderOptions o{a.store.get(), ""};
    o.handshake_timeout = std::chrono::milliseconds(200);
    auto r = RunDecoderSession(*dec_w, c, o);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code(), ETIMEDOUT) << r.error().message();
    EXPECT_FALSE(connected);
  }
}

TEST(StreamProxy, DecoderRefusesAnotherProtocolVersion) {
  HandDriven h;
  h.Send(HelloFrame(kProtocolVersion + 1));
  auto replies = h.Replies();
  h.thread.join();
  ASSERT_FALSE(h.result);
  EXPECT_NE(h.last_abort.find("version"), std::string::npos) << h.last_abort;
}

TEST(StreamProxy, EndMismatchWithholdsEverythingAfterIt) {
  HandDriven h;
  Bytes in = HelloFrame();
  (void)AppendPassthrough(Bytes{1, 2, 3}, in);
  EndFigures wrong;
  wrong.passthrough_bytes = 3;  // but the CRC and the page digest are wrong
  (void)AppendEnd(wrong, in);
  (void)AppendPassthrough(Bytes{'D', 'E', 'V'}, in);
  h.Send(in);
  auto replies = h.Replies();
  h.thread.join();
  ASSERT_FALSE(h.result);
  EXPECT_NE(h.result.error().message().find("END mismatch"), std::string::npos);
  bool reset = false;
  Bytes got = h.Delivered(&reset);
  EXPECT_TRUE(reset);
  // What came before END may or may not have been delivered; what came after
  // it never is.
  EXPECT_LE(got.size(), 3u);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), Bytes{1, 2, 3}.begin()));
}

// --- deadlines on silent peers after the handshake ---------------------------------------

TEST(StreamProxy, SourceQemuStallingMidStreamFailsTheMigrationCleanly) {
  TempStore a, b;
  Guest g = MakeGuest(200);
  RunOptions o;
  o.source_stall_after = g.stream.size() / 2;
  o.enc_idle = std::chrono::milliseconds(200);
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  ASSERT_FALSE(r.enc);
  EXPECT_EQ(r.enc.error().code(), ETIMEDOUT) << r.enc.error().message();
  EXPECT_NE(r.enc.error().message().find("source QEMU sent nothing"), std::string::npos)
      << r.enc.error().message();
  EXPECT_FALSE(r.dec);
  EXPECT_TRUE(r.source_reset) << "the source QEMU must see its migration fail";
  EXPECT_TRUE(r.dest_reset) << "the destination QEMU must see a failed stream, not an EOF";
  EXPECT_LT(r.delivered.size(), g.stream.size());
}

TEST(StreamProxy, SilentEncoderMidStreamFailsTheDecoderCleanly) {
  TempStore a, b;
  Guest g = MakeGuest(200);
  RunOptions o;
  o.source_stall_after = g.stream.size() / 2;  // so the encoder goes quiet too
  o.dec_idle = std::chrono::milliseconds(200);
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  ASSERT_FALSE(r.dec);
  EXPECT_EQ(r.dec.error().code(), ETIMEDOUT) << r.dec.error().message();
  EXPECT_NE(r.dec.error().message().find("encoder sent nothing"), std::string::npos)
      << r.dec.error().message();
  ASSERT_FALSE(r.enc);  // the decoder's ABORT reached it
  EXPECT_NE(r.enc.error().message().find("idle timeout"), std::string::npos)
      << r.enc.error().message();
  EXPECT_TRUE(r.source_reset);
  EXPECT_TRUE(r.dest_reset);
}

TEST(StreamProxy, StalledWanPeerFailsTheEncoderCleanly) {
  TempStore a, b;
  Guest g = MakeGuest(900);  // more than the WAN pipe holds
  RunOptions o;
  o.wan_stall_after_frames = 50;
  o.enc_idle = std::chrono::milliseconds(200);
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  ASSERT_FALSE(r.enc);
  EXPECT_EQ(r.enc.error().code(), ETIMEDOUT) << r.enc.error().message();
  EXPECT_NE(r.enc.error().message().find("decoder took no data"), std::string::npos)
      << r.enc.error().message();
  EXPECT_FALSE(r.dec);
  EXPECT_TRUE(r.source_reset);
  EXPECT_TRUE(r.dest_reset);
  EXPECT_LT(r.delivered.size(), g.stream.size());
}

TEST(StreamProxy, StalledDestinationQemuFailsTheDecoderCleanly) {
  TempStore a, b;
  Guest g = MakeGuest(900);
  RunOptions o;
  o.dest_stall_after = 100 << 10;
  o.dec_idle = std::chrono::milliseconds(200);
  auto r = RunMigration(g.stream, *a.store, *b.store, o);
  ASSERT_FALSE(r.dec);
  EXPECT_EQ(r.dec.error().code(), ETIMEDOUT) << r.dec.error().message();
  EXPECT_NE(r.dec.error().message().find("destination QEMU took no data"), std::string::npos)
      << r.dec.error().message();
  EXPECT_FALSE(r.enc);
  EXPECT_TRUE(r.source_reset);
  EXPECT_TRUE(r.dest_reset);
}

TEST(StreamProxy, DecoderThatNeverConfirmsTheEndFailsTheEncoderCleanly) {
  // A fake decoder: answers the handshake, swallows the stream, then never
  // sends END nor closes.
  TempStore a;
  Guest g = MakeGuest(30);
  auto [src, enc_q] = MakeMemoryPipe();
  auto [enc_w, dec_w] = MakeMemoryPipe();
  std::atomic<bool> stop{false};
  std::thread fake([&, w = dec_w.get()] {
    Bytes hs = HelloFrame();
    SummaryChunk last;
    last.last = true;
    EXPECT_TRUE(AppendSummary(last, hs));
    (void)w->WriteAll(hs);
    uint8_t buf[65536];
    while (true) {
      auto n = w->Read(buf);
      if (!n || *n == 0) break;  // the encoder's DONE and half-close
    }
    StallUntil(stop);
  });
  std::thread source([&, s = src.get()] {
    (void)s->WriteAll(g.stream);
    s->ShutdownWrite();
    Bytes got;
    bool reset = false;
    Drain(*s, got, reset);
  });
  EncoderOptions o;
  o.store = a.store.get();
  o.vm = "vm1";
  o.idle_timeout = std::chrono::milliseconds(200);
  auto r = RunEncoderSession(*enc_q, *enc_w, o);
  stop = true;
  fake.join();
  source.join();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), ETIMEDOUT) << r.error().message();
  EXPECT_NE(r.error().message().find("did not confirm the end"), std::string::npos)
      << r.error().message();
}

// --- SUMMARY pages are pinned against quota eviction ---------------------------------------

// A stream whose first `fresh` pages are new and whose next ones carry the
// non-zero pages of `old` (which the decoder's SUMMARY offers): the decoder
// learns the new literals before it meets the references.
Bytes FreshThenOld(int fresh, const Guest& old, int* old_pages) {
  QemuStream s;
  uint64_t total = uint64_t(fresh + int(old.pages.size())) * kPageBytes;
  s.Head().RamStart({{"pc.ram", total}});
  s.Part();
  for (int i = 0; i < fresh; ++i)
    s.Page("pc.ram", uint64_t(i) * kPageBytes, RandomPage(900000 + uint32_t(i)), i > 0);
  *old_pages = 0;
  for (size_t i = 0; i < old.pages.size(); ++i) {
    if (old.pages[i].empty()) continue;
    s.Page("pc.ram", uint64_t(fresh + int(i)) * kPageBytes, old.pages[i], true);
    ++*old_pages;
  }
  s.Eos();
  s.End();
  s.Eos();
  s.DeviceStateAndEof();
  return s.b;
}

TEST(StreamProxy, QuotaEvictionCannotDropPagesTheSummaryOffered) {
  // B's store: small segments, and a quota that holds the first image plus
  // a little, far less than the next migration's new pages.
  constexpr uint64_t kSeg = 16 + 8 * (40 + 4096);  // 8 records a segment
  TempStore a;
  TempStore b(/*quota_bytes=*/0, kSeg);
  Guest g = MakeGuest(60);
  ASSERT_TRUE(RunMigration(g.stream, *a.store, *b.store).dec);  // B learns g
  const uint64_t held = b.store->stats().bytes;
  const uint64_t quota = held + 2 * kSeg;
  TempStore& bq = b;
  bq.SetQuota(quota);  // reopens B's store with the quota
  ASSERT_EQ(bq.store->stats().evicted_pages, 0u);

  int old_pages = 0;
  Bytes stream = FreshThenOld(200, g, &old_pages);
  RunOptions o;
  o.dec_quota = quota;
  o.chunk = 64 << 10;
  auto r = RunMigration(stream, *a.store, *bq.store, o);
  ASSERT_TRUE(r.dec) << r.dec.error().message();
  ASSERT_TRUE(r.enc) << r.enc.error().message();
  EXPECT_EQ(r.delivered, stream);
  EXPECT_EQ(r.dec->ref_pages, uint64_t(old_pages));
  EXPECT_GT(r.dec->learn_skipped_pages, 0u);  // what did not fit was not learned
  auto st = bq.store->stats();
  EXPECT_LE(st.bytes, quota);
  EXPECT_EQ(st.evicted_pages, 0u);
}

// END (inside the downtime) waits only for the learner's hashing: the worker
// hashes its backlog, lets END go, then stores it. Whether the worker is
// behind when END comes depends on scheduling, so this checks what must
// hold either way: END covers exactly the pages submitted before it, in
// order, and every page is still learned and in the manifest afterwards.
TEST(StreamProxy, LearnerEndFiguresCoverTheBacklogAndEveryPageIsStillLearned) {
  for (bool pinned : {false, true}) {
    TempStore t;
    detail::PageLearner learner(
        detail::PageLearner::Options{t.store.get(), 64u << 20, /*quota_bytes=*/0, "test"});
    learner.SetPinned(pinned);
    auto hasher = PageHasher::Create();
    ASSERT_TRUE(hasher);
    detail::EndAccumulator expect;
    std::mt19937_64 rng(7);
    Bytes page(kPageBytes);
    std::vector<PageDigest> all;
    uint64_t offset = 0;
    auto add = [&](bool in_window) {
      for (auto& b : page) b = uint8_t(rng());
      PageDigest d = hasher->Hash(page);
      all.push_back(d);
      learner.AddPage("pc.ram", offset, page, in_window);
      if (in_window) expect.Page("pc.ram", offset, d);
      offset += kPageBytes;
    };
    // Many small batches, as one per WAN read: a backlog for the worker.
    for (int batch = 0; batch < 64; ++batch) {
      for (int i = 0; i < 16; ++i) add(true);
      learner.AddZero("pc.ram", offset, 0, true);
      expect.Zero("pc.ram", offset, 0);
      offset += kPageBytes;
      learner.Submit();
    }
    for (int i = 0; i < 5; ++i) add(true);  // not submitted yet: DrainForEnd does
    EndFigures got = learner.DrainForEnd();
    EXPECT_EQ(got, expect.Figures()) << detail::DescribeEndMismatch(got, expect.Figures());
    learner.SetPinned(false);
    for (int i = 0; i < 7; ++i) add(false);  // after END: learned, not in END
    learner.Submit();
    learner.Drain();
    EXPECT_EQ(learner.PageFigures(), expect.Figures());
    EXPECT_EQ(learner.stored_pages(), all.size());
    EXPECT_EQ(learner.skipped_pages(), 0u);
    for (const auto& d : all) EXPECT_TRUE(t.store->Contains(d));
    EXPECT_EQ(learner.BuildManifest().entries.size(), all.size());
  }
}

// Flow control: with the smallest window the stream (several windows long,
// literals on the first hop, references expanding 89-fold on the return
// hop) still arrives byte for byte, and without a window too; the decoder
// reports DELIVERED so the encoder never waits for good.
TEST(StreamProxy, FlowControlWindowKeepsTheStreamExactBothWays) {
  for (size_t window : {kMinFlowWindowBytes, size_t{0}}) {
    TempStore a, b;
    Guest g = MakeGuest(2000);  // about 5.5 MiB of stream
    ASSERT_GT(g.stream.size(), 5 * kMinFlowWindowBytes);
    RunOptions o;
    o.window = window;
    o.chunk = 64 << 10;
    auto hop1 = RunMigration(g.stream, *a.store, *b.store, o);
    ASSERT_TRUE(hop1.enc) << hop1.enc.error().message();
    ASSERT_TRUE(hop1.dec) << hop1.dec.error().message();
    EXPECT_EQ(hop1.delivered, g.stream);
    auto hop2 = RunMigration(g.stream, *b.store, *a.store, o);
    ASSERT_TRUE(hop2.enc) << hop2.enc.error().message();
    ASSERT_TRUE(hop2.dec) << hop2.dec.error().message();
    EXPECT_EQ(hop2.delivered, g.stream);
    EXPECT_GT(hop2.enc->ref_pages, 1000u);
  }
}

}  // namespace
}  // namespace kagemusha::memcache

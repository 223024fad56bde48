// Session-level tests of NbdServer: the real server on a Unix socket, driven
// by a small hand-written blocking client that speaks the protocol byte by
// byte, so these tests do not depend on our own client codec. At the end,
// interop checks with nbdinfo / qemu-io / qemu-img / nbdcopy when installed.
#include "kagemusha/storage/nbd_server.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "fake_remote.h"
#include "kagemusha/common/coding.h"
#include "kagemusha/storage/copy_on_read.h"
#include "kagemusha/storage/file_backend.h"
#include "kagemusha/storage/nbd_protocol.h"
#include "memory_backend_for_test.h"

namespace kagemusha::storage {
namespace {

using namespace nbd;
using namespace std::chrono_literals;
using Bytes = std::vector<uint8_t>;

// --- A minimal blocking NBD client for tests ---------------------------------

struct OptReply {
  uint32_t option = 0, type = 0;
  Bytes payload;
};

struct Chunk {
  bool simple = false;
  uint16_t flags = 0, type = 0;
  uint32_t error = 0;  // simple replies
  uint64_t cookie = 0;
  Bytes payload;  // structured payload, or data of a simple read reply
};

class TestClient {
 public:
  ~TestClient() { Close(); }

  bool Connect(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    return ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool Send(const Bytes& b) {
    size_t done = 0;
    while (done < b.size()) {
      ssize_t n = ::send(fd_, b.data() + done, b.size() - done, MSG_NOSIGNAL);
      if (n <= 0) return false;
      done += size_t(n);
    }
    return true;
  }
  // Reads exactly n bytes or returns nullopt on EOF/error/timeout.
  std::optional<Bytes> Recv(size_t n, std::chrono::milliseconds timeout = 10s) {
    Bytes b(n);
    size_t done = 0;
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (done < n) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, int(left.count())) <= 0) return std::nullopt;
      ssize_t r = ::recv(fd_, b.data() + done, n - done, 0);
      if (r <= 0) return std::nullopt;
      done += size_t(r);
    }
    return b;
  }
  // True if the server closed the connection (EOF) within the timeout.
  bool SeesEof(std::chrono::milliseconds timeout = 5s) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, int(timeout.count())) <= 0) return false;
    uint8_t c;
    return ::recv(fd_, &c, 1, 0) <= 0;
  }

  // Reads the greeting and sends client flags.
  bool Greet(uint32_t flags = kClientFixedNewstyle | kClientNoZeroes) {
    auto g = Recv(18);
    if (!g || LoadBe64(g->data()) != kNbdMagic || LoadBe64(g->data() + 8) != kIHaveOpt)
      return false;
    Bytes f(4);
    StoreBe32(f.data(), flags);
    return Send(f);
  }
  bool SendOption(uint32_t option, const Bytes& payload, std::optional<uint32_t> len = {}) {
    Bytes h(16);
    StoreBe64(h.data(), kIHaveOpt);
    StoreBe32(h.data() + 8, option);
    StoreBe32(h.data() + 12, len.value_or(uint32_t(payload.size())));
    h.insert(h.end(), payload.begin(), payload.end());
    return Send(h);
  }
  std::optional<OptReply> RecvOptReply() {
    auto h = Recv(20);
    if (!h || LoadBe64(h->data()) != kOptReplyMagic) return std::nullopt;
    OptReply r{LoadBe32(h->data() + 8), LoadBe32(h->data() + 12), {}};
    uint32_t len = LoadBe32(h->data() + 16);
    if (len) {
      auto p = Recv(len);
      if (!p) return std::nullopt;
      r.payload = std::move(*p);
    }
    return r;
  }
  // Sends an option and collects replies up to the final one (ACK or error).
  std::vector<OptReply> Option(uint32_t option, const Bytes& payload) {
    std::vector<OptReply> out;
    if (!SendOption(option, payload)) return out;
    for (;;) {
      auto r = RecvOptReply();
      if (!r) break;
      out.push_back(*r);
      if (r->type == kRepAck || (r->type & kRepFlagError)) break;
    }
    return out;
  }
  static Bytes InfoPayload(const std::string& name, std::vector<uint16_t> infos = {}) {
    Bytes b(4);
    StoreBe32(b.data(), uint32_t(name.size()));
    b.insert(b.end(), name.begin(), name.end());
    b.push_back(uint8_t(infos.size() >> 8));
    b.push_back(uint8_t(infos.size()));
    for (auto i : infos) {
      b.push_back(uint8_t(i >> 8));
      b.push_back(uint8_t(i));
    }
    return b;
  }
  static Bytes MetaPayload(const std::string& name, const std::string& query) {
    Bytes b(4);
    StoreBe32(b.data(), uint32_t(name.size()));
    b.insert(b.end(), name.begin(), name.end());
    Bytes n(8);
    StoreBe32(n.data(), 1);
    StoreBe32(n.data() + 4, uint32_t(query.size()));
    b.insert(b.end(), n.begin(), n.end());
    b.insert(b.end(), query.begin(), query.end());
    return b;
  }

  // Full handshake through NBD_OPT_GO. Returns transmission flags.
  std::optional<uint16_t> Go(const std::string& name, bool structured, bool meta) {
    if (!Greet()) return std::nullopt;
    if (structured) {
      auto r = Option(kOptStructuredReply, {});
      if (r.size() != 1 || r[0].type != kRepAck) return std::nullopt;
      structured_ = true;
    }
    if (meta) {
      auto r = Option(kOptSetMetaContext, MetaPayload(name, kMetaBaseAllocation));
      if (r.size() != 2 || r[0].type != kRepMetaContext) return std::nullopt;
    }
    auto r = Option(kOptGo, InfoPayload(name));
    if (r.empty() || r.back().type != kRepAck) return std::nullopt;
    for (const auto& i : r) {
      if (i.type == kRepInfo && LoadBe16(i.payload.data()) == kInfoExport) {
        size_ = LoadBe64(i.payload.data() + 2);
        return LoadBe16(i.payload.data() + 10);
      }
    }
    return std::nullopt;
  }

  bool Request(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset, uint32_t length,
               const Bytes& payload = {}) {
    Bytes b(28);
    StoreBe32(b.data(), kRequestMagic);
    StoreBe16(b.data() + 4, flags);
    StoreBe16(b.data() + 6, type);
    StoreBe64(b.data() + 8, cookie);
    StoreBe64(b.data() + 16, offset);
    StoreBe32(b.data() + 24, length);
    b.insert(b.end(), payload.begin(), payload.end());
    return Send(b);
  }
  // Reads one reply message. For a simple reply to a read, pass the read
  // length so its data is consumed (simple replies are not self-framing).
  std::optional<Chunk> Reply(uint32_t simple_read_length = 0,
                             std::chrono::milliseconds timeout = 10s) {
    auto m = Recv(4, timeout);
    if (!m) return std::nullopt;
    Chunk c;
    uint32_t magic = LoadBe32(m->data());
    if (magic == kSimpleReplyMagic) {
      auto h = Recv(12);
      if (!h) return std::nullopt;
      c.simple = true;
      c.error = LoadBe32(h->data());
      c.cookie = LoadBe64(h->data() + 4);
      if (c.error == 0 && simple_read_length) {
        auto d = Recv(simple_read_length);
        if (!d) return std::nullopt;
        c.payload = std::move(*d);
      }
      return c;
    }
    if (magic != kStructuredReplyMagic) return std::nullopt;
    auto h = Recv(16);
    if (!h) return std::nullopt;
    c.flags = LoadBe16(h->data());
    c.type = LoadBe16(h->data() + 2);
    c.cookie = LoadBe64(h->data() + 4);
    uint32_t len = LoadBe32(h->data() + 12);
    if (len) {
      auto p = Recv(len);
      if (!p) return std::nullopt;
      c.payload = std::move(*p);
    }
    return c;
  }
  // Reads structured chunks of one request until DONE (assumes no other
  // request is in flight).
  std::vector<Chunk> ReplyChunks() {
    std::vector<Chunk> out;
    for (;;) {
      auto c = Reply();
      if (!c) break;
      out.push_back(*c);
      if (c->simple || (c->flags & kReplyFlagDone)) break;
    }
    return out;
  }

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }

 private:
  int fd_ = -1;
  bool structured_ = false;
  uint64_t size_ = 0;
};

Bytes Pattern(size_t n, uint8_t seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = uint8_t(seed + i * 7 + (i >> 9));
  return b;
}

uint32_t ErrorOf(const Chunk& c) {
  if (c.simple) return c.error;
  if (c.type & 0x8000) return LoadBe32(c.payload.data());
  return 0;
}

// --- Fixture: a real server on a Unix socket ---------------------------------

class NbdServerTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kSize = 4 << 20;

  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("kgm-nbd-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    std::filesystem::create_directories(dir_);
    socket_ = (dir_ / "nbd.sock").string();
    disk_ = std::make_shared<MemoryBackend>(kSize);
    BackendCaps ro_caps;
    ro_caps.read_only = true;
    ro_ = std::make_shared<MemoryBackend>(64 * 1024, ro_caps);
  }

  void StartServer(ServerOptions opts = {}) {
    opts.handshake_timeout = handshake_timeout_;
    if (max_splice_pipes_) opts.max_splice_pipes = *max_splice_pipes_;
    opts.worker_threads = 4;
    server_ = NbdServer::Create(opts);
    ASSERT_TRUE(server_->AddExport({"disk", "a test disk", disk_, false}));
    ASSERT_TRUE(server_->AddExport({"ro", "", ro_, false}));
    ASSERT_TRUE(server_->AddExport({"forced-ro", "", disk_, true}));
    if (file_) {
      ASSERT_TRUE(server_->AddExport({"file", "", file_, false}));
    }
    auto st = server_->ListenUnix(socket_);
    ASSERT_TRUE(st) << st.error().message();
    st = server_->ListenTcp("127.0.0.1:0");
    ASSERT_TRUE(st) << st.error().message();
    thread_ = std::thread([this] { server_->Run(); });
  }

  void TearDown() override {
    if (server_) {
      server_->Stop();
      thread_.join();
      server_.reset();
    }
    std::filesystem::remove_all(dir_);
  }

  std::unique_ptr<TestClient> Connected(const std::string& name = "disk", bool structured = true,
                                        bool meta = true) {
    auto c = std::make_unique<TestClient>();
    EXPECT_TRUE(c->Connect(socket_));
    auto flags = c->Go(name, structured, meta);
    EXPECT_TRUE(flags.has_value());
    flags_ = flags.value_or(0);
    return c;
  }

  // A sparse image file served by FileBackend (export "file"), so reads
  // take the zero-copy splice path; file_bytes_ mirrors its contents.
  static constexpr uint64_t kFileSize = 4 << 20;
  void MakeFileExport() {
    file_path_ = (dir_ / "image.raw").string();
    file_bytes_.assign(kFileSize, 0);
    int fd = ::open(file_path_.c_str(), O_CREAT | O_RDWR | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, off_t(kFileSize)), 0);
    const std::pair<uint64_t, size_t> runs[] = {
        {0, 1 << 20}, {(2 << 20) + 4096, 64 * 1024}, {3 << 20, 12288}, {kFileSize - 4096, 4096}};
    uint8_t seed = 11;
    for (auto [off, len] : runs) {
      Bytes p = Pattern(len, seed++);
      ASSERT_EQ(::pwrite(fd, p.data(), len, off_t(off)), ssize_t(len));
      std::copy(p.begin(), p.end(), file_bytes_.begin() + off);
    }
    ::close(fd);
    auto fb = FileBackend::Open(file_path_);
    ASSERT_TRUE(fb) << fb.error().message();
    file_ = std::move(*fb);
  }
  Bytes FileBytes(uint64_t offset, size_t length) const {
    return Bytes(file_bytes_.begin() + offset, file_bytes_.begin() + offset + length);
  }

  static inline int counter_ = 0;
  std::optional<size_t> max_splice_pipes_;
  std::shared_ptr<Backend> file_;
  std::string file_path_;
  Bytes file_bytes_;
  std::chrono::seconds handshake_timeout_{10};
  std::filesystem::path dir_;
  std::string socket_;
  std::shared_ptr<MemoryBackend> disk_, ro_;
  std::unique_ptr<NbdServer> server_;
  std::thread thread_;
  uint16_t flags_ = 0;
};

TEST_F(NbdServerTest, WriteThenReadRoundTripsWithSimpleReplies) {
  StartServer();
  auto c = Connected("disk", false, false);
  EXPECT_FALSE(flags_ & kTxSendDf);  // no DF without structured replies
  EXPECT_TRUE(flags_ & kTxSendTrim);
  EXPECT_FALSE(flags_ & kTxCanMultiConn);  // MemoryBackend does not claim it
  Bytes data = Pattern(8192, 3);
  ASSERT_TRUE(c->Request(0, kCmdWrite, 1, 4096, 8192, data));
  auto w = c->Reply();
  ASSERT_TRUE(w);
  EXPECT_TRUE(w->simple);
  EXPECT_EQ(w->cookie, 1u);
  EXPECT_EQ(w->error, 0u);
  ASSERT_TRUE(c->Request(0, kCmdRead, 2, 4096, 8192));
  auto r = c->Reply(8192);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->cookie, 2u);
  EXPECT_EQ(r->payload, data);
  ASSERT_TRUE(c->Request(0, kCmdFlush, 3, 0, 0));
  EXPECT_EQ(c->Reply()->error, 0u);
  EXPECT_EQ(disk_->flushes.load(), 1);
}

// A client that sends requests and never reads its replies must not make
// the server hold max_requests_in_flight replies of the largest size: the
// reader stops taking requests once 32 MiB of data is held.
TEST_F(NbdServerTest, AClientThatNeverReadsItsRepliesMakesTheServerStopTakingRequests) {
  StartServer();
  auto c = Connected("disk", false, false);
  Bytes data = Pattern(kSize, 9);
  ASSERT_TRUE(c->Request(0, kCmdWrite, 1, 0, uint32_t(kSize), data));
  auto w = c->Reply();
  ASSERT_TRUE(w);
  ASSERT_EQ(w->error, 0u);
  const uint64_t before = server_->Stats().requests;
  constexpr uint64_t kReads = 64;  // the default in-flight limit, 64 MiB in all
  for (uint64_t i = 0; i < kReads; ++i)
    ASSERT_TRUE(c->Request(0, kCmdRead, 100 + i, (i % 4) << 20, 1 << 20));
  // Until the server stops taking requests: the count has reached what the
  // budget allows (at least 16 MiB of reads) and holds for 300 ms.
  uint64_t taken = 0;
  for (int i = 0; i < 50; ++i) {
    const uint64_t now = server_->Stats().requests - before;
    if (i > 0 && now == taken && now >= 16) break;
    taken = now;
    std::this_thread::sleep_for(300ms);
  }
  EXPECT_GE(taken, 16u) << "the server stopped taking requests before its budget was used";
  EXPECT_LE(taken, 40u) << "the server took " << taken << " 1 MiB reads whose replies nobody reads";
  // Reading the replies lets the rest in, each with its own bytes.
  for (uint64_t i = 0; i < kReads; ++i) {
    auto r = c->Reply(1 << 20);
    ASSERT_TRUE(r) << "reply " << i;
    ASSERT_GE(r->cookie, 100u);
    ASSERT_LT(r->cookie, 100 + kReads);
    const size_t off = size_t((r->cookie - 100) % 4) << 20;
    EXPECT_TRUE(r->payload == Bytes(data.begin() + off, data.begin() + off + (1 << 20)))
        << "cookie " << r->cookie;
  }
  EXPECT_EQ(server_->Stats().requests - before, kReads);
}

// A socket file at `path` that nobody listens on, as a dead server leaves.
bool MakeDeadSocket(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.data(), std::min(path.size(), sizeof a.sun_path - 1));
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

// A Unix socket path another live server listens on is refused (two
// servers would serve one image); a dead server's socket file is replaced;
// at exit a server removes only the socket file it made.
TEST_F(NbdServerTest, ListenUnixRefusesALiveServersSocketAndReplacesADeadOnesOnly) {
  StartServer();
  auto second = NbdServer::Create({});
  auto busy = second->ListenUnix(socket_);
  ASSERT_FALSE(busy) << "took over the socket of a live server";
  EXPECT_EQ(busy.error().code(), EADDRINUSE) << busy.error().message();
  auto c = Connected("disk", false, false);  // the first server still answers
  ASSERT_TRUE(c->Request(0, kCmdFlush, 1, 0, 0));
  auto r = c->Reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, 0u);

  // A socket file nobody listens on (a dead server's) is replaced.
  const std::string stale = (dir_ / "stale.sock").string();
  ASSERT_TRUE(MakeDeadSocket(stale));
  auto replaced = second->ListenUnix(stale);
  EXPECT_TRUE(replaced) << replaced.error().message();

  // The first server's file is replaced by someone else's; the first server
  // stops and must leave that file alone.
  ASSERT_EQ(::unlink(socket_.c_str()), 0);
  ASSERT_TRUE(MakeDeadSocket(socket_));
  c.reset();
  server_->Stop();
  thread_.join();
  server_.reset();
  EXPECT_TRUE(std::filesystem::exists(socket_)) << "removed another server's socket file at exit";
}

TEST_F(NbdServerTest, ConnectionsOverTheLimitAreClosedAtAcceptAndTheOthersServeOn) {
  ServerOptions o;
  o.max_connections = 2;
  StartServer(o);
  auto c1 = Connected("disk", false, false);
  auto c2 = Connected("disk", false, false);
  TestClient c3;
  ASSERT_TRUE(c3.Connect(socket_));  // the kernel accepts; the server closes it
  EXPECT_FALSE(c3.Greet()) << "a third connection was served over max_connections = 2";
  EXPECT_EQ(server_->Stats().connections_refused, 1u);
  ASSERT_TRUE(c1->Request(0, kCmdFlush, 1, 0, 0));
  auto r = c1->Reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->error, 0u);
  // Once one leaves, a new connection is served again.
  c2.reset();
  for (int i = 0; i < 100 && server_->Stats().connections_open > 1; ++i)
    std::this_thread::sleep_for(50ms);
  auto c4 = Connected("disk", false, false);
  ASSERT_TRUE(c4->Request(0, kCmdFlush, 2, 0, 0));
  auto r4 = c4->Reply();
  ASSERT_TRUE(r4);
  EXPECT_EQ(r4->error, 0u);
  EXPECT_EQ(server_->Stats().connections_refused, 1u);
}

TEST_F(NbdServerTest, StructuredReadOfAllocatedDataIsOneDataChunk) {
  StartServer();
  auto c = Connected();
  EXPECT_TRUE(flags_ & kTxSendDf);
  Bytes data = Pattern(4096, 9);
  ASSERT_TRUE(c->Request(kCmdFlagFua, kCmdWrite, 1, 0, 4096, data));
  ASSERT_EQ(ErrorOf(*c->Reply()), 0u);
  ASSERT_TRUE(c->Request(0, kCmdRead, 2, 0, 4096));
  auto chunks = c->ReplyChunks();
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].type, kReplyTypeOffsetData);
  EXPECT_TRUE(chunks[0].flags & kReplyFlagDone);
  ASSERT_EQ(chunks[0].payload.size(), 8u + 4096);
  EXPECT_EQ(LoadBe64(chunks[0].payload.data()), 0u);
  EXPECT_EQ(Bytes(chunks[0].payload.begin() + 8, chunks[0].payload.end()), data);
}

TEST_F(NbdServerTest, RepliesOutOfOrderWhenTheBackendIsSlowForOneRequest) {
  disk_->before_read = [](uint64_t offset, size_t) {
    if (offset == 0) std::this_thread::sleep_for(300ms);
  };
  StartServer();
  auto c = Connected();
  ASSERT_TRUE(c->Request(0, kCmdRead, 100, 0, 512));      // slow
  ASSERT_TRUE(c->Request(0, kCmdRead, 200, 8192, 512));   // fast
  ASSERT_TRUE(c->Request(0, kCmdRead, 300, 16384, 512));  // fast
  std::vector<uint64_t> order;
  for (int i = 0; i < 3; ++i) {
    auto r = c->Reply();
    ASSERT_TRUE(r);
    EXPECT_EQ(r->type, kReplyTypeOffsetData);
    order.push_back(r->cookie);
  }
  EXPECT_EQ(order.back(), 100u);
  EXPECT_EQ(std::count(order.begin(), order.end(), 200u), 1);
  EXPECT_EQ(std::count(order.begin(), order.end(), 300u), 1);
}

TEST_F(NbdServerTest, StructuredReadSendsHoleChunksUnlessDontFragment) {
  StartServer();
  auto c = Connected();
  Bytes a = Pattern(4096, 1), b = Pattern(4096, 2);
  ASSERT_TRUE(c->Request(0, kCmdWrite, 1, 0, 4096, a));
  ASSERT_EQ(ErrorOf(*c->Reply()), 0u);
  ASSERT_TRUE(c->Request(0, kCmdWrite, 2, 128 * 1024, 4096, b));
  ASSERT_EQ(ErrorOf(*c->Reply()), 0u);

  ASSERT_TRUE(c->Request(0, kCmdRead, 3, 0, 256 * 1024));
  auto chunks = c->ReplyChunks();
  ASSERT_EQ(chunks.size(), 4u);
  EXPECT_EQ(chunks[0].type, kReplyTypeOffsetData);
  EXPECT_EQ(chunks[0].payload.size(), 8u + 4096);
  EXPECT_EQ(Bytes(chunks[0].payload.begin() + 8, chunks[0].payload.end()), a);
  EXPECT_EQ(chunks[1].type, kReplyTypeOffsetHole);
  EXPECT_EQ(LoadBe64(chunks[1].payload.data()), 4096u);
  EXPECT_EQ(LoadBe32(chunks[1].payload.data() + 8), 128u * 1024 - 4096);
  EXPECT_EQ(chunks[2].type, kReplyTypeOffsetData);
  EXPECT_EQ(LoadBe64(chunks[2].payload.data()), 128u * 1024);
  EXPECT_EQ(chunks[3].type, kReplyTypeOffsetHole);
  EXPECT_EQ(LoadBe32(chunks[3].payload.data() + 8), 128u * 1024 - 4096);
  for (size_t i = 0; i < 3; ++i) EXPECT_FALSE(chunks[i].flags & kReplyFlagDone);
  EXPECT_TRUE(chunks[3].flags & kReplyFlagDone);

  ASSERT_TRUE(c->Request(kCmdFlagDf, kCmdRead, 4, 0, 256 * 1024));
  chunks = c->ReplyChunks();
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].type, kReplyTypeOffsetData);
  ASSERT_EQ(chunks[0].payload.size(), 8u + 256 * 1024);
  EXPECT_EQ(chunks[0].payload[8 + 4096], 0);
  EXPECT_EQ(
      Bytes(chunks[0].payload.begin() + 8 + 128 * 1024, chunks[0].payload.begin() + 8 + 132 * 1024),
      b);
}

// Reassembles the chunks of one structured read reply; nullopt if they are
// malformed (outside the request, DONE not exactly on the last, an error).
std::optional<Bytes> Assemble(const std::vector<Chunk>& chunks, uint64_t offset, uint32_t length) {
  Bytes out(length, 0xee);
  uint64_t covered = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const Chunk& c = chunks[i];
    if (c.simple || bool(c.flags & kReplyFlagDone) != (i + 1 == chunks.size())) return {};
    if (c.payload.size() < 8) return {};
    const uint64_t at = LoadBe64(c.payload.data());
    if (c.type == kReplyTypeOffsetData) {
      const size_t n = c.payload.size() - 8;
      if (at < offset || at + n > offset + length) return {};
      std::copy(c.payload.begin() + 8, c.payload.end(), out.begin() + (at - offset));
      covered += n;
    } else if (c.type == kReplyTypeOffsetHole && c.payload.size() == 12) {
      const uint32_t n = LoadBe32(c.payload.data() + 8);
      if (at < offset || at + n > offset + length) return {};
      std::fill(out.begin() + (at - offset), out.begin() + (at - offset + n), 0);
      covered += n;
    } else {
      return {};
    }
  }
  if (covered != length) return {};
  return out;
}

TEST_F(NbdServerTest, FileExportReadsAreByteExactInEveryReplyForm) {
  MakeFileExport();
  StartServer();
  struct Read {
    uint64_t offset;
    uint32_t length;
    uint16_t flags;
  };
  const Read reads[] = {
      {0, 256 * 1024, 0},                 // all data
      {1000, 300000, 0},                  // unaligned both ends
      {(1 << 20) - 8192, 512 * 1024, 0},  // data, then a hole
      {2 << 20, 1 << 20, 0},              // hole, data, hole
      {2 << 20, 1 << 20, kCmdFlagDf},     // the same in one chunk
      {0, 2 << 20, 0},                    // more than a pipe holds
      {0, uint32_t(kFileSize), 0},        // everything
      {kFileSize - 65536, 65536, 0},      // the end
      {(3 << 20) + 4000, 4096, 0},        // small: copied
  };
  for (bool structured : {false, true}) {
    auto c = Connected("file", structured, false);
    uint64_t cookie = 1;
    for (const Read& rd : reads) {
      SCOPED_TRACE(testing::Message() << "structured " << structured << " offset " << rd.offset
                                      << " length " << rd.length << " flags " << rd.flags);
      const uint16_t flags = structured ? rd.flags : 0;
      ASSERT_TRUE(c->Request(flags, kCmdRead, cookie, rd.offset, rd.length));
      if (!structured) {
        auto r = c->Reply(rd.length);
        ASSERT_TRUE(r);
        ASSERT_EQ(r->error, 0u);
        ASSERT_EQ(r->cookie, cookie);
        EXPECT_TRUE(r->payload == FileBytes(rd.offset, rd.length));
      } else {
        auto chunks = c->ReplyChunks();
        ASSERT_FALSE(chunks.empty());
        for (const auto& ch : chunks) ASSERT_EQ(ch.cookie, cookie);
        if (flags & kCmdFlagDf) {
          EXPECT_EQ(chunks.size(), 1u);
        }
        auto got = Assemble(chunks, rd.offset, rd.length);
        ASSERT_TRUE(got);
        EXPECT_TRUE(*got == FileBytes(rd.offset, rd.length));
      }
      ++cookie;
    }
  }
}

TEST_F(NbdServerTest, FileReadsBeyondTheServersPipeBudgetAreCopiedAndExact) {
  // Two pipes for the whole server: of many large reads in flight on two
  // connections most find no pipe and take the copying path; every reply
  // must still be exact, and a connection closing returns its pipes.
  max_splice_pipes_ = 2;
  MakeFileExport();
  StartServer();
  for (int round = 0; round < 2; ++round) {
    auto a = Connected("file", true, false);
    auto b = Connected("file", false, false);
    constexpr int kReads = 24;
    for (int i = 0; i < kReads; ++i) {
      const uint64_t off = uint64_t(i % 12) * 300000;
      ASSERT_TRUE(a->Request(kCmdFlagDf, kCmdRead, 1 + i, off, 256 * 1024));
      ASSERT_TRUE(b->Request(0, kCmdRead, 1 + i, off + 1, 200000));
    }
    std::map<uint64_t, std::vector<Chunk>> replies;
    for (int i = 0; i < kReads; ++i) {
      auto r = a->Reply();
      ASSERT_TRUE(r);
      ASSERT_EQ(ErrorOf(*r), 0u);
      replies[r->cookie].push_back(*r);
      auto s = b->Reply(200000);
      ASSERT_TRUE(s);
      ASSERT_EQ(s->error, 0u);
      const uint64_t off = uint64_t((s->cookie - 1) % 12) * 300000;
      EXPECT_TRUE(s->payload == FileBytes(off + 1, 200000)) << s->cookie;
    }
    for (auto& [cookie, chunks] : replies) {
      const uint64_t off = uint64_t((cookie - 1) % 12) * 300000;
      auto got = Assemble(chunks, off, 256 * 1024);
      ASSERT_TRUE(got) << cookie;
      EXPECT_TRUE(*got == FileBytes(off, 256 * 1024)) << cookie;
    }
  }
}

TEST_F(NbdServerTest, QueuedFileReadsKeepTheirBytesWhileNeighbouringWritesLand) {
  // Read replies pile up in the server (the client does not read), their
  // pages referenced from pipes, while writes to the bytes right next to
  // them (sharing each read's last page) are executed and acknowledged.
  // NBD lets only overlapping in-flight requests race; these do not
  // overlap, so every read must still return the bytes from before.
  MakeFileExport();
  StartServer();
  auto c = Connected("file", true, false);
  constexpr int kReads = 40;
  constexpr uint64_t kStride = 64 * 1024;
  constexpr uint32_t kReadLength = 64 * 1024 - 1000;  // ends mid-page
  std::map<uint64_t, std::vector<Chunk>> replies;
  for (int i = 0; i < kReads; ++i) {
    ASSERT_TRUE(c->Request(kCmdFlagDf, kCmdRead, 1 + i, i * kStride, kReadLength));
  }
  const Bytes fill(1000, 0x5a);
  for (int i = 0; i < kReads / 2; ++i) {
    ASSERT_TRUE(c->Request(0, kCmdWrite, 1000 + i, i * kStride + kReadLength, 1000, fill));
  }
  std::this_thread::sleep_for(300ms);  // let the server run into a full socket
  int done = 0, writes = 0;
  while (done < kReads || writes < kReads / 2) {
    auto r = c->Reply();
    ASSERT_TRUE(r);
    ASSERT_EQ(ErrorOf(*r), 0u);
    if (r->cookie >= 1000) {
      ++writes;
      continue;
    }
    replies[r->cookie].push_back(*r);
    if (r->flags & kReplyFlagDone) ++done;
  }
  for (int i = 0; i < kReads; ++i) {
    auto got = Assemble(replies[1 + i], i * kStride, kReadLength);
    ASSERT_TRUE(got) << i;
    EXPECT_TRUE(*got == FileBytes(i * kStride, kReadLength)) << i;
  }
  // And the writes landed.
  ASSERT_TRUE(c->Request(kCmdFlagDf, kCmdRead, 5000, kReadLength, 1000));
  auto chunks = c->ReplyChunks();
  auto got = Assemble(chunks, kReadLength, 1000);
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, fill);
}

TEST_F(NbdServerTest, FileExportWritesLandByteExactWhateverTheirSize) {
  // Writes of many sizes and alignments, one with FUA, several in flight at
  // once; then the file itself is compared, and read back through the
  // (spliced) read path.
  MakeFileExport();
  StartServer();
  auto c = Connected("file", true, false);
  struct W {
    uint64_t offset;
    uint32_t length;
    uint16_t flags;
  };
  const W writes[] = {
      {0, 64 * 1024, 0},
      {100000, 300000, 0},
      {1 << 20, 1 << 20, 0},
      {(2 << 20) + 1, 1000000, 0},
      {(3 << 20) + 5, 70000, kCmdFlagFua},
      {(3 << 20) + 200000, 4096, 0},
  };  // none overlaps another: they are in flight together
  std::thread sender([&] {
    uint8_t seed = 40;
    for (size_t i = 0; i < std::size(writes); ++i) {
      Bytes p = Pattern(writes[i].length, seed++);
      if (!c->Request(writes[i].flags, kCmdWrite, 1 + i, writes[i].offset, writes[i].length, p)) {
        return;
      }
    }
  });
  uint8_t seed = 40;
  for (const W& w : writes) {
    Bytes p = Pattern(w.length, seed++);
    std::copy(p.begin(), p.end(), file_bytes_.begin() + w.offset);
  }
  size_t ok = 0;
  for (size_t i = 0; i < std::size(writes); ++i) {
    auto r = c->Reply();
    if (!r || ErrorOf(*r) != 0) break;
    ++ok;
  }
  sender.join();
  ASSERT_EQ(ok, std::size(writes));
  ASSERT_TRUE(c->Request(0, kCmdFlush, 99, 0, 0));
  auto f = c->Reply();
  ASSERT_TRUE(f);
  ASSERT_EQ(f->error, 0u);
  Bytes on_disk(kFileSize);
  int fd = ::open(file_path_.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pread(fd, on_disk.data(), on_disk.size(), 0), ssize_t(on_disk.size()));
  ::close(fd);
  EXPECT_TRUE(on_disk == file_bytes_);
  // And read back through the server (spliced reads of spliced writes).
  ASSERT_TRUE(c->Request(kCmdFlagDf, kCmdRead, 100, 0, uint32_t(kFileSize)));
  auto got = Assemble(c->ReplyChunks(), 0, uint32_t(kFileSize));
  ASSERT_TRUE(got);
  EXPECT_TRUE(*got == file_bytes_);
}

TEST_F(NbdServerTest, FileReadPastATruncatedEndReadsZeroes) {
  // The export keeps its size; the file shrinks under it. A splice stops
  // at the end of the file and the server falls back to pread, which reads
  // the rest as zeroes.
  MakeFileExport();
  StartServer();
  auto c = Connected("file", false, false);
  const uint64_t new_end = (3 << 20) + 100;
  ASSERT_EQ(::truncate(file_path_.c_str(), off_t(new_end)), 0);
  std::fill(file_bytes_.begin() + new_end, file_bytes_.end(), 0);
  ASSERT_TRUE(c->Request(0, kCmdRead, 1, 3 << 20, 256 * 1024));
  auto r = c->Reply(256 * 1024);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->error, 0u);
  EXPECT_TRUE(r->payload == FileBytes(3 << 20, 256 * 1024));
  ASSERT_TRUE(c->Request(0, kCmdRead, 2, 0, 256 * 1024));
  r = c->Reply(256 * 1024);
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->payload == FileBytes(0, 256 * 1024));
}

TEST_F(NbdServerTest, ClientVanishingWithFileRepliesQueuedLeavesTheServerServing) {
  // Spliced replies into a socket whose peer is gone: splice() raises
  // SIGPIPE, which must neither kill this process (nothing here ignores
  // it) nor disturb the next client.
  MakeFileExport();
  StartServer();
  for (int round = 0; round < 4; ++round) {
    auto c = Connected("file", round % 2 == 0, false);
    for (uint64_t i = 0; i < 32; ++i) {
      ASSERT_TRUE(c->Request(0, kCmdRead, i, (i % 4) << 20, 1 << 20));
    }
    ASSERT_TRUE(c->Recv(100));  // some replies are on their way
  }
  std::this_thread::sleep_for(300ms);
  auto c = Connected("file", true, false);
  ASSERT_TRUE(c->Request(0, kCmdRead, 1, 0, 256 * 1024));
  auto got = Assemble(c->ReplyChunks(), 0, 256 * 1024);
  ASSERT_TRUE(got);
  EXPECT_TRUE(*got == FileBytes(0, 256 * 1024));
}

TEST_F(NbdServerTest, BlockStatusReportsHolesAfterTrimAndHonoursReqOne) {
  StartServer();
  auto c = Connected();
  EXPECT_TRUE(flags_ & kTxSendTrim);
  Bytes data = Pattern(1 << 20, 5);
  ASSERT_TRUE(c->Request(0, kCmdWrite, 1, 0, 1 << 20, data));
  ASSERT_EQ(ErrorOf(*c->Reply()), 0u);
  ASSERT_TRUE(c->Request(0, kCmdTrim, 2, 64 * 1024, 64 * 1024));
  ASSERT_EQ(ErrorOf(*c->Reply()), 0u);
  ASSERT_TRUE(c->Request(0, kCmdBlockStatus, 3, 0, 1 << 20));
  auto chunks = c->ReplyChunks();
  ASSERT_EQ(chunks.size(), 1u);
  ASSERT_EQ(chunks[0].type, kReplyTypeBlockStatus);
  EXPECT_TRUE(chunks[0].flags & kReplyFlagDone);
  const Bytes& p = chunks[0].payload;
  ASSERT_EQ(p.size(), 4u + 3 * 8);
  EXPECT_EQ(LoadBe32(p.data()), 1u);  // the context id SET_META_CONTEXT returned
  EXPECT_EQ(LoadBe32(p.data() + 4), 64u * 1024);
  EXPECT_EQ(LoadBe32(p.data() + 8), 0u);
  EXPECT_EQ(LoadBe32(p.data() + 12), 64u * 1024);
  EXPECT_EQ(LoadBe32(p.data() + 16), kStateHole | kStateZero);
  EXPECT_EQ(LoadBe32(p.data() + 20), (1u << 20) - 128 * 1024);
  EXPECT_EQ(LoadBe32(p.data() + 24), 0u);

  ASSERT_TRUE(c->Request(kCmdFlagReqOne, kCmdBlockStatus, 4, 64 * 1024, 1 << 20));
  chunks = c->ReplyChunks();
  ASSERT_EQ(chunks.size(), 1u);
  ASSERT_EQ(chunks[0].payload.size(), 12u);
  EXPECT_EQ(LoadBe32(chunks[0].payload.data() + 4), 64u * 1024);
}

TEST_F(NbdServerTest, BlockStatusWithoutMetaContextIsEinval) {
  StartServer();
  auto c = Connected("disk", true, false);
  ASSERT_TRUE(c->Request(0, kCmdBlockStatus, 1, 0, 4096));
  auto r = c->Reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(ErrorOf(*r), kErrInval);
}

TEST_F(NbdServerTest, WriteToReadOnlyExportIsEpermAndStreamStaysInSync) {
  StartServer();
  for (std::string name : {"ro", "forced-ro"}) {
    auto c = Connected(name);
    EXPECT_TRUE(flags_ & kTxReadOnly) << name;
    EXPECT_FALSE(flags_ & kTxSendTrim) << name;
    ASSERT_TRUE(c->Request(0, kCmdWrite, 7, 0, 4096, Pattern(4096, 1)));
    auto r = c->Reply();
    ASSERT_TRUE(r);
    EXPECT_EQ(r->cookie, 7u);
    EXPECT_EQ(ErrorOf(*r), kErrPerm) << name;
    ASSERT_TRUE(c->Request(0, kCmdTrim, 8, 0, 4096));
    EXPECT_EQ(ErrorOf(*c->Reply()), kErrPerm) << name;
    // The write payload was consumed: the next request parses fine.
    ASSERT_TRUE(c->Request(0, kCmdRead, 9, 0, 512));
    r = c->Reply();
    ASSERT_TRUE(r);
    EXPECT_EQ(r->cookie, 9u);
    EXPECT_EQ(ErrorOf(*r), 0u);
  }
  EXPECT_EQ(ro_->writes.load(), 0);
  EXPECT_EQ(disk_->writes.load(), 0);
}

TEST_F(NbdServerTest, PastEndIsEinvalForReadsAndEnospcForWrites) {
  StartServer();
  auto simple = Connected("disk", false, false);
  ASSERT_TRUE(simple->Request(0, kCmdRead, 1, kSize - 512, 1024));
  auto r = simple->Reply(1024);
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->simple);
  EXPECT_EQ(r->error, kErrInval);
  ASSERT_TRUE(simple->Request(0, kCmdWrite, 2, kSize, 512, Pattern(512, 0)));
  EXPECT_EQ(simple->Reply()->error, kErrNoSpc);

  auto structured = Connected();
  ASSERT_TRUE(structured->Request(0, kCmdRead, 3, kSize, 1));
  auto chunks = structured->ReplyChunks();
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].type, kReplyTypeError);
  EXPECT_TRUE(chunks[0].flags & kReplyFlagDone);
  EXPECT_EQ(ErrorOf(chunks[0]), kErrInval);
  // Unknown command: EINVAL, connection stays usable.
  ASSERT_TRUE(structured->Request(0, 99, 4, 0, 0));
  EXPECT_EQ(ErrorOf(*structured->Reply()), kErrInval);
  ASSERT_TRUE(structured->Request(0, kCmdFlush, 5, 0, 0));
  EXPECT_EQ(ErrorOf(*structured->Reply()), 0u);
}

TEST_F(NbdServerTest, BackendErrorsAreMappedToWireErrors) {
  StartServer();
  auto c = Connected();
  disk_->fail_next = ENOSPC;
  ASSERT_TRUE(c->Request(0, kCmdWrite, 1, 0, 512, Pattern(512, 0)));
  EXPECT_EQ(ErrorOf(*c->Reply()), kErrNoSpc);
  disk_->fail_next = EBADF;
  ASSERT_TRUE(c->Request(0, kCmdRead, 2, 0, 512));
  auto chunks = c->ReplyChunks();
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].type, kReplyTypeError);
  EXPECT_EQ(ErrorOf(chunks[0]), kErrIo);
  // FAST_ZERO that the backend cannot do fast: ENOTSUP.
  ASSERT_TRUE(c->Request(kCmdFlagNoHole | kCmdFlagFastZero, kCmdWriteZeroes, 3, 0, 4096));
  EXPECT_EQ(ErrorOf(*c->Reply()), kErrNotSup);
  ASSERT_TRUE(c->Request(0, kCmdWriteZeroes, 4, 0, 4096));
  EXPECT_EQ(ErrorOf(*c->Reply()), 0u);
  ASSERT_TRUE(c->Request(0, kCmdCache, 5, 0, 4096));
  EXPECT_EQ(ErrorOf(*c->Reply()), 0u);
  EXPECT_EQ(disk_->caches.load(), 1);
}

TEST_F(NbdServerTest, UnknownAndOversizedOptionsAreAnsweredThenGoWorks) {
  StartServer();
  TestClient c;
  ASSERT_TRUE(c.Connect(socket_));
  ASSERT_TRUE(c.Greet());
  auto r = c.Option(0x4242, Bytes(10, 'x'));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrUnsup);
  r = c.Option(kOptGo, Bytes(kMaxOptionLength + 1, 0));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrTooBig);
  r = c.Option(kOptGo, TestClient::InfoPayload("nosuch"));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrUnknown);
  r = c.Option(kOptList, {});
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0].type, kRepServer);
  r = c.Option(kOptGo, TestClient::InfoPayload("disk", {kInfoBlockSize}));
  ASSERT_FALSE(r.empty());
  EXPECT_EQ(r.back().type, kRepAck);
  ASSERT_TRUE(c.Request(0, kCmdRead, 1, 0, 512));
  EXPECT_EQ(c.Reply(512)->error, 0u);
}

TEST_F(NbdServerTest, AbsurdOptionLengthDisconnectsOnlyThatClient) {
  StartServer();
  auto good = Connected();
  TestClient bad;
  ASSERT_TRUE(bad.Connect(socket_));
  ASSERT_TRUE(bad.Greet());
  ASSERT_TRUE(bad.SendOption(kOptGo, {}, 0xfffffff0u));
  EXPECT_TRUE(bad.SeesEof());
  ASSERT_TRUE(good->Request(0, kCmdRead, 1, 0, 512));
  EXPECT_EQ(ErrorOf(*good->Reply()), 0u);
  EXPECT_GE(server_->Stats().protocol_errors, 1u);
}

TEST_F(NbdServerTest, BadClientFlagsAndBadRequestMagicDisconnect) {
  StartServer();
  TestClient a;
  ASSERT_TRUE(a.Connect(socket_));
  ASSERT_TRUE(a.Greet(0x10));
  EXPECT_TRUE(a.SeesEof());
  auto b = Connected();
  Bytes junk(28, 0xee);
  ASSERT_TRUE(b->Send(junk));
  EXPECT_TRUE(b->SeesEof());
}

TEST_F(NbdServerTest, ExportNameOptionEntersTransmission) {
  StartServer();
  TestClient c;
  ASSERT_TRUE(c.Connect(socket_));
  ASSERT_TRUE(c.Greet(kClientFixedNewstyle));  // no NO_ZEROES: 124 zero bytes follow
  ASSERT_TRUE(c.SendOption(kOptExportName, Bytes{'d', 'i', 's', 'k'}));
  auto r = c.Recv(8 + 2 + 124);
  ASSERT_TRUE(r);
  EXPECT_EQ(LoadBe64(r->data()), kSize);
  ASSERT_TRUE(c.Request(0, kCmdRead, 1, 0, 512));
  EXPECT_EQ(c.Reply(512)->error, 0u);
}

TEST_F(NbdServerTest, OverlongWriteIsDiscardedWithEoverflow) {
  StartServer();
  auto c = Connected();
  uint32_t len = kMaxPayload + 4096;
  ASSERT_TRUE(c->Request(0, kCmdWrite, 1, 0, len, Bytes(len, 0xab)));
  auto r = c->Reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(ErrorOf(*r), kErrOverflow);
  ASSERT_TRUE(c->Request(0, kCmdFlush, 2, 0, 0));
  EXPECT_EQ(ErrorOf(*c->Reply()), 0u);
  EXPECT_EQ(disk_->writes.load(), 0);
}

TEST_F(NbdServerTest, DisconnectWaitsForInFlightReplies) {
  disk_->before_read = [](uint64_t, size_t) { std::this_thread::sleep_for(200ms); };
  StartServer();
  auto c = Connected();
  ASSERT_TRUE(c->Request(0, kCmdRead, 1, 0, 4096));
  ASSERT_TRUE(c->Request(0, kCmdDisc, 2, 0, 0));
  auto r = c->Reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->cookie, 1u);
  EXPECT_EQ(r->type, kReplyTypeOffsetData);
  EXPECT_TRUE(c->SeesEof());
}

TEST_F(NbdServerTest, ClientVanishingMidRequestDoesNotDisturbTheServer) {
  std::atomic<int> slow_reads{0};
  disk_->before_read = [&](uint64_t offset, size_t) {
    if (offset == 0) {
      slow_reads++;
      std::this_thread::sleep_for(200ms);
    }
  };
  StartServer();
  {
    // Half a write payload, then gone.
    auto c = Connected();
    ASSERT_TRUE(c->Request(0, kCmdWrite, 1, 0, 1 << 20, Bytes(1000, 1)));
  }
  {
    // Reads in flight whose replies can no longer be delivered.
    auto c = Connected();
    for (uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(c->Request(0, kCmdRead, i, 0, 4096));
  }
  {
    // Half a request header.
    auto c = Connected();
    ASSERT_TRUE(c->Send(Bytes(10, 0x25)));
  }
  {
    // Gone in the middle of the handshake.
    TestClient c;
    ASSERT_TRUE(c.Connect(socket_));
    ASSERT_TRUE(c.Greet());
    ASSERT_TRUE(c.SendOption(kOptGo, Bytes(3, 0), 100));
  }
  std::this_thread::sleep_for(600ms);  // let the slow reads finish into dead sockets
  EXPECT_GE(slow_reads.load(), 1);
  auto c = Connected();
  ASSERT_TRUE(c->Request(0, kCmdRead, 1, 8192, 512));
  EXPECT_EQ(ErrorOf(*c->Reply()), 0u);
  c.reset();
  for (int i = 0; i < 50 && server_->Stats().connections_open != 0; ++i)
    std::this_thread::sleep_for(20ms);
  EXPECT_EQ(server_->Stats().connections_open, 0u);
  EXPECT_EQ(disk_->writes.load(), 0);
}

TEST_F(NbdServerTest, SlowClientDoesNotBlockAnother) {
  StartServer();
  // A trickles the handshake, B floods reads and never reads its replies.
  TestClient trickle;
  ASSERT_TRUE(trickle.Connect(socket_));
  ASSERT_TRUE(trickle.Recv(18));
  ASSERT_TRUE(trickle.Send(Bytes{0}));
  auto flood = Connected();
  for (uint64_t i = 0; i < 64; ++i) ASSERT_TRUE(flood->Request(0, kCmdRead, i, 0, 1 << 20));

  // Liveness, not speed: every reply must arrive (Reply() gives up after its
  // own receive timeout) while the other two clients stall.
  auto c = Connected();
  for (uint64_t i = 0; i < 100; ++i) {
    ASSERT_TRUE(c->Request(0, kCmdRead, i, i * 4096, 4096));
    auto r = c->Reply();
    ASSERT_TRUE(r);
    ASSERT_EQ(ErrorOf(*r), 0u);
  }
  ASSERT_TRUE(trickle.Send(Bytes{0}));
}

TEST_F(NbdServerTest, HandshakeDeadlineClosesStalledClient) {
  handshake_timeout_ = 1s;
  StartServer();
  TestClient c;
  ASSERT_TRUE(c.Connect(socket_));
  ASSERT_TRUE(c.Greet());
  EXPECT_TRUE(c.SeesEof(5s));  // the 1 s deadline, with a generous liveness bound
  // A client that completed its handshake is not subject to the deadline.
  auto ok = Connected();
  std::this_thread::sleep_for(1500ms);
  ASSERT_TRUE(ok->Request(0, kCmdRead, 1, 0, 512));
  EXPECT_EQ(ErrorOf(*ok->Reply()), 0u);
}

TEST_F(NbdServerTest, ManyRequestsInFlightAreAllAnsweredByCookie) {
  StartServer();
  auto c = Connected();
  // Like a real client, send and receive at the same time: with 500
  // requests pipelined both socket buffers fill up otherwise.
  std::set<uint64_t> expected;
  for (uint64_t i = 0; i < 500; ++i) expected.insert(0x1000000000ull + i);
  std::thread sender([&] {
    std::mt19937 rng(7);
    for (uint64_t i = 0; i < 500; ++i) {
      uint64_t cookie = 0x1000000000ull + i;
      uint64_t off = (rng() % (kSize / 4096)) * 4096;
      bool ok = i % 3 == 0 ? c->Request(0, kCmdWrite, cookie, off, 4096, Pattern(4096, uint8_t(i)))
                           : c->Request(0, kCmdRead, cookie, off, 4096);
      if (!ok) return;
    }
  });
  struct Join {  // on an early ASSERT return, unblock the sender first
    std::thread& t;
    int fd;
    ~Join() {
      ::shutdown(fd, SHUT_RDWR);
      t.join();
    }
  } join{sender, c->fd()};
  while (!expected.empty()) {
    auto r = c->Reply();
    ASSERT_TRUE(r);
    ASSERT_EQ(ErrorOf(*r), 0u);
    ASSERT_EQ(expected.erase(r->cookie), 1u) << r->cookie;
  }
  EXPECT_GE(server_->Stats().requests, 500u);
}

TEST(NbdServerListen, UnixSocketIsCreatedWithMode0600) {
  auto dir =
      std::filesystem::temp_directory_path() / ("kgm-nbd-mode-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto path = (dir / "s.sock").string();
  auto server = NbdServer::Create({});
  ASSERT_TRUE(server->AddExport({"", "", std::make_shared<MemoryBackend>(4096), false}));
  ASSERT_TRUE(server->ListenUnix(path));
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // A regular file in the way is not replaced.
  auto file = (dir / "file").string();
  {
    std::FILE* f = std::fopen(file.c_str(), "w");
    std::fclose(f);
  }
  EXPECT_FALSE(server->ListenUnix(file));
  server.reset();
  std::filesystem::remove_all(dir);
}

TEST(NbdServerListen, TcpBindsExactlyTheGivenAddress) {
  auto server = NbdServer::Create({});
  ASSERT_TRUE(server->AddExport({"", "", std::make_shared<MemoryBackend>(4096), false}));
  ASSERT_TRUE(server->ListenTcp("127.0.0.1:0"));
  auto eps = server->BoundEndpoints();
  ASSERT_EQ(eps.size(), 1u);
  EXPECT_EQ(eps[0].rfind("127.0.0.1:", 0), 0u) << eps[0];
  EXPECT_NE(eps[0], "127.0.0.1:0");
  EXPECT_FALSE(server->ListenTcp("no-port-here"));
  EXPECT_FALSE(server->ListenTcp(":10809"));
  if (server->ListenTcp("[::1]:0")) {
    eps = server->BoundEndpoints();
    EXPECT_EQ(eps.back().rfind("[::1]:", 0), 0u) << eps.back();
  }
}

TEST(NbdServerExports, RejectsDuplicateAndMissingBackends) {
  auto server = NbdServer::Create({});
  ASSERT_TRUE(server->AddExport({"a", "", std::make_shared<MemoryBackend>(4096), false}));
  EXPECT_FALSE(server->AddExport({"a", "", std::make_shared<MemoryBackend>(4096), false}));
  EXPECT_FALSE(server->AddExport({"b", "", nullptr, false}));
}

// --- Interop with real NBD clients (skipped when a tool is missing) ----------

bool HaveTool(const char* path) { return ::access(path, X_OK) == 0; }

// Runs a shell command, returns (exit status, stdout).
std::pair<int, std::string> Shell(const std::string& cmd) {
  std::string out;
  std::FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return {-1, ""};
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int st = ::pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}

TEST_F(NbdServerTest, InteropNbdinfoListJsonAndMap) {
  if (!HaveTool("/usr/bin/nbdinfo")) GTEST_SKIP() << "nbdinfo not installed";
  StartServer();
  auto uri = "'nbd+unix:///disk?socket=" + socket_ + "'";
  auto [st, out] = Shell("nbdinfo --json " + uri);
  ASSERT_EQ(st, 0) << out;
  EXPECT_NE(out.find("\"export-size\": 4194304"), std::string::npos) << out;
  EXPECT_NE(out.find("base:allocation"), std::string::npos) << out;
  std::tie(st, out) = Shell("nbdinfo --list 'nbd+unix://?socket=" + socket_ + "'");
  ASSERT_EQ(st, 0) << out;
  EXPECT_NE(out.find("export=\"forced-ro\""), std::string::npos) << out;
  EXPECT_NE(out.find("a test disk"), std::string::npos) << out;
  // Same over TCP on the loopback address we were given.
  auto eps = server_->BoundEndpoints();
  ASSERT_EQ(eps.size(), 2u);
  std::tie(st, out) = Shell("nbdinfo --size nbd://" + eps[1] + "/disk");
  ASSERT_EQ(st, 0) << out;
  EXPECT_EQ(out, "4194304\n");
  // Write with qemu-io, trim part of it, then map shows the hole.
  if (HaveTool("/usr/bin/qemu-io")) {
    std::tie(st, out) = Shell(
        "qemu-io -f raw -c 'aio_write -P 0x55 0 1M' -c aio_flush -c 'discard 256k 256k' "
        "-c 'write -z 768k 64k' -c 'aio_read -P 0x55 0 256k' -c aio_flush " +
        uri);
    ASSERT_EQ(st, 0) << out;
    EXPECT_EQ(out.find("fail"), std::string::npos) << out;
    EXPECT_EQ(out.find("Pattern verification failed"), std::string::npos) << out;
  }
  std::tie(st, out) = Shell("nbdinfo --map " + uri + " | tr -s ' ' | sed 's/^ //'");
  ASSERT_EQ(st, 0) << out;
  // Trimmed 256k-512k is a hole; write -z without unmap stays allocated.
  EXPECT_NE(out.find("0 262144 0 data\n262144 262144 3 hole,zero\n524288 524288 0 data\n"),
            std::string::npos)
      << out;
}

TEST_F(NbdServerTest, InteropQemuImgAndNbdcopyRoundTrip) {
  if (!HaveTool("/usr/bin/qemu-img") || !HaveTool("/usr/bin/nbdcopy")) {
    GTEST_SKIP() << "qemu-img or nbdcopy not installed";
  }
  StartServer();
  auto uri = "'nbd+unix:///disk?socket=" + socket_ + "'";
  auto src = (dir_ / "src.img").string(), back = (dir_ / "back.img").string();
  auto [st, out] =
      Shell("head -c 4194304 /dev/urandom > " + src + " && truncate -s 4M " + src +
            " && dd if=/dev/zero of=" + src + " bs=64k seek=10 count=8 conv=notrunc status=none");
  ASSERT_EQ(st, 0) << out;
  std::tie(st, out) = Shell("qemu-img convert -n -f raw -O raw " + src + " " + uri);
  ASSERT_EQ(st, 0) << out;
  std::tie(st, out) = Shell("qemu-img compare -f raw -F raw " + src + " " + uri);
  EXPECT_EQ(st, 0) << out;
  std::tie(st, out) = Shell("nbdcopy " + uri + " " + back + " && cmp " + src + " " + back);
  EXPECT_EQ(st, 0) << out;
  std::tie(st, out) = Shell("nbdcopy " + back + " " + uri + " && qemu-img compare -f raw -F raw " +
                            back + " " + uri);
  EXPECT_EQ(st, 0) << out;
}

// --- A copy-on-read proxy export: misses spliced from the cache file --------

// Export "file" is a copy-on-read proxy over a FakeRemote; a read of at least
// 64 KiB fetches its missing blocks straight into the cache file
// (PrepareFileRange) and is spliced from there.
class NbdServerProxyTest : public NbdServerTest {
 protected:
  // Small blocks, so that a small aligned read fills whole blocks in its
  // buffer and stores them behind the reply; remote requests are counted
  // per 64 KiB.
  static constexpr uint32_t kBlock = 4096;
  void MakeProxyExport() {
    image_ = FakeRemote::PatternImage(kFileSize, 5);
    auto remote = std::make_unique<FakeRemote>(image_, 65536);
    remote_ = remote->shared();
    CopyOnReadOptions o;
    o.cache_path = (dir_ / "cache.img").string();
    o.bitmap_path = (dir_ / "cache.bitmap").string();
    o.block_size = kBlock;
    o.fill_on_start = false;
    // Counts stores behind a reply: the copying Read() path makes them, the
    // spliced path never does.
    o.before_write_behind_store_for_test = [this] { ++write_behind_stores_; };
    auto b = CopyOnReadBackend::Open(std::move(remote), o);
    ASSERT_TRUE(b.has_value()) << b.error().message();
    cor_ = *b;
    file_ = cor_;
  }
  Bytes ImageBytes(uint64_t offset, size_t length) const {
    Bytes out(length);
    std::memcpy(out.data(), image_.data() + offset, length);
    return out;
  }
  uint32_t ReadsOf(uint64_t block) { return FakeRemote::ReadsOfBlock(*remote_, block); }
  // Reads [offset, +length) as request `cookie` and checks the reply's bytes.
  void ExpectRead(TestClient& c, bool structured, uint64_t cookie, uint64_t offset,
                  uint32_t length) {
    ASSERT_TRUE(c.Request(0, kCmdRead, cookie, offset, length));
    if (!structured) {
      auto r = c.Reply(length);
      ASSERT_TRUE(r) << "no reply: the server dropped the connection";
      EXPECT_EQ(r->cookie, cookie);
      ASSERT_EQ(r->error, 0u);
      EXPECT_TRUE(r->payload == ImageBytes(offset, length)) << "offset " << offset;
    } else {
      auto chunks = c.ReplyChunks();
      ASSERT_FALSE(chunks.empty()) << "no reply: the server dropped the connection";
      for (const auto& ch : chunks) ASSERT_EQ(ch.cookie, cookie);
      auto got = Assemble(chunks, offset, length);
      ASSERT_TRUE(got);
      EXPECT_TRUE(*got == ImageBytes(offset, length)) << "offset " << offset;
    }
  }

  std::vector<std::byte> image_;
  std::shared_ptr<FakeRemote::Shared> remote_;
  std::shared_ptr<CopyOnReadBackend> cor_;
  std::atomic<int> write_behind_stores_{0};
};

TEST_F(NbdServerProxyTest, LargeMissWhoseRemoteFailsIsAnErrorReplyAndTheConnectionServesOn) {
  MakeProxyExport();
  StartServer();
  for (bool structured : {false, true}) {
    SCOPED_TRACE(testing::Message() << "structured " << structured);
    auto c = Connected("file", structured, false);
    const uint64_t off = structured ? (2 << 20) : (1 << 20);
    FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kIoError);
    ASSERT_TRUE(c->Request(0, kCmdRead, 1, off + 100, 256 * 1024));
    if (!structured) {
      auto r = c->Reply(256 * 1024);
      ASSERT_TRUE(r) << "the server dropped the connection instead of replying with an error";
      EXPECT_TRUE(r->simple);
      EXPECT_EQ(r->cookie, 1u);
      EXPECT_EQ(r->error, kErrIo);
    } else {
      auto chunks = c->ReplyChunks();
      ASSERT_EQ(chunks.size(), 1u)
          << "the server dropped the connection instead of replying with an error";
      EXPECT_EQ(chunks[0].cookie, 1u);
      EXPECT_EQ(chunks[0].type, kReplyTypeError);
      EXPECT_TRUE(chunks[0].flags & kReplyFlagDone);
      EXPECT_EQ(ErrorOf(chunks[0]), kErrIo);
    }
    EXPECT_FALSE(cor_->FileRangeFor(off + 100, 256 * 1024).has_value());
    // The same connection, the remote back: the same read, and another.
    FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kNone);
    ExpectRead(*c, structured, 2, off + 100, 256 * 1024);
    ExpectRead(*c, structured, 3, off + 512 * 1024, 128 * 1024);
    EXPECT_TRUE(cor_->FileRangeFor(off + 100, 256 * 1024).has_value());
    EXPECT_TRUE(cor_->FileRangeFor(off + 512 * 1024, 128 * 1024).has_value());
  }
  // Every block fetched once (failed attempts reach no data), and none of
  // these large misses went through the copying path's store.
  for (uint64_t b : {16, 17, 18, 19, 20, 24, 25, 32, 33, 34, 35, 36, 40, 41})
    EXPECT_EQ(ReadsOf(b), 1u) << b;
  for (uint64_t b : {21, 22, 23, 37, 38, 39}) EXPECT_EQ(ReadsOf(b), 0u) << b;
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(write_behind_stores_.load(), 0);
  EXPECT_EQ(cor_->Status().blocks_present, 2u * (65 + 32));
}

TEST_F(NbdServerProxyTest, SmallMissIsCopiedAndLargeMissIsFetchedIntoTheCache) {
  // Shows the write-behind counter above can tell the two paths apart.
  MakeProxyExport();
  StartServer();
  auto c = Connected("file", false, false);
  ExpectRead(*c, false, 1, 0, 32 * 1024);  // below 64 KiB: Read(), stored behind the reply
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(write_behind_stores_.load(), 1);
  ExpectRead(*c, false, 2, 3 << 20, 64 * 1024);  // exactly 64 KiB: spliced
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(write_behind_stores_.load(), 1);
  EXPECT_EQ(ReadsOf(0), 1u);
  EXPECT_EQ(ReadsOf(48), 1u);
  EXPECT_EQ(cor_->Status().blocks_present, 8u + 16u);
}

TEST_F(NbdServerProxyTest, ConcurrentLargeReadsOfOneMissFetchItOnceAndAllAreExact) {
  MakeProxyExport();
  StartServer();
  std::vector<std::unique_ptr<TestClient>> clients;
  for (int i = 0; i < 4; ++i) clients.push_back(Connected("file", i % 2 == 1, false));
  FakeRemote::Hold(*remote_);
  for (int i = 0; i < 4; ++i)
    ASSERT_TRUE(clients[size_t(i)]->Request(0, kCmdRead, 10 + uint64_t(i), 1 << 20, 512 * 1024));
  ASSERT_TRUE(FakeRemote::WaitHeld(*remote_, 1, 5s));
  std::this_thread::sleep_for(50ms);  // the other reads pile up on the claims
  FakeRemote::Release(*remote_);
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE(i);
    TestClient& c = *clients[size_t(i)];
    if (i % 2 == 0) {
      auto r = c.Reply(512 * 1024);
      ASSERT_TRUE(r);
      EXPECT_EQ(r->cookie, 10u + uint64_t(i));
      ASSERT_EQ(r->error, 0u);
      EXPECT_TRUE(r->payload == ImageBytes(1 << 20, 512 * 1024));
    } else {
      auto chunks = c.ReplyChunks();
      ASSERT_FALSE(chunks.empty());
      auto got = Assemble(chunks, 1 << 20, 512 * 1024);
      ASSERT_TRUE(got);
      EXPECT_TRUE(*got == ImageBytes(1 << 20, 512 * 1024));
    }
  }
  for (uint64_t b = 16; b < 24; ++b) EXPECT_EQ(ReadsOf(b), 1u) << b;
}

// After a run of fast hits the session serves large reads inline on its
// reader; a miss must still go to the worker pool, or the reader would sit
// in the remote fetch and the next request (a hit) would not even be read.
TEST_F(NbdServerProxyTest, AMissAfterARunOfFastHitsDoesNotHoldUpTheNextHit) {
  MakeProxyExport();
  StartServer();
  auto c = Connected("file", false, false);
  ExpectRead(*c, false, 1, 0, 1 << 20);  // fetched: the first MiB is now held
  // The case under test needs the session to be serving large reads inline
  // when the hit arrives, and one slow warm-up read (a loaded machine)
  // delays that: so up to five tries, each with a new miss, until the hit
  // ran inline. Every try checks that the hit did not wait for the miss.
  bool hit_ran_inline = false;
  for (uint64_t attempt = 0; attempt < 5 && !hit_ran_inline; ++attempt) {
    SCOPED_TRACE("attempt " + std::to_string(attempt));
    for (uint64_t i = 0; i < 64; ++i)  // hits, enough to warm up inline reads
      ExpectRead(*c, false, 100 + i, (i % 16) * 65536, 65536);
    const uint64_t miss_at = (1 << 20) + attempt * (512 << 10);  // never fetched before
    FakeRemote::Hold(*remote_);
    ASSERT_TRUE(c->Request(0, kCmdRead, 7, miss_at, 256 * 1024));  // a miss, held
    ASSERT_TRUE(FakeRemote::WaitHeld(*remote_, 1, 5s));
    const uint64_t inline_before = server_->Stats().requests_inline;
    ASSERT_TRUE(c->Request(0, kCmdRead, 8, 65536, 256 * 1024));  // a hit
    auto hit = c->Reply(256 * 1024, 3s);
    const uint64_t inline_after = server_->Stats().requests_inline;
    FakeRemote::Release(*remote_);
    ASSERT_TRUE(hit) << "the hit waited behind the miss";
    // The miss runs on a worker; the hit ran inline on the reader or not.
    hit_ran_inline = inline_after - inline_before == 1;
    EXPECT_EQ(hit->cookie, 8u);
    EXPECT_TRUE(hit->payload == ImageBytes(65536, 256 * 1024));
    auto miss = c->Reply(256 * 1024);
    ASSERT_TRUE(miss);
    EXPECT_EQ(miss->cookie, 7u);
    EXPECT_TRUE(miss->payload == ImageBytes(miss_at, 256 * 1024));
  }
  EXPECT_TRUE(hit_ran_inline) << "in five tries the hit never ran inline: the case was not tested";
}

// CACHE requests fetch for as long as their range takes; one client's must
// not take every worker of the (shared) pool, or other clients stall.
TEST_F(NbdServerProxyTest, CacheRequestsOfOneClientCannotOccupyEveryWorker) {
  MakeProxyExport();
  StartServer();  // 4 workers
  auto a = Connected("file", false, false);
  auto b = Connected("file", false, false);
  FakeRemote::Hold(*remote_);
  for (uint64_t i = 0; i < 4; ++i)
    ASSERT_TRUE(a->Request(0, kCmdCache, 10 + i, i * (512 << 10), 256 << 10));
  ASSERT_TRUE(FakeRemote::WaitHeld(*remote_, 2, 5s));
  Bytes data = Pattern(4096, 4);
  ASSERT_TRUE(b->Request(0, kCmdWrite, 1, 3 << 20, 4096, data));
  auto w = b->Reply(0, 15s);  // without the cap it never comes: no worker is free
  FakeRemote::Release(*remote_);
  ASSERT_TRUE(w) << "another client's write waited for the first client's CACHE requests";
  EXPECT_EQ(w->error, 0u);
  for (int i = 0; i < 4; ++i) {
    auto r = a->Reply(0, 10s);
    ASSERT_TRUE(r) << "CACHE reply " << i;
    EXPECT_EQ(r->error, 0u);
  }
  EXPECT_EQ(cor_->Status().blocks_present, 4u * 64 + 1);
}

TEST_F(NbdServerProxyTest, StructuredReadOfAHoleAndAFailingMissIsOneErrorReplyAndServesOn) {
  // A trimmed block is present as a hole: the structured reply would be a
  // hole chunk and spliced data chunks. The data segment's fetch fails, so
  // the whole read is an error, and nothing of it is sent before.
  MakeProxyExport();
  StartServer();
  auto c = Connected("file", true, false);
  const uint64_t off = 1 << 20;
  ASSERT_TRUE(c->Request(0, kCmdTrim, 1, off, 64 * 1024));
  ASSERT_EQ(ErrorOf(*c->Reply()), 0u);
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kIoError);
  ASSERT_TRUE(c->Request(0, kCmdRead, 2, off, 256 * 1024));
  auto chunks = c->ReplyChunks();
  ASSERT_EQ(chunks.size(), 1u) << "an error must not follow chunks that claimed success";
  EXPECT_EQ(chunks[0].cookie, 2u);
  EXPECT_EQ(chunks[0].type, kReplyTypeError);
  EXPECT_EQ(ErrorOf(chunks[0]), kErrIo);
  FakeRemote::SetFailure(*remote_, FakeRemote::Failure::kNone);
  ASSERT_TRUE(c->Request(0, kCmdRead, 3, off, 256 * 1024));
  chunks = c->ReplyChunks();
  ASSERT_FALSE(chunks.empty()) << "the server dropped the connection";
  EXPECT_TRUE(std::any_of(chunks.begin(), chunks.end(), [](const Chunk& ch) {
    return ch.type == kReplyTypeOffsetHole;
  })) << "the read did not take the hole path";
  auto got = Assemble(chunks, off, 256 * 1024);
  ASSERT_TRUE(got);
  Bytes want = ImageBytes(off, 256 * 1024);
  std::fill(want.begin(), want.begin() + 64 * 1024, 0);
  EXPECT_TRUE(*got == want);
  for (uint64_t b = 17; b < 20; ++b) EXPECT_EQ(ReadsOf(b), 1u) << b;
  EXPECT_EQ(ReadsOf(16), 0u) << "a trimmed block is never fetched";
  ASSERT_TRUE(cor_->Flush());
  EXPECT_EQ(write_behind_stores_.load(), 0);
}

}  // namespace
}  // namespace kagemusha::storage

// NbdClient against real servers (nbdkit, qemu-nbd) started from the test on
// Unix sockets or loopback TCP, and against a small scripted server in this
// file for the misbehaviours real servers will not produce on demand
// (replies in reverse order, wrong cookies, bad magic, a hung first
// connection, no NBD_OPT_GO). A missing tool is a FAILURE ("SKIP: ...").
#include "kagemusha/storage/nbd_client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kagemusha/common/coding.h"
#include "kagemusha/storage/nbd_protocol.h"

namespace kagemusha::storage {
namespace {

using namespace std::chrono_literals;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

bool HaveTool(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    std::string candidate = dirs.substr(start, end - start) + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return true;
    start = end + 1;
  }
  return false;
}

#define REQUIRE_TOOL(tool)                                                                    \
  do {                                                                                        \
    if (!HaveTool(tool)) GTEST_FAIL() << "SKIP: " tool " not installed (this test must run)"; \
  } while (0)

// A child process that dies with us (PR_SET_PDEATHSIG) and is killed on
// destruction.
class ChildProcess {
 public:
  explicit ChildProcess(const std::vector<std::string>& args) {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      int devnull = ::open("/dev/null", O_WRONLY);
      if (devnull >= 0) ::dup2(devnull, 1);
      ::execvp(argv[0], argv.data());
      ::_exit(127);
    }
  }
  ChildProcess(const ChildProcess&) = delete;
  ~ChildProcess() { Kill(); }
  void Kill() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

 private:
  pid_t pid_ = -1;
};

bool CanConnectUnix(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
  ::close(fd);
  return ok;
}

bool CanConnectTcp(const std::string& host, uint16_t port) {
  sockaddr_storage ss{};
  socklen_t len;
  int family;
  if (host.find(':') != std::string::npos) {
    auto* s6 = reinterpret_cast<sockaddr_in6*>(&ss);
    s6->sin6_family = family = AF_INET6;
    s6->sin6_port = htons(port);
    ::inet_pton(AF_INET6, host.c_str(), &s6->sin6_addr);
    len = sizeof *s6;
  } else {
    auto* s4 = reinterpret_cast<sockaddr_in*>(&ss);
    s4->sin_family = family = AF_INET;
    s4->sin_port = htons(port);
    ::inet_pton(AF_INET, host.c_str(), &s4->sin_addr);
    len = sizeof *s4;
  }
  int fd = ::socket(family, SOCK_STREAM, 0);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&ss), len) == 0;
  ::close(fd);
  return ok;
}

template <class F>
bool WaitFor(F ready, milliseconds timeout = 5000ms) {
  auto deadline = steady_clock::now() + timeout;
  while (steady_clock::now() < deadline) {
    if (ready()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return false;
}

// A loopback port nobody listens on right now.
uint16_t FreePort(int family = AF_INET) {
  int fd = ::socket(family, SOCK_STREAM, 0);
  sockaddr_storage ss{};
  socklen_t len;
  if (family == AF_INET6) {
    auto* s6 = reinterpret_cast<sockaddr_in6*>(&ss);
    s6->sin6_family = AF_INET6;
    s6->sin6_addr = in6addr_loopback;
    len = sizeof *s6;
  } else {
    auto* s4 = reinterpret_cast<sockaddr_in*>(&ss);
    s4->sin_family = AF_INET;
    s4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    len = sizeof *s4;
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    ::close(fd);
    return 0;
  }
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  uint16_t port = family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                     : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  ::close(fd);
  return port;
}

std::vector<std::byte> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; i += 8) {
    uint64_t x = rng();
    std::memcpy(v.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return v;
}

NbdClientOptions FastOptions() {
  NbdClientOptions o;
  o.connect_timeout = 2000ms;
  o.request_timeout = 5000ms;
  o.wait_bound = 5000ms;
  o.backoff_initial = 20ms;
  o.backoff_max = 200ms;
  return o;
}

NbdUri UnixUri(const std::string& socket, const std::string& export_name = "") {
  NbdUri u;
  u.transport = NbdUri::Transport::kUnix;
  u.socket_path = socket;
  u.export_name = export_name;
  return u;
}

class NbdClientTest : public testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/nbdc-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    sock_ = dir_ + "/nbd.sock";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Writes `n` random bytes to a file and returns them.
  std::vector<std::byte> MakeImage(size_t n, uint64_t seed = 1) {
    image_ = dir_ + "/disk.img";
    auto data = RandomBytes(n, seed);
    std::ofstream(image_, std::ios::binary)
        .write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size()));
    return data;
  }

  // nbdkit on sock_; `args` is [filters...] plugin [params...].
  std::unique_ptr<ChildProcess> StartNbdkit(std::vector<std::string> args,
                                            std::vector<std::string> listen = {}) {
    std::filesystem::remove(sock_);
    std::vector<std::string> argv = {"nbdkit", "-f", "--exit-with-parent"};
    if (listen.empty()) listen = {"-U", sock_};
    argv.insert(argv.end(), listen.begin(), listen.end());
    argv.insert(argv.end(), args.begin(), args.end());
    auto child = std::make_unique<ChildProcess>(argv);
    return child;
  }
  std::unique_ptr<ChildProcess> StartNbdkitAndWait(std::vector<std::string> args) {
    auto child = StartNbdkit(std::move(args));
    EXPECT_TRUE(WaitFor([&] { return CanConnectUnix(sock_); })) << "nbdkit did not start";
    return child;
  }

  // nbdkit with `args` on sock_, and a client connected to it (null, with
  // the reason reported, if it could not connect).
  struct Served {
    std::unique_ptr<ChildProcess> server;
    std::unique_ptr<NbdClient> client;
  };
  Served ServeAndConnect(std::vector<std::string> args, NbdClientOptions o = FastOptions()) {
    Served s;
    s.server = StartNbdkitAndWait(std::move(args));
    auto c = NbdClient::Connect(UnixUri(sock_), o);
    if (c)
      s.client = std::move(*c);
    else
      ADD_FAILURE() << c.error().message();
    return s;
  }

  void ExpectReadMatches(RemoteReader& r, const std::vector<std::byte>& want, uint64_t offset,
                         size_t len) {
    std::vector<std::byte> got(len);
    auto s = r.Read(got, offset);
    ASSERT_TRUE(s) << s.error().message();
    ASSERT_EQ(0, std::memcmp(got.data(), want.data() + offset, len))
        << "content differs at offset " << offset << " length " << len;
  }

  std::string dir_, sock_, image_;
};

// --- Real servers ------------------------------------------------------------

TEST_F(NbdClientTest, ReadsMatchFileContentFromNbdkit) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(4 << 20);
  auto server = StartNbdkitAndWait({"file", "file=" + image_});
  auto o = FastOptions();
  o.max_request_bytes = 256 * 1024;  // whole-image read becomes 16 pipelined requests
  auto client = NbdClient::Connect(UnixUri(sock_), o);
  ASSERT_TRUE(client) << client.error().message();
  EXPECT_EQ((*client)->Size(), data.size());
  EXPECT_TRUE((*client)->Connected());
  ExpectReadMatches(**client, data, 0, data.size());
  std::mt19937_64 rng(7);
  for (int i = 0; i < 200; ++i) {
    uint64_t off = rng() % data.size();
    size_t len = 1 + rng() % std::min<uint64_t>(600 * 1024, data.size() - off);
    ExpectReadMatches(**client, data, off, len);
  }
  std::vector<std::byte> past(2);
  auto beyond = (*client)->Read(past, data.size() - 1);
  ASSERT_FALSE(beyond);
  EXPECT_EQ(beyond.error().code(), EINVAL);
}

TEST_F(NbdClientTest, ReadsMatchFileContentFromQemuNbdAndNamesMissingExport) {
  REQUIRE_TOOL("qemu-nbd");
  auto data = MakeImage(2 << 20, 3);
  ChildProcess server(
      {"qemu-nbd", "-k", sock_, "-x", "disk", "-f", "raw", "-r", "-t", "-e", "4", image_});
  ASSERT_TRUE(WaitFor([&] { return CanConnectUnix(sock_); })) << "qemu-nbd did not start";
  auto client = NbdClient::Connect(UnixUri(sock_, "disk"), FastOptions());
  ASSERT_TRUE(client) << client.error().message();
  EXPECT_EQ((*client)->Size(), data.size());
  ExpectReadMatches(**client, data, 0, data.size());
  ExpectReadMatches(**client, data, 12345, 777);

  auto missing = NbdClient::Connect(UnixUri(sock_, "nope"), FastOptions());
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code(), ENOENT);
  EXPECT_NE(missing.error().message().find("export 'nope' not found on nbd+unix:///nope?socket="),
            std::string::npos)
      << missing.error().message();
}

TEST_F(NbdClientTest, ConnectsOverTcpByAddressHostNameAndIpv6) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(256 * 1024, 5);
  uint16_t port = FreePort();
  auto server =
      StartNbdkit({"file", "file=" + image_}, {"-i", "127.0.0.1", "-p", std::to_string(port)});
  ASSERT_TRUE(WaitFor([&] { return CanConnectTcp("127.0.0.1", port); }));
  for (const char* host : {"127.0.0.1", "localhost"}) {
    auto uri = ParseNbdUri("nbd://" + std::string(host) + ":" + std::to_string(port) + "/");
    ASSERT_TRUE(uri);
    auto client = NbdClient::Connect(*uri, FastOptions());
    ASSERT_TRUE(client) << host << ": " << client.error().message();
    ExpectReadMatches(**client, data, 1000, 100000);
  }

  uint16_t port6 = FreePort(AF_INET6);
  if (port6 == 0) GTEST_FAIL() << "SKIP: no IPv6 loopback in this environment";
  auto server6 =
      StartNbdkit({"file", "file=" + image_}, {"-i", "::1", "-p", std::to_string(port6)});
  ASSERT_TRUE(WaitFor([&] { return CanConnectTcp("::1", port6); }));
  auto uri6 = ParseNbdUri("nbd://[::1]:" + std::to_string(port6) + "/");
  ASSERT_TRUE(uri6);
  auto client6 = NbdClient::Connect(*uri6, FastOptions());
  ASSERT_TRUE(client6) << client6.error().message();
  ExpectReadMatches(**client6, data, 0, data.size());
}

TEST_F(NbdClientTest, RefusedConnectionSaysServerIsNotRunning) {
  uint16_t port = FreePort();
  auto uri = ParseNbdUri("nbd://127.0.0.1:" + std::to_string(port) + "/x");
  ASSERT_TRUE(uri);
  auto client = NbdClient::Connect(*uri, FastOptions());
  ASSERT_FALSE(client);
  EXPECT_EQ(client.error().code(), ECONNREFUSED);
  EXPECT_EQ(client.error().message(),
            "cannot connect to nbd://127.0.0.1:" + std::to_string(port) +
                "/x: connection refused — is the source storage server running?");

  auto unix_client = NbdClient::Connect(UnixUri(dir_ + "/absent.sock", "x"), FastOptions());
  ASSERT_FALSE(unix_client);
  EXPECT_NE(unix_client.error().message().find("is the source storage server running?"),
            std::string::npos)
      << unix_client.error().message();
}

TEST_F(NbdClientTest, SplitsReadsAtServerMaximumAndAlignsToMinimumBlock) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(2 << 20, 11);
  // The filter fails (EINVAL) any request above 64 KiB or not 512-aligned.
  auto server = StartNbdkitAndWait({"--filter=blocksize-policy", "file", "file=" + image_,
                                    "blocksize-minimum=512", "blocksize-preferred=4096",
                                    "blocksize-maximum=65536", "blocksize-error-policy=error"});
  auto client = NbdClient::Connect(UnixUri(sock_), FastOptions());  // max_request 4 MiB
  ASSERT_TRUE(client) << client.error().message();
  ExpectReadMatches(**client, data, 0, 1 << 20);
  ExpectReadMatches(**client, data, 3, 1000);           // unaligned: bounce-buffered
  ExpectReadMatches(**client, data, 4097, 300 * 1024);  // unaligned and split
}

TEST_F(NbdClientTest, ServerReadErrorIsReturnedToTheCaller) {
  REQUIRE_TOOL("nbdkit");
  auto server =
      StartNbdkitAndWait({"--filter=error", "memory", "1M", "error=ENOSPC", "error-rate=100%"});
  auto client = NbdClient::Connect(UnixUri(sock_), FastOptions());
  ASSERT_TRUE(client) << client.error().message();
  std::vector<std::byte> buf(4096);
  auto s = (*client)->Read(buf, 0);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ENOSPC);
  EXPECT_NE(s.error().message().find("remote read of 4096 bytes at offset 0"), std::string::npos)
      << s.error().message();
  EXPECT_TRUE((*client)->Connected()) << "an error reply must not drop the connection";
}

TEST_F(NbdClientTest, ReadInFlightWhenServerIsKilledSucceedsAfterRestart) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(1 << 20, 13);
  auto server = StartNbdkitAndWait({"--filter=delay", "file", "file=" + image_, "rdelay=2000ms"});
  auto client = NbdClient::Connect(UnixUri(sock_), FastOptions());
  ASSERT_TRUE(client) << client.error().message();
  std::vector<std::byte> buf(data.size());
  Status result;
  std::thread reader([&] { result = (*client)->Read(buf, 0); });
  std::this_thread::sleep_for(150ms);  // the read is now waiting on the server
  server->Kill();
  EXPECT_TRUE(WaitFor([&] { return !(*client)->Connected(); }, 2000ms));
  std::this_thread::sleep_for(200ms);  // a few failed reconnect attempts
  server = StartNbdkitAndWait({"file", "file=" + image_});
  reader.join();
  ASSERT_TRUE(result) << result.error().message();
  EXPECT_EQ(0, std::memcmp(buf.data(), data.data(), data.size()));
  EXPECT_TRUE((*client)->Connected());
}

TEST_F(NbdClientTest, ReconnectsInBackgroundWithinBackoffMaxOfServerReturn) {
  REQUIRE_TOOL("nbdkit");
  auto server = StartNbdkitAndWait({"memory", "1M"});
  auto o = FastOptions();  // backoff 20..200 ms
  // Long enough that a Reconnect() waiting out connect timeouts (instead of
  // returning the refused attempt) cannot pass the 10 s liveness bound below.
  o.connect_timeout = 60s;
  auto client = NbdClient::Connect(UnixUri(sock_), o);
  ASSERT_TRUE(client) << client.error().message();
  server->Kill();
  ASSERT_TRUE(WaitFor([&] { return !(*client)->Connected(); }, 10s));
  // While the server is down an operator reconnect reports why it failed.
  auto reconnect = std::async(std::launch::async, [&] { return (*client)->Reconnect(); });
  ASSERT_EQ(reconnect.wait_for(10s), std::future_status::ready)
      << "Reconnect() did not report the failed attempt";
  auto forced = reconnect.get();
  ASSERT_FALSE(forced);
  EXPECT_NE(forced.error().message().find("is the source storage server running?"),
            std::string::npos)
      << forced.error().message();
  // 2.5 s down: an uncapped doubling back-off from 20 ms would next try at
  // about 5.1 s, so reconnecting within 2 s (10x backoff_max) of the server's
  // return shows the cap, without a tight timing bar.
  std::this_thread::sleep_for(2500ms);
  server = StartNbdkitAndWait({"memory", "1M"});
  ASSERT_TRUE(WaitFor([&] { return (*client)->Connected(); }, 2000ms))
      << "no background reconnect without a read within 10x backoff_max";
}

TEST_F(NbdClientTest, ServerGoneLongerThanWaitBoundFailsWithEtimedout) {
  REQUIRE_TOOL("nbdkit");
  auto server = StartNbdkitAndWait({"memory", "1M"});
  auto o = FastOptions();
  o.wait_bound = 300ms;
  auto client = NbdClient::Connect(UnixUri(sock_), o);
  ASSERT_TRUE(client) << client.error().message();
  server->Kill();
  std::vector<std::byte> buf(4096);
  auto start = steady_clock::now();
  auto s = (*client)->Read(buf, 0);
  auto elapsed = steady_clock::now() - start;
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ETIMEDOUT);
  EXPECT_NE(s.error().message().find("unreachable for 300 ms"), std::string::npos)
      << s.error().message();
  EXPECT_GE(elapsed, 250ms);   // the bound was honoured, not cut short
  EXPECT_LT(elapsed, 3000ms);  // liveness: 10x the bound
}

TEST_F(NbdClientTest, RemoteBackWithDifferentSizeIsRefused) {
  REQUIRE_TOOL("nbdkit");
  auto server = StartNbdkitAndWait({"memory", "1M"});
  auto client = NbdClient::Connect(UnixUri(sock_), FastOptions());
  ASSERT_TRUE(client) << client.error().message();
  server->Kill();
  server = StartNbdkitAndWait({"memory", "2M"});
  std::vector<std::byte> buf(4096);
  auto s = (*client)->Read(buf, 0);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), EIO);
  EXPECT_NE(s.error().message().find("came back with size 2097152 instead of 1048576"),
            std::string::npos)
      << s.error().message();
}

TEST_F(NbdClientTest, CloseFailsWaitingAndLaterReadsWithEshutdown) {
  REQUIRE_TOOL("nbdkit");
  auto server = StartNbdkitAndWait({"memory", "1M"});
  auto o = FastOptions();
  o.wait_bound = 60s;  // Close must end the wait long before this
  auto client = NbdClient::Connect(UnixUri(sock_), o);
  ASSERT_TRUE(client) << client.error().message();
  server->Kill();
  std::vector<std::byte> buf(4096);
  Status waiting;
  std::thread reader([&] { waiting = (*client)->Read(buf, 0); });
  std::this_thread::sleep_for(100ms);
  auto start = steady_clock::now();
  (*client)->Close();
  reader.join();
  EXPECT_LT(steady_clock::now() - start, 10s);  // liveness, far below wait_bound
  ASSERT_FALSE(waiting);
  EXPECT_EQ(waiting.error().code(), ESHUTDOWN);
  auto later = (*client)->Read(buf, 0);
  ASSERT_FALSE(later);
  EXPECT_EQ(later.error().code(), ESHUTDOWN);
  EXPECT_FALSE((*client)->Connected());
}

// --- Scripted server ------------------------------------------------------------

class ScriptedServer {
 public:
  enum class Misbehave {
    kNone,
    kNeverReply,
    kWrongCookie,
    kBadMagic,
    kShortPayload,
    kStructuredReply,  // never negotiated, so a protocol violation
    kShutdownError,    // NBD error ESHUTDOWN: client must disconnect and retry
    kDropFirstRequest, // never answers the first request, answers all others
  };
  struct Options {
    uint64_t size = 1 << 20;
    bool go_unsupported = false;
    bool close_on_export_name = false;  // how old servers say "no such export"
    Misbehave first_connection = Misbehave::kNone;
    size_t reverse_batch = 0;  // collect this many reads, answer them last-first
    milliseconds reply_delay{0};  // before each reply, in order: a slow link
  };

  static uint8_t ByteAt(uint64_t off) { return uint8_t((off * 2654435761u) >> 11); }

  ScriptedServer(std::string path, Options o) : path_(std::move(path)), o_(o) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path_.c_str(), sizeof sa.sun_path - 1);
    ::unlink(path_.c_str());
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0 ||
        ::listen(listen_fd_, 8) != 0) {
      ADD_FAILURE() << "cannot listen on " << path_;
    }
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }
  ~ScriptedServer() {
    stop_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    acceptor_.join();
    {
      std::lock_guard lk(mu_);
      for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    }
    for (auto& t : sessions_) t.join();
    for (int fd : fds_) ::close(fd);
    ::close(listen_fd_);
  }
  int connections() const { return connections_; }
  bool used_export_name() const { return used_export_name_; }
  bool saw_disconnect() const { return saw_disconnect_; }
  // Most requests received and not yet answered at once (reverse_batch mode).
  size_t peak_outstanding() const { return peak_outstanding_; }

 private:
  static bool RecvAll(int fd, void* p, size_t n) {
    return n == 0 || ::recv(fd, p, n, MSG_WAITALL) == ssize_t(n);
  }
  static bool SendAll(int fd, const std::vector<uint8_t>& b) {
    return ::send(fd, b.data(), b.size(), MSG_NOSIGNAL) == ssize_t(b.size());
  }
  static std::vector<uint8_t> OptReply(uint32_t opt, uint32_t type, std::vector<uint8_t> data) {
    std::vector<uint8_t> b;
    ByteWriter w(b);
    w.U64(nbd::kOptReplyMagic);
    w.U32(opt);
    w.U32(type);
    w.U32(uint32_t(data.size()));
    w.Bytes(data);
    return b;
  }
  void AcceptLoop() {
    while (!stop_) {
      int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) return;
      std::lock_guard lk(mu_);
      fds_.push_back(fd);
      int index = connections_++;
      sessions_.emplace_back([this, fd, index] { Serve(fd, index); });
    }
  }
  struct Req {
    uint64_t cookie, offset;
    uint32_t length;
  };
  bool Reply(int fd, const Req& r, uint32_t magic = nbd::kSimpleReplyMagic, uint64_t cookie_xor = 0,
             size_t payload = SIZE_MAX) {
    std::vector<uint8_t> b;
    ByteWriter w(b);
    w.U32(magic);
    w.U32(0);
    w.U64(r.cookie ^ cookie_xor);
    for (uint64_t i = 0; i < std::min<size_t>(payload, r.length); ++i) w.U8(ByteAt(r.offset + i));
    return SendAll(fd, b);
  }
  // A session that ends hangs up, as a real server would (the fd itself is
  // closed by the destructor, so Stop() never races with a reused number).
  void Serve(int fd, int index) {
    ServeSession(fd, index);
    ::shutdown(fd, SHUT_RDWR);
  }
  void ServeSession(int fd, int index) {
    std::vector<uint8_t> greet;
    ByteWriter g(greet);
    g.U64(nbd::kNbdMagic);
    g.U64(nbd::kIHaveOpt);
    g.U16(nbd::kFlagFixedNewstyle | nbd::kFlagNoZeroes);
    if (!SendAll(fd, greet)) return;
    uint8_t cflags[4];
    if (!RecvAll(fd, cflags, 4)) return;
    bool no_zeroes = LoadBe32(cflags) & nbd::kClientNoZeroes;
    for (bool negotiating = true; negotiating;) {
      uint8_t h[16];
      if (!RecvAll(fd, h, 16)) return;
      uint32_t opt = LoadBe32(h + 8), len = LoadBe32(h + 12);
      std::vector<uint8_t> data(len);
      if (!RecvAll(fd, data.data(), len)) return;
      if (opt == nbd::kOptGo && !o_.go_unsupported) {
        std::vector<uint8_t> info;
        ByteWriter w(info);
        w.U16(nbd::kInfoExport);
        w.U64(o_.size);
        w.U16(nbd::kTxHasFlags | nbd::kTxReadOnly);
        SendAll(fd, OptReply(opt, nbd::kRepInfo, info));
        SendAll(fd, OptReply(opt, nbd::kRepAck, {}));
        negotiating = false;
      } else if (opt == nbd::kOptExportName) {
        used_export_name_ = true;
        if (o_.close_on_export_name) return;
        std::vector<uint8_t> b;
        ByteWriter w(b);
        w.U64(o_.size);
        w.U16(nbd::kTxHasFlags | nbd::kTxReadOnly);
        if (!no_zeroes) w.Zeros(124);
        SendAll(fd, b);
        negotiating = false;
      } else if (opt == nbd::kOptAbort) {
        return;
      } else {
        SendAll(fd, OptReply(opt, nbd::kRepErrUnsup, {}));
      }
    }
    Misbehave m = index == 0 ? o_.first_connection : Misbehave::kNone;
    std::vector<Req> batch;
    for (;;) {
      uint8_t h[nbd::kRequestHeaderSize];
      if (!RecvAll(fd, h, sizeof h)) return;
      Req r{LoadBe64(h + 8), LoadBe64(h + 16), LoadBe32(h + 24)};
      if (LoadBe16(h + 6) == nbd::kCmdDisc) {
        saw_disconnect_ = true;
        return;
      }
      switch (m) {
        case Misbehave::kNeverReply:
          continue;
        case Misbehave::kWrongCookie:
          Reply(fd, r, nbd::kSimpleReplyMagic, 0xdead);
          continue;
        case Misbehave::kBadMagic:
          Reply(fd, r, 0x12345678);
          continue;
        case Misbehave::kShortPayload:
          Reply(fd, r, nbd::kSimpleReplyMagic, 0, r.length / 2);
          ::shutdown(fd, SHUT_RDWR);
          return;
        case Misbehave::kStructuredReply: {
          std::vector<uint8_t> b;
          ByteWriter w(b);
          w.U32(nbd::kStructuredReplyMagic);
          w.U16(nbd::kReplyFlagDone);
          w.U16(nbd::kReplyTypeNone);
          w.U64(r.cookie);
          w.U32(0);
          SendAll(fd, b);
          continue;
        }
        case Misbehave::kShutdownError: {
          std::vector<uint8_t> b;
          ByteWriter w(b);
          w.U32(nbd::kSimpleReplyMagic);
          w.U32(nbd::kErrShutdown);
          w.U64(r.cookie);
          SendAll(fd, b);
          continue;
        }
        case Misbehave::kDropFirstRequest:
          m = Misbehave::kNone;  // this one is lost; the rest are answered
          continue;
        case Misbehave::kNone:
          break;
      }
      if (o_.reverse_batch > 1) {
        batch.push_back(r);
        peak_outstanding_ = std::max<size_t>(peak_outstanding_, batch.size());
        if (batch.size() < o_.reverse_batch) continue;
        for (auto it = batch.rbegin(); it != batch.rend(); ++it) Reply(fd, *it);
        batch.clear();
        continue;
      }
      if (o_.reply_delay.count() > 0) std::this_thread::sleep_for(o_.reply_delay);
      Reply(fd, r);
    }
  }

  std::string path_;
  Options o_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::atomic<bool> used_export_name_{false};
  std::atomic<bool> saw_disconnect_{false};
  std::atomic<size_t> peak_outstanding_{0};
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> sessions_;
  std::thread acceptor_;
};

void ExpectPattern(const std::vector<std::byte>& buf, uint64_t offset) {
  for (size_t i = 0; i < buf.size(); ++i) {
    if (uint8_t(buf[i]) != ScriptedServer::ByteAt(offset + i)) {
      ADD_FAILURE() << "wrong byte at offset " << offset + i;
      return;
    }
  }
}

TEST_F(NbdClientTest, RepliesInReverseOrderAreMatchedByCookie) {
  ScriptedServer::Options so;
  so.reverse_batch = 8;
  ScriptedServer server(sock_, so);
  auto o = FastOptions();
  o.max_request_bytes = 4096;
  auto client = NbdClient::Connect(UnixUri(sock_), o);
  ASSERT_TRUE(client) << client.error().message();
  std::vector<std::byte> buf(8 * 4096);  // 8 requests, answered last-first
  auto s = (*client)->Read(buf, 100);
  ASSERT_TRUE(s) << s.error().message();
  ExpectPattern(buf, 100);
  EXPECT_EQ(server.connections(), 1);
}

TEST_F(NbdClientTest, SixteenConcurrentReadersKeepSixteenRequestsInFlight) {
  // The scripted server answers nothing until 16 reads are outstanding on the
  // connection, then answers them last-first. A client that serialised its
  // callers would never get a reply; one that pipelines them has all 16 out.
  ScriptedServer::Options so;
  so.size = 8 << 20;
  so.reverse_batch = 16;
  ScriptedServer server(sock_, so);
  auto client = NbdClient::Connect(UnixUri(sock_), FastOptions());
  ASSERT_TRUE(client) << client.error().message();
  constexpr int kThreads = 16, kReadsEach = 5;
  std::atomic<int> bad{0}, finished{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::vector<std::byte> buf(64 * 1024);
      for (int i = 0; i < kReadsEach; ++i) {
        uint64_t off = rng() % (so.size - buf.size());
        auto s = (*client)->Read(buf, off);
        bool ok = bool(s);
        for (size_t j = 0; ok && j < buf.size(); ++j)
          ok = uint8_t(buf[j]) == ScriptedServer::ByteAt(off + j);
        if (!ok) ++bad;
      }
      ++finished;
    });
  }
  for (auto& t : threads) t.join();  // request_timeout bounds each read
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(finished.load(), kThreads);
  EXPECT_EQ(server.peak_outstanding(), 16u) << "requests were not pipelined";
  EXPECT_EQ(server.connections(), 1) << "a read timed out and was retried";
}

TEST_F(NbdClientTest, FallsBackToExportNameWhenGoIsUnsupported) {
  ScriptedServer::Options so;
  so.go_unsupported = true;
  so.size = 3 << 20;
  ScriptedServer server(sock_, so);
  auto client = NbdClient::Connect(UnixUri(sock_, "disk"), FastOptions());
  ASSERT_TRUE(client) << client.error().message();
  EXPECT_TRUE(server.used_export_name());
  EXPECT_EQ((*client)->Size(), 3u << 20);
  std::vector<std::byte> buf(10000);
  ASSERT_TRUE((*client)->Read(buf, 5));
  ExpectPattern(buf, 5);
}

// Each misbehaviour of the first connection must get that connection declared
// broken; the read is then retried on a second connection and succeeds.
TEST_F(NbdClientTest, BrokenReplyStreamIsDroppedAndReadRetriedOnNewConnection) {
  struct Case {
    const char* name;
    ScriptedServer::Misbehave m;
  } cases[] = {{"unknown cookie", ScriptedServer::Misbehave::kWrongCookie},
               {"bad magic", ScriptedServer::Misbehave::kBadMagic},
               {"short payload", ScriptedServer::Misbehave::kShortPayload},
               {"structured reply", ScriptedServer::Misbehave::kStructuredReply},
               {"server shutting down", ScriptedServer::Misbehave::kShutdownError},
               {"hung server", ScriptedServer::Misbehave::kNeverReply}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    ScriptedServer::Options so;
    so.first_connection = c.m;
    ScriptedServer server(sock_, so);
    auto o = FastOptions();
    o.request_timeout = 200ms;
    auto client = NbdClient::Connect(UnixUri(sock_), o);
    ASSERT_TRUE(client) << client.error().message();
    std::vector<std::byte> buf(8192);
    auto start = steady_clock::now();
    auto s = (*client)->Read(buf, 4096);
    ASSERT_TRUE(s) << s.error().message();
    ExpectPattern(buf, 4096);
    EXPECT_EQ(server.connections(), 2);
    if (c.m == ScriptedServer::Misbehave::kShutdownError) {
      EXPECT_TRUE(server.saw_disconnect()) << "ESHUTDOWN requires NBD_CMD_DISC (proto.md)";
    }
    if (c.m == ScriptedServer::Misbehave::kNeverReply) {
      EXPECT_GE(steady_clock::now() - start, 200ms) << "request_timeout was not honoured";
    }
  }
}

// One request is lost while the server keeps answering every other one: that
// request still gets its own deadline (replies to other requests do not
// extend it), so it is retried on a new connection instead of waiting forever.
TEST_F(NbdClientTest, ALostRequestTimesOutWhileOtherRepliesKeepArriving) {
  ScriptedServer::Options so;
  so.first_connection = ScriptedServer::Misbehave::kDropFirstRequest;
  ScriptedServer server(sock_, so);
  auto o = FastOptions();
  o.request_timeout = 300ms;
  auto client = NbdClient::Connect(UnixUri(sock_), o);
  ASSERT_TRUE(client) << client.error().message();
  std::atomic<bool> lost_done{false}, stop{false};
  Status lost;
  std::vector<std::byte> lost_buf(4096);
  std::thread first([&] {
    lost = (*client)->Read(lost_buf, 8192);  // the first request: dropped
    lost_done = true;
  });
  ASSERT_TRUE(WaitFor([&] { return server.connections() >= 1; }));
  std::this_thread::sleep_for(50ms);  // the dropped request is on the wire first
  std::atomic<int> busy_reads{0};
  std::thread busy([&] {  // replies keep arriving on the same connection
    std::vector<std::byte> buf(4096);
    while (!stop && !lost_done) {
      if ((*client)->Read(buf, 0)) ++busy_reads;
    }
  });
  bool finished = WaitFor([&] { return lost_done.load(); }, 5000ms);
  stop = true;
  busy.join();
  if (!finished) (*client)->Close();  // unblock the lost read before joining
  first.join();
  ASSERT_TRUE(finished) << "the lost request never timed out while other replies arrived";
  ASSERT_TRUE(lost) << lost.error().message();
  ExpectPattern(lost_buf, 8192);
  EXPECT_GT(busy_reads.load(), 0) << "no other replies arrived: the case was not exercised";
  EXPECT_EQ(server.connections(), 2);
}

// A slow link: replies come in order, one every 100 ms, so the last of ten
// requests waits about a second, longer than request_timeout. The server is
// answering all the time: nothing is hung or lost, and the connection stays.
TEST_F(NbdClientTest, RequestsQueuedBehindSlowRepliesDoNotTimeOut) {
  ScriptedServer::Options so;
  so.reply_delay = 100ms;
  ScriptedServer server(sock_, so);
  auto o = FastOptions();
  o.request_timeout = 300ms;
  auto client = NbdClient::Connect(UnixUri(sock_), o);
  ASSERT_TRUE(client) << client.error().message();
  constexpr int kReads = 10;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  auto start = steady_clock::now();
  for (int t = 0; t < kReads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<std::byte> buf(4096);
      const uint64_t off = uint64_t(t) * 8192;
      auto s = (*client)->Read(buf, off);
      bool ok = bool(s);
      for (size_t j = 0; ok && j < buf.size(); ++j)
        ok = uint8_t(buf[j]) == ScriptedServer::ByteAt(off + j);
      if (ok) ++good;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(good.load(), kReads);
  EXPECT_GE(steady_clock::now() - start, 900ms) << "the replies were not slow: the case was not exercised";
  EXPECT_EQ(server.connections(), 1) << "a request queued behind slow replies was declared hung";
}

TEST_F(NbdClientTest, OldServerClosingAfterExportNameMeansExportNotFound) {
  ScriptedServer::Options so;
  so.go_unsupported = true;
  so.close_on_export_name = true;
  ScriptedServer server(sock_, so);
  auto client = NbdClient::Connect(UnixUri(sock_, "x"), FastOptions());
  ASSERT_FALSE(client);
  EXPECT_EQ(client.error().code(), ENOENT);
  EXPECT_NE(client.error().message().find("export 'x' not found on nbd+unix:///x?socket="),
            std::string::npos)
      << client.error().message();
}

TEST_F(NbdClientTest, SilentServerFailsConnectWithinConnectTimeout) {
  // Listens but never accepts or greets: the TCP-level connect succeeds and
  // the handshake must time out.
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, sock_.c_str(), sizeof sa.sun_path - 1);
  ASSERT_EQ(0, ::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa));
  ASSERT_EQ(0, ::listen(fd, 4));
  auto o = FastOptions();
  o.connect_timeout = 200ms;
  auto start = steady_clock::now();
  auto client = NbdClient::Connect(UnixUri(sock_), o);
  auto elapsed = steady_clock::now() - start;
  ::close(fd);
  ASSERT_FALSE(client);
  EXPECT_EQ(client.error().code(), ETIMEDOUT);
  EXPECT_NE(client.error().message().find("did not finish in time"), std::string::npos)
      << client.error().message();
  EXPECT_GE(elapsed, 190ms);   // the timeout was honoured, not cut short
  EXPECT_LT(elapsed, 2000ms);  // liveness: 10x the timeout
}

TEST_F(NbdClientTest, ReconnectForcesAFreshConnection) {
  ScriptedServer server(sock_, {});
  auto client = NbdClient::Connect(UnixUri(sock_), FastOptions());
  ASSERT_TRUE(client) << client.error().message();
  ASSERT_TRUE((*client)->Reconnect());
  EXPECT_EQ(server.connections(), 2);
  EXPECT_TRUE((*client)->Connected());
  std::vector<std::byte> buf(512);
  ASSERT_TRUE((*client)->Read(buf, 0));
  ExpectPattern(buf, 0);
}

// --- ReadToFile (the reply payload spliced into a file) ------------------------

// A file of `size` bytes all `fill`, opened with `flags`; -1 on failure.
int MakeFilledFile(const std::string& path, size_t size, std::byte fill, int flags = O_RDWR) {
  std::vector<std::byte> bytes(size, fill);
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
  return ::open(path.c_str(), flags | O_CLOEXEC);
}

std::vector<std::byte> FileContent(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  std::vector<std::byte> out(size_t(in.tellg()));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(out.data()), std::streamsize(out.size()));
  return out;
}

// Checks that `file` holds `fill` everywhere except [file_offset,
// file_offset+len), which holds want[offset, offset+len).
void ExpectFileHolds(const std::vector<std::byte>& file, std::byte fill, uint64_t file_offset,
                     const std::vector<std::byte>& want, uint64_t offset, uint64_t len) {
  ASSERT_GE(file.size(), file_offset + len);
  for (uint64_t i = 0; i < file_offset; ++i)
    ASSERT_EQ(file[i], fill) << "byte " << i << " before the range was touched";
  ASSERT_EQ(0, std::memcmp(file.data() + file_offset, want.data() + offset, len))
      << "range content differs (file offset " << file_offset << ", remote offset " << offset
      << ", length " << len << ")";
  for (uint64_t i = file_offset + len; i < file.size(); ++i)
    ASSERT_EQ(file[i], fill) << "byte " << i << " after the range was touched";
}

// nbdkit's log filter writes one "Connect" line per client connection: a
// connection dropped and re-established shows as a second one.
int ConnectionsLogged(const std::string& log) {
  std::ifstream in(log);
  int n = 0;
  for (std::string line; std::getline(in, line);)
    if (line.find(" Connect export=") != std::string::npos) ++n;
  return n;
}

TEST_F(NbdClientTest, ReadToFileWritesExactlyTheRemoteBytesAtTheFileOffset) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(2 << 20, 21);
  auto [server, client] = ServeAndConnect({"file", "file=" + image_});
  ASSERT_TRUE(client);
  const std::string target = dir_ + "/target";
  const std::byte fill{0xA5};
  const uint64_t file_offset = 70001, offset = 300007, len = 200003;  // all unaligned, different
  int fd = MakeFilledFile(target, 1 << 20, fill);
  ASSERT_GE(fd, 0);
  auto s = client->ReadToFile(fd, file_offset, len, offset);
  ASSERT_TRUE(s) << s.error().message();
  ::close(fd);
  auto file = FileContent(target);
  EXPECT_EQ(file.size(), size_t(1 << 20)) << "the file must not grow";
  ExpectFileHolds(file, fill, file_offset, data, offset, len);
}

TEST_F(NbdClientTest, ReadToFilePastTheEndOfTheFileExtendsItWithTheRemoteBytes) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(1 << 20, 22);
  auto [server, client] = ServeAndConnect({"file", "file=" + image_});
  ASSERT_TRUE(client);
  const std::string target = dir_ + "/target";
  int fd = MakeFilledFile(target, 4096, std::byte{0x11});
  ASSERT_GE(fd, 0);
  auto s = client->ReadToFile(fd, 4096, 300000, 5);
  ASSERT_TRUE(s) << s.error().message();
  ::close(fd);
  auto file = FileContent(target);
  ASSERT_EQ(file.size(), 4096u + 300000u);
  ExpectFileHolds(file, std::byte{0x11}, 4096, data, 5, 300000);
}

TEST_F(NbdClientTest, ReadToFileLargerThanMaxRequestIsSplitAndEveryPieceLandsInPlace) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(2 << 20, 23);
  const std::string log = dir_ + "/nbdkit.log";
  auto o = FastOptions();
  o.max_request_bytes = 64 * 1024;
  auto [server, client] =
      ServeAndConnect({"--filter=log", "file", "file=" + image_, "logfile=" + log}, o);
  ASSERT_TRUE(client);
  const std::string target = dir_ + "/target";
  const std::byte fill{0x5A};
  // 10 pieces, the last one partial; file offset and remote offset differ.
  const uint64_t file_offset = 123457, offset = 65536 + 4099, len = 9 * 65536 + 777;
  int fd = MakeFilledFile(target, 2 << 20, fill);
  ASSERT_GE(fd, 0);
  auto s = client->ReadToFile(fd, file_offset, len, offset);
  ASSERT_TRUE(s) << s.error().message();
  ::close(fd);
  ExpectFileHolds(FileContent(target), fill, file_offset, data, offset, len);
  // The server saw pieces of at most max_request_bytes.
  std::ifstream in(log);
  int reads = 0;
  for (std::string line; std::getline(in, line);) {
    auto at = line.find(" Read id=");
    if (at == std::string::npos) continue;
    ++reads;
    auto c = line.find("count=0x", at);
    ASSERT_NE(c, std::string::npos) << line;
    EXPECT_LE(std::stoull(line.substr(c + 8), nullptr, 16), 65536u) << line;
  }
  EXPECT_EQ(reads, 10);
}

TEST_F(NbdClientTest, ReadToFileIntoAReadOnlyFdFailsAndTheConnectionStaysInStep) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(4 << 20, 24);
  const std::string log = dir_ + "/nbdkit.log";
  auto o = FastOptions();
  o.max_request_bytes = 256 * 1024;  // several pieces fail, each drained
  auto [server, client] =
      ServeAndConnect({"--filter=log", "file", "file=" + image_, "logfile=" + log}, o);
  ASSERT_TRUE(client);
  ASSERT_TRUE(WaitFor([&] { return ConnectionsLogged(log) >= 1; }));
  const int connections = ConnectionsLogged(log);

  const std::string ro_path = dir_ + "/readonly";
  const std::byte fill{0x77};
  int ro = MakeFilledFile(ro_path, 2 << 20, fill, O_RDONLY);
  ASSERT_GE(ro, 0);
  // Larger than the receive pipe, so the failure happens mid-payload.
  ReadToFileFault fault = ReadToFileFault::kRemote;
  auto s = client->ReadToFile(ro, 0, (1 << 20) + 12345, 4096, &fault);
  ASSERT_FALSE(s) << "a write into a read-only fd cannot succeed";
  EXPECT_EQ(s.error().code(), EBADF) << s.error().message();
  EXPECT_EQ(fault, ReadToFileFault::kFile) << "the write to the file failed, not the remote";
  ::close(ro);
  auto untouched = FileContent(ro_path);
  EXPECT_EQ(untouched, std::vector<std::byte>(2 << 20, fill));

  // The same client, the same connection: the rest of the payload was
  // drained, so the next replies parse and carry the right bytes.
  EXPECT_TRUE(client->Connected());
  ExpectReadMatches(*client, data, 3 << 20, 700000);
  const std::string target = dir_ + "/target";
  int fd = MakeFilledFile(target, 1 << 20, fill);
  ASSERT_GE(fd, 0);
  auto ok = client->ReadToFile(fd, 999, 500000, 1234567);
  ASSERT_TRUE(ok) << ok.error().message();
  ::close(fd);
  ExpectFileHolds(FileContent(target), fill, 999, data, 1234567, 500000);
  EXPECT_EQ(ConnectionsLogged(log), connections) << "the connection was dropped and re-made";
}

TEST_F(NbdClientTest, ReadToFileOfAnErrorReplyIsTheRemotesFaultWhateverItsErrno) {
  // ENOSPC is what a full local disk gives too; here the remote answered it.
  REQUIRE_TOOL("nbdkit");
  auto [server, client] =
      ServeAndConnect({"--filter=error", "memory", "1M", "error=ENOSPC", "error-rate=100%"});
  ASSERT_TRUE(client);
  const std::string target = dir_ + "/target";
  int fd = MakeFilledFile(target, 65536, std::byte{0x55});
  ASSERT_GE(fd, 0);
  ReadToFileFault fault = ReadToFileFault::kFile;
  auto s = client->ReadToFile(fd, 0, 8192, 0, &fault);
  ::close(fd);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), ENOSPC) << s.error().message();
  EXPECT_EQ(fault, ReadToFileFault::kRemote) << "an error reply is the remote's fault";
  EXPECT_EQ(FileContent(target), std::vector<std::byte>(65536, std::byte{0x55}));
  EXPECT_TRUE(client->Connected());
}

TEST_F(NbdClientTest, ReadToFileHittingTheFileSizeLimitFailsWithEfbigAndStaysInStep) {
  // A full disk, as the process's file size limit: the file takes a prefix
  // of the payload, then refuses the rest.
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(4 << 20, 25);
  const std::string log = dir_ + "/nbdkit.log";
  auto [server, client] =
      ServeAndConnect({"--filter=log", "file", "file=" + image_, "logfile=" + log});
  ASSERT_TRUE(client);
  ASSERT_TRUE(WaitFor([&] { return ConnectionsLogged(log) >= 1; }));
  const int connections = ConnectionsLogged(log);
  const std::string target = dir_ + "/target";
  int fd = MakeFilledFile(target, 0, std::byte{0});
  ASSERT_GE(fd, 0);
  Status s;
  {
    auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    rlimit old{};
    ::getrlimit(RLIMIT_FSIZE, &old);
    rlimit r = old;
    r.rlim_cur = 1 << 20;
    ::setrlimit(RLIMIT_FSIZE, &r);
    s = client->ReadToFile(fd, 0, 3 << 20, 0);
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
  }
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code(), EFBIG) << s.error().message();
  auto file = FileContent(target);
  ASSERT_LE(file.size(), size_t(1 << 20));
  EXPECT_EQ(0, std::memcmp(file.data(), data.data(), file.size())) << "the prefix is not the data";

  ExpectReadMatches(*client, data, 100, 2 << 20);
  auto ok = client->ReadToFile(fd, 0, 3 << 20, 1 << 20);
  ASSERT_TRUE(ok) << ok.error().message();
  ::close(fd);
  file = FileContent(target);
  ASSERT_EQ(file.size(), size_t(3 << 20));
  EXPECT_EQ(0, std::memcmp(file.data(), data.data() + (1 << 20), 3 << 20));
  EXPECT_EQ(ConnectionsLogged(log), connections) << "the connection was dropped and re-made";
}

TEST_F(NbdClientTest, ReadToFilePastTheEndIsEinvalAndZeroLengthIsOk) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(1 << 20, 26);
  auto [server, client] = ServeAndConnect({"file", "file=" + image_});
  ASSERT_TRUE(client);
  const std::string target = dir_ + "/target";
  const std::byte fill{0x33};
  int fd = MakeFilledFile(target, 8192, fill);
  ASSERT_GE(fd, 0);
  auto past = client->ReadToFile(fd, 0, 2, data.size() - 1);
  ASSERT_FALSE(past);
  EXPECT_EQ(past.error().code(), EINVAL) << past.error().message();
  auto beyond = client->ReadToFile(fd, 0, 1, data.size() + 4096);
  ASSERT_FALSE(beyond);
  EXPECT_EQ(beyond.error().code(), EINVAL);
  auto huge = client->ReadToFile(fd, 0, UINT64_MAX, 1);  // no overflow into "in range"
  ASSERT_FALSE(huge);
  EXPECT_EQ(huge.error().code(), EINVAL);
  EXPECT_TRUE(client->ReadToFile(fd, 0, 0, 0));
  EXPECT_TRUE(client->ReadToFile(fd, 0, 0, data.size()));
  auto tail = client->ReadToFile(fd, 100, 1, data.size() - 1);  // the last byte is in range
  ASSERT_TRUE(tail) << tail.error().message();
  ::close(fd);
  ExpectFileHolds(FileContent(target), fill, 100, data, data.size() - 1, 1);
}

TEST_F(NbdClientTest, UnalignedReadToFileOnAServerWithAMinimumBlockIsExact) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(2 << 20, 27);
  // The filter fails (EINVAL) any request above 64 KiB or not 512-aligned.
  auto [server, client] = ServeAndConnect(
      {"--filter=blocksize-policy", "file", "file=" + image_, "blocksize-minimum=512",
       "blocksize-preferred=4096", "blocksize-maximum=65536", "blocksize-error-policy=error"});
  ASSERT_TRUE(client);
  const std::string target = dir_ + "/target";
  const std::byte fill{0x44};
  int fd = MakeFilledFile(target, 1 << 20, fill);
  ASSERT_GE(fd, 0);
  auto s = client->ReadToFile(fd, 3, 300 * 1024 + 1, 4097);  // unaligned and split
  ASSERT_TRUE(s) << s.error().message();
  auto a = client->ReadToFile(fd, 512 * 1024, 128 * 1024, 8192);  // aligned: spliced, split
  ASSERT_TRUE(a) << a.error().message();
  ::close(fd);
  auto file = FileContent(target);
  ASSERT_EQ(file.size(), size_t(1 << 20));
  EXPECT_EQ(0, std::memcmp(file.data() + 3, data.data() + 4097, 300 * 1024 + 1));
  EXPECT_EQ(file[2], fill);
  EXPECT_EQ(file[3 + 300 * 1024 + 1], fill);
  EXPECT_EQ(0, std::memcmp(file.data() + 512 * 1024, data.data() + 8192, 128 * 1024));
  EXPECT_EQ(file[512 * 1024 - 1], fill);
  EXPECT_EQ(file[640 * 1024], fill);
}

TEST_F(NbdClientTest, ConcurrentReadToFileAndReadCallsAllGetTheirOwnBytes) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(4 << 20, 28);
  auto o = FastOptions();
  o.max_request_bytes = 128 * 1024;
  auto [server, client] = ServeAndConnect({"file", "file=" + image_}, o);
  ASSERT_TRUE(client);
  const std::string target = dir_ + "/target";
  int fd = MakeFilledFile(target, 4 << 20, std::byte{0});
  ASSERT_GE(fd, 0);
  // Thread i copies remote [i MiB, i+1 MiB) to file [(3-i) MiB, ...) in
  // 100 KiB steps, interleaved with plain reads by the others.
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      const uint64_t src = uint64_t(i) << 20, dst = uint64_t(3 - i) << 20;
      for (uint64_t at = 0; at < (1 << 20); at += 100 * 1024) {
        uint64_t n = std::min<uint64_t>(100 * 1024, (1 << 20) - at);
        if (!client->ReadToFile(fd, dst + at, n, src + at)) ++failures;
        std::vector<std::byte> buf(4000);
        if (!client->Read(buf, src + at + 17) ||
            std::memcmp(buf.data(), data.data() + src + at + 17, buf.size()) != 0)
          ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  ::close(fd);
  EXPECT_EQ(failures.load(), 0);
  auto file = FileContent(target);
  ASSERT_EQ(file.size(), size_t(4 << 20));
  for (int i = 0; i < 4; ++i)
    EXPECT_EQ(0, std::memcmp(file.data() + (uint64_t(3 - i) << 20),
                             data.data() + (uint64_t(i) << 20), 1 << 20))
        << "mebibyte " << i;
}

TEST_F(NbdClientTest, ReadToFileOverTcpIsExactAndAReadOnlyFdLeavesTheStreamInStep) {
  // The TCP socket's splice is another kernel path than the Unix socket's.
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(4 << 20, 29);
  const std::string log = dir_ + "/nbdkit.log";
  uint16_t port = FreePort();
  auto server = StartNbdkit({"--filter=log", "file", "file=" + image_, "logfile=" + log},
                            {"-i", "127.0.0.1", "-p", std::to_string(port)});
  ASSERT_TRUE(WaitFor([&] { return CanConnectTcp("127.0.0.1", port); }));
  auto uri = ParseNbdUri("nbd://127.0.0.1:" + std::to_string(port) + "/");
  ASSERT_TRUE(uri);
  auto client = NbdClient::Connect(*uri, FastOptions());
  ASSERT_TRUE(client) << client.error().message();
  ASSERT_TRUE(WaitFor([&] { return ConnectionsLogged(log) >= 1; }));
  const int connections = ConnectionsLogged(log);
  const std::string target = dir_ + "/target";
  const std::byte fill{0x66};
  int ro = MakeFilledFile(target, 4 << 20, fill, O_RDONLY);
  ASSERT_GE(ro, 0);
  auto bad = (*client)->ReadToFile(ro, 0, 3 << 20, 1);
  ::close(ro);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code(), EBADF) << bad.error().message();
  int fd = ::open(target.c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  auto s = (*client)->ReadToFile(fd, 4096, 3 << 20, 65537);
  ::close(fd);
  ASSERT_TRUE(s) << s.error().message();
  ExpectFileHolds(FileContent(target), fill, 4096, data, 65537, 3 << 20);
  EXPECT_EQ(ConnectionsLogged(log), connections) << "the connection was dropped and re-made";
}

TEST_F(NbdClientTest, ReadToFileInFlightWhenServerIsKilledSucceedsAfterRestart) {
  REQUIRE_TOOL("nbdkit");
  auto data = MakeImage(1 << 20, 30);
  auto [server, client] =
      ServeAndConnect({"--filter=delay", "file", "file=" + image_, "rdelay=2000ms"});
  ASSERT_TRUE(client);
  const std::string target = dir_ + "/target";
  const std::byte fill{0x21};
  int fd = MakeFilledFile(target, 2 << 20, fill);
  ASSERT_GE(fd, 0);
  Status result;
  std::thread reader([&] { result = client->ReadToFile(fd, 333, data.size(), 0); });
  std::this_thread::sleep_for(150ms);  // the read is now waiting on the server
  server->Kill();
  EXPECT_TRUE(WaitFor([&] { return !client->Connected(); }, 2000ms));
  std::this_thread::sleep_for(200ms);  // a few failed reconnect attempts
  server = StartNbdkitAndWait({"file", "file=" + image_});
  reader.join();
  ::close(fd);
  ASSERT_TRUE(result) << result.error().message();
  ExpectFileHolds(FileContent(target), fill, 333, data, 0, data.size());
  EXPECT_TRUE(client->Connected());
}

// An ext4 file system on a loop device under `dir`, mounted at dir/mnt, that
// a test can freeze: writes to a frozen file system block until it is thawed,
// as on a cache disk that stalls. Thawed and unmounted on destruction; a
// detached watchdog thaws it after 30 s in case this process dies while it
// is frozen (the test's own directory removal would block on it otherwise).
class FreezableFileSystem {
 public:
  explicit FreezableFileSystem(const std::string& dir) : image_(dir + "/fs.img"), mnt_(dir + "/mnt") {
    std::filesystem::create_directories(mnt_);
    mounted_ = Run("truncate -s 64M " + image_) && Run("mkfs.ext4 -q -F " + image_) &&
               Run("mount -o loop " + image_ + " " + mnt_);
  }
  ~FreezableFileSystem() {
    if (!mounted_) return;
    Thaw();
    if (!Run("umount " + mnt_)) (void)Run("umount -l " + mnt_);
  }
  FreezableFileSystem(const FreezableFileSystem&) = delete;
  FreezableFileSystem& operator=(const FreezableFileSystem&) = delete;
  bool mounted() const { return mounted_; }
  const std::string& path() const { return mnt_; }
  bool Freeze() {
    (void)std::system(("setsid sh -c 'sleep 30; fsfreeze -u " + mnt_ +
                       "' </dev/null >/dev/null 2>&1 &").c_str());
    return frozen_ = Run("fsfreeze -f " + mnt_);
  }
  void Thaw() {
    if (frozen_) frozen_ = !Run("fsfreeze -u " + mnt_);
  }

 private:
  static bool Run(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0; }
  std::string image_, mnt_;
  bool mounted_ = false, frozen_ = false;
};

// Closes a descriptor when the scope ends (before the file system under it
// is unmounted, when declared after it).
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

// The cache disk stalls for five request timeouts while the reader thread is
// writing a reply into it. The remote answered promptly, so the connection
// must not be declared hung and re-made: the read completes on the same
// connection once the disk moves again.
TEST_F(NbdClientTest, ReadToFileIntoADiskThatStallsLongerThanRequestTimeoutKeepsTheConnection) {
  REQUIRE_TOOL("nbdkit");
  REQUIRE_TOOL("fsfreeze");
  REQUIRE_TOOL("mkfs.ext4");
  auto data = MakeImage(4 << 20, 31);
  const std::string log = dir_ + "/nbdkit.log";
  auto o = FastOptions();
  o.request_timeout = 500ms;
  auto [server, client] =
      ServeAndConnect({"--filter=log", "file", "file=" + image_, "logfile=" + log}, o);
  ASSERT_TRUE(client);
  ASSERT_TRUE(WaitFor([&] { return ConnectionsLogged(log) >= 1; }));
  const int connections = ConnectionsLogged(log);

  FreezableFileSystem fs(dir_);
  ASSERT_TRUE(fs.mounted()) << "SKIP: cannot mount an ext4 loop device here (needs root and "
                               "/dev/loop*); this test must run";
  const std::string target = fs.path() + "/cache";
  const std::byte fill{0x3C};
  FdCloser file{MakeFilledFile(target, 4 << 20, fill)};
  ASSERT_GE(file.fd, 0);
  ASSERT_EQ(::fsync(file.fd), 0);
  ASSERT_TRUE(fs.Freeze());
  Status result;
  std::atomic<bool> done{false};
  std::thread reader([&] {
    result = client->ReadToFile(file.fd, 0, 3 << 20, 4096);
    done = true;
  });
  std::this_thread::sleep_for(2500ms);  // five request timeouts with the store blocked
  EXPECT_FALSE(done.load()) << "the read finished on a frozen file system: nothing stalled";
  fs.Thaw();
  reader.join();
  ASSERT_TRUE(result) << result.error().message();
  ExpectFileHolds(FileContent(target), fill, 0, data, 4096, 3 << 20);
  EXPECT_TRUE(client->Connected());
  EXPECT_EQ(ConnectionsLogged(log), connections)
      << "the connection was declared hung while only the local disk was slow";
}

}  // namespace
}  // namespace kagemusha::storage

#include "kagemusha/common/control_socket.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

namespace kagemusha {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kagemusha-ctl-XXXXXX";
    char* p = mkdtemp(tmpl);
    EXPECT_NE(p, nullptr);
    path_ = p ? p : "";
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A raw client, so tests can send bytes the real client never would.
class RawClient {
 public:
  explicit RawClient(const std::string& path) {
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  }
  ~RawClient() { Close(); }
  bool connected() const { return connected_; }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  bool Send(const std::string& data) {
    size_t off = 0;
    while (off < data.size()) {
      ssize_t n = send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += size_t(n);
    }
    return true;
  }
  // One reply line, or "" on EOF/timeout.
  std::string ReadLine(std::chrono::milliseconds timeout = 5000ms) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      if (auto nl = buf_.find('\n'); nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return "";
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, int(left.count())) <= 0) return "";
      char tmp[4096];
      ssize_t n = recv(fd_, tmp, sizeof tmp, 0);
      if (n <= 0) return "";
      buf_.append(tmp, size_t(n));
    }
  }
  // True if the server closed the connection (EOF) within the timeout.
  bool SeesEof(std::chrono::milliseconds timeout = 5000ms) {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, int(timeout.count())) <= 0) return false;
    char tmp[256];
    while (true) {
      ssize_t n = recv(fd_, tmp, sizeof tmp, MSG_DONTWAIT);
      if (n == 0) return true;
      if (n < 0) return errno == ECONNRESET;
      if (poll(&p, 1, int(timeout.count())) <= 0) return false;
    }
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string buf_;
};

std::vector<ControlCommand> TestCommands() {
  return {
      {"echo", "returns its arguments",
       [](const json& args) -> ControlResult {
         return json{{"echoed", args}};
       }},
      {"busy", "always fails with EAGAIN and a hint",
       [](const json&) -> ControlResult {
         return std::unexpected(
             ControlFailure(Error(EAGAIN, "fill is 63% complete"), "wait for the fill"));
       }},
      {"typed", "reads args.n as an integer",
       [](const json& args) -> ControlResult {
         return json{{"twice", args.at("n").get<int>() * 2}};
       }},
  };
}

class ControlSocketTest : public ::testing::Test {
 protected:
  void StartServer(ControlServerOptions opts = {}) {
    if (opts.socket_path.empty()) opts.socket_path = path_;
    auto s = ControlServer::Start(std::move(opts), TestCommands());
    ASSERT_TRUE(s.has_value()) << s.error().message();
    server_ = std::move(*s);
  }
  Result<ControlReply> Call(const std::string& command, const json& args = json::object()) {
    return ControlCall(path_, command, args, 5000ms);
  }

  TempDir dir_;
  std::string path_ = dir_.path() + "/run/ctl.sock";
  std::unique_ptr<ControlServer> server_;
};

TEST_F(ControlSocketTest, RoundTripReturnsHandlerResult) {
  StartServer();
  auto r = Call("echo", {{"x", 42}, {"s", "hi"}});
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_TRUE(r->ok);
  EXPECT_EQ(r->result["echoed"]["x"], 42);
  EXPECT_EQ(r->result["echoed"]["s"], "hi");
}

TEST_F(ControlSocketTest, ReplyEchoesRequestIdAndVersion) {
  StartServer();
  RawClient c(path_);
  ASSERT_TRUE(c.connected());
  ASSERT_TRUE(c.Send(R"({"version":1,"id":"abc-7","command":"echo","args":{}})"
                     "\n"));
  json reply = json::parse(c.ReadLine());
  EXPECT_EQ(reply["version"], kControlApiVersion);
  EXPECT_EQ(reply["id"], "abc-7");
  EXPECT_EQ(reply["ok"], true);
}

TEST_F(ControlSocketTest, UnknownCommandGetsErrorReplyWithHint) {
  StartServer();
  auto r = Call("frobnicate");
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_FALSE(r->ok);
  EXPECT_EQ(r->error_code, ENOTSUP);
  EXPECT_NE(r->error_message.find("frobnicate"), std::string::npos);
  EXPECT_NE(r->hint.find("commands"), std::string::npos);
}

TEST_F(ControlSocketTest, CommandsListsTheTable) {
  StartServer();
  auto r = Call("commands");
  ASSERT_TRUE(r.has_value());
  ASSERT_TRUE(r->ok);
  std::vector<std::string> names;
  for (const auto& c : r->result["commands"]) names.push_back(c["name"]);
  EXPECT_EQ(names, (std::vector<std::string>{"commands", "busy", "echo", "typed"}));
}

TEST_F(ControlSocketTest, HandlerFailureCarriesCodeAndHint) {
  StartServer();
  auto r = Call("busy");
  ASSERT_TRUE(r.has_value());
  EXPECT_FALSE(r->ok);
  EXPECT_EQ(r->error_code, EAGAIN);
  EXPECT_EQ(r->error_message, "fill is 63% complete");
  EXPECT_EQ(r->hint, "wait for the fill");
}

TEST_F(ControlSocketTest, HandlerThrowingOnBadArgumentsGivesErrorAndServerLives) {
  StartServer();
  auto bad = Call("typed", {{"n", "not a number"}});
  ASSERT_TRUE(bad.has_value());
  EXPECT_FALSE(bad->ok);
  EXPECT_EQ(bad->error_code, EINVAL);
  auto good = Call("typed", {{"n", 21}});
  ASSERT_TRUE(good.has_value());
  ASSERT_TRUE(good->ok);
  EXPECT_EQ(good->result["twice"], 42);
}

TEST_F(ControlSocketTest, MalformedJsonGetsErrorAndConnectionStaysUsable) {
  StartServer();
  RawClient c(path_);
  ASSERT_TRUE(c.connected());
  ASSERT_TRUE(c.Send("{\"command\": \"echo\", \n"));
  json e1 = json::parse(c.ReadLine());
  EXPECT_EQ(e1["ok"], false);
  EXPECT_EQ(e1["error"]["code"], "EINVAL");
  ASSERT_TRUE(c.Send("[1,2,3]\n"));
  json e2 = json::parse(c.ReadLine());
  EXPECT_EQ(e2["ok"], false);
  ASSERT_TRUE(c.Send(R"({"command":"echo","args":{"a":1}})"
                     "\n"));
  json ok = json::parse(c.ReadLine());
  EXPECT_EQ(ok["ok"], true);
  EXPECT_EQ(ok["result"]["echoed"]["a"], 1);
}

TEST_F(ControlSocketTest, RequestsWithoutCommandOrWithBadArgsOrVersionAreRejected) {
  StartServer();
  RawClient c(path_);
  ASSERT_TRUE(c.connected());
  ASSERT_TRUE(c.Send(R"({"args":{}})"
                     "\n"
                     R"({"command":"echo","args":[1]})"
                     "\n"
                     R"({"version":2,"command":"echo"})"
                     "\n"));
  EXPECT_EQ(json::parse(c.ReadLine())["error"]["code"], "EINVAL");
  EXPECT_EQ(json::parse(c.ReadLine())["error"]["code"], "EINVAL");
  EXPECT_EQ(json::parse(c.ReadLine())["error"]["code"], "EPROTONOSUPPORT");
}

TEST_F(ControlSocketTest, PipelinedRequestsAreAnsweredInOrder) {
  StartServer();
  RawClient c(path_);
  ASSERT_TRUE(c.connected());
  std::string batch;
  for (int i = 0; i < 50; ++i) batch += json{{"id", i}, {"command", "echo"}}.dump() + "\n";
  ASSERT_TRUE(c.Send(batch));
  for (int i = 0; i < 50; ++i) {
    std::string line = c.ReadLine();
    ASSERT_FALSE(line.empty()) << "reply " << i;
    EXPECT_EQ(json::parse(line)["id"], i);
  }
}

TEST_F(ControlSocketTest, OversizedRequestIsRejectedAndServerKeepsServing) {
  ControlServerOptions opts;
  opts.max_request_bytes = 1024;
  StartServer(opts);
  RawClient big(path_);
  ASSERT_TRUE(big.connected());
  // No newline at all: the server must not buffer without bound.
  std::string huge = R"({"command":"echo","args":{"pad":")" + std::string(8192, 'x');
  big.Send(huge);  // may fail part-way once the server closes; that is fine
  std::string line = big.ReadLine();
  ASSERT_FALSE(line.empty());
  json e = json::parse(line);
  EXPECT_EQ(e["ok"], false);
  EXPECT_EQ(e["error"]["code"], "E2BIG");
  EXPECT_TRUE(big.SeesEof());

  auto r = Call("echo", {{"after", true}});
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_TRUE(r->ok);
}

TEST_F(ControlSocketTest, RequestJustUnderTheLimitIsAccepted) {
  ControlServerOptions opts;
  opts.max_request_bytes = 1024;
  StartServer(opts);
  json req = {{"command", "echo"}, {"args", {{"pad", ""}}}};
  std::string base = req.dump();
  req["args"]["pad"] = std::string(1024 - base.size() - 1, 'y');  // + "\n" == 1024
  RawClient c(path_);
  ASSERT_TRUE(c.Send(req.dump() + "\n"));
  EXPECT_EQ(json::parse(c.ReadLine())["ok"], true);
}

TEST_F(ControlSocketTest, SocketFileIs0600AndCreatedDirectoryIs0700) {
  mode_t old = umask(0);  // the loosest umask must not loosen the socket
  StartServer();
  umask(old);
  struct stat st {};
  ASSERT_EQ(lstat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  ASSERT_EQ(stat((dir_.path() + "/run").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);
}

TEST_F(ControlSocketTest, ExistingDirectoryModeIsLeftAlone) {
  std::string d = dir_.path() + "/shared";
  ASSERT_EQ(mkdir(d.c_str(), 0755), 0);
  ASSERT_EQ(chmod(d.c_str(), 0755), 0);
  path_ = d + "/ctl.sock";
  StartServer();
  struct stat st {};
  ASSERT_EQ(stat(d.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0755u);
  ASSERT_EQ(lstat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
}

TEST_F(ControlSocketTest, SecondClientIsServedWhileFirstIsIdle) {
  StartServer();
  RawClient idle(path_);
  ASSERT_TRUE(idle.connected());
  RawClient partial(path_);
  ASSERT_TRUE(partial.connected());
  ASSERT_TRUE(partial.Send(R"({"command":"ec)"));  // half a request, then silence
  auto r = Call("echo", {{"n", 1}});
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_TRUE(r->ok);
  // The idle one still works afterwards.
  ASSERT_TRUE(idle.Send(R"({"command":"echo"})"
                        "\n"));
  EXPECT_EQ(json::parse(idle.ReadLine())["ok"], true);
  // And the half request completes once the rest arrives.
  ASSERT_TRUE(partial.Send(R"(ho","id":5})"
                           "\n"));
  json p = json::parse(partial.ReadLine());
  EXPECT_EQ(p["ok"], true);
  EXPECT_EQ(p["id"], 5);
}

TEST_F(ControlSocketTest, SurvivesClientThatDisconnectsMidRequest) {
  StartServer();
  for (int i = 0; i < 20; ++i) {
    RawClient c(path_);
    ASSERT_TRUE(c.connected());
    c.Send(R"({"command":"echo","args":{"half":)");
    c.Close();
  }
  {
    // A client that sends a full request and leaves before reading the reply.
    RawClient c(path_);
    ASSERT_TRUE(
        c.Send(R"({"command":"echo","args":{"pad":")" + std::string(30000, 'z') + "\"}}\n"));
    c.Close();
  }
  auto r = Call("echo");
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_TRUE(r->ok);
}

TEST_F(ControlSocketTest, PeerRefusedByPolicyGetsPermissionErrorAndIsDisconnected) {
  ControlServerOptions opts;
  opts.authorize = [](const PeerCredentials& p) { return p.uid != geteuid(); };
  StartServer(opts);
  RawClient c(path_);
  ASSERT_TRUE(c.connected());
  std::string line = c.ReadLine();
  ASSERT_FALSE(line.empty());
  json e = json::parse(line);
  EXPECT_EQ(e["ok"], false);
  EXPECT_EQ(e["error"]["code"], "EPERM");
  EXPECT_TRUE(c.SeesEof());
}

TEST(ControlPeerPolicy, AdmitsRootAndServerUidOnly) {
  EXPECT_TRUE(ControlPeerAllowed({.pid = 1, .uid = 0, .gid = 0}, 1000));
  EXPECT_TRUE(ControlPeerAllowed({.pid = 1, .uid = 1000, .gid = 1000}, 1000));
  EXPECT_FALSE(ControlPeerAllowed({.pid = 1, .uid = 1001, .gid = 1000}, 1000));
  EXPECT_TRUE(ControlPeerAllowed({.pid = 1, .uid = 0, .gid = 0}, 0));
  EXPECT_FALSE(ControlPeerAllowed({.pid = 1, .uid = 65534, .gid = 65534}, 0));
}

// The real SO_PEERCRED path with a real second uid. Needs root to switch uid.
TEST_F(ControlSocketTest, OtherUidIsRejectedEvenWhenFileModeWouldAllowIt) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to connect as another uid";
  StartServer();
  // Open the file and directory up, so only the SO_PEERCRED check stands.
  ASSERT_EQ(chmod((dir_.path() + "/run").c_str(), 0755), 0);
  ASSERT_EQ(chmod(dir_.path().c_str(), 0755), 0);
  ASSERT_EQ(chmod(path_.c_str(), 0666), 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
  const char req[] = "{\"command\":\"echo\"}\n";
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Only async-signal-safe calls in the child of a threaded process.
    if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) _exit(10);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    timeval tv{2, 0};  // if the server wrongly serves us it will not hang up
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) _exit(11);
    // The server may already have hung up: no SIGPIPE.
    [[maybe_unused]] ssize_t w = send(fd, req, sizeof req - 1, MSG_NOSIGNAL);
    char buf[512];
    size_t got = 0;
    while (got < sizeof buf) {
      ssize_t n = read(fd, buf + got, sizeof buf - got);
      if (n <= 0) break;
      got += size_t(n);
    }
    // Expect exactly one EPERM reply and then EOF.
    bool eperm = false;
    for (size_t i = 0; i + 7 <= got; ++i) {
      if (std::memcmp(buf + i, "\"EPERM\"", 7) == 0) eperm = true;
    }
    bool echoed = false;
    for (size_t i = 0; i + 6 <= got; ++i) {
      if (std::memcmp(buf + i, "echoed", 6) == 0) echoed = true;
    }
    _exit(eperm && !echoed ? 0 : 12);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "child killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "10/11: setup failed, 12: not rejected";
  // And the server is still fine for its owner.
  auto r = Call("echo");
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->ok);
}

// The client authenticates the server too: a socket served by another
// (non-root) uid gets no request. Needs root to run the fake server as nobody.
TEST_F(ControlSocketTest, ClientRefusesServerRunByAnotherUid) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to serve as another uid";
  ASSERT_EQ(chmod(dir_.path().c_str(), 0777), 0);
  std::string path = dir_.path() + "/foreign.sock";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // A bare server as uid 65534 that would answer anything with ok:true.
    if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) _exit(10);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(fd, 4) != 0) {
      _exit(11);
    }
    chmod(addr.sun_path, 0666);
    char one = 1;
    [[maybe_unused]] ssize_t w = write(ready[1], &one, 1);
    int c = accept(fd, nullptr, nullptr);
    const char reply[] = "{\"version\":1,\"id\":null,\"ok\":true,\"result\":{}}\n";
    char buf[256];
    timeval tv{2, 0};
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t got = read(c, buf, sizeof buf);  // a request would arrive here
    [[maybe_unused]] ssize_t w2 = send(c, reply, sizeof reply - 1, MSG_NOSIGNAL);
    _exit(got > 0 ? 13 : 0);  // 13: the client sent us its request
  }
  close(ready[1]);
  char one = 0;
  ASSERT_EQ(read(ready[0], &one, 1), 1) << "fake server did not start";
  close(ready[0]);
  auto r = ControlCall(path, "echo", json::object(), 3000ms);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_FALSE(r.has_value()) << "client accepted a reply from uid 65534";
  EXPECT_EQ(r.error().code(), EPERM);
  ASSERT_TRUE(WIFEXITED(status)) << "child killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "10/11: setup failed, 13: the request was sent";
}

TEST_F(ControlSocketTest, RefusesToReplaceALiveServer) {
  StartServer();
  ControlServerOptions opts;
  opts.socket_path = path_;
  auto second = ControlServer::Start(opts, TestCommands());
  ASSERT_FALSE(second.has_value());
  EXPECT_EQ(second.error().code(), EADDRINUSE);
  auto r = Call("echo");
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->ok);
}

TEST_F(ControlSocketTest, ReplacesStaleSocketFile) {
  std::filesystem::create_directories(dir_.path() + "/run");
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  close(fd);  // the file stays, nobody listens: stale
  StartServer();
  auto r = Call("echo");
  ASSERT_TRUE(r.has_value()) << r.error().message();
  EXPECT_TRUE(r->ok);
}

TEST_F(ControlSocketTest, RefusesToReplaceARegularFile) {
  std::filesystem::create_directories(dir_.path() + "/run");
  std::ofstream(path_) << "precious";
  ControlServerOptions opts;
  opts.socket_path = path_;
  auto s = ControlServer::Start(opts, TestCommands());
  ASSERT_FALSE(s.has_value());
  EXPECT_NE(s.error().message().find("not a socket"), std::string::npos);
  std::ifstream in(path_);
  std::string content;
  in >> content;
  EXPECT_EQ(content, "precious");
}

TEST_F(ControlSocketTest, StopRemovesSocketFileAndClientsThenFailToConnect) {
  StartServer();
  server_->Stop();
  EXPECT_FALSE(std::filesystem::exists(path_));
  auto r = Call("echo");
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), ENOENT);
  EXPECT_NE(r.error().message().find(path_), std::string::npos);
}

TEST_F(ControlSocketTest, ClientTimesOutWhenServerNeverReplies) {
  std::filesystem::create_directories(dir_.path() + "/run");
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(fd, 4), 0);  // accepts (in the kernel) but never answers
  auto start = std::chrono::steady_clock::now();
  auto r = ControlCall(path_, "echo", json::object(), 200ms);
  auto took = std::chrono::steady_clock::now() - start;
  close(fd);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error().code(), ETIMEDOUT);
  EXPECT_LT(took, 3s);
}

TEST_F(ControlSocketTest, TooLongSocketPathIsAClearError) {
  ControlServerOptions opts;
  opts.socket_path = "/tmp/" + std::string(200, 'p');
  auto s = ControlServer::Start(opts, TestCommands());
  ASSERT_FALSE(s.has_value());
  EXPECT_EQ(s.error().code(), EINVAL);
}

TEST(ControlEnvelope, ParseReplyRejectsGarbageAndWrongVersion) {
  EXPECT_FALSE(ParseControlReply("nope").has_value());
  EXPECT_FALSE(ParseControlReply(R"({"version":2,"ok":true})").has_value());
  EXPECT_FALSE(ParseControlReply(R"({"version":1})").has_value());
  EXPECT_FALSE(ParseControlReply(R"({"version":1,"ok":false})").has_value());
  auto ok = ParseControlReply(MakeControlOkReply(1, {{"a", 1}}).dump());
  ASSERT_TRUE(ok.has_value());
  EXPECT_TRUE(ok->ok);
  EXPECT_EQ(ok->result["a"], 1);
  auto err = ParseControlReply(
      MakeControlErrorReply(nullptr, ControlFailure(Error(EAGAIN, "m"), "h")).dump());
  ASSERT_TRUE(err.has_value());
  EXPECT_FALSE(err->ok);
  EXPECT_EQ(err->error_code, EAGAIN);
  EXPECT_EQ(err->error_message, "m");
  EXPECT_EQ(err->hint, "h");
}

}  // namespace
}  // namespace kagemusha

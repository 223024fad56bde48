#include "kagemusha/common/control_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <map>
#include <thread>

namespace kagemusha {
namespace {

using json = nlohmann::json;
using Ms = std::chrono::milliseconds;

// A client that sends requests without reading replies stops being read once
// this many reply bytes are queued for it.
constexpr size_t kMaxQueuedReplyBytes = 1 << 20;
// Replies are produced by our own handlers; this bounds a confused client.
constexpr size_t kMaxReplyBytes = 16 << 20;

std::string DumpLine(const json& j) {
  // replace: a stray non-UTF-8 byte in a message must not throw on this path.
  return j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

Result<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Fail(Error::Invalid("socket path '" + path + "' must be 1.." +
                               std::to_string(sizeof(addr.sun_path) - 1) + " bytes long"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

Result<PeerCredentials> PeerOf(int fd) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return Fail(Error::Errno(errno, "reading SO_PEERCRED"));
  }
  return PeerCredentials{cred.pid, cred.uid, cred.gid};
}

// Creates `dir` and any missing parents with mode 0700. Existing directories
// are left alone: they belong to whoever made them.
Status MakeDirectories(const std::string& dir) {
  if (dir.empty() || dir == "/" || dir == ".") return Ok();
  struct stat st {};
  if (stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) return Fail(Error::Invalid("'" + dir + "' is not a directory"));
    return Ok();
  }
  if (errno != ENOENT) return Fail(Error::Errno(errno, "checking directory '" + dir + "'"));
  auto slash = dir.find_last_of('/');
  if (slash != std::string::npos && slash > 0) {
    if (auto s = MakeDirectories(dir.substr(0, slash)); !s) return s;
  }
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return Fail(Error::Errno(errno, "creating directory '" + dir + "'"));
  }
  // mkdir applies the umask, which can only remove bits; make it exactly 0700.
  if (chmod(dir.c_str(), 0700) != 0) {
    return Fail(Error::Errno(errno, "setting mode 0700 on '" + dir + "'"));
  }
  return Ok();
}

class ControlServerImpl final : public ControlServer {
 public:
  ControlServerImpl(ControlServerOptions options, std::vector<ControlCommand> commands)
      : options_(std::move(options)) {
    for (auto& c : commands) commands_.emplace(c.name, std::move(c));
    if (!options_.authorize) {
      uid_t me = geteuid();
      options_.authorize = [me](const PeerCredentials& p) { return ControlPeerAllowed(p, me); };
    }
  }

  ~ControlServerImpl() override { Stop(); }

  Status Bind() {
    auto addr = UnixAddress(options_.socket_path);
    if (!addr) return Fail(addr.error());
    const std::string& path = options_.socket_path;
    auto slash = path.find_last_of('/');
    if (slash != std::string::npos && slash > 0) {
      if (auto s = MakeDirectories(path.substr(0, slash)); !s) {
        return Fail(s.error().Context("control socket"));
      }
    }
    if (auto s = ClearStaleUnixSocket(path, "--control"); !s) return s;

    listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (listen_fd_ < 0) return Fail(Error::Errno(errno, "creating control socket"));
    // On Linux the socket inode's mode becomes the file's mode at bind(), so
    // the file never exists with looser permissions, whatever the umask.
    if (fchmod(listen_fd_, 0600) != 0) return Fail(Error::Errno(errno, "fchmod control socket"));
    if (bind(listen_fd_, reinterpret_cast<const sockaddr*>(&*addr), sizeof *addr) != 0) {
      return Fail(Error::Errno(errno, "binding control socket '" + path + "'"));
    }
    bound_ = true;
    if (chmod(path.c_str(), 0600) != 0) {
      return Fail(Error::Errno(errno, "setting mode 0600 on '" + path + "'"));
    }
    struct stat st {};
    if (lstat(path.c_str(), &st) != 0) return Fail(Error::Errno(errno, "stat '" + path + "'"));
    bound_dev_ = st.st_dev;
    bound_ino_ = st.st_ino;
    if (listen(listen_fd_, 16) != 0)
      return Fail(Error::Errno(errno, "listening on control socket"));
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) return Fail(Error::Errno(errno, "creating eventfd"));
    return Ok();
  }

  void StartThread() {
    thread_ = std::thread([this] { Loop(); });
  }

  void Stop() override {
    if (stopped_.exchange(true)) return;
    if (thread_.joinable()) {
      uint64_t one = 1;
      [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof one);
      thread_.join();
    }
    for (auto& [fd, c] : clients_) close(fd);
    clients_.clear();
    if (listen_fd_ >= 0) close(listen_fd_);
    if (wake_fd_ >= 0) close(wake_fd_);
    listen_fd_ = wake_fd_ = -1;
    // Remove the socket file only if it is still ours (not replaced since).
    struct stat st {};
    if (bound_ && lstat(options_.socket_path.c_str(), &st) == 0 && st.st_dev == bound_dev_ &&
        st.st_ino == bound_ino_) {
      unlink(options_.socket_path.c_str());
    }
  }

  const std::string& socket_path() const override { return options_.socket_path; }

 private:
  struct Client {
    PeerCredentials peer;
    std::string in;
    std::string out;
    bool close_after_flush = false;
  };

  void Loop() {
    std::vector<pollfd> fds;
    std::vector<int> order;
    while (true) {
      fds.clear();
      order.clear();
      fds.push_back({wake_fd_, POLLIN, 0});
      fds.push_back({listen_fd_, POLLIN, 0});
      for (auto& [fd, c] : clients_) {
        short ev = 0;
        if (!c.close_after_flush && c.out.size() < kMaxQueuedReplyBytes) ev |= POLLIN;
        if (!c.out.empty()) ev |= POLLOUT;
        fds.push_back({fd, ev, 0});
        order.push_back(fd);
      }
      int n = poll(fds.data(), fds.size(), -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        spdlog::error("control socket {}: poll failed: {}", options_.socket_path,
                      std::strerror(errno));
        return;
      }
      if (fds[0].revents) return;  // Stop()
      if (fds[1].revents & POLLIN) Accept();
      for (size_t i = 0; i < order.size(); ++i) {
        short re = fds[i + 2].revents;
        if (!re) continue;
        int fd = order[i];
        bool keep = true;
        if (re & (POLLIN | POLLHUP | POLLERR)) keep = ReadFrom(fd);
        if (keep && (re & POLLOUT)) keep = WriteTo(fd);
        if (!keep) Drop(fd);
      }
    }
  }

  void Accept() {
    while (true) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
          spdlog::warn("control socket {}: accept failed: {}", options_.socket_path,
                       std::strerror(errno));
        }
        return;
      }
      auto peer = PeerOf(fd);
      if (!peer) {
        spdlog::warn("control socket {}: {}; dropping connection", options_.socket_path,
                     peer.error().message());
        close(fd);
        continue;
      }
      if (!options_.authorize(*peer)) {
        spdlog::warn(
            "control socket {}: rejected peer pid {} uid {}: only root and uid {} may "
            "use this socket",
            options_.socket_path, peer->pid, peer->uid, geteuid());
        RejectAndClose(fd, Error::Permission("permission denied: uid " + std::to_string(peer->uid) +
                                             " may not use this control socket"));
        continue;
      }
      if (clients_.size() >= options_.max_clients) {
        spdlog::warn("control socket {}: {} clients connected; refusing pid {}",
                     options_.socket_path, clients_.size(), peer->pid);
        RejectAndClose(fd, Error(EBUSY, "too many control clients; try again later"));
        continue;
      }
      clients_[fd].peer = *peer;
    }
  }

  // Best effort: one non-blocking send of the reason, then close.
  static void RejectAndClose(int fd, const Error& why) {
    std::string line = DumpLine(MakeControlErrorReply(nullptr, ControlFailure(why)));
    [[maybe_unused]] ssize_t n = send(fd, line.data(), line.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    close(fd);
  }

  // Returns false when the connection should be dropped now.
  bool ReadFrom(int fd) {
    Client& c = clients_[fd];
    // Closing after an oversized request: only the pending reply matters now.
    if (c.close_after_flush) return c.out.empty() ? false : WriteTo(fd);
    char buf[4096];
    while (true) {
      ssize_t n = recv(fd, buf, sizeof buf, 0);
      if (n == 0) return false;  // peer closed; a partial request is discarded
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return false;
      }
      c.in.append(buf, size_t(n));
      if (!ProcessLines(c)) break;
      if (c.close_after_flush || c.out.size() >= kMaxQueuedReplyBytes) break;
    }
    if (!c.out.empty()) return WriteTo(fd);
    return !c.close_after_flush;
  }

  // Handles every complete line in c.in. Returns false if the connection is
  // now closing (oversized request).
  bool ProcessLines(Client& c) {
    size_t start = 0;
    while (true) {
      size_t nl = c.in.find('\n', start);
      size_t line_len = (nl == std::string::npos ? c.in.size() : nl + 1) - start;
      if (line_len > options_.max_request_bytes) {
        // We cannot find the next request boundary reliably; say why and close.
        spdlog::warn("control socket {}: pid {} sent a request over {} bytes; closing",
                     options_.socket_path, c.peer.pid, options_.max_request_bytes);
        c.out += DumpLine(MakeControlErrorReply(
            nullptr, ControlFailure(Error(E2BIG, "request larger than " +
                                                     std::to_string(options_.max_request_bytes) +
                                                     " bytes"))));
        c.in.clear();
        c.close_after_flush = true;
        return false;
      }
      if (nl == std::string::npos) break;
      std::string_view line(c.in.data() + start, nl - start);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (line.find_first_not_of(" \t") != std::string_view::npos) c.out += DumpLine(Handle(line));
      start = nl + 1;
    }
    c.in.erase(0, start);
    return true;
  }

  json Handle(std::string_view line) {
    json req = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (req.is_discarded()) {
      return MakeControlErrorReply(nullptr,
                                   ControlFailure(Error::Invalid("request is not valid JSON")));
    }
    if (!req.is_object()) {
      return MakeControlErrorReply(nullptr,
                                   ControlFailure(Error::Invalid("request must be a JSON object")));
    }
    json id = req.contains("id") ? req["id"] : json(nullptr);
    if (req.contains("version")) {
      const json& v = req["version"];
      if (!v.is_number_integer() || v.get<int64_t>() != kControlApiVersion) {
        return MakeControlErrorReply(
            id,
            ControlFailure(Error(EPROTONOSUPPORT, "unsupported control API version " + v.dump() +
                                                      "; this server speaks version " +
                                                      std::to_string(kControlApiVersion))));
      }
    }
    if (!req.contains("command") || !req["command"].is_string()) {
      return MakeControlErrorReply(
          id, ControlFailure(Error::Invalid("request has no \"command\" string")));
    }
    std::string name = req["command"].get<std::string>();
    json args = req.contains("args") ? req["args"] : json::object();
    if (args.is_null()) args = json::object();
    if (!args.is_object()) {
      return MakeControlErrorReply(
          id, ControlFailure(Error::Invalid("\"args\" must be a JSON object")));
    }
    auto it = commands_.find(name);
    if (it == commands_.end()) {
      if (name == "commands") return MakeControlOkReply(id, ListCommands());
      return MakeControlErrorReply(
          id, ControlFailure(Error::NotSupported("unknown command '" + name + "'"),
                             "the \"commands\" command lists what this server supports"));
    }
    ControlResult r = [&]() -> ControlResult {
      // Handlers read args with nlohmann accessors that throw on a wrong type;
      // that is the client's mistake and must not take the server down.
      try {
        return it->second.handler(args);
      } catch (const std::exception& e) {
        return std::unexpected(
            ControlFailure(Error::Invalid(std::string("bad arguments: ") + e.what())));
      }
    }();
    if (!r) return MakeControlErrorReply(id, r.error());
    return MakeControlOkReply(id, *r);
  }

  json ListCommands() const {
    json list = json::array();
    list.push_back(
        {{"name", "commands"}, {"description", "list the commands this server supports"}});
    for (const auto& [name, c] : commands_) {
      list.push_back({{"name", name}, {"description", c.description}});
    }
    return {{"commands", list}};
  }

  bool WriteTo(int fd) {
    Client& c = clients_[fd];
    while (!c.out.empty()) {
      ssize_t n = send(fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
        return false;
      }
      c.out.erase(0, size_t(n));
    }
    return !c.close_after_flush;
  }

  void Drop(int fd) {
    close(fd);
    clients_.erase(fd);
  }

  ControlServerOptions options_;
  std::map<std::string, ControlCommand> commands_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  bool bound_ = false;
  dev_t bound_dev_ = 0;
  ino_t bound_ino_ = 0;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
  std::map<int, Client> clients_;  // owned by the server thread while it runs
};

// Waits for `events` on fd until `deadline`. ETIMEDOUT on expiry.
Status WaitFor(int fd, short events, std::chrono::steady_clock::time_point deadline,
               const std::string& what) {
  while (true) {
    auto left = std::chrono::duration_cast<Ms>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return Fail(Error::Timeout("timed out " + what));
    pollfd p{fd, events, 0};
    int n = poll(&p, 1, int(std::min<int64_t>(left.count(), 1 << 30)));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(Error::Errno(errno, what));
    }
    if (n > 0) return Ok();
  }
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

}  // namespace

bool ControlPeerAllowed(const PeerCredentials& peer, uid_t server_uid) {
  return peer.uid == 0 || peer.uid == server_uid;
}

Result<std::unique_ptr<ControlServer>> ControlServer::Start(ControlServerOptions options,
                                                            std::vector<ControlCommand> commands) {
  auto server = std::make_unique<ControlServerImpl>(std::move(options), std::move(commands));
  if (auto s = server->Bind(); !s) return Fail(s.error());
  server->StartThread();
  return std::unique_ptr<ControlServer>(std::move(server));
}

json MakeControlRequest(const std::string& command, const json& args) {
  return {{"version", kControlApiVersion},
          {"command", command},
          {"args", args.is_null() ? json::object() : args}};
}

json MakeControlOkReply(const json& id, const json& result) {
  return {{"version", kControlApiVersion}, {"id", id}, {"ok", true}, {"result", result}};
}

json MakeControlErrorReply(const json& id, const ControlFailure& failure) {
  json err = {{"code", ErrnoName(failure.error.code())},
              {"errno", failure.error.code()},
              {"message", failure.error.message()}};
  if (!failure.hint.empty()) err["hint"] = failure.hint;
  return {{"version", kControlApiVersion}, {"id", id}, {"ok", false}, {"error", err}};
}

Result<ControlReply> ParseControlReply(const std::string& line) {
  json j = json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return Fail(Error::Protocol("control reply is not a JSON object"));
  if (!j.contains("version") || !j["version"].is_number_integer() ||
      j["version"].get<int64_t>() != kControlApiVersion) {
    return Fail(Error::Protocol("control reply has an unsupported version"));
  }
  if (!j.contains("ok") || !j["ok"].is_boolean())
    return Fail(Error::Protocol("control reply has no \"ok\""));
  ControlReply r;
  r.ok = j["ok"].get<bool>();
  if (r.ok) {
    r.result = j.contains("result") ? j["result"] : json(nullptr);
    return r;
  }
  if (!j.contains("error") || !j["error"].is_object()) {
    return Fail(Error::Protocol("control error reply has no \"error\" object"));
  }
  const json& e = j["error"];
  r.error_code =
      e.contains("errno") && e["errno"].is_number_integer() ? e["errno"].get<int>() : EIO;
  r.error_message =
      e.contains("message") && e["message"].is_string() ? e["message"].get<std::string>() : "";
  r.hint = e.contains("hint") && e["hint"].is_string() ? e["hint"].get<std::string>() : "";
  return r;
}

std::string ErrnoName(int code) {
  switch (code) {
    case EPERM:
      return "EPERM";
    case ENOENT:
      return "ENOENT";
    case EIO:
      return "EIO";
    case E2BIG:
      return "E2BIG";
    case EAGAIN:
      return "EAGAIN";
    case EACCES:
      return "EACCES";
    case EBUSY:
      return "EBUSY";
    case EEXIST:
      return "EEXIST";
    case EINVAL:
      return "EINVAL";
    case ENOSPC:
      return "ENOSPC";
    case EPROTO:
      return "EPROTO";
    case ENOTSUP:
      return "ENOTSUP";
    case EPROTONOSUPPORT:
      return "EPROTONOSUPPORT";
    case EADDRINUSE:
      return "EADDRINUSE";
    case ECONNREFUSED:
      return "ECONNREFUSED";
    case ETIMEDOUT:
      return "ETIMEDOUT";
    case ESHUTDOWN:
      return "ESHUTDOWN";
    case EALREADY:
      return "EALREADY";
    case ENOTCONN:
      return "ENOTCONN";
    default:
      return "E" + std::to_string(code);
  }
}

Result<ControlReply> ControlCall(const std::string& socket_path, const std::string& command,
                                 const json& args, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  auto addr = UnixAddress(socket_path);
  if (!addr) return Fail(addr.error());
  Fd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (fd.get() < 0) return Fail(Error::Errno(errno, "creating socket"));
  const std::string where = "control socket '" + socket_path + "'";
  while (connect(fd.get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof *addr) != 0) {
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {  // listen backlog full: retry until the deadline
      if (std::chrono::steady_clock::now() >= deadline) {
        return Fail(Error::Timeout("timed out connecting to " + where));
      }
      std::this_thread::sleep_for(Ms(10));
      continue;
    }
    return Fail(Error::Errno(errno, "connecting to " + where));
  }
  // Authenticate the server too: a socket planted by another user must not
  // receive our commands or feed us answers.
  auto server = PeerOf(fd.get());
  if (!server) return Fail(server.error());
  if (!ControlPeerAllowed(*server, geteuid())) {
    return Fail(Error::Permission(where + " is served by uid " + std::to_string(server->uid) +
                                  ", which is neither root nor us; refusing to talk to it"));
  }

  std::string out = DumpLine(MakeControlRequest(command, args));
  size_t sent = 0;
  while (sent < out.size()) {
    if (auto s = WaitFor(fd.get(), POLLOUT, deadline, "sending to " + where); !s)
      return Fail(s.error());
    ssize_t n = send(fd.get(), out.data() + sent, out.size() - sent, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return Fail(Error::Errno(errno, "sending to " + where));
    }
    sent += size_t(n);
  }

  std::string in;
  char buf[4096];
  while (true) {
    if (auto s = WaitFor(fd.get(), POLLIN, deadline, "waiting for a reply from " + where); !s) {
      return Fail(s.error());
    }
    ssize_t n = recv(fd.get(), buf, sizeof buf, 0);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      return Fail(Error::Errno(errno, "reading from " + where));
    }
    if (n == 0) return Fail(Error::Protocol(where + " closed the connection without a reply"));
    in.append(buf, size_t(n));
    if (auto nl = in.find('\n'); nl != std::string::npos) {
      in.resize(nl);
      break;
    }
    if (in.size() > kMaxReplyBytes)
      return Fail(Error::Protocol("reply from " + where + " is too large"));
  }
  auto reply = ParseControlReply(in);
  if (!reply) return Fail(reply.error().Context(where));
  return reply;
}

// A socket file left over from a dead server is replaced; a live one is not.
Status ClearStaleUnixSocket(const std::string& path, const std::string& flag) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Ok();
    return Fail(Error::Errno(errno, "checking '" + path + "'"));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return Fail(Error::Invalid("'" + path + "' exists and is not a socket; choose another " +
                               flag + " path"));
  }
  auto addr = UnixAddress(path);
  if (!addr) return Fail(addr.error());
  // Non-blocking: a live server with a full backlog answers EAGAIN at once
  // (still live), where a blocking connect would wait for it.
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (probe < 0) return Fail(Error::Errno(errno, "creating probe socket"));
  int rc = connect(probe, reinterpret_cast<const sockaddr*>(&*addr), sizeof *addr);
  int err = errno;
  close(probe);
  if (rc == 0 || err == EAGAIN) {
    return Fail(Error(EADDRINUSE, "another server is already listening on '" + path +
                                      "'; stop it or choose another " + flag + " path"));
  }
  if (err != ECONNREFUSED) return Fail(Error::Errno(err, "probing existing socket '" + path + "'"));
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return Fail(Error::Errno(errno, "removing stale socket '" + path + "'"));
  }
  return Ok();
}

}  // namespace kagemusha

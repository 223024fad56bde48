// NbdClient: blocking sockets and plain threads rather than Asio, because
// the only concurrency here is "many callers, one socket": callers write
// request headers under a per-connection write lock, one reader thread per
// connection demultiplexes replies by cookie and receives each payload
// straight into the waiting caller's buffer (or, for ReadToFile, splices it
// into the caller's file), and one maintenance thread
// reconnects with back-off and enforces the request deadline. The protocol
// bytes are all built and parsed by the pure codec (nbd_client_codec.h).
//
// Lifetime of a request (struct Pending, owned by the calling thread's stack):
//   kWaiting --(cookie assigned, header sent)--> kInFlight
//   kInFlight --(reply)--> kDone          (reader thread)
//   kInFlight --(connection lost)--> kRetry --> kWaiting  (sent again later)
// Only the reader thread of the request's connection moves it out of
// kInFlight, and it does so only after it stopped touching the buffer, so a
// caller can return as soon as none of its requests is kInFlight.
#include "kagemusha/storage/nbd_client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "nbd_client_codec.h"
#include "posix_io.h"

namespace kagemusha::storage {
namespace {

using SteadyTime = std::chrono::steady_clock::time_point;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

long long Ms(steady_clock::duration d) {
  return std::chrono::duration_cast<milliseconds>(d).count();
}

// --- Socket helpers ---------------------------------------------------------

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~UniqueFd() { Reset(); }
  int get() const { return fd_; }
  int Release() { return std::exchange(fd_, -1); }
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// Waits until `fd` is ready for `events` or the deadline passes.
Status PollUntil(int fd, short events, SteadyTime deadline) {
  for (;;) {
    auto left = Ms(deadline - steady_clock::now());
    if (left <= 0) return Fail(Error::Timeout("timed out"));
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, int(std::min<long long>(left, 1 << 30)));
    if (n > 0) return Ok();
    if (n < 0 && errno != EINTR) return Fail(Error::Errno(errno, "poll"));
  }
}

// Handshake I/O on a non-blocking socket, bounded by the connect deadline.
Status SendAllBefore(int fd, std::span<const uint8_t> data, SteadyTime deadline) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data = data.subspan(size_t(n));
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (auto s = PollUntil(fd, POLLOUT, deadline); !s) return s;
    } else if (n < 0 && errno != EINTR) {
      return Fail(Error::Errno(errno, "send"));
    }
  }
  return Ok();
}

Status RecvAllBefore(int fd, std::span<uint8_t> data, SteadyTime deadline) {
  while (!data.empty()) {
    ssize_t n = ::recv(fd, data.data(), data.size(), 0);
    if (n > 0) {
      data = data.subspan(size_t(n));
    } else if (n == 0) {
      return Fail(Error(ECONNRESET, "server closed the connection"));
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (auto s = PollUntil(fd, POLLIN, deadline); !s) return s;
    } else if (errno != EINTR) {
      return Fail(Error::Errno(errno, "recv"));
    }
  }
  return Ok();
}

// Transmission I/O on a blocking socket. The reader has no timeout of its
// own: the maintenance thread shuts the socket down when a request is
// overdue, which wakes it.
Status SendAll(int fd, std::span<const uint8_t> data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data = data.subspan(size_t(n));
    } else if (n < 0 && errno != EINTR) {
      return Fail(Error::Errno(errno, "sending to server"));
    }
  }
  return Ok();
}

Status RecvAll(int fd, void* buf, size_t len) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    ssize_t n = ::recv(fd, p, len, MSG_WAITALL);
    if (n > 0) {
      p += n;
      len -= size_t(n);
    } else if (n == 0) {
      return Fail(Error(ECONNRESET, "server closed the connection"));
    } else if (errno != EINTR) {
      return Fail(Error::Errno(errno, "receiving from server"));
    }
  }
  return Ok();
}

// What a connection's reader thread has been doing, for the two deadlines
// of MaintenanceLoop: when it last made progress (a reply header, a chunk
// of payload received or stored), whether it is inside a write to a local
// file now, and how long it has spent in such writes in all. A slow local
// disk is not a hung remote: time spent storing never counts against the
// remote. A leaf lock (taken with or without NbdClientImpl::mu_, never the
// other way round).
class ReaderClock {
 public:
  struct Reading {
    steady_clock::duration stored;  // time spent storing, including a store in progress
    bool storing;
    SteadyTime last_progress;
  };
  Reading Read(SteadyTime now) {
    std::lock_guard lk(mu_);
    auto in_progress = storing_ ? std::max(now, started_) - started_ : steady_clock::duration::zero();
    return {stored_ + in_progress, storing_, last_progress_};
  }
  void Progress() {
    std::lock_guard lk(mu_);
    last_progress_ = steady_clock::now();
  }
  void Begin() {
    std::lock_guard lk(mu_);
    started_ = steady_clock::now();
    storing_ = true;
  }
  void End() {
    std::lock_guard lk(mu_);
    last_progress_ = steady_clock::now();
    stored_ += last_progress_ - started_;
    storing_ = false;
  }

 private:
  std::mutex mu_;
  steady_clock::duration stored_{};  // GUARDED_BY(mu_)
  SteadyTime started_{};             // GUARDED_BY(mu_)
  SteadyTime last_progress_{};       // GUARDED_BY(mu_)
  bool storing_ = false;             // GUARDED_BY(mu_)
};

// Counts the enclosed file write on a ReaderClock.
class StoringGuard {
 public:
  explicit StoringGuard(ReaderClock& c) : c_(c) { c_.Begin(); }
  ~StoringGuard() { c_.End(); }
  StoringGuard(const StoringGuard&) = delete;
  StoringGuard& operator=(const StoringGuard&) = delete;

 private:
  ReaderClock& c_;
};

// A reader thread's pipe for receiving payloads straight into a file:
// socket -> pipe moves page references (no copy), pipe -> file copies once
// into the page cache. The reader drains the pipe after every fill, so the
// pipe never blocks it. Falls back to recv + pwrite through a buffer where
// the kernel refuses a splice (EINVAL: a file system without splice_write).
class FileSink {
 public:
  FileSink() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) == 0) {
      r_ = fds[0];
      w_ = fds[1];
      // Larger than the default 64 KiB: fewer round trips per payload.
      (void)::fcntl(w_, F_SETPIPE_SZ, 1 << 20);
      int cap = ::fcntl(w_, F_GETPIPE_SZ);
      cap_ = cap > 0 ? size_t(cap) : 65536;
    }
  }
  ~FileSink() {
    if (r_ >= 0) ::close(r_);
    if (w_ >= 0) ::close(w_);
  }
  FileSink(const FileSink&) = delete;
  FileSink& operator=(const FileSink&) = delete;

  // Receives `len` payload bytes from `sock` into `file` at `file_offset`.
  // The returned status is the socket's: a failure breaks the connection. A
  // failed write to the file goes to `*file_status` instead, and the rest of
  // the payload is still consumed, so the stream stays in step. Every write
  // to the file is counted on `clock`, and every chunk received is progress.
  Status Receive(int sock, int file, uint64_t file_offset, size_t len, Status* file_status,
                 ReaderClock& clock) {
    bool file_ok = true;
    auto file_error = [&](int err, uint64_t at) {
      *file_status = Fail(Error::Errno(err, "write fetched data at " + std::to_string(at)));
      file_ok = false;
    };
    auto write_scratch = [&](size_t n, uint64_t at) {
      StoringGuard storing(clock);
      Status w =
          posix::PwriteFull(file, std::as_bytes(std::span(scratch_.data(), n)), at, "fetched data");
      if (!w) {
        *file_status = std::move(w);
        file_ok = false;
      }
    };
    while (len > 0) {
      if (r_ < 0 || !splice_socket_) {
        // Through a buffer: recv, then pwrite.
        if (scratch_.empty()) scratch_.resize(1 << 20);
        size_t n = std::min(len, scratch_.size());
        if (auto s = RecvAll(sock, scratch_.data(), n); !s) return s;
        clock.Progress();
        if (file_ok) write_scratch(n, file_offset);
        file_offset += n;
        len -= n;
        continue;
      }
      ssize_t n = ::splice(sock, nullptr, w_, nullptr, std::min(len, cap_), SPLICE_F_MOVE);
      if (n == 0) return Fail(Error(ECONNRESET, "server closed the connection"));
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EINVAL) {  // this socket type cannot splice
          splice_socket_ = false;
          continue;
        }
        return Fail(Error::Errno(errno, "receiving from server"));
      }
      clock.Progress();
      // Drain the pipe completely into the file (or, after a file error,
      // into the scratch buffer).
      for (size_t left = size_t(n); left > 0;) {
        ssize_t m;
        if (file_ok && splice_file_) {
          loff_t at = loff_t(file_offset);
          {
            StoringGuard storing(clock);
            m = ::splice(r_, nullptr, file, &at, left, SPLICE_F_MOVE);
          }
          if (m < 0 && errno == EINVAL) {
            splice_file_ = false;
            continue;
          }
        } else {
          if (scratch_.empty()) scratch_.resize(1 << 20);
          m = ::read(r_, scratch_.data(), std::min(left, scratch_.size()));
          if (m > 0 && file_ok) write_scratch(size_t(m), file_offset);
        }
        if (m < 0 && errno == EINTR) continue;
        if (m <= 0) {
          if (file_ok) {
            file_error(m < 0 ? errno : EIO, file_offset);
            continue;  // drain the rest into the scratch buffer
          }
          return Fail(Error::Errno(m < 0 ? errno : EIO, "draining the receive pipe"));
        }
        left -= size_t(m);
        file_offset += uint64_t(m);
      }
      len -= size_t(n);
    }
    return Ok();
  }

 private:
  int r_ = -1, w_ = -1;
  size_t cap_ = 0;
  bool splice_socket_ = true;
  bool splice_file_ = true;
  std::vector<uint8_t> scratch_;
};

// Explicit SO_RCVBUF/SO_SNDBUF switch off Linux's TCP buffer auto-tuning and
// are silently capped at net.core.[rw]mem_max (often ~200 KiB), which would
// make a 20 ms link *slower*. So we only set them when the cap allows a
// buffer that keeps 1 Gbit/s x 50 ms in flight; otherwise auto-tuning (up
// to net.ipv4.tcp_rmem's maximum) does better.
constexpr int kWantedSocketBuffer = 8 * 1024 * 1024;

long ReadSysctl(const char* path) {
  std::ifstream f(path);
  long v = 0;
  if (!(f >> v)) return 0;
  return v;
}

void TuneTcpSocket(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  static const bool can_rcv = ReadSysctl("/proc/sys/net/core/rmem_max") >= kWantedSocketBuffer;
  static const bool can_snd = ReadSysctl("/proc/sys/net/core/wmem_max") >= kWantedSocketBuffer;
  if (can_rcv) ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &kWantedSocketBuffer, sizeof(int));
  if (can_snd) ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &kWantedSocketBuffer, sizeof(int));
}

std::string ConnectFailureText(int err, const NbdUri& uri, milliseconds timeout) {
  switch (err) {
    case ECONNREFUSED:
      return "connection refused — is the source storage server running?";
    case ENOENT:
      return "no socket at " + uri.socket_path + " — is the source storage server running?";
    case ETIMEDOUT:
      return "no answer within " + std::to_string(timeout.count()) +
             " ms — is the host reachable and the port open?";
    case EHOSTUNREACH:
    case ENETUNREACH:
      return std::string(std::strerror(err)) + " — check routing to the source host";
    default:
      return std::strerror(err);
  }
}

// Connects (non-blocking) to the URI's endpoint. Returns the socket still in
// non-blocking mode, for the handshake.
Result<UniqueFd> ConnectSocket(const NbdUri& uri, const std::string& where, milliseconds timeout,
                               SteadyTime deadline) {
  auto fail = [&](int err) {
    return Fail(
        Error(err, "cannot connect to " + where + ": " + ConnectFailureText(err, uri, timeout)));
  };
  auto finish_connect = [&](int fd) -> int {
    if (auto s = PollUntil(fd, POLLOUT, deadline); !s) return ETIMEDOUT;
    int err = 0;
    socklen_t len = sizeof err;
    if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return errno;
    return err;
  };

  if (uri.transport == NbdUri::Transport::kUnix) {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    if (uri.socket_path.size() >= sizeof sa.sun_path) {
      return Fail(Error::Invalid("cannot connect to " + where + ": socket path is longer than " +
                                 std::to_string(sizeof sa.sun_path - 1) + " bytes"));
    }
    std::memcpy(sa.sun_path, uri.socket_path.data(), uri.socket_path.size());
    // A leading NUL is an abstract-namespace name whose length is explicit.
    socklen_t len = socklen_t(offsetof(sockaddr_un, sun_path) + uri.socket_path.size() +
                              (uri.socket_path[0] == '\0' ? 0 : 1));
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (fd.get() < 0) return fail(errno);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), len) < 0) {
      int err = errno;
      if (err != EINPROGRESS && err != EAGAIN) return fail(err);
      if ((err = finish_connect(fd.get())) != 0) return fail(err);
    }
    return fd;
  }

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  // getaddrinfo has no timeout; host names should resolve from /etc/hosts or
  // a local resolver in the deployments we target.
  int rc = ::getaddrinfo(uri.host.c_str(), std::to_string(uri.port).c_str(), &hints, &res);
  if (rc != 0) {
    return Fail(Error(EHOSTUNREACH, "cannot connect to " + where + ": cannot resolve host '" +
                                        uri.host + "': " + ::gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard(res, ::freeaddrinfo);
  int last_err = EHOSTUNREACH;
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    UniqueFd fd(
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
    if (fd.get() < 0) {
      last_err = errno;
      continue;
    }
    TuneTcpSocket(fd.get());
    int err = 0;
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) < 0) {
      err = errno;
      if (err == EINPROGRESS) err = finish_connect(fd.get());
    }
    if (err == 0) return fd;
    last_err = err;
    if (err == ETIMEDOUT) break;  // the whole budget is spent
  }
  return fail(last_err);
}

// --- One connection ----------------------------------------------------------

struct Negotiated {
  nbd::ExportInfo info;
  std::optional<nbd::BlockSizeInfo> block_size;
  bool used_export_name = false;
};

// Fixed-newstyle handshake: NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE, with a
// fallback to NBD_OPT_EXPORT_NAME for servers that answer NBD_REP_ERR_UNSUP.
Result<Negotiated> Handshake(int fd, const NbdUri& uri, const std::string& where,
                             SteadyTime deadline) {
  auto ctx = [&](const Error& e) {
    if (e.code() == ENOENT || e.code() == EACCES) return e;  // already says where
    if (e.code() == ETIMEDOUT) {
      return Error::Timeout("NBD handshake with " + where + " did not finish in time");
    }
    return e.Context("NBD handshake with " + where);
  };
  uint8_t greeting_bytes[nbd::kServerGreetingSize];
  if (auto s = RecvAllBefore(fd, greeting_bytes, deadline); !s) return Fail(ctx(s.error()));
  auto greeting = nbd::ParseServerGreeting(greeting_bytes);
  if (!greeting) return Fail(ctx(greeting.error()));
  uint32_t client_flags = nbd::ChooseClientFlags(*greeting);
  if (auto s = SendAllBefore(fd, nbd::EncodeClientFlags(client_flags), deadline); !s) {
    return Fail(ctx(s.error()));
  }

  const uint16_t infos[] = {nbd::kInfoBlockSize};
  auto go = nbd::EncodeGoOption(nbd::kOptGo, uri.export_name, infos);
  if (!go) return Fail(ctx(go.error()));
  if (auto s = SendAllBefore(fd, *go, deadline); !s) return Fail(ctx(s.error()));
  nbd::GoNegotiation negotiation(nbd::kOptGo, uri.export_name, where);
  std::vector<uint8_t> payload;
  for (;;) {
    uint8_t header_bytes[nbd::kOptionReplyHeaderSize];
    if (auto s = RecvAllBefore(fd, header_bytes, deadline); !s) return Fail(ctx(s.error()));
    auto header = nbd::ParseOptionReplyHeader(header_bytes);
    if (!header) return Fail(ctx(header.error()));
    payload.resize(header->length);
    if (auto s = RecvAllBefore(fd, payload, deadline); !s) return Fail(ctx(s.error()));
    auto step = negotiation.Feed(*header, payload);
    if (!step) {
      // Soft disconnect after a refused export, as proto.md asks of clients.
      (void)SendAllBefore(fd, nbd::EncodeOption(nbd::kOptAbort), deadline);
      return Fail(ctx(step.error()));
    }
    if (*step == nbd::GoNegotiation::Step::kDone) {
      return Negotiated{*negotiation.export_info(), negotiation.block_size(), false};
    }
    if (*step == nbd::GoNegotiation::Step::kUnsupported) break;
  }

  // Old server: NBD_OPT_EXPORT_NAME cannot report errors; an unknown export
  // shows up as the server closing the connection.
  auto export_name = nbd::EncodeExportNameOption(uri.export_name);
  if (!export_name) return Fail(ctx(export_name.error()));
  if (auto s = SendAllBefore(fd, *export_name, deadline); !s) return Fail(ctx(s.error()));
  bool no_zeroes = client_flags & nbd::kClientNoZeroes;
  std::vector<uint8_t> reply(nbd::ExportNameReplySize(no_zeroes));
  if (auto s = RecvAllBefore(fd, reply, deadline); !s) {
    if (s.error().code() == ECONNRESET) {
      return Fail(Error(ENOENT, "export '" + uri.export_name + "' not found on " + where +
                                    " (server closed the connection after NBD_OPT_EXPORT_NAME)"));
    }
    return Fail(ctx(s.error()));
  }
  auto info = nbd::ParseExportNameReply(reply, no_zeroes);
  if (!info) return Fail(ctx(info.error()));
  return Negotiated{*info, std::nullopt, true};
}

struct Connection {
  Connection(UniqueFd socket, uint64_t generation, Negotiated n)
      : fd(std::move(socket)), gen(generation), negotiated(n) {}
  UniqueFd fd;  // closed only when the last user (writer or reader) is gone
  const uint64_t gen;
  const Negotiated negotiated;
  std::mutex write_mu;  // serializes request headers on the wire
  uint64_t send_ticket = 0;  // GUARDED_BY(write_mu); one per batch of headers written
  std::atomic<bool> broken{false};
  std::string break_reason;  // GUARDED_BY(NbdClientImpl::mu_)
  ReaderClock reader_clock;  // the reader's progress and time spent storing

  // Wakes the reader (and any blocked writer) without closing the fd under
  // their feet.
  void Shutdown() {
    if (!broken.exchange(true)) ::shutdown(fd.get(), SHUT_RDWR);
  }
};

// Dials and negotiates one connection, returning it in blocking mode ready
// for transmission.
Result<std::shared_ptr<Connection>> Dial(const NbdUri& uri, const std::string& where,
                                         const NbdClientOptions& options, uint64_t generation) {
  SteadyTime deadline = steady_clock::now() + options.connect_timeout;
  auto fd = ConnectSocket(uri, where, options.connect_timeout, deadline);
  if (!fd) return Fail(fd.error());
  auto negotiated = Handshake(fd->get(), uri, where, deadline);
  if (!negotiated) return Fail(negotiated.error());
  int flags = ::fcntl(fd->get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd->get(), F_SETFL, flags & ~O_NONBLOCK) < 0) {
    return Fail(Error::Errno(errno, "cannot configure socket for " + where));
  }
  // A server that stops reading must not block writers forever.
  auto t = std::chrono::duration_cast<std::chrono::microseconds>(options.request_timeout);
  timeval tv{time_t(t.count() / 1000000), suseconds_t(t.count() % 1000000)};
  ::setsockopt(fd->get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return std::make_shared<Connection>(std::move(*fd), generation, *negotiated);
}

// --- The client ----------------------------------------------------------------

class NbdClientImpl final : public NbdClient {
 public:
  NbdClientImpl(NbdUri uri, std::string where, NbdClientOptions options,
                std::shared_ptr<Connection> first)
      : uri_(std::move(uri)),
        where_(std::move(where)),
        options_(options),
        size_(first->negotiated.info.size),
        block_(first->negotiated.block_size),
        min_block_(block_ ? block_->minimum : 1),
        max_request_(nbd::EffectiveMaxRequest(options.max_request_bytes, block_)) {
    std::lock_guard lk(mu_);
    generation_ = first->gen;
    InstallLocked(std::move(first));
    maintenance_ = std::thread([this] { MaintenanceLoop(); });
  }

  ~NbdClientImpl() override { Close(); }

  uint64_t Size() const override { return size_; }
  std::string Describe() const override { return where_; }

  bool Connected() const override {
    std::lock_guard lk(mu_);
    return conn_ && !conn_->broken;
  }

  Status Read(std::span<std::byte> buf, uint64_t offset) override;
  using RemoteReader::ReadToFile;
  Status ReadToFile(int fd, uint64_t file_offset, uint64_t length, uint64_t offset,
                    ReadToFileFault* fault) override;
  Status Reconnect() override;
  void Close() override;

 private:
  enum class State { kWaiting, kInFlight, kDone, kRetry };
  struct Pending {
    std::byte* dst = nullptr;
    int file_fd = -1;  // >= 0: the payload goes to this file (dst unused)
    uint64_t file_offset = 0;
    uint64_t offset = 0;
    uint32_t length = 0;
    uint64_t cookie = 0;
    uint64_t gen = 0;
    SteadyTime sent_at{};
    // The batch of headers this request went out in, in wire order (0: not
    // sent yet); with the cookie it orders requests as the server saw them.
    // Set by the sender under Connection::write_mu just before the write,
    // read by the reader under mu_, hence atomic (copyable for the vector).
    struct Ticket {
      std::atomic<uint64_t> v{0};
      Ticket() = default;
      Ticket(const Ticket& o) : v(o.v.load()) {}
      Ticket& operator=(const Ticket& o) {
        v.store(o.v.load());
        return *this;
      }
    } wire_ticket;
    // When a request sent after this one was answered first (zero: not
    // yet), and the reader's time spent storing then: from that moment this
    // one may be lost.
    SteadyTime overtaken_at{};
    steady_clock::duration stored_at_overtaken{};
    State state = State::kWaiting;
    Status result;
    bool file_failed = false;  // result is a failed write to file_fd, not the remote's
    std::condition_variable* done_cv = nullptr;  // the owning Read's
  };

  Status ReadAligned(std::span<std::byte> buf, uint64_t offset);
  Status CheckRange(uint64_t length, uint64_t offset) const;
  Status RunPieces(std::vector<Pending>& pieces);
  void InstallLocked(std::shared_ptr<Connection> c);
  void BreakLocked(const std::shared_ptr<Connection>& c, std::string reason);
  void ReaderLoop(std::shared_ptr<Connection> c);
  void MaintenanceLoop();
  Status CheckSameRemote(const Negotiated& n) const;

  const NbdUri uri_;
  const std::string where_;  // URI for messages; carries no secrets
  const NbdClientOptions options_;
  const uint64_t size_;
  const std::optional<nbd::BlockSizeInfo> block_;
  const uint32_t min_block_;
  const uint32_t max_request_;

  mutable std::mutex mu_;
  std::condition_variable state_cv_;                 // connection state changes, Close
  std::shared_ptr<Connection> conn_;                 // GUARDED_BY(mu_); null while disconnected
  uint64_t generation_ = 0;                          // GUARDED_BY(mu_)
  uint64_t next_cookie_ = 1;                         // GUARDED_BY(mu_)
  std::unordered_map<uint64_t, Pending*> inflight_;  // GUARDED_BY(mu_)
  bool closed_ = false;                              // GUARDED_BY(mu_)
  std::optional<Error> fatal_;                       // GUARDED_BY(mu_); remote changed identity
  Error last_error_;                                 // GUARDED_BY(mu_); why we are disconnected
  SteadyTime disconnected_at_{};                     // GUARDED_BY(mu_)
  SteadyTime next_attempt_{};                        // GUARDED_BY(mu_)
  milliseconds backoff_{0};                          // GUARDED_BY(mu_)
  bool connecting_ = false;                          // GUARDED_BY(mu_)
  struct Reader {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> finished;
  };
  std::vector<Reader> readers_;  // GUARDED_BY(mu_)
  std::thread maintenance_;
  std::mutex close_mu_;
};

void NbdClientImpl::InstallLocked(std::shared_ptr<Connection> c) {
  conn_ = c;
  auto finished = std::make_shared<std::atomic<bool>>(false);
  readers_.push_back({std::thread([this, c, finished] {
                        ReaderLoop(c);
                        finished->store(true);
                      }),
                      finished});
}

void NbdClientImpl::BreakLocked(const std::shared_ptr<Connection>& c, std::string reason) {
  if (c->broken) return;
  c->break_reason = std::move(reason);
  c->Shutdown();
}

Status NbdClientImpl::CheckSameRemote(const Negotiated& n) const {
  if (n.info.size != size_) {
    return Fail(Error::Io("remote export at " + where_ + " came back with size " +
                          std::to_string(n.info.size) + " instead of " + std::to_string(size_) +
                          " bytes; refusing to serve data from a different disk"));
  }
  uint32_t new_min = n.block_size ? n.block_size->minimum : 1;
  uint32_t new_max = nbd::EffectiveMaxRequest(options_.max_request_bytes, n.block_size);
  if (new_min > min_block_ || new_max < max_request_) {
    return Fail(Error::Io("remote export at " + where_ +
                          " came back with stricter block size constraints; reconnect refused"));
  }
  return Ok();
}

void NbdClientImpl::ReaderLoop(std::shared_ptr<Connection> c) {
  const int fd = c->fd.get();
  std::string reason;
  std::unique_ptr<FileSink> sink;  // made on the first ReadToFile payload
  for (;;) {
    uint8_t header[nbd::kSimpleReplySize];
    if (auto s = RecvAll(fd, header, 4); !s) {
      reason = s.error().message();
      break;
    }
    auto kind = nbd::ClassifyReplyMagic(std::span<const uint8_t, 4>(header, 4));
    if (kind != nbd::ReplyKind::kSimple) {
      reason = kind == nbd::ReplyKind::kStructured
                   ? "server sent a structured reply, which was not negotiated"
                   : "reply with bad magic";
      break;
    }
    if (auto s = RecvAll(fd, header + 4, sizeof header - 4); !s) {
      reason = "short reply header: " + s.error().message();
      break;
    }
    auto reply = nbd::ParseSimpleReply(header);
    if (!reply) {
      reason = reply.error().message();
      break;
    }
    c->reader_clock.Progress();
    Pending* p = nullptr;
    {
      std::lock_guard lk(mu_);
      auto it = inflight_.find(reply->cookie);
      if (it != inflight_.end() && it->second->gen == c->gen) p = it->second;
    }
    if (p == nullptr) {
      reason = "reply with unknown cookie " + std::to_string(reply->cookie);
      break;
    }
    Status result;
    bool file_failed = false;
    if (reply->error == 0) {
      // Straight into the caller's buffer or file: no intermediate copy.
      Status s;
      if (p->file_fd >= 0) {
        if (!sink) sink = std::make_unique<FileSink>();
        s = sink->Receive(fd, p->file_fd, p->file_offset, p->length, &result, c->reader_clock);
        file_failed = !result;
      } else {
        // In chunks, each one progress: a large reply over a slow link is
        // not a hung connection.
        constexpr size_t kChunk = 1 << 20;
        for (size_t at = 0; s && at < p->length; at += kChunk) {
          s = RecvAll(fd, p->dst + at, std::min<size_t>(kChunk, p->length - at));
          c->reader_clock.Progress();
        }
      }
      if (!s) {
        reason = "short read of reply payload: " + s.error().message();
        break;
      }
    } else {
      int err = nbd::NbdErrorToErrno(reply->error);
      if (err == ESHUTDOWN) {
        // proto.md: the client MUST soft-disconnect; the read is retried on
        // the next connection.
        uint8_t disc[nbd::kRequestHeaderSize];
        nbd::EncodeRequestHeader({0, nbd::kCmdDisc, 0, 0, 0}, disc);
        std::lock_guard wl(c->write_mu);
        (void)SendAll(fd, disc);
        reason = "server is shutting down (ESHUTDOWN)";
        break;
      }
      result = Fail(Error::Errno(err, "remote read of " + std::to_string(p->length) +
                                          " bytes at offset " + std::to_string(p->offset) +
                                          " from " + where_ + " failed"));
    }
    std::lock_guard lk(mu_);
    const auto order = std::pair(p->wire_ticket.v.load(), reply->cookie);  // before p is handed back
    inflight_.erase(reply->cookie);
    p->result = std::move(result);
    p->file_failed = file_failed;
    p->state = State::kDone;
    p->done_cv->notify_all();
    // Requests that went out on the wire before this one and are still
    // unanswered have been overtaken: each may be lost from now on. A
    // request not yet written (ticket 0) is not.
    SteadyTime now{};
    steady_clock::duration stored{};
    // (order.first is never 0: the ticket is set before the send.)
    for (auto& [cookie, q] : inflight_) {
      const uint64_t q_ticket = q->wire_ticket.v.load();
      if (q_ticket == 0 || q->gen != c->gen || q->overtaken_at != SteadyTime{} ||
          std::pair(q_ticket, cookie) >= order)
        continue;
      if (now == SteadyTime{}) {
        now = steady_clock::now();
        stored = c->reader_clock.Read(now).stored;
      }
      q->overtaken_at = now;
      q->stored_at_overtaken = stored;
    }
  }

  // The connection is dead: hand every request it carried back to its caller
  // for a retry on the next connection.
  std::unique_lock lk(mu_);
  if (!c->break_reason.empty()) reason = c->break_reason;
  c->Shutdown();
  for (auto it = inflight_.begin(); it != inflight_.end();) {
    Pending* p = it->second;
    if (p->gen != c->gen) {
      ++it;
      continue;
    }
    p->state = State::kRetry;
    p->done_cv->notify_all();
    it = inflight_.erase(it);
  }
  if (conn_ == c) {
    conn_.reset();
    last_error_ = Error::Io("lost connection to " + where_ + ": " + reason);
    disconnected_at_ = steady_clock::now();
    next_attempt_ = disconnected_at_;  // first attempt at once, then back off
    backoff_ = options_.backoff_initial;
    if (!closed_) spdlog::warn("nbd: lost connection to {}: {}; reconnecting", where_, reason);
  }
  state_cv_.notify_all();
}

void NbdClientImpl::MaintenanceLoop() {
  std::unique_lock lk(mu_);
  bool warned_this_outage = false;
  while (!closed_) {
    // Join reader threads that have finished (outside the lock: a finishing
    // reader may still need mu_ on its way out).
    std::vector<std::thread> done;
    for (auto it = readers_.begin(); it != readers_.end();) {
      if (it->finished->load()) {
        done.push_back(std::move(it->thread));
        it = readers_.erase(it);
      } else {
        ++it;
      }
    }
    if (!done.empty()) {
      lk.unlock();
      for (auto& t : done) t.join();
      lk.lock();
      continue;
    }

    auto now = steady_clock::now();
    if (conn_) {
      warned_this_outage = false;
      // Two deadlines, neither counting time the reader spent writing
      // replies into local files (a slow cache disk is not a hung remote):
      //  - hung: requests are waiting and the reader has made no progress
      //    (no reply header, no payload chunk) for request_timeout since
      //    the later of its last progress and the oldest request's send;
      //  - lost: a request sent after this one was answered, and this one
      //    still is not, request_timeout later. Requests merely queued
      //    behind others on a slow link are neither.
      const auto clock = conn_->reader_clock.Read(now);
      SteadyTime oldest = SteadyTime::max();
      bool lost = false;
      for (auto& [cookie, p] : inflight_) {
        if (p->gen != conn_->gen) continue;
        oldest = std::min(oldest, p->sent_at);
        if (p->overtaken_at != SteadyTime{} &&
            (now - p->overtaken_at) - (clock.stored - p->stored_at_overtaken) >=
                options_.request_timeout)
          lost = true;
      }
      const bool hung = oldest != SteadyTime::max() && !clock.storing &&
                        now - std::max(oldest, clock.last_progress) >= options_.request_timeout;
      if (hung || lost) {
        const std::string limit =
            "request_timeout (" + std::to_string(options_.request_timeout.count()) + " ms)";
        BreakLocked(conn_, hung ? "no reply within " + limit + "; declaring the connection hung"
                                : "a request unanswered for " + limit +
                                      " while later ones were answered; declaring it lost");
        state_cv_.wait_for(lk, milliseconds(50));
        continue;
      }
      auto tick =
          std::max(milliseconds(5), std::min(options_.request_timeout / 4, milliseconds(250)));
      state_cv_.wait_for(lk, tick);
      continue;
    }

    if (now < next_attempt_) {
      state_cv_.wait_until(lk, next_attempt_);
      continue;
    }
    uint64_t gen = ++generation_;
    connecting_ = true;
    lk.unlock();
    auto dialed = Dial(uri_, where_, options_, gen);
    Status same = dialed ? CheckSameRemote((*dialed)->negotiated) : Status(Ok());
    lk.lock();
    connecting_ = false;
    if (closed_) break;
    if (dialed && same) {
      fatal_.reset();
      InstallLocked(std::move(*dialed));
      spdlog::info("nbd: reconnected to {} after {} ms", where_,
                   Ms(steady_clock::now() - disconnected_at_));
      state_cv_.notify_all();
      continue;
    }
    if (dialed) {
      // The remote answers but is not the disk we were serving: reads must
      // fail now rather than wait, and keep failing until it is fixed.
      fatal_ = same.error();
      spdlog::error("nbd: {}", same.error().message());
      state_cv_.notify_all();
    } else {
      last_error_ = dialed.error();
      if (!warned_this_outage) {
        spdlog::warn("nbd: reconnect to {} failed: {}; retrying with back-off up to {} ms", where_,
                     dialed.error().message(), options_.backoff_max.count());
        warned_this_outage = true;
      } else {
        spdlog::debug("nbd: reconnect to {} failed: {}", where_, dialed.error().message());
      }
    }
    next_attempt_ = steady_clock::now() + backoff_;
    backoff_ = std::min(std::max(backoff_ * 2, milliseconds(1)), options_.backoff_max);
    state_cv_.notify_all();  // Reconnect() waits for the outcome of an attempt
  }
}

Status NbdClientImpl::CheckRange(uint64_t length, uint64_t offset) const {
  if (offset > size_ || length > size_ - offset) {
    return Fail(Error::Invalid("read of " + std::to_string(length) + " bytes at offset " +
                               std::to_string(offset) + " is beyond the end of " + where_ +
                               " (size " + std::to_string(size_) + ")"));
  }
  return Ok();
}

Status NbdClientImpl::ReadToFile(int fd, uint64_t file_offset, uint64_t length, uint64_t offset,
                                 ReadToFileFault* fault) {
  if (length == 0) return Ok();
  if (fault) *fault = ReadToFileFault::kRemote;
  if (auto s = CheckRange(length, offset); !s) return s;
  if (min_block_ > 1 && (offset % min_block_ != 0 || length % min_block_ != 0)) {
    return RemoteReader::ReadToFile(fd, file_offset, length, offset, fault);  // via Read's bounce
  }
  auto split = nbd::SplitRead(offset, length, max_request_, min_block_);
  std::vector<Pending> pieces(split.size());
  for (size_t i = 0; i < split.size(); ++i) {
    pieces[i].file_fd = fd;
    pieces[i].file_offset = file_offset + split[i].buffer_offset;
    pieces[i].offset = split[i].offset;
    pieces[i].length = split[i].length;
  }
  Status s = RunPieces(pieces);
  if (!s && fault) {
    // RunPieces returned the first failed piece's result, if one failed
    // (otherwise its own: the link or the client): that piece says whose.
    auto failed = std::find_if(pieces.begin(), pieces.end(), [](const Pending& p) {
      return p.state == State::kDone && !p.result;
    });
    if (failed != pieces.end() && failed->file_failed) *fault = ReadToFileFault::kFile;
  }
  return s;
}

Status NbdClientImpl::Read(std::span<std::byte> buf, uint64_t offset) {
  if (buf.empty()) return Ok();
  if (auto s = CheckRange(buf.size(), offset); !s) return s;
  if (min_block_ > 1 && (offset % min_block_ != 0 || buf.size() % min_block_ != 0)) {
    // The server promised alignment only for whole minimum blocks: read the
    // covering aligned range and copy out the middle.
    uint64_t start = offset - offset % min_block_;
    uint64_t end = offset + buf.size();
    end += (min_block_ - end % min_block_) % min_block_;
    if (end > size_) {
      return Fail(Error::Invalid("unaligned read at the tail of " + where_ +
                                 " cannot be expressed in its minimum block size"));
    }
    std::vector<std::byte> bounce(size_t(end - start));
    if (auto s = ReadAligned(bounce, start); !s) return s;
    std::memcpy(buf.data(), bounce.data() + (offset - start), buf.size());
    return Ok();
  }
  return ReadAligned(buf, offset);
}

Status NbdClientImpl::ReadAligned(std::span<std::byte> buf, uint64_t offset) {
  auto split = nbd::SplitRead(offset, buf.size(), max_request_, min_block_);
  std::vector<Pending> pieces(split.size());
  for (size_t i = 0; i < split.size(); ++i) {
    pieces[i].dst = buf.data() + split[i].buffer_offset;
    pieces[i].offset = split[i].offset;
    pieces[i].length = split[i].length;
  }
  return RunPieces(pieces);
}

// Sends every piece that is not done, waits for all of them, and repeats for
// the ones whose connection died. Never returns while a piece is in flight.
Status NbdClientImpl::RunPieces(std::vector<Pending>& pieces) {
  std::condition_variable done_cv;
  for (auto& p : pieces) p.done_cv = &done_cv;
  std::unique_lock lk(mu_);
  // A plain time point plus flag: g++ 12 warns (falsely) about optional here.
  bool waiting_for_link = false;
  SteadyTime wait_deadline{};
  std::vector<uint8_t> headers;
  for (;;) {
    bool any_waiting = std::any_of(pieces.begin(), pieces.end(),
                                   [](const Pending& p) { return p.state == State::kWaiting; });
    if (!any_waiting) break;
    if (closed_) return Fail(Error::Shutdown("NBD client for " + where_ + " is closed"));
    if (fatal_) return Fail(*fatal_);
    if (!conn_) {
      if (!waiting_for_link) {
        waiting_for_link = true;
        wait_deadline = steady_clock::now() + options_.wait_bound;
      }
      bool up = state_cv_.wait_until(lk, wait_deadline,
                                     [&] { return closed_ || fatal_ || conn_ != nullptr; });
      if (!up) {
        return Fail(Error::Timeout(
            "remote " + where_ + " unreachable for " + std::to_string(options_.wait_bound.count()) +
            " ms (wait_bound); giving up on a read at offset " +
            std::to_string(pieces.front().offset) + ". Last error: " + last_error_.message()));
      }
      continue;
    }
    waiting_for_link = false;
    std::shared_ptr<Connection> c = conn_;
    SteadyTime now = steady_clock::now();
    headers.clear();
    std::vector<Pending*> batch;
    for (auto& p : pieces) {
      if (p.state != State::kWaiting) continue;
      batch.push_back(&p);
      p.cookie = next_cookie_++;
      p.gen = c->gen;
      p.sent_at = now;
      p.overtaken_at = {};  // a retry starts afresh on the new connection
      p.stored_at_overtaken = {};
      p.state = State::kInFlight;
      inflight_.emplace(p.cookie, &p);
      size_t at = headers.size();
      headers.resize(at + nbd::kRequestHeaderSize);
      nbd::EncodeRequestHeader({0, nbd::kCmdRead, p.cookie, p.offset, p.length},
                               std::span<uint8_t, nbd::kRequestHeaderSize>(
                                   headers.data() + at, nbd::kRequestHeaderSize));
    }
    lk.unlock();
    Status s;
    {
      std::lock_guard wl(c->write_mu);
      const uint64_t ticket = ++c->send_ticket;
      for (Pending* p : batch) p->wire_ticket.v.store(ticket);
      s = SendAll(c->fd.get(), headers);
    }
    lk.lock();
    if (!s) BreakLocked(c, s.error().message());
    done_cv.wait(lk, [&] {
      return std::none_of(pieces.begin(), pieces.end(),
                          [](const Pending& p) { return p.state == State::kInFlight; });
    });
    for (auto& p : pieces) {
      if (p.state == State::kRetry) p.state = State::kWaiting;
    }
    for (auto& p : pieces) {
      if (p.state == State::kDone && !p.result) return p.result;
    }
  }
  return Ok();
}

Status NbdClientImpl::Reconnect() {
  std::unique_lock lk(mu_);
  if (closed_) return Fail(Error::Shutdown("NBD client for " + where_ + " is closed"));
  uint64_t before = generation_;
  if (conn_) BreakLocked(conn_, "reconnect requested by the operator");
  // The operator may have fixed a remote we refused (size changed): judge
  // it afresh.
  fatal_.reset();
  next_attempt_ = steady_clock::now();
  backoff_ = options_.backoff_initial;
  state_cv_.notify_all();
  auto deadline = steady_clock::now() + 2 * options_.connect_timeout + milliseconds(100);
  bool done = state_cv_.wait_until(lk, deadline, [&] {
    return closed_ || fatal_ || (conn_ && conn_->gen > before && !conn_->broken) ||
           (!conn_ && generation_ > before && !connecting_);
  });
  if (closed_) return Fail(Error::Shutdown("NBD client for " + where_ + " is closed"));
  if (fatal_) return Fail(*fatal_);
  if (conn_ && conn_->gen > before) {
    spdlog::info("nbd: reconnected to {} on request", where_);
    return Ok();
  }
  if (!done) return Fail(Error::Timeout("reconnect to " + where_ + " did not finish in time"));
  return Fail(last_error_);
}

void NbdClientImpl::Close() {
  std::lock_guard close_lk(close_mu_);  // Close may race with the destructor's
  std::shared_ptr<Connection> c;
  {
    std::lock_guard lk(mu_);
    if (closed_ && !maintenance_.joinable()) return;
    closed_ = true;
    c = conn_;
    state_cv_.notify_all();
  }
  if (c) {
    {
      std::lock_guard lk(mu_);
      // Soft disconnect when idle (proto.md: SHOULD wait for no inflight).
      bool idle = inflight_.empty();
      if (idle && !c->broken) {
        uint8_t disc[nbd::kRequestHeaderSize];
        nbd::EncodeRequestHeader({0, nbd::kCmdDisc, 0, 0, 0}, disc);
        std::lock_guard wl(c->write_mu);
        (void)SendAll(c->fd.get(), disc);
      }
      BreakLocked(c, "client closed");
    }
    spdlog::info("nbd: disconnected from {}", where_);
  }
  if (maintenance_.joinable()) maintenance_.join();
  std::vector<Reader> readers;
  {
    std::lock_guard lk(mu_);
    if (conn_) BreakLocked(conn_, "client closed");
    readers.swap(readers_);
  }
  for (auto& r : readers) r.thread.join();
}

}  // namespace

Result<std::unique_ptr<NbdClient>> NbdClient::Connect(const NbdUri& uri,
                                                      const NbdClientOptions& options) {
  std::string where = uri.ToString();
  if (options.max_request_bytes == 0) return Fail(Error::Invalid("max_request_bytes must be > 0"));
  auto first = Dial(uri, where, options, 1);
  if (!first) return Fail(first.error());
  const auto& n = (*first)->negotiated;
  spdlog::info("nbd: connected to {}: {} bytes, flags {:#x}{}{}", where, n.info.size,
               n.info.transmission_flags, n.used_export_name ? ", via NBD_OPT_EXPORT_NAME" : "",
               n.block_size ? fmt::format(", block sizes {}/{}/{}", n.block_size->minimum,
                                          n.block_size->preferred, n.block_size->maximum)
                            : std::string());
  return std::unique_ptr<NbdClient>(
      std::make_unique<NbdClientImpl>(uri, std::move(where), options, std::move(*first)));
}

}  // namespace kagemusha::storage

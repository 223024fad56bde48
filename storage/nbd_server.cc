// NbdServer over Boost.Asio: listeners, the worker pool and session
// bookkeeping. The protocol lives in nbd_server_codec.* and nbd_session.*.
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <utility>

#include <boost/asio.hpp>
#include <spdlog/spdlog.h>

#include "kagemusha/common/control_socket.h"
#include "kagemusha/storage/nbd_server.h"
#include "nbd_session.h"

namespace kagemusha::storage {

namespace asio = boost::asio;
using asio::awaitable;
using asio::ip::tcp;
using boost::system::error_code;
using unix_socket = asio::local::stream_protocol;

namespace {

class NbdServerImpl final : public NbdServer {
 public:
  explicit NbdServerImpl(const ServerOptions& options)
      : workers_(std::max(1u, options.worker_threads)) {
    env_.exports = &exports_;
    env_.workers = &workers_;
    env_.counters = &counters_;
    env_.options = options;
    if (env_.options.max_splice_pipes == 0) {
      rlimit lim{};
      rlim_t fds = 1024;
      if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY) {
        fds = lim.rlim_cur;
      } else if (lim.rlim_cur == RLIM_INFINITY) {
        fds = 1 << 20;
      }
      env_.options.max_splice_pipes = std::max<size_t>(1, size_t(fds / 4));
    }
  }

  ~NbdServerImpl() override {
    Stop();
    workers_.join();
  }

  Status AddExport(ExportConfig config) override {
    if (!config.backend) return Fail(Error::Invalid("export '" + config.name + "' has no backend"));
    if (config.name.size() > nbd::kMaxNameLength) {
      return Fail(Error::Invalid("export name longer than 4096 bytes"));
    }
    for (const auto& e : exports_) {
      if (e.name == config.name) return Fail(Error::Invalid("duplicate export '" + config.name + "'"));
    }
    exports_.push_back(std::move(config));
    return Ok();
  }

  Status ListenTcp(const std::string& host_port) override {
    auto colon = host_port.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      return Fail(Error::Invalid("listen address '" + host_port + "' is not host:port"));
    }
    std::string host = host_port.substr(0, colon);
    std::string port = host_port.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
    error_code ec;
    tcp::resolver resolver(io_);
    // Numeric hosts resolve without DNS; a name binds to its first address
    // only, never to a wildcard the caller did not write.
    auto results = resolver.resolve(host, port, tcp::resolver::passive, ec);
    if (ec || results.empty()) {
      return Fail(Error(EINVAL, "cannot resolve listen address '" + host_port + "': " + ec.message()));
    }
    tcp::endpoint ep = results.begin()->endpoint();
    auto acceptor = std::make_unique<tcp::acceptor>(io_);
    acceptor->open(ep.protocol(), ec);
    if (!ec) acceptor->set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec && ep.address().is_v6()) acceptor->set_option(asio::ip::v6_only(true), ec);
    if (!ec) acceptor->bind(ep, ec);
    if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      return Fail(Error(ec.value(), "cannot listen on " + host_port + ": " + ec.message()));
    }
    auto bound = acceptor->local_endpoint(ec);
    std::lock_guard lock(mu_);
    endpoints_.push_back(bound.address().is_v6()
                             ? "[" + bound.address().to_string() + "]:" + std::to_string(bound.port())
                             : bound.address().to_string() + ":" + std::to_string(bound.port()));
    spdlog::info("nbd: listening on {}", endpoints_.back());
    tcp_acceptors_.push_back(std::move(acceptor));
    return Ok();
  }

  Status ListenUnix(const std::string& path) override {
    // A live server's socket is never replaced (two servers would serve
    // the same image); one left by a dead server is.
    if (auto s = ClearStaleUnixSocket(path, "--unix"); !s) return s;
    error_code ec;
    auto acceptor = std::make_unique<unix_socket::acceptor>(io_);
    acceptor->open(unix_socket(), ec);
    if (!ec) acceptor->bind(unix_socket::endpoint(path), ec);
    // chmod before listen(): until then nobody can connect, so there is no
    // window in which the socket is reachable with looser permissions.
    if (!ec && ::chmod(path.c_str(), 0600) != 0) ec.assign(errno, boost::system::system_category());
    if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return Fail(Error(ec.value(), "cannot listen on " + path + ": " + ec.message()));
    // Which file is ours, so that only it is removed at exit (not a socket
    // another server made at the same path after this one).
    struct stat st {};
    const bool known = ::lstat(path.c_str(), &st) == 0;
    std::lock_guard lock(mu_);
    endpoints_.push_back("unix:" + path);
    unix_paths_.push_back(path);
    unix_ids_.push_back(known ? std::pair(st.st_dev, st.st_ino) : std::pair(dev_t{}, ino_t{}));
    spdlog::info("nbd: listening on unix:{}", path);
    unix_acceptors_.push_back(std::move(acceptor));
    return Ok();
  }

  std::vector<std::string> BoundEndpoints() const override {
    std::lock_guard lock(mu_);
    return endpoints_;
  }

  void Run() override {
    for (auto& a : tcp_acceptors_) asio::co_spawn(io_, AcceptTcp(*a), asio::detached);
    for (size_t i = 0; i < unix_acceptors_.size(); ++i) {
      asio::co_spawn(io_, AcceptUnix(*unix_acceptors_[i], unix_paths_[i]), asio::detached);
    }
    std::vector<std::thread> threads;
    for (unsigned i = 1; i < std::max(1u, env_.options.io_threads); ++i) {
      threads.emplace_back([this] { io_.run(); });
    }
    io_.run();
    for (auto& t : threads) t.join();
    for (size_t i = 0; i < unix_paths_.size(); ++i) {
      struct stat st {};
      if (::lstat(unix_paths_[i].c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
          std::pair(st.st_dev, st.st_ino) == unix_ids_[i])
        ::unlink(unix_paths_[i].c_str());
    }
  }

  void Stop() override {
    asio::post(io_, [this] {
      if (stopping_) return;
      stopping_ = true;
      error_code ignored;
      for (auto& a : tcp_acceptors_) a->close(ignored);
      for (auto& a : unix_acceptors_) a->close(ignored);
      std::lock_guard lock(mu_);
      for (auto& w : sessions_) {
        if (auto s = w.lock()) s->Close();
      }
    });
  }

  ServerStats Stats() const override {
    ServerStats s;
    s.connections_open = counters_.connections_open;
    s.connections_total = counters_.connections_total;
    s.connections_refused = counters_.connections_refused;
    s.requests = counters_.requests;
    s.requests_inline = counters_.requests_inline;
    s.bytes_read = counters_.bytes_read;
    s.bytes_written = counters_.bytes_written;
    s.protocol_errors = counters_.protocol_errors;
    return s;
  }

 private:
  awaitable<void> AcceptTcp(tcp::acceptor& acceptor) {
    for (;;) {
      error_code ec;
      tcp::socket s = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        if (stopping_ || ec == asio::error::operation_aborted) co_return;
        co_await Backoff(ec);
        continue;
      }
      s.set_option(tcp::no_delay(true), ec);
      auto peer = s.remote_endpoint(ec);
      std::string name = ec ? "tcp:?" : "tcp:" + peer.address().to_string() + ":" +
                                            std::to_string(peer.port());
      StartSession(Session::Socket(std::move(s)), std::move(name));
    }
  }

  awaitable<void> AcceptUnix(unix_socket::acceptor& acceptor, std::string path) {
    for (;;) {
      error_code ec;
      unix_socket::socket s =
          co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        if (stopping_ || ec == asio::error::operation_aborted) co_return;
        co_await Backoff(ec);
        continue;
      }
      StartSession(Session::Socket(std::move(s)),
                   "unix:" + path + "#" + std::to_string(counters_.connections_total + 1));
    }
  }

  // accept() failing (EMFILE, ENOBUFS) must not spin the loop.
  awaitable<void> Backoff(const error_code& ec) {
    spdlog::warn("nbd: accept failed: {}; retrying", ec.message());
    asio::steady_timer t(io_, std::chrono::milliseconds(100));
    error_code ignored;
    co_await t.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
  }

  void StartSession(Session::Socket socket, std::string peer) {
    const unsigned max = env_.options.max_connections;
    if (max != 0 && counters_.connections_open.load() >= max) {
      const uint64_t refused = ++counters_.connections_refused;
      // At most one warning a second, however fast connections come.
      const int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                              std::chrono::steady_clock::now().time_since_epoch())
                              .count();
      if (last_refusal_warning_.exchange(now) != now) {
        spdlog::warn(
            "nbd: refusing connection {}: {} connections are open, the limit "
            "(--max-connections); {} refused since start",
            peer, max, refused);
      }
      error_code ignored;
      socket.close(ignored);
      return;
    }
    auto session = std::make_shared<Session>(std::move(socket), std::move(peer), env_);
    {
      std::lock_guard lock(mu_);
      if (stopping_) {
        session->Close();
      }
      // Drop entries of finished sessions now and then.
      if (sessions_.size() > 64) {
        std::erase_if(sessions_, [](const std::weak_ptr<Session>& w) { return w.expired(); });
      }
      sessions_.push_back(session);
    }
    Session::Start(std::move(session));
  }

  asio::io_context io_;
  asio::thread_pool workers_;
  std::vector<ExportConfig> exports_;
  ServerCounters counters_;
  SessionEnvironment env_;
  std::vector<std::unique_ptr<tcp::acceptor>> tcp_acceptors_;
  std::vector<std::unique_ptr<unix_socket::acceptor>> unix_acceptors_;
  std::vector<std::string> unix_paths_;
  std::vector<std::pair<dev_t, ino_t>> unix_ids_;  // of the socket files we made
  std::atomic<int64_t> last_refusal_warning_{-1};    // steady seconds
  mutable std::mutex mu_;
  std::vector<std::string> endpoints_;            // GUARDED_BY(mu_)
  std::vector<std::weak_ptr<Session>> sessions_;  // GUARDED_BY(mu_)
  std::atomic<bool> stopping_{false};
};

}  // namespace

std::unique_ptr<NbdServer> NbdServer::Create(const ServerOptions& options) {
  return std::make_unique<NbdServerImpl>(options);
}

}  // namespace kagemusha::storage

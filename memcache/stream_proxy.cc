// Transports for the stream proxies: TCP sockets and the in-memory fake.
#include "kagemusha/memcache/stream_proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>

#include "kagemusha/common/coding.h"
#include "page_store_format.h"
#include "stream_proxy_session.h"

namespace kagemusha::memcache {

double ProxyStats::ratio() const {
  return qemu_bytes == 0 ? 1.0 : double(forward_wan_bytes) / double(qemu_bytes);
}

Result<std::pair<std::string, uint16_t>> SplitHostPort(const std::string& hp) {
  std::string host, port;
  if (!hp.empty() && hp[0] == '[') {
    auto close = hp.find(']');
    if (close == std::string::npos || close + 1 >= hp.size() || hp[close + 1] != ':')
      return Fail(Error::Invalid("'" + hp + "' is not [IPV6]:PORT"));
    host = hp.substr(1, close - 1);
    port = hp.substr(close + 2);
  } else {
    auto colon = hp.rfind(':');
    if (colon == std::string::npos || colon == 0)
      return Fail(Error::Invalid("'" + hp + "' is not HOST:PORT (e.g. 127.0.0.1:4444)"));
    host = hp.substr(0, colon);
    port = hp.substr(colon + 1);
  }
  if (port.empty() || port.size() > 5 || !std::all_of(port.begin(), port.end(), ::isdigit))
    return Fail(Error::Invalid("'" + hp + "': port must be a number 0..65535"));
  unsigned long p = std::stoul(port);
  if (p > 65535) return Fail(Error::Invalid("'" + hp + "': port must be 0..65535"));
  return std::make_pair(host, uint16_t(p));
}

namespace {

Result<addrinfo*> Resolve(const std::string& host, uint16_t port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (rc != 0) return Fail(Error::Invalid("cannot resolve '" + host + "': " + ::gai_strerror(rc)));
  return res;
}

}  // namespace

// --- SocketStream -------------------------------------------------------------------

SocketStream::SocketStream(int fd) : fd_(fd) {
  int one = 1;
  // Return-path messages (postcopy page requests) are small and urgent.
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

SocketStream::~SocketStream() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<SocketStream>> SocketStream::Connect(const std::string& host_port,
                                                            std::chrono::milliseconds timeout) {
  auto hp = SplitHostPort(host_port);
  if (!hp) return Fail(hp.error());
  auto res = Resolve(hp->first, hp->second, false);
  if (!res) return Fail(res.error());
  Error last = Error::Io("no address for " + host_port);
  for (addrinfo* ai = *res; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
      last = Error::Errno(errno, "socket");
      continue;
    }
    int rc = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      rc = ::poll(&p, 1, int(timeout.count()));
      if (rc == 0) {
        ::close(fd);
        last = Error::Timeout("connecting to " + host_port + " timed out");
        continue;
      }
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        ::close(fd);
        last = Error::Errno(err, "connecting to " + host_port);
        continue;
      }
      rc = 0;
    }
    if (rc != 0) {
      last = Error::Errno(errno, "connecting to " + host_port);
      ::close(fd);
      continue;
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    ::freeaddrinfo(*res);
    return std::make_unique<SocketStream>(fd);
  }
  ::freeaddrinfo(*res);
  return Fail(last);
}

Result<size_t> SocketStream::Read(std::span<uint8_t> buf) {
  while (true) {
    ssize_t n = ::recv(fd_, buf.data(), buf.size(), 0);
    if (n >= 0) return size_t(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
      return Fail(Error::Timeout("no data from the peer within the time limit"));
    return Fail(Error::Errno(errno, "recv"));
  }
}

void SocketStream::SetReadTimeout(std::chrono::milliseconds timeout) {
  timeval tv{};
  tv.tv_sec = timeout.count() / 1000;
  tv.tv_usec = (timeout.count() % 1000) * 1000;
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

void SocketStream::SetWriteTimeout(std::chrono::milliseconds timeout) {
  timeval tv{};
  tv.tv_sec = timeout.count() / 1000;
  tv.tv_usec = (timeout.count() % 1000) * 1000;
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

Status SocketStream::WriteAll(std::span<const uint8_t> bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return Fail(Error::Timeout("the peer took no data within the time limit"));
      return Fail(Error::Errno(errno, "send"));
    }
    bytes = bytes.subspan(size_t(n));
  }
  return Ok();
}

void SocketStream::SetSendBuffer(int bytes) {
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

void SocketStream::ShutdownWrite() { ::shutdown(fd_, SHUT_WR); }
void SocketStream::Abort() { ::shutdown(fd_, SHUT_RDWR); }

// --- TcpListener ----------------------------------------------------------------------

Result<std::unique_ptr<TcpListener>> TcpListener::Listen(const std::string& host_port) {
  auto hp = SplitHostPort(host_port);
  if (!hp) return Fail(hp.error());
  if (hp->first.empty()) return Fail(Error::Invalid("'" + host_port + "' has no host"));
  auto res = Resolve(hp->first, hp->second, true);
  if (!res) return Fail(res.error());
  Error last = Error::Io("no address for " + host_port);
  for (addrinfo* ai = *res; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, 8) != 0) {
      last = Error::Errno(errno, "listening on " + host_port);
      ::close(fd);
      continue;
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    uint16_t port = ss.ss_family == AF_INET6
                        ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                        : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    ::freeaddrinfo(*res);
    return std::unique_ptr<TcpListener>(new TcpListener(fd, hp->first, port));
  }
  ::freeaddrinfo(*res);
  return Fail(last);
}

TcpListener::~TcpListener() {
  if (fd_ >= 0) ::close(fd_);
}

std::string TcpListener::address() const {
  bool v6 = host_.find(':') != std::string::npos;
  return (v6 ? "[" + host_ + "]" : host_) + ":" + std::to_string(port_);
}

void TcpListener::Close() { ::shutdown(fd_, SHUT_RDWR); }

Result<std::unique_ptr<SocketStream>> TcpListener::Accept() {
  while (true) {
    int fd = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) return std::make_unique<SocketStream>(fd);
    if (errno == EINTR || errno == ECONNABORTED) continue;
    return Fail(Error::Errno(errno, "accept on " + address()));
  }
}

// --- the in-memory fake ----------------------------------------------------------------

namespace {

// One direction of a pipe.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<uint8_t> data;
  bool write_closed = false;      // EOF after the queued bytes
  bool aborted = false;           // the reader aborted: reads and writes fail
  bool reset_after_data = false;  // the writer aborted: queued data, then an error
  size_t capacity;
  explicit Channel(size_t cap) : capacity(cap) {}
};

class MemoryStream final : public ByteStream {
 public:
  MemoryStream(std::shared_ptr<Channel> in, std::shared_ptr<Channel> out)
      : in_(std::move(in)), out_(std::move(out)) {}
  ~MemoryStream() override { Abort(); }

  Result<size_t> Read(std::span<uint8_t> buf) override {
    std::unique_lock lk(in_->mu);
    auto ready = [&] {
      return in_->aborted || !in_->data.empty() || in_->write_closed || in_->reset_after_data;
    };
    if (timeout_.count() > 0) {
      if (!in_->cv.wait_for(lk, timeout_, ready))
        return Fail(Error::Timeout("no data from the peer within the time limit"));
    } else {
      in_->cv.wait(lk, ready);
    }
    if (in_->aborted) return Fail(Error::Errno(ECONNRESET, "recv"));
    if (in_->data.empty()) {
      // The writer aborted: it is gone, and says so once its data is read.
      if (in_->reset_after_data) return Fail(Error::Errno(ECONNRESET, "recv"));
      return size_t{0};
    }
    size_t n = std::min(buf.size(), in_->data.size());
    std::copy_n(in_->data.begin(), n, buf.begin());
    in_->data.erase(in_->data.begin(), in_->data.begin() + long(n));
    in_->cv.notify_all();
    return n;
  }

  Status WriteAll(std::span<const uint8_t> bytes) override {
    std::unique_lock lk(out_->mu);
    while (!bytes.empty()) {
      auto ready = [&] {
        return out_->aborted || out_->write_closed || out_->reset_after_data ||
               out_->data.size() < out_->capacity;
      };
      if (write_timeout_.count() > 0) {
        if (!out_->cv.wait_for(lk, write_timeout_, ready))
          return Fail(Error::Timeout("the peer took no data within the time limit"));
      } else {
        out_->cv.wait(lk, ready);
      }
      if (out_->aborted || out_->write_closed || out_->reset_after_data)
        return Fail(Error::Errno(EPIPE, "send"));
      size_t n = std::min(bytes.size(), out_->capacity - out_->data.size());
      out_->data.insert(out_->data.end(), bytes.begin(), bytes.begin() + long(n));
      bytes = bytes.subspan(n);
      out_->cv.notify_all();
    }
    return Ok();
  }

  void ShutdownWrite() override {
    std::lock_guard lk(out_->mu);
    out_->write_closed = true;
    out_->cv.notify_all();
  }

  // Like shutdown(SHUT_RDWR) on a socket: bytes already sent still reach
  // the peer, which then sees an error rather than a clean EOF (so tests can
  // tell an abort from a normal end); our own reads fail at once.
  void SetReadTimeout(std::chrono::milliseconds timeout) override { timeout_ = timeout; }
  void SetWriteTimeout(std::chrono::milliseconds timeout) override { write_timeout_ = timeout; }

  void Abort() override {
    {
      std::lock_guard lk(in_->mu);
      in_->aborted = true;
      in_->cv.notify_all();
    }
    std::lock_guard lk(out_->mu);
    out_->reset_after_data = true;
    out_->cv.notify_all();
  }

 private:
  std::shared_ptr<Channel> in_, out_;
  std::chrono::milliseconds timeout_{0};        // set before the reader thread starts
  std::chrono::milliseconds write_timeout_{0};  // set before the writer thread starts
};

}  // namespace

std::pair<std::unique_ptr<ByteStream>, std::unique_ptr<ByteStream>> MakeMemoryPipe(
    size_t capacity) {
  auto a_to_b = std::make_shared<Channel>(capacity);
  auto b_to_a = std::make_shared<Channel>(capacity);
  return {std::make_unique<MemoryStream>(b_to_a, a_to_b),
          std::make_unique<MemoryStream>(a_to_b, b_to_a)};
}

// --- session helpers (stream_proxy_session.h) -----------------------------------------

namespace detail {

EndAccumulator::EndAccumulator() : ctx_(EVP_MD_CTX_new()) {
  EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(ctx_), EVP_sha256(), nullptr);
}

EndAccumulator::~EndAccumulator() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_)); }

void EndAccumulator::Place(char kind, std::string_view block, uint64_t offset) {
  uint8_t head[2] = {uint8_t(kind), uint8_t(block.size())};
  uint8_t off[8];
  StoreBe64(off, offset);
  auto* ctx = static_cast<EVP_MD_CTX*>(ctx_);
  EVP_DigestUpdate(ctx, head, sizeof head);
  EVP_DigestUpdate(ctx, block.data(), block.size());
  EVP_DigestUpdate(ctx, off, sizeof off);
}

void EndAccumulator::Page(std::string_view block, uint64_t offset, const PageDigest& d) {
  ++pages_;
  Place('P', block, offset);
  EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), d.bytes.data(), d.bytes.size());
}

void EndAccumulator::Zero(std::string_view block, uint64_t offset, uint8_t fill) {
  ++zero_pages_;
  Place('Z', block, offset);
  EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), &fill, 1);
}

reuse::EndFigures EndAccumulator::Figures() const {
  reuse::EndFigures f;
  f.pages = pages_;
  f.zero_pages = zero_pages_;
  f.passthrough_bytes = passthrough_bytes_;
  f.passthrough_crc = crc_;
  EVP_MD_CTX* copy = EVP_MD_CTX_new();
  EVP_MD_CTX_copy_ex(copy, static_cast<EVP_MD_CTX*>(ctx_));
  unsigned len = 0;
  EVP_DigestFinal_ex(copy, f.page_chain.bytes.data(), &len);
  EVP_MD_CTX_free(copy);
  return f;
}

void ManifestBuilder::Set(std::string_view block, uint64_t offset, const PageDigest& d) {
  auto it = blocks_.find(block);
  if (it == blocks_.end())
    it = blocks_.emplace(std::string(block), std::map<uint64_t, PageDigest>{}).first;
  it->second[offset] = d;
}

void ManifestBuilder::Erase(std::string_view block, uint64_t offset) {
  auto it = blocks_.find(block);
  if (it != blocks_.end()) it->second.erase(offset);
}

Manifest ManifestBuilder::Build() const {
  Manifest m;
  for (const auto& [block, pages] : blocks_) {
    for (const auto& [offset, digest] : pages) m.entries.push_back({block, offset, digest});
  }
  return m;
}

// --- PageLearner ---------------------------------------------------------------------

namespace {
PageHasher MustCreateHasher() {
  auto h = PageHasher::Create();
  if (!h) {
    spdlog::critical("cannot create a SHA-256 hasher: {}", h.error().message());
    std::abort();
  }
  return std::move(*h);
}
}  // namespace

PageLearner::PageLearner(const Options& o) : opt_(o) {
  inline_hasher_.emplace(MustCreateHasher());
  worker_hasher_.emplace(MustCreateHasher());
  worker_ = std::thread([this] { WorkerLoop(); });
}

PageLearner::~PageLearner() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

PageLearner::Event PageLearner::NewEvent(std::string_view block, uint64_t offset, bool in_window) {
  Event e;
  e.block.assign(block);
  e.offset = offset;
  e.in_window = in_window;
  return e;
}

size_t PageLearner::AddPage(std::string_view block, uint64_t offset, std::span<const uint8_t> data,
                            bool in_window) {
  Event e = NewEvent(block, offset, in_window);
  e.data = uint32_t(batch_.data.size() / kStorePageSize);
  batch_.data.insert(batch_.data.end(), data.begin(), data.end());
  batch_.events.push_back(std::move(e));
  return batch_.events.size() - 1;
}

void PageLearner::AddKnownPage(std::string_view block, uint64_t offset, const PageDigest& d,
                               bool in_window) {
  Event e = NewEvent(block, offset, in_window);
  e.digest = d;
  e.has_digest = true;
  batch_.events.push_back(std::move(e));
}

void PageLearner::AddZero(std::string_view block, uint64_t offset, uint8_t fill, bool in_window) {
  Event e = NewEvent(block, offset, in_window);
  e.zero = true;
  e.fill = fill;
  batch_.events.push_back(std::move(e));
}

void PageLearner::SetDigest(size_t event, const PageDigest& d) {
  batch_.events[event].digest = d;
  batch_.events[event].has_digest = true;
}

void PageLearner::Submit() {
  if (batch_.events.empty()) return;
  batch_.pinned = pinned_;
  bool overloaded;
  {
    std::lock_guard lk(mu_);
    overloaded = !batch_.data.empty() && queued_bytes_ > 0 &&
                 queued_bytes_ + batch_.data.size() > opt_.max_queued_bytes;
  }
  if (overloaded) {
    // The worker is too far behind: never hold the stream for the store.
    // Hash here (END needs every digest) and hand over digests only.
    std::vector<uint32_t> need;
    for (uint32_t i = 0; i < batch_.events.size(); ++i)
      if (!batch_.events[i].zero && !batch_.events[i].has_digest) need.push_back(i);
    std::vector<uint8_t> pages;
    pages.reserve(need.size() * kStorePageSize);
    for (uint32_t i : need) {
      auto p = std::span<const uint8_t>(batch_.data)
                   .subspan(size_t(batch_.events[i].data) * kStorePageSize, kStorePageSize);
      pages.insert(pages.end(), p.begin(), p.end());
    }
    std::vector<PageDigest> d(need.size());
    inline_hasher_->HashMany(pages, d);
    for (size_t k = 0; k < need.size(); ++k) {
      batch_.events[need[k]].digest = d[k];
      batch_.events[need[k]].has_digest = true;
    }
    for (auto& e : batch_.events) e.data = kNoData;
    skipped_inline_ += batch_.data.size() / kStorePageSize;
    batch_.data.clear();
  }
  Batch next;
  {
    std::lock_guard lk(mu_);
    queued_bytes_ += batch_.data.size();
    ++submitted_;
    queue_.push_back(std::move(batch_));
    // Reuse a processed batch's buffers: a fresh 256 KiB vector per batch
    // would be a fresh mmap, i.e. a page fault per page copied into it.
    if (!spare_.empty()) {
      next = std::move(spare_.back());
      spare_.pop_back();
    }
  }
  cv_.notify_all();
  next.events.clear();
  next.data.clear();
  batch_ = std::move(next);
}

void PageLearner::Drain() {
  std::unique_lock lk(mu_);
  cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
}

reuse::EndFigures PageLearner::DrainForEnd() {
  Submit();
  std::unique_lock lk(mu_);
  rush_ = true;
  cv_.notify_all();
  cv_.wait(lk, [&] { return folded_ == submitted_; });
  rush_ = false;
  // The worker may still be storing the backlog, but it no longer touches
  // the END chain for anything submitted so far, and nothing submitted after
  // END is in the window.
  return end_acc_.Figures();
}

void PageLearner::WorkerLoop() {
  std::unique_lock lk(mu_);
  std::vector<Batch> rushed;
  std::vector<std::vector<PageDigest>> rushed_digests;
  while (true) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    busy_ = true;
    if (rush_) {
      // END is waiting (inside the downtime): hash the whole backlog and
      // fold it into the END chain first, let END go, then store it.
      rushed.clear();
      while (!queue_.empty()) {
        rushed.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      lk.unlock();
      rushed_digests.resize(rushed.size());
      for (size_t i = 0; i < rushed.size(); ++i) HashAndFold(rushed[i], rushed_digests[i]);
      lk.lock();
      folded_ += rushed.size();
      cv_.notify_all();
      lk.unlock();
      for (size_t i = 0; i < rushed.size(); ++i) StoreHashed(rushed[i]);
      lk.lock();
      for (auto& b : rushed) {
        queued_bytes_ -= b.data.size();
        if (spare_.size() < 4) spare_.push_back(std::move(b));
      }
      rushed.clear();
    } else {
      Batch b = std::move(queue_.front());
      queue_.pop_front();
      lk.unlock();
      Process(b);
      lk.lock();
      ++folded_;
      queued_bytes_ -= b.data.size();
      if (spare_.size() < 4) spare_.push_back(std::move(b));
    }
    busy_ = false;
    if (queue_.empty()) cv_.notify_all();
  }
}

size_t PageLearner::StoreBudget(size_t n, bool pinned) {
  if (!opt_.store || store_failed_) return 0;
  if (!pinned || opt_.quota_bytes == 0) return n;
  // Never grow past the quota (which would evict) while pinned. Conservative:
  // every page counted as new, plus room for a new segment's header.
  uint64_t bytes = opt_.store->stats().bytes + store_format::kRecordSize;
  if (bytes >= opt_.quota_bytes) return 0;
  return std::min<size_t>(n, (opt_.quota_bytes - bytes) / store_format::kRecordSize);
}

void PageLearner::HashAndLearn(std::span<const uint8_t> pages, std::span<PageDigest> out,
                               bool pinned) {
  size_t n = out.size();
  size_t k = StoreBudget(n, pinned);
  if (k > 0) {
    auto r = opt_.store->PutMany(pages.first(k * kStorePageSize));
    if (r) {
      std::copy(r->begin(), r->end(), out.begin());
      stored_ += k;
    } else {
      // Learning is best effort (a full disk must not fail a migration).
      spdlog::warn("{}: page store: {}; learning stops for this migration", opt_.who,
                   r.error().message());
      store_failed_ = true;
      k = 0;
    }
  }
  if (k < n) {
    worker_hasher_->HashMany(pages.subspan(k * kStorePageSize), out.subspan(k));
    if (opt_.store) skipped_ += n - k;
  }
}

void PageLearner::Process(Batch& b) {
  // 1. Digests for the pages that have none, in runs of consecutive data.
  const size_t np = b.data.size() / kStorePageSize;
  std::vector<PageDigest> digests(np);
  std::vector<bool> needs(np, false);
  std::vector<uint8_t> known;  // pages with a digest whose data the store may lack
  for (const auto& e : b.events) {
    if (e.zero || e.data == kNoData) continue;
    if (!e.has_digest) {
      needs[e.data] = true;
    } else if (opt_.store && !store_failed_ && !opt_.store->Contains(e.digest)) {
      auto p =
          std::span<const uint8_t>(b.data).subspan(size_t(e.data) * kStorePageSize, kStorePageSize);
      known.insert(known.end(), p.begin(), p.end());
    }
  }
  for (size_t i = 0; i < np;) {
    if (!needs[i]) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < np && needs[j]) ++j;
    HashAndLearn(
        std::span<const uint8_t>(b.data).subspan(i * kStorePageSize, (j - i) * kStorePageSize),
        std::span<PageDigest>(digests).subspan(i, j - i), b.pinned);
    i = j;
  }
  StoreKnown(known, b.pinned);
  // 2. The END page chain and the manifest, in stream order.
  Fold(b, digests);
}

void PageLearner::StoreKnown(std::span<const uint8_t> known, bool pinned) {
  if (known.empty()) return;
  size_t n = known.size() / kStorePageSize;
  size_t k = StoreBudget(n, pinned);
  if (k > 0) {
    if (auto r = opt_.store->PutMany(known.first(k * kStorePageSize)))
      stored_ += k;
    else
      store_failed_ = true;
  }
  skipped_ += n - k;
}

void PageLearner::Fold(const Batch& b, const std::vector<PageDigest>& digests) {
  for (const auto& e : b.events) {
    if (e.zero) {
      if (e.in_window) end_acc_.Zero(e.block, e.offset, e.fill);
      manifest_.Erase(e.block, e.offset);
      continue;
    }
    const PageDigest& d = e.has_digest ? e.digest : digests[e.data];
    if (e.in_window) end_acc_.Page(e.block, e.offset, d);
    manifest_.Set(e.block, e.offset, d);
  }
}

void PageLearner::HashAndFold(Batch& b, std::vector<PageDigest>& digests) {
  const size_t np = b.data.size() / kStorePageSize;
  digests.assign(np, PageDigest{});
  std::vector<bool> needs(np, false);
  for (const auto& e : b.events)
    if (!e.zero && e.data != kNoData && !e.has_digest) needs[e.data] = true;
  for (size_t i = 0; i < np;) {
    if (!needs[i]) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < np && needs[j]) ++j;
    worker_hasher_->HashMany(
        std::span<const uint8_t>(b.data).subspan(i * kStorePageSize, (j - i) * kStorePageSize),
        std::span<PageDigest>(digests).subspan(i, j - i));
    i = j;
  }
  Fold(b, digests);
}

void PageLearner::StoreHashed(Batch& b) {
  // As Process() does, with the digests already folded: the pages that came
  // without a digest go to PutMany (which hashes them again: only the
  // backlog at END takes this path), those with one only if the store
  // lacks them.
  if (!opt_.store) return;
  std::vector<uint8_t> fresh, known;
  for (const auto& e : b.events) {
    if (e.zero || e.data == kNoData) continue;
    auto p =
        std::span<const uint8_t>(b.data).subspan(size_t(e.data) * kStorePageSize, kStorePageSize);
    if (!e.has_digest)
      fresh.insert(fresh.end(), p.begin(), p.end());
    else if (!store_failed_ && !opt_.store->Contains(e.digest))
      known.insert(known.end(), p.begin(), p.end());
  }
  if (!fresh.empty()) {
    size_t n = fresh.size() / kStorePageSize;
    size_t k = StoreBudget(n, b.pinned);
    if (k > 0) {
      if (auto r = opt_.store->PutMany(std::span<const uint8_t>(fresh).first(k * kStorePageSize))) {
        stored_ += k;
      } else {
        spdlog::warn("{}: page store: {}; learning stops for this migration", opt_.who,
                     r.error().message());
        store_failed_ = true;
        k = 0;
      }
    }
    skipped_ += n - k;
  }
  StoreKnown(known, b.pinned);
}

std::string DescribeEndMismatch(const reuse::EndFigures& mine, const reuse::EndFigures& theirs) {
  auto pair = [](uint64_t a, uint64_t b) {
    return std::to_string(a) + " here vs " + std::to_string(b) + " at the peer";
  };
  if (mine.pages != theirs.pages)
    return "page count differs (" + pair(mine.pages, theirs.pages) + ")";
  if (mine.zero_pages != theirs.zero_pages)
    return "zero-page count differs (" + pair(mine.zero_pages, theirs.zero_pages) + ")";
  if (mine.passthrough_bytes != theirs.passthrough_bytes)
    return "passthrough byte count differs (" +
           pair(mine.passthrough_bytes, theirs.passthrough_bytes) + ")";
  if (mine.passthrough_crc != theirs.passthrough_crc) return "passthrough CRC-32C differs";
  return "digest over the delivered pages (content, place, fill) differs";
}

}  // namespace detail

}  // namespace kagemusha::memcache

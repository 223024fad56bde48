// memtool: the guest-side memory witness of the migration tests.
//
// Runs inside the test guest (linked statically; the initramfs has no libc).
// `memtool fill SIZE_MB SEED` starts a daemon that owns SIZE_MB of anonymous
// memory filled with a pattern derived from (SEED, page index, generation)
// and keeps one checksum per 4 KiB page. `memtool verify` asks the daemon to
// recompute every page and compare it with the expected checksum; the answer
// is "OK ..." (exit 0) or "BAD ..." (exit 1). `memtool dirty PCT` makes the
// daemon rewrite PCT percent of its pages per second with the next
// generation of the pattern, updating the expected checksum under the same
// lock, so a verify after a migration that happened during dirtying still
// has an exact expectation for every page.
//
// The checksum table lives in guest memory too. verify therefore also
// regenerates the expected pattern of each page from (seed, page,
// generation) and counts table entries that disagree ("table_bad"): a
// migration that damages either the data or the table is caught.
//
// Protocol (one request line, one reply line) on a Unix stream socket,
// default /run/memtool.sock: "verify", "dirty PCT", "status",
// "corrupt N" (testing the tester: flips a byte in N pages without updating
// their checksums), "stop". Thread-safety: one mutex guards pages, generations
// and checksums; the dirtier and verify take it per batch of pages.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr std::size_t kPageSize = 4096;
constexpr std::size_t kWordsPerPage = kPageSize / sizeof(std::uint64_t);
constexpr const char* kDefaultSocket = "/run/memtool.sock";

std::uint64_t SplitMix(std::uint64_t& state) {
  state += 0x9e3779b97f4a7c15ULL;
  std::uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// The pattern of one page in one generation: an xorshift64 stream whose
// start depends on all three inputs.
class PagePattern {
 public:
  PagePattern(std::uint64_t seed, std::uint64_t page, std::uint32_t generation) {
    std::uint64_t s = seed ^ (page * 0xd1b54a32d192ed03ULL) ^ (std::uint64_t{generation} << 44);
    state_ = SplitMix(s) | 1;  // xorshift must not start at 0
  }
  std::uint64_t Next() {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return state_;
  }

 private:
  std::uint64_t state_;
};

// Each step (xor a word, multiply by an odd constant, xor-shift) is a
// bijection of the running state, so any change of a single word changes
// the result.
std::uint64_t PageChecksum(const std::uint64_t* words) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::size_t i = 0; i < kWordsPerPage; ++i) {
    h ^= words[i];
    h *= 0x100000001b3ULL;
    h ^= h >> 29;
  }
  return h;
}

std::uint64_t FillPage(std::uint64_t* words, std::uint64_t seed, std::uint64_t page,
                       std::uint32_t gen) {
  PagePattern pattern(seed, page, gen);
  for (std::size_t i = 0; i < kWordsPerPage; ++i) words[i] = pattern.Next();
  return PageChecksum(words);
}

std::uint64_t ExpectedChecksum(std::uint64_t seed, std::uint64_t page, std::uint32_t gen) {
  std::uint64_t words[kWordsPerPage];
  return FillPage(words, seed, page, gen);
}

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

class MemoryWitness {
 public:
  MemoryWitness(std::uint8_t* base, std::size_t pages, std::uint64_t seed)
      : base_(base), pages_(pages), seed_(seed), generation_(pages, 0), checksum_(pages, 0) {}

  void FillAll() {
    std::lock_guard lock(mu_);
    for (std::size_t p = 0; p < pages_; ++p) checksum_[p] = FillPage(Page(p), seed_, p, 0);
  }

  std::string Verify() {
    const double start = NowSeconds();
    std::size_t bad = 0, table_bad = 0, first_bad = pages_;
    constexpr std::size_t kBatch = 256;
    for (std::size_t p0 = 0; p0 < pages_; p0 += kBatch) {
      std::lock_guard lock(mu_);
      for (std::size_t p = p0; p < std::min(pages_, p0 + kBatch); ++p) {
        if (PageChecksum(Page(p)) != checksum_[p]) {
          ++bad;
          first_bad = std::min(first_bad, p);
        }
        if (ExpectedChecksum(seed_, p, generation_[p]) != checksum_[p]) ++table_bad;
      }
    }
    std::uint64_t max_gen = 0;
    {
      std::lock_guard lock(mu_);
      for (auto g : generation_) max_gen = std::max<std::uint64_t>(max_gen, g);
    }
    char line[256];
    const bool ok = bad == 0 && table_bad == 0;
    std::snprintf(
        line, sizeof line,
        "%s pages=%zu bad=%zu table_bad=%zu first_bad=%ld dirtied=%llu max_gen=%llu ms=%.0f",
        ok ? "OK" : "BAD", pages_, bad, table_bad,
        first_bad == pages_ ? -1L : static_cast<long>(first_bad),
        static_cast<unsigned long long>(dirtied_.load()), static_cast<unsigned long long>(max_gen),
        (NowSeconds() - start) * 1000);
    return line;
  }

  // Rewrites `count` pages chosen by `rng` with their next generation.
  void DirtySome(std::size_t count, std::uint64_t& rng) {
    constexpr std::size_t kBatch = 64;
    while (count > 0) {
      const std::size_t n = std::min(count, kBatch);
      std::lock_guard lock(mu_);
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t p = SplitMix(rng) % pages_;
        checksum_[p] = FillPage(Page(p), seed_, p, ++generation_[p]);
      }
      dirtied_ += n;
      count -= n;
    }
  }

  // Flips one byte in `count` pages spread over the region, leaving the
  // expected checksums alone: the next verify must report them.
  std::size_t Corrupt(std::size_t count) {
    count = std::min(count, pages_);
    std::lock_guard lock(mu_);
    for (std::size_t i = 0; i < count; ++i) {
      const std::size_t p = i * pages_ / count;
      Page(p)[1234 % kWordsPerPage] ^= 0x5a;
    }
    return count;
  }

  std::size_t pages() const { return pages_; }
  std::uint64_t dirtied() const { return dirtied_.load(); }

 private:
  std::uint64_t* Page(std::size_t p) {
    return reinterpret_cast<std::uint64_t*>(base_ + p * kPageSize);
  }

  std::uint8_t* const base_;
  const std::size_t pages_;
  const std::uint64_t seed_;
  std::mutex mu_;
  std::vector<std::uint32_t> generation_;  // GUARDED_BY(mu_)
  std::vector<std::uint64_t> checksum_;    // GUARDED_BY(mu_)
  std::atomic<std::uint64_t> dirtied_{0};
};

// Rewrites a share of the pages every tick so that the long-run rate is
// `percent_per_sec`; after a pause (e.g. the VM stopped for migration) it
// catches up at most half a second's worth.
class Dirtier {
 public:
  Dirtier(MemoryWitness& witness, std::uint64_t seed) : witness_(witness), rng_(seed ^ 0x5eed) {}
  ~Dirtier() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  void SetRate(double percent_per_sec) {
    rate_.store(percent_per_sec);
    if (!thread_.joinable()) thread_ = std::thread([this] { Run(); });
  }
  double rate() const { return rate_.load(); }

 private:
  void Run() {
    double last = NowSeconds(), due = 0;
    while (!stop_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const double now = NowSeconds();
      const double per_sec = rate_.load() / 100.0 * static_cast<double>(witness_.pages());
      due = std::min(due + per_sec * (now - last), per_sec * 0.5 + 1);
      last = now;
      const auto n = static_cast<std::size_t>(due);
      if (n > 0) {
        witness_.DirtySome(n, rng_);
        due -= static_cast<double>(n);
      }
    }
  }

  MemoryWitness& witness_;
  std::uint64_t rng_;
  std::atomic<double> rate_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

int Usage() {
  std::fprintf(
      stderr,
      "usage: memtool fill SIZE_MB SEED      start the daemon: allocate, mlock, fill, keep "
      "checksums\n"
      "       memtool verify                 recheck every page: OK (exit 0) or BAD (exit 1)\n"
      "       memtool dirty PERCENT_PER_SEC  rewrite that share of the pages per second (0 stops)\n"
      "       memtool status                 size, dirty rate, pages dirtied so far\n"
      "       memtool stop                   end the daemon\n"
      "       memtool selftest-corrupt [N]   (tests only) flip a byte in N pages behind the "
      "checksums\n"
      "environment: MEMTOOL_SOCKET (default %s)\n",
      kDefaultSocket);
  return 2;
}

const char* SocketPath() {
  const char* p = std::getenv("MEMTOOL_SOCKET");
  return p && *p ? p : kDefaultSocket;
}

bool MakeAddress(sockaddr_un& addr) {
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  const char* path = SocketPath();
  if (std::strlen(path) >= sizeof addr.sun_path) return false;
  std::strcpy(addr.sun_path, path);
  return true;
}

int ConnectDaemon() {
  sockaddr_un addr;
  if (!MakeAddress(addr)) return -1;
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

bool WriteAll(int fd, const std::string& s) {
  std::size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += static_cast<std::size_t>(n);
  }
  return true;
}

std::string ReadLine(int fd) {
  std::string line;
  char c;
  while (line.size() < 4096) {
    const ssize_t n = read(fd, &c, 1);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0 || c == '\n') break;
    line += c;
  }
  return line;
}

// Client side of every command except fill.
int Request(const std::string& request) {
  const int fd = ConnectDaemon();
  if (fd < 0) {
    std::fprintf(stderr, "memtool: no daemon on %s (start one with: memtool fill SIZE_MB SEED)\n",
                 SocketPath());
    return 2;
  }
  if (!WriteAll(fd, request + "\n")) {
    std::fprintf(stderr, "memtool: writing to the daemon: %s\n", std::strerror(errno));
    close(fd);
    return 2;
  }
  const std::string reply = ReadLine(fd);
  close(fd);
  if (reply.empty()) {
    std::fprintf(stderr, "memtool: the daemon closed the connection without answering\n");
    return 2;
  }
  std::printf("%s\n", reply.c_str());
  if (reply.rfind("BAD", 0) == 0) return 1;
  if (reply.rfind("ERR", 0) == 0) return 2;
  return 0;
}

bool ParseDouble(const char* s, double& out) {
  char* end = nullptr;
  errno = 0;
  out = std::strtod(s, &end);
  return errno == 0 && end != s && *end == '\0' && std::isfinite(out);
}

bool ParseU64(const char* s, std::uint64_t& out) {
  char* end = nullptr;
  errno = 0;
  out = std::strtoull(s, &end, 0);
  return errno == 0 && end != s && *end == '\0';
}

// Serves requests until "stop". Runs in the daemon (stdio is /dev/null).
void Serve(int listen_fd, MemoryWitness& witness, Dirtier& dirtier, std::uint64_t seed) {
  for (;;) {
    const int fd = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;
    }
    const std::string req = ReadLine(fd);
    std::string reply;
    bool stop = false;
    char buf[256];
    if (req == "verify") {
      reply = witness.Verify();
    } else if (req.rfind("dirty ", 0) == 0) {
      double pct;
      if (ParseDouble(req.c_str() + 6, pct) && pct >= 0 && pct <= 10000) {
        dirtier.SetRate(pct);
        std::snprintf(buf, sizeof buf, "DIRTY percent_per_sec=%g", pct);
        reply = buf;
      } else {
        reply = "ERR dirty wants a percentage per second (0..10000)";
      }
    } else if (req == "status") {
      std::snprintf(
          buf, sizeof buf,
          "STATUS pages=%zu size_mb=%zu seed=%llu dirty_percent_per_sec=%g dirtied=%llu pid=%d",
          witness.pages(), witness.pages() * kPageSize >> 20, static_cast<unsigned long long>(seed),
          dirtier.rate(), static_cast<unsigned long long>(witness.dirtied()),
          static_cast<int>(getpid()));
      reply = buf;
    } else if (req.rfind("corrupt ", 0) == 0) {
      std::uint64_t n;
      if (ParseU64(req.c_str() + 8, n) && n > 0) {
        std::snprintf(buf, sizeof buf, "CORRUPTED pages=%zu", witness.Corrupt(n));
        reply = buf;
      } else {
        reply = "ERR corrupt wants a page count > 0";
      }
    } else if (req == "stop") {
      // Gone before the reply, so a client that saw STOPPED finds no daemon.
      close(listen_fd);
      unlink(SocketPath());
      reply = "STOPPED";
      stop = true;
    } else {
      reply = "ERR unknown request '" + req + "'";
    }
    WriteAll(fd, reply + "\n");
    close(fd);
    if (stop) return;
  }
}

// Forks the daemon and returns when it has filled its memory and listens
// (or has failed, with its reason).
int Fill(std::uint64_t size_mb, std::uint64_t seed) {
  if (size_mb == 0 || size_mb > (1u << 20)) {
    std::fprintf(stderr, "memtool: SIZE_MB must be 1..1048576\n");
    return 2;
  }
  if (const int fd = ConnectDaemon(); fd >= 0) {
    close(fd);
    std::fprintf(stderr, "memtool: a daemon already serves %s (memtool stop first)\n",
                 SocketPath());
    return 2;
  }
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) {
    std::perror("memtool: pipe");
    return 2;
  }
  const pid_t pid = fork();
  if (pid < 0) {
    std::perror("memtool: fork");
    return 2;
  }
  if (pid > 0) {
    close(pipefd[1]);
    const std::string report = ReadLine(pipefd[0]);
    close(pipefd[0]);
    if (report.rfind("READY", 0) != 0) {
      std::fprintf(stderr, "memtool: daemon failed: %s\n",
                   report.empty() ? "(died)" : report.c_str());
      return 2;
    }
    std::printf("%s\n", report.c_str());
    return 0;
  }
  // The daemon.
  close(pipefd[0]);
  setsid();
  auto fail = [&](const char* what) {
    const std::string msg = std::string("ERR ") + what + ": " + std::strerror(errno) + "\n";
    WriteAll(pipefd[1], msg);
    _exit(1);
  };
  const double start = NowSeconds();
  const std::size_t pages = size_mb * (1024 * 1024 / kPageSize);
  void* base = mmap(nullptr, pages * kPageSize, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (base == MAP_FAILED) fail("mmap");
  // Keeps the witness resident; the guest has no swap, so failure is harmless.
  const bool locked = mlock(base, pages * kPageSize) == 0;
  MemoryWitness witness(static_cast<std::uint8_t*>(base), pages, seed);
  witness.FillAll();
  sockaddr_un addr;
  if (!MakeAddress(addr)) fail("socket path too long");
  unlink(addr.sun_path);
  const int listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd < 0) fail("socket");
  if (bind(listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) fail("bind");
  if (listen(listen_fd, 8) != 0) fail("listen");
  const int devnull = open("/dev/null", O_RDWR);
  if (devnull >= 0) {
    dup2(devnull, 0);
    dup2(devnull, 1);
    dup2(devnull, 2);
    if (devnull > 2) close(devnull);
  }
  char report[256];
  std::snprintf(report, sizeof report,
                "READY size_mb=%llu pages=%zu seed=%llu mlocked=%s fill_ms=%.0f pid=%d\n",
                static_cast<unsigned long long>(size_mb), pages,
                static_cast<unsigned long long>(seed), locked ? "yes" : "no",
                (NowSeconds() - start) * 1000, static_cast<int>(getpid()));
  WriteAll(pipefd[1], report);
  close(pipefd[1]);
  {
    Dirtier dirtier(witness, seed);
    Serve(listen_fd, witness, dirtier, seed);
  }
  _exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return Usage();
  const std::string cmd = argv[1];
  std::uint64_t a = 0, b = 0;
  double pct = 0;
  if (cmd == "fill" && argc == 4 && ParseU64(argv[2], a) && ParseU64(argv[3], b)) return Fill(a, b);
  if (cmd == "verify" && argc == 2) return Request("verify");
  if (cmd == "dirty" && argc == 3 && ParseDouble(argv[2], pct))
    return Request(std::string("dirty ") + argv[2]);
  if (cmd == "status" && argc == 2) return Request("status");
  if (cmd == "stop" && argc == 2) return Request("stop");
  if (cmd == "selftest-corrupt" && (argc == 2 || (argc == 3 && ParseU64(argv[2], a)))) {
    return Request("corrupt " + std::to_string(argc == 3 ? a : 1));
  }
  return Usage();
}

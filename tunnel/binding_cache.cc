// BindingCache and BindingJournal: see binding_cache.h.
#include "kagemusha/tunnel/binding_cache.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <sstream>

namespace kagemusha::tunnel {

size_t Ipv6AddressHash::operator()(const Ipv6Address& a) const noexcept {
  uint64_t hi = 0;
  uint64_t lo = 0;
  std::memcpy(&hi, a.data(), 8);
  std::memcpy(&lo, a.data() + 8, 8);
  // splitmix64-style mixing: home addresses in one /64 differ only in `lo`.
  uint64_t x = hi * 0x9E3779B97F4A7C15ULL ^ lo;
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return size_t(x);
}

bool SequenceNewer(uint16_t a, uint16_t b) {
  uint16_t d = uint16_t(a - b);
  return d != 0 && d < 0x8000;
}

const char* CacheEntryStateName(CacheEntryState s) {
  switch (s) {
    case CacheEntryState::kActive:
      return "active";
    case CacheEntryState::kOptimistic:
      return "optimistic";
  }
  return "?";
}

// ---- BindingCache ------------------------------------------------------------------

const CacheEntry* BindingCache::Find(const Ipv6Address& home_address) const {
  auto it = by_home_.find(home_address);
  return it == by_home_.end() ? nullptr : &it->second;
}

const CacheEntry* BindingCache::FindByHomeAddress4(const Ipv4Address& home_address4) const {
  auto it = by_home4_.find(Key4(home_address4));
  return it == by_home4_.end() ? nullptr : Find(it->second);
}

void BindingCache::Unindex(const CacheEntry& b) {
  by_expiry_.erase({b.expires, b.home_address});
  if (b.home_address4) {
    auto it = by_home4_.find(Key4(*b.home_address4));
    if (it != by_home4_.end() && it->second == b.home_address) by_home4_.erase(it);
  }
}

Status BindingCache::Upsert(const CacheEntry& b) {
  auto it = by_home_.find(b.home_address);
  if (it == by_home_.end() && by_home_.size() >= max_bindings_) {
    return Fail(
        Error::NoSpace("binding cache full (" + std::to_string(max_bindings_) + " bindings)"));
  }
  if (b.home_address4) {
    auto v4 = by_home4_.find(Key4(*b.home_address4));
    if (v4 != by_home4_.end() && v4->second != b.home_address) {
      return Fail(Error(EADDRINUSE, "IPv4 home address " + FormatIpv4(*b.home_address4) +
                                        " is bound to " + FormatIpv6(v4->second)));
    }
  }
  if (it != by_home_.end()) {
    Unindex(it->second);
    it->second = b;
  } else {
    by_home_.emplace(b.home_address, b);
  }
  by_expiry_.insert({b.expires, b.home_address});
  if (b.home_address4) by_home4_[Key4(*b.home_address4)] = b.home_address;
  ++generation_;
  return Ok();
}

bool BindingCache::SetState(const Ipv6Address& home_address, CacheEntryState state) {
  auto it = by_home_.find(home_address);
  if (it == by_home_.end()) return false;
  it->second.state = state;
  ++generation_;
  return true;
}

bool BindingCache::Remove(const Ipv6Address& home_address) {
  auto it = by_home_.find(home_address);
  if (it == by_home_.end()) return false;
  Unindex(it->second);
  by_home_.erase(it);
  ++generation_;
  return true;
}

std::vector<CacheEntry> BindingCache::Expire(Clock::TimePoint now) {
  std::vector<CacheEntry> out;
  while (!by_expiry_.empty() && by_expiry_.begin()->first <= now) {
    Ipv6Address hoa = by_expiry_.begin()->second;
    auto it = by_home_.find(hoa);
    if (it == by_home_.end()) {  // cannot happen; keep the index consistent anyway
      by_expiry_.erase(by_expiry_.begin());
      continue;
    }
    out.push_back(it->second);
    Unindex(it->second);
    by_home_.erase(it);
  }
  if (!out.empty()) ++generation_;
  return out;
}

std::optional<Clock::TimePoint> BindingCache::NextExpiry() const {
  if (by_expiry_.empty()) return std::nullopt;
  return by_expiry_.begin()->first;
}

void BindingCache::ForEach(const std::function<void(const CacheEntry&)>& f) const {
  for (const auto& [when, hoa] : by_expiry_) {
    auto it = by_home_.find(hoa);
    if (it != by_home_.end()) f(it->second);
  }
}

// ---- Text forms ---------------------------------------------------------------------

Result<Ipv6Address> ParseIpv6(const std::string& text) {
  Ipv6Address a{};
  if (inet_pton(AF_INET6, text.c_str(), a.data()) != 1) {
    return Fail(Error::Invalid("'" + text + "' is not an IPv6 address"));
  }
  return a;
}

Result<Ipv4Address> ParseIpv4(const std::string& text) {
  Ipv4Address a{};
  if (inet_pton(AF_INET, text.c_str(), a.data()) != 1) {
    return Fail(Error::Invalid("'" + text + "' is not an IPv4 address"));
  }
  return a;
}

// ---- Journal ------------------------------------------------------------------------

namespace {

constexpr const char* kHeader = "kagemusha-ha-bindings 1";

Status WriteAll(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Fail(Error::Errno(errno, "write"));
    }
    off += size_t(n);
  }
  return Ok();
}

std::vector<std::string> Split(const std::string& line) {
  std::vector<std::string> out;
  std::istringstream in(line);
  std::string w;
  while (in >> w) out.push_back(w);
  return out;
}

template <class T>
bool ParseUnsigned(const std::string& s, T max, T* out) {
  if (s.empty() || s.size() > 20) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + uint64_t(c - '0');
    if (v > uint64_t(max)) return false;
  }
  *out = T(v);
  return true;
}

}  // namespace

std::string FormatJournalUpsert(const PersistedBinding& b) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%u %u %u %" PRId64, unsigned(b.sequence), unsigned(b.flags),
                unsigned(b.granted_seconds), b.expires_unix_ms);
  return "B " + FormatIpv6(b.home_address) + " " + FormatIpv6(b.care_of) + " " + buf + " " +
         (b.home_address4 ? FormatIpv4(*b.home_address4) : std::string("-")) + " " +
         std::to_string(b.spi);
}

Result<PersistedBinding> ParseJournalUpsert(const std::string& line) {
  auto w = Split(line);
  if (w.size() != 9 || w[0] != "B") return Fail(Error::Protocol("not a binding record"));
  PersistedBinding b;
  auto hoa = ParseIpv6(w[1]);
  auto coa = ParseIpv6(w[2]);
  if (!hoa || !coa) return Fail(Error::Protocol("bad address in binding record"));
  b.home_address = *hoa;
  b.care_of = *coa;
  uint64_t expires = 0;
  if (!ParseUnsigned<uint16_t>(w[3], 0xffff, &b.sequence) ||
      !ParseUnsigned<uint16_t>(w[4], 0xffff, &b.flags) ||
      !ParseUnsigned<uint32_t>(w[5], 0xffffffffu, &b.granted_seconds) ||
      !ParseUnsigned<uint64_t>(w[6], uint64_t(INT64_MAX), &expires) ||
      !ParseUnsigned<uint32_t>(w[8], 0xffffffffu, &b.spi)) {
    return Fail(Error::Protocol("bad number in binding record"));
  }
  b.expires_unix_ms = int64_t(expires);
  if (w[7] != "-") {
    auto v4 = ParseIpv4(w[7]);
    if (!v4) return Fail(Error::Protocol("bad IPv4 home address in binding record"));
    b.home_address4 = *v4;
  }
  return b;
}

Result<std::unique_ptr<BindingJournal>> BindingJournal::Open(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) < 0 && errno != EEXIST) {
    return Fail(Error::Errno(errno, "creating state directory " + dir));
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) < 0) return Fail(Error::Errno(errno, "state directory " + dir));
  if (!S_ISDIR(st.st_mode)) return Fail(Error::Invalid(dir + " is not a directory"));
  std::string path = dir + "/" + kFileName;
  int fd = ::open(path.c_str(), O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return Fail(Error::Errno(errno, "opening " + path));
  if (::fstat(fd, &st) < 0) {
    int e = errno;
    ::close(fd);
    return Fail(Error::Errno(e, "stat " + path));
  }
  if (st.st_mode & 077) {
    ::close(fd);
    return Fail(Error::Permission(path + " is accessible by group or others (mode " +
                                  std::to_string(st.st_mode & 0777) +
                                  " octal-as-decimal); chmod 600 it"));
  }
  std::unique_ptr<BindingJournal> j(new BindingJournal(dir, path, fd));
  if (st.st_size == 0) {
    if (auto s = j->AppendLine(kHeader); !s) return Fail(s.error());
    j->appended_ = 0;
  }
  return j;
}

BindingJournal::~BindingJournal() {
  if (fd_ >= 0) ::close(fd_);
}

Result<BindingJournal::Loaded> BindingJournal::Load() const {
  FILE* f = std::fopen(path_.c_str(), "re");
  if (!f) return Fail(Error::Errno(errno, "reading " + path_));
  Loaded out;
  std::unordered_map<Ipv6Address, PersistedBinding, Ipv6AddressHash> live;
  std::vector<Ipv6Address> order;
  char* raw = nullptr;
  size_t cap = 0;
  ssize_t n;
  bool first = true;
  while ((n = ::getline(&raw, &cap, f)) >= 0) {
    std::string line(raw, size_t(n));
    bool complete = !line.empty() && line.back() == '\n';
    if (complete) line.pop_back();
    if (first) {
      first = false;
      if (line != kHeader) {
        std::free(raw);
        std::fclose(f);
        return Fail(Error::Protocol(path_ + ": not a version 1 binding journal (first line '" +
                                    line + "')"));
      }
      continue;
    }
    if (!complete) {  // a torn final write
      ++out.bad_lines;
      continue;
    }
    if (line.rfind("B ", 0) == 0) {
      auto b = ParseJournalUpsert(line);
      if (!b) {
        ++out.bad_lines;
        continue;
      }
      if (!live.count(b->home_address)) order.push_back(b->home_address);
      live[b->home_address] = *b;
      ++out.records;
    } else if (line.rfind("D ", 0) == 0) {
      auto hoa = ParseIpv6(line.substr(2));
      if (!hoa) {
        ++out.bad_lines;
        continue;
      }
      live.erase(*hoa);
      ++out.records;
    } else {
      ++out.bad_lines;
    }
  }
  std::free(raw);
  std::fclose(f);
  for (const auto& hoa : order) {
    auto it = live.find(hoa);
    if (it != live.end()) {
      out.bindings.push_back(it->second);
      live.erase(it);  // a re-added address appears once
    }
  }
  return out;
}

Status BindingJournal::AppendLine(const std::string& line) {
  if (auto s = WriteAll(fd_, line + "\n"); !s) return Fail(s.error().Context(path_));
  if (::fdatasync(fd_) < 0) return Fail(Error::Errno(errno, "fdatasync " + path_));
  ++appended_;
  return Ok();
}

Status BindingJournal::AppendUpsert(const PersistedBinding& b) {
  return AppendLine(FormatJournalUpsert(b));
}

Status BindingJournal::AppendRemove(const Ipv6Address& home_address) {
  return AppendLine("D " + FormatIpv6(home_address));
}

Status BindingJournal::Compact(const std::vector<PersistedBinding>& live) {
  std::string tmp = path_ + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Fail(Error::Errno(errno, "creating " + tmp));
  std::string text = std::string(kHeader) + "\n";
  for (const auto& b : live) text += FormatJournalUpsert(b) + "\n";
  Status s = WriteAll(fd, text);
  if (s && ::fsync(fd) < 0) s = Fail(Error::Errno(errno, "fsync " + tmp));
  ::close(fd);
  if (!s) {
    ::unlink(tmp.c_str());
    return s;
  }
  if (::rename(tmp.c_str(), path_.c_str()) < 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    return Fail(Error::Errno(e, "renaming " + tmp));
  }
  int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  int nfd = ::open(path_.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
  if (nfd < 0) return Fail(Error::Errno(errno, "reopening " + path_));
  ::close(fd_);
  fd_ = nfd;
  appended_ = 0;
  return Ok();
}

}  // namespace kagemusha::tunnel

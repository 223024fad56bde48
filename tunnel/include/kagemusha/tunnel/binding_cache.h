// The home agent's binding cache (RFC 6275 §9.1, §10.1) and its on-disk
// journal: pure bookkeeping, no packets and no sockets.
//
//   BindingCache    home address -> binding, O(1) lookup through a hash map,
//                   plus an ordered expiry index (std::set keyed by
//                   (expiry, home address)) so expiring bindings costs
//                   O(log n) per binding and never scans the table; an IPv4
//                   home address index (RFC 5555) for proxy ARP and 4in6.
//   SequenceNewer   RFC 6275 §9.5.1 sequence comparison modulo 2^16.
//   BindingJournal  persistence in --state-dir: an append-only text journal
//                   (one record a line, file mode 0600) that is compacted by
//                   writing a snapshot to a temporary file, fsync, rename.
//                   Times are stored as wall-clock (Unix) milliseconds,
//                   because the steady clock restarts with the process.
//
// Thread-safety: none; the home agent owns one cache and one journal and uses
// them from its event-loop thread only.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kagemusha/common/clock.h"
#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/ip_packet.h"

namespace kagemusha::tunnel {

struct Ipv6AddressHash {
  size_t operator()(const Ipv6Address& a) const noexcept;
};

// True when `a` is newer than `b` in the RFC 6275 §9.5.1 sense: a != b and
// (a - b) mod 2^16 < 2^15. (So 0 is newer than 65535, and 32768 steps ahead
// counts as older.)
bool SequenceNewer(uint16_t a, uint16_t b);

enum class CacheEntryState {
  kActive,      // accepted; proxied and tunnelled
  kOptimistic,  // accepted while the background DAD probe runs (RFC 4429 spirit)
};
const char* CacheEntryStateName(CacheEntryState s);

struct CacheEntry {
  Ipv6Address home_address{};
  Ipv6Address care_of{};
  uint16_t sequence = 0;
  uint16_t flags = 0;  // bu_flag bits of the accepted BU (L: proxy the link-local too)
  std::chrono::seconds granted_lifetime{0};
  Clock::TimePoint expires{};
  std::optional<Ipv4Address> home_address4;  // RFC 5555 IPv4 home address
  CacheEntryState state = CacheEntryState::kActive;
  // The MN-HA security association the binding was authenticated with (0:
  // --insecure). Used to authenticate the BA of a later refresh.
  uint32_t spi = 0;
};

class BindingCache {
 public:
  explicit BindingCache(size_t max_bindings = 1 << 20) : max_bindings_(max_bindings) {}

  const CacheEntry* Find(const Ipv6Address& home_address) const;
  const CacheEntry* FindByHomeAddress4(const Ipv4Address& home_address4) const;
  // Inserts or replaces the binding for b.home_address. Fails with ENOSPC when
  // a new binding would exceed max_bindings; fails with EADDRINUSE when
  // b.home_address4 is bound to another home address.
  Status Upsert(const CacheEntry& b);
  // Changes only the state of an existing binding.
  bool SetState(const Ipv6Address& home_address, CacheEntryState state);
  bool Remove(const Ipv6Address& home_address);
  // Removes and returns every binding whose expiry is <= now, earliest first.
  std::vector<CacheEntry> Expire(Clock::TimePoint now);
  std::optional<Clock::TimePoint> NextExpiry() const;
  size_t size() const { return by_home_.size(); }
  size_t max_bindings() const { return max_bindings_; }
  // Visits every binding in expiry order.
  void ForEach(const std::function<void(const CacheEntry&)>& f) const;
  // Changes with every successful Upsert, SetState, Remove and Expire that
  // removed something: a mirror of the cache (the fast path's kernel map)
  // resynchronises only when it moved.
  uint64_t generation() const { return generation_; }

 private:
  static uint32_t Key4(const Ipv4Address& a) {
    return uint32_t(a[0]) << 24 | uint32_t(a[1]) << 16 | uint32_t(a[2]) << 8 | a[3];
  }
  void Unindex(const CacheEntry& b);

  size_t max_bindings_;
  std::unordered_map<Ipv6Address, CacheEntry, Ipv6AddressHash> by_home_;
  std::unordered_map<uint32_t, Ipv6Address> by_home4_;
  std::set<std::pair<Clock::TimePoint, Ipv6Address>> by_expiry_;
  uint64_t generation_ = 0;
};

// ---- Persistence -----------------------------------------------------------------

using WallClock = std::function<std::chrono::system_clock::time_point()>;

// A binding as stored: the expiry is absolute wall-clock time.
struct PersistedBinding {
  Ipv6Address home_address{};
  Ipv6Address care_of{};
  uint16_t sequence = 0;
  uint16_t flags = 0;
  uint32_t granted_seconds = 0;
  int64_t expires_unix_ms = 0;
  std::optional<Ipv4Address> home_address4;
  uint32_t spi = 0;
  bool operator==(const PersistedBinding&) const = default;
};

// File format, version 1 (docs/home-agent.md "State directory"):
//   kagemusha-ha-bindings 1
//   B <hoa> <coa> <seq> <flags> <granted_s> <expires_unix_ms> <hoa4|-> <spi>
//   D <hoa>
// A line that does not parse (a torn last write after a crash) is skipped
// and counted; later lines still apply.
class BindingJournal {
 public:
  static constexpr const char* kFileName = "bindings.journal";
  // Creates `dir` (0700) if missing and opens (creating, 0600) the journal.
  // Refuses a journal that is readable or writable by group or others.
  static Result<std::unique_ptr<BindingJournal>> Open(const std::string& dir);
  ~BindingJournal();
  BindingJournal(const BindingJournal&) = delete;
  BindingJournal& operator=(const BindingJournal&) = delete;

  struct Loaded {
    std::vector<PersistedBinding> bindings;  // the live set after replay
    size_t records = 0;
    size_t bad_lines = 0;
  };
  Result<Loaded> Load() const;
  Status AppendUpsert(const PersistedBinding& b);
  Status AppendRemove(const Ipv6Address& home_address);
  // Rewrites the journal as exactly `live` (temporary file, fsync, rename,
  // fsync of the directory), then appends to the new file.
  Status Compact(const std::vector<PersistedBinding>& live);
  // Records appended since the last compaction; the owner compacts when this
  // grows well past the number of live bindings.
  size_t appended_since_compaction() const { return appended_; }
  const std::string& path() const { return path_; }

 private:
  BindingJournal(std::string dir, std::string path, int fd)
      : dir_(std::move(dir)), path_(std::move(path)), fd_(fd) {}
  Status AppendLine(const std::string& line);
  std::string dir_;
  std::string path_;
  int fd_ = -1;
  size_t appended_ = 0;
};

// Exposed for tests: one record line (without the newline) and its parser.
std::string FormatJournalUpsert(const PersistedBinding& b);
Result<PersistedBinding> ParseJournalUpsert(const std::string& line);

// Text forms used by the journal and the CLI.
Result<Ipv6Address> ParseIpv6(const std::string& text);
Result<Ipv4Address> ParseIpv4(const std::string& text);

}  // namespace kagemusha::tunnel

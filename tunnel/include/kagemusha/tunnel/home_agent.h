// A user-space Mobile IPv6 home agent (RFC 6275 §10) for sites without UMIP
// or a MIP6-capable kernel: the logic behind `kagemusha-ha` (docs/home-agent.md).
//
//   HomeAgent       processes Binding Updates (RFC 6275 §10.3.1 checks and
//                   status codes, RFC 4285 MN-HA authentication, RFC 5555
//                   IPv4 home addresses), runs DAD on behalf of the mobile
//                   node (rfc / optimistic / off), proxies ND and ARP for
//                   bound home addresses on the home link, encapsulates
//                   home-link traffic for them to the care-of address and
//                   decapsulates what the mobile sends back (anti-spoofing:
//                   the inner source must be bound to the outer source).
//                   It never touches a socket: frames and packets go through
//                   the packet_io.h seams (HomeAgentPorts), time through
//                   Clock, so unit tests drive it with FakePacketPort and
//                   FakeClock.
//   BuRateLimiter   per-source token buckets in a bounded table.
//   LoadHomeKey     --key HOA:SPI:KEYFILE with the 0600 check.
//
// Thread-safety: a HomeAgent is used from one thread (the daemon's event
// loop). Status() returns a copy and may be called between events only; the
// CLI calls it from the loop thread through a mutex it owns.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kagemusha/common/clock.h"
#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/binding_cache.h"
#include "kagemusha/tunnel/ip_packet.h"
#include "kagemusha/tunnel/mh_auth.h"
#include "kagemusha/tunnel/mobility_header.h"
#include "kagemusha/tunnel/packet_io.h"

namespace kagemusha::tunnel {

enum class DadMode { kRfc, kOptimistic, kOff };
const char* DadModeName(DadMode m);
Result<DadMode> ParseDadMode(const std::string& text);

struct Ipv6Prefix {
  Ipv6Address prefix{};
  uint8_t length = 64;
  bool Contains(const Ipv6Address& a) const;
};
struct Ipv4Prefix {
  Ipv4Address prefix{};
  uint8_t length = 24;
  bool Contains(const Ipv4Address& a) const;
};
Result<Ipv6Prefix> ParseIpv6Prefix(const std::string& text);  // "2001:db8:a::/64"
Result<Ipv4Prefix> ParseIpv4Prefix(const std::string& text);  // "192.0.2.0/24"

// One MN-HA security association (RFC 4285): the key a home address's BUs
// are authenticated with, selected by SPI.
struct HomeKey {
  Ipv6Address home_address{};
  uint32_t spi = 0;
  std::vector<uint8_t> key;
  MhAuthAlgorithm algorithm = MhAuthAlgorithm::kHmacSha256_128;
};
// Parses HOA:SPI:KEYFILE (the home address may be bracketed: [HOA]:SPI:FILE)
// and reads the key file: hex text (an even number of hex digits, optional
// trailing newline) or otherwise raw bytes. Refuses a key file that group or
// others can read or write (it must be 0600 or stricter), an empty key and a
// key shorter than 16 bytes. Error messages never contain key material.
Result<HomeKey> LoadHomeKey(const std::string& spec);

// IPv4 counterpart of Ipv6RawSender (packet_io.h has none): a raw IPv4
// socket with IPPROTO_RAW (header included), so the kernel routes a whole
// IPv4 packet we built or decapsulated by its destination address.
class Ipv4RawSender final : public PacketSink {
 public:
  static Result<std::unique_ptr<Ipv4RawSender>> Open();
  ~Ipv4RawSender() override;
  Ipv4RawSender(const Ipv4RawSender&) = delete;
  Ipv4RawSender& operator=(const Ipv4RawSender&) = delete;
  Status Send(std::span<const uint8_t> packet) override;

 private:
  explicit Ipv4RawSender(int fd) : fd_(fd) {}
  int fd_ = -1;
};

struct HomeAgentConfig {
  Ipv6Address address{};  // the home agent's address (BU destination, tunnel endpoint)
  MacAddress mac{};       // the home link interface's MAC
  Ipv6Prefix home_prefix;
  std::optional<Ipv4Prefix> home_prefix4;
  std::optional<Ipv4Address> address4;  // the HA's IPv4 address on the home link
  // Home addresses allowed to register. Addresses with a key are allowed
  // too. When both lists are empty, every address in the home prefix is
  // allowed (authentication still applies unless `insecure`).
  std::vector<Ipv6Address> allow;
  std::vector<HomeKey> keys;
  bool insecure = false;  // accept BUs without RFC 4285 authentication
  DadMode dad = DadMode::kRfc;
  std::chrono::seconds max_lifetime{3600};
  double bu_rate = 10;  // BUs per second per source; the burst is the same number
  size_t rate_table_size = 4096;
  size_t max_bindings = 1 << 20;
  std::chrono::milliseconds retrans_timer{1000};  // RFC 4861 RetransTimer for DAD
  int dad_transmits = 1;                          // RFC 4862 DupAddrDetectTransmits
  // The home link's MTU. IPv4 TCP frames captured beyond it (segments a
  // receive offload, GRO on the home link, merged) are cut back into
  // segments of at most this size before the tunnel: the guest's link
  // would drop the merged packet.
  size_t link_mtu = 1500;
};
Status ValidateHomeAgentConfig(const HomeAgentConfig& config);

// Where the home agent's output goes. Every pointer must be set (tests use
// one FakePacketPort per role).
struct HomeAgentPorts {
  PacketSink* link = nullptr;           // Ethernet frames onto the home link
  PacketSink* mobility = nullptr;       // complete IPv6 packets we built (BAs)
  Ipv6DatagramSink* tunnel6 = nullptr;  // inner IPv6 to a care-of address (proto 41)
  Ipv6DatagramSink* tunnel4 = nullptr;  // inner IPv4 to a care-of address (proto 4)
  PacketSink* deliver6 = nullptr;       // decapsulated IPv6, routed by the kernel
  PacketSink* deliver4 = nullptr;       // decapsulated IPv4, routed by the kernel
};

struct HomeAgentCounters {
  uint64_t bu_received = 0;
  uint64_t bu_malformed = 0;  // undecodable IPv6/MH, wrong MH type for an HAO
  uint64_t bu_bad_checksum = 0;
  uint64_t bu_rate_limited = 0;
  uint64_t bu_auth_missing = 0;  // dropped: no authentication option
  uint64_t bu_auth_failed = 0;   // answered 146
  uint64_t bu_during_dad = 0;    // dropped: a DAD probe for the address is running
  uint64_t ba_sent = 0;
  uint64_t ba_send_errors = 0;
  uint64_t accepted = 0;
  uint64_t refreshed = 0;
  uint64_t deregistered = 0;
  uint64_t rejected = 0;  // any status >= 128
  uint64_t expired = 0;
  uint64_t dad_probes = 0;
  uint64_t dad_conflicts = 0;
  uint64_t dad_revoked = 0;  // optimistic bindings removed after a conflict
  uint64_t proxy_na_sent = 0;
  uint64_t proxy_arp_sent = 0;
  uint64_t encapsulated = 0;
  uint64_t encap_errors = 0;
  uint64_t resegmented = 0;  // merged IPv4 TCP frames sent on as their segments
  uint64_t decapsulated = 0;
  uint64_t decap_spoofed = 0;  // inner source not bound to the outer source
  uint64_t decap_malformed = 0;
  uint64_t deliver_errors = 0;
  uint64_t hop_limit_exceeded = 0;
  uint64_t persist_errors = 0;
  uint64_t link_frames = 0;
  uint64_t link_malformed = 0;
};

struct HomeAgentBindingStatus {
  std::string home_address;
  std::string care_of;
  std::string home_address4;  // empty if none
  uint16_t sequence = 0;
  int64_t lifetime_left_s = 0;
  int64_t granted_lifetime_s = 0;
  std::string state;  // active | optimistic
  uint32_t spi = 0;
};
struct HomeAgentStatus {
  std::vector<HomeAgentBindingStatus> bindings;  // earliest expiry first
  std::vector<std::string> dad_pending;          // home addresses being probed (rfc mode)
  size_t rate_table_entries = 0;
  HomeAgentCounters counters;
};

// Token bucket per source address in a bounded table: when the table is
// full, the least recently used source is evicted (its next BU starts with a
// full bucket, which is no worse than a new source).
class BuRateLimiter {
 public:
  BuRateLimiter(double rate_per_second, double burst, size_t max_sources);
  // Takes a token for `source`; false when its bucket is empty.
  bool Allow(const Ipv6Address& source, Clock::TimePoint now);
  size_t size() const { return table_.size(); }

 private:
  struct Bucket {
    double tokens = 0;
    Clock::TimePoint last{};
    std::list<Ipv6Address>::iterator lru;
  };
  double rate_;
  double burst_;
  size_t max_sources_;
  std::list<Ipv6Address> lru_;  // front: most recent
  std::unordered_map<Ipv6Address, Bucket, Ipv6AddressHash> table_;
};

class HomeAgent {
 public:
  // `journal` may be null (no persistence). `wall` converts expiry times for
  // the journal; defaults to the system clock.
  HomeAgent(HomeAgentConfig config, HomeAgentPorts ports, Clock& clock,
            BindingJournal* journal = nullptr, WallClock wall = {});

  // Reloads persisted bindings (those not yet expired by the wall clock),
  // rewrites the journal compactly and re-announces each with a gratuitous
  // NA (and ARP). Returns how many were restored.
  Result<size_t> Restore(const std::vector<PersistedBinding>& saved);

  // A frame captured on the home link (AF_PACKET, all EtherTypes): BUs to the
  // HA address, NS/NA and ARP (proxying, DAD), and traffic for bound home
  // addresses (tunnelled to the care-of address).
  void HandleLinkFrame(std::span<const uint8_t> frame);
  // A whole IPv6 packet carrying a Mobility Header addressed to the HA (also
  // reached through HandleLinkFrame).
  void HandleMobilityPacket(std::span<const uint8_t> ipv6_packet);
  // An inner packet received on the raw tunnel socket for `protocol` (41 or
  // 4) from `outer_src`.
  void HandleTunnelPacket(uint8_t protocol, const Ipv6Address& outer_src,
                          std::span<const uint8_t> inner);
  // Expires bindings and finishes DAD probes that are due.
  void OnTimer();
  std::optional<Clock::TimePoint> NextDeadline() const;

  HomeAgentStatus Status() const;
  const HomeAgentCounters& counters() const { return counters_; }
  const BindingCache& cache() const { return cache_; }
  const HomeAgentConfig& config() const { return config_; }

 private:
  struct BuContext {
    Ipv6Address source{};  // IPv6 source (the care-of address, or HoA from home)
    Ipv6Address home_address{};
    Ipv6Address care_of{};  // after the Alternate Care-of Address option
    BindingUpdate bu;
    std::optional<Ipv4HomeAddress> home4;
    const HomeKey* key = nullptr;  // the SA that authenticated the BU
  };
  struct PendingDad {
    BuContext ctx;
    Clock::TimePoint deadline{};
    int probes_left = 0;
    bool conflict = false;
  };

  void ProcessBindingUpdate(BuContext ctx);
  void Accept(const BuContext& ctx, bool new_binding, CacheEntryState state);
  void Deregister(const BuContext& ctx);
  void SendBa(const BuContext& ctx, uint8_t status, uint16_t sequence, uint16_t lifetime_units,
              std::optional<Ipv4AddressAcknowledgement> ack4);
  // Status of the IPv4 home address request, nullopt when none was made.
  std::optional<Ipv4AddressAcknowledgement> CheckIpv4(const BuContext& ctx) const;
  bool Allowed(const Ipv6Address& hoa) const;
  const HomeKey* KeyFor(const Ipv6Address& hoa, uint32_t spi) const;
  const HomeKey* AnyKeyFor(const Ipv6Address& hoa) const;
  uint16_t GrantedUnits(uint16_t requested_units) const;

  void HandleIpv6Frame(const EthernetFrame& eth);
  void HandleIpv4Frame(const EthernetFrame& eth);
  void HandleArp(const EthernetFrame& eth);
  void HandleNeighborSolicitation(const Ipv6Packet& ip, const EthernetFrame& eth,
                                  std::span<const uint8_t> icmp);
  void NoteDadConflict(const Ipv6Address& target);
  void SendDadProbe(const Ipv6Address& target);
  void Announce(const CacheEntry& b);
  void SendNeighborAdvertisement(const Ipv6Address& target, const Ipv6Address& dst,
                                 const MacAddress& dst_mac, bool solicited, bool override_flag);
  void Encapsulate(const CacheEntry& b, std::span<const uint8_t> packet, bool ipv4);
  // Link-local fe80::IID of a home address (proxied when the BU had L set).
  static Ipv6Address LinkLocalOf(const Ipv6Address& hoa);
  const CacheEntry* FindProxied(const Ipv6Address& target) const;

  void Persist(const CacheEntry& b);
  void PersistRemove(const Ipv6Address& hoa);
  void MaybeCompact();
  std::vector<PersistedBinding> Snapshot() const;

  HomeAgentConfig config_;
  HomeAgentPorts ports_;
  Clock& clock_;
  BindingJournal* journal_;
  WallClock wall_;
  BindingCache cache_;
  BuRateLimiter limiter_;
  std::unordered_map<Ipv6Address, PendingDad, Ipv6AddressHash> pending_dad_;
  // Optimistic bindings whose background probe is still running.
  std::unordered_map<Ipv6Address, PendingDad, Ipv6AddressHash> optimistic_probe_;
  // Home addresses whose optimistic binding was revoked by a DAD conflict:
  // the next BU for each is answered 134 (and clears the mark).
  std::unordered_map<Ipv6Address, Clock::TimePoint, Ipv6AddressHash> revoked_;
  // Link-local proxies (L flag): fe80::IID -> home address.
  std::unordered_map<Ipv6Address, Ipv6Address, Ipv6AddressHash> link_local_;
  HomeAgentCounters counters_;
  std::vector<uint8_t> scratch_;
};

}  // namespace kagemusha::tunnel

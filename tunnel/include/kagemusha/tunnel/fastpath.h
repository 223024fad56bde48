// The tunnel fast path: eBPF tc programs (tunnel/bpf/fastpath.bpf.c, compiled
// by clang at build time and embedded in the binary) that encapsulate and
// decapsulate IPv6-in-IPv6 and IPv4-in-IPv6 (DSMIPv6) in the kernel, so a
// tunnelled packet no longer crosses user space twice. User space keeps the
// control plane and every packet the programs leave alone (ND, ARP, Mobility
// Header, IPv4 options and fragments, oversize packets, failed checks). See
// docs/tunnel-fastpath.md.
//
//   HostFastPath   kagemusha-tunneld: tc egress on each session's TAP
//                  (guest -> 6in6 -> HA) and tc ingress on each uplink
//                  (6in6 from the HA -> TAP ingress -> guest); a map of the
//                  sessions' home addresses
//   HaFastPath     kagemusha-ha: tc ingress on the home link (bound home
//                  address -> 6in6 -> CoA; 6in6 from the bound CoA with the
//                  bound inner source -> routed out) and a socket filter on
//                  the home-link AF_PACKET socket that hides exactly those
//                  frames from user space, so each packet is forwarded once
//   BindingMirror  pure: which map entries change when the binding cache did
//
// Loading needs CAP_BPF/CAP_NET_ADMIN and a kernel with clsact, cls_bpf and
// bpf_skb_adjust_room's DECAP flags (Linux 6.3+). FastPathMode::kAuto means:
// use it if it loads, otherwise warn once and stay on the user-space path.
//
// Thread-safety: none; each object is used from its daemon's event loop (or
// under the daemon's mutex).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/binding_cache.h"
#include "kagemusha/tunnel/ip_packet.h"

namespace kagemusha::tunnel {

enum class FastPathMode { kAuto, kOn, kOff };
Result<FastPathMode> ParseFastPathMode(std::string_view text);
const char* FastPathModeName(FastPathMode mode);

// The programs' counters (summed over CPUs), by name, in a fixed order:
// host_encap_packets, host_encap_bytes, host_decap_packets, ... (the names of
// enum kgm_counter in tunnel/bpf/fastpath_abi.h, lower case, without KGM_).
using FastPathCounters = std::vector<std::pair<std::string, uint64_t>>;

class BpfTunnelObject;  // the loaded eBPF object (fastpath.cc)

// Removes our tc filters (fixed handle and priority) from every interface of
// this network namespace: what a daemon killed without detaching left behind.
// Done by Load(), and by a daemon started with --fast-path off.
void RemoveStaleFastPathFilters();

// The fast path's map key of an IPv4 home address (DSMIPv6, RFC 5555): the
// IPv4-mapped IPv6 address ::ffff:a.b.c.d, so IPv4 home addresses share the
// maps keyed by IPv6 home address (host_sessions, ha_bindings) and their
// sync code; no IPv6 home address has that form. tunnel/bpf/fastpath.bpf.c
// (mapped4) builds the same key.
Ipv6Address FastPathKey4(const Ipv4Address& home_address4);

struct HostFastPathSession {
  std::string name;
  std::vector<Ipv6Address> home_addresses;
  std::optional<Ipv4Address> home_address4;  // carried IPv4-in-IPv6 when set
  Ipv6Address care_of{};
  Ipv6Address home_agent{};
  MacAddress guest_mac{};
  MacAddress router_mac{};
  uint32_t mtu = 0;  // tunnel MTU (largest inner packet)
  std::string tap;
  std::string uplink;
};

// The map keys of a session: its IPv6 home addresses, then FastPathKey4 of
// its IPv4 home address if it has one.
std::vector<Ipv6Address> FastPathKeys(const HostFastPathSession& session);

// What the fast path carried for one session (all its home addresses), both
// families; the *4 fields are the IPv4 share of the packet counts.
struct HostFastPathSessionCounters {
  uint64_t encap_packets = 0;
  uint64_t encap_bytes = 0;
  uint64_t decap_packets = 0;
  uint64_t decap_bytes = 0;
  uint64_t encap4_packets = 0;
  uint64_t decap4_packets = 0;
};

class HostFastPath {
 public:
  // Loads the programs and maps, and removes our filters left on any
  // interface of this namespace by a daemon that died without detaching.
  static Result<std::unique_ptr<HostFastPath>> Load();
  ~HostFastPath();  // detaches from every uplink (TAP filters go with the TAPs)
  HostFastPath(const HostFastPath&) = delete;
  HostFastPath& operator=(const HostFastPath&) = delete;

  // Attaches to the session's TAP (egress) and uplink (ingress, shared by the
  // sessions on it) and publishes its home addresses. Replaces a session of
  // the same name.
  Status AddSession(const HostFastPathSession& session);
  // Withdraws the home addresses; detaches from the uplink when no session
  // uses it any more. Unknown names are ignored.
  void RemoveSession(const std::string& name);
  bool HasSession(const std::string& name) const { return sessions_.count(name) > 0; }
  FastPathCounters Counters() const;
  // The session's counters, including what it carried before an earlier
  // RemoveSession of the same name.
  HostFastPathSessionCounters SessionCounters(const std::string& name) const;

 private:
  explicit HostFastPath(std::unique_ptr<BpfTunnelObject> obj);
  std::unique_ptr<BpfTunnelObject> obj_;
  std::map<std::string, HostFastPathSession> sessions_;
  std::map<int, int> uplink_users_;  // uplink ifindex -> sessions on it
  std::map<std::string, HostFastPathSessionCounters> retired_;
};

// Which (home address -> care-of address) entries the kernel map needs to
// change to match the binding cache, an IPv4 home address under its
// FastPathKey4. Keeps its own copy of what it last published, so it is a
// pure diff.
class BindingMirror {
 public:
  struct Changes {
    std::vector<std::pair<Ipv6Address, Ipv6Address>> upserts;  // home, care-of
    std::vector<Ipv6Address> removals;
    bool empty() const { return upserts.empty() && removals.empty(); }
  };
  Changes Update(const BindingCache& cache);
  // Forgets everything published (the next Update republishes all).
  void Reset() { published_.clear(); }
  size_t size() const { return published_.size(); }

 private:
  std::map<Ipv6Address, Ipv6Address> published_;
};

// RFC 2473 §7.1 at the home agent: the fast path cannot fragment, so a
// packet for a bound home address that would exceed the home link's MTU once
// encapsulated is left to user space, which still forwards it (fragmenting
// the outer packet) and also tells the sender the tunnel's MTU with an
// ICMPv6 Packet Too Big, so the flow's next packets fit the fast path.
// Returns that whole IPv6 packet (from `ha_address`, MTU `inner_mtu`), or
// nothing when `frame` is not such a packet: not IPv6, not to `ha_mac`, not
// to a bound home address, ICMPv6 error or ND, not larger than `inner_mtu`,
// or `inner_mtu` below the IPv6 minimum of 1280 (then fragmentation is the
// only answer).
//
// IPv4 (DSMIPv6) the same way when `ha_address4` is given: an IPv4 packet
// to a bound IPv4 home address, larger than `inner_mtu`, with DF set, not a
// fragment and not an ICMP error, from a unicast source, gets an ICMP
// Fragmentation Needed (RFC 1191, next-hop MTU `inner_mtu`) from
// `ha_address4`; without DF it is only forwarded (outer fragments). The
// returned packet is IPv4 then (version nibble 4).
std::optional<std::vector<uint8_t>> HaPacketTooBigFor(
    std::span<const uint8_t> frame, const MacAddress& ha_mac, const Ipv6Address& ha_address,
    uint32_t inner_mtu, const BindingCache& cache,
    const std::optional<Ipv4Address>& ha_address4 = std::nullopt);

class HaFastPath {
 public:
  // `mtu`: the largest inner packet to encapsulate (home link MTU - 40).
  // `enable_gro`: turn GRO on on the home link if it is off (see gro()).
  static Result<std::unique_ptr<HaFastPath>> Load(const std::string& home_link,
                                                  const Ipv6Address& address, uint32_t mtu,
                                                  bool enable_gro = true);
  ~HaFastPath();  // detaches from the home link
  HaFastPath(const HaFastPath&) = delete;
  HaFastPath& operator=(const HaFastPath&) = delete;

  // SO_ATTACH_BPF on the home-link AF_PACKET socket: it stops receiving the
  // frames the tc program forwards.
  Status AttachSocketFilter(int socket_fd);
  // Brings the kernel's binding map in line with `cache` when the cache
  // changed since the last call (BindingCache::generation()).
  Status Sync(const BindingCache& cache);
  size_t published() const { return mirror_.size(); }
  FastPathCounters Counters() const;

  // GRO on the home link. Load turns it on if it is off, so a tunnelled TCP
  // stream that reaches the HA as MTU-sized segments is merged again before
  // tc ingress decapsulates it (ip6ip6 GRO), and the destructor turns it off
  // again if Load turned it on. Reported in the status JSON.
  struct GroState {
    bool known = false;    // the ioctl answered
    bool enabled = false;  // GRO is on now
    bool changed = false;  // we turned it on (restored on exit)
    bool kept = false;     // --home-link-gro keep: not touched
    std::string error;     // why it could not be read or set
  };
  const GroState& gro() const { return gro_; }

 private:
  explicit HaFastPath(std::unique_ptr<BpfTunnelObject> obj);
  void EnableGro(const std::string& home_link);
  std::unique_ptr<BpfTunnelObject> obj_;
  BindingMirror mirror_;
  std::optional<uint64_t> synced_generation_;
  int link_ifindex_ = 0;
  std::string link_name_;
  GroState gro_;
};

}  // namespace kagemusha::tunnel

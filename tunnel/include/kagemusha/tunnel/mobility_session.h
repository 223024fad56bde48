// The host side of Kagemusha's guest mobility: one MobilitySession per guest,
// acting as the Mobile IPv6 mobile node on the guest's behalf (RFC 6275 §11,
// RFC 5555 for an IPv4 home address) while the guest itself knows nothing.
//
// On a foreign host the session
//   - impersonates the guest's home router on the VM link: answers Neighbor
//     Solicitations for the router's addresses and ARP for its IPv4 gateway
//     with the router's MAC, announces them with an unsolicited NA and a
//     gratuitous ARP, and optionally answers Router Solicitations;
//   - tunnels the guest's global unicast to the home agent (RFC 2473
//     IPv6-in-IPv6, and IPv4-in-IPv6 for an IPv4 home address) and keeps
//     link-local and multicast traffic on the link; an oversized packet gets
//     an ICMPv6 Packet Too Big (or ICMPv4 fragmentation-needed when DF is set)
//     from the router's address;
//   - delivers packets the home agent tunnels back as Ethernet frames from the
//     router's MAC to the guest's MAC;
//   - keeps one binding per home address registered: BU with A and H from the
//     care-of address with a Home Address option, retransmitted with
//     exponential back-off (RFC 6275 §11.8), refreshed at a fraction of the
//     granted lifetime and on a Binding Refresh Request or Refresh Advice,
//     resynchronised on status 135; other failures become SessionEvents.
// Returning home it deregisters (lifetime 0) and then announces the home
// addresses with the guest's MAC (RFC 6275 §11.5.4).
//
// The session does no I/O of its own: frames and packets are handed to it by
// the caller (the host daemon's event loop, or a test) and it sends through
// the PacketSink seams in SessionIo; time comes from a Clock and timers are
// run by calling OnTimer() at NextDeadline(). Sequence numbers go through a
// SequenceStore and a restarted session continues above the stored one. The
// durable write comes after the BU has left (after its BA for a
// deregistration), not before, so it is not part of a handover; a crash in
// between can make the restarted session reuse that one number, which the
// HA's status 135 resolves (see SendBindingUpdate).
//
// Thread-safety: none; one thread (or lock) per session.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kagemusha/common/clock.h"
#include "kagemusha/common/error.h"
#include "kagemusha/tunnel/ip_packet.h"
#include "kagemusha/tunnel/mh_auth.h"
#include "kagemusha/tunnel/packet_io.h"

namespace kagemusha::tunnel {

struct MobilityAuthConfig {
  uint32_t spi = 0;
  std::vector<uint8_t> key;
  MhAuthAlgorithm algorithm = MhAuthAlgorithm::kHmacSha256_128;
};

struct SessionTimers {
  // RFC 6275 §11.8 / §13: INITIAL_BINDACK_TIMEOUT, MAX_BINDACK_TIMEOUT.
  std::chrono::milliseconds initial_bindack_timeout{1000};
  std::chrono::milliseconds max_bindack_timeout{32000};
  // RFC 6275 §11.8 / §13 InitialBindackTimeoutFirstReg (UMIP's default is
  // 1.5 s too): the initial timer for a BU when the HA may have no binding
  // yet, since an HA that runs DAD on a new binding answers only after
  // RetransTimer (1 s). With 1 s the retransmission would cross the BA,
  // which then no longer matches, and the session would wait for the next
  // one (2 s more). Used for Activate's BU.
  std::chrono::milliseconds initial_bindack_timeout_first_reg{1500};
  // Refresh a binding at this fraction of the granted lifetime.
  double refresh_fraction = 0.8;
  // Deregistration BUs sent before announcing the guest at home anyway.
  int deregistration_attempts = 3;
  // Consecutive status-135 answers acted on immediately; further ones wait
  // for the back-off timer (a confused HA cannot make us spin).
  int max_immediate_resyncs = 3;
  // Unsolicited NA / gratuitous ARP announcements (of the router on
  // activation, of the guest at home), this many in all, this far apart
  // (RFC 4861 MAX_NEIGHBOR_ADVERTISEMENT, RetransTimer).
  int announcements = 3;
  std::chrono::milliseconds announcement_interval{1000};
};

struct SessionConfig {
  std::string name;
  MacAddress guest_mac{};
  std::vector<Ipv6Address> home_addresses;  // at least one
  std::optional<Ipv4Address> home_address4;
  uint8_t home_prefix4_length = 32;  // sent in the IPv4 Home Address option
  Ipv6Address home_prefix{};
  uint8_t home_prefix_length = 64;
  MacAddress router_mac{};
  Ipv6Address router_link_local{};
  std::optional<Ipv6Address> router_global;
  std::optional<Ipv4Address> router_v4;
  Ipv6Address home_agent{};
  Ipv6Address care_of{};
  // The largest inner packet the tunnel carries (uplink MTU minus 40).
  uint32_t tunnel_mtu = 1460;
  bool send_router_advertisements = false;
  uint32_t lifetime_seconds = 600;         // requested binding lifetime
  std::optional<MobilityAuthConfig> auth;  // nullopt: insecure
  // Ethernet source of the at-home announcement (the NA's target link-layer
  // option and the ARP sender are always the guest's MAC). The daemon uses
  // its TAP's own MAC so the bridge does not learn the guest's MAC on the
  // TAP port; nullopt: the guest's MAC.
  std::optional<MacAddress> announce_from_mac;
  SessionTimers timers;
};
// Checks what a session cannot run without (one home address, unicast
// addresses, link-local router address, MTU >= 1280, lifetime fits 16 bits of
// 4 s units, key present when auth is on).
Status ValidateSessionConfig(const SessionConfig& config);

// Where the session's output goes. `tunnel4` may be null without an IPv4
// home address.
struct SessionIo {
  PacketSink* guest_link = nullptr;  // Ethernet frames onto the VM link (TAP)
  PacketSink* tunnel6 = nullptr;     // inner IPv6 packets to the HA (proto 41)
  PacketSink* tunnel4 = nullptr;     // inner IPv4 packets to the HA (proto 4)
  PacketSink* mobility = nullptr;    // complete IPv6 packets we built (BUs)
};

// Persistent Binding Update sequence numbers, one per home address.
class SequenceStore {
 public:
  virtual ~SequenceStore() = default;
  virtual std::optional<uint16_t> LastSent(const Ipv6Address& home_address) = 0;
  // Must be durable when it returns Ok.
  virtual Status Record(const Ipv6Address& home_address, uint16_t sequence) = 0;
};

class MemorySequenceStore final : public SequenceStore {
 public:
  std::optional<uint16_t> LastSent(const Ipv6Address& home_address) override;
  Status Record(const Ipv6Address& home_address, uint16_t sequence) override;
  std::map<Ipv6Address, uint16_t> values;
  bool fail = false;  // makes Record fail (tests)
};

enum class BindingState { kIdle, kRegistering, kRegistered, kRejected, kDeregistering, kHome };
const char* BindingStateName(BindingState s);

enum class SessionState {
  kIdle,
  kRegistering,
  kRegistered,
  kRejected,
  kDeregistering,
  kHome,
  kStopped
};
const char* SessionStateName(SessionState s);

// Things the operator must hear about.
struct SessionEvent {
  enum class Kind {
    kRegistered,      // a binding was accepted
    kRejected,        // BA status >= 128 other than 135
    kResynchronised,  // status 135: sequence number taken from the HA
    kIpv4Rejected,    // IPv4 Address Acknowledgement status != 0
    kDeregistered,    // home: announced with the guest's MAC
    kDeregistrationTimedOut,
    kPersistFailed,  // a sequence number could not be stored
    kSendFailed,
  };
  Kind kind;
  Ipv6Address home_address{};
  uint8_t status = 0;
  std::string message;
};
const char* SessionEventKindName(SessionEvent::Kind k);

struct SessionCounters {
  // Guest side.
  uint64_t guest_frames = 0;
  uint64_t guest_malformed = 0;    // unparseable Ethernet/IP/ND/ARP
  uint64_t guest_foreign_mac = 0;  // routed frames not from the guest's MAC
  uint64_t nd_answered = 0;
  uint64_t nd_ignored = 0;  // NS for an address that is not the router's
  uint64_t ra_sent = 0;
  uint64_t arp_answered = 0;
  uint64_t arp_ignored = 0;
  uint64_t link_local_kept = 0;  // link-local/multicast: never tunnelled
  uint64_t not_home_source = 0;  // routed packet whose source is not a home address
  uint64_t tunnelled6 = 0;
  uint64_t tunnelled4 = 0;
  uint64_t tunnelled_bytes = 0;
  uint64_t too_big = 0;  // PTB / frag-needed sent
  // Home agent side.
  uint64_t decap_delivered6 = 0;
  uint64_t decap_delivered4 = 0;
  uint64_t decap_bytes = 0;
  uint64_t decap_spoofed = 0;   // tunnelled packet not from the HA
  uint64_t decap_not_ours = 0;  // inner destination not a home address
  uint64_t decap_malformed = 0;
  // Mobility signalling.
  uint64_t bu_sent = 0;
  uint64_t ba_accepted = 0;
  uint64_t ba_rejected = 0;  // status >= 128 (135 included)
  uint64_t ba_wrong_source = 0;
  uint64_t ba_wrong_sequence = 0;
  uint64_t ba_auth_failed = 0;
  uint64_t ba_unexpected = 0;  // for another home address, or none pending
  uint64_t mh_malformed = 0;   // truncated, bad checksum, bad length ...
  uint64_t brr_received = 0;
  uint64_t send_errors = 0;
};

struct BindingStatus {
  Ipv6Address home_address{};
  BindingState state = BindingState::kIdle;
  uint16_t last_sequence = 0;
  bool sequence_valid = false;
  std::optional<std::chrono::seconds> lifetime_left;
  std::optional<uint8_t> last_status;
  std::chrono::milliseconds retransmit_interval{0};
};

struct SessionStatus {
  SessionState state = SessionState::kIdle;
  std::vector<BindingStatus> bindings;
  std::optional<uint8_t> last_ba_status;
  SessionCounters counters;
};

class MobilitySession {
 public:
  using EventCallback = std::function<void(const SessionEvent&)>;

  // REQUIRES: ValidateSessionConfig(config) ok; io.guest_link, io.tunnel6,
  // io.mobility non-null (tunnel4 too with an IPv4 home address); clock and
  // store outlive the session.
  MobilitySession(SessionConfig config, SessionIo io, Clock& clock, SequenceStore& store,
                  EventCallback on_event = {});

  const SessionConfig& config() const { return config_; }

  // Foreign host: announce the router on the link and register every home
  // address. Also the resume path after a daemon restart.
  void Activate();
  // Home host: deregister (lifetime 0), then announce the home addresses with
  // the guest's MAC once every binding is answered or given up.
  void ReturnHome();
  // Stops everything without signalling (the VM is leaving this host).
  void Deactivate();

  // Runs due timers (retransmission, refresh, deregistration give-up,
  // repeated announcements).
  void OnTimer();
  std::optional<Clock::TimePoint> NextDeadline() const;

  // A frame the guest link (TAP) delivered. Ignored at home (after
  // ReturnHome): the real router is on that link.
  void HandleGuestFrame(std::span<const uint8_t> frame);
  // A frame captured on the uplink (a BA with RH2, a BRR).
  void HandleUplinkFrame(std::span<const uint8_t> frame);
  // A packet the kernel's raw socket for `protocol` (41 or 4) delivered: the
  // outer source is `outer_src`; `frame_room` holds kEthernetHeaderSize bytes
  // of writable headroom followed by the inner packet, so delivery to the
  // guest builds the Ethernet header in place (no copy).
  void HandleTunnelled(const Ipv6Address& outer_src, uint8_t protocol,
                       std::span<uint8_t> frame_room);

  SessionState state() const;
  SessionStatus Status() const;
  const SessionCounters& counters() const { return counters_; }

 private:
  struct Binding {
    Ipv6Address home_address{};
    BindingState state = BindingState::kIdle;
    std::optional<uint16_t> last_sent;
    uint16_t next_sequence = 0;
    bool stored = false;  // the store holds a sequence number for this address
    // last_sent is still to be stored (a deregistration's number, deferred
    // until its BA has been handled), at this time at the latest.
    std::optional<Clock::TimePoint> record_at;
    std::chrono::milliseconds backoff{0};
    int attempts = 0;
    int resyncs = 0;
    std::optional<Clock::TimePoint> deadline;  // retransmit or refresh
    std::optional<Clock::TimePoint> expires;
    std::optional<uint8_t> last_status;
  };

  void StartExchange(Binding& b, BindingState state, std::chrono::milliseconds initial_timeout);
  void SendBindingUpdate(Binding& b);
  void RecordSequence(Binding& b, uint16_t sequence);
  void FlushSequence(Binding& b);
  void HandleBindingAck(const MobilityPacket& packet);
  void HandleRefreshRequest();
  void FinishDeregistration(Binding& b, bool timed_out);
  enum class Repeat { kNone, kRouter, kHome };
  void MaybeAnnounceHome();
  void AnnounceRouter();
  void SendHomeAnnouncement();
  void ScheduleRepeats(Repeat kind);
  void RunRepeats(Clock::TimePoint now);
  void Emit(SessionEvent::Kind kind, const Ipv6Address& hoa, uint8_t status, std::string message);
  void SendGuest(std::span<const uint8_t> frame);
  void HandleGuestIpv6(const EthernetFrame& eth, std::span<const uint8_t> packet);
  void HandleGuestIpv4(const EthernetFrame& eth, std::span<const uint8_t> packet);
  void HandleGuestArp(const EthernetFrame& eth);
  bool AnswerNeighborDiscovery(const EthernetFrame& eth, const Ipv6Packet& ip);
  bool IsHomeAddress(const Ipv6Address& a) const;
  bool InHomePrefix(const Ipv6Address& a) const;
  Binding* FindBinding(const Ipv6Address& hoa);

  SessionConfig config_;
  SessionIo io_;
  Clock& clock_;
  SequenceStore& store_;
  EventCallback on_event_;
  std::vector<Binding> bindings_;
  bool stopped_ = false;
  bool home_announced_ = false;
  bool at_home_ = false;  // ReturnHome: the guest link is the home link
  Repeat repeat_ = Repeat::kNone;
  int repeats_left_ = 0;
  std::optional<Clock::TimePoint> repeat_at_;
  std::optional<uint8_t> last_ba_status_;
  SessionCounters counters_;
};

}  // namespace kagemusha::tunnel

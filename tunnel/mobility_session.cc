// MobilitySession: see mobility_session.h.
#include "kagemusha/tunnel/mobility_session.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "kagemusha/tunnel/arp.h"
#include "kagemusha/tunnel/mobility_header.h"
#include "kagemusha/tunnel/neighbor_discovery.h"

namespace kagemusha::tunnel {
namespace {

using std::chrono::duration_cast;
using std::chrono::milliseconds;
using std::chrono::seconds;

// How long a deregistration BU's sequence number may wait for its BA before
// it is stored anyway (see SendBindingUpdate).
constexpr milliseconds kDeferredRecord{200};

bool IsIpv4Multicast(const Ipv4Address& a) { return (a[0] & 0xf0) == 0xe0; }
bool IsIpv4Broadcast(const Ipv4Address& a) {
  return a[0] == 255 && a[1] == 255 && a[2] == 255 && a[3] == 255;
}

}  // namespace

// ---- Names ---------------------------------------------------------------------

const char* BindingStateName(BindingState s) {
  switch (s) {
    case BindingState::kIdle:
      return "idle";
    case BindingState::kRegistering:
      return "registering";
    case BindingState::kRegistered:
      return "registered";
    case BindingState::kRejected:
      return "rejected";
    case BindingState::kDeregistering:
      return "deregistering";
    case BindingState::kHome:
      return "home";
  }
  return "?";
}

const char* SessionStateName(SessionState s) {
  switch (s) {
    case SessionState::kIdle:
      return "idle";
    case SessionState::kRegistering:
      return "registering";
    case SessionState::kRegistered:
      return "registered";
    case SessionState::kRejected:
      return "rejected";
    case SessionState::kDeregistering:
      return "deregistering";
    case SessionState::kHome:
      return "home";
    case SessionState::kStopped:
      return "stopped";
  }
  return "?";
}

const char* SessionEventKindName(SessionEvent::Kind k) {
  switch (k) {
    case SessionEvent::Kind::kRegistered:
      return "registered";
    case SessionEvent::Kind::kRejected:
      return "rejected";
    case SessionEvent::Kind::kResynchronised:
      return "resynchronised";
    case SessionEvent::Kind::kIpv4Rejected:
      return "ipv4_rejected";
    case SessionEvent::Kind::kDeregistered:
      return "deregistered";
    case SessionEvent::Kind::kDeregistrationTimedOut:
      return "deregistration_timed_out";
    case SessionEvent::Kind::kPersistFailed:
      return "persist_failed";
    case SessionEvent::Kind::kSendFailed:
      return "send_failed";
  }
  return "?";
}

// ---- Config and store ----------------------------------------------------------

Status ValidateSessionConfig(const SessionConfig& c) {
  if (c.name.empty()) return Fail(Error::Invalid("session name is empty"));
  if (c.home_addresses.empty()) return Fail(Error::Invalid("at least one home address is needed"));
  for (const auto& a : c.home_addresses)
    if (IsMulticast(a) || IsLinkLocalUnicast(a) || IsUnspecified(a))
      return Fail(Error::Invalid("home address " + FormatIpv6(a) + " is not global unicast"));
  if (!IsLinkLocalUnicast(c.router_link_local))
    return Fail(Error::Invalid("router link-local address must be in fe80::/10"));
  if (IsUnspecified(c.home_agent) || IsMulticast(c.home_agent))
    return Fail(Error::Invalid("home agent address must be unicast"));
  if (IsUnspecified(c.care_of) || IsMulticast(c.care_of))
    return Fail(Error::Invalid("care-of address must be unicast"));
  if (c.home_prefix_length > 128) return Fail(Error::Invalid("home prefix length above 128"));
  if (c.home_prefix4_length > 32) return Fail(Error::Invalid("IPv4 prefix length above 32"));
  if (c.tunnel_mtu < kIpv6MinimumMtu || c.tunnel_mtu > 65535)
    return Fail(Error::Invalid("tunnel MTU must be 1280..65535"));
  if (c.lifetime_seconds / 4 > 0xffff || c.lifetime_seconds < 4)
    return Fail(Error::Invalid("lifetime must be 4..262140 seconds"));
  if (c.auth && c.auth->key.empty()) return Fail(Error::Invalid("authentication key is empty"));
  if (c.timers.initial_bindack_timeout.count() <= 0 ||
      c.timers.initial_bindack_timeout_first_reg.count() <= 0 ||
      c.timers.max_bindack_timeout < c.timers.initial_bindack_timeout ||
      c.timers.max_bindack_timeout < c.timers.initial_bindack_timeout_first_reg)
    return Fail(Error::Invalid("retransmission timers out of order"));
  if (!(c.timers.refresh_fraction > 0 && c.timers.refresh_fraction < 1))
    return Fail(Error::Invalid("refresh fraction must be in (0, 1)"));
  return Ok();
}

std::optional<uint16_t> MemorySequenceStore::LastSent(const Ipv6Address& home_address) {
  auto it = values.find(home_address);
  if (it == values.end()) return std::nullopt;
  return it->second;
}

Status MemorySequenceStore::Record(const Ipv6Address& home_address, uint16_t sequence) {
  if (fail) return Fail(Error::Io("injected store failure"));
  values[home_address] = sequence;
  return Ok();
}

// ---- Session ---------------------------------------------------------------------

MobilitySession::MobilitySession(SessionConfig config, SessionIo io, Clock& clock,
                                 SequenceStore& store, EventCallback on_event)
    : config_(std::move(config)),
      io_(io),
      clock_(clock),
      store_(store),
      on_event_(std::move(on_event)) {
  for (const auto& hoa : config_.home_addresses) {
    Binding b;
    b.home_address = hoa;
    if (auto last = store_.LastSent(hoa)) {
      b.last_sent = *last;
      b.next_sequence = static_cast<uint16_t>(*last + 1);
      b.stored = true;
    }
    bindings_.push_back(b);
  }
}

void MobilitySession::Emit(SessionEvent::Kind kind, const Ipv6Address& hoa, uint8_t status,
                           std::string message) {
  if (on_event_) on_event_(SessionEvent{kind, hoa, status, std::move(message)});
}

void MobilitySession::SendGuest(std::span<const uint8_t> frame) {
  if (auto st = io_.guest_link->Send(frame); !st) ++counters_.send_errors;
}

bool MobilitySession::IsHomeAddress(const Ipv6Address& a) const {
  return std::find(config_.home_addresses.begin(), config_.home_addresses.end(), a) !=
         config_.home_addresses.end();
}

bool MobilitySession::InHomePrefix(const Ipv6Address& a) const {
  const unsigned len = config_.home_prefix_length;
  const unsigned full = len / 8;
  if (std::memcmp(a.data(), config_.home_prefix.data(), full) != 0) return false;
  if (len % 8 == 0) return true;
  const uint8_t mask = static_cast<uint8_t>(0xff << (8 - len % 8));
  return (a[full] & mask) == (config_.home_prefix[full] & mask);
}

MobilitySession::Binding* MobilitySession::FindBinding(const Ipv6Address& hoa) {
  for (auto& b : bindings_)
    if (b.home_address == hoa) return &b;
  return nullptr;
}

void MobilitySession::AnnounceRouter() {
  // Tells the guest (and the bridge's forwarding table) that the router's
  // MAC now lives on our port.
  SendGuest(BuildUnsolicitedNeighborAdvertisementFrame(config_.router_mac,
                                                       config_.router_link_local, true));
  if (config_.router_global)
    SendGuest(BuildUnsolicitedNeighborAdvertisementFrame(config_.router_mac, *config_.router_global,
                                                         true));
  if (config_.router_v4) SendGuest(BuildGratuitousArpFrame(config_.router_mac, *config_.router_v4));
}

void MobilitySession::Activate() {
  stopped_ = false;
  at_home_ = false;
  home_announced_ = false;
  AnnounceRouter();
  ScheduleRepeats(Repeat::kRouter);
  // The session cannot tell a first registration (the guest comes from
  // home) from a move between foreign hosts, so it takes the longer timer.
  for (auto& b : bindings_)
    StartExchange(b, BindingState::kRegistering, config_.timers.initial_bindack_timeout_first_reg);
}

void MobilitySession::ReturnHome() {
  stopped_ = false;
  at_home_ = true;
  home_announced_ = false;
  ScheduleRepeats(Repeat::kNone);
  for (auto& b : bindings_)
    StartExchange(b, BindingState::kDeregistering, config_.timers.initial_bindack_timeout);
}

void MobilitySession::Deactivate() {
  for (auto& b : bindings_) FlushSequence(b);
  stopped_ = true;
  repeat_at_.reset();
  for (auto& b : bindings_) {
    b.deadline.reset();
    b.state = BindingState::kIdle;
  }
}

void MobilitySession::StartExchange(Binding& b, BindingState state,
                                    std::chrono::milliseconds initial_timeout) {
  b.state = state;
  b.backoff = initial_timeout;
  b.attempts = 0;
  b.resyncs = 0;
  SendBindingUpdate(b);
}

void MobilitySession::SendBindingUpdate(Binding& b) {
  const bool dereg = b.state == BindingState::kDeregistering;
  BindingUpdate bu;
  bu.sequence = b.next_sequence;
  bu.flags = bu_flag::kAcknowledge | bu_flag::kHomeRegistration;
  bu.lifetime = dereg ? 0 : static_cast<uint16_t>(config_.lifetime_seconds / 4);
  if (config_.home_address4 && &b == &bindings_.front()) {
    Ipv4HomeAddress opt;
    opt.prefix_length = config_.home_prefix4_length;
    opt.address = *config_.home_address4;
    bu.options.push_back(opt);
  }
  // The number is stored after the BU has left, not before: a durable write
  // takes 1-20 ms on the test bed's disk (80 ms seen under load), and
  // before the BU it would add that to every handover. After a registration
  // BU the write overlaps the round trip to the HA. After a deregistration
  // BU it waits until the BA has been handled (the announcement at home is
  // what the guest waits for, and the BA comes back across the home link
  // in about a millisecond), or kDeferredRecord at most.
  // The price: a crash between a BU and its write can make the restarted
  // session send that one number again. The HA then either has it (135,
  // and the session resynchronises: one more round trip) or never got it,
  // and a deregistration's number does not matter after it (RFC 6275
  // §10.3.1: no binding, any number is accepted). A home address with
  // nothing stored yet is stored before its first BU.
  const bool store_first = !b.stored;
  if (store_first) RecordSequence(b, bu.sequence);
  b.last_sent = bu.sequence;
  b.next_sequence = static_cast<uint16_t>(bu.sequence + 1);
  ++b.attempts;
  b.deadline = clock_.Now() + b.backoff;

  Result<std::vector<uint8_t>> packet;
  if (config_.auth) {
    MhAuthParams params;
    params.spi = config_.auth->spi;
    params.key = config_.auth->key;
    params.care_of = config_.care_of;
    params.home_address = b.home_address;
    params.algorithm = config_.auth->algorithm;
    auto mh = EncodeAuthenticatedMobilityHeader(bu, params, {b.home_address, config_.home_agent});
    if (!mh) {
      Emit(SessionEvent::Kind::kSendFailed, b.home_address, 0, mh.error().message());
      return;
    }
    packet =
        BuildMobilityPacket(config_.care_of, config_.home_agent, b.home_address, std::nullopt, *mh);
  } else {
    packet = BuildBindingUpdatePacket(config_.care_of, config_.home_agent, b.home_address, bu);
  }
  if (!packet) {
    Emit(SessionEvent::Kind::kSendFailed, b.home_address, 0, packet.error().message());
    return;
  }
  auto sent = io_.mobility->Send(*packet);
  if (!store_first) {
    if (!dereg) {
      RecordSequence(b, bu.sequence);
    } else if (!b.record_at) {
      b.record_at = clock_.Now() + kDeferredRecord;
    }
  }
  if (!sent) {
    ++counters_.send_errors;
    Emit(SessionEvent::Kind::kSendFailed, b.home_address, 0, sent.error().message());
    return;  // the retransmission timer tries again
  }
  ++counters_.bu_sent;
}

void MobilitySession::RecordSequence(Binding& b, uint16_t sequence) {
  b.record_at.reset();
  if (auto st = store_.Record(b.home_address, sequence); !st) {
    Emit(SessionEvent::Kind::kPersistFailed, b.home_address, 0, st.error().message());
    return;
  }
  b.stored = true;
}

void MobilitySession::FlushSequence(Binding& b) {
  if (b.record_at && b.last_sent) RecordSequence(b, *b.last_sent);
}

void MobilitySession::OnTimer() {
  if (stopped_) return;
  const auto now = clock_.Now();
  for (auto& b : bindings_) {
    if (!b.deadline || *b.deadline > now) continue;
    switch (b.state) {
      case BindingState::kRegistering:
        // No answer: back off (RFC 6275 §11.8) and send a fresh BU.
        b.backoff = std::min(b.backoff * 2, config_.timers.max_bindack_timeout);
        SendBindingUpdate(b);
        break;
      case BindingState::kRegistered:
        // Refresh time: a new exchange, the binding stays usable meanwhile.
        StartExchange(b, BindingState::kRegistering, config_.timers.initial_bindack_timeout);
        break;
      case BindingState::kDeregistering:
        if (b.attempts >= config_.timers.deregistration_attempts) {
          FinishDeregistration(b, true);
        } else {
          b.backoff = std::min(b.backoff * 2, config_.timers.max_bindack_timeout);
          SendBindingUpdate(b);
        }
        break;
      default:
        b.deadline.reset();
        break;
    }
  }
  MaybeAnnounceHome();
  RunRepeats(now);
  for (auto& b : bindings_)
    if (b.record_at && *b.record_at <= now) FlushSequence(b);
}

std::optional<Clock::TimePoint> MobilitySession::NextDeadline() const {
  if (stopped_) return std::nullopt;
  std::optional<Clock::TimePoint> next = repeat_at_;
  for (const auto& b : bindings_) {
    if (b.deadline && (!next || *b.deadline < *next)) next = b.deadline;
    if (b.record_at && (!next || *b.record_at < *next)) next = b.record_at;
  }
  return next;
}

void MobilitySession::FinishDeregistration(Binding& b, bool timed_out) {
  b.state = BindingState::kHome;
  b.deadline.reset();
  b.expires.reset();
  if (timed_out)
    Emit(SessionEvent::Kind::kDeregistrationTimedOut, b.home_address, 0,
         "no Binding Acknowledgement for the deregistration after " + std::to_string(b.attempts) +
             " attempts; announcing at home anyway");
}

void MobilitySession::SendHomeAnnouncement() {
  // RFC 6275 §11.5.4: neighbours must now reach the home addresses at the
  // guest's own MAC.
  auto from = [this](std::vector<uint8_t> frame) {
    if (config_.announce_from_mac && frame.size() >= 12)
      std::copy(config_.announce_from_mac->begin(), config_.announce_from_mac->end(),
                frame.begin() + 6);
    return frame;
  };
  for (const auto& hoa : config_.home_addresses)
    SendGuest(from(BuildUnsolicitedNeighborAdvertisementFrame(config_.guest_mac, hoa)));
  if (config_.home_address4)
    SendGuest(from(BuildGratuitousArpFrame(config_.guest_mac, *config_.home_address4)));
}

void MobilitySession::ScheduleRepeats(Repeat kind) {
  // RFC 4861 §7.2.6: up to MAX_NEIGHBOR_ADVERTISEMENT (3) unsolicited NAs,
  // RetransTimer apart, in case one is lost (e.g. while a moved guest's link
  // is still coming up).
  repeat_ = kind;
  repeats_left_ = kind == Repeat::kNone ? 0 : config_.timers.announcements - 1;
  repeat_at_.reset();
  if (repeats_left_ > 0) repeat_at_ = clock_.Now() + config_.timers.announcement_interval;
}

void MobilitySession::RunRepeats(Clock::TimePoint now) {
  if (!repeat_at_ || *repeat_at_ > now) return;
  if (repeat_ == Repeat::kRouter) AnnounceRouter();
  if (repeat_ == Repeat::kHome) SendHomeAnnouncement();
  if (--repeats_left_ > 0)
    repeat_at_ = now + config_.timers.announcement_interval;
  else
    repeat_at_.reset();
}

void MobilitySession::MaybeAnnounceHome() {
  if (home_announced_ || bindings_.empty()) return;
  for (const auto& b : bindings_)
    if (b.state != BindingState::kHome) return;
  home_announced_ = true;
  SendHomeAnnouncement();
  ScheduleRepeats(Repeat::kHome);
  Emit(SessionEvent::Kind::kDeregistered, config_.home_addresses.front(), 0,
       "home addresses announced with the guest's MAC");
}

// ---- Mobility signalling from the uplink -------------------------------------------

void MobilitySession::HandleUplinkFrame(std::span<const uint8_t> frame) {
  if (stopped_) return;
  auto packet = ParseMobilityFrame(frame);
  if (!packet) {
    ++counters_.mh_malformed;
    return;
  }
  if (packet->ip.header.src != config_.home_agent) {
    ++counters_.ba_wrong_source;
    return;
  }
  if (std::holds_alternative<BindingAcknowledgement>(packet->header.message)) {
    HandleBindingAck(*packet);
    // A deferred write (deregistration) is due once the exchange is over
    // and the announcement it triggers is out; not after a 135, whose
    // resent BU is still waiting for its BA.
    for (auto& b : bindings_)
      if (b.state != BindingState::kDeregistering) FlushSequence(b);
  } else if (std::holds_alternative<BindingRefreshRequest>(packet->header.message)) {
    HandleRefreshRequest();
  } else {
    ++counters_.ba_unexpected;
  }
}

void MobilitySession::HandleRefreshRequest() {
  ++counters_.brr_received;
  for (auto& b : bindings_)
    if (b.state == BindingState::kRegistered)
      StartExchange(b, BindingState::kRegistering, config_.timers.initial_bindack_timeout);
}

void MobilitySession::HandleBindingAck(const MobilityPacket& packet) {
  const auto& ba = std::get<BindingAcknowledgement>(packet.header.message);
  if (packet.ip.header.dst != config_.care_of || !packet.ip.routing) {
    ++counters_.ba_unexpected;
    return;
  }
  Binding* b = FindBinding(packet.ip.routing->home_address);
  if (b == nullptr ||
      (b->state != BindingState::kRegistering && b->state != BindingState::kDeregistering)) {
    ++counters_.ba_unexpected;
    return;
  }
  if (config_.auth) {
    MhAuthParams params;
    params.spi = config_.auth->spi;
    params.key = config_.auth->key;
    params.care_of = config_.care_of;
    params.home_address = b->home_address;
    params.algorithm = config_.auth->algorithm;
    if (!VerifyMobilityMessageAuthentication(packet.mh, params)) {
      ++counters_.ba_auth_failed;
      return;
    }
  }
  const auto now = clock_.Now();
  if (ba.status == ba_status::kSequenceNumberOutOfWindow) {
    // RFC 6275 §11.7.3: the BA carries the last sequence number the HA
    // accepted; continue above it.
    ++counters_.ba_rejected;
    b->last_status = ba.status;
    last_ba_status_ = ba.status;
    b->next_sequence = static_cast<uint16_t>(ba.sequence + 1);
    Emit(SessionEvent::Kind::kResynchronised, b->home_address, ba.status,
         "home agent's sequence number is " + std::to_string(ba.sequence) + "; retrying with " +
             std::to_string(b->next_sequence));
    if (++b->resyncs <= config_.timers.max_immediate_resyncs) {
      b->backoff = config_.timers.initial_bindack_timeout;
      SendBindingUpdate(*b);
    }
    return;
  }
  if (!b->last_sent || ba.sequence != *b->last_sent) {
    ++counters_.ba_wrong_sequence;
    return;
  }
  b->last_status = ba.status;
  last_ba_status_ = ba.status;
  for (const auto& opt : ba.options) {
    if (const auto* ack = std::get_if<Ipv4AddressAcknowledgement>(&opt);
        ack && ack->status != ipv4_ack_status::kSuccess) {
      Emit(SessionEvent::Kind::kIpv4Rejected, b->home_address, ack->status,
           "home agent refused the IPv4 home address, status " + std::to_string(ack->status));
    }
  }
  if (b->state == BindingState::kDeregistering) {
    if (ba.status >= 128) {
      ++counters_.ba_rejected;
      Emit(SessionEvent::Kind::kRejected, b->home_address, ba.status,
           "deregistration refused with status " + std::to_string(ba.status) +
               "; announcing at home anyway");
    } else {
      ++counters_.ba_accepted;
    }
    FinishDeregistration(*b, false);
    MaybeAnnounceHome();
    return;
  }
  if (ba.status >= 128) {
    ++counters_.ba_rejected;
    b->state = BindingState::kRejected;
    b->deadline.reset();
    Emit(SessionEvent::Kind::kRejected, b->home_address, ba.status,
         "home agent rejected the binding with status " + std::to_string(ba.status));
    return;
  }
  ++counters_.ba_accepted;
  b->resyncs = 0;
  const auto granted = seconds(uint64_t{ba.lifetime} * 4);
  if (granted.count() == 0) {
    // Accepted with no lifetime: nothing to refresh; try again after back-off.
    b->backoff = std::min(b->backoff * 2, config_.timers.max_bindack_timeout);
    b->deadline = now + b->backoff;
    return;
  }
  auto refresh = duration_cast<milliseconds>(granted * config_.timers.refresh_fraction);
  for (const auto& opt : ba.options)
    if (const auto* bra = std::get_if<BindingRefreshAdvice>(&opt); bra && bra->refresh_interval > 0)
      refresh = std::min<milliseconds>(refresh, seconds(uint64_t{bra->refresh_interval} * 4));
  b->state = BindingState::kRegistered;
  b->expires = now + granted;
  b->deadline = now + refresh;
  Emit(SessionEvent::Kind::kRegistered, b->home_address, ba.status,
       "binding accepted for " + std::to_string(granted.count()) + " s");
}

// ---- Guest link --------------------------------------------------------------------

void MobilitySession::HandleGuestFrame(std::span<const uint8_t> frame) {
  if (stopped_) return;
  ++counters_.guest_frames;
  // At home the guest's link is the home link, where the real router
  // answers. An answer from here would carry the router's MAC as its
  // Ethernet source and teach the home host's bridge that the router sits
  // on our TAP, so the guest's traffic would come here and be tunnelled to
  // an HA that no longer has a binding (seen on the test bed: a second NA
  // for fe80::1 right after the router's own, at every return home).
  if (at_home_) return;
  auto eth = ParseEthernetFrame(frame);
  if (!eth) {
    ++counters_.guest_malformed;
    return;
  }
  switch (eth->ether_type) {
    case ethertype::kIpv6:
      HandleGuestIpv6(*eth, eth->payload);
      break;
    case ethertype::kIpv4:
      HandleGuestIpv4(*eth, eth->payload);
      break;
    case ethertype::kArp:
      HandleGuestArp(*eth);
      break;
    default:
      break;  // not ours to route
  }
}

bool MobilitySession::AnswerNeighborDiscovery(const EthernetFrame& eth, const Ipv6Packet& ip) {
  if (ip.header.next_header != ipproto::kIcmpv6 || ip.payload.empty()) return false;
  const uint8_t type = ip.payload[0];
  const NdContext ctx{ip.header.src, ip.header.dst, ip.header.hop_limit};
  if (type == icmpv6_type::kNeighborSolicitation) {
    auto ns = DecodeNeighborSolicitation(ip.payload, ctx);
    if (!ns) {
      ++counters_.guest_malformed;
      return true;
    }
    const bool ours = ns->target == config_.router_link_local ||
                      (config_.router_global && ns->target == *config_.router_global);
    if (!ours) {
      ++counters_.nd_ignored;
      return true;
    }
    NeighborAdvertisement na;
    na.router = true;
    na.override = true;
    na.target = ns->target;
    na.target_link_layer = config_.router_mac;
    const bool from_dad = IsUnspecified(ip.header.src);
    na.solicited = !from_dad;
    const Ipv6Address dst = from_dad ? kAllNodesMulticast : ip.header.src;
    const MacAddress dst_mac =
        from_dad ? MulticastMac(kAllNodesMulticast) : ns->source_link_layer.value_or(eth.src);
    Ipv6Header h;
    h.next_header = ipproto::kIcmpv6;
    h.hop_limit = kNdHopLimit;
    h.src = ns->target;
    h.dst = dst;
    auto pkt = BuildIpv6Packet(h, EncodeNeighborAdvertisement(na, h.src, h.dst));
    if (pkt) {
      SendGuest(BuildEthernetFrame(dst_mac, config_.router_mac, ethertype::kIpv6, *pkt));
      ++counters_.nd_answered;
    }
    return true;
  }
  if (type == icmpv6_type::kRouterSolicitation) {
    if (!config_.send_router_advertisements) return true;
    auto rs = DecodeRouterSolicitation(ip.payload, ctx);
    if (!rs) {
      ++counters_.guest_malformed;
      return true;
    }
    RouterAdvertisement ra;
    ra.router_lifetime = 1800;
    ra.source_link_layer = config_.router_mac;
    ra.mtu = config_.tunnel_mtu;
    PrefixInformation pi;
    pi.prefix_length = config_.home_prefix_length;
    pi.prefix = config_.home_prefix;
    pi.valid_lifetime = 2592000;
    pi.preferred_lifetime = 604800;
    ra.prefixes.push_back(pi);
    Ipv6Header h;
    h.next_header = ipproto::kIcmpv6;
    h.hop_limit = kNdHopLimit;
    h.src = config_.router_link_local;
    h.dst = kAllNodesMulticast;
    auto pkt = BuildIpv6Packet(h, EncodeRouterAdvertisement(ra, h.src, h.dst));
    if (pkt) {
      SendGuest(BuildEthernetFrame(MulticastMac(kAllNodesMulticast), config_.router_mac,
                                   ethertype::kIpv6, *pkt));
      ++counters_.ra_sent;
    }
    return true;
  }
  // Other ND (NA, RA, redirects) and MLD stay on the link.
  return type == icmpv6_type::kNeighborAdvertisement || type == icmpv6_type::kRouterAdvertisement ||
         type == 137 || type == 143 || type == 130 || type == 131 || type == 132;
}

void MobilitySession::HandleGuestIpv6(const EthernetFrame& eth, std::span<const uint8_t> packet) {
  auto ip = ParseIpv6Packet(packet);
  if (!ip) {
    ++counters_.guest_malformed;
    return;
  }
  if (AnswerNeighborDiscovery(eth, *ip)) return;
  const auto& h = ip->header;
  if (IsLinkLocalUnicast(h.src) || IsLinkLocalUnicast(h.dst) || IsMulticast(h.dst) ||
      IsUnspecified(h.src)) {
    ++counters_.link_local_kept;
    return;
  }
  if (eth.dst != config_.router_mac) return;  // not sent to the router
  if (eth.src != config_.guest_mac) {
    ++counters_.guest_foreign_mac;
    return;
  }
  if (!InHomePrefix(h.src)) {
    ++counters_.not_home_source;
    return;
  }
  // The whole IPv6 packet, without Ethernet padding.
  const auto inner = packet.first(kIpv6HeaderSize + h.payload_length);
  if (inner.size() > config_.tunnel_mtu) {
    const Ipv6Address from = config_.router_global.value_or(config_.router_link_local);
    auto ptb = BuildIcmpv6PacketTooBig(from, h.src, config_.tunnel_mtu, inner);
    if (ptb) {
      SendGuest(BuildEthernetFrame(eth.src, config_.router_mac, ethertype::kIpv6, *ptb));
      ++counters_.too_big;
    }
    return;
  }
  if (auto st = io_.tunnel6->Send(inner); !st) {
    ++counters_.send_errors;
    return;
  }
  ++counters_.tunnelled6;
  counters_.tunnelled_bytes += inner.size();
}

void MobilitySession::HandleGuestIpv4(const EthernetFrame& eth, std::span<const uint8_t> packet) {
  if (eth.dst != config_.router_mac) return;
  if (eth.src != config_.guest_mac) {
    ++counters_.guest_foreign_mac;
    return;
  }
  auto ip = ParseIpv4Packet(packet);
  if (!ip) {
    ++counters_.guest_malformed;
    return;
  }
  if (IsIpv4Multicast(ip->header.dst) || IsIpv4Broadcast(ip->header.dst)) {
    ++counters_.link_local_kept;
    return;
  }
  if (!config_.home_address4 || ip->header.src != *config_.home_address4 ||
      io_.tunnel4 == nullptr) {
    ++counters_.not_home_source;
    return;
  }
  const auto inner = packet.first(ip->header.total_length);
  if (inner.size() > config_.tunnel_mtu && ip->header.dont_fragment) {
    if (config_.router_v4) {
      auto err = BuildIcmpv4FragmentationNeeded(*config_.router_v4, ip->header.src,
                                                static_cast<uint16_t>(config_.tunnel_mtu), inner);
      if (err) {
        SendGuest(BuildEthernetFrame(eth.src, config_.router_mac, ethertype::kIpv4, *err));
        ++counters_.too_big;
      }
    }
    return;
  }
  // Without DF an oversized packet is sent anyway: the tunnel socket lets the
  // kernel fragment the outer packet (RFC 2473 §7.1).
  if (auto st = io_.tunnel4->Send(inner); !st) {
    ++counters_.send_errors;
    return;
  }
  ++counters_.tunnelled4;
  counters_.tunnelled_bytes += inner.size();
}

void MobilitySession::HandleGuestArp(const EthernetFrame& eth) {
  auto arp = DecodeArp(eth.payload);
  if (!arp) {
    ++counters_.guest_malformed;
    return;
  }
  if (arp->operation != kArpOpRequest || !config_.router_v4 ||
      arp->target_ip != *config_.router_v4 || IsGratuitous(*arp)) {
    ++counters_.arp_ignored;
    return;
  }
  ArpPacket reply;
  reply.operation = kArpOpReply;
  reply.sender_mac = config_.router_mac;
  reply.sender_ip = *config_.router_v4;
  reply.target_mac = arp->sender_mac;
  reply.target_ip = arp->sender_ip;
  SendGuest(BuildEthernetFrame(eth.src, config_.router_mac, ethertype::kArp, EncodeArp(reply)));
  ++counters_.arp_answered;
}

// ---- From the home agent -----------------------------------------------------------

void MobilitySession::HandleTunnelled(const Ipv6Address& outer_src, uint8_t protocol,
                                      std::span<uint8_t> frame_room) {
  if (stopped_) return;
  if (frame_room.size() <= kEthernetHeaderSize) {
    ++counters_.decap_malformed;
    return;
  }
  if (outer_src != config_.home_agent) {
    ++counters_.decap_spoofed;
    return;
  }
  auto inner = std::span<const uint8_t>(frame_room).subspan(kEthernetHeaderSize);
  uint16_t ether_type = 0;
  size_t inner_len = 0;
  if (protocol == ipproto::kIpv6) {
    auto ip = ParseIpv6Packet(inner);
    if (!ip) {
      ++counters_.decap_malformed;
      return;
    }
    // A Binding Refresh Request may come through the tunnel (HA -> HoA).
    if (ip->header.next_header == ipproto::kMobility && ip->header.src == config_.home_agent) {
      auto mh = ParseMobilityPacket(inner);
      if (!mh) {
        ++counters_.mh_malformed;
      } else if (std::holds_alternative<BindingRefreshRequest>(mh->header.message)) {
        HandleRefreshRequest();
      } else {
        ++counters_.ba_unexpected;
      }
      return;
    }
    if (!IsHomeAddress(ip->header.dst)) {
      ++counters_.decap_not_ours;
      return;
    }
    ether_type = ethertype::kIpv6;
    inner_len = kIpv6HeaderSize + ip->header.payload_length;
    ++counters_.decap_delivered6;
  } else if (protocol == ipproto::kIpv4) {
    auto ip = ParseIpv4Packet(inner);
    if (!ip) {
      ++counters_.decap_malformed;
      return;
    }
    if (!config_.home_address4 || ip->header.dst != *config_.home_address4) {
      ++counters_.decap_not_ours;
      return;
    }
    ether_type = ethertype::kIpv4;
    inner_len = ip->header.total_length;
    ++counters_.decap_delivered4;
  } else {
    ++counters_.decap_malformed;
    return;
  }
  // Ethernet header in the headroom: guest MAC <- router MAC.
  uint8_t* h = frame_room.data();
  std::memcpy(h, config_.guest_mac.data(), 6);
  std::memcpy(h + 6, config_.router_mac.data(), 6);
  h[12] = static_cast<uint8_t>(ether_type >> 8);
  h[13] = static_cast<uint8_t>(ether_type);
  counters_.decap_bytes += inner_len;
  SendGuest(frame_room.first(kEthernetHeaderSize + inner_len));
}

// ---- Status --------------------------------------------------------------------

SessionState MobilitySession::state() const {
  if (stopped_) return SessionState::kStopped;
  bool any_registering = false, any_rejected = false, any_dereg = false, all_registered = true,
       all_home = true, all_idle = true;
  for (const auto& b : bindings_) {
    any_registering |= b.state == BindingState::kRegistering;
    any_rejected |= b.state == BindingState::kRejected;
    any_dereg |= b.state == BindingState::kDeregistering;
    all_registered &= b.state == BindingState::kRegistered;
    all_home &= b.state == BindingState::kHome;
    all_idle &= b.state == BindingState::kIdle;
  }
  if (all_idle) return SessionState::kIdle;
  if (any_dereg) return SessionState::kDeregistering;
  if (all_home) return SessionState::kHome;
  if (any_rejected) return SessionState::kRejected;
  if (all_registered) return SessionState::kRegistered;
  (void)any_registering;
  return SessionState::kRegistering;
}

SessionStatus MobilitySession::Status() const {
  SessionStatus s;
  s.state = state();
  s.last_ba_status = last_ba_status_;
  s.counters = counters_;
  const auto now = clock_.Now();
  for (const auto& b : bindings_) {
    BindingStatus bs;
    bs.home_address = b.home_address;
    bs.state = b.state;
    bs.sequence_valid = b.last_sent.has_value();
    bs.last_sequence = b.last_sent.value_or(0);
    if (b.expires)
      bs.lifetime_left = std::max(seconds(0), duration_cast<seconds>(*b.expires - now));
    bs.last_status = b.last_status;
    bs.retransmit_interval = b.backoff;
    s.bindings.push_back(bs);
  }
  return s;
}

}  // namespace kagemusha::tunnel

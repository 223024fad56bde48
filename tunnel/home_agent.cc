// HomeAgent: Binding Update processing, DAD on behalf, proxy ND/ARP and the
// tunnels. See home_agent.h and docs/home-agent.md.
#include "kagemusha/tunnel/home_agent.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kagemusha/tunnel/arp.h"
#include "kagemusha/tunnel/neighbor_discovery.h"

namespace kagemusha::tunnel {
namespace {

// One step of duplicate address detection for every probe in `probes` (a map
// from home address to something with `deadline` and `probes_left`): sends
// the probes that are due and returns the addresses whose probing ended
// without a conflict. Shared by RFC-mode and optimistic-mode DAD.
template <class ProbeMap, class SendProbe>
std::vector<Ipv6Address> AdvanceDadProbes(ProbeMap& probes, Clock::TimePoint now,
                                          Clock::Duration retrans_timer, SendProbe send) {
  std::vector<Ipv6Address> done;
  for (auto& [hoa, p] : probes) {
    if (p.deadline > now) continue;
    if (p.probes_left > 0) {
      --p.probes_left;
      p.deadline = now + retrans_timer;
      send(hoa);
      continue;
    }
    done.push_back(hoa);
  }
  return done;
}

using std::chrono::duration_cast;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr uint16_t kMaxLifetimeUnits = 0xffff;  // 4-second units in a BU/BA

const MacAddress kAllNodesMac = {0x33, 0x33, 0, 0, 0, 1};

// How long a DAD revocation (optimistic mode) waits for the home address's
// next BU, at least; and how many such marks are kept.
constexpr std::chrono::seconds kRevocationMemory{600};
constexpr size_t kMaxRevocations = 4096;

template <class T>
const T* FindOption(const MobilityOptions& options) {
  for (const auto& o : options) {
    if (const T* t = std::get_if<T>(&o)) return t;
  }
  return nullptr;
}

bool IsZero(const Ipv4Address& a) { return a == Ipv4Address{}; }

}  // namespace

const char* DadModeName(DadMode m) {
  switch (m) {
    case DadMode::kRfc:
      return "rfc";
    case DadMode::kOptimistic:
      return "optimistic";
    case DadMode::kOff:
      return "off";
  }
  return "?";
}

Result<DadMode> ParseDadMode(const std::string& text) {
  if (text == "rfc") return DadMode::kRfc;
  if (text == "optimistic") return DadMode::kOptimistic;
  if (text == "off") return DadMode::kOff;
  return Fail(Error::Invalid("--dad '" + text + "' is not one of rfc, optimistic, off"));
}

bool Ipv6Prefix::Contains(const Ipv6Address& a) const {
  for (int bit = 0; bit < length; ++bit) {
    int byte = bit / 8;
    uint8_t mask = uint8_t(0x80 >> (bit % 8));
    if ((a[byte] & mask) != (prefix[byte] & mask)) return false;
  }
  return true;
}

bool Ipv4Prefix::Contains(const Ipv4Address& a) const {
  for (int bit = 0; bit < length; ++bit) {
    int byte = bit / 8;
    uint8_t mask = uint8_t(0x80 >> (bit % 8));
    if ((a[byte] & mask) != (prefix[byte] & mask)) return false;
  }
  return true;
}

namespace {
Result<std::pair<std::string, int>> SplitPrefix(const std::string& text, int max) {
  auto slash = text.find('/');
  if (slash == std::string::npos) {
    return Fail(Error::Invalid("'" + text + "' has no /LENGTH"));
  }
  std::string len = text.substr(slash + 1);
  if (len.empty() || len.size() > 3 || !std::all_of(len.begin(), len.end(), ::isdigit)) {
    return Fail(Error::Invalid("'" + text + "': bad prefix length"));
  }
  int n = std::stoi(len);
  if (n > max)
    return Fail(Error::Invalid("'" + text + "': prefix length above " + std::to_string(max)));
  return std::pair{text.substr(0, slash), n};
}
}  // namespace

Result<Ipv6Prefix> ParseIpv6Prefix(const std::string& text) {
  auto parts = SplitPrefix(text, 128);
  if (!parts) return Fail(parts.error());
  auto a = ParseIpv6(parts->first);
  if (!a) return Fail(a.error());
  return Ipv6Prefix{*a, uint8_t(parts->second)};
}

Result<Ipv4Prefix> ParseIpv4Prefix(const std::string& text) {
  auto parts = SplitPrefix(text, 32);
  if (!parts) return Fail(parts.error());
  auto a = ParseIpv4(parts->first);
  if (!a) return Fail(a.error());
  return Ipv4Prefix{*a, uint8_t(parts->second)};
}

Status ValidateHomeAgentConfig(const HomeAgentConfig& c) {
  if (IsUnspecified(c.address) || IsMulticast(c.address)) {
    return Fail(Error::Invalid("the home agent address must be a unicast address"));
  }
  if (!c.home_prefix.Contains(c.address)) {
    return Fail(Error::Invalid("the home agent address " + FormatIpv6(c.address) +
                               " is not in the home prefix"));
  }
  if (c.max_lifetime.count() < 4 || c.max_lifetime.count() > int64_t(kMaxLifetimeUnits) * 4) {
    return Fail(Error::Invalid("--max-lifetime must be between 4 and 262140 seconds"));
  }
  if (!(c.bu_rate >= 0) || c.bu_rate > 1e6) {
    return Fail(Error::Invalid("--bu-rate must be between 0 (unlimited) and 1000000"));
  }
  if (c.address4 && !c.home_prefix4) {
    return Fail(Error::Invalid("--address4 needs --home-prefix4"));
  }
  if (c.address4 && c.home_prefix4 && !c.home_prefix4->Contains(*c.address4)) {
    return Fail(Error::Invalid("--address4 is not in --home-prefix4"));
  }
  for (const auto& a : c.allow) {
    if (!c.home_prefix.Contains(a)) {
      return Fail(Error::Invalid("--allow " + FormatIpv6(a) + " is not in the home prefix"));
    }
  }
  for (size_t i = 0; i < c.keys.size(); ++i) {
    if (c.keys[i].key.empty()) return Fail(Error::Invalid("empty key"));
    for (size_t j = 0; j < i; ++j) {
      if (c.keys[j].home_address == c.keys[i].home_address && c.keys[j].spi == c.keys[i].spi) {
        return Fail(Error::Invalid("two keys for " + FormatIpv6(c.keys[i].home_address) +
                                   " with SPI " + std::to_string(c.keys[i].spi)));
      }
    }
  }
  if (!c.insecure && c.keys.empty()) {
    return Fail(Error::Invalid(
        "no --key given: every BU would be refused; give --key HOA:SPI:KEYFILE or --insecure"));
  }
  if (c.retrans_timer.count() <= 0 || c.dad_transmits < 1) {
    return Fail(Error::Invalid("DAD needs a positive RetransTimer and at least one probe"));
  }
  return Ok();
}

// ---- BuRateLimiter ----------------------------------------------------------------

BuRateLimiter::BuRateLimiter(double rate_per_second, double burst, size_t max_sources)
    : rate_(rate_per_second),
      burst_(std::max(1.0, burst)),
      max_sources_(std::max<size_t>(1, max_sources)) {}

bool BuRateLimiter::Allow(const Ipv6Address& source, Clock::TimePoint now) {
  if (rate_ <= 0) return true;  // unlimited
  auto it = table_.find(source);
  if (it == table_.end()) {
    if (table_.size() >= max_sources_) {
      table_.erase(lru_.back());
      lru_.pop_back();
    }
    lru_.push_front(source);
    Bucket b;
    b.tokens = burst_ - 1;
    b.last = now;
    b.lru = lru_.begin();
    table_.emplace(source, b);
    return true;
  }
  Bucket& b = it->second;
  lru_.splice(lru_.begin(), lru_, b.lru);
  double elapsed = std::chrono::duration<double>(now - b.last).count();
  if (elapsed > 0) {
    b.tokens = std::min(burst_, b.tokens + elapsed * rate_);
    b.last = now;
  }
  if (b.tokens < 1) return false;
  b.tokens -= 1;
  return true;
}

// ---- HomeAgent ---------------------------------------------------------------------

HomeAgent::HomeAgent(HomeAgentConfig config, HomeAgentPorts ports, Clock& clock,
                     BindingJournal* journal, WallClock wall)
    : config_(std::move(config)),
      ports_(ports),
      clock_(clock),
      journal_(journal),
      wall_(wall ? std::move(wall) : WallClock([] { return std::chrono::system_clock::now(); })),
      cache_(config_.max_bindings),
      limiter_(config_.bu_rate, config_.bu_rate, config_.rate_table_size) {}

bool HomeAgent::Allowed(const Ipv6Address& hoa) const {
  if (config_.allow.empty() && config_.keys.empty()) return true;
  if (std::find(config_.allow.begin(), config_.allow.end(), hoa) != config_.allow.end())
    return true;
  return AnyKeyFor(hoa) != nullptr;
}

const HomeKey* HomeAgent::KeyFor(const Ipv6Address& hoa, uint32_t spi) const {
  for (const auto& k : config_.keys) {
    if (k.home_address == hoa && k.spi == spi) return &k;
  }
  return nullptr;
}

const HomeKey* HomeAgent::AnyKeyFor(const Ipv6Address& hoa) const {
  for (const auto& k : config_.keys) {
    if (k.home_address == hoa) return &k;
  }
  return nullptr;
}

uint16_t HomeAgent::GrantedUnits(uint16_t requested_units) const {
  auto cap = uint16_t(std::min<int64_t>(kMaxLifetimeUnits, config_.max_lifetime.count() / 4));
  return std::min(requested_units, cap);
}

Ipv6Address HomeAgent::LinkLocalOf(const Ipv6Address& hoa) {
  Ipv6Address ll{};
  ll[0] = 0xfe;
  ll[1] = 0x80;
  std::copy(hoa.begin() + 8, hoa.end(), ll.begin() + 8);
  return ll;
}

const CacheEntry* HomeAgent::FindProxied(const Ipv6Address& target) const {
  if (const CacheEntry* b = cache_.Find(target)) return b;
  auto it = link_local_.find(target);
  return it == link_local_.end() ? nullptr : cache_.Find(it->second);
}

void HomeAgent::HandleMobilityPacket(std::span<const uint8_t> packet) {
  ++counters_.bu_received;
  auto ip = ParseIpv6Packet(packet);
  if (!ip) {
    ++counters_.bu_malformed;
    return;
  }
  auto ul = FindUpperLayer(*ip);
  if (!ul || ul->protocol != ipproto::kMobility) {
    ++counters_.bu_malformed;
    return;
  }
  auto mh = DecodeMobilityHeader(ul->data);
  if (!mh) {
    ++counters_.bu_malformed;
    return;
  }
  if (!VerifyMobilityHeaderChecksum(ul->data, {ul->checksum_src, ul->checksum_dst})) {
    ++counters_.bu_bad_checksum;
    return;
  }
  const auto* bu = std::get_if<BindingUpdate>(&mh->message);
  if (!bu || ul->routing) {  // RFC 6275 §6.1: an HAO only on a BU; we expect no RH2
    ++counters_.bu_malformed;
    return;
  }
  if (!limiter_.Allow(ip->header.src, clock_.Now())) {
    ++counters_.bu_rate_limited;
    return;
  }
  BuContext ctx;
  ctx.source = ip->header.src;
  ctx.home_address = ul->home_address.value_or(ip->header.src);
  ctx.care_of = ip->header.src;
  if (const auto* alt = FindOption<AlternateCareOfAddress>(bu->options)) {
    ctx.care_of = alt->address;
  }
  ctx.bu = *bu;
  if (const auto* h4 = FindOption<Ipv4HomeAddress>(bu->options)) ctx.home4 = *h4;

  // Checks in the order of RFC 6275 §10.3.1; authentication (RFC 4285)
  // after the checks that need no key, so an unknown or foreign home address
  // is told so instead of "authentication failed".
  if (!(bu->flags & bu_flag::kHomeRegistration)) {
    SendBa(ctx, ba_status::kNotHomeAgentForThisMobileNode, bu->sequence, 0, std::nullopt);
    return;
  }
  if (!config_.home_prefix.Contains(ctx.home_address) || IsLinkLocalUnicast(ctx.home_address)) {
    SendBa(ctx, ba_status::kNotHomeSubnet, bu->sequence, 0, std::nullopt);
    return;
  }
  if (!Allowed(ctx.home_address) || ctx.home_address == config_.address) {
    SendBa(ctx, ba_status::kAdministrativelyProhibited, bu->sequence, 0, std::nullopt);
    return;
  }
  if (!config_.insecure) {
    const auto* auth = FindOption<MobilityMessageAuthentication>(bu->options);
    if (!auth || auth->subtype != mh_auth_subtype::kMnHa) {
      ++counters_.bu_auth_missing;
      return;
    }
    const HomeKey* key = KeyFor(ctx.home_address, auth->spi);
    kagemusha::Status verified = Fail(Error::Permission("no key for this SPI"));
    if (key) {
      MhAuthParams p;
      p.spi = key->spi;
      p.key = key->key;
      p.care_of = ctx.source;
      p.home_address = ctx.home_address;
      p.algorithm = key->algorithm;
      verified = VerifyMobilityMessageAuthentication(ul->data, p);
    }
    if (!verified) {
      ++counters_.bu_auth_failed;
      spdlog::warn("BU for {} from {}: authentication failed (SPI {}): {}",
                   FormatIpv6(ctx.home_address), FormatIpv6(ctx.source), auth->spi,
                   verified.error().message());
      SendBa(ctx, ba_status::kAuthenticationFailed, bu->sequence, 0, std::nullopt);
      return;
    }
    ctx.key = key;
  }
  ProcessBindingUpdate(std::move(ctx));
}

void HomeAgent::ProcessBindingUpdate(BuContext ctx) {
  const BindingUpdate& bu = ctx.bu;
  const Ipv6Address& hoa = ctx.home_address;
  if (pending_dad_.count(hoa)) {  // a retransmission while we probe: the BA comes with the result
    ++counters_.bu_during_dad;
    return;
  }
  const CacheEntry* existing = cache_.Find(hoa);
  if (existing && !SequenceNewer(bu.sequence, existing->sequence)) {
    SendBa(ctx, ba_status::kSequenceNumberOutOfWindow, existing->sequence, 0, std::nullopt);
    return;
  }
  if (bu.lifetime == 0 || ctx.care_of == hoa) {
    Deregister(ctx);
    return;
  }
  if (auto it = revoked_.find(hoa); it != revoked_.end()) {
    revoked_.erase(it);
    SendBa(ctx, ba_status::kDuplicateAddressDetectionFailed, bu.sequence, 0, std::nullopt);
    return;
  }
  if (existing) {
    Accept(ctx, /*new_binding=*/false, existing->state);
    return;
  }
  switch (config_.dad) {
    case DadMode::kOff:
      Accept(ctx, true, CacheEntryState::kActive);
      return;
    case DadMode::kOptimistic: {
      // Usable at once: Accept sends the Override NA and the BA now; the
      // probe runs in parallel and revokes the binding on a conflict. The NA
      // goes out before the probe, so an owner's defending NA (Override, to
      // all-nodes) is the last word in every neighbour cache.
      Accept(ctx, true, CacheEntryState::kOptimistic);
      if (!cache_.Find(hoa)) return;  // refused (resources)
      PendingDad p;
      p.ctx = ctx;
      p.deadline = clock_.Now() + config_.retrans_timer;
      p.probes_left = config_.dad_transmits - 1;
      optimistic_probe_[hoa] = std::move(p);
      SendDadProbe(hoa);
      return;
    }
    case DadMode::kRfc: {
      PendingDad p;
      p.ctx = ctx;
      p.deadline = clock_.Now() + config_.retrans_timer;
      p.probes_left = config_.dad_transmits - 1;
      pending_dad_[hoa] = std::move(p);
      SendDadProbe(hoa);
      return;
    }
  }
}

std::optional<Ipv4AddressAcknowledgement> HomeAgent::CheckIpv4(const BuContext& ctx) const {
  if (!ctx.home4) return std::nullopt;
  Ipv4AddressAcknowledgement ack;
  ack.address = ctx.home4->address;
  ack.prefix_length = config_.home_prefix4 ? config_.home_prefix4->length : 0;
  const Ipv4Address& a = ctx.home4->address;
  if (!config_.home_prefix4) {
    ack.status = ipv4_ack_status::kAdministrativelyProhibited;
  } else if (IsZero(a)) {
    ack.status = ipv4_ack_status::kDynamicIpv4HomeAddressNotAvailable;
  } else if (!config_.home_prefix4->Contains(a)) {
    ack.status = ipv4_ack_status::kIncorrectIpv4HomeAddress;
  } else if ((config_.address4 && a == *config_.address4) || a[3] == 255 || a[3] == 0 ||
             a[0] >= 224) {
    ack.status = ipv4_ack_status::kInvalidIpv4Address;
  } else if (const CacheEntry* other = cache_.FindByHomeAddress4(a);
             other && other->home_address != ctx.home_address) {
    ack.status = ipv4_ack_status::kAdministrativelyProhibited;
  } else {
    ack.status = ipv4_ack_status::kSuccess;
  }
  return ack;
}

void HomeAgent::Accept(const BuContext& ctx, bool new_binding, CacheEntryState state) {
  const Ipv6Address& hoa = ctx.home_address;
  uint16_t units = GrantedUnits(ctx.bu.lifetime);
  auto ack4 = CheckIpv4(ctx);
  const CacheEntry* old = cache_.Find(hoa);
  bool moved = old && old->care_of != ctx.care_of;
  std::optional<Ipv4Address> old4 = old ? old->home_address4 : std::nullopt;

  CacheEntry e;
  e.home_address = hoa;
  e.care_of = ctx.care_of;
  e.sequence = ctx.bu.sequence;
  e.flags = ctx.bu.flags;
  e.granted_lifetime = seconds(int64_t(units) * 4);
  e.expires = clock_.Now() + e.granted_lifetime;
  e.state = state;
  e.spi = ctx.key ? ctx.key->spi : 0;
  if (ack4 && ack4->status == ipv4_ack_status::kSuccess) e.home_address4 = ack4->address;
  if (auto s = cache_.Upsert(e); !s) {
    spdlog::warn("binding for {} refused: {}", FormatIpv6(hoa), s.error().message());
    SendBa(ctx, ba_status::kInsufficientResources, ctx.bu.sequence, 0, std::nullopt);
    return;
  }
  if (e.flags & bu_flag::kLinkLocal) {
    link_local_[LinkLocalOf(hoa)] = hoa;
  } else {
    link_local_.erase(LinkLocalOf(hoa));
  }
  const CacheEntry* now_bound = cache_.Find(hoa);
  // A new binding, or a new IPv4 home address on a refresh, is announced so
  // the home link sends its traffic to us (RFC 6275 §10.4.1). The
  // announcement goes before the journal's fdatasync: the binding is in the
  // cache and carries traffic already, and a crash before the write only
  // means the mobile's next BU (it has no BA yet) binds again. The BA waits
  // for the write, so an acknowledged binding is always on disk.
  if (new_binding) {
    Announce(*now_bound);
  } else if (e.home_address4 && e.home_address4 != old4) {
    if (ports_.link->Send(BuildGratuitousArpFrame(config_.mac, *e.home_address4))) {
      ++counters_.proxy_arp_sent;
    }
  }
  Persist(e);
  if (new_binding) {
    ++counters_.accepted;
    spdlog::info("binding {} -> {} accepted (seq {}, {} s, dad {}{})", FormatIpv6(hoa),
                 FormatIpv6(e.care_of), e.sequence, e.granted_lifetime.count(),
                 DadModeName(config_.dad),
                 e.home_address4 ? ", IPv4 " + FormatIpv4(*e.home_address4) : std::string());
  } else {
    ++counters_.refreshed;
    if (moved) {
      spdlog::info("binding {} moved to {} (seq {})", FormatIpv6(hoa), FormatIpv6(e.care_of),
                   e.sequence);
    }
  }
  if (ctx.bu.flags & bu_flag::kAcknowledge) {
    SendBa(ctx, ba_status::kAccepted, ctx.bu.sequence, units, ack4);
  }
}

void HomeAgent::Deregister(const BuContext& ctx) {
  const Ipv6Address& hoa = ctx.home_address;
  if (!cache_.Find(hoa)) {
    // RFC 6275 §10.3.2: no binding to delete.
    SendBa(ctx, ba_status::kNotHomeAgentForThisMobileNode, ctx.bu.sequence, 0, std::nullopt);
    return;
  }
  cache_.Remove(hoa);
  link_local_.erase(LinkLocalOf(hoa));
  optimistic_probe_.erase(hoa);
  PersistRemove(hoa);
  ++counters_.deregistered;
  spdlog::info("binding {} deregistered (seq {})", FormatIpv6(hoa), ctx.bu.sequence);
  // The proxy stops here; the mobile node at home announces itself.
  SendBa(ctx, ba_status::kAccepted, ctx.bu.sequence, 0,
         ctx.home4 ? std::optional(Ipv4AddressAcknowledgement{
                         ipv4_ack_status::kSuccess, ctx.home4->prefix_length, ctx.home4->address})
                   : std::nullopt);
}

void HomeAgent::SendBa(const BuContext& ctx, uint8_t status, uint16_t sequence,
                       uint16_t lifetime_units, std::optional<Ipv4AddressAcknowledgement> ack4) {
  if (status >= 128) ++counters_.rejected;
  BindingAcknowledgement ba;
  ba.status = status;
  ba.sequence = sequence;
  ba.lifetime = lifetime_units;
  // K stays clear: there is no IKE here (RFC 6275 §10.3.1).
  if (ack4) ba.options.push_back(*ack4);
  // The BA goes to the BU's source; a type 2 routing header carries the home
  // address unless the mobile node is at home (RFC 6275 §6.1.8, §9.5.4).
  const Ipv6Address& dst = ctx.source;
  bool routed = dst != ctx.home_address;
  ChecksumAddresses sums{config_.address, routed ? ctx.home_address : dst};
  Result<std::vector<uint8_t>> mh;
  if (ctx.key) {
    MhAuthParams p;
    p.spi = ctx.key->spi;
    p.key = ctx.key->key;
    p.care_of = dst;
    p.home_address = ctx.home_address;
    p.algorithm = ctx.key->algorithm;
    mh = EncodeAuthenticatedMobilityHeader(ba, p, sums);
  } else {
    mh = EncodeMobilityHeader(ba, sums);
  }
  if (!mh) {
    ++counters_.ba_send_errors;
    return;
  }
  auto packet = BuildMobilityPacket(config_.address, dst, std::nullopt,
                                    routed ? std::optional(ctx.home_address) : std::nullopt, *mh);
  if (!packet || !ports_.mobility->Send(*packet)) {
    ++counters_.ba_send_errors;
    return;
  }
  ++counters_.ba_sent;
  if (status >= 128) {
    spdlog::info("BU for {} from {} rejected with status {} (seq {})", FormatIpv6(ctx.home_address),
                 FormatIpv6(ctx.source), status, sequence);
  }
}

// ---- DAD --------------------------------------------------------------------------

void HomeAgent::SendDadProbe(const Ipv6Address& target) {
  ++counters_.dad_probes;
  (void)ports_.link->Send(BuildNeighborSolicitationFrame(config_.mac, Ipv6Address{}, target));
}

void HomeAgent::NoteDadConflict(const Ipv6Address& target) {
  if (auto it = pending_dad_.find(target); it != pending_dad_.end()) {
    ++counters_.dad_conflicts;
    BuContext ctx = it->second.ctx;
    pending_dad_.erase(it);
    spdlog::warn("DAD for {} failed: the address is in use on the home link", FormatIpv6(target));
    SendBa(ctx, ba_status::kDuplicateAddressDetectionFailed, ctx.bu.sequence, 0, std::nullopt);
    return;
  }
  if (auto it = optimistic_probe_.find(target); it != optimistic_probe_.end()) {
    ++counters_.dad_conflicts;
    ++counters_.dad_revoked;
    optimistic_probe_.erase(it);
    cache_.Remove(target);
    link_local_.erase(LinkLocalOf(target));
    PersistRemove(target);
    if (revoked_.size() >= kMaxRevocations) revoked_.erase(revoked_.begin());
    revoked_[target] = clock_.Now();
    spdlog::warn(
        "optimistic binding for {} revoked: DAD found the address in use on the home link; its "
        "next BU gets status 134",
        FormatIpv6(target));
  }
}

void HomeAgent::OnTimer() {
  auto now = clock_.Now();
  for (const auto& b : cache_.Expire(now)) {
    ++counters_.expired;
    link_local_.erase(LinkLocalOf(b.home_address));
    optimistic_probe_.erase(b.home_address);
    PersistRemove(b.home_address);
    spdlog::info("binding {} -> {} expired", FormatIpv6(b.home_address), FormatIpv6(b.care_of));
  }
  auto send_probe = [this](const Ipv6Address& hoa) { SendDadProbe(hoa); };
  for (const auto& hoa : AdvanceDadProbes(pending_dad_, now, config_.retrans_timer, send_probe)) {
    BuContext ctx = pending_dad_[hoa].ctx;
    pending_dad_.erase(hoa);
    Accept(ctx, true, CacheEntryState::kActive);
  }
  for (const auto& hoa :
       AdvanceDadProbes(optimistic_probe_, now, config_.retrans_timer, send_probe)) {
    optimistic_probe_.erase(hoa);
    // Announced once more (a second unsolicited NA, as RFC 4861 §7.2.6
    // allows up to MAX_NEIGHBOR_ADVERTISEMENT), in case the first was lost.
    if (cache_.SetState(hoa, CacheEntryState::kActive)) Announce(*cache_.Find(hoa));
  }
  // Forget revocations nobody asked about for a while (the MN retries on
  // its own schedule, so the mark outlives short lifetimes).
  auto keep = std::max<Clock::Duration>(config_.max_lifetime, kRevocationMemory);
  for (auto it = revoked_.begin(); it != revoked_.end();) {
    it = now - it->second > keep ? revoked_.erase(it) : std::next(it);
  }
}

std::optional<Clock::TimePoint> HomeAgent::NextDeadline() const {
  std::optional<Clock::TimePoint> next = cache_.NextExpiry();
  auto consider = [&](Clock::TimePoint t) {
    if (!next || t < *next) next = t;
  };
  for (const auto& [hoa, p] : pending_dad_) consider(p.deadline);
  for (const auto& [hoa, p] : optimistic_probe_) consider(p.deadline);
  return next;
}

// ---- Proxy ND / ARP ---------------------------------------------------------------------

void HomeAgent::SendNeighborAdvertisement(const Ipv6Address& target, const Ipv6Address& dst,
                                          const MacAddress& dst_mac, bool solicited,
                                          bool override_flag) {
  NeighborAdvertisement na;
  na.solicited = solicited;
  na.override = override_flag;
  na.target = target;
  na.target_link_layer = config_.mac;
  Ipv6Header h;
  h.next_header = ipproto::kIcmpv6;
  h.hop_limit = kNdHopLimit;
  h.src = config_.address;
  h.dst = dst;
  auto icmp = EncodeNeighborAdvertisement(na, h.src, h.dst);
  auto ip = BuildIpv6Packet(h, icmp);
  if (!ip) return;
  if (ports_.link->Send(BuildEthernetFrame(dst_mac, config_.mac, ethertype::kIpv6, *ip))) {
    ++counters_.proxy_na_sent;
  }
}

void HomeAgent::Announce(const CacheEntry& b) {
  // Active and optimistic bindings alike: an optimistic binding must take
  // the home link's traffic at once, or optimistic DAD gains nothing (the
  // home router keeps a REACHABLE entry with the mobile's old MAC). This is
  // not RFC 4429 §3.3, which is about a node's own new address: here the
  // address was in use by this very mobile node a moment ago, and a
  // conflict revokes the binding (NoteDadConflict).
  SendNeighborAdvertisement(b.home_address, kAllNodesMulticast, kAllNodesMac, false, true);
  if (b.flags & bu_flag::kLinkLocal) {
    SendNeighborAdvertisement(LinkLocalOf(b.home_address), kAllNodesMulticast, kAllNodesMac, false,
                              true);
  }
  if (b.home_address4) {
    if (ports_.link->Send(BuildGratuitousArpFrame(config_.mac, *b.home_address4))) {
      ++counters_.proxy_arp_sent;
    }
  }
}

void HomeAgent::HandleNeighborSolicitation(const Ipv6Packet& ip, const EthernetFrame& eth,
                                           std::span<const uint8_t> icmp) {
  auto ns = DecodeNeighborSolicitation(icmp, {ip.header.src, ip.header.dst, ip.header.hop_limit});
  if (!ns) {
    ++counters_.link_malformed;
    return;
  }
  bool dad_probe = IsUnspecified(ip.header.src);
  if (dad_probe && (pending_dad_.count(ns->target) || optimistic_probe_.count(ns->target))) {
    // Someone else probes the same address: both must give it up (RFC 4862 §5.4.3).
    NoteDadConflict(ns->target);
    return;
  }
  const CacheEntry* b = FindProxied(ns->target);
  if (!b) return;
  // Override in both states: an optimistic binding is announced with
  // Override already (Announce), and a solicited NA without it would not
  // replace a stale entry with the mobile's old MAC.
  if (dad_probe) {
    // Defend the bound address (RFC 4861 §7.2.4: answer a DAD probe to all-nodes).
    SendNeighborAdvertisement(ns->target, kAllNodesMulticast, kAllNodesMac, false, true);
  } else {
    SendNeighborAdvertisement(ns->target, ip.header.src, ns->source_link_layer.value_or(eth.src),
                              true, true);
  }
}

void HomeAgent::HandleArp(const EthernetFrame& eth) {
  auto arp = DecodeArp(eth.payload);
  if (!arp) {
    ++counters_.link_malformed;
    return;
  }
  if (arp->operation != kArpOpRequest || IsGratuitous(*arp)) return;
  const CacheEntry* b = cache_.FindByHomeAddress4(arp->target_ip);
  if (!b) return;  // optimistic bindings are proxied too (see Announce)
  ArpPacket reply;
  reply.operation = kArpOpReply;
  reply.sender_mac = config_.mac;
  reply.sender_ip = arp->target_ip;
  reply.target_mac = arp->sender_mac;
  reply.target_ip = arp->sender_ip;
  if (ports_.link->Send(
          BuildEthernetFrame(arp->sender_mac, config_.mac, ethertype::kArp, EncodeArp(reply)))) {
    ++counters_.proxy_arp_sent;
  }
}

// ---- Frames and tunnels -----------------------------------------------------------

void HomeAgent::HandleLinkFrame(std::span<const uint8_t> frame) {
  ++counters_.link_frames;
  auto eth = ParseEthernetFrame(frame);
  if (!eth) {
    ++counters_.link_malformed;
    return;
  }
  switch (eth->ether_type) {
    case ethertype::kIpv6:
      HandleIpv6Frame(*eth);
      break;
    case ethertype::kIpv4:
      HandleIpv4Frame(*eth);
      break;
    case ethertype::kArp:
      HandleArp(*eth);
      break;
    default:
      break;
  }
}

void HomeAgent::HandleIpv6Frame(const EthernetFrame& eth) {
  auto ip = ParseIpv6Packet(eth.payload);
  if (!ip) {
    ++counters_.link_malformed;
    return;
  }
  std::span<const uint8_t> whole = eth.payload.first(kIpv6HeaderSize + ip->payload.size());
  if (ip->header.dst == config_.address) {
    // A BU reaches us here because the kernel drops it (Home Address option).
    auto ul = FindUpperLayer(*ip);
    if (!ul) {
      ++counters_.link_malformed;  // e.g. a BU cut inside its Destination Options
    } else if (ul->protocol == ipproto::kMobility) {
      HandleMobilityPacket(whole);
    }
    return;
  }
  if (ip->header.next_header == ipproto::kIcmpv6 && ip->payload.size() >= 1) {
    uint8_t type = ip->payload[0];
    if (type == icmpv6_type::kNeighborSolicitation) {
      HandleNeighborSolicitation(*ip, eth, ip->payload);
      return;
    }
    if (type == icmpv6_type::kNeighborAdvertisement) {
      auto na = DecodeNeighborAdvertisement(ip->payload,
                                            {ip->header.src, ip->header.dst, ip->header.hop_limit});
      if (na) NoteDadConflict(na->target);
      return;
    }
  }
  if (eth.dst != config_.mac) return;
  const CacheEntry* b = cache_.Find(ip->header.dst);
  if (b) Encapsulate(*b, whole, false);
}

void HomeAgent::HandleIpv4Frame(const EthernetFrame& eth) {
  if (eth.dst != config_.mac) return;
  auto ip = ParseIpv4Packet(eth.payload);
  if (!ip) {
    ++counters_.link_malformed;
    return;
  }
  const CacheEntry* b = cache_.FindByHomeAddress4(ip->header.dst);
  if (!b) return;
  auto packet = eth.payload.first(ip->header.total_length);
  if (packet.size() > config_.link_mtu) {
    // GRO merged segments that crossed the link one by one (the fast path
    // turns it on); one the fast path left to user space (segments too big
    // for the tunnel, or no fast path) would be dropped by the guest's link
    // as one merged packet, so it goes on as it came.
    auto segments = SegmentIpv4Tcp(packet, config_.link_mtu);
    if (!segments.empty()) {
      ++counters_.resegmented;
      for (const auto& s : segments) Encapsulate(*b, s, true);
      return;
    }
  }
  Encapsulate(*b, packet, true);
}

namespace {
// Decrements the IPv6 hop limit or IPv4 TTL of `p` in place (fixing the IPv4
// header checksum); false when the packet must not be forwarded.
bool DecrementHopLimit(std::vector<uint8_t>& p, bool ipv4) {
  if (ipv4) {
    if (p.size() < kIpv4MinHeaderSize || p[8] <= 1) return false;
    p[8] -= 1;
    size_t ihl = size_t(p[0] & 0x0f) * 4;
    if (ihl < kIpv4MinHeaderSize || ihl > p.size()) return false;
    p[10] = p[11] = 0;
    uint16_t sum = InternetChecksum(std::span<const uint8_t>(p.data(), ihl));
    p[10] = uint8_t(sum >> 8);
    p[11] = uint8_t(sum);
    return true;
  }
  if (p.size() < kIpv6HeaderSize || p[7] <= 1) return false;
  p[7] -= 1;
  return true;
}
}  // namespace

void HomeAgent::Encapsulate(const CacheEntry& b, std::span<const uint8_t> packet, bool ipv4) {
  scratch_.assign(packet.begin(), packet.end());
  if (!DecrementHopLimit(scratch_, ipv4)) {
    ++counters_.hop_limit_exceeded;
    return;
  }
  Ipv6DatagramSink* sink = ipv4 ? ports_.tunnel4 : ports_.tunnel6;
  if (sink->SendTo(b.care_of, scratch_)) {
    ++counters_.encapsulated;
  } else {
    ++counters_.encap_errors;
  }
}

void HomeAgent::HandleTunnelPacket(uint8_t protocol, const Ipv6Address& outer_src,
                                   std::span<const uint8_t> inner) {
  const CacheEntry* b = nullptr;
  bool ipv4 = protocol == ipproto::kIpv4;
  size_t length = 0;
  if (protocol == ipproto::kIpv6) {
    auto ip = ParseIpv6Packet(inner);
    if (!ip) {
      ++counters_.decap_malformed;
      return;
    }
    length = kIpv6HeaderSize + ip->payload.size();
    b = cache_.Find(ip->header.src);
  } else if (ipv4) {
    auto ip = ParseIpv4Packet(inner);
    if (!ip) {
      ++counters_.decap_malformed;
      return;
    }
    length = ip->header.total_length;
    b = cache_.FindByHomeAddress4(ip->header.src);
  } else {
    ++counters_.decap_malformed;
    return;
  }
  // Anti-spoofing: only a home address bound to this very care-of address
  // may be the inner source (RFC 6275 §10.4.5).
  if (!b || b->care_of != outer_src) {
    ++counters_.decap_spoofed;
    return;
  }
  scratch_.assign(inner.begin(), inner.begin() + ptrdiff_t(length));
  if (!DecrementHopLimit(scratch_, ipv4)) {
    ++counters_.hop_limit_exceeded;
    return;
  }
  PacketSink* sink = ipv4 ? ports_.deliver4 : ports_.deliver6;
  if (sink->Send(scratch_)) {
    ++counters_.decapsulated;
  } else {
    ++counters_.deliver_errors;
  }
}

// ---- Persistence ----------------------------------------------------------------

namespace {
int64_t UnixMs(std::chrono::system_clock::time_point t) {
  return duration_cast<milliseconds>(t.time_since_epoch()).count();
}
}  // namespace

std::vector<PersistedBinding> HomeAgent::Snapshot() const {
  std::vector<PersistedBinding> out;
  auto now = clock_.Now();
  int64_t wall_ms = UnixMs(wall_());
  cache_.ForEach([&](const CacheEntry& e) {
    PersistedBinding p;
    p.home_address = e.home_address;
    p.care_of = e.care_of;
    p.sequence = e.sequence;
    p.flags = e.flags;
    p.granted_seconds = uint32_t(e.granted_lifetime.count());
    p.expires_unix_ms = wall_ms + duration_cast<milliseconds>(e.expires - now).count();
    p.home_address4 = e.home_address4;
    p.spi = e.spi;
    out.push_back(p);
  });
  return out;
}

void HomeAgent::Persist(const CacheEntry& e) {
  if (!journal_) return;
  PersistedBinding p;
  p.home_address = e.home_address;
  p.care_of = e.care_of;
  p.sequence = e.sequence;
  p.flags = e.flags;
  p.granted_seconds = uint32_t(e.granted_lifetime.count());
  p.expires_unix_ms =
      UnixMs(wall_()) + duration_cast<milliseconds>(e.expires - clock_.Now()).count();
  p.home_address4 = e.home_address4;
  p.spi = e.spi;
  if (auto s = journal_->AppendUpsert(p); !s) {
    ++counters_.persist_errors;
    spdlog::error("persisting binding {}: {}", FormatIpv6(e.home_address), s.error().message());
  }
  MaybeCompact();
}

void HomeAgent::PersistRemove(const Ipv6Address& hoa) {
  if (!journal_) return;
  if (auto s = journal_->AppendRemove(hoa); !s) {
    ++counters_.persist_errors;
    spdlog::error("persisting removal of {}: {}", FormatIpv6(hoa), s.error().message());
  }
  MaybeCompact();
}

void HomeAgent::MaybeCompact() {
  if (journal_->appended_since_compaction() < 2 * cache_.size() + 1024) return;
  if (auto s = journal_->Compact(Snapshot()); !s) {
    ++counters_.persist_errors;
    spdlog::error("compacting the binding journal: {}", s.error().message());
  }
}

Result<size_t> HomeAgent::Restore(const std::vector<PersistedBinding>& saved) {
  auto now = clock_.Now();
  int64_t wall_ms = UnixMs(wall_());
  size_t restored = 0;
  for (const auto& p : saved) {
    if (p.expires_unix_ms <= wall_ms) continue;
    if (!config_.home_prefix.Contains(p.home_address) || !Allowed(p.home_address)) {
      spdlog::warn("not restoring binding {}: no longer allowed by the configuration",
                   FormatIpv6(p.home_address));
      continue;
    }
    CacheEntry e;
    e.home_address = p.home_address;
    e.care_of = p.care_of;
    e.sequence = p.sequence;
    e.flags = p.flags;
    e.granted_lifetime = seconds(p.granted_seconds);
    e.expires = now + milliseconds(p.expires_unix_ms - wall_ms);
    e.home_address4 = p.home_address4;
    e.spi = p.spi;
    e.state = CacheEntryState::kActive;
    if (auto s = cache_.Upsert(e); !s) return Fail(s.error().Context("restoring bindings"));
    if (e.flags & bu_flag::kLinkLocal) link_local_[LinkLocalOf(e.home_address)] = e.home_address;
    Announce(*cache_.Find(e.home_address));
    ++restored;
  }
  if (journal_) {
    if (auto s = journal_->Compact(Snapshot()); !s) return Fail(s.error());
  }
  return restored;
}

HomeAgentStatus HomeAgent::Status() const {
  HomeAgentStatus s;
  auto now = clock_.Now();
  cache_.ForEach([&](const CacheEntry& e) {
    HomeAgentBindingStatus b;
    b.home_address = FormatIpv6(e.home_address);
    b.care_of = FormatIpv6(e.care_of);
    if (e.home_address4) b.home_address4 = FormatIpv4(*e.home_address4);
    b.sequence = e.sequence;
    b.lifetime_left_s = std::max<int64_t>(0, duration_cast<seconds>(e.expires - now).count());
    b.granted_lifetime_s = e.granted_lifetime.count();
    b.state = CacheEntryStateName(e.state);
    b.spi = e.spi;
    s.bindings.push_back(std::move(b));
  });
  for (const auto& [hoa, p] : pending_dad_) s.dad_pending.push_back(FormatIpv6(hoa));
  s.rate_table_entries = limiter_.size();
  s.counters = counters_;
  return s;
}

}  // namespace kagemusha::tunnel

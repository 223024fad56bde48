// The tunnel fast path's loader: see kagemusha/tunnel/fastpath.h and
// docs/tunnel-fastpath.md. The eBPF object is tunnel/bpf/fastpath.bpf.c,
// compiled by clang at build time; its bytes are linked in as
// kagemusha_fastpath_bpf_object (generated fastpath_bpf_object.cc).
#include "kagemusha/tunnel/fastpath.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <net/if.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstring>
#include <set>

#include "bpf/fastpath_abi.h"
#include "kagemusha/tunnel/packet_io.h"

extern "C" {
extern const unsigned char kagemusha_fastpath_bpf_object[];
extern const unsigned long kagemusha_fastpath_bpf_object_size;
}

namespace kagemusha::tunnel {
namespace {

// Our tc filters: a fixed handle and priority, so a restarted daemon finds
// and replaces (or removes) what an earlier one left behind.
constexpr uint32_t kTcHandle = 0x4b474d;  // "KGM"
constexpr uint32_t kTcPriority = 1;

const char* const kCounterNames[KGM_COUNTER_COUNT] = {
    "host_encap_packets", "host_encap_bytes",    "host_decap_packets",
    "host_decap_bytes",   "host_passed_too_big", "host_errors",
    "ha_encap_packets",   "ha_encap_bytes",      "ha_decap_packets",
    "ha_decap_bytes",     "ha_passed_too_big",   "ha_passed_spoofed",
    "ha_errors"};

int LibbpfLog(enum libbpf_print_level level, const char* format, va_list args) {
  char line[1024];
  std::vsnprintf(line, sizeof line, format, args);
  size_t n = std::strlen(line);
  while (n > 0 && line[n - 1] == '\n') line[--n] = 0;
  if (level == LIBBPF_WARN)
    spdlog::debug("libbpf: {}", line);  // the caller reports the failure itself
  else
    spdlog::trace("libbpf: {}", line);
  return 0;
}

Error BpfError(int err, const std::string& what) {
  return Error::Errno(err < 0 ? -err : err, what);
}

bpf_tc_hook Hook(int ifindex, bpf_tc_attach_point where) {
  bpf_tc_hook h{};
  h.sz = sizeof h;
  h.ifindex = ifindex;
  h.attach_point = where;
  return h;
}

bpf_tc_opts Opts(int prog_fd) {
  bpf_tc_opts o{};
  o.sz = sizeof o;
  o.handle = kTcHandle;
  o.priority = kTcPriority;
  o.prog_fd = prog_fd;
  return o;
}

Status AttachTc(int ifindex, bpf_tc_attach_point where, int prog_fd, const std::string& ifname) {
  bpf_tc_hook hook = Hook(ifindex, where);
  int err = bpf_tc_hook_create(&hook);  // the clsact qdisc
  if (err && err != -EEXIST) return Fail(BpfError(err, "clsact qdisc on " + ifname));
  bpf_tc_opts opts = Opts(prog_fd);
  opts.flags = BPF_TC_F_REPLACE;
  err = bpf_tc_attach(&hook, &opts);
  if (err) return Fail(BpfError(err, "tc filter on " + ifname));
  return Ok();
}

// Removes our filter (handle/priority) if present; leaves the qdisc and any
// other filter alone.
void DetachTc(int ifindex, bpf_tc_attach_point where) {
  bpf_tc_hook hook = Hook(ifindex, where);
  bpf_tc_opts opts = Opts(0);
  if (bpf_tc_query(&hook, &opts) != 0) return;
  opts = Opts(0);
  bpf_tc_detach(&hook, &opts);
}

}  // namespace

Result<FastPathMode> ParseFastPathMode(std::string_view text) {
  if (text == "auto") return FastPathMode::kAuto;
  if (text == "on") return FastPathMode::kOn;
  if (text == "off") return FastPathMode::kOff;
  return Fail(
      Error::Invalid("--fast-path must be auto, on or off (not '" + std::string(text) + "')"));
}

const char* FastPathModeName(FastPathMode mode) {
  switch (mode) {
    case FastPathMode::kAuto:
      return "auto";
    case FastPathMode::kOn:
      return "on";
    case FastPathMode::kOff:
      return "off";
  }
  return "?";
}

// ---- the eBPF object ---------------------------------------------------------------

class BpfTunnelObject {
 public:
  // Opens the embedded object and loads only `programs` (the other side's
  // programs are not verified or loaded).
  static Result<std::unique_ptr<BpfTunnelObject>> Load(const std::set<std::string>& programs) {
    static bool log_set = false;
    if (!log_set) {
      libbpf_set_print(LibbpfLog);
      log_set = true;
    }
    bpf_object_open_opts oo{};
    oo.sz = sizeof oo;
    oo.object_name = "kagemusha_fastpath";
    bpf_object* obj = bpf_object__open_mem(kagemusha_fastpath_bpf_object,
                                           kagemusha_fastpath_bpf_object_size, &oo);
    if (!obj) return Fail(BpfError(errno, "opening the eBPF object"));
    std::unique_ptr<BpfTunnelObject> self(new BpfTunnelObject(obj));
    bpf_program* p;
    bpf_object__for_each_program(p, obj) {
      bpf_program__set_autoload(p, programs.count(bpf_program__name(p)) > 0);
    }
    if (int err = bpf_object__load(obj))
      return Fail(BpfError(err, "loading the eBPF programs (needs CAP_BPF and CAP_NET_ADMIN)"));
    return self;
  }
  ~BpfTunnelObject() { bpf_object__close(obj_); }

  Result<int> ProgramFd(const char* name) const {
    bpf_program* p = bpf_object__find_program_by_name(obj_, name);
    if (!p || bpf_program__fd(p) < 0)
      return Fail(Error::Invalid(std::string("no program ") + name));
    return bpf_program__fd(p);
  }
  int MapFd(const char* name) const {
    bpf_map* m = bpf_object__find_map_by_name(obj_, name);
    return m ? bpf_map__fd(m) : -1;
  }
  FastPathCounters Counters(bool host) const {
    FastPathCounters out;
    int fd = MapFd("counters");
    int ncpu = libbpf_num_possible_cpus();
    if (fd < 0 || ncpu <= 0) return out;
    std::vector<uint64_t> per_cpu(static_cast<size_t>(ncpu));
    for (uint32_t k = 0; k < KGM_COUNTER_COUNT; ++k) {
      const bool host_counter = k < KGM_HA_ENCAP_PACKETS;
      if (host_counter != host) continue;
      uint64_t sum = 0;
      if (bpf_map_lookup_elem(fd, &k, per_cpu.data()) == 0)
        for (auto v : per_cpu) sum += v;
      out.emplace_back(kCounterNames[k], sum);
    }
    return out;
  }

 private:
  explicit BpfTunnelObject(bpf_object* obj) : obj_(obj) {}
  bpf_object* obj_;
};

// ---- host ----------------------------------------------------------------------------

Ipv6Address FastPathKey4(const Ipv4Address& home_address4) {
  Ipv6Address k{};
  k[10] = 0xff;
  k[11] = 0xff;
  std::copy(home_address4.begin(), home_address4.end(), k.begin() + 12);
  return k;
}

std::vector<Ipv6Address> FastPathKeys(const HostFastPathSession& session) {
  std::vector<Ipv6Address> keys = session.home_addresses;
  if (session.home_address4) keys.push_back(FastPathKey4(*session.home_address4));
  return keys;
}

void RemoveStaleFastPathFilters() {
  if (struct if_nameindex* names = if_nameindex()) {
    for (struct if_nameindex* n = names; n->if_index != 0; ++n) {
      DetachTc(int(n->if_index), BPF_TC_INGRESS);
      DetachTc(int(n->if_index), BPF_TC_EGRESS);
    }
    if_freenameindex(names);
  }
}

HostFastPath::HostFastPath(std::unique_ptr<BpfTunnelObject> obj) : obj_(std::move(obj)) {}

Result<std::unique_ptr<HostFastPath>> HostFastPath::Load() {
  auto obj = BpfTunnelObject::Load({"host_tap_egress", "host_uplink_ingress"});
  if (!obj) return Fail(obj.error());
  // Stale filters of a daemon that died without detaching: their maps still
  // hold its sessions.
  RemoveStaleFastPathFilters();
  return std::unique_ptr<HostFastPath>(new HostFastPath(std::move(*obj)));
}

HostFastPath::~HostFastPath() {
  for (const auto& [ifindex, users] : uplink_users_) DetachTc(ifindex, BPF_TC_INGRESS);
  for (const auto& [name, s] : sessions_)
    if (auto idx = InterfaceIndex(s.tap)) DetachTc(*idx, BPF_TC_EGRESS);
}

Status HostFastPath::AddSession(const HostFastPathSession& s) {
  RemoveSession(s.name);
  auto tap = InterfaceIndex(s.tap);
  if (!tap) return Fail(tap.error().Context("fast path: TAP " + s.tap));
  auto uplink = InterfaceIndex(s.uplink);
  if (!uplink) return Fail(uplink.error().Context("fast path: uplink " + s.uplink));
  auto egress = obj_->ProgramFd("host_tap_egress");
  auto ingress = obj_->ProgramFd("host_uplink_ingress");
  if (!egress || !ingress) return Fail(Error::Invalid("fast path: programs not loaded"));
  int map = obj_->MapFd("host_sessions");
  kgm_host_session v{};
  std::memcpy(v.coa, s.care_of.data(), 16);
  std::memcpy(v.ha, s.home_agent.data(), 16);
  v.tap_ifindex = uint32_t(*tap);
  v.uplink_ifindex = uint32_t(*uplink);
  v.mtu = s.mtu;
  std::memcpy(v.guest_mac, s.guest_mac.data(), 6);
  std::memcpy(v.router_mac, s.router_mac.data(), 6);
  const auto keys = FastPathKeys(s);
  for (const auto& hoa : keys) {
    if (int err = bpf_map_update_elem(map, hoa.data(), &v, BPF_ANY)) {
      for (const auto& h : keys) bpf_map_delete_elem(map, h.data());
      return Fail(BpfError(err, "fast path: publishing home address " + FormatIpv6(hoa)));
    }
  }
  if (uplink_users_[*uplink]++ == 0) {
    if (auto st = AttachTc(*uplink, BPF_TC_INGRESS, *ingress, s.uplink); !st) {
      if (--uplink_users_[*uplink] == 0) uplink_users_.erase(*uplink);
      for (const auto& h : keys) bpf_map_delete_elem(map, h.data());
      return st;
    }
  }
  if (auto st = AttachTc(*tap, BPF_TC_EGRESS, *egress, s.tap); !st) {
    sessions_[s.name] = s;
    RemoveSession(s.name);
    return st;
  }
  sessions_[s.name] = s;
  return Ok();
}

void HostFastPath::RemoveSession(const std::string& name) {
  auto it = sessions_.find(name);
  if (it == sessions_.end()) return;
  const auto& s = it->second;
  retired_[name] = SessionCounters(name);
  int map = obj_->MapFd("host_sessions");
  for (const auto& hoa : FastPathKeys(s)) bpf_map_delete_elem(map, hoa.data());
  if (auto tap = InterfaceIndex(s.tap)) DetachTc(*tap, BPF_TC_EGRESS);
  if (auto uplink = InterfaceIndex(s.uplink)) {
    auto u = uplink_users_.find(*uplink);
    if (u != uplink_users_.end() && --u->second <= 0) {
      DetachTc(*uplink, BPF_TC_INGRESS);
      uplink_users_.erase(u);
    }
  }
  sessions_.erase(it);
}

FastPathCounters HostFastPath::Counters() const { return obj_->Counters(true); }

HostFastPathSessionCounters HostFastPath::SessionCounters(const std::string& name) const {
  HostFastPathSessionCounters c;
  if (auto r = retired_.find(name); r != retired_.end()) c = r->second;
  auto it = sessions_.find(name);
  if (it == sessions_.end()) return c;
  int map = obj_->MapFd("host_sessions");
  // Each key's entry counts what it matched: the IPv4 key, the IPv4 packets.
  const auto& s = it->second;
  for (const auto& hoa : FastPathKeys(s)) {
    kgm_host_session v{};
    if (bpf_map_lookup_elem(map, hoa.data(), &v) != 0) continue;
    c.encap_packets += v.encap_packets;
    c.encap_bytes += v.encap_bytes;
    c.decap_packets += v.decap_packets;
    c.decap_bytes += v.decap_bytes;
    if (s.home_address4 && hoa == FastPathKey4(*s.home_address4)) {
      c.encap4_packets += v.encap_packets;
      c.decap4_packets += v.decap_packets;
    }
  }
  return c;
}

// ---- binding mirror --------------------------------------------------------------------

BindingMirror::Changes BindingMirror::Update(const BindingCache& cache) {
  Changes ch;
  std::map<Ipv6Address, Ipv6Address> now;
  cache.ForEach([&](const CacheEntry& e) {
    now[e.home_address] = e.care_of;
    if (e.home_address4) now[FastPathKey4(*e.home_address4)] = e.care_of;
  });
  for (const auto& [hoa, coa] : now) {
    auto it = published_.find(hoa);
    if (it == published_.end() || it->second != coa) ch.upserts.emplace_back(hoa, coa);
  }
  for (const auto& [hoa, coa] : published_)
    if (!now.count(hoa)) ch.removals.push_back(hoa);
  published_ = std::move(now);
  return ch;
}

// ---- home agent ------------------------------------------------------------------------

namespace {
// HaPacketTooBigFor for an IPv4 frame already known to be to `ha_mac`.
std::optional<std::vector<uint8_t>> HaFragmentationNeededFor(std::span<const uint8_t> packet,
                                                             const Ipv4Address& ha_address4,
                                                             uint32_t inner_mtu,
                                                             const BindingCache& cache) {
  constexpr uint32_t kIpv4MinimumMtu = 68;  // RFC 791
  if (inner_mtu < kIpv4MinimumMtu || inner_mtu > 0xffff) return std::nullopt;
  auto ip = ParseIpv4Packet(packet);
  if (!ip) return std::nullopt;
  const auto& h = ip->header;
  if (!h.dont_fragment || h.more_fragments || h.fragment_offset != 0) return std::nullopt;
  if (h.total_length <= inner_mtu || !cache.FindByHomeAddress4(h.dst)) return std::nullopt;
  // Never an ICMP error about an ICMP error (RFC 1812 §4.3.2.7).
  constexpr uint8_t kIcmpv4 = 1;
  if (h.protocol == kIcmpv4) {
    if (ip->payload.empty()) return std::nullopt;
    const uint8_t type = ip->payload[0];
    if (type == 3 || type == 4 || type == 5 || type == 11 || type == 12) return std::nullopt;
  }
  // Nor to a source that cannot be answered.
  const auto& src = h.src;
  if (src[0] == 0 || src[0] == 127 || src[0] >= 224) return std::nullopt;
  auto err = BuildIcmpv4FragmentationNeeded(ha_address4, src, uint16_t(inner_mtu),
                                            packet.first(h.total_length));
  if (!err) return std::nullopt;
  return std::move(*err);
}
}  // namespace

std::optional<std::vector<uint8_t>> HaPacketTooBigFor(
    std::span<const uint8_t> frame, const MacAddress& ha_mac, const Ipv6Address& ha_address,
    uint32_t inner_mtu, const BindingCache& cache, const std::optional<Ipv4Address>& ha_address4) {
  auto eth = ParseEthernetFrame(frame);
  if (!eth || eth->dst != ha_mac) return std::nullopt;
  if (eth->ether_type == ethertype::kIpv4 && ha_address4)
    return HaFragmentationNeededFor(eth->payload, *ha_address4, inner_mtu, cache);
  if (inner_mtu < kIpv6MinimumMtu || eth->ether_type != ethertype::kIpv6) return std::nullopt;
  auto ip = ParseIpv6Packet(eth->payload);
  if (!ip) return std::nullopt;
  const size_t length = kIpv6HeaderSize + ip->payload.size();
  if (length <= inner_mtu || !cache.Find(ip->header.dst)) return std::nullopt;
  // Never an ICMPv6 error about an ICMPv6 error (RFC 4443 §2.4 e), nor about ND.
  if (ip->header.next_header == ipproto::kIcmpv6 &&
      (ip->payload.empty() || ip->payload[0] < 128 ||
       (ip->payload[0] >= 133 && ip->payload[0] <= 137)))
    return std::nullopt;
  // Nor to a source that cannot be answered (RFC 4443 §2.4 e).
  const auto& src = ip->header.src;
  if (src[0] == 0xff || std::all_of(src.begin(), src.end(), [](uint8_t b) { return b == 0; }))
    return std::nullopt;
  auto ptb = BuildIcmpv6PacketTooBig(ha_address, src, inner_mtu, eth->payload.first(length));
  if (!ptb) return std::nullopt;
  return std::move(*ptb);
}

HaFastPath::HaFastPath(std::unique_ptr<BpfTunnelObject> obj) : obj_(std::move(obj)) {}

Result<std::unique_ptr<HaFastPath>> HaFastPath::Load(const std::string& home_link,
                                                     const Ipv6Address& address, uint32_t mtu,
                                                     bool enable_gro) {
  auto idx = InterfaceIndex(home_link);
  if (!idx) return Fail(idx.error().Context("fast path: home link " + home_link));
  auto obj = BpfTunnelObject::Load({"ha_link_ingress", "ha_link_filter"});
  if (!obj) return Fail(obj.error());
  std::unique_ptr<HaFastPath> self(new HaFastPath(std::move(*obj)));
  self->link_ifindex_ = *idx;
  kgm_ha_config cfg{};
  std::memcpy(cfg.address, address.data(), 16);
  cfg.link_ifindex = uint32_t(*idx);
  cfg.mtu = mtu;
  cfg.enabled = 1;
  uint32_t zero = 0;
  if (int err = bpf_map_update_elem(self->obj_->MapFd("ha_config"), &zero, &cfg, BPF_ANY))
    return Fail(BpfError(err, "fast path: configuration map"));
  auto prog = self->obj_->ProgramFd("ha_link_ingress");
  if (!prog) return Fail(prog.error());
  if (auto st = AttachTc(*idx, BPF_TC_INGRESS, *prog, home_link); !st) return Fail(st.error());
  self->link_name_ = home_link;
  if (enable_gro) {
    self->EnableGro(home_link);
  } else {
    self->gro_.kept = true;
    if (auto on = InterfaceGro(home_link)) {
      self->gro_.known = true;
      self->gro_.enabled = *on;
    } else {
      self->gro_.error = on.error().message();
    }
  }
  return self;
}

// A GSO packet the host encapsulated carries skb->encapsulation; on its way
// to the HA, a device without hw_enc_features (a Linux bridge as the home
// link) segments it in software, so the HA would decapsulate and forward
// every segment on its own. With GRO on, a NIC (and a veth whose sender has
// TSO off) merges the IPv6-in-IPv6 segments again before tc ingress. Failure
// is not fatal: the fast path works without it, per segment.
void HaFastPath::EnableGro(const std::string& home_link) {
  auto on = InterfaceGro(home_link);
  if (!on) {
    gro_.error = on.error().message();
    spdlog::warn("fast path: cannot read GRO state of {} ({}); left as it is", home_link,
                 gro_.error);
    return;
  }
  gro_.known = true;
  gro_.enabled = *on;
  if (*on) {
    spdlog::info("fast path: GRO already on on {}", home_link);
    return;
  }
  if (auto st = SetInterfaceGro(home_link, true); !st) {
    gro_.error = st.error().message();
    spdlog::warn(
        "fast path: cannot turn GRO on on {} ({}); tunnelled segments are forwarded "
        "one by one",
        home_link, gro_.error);
    return;
  }
  gro_.enabled = true;
  gro_.changed = true;
  spdlog::info("fast path: turned GRO on on {} (it was off; turned off again on exit)", home_link);
}

HaFastPath::~HaFastPath() {
  DetachTc(link_ifindex_, BPF_TC_INGRESS);
  if (gro_.changed) {
    if (auto st = SetInterfaceGro(link_name_, false); !st)
      spdlog::warn("fast path: could not turn GRO off again on {}: {}", link_name_,
                   st.error().message());
    else
      spdlog::info("fast path: GRO off again on {}", link_name_);
  }
}

Status HaFastPath::AttachSocketFilter(int socket_fd) {
  auto prog = obj_->ProgramFd("ha_link_filter");
  if (!prog) return Fail(prog.error());
  int fd = *prog;
  if (setsockopt(socket_fd, SOL_SOCKET, SO_ATTACH_BPF, &fd, sizeof fd) < 0)
    return Fail(Error::Errno(errno, "fast path: SO_ATTACH_BPF on the home-link socket"));
  return Ok();
}

Status HaFastPath::Sync(const BindingCache& cache) {
  if (synced_generation_ && *synced_generation_ == cache.generation()) return Ok();
  auto ch = mirror_.Update(cache);
  int map = obj_->MapFd("ha_bindings");
  Status result = Ok();
  for (const auto& hoa : ch.removals) bpf_map_delete_elem(map, hoa.data());
  for (const auto& [hoa, coa] : ch.upserts) {
    kgm_ha_binding b{};
    std::memcpy(b.coa, coa.data(), 16);
    if (int err = bpf_map_update_elem(map, hoa.data(), &b, BPF_ANY)) {
      // Not published (the map is full): user space keeps tunnelling it, and
      // the next change of the cache republishes everything. Not retried in
      // between, so a persistent failure is reported once per change.
      if (result) result = Fail(BpfError(err, "fast path: publishing binding " + FormatIpv6(hoa)));
    }
  }
  if (!result) mirror_.Reset();
  synced_generation_ = cache.generation();
  return result;
}

FastPathCounters HaFastPath::Counters() const { return obj_->Counters(false); }

}  // namespace kagemusha::tunnel

// HostDaemon: see host_daemon.h.
#include "host_daemon.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <ctime>
#include <deque>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace kagemusha::tunnel {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

Result<Ipv6Address> ParseV6(const std::string& text, const char* what) {
  Ipv6Address a{};
  if (inet_pton(AF_INET6, text.c_str(), a.data()) != 1)
    return Fail(Error::Invalid(std::string(what) + ": '" + text + "' is not an IPv6 address"));
  return a;
}

Result<Ipv4Address> ParseV4(const std::string& text, const char* what) {
  Ipv4Address a{};
  if (inet_pton(AF_INET, text.c_str(), a.data()) != 1)
    return Fail(Error::Invalid(std::string(what) + ": '" + text + "' is not an IPv4 address"));
  return a;
}

Result<MacAddress> ParseMac(const std::string& text, const char* what) {
  MacAddress m{};
  unsigned v[6];
  char extra;
  if (std::sscanf(text.c_str(), "%x:%x:%x:%x:%x:%x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                  &extra) != 6)
    return Fail(Error::Invalid(std::string(what) + ": '" + text + "' is not a MAC address"));
  for (int i = 0; i < 6; ++i) {
    if (v[i] > 255) return Fail(Error::Invalid(std::string(what) + ": bad MAC byte"));
    m[i] = static_cast<uint8_t>(v[i]);
  }
  return m;
}

bool ValidName(const std::string& n) {
  if (n.empty() || n.size() > 64) return false;
  return std::all_of(n.begin(), n.end(),
                     [](char c) {
                       return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' ||
                              c == '.';
                     }) &&
         n[0] != '.';
}

std::string GetString(const json& args, const char* key) {
  auto it = args.find(key);
  if (it == args.end() || it->is_null()) return {};
  if (it->is_string()) return it->get<std::string>();
  return it->dump();
}

int HexDigit(uint8_t c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

// The same rule as kagemusha-ha's key files, so one file gives one key to
// both: hex text (even length, optionally ending in "\n" or "\r\n")
// decodes; anything else is the key as raw bytes.
std::vector<uint8_t> DecodeKeyFileBytes(const std::vector<uint8_t>& raw) {
  size_t n = raw.size();
  if (n > 0 && raw[n - 1] == '\n') --n;
  if (n > 0 && raw[n - 1] == '\r') --n;
  bool hex = n > 0 && n % 2 == 0;
  for (size_t i = 0; hex && i < n; ++i) hex = HexDigit(raw[i]) >= 0;
  if (!hex) return raw;
  std::vector<uint8_t> out(n / 2);
  for (size_t i = 0; i < n / 2; ++i)
    out[i] = static_cast<uint8_t>(HexDigit(raw[2 * i]) << 4 | HexDigit(raw[2 * i + 1]));
  return out;
}

namespace {

// A non-negative integer option (signed or unsigned JSON number), bounded.
Result<std::optional<uint64_t>> GetUint(const json& args, const char* key, uint64_t max) {
  auto it = args.find(key);
  if (it == args.end() || it->is_null()) return std::optional<uint64_t>();
  if (!it->is_number_integer() ||
      (it->is_number_integer() && !it->is_number_unsigned() && it->get<int64_t>() < 0) ||
      it->get<uint64_t>() > max)
    return Fail(Error::Invalid(std::string(key) + " must be an integer 0.." + std::to_string(max)));
  return std::optional<uint64_t>(it->get<uint64_t>());
}

std::string TapName(const std::string& session) {
  std::string n = "kmh-" + session;
  for (auto& c : n)
    if (c == '.') c = '_';
  return n.substr(0, 15);
}

std::string NowText() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

Status FsyncDir(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Fail(Error::Errno(errno, "opening " + dir));
  int rc = fsync(fd);
  int e = errno;
  close(fd);
  if (rc < 0) return Fail(Error::Errno(e, "fsync " + dir));
  return Ok();
}

Status MakeDir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Fail(Error(ec.value(), "creating " + dir + ": " + ec.message()));
  chmod(dir.c_str(), 0700);
  return Ok();
}

}  // namespace

// Collects the spans a session sends during one receive batch and hands them
// to the real socket in one sendmmsg. The spans point into the daemon's
// receive buffers, which stay untouched until Flush() (called before the next
// Receive into them).
class DeferredSink final : public PacketSink {
 public:
  explicit DeferredSink(PacketSink& target) : target_(target) { pending_.reserve(64); }
  Status Send(std::span<const uint8_t> packet) override {
    pending_.push_back(packet);
    if (pending_.size() >= 64) Flush();
    return Ok();
  }
  void Flush() {
    size_t done = 0;
    while (done < pending_.size()) {
      auto r = target_.SendBatch(std::span(pending_).subspan(done));
      if (!r) {
        ++errors;  // drop the one that failed (e.g. ENOBUFS) and go on
        ++done;
        continue;
      }
      done += std::max<size_t>(*r, 1);
    }
    pending_.clear();
  }
  uint64_t errors = 0;

 private:
  PacketSink& target_;
  std::vector<std::span<const uint8_t>> pending_;
};

// ---- Persistence -------------------------------------------------------------------

Status WriteFileDurably(const std::string& path, const std::string& data) {
  const std::string tmp = path + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Fail(Error::Errno(errno, "creating " + tmp));
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      close(fd);
      return Fail(Error::Errno(e, "writing " + tmp));
    }
    off += static_cast<size_t>(n);
  }
  if (fsync(fd) < 0) {
    int e = errno;
    close(fd);
    return Fail(Error::Errno(e, "fsync " + tmp));
  }
  close(fd);
  if (rename(tmp.c_str(), path.c_str()) < 0) return Fail(Error::Errno(errno, "renaming " + tmp));
  return FsyncDir(fs::path(path).parent_path().string());
}

FileSequenceStore::FileSequenceStore(std::string path) : path_(std::move(path)) {
  std::ifstream in(path_);
  if (!in) return;
  auto j = json::parse(in, nullptr, false);
  if (!j.is_object()) {
    spdlog::warn(
        "sequence file {} is unreadable; starting without it (the home agent will "
        "resynchronise us with status 135)",
        path_);
    return;
  }
  for (auto& [k, v] : j.items()) {
    auto a = ParseV6(k, "sequence file");
    if (a && v.is_number_unsigned() && v.get<uint64_t>() <= 0xffff)
      values_[*a] = static_cast<uint16_t>(v.get<uint64_t>());
  }
}

std::optional<uint16_t> FileSequenceStore::LastSent(const Ipv6Address& home_address) {
  auto it = values_.find(home_address);
  if (it == values_.end()) return std::nullopt;
  return it->second;
}

Status FileSequenceStore::Record(const Ipv6Address& home_address, uint16_t sequence) {
  values_[home_address] = sequence;
  json j = json::object();
  for (const auto& [a, s] : values_) j[FormatIpv6(a)] = s;
  return WriteFileDurably(path_, j.dump() + "\n");
}

// ---- Spec <-> JSON -----------------------------------------------------------------

Result<HostSessionSpec> ParseHostSessionSpec(const json& args) {
  if (!args.is_object()) return Fail(Error::Invalid("arguments must be an object"));
  HostSessionSpec spec;
  auto& c = spec.config;
  c.name = GetString(args, "name");
  if (!ValidName(c.name)) return Fail(Error::Invalid("name must be 1-64 of [A-Za-z0-9._-]"));
  auto mac = ParseMac(GetString(args, "guest_mac"), "guest_mac");
  if (!mac) return Fail(mac.error());
  c.guest_mac = *mac;
  if (auto it = args.find("hoa"); it != args.end()) {
    std::vector<std::string> list;
    if (it->is_array()) {
      for (const auto& v : *it)
        if (v.is_string()) list.push_back(v.get<std::string>());
    } else if (it->is_string()) {
      list.push_back(it->get<std::string>());
    }
    for (const auto& s : list) {
      auto a = ParseV6(s, "hoa");
      if (!a) return Fail(a.error());
      c.home_addresses.push_back(*a);
    }
  }
  if (auto s = GetString(args, "hoa4"); !s.empty()) {
    auto a = ParseV4(s, "hoa4");
    if (!a) return Fail(a.error());
    c.home_address4 = *a;
  }
  {
    auto s = GetString(args, "home_prefix");
    auto slash = s.find('/');
    if (slash == std::string::npos) return Fail(Error::Invalid("home_prefix must be IPV6/LEN"));
    auto a = ParseV6(s.substr(0, slash), "home_prefix");
    if (!a) return Fail(a.error());
    c.home_prefix = *a;
    int len = std::atoi(s.c_str() + slash + 1);
    if (len < 1 || len > 128) return Fail(Error::Invalid("home_prefix length must be 1..128"));
    c.home_prefix_length = static_cast<uint8_t>(len);
  }
  auto v4len = GetUint(args, "home_prefix4_length", 32);
  if (!v4len) return Fail(v4len.error());
  if (*v4len) c.home_prefix4_length = static_cast<uint8_t>(**v4len);
  auto rmac = ParseMac(GetString(args, "router_mac"), "router_mac");
  if (!rmac) return Fail(rmac.error());
  c.router_mac = *rmac;
  auto rll = ParseV6(GetString(args, "router_ll"), "router_ll");
  if (!rll) return Fail(rll.error());
  c.router_link_local = *rll;
  if (auto s = GetString(args, "router_global"); !s.empty()) {
    auto a = ParseV6(s, "router_global");
    if (!a) return Fail(a.error());
    c.router_global = *a;
  }
  if (auto s = GetString(args, "router_v4"); !s.empty()) {
    auto a = ParseV4(s, "router_v4");
    if (!a) return Fail(a.error());
    c.router_v4 = *a;
  }
  auto ha = ParseV6(GetString(args, "ha"), "ha");
  if (!ha) return Fail(ha.error());
  c.home_agent = *ha;
  auto coa = ParseV6(GetString(args, "coa"), "coa");
  if (!coa) return Fail(coa.error());
  c.care_of = *coa;
  spec.uplink = GetString(args, "uplink");
  spec.bridge = GetString(args, "bridge");
  if (spec.uplink.empty() || spec.bridge.empty())
    return Fail(Error::Invalid("uplink and bridge are required"));
  auto mtu = GetUint(args, "mtu", 65535);
  auto lifetime = GetUint(args, "lifetime", 262140);
  auto dereg = GetUint(args, "dereg_attempts", 100);
  auto spi = GetUint(args, "spi", 0xffffffff);
  for (const auto* r : {&mtu, &lifetime, &dereg, &spi})
    if (!*r) return Fail(r->error());
  if (*mtu) c.tunnel_mtu = static_cast<uint32_t>(**mtu);
  if (*lifetime) c.lifetime_seconds = static_cast<uint32_t>(**lifetime);
  if (*dereg) c.timers.deregistration_attempts = static_cast<int>(**dereg);
  if (auto it = args.find("ra"); it != args.end() && it->is_boolean())
    c.send_router_advertisements = it->get<bool>();
  const bool insecure = args.value("insecure", false);
  spec.key_file = GetString(args, "key_file");
  if (insecure == !spec.key_file.empty())
    return Fail(Error::Invalid("give exactly one of key_file (with spi) or insecure"));
  if (!insecure) {
    if (!*spi) return Fail(Error::Invalid("spi is required with key_file"));
    MobilityAuthConfig auth;
    auth.spi = static_cast<uint32_t>(**spi);
    std::ifstream in(spec.key_file, std::ios::binary);
    if (!in) return Fail(Error::Errno(errno, "reading key file " + spec.key_file));
    std::vector<uint8_t> raw(std::istreambuf_iterator<char>(in), {});
    auth.key = DecodeKeyFileBytes(raw);
    c.auth = std::move(auth);
  }
  spec.mode = GetString(args, "mode") == "home" ? SessionMode::kHome : SessionMode::kForeign;
  if (auto st = ValidateSessionConfig(c); !st) return Fail(st.error());
  return spec;
}

json HostSessionSpecToJson(const HostSessionSpec& spec) {
  const auto& c = spec.config;
  json j;
  j["name"] = c.name;
  j["guest_mac"] = FormatMac(c.guest_mac);
  j["hoa"] = json::array();
  for (const auto& a : c.home_addresses) j["hoa"].push_back(FormatIpv6(a));
  if (c.home_address4) j["hoa4"] = FormatIpv4(*c.home_address4);
  j["home_prefix4_length"] = c.home_prefix4_length;
  j["home_prefix"] = FormatIpv6(c.home_prefix) + "/" + std::to_string(c.home_prefix_length);
  j["router_mac"] = FormatMac(c.router_mac);
  j["router_ll"] = FormatIpv6(c.router_link_local);
  if (c.router_global) j["router_global"] = FormatIpv6(*c.router_global);
  if (c.router_v4) j["router_v4"] = FormatIpv4(*c.router_v4);
  j["ha"] = FormatIpv6(c.home_agent);
  j["coa"] = FormatIpv6(c.care_of);
  j["uplink"] = spec.uplink;
  j["bridge"] = spec.bridge;
  j["mtu"] = c.tunnel_mtu;
  j["lifetime"] = c.lifetime_seconds;
  j["ra"] = c.send_router_advertisements;
  j["dereg_attempts"] = c.timers.deregistration_attempts;
  if (c.auth) {
    j["spi"] = c.auth->spi;
    j["key_file"] = spec.key_file;
  } else {
    j["insecure"] = true;
  }
  j["mode"] = spec.mode == SessionMode::kHome ? "home" : "foreign";
  return j;
}

// ---- Live session ------------------------------------------------------------------

struct HostDaemon::Live {
  HostSessionSpec spec;
  std::unique_ptr<TapDevice> tap;
  std::unique_ptr<PacketSocket> uplink;
  std::unique_ptr<RawIpv6Socket> tunnel6;
  std::unique_ptr<RawIpv6Socket> tunnel4;
  std::unique_ptr<DeferredSink> batch6;
  std::unique_ptr<DeferredSink> batch4;
  std::unique_ptr<Ipv6RawSender> mobility;
  std::unique_ptr<FileSequenceStore> store;
  std::unique_ptr<MobilitySession> session;
  std::deque<json> events;
  std::optional<Clock::TimePoint> reap_at;  // home: tear down after this
  uint64_t truncated = 0;
};

HostDaemon::HostDaemon(HostDaemonOptions options, Clock& clock)
    : options_(std::move(options)), clock_(clock) {}

HostDaemon::~HostDaemon() {
  if (control_) control_->Stop();
  if (wake_fd_ >= 0) close(wake_fd_);
}

Result<std::unique_ptr<HostDaemon>> HostDaemon::Create(HostDaemonOptions options, Clock& clock) {
  if (options.state_dir.empty()) return Fail(Error::Invalid("state dir is required"));
  for (const char* sub : {"", "/sessions", "/seq"})
    if (auto st = MakeDir(options.state_dir + sub); !st) return Fail(st.error());
  std::unique_ptr<HostDaemon> d(new HostDaemon(std::move(options), clock));
  d->wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (d->wake_fd_ < 0) return Fail(Error::Errno(errno, "eventfd"));
  if (d->options_.suppress_icmp_errors) {
    if (auto st = SuppressMobilityIcmpErrors("kagemusha_tunneld"); !st)
      spdlog::warn(
          "could not install the nftables rule for RH2/HAO packets ({}); the kernel "
          "will answer each BA with an ICMPv6 Parameter Problem",
          st.error().message());
  }
  if (d->options_.fast_path == FastPathMode::kOff) {
    RemoveStaleFastPathFilters();
  } else {
    auto fp = HostFastPath::Load();
    if (fp) {
      d->fast_path_ = std::move(*fp);
      spdlog::info("fast path: eBPF tc programs loaded");
    } else if (d->options_.fast_path == FastPathMode::kOn) {
      return Fail(fp.error().Context("--fast-path on"));
    } else {
      spdlog::warn("fast path unavailable ({}); every tunnelled packet goes through user space",
                   fp.error().message());
    }
  }
  return d;
}

void HostDaemon::FastPathAdd(Live& live) {
  if (!fast_path_ || live.spec.mode != SessionMode::kForeign) return;
  const auto& c = live.spec.config;
  HostFastPathSession s;
  s.name = c.name;
  s.home_addresses = c.home_addresses;
  if (live.tunnel4) s.home_address4 = c.home_address4;  // IPv4-in-IPv6 (DSMIPv6)
  s.care_of = c.care_of;
  s.home_agent = c.home_agent;
  s.guest_mac = c.guest_mac;
  s.router_mac = c.router_mac;
  s.mtu = c.tunnel_mtu;
  s.tap = live.tap->name();
  s.uplink = live.spec.uplink;
  if (auto st = fast_path_->AddSession(s); !st)
    spdlog::warn("session {}: fast path not used ({}); user-space path only", c.name,
                 st.error().message());
  else
    spdlog::info("session {}: fast path on (TAP {} egress, {} ingress)", c.name, s.tap, s.uplink);
}

void HostDaemon::FastPathRemove(const std::string& name) {
  if (fast_path_) fast_path_->RemoveSession(name);
}

void HostDaemon::Wake() {
  uint64_t one = 1;
  [[maybe_unused]] auto n = write(wake_fd_, &one, sizeof one);
}

void HostDaemon::RequestStop() {
  stop_ = true;
  Wake();
}

Status HostDaemon::Persist(const HostSessionSpec& spec) {
  return WriteFileDurably(options_.state_dir + "/sessions/" + spec.config.name + ".json",
                          HostSessionSpecToJson(spec).dump(2) + "\n");
}

void HostDaemon::Unpersist(const std::string& name) {
  std::error_code ec;
  fs::remove(options_.state_dir + "/sessions/" + name + ".json", ec);
  (void)FsyncDir(options_.state_dir + "/sessions");
}

Result<std::unique_ptr<HostDaemon::Live>> HostDaemon::Open(const HostSessionSpec& spec) {
  auto live = std::make_unique<Live>();
  live->spec = spec;
  const auto& c = spec.config;
  TapOptions topt;
  topt.name = TapName(c.name);
  topt.bridge = spec.bridge;
  auto tap = TapDevice::Open(topt);
  if (!tap) return Fail(tap.error().Context("TAP for " + c.name));
  live->tap = std::move(*tap);

  PacketSocketOptions popt;
  popt.interface = spec.uplink;
  popt.protocol = ethertype::kIpv6;
  const uint8_t nhs[] = {ipproto::kRouting, ipproto::kMobility};
  popt.filter = BpfIpv6NextHeaderFilter(nhs, c.care_of);
  auto up = PacketSocket::Open(popt);
  if (!up) return Fail(up.error().Context("uplink capture on " + spec.uplink));
  live->uplink = std::move(*up);

  RawIpv6SocketOptions ropt;
  ropt.protocol = ipproto::kIpv6;
  ropt.bind_address = c.care_of;
  ropt.connect_to = c.home_agent;
  ropt.receive_buffer_bytes = 4 << 20;
  ropt.send_buffer_bytes = 4 << 20;
  auto t6 = RawIpv6Socket::Open(ropt);
  if (!t6) return Fail(t6.error().Context("IPv6-in-IPv6 socket"));
  live->tunnel6 = std::move(*t6);
  if (c.home_address4) {
    ropt.protocol = ipproto::kIpv4;
    auto t4 = RawIpv6Socket::Open(ropt);
    if (!t4) return Fail(t4.error().Context("IPv4-in-IPv6 socket"));
    live->tunnel4 = std::move(*t4);
  }
  live->batch6 = std::make_unique<DeferredSink>(*live->tunnel6);
  if (live->tunnel4) live->batch4 = std::make_unique<DeferredSink>(*live->tunnel4);
  auto mob = Ipv6RawSender::Open();
  if (!mob) return Fail(mob.error().Context("BU sender"));
  live->mobility = std::move(*mob);
  live->store =
      std::make_unique<FileSequenceStore>(options_.state_dir + "/seq/" + c.name + ".json");

  SessionConfig config = c;
  if (auto mac = InterfaceMac(live->tap->name())) config.announce_from_mac = *mac;
  Live* raw = live.get();
  auto on_event = [raw](const SessionEvent& e) {
    json j = {{"time", NowText()},
              {"session", raw->spec.config.name},
              {"event", SessionEventKindName(e.kind)},
              {"home_address", FormatIpv6(e.home_address)},
              {"status", e.status},
              {"message", e.message}};
    const bool bad = e.kind != SessionEvent::Kind::kRegistered &&
                     e.kind != SessionEvent::Kind::kDeregistered &&
                     e.kind != SessionEvent::Kind::kResynchronised;
    if (bad)
      spdlog::warn("session {}: {}: {}", raw->spec.config.name, SessionEventKindName(e.kind),
                   e.message);
    else
      spdlog::info("session {}: {}: {}", raw->spec.config.name, SessionEventKindName(e.kind),
                   e.message);
    raw->events.push_back(std::move(j));
    while (raw->events.size() > 32) raw->events.pop_front();
  };
  live->session = std::make_unique<MobilitySession>(
      config,
      SessionIo{live->tap.get(), live->batch6.get(), live->batch4.get(), live->mobility.get()},
      clock_, *live->store, on_event);
  return live;
}

Result<json> HostDaemon::Activate(const json& args) {
  auto spec = ParseHostSessionSpec(args);
  if (!spec) return Fail(spec.error());
  spec->mode = SessionMode::kForeign;
  std::lock_guard lk(mu_);
  FastPathRemove(spec->config.name);
  sessions_.erase(spec->config.name);  // re-activation replaces (closes the old TAP)
  finished_.erase(spec->config.name);
  auto live = Open(*spec);
  if (!live) return Fail(live.error());
  if (auto st = Persist(*spec); !st) return Fail(st.error().Context("persisting session"));
  FastPathAdd(**live);
  (*live)->session->Activate();
  spdlog::info("session {}: activated on TAP {} (bridge {}), CoA {}, HA {}", spec->config.name,
               (*live)->tap->name(), spec->bridge, FormatIpv6(spec->config.care_of),
               FormatIpv6(spec->config.home_agent));
  json out = SessionJson(**live);
  sessions_[spec->config.name] = std::move(*live);
  Wake();
  return out;
}

Result<json> HostDaemon::Home(const json& args) {
  const std::string name = GetString(args, "name");
  std::lock_guard lk(mu_);
  auto it = sessions_.find(name);
  if (it == sessions_.end()) {
    auto spec = ParseHostSessionSpec(args);
    if (!spec)
      return Fail(spec.error().Context("no session '" + name +
                                       "' here, so home needs the full session parameters"));
    spec->mode = SessionMode::kHome;
    auto live = Open(*spec);
    if (!live) return Fail(live.error());
    finished_.erase(name);
    it = sessions_.emplace(name, std::move(*live)).first;
  }
  auto& live = *it->second;
  FastPathRemove(name);  // deregistering: nothing is tunnelled any more
  live.spec.mode = SessionMode::kHome;
  if (auto st = Persist(live.spec); !st) return Fail(st.error().Context("persisting session"));
  live.session->ReturnHome();
  spdlog::info("session {}: returning home (deregistering)", name);
  Wake();
  return SessionJson(live);
}

Result<json> HostDaemon::Deactivate(const std::string& name) {
  std::lock_guard lk(mu_);
  auto it = sessions_.find(name);
  if (it == sessions_.end()) return Fail(Error(ENOENT, "no session '" + name + "'"));
  FastPathRemove(name);
  it->second->session->Deactivate();
  json out = SessionJson(*it->second);
  Unpersist(name);
  finished_[name] = out;
  sessions_.erase(it);
  spdlog::info("session {}: deactivated (binding left in place)", name);
  Wake();
  return out;
}

json HostDaemon::SessionJson(const Live& live) const {
  const auto st = live.session->Status();
  const auto& c = live.spec.config;
  json j;
  j["name"] = c.name;
  j["mode"] = live.spec.mode == SessionMode::kHome ? "home" : "foreign";
  j["state"] = SessionStateName(st.state);
  j["coa"] = FormatIpv6(c.care_of);
  j["ha"] = FormatIpv6(c.home_agent);
  j["tap"] = live.tap ? live.tap->name() : "";
  j["bridge"] = live.spec.bridge;
  j["uplink"] = live.spec.uplink;
  j["fast_path"] = fast_path_ != nullptr && fast_path_->HasSession(c.name);
  j["last_ba_status"] = st.last_ba_status ? json(*st.last_ba_status) : json(nullptr);
  j["bindings"] = json::array();
  for (const auto& b : st.bindings) {
    json bj;
    bj["hoa"] = FormatIpv6(b.home_address);
    bj["state"] = BindingStateName(b.state);
    bj["seq"] = b.sequence_valid ? json(b.last_sequence) : json(nullptr);
    bj["lifetime_left"] = b.lifetime_left ? json(b.lifetime_left->count()) : json(nullptr);
    bj["last_status"] = b.last_status ? json(*b.last_status) : json(nullptr);
    bj["retransmit_ms"] = b.retransmit_interval.count();
    j["bindings"].push_back(bj);
  }
  const auto& k = st.counters;
  // The fast path's share is part of what the session carried: tunnelled6/4
  // and decap_delivered6/4 (and their bytes) count both paths; fast_path_*
  // (both families; fast_path_*4: the IPv4 share)
  // says how much of it never reached user space.
  HostFastPathSessionCounters fp;
  if (fast_path_) fp = fast_path_->SessionCounters(c.name);
  j["counters"] = {
      {"guest_frames", k.guest_frames},
      {"guest_malformed", k.guest_malformed},
      {"guest_foreign_mac", k.guest_foreign_mac},
      {"nd_answered", k.nd_answered},
      {"nd_ignored", k.nd_ignored},
      {"ra_sent", k.ra_sent},
      {"arp_answered", k.arp_answered},
      {"arp_ignored", k.arp_ignored},
      {"link_local_kept", k.link_local_kept},
      {"not_home_source", k.not_home_source},
      {"tunnelled6", k.tunnelled6 + fp.encap_packets - fp.encap4_packets},
      {"tunnelled4", k.tunnelled4 + fp.encap4_packets},
      {"tunnelled_bytes", k.tunnelled_bytes + fp.encap_bytes},
      {"too_big", k.too_big},
      {"decap_delivered6", k.decap_delivered6 + fp.decap_packets - fp.decap4_packets},
      {"decap_delivered4", k.decap_delivered4 + fp.decap4_packets},
      {"decap_bytes", k.decap_bytes + fp.decap_bytes},
      {"decap_spoofed", k.decap_spoofed},
      {"decap_not_ours", k.decap_not_ours},
      {"decap_malformed", k.decap_malformed},
      {"bu_sent", k.bu_sent},
      {"ba_accepted", k.ba_accepted},
      {"ba_rejected", k.ba_rejected},
      {"ba_wrong_source", k.ba_wrong_source},
      {"ba_wrong_sequence", k.ba_wrong_sequence},
      {"ba_auth_failed", k.ba_auth_failed},
      {"ba_unexpected", k.ba_unexpected},
      {"mh_malformed", k.mh_malformed},
      {"brr_received", k.brr_received},
      {"send_errors", k.send_errors},
      {"truncated", live.truncated},
      {"tunnel_send_errors", live.batch6->errors + (live.batch4 ? live.batch4->errors : 0)},
      {"fast_path_encap_packets", fp.encap_packets},
      {"fast_path_encap_bytes", fp.encap_bytes},
      {"fast_path_decap_packets", fp.decap_packets},
      {"fast_path_decap_bytes", fp.decap_bytes},
      {"fast_path_encap4_packets", fp.encap4_packets},
      {"fast_path_decap4_packets", fp.decap4_packets}};
  j["events"] = json(std::vector<json>(live.events.begin(), live.events.end()));
  return j;
}

json HostDaemon::StatusJson() {
  std::lock_guard lk(mu_);
  json out;
  json fp = {{"mode", FastPathModeName(options_.fast_path)}, {"loaded", fast_path_ != nullptr}};
  if (fast_path_) {
    json k = json::object();
    for (const auto& [name, v] : fast_path_->Counters()) k[name] = v;
    fp["counters"] = k;
  }
  out["fast_path"] = fp;
  out["sessions"] = json::array();
  for (const auto& [name, live] : sessions_) out["sessions"].push_back(SessionJson(*live));
  out["finished"] = json::array();
  for (const auto& [name, j] : finished_) out["finished"].push_back(j);
  return out;
}

std::vector<ControlCommand> HostDaemon::Commands() {
  auto wrap = [](Result<json> r) -> ControlResult {
    if (!r) return std::unexpected(ControlFailure(r.error()));
    return *r;
  };
  return {
      {"activate", "start a session here as a foreign host (register with the HA)",
       [this, wrap](const json& a) { return wrap(Activate(a)); }},
      {"home", "deregister and announce the guest at home, then stop the session",
       [this, wrap](const json& a) { return wrap(Home(a)); }},
      {"deactivate", "stop a session here without deregistering",
       [this, wrap](const json& a) { return wrap(Deactivate(GetString(a, "name"))); }},
      {"status", "sessions, bindings, counters and recent events",
       [this](const json&) -> ControlResult { return StatusJson(); }},
  };
}

void HostDaemon::ResumePersisted() {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(options_.state_dir + "/sessions", ec)) {
    if (entry.path().extension() != ".json") continue;
    std::ifstream in(entry.path());
    auto j = json::parse(in, nullptr, false);
    if (j.is_discarded()) {
      spdlog::error("cannot parse {}; session not resumed", entry.path().string());
      continue;
    }
    auto spec = ParseHostSessionSpec(j);
    if (!spec) {
      spdlog::error("cannot resume {}: {}", entry.path().string(), spec.error().message());
      continue;
    }
    auto live = Open(*spec);
    if (!live) {
      spdlog::error("cannot resume session {}: {}", spec->config.name, live.error().message());
      continue;
    }
    if (spec->mode == SessionMode::kHome) {
      (*live)->session->ReturnHome();
    } else {
      FastPathAdd(**live);
      (*live)->session->Activate();
    }
    spdlog::info("session {}: resumed ({})", spec->config.name,
                 spec->mode == SessionMode::kHome ? "home" : "foreign");
    sessions_[spec->config.name] = std::move(*live);
  }
}

void HostDaemon::ReapFinished() {
  const auto now = clock_.Now();
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    auto& live = *it->second;
    // Home, and the repeated announcements are out (no timer left).
    if (live.session->state() == SessionState::kHome && !live.session->NextDeadline()) {
      // Give the kernel a moment to push the announcement through the
      // bridge before the TAP disappears (unregistering drops queued skbs).
      if (!live.reap_at) live.reap_at = now + std::chrono::milliseconds(300);
      if (now >= *live.reap_at) {
        finished_[it->first] = SessionJson(live);
        FastPathRemove(it->first);
        Unpersist(it->first);
        spdlog::info("session {}: home; TAP {} removed", it->first, live.tap->name());
        it = sessions_.erase(it);
        continue;
      }
    }
    ++it;
  }
}

Status HostDaemon::Run() {
  {
    std::lock_guard lk(mu_);
    ResumePersisted();
  }
  ControlServerOptions copt;
  copt.socket_path = options_.control_path;
  auto server = ControlServer::Start(copt, Commands());
  if (!server) return Fail(server.error().Context("control socket"));
  control_ = std::move(*server);
  spdlog::info("kagemusha-tunneld serving on {} (state {})", options_.control_path,
               options_.state_dir);

  // Receive buffers; tunnel slots keep Ethernet headroom in front.
  constexpr size_t kSlot = 65536;
  const size_t batch = std::max<size_t>(1, options_.batch);
  std::vector<uint8_t> frame_mem(batch * kSlot);
  std::vector<PacketBuffer> frames(batch);
  for (size_t i = 0; i < batch; ++i)
    frames[i].storage = std::span<uint8_t>(frame_mem.data() + i * kSlot, kSlot);
  std::vector<uint8_t> tunnel_mem(batch * (kSlot + kEthernetHeaderSize));
  std::vector<PacketBuffer> tunnel(batch);
  for (size_t i = 0; i < batch; ++i)
    tunnel[i].storage = std::span<uint8_t>(
        tunnel_mem.data() + i * (kSlot + kEthernetHeaderSize) + kEthernetHeaderSize, kSlot);

  enum class Kind { kTap, kUplink, kTunnel6, kTunnel4 };
  struct Slot {
    Live* live;
    Kind kind;
  };
  std::vector<pollfd> pfds;
  std::vector<Slot> slots;
  while (!stop_) {
    int timeout_ms = 1000;
    pfds.clear();
    slots.clear();
    pfds.push_back({wake_fd_, POLLIN, 0});
    slots.push_back({nullptr, Kind::kTap});
    {
      std::lock_guard lk(mu_);
      const auto now = clock_.Now();
      for (auto& [name, live] : sessions_) {
        auto add = [&](int fd, Kind k) {
          if (fd < 0) return;
          pfds.push_back({fd, POLLIN, 0});
          slots.push_back({live.get(), k});
        };
        add(live->tap->fd(), Kind::kTap);
        add(live->uplink->fd(), Kind::kUplink);
        add(live->tunnel6->fd(), Kind::kTunnel6);
        if (live->tunnel4) add(live->tunnel4->fd(), Kind::kTunnel4);
        auto deadline = live->session->NextDeadline();
        if (live->reap_at) deadline = std::min(deadline.value_or(*live->reap_at), *live->reap_at);
        if (deadline) {
          auto ms = std::chrono::ceil<std::chrono::milliseconds>(*deadline - now).count();
          timeout_ms = static_cast<int>(std::clamp<int64_t>(ms, 0, timeout_ms));
        }
      }
    }
    int n = poll(pfds.data(), pfds.size(), timeout_ms);
    if (n < 0 && errno != EINTR) return Fail(Error::Errno(errno, "poll"));
    std::lock_guard lk(mu_);
    if (pfds[0].revents & POLLIN) {
      uint64_t v;
      [[maybe_unused]] auto r = read(wake_fd_, &v, sizeof v);
      // The session set may have changed: slots may be stale. Only timers run.
    } else if (n > 0) {
      for (size_t i = 1; i < pfds.size(); ++i) {
        if (!(pfds[i].revents & (POLLIN | POLLERR))) continue;
        Live* live = slots[i].live;
        // Bounded work per fd per wake-up keeps the loop fair.
        for (int round = 0; round < 8; ++round) {
          size_t got = 0;
          switch (slots[i].kind) {
            case Kind::kTap:
            case Kind::kUplink: {
              PacketSource* src = slots[i].kind == Kind::kTap
                                      ? static_cast<PacketSource*>(live->tap.get())
                                      : static_cast<PacketSource*>(live->uplink.get());
              auto r = src->Receive(frames);
              if (!r) break;
              got = *r;
              for (size_t k = 0; k < got; ++k) {
                if (frames[k].length > frames[k].storage.size()) {
                  ++live->truncated;
                  continue;
                }
                if (slots[i].kind == Kind::kTap)
                  live->session->HandleGuestFrame(frames[k].data());
                else
                  live->session->HandleUplinkFrame(frames[k].data());
              }
              live->batch6->Flush();
              if (live->batch4) live->batch4->Flush();
              break;
            }
            case Kind::kTunnel6:
            case Kind::kTunnel4: {
              auto* sock =
                  slots[i].kind == Kind::kTunnel6 ? live->tunnel6.get() : live->tunnel4.get();
              auto r = sock->Receive(tunnel);
              if (!r) break;
              got = *r;
              for (size_t k = 0; k < got; ++k) {
                auto& b = tunnel[k];
                if (b.length > b.storage.size()) {
                  ++live->truncated;
                  continue;
                }
                live->session->HandleTunnelled(
                    b.peer, sock->protocol(),
                    std::span<uint8_t>(b.storage.data() - kEthernetHeaderSize,
                                       b.length + kEthernetHeaderSize));
              }
              break;
            }
          }
          if (got < batch) break;
        }
      }
    }
    for (auto& [name, live] : sessions_) live->session->OnTimer();
    ReapFinished();
  }
  control_->Stop();
  return Ok();
}

}  // namespace kagemusha::tunnel

// kagemusha-ha: a user-space Mobile IPv6 home agent (docs/home-agent.md).
//
//   kagemusha-ha serve  --home-link IF --address HA_IPV6 --home-prefix P/LEN ...
//   kagemusha-ha status --control PATH [--json]
//
// `serve` only parses options and wires the parts together: the HomeAgent
// logic (tunnel/home_agent.h) behind the packet_io.h sockets, the binding
// journal in --state-dir, and the control socket. One thread runs the event
// loop with poll(2) (home-link AF_PACKET socket, the two raw tunnel sockets,
// a signalfd); the control server's thread reads status under a mutex.
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_app.h"
#include "kagemusha/common/clock.h"
#include "kagemusha/common/control_socket.h"
#include "kagemusha/tunnel/binding_cache.h"
#include "kagemusha/tunnel/fastpath.h"
#include "kagemusha/tunnel/home_agent.h"
#include "kagemusha/tunnel/packet_io.h"

#ifndef KAGEMUSHA_VERSION
#define KAGEMUSHA_VERSION "0.1.0"
#endif

namespace {

namespace po = boost::program_options;
namespace kt = kagemusha::tunnel;
using json = nlohmann::json;
using kagemusha::Error;
using kagemusha::Result;
using namespace std::chrono_literals;

constexpr const char* kProg = "kagemusha-ha";
constexpr const char* kNftTable = "kagemusha_ha";

using kagemusha::cli::ParseCommandLine;
using kagemusha::cli::RuntimeError;
using kagemusha::cli::UsageError;

// ---- status JSON (shared by the control handler and the CLI) -----------------------

json CountersJson(const kt::HomeAgentCounters& c) {
  return {
      {"bu_received", c.bu_received},
      {"bu_malformed", c.bu_malformed},
      {"bu_bad_checksum", c.bu_bad_checksum},
      {"bu_rate_limited", c.bu_rate_limited},
      {"bu_auth_missing", c.bu_auth_missing},
      {"bu_auth_failed", c.bu_auth_failed},
      {"bu_during_dad", c.bu_during_dad},
      {"ba_sent", c.ba_sent},
      {"ba_send_errors", c.ba_send_errors},
      {"accepted", c.accepted},
      {"refreshed", c.refreshed},
      {"deregistered", c.deregistered},
      {"rejected", c.rejected},
      {"expired", c.expired},
      {"dad_probes", c.dad_probes},
      {"dad_conflicts", c.dad_conflicts},
      {"dad_revoked", c.dad_revoked},
      {"proxy_na_sent", c.proxy_na_sent},
      {"proxy_arp_sent", c.proxy_arp_sent},
      {"encapsulated", c.encapsulated},
      {"encap_errors", c.encap_errors},
      {"resegmented", c.resegmented},
      {"decapsulated", c.decapsulated},
      {"decap_spoofed", c.decap_spoofed},
      {"decap_malformed", c.decap_malformed},
      {"deliver_errors", c.deliver_errors},
      {"hop_limit_exceeded", c.hop_limit_exceeded},
      {"persist_errors", c.persist_errors},
      {"link_frames", c.link_frames},
      {"link_malformed", c.link_malformed},
  };
}

json FastPathJson(kt::FastPathMode mode, const kt::HaFastPath* fp) {
  json j = {{"mode", kt::FastPathModeName(mode)}, {"loaded", fp != nullptr}};
  if (fp) {
    json k = json::object();
    for (const auto& [name, v] : fp->Counters()) k[name] = v;
    j["counters"] = k;
    j["bindings_published"] = fp->published();
    const auto& g = fp->gro();
    json gj = {
        {"enabled", g.enabled}, {"changed_by_us", g.changed}, {"mode", g.kept ? "keep" : "on"}};
    if (!g.known || !g.error.empty()) gj["error"] = g.error;
    j["gro"] = gj;
  }
  return j;
}

json StatusJson(const kt::HomeAgentStatus& s, const kt::HomeAgentConfig& c,
                const std::string& link) {
  json bindings = json::array();
  for (const auto& b : s.bindings) {
    json e = {{"home_address", b.home_address},
              {"care_of", b.care_of},
              {"sequence", b.sequence},
              {"lifetime_left_s", b.lifetime_left_s},
              {"granted_lifetime_s", b.granted_lifetime_s},
              {"state", b.state},
              {"spi", b.spi}};
    e["home_address4"] = b.home_address4.empty() ? json(nullptr) : json(b.home_address4);
    bindings.push_back(std::move(e));
  }
  return {{"home_link", link},
          {"address", kt::FormatIpv6(c.address)},
          {"dad", kt::DadModeName(c.dad)},
          {"insecure", c.insecure},
          {"max_lifetime_s", c.max_lifetime.count()},
          {"binding_count", s.bindings.size()},
          {"bindings", bindings},
          {"dad_pending", s.dad_pending},
          {"rate_table_entries", s.rate_table_entries},
          {"counters", CountersJson(s.counters)}};
}

std::string StatusHuman(const json& s) {
  std::string out;
  char line[512];
  std::snprintf(line, sizeof line, "home agent %s on %s (dad %s%s), %zu binding(s)\n",
                s.value("address", "").c_str(), s.value("home_link", "").c_str(),
                s.value("dad", "").c_str(), s.value("insecure", false) ? ", INSECURE" : "",
                s.value("binding_count", size_t{0}));
  out += line;
  if (!s["bindings"].empty()) {
    std::snprintf(line, sizeof line, "  %-40s %-40s %-15s %6s %8s %s\n", "HOME ADDRESS", "CARE-OF",
                  "IPV4 HOA", "SEQ", "LEFT(s)", "STATE");
    out += line;
  }
  for (const auto& b : s["bindings"]) {
    std::string v4 = b["home_address4"].is_string() ? b["home_address4"].get<std::string>() : "-";
    std::snprintf(line, sizeof line, "  %-40s %-40s %-15s %6d %8lld %s\n",
                  b.value("home_address", "").c_str(), b.value("care_of", "").c_str(), v4.c_str(),
                  b.value("sequence", 0),
                  static_cast<long long>(b.value("lifetime_left_s", int64_t{0})),
                  b.value("state", "").c_str());
    out += line;
  }
  for (const auto& p : s["dad_pending"]) out += "  DAD running for " + p.get<std::string>() + "\n";
  if (s.contains("fast_path")) {
    const auto& f = s["fast_path"];
    if (f.value("loaded", false)) {
      const auto& k = f["counters"];
      std::snprintf(line, sizeof line,
                    "fast path: on (kernel encapsulated %llu, decapsulated %llu; Packet Too Big "
                    "sent %llu)\n",
                    static_cast<unsigned long long>(k.value("ha_encap_packets", uint64_t{0})),
                    static_cast<unsigned long long>(k.value("ha_decap_packets", uint64_t{0})),
                    static_cast<unsigned long long>(f.value("packet_too_big_sent", uint64_t{0})));
      out += line;
    } else {
      out += "fast path: off (mode " + f.value("mode", std::string("?")) + ")\n";
    }
  }
  out += "counters:";
  int n = 0;
  for (const auto& [k, v] : s["counters"].items()) {
    if (v.get<uint64_t>() == 0) continue;
    out += (n++ % 4 == 0 ? "\n  " : "  ") + k + "=" + std::to_string(v.get<uint64_t>());
  }
  out += "\n";
  return out;
}

// ---- status ------------------------------------------------------------------------

int RunStatus(int argc, char** argv) {
  po::options_description d("Options");
  d.add_options()("control", po::value<std::string>()->required()->value_name("PATH"),
                  "control socket of the running home agent (serve --control)")(
      "json", "print the status as one JSON object")("help,h", "show this help");
  po::variables_map vm;
  int rc =
      ParseCommandLine("status", "kagemusha-ha status --control PATH [--json]", d, argc, argv, vm);
  if (rc >= 0) return rc;
  std::string control = vm["control"].as<std::string>();
  auto reply = kagemusha::ControlCall(control, "status", json::object(), 10s);
  if (!reply) {
    std::string hint;
    if (reply.error().code() == ENOENT || reply.error().code() == ECONNREFUSED) {
      hint = "is `kagemusha-ha serve --control " + control + "` running?";
    }
    return RuntimeError(reply.error().message(), hint);
  }
  if (!reply->ok) return RuntimeError(reply->error_message, reply->hint);
  if (vm.count("json")) {
    std::printf("%s\n", reply->result.dump().c_str());
  } else {
    std::printf("%s", StatusHuman(reply->result).c_str());
  }
  return 0;
}

// ---- serve -------------------------------------------------------------------------

kagemusha::Status SetupLogging(const std::string& level, bool json_lines) {
  static const std::vector<std::string> levels = {"trace", "debug",    "info", "warn",
                                                  "error", "critical", "off"};
  if (std::find(levels.begin(), levels.end(), level) == levels.end()) {
    return kagemusha::Fail(Error::Invalid("--log-level '" + level +
                                          "' is not one of trace, "
                                          "debug, info, warn, error, critical, off"));
  }
  auto logger = std::make_shared<spdlog::logger>(
      kProg, std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  logger->set_level(spdlog::level::from_str(level));
  logger->flush_on(spdlog::level::trace);
  if (json_lines) {
    // Messages never contain double quotes or backslashes (addresses, numbers
    // and our own wording), so the pattern yields valid JSON lines.
    logger->set_pattern(R"({"time":"%Y-%m-%dT%H:%M:%S.%fZ","level":"%l","msg":"%v"})",
                        spdlog::pattern_time_type::utc);
  }
  spdlog::set_default_logger(logger);
  return kagemusha::Ok();
}

// Receives everything on the home link, multicast included: ND for the
// proxied addresses goes to solicited-node groups we never joined.
kagemusha::Status JoinAllMulticast(int fd, int ifindex) {
  packet_mreq mr{};
  mr.mr_ifindex = ifindex;
  mr.mr_type = PACKET_MR_ALLMULTI;
  if (setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr) < 0) {
    return kagemusha::Fail(Error::Errno(errno, "PACKET_ADD_MEMBERSHIP allmulti"));
  }
  return kagemusha::Ok();
}

int RunServe(int argc, char** argv) {
  po::options_description d("Options");
  d.add_options()("home-link", po::value<std::string>()->required()->value_name("IF"),
                  "the home link interface (BUs, ND/ARP proxy and captured traffic)")(
      "address", po::value<std::string>()->required()->value_name("HA_IPV6"),
      "the home agent's IPv6 address (on the home link)")(
      "home-prefix", po::value<std::string>()->required()->value_name("P/LEN"),
      "the home subnet prefix (status 132 outside it)")(
      "home-prefix4", po::value<std::string>()->value_name("P4/LEN"),
      "the IPv4 home subnet (RFC 5555 IPv4 home addresses)")(
      "address4", po::value<std::string>()->value_name("HA_IPV4"),
      "the home agent's IPv4 address on the home link")(
      "allow", po::value<std::vector<std::string>>()->composing()->value_name("HOA"),
      "a home address allowed to register (repeatable); status 129 for others")(
      "key", po::value<std::vector<std::string>>()->composing()->value_name("HOA:SPI:KEYFILE"),
      "RFC 4285 MN-HA key for a home address (repeatable); key file 0600, hex or raw")(
      "insecure", "accept BUs without RFC 4285 authentication (interop with IPsec-style peers)")(
      "dad", po::value<std::string>()->default_value("rfc")->value_name("rfc|optimistic|off"),
      "duplicate address detection for new bindings")(
      "max-lifetime", po::value<int64_t>()->default_value(3600)->value_name("S"),
      "cap on granted binding lifetimes, seconds")(
      "bu-rate", po::value<double>()->default_value(10)->value_name("N"),
      "BUs per second per source (burst N); 0 = unlimited")(
      "state-dir", po::value<std::string>()->required()->value_name("DIR"),
      "where the binding journal lives (created 0700)")(
      "control", po::value<std::string>()->required()->value_name("PATH"),
      "control socket (created 0600)")(
      "log-level", po::value<std::string>()->default_value("info")->value_name("L"),
      "trace, debug, info, warn, error, critical or off")("json", "log JSON lines instead of text")(
      "fast-path", po::value<std::string>()->default_value("auto")->value_name("auto|on|off"),
      "eBPF tc fast path for tunnelled IPv6 (auto: use it if it loads)")(
      "home-link-gro", po::value<std::string>()->default_value("on")->value_name("on|keep"),
      "with the fast path loaded, turn GRO on on the home link if it is off (and off again on "
      "exit); keep: leave it as it is")("help,h", "show this help");
  po::variables_map vm;
  int rc = ParseCommandLine(
      "serve",
      "kagemusha-ha serve --home-link IF --address HA_IPV6 --home-prefix P/LEN\n"
      "         [--home-prefix4 P4/LEN] [--address4 HA_IPV4] [--allow HOA]...\n"
      "         [--key HOA:SPI:KEYFILE]... [--insecure] [--dad rfc|optimistic|off]\n"
      "         [--max-lifetime S] [--bu-rate N] --state-dir DIR --control PATH\n"
      "         [--log-level L] [--json] [--fast-path auto|on|off]",
      d, argc, argv, vm);
  if (rc >= 0) return rc;
  if (auto s = SetupLogging(vm["log-level"].as<std::string>(), vm.count("json") > 0); !s) {
    return UsageError("serve", s.error().message());
  }

  // -- configuration
  kt::HomeAgentConfig config;
  const std::string link = vm["home-link"].as<std::string>();
  auto address = kt::ParseIpv6(vm["address"].as<std::string>());
  if (!address) return UsageError("serve", "--address: " + address.error().message());
  config.address = *address;
  auto prefix = kt::ParseIpv6Prefix(vm["home-prefix"].as<std::string>());
  if (!prefix) return UsageError("serve", "--home-prefix: " + prefix.error().message());
  config.home_prefix = *prefix;
  if (vm.count("home-prefix4")) {
    auto p4 = kt::ParseIpv4Prefix(vm["home-prefix4"].as<std::string>());
    if (!p4) return UsageError("serve", "--home-prefix4: " + p4.error().message());
    config.home_prefix4 = *p4;
  }
  if (vm.count("address4")) {
    auto a4 = kt::ParseIpv4(vm["address4"].as<std::string>());
    if (!a4) return UsageError("serve", "--address4: " + a4.error().message());
    config.address4 = *a4;
  }
  if (vm.count("allow")) {
    for (const auto& a : vm["allow"].as<std::vector<std::string>>()) {
      auto hoa = kt::ParseIpv6(a);
      if (!hoa) return UsageError("serve", "--allow: " + hoa.error().message());
      config.allow.push_back(*hoa);
    }
  }
  if (vm.count("key")) {
    for (const auto& spec : vm["key"].as<std::vector<std::string>>()) {
      auto key = kt::LoadHomeKey(spec);
      if (!key) return RuntimeError(key.error().message());
      config.keys.push_back(std::move(*key));
    }
  }
  config.insecure = vm.count("insecure") > 0;
  auto dad = kt::ParseDadMode(vm["dad"].as<std::string>());
  if (!dad) return UsageError("serve", dad.error().message());
  config.dad = *dad;
  config.max_lifetime = std::chrono::seconds(vm["max-lifetime"].as<int64_t>());
  config.bu_rate = vm["bu-rate"].as<double>();
  auto fast_path_mode = kt::ParseFastPathMode(vm["fast-path"].as<std::string>());
  if (!fast_path_mode) return UsageError("serve", fast_path_mode.error().message());
  const std::string gro_opt = vm["home-link-gro"].as<std::string>();
  if (gro_opt != "on" && gro_opt != "keep")
    return UsageError("serve", "--home-link-gro must be on or keep");
  if (auto s = kt::ValidateHomeAgentConfig(config); !s) {
    return UsageError("serve", s.error().message());
  }
  auto mac = kt::InterfaceMac(link);
  if (!mac) return RuntimeError("--home-link " + link + ": " + mac.error().message());
  config.mac = *mac;

  // -- signals first, so every thread started below inherits the mask
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);
  int sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sfd < 0) return RuntimeError(Error::Errno(errno, "signalfd").message());

  // -- sockets
  kt::PacketSocketOptions po_link;
  po_link.interface = link;
  po_link.protocol = 0x0003;  // ETH_P_ALL: BUs, ND, ARP and data for bound addresses
  po_link.ignore_outgoing = true;
  po_link.receive_buffer_bytes = 4 << 20;
  auto link_socket = kt::PacketSocket::Open(po_link);
  if (!link_socket) return RuntimeError("home link " + link + ": " + link_socket.error().message());
  if (auto s = JoinAllMulticast((*link_socket)->fd(), (*link_socket)->ifindex()); !s) {
    spdlog::warn("{}: {}; ND for proxied addresses may be missed on this NIC", link,
                 s.error().message());
  }
  kt::RawIpv6SocketOptions t6;
  t6.protocol = kt::ipproto::kIpv6;
  t6.bind_address = config.address;
  t6.receive_buffer_bytes = 4 << 20;
  auto tunnel6 = kt::RawIpv6Socket::Open(t6);
  if (!tunnel6) return RuntimeError("IPv6-in-IPv6 socket: " + tunnel6.error().message());
  kt::RawIpv6SocketOptions t4 = t6;
  t4.protocol = kt::ipproto::kIpv4;
  auto tunnel4 = kt::RawIpv6Socket::Open(t4);
  if (!tunnel4) return RuntimeError("IPv4-in-IPv6 socket: " + tunnel4.error().message());
  auto sender6 = kt::Ipv6RawSender::Open();
  if (!sender6) return RuntimeError("raw IPv6 sender: " + sender6.error().message());
  auto sender4 = kt::Ipv4RawSender::Open();
  if (!sender4) return RuntimeError("raw IPv4 sender: " + sender4.error().message());
  // The kernel must not forward what we capture for bound home addresses
  // (frames to our MAC for an address that is not ours).
  for (const char* knob :
       {"/proc/sys/net/ipv6/conf/all/forwarding", "/proc/sys/net/ipv4/ip_forward"}) {
    if (FILE* f = std::fopen(knob, "re")) {
      int v = 0;
      if (std::fscanf(f, "%d", &v) == 1 && v != 0) {
        spdlog::warn(
            "{} is {}: the kernel will also forward packets for bound home addresses; "
            "turn forwarding off in the home agent's namespace",
            knob, v);
      }
      std::fclose(f);
    }
  }
  bool nft = true;
  if (auto s = kt::SuppressMobilityIcmpErrors(kNftTable); !s) {
    nft = false;
    spdlog::warn(
        "could not install the nftables table {} ({}); the kernel will answer each BU with an "
        "ICMPv6 Parameter Problem",
        kNftTable, s.error().message());
  }

  // -- fast path: tc ingress on the home link, and a socket filter so the
  // link socket stops seeing what the kernel now forwards by itself.
  // The home link's MTU, read once: the HA's own (oversize checks,
  // resegmenting) and, less the 40-byte outer header, the fast path's.
  const auto home_link_mtu = kt::InterfaceMtu(link);
  if (home_link_mtu && *home_link_mtu >= 576) config.link_mtu = size_t(*home_link_mtu);
  std::unique_ptr<kt::HaFastPath> fast_path;
  uint32_t fast_path_mtu = 0;
  uint64_t ptb_sent = 0;  // GUARDED_BY(mu)
  if (*fast_path_mode == kt::FastPathMode::kOff) {
    kt::RemoveStaleFastPathFilters();
  } else {
    const auto& mtu = home_link_mtu;
    auto fp = mtu ? kt::HaFastPath::Load(link, config.address, uint32_t(*mtu - 40), gro_opt == "on")
                  : Result<std::unique_ptr<kt::HaFastPath>>(std::unexpected(mtu.error()));
    if (fp) {
      if (auto s = (*fp)->AttachSocketFilter((*link_socket)->fd()); !s) {
        fp = Result<std::unique_ptr<kt::HaFastPath>>(std::unexpected(s.error()));
      }
    }
    if (fp) {
      fast_path = std::move(*fp);
      fast_path_mtu = uint32_t(*mtu - 40);
      spdlog::info("fast path: eBPF tc program on {} (inner MTU {})", link, *mtu - 40);
    } else if (*fast_path_mode == kt::FastPathMode::kOn) {
      return RuntimeError("--fast-path on: " + fp.error().message());
    } else {
      spdlog::warn("fast path unavailable ({}); every tunnelled packet goes through user space",
                   fp.error().message());
    }
  }

  // -- state
  auto journal = kt::BindingJournal::Open(vm["state-dir"].as<std::string>());
  if (!journal) return RuntimeError("--state-dir: " + journal.error().message());
  auto loaded = (*journal)->Load();
  if (!loaded) return RuntimeError("--state-dir: " + loaded.error().message());
  if (loaded->bad_lines) {
    spdlog::warn("{}: skipped {} damaged line(s)", (*journal)->path(), loaded->bad_lines);
  }

  kt::HomeAgentPorts ports{link_socket->get(), sender6->get(), tunnel6->get(),
                           tunnel4->get(),     sender6->get(), sender4->get()};
  std::mutex mu;
  kt::HomeAgent ha(config, ports, kagemusha::SteadyClock::Instance(), journal->get());
  auto restored = ha.Restore(loaded->bindings);
  if (!restored) return RuntimeError("restoring bindings: " + restored.error().message());
  if (fast_path) {
    if (auto s = fast_path->Sync(ha.cache()); !s)
      spdlog::warn("fast path: {}", s.error().message());
  }

  // -- control
  kagemusha::ControlServerOptions co;
  co.socket_path = vm["control"].as<std::string>();
  std::vector<kagemusha::ControlCommand> commands = {
      {"status", "bindings (home address, care-of, sequence, lifetime left, state) and counters",
       [&](const json&) -> kagemusha::ControlResult {
         std::lock_guard lk(mu);
         json j = StatusJson(ha.Status(), ha.config(), link);
         j["fast_path"] = FastPathJson(*fast_path_mode, fast_path.get());
         j["fast_path"]["packet_too_big_sent"] = ptb_sent;
         // encapsulated/decapsulated count both paths (what the HA
         // forwarded); fast_path.counters says how much stayed in the kernel.
         if (fast_path) {
           auto& k = j["counters"];
           for (const auto& [name, v] : fast_path->Counters()) {
             if (name == "ha_encap_packets")
               k["encapsulated"] = k["encapsulated"].get<uint64_t>() + v;
             if (name == "ha_decap_packets")
               k["decapsulated"] = k["decapsulated"].get<uint64_t>() + v;
           }
         }
         return j;
       }}};
  auto control = kagemusha::ControlServer::Start(co, commands);
  if (!control) return RuntimeError("control socket: " + control.error().message());

  spdlog::info(
      "ready: home agent {} on {} (mac {}), home prefix {}/{}, dad {}, {} key(s){}, {} binding(s) "
      "restored",
      kt::FormatIpv6(config.address), link, kt::FormatMac(config.mac),
      kt::FormatIpv6(config.home_prefix.prefix), int(config.home_prefix.length),
      kt::DadModeName(config.dad), config.keys.size(), config.insecure ? ", INSECURE" : "",
      *restored);

  // -- event loop
  kt::PacketBufferPool pool(32, 65536 + 64);
  pollfd fds[4] = {{(*link_socket)->fd(), POLLIN, 0},
                   {(*tunnel6)->fd(), POLLIN, 0},
                   {(*tunnel4)->fd(), POLLIN, 0},
                   {sfd, POLLIN, 0}};
  bool running = true;
  auto& steady = kagemusha::SteadyClock::Instance();
  auto next_ptb = steady.Now();
  auto last_tick = steady.Now();
  while (running) {
    int timeout_ms = 1000;
    {
      std::lock_guard lk(mu);
      if (auto next = ha.NextDeadline()) {
        auto left = std::chrono::ceil<std::chrono::milliseconds>(
            *next - kagemusha::SteadyClock::Instance().Now());
        timeout_ms = int(std::clamp<int64_t>(left.count(), 0, 1000));
      }
    }
    int n = ::poll(fds, 4, timeout_ms);
    if (n < 0 && errno != EINTR) {
      spdlog::error("poll: {}", std::strerror(errno));
      break;
    }
    std::lock_guard lk(mu);
    if (n > 0 && (fds[0].revents & POLLIN)) {
      auto got = (*link_socket)->Receive(pool.buffers());
      if (got) {
        for (size_t i = 0; i < *got; ++i) {
          const auto& b = pool.buffers()[i];
          if (b.length > b.storage.size()) continue;  // truncated: not ours to parse
          if (fast_path) {
            // Too big for the fast path: forwarded below as before, and the
            // sender learns the tunnel MTU (at most 100 a second).
            auto now = steady.Now();
            if (now >= next_ptb) {
              if (auto ptb = kt::HaPacketTooBigFor(b.data(), config.mac, config.address,
                                                   fast_path_mtu, ha.cache(), config.address4)) {
                // ICMPv6 Packet Too Big, or ICMP Fragmentation Needed (IPv4).
                const bool v4 = !ptb->empty() && ((*ptb)[0] >> 4) == 4;
                if (v4 ? bool((*sender4)->Send(*ptb)) : bool((*sender6)->Send(*ptb))) ++ptb_sent;
                next_ptb = now + 10ms;
              }
            }
          }
          ha.HandleLinkFrame(b.data());
        }
      }
    }
    for (int k = 1; k <= 2; ++k) {
      if (n <= 0 || !(fds[k].revents & POLLIN)) continue;
      auto& sock = k == 1 ? *tunnel6 : *tunnel4;
      auto got = sock->Receive(pool.buffers());
      if (!got) continue;
      for (size_t i = 0; i < *got; ++i) {
        const auto& b = pool.buffers()[i];
        if (b.length > b.storage.size()) continue;
        ha.HandleTunnelPacket(sock->protocol(), b.peer, b.data());
      }
    }
    if (n > 0 && (fds[3].revents & POLLIN)) {
      signalfd_siginfo si{};
      if (::read(sfd, &si, sizeof si) == sizeof si) {
        spdlog::info("signal {}: stopping (bindings stay in the journal)", si.ssi_signo);
        running = false;
      }
    }
    // Timers run when one is due or once a second, not per packet batch.
    auto now = steady.Now();
    auto next = ha.NextDeadline();
    if ((next && *next <= now) || now - last_tick >= 1s) {
      ha.OnTimer();
      last_tick = now;
    }
    // The kernel's binding map follows the cache (a no-op unless it changed).
    if (fast_path) {
      if (auto s = fast_path->Sync(ha.cache()); !s) {
        spdlog::warn("fast path: {}", s.error().message());
      }
    }
  }
  (*control)->Stop();
  if (nft) (void)kt::RemoveNftTable(kNftTable);
  ::close(sfd);
  return 0;
}

const std::vector<kagemusha::cli::Subcommand>& Subcommands() {
  static const std::vector<kagemusha::cli::Subcommand> table = {
      {"serve", "run the home agent on a home link", RunServe},
      {"status", "show bindings and counters of a running home agent", RunStatus},
  };
  return table;
}

}  // namespace

int main(int argc, char** argv) {
  static const kagemusha::cli::Program program{
      kProg,
      "A user-space Mobile IPv6 home agent (RFC 6275, RFC 5555 IPv4 home addresses, RFC 4285 "
      "authentication).",
      KAGEMUSHA_VERSION, Subcommands()};
  return kagemusha::cli::RunProgram(program, argc, argv);
}

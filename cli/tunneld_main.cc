// kagemusha-tunneld: the host side of guest mobility. `serve` runs the daemon
// (tunnel/host_daemon.h); the other subcommands are clients of its control
// socket. Reference: docs/tunnel-host.md.
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "host_daemon.h"
#include "kagemusha/common/clock.h"
#include "cli_app.h"
#include "kagemusha/common/control_socket.h"

namespace po = boost::program_options;
using nlohmann::json;

namespace {

constexpr auto kCallTimeout = std::chrono::milliseconds(5000);

po::variables_map Parse(int argc, char** argv, const po::options_description& desc,
                        const char* usage) {
  po::variables_map vm;
  po::store(po::command_line_parser(argc, argv).options(desc).run(), vm);
  if (vm.count("help")) {
    std::cout << usage << "\n" << desc;
    std::exit(0);
  }
  po::notify(vm);
  return vm;
}

json Call(const std::string& control, const std::string& command, const json& args) {
  auto reply = kagemusha::ControlCall(control, command, args, kCallTimeout);
  if (!reply)
    throw std::runtime_error("control socket " + control + ": " + reply.error().message());
  if (!reply->ok) {
    std::string msg = reply->error_message;
    if (!reply->hint.empty()) msg += " (" + reply->hint + ")";
    throw std::runtime_error(msg);
  }
  return reply->result;
}

void AddSessionOptions(po::options_description& d) {
  d.add_options()("name", po::value<std::string>()->required(), "session name")(
      "guest-mac", po::value<std::string>(), "guest's MAC address")(
      "hoa", po::value<std::vector<std::string>>()->composing(), "IPv6 home address (repeatable)")(
      "hoa4", po::value<std::string>(), "IPv4 home address (DSMIPv6)")(
      "hoa4-prefix-len", po::value<unsigned>(), "prefix length sent with the IPv4 HoA (32)")(
      "home-prefix", po::value<std::string>(), "home prefix IPV6/LEN")(
      "router-mac", po::value<std::string>(), "home router's MAC")(
      "router-ll", po::value<std::string>(), "home router's link-local address")(
      "router-global", po::value<std::string>(), "home router's global address")(
      "router-v4", po::value<std::string>(), "home IPv4 gateway")(
      "ha", po::value<std::string>(), "home agent address")("coa", po::value<std::string>(),
                                                            "this host's care-of address")(
      "uplink", po::value<std::string>(), "interface the care-of address is on")(
      "bridge", po::value<std::string>(), "the VM's bridge")(
      "mtu", po::value<unsigned>(), "tunnel MTU: largest inner packet (1460)")(
      "ra", po::bool_switch(), "answer Router Solicitations as the home router")(
      "lifetime", po::value<unsigned>(), "requested binding lifetime in seconds (600)")(
      "dereg-attempts", po::value<unsigned>(), "deregistration BUs before giving up (3)")(
      "spi", po::value<uint32_t>(), "MN-HA SPI")("key-file", po::value<std::string>(),
                                                 "MN-HA key (the file's bytes, HMAC-SHA256)")(
      "insecure", po::bool_switch(), "no MN-HA authentication")(
      "wait", po::value<double>()->implicit_value(30), "wait up to S seconds for the outcome");
}

json SessionArgs(const po::variables_map& vm) {
  json a;
  auto str = [&](const char* opt, const char* key) {
    if (vm.count(opt)) a[key] = vm[opt].as<std::string>();
  };
  auto num = [&](const char* opt, const char* key) {
    if (vm.count(opt)) a[key] = vm[opt].as<unsigned>();
  };
  str("name", "name");
  str("guest-mac", "guest_mac");
  if (vm.count("hoa")) a["hoa"] = vm["hoa"].as<std::vector<std::string>>();
  str("hoa4", "hoa4");
  num("hoa4-prefix-len", "home_prefix4_length");
  str("home-prefix", "home_prefix");
  str("router-mac", "router_mac");
  str("router-ll", "router_ll");
  str("router-global", "router_global");
  str("router-v4", "router_v4");
  str("ha", "ha");
  str("coa", "coa");
  str("uplink", "uplink");
  str("bridge", "bridge");
  num("mtu", "mtu");
  num("lifetime", "lifetime");
  num("dereg-attempts", "dereg_attempts");
  if (vm["ra"].as<bool>()) a["ra"] = true;
  if (vm.count("spi")) a["spi"] = vm["spi"].as<uint32_t>();
  if (vm.count("key-file")) a["key_file"] = vm["key-file"].as<std::string>();
  if (vm["insecure"].as<bool>()) a["insecure"] = true;
  return a;
}

// Polls status until the session reaches one of `goals` (in "sessions" or
// "finished"); returns the session's JSON or throws on timeout.
json WaitFor(const std::string& control, const std::string& name,
             const std::vector<std::string>& goals, const std::vector<std::string>& failures,
             double seconds) {
  const auto end = std::chrono::steady_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  json last;
  while (true) {
    json st = Call(control, "status", json::object());
    for (const char* list : {"sessions", "finished"})
      for (const auto& s : st[list])
        if (s["name"] == name) last = s;
    if (!last.is_null()) {
      const std::string state = last["state"];
      for (const auto& g : goals)
        if (state == g) return last;
      for (const auto& f : failures)
        if (state == f)
          throw std::runtime_error("session " + name + " is " + state + " (last BA status " +
                                   last["last_ba_status"].dump() + ")");
    }
    if (std::chrono::steady_clock::now() >= end)
      throw std::runtime_error("timed out waiting for session " + name + " (state " +
                               (last.is_null() ? "unknown" : last["state"].dump()) + ")");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

void PrintSession(const json& s) {
  std::printf("%s: %s (%s) tap %s coa %s ha %s last-ba-status %s\n",
              s["name"].get<std::string>().c_str(), s["state"].get<std::string>().c_str(),
              s["mode"].get<std::string>().c_str(), s["tap"].get<std::string>().c_str(),
              s["coa"].get<std::string>().c_str(), s["ha"].get<std::string>().c_str(),
              s["last_ba_status"].dump().c_str());
  for (const auto& b : s["bindings"])
    std::printf("  hoa %s %s seq %s lifetime-left %s last-status %s\n",
                b["hoa"].get<std::string>().c_str(), b["state"].get<std::string>().c_str(),
                b["seq"].dump().c_str(), b["lifetime_left"].dump().c_str(),
                b["last_status"].dump().c_str());
  std::string counters;
  for (const auto& [k, v] : s["counters"].items())
    if (v.get<uint64_t>() != 0) counters += " " + k + "=" + v.dump();
  std::printf("  counters:%s\n", counters.empty() ? " (all zero)" : counters.c_str());
}

int Serve(int argc, char** argv) {
  po::options_description d("serve options");
  d.add_options()("help,h", "help")("control", po::value<std::string>()->required(),
                                    "control socket path")(
      "state-dir", po::value<std::string>()->required(), "state directory")(
      "log-level", po::value<std::string>()->default_value("info"), "trace..critical")(
      "json", po::bool_switch(), "log as JSON lines")(
      "batch", po::value<size_t>()->default_value(32), "packets per receive call")(
      "no-nft", po::bool_switch(), "do not install the nftables rule for BA/BU packets")(
      "fast-path", po::value<std::string>()->default_value("auto"),
      "eBPF tc fast path for tunnelled IPv6: auto (if it loads), on (required) or off");
  auto vm = Parse(argc, argv, d, "kagemusha-tunneld serve --control PATH --state-dir DIR");
  auto fast_path = kagemusha::tunnel::ParseFastPathMode(vm["fast-path"].as<std::string>());
  if (!fast_path) return kagemusha::cli::UsageError("serve", fast_path.error().message());
  spdlog::set_level(spdlog::level::from_str(vm["log-level"].as<std::string>()));
  if (vm["json"].as<bool>())
    spdlog::set_pattern(R"({"time":"%Y-%m-%dT%H:%M:%S.%eZ","level":"%l","msg":"%v"})",
                        spdlog::pattern_time_type::utc);
  // Signals go to a waiter thread that asks the loop to stop.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);

  kagemusha::tunnel::HostDaemonOptions opt;
  opt.control_path = vm["control"].as<std::string>();
  opt.state_dir = vm["state-dir"].as<std::string>();
  opt.batch = vm["batch"].as<size_t>();
  opt.suppress_icmp_errors = !vm["no-nft"].as<bool>();
  opt.fast_path = *fast_path;
  auto daemon = kagemusha::tunnel::HostDaemon::Create(opt, kagemusha::SteadyClock::Instance());
  if (!daemon) throw std::runtime_error(daemon.error().message());
  std::thread waiter([&] {
    int sig = 0;
    sigwait(&set, &sig);
    spdlog::info("signal {}: stopping", sig);
    (*daemon)->RequestStop();
  });
  auto st = (*daemon)->Run();
  if (!st) {
    spdlog::critical("{}", st.error().message());
    pthread_kill(waiter.native_handle(), SIGTERM);
    waiter.join();
    return 1;
  }
  if (waiter.joinable()) waiter.join();
  return 0;
}

int Activate(int argc, char** argv) {
  po::options_description d("activate options");
  d.add_options()("help,h", "help")("control", po::value<std::string>()->required(), "socket");
  AddSessionOptions(d);
  auto vm = Parse(argc, argv, d, "kagemusha-tunneld activate --control PATH --name NAME ...");
  const auto control = vm["control"].as<std::string>();
  json r = Call(control, "activate", SessionArgs(vm));
  if (vm.count("wait"))
    r = WaitFor(control, vm["name"].as<std::string>(), {"registered"}, {"rejected", "stopped"},
                vm["wait"].as<double>());
  std::printf("%s\n", r.dump().c_str());
  return 0;
}

int Home(int argc, char** argv) {
  po::options_description d("home options");
  d.add_options()("help,h", "help")("control", po::value<std::string>()->required(), "socket");
  AddSessionOptions(d);
  auto vm = Parse(argc, argv, d, "kagemusha-tunneld home --control PATH --name NAME [...]");
  const auto control = vm["control"].as<std::string>();
  json r = Call(control, "home", SessionArgs(vm));
  if (vm.count("wait"))
    r = WaitFor(control, vm["name"].as<std::string>(), {"home"}, {}, vm["wait"].as<double>());
  std::printf("%s\n", r.dump().c_str());
  return 0;
}

int Deactivate(int argc, char** argv) {
  po::options_description d("deactivate options");
  d.add_options()("help,h", "help")("control", po::value<std::string>()->required(), "socket")(
      "name", po::value<std::string>()->required(), "session name");
  auto vm = Parse(argc, argv, d, "kagemusha-tunneld deactivate --control PATH --name NAME");
  json r =
      Call(vm["control"].as<std::string>(), "deactivate", {{"name", vm["name"].as<std::string>()}});
  std::printf("%s\n", r.dump().c_str());
  return 0;
}

int Status(int argc, char** argv) {
  po::options_description d("status options");
  d.add_options()("help,h", "help")("control", po::value<std::string>()->required(), "socket")(
      "json", po::bool_switch(), "print the raw JSON");
  auto vm = Parse(argc, argv, d, "kagemusha-tunneld status --control PATH [--json]");
  json r = Call(vm["control"].as<std::string>(), "status", json::object());
  if (vm["json"].as<bool>()) {
    std::printf("%s\n", r.dump().c_str());
    return 0;
  }
  if (r.contains("fast_path")) {
    const auto& f = r["fast_path"];
    if (f.value("loaded", false))
      std::printf("fast path: on\n");
    else
      std::printf("fast path: off (mode %s)\n", f.value("mode", std::string("?")).c_str());
  }
  if (r["sessions"].empty()) std::printf("no active sessions\n");
  for (const auto& s : r["sessions"]) PrintSession(s);
  for (const auto& s : r["finished"]) {
    std::printf("(finished) ");
    PrintSession(s);
  }
  return 0;
}

const std::vector<kagemusha::cli::Subcommand>& Subcommands() {
  static const std::vector<kagemusha::cli::Subcommand> table = {
      {"serve", "run the host daemon", Serve},
      {"activate", "start a guest's session on this (foreign) host", Activate},
      {"home", "deregister and announce the guest at home", Home},
      {"deactivate", "stop a session here without deregistering", Deactivate},
      {"status", "show sessions, bindings and counters", Status},
  };
  return table;
}

}  // namespace

int main(int argc, char** argv) {
  static const kagemusha::cli::Program program{
      "kagemusha-tunneld",
      "Host daemon for guest-transparent Mobile IPv6: answers ND/ARP as the home router on a "
      "TAP,\nregisters the guest's home addresses with the home agent and tunnels its traffic.",
      KAGEMUSHA_VERSION, Subcommands(), "See docs/tunnel-host.md for the full reference."};
  return kagemusha::cli::RunProgram(program, argc, argv);
}

// kagemusha-memcache: the MiyakoDori stream proxies and page-store tools.
//
//   encode  source host: QEMU `migrate tcp:LISTEN` -> encoder -> decoder (--to)
//   decode  destination host: encoder -> decoder (--listen) -> QEMU incoming (--to)
//   store   stats | gc | delete-vm on a page store directory
//
// main() only parses options and wires library parts (memcache/stream_proxy.h).
// Exit codes: 0 success, 1 runtime failure, 2 usage error. Specified in
// docs/memcache-proxies.md.
#include <signal.h>
#include <spdlog/spdlog.h>

#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_app.h"
#include "kagemusha/common/progress.h"
#include "kagemusha/memcache/page_store.h"
#include "kagemusha/memcache/stream_proxy.h"

namespace {

namespace po = boost::program_options;
namespace mc = kagemusha::memcache;
using json = nlohmann::json;
using kagemusha::ProgressReporter;

constexpr const char* kProg = "kagemusha-memcache";
constexpr auto kConnectTimeout = std::chrono::seconds(10);
// The decoder's send buffer to the destination QEMU (docs/memcache-proxies.md
// §3): what sits in it when the source stops the VM is loaded inside the
// downtime, and DELIVERED (flow control) counts what it accepted.
constexpr int kQemuSocketBuffer = 256 << 10;

using kagemusha::cli::RuntimeError;
using kagemusha::cli::UsageError;

// -1: parsed; otherwise the exit code.
int Parse(const std::string& command, const std::string& usage, const po::options_description& d,
          int argc, char** argv, po::variables_map& vm,
          const po::positional_options_description* pos = nullptr) {
  return kagemusha::cli::ParseCommandLine(
      command, usage, d, d, pos ? *pos : po::positional_options_description(), argc, argv, vm);
}

json StatsJson(const mc::ProxyStats& s) {
  json j = {{"qemu_bytes", s.qemu_bytes},
            {"wan_bytes_out", s.wan_bytes_out},
            {"wan_bytes_in", s.wan_bytes_in},
            {"return_bytes", s.return_bytes},
            {"pages", s.pages},
            {"ref_pages", s.ref_pages},
            {"literal_pages", s.literal_pages},
            {"zstd_pages", s.zstd_pages},
            {"zero_pages", s.zero_pages},
            {"postcopy_pages", s.postcopy_pages},
            {"summary_entries", s.summary_entries},
            {"ratio", s.ratio()},
            {"learned", s.learned},
            {"learned_pages", s.learned_pages},
            {"learn_skipped_pages", s.learn_skipped_pages},
            {"end_wait_us", s.end_wait_us},
            {"fell_back", s.fell_back}};
  if (s.fell_back) j["fallback_reason"] = s.fallback_reason;
  return j;
}

std::string StatsHuman(const mc::ProxyStats& s) {
  char b[512];
  std::snprintf(b, sizeof b,
                "stream %s, WAN out %s / in %s (ratio %.4f); pages %llu: %llu ref, %llu literal "
                "(%llu zstd), %llu zero, %llu postcopy; return path %s%s",
                ProgressReporter::HumanBytes(double(s.qemu_bytes)).c_str(),
                ProgressReporter::HumanBytes(double(s.wan_bytes_out)).c_str(),
                ProgressReporter::HumanBytes(double(s.wan_bytes_in)).c_str(), s.ratio(),
                (unsigned long long)s.pages, (unsigned long long)s.ref_pages,
                (unsigned long long)s.literal_pages, (unsigned long long)s.zstd_pages,
                (unsigned long long)s.zero_pages, (unsigned long long)s.postcopy_pages,
                ProgressReporter::HumanBytes(double(s.return_bytes)).c_str(),
                s.fell_back ? (", fell back: " + s.fallback_reason).c_str() : "");
  return b;
}

kagemusha::Result<std::unique_ptr<mc::PageStore>> OpenStore(const po::variables_map& vm) {
  mc::PageStoreOptions o;
  o.dir = vm["store"].as<std::string>();
  if (vm.count("quota")) o.quota_bytes = vm["quota"].as<uint64_t>() << 20;
  return mc::PageStore::Open(o);
}

// encode / decode share the accept loop.
int Serve(const std::string& command, int argc, char** argv) {
  bool encode = command == "encode";
  po::options_description d(command + " options");
  d.add_options()("listen", po::value<std::string>()->required()->value_name("HOST:PORT"),
                  encode ? "where the source QEMU's `migrate tcp:HOST:PORT` connects"
                         : "where the encoder connects (the WAN side)")(
      "to", po::value<std::string>()->required()->value_name("HOST:PORT"),
      encode ? "the decoder" : "the destination QEMU's -incoming tcp:HOST:PORT")(
      "store", po::value<std::string>()->required()->value_name("DIR"), "this host's page store")(
      "vm", po::value<std::string>()->required()->value_name("NAME"), "the VM (manifest name)")(
      "quota", po::value<uint64_t>()->value_name("MIB"), "page store quota in MiB (0: none)")(
      "idle-timeout", po::value<double>()->default_value(60)->value_name("SEC"),
      "fail the migration if the forward stream stalls this long after the handshake (0: never)")(
      "once", "handle one migration, then exit with its status")(
      "json", "one JSON event per line on stdout")(
      "log-level", po::value<std::string>()->default_value("warn"), "trace|debug|info|warn|error")(
      "help,h", "show this help");
  if (encode)
    d.add_options()("zstd", "compress literal pages with zstd (if the decoder can)")(
        "window", po::value<double>()->default_value(4)->value_name("MIB"),
        "flow control: at most this much of the QEMU stream between reading it from the source "
        "QEMU and its delivery to the destination QEMU; cover the WAN's bandwidth x RTT "
        "(0: no limit, else >= 1)");
  po::variables_map vm;
  std::string usage = std::string(kProg) + " " + command +
                      " --listen HOST:PORT --to HOST:PORT --store DIR --vm NAME [options]";
  if (int rc = Parse(command, usage, d, argc, argv, vm); rc >= 0) return rc;
  spdlog::set_level(spdlog::level::from_str(vm["log-level"].as<std::string>()));
  spdlog::set_default_logger(spdlog::default_logger());
  ProgressReporter rep(vm.count("json") ? ProgressReporter::Mode::kJson
                                        : ProgressReporter::Mode::kHuman);
  auto store = OpenStore(vm);
  if (!store) return RuntimeError("opening the page store: " + store.error().message());
  auto listener = mc::TcpListener::Listen(vm["listen"].as<std::string>());
  if (!listener) return RuntimeError(listener.error().message());
  const std::string to = vm["to"].as<std::string>();
  const std::string vm_name = vm["vm"].as<std::string>();
  rep.Event("listening",
            {{"role", command}, {"address", (*listener)->address()}, {"port", (*listener)->port()}},
            command + "r listening on " + (*listener)->address());
  std::fflush(stdout);
  bool once = vm.count("once") > 0;
  const double idle_s = vm["idle-timeout"].as<double>();
  if (idle_s < 0) return UsageError(command, "--idle-timeout must be >= 0");
  const auto idle = std::chrono::milliseconds(static_cast<int64_t>(idle_s * 1000));
  size_t window = 0;
  if (encode) {
    const double w = vm["window"].as<double>();
    if (w != 0 && !(w >= 1 && w <= 4096))
      return UsageError(command, "--window must be 0 or 1..4096 (MiB)");
    window = static_cast<size_t>(w * (1 << 20));
  }
  const uint64_t quota = vm.count("quota") ? vm["quota"].as<uint64_t>() << 20 : 0;
  while (true) {
    auto conn = (*listener)->Accept();
    if (!conn) return RuntimeError(conn.error().message());
    rep.Event("connected", {{"role", command}}, "migration connection accepted");
    mc::ProxyStats stats;
    kagemusha::Result<mc::ProxyStats> r;
    if (encode) {
      auto wan = mc::SocketStream::Connect(to, kConnectTimeout);
      if (!wan) {
        (*conn)->Abort();  // the source QEMU sees a failed migration
        r = std::unexpected(wan.error().Context("connecting to the decoder"));
      } else {
        mc::EncoderOptions o;
        o.store = store->get();
        o.vm = vm_name;
        o.zstd = vm.count("zstd") > 0;
        o.idle_timeout = idle;
        o.window_bytes = window;
        r = mc::RunEncoderSession(**conn, **wan, o, &stats);
      }
    } else {
      mc::DecoderOptions o;
      o.store = store->get();
      o.vm = vm_name;
      o.idle_timeout = idle;
      o.store_quota_bytes = quota;
      mc::QemuConnector connect = [&]() -> kagemusha::Result<std::unique_ptr<mc::ByteStream>> {
        auto s = mc::SocketStream::Connect(to, kConnectTimeout);
        if (!s) return std::unexpected(s.error());
        // What the destination QEMU has not taken yet must not pile up here
        // (it would all be loaded inside the downtime); DELIVERED counts
        // what this socket accepted.
        (*s)->SetSendBuffer(kQemuSocketBuffer);
        return std::unique_ptr<mc::ByteStream>(std::move(*s));
      };
      r = mc::RunDecoderSession(**conn, connect, o, &stats);
    }
    json fields = StatsJson(r ? *r : stats);
    fields["role"] = command;
    fields["vm"] = vm_name;
    if (r) {
      rep.Event("migration-done", fields, command + " done: " + StatsHuman(*r));
    } else {
      fields["error"] = r.error().message();
      rep.Event("migration-aborted", fields,
                command + " aborted: " + r.error().message() + "; " + StatsHuman(stats));
    }
    std::fflush(stdout);
    if (once) return r ? 0 : 1;
  }
}

int StoreCommand(int argc, char** argv) {
  po::options_description d("store options");
  d.add_options()("action", po::value<std::string>()->required(), "stats | gc | delete-vm")(
      "store", po::value<std::string>()->required()->value_name("DIR"), "the page store")(
      "vm", po::value<std::string>()->value_name("NAME"), "delete-vm: the VM")(
      "json", "JSON output")("help,h", "show this help");
  po::positional_options_description pos;
  pos.add("action", 1);
  po::variables_map vm;
  std::string usage = std::string(kProg) + " store stats|gc|delete-vm --store DIR [--vm NAME]";
  if (int rc = Parse("store", usage, d, argc, argv, vm, &pos); rc >= 0) return rc;
  const std::string action = vm["action"].as<std::string>();
  if (action != "stats" && action != "gc" && action != "delete-vm")
    return UsageError("store", "unknown action '" + action + "' (stats, gc, delete-vm)");
  if (action == "delete-vm" && !vm.count("vm")) return UsageError("store", "delete-vm needs --vm");
  auto store = OpenStore(vm);
  if (!store) return RuntimeError("opening the page store: " + store.error().message());
  bool as_json = vm.count("json") > 0;
  json out;
  if (action == "stats") {
    auto s = (*store)->stats();
    auto vms = (*store)->ListVms();
    out = {{"pages", s.pages},           {"bytes", s.bytes},
           {"segments", s.segments},     {"corrupt_records", s.corrupt_records},
           {"torn_bytes", s.torn_bytes}, {"vms", vms ? *vms : std::vector<std::string>{}}};
    if (!as_json) {
      std::printf("pages %llu, %s in %llu segments; VMs:", (unsigned long long)s.pages,
                  ProgressReporter::HumanBytes(double(s.bytes)).c_str(),
                  (unsigned long long)s.segments);
      for (const auto& v : out["vms"]) std::printf(" %s", v.get<std::string>().c_str());
      std::printf("\n");
    }
  } else if (action == "gc") {
    auto g = (*store)->CollectGarbage();
    if (!g) return RuntimeError("gc: " + g.error().message());
    out = {{"referenced_pages", g->referenced_pages},
           {"dropped_pages", g->dropped_pages},
           {"moved_pages", g->moved_pages},
           {"removed_segments", g->removed_segments}};
    if (!as_json)
      std::printf("gc: kept %llu pages, dropped %llu, removed %llu segments\n",
                  (unsigned long long)g->referenced_pages, (unsigned long long)g->dropped_pages,
                  (unsigned long long)g->removed_segments);
  } else {
    if (auto st = (*store)->DeleteVm(vm["vm"].as<std::string>()); !st)
      return RuntimeError("delete-vm: " + st.error().message());
    out = {{"deleted", vm["vm"].as<std::string>()}};
    if (!as_json) std::printf("deleted the manifest of %s\n", vm["vm"].as<std::string>().c_str());
  }
  if (as_json) std::printf("%s\n", out.dump().c_str());
  return 0;
}

const std::vector<kagemusha::cli::Subcommand>& Subcommands() {
  static const std::vector<kagemusha::cli::Subcommand> table = {
      {"encode", "source-side proxy: QEMU migration stream -> reuse protocol",
       [](int c, char** v) { return Serve("encode", c, v); }},
      {"decode", "destination-side proxy: reuse protocol -> QEMU incoming",
       [](int c, char** v) { return Serve("decode", c, v); }},
      {"store", "page store: stats | gc | delete-vm", StoreCommand},
  };
  return table;
}

}  // namespace

int main(int argc, char** argv) {
  static const kagemusha::cli::Program program{
      kProg,
      "MiyakoDori memory reuse for unmodified QEMU: migration-stream proxies that send a "
      "reference\ninstead of a page the destination host already holds, and its page store.",
      KAGEMUSHA_VERSION, Subcommands(), "See docs/memcache-proxies.md for the full reference."};
  return kagemusha::cli::RunProgram(program, argc, argv);
}

#include "nbd_commands.h"

#include <pthread.h>
#include <signal.h>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/program_options.hpp>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <thread>

#include "kagemusha/common/progress.h"
#include "kagemusha/storage/file_backend.h"

#ifndef KAGEMUSHA_VERSION
#define KAGEMUSHA_VERSION "unknown"
#endif

namespace kagemusha::nbdcli {
namespace {

namespace po = boost::program_options;
using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr const char* kProg = "kagemusha-nbd";
constexpr auto kControlTimeout = 10s;
// A switch waits for in-flight requests and syncs the whole cache image.
constexpr auto kSwitchTimeout = 300s;

std::string Join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

std::string Quoted(const std::string& name) { return "'" + name + "'"; }

// "subject: message", unless the message already names the subject's object.
std::string WithSubject(const std::string& message, const std::string& subject) {
  auto space = subject.rfind(' ');
  std::string object = space == std::string::npos ? subject : subject.substr(space + 1);
  return message.find(object) != std::string::npos ? message : subject + ": " + message;
}

// --- usage helpers ------------------------------------------------------------

using cli::ParseCommandLine;
using cli::RuntimeError;
using cli::UsageError;

// --- client side ---------------------------------------------------------------

// Sends one control request; on failure prints the error (and the server's
// hint) and returns nullopt with *exit_code set.
std::optional<json> Call(const std::string& control, const std::string& command, const json& args,
                         std::chrono::milliseconds timeout, int* exit_code) {
  auto reply = ControlCall(control, command, args, timeout);
  if (!reply) {
    const Error& e = reply.error();
    std::string hint;
    if (e.code() == ENOENT || e.code() == ECONNREFUSED) {
      hint = "is `kagemusha-nbd serve --control " + control + "` running?";
    }
    *exit_code = RuntimeError(e.message(), hint);
    return std::nullopt;
  }
  if (!reply->ok) {
    *exit_code = RuntimeError(reply->error_message, reply->hint);
    return std::nullopt;
  }
  return reply->result;
}

json ExportArgs(const po::variables_map& vm) {
  json args = json::object();
  if (vm.count("export")) args["export"] = vm["export"].as<std::string>();
  return args;
}

constexpr const char* kExportHelp =
    "the proxy export to act on; may be omitted when the server has one proxy export";

void AddControlOptions(po::options_description& d, const char* export_help = kExportHelp) {
  d.add_options()("control", po::value<std::string>()->required()->value_name("PATH"),
                  "control socket of the running server (serve --control)")(
      "export", po::value<std::string>()->value_name("NAME"), export_help)("help,h",
                                                                           "show this help");
}

// Picks the export to follow from a status result: the named one, or the only
// proxy. Error text on failure.
std::expected<json, std::string> PickExport(const json& status, const std::string& name,
                                            bool named) {
  const json& exports = status.at("exports");
  if (named) {
    for (const auto& e : exports) {
      if (e.at("name") == name) return e;
    }
    return std::unexpected("the server has no export named " + Quoted(name));
  }
  std::vector<json> proxies;
  for (const auto& e : exports) {
    if (e.contains("blocks_total")) proxies.push_back(e);
  }
  if (proxies.size() == 1) return proxies[0];
  if (proxies.empty()) return std::unexpected(std::string("the server has no proxy exports"));
  std::vector<std::string> names;
  for (const auto& p : proxies) names.push_back(p.at("name").get<std::string>());
  return std::unexpected("the server has " + std::to_string(proxies.size()) + " proxy exports (" +
                         Join(names, ", ") + "); pass --export NAME");
}

ProgressSample FillSample(const json& e) {
  ProgressSample s;
  s.phase = "fill " + e.at("name").get<std::string>();
  uint64_t size = e.at("size").get<uint64_t>();
  uint64_t present = e.value("blocks_present", uint64_t{0});
  uint64_t bs = e.value("block_size", uint64_t{0});
  s.done = std::min(size, present * bs);
  s.total = size;
  s.rate = e.value("rate", 0.0);
  if (e.contains("eta_seconds") && e["eta_seconds"].is_number())
    s.eta_seconds = e["eta_seconds"].get<double>();
  return s;
}

bool ExportComplete(const json& e) {
  return e.value("complete", true) || e.value("mode", "") == "target";
}

// Follows the fill of one export until it completes. Returns 0 then, or the
// exit code of an error (already printed).
int WatchFill(const std::string& control, const po::variables_map& vm, double interval,
              ProgressReporter& rep, bool start_if_stopped) {
  bool named = vm.count("export") > 0;
  std::string name = named ? vm["export"].as<std::string>() : "";
  bool told_stopped = false;
  while (true) {
    int rc = 0;
    auto status = Call(control, "status", ExportArgs(vm), kControlTimeout, &rc);
    if (!status) return rc;
    auto e = PickExport(*status, name, named);
    if (!e) return RuntimeError(e.error());
    if (!e->contains("blocks_total")) {
      rep.Event("complete", {{"export", (*e)["name"]}},
                "export " + Quoted((*e)["name"]) + " serves a file; nothing to fill");
      return 0;
    }
    if (!named) {  // follow the same export from now on
      named = true;
      name = (*e)["name"].get<std::string>();
    }
    rep.Update(FillSample(*e));
    if (ExportComplete(*e)) {
      rep.Finish();
      rep.Event("complete", {{"export", name}, {"mode", (*e)["mode"]}},
                "fill of export " + Quoted(name) + " is complete");
      return 0;
    }
    if (!e->value("fill_running", false)) {
      if (start_if_stopped) {
        json args = {{"export", name}};
        if (!Call(control, "fill-start", args, kControlTimeout, &rc)) return rc;
        rep.Event("fill-started", {{"export", name}}, "the fill was stopped; started it");
      } else if (!told_stopped) {
        rep.Event("fill-stopped", {{"export", name}},
                  "the fill is stopped; run `kagemusha-nbd fill start --control " + control +
                      "` to resume it");
        told_stopped = true;
      }
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(interval));
  }
}

int RunStatus(int argc, char** argv) {
  po::options_description d("Options");
  AddControlOptions(d,
                    "show only this export (default: all); with --watch, the export to follow "
                    "(may be omitted when the server has one proxy export)");
  d.add_options()("json", "print JSON (with --watch: one progress event per line)")(
      "watch", "follow the fill until it completes (progress bar on a TTY)")(
      "interval", po::value<double>()->default_value(1.0)->value_name("SEC"),
      "--watch poll interval");
  po::variables_map vm;
  int rc = ParseCommandLine(
      "status",
      "kagemusha-nbd status --control PATH [--export NAME] [--json] [--watch [--interval SEC]]", d,
      d, {}, argc, argv, vm);
  if (rc >= 0) return rc;
  double interval = vm["interval"].as<double>();
  if (!(interval > 0) || interval > 3600)
    return UsageError("status", "--interval must be between 0 and 3600 seconds");
  const std::string control = vm["control"].as<std::string>();
  if (vm.count("watch")) {
    ProgressReporter rep(vm.count("json") ? ProgressReporter::Mode::kJson
                                          : ProgressReporter::Mode::kAuto);
    return WatchFill(control, vm, interval, rep, /*start_if_stopped=*/false);
  }
  auto status = Call(control, "status", ExportArgs(vm), kControlTimeout, &rc);
  if (!status) return rc;
  if (vm.count("json")) {
    std::printf("%s\n", status->dump(-1, ' ', false, json::error_handler_t::replace).c_str());
  } else {
    std::printf("%s", FormatStatusHuman(*status).c_str());
  }
  return 0;
}

int RunFill(int argc, char** argv) {
  po::options_description d("Options");
  AddControlOptions(d);
  po::options_description hidden;
  hidden.add_options()("action", po::value<std::string>(), "")("value", po::value<std::string>(),
                                                               "");
  po::options_description all;
  all.add(d).add(hidden);
  po::positional_options_description pos;
  pos.add("action", 1).add("value", 1);
  po::variables_map vm;
  int rc = ParseCommandLine(
      "fill",
      "kagemusha-nbd fill start|stop --control PATH [--export NAME]\n"
      "       kagemusha-nbd fill rate RATE --control PATH [--export NAME]\n\n"
      "RATE is bytes per second with an optional K/M/G suffix (binary); 0 = unlimited.",
      d, all, pos, argc, argv, vm);
  if (rc >= 0) return rc;
  if (!vm.count("action")) {
    return UsageError("fill", "say what to do: `fill start`, `fill stop` or `fill rate RATE`");
  }
  const std::string action = vm["action"].as<std::string>();
  const std::string control = vm["control"].as<std::string>();
  json args = ExportArgs(vm);
  std::string command;
  if (action == "start" || action == "stop") {
    if (vm.count("value")) return UsageError("fill", "`fill " + action + "` takes no value");
    command = "fill-" + action;
  } else if (action == "rate") {
    if (!vm.count("value"))
      return UsageError(
          "fill", "`fill rate` needs a RATE, e.g. `fill rate 50M` or `fill rate 0` (unlimited)");
    auto rate = ParseRate(vm["value"].as<std::string>());
    if (!rate) return UsageError("fill", rate.error().message());
    args["rate"] = *rate;
    command = "fill-rate";
  } else {
    return UsageError("fill",
                      "unknown action " + Quoted(action) + "; use start, stop or rate RATE");
  }
  auto result = Call(control, command, args, kControlTimeout, &rc);
  if (!result) return rc;
  std::string name = result->value("name", "");
  if (action == "rate") {
    uint64_t r = args["rate"].get<uint64_t>();
    std::printf("export %s: fill rate limit %s\n", Quoted(name).c_str(),
                r ? (ProgressReporter::HumanBytes(double(r)) + "/s").c_str() : "unlimited");
  } else {
    std::printf("export %s: fill %s\n", Quoted(name).c_str(),
                result->value("complete", false)       ? "complete (nothing left to fetch)"
                : result->value("fill_running", false) ? "running"
                                                       : "stopped");
  }
  return 0;
}

int RunSwitch(int argc, char** argv) {
  po::options_description d("Options");
  AddControlOptions(d);
  d.add_options()("wait",
                  "wait for the fill to complete (showing progress, starting the fill if stopped), "
                  "then switch")("json", "with --wait: JSON progress events")(
      "interval", po::value<double>()->default_value(1.0)->value_name("SEC"),
      "--wait poll interval");
  po::variables_map vm;
  int rc =
      ParseCommandLine("switch", "kagemusha-nbd switch --control PATH [--export NAME] [--wait]", d,
                       d, {}, argc, argv, vm);
  if (rc >= 0) return rc;
  double interval = vm["interval"].as<double>();
  if (!(interval > 0) || interval > 3600)
    return UsageError("switch", "--interval must be between 0 and 3600 seconds");
  const std::string control = vm["control"].as<std::string>();
  ProgressReporter rep(vm.count("json") ? ProgressReporter::Mode::kJson
                                        : ProgressReporter::Mode::kAuto);
  json args = ExportArgs(vm);
  if (vm.count("wait")) {
    if ((rc = WatchFill(control, vm, interval, rep, /*start_if_stopped=*/true)) != 0) return rc;
  }
  auto result = Call(control, "switch", args, kSwitchTimeout, &rc);
  if (!result) return rc;
  std::string name = result->value("name", "");
  std::string message =
      "export " + Quoted(name) + " is in target mode; the remote is no longer used";
  if (rep.json()) {
    rep.Event("switched", {{"export", name}, {"mode", result->value("mode", "")}}, message);
  } else {
    rep.Finish();
    std::printf("switched: %s\n", message.c_str());  // the result on stdout; progress was on stderr
  }
  return 0;
}

int RunReconnect(int argc, char** argv) {
  po::options_description d("Options");
  AddControlOptions(d);
  po::variables_map vm;
  int rc = ParseCommandLine("reconnect", "kagemusha-nbd reconnect --control PATH [--export NAME]",
                            d, d, {}, argc, argv, vm);
  if (rc >= 0) return rc;
  auto result =
      Call(vm["control"].as<std::string>(), "reconnect", ExportArgs(vm), kControlTimeout, &rc);
  if (!result) return rc;
  std::printf("export %s: reconnected to %s\n", Quoted(result->value("name", "")).c_str(),
              result->value("source", "").c_str());
  return 0;
}

// --- serve ----------------------------------------------------------------------

Status SetupLogging(const std::string& level, const std::string& file) {
  static const std::vector<std::string> levels = {"trace", "debug",    "info", "warn",
                                                  "error", "critical", "off"};
  if (std::find(levels.begin(), levels.end(), level) == levels.end()) {
    return Fail(
        Error::Invalid("--log-level " + Quoted(level) + " is not one of " + Join(levels, ", ")));
  }
  try {
    std::shared_ptr<spdlog::logger> logger;
    if (file.empty()) {
      logger = std::make_shared<spdlog::logger>(
          kProg, std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    } else {
      // Created 0600 before spdlog opens it (fopen would make it 0644 under
      // the usual umask): the log names images, remotes and peers.
      int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
      if (fd < 0) return Fail(Error::Errno(errno, "cannot open --log-file " + Quoted(file)));
      ::close(fd);
      logger = std::make_shared<spdlog::logger>(
          kProg, std::make_shared<spdlog::sinks::basic_file_sink_mt>(file));
    }
    logger->set_level(spdlog::level::from_str(level));
    logger->flush_on(spdlog::level::info);
    spdlog::set_default_logger(logger);
  } catch (const spdlog::spdlog_ex& e) {
    return Fail(Error::Io(std::string("cannot open --log-file: ") + e.what()));
  }
  return Ok();
}

Result<ServedExport> OpenTarget(const ExportSpec& spec) {
  storage::FileBackendOptions o;
  o.read_only = spec.read_only;
  auto b = storage::FileBackend::Open(spec.path, o);
  if (!b) return Fail(b.error().Context("export " + Quoted(spec.name) + ": opening " + spec.path));
  ServedExport e;
  e.name = spec.name;
  e.description = spec.description;
  e.source = spec.path;
  e.read_only = spec.read_only;
  e.backend = std::shared_ptr<storage::Backend>(std::move(*b));
  return e;
}

Result<ServedExport> OpenProxy(const ProxySpec& spec) {
  storage::CopyOnReadOptions o;
  o.cache_path = spec.cache_path;
  o.bitmap_path = spec.bitmap_path;
  o.block_size = spec.block_size;
  o.fill_on_start = spec.fill;
  o.fill_rate_limit = spec.fill_rate;
  o.auto_switch = spec.auto_switch;
  const std::string where = "proxy export " + Quoted(spec.name);
  std::unique_ptr<storage::RemoteReader> remote;
  auto client = storage::NbdClient::Connect(spec.uri, storage::NbdClientOptions{});
  if (client) {
    remote = std::move(*client);
  } else {
    // After a switch and a restart the remote may be gone for good; a
    // complete cache can still be served, in target mode.
    const Error& why = client.error();
    Error unreachable = why.message().find(spec.uri_text) != std::string::npos
                            ? why.Context(where)
                            : why.Context(where + ": cannot reach remote " + spec.uri_text);
    auto complete = storage::CopyOnReadBackend::Open(nullptr, o);
    if (!complete) return Fail(unreachable);
    spdlog::warn("{}; the cache {} is complete, so it is served in target mode",
                 unreachable.message(), spec.cache_path);
    ServedExport e;
    e.name = spec.name;
    e.description = spec.description;
    e.source = spec.uri_text;
    e.cache_path = spec.cache_path;
    e.bitmap_path = spec.bitmap_path;
    e.proxy = *complete;
    e.backend = e.proxy;
    return e;
  }
  auto cor = storage::CopyOnReadBackend::Open(std::move(remote), o);
  if (!cor) return Fail(cor.error().Context(where));
  ServedExport e;
  e.name = spec.name;
  e.description = spec.description;
  e.source = spec.uri_text;
  e.cache_path = spec.cache_path;
  e.bitmap_path = spec.bitmap_path;
  e.proxy = *cor;
  e.backend = e.proxy;
  return e;
}

// Blocks SIGINT/SIGTERM in this thread (and so in every thread created
// later); they are taken by sigtimedwait in the signal thread.
sigset_t BlockShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);
  return set;
}

int RunServe(int argc, char** argv) {
  po::options_description d("Options");
  d.add_options()(
      "listen", po::value<std::vector<std::string>>()->composing()->value_name("HOST:PORT"),
      "serve NBD over TCP (repeatable; port 0 picks a free port; the host is required, a "
      "wildcard is bound only if written: 0.0.0.0:10809, [::]:10809)")(
      "unix", po::value<std::vector<std::string>>()->composing()->value_name("PATH"),
      "serve NBD on a Unix socket (repeatable; created 0600)")(
      "export",
      po::value<std::vector<std::string>>()->composing()->value_name("NAME=PATH[,ro][,desc=TEXT]"),
      "serve an image file or block device (target mode; repeatable)")(
      "proxy",
      po::value<std::vector<std::string>>()->composing()->value_name(
          "NAME=URI,cache=PATH,bitmap=PATH[,...]"),
      "serve a remote NBD export through a local cache (copy-on-read proxy mode; repeatable). "
      "Options: "
      "block-size=BYTES (default 64K), fill-rate=RATE (bytes/s, K/M/G, 0 = unlimited), no-fill, "
      "auto-switch, "
      "desc=TEXT (last)")(
      "control", po::value<std::string>()->value_name("PATH"),
      "control socket for status/fill/switch/reconnect (0600; directory created 0700)")(
      "workers", po::value<unsigned>()->default_value(8)->value_name("N"),
      "backend worker threads")(
      "max-connections", po::value<unsigned>()->default_value(256)->value_name("N"),
      "NBD connections open at once; more are closed at accept (0 = no limit)")(
      "log-level", po::value<std::string>()->default_value("info")->value_name("LEVEL"),
      "trace, debug, info, warn, error, critical or off")(
      "log-file", po::value<std::string>()->value_name("PATH"),
      "append logs here instead of stderr")(
      "json", "print the listening line as a JSON event on stdout")("help,h", "show this help");
  po::variables_map vm;
  int rc = ParseCommandLine(
      "serve",
      "kagemusha-nbd serve [--listen HOST:PORT]... [--unix PATH]...\n"
      "         [--export NAME=PATH[,ro][,desc=TEXT]]...\n"
      "         [--proxy "
      "NAME=URI,cache=PATH,bitmap=PATH[,block-size=BYTES][,fill-rate=RATE][,no-fill][,auto-switch]["
      ",desc=TEXT]]...\n"
      "         [--control PATH] [--workers N] [--max-connections N] [--log-level LEVEL]\n"
      "         [--log-file PATH] [--json]",
      d, d, {}, argc, argv, vm);
  if (rc >= 0) return rc;

  auto list = [&](const char* key) {
    return vm.count(key) ? vm[key].as<std::vector<std::string>>() : std::vector<std::string>{};
  };
  const auto listens = list("listen"), unixes = list("unix"), export_args = list("export"),
             proxy_args = list("proxy");
  if (listens.empty() && unixes.empty()) {
    return UsageError("serve",
                      "nothing to listen on; add --unix PATH or --listen HOST:PORT (e.g. --listen "
                      "127.0.0.1:10809)");
  }
  if (export_args.empty() && proxy_args.empty()) {
    return UsageError(
        "serve",
        "nothing to serve; add --export NAME=PATH or --proxy NAME=URI,cache=PATH,bitmap=PATH");
  }
  for (const auto& l : listens) {
    if (auto s = CheckListenAddress(l); !s) return UsageError("serve", s.error().message());
  }
  unsigned workers = vm["workers"].as<unsigned>();
  if (workers < 1 || workers > 1024)
    return UsageError("serve", "--workers must be between 1 and 1024");
  std::vector<ExportSpec> targets;
  std::vector<ProxySpec> proxies;
  std::vector<std::string> names;
  for (const auto& a : export_args) {
    auto s = ParseExportSpec(a);
    if (!s) return UsageError("serve", s.error().message());
    names.push_back(s->name);
    targets.push_back(std::move(*s));
  }
  for (const auto& a : proxy_args) {
    auto s = ParseProxySpec(a);
    if (!s) return UsageError("serve", s.error().message());
    names.push_back(s->name);
    proxies.push_back(std::move(*s));
  }
  {
    auto sorted = names;
    std::sort(sorted.begin(), sorted.end());
    if (auto dup = std::adjacent_find(sorted.begin(), sorted.end()); dup != sorted.end()) {
      return UsageError(
          "serve", "export name " + Quoted(*dup) + " is used twice; export names must be unique");
    }
  }
  if (auto s = SetupLogging(vm["log-level"].as<std::string>(),
                            vm.count("log-file") ? vm["log-file"].as<std::string>() : "");
      !s) {
    return s.error().code() == EINVAL ? UsageError("serve", s.error().message())
                                      : RuntimeError(s.error().message());
  }

  // Before any thread exists, so every thread inherits the mask.
  sigset_t shutdown_signals = BlockShutdownSignals();

  ServeState state;
  for (const auto& t : targets) {
    auto e = OpenTarget(t);
    if (!e) return RuntimeError(e.error().message());
    state.exports.push_back(std::move(*e));
  }
  for (const auto& p : proxies) {
    auto e = OpenProxy(p);
    if (!e) {
      return RuntimeError(e.error().message(), "check that the NBD server behind " + p.uri_text +
                                                   " is running and serves that export");
    }
    state.exports.push_back(std::move(*e));
  }

  storage::ServerOptions so;
  so.worker_threads = workers;
  so.max_connections = vm["max-connections"].as<unsigned>();
  auto server = storage::NbdServer::Create(so);
  state.server = server.get();
  for (const auto& e : state.exports) {
    storage::ExportConfig c;
    c.name = e.name;
    c.description = e.description.empty() ? e.backend->Describe() : e.description;
    c.backend = e.backend;
    c.read_only = e.read_only;
    if (auto s = server->AddExport(std::move(c)); !s) return RuntimeError(s.error().message());
  }
  for (const auto& l : listens) {
    if (auto s = server->ListenTcp(l); !s)
      return RuntimeError(WithSubject(s.error().message(), "cannot listen on " + l));
  }
  for (const auto& u : unixes) {
    if (auto s = server->ListenUnix(u); !s)
      return RuntimeError(WithSubject(s.error().message(), "cannot listen on " + u));
  }

  std::unique_ptr<ControlServer> control;
  if (vm.count("control")) {
    ControlServerOptions co;
    co.socket_path = vm["control"].as<std::string>();
    auto c = ControlServer::Start(co, NbdControlCommands(state));
    if (!c) return RuntimeError("control socket: " + c.error().message());
    control = std::move(*c);
  }

  ProgressReporter out(
      vm.count("json") ? ProgressReporter::Mode::kJson : ProgressReporter::Mode::kHuman, stdout,
      stdout);
  auto endpoints = server->BoundEndpoints();
  std::vector<std::string> export_names;
  for (const auto& e : state.exports) export_names.push_back(e.name);
  json ev = {{"endpoints", endpoints}, {"exports", export_names}};
  if (control) ev["control"] = control->socket_path();
  out.Event("listening", ev, Join(endpoints, " ") + " (exports: " + Join(export_names, ", ") + ")");

  std::atomic<bool> done{false};
  std::thread signals([&] {
    int seen = 0;
    while (!done.load()) {
      timespec tick{0, 200'000'000};
      int sig = sigtimedwait(&shutdown_signals, nullptr, &tick);
      if (sig < 0) continue;
      if (++seen == 1) {
        spdlog::info("{}: shutting down; in-flight requests finish, bitmaps are flushed",
                     strsignal(sig));
        server->Stop();
      } else {
        spdlog::warn("{} again: exiting now without waiting", strsignal(sig));
        std::_Exit(1);
      }
    }
  });
  server->Run();
  done = true;
  signals.join();

  if (control) control->Stop();
  int exit_code = 0;
  for (auto& e : state.exports) {
    if (e.proxy) e.proxy->StopFill();
    if (e.read_only) continue;
    if (auto s = e.backend->Flush(); !s) {
      spdlog::error("export {}: final flush failed: {}", Quoted(e.name), s.error().message());
      exit_code = 1;
    }
  }
  state.exports.clear();  // closes backends (bitmaps) before we report
  out.Event("stopped", json::object(), "all exports flushed and closed");
  return exit_code;
}

// --- control command handlers ----------------------------------------------------

std::vector<std::string> ExportNames(const ServeState& state, bool proxies_only) {
  std::vector<std::string> names;
  for (const auto& e : state.exports) {
    if (!proxies_only || e.proxy) names.push_back(e.name);
  }
  return names;
}

std::expected<ServedExport*, ControlFailure> FindExport(ServeState& state, const json& args,
                                                        bool proxy_required) {
  if (args.contains("export")) {
    if (!args["export"].is_string())
      return std::unexpected(ControlFailure(Error::Invalid("\"export\" must be a string")));
    std::string name = args["export"].get<std::string>();
    for (auto& e : state.exports) {
      if (e.name != name) continue;
      if (proxy_required && !e.proxy) {
        return std::unexpected(ControlFailure(
            Error::Invalid("export " + Quoted(name) +
                           " serves a file (target mode); fill, switch and reconnect "
                           "apply to --proxy exports"),
            ExportNames(state, true).empty()
                ? std::string("this server has no proxy exports")
                : "proxy exports: " + Join(ExportNames(state, true), ", ")));
      }
      return &e;
    }
    return std::unexpected(ControlFailure(Error(ENOENT, "no export named " + Quoted(name)),
                                          "exports: " + Join(ExportNames(state, false), ", ")));
  }
  std::vector<ServedExport*> candidates;
  for (auto& e : state.exports) {
    if (e.proxy) candidates.push_back(&e);
  }
  if (candidates.size() == 1) return candidates[0];
  if (candidates.empty())
    return std::unexpected(ControlFailure(Error::Invalid("this server has no proxy exports")));
  return std::unexpected(ControlFailure(
      Error::Invalid("this server has " + std::to_string(candidates.size()) + " proxy exports"),
      "pass --export NAME, one of: " + Join(ExportNames(state, true), ", ")));
}

ControlHandler ProxyCommand(
    ServeState& state,
    std::function<std::expected<void, ControlFailure>(ServedExport&, const json&)> act) {
  return [&state, act = std::move(act)](const json& args) -> ControlResult {
    auto e = FindExport(state, args, /*proxy_required=*/true);
    if (!e) return std::unexpected(e.error());
    if (auto r = act(**e, args); !r) return std::unexpected(r.error());
    return ExportStatusJson(**e);
  };
}

}  // namespace

// --- option values ----------------------------------------------------------------

Result<uint64_t> ParseByteCount(const std::string& text, const std::string& what) {
  auto bad = [&] {
    return Fail(Error::Invalid(what + " " + Quoted(text) +
                               " is not a byte count; write e.g. 4096, 64K, 16M or 1G"));
  };
  if (text.empty()) return bad();
  uint64_t value = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  auto [p, ec] = std::from_chars(first, last, value);
  if (ec == std::errc::result_out_of_range)
    return Fail(Error::Invalid(what + " " + Quoted(text) + " is too large"));
  if (ec != std::errc() || p == first) return bad();
  int shift = 0;
  if (p != last) {
    switch (*p) {
      case 'k':
      case 'K':
        shift = 10;
        break;
      case 'm':
      case 'M':
        shift = 20;
        break;
      case 'g':
      case 'G':
        shift = 30;
        break;
      default:
        return bad();
    }
    if (++p != last) return bad();
  }
  if (shift && value > (UINT64_MAX >> shift))
    return Fail(Error::Invalid(what + " " + Quoted(text) + " is too large"));
  return value << shift;
}

Result<uint64_t> ParseRate(const std::string& text) { return ParseByteCount(text, "rate"); }

namespace {
// Splits "NAME=FIRST,opt,opt,desc=rest, with commas".
struct SpecParts {
  std::string name, first;
  std::vector<std::string> options;
  std::optional<std::string> desc;
};
Result<SpecParts> SplitSpec(const std::string& text, const std::string& option,
                            const std::string& form) {
  auto eq = text.find('=');
  if (eq == std::string::npos) {
    return Fail(
        Error::Invalid(option + " " + Quoted(text) + " has no '='; write " + option + " " + form));
  }
  SpecParts p;
  p.name = text.substr(0, eq);
  std::string rest = text.substr(eq + 1);
  auto comma = rest.find(',');
  p.first = rest.substr(0, comma);
  rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
  while (!rest.empty() || comma != std::string::npos) {
    if (rest.rfind("desc=", 0) == 0) {
      p.desc = rest.substr(5);
      break;
    }
    comma = rest.find(',');
    p.options.push_back(rest.substr(0, comma));
    if (comma == std::string::npos) break;
    rest = rest.substr(comma + 1);
  }
  if (p.first.empty()) {
    return Fail(Error::Invalid(option + " " + Quoted(text) + " has nothing after '='; write " +
                               option + " " + form));
  }
  return p;
}
}  // namespace

Result<ExportSpec> ParseExportSpec(const std::string& text) {
  const std::string form = "NAME=PATH[,ro][,desc=TEXT]";
  auto parts = SplitSpec(text, "--export", form);
  if (!parts) return Fail(parts.error());
  ExportSpec s;
  s.name = parts->name;
  s.path = parts->first;
  s.description = parts->desc.value_or("");
  for (const auto& o : parts->options) {
    if (o == "ro") {
      s.read_only = true;
    } else {
      return Fail(Error::Invalid("--export " + Quoted(text) + ": unknown option " + Quoted(o) +
                                 "; the form is " + form));
    }
  }
  return s;
}

Result<ProxySpec> ParseProxySpec(const std::string& text) {
  const std::string form =
      "NAME=URI,cache=PATH,bitmap=PATH[,block-size=BYTES][,fill-rate=RATE][,no-fill][,auto-switch]["
      ",desc=TEXT]";
  auto parts = SplitSpec(text, "--proxy", form);
  if (!parts) return Fail(parts.error());
  ProxySpec s;
  s.name = parts->name;
  s.uri_text = parts->first;
  auto uri = storage::ParseNbdUri(parts->first);
  if (!uri) {
    return Fail(
        Error::Invalid("--proxy " + Quoted(s.name) + ": " + uri.error().message() +
                       " (write nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"));
  }
  s.uri = *uri;
  s.description = parts->desc.value_or("");
  for (const auto& o : parts->options) {
    auto eq = o.find('=');
    std::string key = o.substr(0, eq), value = eq == std::string::npos ? "" : o.substr(eq + 1);
    bool has_value = eq != std::string::npos;
    auto need_value = [&]() -> Status {
      if (!has_value || value.empty())
        return Fail(Error::Invalid("--proxy " + Quoted(s.name) + ": " + key + " needs a value"));
      return Ok();
    };
    if (key == "cache") {
      if (auto st = need_value(); !st) return Fail(st.error());
      s.cache_path = value;
    } else if (key == "bitmap") {
      if (auto st = need_value(); !st) return Fail(st.error());
      s.bitmap_path = value;
    } else if (key == "block-size") {
      if (auto st = need_value(); !st) return Fail(st.error());
      auto bs = ParseByteCount(value, "block-size");
      if (!bs) return Fail(bs.error());
      if (*bs < 4096 || *bs > (1u << 30) || (*bs & (*bs - 1)) != 0) {
        return Fail(Error::Invalid("--proxy " + Quoted(s.name) + ": block-size " + value +
                                   " must be a power of two from 4K to 1G, e.g. 64K"));
      }
      s.block_size = uint32_t(*bs);
    } else if (key == "fill-rate") {
      if (auto st = need_value(); !st) return Fail(st.error());
      auto r = ParseRate(value);
      if (!r) return Fail(r.error());
      s.fill_rate = *r;
    } else if (key == "no-fill" && !has_value) {
      s.fill = false;
    } else if (key == "auto-switch" && !has_value) {
      s.auto_switch = true;
    } else {
      return Fail(Error::Invalid("--proxy " + Quoted(s.name) + ": unknown option " + Quoted(o) +
                                 "; the form is " + form));
    }
  }
  if (s.cache_path.empty() || s.bitmap_path.empty()) {
    return Fail(Error::Invalid("--proxy " + Quoted(s.name) +
                               " needs cache=PATH and bitmap=PATH; the form is " + form));
  }
  if (s.cache_path == s.bitmap_path) {
    return Fail(
        Error::Invalid("--proxy " + Quoted(s.name) + ": cache and bitmap must be different files"));
  }
  return s;
}

Status CheckListenAddress(const std::string& host_port) {
  const std::string example =
      "; write HOST:PORT, e.g. 127.0.0.1:10809 (or 0.0.0.0:10809 to listen on every address)";
  std::string host, port;
  if (!host_port.empty() && host_port[0] == '[') {
    auto close = host_port.find(']');
    if (close == std::string::npos || close + 1 >= host_port.size() ||
        host_port[close + 1] != ':') {
      return Fail(
          Error::Invalid("--listen " + Quoted(host_port) + " is not [IPV6]:PORT" + example));
    }
    host = host_port.substr(1, close - 1);
    port = host_port.substr(close + 2);
  } else {
    auto colon = host_port.rfind(':');
    if (colon == std::string::npos) {
      return Fail(Error::Invalid("--listen " + Quoted(host_port) + " has no host" + example));
    }
    host = host_port.substr(0, colon);
    port = host_port.substr(colon + 1);
    if (host.find(':') != std::string::npos) {
      return Fail(Error::Invalid("--listen " + Quoted(host_port) +
                                 ": put IPv6 addresses in brackets, e.g. [::1]:10809"));
    }
  }
  if (host.empty())
    return Fail(Error::Invalid("--listen " + Quoted(host_port) + " has no host" + example));
  unsigned value = 0;
  auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || p != port.data() + port.size() || value > 65535) {
    return Fail(
        Error::Invalid("--listen " + Quoted(host_port) + ": port must be 0..65535" + example));
  }
  return Ok();
}

// --- serving side -----------------------------------------------------------------

json ExportStatusJson(const ServedExport& e) {
  json j = {{"name", e.name},
            {"description", e.description},
            {"source", e.source},
            {"size", e.backend->Size()},
            {"read_only", e.read_only}};
  if (!e.proxy) {
    j["mode"] = "target";
    return j;
  }
  storage::FillStatus st = e.proxy->Status();
  j["mode"] = st.mode;
  j["cache"] = e.cache_path;
  j["bitmap"] = e.bitmap_path;
  j["fill_running"] = st.fill_running;
  j["complete"] = st.complete;
  j["remote_connected"] = st.remote_connected;
  j["blocks_total"] = st.blocks_total;
  j["blocks_present"] = st.blocks_present;
  j["blocks_committed"] = st.blocks_committed;
  j["block_size"] = st.block_size;
  j["bytes_fetched"] = st.bytes_fetched;
  j["bytes_fetched_fill"] = st.bytes_fetched_fill;
  j["rate"] = st.rate;
  j["eta_seconds"] = st.eta_seconds ? json(*st.eta_seconds) : json(nullptr);
  j["rate_limit"] = st.rate_limit;
  j["last_error"] = st.last_error;
  return j;
}

ControlFailure SwitchNotReady(const storage::FillStatus& st, const Error& cause) {
  if (cause.code() != EAGAIN || st.blocks_total == 0) return ControlFailure(cause);
  // Rounded down, so an incomplete fill never reads as 100%.
  uint64_t pct = st.blocks_present * 100 / st.blocks_total;
  std::string msg = "cannot switch yet: fill is " + std::to_string(pct) + "% complete (" +
                    std::to_string(st.blocks_present) + " of " + std::to_string(st.blocks_total) +
                    " blocks present)";
  std::string hint = st.fill_running ? "run `kagemusha-nbd switch --wait` to switch as soon as the "
                                       "fill completes, or wait for the fill"
                                     : "the fill is stopped; run `kagemusha-nbd switch --wait` (it "
                                       "restarts the fill and switches when "
                                       "done) or `kagemusha-nbd fill start`";
  return ControlFailure(Error(EAGAIN, msg), hint);
}

std::vector<ControlCommand> NbdControlCommands(ServeState& state) {
  using Done = std::expected<void, ControlFailure>;
  std::vector<ControlCommand> table;
  table.push_back(
      {"status",
       "mode, fill progress, remote and connection figures of every export (or args.export)",
       [&state](const json& args) -> ControlResult {
         json exports = json::array();
         if (args.contains("export")) {
           auto e = FindExport(state, args, /*proxy_required=*/false);
           if (!e) return std::unexpected(e.error());
           exports.push_back(ExportStatusJson(**e));
         } else {
           for (const auto& e : state.exports) exports.push_back(ExportStatusJson(e));
         }
         json server = json::object();
         if (state.server) {
           storage::ServerStats s = state.server->Stats();
           server = {{"connections_open", s.connections_open},
                     {"connections_total", s.connections_total},
                     {"connections_refused", s.connections_refused},
                     {"requests", s.requests},
                     {"requests_inline", s.requests_inline},
                     {"bytes_read", s.bytes_read},
                     {"bytes_written", s.bytes_written},
                     {"protocol_errors", s.protocol_errors},
                     {"endpoints", state.server->BoundEndpoints()}};
         }
         return json{{"exports", exports}, {"server", server}};
       }});
  table.push_back({"fill-start", "start (or resume) the background fill of a proxy export",
                   ProxyCommand(state, [](ServedExport& e, const json&) -> Done {
                     e.proxy->StartFill();
                     return {};
                   })});
  table.push_back({"fill-stop", "pause the background fill (on-demand reads still fetch)",
                   ProxyCommand(state, [](ServedExport& e, const json&) -> Done {
                     e.proxy->StopFill();
                     return {};
                   })});
  table.push_back(
      {"fill-rate", "set the fill rate limit: args.rate bytes/s, 0 = unlimited",
       ProxyCommand(state, [](ServedExport& e, const json& args) -> Done {
         // JSON parsed from the wire holds 5 as unsigned; json built in
         // process holds it as signed. Accept both, never a negative.
         const bool valid = args.contains("rate") && args["rate"].is_number_integer() &&
                            (args["rate"].is_number_unsigned() || args["rate"].get<int64_t>() >= 0);
         if (!valid) {
           return std::unexpected(ControlFailure(Error::Invalid(
               "fill-rate needs args.rate, a non-negative integer (bytes/s, 0 = unlimited)")));
         }
         e.proxy->SetFillRate(args["rate"].get<uint64_t>());
         return {};
       })});
  table.push_back(
      {"switch", "switch a complete proxy export to target mode (clients stay connected)",
       ProxyCommand(state, [](ServedExport& e, const json&) -> Done {
         if (auto s = e.proxy->SwitchToTarget(); !s) {
           return std::unexpected(SwitchNotReady(e.proxy->Status(), s.error()));
         }
         spdlog::info("export {}: switched to target mode by control request", Quoted(e.name));
         return {};
       })});
  table.push_back({"reconnect", "drop the connection to the remote and reconnect now",
                   ProxyCommand(state, [](ServedExport& e, const json&) -> Done {
                     if (auto s = e.proxy->ReconnectRemote(); !s) {
                       return std::unexpected(ControlFailure(
                           s.error().Context("reconnecting to " + e.source),
                           e.proxy->Status().mode == "target"
                               ? "the export is in target mode and no longer uses its remote"
                               : "check that the remote is reachable; the proxy keeps retrying in "
                                 "the background"));
                     }
                     return {};
                   })});
  return table;
}

std::string FormatStatusHuman(const json& status) {
  std::ostringstream out;
  auto bytes = [](double b) { return ProgressReporter::HumanBytes(b); };
  for (const auto& e : status.at("exports")) {
    std::string name = e.at("name").get<std::string>();
    out << "export " << Quoted(name) << ": " << e.at("mode").get<std::string>() << ", "
        << bytes(double(e.at("size").get<uint64_t>()))
        << (e.value("read_only", false) ? ", read-only" : "") << "\n";
    if (!e.contains("blocks_total")) {
      out << "  image     " << e.value("source", "") << "\n";
      continue;
    }
    uint64_t total = e.at("blocks_total").get<uint64_t>(),
             present = e.at("blocks_present").get<uint64_t>();
    double pct = total ? 100.0 * double(present) / double(total) : 100.0;
    if (present < total && pct > 99.9) pct = 99.9;
    char line[256];
    std::snprintf(line, sizeof line, "  blocks    %llu/%llu present (%.1f%%), block size %s",
                  (unsigned long long)present, (unsigned long long)total, pct,
                  bytes(double(e.value("block_size", 0u))).c_str());
    out << line;
    // Only while it trails: "committed" blocks are what a restart after a
    // crash would keep.
    if (e.contains("blocks_committed") && e["blocks_committed"].get<uint64_t>() < present)
      out << ", " << e["blocks_committed"].get<uint64_t>() << " committed";
    out << "\n";
    out << "  remote    " << e.value("source", "") << " ("
        << (e.value("mode", "") == "target"      ? "not used: target mode"
            : e.value("remote_connected", false) ? "connected"
                                                 : "disconnected")
        << ")\n";
    out << "  fetched   " << bytes(double(e.value("bytes_fetched", uint64_t{0}))) << " (fill "
        << bytes(double(e.value("bytes_fetched_fill", uint64_t{0}))) << "), rate "
        << bytes(e.value("rate", 0.0)) << "/s";
    if (e.contains("eta_seconds") && e["eta_seconds"].is_number()) {
      out << ", ETA " << int64_t(std::ceil(e["eta_seconds"].get<double>())) << "s";
    }
    out << "\n";
    uint64_t limit = e.value("rate_limit", uint64_t{0});
    out << "  fill      "
        << (e.value("complete", false)       ? "complete"
            : e.value("fill_running", false) ? "running"
                                             : "stopped")
        << ", limit " << (limit ? bytes(double(limit)) + "/s" : std::string("unlimited")) << "\n";
    out << "  cache     " << e.value("cache", "") << ", bitmap " << e.value("bitmap", "") << "\n";
    std::string err = e.value("last_error", "");
    if (!err.empty()) out << "  last error: " << err << "\n";
  }
  if (status.contains("server") && status["server"].contains("connections_open")) {
    const json& s = status["server"];
    out << "server: " << s.value("connections_open", uint64_t{0}) << " connections open ("
        << s.value("connections_total", uint64_t{0}) << " since start), "
        << s.value("requests", uint64_t{0}) << " requests ("
        << s.value("requests_inline", uint64_t{0}) << " inline), "
        << bytes(double(s.value("bytes_read", uint64_t{0}))) << " read, "
        << bytes(double(s.value("bytes_written", uint64_t{0}))) << " written\n";
  }
  return out.str();
}

const std::vector<Subcommand>& NbdSubcommands() {
  static const std::vector<Subcommand> table = {
      {"serve",
       "serve image files (target mode) and remote exports through a local cache (proxy mode)",
       RunServe},
      {"status", "show mode, fill progress and connections of a running server", RunStatus},
      {"fill", "start, stop or rate-limit the background fill of a proxy export", RunFill},
      {"switch", "switch a filled proxy export to target mode without dropping clients", RunSwitch},
      {"reconnect", "reconnect a proxy export to its remote now", RunReconnect},
  };
  return table;
}

const cli::Program& NbdProgram() {
  static const cli::Program program{
      "kagemusha-nbd",
      "An NBD server with a copy-on-read proxy mode for moving disks between sites.",
      KAGEMUSHA_VERSION, NbdSubcommands(), "See docs/cli.md for the full reference."};
  return program;
}

std::string TopLevelUsage() { return cli::TopLevelUsage(NbdProgram()); }

}  // namespace kagemusha::nbdcli

// kagemusha-wanem: user-space WAN emulator between two interfaces.
//
// Forwards every Ethernet frame from --if-a to --if-b and back, each direction
// through its own DirectionPipe (delay, optional rate limit with a drop-tail
// queue, optional random loss). The test-bed kit (tests/kit/testbed.sh,
// tb_wan) runs it in a "wan" namespace between two site routers; see
// docs/testbed.md. This file only parses options and wires the parts.
//
//   kagemusha-wanem --if-a wa --if-b wb --rtt-ms 40 --rate-mbit 100 --loss 0.1
//   kagemusha-wanem --offloads-off eth0 [--offloads-off eth1]   (helper mode)
//
// Stats are printed on SIGUSR1, every --stats-interval seconds and at exit.
// SIGRTMIN cuts the link (both directions lose everything), SIGRTMIN+1
// restores it; each prints "wanem: link down" / "wanem: link up".
#include <signal.h>

#include <atomic>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kagemusha/common/clock.h"
#include "wanem_pipe.h"
#include "wanem_port.h"
#include "wanem_shaper.h"

namespace po = boost::program_options;
using namespace kagemusha;
using namespace kagemusha::wanem;

namespace {

struct Options {
  std::string if_a, if_b;
  std::optional<double> delay_ms, rtt_ms;
  double rate_mbit = 0, loss_pct = 0, queue_ms = 100, stats_interval = 0;
  uint64_t queue_bytes = 0, seed = 1;
  size_t queue_frames = 16384, batch = 64;
  double timer_slack_us = 100;
  std::vector<std::string> offloads_off;
};

void PrintStats(const DirectionPipe& p, uint64_t kernel_drops, const char* when) {
  const DirectionStats& s = p.stats();
  auto v = [](const std::atomic<uint64_t>& a) {
    return static_cast<unsigned long long>(a.load(std::memory_order_relaxed));
  };
  std::printf(
      "wanem stats %s %s: rx_frames=%llu rx_bytes=%llu tx_frames=%llu tx_bytes=%llu drop_loss=%llu "
      "drop_queue=%llu drop_overflow=%llu drop_oversize=%llu tx_errors=%llu kernel_drops=%llu "
      "queued=%llu "
      "max_frame=%llu csum_partial=%llu vlan_restored=%llu drop_down=%llu\n",
      p.label().c_str(), when, v(s.rx_frames), v(s.rx_bytes), v(s.tx_frames), v(s.tx_bytes),
      v(s.drop_loss), v(s.drop_queue), v(s.drop_overflow), v(s.drop_oversize), v(s.tx_errors),
      static_cast<unsigned long long>(kernel_drops), v(s.queued), v(s.max_frame), v(s.csum_partial),
      v(s.vlan_restored), v(s.drop_down));
  std::fflush(stdout);
}

std::optional<Options> ParseOptions(int argc, char** argv) {
  Options o;
  po::options_description desc("kagemusha-wanem: user-space WAN emulator between two interfaces");
  desc.add_options()("help,h", "this help")("if-a", po::value(&o.if_a), "first interface")(
      "if-b", po::value(&o.if_b), "second interface")("delay-ms", po::value<double>(),
                                                      "one-way delay per direction, ms")(
      "rtt-ms", po::value<double>(), "round-trip time to add, ms (delay = rtt/2 each way)")(
      "rate-mbit", po::value(&o.rate_mbit)->default_value(0),
      "rate limit per direction, Mbit/s on the wire (0 = none)")(
      "loss", po::value(&o.loss_pct)->default_value(0),
      "random loss per direction, percent of frames")(
      "seed", po::value(&o.seed)->default_value(1),
      "seed of the loss generator (b->a uses seed+1)")(
      "queue-ms", po::value(&o.queue_ms)->default_value(100),
      "bottleneck queue limit as time at --rate-mbit")(
      "queue-bytes", po::value(&o.queue_bytes)->default_value(0),
      "bottleneck queue limit in bytes (0 = from --queue-ms; the smaller wins)")(
      "queue-frames", po::value(&o.queue_frames)->default_value(16384),
      "delay-line capacity per direction, frames")("batch", po::value(&o.batch)->default_value(64),
                                                   "frames per recvmmsg/sendmmsg")(
      "timer-slack-us", po::value(&o.timer_slack_us)->default_value(100),
      "max lateness of a release, us (larger = bigger send batches)")(
      "stats-interval", po::value(&o.stats_interval)->default_value(0),
      "print stats every N seconds (0 = only on SIGUSR1 and exit)")(
      "offloads-off", po::value(&o.offloads_off),
      "helper mode: turn TSO/GSO/GRO off on this interface (repeatable) and exit");
  po::variables_map vm;
  po::store(po::parse_command_line(argc, argv, desc), vm);
  po::notify(vm);
  if (vm.count("help")) {
    std::cout << desc << "\n";
    std::exit(0);
  }
  if (vm.count("delay-ms")) o.delay_ms = vm["delay-ms"].as<double>();
  if (vm.count("rtt-ms")) o.rtt_ms = vm["rtt-ms"].as<double>();
  if (!o.offloads_off.empty()) return o;
  if (o.if_a.empty() || o.if_b.empty()) throw po::error("--if-a and --if-b are required");
  if (o.if_a == o.if_b) throw po::error("--if-a and --if-b must differ");
  if (o.delay_ms && o.rtt_ms) throw po::error("give --delay-ms or --rtt-ms, not both");
  auto check = [](bool ok, const char* what) {
    if (!ok) throw po::error(what);
  };
  check(!o.delay_ms || (*o.delay_ms >= 0 && *o.delay_ms < 600000), "--delay-ms out of range");
  check(!o.rtt_ms || (*o.rtt_ms >= 0 && *o.rtt_ms < 1200000), "--rtt-ms out of range");
  check(o.rate_mbit >= 0 && o.rate_mbit <= 1e6, "--rate-mbit out of range");
  check(o.loss_pct >= 0 && o.loss_pct <= 100, "--loss must be a percentage in [0, 100]");
  check(o.queue_ms > 0, "--queue-ms must be positive");
  check(o.queue_frames >= 16 && o.queue_frames <= (1u << 22),
        "--queue-frames out of range [16, 4M]");
  check(o.batch >= 1 && o.batch <= 1024, "--batch out of range [1, 1024]");
  check(o.stats_interval >= 0, "--stats-interval must be >= 0");
  check(o.timer_slack_us >= 0 && o.timer_slack_us <= 10000,
        "--timer-slack-us out of range [0, 10000]");
  return o;
}

ShaperConfig MakeShaperConfig(const Options& o, int mtu) {
  ShaperConfig c;
  const double one_way_ms = o.delay_ms ? *o.delay_ms : (o.rtt_ms ? *o.rtt_ms / 2 : 0);
  c.delay = Nanos{static_cast<int64_t>(std::llround(one_way_ms * 1e6))};
  c.rate_bps = static_cast<uint64_t>(std::llround(o.rate_mbit * 1e6));
  c.loss = o.loss_pct / 100.0;
  c.seed = o.seed;
  if (c.rate_bps > 0) {
    uint64_t limit = static_cast<uint64_t>(static_cast<double>(c.rate_bps) / 8 * o.queue_ms / 1000);
    if (o.queue_bytes > 0) limit = std::min(limit, o.queue_bytes);
    // Never below two full frames, or a slow link could not queue at all.
    c.queue_bytes = std::max<uint64_t>(limit, 2 * static_cast<uint64_t>(mtu + 18));
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<Options> parsed;
  try {
    parsed = ParseOptions(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "kagemusha-wanem: " << e.what() << " (see --help)\n";
    return 2;
  }
  const Options& o = *parsed;

  if (!o.offloads_off.empty()) {
    for (const auto& ifname : o.offloads_off) {
      if (auto s = SetOffloads(ifname, false); !s) {
        std::cerr << "kagemusha-wanem: " << s.error().message() << "\n";
        return 1;
      }
    }
    return 0;
  }

  // Block the signals before any thread exists, so only sigtimedwait() below
  // sees them and the forwarding threads are never interrupted.
  sigset_t sigs;
  sigemptyset(&sigs);
  for (int s : {SIGINT, SIGTERM, SIGUSR1, SIGHUP, SIGRTMIN, SIGRTMIN + 1}) sigaddset(&sigs, s);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  for (const auto* ifname : {&o.if_a, &o.if_b}) {
    // Receive-side coalescing would hand us frames above the MTU.
    if (auto s = SetOffloads(*ifname, false); !s) {
      std::cerr << "kagemusha-wanem: warning: " << s.error().message() << "\n";
    }
  }
  auto port_a = PacketPort::Open(o.if_a);
  if (!port_a) {
    std::cerr << "kagemusha-wanem: " << port_a.error().message() << "\n";
    return 1;
  }
  auto port_b = PacketPort::Open(o.if_b);
  if (!port_b) {
    std::cerr << "kagemusha-wanem: " << port_b.error().message() << "\n";
    return 1;
  }

  const int mtu = std::max(port_a->mtu(), port_b->mtu());
  PipeConfig pipe_config;
  pipe_config.slots = o.queue_frames;
  pipe_config.batch = o.batch;
  pipe_config.timer_slack = Nanos{static_cast<int64_t>(o.timer_slack_us * 1000)};
  // Ethernet header + two VLAN tags, rounded up to a cache line.
  pipe_config.slot_bytes = (static_cast<size_t>(mtu) + 22 + 63) / 64 * 64;
  ShaperConfig shaper_ab = MakeShaperConfig(o, mtu);
  ShaperConfig shaper_ba = shaper_ab;
  shaper_ba.seed = o.seed + 1;  // independent loss patterns per direction

  Clock& clock = SteadyClock::Instance();
  DirectionPipe ab(o.if_a + "->" + o.if_b, *port_a, *port_b, shaper_ab, pipe_config, clock);
  DirectionPipe ba(o.if_b + "->" + o.if_a, *port_b, *port_a, shaper_ba, pipe_config, clock);

  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  auto run = [&](DirectionPipe& p) {
    if (auto s = p.Run(stop); !s) {
      std::fprintf(stderr, "kagemusha-wanem: %s\n", s.error().message().c_str());
      failures.fetch_add(1);
      stop.store(true);
      ::kill(::getpid(), SIGTERM);  // wake the main thread
    }
  };
  std::thread t_ab(run, std::ref(ab));
  std::thread t_ba(run, std::ref(ba));

  std::printf(
      "wanem: ready if_a=%s if_b=%s delay_ms=%.3f rate_bps=%llu queue_bytes=%llu loss=%.4f "
      "mtu=%d\n",
      o.if_a.c_str(), o.if_b.c_str(), static_cast<double>(shaper_ab.delay.count()) / 1e6,
      static_cast<unsigned long long>(shaper_ab.rate_bps),
      static_cast<unsigned long long>(shaper_ab.queue_bytes), shaper_ab.loss, mtu);
  std::fflush(stdout);

  uint64_t kdrops_a = 0, kdrops_b = 0;  // kernel drops on a's / b's receive socket
  auto print_all = [&](const char* when) {
    kdrops_a += port_a->TakeKernelDrops();
    kdrops_b += port_b->TakeKernelDrops();
    PrintStats(ab, kdrops_a, when);
    PrintStats(ba, kdrops_b, when);
  };
  const bool periodic = o.stats_interval > 0;
  const auto interval_ns = static_cast<long long>(o.stats_interval * 1e9);
  while (!stop.load()) {
    int sig;
    if (periodic) {
      timespec ts{static_cast<time_t>(interval_ns / 1'000'000'000),
                  static_cast<long>(interval_ns % 1'000'000'000)};
      sig = sigtimedwait(&sigs, nullptr, &ts);
      if (sig < 0) {
        if (errno == EAGAIN) print_all("interval");
        continue;
      }
    } else {
      if (sigwait(&sigs, &sig) != 0) continue;
    }
    if (sig == SIGUSR1) {
      print_all("now");
    } else if (sig == SIGRTMIN || sig == SIGRTMIN + 1) {
      const bool up = sig != SIGRTMIN;
      ab.SetLinkUp(up);
      ba.SetLinkUp(up);
      std::printf("wanem: link %s\n", up ? "up" : "down");
      std::fflush(stdout);
    } else {
      stop.store(true);
    }
  }
  t_ab.join();
  t_ba.join();
  print_all("exit");
  return failures.load() == 0 ? 0 : 1;
}

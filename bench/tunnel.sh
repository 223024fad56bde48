#!/usr/bin/env bash
# bench/tunnel.sh: the tunnel module's benchmark (issue 3). Not a test: it
# prints tables with ratios against peers measured in the same run.
#
#   KAGEMUSHA_BUILD=build-dir bash bench/tunnel.sh [all|throughput|handover]
#
# Parts (each builds its own topology from tests/tunnel/topology.sh on the
# test-bed kit, in a child process with its own run id):
#   throughput  foreign hosts and CN on plain veths off R (no emulator, so its
#               CPU does not dominate). iperf3 TCP, CN -> guest and guest -> CN
#               (-R), for
#                 direct   guest at home on the home link, no tunnel
#                 underlay CN <-> foreign host a's care-of address (routed)
#                 vxlan    guest at a, kernel VXLAN (IPv6 underlay) between a
#                          gateway on the home link and a, bridged: the L2
#                          extension alternative, same veths as the tunnel
#                 tunnel   guest at a, kagemusha-tunneld + kagemusha-ha
#                 direct4, tunnel4  direct and tunnel to the guest's IPv4
#                          home address (DSMIPv6: IPv4-in-IPv6, which the
#                          daemons carry in user space); tunnel4's ratio is
#                          against direct4
#               with machine CPU from /proc/stat (busy CPU-seconds per GB
#               moved, niced user time left out: the machine is shared and
#               others' builds run niced, but their kernel time still shows
#               up) and the daemons' own CPU (utime+stime from /proc/PID/stat).
#               Every path is measured at each rate of BENCH_LINK_RATES: a
#               tbf qdisc caps both ends of the R <-> CN veth (the one link
#               every path crosses), so all paths meet the same bottleneck;
#               one table per rate. Run on its own (`bench/tunnel.sh
#               throughput`) the part prints its tables, then the raw lines.
#               Then RSS per session: kagemusha-tunneld's VmRSS with 1 and
#               with BENCH_SESSIONS sessions (and the HA's with as many
#               bindings).
#   handover    WAN topology (CN 20 ms, foreign sites 10 ms RTT). From the CN,
#               ICMPv6 echo to the guest every 10 ms while the guest moves
#               home -> a, a -> b, b -> home; the loss window is the longest
#               run of unanswered probes x 10 ms. For each HA DAD mode (rfc,
#               optimistic, off). A move is mob_move (tests/tunnel/
#               topology.sh): the guest's link moves (two `ip -n` calls),
#               then `kagemusha-tunneld activate` (or `home`) on the new
#               host; the old foreign host's `deactivate` follows, as a
#               source host's clean-up follows a live migration's switch.
# Median of BENCH_RUNS (default 3) runs for every figure.
#
# Environment: BENCH_RUNS (3), BENCH_SECONDS (iperf3 duration, 5),
# BENCH_LINK_RATES ("1000 0": Mbit/s caps of the R <-> CN link, 0 = uncapped),
# BENCH_SESSIONS (16), BENCH_CN_RTT (20), BENCH_FOREIGN_RTT (10),
# BENCH_OFFLOADS (off: every veth segments in software, like a wire; on:
# leave GSO/TSO on).
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/.." && pwd)}"
export KAGEMUSHA_SOURCE=$SRC
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECONDS:-5}
NSESS=${BENCH_SESSIONS:-16}
RATES=${BENCH_LINK_RATES:-1000 0}
part=${1:-all}

median() {  # numbers on stdin (non-numeric ignored) -> median or "n/a"
  awk '$1 ~ /^-?[0-9.]+$/ { v[n++] = $1 } END {
    if (!n) { print "n/a"; exit }
    for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    if (n % 2) print v[int(n / 2)]; else printf "%.3f\n", (v[n / 2 - 1] + v[n / 2]) / 2 }'
}

# FILE's lines that begin with KEY and a space, without that prefix.
field() { awk -v k="$1 " 'index($0, k) == 1 { print substr($0, length(k) + 1) }' "$2"; }

# The handover table from FILE's "gap MODE MOVE ms" lines.
handover_table() {  # FILE
  local m mv vals
  echo "Handover loss window (ICMPv6 echo every 10 ms from the CN; longest run of lost probes x 10 ms)"
  printf '%-11s %-12s %10s %10s %10s\n' dad move "window_ms" "min" "max"
  for m in rfc optimistic off; do
    for mv in home-a a-b b-home; do
      vals=$(field "gap $m $mv" "$1" | awk '{print $1}')
      printf '%-11s %-12s %10s %10s %10s\n' "$m" "$mv" "$(median <<<"$vals")" \
        "$(sort -n <<<"$vals" | grep -E '^[0-9]' | head -n1 || true)" "$(sort -n <<<"$vals" | grep -E '^[0-9]' | tail -n1 || true)"
    done
  done
}

# tbf on the R <-> CN veth for RATE Mbit/s: burst = 4 ms of the rate, at least
# 64 KiB. 64 KiB so that a GSO super-packet (BENCH_OFFLOADS=on) fits the
# bucket whole and tbf does not segment it (tbf_segment) for the capped run
# only; 4 ms so that the bucket outlasts the softirq/scheduling delays of a
# shared 2-CPU machine, which otherwise leave tokens unused and hold one TCP
# stream well below the rate (direct reaches ~0.94 of the cap, what 1500-byte
# frames with 60-72 bytes of IPv6+TCP headers can carry). The queue holds
# 10 ms beyond the burst.
tbf_burst() { echo $(($1 * 1000000 / 8 / 250 > 65536 ? $1 * 1000000 / 8 / 250 : 65536)); }
cap_text() {  # RATE
  if (($1 == 0)); then echo "uncapped (plain veths)"
  else echo "tbf ${1} Mbit/s (burst $(tbf_burst "$1") B, latency 10 ms) on both ends of the R <-> CN veth, which every path crosses"; fi
}

# The throughput tables (one per rate) from FILE's "tput RATE NAME DIR ..." lines.
throughput_tables() {  # FILE
  local rate d c ref base mb cg dg mp ratio vals
  for rate in $RATES; do
    echo "TCP throughput (iperf3, one stream) and CPU, same veths; ratios vs direct at the same cap"
    echo "cap: $(cap_text "$rate")"
    printf '%-9s %-9s %10s %8s %12s %14s %8s\n' path dir Mbit/s ratio "cpu_s/GB" "daemon_cpu_s/GB" "machine%"
    for d in fwd rev; do
      for c in direct underlay vxlan tunnel direct4 tunnel4; do
        [[ $c == *4 ]] && ref=direct4 || ref=direct
        base=$(field "tput $rate $ref $d" "$1" | awk '{print $1}' | median)
        vals=$(field "tput $rate $c $d" "$1")
        mb=$(awk '{print $1}' <<<"$vals" | median)
        cg=$(awk '{print $2}' <<<"$vals" | median)
        dg=$(awk '{print $3}' <<<"$vals" | median)
        mp=$(awk '{print $4}' <<<"$vals" | median)
        ratio=n/a
        [[ "$mb" == n/a || "$base" == n/a ]] || ratio=$(awk -v a="$mb" -v b="$base" 'BEGIN { printf "%.2f", a / b }')
        printf '%-9s %-9s %10s %8s %12s %14s %8s\n' "$c" "$([[ $d == fwd ]] && echo cn→guest || echo guest→cn)" "$mb" "$ratio" "$cg" "$dg" "$mp"
      done
    done
    echo
  done
}

memory_table() {  # FILE
  local r1 rn h1 hn
  r1=$(field "rss tunneld1" "$1" | median); rn=$(field "rss tunneldN" "$1" | median)
  h1=$(field "rss ha1" "$1" | median); hn=$(field "rss haN" "$1" | median)
  echo "Memory"
  printf 'kagemusha-tunneld VmRSS: 1 session %s KiB, %s sessions %s KiB -> %s KiB per extra session\n' "$r1" "$NSESS" "$rn" \
    "$(awk -v a="$r1" -v b="$rn" -v n="$NSESS" 'BEGIN { if (a == "n/a" || b == "n/a") print "n/a"; else printf "%.1f", (b - a) / (n - 1) }')"
  printf 'kagemusha-ha      VmRSS: 1 binding %s KiB, %s bindings %s KiB\n' "$h1" "$NSESS" "$hn"
}

raw_legend="tput RATE NAME DIR Mbit/s cpu_s/GB daemon_cpu_s/GB machine%; gap MODE MOVE ms; rss WHAT KiB"

# The throughput part on its own (not from `all`): its tables, then the raw lines.
if [[ "$part" == throughput && -z "${BENCH_OUT:-}" ]]; then
  out=$(mktemp -d /tmp/kagemusha-bench-tunnel.XXXXXX)
  trap 'rm -rf "$out"' EXIT
  BENCH_OUT="$out/throughput.txt" bash "$0" throughput || echo "part throughput failed (exit $?)" >&2
  echo
  echo "tunnel benchmark (throughput): $(date -u +%FT%TZ), $(nproc) CPUs, kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)," \
    "runs=$RUNS (median), iperf3 ${SECS}s, veth offloads ${BENCH_OFFLOADS:-off}"
  echo
  throughput_tables "$out/throughput.txt"
  memory_table "$out/throughput.txt"
  echo
  echo "Raw results ($raw_legend):"
  sed 's/^/  /' "$out/throughput.txt"
  exit 0
fi

# The handover part on its own (not from `all`): its table, then the raw lines.
if [[ "$part" == handover && -z "${BENCH_OUT:-}" ]]; then
  out=$(mktemp -d /tmp/kagemusha-bench-tunnel.XXXXXX)
  trap 'rm -rf "$out"' EXIT
  BENCH_OUT="$out/handover.txt" bash "$0" handover || echo "part handover failed (exit $?)" >&2
  echo
  echo "tunnel benchmark (handover): $(date -u +%FT%TZ), $(nproc) CPUs, kernel $(uname -r), runs=$RUNS (median)"
  echo
  handover_table "$out/handover.txt"
  echo
  echo "Raw results (gap MODE MOVE ms):"
  sed 's/^/  /' "$out/handover.txt"
  exit 0
fi

if [[ "$part" == all ]]; then
  out=$(mktemp -d /tmp/kagemusha-bench-tunnel.XXXXXX)
  trap 'rm -rf "$out"' EXIT
  for p in throughput handover; do
    echo "== part $p (logs: stderr) ==" >&2
    BENCH_OUT="$out/$p.txt" bash "$0" "$p" || echo "part $p failed (exit $?)" >&2
  done
  cat "$out"/*.txt 2>/dev/null >"$out/all" || true
  echo
  echo "tunnel benchmark: $(date -u +%FT%TZ), $(nproc) CPUs, kernel $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)," \
    "runs=$RUNS (median), iperf3 ${SECS}s, veth offloads ${BENCH_OFFLOADS:-off}"
  echo
  throughput_tables "$out/all"
  handover_table "$out/all"
  echo
  memory_table "$out/all"
  echo
  echo "Raw results ($raw_legend):"
  sed 's/^/  /' "$out/all"
  exit 0
fi

# ------------------------------------------------------------------ a part
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
BENCH_OUT=${BENCH_OUT:-/dev/stdout}
record() { echo "$*" >>"$BENCH_OUT"; tb_log "result: $*"; }
have_daemons() { [[ -x "$(mob_tunneld_bin)" && -x "$(mob_ha_bin)" ]]; }

tb_require_cmd iperf3
tb_init

# Busy = all but idle, iowait and niced user time: the machine is shared and
# others' builds run niced (their kernel time still counts; ours is not niced).
cpu_busy_total() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6 - $3, t }' /proc/stat; }
proc_ticks() {  # PIDS... -> utime+stime sum
  local p s=0 st
  for p in "$@"; do
    st=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    st=${st##*) }
    s=$((s + $(awk '{print $12 + $13}' <<<"$st")))
  done
  echo "$s"
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# Caps both ends of the R <-> CN veth at RATE Mbit/s (0: removes the cap).
cap_cn_link() {  # RATE
  local node peer dev
  for node in home cn; do
    [[ $node == home ]] && peer=cn || peer=home
    dev=$(tb_if "$node" "$peer")
    tb_exec "$node" tc qdisc del dev "$dev" root 2>/dev/null || true
    (($1 == 0)) || tb_exec "$node" tc qdisc add dev "$dev" root tbf rate "${1}mbit" burst "$(tbf_burst "$1")" latency 10ms ||
      tb_fail "tbf on $node/$dev"
  done
  tb_log "R <-> CN link: $(cap_text "$1")"
}

# measure at every rate of BENCH_LINK_RATES; leaves the link uncapped.
measure_rates() {  # NAME ADDR [DAEMON PIDS...]
  local rate
  for rate in $RATES; do
    cap_cn_link "$rate"
    measure "$rate" "$@"
  done
  cap_cn_link 0
}

# iperf3 from the CN to ADDR (rev: -R), BENCH_RUNS times; records
# "tput RATE NAME DIR mbit cpu_s_per_gb daemon_cpu_s_per_gb machine_pct".
IPERF_PORT=5201
measure() {  # RATE NAME ADDR [DAEMON PIDS...]
  local rate=$1 name=$2 addr=$3 d r json b0 t0 b1 t1 d0 d1 hz
  shift 3
  hz=$(getconf CLK_TCK)
  for d in fwd rev; do
    for ((r = 1; r <= RUNS; r++)); do
      local -a flags=(-c "$addr" -p "$IPERF_PORT" -t "$SECS" -J)
      [[ $d == rev ]] && flags+=(-R)
      read -r b0 t0 < <(cpu_busy_total)
      d0=$(proc_ticks "$@")
      json=$(tb_exec cn timeout $((SECS + 30)) iperf3 "${flags[@]}" 2>/dev/null) || { tb_log "iperf3 $name $d at $rate failed"; record "tput $rate $name $d fail"; continue; }
      read -r b1 t1 < <(cpu_busy_total)
      d1=$(proc_ticks "$@")
      line=$(python3 -c '
import json, sys
rate, name, d = sys.argv[1], sys.argv[2], sys.argv[3]
b0, t0, b1, t1, d0, d1, hz, ncpu = map(float, sys.argv[4:12])
doc = json.loads(sys.argv[12])
s = doc["end"]["sum_received"]
gb = s["bytes"] / 1e9
busy = (b1 - b0) / hz
print("tput %s %s %s %.1f %.2f %.2f %.1f" % (rate, name, d, s["bits_per_second"] / 1e6, busy / gb, (d1 - d0) / hz / gb,
      100.0 * (b1 - b0) / max(t1 - t0, 1)))
' "$rate" "$name" "$d" "$b0" "$t0" "$b1" "$t1" "$d0" "$d1" "$hz" "$(nproc)" "$json")
      record "$line"
    done
  done
}

# Plain veths hand GSO super-frames (up to 64 KiB) from one namespace to the
# next, which no real link carries. Make every veth of the run segment in
# software, like a wire (the kit does the same for the routers' WAN legs),
# for all paths alike. (With BENCH_OFFLOADS=on, GSO packets cross the veths
# whole; the fast path keeps them whole, and kagemusha-ha cuts IPv4 TCP
# frames beyond its link's MTU back into segments for the 4in6 tunnel.)
wire_offloads_off() {
  local ns i
  for ns in $(ip netns list | awk '{print $1}' | grep "^$TB_ID-"); do
    for i in $(ip -n "$ns" -o link show type veth | awk -F': ' '{print $2}' | cut -d@ -f1); do
      ip netns exec "$ns" "$(tb_wanem_bin)" --offloads-off "$i" || tb_fail "offloads off on $ns/$i"
    done
  done
}

part_throughput() {
  mob_topology --cn-rtt direct --foreign-rtt direct
  [[ "${BENCH_OFFLOADS:-off}" == on ]] || wire_offloads_off
  tb_spawn --name iperf-guest guest iperf3 -s -p "$IPERF_PORT"
  tb_wait_port guest :: "$IPERF_PORT" || tb_fail "iperf3 server in the guest"
  tb_spawn --name iperf-a a iperf3 -s -p "$IPERF_PORT"
  tb_wait_port a :: "$IPERF_PORT" || tb_fail "iperf3 server in a"
  mob_ping_ok cn "$MOB_HOA6" 3

  # (a) direct: the guest at home.
  measure_rates direct "$MOB_HOA6"
  # (a4) the same to the guest's IPv4 address (ratio base for tunnel4).
  mob_ping_ok cn "$MOB_HOA4" 3
  measure_rates direct4 "$MOB_HOA4"
  # (a') underlay: the foreign host's care-of address, routed by R.
  measure_rates underlay "${MOB_COA[a]}"

  # (c) VXLAN: L2 extension of the home link to a's VM bridge.
  mob_bridged_host vxgw 02:4b:4d:00:06:01 2001:db8:1::4 192.0.2.4
  [[ "${BENCH_OFFLOADS:-off}" == on ]] || wire_offloads_off
  local vbr=$MOB_BRIDGED_BR
  tb_exec vxgw ip link add vx42 type vxlan id 42 local 2001:db8:1::4 remote "${MOB_COA[a]}" dstport 4789
  tb_exec vxgw ip link set vx42 master "$vbr" up
  tb_exec a ip link add vx42 type vxlan id 42 local "${MOB_COA[a]}" remote 2001:db8:1::4 dstport 4789
  tb_exec a ip link set vx42 master "${MOB_VMBR[a]}" up
  mob_guest_detach
  mob_guest_attach a
  # VXLAN over IPv6 costs 70 bytes and a bridge does not fragment: the guest
  # link gets the VXLAN MTU (the tunnel instead sends Packet Too Big).
  tb_exec guest ip link set "$MOB_GUEST_IF" mtu 1430
  tb_exec home ip neigh flush dev "$(tb_if home bridge)"
  mob_ping_ok cn "$MOB_HOA6" 3
  measure_rates vxlan "$MOB_HOA6"
  tb_exec vxgw ip link del vx42
  tb_exec a ip link del vx42
  tb_exec guest ip link set "$MOB_GUEST_IF" mtu 1500

  # (b) our tunnel.
  if ! have_daemons; then
    tb_log "kagemusha-tunneld / kagemusha-ha not built: no tunnel figures"
    record "tput 0 tunnel fwd n/a"
    return 0
  fi
  tb_exec home ip neigh flush dev "$(tb_if home bridge)"
  mob_ha_start --dad off
  mob_tunneld_start a
  MOB_V4=1 mob_activate a  # DSMIPv6: the IPv4 home address too
  mob_wait_registered a
  tb_wait_for 10 tb_ping cn "$MOB_HOA6" 1 0.1 1 || tb_fail "guest at a unreachable through the tunnel"
  measure_rates tunnel "$MOB_HOA6" "$MOB_HA_PID" "${MOB_TUNNELD_PID[a]}"
  # (b4) IPv4 through the tunnel (IPv4-in-IPv6, the daemons' user-space path).
  tb_wait_for 10 tb_ping cn "$MOB_HOA4" 1 0.1 1 || tb_fail "guest's IPv4 address at a unreachable through the tunnel"
  measure_rates tunnel4 "$MOB_HOA4" "$MOB_HA_PID" "${MOB_TUNNELD_PID[a]}"

  # RSS per session: a fresh tunneld on b, 1 then NSESS sessions (insecure),
  # registered with a fresh insecure HA.
  tb_stop "$MOB_HA_PID"
  tb_spawn --name ha-rss ha "$(mob_ha_bin)" serve --home-link "$MOB_HA_IF" --address "$MOB_HA6" \
    --home-prefix "$MOB_HOME_PREFIX" --insecure --dad off --bu-rate 1000 \
    --state-dir "$TB_DIR/ha-rss.state" --control "$TB_DIR/ha-rss.sock"
  local hapid=$TB_SPAWN_PID
  mkdir -p "$TB_DIR/ha-rss.state"
  tb_wait_unix "$TB_DIR/ha-rss.sock" 10 || tb_fail "HA for the RSS part"
  mob_tunneld_start b
  local i
  for ((i = 1; i <= NSESS; i++)); do
    mob_tunneld b activate --name "s$i" --guest-mac "$(printf '02:4b:4d:10:00:%02x' "$i")" \
      --hoa "$(printf '2001:db8:1::1%03x' "$i")" --home-prefix "$MOB_HOME_PREFIX" \
      --router-mac "$MOB_ROUTER_MAC" --router-ll "$MOB_ROUTER_LL" --ha "$MOB_HA6" \
      --coa "${MOB_COA[b]}" --uplink "${MOB_UPLINK[b]}" --bridge "${MOB_VMBR[b]}" --insecure >/dev/null ||
      tb_fail "activating session s$i on b"
    if ((i == 1)); then
      tb_wait_for 10 _mob_n_registered b 1 || tb_fail "RSS session 1 not registered"
      sleep 1
      record "rss tunneld1 $(rss_kib "${MOB_TUNNELD_PID[b]}")"
      record "rss ha1 $(rss_kib "$hapid")"
    fi
  done
  tb_wait_for 30 _mob_n_registered b "$NSESS" || tb_log "not all $NSESS sessions registered"
  sleep 1
  record "rss tunneldN $(rss_kib "${MOB_TUNNELD_PID[b]}")"
  record "rss haN $(rss_kib "$hapid")"
}

_mob_n_registered() {  # HOST N
  local n
  n=$(mob_tunneld "$1" status --json 2>/dev/null | python3 -c '
import json, sys
print(sum(1 for s in json.load(sys.stdin).get("sessions", []) if s.get("state") == "registered"))')
  ((n >= $2))
}

# ICMPv6 echo every 10 ms until STOP exists; prints the longest loss window.
write_pinger() {
  cat >"$TB_DIR/pinger.py" <<'PY'
import os, select, socket, struct, sys, time
addr, stop, interval = sys.argv[1], sys.argv[2], 0.01
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
ident, seq, answered = os.getpid() & 0xFFFF, 0, set()
print("started", flush=True)
next_t, stop_at = time.monotonic(), None
while True:
    now = time.monotonic()
    if stop_at is None and os.path.exists(stop):
        stop_at = now + 0.5  # replies still in flight
    if stop_at is not None and now >= stop_at:
        break
    if now >= next_t and stop_at is None:
        s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, seq & 0xFFFF) + b"kgm", (addr, 0))
        seq += 1
        next_t += interval
    r, _, _ = select.select([s], [], [], max(0.0, min(next_t - time.monotonic(), 0.01)))
    if r:
        d = s.recv(2048)
        if len(d) >= 8:
            t, _, _, i, q = struct.unpack("!BBHHH", d[:8])
            if t == 129 and i == ident:
                answered.add(q)
sent = seq
longest = run = 0
first = min(answered) if answered else sent
for q in range(first, sent):  # a window before the first reply is ND warm-up, not the move
    if (q & 0xFFFF) in answered:
        run = 0
    else:
        run += 1
        longest = max(longest, run)
tail_lost = run
print("sent=%d received=%d window_ms=%d tail_lost=%d" % (sent, len(answered), longest * 10, tail_lost), flush=True)
PY
}

gap_move() {  # MODE LABEL TO
  local mode=$1 label=$2 to=$3 stop="$TB_DIR/pinger.stop" line
  rm -f "$stop"
  tb_spawn --name "pinger-$mode-$label" cn python3 "$TB_DIR/pinger.py" "$MOB_HOA6" "$stop"
  local log=$TB_SPAWN_LOG pid=$TB_SPAWN_PID
  tb_wait_log "$log" '^started' 5 || tb_fail "pinger"
  sleep 0.5
  mob_move "$to"
  if [[ "$to" == hh ]]; then mob_wait_deregistered 30; else mob_wait_registered "$to" 30; fi
  # Until replies flow again (bounded), then a little more.
  tb_wait_for 15 tb_ping cn "$MOB_HOA6" 1 0.05 0.2 || tb_log "guest unreachable after $label"
  sleep 0.5
  touch "$stop"
  tb_wait_log "$log" '^sent=' 10 || tb_fail "pinger did not finish"
  line=$(grep '^sent=' "$log")
  tb_log "dad=$mode $label: $line"
  if (($(tb_field tail_lost "$line") > 0)); then
    record "gap $mode $label lost"
  else
    record "gap $mode $label $(tb_field window_ms "$line")"
  fi
  tb_stop "$pid" 1
}

part_handover() {
  have_daemons || { tb_log "daemons not built: no handover figures"; return 0; }
  mob_topology --cn-rtt "${BENCH_CN_RTT:-20}" --foreign-rtt "${BENCH_FOREIGN_RTT:-10}"
  write_pinger
  mob_tunneld_start hh
  mob_tunneld_start a
  mob_tunneld_start b
  tb_ping cn "$MOB_HOA6" 2 0.1 1 >/dev/null || tb_fail "guest unreachable at home"
  local mode r
  for mode in rfc optimistic off; do
    rm -rf "$TB_DIR/ha.state" "$(mob_ha_ctl)"
    mob_ha_start --dad "$mode"
    for ((r = 1; r <= RUNS; r++)); do
      gap_move "$mode" home-a a
      gap_move "$mode" a-b b
      gap_move "$mode" b-home hh
    done
    tb_stop "$MOB_HA_PID"
  done
}

case "$part" in
  throughput) part_throughput ;;
  handover) part_handover ;;
  *) echo "usage: $0 [all|throughput|handover]" >&2; exit 2 ;;
esac
tb_log "part $part done"

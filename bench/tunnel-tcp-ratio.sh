#!/usr/bin/env bash
# TCP throughput CN -> guest through kagemusha-tunneld + kagemusha-ha versus
# the same guest at home (no tunnel), in one run on the shared mobility
# topology (WAN emulators without delay or rate limit). Prints both figures
# and their ratio; fails only if the tunnelled transfer moves nothing.
# iperf3, SECS seconds (default 5) each.
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/.." && pwd)}"
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
mob_require_daemons
tb_require_cmd iperf3 bc
tb_init
secs=${SECS:-5}
mob_topology --cn-rtt 0 --foreign-rtt 0
mob_ha_start --dad optimistic
mob_tunneld_start hh
mob_tunneld_start a

tb_spawn --name iperf3-server guest iperf3 -s -1 -p 5201
tb_wait_port guest :: 5201 10 || true
measure() {  # -> Gbit/s received
  tb_exec cn iperf3 -6 -c "$MOB_HOA6" -p 5201 -t "$secs" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))'
}
direct=$(measure)
tb_log "direct (guest at home): $direct Gbit/s"

mob_move a
mob_wait_registered a
tb_spawn --name iperf3-server2 guest iperf3 -s -1 -p 5201
sleep 0.5
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }  # clock ticks
tick=$(getconf CLK_TCK)
c0=$(cpu "${MOB_TUNNELD_PID[a]}")
h0=$(cpu "$MOB_HA_PID")
tunnelled=$(measure)
c1=$(cpu "${MOB_TUNNELD_PID[a]}")
h1=$(cpu "$MOB_HA_PID")
tb_log "CPU during the tunnelled run ($secs s): tunneld $(echo "scale=2; ($c1 - $c0) / $tick" | bc) s, kagemusha-ha $(echo "scale=2; ($h1 - $h0) / $tick" | bc) s" 
ratio=$(echo "scale=2; $tunnelled / $direct" | bc)
tb_log "tunnelled (guest at foreign host a, via HA): $tunnelled Gbit/s; ratio $ratio"
mob_tunneld a status --json | python3 -c 'import json,sys; c=json.load(sys.stdin)["sessions"][0]["counters"]; print({k: c[k] for k in ("tunnelled6","decap_delivered6","too_big","send_errors","tunnel_send_errors","truncated")})' >&2
[[ $(echo "$tunnelled > 0" | bc) == 1 ]] || tb_fail "nothing went through the tunnel"
tb_log "PASS direct=${direct} tunnelled=${tunnelled} ratio=${ratio}"

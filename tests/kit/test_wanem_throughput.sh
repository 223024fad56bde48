#!/usr/bin/env bash
# Throughput through kagemusha-wanem, measured with iperf3 (TCP, IPv6, 5 s):
# no rate limit at 0 and 20 ms RTT, and a 100 Mbit/s limit at 20 ms. Prints
# the figures (the numbers to quote) and checks only what must hold on any
# machine: the limited link stays under its limit and gets close to it, and
# the unlimited one is clearly not limited to 100 Mbit/s.
set -euo pipefail
source "${KAGEMUSHA_SOURCE:-$(dirname "$0")/../..}/tests/kit/testbed.sh"
tb_require_cmd iperf3
tb_init

measure() {  # LABEL RTT RATE -> prints Mbit/s (receiver side)
  local label=$1 sa="${1}A" sb="${1}B"
  tb_site "$sa" --no-v4
  tb_site "$sb" --no-v4
  tb_host "${label}src" "$sa"
  tb_host "${label}dst" "$sb"
  tb_wan "$sa" "$sb" --rtt "$2" --rate "$3" --name "${label}wan"
  local dst
  dst=$(tb_addr6 "${label}dst")
  tb_ping "${label}src" "$dst" 1 0.1 >/dev/null || true
  tb_spawn "${label}dst" iperf3 -s -1
  tb_wait_port "${label}dst" "$dst" 5201 || tb_fail "iperf3 server did not start"
  local json
  json=$(tb_exec "${label}src" timeout 30 iperf3 -c "$dst" -t 5 -J) || tb_fail "iperf3 ($label) failed"
  python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e6))' <<<"$json"
}

free0=$(measure t0 0 0)
free20=$(measure t20 20 0)
lim20=$(measure l20 20 100)
tb_log "iperf3 through wanem: no limit, 0 ms: $free0 Mbit/s; no limit, 20 ms: $free20 Mbit/s; --rate 100, 20 ms: $lim20 Mbit/s"
echo "RESULT wanem_tcp_mbit rtt0_unlimited=$free0 rtt20_unlimited=$free20 rtt20_rate100=$lim20"
((lim20 <= 100)) || tb_fail "rate-limited link carried $lim20 Mbit/s > 100"
((lim20 >= 60)) || tb_fail "rate-limited link carried only $lim20 Mbit/s of 100"
((free0 > 150 && free20 > 150)) || tb_fail "unlimited link looks limited: $free0 / $free20 Mbit/s"
tb_log "PASS"

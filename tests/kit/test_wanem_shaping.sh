#!/usr/bin/env bash
# kagemusha-wanem's loss and bottleneck: random loss shows up at the
# configured rate, and a UDP flood above the rate limit is cut down to the
# limit by tail drop at the bottleneck queue; tb_wan_down/up cut and restore
# the link.
set -euo pipefail
source "${KAGEMUSHA_SOURCE:-$(dirname "$0")/../..}/tests/kit/testbed.sh"
tb_require_cmd iperf3
tb_init
tb_site siteA
tb_site siteB
tb_host src siteA
tb_host dst siteB
# 10 % loss per direction on a 10 Mbit/s link with a 20 ms queue.
tb_wan siteA siteB --rtt 2 --rate 10 --loss 10 --queue-ms 20 --seed 7
dst6=$(tb_addr6 dst)

# Loss: an echo needs both directions, so about 0.9 * 0.9 = 81 % succeed.
# 400 probes: the 3-sigma band around 81 % is about 75..87 %.
out=$(tb_ping src "$dst6" 400 0.004 1 || true)
tb_log "ping with 10% loss each way: $out"
rcv=$(tb_field received "$out")
((rcv >= 290 && rcv <= 360)) || tb_fail "expected about 324 of 400 echoes (81%), got $rcv"
stats=$(tb_wan_stats)
printf '%s\n' "$stats" >&2
while read -r line; do
  rx=$(tb_field rx_frames "$line"); lost=$(tb_field drop_loss "$line")
  awk -v l="$lost" -v r="$rx" 'BEGIN { exit !(r > 300 && l / r > 0.06 && l / r < 0.14) }' ||
    tb_fail "drop_loss/rx_frames should be about 10%: $line"
done <<<"$stats"

# Bottleneck: 40 Mbit/s of UDP into a 10 Mbit/s link. The receiver sees at
# most the link rate, and the emulator counts tail drops at the queue.
tb_spawn dst iperf3 -s -1
tb_wait_port dst "$dst6" 5201 || tb_fail "iperf3 server did not start"
json=$(tb_exec src timeout 30 iperf3 -c "$dst6" -u -b 40M -l 1200 -t 3 -J) || tb_fail "iperf3 UDP run failed"
rate=$(python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum"]["bits_per_second"] / 1e6))' <<<"$json")
recv_rate=$(python3 -c '
import json, sys
j = json.load(sys.stdin)["end"]["sum"]
# bits_per_second is the sender rate for UDP; the delivered rate follows from
# the receiver-side loss count.
print("%.2f" % (j["bits_per_second"] * (1 - j["lost_percent"] / 100) / 1e6))' <<<"$json")
tb_log "UDP 40 Mbit/s into 10 Mbit/s: sent $rate Mbit/s, delivered $recv_rate Mbit/s"
awk -v r="$recv_rate" 'BEGIN { exit !(r > 5 && r <= 10.5) }' ||
  tb_fail "delivered UDP rate $recv_rate Mbit/s is not at the 10 Mbit/s bottleneck"
stats=$(tb_wan_stats)
printf '%s\n' "$stats" >&2
qdrops=$(tb_field drop_queue "$(head -n 1 <<<"$stats")")
((qdrops > 1000)) || tb_fail "expected tail drops at the bottleneck queue, got drop_queue=$qdrops"
# Cutting the link: nothing crosses while it is down, everything again after.
tb_wan_down
out=$(tb_ping src "$dst6" 5 0.05 0.5 || true)
[[ "$(tb_field received "$out")" == 0 ]] || tb_fail "echoes crossed a cut link: $out"
down=$(tb_field drop_down "$(tb_wan_stats | head -n 1)")
((down >= 5)) || tb_fail "wanem counted $down frames lost to the cut, expected >= 5"
tb_wan_up
out=$(tb_ping src "$dst6" 20 0.02 1 || true)
(($(tb_field received "$out") >= 10)) || tb_fail "link did not come back: $out"
tb_log "PASS"

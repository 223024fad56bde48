#!/usr/bin/env bash
# Two sites through kagemusha-wanem (+40 ms RTT, 100 Mbit/s): the RTT is
# added, the WAN is the only path, and TCP transfers arrive intact and no
# faster than the rate limit.
set -euo pipefail
source "${KAGEMUSHA_SOURCE:-$(dirname "$0")/../..}/tests/kit/testbed.sh"
tb_require_cmd socat md5sum
tb_init
tb_two_sites 40 100

# The first packet of each family also pays for neighbour discovery across
# the WAN (one more RTT); warm up before measuring.
tb_ping src "$TB_DST_V6" 1 0.1 >/dev/null || true
tb_ping src "$TB_DST_V4" 1 0.1 >/dev/null || true

# No echo may come back before 40 ms (the emulator never releases early), and
# the typical one must be back before 60 ms (it adds no more than asked). The
# median, not the maximum, is checked against 60 ms: on a loaded 2-core
# machine a single sample can wait for the scheduler, which says nothing
# about the emulator.
check_rtt() {  # ADDR
  local out min med rcv
  out=$(tb_ping src "$1" 10 0.05) || tb_fail "no echo reply from $1: $out"
  tb_log "ping $1: $out"
  min=$(tb_field min_ms "$out"); med=$(tb_field med_ms "$out"); rcv=$(tb_field received "$out")
  [[ "$rcv" == 10 ]] || tb_fail "lost echo replies to $1 on a loss-free WAN: $out"
  awk -v m="$min" 'BEGIN { exit !(m >= 40) }' || tb_fail "RTT to $1 below the emulated 40 ms: $out"
  awk -v m="$med" 'BEGIN { exit !(m < 60) }' || tb_fail "median RTT to $1 not below 60 ms: $out"
}
check_rtt "$TB_DST_V6"
check_rtt "$TB_DST_V4"

# The WAN is the only path: with the emulator frozen, nothing gets through.
kill -STOP "${_TB_WAN_PID[wan]}"
out=$(tb_ping src "$TB_DST_V6" 3 0.1 1 || true)
kill -CONT "${_TB_WAN_PID[wan]}"
[[ "$(tb_field received "$out")" == 0 ]] || tb_fail "src reached dst with the WAN emulator stopped: $out"
tb_ping src "$TB_DST_V6" 2 0.05 >/dev/null || tb_fail "WAN did not recover after SIGCONT"

# TCP through the 100 Mbit/s bottleneck, IPv6 then IPv4.
transfer() {  # LISTEN_SPEC CONNECT_SPEC MIB LISTEN_ADDR
  local in="$TB_DIR/in.$3" out="$TB_DIR/out.$3" t0 t1 mbit
  head -c "$(($3 << 20))" /dev/urandom >"$in"
  tb_spawn dst socat -u "$1" "OPEN:$out,creat,trunc"
  local pid=$TB_SPAWN_PID
  tb_wait_port dst "$4" 5001 || tb_fail "socat did not listen"
  t0=$(date +%s.%N)
  tb_exec src timeout 60 socat -u "OPEN:$in" "$2" || tb_fail "sending $3 MiB failed"
  tb_wait_for 30 bash -c "! kill -0 $pid" || tb_fail "receiver did not finish"
  t1=$(date +%s.%N)
  [[ "$(md5sum <"$in")" == "$(md5sum <"$out")" ]] || tb_fail "received bytes differ from sent bytes ($3 MiB)"
  mbit=$(awk -v b=$(($3 << 20)) -v a="$t0" -v z="$t1" 'BEGIN { printf "%.1f", b * 8 / (z - a) / 1e6 }')
  tb_log "transfer of $3 MiB via $2: md5 ok, $mbit Mbit/s"
  # The bottleneck carries 100 Mbit/s of Ethernet frames; TCP goodput must be
  # below it (plus a little for timer noise), or the rate limit is not applied.
  awk -v m="$mbit" 'BEGIN { exit !(m <= 101) }' || tb_fail "goodput $mbit Mbit/s exceeds the 100 Mbit/s limit"
}
transfer "TCP6-LISTEN:5001,bind=[$TB_DST_V6],reuseaddr" "TCP6:[$TB_DST_V6]:5001" 24 "$TB_DST_V6"
transfer "TCP4-LISTEN:5001,bind=$TB_DST_V4,reuseaddr" "TCP4:$TB_DST_V4:5001" 8 "$TB_DST_V4"

stats=$(tb_wan_stats)
printf '%s\n' "$stats" >&2
for f in drop_oversize tx_errors drop_overflow csum_partial; do
  while read -r line; do
    [[ "$(tb_field "$f" "$line")" == 0 ]] || tb_fail "wanem counted $f: $line"
  done <<<"$stats"
done
tb_log "PASS"

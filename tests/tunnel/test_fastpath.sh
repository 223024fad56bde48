#!/usr/bin/env bash
# The eBPF fast path (docs/tunnel-fastpath.md), end to end with the real
# daemons on the mobility topology:
#  1. Default (--fast-path auto, which loads on this kernel): a CN -> guest
#     TCP stream survives home -> A -> B -> home with equal sha256, and the
#     counters show the kernel carried it. At A and B: the HA's tc program
#     encapsulated (ha_encap_packets) and decapsulated (ha_decap_packets) the
#     stream and its ACKs, and the foreign host's session decapsulated and
#     encapsulated them (fast_path_decap_packets / fast_path_encap_packets);
#     user space carried at most a few packets (the first full-size ones,
#     answered with Packet Too Big by the HA), so nothing was forwarded twice.
#     At home the fast path stops.
#  1b. The same for the guest's IPv4 home address (DSMIPv6, IPv4-in-IPv6;
#     the sessions register it from the start): an IPv4 CN -> guest stream
#     home -> A -> B -> home with equal sha256; at A and B the HA's and the
#     session's BPF counters (fast_path_*4) carry it while the user-space
#     counters stay nearly flat; the HA answers the CN's first full-size DF
#     packets with ICMP Fragmentation Needed. Stopping the daemons removes
#     their tc filters.
#  2. --fast-path off on the HA and on A: a second stream through A is
#     carried by user space only (fast path not loaded, user counters move)
#     and arrives intact.
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}"
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
mob_require_daemons
tb_require_cmd tc
tb_init
mob_topology --cn-rtt 20 --foreign-rtt 10

# mob_tunneld_start with extra serve options.
tunneld_start() {  # HOST [SERVE OPTIONS...]
  local h=$1
  shift
  mkdir -p "$TB_DIR/tunneld-$h.state"
  tb_spawn --name "tunneld-$h" "$h" "$(mob_tunneld_bin)" serve --control "$(mob_tunneld_ctl "$h")" \
    --state-dir "$TB_DIR/tunneld-$h.state" --log-level debug "$@"
  MOB_TUNNELD_PID[$h]=$TB_SPAWN_PID
  tb_wait_unix "$(mob_tunneld_ctl "$h")" 10 || tb_fail "kagemusha-tunneld on $h did not start (see $TB_SPAWN_LOG)"
}
# fp DOC PATH...: a value from a status document's "fast_path" object.
fp() {
  python3 -c '
import json, sys
d = json.load(sys.stdin).get("fast_path", {})
for k in sys.argv[1:]:
    d = d.get(k, "") if isinstance(d, dict) else ""
print(str(d).lower() if isinstance(d, bool) else d)' "$@"
}
ha_fp() { mob_ha_status | fp "$@"; }
tunneld_fp() { local h=$1; shift; mob_tunneld "$h" status --json | fp "$@"; }
t_c() { mob_tunneld "$1" status --json | mob_json counter "$MOB_SESSION" "$2"; }
ha_c() { mob_ha_status | mob_json ha_counter "$1"; }
# Our filters (handle 0x4b474d) on a node's interface, ingress or egress.
our_filters() {  # NODE IF DIR
  tb_exec "$1" tc filter show dev "$2" "$3" 2>/dev/null | grep -c 'handle 0x4b474d' || true
}

export MOB_V4=1  # every session registers the IPv4 home address too (part 1b)
mob_ha_start --dad off
mob_tunneld_start hh
mob_tunneld_start a
mob_tunneld_start b
[[ "$(ha_fp loaded)" == true ]] || tb_fail "the HA's fast path did not load: $(mob_ha_status | fp)"
for h in a b; do
  [[ "$(tunneld_fp "$h" loaded)" == true ]] || tb_fail "tunneld's fast path did not load on $h"
done
(($(our_filters ha "$MOB_HA_IF" ingress) == 1)) || tb_fail "no fast-path filter on the HA's home link"

tb_ping cn "$MOB_HOA6" 1 0.1 2 >/dev/null || true
mob_ping_ok cn "$MOB_HOA6" 3
mob_stream_start s1 "$MOB_HOA6" 5001 3000000 40000000
mob_stream_advance 2000000

# tunneld_fast_ok HOST 6|4: the session's fast path decapsulated > 2000 and
# encapsulated > 500 packets of that family, and user space carried fewer
# than 200 of them (the totals count both paths). Sets fdec fenc tdec tenc.
tunneld_fast_ok() {
  local h=$1 f=$2
  read -r fdec fenc tdec tenc < <(mob_tunneld "$h" status --json | python3 -c 'import json, sys
c = json.load(sys.stdin)["sessions"][0]["counters"]; f = sys.argv[1]; s = "4" if f == "4" else ""
print(c["fast_path_decap%s_packets" % s], c["fast_path_encap%s_packets" % s],
      c["decap_delivered" + f], c["tunnelled" + f])' "$f")
  ((fdec > 2000 && fenc > 500)) || tb_fail "tunneld IPv$f fast path at $h: decap=$fdec encap=$fenc"
  ((tdec - fdec < 200 && tenc - fenc < 200)) ||
    tb_fail "tunneld user space carried too much IPv$f at $h: decap $tdec (fast $fdec), encap $tenc (fast $fenc)"
}

# At a foreign host: the stream moves, and the kernel carried it.
check_foreign() {  # HOST
  local h=$1 enc0 dec0 enc1 dec1 uenc udec fenc fdec tenc tdec
  enc0=$(ha_fp counters ha_encap_packets)
  dec0=$(ha_fp counters ha_decap_packets)
  uenc=$(ha_c encapsulated)
  mob_stream_advance 6000000 90
  mob_ping_ok cn "$MOB_HOA6" 3
  enc1=$(ha_fp counters ha_encap_packets)
  dec1=$(ha_fp counters ha_decap_packets)
  ((enc1 - enc0 > 2000 && dec1 - dec0 > 500)) ||
    tb_fail "HA fast path did not carry the stream at $h: encap +$((enc1 - enc0)) decap +$((dec1 - dec0))"
  # encapsulated counts both paths: user space's share is total - fast path
  # (both from one status document).
  local user_enc
  user_enc=$(mob_ha_status | python3 -c 'import json, sys; d = json.load(sys.stdin)
print(d["counters"]["encapsulated"] - d["fast_path"]["counters"]["ha_encap_packets"])')
  ((user_enc < 200)) || tb_fail "HA user space also encapsulated $user_enc packets at $h (duplicates?): $(mob_ha_status | fp)"
  tunneld_fast_ok "$h" 6
  [[ "$(mob_tunneld "$h" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sessions"][0]["fast_path"])')" == True ]] ||
    tb_fail "session at $h is not on the fast path"
  tb_log "at $h: HA fast encap=$enc1 decap=$dec1 (user-space encap $user_enc); tunneld fast decap=$fdec encap=$fenc of $tdec/$tenc; stream at $(mob_stream_bytes)"
}

mob_move a
mob_wait_registered a
(($(our_filters a "${MOB_UPLINK[a]}" ingress) == 1)) || tb_fail "no fast-path filter on a's uplink"
check_foreign a
ptb=$(ha_fp packet_too_big_sent)
((ptb >= 1)) || tb_fail "the HA sent no Packet Too Big for full-size packets (ptb=$ptb)"
mob_move b
mob_wait_registered b
# a's session is gone: so is its uplink filter.
(($(our_filters a "${MOB_UPLINK[a]}" ingress) == 0)) || tb_fail "a's uplink filter outlived the session"
check_foreign b

mob_move hh
mob_wait_deregistered 30
mob_stream_advance 3000000 90
e1=$(ha_fp counters ha_encap_packets)
mob_stream_advance 2000000 60
e2=$(ha_fp counters ha_encap_packets)
((e2 - e1 < 10)) || tb_fail "guest at home but the HA's fast path still encapsulates ($e1 -> $e2)"
mob_stream_finish 180
tb_log "part 1: $MOB_STREAM_RESULT"
errs=$(ha_fp counters ha_errors)
((errs == 0)) || tb_fail "HA fast path errors: $errs"

# ---- 1b: IPv4 guest traffic (IPv4-in-IPv6) ----------------------------------
# ha_user ENCAP|DECAP: what HA user space carried (total - fast path).
ha_user() {
  mob_ha_status | python3 -c 'import json, sys; d = json.load(sys.stdin); k = sys.argv[1]
print(d["counters"][k + "d"] - d["fast_path"]["counters"]["ha_" + k[:5] + "_packets"])' "$1"
}
check_foreign4() {  # HOST
  local h=$1 enc0 dec0 enc1 dec1 ue0 ud0 ue1 ud1 fdec fenc tdec tenc
  enc0=$(ha_fp counters ha_encap_packets)
  dec0=$(ha_fp counters ha_decap_packets)
  ue0=$(ha_user encapsulate)
  ud0=$(ha_user decapsulate)
  mob_stream_advance 6000000 90
  mob_ping_ok cn "$MOB_HOA4" 3
  enc1=$(ha_fp counters ha_encap_packets)
  dec1=$(ha_fp counters ha_decap_packets)
  ue1=$(ha_user encapsulate)
  ud1=$(ha_user decapsulate)
  ((enc1 - enc0 > 2000 && dec1 - dec0 > 500)) ||
    tb_fail "HA fast path did not carry the IPv4 stream at $h: encap +$((enc1 - enc0)) decap +$((dec1 - dec0))"
  ((ue1 - ue0 < 50 && ud1 - ud0 < 50)) ||
    tb_fail "HA user space also carried IPv4 at $h: encap +$((ue1 - ue0)) decap +$((ud1 - ud0))"
  tunneld_fast_ok "$h" 4
  tb_log "IPv4 at $h: HA fast encap +$((enc1 - enc0)) decap +$((dec1 - dec0)) (user space +$((ue1 - ue0))/+$((ud1 - ud0))); tunneld fast decap4=$fdec encap4=$fenc of $tdec/$tenc; stream at $(mob_stream_bytes)"
}
tb_ping cn "$MOB_HOA4" 1 0.1 2 >/dev/null || true
mob_ping_ok cn "$MOB_HOA4" 3
mob_stream_start s4 "$MOB_HOA4" 5003 3000000 30000000
mob_stream_advance 2000000
ptb0=$(ha_fp packet_too_big_sent)
mob_move a
mob_wait_registered a
check_foreign4 a
ptb1=$(ha_fp packet_too_big_sent)
((ptb1 > ptb0)) || tb_fail "the HA sent no Fragmentation Needed for full-size IPv4 DF packets"
mob_move b
mob_wait_registered b
check_foreign4 b
mob_move hh
mob_wait_deregistered 30
mob_stream_advance 2000000 90
mob_stream_finish 180
tb_log "part 1b: $MOB_STREAM_RESULT (IPv4)"
errs=$(ha_fp counters ha_errors)
((errs == 0)) || tb_fail "HA fast path errors after IPv4: $errs"

# Clean detach on SIGTERM.
tb_stop "$MOB_HA_PID"
(($(our_filters ha "$MOB_HA_IF" ingress) == 0)) || tb_fail "the HA left its tc filter behind"

# ---- 2: --fast-path off -------------------------------------------------------
mob_ha_start --dad off --fast-path off
tb_stop "${MOB_TUNNELD_PID[a]}"
tunneld_start a --fast-path off
[[ "$(ha_fp loaded)" == false && "$(ha_fp mode)" == off ]] || tb_fail "HA fast path not off: $(mob_ha_status | fp)"
[[ "$(tunneld_fp a loaded)" == false ]] || tb_fail "tunneld fast path not off on a"
mob_stream_start s2 "$MOB_HOA6" 5002 2000000 8000000
mob_stream_advance 1000000
mob_move a
mob_wait_registered a
(($(our_filters a "${MOB_UPLINK[a]}" ingress) == 0)) || tb_fail "filter on a's uplink with --fast-path off"
mob_stream_advance 3000000 90
mob_ping_ok cn "$MOB_HOA6" 3
enc=$(ha_c encapsulated)
del=$(t_c a decap_delivered6)
((enc > 1000 && del > 1000)) || tb_fail "user-space path did not carry the stream: HA encapsulated=$enc, a decap_delivered6=$del"
mob_move hh
mob_wait_deregistered 30
mob_stream_finish 180
tb_log "part 2: $MOB_STREAM_RESULT"
for p in "$MOB_HA_PID" "${MOB_TUNNELD_PID[hh]}" "${MOB_TUNNELD_PID[a]}" "${MOB_TUNNELD_PID[b]}"; do
  tb_pid_alive "$p" || tb_fail "a daemon died (pid $p)"
done
tb_log "PASS: fast path carried home -> a -> b -> home; --fast-path off carried home -> a -> home"

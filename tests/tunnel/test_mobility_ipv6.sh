#!/usr/bin/env bash
# Issue 3, end to end over IPv6: a TCP stream from the CN to the guest's home
# address survives home -> foreign A -> foreign B -> home with no restart of
# the stream (sha256 of the bytes received equals the bytes sent), and the CN
# pings the home address at every stop. Each move is what a migration does:
# detach the guest's link, `kagemusha-tunneld deactivate` on the old host,
# attach the link to the new host's VM bridge, `activate` there with its
# care-of address (or `home` on the home host). The home agent is
# kagemusha-ha with RFC 4285 authentication and RFC DAD.
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}"
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
mob_require_daemons
tb_init
mob_topology --cn-rtt 20 --foreign-rtt 10
mob_ha_start --dad rfc
mob_tunneld_start hh
mob_tunneld_start a
mob_tunneld_start b

tb_ping cn "$MOB_HOA6" 1 0.1 2 >/dev/null || true
mob_ping_ok cn "$MOB_HOA6" 3
# 2 MB/s, at least 40 MB; the sender keeps going until every move is done.
mob_stream_start s6 "$MOB_HOA6" 5001 2000000 40000000
mob_stream_advance 2000000

check_stop() {  # HOST: the stream flows and the CN pings the guest there
  mob_stream_advance 3000000 90
  mob_ping_ok cn "$MOB_HOA6" 5
  tb_log "at $1: stream at $(mob_stream_bytes) bytes"
}

mob_move a
mob_wait_registered a
check_stop a
enc_a=$(mob_ha_status | mob_json ha_counter encapsulated)
dec_a=$(mob_ha_status | mob_json ha_counter decapsulated)
((enc_a > 100 && dec_a > 100)) || tb_fail "HA did not carry the stream at a: encapsulated=$enc_a decapsulated=$dec_a"
tun=$(mob_tunneld a status --json | mob_json counter "$MOB_SESSION" tunnelled6)
del=$(mob_tunneld a status --json | mob_json counter "$MOB_SESSION" decap_delivered6)
((tun > 100 && del > 100)) || tb_fail "tunneld at a did not carry the stream: tunnelled6=$tun decap_delivered6=$del"

mob_move b
mob_wait_registered b
check_stop b
[[ "$(mob_ha_status | mob_json ha_coa "$MOB_HOA6")" == "${MOB_COA[b]}" ]] || tb_fail "binding not at b"
del=$(mob_tunneld b status --json | mob_json counter "$MOB_SESSION" decap_delivered6)
((del > 100)) || tb_fail "tunneld at b delivered nothing: $del"

mob_move hh
mob_wait_deregistered 30
check_stop hh
# At home the traffic no longer goes through the HA.
enc1=$(mob_ha_status | mob_json ha_counter encapsulated)
mob_stream_advance 2000000 60
enc2=$(mob_ha_status | mob_json ha_counter encapsulated)
((enc2 - enc1 < 10)) || tb_fail "guest at home but the HA still encapsulates ($enc1 -> $enc2)"

mob_stream_finish 180
bytes=${MOB_STREAM_RESULT#bytes=}
bytes=${bytes%% *}
((bytes >= 40000000)) || tb_fail "stream too short: $bytes"
dereg=$(mob_ha_status | mob_json ha_counter deregistered)
((dereg >= 1)) || tb_fail "HA counted no deregistration"
for p in "$MOB_HA_PID" "${MOB_TUNNELD_PID[hh]}" "${MOB_TUNNELD_PID[a]}" "${MOB_TUNNELD_PID[b]}"; do
  tb_pid_alive "$p" || tb_fail "a daemon died (pid $p)"
done
tb_log "PASS: $MOB_STREAM_RESULT across home -> a -> b -> home"

#!/usr/bin/env bash
# Issue 3 for an IPv4 guest (DSMIPv6, RFC 5555): the session registers the
# IPv4 home address too (--hoa4; the HA serves --home-prefix4), and a TCP
# stream from the CN to the guest's IPv4 home address survives
# home -> foreign A -> foreign B -> home with no restart (sha256 equal), with
# IPv4 pings at every stop. The IPv4 traffic is carried IPv4-in-IPv6 between
# the HA and the care-of address; the HA proxies ARP for the away guest.
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}"
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
mob_require_daemons
tb_init
mob_topology --cn-rtt 20 --foreign-rtt 10
export MOB_V4=1
mob_ha_start --dad rfc
mob_tunneld_start hh
mob_tunneld_start a
mob_tunneld_start b

tb_ping cn "$MOB_HOA4" 1 0.1 2 >/dev/null || true
mob_ping_ok cn "$MOB_HOA4" 3
mob_stream_start s4 "$MOB_HOA4" 5002 2000000 40000000
mob_stream_advance 2000000

check_stop() {  # HOST
  mob_stream_advance 3000000 90
  mob_ping_ok cn "$MOB_HOA4" 5
  tb_log "at $1: stream at $(mob_stream_bytes) bytes"
}

mob_move a
mob_wait_registered a
v4=$(mob_ha_status | mob_json ha_field "$MOB_HOA6" home_address4)
[[ "$v4" == "$MOB_HOA4" ]] || tb_fail "HA binding has IPv4 home address '$v4', want $MOB_HOA4: $(mob_ha_status)"
check_stop a
t4=$(mob_tunneld a status --json | mob_json counter "$MOB_SESSION" tunnelled4)
d4=$(mob_tunneld a status --json | mob_json counter "$MOB_SESSION" decap_delivered4)
((t4 > 100 && d4 > 100)) || tb_fail "tunneld at a did not carry the IPv4 stream: tunnelled4=$t4 decap_delivered4=$d4"
arp=$(mob_ha_status | mob_json ha_counter proxy_arp_sent)
tb_log "HA proxy_arp_sent=$arp"

mob_move b
mob_wait_registered b
check_stop b
d4=$(mob_tunneld b status --json | mob_json counter "$MOB_SESSION" decap_delivered4)
((d4 > 100)) || tb_fail "tunneld at b delivered no IPv4: $d4"

mob_move hh
mob_wait_deregistered 30
check_stop hh

mob_stream_finish 180
bytes=${MOB_STREAM_RESULT#bytes=}
bytes=${bytes%% *}
((bytes >= 40000000)) || tb_fail "stream too short: $bytes"
for p in "$MOB_HA_PID" "${MOB_TUNNELD_PID[hh]}" "${MOB_TUNNELD_PID[a]}" "${MOB_TUNNELD_PID[b]}"; do
  tb_pid_alive "$p" || tb_fail "a daemon died (pid $p)"
done
tb_log "PASS: $MOB_STREAM_RESULT (IPv4) across home -> a -> b -> home"

#!/usr/bin/env bash
# The building blocks beyond tb_two_sites: three sites joined pairwise by two
# WANs (the home/foreign/correspondent shape of the tunnel tests), plain
# tb_link point-to-point links with addresses, interface names carrying the
# run id, tb_spawn logs, and the wait helpers (success and timeout).
set -euo pipefail
source "${KAGEMUSHA_SOURCE:-$(dirname "$0")/../..}/tests/kit/testbed.sh"
tb_require_cmd socat
tb_init

# home <-> foreign (30 ms) and home <-> cn (10 ms); foreign and cn have no
# direct WAN, so foreign cannot reach cn (no transit routing through home).
tb_site home
tb_site foreign
tb_site cn
tb_host ha home --forwarding
tb_host mn foreign
tb_host cnode cn
tb_wan home foreign --rtt 30 --name wanHF
tb_wan home cn --rtt 10 --name wanHC

[[ "$(tb_addr6 ha)" == 2001:db8:a::10 && "$(tb_addr4 ha)" == 192.0.2.10 ]] || tb_fail "default addresses of ha: $(tb_addr6 ha) $(tb_addr4 ha)"
[[ "$(tb_addr6 mn)" == 2001:db8:b::10 && "$(tb_addr6 cnode)" == 2001:db8:c::10 ]] || tb_fail "default site prefixes"
[[ "$(tb_exec ha cat /proc/sys/net/ipv6/conf/all/forwarding)" == 1 ]] || tb_fail "--forwarding not applied"
[[ "$(tb_exec mn cat /proc/sys/net/ipv6/conf/all/forwarding)" == 0 ]] || tb_fail "hosts must not forward by default"

rtt_between() {  # FROM ADDR LOW HIGH
  tb_ping "$1" "$2" 1 0.1 >/dev/null || true  # neighbour discovery
  local out min
  out=$(tb_ping "$1" "$2" 5 0.05) || tb_fail "$1 cannot reach $2"
  min=$(tb_field min_ms "$out")
  awk -v m="$min" -v lo="$3" -v hi="$4" 'BEGIN { exit !(m >= lo && m < hi) }' ||
    tb_fail "RTT $1 -> $2 should be in [$3, $4) ms: $out"
  tb_log "$1 -> $2: $out"
}
rtt_between mn "$(tb_addr6 ha)" 30 50
rtt_between cnode "$(tb_addr4 ha)" 10 30
out=$(tb_ping mn "$(tb_addr6 cnode)" 2 0.1 0.5 || true)
[[ "$(tb_field received "$out")" == 0 ]] || tb_fail "foreign reached cn without a WAN between them: $out"

# 802.1Q across the emulator: a tagged frame arrives at a packet socket with
# its tag moved into metadata; kagemusha-wanem must put it back in the frame.
# (This kernel has no 8021q module, so raw frames stand in for VLAN devices.)
ifh=$(tb_if home wanHC)
ifc=$(tb_if cn wanHC)
# (tb_spawn gives its command /dev/null as stdin, so the script goes to a file.)
cat >"$TB_DIR/vlan_rx.py" <<'PY'
import socket, struct, sys, time
SOL_PACKET, PACKET_AUXDATA, TP_STATUS_VLAN_VALID = 263, 8, 0x10
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
s.bind((sys.argv[1], 0))
s.settimeout(0.2)
print("listening", flush=True)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(20))
    except socket.timeout:
        continue
    if b"kagemusha-vlan-probe" not in data:
        continue
    tci = None
    if data[12:14] == b"\x81\x00":
        tci = struct.unpack("!H", data[14:16])[0]
    for level, kind, blob in anc:
        if level == SOL_PACKET and kind == PACKET_AUXDATA:
            status, _, _, _, _, vtci, _ = struct.unpack("IIIHHHH", blob[:20])
            if status & TP_STATUS_VLAN_VALID:
                tci = vtci
    print("probe tci=%s" % tci, flush=True)
    break
PY
tb_spawn --name vlan-rx cn python3 "$TB_DIR/vlan_rx.py" "$ifc"
tb_wait_log "$TB_SPAWN_LOG" '^listening' 5 || tb_fail "VLAN receiver did not start"
vlan_log=$TB_SPAWN_LOG
tb_exec home python3 - "$ifh" <<'PY'
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!HHH", 0x8100, 42, 0x88B5) + b"kagemusha-vlan-probe"
for _ in range(3):
    s.send(frame.ljust(60, b"\0"))
PY
tb_wait_log "$vlan_log" '^probe tci=' 10 || tb_fail "the VLAN-tagged probe did not cross the WAN"
grep -q '^probe tci=42$' "$vlan_log" || tb_fail "VLAN tag lost across the WAN: $(grep '^probe' "$vlan_log")"
vlan=$(tb_wan_stats wanHC | head -n 1)
(($(tb_field vlan_restored "$vlan") > 0)) || tb_fail "wanem restored no VLAN tag: $vlan"
tb_log "802.1Q tag 42 crossed the WAN"

# kagemusha-wanem's command line and shutdown: bad options exit 2, a missing
# interface exits 1, SIGTERM stops it cleanly with final stats.
wanem=$(tb_wanem_bin)
rc=0; "$wanem" --if-a x >/dev/null 2>&1 || rc=$?
((rc == 2)) || tb_fail "wanem with --if-b missing should exit 2, got $rc"
rc=0; "$wanem" --if-a a --if-b b --loss 101 >/dev/null 2>&1 || rc=$?
((rc == 2)) || tb_fail "wanem with --loss 101 should exit 2, got $rc"
rc=0; err=$(tb_exec wanHF "$wanem" --if-a nosuch0 --if-b nosuch1 2>&1) || rc=$?
((rc == 1)) && [[ "$err" == *nosuch0* ]] || tb_fail "wanem on a missing interface: rc=$rc, '$err'"


for node in ha mn cnode home foreign cn wanHF wanHC; do
  while read -r ifname; do
    [[ "$ifname" == lo || "$ifname" == "$TB_ID"* ]] || tb_fail "interface '$ifname' in $node lacks the run id"
    ((${#ifname} <= 15)) || tb_fail "interface name too long: $ifname"
  done < <(tb_exec "$node" ip -o link | awk -F': ' '{print $2}' | sed 's/@.*//')
done

# tb_link: a point-to-point link between two extra nodes.
tb_host p1
tb_host p2
tb_link p1 p2 --addr-a fd00:1::1/64 --addr-b fd00:1::2/64 --addr-a 203.0.113.1/30 --addr-b 203.0.113.2/30
[[ "$(tb_if p1 p2)" == "$TB_LINK_IF_A" && "$(tb_if p2 p1)" == "$TB_LINK_IF_B" ]] || tb_fail "tb_if does not match tb_link"
tb_ping p1 fd00:1::2 2 0.05 >/dev/null || tb_fail "no IPv6 over tb_link"
tb_ping p2 203.0.113.1 2 0.05 >/dev/null || tb_fail "no IPv4 over tb_link"
# A second link between the same nodes gets a distinct name (tb_if then
# names the newest one).
first=$(tb_if p1 p2)
tb_link p1 p2
[[ "$TB_LINK_IF_A" != "$first" ]] || tb_fail "second p1-p2 link reused the name $first"
[[ "$(tb_if p1 p2)" == "$TB_LINK_IF_A" ]] || tb_fail "tb_if should name the newest link"
tb_exec p1 ip link show "$TB_LINK_IF_A" >/dev/null || tb_fail "second link missing"
(( $(tb_exec p1 ip -o link | grep -c "$TB_ID") == 2 )) || tb_fail "p1 should have two links"

# Waits: a TCP listener, a Unix socket, a log line; and timeouts that fail.
tb_spawn --name echo p2 socat TCP6-LISTEN:7007,bind=[fd00:1::2],fork,reuseaddr EXEC:cat
tb_wait_port p2 fd00:1::2 7007 5 || tb_fail "tb_wait_port missed the listener"
[[ "$(echo hello | tb_exec p1 timeout 5 socat - TCP6:[fd00:1::2]:7007)" == hello ]] || tb_fail "echo over tb_link"
t0=$SECONDS
if tb_wait_port p2 fd00:1::2 7008 1 2>/dev/null; then tb_fail "tb_wait_port succeeded on a closed port"; fi
((SECONDS - t0 <= 3)) || tb_fail "tb_wait_port ignored its timeout"
sock="$TB_DIR/api.sock"
if tb_wait_unix "$sock" 1 2>/dev/null; then tb_fail "tb_wait_unix succeeded without a socket"; fi
tb_spawn - socat UNIX-LISTEN:"$sock",fork EXEC:cat
tb_wait_unix "$sock" 5 || tb_fail "tb_wait_unix missed the socket"
tb_spawn --name talker - sh -c 'echo starting; sleep 0.3; echo "ready to serve"; sleep 30'
tb_wait_log "$TB_SPAWN_LOG" '^ready to serve$' 5 || tb_fail "tb_wait_log missed the line"
pid=$TB_SPAWN_PID
tb_stop "$pid" 2
! tb_pid_alive "$pid" || tb_fail "tb_stop left $pid running"
pid=${_TB_WAN_PID[wanHF]}
tb_stop "$pid" 5
grep -q '^wanem stats .* exit: ' "${_TB_WAN_LOG[wanHF]}" || tb_fail "wanem printed no final stats on SIGTERM"
tb_log "PASS"

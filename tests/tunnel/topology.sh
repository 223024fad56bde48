# shellcheck shell=bash
# shellcheck disable=SC2034  # MOB_* variables are for the scripts that source this file
# topology.sh: the issue-3 mobility topology, built with the test-bed kit
# (tests/kit/testbed.sh), plus the tunnel-specific helpers the mobility tests
# and bench/tunnel.sh share. Source it after the kit and after tb_init:
#
#   source "$KAGEMUSHA_SOURCE/tests/kit/testbed.sh"
#   source "$KAGEMUSHA_SOURCE/tests/tunnel/topology.sh"
#   tb_init
#   mob_topology [--cn-rtt MS] [--foreign-rtt MS|direct] [--rate MBIT]
#
#                        wanC (cn-rtt)
#   cn [2001:db8:c::10, 203.0.113.10] ── cnsite ══════════ home (router R) ══ wanA ══ siteA ── a [2001:db8:a::10] ─ vmbr (VM bridge)
#                                                        │ home link (bridge)  ══ wanB ══ siteB ── b [2001:db8:b::10] ─ vmbr
#                                   R: 2001:db8:1::1, fe80::1, 192.0.2.1, fixed MAC $MOB_ROUTER_MAC
#                                                        ├── ha  [2001:db8:1::2, 192.0.2.2]   (home agent)
#                                                        └── hh  vmbr [2001:db8:1::3, 192.0.2.3] (home host: VM bridge ON the home link)
#
#   guest: one veth (MAC $MOB_GUEST_MAC, 2001:db8:1::100/64, 192.0.2.100/24,
#          default via fe80::1 / 192.0.2.1); its peer end sits in the VM
#          bridge of hh, a or b (mob_guest_detach / mob_guest_attach).
#
# R routes between the home link, the foreign sites and the CN (the kit's
# tb_wan routes); the CN and the foreign sites have routes to the home
# prefixes only, so the CN can reach a guest away from home only through the
# home link (where the HA proxies ND) and the tunnel. With --foreign-rtt
# direct the foreign hosts hang off R on plain veths (no emulator: the bench
# uses this so kagemusha-wanem's CPU does not dominate the figures).
#
# Exported: MOB_HOA6 MOB_HOA4 MOB_GUEST_MAC MOB_ROUTER_MAC MOB_ROUTER_LL
# MOB_ROUTER_GLOBAL MOB_ROUTER_V4 MOB_HOME_PREFIX MOB_HOME_PREFIX4 MOB_HA6
# MOB_HA4 MOB_HA_IF MOB_CN6 MOB_CN4 MOB_GUEST_IF MOB_GUEST_PEER MOB_GUEST_AT,
# and per host h in hh a b: MOB_COA[h] MOB_UPLINK[h] MOB_VMBR[h].

MOB_HOA6=2001:db8:1::100
MOB_HOA4=192.0.2.100
MOB_GUEST_MAC=02:4b:4d:00:01:00
MOB_ROUTER_MAC=02:4b:4d:00:00:01
MOB_ROUTER_LL=fe80::1
MOB_ROUTER_GLOBAL=2001:db8:1::1
MOB_ROUTER_V4=192.0.2.1
MOB_HOME_PREFIX=2001:db8:1::/64
MOB_HOME_PREFIX4=192.0.2.0/24
MOB_HA6=2001:db8:1::2
MOB_HA4=192.0.2.2
MOB_CN6=2001:db8:c::10
MOB_CN4=203.0.113.10
MOB_SESSION=guest1
MOB_SPI=256
MOB_HA_IF=""
MOB_GUEST_IF=""
MOB_GUEST_PEER=""
MOB_GUEST_AT=""
declare -gA MOB_COA=()
declare -gA MOB_UPLINK=()
declare -gA MOB_VMBR=()
declare -gA MOB_TUNNELD_PID=()
MOB_HA_PID=""
MOB_KEY_FILE=""

# A VM bridge inside a host namespace (no kit helper makes bridges in hosts).
_mob_vmbridge() {  # HOST MAC -> prints the bridge name
  local br="${TB_ID}-vmbr"
  tb_exec "$1" ip link add "$br" address "$2" type bridge forward_delay 0 mcast_snooping 0 ||
    tb_fail "VM bridge in $1"
  tb_exec "$1" ip link set "$br" up
  # Bridged frames must not run the host's IP netfilter hooks (br_netfilter
  # is active here, bridge-nf-call-* = 1 in every new namespace): a VM
  # bridge forwards, it does not filter, as libvirt recommends. Without this
  # kagemusha-tunneld's own prerouting rule (drop RH2 so the kernel sends no
  # Parameter Problem) drops the BA on a bridged uplink before its packet
  # socket on the bridge sees it (reported to the tunneld owner).
  if [[ "${MOB_BRIDGE_NF:-0}" != 1 ]]; then
    tb_exec "$1" sh -c 'for f in iptables ip6tables arptables; do
      [ -e /proc/sys/net/bridge/bridge-nf-call-$f ] && echo 0 > /proc/sys/net/bridge/bridge-nf-call-$f; done; true'
  fi
  printf '%s\n' "$br"
}

# A host on the home link whose own bridge holds its home-link veth (and its
# addresses): hh, and the bench's VXLAN gateway. Sets MOB_BRIDGED_BR.
mob_bridged_host() {  # NAME MAC ADDR6 ADDR4
  tb_host "$1"
  tb_bridge_attach home "$1"
  local up=$TB_LINK_IF_A br
  br=$(_mob_vmbridge "$1" "$2")
  tb_exec "$1" ip link set "$up" master "$br"
  tb_addr "$1" "$br" "$3/64"
  tb_addr "$1" "$br" "$4/24"
  tb_exec "$1" ip -6 route add default via "$MOB_ROUTER_GLOBAL" dev "$br"
  tb_exec "$1" ip -4 route add default via "$MOB_ROUTER_V4" dev "$br"
  MOB_BRIDGED_BR=$br
}

mob_topology() {
  local cn_rtt=20 foreign_rtt=10 rate=0
  while (($#)); do
    case "$1" in
      --cn-rtt) cn_rtt=$2; shift 2 ;;
      --foreign-rtt) foreign_rtt=$2; shift 2 ;;
      --rate) rate=$2; shift 2 ;;
      *) tb_fail "mob_topology: unknown option '$1'" ;;
    esac
  done
  # Home site: R is the kit's site router; its bridge is the home link.
  tb_site home --v6 2001:db8:1::/64 --v4 192.0.2.0/24
  local hbr
  hbr=$(tb_if home bridge)
  # The guest's default router: fixed MAC and fe80::1, as a real home router
  # would be configured (the foreign hosts impersonate exactly this).
  tb_exec home ip link set "$hbr" address "$MOB_ROUTER_MAC"
  tb_addr home "$hbr" "$MOB_ROUTER_LL/64"
  tb_host ha home --v6 "$MOB_HA6/64" --v4 "$MOB_HA4/24"
  MOB_HA_IF=$(tb_if ha home)

  # Home host: its VM bridge is itself a port of the home link.
  mob_bridged_host hh 02:4b:4d:00:03:01 2001:db8:1::3 192.0.2.3
  MOB_VMBR[hh]=$MOB_BRIDGED_BR
  MOB_COA[hh]=2001:db8:1::3
  MOB_UPLINK[hh]=${MOB_VMBR[hh]}

  # Correspondent behind the WAN emulator.
  if [[ "$cn_rtt" == direct ]]; then
    tb_host cn
    tb_link home cn --addr-a 2001:db8:c::1/64 --addr-a 203.0.113.1/25 --addr-b "$MOB_CN6/64" --addr-b "$MOB_CN4/25"
    tb_exec cn ip -6 route add default via 2001:db8:c::1 dev "$TB_LINK_IF_B"
    tb_exec cn ip -4 route add default via 203.0.113.1 dev "$TB_LINK_IF_B"
  else
    tb_site cnsite --v6 2001:db8:c::/64 --v4 203.0.113.0/25
    tb_host cn cnsite --v6 "$MOB_CN6/64" --v4 "$MOB_CN4/25"
    tb_wan home cnsite --rtt "$cn_rtt" --rate "$rate" --name wanC
  fi

  # Foreign sites A and B.
  local h p n=0
  for h in a b; do
    n=$((n + 1))
    p="2001:db8:$h"
    if [[ "$foreign_rtt" == direct ]]; then
      tb_host "$h"
      tb_link home "$h" --addr-a "$p::1/64" --addr-b "$p::10/64"
      MOB_UPLINK[$h]=$TB_LINK_IF_B
      tb_exec "$h" ip -6 route add default via "$p::1" dev "${MOB_UPLINK[$h]}"
    else
      tb_site "site${h^^}" --v6 "$p::/64" --no-v4
      tb_host "$h" "site${h^^}" --v6 "$p::10/64"
      MOB_UPLINK[$h]=$(tb_if "$h" "site${h^^}")
      tb_wan home "site${h^^}" --rtt "$foreign_rtt" --rate "$rate" --name "wan${h^^}"
    fi
    MOB_COA[$h]="$p::10"
    MOB_VMBR[$h]=$(_mob_vmbridge "$h" "02:4b:4d:00:0$((3 + n)):01")
  done

  # The guest, at home to begin with.
  tb_host guest
  tb_link guest hh
  MOB_GUEST_IF=$TB_LINK_IF_A
  MOB_GUEST_PEER=$TB_LINK_IF_B
  tb_exec guest ip link set "$MOB_GUEST_IF" down
  tb_exec guest ip link set "$MOB_GUEST_IF" address "$MOB_GUEST_MAC"
  tb_exec guest ip link set "$MOB_GUEST_IF" up
  tb_addr guest "$MOB_GUEST_IF" "$MOB_HOA6/64"
  tb_addr guest "$MOB_GUEST_IF" "$MOB_HOA4/24"
  tb_exec guest ip -6 route add default via "$MOB_ROUTER_LL" dev "$MOB_GUEST_IF"
  tb_exec guest ip -4 route add default via "$MOB_ROUTER_V4" dev "$MOB_GUEST_IF"
  tb_exec hh ip link set "$MOB_GUEST_PEER" master "${MOB_VMBR[hh]}"
  MOB_GUEST_AT=hh
  MOB_KEY_FILE="$TB_DIR/mnha.key"
  # Raw bytes, not hex text: kagemusha-ha decodes a hex-text key file while
  # kagemusha-tunneld takes the file's bytes as they are, so a hex file
  # gives two different keys (reported). A leading 0xff keeps it non-hex.
  (umask 077; { printf '\377'; head -c 31 /dev/urandom; } >"$MOB_KEY_FILE")
  export MOB_HOA6 MOB_HOA4 MOB_GUEST_MAC MOB_ROUTER_MAC MOB_ROUTER_LL MOB_ROUTER_GLOBAL \
    MOB_ROUTER_V4 MOB_HOME_PREFIX MOB_HOME_PREFIX4 MOB_HA6 MOB_HA4 MOB_HA_IF MOB_CN6 MOB_CN4 \
    MOB_GUEST_IF MOB_GUEST_PEER MOB_GUEST_AT
  tb_log "mobility topology: guest $MOB_HOA6/$MOB_HOA4 at hh; HA $MOB_HA6 on $MOB_HA_IF; CoAs hh=${MOB_COA[hh]} a=${MOB_COA[a]} b=${MOB_COA[b]}; cn $MOB_CN6 (rtt $cn_rtt ms), foreign rtt $foreign_rtt"
}

# ---------------------------------------------------------------- the guest

# Takes the guest's link out of its current VM bridge and down (the VM is
# paused / on the wire). The handover benchmark times everything from here
# on, so the link moves use `ip -n` (netlink in the namespace, a few ms) and
# not `ip netns exec`, whose mount-namespace set-up costs 15-20 ms a call
# here and has no counterpart in a real migration (the destination QEMU's
# TAP sits on its bridge before the VM resumes).
mob_guest_detach() {
  local at=$MOB_GUEST_AT
  [[ -n "$at" ]] || tb_fail "guest is not attached"
  ip -n "$(tb_ns "$at")" link set "$MOB_GUEST_PEER" nomaster down ||
    tb_fail "detaching the guest's link from $at"
  MOB_GUEST_AT=""
  _MOB_GUEST_LAST=$at
}

# Moves the guest's link into HOST's VM bridge and up (the VM resumed there).
mob_guest_attach() {  # HOST
  local to=$1 from=${_MOB_GUEST_LAST:-}
  [[ -z "$MOB_GUEST_AT" ]] || tb_fail "detach the guest first"
  [[ -n "$from" ]] || tb_fail "guest link location unknown"
  if [[ "$from" != "$to" ]]; then
    ip -n "$(tb_ns "$from")" link set "$MOB_GUEST_PEER" netns "$(tb_ns "$to")" ||
      tb_fail "moving the guest's link from $from to $to"
  fi
  ip -n "$(tb_ns "$to")" link set "$MOB_GUEST_PEER" master "${MOB_VMBR[$to]}" up ||
    tb_fail "attaching the guest's link to $to"
  MOB_GUEST_AT=$to
  export MOB_GUEST_AT
}

# Detach and attach in one go, with one process fewer: moving the link to
# another namespace takes it out of its bridge and down by itself (the
# kernel closes and unregisters it there), so that move, done by
# mob_guest_attach, is the detach.
mob_guest_move() {  # HOST
  local to=$1 from=$MOB_GUEST_AT
  [[ -n "$from" ]] || tb_fail "guest is not attached"
  if [[ "$from" == "$to" ]]; then
    mob_guest_detach
  else
    MOB_GUEST_AT=""
    _MOB_GUEST_LAST=$from
  fi
  mob_guest_attach "$to"
}

# ---------------------------------------------------------------- daemons

mob_tunneld_bin() { printf '%s\n' "${KAGEMUSHA_TUNNELD:-${KAGEMUSHA_BUILD:-}/cli/kagemusha-tunneld}"; }
mob_ha_bin() { printf '%s\n' "${KAGEMUSHA_HA:-${KAGEMUSHA_BUILD:-}/cli/kagemusha-ha}"; }

# Skips (exit 77) unless both daemons are built.
mob_require_daemons() {
  [[ -n "${KAGEMUSHA_BUILD:-}" || -n "${KAGEMUSHA_TUNNELD:-}" ]] || tb_skip "KAGEMUSHA_BUILD is not set"
  [[ -x "$(mob_tunneld_bin)" ]] || tb_skip "kagemusha-tunneld is not built ($(mob_tunneld_bin))"
  [[ -x "$(mob_ha_bin)" ]] || tb_skip "kagemusha-ha is not built ($(mob_ha_bin))"
}

mob_tunneld_ctl() { printf '%s\n' "$TB_DIR/tunneld-$1.sock"; }
mob_ha_ctl() { printf '%s\n' "$TB_DIR/ha.sock"; }

# The MN-HA key shared by the HA and the hosts (0600, hex).
# (Created by mob_topology, not here: this is called in $(...) subshells.)
mob_key() { printf '%s\n' "$MOB_KEY_FILE"; }

# mob_ha_start [--dad rfc|optimistic|off] [EXTRA ARGS...]
mob_ha_start() {
  local dad=rfc
  if [[ "${1:-}" == --dad ]]; then dad=$2; shift 2; fi
  mkdir -p "$TB_DIR/ha.state"
  tb_spawn --name ha ha "$(mob_ha_bin)" serve --home-link "$MOB_HA_IF" --address "$MOB_HA6" \
    --home-prefix "$MOB_HOME_PREFIX" --home-prefix4 "$MOB_HOME_PREFIX4" --address4 "$MOB_HA4" \
    --allow "$MOB_HOA6" --key "[$MOB_HOA6]:$MOB_SPI:$(mob_key)" --dad "$dad" \
    --state-dir "$TB_DIR/ha.state" --control "$(mob_ha_ctl)" "$@"
  MOB_HA_PID=$TB_SPAWN_PID
  tb_wait_unix "$(mob_ha_ctl)" 10 || tb_fail "kagemusha-ha did not open its control socket (see $TB_SPAWN_LOG)"
}

mob_ha_status() { tb_exec ha "$(mob_ha_bin)" status --control "$(mob_ha_ctl)" --json; }

mob_tunneld_start() {  # HOST
  local h=$1
  mkdir -p "$TB_DIR/tunneld-$h.state"
  tb_spawn --name "tunneld-$h" "$h" "$(mob_tunneld_bin)" serve --control "$(mob_tunneld_ctl "$h")" \
    --state-dir "$TB_DIR/tunneld-$h.state" --log-level debug
  MOB_TUNNELD_PID[$h]=$TB_SPAWN_PID
  tb_wait_unix "$(mob_tunneld_ctl "$h")" 10 || tb_fail "kagemusha-tunneld on $h did not open its control socket (see $TB_SPAWN_LOG)"
}

# Runs the CLI client against HOST's daemon. The client only talks to the
# control socket (a file), so it runs where the script runs, without the
# cost of `ip netns exec` (see mob_guest_detach).
mob_tunneld() {  # HOST SUBCOMMAND ARGS...
  local h=$1 sub=$2
  shift 2
  "$(mob_tunneld_bin)" "$sub" --control "$(mob_tunneld_ctl "$h")" "$@"
}

# The session options every activate/home carries (MOB_V4=1 adds the IPv4
# home address; MOB_MTU sets --mtu).
mob_session_args() {  # HOST
  local h=$1
  local -a a=(--name "$MOB_SESSION" --guest-mac "$MOB_GUEST_MAC" --hoa "$MOB_HOA6"
    --home-prefix "$MOB_HOME_PREFIX" --router-mac "$MOB_ROUTER_MAC" --router-ll "$MOB_ROUTER_LL"
    --router-global "$MOB_ROUTER_GLOBAL" --router-v4 "$MOB_ROUTER_V4" --ha "$MOB_HA6"
    --coa "${MOB_COA[$h]}" --uplink "${MOB_UPLINK[$h]}" --bridge "${MOB_VMBR[$h]}"
    --spi "$MOB_SPI" --key-file "$(mob_key)")
  [[ "${MOB_V4:-0}" != 1 ]] || a+=(--hoa4 "$MOB_HOA4")
  [[ -z "${MOB_MTU:-}" ]] || a+=(--mtu "$MOB_MTU")
  printf '%s\n' "${a[@]}"
}

mob_activate() {  # HOST
  local -a a
  mapfile -t a < <(mob_session_args "$1")
  mob_tunneld "$1" activate "${a[@]}" >"$TB_DIR/activate-$1.out" 2>&1 ||
    tb_fail "tunneld activate on $1 failed: $(cat "$TB_DIR/activate-$1.out")"
}

mob_home() {  # HOST (the home host)
  local -a a
  mapfile -t a < <(mob_session_args "$1")
  mob_tunneld "$1" home "${a[@]}" >"$TB_DIR/home-$1.out" 2>&1 ||
    tb_fail "tunneld home on $1 failed: $(cat "$TB_DIR/home-$1.out")"
}

mob_deactivate() {  # HOST
  mob_tunneld "$1" deactivate --name "$MOB_SESSION" >"$TB_DIR/deactivate-$1.out" 2>&1 ||
    tb_fail "tunneld deactivate on $1 failed: $(cat "$TB_DIR/deactivate-$1.out")"
}

# JSON queries on a status document (stdin). Prints the value or nothing.
#   session_state NAME | binding_state NAME HOA | ha_coa HOA | counter NAME KEY
mob_json() {
  python3 -c '
import json, sys
what, args = sys.argv[1], sys.argv[2:]
try:
    doc = json.load(sys.stdin)
except Exception:
    sys.exit(1)
def sessions(d):
    for s in d.get("sessions", []):
        yield s
if what == "session_state":
    for s in sessions(doc):
        if s.get("name") == args[0]: print(s.get("state", ""))
elif what == "binding_state":
    for s in sessions(doc):
        if s.get("name") == args[0]:
            for b in s.get("bindings", []):
                if b.get("hoa") == args[1]: print(b.get("state", ""))
elif what == "counter":
    for s in sessions(doc):
        if s.get("name") == args[0]: print(s.get("counters", {}).get(args[1], ""))
elif what == "ha_coa":
    for b in doc.get("bindings", []):
        if b.get("home_address") == args[0]: print(b.get("care_of", ""))
elif what == "ha_field":
    for b in doc.get("bindings", []):
        if b.get("home_address") == args[0]: print(b.get(args[1], ""))
elif what == "ha_counter":
    print(doc.get("counters", {}).get(args[0], ""))
elif what == "ha_count":
    print(len(doc.get("bindings", [])))
' "$@"
}

_mob_session_is() {  # HOST STATE
  [[ "$(mob_tunneld "$1" status --json 2>/dev/null | mob_json session_state "$MOB_SESSION")" == "$2" ]]
}
_mob_ha_bound_to() {  # COA
  [[ "$(mob_ha_status 2>/dev/null | mob_json ha_coa "$MOB_HOA6")" == "$1" ]]
}

# Waits until HOST's session is registered and the HA's binding points at
# HOST's care-of address.
mob_wait_registered() {  # HOST [TIMEOUT_S]
  local h=$1 t=${2:-20}
  tb_wait_for "$t" _mob_session_is "$h" registered ||
    tb_fail "session on $h not registered after ${t}s: $(mob_tunneld "$h" status --json 2>&1 | head -c 2000)"
  tb_wait_for "$t" _mob_ha_bound_to "${MOB_COA[$h]}" ||
    tb_fail "HA binding for $MOB_HOA6 does not point at ${MOB_COA[$h]}: $(mob_ha_status 2>&1 | head -c 2000)"
}

_mob_ha_unbound() { [[ "$(mob_ha_status 2>/dev/null | mob_json ha_coa "$MOB_HOA6")" == "" ]] && mob_ha_status >/dev/null 2>&1; }
mob_wait_deregistered() {  # [TIMEOUT_S]
  tb_wait_for "${1:-20}" _mob_ha_unbound ||
    tb_fail "HA still has a binding for $MOB_HOA6: $(mob_ha_status 2>&1 | head -c 2000)"
}

# True if HOST's daemon runs and holds the session (not just finished).
mob_has_session() {  # HOST
  [[ -n "${MOB_TUNNELD_PID[$1]:-}" ]] || return 1
  mob_tunneld "$1" status --json 2>/dev/null | python3 -c '
import json, sys
sys.exit(0 if any(s.get("name") == sys.argv[1] for s in json.load(sys.stdin).get("sessions", [])) else 1)
' "$MOB_SESSION"
}

# Stops HOST's session if it is still there (a session that has just ended
# by itself, e.g. a home session reaped, is fine).
mob_deactivate_if_present() {  # HOST
  local out
  out=$(mob_tunneld "$1" deactivate --name "$MOB_SESSION" 2>&1) && return 0
  [[ "$out" == *"no session"* ]] || tb_fail "tunneld deactivate on $1 failed: $out"
}

# One whole move of the guest, in the order a live migration has them:
#   - leaving home: the home host's session, if it is still repeating its
#     announcement of the guest at home (three NAs 1 s apart after a return
#     home), is stopped while the guest is still at home. A late one would
#     point the home link back at the guest's MAC once the HA has taken the
#     address over, and would make the HA's DAD probe fail (134, or an
#     optimistic binding revoked);
#   - detach (the VM stops) and attach to the new bridge (the VM resumes
#     there): mob_guest_move; activate on the new host (or `home` on hh);
#   - then the old foreign host's session is stopped: that is the source
#     host's clean-up after the switch, not part of the handover (the old
#     session only holds a TAP on a bridge the guest has left).
mob_move() {  # TO
  local to=$1 from=$MOB_GUEST_AT
  if [[ "$from" == hh ]] && mob_has_session hh; then mob_deactivate_if_present hh; fi
  mob_guest_move "$to"
  if [[ "$to" == hh ]]; then mob_home hh; else mob_activate "$to"; fi
  if [[ "$from" != hh ]]; then mob_deactivate "$from"; fi
  tb_log "guest moved $from -> $to"
}

# ---------------------------------------------------------------- traffic

# A TCP stream with end-to-end checksums: the receiver (in the guest) writes
# "bytes=N sha256=H" when the sender closes; the sender paces at RATE bytes/s
# and sends at least MIN bytes, and keeps sending until the file STOP exists.
_mob_write_stream_tools() {
  [[ -e "$TB_DIR/stream_rx.py" ]] && return 0
  cat >"$TB_DIR/stream_rx.py" <<'PY'
import hashlib, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("listening", flush=True)
c, peer = s.accept()
print("accepted %s" % (peer,), flush=True)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print("bytes=%d sha256=%s" % (n, h.hexdigest()), flush=True)
PY
  cat >"$TB_DIR/stream_tx.py" <<'PY'
import hashlib, os, socket, sys, time
addr, port, rate, minimum, stop, progress = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.connect((addr, port))
print("connected", flush=True)
h, n, start, chunk = hashlib.sha256(), 0, time.monotonic(), 16384
last = 0
while n < minimum or not os.path.exists(stop):
    ahead = n - (time.monotonic() - start) * rate
    if ahead > 0:
        time.sleep(min(ahead / rate, 0.05))
        continue
    b = os.urandom(chunk)
    s.sendall(b)
    h.update(b)
    n += len(b)
    if n - last >= 1 << 20:
        last = n
        with open(progress + ".tmp", "w") as f:
            f.write("%d\n" % n)
        os.replace(progress + ".tmp", progress)
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
print("bytes=%d sha256=%s" % (n, h.hexdigest()), flush=True)
PY
}

# mob_stream_start NAME DST_ADDR PORT RATE_BYTES_S MIN_BYTES [TX_NODE RX_NODE]
# Receiver in RX_NODE (default the guest), sender in TX_NODE (default the
# CN). Sets MOB_STREAM_* for the other helpers.
mob_stream_start() {
  local name=$1 dst=$2 port=$3 rate=$4 min=$5 tx=${6:-cn} rx=${7:-guest} bind=::
  [[ "$dst" == *:* ]] || bind=0.0.0.0
  _mob_write_stream_tools
  tb_spawn --name "$name-rx" "$rx" python3 "$TB_DIR/stream_rx.py" "$bind" "$port"
  MOB_STREAM_RX_LOG=$TB_SPAWN_LOG
  MOB_STREAM_RX_PID=$TB_SPAWN_PID
  tb_wait_log "$MOB_STREAM_RX_LOG" '^listening' 10 || tb_fail "stream receiver did not start"
  MOB_STREAM_STOP="$TB_DIR/$name.stop"
  MOB_STREAM_PROGRESS="$TB_DIR/$name.progress"
  rm -f "$MOB_STREAM_STOP"
  echo 0 >"$MOB_STREAM_PROGRESS"
  tb_spawn --name "$name-tx" "$tx" python3 "$TB_DIR/stream_tx.py" "$dst" "$port" "$rate" "$min" \
    "$MOB_STREAM_STOP" "$MOB_STREAM_PROGRESS"
  MOB_STREAM_TX_LOG=$TB_SPAWN_LOG
  MOB_STREAM_TX_PID=$TB_SPAWN_PID
  tb_wait_log "$MOB_STREAM_TX_LOG" '^connected' 15 || tb_fail "stream sender did not connect to [$dst]:$port"
  tb_log "stream $name: $tx -> $rx [$dst]:$port at $rate B/s, at least $min bytes"
}

mob_stream_bytes() { cat "$MOB_STREAM_PROGRESS" 2>/dev/null || echo 0; }

_mob_progress_beyond() { (($(mob_stream_bytes) > $1)); }
# Waits until the sender has sent BYTES more than now: the stream is
# flowing (the sender blocks when the path is broken, so progress beyond the
# socket buffers means delivery).
mob_stream_advance() {  # BYTES [TIMEOUT_S]
  local now
  now=$(mob_stream_bytes)
  tb_wait_for "${2:-60}" _mob_progress_beyond $((now + $1)) ||
    tb_fail "the stream stalled at $(mob_stream_bytes) bytes (guest at ${MOB_GUEST_AT:-nowhere})"
}

# Lets the sender finish, waits for both ends and compares the checksums.
mob_stream_finish() {  # [TIMEOUT_S]
  local t=${1:-120} tx rx
  touch "$MOB_STREAM_STOP"
  tb_wait_log "$MOB_STREAM_TX_LOG" '^bytes=' "$t" || tb_fail "stream sender did not finish"
  tb_wait_log "$MOB_STREAM_RX_LOG" '^bytes=' "$t" || tb_fail "stream receiver did not finish"
  tx=$(grep '^bytes=' "$MOB_STREAM_TX_LOG")
  rx=$(grep '^bytes=' "$MOB_STREAM_RX_LOG")
  [[ "$tx" == "$rx" ]] || tb_fail "stream mismatch: sent [$tx] received [$rx]"
  tb_log "stream intact: $rx"
  MOB_STREAM_RESULT=$rx
}

# mob_ping NODE ADDR [COUNT] -> asserts at least one reply, logs the line.
mob_ping_ok() {
  local out
  out=$(tb_ping "$1" "$2" "${3:-5}" 0.1 2) || tb_fail "$1 cannot ping $2: $out"
  tb_log "ping $1 -> $2: $out"
}

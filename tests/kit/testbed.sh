# shellcheck shell=bash
# testbed.sh: the Kagemusha test-bed kit. Source it from a test script:
#
#   source "$KAGEMUSHA_SOURCE/tests/kit/testbed.sh"
#   tb_init                       # run id, temp dir, cleanup trap
#   tb_two_sites 40 100           # src --(WAN: +40 ms RTT, 100 Mbit/s)-- dst
#   tb_exec src iperf3 -c "$TB_DST_V6" ...
#
# Everything is built from network namespaces named "<run id>-<name>" (run id
# = "tb" + 4 hex digits, e.g. tb3f9a-src), with interfaces also prefixed by the
# run id, created directly inside their namespaces so that nothing ever appears
# in the root namespace. The EXIT/INT/TERM trap tears down everything the run
# created, also when the test fails halfway under `set -e`. Full reference,
# addressing plan and pitfalls: docs/testbed.md.
#
# API (all functions are set -euo pipefail friendly):
#   Lifecycle
#     tb_init                      start a run: TB_ID, TB_DIR, trap, stale cleanup
#     tb_on_cleanup CMD...         run CMD at teardown (before namespaces go; LIFO)
#     tb_teardown                  tear down now (the trap calls it; idempotent)
#     tb_cleanup_stale             remove leftovers of runs whose process is dead
#   Reporting
#     tb_log MSG...                timestamped line on stderr
#     tb_fail MSG...               "FAIL: MSG" on stderr, exit 1
#     tb_skip MSG...               "SKIP: MSG" on stderr, exit 77 (a CTest failure here)
#     tb_require_root              skip unless root and netns work
#     tb_require_cmd CMD...        skip unless every CMD is installed
#   Topology
#     tb_site NAME [--v6 P::/64] [--v4 A.B.C.0/24]     router namespace + bridge
#     tb_host NAME [SITE] [--v6 ADDR/PLEN] [--v4 ADDR/PLEN] [--forwarding]
#     tb_link A B [--addr-a ADDR/PLEN]... [--addr-b ADDR/PLEN]...   veth A<->B
#     tb_addr NODE IFNAME ADDR/PLEN                    add an address (IPv6: nodad)
#     tb_bridge_attach SITE NODE                       veth NODE<->SITE's bridge
#     tb_forwarding NODE on|off                        IPv4+IPv6 forwarding knobs
#     tb_wan SITE_A SITE_B --rtt MS [--rate MBIT] [--loss PCT] [--queue-ms MS]
#            [--name NAME] [--wanem-arg ARG]...        sites via kagemusha-wanem
#     tb_two_sites RTT_MS RATE_MBIT [LOSS_PCT]         ready-made src/dst topology
#   Queries
#     tb_ns NODE                   full namespace name of a node
#     tb_if NODE PEER              interface of NODE that leads to PEER
#     tb_addr6 NODE / tb_addr4 NODE  first address given to a host or site router
#     tb_exec NODE CMD...          run CMD inside NODE's namespace
#   Processes and waiting
#     tb_spawn [--name N] NODE CMD...   background CMD in NODE (pid: TB_SPAWN_PID,
#                                        log: TB_SPAWN_LOG), killed at teardown
#     tb_stop PID [TIMEOUT_S]      SIGTERM a spawned process (group), SIGKILL later
#     tb_pid_alive PID             true if PID runs (zombies do not count)
#     tb_wait_for TIMEOUT_S CMD... poll CMD until it succeeds (else return 1)
#     tb_wait_port NODE ADDR PORT [TIMEOUT_S]   until something listens on TCP
#     tb_wait_unix SOCK [TIMEOUT_S]             until a Unix socket accepts
#     tb_wait_log FILE REGEX [TIMEOUT_S]        until FILE has a matching line
#   Measuring
#     tb_ping NODE ADDR [COUNT] [INTERVAL_S]    ICMP echo; prints
#                    "sent=N received=M min_ms=.. avg_ms=.. med_ms=.. max_ms=.."
#     tb_wan_stats [NAME]          ask kagemusha-wanem for its counters
#     tb_wan_down [NAME] / tb_wan_up [NAME]   cut / restore the WAN (both ways)
#   Hosts for the orchestrator
#     tb_libvirtd HOST [--timeout S]  per-host libvirtd (own net + mount + UTS namespace)
#     tb_libvirt_uri HOST [unix|tcp]  URI of that daemon (tcp: qemu+tcp://HOST.$TB_ID.test/system)
#     tb_virsh HOST ARGS...        virsh against HOST's daemon
#
# Variables set by tb_init: TB_ID, TB_DIR (per-run temp dir, removed at the
# end unless TB_KEEP=1), TB_LOGS (logs of spawned processes).

[[ -n "${_TB_SOURCED:-}" ]] && return 0
_TB_SOURCED=1

TB_STATE_ROOT=${TB_STATE_ROOT:-/run/kagemusha-testbed}
TB_ID=""
TB_DIR=""
TB_LOGS=""
TB_SPAWN_PID=""
TB_SPAWN_LOG=""
TB_LINK_IF_A=""
TB_LINK_IF_B=""
_TB_TORN_DOWN=0
_TB_NAMESPACES=()   # full namespace names, in creation order
_TB_PIDS=()         # spawned process ids
_TB_HOOKS=()        # cleanup commands (eval'd), LIFO
_TB_IFCOUNT=0
_TB_WANCOUNT=0
declare -gA _TB_NS=()        # node -> namespace
declare -gA _TB_KIND=()      # node -> host|site|wan|node
declare -gA _TB_IF=()        # "node>peer" -> interface name in node
declare -gA _TB_ADDR6=()     # node -> first IPv6 address (no prefix length)
declare -gA _TB_ADDR4=()     # node -> first IPv4 address
declare -gA _TB_SITE_V6=()   # site -> IPv6 prefix (P::/64)
declare -gA _TB_SITE_V4=()   # site -> IPv4 prefix (A.B.C.D/N)
declare -gA _TB_SITE_BR=()   # site -> bridge name
declare -gA _TB_SITE_HOSTS=()  # site -> number of hosts attached so far
declare -gA _TB_WAN_PID=()   # wan name -> kagemusha-wanem pid
declare -gA _TB_WAN_LOG=()   # wan name -> its log

# ---------------------------------------------------------------- reporting

tb_log() {
  printf '[tb %s %s] %s\n' "${TB_ID:-none}" "$(date -u +%H:%M:%S.%3N)" "$*" >&2
}

tb_fail() {
  printf '\nFAIL: %s\n\n' "$*" >&2
  exit 1
}

tb_skip() {
  printf '\n**********************************************************************\n' >&2
  printf 'SKIP: %s\n' "$*" >&2
  printf '(exit 77: this project counts a skipped test as a FAILURE on purpose)\n' >&2
  printf '**********************************************************************\n\n' >&2
  exit 77
}

tb_require_root() {
  [[ $(id -u) -eq 0 ]] || tb_skip "needs root (network namespaces, veth, AF_PACKET)"
  command -v ip >/dev/null || tb_skip "iproute2 'ip' is not installed"
  ip netns list >/dev/null 2>&1 || tb_skip "'ip netns' does not work here"
}

tb_require_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || tb_skip "required tool '$c' is not installed (see scripts/install-deps.sh)"
  done
}

# ---------------------------------------------------------------- lifecycle

tb_init() {
  [[ -z "$TB_ID" ]] || tb_fail "tb_init called twice"
  tb_require_root
  tb_require_cmd ss setsid timeout python3
  mkdir -p "$TB_STATE_ROOT"
  tb_cleanup_stale
  local i id
  for i in $(seq 1 50); do
    id="tb$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')"
    # mkdir is the atomic claim of the id; an id with namespaces left behind
    # by a run whose state dir is gone is not reused either.
    if ! ip netns list | grep -q "^${id}-" && mkdir "$TB_STATE_ROOT/$id" 2>/dev/null; then
      TB_ID=$id
      break
    fi
  done
  [[ -n "$TB_ID" ]] || tb_fail "could not allocate a run id in $TB_STATE_ROOT"
  TB_DIR=$(mktemp -d "/tmp/kagemusha-${TB_ID}.XXXXXX")
  TB_LOGS="$TB_DIR/logs"
  mkdir -p "$TB_LOGS"
  # The owner's pid and start time: a recycled pid does not make a dead run
  # look alive to tb_cleanup_stale.
  echo "$$ $(_tb_starttime $$)" >"$TB_STATE_ROOT/$TB_ID/owner"
  echo "$TB_DIR" >"$TB_STATE_ROOT/$TB_ID/tmpdir"
  : >"$TB_STATE_ROOT/$TB_ID/pids"
  trap '_tb_exit_trap' EXIT
  trap '_tb_signal_trap 130' INT
  trap '_tb_signal_trap 143' TERM
  trap '_tb_signal_trap 129' HUP
  export TB_ID TB_DIR TB_LOGS
  tb_log "run $TB_ID, temp dir $TB_DIR"
}

tb_on_cleanup() {
  _TB_HOOKS+=("$(printf '%q ' "$@")")
}

_tb_starttime() {
  # Field 22 of /proc/PID/stat, after the parenthesised command name.
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  awk '{print $20}' <<<"$stat"
}

# True if PID runs (a zombie waiting for its parent to reap it does not run).
tb_pid_alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat%% *}" != Z ]]
}

_tb_alive() {  # PID STARTTIME
  tb_pid_alive "$1" && [[ $(_tb_starttime "$1") == "$2" ]]
}

_tb_exit_trap() {
  local rc=$?
  tb_teardown "$rc"
  exit "$rc"
}

_tb_signal_trap() {
  tb_log "interrupted (exit $1), tearing down"
  trap - INT TERM HUP
  exit "$1"  # runs the EXIT trap
}

# Kills a process and its process group: TERM, then KILL after a grace time.
_tb_kill_tree() {  # PID [GRACE_S]
  local pid=$1 grace=${2:-3} i
  kill -TERM -- "-$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 20; i++)); do
    tb_pid_alive "$pid" || return 0
    sleep 0.05
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  kill -KILL "$pid" 2>/dev/null || true
}

# Kills every process still inside a namespace, then deletes it.
_tb_delete_ns() {  # FULL_NS
  local ns=$1 pids i
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  if [[ -n "$pids" ]]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [[ -z "$pids" ]] && break
      sleep 0.05
    done
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null
  fi
  # A dying process can hold the namespace for a moment; retry briefly.
  for ((i = 0; i < 20; i++)); do
    ip netns del "$ns" 2>/dev/null && return 0
    [[ -e /run/netns/$ns ]] || return 0
    sleep 0.1
  done
  tb_log "warning: could not delete namespace $ns"
}

tb_teardown() {
  local rc=${1:-0} i f
  [[ $_TB_TORN_DOWN -eq 1 || -z "$TB_ID" ]] && return 0
  _TB_TORN_DOWN=1
  set +e
  if [[ $rc -ne 0 && -d "$TB_LOGS" ]]; then
    for f in "$TB_LOGS"/*.log; do
      [[ -s "$f" ]] || continue
      printf -- '----- tail of %s -----\n' "${f##*/}" >&2
      tail -n 20 "$f" >&2
    done
  fi
  for ((i = ${#_TB_HOOKS[@]} - 1; i >= 0; i--)); do
    eval "${_TB_HOOKS[i]}" >&2
  done
  for ((i = ${#_TB_PIDS[@]} - 1; i >= 0; i--)); do
    _tb_kill_tree "${_TB_PIDS[i]}" 3
  done
  for ((i = ${#_TB_NAMESPACES[@]} - 1; i >= 0; i--)); do
    _tb_delete_ns "${_TB_NAMESPACES[i]}"
  done
  # Namespaces created by this run but not recorded (a failure between
  # `ip netns add` and the bookkeeping) go too.
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${TB_ID}-"); do
    _tb_delete_ns "$ns"
  done
  if [[ "${TB_KEEP:-0}" == 1 ]]; then
    tb_log "TB_KEEP=1: keeping $TB_DIR"
  else
    rm -rf "$TB_DIR"
  fi
  rm -rf "${TB_STATE_ROOT:?}/$TB_ID"
  tb_log "teardown done"
  return 0
}

tb_cleanup_stale() {
  mkdir -p "$TB_STATE_ROOT"
  local d id owner pid start tmp ns p
  for d in "$TB_STATE_ROOT"/tb*; do
    [[ -d "$d" ]] || continue
    id=${d##*/}
    [[ "$id" == "$TB_ID" ]] && continue
    owner=$(cat "$d/owner" 2>/dev/null || true)
    # No owner file yet: a run inside tb_init; leave it alone unless old.
    if [[ -z "$owner" ]]; then
      [[ -n $(find "$d" -maxdepth 0 -mmin +2 2>/dev/null) ]] || continue
    else
      read -r pid start <<<"$owner"
      _tb_alive "$pid" "$start" && continue
    fi
    echo "[tb] removing leftovers of dead run $id" >&2
    while read -r p; do
      [[ -n "$p" ]] && _tb_kill_tree "$p" 1
    done <"$d/pids" 2>/dev/null
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${id}-"); do
      _tb_delete_ns "$ns"
    done
    tmp=$(cat "$d/tmpdir" 2>/dev/null || true)
    [[ "$tmp" == /tmp/kagemusha-"$id".* ]] && rm -rf "$tmp"
    rm -rf "$d"
  done
  # Namespaces of the kit's naming scheme whose run has no state at all.
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^tb[0-9a-f]{4}-' || true); do
    id=${ns%%-*}
    [[ -d "$TB_STATE_ROOT/$id" ]] && continue
    echo "[tb] removing orphan namespace $ns" >&2
    _tb_delete_ns "$ns"
  done
}

# ---------------------------------------------------------------- nodes

_tb_need_init() { [[ -n "$TB_ID" ]] || tb_fail "call tb_init first"; }

_tb_check_name() {
  [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.]{0,30}$ ]] || tb_fail "bad node name '$1' (letters, digits, _ and ., max 31)"
}

tb_ns() {
  [[ -n "${_TB_NS[$1]:-}" ]] || tb_fail "unknown node '$1'"
  printf '%s\n' "${_TB_NS[$1]}"
}

tb_exec() {
  local ns
  ns=$(tb_ns "$1")
  shift
  ip netns exec "$ns" "$@"
}

# Creates the namespace of a node with the settings every node needs.
_tb_new_ns() {  # NAME KIND
  _tb_need_init
  _tb_check_name "$1"
  [[ -z "${_TB_NS[$1]:-}" ]] || tb_fail "node '$1' exists already"
  local ns="${TB_ID}-$1"
  ip netns add "$ns" || tb_fail "ip netns add $ns failed"
  _TB_NAMESPACES+=("$ns")
  _TB_NS[$1]=$ns
  _TB_KIND[$1]=$2
  ip -n "$ns" link set lo up
  # Interfaces created later inherit "default": no DAD, so addresses are
  # usable at once (tests must not sleep for DAD), and no router
  # solicitations noise.
  ip netns exec "$ns" sh -c '
    for k in all default; do
      echo 0 > /proc/sys/net/ipv6/conf/$k/accept_dad
      echo 0 > /proc/sys/net/ipv6/conf/$k/router_solicitations
    done' || tb_fail "sysctls in $ns"
}

tb_forwarding() {  # NODE on|off
  local v
  case "$2" in on) v=1 ;; off) v=0 ;; *) tb_fail "tb_forwarding NODE on|off" ;; esac
  tb_exec "$1" sh -c "echo $v > /proc/sys/net/ipv4/ip_forward; echo $v > /proc/sys/net/ipv6/conf/all/forwarding" ||
    tb_fail "forwarding $2 on $1"
}

# A new interface name, unique within the run: "<run id>-<hint>" cut to 15
# characters, with a counter when the hint is taken.
_tb_ifname() {  # NODE HINT
  local base="${TB_ID}-$2" name key
  base=${base:0:15}
  name=$base
  _TB_IFCOUNT=$((_TB_IFCOUNT + 1))
  for key in "${!_TB_IF[@]}"; do
    if [[ "${key%%>*}" == "$1" && "${_TB_IF[$key]}" == "$name" ]]; then
      name="${base:0:$((15 - ${#_TB_IFCOUNT} - 1))}.${_TB_IFCOUNT}"
      break
    fi
  done
  printf '%s\n' "$name"
}

tb_if() {  # NODE PEER
  [[ -n "${_TB_IF[$1>$2]:-}" ]] || tb_fail "no link from '$1' to '$2'"
  printf '%s\n' "${_TB_IF[$1>$2]}"
}

tb_addr6() { [[ -n "${_TB_ADDR6[$1]:-}" ]] || tb_fail "no IPv6 address on '$1'"; printf '%s\n' "${_TB_ADDR6[$1]}"; }
tb_addr4() { [[ -n "${_TB_ADDR4[$1]:-}" ]] || tb_fail "no IPv4 address on '$1'"; printf '%s\n' "${_TB_ADDR4[$1]}"; }

tb_addr() {  # NODE IFNAME ADDR/PLEN
  local node=$1 ifname=$2 addr=$3
  [[ "$addr" == */* ]] || tb_fail "tb_addr: '$addr' needs a prefix length"
  if [[ "$addr" == *:* ]]; then
    tb_exec "$node" ip -6 addr add "$addr" dev "$ifname" nodad || tb_fail "adding $addr on $node/$ifname"
    [[ -n "${_TB_ADDR6[$node]:-}" ]] || _TB_ADDR6[$node]=${addr%/*}
  else
    tb_exec "$node" ip -4 addr add "$addr" dev "$ifname" || tb_fail "adding $addr on $node/$ifname"
    [[ -n "${_TB_ADDR4[$node]:-}" ]] || _TB_ADDR4[$node]=${addr%/*}
  fi
}

# tb_link A B [--addr-a ADDR/PLEN]... [--addr-b ADDR/PLEN]... [--if-a NAME] [--if-b NAME] [--mtu N]
# A veth pair with one end in each namespace, both up. Sets TB_LINK_IF_A and
# TB_LINK_IF_B; tb_if A B finds the name again later.
tb_link() {
  local a=$1 b=$2
  shift 2
  local if_a="" if_b="" mtu="" addrs_a=() addrs_b=() x
  while (($#)); do
    case "$1" in
      --addr-a) addrs_a+=("$2"); shift 2 ;;
      --addr-b) addrs_b+=("$2"); shift 2 ;;
      --if-a) if_a=$2; shift 2 ;;
      --if-b) if_b=$2; shift 2 ;;
      --mtu) mtu=$2; shift 2 ;;
      *) tb_fail "tb_link: unknown option '$1'" ;;
    esac
  done
  local ns_a ns_b
  ns_a=$(tb_ns "$a")
  ns_b=$(tb_ns "$b")
  [[ -n "$if_a" ]] || if_a=$(_tb_ifname "$a" "$b")
  [[ -n "$if_b" ]] || if_b=$(_tb_ifname "$b" "$a")
  ((${#if_a} <= 15 && ${#if_b} <= 15)) || tb_fail "interface names longer than 15: $if_a $if_b"
  # Both ends are created inside their namespaces: no name ever exists in
  # the root namespace, so concurrent runs cannot collide there.
  ip link add "$if_a" netns "$ns_a" type veth peer name "$if_b" netns "$ns_b" ||
    tb_fail "creating veth $a/$if_a <-> $b/$if_b"
  if [[ -n "$mtu" ]]; then
    ip -n "$ns_a" link set "$if_a" mtu "$mtu"
    ip -n "$ns_b" link set "$if_b" mtu "$mtu"
  fi
  ip -n "$ns_a" link set "$if_a" up
  ip -n "$ns_b" link set "$if_b" up
  _TB_IF[$a>$b]=$if_a
  _TB_IF[$b>$a]=$if_b
  for x in "${addrs_a[@]}"; do tb_addr "$a" "$if_a" "$x"; done
  for x in "${addrs_b[@]}"; do tb_addr "$b" "$if_b" "$x"; done
  TB_LINK_IF_A=$if_a
  TB_LINK_IF_B=$if_b
}

# tb_site NAME [--v6 PREFIX::/64] [--v4 A.B.C.D/N]
# A site: a router namespace with a bridge that the site's hosts attach to.
# The router owns PREFIX::1 and the first IPv4 address of the prefix, and
# forwards. Defaults by site order: 2001:db8:a::/64 + 192.0.2.0/24,
# 2001:db8:b::/64 + 198.51.100.0/24, 2001:db8:c::/64 + 203.0.113.0/25,
# then 2001:db8:d::/64... without IPv4.
tb_site() {
  local name=$1 v6="" v4="" n
  shift
  while (($#)); do
    case "$1" in
      --v6) v6=$2; shift 2 ;;
      --v4) v4=$2; shift 2 ;;
      --no-v4) v4=none; shift ;;
      *) tb_fail "tb_site: unknown option '$1'" ;;
    esac
  done
  n=${#_TB_SITE_BR[@]}
  if [[ -z "$v6" ]]; then v6="2001:db8:$(printf %x $((10 + n)))::/64"; fi
  if [[ -z "$v4" ]]; then
    case $n in
      0) v4=192.0.2.0/24 ;; 1) v4=198.51.100.0/24 ;; 2) v4=203.0.113.0/25 ;; *) v4=none ;;
    esac
  fi
  [[ "$v4" == none ]] && v4=""
  [[ "$v6" == *::/* ]] || tb_fail "tb_site: IPv6 prefix must look like P::/LEN, got '$v6'"
  _tb_new_ns "$name" site
  tb_forwarding "$name" on
  local br
  br=$(_tb_ifname "$name" br)
  ip -n "$(tb_ns "$name")" link add "$br" type bridge forward_delay 0 mcast_snooping 0 ||
    tb_fail "creating bridge in site $name"
  ip -n "$(tb_ns "$name")" link set "$br" up
  _TB_IF[$name>bridge]=$br
  _TB_SITE_BR[$name]=$br
  _TB_SITE_V6[$name]=$v6
  _TB_SITE_V4[$name]=$v4
  _TB_SITE_HOSTS[$name]=0
  tb_addr "$name" "$br" "${v6%%::/*}::1/${v6##*/}"
  [[ -z "$v4" ]] || tb_addr "$name" "$br" "$(_tb_v4_offset "$v4" 1)/${v4##*/}"
}

_tb_v4_offset() {  # PREFIX/LEN N -> prefix address + N (within the last octet)
  local base=${1%/*}
  local last=${base##*.}
  ((last + $2 < 255)) || tb_fail "IPv4 offset $2 does not fit in $1"
  printf '%s.%d\n' "${base%.*}" $((last + $2))
}

# tb_bridge_attach SITE NODE: a veth from NODE into SITE's bridge. Sets
# TB_LINK_IF_A (NODE's end).
tb_bridge_attach() {
  local site=$1 node=$2
  [[ -n "${_TB_SITE_BR[$site]:-}" ]] || tb_fail "'$site' is not a site"
  tb_link "$node" "$site"
  ip -n "$(tb_ns "$site")" link set "$TB_LINK_IF_B" master "${_TB_SITE_BR[$site]}" ||
    tb_fail "attaching $node to the bridge of $site"
  TB_LINK_IF_A=$(tb_if "$node" "$site")
}

# tb_host NAME [SITE] [--v6 ADDR/PLEN] [--v4 ADDR/PLEN] [--forwarding]
# A host namespace. With SITE, it is attached to the site's bridge, gets an
# address in each of the site's prefixes (default PREFIX::10, ::11, ... and
# .10, .11, ...) and default routes via the site router.
tb_host() {
  local name=$1 site="" v6="" v4="" fwd=off
  shift
  if (($#)) && [[ "$1" != --* ]]; then site=$1; shift; fi
  while (($#)); do
    case "$1" in
      --v6) v6=$2; shift 2 ;;
      --v4) v4=$2; shift 2 ;;
      --forwarding) fwd=on; shift ;;
      *) tb_fail "tb_host: unknown option '$1'" ;;
    esac
  done
  _tb_new_ns "$name" host
  tb_forwarding "$name" "$fwd"
  [[ -z "$site" ]] && return 0
  tb_bridge_attach "$site" "$name"
  local ifname=$TB_LINK_IF_A k=${_TB_SITE_HOSTS[$site]}
  _TB_SITE_HOSTS[$site]=$((k + 1))
  local p6=${_TB_SITE_V6[$site]} p4=${_TB_SITE_V4[$site]}
  [[ -n "$v6" ]] || v6="${p6%%::/*}::$(printf %x $((16 + k)))/${p6##*/}"
  tb_addr "$name" "$ifname" "$v6"
  tb_exec "$name" ip -6 route add default via "${p6%%::/*}::1" dev "$ifname" ||
    tb_fail "default IPv6 route on $name"
  if [[ -n "$p4" ]]; then
    [[ -n "$v4" ]] || v4="$(_tb_v4_offset "$p4" $((10 + k)))/${p4##*/}"
    tb_addr "$name" "$ifname" "$v4"
    tb_exec "$name" ip -4 route add default via "$(_tb_v4_offset "$p4" 1)" dev "$ifname" ||
      tb_fail "default IPv4 route on $name"
  fi
}

# ---------------------------------------------------------------- processes

# tb_spawn [--name NAME] NODE CMD...
# Starts CMD in the background inside NODE's namespace ("-" = the root
# namespace), in its own process group, with stdout+stderr in
# $TB_LOGS/NAME.log. Sets TB_SPAWN_PID and TB_SPAWN_LOG (no subshell needed).
tb_spawn() {
  _tb_need_init
  local name=""
  if [[ "${1:-}" == --name ]]; then name=$2; shift 2; fi
  local node=$1
  shift
  (($#)) || tb_fail "tb_spawn: no command"
  [[ -n "$name" ]] || name="${node}-${1##*/}"
  local log="$TB_LOGS/$name.log" i=1
  while [[ -e "$log" ]]; do log="$TB_LOGS/$name.$((i++)).log"; done
  local -a prefix=()
  [[ "$node" == - ]] || prefix=(ip netns exec "$(tb_ns "$node")")
  # setsid (no fork: a background job of a script is not a group leader)
  # makes the pid a process group id, so teardown reaches the children too.
  setsid "${prefix[@]}" "$@" </dev/null >"$log" 2>&1 &
  TB_SPAWN_PID=$!
  TB_SPAWN_LOG=$log
  _TB_PIDS+=("$TB_SPAWN_PID")
  echo "$TB_SPAWN_PID" >>"$TB_STATE_ROOT/$TB_ID/pids"
}

tb_stop() {  # PID [GRACE_S]
  _tb_kill_tree "$1" "${2:-3}"
  wait "$1" 2>/dev/null || true
}

tb_wait_for() {  # TIMEOUT_S CMD...
  local deadline=$((SECONDS + $1))
  shift
  while true; do
    "$@" >/dev/null 2>&1 && return 0
    ((SECONDS < deadline)) || return 1
    sleep 0.05
  done
}

_tb_port_listening() {  # NS ADDR PORT
  local line
  while read -r line; do
    local local_addr=${line% *}
    local_addr=${local_addr##* }
    case "$local_addr" in
      "$2:$3" | "[$2]:$3" | "*:$3" | "0.0.0.0:$3" | "[::]:$3" | "[::ffff:$2]:$3") return 0 ;;
    esac
  done < <(ip netns exec "$1" ss -Hltn "sport = :$3" 2>/dev/null | awk '{print $4, $5}')
  return 1
}

tb_wait_port() {  # NODE ADDR PORT [TIMEOUT_S]
  local ns
  ns=$(tb_ns "$1")
  tb_wait_for "${4:-10}" _tb_port_listening "$ns" "$2" "$3" ||
    { tb_log "nothing listens on [$2]:$3 in $1 after ${4:-10}s"; return 1; }
}

_tb_unix_accepts() {
  [[ -S "$1" ]] || return 1
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(1)
s.connect(sys.argv[1])
EOF
}

# Waits until a Unix stream socket exists and accepts a connection. (The
# probe connects once and closes at once; servers must tolerate that.)
tb_wait_unix() {  # SOCK [TIMEOUT_S]
  tb_wait_for "${2:-10}" _tb_unix_accepts "$1" ||
    { tb_log "unix socket $1 not accepting after ${2:-10}s"; return 1; }
}

tb_wait_log() {  # FILE REGEX [TIMEOUT_S]
  tb_wait_for "${3:-10}" grep -qE "$2" "$1" ||
    { tb_log "no line matching /$2/ in $1 after ${3:-10}s"; return 1; }
}

# ---------------------------------------------------------------- WAN

tb_wanem_bin() {
  local b
  for b in "${KAGEMUSHA_WANEM:-}" "${KAGEMUSHA_BUILD:-}/tests/kit/kagemusha-wanem" \
    "${KAGEMUSHA_SOURCE:-/nonexistent}/build/tests/kit/kagemusha-wanem"; do
    [[ -n "$b" && -x "$b" ]] && { printf '%s\n' "$b"; return 0; }
  done
  tb_fail "kagemusha-wanem is not built (set KAGEMUSHA_BUILD to the build dir, or KAGEMUSHA_WANEM)"
}

# tb_wan SITE_A SITE_B --rtt MS [--rate MBIT] [--loss PCT] [--queue-ms MS]
#        [--seed N] [--name NAME] [--wanem-arg ARG]...
# Connects the two site routers through a "wan" namespace running
# kagemusha-wanem between its two interfaces (a bump in the wire: the routers
# share one transit subnet, 2001:db8:ffff:K::/64 and a /30 from
# 203.0.113.128/25) and adds routes so each site reaches the other's
# prefixes only through the WAN. Each direction is delayed by MS/2.
tb_wan() {
  local a=$1 b=$2
  shift 2
  local rtt="" rate=0 loss=0 queue_ms="" seed="" name="" extra=()
  while (($#)); do
    case "$1" in
      --rtt) rtt=$2; shift 2 ;;
      --rate) rate=$2; shift 2 ;;
      --loss) loss=$2; shift 2 ;;
      --queue-ms) queue_ms=$2; shift 2 ;;
      --seed) seed=$2; shift 2 ;;
      --name) name=$2; shift 2 ;;
      --wanem-arg) extra+=("$2"); shift 2 ;;
      *) tb_fail "tb_wan: unknown option '$1'" ;;
    esac
  done
  [[ -n "$rtt" ]] || tb_fail "tb_wan: --rtt MS is required (0 is allowed)"
  [[ -n "${_TB_SITE_BR[$a]:-}" && -n "${_TB_SITE_BR[$b]:-}" ]] || tb_fail "tb_wan: '$a' and '$b' must be sites"
  local k=$_TB_WANCOUNT
  _TB_WANCOUNT=$((k + 1))
  ((k < 32)) || tb_fail "tb_wan: at most 32 WAN links per run"
  [[ -n "$name" ]] || { name=wan; ((k == 0)) || name="wan$k"; }
  local wanem
  wanem=$(tb_wanem_bin)

  _tb_new_ns "$name" wan
  local wns
  wns=$(tb_ns "$name")
  local t6="2001:db8:ffff:$k" t4
  t4=$(_tb_v4_offset 203.0.113.128/25 $((4 * k)))
  tb_link "$a" "$name" --addr-a "$t6::1/64" --addr-a "$(_tb_v4_offset "$t4/30" 1)/30"
  local ra=$TB_LINK_IF_A wa=$TB_LINK_IF_B
  tb_link "$b" "$name" --addr-a "$t6::2/64" --addr-a "$(_tb_v4_offset "$t4/30" 2)/30"
  local rb=$TB_LINK_IF_A wb=$TB_LINK_IF_B
  # The wan namespace is a wire, not a host: no IPv6 on its interfaces, so it
  # sends nothing of its own (no MLD/ND).
  ip netns exec "$wns" sh -c "echo 1 > /proc/sys/net/ipv6/conf/$wa/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/$wb/disable_ipv6"
  # The routers' TCP segmentation offload would hand the emulator 64 KiB
  # frames that it cannot re-send; make the routers segment in software.
  tb_exec "$a" "$wanem" --offloads-off "$ra" || tb_fail "turning offloads off on $a/$ra"
  tb_exec "$b" "$wanem" --offloads-off "$rb" || tb_fail "turning offloads off on $b/$rb"

  local args=(--if-a "$wa" --if-b "$wb" --rtt-ms "$rtt" --rate-mbit "$rate" --loss "$loss")
  [[ -z "$queue_ms" ]] || args+=(--queue-ms "$queue_ms")
  [[ -z "$seed" ]] || args+=(--seed "$seed")
  tb_spawn --name "$name" "$name" "$wanem" "${args[@]}" "${extra[@]}"
  _TB_WAN_PID[$name]=$TB_SPAWN_PID
  _TB_WAN_LOG[$name]=$TB_SPAWN_LOG
  tb_wait_log "$TB_SPAWN_LOG" '^wanem: ready' 10 || tb_fail "kagemusha-wanem did not start (see $TB_SPAWN_LOG)"

  # Routes: each site's prefixes via the other router's transit address.
  local p
  p=${_TB_SITE_V6[$b]}; tb_exec "$a" ip -6 route add "$p" via "$t6::2" dev "$ra"
  p=${_TB_SITE_V6[$a]}; tb_exec "$b" ip -6 route add "$p" via "$t6::1" dev "$rb"
  if [[ -n "${_TB_SITE_V4[$b]}" ]]; then
    tb_exec "$a" ip -4 route add "${_TB_SITE_V4[$b]}" via "$(_tb_v4_offset "$t4/30" 2)" dev "$ra"
  fi
  if [[ -n "${_TB_SITE_V4[$a]}" ]]; then
    tb_exec "$b" ip -4 route add "${_TB_SITE_V4[$a]}" via "$(_tb_v4_offset "$t4/30" 1)" dev "$rb"
  fi
  tb_log "wan $name: $a <-> $b, rtt ${rtt} ms, rate ${rate} Mbit/s, loss ${loss}%"
}

# Prints kagemusha-wanem's current counters (one line per direction).
tb_wan_stats() {  # [NAME]
  local name=${1:-wan} pid log before
  pid=${_TB_WAN_PID[$name]:-}
  log=${_TB_WAN_LOG[$name]:-}
  [[ -n "$pid" ]] || tb_fail "no wan '$name'"
  before=$(grep -c '^wanem stats .* now:' "$log" || true)
  kill -USR1 "$pid"
  tb_wait_for 5 _tb_count_at_least "$log" '^wanem stats .* now:' $((before + 2)) ||
    tb_fail "kagemusha-wanem ($name) did not answer SIGUSR1"
  grep '^wanem stats .* now:' "$log" | tail -n 2
}

# Cuts the WAN (everything in flight and arriving is lost, both directions)
# or restores it, and returns once the emulator has acknowledged.
tb_wan_down() { _tb_wan_link "${1:-wan}" RTMIN down; }
tb_wan_up() { _tb_wan_link "${1:-wan}" RTMIN+1 up; }

_tb_wan_link() {  # NAME SIGNAL up|down
  local pid=${_TB_WAN_PID[$1]:-} log=${_TB_WAN_LOG[$1]:-} before
  [[ -n "$pid" ]] || tb_fail "no wan '$1'"
  before=$(grep -c "^wanem: link $3\$" "$log" || true)
  kill -s "$2" "$pid"
  tb_wait_for 5 _tb_count_at_least "$log" "^wanem: link $3\$" $((before + 1)) ||
    tb_fail "kagemusha-wanem ($1) did not acknowledge link $3"
  tb_log "wan $1: link $3"
}

_tb_count_at_least() { (($(grep -c "$2" "$1" || true) >= $3)); }

# tb_two_sites RTT_MS RATE_MBIT [LOSS_PCT]
# Site A (2001:db8:a::/64, 192.0.2.0/24) with host "src" (::10, .10) and
# site B (2001:db8:b::/64, 198.51.100.0/24) with host "dst" (::10, .10),
# joined by tb_wan (RATE_MBIT 0 = no rate limit). Exports
# TB_SRC_NS TB_DST_NS TB_WAN_NS TB_SRC_V6 TB_SRC_V4 TB_DST_V6 TB_DST_V4
# TB_SRC_IF TB_DST_IF and prints them.
tb_two_sites() {
  local rtt=$1 rate=$2 loss=${3:-0}
  tb_site siteA --v6 2001:db8:a::/64 --v4 192.0.2.0/24
  tb_site siteB --v6 2001:db8:b::/64 --v4 198.51.100.0/24
  tb_host src siteA --v6 2001:db8:a::10/64 --v4 192.0.2.10/24
  tb_host dst siteB --v6 2001:db8:b::10/64 --v4 198.51.100.10/24
  tb_wan siteA siteB --rtt "$rtt" --rate "$rate" --loss "$loss"
  TB_SRC_NS=$(tb_ns src)
  TB_DST_NS=$(tb_ns dst)
  TB_WAN_NS=$(tb_ns wan)
  TB_SRC_V6=2001:db8:a::10
  TB_SRC_V4=192.0.2.10
  TB_DST_V6=2001:db8:b::10
  TB_DST_V4=198.51.100.10
  TB_SRC_IF=$(tb_if src siteA)
  TB_DST_IF=$(tb_if dst siteB)
  export TB_SRC_NS TB_DST_NS TB_WAN_NS TB_SRC_V6 TB_SRC_V4 TB_DST_V6 TB_DST_V4 TB_SRC_IF TB_DST_IF
  tb_log "two sites: src=$TB_SRC_NS [$TB_SRC_V6] $TB_SRC_V4  dst=$TB_DST_NS [$TB_DST_V6] $TB_DST_V4  wan=$TB_WAN_NS"
}

# ---------------------------------------------------------------- measuring

# tb_ping NODE ADDR [COUNT=5] [INTERVAL_S=0.2] [TIMEOUT_S=2]
# ICMP/ICMPv6 echo from NODE with a raw socket (no dependency on iputils).
# Prints "sent=N received=M min_ms=X avg_ms=Y med_ms=M max_ms=Z" (times of
# received replies only; -1 if none; med = upper median) and returns 0 if at least one reply came.
tb_ping() {
  local node=$1 addr=$2 count=${3:-5} interval=${4:-0.2} timeout=${5:-2}
  tb_exec "$node" python3 - "$addr" "$count" "$interval" "$timeout" <<'EOF'
import os, select, socket, struct, sys, time
addr, count, interval, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
v6 = ":" in addr
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    req_type, rep_type = 128, 129
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    req_type, rep_type = 8, 0
ident = os.getpid() & 0xFFFF
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
sent_at, rtts = {}, []
def handle_replies(deadline, until_all_answered):
    while True:
        if until_all_answered and not sent_at: return
        wait = deadline - time.monotonic()
        if wait <= 0: return
        r, _, _ = select.select([s], [], [], wait)
        if not r: return
        data = s.recv(65535)
        if not v6: data = data[(data[0] & 0x0F) * 4:]  # IPv4 raw sockets include the IP header
        if len(data) < 8: continue
        t, _, _, i, q = struct.unpack("!BBHHH", data[:8])
        if t == rep_type and i == ident and q in sent_at:
            rtts.append((time.monotonic() - sent_at.pop(q)) * 1000)
for seq in range(count):
    payload = struct.pack("!d", time.monotonic()) + b"kagemusha-testbed"
    hdr = struct.pack("!BBHHH", req_type, 0, 0, ident, seq)
    pkt = hdr + payload
    if not v6:  # the kernel fills in the ICMPv6 checksum itself
        pkt = struct.pack("!BBHHH", req_type, 0, csum(pkt), ident, seq) + payload
    sent_at[seq] = time.monotonic()
    s.sendto(pkt, (addr, 0))
    last = seq + 1 == count
    handle_replies(time.monotonic() + (timeout if last else interval), last)
if rtts:
    med = sorted(rtts)[len(rtts) // 2]
    print("sent=%d received=%d min_ms=%.3f avg_ms=%.3f med_ms=%.3f max_ms=%.3f" % (count, len(rtts), min(rtts), sum(rtts) / len(rtts), med, max(rtts)))
else:
    print("sent=%d received=0 min_ms=-1 avg_ms=-1 med_ms=-1 max_ms=-1" % count)
sys.exit(0 if rtts else 1)
EOF
}

# Field of a "key=value ..." line: tb_field min_ms "$(tb_ping ...)".
tb_field() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }

# ---------------------------------------------------------------- libvirtd

# tb_libvirtd HOST [--timeout S]
# A per-host libvirt daemon for migration tests: virtlogd + libvirtd run
# inside HOST's network namespace and in a private mount + UTS namespace, with
# private copies of /run, /etc/libvirt, /var/lib/libvirt, /var/log/libvirt,
# /var/cache/libvirt, /etc/hosts, /etc/passwd and /etc/group under
# $TB_DIR/libvirt/HOST (see
# docs/testbed.md and the test-bed notes). The daemon listens on plain TCP
# (auth none: tests only) on HOST's addresses, port 16509, has a distinct host UUID
# and the hostname HOST.$TB_ID.test, which every libvirt host of the run can
# resolve. Returns when the daemon answers; the first start probes QEMU (~5 s).
# tb_libvirt_uri HOST [unix|tcp] and tb_virsh HOST ARGS... reach it.
tb_libvirtd() {
  local host=$1 timeout=60
  shift
  while (($#)); do
    case "$1" in
      --timeout) timeout=$2; shift 2 ;;
      *) tb_fail "tb_libvirtd: unknown option '$1'" ;;
    esac
  done
  tb_require_cmd libvirtd virtlogd virsh unshare
  local addr=${_TB_ADDR6[$host]:-${_TB_ADDR4[$host]:-}}
  [[ -n "$addr" ]] || tb_fail "tb_libvirtd: host '$host' has no address"
  local root="$TB_DIR/libvirt/$host"
  [[ ! -e "$root" ]] || tb_fail "tb_libvirtd: libvirtd already started on '$host'"
  mkdir -p "$root"/{run,etc,lib/qemu,lib/images,log/qemu,cache/qemu}
  local uuid
  uuid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$root/etc/libvirtd.conf" <<CONF
# Written by tests/kit/testbed.sh for test host $host (run $TB_ID). Plain TCP
# without authentication is for tests inside network namespaces only.
listen_tls = 0
listen_tcp = 1
# No listen_addr: all addresses (IPv6 and IPv4) of this namespace, which are
# exactly the test host's own.
auth_tcp = "none"
auth_unix_rw = "none"
auth_unix_ro = "none"
host_uuid = "$uuid"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
  # QEMU as root: postcopy needs userfaultfd(2), which the sysctl denies to
  # unprivileged users. No MAC driver on this machine.
  cat >"$root/etc/qemu.conf" <<CONF
user = "root"
group = "root"
security_driver = "none"
CONF
  : >"$root/etc/virtlogd.conf"
  # libvirtd resolves its built-in default QEMU user (libvirt-qemu) before it
  # reads qemu.conf and refuses to start if that user does not exist, which
  # happens when the package's maintainer scripts did not run. Give the
  # daemon private passwd/group files that have it; the host's stay as they are.
  cp /etc/passwd "$root/passwd"
  cp /etc/group "$root/group"
  getent passwd libvirt-qemu >/dev/null ||
    echo 'libvirt-qemu:x:64055:64055:Libvirt Qemu (kagemusha test bed):/var/lib/libvirt:/usr/sbin/nologin' >>"$root/passwd"
  getent group libvirt-qemu >/dev/null || echo 'libvirt-qemu:x:64055:' >>"$root/group"
  getent group kvm >/dev/null || echo 'kvm:x:64056:' >>"$root/group"
  printf 'uri_default = "qemu:///system"\n' >"$root/etc/libvirt.conf"
  _tb_write_hosts
  # QEMU capability probing takes ~5 s per daemon. The cache is valid for the
  # same binaries on the same machine, so later daemons of the run start from
  # the first one's cache (libvirt still checks it and re-probes if stale).
  local other
  for other in "$TB_DIR"/libvirt/*/cache/qemu/capabilities; do
    [[ -d "$other" && "$other" != "$root"/* ]] || continue
    cp -a "$other" "$root/cache/qemu/" && break
  done
  # The mount points must exist in the shared file system (they do when the
  # libvirt daemon package created them; this image may lack them).
  mkdir -p /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /etc/libvirt
  cat >"$root/start.sh" <<'SCRIPT'
set -eu
root=$1 fqdn=$2 hosts=$3
mount --bind "$root/run" /run
mount --bind "$root/etc" /etc/libvirt
mount --bind "$root/lib" /var/lib/libvirt
mount --bind "$root/log" /var/log/libvirt
mount --bind "$root/cache" /var/cache/libvirt
mount --bind "$hosts" /etc/hosts
mount --bind "$root/passwd" /etc/passwd
mount --bind "$root/group" /etc/group
hostname "$fqdn"
virtlogd -d
for i in $(seq 1 100); do [ -S /run/libvirt/virtlogd-sock ] && break; sleep 0.05; done
[ -S /run/libvirt/virtlogd-sock ] || { echo "virtlogd did not start" >&2; exit 1; }
exec libvirtd -d --listen
SCRIPT
  local fqdn="$host.$TB_ID.test"
  tb_exec "$host" unshare --mount --uts --propagation private bash "$root/start.sh" "$root" "$fqdn" "$TB_DIR/hosts" \
    >"$TB_LOGS/libvirtd-$host.log" 2>&1 || tb_fail "starting libvirtd on $host (see $TB_LOGS/libvirtd-$host.log)"
  tb_wait_unix "$root/run/libvirt/libvirt-sock" 10 || tb_fail "libvirtd on $host did not create its socket (see $root/log/libvirtd.log)"
  tb_wait_port "$host" "$addr" 16509 10 || tb_fail "libvirtd on $host does not listen on [$addr]:16509"
  # The first call waits for QEMU capability probing.
  timeout "$timeout" virsh -q -c "$(tb_libvirt_uri "$host")" version >/dev/null ||
    tb_fail "libvirtd on $host does not answer (see $root/log/libvirtd.log)"
  tb_log "libvirtd on $host: $(tb_libvirt_uri "$host" tcp) (hostname $fqdn, host uuid $uuid)"
}

tb_libvirt_uri() {  # HOST [unix|tcp]
  local host=$1
  case "${2:-unix}" in
    unix) printf 'qemu+unix:///system?socket=%s\n' "$TB_DIR/libvirt/$host/run/libvirt/libvirt-sock" ;;
    tcp) printf 'qemu+tcp://%s/system\n' "$host.$TB_ID.test" ;;
    *) tb_fail "tb_libvirt_uri HOST [unix|tcp]" ;;
  esac
}

tb_virsh() {  # HOST ARGS...
  local host=$1
  shift
  virsh -c "$(tb_libvirt_uri "$host")" "$@"
}

# One /etc/hosts for every libvirt host of the run: HOST.$TB_ID.test for each
# host address. Rewritten in place, so bind mounts of it see updates.
_tb_write_hosts() {
  local f="$TB_DIR/hosts" n
  {
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n'
    for n in "${!_TB_KIND[@]}"; do
      [[ "${_TB_KIND[$n]}" == host ]] || continue
      [[ -z "${_TB_ADDR6[$n]:-}" ]] || printf '%s %s.%s.test\n' "${_TB_ADDR6[$n]}" "$n" "$TB_ID"
      [[ -z "${_TB_ADDR4[$n]:-}" ]] || printf '%s %s.%s.test\n' "${_TB_ADDR4[$n]}" "$n" "$TB_ID"
    done
  } >"$f.new"
  cat "$f.new" >"$f"
  rm -f "$f.new"
}

# ---------------------------------------------------------------- as a command

# `bash tests/kit/testbed.sh cleanup-stale` removes leftovers of dead runs
# (what tb_init does anyway); `list` shows the runs the kit knows about.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in
    cleanup-stale)
      [[ $(id -u) -eq 0 ]] || { echo "needs root" >&2; exit 1; }
      tb_cleanup_stale
      ;;
    list)
      for d in "$TB_STATE_ROOT"/tb*; do
        [[ -d "$d" ]] || continue
        read -r pid start <"$d/owner" 2>/dev/null || pid="?"
        state=dead
        [[ "$pid" != "?" ]] && _tb_alive "$pid" "$start" && state="alive (pid $pid)"
        printf '%s %s namespaces: %s\n' "${d##*/}" "$state" \
          "$(ip netns list | awk '{print $1}' | grep "^${d##*/}-" | tr '\n' ' ')"
      done
      ;;
    *)
      echo "usage: source tests/kit/testbed.sh (see docs/testbed.md), or: bash $0 cleanup-stale|list" >&2
      exit 2
      ;;
  esac
fi

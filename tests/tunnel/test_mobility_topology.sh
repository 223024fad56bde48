#!/usr/bin/env bash
# The issue-3 topology itself, before any daemon: with the guest at home (on
# the home link through hh's VM bridge) the CN reaches it over the WAN by
# ping (IPv6 and IPv4) and a TCP stream arrives intact (sha256). With the
# guest moved to a foreign VM bridge and no tunnel, the CN must NOT reach it
# (the foreign VM bridges are isolated; the only way back is the tunnel), and
# neither the CN nor the foreign hosts can reach each other directly. Moving
# it back home restores the path. This is the baseline every mobility test
# builds on.
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}"
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
tb_init
mob_topology --cn-rtt 20 --foreign-rtt 10

# Warm-up (neighbour discovery across the WAN), then the real checks.
tb_ping cn "$MOB_HOA6" 1 0.1 2 >/dev/null || true
mob_ping_ok cn "$MOB_HOA6" 5
mob_ping_ok cn "$MOB_HOA4" 5
out=$(tb_ping cn "$MOB_HOA6" 5 0.05)
min=$(tb_field min_ms "$out")
awk -v m="$min" 'BEGIN { exit !(m >= 20) }' || tb_fail "CN -> guest should cross the 20 ms WAN: $out"
mob_ping_ok guest "$MOB_CN6" 3
mob_ping_ok guest "$MOB_CN4" 3
mob_ping_ok ha "${MOB_COA[a]}" 3
mob_ping_ok ha "${MOB_COA[b]}" 3
mob_ping_ok a "$MOB_HA6" 3

# Sites that must not see each other: foreign <-> CN.
out=$(tb_ping a "$MOB_CN6" 2 0.1 0.5 || true)
[[ "$(tb_field received "$out")" == 0 ]] || tb_fail "foreign host a reached the CN directly: $out"

# A stream at home, intact.
mob_stream_start home "$MOB_HOA6" 5001 4000000 8000000
mob_stream_advance 2000000
mob_stream_finish

# Away without a tunnel: unreachable.
mob_guest_detach
mob_guest_attach a
out=$(tb_ping cn "$MOB_HOA6" 3 0.1 0.5 || true)
[[ "$(tb_field received "$out")" == 0 ]] || tb_fail "guest at a reachable without a tunnel: $out"
out=$(tb_ping guest "$MOB_CN6" 3 0.1 0.5 || true)
[[ "$(tb_field received "$out")" == 0 ]] || tb_fail "guest at a reached the CN without a tunnel: $out"
tb_log "guest at a without a tunnel: unreachable, as it must be"

# Back home through b (the link really moves between namespaces).
mob_guest_detach
mob_guest_attach b
[[ "$(tb_exec b ip -o link show "$MOB_GUEST_PEER" | grep -c "master ${MOB_VMBR[b]}")" == 1 ]] ||
  tb_fail "guest link not in b's VM bridge"
mob_guest_detach
mob_guest_attach hh
# The router's neighbour entry may still be valid; a new ping must work.
mob_ping_ok cn "$MOB_HOA6" 5
mob_ping_ok cn "$MOB_HOA4" 5
tb_log "PASS"

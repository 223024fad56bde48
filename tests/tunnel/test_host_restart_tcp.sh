#!/usr/bin/env bash
# A guest's TCP session survives a restart of kagemusha-tunneld on the
# foreign host (issue 3 §2): with the real home agent (kagemusha-ha, RFC 4285
# authentication) and the shared mobility topology (tests/tunnel/topology.sh),
# a CN streams to the guest's home address; the guest moves to foreign host a;
# the daemon there is stopped with SIGTERM and started again with the same
# state dir; it must resume the session by itself (no activate), re-register
# with a higher sequence number, and the stream must keep flowing and end
# intact (sha256 of the bytes received equals the bytes sent) after the guest
# returns home. Reports the stall the restart caused.
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}"
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
mob_require_daemons
tb_init
mob_topology --cn-rtt 20 --foreign-rtt 10
mob_ha_start --dad optimistic
mob_tunneld_start hh
mob_tunneld_start a

mob_ping_ok cn "$MOB_HOA6" 3
mob_stream_start s6 "$MOB_HOA6" 5001 1000000 10000000
mob_stream_advance 1000000

mob_move a
mob_wait_registered a
mob_stream_advance 1000000 60
seq_before=$(mob_tunneld a status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sessions"][0]["bindings"][0]["seq"])')

# ---- restart the daemon under the running stream ----
bytes0=$(mob_stream_bytes)
t0=$(date +%s.%N)
tb_stop "${MOB_TUNNELD_PID[a]}"
mob_tunneld_start a
mob_wait_registered a 20
t1=$(date +%s.%N)
seq_after=$(mob_tunneld a status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sessions"][0]["bindings"][0]["seq"])')
((seq_after > seq_before)) || tb_fail "resumed with sequence $seq_after, not above $seq_before"
tb_log "restart: stopped -> re-registered in $(echo "$t1 - $t0" | bc) s; sequence $seq_before -> $seq_after"
t2=$(date +%s.%N)
mob_stream_advance 1000000 60
t3=$(date +%s.%N)
tb_log "stream moved 1 MB more within $(echo "$t3 - $t2" | bc) s after re-registration (was at $bytes0 bytes when stopped)"
mob_ping_ok cn "$MOB_HOA6" 5

mob_move hh
mob_wait_deregistered 20
mob_stream_advance 1000000 60
mob_stream_finish 120
tb_log "PASS: $MOB_STREAM_RESULT"

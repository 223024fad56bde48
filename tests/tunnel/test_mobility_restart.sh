#!/usr/bin/env bash
# Restarts under a live session: with the guest at foreign host A and a TCP
# stream from the CN running through the tunnel,
#   1. kagemusha-tunneld on A is stopped (SIGTERM) and started again on the
#      same --state-dir: it resumes the persisted session (new TAP on the VM
#      bridge) and re-registers with a sequence number above the last one;
#   2. kagemusha-ha is killed (SIGKILL, no chance to save anything) and
#      started again on the same --state-dir: it restores the binding from
#      its journal and takes the traffic again;
#   3. kagemusha-tunneld is killed with SIGKILL and started again.
# After each step the stream advances, the CN pings the home address, and
# the status JSON shows the binding (HA: care-of = A; tunneld: registered).
# At the end the stream completes with equal sha256 on both ends.
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
mob_tunneld_start a

tb_ping cn "$MOB_HOA6" 1 0.1 2 >/dev/null || true
mob_stream_start sr "$MOB_HOA6" 5004 2000000 30000000
mob_stream_advance 1000000
mob_move a
mob_wait_registered a
mob_stream_advance 2000000 90

ha_seq() { mob_ha_status | mob_json ha_field "$MOB_HOA6" sequence; }
check_alive() {  # WHAT
  mob_stream_advance 3000000 120
  mob_ping_ok cn "$MOB_HOA6" 5
  [[ "$(mob_ha_status | mob_json ha_coa "$MOB_HOA6")" == "${MOB_COA[a]}" ]] ||
    tb_fail "after $1 the HA binding is not at a: $(mob_ha_status)"
  [[ "$(mob_tunneld a status --json | mob_json session_state "$MOB_SESSION")" == registered ]] ||
    tb_fail "after $1 the session is not registered: $(mob_tunneld a status --json)"
  tb_log "after $1: stream at $(mob_stream_bytes) bytes, HA seq $(ha_seq)"
}

# 1. tunneld: SIGTERM + start.
seq0=$(ha_seq)
tb_stop "${MOB_TUNNELD_PID[a]}" 5
mob_tunneld_start a
tb_wait_for 30 _mob_session_is a registered || tb_fail "resumed session not registered: $(mob_tunneld a status --json)"
seq1=$(ha_seq)
[[ "$seq1" != "$seq0" ]] || tb_fail "the restarted tunneld did not re-register (HA sequence still $seq0)"
(( (seq1 - seq0 + 65536) % 65536 < 32768 )) || tb_fail "HA sequence went backwards: $seq0 -> $seq1"
check_alive "tunneld restart (SIGTERM)"

# 2. HA: SIGKILL + start.
kill -KILL "$MOB_HA_PID"
wait "$MOB_HA_PID" 2>/dev/null || true
mob_ha_start --dad rfc
tb_wait_for 20 _mob_ha_bound_to "${MOB_COA[a]}" || tb_fail "restarted HA did not restore the binding: $(mob_ha_status)"
tb_log "HA restart: $(grep -m1 'ready' "$TB_SPAWN_LOG" || true)"
check_alive "HA restart (SIGKILL)"
enc=$(mob_ha_status | mob_json ha_counter encapsulated)
((enc > 100)) || tb_fail "the restarted HA carries no traffic (encapsulated=$enc)"

# 3. tunneld: SIGKILL + start.
seq2=$(ha_seq)
kill -KILL "${MOB_TUNNELD_PID[a]}"
wait "${MOB_TUNNELD_PID[a]}" 2>/dev/null || true
mob_tunneld_start a
tb_wait_for 30 _mob_session_is a registered || tb_fail "session not registered after SIGKILL restart: $(mob_tunneld a status --json)"
tb_wait_for 20 sh -c "[ \"\$(ip netns exec $(tb_ns ha) $(mob_ha_bin) status --control $(mob_ha_ctl) --json | grep -o '\"sequence\":[0-9]*')\" != '\"sequence\":$seq2' ]" ||
  tb_fail "tunneld restarted after SIGKILL did not re-register (HA sequence still $seq2)"
check_alive "tunneld restart (SIGKILL)"

mob_stream_finish 180
tb_log "PASS: $MOB_STREAM_RESULT through tunneld TERM/KILL and HA KILL restarts (HA seq $seq0 -> $(ha_seq))"

#!/usr/bin/env bash
# The kit leaves nothing behind: after a normal exit, a `set -e` failure
# halfway, SIGTERM and SIGINT, no namespace, interface, process, temp dir or
# state of the run remains; after SIGKILL (no trap runs) tb_cleanup_stale
# removes the leftovers. Also: tb_skip exits 77 and says SKIP loudly.
set -euo pipefail
KIT="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}/tests/kit/testbed.sh"
# shellcheck source=tests/kit/testbed.sh
source "$KIT"
tb_init

# A child test: builds two sites with a WAN, spawns a long-running process in
# src, records what it made, then ends the way $MODE says.
cat >"$TB_DIR/child.sh" <<'CHILD'
set -euo pipefail
# shellcheck source=tests/kit/testbed.sh
source "$KIT"
tb_init
tb_two_sites 10 0
tb_spawn src sleep 300
echo "$TB_ID $TB_DIR $TB_SPAWN_PID ${_TB_WAN_PID[wan]}" >"$INFO"
tb_wait_for 30 test -e "$INFO.go"   # the parent has looked at what we made
case "$MODE" in
  exit) exit 0 ;;
  fail) false; echo "not reached" ;;      # set -e aborts here
  signal) tb_spawn - sleep 60; wait ;;    # killed from outside
  skip) tb_skip "testing tb_skip" ;;
esac
CHILD
export KIT

netns_of() { ip netns list | awk '{print $1}' | grep "^$1-" || true; }

assert_clean() {  # ID DIR PIDS...
  local id=$1 dir=$2 p
  shift 2
  [[ -z "$(netns_of "$id")" ]] || tb_fail "namespaces of run $id left behind: $(netns_of "$id" | tr '\n' ' ')"
  ! ip -o link | grep -q "$id" || tb_fail "interfaces of run $id left in the root namespace"
  [[ ! -e "$dir" ]] || tb_fail "temp dir $dir of run $id left behind"
  [[ ! -e "$TB_STATE_ROOT/$id" ]] || tb_fail "state of run $id left behind"
  for p in "$@"; do
    ! tb_pid_alive "$p" || tb_fail "process $p of run $id still alive"
  done
}

run_child() {  # MODE [SIGNAL]  -> sets ID DIR SPAWNED WANEM RC
  local info="$TB_DIR/info.$1"
  rm -f "$info"
  # A background job of a script starts with SIGINT ignored, and bash cannot
  # trap a signal ignored at entry; restore the default as a terminal would.
  INFO=$info MODE=$1 env --default-signal=INT bash "$TB_DIR/child.sh" 2>"$TB_DIR/child.$1.err" &
  local pid=$!
  tb_wait_for 30 test -s "$info" || { cat "$TB_DIR/child.$1.err" >&2; tb_fail "child ($1) did not set up"; }
  read -r ID DIR SPAWNED WANEM <"$info"
  [[ -n "$(netns_of "$ID")" ]] || tb_fail "child ($1) made no namespaces?"
  tb_pid_alive "$SPAWNED" || tb_fail "child ($1): spawned process not running"
  touch "$info.go"
  if [[ -n "${2:-}" ]]; then
    sleep 0.2
    kill -"$2" "$pid"
  fi
  RC=0
  wait "$pid" || RC=$?
}

run_child exit
((RC == 0)) || tb_fail "normal exit returned $RC"
assert_clean "$ID" "$DIR" "$SPAWNED" "$WANEM"
tb_log "normal exit: clean"

run_child fail
((RC == 1)) || tb_fail "set -e failure should exit 1, got $RC"
assert_clean "$ID" "$DIR" "$SPAWNED" "$WANEM"
tb_log "set -e failure: exit 1, clean"

run_child signal TERM
((RC == 143)) || tb_fail "SIGTERM should exit 143, got $RC"
assert_clean "$ID" "$DIR" "$SPAWNED" "$WANEM"
tb_log "SIGTERM: exit 143, clean"

run_child signal INT
((RC == 130)) || tb_fail "SIGINT should exit 130, got $RC"
assert_clean "$ID" "$DIR" "$SPAWNED" "$WANEM"
tb_log "SIGINT: exit 130, clean"

run_child skip
((RC == 77)) || tb_fail "tb_skip should exit 77, got $RC"
grep -q '^SKIP: testing tb_skip' "$TB_DIR/child.skip.err" || tb_fail "tb_skip did not print 'SKIP: reason'"
assert_clean "$ID" "$DIR" "$SPAWNED" "$WANEM"
tb_log "tb_skip: exit 77, clean"

run_child signal KILL
((RC == 137)) || tb_fail "SIGKILL should exit 137, got $RC"
[[ -n "$(netns_of "$ID")" ]] || tb_fail "after SIGKILL the namespaces should still be there (no trap can run)"
tb_pid_alive "$SPAWNED" || tb_fail "after SIGKILL the spawned process should still run"
tb_cleanup_stale 2>&1 | sed 's/^/  stale: /' >&2
assert_clean "$ID" "$DIR" "$SPAWNED" "$WANEM"
tb_log "SIGKILL + tb_cleanup_stale: clean"

# tb_cleanup_stale must not touch a live run: ours.
[[ -d "$TB_STATE_ROOT/$TB_ID" && -d "$TB_DIR" ]] || tb_fail "tb_cleanup_stale removed the live run's state"
tb_log "PASS"

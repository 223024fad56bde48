# tests/storage/lib.sh: storage-specific helpers for the integration tests in
# tests/storage/, examples/demo-storage-relocation.sh and bench/storage.sh.
#
# Source it from a bash script. It sources the shared test-bed kit
# (tests/kit/testbed.sh), which owns process spawning, waiting, skipping,
# failing and cleanup; this file only adds what is specific to NBD storage:
# starting kagemusha-nbd / nbdkit / qemu-nbd and waiting until they serve,
# making random sparse images, md5 of an export, and reading the proxy's
# control status.
#
# Every helper that starts a process goes through st_spawn (a wrapper around
# the kit's tb_spawn) so the kit's trap cleans it up. Names passed to st_spawn
# are logical names ("target", "remote", "proxy"); the pid is kept in
# ST_PID[name] and the log in $ST_DIR/name.log.

ST_SOURCE=${KAGEMUSHA_SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
ST_BUILD=${KAGEMUSHA_BUILD:-$ST_SOURCE/build}
ST_NBD=$ST_BUILD/cli/kagemusha-nbd
ST_WANEM=$ST_BUILD/tests/kit/kagemusha-wanem
# The system python3: python3-libnbd (module nbd) is installed for it, not
# for whatever python3 comes first on PATH (pyenv etc.). nbdsh runs
# `python3 -m nbd` through PATH, so the function below pins it.
ST_PY=/usr/bin/python3
nbdsh() { "$ST_PY" -m nbd "$@"; }

if [[ ! -r $ST_SOURCE/tests/kit/testbed.sh ]]; then
  echo "SKIP: shared test-bed kit $ST_SOURCE/tests/kit/testbed.sh is missing"
  exit 77
fi
# shellcheck source=../kit/testbed.sh
source "$ST_SOURCE/tests/kit/testbed.sh"

declare -gA ST_PID=()  # logical name -> pid
declare -gA ST_LOG=()  # logical name -> stdout+stderr log

# st_init TOOL... : starts a run (the kit's tb_init: run id, temp dir, cleanup
# trap), checks that each TOOL is installed and that kagemusha-nbd is built
# (skip otherwise). Sets ST_DIR, the run's private temporary directory.
st_init() {
  tb_init
  ST_DIR=$TB_DIR
  tb_require_cmd nbdinfo md5sum "$@"
  [[ -x $ST_NBD ]] || tb_skip "kagemusha-nbd is not built at $ST_NBD (KAGEMUSHA_BUILD=$ST_BUILD)"
}

st_log() { tb_log "$@"; }

# st_pass : the test's checks all passed.
st_pass() {
  tb_log "PASS: $(basename "$0" .sh)"
  exit 0
}

# st_spawn NAME NODE CMD... : starts CMD through the kit in NODE's namespace
# ("-" = this one); the kit kills it at teardown. ST_PID[NAME] is its pid and
# ST_LOG[NAME] its stdout+stderr log.
st_spawn() {
  local name=$1 node=$2; shift 2
  tb_spawn --name "$name" "$node" "$@"
  ST_PID[$name]=$TB_SPAWN_PID
  ST_LOG[$name]=$TB_SPAWN_LOG
}

# st_stop NAME [KILL] : stops NAME (TERM, then KILL after a grace time, via
# the kit), or with KILL sends SIGKILL at once (a crash), and reaps it.
st_stop() {
  local name=$1 pid=${ST_PID[$1]:-}
  [[ -n $pid ]] || return 0
  if [[ ${2:-} == KILL ]]; then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  else
    tb_stop "$pid" 5
  fi
  unset "ST_PID[$name]"
}

st_alive() { [[ -n ${ST_PID[$1]:-} ]] && kill -0 "${ST_PID[$1]}" 2>/dev/null; }

# st_hostport ADDR PORT : "a.b.c.d:port" or "[v6]:port".
st_hostport() { if [[ $1 == *:* ]]; then echo "[$1]:$2"; else echo "$1:$2"; fi; }

# --- images -----------------------------------------------------------------

# st_make_image PATH MIB : a sparse raw image of MIB MiB; random data in the
# first MiB of every 4 MiB, a random 64 KiB run every 4 MiB + 2 MiB, the last
# MiB random, holes elsewhere. Enough variety for md5 checks to catch
# misplaced or missing blocks.
st_make_image() {
  local path=$1 mib=$2 i
  rm -f "$path"
  truncate -s "${mib}M" "$path"
  for ((i = 0; i < mib; i += 4)); do
    dd if=/dev/urandom of="$path" bs=1M count=1 seek="$i" conv=notrunc status=none
    if ((i + 2 < mib)); then
      dd if=/dev/urandom of="$path" bs=64K count=1 seek=$(((i + 2) * 16)) conv=notrunc status=none
    fi
  done
  dd if=/dev/urandom of="$path" bs=1M count=1 seek=$((mib - 1)) conv=notrunc status=none
}

# st_make_dense PATH MIB : fully random (no holes); for benchmarks.
st_make_dense() {
  local path=$1 mib=$2
  dd if=/dev/urandom of="$path" bs=1M count="$mib" status=none iflag=fullblock
}

st_md5_file() { md5sum "$1" | cut -d' ' -f1; }

# st_md5_uri URI : md5 of a whole export, read through nbdcopy to stdout.
st_md5_uri() {
  local out
  out=$(set -o pipefail; nbdcopy -- "$1" - | md5sum) || return 1
  echo "${out%% *}"
}

# st_uri_unix SOCKET [EXPORT]
st_uri_unix() { echo "nbd+unix:///${2:-}?socket=$1"; }
# st_uri_tcp HOST PORT [EXPORT]
st_uri_tcp() {
  local host=$1
  [[ $host == *:* ]] && host="[$host]"
  echo "nbd://$host:$2/${3:-}"
}

# --- servers ----------------------------------------------------------------

# st_nbd_serve NAME ARGS... : starts `kagemusha-nbd serve --json ARGS` and
# waits for its {"event":"listening"} line. ST_ENDPOINTS[NAME] is the
# endpoint list (one per line) as printed by the server.
declare -gA ST_ENDPOINTS=()
st_nbd_serve() {
  local name=$1; shift
  st_nbd_serve_in - "$name" "$@"
}

# st_nbd_serve_in NODE NAME ARGS... : the same inside a kit node (namespace).
st_nbd_serve_in() {
  local node=$1 name=$2; shift 2
  st_spawn "$name" "$node" "$ST_NBD" serve --json --log-file "$ST_DIR/$name.server.log" "$@"
  st_wait_listening "$name" 30
}

# st_wait_listening NAME TIMEOUT : polls NAME's output for the listening event.
st_wait_listening() {
  local name=$1 timeout=$2 log=${ST_LOG[$1]} i eps
  for ((i = 0; i < timeout * 10; i++)); do
    if [[ -f $log ]]; then
      eps=$("$ST_PY" - "$log" <<'EOF'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        ev = json.loads(line)
    except ValueError:
        continue
    if ev.get("event") == "listening":
        for ep in ev.get("endpoints", []):
            print(ep if isinstance(ep, str) else json.dumps(ep))
        sys.exit(0)
sys.exit(1)
EOF
) && { ST_ENDPOINTS[$name]=$eps; return 0; }
    fi
    if ! st_alive "$name"; then
      cat "$log" "$ST_DIR/$name.server.log" >&2 2>/dev/null || true
      tb_fail "$name exited before listening"
    fi
    sleep 0.1
  done
  cat "$log" >&2 || true
  tb_fail "$name did not print a listening event within ${timeout}s"
}

# st_tcp_port NAME : the port of NAME's first TCP endpoint ("host:port",
# "[v6]:port", "tcp://host:port" or {"port":N} are understood).
st_tcp_port() {
  local ep port
  while IFS= read -r ep; do
    if [[ $ep == \{* ]]; then
      port=$("$ST_PY" -c 'import json,sys; print(json.loads(sys.argv[1]).get("port",""))' "$ep")
    elif [[ $ep != unix:* && $ep != /* && $ep =~ :([0-9]+)$ ]]; then
      port=${BASH_REMATCH[1]}
    else
      port=
    fi
    [[ -n $port && $port != 0 ]] && { echo "$port"; return 0; }
  done <<<"${ST_ENDPOINTS[$1]:-}"
  tb_fail "no TCP endpoint for $1 in: ${ST_ENDPOINTS[$1]:-}"
}

# st_nbdkit NAME SOCKET FILE [EXTRA nbdkit args before the plugin]... :
# `nbdkit -t 16 file` on a Unix socket, export name "" (nbdkit serves any).
st_nbdkit() {
  local name=$1 sock=$2 file=$3; shift 3
  st_spawn "$name" - nbdkit -f -t 16 -U "$sock" "$@" file "$file"
  st_wait_nbd "$(st_uri_unix "$sock")" 20 "$name"
}

# st_qemu_nbd NAME SOCKET FILE [EXPORT] : qemu-nbd, 8 clients, persistent.
st_qemu_nbd() {
  local name=$1 sock=$2 file=$3 exp=${4:-}
  local args=(-f raw --shared=8 -t -k "$sock" --cache=none --aio=threads)
  [[ -n $exp ]] && args+=(-x "$exp")
  st_spawn "$name" - qemu-nbd "${args[@]}" "$file"
  st_wait_nbd "$(st_uri_unix "$sock" "$exp")" 20 "$name"
}

# st_wait_nbd URI TIMEOUT [NAME] : waits until an NBD handshake on URI works.
st_wait_nbd() {
  local uri=$1 timeout=$2 name=${3:-} i
  for ((i = 0; i < timeout * 10; i++)); do
    nbdinfo --size -- "$uri" >/dev/null 2>&1 && return 0
    if [[ -n $name ]] && ! st_alive "$name"; then
      cat "${ST_LOG[$name]}" >&2 || true
      tb_fail "$name exited before serving $uri"
    fi
    sleep 0.1
  done
  tb_fail "no NBD server answered at $uri within ${timeout}s"
}

# --- proxy control ----------------------------------------------------------

# st_status CONTROL [EXPORT] : `kagemusha-nbd status --json` output.
st_status() {
  local args=(status --control "$1" --json)
  [[ -n ${2:-} ]] && args+=(--export "$2")
  "$ST_NBD" "${args[@]}"
}

# st_json_get KEY... < JSON : prints the value of the first of the KEYs found
# anywhere in the JSON document (depth first), as JSON (true/false/123/"s"
# printed without quotes). Exit 1 if none is present.
st_json_get() {
  "$ST_PY" -c '
import json, sys
keys = sys.argv[1:]
doc = json.loads(sys.stdin.read() or "null")
def find(o, k):
    if isinstance(o, dict):
        if k in o:
            return True, o[k]
        for v in o.values():
            ok, r = find(v, k)
            if ok:
                return True, r
    elif isinstance(o, list):
        for v in o:
            ok, r = find(v, k)
            if ok:
                return True, r
    return False, None
for k in keys:
    ok, v = find(doc, k)
    if ok:
        print(v if isinstance(v, str) else json.dumps(v))
        sys.exit(0)
sys.exit(1)
' "$@"
}

# st_status_get CONTROL KEY... : one field of the proxy status.
st_status_get() {
  local ctl=$1; shift
  st_status "$ctl" | st_json_get "$@"
}

# st_wait_fill CONTROL TIMEOUT : waits until the status says complete; fails
# (printing the last status) on timeout.
st_wait_fill() {
  local ctl=$1 timeout=$2 i s c
  for ((i = 0; i < timeout * 4; i++)); do
    s=$(st_status "$ctl" 2>&1) || s=
    c=$(st_json_get complete <<<"$s" 2>/dev/null) || c=
    [[ $c == true ]] && return 0
    sleep 0.25
  done
  echo "last status: $s" >&2
  tb_fail "fill did not complete within ${timeout}s"
}

# st_wait_committed CONTROL TIMEOUT : waits until every present block's bit
# is written to the bitmap file (blocks_committed == blocks_present): the
# proxy's group commits of what it fetched are done.
st_wait_committed() {
  local ctl=$1 timeout=$2 i s p c
  for ((i = 0; i < timeout * 5; i++)); do
    s=$(st_status "$ctl" 2>&1) || s=
    p=$(st_json_get blocks_present <<<"$s" 2>/dev/null) || p=
    c=$(st_json_get blocks_committed <<<"$s" 2>/dev/null) || c=
    [[ -n $p && $p == "$c" ]] && return 0
    sleep 0.2
  done
  echo "last status: $s" >&2
  tb_fail "the proxy's commits did not finish within ${timeout}s"
}

# st_proxy_spec NAME URI CACHE BITMAP [OPTS] : the --proxy argument.
st_proxy_spec() {
  local s="$1=$2,cache=$3,bitmap=$4"
  [[ -n ${5:-} ]] && s+=",$5"
  echo "$s"
}

# --- assertions -------------------------------------------------------------

# st_assert_eq WHAT EXPECTED ACTUAL
st_assert_eq() {
  if [[ $2 != "$3" ]]; then
    tb_fail "$1: expected '$2', got '$3'"
  fi
  st_log "ok: $1 = $3"
}

# st_expect_fail WHAT CMD... : CMD must exit non-zero.
st_expect_fail() {
  local what=$1; shift
  if "$@" >"$ST_DIR/expect_fail.out" 2>&1; then
    cat "$ST_DIR/expect_fail.out" >&2
    tb_fail "$what: command succeeded but should have failed: $*"
  fi
  st_log "ok: $what failed as expected"
}

# st_qemu_io URI CMD... : runs qemu-io -f raw with each CMD as a -c; fails the
# test if qemu-io fails or prints an error/mismatch. Output in $ST_DIR/qemu-io.out.
st_qemu_io() {
  local uri=$1; shift
  local args=() c
  for c in "$@"; do args+=(-c "$c"); done
  if ! qemu-io -f raw "${args[@]}" "$uri" >"$ST_DIR/qemu-io.out" 2>&1; then
    cat "$ST_DIR/qemu-io.out" >&2
    tb_fail "qemu-io failed on $uri"
  fi
  if grep -E -i 'fail|error|mismatch|pattern verification' "$ST_DIR/qemu-io.out" >&2; then
    tb_fail "qemu-io reported an error on $uri"
  fi
}

# st_apply_pattern FILE OFFSET LENGTH BYTE : writes LENGTH bytes of BYTE
# (0x..) at OFFSET into a local file, as qemu-io `write -P BYTE` does.
st_apply_pattern() {
  "$ST_PY" - "$@" <<'EOF'
import sys
path, off, length, byte = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0), int(sys.argv[4], 0)
with open(path, "r+b") as f:
    f.seek(off)
    f.write(bytes([byte]) * length)
EOF
}

# --- proxy scenarios shared by several tests ---------------------------------

# st_proxy_writes_expected SRC EXPECTED : the client writes used by the proxy
# tests (partial blocks in unfetched areas, a full block, one spanning two
# blocks, a write-zeroes) applied to a local copy, so that EXPECTED is what
# the proxy export must hold. st_proxy_writes_qemu_io prints them as qemu-io
# commands.
ST_PROXY_WRITES=(
  "0x5a 4096 4096"        # partial block 0 (random data around it)
  "0x5b 1048576 65536"    # one whole 64 KiB block at 1 MiB
  "0x5c 2162688 131072"   # spans blocks, starts mid-block (2 MiB + 64K)
  "0x5d 67174400 512"     # 512 bytes at 64 MiB + 64 KiB (maybe a hole)
  "0x5e 33619968 20480"   # partial in the middle
)
st_proxy_writes_expected() {
  cp --sparse=always "$1" "$2"
  local w p o l
  for w in "${ST_PROXY_WRITES[@]}"; do
    read -r p o l <<<"$w"
    st_apply_pattern "$2" "$o" "$l" "$p"
  done
  # write -z 8M 128k
  st_apply_pattern "$2" $((8 << 20)) $((128 << 10)) 0
}
st_proxy_writes_qemu_io() {
  local w p o l
  for w in "${ST_PROXY_WRITES[@]}"; do
    read -r p o l <<<"$w"
    echo "write -P $p $o $l"
  done
  echo "write -z 8M 128k"
  echo "flush"
  for w in "${ST_PROXY_WRITES[@]}"; do
    read -r p o l <<<"$w"
    echo "read -P $p $o $l"
  done
  echo "read -P 0 8M 128k"
}

# st_proxy_scenario REMOTE_KIND : the end-to-end copy-on-read check run by
# test_proxy_nbdkit.sh (REMOTE_KIND=nbdkit) and test_proxy_qemu_nbd.sh
# (qemu-nbd). A 128 MiB source is served read-only by the remote; a proxy
# with a rate-limited fill serves it; a client writes while the fill runs;
# the fill completes; the export, and the cache image itself, equal
# source+writes; the proxy switches to target; the remote is killed; reads
# and writes still work; the source file was never modified.
st_proxy_scenario() {
  local kind=$1
  local src=$ST_DIR/src.img exp=$ST_DIR/expected.img cache=$ST_DIR/cache.img
  local bitmap=$ST_DIR/cache.bitmap rsock=$ST_DIR/remote.sock psock=$ST_DIR/proxy.sock
  local ctl=$ST_DIR/control.sock
  st_make_image "$src" 128
  local src_md5; src_md5=$(st_md5_file "$src")
  case $kind in
    nbdkit) st_nbdkit remote "$rsock" "$src" -r ;;
    qemu-nbd) st_spawn remote - qemu-nbd -f raw -r --shared=8 -t -k "$rsock" "$src"
              st_wait_nbd "$(st_uri_unix "$rsock")" 20 remote ;;
    *) tb_fail "unknown remote kind $kind" ;;
  esac
  st_assert_eq "remote serves the source" "$src_md5" "$(st_md5_uri "$(st_uri_unix "$rsock")")"

  # 16 MiB/s: the fill takes ~8 s, so the client's writes land mid-fill.
  st_nbd_serve proxy --unix "$psock" --control "$ctl" \
    --proxy "$(st_proxy_spec vm "$(st_uri_unix "$rsock")" "$cache" "$bitmap" "block-size=65536,fill-rate=16777216")"
  local uri; uri=$(st_uri_unix "$psock" vm)
  st_assert_eq "proxy export size" $((128 << 20)) "$(nbdinfo --size "$uri")"
  st_assert_eq "status mode before the fill" proxy "$(st_status_get "$ctl" mode)"
  [[ $(st_status_get "$ctl" complete) == false ]] || tb_fail "fill complete before it could have run"

  mapfile -t cmds < <(st_proxy_writes_qemu_io)
  st_qemu_io "$uri" "${cmds[@]}"
  st_assert_eq "verified reads of client writes" 6 "$(grep -c '^read ' "$ST_DIR/qemu-io.out")"
  st_proxy_writes_expected "$src" "$exp"
  local want; want=$(st_md5_file "$exp")

  "$ST_NBD" fill rate 0 --control "$ctl"   # 0 = unlimited
  st_wait_fill "$ctl" 60
  local s; s=$(st_status "$ctl")
  st_log "status after fill: $s"
  st_assert_eq "blocks_present == blocks_total" "$(st_json_get blocks_total <<<"$s")" "$(st_json_get blocks_present <<<"$s")"
  st_assert_eq "proxy export md5 (source + writes)" "$want" "$(st_md5_uri "$uri")"
  st_assert_eq "cache image md5 (source + writes)" "$want" "$(st_md5_file "$cache")"

  "$ST_NBD" switch --control "$ctl" --wait
  st_assert_eq "status mode after switch" target "$(st_status_get "$ctl" mode)"
  st_stop remote
  st_assert_eq "export md5 with the remote gone" "$want" "$(st_md5_uri "$uri")"
  st_qemu_io "$uri" "write -P 0x77 100M 64k" "read -P 0x77 100M 64k"
  st_apply_pattern "$exp" $((100 << 20)) $((64 << 10)) 0x77
  st_assert_eq "export md5 after a write in target mode" "$(st_md5_file "$exp")" "$(st_md5_uri "$uri")"
  st_assert_eq "source image never modified" "$src_md5" "$(st_md5_file "$src")"
  st_alive proxy || tb_fail "proxy died"
}

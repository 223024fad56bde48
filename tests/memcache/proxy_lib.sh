# shellcheck shell=bash
# Helpers for the memcache proxy integration tests (test_proxy_*.sh): two
# "hosts" A and B whose QEMU 7.2 processes, encoders and decoders all run in
# one private network namespace on loopback (so fixed ports never clash with
# anything else), each host with its own page store.
#
#   mp_init                      kit init, tools check, namespace, guest blob
#   mp_qemu NAME [ARGS...]       start a QEMU (pc, 64 MiB, paused unless told)
#                                with the random blob loaded at 16 MiB;
#                                QMP at $TB_DIR/NAME.qmp
#   mp_qmp NAME JSON             one QMP command; prints the "return" value
#   mp_proxy encode|decode HOST LISTEN_PORT TO_PORT [ARGS...]   spawn a proxy
#   mp_migrate SRC PORT [postcopy]   migrate SRC to 127.0.0.1:PORT, wait, print status
#   mp_dump NAME FILE            pmemsave all 64 MiB of guest RAM
#   mp_json_field FILE EVENT KEY  last EVENT's KEY from a proxy's JSON log

# shellcheck source=../kit/testbed.sh
source "${KAGEMUSHA_SOURCE:?}/tests/kit/testbed.sh"

MP_BIN=${KAGEMUSHA_BUILD:?}/cli/kagemusha-memcache
MP_RAM_MB=64

mp_init() {
  tb_require_cmd qemu-system-x86_64 python3
  [[ -x "$MP_BIN" ]] || tb_skip "kagemusha-memcache is not built ($MP_BIN)"
  tb_init
  tb_host h
  # Non-zero, checkable guest memory: 16 MiB of random bytes at 16 MiB
  # (a paused pc guest's RAM is otherwise nearly all zero pages).
  head -c $((16 << 20)) /dev/urandom >"$TB_DIR/blob"
  mkdir -p "$TB_DIR/store-A" "$TB_DIR/store-B"
}

mp_qemu() {  # NAME [ARGS...]
  local name=$1
  shift
  tb_spawn --name "qemu-$name" h qemu-system-x86_64 -machine pc -m "$MP_RAM_MB" -nographic \
    -nodefaults -display none -serial none \
    -device loader,file="$TB_DIR/blob",addr=0x1000000,force-raw=on \
    -qmp unix:"$TB_DIR/$name.qmp",server=on,wait=off "$@"
  eval "MP_PID_$name=$TB_SPAWN_PID"
  tb_wait_unix "$TB_DIR/$name.qmp" 20 || tb_fail "QEMU $name did not start: $(cat "$TB_SPAWN_LOG")"
}

mp_qmp() {  # NAME JSON
  python3 - "$TB_DIR/$1.qmp" "$2" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
f = s.makefile("rw")
def reply():
    while True:
        line = f.readline()
        if not line:
            sys.exit("QMP connection closed")
        m = json.loads(line)
        if "return" in m or "error" in m:
            return m
f.readline()  # greeting
f.write('{"execute":"qmp_capabilities"}\n'); f.flush(); reply()
f.write(sys.argv[2] + "\n"); f.flush()
m = reply()
if "error" in m:
    print(json.dumps(m["error"]), file=sys.stderr)
    sys.exit(1)
print(json.dumps(m["return"]))
EOF
}

mp_status() {  # NAME -> running / paused / inmigrate / postmigrate ...
  mp_qmp "$1" '{"execute":"query-status"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])'
}

mp_proxy() {  # encode|decode HOST LISTEN_PORT TO_PORT [ARGS...]
  local role=$1 host=$2 lport=$3 tport=$4
  shift 4
  tb_spawn --name "$role-$host" h "$MP_BIN" "$role" --listen 127.0.0.1:"$lport" \
    --to 127.0.0.1:"$tport" --store "$TB_DIR/store-$host" --vm guest1 --json "$@"
  # shellcheck disable=SC2034  # read by the tests (kill mid-stream)
  MP_PROXY_PID=$TB_SPAWN_PID
  MP_PROXY_LOG=$TB_SPAWN_LOG
  tb_wait_log "$MP_PROXY_LOG" '"event":"listening"' 10 || tb_fail "$role proxy did not start: $(cat "$MP_PROXY_LOG")"
}

mp_set_caps() {  # NAME postcopy
  mp_qmp "$1" '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}' >/dev/null
}

# Migrates and waits for a final state; prints it (completed / failed / ...).
mp_migrate() {  # SRC PORT [postcopy]
  local src=$1 port=$2 mode=${3:-precopy} st i
  mp_qmp "$src" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:$port\"}}" >/dev/null
  if [[ $mode == postcopy ]]; then
    # Switch as soon as the first precopy round is under way.
    for i in $(seq 1 200); do
      st=$(mp_migstatus "$src")
      [[ $st == active ]] && break
      [[ $st == completed || $st == failed ]] && break
      sleep 0.02
    done
    mp_qmp "$src" '{"execute":"migrate-start-postcopy"}' >/dev/null || true
  fi
  for i in $(seq 1 1200); do
    st=$(mp_migstatus "$src")
    case $st in completed | failed | cancelled) echo "$st"; return 0 ;; esac
    sleep 0.05
  done
  echo "timeout($st)"
}

mp_migstatus() {
  mp_qmp "$1" '{"execute":"query-migrate"}' | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status","none"))'
}

mp_dump() {  # NAME FILE
  mp_qmp "$1" "{\"execute\":\"pmemsave\",\"arguments\":{\"val\":0,\"size\":$((MP_RAM_MB << 20)),\"filename\":\"$2\"}}" >/dev/null
}

# mp_finish_hop SRC DST ENC_LOG DEC_LOG TIMEOUT: waits for the migration from
# QEMU SRC to QEMU DST through the proxies whose logs are given, then for both
# proxies' migration-done, and stops SRC. MP_HOP_LINE: kq_wait_migration's
# summary line. Any failure ends the run with both proxies' logs.
mp_finish_hop() {
  MP_HOP_LINE=$(kq_wait_migration "$1" --dst "$2" --timeout "$5") ||
    tb_fail "$1 -> $2: $MP_HOP_LINE; $(cat "$3" "$4")"
  tb_wait_log "$3" '"event":"migration-done"' 30 || tb_fail "encoder: $(cat "$3")"
  tb_wait_log "$4" '"event":"migration-done"' 30 || tb_fail "decoder: $(cat "$4")"
  kq_stop "$1"
}

mp_json_field() {  # FILE EVENT KEY
  python3 - "$1" "$2" "$3" <<'EOF'
import json, sys
val = None
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("event") == sys.argv[2]:
        val = m.get(sys.argv[3])
print("" if val is None else val)
EOF
}

mp_quit() {  # NAME
  local pid_var="MP_PID_$1"
  mp_qmp "$1" '{"execute":"quit"}' >/dev/null 2>&1 || true
  tb_wait_for 10 bash -c "! kill -0 ${!pid_var} 2>/dev/null" || tb_stop "${!pid_var}"
}

# A TCP relay for the WAN leg that damages the encoder->decoder direction:
# flip: XOR one byte at OFFSET; cut: close both ways at OFFSET.
mp_wan_damage() {  # LISTEN_PORT TO_PORT flip|cut OFFSET
  cat >"$TB_DIR/damage.py" <<'PY'
import socket, sys, threading
lport, tport, mode, at = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", lport)); ls.listen(1)
print("listening", flush=True)
a, _ = ls.accept()
b = socket.create_connection(("127.0.0.1", tport))
def back():
    while True:
        d = b.recv(65536)
        if not d: break
        a.sendall(d)
    a.shutdown(socket.SHUT_WR)
threading.Thread(target=back, daemon=True).start()
seen = 0
while True:
    d = a.recv(65536)
    if not d: break
    if seen <= at < seen + len(d):
        if mode == "cut":
            b.sendall(d[:at - seen]); print("cut at", at, flush=True)
            a.close(); b.close(); sys.exit(0)
        d = bytearray(d); d[at - seen] ^= 0x5a; d = bytes(d); print("flipped", at, flush=True)
    seen += len(d)
    b.sendall(d)
b.shutdown(socket.SHUT_WR)
threading.Event().wait(5)
PY
  tb_spawn --name "damage-$3" h python3 "$TB_DIR/damage.py" "$@"
  MP_DAMAGE_LOG=$TB_SPAWN_LOG
  tb_wait_log "$MP_DAMAGE_LOG" listening 10 || tb_fail "damage relay did not start"
}

# True once QEMU NAME's process has exited.
mp_exited() {  # NAME
  local pid_var="MP_PID_$1"
  ! tb_pid_alive "${!pid_var}"
}

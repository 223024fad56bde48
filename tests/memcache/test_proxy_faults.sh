#!/usr/bin/env bash
# Failure handling of the memcache proxies with real QEMU 7.2 processes:
#  1. the decoder's page store is wiped between hops: everything travels
#     literally, the migration still completes with identical memory;
#  2. the encoder is killed (SIGKILL) mid-stream: the source migration
#     fails, the source VM keeps running, the destination QEMU gives up, and
#     a retried migration through fresh proxies succeeds; the same for the
#     decoder (2b);
#  3. one byte flipped on the WAN leg (inside the RAM phase), and
#  4. the WAN leg cut mid-stream: each a clean failure (the destination
#     QEMU's incoming migration fails, it never runs), the source keeps
#     running, and the decoder reports why.
set -euo pipefail
# shellcheck source=proxy_lib.sh
source "$(dirname "$0")/proxy_lib.sh"
mp_init

slow() {  # NAME: 2 MB/s so a fault lands mid-stream
  mp_qmp "$1" '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":2097152}}' >/dev/null
}
fast() {
  mp_qmp "$1" '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":1073741824}}' >/dev/null
}
expect_source_ok_dest_failed() {  # CASE DEST
  local st
  st=$(mp_migrate A "$port")
  [[ $st == failed ]] || tb_fail "$1: source migration status $st, expected failed"
  [[ $(mp_status A) == running ]] || tb_fail "$1: source VM is $(mp_status A), expected running"
  tb_wait_for 20 mp_exited "$2" || tb_fail "$1: destination QEMU still up ($(mp_status "$2"))"
  grep -q "load of migration failed" "$TB_LOGS/qemu-$2.log" ||
    tb_fail "$1: destination QEMU did not report a failed incoming migration: $(cat "$TB_LOGS/qemu-$2.log")"
}

# --- 1. wiped decoder store -------------------------------------------------------------
mp_qemu A
mp_qemu B -S -incoming tcp:127.0.0.1:5003
mp_proxy decode B 5002 5003
mp_proxy encode A 5001 5002
[[ $(mp_migrate A 5001) == completed ]] || tb_fail "case 1 hop 1 failed"
mp_dump B "$TB_DIR/b.bin"
mp_quit A
rm -rf "$TB_DIR/store-A" && mkdir "$TB_DIR/store-A"   # host A lost its cache
mp_qemu A -S -incoming tcp:127.0.0.1:6003
mp_proxy decode A 6002 6003 --once
mp_proxy encode B 6001 6002 --once
ENC=$MP_PROXY_LOG
[[ $(mp_migrate B 6001) == completed ]] || tb_fail "case 1: return hop failed after the store was wiped"
tb_wait_log "$ENC" '"event":"migration-done"' 10 || tb_fail "encoder: $(cat "$ENC")"
mp_dump A "$TB_DIR/a.bin"
cmp -s "$TB_DIR/a.bin" "$TB_DIR/b.bin" || tb_fail "case 1: memory differs"
[[ $(mp_json_field "$ENC" migration-done ref_pages) == 0 ]] || tb_fail "case 1: references into a wiped store"
tb_log "case 1 ok: wiped store, $(mp_json_field "$ENC" migration-done literal_pages) literal pages, memory identical"
mp_quit B
# A now runs the guest (resume it so it is "running" as a source).
mp_qmp A '{"execute":"cont"}' >/dev/null

# --- 2. encoder killed mid-stream, then a retry ----------------------------------------
port=7001
mp_qemu C -S -incoming tcp:127.0.0.1:7003
mp_proxy decode C 7002 7003
mp_proxy encode A 7001 7002
ENC_PID=$MP_PROXY_PID
slow A
mp_qmp A '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:7001"}}' >/dev/null
sleep 1.5
kill -KILL "$ENC_PID"
expect_source_ok_dest_failed "case 2 (encoder killed)" C
tb_log "case 2: source still running after the encoder died; retrying"
mp_qemu C2 -S -incoming tcp:127.0.0.1:7103
mp_proxy decode C 7102 7103 --once
mp_proxy encode A 7101 7102 --once
fast A
[[ $(mp_migrate A 7101) == completed ]] || tb_fail "case 2: the retried migration failed"
mp_dump A "$TB_DIR/a2.bin"
mp_dump C2 "$TB_DIR/c2.bin"
cmp -s "$TB_DIR/a2.bin" "$TB_DIR/c2.bin" || tb_fail "case 2: memory differs after the retry"
tb_log "case 2 ok: retry completed, memory identical"
mp_quit C2
mp_qmp A '{"execute":"cont"}' >/dev/null

# --- 2b. the decoder killed mid-stream --------------------------------------------------
port=7201
mp_qemu E -S -incoming tcp:127.0.0.1:7203
mp_proxy decode E 7202 7203
DEC_PID=$MP_PROXY_PID
mp_proxy encode A 7201 7202 --once
slow A
mp_qmp A '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:7201"}}' >/dev/null
sleep 1.5
kill -KILL "$DEC_PID"
expect_source_ok_dest_failed "case 2b (decoder killed)" E
tb_log "case 2b ok: decoder killed, source still running, destination failed"
fast A

# --- 3. one byte flipped on the WAN leg, 4. WAN cut ----------------------------------------
# With a flipped page byte the decoder refuses at END, after the last RAM
# byte: a precopy source without a return path has written everything by
# then and calls the migration completed whatever the destination thinks
# (plain QEMU behaves the same). With the return-path capability (which
# libvirt-driven migrations should enable too) the source waits for the
# destination's verdict, and the encoder's abort reaches it.
mp_qmp A '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path","state":true}]}}' >/dev/null
n=3
for mode in flip cut; do
  port=$((8001 + n * 100))
  mp_qemu "D$n" -S -incoming tcp:127.0.0.1:$((port + 3))
  mp_proxy decode "D$n" $((port + 2)) $((port + 3)) --once
  DEC=$MP_PROXY_LOG
  mp_wan_damage $((port + 1)) $((port + 2)) "$mode" $((6 << 20))
  mp_proxy encode A "$port" $((port + 1)) --once
  slow A
  expect_source_ok_dest_failed "case $n ($mode)" "D$n"
  tb_wait_log "$DEC" '"event":"migration-aborted"' 20 || tb_fail "case $n: decoder did not abort: $(cat "$DEC")"
  tb_log "case $n ok ($mode): decoder: $(mp_json_field "$DEC" migration-aborted error)"
  n=$((n + 1))
done
fast A
[[ $(mp_status A) == running ]] || tb_fail "source not running at the end"
echo "PASS: wiped store, killed encoder + retry, flipped byte, cut WAN: all clean"

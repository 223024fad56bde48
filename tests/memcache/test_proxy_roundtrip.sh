#!/usr/bin/env bash
# Migrates a running QEMU 7.2 guest A -> B through the memcache encoder and
# decoder, then B -> A back (a fresh QEMU on A whose host still holds the
# pages). Memory must be identical after each hop (pmemsave of all 64 MiB on
# the source after completion vs on the destination); the return hop must
# put far fewer bytes on the WAN leg (encoder -> decoder) than the stream
# QEMU produced (which is what plain migration sends: the proxies rebuild it
# byte for byte). The first hop also measures the proxies' overhead when
# nothing is cached.
set -euo pipefail
# shellcheck source=proxy_lib.sh
source "$(dirname "$0")/proxy_lib.sh"
mp_init

# Hop 1: A (running) -> B (stays paused after the migration).
mp_qemu A
mp_qemu B -S -incoming tcp:127.0.0.1:5003
mp_proxy decode B 5002 5003
DEC1=$MP_PROXY_LOG
mp_proxy encode A 5001 5002
ENC1=$MP_PROXY_LOG
st=$(mp_migrate A 5001)
[[ $st == completed ]] || tb_fail "hop 1 A->B: $st; $(cat "$ENC1" "$DEC1")"
tb_wait_log "$ENC1" '"event":"migration-done"' 10 || tb_fail "encoder A: $(cat "$ENC1")"
tb_wait_log "$DEC1" '"event":"migration-done"' 10 || tb_fail "decoder B: $(cat "$DEC1")"
mp_dump A "$TB_DIR/a1.bin"
mp_dump B "$TB_DIR/b1.bin"
cmp -s "$TB_DIR/a1.bin" "$TB_DIR/b1.bin" || tb_fail "hop 1: memory differs between A and B"
# The random blob is really there (not a zero guest).
cmp -s <(tail -c +$((16 * 1048576 + 1)) "$TB_DIR/b1.bin" | head -c $((16 << 20))) "$TB_DIR/blob" ||
  tb_fail "hop 1: the blob is not at 16 MiB in B's memory"
q1=$(mp_json_field "$ENC1" migration-done qemu_bytes)
w1=$(mp_json_field "$ENC1" migration-done wan_bytes_out)
tb_log "hop 1 (nothing cached): QEMU stream $q1 B, WAN $w1 B, overhead $(((w1 - q1) * 10000 / q1)) / 10000"
mp_quit A

# Hop 2: B -> A2 (a new QEMU on host A; store-A kept the image).
mp_qemu A2 -S -incoming tcp:127.0.0.1:6003
mp_proxy decode A 6002 6003
DEC2=$MP_PROXY_LOG
mp_proxy encode B 6001 6002 --zstd
ENC2=$MP_PROXY_LOG
st=$(mp_migrate B 6001)
[[ $st == completed ]] || tb_fail "hop 2 B->A: $st; $(cat "$ENC2" "$DEC2")"
tb_wait_log "$ENC2" '"event":"migration-done"' 10 || tb_fail "encoder B: $(cat "$ENC2")"
tb_wait_log "$DEC2" '"event":"migration-done"' 10 || tb_fail "decoder A: $(cat "$DEC2")"
mp_dump A2 "$TB_DIR/a2.bin"
cmp -s "$TB_DIR/b1.bin" "$TB_DIR/a2.bin" || tb_fail "hop 2: memory differs between B and A2"
q2=$(mp_json_field "$ENC2" migration-done qemu_bytes)
w2=$(mp_json_field "$ENC2" migration-done wan_bytes_out)
refs=$(mp_json_field "$ENC2" migration-done ref_pages)
tb_log "hop 2 (return): QEMU stream (= plain) $q2 B, WAN $w2 B, $refs pages by reference"
((refs >= 4000)) || tb_fail "hop 2: only $refs pages by reference (the 16 MiB blob is 4096 pages)"
((w2 * 10 < q2)) || tb_fail "hop 2: WAN bytes $w2 not under 10% of the stream's $q2"
# The store tools: stats see the VM; after delete-vm, gc drops its pages
# (4 207 pages by reference, some with equal content: >= 4000 distinct).
"$MP_BIN" store stats --store "$TB_DIR/store-A" --json | grep -q '"guest1"' ||
  tb_fail "store-A has no manifest for guest1"
"$MP_BIN" store delete-vm --store "$TB_DIR/store-B" --vm guest1 >/dev/null || tb_fail "delete-vm"
gc=$("$MP_BIN" store gc --store "$TB_DIR/store-B" --json) || tb_fail "gc: $gc"
dropped=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["dropped_pages"])' "$gc")
((dropped >= 4000)) || tb_fail "gc after delete-vm dropped only $dropped pages: $gc"
"$MP_BIN" store stats --store "$TB_DIR/store-B" --json | grep -q '"vms":\[\]' ||
  tb_fail "store-B still lists a VM: $("$MP_BIN" store stats --store "$TB_DIR/store-B" --json)"
rc=0
"$MP_BIN" store frobnicate --store "$TB_DIR/store-B" 2>/dev/null || rc=$?
((rc == 2)) || tb_fail "an unknown store action exits $rc, expected 2"
echo "PASS: A->B->A through the proxies, memory identical; return hop WAN $w2 B vs plain $q2 B"

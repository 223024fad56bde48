#!/usr/bin/env bash
# A booted Linux guest (the kit's image, 256 MiB) through the memcache
# proxies: memtool fills 64 MiB with a seeded pattern and checksums every
# page; the guest migrates A -> B (precopy), back B -> A (precopy: the return
# hop of an idle guest, measured), then A -> B again in postcopy while
# memtool dirties 25 % of its pages per second (page requests relayed over
# the return path). A plain migration first gives the baseline figures. After every hop `memtool verify` must find every page
# intact on the destination, and the guest keeps running.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=proxy_lib.sh
source "$here/proxy_lib.sh"
# shellcheck source=../kit/qemu.sh
source "$KAGEMUSHA_SOURCE/tests/kit/qemu.sh"
tb_require_cmd qemu-system-x86_64 python3
[[ -x "$MP_BIN" ]] || tb_skip "kagemusha-memcache is not built ($MP_BIN)"
tb_init
kq_guest_image
tb_host h
mkdir -p "$TB_DIR/store-A" "$TB_DIR/store-B"

verify() {  # NAME WHAT
  local out rc=0
  out=$(kq_guest "$1" memtool verify) || rc=$?
  [[ $rc == 0 && "$out" == "OK "* ]] || tb_fail "memory check on $1 ($2): exit $rc: $out"
  tb_log "$1 ($2): $out"
}
hop_start() {  # SRC DST DST_HOST SRC_HOST BASEPORT [kq_migrate options]
  local src=$1 dst=$2 dhost=$3 shost=$4 p=$5
  shift 5
  HOP_SRC=$src HOP_DST=$dst
  mp_proxy decode "$dhost" $((p + 2)) $((p + 3)) --once
  HOP_DEC=$MP_PROXY_LOG
  mp_proxy encode "$shost" "$p" $((p + 2)) --once
  HOP_ENC=$MP_PROXY_LOG
  local -a pc=()
  [[ " $* " != *" --postcopy-manual "* ]] || pc=(--postcopy)
  kq_start "$dst" --ns h --like "$src" --incoming "tcp:127.0.0.1:$((p + 3))" "${pc[@]}"
  kq_migrate "$src" "tcp:127.0.0.1:$p" "$@"
}
hop_end() {
  mp_finish_hop "$HOP_SRC" "$HOP_DST" "$HOP_ENC" "$HOP_DEC" 90
  HOP_LINE=$MP_HOP_LINE
  HOP_Q=$(mp_json_field "$HOP_ENC" migration-done qemu_bytes)
  HOP_W=$(mp_json_field "$HOP_ENC" migration-done wan_bytes_out)
  HOP_R=$(mp_json_field "$HOP_ENC" migration-done ref_pages)
  tb_log "$HOP_SRC -> $HOP_DST: QEMU stream (= plain migration) $HOP_Q B, WAN $HOP_W B, $HOP_R pages by reference; $HOP_LINE"
}

kq_start a --ns h --mem 256
kq_wait_boot a >/dev/null
kq_guest a memtool fill 64 4242 >/dev/null || tb_fail "memtool fill"
verify a "after fill"

# Baseline in the same run: a plain migration (no proxies), A -> A0.
kq_start a0 --ns h --like a --incoming "tcp:127.0.0.1:4003"
kq_migrate a "tcp:127.0.0.1:4003"
plain=$(kq_wait_migration a --dst a0 --timeout 90) || tb_fail "plain migration: $plain"
kq_stop a
tb_log "plain a -> a0: $plain"
verify a0 "after a plain migration"

hop_start a0 b B A 5001
hop_end
verify b "after A->B"
q1=$HOP_Q w1=$HOP_W
tb_log "time, nothing cached: plain total_ms=$(tb_field total_ms "$plain") downtime_ms=$(tb_field downtime_ms "$plain"); proxied total_ms=$(tb_field total_ms "$HOP_LINE") downtime_ms=$(tb_field downtime_ms "$HOP_LINE")"

sleep 2  # idle
hop_start b a2 A B 6001
hop_end
verify a2 "after B->A"
q2=$HOP_Q w2=$HOP_W
((w2 * 4 < q2)) || tb_fail "return hop: WAN $w2 B is not well under the stream's $q2 B"

# Postcopy with a dirtying guest, A -> B again (B's store knows the image).
kq_guest a2 memtool dirty 25 >/dev/null
hop_start a2 c B A 7001 --postcopy-manual --max-bandwidth 16 --max-postcopy-bandwidth 64
sleep 1
kq_postcopy a2
hop_end
reqs=$(tb_field postcopy_requests "$HOP_LINE")
rp=$(mp_json_field "$HOP_ENC" migration-done return_bytes)
((reqs > 0)) || tb_fail "no postcopy page requests: $HOP_LINE"
verify c "after postcopy A->B with dirtying"
echo "PASS: Linux guest A->B->A->B (last in postcopy, $reqs page requests, $rp return-path bytes) through the proxies, memtool OK after each hop; idle return hop: WAN $w2 B vs plain $q2 B (first hop: $w1 B for $q1 B)"

#!/usr/bin/env bash
# The libvirt wiring of docs/memcache-proxies.md §5, for real: two hosts
# (src, dst: network + mount namespaces, each with its own libvirtd, joined
# by the kit's WAN emulator, 10 ms RTT), the kit's Linux guest as a libvirt
# domain, and `virsh migrate --p2p --migrateuri tcp://127.0.0.1:PORT
# --listen-address 127.0.0.1`: the source QEMU connects to the encoder on
# its own host's loopback, the encoder crosses the WAN to the decoder, and
# the decoder feeds the destination QEMU, which libvirt made listen on
# 127.0.0.1:PORT of its host. src -> dst, then back dst -> src (the return
# hop must put far fewer bytes on the WAN leg), then src -> dst again in
# postcopy (`virsh migrate --postcopy` + `migrate-postcopy`) while memtool
# dirties pages; memtool verifies the guest's memory after each hop.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=proxy_lib.sh
source "$here/proxy_lib.sh"
# shellcheck source=../kit/qemu.sh
source "$KAGEMUSHA_SOURCE/tests/kit/qemu.sh"
tb_require_cmd libvirtd virtlogd virsh qemu-system-x86_64
[[ -x "$MP_BIN" ]] || tb_skip "kagemusha-memcache is not built ($MP_BIN)"
tb_init
kq_guest_image
tb_two_sites 10 0
tb_libvirtd src
tb_libvirtd dst
mkdir -p "$TB_DIR/store-src" "$TB_DIR/store-dst"

name=kgvm
kq_libvirt_xml "$name" --mem 256 >"$TB_DIR/$name.xml"
tb_virsh src create "$TB_DIR/$name.xml" >/dev/null || tb_fail "virsh create on src failed"
kq_libvirt_wait_boot src "$name" >/dev/null
on() { kq_guest_at "$(kq_libvirt_sock "$1" "$name")" "${@:2}"; }
on src memtool fill 64 99 >/dev/null || tb_fail "memtool fill"
verify_on() {  # HOST WHAT
  local out rc=0
  out=$(on "$1" memtool verify) || rc=$?
  [[ $rc == 0 && "$out" == "OK "* ]] || tb_fail "memory check on $1 ($2): exit $rc: $out"
  tb_log "$1 ($2): $out"
}

port=49152
proxies_start() {  # FROM TO TO_ADDR
  local from=$1 to=$2 to_addr=$3
  tb_spawn --name "decode-$to" "$to" "$MP_BIN" decode --listen "[$to_addr]:$((port + 1))" \
    --to "127.0.0.1:$port" --store "$TB_DIR/store-$to" --vm "$name" --json --once
  DEC=$TB_SPAWN_LOG
  tb_spawn --name "encode-$from" "$from" "$MP_BIN" encode --listen "127.0.0.1:$port" \
    --to "[$to_addr]:$((port + 1))" --store "$TB_DIR/store-$from" --vm "$name" --json --once
  ENC=$TB_SPAWN_LOG
  tb_wait_log "$DEC" '"event":"listening"' 10 || tb_fail "decoder: $(cat "$DEC")"
  tb_wait_log "$ENC" '"event":"listening"' 10 || tb_fail "encoder: $(cat "$ENC")"
}
proxies_end() {  # FROM TO
  [[ "$(tb_virsh "$2" domstate "$name")" == running ]] || tb_fail "domain not running on $2"
  tb_wait_log "$ENC" '"event":"migration-done"' 20 || tb_fail "encoder: $(cat "$ENC")"
  tb_wait_log "$DEC" '"event":"migration-done"' 20 || tb_fail "decoder: $(cat "$DEC")"
  Q=$(mp_json_field "$ENC" migration-done qemu_bytes)
  W=$(mp_json_field "$ENC" migration-done wan_bytes_out)
  R=$(mp_json_field "$ENC" migration-done ref_pages)
  RP=$(mp_json_field "$ENC" migration-done return_bytes)
  tb_log "$1 -> $2 via libvirt + proxies: QEMU stream $Q B, WAN $W B, $R pages by reference, $RP return-path bytes"
}
proxied_migrate() {  # FROM TO FROM_ADDR TO_ADDR
  local from=$1 to=$2
  proxies_start "$from" "$to" "$4"
  timeout 180 virsh -c "$(tb_libvirt_uri "$from")" migrate --live --p2p "$name" \
    "qemu+tcp://$to.$TB_ID.test/system" --migrateuri "tcp://127.0.0.1:$port" \
    --listen-address 127.0.0.1 >"$TB_DIR/migrate-$from.log" 2>&1 ||
    tb_fail "virsh migrate $from -> $to: $(cat "$TB_DIR/migrate-$from.log"); encoder: $(cat "$ENC"); decoder: $(cat "$DEC")"
  proxies_end "$from" "$to"
}

proxied_migrate src dst "$TB_SRC_V6" "$TB_DST_V6"
verify_on dst "after src -> dst"
q1=$Q w1=$W
proxied_migrate dst src "$TB_DST_V6" "$TB_SRC_V6"
verify_on src "after dst -> src"
((W * 4 < Q)) || tb_fail "return hop: WAN $W B is not well under the stream's $Q B"
q2=$Q w2=$W

# Postcopy src -> dst through the proxies while memtool dirties pages.
on src memtool dirty 25 >/dev/null
proxies_start src dst "$TB_DST_V6"
(
  rc=0
  timeout 180 virsh -c "$(tb_libvirt_uri src)" migrate --live --p2p --postcopy --bandwidth 32 \
    --postcopy-bandwidth 64 "$name" "qemu+tcp://dst.$TB_ID.test/system" \
    --migrateuri "tcp://127.0.0.1:$port" --listen-address 127.0.0.1 >"$TB_DIR/migrate3.log" 2>&1 || rc=$?
  echo "$rc" >"$TB_DIR/migrate3.rc"
) &
mig=$!
tb_wait_for 60 tb_virsh src migrate-postcopy "$name" || tb_fail "virsh migrate-postcopy was refused"
wait "$mig"
[[ "$(cat "$TB_DIR/migrate3.rc")" == 0 ]] || tb_fail "p2p postcopy src -> dst failed: $(cat "$TB_DIR/migrate3.log"); $(cat "$ENC" "$DEC")"
proxies_end src dst
((RP > 0)) || tb_fail "no return-path bytes went through the proxies in postcopy"
verify_on dst "after postcopy src -> dst, dirtying"
echo "PASS: libvirt p2p migrations through the proxies (URI on loopback, fixed listen address): precopy there and back (return hop WAN $w2 B vs $q2 B plain; first hop $w1 B for $q1 B), then postcopy with dirtying ($RP return-path bytes)"

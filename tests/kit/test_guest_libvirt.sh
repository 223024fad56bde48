#!/usr/bin/env bash
# Self-test of the libvirt side of qemu.sh: the kit's guest as a libvirt
# domain (kq_libvirt_xml) on per-host libvirtds (tb_libvirtd) of two sites,
# migrated peer to peer through the WAN emulator with precopy (src -> dst),
# then with postcopy while memtool dirties its pages (dst -> src). After each
# hop memtool verify must find all 64 MiB intact, and the guest must reach
# its "home link": a bridge with the same address on both hosts.
set -euo pipefail
src=${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}
source "$src/tests/kit/testbed.sh"
source "$src/tests/kit/qemu.sh"
tb_require_cmd libvirtd virtlogd virsh qemu-system-x86_64
tb_init
kq_guest_image
tb_two_sites 10 0
for h in src dst; do
  tb_exec "$h" ip link add kgbr0 address 02:00:00:00:02:01 type bridge
  tb_exec "$h" ip link set kgbr0 up
  tb_exec "$h" ip -6 addr add 2001:db8:1::1/64 dev kgbr0 nodad
done
tb_libvirtd src
tb_libvirtd dst

name=kgvm
kq_libvirt_xml "$name" --mem 256 --bridge kgbr0 \
  --append "kgm.ip6=2001:db8:1::100/64 kgm.gw6=2001:db8:1::1" >"$TB_DIR/$name.xml"
tb_virsh src create "$TB_DIR/$name.xml" >/dev/null || tb_fail "virsh create on src failed (see $TB_DIR/libvirt/src/log/libvirtd.log)"
boot=$(kq_libvirt_wait_boot src "$name")
on() { kq_guest_at "$(kq_libvirt_sock "$1" "$name")" "${@:2}"; }
fill=$(on src memtool fill 64 777) || tb_fail "memtool fill: $fill"
tb_log "src: $fill"
on src 'ping -c 2 -W 5 2001:db8:1::1' >/dev/null || tb_fail "the guest cannot reach the bridge on src"

verify_on() {  # HOST WHAT
  local out rc=0
  out=$(on "$1" memtool verify) || rc=$?
  tb_log "$1 ($2): $out"
  [[ $rc == 0 && "$out" == "OK "* ]] || tb_fail "memory check on $1 ($2): exit $rc: $out"
}

# 1. Precopy, src -> dst, through the WAN.
before=$(tb_field rx_bytes "$(tb_wan_stats wan | head -n 1)")
timeout 180 virsh -c "$(tb_libvirt_uri src)" migrate --live --p2p "$name" "qemu+tcp://dst.$TB_ID.test/system" ||
  tb_fail "p2p precopy src -> dst failed (see $TB_DIR/libvirt/*/log/libvirtd.log)"
after=$(tb_field rx_bytes "$(tb_wan_stats wan | head -n 1)")
((after - before > 64 * 1024 * 1024)) || tb_fail "the migration stream did not cross the WAN ($((after - before)) bytes)"
[[ "$(tb_virsh dst domstate "$name")" == running ]] || tb_fail "domain not running on dst"
tb_log "precopy src -> dst: $((after - before)) bytes through the WAN; $(tb_virsh dst domjobinfo "$name" --completed | grep -E 'Time elapsed:|Total downtime:' | tr -s ' ' | tr '\n' ' ')"
verify_on dst "after precopy"
on dst 'ping -c 2 -W 5 2001:db8:1::1' >/dev/null || tb_fail "the guest cannot reach the bridge on dst after migration"

# 2. Postcopy, dst -> src, while memtool dirties 25 %/s of its pages.
# Precopy is capped at 32 MiB/s so that it is still running when
# `virsh migrate-postcopy` switches; postcopy at 64 MiB/s, so the guest
# faults on pages that have not arrived yet.
on dst memtool dirty 25 >/dev/null
(
  rc=0
  timeout 180 virsh -c "$(tb_libvirt_uri dst)" migrate --live --p2p --postcopy --bandwidth 32 \
    --postcopy-bandwidth 64 "$name" "qemu+tcp://src.$TB_ID.test/system" >"$TB_DIR/migrate2.log" 2>&1 || rc=$?
  echo "$rc" >"$TB_DIR/migrate2.rc"
) &
mig=$!
tb_wait_for 60 tb_virsh dst migrate-postcopy "$name" || tb_fail "virsh migrate-postcopy was refused"
# Proof of the postcopy phase: the guest runs on src while pages still come
# from dst (libvirt's state reason "post-copy"); the 64 MiB/s cap makes this
# last about 2 s.
in_postcopy() { tb_virsh src domstate "$name" --reason 2>/dev/null | grep -q 'running (post-copy)'; }
tb_wait_for 60 in_postcopy || tb_fail "the guest was never seen running in post-copy on src"
tb_log "postcopy dst -> src: seen 'running (post-copy)' on src"
wait "$mig"
[[ "$(cat "$TB_DIR/migrate2.rc")" == 0 ]] || tb_fail "p2p postcopy dst -> src failed: $(cat "$TB_DIR/migrate2.log")"
[[ "$(tb_virsh src domstate "$name")" == running ]] || tb_fail "domain not running on src after postcopy"
verify_on src "after postcopy, dirtying"
on src 'ping -c 2 -W 5 2001:db8:1::1' >/dev/null || tb_fail "the guest cannot reach the bridge back on src"
echo "PASS: libvirt domain of the kit's guest ($boot) migrated src -> dst (precopy) -> src (postcopy, dirtying), memory intact"

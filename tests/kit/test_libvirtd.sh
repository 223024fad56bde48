#!/usr/bin/env bash
# tb_libvirtd: two "hosts" in two sites, each with its own libvirtd (own net,
# mount and UTS namespaces). Each daemon has its own hostname and host UUID,
# and each is reachable from the other site over TCP through the WAN, which
# is what peer-to-peer migration needs; a diskless domain migrates p2p.
set -euo pipefail
source "${KAGEMUSHA_SOURCE:-$(dirname "$0")/../..}/tests/kit/testbed.sh"
tb_require_cmd libvirtd virtlogd virsh qemu-system-x86_64
tb_init
tb_two_sites 10 0
tb_libvirtd src
tb_libvirtd dst

[[ "$(tb_virsh src hostname)" == "src.$TB_ID.test" ]] || tb_fail "src hostname: $(tb_virsh src hostname)"
[[ "$(tb_virsh dst hostname)" == "dst.$TB_ID.test" ]] || tb_fail "dst hostname: $(tb_virsh dst hostname)"
uuid_src=$(tb_virsh src capabilities | sed -n 's:.*<uuid>\(.*\)</uuid>.*:\1:p' | head -n 1)
uuid_dst=$(tb_virsh dst capabilities | sed -n 's:.*<uuid>\(.*\)</uuid>.*:\1:p' | head -n 1)
[[ -n "$uuid_src" && "$uuid_src" != "$uuid_dst" ]] || tb_fail "host UUIDs must differ: '$uuid_src' '$uuid_dst'"

# Across the WAN, by address, from the other site's namespace.
[[ "$(tb_exec src timeout 20 virsh -c "qemu+tcp://[$TB_DST_V6]/system" hostname)" == "dst.$TB_ID.test" ]] ||
  tb_fail "src cannot reach dst's libvirtd over TCP"
[[ "$(tb_exec dst timeout 20 virsh -c "qemu+tcp://$TB_SRC_V4/system" hostname)" == "src.$TB_ID.test" ]] ||
  tb_fail "dst cannot reach src's libvirtd over TCP (IPv4)"
# The daemons resolve each other's names (needed by p2p migration): the
# private /etc/hosts is in the daemons' mount namespace.
pid=$(ip netns pids "$TB_SRC_NS" | while read -r p; do
  [[ "$(cat /proc/"$p"/comm)" == libvirtd ]] && echo "$p"; done | head -n 1)
[[ -n "$pid" ]] || tb_fail "no libvirtd in src's namespace"
nsenter -t "$pid" -m -u getent hosts "dst.$TB_ID.test" | grep -q "$TB_DST_V6" ||
  tb_fail "src's mount namespace does not resolve dst.$TB_ID.test"
# The daemons' /run is private: the root namespace has no libvirt socket of ours.
[[ ! -e /run/libvirt/libvirt-sock ]] || ! cmp -s <(stat -Lc %i /run/libvirt/libvirt-sock) \
  <(stat -Lc %i "$TB_DIR/libvirt/src/run/libvirt/libvirt-sock") || tb_fail "libvirtd's /run is not private"
# Peer-to-peer live migration between the two daemons, across the WAN. The
# guest is diskless (32 MiB, sitting in the BIOS: no guest image needed), so
# nothing about storage is tested here, only the per-host libvirt plumbing:
# name resolution, host UUIDs, listen addresses and the migration port.
cat >"$TB_DIR/probe.xml" <<XML
<domain type='qemu'>
  <name>tbprobe</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>$(command -v qemu-system-x86_64)</emulator></devices>
</domain>
XML
tb_virsh src create "$TB_DIR/probe.xml" >/dev/null || tb_fail "could not start the probe domain on src"
before=$(tb_field rx_bytes "$(tb_wan_stats | head -n 1)")
timeout 120 virsh -c "$(tb_libvirt_uri src)" migrate --live --p2p tbprobe "qemu+tcp://dst.$TB_ID.test/system" ||
  tb_fail "p2p live migration src -> dst failed (see $TB_DIR/libvirt/*/log/libvirtd.log)"
[[ "$(tb_virsh dst domstate tbprobe)" == running ]] || tb_fail "migrated domain is not running on dst"
! tb_virsh src domstate tbprobe >/dev/null 2>&1 || tb_fail "domain still defined on src after migration"
after=$(tb_field rx_bytes "$(tb_wan_stats | head -n 1)")
((after - before > 300000)) || tb_fail "the migration stream did not cross the WAN ($((after - before)) bytes)"
tb_log "p2p migration src -> dst through the WAN: $((after - before)) bytes a->b"
tb_log "PASS"

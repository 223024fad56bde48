#!/usr/bin/env bash
# tb_libvirtd: two "hosts" in two sites, each with its own libvirtd (own net,
# mount and UTS namespaces). Each daemon has its own hostname and host UUID,
# and each is reachable from the other site over TCP through the WAN, which
# is what peer-to-peer migration needs.
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
tb_log "PASS"

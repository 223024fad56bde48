#!/usr/bin/env bash
# Self-test of the guest image and qemu.sh: boot the guest (building or
# reusing the cached image), run commands through the command channel, and
# prove the network the init configured from the kernel command line works
# in both families, on-link and through the default routers (ICMP both ways,
# TCP from the guest to a host peer), and that a virtio-blk disk on NBD
# carries data to the host.
set -euo pipefail
src=${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}
source "$src/tests/kit/testbed.sh"
source "$src/tests/kit/qemu.sh"
tb_require_cmd qemu-system-x86_64 socat nbdkit nbdcopy
tb_init
kq_guest_image

# The peer: one namespace holding the guest's tap, on-link addresses, the
# guest's default routers (fe80::1, 192.0.2.1) and two addresses on lo that
# the guest can only reach through those routers.
tb_host peer
# The disk's NBD server runs before QEMU, which opens the drive at start-up.
tb_spawn --name nbdkit - nbdkit --foreground --unix "$TB_DIR/nbd.sock" memory 16M
tb_wait_unix "$TB_DIR/nbd.sock" 10 || tb_fail "nbdkit did not start"
kq_start vm --ns peer --tap tap0 --mem 192 \
  --append "kgm.ip6=2001:db8:1::100/64 kgm.gw6=fe80::1 kgm.ip4=192.0.2.100/24 kgm.gw4=192.0.2.1" \
  --disk-nbd "nbd+unix:///?socket=$TB_DIR/nbd.sock"
tb_addr peer tap0 2001:db8:1::1/64
tb_exec peer ip -6 addr add fe80::1/64 dev tap0 nodad
tb_addr peer tap0 192.0.2.1/24
tb_exec peer ip -6 addr add 2001:db8:99::1/128 dev lo
tb_exec peer ip -4 addr add 203.0.113.1/32 dev lo
# shellcheck disable=SC2016  # $l is for the server's shell
tb_spawn --name echo6 peer socat TCP6-LISTEN:7007,reuseaddr,fork SYSTEM:'read l; echo "echo:$l"'
# shellcheck disable=SC2016
tb_spawn --name echo4 peer socat TCP4-LISTEN:7004,reuseaddr,fork SYSTEM:'read l; echo "echo4:$l"'
boot=$(kq_wait_boot vm)
tb_log "$boot"

# 0. QMP: a bare command, a full JSON object, and an error.
[[ "$(kq_status vm)" == running ]] || tb_fail "kq_status: '$(kq_status vm)', expected running"
st=$(kq_qmp vm '{"execute":"query-status"}')
[[ "$st" == *'"status": "running"'* ]] || tb_fail "kq_qmp with a JSON object returned '$st'"
kq_qmp vm no-such-command >/dev/null 2>&1 && tb_fail "kq_qmp succeeded on an unknown command"

# 1. The command channel: output and exit codes.
rel=$(kq_guest vm uname -r)
want=$(sed -n 's/^kernel_release=//p' "$KQ_MANIFEST")
[[ "$rel" == "$want" ]] || tb_fail "guest uname -r is '$rel', expected '$want'"
rc=0
kq_guest vm 'echo to-stderr >&2; exit 7' >"$TB_DIR/out" || rc=$?
[[ $rc == 7 ]] || tb_fail "exit code of a guest command: $rc, expected 7"
grep -qx to-stderr "$TB_DIR/out" || tb_fail "stderr of a guest command is missing: $(cat "$TB_DIR/out")"
lines=$(kq_guest vm 'seq 1 2000' | wc -l)
[[ $lines == 2000 ]] || tb_fail "2000 lines of guest output arrived as $lines"
rc=0
kq_guest --timeout 3 vm 'sleep 30' || rc=$?
[[ $rc == 124 ]] || tb_fail "a guest command past its timeout gave $rc, expected 124"
[[ "$(kq_guest --timeout 20 vm 'echo free')" == free ]] || tb_fail "the channel is not free after a timed-out command"
kq_guest vm 'lsmod' >"$TB_DIR/out"
grep -q '^virtio_net' "$TB_DIR/out" || tb_fail "virtio_net is not loaded in the guest"

# 2. The network, configured from the kernel command line.
kq_guest vm 'ip -6 route; ip -4 route' | sed 's/^/[guest route] /' >&2
kq_guest vm 'ping -c 3 -W 5 2001:db8:1::1' >/dev/null || tb_fail "guest cannot ping its on-link IPv6 peer"
kq_guest vm 'ping -c 3 -W 5 192.0.2.1' >/dev/null || tb_fail "guest cannot ping its on-link IPv4 peer"
kq_guest vm 'ping -c 3 -W 5 2001:db8:99::1' >/dev/null || tb_fail "guest cannot ping off-link through kgm.gw6=fe80::1"
kq_guest vm 'ping -c 3 -W 5 203.0.113.1' >/dev/null || tb_fail "guest cannot ping off-link through kgm.gw4=192.0.2.1"
p6=$(tb_ping peer 2001:db8:1::100 5) || tb_fail "the peer cannot ping the guest over IPv6: $p6"
p4=$(tb_ping peer 192.0.2.100 5) || tb_fail "the peer cannot ping the guest over IPv4: $p4"
tb_log "peer -> guest: IPv6 $p6"
tb_log "peer -> guest: IPv4 $p4"
nonce=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
tb_wait_port peer :: 7007 10 || tb_fail "echo server did not listen"
got=$(kq_guest vm "echo $nonce | nc -w 10 2001:db8:99::1 7007") || tb_fail "guest TCP to [2001:db8:99::1]:7007 failed: $got"
[[ "$got" == "echo:$nonce" ]] || tb_fail "TCP echo over IPv6 returned '$got', expected 'echo:$nonce'"
got=$(kq_guest vm "echo $nonce | nc -w 10 192.0.2.1 7004") || tb_fail "guest TCP to 192.0.2.1:7004 failed: $got"
[[ "$got" == "echo4:$nonce" ]] || tb_fail "TCP echo over IPv4 returned '$got', expected 'echo4:$nonce'"
tb_log "TCP echo through the guest's network: IPv6 and IPv4 ok"

# 3. The virtio-blk disk on NBD: what the guest writes, the host reads back
# from the server with its own client.
gsum=$(kq_guest vm 'dd if=/dev/urandom of=/tmp/blk bs=4096 count=64 2>/dev/null &&
  dd if=/tmp/blk of=/dev/vda bs=4096 conv=fsync 2>/dev/null && md5sum </tmp/blk') || tb_fail "guest could not write /dev/vda"
nbdcopy "nbd+unix:///?socket=$TB_DIR/nbd.sock" "$TB_DIR/disk.img" || tb_fail "nbdcopy could not read the disk back"
hsum=$(head -c $((64 * 4096)) "$TB_DIR/disk.img" | md5sum)
[[ "${gsum%% *}" == "${hsum%% *}" ]] || tb_fail "disk contents differ: guest wrote ${gsum%% *}, NBD server holds ${hsum%% *}"
tb_log "virtio-blk on NBD: 256 KiB written by the guest read back on the host"
kq_stop vm
kq_stop vm
[[ "$(kq_status vm)" == dead ]] || tb_fail "guest still alive after kq_stop"
tb_exec peer ip link show tap0 >/dev/null 2>&1 && tb_fail "kq_stop left the tap it created"
echo "PASS: guest boot ($boot), command channel, IPv6+IPv4 network, NBD disk"

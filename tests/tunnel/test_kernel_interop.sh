#!/usr/bin/env bash
# Our ND, ARP and PMTU-error codecs against the Linux kernel, an independent
# implementation, in both directions:
#   1. the kernel accepts our unsolicited Neighbor Advertisement and
#      gratuitous ARP: a peer whose caches still point the guest's addresses at
#      its old MAC relearns the new MAC (what the mobile host relies on after
#      a move);
#   2. our decoders accept the Neighbor Solicitation/Advertisement and ARP
#      request/reply the kernels send while the peer resolves the guest;
#   3. the kernel accepts our ICMPv6 Packet Too Big and ICMPv4
#      fragmentation-needed and caches the MTU they report.
set -euo pipefail

: "${KAGEMUSHA_SOURCE:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${KAGEMUSHA_BUILD:=$KAGEMUSHA_SOURCE/build}"
tool=$KAGEMUSHA_BUILD/tunnel/kagemusha-mh-tool
# shellcheck source=../kit/testbed.sh
source "$KAGEMUSHA_SOURCE/tests/kit/testbed.sh"

[[ -x $tool ]] || tb_skip "$tool not built"
tb_require_root
tb_require_cmd ip
tb_init

guest6=2001:db8:1::10
guest4=192.0.2.10
old_mac=02:00:00:00:00:99
new_mac=02:00:00:00:00:42

tb_host mover
tb_host peer
tb_link mover peer --addr-a "$guest6/64" --addr-a "$guest4/24" --addr-b 2001:db8:1::2/64 --addr-b 192.0.2.2/24
ifm=$(tb_if mover peer)
ifp=$(tb_if peer mover)

# ---- 1. ours -> kernel ------------------------------------------------------
# The peer still believes the guest lives at its old MAC.
tb_exec peer ip -6 neigh replace "$guest6" lladdr "$old_mac" dev "$ifp" nud stale
tb_exec peer ip neigh replace "$guest4" lladdr "$old_mac" dev "$ifp" nud stale
tb_exec mover "$tool" announce "$ifm" "$new_mac" "$guest6" "$guest4" >&2

neigh_is() {  # FAMILY ADDR MAC
  tb_exec peer ip "$1" neigh show "$2" dev "$ifp" | grep -q "lladdr $3"
}
tb_wait_for 5 neigh_is -6 "$guest6" "$new_mac" ||
  tb_fail "kernel did not accept our unsolicited NA: $(tb_exec peer ip -6 neigh show "$guest6" dev "$ifp")"
echo "ok: kernel updated its IPv6 neighbour entry from our unsolicited NA"
tb_wait_for 5 neigh_is -4 "$guest4" "$new_mac" ||
  tb_fail "kernel did not accept our gratuitous ARP: $(tb_exec peer ip -4 neigh show "$guest4" dev "$ifp")"
echo "ok: kernel updated its ARP entry from our gratuitous ARP"

# ---- 2. kernel -> ours ------------------------------------------------------
tb_exec peer ip -6 neigh flush dev "$ifp"
tb_exec peer ip -4 neigh flush dev "$ifp"
cap=$TB_DIR/capture.txt
tb_spawn --name capture mover "$tool" capture-nd "$ifm" 6
capture_pid=$TB_SPAWN_PID
tb_wait_log "$TB_SPAWN_LOG" '^capturing' 5 || tb_fail "capture did not start"
# Any datagram to the guest makes the peer's kernel resolve it (bash's
# /dev/udp needs no extra tool; port 9 is discard).
tb_exec peer bash -c "echo probe >/dev/udp/$guest6/9" || tb_fail "sending to $guest6 failed"
tb_exec peer bash -c "echo probe >/dev/udp/$guest4/9" || tb_fail "sending to $guest4 failed"
tb_wait_for 10 bash -c "! kill -0 $capture_pid 2>/dev/null" || true
cp "$TB_SPAWN_LOG" "$cap"
cat "$cap" >&2

grep -q "REJECT" "$cap" && tb_fail "our decoders rejected a kernel-sent frame"
grep -q "^NS src=.* target=$guest6 sll=" "$cap" || tb_fail "no kernel Neighbor Solicitation for $guest6 decoded"
grep -q "^NA target=$guest6 R=0 S=1 O=1 tll=" "$cap" || tb_fail "no kernel solicited Neighbor Advertisement decoded"
grep -q "^ARP request sender=192.0.2.2/.* target=$guest4" "$cap" || tb_fail "no kernel ARP request decoded"
grep -q "^ARP reply sender=$guest4/" "$cap" || tb_fail "no kernel ARP reply decoded"
echo "ok: our decoders accept the kernel's NS, NA, ARP request and ARP reply"
# ---- 3. our PMTU errors -> kernel -------------------------------------------
# The peer's kernel must take our Packet Too Big and fragmentation-needed
# (which quote an ICMP echo it "sent" to an on-link remote) and cache the
# reported MTU for that remote: checksums, lengths and quoting all have to be
# right for it to do so.
peer_mac=$(tb_exec peer cat "/sys/class/net/$ifp/address")
tb_exec mover "$tool" pmtu "$ifm" "$peer_mac" "$guest6" 2001:db8:1::2 2001:db8:1::99 \
  "$guest4" 192.0.2.2 192.0.2.99 1400 >&2
route_mtu_is() {  # FAMILY ADDR MTU
  tb_exec peer ip "$1" route get "$2" | grep -q "mtu $3"
}
tb_wait_for 5 route_mtu_is -6 2001:db8:1::99 1400 ||
  tb_fail "kernel ignored our Packet Too Big: $(tb_exec peer ip -6 route get 2001:db8:1::99)"
echo "ok: kernel cached MTU 1400 from our ICMPv6 Packet Too Big"
tb_wait_for 5 route_mtu_is -4 192.0.2.99 1400 ||
  tb_fail "kernel ignored our fragmentation-needed: $(tb_exec peer ip -4 route get 192.0.2.99)"
echo "ok: kernel cached MTU 1400 from our ICMPv4 fragmentation-needed"
echo "all kernel ND/ARP/PMTU checks passed"

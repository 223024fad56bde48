#!/usr/bin/env bash
# Path MTU at a foreign host. The session's tunnel MTU is 1400 (--mtu 1400:
# the largest inner packet), the guest's link is 1500. While a TCP upload
# from the guest to the CN runs (started at home with a 1440-byte MSS),
# the guest moves to foreign host A. There:
#   - a full-size packet from the guest with DF semantics (the equivalent of
#     `ping6 -s 1452 -M do`: 1452 + 8 + 40 = 1500 bytes, IPV6_DONTFRAG) gets
#     an ICMPv6 Packet Too Big carrying MTU 1400, captured on the guest's
#     link, and the guest's kernel caches it (`ip -6 route get` shows mtu
#     1400, a second send fails locally with EMSGSIZE);
#   - a 1400-byte echo (payload 1352) is answered by the CN;
#   - the TCP upload continues and completes with equal sha256 on both ends.
# tunneld's too_big counter must have moved. (iputils ping is not installed
# here, so the probe is a small python raw-socket program.)
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}"
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
mob_require_daemons
tb_init
mob_topology --cn-rtt 20 --foreign-rtt 10
export MOB_MTU=1400
mob_ha_start --dad off
mob_tunneld_start a

tb_ping guest "$MOB_CN6" 1 0.1 2 >/dev/null || true
# Upload from the guest at home: full-size segments.
mob_stream_start up "$MOB_CN6" 5003 2000000 20000000 guest cn
mob_stream_advance 2000000

mob_move a
mob_wait_registered a

cat >"$TB_DIR/pmtu_probe.py" <<'PY'
import errno, os, select, socket, struct, sys, time
dst, ifname, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_DONTFRAG = 23, 2, 62
cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
cap.bind((ifname, 0))
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
s.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
ident = os.getpid() & 0xFFFF
def echo(seq, n):
    return struct.pack("!BBHHH", 128, 0, 0, ident, seq) + bytes(n)
try:
    s.sendto(echo(1, size), (dst, 0))
    print("first send: ok (%d bytes of IPv6)" % (size + 48))
except OSError as e:
    print("first send: errno %d" % e.errno)
ptb_mtu, deadline = None, time.monotonic() + 3
while ptb_mtu is None and time.monotonic() < deadline:
    r, _, _ = select.select([cap], [], [], 0.2)
    if not r:
        continue
    f = cap.recv(4096)
    if len(f) < 62 or f[12:14] != b"\x86\xdd" or f[20] != 58:
        continue
    icmp = f[54:]
    if icmp[0] == 2:  # Packet Too Big
        ptb_mtu = struct.unpack("!I", icmp[4:8])[0]
        src = socket.inet_ntop(socket.AF_INET6, f[22:38])
        print("ptb from %s mtu=%d quoted_dst=%s" % (src, ptb_mtu, socket.inet_ntop(socket.AF_INET6, f[54 + 8 + 24:54 + 8 + 40])))
print("ptb_mtu=%s" % ptb_mtu)
try:
    s.sendto(echo(2, size), (dst, 0))
    print("second send: ok")
except OSError as e:
    print("second send: errno %d %s" % (e.errno, "EMSGSIZE" if e.errno == errno.EMSGSIZE else ""))
PY
# The upload has already met the tunnel MTU (the guest caches the PMTU per
# destination), so the probe goes to another CN-side address, which need not
# exist: the PTB comes from the foreign host before the tunnel.
probe_dst=2001:db8:c::99
route=$(tb_exec guest ip -6 route get "$MOB_CN6")
grep -q 'mtu 1400' <<<"$route" || tb_fail "the upload did not get PMTU 1400 for the CN: $route"
tb_log "guest, after the upload met the tunnel: $route"
out=$(tb_exec guest python3 "$TB_DIR/pmtu_probe.py" "$probe_dst" "$MOB_GUEST_IF" 1452) || tb_fail "probe failed: $out"
tb_log "probe: $(tr '\n' ';' <<<"$out")"
grep -q '^first send: ok' <<<"$out" || tb_fail "the first 1500-byte send should leave the guest: $out"
grep -q '^ptb_mtu=1400$' <<<"$out" || tb_fail "no Packet Too Big with MTU 1400 on the guest link: $out"
grep -q "^ptb from $MOB_ROUTER_LL \\|^ptb from $MOB_ROUTER_GLOBAL " <<<"$out" || tb_log "note: PTB source is not the router's address: $out"
grep -q '^second send: errno .* EMSGSIZE' <<<"$out" || tb_fail "the guest's kernel did not take the PTB (second send did not fail locally): $out"
route=$(tb_exec guest ip -6 route get "$probe_dst")
grep -q 'mtu 1400' <<<"$route" || tb_fail "guest route cache has no mtu 1400: $route"
tb_log "guest: $route"

# A packet that fits the tunnel goes through (1352 + 48 = 1400 bytes).
cat >"$TB_DIR/echo_size.py" <<'PY'
import os, select, socket, struct, sys, time
dst, size = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, 62, 1)
ident = os.getpid() & 0xFFFF
for seq in range(5):
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, seq) + bytes(size), (dst, 0))
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], 0.1)
        if r:
            d = s.recv(4096)
            if d[0] == 129 and struct.unpack("!H", d[4:6])[0] == ident:
                print("reply bytes=%d" % (len(d) + 40))
                sys.exit(0)
sys.exit(1)
PY
rep=$(tb_exec guest python3 "$TB_DIR/echo_size.py" "$MOB_CN6" 1352) || tb_fail "a 1400-byte echo through the tunnel got no reply"
tb_log "1400-byte echo: $rep"

mob_stream_advance 3000000 90
too_big=$(mob_tunneld a status --json | mob_json counter "$MOB_SESSION" too_big)
((too_big >= 1)) || tb_fail "tunneld counted no Packet Too Big: $too_big"
mob_stream_finish 180
tb_log "PASS: PTB mtu 1400 at the foreign host, too_big=$too_big, upload $MOB_STREAM_RESULT"

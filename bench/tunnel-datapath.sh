#!/usr/bin/env bash
# Data-path throughput of kagemusha-tunneld, both directions, on veths:
#   encap: a UDP blaster in the guest (1400-byte packets, unlimited rate)
#          -> TAP -> daemon -> raw IPv6-in-IPv6 socket -> uplink; measured
#          by the daemon's tunnelled_bytes counter over 5 s against what the
#          sender managed to send (the Python sender is the ceiling here).
#   decap: a Python sender in the "HA" namespace blasts IPv6-in-IPv6 packets at
#          the care-of address -> daemon -> TAP -> guest; measured by the
#          daemon's decap_bytes counter.
# Prints figures; fails only if nothing flows (throughput depends on the
# machine). Not a registration test: no home agent answers (the data path
# does not wait for the BA).
set -euo pipefail

: "${KAGEMUSHA_SOURCE:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${KAGEMUSHA_BUILD:=$KAGEMUSHA_SOURCE/build}"
daemon=$KAGEMUSHA_BUILD/cli/kagemusha-tunneld
# shellcheck source=../kit/testbed.sh
source "$KAGEMUSHA_SOURCE/tests/kit/testbed.sh"

[[ -x $daemon ]] || tb_skip "$daemon not built"
tb_require_root
tb_require_cmd ip nft bc
tb_init

hoa=2001:db8:a::10
guest_mac=52:54:00:00:00:10
router_mac=02:00:00:00:00:01
coa=2001:db8:b::2
ha=2001:db8:b::1
corr6=2001:db8:c::9
secs=${SECS:-5}

tb_host guest
tb_host fhost
tb_host ha
tb_link guest fhost
gif=$(tb_if guest fhost)
fvm=$(tb_if fhost guest)
tb_link fhost ha --addr-a "$coa/64" --addr-b "$ha/64"
uplink=$(tb_if fhost ha)
haif=$(tb_if ha fhost)
tb_exec fhost ip link add vmbr0 type bridge forward_delay 0 mcast_snooping 0
tb_exec fhost ip link set vmbr0 up
tb_exec fhost ip link set "$fvm" master vmbr0
tb_exec guest ip link set "$gif" down
tb_exec guest ip link set "$gif" address "$guest_mac"
tb_exec guest ip link set "$gif" up
tb_addr guest "$gif" "$hoa/64"
tb_exec guest ip -6 route add default via fe80::1 dev "$gif"
# The "HA" drops tunnelled packets before its kernel would answer them.
tb_exec ha nft -f - <<'EOF'
table inet sink {
  chain pre {
    type filter hook prerouting priority -300;
    ip6 nexthdr { 41, 60 } counter drop
  }
}
EOF

ctl=$TB_DIR/tunneld.sock
tb_spawn --name tunneld fhost "$daemon" serve --control "$ctl" --state-dir "$TB_DIR/state" --log-level warn
tb_wait_unix "$ctl" 10 || tb_fail "daemon did not start"
tb_exec fhost "$daemon" activate --control "$ctl" --name vm1 --guest-mac "$guest_mac" --hoa "$hoa" \
  --home-prefix 2001:db8:a::/64 --router-mac "$router_mac" --router-ll fe80::1 --ha "$ha" \
  --coa "$coa" --uplink "$uplink" --bridge vmbr0 --mtu 1460 --insecure >/dev/null
counter() { tb_exec fhost "$daemon" status --control "$ctl" --json |
  /usr/bin/python3 -c "import json,sys; print(json.load(sys.stdin)['sessions'][0]['counters']['$1'])"; }

# ---- encap ----
tb_wait_for 5 sh -c "ip netns exec $(tb_ns guest) ip -6 neigh show fe80::1 dev $gif | grep -q lladdr" || true
cat >"$TB_DIR/udp_blast.py" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
dst, secs = (sys.argv[1], 9), float(sys.argv[2])
buf = b"x" * 1352  # 1400-byte IPv6 packets
end = time.time() + secs
n = 0
while time.time() < end:
    for _ in range(256):
        try:
            s.sendto(buf, dst); n += 1
        except BlockingIOError:
            pass
print(n)
PY
b0=$(counter tunnelled_bytes)
sent=$(tb_exec guest /usr/bin/python3 "$TB_DIR/udp_blast.py" "$corr6" "$secs")
b1=$(counter tunnelled_bytes)
enc=$(echo "scale=3; ($b1 - $b0) * 8 / $secs / 1000000000" | bc)
tb_log "encap: guest sent $sent packets of 1400 B; daemon tunnelled $(((b1 - b0) / 1400)) = $((b1 - b0)) bytes in ${secs} s = $enc Gbit/s"
((b1 - b0 > 0)) || tb_fail "nothing tunnelled"

# ---- decap ----
cat >"$TB_DIR/tun_blast.py" <<'PY'
import socket, struct, sys, time
coa, ha, hoa, corr, secs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 41)
s.bind((ha, 0))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
payload = b"y" * (1400 - 40 - 8)
udp = struct.pack("!HHHH", 9, 9, 8 + len(payload), 0) + payload  # checksum 0: guest drops it, fine
inner = struct.pack("!IHBB", 0x60000000, len(udp), 17, 64) + socket.inet_pton(socket.AF_INET6, corr) + socket.inet_pton(socket.AF_INET6, hoa) + udp
end = time.time() + secs
n = 0
while time.time() < end:
    for _ in range(256):
        try:
            s.sendto(inner, (coa, 0)); n += 1
        except BlockingIOError:
            pass
print(n)
PY
d0=$(counter decap_bytes)
sent=$(tb_exec ha /usr/bin/python3 "$TB_DIR/tun_blast.py" "$coa" "$ha" "$hoa" "$corr6" "$secs")
d1=$(counter decap_bytes)
dec=$(echo "scale=3; ($d1 - $d0) * 8 / $secs / 1000000000" | bc)
tb_log "decap: HA sent $sent packets, daemon delivered $((d1 - d0)) bytes in ${secs} s = $dec Gbit/s"
((d1 - d0 > 0)) || tb_fail "nothing decapsulated"
tb_log "PASS encap=${enc}Gbit/s decap=${dec}Gbit/s"

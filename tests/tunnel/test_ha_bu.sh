#!/usr/bin/env bash
# kagemusha-ha on a real home link, driven by Binding Updates crafted with
# scapy (an independent MIPv6 implementation) from a mobile node one router
# away; BAs are captured at layer 2 on the mobile node (its kernel drops RH2
# packets), decoded by scapy and by tshark (`-Y mipv6`: tshark 4.0's filter name for
# the protocol whose fields are mip6.*).
#
#   cn (2001:db8:a::30, 192.0.2.30) ─┐
#   ha (2001:db8:a::2,  192.0.2.2)  ─┼─ [home: router + bridge, 2001:db8:a::1] ── mn (2001:db8:b::10, the CoA)
#
# Phase 1 (--insecure --dad off): accepted BU (0) with RH2 and lifetime, IPv4
#   home address ack, 129/132/133/135, proxy ND (cn's neighbour entry gets the
#   HA's MAC), tunnels both ways (cn's echo to the HoA arrives 6in6 at the
#   CoA; 6in6 from the CoA reaches cn; a spoofed inner source is dropped),
#   malformed BUs (every kind of truncation, bad checksum) and a flood leave
#   the daemon up and the binding unchanged, deregistration, restart with the
#   binding restored from --state-dir.
# Phase 2 (--key, --dad rfc): an authenticated BU is accepted after the DAD
#   wait (>= 1 s) with an authenticated BA; wrong key -> 146; no
#   authentication -> dropped; a home address in use on the link (cn's) -> 134.
# Phase 3 (--dad optimistic, --max-lifetime 8): an address in use is accepted
#   at once, then revoked by the background probe (next BU: 134); a free one
#   is promoted to active and expires after its lifetime.
set -euo pipefail

: "${KAGEMUSHA_SOURCE:=$(cd "$(dirname "$0")/../.." && pwd)}"
: "${KAGEMUSHA_BUILD:=$KAGEMUSHA_SOURCE/build}"
ha_bin=$KAGEMUSHA_BUILD/cli/kagemusha-ha
# shellcheck source=../kit/testbed.sh
source "$KAGEMUSHA_SOURCE/tests/kit/testbed.sh"

[[ -x $ha_bin ]] || tb_skip "$ha_bin not built"
tb_require_root
tb_require_cmd ip tshark nft
py=/usr/bin/python3
$py -c 'import scapy.layers.inet6' 2>/dev/null || tb_skip "/usr/bin/python3 has no scapy"
tb_init

HA=2001:db8:a::2
HOA=2001:db8:a::20
HOA2=2001:db8:a::21
CN=2001:db8:a::30
COA=2001:db8:b::10

tb_site home --v6 2001:db8:a::/64 --v4 192.0.2.0/24
tb_host ha home --v6 "$HA/64" --v4 192.0.2.2/24
tb_host cn home --v6 "$CN/64" --v4 192.0.2.30/24
tb_host mn
tb_link home mn --addr-a 2001:db8:b::1/64 --addr-b "$COA/64"
tb_exec mn ip -6 route add default via 2001:db8:b::1
ha_if=$(tb_if ha home)
cn_if=$(tb_if cn home)
mn_if=$(tb_if mn home)
ha_mac=$(tb_exec ha cat "/sys/class/net/$ha_if/address")

failures=0
pass() { tb_log "PASS: $*"; }
fail() { tb_log "FAIL: $*"; failures=$((failures + 1)); }
check() { # DESCRIPTION CMD...
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

# ---- the mobile node's side, in scapy ---------------------------------------------
cat >"$TB_DIR/mn.py" <<'PY'
import argparse, hashlib, hmac, json, socket, struct, sys, time
from scapy.all import raw, wrpcap, AsyncSniffer
from scapy.layers.inet6 import (IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, HAO, MIP6MH_BU,
                                MIP6MH_BA, MIP6OptMsgAuth, MIP6OptUnknown, ICMPv6EchoRequest, IPerror6)
from scapy.utils import checksum

ap = argparse.ArgumentParser()
ap.add_argument("cmd")
ap.add_argument("--iface", required=True)
ap.add_argument("--coa", required=True)
ap.add_argument("--ha", required=True)
ap.add_argument("--hoa", default="")
ap.add_argument("--seq", type=int, default=1)
ap.add_argument("--flags", default="AH")
ap.add_argument("--lifetime", type=int, default=30)
ap.add_argument("--hoa4", default="")
ap.add_argument("--spi", type=int, default=0)
ap.add_argument("--key", default="")          # hex
ap.add_argument("--badsum", action="store_true")
ap.add_argument("--truncate", type=int, default=0)
ap.add_argument("--count", type=int, default=1)
ap.add_argument("--timeout", type=float, default=3)
ap.add_argument("--expect", type=int, default=1)
ap.add_argument("--pcap", default="")
ap.add_argument("--inner-src", default="")
ap.add_argument("--inner-dst", default="")
ap.add_argument("--ready", default="")     # sniff41: created once the sniffer runs
a = ap.parse_args()

def a6(s): return socket.inet_pton(socket.AF_INET6, s)

def send_raw(data, dst):
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(data, (dst, 0))
    s.close()

def build_bu(seq):
    opts = []
    if a.hoa4:
        opts.append(MIP6OptUnknown(otype=29, olen=6, odata=bytes([24 << 2, 0]) + socket.inet_aton(a.hoa4)))
    if a.spi:
        opts.append(MIP6OptMsgAuth(subtype=1, mspi=a.spi, authdata=b"\0" * 16))
    p = IPv6(src=a.coa, dst=a.ha) / IPv6ExtHdrDestOpt(options=[HAO(hoa=a.hoa)]) / \
        MIP6MH_BU(seq=seq, flags=a.flags, mhtime=a.lifetime, options=opts)
    if a.spi:  # RFC 4285 over scapy's bytes, with Python's hmac
        mh = bytearray(raw(p[MIP6MH_BU])); mh[4:6] = b"\0\0"
        off = bytes(mh).find(bytes([9, 21, 1]) + struct.pack("!I", a.spi)) + 7
        mac = hmac.new(bytes.fromhex(a.key), a6(a.coa) + a6(a.hoa) + bytes(mh[:off]), hashlib.sha256).digest()[:16]
        p[MIP6OptMsgAuth].authdata = mac
        p[MIP6MH_BU].cksum = None
    if a.badsum:
        p[MIP6MH_BU].cksum = 0x1234
    data = bytearray(raw(p))
    if a.truncate:
        data = data[:len(data) - a.truncate]
        struct.pack_into("!H", data, 4, len(data) - 40)  # IPv6 itself stays consistent
    return bytes(data)

def decode_ba(p):
    ba = p[MIP6MH_BA]
    mh = bytearray(raw(ba))
    rh2 = p[IPv6ExtHdrRouting].addresses[0] if IPv6ExtHdrRouting in p else None
    want = struct.unpack("!H", mh[4:6])[0]
    mh[4:6] = b"\0\0"
    dst = rh2 or p[IPv6].dst
    pseudo = a6(p[IPv6].src) + a6(dst) + struct.pack("!I", len(mh)) + b"\0\0\0\x87"
    out = {"status": ba.status, "seq": ba.seq, "lifetime": ba.mhtime, "rh2": rh2,
           "dst": p[IPv6].dst, "cksum_ok": checksum(pseudo + bytes(mh)) == want,
           "ipv4_ack": None, "auth_ok": None}
    i = 12
    while i < len(mh):
        t = mh[i]
        if t == 0: i += 1; continue
        if i + 1 >= len(mh): break
        ln = mh[i + 1]
        body = bytes(mh[i + 2:i + 2 + ln])
        if t == 30: out["ipv4_ack"] = body[0]
        if t == 9 and a.key:
            spi = struct.unpack("!I", body[1:5])[0]
            mac = hmac.new(bytes.fromhex(a.key), a6(a.coa) + a6(a.hoa) + bytes(mh[:i + 7]),
                           hashlib.sha256).digest()[:16]
            out["auth_ok"] = spi == a.spi and body[5:] == mac
        i += 2 + ln
    return out

if a.cmd == "bu":
    # A BA to the CoA; not the copy quoted in the CoA kernel's ICMPv6 error.
    sn = AsyncSniffer(iface=a.iface, store=True, lfilter=lambda p: MIP6MH_BA in p and
                      p[IPv6].dst == a.coa and IPerror6 not in p)
    sn.start(); time.sleep(0.3)
    t_send = time.time()
    for k in range(a.count):
        send_raw(build_bu((a.seq + k) & 0xffff), a.ha)
    deadline = time.time() + a.timeout
    while time.time() < deadline and len(sn.results or []) < a.expect:
        time.sleep(0.05)
    time.sleep(0.2)
    sn.stop()
    pkts = list(sn.results)
    if a.pcap and pkts: wrpcap(a.pcap, pkts)
    out = []
    for p in pkts:
        d = decode_ba(p)
        d["delay"] = round(float(p.time) - t_send, 3)  # BU sent -> BA captured
        out.append(d)
    print(json.dumps(out))
elif a.cmd == "tunnel":   # 6in6 from the CoA to the HA with a chosen inner source
    inner = IPv6(src=a.inner_src, dst=a.inner_dst, hlim=64) / ICMPv6EchoRequest(id=0x4b4d, seq=a.seq, data=b"kagemusha")
    outer = IPv6(src=a.coa, dst=a.ha, nh=41) / inner
    send_raw(raw(outer), a.ha)
elif a.cmd == "tunnel4":  # 4in6 from the CoA to the HA
    from scapy.layers.inet import IP, ICMP
    inner = IP(src=a.inner_src, dst=a.inner_dst, ttl=64) / ICMP(id=0x4b4d, seq=a.seq) / b"kagemusha"
    outer = IPv6(src=a.coa, dst=a.ha, nh=4) / inner
    send_raw(raw(outer), a.ha)
elif a.cmd == "sniff41":  # counts 6in6 packets from the HA whose inner destination is --hoa
    sn = AsyncSniffer(iface=a.iface, store=True,
                      lfilter=lambda p: IPv6 in p and p[IPv6].nh == 41 and p[IPv6].src == a.ha
                      and IPv6 in p[IPv6].payload and p[IPv6].payload[IPv6].dst == a.hoa)
    sn.start()
    time.sleep(0.3)
    if a.ready: open(a.ready, "w").close()
    time.sleep(a.timeout)
    sn.stop()
    print(len(sn.results))
PY

mn() { tb_exec mn "$py" "$TB_DIR/mn.py" "$1" --iface "$mn_if" --coa "$COA" --ha "$HA" "${@:2}"; }
# JSON field access without jq: jget JSON KEY... (list indexes are numbers).
cat >"$TB_DIR/j.py" <<'PY'
import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2:]:
    v = v[int(k)] if isinstance(v, list) else v[k]
print(json.dumps(v) if isinstance(v, (dict, list)) else v)
PY
jget() { $py "$TB_DIR/j.py" "$@"; }
ba_field() { jget "$1" 0 "$2" 2>/dev/null || echo "no-BA"; }
nbas() { $py -c 'import json,sys; print(len(json.loads(sys.argv[1])))' "$1"; }

status() { "$ha_bin" status --control "$TB_DIR/ha.sock" --json; }
binding_field() { # HOA FIELD
  status | $py -c 'import json,sys; s=json.load(sys.stdin); b=[b for b in s["bindings"] if b["home_address"]==sys.argv[1]]; print(b[0][sys.argv[2]] if b else "none")' "$1" "$2"
}
counter() { status | $py -c 'import json,sys; print(json.load(sys.stdin)["counters"][sys.argv[1]])' "$1"; }

start_ha() {
  tb_spawn --name "ha$1" ha "$ha_bin" serve --home-link "$ha_if" --address "$HA" \
    --home-prefix 2001:db8:a::/64 --home-prefix4 192.0.2.0/24 --address4 192.0.2.2 \
    --state-dir "$TB_DIR/ha-state" --control "$TB_DIR/ha.sock" --max-lifetime "${MAX_LIFETIME:-120}" "${@:2}"
  ha_pid=$TB_SPAWN_PID
  tb_wait_log "$TB_SPAWN_LOG" 'ready: home agent' 10 || tb_fail "kagemusha-ha did not start"
}

# ---- command line: usage errors exit 2 with a message, before touching the link ----
cli_rc() { local rc=0; "$ha_bin" "$@" >/dev/null 2>"$TB_DIR/cli.err" || rc=$?; echo $rc; }
check "serve without required options: exit 2" [ "$(cli_rc serve --home-link lo)" = 2 ]
check "bad --dad: exit 2" [ "$(cli_rc serve --home-link "$ha_if" --address "$HA" --home-prefix 2001:db8:a::/64 \
  --insecure --dad fast --state-dir "$TB_DIR/x" --control "$TB_DIR/x.sock")" = 2 ]
check "no --key and no --insecure: exit 2" [ "$(cli_rc serve --home-link "$ha_if" --address "$HA" \
  --home-prefix 2001:db8:a::/64 --state-dir "$TB_DIR/x" --control "$TB_DIR/x.sock")" = 2 ]
check "... saying what to do" grep -q -- "--insecure" "$TB_DIR/cli.err"
check "HA address outside the home prefix: exit 2" [ "$(cli_rc serve --home-link "$ha_if" --address 2001:db8:b::2 \
  --home-prefix 2001:db8:a::/64 --insecure --state-dir "$TB_DIR/x" --control "$TB_DIR/x.sock")" = 2 ]
check "status without a server: exit 1 with a hint" [ "$(cli_rc status --control "$TB_DIR/none.sock")" = 1 ]
check "... the hint names serve" grep -q "kagemusha-ha serve" "$TB_DIR/cli.err"

# ============================== phase 1 =========================================
start_ha 1 --insecure --dad off --allow "$HOA" --allow "$HOA2" --bu-rate 20

# -- a valid BU with an IPv4 home address
out=$(mn bu --hoa "$HOA" --seq 10 --lifetime 30 --hoa4 192.0.2.20 --pcap "$TB_DIR/ba1.pcap")
tb_log "BA: $out"
check "valid BU: BA status 0" [ "$(ba_field "$out" status)" = 0 ]
check "BA carries the BU's sequence number" [ "$(ba_field "$out" seq)" = 10 ]
check "BA lifetime = granted (30 units)" [ "$(ba_field "$out" lifetime)" = 30 ]
check "BA goes to the CoA with the HoA in RH2" [ "$(ba_field "$out" rh2)" = "$HOA" ] 
check "BA checksum verified by scapy-side code" [ "$(ba_field "$out" cksum_ok)" = True ]
check "IPv4 Address Acknowledgement status 0" [ "$(ba_field "$out" ipv4_ack)" = 0 ]
# tshark 4.0 names the protocol "mipv6" in filters; its fields are mip6.*.
ts=$(tshark -r "$TB_DIR/ba1.pcap" -Y 'mipv6 && mip6.mhtype == 6' -T fields -e mip6.ba.status -e mip6.ba.seqnr -e mip6.ba.lifetime -e mip6.ipv4aa.sts 2>/dev/null || true)
tb_log "tshark: $ts"
malformed=$(tshark -r "$TB_DIR/ba1.pcap" -Y '_ws.malformed || _ws.expert.severity >= warning' 2>/dev/null | wc -l)
check "tshark finds nothing malformed in the BA" [ "$malformed" = 0 ]
check "tshark -Y mipv6 decodes the BA (status 0, seq 10, lifetime 30, ipv4 ack 0)" [ "$ts" = $'0\t10\t30\t0' ]
check "status --json shows the binding at the CoA" [ "$(binding_field "$HOA" care_of)" = "$COA" ]
check "status --json shows the IPv4 home address" [ "$(binding_field "$HOA" home_address4)" = 192.0.2.20 ]
left=$(binding_field "$HOA" lifetime_left_s)
d=$(ba_field "$out" delay)
check "dad off: the BA came at once (${d}s)" $py -c "import sys; sys.exit(0 if $d < 0.5 else 1)"
check "lifetime left is 110-120 s ($left)" [ "$left" -ge 110 -a "$left" -le 120 ]

# -- lifetime cap: ask 1000 units (4000 s), get 120 s = 30 units
out=$(mn bu --hoa "$HOA" --seq 11 --lifetime 1000 --hoa4 192.0.2.20)
check "lifetime capped to --max-lifetime (BA lifetime 30)" [ "$(ba_field "$out" lifetime)" = 30 ]

# -- the §10.3.1 rejections
out=$(mn bu --hoa 2001:db8:a::99)
check "home address not allowed: 129" [ "$(ba_field "$out" status)" = 129 ]
out=$(mn bu --hoa 2001:db8:ff::20)
check "home address outside the home prefix: 132" [ "$(ba_field "$out" status)" = 132 ]
out=$(mn bu --hoa "$HOA2" --flags A)
check "no H flag: 133" [ "$(ba_field "$out" status)" = 133 ]
out=$(mn bu --hoa "$HOA" --seq 5)
check "old sequence: 135" [ "$(ba_field "$out" status)" = 135 ]
check "135 carries the current sequence (11)" [ "$(ba_field "$out" seq)" = 11 ]
out=$(mn bu --hoa "$HOA2" --seq 1 --lifetime 0)
check "deregistering an unknown binding: 133" [ "$(ba_field "$out" status)" = 133 ]

# -- proxy ND: cn resolves the HoA to the HA's MAC; its echo is tunnelled to the CoA
tb_exec mn "$py" "$TB_DIR/mn.py" sniff41 --iface "$mn_if" --coa "$COA" --ha "$HA" --hoa "$HOA" --timeout 3 --ready "$TB_DIR/sniff41.ready" >"$TB_DIR/sniff41" &
sniff_pid=$!
tb_wait_for 20 test -e "$TB_DIR/sniff41.ready" || fail "the CoA's sniffer did not start"
tb_ping cn "$HOA" 3 0.3 1 >/dev/null || true
wait $sniff_pid || true
lladdr=$(tb_exec cn ip -6 neigh show "$HOA" dev "$cn_if" | awk '{for(i=1;i<NF;i++) if($i=="lladdr") print $(i+1)}')
check "proxy ND: cn's neighbour entry for the HoA is the HA's MAC ($lladdr)" [ "$lladdr" = "$ha_mac" ]
n41=$(cat "$TB_DIR/sniff41")
check "cn's echoes to the HoA reach the CoA IPv6-in-IPv6 ($n41 of 3)" [ "$n41" -ge 3 ]
tb_ping cn 192.0.2.20 1 0.2 1 >/dev/null || true
lladdr4=$(tb_exec cn ip neigh show 192.0.2.20 dev "$cn_if" | awk '{for(i=1;i<NF;i++) if($i=="lladdr") print $(i+1)}')
check "proxy ARP: cn's ARP entry for the IPv4 HoA is the HA's MAC" [ "$lladdr4" = "$ha_mac" ]

# -- reverse tunnel: decapsulated packets reach cn; a spoofed inner source does not
cat >"$TB_DIR/cn_sniff.py" <<'PY'
import sys, time
from scapy.all import AsyncSniffer
from scapy.layers.inet6 import IPv6, ICMPv6EchoRequest
from scapy.layers.inet import IP, ICMP
def ours(p):
    return ((ICMPv6EchoRequest in p and p[ICMPv6EchoRequest].id == 0x4b4d) or
            (IP in p and ICMP in p and p[ICMP].type == 8 and p[ICMP].id == 0x4b4d))
sn = AsyncSniffer(iface=sys.argv[1], store=True, lfilter=ours)
sn.start(); time.sleep(0.3); open(sys.argv[3], "w").close()
time.sleep(float(sys.argv[2])); sn.stop()
print(" ".join(p[IPv6].src if IPv6 in p else p[IP].src for p in sn.results))
PY
tb_exec cn "$py" "$TB_DIR/cn_sniff.py" "$cn_if" 10 "$TB_DIR/cn_sniff.ready" >"$TB_DIR/cn_sniff" &  # 4 scapy runs below
sniff_pid=$!
tb_wait_for 20 test -e "$TB_DIR/cn_sniff.ready" || fail "cn's sniffer did not start"
spoofed_before=$(counter decap_spoofed)
mn tunnel --inner-src "$HOA" --inner-dst "$CN" --seq 1
mn tunnel --inner-src "$HOA2" --inner-dst "$CN" --seq 2
mn tunnel4 --inner-src 192.0.2.20 --inner-dst 192.0.2.30 --seq 3
mn tunnel4 --inner-src 192.0.2.21 --inner-dst 192.0.2.30 --seq 4
wait $sniff_pid || true
srcs=$(cat "$TB_DIR/cn_sniff")
check "decapsulated echoes from the HoA and IPv4 HoA (6in6, 4in6) reach cn, spoofed ones do not (saw: '$srcs')" \
  [ "$srcs" = "$HOA 192.0.2.20" ]
check "spoofed inner source dropped and counted" [ "$(counter decap_spoofed)" -gt "$spoofed_before" ]

# -- malformed BUs and a flood leave the daemon up and the binding unchanged
for cut in 1 4 8 16 20; do mn bu --hoa "$HOA" --seq 50 --truncate $cut --timeout 0.5 --expect 0 >/dev/null; done
out=$(mn bu --hoa "$HOA" --seq 51 --badsum --timeout 1 --expect 0)
check "bad checksum: no BA" [ "$(nbas "$out")" = 0 ]
check "bad checksum counted" [ "$(counter bu_bad_checksum)" -ge 1 ]
check "truncated BUs counted as malformed" [ $(($(counter bu_malformed) + $(counter link_malformed))) -ge 5 ]
out=$(mn bu --hoa 2001:db8:a::99 --count 300 --timeout 2 --expect 300)
n=$(nbas "$out")
# Burst 20 plus 20/s of refill while scapy sends (2-4 s on a loaded machine).
check "flood of 300 BUs: at most the burst plus refill answered ($n)" [ "$n" -ge 20 -a "$n" -le 150 ]
check "flood counted as rate limited" [ "$(counter bu_rate_limited)" -ge 150 ]
check "daemon alive after malformed input and flood" tb_pid_alive "$ha_pid"
check "binding unchanged: sequence 11" [ "$(binding_field "$HOA" sequence)" = 11 ]
check "binding unchanged: care-of" [ "$(binding_field "$HOA" care_of)" = "$COA" ]
check "still exactly one binding" [ "$(status | $py -c 'import json,sys; print(json.load(sys.stdin)["binding_count"])')" = 1 ]
sleep 1.1  # let the bucket refill

# -- restart: the binding survives
"$ha_bin" status --control "$TB_DIR/ha.sock" >&2
tb_stop "$ha_pid"
mode=$(stat -c %a "$TB_DIR/ha-state/bindings.journal")
check "journal is mode 600" [ "$mode" = 600 ]
start_ha 2 --insecure --dad off --allow "$HOA" --allow "$HOA2" --bu-rate 20
check "binding restored after restart" [ "$(binding_field "$HOA" care_of)" = "$COA" ]
check "restored binding keeps its sequence" [ "$(binding_field "$HOA" sequence)" = 11 ]
check "restored binding re-announced (proxy NA sent)" [ "$(counter proxy_na_sent)" -ge 1 ]
out=$(mn bu --hoa "$HOA" --seq 11)
check "sequence window survives the restart (replay -> 135)" [ "$(ba_field "$out" status)" = 135 ]

# -- deregistration
out=$(mn bu --hoa "$HOA" --seq 12 --lifetime 0)
check "deregistration: BA 0 with lifetime 0" [ "$(ba_field "$out" status)/$(ba_field "$out" lifetime)" = 0/0 ]
check "deregistration removes the binding" [ "$(binding_field "$HOA" care_of)" = none ]
tb_stop "$ha_pid"

# ============================== phase 2 =========================================
key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s\n' "$key" >"$TB_DIR/hoa.key"
chmod 644 "$TB_DIR/hoa.key"
if "$ha_bin" serve --home-link "$ha_if" --address "$HA" --home-prefix 2001:db8:a::/64 \
  --key "$HOA:1000:$TB_DIR/hoa.key" --state-dir "$TB_DIR/ha-state2" --control "$TB_DIR/ha.sock" \
  2>"$TB_DIR/loose.err"; then
  fail "started with a key file readable by others"
else
  check "refuses a 0644 key file with a clear message" grep -q "chmod 600" "$TB_DIR/loose.err"
  check "the message does not contain the key" bash -c "! grep -q '$key' '$TB_DIR/loose.err'"
fi
chmod 600 "$TB_DIR/hoa.key"
rm -rf "$TB_DIR/ha-state"
start_ha 3 --dad rfc --key "$HOA:1000:$TB_DIR/hoa.key" --key "$CN:1001:$TB_DIR/hoa.key"
check "the key never appears in the log" bash -c "! grep -q '$key' '$TB_LOGS/ha3.log'"

out=$(mn bu --hoa "$HOA" --seq 1 --spi 1000 --key "$key" --timeout 4)
check "authenticated BU accepted after DAD: status 0" [ "$(ba_field "$out" status)" = 0 ]
check "the BA's authenticator verifies (scapy side, Python hmac)" [ "$(ba_field "$out" auth_ok)" = True ]
d=$(ba_field "$out" delay)
check "rfc DAD: the BA waited RetransTimer (1 s; BU->BA ${d}s)" \
  $py -c "import sys; sys.exit(0 if 1.0 <= $d < 2.0 else 1)"
wrong=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
out=$(mn bu --hoa "$HOA" --seq 2 --spi 1000 --key "$wrong")
check "wrong key: 146" [ "$(ba_field "$out" status)" = 146 ]
out=$(mn bu --hoa "$HOA" --seq 3 --spi 1002 --key "$key")
check "wrong SPI: 146" [ "$(ba_field "$out" status)" = 146 ]
out=$(mn bu --hoa "$HOA" --seq 4 --timeout 1 --expect 0)
check "unauthenticated BU: dropped without a BA" [ "$(nbas "$out")" = 0 ]
check "unauthenticated BU counted" [ "$(counter bu_auth_missing)" = 1 ]
check "binding still at sequence 1" [ "$(binding_field "$HOA" sequence)" = 1 ]
# cn holds 2001:db8:a::30 on the home link: DAD on its behalf must fail.
out=$(mn bu --hoa "$CN" --seq 1 --spi 1001 --key "$key" --timeout 4)
check "home address in use on the home link: 134 (DAD failed)" [ "$(ba_field "$out" status)" = 134 ]
check "no binding for the address in use" [ "$(binding_field "$CN" care_of)" = none ]
"$ha_bin" status --control "$TB_DIR/ha.sock" >&2
tb_stop "$ha_pid"

# ============================== phase 3 =========================================
# --dad optimistic: accepted at once, revoked on a conflict (next BU 134);
# expiry at --max-lifetime.
rm -rf "$TB_DIR/ha-state"
MAX_LIFETIME=8 start_ha 4 --insecure --dad optimistic --allow "$HOA" --allow "$CN"
out=$(mn bu --hoa "$CN" --seq 1 --lifetime 1)
check "optimistic: BU for an address in use is accepted at once (0)" [ "$(ba_field "$out" status)" = 0 ]
tb_wait_for 5 bash -c "[ \"\$('$ha_bin' status --control '$TB_DIR/ha.sock' --json | $py -c 'import json,sys; print(json.load(sys.stdin)[\"counters\"][\"dad_revoked\"])')\" = 1 ]" ||
  true
check "optimistic: the background probe revoked it" [ "$(counter dad_revoked)" = 1 ]
check "optimistic: no binding left for the address in use" [ "$(binding_field "$CN" care_of)" = none ]
out=$(mn bu --hoa "$CN" --seq 2 --lifetime 1)
check "optimistic: the next BU for it gets 134" [ "$(ba_field "$out" status)" = 134 ]
out=$(mn bu --hoa "$HOA" --seq 1 --lifetime 100)
check "optimistic: a free address is accepted (0, lifetime capped to 2 units)" [ "$(ba_field "$out" status)/$(ba_field "$out" lifetime)" = 0/2 ]
tb_wait_for 3 bash -c "'$ha_bin' status --control '$TB_DIR/ha.sock' --json | grep -q '\"state\": *\"active\"'" || true
check "optimistic: promoted to active after the quiet probe" [ "$(binding_field "$HOA" state)" = active ]
tb_wait_for 12 bash -c "'$ha_bin' status --control '$TB_DIR/ha.sock' --json | grep -q '\"binding_count\": *0'" || true
check "the binding expired after its 8 s lifetime" [ "$(binding_field "$HOA" care_of)" = none ]
check "expiry counted" [ "$(counter expired)" = 1 ]

((failures == 0)) || tb_fail "$failures check(s) failed"
tb_log "all kagemusha-ha checks passed"

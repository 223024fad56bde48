#!/usr/bin/env bash
# Bad input to both daemons (scapy; attackers that spoof source addresses:
# foreign host B towards the HA, a host on A's site link towards A), while the guest is registered at
# foreign host A. Both daemons must stay up and the binding must stay
# correct (status --json): HA binding for the HoA still at A with the same
# sequence number, no binding for anything else, session registered, and
# the CN still reaches the guest.
#   to kagemusha-ha:  a truncated MH; an MH whose Header Len claims 2048
#     bytes; an oversized BU (a 2032-byte MH, near the 2048 maximum, so it arrives fragmented); a BU
#     with a wrong checksum; an unauthenticated BU hijacking the HoA; a BU
#     for an unconfigured home address (unauthenticated, and authenticated
#     with the real key but for the wrong address); a BU flood (400 from one
#     source, 400 from distinct spoofed sources).
#   to kagemusha-tunneld: a spoofed BA (source not the HA); a BA with the
#     wrong sequence; a truncated BA; a BA with a wrong checksum. Then, with
#     the session held in "registering" (the HA frozen with SIGSTOP while the
#     tunneld re-registers), correctly authenticated BAs (the test knows the
#     key) with the wrong sequence and with a spoofed source, which must not
#     complete the registration; after SIGCONT the real BA does.
set -euo pipefail
SRC="${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}"
# shellcheck source=tests/kit/testbed.sh
source "$SRC/tests/kit/testbed.sh"
# shellcheck source=tests/tunnel/topology.sh
source "$SRC/tests/tunnel/topology.sh"
SCAPY_PY=/usr/bin/python3
mob_require_daemons
$SCAPY_PY -c 'import scapy.layers.inet6' 2>/dev/null || tb_skip "scapy is not installed for $SCAPY_PY"
tb_init
mob_topology --cn-rtt 20 --foreign-rtt 10
mob_ha_start --dad off
mob_tunneld_start a
mob_move a
mob_wait_registered a
tb_ping cn "$MOB_HOA6" 1 0.1 2 >/dev/null || true
mob_ping_ok cn "$MOB_HOA6" 3

cat >"$TB_DIR/mh_attack.py" <<'PY'
import hashlib, hmac, socket, struct, sys
from scapy.all import Raw, fragment6
from scapy.layers.inet6 import (IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
                                IPv6ExtHdrRouting, HAO, MIP6MH_BA, MIP6MH_BU, PadN)

# Frames straight onto the attacker's uplink, addressed to its router: a
# raw IPv6 socket would leave the routing of RH2 packets to the kernel.
IFACE, ROUTER_MAC = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
pk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
pk.bind((IFACE, 0))
MY_MAC = pk.getsockname()[4]
sent = 0
def send(pkt):
    global sent
    b = bytes(pkt)
    try:
        pk.send(bytes.fromhex(ROUTER_MAC.replace(":", "")) + MY_MAC + b"\x86\xdd" + b)
        sent += 1
    except OSError as e:
        print("send error %s (%d bytes)" % (e, len(b)), file=sys.stderr)

def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

def mh_checksum(src, dst, mh):
    ph = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + \
        struct.pack("!I3xB", len(mh), 135)
    return csum(ph + mh)

def authed_ba(ha, coa, hoa, key, spi, seq, status=0, lifetime=150, src=None):
    """A BA with an RFC 4285 MN-HA authenticator (HMAC-SHA256 truncated to
    128 bits), option at 8n+1 so it ends the MH (no padding after it)."""
    fixed = struct.pack("!BBHHH", status, 0, seq, lifetime, 0)[:6]  # status, flags, seq, lifetime
    body = fixed + b"\x01\x03\x00\x00\x00"   # PadN to offset 17
    opt = struct.pack("!BBBI", 9, 21, 1, spi)  # type, len 5+16, subtype MN-HA, SPI
    hlen = (6 + len(body) + len(opt) + 16) // 8 - 1
    head = struct.pack("!BBBBH", 59, hlen, 6, 0, 0)
    mac_input = head + body + opt
    auth = hmac.new(key, socket.inet_pton(socket.AF_INET6, coa) + socket.inet_pton(socket.AF_INET6, hoa) +
                    mac_input, hashlib.sha256).digest()[:16]
    mh = bytearray(mac_input + auth)
    assert len(mh) % 8 == 0
    c = mh_checksum(src or ha, hoa, bytes(mh))
    mh[4:6] = struct.pack("!H", c)
    return IPv6(src=src or ha, dst=coa, nh=43) / IPv6ExtHdrRouting(type=2, segleft=1, addresses=[hoa], nh=135) / Raw(bytes(mh))

mode = sys.argv[1]
if mode == "ha":
    ha, src, hoa, keyfile = sys.argv[2:6]
    key = open(keyfile, "rb").read()
    bu = lambda h=hoa, s=src, seq=50000, opts=None: IPv6(src=s, dst=ha) / IPv6ExtHdrDestOpt(options=[HAO(hoa=h)]) / \
        MIP6MH_BU(seq=seq, flags=0x30, mhtime=100)
    good = bytes(bu())
    # truncated MH (Header Len says more than is there)
    t = bytearray(good[:-8]); struct.pack_into("!H", t, 4, len(t) - 40); send(Raw(bytes(t)))
    # Header Len lying: claims 2048 bytes
    l = bytearray(good); l[40 + 24 + 1] = 255; send(Raw(bytes(l)))
    # oversized BU: a 2032-byte MH of PadN options, fragmented
    big = IPv6(src=src, dst=ha) / IPv6ExtHdrFragment(id=0x4b4d) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) / \
        MIP6MH_BU(seq=50001, flags=0x30, mhtime=100, options=[PadN(optdata=b"\0" * 250)] * 8)
    for f in fragment6(big, 1280):
        send(f)
    # wrong checksum
    w = bytearray(good); w[40 + 24 + 4] ^= 0xFF; send(Raw(bytes(w)))
    # hijack attempt: unauthenticated BU for the real HoA from the attacker
    send(bu(seq=50002))
    # unconfigured home addresses
    other = hoa.rsplit(":", 1)[0] + ":200"
    send(bu(h=other, seq=1))
    print("sent=%d" % sent)
elif mode == "flood":
    ha, src, hoa, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    for i in range(n):
        send(IPv6(src=src, dst=ha) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) / MIP6MH_BU(seq=i, flags=0x30, mhtime=100))
    prefix = src.rsplit(":", 1)[0]
    for i in range(n):
        send(IPv6(src="%s:%x" % (prefix, 0x1000 + i), dst=ha) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) /
             MIP6MH_BU(seq=i, flags=0x30, mhtime=100))
    print("sent=%d" % sent)
elif mode == "host":
    ha, coa, hoa, attacker = sys.argv[2:6]
    rh = lambda: IPv6ExtHdrRouting(type=2, segleft=1, addresses=[hoa])
    send(IPv6(src=attacker, dst=coa) / rh() / MIP6MH_BA(status=0, seq=7, mhtime=100))   # spoofed source
    send(IPv6(src=ha, dst=coa) / rh() / MIP6MH_BA(status=0, seq=12345, mhtime=100))     # wrong sequence
    good = bytes(IPv6(src=ha, dst=coa) / rh() / MIP6MH_BA(status=0, seq=12345, mhtime=100))
    t = bytearray(good[:-4]); struct.pack_into("!H", t, 4, len(t) - 40); send(Raw(bytes(t)))  # truncated
    w = bytearray(good); w[-8] ^= 0xFF; send(Raw(bytes(w)))                                # checksum
    print("sent=%d" % sent)
elif mode == "authba":
    ha, coa, hoa, keyfile, spi, seq, src = sys.argv[2:9]
    key = open(keyfile, "rb").read()
    send(authed_ba(ha, coa, hoa, key, int(spi), int(seq), src=src))
    print("sent=%d" % sent)
PY
# Attackers: b (its site routes to the home prefix, so it reaches the HA)
# and "evil" on A's site link next to a (the kit routes no foreign site to
# another, so b cannot reach a's care-of address).
tb_host evil siteA --v6 2001:db8:a::66/64
b_router_mac=$(tb_exec siteB cat "/sys/class/net/$(tb_if siteB bridge)/address")
a_mac=$(tb_exec a cat "/sys/class/net/${MOB_UPLINK[a]}/address")
attack() { tb_exec b $SCAPY_PY "$TB_DIR/mh_attack.py" "${MOB_UPLINK[b]}" "$b_router_mac" "$@"; }
attack_a() { tb_exec evil $SCAPY_PY "$TB_DIR/mh_attack.py" "$(tb_if evil siteA)" "$a_mac" "$@"; }
ha_c() { mob_ha_status | mob_json ha_counter "$1"; }
t_c() { mob_tunneld a status --json | mob_json counter "$MOB_SESSION" "$1"; }
binding_ok() {  # WHAT EXPECTED_SEQ
  local st
  st=$(mob_ha_status) || tb_fail "HA status failed after $1"
  [[ "$(mob_json ha_coa "$MOB_HOA6" <<<"$st")" == "${MOB_COA[a]}" ]] || tb_fail "after $1 the binding moved: $st"
  [[ "$(mob_json ha_count <<<"$st")" == 1 ]] || tb_fail "after $1 the HA has other bindings: $st"
  [[ -z "${2:-}" || "$(mob_json ha_field "$MOB_HOA6" sequence <<<"$st")" == "$2" ]] ||
    tb_fail "after $1 the binding's sequence changed (want $2): $st"
  tb_pid_alive "$MOB_HA_PID" || tb_fail "kagemusha-ha died after $1"
  tb_pid_alive "${MOB_TUNNELD_PID[a]}" || tb_fail "kagemusha-tunneld died after $1"
  [[ "$(mob_tunneld a status --json | mob_json session_state "$MOB_SESSION")" == registered ]] ||
    tb_fail "after $1 the session is not registered: $(mob_tunneld a status --json)"
}
# True once counter KEY (read by FN: ha_c or t_c) has grown by N over BASE.
grown() { local v; v=$("$1" "$2") && [[ -n "$v" ]] && ((v - $3 >= $4)); }
seq0=$(mob_ha_status | mob_json ha_field "$MOB_HOA6" sequence)
attacker=${MOB_COA[b]}

# ---- the home agent ----
before_mal=$(ha_c bu_malformed); before_ck=$(ha_c bu_bad_checksum); before_rx=$(ha_c bu_received)
before_miss=$(ha_c bu_auth_missing); before_rej=$(ha_c rejected)
out=$(attack ha "$MOB_HA6" "$attacker" "$MOB_HOA6" "$(mob_key)") || tb_fail "scapy: $out"
tb_log "to the HA: $out"
tb_wait_for 10 grown ha_c bu_received "$before_rx" 5 || true
tb_wait_for 5 grown ha_c bu_malformed "$before_mal" 2 || true
binding_ok "bad BUs" "$seq0"
mal=$(($(ha_c bu_malformed) - before_mal)); ck=$(($(ha_c bu_bad_checksum) - before_ck))
miss=$(($(ha_c bu_auth_missing) - before_miss)); rej=$(($(ha_c rejected) - before_rej))
tb_log "HA counted: malformed +$mal, bad checksum +$ck, auth missing +$miss, rejected +$rej, received +$(($(ha_c bu_received) - before_rx))"
((mal >= 2)) || tb_fail "HA did not count the truncated and length-lying MHs as malformed (+$mal)"
((ck >= 1)) || tb_fail "HA did not count the wrong checksum (+$ck)"
((miss + rej >= 2)) || tb_fail "HA neither dropped nor rejected the unauthenticated BUs (auth missing +$miss, rejected +$rej)"
mob_ping_ok cn "$MOB_HOA6" 3

before_rl=$(ha_c bu_rate_limited)
out=$(attack flood "$MOB_HA6" "$attacker" "$MOB_HOA6" 400) || tb_fail "scapy flood: $out"
tb_log "flood: $out"
tb_wait_for 10 grown ha_c bu_rate_limited "$before_rl" 300 || true
rl=$(($(ha_c bu_rate_limited) - before_rl))
tb_log "HA rate-limited +$rl BUs; rate table $(mob_ha_status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("rate_table_entries"))') entries"
((rl >= 300)) || tb_fail "a 400-BU burst from one source was not rate-limited (+$rl)"
binding_ok "BU flood" "$seq0"
mob_ping_ok cn "$MOB_HOA6" 3

# ---- the host daemon ----
b_src=$(t_c ba_wrong_source); b_mal=$(t_c mh_malformed)
b_other=$(($(t_c ba_unexpected) + $(t_c ba_wrong_sequence) + $(t_c ba_auth_failed)))
out=$(attack_a host "$MOB_HA6" "${MOB_COA[a]}" "$MOB_HOA6" 2001:db8:a::66) || tb_fail "scapy: $out"
tb_log "to tunneld: $out"
tb_wait_for 10 grown t_c mh_malformed "$b_mal" 2 || true
tb_wait_for 5 grown t_c ba_wrong_source "$b_src" 1 || true
binding_ok "bad BAs" "$seq0"
ws=$(($(t_c ba_wrong_source) - b_src)); mm=$(($(t_c mh_malformed) - b_mal))
other=$(($(t_c ba_unexpected) + $(t_c ba_wrong_sequence) + $(t_c ba_auth_failed) - b_other))
tb_log "tunneld counted: wrong source +$ws, malformed +$mm, unexpected/wrong sequence/auth failed +$other"
((ws >= 1)) || tb_fail "tunneld did not count the spoofed BA"
((mm >= 2)) || tb_fail "tunneld did not count the truncated and bad-checksum BAs as malformed (+$mm)"
((other >= 1)) || tb_fail "tunneld did not count the wrong-sequence BA"

# Authenticated forgeries while the session is registering: freeze the HA,
# restart the tunneld (it resumes and sends a BU nobody answers).
kill -STOP "$MOB_HA_PID"
tb_stop "${MOB_TUNNELD_PID[a]}" 5
mob_tunneld_start a
tb_wait_for 15 _mob_session_is a registering || tb_fail "session not registering with the HA frozen: $(mob_tunneld a status --json)"
pending=$(mob_tunneld a status --json | python3 -c '
import json, sys
for s in json.load(sys.stdin)["sessions"]:
    print(s["bindings"][0]["seq"])')
wrong=$(((pending + 100) % 65536))
w0=$(t_c ba_wrong_sequence); s0=$(t_c ba_wrong_source)
attack_a authba "$MOB_HA6" "${MOB_COA[a]}" "$MOB_HOA6" "$(mob_key)" "$MOB_SPI" "$wrong" "$MOB_HA6" >/dev/null
attack_a authba "$MOB_HA6" "${MOB_COA[a]}" "$MOB_HOA6" "$(mob_key)" "$MOB_SPI" "$pending" 2001:db8:a::66 >/dev/null
tb_wait_for 10 grown t_c ba_wrong_sequence "$w0" 1 || true
tb_wait_for 5 grown t_c ba_wrong_source "$s0" 1 || true
st=$(mob_tunneld a status --json | mob_json session_state "$MOB_SESSION")
[[ "$st" == registering ]] || tb_fail "a forged BA changed the session to '$st' (pending seq $pending)"
((($(t_c ba_wrong_sequence) - w0) >= 1)) || tb_fail "authenticated BA with seq $wrong (pending $pending) not counted as wrong sequence: $(mob_tunneld a status --json)"
((($(t_c ba_wrong_source) - s0) >= 1)) || tb_fail "authenticated BA from 2001:db8:a::66 not counted as wrong source"
tb_log "authenticated forgeries (seq $wrong; source 2001:db8:a::66) refused while registering seq $pending"
kill -CONT "$MOB_HA_PID"
tb_wait_for 40 _mob_session_is a registered || tb_fail "session did not register after the HA resumed: $(mob_tunneld a status --json)"
binding_ok "the HA resumed"
mob_ping_ok cn "$MOB_HOA6" 5
tb_log "PASS: both daemons up, binding $MOB_HOA6 -> ${MOB_COA[a]} intact, guest reachable"

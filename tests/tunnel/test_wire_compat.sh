#!/usr/bin/env bash
# Wire compatibility of the Mobility Header codec with two independent
# implementations (issue 3 §4):
#   1. our BU (HAO, IPv4 Home Address option, MN-HA auth) and BA (RH2, IPv4
#      Address Acknowledgement, MN-HA auth), written as pcap by
#      kagemusha-mh-tool, are dissected by tshark (Wireshark's mip6 dissector)
#      and by scapy 2.5 with the expected field values; scapy-side Python
#      recomputes the MH checksum (HoA pseudo-header) and the RFC 4285
#      authenticator with its own code;
#   1c. our unsolicited NA, DAD NS, RA, gratuitous ARP, IPv6-in-IPv6,
#      IPv4-in-IPv6, Packet Too Big and frag-needed frames are dissected by
#      tshark, which verifies their ICMPv6/IPv4/ICMP/UDP checksums;
#   2. BU/BA packets crafted by scapy, valid and malformed, are judged by our
#      decoder with the expected verdict.
# tshark 4.0 does not verify MH checksums, so checksum agreement is checked
# on the scapy side. Missing tools: print SKIP and exit 77.
set -euo pipefail

build=${KAGEMUSHA_BUILD:-$(cd "$(dirname "$0")/../.." && pwd)/build}
tool=$build/tunnel/kagemusha-mh-tool
py=/usr/bin/python3  # python3-scapy is installed for the system interpreter

[[ -x $tool ]] || { echo "SKIP: $tool not built"; exit 77; }
command -v tshark >/dev/null || { echo "SKIP: tshark not installed"; exit 77; }
[[ -x $py ]] && $py -c 'import scapy.layers.inet6' 2>/dev/null ||
  { echo "SKIP: python3-scapy not available for $py"; exit 77; }

work=$(mktemp -d /tmp/kagemusha-wire.XXXXXX)
trap 'rm -rf "$work"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
pass() { echo "ok: $*"; }

# ---- 1a. ours -> tshark ------------------------------------------------------
"$tool" write-pcap "$work/ours.pcap" >"$work/scenario"
declare -A S
while IFS='=' read -r k v; do S[$k]=$v; done <"$work/scenario"

ts() { tshark -r "$work/ours.pcap" -T fields -E separator='|' "$@" 2>/dev/null; }
bu_fields=$(ts -Y 'mip6.mhtype == 5' -e mip6.mhtype -e mip6.bu.seqnr -e mip6.bu.a_flag -e mip6.bu.h_flag \
  -e mip6.bu.lifetime -e ipv6.opt.mipv6.home_address -e mip6.ipv4ha.ha -e mip6.ipv4ha.preflen \
  -e mip6.ipv4ha.p_flag -e mip6.auth.mobility_spi -e mip6.csum)
want="5|${S[seq]}|1|1|${S[lifetime]}|${S[hoa]}|${S[ipv4_hoa]}|${S[ipv4_prefix]}|0|${S[spi]}|${S[bu_checksum]}"
[[ $bu_fields == "$want" ]] && pass "tshark reads our BU: $bu_fields" || fail "tshark BU fields '$bu_fields' != '$want'"

ba_fields=$(ts -Y 'mip6.mhtype == 6' -e mip6.mhtype -e mip6.ba.status -e mip6.ba.seqnr -e mip6.ba.lifetime \
  -e ipv6.routing.type -e ipv6.routing.segleft -e ipv6.routing.mipv6.home_address -e mip6.ipv4aa.sts \
  -e mip6.auth.mobility_spi -e mip6.csum)
want="6|0|${S[seq]}|${S[lifetime]}|2|1|${S[hoa]}|0|${S[spi]}|${S[ba_checksum]}"
[[ $ba_fields == "$want" ]] && pass "tshark reads our BA: $ba_fields" || fail "tshark BA fields '$ba_fields' != '$want'"

bad=$(tshark -r "$work/ours.pcap" -Y '_ws.malformed || _ws.expert.severity >= warning' 2>/dev/null | wc -l)
[[ $bad == 0 ]] && pass "tshark flags nothing malformed" || fail "tshark reports $bad malformed/warning frames"

# ---- 1b. ours -> scapy, with independent checksum and HMAC -------------------
if $py - "$work/ours.pcap" "${S[key]}" "${S[spi]}" "${S[seq]}" "${S[lifetime]}" "${S[hoa]}" "${S[coa]}" \
  "${S[ha]}" <<'PY'; then pass "scapy decodes our BU/BA; checksum and authenticator recomputed independently agree"; else fail "scapy check of our pcap"; fi
import hashlib, hmac, socket, struct, sys
from scapy.all import rdpcap, raw
from scapy.layers.inet6 import IPv6, HAO, MIP6MH_BU, MIP6MH_BA, MIP6OptMsgAuth, IPv6ExtHdrRouting
from scapy.utils import checksum

path, key, spi, seq, life, hoa, coa, ha = sys.argv[1:]
spi, seq, life = int(spi), int(seq), int(life)
pkts = rdpcap(path)
assert len(pkts) == 2, len(pkts)

def a6(s): return socket.inet_pton(socket.AF_INET6, s)

def check_mh(mh_layer, src, dst):
    mh = bytearray(raw(mh_layer))
    assert len(mh) == 8 * (mh[1] + 1), "Header Len disagrees with scapy's view"
    want = struct.unpack("!H", mh[4:6])[0]
    mh[4:6] = b"\0\0"
    pseudo = a6(src) + a6(dst) + struct.pack("!I", len(mh)) + b"\0\0\0\x87"
    got = checksum(pseudo + bytes(mh))
    assert got == want, "checksum: scapy computes %#06x, packet has %#06x" % (got, want)
    auth = mh_layer[MIP6OptMsgAuth]
    assert auth.subtype == 1 and auth.mspi == spi, (auth.subtype, auth.mspi)
    # RFC 4285: HMAC over care-of | home | MH up to and including the SPI.
    raw_mh = bytes(mh)
    off = raw_mh.find(bytes([9, auth.olen, auth.subtype]) + struct.pack("!I", spi)) + 7
    mac = hmac.new(key.encode(), a6(coa) + a6(hoa) + raw_mh[:off], hashlib.sha256).digest()[:16]
    assert auth.authdata == mac, "authenticator mismatch: %s vs %s" % (auth.authdata.hex(), mac.hex())

bu = pkts[0]
assert MIP6MH_BU in bu and HAO in bu, bu.summary()
b = bu[MIP6MH_BU]
assert b.seq == seq and b.mhtime == life, (b.seq, b.mhtime)
assert "A" in b.flags and "H" in b.flags and "K" not in b.flags, b.flags
assert bu[HAO].hoa == hoa and bu[HAO].optlen == 16
assert bu[IPv6].src == coa and bu[IPv6].dst == ha
check_mh(b, hoa, ha)

ba = pkts[1]
assert MIP6MH_BA in ba and IPv6ExtHdrRouting in ba, ba.summary()
a = ba[MIP6MH_BA]
assert a.status == 0 and a.seq == seq and a.mhtime == life, (a.status, a.seq, a.mhtime)
rh = ba[IPv6ExtHdrRouting]
assert rh.type == 2 and rh.segleft == 1 and rh.addresses == [hoa], (rh.type, rh.segleft, rh.addresses)
check_mh(a, ha, hoa)
PY

# ---- 1c. our ND / ARP / tunnel / ICMP frames -> tshark -------------------------
# Wireshark verifies these checksums itself (status 1 = good, 2 = unverified
# because quoted/truncated, 3 = not present, 0 = bad).
"$tool" write-link-pcap "$work/link.pcap" >/dev/null
link=$(tshark -o ip.check_checksum:TRUE -o udp.check_checksum:TRUE -r "$work/link.pcap" -T fields -E separator='|' \
  -e icmpv6.type -e icmpv6.checksum.status -e ip.checksum.status -e icmp.checksum.status -e udp.checksum.status \
  -e arp.isgratuitous -e icmpv6.nd.na.flag.o -e icmpv6.nd.na.flag.s -e icmpv6.mtu -e icmpv6.opt.mtu \
  -e icmpv6.nd.ra.flag.h -e icmpv6.opt.prefix -e icmp.mtu -e ipv6.nxt 2>/dev/null)
want_link='136|1|||||1|0||||||58
135|1||||||||||||58
134|1||||||||1400|1|2001:db8:1::||58
|||||1||||||||
||||1|||||||||41,17
||1||3|||||||||4
2|1|||2||||1400|||||58,17
||1,1|1|3||||||||1380|'
if [[ $link == "$want_link" ]]; then
  pass "tshark verifies checksums of our unsolicited NA, DAD NS, RA, gratuitous ARP, 6in6, 4in6, PTB, frag-needed"
else
  fail "tshark view of link frames differs:"$'\n'"$link"$'\n'"wanted:"$'\n'"$want_link"
fi
bad=$(tshark -r "$work/link.pcap" -Y '_ws.malformed || _ws.expert.severity >= warning' 2>/dev/null | wc -l)
[[ $bad == 0 ]] && pass "tshark flags none of the link frames" || fail "tshark reports $bad malformed/warning link frames"

# ---- 2. scapy-crafted -> ours ------------------------------------------------
$py - "$work" "${S[key]}" <<'PY'
import hashlib, hmac, socket, struct, sys
from scapy.all import raw
from scapy.layers.inet6 import (IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, HAO, MIP6MH_BU, MIP6MH_BA,
                                MIP6MH_HoTI, MIP6OptAltCoA, MIP6OptBRAdvice, MIP6OptNonceIndices,
                                MIP6OptMsgAuth)
out, key = sys.argv[1], sys.argv[2].encode()
hoa, coa, ha = "2001:db8:1::10", "2001:db8:2::20", "2001:db8:1::1"
a6 = lambda s: socket.inet_pton(socket.AF_INET6, s)

def bu(**kw): return IPv6(src=coa, dst=ha) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) / MIP6MH_BU(**kw)
def ba(**kw): return IPv6(src=ha, dst=coa) / IPv6ExtHdrRouting(type=2, addresses=[hoa], segleft=1) / MIP6MH_BA(**kw)
def save(name, pkt): open(f"{out}/{name}.bin", "wb").write(raw(pkt))

save("valid_bu", bu(seq=77, flags="AH", mhtime=30))
save("valid_ba", ba(status=0, seq=77, mhtime=30))
save("valid_ba_rejected_status", ba(status=135, seq=78, mhtime=0))
save("valid_bu_options", bu(seq=5, flags="A", mhtime=4, options=[
    MIP6OptBRAdvice(rinter=9), MIP6OptAltCoA(acoa="2001:db8:3::30"), MIP6OptNonceIndices(olen=4, hni=1, coni=2)]))
save("valid_hoti_unrecognized", IPv6(src=coa, dst=ha) / MIP6MH_HoTI(cookie=b"12345678"))

# RFC 4285 authenticator computed here, with Python's hmac, over scapy's bytes.
p = bu(seq=9, flags="AH", mhtime=30, options=[MIP6OptMsgAuth(subtype=1, mspi=256, authdata=b"\0" * 16)])
mh = bytearray(raw(p[MIP6MH_BU])); mh[4:6] = b"\0\0"
off = bytes(mh).find(bytes([9, 21, 1]) + struct.pack("!I", 256)) + 7
mac = hmac.new(key, a6(coa) + a6(hoa) + bytes(mh[:off]), hashlib.sha256).digest()[:16]
p[MIP6OptMsgAuth].authdata = mac
p[MIP6MH_BU].cksum = None
save("valid_bu_auth", IPv6(raw(p)))

bad = bu(seq=77, flags="AH", mhtime=30); bad[MIP6MH_BU].cksum = 0x1234
save("bad_checksum", bad)
save("bad_len_too_long", bu(seq=1, len=3))
save("bad_nonce_default_olen", bu(seq=1, options=[MIP6OptNonceIndices(hni=1, coni=2)]))  # scapy's default olen=16
save("bad_hao_length", IPv6(src=coa, dst=ha) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa, optlen=15)]) / MIP6MH_BU())
save("bad_rh2_segleft", IPv6(src=ha, dst=coa) / IPv6ExtHdrRouting(type=2, addresses=[hoa], segleft=2) / MIP6MH_BA())
save("bad_hao_on_ba", IPv6(src=coa, dst=ha) / IPv6ExtHdrDestOpt(options=[HAO(hoa=hoa)]) / MIP6MH_BA())
save("bad_rh2_on_bu", IPv6(src=ha, dst=coa) / IPv6ExtHdrRouting(type=2, addresses=[hoa], segleft=1) / MIP6MH_BU())
t = raw(bu(seq=1)); save("bad_truncated", t[:-3])
PY

verdict() {  # name, expected prefix, [extra args]
  local name=$1 want=$2; shift 2
  local got
  got=$("$tool" decode "$@" "$work/$name.bin" || true)
  if [[ $got == $want* ]]; then pass "$name -> $got"; else fail "$name: got '$got', wanted '$want...'"; fi
}
verdict valid_bu "OK hao=2001:db8:1::10 type=BU seq=77 flags=0xc000 lifetime=30"
verdict valid_ba "OK rh2=2001:db8:1::10 type=BA status=0 seq=77 lifetime=30"
verdict valid_ba_rejected_status "OK rh2=2001:db8:1::10 type=BA status=135 seq=78"
verdict valid_bu_options "OK hao=2001:db8:1::10 type=BU seq=5 flags=0x8000 lifetime=4 refresh=9 alt_coa=2001:db8:3::30 nonces=1,2"
verdict valid_hoti_unrecognized "OK type=unrecognized mh_type=1"
verdict valid_bu_auth "OK hao=2001:db8:1::10 type=BU seq=9 flags=0xc000 lifetime=30 auth_spi=256 auth_len=16 auth=valid" \
  --key "${S[key]}" --spi 256
verdict valid_bu_auth "REJECT: Mobility Message Authentication mismatch" --key wrong-key --spi 256
verdict bad_checksum "REJECT: Mobility Header checksum mismatch"
verdict bad_len_too_long "REJECT:"
verdict bad_nonce_default_olen "REJECT:"
verdict bad_hao_length "REJECT:"
verdict bad_rh2_segleft "REJECT:"
verdict bad_hao_on_ba "REJECT:"
verdict bad_rh2_on_bu "REJECT:"
verdict bad_truncated "REJECT:"

if ((failures)); then echo "$failures check(s) failed"; exit 1; fi
echo "all wire-compatibility checks passed"

#!/usr/bin/env bash
# Copy-on-read across a WAN: two namespaced sites joined by kagemusha-wanem
# (20 ms RTT, 100 Mbit/s, via the kit's tb_two_sites). The source is served
# by a kagemusha-nbd target at host src (TCP); the proxy runs at host dst.
# A guest-like client at dst reads (verified against the source) while the
# fill runs; the fill completes; md5 of the export and the cache are right.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init nbdcopy nbdsh
[[ -x $ST_WANEM ]] || tb_skip "kagemusha-wanem is not built at $ST_WANEM"

src=$ST_DIR/src.img cache=$ST_DIR/cache.img bitmap=$ST_DIR/bitmap
psock=$ST_DIR/proxy.sock ctl=$ST_DIR/control.sock
st_make_dense "$src" 64
want=$(st_md5_file "$src")

tb_two_sites 20 100
src_ip=$TB_SRC_V4
st_nbd_serve_in src target --listen "$(st_hostport "$src_ip" 0)" --export "disk=$src,ro"
port=$(st_tcp_port target)
remote=$(st_uri_tcp "$src_ip" "$port" disk)
# The remote is reachable from dst through the WAN (and only from there).
st_assert_eq "remote size seen from dst" $((64 << 20)) "$(tb_exec dst nbdinfo --size "$remote")"

st_nbd_serve_in dst proxy --unix "$psock" --control "$ctl" \
  --proxy "$(st_proxy_spec disk "$remote" "$cache" "$bitmap" "block-size=65536")"
uri=$(st_uri_unix "$psock" disk)

# Guest reads during the fill: scattered 64 KiB reads from the far end of the
# disk backwards (what the fill reaches last), each verified.
"$ST_PY" - "$src" "$uri" "$ctl" "$ST_NBD" <<'PY' || tb_fail "guest reads during the fill"
import json, subprocess, sys, nbd
src = open(sys.argv[1], "rb").read()
h = nbd.NBD(); h.connect_uri(sys.argv[2])
size = len(src)
def find(o, k):
    if isinstance(o, dict):
        if k in o:
            return o[k]
        o = list(o.values())
    if isinstance(o, list):
        for v in o:
            r = find(v, k)
            if r is not None:
                return r
    return None
def complete():
    out = subprocess.run([sys.argv[4], "status", "--control", sys.argv[3], "--json"],
                         capture_output=True, text=True, check=True).stdout
    return find(json.loads(out), "complete")
during = 0
for i in range(48):
    off = size - (i * 1331 + 1) * 4096 % size
    off -= off % 4096
    ln = min(65536, size - off)
    assert h.pread(ln, off) == src[off:off + ln], f"wrong data at {off}"
    if complete() is False:
        during += 1
h.shutdown()
print(f"48 verified reads, {during} of them while the fill was incomplete")
PY
st_wait_fill "$ctl" 80
st_assert_eq "proxy export md5" "$want" "$(st_md5_uri "$uri")"
st_assert_eq "cache image md5" "$want" "$(st_md5_file "$cache")"
fetched=$(st_status_get "$ctl" bytes_fetched)
st_log "bytes fetched from the remote: $fetched"
((fetched >= 64 << 20)) || tb_fail "fetched only $fetched bytes over the WAN for a 64 MiB disk"
st_pass

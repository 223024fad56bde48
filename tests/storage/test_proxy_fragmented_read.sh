#!/usr/bin/env bash
# Copy-on-read with the background fill disabled: reading every other 64 KiB
# block fetches exactly those blocks (the bitmap becomes a comb), then large
# reads (nbdcopy, 32 MiB requests, the largest NBD allows, spanning 256
# alternating present/missing blocks each) must stitch cache and remote
# correctly: md5 right, and the rest fetched on demand.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init nbdkit qemu-io nbdcopy

src=$ST_DIR/src.img cache=$ST_DIR/cache.img bitmap=$ST_DIR/bitmap
rsock=$ST_DIR/remote.sock psock=$ST_DIR/proxy.sock ctl=$ST_DIR/control.sock
st_make_dense "$src" 64
want=$(st_md5_file "$src")
st_nbdkit remote "$rsock" "$src" -r
st_nbd_serve proxy --unix "$psock" --control "$ctl" \
  --proxy "$(st_proxy_spec frag "$(st_uri_unix "$rsock")" "$cache" "$bitmap" "block-size=65536,no-fill")"
uri=$(st_uri_unix "$psock" frag)
st_assert_eq "fill not running with no-fill" false "$(st_status_get "$ctl" fill_running)"
st_assert_eq "blocks_total" 1024 "$(st_status_get "$ctl" blocks_total)"
st_assert_eq "nothing present yet" 0 "$(st_status_get "$ctl" blocks_present)"

# Read every other block, each a 4 KiB read inside the block so the proxy,
# not the client, decides to fetch the whole block.
cmds=()
for ((b = 0; b < 1024; b += 2)); do cmds+=("read $((b * 65536 + 8192)) 4k"); done
st_qemu_io "$uri" "${cmds[@]}"
st_assert_eq "reads done" 512 "$(grep -c '^read ' "$ST_DIR/qemu-io.out")"
st_assert_eq "exactly the read blocks are present (no fill)" 512 "$(st_status_get "$ctl" blocks_present)"
st_assert_eq "still incomplete" false "$(st_status_get "$ctl" complete)"

# Spot-check the content of some present blocks against the source.
"$ST_PY" - "$src" "$uri" <<'PY' || tb_fail "content of fetched blocks"
import sys, nbd
src = open(sys.argv[1], "rb").read()
h = nbd.NBD(); h.connect_uri(sys.argv[2])
for b in (0, 2, 510, 1022):
    off = b * 65536
    assert h.pread(65536, off) == src[off:off + 65536], f"block {b} wrong"
h.shutdown()
print("present blocks ok")
PY

# One big read: the whole 64 MiB in 32 MiB requests, two in flight.
got=$( (set -o pipefail; nbdcopy -C 1 -R 2 --request-size=33554432 "$uri" - | md5sum | cut -d' ' -f1) ) ||
  tb_fail "nbdcopy big read failed"
st_assert_eq "md5 of the 64 MiB big-request read" "$want" "$got"
st_assert_eq "all blocks present after the big read" 1024 "$(st_status_get "$ctl" blocks_present)"
st_assert_eq "complete after the big read" true "$(st_status_get "$ctl" complete)"
st_assert_eq "cache image md5" "$want" "$(st_md5_file "$cache")"
st_assert_eq "md5 again (now from the cache)" "$want" "$(st_md5_uri "$uri")"
st_pass

#!/usr/bin/env bash
# Demo: relocating a VM disk across a WAN without stopping the VM's I/O.
# Run by `./kagemusha demo` (which builds first), or directly with
# KAGEMUSHA_BUILD=<build dir> bash examples/demo-storage-relocation.sh.
#
#   site A (src)                 WAN (kagemusha-wanem)             site B (dst)
#   kagemusha-nbd serve  <---- 20 ms RTT, 200 Mbit/s ---->  kagemusha-nbd serve --proxy
#   --export vm-disk                                          (cache + bitmap)  <- client
#
# 1. Site A serves the disk image. 2. Site B starts a copy-on-read proxy; the
# client (standing in for the migrated VM) uses the disk at B at once, while
# the background fill copies the rest (progress from `status --watch`).
# 3. When the fill completes, `switch --wait` turns B into a plain target;
# site A is shut down. 4. The disk at B is verified: md5 = source + the
# client's writes. Exit 0 only if that verification succeeds.
#
# Environment: DEMO_SIZE_MIB=128 DEMO_RTT_MS=20 DEMO_RATE_MBIT=200
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../tests/storage/lib.sh"

SIZE=${DEMO_SIZE_MIB:-128}
RTT=${DEMO_RTT_MS:-20}
RATE=${DEMO_RATE_MBIT:-200}

bold= reset=
if [[ -t 1 ]]; then bold=$(tput bold 2>/dev/null || true) reset=$(tput sgr0 2>/dev/null || true); fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$reset"; }
info() { printf '    %s\n' "$*"; }

st_init qemu-io nbdcopy nbdinfo

step "Preparing a ${SIZE} MiB disk image at site A"
img=$ST_DIR/site-a-vm-disk.img
st_make_dense "$img" "$SIZE"
src_md5=$(st_md5_file "$img")
info "image: $img"
info "md5:   $src_md5"

step "Building two sites joined by the WAN emulator (${RTT} ms RTT, ${RATE} Mbit/s)"
tb_two_sites "$RTT" "$RATE"
src_ip=$TB_SRC_V4
info "site A host 'src' at $src_ip; site B host 'dst'"

step "Site A: serving the disk (target mode, read-only)"
st_nbd_serve_in src site-a --listen "$(st_hostport "$src_ip" 10809)" --export "vm-disk=$img,ro,desc=demo VM disk"
remote=$(st_uri_tcp "$src_ip" 10809 vm-disk)
info "export: $remote"
tb_exec dst nbdinfo "$remote" | sed 's/^/    | /'

step "Site B: starting the copy-on-read proxy; the disk is usable at once"
cache=$ST_DIR/site-b-cache.img bitmap=$ST_DIR/site-b-cache.bitmap
psock=$ST_DIR/site-b.sock ctl=$ST_DIR/site-b-control.sock
st_nbd_serve_in dst site-b --unix "$psock" --control "$ctl" \
  --proxy "$(st_proxy_spec vm-disk "$remote" "$cache" "$bitmap" "block-size=65536")"
local_uri=$(st_uri_unix "$psock" vm-disk)
info "local export at site B: $local_uri"

# Progress, as an operator would watch it.
"$ST_NBD" status --control "$ctl" --watch >"$ST_DIR/watch.log" 2>&1 &
watch_pid=$!
tail -n +1 -f "$ST_DIR/watch.log" 2>/dev/null | sed -u 's/^/    [status] /' &
tail_pid=$!
tb_on_cleanup sh -c "kill $watch_pid $tail_pid 2>/dev/null || true"

step "Client at site B: I/O while the disk is still arriving"
exp=$ST_DIR/expected.img
cp "$img" "$exp"
# Reads of blocks not yet copied are fetched on demand across the WAN;
# writes land in the local cache. Each read of written data is verified.
t0=$EPOCHREALTIME
st_qemu_io "$local_uri" \
  "read 0 1M" "read $((SIZE / 2))M 1M" "read $((SIZE - 1))M 1M" \
  "write -P 0xd1 4M 256k" "write -P 0xd2 $((SIZE / 2 + 3))M 64k" "flush" \
  "read -P 0xd1 4M 256k" "read -P 0xd2 $((SIZE / 2 + 3))M 64k"
t1=$EPOCHREALTIME
sed 's/^/    | /' "$ST_DIR/qemu-io.out" | grep -E 'read|wrote'
info "client I/O done in $("$ST_PY" -c "print(f'{$t1 - $t0:.2f}')") s while the fill runs"
st_apply_pattern "$exp" $((4 << 20)) $((256 << 10)) 0xd1
st_apply_pattern "$exp" $(((SIZE / 2 + 3) << 20)) $((64 << 10)) 0xd2
want=$(st_md5_file "$exp")
# What the client reads while the fill runs must be site A's data: compare
# scattered 64 KiB reads with the source image.
"$ST_PY" - "$img" "$local_uri" <<'PY' || tb_fail "a read during the fill returned wrong data"
import sys, nbd
src = open(sys.argv[1], "rb").read()
h = nbd.NBD(); h.connect_uri(sys.argv[2])
n = 0
for i in range(32):
    off = (len(src) - (i * 2654435 % len(src))) // 65536 * 65536 - 65536
    off = max(off, 0)
    assert h.pread(65536, off) == src[off:off + 65536], f"wrong data at offset {off}"
    n += 1
h.shutdown()
print(f"    verified {n} scattered 64 KiB reads against site A's image")
PY

step "Waiting for the background fill to complete"
st_wait_fill "$ctl" 600
sleep 1  # let `status --watch` print its last line
kill "$watch_pid" "$tail_pid" 2>/dev/null || true
wait "$watch_pid" "$tail_pid" 2>/dev/null || true
st_status "$ctl" >"$ST_DIR/final-status.json"
info "final status: $(cat "$ST_DIR/final-status.json")"

step "Switching site B to target mode (clients stay connected)"
"$ST_NBD" switch --control "$ctl" --wait
mode=$(st_status_get "$ctl" mode)
info "mode: $mode"
[[ $mode == target ]] || tb_fail "mode after switch is '$mode'"

step "Shutting site A down: site B no longer needs it"
st_stop site-a

step "Verifying the relocated disk"
got=$(st_md5_uri "$local_uri")
info "expected md5 (source + client writes): $want"
info "md5 read from site B's export:        $got"
info "md5 of site B's cache image:           $(st_md5_file "$cache")"
if [[ $got != "$want" || $(st_md5_file "$cache") != "$want" ]]; then
  tb_fail "relocated disk does not match"
fi
[[ $(st_md5_file "$img") == "$src_md5" ]] || tb_fail "the source image was modified"

step "Done: the disk moved to site B under live I/O and verifies."
st_stop site-b
st_pass

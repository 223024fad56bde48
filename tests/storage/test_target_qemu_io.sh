#!/usr/bin/env bash
# kagemusha-nbd target mode driven by qemu-io over an NBD URI: concurrent
# aio writes and reads with patterns, write-zeroes, discard, FUA write, flush,
# verifying reads; afterwards the backing file must hold exactly those writes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init qemu-io nbdcopy

disk=$ST_DIR/disk.img orig=$ST_DIR/orig.img exp=$ST_DIR/expected.img sock=$ST_DIR/nbd.sock
st_make_image "$orig" 64
cp --sparse=always "$orig" "$disk"
st_nbd_serve target --unix "$sock" --export "io=$disk"
uri=$(st_uri_unix "$sock" io)
M=$((1 << 20)) K=1024

st_qemu_io "$uri" \
  "aio_write -P 0xa1 0 1M" "aio_write -P 0xa2 1M 1M" "aio_write -P 0xa3 8M 256k" \
  "aio_write -P 0xa4 33M 4k" "aio_write -P 0xa5 63M 1M" "aio_flush" \
  "aio_read -P 0xa1 0 1M" "aio_read -P 0xa2 1M 1M" "aio_read -P 0xa3 8M 256k" \
  "aio_read -P 0xa5 63M 1M" "aio_flush" \
  "write -z 4M 1M" "discard 16M 1M" "write -f -P 0xb4 20M 64k" "flush" \
  "read -P 0 4M 1M" "read -P 0xa3 8M 256k" "read -P 0xa4 33M 4k" "read -P 0xb4 20M 64k"
# qemu-io must actually have verified: every read line is present.
st_assert_eq "qemu-io verified reads" 8 "$(grep -c '^read ' "$ST_DIR/qemu-io.out")"
st_assert_eq "qemu-io acknowledged writes" 7 "$(grep -c '^wrote ' "$ST_DIR/qemu-io.out")"
cp "$ST_DIR/qemu-io.out" "$ST_DIR/session1.out"

# A mismatching pattern must be reported (the checks above can fail).
qemu-io -f raw -c "read -P 0xee 0 4k" "$uri" >"$ST_DIR/neg.out" 2>&1 || true
grep -q -i 'pattern verification failed' "$ST_DIR/neg.out" ||
  { cat "$ST_DIR/neg.out"; tb_fail "qemu-io did not notice a wrong pattern"; }

# Expected image: orig + writes; the discarded MiB may read old or zero.
cp "$orig" "$exp"
st_apply_pattern "$exp" 0 $M 0xa1
st_apply_pattern "$exp" $M $M 0xa2
st_apply_pattern "$exp" $((8 * M)) $((256 * K)) 0xa3
st_apply_pattern "$exp" $((33 * M)) $((4 * K)) 0xa4
st_apply_pattern "$exp" $((63 * M)) $M 0xa5
st_apply_pattern "$exp" $((4 * M)) $M 0
st_apply_pattern "$exp" $((20 * M)) $((64 * K)) 0xb4

"$ST_PY" - "$exp" "$disk" "$orig" $((16 * M)) $M <<'PY' || tb_fail "backing file content differs"
import sys
exp, disk, orig = (open(p, "rb").read() for p in sys.argv[1:4])
off, ln = int(sys.argv[4]), int(sys.argv[5])
assert len(disk) == len(exp), f"size {len(disk)} != {len(exp)}"
assert disk[:off] == exp[:off], "differs before the discarded range"
assert disk[off + ln:] == exp[off + ln:], "differs after the discarded range"
d = disk[off:off + ln]
assert d == bytes(ln) or d == orig[off:off + ln], "discarded range is neither zero nor old data"
print("backing file matches expected writes")
PY
st_pass

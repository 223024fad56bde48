#!/usr/bin/env bash
# kagemusha-nbd target mode driven by qemu-img: info reports the size,
# convert copies a file into the export and the export back out, compare
# finds them identical to the source (and a changed file different).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init qemu-img nbdcopy md5sum

src=$ST_DIR/src.img disk=$ST_DIR/disk.img back=$ST_DIR/back.img sock=$ST_DIR/nbd.sock
st_make_image "$src" 96
truncate -s 96M "$disk"
st_nbd_serve target --unix "$sock" --export "disk=$disk"
uri=$(st_uri_unix "$sock" disk)

# info: size and format over NBD.
qemu-img info --output=json "$uri" >"$ST_DIR/info.json"
st_assert_eq "virtual-size" $((96 << 20)) "$(st_json_get virtual-size <"$ST_DIR/info.json")"

# convert file -> export (-n: the target exists; -W out-of-order writes).
qemu-img convert -p -n -W -m 8 -f raw -O raw "$src" "$uri" >/dev/null
st_assert_eq "backing file md5 after convert in" "$(st_md5_file "$src")" "$(st_md5_file "$disk")"

# compare export against source.
qemu-img compare -f raw -F raw "$src" "$uri" >"$ST_DIR/cmp.out" || {
  cat "$ST_DIR/cmp.out"; tb_fail "qemu-img compare: export differs from source"; }
st_log "ok: qemu-img compare identical"

# convert export -> file, compare the result.
qemu-img convert -f raw -O raw "$uri" "$back"
st_assert_eq "md5 of export converted out" "$(st_md5_file "$src")" "$(st_md5_file "$back")"

# compare must notice a difference (so the check above can fail).
printf 'X' | dd of="$back" bs=1 seek=$((50 << 20)) conv=notrunc status=none
rc=0; qemu-img compare -f raw -F raw "$back" "$uri" >"$ST_DIR/cmp2.out" 2>&1 || rc=$?
st_assert_eq "qemu-img compare exit code on a differing file" 1 "$rc"

# the server is still healthy and the export unchanged.
st_assert_eq "export md5 via nbdcopy" "$(st_md5_file "$src")" "$(st_md5_uri "$uri")"
st_pass

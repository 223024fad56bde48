#!/usr/bin/env bash
# kagemusha-nbd target mode driven by nbdcopy: file -> export and
# export -> file, single and multiple connections (-C 4) with many requests
# in flight; export -> export between two servers; md5 equal every time.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init nbdcopy nbdinfo

src=$ST_DIR/src.img d1=$ST_DIR/d1.img d2=$ST_DIR/d2.img sock=$ST_DIR/nbd.sock
st_make_image "$src" 128
truncate -s 128M "$d1" "$d2"
want=$(st_md5_file "$src")
st_nbd_serve target --unix "$sock" --export "one=$d1" --export "two=$d2"
one=$(st_uri_unix "$sock" one) two=$(st_uri_unix "$sock" two)
# The log names images and peers: only its owner may read it.
st_assert_eq "--log-file mode" 600 "$(stat -c %a "$ST_DIR/target.server.log")"

# file -> export, one connection, 64 requests in flight of 256 KiB.
nbdcopy -C 1 -R 64 --request-size=262144 "$src" "$one"
st_assert_eq "backing file after nbdcopy file->export (-C 1)" "$want" "$(st_md5_file "$d1")"

# export -> export with 4 connections each side (needs several clients).
nbdcopy -C 4 -R 16 "$one" "$two"
st_assert_eq "backing file after nbdcopy export->export (-C 4)" "$want" "$(st_md5_file "$d2")"

# export -> file, 4 connections.
nbdcopy -C 4 -R 32 "$two" "$ST_DIR/out4.img"
st_assert_eq "file from nbdcopy export->file (-C 4)" "$want" "$(st_md5_file "$ST_DIR/out4.img")"
# export -> stdout (sequential path), one connection.
st_assert_eq "export -> stdout md5" "$want" "$(st_md5_uri "$one")"

# overwrite d1 through 4 connections from a different image, check again.
st_make_image "$ST_DIR/src2.img" 128
want2=$(st_md5_file "$ST_DIR/src2.img")
nbdcopy -C 4 -R 64 --request-size=65536 "$ST_DIR/src2.img" "$one"
st_assert_eq "backing file after second nbdcopy (-C 4)" "$want2" "$(st_md5_file "$d1")"
st_assert_eq "export md5 after second copy" "$want2" "$(st_md5_uri "$one")"
# The other export is unaffected.
st_assert_eq "second export untouched" "$want" "$(st_md5_uri "$two")"
st_pass

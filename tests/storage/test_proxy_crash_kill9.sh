#!/usr/bin/env bash
# Crash safety of the copy-on-read proxy. Repeated (ST_CRASH_ROUNDS, default
# 5): a proxy with a rate-limited fill serves a qemu-io writer doing
# non-overlapping patterned writes (each printed "wrote" line is an
# acknowledged write); the proxy is killed with SIGKILL at a random moment,
# restarted on the same cache and bitmap, and filled. Then every region
# written and acknowledged must hold the new pattern, a region whose write
# was in flight may hold old or new data (but nothing else), and everything
# else must equal the source. A bitmap claiming a block whose data never
# reached the cache would show up as a mismatch with the source. Every block
# the status called committed (blocks_committed) just before the kill must be
# present after the restart, before any fill runs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init nbdkit qemu-io stdbuf

rounds=${ST_CRASH_ROUNDS:-5}
src=$ST_DIR/src.img rsock=$ST_DIR/remote.sock
st_make_dense "$src" 64
st_nbdkit remote "$rsock" "$src" -r
remote_uri=$(st_uri_unix "$rsock")
REGIONS=240 STRIDE=$((256 << 10)) WOFF=$((32 << 10)) WLEN=$((24 << 10))

cat >"$ST_DIR/verify.py" <<'PY'
import re, sys
src_path, img_path, log_path, regions, stride, woff, wlen, acked_min = sys.argv[1:9]
regions, stride, woff, wlen = int(regions), int(stride), int(woff), int(wlen)
src = open(src_path, "rb").read()
img = open(img_path, "rb").read()
acked = set()
for m in re.finditer(r"wrote (\d+)/\d+ bytes at offset (\d+)", open(log_path, errors="replace").read()):
    acked.add(int(m.group(2)))
assert len(img) == len(src), f"size {len(img)} != {len(src)}"
bad = []
new_seen = 0
prev = 0
for i in range(regions):
    off = i * stride + woff
    assert img[prev:off] == src[prev:off], f"untouched data differs in [{prev}, {off})"
    pat = bytes([(i % 250) + 1]) * wlen
    got = img[off:off + wlen]
    if got == pat:
        new_seen += 1
    elif off in acked:
        bad.append(f"acknowledged write {i} at {off} lost")
    elif got != src[off:off + wlen]:
        bad.append(f"region {i} at {off} is neither old nor new data")
    prev = off + wlen
assert img[prev:] == src[prev:], "tail differs from the source"
if bad:
    raise SystemExit("; ".join(bad[:10]))
print(f"ok: {len(acked)} acknowledged writes all present, {new_seen} regions new")
if len(acked) < int(acked_min):
    raise SystemExit(f"only {len(acked)} writes acknowledged; the writer did not run")
PY

for ((r = 1; r <= rounds; r++)); do
  d=$ST_DIR/round$r
  mkdir -p "$d"
  cache=$d/cache.img bitmap=$d/bitmap psock=$d/proxy.sock ctl=$d/control.sock
  spec=$(st_proxy_spec c "$remote_uri" "$cache" "$bitmap" "block-size=65536,fill-rate=33554432")
  st_nbd_serve proxy$r --unix "$psock" --control "$ctl" --proxy "$spec"
  uri=$(st_uri_unix "$psock" c)

  # The writer: sequential patterned writes with a short pause between them,
  # in a shuffled order so the kill lands among fetched and unfetched blocks.
  cmds=()
  for i in $(seq 0 $((REGIONS - 1)) | shuf); do
    cmds+=(-c "write -P $(((i % 250) + 1)) $((i * STRIDE + WOFF)) $WLEN" -c "sleep 4")
  done
  : >"$d/writer.log"   # exists before the poll below reads it
  stdbuf -oL qemu-io -f raw "${cmds[@]}" "$uri" >"$d/writer.log" 2>&1 &
  writer=$!
  # Kill at a random moment once at least a few writes were acknowledged.
  for ((i = 0; i < 200; i++)); do
    (($(grep -c '^wrote' "$d/writer.log") >= 3)) && break; sleep 0.05
  done
  sleep "0.$((RANDOM % 9 + 1))$((RANDOM % 10))"
  committed=$(st_status_get "$ctl" blocks_committed) || tb_fail "round $r: status before the kill failed"
  st_stop "proxy$r" KILL
  wait "$writer" || true   # fails once the proxy is gone
  acked=$(grep -c '^wrote' "$d/writer.log" || true)
  st_log "round $r: proxy killed after $acked acknowledged writes, $committed blocks committed"

  # Restart on the same cache and bitmap with the fill stopped: what the
  # bitmap kept, then fill at full speed and verify.
  st_nbd_serve proxy$r.b --unix "$psock" --control "$ctl" --proxy "$spec,no-fill"
  present=$(st_status_get "$ctl" blocks_present) || tb_fail "round $r: status after the restart failed"
  ((present >= committed)) ||
    tb_fail "round $r: $committed blocks were committed before the kill, only $present present after"
  ((committed > 0)) || tb_fail "round $r: nothing was committed before the kill; the case was not exercised"
  "$ST_NBD" fill rate 0 --control "$ctl"
  "$ST_NBD" fill start --control "$ctl" || true   # already running is fine
  st_wait_fill "$ctl" 60
  # Read the export (not only the cache file): what clients would see.
  nbdcopy "$uri" "$d/final.img"
  "$ST_PY" "$ST_DIR/verify.py" "$src" "$d/final.img" "$d/writer.log" \
    "$REGIONS" "$STRIDE" "$WOFF" "$WLEN" 3 || tb_fail "round $r: content check failed"
  # The cache image itself must match what the export serves.
  st_assert_eq "round $r: cache image = export" "$(st_md5_file "$d/final.img")" "$(st_md5_file "$cache")"
  st_stop "proxy$r.b"
  rm -f "$cache" "$d/final.img"
done
st_pass

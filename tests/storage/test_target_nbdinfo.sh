#!/usr/bin/env bash
# kagemusha-nbd target mode seen by nbdinfo: --json (size, export name, flags
# incl. can_multi_conn), --list with several named exports incl. a read-only
# one (writes to it fail with EPERM), --map showing a hole after TRIM.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init nbdinfo nbdsh

a=$ST_DIR/a.img b=$ST_DIR/b.img c=$ST_DIR/c.img sock=$ST_DIR/nbd.sock
st_make_image "$a" 64
st_make_image "$b" 32
truncate -s 5M "$c"
st_nbd_serve target --unix "$sock" \
  --export "alpha=$a" --export "beta=$b,ro,desc=read-only golden image" --export "gamma=$c"

# --- --json for one export
nbdinfo --json "$(st_uri_unix "$sock" alpha)" >"$ST_DIR/alpha.json"
"$ST_PY" - "$ST_DIR/alpha.json" <<'PY' || tb_fail "nbdinfo --json alpha"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["protocol"] == "newstyle-fixed", d["protocol"]
e = d["exports"][0]
assert e["export-name"] == "alpha", e["export-name"]
assert e["export-size"] == 64 << 20, e["export-size"]
assert e["is_read_only"] is False, "alpha should be writable"
for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
    assert e.get(flag) is True, f"{flag} = {e.get(flag)}"
assert "base:allocation" in e.get("contexts", []), e.get("contexts")
print("alpha:", {k: e[k] for k in ("export-size", "can_multi_conn", "can_trim")})
PY

# --- --list: all three exports, sizes, beta read-only with its description
nbdinfo --list --json "$(st_uri_unix "$sock")" >"$ST_DIR/list.json"
"$ST_PY" - "$ST_DIR/list.json" <<'PY' || tb_fail "nbdinfo --list"
import json, sys
d = json.load(open(sys.argv[1]))
ex = {e["export-name"]: e for e in d["exports"]}
assert set(ex) == {"alpha", "beta", "gamma"}, sorted(ex)
assert ex["alpha"]["export-size"] == 64 << 20
assert ex["beta"]["export-size"] == 32 << 20
assert ex["gamma"]["export-size"] == 5 << 20
assert ex["beta"]["is_read_only"] is True, "beta should be read-only"
assert ex["alpha"]["is_read_only"] is False
assert ex["beta"].get("description") == "read-only golden image", ex["beta"].get("description")
print("list ok:", sorted(ex))
PY

# --- writes to the read-only export fail with EPERM and change nothing
before=$(st_md5_file "$b")
nbdsh -u "$(st_uri_unix "$sock" beta)" -c '
assert h.is_read_only(), "is_read_only false"
assert not h.can_zero() and not h.can_trim(), "read-only export advertises zero/trim"
try:
    h.pwrite(b"x" * 4096, 0)
except nbd.Error as e:
    print("client-side pwrite refused:", e)
else:
    raise SystemExit("pwrite to a read-only export succeeded")
' || tb_fail "read-only export flags"
# libnbd refuses such writes client-side once it sees the flags; send them
# anyway (strict mode off) so the server itself must answer EPERM.
nbdsh -u "$(st_uri_unix "$sock" beta)" -c '
import errno
h.set_strict_mode(0)
for op, f in (("write", lambda: h.pwrite(b"x" * 4096, 0)),
              ("write_zeroes", lambda: h.zero(4096, 0)),
              ("trim", lambda: h.trim(4096, 0))):
    try:
        f()
    except nbd.Error as e:
        assert e.errno in (errno.EPERM, "EPERM"), f"{op}: server errno {e.errno} ({e})"
        print("server-side", op, "-> EPERM")
    else:
        raise SystemExit(f"server accepted {op} on a read-only export")
' 2>"$ST_DIR/strict.err" || { cat "$ST_DIR/strict.err"; tb_fail "server-side read-only check"; }
st_assert_eq "read-only image unchanged" "$before" "$(st_md5_file "$b")"
# qemu-io opening it read-write must fail too.
st_expect_fail "qemu-io write to read-only export" \
  qemu-io -f raw -c "write -P 0x55 0 4k" "$(st_uri_unix "$sock" beta)"
st_assert_eq "read-only image unchanged after qemu-io" "$before" "$(st_md5_file "$b")"

# --- --map: data everywhere in [0,1M) of alpha; a hole after TRIM of 1M..3M
uri=$(st_uri_unix "$sock" alpha)
nbdsh -u "$uri" -c 'h.pwrite(b"\xaa" * (4 << 20), 8 << 20); h.flush(); h.trim(2 << 20, 9 << 20); h.flush()'
nbdinfo --map --json "$uri" >"$ST_DIR/map.json"
"$ST_PY" - "$ST_DIR/map.json" <<'PY' || { cat "$ST_DIR/map.json"; tb_fail "nbdinfo --map after trim"; }
import json, sys
m = json.load(open(sys.argv[1]))
def state(off):
    for e in m:
        if e["offset"] <= off < e["offset"] + e["length"]:
            return e["type"]
    raise SystemExit(f"no extent covers {off}")
M = 1 << 20
total = sum(e["length"] for e in m)
assert total == 64 * M, f"extents cover {total}"
# type bit 0 = hole, bit 1 = zero
for off in (9 * M, 10 * M + 4096, 11 * M - 1):
    assert state(off) & 1, f"offset {off} not a hole after trim: {state(off)}"
assert state(0) & 1 == 0, "offset 0 (random data) reported as hole"
assert state(8 * M) & 1 == 0, "offset 8M (written, not trimmed) reported as hole"
print("map ok:", [(e["offset"], e["length"], e["type"]) for e in m if 7 * M <= e["offset"] < 13 * M])
PY
# data around the trimmed range survived
nbdsh -u "$uri" -c '
assert h.pread(1 << 20, 8 << 20) == b"\xaa" * (1 << 20), "8M..9M lost"
assert h.pread(1 << 20, 11 << 20) == b"\xaa" * (1 << 20), "11M..12M lost"
z = h.pread(2 << 20, 9 << 20)
assert z == bytes(len(z)), "trimmed range of a file export does not read zeroes"
' || tb_fail "data around the trim"
st_pass

#!/usr/bin/env bash
# kagemusha-nbd target mode against hostile and broken clients, with raw
# sockets from python3: bad magic, bad client flags, an oversized option
# length, a 5000-byte export name, an unknown option then a valid GO,
# requests past the end, over-long lengths, a write to a read-only export, a
# client that vanishes mid-write, and a client that sends one byte a second
# while another client copies with nbdcopy. The server must stay up, answer
# each with an error or a disconnect of that client alone, and the data must
# stay intact (md5).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init nbdcopy

rw=$ST_DIR/rw.img ro=$ST_DIR/ro.img sock=$ST_DIR/nbd.sock
st_make_image "$rw" 64
st_make_image "$ro" 16
rw_md5=$(st_md5_file "$rw") ro_md5=$(st_md5_file "$ro")
st_nbd_serve target --unix "$sock" --export "rw=$rw" --export "ro=$ro,ro"

cat >"$ST_DIR/bad.py" <<'PY'
import errno, os, socket, struct, sys, time

SOCK, RW_FILE = sys.argv[1], sys.argv[2]
NBDMAGIC, IHAVEOPT = b"NBDMAGIC", b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
OPT_ABORT, OPT_GO = 2, 7
REP_ACK, REP_INFO = 1, 3
REQ_MAGIC, SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
failures = []

def check(cond, what):
    print(("ok:   " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        failures.append(what)

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(SOCK)
    return s

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError(f"closed after {len(b)}/{n} bytes")
        b += c
    return b

def greet(s, flags=3):
    hdr = recvn(s, 18)
    assert hdr[:16] == NBDMAGIC + IHAVEOPT, hdr
    s.sendall(struct.pack(">I", flags))

def send_opt(s, opt, data):
    s.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)

def read_reply(s):
    magic, opt, typ, ln = struct.unpack(">QIII", recvn(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return opt, typ, recvn(s, ln)

def go(s, name):
    n = name.encode()
    send_opt(s, OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
    size = flags = None
    while True:
        opt, typ, data = read_reply(s)
        if typ == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
            size, flags = struct.unpack(">QH", data[2:12])
        elif typ == REP_ACK:
            return size, flags
        elif typ & 0x80000000:
            return ("error", typ)

def closed(s):
    """True if the server closed the connection (EOF or reset) in time."""
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False

def request(s, typ, off, ln, payload=b"", flags=0, cookie=1):
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, off, ln) + payload)

def simple_reply(s):
    magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
    return err, cookie

def session(name="rw"):
    s = connect(); greet(s)
    r = go(s, name)
    assert r[0] != "error", r
    return s, r[0]

def healthy():
    """A fresh client can read offset 0 correctly."""
    s, size = session()
    request(s, CMD_READ, 0, 4096)
    err, _ = simple_reply(s)
    data = recvn(s, 4096)
    with open(RW_FILE, "rb") as f:
        good = f.read(4096)
    s.close()
    return err == 0 and data == good

# 1. bad option magic
s = connect(); greet(s)
s.sendall(b"BADMAGIC" + struct.pack(">II", OPT_GO, 0))
check(closed(s), "bad option magic -> server closes the connection")
check(healthy(), "server healthy after bad magic")

# 2. unknown client flags
s = connect(); greet(s, flags=0xFFFF0003)
check(closed(s), "unknown client flags -> server closes the connection")

# 3. oversized option length: no 4 GiB allocation, an error or a close
s = connect(); greet(s)
s.sendall(IHAVEOPT + struct.pack(">II", OPT_GO, 0xFFFFFFF0))
try:
    opt, typ, _ = read_reply(s)
    check(typ & 0x80000000 != 0, f"oversized option length -> error reply {typ:#x}")
    check(closed(s), "... and then the connection is closed (payload cannot be skipped)")
except (EOFError, ConnectionResetError):
    check(True, "oversized option length -> connection closed")
except socket.timeout:
    check(False, "oversized option length -> server neither replied nor closed in 15 s")
check(healthy(), "server healthy after oversized option")

# 4. 5000-byte export name: an error reply; the connection stays usable
s = connect(); greet(s)
r = go(s, "x" * 5000)
check(r[0] == "error", f"5000-byte export name -> error reply {r}")
r = go(s, "rw")
check(r[0] == 64 << 20, f"valid GO after the long name works (size {r[0]})")
s.close()

# 5. unknown option, then a valid GO on the same connection, then a read
s = connect(); greet(s)
send_opt(s, 0x4242, b"junk-data")
opt, typ, _ = read_reply(s)
check(opt == 0x4242 and typ == 0x80000001, f"unknown option -> NBD_REP_ERR_UNSUP ({typ:#x})")
size, flags = go(s, "rw")
check(size == 64 << 20, "GO after the unknown option")
request(s, CMD_READ, 0, 65536, cookie=7)
err, cookie = simple_reply(s); data = recvn(s, 65536)
check(err == 0 and cookie == 7 and data == open(RW_FILE, "rb").read(65536), "read after GO matches the file")

# 6. requests past the end and over-long lengths, on that same connection
size = 64 << 20
for off, ln, what in ((size - 4096, 8192, "read crossing the end"),
                      (size, 4096, "read at the end"),
                      (1 << 62, 4096, "read at 2^62"),
                      ((1 << 64) - 4096, 8192, "read whose offset+length wraps")):
    request(s, CMD_READ, off, ln, cookie=8)
    err, cookie = simple_reply(s)
    check(err in (errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW) and cookie == 8,
          f"{what} -> error {err}")
# write past the end: the payload follows the header and must be consumed
request(s, CMD_WRITE, size - 512, 4096, b"\xee" * 4096, cookie=9)
err, cookie = simple_reply(s)
check(err in (errno.EINVAL, errno.ENOSPC) and cookie == 9, f"write past the end -> error {err}")
request(s, CMD_READ, 4096, 4096, cookie=10)
err, cookie = simple_reply(s); data = recvn(s, 4096)
check(err == 0 and cookie == 10, "connection in sync after the rejected write")
# read of 4 GiB - 1: an error or a disconnect, never 4 GiB of data
request(s, CMD_READ, 0, 0xFFFFFFFF, cookie=11)
try:
    err, cookie = simple_reply(s)
    check(err != 0, f"read of 4 GiB - 1 -> error {err}")
except (EOFError, ConnectionResetError):
    check(True, "read of 4 GiB - 1 -> disconnected")
s.close()
# write of 4 GiB - 1: the server cannot skip it; it must error/disconnect
s, _ = session()
request(s, CMD_WRITE, 0, 0xFFFFFFFF, b"\xdd" * 65536, cookie=12)
try:
    err, cookie = simple_reply(s)
    check(err != 0, f"write of 4 GiB - 1 -> error {err}")
    check(closed(s), "... and the connection is closed")
except (EOFError, ConnectionResetError):
    check(True, "write of 4 GiB - 1 -> disconnected")
except socket.timeout:
    check(False, "write of 4 GiB - 1 -> no answer in 15 s")
check(healthy(), "server healthy after over-long requests")

# 7. write to the read-only export: EPERM, payload consumed, connection in sync
s, _ = session("ro")
request(s, CMD_WRITE, 0, 8192, b"\x77" * 8192, cookie=13)
err, cookie = simple_reply(s)
check(err == errno.EPERM and cookie == 13, f"write to read-only export -> EPERM ({err})")
request(s, CMD_READ, 0, 512, cookie=14)
err, cookie = simple_reply(s); recvn(s, 512)
check(err == 0 and cookie == 14, "read-only connection in sync after EPERM")
s.close()

# 8. a client that vanishes in the middle of a write payload
s, _ = session()
request(s, CMD_WRITE, 32 << 20, 1 << 20, b"\x99" * (100 << 10), cookie=15)
time.sleep(0.2)
s.close()
# and one that vanishes after a header only, and one mid-header
s, _ = session(); request(s, CMD_WRITE, 40 << 20, 65536); s.close()
s, _ = session(); s.sendall(struct.pack(">IHH", REQ_MAGIC, 0, CMD_WRITE)); s.close()
time.sleep(0.5)
check(healthy(), "server healthy after vanishing writers")

if failures:
    print(f"{len(failures)} check(s) failed", file=sys.stderr)
    sys.exit(1)
PY

"$ST_PY" "$ST_DIR/bad.py" "$sock" "$rw" || tb_fail "malformed-input checks failed"
st_alive target || tb_fail "server died"

# 9. a slow client dripping a handshake one byte a second while nbdcopy runs.
cat >"$ST_DIR/slow.py" <<'PY'
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
hdr = b""
while len(hdr) < 18:
    hdr += s.recv(18 - len(hdr))
name = b"rw"
msg = struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, 4 + len(name) + 2) + \
      struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
deadline = int(sys.argv[2])
sent = 0
for i in range(min(deadline, len(msg))):
    s.send(msg[i:i + 1]); sent += 1
    time.sleep(1)
open(sys.argv[3], "w").write(f"sent {sent}\n")
# still connected: the server did not drop a slow but valid client
s.setblocking(False)
try:
    alive = s.recv(1) != b""
except BlockingIOError:
    alive = True
print("slow client still connected" if alive else "slow client was disconnected")
sys.exit(0 if alive else 1)
PY
"$ST_PY" "$ST_DIR/slow.py" "$sock" 20 "$ST_DIR/slow.done" >"$ST_DIR/slow.out" 2>&1 &
slow_pid=$!
sleep 1
nbdcopy -C 4 "$(st_uri_unix "$sock" rw)" "$ST_DIR/copy1.img"
st_assert_eq "nbdcopy export->file while a slow client drips" "$rw_md5" "$(st_md5_file "$ST_DIR/copy1.img")"
nbdcopy -C 4 "$ST_DIR/copy1.img" "$(st_uri_unix "$sock" rw)"
st_assert_eq "nbdcopy file->export while a slow client drips" "$rw_md5" "$(st_md5_uri "$(st_uri_unix "$sock" rw)")"
[[ ! -e $ST_DIR/slow.done ]] || tb_fail "the slow client finished before the copies; the overlap was not tested"
rc=0; wait "$slow_pid" || rc=$?
cat "$ST_DIR/slow.out"
st_assert_eq "slow client exit status" 0 "$rc"

st_alive target || tb_fail "server died"
# Data intact: the rw export and both backing files hold exactly the original.
st_assert_eq "rw export md5" "$rw_md5" "$(st_md5_uri "$(st_uri_unix "$sock" rw)")"
st_assert_eq "rw backing file md5" "$rw_md5" "$(st_md5_file "$rw")"
st_assert_eq "ro backing file md5" "$ro_md5" "$(st_md5_file "$ro")"
st_pass

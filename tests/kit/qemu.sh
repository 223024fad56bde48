# shellcheck shell=bash
# qemu.sh: QEMU guests for the Kagemusha test bed. Source it after testbed.sh:
#
#   source "$KAGEMUSHA_SOURCE/tests/kit/testbed.sh"
#   source "$KAGEMUSHA_SOURCE/tests/kit/qemu.sh"
#   kq_guest_image                 # build or reuse the cached kernel + initramfs
#   tb_init; tb_host hv
#   kq_start vm1 --ns hv --tap tap0 --append "kgm.ip6=2001:db8:1::100/64"
#   kq_wait_boot vm1
#   kq_guest vm1 'memtool fill 64 1'
#
# Every guest runs qemu-system-x86_64 (TCG: -machine pc, -nodefaults,
# -display none) on the image of tests/kit/guest/build-guest.sh, spawned
# with tb_spawn (so tb_teardown kills it), with its files in
# $TB_DIR/qemu/NAME/: qmp.sock (QMP), cmd.sock (the guest's command channel
# on its ttyS1), console.log (its ttyS0: kernel log and boot marker) and
# config. Full reference: docs/testbed.md, section "Guests and QEMU".
#
# API:
#   kq_guest_image                      build/reuse the image; sets KQ_KERNEL KQ_INITRD KQ_MANIFEST
#   kq_start NAME [--ns NODE] [--mem MB] [--smp N] [--tap IF | --bridge BR] [--mac MAC]
#            [--append ARGS] [--disk-nbd URI] [--incoming URI] [--postcopy]
#            [--like OTHER] [--qemu-arg ARG]...
#   kq_qmp NAME CMD [ARGS_JSON]         one QMP command; prints its "return" as JSON
#   kq_wait_boot NAME [TIMEOUT_S]       until the boot marker and a working command channel
#   kq_guest [--timeout S] NAME CMD...  run CMD in the guest; its output; returns its exit code
#   kq_guest_at [--timeout S] SOCK CMD... the same on any command-channel socket (libvirt guests)
#   kq_migrate SRC URI [--postcopy | --postcopy-manual] [--dst NAME] [--max-bandwidth MBYTE_S]
#              [--max-postcopy-bandwidth MBYTE_S]
#   kq_postcopy SRC                     migrate-start-postcopy (after --postcopy-manual)
#   kq_wait_migration SRC [--timeout S] [--dst NAME]   prints "status=... key=value..."; 0 iff completed
#   kq_status NAME                      running | paused | inmigrate | postmigrate | ... | dead
#   kq_console NAME                     path of the console log
#   kq_stop NAME                        quit QEMU (QMP quit, then kill), remove its tap
#   libvirt (hosts from tb_libvirtd):
#   kq_libvirt_xml NAME [--mem MB] [--append ARGS] [--bridge BR] [--mac MAC] [--disk-nbd URI]
#   kq_libvirt_wait_boot HOST NAME [T]  kq_libvirt_sock HOST NAME  kq_libvirt_console HOST NAME

[[ -n "${_KQ_SOURCED:-}" ]] && return 0
_KQ_SOURCED=1
[[ -n "${_TB_SOURCED:-}" ]] || { echo "qemu.sh: source tests/kit/testbed.sh first" >&2; return 1; }

KQ_QEMU=${KAGEMUSHA_QEMU:-qemu-system-x86_64}
KQ_KERNEL=${KQ_KERNEL:-}
KQ_INITRD=${KQ_INITRD:-}
KQ_MANIFEST=${KQ_MANIFEST:-}
# Debian's python3 (the pyenv one on PATH may lack Debian's modules; the
# helper only needs the standard library, but stay on the known one).
if [[ -x /usr/bin/python3 ]]; then _KQ_PY=/usr/bin/python3; else _KQ_PY=python3; fi
_KQ_KIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---------------------------------------------------------------- helper
# One small client for QMP and for the guest command channel. Modes:
#   qmp SOCK TIMEOUT CMD [ARGS_JSON]      prints the return value (JSON)
#   guest SOCK TIMEOUT COMMAND            prints the output, exits with the guest's code
#   wait-migration SOCK TIMEOUT           polls query-migrate; prints a summary line
read -r -d '' _KQ_HELPER <<'PYEOF' || true
import base64, json, os, socket, sys, time

def die(msg, code=1):
    sys.stderr.write("kq: " + msg + "\n")
    sys.exit(code)

class Qmp:
    def __init__(self, path, timeout):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""
        greeting = self.read()
        if "QMP" not in greeting:
            die("no QMP greeting on " + path)
        self.call("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                die("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, cmd, args=None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError("%s: %s" % (r["error"].get("class"), r["error"].get("desc")))
            # events are skipped

def qmp_once(path, timeout, cmd, args):
    try:
        q = Qmp(path, timeout)
        return q.call(cmd, args)
    except RuntimeError as e:
        die("QMP %s failed: %s" % (cmd, e))
    except (OSError, socket.timeout) as e:
        die("QMP %s on %s: %s" % (cmd, path, e), 2)

mode = sys.argv[1]
if mode == "qmp":
    path, timeout, cmd = sys.argv[2], float(sys.argv[3]), sys.argv[4]
    args = json.loads(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] else None
    print(json.dumps(qmp_once(path, timeout, cmd, args)))
elif mode == "guest":
    path, timeout, command = sys.argv[2], float(sys.argv[3]), sys.argv[4]
    nonce = os.urandom(8).hex()
    started_at = time.monotonic()
    deadline = started_at + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        # The guest kills the command at the limit (exit 137); the host waits
        # a little longer, for a slow TCG guest to say so.
        limit = max(1, int(timeout))
        deadline += 15
        s.sendall(("KGM-CMD %s %d %s\n" % (nonce, limit, base64.b64encode(command.encode()).decode())).encode())
    except OSError as e:
        die("command channel %s: %s" % (path, e), 125)
    begin, end = ("KGM-BEGIN %s\n" % nonce).encode(), ("KGM-END %s " % nonce).encode()
    buf, started, out = b"", False, sys.stdout.buffer
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            die("guest command timed out after %gs: %s" % (timeout, command), 124)
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            die("command channel closed", 125)
        buf += chunk
        if not started:
            i = buf.find(begin)
            if i < 0:
                buf = buf[-len(begin):]  # anything before our BEGIN is not ours
                continue
            buf, started = buf[i + len(begin):], True
        i = buf.find(end)
        if i >= 0 and b"\n" in buf[i + len(end):]:
            out.write(buf[:i])
            out.flush()
            rc = int(buf[i + len(end):].split(b"\n", 1)[0])
            if rc == 137 and time.monotonic() - started_at >= limit:
                die("guest command killed at its %ds limit: %s" % (limit, command), 124)
            sys.exit(rc)
        # keep a tail that may hold the start of the END marker
        keep = len(end) + 8
        if len(buf) > keep:
            out.write(buf[:-keep])
            buf = buf[-keep:]
elif mode == "wait-migration":
    path, timeout = sys.argv[2], float(sys.argv[3])
    deadline = time.monotonic() + timeout
    states, info = [], {}
    while True:
        info = qmp_once(path, 10, "query-migrate", None)
        st = info.get("status", "none")
        if not states or states[-1] != st:
            states.append(st)
        if st in ("completed", "failed", "cancelled"):
            # QEMU sets "completed" a moment before it fills in the totals.
            for _ in range(40):
                if st != "completed" or info.get("total-time", 0) > 0:
                    break
                time.sleep(0.05)
                info = qmp_once(path, 10, "query-migrate", None)
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    ram = info.get("ram", {})
    fields = [("status", info.get("status", "none")), ("states", ",".join(states)),
              ("total_ms", info.get("total-time", -1)), ("downtime_ms", info.get("downtime", -1)),
              ("setup_ms", info.get("setup-time", -1)), ("transferred", ram.get("transferred", -1)),
              ("ram_total", ram.get("total", -1)), ("dirty_syncs", ram.get("dirty-sync-count", -1)),
              ("precopy_bytes", ram.get("precopy-bytes", -1)), ("downtime_bytes", ram.get("downtime-bytes", -1)),
              ("postcopy_bytes", ram.get("postcopy-bytes", -1)),
              ("postcopy_requests", ram.get("postcopy-requests", -1)), ("mbps", round(ram.get("mbps", -1), 1))]
    if "error-desc" in info:
        fields.append(("error", json.dumps(info["error-desc"]).replace(" ", "_")))
    print(" ".join("%s=%s" % kv for kv in fields))
    sys.exit(0 if info.get("status") == "completed" else 1)
else:
    die("unknown mode " + mode)
PYEOF

_kq_helper() { "$_KQ_PY" -c "$_KQ_HELPER" "$@"; }

# ---------------------------------------------------------------- image

# Builds or reuses the guest image (tests/kit/guest/build-guest.sh) and sets
# KQ_KERNEL, KQ_INITRD and KQ_MANIFEST. Skips the test (exit 77) when a
# prerequisite is missing (e.g. the kernel cannot be downloaded).
kq_guest_image() {
  local out rc=0
  if [[ -n "$KQ_KERNEL" && -n "$KQ_INITRD" ]]; then return 0; fi
  out=$(bash "$_KQ_KIT_DIR/guest/build-guest.sh" 2>"${TB_DIR:-/tmp}/.kq-build-guest.log") || rc=$?
  if ((rc != 0)); then
    cat "${TB_DIR:-/tmp}/.kq-build-guest.log" >&2
    ((rc == 3)) && tb_skip "cannot build the guest image (see the MISSING line above)"
    tb_fail "build-guest.sh failed (exit $rc)"
  fi
  rm -f "${TB_DIR:-/tmp}/.kq-build-guest.log"
  # The PVH ELF boots about 4x faster under TCG; KAGEMUSHA_GUEST_BZIMAGE=1
  # boots the bzImage instead.
  if [[ -f "$out/vmlinux" && "${KAGEMUSHA_GUEST_BZIMAGE:-0}" != 1 ]]; then
    KQ_KERNEL="$out/vmlinux"
  else
    KQ_KERNEL="$out/vmlinuz"
  fi
  KQ_INITRD="$out/initrd.img"
  KQ_MANIFEST="$out/manifest"
  export KQ_KERNEL KQ_INITRD KQ_MANIFEST
  tb_log "guest image: $(sed -n 's/^kernel_package=//p' "$KQ_MANIFEST") $(sed -n 's/^kernel_version=//p' "$KQ_MANIFEST"), kernel ${KQ_KERNEL##*/}, initrd $(sed -n 's/^initrd_bytes=//p' "$KQ_MANIFEST") bytes"
}

# ---------------------------------------------------------------- lifecycle

kq_dir() {
  [[ -n "${TB_DIR:-}" ]] || tb_fail "kq: call tb_init first"
  [[ -d "$TB_DIR/qemu/$1" ]] || tb_fail "kq: no guest '$1'"
  printf '%s\n' "$TB_DIR/qemu/$1"
}

kq_console() { printf '%s/console.log\n' "$(kq_dir "$1")"; }

_kq_cfg() {  # NAME KEY -> value from NAME's config (empty if unset)
  local f
  f="$(kq_dir "$1")/config"
  sed -n "s/^$2=//p" "$f" | tail -n 1
}

_kq_default_mac() {  # NAME
  local h
  h=$(printf '%s' "$1" | md5sum)
  printf '52:54:00:%s:%s:%s\n' "${h:0:2}" "${h:2:2}" "${h:4:2}"
}

# kq_start NAME [options]: starts a guest and returns once QMP answers (for
# --incoming: once it listens for the migration stream). Options:
#   --ns NODE          kit node (or a plain netns name) to run QEMU in;
#                      needed for any network device. Default: root namespace.
#   --mem MB           guest RAM (default 256)        --smp N  vCPUs (default 1)
#   --tap IF           a tap IF in that namespace (created if missing)
#   --bridge BR        a new tap, enslaved to bridge BR of that namespace
#   --mac MAC          guest MAC (default derived from NAME, or --like's)
#   --append ARGS      extra kernel arguments (kgm.ip6= kgm.gw6= kgm.ip4= kgm.gw4= ...)
#   --disk-nbd URI     virtio-blk disk on NBD (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=P)
#   --incoming URI     migration destination: -incoming defer, then migrate-incoming URI
#   --postcopy         with --incoming: enable postcopy-ram first
#   --like OTHER       same --mem/--smp/--mac/--append/--disk-nbd as guest OTHER
#                      (a migration destination must match its source)
#   --qemu-arg ARG     extra QEMU argument (repeatable)
kq_start() {
  _tb_need_init
  local name=$1
  shift
  [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$ ]] || tb_fail "kq_start: bad guest name '$name'"
  local ns="" mem="" smp="" tap="" bridge="" mac="" append="" append_set=0 disk="" incoming="" postcopy=0 like=""
  local -a extra=()
  while (($#)); do
    case "$1" in
      --ns) ns=$2; shift 2 ;;
      --mem) mem=$2; shift 2 ;;
      --smp) smp=$2; shift 2 ;;
      --tap) tap=$2; shift 2 ;;
      --bridge) bridge=$2; shift 2 ;;
      --mac) mac=$2; shift 2 ;;
      --append) append=$2; append_set=1; shift 2 ;;
      --disk-nbd) disk=$2; shift 2 ;;
      --incoming) incoming=$2; shift 2 ;;
      --postcopy) postcopy=1; shift ;;
      --like) like=$2; shift 2 ;;
      --qemu-arg) extra+=("$2"); shift 2 ;;
      *) tb_fail "kq_start: unknown option '$1'" ;;
    esac
  done
  if [[ -n "$like" ]]; then
    [[ -n "$mem" ]] || mem=$(_kq_cfg "$like" mem)
    [[ -n "$smp" ]] || smp=$(_kq_cfg "$like" smp)
    [[ -n "$mac" ]] || mac=$(_kq_cfg "$like" mac)
    ((append_set)) || append=$(_kq_cfg "$like" append)
    [[ -n "$disk" ]] || disk=$(_kq_cfg "$like" disk)
  fi
  mem=${mem:-256}
  smp=${smp:-1}
  [[ -n "$mac" ]] || mac=$(_kq_default_mac "$name")
  [[ -z "$tap" || -z "$bridge" ]] || tb_fail "kq_start: --tap or --bridge, not both"
  ((postcopy == 0)) || [[ -n "$incoming" ]] || tb_fail "kq_start: --postcopy needs --incoming (the source's is set by kq_migrate)"
  kq_guest_image
  tb_require_cmd "$KQ_QEMU"

  local dir="$TB_DIR/qemu/$name"
  [[ ! -e "$dir" ]] || tb_fail "kq_start: guest '$name' exists already"
  mkdir -p "$dir"

  # Where QEMU runs: a kit node, a plain netns, or the root namespace.
  local -a where=(-)
  local netns=""
  if [[ -n "$ns" ]]; then
    if [[ -n "${_TB_NS[$ns]:-}" ]]; then
      where=("$ns")
      netns=${_TB_NS[$ns]}
    elif ip netns list | awk '{print $1}' | grep -qx "$ns"; then
      where=(- ip netns exec "$ns")
      netns=$ns
    else
      tb_fail "kq_start: '$ns' is neither a kit node nor a network namespace"
    fi
  fi

  local -a net=()
  if [[ -n "$tap" || -n "$bridge" ]]; then
    [[ -n "$netns" ]] || tb_fail "kq_start: a network device needs --ns (no test traffic in the root namespace)"
    local created=0
    if [[ -z "$tap" ]]; then
      tap="kq-$name"
      if ((${#tap} > 15)); then tap="kq-${name:0:7}-$(printf '%s' "$name" | md5sum | cut -c1-4)"; fi
    fi
    ((${#tap} <= 15)) || tb_fail "kq_start: tap name '$tap' is longer than 15 characters"
    if ! ip -n "$netns" link show "$tap" >/dev/null 2>&1; then
      ip -n "$netns" tuntap add dev "$tap" mode tap || tb_fail "kq_start: creating tap $tap in $netns"
      created=1
    fi
    # The guest's addresses are not the host's: no DAD, no RS on the tap.
    ip netns exec "$netns" sh -c "echo 0 > /proc/sys/net/ipv6/conf/$tap/accept_dad" 2>/dev/null || true
    if [[ -n "$bridge" ]]; then
      ip -n "$netns" link set "$tap" master "$bridge" || tb_fail "kq_start: enslaving $tap to bridge $bridge in $netns"
    fi
    ip -n "$netns" link set "$tap" up
    if ((created)) && [[ -z "${_TB_NS[$ns]:-}" ]]; then
      tb_on_cleanup ip -n "$netns" link del "$tap"
    fi
    echo "tap_created=$created" >>"$dir/config"
    net=(-netdev "tap,id=net0,ifname=$tap,script=no,downscript=no"
      -device "virtio-net-pci,netdev=net0,mac=$mac")
  fi

  local -a blk=()
  if [[ -n "$disk" ]]; then
    blk=(-drive "file=$disk,format=raw,if=none,id=disk0,cache=writeback"
      -device "virtio-blk-pci,drive=disk0")
  fi

  local -a inc=()
  [[ -z "$incoming" ]] || inc=(-incoming defer)

  {
    echo "name=$name"
    echo "netns=$netns"
    echo "mem=$mem"
    echo "smp=$smp"
    echo "mac=$mac"
    echo "tap=$tap"
    echo "bridge=$bridge"
    echo "append=$append"
    echo "disk=$disk"
    echo "incoming=$incoming"
  } >>"$dir/config"

  # shellcheck disable=SC2054  # commas inside QEMU option values
  local -a qemu_argv=("$KQ_QEMU" -name "$name" -machine pc,accel=tcg -nodefaults -no-user-config -display none
    -m "$mem" -smp "$smp"
    -kernel "$KQ_KERNEL" -initrd "$KQ_INITRD"
    -append "console=ttyS0 panic=-1 $append"
    -chardev "file,id=console0,path=$dir/console.log" -serial chardev:console0
    -chardev "socket,id=cmd0,path=$dir/cmd.sock,server=on,wait=off" -serial chardev:cmd0
    -chardev "socket,id=qmp0,path=$dir/qmp.sock,server=on,wait=off" -mon chardev=qmp0,mode=control
    "${net[@]}" "${blk[@]}" "${inc[@]}" "${extra[@]}")
  printf '%q ' "${qemu_argv[@]}" >"$dir/cmdline"
  date +%s.%N >"$dir/started"
  tb_spawn --name "qemu-$name" "${where[@]}" "${qemu_argv[@]}"
  echo "$TB_SPAWN_PID" >"$dir/pid"
  echo "log=$TB_SPAWN_LOG" >>"$dir/config"
  tb_wait_unix "$dir/qmp.sock" 30 || tb_fail "kq_start: QEMU for '$name' did not open QMP (see $TB_SPAWN_LOG)"
  if [[ -n "$incoming" ]]; then
    ((postcopy == 0)) || kq_qmp "$name" migrate-set-capabilities \
      '{"capabilities":[{"capability":"postcopy-ram","state":true}]}' >/dev/null
    kq_qmp "$name" migrate-incoming "$(printf '{"uri":"%s"}' "$incoming")" >/dev/null
    tb_log "guest $name: waiting for migration on $incoming${netns:+ in $netns}$( ((postcopy)) && echo ' (postcopy-ram)')"
  else
    tb_log "guest $name: started (${mem} MiB${netns:+, $netns}${tap:+, tap $tap}${bridge:+ on $bridge}, mac $mac)"
  fi
}

_kq_alive() {  # NAME
  local pid
  pid=$(cat "$(kq_dir "$1")/pid" 2>/dev/null) || return 1
  tb_pid_alive "$pid"
}

# kq_qmp NAME CMD [ARGS_JSON]: one QMP command, its return value on stdout.
# A full {"execute":...,"arguments":...} object is accepted as CMD too.
kq_qmp() {
  local name=$1 cmd=$2 args=${3:-} dir
  dir=$(kq_dir "$name")
  if [[ "$cmd" == "{"* ]]; then
    args=$("$_KQ_PY" -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1]).get("arguments",{})))' "$cmd")
    cmd=$("$_KQ_PY" -c 'import json,sys; print(json.loads(sys.argv[1])["execute"])' "$cmd")
  fi
  _kq_helper qmp "$dir/qmp.sock" 30 "$cmd" "$args"
}

kq_status() {  # NAME
  local out
  if ! _kq_alive "$1"; then echo dead; return 0; fi
  out=$(kq_qmp "$1" query-status 2>/dev/null) || { echo unreachable; return 0; }
  "$_KQ_PY" -c 'import json,sys; print(json.loads(sys.argv[1])["status"])' "$out"
}

# kq_wait_boot NAME [TIMEOUT_S=240]: waits for the guest's KGM-BOOTED marker
# on its console and for an answer on the command channel. Prints
# "boot_s=S guest_uptime_s=U" (wall time since kq_start; the guest's own
# uptime at the marker). TCG on a busy machine is slow: the default is generous.
kq_wait_boot() {
  local name=$1 timeout=${2:-240} dir deadline
  dir=$(kq_dir "$name")
  deadline=$((SECONDS + timeout))
  while ! grep -q 'KGM-BOOTED ' "$dir/console.log" 2>/dev/null; do
    _kq_alive "$name" || tb_fail "guest $name: QEMU died during boot (see $(_kq_cfg "$name" log))"
    ((SECONDS < deadline)) || { tail -n 20 "$dir/console.log" >&2; tb_fail "guest $name: no boot marker after ${timeout}s"; }
    sleep 0.2
  done
  local boot_s uptime
  boot_s=$(awk -v a="$(cat "$dir/started")" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}')
  uptime=$(sed -n 's/.*KGM-BOOTED .*uptime=\([0-9.]*\).*/\1/p' "$dir/console.log" | head -n 1)
  local left=$((deadline - SECONDS))
  ((left > 10)) || left=10
  kq_guest --timeout "$left" "$name" true || tb_fail "guest $name: booted, but the command channel does not answer"
  grep '^kgm-init:' "$dir/console.log" | sed "s/^/[$name] /" >&2 || true
  tb_log "guest $name: booted in ${boot_s}s (guest uptime ${uptime}s at the marker)"
  echo "boot_s=$boot_s guest_uptime_s=$uptime"
}

# kq_guest [--timeout S] NAME CMD...: runs CMD (joined with spaces, run by
# the guest's sh) and returns its exit code; 124 on timeout, 125 when the
# channel is unusable. Output is stdout and stderr of CMD, merged.
kq_guest() {
  local timeout=${KQ_GUEST_TIMEOUT:-120}
  if [[ "$1" == --timeout ]]; then timeout=$2; shift 2; fi
  local name=$1 dir
  shift
  dir=$(kq_dir "$name")
  _kq_helper guest "$dir/cmd.sock" "$timeout" "$*"
}

# kq_guest_at [--timeout S] SOCK CMD...: kq_guest on a command-channel socket
# that kq_start did not create, e.g. a libvirt domain's
# <serial type='unix'><source mode='bind' path='SOCK'/><target port='1'/></serial>.
kq_guest_at() {
  local timeout=${KQ_GUEST_TIMEOUT:-120}
  if [[ "$1" == --timeout ]]; then timeout=$2; shift 2; fi
  local sock=$1
  shift
  _kq_helper guest "$sock" "$timeout" "$*"
}

# ---------------------------------------------------------------- libvirt

# kq_libvirt_xml NAME [--mem MB] [--append ARGS] [--bridge BR] [--mac MAC]
#                [--disk-nbd nbd://HOST:PORT/EXPORT]
# Prints a libvirt domain for the test guest, for hosts started with
# tb_libvirtd: direct kernel boot of the kit's image, ttyS0 to the file
# /var/log/libvirt/qemu/NAME.console.log and the command channel (ttyS1) on
# the Unix socket /var/lib/libvirt/qemu/NAME.cmd.sock. Both paths are inside
# the host's private libvirt directories, so each host of a migration has its
# own; kq_libvirt_sock and kq_libvirt_console give their paths as seen from
# the test. --bridge needs a bridge of that name on every host the domain
# visits.
kq_libvirt_xml() {
  local name=$1 mem=256 append="" bridge="" mac="" disk=""
  shift
  while (($#)); do
    case "$1" in
      --mem) mem=$2; shift 2 ;;
      --append) append=$2; shift 2 ;;
      --bridge) bridge=$2; shift 2 ;;
      --mac) mac=$2; shift 2 ;;
      --disk-nbd) disk=$2; shift 2 ;;
      *) tb_fail "kq_libvirt_xml: unknown option '$1'" ;;
    esac
  done
  kq_guest_image
  [[ -n "$mac" ]] || mac=$(_kq_default_mac "$name")
  local iface="" diskxml=""
  if [[ -n "$bridge" ]]; then
    iface="<interface type='bridge'><source bridge='$bridge'/><mac address='$mac'/><model type='virtio'/></interface>"
  fi
  if [[ -n "$disk" ]]; then
    [[ "$disk" =~ ^nbd://(\[([0-9a-fA-F:]+)\]|([^:/]+)):([0-9]+)/(.*)$ ]] ||
      tb_fail "kq_libvirt_xml: --disk-nbd wants nbd://HOST:PORT/EXPORT, got '$disk'"
    local host=${BASH_REMATCH[2]:-${BASH_REMATCH[3]}} port=${BASH_REMATCH[4]} exp_name=${BASH_REMATCH[5]}
    diskxml="<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='$exp_name'><host name='$host' port='$port'/></source><target dev='vda' bus='virtio'/></disk>"
  fi
  cat <<XML
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>$mem</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$KQ_KERNEL</kernel>
    <initrd>$KQ_INITRD</initrd>
    <cmdline>console=ttyS0 panic=-1 $append</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$(command -v "$KQ_QEMU")</emulator>
    <serial type='file'><source path='/var/log/libvirt/qemu/$name.console.log'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/$name.cmd.sock'/><target port='1'/></serial>
    $iface
    $diskxml
    <memballoon model='none'/>
  </devices>
</domain>
XML
}

kq_libvirt_sock() { printf '%s/libvirt/%s/lib/qemu/%s.cmd.sock\n' "$TB_DIR" "$1" "$2"; }  # HOST NAME
kq_libvirt_console() { printf '%s/libvirt/%s/log/qemu/%s.console.log\n' "$TB_DIR" "$1" "$2"; }  # HOST NAME

# kq_libvirt_wait_boot HOST NAME [TIMEOUT_S=240]: as kq_wait_boot, for a
# domain of kq_libvirt_xml running on HOST. Prints "boot_s=" (since the call).
kq_libvirt_wait_boot() {
  local host=$1 name=$2 timeout=${3:-240} con t0=$SECONDS
  con=$(kq_libvirt_console "$host" "$name")
  tb_wait_for "$timeout" grep -q 'KGM-BOOTED ' "$con" || tb_fail "domain $name on $host: no boot marker (see $con)"
  kq_guest_at --timeout 60 "$(kq_libvirt_sock "$host" "$name")" true ||
    tb_fail "domain $name on $host: booted, but the command channel does not answer"
  tb_log "domain $name on $host: booted in $((SECONDS - t0))s"
  echo "boot_s=$((SECONDS - t0))"
}

# ---------------------------------------------------------------- migration

# kq_migrate SRC URI [--postcopy | --postcopy-manual] [--dst NAME] [--max-bandwidth MBYTE_S]
#            [--max-postcopy-bandwidth MBYTE_S]
# Starts the migration of SRC to URI (the destination is a guest started with
# kq_start --incoming URI). --postcopy enables postcopy-ram (on SRC, and on
# --dst NAME too) and switches to postcopy at once; --postcopy-manual only
# enables it, kq_postcopy SRC switches. Returns when QEMU accepted the command.
kq_migrate() {
  local src=$1 uri=$2
  shift 2
  local postcopy="" dst="" bw="" pbw=""
  while (($#)); do
    case "$1" in
      --postcopy) postcopy=auto; shift ;;
      --postcopy-manual) postcopy=manual; shift ;;
      --dst) dst=$2; shift 2 ;;
      --max-bandwidth) bw=$2; shift 2 ;;
      --max-postcopy-bandwidth) pbw=$2; shift 2 ;;
      *) tb_fail "kq_migrate: unknown option '$1'" ;;
    esac
  done
  local caps='{"capabilities":[{"capability":"postcopy-ram","state":true}]}'
  if [[ -n "$postcopy" ]]; then
    kq_qmp "$src" migrate-set-capabilities "$caps" >/dev/null || tb_fail "kq_migrate: enabling postcopy-ram on $src"
    [[ -z "$dst" ]] || kq_qmp "$dst" migrate-set-capabilities "$caps" >/dev/null ||
      tb_fail "kq_migrate: enabling postcopy-ram on $dst"
  fi
  if [[ -n "$bw" ]]; then
    kq_qmp "$src" migrate-set-parameters "{\"max-bandwidth\":$((bw * 1024 * 1024))}" >/dev/null ||
      tb_fail "kq_migrate: max-bandwidth on $src"
  fi
  if [[ -n "$pbw" ]]; then
    kq_qmp "$src" migrate-set-parameters "{\"max-postcopy-bandwidth\":$((pbw * 1024 * 1024))}" >/dev/null ||
      tb_fail "kq_migrate: max-postcopy-bandwidth on $src"
  fi
  kq_qmp "$src" migrate "$(printf '{"uri":"%s"}' "$uri")" >/dev/null || tb_fail "kq_migrate: migrate $src -> $uri refused"
  date +%s.%N >"$(kq_dir "$src")/migration-started"
  tb_log "guest $src: migrating to $uri${postcopy:+ (postcopy $postcopy)}"
  [[ "$postcopy" != auto ]] || kq_postcopy "$src"
}

kq_postcopy() {  # SRC
  kq_qmp "$1" migrate-start-postcopy >/dev/null || tb_fail "kq_postcopy: migrate-start-postcopy on $1 refused"
}

# kq_wait_migration SRC [--timeout S] [--dst NAME]: waits until the migration
# of SRC ends and prints one line: status= states= (every status seen, e.g.
# active,postcopy-active,completed) total_ms= downtime_ms= setup_ms=
# transferred= ram_total= dirty_syncs= precopy_bytes= downtime_bytes=
# postcopy_bytes= postcopy_requests= mbps= [error=].
# With --dst it also waits until NAME runs. Returns 0 only if completed
# (and, with --dst, the destination runs).
kq_wait_migration() {
  local src=$1 timeout=300 dst=""
  shift
  while (($#)); do
    case "$1" in
      --timeout) timeout=$2; shift 2 ;;
      --dst) dst=$2; shift 2 ;;
      *) tb_fail "kq_wait_migration: unknown option '$1'" ;;
    esac
  done
  local line rc=0
  line=$(_kq_helper wait-migration "$(kq_dir "$src")/qmp.sock" "$timeout") || rc=$?
  echo "$line"
  ((rc == 0)) || return 1
  if [[ -n "$dst" ]]; then
    tb_wait_for 30 _kq_is_running "$dst" || { tb_log "guest $dst: not running after the migration ($(kq_status "$dst"))"; return 1; }
  fi
  return 0
}

_kq_is_running() { [[ "$(kq_status "$1")" == running ]]; }

# kq_stop NAME: asks QEMU to quit, kills it if it does not, removes the tap
# kq_start created. Idempotent.
kq_stop() {
  local name=$1 dir pid tap netns
  dir=$(kq_dir "$name")
  pid=$(cat "$dir/pid" 2>/dev/null || true)
  if [[ -n "$pid" ]] && tb_pid_alive "$pid"; then
    kq_qmp "$name" quit >/dev/null 2>&1 || true
    tb_wait_for 10 _kq_dead "$pid" || tb_stop "$pid" 3
    wait "$pid" 2>/dev/null || true
  fi
  tap=$(_kq_cfg "$name" tap)
  netns=$(_kq_cfg "$name" netns)
  if [[ -n "$tap" && "$(_kq_cfg "$name" tap_created)" == 1 ]]; then
    ip -n "$netns" link del "$tap" 2>/dev/null || true
  fi
  tb_log "guest $name: stopped"
}

_kq_dead() { ! tb_pid_alive "$1"; }

#!/usr/bin/env bash
# bench/storage.sh: storage benchmark, run by `./kagemusha bench storage`.
# Not a test: it prints figures and ratios against peers measured in the same
# run on the same files.
#
#   target   kagemusha-nbd serve --export   vs  nbdkit -t 16 file  vs  qemu-nbd
#            sequential read and write of BENCH_SIZE MiB with nbdcopy (Unix
#            socket), 4 KiB random read at QD16 with fio's nbd engine
#   proxy    cold read (every block from the remote) vs reading the remote
#            alone (to null:) and vs the remote copied to a new local file
#            (what the remote delivers when the data is also stored here),
#            warm read (all in the cache) vs our target serving the same file,
#            and the storage ingest bound (dd of BENCH_SIZE MiB to a new file
#            on the same file system); against peers in the middle: two
#            relays that store nothing (nbdkit's nbd plugin, socat) and a
#            caching proxy (nbdkit's cache filter, cache-on-read), all
#            measured in the same run
#   fill     background fill time on loopback (vs nbdcopy remote -> file) and
#            through kagemusha-wanem at BENCH_WAN_RTT ms / BENCH_WAN_RATE
#            Mbit/s (vs nbdcopy of the remote over the same WAN); over the
#            same WAN also the proxy's cold read vs nbdcopy of the remote to
#            null:
#
# Usage: bench/storage.sh [target] [proxy] [fill] [wan]  (no argument: all)
# Sections not named are skipped (fill and wan are the two halves of "fill").
#
# For the target section it also reports each server's CPU time (user +
# system, all threads, from /proc/PID/stat) per GiB moved, the median over
# the runs.
#
# Every figure is the median of BENCH_RUNS runs (at least 5 by default).
# Environment:
#   BENCH_RUNS=5 BENCH_SIZE=1024 (MiB) BENCH_FIO_SECONDS=3
#   BENCH_WAN=1 BENCH_WAN_SIZE=256 (MiB) BENCH_WAN_RTT=20 BENCH_WAN_RATE=200
#   BENCH_WAN_RUNS=$BENCH_RUNS
#   BENCH_BASELINE_NBD=PATH  another kagemusha-nbd binary (e.g. the previous
#     commit's) measured as a fourth target subject "baseline" and as a
#     second proxy in the same runs, for A/B comparisons of a change
# Quick run: BENCH_RUNS=1 BENCH_SIZE=128 BENCH_WAN_SIZE=32 ./kagemusha bench storage
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/../tests/storage/lib.sh"

RUNS=${BENCH_RUNS:-5}
SIZE=${BENCH_SIZE:-1024}
FIO_SECONDS=${BENCH_FIO_SECONDS:-3}
WAN=${BENCH_WAN:-1}
WAN_SIZE=${BENCH_WAN_SIZE:-256}
WAN_RTT=${BENCH_WAN_RTT:-20}
WAN_RATE=${BENCH_WAN_RATE:-200}
WAN_RUNS=${BENCH_WAN_RUNS:-$RUNS}

declare -A SECTION=()
if (($# == 0)); then set -- target proxy fill wan; fi
for a in "$@"; do
  case $a in
    target | proxy | fill | wan) SECTION[$a]=1 ;;
    all) SECTION=([target]=1 [proxy]=1 [fill]=1 [wan]=1) ;;
    *) echo "usage: $0 [target] [proxy] [fill] [wan] | all" >&2; exit 2 ;;
  esac
done
[[ $WAN == 1 ]] || unset 'SECTION[wan]'
want() { [[ -n ${SECTION[$1]:-} ]]; }

st_init nbdcopy nbdkit qemu-nbd fio socat
results=$ST_DIR/results.tsv   # metric \t subject \t value
: >"$results"

now() { echo "$EPOCHREALTIME"; }
# Free page reporting (a guest VM whose balloon hands freed pages back to
# its host; the host backs them again on next use, which makes storing new
# data cost more): the setting and how much was reported during the run.
PAGE_REPORTING=/sys/module/page_reporting/parameters
reported_kib() { cat "$PAGE_REPORTING/reported_kib" 2>/dev/null || echo -; }
REPORTED0=$(reported_kib)
elapsed() { "$ST_PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.6f}')" "$1" "$2"; }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$results"; }
# timed METRIC SUBJECT CMD... : runs CMD once, records its wall time.
timed() {
  local metric=$1 subject=$2; shift 2
  local t0 t1
  t0=$(now)
  "$@" >"$ST_DIR/timed.out" 2>&1 || { cat "$ST_DIR/timed.out" >&2; tb_fail "$metric/$subject: $* failed"; }
  t1=$(now)
  record "$metric" "$subject" "$(elapsed "$t0" "$t1")"
}
# cpu_ticks PID : user + system clock ticks of PID so far, all threads.
cpu_ticks() {
  local stat
  stat=$(<"/proc/$1/stat")
  stat=${stat##*) }  # fields after the command name, starting at field 3
  local -a f=($stat)
  echo $((f[11] + f[12]))
}
CLK_TCK=$(getconf CLK_TCK)
# timed_cpu METRIC SUBJECT PID MIB CMD... : timed, plus the CPU seconds PID
# spent per GiB during CMD, recorded as METRIC_cpu.
timed_cpu() {
  local metric=$1 subject=$2 pid=$3 mib=$4; shift 4
  local c0 c1
  c0=$(cpu_ticks "$pid")
  timed "$metric" "$subject" "$@"
  c1=$(cpu_ticks "$pid")
  record "${metric}_cpu" "$subject" "$("$ST_PY" -c "import sys; print((int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]) / (int(sys.argv[4]) / 1024))" "$c0" "$c1" "$CLK_TCK" "$mib")"
}
# machine_busy_ticks : clock ticks the whole machine has spent busy so far
# (user, nice, system, irq, softirq; not idle, iowait or steal).
machine_busy_ticks() {
  local -a f
  read -r -a f </proc/stat
  echo $((f[1] + f[2] + f[3] + f[6] + f[7]))
}
# timed_busy METRIC SUBJECT MIB PID|- CMD... : timed, plus the machine's busy
# CPU seconds per GiB during CMD (METRIC_busy) and, given a PID, that
# process's CPU seconds per GiB (METRIC_cpu). The machine figure counts
# everything the pass costs: both peers, the kernel's writeback threads.
timed_busy() {
  local metric=$1 subject=$2 mib=$3 pid=$4; shift 4
  local b0 b1 c0=0 c1=0
  [[ $pid != - ]] && c0=$(cpu_ticks "$pid")
  b0=$(machine_busy_ticks)
  timed "$metric" "$subject" "$@"
  b1=$(machine_busy_ticks)
  [[ $pid != - ]] && c1=$(cpu_ticks "$pid")
  local per_gib="import sys; print((int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]) / (int(sys.argv[4]) / 1024))"
  record "${metric}_busy" "$subject" "$("$ST_PY" -c "$per_gib" "$b0" "$b1" "$CLK_TCK" "$mib")"
  [[ $pid != - ]] && record "${metric}_cpu" "$subject" "$("$ST_PY" -c "$per_gib" "$c0" "$c1" "$CLK_TCK" "$mib")"
  return 0
}
progress() { printf '  %-44s run %d/%d\n' "$1" "$2" "$3" >&2; }

# --- files -------------------------------------------------------------------
st_log "making a ${SIZE} MiB random image (this takes a moment)"
data=$ST_DIR/data.img wimg=$ST_DIR/write.img
st_make_dense "$data" "$SIZE"
data_md5=$(st_md5_file "$data")
truncate -s "${SIZE}M" "$wimg"

# --- servers: all three serve the same files --------------------------------
ks=$ST_DIR/k.sock nks=$ST_DIR/nk.sock qs=$ST_DIR/q.sock
kw=$ST_DIR/kw.sock nkw=$ST_DIR/nkw.sock qw=$ST_DIR/qw.sock
st_nbd_serve k-target --unix "$ks" --export "d=$data,ro" --export "w=$wimg"
st_nbdkit nbdkit-r "$nks" "$data" -r
st_nbdkit nbdkit-w "$nkw" "$wimg"
st_spawn qnbd-r - qemu-nbd -f raw -r --shared=16 -t -k "$qs" "$data"
st_spawn qnbd-w - qemu-nbd -f raw --shared=16 -t -k "$qw" "$wimg"
st_wait_nbd "$(st_uri_unix "$qs")" 20 qnbd-r
st_wait_nbd "$(st_uri_unix "$qw")" 20 qnbd-w
declare -A RURI=([kagemusha]=$(st_uri_unix "$ks" d) [nbdkit]=$(st_uri_unix "$nks") [qemu-nbd]=$(st_uri_unix "$qs"))
declare -A WURI=([kagemusha]=$(st_uri_unix "$ks" w) [nbdkit]=$(st_uri_unix "$nkw") [qemu-nbd]=$(st_uri_unix "$qw"))
SUBJECTS=(kagemusha nbdkit qemu-nbd)
BASELINE=${BENCH_BASELINE_NBD:-}
[[ -z $BASELINE || -x $BASELINE ]] || tb_fail "BENCH_BASELINE_NBD=$BASELINE is not executable"
if [[ -n $BASELINE ]] && want target; then
  bks=$ST_DIR/b.sock bwimg=$ST_DIR/bwrite.img
  truncate -s "${SIZE}M" "$bwimg"
  saved_nbd=$ST_NBD
  ST_NBD=$BASELINE
  st_nbd_serve b-target --unix "$bks" --export "d=$data,ro" --export "w=$bwimg"
  ST_NBD=$saved_nbd
  RURI[baseline]=$(st_uri_unix "$bks" d)
  WURI[baseline]=$(st_uri_unix "$bks" w)
  SUBJECTS+=(baseline)
fi

for s in "${SUBJECTS[@]}"; do
  got=$(st_md5_uri "${RURI[$s]}")
  [[ $got == "$data_md5" ]] || tb_fail "$s serves wrong data ($got)"
done

declare -A RPID=([kagemusha]=${ST_PID[k-target]} [nbdkit]=${ST_PID[nbdkit-r]} [qemu-nbd]=${ST_PID[qnbd-r]})
declare -A WPID=([kagemusha]=${ST_PID[k-target]} [nbdkit]=${ST_PID[nbdkit-w]} [qemu-nbd]=${ST_PID[qnbd-w]})
if [[ -n $BASELINE ]] && want target; then
  RPID[baseline]=${ST_PID[b-target]}
  WPID[baseline]=${ST_PID[b-target]}
fi

# Interleave subjects inside each run so drift hits all of them alike.
want target && for ((r = 1; r <= RUNS; r++)); do
  progress "target: sequential read/write, random read" "$r" "$RUNS"
  for s in "${SUBJECTS[@]}"; do
    timed_cpu seq_read "$s" "${RPID[$s]}" "$SIZE" nbdcopy -C 4 "${RURI[$s]}" null:
    timed_cpu seq_write "$s" "${WPID[$s]}" "$SIZE" nbdcopy -C 4 "$data" "${WURI[$s]}"
    fio --name=rr --ioengine=nbd --uri="${RURI[$s]}" --rw=randread --bs=4k --iodepth=16 \
      --runtime="$FIO_SECONDS" --time_based --output-format=json --output="$ST_DIR/fio.json" \
      >"$ST_DIR/fio.out" 2>&1 || { cat "$ST_DIR/fio.out" >&2; tb_fail "fio against $s failed"; }
    record randread_4k_qd16 "$s" "$("$ST_PY" -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
assert j["error"] == 0, j["error"]
print(j["read"]["iops"])' "$ST_DIR/fio.json")"
  done
done
# The write path must have written the data, not only been fast.
if want target; then
  [[ $(st_md5_file "$wimg") == "$data_md5" ]] || tb_fail "write image differs after the write runs"
fi
st_stop nbdkit-w; st_stop qnbd-r; st_stop qnbd-w
if [[ -n ${ST_PID[b-target]:-} ]]; then
  [[ $(st_md5_file "$bwimg") == "$data_md5" ]] || tb_fail "baseline: write image differs"
  st_stop b-target
fi

# --- proxy: cold and warm read vs the remote alone and our target ---------------
# In each run, interleaved: the remote (nbdkit) alone to null: and to a new
# file, dd of as many bytes to a new file, our target on the same file, then
# the proxy cold (every block fetched from the remote) and warm (every block
# in the cache). Cold is judged against the remote alone and against the
# remote copied to local storage (the proxy stores every block it serves),
# and set against the ingest bound; warm against our target: the same server
# code over a plain file. New files are removed at once, so each run starts
# with the same free memory.
remote_uri=$(st_uri_unix "$nks")
# proxy_pass SUBJECT DIR : a new proxy (ST_NBD) with an empty cache in DIR,
# read cold then warm, checked, stopped, its files removed.
proxy_pass() {
  local subject=$1 pd=$2
  mkdir -p "$pd"
  st_nbd_serve proxy-rd --unix "$pd/p.sock" --control "$pd/c.sock" \
    --proxy "$(st_proxy_spec p "$remote_uri" "$pd/cache.img" "$pd/bitmap" no-fill)"
  local puri
  puri=$(st_uri_unix "$pd/p.sock" p)
  timed_busy proxy_cold_read "$subject" "$SIZE" "${ST_PID[proxy-rd]}" nbdcopy -C 4 "$puri" null:
  # Warm at once (the cold pass's last group commits may still be syncing
  # the cache: part of what the cold read costs), then warm again once
  # every bit is committed: the steady state of a warm cache.
  timed proxy_warm_read_now "$subject" nbdcopy -C 4 "$puri" null:
  if [[ $subject == baseline ]]; then
    sleep 2  # older binaries do not report blocks_committed: a commit interval is 0.5 s, plus the sync
  else
    st_wait_committed "$pd/c.sock" 30
  fi
  timed proxy_warm_read "$subject" nbdcopy -C 4 "$puri" null:
  [[ $(st_md5_uri "$puri") == "$data_md5" ]] || tb_fail "$subject proxy served wrong data"
  st_stop proxy-rd
  rm -rf "$pd"
}
# Peers in the middle, in the same runs: two relays that store nothing (an
# upper bound for any proxy on this machine: a process between the client and
# the remote costs CPU even when it keeps no copy) and a real caching proxy.
#   nbdkit nbd plugin      an NBD relay (parses and forwards every request)
#   socat                  a byte relay with 1 MiB buffers (no NBD at all)
#   nbdkit cache filter    cache-on-read=true over the nbd plugin: stores
#                          every block it serves in a temporary file, as we do
if want proxy; then
  st_spawn nbdkit-relay - nbdkit -f -U "$ST_DIR/relay.sock" nbd socket="$nks"
  st_wait_nbd "$(st_uri_unix "$ST_DIR/relay.sock")" 20 nbdkit-relay
  st_spawn socat-relay - socat -b 1048576 "UNIX-LISTEN:$ST_DIR/socat.sock,fork" "UNIX-CONNECT:$nks"
  st_wait_nbd "$(st_uri_unix "$ST_DIR/socat.sock")" 20 socat-relay
fi
# nbdkit_cache_pass DIR : a new nbdkit caching proxy with an empty cache
# (its temporary file in DIR), read cold then warm, checked, stopped.
nbdkit_cache_pass() {
  local pd=$1
  mkdir -p "$pd"
  st_spawn nbdkit-cache - env TMPDIR="$pd" nbdkit -f -U "$pd/c.sock" --filter=cache \
    nbd socket="$nks" cache-on-read=true
  local curi
  curi=$(st_uri_unix "$pd/c.sock")
  st_wait_nbd "$curi" 20 nbdkit-cache
  timed_busy proxy_cold_read nbdkit-cache "$SIZE" "${ST_PID[nbdkit-cache]}" nbdcopy -C 4 "$curi" null:
  timed proxy_warm_read nbdkit-cache nbdcopy -C 4 "$curi" null:
  [[ $(st_md5_uri "$curi") == "$data_md5" ]] || tb_fail "nbdkit cache filter served wrong data"
  st_stop nbdkit-cache
  rm -rf "$pd"
}
want proxy && for ((r = 1; r <= RUNS; r++)); do
  progress "proxy: cold / warm read" "$r" "$RUNS"
  d=$ST_DIR/p$r; mkdir -p "$d"
  timed_busy remote_read nbdkit "$SIZE" "${ST_PID[nbdkit-r]}" nbdcopy -C 4 "$remote_uri" null:
  timed_busy relay_read nbdkit-nbd "$SIZE" "${ST_PID[nbdkit-relay]}" nbdcopy -C 4 "$(st_uri_unix "$ST_DIR/relay.sock")" null:
  timed_busy relay_read socat "$SIZE" - nbdcopy -C 4 "$(st_uri_unix "$ST_DIR/socat.sock")" null:
  nbdkit_cache_pass "$d/nc"
  timed remote_to_file nbdkit nbdcopy -C 4 "$remote_uri" "$d/copy.img"
  [[ $(st_md5_file "$d/copy.img") == "$data_md5" ]] || tb_fail "nbdcopy remote -> file: copy differs"
  rm -f "$d/copy.img"
  timed_busy ingest dd "$SIZE" - dd if=/dev/zero of="$d/ingest.img" bs=1M count="$SIZE"
  rm -f "$d/ingest.img"
  timed target_read kagemusha nbdcopy -C 4 "${RURI[kagemusha]}" null:
  # A/B with BENCH_BASELINE_NBD: the baseline binary's proxy too, first in
  # every other run so that neither always gets the fresher memory.
  order=(kagemusha)
  if [[ -n $BASELINE ]]; then
    if ((r % 2)); then order=(kagemusha baseline); else order=(baseline kagemusha); fi
  fi
  for subject in "${order[@]}"; do
    if [[ $subject == baseline ]]; then
      saved_nbd=$ST_NBD
      ST_NBD=$BASELINE
      proxy_pass baseline "$d/b"
      ST_NBD=$saved_nbd
    else
      proxy_pass kagemusha "$d/k"
    fi
  done
  rm -rf "$d"
done
st_stop k-target
want proxy && { st_stop nbdkit-relay; st_stop socat-relay; }

# --- fill on loopback vs nbdcopy remote -> file ---------------------------------
# fill_time: from the server's ready line to status complete (polled at 20 Hz).
fill_once() {  # NAME METRIC SUBJECT REMOTE_URI DIR NODE
  local name=$1 metric=$2 subject=$3 remote=$4 d=$5 node=$6
  local t0 t1 i
  t0=$(now)
  st_spawn "$name" "$node" "$ST_NBD" serve --json --unix "$d/p.sock" --control "$d/c.sock" \
    --log-file "$d/server.log" --proxy "$(st_proxy_spec p "$remote" "$d/cache.img" "$d/bitmap")"
  for ((i = 0; i < 6000; i++)); do
    [[ -S $d/c.sock ]] && break
    st_alive "$name" || tb_fail "$name exited"
    sleep 0.005
  done
  # One watcher process polling every 10 ms (a status command plus a JSON
  # parser per poll would take CPU from the fill being measured).
  "$ST_NBD" status --control "$d/c.sock" --watch --json --interval 0.01 >"$d/watch.out" 2>&1 ||
    { cat "$d/watch.out" >&2; tb_fail "$name: watching the fill failed"; }
  grep -q '"complete"' "$d/watch.out" || tb_fail "$name: fill did not complete"
  t1=$(now)
  record "$metric" "$subject" "$(elapsed "$t0" "$t1")"
}
want fill && for ((r = 1; r <= RUNS; r++)); do
  progress "fill on loopback" "$r" "$RUNS"
  d=$ST_DIR/f$r; mkdir -p "$d"
  fill_once fill-lo fill_loopback kagemusha "$remote_uri" "$d" -
  [[ $(st_md5_file "$d/cache.img") == "$data_md5" ]] || tb_fail "loopback fill: cache differs from source"
  st_stop fill-lo
  rm -f "$d/copy.img"
  timed fill_loopback nbdcopy nbdcopy -C 4 "$remote_uri" "$d/copy.img"
  rm -f "$d/copy.img"
  # The same copy made durable (fsync at the end), as the fill's O_DIRECT
  # writes are when it completes.
  timed fill_loopback nbdcopy-flush nbdcopy --flush -C 4 "$remote_uri" "$d/copy.img"
  rm -rf "$d"
done
st_stop nbdkit-r

# --- fill through the WAN emulator ----------------------------------------------
if want wan; then
  st_log "WAN: ${WAN_RTT} ms RTT, ${WAN_RATE} Mbit/s, ${WAN_SIZE} MiB"
  wdata=$ST_DIR/wan.img
  st_make_dense "$wdata" "$WAN_SIZE"
  wmd5=$(st_md5_file "$wdata")
  tb_two_sites "$WAN_RTT" "$WAN_RATE"
  src_ip=$TB_SRC_V4
  st_nbd_serve_in src wan-target --listen "$(st_hostport "$src_ip" 10809)" --export "d=$wdata,ro"
  wuri=$(st_uri_tcp "$src_ip" 10809 d)
  for ((r = 1; r <= WAN_RUNS; r++)); do
    progress "fill over the WAN" "$r" "$WAN_RUNS"
    d=$ST_DIR/w$r; mkdir -p "$d"
    fill_once fill-wan fill_wan kagemusha "$wuri" "$d" dst
    [[ $(st_md5_file "$d/cache.img") == "$wmd5" ]] || tb_fail "WAN fill: cache differs from source"
    st_stop fill-wan
    timed fill_wan nbdcopy tb_exec dst nbdcopy -C 4 "$wuri" "$d/copy.img"
    [[ $(st_md5_file "$d/copy.img") == "$wmd5" ]] || tb_fail "WAN nbdcopy: copy differs"
    rm -f "$d/copy.img"
    # Cold read through a new proxy at dst (its own empty cache) vs the
    # remote read over the same WAN.
    c=$d/cold; mkdir -p "$c"
    st_nbd_serve_in dst proxy-wan --unix "$c/p.sock" --control "$c/c.sock" \
      --proxy "$(st_proxy_spec p "$wuri" "$c/cache.img" "$c/bitmap" no-fill)"
    timed proxy_cold_wan kagemusha tb_exec dst nbdcopy -C 4 "$(st_uri_unix "$c/p.sock" p)" null:
    st_wait_fill "$c/c.sock" 30  # the last stores behind the replies
    [[ $(st_md5_file "$c/cache.img") == "$wmd5" ]] || tb_fail "WAN cold read: cache differs from source"
    st_stop proxy-wan
    timed proxy_cold_wan nbdcopy tb_exec dst nbdcopy -C 4 "$wuri" null:
    rm -rf "$d"
  done
fi

# --- report ------------------------------------------------------------------------
REPORTED1=$(reported_kib)
export BENCH_PAGE_REPORTING_ORDER BENCH_REPORTED_MIB
BENCH_PAGE_REPORTING_ORDER=$(cat "$PAGE_REPORTING/page_reporting_order" 2>/dev/null || echo -)
BENCH_REPORTED_MIB=-
[[ $REPORTED0 == - || $REPORTED1 == - ]] || BENCH_REPORTED_MIB=$(((REPORTED1 - REPORTED0 + 1023) / 1024))
"$ST_PY" - "$results" "$SIZE" "$WAN_SIZE" "$RUNS" "$WAN_RTT" "$WAN_RATE" "$(nproc)" <<'PY'
import collections, os, statistics, sys
path, size, wan_size, runs, rtt, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
vals = collections.defaultdict(list)
for line in open(path):
    m, s, v = line.rstrip("\n").split("\t")
    vals[(m, s)].append(float(v))
med = {k: statistics.median(v) for k, v in vals.items()}
def mbps(metric, subject, mib):
    t = med.get((metric, subject))
    return None if t is None else mib / t
rows = []  # (label, unit, kagemusha, peer1 name, peer1, peer2 name, peer2, higher_is_better)
def fmt(x):
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.2f}")
def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"
print()
print(f"Kagemusha storage benchmark: median of {runs} runs, image {size} MiB, WAN {wan_size} MiB at {rtt} ms RTT / {rate} Mbit/s")
print()
table = []
for metric, label in (("seq_read", f"seq read {size} MiB (nbdcopy -C 4), MiB/s"),
                      ("seq_write", f"seq write {size} MiB (nbdcopy -C 4), MiB/s")):
    k, n, q = (mbps(metric, s, size) for s in ("kagemusha", "nbdkit", "qemu-nbd"))
    table.append((label, k, "nbdkit", n, "qemu-nbd", q))
k, n, q = (med.get(("randread_4k_qd16", s)) for s in ("kagemusha", "nbdkit", "qemu-nbd"))
table.append(("4 KiB random read QD16 (fio nbd), IOPS", k, "nbdkit", n, "qemu-nbd", q))
for metric, label in (("seq_read_cpu", "server CPU s/GiB, seq read (lower is better)"),
                      ("seq_write_cpu", "server CPU s/GiB, seq write (lower is better)")):
    k, n, q = (med.get((metric, s)) for s in ("kagemusha", "nbdkit", "qemu-nbd"))
    table.append((label, k, "nbdkit", n, "qemu-nbd", q))
table.append((f"proxy cold read {size} MiB, MiB/s", mbps("proxy_cold_read", "kagemusha", size),
              "remote alone", mbps("remote_read", "nbdkit", size),
              "remote->local file", mbps("remote_to_file", "nbdkit", size)))
table.append((f"proxy cold read vs storage ingest bound, MiB/s", mbps("proxy_cold_read", "kagemusha", size),
              f"dd {size} MiB to new file", mbps("ingest", "dd", size), None, None))
table.append((f"proxy cold read vs relays storing nothing, MiB/s", mbps("proxy_cold_read", "kagemusha", size),
              "nbdkit nbd-plugin relay", mbps("relay_read", "nbdkit-nbd", size),
              "socat byte relay", mbps("relay_read", "socat", size)))
table.append((f"proxy cold read vs a caching proxy, MiB/s", mbps("proxy_cold_read", "kagemusha", size),
              "nbdkit cache filter", mbps("proxy_cold_read", "nbdkit-cache", size), None, None))
table.append((f"proxy warm read vs a caching proxy, MiB/s", mbps("proxy_warm_read", "kagemusha", size),
              "nbdkit cache filter", mbps("proxy_warm_read", "nbdkit-cache", size), None, None))
table.append((f"proxy warm read right after cold, MiB/s", mbps("proxy_warm_read_now", "kagemusha", size),
              "our target", mbps("target_read", "kagemusha", size), None, None))
table.append((f"proxy warm read {size} MiB (commits done), MiB/s", mbps("proxy_warm_read", "kagemusha", size),
              "our target", mbps("target_read", "kagemusha", size),
              "remote alone", mbps("remote_read", "nbdkit", size)))
table.append((f"fill {size} MiB on loopback, MiB/s", mbps("fill_loopback", "kagemusha", size),
              "nbdcopy remote->file", mbps("fill_loopback", "nbdcopy", size),
              "same with --flush", mbps("fill_loopback", "nbdcopy-flush", size)))
if ("fill_wan", "kagemusha") in med:
    table.append((f"fill {wan_size} MiB over WAN, MiB/s", mbps("fill_wan", "kagemusha", wan_size),
                  "nbdcopy over WAN", mbps("fill_wan", "nbdcopy", wan_size), None, None))
if ("proxy_cold_wan", "kagemusha") in med:
    table.append((f"proxy cold read {wan_size} MiB over WAN, MiB/s", mbps("proxy_cold_wan", "kagemusha", wan_size),
                  "nbdcopy WAN->null:", mbps("proxy_cold_wan", "nbdcopy", wan_size), None, None))
if any(s == "baseline" for (_, s) in vals):
    for metric, label, conv in (("seq_read", "seq read MiB/s", lambda t: size / t),
                                ("seq_write", "seq write MiB/s", lambda t: size / t),
                                ("randread_4k_qd16", "4 KiB QD16 IOPS", lambda v: v),
                                ("seq_read_cpu", "CPU s/GiB seq read (lower is better)", lambda v: v),
                                ("seq_write_cpu", "CPU s/GiB seq write (lower is better)", lambda v: v),
                                ("proxy_cold_read", "proxy cold read MiB/s", lambda t: size / t),
                                ("proxy_cold_read_cpu", "proxy CPU s/GiB, cold read (lower is better)", lambda v: v),
                                ("proxy_warm_read", "proxy warm read MiB/s", lambda t: size / t)):
        if (metric, "baseline") in med and (metric, "kagemusha") in med:
            table.append((f"A/B: {label}", conv(med[(metric, "kagemusha")]),
                          "baseline binary", conv(med[(metric, "baseline")]), None, None))
table = [t for t in table if t[1] is not None or t[3] is not None]
w = max(len(t[0]) for t in table)
print(f"{'metric':<{w}}  {'kagemusha':>10}  {'peer':>22} {'value':>10}  {'ratio':>6}  {'2nd peer':>18} {'value':>10}  {'ratio':>6}")
for label, k, p1, v1, p2, v2 in table:
    print(f"{label:<{w}}  {fmt(k):>10}  {p1:>22} {fmt(v1):>10}  {ratio(k, v1):>6}  {(p2 or ''):>18} {fmt(v2) if p2 else '':>10}  {ratio(k, v2) if p2 else '':>6}")
print()
print("| metric | kagemusha | peer | peer value | ratio (kagemusha/peer) | 2nd peer | value | ratio |")
print("|---|---:|---|---:|---:|---|---:|---:|")
for label, k, p1, v1, p2, v2 in table:
    print(f"| {label} | {fmt(k)} | {p1} | {fmt(v1)} | {ratio(k, v1)} | {p2 or ''} | {fmt(v2) if p2 else ''} | {ratio(k, v2) if p2 else ''} |")
print()
nproc = int(sys.argv[7])
rb, ib, pb = (med.get((m, s)) for m, s in (("remote_read_busy", "nbdkit"), ("ingest_busy", "dd"), ("proxy_cold_read_busy", "kagemusha")))
rw, pw, pc = med.get(("remote_read", "nbdkit")), med.get(("proxy_cold_read", "kagemusha")), med.get(("proxy_cold_read_cpu", "kagemusha"))
if None not in (rb, ib, pb, rw, pw, pc):
    g = size / 1024
    # The fastest any caching proxy could be here: the remote-to-client work
    # (as the remote alone costs) plus storing the bytes (as dd costs), on
    # every CPU at once, with nothing else spent.
    floor = (rb + ib) * g / nproc
    print(f"Cold-read CPU accounting (machine busy CPU-s per GiB, {nproc} CPUs, medians):")
    print(f"  remote alone: {rb:.2f} in {rw:.3f} s wall ({rb * g / rw / nproc:.0%} of the machine busy)")
    print(f"  storing alone (dd to a new file): {ib:.2f}")
    print(f"  proxy cold: {pb:.2f} (the proxy process {pc:.2f}) in {pw:.3f} s wall ({pb * g / pw / nproc:.0%} busy)")
    print(f"  estimated best cold read for a proxy that stores what it serves and spends nothing else: "
          f"{floor:.3f} s, i.e. at most {rw / floor:.2f}x the remote alone on this machine (measured: {rw / pw:.2f}x)")
    relay_busy = []
    for subject, label in (("nbdkit-nbd", "nbdkit nbd-plugin relay"), ("socat", "socat byte relay")):
        t, b = med.get(("relay_read", subject)), med.get(("relay_read_busy", subject))
        if t is not None and b is not None:
            relay_busy.append(b)
            print(f"  {label}, storing nothing: {b:.2f} in {t:.3f} s wall ({b * g / t / nproc:.0%} busy), "
                  f"{rw / t:.2f}x the remote alone")
    if relay_busy:
        # A caching proxy relays and also stores: at least the cheaper
        # relay's machine cost plus the store's, on every CPU at once.
        both = (min(relay_busy) + ib) * g / nproc
        print(f"  estimated best cold read for a proxy that costs what the cheaper relay costs, plus the store: "
              f"{both:.3f} s, i.e. at most {rw / both:.2f}x the remote alone")
    # The goal as a CPU budget: at 0.8x the cold read may take rw / 0.8 s,
    # in which the machine has nproc times as many CPU-seconds; the remote
    # and the client spend what they spend when the remote is read alone.
    budget = nproc * (rw / 0.8) / g - rb
    extra = f", the cheaper relay adds {min(relay_busy) - rb:.2f} over the remote alone" if relay_busy else ""
    print(f"  CPU a caching proxy may add to the remote-alone work and still reach 0.8x: {budget:.2f} CPU-s/GiB "
          f"even with all {nproc} CPUs busy all the time; storing alone costs {ib:.2f}{extra}")
    print("  (estimates from other passes: the store's cost depends on the state of free memory, which"
          " differs between passes, so they are only as good as the medians; use 1 GiB and 5+ runs)")
    print()
# Free page reporting (this VM's balloon): whether it was active during the run.
order, mib = os.environ.get("BENCH_PAGE_REPORTING_ORDER", "-"), os.environ.get("BENCH_REPORTED_MIB", "-")
if order != "-" and mib == "-":
    print(f"Free page reporting: the kernel has it (page_reporting_order {order}); how much was reported is not shown.")
elif order != "-" and mib != "0":
    print(f"Free page reporting is active (page_reporting_order {order}): {mib} MiB of freed memory went back to the"
          " hypervisor during the run, and a page it took back costs a host fault when a store reuses it.")
elif order != "-":
    print("Free page reporting: no freed memory went back to the hypervisor during the run.")
print("Ratios above 1 mean kagemusha is faster (rates: higher is better), except CPU s/GiB where lower is better.")
print("Raw seconds (median): " + ", ".join(f"{m}/{s}={v:.3f}" for (m, s), v in sorted(med.items()) if m != "randread_4k_qd16"))
for metric in ("seq_read", "remote_read", "relay_read", "proxy_cold_read", "target_read", "proxy_warm_read_now",
               "proxy_warm_read", "fill_loopback"):
    subjects = sorted(s for (m, s) in vals if m == metric)
    if subjects:
        print(f"Every run ({metric} seconds, in run order): " +
              "; ".join(f"{s}=" + ",".join(f"{v:.3f}" for v in vals[(metric, s)]) for s in subjects))
PY
st_pass

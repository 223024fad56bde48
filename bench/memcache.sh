#!/usr/bin/env bash
# bench/memcache.sh: the MiyakoDori proxies against plain QEMU precopy, run by
# `./kagemusha bench memcache`. Not a test, but it fails (exit 1) if memtool
# finds a wrong page on any destination: a bench that migrates wrong memory
# measures nothing.
#
# One booted Linux guest (the kit's image, 256 MiB, `memtool fill 64`) does,
# per run and per scenario, A -> B -> A in plain QEMU precopy (QEMU -> QEMU
# socket) and then A -> B -> A through an encoder and a decoder per hop
# (fresh page stores per scenario and run, so the first hop has nothing
# cached). Scenarios:
#   idle    nothing is dirtied
#   dirty   between the hops memtool dirties BENCH_DIRTY_PCT % of its 64 MiB
#           per second for BENCH_DIRTY_SECS s, then stops (defaults 20 %/s for
#           2 s = up to 40 % of 64 MiB, i.e. about 10 % of the guest's RAM)
# Bytes: plain = query-migrate ram "transferred" on the source; proxied = the
# encoder's wan_bytes_out (encoder -> decoder, the WAN leg). Time: query-migrate
# total-time on the source. Every figure is the median of BENCH_RUNS runs.
# Environment: BENCH_RUNS=3 (1 for a quick run) BENCH_DIRTY_PCT=20
# BENCH_DIRTY_SECS=2 BENCH_HASH=1 (also run memcache_hash's binary)
# BENCH_MAX_BANDWIDTH=MBYTE_S (QEMU's migrate max-bandwidth on every hop; unset:
# QEMU's default, 128 MiB/s, which bounds the time of a loopback migration).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export KAGEMUSHA_SOURCE=${KAGEMUSHA_SOURCE:-$(cd "$HERE/.." && pwd)}
export KAGEMUSHA_BUILD=${KAGEMUSHA_BUILD:-$KAGEMUSHA_SOURCE/build}
# shellcheck source=../tests/memcache/proxy_lib.sh
source "$KAGEMUSHA_SOURCE/tests/memcache/proxy_lib.sh"
# shellcheck source=../tests/kit/qemu.sh
source "$KAGEMUSHA_SOURCE/tests/kit/qemu.sh"

RUNS=${BENCH_RUNS:-3}
DIRTY_PCT=${BENCH_DIRTY_PCT:-20}
DIRTY_SECS=${BENCH_DIRTY_SECS:-2}
HASH=${BENCH_HASH:-1}
BW=()
[[ -z ${BENCH_MAX_BANDWIDTH:-} ]] || BW=(--max-bandwidth "$BENCH_MAX_BANDWIDTH")

tb_require_cmd qemu-system-x86_64 python3
[[ -x "$MP_BIN" ]] || cmake --build "$KAGEMUSHA_BUILD" --target kagemusha-memcache >&2
[[ -x "$MP_BIN" ]] || tb_skip "kagemusha-memcache is not built ($MP_BIN)"
tb_init
kq_guest_image
tb_host h

RES=$TB_DIR/results   # lines: scenario hop mode bytes ms
: >"$RES"
GUEST=""              # name of the running guest
SEQ=0                 # unique guest names and ports
PORT=20000

verify() {  # NAME WHAT
  local out rc=0
  out=$(kq_guest "$1" memtool verify) || rc=$?
  [[ $rc == 0 && "$out" == "OK "* ]] || tb_fail "memory check on $1 ($2): exit $rc: $out"
  tb_log "verify $1 ($2): $out"
}

next_name() { SEQ=$((SEQ + 1)); NEXT="g$SEQ"; }

# plain_hop SCENARIO HOP: GUEST -> a new guest, QEMU to QEMU.
plain_hop() {
  local sc=$1 hop=$2 line
  next_name
  PORT=$((PORT + 10))
  kq_start "$NEXT" --ns h --like "$GUEST" --incoming "tcp:127.0.0.1:$PORT"
  kq_migrate "$GUEST" "tcp:127.0.0.1:$PORT" "${BW[@]}"
  line=$(kq_wait_migration "$GUEST" --dst "$NEXT" --timeout 180) || tb_fail "plain $sc $hop: $line"
  kq_stop "$GUEST"
  tb_log "plain $sc $hop $GUEST -> $NEXT: $line"
  GUEST=$NEXT
  verify "$GUEST" "plain $sc $hop"
  echo "$sc $hop plain $(tb_field transferred "$line") $(tb_field total_ms "$line")" >>"$RES"
}

# proxy_hop SCENARIO HOP SRC_STORE DST_STORE: through an encoder and a decoder.
proxy_hop() {
  local sc=$1 hop=$2 shost=$3 dhost=$4 line enc dec wan q refs
  next_name
  PORT=$((PORT + 10))
  mp_proxy decode "$dhost" $((PORT + 2)) $((PORT + 3)) --once
  dec=$MP_PROXY_LOG
  mp_proxy encode "$shost" "$PORT" $((PORT + 2)) --once
  enc=$MP_PROXY_LOG
  kq_start "$NEXT" --ns h --like "$GUEST" --incoming "tcp:127.0.0.1:$((PORT + 3))"
  kq_migrate "$GUEST" "tcp:127.0.0.1:$PORT" "${BW[@]}"
  line=$(kq_wait_migration "$GUEST" --dst "$NEXT" --timeout 180) ||
    tb_fail "proxied $sc $hop: $line; $(cat "$enc" "$dec")"
  tb_wait_log "$enc" '"event":"migration-done"' 30 || tb_fail "encoder: $(cat "$enc")"
  tb_wait_log "$dec" '"event":"migration-done"' 30 || tb_fail "decoder: $(cat "$dec")"
  kq_stop "$GUEST"
  wan=$(mp_json_field "$enc" migration-done wan_bytes_out)
  q=$(mp_json_field "$enc" migration-done qemu_bytes)
  refs=$(mp_json_field "$enc" migration-done ref_pages)
  tb_log "proxied $sc $hop $GUEST -> $NEXT: qemu_bytes=$q wan_bytes_out=$wan ref_pages=$refs; $line"
  GUEST=$NEXT
  verify "$GUEST" "proxied $sc $hop"
  echo "$sc $hop proxied $wan $(tb_field total_ms "$line")" >>"$RES"
}

between_hops() {  # SCENARIO
  [[ $1 == dirty ]] || return 0
  kq_guest "$GUEST" memtool dirty "$DIRTY_PCT" >/dev/null || tb_fail "memtool dirty"
  sleep "$DIRTY_SECS"
  kq_guest "$GUEST" memtool dirty 0 >/dev/null || tb_fail "memtool dirty 0"
  tb_log "dirtied: $(kq_guest "$GUEST" memtool status)"
}

# A -> B -> A, plain then proxied, with fresh stores.
scenario() {  # SCENARIO RUN
  local sc=$1 run=$2
  plain_hop "$sc" AB
  between_hops "$sc"
  plain_hop "$sc" BA
  rm -rf "$TB_DIR/store-A" "$TB_DIR/store-B"
  mkdir -p "$TB_DIR/store-A" "$TB_DIR/store-B"
  proxy_hop "$sc" AB A B
  between_hops "$sc"
  proxy_hop "$sc" BA B A
  tb_log "run $run scenario $sc done"
}

next_name
GUEST=$NEXT
kq_start "$GUEST" --ns h --mem 256
kq_wait_boot "$GUEST" >/dev/null
kq_guest "$GUEST" memtool fill 64 4242 >/dev/null || tb_fail "memtool fill"
verify "$GUEST" "after fill"

for run in $(seq 1 "$RUNS"); do
  scenario idle "$run"
  scenario dirty "$run"
done

hash_line=""
if [[ $HASH == 1 ]]; then
  hb=$KAGEMUSHA_BUILD/memcache/kagemusha_memcache_bench_hash
  [[ -x "$hb" ]] || cmake --build "$KAGEMUSHA_BUILD" --target kagemusha_memcache_bench_hash >&2 || true
  if [[ -x "$hb" ]]; then
    hash_line=$("$hb" 1 | grep -m1 '^PageHasher (store digest)' | awk '{print $(NF-1)}')
  fi
fi

python3 - "$RES" "$RUNS" "$hash_line" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" "${BENCH_MAX_BANDWIDTH:+$BENCH_MAX_BANDWIDTH MiB/s}" <<'PY'
import statistics, sys
res, runs, hashrate, ncpu, load = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
vals = {}
for line in open(res):
    sc, hop, mode, b, ms = line.split()
    vals.setdefault((sc, hop, mode), []).append((int(b), int(ms)))
med = lambda xs: statistics.median(xs)
names = {"AB": "A → B (nothing cached)", "BA": "B → A (return)"}
bw = sys.argv[6] or "QEMU default"
print(f"\nmemcache bench: 256 MiB Linux guest, memtool fill 64 MiB, QEMU 7.2 TCG, loopback, max-bandwidth {bw}; "
      f"median of {runs} run(s); {ncpu} CPUs, load {load}\n")
print("| scenario | hop | plain bytes | proxied WAN bytes | reduction | plain time | proxied time | time ratio |")
print("|---|---|---|---|---|---|---|---|")
for sc in ("idle", "dirty"):
    for hop in ("AB", "BA"):
        p = vals.get((sc, hop, "plain")); x = vals.get((sc, hop, "proxied"))
        if not p or not x:
            continue
        pb, pt = med([v[0] for v in p]), med([v[1] for v in p])
        xb, xt = med([v[0] for v in x]), med([v[1] for v in x])
        print(f"| {sc} | {names[hop]} | {pb:,.0f} | {xb:,.0f} | {100 * (1 - xb / pb):.1f} % | "
              f"{pt:,.0f} ms | {xt:,.0f} ms | {xt / pt:.2f} |".replace(",", " "))
if hashrate:
    print(f"\nhashing (PageHasher, SHA-256 over 4 KiB pages): {hashrate} GB/s per core")
PY

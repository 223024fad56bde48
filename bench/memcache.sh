#!/usr/bin/env bash
# bench/memcache.sh: the MiyakoDori proxies against plain QEMU precopy, run by
# `./kagemusha bench memcache`. Not a test, but it fails (exit 1) if memtool
# finds a wrong page on any destination: a bench that migrates wrong memory
# measures nothing.
#
# One booted Linux guest (the kit's image, 256 MiB, `memtool fill 64`) does,
# per network, per run and per scenario, A -> B -> A in plain QEMU precopy
# (QEMU -> QEMU socket) and then A -> B -> A through an encoder and a decoder
# per hop (fresh page stores per scenario and run, so the first hop has
# nothing cached). Networks (BENCH_NETS, default "wan loopback"):
#   wan       hosts A and B are two test-bed sites joined by kagemusha-wanem
#             (tb_two_sites: BENCH_WAN_RTT ms RTT, default 20; BENCH_WAN_RATE
#             Mbit/s, default 500). Plain: the QEMU -> QEMU connection crosses
#             the WAN; proxied: QEMU -> encoder on loopback at A, encoder ->
#             decoder across the WAN, decoder -> QEMU on loopback at B.
#             QEMU's max-bandwidth: BENCH_MAX_BANDWIDTH MiB/s, default 10000
#             (no effective cap, like libvirt's default; QEMU's own default,
#             128 MiB/s, would cap the proxied return hop's QEMU-side stream
#             at about 1 s for 127 MB). The primary figure.
#   loopback  both QEMUs and both proxies in one namespace on loopback,
#             max-bandwidth BENCH_LOOPBACK_MAX_BANDWIDTH MiB/s (default 10000,
#             i.e. no effective cap): nothing but CPU limits either side, so
#             this row is the proxies' CPU overhead.
# Scenarios:
#   idle    nothing is dirtied
#   dirty   between the hops memtool dirties BENCH_DIRTY_PCT % of its 64 MiB
#           per second for BENCH_DIRTY_SECS s, then stops (defaults 20 %/s for
#           2 s = up to 40 % of 64 MiB, i.e. about 10 % of the guest's RAM)
# Every source has the return-path capability on (as libvirt sets it;
# BENCH_RETURN_PATH=0 turns it off), so its total-time ends only once the
# destination has loaded the state: the time is end to end, whatever sits
# in socket or proxy buffers.
# Bytes: plain = query-migrate ram "transferred" on the source; proxied = the
# encoder's wan_bytes_out (encoder -> decoder, the WAN leg). Time: query-migrate
# total-time on the source. Every figure is the median of BENCH_RUNS runs.
# Environment: BENCH_RUNS=3 (1 for a quick run) BENCH_DIRTY_PCT=20
# BENCH_DIRTY_SECS=2 BENCH_HASH=1 (also run memcache_hash's binary)
# BENCH_WINDOW=MIB (the encoder's --window; unset: its default).
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
NETS=${BENCH_NETS:-wan loopback}
WAN_RTT=${BENCH_WAN_RTT:-20}
WAN_RATE=${BENCH_WAN_RATE:-500}
WAN_BW=${BENCH_MAX_BANDWIDTH:-10000}
LO_BW=${BENCH_LOOPBACK_MAX_BANDWIDTH:-10000}
RETURN_PATH=${BENCH_RETURN_PATH:-1}
WINDOW=${BENCH_WINDOW:-}
ENC_ARGS=()
[[ -z "$WINDOW" ]] || ENC_ARGS=(--window "$WINDOW")

tb_require_cmd qemu-system-x86_64 python3
[[ -x "$MP_BIN" ]] || cmake --build "$KAGEMUSHA_BUILD" --target kagemusha-memcache >&2
[[ -x "$MP_BIN" ]] || tb_skip "kagemusha-memcache is not built ($MP_BIN)"
tb_init
kq_guest_image
tb_two_sites "$WAN_RTT" "$WAN_RATE"

RES=$TB_DIR/results   # lines: net scenario hop mode bytes ms downtime_ms
: >"$RES"
GUEST=""              # name of the running guest
NODE=src              # the kit node it runs on
SEQ=0                 # unique guest names and ports
PORT=20000

verify() {  # NAME WHAT
  local out rc=0
  out=$(kq_guest "$1" memtool verify) || rc=$?
  [[ $rc == 0 && "$out" == "OK "* ]] || tb_fail "memory check on $1 ($2): exit $rc: $out"
  tb_log "verify $1 ($2): $out"
}

next_name() { SEQ=$((SEQ + 1)); NEXT="g$SEQ"; }

other_node() { if [[ $1 == src ]]; then echo dst; else echo src; fi; }
node_v6() { if [[ $1 == src ]]; then echo "$TB_SRC_V6"; else echo "$TB_DST_V6"; fi; }

# hop_setup NET: where the next hop goes (TO_NODE, TO_HOST as in a URI) and
# its max-bandwidth arguments (BWA).
hop_setup() {
  local bw
  if [[ $1 == wan ]]; then
    TO_NODE=$(other_node "$NODE")
    TO_HOST="[$(node_v6 "$TO_NODE")]"
    bw=$WAN_BW
  else
    TO_NODE=$NODE
    TO_HOST=127.0.0.1
    bw=$LO_BW
  fi
  BWA=()
  [[ -z "$bw" ]] || BWA=(--max-bandwidth "$bw")
  next_name
  PORT=$((PORT + 10))
}

return_path() {  # SRC
  [[ $RETURN_PATH == 1 ]] || return 0
  kq_qmp "$1" migrate-set-capabilities \
    '{"capabilities":[{"capability":"return-path","state":true}]}' >/dev/null ||
    tb_fail "return-path capability on $1"
}

# plain_hop NET SCENARIO HOP: GUEST -> a new guest, QEMU to QEMU.
plain_hop() {
  local net=$1 sc=$2 hop=$3 line
  hop_setup "$net"
  kq_start "$NEXT" --ns "$TO_NODE" --like "$GUEST" --incoming "tcp:$TO_HOST:$PORT"
  return_path "$GUEST"
  kq_migrate "$GUEST" "tcp:$TO_HOST:$PORT" "${BWA[@]}"
  line=$(kq_wait_migration "$GUEST" --dst "$NEXT" --timeout 180) || tb_fail "plain $net $sc $hop: $line"
  kq_stop "$GUEST"
  tb_log "plain $net $sc $hop $GUEST@$NODE -> $NEXT@$TO_NODE: $line"
  GUEST=$NEXT
  NODE=$TO_NODE
  verify "$GUEST" "plain $net $sc $hop"
  echo "$net $sc $hop plain $(tb_field transferred "$line") $(tb_field total_ms "$line") $(tb_field downtime_ms "$line")" >>"$RES"
}

# proxy_hop NET SCENARIO HOP SRC_STORE DST_STORE: through an encoder at the
# source and a decoder at the destination (each QEMU talks to its proxy on
# loopback; the proxies talk across NET).
proxy_hop() {
  local net=$1 sc=$2 hop=$3 sstore=$TB_DIR/store-$1-$4 dstore=$TB_DIR/store-$1-$5 line enc dec
  local wan q refs skipped endw
  hop_setup "$net"
  tb_spawn --name "decode-$NEXT" "$TO_NODE" "$MP_BIN" decode --listen "$TO_HOST:$((PORT + 2))" \
    --to "127.0.0.1:$((PORT + 3))" --store "$dstore" --vm guest1 --json --once
  dec=$TB_SPAWN_LOG
  tb_spawn --name "encode-$NEXT" "$NODE" "$MP_BIN" encode --listen "127.0.0.1:$PORT" \
    --to "$TO_HOST:$((PORT + 2))" --store "$sstore" --vm guest1 --json --once "${ENC_ARGS[@]}"
  enc=$TB_SPAWN_LOG
  tb_wait_log "$dec" '"event":"listening"' 10 || tb_fail "decoder did not start: $(cat "$dec")"
  tb_wait_log "$enc" '"event":"listening"' 10 || tb_fail "encoder did not start: $(cat "$enc")"
  kq_start "$NEXT" --ns "$TO_NODE" --like "$GUEST" --incoming "tcp:127.0.0.1:$((PORT + 3))"
  return_path "$GUEST"
  kq_migrate "$GUEST" "tcp:127.0.0.1:$PORT" "${BWA[@]}"
  mp_finish_hop "$GUEST" "$NEXT" "$enc" "$dec" 180
  line=$MP_HOP_LINE
  wan=$(mp_json_field "$enc" migration-done wan_bytes_out)
  q=$(mp_json_field "$enc" migration-done qemu_bytes)
  refs=$(mp_json_field "$enc" migration-done ref_pages)
  skipped="$(mp_json_field "$enc" migration-done learn_skipped_pages)/$(mp_json_field "$dec" migration-done learn_skipped_pages)"
  endw="$(mp_json_field "$enc" migration-done end_wait_us)/$(mp_json_field "$dec" migration-done end_wait_us)"
  tb_log "proxied $net $sc $hop $GUEST@$NODE -> $NEXT@$TO_NODE: qemu_bytes=$q wan_bytes_out=$wan ref_pages=$refs learn_skipped(enc/dec)=$skipped end_wait_us(enc/dec)=$endw; $line"
  GUEST=$NEXT
  NODE=$TO_NODE
  verify "$GUEST" "proxied $net $sc $hop"
  echo "$net $sc $hop proxied $wan $(tb_field total_ms "$line") $(tb_field downtime_ms "$line")" >>"$RES"
}

between_hops() {  # SCENARIO
  [[ $1 == dirty ]] || return 0
  kq_guest "$GUEST" memtool dirty "$DIRTY_PCT" >/dev/null || tb_fail "memtool dirty"
  sleep "$DIRTY_SECS"
  kq_guest "$GUEST" memtool dirty 0 >/dev/null || tb_fail "memtool dirty 0"
  tb_log "dirtied: $(kq_guest "$GUEST" memtool status)"
}

# A -> B -> A, plain then proxied, with fresh stores.
scenario() {  # NET SCENARIO RUN
  local net=$1 sc=$2 run=$3
  plain_hop "$net" "$sc" AB
  between_hops "$sc"
  plain_hop "$net" "$sc" BA
  rm -rf "$TB_DIR/store-$net-A" "$TB_DIR/store-$net-B"
  mkdir -p "$TB_DIR/store-$net-A" "$TB_DIR/store-$net-B"
  proxy_hop "$net" "$sc" AB A B
  between_hops "$sc"
  proxy_hop "$net" "$sc" BA B A
  tb_log "run $run $net scenario $sc done"
}

next_name
GUEST=$NEXT
kq_start "$GUEST" --ns "$NODE" --mem 256
kq_wait_boot "$GUEST" >/dev/null
kq_guest "$GUEST" memtool fill 64 4242 >/dev/null || tb_fail "memtool fill"
verify "$GUEST" "after fill"

for run in $(seq 1 "$RUNS"); do
  for net in $NETS; do
    scenario "$net" idle "$run"
    scenario "$net" dirty "$run"
  done
done

hash_line=""
if [[ $HASH == 1 ]]; then
  hb=$KAGEMUSHA_BUILD/memcache/kagemusha_memcache_bench_hash
  [[ -x "$hb" ]] || cmake --build "$KAGEMUSHA_BUILD" --target kagemusha_memcache_bench_hash >&2 || true
  if [[ -x "$hb" ]]; then
    hash_out=$("$hb" 1)
    # The proxies hash through PageHasher::HashMany in batches; Hash() is the
    # one-page path (OpenSSL EVP), shown beside it.
    hash_line="$(grep -m1 '^HashMany auto' <<<"$hash_out" | awk '{print $(NF-1)}') $(grep -m1 '^SHA-256 (EVP)' <<<"$hash_out" | awk '{print $(NF-1)}')"
  fi
fi

python3 - "$RES" "$RUNS" "$hash_line" "$(nproc)" "$(cut -d' ' -f1-3 /proc/loadavg)" \
  "$WAN_RTT" "$WAN_RATE" "${WAN_BW:-QEMU default}" "$LO_BW" "$RETURN_PATH" "$WINDOW" <<'PY'
import statistics, sys
res, runs, hashrate, ncpu, load, rtt, rate, wan_bw, lo_bw, rp, window = sys.argv[1:12]
vals = {}
for line in open(res):
    net, sc, hop, mode, b, ms, dt = line.split()
    vals.setdefault((net, sc, hop, mode), []).append((int(b), int(ms), int(dt)))
med = lambda xs: statistics.median(xs)
names = {"AB": "A → B (nothing cached)", "BA": "B → A (return)"}
titles = {
    "wan": f"WAN: kagemusha-wanem, {rtt} ms RTT, {rate} Mbit/s; QEMU max-bandwidth {wan_bw}"
           + ("" if wan_bw == "QEMU default" else " MiB/s"),
    "loopback": f"loopback, QEMU max-bandwidth {lo_bw} MiB/s (CPU overhead: nothing else limits)",
}
print(f"\nmemcache bench: 256 MiB Linux guest, memtool fill 64 MiB, QEMU 7.2 TCG, return-path "
      f"{'on' if rp == '1' else 'off'}; encoder window {window or 'default'}; median of {runs} "
      f"run(s); {ncpu} CPUs, load {load}")
for net in ("wan", "loopback"):
    if not any(k[0] == net for k in vals):
        continue
    print(f"\n{titles[net]}\n")
    print("| scenario | hop | plain bytes | proxied WAN bytes | reduction | plain time | proxied time "
          "| time ratio | plain downtime | proxied downtime |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sc in ("idle", "dirty"):
        for hop in ("AB", "BA"):
            p = vals.get((net, sc, hop, "plain")); x = vals.get((net, sc, hop, "proxied"))
            if not p or not x:
                continue
            pb, pt, pd = (med([v[i] for v in p]) for i in range(3))
            xb, xt, xd = (med([v[i] for v in x]) for i in range(3))
            print(f"| {sc} | {names[hop]} | {pb:,.0f} | {xb:,.0f} | {100 * (1 - xb / pb):.1f} % | "
                  f"{pt:,.0f} ms | {xt:,.0f} ms | {xt / pt:.2f} | {pd:,.0f} ms | {xd:,.0f} ms |"
                  .replace(",", " "))
    print("\nper-run times (plain / proxied, ms):")
    for sc in ("idle", "dirty"):
        for hop in ("AB", "BA"):
            p = vals.get((net, sc, hop, "plain"), []); x = vals.get((net, sc, hop, "proxied"), [])
            print(f"  {sc} {hop}: " + ", ".join(f"{a[1]}/{b[1]}" for a, b in zip(p, x)))
if hashrate:
    many, _, evp = hashrate.partition(" ")
    print(f"\nhashing, SHA-256 over 4 KiB pages, GB/s per core: PageHasher::HashMany "
          f"(16-page batches, as the proxies call it) {many}; OpenSSL EVP one page at a "
          f"time {evp}")
PY

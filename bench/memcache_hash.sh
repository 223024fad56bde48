#!/bin/sh
# Page-store digest bench (docs/memcache.md, "Digest choice"): per-core hash
# rate over 4 KiB pages for each candidate, plus `openssl speed` as an
# independent peer for SHA-256 in the same run. Usage:
#   bench/memcache_hash.sh [build-dir] [seconds-per-candidate]
set -eu
build=${1:-build}
secs=${2:-1}
bin="$build/memcache/kagemusha_memcache_bench_hash"
[ -x "$bin" ] || cmake --build "$build" --target kagemusha_memcache_bench_hash
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "# sha_ni: $(grep -qw sha_ni /proc/cpuinfo && echo yes || echo no); load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" "$secs"
echo "# peer: openssl speed -evp sha256, 4096-byte blocks (wall clock)"
openssl speed -evp sha256 -bytes 4096 -seconds "$secs" 2>/dev/null | tail -1

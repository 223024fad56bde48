#!/bin/sh
# Page-store digest bench (docs/memcache.md, "Digest choice"): per-core hash
# rate over 4 KiB pages for each candidate and for every PageHasher::HashMany
# path the CPU supports, all against OpenSSL EVP SHA-256 measured in the same
# run, plus `openssl speed` as an independent peer (with and without SHA-NI).
# Usage:
#   bench/memcache_hash.sh [build-dir] [seconds-per-candidate]
# The build dir defaults to $KAGEMUSHA_BUILD, else ./build.
set -eu
build=${1:-${KAGEMUSHA_BUILD:-build}}
secs=${2:-1}
bin="$build/memcache/kagemusha_memcache_bench_hash"
[ -x "$bin" ] || cmake --build "$build" --target kagemusha_memcache_bench_hash
flag() { grep -qw "$1" /proc/cpuinfo && echo yes || echo no; }
echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) vCPUs"
echo "# sha_ni: $(flag sha_ni); avx2: $(flag avx2); avx512f/bw/vl: $(flag avx512f)/$(flag avx512bw)/$(flag avx512vl)"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$bin" "$secs"
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# peer: openssl speed -evp sha256, 4096-byte blocks (wall clock, bytes/s)"
openssl speed -evp sha256 -bytes 4096 -seconds "$secs" 2>/dev/null | tail -1
# OPENSSL_ia32cap masks CPUID bits for OpenSSL; bit 29 of the leaf-7 EBX word
# is SHA: what OpenSSL does on a CPU without SHA-NI.
echo "# peer: the same with SHA-NI masked (OPENSSL_ia32cap=:~0x20000000)"
OPENSSL_ia32cap=":~0x20000000" openssl speed -evp sha256 -bytes 4096 -seconds "$secs" 2>/dev/null | tail -1

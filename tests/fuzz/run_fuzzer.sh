#!/usr/bin/env bash
# Runs one libFuzzer binary for a bounded time (KAGEMUSHA_FUZZ_SECONDS,
# default 30) over its seed corpus. Any crash, leak or sanitizer report fails.
set -euo pipefail
bin=$1 seeds=${2:-}
if [[ ! -x $bin ]]; then
  echo "SKIP: fuzzer $bin not built; run ./kagemusha build-fuzz (needs clang)" >&2
  exit 77
fi
work=$(mktemp -d /tmp/kagemusha-fuzz.XXXXXX)
# Crash reproducers are kept (not deleted with the scratch corpus) so a
# failure can be replayed: $bin <file>.
artifacts=${KAGEMUSHA_FUZZ_ARTIFACTS:-/tmp/kagemusha-fuzz-artifacts}/$(basename "$bin")
mkdir -p "$artifacts"
trap 'rm -rf "$work"' EXIT
dirs=("$work")
[[ -n $seeds && -d $seeds ]] && cp -r "$seeds"/. "$work"/
"$bin" -max_total_time="${KAGEMUSHA_FUZZ_SECONDS:-30}" -rss_limit_mb=2048 -timeout=10 \
  -print_final_stats=1 -artifact_prefix="$artifacts/" "${dirs[@]}" 2>&1 | tail -25

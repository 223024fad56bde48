#!/usr/bin/env bash
# Copy-on-read proxy in front of `nbdkit -t 16 file`: client writes during a
# rate-limited fill, full fill, md5 of export and cache = source + writes,
# switch to target, kill nbdkit, reads and writes still work.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init nbdkit qemu-io nbdcopy nbdinfo
st_proxy_scenario nbdkit
st_pass

#!/usr/bin/env bash
# Copy-on-read proxy in front of `qemu-nbd --shared=8 -t -r`: the same
# end-to-end check as test_proxy_nbdkit.sh with QEMU's NBD server as remote.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init qemu-nbd qemu-io nbdcopy nbdinfo
st_proxy_scenario qemu-nbd
st_pass

#!/usr/bin/env bash
# Installs every Debian 12 package that building, testing, the demo and the
# benchmarks need. Idempotent: a second run only checks.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PKGS=(
  # toolchain
  build-essential cmake ninja-build pkg-config clang libclang-rt-14-dev clang-format
  # libraries (see README "Dependencies")
  libvirt-dev libboost-dev libboost-program-options-dev libsqlite3-dev
  libspdlog-dev libfmt-dev nlohmann-json3-dev libgtest-dev libgmock-dev libssl-dev libzstd-dev
  libbpf-dev
  # real peers used by tests and benchmarks
  qemu-system-x86 qemu-utils libnbd-bin python3-libnbd nbdkit
  python3 python3-scapy tshark iperf3 fio socat busybox-static cpio ndisc6
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  iproute2 nftables procps psmisc kmod hyperfine time bc
  e2fsprogs util-linux mount  # mkfs.ext4, fsfreeze: a cache disk that stalls (nbd_client_test)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${#missing[@]} packages: ${missing[*]}"
  apt-get update -q
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all packages present"
  # The guest image builder downloads Debian's kernel package; make sure apt
  # knows it even where nothing had to be installed.
  apt-cache show linux-image-amd64 >/dev/null 2>&1 || apt-get update -q
fi

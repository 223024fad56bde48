#!/usr/bin/env bash
# build-guest.sh [OUTDIR]: builds the Kagemusha test guest (kernel + initramfs).
#
#   OUTDIR/vmlinuz     Debian's linux-image-6.1.*-amd64 kernel (not installed:
#                      `apt-get download` + `dpkg -x` in a temp dir)
#   OUTDIR/vmlinux     the same kernel as an ELF with a PVH entry, unpacked
#                      from vmlinuz; QEMU boots it without decompression
#                      (about 4x faster under TCG). Absent if unavailable.
#   OUTDIR/initrd.img  uncompressed newc cpio: busybox-static, the virtio
#                      modules of that kernel, /init (./init) and memtool
#                      (./memtool.cc, compiled -static here)
#   OUTDIR/manifest    versions and the input hash; "key=value" lines
#
# OUTDIR defaults to $KAGEMUSHA_GUEST_CACHE, else /var/cache/kagemusha/guest.
# Cached and idempotent: nothing is rebuilt while the inputs (this script,
# init, memtool.cc, busybox and kernel package versions) are unchanged. The
# extracted kernel is cached under OUTDIR/kernels/, so a change of the init
# script does not download again. A lock makes concurrent builds safe.
#
# Kernel choice: $KAGEMUSHA_GUEST_KERNEL_PKG if set; else a kernel already
# cached; else the linux-image-6.1.*-amd64 that linux-image-amd64 depends on
# (newest available otherwise). --refresh-kernel ignores the cached kernel.
#
# Exit codes: 0 ok, 1 build error, 3 a prerequisite is missing (a tool, or
# the kernel download failed): the message says what to do.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
refresh_kernel=0
outdir=""
for a in "$@"; do
  case "$a" in
    --refresh-kernel) refresh_kernel=1 ;;
    -h | --help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "build-guest: unknown option $a" >&2; exit 1 ;;
    *) outdir=$a ;;
  esac
done
outdir=${outdir:-${KAGEMUSHA_GUEST_CACHE:-/var/cache/kagemusha/guest}}

say() { echo "build-guest: $*" >&2; }
missing() { say "MISSING: $*"; exit 3; }

# Modules loaded by /init, in dependency order (checked against modinfo below).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
  failover net_failover virtio_net virtio_blk)
MODDIRS=(drivers/virtio drivers/virtio drivers/virtio drivers/virtio drivers/virtio
  net/core drivers/net drivers/net drivers/block)

for t in apt-get apt-cache dpkg dpkg-deb cpio g++ flock sha256sum modinfo; do
  command -v "$t" >/dev/null || missing "'$t' not found: run scripts/install-deps.sh (packages: apt dpkg cpio build-essential kmod)"
done
busybox=/bin/busybox
[[ -x $busybox ]] || missing "$busybox not found: apt-get install busybox-static"
file_out=$(LC_ALL=C readelf -l "$busybox" 2>/dev/null | grep -c INTERP || true)
[[ "$file_out" == 0 ]] || missing "$busybox is dynamically linked: apt-get install busybox-static (not busybox)"
bb_ver=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || echo unknown)

mkdir -p "$outdir/kernels"
exec 9>"$outdir/.lock"
flock 9

# ---------------------------------------------------------------- the kernel
pick_kernel_pkg() {
  if [[ -n "${KAGEMUSHA_GUEST_KERNEL_PKG:-}" ]]; then
    echo "$KAGEMUSHA_GUEST_KERNEL_PKG"
    return
  fi
  local p
  if ((!refresh_kernel)); then
    # Newest cached kernel that is complete.
    p=$(find "$outdir/kernels" -mindepth 2 -maxdepth 2 -name complete -printf '%h\n' 2>/dev/null |
      sed 's|.*/||' | sort -V | tail -n 1)
    if [[ -n "$p" ]]; then
      echo "${p%%_*}"
      return
    fi
  fi
  p=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-6\.1\.[0-9.-]*-amd64\)$/\1/p' | head -n 1)
  [[ -n "$p" ]] || p=$(apt-cache search --names-only '^linux-image-6\.1\.[0-9.-]*-amd64$' 2>/dev/null | awk '{print $1}' | sort -V | tail -n 1)
  echo "$p"
}

kpkg=$(pick_kernel_pkg)
[[ "$kpkg" =~ ^linux-image-6\.1\.[0-9.-]+-amd64$ ]] ||
  missing "no linux-image-6.1.*-amd64 package known to apt (got '${kpkg}'): run 'apt-get update' with Debian 12 (bookworm) sources, or set KAGEMUSHA_GUEST_KERNEL_PKG"

kdir=""
for d in "$outdir"/kernels/"$kpkg"_*; do
  [[ -f "$d/complete" ]] && kdir=$d
done
if [[ -z "$kdir" || $refresh_kernel == 1 ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  say "downloading $kpkg (apt-get download, about 70 MB)"
  # _apt cannot write to a root-only temp dir; apt then downloads as root (fine).
  if ! (cd "$tmp" && apt-get download "$kpkg" >"$tmp/apt.log" 2>&1); then
    cat "$tmp/apt.log" >&2
    missing "'apt-get download $kpkg' failed. Check network access to the Debian mirror and run 'apt-get update'; or put a built guest into $outdir (KAGEMUSHA_GUEST_CACHE) from a machine that can"
  fi
  deb=$(ls "$tmp"/*.deb)
  kver=$(dpkg-deb -f "$deb" Version)
  say "extracting $kpkg $kver (dpkg -x, no install)"
  dpkg -x "$deb" "$tmp/x"
  uname_r=${kpkg#linux-image-}
  kdir="$outdir/kernels/${kpkg}_${kver}"
  rm -rf "$kdir"
  mkdir -p "$kdir/modules"
  cp "$tmp/x/boot/vmlinuz-$uname_r" "$kdir/vmlinuz"
  cp "$tmp/x/boot/config-$uname_r" "$kdir/config"
  mroot="$tmp/x/lib/modules/$uname_r/kernel"
  for i in "${!MODULES[@]}"; do
    f="$mroot/${MODDIRS[i]}/${MODULES[i]}.ko"
    [[ -f "$f" ]] || { f=$(find "$mroot" -name "${MODULES[i]}.ko*" | head -n 1); }
    [[ -n "$f" && -f "$f" ]] || { say "module ${MODULES[i]} not in $kpkg"; exit 1; }
    case "$f" in
      *.ko) cp "$f" "$kdir/modules/${MODULES[i]}.ko" ;;
      *.ko.xz) xz -dc "$f" >"$kdir/modules/${MODULES[i]}.ko" ;;
      *) say "unsupported module compression: $f"; exit 1 ;;
    esac
  done
  printf '%s\n' "$uname_r" >"$kdir/uname_r"
  printf '%s\n' "$kver" >"$kdir/version"
  touch "$kdir/complete"
  rm -rf "$tmp"
  trap - EXIT
fi
kver=$(cat "$kdir/version")
uname_r=$(cat "$kdir/uname_r")

# The load order must satisfy every module's dependencies.
loaded=" "
for m in "${MODULES[@]}"; do
  deps=$(modinfo -F depends "$kdir/modules/$m.ko" | tr ',' ' ')
  for d in $deps; do
    [[ "$loaded" == *" $d "* ]] || { say "load order broken: $m needs $d before it"; exit 1; }
  done
  [[ "$(modinfo -F vermagic "$kdir/modules/$m.ko")" == "$uname_r "* ]] || { say "$m is not built for $uname_r"; exit 1; }
  loaded+="$m "
done

# ---------------------------------------------------------------- up to date?
key=$( {
  sha256sum "$0" "$here/init" "$here/memtool.cc" | awk '{print $1}'
  echo "$kpkg $kver busybox-static $bb_ver $(g++ -dumpfullversion)"
} | sha256sum | awk '{print $1}')
if [[ -f "$outdir/manifest" && -f "$outdir/vmlinuz" && -f "$outdir/initrd.img" ]] &&
  grep -qx "input_sha256=$key" "$outdir/manifest"; then
  say "up to date: $outdir ($kpkg $kver)"
  echo "$outdir"
  exit 0
fi

# ---------------------------------------------------------------- initramfs
say "building the initramfs for $uname_r"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,root,lib/modules}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0755 "$here/init" "$root/init"
g++ -std=c++23 -O2 -static -pthread -Wall -Wextra -o "$root/bin/memtool" "$here/memtool.cc" ||
  { say "compiling memtool failed (static libstdc++ is in Debian's g++ and libc6-dev)"; exit 1; }
strip "$root/bin/memtool"
cp "$kdir"/modules/*.ko "$root/lib/modules/"
printf '%s\n' "${MODULES[@]}" >"$root/lib/modules/load-order"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner 0:0 --quiet) >"$work/initrd.img"
# The kernel opens /dev/console for /init's stdio before devtmpfs is mounted,
# so the archive needs that node. It goes into a second archive appended to
# the first (the kernel reads concatenated newc archives).
mkdir -p "$work/devroot/dev"
mknod -m 600 "$work/devroot/dev/console" c 5 1
(cd "$work/devroot" && printf 'dev/console\n' | cpio -o -H newc --owner 0:0 --quiet) >>"$work/initrd.img"

cp "$kdir/vmlinuz" "$work/vmlinuz"
# QEMU boots an ELF vmlinux with a PVH entry note directly: no real-mode
# setup and no in-guest XZ decompression, which under TCG on a busy machine
# is most of the boot (measured: 23 s to the boot marker with the bzImage,
# 5.4 s with the ELF). The ELF is the bzImage's payload, unpacked here.
pvh=no
py=python3
[[ ! -x /usr/bin/python3 ]] || py=/usr/bin/python3  # Debian's, with lzma
if "$py" - "$work/vmlinuz" "$work/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(1)
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit(1)
open(sys.argv[2], "wb").write(elf)
PY
then
  # XEN_ELFNOTE_PHYS32_ENTRY (18) is the PVH entry point.
  if LC_ALL=C readelf -n "$work/vmlinux" | grep -q 'Xen.*0x00000012'; then pvh=yes; else rm -f "$work/vmlinux"; fi
fi
[[ $pvh == yes ]] || say "no PVH ELF kernel could be extracted; guests boot the bzImage (slower)"
{
  echo "format=1"
  echo "built_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "kernel_package=$kpkg"
  echo "kernel_version=$kver"
  echo "kernel_release=$uname_r"
  echo "busybox_static=$bb_ver"
  echo "gxx=$(g++ -dumpfullversion)"
  echo "modules=${MODULES[*]}"
  echo "pvh_vmlinux=$pvh"
  echo "vmlinuz_bytes=$(stat -c %s "$work/vmlinuz")"
  [[ $pvh == no ]] || echo "vmlinux_bytes=$(stat -c %s "$work/vmlinux")"
  echo "initrd_bytes=$(stat -c %s "$work/initrd.img")"
  echo "memtool_bytes=$(stat -c %s "$root/bin/memtool")"
  echo "vmlinuz_sha256=$(sha256sum "$work/vmlinuz" | awk '{print $1}')"
  echo "initrd_sha256=$(sha256sum "$work/initrd.img" | awk '{print $1}')"
  echo "input_sha256=$key"
} >"$work/manifest"
# Replace the outputs, the manifest last: a build interrupted before that
# point is not mistaken for an up-to-date one.
rm -f "$outdir/manifest"
mv "$work/vmlinuz" "$outdir/vmlinuz"
rm -f "$outdir/vmlinux"
[[ $pvh == no ]] || mv "$work/vmlinux" "$outdir/vmlinux"
mv "$work/initrd.img" "$outdir/initrd.img"
mv "$work/manifest" "$outdir/manifest"
say "built $outdir: vmlinuz $(stat -c %s "$outdir/vmlinuz") bytes, initrd.img $(stat -c %s "$outdir/initrd.img") bytes ($kpkg $kver)"
echo "$outdir"

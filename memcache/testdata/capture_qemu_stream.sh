#!/bin/sh
# Captures a real QEMU migration stream of a small paused pc guest.
#   capture_qemu_stream.sh OUT precopy   -> migrate to "exec:cat > OUT"
#   capture_qemu_stream.sh OUT ignore-shared -> precopy with x-ignore-shared
#       (configuration capabilities subsection, RAMBlock addresses)
#   capture_qemu_stream.sh OUT postcopy  -> real postcopy into a second QEMU
#       (-incoming), the source->destination direction teed into OUT by socat.
# Exit 77 when qemu-system-x86_64 or socat is missing (test skips).
set -u
out=$1; mode=${2:-precopy}
command -v qemu-system-x86_64 >/dev/null || exit 77
command -v socat >/dev/null || exit 77
dir=$(mktemp -d /tmp/kgm-capture.XXXXXX)
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT INT TERM
# exec, so that $! of "qemu ... &" is QEMU itself and cleanup can kill it.
qemu() { exec qemu-system-x86_64 -machine pc -m 32 -nographic -nodefaults -display none "$@"; }
wait_sock() { i=0; while [ ! -S "$1" ] && [ $i -lt 100 ]; do sleep 0.02; i=$((i+1)); done; [ -S "$1" ]; }
# qmp SOCK CMD...: runs QMP commands, then polls query-migrate until a final state.
qmp() {
  s=$1; shift
  { echo '{"execute":"qmp_capabilities"}'; for c in "$@"; do echo "$c"; sleep 0.05; done
    i=0; while [ $i -lt 100 ]; do echo '{"execute":"query-migrate"}'; sleep 0.05; i=$((i+1));
      [ -f "$dir/done" ] && break; done; } |
    socat -t 5 - "UNIX-CONNECT:$s" | while IFS= read -r l; do
      case "$l" in *'"status": "completed"'*) touch "$dir/done"; echo completed;;
                   *'"status": "failed"'*) touch "$dir/done"; echo "$l" >&2;; esac; done | head -1
}
cap='{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}'
case "$mode" in
precopy|ignore-shared)
  qemu -S -qmp "unix:$dir/src,server=on,wait=off" & pids="$pids $!"
  wait_sock "$dir/src" || exit 1
  set_caps='{"execute":"query-status"}'
  [ "$mode" = ignore-shared ] && set_caps='{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"x-ignore-shared","state":true}]}}'
  r=$(qmp "$dir/src" "$set_caps" "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"exec:cat > $out\"}}")
  ;;
postcopy)
  qemu -S -qmp "unix:$dir/dst-qmp,server=on,wait=off" -incoming defer & pids="$pids $!"
  qemu -S -qmp "unix:$dir/src,server=on,wait=off" & pids="$pids $!"
  wait_sock "$dir/dst-qmp" && wait_sock "$dir/src" || exit 1
  printf '%s\n%s\n%s\n' '{"execute":"qmp_capabilities"}' "$cap" \
    "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"unix:$dir/dst\"}}" |
    socat -t 1 - "UNIX-CONNECT:$dir/dst-qmp" >/dev/null
  wait_sock "$dir/dst" || exit 1
  # socat's SYSTEM address splits on ':', so the forwarder lives in a script.
  printf '#!/bin/sh\ntee "%s" | socat - "UNIX-CONNECT:%s"\n' "$out" "$dir/dst" > "$dir/fwd.sh"
  chmod +x "$dir/fwd.sh"
  socat "UNIX-LISTEN:$dir/tee" "EXEC:$dir/fwd.sh" & pids="$pids $!"
  wait_sock "$dir/tee" || exit 1
  # Slow precopy down so that migrate-start-postcopy lands mid-stream.
  r=$(qmp "$dir/src" "$cap" \
      '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":300000}}' \
      "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$dir/tee\"}}" \
      '{"execute":"migrate-start-postcopy"}')
  ;;
*) echo "unknown mode $mode" >&2; exit 2;;
esac
[ "$r" = completed ] || { echo "migration did not complete" >&2; exit 1; }
sleep 0.1
exit 0

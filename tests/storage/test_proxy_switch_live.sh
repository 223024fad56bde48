#!/usr/bin/env bash
# A client stays connected across `kagemusha-nbd switch --wait`: one
# interactive qemu-io process (commands fed through a FIFO) does I/O before
# the fill, while `switch --wait` starts the stopped fill and waits for it
# (reads of unfetched blocks, writes, verifying reads), and after the switch
# with the remote gone. Its NBD
# socket is the same before and after (same socket inode in /proc, and the
# server's connection counters unchanged), every command succeeds, and the
# final md5 equals source + writes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
st_init nbdkit qemu-io nbdcopy stdbuf

src=$ST_DIR/src.img exp=$ST_DIR/expected.img cache=$ST_DIR/cache.img bitmap=$ST_DIR/bitmap
rsock=$ST_DIR/remote.sock psock=$ST_DIR/proxy.sock ctl=$ST_DIR/control.sock
st_make_image "$src" 96
cp --sparse=always "$src" "$exp"
st_nbdkit remote "$rsock" "$src" -r
st_nbd_serve proxy --unix "$psock" --control "$ctl" \
  --proxy "$(st_proxy_spec live "$(st_uri_unix "$rsock")" "$cache" "$bitmap" "block-size=65536,no-fill")"
uri=$(st_uri_unix "$psock" live)

fifo=$ST_DIR/qemu-io.fifo out=$ST_DIR/session.out
mkfifo "$fifo"
: >"$out"
stdbuf -oL qemu-io -f raw "$uri" <"$fifo" >"$out" 2>&1 &
qio=$!
tb_on_cleanup sh -c "kill $qio 2>/dev/null || true"
exec {QIO_FD}>"$fifo"

# send CMD [WANT] : one command; qemu-io prints its prompt again when the
# command has finished, so wait for prompt number n+1, then check that
# nothing failed and (for reads/writes) that WANT was printed by it.
n_sent=0
prompts() { grep -o 'qemu-io> ' "$out" | wc -l; }
send() {
  local cmd=$1 want=${2:-} i
  local before; before=$(wc -c <"$out")
  echo "$cmd" >&"$QIO_FD"
  n_sent=$((n_sent + 1))
  for ((i = 0; i < 600; i++)); do
    (($(prompts) >= n_sent + 1)) && break
    kill -0 "$qio" 2>/dev/null || { cat "$out"; tb_fail "qemu-io exited during '$cmd'"; }
    sleep 0.1
  done
  (($(prompts) >= n_sent + 1)) || { cat "$out"; tb_fail "qemu-io: '$cmd' did not finish"; }
  if grep -q -i -E 'fail|error|mismatch' "$out"; then cat "$out"; tb_fail "qemu-io: '$cmd' failed"; fi
  if [[ -n $want ]]; then
    tail -c +$((before + 1)) "$out" | grep -q -E "$want" || { cat "$out"; tb_fail "qemu-io: no '$want' for '$cmd'"; }
  fi
  st_log "qemu-io: $cmd ok"
}
sockets_of() { local f; for f in /proc/"$1"/fd/*; do readlink "$f"; done 2>/dev/null | grep '^socket:' | sort; }
conn_total() { st_status "$ctl" | st_json_get connections_total 2>/dev/null || echo "n/a"; }

# Phase 1: proxy mode, remote present, nothing fetched yet.
send "write -P 0x31 0 64k" "wrote 65536"
send "read -P 0x31 0 64k" "read 65536"
send "write -P 0x32 5M 4k" "wrote 4096"   # partial block: needs the remote's block
send "read -P 0x32 5M 4k" "read 4096"
send "flush"
st_apply_pattern "$exp" 0 65536 0x31
st_apply_pattern "$exp" $((5 << 20)) 4096 0x32
socks_before=$(sockets_of "$qio")
[[ -n $socks_before ]] || tb_fail "qemu-io has no socket (not connected?)"
conns_before=$(conn_total)
st_assert_eq "mode before switch" proxy "$(st_status_get "$ctl" mode)"

# `switch --wait` while the fill is still to run (it starts the stopped fill,
# follows it and switches); the session keeps doing I/O meanwhile.
"$ST_NBD" fill rate 24M --control "$ctl"
"$ST_NBD" switch --control "$ctl" --wait >"$ST_DIR/switch.out" 2>&1 &
switch_pid=$!
during=0
for off in 95M 60M 30M 75M 45M 15M; do
  send "read $off 64k" "read 65536"
  send "write -P 0x34 $off 4k" "wrote 4096"
  send "read -P 0x34 ${off} 4k" "read 4096"
  st_apply_pattern "$exp" $((${off%M} << 20)) 4096 0x34
  kill -0 "$switch_pid" 2>/dev/null && during=$((during + 1))
done
st_log "$during of 6 I/O rounds ran while switch --wait was still waiting"
rc=0; wait "$switch_pid" || rc=$?
cat "$ST_DIR/switch.out"
st_assert_eq "switch --wait exit status" 0 "$rc"
st_assert_eq "mode after switch" target "$(st_status_get "$ctl" mode)"
st_stop remote   # the target must not need the remote any more

# Phase 2: same qemu-io process, same connection.
send "read -P 0x31 0 64k" "read 65536"
send "read -P 0x32 5M 4k" "read 4096"
send "write -P 0x33 90M 128k" "wrote 131072"
send "read -P 0x33 90M 128k" "read 131072"
send "flush"
st_apply_pattern "$exp" $((90 << 20)) 131072 0x33
socks_after=$(sockets_of "$qio")
st_assert_eq "qemu-io NBD socket inode unchanged across the switch" "$socks_before" "$socks_after"
st_assert_eq "server connections_total unchanged across the switch" "$conns_before" "$(conn_total)"
echo "quit" >&"$QIO_FD"
exec {QIO_FD}>&-
rc=0; wait "$qio" || rc=$?
st_assert_eq "qemu-io exit status" 0 "$rc"
grep -q -i -E 'fail|error|mismatch|reconnect' "$out" && { cat "$out"; tb_fail "qemu-io reported a problem"; }
st_assert_eq "final md5 (source + writes)" "$(st_md5_file "$exp")" "$(st_md5_uri "$uri")"
st_pass

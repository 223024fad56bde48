#!/usr/bin/env bash
# Postcopy through the memcache proxies: both QEMUs get postcopy-ram, the
# source is slowed to 4 MB/s so the switch happens mid-precopy, and while
# postcopy runs the destination reads all of its RAM (pmemsave), which
# faults in pages the source has not sent yet: QEMU asks for them over the
# return path, which the decoder and encoder relay backwards. The migration
# must complete, the page requests must have happened (query-migrate
# postcopy-requests > 0, return-path bytes relayed), and the memory must be
# identical. Then the return hop B -> A, also postcopy, reuses A's pages in
# its precopy phase.
set -euo pipefail
# shellcheck source=proxy_lib.sh
source "$(dirname "$0")/proxy_lib.sh"
mp_init

mp_qemu A
mp_qemu B -S -incoming tcp:127.0.0.1:5003
mp_set_caps A
mp_set_caps B
# 4 MB/s before and after the switch: the postcopy phase lasts seconds.
mp_qmp A '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":4194304,"max-postcopy-bandwidth":4194304}}' >/dev/null
mp_proxy decode B 5002 5003
DEC1=$MP_PROXY_LOG
mp_proxy encode A 5001 5002
ENC1=$MP_PROXY_LOG
mp_qmp A '{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:5001"}}' >/dev/null
sleep 0.5
[[ $(mp_migstatus A) == active ]] || tb_fail "precopy not active: $(mp_migstatus A)"
mp_qmp A '{"execute":"migrate-start-postcopy"}' >/dev/null
# Demand-fault every page on B while postcopy is still sending. B's incoming
# side must have switched first: a dump taken before that reads its RAM
# without faulting, so no page is requested.
for i in $(seq 1 200); do
  [[ $(mp_migstatus B) == postcopy-active ]] && break
  sleep 0.02
done
[[ $(mp_migstatus B) == postcopy-active ]] || tb_fail "B never entered postcopy: $(mp_migstatus B)"
mp_dump B "$TB_DIR/b1.bin"
for i in $(seq 1 600); do
  st=$(mp_migstatus A)
  [[ $st == completed || $st == failed ]] && break
  sleep 0.05
done
[[ $st == completed ]] || tb_fail "postcopy A->B: $st; $(cat "$ENC1" "$DEC1")"
reqs=$(mp_qmp A '{"execute":"query-migrate"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["ram"]["postcopy-requests"])')
tb_wait_log "$ENC1" '"event":"migration-done"' 20 || tb_fail "encoder: $(cat "$ENC1")"
tb_wait_log "$DEC1" '"event":"migration-done"' 20 || tb_fail "decoder: $(cat "$DEC1")"
rp=$(mp_json_field "$ENC1" migration-done return_bytes)
pcp=$(mp_json_field "$ENC1" migration-done postcopy_pages)
tb_log "postcopy A->B: $reqs page requests, $rp return-path bytes relayed, $pcp pages after the switch"
((reqs > 0)) || tb_fail "no postcopy page requests (the test did not exercise the return path)"
((rp > 0)) || tb_fail "no return-path bytes went through the proxies"
((pcp > 0)) || tb_fail "no pages after the postcopy switch"
mp_dump A "$TB_DIR/a1.bin"
cmp -s "$TB_DIR/a1.bin" "$TB_DIR/b1.bin" || tb_fail "postcopy hop: memory differs"
mp_quit A

# Return hop B -> A2, postcopy too: precopy-phase pages go by reference.
mp_qemu A2 -S -incoming tcp:127.0.0.1:6003
mp_set_caps A2
mp_set_caps B
mp_proxy decode A 6002 6003
DEC2=$MP_PROXY_LOG
mp_proxy encode B 6001 6002
ENC2=$MP_PROXY_LOG
st=$(mp_migrate B 6001 postcopy)
[[ $st == completed ]] || tb_fail "postcopy B->A: $st; $(cat "$ENC2" "$DEC2")"
tb_wait_log "$ENC2" '"event":"migration-done"' 20 || tb_fail "encoder: $(cat "$ENC2")"
mp_dump A2 "$TB_DIR/a2.bin"
cmp -s "$TB_DIR/b1.bin" "$TB_DIR/a2.bin" || tb_fail "return hop: memory differs"
refs=$(mp_json_field "$ENC2" migration-done ref_pages)
q2=$(mp_json_field "$ENC2" migration-done qemu_bytes)
w2=$(mp_json_field "$ENC2" migration-done wan_bytes_out)
tb_log "postcopy B->A: $refs pages by reference, WAN $w2 B for a $q2 B stream"
echo "PASS: postcopy through the proxies both ways ($reqs page requests relayed), memory identical"

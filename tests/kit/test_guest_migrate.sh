#!/usr/bin/env bash
# Self-test of the migration helpers and of memtool, the guest memory
# witness: a guest fills 64 MiB with a seeded pattern, is migrated with
# precopy (a -> b), then with postcopy while memtool keeps dirtying its
# pages (b -> c), and memtool verify must find every page intact on each
# destination. Finally the witness is shown able to fail: pages corrupted
# behind its checksums must be reported BAD, with their exact count.
# The guests run on one host namespace with a bridge; the migration stream
# goes over the namespace's TCP (IPv6 on the bridge address).
set -euo pipefail
src=${KAGEMUSHA_SOURCE:-$(cd "$(dirname "$0")/../.." && pwd)}
source "$src/tests/kit/testbed.sh"
source "$src/tests/kit/qemu.sh"
tb_require_cmd qemu-system-x86_64
tb_init
kq_guest_image

tb_host hv
# A fixed bridge MAC: by default a bridge takes the lowest MAC of its ports,
# so it would change when the source's tap goes, and the guest's neighbour
# entry for the host would point at a MAC that no longer exists.
tb_exec hv ip link add br0 address 02:00:00:00:01:01 type bridge
tb_exec hv ip link set br0 up
tb_addr hv br0 2001:db8:1::1/64
tb_addr hv br0 192.0.2.1/24
append="kgm.ip6=2001:db8:1::100/64 kgm.gw6=2001:db8:1::1 kgm.ip4=192.0.2.100/24"

expect_ok() {  # NAME WHAT
  local out rc=0
  out=$(kq_guest "$1" memtool verify) || rc=$?
  tb_log "$1 ($2): $out"
  [[ $rc == 0 && "$out" == "OK "* ]] || tb_fail "memory check on $1 ($2): exit $rc: $out"
  VERIFY_LINE=$out
}

kq_start a --ns hv --bridge br0 --mem 256 --append "$append"
kq_wait_boot a >/dev/null
fill=$(kq_guest a memtool fill 64 4242) || tb_fail "memtool fill failed: $fill"
tb_log "a: $fill"
expect_ok a "after fill"
kq_guest a 'ping -c 2 -W 5 2001:db8:1::1' >/dev/null || tb_fail "a cannot reach the host over the bridge"

# 1. Precopy, a -> b.
kq_start b --ns hv --bridge br0 --like a --incoming "tcp:[2001:db8:1::1]:4441"
kq_migrate a "tcp:[2001:db8:1::1]:4441"
pre=$(kq_wait_migration a --dst b --timeout 120) || tb_fail "precopy a -> b: $pre"
tb_log "precopy a -> b: $pre"
[[ "$(kq_status a)" == postmigrate ]] || tb_fail "source a is '$(kq_status a)' after migrating, expected postmigrate"
kq_stop a
expect_ok b "after precopy"
kq_guest b 'ping -c 2 -W 5 2001:db8:1::1' >/dev/null || tb_fail "b has no network after the migration"

# 2. Postcopy with dirtying, b -> c. The precopy bandwidth cap keeps precopy
# from finishing before the switch; the postcopy cap makes the background
# push take about 2 s, during which the dirtier touches pages that are not
# there yet, so pages really are fetched on demand.
kq_guest b memtool dirty 25 >/dev/null
before=$(kq_guest b memtool status)
tb_log "b: $before"
kq_start c --ns hv --bridge br0 --like b --incoming "tcp:[2001:db8:1::1]:4442" --postcopy
kq_migrate b "tcp:[2001:db8:1::1]:4442" --postcopy --max-bandwidth 16 --max-postcopy-bandwidth 64
post=$(kq_wait_migration b --dst c --timeout 180) || tb_fail "postcopy b -> c: $post"
tb_log "postcopy b -> c: $post"
pbytes=$(tb_field postcopy_bytes "$post")
((pbytes > 0)) || tb_fail "nothing was sent in postcopy: $post"
reqs=$(tb_field postcopy_requests "$post")
((reqs > 0)) || tb_fail "no page was requested in postcopy ($post)"
kq_stop b
expect_ok c "after postcopy, dirtying"
d1=$(tb_field dirtied "$VERIFY_LINE")
expect_ok c "dirtying goes on"
d2=$(tb_field dirtied "$VERIFY_LINE")
((d2 > d1)) || tb_fail "memtool stopped dirtying on c (dirtied $d1 then $d2)"
((d1 > $(tb_field dirtied "${before#STATUS }"))) || tb_fail "no page was dirtied across the migration"

# 3. The witness can fail: 5 pages corrupted behind its checksums.
kq_guest c memtool dirty 0 >/dev/null   # a rewrite would repair a corrupted page
kq_guest c memtool selftest-corrupt 5 >/dev/null
rc=0
bad=$(kq_guest c memtool verify) || rc=$?
tb_log "c after corrupting 5 pages: $bad"
[[ $rc == 1 && "$bad" == "BAD "* ]] || tb_fail "corrupted memory was not reported (exit $rc): $bad"
[[ "$(tb_field bad "${bad#BAD }")" == 5 ]] || tb_fail "expected bad=5: $bad"
kq_guest c memtool stop >/dev/null
echo "PASS: precopy ($pre) and postcopy under dirtying ($post) kept 64 MiB intact; corruption detected"

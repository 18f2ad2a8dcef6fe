#!/bin/sh
# run-scenarios.sh: the cluster scenarios of the replication work, run over
# ssh against the two VMs of make-vms.sh (after install.sh), with a PASS or
# FAIL line for each and a summary.  Exits 0 only if every scenario passed.
# A scenario runs only if the ones before it passed (each builds on the
# state the previous one left); the others are reported as SKIP.
#
#   1 module      geom_hast is loaded and /dev/hastctl exists on both
#   2 start       hastctl create, hastd started by rc.d/hastd (onestart)
#   3 roles       A secondary... B primary: connected, /dev/hast/data on A only
#   4 write       16 MiB written on the primary reach the secondary's disk
#   5 safe        hastctl role primary on the secondary is refused while the
#                 primary is up; the secondary reconnects afterwards
#   6 kill        kill -9 of the primary's hastd; B promoted (safe form
#                 allowed: peer unreachable) serves the same 16 MiB
#   7 degraded    B writes 16 MiB more while A is down
#   8 resync      A back as secondary: B completes, A's disk holds both
#   9 failover    newfs + mount on B, hast-failover demote on B, promote on
#                 A: the file is there; promote on B is then refused
#  10 splitbrain  both primary apart and written: the nodes refuse to
#                 connect; recovery (init, create, secondary) resyncs B from A
set -u
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/bhyve/lib.sh
. "$here/lib.sh"
check_names
# shellcheck disable=SC2086
set -- $HAST_VM_NAMES
A=$1
B=$2
MiB=1048576
results=""
failed=0
skip=0

log() {
	printf '    %s\n' "$*"
}

on() {
	vm_ssh "$@"
}

ctl() {
	_vm=$1
	shift
	on "$_vm" /usr/local/sbin/hastctl "$@"
}

# wait_list VM TEXT [SECONDS]: until "hastctl list data" on VM shows TEXT.
wait_list() {
	_n=0
	while ! ctl "$1" list data 2>/dev/null | grep -qF "$2"; do
		_n=$((_n + 1))
		if [ "$_n" -ge "${3:-60}" ]; then
			log "$1: '$2' not shown after ${3:-60}s:"
			ctl "$1" list data 2>&1 | sed 's/^/      /'
			return 1
		fi
		sleep 1
	done
	return 0
}

# wait_synced VM SECONDS: nothing dirty and no resync progress line (dirty
# reaches 0 a moment before the resync ends: the peer's flush, the counters).
wait_synced() {
	wait_list "$1" "dirty: 0 " "$2" || return 1
	_n=0
	while ctl "$1" list data 2>/dev/null | grep -qF "synchronization:"; do
		_n=$((_n + 1))
		if [ "$_n" -ge "$2" ]; then
			log "$1: the resync did not end after $2s"
			return 1
		fi
		sleep 1
	done
	return 0
}

# wait_idle VM: the primary has nothing in flight.
wait_idle() {
	wait_list "$1" "queues: local: 0, send: 0, recv: 0, done: 0" 30
}

# write_pattern VM NAME OFFSET_MIB: 16 MiB of random data into
# /dev/hast/data at OFFSET_MIB; prints its sha256.
write_pattern() {
	on "$1" "dd if=/dev/random of=/root/$2 bs=1m count=16 2>/dev/null &&
	    dd if=/root/$2 of=/dev/hast/data bs=1m oseek=$3 conv=notrunc \
	    2>/dev/null && sha256 -q /root/$2"
}

# served_sha VM OFFSET_MIB: sha256 of 16 MiB read through /dev/hast/data.
served_sha() {
	on "$1" "dd if=/dev/hast/data bs=1m iseek=$2 count=16 2>/dev/null |
	    sha256 -q"
}

# disk_sha VM OFFSET_MIB: sha256 of the same 16 MiB read from the local
# provider of VM (data offset + localoff), as a secondary holds it.
disk_sha() {
	on "$1" "dd if=/dev/vtbd1 bs=512 iseek=$(( (localoff + $2 * MiB) / 512 )) \
	    count=32768 2>/dev/null | sha256 -q"
}

hastd_start() {
	on "$1" service hastd onestart >/dev/null
}

hastd_kill9() {
	on "$1" 'kill -9 "$(cat /var/run/hastd.pid)"'
}

s_module() {
	for vm in "$A" "$B"; do
		on "$vm" 'kldload -n geom_hast && kldstat -q -n geom_hast &&
		    test -c /dev/hastctl' || { log "$vm: no module"; return 1; }
	done
}

s_start() {
	for vm in "$A" "$B"; do
		on "$vm" "cat > /etc/hast.conf" <<CONF
resource data {
	on $A {
		local /dev/vtbd1
		remote $(vm_ip "$B")
	}
	on $B {
		local /dev/vtbd1
		remote $(vm_ip "$A")
	}
}
CONF
		on "$vm" "cat > /usr/local/etc/hast-failover.conf" <<CONF
resources="data"
fstype="ufs"
mountpoint_data="/hast/data"
hastctl="/usr/local/sbin/hastctl"
device_timeout=30
unmount_timeout=10
CONF
		ctl "$vm" create data || return 1
		hastd_start "$vm" || { log "$vm: service hastd onestart failed"; return 1; }
		ctl "$vm" status >/dev/null || return 1
	done
	localoff=$(ctl "$A" dump data | awk '$1 == "localoff:" { print $2 }')
	log "localoff $localoff"
	[ -n "$localoff" ]
}

s_roles() {
	ctl "$B" role secondary data || return 1
	ctl "$A" role primary data || return 1
	wait_list "$A" "status: complete" || return 1
	on "$A" test -c /dev/hast/data || { log "$A: no /dev/hast/data"; return 1; }
	if on "$B" test -e /dev/hast/data; then
		log "$B (secondary) has /dev/hast/data"
		return 1
	fi
}

s_write() {
	p1=$(write_pattern "$A" p1 0) || return 1
	wait_idle "$A" || return 1
	got=$(disk_sha "$B" 0)
	log "written $p1, on $B's disk $got"
	[ "$p1" = "$got" ]
}

s_safe() {
	ctl "$B" role init data || return 1
	if ctl "$B" role primary data; then
		log "$B was promoted while $A is primary"
		ctl "$B" role init data
		return 1
	fi
	log "refused, as it should be"
	ctl "$B" role secondary data || return 1
	wait_list "$A" "status: complete"
}

s_kill() {
	hastd_kill9 "$A" || return 1
	sleep 2
	ctl "$B" role primary data || return 1
	n=0
	until on "$B" test -c /dev/hast/data; do
		n=$((n + 1))
		[ "$n" -lt 30 ] || { log "$B: no /dev/hast/data"; return 1; }
		sleep 1
	done
	got=$(served_sha "$B" 0)
	log "served by $B: $got (written $p1)"
	[ "$got" = "$p1" ]
}

s_degraded() {
	p2=$(write_pattern "$B" p2 64) || return 1
	wait_list "$B" "status: degraded" 5 || return 1
	got=$(served_sha "$B" 64)
	[ "$got" = "$p2" ]
}

s_resync() {
	hastd_start "$A" || return 1
	ctl "$A" role secondary data || return 1
	wait_list "$B" "status: complete" 60 || return 1
	wait_synced "$B" 120 || return 1
	wait_idle "$B" || return 1
	got1=$(disk_sha "$A" 0)
	got2=$(disk_sha "$A" 64)
	log "$A's disk: $got1 $got2"
	[ "$got1" = "$p1" ] && [ "$got2" = "$p2" ]
}

s_failover() {
	on "$B" 'newfs -U /dev/hast/data >/dev/null && mkdir -p /hast/data &&
	    mount /dev/hast/data /hast/data &&
	    echo "written on '"$B"'" > /hast/data/marker && sync' || return 1
	on "$B" /usr/local/sbin/hast-failover demote || return 1
	if on "$B" 'mount -p | grep -q " /hast/data "'; then
		log "$B: still mounted after demote"
		return 1
	fi
	wait_list "$B" "role: secondary" 5 || return 1
	on "$A" /usr/local/sbin/hast-failover promote || return 1
	got=$(on "$A" cat /hast/data/marker) || return 1
	log "$A reads: $got"
	[ "$got" = "written on $B" ] || return 1
	if on "$B" /usr/local/sbin/hast-failover promote; then
		log "$B promoted itself while $A is primary"
		return 1
	fi
	if on "$B" 'mount -p | grep -q " /hast/data "'; then
		log "$B mounted after a refused promotion"
		return 1
	fi
	log "promotion of $B refused, nothing mounted"
	on "$B" /usr/local/sbin/hastctl role secondary data
}

s_splitbrain() {
	on "$A" umount /hast/data || return 1
	wait_list "$A" "status: complete" 30 || return 1
	ctl "$B" role init data || return 1
	ctl "$B" role --force primary data || return 1
	p3=$(write_pattern "$A" p3 128) || return 1
	write_pattern "$B" p4 128 >/dev/null || return 1
	ctl "$B" role secondary data || return 1
	sleep 15
	if ctl "$A" list data | grep -qF "status: complete"; then
		log "$A connected to $B after a split-brain"
		return 1
	fi
	if ! on "$A" grep -qi split-brain /var/log/messages &&
	    ! on "$B" grep -qi split-brain /var/log/messages; then
		log "no split-brain message in either log"
		return 1
	fi
	log "split-brain detected; recovering $B from $A"
	ctl "$B" role init data || return 1
	ctl "$B" create data || return 1
	ctl "$B" role secondary data || return 1
	wait_list "$A" "status: complete" 60 || return 1
	wait_synced "$A" 300 || return 1
	wait_idle "$A" || return 1
	got=$(disk_sha "$B" 128)
	log "$B's disk: $got (written on $A: $p3)"
	[ "$got" = "$p3" ]
}

scenario() {
	name=$1
	if [ "$skip" -eq 1 ]; then
		results="$results
SKIP  $name"
		return
	fi
	say "$name"
	if "s_$name"; then
		results="$results
PASS  $name"
	else
		results="$results
FAIL  $name"
		failed=$((failed + 1))
		skip=1
	fi
}

reset() {
	for vm in "$A" "$B"; do
		on "$vm" 'umount -f /hast/data 2>/dev/null
		    if [ -f /var/run/hastd.pid ]; then
			    kill -9 "$(cat /var/run/hastd.pid)" 2>/dev/null
		    fi
		    sleep 1; true'
	done
}

for vm in "$A" "$B"; do
	wait_ssh "$vm" 10 || die "$vm is not reachable; run make-vms.sh start"
done
localoff=""
p1=""
p2=""
reset
for s in module start roles write safe kill degraded resync failover \
    splitbrain; do
	scenario "$s"
done
echo
echo "Results ($A, $B):$results"
if [ "$failed" -eq 0 ]; then
	echo "all scenarios passed"
	exit 0
fi
echo "$failed scenario(s) failed; logs: /var/log/messages in the VMs"
exit 1

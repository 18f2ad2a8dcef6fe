#!/bin/sh
# lib.sh: settings and helpers shared by the bhyve scripts (sourced).
# Every setting can be overridden from the environment.

: "${HAST_VM_DIR:=/var/tmp/hast-bhyve}"	# disks, keys, logs, pidfiles
: "${HAST_VM_IMAGE:=}"				# the FreeBSD VM image (UFS, raw)
: "${HAST_VM_NAMES:=hast1 hast2}"		# exactly two VMs
: "${HAST_VM_CPUS:=2}"
: "${HAST_VM_MEM:=2G}"
: "${HAST_VM_DISK:=8G}"				# root disk grown to this size
: "${HAST_VM_DATA:=1G}"				# the HAST local provider (vtbd1)
: "${HAST_VM_BRIDGE:=bridge77}"
: "${HAST_VM_NET:=10.77.0}"			# host .1, VMs .11 and .12
: "${HAST_VM_TAP_BASE:=77}"			# tap77, tap78
: "${HAST_VM_NMDM_BASE:=77}"			# /dev/nmdm77A, /dev/nmdm78A

HAST_VM_KEY="$HAST_VM_DIR/id_ed25519"

die() {
	echo "$(basename "$0"): $*" >&2
	exit 1
}

say() {
	printf '==> %s\n' "$*"
}

# vm_index NAME: 0 or 1.
vm_index() {
	_i=0
	for _n in $HAST_VM_NAMES; do
		[ "$_n" = "$1" ] && { echo "$_i"; return 0; }
		_i=$((_i + 1))
	done
	die "unknown VM $1 (HAST_VM_NAMES=$HAST_VM_NAMES)"
}

vm_ip() {
	echo "$HAST_VM_NET.$((11 + $(vm_index "$1")))"
}

vm_tap() {
	echo "tap$((HAST_VM_TAP_BASE + $(vm_index "$1")))"
}

vm_nmdm() {
	echo "/dev/nmdm$((HAST_VM_NMDM_BASE + $(vm_index "$1")))"
}

# vm_ssh NAME COMMAND...: run a command as root in the VM.
vm_ssh() {
	_vm=$1
	shift
	ssh -i "$HAST_VM_KEY" -o BatchMode=yes -o ConnectTimeout=5 \
	    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
	    -o LogLevel=ERROR "root@$(vm_ip "$_vm")" "$@"
}

# wait_ssh NAME SECONDS
wait_ssh() {
	_t=0
	while ! vm_ssh "$1" true 2>/dev/null; do
		_t=$((_t + 2))
		[ "$_t" -lt "$2" ] || return 1
		sleep 2
	done
	return 0
}

check_names() {
	set -- $HAST_VM_NAMES
	[ $# -eq 2 ] || die "HAST_VM_NAMES must name exactly two VMs"
}

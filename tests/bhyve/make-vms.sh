#!/bin/sh
# make-vms.sh: build and run the two bhyve VMs of the hast cluster tests.
#
#   make-vms.sh create   copy the image twice, grow it, configure each copy
#                        (hostname, static address, sshd with a fresh key,
#                        serial console), make the data disks
#   make-vms.sh start    network (bridge + taps), consoles (nmdm), boot both
#   make-vms.sh stop     power both off (bhyvectl --destroy)
#   make-vms.sh destroy  stop, remove the network and $HAST_VM_DIR
#   make-vms.sh status
#
# Run as root on a FreeBSD host with bhyve (vmm.ko).  The image is a raw
# FreeBSD VM image with a UFS root, e.g. FreeBSD-14.1-RELEASE-amd64.raw from
# the official VM-IMAGES directory (uncompressed): HAST_VM_IMAGE=/path/to/it.
# See README.md; settings are in lib.sh.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/bhyve/lib.sh
. "$here/lib.sh"

[ "$(uname -s)" = FreeBSD ] || die "bhyve needs a FreeBSD host"
[ "$(id -u)" -eq 0 ] || die "run as root"
check_names

# The freebsd-ufs partition of an attached md device, e.g. md0p4.
ufs_partition() {
	gpart show -p "$1" | awk '$4 == "freebsd-ufs" { print $3; exit }'
}

configure_image() {
	vm=$1
	img=$2
	md=$(mdconfig -a -t vnode -f "$img")
	mnt=$(mktemp -d "$HAST_VM_DIR/mnt.XXXXXX")
	# shellcheck disable=SC2064
	trap "umount '$mnt' 2>/dev/null; mdconfig -d -u '$md'; rmdir '$mnt'" EXIT
	# Grow the root partition and file system into the enlarged image.
	gpart recover "$md" >/dev/null 2>&1 || true
	part=$(ufs_partition "$md")
	[ -n "$part" ] || die "$img: no freebsd-ufs partition (a UFS image is needed)"
	idx=${part##*p}
	gpart resize -i "$idx" "$md" >/dev/null
	growfs -y "/dev/$part" >/dev/null
	mount "/dev/$part" "$mnt"

	ip=$(vm_ip "$vm")
	cat >> "$mnt/etc/rc.conf" <<RC
hostname="$vm"
ifconfig_vtnet0="inet $ip/24"
defaultrouter="$HAST_VM_NET.1"
sshd_enable="YES"
growfs_enable="NO"
RC
	[ -r /etc/resolv.conf ] && cp /etc/resolv.conf "$mnt/etc/resolv.conf"
	cat >> "$mnt/boot/loader.conf" <<LOADER
autoboot_delay="2"
console="comconsole"
LOADER
	mkdir -p "$mnt/root/.ssh"
	chmod 700 "$mnt/root/.ssh"
	cp "$HAST_VM_KEY.pub" "$mnt/root/.ssh/authorized_keys"
	chmod 600 "$mnt/root/.ssh/authorized_keys"
	echo "PermitRootLogin prohibit-password" >> "$mnt/etc/ssh/sshd_config"
	umount "$mnt"
	mdconfig -d -u "$md"
	rmdir "$mnt"
	trap - EXIT
}

create() {
	[ -n "$HAST_VM_IMAGE" ] || die "set HAST_VM_IMAGE to a raw FreeBSD VM image"
	[ -r "$HAST_VM_IMAGE" ] || die "cannot read $HAST_VM_IMAGE"
	mkdir -p "$HAST_VM_DIR"
	if [ ! -f "$HAST_VM_KEY" ]; then
		ssh-keygen -q -t ed25519 -N '' -C hast-bhyve -f "$HAST_VM_KEY"
	fi
	for vm in $HAST_VM_NAMES; do
		say "creating $vm ($(vm_ip "$vm"))"
		cp "$HAST_VM_IMAGE" "$HAST_VM_DIR/$vm.img"
		truncate -s "$HAST_VM_DISK" "$HAST_VM_DIR/$vm.img"
		configure_image "$vm" "$HAST_VM_DIR/$vm.img"
		rm -f "$HAST_VM_DIR/$vm-data.img"
		truncate -s "$HAST_VM_DATA" "$HAST_VM_DIR/$vm-data.img"
	done
	say "created in $HAST_VM_DIR; next: $0 start"
}

network_up() {
	kldload -n vmm nmdm if_bridge if_tuntap 2>/dev/null ||
	    kldload -n vmm nmdm if_bridge if_tap
	sysctl -q net.link.tap.up_on_open=1 >/dev/null
	if ! ifconfig "$HAST_VM_BRIDGE" >/dev/null 2>&1; then
		ifconfig "$HAST_VM_BRIDGE" create
		ifconfig "$HAST_VM_BRIDGE" inet "$HAST_VM_NET.1/24" up
	fi
	for vm in $HAST_VM_NAMES; do
		tap=$(vm_tap "$vm")
		ifconfig "$tap" >/dev/null 2>&1 || ifconfig "$tap" create
		ifconfig "$tap" up
		ifconfig "$HAST_VM_BRIDGE" | grep -q "member: $tap " ||
		    ifconfig "$HAST_VM_BRIDGE" addm "$tap"
	done
}

# The boot loop of one VM: bhyveload + bhyve until bhyve exits with a
# status other than 0 (0 = the guest rebooted).
boot_loop() {
	vm=$1
	nmdm=$(vm_nmdm "$vm")
	while :; do
		bhyveload -m "$HAST_VM_MEM" -d "$HAST_VM_DIR/$vm.img" \
		    -c "${nmdm}A" "$vm" || break
		rc=0
		bhyve -c "$HAST_VM_CPUS" -m "$HAST_VM_MEM" -A -H -P \
		    -s 0:0,hostbridge -s 1:0,lpc \
		    -s 2:0,virtio-net,"$(vm_tap "$vm")" \
		    -s 3:0,virtio-blk,"$HAST_VM_DIR/$vm.img" \
		    -s 4:0,virtio-blk,"$HAST_VM_DIR/$vm-data.img" \
		    -l com1,"${nmdm}A" "$vm" || rc=$?
		[ "$rc" -eq 0 ] || break
	done
	bhyvectl --destroy --vm="$vm" 2>/dev/null || true
}

start() {
	[ -f "$HAST_VM_KEY" ] || die "no VMs in $HAST_VM_DIR; run $0 create first"
	network_up
	for vm in $HAST_VM_NAMES; do
		if [ -e "/dev/vmm/$vm" ]; then
			say "$vm is already running"
			continue
		fi
		say "starting $vm (console: cu -l $(vm_nmdm "$vm")B)"
		daemon -p "$HAST_VM_DIR/$vm.pid" -o "$HAST_VM_DIR/$vm.log" \
		    /bin/sh "$0" boot-loop "$vm"
	done
	for vm in $HAST_VM_NAMES; do
		say "waiting for ssh on $vm"
		wait_ssh "$vm" 300 || die "$vm: no ssh after 300s; see the console"
	done
	say "both VMs are up"
}

stop() {
	for vm in $HAST_VM_NAMES; do
		if [ -f "$HAST_VM_DIR/$vm.pid" ]; then
			kill "$(cat "$HAST_VM_DIR/$vm.pid")" 2>/dev/null || true
			rm -f "$HAST_VM_DIR/$vm.pid"
		fi
		if [ -e "/dev/vmm/$vm" ]; then
			say "powering off $vm"
			bhyvectl --force-poweroff --vm="$vm" 2>/dev/null || true
			bhyvectl --destroy --vm="$vm" 2>/dev/null || true
		fi
	done
}

destroy() {
	stop
	for vm in $HAST_VM_NAMES; do
		ifconfig "$(vm_tap "$vm")" destroy 2>/dev/null || true
	done
	ifconfig "$HAST_VM_BRIDGE" destroy 2>/dev/null || true
	rm -rf "$HAST_VM_DIR"
}

status() {
	for vm in $HAST_VM_NAMES; do
		if [ -e "/dev/vmm/$vm" ]; then
			state=running
		else
			state=stopped
		fi
		echo "$vm $(vm_ip "$vm") $state console $(vm_nmdm "$vm")B"
	done
}

case "${1:-}" in
create) create ;;
start) start ;;
stop) stop ;;
destroy) destroy ;;
status) status ;;
boot-loop) boot_loop "$2" ;;
*) echo "usage: $0 create|start|stop|destroy|status" >&2; exit 64 ;;
esac

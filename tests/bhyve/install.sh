#!/bin/sh
# install.sh: put this build of hast into both VMs.
#
# Copies the source tree (without target/) to /root/hast in each VM, builds
# hastd and hastctl there (cargo and llvm, for bindgen, are installed with
# pkg when missing, which needs the VMs to reach a pkg mirror: README.md),
# builds the kernel module with make -C kmod (needs the VM's kernel sources in /usr/src/sys:
# when missing they are copied from $HAST_SRC_SYS on the host, which must be
# the sources of the VM's release), installs binaries, module, man pages and
# rc.d scripts, and loads geom_hast.
#
# With HAST_BUILD_ON_HOST=yes the userland is built on this host instead
# (cargo build --release) and only the binaries are copied: the host must
# run the same FreeBSD release as the VMs, or an older one.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
# shellcheck source=tests/bhyve/lib.sh
. "$here/lib.sh"
: "${HAST_SRC_SYS:=/usr/src/sys}"
: "${HAST_BUILD_ON_HOST:=no}"
check_names

if [ "$HAST_BUILD_ON_HOST" = yes ]; then
	say "building hastd and hastctl on the host"
	(cd "$top" && cargo build --release -p hastd -p hastctl)
fi

for vm in $HAST_VM_NAMES; do
	say "$vm: copying the source tree"
	tar -C "$top" --exclude ./target --exclude ./.git -cf - . |
	    vm_ssh "$vm" 'rm -rf /root/hast && mkdir -p /root/hast &&
		tar -C /root/hast -xf -'

	if ! vm_ssh "$vm" test -f /usr/src/sys/conf/kmod.mk; then
		[ -f "$HAST_SRC_SYS/conf/kmod.mk" ] ||
		    die "$vm has no /usr/src/sys and $HAST_SRC_SYS is not a sys/ tree"
		say "$vm: copying kernel sources from $HAST_SRC_SYS"
		tar -C "$HAST_SRC_SYS" -cf - . |
		    vm_ssh "$vm" 'mkdir -p /usr/src/sys && tar -C /usr/src/sys -xf -'
	fi

	if [ "$HAST_BUILD_ON_HOST" = yes ]; then
		say "$vm: copying the host's binaries"
		tar -C "$top" -cf - target/release/hastd target/release/hastctl |
		    vm_ssh "$vm" 'tar -C /root/hast -xf -'
	else
		say "$vm: building hastd and hastctl in the VM"
		vm_ssh "$vm" 'command -v cargo >/dev/null ||
		    env ASSUME_ALWAYS_YES=yes pkg install -y rust llvm'
		vm_ssh "$vm" 'cd /root/hast && cargo build --release -p hastd -p hastctl'
	fi

	say "$vm: building and loading the module"
	vm_ssh "$vm" 'set -e
		cd /root/hast
		make -C kmod
		make -C kmod install
		install -m 0555 target/release/hastd target/release/hastctl /usr/local/sbin/
		install -m 0555 rc.d/hast-failover /usr/local/sbin/
		install -m 0555 rc.d/hastd /usr/local/etc/rc.d/hastd
		mkdir -p /usr/local/etc/devd /usr/local/share/man/man4 \
		    /usr/local/share/man/man5 /usr/local/share/man/man8
		install -m 0444 rc.d/devd-hast.conf /usr/local/etc/devd/hast.conf
		install -m 0444 docs/geom_hast.4 /usr/local/share/man/man4/
		install -m 0444 docs/hast.conf.5 /usr/local/share/man/man5/
		install -m 0444 docs/hastd.8 docs/hastctl.8 /usr/local/share/man/man8/
		# The base system rc.d/hastd reads the same hastd_enable.
		chmod a-x /etc/rc.d/hastd 2>/dev/null || true
		kldload -n geom_hast
		kldstat -q -n geom_hast
		test -c /dev/hastctl'
	say "$vm: installed; geom_hast loaded, /dev/hastctl present"
done

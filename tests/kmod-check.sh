#!/bin/sh
# Compile-check the geom_hast kernel module (kmod/) against a FreeBSD sys/
# tree on any host: clang cross-compiles every C file of kmod/Makefile's SRCS
# for amd64 with the kernel's flags and -Werror, once plain and once with
# INVARIANTS/WITNESS (so KASSERT bodies are compiled too). Nothing is linked.
#
#   sh tests/kmod-check.sh SYSDIR     (or: make kmod-check SYSDIR=...)
#
# The object directory is a temporary one: machine/ and x86/ symlinks into
# SYSDIR, an empty opt_*.h and a generated *_if.h for each one SRCS lists.
# Exits non-zero if any compile fails.
set -eu

usage() {
	echo "usage: $0 SYSDIR  (a FreeBSD sys/ tree, e.g. /usr/src/sys)" >&2
	exit 2
}

[ $# -eq 1 ] || usage
[ -n "$1" ] || usage
SYSDIR=$(cd "$1" 2>/dev/null && pwd) || {
	echo "kmod-check: $1: no such directory" >&2
	exit 2
}
for f in sys/param.h amd64/include x86/include tools/makeobjops.awk \
    conf/newvers.sh geom/geom.h; do
	if [ ! -e "$SYSDIR/$f" ]; then
		echo "kmod-check: $SYSDIR is not a FreeBSD sys/ tree" \
		    "(no $f)" >&2
		exit 2
	fi
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KMOD="$ROOT/kmod"
CC=${CC:-clang}
command -v "$CC" >/dev/null 2>&1 || {
	echo "kmod-check: $CC not found (install clang)" >&2
	exit 2
}

# The release of the tree picks the target (x86_64-unknown-freebsd13.2).
REV=$(sed -n 's/^REVISION="\([0-9.]*\)".*/\1/p' "$SYSDIR/conf/newvers.sh" |
    head -n 1)
[ -n "$REV" ] || {
	echo "kmod-check: no REVISION in $SYSDIR/conf/newvers.sh" >&2
	exit 2
}

# SRCS of kmod/Makefile (SRCS= and SRCS+=, with continuation lines).
SRCS=$(sed -e ':a' -e '/\\$/N' -e 's/\\\n/ /' -e 'ta' "$KMOD/Makefile" |
    sed -n 's/^SRCS[+]*=[[:space:]]*//p' | tr '\n' ' ')
[ -n "$SRCS" ] || {
	echo "kmod-check: no SRCS in $KMOD/Makefile" >&2
	exit 2
}

OBJ=$(mktemp -d "${TMPDIR:-/tmp}/kmod-check.XXXXXX")
trap 'rm -rf "$OBJ"' EXIT INT TERM
ln -s "$SYSDIR/amd64/include" "$OBJ/machine"
ln -s "$SYSDIR/x86/include" "$OBJ/x86"

CFILES=""
for s in $SRCS; do
	case "$s" in
	opt_*.h)
		: >"$OBJ/$s"
		;;
	vnode_if.h)
		for m in h p q; do
			(cd "$OBJ" && awk -f "$SYSDIR/tools/vnode_if.awk" \
			    "$SYSDIR/kern/vnode_if.src" -$m)
		done
		;;
	*_if.h)
		m=$(find "$SYSDIR" -name "${s%.h}.m" | head -n 1)
		if [ -z "$m" ]; then
			echo "kmod-check: no ${s%.h}.m in $SYSDIR" >&2
			exit 1
		fi
		(cd "$OBJ" && awk -f "$SYSDIR/tools/makeobjops.awk" "$m" -h)
		;;
	*.c)
		CFILES="$CFILES $s"
		;;
	*)
		echo "kmod-check: do not know how to make $s (SRCS)" >&2
		exit 1
		;;
	esac
done

# sys/conf/kern.mk and kmod.mk for amd64 with clang.
set -- --target="x86_64-unknown-freebsd$REV" -O2 -pipe -fno-strict-aliasing \
    -Werror -D_KERNEL -DKLD_MODULE -nostdinc -I. -I"$SYSDIR" \
    -I"$SYSDIR/contrib/ck/include" -I"$ROOT/ffi" -I"$KMOD" \
    -fno-common -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer \
    -mno-aes -mno-avx -mcmodel=kernel -mno-red-zone -mno-mmx -mno-sse \
    -msoft-float -fno-asynchronous-unwind-tables -ffreestanding -fwrapv \
    -fstack-protector -std=iso9899:1999 \
    -Wall -Wredundant-decls -Wnested-externs -Wstrict-prototypes \
    -Wmissing-prototypes -Wpointer-arith -Wcast-qual -Wundef \
    -Wno-pointer-sign -D__printf__=__freebsd_kprintf__ \
    -Wmissing-include-dirs -Wno-unknown-pragmas \
    -Wno-error=tautological-compare -Wno-error=empty-body \
    -Wno-error=parentheses-equality -Wno-error=unused-function \
    -Wno-error=pointer-sign -Wno-error=shift-negative-value \
    -Wno-address-of-packed-member

status=0
for variant in plain invariants; do
	case $variant in
	plain) extra="" ;;
	invariants) extra="-DINVARIANTS -DINVARIANT_SUPPORT -DWITNESS" ;;
	esac
	for c in $CFILES; do
		o="$OBJ/${c%.c}.$variant.o"
		# shellcheck disable=SC2086
		if (cd "$OBJ" && "$CC" "$@" $extra -c "$KMOD/$c" -o "$o") \
		    >"$OBJ/log" 2>&1 && [ ! -s "$OBJ/log" ]; then
			echo "kmod-check: FreeBSD $REV $variant $c: ok"
		else
			echo "kmod-check: FreeBSD $REV $variant $c: FAILED"
			cat "$OBJ/log"
			status=1
		fi
	done
done
if [ $status -eq 0 ]; then
	echo "kmod-check: FreeBSD $REV ($SYSDIR): all compiles passed"
else
	echo "kmod-check: FreeBSD $REV ($SYSDIR): failures above" >&2
fi
exit $status

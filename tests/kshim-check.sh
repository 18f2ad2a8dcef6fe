#!/bin/sh
# Run the geom_hast kernel module (kmod/g_hast.c, kmod/hast_core.c,
# unchanged) in userland on the kernel shim (sys/kshim) with the C driver
# sys/kshim/test/kshim_test.c, built three ways, and check that the shim
# catches kernel bugs planted in a copy of the module.
#
#   sh tests/kshim-check.sh [plain|asan|tsan|plants]...   (default: all)
#
#   plain   the driver's scenarios (basic, enomem, orphan, destroy, unload,
#           copyout, stress, orphanstress, destroystress)
#   asan    the same with AddressSanitizer (and LeakSanitizer)
#   tsan    the same with ThreadSanitizer
#   plants  each planted bug must make the driver fail with the shim's
#           report: a sleep in a bio done routine, a lock order reversal,
#           a detach with open access counts, a bio destroyed twice, a
#           leaked g_hast_io, and (ThreadSanitizer) an unlocked counter
#
# Any sanitizer report fails the run.  CC (default cc) must support
# -fsanitize=address and -fsanitize=thread (gcc or clang).  Exits non-zero
# on the first failure.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CC=${CC:-cc}
SECONDS_STRESS=${KSHIM_STRESS_SECONDS:-3}
command -v "$CC" >/dev/null 2>&1 || {
	echo "kshim-check: $CC not found (make deps installs build-essential)" >&2
	exit 2
}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kshim-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
INC=$("$CC" -print-file-name=include)

# The module: freestanding, FreeBSD's view through the shim's headers
# (as sys/build.rs builds it for the Rust tests).
kflags() {
	echo "-std=gnu99 -ffreestanding -nostdinc -isystem $INC" \
	    "-I$ROOT/sys/kshim/include -I$ROOT/sys/kshim" \
	    "-I$1 -I$ROOT/kmod -I$ROOT/ffi" \
	    "-D_KERNEL -D__FreeBSD__=13 -DINVARIANTS -DHAST_CORE_DEBUG" \
	    "-include $ROOT/sys/kshim/kshim_rename.h" \
	    "-Wall -Wextra -Wno-unused-parameter -Werror -g -O1"
}
HFLAGS="-std=gnu11 -D_GNU_SOURCE -I$ROOT/sys/kshim -I$ROOT/ffi -Wall -Wextra"
HFLAGS="$HFLAGS -Wno-unused-parameter -Werror -g -O1"

# build OUT SANFLAGS [KMODDIR]: the driver at OUT/kshim_test.
build() {
	out=$1
	san=$2
	kdir=${3:-$ROOT/kmod}
	mkdir -p "$out"
	# shellcheck disable=SC2046,SC2086
	"$CC" $(kflags "$kdir") $san -c "$ROOT/sys/kshim/kmod_g_hast.c" \
	    -o "$out/kmod_g_hast.o"
	# shellcheck disable=SC2046,SC2086
	"$CC" $(kflags "$kdir") $san -c "$ROOT/kmod/hast_core.c" \
	    -o "$out/hast_core.o"
	for f in "$ROOT"/sys/kshim/kern_*.c "$ROOT"/sys/kshim/geom_*.c \
	    "$ROOT/sys/kshim/test/kshim_test.c"; do
		# shellcheck disable=SC2086
		"$CC" $HFLAGS $san -c "$f" -o "$out/$(basename "$f" .c).o"
	done
	# shellcheck disable=SC2086
	"$CC" $san -o "$out/kshim_test" "$out"/*.o -lpthread
}

# run NAME BINARY [SCENARIO...]: must pass with no sanitizer report.
run() {
	name=$1
	bin=$2
	shift 2
	disks="$WORK/disks-$name"
	mkdir -p "$disks"
	log="$WORK/$name.log"
	echo "kshim-check: $name: running the driver"
	if ! KSHIM_STRESS_SECONDS=$SECONDS_STRESS \
	    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	    TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
	    "$bin" "$disks" "$@" >"$log" 2>&1; then
		cat "$log" >&2
		echo "kshim-check: $name: FAILED" >&2
		exit 1
	fi
	if grep -q "Sanitizer" "$log"; then
		cat "$log" >&2
		echo "kshim-check: $name: sanitizer report" >&2
		exit 1
	fi
	grep "stress:" "$log" || true
	echo "kshim-check: $name: ok (zero reports)"
}

# plant NAME EXPECT SANFLAGS SCENARIO FROM TO [FROM TO]...: replace the
# line FROM (exactly) of a copy of g_hast.c by TO, build the driver on it,
# and require the scenario to fail with EXPECT in its output.
plant() {
	name=$1
	expect=$2
	san=$3
	scen=$4
	shift 4
	dir="$WORK/plant-$name"
	mkdir -p "$dir/src" "$dir/disks"
	cp "$ROOT/kmod/g_hast.c" "$dir/src/g_hast.c"
	while [ $# -ge 2 ]; do
		FROM=$1 TO=$2 awk '
			!done && $0 == ENVIRON["FROM"] { print ENVIRON["TO"];
			    done = 1; next }
			{ print }
			END { if (!done) exit 1 }
		' "$dir/src/g_hast.c" >"$dir/src/g_hast.c.new" || {
			echo "kshim-check: plant $name: no line \"$1\" in" \
			    "g_hast.c" >&2
			exit 1
		}
		mv "$dir/src/g_hast.c.new" "$dir/src/g_hast.c"
		shift 2
	done
	build "$dir" "$san" "$dir/src"
	if KSHIM_STRESS_SECONDS=2 TSAN_OPTIONS=halt_on_error=1 \
	    "$dir/kshim_test" "$dir/disks" "$scen" >"$dir/log" 2>&1; then
		cat "$dir/log" >&2
		echo "kshim-check: plant $name: the bug went unnoticed" >&2
		exit 1
	fi
	if ! grep -q "$expect" "$dir/log"; then
		cat "$dir/log" >&2
		echo "kshim-check: plant $name: no \"$expect\" report" >&2
		exit 1
	fi
	echo "kshim-check: plant $name: caught: $(grep -m1 "$expect" \
	    "$dir/log")"
}

plants() {
	plant sleep-in-done "which must not sleep" "" basic \
	    "	error = g_hast_bio_error(cbp);" \
	    "	error = g_hast_bio_error(cbp); pause(\"plant\", 1);"
	plant lock-order "lock order reversal" "" basic \
	    "			sc->sc_ref++;" \
	    "			sc->sc_ref++; mtx_lock(&sc->sc_mtx); mtx_unlock(&sc->sc_mtx);" \
	    "	sc->sc_busy--;" \
	    "	sc->sc_busy--; mtx_lock(&g_hast_mtx); mtx_unlock(&g_hast_mtx);"
	plant detach-open "detach but nonzero" "" basic \
	    "		(void)g_access(cp, -1, -1, -1);" "		(void)0;"
	plant bio-twice "g_destroy_bio of a destroyed bio" "" basic \
	    "	g_destroy_bio(cbp);" "	g_destroy_bio(cbp); g_destroy_bio(cbp);"
	plant leak "module memory" "" basic \
	    "		free(fin->fin_free, M_HAST);" "		(void)0;"
	plant race "ThreadSanitizer: data race" "-fsanitize=thread" stress \
	    "	sc->sc_busy--;" \
	    "	mtx_unlock(&sc->sc_mtx); sc->sc_busy--; mtx_lock(&sc->sc_mtx);"
}

[ $# -gt 0 ] || set -- plain asan tsan plants
for what in "$@"; do
	case $what in
	plain)
		build "$WORK/plain" ""
		run plain "$WORK/plain/kshim_test"
		;;
	asan)
		build "$WORK/asan" "-fsanitize=address -fno-omit-frame-pointer"
		run asan "$WORK/asan/kshim_test"
		;;
	tsan)
		build "$WORK/tsan" "-fsanitize=thread"
		run tsan "$WORK/tsan/kshim_test"
		;;
	plants)
		plants
		;;
	*)
		echo "usage: $0 [plain|asan|tsan|plants]..." >&2
		exit 2
		;;
	esac
done
echo "kshim-check: all passed"

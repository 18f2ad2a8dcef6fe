#!/bin/sh
# Syntax-check every shell script of the tree (sh -n), run shellcheck where it
# is installed, and lint every man page with mandoc. Exits non-zero on any
# finding.
set -eu
cd "$(dirname "$0")/.."
status=0
scripts=$(git ls-files 2>/dev/null | while read -r f; do
	case "$f" in
	rc.d/*.conf|rc.d/*.service|fuzz/corpus/*|fuzz/regressions/*) ;;
	*.sh|.ci/run|rc.d/*) echo "$f" ;;
	*) head -n1 "$f" 2>/dev/null | grep -q '^#!.*sh' && echo "$f" ;;
	esac
done | sort -u)
for f in $scripts; do
	case "$(head -n1 "$f")" in
	*bash*) bash -n "$f" || status=1 ;;
	*) sh -n "$f" || status=1 ;;
	esac
done
if command -v shellcheck >/dev/null 2>&1 && [ -n "$scripts" ]; then
	# shellcheck disable=SC2086
	shellcheck -S warning $scripts || status=1
fi
pages=$(git ls-files 'docs/*.[0-9]' 2>/dev/null || true)
if [ -n "$pages" ]; then
	if command -v mandoc >/dev/null 2>&1; then
		for p in $pages; do
			mandoc -Tlint -W warning "$p" || status=1
		done
	else
		echo "lint: mandoc not installed; man pages not checked" >&2
		status=1
	fi
fi
# The kernel module's I/O path (tests/kmod_io_path.py): nothing reachable
# from start, the bio done routines, the core's callbacks or the shim sleeps;
# hast_core.c uses no OS call; g_access() counts balance. The checker must
# also catch a sleep planted in a bio done routine.
if command -v python3 >/dev/null 2>&1; then
	python3 tests/kmod_io_path.py kmod || status=1
	planted=$(mktemp -d "${TMPDIR:-/tmp}/kmod-planted.XXXXXX")
	cp kmod/*.c kmod/*.h "$planted/"
	awk '{ print } /^g_hast_io_done\(/ { getline; print; print "\tpause(\"lint\", 1);" }' \
	    kmod/g_hast.c >"$planted/g_hast.c"
	if python3 tests/kmod_io_path.py "$planted" >/dev/null; then
		echo "lint: kmod_io_path.py did not catch a sleep planted in g_hast_io_done" >&2
		status=1
	fi
	rm -rf "$planted"
else
	echo "lint: python3 not installed; kernel I/O path not checked" >&2
	status=1
fi
n=$(echo "$scripts" | grep -c . || true)
m=$(echo "$pages" | grep -c . || true)
echo "lint: $n shell scripts, $m man pages checked"
exit $status

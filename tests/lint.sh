#!/bin/sh
# Syntax-check every shell script of the tree (sh -n), run shellcheck where it
# is installed, and lint every man page with mandoc. Exits non-zero on any
# finding.
set -eu
cd "$(dirname "$0")/.."
status=0
scripts=$(git ls-files 2>/dev/null | while read -r f; do
	case "$f" in
	rc.d/*.conf|rc.d/*.service) ;;
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
n=$(echo "$scripts" | grep -c . || true)
m=$(echo "$pages" | grep -c . || true)
echo "lint: $n shell scripts, $m man pages checked"
exit $status

#!/bin/sh
# Rebuilds the committed fuzz corpora: the seed inputs made from the test
# vectors (fuzz/examples/seeds.rs), the corpus already committed and what
# the fuzzer found (fuzz/found/TARGET, from tests/fuzz.sh), minimized with
# libFuzzer's merge (the smallest set of inputs that keeps every edge
# covered) into fuzz/corpus/TARGET.
#
# usage: tests/fuzz-corpus.sh [TARGET ...]
set -eu
cd "$(dirname "$0")/.."
cargo +nightly --version >/dev/null 2>&1 || {
	echo "fuzz-corpus: the nightly Rust toolchain is not installed" >&2
	exit 69
}
cargo fuzz --version >/dev/null 2>&1 || {
	echo "fuzz-corpus: cargo-fuzz is not installed (make deps)" >&2
	exit 69
}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT INT TERM
cargo run --quiet --manifest-path fuzz/Cargo.toml --example seeds -- "$scratch/seeds"
if [ $# -eq 0 ]; then
	# shellcheck disable=SC2046 # one target name per word
	set -- $(cargo +nightly fuzz list)
fi
nice -n 19 cargo +nightly fuzz build
for t in "$@"; do
	dirs=""
	for d in "$scratch/seeds/$t" "fuzz/corpus/$t" "fuzz/found/$t"; do
		if [ -d "$d" ]; then
			dirs="$dirs $d"
		fi
	done
	mkdir -p "$scratch/new/$t"
	# Edges only (-use_counters=0): a small corpus that still reaches all
	# the code the larger one reaches.
	# shellcheck disable=SC2086 # dirs is a list
	nice -n 19 cargo +nightly fuzz run "$t" "$scratch/new/$t" $dirs -- \
		-merge=1 -use_counters=0 -rss_limit_mb=1024 -timeout=10 \
		>"$scratch/$t.log" 2>&1 || {
		tail -n 30 "$scratch/$t.log" >&2
		echo "fuzz-corpus: merging $t failed" >&2
		exit 1
	}
	rm -rf "fuzz/corpus/$t"
	mkdir -p "fuzz/corpus/$t"
	cp "$scratch/new/$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
	n=$(find "fuzz/corpus/$t" -type f | wc -l)
	size=$(find "fuzz/corpus/$t" -type f -exec cat {} + | wc -c)
	echo "$t: $n inputs, $size bytes"
done

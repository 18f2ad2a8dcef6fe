#!/bin/sh
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer, AddressSanitizer)
# one after the other, each for SECONDS, starting from the committed corpus
# fuzz/corpus/TARGET, the crash inputs of fuzz/regressions/TARGET and what
# earlier runs found in fuzz/found/TARGET, where new inputs go (not
# committed: make fuzz-corpus minimizes them into fuzz/corpus/). With
# --smoke new inputs go to a scratch directory.
# Every run is bounded: -rss_limit_mb (also the largest single allocation)
# and -timeout (a hang). A crash, a leak, an allocation past the limit or a
# hang stops the script with the input saved under fuzz/artifacts/TARGET/
# (with the log of the last run, last-run.log).
# Prints executions, time and peak RSS per target.
#
# usage: tests/fuzz.sh [--smoke] SECONDS [TARGET ...]
#   --smoke   for make test: skip (exit 0, with a message) when the nightly
#             toolchain or cargo-fuzz is missing; keep nothing found
#   SECONDS 0 runs without a time limit (with FUZZ_RUNS)
# environment: FUZZ_RUNS (stop each target after this many executions),
#   FUZZ_RSS_MB (default 1024), FUZZ_TIMEOUT (seconds, default 10),
#   FUZZ_NICE (default 19), FUZZ_ARGS (more libFuzzer options)
set -eu
cd "$(dirname "$0")/.."

smoke=0
if [ "${1:-}" = "--smoke" ]; then
	smoke=1
	shift
fi
if [ $# -lt 1 ]; then
	echo "usage: tests/fuzz.sh [--smoke] SECONDS [TARGET ...]" >&2
	exit 64
fi
secs=$1
shift
rss=${FUZZ_RSS_MB:-1024}
timeout=${FUZZ_TIMEOUT:-10}
nice=${FUZZ_NICE:-19}

unavailable() {
	if [ "$smoke" = 1 ]; then
		echo "fuzz: SKIPPED: $1"
		exit 0
	fi
	echo "fuzz: $1" >&2
	exit 69
}
cargo +nightly --version >/dev/null 2>&1 ||
	unavailable "the nightly Rust toolchain is not installed (rustup toolchain install nightly)"
cargo fuzz --version >/dev/null 2>&1 ||
	unavailable "cargo-fuzz is not installed (make deps installs it when nightly is present)"

if [ $# -eq 0 ]; then
	# shellcheck disable=SC2046 # one target name per word
	set -- $(cargo +nightly fuzz list)
fi

nice -n "$nice" cargo +nightly fuzz build

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT INT TERM
printf '%-10s %12s %8s %10s %9s\n' target executions seconds exec/s "peak RSS"
for t in "$@"; do
	found="fuzz/found/$t"
	if [ "$smoke" = 1 ]; then
		found="$scratch/$t"
	fi
	mkdir -p "$found" "fuzz/artifacts/$t" "fuzz/corpus/$t"
	dirs="fuzz/corpus/$t"
	if [ -d "fuzz/regressions/$t" ]; then
		dirs="$dirs fuzz/regressions/$t"
	fi
	log="fuzz/artifacts/$t/last-run.log"
	start=$(date +%s)
	# shellcheck disable=SC2086 # dirs and FUZZ_ARGS are lists
	if ! nice -n "$nice" cargo +nightly fuzz run "$t" "$found" $dirs -- \
		-max_total_time="$secs" -rss_limit_mb="$rss" -timeout="$timeout" \
		${FUZZ_RUNS:+-runs="$FUZZ_RUNS"} -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
		${FUZZ_ARGS:-} >"$log" 2>&1; then
		tail -n 60 "$log" >&2
		echo "fuzz: target $t FAILED; the input is in fuzz/artifacts/$t/" >&2
		exit 1
	fi
	end=$(date +%s)
	ran=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log")
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
	peak=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")
	persec=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
	printf '%-10s %12s %8s %10s %7s MB\n' "$t" "${execs:-?}" "${ran:-$((end - start))}" "${persec:-?}" "${peak:-?}"
done

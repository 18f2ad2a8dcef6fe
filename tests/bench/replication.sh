#!/bin/sh
# Replication benchmark (called by `make bench`): two hastd nodes in network
# namespaces joined by a veth pair; fio over NBD against the primary in
# fullsync, memsync and async mode, and the resync rate, each as a ratio to
# a baseline of the same run (qemu-nbd serving a file of the same size; dd
# copying the same bytes). Builds nothing: it runs target/release/replbench,
# which uses the hastd and hastctl next to it. Build them first, e.g.
#   cargo build --release -p hastd -p hastctl
#   cargo build --release -p hast-tests --bin replbench
# (two commands, so hastd is built without the test crate's fail points).
#
# Settings (environment, defaults in brackets):
#   HAST_BENCH_ROUNDS [3]    rounds per workload, hast and baseline alternating
#   HAST_BENCH_SECONDS [10]  timed seconds per fio run
#   HAST_BENCH_RAMP [2]      fio ramp seconds
#   HAST_BENCH_SIZE [1G]     provider size
#   HAST_BENCH_RESYNC [1G]   bytes the secondary misses before a resync (at
#                            most the data area); the resync ends with the
#                            secondary's flush, timed against dd conv=fsync
#   HAST_BENCH_RESYNC_ROUNDS [5]  resync rounds, hast and dd alternating
#   HAST_BENCH_MODES [fullsync,memsync,async]  add `degraded` for a primary
#                            without its peer; `resync` alone times only the
#                            resync (fullsync runs it after its fio rounds)
#   HAST_BENCH_KEEPDIRTY     hastctl create -k (default 64)
#   HAST_BENCH_STRICT [0]    1: exit 1 when a result is below its target
# Needs root (namespaces, veth); without root it says so and exits 0.
set -eu
cd "$(dirname "$0")/../.."

if [ "$(id -u)" != 0 ]; then
	echo "bench/replication: needs root (network namespaces and a veth pair); skipped"
	exit 0
fi
bin=target/release/replbench
for f in "$bin" target/release/hastd target/release/hastctl; do
	if [ ! -x "$f" ]; then
		echo "bench/replication: $f is not built; run:" >&2
		echo "  cargo build --release -p hastd -p hastctl && cargo build --release -p hast-tests --bin replbench" >&2
		exit 2
	fi
done
for p in fio qemu-nbd dd ip; do
	command -v "$p" >/dev/null 2>&1 || {
		echo "bench/replication: $p not found (make deps installs it)" >&2
		exit 2
	}
done

export HAST_BENCH_ROUNDS="${HAST_BENCH_ROUNDS:-3}"
export HAST_BENCH_SECONDS="${HAST_BENCH_SECONDS:-10}"
export HAST_BENCH_RAMP="${HAST_BENCH_RAMP:-2}"
export HAST_BENCH_SIZE="${HAST_BENCH_SIZE:-1G}"
export HAST_BENCH_RESYNC="${HAST_BENCH_RESYNC:-1G}"
export HAST_BENCH_RESYNC_ROUNDS="${HAST_BENCH_RESYNC_ROUNDS:-5}"
export HAST_BENCH_MODES="${HAST_BENCH_MODES:-fullsync,memsync,async}"
export HAST_BENCH_STRICT="${HAST_BENCH_STRICT:-0}"
if [ -n "${HAST_BENCH_KEEPDIRTY:-}" ]; then
	export HAST_BENCH_KEEPDIRTY
fi
# The hastd and hastctl next to replbench, whatever HAST_BIN says.
HAST_BIN="$(pwd)/target/release"
export HAST_BIN
exec "$bin"

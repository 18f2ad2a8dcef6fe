#!/bin/sh
# Replication benchmark (called by `make bench`): two hastd nodes in network
# namespaces joined by a veth pair (one pair per mode: fullsync, memsync,
# async), side by side in the same rounds with qemu-storage-daemon's quorum
# of a local file and a qemu-nbd across the same kind of veth link (the
# synchronous mirror a Linux user would pick instead) and an unreplicated
# qemu-nbd on a file of the same size; fio over NBD, four workloads, ratios
# of medians, CPU per request of both nodes, p99 latency, activemap writes
# per request; then the resync rate against dd copying the same bytes.
# Builds nothing: it runs target/release/replbench, which uses the hastd and
# hastctl next to it. Build them first, e.g.
#   cargo build --release -p hastd -p hastctl
#   cargo build --release -p hast-tests --bin replbench
# (two commands, so hastd is built without the test crate's fail points).
#
# Settings (environment, defaults in brackets):
#   HAST_BENCH_ROUNDS [3]    rounds per workload, every server once per
#                            round, the order rotating
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
#   HAST_BENCH_WORKLOADS [seqwrite,randwrite32,randwrite1,randread32]
#   HAST_BENCH_QSD [1]       0: leave the qemu-storage-daemon peer out
#   HAST_BENCH_KEEPDIRTY     hastctl create -k (default 64)
#   HAST_BENCH_STRICT [0]    1: exit 1 when a result is below its target
# Needs root (namespaces, veth); without root it says so and exits 0.
# Disk: 2 files per mode + 1 (qemu-nbd) + 2 (qsd) of HAST_BENCH_SIZE each,
# fallocated in $TMPDIR (default /tmp): 9 GiB with the defaults; replbench
# checks before it starts.
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
export HAST_BENCH_QSD="${HAST_BENCH_QSD:-1}"
progs="fio qemu-nbd dd ip"
[ "$HAST_BENCH_QSD" = 0 ] || progs="$progs qemu-storage-daemon"
for p in $progs; do
	command -v "$p" >/dev/null 2>&1 || {
		echo "bench/replication: $p not found (make deps installs it; make bench installs qemu-storage-daemon; HAST_BENCH_QSD=0 leaves that peer out)" >&2
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
export HAST_BENCH_WORKLOADS="${HAST_BENCH_WORKLOADS:-seqwrite,randwrite32,randwrite1,randread32}"
export HAST_BENCH_STRICT="${HAST_BENCH_STRICT:-0}"
if [ -n "${HAST_BENCH_KEEPDIRTY:-}" ]; then
	export HAST_BENCH_KEEPDIRTY
fi
# The hastd and hastctl next to replbench, whatever HAST_BIN says.
HAST_BIN="$(pwd)/target/release"
export HAST_BIN
exec "$bin"

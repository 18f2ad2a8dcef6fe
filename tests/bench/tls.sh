#!/bin/sh
# Link security benchmark (called by `make bench`): the replication
# benchmark's pair in fullsync with `security tls` against `security none`,
# switched by a reload before each round (alternating): 1 MiB sequential
# writes at QD16 (target: TLS at least 0.9 of plain), 4 KiB random writes
# at QD32 (0.85), the resync (0.9), and the CPU time both daemons spend
# per request. Same settings and prerequisites as tests/bench/replication.sh
# (HAST_BENCH_ROUNDS, HAST_BENCH_SECONDS, HAST_BENCH_SIZE, HAST_BENCH_RESYNC,
# HAST_BENCH_RESYNC_ROUNDS, HAST_BENCH_STRICT, ...), but without the
# qemu-storage-daemon peer, and HAST_BENCH_WORKLOADS [seqwrite,randwrite32]
# (any of the four may be asked; the other two have no target). Disk: 2
# files of HAST_BENCH_SIZE in $TMPDIR.
set -eu
cd "$(dirname "$0")/../.."
HAST_BENCH_MODES=tls
HAST_BENCH_QSD=0
HAST_BENCH_WORKLOADS="${HAST_BENCH_WORKLOADS:-seqwrite,randwrite32}"
export HAST_BENCH_MODES HAST_BENCH_QSD HAST_BENCH_WORKLOADS
exec sh tests/bench/replication.sh

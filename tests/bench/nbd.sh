#!/bin/sh
# make bench: the NBD export of a hastd primary without a peer (remote none)
# against qemu-nbd serving a copy of the same provider file, with fio's nbd
# engine as the client of both. Every workload runs BENCH_ROUNDS times per
# server, the servers alternating (ABBA order), and the table reports the
# median of each side and the ratio hast / qemu-nbd. A ratio below
# BENCH_TARGET prints BELOW but does not fail the script: it is a
# measurement. Anything that fails to run (a server, fio) exits non-zero.
#
# Environment (all optional):
#   HAST_BIN         directory of hastd, hastctl (default target/release)
#   BENCH_SIZE_MB    provider size in MiB (default 1024)
#   BENCH_RUNTIME    seconds measured per run (default 10)
#   BENCH_RAMP       seconds of ramp before measuring (default 2)
#   BENCH_ROUNDS     runs per server and workload (default 3)
#   BENCH_TARGET     ratio a workload must reach (default 0.9)
#   BENCH_WORKLOADS  subset of: seqwrite randwrite32 randwrite1 randread32
#   BENCH_SERVERS    servers besides qemu: hast (default), nbd_serve (the
#                    example binary: the NBD server and file backend of this
#                    project without the core; needs target/release/examples)
#   BENCH_OUT        keep fio's JSON output and the server logs here
#   BENCH_DIR        where the provider files live (default $TMPDIR or /tmp)
set -eu

top=$(cd "$(dirname "$0")/../.." && pwd)
bin=${HAST_BIN:-$top/target/release}
size_mb=${BENCH_SIZE_MB:-1024}
runtime=${BENCH_RUNTIME:-10}
ramp=${BENCH_RAMP:-2}
rounds=${BENCH_ROUNDS:-3}
target=${BENCH_TARGET:-0.9}
workloads=${BENCH_WORKLOADS:-seqwrite randwrite32 randwrite1 randread32}
servers="${BENCH_SERVERS:-hast} qemu"
name=bench

for tool in fio qemu-nbd nbdinfo python3; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "bench: $tool is not installed (make deps installs it)" >&2
		exit 1
	}
done
for b in hastd hastctl; do
	[ -x "$bin/$b" ] || {
		echo "bench: $bin/$b not found; build with cargo build --release --workspace" >&2
		exit 1
	}
done
case " $servers " in
*" nbd_serve "*)
	[ -x "$bin/examples/nbd_serve" ] || {
		echo "bench: $bin/examples/nbd_serve not found; build with cargo build --release --example nbd_serve" >&2
		exit 1
	}
	;;
esac

work=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/hast-bench.XXXXXX")
pids=""
fpid=""

cleanup() {
	status=$?
	trap - EXIT INT TERM
	[ -z "$fpid" ] || kill "$fpid" 2>/dev/null || true
	for p in $pids; do
		kill "$p" 2>/dev/null || true
	done
	for p in $pids; do
		wait "$p" 2>/dev/null || true
	done
	if [ -n "${BENCH_OUT:-}" ]; then
		mkdir -p "$BENCH_OUT"
		cp "$work"/*.json "$work"/*.log "$work/hast.conf" "$BENCH_OUT"/ 2>/dev/null || true
	fi
	rm -rf "$work"
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
	echo "bench: $*" >&2
	exit 1
}

# Wait until path $1 is a socket; $2 is the pid of the process that makes it,
# $3 its log.
wait_socket() {
	i=0
	while [ ! -S "$1" ]; do
		kill -0 "$2" 2>/dev/null || { cat "$3" >&2; die "server for $1 exited"; }
		i=$((i + 1))
		[ $i -lt 400 ] || { cat "$3" >&2; die "no socket at $1 after 20 s"; }
		sleep 0.05
	done
}

# --- The providers --------------------------------------------------------
# One file, written in full (not sparse) so that neither server pays for
# block allocation; hastctl create puts the metadata and activemap at its
# start; the copies for the other servers are byte-identical files.
echo "bench: preparing a ${size_mb} MiB provider in $work"
dd if=/dev/zero of="$work/hast.img" bs=1M count="$size_mb" conv=fsync status=none

cat >"$work/hast.conf" <<CONF
on bench {
	control uds://$work/hast.ctl
	pidfile $work/hast.pid
}
resource $name {
	on bench {
		local $work/hast.img
		remote none
		nbd $work/hast.nbd
	}
}
CONF

ctl() {
	"$bin/hastctl" "$@" -c "$work/hast.conf" --node bench
}

ctl create "$name" >"$work/create.log" 2>&1 || { cat "$work/create.log" >&2; die "hastctl create failed"; }
ctl dump "$name" >"$work/dump.log" 2>&1 || { cat "$work/dump.log" >&2; die "hastctl dump failed"; }
localoff=$(sed -n 's/^ *localoff: *\([0-9]*\).*/\1/p' "$work/dump.log")
datasize=$(sed -n 's/^ *datasize: *\([0-9]*\).*/\1/p' "$work/dump.log")
[ -n "$localoff" ] && [ -n "$datasize" ] || { cat "$work/dump.log" >&2; die "no localoff/datasize in hastctl dump"; }
for s in $servers; do
	[ "$s" = hast ] || dd if="$work/hast.img" of="$work/$s.img" bs=1M conv=fsync status=none
done
# Each file must enter the warm-up with the same page-cache state: how a
# file's cached pages were created (dd, cp, a read) decides the size of its
# page-cache folios on kernels with large folios, and a buffered 4 KiB write
# into a large folio costs several times more kernel time. Measured here: the
# same server on the dd-written original did 22k 4k-random-write IOPS, on a
# cp-made copy 45k. So: write back and drop every file's cached pages, then
# let each server build its cache with the same warm-up pass.
for s in $servers; do
	python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fdatasync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)' "$work/$s.img" || die "cannot drop the cached pages of $s.img"
done

# --- The servers ----------------------------------------------------------
# The servers run through symlinks with their own names: on a shared machine
# other test suites' clean-ups (pkill hastd, killall qemu-nbd) must not end
# them in the middle of a measurement. Same binaries.
ln -s "$bin/hastd" "$work/hast-primary"
ln -s "$(command -v qemu-nbd)" "$work/qemu-baseline"

start_hast() {
	"$work/hast-primary" -F -c "$work/hast.conf" --node bench 2>"$work/hastd.log" &
	hastd_pid=$!
	pids="$pids $hastd_pid"
	echo "$hastd_pid" >"$work/hast.pid-of-server"
	wait_socket "$work/hast.ctl" "$hastd_pid" "$work/hastd.log"
	ctl role primary "$name" >>"$work/hastd.log" 2>&1 || { cat "$work/hastd.log" >&2; die "hastctl role primary failed"; }
	wait_socket "$work/hast.nbd" "$hastd_pid" "$work/hastd.log"
}

# qemu-nbd as hastd does its I/O: buffered pread/pwrite on a thread pool
# (--cache=writeback --aio=threads, both the defaults, written out), a flush
# is fdatasync; raw format; the data area after hastd's metadata and map
# (--offset) so both export the same bytes and the same size.
start_qemu() {
	"$work/qemu-baseline" -f raw --offset="$localoff" --cache=writeback --aio=threads \
		--discard=ignore --detect-zeroes=off -t -e 8 -x "$name" \
		-k "$work/qemu.nbd" "$work/qemu.img" 2>"$work/qemu-nbd.log" &
	pids="$pids $!"
	echo $! >"$work/qemu.pid-of-server"
	wait_socket "$work/qemu.nbd" $! "$work/qemu-nbd.log"
}

start_nbd_serve() {
	"$bin/examples/nbd_serve" --file "$work/nbd_serve.img" --export "$name" \
		--unix "$work/nbd_serve.nbd" --offset "$localoff" --size "$datasize" \
		>"$work/nbd_serve.log" 2>&1 &
	pids="$pids $!"
	echo $! >"$work/nbd_serve.pid-of-server"
	wait_socket "$work/nbd_serve.nbd" $! "$work/nbd_serve.log"
}

uri() {
	echo "nbd+unix:///$name?socket=$work/$1.nbd"
}

for s in $servers; do
	case $s in
	hast) start_hast ;;
	qemu) start_qemu ;;
	nbd_serve) start_nbd_serve ;;
	*) die "unknown server $s" ;;
	esac
	got=$(nbdinfo --size "$(uri "$s")") || die "nbdinfo cannot reach $s"
	[ "$got" = "$datasize" ] || die "$s exports $got bytes, hast's data area is $datasize"
done

check_alive() {
	for s in $servers; do
		p=$(cat "$work/$s.pid-of-server")
		kill -0 "$p" 2>/dev/null || {
			st=0
			wait "$p" 2>/dev/null || st=$?
			tail -n 20 "$work/$s"*.log >&2
			die "server $s (pid $p) died (wait status $st)"
		}
	done
}

# CPU time (user + system, all threads, in clock ticks) of process $1.
cpu_ticks() {
	sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# fio_run SERVER OUTPUT RAMP fio-options...: run fio against SERVER; unless
# RAMP (seconds of fio's ramp_time) is "-", also write the server's CPU
# ticks spent after the ramp to OUTPUT.cpu, to compare CPU time per request.
fio_run() {
	s=$1
	out=$2
	ramp_s=$3
	shift 3
	spid=$(cat "$work/$s.pid-of-server")
	sync
	fio --ioengine=nbd --uri="$(uri "$s")" --output-format=json \
		--output="$out" "$@" >"$out.log" 2>&1 &
	fpid=$!
	if [ "$ramp_s" != - ]; then
		sleep "$ramp_s"
		t0=$(cpu_ticks "$spid")
	fi
	wait "$fpid" || { cat "$out.log" >&2; die "fio failed against $s"; }
	fpid=""
	if [ "$ramp_s" != - ]; then
		echo $(($(cpu_ticks "$spid") - t0)) >"$out.cpu"
	fi
	check_alive
}

# --- Warm-up: one sequential pass over the whole export -------------------
# Untimed for the table: in degraded mode the first write into each extent
# makes hastd write and flush the activemap before the data, once per extent
# for the life of the outage. The pass dirties every extent (and puts both
# copies in the same page-cache state); its throughput is reported apart.
echo "bench: warm-up pass (1M sequential writes over the whole export, once per server)"
for s in $servers; do
	fio_run "$s" "$work/warm-$s.json" - --name=warm --rw=write --bs=1M --iodepth=16 --size=100%
done

# hastd's dirty bytes and activemap writes so far (hastctl list).
map_state() {
	ctl list "$name" >"$work/list.log" 2>&1 || { cat "$work/list.log" >&2; die "hastctl list failed"; }
	dirty=$(sed -n 's/^ *dirty: *\([0-9]*\).*/\1/p' "$work/list.log")
	updates=$(sed -n 's/^ *activemap updates: *\([0-9]*\).*/\1/p' "$work/list.log")
	echo "bench: hastd $1: dirty $dirty of $datasize bytes, $updates activemap writes"
}
case " $servers " in
*" hast "*) map_state "after the warm-up" ;;
esac

# --- The measured workloads -----------------------------------------------
wl_opts() {
	case $1 in
	seqwrite) echo "--rw=write --bs=1M --iodepth=16" ;;
	randwrite32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
	randwrite1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
	randread32) echo "--rw=randread --bs=4k --iodepth=32" ;;
	*) die "unknown workload $1" ;;
	esac
}

for wl in $workloads; do
	opts=$(wl_opts "$wl")
	r=1
	while [ $r -le "$rounds" ]; do
		# ABBA: odd rounds in the listed order, even rounds reversed.
		order=$servers
		if [ $((r % 2)) -eq 0 ]; then
			order=$(printf '%s\n' $servers | sed '1!G;h;$!d')
		fi
		for s in $order; do
			echo "bench: $wl round $r/$rounds: $s"
			# shellcheck disable=SC2086
			fio_run "$s" "$work/$wl-$s-$r.json" "$ramp" --name="$wl" $opts \
				--time_based --runtime="$runtime" --ramp_time="$ramp"
		done
		r=$((r + 1))
	done
done

case " $servers " in
*" hast "*) map_state "at the end" ;;
esac

# --- The table ------------------------------------------------------------
python3 - "$work" "$target" "$rounds" "$servers" "$workloads" "$(getconf CLK_TCK)" <<'PY'
import json
import statistics
import sys

work, target, rounds, servers, workloads, clk_tck = sys.argv[1:7]
clk_tck = int(clk_tck)
target = float(target)
rounds = int(rounds)
servers = servers.split()
others = [s for s in servers if s != "qemu"]
label = {"hast": "hast", "qemu": "qemu-nbd", "nbd_serve": "nbd_serve"}
desc = {
    "warm": ("1M seq write QD16, first pass", "MiB/s"),
    "seqwrite": ("1M seq write QD16", "MiB/s"),
    "randwrite32": ("4k rand write QD32", "IOPS"),
    "randwrite1": ("4k rand write QD1", "IOPS"),
    "randread32": ("4k rand read QD32", "IOPS"),
}


def measure(path, unit):
    with open(path) as f:
        job = json.load(f)["jobs"][0]
    if job.get("error"):
        sys.exit(f"bench: fio reported error {job['error']} in {path}")
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["bw_bytes"] / 1048576 if unit == "MiB/s" else side["iops"]


def latency(path):
    """Mean latency of a request in microseconds."""
    with open(path) as f:
        job = json.load(f)["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["lat_ns"]["mean"] / 1000


def cpu_per_io(path):
    """Server CPU microseconds per request after the ramp, or None."""
    try:
        with open(path + ".cpu") as f:
            ticks = int(f.read())
        with open(path) as f:
            job = json.load(f)["jobs"][0]
    except (OSError, ValueError):
        return None
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    return ticks * 1e6 / clk_tck / ios if ios else None


rows = []
failed = False
for wl in ["warm"] + workloads.split():
    what, unit = desc[wl]
    med = {}
    runs = {}
    for s in servers:
        if wl == "warm":
            vals = [measure(f"{work}/warm-{s}.json", unit)]
        else:
            vals = [measure(f"{work}/{wl}-{s}-{r}.json", unit) for r in range(1, rounds + 1)]
        runs[s] = vals
        med[s] = statistics.median(vals)
    for o in others:
        ratio = med[o] / med["qemu"] if med["qemu"] else 0.0
        verdict = "-" if wl == "warm" else ("PASS" if ratio >= target else "BELOW")
        rows.append((what, unit, label[o], med[o], med["qemu"], ratio, verdict, runs[o], runs["qemu"]))

print()
print(f"median of {rounds} alternating runs per server; target ratio {target}")
hdr = f"{'workload':<31} {'unit':<6} {'server':<10} {'server':>10} {'qemu-nbd':>10} {'ratio':>6}  verdict"
print(hdr)
print("-" * len(hdr))
for what, unit, srv, a, b, ratio, verdict, ra, rb in rows:
    print(f"{what:<31} {unit:<6} {srv:<10} {a:>10.1f} {b:>10.1f} {ratio:>6.2f}  {verdict}")
print()
print("per request, medians: mean latency seen by fio / server CPU time after the ramp")
print("(user+system, all threads), in microseconds:")
for wl in workloads.split():
    cells = []
    for s in servers:
        paths = [f"{work}/{wl}-{s}-{r}.json" for r in range(1, rounds + 1)]
        lat = statistics.median(latency(p) for p in paths)
        cpu = [v for v in (cpu_per_io(p) for p in paths) if v is not None]
        cpu_s = f"{statistics.median(cpu):.1f}" if cpu else "?"
        cells.append(f"{label[s]} {lat:.0f} / {cpu_s}")
    print(f"  {desc[wl][0]:<31} " + ", ".join(cells))
print()
print("all runs (server | qemu-nbd):")
for what, unit, srv, a, b, ratio, verdict, ra, rb in rows:
    fa = " ".join(f"{v:.0f}" for v in ra)
    fb = " ".join(f"{v:.0f}" for v in rb)
    print(f"  {what:<31} {srv:<10} {fa} | {fb}")
PY

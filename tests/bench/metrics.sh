#!/bin/sh
# make bench: the cost of the Prometheus metrics. Two hastd nodes on the
# loopback (alpha 127.0.0.1, beta 127.0.0.2): resource `solo` on alpha
# without a peer (the NBD export alone) and resource `repl` replicated from
# alpha to beta in fullsync. fio's nbd engine runs each workload against
# each resource with metrics on and off in alternating rounds (ABBA) of the
# same run: between rounds both daemons reload a hast.conf with or without
# their `metrics` statement (SIGHUP: the resources keep running), and while
# metrics are on /metrics is scraped every BENCH_SCRAPE seconds, as a
# Prometheus server would. The table reports the medians and the ratio on /
# off; a ratio below BENCH_TARGET prints BELOW but does not fail the script
# (it is a measurement, and it needs a quiet machine: compare the load
# averages printed at the start and the end).
#
# Environment (all optional):
#   HAST_BIN         directory of hastd, hastctl (default target/release)
#   BENCH_SIZE_MB    provider size in MiB (default 512)
#   BENCH_RUNTIME    seconds measured per run (default 10)
#   BENCH_RAMP       seconds of ramp before measuring (default 2)
#   BENCH_ROUNDS     runs per setting and workload (default 4)
#   BENCH_TARGET     ratio on/off a workload must reach (default 0.98)
#   BENCH_SCRAPE     seconds between scrapes while metrics are on (default 1)
#   BENCH_WORKLOADS  subset of: randwrite32 seqwrite randread32 (default all)
#   BENCH_RESOURCES  subset of: solo repl (default both)
#   BENCH_DIR        where the provider files live (default $TMPDIR or /tmp)
set -eu

top=$(cd "$(dirname "$0")/../.." && pwd)
bin=${HAST_BIN:-$top/target/release}
size_mb=${BENCH_SIZE_MB:-512}
runtime=${BENCH_RUNTIME:-10}
ramp=${BENCH_RAMP:-2}
rounds=${BENCH_ROUNDS:-4}
target=${BENCH_TARGET:-0.98}
scrape=${BENCH_SCRAPE:-1}
workloads=${BENCH_WORKLOADS:-randwrite32 seqwrite randread32}
resources=${BENCH_RESOURCES:-solo repl}

for tool in fio curl python3; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "bench/metrics: $tool is not installed (make deps installs it)" >&2
		exit 1
	}
done
for b in hastd hastctl; do
	[ -x "$bin/$b" ] || {
		echo "bench/metrics: $bin/$b not found; build with cargo build --release -p hastd -p hastctl" >&2
		exit 1
	}
done

work=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/tmp}}/hast-bench-metrics.XXXXXX")
pids=""
fpid=""
spid=""

cleanup() {
	status=$?
	trap - EXIT INT TERM
	for p in $fpid $spid $pids; do
		kill "$p" 2>/dev/null || true
	done
	for p in $fpid $spid $pids; do
		wait "$p" 2>/dev/null || true
	done
	rm -rf "$work"
	exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
	echo "bench/metrics: $*" >&2
	exit 1
}

free_port() {
	python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

port_a=$(free_port)
port_b=$(free_port)
mport_a=$(free_port)
mport_b=$(free_port)

echo "bench/metrics: load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "bench/metrics: preparing ${size_mb} MiB providers in $work"
for f in alpha-solo alpha-repl beta-repl; do
	dd if=/dev/zero of="$work/$f.img" bs=1M count="$size_mb" conv=fsync status=none
done

# write_conf on|off: hast.conf with or without the metrics statements.
write_conf() {
	if [ "$1" = on ]; then
		ma="metrics tcp4://127.0.0.1:$mport_a"
		mb="metrics tcp4://127.0.0.1:$mport_b"
	else
		ma=""
		mb=""
	fi
	cat >"$work/hast.conf.new" <<CONF
replication fullsync
on alpha {
	control uds://$work/alpha.ctl
	pidfile $work/alpha.pid
	listen tcp4://127.0.0.1:$port_a
	$ma
}
on beta {
	control uds://$work/beta.ctl
	pidfile $work/beta.pid
	listen tcp4://127.0.0.2:$port_b
	$mb
}
resource solo {
	on alpha {
		local $work/alpha-solo.img
		remote none
		nbd $work/solo.nbd
	}
	on beta {
		local $work/beta-solo.unused
		remote none
	}
}
resource repl {
	on alpha {
		local $work/alpha-repl.img
		remote tcp4://127.0.0.2:$port_b
		source tcp4://127.0.0.1
		nbd $work/repl.nbd
	}
	on beta {
		local $work/beta-repl.img
		remote tcp4://127.0.0.1:$port_a
		source tcp4://127.0.0.2
	}
}
CONF
	mv "$work/hast.conf.new" "$work/hast.conf"
}

ctl() {
	node=$1
	shift
	"$bin/hastctl" "$@" -c "$work/hast.conf" --node "$node"
}

wait_socket() {
	i=0
	while [ ! -S "$1" ]; do
		i=$((i + 1))
		[ $i -lt 400 ] || die "no socket at $1 after 20 s"
		sleep 0.05
	done
}

write_conf off
ctl alpha create solo >/dev/null
ctl alpha create repl >/dev/null
ctl beta create repl >/dev/null
# Own names, so that other suites' clean-ups (pkill hastd) leave them be.
ln -s "$bin/hastd" "$work/hast-metrics-bench"
for n in alpha beta; do
	"$work/hast-metrics-bench" -F -c "$work/hast.conf" --node "$n" 2>"$work/$n.log" &
	pids="$pids $!"
	echo $! >"$work/$n.pid-of-server"
	wait_socket "$work/$n.ctl"
done
ctl beta role secondary repl
ctl alpha role primary solo
ctl alpha role primary repl
wait_socket "$work/solo.nbd"
wait_socket "$work/repl.nbd"
echo "bench/metrics: waiting for the initial synchronization of repl"
i=0
until ctl alpha list repl | grep -q '^  status: complete' &&
	! ctl alpha list repl | grep -q 'synchronization:' &&
	ctl alpha list repl | grep -q '^  dirty: 0 '; do
	i=$((i + 1))
	[ $i -lt 6000 ] || die "repl never synchronized"
	sleep 0.1
done

reloads() {
	grep -c 'configuration reloaded successfully' "$work/$1.log" || true
}

# set_metrics on|off: both daemons reload the configuration.
set_metrics() {
	write_conf "$1"
	for nd in alpha beta; do
		before=$(reloads "$nd")
		kill -HUP "$(cat "$work/$nd.pid-of-server")"
		i=0
		while [ "$(reloads "$nd")" -le "$before" ]; do
			i=$((i + 1))
			[ $i -lt 200 ] || die "$nd did not reload"
			sleep 0.05
		done
	done
	if [ "$1" = on ]; then
		curl -sf "http://127.0.0.1:$mport_a/metrics" >/dev/null || die "no metrics after the reload"
	fi
}

# A scraper while metrics are on, as Prometheus would scrape.
start_scraper() {
	(
		while :; do
			curl -sf -o /dev/null "http://127.0.0.1:$mport_a/metrics" || true
			curl -sf -o /dev/null "http://127.0.0.1:$mport_b/metrics" || true
			sleep "$scrape"
		done
	) &
	spid=$!
}

stop_scraper() {
	[ -z "$spid" ] || { kill "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true; }
	spid=""
}

wl_opts() {
	case $1 in
	seqwrite) echo "--rw=write --bs=1M --iodepth=16" ;;
	randwrite32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
	randread32) echo "--rw=randread --bs=4k --iodepth=32" ;;
	*) die "unknown workload $1" ;;
	esac
}

echo "bench/metrics: warm-up (one sequential pass per resource)"
for r in $resources; do
	fio --ioengine=nbd --uri="nbd+unix:///$r?socket=$work/$r.nbd" --name=warm \
		--rw=write --bs=1M --iodepth=16 --size=100% --output-format=json \
		--output="$work/warm-$r.json" >"$work/warm-$r.log" 2>&1 || die "fio warm-up on $r failed"
done

for r in $resources; do
	for wl in $workloads; do
		opts=$(wl_opts "$wl")
		round=1
		while [ $round -le "$rounds" ]; do
			# ABBA: off first in odd rounds, on first in even ones.
			order="off on"
			[ $((round % 2)) -eq 1 ] || order="on off"
			for m in $order; do
				set_metrics "$m"
				[ "$m" = off ] || start_scraper
				echo "bench/metrics: $r $wl round $round/$rounds: metrics $m"
				# shellcheck disable=SC2086
				fio --ioengine=nbd --uri="nbd+unix:///$r?socket=$work/$r.nbd" --name="$wl" \
					$opts --time_based --runtime="$runtime" --ramp_time="$ramp" \
					--output-format=json --output="$work/$r-$wl-$m-$round.json" \
					>"$work/$r-$wl-$m-$round.log" 2>&1 &
				fpid=$!
				wait "$fpid" || { cat "$work/$r-$wl-$m-$round.log" >&2; die "fio failed"; }
				fpid=""
				stop_scraper
			done
			round=$((round + 1))
		done
	done
done
echo "bench/metrics: load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$work" "$target" "$rounds" "$resources" "$workloads" <<'PY'
import json
import statistics
import sys

work, target, rounds, resources, workloads = sys.argv[1:6]
target = float(target)
rounds = int(rounds)
desc = {
    "seqwrite": ("1M seq write QD16", "MiB/s"),
    "randwrite32": ("4k rand write QD32", "IOPS"),
    "randread32": ("4k rand read QD32", "IOPS"),
}
what_res = {"solo": "NBD export", "repl": "fullsync replication"}


def measure(path, unit):
    with open(path) as f:
        job = json.load(f)["jobs"][0]
    if job.get("error"):
        sys.exit(f"bench/metrics: fio reported error {job['error']} in {path}")
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["bw_bytes"] / 1048576 if unit == "MiB/s" else side["iops"]


print()
print(f"metrics on vs off, median of {rounds} alternating runs each; target ratio {target}")
hdr = f"{'resource':<21} {'workload':<19} {'unit':<6} {'on':>10} {'off':>10} {'ratio':>6}  verdict"
print(hdr)
print("-" * len(hdr))
lines = []
for r in resources.split():
    for wl in workloads.split():
        what, unit = desc[wl]
        runs = {
            m: [measure(f"{work}/{r}-{wl}-{m}-{n}.json", unit) for n in range(1, rounds + 1)]
            for m in ("on", "off")
        }
        on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
        ratio = on / off if off else 0.0
        verdict = "PASS" if ratio >= target else "BELOW"
        print(f"{what_res[r]:<21} {what:<19} {unit:<6} {on:>10.1f} {off:>10.1f} {ratio:>6.3f}  {verdict}")
        lines.append((r, what, runs))
print()
print("all runs (on | off):")
for r, what, runs in lines:
    fa = " ".join(f"{v:.0f}" for v in runs["on"])
    fb = " ".join(f"{v:.0f}" for v in runs["off"])
    print(f"  {what_res[r]:<21} {what:<19} {fa} | {fb}")
PY

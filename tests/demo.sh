#!/bin/sh
# make demo: two HAST nodes, "alpha" (127.0.0.1) and "beta" (127.0.0.2), from
# one hast.conf on this machine (hastd --node), walking through the main job:
# create the metadata, give the nodes roles, write through the primary's NBD
# export, lose the primary (kill -9), promote the secondary with the data
# intact, bring the old primary back as secondary (only what changed is
# copied), and swap the roles back. The data is checked against the writer's
# reference image at every step. Everything lives in a temporary directory
# that is removed at the end.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
bin=${HAST_BIN:-$top/target/debug}
work=$(mktemp -d "${TMPDIR:-/tmp}/hast-demo.XXXXXX")
pids=""

cleanup() {
	for p in $pids; do
		kill -9 "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

say() {
	printf '\n==> %s\n' "$*"
}

run() {
	printf '$ %s\n' "$*"
	"$@"
}

free_port() {
	python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"
}

pa=$(free_port 127.0.0.1)
pb=$(free_port 127.0.0.2)
size=256M
truncate -s $size "$work/alpha.img" "$work/beta.img"
cat > "$work/hook.sh" <<HOOK
#!/bin/sh
echo "hook: \$*" >> "$work/hooks.log"
HOOK
chmod +x "$work/hook.sh"
cat > "$work/hast.conf" <<CONF
# One configuration for both nodes; hastd --node picks the on-block.
exec $work/hook.sh
replication fullsync
checksum crc32
compression lzf

on alpha {
	control uds://$work/alpha.ctl
	pidfile $work/alpha.pid
	listen tcp4://127.0.0.1:$pa
}
on beta {
	control uds://$work/beta.ctl
	pidfile $work/beta.pid
	listen tcp4://127.0.0.2:$pb
}

resource shared {
	on alpha {
		local $work/alpha.img
		remote tcp4://127.0.0.2:$pb
		source tcp4://127.0.0.1
		nbd $work/alpha.nbd
	}
	on beta {
		local $work/beta.img
		remote tcp4://127.0.0.1:$pa
		source tcp4://127.0.0.2
		nbd $work/beta.nbd
	}
}
CONF

ctl() {
	node=$1
	cmd=$2
	shift 2
	run "$bin/hastctl" "$cmd" -c "$work/hast.conf" --node "$node" "$@"
}

start() {
	"$bin/hastd" -F -c "$work/hast.conf" --node "$1" 2>>"$work/$1.log" &
	eval "pid_$1=$!"
	pids="$pids $!"
	i=0
	while ! "$bin/hastctl" status -c "$work/hast.conf" --node "$1" >/dev/null 2>&1; do
		i=$((i + 1))
		[ $i -lt 200 ] || { echo "hastd $1 did not start:"; cat "$work/$1.log"; exit 1; }
		sleep 0.05
	done
}

# Wait until `hastctl list` on $1 shows $2 (a fixed string), 60 s at most.
wait_list() {
	i=0
	while ! "$bin/hastctl" list -c "$work/hast.conf" --node "$1" shared | grep -qF "$2"; do
		i=$((i + 1))
		[ $i -lt 600 ] || { echo "timeout waiting for '$2' on $1"; cat "$work/$1.log"; exit 1; }
		sleep 0.1
	done
}

# Wait until node $1 shows no resync progress line: dirty can reach 0 a
# moment before the resync ends (the peer's flush and the counters).
wait_synced() {
	wait_list "$1" "dirty: 0 "
	i=0
	while "$bin/hastctl" list -c "$work/hast.conf" --node "$1" shared | grep -qF "synchronization:"; do
		i=$((i + 1))
		[ $i -lt 600 ] || { echo "timeout waiting for the resync to end on $1"; cat "$work/$1.log"; exit 1; }
		sleep 0.1
	done
}

uri() {
	echo "nbd+unix:///shared?socket=$work/$1.nbd"
}

# Write pattern $2 at $3 (length $4) through node $1's export and into the
# reference image.
write() {
	run qemu-io -f raw "$(uri "$1")" -c "write -P $2 $3 $4" | grep -v '^[0-9]' || true
	qemu-io -f raw "$work/reference.img" -c "write -P $2 $3 $4" >/dev/null
}

# Compare node $1's data, through its export, with the reference image.
check() {
	run qemu-img compare -f raw -F raw "$(uri "$1")" "$work/reference.img"
}

say "The configuration"
cat "$work/hast.conf"

say "Initialize the metadata on both nodes"
ctl alpha create shared
ctl beta create shared
ctl alpha dump shared

say "Start hastd for both nodes and give them roles"
start alpha
start beta
ctl beta role secondary shared
ctl alpha role primary shared
wait_list alpha "status: complete"
ctl alpha status
ctl beta status

say "Write through alpha's NBD export; every write reaches beta before it is acknowledged"
datasize=$("$bin/hastctl" dump -c "$work/hast.conf" --node alpha shared | awk '/datasize/ {print $2}')
truncate -s "$datasize" "$work/reference.img"
write alpha 0x11 0 16M
write alpha 0x22 100M 8M
check alpha
ctl alpha list shared

say "alpha dies (kill -9); beta becomes primary with every acknowledged write"
# shellcheck disable=SC2154 # set by start() through eval
kill -9 "$pid_alpha"
ctl beta role primary shared
check beta
write beta 0x33 40M 6M
ctl beta list shared

say "alpha comes back as secondary: only what changed is copied"
start alpha
ctl alpha role secondary shared
wait_list beta "status: complete"
wait_synced beta
grep -E 'synchronization (started|complete)' "$work/beta.log" | sed 's/^.*INFO /    /'
ctl alpha dump shared

say "Roles swapped back: alpha primary again, data identical"
ctl beta role secondary shared
ctl alpha role primary shared
wait_list alpha "status: complete"
check alpha
ctl alpha status
localoff=$("$bin/hastctl" dump -c "$work/hast.conf" --node alpha shared | awk '/localoff/ {print $2}')
run cmp -i "$localoff:$localoff" "$work/alpha.img" "$work/beta.img"
echo "data areas of alpha and beta identical"

say "Back to init on both nodes and stop the daemons"
ctl alpha role init all
ctl beta role init all
for p in $pids; do
	kill "$p" 2>/dev/null || true
done
wait 2>/dev/null || true
pids=""

say "Hook calls"
cat "$work/hooks.log"
say "Demo finished: the data matched the writer's reference at every step"

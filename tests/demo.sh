#!/bin/sh
# make demo: two HAST nodes, "alpha" and "beta", from one hast.conf on this
# machine (hastd --node), walking through the administration of a resource:
# create the metadata, start both daemons, give them roles, look at status,
# list and dump, change roles back and stop. Everything lives in a temporary
# directory that is removed at the end.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
bin=${HAST_BIN:-$top/target/debug}
work=$(mktemp -d "${TMPDIR:-/tmp}/hast-demo.XXXXXX")
pids=""

cleanup() {
	for p in $pids; do
		kill "$p" 2>/dev/null || true
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

truncate -s 256M "$work/alpha.img" "$work/beta.img"
cat > "$work/hook.sh" <<HOOK
#!/bin/sh
echo "hook: \$*" >> "$work/hooks.log"
HOOK
chmod +x "$work/hook.sh"
cat > "$work/hast.conf" <<CONF
# One configuration for both nodes; hastd --node picks the on-block.
exec $work/hook.sh
replication fullsync

on alpha {
	control uds://$work/alpha.ctl
	pidfile $work/alpha.pid
}
on beta {
	control uds://$work/beta.ctl
	pidfile $work/beta.pid
}

resource shared {
	on alpha {
		local $work/alpha.img
		remote tcp4://127.0.0.2
		nbd $work/alpha.nbd
	}
	on beta {
		local $work/beta.img
		remote tcp4://127.0.0.1
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

say "The configuration"
cat "$work/hast.conf"

say "Initialize the metadata on both nodes (default extent size 2 MB, keepdirty 64)"
ctl alpha create shared
ctl beta create shared
ctl alpha dump shared

say "Start hastd for both nodes"
for node in alpha beta; do
	"$bin/hastd" -F -c "$work/hast.conf" --node "$node" 2>"$work/$node.log" &
	pids="$pids $!"
done
for node in alpha beta; do
	i=0
	while [ ! -S "$work/$node.ctl" ]; do
		i=$((i + 1))
		[ $i -lt 200 ] || { echo "hastd $node did not start:"; cat "$work/$node.log"; exit 1; }
		sleep 0.05
	done
done
ctl alpha status

say "Make alpha primary and beta secondary"
ctl alpha role primary shared
ctl beta role secondary shared
ctl alpha status
ctl beta status
ctl alpha list shared
ctl alpha dump shared

say "Swap the roles"
ctl alpha role secondary shared
ctl beta role primary shared
ctl beta status

say "Back to init on both nodes and stop the daemons"
ctl alpha role init all
ctl beta role init all
for p in $pids; do
	kill "$p"
done
wait
pids=""
sleep 0.2

say "Hook calls"
cat "$work/hooks.log"
say "Demo finished"

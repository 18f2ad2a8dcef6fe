//! The data of `status`, `list`, `dump` and `events` for the machine-readable
//! outputs (`--libxo json|xml`): every field the text shows, plus the
//! synchronization (state, bytes done, total and pending, rate, time left),
//! the link (connected since, the last disconnect and its reason, the last
//! failed attempt, encryption once there is any), link security (mode,
//! protection, the peer's key fingerprint), the metadata counters,
//! split-brain and consistency. Field names and types are those of
//! docs/hastctl.schema.json.

use hast::control::status::{Entry, EntryError, ResourceStatus, StatusReply};
use hast::events::{Field, Record};
use hast::metadata::Metadata;

use crate::xo::{Node, Obj};

/// How far a synchronization is: percent done, average rate in bytes per
/// second, and seconds left (`None` while the rate is unknown).
pub fn sync_figures(total: u64, done: u64, msecs: u64) -> (f64, u64, Option<u64>) {
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let rate = if msecs == 0 {
        0
    } else {
        (done as u128 * 1000 / u128::from(msecs)) as u64
    };
    (pct, rate, total.saturating_sub(done).checked_div(rate))
}

fn error(name: &str, err: &EntryError) -> Node {
    let mut e = Obj::new().int("code", i64::from(err.code));
    if let Some(m) = &err.message {
        e = e.str("message", m.as_str());
    }
    Obj::new().str("name", name).node("error", e.done()).done()
}

/// The entries of a STATUS reply, each built by `f` (or as an error).
fn entries(reply: &StatusReply, f: impl Fn(&str, &ResourceStatus) -> Node) -> Node {
    let list = reply
        .entries
        .iter()
        .map(|Entry { name, status }| match status {
            Ok(st) => f(name, st),
            Err(err) => error(name, err),
        })
        .collect();
    Obj::new().node("resource", Node::List(list)).done()
}

/// `hastctl status`: one entry per resource.
pub fn status(reply: &StatusReply) -> Node {
    entries(reply, |name, st| {
        Obj::new()
            .str("name", name)
            .opt(
                "status",
                st.activity.as_ref().map(|a| Node::Str(a.status.clone())),
            )
            .str("role", st.role.as_str())
            .str("localpath", st.localpath.as_str())
            .str("remoteaddr", st.remoteaddr.as_str())
            .bool("split-brain", st.split_brain)
            .done()
    })
}

/// `hastctl list`: everything hastd reports of each resource.
pub fn list(reply: &StatusReply) -> Node {
    entries(reply, list_entry)
}

fn list_entry(name: &str, st: &ResourceStatus) -> Node {
    let a = st.activity.clone().unwrap_or_default();
    let r = &a.requests;
    let q = &a.queues;
    let statistics = Obj::new()
        .num("reads", r.reads)
        .num("writes", r.writes)
        .num("deletes", r.deletes)
        .num("flushes", r.flushes)
        .num("activemap-updates", r.activemap_updates)
        .node(
            "local-errors",
            Obj::new()
                .num("read", r.read_errors)
                .num("write", r.write_errors)
                .num("delete", r.delete_errors)
                .num("flush", r.flush_errors)
                .done(),
        )
        .node(
            "queues",
            Obj::new()
                .num("local", q.local)
                .num("send", q.send)
                .num("recv", q.recv)
                .num("done", q.done)
                .num("idle", q.idle)
                .done(),
        )
        .done();
    let pending = st.sync_pending.unwrap_or(0);
    let sync = match &a.sync {
        Some(p) => {
            let (_, rate, eta) = sync_figures(p.total, p.done, p.msecs);
            Obj::new()
                .str("state", "running")
                .num("bytes-done", p.done)
                .num("bytes-total", p.total)
                .num("bytes-pending", pending)
                .num("rate", rate)
                .opt("eta", eta.map(Node::Num))
        }
        None if pending > 0 => Obj::new()
            .str("state", "pending")
            .num("bytes-pending", pending),
        None => Obj::new().str("state", "none"),
    };
    let link = st.link.as_ref().map(|l| {
        let mut o = Obj::new().str(
            "state",
            if l.connected_since_ms.is_some() {
                "connected"
            } else {
                "disconnected"
            },
        );
        if let Some(t) = l.connected_since_ms {
            o = o.str("connected-since", hast::clock::rfc3339_ms(t));
        }
        if let Some((t, why)) = &l.last_disconnect {
            o = o.node(
                "last-disconnect",
                Obj::new()
                    .str("time", hast::clock::rfc3339_ms(*t))
                    .str("reason", why.as_str())
                    .done(),
            );
        }
        if let Some(e) = &l.last_error {
            o = o.str("last-error", e.as_str());
        }
        if let Some(e) = &l.encryption {
            o = o.str("encryption", e.as_str());
        }
        o.num("reconnects", l.reconnects).done()
    });
    let security = st.security.as_ref().map(|l| {
        Obj::new()
            .str("mode", l.security.as_str())
            .opt("protection", l.link.clone().map(Node::Str))
            .opt("peer-fingerprint", l.peerfingerprint.clone().map(Node::Str))
            .done()
    });
    let counters = st.counters.map(|c| {
        Obj::new()
            .num("resuid", c.resuid)
            .num("localcnt", c.localcnt)
            .num("remotecnt", c.remotecnt)
            .done()
    });
    Obj::new()
        .str("name", name)
        .str("role", st.role.as_str())
        .str("provname", st.provname.as_str())
        .str("localpath", st.localpath.as_str())
        .num("extentsize", u64::from(a.extentsize))
        .num("keepdirty", u64::from(a.keepdirty))
        .str("remoteaddr", st.remoteaddr.as_str())
        .opt("sourceaddr", st.sourceaddr.clone().map(Node::Str))
        .str("replication", st.replication.as_str())
        .str("checksum", st.checksum.as_str())
        .str("compression", st.compression.as_str())
        .opt(
            "status",
            st.activity.as_ref().map(|a| Node::Str(a.status.clone())),
        )
        .opt(
            "workerpid",
            (st.workerpid != 0).then(|| Node::Int(i64::from(st.workerpid))),
        )
        .num("dirty", a.dirty)
        .node("statistics", statistics)
        .node("synchronization", sync.done())
        .bool("consistent", !st.inconsistent)
        .bool("split-brain", st.split_brain)
        .opt("link", link)
        .opt("security", security)
        .opt("counters", counters)
        .done()
}

/// One resource of `hastctl dump`: its metadata, or why it could not be
/// read.
pub fn dump_entry(name: &str, md: Result<&Metadata, &str>) -> Node {
    match md {
        Ok(md) => Obj::new()
            .str("name", md.resource.as_str())
            .num("datasize", md.datasize)
            .num("extentsize", u64::from(md.extentsize))
            .num("keepdirty", u64::from(md.keepdirty))
            .num("localoff", md.localoff)
            .num("resuid", md.resuid)
            .num("localcnt", md.localcnt)
            .num("remotecnt", md.remotecnt)
            .str("prevrole", md.prevrole.as_str())
            .bool("consistent", !md.syncing)
            .done(),
        Err(why) => error(
            name,
            &EntryError {
                code: 255,
                message: Some(why.to_string()),
            },
        ),
    }
}

/// The entries of `hastctl dump`.
pub fn dump(entries: Vec<Node>) -> Node {
    Obj::new().node("resource", Node::List(entries)).done()
}

/// One event.
pub fn event(r: &Record) -> Node {
    let mut o = Obj::new()
        .str("time", hast::clock::rfc3339_ms(r.time_ms))
        .num("seq", r.seq)
        .str("resource", r.resource.as_str())
        .str("type", r.event.as_str());
    for (k, v) in &r.fields {
        o = match v {
            Field::Str(s) => o.str(k, s.as_str()),
            Field::U64(n) => o.num(k, *n),
            Field::I64(n) => o.int(k, *n),
            Field::Bool(b) => o.bool(k, *b),
        };
    }
    o.done()
}

//! hastd's event stream: what happens to the resources (role changes, the
//! link coming and going with the reason, synchronizations starting,
//! progressing, ending or interrupted, split-brain, local I/O errors,
//! request timeouts, hooks and how they ended), numbered in the order it
//! happened and handed to every watcher (`hastctl events`, served by
//! `engine::watch`).
//!
//! One bus per process: [`publish`] never waits for a watcher. Each watcher
//! reads from its own place in a bounded ring ([`CAPACITY`] events); one
//! that falls further behind loses its place and is dropped, the daemon
//! and the other watchers carry on.
//!
//! On the control socket each event is one nv frame: `seq` (uint64),
//! `time` (uint64, milliseconds since the epoch), `resource`, `event`
//! (strings) and the event's fields (strings, uint64, int64, and uint8 for
//! yes/no).

use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::broadcast;

use crate::control::status::{ResourceStatus, StatusReply};
use crate::nv::{Nv, Value};

/// Events a watcher may lag behind before it is dropped.
pub const CAPACITY: usize = 1024;

/// nv name of the frame that ends the state sent first (not an event).
pub const END_OF_STATE: &str = "end_of_state";

/// nv name of the frame hastd sends before it drops a watcher: why.
pub const DROPPED: &str = "dropped";

/// One value of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Str(String),
    U64(u64),
    I64(i64),
    Bool(bool),
}

/// One event as watchers receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Order of publication, from 1; a gap means events were lost.
    pub seq: u64,
    /// Milliseconds since the epoch.
    pub time_ms: u64,
    pub resource: String,
    /// The event's name (`role`, `connect`, ..., `exists` for the state).
    pub event: String,
    pub fields: Vec<(String, Field)>,
}

/// Which way a synchronization copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToPeer,
    FromPeer,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToPeer => "to-peer",
            Direction::FromPeer => "from-peer",
        }
    }
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEnd {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Killed(i32),
    /// It could not be started, or waited for.
    Failed(String),
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The role changed.
    Role { old: String, new: String },
    /// A session with the peer is established.
    Connect { peer: String },
    /// The session with the peer ended.
    Disconnect { peer: String, reason: String },
    /// A synchronization started: `bytes` to copy.
    SyncStart { bytes: u64, direction: Direction },
    /// How far a running synchronization is (at most once a second).
    SyncProgress { done: u64, total: u64, rate: u64 },
    /// A synchronization finished: `bytes` copied in `msecs`.
    SyncDone { bytes: u64, msecs: u64 },
    /// A synchronization was interrupted (the link went down).
    SyncInterrupted { done: u64, total: u64 },
    /// Both nodes changed the data while apart; they refuse to connect.
    SplitBrain { peer: String },
    /// The local provider failed a request.
    IoError {
        op: &'static str,
        offset: u64,
        length: u64,
        errno: i32,
    },
    /// A request or the peer stayed silent past the timeout.
    Timeout { what: String, secs: u64 },
    /// The `exec` hook for `hook` (its event name) ended.
    Hook {
        hook: String,
        program: String,
        pid: Option<u32>,
        end: HookEnd,
    },
}

impl Kind {
    /// The event's name in the stream.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Role { .. } => "role",
            Kind::Connect { .. } => "connect",
            Kind::Disconnect { .. } => "disconnect",
            Kind::SyncStart { .. } => "sync-start",
            Kind::SyncProgress { .. } => "sync-progress",
            Kind::SyncDone { .. } => "sync-done",
            Kind::SyncInterrupted { .. } => "sync-interrupted",
            Kind::SplitBrain { .. } => "split-brain",
            Kind::IoError { .. } => "io-error",
            Kind::Timeout { .. } => "timeout",
            Kind::Hook { .. } => "hook",
        }
    }

    fn fields(self) -> Vec<(String, Field)> {
        let s = |k: &str, v: String| (k.to_string(), Field::Str(v));
        let u = |k: &str, v: u64| (k.to_string(), Field::U64(v));
        match self {
            Kind::Role { old, new } => vec![s("old", old), s("new", new)],
            Kind::Connect { peer } => vec![s("peer", peer)],
            Kind::Disconnect { peer, reason } => vec![s("peer", peer), s("reason", reason)],
            Kind::SyncStart { bytes, direction } => vec![
                u("bytes", bytes),
                s("direction", direction.as_str().to_string()),
            ],
            Kind::SyncProgress { done, total, rate } => {
                vec![u("done", done), u("total", total), u("rate", rate)]
            }
            Kind::SyncDone { bytes, msecs } => vec![u("bytes", bytes), u("msecs", msecs)],
            Kind::SyncInterrupted { done, total } => vec![u("done", done), u("total", total)],
            Kind::SplitBrain { peer } => vec![s("peer", peer)],
            Kind::IoError {
                op,
                offset,
                length,
                errno,
            } => vec![
                s("op", op.to_string()),
                u("offset", offset),
                u("length", length),
                ("errno".to_string(), Field::I64(i64::from(errno))),
                s(
                    "error",
                    std::io::Error::from_raw_os_error(errno).to_string(),
                ),
            ],
            Kind::Timeout { what, secs } => vec![s("what", what), u("secs", secs)],
            Kind::Hook {
                hook,
                program,
                pid,
                end,
            } => {
                let mut f = vec![s("hook", hook), s("program", program)];
                if let Some(pid) = pid {
                    f.push(u("pid", u64::from(pid)));
                }
                match end {
                    HookEnd::Exited(code) => f.push(("exit".into(), Field::I64(i64::from(code)))),
                    HookEnd::Killed(sig) => f.push(("signal".into(), Field::I64(i64::from(sig)))),
                    HookEnd::Failed(why) => f.push(s("error", why)),
                }
                f
            }
        }
    }
}

struct Bus {
    tx: broadcast::Sender<Arc<Record>>,
    /// The last seq handed out; held while a record is sent, so records
    /// reach watchers in seq order and their times never go backwards.
    last: Mutex<u64>,
}

fn bus() -> &'static Bus {
    static BUS: OnceLock<Bus> = OnceLock::new();
    BUS.get_or_init(|| Bus {
        tx: broadcast::channel(CAPACITY).0,
        last: Mutex::new(0),
    })
}

/// Publish an event of `resource`; never blocks on watchers.
pub fn publish(resource: &str, kind: Kind) {
    let bus = bus();
    let mut last = bus.last.lock().unwrap_or_else(|p| p.into_inner());
    *last += 1;
    tracing::trace!(seq = *last, resource, event = kind.name(), "event");
    if bus.tx.receiver_count() == 0 {
        return;
    }
    let record = Record {
        seq: *last,
        time_ms: crate::clock::now_ms(),
        resource: resource.to_string(),
        event: kind.name().to_string(),
        fields: kind.fields(),
    };
    // No receiver left is not an error: nobody watches.
    let _ = bus.tx.send(Arc::new(record));
}

/// A new watcher's place on the bus: every event published from now on.
pub fn subscribe() -> broadcast::Receiver<Arc<Record>> {
    bus().tx.subscribe()
}

/// The seq of the last event published (0 before the first).
pub fn last_seq() -> u64 {
    *bus().last.lock().unwrap_or_else(|p| p.into_inner())
}

impl Record {
    /// The record of the state of one resource (`exists`), from its status
    /// (with the request statistics and queues when `statistics`), or an
    /// `error` record for a resource hastd reported an error for.
    pub fn state(reply: &StatusReply, statistics: bool, seq: u64) -> Vec<Record> {
        let time_ms = crate::clock::now_ms();
        reply
            .entries
            .iter()
            .map(|e| match &e.status {
                Ok(st) => Record {
                    seq,
                    time_ms,
                    resource: e.name.clone(),
                    event: "exists".to_string(),
                    fields: state_fields(st, statistics),
                },
                Err(err) => {
                    let mut fields = vec![("code".to_string(), Field::I64(i64::from(err.code)))];
                    if let Some(m) = &err.message {
                        fields.push(("message".to_string(), Field::Str(m.clone())));
                    }
                    Record {
                        seq,
                        time_ms,
                        resource: e.name.clone(),
                        event: "error".to_string(),
                        fields,
                    }
                }
            })
            .collect()
    }

    /// The nv frame of this record.
    pub fn to_nv(&self) -> Nv {
        let mut nv = Nv::new();
        nv.add_u64("seq", self.seq)
            .add_u64("time", self.time_ms)
            .add_string("resource", self.resource.as_str())
            .add_string("event", self.event.as_str());
        for (name, f) in &self.fields {
            match f {
                Field::Str(s) => nv.add_string(name.as_str(), s.as_str()),
                Field::U64(v) => nv.add_u64(name.as_str(), *v),
                Field::I64(v) => nv.add_i64(name.as_str(), *v),
                Field::Bool(b) => nv.add_u8(name.as_str(), u8::from(*b)),
            };
        }
        nv
    }

    /// A record read back from its frame; `None` when it is not one (no
    /// `event` or `resource`). Fields of other types are skipped.
    pub fn from_nv(nv: &Nv) -> Option<Record> {
        let mut r = Record {
            seq: nv.get_u64("seq").unwrap_or(0),
            time_ms: nv.get_u64("time").unwrap_or(0),
            resource: nv.get_string("resource")?.to_string(),
            event: nv.get_string("event")?.to_string(),
            fields: Vec::new(),
        };
        for (name, v) in nv.iter() {
            if matches!(name, "seq" | "time" | "resource" | "event") {
                continue;
            }
            let f = match v {
                Value::String(s) => Field::Str(s.clone()),
                Value::Uint64(v) => Field::U64(*v),
                Value::Int64(v) => Field::I64(*v),
                Value::Uint8(v) => Field::Bool(*v != 0),
                _ => continue,
            };
            r.fields.push((name.to_string(), f));
        }
        Some(r)
    }

    /// The record as one line of text: the time, the resource, the event
    /// and its fields as `name=value` (a value with a space, a quote, an
    /// `=` or nothing in it is quoted).
    pub fn text_line(&self) -> String {
        let mut line = format!(
            "{} {} {}",
            crate::clock::rfc3339_ms(self.time_ms),
            self.resource,
            self.event
        );
        for (name, f) in &self.fields {
            let v = match f {
                Field::Str(s) => quote(s),
                Field::U64(v) => v.to_string(),
                Field::I64(v) => v.to_string(),
                Field::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
            };
            line.push(' ');
            line.push_str(name);
            line.push('=');
            line.push_str(&v);
        }
        line
    }
}

/// `s` as is, or quoted with `"` and `\` escaped when it is empty or holds
/// white space, a quote, a backslash or `=`.
fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '\\' | '='));
    if plain {
        return s.to_string();
    }
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c if c.is_control() => q.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The fields of an `exists` record.
fn state_fields(st: &ResourceStatus, statistics: bool) -> Vec<(String, Field)> {
    let s = |k: &str, v: &str| (k.to_string(), Field::Str(v.to_string()));
    let u = |k: &str, v: u64| (k.to_string(), Field::U64(v));
    let b = |k: &str, v: bool| (k.to_string(), Field::Bool(v));
    let mut f = vec![s("role", &st.role)];
    if let Some(a) = &st.activity {
        f.push(s("status", &a.status));
    }
    if let Some(link) = &st.link {
        f.push(b("connected", link.connected_since_ms.is_some()));
    }
    f.push(b("split-brain", st.split_brain));
    f.push(b("consistent", !st.inconsistent));
    if let Some(a) = &st.activity {
        f.push(u("dirty", a.dirty));
        if let Some(p) = &a.sync {
            f.push(u("sync-done", p.done));
            f.push(u("sync-total", p.total));
        }
    }
    if let Some(p) = st.sync_pending {
        f.push(u("sync-pending", p));
    }
    if statistics {
        let a = st.activity.clone().unwrap_or_default();
        let r = &a.requests;
        let q = &a.queues;
        f.extend([
            u("reads", r.reads),
            u("writes", r.writes),
            u("deletes", r.deletes),
            u("flushes", r.flushes),
            u("activemap-updates", r.activemap_updates),
            u("read-errors", r.read_errors),
            u("write-errors", r.write_errors),
            u("delete-errors", r.delete_errors),
            u("flush-errors", r.flush_errors),
            u("queue-local", q.local),
            u("queue-send", q.send),
            u("queue-recv", q.recv),
            u("queue-done", q.done),
        ]);
    }
    f
}

/// Held by the tests that publish more than [`CAPACITY`] events at once:
/// the bus is the process's, and a watcher of one such test would lag
/// behind the events of another running at the same time.
#[cfg(test)]
pub(crate) static BULK_TEST: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_frame() {
        let r = Record {
            seq: 7,
            time_ms: 1_700_000_000_123,
            resource: "data".into(),
            event: "disconnect".into(),
            fields: vec![
                ("peer".into(), Field::Str("tcp4://10.0.0.2:8457".into())),
                (
                    "reason".into(),
                    Field::Str("connection reset by peer".into()),
                ),
                ("n".into(), Field::U64(3)),
                ("errno".into(), Field::I64(-5)),
                ("up".into(), Field::Bool(true)),
            ],
        };
        let nv = Nv::decode(&r.to_nv().encode().unwrap()).unwrap();
        assert_eq!(Record::from_nv(&nv), Some(r.clone()));
        assert_eq!(
            r.text_line(),
            "2023-11-14T22:13:20.123Z data disconnect peer=tcp4://10.0.0.2:8457 \
             reason=\"connection reset by peer\" n=3 errno=-5 up=yes"
        );
        assert_eq!(Record::from_nv(&Nv::new()), None);
    }

    #[test]
    fn quoting_keeps_a_line_one_line() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("a=b"), "\"a=b\"");
        assert_eq!(quote("say \"hi\"\nbye\\"), "\"say \\\"hi\\\"\\nbye\\\\\"");
    }

    /// Watchers see events in publication order with increasing seqs; a
    /// watcher that does not read loses its place instead of holding the
    /// publisher (which never waits).
    #[test]
    fn watchers_get_events_in_order_and_a_stalled_one_lags() {
        let _bulk = BULK_TEST.lock().unwrap_or_else(|p| p.into_inner());
        let mut rx = subscribe();
        let mut stalled = subscribe();
        let start = std::time::Instant::now();
        for i in 0..(CAPACITY as u64 + 10) {
            publish(
                "order-test",
                Kind::SyncProgress {
                    done: i,
                    total: 1,
                    rate: 0,
                },
            );
            // Only this test publishes "order-test"; read as we go so this
            // watcher never lags.
            loop {
                match rx.try_recv() {
                    Ok(r) if r.resource == "order-test" => {
                        assert_eq!(r.fields[0], ("done".to_string(), Field::U64(i)));
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) => panic!("event {i} missing: {e:?}"),
                }
            }
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert!(matches!(
            stalled.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }
}

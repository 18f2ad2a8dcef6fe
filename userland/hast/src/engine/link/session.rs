//! A connected session: the core's upcalls sent to the peer (pieces when
//! larger than it accepts), replies handed back by seq, keepalives,
//! synchronization marks, and a watchdog for unanswered requests. The
//! session's tasks live in one set and end together.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Checksum, Compression, ResourceConfig};
use crate::core::{SyncDir, Upcall, UpcallKind};
use crate::dataplane::{Dataplane, HostUpcall};
use crate::events::Kind;
use crate::hooks;
use crate::metrics::ResourceMetrics;
use crate::proto::{self, Limits};
use crate::splitbrain::SyncSrc;
use crate::wire::{Cmd, Reply, Request};

use super::connect::Connected;
use super::{lock, LinkError, Replicator};
use crate::wire::{MAX_IO, MAX_IO_BYTES};

/// Send a keepalive after this long without a request.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// Wire seqs of resync requests live above this bit, apart from the
/// core's seqs of client requests.
pub(super) const SYNC_SEQ_BASE: u64 = 1 << 62;

/// A client request sent to the peer in pieces (it was larger than the
/// peer accepts): answered once every piece is.
pub(super) struct Joint {
    up: Upcall,
    remaining: usize,
    error: i32,
    /// A read's bytes, filled piece by piece.
    data: Vec<u8>,
}

/// Who waits for a wire seq's reply.
pub(super) enum Waiter {
    /// A client request's remote half (the wire seq is the core's seq).
    Core { up: Upcall },
    /// A piece of a split client request: `length` bytes at `at` within it.
    Piece {
        joint: Arc<Mutex<Joint>>,
        at: usize,
        length: u64,
        read: bool,
    },
    /// A resync request; `read_len` is the length of a read, 0 for a write.
    Sync {
        tx: oneshot::Sender<(i16, Option<Vec<u8>>)>,
        read_len: u64,
    },
}

impl Waiter {
    /// Bytes of data the reply carries when it succeeds (reads only).
    fn data_length(&self) -> u64 {
        match self {
            Waiter::Core { up } if up.kind == UpcallKind::Read => up.length,
            Waiter::Piece {
                length, read: true, ..
            } => *length,
            Waiter::Sync { read_len, .. } => *read_len,
            _ => 0,
        }
    }
}

/// A frame for the sender task.
pub(super) struct Outgoing {
    req: Request,
    data: Option<Bytes>,
    /// A synchronization mark carried by a keepalive (see
    /// [`crate::handshake::SYNC_MARK_FIELD`]).
    mark: Option<SyncMark>,
}

impl Outgoing {
    pub(super) fn request(req: Request, data: Option<Bytes>) -> Outgoing {
        Outgoing {
            req,
            data,
            mark: None,
        }
    }
}

/// The marks a primary sends a secondary that announced `synctrack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SyncMark {
    /// A synchronization toward the secondary starts: its copy is about to
    /// mix old and new blocks.
    Start,
    /// Everything synchronized so far is flushed on both sides and the
    /// sync map is empty: the secondary's copy is consistent and its own
    /// activemap is no longer needed.
    Done,
}

impl SyncMark {
    fn as_str(self) -> &'static str {
        match self {
            SyncMark::Start => crate::handshake::SYNC_MARK_START,
            SyncMark::Done => crate::handshake::SYNC_MARK_DONE,
        }
    }
}

/// A connected session's handles.
#[derive(Clone)]
pub(super) struct Session {
    pub(super) tx: mpsc::UnboundedSender<Outgoing>,
    pub(super) waiters: Arc<Mutex<HashMap<u64, (Waiter, Instant)>>>,
}

impl Replicator {
    /// Answer the core's upcalls until the host is gone or the task is
    /// aborted.
    pub async fn upcalls(self: Arc<Self>) {
        while let Some(h) = self.dp.next_upcall().await {
            self.upcall(h).await;
        }
    }

    async fn upcall(&self, h: HostUpcall) {
        let HostUpcall { up, data } = h;
        let dp = &self.dp;
        let cmd = match up.kind {
            UpcallKind::Bump => {
                if crate::failpoint::check(crate::failpoint::SLOW_BUMP).is_some() {
                    tokio::time::sleep(crate::failpoint::SLOW_BUMP_DELAY).await;
                }
                let error = match self
                    .persist(|m| m.localcnt = m.localcnt.saturating_add(1))
                    .await
                {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::error!("unable to persist the localcnt bump: {e}");
                        libc::EIO
                    }
                };
                dp.bump_done(error);
                return;
            }
            // The hosts answer these themselves.
            UpcallKind::SyncLocked | UpcallKind::SyncIoDone { .. } => return,
            UpcallKind::Read => Cmd::Read,
            UpcallKind::Write { .. } => Cmd::Write,
            UpcallKind::Delete => Cmd::Delete,
            UpcallKind::Flush => Cmd::Flush,
        };
        let session = lock(&self.session).clone();
        let Some(session) = session else {
            let error = if cmd == Cmd::Read {
                libc::EIO
            } else {
                libc::ENOTCONN
            };
            dp.remote_done(&up, error, None);
            return;
        };
        if cmd == Cmd::Write && data.as_ref().is_none_or(|d| d.len() as u64 != up.length) {
            dp.remote_done(&up, libc::EIO, None);
            return;
        }
        let memsync = matches!(up.kind, UpcallKind::Write { memsync: true });
        if matches!(cmd, Cmd::Write | Cmd::Delete) {
            self.unflushed_bytes.fetch_add(up.length, Ordering::Relaxed);
        }
        let max = self.max_io.load(Ordering::SeqCst).max(1);
        if cmd != Cmd::Flush && up.length > max {
            self.send_pieces(&session, cmd, up, data, max);
            return;
        }
        lock(&session.waiters).insert(up.seq, (Waiter::Core { up }, Instant::now()));
        let req = Request {
            cmd,
            seq: up.seq,
            offset: up.offset,
            length: if cmd == Cmd::Flush { 0 } else { up.length },
            memsync,
        };
        if session.tx.send(Outgoing::request(req, data)).is_err() {
            lock(&session.waiters).remove(&up.seq);
            dp.remote_done(&up, libc::ENOTCONN, None);
        }
    }

    /// Send a request larger than the peer accepts as pieces it accepts
    /// (the kernel host passes requests up to MAXPHYS); the core hears of
    /// it once, when the last piece is answered.
    fn send_pieces(&self, session: &Session, cmd: Cmd, up: Upcall, data: Option<Bytes>, max: u64) {
        let read = cmd == Cmd::Read;
        let pieces: Vec<(u64, u64)> = crate::split::pieces(0, up.length, max).collect();
        tracing::debug!(
            "{} seq {} of {} bytes goes to the peer in {} pieces",
            cmd.name(),
            up.seq,
            up.length,
            pieces.len()
        );
        let joint = Arc::new(Mutex::new(Joint {
            up,
            remaining: pieces.len(),
            error: 0,
            data: if read {
                vec![0u8; usize::try_from(up.length).unwrap_or(0)]
            } else {
                Vec::new()
            },
        }));
        for (at, n) in pieces {
            let seq = self.sync_seq.fetch_add(1, Ordering::Relaxed);
            let Ok(start) = usize::try_from(at) else {
                return;
            };
            let end = start.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
            // A write's data is exactly its length (checked by the caller).
            let piece = data.as_ref().map(|d| {
                d.get(start..end)
                    .map_or_else(Bytes::new, |p| d.slice_ref(p))
            });
            let waiter = Waiter::Piece {
                joint: joint.clone(),
                at: start,
                length: n,
                read,
            };
            lock(&session.waiters).insert(seq, (waiter, Instant::now()));
            let req = Request {
                cmd,
                seq,
                offset: up.offset + at,
                length: n,
                memsync: matches!(up.kind, UpcallKind::Write { memsync: true }),
            };
            if session.tx.send(Outgoing::request(req, piece)).is_err() {
                // The session is gone: the link loss fails the request.
                lock(&session.waiters).remove(&seq);
                return;
            }
        }
    }

    /// Run a connected session until it fails, `stop` turns true
    /// (`Closed`) or the security settings change (`rekey`: `Rekey`).
    pub(super) async fn session(
        self: Arc<Self>,
        parts: Connected,
        cfg: &ResourceConfig,
        mut stop: watch::Receiver<bool>,
        mut rekey: watch::Receiver<u64>,
    ) -> LinkError {
        let Connected { out, inc, geo, .. } = parts;
        let (tx, rx) = mpsc::unbounded_channel();
        let waiters = Arc::new(Mutex::new(HashMap::new()));
        *lock(&self.session) = Some(Session {
            tx: tx.clone(),
            waiters: waiters.clone(),
        });
        let maxio = u64::from(geo.maxio.unwrap_or(crate::handshake::DEFAULT_MAXIO)).min(MAX_IO);
        if crate::failpoint::check(crate::failpoint::ENGINE_SPLIT).is_some() {
            self.dp.set_max_request(u64::MAX);
            let piece = crate::failpoint::ENGINE_SPLIT_SIZE.min(maxio);
            self.max_io.store(piece, Ordering::SeqCst);
            tracing::info!("fail point: requests split by the engine in {piece}-byte pieces");
        } else {
            self.dp.set_max_request(maxio);
            self.max_io.store(maxio, Ordering::SeqCst);
        }
        self.dp.set_sync_dir(match geo.syncsrc {
            SyncSrc::Primary => SyncDir::ToPeer,
            SyncSrc::Secondary => SyncDir::FromPeer,
        });
        self.dp.set_link(true);
        self.connected.store(true, Ordering::SeqCst);
        tracing::info!("connected to {}", cfg.remote);
        // The connect event goes out before the waiting promotion goes on,
        // so that a watcher sees it before the role change.
        self.peer.connected();
        self.first_attempt.send_replace(true);
        hooks::notify(
            cfg.exec.as_deref(),
            &cfg.name,
            Kind::Connect {
                peer: cfg.remote.clone(),
            },
        );
        let timeout = Duration::from_secs(u64::from(cfg.timeout.max(1)));
        // The session's tasks live in one set: when one ends the others
        // are aborted and awaited, and the connections they hold are
        // closed, before anything reconnects.
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(send_loop(out, rx, cfg.compression, cfg.checksum));
        tasks.spawn(recv_loop(
            inc,
            waiters.clone(),
            self.dp.clone(),
            self.metrics.clone(),
        ));
        tasks.spawn(watchdog(waiters, timeout));
        let me = self.clone();
        let sync_cfg = cfg.clone();
        tasks.spawn(async move {
            me.resync(geo, sync_cfg).await;
            LinkError::Closed
        });
        tasks.spawn(self.clone().flusher());
        tasks.spawn(self.clone().progress_reporter(cfg.name.clone()));
        // A stop ends the session like a failure: its tasks are shut down
        // (and awaited) before it returns.
        tasks.spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            LinkError::Closed
        });
        // So do new keys, pins or secrets: the link is re-established with
        // them (the Replicator that sends them outlives the session).
        tasks.spawn(async move {
            if rekey.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            LinkError::Rekey
        });
        let result = match tasks.join_next().await {
            Some(Ok(e)) => e,
            _ => LinkError::Closed,
        };
        tasks.shutdown().await;
        result
    }

    /// Send one resync request and wait for the reply.
    pub(super) async fn sync_request(
        &self,
        cmd: Cmd,
        offset: u64,
        length: u64,
        data: Option<Bytes>,
    ) -> Result<Option<Vec<u8>>, LinkError> {
        let session = lock(&self.session).clone().ok_or(LinkError::Closed)?;
        let seq = self.sync_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let read_len = if cmd == Cmd::Read { length } else { 0 };
        let waiter = Waiter::Sync { tx, read_len };
        lock(&session.waiters).insert(seq, (waiter, Instant::now()));
        let req = Request {
            cmd,
            seq,
            offset,
            length,
            memsync: false,
        };
        session
            .tx
            .send(Outgoing::request(req, data))
            .map_err(|_| LinkError::Closed)?;
        let (error, data) = rx.await.map_err(|_| LinkError::Closed)?;
        if cmd == Cmd::Flush && flush_unsupported(error) {
            // A provider without a cache flush (the reference answers
            // EOPNOTSUPP): nothing more to wait for.
            tracing::debug!("the peer's provider does not support flushes");
            return Ok(None);
        }
        if error != 0 {
            return Err(LinkError::PeerFailed {
                cmd: cmd.name(),
                offset,
                length,
                errno: error,
            });
        }
        Ok(data)
    }

    /// Queue a synchronization mark for the peer, after every request
    /// queued before it.
    pub(super) fn send_mark(&self, mark: SyncMark) -> Result<(), LinkError> {
        let session = lock(&self.session).clone().ok_or(LinkError::Closed)?;
        let req = Request {
            cmd: Cmd::Keepalive,
            seq: 0,
            offset: 0,
            length: 0,
            memsync: false,
        };
        tracing::debug!("synchronization mark {} sent", mark.as_str());
        session
            .tx
            .send(Outgoing {
                req,
                data: None,
                mark: Some(mark),
            })
            .map_err(|_| LinkError::Closed)
    }
}

/// The peer answered a flush with EOPNOTSUPP (its own errno value: this
/// host's, or FreeBSD's 45 from a reference secondary).
fn flush_unsupported(error: i16) -> bool {
    const FREEBSD_EOPNOTSUPP: i32 = 45;
    let e = i32::from(error);
    e == libc::EOPNOTSUPP || e == FREEBSD_EOPNOTSUPP
}

/// Write requests to connection 1, in the order they were queued, with a
/// keepalive after [`KEEPALIVE`] idle.
async fn send_loop<W: AsyncWrite + Unpin>(
    mut out: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    compression: Compression,
    checksum: Checksum,
) -> LinkError {
    let keepalive = Request {
        cmd: Cmd::Keepalive,
        seq: 0,
        offset: 0,
        length: 0,
        memsync: false,
    };
    loop {
        let sent = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
            Err(_) => proto::write_frame_async(&mut out, &keepalive.to_nv(), &[]).await,
            Ok(None) => return LinkError::Closed,
            Ok(Some(o)) => {
                let mut nv = o.req.to_nv();
                if let Some(mark) = o.mark {
                    nv.add_string(crate::handshake::SYNC_MARK_FIELD, mark.as_str());
                }
                match &o.data {
                    Some(d) => {
                        let payload = crate::payload::encode(&mut nv, d, compression, checksum);
                        proto::write_frame_async(&mut out, &nv, &payload).await
                    }
                    None => proto::write_frame_async(&mut out, &nv, &[]).await,
                }
            }
        };
        if let Err(e) = sent {
            return e.into();
        }
    }
}

/// Read replies from connection 2 and hand them to their waiters.
async fn recv_loop<R: AsyncRead + Unpin>(
    mut inc: R,
    waiters: Arc<Mutex<HashMap<u64, (Waiter, Instant)>>>,
    dp: Arc<dyn Dataplane>,
    metrics: Arc<ResourceMetrics>,
) -> LinkError {
    let limits = Limits::replication(MAX_IO_BYTES);
    loop {
        let (nv, payload) = match proto::read_frame_async(&mut inc, limits).await {
            Ok(f) => f,
            Err(e) => return e.into(),
        };
        let Some(reply) = Reply::from_nv(&nv) else {
            return LinkError::ReplyWithoutSeq;
        };
        if reply.received {
            dp.remote_received(reply.seq);
            continue;
        }
        let Some((waiter, sent)) = lock(&waiters).remove(&reply.seq) else {
            tracing::debug!("reply for unknown seq {} ignored", reply.seq);
            continue;
        };
        metrics.remote_done(sent);
        let expect = waiter.data_length();
        let data = if reply.error != 0 || expect == 0 {
            None
        } else {
            match crate::payload::decode(
                &nv,
                payload,
                usize::try_from(expect).unwrap_or(usize::MAX),
                MAX_IO_BYTES,
            ) {
                Ok(d) => Some(d),
                Err(source) => {
                    return LinkError::Payload {
                        what: "a reply's data",
                        source,
                    }
                }
            }
        };
        match waiter {
            // A peer provider without a cache flush has nothing to flush
            // (the reference answers EOPNOTSUPP): the flush covers.
            Waiter::Core { up }
                if up.kind == UpcallKind::Flush && flush_unsupported(reply.error) =>
            {
                dp.remote_done(&up, 0, None)
            }
            Waiter::Core { up } => dp.remote_done(&up, i32::from(reply.error), data),
            Waiter::Piece {
                joint, at, read, ..
            } => {
                let mut j = lock(&joint);
                let mut error = i32::from(reply.error);
                if read && error == 0 {
                    let placed = data.and_then(|d| {
                        let end = at.checked_add(d.len())?;
                        j.data.get_mut(at..end)?.copy_from_slice(&d);
                        Some(())
                    });
                    if placed.is_none() {
                        error = libc::EIO;
                    }
                }
                if j.error == 0 {
                    j.error = error;
                }
                j.remaining = j.remaining.saturating_sub(1);
                if j.remaining == 0 {
                    let whole = std::mem::take(&mut j.data);
                    let (up, error) = (j.up, j.error);
                    drop(j);
                    dp.remote_done(&up, error, read.then_some(whole));
                }
            }
            Waiter::Sync { tx, .. } => {
                let _ = tx.send((reply.error, data));
            }
        }
    }
}

/// End the session when a request stays unanswered past the timeout.
async fn watchdog(
    waiters: Arc<Mutex<HashMap<u64, (Waiter, Instant)>>>,
    timeout: Duration,
) -> LinkError {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let late = lock(&waiters)
            .iter()
            .find(|(_, (_, t))| t.elapsed() > timeout)
            .map(|(&seq, _)| seq);
        if let Some(seq) = late {
            return LinkError::Unanswered(seq);
        }
    }
}

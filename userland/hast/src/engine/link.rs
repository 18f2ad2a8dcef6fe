//! The primary's replication link: connects to the secondary (two TCP
//! connections, the version-2 handshake), then pipelines the core's
//! upcalls to the peer and hands the replies back by seq; sends keepalives;
//! resynchronizes dirty extents in the direction the handshake decided,
//! under the core's range locks, many chunks in flight; reconnects with
//! quick first retries, then every 10 seconds. Without a session the
//! upcalls get the degraded answers (the localcnt bump is persisted, peer
//! reads fail).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::addr::{Addr, AddrKind};
use crate::config::{Checksum, Compression, ResourceConfig};
use crate::core::{MapKind, SyncDir, Upcall, UpcallKind};
use crate::dataplane::{Dataplane, DataplaneError, HostUpcall};
use crate::handshake::{Attach, Geometry, Hello, Welcome};
use crate::hooks::{self, Event};
use crate::metadata::Metadata;
use crate::nv::NV_MAX_SIZE;
use crate::proto::{self, Limits, HAST_PROTO_VERSION};
use crate::splitbrain::{SyncSrc, SPLIT_BRAIN_MSG};
use crate::wire::{Cmd, Reply, Request};

use super::secondary::{MAX_IO, MAX_IO_BYTES};

/// Send a keepalive after this long without a request.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Reconnection delays: quick first retries, then the reference's 10 s.
const BACKOFF: [u64; 5] = [0, 1, 1, 2, 5];
const RETRY: Duration = Duration::from_secs(10);
/// Extents resynchronized at once.
const SYNC_EXTENTS_IN_FLIGHT: usize = 8;
/// While resynchronizing, flush both sides after every this many bytes (not
/// waiting for the answer), so that the disks write the data while more
/// arrives and its extents leave the map as they go; a pass ends with a
/// flush it does wait for.
const SYNC_FLUSH_EVERY: u64 = 128 << 20;
/// The resync scheduler looks at the sync map again after this long when
/// nothing is dirty (writes of an outage, or failed on the peer, join it
/// later), and retries a failed pass after [`RESYNC_RETRY`].
const RESYNC_IDLE: Duration = Duration::from_millis(200);
const RESYNC_RETRY: Duration = Duration::from_secs(1);
/// Extents written on both sides leave the map only after a flush of both
/// (the core's rule): the primary asks for one this long after the first
/// write since the last one, or after [`FLUSH_BYTES`] written, whichever
/// comes first, so that a pair whose clients never flush does not keep
/// every written extent dirty.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
const FLUSH_BYTES: u64 = 64 << 20;
/// How often the flusher looks at the bytes written.
const FLUSH_TICK: Duration = Duration::from_millis(100);
/// Wire seqs of resync requests live above this bit, apart from the
/// core's seqs of client requests.
const SYNC_SEQ_BASE: u64 = 1 << 62;

/// Why a connection attempt or a session failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("unable to connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {0} timed out")]
    Timeout(String),
    #[error("{0}")]
    Proto(#[from] proto::ProtoError),
    #[error("{0}")]
    Handshake(#[from] crate::handshake::HandshakeError),
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Local(String),
    #[error("payload: {0}")]
    Payload(String),
    #[error("peer did not answer request seq {0} within the timeout")]
    Unanswered(u64),
    #[error("session closed")]
    Closed,
}

/// Resync progress, for `hastctl list`.
#[derive(Debug, Default)]
pub struct Progress {
    pub active: AtomicBool,
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub started: Mutex<Option<Instant>>,
}

/// A client request sent to the peer in pieces (it was larger than the
/// peer accepts): answered once every piece is.
struct Joint {
    up: Upcall,
    remaining: usize,
    error: i32,
    /// A read's bytes, filled piece by piece.
    data: Vec<u8>,
}

/// Who waits for a wire seq's reply.
enum Waiter {
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
struct Outgoing {
    req: Request,
    data: Option<Bytes>,
    /// A synchronization mark carried by a keepalive (see
    /// [`crate::handshake::SYNC_MARK_FIELD`]).
    mark: Option<SyncMark>,
}

impl Outgoing {
    fn request(req: Request, data: Option<Bytes>) -> Outgoing {
        Outgoing {
            req,
            data,
            mark: None,
        }
    }
}

/// The marks a primary sends a secondary that announced `synctrack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncMark {
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
struct Session {
    tx: mpsc::UnboundedSender<Outgoing>,
    waiters: Arc<Mutex<HashMap<u64, (Waiter, Instant)>>>,
}

/// The replication state of one primary resource.
pub struct Replicator {
    dp: Arc<dyn Dataplane>,
    md: Arc<Mutex<Metadata>>,
    cfg: Mutex<ResourceConfig>,
    session: Mutex<Option<Session>>,
    /// Wire seqs of resync requests and pieces of split requests.
    sync_seq: AtomicU64,
    /// The largest request the connected peer accepts.
    max_io: AtomicU64,
    pub progress: Progress,
    connected: AtomicBool,
    /// Turns true once the first connection attempt is over (connected, with
    /// the sync direction known, or failed): only then may clients be
    /// served, so a stale local copy is never read.
    first_attempt: watch::Sender<bool>,
    /// Bytes of writes sent to the peer since the last flush of both sides.
    unflushed_bytes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replicator {
    pub fn new(
        dp: Arc<dyn Dataplane>,
        md: Arc<Mutex<Metadata>>,
        cfg: ResourceConfig,
    ) -> Arc<Replicator> {
        Arc::new(Replicator {
            dp,
            md,
            cfg: Mutex::new(cfg),
            session: Mutex::new(None),
            sync_seq: AtomicU64::new(SYNC_SEQ_BASE),
            max_io: AtomicU64::new(u64::from(crate::handshake::DEFAULT_MAXIO)),
            progress: Progress::default(),
            connected: AtomicBool::new(false),
            first_attempt: watch::channel(false).0,
            unflushed_bytes: AtomicU64::new(0),
        })
    }

    /// Wait until the first connection attempt is over (see `first_attempt`).
    pub async fn first_attempt_done(&self) {
        let mut rx = self.first_attempt.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Whether a session with the peer is established.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Take new replication settings (SIGHUP on a primary).
    pub fn set_config(&self, cfg: ResourceConfig) {
        *lock(&self.cfg) = cfg;
    }

    fn cfg(&self) -> ResourceConfig {
        lock(&self.cfg).clone()
    }

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
        let mut pieces = Vec::new();
        let mut at = 0u64;
        while at < up.length {
            let n = max.min(up.length - at);
            pieces.push((at, n));
            at += n;
        }
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

    /// Change the metadata with `f` and write it through the host that
    /// owns the disk, holding the metadata lock throughout, so that two
    /// updates (a counter and the role, say) never undo each other.
    pub async fn record(
        &self,
        f: impl FnOnce(&mut Metadata) + Send + 'static,
        flush: bool,
    ) -> Result<(), DataplaneError> {
        let md = self.md.clone();
        let dp = self.dp.clone();
        tokio::task::spawn_blocking(move || {
            let mut m = lock(&md);
            let mut next = m.clone();
            f(&mut next);
            dp.write_metadata(&next, flush)?;
            tracing::debug!(
                localcnt = next.localcnt,
                remotecnt = next.remotecnt,
                prevrole = %next.prevrole,
                "metadata recorded"
            );
            *m = next;
            Ok(())
        })
        .await
        .map_err(|_| DataplaneError::Closed)?
    }

    /// [`Replicator::record`], flushed, for the counters.
    async fn persist(&self, f: impl FnOnce(&mut Metadata) + Send + 'static) -> Result<(), String> {
        self.record(f, true).await.map_err(|e| e.to_string())
    }

    /// Connect, serve, reconnect, until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut attempt = 0usize;
        let mut last_error = String::new();
        let mut split_brain_reported = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let cfg = self.cfg();
            let Some(remote) = cfg.remote_addr.clone() else {
                // `remote none`: stay degraded.
                self.first_attempt.send_replace(true);
                let _ = stop.changed().await;
                return;
            };
            match self.connect(&cfg, &remote).await {
                Ok(parts) => {
                    attempt = 0;
                    last_error.clear();
                    split_brain_reported = false;
                    let ended = tokio::select! {
                        r = self.clone().session(parts, &cfg) => r,
                        _ = stop.changed() => LinkError::Closed,
                    };
                    self.disconnect(&cfg, &ended);
                    if *stop.borrow() {
                        return;
                    }
                }
                Err(e) => {
                    self.first_attempt.send_replace(true);
                    let msg = e.to_string();
                    if msg.contains(SPLIT_BRAIN_MSG) && !split_brain_reported {
                        tracing::error!("split-brain detected with {remote}; both nodes refuse to synchronize (see hastctl(8) for the recovery)");
                        hooks::run(cfg.exec.as_deref(), &cfg.name, &Event::SplitBrain);
                        split_brain_reported = true;
                    }
                    if msg != last_error {
                        tracing::warn!("replication to {remote} not established: {msg}");
                        last_error = msg;
                    } else {
                        tracing::debug!("replication to {remote} not established: {msg}");
                    }
                }
            }
            let delay = BACKOFF
                .get(attempt)
                .map_or(RETRY, |&s| Duration::from_secs(s));
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn disconnect(&self, cfg: &ResourceConfig, why: &LinkError) {
        if let Some(session) = lock(&self.session).take() {
            lock(&session.waiters).clear();
        }
        self.connected.store(false, Ordering::SeqCst);
        self.dp.set_link(false);
        // Resync tasks waiting for a range learn the session is gone.
        self.dp.sync_cancel();
        tracing::warn!("disconnected from {}: {why}", cfg.remote);
        // A synchronization that was running ends here, whatever ended the
        // session.
        if self.progress.active.swap(false, Ordering::SeqCst) {
            tracing::warn!("synchronization interrupted; it goes on after the next connection");
            hooks::run(cfg.exec.as_deref(), &cfg.name, &Event::SyncIntr);
        }
        hooks::run(cfg.exec.as_deref(), &cfg.name, &Event::Disconnect);
    }

    /// The handshake; on success the two connections and the peer's answer.
    async fn connect(
        &self,
        cfg: &ResourceConfig,
        remote: &Addr,
    ) -> Result<(TcpStream, TcpStream, Geometry), LinkError> {
        let timeout = Duration::from_secs(u64::from(cfg.timeout.max(1)));
        let limits = Limits {
            max_header: NV_MAX_SIZE,
            max_payload: 0,
        };
        let mut out = dial(cfg, remote, timeout).await?;
        let hello = Hello {
            resource: cfg.name.clone(),
            version: HAST_PROTO_VERSION,
        };
        proto::write_frame_async(&mut out, &hello.to_nv(), &[]).await?;
        let (nv, _) = tokio::time::timeout(timeout, proto::read_frame_async(&mut out, limits))
            .await
            .map_err(|_| LinkError::Timeout(remote.to_string()))??;
        let token = match Welcome::from_nv(&nv)? {
            Welcome::Accepted { token, .. } => token,
            Welcome::Refused { errmsg, .. } => {
                return Err(crate::handshake::HandshakeError::Refused(errmsg).into())
            }
        };
        let mut inc = dial(cfg, remote, timeout).await?;
        let (virgin, resuid, localcnt, remotecnt) = {
            let m = lock(&self.md).clone();
            (m.resuid == 0, m.resuid, m.localcnt, m.remotecnt)
        };
        let resuid = if virgin {
            let id = new_resuid();
            self.persist(move |m| m.resuid = id)
                .await
                .map_err(LinkError::Local)?;
            id
        } else {
            resuid
        };
        let attach = Attach {
            resource: cfg.name.clone(),
            token,
            virgin,
            resuid,
            localcnt,
            remotecnt,
            synctrack: true,
        };
        proto::write_frame_async(&mut inc, &attach.to_nv(), &[]).await?;
        let (ours_size, ours_extent, mapsize) = {
            let m = lock(&self.md);
            (m.datasize, m.extentsize, self.dp.map_size())
        };
        let mapsize = mapsize.map_err(|e| LinkError::Local(e.to_string()))?;
        // A peer with a larger sector size rounds its map up further (by
        // less than one 64 KiB sector).
        let map_limits = Limits {
            max_header: NV_MAX_SIZE,
            max_payload: mapsize.saturating_add(64 * 1024),
        };
        let (nv, map) =
            tokio::time::timeout(timeout, proto::read_frame_async(&mut out, map_limits))
                .await
                .map_err(|_| LinkError::Timeout(remote.to_string()))??;
        let geo = Geometry::from_nv(&nv)?;
        if u64::try_from(geo.datasize).ok() != Some(ours_size) {
            return Err(LinkError::Mismatch(format!(
                "data size differs between nodes (local={ours_size}, remote={})",
                geo.datasize
            )));
        }
        if u32::try_from(geo.extentsize).ok() != Some(ours_extent) {
            return Err(LinkError::Mismatch(format!(
                "extent size differs between nodes (local={ours_extent}, remote={})",
                geo.extentsize
            )));
        }
        if geo.virgin && localcnt == 0 {
            // The secondary is new: only this node has the data.
            self.persist(|m| m.localcnt = m.localcnt.saturating_add(1))
                .await
                .map_err(LinkError::Local)?;
        }
        if geo.mapsize > 0 {
            // The map comes through the data pipeline, like a data
            // payload (FreeBSD's secondary sends it with hast_proto_send):
            // a clean map hole-compressed to 4 bytes, a checksum verified.
            // Only `mapsize` tells its decoded length; bits past our
            // extents (a peer with another sector size rounds the map up
            // differently) are padding.
            let theirs = usize::try_from(geo.mapsize).unwrap_or(usize::MAX);
            let mut map = crate::payload::decode(&nv, map, theirs, theirs.max(mapsize))
                .map_err(|e| LinkError::Payload(format!("the peer's activemap: {e}")))?;
            map.resize(mapsize, 0);
            self.dp
                .map_merge(&map)
                .map_err(|e| LinkError::Local(e.to_string()))?;
        }
        Ok((out, inc, geo))
    }

    /// Run a connected session until it fails.
    async fn session(
        self: Arc<Self>,
        parts: (TcpStream, TcpStream, Geometry),
        cfg: &ResourceConfig,
    ) -> LinkError {
        let (out, inc, geo) = parts;
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
        self.first_attempt.send_replace(true);
        tracing::info!("connected to {}", cfg.remote);
        hooks::run(cfg.exec.as_deref(), &cfg.name, &Event::Connect);
        let timeout = Duration::from_secs(u64::from(cfg.timeout.max(1)));
        // The session's tasks live in one set: when one ends (or the
        // session is dropped) the others are aborted, and the connections
        // they hold are closed, before anything reconnects.
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(send_loop(out, rx, cfg.compression, cfg.checksum));
        tasks.spawn(recv_loop(inc, waiters.clone(), self.dp.clone()));
        tasks.spawn(watchdog(waiters, timeout));
        let me = self.clone();
        let sync_cfg = cfg.clone();
        tasks.spawn(async move {
            me.resync(geo, sync_cfg).await;
            LinkError::Closed
        });
        tasks.spawn(self.clone().flusher());
        let result = match tasks.join_next().await {
            Some(Ok(e)) => e,
            _ => LinkError::Closed,
        };
        tasks.shutdown().await;
        result
    }

    /// Ask for a flush of both sides by time and by bytes written (see
    /// [`FLUSH_INTERVAL`]); never returns. Extents whose copy on the peer
    /// ended while a flush ran joined the map after it started and wait
    /// for the next one: when no write comes any more, the core's count of
    /// such extents asks for it (looked at once per interval).
    async fn flusher(self: Arc<Self>) -> LinkError {
        self.unflushed_bytes.store(0, Ordering::Relaxed);
        let mut since: Option<Instant> = None;
        let mut looked = Instant::now();
        loop {
            tokio::time::sleep(FLUSH_TICK).await;
            let bytes = self.unflushed_bytes.load(Ordering::Relaxed);
            if bytes == 0 && since.is_none() {
                if looked.elapsed() < FLUSH_INTERVAL {
                    continue;
                }
                looked = Instant::now();
                let waiting = self
                    .dp
                    .stats()
                    .is_ok_and(|s| s.unflushed > 0 && !s.flush_busy);
                if !waiting {
                    continue;
                }
                // Due at once: they waited an interval already.
                let now = Instant::now();
                since = Some(now.checked_sub(FLUSH_INTERVAL).unwrap_or(now));
            }
            let first = *since.get_or_insert_with(Instant::now);
            if bytes < FLUSH_BYTES && first.elapsed() < FLUSH_INTERVAL {
                continue;
            }
            match self.dp.flush() {
                // A flush already running covers only what came before it:
                // try again at the next tick.
                Err(DataplaneError::Busy) => continue,
                Err(e) => tracing::debug!("periodic flush not started: {e}"),
                Ok(_) => {}
            }
            self.unflushed_bytes.fetch_sub(bytes, Ordering::Relaxed);
            since = None;
        }
    }

    /// Start a flush of both sides and wait for it; `Ok` once every extent
    /// written on both sides before the call has left the map.
    async fn flush_both(&self, limit: Duration) -> Result<(), LinkError> {
        let start = Instant::now();
        let gen = loop {
            match self.dp.flush() {
                Ok(g) => break g,
                Err(DataplaneError::Busy) if start.elapsed() < limit => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(LinkError::Local(format!("flush of both sides: {e}"))),
            }
        };
        loop {
            let st = self
                .dp
                .stats()
                .map_err(|e| LinkError::Local(e.to_string()))?;
            // Wrapping comparison of flush numbers.
            if (st.flush_done.wrapping_sub(gen) as i32) >= 0 {
                return Ok(());
            }
            if !st.flush_busy || start.elapsed() > limit {
                return Err(LinkError::Local(
                    "a flush of both sides failed (the local provider or the peer)".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Send one resync request and wait for the reply.
    async fn sync_request(
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
            return Err(LinkError::Local(format!(
                "peer failed {}({offset}, {length}): errno {error}",
                cmd.name()
            )));
        }
        Ok(data)
    }

    /// Synchronize one extent range under a sync lock, its chunks in
    /// parallel; the extent is cleared only when every chunk was confirmed.
    async fn sync_extent(
        self: Arc<Self>,
        dir: SyncSrc,
        off: u64,
        len: u64,
    ) -> Result<u64, LinkError> {
        let lock_seq = match self.dp.sync_lock(off, len).await {
            Ok(seq) => seq,
            Err(DataplaneError::Closed) => return Err(LinkError::Closed),
            Err(e) => return Err(LinkError::Local(e.to_string())),
        };
        let mut chunks = Vec::new();
        let mut at = off;
        let max = self.max_io.load(Ordering::SeqCst).max(1);
        while at < off + len {
            let n = max.min(off + len - at);
            chunks.push((at, n));
            at += n;
        }
        let mut set = tokio::task::JoinSet::new();
        for (at, n) in chunks {
            let me = self.clone();
            set.spawn(async move { me.sync_chunk(dir, lock_seq, at, n).await });
        }
        let mut first_error = None;
        while let Some(r) = set.join_next().await {
            let r = r.unwrap_or(Err(LinkError::Closed));
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        let released = self.dp.sync_release(lock_seq, first_error.is_none());
        if let Some(e) = first_error {
            return Err(e);
        }
        released.map_err(|e| LinkError::Local(e.to_string()))?;
        Ok(len)
    }

    async fn sync_chunk(
        &self,
        dir: SyncSrc,
        lock_seq: u64,
        at: u64,
        n: u64,
    ) -> Result<(), LinkError> {
        match dir {
            SyncSrc::Primary => {
                let data = self
                    .dp
                    .sync_read(lock_seq, at, n)
                    .await
                    .map_err(|e| LinkError::Local(e.to_string()))?;
                self.sync_request(Cmd::Write, at, n, Some(Bytes::from(data)))
                    .await?;
            }
            SyncSrc::Secondary => {
                let data = self
                    .sync_request(Cmd::Read, at, n, None)
                    .await?
                    .ok_or_else(|| {
                        LinkError::Local("peer sent no data for a resync read".into())
                    })?;
                self.dp
                    .sync_write(lock_seq, at, Bytes::from(data))
                    .await
                    .map_err(|e| LinkError::Local(e.to_string()))?;
            }
        }
        self.progress.done.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// The extents of the sync map, and their bytes.
    fn sync_dirty(&self) -> Result<(Vec<u64>, u64), LinkError> {
        let (extentsize, datasize) = {
            let m = lock(&self.md);
            (u64::from(m.extentsize).max(1), m.datasize)
        };
        let map = self
            .dp
            .map(MapKind::Sync)
            .map_err(|e| LinkError::Local(format!("unable to read the sync map: {e}")))?;
        let extents = datasize.div_ceil(extentsize);
        let dirty: Vec<u64> = (0..extents)
            .filter(|&e| {
                map.get(usize::try_from(e / 8).unwrap_or(usize::MAX))
                    .is_some_and(|b| b & (1 << (e % 8)) != 0)
            })
            .collect();
        let bytes = dirty
            .iter()
            .map(|&e| extentsize.min(datasize.saturating_sub(e * extentsize)))
            .sum();
        Ok((dirty, bytes))
    }

    /// The resync scheduler of a session, until the session ends: it
    /// synchronizes every extent of the sync map in the direction the
    /// handshake decided, and looks again, so extents that become dirty
    /// while connected (writes of an outage released late, writes the
    /// peer failed) are synchronized too, in passes toward the peer. Only
    /// when the sync map is empty, no write can still join it and the
    /// copied data is flushed on both sides are the counters recorded (the
    /// reference's rule: localcnt := the peer's remotecnt, remotecnt := the
    /// peer's localcnt) and the progress line dropped.
    ///
    /// The copy being written is inconsistent until then, and says so
    /// durably before the first synchronized block reaches it: this node's
    /// metadata (`syncing`) when it synchronizes from the peer, the
    /// secondary's through a `start` mark (and `done` at the end) when the
    /// peer announced `synctrack`.
    async fn resync(self: Arc<Self>, geo: Geometry, cfg: ResourceConfig) {
        let limit = Duration::from_secs(u64::from(cfg.timeout.max(1))) * 2;
        let mut dir = geo.syncsrc;
        let mut synced = 0u64;
        let mut copied_in = None;
        // The peer was told a synchronization toward it started, and not
        // yet that it ended; the first `done` of a session is sent even
        // when nothing was synchronized (an earlier session may have ended
        // between the last flush and its `done`).
        let mut peer_marked = false;
        let mut done_sent = !geo.synctrack;
        loop {
            let (dirty, bytes) = match self.sync_dirty() {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("resync: {e}");
                    tokio::time::sleep(RESYNC_RETRY).await;
                    continue;
                }
            };
            if !dirty.is_empty() {
                if let Err(e) = self
                    .mark_inconsistent(dir, geo.synctrack, &mut peer_marked)
                    .await
                {
                    tracing::error!("synchronization not started: {e}");
                    tokio::time::sleep(RESYNC_RETRY).await;
                    continue;
                }
                self.dp.set_sync_dir(match dir {
                    SyncSrc::Primary => SyncDir::ToPeer,
                    SyncSrc::Secondary => SyncDir::FromPeer,
                });
                if !self.progress.active.swap(true, Ordering::SeqCst) {
                    self.progress.total.store(0, Ordering::Relaxed);
                    self.progress.done.store(0, Ordering::Relaxed);
                    *lock(&self.progress.started) = Some(Instant::now());
                    synced = 0;
                    tracing::info!(
                        "synchronization started: {bytes} bytes in {} extents",
                        dirty.len()
                    );
                    hooks::run(cfg.exec.as_deref(), &cfg.name, &Event::SyncStart);
                }
                self.progress.total.fetch_add(bytes, Ordering::Relaxed);
                let (n, failed) = self.clone().pass(dir, dirty).await;
                synced += n;
                copied_in = lock(&self.progress.started).map(|t| t.elapsed());
                if failed {
                    tokio::time::sleep(RESYNC_RETRY).await;
                }
                continue;
            }
            // Nothing in the sync map now; writes still in flight whose
            // copy on the peer failed join it when they finish.
            let unsynced = self.dp.stats().map_or(1, |s| s.unsynced);
            let (recorded, syncing) = {
                let m = lock(&self.md);
                (
                    (m.localcnt, m.remotecnt) == (geo.remotecnt, geo.localcnt),
                    m.syncing,
                )
            };
            let settled = recorded
                && !syncing
                && !peer_marked
                && done_sent
                && !self.progress.active.load(Ordering::SeqCst);
            if unsynced > 0 || settled {
                tokio::time::sleep(RESYNC_IDLE).await;
                continue;
            }
            // What the passes copied is durable on both sides first.
            if synced > 0 || peer_marked || !done_sent {
                if let Err(e) = self.flush_both(limit).await {
                    tracing::warn!("the synchronized data was not flushed: {e}");
                    tokio::time::sleep(RESYNC_RETRY).await;
                    continue;
                }
                match self.sync_dirty() {
                    Ok((d, _)) if d.is_empty() => {}
                    _ => continue,
                }
            }
            let flushed_in = lock(&self.progress.started).map(|t| t.elapsed());
            if !recorded || syncing {
                let (s_local, s_remote) = (geo.localcnt, geo.remotecnt);
                if let Err(e) = self
                    .persist(move |m| {
                        m.localcnt = s_remote;
                        m.remotecnt = s_local;
                        m.syncing = false;
                    })
                    .await
                {
                    tracing::error!("unable to record the synchronized counters: {e}");
                    tokio::time::sleep(RESYNC_RETRY).await;
                    continue;
                }
            }
            if peer_marked || !done_sent {
                if let Err(e) = self.send_mark(SyncMark::Done) {
                    tracing::warn!("the end of the synchronization was not sent: {e}");
                    tokio::time::sleep(RESYNC_RETRY).await;
                    continue;
                }
                peer_marked = false;
                done_sent = true;
            }
            self.dp.set_sync_dir(SyncDir::None);
            // Later passes repair what the peer failed: toward it.
            dir = SyncSrc::Primary;
            if synced > 0 {
                let secs = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64());
                tracing::info!(
                    "synchronization complete: {synced} bytes synchronized (copied in {:.2} s, both sides flushed by {:.2} s, counters recorded by {:.2} s)",
                    secs(copied_in),
                    secs(flushed_in),
                    secs(lock(&self.progress.started).map(|t| t.elapsed())),
                );
                hooks::run(cfg.exec.as_deref(), &cfg.name, &Event::SyncDone);
                synced = 0;
            }
            // `list` drops its progress line only now: the counters are
            // recorded and the completion is logged.
            self.progress.active.store(false, Ordering::SeqCst);
        }
    }

    /// Before a pass in direction `dir`: the copy it writes is recorded
    /// as inconsistent, durably (this node's metadata), or in order before
    /// the pass's first write (the secondary's, through a `start` mark,
    /// when it understands marks).
    async fn mark_inconsistent(
        &self,
        dir: SyncSrc,
        synctrack: bool,
        peer_marked: &mut bool,
    ) -> Result<(), LinkError> {
        match dir {
            SyncSrc::Secondary => {
                if !lock(&self.md).syncing {
                    self.persist(|m| m.syncing = true)
                        .await
                        .map_err(LinkError::Local)?;
                }
            }
            SyncSrc::Primary => {
                if synctrack && !*peer_marked {
                    self.send_mark(SyncMark::Start)?;
                    *peer_marked = true;
                }
            }
        }
        Ok(())
    }

    /// Queue a synchronization mark for the peer, after every request
    /// queued before it.
    fn send_mark(&self, mark: SyncMark) -> Result<(), LinkError> {
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

    /// One pass over `dirty` extents, many in flight, with flushes of both
    /// sides as it goes: the bytes synchronized, and whether an extent
    /// failed (it stays dirty).
    async fn pass(self: Arc<Self>, dir: SyncSrc, dirty: Vec<u64>) -> (u64, bool) {
        let (extentsize, datasize) = {
            let m = lock(&self.md);
            (u64::from(m.extentsize).max(1), m.datasize)
        };
        let sem = Arc::new(tokio::sync::Semaphore::new(SYNC_EXTENTS_IN_FLIGHT));
        let mut tasks = Vec::new();
        let mut next_flush = self.progress.done.load(Ordering::Relaxed) + SYNC_FLUSH_EVERY;
        for e in dirty {
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break;
            };
            if self.progress.done.load(Ordering::Relaxed) >= next_flush {
                next_flush = next_flush.saturating_add(SYNC_FLUSH_EVERY);
                // Not waited for; one already running is as good.
                let _ = self.dp.flush();
            }
            let me = self.clone();
            let off = e * extentsize;
            let len = extentsize.min(datasize - off);
            tasks.push(tokio::spawn(async move {
                let r = me.sync_extent(dir, off, len).await;
                drop(permit);
                r
            }));
        }
        let mut failed = false;
        let mut synced = 0u64;
        for t in tasks {
            match t.await {
                Ok(Ok(n)) => synced += n,
                Ok(Err(e)) => {
                    tracing::warn!("synchronization of an extent failed, it stays dirty: {e}");
                    failed = true;
                }
                Err(_) => failed = true,
            }
        }
        (synced, failed)
    }
}

/// The peer answered a flush with EOPNOTSUPP (its own errno value: this
/// host's, or FreeBSD's 45 from a reference secondary).
fn flush_unsupported(error: i16) -> bool {
    const FREEBSD_EOPNOTSUPP: i32 = 45;
    let e = i32::from(error);
    e == libc::EOPNOTSUPP || e == FREEBSD_EOPNOTSUPP
}

fn new_resuid() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// Write requests to connection 1, in the order they were queued, with a
/// keepalive after [`KEEPALIVE`] idle.
async fn send_loop(
    mut out: TcpStream,
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
async fn recv_loop(
    mut inc: TcpStream,
    waiters: Arc<Mutex<HashMap<u64, (Waiter, Instant)>>>,
    dp: Arc<dyn Dataplane>,
) -> LinkError {
    let limits = Limits {
        max_header: NV_MAX_SIZE,
        max_payload: usize::try_from(MAX_IO).unwrap_or(usize::MAX),
    };
    loop {
        let (nv, payload) = match proto::read_frame_async(&mut inc, limits).await {
            Ok(f) => f,
            Err(e) => return e.into(),
        };
        let Some(reply) = Reply::from_nv(&nv) else {
            return LinkError::Local("reply without seq".into());
        };
        if reply.received {
            dp.remote_received(reply.seq);
            continue;
        }
        let Some((waiter, _)) = lock(&waiters).remove(&reply.seq) else {
            tracing::debug!("reply for unknown seq {} ignored", reply.seq);
            continue;
        };
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
                Err(e) => return LinkError::Payload(e.to_string()),
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

/// Connect to the peer `remote`, bound to the resource's `source` when it
/// has one, within `timeout` per address tried.
pub(super) async fn dial(
    cfg: &ResourceConfig,
    remote: &Addr,
    timeout: Duration,
) -> Result<TcpStream, LinkError> {
    let err = |source| LinkError::Connect {
        addr: remote.to_string(),
        source,
    };
    let AddrKind::Tcp { .. } = &remote.kind else {
        return Err(err(std::io::Error::other("remote is not a TCP address")));
    };
    let targets = remote.socket_addrs().map_err(err)?;
    let mut last = std::io::Error::other("remote resolves to nothing");
    for target in targets {
        let sock = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(err)?;
        if let Some(src) = &cfg.source {
            let bind = src
                .socket_addrs()
                .map_err(err)?
                .into_iter()
                .find(|a| a.is_ipv4() == target.is_ipv4());
            if let Some(b) = bind {
                sock.bind(b).map_err(err)?;
            }
        }
        match tokio::time::timeout(timeout, sock.connect(target)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => return Err(LinkError::Timeout(remote.to_string())),
        }
    }
    Err(err(last))
}

//! The secondary's side of a replication session: after the handshake it
//! decides (split-brain table) what to synchronize, answers with its
//! geometry and activemap, then applies the primary's requests to the local
//! provider, many in flight, and sends the replies on the second
//! connection. Overlapping writes are applied in the order they arrived, so
//! both copies end up with the same bytes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use crate::config::ResourceConfig;
use crate::handshake::{Attach, Geometry};
use crate::hooks::{self, Event};
use crate::metadata::{Metadata, METADATA_SIZE};
use crate::nv::NV_MAX_SIZE;
use crate::proto::{self, Limits, ProtoError};
use crate::provider::Provider;
use crate::splitbrain::{self, Counters, Decision, MapToSend, SPLIT_BRAIN_MSG};
use crate::wire::{self, Cmd, Reply, Request};

/// Requests the secondary works on at once.
const MAX_INFLIGHT: usize = 256;
/// Largest READ/WRITE accepted (the reference's MAXPHYS on FreeBSD 13+).
pub const MAX_IO: u64 = 1 << 20;
/// [`MAX_IO`] as a buffer size.
pub const MAX_IO_BYTES: usize = 1 << 20;
/// The primary sends a keepalive after 10 s idle; silence for twice that
/// ends the session.
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Read-ahead of the request connection: headers of back-to-back small
/// requests come in with one system call; payloads at least this large are
/// read straight into their buffer.
const READ_AHEAD: usize = 64 * 1024;
/// Payloads of at least this many bytes go into reused buffers: a fresh
/// buffer this large is fresh memory from the kernel (glibc maps it), so
/// every page of every request would fault and be cleared first.
const POOL_MIN: usize = 128 * 1024;
/// Reused buffers kept between requests (each [`MAX_IO_BYTES`]).
const POOL_KEEP: usize = 64;
/// Replies written with one system call at most.
const REPLY_BATCH: usize = 64;

/// How a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Proto(#[from] ProtoError),
    #[error("no request from the primary for {0:?}")]
    Idle(Duration),
    #[error("refused the primary: {0}")]
    Refused(String),
    #[error("local provider: {0}")]
    Local(String),
    #[error("payload: {0}")]
    Payload(String),
}

/// The local side a session works on.
#[derive(Clone)]
pub struct Local {
    pub provider: Arc<Provider>,
    pub md: Arc<Mutex<Metadata>>,
    pub cfg: ResourceConfig,
}

impl Local {
    fn counters(&self) -> (Counters, u64, u32) {
        let m = self.md.lock().unwrap_or_else(|p| p.into_inner());
        (
            Counters {
                resuid: m.resuid,
                localcnt: m.localcnt,
                remotecnt: m.remotecnt,
            },
            m.datasize,
            m.extentsize,
        )
    }
}

/// Step 2 on the secondary: decide, answer with the geometry and the map
/// on `conn_in` (connection 1). Returns the decision on success.
pub async fn answer_attach<W: AsyncWrite + Unpin>(
    conn_in: &mut W,
    local: &Local,
    attach: &Attach,
) -> Result<Decision, SessionError> {
    if crate::failpoint::check(crate::failpoint::SECONDARY_SLOW_ATTACH).is_some() {
        tokio::time::sleep(crate::failpoint::SECONDARY_SLOW_ATTACH_DELAY).await;
    }
    let (mine, datasize, extentsize) = local.counters();
    let theirs = Counters {
        resuid: attach.resuid,
        localcnt: attach.localcnt,
        remotecnt: attach.remotecnt,
    };
    let decision = splitbrain::decide(mine, theirs, attach.virgin);
    let refuse = |msg: String| {
        let mut nv = crate::nv::Nv::new();
        nv.add_string("errmsg", msg.as_str());
        (nv, msg)
    };
    let (map_kind, src, virgin) = match &decision {
        Decision::Mismatch { primary, secondary } => {
            let (nv, msg) = refuse(format!(
                "Resource unique ID mismatch (primary={primary}, secondary={secondary})."
            ));
            proto::write_frame_async(conn_in, &nv, &[]).await?;
            return Err(SessionError::Refused(msg));
        }
        Decision::SplitBrain => {
            let (nv, _) = refuse(SPLIT_BRAIN_MSG.to_string());
            proto::write_frame_async(conn_in, &nv, &[]).await?;
            hooks::run(
                local.cfg.exec.as_deref(),
                &local.cfg.name,
                &Event::SplitBrain,
            );
            return Err(SessionError::Refused("split-brain detected".into()));
        }
        Decision::Adopt { resuid, map } => {
            let provider = local.provider.clone();
            let md = local.md.clone();
            let resuid = *resuid;
            tokio::task::spawn_blocking(move || {
                let mut m = md.lock().unwrap_or_else(|p| p.into_inner());
                let mut next = m.clone();
                next.resuid = resuid;
                next.write(&provider, true).map(|()| *m = next)
            })
            .await
            .map_err(|e| SessionError::Local(e.to_string()))?
            .map_err(|e| SessionError::Local(e.to_string()))?;
            (*map, splitbrain::SyncSrc::Primary, true)
        }
        Decision::Sync {
            src,
            map,
            unexpected,
        } => {
            if *unexpected {
                tracing::warn!(
                    "this should never happen, asking for full synchronization (primary(local={}, remote={}), secondary(local={}, remote={}))",
                    theirs.localcnt, theirs.remotecnt, mine.localcnt, mine.remotecnt
                );
            }
            (*map, *src, false)
        }
    };
    let mapsize = {
        let m = local.md.lock().unwrap_or_else(|p| p.into_inner());
        m.localoff.saturating_sub(METADATA_SIZE)
    };
    let map: Vec<u8> = match map_kind {
        MapToSend::None => Vec::new(),
        MapToSend::Full => vec![0xff; usize::try_from(mapsize).unwrap_or(0)],
        MapToSend::Dirty => {
            let provider = local.provider.clone();
            let len = usize::try_from(mapsize).unwrap_or(0);
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                provider
                    .read_exact_at(&mut buf, METADATA_SIZE)
                    .map(|()| buf)
            })
            .await
            .map_err(|e| SessionError::Local(e.to_string()))?
            .map_err(|e| SessionError::Local(e.to_string()))?
        }
    };
    let geo = Geometry {
        datasize: i64::try_from(datasize).unwrap_or(i64::MAX),
        extentsize: i32::try_from(extentsize).unwrap_or(i32::MAX),
        localcnt: mine.localcnt,
        remotecnt: mine.remotecnt,
        virgin,
        syncsrc: src,
        mapsize: u32::try_from(map.len()).unwrap_or(0),
        maxio: u32::try_from(MAX_IO).ok(),
        synctrack: true,
    };
    proto::write_frame_async(conn_in, &geo.to_nv(), &map).await?;
    Ok(decision)
}

/// A reply waiting to be sent, with the data of a read.
struct Outgoing {
    reply: Reply,
    data: Option<Vec<u8>>,
}

/// Request buffers reused from one request to the next (see [`POOL_MIN`]).
#[derive(Default)]
struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// An empty buffer with room for `size` bytes.
    fn take(&self, size: usize) -> Vec<u8> {
        if size < POOL_MIN {
            return Vec::with_capacity(size);
        }
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(mut v) if v.capacity() >= size => {
                v.clear();
                v
            }
            _ => Vec::with_capacity(size.max(MAX_IO_BYTES)),
        }
    }

    /// Keep `v` for a later request (dropped when enough are kept).
    fn give(&self, mut v: Vec<u8>) {
        if v.capacity() < MAX_IO_BYTES {
            return;
        }
        v.clear();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < POOL_KEEP {
            free.push(v);
        }
    }
}

/// Read one request: its nv and `size` payload bytes (into a reused buffer
/// when it is large, never zero-filled first).
async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: Limits,
    pool: &BufPool,
) -> Result<(crate::nv::Nv, Vec<u8>), ProtoError> {
    let (nv, size) = proto::read_header_async(r, limits).await?;
    let mut buf = pool.take(size);
    while buf.len() < size {
        let want = size - buf.len();
        if r.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(ProtoError::Truncated {
                what: "payload",
                got: buf.len(),
                want: size,
            });
        }
    }
    Ok((nv, buf))
}

/// Send replies as they come, several per system call when they queue up
/// (a read's data is written on its own, not copied into the batch).
async fn write_replies<W: AsyncWrite + Unpin>(
    conn_out: &mut W,
    rx: &mut mpsc::Receiver<Outgoing>,
    pool: &BufPool,
    compression: crate::config::Compression,
    checksum: crate::config::Checksum,
) -> Result<(), ProtoError> {
    let mut batch: Vec<u8> = Vec::with_capacity(REPLY_BATCH * 64);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next.take() {
            let mut nv = out.reply.to_nv();
            match out.data {
                Some(d) => {
                    // Read data goes through the same pipeline as write data.
                    if !batch.is_empty() {
                        conn_out.write_all(&batch).await?;
                        batch.clear();
                    }
                    let payload = crate::payload::encode(&mut nv, &d, compression, checksum);
                    proto::write_frame_async(conn_out, &nv, &payload).await?;
                    drop(payload);
                    pool.give(d);
                }
                None => batch.extend_from_slice(&proto::encode_frame(&nv, &[])?),
            }
            n += 1;
            if n < REPLY_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            conn_out.write_all(&batch).await?;
            batch.clear();
        }
        conn_out.flush().await?;
    }
    Ok(())
}

/// Ranges of writes (and deletes) in flight, so a later overlapping one
/// waits for the earlier ones.
#[derive(Default)]
struct InFlight {
    ranges: Mutex<Vec<(u64, u64, u64)>>,
    changed: tokio::sync::Notify,
}

impl InFlight {
    fn overlaps(&self, id: u64, off: u64, end: u64) -> bool {
        let r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().any(|&(i, s, e)| i < id && s < end && off < e)
    }

    async fn wait_turn(&self, id: u64, off: u64, end: u64) {
        loop {
            let notified = self.changed.notified();
            if !self.overlaps(id, off, end) {
                return;
            }
            notified.await;
        }
    }

    fn add(&self, id: u64, off: u64, end: u64) {
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, off, end));
    }

    fn remove(&self, id: u64) {
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&(i, _, _)| i != id);
        self.changed.notify_waiters();
    }
}

/// Counters of the secondary for `hastctl list`.
#[derive(Debug, Default)]
pub struct SecondaryStats {
    pub read: std::sync::atomic::AtomicU64,
    pub write: std::sync::atomic::AtomicU64,
    pub delete: std::sync::atomic::AtomicU64,
    pub flush: std::sync::atomic::AtomicU64,
    pub read_error: std::sync::atomic::AtomicU64,
    pub write_error: std::sync::atomic::AtomicU64,
    pub delete_error: std::sync::atomic::AtomicU64,
    pub flush_error: std::sync::atomic::AtomicU64,
}

/// The request slots of a secondary resource, shared by its successive
/// sessions. A request keeps its slot until its local I/O is done, even
/// when its session is stopped, so a new session or a role change first
/// waits for the requests of the one before: a write of the old primary
/// never lands after a newer one to the same blocks.
#[derive(Clone)]
pub struct Slots(Arc<Semaphore>);

impl Default for Slots {
    fn default() -> Slots {
        Slots(Arc::new(Semaphore::new(MAX_INFLIGHT)))
    }
}

/// How long [`Slots::drain`] waits for the requests of a stopped session.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

impl Slots {
    /// Wait until no request holds a slot; after [`DRAIN_LIMIT`] (a
    /// provider that hangs) warn and go on.
    pub async fn drain(&self) {
        let all = u32::try_from(MAX_INFLIGHT).unwrap_or(u32::MAX);
        if !matches!(
            tokio::time::timeout(DRAIN_LIMIT, self.0.acquire_many(all)).await,
            Ok(Ok(_))
        ) {
            tracing::warn!(
                "{} requests of the previous session still wait for the local provider after {} s; going on",
                MAX_INFLIGHT.saturating_sub(self.0.available_permits()),
                DRAIN_LIMIT.as_secs()
            );
        }
    }
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Apply the primary's requests from `conn_in`, replying on `conn_out`,
/// until the connection ends or fails. `marks`: the primary sends
/// synchronization marks ([`crate::handshake::SYNC_MARK_FIELD`]); the local
/// activemap is then kept until the first `done` instead of being cleared
/// at the first request (the reference's rule).
pub async fn serve<R, W>(
    conn_in: R,
    mut conn_out: W,
    local: Local,
    stats: Arc<SecondaryStats>,
    slots: Slots,
    marks: bool,
) -> SessionError
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (datasize, localoff) = {
        let m = local.md.lock().unwrap_or_else(|p| p.into_inner());
        (m.datasize, m.localoff)
    };
    let limits = wire::Limits {
        sectorsize: local.provider.sectorsize(),
        datasize,
        max_length: MAX_IO,
    };
    let frame_limits = Limits {
        max_header: NV_MAX_SIZE,
        max_payload: usize::try_from(MAX_IO).unwrap_or(usize::MAX),
    };
    let (tx, mut rx) = mpsc::channel::<Outgoing>(MAX_INFLIGHT * 2);
    let (compression, checksum) = (local.cfg.compression, local.cfg.checksum);
    let pool = Arc::new(BufPool::default());
    let writer_pool = pool.clone();
    let writer = tokio::spawn(async move {
        write_replies(&mut conn_out, &mut rx, &writer_pool, compression, checksum)
            .await
            .err()
    });
    let mut conn_in = tokio::io::BufReader::with_capacity(READ_AHEAD, conn_in);
    let inflight = Arc::new(InFlight::default());
    let mut map_cleared = marks;
    let mut next_id: u64 = 0;
    let result = loop {
        let frame = tokio::time::timeout(
            IDLE_TIMEOUT,
            read_request(&mut conn_in, frame_limits, &pool),
        )
        .await;
        let (nv, payload) = match frame {
            Err(_) => break SessionError::Idle(IDLE_TIMEOUT),
            Ok(Err(e)) => break SessionError::Proto(e),
            Ok(Ok(f)) => f,
        };
        let req = match Request::from_nv(&nv, &limits) {
            Ok(r) => r,
            Err((seq, e)) => {
                tracing::error!("invalid request from the primary: {e}");
                if seq == 0 {
                    break SessionError::Refused(e.to_string());
                }
                let reply = Reply {
                    seq,
                    received: false,
                    error: libc::EINVAL as i16,
                };
                if tx.send(Outgoing { reply, data: None }).await.is_err() {
                    break SessionError::Local("reply writer stopped".into());
                }
                continue;
            }
        };
        if req.cmd == Cmd::Keepalive {
            if let Some(mark) = nv.get_string(crate::handshake::SYNC_MARK_FIELD) {
                // Before the next request is read: the writes of a
                // synchronization never land before its start is recorded.
                if let Err(e) = sync_mark(&local, mark).await {
                    break SessionError::Local(format!(
                        "unable to record the synchronization mark {mark:?}: {e}"
                    ));
                }
            }
            continue;
        }
        if !map_cleared {
            // The primary has merged our map by now: start from a clean one.
            if let Err(e) = clear_map(&local).await {
                tracing::warn!("unable to clear the local activemap: {e}");
            }
            map_cleared = true;
        }
        let data = if req.cmd == Cmd::Write {
            match crate::payload::decode(
                &nv,
                payload,
                usize::try_from(req.length).unwrap_or(usize::MAX),
                MAX_IO_BYTES,
            ) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::error!("request seq {}: {e}", req.seq);
                    let reply = Reply {
                        seq: req.seq,
                        received: false,
                        error: libc::EINVAL as i16,
                    };
                    if tx.send(Outgoing { reply, data: None }).await.is_err() {
                        break SessionError::Local("reply writer stopped".into());
                    }
                    continue;
                }
            }
        } else {
            None
        };
        // The slot first: a request answered "received" is one whose I/O
        // runs to the end even if this session is stopped now.
        let Ok(permit) = slots.0.clone().acquire_owned().await else {
            break SessionError::Local("request slots closed".into());
        };
        if req.memsync {
            let reply = Reply {
                seq: req.seq,
                received: true,
                error: 0,
            };
            if tx.send(Outgoing { reply, data: None }).await.is_err() {
                break SessionError::Local("reply writer stopped".into());
            }
        }
        next_id += 1;
        let id = next_id;
        let end = req.offset.saturating_add(req.length);
        if matches!(req.cmd, Cmd::Write | Cmd::Delete | Cmd::Read) {
            inflight.add(id, req.offset, end);
        }
        let tx = tx.clone();
        let provider = local.provider.clone();
        let inflight = inflight.clone();
        let stats = stats.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            // Wait for earlier requests to the same range; a flush waits
            // for every earlier request, so it covers each write received
            // before it (memsync acknowledges a write before it is done),
            // while later writes do not wait for the flush.
            if req.cmd == Cmd::Flush {
                inflight.wait_turn(id, 0, u64::MAX).await;
            } else {
                inflight.wait_turn(id, req.offset, end).await;
            }
            let at = localoff.saturating_add(req.offset);
            let len = req.length;
            let cmd = req.cmd;
            let io_pool = pool.clone();
            let io = tokio::task::spawn_blocking(move || {
                execute(&provider, &io_pool, cmd, at, len, data)
            })
            .await;
            inflight.remove(id);
            let (error, out) = match io {
                Ok(Ok(out)) => (0, out),
                Ok(Err(e)) => (e.raw_os_error().unwrap_or(libc::EIO), None),
                Err(_) => (libc::EIO, None),
            };
            let counter = match (cmd, error != 0) {
                (Cmd::Read, false) => &stats.read,
                (Cmd::Read, true) => &stats.read_error,
                (Cmd::Write, false) => &stats.write,
                (Cmd::Write, true) => &stats.write_error,
                (Cmd::Delete, false) => &stats.delete,
                (Cmd::Delete, true) => &stats.delete_error,
                (_, false) => &stats.flush,
                (_, true) => &stats.flush_error,
            };
            bump(counter);
            if error != 0 {
                tracing::error!(
                    "request failed: {}({}, {}): errno {error}",
                    cmd.name(),
                    req.offset,
                    len
                );
            }
            let reply = Reply {
                seq: req.seq,
                received: false,
                error: i16::try_from(error).unwrap_or(libc::EIO as i16),
            };
            let _ = tx.send(Outgoing { reply, data: out }).await;
            drop(permit);
        });
    };
    drop(tx);
    writer.abort();
    result
}

/// A synchronization mark from the primary: `start` records durably that
/// this copy is inconsistent; `done` (everything synchronized is flushed on
/// both sides) clears the activemap the primary merged and the mark.
async fn sync_mark(local: &Local, mark: &str) -> std::io::Result<()> {
    let syncing = match mark {
        crate::handshake::SYNC_MARK_START => true,
        crate::handshake::SYNC_MARK_DONE => {
            clear_map(local).await?;
            false
        }
        other => {
            tracing::warn!("unknown synchronization mark {other:?} ignored");
            return Ok(());
        }
    };
    let provider = local.provider.clone();
    let md = local.md.clone();
    tokio::task::spawn_blocking(move || {
        let mut m = md.lock().unwrap_or_else(|p| p.into_inner());
        if m.syncing == syncing {
            return Ok(());
        }
        let mut next = m.clone();
        next.syncing = syncing;
        next.write(&provider, true)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        *m = next;
        if syncing {
            tracing::info!(
                "synchronization from the primary started: this copy is inconsistent until it ends"
            );
        } else {
            tracing::info!("synchronization from the primary complete: this copy is consistent");
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn clear_map(local: &Local) -> std::io::Result<()> {
    let (provider, len) = {
        let m = local.md.lock().unwrap_or_else(|p| p.into_inner());
        (
            local.provider.clone(),
            usize::try_from(m.localoff.saturating_sub(METADATA_SIZE)).unwrap_or(0),
        )
    };
    tokio::task::spawn_blocking(move || {
        provider
            .write_all_at(&vec![0u8; len], METADATA_SIZE)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// One request's local I/O, at provider offset `at`.
/// A write's buffer goes back to `pool`; a read's comes from it.
fn execute(
    provider: &Provider,
    pool: &BufPool,
    cmd: Cmd,
    at: u64,
    len: u64,
    data: Option<Vec<u8>>,
) -> std::io::Result<Option<Vec<u8>>> {
    match cmd {
        Cmd::Read => {
            let len = usize::try_from(len).map_err(std::io::Error::other)?;
            let mut buf = pool.take(len);
            if let Err(e) = provider.read_into_spare(&mut buf, len, at) {
                pool.give(buf);
                return Err(e);
            }
            Ok(Some(buf))
        }
        Cmd::Write => {
            let data = data.ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            if let Some(e) = crate::failpoint::check(crate::failpoint::SECONDARY_WRITE) {
                pool.give(data);
                return Err(e);
            }
            if crate::failpoint::check(crate::failpoint::SECONDARY_SLOW_WRITE).is_some() {
                std::thread::sleep(crate::failpoint::SECONDARY_SLOW_WRITE_DELAY);
            }
            let written = provider.pwrite(&data, at);
            pool.give(data);
            written?;
            Ok(None)
        }
        Cmd::Delete => {
            provider.delete(at, len)?;
            Ok(None)
        }
        Cmd::Flush => {
            provider.sync()?;
            Ok(None)
        }
        Cmd::Keepalive => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut nv = crate::nv::Nv::new();
        nv.add("seq", crate::nv::Value::Uint64(seq));
        proto::encode_frame(&nv, payload).unwrap()
    }

    const LIMITS: Limits = Limits {
        max_header: NV_MAX_SIZE,
        max_payload: MAX_IO_BYTES,
    };

    /// Back-to-back requests of every size come out byte for byte, also
    /// when a reused buffer held a longer payload before.
    #[tokio::test]
    async fn requests_read_through_reused_buffers_keep_their_bytes() {
        let big: Vec<u8> = (0..MAX_IO_BYTES).map(|i| (i % 251) as u8).collect();
        let mid: Vec<u8> = (0..300 * 1024).map(|i| (i % 13) as u8 + 1).collect();
        let small = b"four".to_vec();
        let mut wire = Vec::new();
        for (seq, p) in [
            (1, &big),
            (2, &small),
            (3, &mid),
            (4, &Vec::new()),
            (5, &big),
        ] {
            wire.extend_from_slice(&frame(seq, p));
        }
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move { tx.write_all(&wire).await });
        let mut r = tokio::io::BufReader::with_capacity(READ_AHEAD, rx);
        let pool = BufPool::default();
        for (seq, want) in [
            (1, &big),
            (2, &small),
            (3, &mid),
            (4, &Vec::new()),
            (5, &big),
        ] {
            let (nv, got) = read_request(&mut r, LIMITS, &pool).await.unwrap();
            assert_eq!(nv.get_u64("seq"), Some(seq));
            assert_eq!(&got, want, "payload of request {seq}");
            pool.give(got);
        }
        writer.await.unwrap().unwrap();
        assert!(matches!(
            read_request(&mut r, LIMITS, &pool).await,
            Err(ProtoError::Closed)
        ));
    }

    /// A payload cut short by the end of the connection is an error.
    #[tokio::test]
    async fn a_truncated_payload_is_refused() {
        let mut wire = frame(7, &vec![9u8; 512 * 1024]);
        wire.truncate(wire.len() - 1000);
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move { tx.write_all(&wire).await });
        let mut r = tokio::io::BufReader::with_capacity(READ_AHEAD, rx);
        let got = read_request(&mut r, LIMITS, &BufPool::default()).await;
        assert!(
            matches!(got, Err(ProtoError::Truncated { got, want, .. }) if got + 1000 == want),
            "{got:?}"
        );
        writer.await.unwrap().unwrap();
    }
}

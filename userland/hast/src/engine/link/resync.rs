//! The resync scheduler of a session: every extent of the sync map is
//! synchronized in the direction the handshake decided, under the core's
//! range locks, many at once, until the map is empty; then the counters
//! are recorded and the copy that was written is consistent again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::ResourceConfig;
use crate::core::{MapKind, SyncDir};
use crate::events::{Direction, Kind};
use crate::handshake::Geometry;
use crate::hooks;
use crate::splitbrain::SyncSrc;
use crate::wire::Cmd;

use super::session::SyncMark;
use super::{lock, LinkError, Replicator};

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

/// How often a running synchronization reports its progress as an event.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Resync progress, for `hastctl list`.
#[derive(Debug, Default)]
pub struct Progress {
    pub active: AtomicBool,
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub started: Mutex<Option<Instant>>,
}

impl Replicator {
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
    pub(super) async fn resync(self: Arc<Self>, geo: Geometry, cfg: ResourceConfig) {
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
                    hooks::notify(
                        cfg.exec.as_deref(),
                        &cfg.name,
                        Kind::SyncStart {
                            bytes,
                            direction: match dir {
                                SyncSrc::Primary => Direction::ToPeer,
                                SyncSrc::Secondary => Direction::FromPeer,
                            },
                        },
                    );
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
                hooks::notify(
                    cfg.exec.as_deref(),
                    &cfg.name,
                    Kind::SyncDone {
                        bytes: synced,
                        msecs: lock(&self.progress.started).map_or(0, |t| {
                            u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
                        }),
                    },
                );
                synced = 0;
            }
            // `list` drops its progress line only now: the counters are
            // recorded and the completion is logged.
            self.progress.active.store(false, Ordering::SeqCst);
        }
    }

    /// Publish the progress of a running synchronization every
    /// [`PROGRESS_EVERY`] (a `sync-progress` event); runs as long as the
    /// session.
    pub(super) async fn progress_reporter(self: Arc<Self>, name: String) -> LinkError {
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            if !self.progress.active.load(Ordering::SeqCst) {
                continue;
            }
            let total = self.progress.total.load(Ordering::Relaxed);
            let done = self.progress.done.load(Ordering::Relaxed).min(total);
            let secs = lock(&self.progress.started).map_or(0.0, |t| t.elapsed().as_secs_f64());
            let rate = if secs > 0.0 {
                (done as f64 / secs) as u64
            } else {
                0
            };
            crate::events::publish(&name, Kind::SyncProgress { done, total, rate });
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
                        .map_err(LinkError::local("recording the synchronization mark"))?;
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

    /// One pass over `dirty` extents, many in flight, with flushes of both
    /// sides as it goes: the bytes synchronized, and whether an extent
    /// failed (it stays dirty).
    ///
    /// The extents' tasks run to their end even when the session stops
    /// (each releases its range lock then); [`Live`] counts them.
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
            let live = self.extent_tasks.enter();
            tasks.push(tokio::spawn(async move {
                let r = me.clone().sync_extent(dir, off, len).await;
                drop(permit);
                // The task's last hold on the replicator goes before it
                // counts as ended.
                drop(me);
                drop(live);
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

    /// Synchronize one extent range under a sync lock, its chunks in
    /// parallel; the extent is cleared only when every chunk was confirmed.
    async fn sync_extent(
        self: Arc<Self>,
        dir: SyncSrc,
        off: u64,
        len: u64,
    ) -> Result<u64, LinkError> {
        let lock_seq = self
            .dp
            .sync_lock(off, len)
            .await
            .map_err(LinkError::local("locking a range for resync"))?;
        let max = self.max_io.load(Ordering::SeqCst);
        let mut set = tokio::task::JoinSet::new();
        for (at, n) in crate::split::pieces(off, len, max) {
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
        released.map_err(LinkError::local("releasing a resync range"))?;
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
                    .map_err(LinkError::local("local read for resync"))?;
                self.sync_request(Cmd::Write, at, n, Some(Bytes::from(data)))
                    .await?;
            }
            SyncSrc::Secondary => {
                let data = self
                    .sync_request(Cmd::Read, at, n, None)
                    .await?
                    .ok_or(LinkError::NoData(at))?;
                self.dp
                    .sync_write(lock_seq, at, Bytes::from(data))
                    .await
                    .map_err(LinkError::local("local write for resync"))?;
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
            .map_err(LinkError::local("reading the sync map"))?;
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
}

/// A count of running tasks that can be waited to reach zero.
#[derive(Default)]
pub(super) struct Live {
    n: std::sync::atomic::AtomicUsize,
    none: tokio::sync::Notify,
}

/// One counted task; dropping it ends it.
pub(super) struct LiveTask(Arc<Live>);

impl Live {
    /// Count one more task until the returned guard is dropped.
    pub(super) fn enter(self: &Arc<Self>) -> LiveTask {
        self.n.fetch_add(1, Ordering::SeqCst);
        LiveTask(self.clone())
    }

    /// Wait until no task is counted.
    pub(super) async fn wait_none(&self) {
        loop {
            let none = self.none.notified();
            if self.n.load(Ordering::SeqCst) == 0 {
                return;
            }
            none.await;
        }
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

//! One request of the primary applied to the local provider: after the
//! earlier requests it overlaps (a flush after every earlier one), on a
//! blocking thread, counted (and timed, when metrics are on), and
//! answered; a failure is published as an `io-error` event.

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::buffers::BufPool;
use super::replies::Outgoing;
use crate::metrics::ResourceMetrics;
use crate::provider::Provider;
use crate::stats::{AtomicRequestStats, RequestKind};
use crate::wire::{Cmd, Reply, Request};

/// Ranges of writes (and deletes) in flight, so a later overlapping one
/// waits for the earlier ones.
#[derive(Default)]
pub(super) struct InFlight {
    ranges: Mutex<Vec<(u64, u64, u64)>>,
    changed: tokio::sync::Notify,
}

impl InFlight {
    pub(super) fn overlaps(&self, id: u64, off: u64, end: u64) -> bool {
        let r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().any(|&(i, s, e)| i < id && s < end && off < e)
    }

    pub(super) async fn wait_turn(&self, id: u64, off: u64, end: u64) {
        loop {
            let notified = self.changed.notified();
            if !self.overlaps(id, off, end) {
                return;
            }
            notified.await;
        }
    }

    pub(super) fn add(&self, id: u64, off: u64, end: u64) {
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, off, end));
    }

    pub(super) fn remove(&self, id: u64) {
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&(i, _, _)| i != id);
        self.changed.notify_waiters();
    }
}

/// One request handed to its own task: it waits for the earlier requests
/// it overlaps, does its I/O on a blocking thread, counts it and answers.
pub(super) struct Work {
    /// Arrival order within the session.
    pub id: u64,
    pub req: Request,
    /// A write's decoded data.
    pub data: Option<Vec<u8>>,
    /// Where the data area starts on the provider.
    pub localoff: u64,
    pub provider: Arc<Provider>,
    pub inflight: Arc<InFlight>,
    pub stats: Arc<AtomicRequestStats>,
    pub metrics: Arc<ResourceMetrics>,
    pub pool: Arc<BufPool>,
    pub replies: mpsc::Sender<Outgoing>,
}

impl Work {
    /// Carry the request out; `slot` is held until its I/O is done, even
    /// when the session stops meanwhile.
    pub(super) async fn run(self, slot: tokio::sync::OwnedSemaphorePermit) {
        let Work {
            id,
            req,
            data,
            localoff,
            provider,
            inflight,
            stats,
            metrics,
            pool,
            replies,
        } = self;
        let since = metrics.start();
        let end = req.offset.saturating_add(req.length);
        // Wait for earlier requests to the same range; a flush waits for
        // every earlier request, so it covers each write received before
        // it (memsync acknowledges a write before it is done), while later
        // writes do not wait for the flush.
        if req.cmd == Cmd::Flush {
            inflight.wait_turn(id, 0, u64::MAX).await;
        } else {
            inflight.wait_turn(id, req.offset, end).await;
        }
        let at = localoff.saturating_add(req.offset);
        let (cmd, len) = (req.cmd, req.length);
        let io_pool = pool.clone();
        let write_metrics = metrics.clone();
        let io = tokio::task::spawn_blocking(move || {
            let started = (cmd == Cmd::Write).then(|| write_metrics.start()).flatten();
            let r = execute(&provider, &io_pool, cmd, at, len, data);
            write_metrics.local_write_done(started);
            r
        })
        .await;
        inflight.remove(id);
        let (error, out) = match io {
            Ok(Ok(out)) => (0, out),
            Ok(Err(e)) => (e.raw_os_error().unwrap_or(libc::EIO), None),
            Err(_) => (libc::EIO, None),
        };
        let kind = match cmd {
            Cmd::Read => RequestKind::Read,
            Cmd::Write => RequestKind::Write,
            Cmd::Delete => RequestKind::Delete,
            _ => RequestKind::Flush,
        };
        stats.count(kind, error != 0);
        metrics.request_done(kind, len, since);
        if error != 0 {
            tracing::error!(
                "request failed: {}({}, {len}): errno {error}",
                cmd.name(),
                req.offset
            );
            metrics.local_error(crate::metrics::kind_label(kind), req.offset, len, error);
        }
        let reply = Reply {
            seq: req.seq,
            received: false,
            error: i16::try_from(error).unwrap_or(libc::EIO as i16),
        };
        let _ = replies.send(Outgoing { reply, data: out }).await;
        drop(slot);
    }
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

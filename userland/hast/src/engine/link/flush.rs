//! Flushes of both sides: written extents leave the map only once a flush
//! of the local provider and of the peer covers them, so the primary asks
//! for one by time and by bytes written, and waits for one at the end of a
//! synchronization.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dataplane::DataplaneError;

use super::{LinkError, Replicator};

/// Extents written on both sides leave the map only after a flush of both
/// (the core's rule): the primary asks for one this long after the first
/// write since the last one, or after [`FLUSH_BYTES`] written, whichever
/// comes first, so that a pair whose clients never flush does not keep
/// every written extent dirty.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

const FLUSH_BYTES: u64 = 64 << 20;

/// How often the flusher looks at the bytes written.
const FLUSH_TICK: Duration = Duration::from_millis(100);

impl Replicator {
    /// Ask for a flush of both sides by time and by bytes written (see
    /// [`FLUSH_INTERVAL`]); never returns. Extents whose copy on the peer
    /// ended while a flush ran joined the map after it started and wait
    /// for the next one, and hot extents wait for a few more: when no
    /// write comes any more, the core's count of such extents asks for
    /// flushes (looked at once per interval).
    pub(super) async fn flusher(self: Arc<Self>) -> LinkError {
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
    pub(super) async fn flush_both(&self, limit: Duration) -> Result<(), LinkError> {
        let start = Instant::now();
        let gen = loop {
            match self.dp.flush() {
                Ok(g) => break g,
                Err(DataplaneError::Busy) if start.elapsed() < limit => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(LinkError::local("starting a flush of both sides")(e)),
            }
        };
        loop {
            let st = self
                .dp
                .stats()
                .map_err(LinkError::local("reading the core's statistics"))?;
            // Wrapping comparison of flush numbers.
            if (st.flush_done.wrapping_sub(gen) as i32) >= 0 {
                return Ok(());
            }
            if !st.flush_busy || start.elapsed() > limit {
                return Err(LinkError::FlushFailed);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

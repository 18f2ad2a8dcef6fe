//! Metadata changes of a primary (counters, role, the synchronization
//! mark), written through the host that owns the disk.

use crate::dataplane::DataplaneError;
use crate::metadata::Metadata;

use super::{lock, Replicator};

impl Replicator {
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
        .map_err(|e| DataplaneError::Task(e.to_string()))?
    }

    /// [`Replicator::record`], flushed, for the counters.
    pub(super) async fn persist(
        &self,
        f: impl FnOnce(&mut Metadata) + Send + 'static,
    ) -> Result<(), DataplaneError> {
        self.record(f, true).await
    }
}

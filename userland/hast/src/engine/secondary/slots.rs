//! The request slots of a secondary resource, shared by its successive
//! sessions.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::MAX_INFLIGHT;

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
    /// A slot for one request; `None` once the slots are closed.
    pub(super) async fn acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().acquire_owned().await.ok()
    }

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

//! Synchronization marks from the primary: the copy is inconsistent from
//! `start` until `done`; `done` also clears the activemap the primary
//! merged.

use crate::handshake::{SYNC_MARK_DONE, SYNC_MARK_START};
use crate::metadata::METADATA_SIZE;

use super::{Local, SessionError};

/// Record a synchronization mark from the primary: `start` records durably
/// that this copy is inconsistent; `done` (everything synchronized is
/// flushed on both sides) clears the activemap the primary merged and the
/// mark.
pub(super) async fn record(local: &Local, mark: &str) -> Result<(), SessionError> {
    let syncing = match mark {
        SYNC_MARK_START => true,
        SYNC_MARK_DONE => {
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
        next.write(&provider, true)?;
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
    .map_err(|e| SessionError::Task(e.to_string()))?
}

/// Zero the activemap on the provider (not flushed by itself).
pub(super) async fn clear_map(local: &Local) -> Result<(), SessionError> {
    let (provider, len) = {
        let m = local.md.lock().unwrap_or_else(|p| p.into_inner());
        (
            local.provider.clone(),
            usize::try_from(m.localoff.saturating_sub(METADATA_SIZE)).unwrap_or(0),
        )
    };
    tokio::task::spawn_blocking(move || provider.write_all_at(&vec![0u8; len], METADATA_SIZE))
        .await
        .map_err(|e| SessionError::Task(e.to_string()))?
        .map_err(|source| SessionError::Provider {
            during: "clearing the activemap",
            source,
        })
}

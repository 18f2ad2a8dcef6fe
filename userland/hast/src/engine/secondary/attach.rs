//! Step 2 of the handshake on the secondary: the split-brain table decides,
//! and the answer carries the geometry and the activemap to merge.

use tokio::io::AsyncWrite;

use crate::events::Kind;
use crate::handshake::{Attach, Geometry};
use crate::hooks;
use crate::metadata::METADATA_SIZE;
use crate::proto::{self};
use crate::splitbrain::{self, Counters, Decision, MapToSend, SPLIT_BRAIN_MSG};

use super::super::admission::SecretExchange;
use super::{Local, SessionError, MAX_IO};

/// Step 2 on the secondary: decide, answer with the geometry and the map
/// on `conn_in` (connection 1), sealed with the shared secret's MAC when
/// the connection attempt is an `exchange`. Returns the decision on
/// success.
pub async fn answer_attach<W: AsyncWrite + Unpin>(
    conn_in: &mut W,
    local: &Local,
    attach: &Attach,
    exchange: Option<&SecretExchange>,
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
    let refuse = |msg: &str| {
        let mut nv = crate::nv::Nv::new();
        nv.add_string("errmsg", msg);
        nv
    };
    let (map_kind, src, virgin) = match &decision {
        Decision::Mismatch { primary, secondary } => {
            let e = SessionError::Mismatch {
                primary: *primary,
                secondary: *secondary,
            };
            proto::write_frame_async(conn_in, &refuse(&e.to_string()), &[]).await?;
            return Err(e);
        }
        Decision::SplitBrain => {
            proto::write_frame_async(conn_in, &refuse(SPLIT_BRAIN_MSG), &[]).await?;
            hooks::notify(
                local.cfg.exec.as_deref(),
                &local.cfg.name,
                Kind::SplitBrain {
                    peer: local.cfg.remote.clone(),
                },
            );
            return Err(SessionError::SplitBrain);
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
            .map_err(|e| SessionError::Task(e.to_string()))??;
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
            .map_err(|e| SessionError::Task(e.to_string()))?
            .map_err(|source| SessionError::Provider {
                during: "reading the activemap",
                source,
            })?
        }
    };
    let mut geo = Geometry {
        datasize: i64::try_from(datasize).unwrap_or(i64::MAX),
        extentsize: i32::try_from(extentsize).unwrap_or(i32::MAX),
        localcnt: mine.localcnt,
        remotecnt: mine.remotecnt,
        virgin,
        syncsrc: src,
        mapsize: u32::try_from(map.len()).unwrap_or(0),
        maxio: u32::try_from(MAX_IO).ok(),
        synctrack: true,
        mac: None,
    };
    if let Some(x) = exchange {
        geo.mac = x.seal_geometry(&geo, &map);
    }
    proto::write_frame_async(conn_in, &geo.to_nv(), &map).await?;
    Ok(decision)
}

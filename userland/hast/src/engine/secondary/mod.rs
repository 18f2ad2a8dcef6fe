//! The secondary's side of a replication session: after the handshake
//! ([`attach`]: the split-brain table decides what to synchronize; the
//! answer carries the geometry and the activemap) it applies the primary's
//! requests to the local provider, many in flight ([`request`]: overlapping
//! writes in the order they arrived, so both copies end up with the same
//! bytes), and sends the replies on the second connection ([`replies`]).

mod attach;
mod buffers;
mod marks;
mod replies;
mod request;
mod slots;

pub use attach::answer_attach;
pub use slots::Slots;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::ResourceConfig;
use crate::metadata::Metadata;
use crate::proto::{Limits, ProtoError};
use crate::provider::Provider;
use crate::splitbrain::Counters;
use crate::stats::AtomicRequestStats;
use crate::wire::{self, Cmd, Reply, Request};

use buffers::{read_request, BufPool};
use replies::{write_replies, Outgoing, ReplyQueue};
use request::IoThreads;

/// Requests the secondary works on at once.
const MAX_INFLIGHT: usize = 256;

pub use crate::wire::{MAX_IO, MAX_IO_BYTES};

/// The primary sends a keepalive after 10 s idle; silence for twice that
/// ends the session.
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Read-ahead of the request connection: headers of back-to-back small
/// requests come in with one system call; payloads at least this large are
/// read straight into their buffer.
const READ_AHEAD: usize = 64 * 1024;

/// How a session ended, or why it was refused.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection: {0}")]
    Proto(#[from] ProtoError),
    #[error("no request from the primary for {0:?}")]
    Idle(Duration),
    /// The two providers belong to different resources.
    #[error("Resource unique ID mismatch (primary={primary}, secondary={secondary}).")]
    Mismatch { primary: u64, secondary: u64 },
    /// Both copies were written while apart.
    #[error("split-brain detected")]
    SplitBrain,
    /// A request without a usable seq: nothing can be answered.
    #[error("invalid request from the primary: {0}")]
    BadRequest(crate::wire::RequestError),
    /// The local provider refused an operation outside a request.
    #[error("local provider, {during}: {source}")]
    Provider {
        during: &'static str,
        #[source]
        source: crate::provider::ProviderError,
    },
    /// The metadata could not be written.
    #[error("{0}")]
    Metadata(#[from] crate::metadata::MetadataError),
    /// A blocking task did not run to its end.
    #[error("a blocking task failed: {0}")]
    Task(String),
    /// The session's I/O threads could not be started.
    #[error("unable to start the I/O threads: {0}")]
    Threads(std::io::Error),
    #[error("the request slots were closed")]
    SlotsClosed,
}

/// The local side a session works on.
#[derive(Clone)]
pub struct Local {
    pub provider: Arc<Provider>,
    pub md: Arc<Mutex<Metadata>>,
    pub cfg: ResourceConfig,
    /// Where requests' latency and the local provider's errors go.
    pub metrics: Arc<crate::metrics::ResourceMetrics>,
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

/// Apply the primary's requests from `conn_in`, replying on `conn_out`,
/// until the connection ends or fails. `marks`: the primary sends
/// synchronization marks ([`crate::handshake::SYNC_MARK_FIELD`]); the local
/// activemap is then kept until the first `done` instead of being cleared
/// at the first request (the reference's rule).
pub async fn serve<R, W>(
    conn_in: R,
    mut conn_out: W,
    local: Local,
    stats: Arc<AtomicRequestStats>,
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
    let limits = wire::RequestLimits {
        sectorsize: local.provider.sectorsize(),
        datasize,
        max_length: MAX_IO,
    };
    let frame_limits = Limits::replication(MAX_IO_BYTES);
    let replies = Arc::new(ReplyQueue::default());
    let (compression, checksum) = (local.cfg.compression, local.cfg.checksum);
    let pool = Arc::new(BufPool::default());
    let (writer_pool, writer_queue) = (pool.clone(), replies.clone());
    let io = match IoThreads::start(request::Context {
        provider: local.provider.clone(),
        localoff,
        stats: stats.clone(),
        metrics: local.metrics.clone(),
        pool: pool.clone(),
        replies: replies.clone(),
    }) {
        Ok(io) => Arc::new(io),
        Err(e) => return SessionError::Threads(e),
    };
    // The session's helper tasks end with it, also when it is aborted:
    // the reply writer and the watch for a slow provider.
    let mut helpers = tokio::task::JoinSet::new();
    helpers.spawn(async move {
        if let Err(e) = write_replies(
            &mut conn_out,
            &writer_queue,
            &writer_pool,
            compression,
            checksum,
        )
        .await
        {
            tracing::debug!("reply writer stopped: {e}");
        }
    });
    let watched = io.clone();
    helpers.spawn(async move {
        let mut tick = tokio::time::interval(request::STUCK);
        loop {
            tick.tick().await;
            watched.grow_if_stuck();
        }
    });
    let mut conn_in = tokio::io::BufReader::with_capacity(READ_AHEAD, conn_in);
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
                    break SessionError::BadRequest(e);
                }
                let reply = Reply {
                    seq,
                    received: false,
                    error: libc::EINVAL as i16,
                };
                replies.push_bounded(Outgoing { reply, data: None }).await;
                continue;
            }
        };
        if req.cmd == Cmd::Keepalive {
            if let Some(mark) = nv.get_string(crate::handshake::SYNC_MARK_FIELD) {
                // Before the next request is read: the writes of a
                // synchronization never land before its start is recorded.
                if let Err(e) = marks::record(&local, mark).await {
                    break e;
                }
            }
            continue;
        }
        if !map_cleared {
            // The primary has merged our map by now: start from a clean one.
            if let Err(e) = marks::clear_map(&local).await {
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
                    replies.push_bounded(Outgoing { reply, data: None }).await;
                    continue;
                }
            }
        } else {
            None
        };
        // The slot first: a request answered "received" is one whose I/O
        // runs to the end even if this session is stopped now.
        let Some(permit) = slots.acquire().await else {
            break SessionError::SlotsClosed;
        };
        if req.memsync {
            let reply = Reply {
                seq: req.seq,
                received: true,
                error: 0,
            };
            replies.push_bounded(Outgoing { reply, data: None }).await;
        }
        next_id += 1;
        // In arrival order: a later request to the same range waits for
        // this one.
        io.admit(next_id, req, data, permit);
    };
    drop(helpers);
    drop(io);
    result
}

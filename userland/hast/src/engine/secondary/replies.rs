//! The replies of a session: queued by the session loop and the I/O
//! threads, written by one task, every reply queued since its last write
//! in one system call (a read's data on its own, not copied).

use std::sync::Mutex;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::proto::{self, ProtoError};
use crate::wire::Reply;

use super::buffers::BufPool;

/// Replies queued at most before the session loop waits for the writer
/// (a primary that stops reading its replies stops being read).
const QUEUE_LIMIT: usize = 1024;

/// A reply waiting to be sent, with the data of a read.
pub(super) struct Outgoing {
    pub(super) reply: Reply,
    pub(super) data: Option<Vec<u8>>,
}

/// The queue between the repliers and the writer.
#[derive(Default)]
pub(super) struct ReplyQueue {
    pub(super) queue: Mutex<Vec<Outgoing>>,
    /// The writer has replies to write.
    ready: Notify,
    /// The writer took the queue: there is room again.
    room: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplyQueue {
    /// Queue a reply (from any thread).
    pub(super) fn push(&self, out: Outgoing) {
        lock(&self.queue).push(out);
        self.ready.notify_one();
    }

    /// Queue a reply from the session loop, waiting while the queue is
    /// full.
    pub(super) async fn push_bounded(&self, out: Outgoing) {
        loop {
            let room = self.room.notified();
            if lock(&self.queue).len() < QUEUE_LIMIT {
                break;
            }
            room.await;
        }
        self.push(out);
    }

    /// Every reply queued, once there is at least one.
    async fn take(&self) -> Vec<Outgoing> {
        loop {
            let ready = self.ready.notified();
            let batch = std::mem::take(&mut *lock(&self.queue));
            if !batch.is_empty() {
                self.room.notify_waiters();
                return batch;
            }
            ready.await;
        }
    }
}

/// Write replies as they are queued, until the connection fails.
pub(super) async fn write_replies<W: AsyncWrite + Unpin>(
    conn_out: &mut W,
    queue: &ReplyQueue,
    pool: &BufPool,
    compression: crate::config::Compression,
    checksum: crate::config::Checksum,
) -> Result<(), ProtoError> {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 64);
    loop {
        for out in queue.take().await {
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
        }
        if !batch.is_empty() {
            conn_out.write_all(&batch).await?;
            batch.clear();
        }
        conn_out.flush().await?;
    }
}

//! The reply writer: replies as they come, several per system call when
//! they queue up.

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::proto::{self, ProtoError};
use crate::wire::Reply;

use super::buffers::BufPool;

/// Replies written with one system call at most.
const REPLY_BATCH: usize = 64;

/// A reply waiting to be sent, with the data of a read.
pub(super) struct Outgoing {
    pub(super) reply: Reply,
    pub(super) data: Option<Vec<u8>>,
}

/// Send replies as they come, several per system call when they queue up
/// (a read's data is written on its own, not copied into the batch).
pub(super) async fn write_replies<W: AsyncWrite + Unpin>(
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

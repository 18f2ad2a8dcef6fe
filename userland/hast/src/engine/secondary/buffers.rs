//! Request payloads read into reused buffers (large ones), never
//! zero-filled first.

use std::sync::Mutex;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::proto::{self, Limits, ProtoError};

use super::MAX_IO_BYTES;

/// Payloads of at least this many bytes go into reused buffers: a fresh
/// buffer this large is fresh memory from the kernel (glibc maps it), so
/// every page of every request would fault and be cleared first.
const POOL_MIN: usize = 128 * 1024;

/// Reused buffers kept between requests (each [`MAX_IO_BYTES`]).
const POOL_KEEP: usize = 64;

/// Request buffers reused from one request to the next (see [`POOL_MIN`]).
#[derive(Default)]
pub(super) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// An empty buffer with room for `size` bytes.
    pub(super) fn take(&self, size: usize) -> Vec<u8> {
        if size < POOL_MIN {
            return Vec::with_capacity(size);
        }
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(mut v) if v.capacity() >= size => {
                v.clear();
                v
            }
            _ => Vec::with_capacity(size.max(MAX_IO_BYTES)),
        }
    }

    /// Keep `v` for a later request (dropped when enough are kept).
    pub(super) fn give(&self, mut v: Vec<u8>) {
        if v.capacity() < MAX_IO_BYTES {
            return;
        }
        v.clear();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < POOL_KEEP {
            free.push(v);
        }
    }
}

/// Read one request: its nv and `size` payload bytes (into a reused buffer
/// when it is large, never zero-filled first).
pub(super) async fn read_request<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: Limits,
    pool: &BufPool,
) -> Result<(crate::nv::Nv, Vec<u8>), ProtoError> {
    let (nv, size) = proto::read_header_async(r, limits).await?;
    let mut buf = pool.take(size);
    while buf.len() < size {
        let want = size - buf.len();
        if r.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(ProtoError::Truncated {
                what: "payload",
                got: buf.len(),
                want: size,
            });
        }
    }
    Ok((nv, buf))
}

#[cfg(test)]
mod tests {
    use super::super::READ_AHEAD;
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut nv = crate::nv::Nv::new();
        nv.add("seq", crate::nv::Value::Uint64(seq));
        proto::encode_frame(&nv, payload).unwrap()
    }

    const LIMITS: Limits = Limits::replication(MAX_IO_BYTES);

    /// Back-to-back requests of every size come out byte for byte, also
    /// when a reused buffer held a longer payload before.
    #[tokio::test]
    async fn requests_read_through_reused_buffers_keep_their_bytes() {
        let big: Vec<u8> = (0..MAX_IO_BYTES).map(|i| (i % 251) as u8).collect();
        let mid: Vec<u8> = (0..300 * 1024).map(|i| (i % 13) as u8 + 1).collect();
        let small = b"four".to_vec();
        let mut wire = Vec::new();
        for (seq, p) in [
            (1, &big),
            (2, &small),
            (3, &mid),
            (4, &Vec::new()),
            (5, &big),
        ] {
            wire.extend_from_slice(&frame(seq, p));
        }
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move { tx.write_all(&wire).await });
        let mut r = tokio::io::BufReader::with_capacity(READ_AHEAD, rx);
        let pool = BufPool::default();
        for (seq, want) in [
            (1, &big),
            (2, &small),
            (3, &mid),
            (4, &Vec::new()),
            (5, &big),
        ] {
            let (nv, got) = read_request(&mut r, LIMITS, &pool).await.unwrap();
            assert_eq!(nv.get_u64("seq"), Some(seq));
            assert_eq!(&got, want, "payload of request {seq}");
            pool.give(got);
        }
        writer.await.unwrap().unwrap();
        assert!(matches!(
            read_request(&mut r, LIMITS, &pool).await,
            Err(ProtoError::Closed)
        ));
    }

    /// A payload cut short by the end of the connection is an error.
    #[tokio::test]
    async fn a_truncated_payload_is_refused() {
        let mut wire = frame(7, &vec![9u8; 512 * 1024]);
        wire.truncate(wire.len() - 1000);
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move { tx.write_all(&wire).await });
        let mut r = tokio::io::BufReader::with_capacity(READ_AHEAD, rx);
        let got = read_request(&mut r, LIMITS, &BufPool::default()).await;
        assert!(
            matches!(got, Err(ProtoError::Truncated { got, want, .. }) if got + 1000 == want),
            "{got:?}"
        );
        writer.await.unwrap().unwrap();
    }
}

//! HAST message framing (protocol version 2), shared by the replication
//! connections and the control socket: `u8 version`, `u32 size`
//! (little-endian), an nv list of `size` bytes, then a payload of nv
//! `size` (uint32) bytes when the nv has that field. Unlike the reference,
//! both sizes are checked against caller-given limits before any buffer is
//! allocated.

use std::io::{self, Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::nv::{Nv, NvError, Value, NV_MAX_SIZE};

/// The protocol version spoken, and the highest frame version byte
/// accepted.
pub const HAST_PROTO_VERSION: u8 = 2;

/// Bytes of the fixed frame header (version and nv size).
pub const FRAME_HEADER_LEN: usize = 5;

/// Name of the nv field that announces the payload size.
pub const SIZE_FIELD: &str = "size";

/// Largest header and payload a reader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_header: usize,
    pub max_payload: usize,
}

impl Limits {
    /// Headers up to [`NV_MAX_SIZE`], no payload: the control socket and
    /// the handshake messages.
    pub const HEADERS_ONLY: Limits = Limits {
        max_header: NV_MAX_SIZE,
        max_payload: 0,
    };

    /// Replication: headers up to [`NV_MAX_SIZE`], payloads up to `max_payload`
    /// (the largest request the local side accepts, e.g. MAXPHYS).
    pub const fn replication(max_payload: usize) -> Limits {
        Limits {
            max_header: NV_MAX_SIZE,
            max_payload,
        }
    }
}

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed by the peer")]
    Closed,
    #[error("frame of protocol version {0}, at most version 2 is supported")]
    BadVersion(u8),
    #[error("frame header of {size} bytes exceeds the {max}-byte limit")]
    HeaderTooLarge { size: u64, max: usize },
    #[error("frame payload of {size} bytes exceeds the {max}-byte limit")]
    PayloadTooLarge { size: u64, max: usize },
    #[error("connection closed in the middle of a frame ({what}: got {got} of {want} bytes)")]
    Truncated {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("frame header field \"size\" is a {0}, expected uint32")]
    BadSizeField(&'static str),
    #[error("invalid frame header: {0}")]
    Nv(#[from] NvError),
}

/// The nv actually sent for `nv` with `payload`: a non-empty payload sets
/// `size` (uint32, as the reference) to its length, replacing any `size`.
fn header_for(nv: &Nv, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if payload.is_empty() {
        return Ok(nv.encode()?);
    }
    let size = u32::try_from(payload.len()).map_err(|_| ProtoError::PayloadTooLarge {
        size: payload.len() as u64,
        max: u32::MAX as usize,
    })?;
    let mut with_size = nv.clone();
    with_size.set(SIZE_FIELD, Value::Uint32(size));
    Ok(with_size.encode()?)
}

fn frame_header(nvbytes: &[u8]) -> Result<[u8; FRAME_HEADER_LEN], ProtoError> {
    let size = u32::try_from(nvbytes.len()).map_err(|_| ProtoError::HeaderTooLarge {
        size: nvbytes.len() as u64,
        max: NV_MAX_SIZE,
    })?;
    let s = size.to_le_bytes();
    Ok([HAST_PROTO_VERSION, s[0], s[1], s[2], s[3]])
}

/// The complete frame (header, nv, payload) as bytes.
pub fn encode_frame(nv: &Nv, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let nvbytes = header_for(nv, payload)?;
    let hdr = frame_header(&nvbytes)?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + nvbytes.len() + payload.len());
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&nvbytes);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, nv: &Nv, payload: &[u8]) -> Result<(), ProtoError> {
    let nvbytes = header_for(nv, payload)?;
    let hdr = frame_header(&nvbytes)?;
    let mut head = Vec::with_capacity(FRAME_HEADER_LEN + nvbytes.len());
    head.extend_from_slice(&hdr);
    head.extend_from_slice(&nvbytes);
    w.write_all(&head)?;
    if !payload.is_empty() {
        w.write_all(payload)?;
    }
    w.flush()?;
    Ok(())
}

/// Writes one frame to an async stream.
pub async fn write_frame_async<W: AsyncWrite + Unpin>(
    w: &mut W,
    nv: &Nv,
    payload: &[u8],
) -> Result<(), ProtoError> {
    let nvbytes = header_for(nv, payload)?;
    let hdr = frame_header(&nvbytes)?;
    let mut head = Vec::with_capacity(FRAME_HEADER_LEN + nvbytes.len());
    head.extend_from_slice(&hdr);
    head.extend_from_slice(&nvbytes);
    w.write_all(&head).await?;
    if !payload.is_empty() {
        w.write_all(payload).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Checks the 5-byte header; returns the nv size.
fn parse_header(hdr: &[u8; FRAME_HEADER_LEN], limits: Limits) -> Result<usize, ProtoError> {
    let [version, a, b, c, d] = *hdr;
    // As FreeBSD's hast_proto_recv_hdr: only versions above ours are
    // refused. A FreeBSD primary's first frames carry its resource's
    // hr_version, which is 1 until the handshake raised it.
    if version > HAST_PROTO_VERSION {
        return Err(ProtoError::BadVersion(version));
    }
    let size = u32::from_le_bytes([a, b, c, d]);
    let max = limits.max_header.min(NV_MAX_SIZE);
    match usize::try_from(size) {
        Ok(s) if s <= max => Ok(s),
        _ => Err(ProtoError::HeaderTooLarge {
            size: u64::from(size),
            max,
        }),
    }
}

/// Decodes the nv and returns it with the announced payload size, checked.
fn parse_nv(buf: &[u8], limits: Limits) -> Result<(Nv, usize), ProtoError> {
    let nv = Nv::decode(buf)?;
    let size = match nv.get(SIZE_FIELD) {
        None => 0,
        Some(Value::Uint32(s)) => *s,
        Some(other) => return Err(ProtoError::BadSizeField(other.type_name())),
    };
    match usize::try_from(size) {
        Ok(s) if s <= limits.max_payload => Ok((nv, s)),
        _ => Err(ProtoError::PayloadTooLarge {
            size: u64::from(size),
            max: limits.max_payload,
        }),
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

async fn read_full_async<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        match r.read(rest).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn check_full(what: &'static str, got: usize, want: usize) -> Result<(), ProtoError> {
    if got < want {
        Err(ProtoError::Truncated { what, got, want })
    } else {
        Ok(())
    }
}

/// Reads the frame header and nv only; returns the nv and the size of the
/// payload that follows (checked against `limits`), so that the caller can
/// read the payload into its own buffer. EOF before the first byte is
/// [`ProtoError::Closed`]; nothing is allocated before the sizes are checked.
pub fn read_header<R: Read>(r: &mut R, limits: Limits) -> Result<(Nv, usize), ProtoError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    let got = read_full(r, &mut hdr)?;
    if got == 0 {
        return Err(ProtoError::Closed);
    }
    check_full("frame header", got, FRAME_HEADER_LEN)?;
    let nvsize = parse_header(&hdr, limits)?;
    let mut nvbuf = vec![0u8; nvsize];
    check_full("nv header", read_full(r, &mut nvbuf)?, nvsize)?;
    parse_nv(&nvbuf, limits)
}

/// Reads exactly `buf.len()` payload bytes (after [`read_header`]).
pub fn read_payload<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ProtoError> {
    check_full("payload", read_full(r, buf)?, buf.len())
}

/// Reads one frame: the nv header and its payload (empty when the nv has no
/// `size`). EOF before the first byte is [`ProtoError::Closed`]; sizes above
/// `limits` are refused before anything is allocated for them.
pub fn read_frame<R: Read>(r: &mut R, limits: Limits) -> Result<(Nv, Vec<u8>), ProtoError> {
    let (nv, psize) = read_header(r, limits)?;
    let mut payload = vec![0u8; psize];
    read_payload(r, &mut payload)?;
    Ok((nv, payload))
}

/// [`read_header`] for an async stream.
pub async fn read_header_async<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: Limits,
) -> Result<(Nv, usize), ProtoError> {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    let got = read_full_async(r, &mut hdr).await?;
    if got == 0 {
        return Err(ProtoError::Closed);
    }
    check_full("frame header", got, FRAME_HEADER_LEN)?;
    let nvsize = parse_header(&hdr, limits)?;
    let mut nvbuf = vec![0u8; nvsize];
    check_full("nv header", read_full_async(r, &mut nvbuf).await?, nvsize)?;
    parse_nv(&nvbuf, limits)
}

/// [`read_payload`] for an async stream.
pub async fn read_payload_async<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), ProtoError> {
    let want = buf.len();
    check_full("payload", read_full_async(r, buf).await?, want)
}

/// [`read_frame`] for an async stream.
pub async fn read_frame_async<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: Limits,
) -> Result<(Nv, Vec<u8>), ProtoError> {
    let (nv, psize) = read_header_async(r, limits).await?;
    let mut payload = vec![0u8; psize];
    read_payload_async(r, &mut payload).await?;
    Ok((nv, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A reader that counts what was consumed from it.
    struct Counting<'a> {
        inner: &'a [u8],
        consumed: usize,
    }

    impl Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = Read::read(&mut self.inner, buf)?;
            self.consumed += n;
            Ok(n)
        }
    }

    fn cmd_nv() -> Nv {
        let mut nv = Nv::new();
        nv.add_u8("cmd", 1);
        nv
    }

    #[test]
    fn frame_bytes_for_a_control_command() {
        let f = encode_frame(&cmd_nv(), &[]).unwrap();
        assert_eq!(&f[..5], &[2, 22, 0, 0, 0]);
        assert_eq!(&f[5..], &cmd_nv().encode().unwrap()[..]);
        let (back, payload) = read_frame(&mut &f[..], Limits::HEADERS_ONLY).unwrap();
        assert_eq!(back, cmd_nv());
        assert!(payload.is_empty());
    }

    #[test]
    fn payload_sets_uint32_size_and_follows_the_nv() {
        let payload = vec![0xabu8; 4096];
        let f = encode_frame(&cmd_nv(), &payload).unwrap();
        let nvlen = u32::from_le_bytes(f[1..5].try_into().unwrap()) as usize;
        let nv = Nv::decode(&f[5..5 + nvlen]).unwrap();
        assert_eq!(nv.get(SIZE_FIELD), Some(&Value::Uint32(4096)));
        assert_eq!(&f[5 + nvlen..], &payload[..]);
        let (back, data) = read_frame(&mut &f[..], Limits::replication(1 << 20)).unwrap();
        assert_eq!(back.get_u32(SIZE_FIELD), Some(4096));
        assert_eq!(data, payload);
        // Two frames back to back on one stream.
        let mut two = f.clone();
        two.extend(encode_frame(&cmd_nv(), &[]).unwrap());
        let mut cur = Cursor::new(two);
        read_frame(&mut cur, Limits::replication(4096)).unwrap();
        let (second, p2) = read_frame(&mut cur, Limits::replication(4096)).unwrap();
        assert_eq!(second, cmd_nv());
        assert!(p2.is_empty());
        assert!(matches!(
            read_frame(&mut cur, Limits::HEADERS_ONLY),
            Err(ProtoError::Closed)
        ));
    }

    #[test]
    fn header_bound_is_checked_before_reading_or_allocating() {
        // Declares a 4 GiB nv; only the 5 header bytes may be consumed.
        let bytes = [2u8, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let mut r = Counting {
            inner: &bytes,
            consumed: 0,
        };
        match read_frame(&mut r, Limits::HEADERS_ONLY) {
            Err(ProtoError::HeaderTooLarge { size, max }) => {
                assert_eq!(size, u64::from(u32::MAX));
                assert_eq!(max, NV_MAX_SIZE);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(r.consumed, 5);
        // A caller limit below NV_MAX_SIZE is honoured too.
        let f = encode_frame(&cmd_nv(), &[]).unwrap();
        let small = Limits {
            max_header: 21,
            max_payload: 0,
        };
        assert!(matches!(
            read_frame(&mut &f[..], small),
            Err(ProtoError::HeaderTooLarge { size: 22, max: 21 })
        ));
    }

    #[test]
    fn payload_bound_is_checked_before_reading_the_payload() {
        let mut nv = cmd_nv();
        nv.add_u32(SIZE_FIELD, u32::MAX);
        let nvb = nv.encode().unwrap();
        let mut bytes = vec![2u8];
        bytes.extend_from_slice(&(nvb.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&nvb);
        bytes.extend_from_slice(&[0; 64]);
        let mut r = Counting {
            inner: &bytes,
            consumed: 0,
        };
        assert!(matches!(
            read_frame(&mut r, Limits::replication(1 << 20)),
            Err(ProtoError::PayloadTooLarge { size, max }) if size == u64::from(u32::MAX) && max == 1 << 20
        ));
        assert_eq!(r.consumed, 5 + nvb.len());
        // The control socket takes no payload at all.
        let f = encode_frame(&cmd_nv(), b"x").unwrap();
        assert!(matches!(
            read_frame(&mut &f[..], Limits::HEADERS_ONLY),
            Err(ProtoError::PayloadTooLarge { size: 1, max: 0 })
        ));
        // A "size" of another type is refused rather than misread.
        let mut nv = cmd_nv();
        nv.add_u64(SIZE_FIELD, 1);
        let f = encode_frame(&nv, &[]).unwrap();
        assert!(matches!(
            read_frame(&mut &f[..], Limits::replication(16)),
            Err(ProtoError::BadSizeField("uint64"))
        ));
    }

    #[test]
    fn bad_version_truncation_and_bad_nv() {
        let mut f = encode_frame(&cmd_nv(), &[]).unwrap();
        // Bytes up to 2 are accepted, as FreeBSD does (its primary's first
        // frame carries 1); above 2 refused.
        for v in [0, 1, 2] {
            f[0] = v;
            let (nv, _) = read_frame(&mut &f[..], Limits::HEADERS_ONLY).unwrap();
            assert_eq!(nv, cmd_nv());
        }
        f[0] = 3;
        assert!(matches!(
            read_frame(&mut &f[..], Limits::HEADERS_ONLY),
            Err(ProtoError::BadVersion(3))
        ));
        f[0] = 2;
        assert!(matches!(
            read_frame(&mut &[][..], Limits::HEADERS_ONLY),
            Err(ProtoError::Closed)
        ));
        for cut in [1, 4, 5, 10, f.len() - 1] {
            match read_frame(&mut &f[..cut], Limits::HEADERS_ONLY) {
                Err(ProtoError::Truncated { got, want, .. }) => assert!(got < want),
                other => panic!("cut {cut}: unexpected {other:?}"),
            }
        }
        let p = encode_frame(&cmd_nv(), &[9; 100]).unwrap();
        assert!(matches!(
            read_frame(&mut &p[..p.len() - 1], Limits::replication(100)),
            Err(ProtoError::Truncated {
                what: "payload",
                got: 99,
                want: 100
            })
        ));
        // An nv that fails validation.
        let mut bad = f.clone();
        bad[5] = 0x55;
        assert!(matches!(
            read_frame(&mut &bad[..], Limits::HEADERS_ONLY),
            Err(ProtoError::Nv(NvError::BadType { ty: 0x55, .. }))
        ));
    }

    #[test]
    fn sync_frames_over_a_real_socket() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let p2 = payload.clone();
        let t = std::thread::spawn(move || {
            write_frame(&mut a, &cmd_nv(), &p2).unwrap();
        });
        let (nv, data) = read_frame(&mut b, Limits::replication(1 << 20)).unwrap();
        t.join().unwrap();
        assert_eq!(nv.get_u8("cmd"), Some(1));
        assert_eq!(data, payload);
        assert!(matches!(
            read_frame(&mut b, Limits::HEADERS_ONLY),
            Err(ProtoError::Closed)
        ));
    }

    #[tokio::test]
    async fn async_frames_over_a_real_socket() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let payload = vec![0x5au8; 131072];
        let p2 = payload.clone();
        let w = tokio::spawn(async move {
            write_frame_async(&mut a, &cmd_nv(), &p2).await.unwrap();
            write_frame_async(&mut a, &cmd_nv(), &[]).await.unwrap();
        });
        let (nv, data) = read_frame_async(&mut b, Limits::replication(131072))
            .await
            .unwrap();
        assert_eq!(nv.get_u32(SIZE_FIELD), Some(131072));
        assert_eq!(data, payload);
        let (nv, size) = read_header_async(&mut b, Limits::HEADERS_ONLY)
            .await
            .unwrap();
        assert_eq!((nv.get_u8("cmd"), size), (Some(1), 0));
        w.await.unwrap();
        assert!(matches!(
            read_frame_async(&mut b, Limits::HEADERS_ONLY).await,
            Err(ProtoError::Closed)
        ));
        // Bound checked before allocation on the async path as well.
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut a, &[2, 0, 0, 0, 0x40])
            .await
            .unwrap();
        assert!(matches!(
            read_frame_async(&mut b, Limits::HEADERS_ONLY).await,
            Err(ProtoError::HeaderTooLarge {
                size: 0x4000_0000,
                ..
            })
        ));
    }
}

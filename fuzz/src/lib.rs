//! Shared pieces of the hast fuzz targets: the layouts of the inputs that
//! are more than one byte string (split and built here, so the targets and
//! the seed generator agree), an in-memory NBD backend, and a tokio runtime
//! for the targets that drive async code.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use hast::nbd::{Backend, BoxFuture};
use hast::nv::Nv;

/// Payload limit of the replication frames the targets read (the
/// secondary's MAX_IO is 1 MiB; smaller keeps the fuzzer fast).
pub const FRAME_MAX_PAYLOAD: usize = 128 * 1024;

/// Largest request a payload target decodes (the secondary's maximum).
pub const PAYLOAD_MAX: usize = 1 << 20;

/// This node's activemap size in the handshake target: a 1 GiB provider
/// with 2 MiB extents.
pub const OUR_MAPSIZE: usize = 512;

/// A current-thread tokio runtime, built once per fuzzing process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread tokio runtime")
    })
}

/// Input of the payload target: the request's length, the nv header that
/// carries the pipeline's fields, and the payload as received.
///
/// Layout: `u32` LE expected length, `u16` LE nv length, the nv bytes, then
/// the payload (the rest).
#[derive(Debug)]
pub struct PayloadInput<'a> {
    pub expected_len: usize,
    pub nv: &'a [u8],
    pub payload: &'a [u8],
}

impl<'a> PayloadInput<'a> {
    /// Splits `data`; `None` when it is too short for the fixed fields.
    pub fn split(data: &'a [u8]) -> Option<PayloadInput<'a>> {
        let (len, rest) = data.split_first_chunk::<4>()?;
        let (nvlen, rest) = rest.split_first_chunk::<2>()?;
        let nvlen = usize::from(u16::from_le_bytes(*nvlen)).min(rest.len());
        let (nv, payload) = rest.split_at(nvlen);
        Some(PayloadInput {
            expected_len: u32::from_le_bytes(*len) as usize,
            nv,
            payload,
        })
    }

    /// Builds an input (for the seed generator).
    pub fn build(expected_len: u32, nv: &Nv, payload: &[u8]) -> Vec<u8> {
        let nvb = nv.encode().expect("seed nv encodes");
        let mut out = expected_len.to_le_bytes().to_vec();
        out.extend_from_slice(
            &u16::try_from(nvb.len())
                .expect("seed nv fits")
                .to_le_bytes(),
        );
        out.extend_from_slice(&nvb);
        out.extend_from_slice(payload);
        out
    }
}

/// Geometry of the export of the NBD target.
pub const NBD_EXPORT: &str = "data";
/// Size of that export.
pub const NBD_SIZE: u64 = 1 << 20;
/// Its block size.
pub const NBD_BLOCK: u32 = 512;

/// An NBD [`Backend`] in memory that records any request the server should
/// have refused (outside the export or not aligned): the server promises
/// backends checked requests.
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    violated: AtomicBool,
}

impl Default for MemBackend {
    fn default() -> MemBackend {
        MemBackend {
            data: Mutex::new(vec![0; NBD_SIZE as usize]),
            violated: AtomicBool::new(false),
        }
    }
}

impl MemBackend {
    /// Whether the server ever passed an unchecked request (and clears it).
    pub fn take_violation(&self) -> bool {
        self.violated.swap(false, Ordering::SeqCst)
    }

    /// The byte range of a checked request, or records a violation.
    fn range(&self, off: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let b = u64::from(NBD_BLOCK);
        let ok = off.is_multiple_of(b)
            && len.is_multiple_of(b)
            && off.checked_add(len).is_some_and(|end| end <= NBD_SIZE);
        if !ok {
            self.violated.store(true, Ordering::SeqCst);
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        Ok(off as usize..(off + len) as usize)
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        NBD_SIZE
    }

    fn block_size(&self) -> u32 {
        NBD_BLOCK
    }

    fn read(&self, off: u64, len: u32) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        let r = self
            .range(off, u64::from(len))
            .map(|r| self.mem().get(r).map(<[u8]>::to_vec).unwrap_or_default());
        Box::pin(async move { r })
    }

    fn write(&self, off: u64, data: Vec<u8>, _fua: bool) -> BoxFuture<'_, io::Result<()>> {
        let r = self.range(off, data.len() as u64).map(|r| {
            if let Some(dst) = self.mem().get_mut(r) {
                dst.copy_from_slice(&data);
            }
        });
        Box::pin(async move { r })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, off: u64, len: u32, _fua: bool) -> BoxFuture<'_, io::Result<()>> {
        let r = self.range(off, u64::from(len)).map(|_| ());
        Box::pin(async move { r })
    }

    fn write_zeroes(
        &self,
        off: u64,
        len: u32,
        _no_hole: bool,
        _fua: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        let r = self.range(off, u64::from(len)).map(|r| {
            if let Some(dst) = self.mem().get_mut(r) {
                dst.fill(0);
            }
        });
        Box::pin(async move { r })
    }
}

//! NBD server: the Linux host's front end. Any standard NBD client (qemu,
//! nbdcopy, fio, nbd-client) reaches a HAST provider through it.
//!
//! - [`proto`]: wire constants and fixed-size messages;
//! - [`export`]: the [`Registry`] of named exports (name -> [`Backend`]),
//!   changeable at run time;
//! - [`server`]: listeners, the fixed newstyle handshake and the
//!   transmission phase (many requests in flight, one reply writer);
//! - [`file`]: a [`Backend`] on a regular file or a block device.
//!
//! Only simple replies are spoken (structured replies are refused with
//! `NBD_REP_ERR_UNSUP`, which every client handles).

pub mod export;
pub mod file;
pub mod proto;
pub mod server;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

pub use export::Registry;
pub use file::{FileBackend, FileOptions};
pub use server::{Done, Server, ServerConfig};

/// A boxed, sendable future, the return type of [`Backend`] operations (so
/// exports of different backend types can sit in one [`Registry`]).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The storage behind one export. Offsets and lengths are relative to the
/// export (0..size) and have already been checked by the server: aligned to
/// [`Backend::block_size`] and inside [`Backend::size`]. Implementations
/// check again and answer `InvalidInput` rather than touch anything outside.
///
/// Many operations are in flight at once; an implementation must allow
/// concurrent calls.
pub trait Backend: Send + Sync + 'static {
    /// Export size in bytes (a multiple of [`Backend::block_size`]).
    fn size(&self) -> u64;

    /// Smallest addressable unit: the provider's sector size (a power of
    /// two, at most 65536). Requests not aligned to it are refused.
    fn block_size(&self) -> u32;

    /// True when writes, trims and zeroing must be refused with `EPERM`.
    fn read_only(&self) -> bool {
        false
    }

    /// Reads `len` bytes at `off`; the result must be exactly `len` long.
    fn read(&self, off: u64, len: u32) -> BoxFuture<'_, io::Result<Vec<u8>>>;

    /// Writes `data` at `off`; with `fua` the data is on stable storage
    /// when the future completes.
    fn write(&self, off: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, io::Result<()>>;

    /// Starts a read of `len` bytes at `off` and answers through `done`
    /// (with exactly `len` bytes) when it finishes. The default runs
    /// [`Backend::read`] on a task of its own; a backend that finishes
    /// requests on its own threads can answer from there instead and save
    /// a task and a wake-up per request.
    fn start_read(self: Arc<Self>, off: u64, len: u32, done: Done) {
        tokio::spawn(async move { done.finish(self.read(off, len).await.map(Some)) });
    }

    /// Starts a write like [`Backend::write`] and answers through `done`
    /// when it finishes. The default runs [`Backend::write`] on a task of
    /// its own (see [`Backend::start_read`]).
    fn start_write(self: Arc<Self>, off: u64, data: Vec<u8>, fua: bool, done: Done) {
        tokio::spawn(async move { done.finish(self.write(off, data, fua).await.map(|()| None)) });
    }

    /// Makes every completed write durable.
    fn flush(&self) -> BoxFuture<'_, io::Result<()>>;

    /// Discards a range (a hint: the contents afterwards are unspecified).
    fn trim(&self, off: u64, len: u32, fua: bool) -> BoxFuture<'_, io::Result<()>>;

    /// Zeroes a range; with `no_hole` the range stays allocated.
    fn write_zeroes(
        &self,
        off: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> BoxFuture<'_, io::Result<()>>;
}

/// Errors of setting up exports and listeners (per-request errors go to the
/// client as NBD error codes instead).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// A listener could not be created.
    #[error("cannot listen on {addr}: {source}; check that the address is free and that this user may bind it")]
    Listen {
        /// The address or socket path.
        addr: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// An export with this name is already registered.
    #[error("export {0:?} already exists; remove it first or choose another name")]
    ExportExists(String),
    /// The export name cannot be sent over NBD.
    #[error("export name {name:?} is invalid: {reason}")]
    BadExportName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The backend reports a geometry the protocol cannot express.
    #[error("export {name:?}: {reason}")]
    BadGeometry {
        /// The export name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The local provider could not be opened or inspected.
    #[error("cannot open provider {path}: {source}")]
    Open {
        /// The provider path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The provider does not fit the requested offset/size/block size.
    #[error("provider {path}: {reason}")]
    Provider {
        /// The provider path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A server setting is out of range.
    #[error("invalid NBD server setting: {0}")]
    Config(String),
}

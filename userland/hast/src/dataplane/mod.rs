//! The dataplane interface: what the replication engine asks of the host of
//! the fast-path core, whichever host it is. Upcalls (core -> engine:
//! replicate this write, serve this read from the peer, persist the counter
//! bump) come out of [`Dataplane::next_upcall`]; everything else is a
//! downcall. Two hosts implement it:
//! - [`UserPlane`]: the core in this process, behind the NBD export
//!   ([`crate::uhost`]); any OS, the only one on Linux;
//! - [`KernelPlane`]: the geom_hast kernel module through `/dev/hastctl`
//!   ([`crate::kdev`]); chosen at run time on FreeBSD when the module is
//!   loaded, and in test builds on Linux when the module runs on the
//!   userland kernel shim (`crate::kshim`).
//!
//! The engine never sees sync-lock grants or sync I/O completions: the
//! hosts resolve them inside [`Dataplane::sync_lock`],
//! [`Dataplane::sync_read`] and [`Dataplane::sync_write`].

mod export;
mod kernel;
#[cfg(all(feature = "kshim", target_os = "linux"))]
mod kshim_front;
mod user;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::config::ResourceConfig;
use crate::core::{CoreError, MapKind, Mode, Stats, SyncDir, Upcall};
use crate::kdev::KdevError;
use crate::metadata::{Metadata, MetadataError};
use crate::metrics::ResourceMetrics;
use crate::provider::Provider;
use crate::uhost::HostGeometry;

pub use kernel::{KernelHost, KernelPlane};
pub use user::{UserHost, UserPlane};

/// A boxed future, as the trait's async methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What went wrong in a downcall.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{0}")]
    Core(#[from] CoreError),
    #[error("{0}")]
    Kernel(#[from] KdevError),
    #[error("{0}")]
    Metadata(#[from] MetadataError),
    #[error("local {op} of {length} bytes at offset {offset} for resync failed: {}", std::io::Error::from_raw_os_error(*errno))]
    SyncIo {
        op: &'static str,
        offset: u64,
        length: u64,
        errno: i32,
    },
    #[error("the data path stopped (link lost or resource closing)")]
    Closed,
    #[error("a flush of both sides is already running")]
    Busy,
    /// A blocking task doing the host's work (a metadata write, a kernel
    /// ioctl) did not run to its end.
    #[error("the host's blocking task failed: {0}")]
    Task(String),
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Uhost(#[from] crate::uhost::UhostError),
    #[error("kernel host: {0}")]
    Kernel(#[from] KdevError),
    /// The blocking task creating the kernel instance did not run to its
    /// end.
    #[error("the kernel host's create task failed: {0}")]
    Task(String),
    #[error("the local provider is still open in hastd; the kernel module needs it exclusively")]
    ProviderBusy,
    #[error("NBD export {addr}: {source}")]
    Export {
        addr: String,
        #[source]
        source: crate::nbd::NbdError,
    },
    #[error("cannot prepare the NBD socket {path}: {source}", path = path.display())]
    SocketDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[cfg(all(feature = "kshim", target_os = "linux"))]
    #[error("kernel shim: {0}")]
    Kshim(#[from] crate::kshim::KshimError),
}

/// What a host needs to start: the resource, its opened local provider
/// (the caller's only reference on the kernel host, which closes it before
/// the module opens the disk exclusively), its geometry and on-disk map,
/// and where it records its requests' latency, bytes and local errors (the
/// userland host does; the kernel module's requests are not timed).
pub struct HostSpec<'a> {
    pub cfg: &'a ResourceConfig,
    pub provider: std::sync::Arc<Provider>,
    pub geometry: HostGeometry,
    pub map: &'a [u8],
    pub metrics: std::sync::Arc<ResourceMetrics>,
}

/// A started host: the core's dataplane and the front end clients reach
/// the device through.
pub trait Host: Send + Sync {
    /// The engine's side of the core.
    fn plane(&self) -> std::sync::Arc<dyn Dataplane>;

    /// Let clients in (the engine calls it after the first connection
    /// attempt, so that a stale copy is never read).
    fn open<'a>(&'a mut self, cfg: &'a ResourceConfig) -> BoxFuture<'a, Result<(), HostError>>;

    /// Refuse new clients, let the requests in flight finish, disconnect
    /// the clients.
    fn close(&mut self) -> BoxFuture<'_, ()>;

    /// After the engine let go of the plane: stop the core and release the
    /// disk (hastd may open the local provider again).
    fn finish(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Whether primaries run in the kernel module on this system (FreeBSD with
/// geom_hast loaded, or the kernel shim in a test build).
pub fn kernel_host() -> bool {
    crate::kdev::KernelDevice::kernel_host()
}

/// Start the core of a primary on the host this system has: the kernel
/// module when [`kernel_host`], else this process with an NBD export.
pub async fn start(spec: HostSpec<'_>) -> Result<Box<dyn Host>, HostError> {
    if kernel_host() {
        Ok(Box::new(KernelHost::start(spec).await?))
    } else {
        Ok(Box::new(UserHost::start(spec)?))
    }
}

/// An upcall for the engine, with a write's payload.
#[derive(Debug, Clone)]
pub struct HostUpcall {
    pub up: Upcall,
    /// The bytes to send the peer for a write (zeros for a write-zeroes);
    /// `None` for other kinds, or when the request is gone.
    pub data: Option<Bytes>,
}

/// The engine's side of the channel to the core's host.
pub trait Dataplane: Send + Sync {
    /// Which host this is, for logs ("userland", "kernel").
    fn host(&self) -> &'static str;

    /// Wait for the next upcall of kind Read, Write, Delete, Flush or Bump.
    /// `None` once the host is gone.
    fn next_upcall(&self) -> BoxFuture<'_, Option<HostUpcall>>;

    /// The remote half of `up` finished with `error` (errno, 0: success);
    /// a successful peer read passes its bytes (exactly its length).
    fn remote_done(&self, up: &Upcall, error: i32, data: Option<Vec<u8>>);

    /// memsync: the peer received write `seq`.
    fn remote_received(&self, seq: u64);

    /// The localcnt bump was persisted (0) or not (errno).
    fn bump_done(&self, error: i32);

    /// Link to the peer up or down.
    fn set_link(&self, up: bool);

    /// The largest READ/WRITE the peer accepts.
    fn set_max_request(&self, bytes: u64);

    /// Synchronization direction.
    fn set_sync_dir(&self, dir: SyncDir);

    /// Replication mode of requests from now on.
    fn set_mode(&self, mode: Mode);

    /// Bytes of the activemap.
    fn map_size(&self) -> Result<usize, DataplaneError>;

    /// A copy of one bitmap (bit n of byte n / 8 is extent n).
    fn map(&self, kind: MapKind) -> Result<Vec<u8>, DataplaneError>;

    /// OR the peer's map into the sync map.
    fn map_merge(&self, map: &[u8]) -> Result<(), DataplaneError>;

    /// Lock `[offset, offset + length)` for resynchronization; resolves
    /// with the lock once granted (regular writes to the range drained).
    /// [`Dataplane::sync_cancel`] makes it fail with `Closed`.
    fn sync_lock(&self, offset: u64, length: u64) -> BoxFuture<'_, Result<u64, DataplaneError>>;

    /// Read `length` bytes at `offset` locally under granted lock `lock`.
    fn sync_read(
        &self,
        lock: u64,
        offset: u64,
        length: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, DataplaneError>>;

    /// Write `data` at `offset` locally under granted lock `lock`.
    fn sync_write(
        &self,
        lock: u64,
        offset: u64,
        data: Bytes,
    ) -> BoxFuture<'_, Result<(), DataplaneError>>;

    /// Release `lock`; `clear` marks the extents it covers synchronized.
    fn sync_release(&self, lock: u64, clear: bool) -> Result<(), DataplaneError>;

    /// The link is gone: fail every sync lock still waiting for its grant.
    fn sync_cancel(&self);

    /// Start the core's own flush of both sides (local provider and peer);
    /// returns its number: once `stats().flush_done` reaches it, every
    /// extent written on both sides before the call has left the map.
    /// [`DataplaneError::Busy`] while one runs.
    fn flush(&self) -> Result<u32, DataplaneError>;

    /// Counters and queues.
    fn stats(&self) -> Result<Stats, DataplaneError>;

    /// Write the metadata block (flushed when `flush`). Blocking: call it
    /// from a blocking thread.
    fn write_metadata(&self, md: &Metadata, flush: bool) -> Result<(), DataplaneError>;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sync locks asked for and not yet granted, by seq: both hosts announce a
/// grant as an upcall, on another thread or task than the one that asked.
#[derive(Default)]
struct Grants(Mutex<HashMap<u64, oneshot::Sender<()>>>);

impl Grants {
    /// Ask for a lock with `ask` (its seq), registered before the grant can
    /// arrive; wait for the grant. Cancelled ([`Grants::cancel`]): the lock
    /// is given back with `release` and the answer is `Closed`.
    async fn acquire(
        &self,
        ask: impl FnOnce() -> Result<u64, DataplaneError>,
        release: impl FnOnce(u64),
    ) -> Result<u64, DataplaneError> {
        let (tx, rx) = oneshot::channel();
        let seq = {
            let mut w = lock(&self.0);
            let seq = ask()?;
            w.insert(seq, tx);
            seq
        };
        if rx.await.is_err() {
            release(seq);
            return Err(DataplaneError::Closed);
        }
        Ok(seq)
    }

    /// Lock `seq` was granted.
    fn grant(&self, seq: u64) {
        if let Some(tx) = lock(&self.0).remove(&seq) {
            let _ = tx.send(());
        }
    }

    /// Fail every lock still waiting.
    fn cancel(&self) {
        lock(&self.0).clear();
    }
}

//! [`KernelPlane`]: the dataplane of a core inside the geom_hast kernel
//! module, through `/dev/hastctl` ([`crate::kdev`]). The module serves
//! `/dev/hast/NAME` itself and holds the local provider open exclusively,
//! so the metadata block is written through it too. One thread per instance
//! sleeps in HAST_IOC_UPCALL and hands the upcalls to the engine; every
//! other call is one ioctl. Portable: on systems without the module every
//! call fails with [`KdevError::Unsupported`], and [`KernelPlane::create`]
//! is never reached because the engine picks [`super::UserPlane`] there.
//! Its tests run it against the real module on the userland kernel shim
//! (tests/tests/kshim.rs).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::errno::Errno;
use tokio::sync::mpsc;

use super::{lock, BoxFuture, DataplaneError, Grants, HostUpcall};
use crate::core::{MapKind, Mode, Stats, SyncDir, Upcall, UpcallKind};
use crate::kdev::{CreateSpec, KdevError, KernelDevice, Unit};
use crate::metadata::Metadata;

/// One `hast/NAME` instance of the kernel module.
pub struct KernelPlane {
    dev: Arc<KernelDevice>,
    unit: Unit,
    name: String,
    upcalls: tokio::sync::Mutex<mpsc::UnboundedReceiver<HostUpcall>>,
    grants: Arc<Grants>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl KernelPlane {
    /// Create `hast/NAME` on the local provider through the control device
    /// at `path`, with the on-disk activemap (`spec.map`) loaded before the
    /// device appears, and start taking its upcalls. The engine must have
    /// closed its own descriptor of the local provider (the module opens it
    /// exclusively).
    pub fn create(path: &Path, spec: &CreateSpec) -> Result<KernelPlane, KdevError> {
        KernelPlane::create_on(KernelDevice::open_path(path)?, spec)
    }

    /// [`KernelPlane::create`] through an open control device.
    pub fn create_on(dev: KernelDevice, spec: &CreateSpec) -> Result<KernelPlane, KdevError> {
        let dev = Arc::new(dev);
        let unit = dev.create(spec)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let grants = Arc::new(Grants::default());
        let reader = {
            let dev = dev.clone();
            let grants = grants.clone();
            let name = spec.name.clone();
            std::thread::Builder::new()
                .name(format!("hast-up-{}", spec.name))
                .spawn(move || read_upcalls(&dev, unit, &grants, &tx, &name))
        };
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                let _ = dev.destroy(unit);
                return Err(KdevError::Invalid {
                    op: crate::kdev::Ioctl::Upcall,
                    what: format!("cannot start the upcall thread: {e}"),
                });
            }
        };
        tracing::info!("hast/{} created in the kernel (unit {})", spec.name, unit.0);
        Ok(KernelPlane {
            dev,
            unit,
            name: spec.name.clone(),
            upcalls: tokio::sync::Mutex::new(rx),
            grants,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// The instance's unit number.
    pub fn unit(&self) -> Unit {
        self.unit
    }

    /// Destroy the instance: retried while `hast/NAME` is open (EBUSY) for
    /// up to `wait`; then the upcall thread ends. Blocking.
    pub fn destroy(&self, wait: Duration) -> Result<(), KdevError> {
        let start = Instant::now();
        loop {
            match self.dev.destroy(self.unit) {
                Ok(()) => break,
                Err(e) if e.errno() == Some(Errno::ENXIO) => break,
                Err(e) if e.errno() == Some(Errno::EBUSY) && start.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(reader) = lock(&self.reader).take() {
            let _ = reader.join();
        }
        tracing::info!("hast/{} destroyed", self.name);
        Ok(())
    }

    fn warn(&self, what: &str, r: Result<(), KdevError>) {
        if let Err(e) = r {
            tracing::warn!("hast/{}: {what}: {e}", self.name);
        }
    }
}

/// The upcall thread: sleep in HAST_IOC_UPCALL, pass sync-lock grants to
/// their waiters, everything the engine handles to the channel; ends when
/// the instance is destroyed or the engine stopped listening.
fn read_upcalls(
    dev: &KernelDevice,
    unit: Unit,
    grants: &Grants,
    tx: &mpsc::UnboundedSender<HostUpcall>,
    name: &str,
) {
    let mut buf = Vec::with_capacity(128 * 1024);
    loop {
        let up = match dev.next_upcall(unit, &mut buf) {
            Ok(up) => up,
            Err(e) if e.errno() == Some(Errno::EINTR) => continue,
            Err(e) if e.errno() == Some(Errno::ENXIO) => return,
            // The module could not copy a write's payload out: it failed
            // that write's remote half (its extent stays dirty) and the
            // next upcall is a new one.
            Err(e) if e.errno() == Some(Errno::EFAULT) => {
                tracing::warn!("hast/{name}: a write was not replicated: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("hast/{name}: no more upcalls: {e}");
                return;
            }
        };
        let data = match up.kind {
            UpcallKind::SyncLocked => {
                grants.grant(up.seq);
                continue;
            }
            // The RANGE_IO ioctl already returned this I/O's result.
            UpcallKind::SyncIoDone { .. } => continue,
            // The payload leaves with the upcall; the next call gets a
            // fresh buffer of the same capacity (an allocation, not a copy).
            UpcallKind::Write { .. } => {
                let fresh = Vec::with_capacity(buf.capacity());
                Some(Bytes::from(std::mem::replace(&mut buf, fresh)))
            }
            _ => None,
        };
        if tx.send(HostUpcall { up, data }).is_err() {
            return;
        }
    }
}

fn sync_io_error(op: &'static str, offset: u64, length: u64, e: KdevError) -> DataplaneError {
    match e.errno() {
        Some(errno) if matches!(e, KdevError::Ioctl { .. }) && errno != Errno::ENXIO => {
            DataplaneError::SyncIo {
                op,
                offset,
                length,
                errno: errno as i32,
            }
        }
        _ => DataplaneError::Kernel(e),
    }
}

impl super::Dataplane for KernelPlane {
    fn host(&self) -> &'static str {
        "kernel"
    }

    fn next_upcall(&self) -> BoxFuture<'_, Option<HostUpcall>> {
        Box::pin(async move { self.upcalls.lock().await.recv().await })
    }

    fn remote_done(&self, up: &Upcall, error: i32, data: Option<Vec<u8>>) {
        let (error, data) = match (up.kind, error, data) {
            (UpcallKind::Read, 0, Some(d)) if d.len() as u64 == up.length => (0, d),
            (UpcallKind::Read, 0, _) => (libc::EIO, Vec::new()),
            (_, e, _) => (e, Vec::new()),
        };
        match self.dev.remote_done(self.unit, up.seq, error, &data) {
            Err(e) if e.errno() == Some(Errno::ENOENT) => {
                tracing::debug!("hast/{}: seq {} already finished", self.name, up.seq);
            }
            r => self.warn("remote completion", r),
        }
    }

    fn remote_received(&self, seq: u64) {
        match self.dev.remote_received(self.unit, seq) {
            Err(e) if e.errno() == Some(Errno::ENOENT) => {}
            r => self.warn("received", r),
        }
    }

    fn bump_done(&self, error: i32) {
        let r = self.dev.bump_done(self.unit, error);
        self.warn("bump answer", r);
    }

    fn set_link(&self, up: bool) {
        let r = self.dev.set_link(self.unit, up);
        self.warn("link state", r);
    }

    fn set_max_request(&self, _bytes: u64) {
        // Requests up to MAXPHYS reach the engine, which splits them for
        // the peer (see engine::link).
    }

    fn set_sync_dir(&self, dir: SyncDir) {
        let r = self.dev.set_sync_dir(self.unit, dir);
        self.warn("sync direction", r);
    }

    fn set_mode(&self, mode: Mode) {
        let r = self.dev.set_mode(self.unit, mode);
        self.warn("replication mode", r);
    }

    fn map_size(&self) -> Result<usize, DataplaneError> {
        Ok(self.dev.map_size(self.unit)?)
    }

    fn map(&self, kind: MapKind) -> Result<Vec<u8>, DataplaneError> {
        Ok(self.dev.map(self.unit, kind)?)
    }

    fn map_merge(&self, map: &[u8]) -> Result<(), DataplaneError> {
        Ok(self.dev.map_merge(self.unit, map)?)
    }

    fn sync_lock(&self, offset: u64, length: u64) -> BoxFuture<'_, Result<u64, DataplaneError>> {
        Box::pin(self.grants.acquire(
            move || Ok(self.dev.sync_lock(self.unit, offset, length)?),
            move |seq| {
                let r = self.dev.sync_release(self.unit, seq, false);
                self.warn("release of a cancelled sync lock", r);
            },
        ))
    }

    fn sync_read(
        &self,
        lock_seq: u64,
        offset: u64,
        length: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, DataplaneError>> {
        let dev = self.dev.clone();
        let unit = self.unit;
        Box::pin(async move {
            let len = usize::try_from(length).map_err(|_| DataplaneError::SyncIo {
                op: "read",
                offset,
                length,
                errno: libc::EINVAL,
            })?;
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                dev.sync_read(unit, lock_seq, offset, &mut buf)
                    .map(|_| buf)
                    .map_err(|e| sync_io_error("read", offset, length, e))
            })
            .await
            .map_err(|_| DataplaneError::Closed)?
        })
    }

    fn sync_write(
        &self,
        lock_seq: u64,
        offset: u64,
        data: Bytes,
    ) -> BoxFuture<'_, Result<(), DataplaneError>> {
        let dev = self.dev.clone();
        let unit = self.unit;
        Box::pin(async move {
            let length = data.len() as u64;
            tokio::task::spawn_blocking(move || {
                dev.sync_write(unit, lock_seq, offset, &data)
                    .map(drop)
                    .map_err(|e| sync_io_error("write", offset, length, e))
            })
            .await
            .map_err(|_| DataplaneError::Closed)?
        })
    }

    fn sync_release(&self, lock_seq: u64, clear: bool) -> Result<(), DataplaneError> {
        Ok(self.dev.sync_release(self.unit, lock_seq, clear)?)
    }

    fn sync_cancel(&self) {
        self.grants.cancel();
    }

    fn flush(&self) -> Result<u32, DataplaneError> {
        match self.dev.flush(self.unit) {
            Err(e) if e.errno() == Some(Errno::EBUSY) => Err(DataplaneError::Busy),
            r => Ok(r?),
        }
    }

    fn stats(&self) -> Result<Stats, DataplaneError> {
        Ok(self.dev.stats(self.unit)?)
    }

    fn write_metadata(&self, md: &Metadata, _flush: bool) -> Result<(), DataplaneError> {
        // The module always flushes after the metadata block.
        Ok(self.dev.write_metadata(self.unit, &md.encode()?)?)
    }
}

/// How long finishing a kernel host waits for `/dev/hast/NAME` to be closed.
const KERNEL_DESTROY_WAIT: Duration = Duration::from_secs(10);

/// The kernel host of a primary: `hast/NAME` in the geom_hast module, the
/// device its own front end (on the kernel shim of a test build, exported
/// over NBD).
pub struct KernelHost {
    plane: Arc<KernelPlane>,
    #[cfg(all(feature = "kshim", target_os = "linux"))]
    shim: Option<super::kshim_front::Shim>,
}

impl KernelHost {
    /// Close hastd's descriptor of the disk and create `hast/NAME`. The
    /// device appears at once: writes wait in the module for the first
    /// connection attempt (the owed localcnt bump), but a client that reads
    /// it before the role change returns may read a stale copy.
    pub async fn start(spec: super::HostSpec<'_>) -> Result<KernelHost, super::HostError> {
        let super::HostSpec {
            cfg,
            provider,
            geometry: geo,
            map,
            // The module's requests are not timed (hastd(8), Metrics).
            metrics: _,
        } = spec;
        let provider = Arc::try_unwrap(provider).map_err(|_| super::HostError::ProviderBusy)?;
        drop(provider);
        #[allow(unused_mut)] // the kernel shim names the local provider
        let mut spec = CreateSpec {
            name: cfg.provname.clone(),
            local: cfg.local.display().to_string(),
            params: crate::core::Params {
                mediasize: geo.datasize,
                extentsize: geo.extentsize,
                sectorsize: geo.sectorsize,
                keepdirty: geo.keepdirty,
                mode: geo.mode,
            },
            localoff: geo.localoff,
            mapoff: crate::metadata::METADATA_SIZE,
            metaflush: geo.metaflush,
            map: map.to_vec(),
        };
        let sectorsize = geo.sectorsize;
        let created = tokio::task::spawn_blocking(move || {
            #[cfg(all(feature = "kshim", target_os = "linux"))]
            let mut shim = if crate::kshim::selected() {
                Some(super::kshim_front::Shim::attach(&mut spec, sectorsize)?)
            } else {
                None
            };
            #[cfg(not(all(feature = "kshim", target_os = "linux")))]
            let _ = sectorsize;
            let plane = KernelDevice::open().and_then(|dev| KernelPlane::create_on(dev, &spec));
            match plane {
                #[cfg(all(feature = "kshim", target_os = "linux"))]
                Ok(plane) => Ok(KernelHost {
                    plane: Arc::new(plane),
                    shim,
                }),
                #[cfg(not(all(feature = "kshim", target_os = "linux")))]
                Ok(plane) => Ok(KernelHost {
                    plane: Arc::new(plane),
                }),
                Err(e) => {
                    #[cfg(all(feature = "kshim", target_os = "linux"))]
                    if let Some(s) = shim.as_mut() {
                        s.detach();
                    }
                    Err(super::HostError::from(e))
                }
            }
        })
        .await
        .map_err(|e| super::HostError::Task(e.to_string()))??;
        Ok(created)
    }
}

impl super::Host for KernelHost {
    fn plane(&self) -> Arc<dyn super::Dataplane> {
        self.plane.clone()
    }

    fn open<'a>(
        &'a mut self,
        cfg: &'a crate::config::ResourceConfig,
    ) -> BoxFuture<'a, Result<(), super::HostError>> {
        Box::pin(async move {
            #[cfg(all(feature = "kshim", target_os = "linux"))]
            if let Some(s) = self.shim.as_mut() {
                s.export(cfg).await?;
            }
            tracing::info!("serving /dev/hast/{} from the kernel module", cfg.provname);
            Ok(())
        })
    }

    fn close(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            #[cfg(all(feature = "kshim", target_os = "linux"))]
            if let Some(s) = self.shim.as_mut() {
                s.close().await;
            }
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let host = *self;
            let unit = host.plane.unit().0;
            let r = tokio::task::spawn_blocking(move || {
                #[allow(unused_mut)]
                let mut host = host;
                let r = host.plane.destroy(KERNEL_DESTROY_WAIT);
                #[cfg(all(feature = "kshim", target_os = "linux"))]
                if let Some(s) = host.shim.as_mut() {
                    if r.is_ok() {
                        s.detach();
                    }
                }
                r
            })
            .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(
                    "unable to destroy the kernel instance (unit {unit}): {e}; it stays with the link down"
                ),
                Err(e) => tracing::error!("destroying the kernel instance failed: {e}"),
            }
        })
    }
}

//! The primary's data path inside hastd: the core on one of its two hosts,
//! and the replication link ([`super::link`]) that answers the core's
//! upcalls through the [`Dataplane`] interface.
//! - On FreeBSD with geom_hast loaded (`/dev/hastctl` exists), the kernel
//!   module serves `/dev/hast/NAME` ([`KernelPlane`]).
//! - In a test build with `HAST_KSHIM` set, the same module runs in hastd
//!   on the userland kernel shim (`crate::kshim`): the local provider
//!   becomes a GEOM disk of the shim and `hast/NAME` is exported over NBD,
//!   every request entering the module's start method as a bio.
//! - Otherwise the core runs in hastd ([`crate::uhost`]) behind an NBD
//!   export at the resource's `nbd` address ([`UserPlane`]).
//!
//! Without a connected peer the primary runs degraded: the first write of
//! the outage waits until the localcnt bump is on disk, written extents
//! stay dirty, and reads the core wants from the peer fail.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::addr::{Addr, AddrKind};
use crate::config::{Replication, ResourceConfig};
use crate::core::{Mode, Params};
use crate::dataplane::{Dataplane, DataplaneError, KernelPlane, UserPlane};
use crate::kdev::{CreateSpec, KdevError, KernelDevice};
use crate::metadata::{Metadata, METADATA_SIZE};
use crate::metrics::ResourceMetrics;
use crate::nbd::{Backend, Registry, Server};
use crate::provider::Provider;
use crate::uhost::{HostGeometry, Uhost, UhostError};

use super::link::Replicator;

/// Why the data path could not start.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("{0}")]
    Host(#[from] UhostError),
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

/// The replication mode of the core for a configured mode.
pub fn mode_of(r: Replication) -> Mode {
    match r {
        Replication::Fullsync => Mode::FullSync,
        Replication::Memsync => Mode::MemSync,
        Replication::Async => Mode::Async,
    }
}

/// How long a role change waits for `/dev/hast/NAME` to be closed.
const KERNEL_DESTROY_WAIT: Duration = Duration::from_secs(10);

/// An NBD export of the data path.
struct Export {
    server: Server,
    socket: Option<std::path::PathBuf>,
    addr: Addr,
}

impl Export {
    /// Serve `backend` as export `cfg.provname` at the resource's `nbd`
    /// address (a Unix socket of mode 0600, or TCP).
    async fn start(
        cfg: &ResourceConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Export, PrimaryError> {
        let addr = cfg.nbd_addr();
        let export_err = |source| PrimaryError::Export {
            addr: addr.to_string(),
            source,
        };
        let registry = Registry::new();
        registry.add(&cfg.provname, backend).map_err(export_err)?;
        let server =
            Server::new(registry, crate::nbd::ServerConfig::default()).map_err(export_err)?;
        let socket = match &addr.kind {
            AddrKind::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| PrimaryError::SocketDir {
                        path: path.clone(),
                        source,
                    })?;
                }
                server.listen_unix(path).await.map_err(export_err)?;
                // The export is the disk: only its owner may connect.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                    |source| PrimaryError::SocketDir {
                        path: path.clone(),
                        source,
                    },
                )?;
                Some(path.clone())
            }
            AddrKind::Tcp { host, port, .. } => {
                let hostport = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                server.listen_tcp(&hostport).await.map_err(export_err)?;
                None
            }
        };
        tracing::info!("exporting {} over NBD at {addr}", cfg.provname);
        Ok(Export {
            server,
            socket,
            addr,
        })
    }

    /// Refuse new clients, finish the requests in flight, disconnect.
    async fn shutdown(&self) {
        self.server.shutdown().await;
    }

    /// After [`Export::shutdown`]: remove the socket.
    fn finish(self) {
        drop(self.server);
        if let Some(path) = self.socket {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("NBD export at {} stopped", self.addr);
    }
}

/// Tests only: what the kernel host adds on the userland kernel shim: the
/// GEOM disk under the module and the NBD export of `hast/NAME`.
#[cfg(all(feature = "kshim", target_os = "linux"))]
struct Shim {
    disk: Option<Arc<crate::kshim::Disk>>,
    backend: Option<Arc<crate::kshim::GeomBackend>>,
    export: Option<Export>,
    failpoints: Option<tokio::task::JoinHandle<()>>,
}

#[cfg(all(feature = "kshim", target_os = "linux"))]
impl Shim {
    /// Before the instance: the local provider as a GEOM disk (`mdN`, as
    /// mdconfig would make it), whose name becomes the instance's local
    /// provider. Blocking.
    fn attach(spec: &mut CreateSpec, sectorsize: u32) -> Result<Shim, PrimaryError> {
        crate::kshim::load()?;
        let disk = crate::kshim::Disk::create_md(&spec.local, sectorsize)?;
        tracing::info!("{} is {} on the kernel shim", spec.local, disk.name());
        spec.local = disk.name().to_owned();
        Ok(Shim {
            disk: Some(Arc::new(disk)),
            backend: None,
            export: None,
            failpoints: None,
        })
    }

    /// The userland host's local-disk fail points, on the shim's disk:
    /// while `primary-read` is armed its reads fail with EIO, while
    /// `primary-jitter` is armed each I/O waits a random time.
    fn watch_failpoints(&mut self) {
        use crate::failpoint::{check, PRIMARY_JITTER, PRIMARY_JITTER_MAX, PRIMARY_READ};
        if !cfg!(feature = "failpoints") {
            return;
        }
        let Some(disk) = self.disk.clone() else {
            return;
        };
        self.failpoints = Some(tokio::spawn(async move {
            let (mut read, mut jitter) = (false, false);
            loop {
                let r = check(PRIMARY_READ).is_some();
                if r != read {
                    read = r;
                    let e = r.then_some(nix::errno::Errno::EIO);
                    if let Err(e) = disk.fail(1 << 1, e) {
                        tracing::warn!("fail point {PRIMARY_READ}: {e}");
                    }
                }
                let j = check(PRIMARY_JITTER).is_some();
                if j != jitter {
                    jitter = j;
                    let d = if j {
                        PRIMARY_JITTER_MAX
                    } else {
                        Duration::ZERO
                    };
                    if let Err(e) = disk.delay(d) {
                        tracing::warn!("fail point {PRIMARY_JITTER}: {e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    /// After the instance: export `hast/NAME` over NBD.
    async fn export(&mut self, cfg: &ResourceConfig) -> Result<(), PrimaryError> {
        let backend = Arc::new(crate::kshim::GeomBackend::open(&format!(
            "hast/{}",
            cfg.provname
        ))?);
        self.backend = Some(backend.clone());
        self.export = Some(Export::start(cfg, backend).await?);
        self.watch_failpoints();
        Ok(())
    }

    /// Before the destroy: no client, `hast/NAME` closed.
    async fn close(&mut self) {
        if let Some(f) = self.failpoints.take() {
            f.abort();
            let _ = f.await;
        }
        if std::env::var_os(crate::kshim::FAIL_ENV).is_some_and(|v| !v.is_empty()) {
            tracing::info!("kernel shim: {}", crate::kshim::fault_report());
        }
        if let Some(export) = self.export.take() {
            export.shutdown().await;
            export.finish();
        }
        if let Some(backend) = self.backend.take() {
            let Some(backend) = release(backend).await else {
                tracing::error!("hast/NAME on the kernel shim is still referenced");
                return;
            };
            let r =
                tokio::task::spawn_blocking(move || backend.close(Duration::from_secs(10))).await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::error!("hast/NAME on the kernel shim is still open: {r:?}");
            }
        }
    }

    /// After the destroy: the disk goes. Blocking.
    fn detach(&mut self) {
        if let Some(f) = self.failpoints.take() {
            f.abort();
        }
        let Some(disk) = self.disk.take() else {
            return;
        };
        let name = disk.name().to_owned();
        match Arc::try_unwrap(disk) {
            Ok(disk) => {
                if let Err(e) = disk.destroy(Duration::from_secs(10)) {
                    tracing::error!("the kernel shim's disk {name} stays: {e}");
                }
            }
            Err(_) => tracing::error!("the kernel shim's disk {name} is still in use"),
        }
    }
}

/// Without the kernel shim: nothing.
#[cfg(not(all(feature = "kshim", target_os = "linux")))]
struct Shim;

#[cfg(not(all(feature = "kshim", target_os = "linux")))]
impl Shim {
    async fn close(&mut self) {}
    fn detach(&mut self) {}
}

/// Connect before serving, as the reference does: if the peer holds newer
/// data, reads must go to it from the first request on. Waits for the
/// first connection attempt, at most `connect_wait` (by default the
/// resource's timeout and a second).
async fn first_attempt(replicator: &Replicator, cfg: &ResourceConfig) {
    // hast.conf `connect_wait`, by default timeout + 1 s.
    let wait = cfg.first_connect_wait();
    if tokio::time::timeout(wait, replicator.first_attempt_done())
        .await
        .is_err()
    {
        tracing::warn!("no answer from {} yet; serving without it", cfg.remote);
    }
}

/// The only reference to `x` once the server's last tasks dropped theirs
/// (they do just after reporting stopped); `None` if they never do.
async fn release<T>(mut x: Arc<T>) -> Option<T> {
    for _ in 0..500 {
        match Arc::try_unwrap(x) {
            Ok(v) => return Some(v),
            Err(back) => x = back,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Where the core runs and how clients reach it.
enum Host {
    /// In hastd, behind the NBD export.
    User {
        plane: Arc<UserPlane>,
        export: Export,
    },
    /// In the kernel module, as `/dev/hast/NAME` (on the kernel shim in
    /// test builds, with its NBD export).
    Kernel {
        plane: Arc<KernelPlane>,
        shim: Option<Shim>,
    },
}

/// A running primary data path.
pub struct Primary {
    host: Host,
    dp: Arc<dyn Dataplane>,
    replicator: Arc<Replicator>,
    upcalls: tokio::task::JoinHandle<()>,
    link: tokio::task::JoinHandle<()>,
    stop_link: tokio::sync::watch::Sender<bool>,
}

impl Primary {
    /// Whether primaries run in the kernel module on this system (FreeBSD
    /// with geom_hast loaded). The caller must then hand [`Primary::start`]
    /// its only reference to the provider, which is closed before the
    /// module opens the disk exclusively.
    pub fn kernel_host() -> bool {
        KernelDevice::kernel_host()
    }

    /// Start the core on the opened provider: in the kernel module when
    /// [`Primary::kernel_host`], else in hastd with an NBD export. The data
    /// path and the link record into `metrics`.
    pub async fn start(
        cfg: &ResourceConfig,
        provider: Arc<Provider>,
        md: Arc<Mutex<Metadata>>,
        map: &[u8],
        metrics: Arc<ResourceMetrics>,
    ) -> Result<Primary, PrimaryError> {
        let geo = {
            let m = md.lock().unwrap_or_else(|p| p.into_inner());
            HostGeometry {
                localoff: m.localoff,
                datasize: m.datasize,
                extentsize: m.extentsize,
                sectorsize: provider.sectorsize(),
                keepdirty: m.keepdirty,
                mode: mode_of(cfg.replication),
                metaflush: cfg.metaflush,
            }
        };
        if Self::kernel_host() {
            return Self::start_kernel(cfg, provider, md, &geo, map, metrics).await;
        }
        let uhost = Arc::new(Uhost::new(provider.clone(), &geo, map, metrics.clone())?);
        let plane = Arc::new(UserPlane::new(uhost.clone(), provider));
        let dp: Arc<dyn Dataplane> = plane.clone();
        let replicator = Replicator::new(dp.clone(), md, cfg.clone(), metrics);
        let upcalls = tokio::spawn(replicator.clone().upcalls());
        let (stop_link, stop_rx) = tokio::sync::watch::channel(false);
        let link = tokio::spawn(replicator.clone().run(stop_rx));
        first_attempt(&replicator, cfg).await;
        match Export::start(cfg, uhost.clone()).await {
            Ok(export) => Ok(Primary {
                host: Host::User { plane, export },
                dp,
                replicator,
                upcalls,
                link,
                stop_link,
            }),
            Err(e) => {
                let _ = stop_link.send(true);
                let _ = link.await;
                upcalls.abort();
                Err(e)
            }
        }
    }

    /// The core in the kernel module: close hastd's descriptor of the
    /// disk, create `hast/NAME`, then connect as on the userland host and
    /// return (or, on the kernel shim, export) once the first attempt is
    /// over. The device appears at CREATE: writes wait for the first
    /// connection attempt in the module (the owed localcnt bump), but a
    /// client that reads it before the role change returns may read a
    /// stale copy.
    async fn start_kernel(
        cfg: &ResourceConfig,
        provider: Arc<Provider>,
        md: Arc<Mutex<Metadata>>,
        geo: &HostGeometry,
        map: &[u8],
        metrics: Arc<ResourceMetrics>,
    ) -> Result<Primary, PrimaryError> {
        let provider = Arc::try_unwrap(provider).map_err(|_| PrimaryError::ProviderBusy)?;
        drop(provider);
        #[allow(unused_mut)] // the kernel shim names the local provider
        let mut spec = CreateSpec {
            name: cfg.provname.clone(),
            local: cfg.local.display().to_string(),
            params: Params {
                mediasize: geo.datasize,
                extentsize: geo.extentsize,
                sectorsize: geo.sectorsize,
                keepdirty: geo.keepdirty,
                mode: geo.mode,
            },
            localoff: geo.localoff,
            mapoff: METADATA_SIZE,
            metaflush: geo.metaflush,
            map: map.to_vec(),
        };
        let sectorsize = geo.sectorsize;
        let created = tokio::task::spawn_blocking(move || -> Result<_, PrimaryError> {
            #[cfg(all(feature = "kshim", target_os = "linux"))]
            let mut shim = if crate::kshim::selected() {
                Some(Shim::attach(&mut spec, sectorsize)?)
            } else {
                None
            };
            #[cfg(not(all(feature = "kshim", target_os = "linux")))]
            let mut shim: Option<Shim> = {
                let _ = sectorsize;
                None
            };
            let plane = KernelDevice::open().and_then(|dev| KernelPlane::create_on(dev, &spec));
            match plane {
                Ok(plane) => Ok((plane, shim)),
                Err(e) => {
                    if let Some(s) = shim.as_mut() {
                        s.detach();
                    }
                    Err(e.into())
                }
            }
        })
        .await
        .map_err(|e| PrimaryError::Task(e.to_string()))?;
        #[allow(unused_mut)] // mutated only on the kernel shim
        let (plane, mut shim) = created?;
        let plane = Arc::new(plane);
        let dp: Arc<dyn Dataplane> = plane.clone();
        let replicator = Replicator::new(dp.clone(), md, cfg.clone(), metrics);
        let upcalls = tokio::spawn(replicator.clone().upcalls());
        let (stop_link, stop_rx) = tokio::sync::watch::channel(false);
        let link = tokio::spawn(replicator.clone().run(stop_rx));
        first_attempt(&replicator, cfg).await;
        #[cfg(all(feature = "kshim", target_os = "linux"))]
        if let Some(s) = shim.as_mut() {
            if let Err(e) = s.export(cfg).await {
                let _ = stop_link.send(true);
                let _ = link.await;
                upcalls.abort();
                s.close().await;
                let p = plane.clone();
                let _ = tokio::task::spawn_blocking(move || p.destroy(KERNEL_DESTROY_WAIT)).await;
                s.detach();
                return Err(e);
            }
        }
        tracing::info!("serving /dev/hast/{} from the kernel module", cfg.provname);
        Ok(Primary {
            host: Host::Kernel { plane, shim },
            dp,
            replicator,
            upcalls,
            link,
            stop_link,
        })
    }

    /// Statistics of the core.
    pub fn stats(&self) -> crate::core::Stats {
        self.dp.stats().unwrap_or_else(|e| {
            tracing::warn!("no statistics from the {} host: {e}", self.dp.host());
            crate::core::Stats::default()
        })
    }

    /// Change the metadata with `f` and write it through the host that owns
    /// the disk (see [`Replicator::record`]).
    pub async fn record(
        &self,
        f: impl FnOnce(&mut Metadata) + Send + 'static,
        flush: bool,
    ) -> Result<(), DataplaneError> {
        self.replicator.record(f, flush).await
    }

    /// The replication link (connection state, resync progress).
    pub fn replicator(&self) -> &Arc<Replicator> {
        &self.replicator
    }

    /// Take changed replication settings without a restart; the link
    /// reconnects to apply a new address.
    pub fn reload(&self, cfg: &ResourceConfig) {
        self.replicator.set_config(cfg.clone());
        self.dp.set_mode(mode_of(cfg.replication));
    }

    /// Stop the data path: refuse new clients, let requests in flight
    /// finish, disconnect clients (or destroy `hast/NAME`), then stop the
    /// core. Afterwards hastd may open the local provider again.
    pub async fn stop(self) {
        let Primary {
            mut host,
            dp,
            replicator,
            upcalls,
            link,
            stop_link,
        } = self;
        match &mut host {
            Host::User { export, .. } => export.shutdown().await,
            Host::Kernel {
                shim: Some(shim), ..
            } => shim.close().await,
            Host::Kernel { shim: None, .. } => {}
        }
        let _ = stop_link.send(true);
        let _ = link.await;
        upcalls.abort();
        let _ = upcalls.await;
        drop(replicator);
        drop(dp);
        match host {
            Host::User { plane, export } => {
                let uhost = plane.uhost().clone();
                drop(plane);
                let addr = export.addr.to_string();
                export.finish();
                // The server's last tasks release their handle on the export
                // just after they report stopped.
                match release(uhost).await {
                    Some(u) => u.close(),
                    None => tracing::warn!("NBD export {addr} still referenced after stop"),
                }
            }
            Host::Kernel { plane, mut shim } => {
                let p = plane.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let r = p.destroy(KERNEL_DESTROY_WAIT);
                    if let Some(s) = shim.as_mut() {
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
                        "unable to destroy the kernel instance (unit {}): {e}; it stays with the link down",
                        plane.unit().0
                    ),
                    Err(e) => tracing::error!("destroying the kernel instance failed: {e}"),
                }
            }
        }
    }
}

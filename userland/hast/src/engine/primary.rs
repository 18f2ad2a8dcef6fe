//! The primary's data path inside hastd: the core on one of its two hosts,
//! and the replication link ([`super::link`]) that answers the core's
//! upcalls through the [`Dataplane`] interface.
//! - On FreeBSD with geom_hast loaded (`/dev/hastctl` exists), the kernel
//!   module serves `/dev/hast/NAME` ([`KernelPlane`]).
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

/// Where the core runs and how clients reach it.
enum Host {
    /// In hastd, behind the NBD export.
    User {
        plane: Arc<UserPlane>,
        server: Server,
        socket: Option<std::path::PathBuf>,
        addr: Addr,
    },
    /// In the kernel module, as `/dev/hast/NAME`.
    Kernel(Arc<KernelPlane>),
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
        KernelDevice::available(crate::kdev::DEFAULT_PATH)
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
        // Connect before serving, as the reference does: if the peer holds
        // newer data, reads must go to it from the first request on.
        let (stop_link, stop_rx) = tokio::sync::watch::channel(false);
        let link = tokio::spawn(replicator.clone().run(stop_rx));
        let wait = cfg.first_connect_wait();
        if tokio::time::timeout(wait, replicator.first_attempt_done())
            .await
            .is_err()
        {
            tracing::warn!("no answer from {} yet; serving without it", cfg.remote);
        }
        let addr = cfg.nbd_addr();
        let export_err = |source| PrimaryError::Export {
            addr: addr.to_string(),
            source,
        };
        let registry = Registry::new();
        let backend: Arc<dyn Backend> = uhost.clone();
        let started = async {
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
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|source| PrimaryError::SocketDir {
                            path: path.clone(),
                            source,
                        })?;
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
            Ok::<_, PrimaryError>((server, socket))
        };
        match started.await {
            Ok((server, socket)) => {
                tracing::info!("exporting {} over NBD at {addr}", cfg.provname);
                Ok(Primary {
                    host: Host::User {
                        plane,
                        server,
                        socket,
                        addr,
                    },
                    dp,
                    replicator,
                    upcalls,
                    link,
                    stop_link,
                })
            }
            Err(e) => {
                let _ = stop_link.send(true);
                let _ = link.await;
                upcalls.abort();
                Err(e)
            }
        }
    }

    /// The core in the kernel module: close hastd's descriptor of the
    /// disk, create `hast/NAME`, then connect as on the userland host. The
    /// device appears at once; writes wait for the first connection attempt
    /// in the module (the owed localcnt bump), reads are local until the
    /// sync direction says otherwise.
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
        let spec = CreateSpec {
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
        let plane = tokio::task::spawn_blocking(move || {
            KernelPlane::create(std::path::Path::new(crate::kdev::DEFAULT_PATH), &spec)
        })
        .await
        .map_err(|e| PrimaryError::Task(e.to_string()))??;
        let plane = Arc::new(plane);
        let dp: Arc<dyn Dataplane> = plane.clone();
        let replicator = Replicator::new(dp.clone(), md, cfg.clone(), metrics);
        let upcalls = tokio::spawn(replicator.clone().upcalls());
        let (stop_link, stop_rx) = tokio::sync::watch::channel(false);
        let link = tokio::spawn(replicator.clone().run(stop_rx));
        tracing::info!("serving /dev/hast/{} from the kernel module", cfg.provname);
        Ok(Primary {
            host: Host::Kernel(plane),
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
            host,
            dp,
            replicator,
            upcalls,
            link,
            stop_link,
        } = self;
        let server = match &host {
            Host::User { server, .. } => Some(server),
            Host::Kernel(_) => None,
        };
        if let Some(server) = server {
            server.shutdown().await;
        }
        let _ = stop_link.send(true);
        let _ = link.await;
        upcalls.abort();
        let _ = upcalls.await;
        drop(replicator);
        drop(dp);
        match host {
            Host::User {
                plane,
                server,
                socket,
                addr,
            } => {
                drop(server);
                let uhost = plane.uhost().clone();
                drop(plane);
                // The server's last tasks release their handle on the export
                // just after they report stopped.
                for _ in 0..200 {
                    if Arc::strong_count(&uhost) == 1 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if let Some(path) = socket {
                    let _ = std::fs::remove_file(path);
                }
                match Arc::try_unwrap(uhost) {
                    Ok(u) => u.close(),
                    Err(_) => tracing::warn!("NBD export {addr} still referenced after stop"),
                }
                tracing::info!("NBD export at {addr} stopped");
            }
            Host::Kernel(plane) => {
                let p = plane.clone();
                let r = tokio::task::spawn_blocking(move || p.destroy(KERNEL_DESTROY_WAIT)).await;
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

//! The primary's data path inside hastd: the core and its Linux host
//! ([`crate::uhost`]) behind an NBD export at the resource's `nbd` address,
//! and the replication link ([`super::link`]) that answers the core's
//! upcalls. Without a connected peer the primary runs degraded: the first
//! write of the outage waits until the localcnt bump is on disk, written
//! extents stay dirty, and reads the core wants from the peer fail.

use std::sync::{Arc, Mutex};

use crate::addr::{Addr, AddrKind};
use crate::config::{Replication, ResourceConfig};
use crate::core::Mode;
use crate::metadata::Metadata;
use crate::nbd::{Backend, Registry, Server};
use crate::provider::Provider;
use crate::uhost::{Geometry, Uhost, UhostError};

use super::link::Replicator;

/// Why the data path could not start.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("{0}")]
    Host(#[from] UhostError),
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

/// A running primary data path.
pub struct Primary {
    uhost: Arc<Uhost>,
    server: Server,
    replicator: Arc<Replicator>,
    upcalls: tokio::task::JoinHandle<()>,
    link: tokio::task::JoinHandle<()>,
    stop_link: tokio::sync::watch::Sender<bool>,
    socket: Option<std::path::PathBuf>,
    addr: Addr,
}

impl Primary {
    /// Start the core on the opened provider and export it over NBD.
    pub async fn start(
        cfg: &ResourceConfig,
        provider: Arc<Provider>,
        md: Arc<Mutex<Metadata>>,
        map: &[u8],
    ) -> Result<Primary, PrimaryError> {
        let geo = {
            let m = md.lock().unwrap_or_else(|p| p.into_inner());
            Geometry {
                localoff: m.localoff,
                datasize: m.datasize,
                extentsize: m.extentsize,
                sectorsize: provider.sectorsize(),
                keepdirty: m.keepdirty,
                mode: mode_of(cfg.replication),
                metaflush: cfg.metaflush,
            }
        };
        let uhost = Arc::new(Uhost::new(&cfg.local, &geo, map)?);
        let replicator = Replicator::new(uhost.clone(), md, provider, cfg.clone());
        let upcalls = tokio::spawn(replicator.clone().upcalls());
        // Connect before serving, as the reference does: if the peer holds
        // newer data, reads must go to it from the first request on.
        let (stop_link, stop_rx) = tokio::sync::watch::channel(false);
        let link = tokio::spawn(replicator.clone().run(stop_rx));
        let wait = std::time::Duration::from_secs(u64::from(cfg.timeout.max(1)) + 1);
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
                Server::new(registry, crate::nbd::Config::default()).map_err(export_err)?;
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
                    uhost,
                    server,
                    replicator,
                    upcalls,
                    link,
                    stop_link,
                    socket,
                    addr,
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

    /// Statistics of the core.
    pub fn stats(&self) -> crate::core::Stats {
        self.uhost.core().stats()
    }

    /// The replication link (connection state, resync progress).
    pub fn replicator(&self) -> &Arc<Replicator> {
        &self.replicator
    }

    /// Take changed replication settings without a restart; the link
    /// reconnects to apply a new address.
    pub fn reload(&self, cfg: &ResourceConfig) {
        self.replicator.set_config(cfg.clone());
        self.uhost.core().set_mode(mode_of(cfg.replication));
    }

    /// Stop the export: refuse new clients, let requests in flight finish,
    /// disconnect clients, then stop the core.
    pub async fn stop(self) {
        let Primary {
            uhost,
            server,
            replicator,
            upcalls,
            link,
            stop_link,
            socket,
            addr,
        } = self;
        server.shutdown().await;
        drop(server);
        let _ = stop_link.send(true);
        let _ = link.await;
        upcalls.abort();
        let _ = upcalls.await;
        drop(replicator);
        // The server's last tasks release their handle on the export just
        // after they report stopped.
        for _ in 0..200 {
            if Arc::strong_count(&uhost) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
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
}

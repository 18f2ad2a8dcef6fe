//! The primary's data path inside hastd: the core and its Linux host
//! ([`crate::uhost`]) behind an NBD export at the resource's `nbd` address,
//! and the task that answers the core's upcalls. Without a connected peer
//! the primary runs degraded: the first write of the outage waits until the
//! localcnt bump is on disk, written extents stay dirty, and reads the core
//! wants from the peer fail.

use std::sync::{Arc, Mutex};

use crate::addr::{Addr, AddrKind};
use crate::config::{Replication, ResourceConfig};
use crate::core::{Mode, UpcallKind};
use crate::metadata::Metadata;
use crate::nbd::{Backend, Registry, Server};
use crate::provider::Provider;
use crate::uhost::{Geometry, Uhost, UhostError};

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
    upcalls: tokio::task::JoinHandle<()>,
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
        let upcalls = tokio::spawn(upcall_loop(uhost.clone(), provider, md));
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
                    upcalls,
                    socket,
                    addr,
                })
            }
            Err(e) => {
                upcalls.abort();
                Err(e)
            }
        }
    }

    /// Statistics of the core.
    pub fn stats(&self) -> crate::core::Stats {
        self.uhost.core().stats()
    }

    /// Stop the export: refuse new clients, let requests in flight finish,
    /// disconnect clients, then stop the core.
    pub async fn stop(self) {
        let Primary {
            uhost,
            server,
            upcalls,
            socket,
            addr,
        } = self;
        server.shutdown().await;
        drop(server);
        upcalls.abort();
        let _ = upcalls.await;
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

/// Answer the core's upcalls while no peer is connected.
async fn upcall_loop(uhost: Arc<Uhost>, provider: Arc<Provider>, md: Arc<Mutex<Metadata>>) {
    loop {
        while let Some(up) = uhost.core().next_upcall() {
            let core = uhost.core();
            let result = match up.kind {
                UpcallKind::Bump => {
                    let provider = provider.clone();
                    let md = md.clone();
                    let written = tokio::task::spawn_blocking(move || {
                        let mut m = md.lock().unwrap_or_else(|p| p.into_inner());
                        let mut next = m.clone();
                        next.localcnt = next.localcnt.saturating_add(1);
                        next.write(&provider, true).map(|()| {
                            *m = next;
                            m.localcnt
                        })
                    })
                    .await;
                    let error = match written {
                        Ok(Ok(cnt)) => {
                            tracing::info!(
                                localcnt = cnt,
                                "no peer: local modification counter bumped"
                            );
                            0
                        }
                        Ok(Err(e)) => {
                            tracing::error!("unable to persist the localcnt bump: {e}");
                            libc::EIO
                        }
                        Err(e) => {
                            tracing::error!("localcnt bump task failed: {e}");
                            libc::EIO
                        }
                    };
                    core.bump_done(error)
                }
                // Nobody to read from or replicate to.
                UpcallKind::Read => core.remote_done(up.seq, libc::EIO),
                UpcallKind::Write { .. } | UpcallKind::Delete | UpcallKind::Flush => {
                    core.remote_done(up.seq, libc::ENOTCONN)
                }
                UpcallKind::SyncLocked | UpcallKind::SyncIoDone { .. } => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!("upcall {:?} seq {} answer refused: {e}", up.kind, up.seq);
            }
        }
        uhost.upcalls_ready().await;
    }
}

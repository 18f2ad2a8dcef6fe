//! The NBD export of a host's device: a server over one export named after
//! the resource's provider, at its `nbd` address (a Unix socket of mode
//! 0600, or TCP), stopped deterministically (every task of the server has
//! ended, and with it every handle on the backend, when `shutdown` returns).

use std::sync::Arc;

use crate::addr::{Addr, AddrKind};
use crate::config::ResourceConfig;
use crate::nbd::{Backend, Registry, Server};

use super::HostError;

/// An NBD export of the data path.
pub struct Export {
    server: Server,
    socket: Option<std::path::PathBuf>,
    addr: Addr,
}

impl Export {
    /// Serve `backend` as export `cfg.provname` at the resource's `nbd`
    /// address (a Unix socket of mode 0600, or TCP).
    pub async fn start(
        cfg: &ResourceConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Export, HostError> {
        let addr = cfg.nbd_addr();
        let export_err = |source| HostError::Export {
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
                    std::fs::create_dir_all(dir).map_err(|source| HostError::SocketDir {
                        path: path.clone(),
                        source,
                    })?;
                }
                server.listen_unix(path).await.map_err(export_err)?;
                // The export is the disk: only its owner may connect.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                    |source| HostError::SocketDir {
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
    pub async fn shutdown(&self) {
        self.server.shutdown().await;
    }

    /// After [`Export::shutdown`]: remove the socket.
    pub fn finish(self) {
        drop(self.server);
        if let Some(path) = self.socket {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("NBD export at {} stopped", self.addr);
    }
}

//! The replication listeners (`listen` addresses): accept TCP connections
//! from primaries, tell TLS from plain version 2 by the first byte (a TLS
//! handshake record starts with 22, a version-2 frame with its version),
//! run the TLS handshake with this node's key when it is TLS, read the
//! first handshake header (bounded, with a timeout) and hand it to the
//! daemon's main loop, which decides (and checks, once the header names the
//! resource, that the connection has what the resource requires).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::addr::{Addr, AddrKind, Family};
use crate::nv::Nv;
use crate::proto::{self, Limits};

use super::credentials::ServerTls;
use super::transport::{Conn, TLS_HANDSHAKE_BYTE};

/// How long a new connection may take to send its first header.
const FIRST_HEADER_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection with its first header read.
pub struct Incoming {
    pub stream: Conn,
    pub peer: SocketAddr,
    pub header: Nv,
}

/// The node's TLS server side as the listeners see it; replaced on reload.
pub type TlsSlot = Arc<RwLock<ServerTls>>;

/// Failure to listen.
#[derive(Debug, thiserror::Error)]
#[error("unable to listen on {addr}: {reason}")]
pub struct ListenError {
    pub addr: String,
    pub reason: String,
}

/// Bound replication sockets (blocking, so they exist before the fork).
pub struct Listeners(Vec<(String, std::net::TcpListener)>);

impl Listeners {
    /// Bind every `listen` address. A default IPv6 address on a host
    /// without IPv6 is skipped with a warning; anything else that fails is
    /// an error.
    pub fn bind(addrs: &[Addr]) -> Result<Listeners, ListenError> {
        let mut out = Vec::new();
        for addr in addrs {
            let err = |reason: String| ListenError {
                addr: addr.to_string(),
                reason,
            };
            let AddrKind::Tcp { family, .. } = &addr.kind else {
                return Err(err("only TCP addresses can be listened on".into()));
            };
            let targets = addr.socket_addrs().map_err(|e| err(e.to_string()))?;
            for target in targets {
                match bind_one(target, *family) {
                    Ok(l) => out.push((addr.to_string(), l)),
                    Err(e)
                        if target.is_ipv6()
                            && matches!(
                                e.raw_os_error(),
                                Some(libc::EAFNOSUPPORT)
                                    | Some(libc::EADDRNOTAVAIL)
                                    | Some(libc::EPROTONOSUPPORT)
                            ) =>
                    {
                        tracing::warn!("not listening on {addr}: {e}");
                    }
                    Err(e) => return Err(err(e.to_string())),
                }
            }
        }
        Ok(Listeners(out))
    }

    /// The local addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.0
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// Accept on every socket; first headers go to `tx`. Returns the tasks.
    pub fn serve(
        self,
        tx: mpsc::Sender<Incoming>,
        tls: TlsSlot,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for (name, l) in self.0 {
            let tx = tx.clone();
            let tls = tls.clone();
            let listener = match TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("cannot serve {name}: {e}");
                    continue;
                }
            };
            tracing::info!("listening for primaries on {name}");
            tasks.push(tokio::spawn(async move {
                crate::accept::serve(listener, &name, None, |stream, peer| {
                    tokio::spawn(first_header(stream, peer, tx.clone(), tls.clone()));
                })
                .await;
            }));
        }
        tasks
    }
}

fn bind_one(target: SocketAddr, family: Family) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let af = if target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(af, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if target.is_ipv6() && family != Family::Any {
        // tcp6:// listens on IPv6 only, as the reference does; the tcp4
        // default covers IPv4.
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    use std::os::fd::AsRawFd;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(target))?;
    listen(&fd, Backlog::new(64).map_err(std::io::Error::from)?)?;
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

async fn first_header(
    stream: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<Incoming>,
    tls: TlsSlot,
) {
    let start = tokio::time::Instant::now();
    let deadline = start + FIRST_HEADER_TIMEOUT;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(Ok(_)) => {
            tracing::error!("connection from {peer} closed before its first header");
            return;
        }
        Ok(Err(e)) => {
            tracing::error!("unable to receive the handshake header from {peer}: {e}");
            return;
        }
        Err(_) => {
            tracing::error!("no handshake header from {peer} within {FIRST_HEADER_TIMEOUT:?}");
            return;
        }
    }
    let mut conn = if first[0] == TLS_HANDSHAKE_BYTE {
        let node = tls.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(node) = node else {
            tracing::error!(
                "TLS connection from {peer} refused: no resource of this node has `security tls` \
                 (with a `keyfile`); set them up here, or `security none` on the primary"
            );
            return;
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match Conn::tls_accept(stream, node.config.clone(), left).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "TLS handshake with {peer} failed: {e}{}",
                    accept_hint(&e, &node.key)
                );
                return;
            }
        }
    } else {
        Conn::Plain(stream)
    };
    let limits = Limits::HEADERS_ONLY;
    match tokio::time::timeout_at(deadline, proto::read_frame_async(&mut conn, limits)).await {
        Ok(Ok((header, _))) => {
            conn.set_nodelay();
            let _ = tx
                .send(Incoming {
                    stream: conn,
                    peer,
                    header,
                })
                .await;
        }
        Ok(Err(e)) => tracing::error!("unable to receive the handshake header from {peer}: {e}"),
        Err(_) => {
            tracing::error!("no handshake header from {peer} within {FIRST_HEADER_TIMEOUT:?}")
        }
    }
}

/// What to change, after a failed TLS handshake with a primary.
fn accept_hint(e: &std::io::Error, ours: &crate::security::Fingerprint) -> String {
    use rustls::AlertDescription as A;
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::AlertReceived(
            A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::AccessDenied,
        )) => format!(
            " (the primary does not accept this node's key {ours}: put it in the primary's \
             `peerfingerprint` for the resource, or check its `cafile`)"
        ),
        Some(rustls::Error::NoCertificatesPresented) => {
            " (the primary presented no certificate: give it a `keyfile`)".to_string()
        }
        _ => String::new(),
    }
}

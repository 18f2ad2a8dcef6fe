//! The replication listeners (`listen` addresses): accept TCP connections
//! from primaries, read the first handshake header (bounded, with a
//! timeout) and hand it to the daemon's main loop, which decides.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::addr::{Addr, AddrKind, Family};
use crate::nv::Nv;
use crate::proto::{self, Limits};

/// How long a new connection may take to send its first header.
const FIRST_HEADER_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection with its first header read.
pub struct Incoming {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub header: Nv,
}

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
    pub fn serve(self, tx: mpsc::Sender<Incoming>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for (name, l) in self.0 {
            let tx = tx.clone();
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
                    tokio::spawn(first_header(stream, peer, tx.clone()));
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

async fn first_header(mut stream: TcpStream, peer: SocketAddr, tx: mpsc::Sender<Incoming>) {
    let limits = Limits::HEADERS_ONLY;
    match tokio::time::timeout(
        FIRST_HEADER_TIMEOUT,
        proto::read_frame_async(&mut stream, limits),
    )
    .await
    {
        Ok(Ok((header, _))) => {
            let _ = stream.set_nodelay(true);
            let _ = tx
                .send(Incoming {
                    stream,
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

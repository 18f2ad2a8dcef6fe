//! hastd's side of the control socket: accepting hastctl connections,
//! reading one bounded request each, and building replies. On a Unix
//! socket, only clients running as root or as hastd's own user are served
//! (their peer credentials: SO_PEERCRED on Linux, getpeereid on FreeBSD);
//! the socket is created with mode 0600 in a directory that no other user
//! can write to, both checked when it is bound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};

use crate::addr::{Addr, AddrKind};
use crate::nv::Nv;
use crate::proto::{self, Limits};

/// How long a control client may take to send its request or read the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Failure to set up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlBindError {
    /// Another process already serves this Unix socket.
    #[error("control socket {0} is in use by another process (another hastd with this control address?)")]
    InUse(PathBuf),
    /// Another user could replace the socket: its directory is writable
    /// by group or others (without the sticky bit) or belongs to another
    /// user.
    #[error("control socket directory {}: {why}", dir.display())]
    UnsafeDir { dir: PathBuf, why: String },
    /// Binding or preparing the socket failed.
    #[error("unable to listen on control address {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A request read from a client, with the channel for its reply.
pub struct ControlRequest {
    pub nv: Nv,
    pub reply: oneshot::Sender<Nv>,
}

/// A bound control socket (blocking form, so it can be created before the
/// daemon forks; converted to tokio by [`ControlListener::serve`]).
#[derive(Debug)]
pub enum ControlListener {
    Unix {
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
    },
    Tcp(std::net::TcpListener),
}

impl ControlListener {
    /// Bind `addr`. A Unix socket path left by a dead daemon is replaced; one
    /// that still accepts connections is refused. The socket is mode 0600.
    pub fn bind(addr: &Addr) -> Result<ControlListener, ControlBindError> {
        let io = |source| ControlBindError::Io {
            addr: addr.to_string(),
            source,
        };
        match &addr.kind {
            AddrKind::Unix(path) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ControlBindError::InUse(path.clone()));
                }
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(e)),
                }
                if let Some(dir) = path.parent() {
                    if !dir.as_os_str().is_empty() && !dir.exists() {
                        std::fs::create_dir_all(dir).map_err(io)?;
                    }
                    let dir = if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    };
                    check_socket_dir(dir)?;
                }
                // Create the socket with no permissions for group and others
                // from the start, then set exactly 0600.
                // SAFETY: umask only changes this process's file-creation mask.
                let old = unsafe { libc::umask(0o177) };
                let bound = std::os::unix::net::UnixListener::bind(path);
                // SAFETY: as above, restoring the previous mask.
                unsafe { libc::umask(old) };
                let listener = bound.map_err(io)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
                let mode = std::fs::symlink_metadata(path)
                    .map_err(io)?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(io(std::io::Error::other(format!(
                        "the socket has mode {:04o} after chmod 600",
                        mode & 0o7777
                    ))));
                }
                listener.set_nonblocking(true).map_err(io)?;
                Ok(ControlListener::Unix {
                    listener,
                    path: path.clone(),
                })
            }
            AddrKind::Tcp { .. } => {
                tracing::warn!(
                    "control socket {addr} is a TCP socket: clients have no credentials to check, \
                     so anyone who can connect to it controls hastd; prefer a Unix socket"
                );
                let addrs = addr.socket_addrs().map_err(io)?;
                let listener = std::net::TcpListener::bind(&addrs[..]).map_err(io)?;
                listener.set_nonblocking(true).map_err(io)?;
                Ok(ControlListener::Tcp(listener))
            }
        }
    }

    /// Accept clients until the returned task is aborted; each request read
    /// is handed to `requests`. Must run inside a tokio runtime.
    pub fn serve(
        self,
        requests: mpsc::Sender<ControlRequest>,
    ) -> std::io::Result<(tokio::task::JoinHandle<()>, Option<PathBuf>)> {
        match self {
            ControlListener::Unix { listener, path } => {
                let listener = UnixListener::from_std(listener)?;
                let euid = nix::unistd::geteuid().as_raw();
                let task = tokio::spawn(async move {
                    crate::accept::serve(listener, "the control socket", None, |stream, _| {
                        if admitted(&stream, euid) {
                            tokio::spawn(handle_client(stream, requests.clone()));
                        }
                    })
                    .await;
                });
                Ok((task, Some(path)))
            }
            ControlListener::Tcp(listener) => {
                let listener = TcpListener::from_std(listener)?;
                let task = tokio::spawn(async move {
                    crate::accept::serve(listener, "the control socket", None, |stream, peer| {
                        tracing::debug!(%peer, "control connection");
                        tokio::spawn(handle_client(stream, requests.clone()));
                    })
                    .await;
                });
                Ok((task, None))
            }
        }
    }
}

/// Whether a control client may be served: its peer credentials say it
/// runs as root or as hastd's user `euid`. Refusals are logged.
fn admitted(stream: &tokio::net::UnixStream, euid: u32) -> bool {
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == euid => true,
        Ok(c) => {
            tracing::warn!(
                "control connection refused: the client runs as uid {} (pid {}), neither root nor hastd's user (uid {euid})",
                c.uid(),
                c.pid().map_or("unknown".to_string(), |p| p.to_string())
            );
            false
        }
        Err(e) => {
            tracing::warn!("control connection refused: its peer credentials cannot be read: {e}");
            false
        }
    }
}

/// Whether `dir` may hold the control socket: owned by root or hastd's
/// user, and not writable by group or others unless sticky (like /tmp,
/// where others cannot remove or rename what is not theirs).
pub fn check_socket_dir(dir: &Path) -> Result<(), ControlBindError> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(dir).map_err(|source| ControlBindError::Io {
        addr: dir.display().to_string(),
        source,
    })?;
    let unsafe_dir = |why: String| ControlBindError::UnsafeDir {
        dir: dir.to_path_buf(),
        why,
    };
    let euid = nix::unistd::geteuid().as_raw();
    if md.uid() != 0 && md.uid() != euid {
        return Err(unsafe_dir(format!(
            "it belongs to uid {}, neither root nor hastd's user (uid {euid}); put the control socket elsewhere",
            md.uid()
        )));
    }
    let mode = md.mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(unsafe_dir(format!(
            "mode {:04o} lets group or others replace the socket; chmod go-w it (or use a sticky directory)",
            mode & 0o7777
        )));
    }
    Ok(())
}

/// Remove a Unix control socket file when the daemon stops listening on it.
pub fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("unable to remove control socket {}: {e}", path.display());
        }
    }
}

/// Serves one control client on `stream`: reads one request (bounded by
/// [`Limits::CONTROL`] and [`CLIENT_TIMEOUT`]), hands it to `requests` and
/// writes the reply that comes back, if any. Public so that the request
/// path can be driven over an in-memory stream (the fuzz targets).
pub async fn handle_client<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    requests: mpsc::Sender<ControlRequest>,
) {
    let nv = match tokio::time::timeout(
        CLIENT_TIMEOUT,
        proto::read_frame_async(&mut stream, Limits::HEADERS_ONLY),
    )
    .await
    {
        Ok(Ok((nv, _payload))) => nv,
        Ok(Err(e)) => {
            tracing::error!("unable to receive control header: {e}");
            return;
        }
        Err(_) => {
            tracing::error!(
                "unable to receive control header: no request within {CLIENT_TIMEOUT:?}"
            );
            return;
        }
    };
    if nv.get_u8("cmd") == Some(crate::control::HASTCTL_CMD_EVENTS) {
        // hastctl events: the connection stays open for the events.
        return super::watch::serve(stream, nv, requests).await;
    }
    let (tx, rx) = oneshot::channel();
    if requests
        .send(ControlRequest { nv, reply: tx })
        .await
        .is_err()
    {
        return;
    }
    let Ok(reply) = rx.await else {
        // The daemon dropped the request (e.g. it lacked `cmd`): close.
        return;
    };
    match tokio::time::timeout(
        CLIENT_TIMEOUT,
        proto::write_frame_async(&mut stream, &reply, &[]),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("unable to send control response: {e}"),
        Err(_) => tracing::error!(
            "unable to send control response: client did not read it within {CLIENT_TIMEOUT:?}"
        ),
    }
}

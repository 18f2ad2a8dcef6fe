//! NBD listeners and connections: the fixed newstyle handshake and the
//! transmission phase. Each connection has one reader (parses requests and
//! hands each to its own task) and one writer (sends the simple replies in
//! completion order).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::export::{Attached, Registry, MAX_NAME_LEN};
use super::proto::{self, NbdRequest};
use super::{Backend, NbdError};
use crate::accept::stopped;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload accepted (the advertised maximum block
    /// size). Default 32 MiB; at least 64 KiB.
    pub max_payload: u32,
    /// Advertised preferred block size (raised to the export's block size
    /// when that is larger). Default 4096.
    pub preferred_block: u32,
    /// Bytes of request payload (read or write data) one connection may hold
    /// in flight; reading from the socket pauses when it is used up.
    /// Default 256 MiB; must be at least `max_payload`.
    pub inflight_bytes: u32,
    /// Time a client has to finish the handshake. Default 60 s.
    pub handshake_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            preferred_block: 4096,
            inflight_bytes: 256 << 20,
            handshake_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// Data options may carry: an INFO/GO with the longest name and every
/// information item listed once.
const MAX_OPTION_DATA: u32 = 4 + MAX_NAME_LEN as u32 + 2 + 2 * 65535;

/// Nominal cost, in in-flight bytes, of a request without payload.
const MIN_REQUEST_COST: u32 = 4096;

struct Shared {
    registry: Registry,
    config: ServerConfig,
    stop: watch::Sender<bool>,
    /// The listeners' and connections' tasks: [`Server::shutdown`] returns
    /// once every one has ended, and with it every handle on an export.
    tasks: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

impl Shared {
    /// Run `task` as one of the server's tasks (finished ones are reaped).
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }
}

/// An NBD server over a [`Registry`]. Listeners and connections run as tokio
/// tasks; [`Server::shutdown`] stops them all gracefully.
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// A server for the exports of `registry`.
    pub fn new(registry: Registry, config: ServerConfig) -> Result<Server, NbdError> {
        // At least the largest legal block size, so that one block of any
        // export fits and the preferred size never exceeds the maximum.
        if config.max_payload < 65536 {
            return Err(NbdError::Config(format!(
                "max_payload {} is below 65536 bytes",
                config.max_payload
            )));
        }
        if !config.preferred_block.is_power_of_two() || config.preferred_block < 512 {
            return Err(NbdError::Config(format!(
                "preferred_block {} is not a power of two of at least 512",
                config.preferred_block
            )));
        }
        if config.preferred_block > config.max_payload {
            return Err(NbdError::Config(format!(
                "preferred_block {} is larger than max_payload {}",
                config.preferred_block, config.max_payload
            )));
        }
        if config.inflight_bytes < config.max_payload {
            return Err(NbdError::Config(format!(
                "inflight_bytes {} is smaller than max_payload {}",
                config.inflight_bytes, config.max_payload
            )));
        }
        let (stop, _) = watch::channel(false);
        Ok(Server {
            shared: Arc::new(Shared {
                registry,
                config,
                stop,
                tasks: std::sync::Mutex::new(tokio::task::JoinSet::new()),
            }),
        })
    }

    /// The exports this server serves.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Listens on a Unix socket at `path` (an existing socket file there is
    /// replaced). The socket file is removed when the server stops.
    pub async fn listen_unix(&self, path: &Path) -> Result<(), NbdError> {
        let err = |source| NbdError::Listen {
            addr: path.display().to_string(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                // A socket someone still accepts on belongs to a live
                // server: never steal it.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another server is listening on this socket",
                    )));
                }
                std::fs::remove_file(path).map_err(err)?;
            }
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        let shared = Arc::clone(&self.shared);
        let stop = self.shared.stop.subscribe();
        let path = path.to_path_buf();
        info!(path = %path.display(), "NBD server listening on Unix socket");
        self.shared.spawn(accept_unix(shared, listener, stop, path));
        Ok(())
    }

    /// Listens on TCP (`host:port`); returns the bound address (useful with
    /// port 0).
    pub async fn listen_tcp(&self, addr: &str) -> Result<SocketAddr, NbdError> {
        let err = |source| NbdError::Listen {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(err)?;
        let local = listener.local_addr().map_err(err)?;
        let shared = Arc::clone(&self.shared);
        let stop = self.shared.stop.subscribe();
        info!(%local, "NBD server listening on TCP");
        self.shared.spawn(accept_tcp(shared, listener, stop));
        Ok(local)
    }

    /// Serves one already-connected stream (e.g. one end of a socketpair).
    pub fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let shared = Arc::clone(&self.shared);
        let stop = self.shared.stop.subscribe();
        self.shared
            .spawn(connection(shared, r, w, stop, "stream".to_string()));
    }

    /// Stops the server: listeners stop accepting, every connection stops
    /// reading requests, in-flight requests finish and are answered, then the
    /// clients are disconnected. Returns when all of that is done and every
    /// task of the server has ended (none holds an export any more).
    pub async fn shutdown(&self) {
        self.shared.stop.send_replace(true);
        loop {
            let mut tasks =
                std::mem::take(&mut *self.shared.tasks.lock().unwrap_or_else(|p| p.into_inner()));
            if tasks.is_empty() {
                break;
            }
            while tasks.join_next().await.is_some() {}
        }
    }
}

impl Drop for Server {
    /// Dropping the server stops it like [`Server::shutdown`] without
    /// waiting: connections drain in the background.
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}

async fn accept_unix(
    shared: Arc<Shared>,
    listener: UnixListener,
    stop: watch::Receiver<bool>,
    path: PathBuf,
) {
    let mut n: u64 = 0;
    let what = path.display().to_string();
    let conn_stop = stop.clone();
    let listener = crate::accept::serve(listener, &what, Some(stop), |stream, _| {
        n = n.wrapping_add(1);
        let (r, w) = stream.into_split();
        let peer = format!("{what}#{n}");
        shared.spawn(connection(
            Arc::clone(&shared),
            r,
            w,
            conn_stop.clone(),
            peer,
        ));
    })
    .await;
    drop(listener);
    if let Err(e) = std::fs::remove_file(&path) {
        debug!(path = %path.display(), error = %e, "cannot remove socket file");
    }
}

async fn accept_tcp(shared: Arc<Shared>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let what = listener
        .local_addr()
        .map_or_else(|_| "the NBD export".to_string(), |a| a.to_string());
    let conn_stop = stop.clone();
    crate::accept::serve(listener, &what, Some(stop), |stream, peer| {
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let (r, w) = stream.into_split();
        shared.spawn(connection(
            Arc::clone(&shared),
            r,
            w,
            conn_stop.clone(),
            peer.to_string(),
        ));
    })
    .await;
}

/// How the handshake ended.
enum Negotiated {
    /// Enter transmission on this export.
    Go(Attached),
    /// Close the connection (abort, garbage, unknown export by name).
    Close,
}

async fn connection<R, W>(
    shared: Arc<Shared>,
    r: R,
    w: W,
    mut stop: watch::Receiver<bool>,
    peer: String,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut r = BufReader::with_capacity(64 << 10, r);
    let mut w = w;
    let hs = handshake(&shared, &mut r, &mut w);
    let timed = async {
        match shared.config.handshake_timeout {
            Some(t) => tokio::time::timeout(t, hs).await.unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake timed out",
                ))
            }),
            None => hs.await,
        }
    };
    let outcome = tokio::select! {
        _ = stopped(&mut stop) => Ok(Negotiated::Close),
        o = timed => o,
    };
    match outcome {
        Ok(Negotiated::Go(att)) => {
            info!(%peer, export = %att.name, "NBD client entered transmission");
            transmission(&shared, att, r, w, stop, &peer).await;
        }
        Ok(Negotiated::Close) => {
            debug!(%peer, "NBD handshake ended without transmission");
            let _ = w.shutdown().await;
        }
        Err(e) => {
            debug!(%peer, error = %e, "NBD handshake failed");
            let _ = w.shutdown().await;
        }
    }
}

fn protocol_error(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads and throws away `len` bytes without buffering them.
async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied == len {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "client closed inside a payload",
        ))
    }
}

async fn send_opt<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> io::Result<()> {
    w.write_all(&proto::option_reply(option, reply, data)).await
}

fn transmission_flags(b: &dyn Backend) -> u16 {
    let mut f = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_CAN_MULTI_CONN;
    if b.read_only() {
        f |= proto::FLAG_READ_ONLY;
    } else {
        f |= proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES;
    }
    f
}

async fn handshake<R, W>(shared: &Shared, r: &mut R, w: &mut W) -> io::Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&proto::greeting()).await?;
    w.flush().await?;
    let cflags = r.read_u32().await?;
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if cflags & !known != 0 {
        return Err(protocol_error(format!(
            "client flags {cflags:#x} carry unknown bits"
        )));
    }
    let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
    loop {
        let mut hb = [0u8; proto::OPTION_HEADER_LEN];
        r.read_exact(&mut hb).await?;
        let h = proto::OptionHeader::decode(&hb);
        if h.magic != proto::IHAVEOPT {
            return Err(protocol_error(format!(
                "option magic {:#x} is not IHAVEOPT",
                h.magic
            )));
        }
        let known_option = matches!(
            h.option,
            proto::OPT_EXPORT_NAME
                | proto::OPT_ABORT
                | proto::OPT_LIST
                | proto::OPT_INFO
                | proto::OPT_GO
        );
        if !known_option {
            discard(r, u64::from(h.length)).await?;
            send_opt(w, h.option, proto::REP_ERR_UNSUP, b"option not supported").await?;
            w.flush().await?;
            continue;
        }
        if h.length > MAX_OPTION_DATA {
            if h.option == proto::OPT_EXPORT_NAME {
                return Err(protocol_error(format!("EXPORT_NAME of {} bytes", h.length)));
            }
            discard(r, u64::from(h.length)).await?;
            send_opt(w, h.option, proto::REP_ERR_TOO_BIG, b"option data too long").await?;
            w.flush().await?;
            continue;
        }
        let mut data = vec![0u8; h.length as usize];
        r.read_exact(&mut data).await?;
        match h.option {
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                match shared.registry.attach(&name) {
                    Some(att) => {
                        let b = att.backend.as_ref();
                        let reply =
                            proto::export_name_reply(b.size(), transmission_flags(b), no_zeroes);
                        w.write_all(&reply).await?;
                        w.flush().await?;
                        return Ok(Negotiated::Go(att));
                    }
                    None => {
                        debug!(export = %name, "EXPORT_NAME for an unknown export");
                        return Ok(Negotiated::Close);
                    }
                }
            }
            proto::OPT_ABORT => {
                // The client may already be gone; the ACK is best effort.
                let _ = send_opt(w, h.option, proto::REP_ACK, &[]).await;
                let _ = w.flush().await;
                return Ok(Negotiated::Close);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    send_opt(w, h.option, proto::REP_ERR_INVALID, b"LIST takes no data").await?;
                } else {
                    for name in shared.registry.names() {
                        send_opt(w, h.option, proto::REP_SERVER, &proto::rep_server(&name)).await?;
                    }
                    send_opt(w, h.option, proto::REP_ACK, &[]).await?;
                }
                w.flush().await?;
            }
            _ => {
                // OPT_INFO or OPT_GO.
                let go = h.option == proto::OPT_GO;
                let Some(req) = proto::InfoRequest::parse(&data) else {
                    send_opt(
                        w,
                        h.option,
                        proto::REP_ERR_INVALID,
                        b"malformed INFO/GO data",
                    )
                    .await?;
                    w.flush().await?;
                    continue;
                };
                let name = String::from_utf8_lossy(&req.name).into_owned();
                let found = if go {
                    shared
                        .registry
                        .attach(&name)
                        .map(|a| (a.name.clone(), Arc::clone(&a.backend), Some(a)))
                } else {
                    shared.registry.lookup(&name).map(|(n, b)| (n, b, None))
                };
                let Some((canonical, backend, att)) = found else {
                    send_opt(w, h.option, proto::REP_ERR_UNKNOWN, b"no such export").await?;
                    w.flush().await?;
                    continue;
                };
                let b = backend.as_ref();
                let info = proto::info_export(b.size(), transmission_flags(b));
                send_opt(w, h.option, proto::REP_INFO, &info).await?;
                let bs = b.block_size();
                let pref = shared.config.preferred_block.max(bs);
                let bsz = proto::info_block_size(bs, pref, shared.config.max_payload);
                send_opt(w, h.option, proto::REP_INFO, &bsz).await?;
                if req.items.contains(&proto::INFO_NAME) {
                    send_opt(w, h.option, proto::REP_INFO, &proto::info_name(&canonical)).await?;
                }
                send_opt(w, h.option, proto::REP_ACK, &[]).await?;
                w.flush().await?;
                if let Some(att) = att {
                    return Ok(Negotiated::Go(att));
                }
            }
        }
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Run the operation.
    Run(Op),
    /// Answer with this error; first read and drop `discard` payload bytes.
    Fail { error: u32, discard: u32 },
    /// Answer with this error, then stop reading and close (a write payload
    /// too large to skip).
    FailClose { error: u32 },
    /// The client disconnects (`NBD_CMD_DISC`).
    Disconnect,
    /// Hard disconnect now (bad magic).
    Abort,
}

/// A validated operation, offsets relative to the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        off: u64,
        len: u32,
    },
    Write {
        off: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        off: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        off: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    },
    /// A zero-length read, write, trim or zeroing: nothing to do.
    Nothing,
}

/// Checks a request against the export geometry and the payload limit.
pub(crate) fn judge(
    req: &NbdRequest,
    size: u64,
    block: u32,
    max_payload: u32,
    read_only: bool,
) -> Verdict {
    if req.magic != proto::REQUEST_MAGIC {
        return Verdict::Abort;
    }
    let payload = if req.kind == proto::CMD_WRITE {
        req.length
    } else {
        0
    };
    let fail = |error| Verdict::Fail {
        error,
        discard: payload,
    };
    match req.kind {
        proto::CMD_DISC => return Verdict::Disconnect,
        proto::CMD_WRITE if req.length > max_payload => {
            // proto.md: payloads up to 2^25 must not be treated as an attack,
            // so those are read and dropped; larger ones cannot be skipped
            // without trusting the client for gigabytes: hard disconnect.
            return if req.length <= max_payload.max(proto::DEFAULT_MAX_PAYLOAD) {
                fail(proto::EINVAL)
            } else {
                Verdict::FailClose {
                    error: proto::EINVAL,
                }
            };
        }
        proto::CMD_READ if req.length > max_payload => return fail(proto::EINVAL),
        _ => {}
    }
    let allowed = match req.kind {
        proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE,
        _ => proto::CMD_FLAG_FUA,
    };
    if req.flags & !allowed != 0 {
        return fail(proto::EINVAL);
    }
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let (off, len) = (req.offset, req.length);
    let is_write = matches!(
        req.kind,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
    );
    match req.kind {
        // Offset and length of FLUSH are reserved; they are ignored.
        proto::CMD_FLUSH => return Verdict::Run(Op::Flush),
        proto::CMD_READ | proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => {}
        _ => return fail(proto::EINVAL),
    }
    let b = u64::from(block.max(1));
    if off % b != 0 || u64::from(len) % b != 0 {
        return fail(proto::EINVAL);
    }
    let inside = off
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size);
    if !inside {
        // proto.md "Error values": ENOSPC for writes past the end, EINVAL
        // for reads and trims.
        let e = match req.kind {
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => proto::ENOSPC,
            _ => proto::EINVAL,
        };
        return fail(e);
    }
    if is_write && read_only {
        return fail(proto::EPERM);
    }
    if len == 0 {
        return Verdict::Run(Op::Nothing);
    }
    Verdict::Run(match req.kind {
        proto::CMD_READ => Op::Read { off, len },
        proto::CMD_WRITE => Op::Write { off, len, fua },
        proto::CMD_TRIM => Op::Trim { off, len, fua },
        _ => Op::WriteZeroes {
            off,
            len,
            no_hole: req.flags & proto::CMD_FLAG_NO_HOLE != 0,
            fua,
        },
    })
}

/// One reply for the writer.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Vec<u8>>,
    /// In-flight budget held until the reply is on the wire.
    _permit: Option<OwnedSemaphorePermit>,
}

/// The answer to one client request, handed to the backend with the
/// request ([`Backend::start_read`], [`Backend::start_write`]) or to the task
/// that runs it. It is always answered: if it is dropped unanswered (a
/// panicking backend, a runtime shutting down), the drop sends `EIO` so the
/// client is not left waiting for the cookie. Answering queues the reply for
/// the connection's writer; it never blocks, so a backend may answer from
/// any thread.
pub struct Done {
    tx: mpsc::UnboundedSender<Reply>,
    cookie: u64,
    op: Op,
    permit: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done")
            .field("cookie", &self.cookie)
            .field("op", &self.op)
            .finish()
    }
}

impl Done {
    /// Answer the request: `Ok(Some(data))` for a read (exactly the length
    /// asked for), `Ok(None)` for anything else, or the error.
    pub fn finish(mut self, result: io::Result<Option<Vec<u8>>>) {
        let result = match (self.op, result) {
            (Op::Read { len, .. }, Ok(Some(v))) if v.len() != len as usize => {
                Err(io::Error::other(format!(
                    "backend returned {} bytes for a {len}-byte read",
                    v.len()
                )))
            }
            (Op::Read { .. }, Ok(None)) => Err(io::Error::other("backend returned no read data")),
            (Op::Read { .. }, Ok(data)) => Ok(data),
            // Only a read's reply carries data.
            (_, Ok(_)) => Ok(None),
            (_, Err(e)) => Err(e),
        };
        match result {
            Ok(data) => self.send(0, data),
            Err(e) => {
                warn!(op = ?self.op, error = %e, "NBD request failed");
                self.send(proto::errno_to_nbd(&e), None);
            }
        }
    }

    fn send(&mut self, error: u32, data: Option<Vec<u8>>) {
        if let Some(permit) = self.permit.take() {
            // The writer is gone when the client is; nothing to tell then.
            let _ = self.tx.send(Reply {
                cookie: self.cookie,
                error,
                data,
                _permit: Some(permit),
            });
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        self.send(proto::EIO, None);
    }
}

/// Why the reader stopped.
enum Until<T> {
    Done(T),
    Stopped,
    WriterGone,
}

/// Waits for `fut` unless the server or the export is being stopped, or the
/// writer has died (then reading more is pointless).
async fn guarded<F: Future>(
    fut: F,
    server: &mut watch::Receiver<bool>,
    export: &mut watch::Receiver<bool>,
    tx: &mpsc::UnboundedSender<Reply>,
) -> Until<F::Output> {
    tokio::select! {
        _ = stopped(server) => Until::Stopped,
        _ = stopped(export) => Until::Stopped,
        _ = tx.closed() => Until::WriterGone,
        v = fut => Until::Done(v),
    }
}

async fn transmission<R, W>(
    shared: &Shared,
    att: Attached,
    mut r: BufReader<R>,
    w: W,
    mut server_stop: watch::Receiver<bool>,
    peer: &str,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Attached {
        name,
        backend,
        stop: mut export_stop,
    } = att;
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(w, rx));
    // Requests the backend has no start method for, run as tasks of this
    // connection: it ends after them, and with it their hold on the export.
    let mut jobs = tokio::task::JoinSet::new();
    let budget = Arc::new(Semaphore::new(shared.config.inflight_bytes as usize));
    let max_payload = shared.config.max_payload;
    // Waits for a future unless the connection must stop; on a stop, leaves
    // the request loop with the reason.
    macro_rules! guard {
        ($fut:expr, $what:expr) => {
            match guarded($fut, &mut server_stop, &mut export_stop, &tx).await {
                Until::Done(Ok(v)) => v,
                Until::Done(Err(e)) => break format!("{}: {}", $what, e),
                Until::Stopped => break "server or export stopping".to_string(),
                Until::WriterGone => break "reply writer failed".to_string(),
            }
        };
    }
    let reason: String = loop {
        let mut hdr = [0u8; proto::REQUEST_LEN];
        guard!(r.read_exact(&mut hdr), "client went away");
        let req = NbdRequest::decode(&hdr);
        let verdict = judge(
            &req,
            backend.size(),
            backend.block_size(),
            max_payload,
            backend.read_only(),
        );
        let cost = match verdict {
            Verdict::Run(Op::Read { len, .. }) | Verdict::Run(Op::Write { len, .. }) => {
                len.max(MIN_REQUEST_COST)
            }
            _ => MIN_REQUEST_COST,
        };
        // Every reply, errors included, holds budget until it is sent, so a
        // client that stops reading replies stops being read.
        let permit = guard!(
            Arc::clone(&budget).acquire_many_owned(cost),
            "in-flight budget closed"
        );
        let reply = |error, data, permit| Reply {
            cookie: req.cookie,
            error,
            data,
            _permit: Some(permit),
        };
        let op = match verdict {
            Verdict::Run(op) => op,
            Verdict::Disconnect => break "client sent DISC".into(),
            Verdict::Abort => break format!("bad request magic {:#x}", req.magic),
            Verdict::FailClose { error } => {
                let _ = tx.send(reply(error, None, permit));
                break format!(
                    "write of {} bytes exceeds the {} byte limit",
                    req.length, max_payload
                );
            }
            Verdict::Fail { error, discard: n } => {
                debug!(%peer, kind = req.kind, offset = req.offset, length = req.length,
                    flags = req.flags, error, "refusing NBD request");
                if n > 0 {
                    guard!(
                        discard(&mut r, u64::from(n)),
                        "client went away inside a payload"
                    );
                }
                let _ = tx.send(reply(error, None, permit));
                continue;
            }
        };
        let mut data = Vec::new();
        if let Op::Write { len, .. } = op {
            data = vec![0u8; len as usize];
            guard!(
                r.read_exact(&mut data),
                "client went away inside a write payload"
            );
        }
        let done = Done {
            tx: tx.clone(),
            cookie: req.cookie,
            op,
            permit: Some(permit),
        };
        let backend = Arc::clone(&backend);
        match op {
            Op::Read { off, len } => backend.start_read(off, len, done),
            Op::Write { off, fua, .. } => backend.start_write(off, data, fua, done),
            _ => {
                while jobs.try_join_next().is_some() {}
                jobs.spawn(async move { done.finish(run(backend.as_ref(), op, data).await) });
            }
        }
    };
    debug!(%peer, export = %name, %reason, "NBD connection draining");
    // The writer ends once every task has sent its reply (each holds a
    // sender clone), then closes the socket. A client that does not read
    // its replies cannot hold the server (or a role change) forever: after
    // DRAIN_LIMIT its connection is closed with the replies unsent.
    drop(tx);
    let mut writer = writer;
    match tokio::time::timeout(DRAIN_LIMIT, &mut writer).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => debug!(%peer, error = %e, "NBD reply writer failed"),
        Ok(Err(e)) => warn!(%peer, error = %e, "NBD reply writer task failed"),
        Err(_) => {
            writer.abort();
            warn!(%peer, export = %name, "NBD client did not read its replies for {DRAIN_LIMIT:?}; connection closed");
        }
    }
    while jobs.join_next().await.is_some() {}
    info!(%peer, export = %name, %reason, "NBD client disconnected");
}

/// How long a closing connection may take to hand its last replies to a
/// client.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn run(b: &dyn Backend, op: Op, data: Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    match op {
        Op::Read { off, len } => b.read(off, len).await.map(Some),
        Op::Write { off, fua, .. } => b.write(off, data, fua).await.map(|_| None),
        Op::Flush => b.flush().await.map(|_| None),
        Op::Trim { off, len, fua } => b.trim(off, len, fua).await.map(|_| None),
        Op::WriteZeroes {
            off,
            len,
            no_hole,
            fua,
        } => b.write_zeroes(off, len, no_hole, fua).await.map(|_| None),
        Op::Nothing => Ok(None),
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    while let Some(reply) = rx.recv().await {
        w.write_all(&proto::simple_reply(reply.error, reply.cookie))
            .await?;
        if let Some(data) = &reply.data {
            w.write_all(data).await?;
        }
        drop(reply);
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> NbdRequest {
        NbdRequest {
            magic: proto::REQUEST_MAGIC,
            flags,
            kind,
            cookie: 1,
            offset,
            length,
        }
    }

    const SIZE: u64 = 1 << 20;
    const MAX: u32 = 1 << 16;

    fn j(r: NbdRequest) -> Verdict {
        judge(&r, SIZE, 512, MAX, false)
    }

    #[test]
    fn accepts_aligned_in_range() {
        assert_eq!(
            j(req(proto::CMD_READ, 0, 512, 1024)),
            Verdict::Run(Op::Read {
                off: 512,
                len: 1024
            })
        );
        assert_eq!(
            j(req(proto::CMD_WRITE, proto::CMD_FLAG_FUA, SIZE - 512, 512)),
            Verdict::Run(Op::Write {
                off: SIZE - 512,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            j(req(
                proto::CMD_WRITE_ZEROES,
                proto::CMD_FLAG_NO_HOLE,
                0,
                SIZE as u32
            )),
            Verdict::Run(Op::WriteZeroes {
                off: 0,
                len: SIZE as u32,
                no_hole: true,
                fua: false
            })
        );
        assert_eq!(
            j(req(proto::CMD_FLUSH, proto::CMD_FLAG_FUA, 0, 0)),
            Verdict::Run(Op::Flush)
        );
        assert_eq!(j(req(proto::CMD_DISC, 0, 0, 0)), Verdict::Disconnect);
    }

    #[test]
    fn refuses_misaligned_and_out_of_range() {
        let einval = |discard| Verdict::Fail {
            error: proto::EINVAL,
            discard,
        };
        assert_eq!(j(req(proto::CMD_READ, 0, 1, 512)), einval(0));
        assert_eq!(j(req(proto::CMD_READ, 0, 0, 100)), einval(0));
        assert_eq!(j(req(proto::CMD_WRITE, 0, 0, 100)), einval(100));
        assert_eq!(j(req(proto::CMD_READ, 0, SIZE, 512)), einval(0));
        assert_eq!(j(req(proto::CMD_TRIM, 0, SIZE - 512, 1024)), einval(0));
        assert_eq!(
            j(req(proto::CMD_WRITE, 0, SIZE, 512)),
            Verdict::Fail {
                error: proto::ENOSPC,
                discard: 512
            }
        );
        assert_eq!(
            j(req(proto::CMD_WRITE_ZEROES, 0, u64::MAX - 511, 512)),
            Verdict::Fail {
                error: proto::ENOSPC,
                discard: 0
            }
        );
        // Unknown command, unknown flag, NO_HOLE on a plain write.
        assert_eq!(j(req(5, 0, 0, 512)), einval(0));
        assert_eq!(j(req(proto::CMD_READ, 1 << 4, 0, 512)), einval(0));
        assert_eq!(
            j(req(proto::CMD_WRITE, proto::CMD_FLAG_NO_HOLE, 0, 512)),
            einval(512)
        );
    }

    #[test]
    fn oversized_payloads() {
        assert_eq!(
            j(req(proto::CMD_READ, 0, 0, MAX + 512)),
            Verdict::Fail {
                error: proto::EINVAL,
                discard: 0
            }
        );
        // Over our limit but under 2^25: skipped.
        assert_eq!(
            j(req(proto::CMD_WRITE, 0, 0, MAX + 512)),
            Verdict::Fail {
                error: proto::EINVAL,
                discard: MAX + 512
            }
        );
        // Over 2^25: not skipped.
        assert_eq!(
            j(req(proto::CMD_WRITE, 0, 0, (1 << 25) + 512)),
            Verdict::FailClose {
                error: proto::EINVAL
            }
        );
        // No payload: TRIM/WRITE_ZEROES may exceed the payload limit.
        assert!(matches!(
            j(req(proto::CMD_TRIM, 0, 0, SIZE as u32)),
            Verdict::Run(_)
        ));
    }

    #[test]
    fn config_limits() {
        let new = |c: ServerConfig| Server::new(Registry::new(), c).is_ok();
        assert!(new(ServerConfig::default()));
        let small = ServerConfig {
            max_payload: 4096,
            ..ServerConfig::default()
        };
        assert!(!new(small));
        let budget = ServerConfig {
            inflight_bytes: 1 << 20,
            ..ServerConfig::default()
        };
        assert!(!new(budget));
        let pref = ServerConfig {
            preferred_block: 3000,
            ..ServerConfig::default()
        };
        assert!(!new(pref));
    }

    #[test]
    fn read_only_and_bad_magic() {
        let r = req(proto::CMD_WRITE, 0, 0, 512);
        assert_eq!(
            judge(&r, SIZE, 512, MAX, true),
            Verdict::Fail {
                error: proto::EPERM,
                discard: 512
            }
        );
        let mut bad = req(proto::CMD_READ, 0, 0, 512);
        bad.magic = 0x1256_0953;
        assert_eq!(j(bad), Verdict::Abort);
        assert_eq!(j(req(proto::CMD_WRITE, 0, 0, 0)), Verdict::Run(Op::Nothing));
    }
}

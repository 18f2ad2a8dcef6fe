//! The primary's replication link: connects to the secondary
//! ([`connect`]: two TCP connections, the version-2 handshake), runs a
//! session ([`session`]: the core's upcalls pipelined to the peer, replies
//! handed back by seq, keepalives, the watchdog), resynchronizes dirty
//! extents ([`resync`]), flushes both sides so written extents can leave
//! the map ([`flush`]), and records counters and roles in the metadata
//! ([`record`]). It reconnects with quick first retries, then every 10
//! seconds (`hastctl reconnect` cuts a wait short; the retries are quick
//! again after a session was established). Without a session the upcalls
//! get the degraded answers (the localcnt bump is persisted, peer reads
//! fail). What happens to the link is reported as events
//! ([`crate::hooks::notify`]) and kept for `hastctl list`
//! ([`super::peer::PeerLink`]).

mod connect;
mod flush;
mod record;
mod resync;
mod session;

pub(crate) use connect::{open, secret_of};
pub use resync::Progress;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::ResourceConfig;
use crate::dataplane::{Dataplane, DataplaneError};
use crate::events::Kind;
use crate::hooks;
use crate::metadata::Metadata;
use crate::metrics::ResourceMetrics;
use crate::proto;
use crate::security::tls::PeerRefused;
use crate::security::Fingerprint;

use super::transport::LinkInfo;

use super::peer::PeerLink;

use session::{Session, SYNC_SEQ_BASE};

/// Reconnection delays: quick first retries, then the reference's 10 s.
const BACKOFF: [u64; 5] = [0, 1, 1, 2, 5];

const RETRY: Duration = Duration::from_secs(10);

/// Why a connection attempt or a session failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("unable to connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {0} timed out")]
    Timeout(String),
    #[error("{0}")]
    Proto(#[from] proto::ProtoError),
    #[error("{0}")]
    Handshake(#[from] crate::handshake::HandshakeError),
    /// The two providers do not have the same geometry.
    #[error("{what} differs between nodes (local={local}, remote={remote})")]
    Mismatch {
        what: &'static str,
        local: u64,
        remote: i64,
    },
    /// A downcall to this node's data plane (the core's host) failed.
    #[error("{during}: {source}")]
    Local {
        during: &'static str,
        #[source]
        source: DataplaneError,
    },
    /// A payload from the peer was refused.
    #[error("{what}: {source}")]
    Payload {
        what: &'static str,
        #[source]
        source: crate::payload::PayloadError,
    },
    /// The peer answered a resync or flush request with an error.
    #[error("peer failed {cmd}({offset}, {length}): errno {errno}")]
    PeerFailed {
        cmd: &'static str,
        offset: u64,
        length: u64,
        errno: i16,
    },
    /// The peer answered a resync read without data.
    #[error("peer sent no data for a resync read at {0}")]
    NoData(u64),
    /// A flush of both sides did not finish (the local provider or the peer
    /// failed it, or it outlived twice the timeout).
    #[error("a flush of both sides failed (the local provider or the peer)")]
    FlushFailed,
    #[error("reply without seq")]
    ReplyWithoutSeq,
    #[error("peer did not answer request seq {0} within the timeout")]
    Unanswered(u64),
    #[error("session closed")]
    Closed,
    #[error("{0}")]
    Security(#[from] SecurityError),
    /// The keys, pins or secrets changed (SIGHUP): the session is
    /// re-established with the new ones.
    #[error("the resource's security settings changed; reconnecting with the new ones")]
    Rekey,
}

/// Why the link's protection could not be set up with the peer.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("the credentials of the resource are not loaded")]
    NotLoaded,
    #[error("the TLS configuration cannot be built: {0}")]
    Config(rustls::Error),
    #[error("TLS handshake refused: {0}")]
    PeerRefused(PeerRefused),
    #[error("TLS handshake with {addr} failed: {source}{hint}")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
        hint: String,
    },
    #[error("the peer did not answer the shared-secret challenge: it runs without `security secret` for this resource (or is a FreeBSD hastd); set `security secret` and the same `secretfile` for it there")]
    NoSecretAnswer,
    #[error("the peer's answer to the shared-secret challenge is wrong: the `secretfile`s of the two nodes differ (or the answer was forged)")]
    BadSecretAnswer,
}

impl SecurityError {
    /// A failed TLS handshake toward `remote`, with what to change.
    pub(super) fn handshake(
        remote: &crate::addr::Addr,
        ours: Fingerprint,
        source: std::io::Error,
    ) -> SecurityError {
        use rustls::AlertDescription as A;
        let tls = source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let hint = match (source.kind(), tls) {
            (_, Some(rustls::Error::AlertReceived(
                A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::AccessDenied,
            ))) => format!(
                " (the peer does not accept this node's key {ours}: put it in the peer's `peerfingerprint` for the resource, or check its `cafile`)"
            ),
            (_, Some(rustls::Error::InvalidMessage(_))) => {
                " (the peer did not answer in TLS: set `security tls`, `keyfile` and `peerfingerprint` for the resource on it)".to_string()
            }
            (std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset, _) => {
                " (the peer closed the connection during the TLS handshake: it does not accept TLS (`security none` for the resource, no `keyfile`, or a FreeBSD hastd): set `security tls`, `keyfile` and `peerfingerprint` for it there)".to_string()
            }
            _ => String::new(),
        };
        SecurityError::Handshake {
            addr: remote.to_string(),
            source,
            hint,
        }
    }
}

impl LinkError {
    /// A data plane error during `during`, `Closed` when the data plane
    /// stopped.
    fn local(during: &'static str) -> impl FnOnce(DataplaneError) -> LinkError {
        move |source| match source {
            DataplaneError::Closed => LinkError::Closed,
            source => LinkError::Local { during, source },
        }
    }
}

/// The replication state of one primary resource.
pub struct Replicator {
    dp: Arc<dyn Dataplane>,
    md: Arc<Mutex<Metadata>>,
    cfg: Mutex<ResourceConfig>,
    session: Mutex<Option<Session>>,
    /// Wire seqs of resync requests and pieces of split requests.
    sync_seq: AtomicU64,
    /// The largest request the connected peer accepts.
    max_io: AtomicU64,
    pub progress: Progress,
    connected: AtomicBool,
    /// Turns true once the first connection attempt is over (connected, with
    /// the sync direction known, or failed): only then may clients be
    /// served, so a stale local copy is never read.
    first_attempt: watch::Sender<bool>,
    /// Bytes of writes sent to the peer since the last flush of both sides.
    unflushed_bytes: AtomicU64,
    /// How the current session's link is protected.
    link: Mutex<Option<LinkInfo>>,
    /// Counts changes of the security settings: a session started before
    /// a change ends, and the link is re-established with the new keys.
    rekey: watch::Sender<u64>,
    /// The link's state for `hastctl list` and the metrics.
    pub peer: PeerLink,
    /// `hastctl reconnect`: end the wait before the next attempt.
    reconnect: tokio::sync::Notify,
    /// Latency of the peer's replies, and where the data path records.
    metrics: Arc<ResourceMetrics>,
    /// Resync tasks of extents still running (they outlive their session:
    /// each releases its range lock when it ends).
    extent_tasks: Arc<resync::Live>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replicator {
    pub fn new(
        dp: Arc<dyn Dataplane>,
        md: Arc<Mutex<Metadata>>,
        cfg: ResourceConfig,
        metrics: Arc<ResourceMetrics>,
    ) -> Arc<Replicator> {
        Arc::new(Replicator {
            dp,
            md,
            cfg: Mutex::new(cfg),
            session: Mutex::new(None),
            sync_seq: AtomicU64::new(SYNC_SEQ_BASE),
            max_io: AtomicU64::new(u64::from(crate::handshake::DEFAULT_MAXIO)),
            progress: Progress::default(),
            connected: AtomicBool::new(false),
            first_attempt: watch::channel(false).0,
            unflushed_bytes: AtomicU64::new(0),
            link: Mutex::new(None),
            rekey: watch::channel(0).0,
            peer: PeerLink::default(),
            reconnect: tokio::sync::Notify::new(),
            metrics,
            extent_tasks: Arc::default(),
        })
    }

    /// `hastctl reconnect`: make the next connection attempt now instead
    /// of at the end of the current wait. Nothing changes while a session
    /// runs.
    pub fn reconnect_now(&self) {
        self.reconnect.notify_one();
    }

    /// Wait until the resync tasks of extents a stopped session left have
    /// ended (they let go of the dataplane then).
    pub async fn extent_tasks_done(&self) {
        self.extent_tasks.wait_none().await;
    }

    /// Wait until the first connection attempt is over (see `first_attempt`).
    pub async fn first_attempt_done(&self) {
        let mut rx = self.first_attempt.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Whether a session with the peer is established.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Take new replication settings (SIGHUP on a primary). New keys,
    /// pins or secrets end the running session: it is re-established with
    /// them, never left on the old ones.
    pub fn set_config(&self, cfg: ResourceConfig) {
        let rekey = {
            let mut cur = lock(&self.cfg);
            let changed = cur.security != cfg.security;
            *cur = cfg;
            changed
        };
        if rekey {
            self.rekey.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// How the current session's link is protected (None without one).
    pub fn link_info(&self) -> Option<LinkInfo> {
        lock(&self.link).clone()
    }

    fn cfg(&self) -> ResourceConfig {
        lock(&self.cfg).clone()
    }

    /// Connect, serve, reconnect, until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut attempt = 0usize;
        let mut last_error = String::new();
        let mut split_brain_reported = false;
        loop {
            if *stop.borrow() {
                return;
            }
            // Subscribed before the settings are read: a change after this
            // point ends the session that uses them.
            let mut rekey = self.rekey.subscribe();
            rekey.borrow_and_update();
            let cfg = self.cfg();
            let Some(remote) = cfg.remote_addr.clone() else {
                // `remote none`: stay degraded.
                self.first_attempt.send_replace(true);
                let _ = stop.changed().await;
                return;
            };
            // A stop does not wait for a connection attempt to time out.
            let connected = tokio::select! {
                c = self.connect(&cfg, &remote) => c,
                _ = stop.wait_for(|s| *s) => return,
            };
            match connected {
                Ok(parts) => {
                    attempt = 0;
                    last_error.clear();
                    split_brain_reported = false;
                    if parts.info.mode != crate::config::SecurityMode::None {
                        tracing::info!(
                            "link to {remote}: {}{}",
                            parts.info.describe(),
                            parts
                                .info
                                .peer
                                .map_or(String::new(), |p| format!(", peer key {p}"))
                        );
                    }
                    *lock(&self.link) = Some(parts.info.clone());
                    let ended = self.clone().session(parts, &cfg, stop.clone(), rekey).await;
                    *lock(&self.link) = None;
                    let rekeyed = matches!(ended, LinkError::Rekey);
                    self.disconnect(&cfg, &ended);
                    if *stop.borrow() {
                        return;
                    }
                    if rekeyed {
                        // Reconnect at once with the new settings.
                        continue;
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    let split_brain = matches!(
                        e,
                        LinkError::Handshake(crate::handshake::HandshakeError::SplitBrain)
                    );
                    // As on success: the event before the promotion goes on.
                    self.peer.failed(&msg, split_brain);
                    self.first_attempt.send_replace(true);
                    if split_brain && !split_brain_reported {
                        tracing::error!("split-brain detected with {remote}; both nodes refuse to synchronize (see hastctl(8) for the recovery)");
                        hooks::notify(
                            cfg.exec.as_deref(),
                            &cfg.name,
                            Kind::SplitBrain {
                                peer: cfg.remote.clone(),
                            },
                        );
                        split_brain_reported = true;
                    }
                    if msg != last_error {
                        tracing::warn!("replication to {remote} not established: {msg}");
                        last_error = msg;
                    } else {
                        tracing::debug!("replication to {remote} not established: {msg}");
                    }
                }
            }
            let delay = BACKOFF
                .get(attempt)
                .map_or(RETRY, |&s| Duration::from_secs(s));
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.reconnect.notified() => {
                    tracing::info!("reconnecting to {remote} now, as asked");
                }
                _ = stop.changed() => return,
            }
        }
    }

    fn disconnect(&self, cfg: &ResourceConfig, why: &LinkError) {
        if let Some(session) = lock(&self.session).take() {
            lock(&session.waiters).clear();
        }
        self.connected.store(false, Ordering::SeqCst);
        self.dp.set_link(false);
        // Resync tasks waiting for a range learn the session is gone.
        self.dp.sync_cancel();
        tracing::warn!("disconnected from {}: {why}", cfg.remote);
        let reason = why.to_string();
        self.peer.disconnected(&reason);
        if let LinkError::Unanswered(seq) = why {
            crate::events::publish(
                &cfg.name,
                Kind::Timeout {
                    what: format!("the peer did not answer request seq {seq}"),
                    secs: u64::from(cfg.timeout.max(1)),
                },
            );
        }
        // A synchronization that was running ends here, whatever ended the
        // session.
        if self.progress.active.swap(false, Ordering::SeqCst) {
            tracing::warn!("synchronization interrupted; it goes on after the next connection");
            hooks::notify(
                cfg.exec.as_deref(),
                &cfg.name,
                Kind::SyncInterrupted {
                    done: self.progress.done.load(Ordering::Relaxed),
                    total: self.progress.total.load(Ordering::Relaxed),
                },
            );
        }
        hooks::notify(
            cfg.exec.as_deref(),
            &cfg.name,
            Kind::Disconnect {
                peer: cfg.remote.clone(),
                reason,
            },
        );
    }
}

//! One resource inside hastd: its configuration, its role, and while it is
//! primary or secondary the opened local provider and its metadata (and,
//! on a primary, the data path of [`super::primary`]). Role changes are
//! persisted as `prevrole`, published as events and run the `role` hook.
//! Its [`ResourceMetrics`] live as long as the resource.

use std::sync::{Arc, Mutex};

use crate::config::ResourceConfig;
use crate::control::status::{Activity, ResourceStatus, SyncProgress};
use crate::events::Kind;
use crate::hooks;
use crate::metadata::{Metadata, MetadataError};
use crate::metrics::ResourceMetrics;
use crate::provider::{Provider, ProviderError};
use crate::role::Role;
use crate::stats::{AtomicRequestStats, Queues};
use crate::sysexits;

use super::admission::{Refusal, SecretExchange};
use super::peer::PeerLink;
use super::primary::{Primary, PrimaryError};
use super::secondary::{self, Local};
use super::transport::{Conn, LinkInfo};
use crate::config::SecurityMode;
use crate::handshake::{Attach, Welcome, TOKEN_SIZE};
use crate::security::secret::{self as secret_mode, Nonce};
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a resource could not take the role it was given.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The local provider cannot be opened.
    #[error("{0}")]
    Provider(#[from] ProviderError),
    /// The metadata cannot be read, is not this resource's, or cannot be written.
    #[error("{0}")]
    Metadata(#[from] MetadataError),
    /// The data path (core, NBD export) could not start.
    #[error("{0}")]
    DataPath(#[from] PrimaryError),
    /// The new role could not be recorded through the kernel host.
    #[error("recording the role: {0}")]
    Record(crate::dataplane::DataplaneError),
    /// The blocking work of a role change (opening the provider, reading
    /// or writing the metadata) did not run to its end.
    #[error("the provider's I/O task failed: {0}")]
    Task(String),
}

impl RoleError {
    /// The per-resource error code sent to hastctl (sysexits values, like
    /// hastctl create: 66 cannot open, 65 bad metadata, 74 I/O error).
    pub fn code(&self) -> i16 {
        let code = match self {
            RoleError::Provider(_) => sysexits::EX_NOINPUT,
            RoleError::Metadata(e) => e.exit_code(),
            RoleError::DataPath(_) => sysexits::EX_OSERR,
            RoleError::Record(_) => sysexits::EX_IOERR,
            RoleError::Task(_) => sysexits::EX_SOFTWARE,
        };
        i16::try_from(code).unwrap_or(i16::MAX)
    }
}

/// The local side of an active resource, by role.
enum Active {
    Primary {
        /// hastd's descriptor of the local provider; `None` while the
        /// kernel module holds it (a primary on the kernel host).
        provider: Option<Arc<Provider>>,
        md: Arc<Mutex<Metadata>>,
        primary: Primary,
    },
    Secondary {
        provider: Arc<Provider>,
        md: Arc<Mutex<Metadata>>,
        /// Boxed: its pending connection is several times the size of
        /// the primary's variant.
        sec: Box<SecondaryState>,
    },
}

impl Active {
    fn md(&self) -> &Arc<Mutex<Metadata>> {
        match self {
            Active::Primary { md, .. } | Active::Secondary { md, .. } => md,
        }
    }
}

/// A primary's first connection, waiting for its second one.
struct Pending {
    conn: Conn,
    token: [u8; TOKEN_SIZE],
    /// How the first connection is protected.
    info: LinkInfo,
    /// The challenges of `security secret`.
    exchange: Option<SecretExchange>,
}

/// A secondary's connection state: the first connection of a primary
/// waiting for its second one, and the running session.
#[derive(Default)]
struct SecondaryState {
    pending: Option<Pending>,
    session: Option<tokio::task::JoinHandle<()>>,
    /// How the running session's link is protected.
    protection: Arc<Mutex<Option<LinkInfo>>>,
    connected: Arc<AtomicBool>,
    stats: Arc<AtomicRequestStats>,
    slots: secondary::Slots,
    peer: Arc<PeerLink>,
}

impl SecondaryState {
    fn stop_session(&mut self) {
        self.pending = None;
        if let Some(s) = self.session.take() {
            s.abort();
        }
        if self.connected.swap(false, Ordering::SeqCst) {
            self.peer
                .disconnected("the session was stopped by this node");
        }
        *self.protection.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Stop the session and wait for the I/O it had started.
    async fn stop_and_drain(&mut self) {
        self.stop_session();
        self.slots.drain().await;
    }
}

/// A configured resource and its current role.
pub struct Resource {
    cfg: ResourceConfig,
    role: Role,
    active: Option<Active>,
    metrics: Arc<ResourceMetrics>,
}

impl Resource {
    /// A resource as configured, in role init (hastd never picks a role).
    pub fn new(cfg: ResourceConfig) -> Resource {
        let metrics = ResourceMetrics::new(&cfg.name);
        Resource {
            cfg,
            role: Role::Init,
            active: None,
            metrics,
        }
    }

    /// What its data path records for the metrics.
    pub fn metrics(&self) -> &Arc<ResourceMetrics> {
        &self.metrics
    }

    /// `hastctl reconnect`: a primary tries its peer now instead of at the
    /// end of its current wait. The error says why not.
    pub fn reconnect(&self) -> Result<(), String> {
        match &self.active {
            Some(Active::Primary { primary, .. }) => {
                let r = primary.replicator();
                if r.is_connected() {
                    tracing::info!("[{}] reconnect asked: already connected", self.cfg.name);
                } else {
                    r.reconnect_now();
                }
                Ok(())
            }
            _ => Err(format!(
                "resource {} is {}, not primary: only a primary connects to its peer (a secondary waits for it)",
                self.cfg.name, self.role
            )),
        }
    }

    /// The resource name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The configuration in force.
    pub fn config(&self) -> &ResourceConfig {
        &self.cfg
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Replace the configuration without a restart (the caller decided the
    /// change needs none).
    pub fn set_config(&mut self, cfg: ResourceConfig) {
        self.cfg = cfg;
    }

    /// Change the role. Leaving primary or secondary closes the provider;
    /// entering one opens it, checks the metadata belongs to this resource
    /// and persists the new role as `prevrole`. On failure the resource is
    /// left in init. The `role` hook runs whenever the role actually changed.
    pub async fn set_role(&mut self, new: Role) -> Result<(), RoleError> {
        let old = self.role;
        if old == new {
            return Ok(());
        }
        let span = tracing::info_span!("resource", name = %self.cfg.name);
        span.in_scope(|| tracing::info!("role changed from {old} to {new}"));
        self.deactivate(new).await;
        self.role = new;
        let result = match new {
            Role::Primary | Role::Secondary => self.activate(new).await,
            Role::Init | Role::Undef => Ok(()),
        };
        let _enter = span.enter();
        if let Err(e) = &result {
            tracing::error!("unable to become {new}: {e}; role is init");
            self.role = Role::Init;
        }
        if self.role != old {
            hooks::notify(
                self.cfg.exec.as_deref(),
                &self.cfg.name,
                Kind::Role {
                    old: old.as_str().to_string(),
                    new: self.role.as_str().to_string(),
                },
            );
        }
        result
    }

    async fn activate(&mut self, role: Role) -> Result<(), RoleError> {
        // Opening the provider and reading its metadata and map are
        // blocking I/O: off the daemon's main loop.
        let (local, name) = (self.cfg.local.clone(), self.cfg.name.clone());
        let opened = tokio::task::spawn_blocking(move || {
            let provider = Provider::open(&local, true)?;
            let md = Metadata::read(&provider, &name)?;
            let map = md.read_map(&provider)?;
            Ok::<_, RoleError>((provider, md, map))
        })
        .await
        .map_err(|e| RoleError::Task(e.to_string()))??;
        let (provider, md, map) = opened;
        let provider = Arc::new(provider);
        let dirty = map.count();
        let md = Arc::new(Mutex::new(md));
        let flush = self.cfg.metaflush;
        // The counters of the new role start from 0: so do the histograms.
        self.metrics.reset();
        let active = match role {
            Role::Primary => {
                // On the kernel host the module takes the disk: hastd keeps
                // no descriptor of it.
                let kept = (!Primary::kernel_host()).then(|| provider.clone());
                let primary = Primary::start(
                    &self.cfg,
                    provider,
                    md.clone(),
                    map.as_bytes(),
                    self.metrics.clone(),
                )
                .await?;
                // The role is recorded only once the resource really has it.
                let recorded = primary
                    .record(move |m| m.prevrole = role, flush)
                    .await
                    .map_err(|e| match e {
                        crate::dataplane::DataplaneError::Metadata(m) => RoleError::Metadata(m),
                        other => RoleError::Record(other),
                    });
                if let Err(e) = recorded {
                    primary.stop().await;
                    return Err(e);
                }
                Active::Primary {
                    provider: kept,
                    md,
                    primary,
                }
            }
            _ => {
                let (p, m) = (provider.clone(), md.clone());
                tokio::task::spawn_blocking(move || {
                    let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                    let mut next = m.clone();
                    next.prevrole = role;
                    next.write(&p, flush).map(|()| *m = next)
                })
                .await
                .map_err(|e| RoleError::Task(e.to_string()))??;
                Active::Secondary {
                    provider,
                    md,
                    sec: Box::default(),
                }
            }
        };
        tracing::debug!(dirty, "local provider {} opened", self.cfg.local.display());
        self.active = Some(active);
        Ok(())
    }

    /// Close the provider of an active resource. When it leaves for init the
    /// new role is recorded as `prevrole` first; when the daemon stops
    /// (`next` is Undef) the metadata is left as it is, as after a crash.
    async fn deactivate(&mut self, next: Role) {
        let Some(active) = self.active.take() else {
            return;
        };
        let (provider, md) = match active {
            Active::Primary {
                provider,
                md,
                primary,
            } => {
                primary.stop().await;
                (provider, md)
            }
            Active::Secondary {
                provider,
                md,
                mut sec,
            } => {
                sec.stop_and_drain().await;
                (Some(provider), md)
            }
        };
        let cfg = self.cfg.clone();
        let _ = tokio::task::spawn_blocking(move || Self::close(provider, &md, next, &cfg)).await;
    }

    /// The metadata in memory of an active resource.
    pub fn metadata_in_memory(&self) -> Option<Metadata> {
        self.active
            .as_ref()
            .map(|a| a.md().lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// This node's counters for a peer's promotion probe: from the
    /// metadata in memory, or read from the provider (off the main loop)
    /// when in init.
    pub async fn probe_counters(&self) -> Result<crate::splitbrain::Counters, RoleError> {
        let md = match self.metadata_in_memory() {
            Some(md) => md,
            None => {
                let (local, name) = (self.cfg.local.clone(), self.cfg.name.clone());
                tokio::task::spawn_blocking(move || {
                    let p = Provider::open(&local, false)?;
                    Ok::<_, RoleError>(Metadata::read(&p, &name)?)
                })
                .await
                .map_err(|e| RoleError::Task(e.to_string()))??
            }
        };
        Ok(crate::splitbrain::Counters {
            resuid: md.resuid,
            localcnt: md.localcnt,
            remotecnt: md.remotecnt,
        })
    }

    /// A primary promoted by force takes its copy as it is: it no longer
    /// records an interrupted synchronization (the administrator accepted
    /// the mix of old and new blocks).
    pub async fn accept_inconsistent_copy(&self) -> Result<(), RoleError> {
        let Some(Active::Primary { primary, md, .. }) = &self.active else {
            return Ok(());
        };
        if !md.lock().unwrap_or_else(|p| p.into_inner()).syncing {
            return Ok(());
        }
        tracing::warn!(
            "[{}] promoted by force with an inconsistent copy (a synchronization from the peer did not finish): it is used as it is",
            self.cfg.name
        );
        primary
            .record(|m| m.syncing = false, true)
            .await
            .map_err(RoleError::Record)
    }

    /// Whether `ip` is this resource's `remote` (the access check of an
    /// incoming replication connection), resolved with tokio's resolver.
    pub async fn accepts_from(&self, ip: std::net::IpAddr) -> bool {
        let Some(remote) = &self.cfg.remote_addr else {
            return false;
        };
        remote
            .resolve()
            .await
            .is_ok_and(|addrs| addrs.iter().any(|a| same_ip(a.ip(), ip)))
    }

    /// Step 1 of a primary's connection (admitted as `info`, with its
    /// challenge `nonce` under `security secret`): answer on `stream` and
    /// keep it until the second connection presents the token.
    pub async fn hello(
        &mut self,
        mut stream: Conn,
        peer: std::net::SocketAddr,
        info: LinkInfo,
        nonce: Option<Nonce>,
    ) {
        use crate::proto::write_frame_async;
        let role = self.role;
        let creds = self.cfg.security.credentials.clone();
        let resource = self.cfg.name.clone();
        let refusal = match &mut self.active {
            Some(Active::Secondary { sec, .. }) => {
                if sec.session.is_some() || sec.pending.is_some() {
                    tracing::info!("new connection from {peer} replaces the current one");
                }
                sec.stop_session();
                let token: [u8; TOKEN_SIZE] = rand::random();
                let exchange = match (info.mode, creds, nonce) {
                    (SecurityMode::Secret, Some(creds), Some(primary_nonce)) => {
                        Some(SecretExchange {
                            creds,
                            resource,
                            primary_nonce,
                            secondary_nonce: secret_mode::nonce(),
                            token,
                        })
                    }
                    _ => None,
                };
                let welcome = Welcome::Accepted {
                    version: crate::proto::HAST_PROTO_VERSION,
                    token,
                    nonce: exchange.as_ref().map(|x| x.secondary_nonce),
                };
                if let Err(e) = write_frame_async(&mut stream, &welcome.to_nv(), &[]).await {
                    tracing::error!("unable to answer {peer}: {e}");
                    return;
                }
                sec.pending = Some(Pending {
                    conn: stream,
                    token,
                    info,
                    exchange,
                });
                return;
            }
            _ => Welcome::Refused {
                errmsg: format!(
                    "Remote node acts as {role} for the resource and not as secondary."
                ),
                wait: role == Role::Primary,
            },
        };
        tracing::error!(
            "we act as {role} for the resource and not as secondary as requested by {peer}"
        );
        let _ = write_frame_async(&mut stream, &refusal.to_nv(), &[]).await;
    }

    /// Step 2: the second connection with its token (`admitted` says
    /// whether it has what the resource requires); starts the session.
    pub fn attach(
        &mut self,
        stream: Conn,
        peer: std::net::SocketAddr,
        attach: Attach,
        admitted: Result<LinkInfo, Refusal>,
    ) {
        let cfg = self.cfg.clone();
        let Some(Active::Secondary { provider, md, sec }) = &mut self.active else {
            tracing::error!("connection from {peer} with a token, but we are not secondary");
            return;
        };
        let Some(pending) = sec.pending.take() else {
            tracing::error!("token received from {peer} without a first connection");
            return;
        };
        if pending.token != attach.token {
            tracing::error!("token received from {peer} doesn't match");
            return;
        }
        let checked = admitted.and_then(|info| {
            if let Some(x) = &pending.exchange {
                x.verify_attach(&attach)?;
            }
            if info != pending.info {
                return Err(Refusal::Mismatch {
                    resource: cfg.name.clone(),
                });
            }
            Ok(info)
        });
        let Pending {
            conn: conn1,
            exchange,
            ..
        } = pending;
        let info = match checked {
            Ok(info) => info,
            Err(refusal) => {
                tracing::error!("[{}] connection from {peer} refused: {refusal}", cfg.name);
                // The primary waits for the answer on its first connection.
                tokio::spawn(async move {
                    let mut conn1 = conn1;
                    let mut nv = crate::nv::Nv::new();
                    nv.add_string("errmsg", refusal.to_string());
                    let _ = crate::proto::write_frame_async(&mut conn1, &nv, &[]).await;
                });
                return;
            }
        };
        let protection = sec.protection.clone();
        let local = Local {
            provider: provider.clone(),
            md: md.clone(),
            cfg: cfg.clone(),
            metrics: self.metrics.clone(),
        };
        let connected = sec.connected.clone();
        let link = sec.peer.clone();
        let stats = sec.stats.clone();
        let slots = sec.slots.clone();
        let name = cfg.name.clone();
        let span = tracing::info_span!("resource", name = %name);
        sec.session = Some(tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut conn1 = conn1;
                // The session this one replaces may have I/O running.
                slots.drain().await;
                match secondary::answer_attach(&mut conn1, &local, &attach, exchange.as_ref()).await
                {
                    Ok(decision) => {
                        tracing::info!("[{name}] primary {peer} connected ({decision:?})");
                        if info.mode != SecurityMode::None {
                            tracing::info!(
                                "[{name}] link: {}{}",
                                info.describe(),
                                info.peer
                                    .map_or(String::new(), |p| format!(", peer key {p}"))
                            );
                        }
                        *protection.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
                        connected.store(true, Ordering::SeqCst);
                        link.connected();
                        hooks::notify(
                            cfg.exec.as_deref(),
                            &name,
                            Kind::Connect {
                                peer: peer.to_string(),
                            },
                        );
                        stream.set_nodelay();
                        let why =
                            secondary::serve(conn1, stream, local, stats, slots, attach.synctrack)
                                .await;
                        *protection.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        connected.store(false, Ordering::SeqCst);
                        tracing::warn!("[{name}] primary {peer} disconnected: {why}");
                        let reason = why.to_string();
                        link.disconnected(&reason);
                        if let secondary::SessionError::Idle(d) = why {
                            crate::events::publish(
                                &name,
                                Kind::Timeout {
                                    what: "no request or keepalive from the primary".to_string(),
                                    secs: d.as_secs(),
                                },
                            );
                        }
                        hooks::notify(
                            cfg.exec.as_deref(),
                            &name,
                            Kind::Disconnect {
                                peer: peer.to_string(),
                                reason,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!("[{name}] connection from {peer} refused: {e}");
                        let split = matches!(e, secondary::SessionError::SplitBrain);
                        link.failed(&e.to_string(), split);
                    }
                }
            },
            span,
        )));
    }

    /// Take changed replication settings in place (a primary on SIGHUP).
    pub fn reload_in_place(&mut self) {
        if let Some(Active::Primary { primary, .. }) = &self.active {
            primary.reload(&self.cfg);
        }
    }

    /// Stop the data path (if any) without changing the metadata, as the
    /// daemon does when it exits.
    pub async fn shutdown(&mut self) {
        self.deactivate(Role::Undef).await;
    }

    /// Record `next` as `prevrole` when it is init, and flush the provider
    /// (blocking). After a kernel primary the module has let the disk go:
    /// it is opened again for this.
    fn close(
        provider: Option<Arc<Provider>>,
        md: &Mutex<Metadata>,
        next: Role,
        cfg: &ResourceConfig,
    ) {
        let provider = match provider {
            Some(p) => p,
            None => match Provider::open(&cfg.local, true) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!("unable to reopen the local provider: {e}");
                    return;
                }
            },
        };
        if next == Role::Init {
            let mut md = md.lock().unwrap_or_else(|p| p.into_inner());
            md.prevrole = Role::Init;
            if let Err(e) = md.write(&provider, cfg.metaflush) {
                tracing::warn!("unable to record prevrole init: {e}");
            }
        }
        if let Err(e) = provider.flush() {
            tracing::warn!("flushing {} failed: {e}", cfg.local.display());
        }
        tracing::debug!("local provider {} closed", cfg.local.display());
    }

    /// This resource's `hastctl status`/`list` status.
    pub fn status(&self) -> ResourceStatus {
        let cfg = &self.cfg;
        let mut st = ResourceStatus {
            provname: cfg.provname.clone(),
            localpath: cfg.local.display().to_string(),
            remoteaddr: cfg.remote.clone(),
            sourceaddr: cfg.source.as_ref().map(|s| s.raw.clone()),
            replication: cfg.replication.as_str().to_string(),
            checksum: cfg.checksum.as_str().to_string(),
            compression: cfg.compression.as_str().to_string(),
            role: self.role.as_str().to_string(),
            ..Default::default()
        };
        let protection = match &self.active {
            Some(Active::Primary { primary, .. }) => primary.replicator().link_info(),
            Some(Active::Secondary { sec, .. }) => sec
                .protection
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            None => None,
        };
        if cfg.security.mode != SecurityMode::None {
            st.security = Some(crate::control::status::SecurityStatus {
                security: cfg.security.mode.as_str().to_string(),
                link: protection.as_ref().map(LinkInfo::describe),
                peerfingerprint: protection
                    .as_ref()
                    .and_then(|l| l.peer)
                    .map(|p| p.to_string()),
            });
        }
        let Some(active) = &self.active else {
            return st;
        };
        // hastd serves every resource itself; its pid is the worker's. A
        // FreeBSD secondary has a worker only while a primary is connected
        // (hastctl prints no workerpid line without one).
        let worker = match active {
            Active::Secondary { sec, .. } => sec.connected.load(Ordering::SeqCst),
            Active::Primary { .. } => true,
        };
        if worker {
            st.workerpid = i32::try_from(std::process::id()).unwrap_or(0);
        }
        let (extentsize, keepdirty) = {
            let m = active.md().lock().unwrap_or_else(|p| p.into_inner());
            st.inconsistent = m.syncing;
            st.counters = Some(crate::splitbrain::Counters {
                resuid: m.resuid,
                localcnt: m.localcnt,
                remotecnt: m.remotecnt,
            });
            (m.extentsize, m.keepdirty)
        };
        let peer = match active {
            Active::Secondary { sec, .. } => &*sec.peer,
            Active::Primary { primary, .. } => &primary.replicator().peer,
        };
        let mut link = peer.status();
        // What protects it, once there is something (security not none).
        link.encryption = protection
            .filter(|l| l.mode != SecurityMode::None)
            .map(|l| l.describe());
        st.link = Some(link);
        st.split_brain = peer.split_brain();
        st.activity = match active {
            // Like the reference, a secondary reports status only while its
            // primary is connected, and no dirty count.
            Active::Secondary { sec, .. } => {
                sec.connected.load(Ordering::SeqCst).then(|| Activity {
                    status: "complete".into(),
                    extentsize,
                    requests: sec.stats.snapshot(),
                    ..Default::default()
                })
            }
            Active::Primary { primary, .. } => {
                let c = primary.stats();
                st.sync_pending = Some(c.syncdirty.saturating_mul(u64::from(extentsize)));
                let p = &primary.replicator().progress;
                let sync = p.active.load(Ordering::SeqCst).then(|| {
                    let total = p.total.load(Ordering::Relaxed);
                    let secs = p
                        .started
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .map_or(0.0, |t| t.elapsed().as_secs_f64());
                    SyncProgress {
                        total,
                        done: p.done.load(Ordering::Relaxed).min(total),
                        msecs: (secs * 1000.0) as u64,
                    }
                });
                Some(Activity {
                    status: if primary.replicator().is_connected() {
                        "complete"
                    } else {
                        "degraded"
                    }
                    .into(),
                    dirty: c.dirty.saturating_mul(u64::from(extentsize)),
                    extentsize,
                    keepdirty,
                    requests: c.requests,
                    // idle: requests are not pooled, so there is no idle queue.
                    queues: Queues {
                        idle: 0,
                        local: c.q_local + c.q_held,
                        send: c.q_send,
                        recv: c.q_recv,
                        done: c.q_done,
                    },
                    sync,
                })
            }
        };
        st
    }
}

impl Drop for Resource {
    /// Last resort when a resource is dropped without [`Resource::shutdown`]:
    /// the export stops in the background, the provider is flushed.
    fn drop(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        let (provider, md) = match active {
            Active::Primary {
                provider,
                md,
                primary,
            } => {
                drop(primary);
                (provider, md)
            }
            Active::Secondary {
                provider,
                md,
                mut sec,
            } => {
                sec.stop_session();
                (Some(provider), md)
            }
        };
        Self::close(provider, &md, Role::Undef, &self.cfg);
    }
}

/// IP equality that sees an IPv4-mapped IPv6 address as its IPv4 address.
fn same_ip(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    let canon = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    canon(a) == canon(b)
}

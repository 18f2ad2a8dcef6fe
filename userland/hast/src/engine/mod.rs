//! The hastd engine: owns the configuration, the resources and their roles,
//! the control socket (and its event watchers, [`watch`]), the metrics
//! server, the pidfile, and the reaction to signals (SIGHUP reloads the
//! configuration with the reference's rules; SIGINT and SIGTERM stop
//! cleanly).

pub mod admission;
pub mod control_server;
pub mod credentials;
pub mod link;
pub mod listen;
pub mod peer;
pub mod primary;
pub mod probe;
pub mod reload;
pub mod resource;
pub mod secondary;
pub mod transport;
pub mod watch;

use std::path::PathBuf;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::{Config, HostIdentity, ResourceConfig};
use crate::control::role::{RoleEntry, RoleReply};
use crate::control::status::{Entry, EntryError, StatusReply};
use crate::control::{parse_request, Extension, EHAST_NOENTRY};
use crate::metrics::expose::ResourceSample;
use crate::metrics::http::{MetricsListener, MetricsServer, ScrapeRequest};
use crate::nv::Nv;
use crate::pidfile::Pidfile;
use crate::role::Role;
use control_server::{ControlListener, ControlRequest};
use listen::{Incoming, Listeners, TlsSlot};
use resource::Resource;

/// Safe promotion: refuse a copy whose synchronization from the peer did
/// not finish; ask the peer, refuse if it is primary or newer. Runs apart
/// from the main loop (the probe can wait seconds for the peer).
async fn safe_to_promote(cfg: ResourceConfig, md: MetadataSource) -> Result<(), probe::Refusal> {
    let md = match md {
        MetadataSource::Known(md) => md,
        MetadataSource::Read => {
            let path = cfg.local.clone();
            let name = cfg.name.clone();
            let read = tokio::task::spawn_blocking(move || {
                let p = crate::provider::Provider::open(&path, false).ok()?;
                crate::metadata::Metadata::read(&p, &name).ok()
            })
            .await;
            match read {
                Ok(Some(md)) => md,
                // Metadata unreadable: set_role reports that.
                _ => return Ok(()),
            }
        }
    };
    if md.syncing {
        return Err(probe::Refusal::Inconsistent);
    }
    let ours = crate::splitbrain::Counters {
        resuid: md.resuid,
        localcnt: md.localcnt,
        remotecnt: md.remotecnt,
    };
    let peer = probe::probe(&cfg).await;
    tracing::info!("[{}] peer before promotion: {peer:?}", cfg.name);
    probe::decide(&peer, ours, &cfg.remote)
}

/// Where a promotion check finds the metadata: in memory (an active
/// resource), or on the provider (a resource in init).
enum MetadataSource {
    Known(crate::metadata::Metadata),
    Read,
}

/// A SETROLE request whose promotion checks ran apart from the main loop;
/// the main loop finishes it.
struct PendingRole {
    reply: tokio::sync::oneshot::Sender<Nv>,
    new: Role,
    force: bool,
    names: Vec<String>,
    /// The resources that may not become primary, and why.
    refusals: Vec<(String, probe::Refusal)>,
}

/// How the daemon was started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration file (`-c`), re-read on SIGHUP.
    pub config_path: PathBuf,
    /// Which `on` blocks are this node (`--node` or the real host).
    pub host: HostIdentity,
    /// `-P`: a pidfile that overrides the configuration's.
    pub pidfile_override: Option<PathBuf>,
}

impl Options {
    /// The pidfile to use with `cfg`.
    pub fn pidfile_for(&self, cfg: &Config) -> PathBuf {
        self.pidfile_override
            .clone()
            .unwrap_or_else(|| cfg.pidfile.clone())
    }
}

/// The running daemon's state. Only the main loop touches it, so role
/// changes, status requests and reloads are serialized.
pub struct Daemon {
    opts: Options,
    cfg: Config,
    resources: Vec<Resource>,
    pidfile: Pidfile,
    control: Option<ControlListener>,
    listeners: Option<Listeners>,
    listen_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The node's TLS server side (this node's key), shared with the
    /// listeners and replaced on reload.
    tls: TlsSlot,
    /// The metrics address bound before the daemon forked, until served.
    metrics_listener: Option<MetricsListener>,
    metrics: Option<MetricsServer>,
}

/// The live control socket: its accept task and its path (Unix sockets).
struct Serving {
    task: tokio::task::JoinHandle<()>,
    path: Option<PathBuf>,
}

impl Serving {
    fn stop(self) {
        self.task.abort();
        if let Some(path) = &self.path {
            control_server::remove_socket(path);
        }
    }
}

impl Daemon {
    /// A daemon for `cfg` (with its credentials loaded by
    /// [`credentials::load`], which gave `tls`) whose pidfile is locked and
    /// control socket bound. Every resource starts in role init.
    pub fn new(
        opts: Options,
        cfg: Config,
        tls: credentials::ServerTls,
        pidfile: Pidfile,
        control: ControlListener,
        listeners: Listeners,
    ) -> Daemon {
        let resources: Vec<Resource> = cfg.resources.iter().cloned().map(Resource::new).collect();
        for r in &resources {
            r.metrics().set_enabled(cfg.metrics.is_some());
        }
        Daemon {
            opts,
            cfg,
            resources,
            pidfile,
            control: Some(control),
            listeners: Some(listeners),
            listen_tasks: Vec::new(),
            tls: std::sync::Arc::new(std::sync::RwLock::new(tls)),
            metrics_listener: None,
            metrics: None,
        }
    }

    /// Serve metrics on `listener` (the configuration's `metrics` address,
    /// bound before the daemon forked). Without it, [`Daemon::run`] binds
    /// the address itself.
    pub fn with_metrics(mut self, listener: MetricsListener) -> Daemon {
        self.metrics_listener = Some(listener);
        self
    }

    /// Start serving metrics when the configuration asks for them.
    fn start_metrics(&mut self, scrapes: &mpsc::Sender<ScrapeRequest>) {
        let Some(addr) = self.cfg.metrics.clone() else {
            self.metrics = None;
            return;
        };
        let listener = match self.metrics_listener.take() {
            Some(l) if *l.addr() == addr => Ok(l),
            _ => MetricsListener::bind(&addr),
        };
        match listener.and_then(|l| l.serve(scrapes.clone())) {
            Ok(server) => self.metrics = Some(server),
            Err(e) => tracing::error!("{e}; metrics are not served"),
        }
    }

    /// After a reload: serve metrics at the new address (or stop), and
    /// record them for the resources (or not).
    fn reload_metrics(
        &mut self,
        old: Option<crate::addr::Addr>,
        scrapes: &mpsc::Sender<ScrapeRequest>,
    ) {
        let on = self.cfg.metrics.is_some();
        for r in &self.resources {
            r.metrics().set_enabled(on);
        }
        if old == self.cfg.metrics && (self.metrics.is_some() || !on) {
            return;
        }
        // The old server releases its address before the new one binds it.
        self.metrics = None;
        self.start_metrics(scrapes);
    }

    /// A scrape: every resource's status and recorded metrics.
    fn scrape(&self, req: ScrapeRequest) {
        let samples = self
            .resources
            .iter()
            .map(|r| ResourceSample {
                name: r.name().to_string(),
                status: r.status(),
                recorded: r.metrics().snapshot(),
            })
            .collect();
        let _ = req.reply.send(samples);
    }

    /// Serve until SIGINT or SIGTERM; returns the process exit code.
    pub async fn run(mut self) -> i32 {
        // The handlers first: a SIGTERM sent as soon as the control socket
        // answers must stop the daemon cleanly, not kill it.
        let signals = (
            signal(SignalKind::hangup()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        );
        let (mut hup, mut int, mut term) = match signals {
            (Ok(h), Ok(i), Ok(t)) => (h, i, t),
            _ => {
                tracing::error!("unable to install signal handlers");
                return crate::sysexits::EX_OSERR;
            }
        };
        let (tx, mut rx) = mpsc::channel::<ControlRequest>(64);
        let (itx, mut irx) = mpsc::channel::<Incoming>(64);
        let (ptx, mut prx) = mpsc::channel::<PendingRole>(16);
        let (stx, mut srx) = mpsc::channel::<ScrapeRequest>(16);
        self.start_metrics(&stx);
        if let Some(l) = self.listeners.take() {
            self.listen_tasks = l.serve(itx.clone(), self.tls.clone());
        }
        let mut serving = match self.start_serving(&tx) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("unable to serve the control socket: {e}");
                return crate::sysexits::EX_OSERR;
            }
        };
        tracing::info!(
            "started successfully, running protocol version {}",
            crate::proto::HAST_PROTO_VERSION
        );
        loop {
            tokio::select! {
                Some(req) = rx.recv() => self.request(req, &ptx),
                Some(pending) = prx.recv() => self.finish_setrole(pending).await,
                Some(inc) = irx.recv() => self.incoming(inc).await,
                Some(scrape) = srx.recv() => self.scrape(scrape),
                _ = hup.recv() => {
                    let old_metrics = self.cfg.metrics.clone();
                    let (new_control, new_listeners) = self.reload().await;
                    self.reload_metrics(old_metrics, &stx);
                    if let Some(l) = new_listeners {
                        for t in self.listen_tasks.drain(..) {
                            t.abort();
                        }
                        self.listen_tasks = l.serve(itx.clone(), self.tls.clone());
                    }
                    if let Some(new_control) = new_control {
                        self.control = Some(new_control);
                        match self.start_serving(&tx) {
                            Ok(s) => {
                                let old = std::mem::replace(&mut serving, s);
                                old.stop();
                            }
                            Err(e) => tracing::error!("unable to serve the new control socket: {e}"),
                        }
                    }
                }
                _ = int.recv() => break,
                _ = term.recv() => break,
            }
        }
        tracing::info!("termination signal received, exiting");
        self.metrics = None;
        serving.stop();
        for t in self.listen_tasks.drain(..) {
            t.abort();
        }
        for res in &mut self.resources {
            res.shutdown().await;
        }
        self.resources.clear();
        tracing::debug!(pidfile = %self.pidfile.path().display(), "removing pidfile");
        0
    }

    fn start_serving(&mut self, tx: &mpsc::Sender<ControlRequest>) -> std::io::Result<Serving> {
        let listener = self
            .control
            .take()
            .ok_or_else(|| std::io::Error::other("no control socket bound"))?;
        let (task, path) = listener.serve(tx.clone())?;
        Ok(Serving { task, path })
    }

    /// A replication connection from a primary, with its first header.
    /// Once the header names the resource, the connection must have what
    /// the resource's `security` requires ([`admission::admit`]).
    async fn incoming(&mut self, inc: Incoming) {
        use crate::handshake::{Attach, Hello, Welcome};
        let Incoming {
            mut stream,
            peer,
            header,
        } = inc;
        // The resources whose `remote` is this peer.
        let mut allowed = Vec::new();
        for (i, r) in self.resources.iter().enumerate() {
            if r.accepts_from(peer.ip()).await {
                allowed.push(i);
            }
        }
        if allowed.is_empty() {
            tracing::error!("client {peer} isn't known (no resource has it as remote)");
            return;
        }
        let refuse = |msg: &str| Welcome::Refused {
            errmsg: msg.to_string(),
            wait: false,
        };
        // The resource a header names, if it exists and admits this peer
        // (`Err(true)`: it exists but does not).
        let find = |resources: &[Resource], name: &str| -> Result<usize, bool> {
            match resources.iter().position(|r| r.name() == name) {
                Some(i) if allowed.contains(&i) => Ok(i),
                Some(_) => Err(true),
                None => Err(false),
            }
        };
        if header.get("token").is_some() {
            let attach = match Attach::from_nv(&header) {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!("bad handshake header from {peer}: {e}");
                    return;
                }
            };
            match find(&self.resources, &attach.resource) {
                Ok(i) => {
                    let res = &mut self.resources[i];
                    let admitted = admission::admit(res.config(), &stream, attach.mac.is_some());
                    res.attach(stream, peer, attach, admitted)
                }
                Err(_) => tracing::error!(
                    "client {peer} has no access to resource {:?}",
                    attach.resource
                ),
            }
            return;
        }
        if header.get_u8("probe") == Some(1) {
            let name = header.get_string("resource").unwrap_or("");
            // A malformed challenge counts as none (refused where needed).
            let nonce = Hello::from_nv(&header).ok().and_then(|h| h.nonce);
            let answer = match find(&self.resources, name) {
                Ok(i) => {
                    let res = &self.resources[i];
                    match admission::admit(res.config(), &stream, nonce.is_some()) {
                        Err(refusal) => {
                            tracing::error!(
                                "[{name}] promotion probe from {peer} refused: {refusal}"
                            );
                            refuse(&refusal.to_string()).to_nv()
                        }
                        Ok(_) => match res.probe_counters().await {
                            Ok(c) => probe::answer_for(res.config(), nonce, res.role(), c),
                            Err(e) => refuse(&format!("Cannot read metadata: {e}")).to_nv(),
                        },
                    }
                }
                Err(_) => refuse("Resource not configured.").to_nv(),
            };
            tracing::info!("promotion probe from {peer} for {name:?} answered");
            let _ = crate::proto::write_frame_async(&mut stream, &answer, &[]).await;
            return;
        }
        let hello = match Hello::from_nv(&header) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("bad handshake header from {peer}: {e}");
                return;
            }
        };
        let answer = match find(&self.resources, &hello.resource) {
            Err(false) => {
                tracing::error!("no resource {:?} as requested by {peer}", hello.resource);
                refuse("Resource not configured.")
            }
            Err(true) => {
                tracing::error!("client {peer} has no access to resource {}", hello.resource);
                refuse("No access to the resource.")
            }
            Ok(i) => {
                let res = &mut self.resources[i];
                match admission::admit(res.config(), &stream, hello.nonce.is_some()) {
                    Ok(info) => {
                        res.hello(stream, peer, info, hello.nonce).await;
                        return;
                    }
                    Err(refusal) => {
                        tracing::error!(
                            "[{}] connection from {peer} refused: {refusal}",
                            hello.resource
                        );
                        refuse(&refusal.to_string())
                    }
                }
            }
        };
        let _ = crate::proto::write_frame_async(&mut stream, &answer.to_nv(), &[]).await;
    }

    /// Answer one control request. A request without `cmd` is dropped
    /// unanswered (the connection closes), as the reference does. A SETROLE
    /// that promotes checks the peers apart from the main loop and is
    /// finished by [`Daemon::finish_setrole`].
    fn request(&mut self, req: ControlRequest, pending: &mpsc::Sender<PendingRole>) {
        let ControlRequest { nv: req, reply } = req;
        let cmd = match parse_request(&req) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                // A request without `cmd` is dropped unanswered.
                if let Some(out) = e.reply() {
                    let _ = reply.send(out);
                }
                return;
            }
        };
        let mut out = Nv::new();
        let (role, force) = (cmd.role, cmd.force);
        let reconnect = cmd.extension == Some(Extension::Reconnect);
        let names: Vec<String> = match cmd.resources {
            None => self
                .resources
                .iter()
                .map(|r| r.name().to_string())
                .collect(),
            Some(names) => names,
        };
        if reconnect {
            let reply_nv = RoleReply {
                entries: names
                    .into_iter()
                    .map(|name| {
                        let found = self.resources.iter().find(|r| r.name() == name);
                        let error = match found {
                            None => Some(unknown_resource(&name)),
                            Some(res) => res.reconnect().err().map(|message| EntryError {
                                code: crate::sysexits::EX_UNAVAILABLE as i16,
                                message: Some(message),
                            }),
                        };
                        RoleEntry {
                            old_role: found.map(|r| r.role().as_str().to_string()),
                            name,
                            error,
                        }
                    })
                    .collect(),
            };
            reply_nv.to_nv(&mut out);
            let _ = reply.send(out);
            return;
        }
        // STATUS, and the state EVENTS starts with.
        let Some(new) = role else {
            let status = StatusReply {
                entries: names
                    .into_iter()
                    .map(|name| {
                        let status = match self.resources.iter().find(|r| r.name() == name) {
                            Some(res) => Ok(res.status()),
                            None => Err(unknown_resource(&name)),
                        };
                        Entry { name, status }
                    })
                    .collect(),
            };
            status.to_nv(&mut out);
            let _ = reply.send(out);
            return;
        };
        let checks: Vec<(ResourceConfig, MetadataSource)> = if new == Role::Primary && !force {
            names
                .iter()
                .filter_map(|n| self.resources.iter().find(|r| r.name() == n))
                .filter(|r| r.role() != Role::Primary)
                .map(|r| {
                    let md = match r.metadata_in_memory() {
                        Some(md) => MetadataSource::Known(md),
                        None => MetadataSource::Read,
                    };
                    (r.config().clone(), md)
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut role_req = PendingRole {
            reply,
            new,
            force,
            names,
            refusals: Vec::new(),
        };
        let pending = pending.clone();
        tokio::spawn(async move {
            for (cfg, md) in checks {
                let name = cfg.name.clone();
                if let Err(refusal) = safe_to_promote(cfg, md).await {
                    tracing::error!("[{name}] refusing to become primary: {refusal}");
                    role_req.refusals.push((name, refusal));
                }
            }
            let _ = pending.send(role_req).await;
        });
    }

    /// Change the roles of a SETROLE request whose checks are done, and
    /// answer it.
    async fn finish_setrole(&mut self, pending: PendingRole) {
        let PendingRole {
            reply,
            new,
            force,
            names,
            refusals,
        } = pending;
        let mut out = RoleReply::default();
        for name in names {
            let Some(res) = self.resources.iter_mut().find(|r| r.name() == name) else {
                let error = Some(unknown_resource(&name));
                out.entries.push(RoleEntry {
                    name,
                    old_role: None,
                    error,
                });
                continue;
            };
            let old_role = Some(res.role().as_str().to_string());
            let refused = refusals.iter().find(|(n, _)| *n == name);
            let error = match refused {
                // A resource that became primary meanwhile needs no check.
                Some((_, refusal)) if res.role() != Role::Primary => Some(EntryError {
                    code: crate::sysexits::EX_TEMPFAIL as i16,
                    message: Some(refusal.to_string()),
                }),
                _ => {
                    let mut result = res.set_role(new).await;
                    if result.is_ok() && new == Role::Primary && force {
                        result = res.accept_inconsistent_copy().await;
                    }
                    result.err().map(|e| EntryError {
                        code: e.code(),
                        message: Some(e.to_string()),
                    })
                }
            };
            out.entries.push(RoleEntry {
                name,
                old_role,
                error,
            });
        }
        let mut nv = Nv::new();
        out.to_nv(&mut nv);
        let _ = reply.send(nv);
    }
}

/// The error of a request naming a resource that is not configured.
fn unknown_resource(name: &str) -> EntryError {
    EntryError {
        code: EHAST_NOENTRY,
        message: Some(format!("no resource {name} in the configuration")),
    }
}

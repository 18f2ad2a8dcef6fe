//! The hastd engine: owns the configuration, the resources and their roles,
//! the control socket, the pidfile, and the reaction to signals (SIGHUP
//! reloads the configuration with the reference's rules; SIGINT and SIGTERM
//! stop cleanly).

pub mod control_server;
pub mod link;
pub mod listen;
pub mod primary;
pub mod probe;
pub mod reload;
pub mod resource;
pub mod secondary;

use std::path::PathBuf;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config::{Config, HostIdentity};
use crate::control::{parse_request, EHAST_NOENTRY};
use crate::nv::Nv;
use crate::pidfile::Pidfile;
use crate::role::Role;
use control_server::{ControlListener, Request};
use listen::{Incoming, Listeners};
use resource::Resource;

/// Safe promotion: refuse a copy whose synchronization from the peer did
/// not finish; ask the peer, refuse if it is primary or newer.
async fn safe_to_promote(res: &Resource) -> Result<(), probe::Refusal> {
    let Ok(md) = res.metadata() else {
        // Metadata unreadable: set_role reports that.
        return Ok(());
    };
    if md.syncing {
        return Err(probe::Refusal::Inconsistent);
    }
    let ours = crate::splitbrain::Counters {
        resuid: md.resuid,
        localcnt: md.localcnt,
        remotecnt: md.remotecnt,
    };
    let peer = probe::probe(res.config()).await;
    tracing::info!("[{}] peer before promotion: {peer:?}", res.name());
    probe::decide(&peer, ours, &res.config().remote)
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
    /// A daemon for `cfg` whose pidfile is locked and control socket bound.
    /// Every resource starts in role init.
    pub fn new(
        opts: Options,
        cfg: Config,
        pidfile: Pidfile,
        control: ControlListener,
        listeners: Listeners,
    ) -> Daemon {
        let resources = cfg.resources.iter().cloned().map(Resource::new).collect();
        Daemon {
            opts,
            cfg,
            resources,
            pidfile,
            control: Some(control),
            listeners: Some(listeners),
            listen_tasks: Vec::new(),
        }
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
        let (tx, mut rx) = mpsc::channel::<Request>(64);
        let (itx, mut irx) = mpsc::channel::<Incoming>(64);
        if let Some(l) = self.listeners.take() {
            self.listen_tasks = l.serve(itx.clone());
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
                Some(req) = rx.recv() => {
                    if let Some(reply) = self.handle(&req.nv).await {
                        let _ = req.reply.send(reply);
                    }
                }
                Some(inc) = irx.recv() => self.incoming(inc).await,
                _ = hup.recv() => {
                    let (new_control, new_listeners) = self.reload().await;
                    if let Some(l) = new_listeners {
                        for t in self.listen_tasks.drain(..) {
                            t.abort();
                        }
                        self.listen_tasks = l.serve(itx.clone());
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

    fn start_serving(&mut self, tx: &mpsc::Sender<Request>) -> std::io::Result<Serving> {
        let listener = self
            .control
            .take()
            .ok_or_else(|| std::io::Error::other("no control socket bound"))?;
        let (task, path) = listener.serve(tx.clone())?;
        Ok(Serving { task, path })
    }

    /// A replication connection from a primary, with its first header.
    async fn incoming(&mut self, inc: Incoming) {
        use crate::handshake::{Attach, Hello, Welcome};
        let Incoming {
            mut stream,
            peer,
            header,
        } = inc;
        if !self.resources.iter().any(|r| r.accepts_from(peer.ip())) {
            tracing::error!("client {peer} isn't known (no resource has it as remote)");
            return;
        }
        let refuse = |msg: &str| Welcome::Refused {
            errmsg: msg.to_string(),
            wait: false,
        };
        if header.get("token").is_some() {
            let attach = match Attach::from_nv(&header) {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!("bad handshake header from {peer}: {e}");
                    return;
                }
            };
            match self
                .resources
                .iter_mut()
                .find(|r| r.name() == attach.resource)
            {
                Some(res) if res.accepts_from(peer.ip()) => res.attach(stream, peer, attach),
                _ => tracing::error!(
                    "client {peer} has no access to resource {:?}",
                    attach.resource
                ),
            }
            return;
        }
        if header.get_u8("probe") == Some(1) {
            let name = header.get_string("resource").unwrap_or("");
            let answer = match self.resources.iter().find(|r| r.name() == name) {
                Some(res) if res.accepts_from(peer.ip()) => match res.probe_counters() {
                    Ok(c) => probe::answer(res.role(), c),
                    Err(e) => refuse(&format!("Cannot read metadata: {e}")).to_nv(),
                },
                _ => refuse("Resource not configured.").to_nv(),
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
        let answer = match self
            .resources
            .iter_mut()
            .find(|r| r.name() == hello.resource)
        {
            None => {
                tracing::error!("no resource {:?} as requested by {peer}", hello.resource);
                refuse("Resource not configured.")
            }
            Some(res) if !res.accepts_from(peer.ip()) => {
                tracing::error!("client {peer} has no access to resource {}", hello.resource);
                refuse("No access to the resource.")
            }
            Some(res) => {
                res.hello(stream, peer).await;
                return;
            }
        };
        let _ = crate::proto::write_frame_async(&mut stream, &answer.to_nv(), &[]).await;
    }

    /// Answer one control request; None closes the connection unanswered
    /// (a request without `cmd`, as the reference does).
    async fn handle(&mut self, req: &Nv) -> Option<Nv> {
        let parsed = match parse_request(req) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("{e}");
                return e.reply();
            }
        };
        let mut out = Nv::new();
        let (role, force) = (parsed.role, parsed.force);
        let names: Vec<String> = match parsed.resources {
            None => self
                .resources
                .iter()
                .map(|r| r.name().to_string())
                .collect(),
            Some(names) => names,
        };
        for (no, name) in names.iter().enumerate() {
            out.add_string(format!("resource{no}"), name.as_str());
            let Some(res) = self.resources.iter_mut().find(|r| r.name() == name) else {
                out.add_i16(format!("error{no}"), EHAST_NOENTRY);
                out.add_string(
                    format!("errmsg{no}"),
                    format!("no resource {name} in the configuration"),
                );
                continue;
            };
            match role {
                Some(new) => {
                    out.add_string(format!("role{no}"), res.role().as_str());
                    if new == Role::Primary && res.role() != Role::Primary && !force {
                        if let Err(refusal) = safe_to_promote(res).await {
                            tracing::error!("[{name}] refusing to become primary: {refusal}");
                            out.add_i16(format!("error{no}"), crate::sysexits::EX_TEMPFAIL as i16);
                            out.add_string(format!("errmsg{no}"), refusal.to_string());
                            continue;
                        }
                    }
                    let mut result = res.set_role(new).await;
                    if result.is_ok() && new == Role::Primary && force {
                        result = res.accept_inconsistent_copy().await;
                    }
                    if let Err(e) = result {
                        out.add_i16(format!("error{no}"), e.code());
                        out.add_string(format!("errmsg{no}"), e.to_string());
                    }
                }
                None => res.status_into(&mut out, no),
            }
        }
        Some(out)
    }
}

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
use crate::control::role::{RoleEntry, RoleReply};
use crate::control::status::{Entry, EntryError, StatusReply};
use crate::control::{
    resource_names, EHAST_INVALID, EHAST_NOENTRY, EHAST_UNIMPLEMENTED, HASTCTL_CMD_SETROLE,
    HASTCTL_CMD_STATUS,
};
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
        let cmd = req.get_u8("cmd").unwrap_or(0);
        if cmd == 0 {
            tracing::error!("control header is missing the 'cmd' field");
            return None;
        }
        let mut out = Nv::new();
        let Some(first) = req.get_string("resource0") else {
            tracing::error!("control header is missing the 'resource0' field");
            out.add_i16("error", EHAST_INVALID);
            return Some(out);
        };
        let role = match cmd {
            HASTCTL_CMD_SETROLE => match req.get_u8("role").and_then(Role::from_u8) {
                Some(r @ (Role::Init | Role::Primary | Role::Secondary)) => Some(r),
                _ => {
                    tracing::error!("invalid role received ({:?})", req.get("role"));
                    out.add_i16("error", EHAST_INVALID);
                    return Some(out);
                }
            },
            HASTCTL_CMD_STATUS => None,
            _ => {
                tracing::error!("invalid command received ({cmd})");
                out.add_i16("error", EHAST_UNIMPLEMENTED);
                return Some(out);
            }
        };
        // Extension: `force` skips the safe-promotion check.
        let force = req.get_u8("force") == Some(1);
        let names: Vec<String> = if first == "all" {
            self.resources
                .iter()
                .map(|r| r.name().to_string())
                .collect()
        } else {
            resource_names(req)
        };
        let unknown = |name: &str| EntryError {
            code: EHAST_NOENTRY,
            message: Some(format!("no resource {name} in the configuration")),
        };
        let Some(new) = role else {
            let reply = StatusReply {
                entries: names
                    .into_iter()
                    .map(|name| {
                        let status = match self.resources.iter().find(|r| r.name() == name) {
                            Some(res) => Ok(res.status()),
                            None => Err(unknown(&name)),
                        };
                        Entry { name, status }
                    })
                    .collect(),
            };
            reply.to_nv(&mut out);
            return Some(out);
        };
        let mut reply = RoleReply::default();
        for name in names {
            let Some(res) = self.resources.iter_mut().find(|r| r.name() == name) else {
                let error = Some(unknown(&name));
                reply.entries.push(RoleEntry {
                    name,
                    old_role: None,
                    error,
                });
                continue;
            };
            let old_role = Some(res.role().as_str().to_string());
            let mut error = None;
            if new == Role::Primary && res.role() != Role::Primary && !force {
                if let Err(refusal) = safe_to_promote(res).await {
                    tracing::error!("[{name}] refusing to become primary: {refusal}");
                    error = Some(EntryError {
                        code: crate::sysexits::EX_TEMPFAIL as i16,
                        message: Some(refusal.to_string()),
                    });
                }
            }
            if error.is_none() {
                let mut result = res.set_role(new).await;
                if result.is_ok() && new == Role::Primary && force {
                    result = res.accept_inconsistent_copy().await;
                }
                error = result.err().map(|e| EntryError {
                    code: e.code(),
                    message: Some(e.to_string()),
                });
            }
            reply.entries.push(RoleEntry {
                name,
                old_role,
                error,
            });
        }
        reply.to_nv(&mut out);
        Some(out)
    }
}

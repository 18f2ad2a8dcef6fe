//! One hastd process of the harness: started in the foreground (`-F -d`)
//! with its output appended to a log file, in a network namespace or here,
//! waited for until it says it started, then signalled, stopped or killed
//! and reaped; `hastctl` run for it in the same place. The single-node
//! tests use it directly ([`crate::Node`] is this type) and
//! [`crate::cluster::Cluster`] runs each of its nodes through it, so a
//! daemon is started, watched and stopped the same way everywhere.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::Run;

/// One hastd of the harness; killed and reaped when dropped.
#[derive(Debug)]
pub struct Daemon {
    /// The node name (`--node`).
    pub name: String,
    /// The configuration file.
    pub conf: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
    /// Its pidfile.
    pub pidfile: PathBuf,
    /// Where its standard output and error go (appended).
    pub log: PathBuf,
    hastd: PathBuf,
    hastctl: PathBuf,
    netns: Option<String>,
    env: Vec<(String, OsString)>,
    child: Option<Child>,
}

/// hastd did not come up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the log {path}: {source}", path = path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot spawn {program} for node {node}: {source}", program = program.display())]
    Spawn {
        program: PathBuf,
        node: String,
        #[source]
        source: io::Error,
    },
    /// It exited, or did not say it started within the time given; it
    /// has been killed. `log` is its log.
    #[error("hastd --node {node} did not come up within {secs} s; log:\n{log}")]
    NotUp {
        node: String,
        secs: u64,
        log: String,
    },
}

impl Daemon {
    /// Node `name` of `conf`, whose control socket, pidfile and log are
    /// `dir/NAME.ctl`, `dir/NAME.pid` and `dir/NAME.log` (the configuration
    /// must say so), run from the workspace's binaries, here.
    pub fn new(dir: &Path, conf: &Path, name: &str) -> Daemon {
        let mut d = Daemon::with_paths(
            name,
            conf,
            &dir.join(format!("{name}.ctl")),
            &dir.join(format!("{name}.log")),
            &crate::bin_dir(),
        );
        d.pidfile = dir.join(format!("{name}.pid"));
        d.env(
            hast::kshim::ENV,
            if crate::kernel_host_selected() {
                "1"
            } else {
                "0"
            },
        );
        d
    }

    /// Node `name` of `conf` with its control socket and log where given,
    /// hastd and hastctl from `bin` (no environment set, here).
    pub fn with_paths(name: &str, conf: &Path, control: &Path, log: &Path, bin: &Path) -> Daemon {
        Daemon {
            name: name.to_owned(),
            conf: conf.to_path_buf(),
            control: control.to_path_buf(),
            pidfile: PathBuf::new(),
            log: log.to_path_buf(),
            hastd: bin.join("hastd"),
            hastctl: bin.join("hastctl"),
            netns: None,
            env: Vec::new(),
            child: None,
        }
    }

    /// Run hastd and hastctl in network namespace `ns` (`ip netns exec`).
    pub fn in_netns(&mut self, ns: Option<String>) -> &mut Daemon {
        self.netns = ns;
        self
    }

    /// Set `key` in hastd's environment.
    pub fn env(&mut self, key: &str, value: impl Into<OsString>) -> &mut Daemon {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// A command that runs `program` where this daemon runs.
    pub fn command(&self, program: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.arg("netns").arg("exec").arg(ns).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// Spawn hastd with `extra` arguments, its output appended to the log;
    /// the caller owns the child (see [`Daemon::start`] for a managed one).
    pub fn spawn(&self, extra: &[&str]) -> Result<Child, StartError> {
        let log_err = |source| StartError::Log {
            path: self.log.clone(),
            source,
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(log_err)?;
        let log2 = log.try_clone().map_err(log_err)?;
        let mut cmd = self.command(&self.hastd);
        cmd.arg("-F")
            .arg("-d")
            .arg("-c")
            .arg(&self.conf)
            .arg("--node")
            .arg(&self.name)
            .args(extra);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| StartError::Spawn {
                program: self.hastd.clone(),
                node: self.name.clone(),
                source,
            })
    }

    /// [`Daemon::spawn`], for a test: panics when hastd cannot be spawned.
    pub fn spawn_hastd(&self, extra: &[&str]) -> Child {
        self.spawn(extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Daemon::try_start`] with 30 s, for a test: panics with the log
    /// when hastd does not come up.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start(Duration::from_secs(30)) {
            panic!("{e}");
        }
    }

    /// Start hastd and wait (`timeout` at most) until it logs that it
    /// started (signal handlers in place, control socket served) and its
    /// control socket accepts; a daemon that does not is killed.
    pub fn try_start(&mut self, timeout: Duration) -> Result<(), StartError> {
        let before = crate::hastd_starts(&self.log_text());
        self.child = Some(self.spawn(&[])?);
        let start = Instant::now();
        loop {
            if crate::hastd_starts(&self.log_text()) > before
                && std::os::unix::net::UnixStream::connect(&self.control).is_ok()
            {
                return Ok(());
            }
            if !self.running() || start.elapsed() > timeout {
                self.kill9();
                return Err(StartError::NotUp {
                    node: self.name.clone(),
                    secs: timeout.as_secs(),
                    log: self.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Daemon::try_hastctl`], for a test: panics when hastctl cannot be
    /// run at all.
    pub fn hastctl(&self, cmd: &str, args: &[&str]) -> Run {
        self.try_hastctl(cmd, args)
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.hastctl.display()))
    }

    /// Run `hastctl CMD -c CONF --node NAME ARGS...` where the daemon runs.
    pub fn try_hastctl(&self, cmd: &str, args: &[&str]) -> io::Result<Run> {
        self.hastctl_command(cmd, args)
            .stdin(Stdio::null())
            .output()
            .map(Run::from)
    }

    /// The command [`Daemon::try_hastctl`] runs, to spawn it otherwise
    /// (an empty `cmd` is left out).
    pub fn hastctl_command(&self, cmd: &str, args: &[&str]) -> Command {
        let mut c = self.command(&self.hastctl);
        if !cmd.is_empty() {
            c.arg(cmd);
        }
        c.arg("-c")
            .arg(&self.conf)
            .arg("--node")
            .arg(&self.name)
            .args(args);
        c
    }

    /// The daemon's pid, if it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Send `sig` to the daemon (nothing when it does not run).
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a child this harness spawned and has not
            // reaped.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Send `sig`, wait up to `limit` for the exit and reap; after that,
    /// SIGKILL. The exit status when it exited in time, None when it did
    /// not run or had to be killed.
    pub fn stop_with(&mut self, sig: i32, limit: Duration) -> Option<ExitStatus> {
        self.signal(sig);
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if start.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    /// SIGTERM and wait ([`crate::STOP_LIMIT`] at most) for the exit
    /// status; None (and SIGKILL) when it did not exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_with(libc::SIGTERM, crate::STOP_LIMIT)
    }

    /// SIGKILL (no cleanup of any kind on its side) and reap; the exit
    /// status.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

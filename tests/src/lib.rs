//! Harness for the integration tests: real hastd and hastctl processes run
//! from one configuration with `--node`, each node with its own control
//! socket, pidfile and file-backed provider in a temporary directory.
//! Everything started is stopped when the harness is dropped.

pub mod checker;
pub mod cluster;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory that holds the workspace's built binaries (the test
/// executable lives in its `deps/` subdirectory).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let deps = exe.parent().expect("test executable has a directory");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    };
    for b in ["hastd", "hastctl"] {
        assert!(
            dir.join(b).exists(),
            "{} not built: run `cargo build --workspace` (make test does) before the tests",
            dir.join(b).display()
        );
    }
    dir
}

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Result of a command: exit code and output as text.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Create a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = fs::File::create(path).expect("create provider file");
    f.set_len(size).expect("size provider file");
}

/// An executable hook script that appends its arguments, one call per line,
/// to `log`.
pub fn hook_script(dir: &Path, log: &Path) -> PathBuf {
    let path = dir.join("hook.sh");
    let mut f = fs::File::create(&path).expect("create hook");
    writeln!(f, "#!/bin/sh\necho \"$@\" >> {}", log.display()).expect("write hook");
    drop(f);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod hook");
    path
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// One node: a name for `--node`, its control socket and pidfile.
pub struct Node {
    pub name: String,
    pub conf: PathBuf,
    pub control: PathBuf,
    pub pidfile: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// A node `name` of configuration `conf` whose files live in `dir`
    /// (the configuration must put its control socket at
    /// `dir/<name>.ctl` and its pidfile at `dir/<name>.pid`).
    pub fn new(dir: &Path, conf: &Path, name: &str) -> Node {
        Node {
            name: name.to_string(),
            conf: conf.to_path_buf(),
            control: dir.join(format!("{name}.ctl")),
            pidfile: dir.join(format!("{name}.pid")),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    /// Start hastd in the foreground and wait for its control socket.
    pub fn start(&mut self) {
        let child = self.spawn_hastd(&[]);
        self.child = Some(child);
        let ctl = self.control.clone();
        let up = wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&ctl).is_ok()
        });
        if !up {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            panic!("hastd --node {} did not come up; log:\n{log}", self.name);
        }
    }

    /// Spawn hastd for this node with extra arguments, logging to the
    /// node's log file; the caller owns the child.
    pub fn spawn_hastd(&self, extra: &[&str]) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        Command::new(bin("hastd"))
            .arg("-F")
            .arg("-d")
            .arg("-c")
            .arg(&self.conf)
            .arg("--node")
            .arg(&self.name)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn hastd")
    }

    /// Run hastctl `cmd` for this node with `args`.
    pub fn hastctl(&self, cmd: &str, args: &[&str]) -> Run {
        Command::new(bin("hastctl"))
            .arg(cmd)
            .arg("-c")
            .arg(&self.conf)
            .arg("--node")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hastctl")
            .into()
    }

    /// The daemon's pid, if it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Send `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on a child we spawned.
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

    /// SIGTERM and wait (10 s at most) for the daemon's exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on a child we spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

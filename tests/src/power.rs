//! Power-loss disks for the cluster harness: a node's providers live on a
//! `powerfs` FUSE mount (tests/src/bin/powerfs.rs) whose writes stay in a
//! volatile layer until an fsync/fdatasync (or an O_DSYNC write) of the
//! file. Cutting a node's power drops that layer, all of it or a seeded
//! random subset of its 4 KiB units. [`PowerDisk`] starts the file system,
//! talks to its control socket and unmounts it (also when dropped).

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

/// What a power cut loses of the volatile layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Every unit not yet made durable.
    All,
    /// Each unit with probability `permille`/1000, chosen by `seed`; the
    /// others reach the disk (a cache that wrote part of its content).
    Random { seed: u64, permille: u16 },
}

/// Units lost and kept by a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CutResult {
    pub lost: u64,
    pub kept: u64,
}

/// Why a power disk failed.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("powerfs for {mount} did not mount within {secs} s; its log:\n{log}")]
    MountTimeout {
        mount: PathBuf,
        secs: u64,
        log: String,
    },
    #[error("powerfs at {ctl} answered {answer:?} to {request:?}")]
    Control {
        ctl: PathBuf,
        request: String,
        answer: String,
    },
    #[error("/dev/fuse is missing: the power-loss tests need FUSE (modprobe fuse)")]
    NoFuse,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PowerError {
    let what = what.into();
    move |source| PowerError::Io { what, source }
}

/// Whether FUSE can be used here.
pub fn fuse_available() -> bool {
    Path::new("/dev/fuse").exists()
}

/// One mounted powerfs: `backing` holds the real files, `mount` serves them.
#[derive(Debug)]
pub struct PowerDisk {
    backing: PathBuf,
    mount: PathBuf,
    ctl: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl PowerDisk {
    /// Mount `powerfs` (the binary) over `backing` at `mount` (both
    /// created), its control socket and log beside them, and wait until
    /// the mount serves.
    pub fn mount(
        powerfs: &Path,
        backing: &Path,
        mount: &Path,
        ctl: &Path,
        log: &Path,
    ) -> Result<PowerDisk, PowerError> {
        if !fuse_available() {
            return Err(PowerError::NoFuse);
        }
        for d in [backing, mount] {
            fs::create_dir_all(d).map_err(io_err(format!("create {}", d.display())))?;
        }
        let out = fs::File::create(log).map_err(io_err(format!("create {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err("duplicate the log descriptor"))?;
        let child = Command::new(powerfs)
            .arg("--backing")
            .arg(backing)
            .arg("--mount")
            .arg(mount)
            .arg("--control")
            .arg(ctl)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("spawn {}", powerfs.display())))?;
        let mut disk = PowerDisk {
            backing: backing.to_path_buf(),
            mount: mount.to_path_buf(),
            ctl: ctl.to_path_buf(),
            log: log.to_path_buf(),
            child: Some(child),
        };
        let start = Instant::now();
        loop {
            if is_mountpoint(mount) && disk.request("stats").is_ok() {
                return Ok(disk);
            }
            let exited = disk
                .child
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            if exited || start.elapsed() > MOUNT_TIMEOUT {
                let log = fs::read_to_string(&disk.log).unwrap_or_default();
                disk.unmount();
                return Err(PowerError::MountTimeout {
                    mount: mount.to_path_buf(),
                    secs: MOUNT_TIMEOUT.as_secs(),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directory of the real files.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Where the files are served.
    pub fn mount_point(&self) -> &Path {
        &self.mount
    }

    /// Send one control request; its answer after `ok`.
    pub fn request(&self, req: &str) -> Result<String, PowerError> {
        let what = || format!("powerfs control {} ({req})", self.ctl.display());
        let mut s = UnixStream::connect(&self.ctl).map_err(io_err(what()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io_err(what()))?;
        writeln!(s, "{req}").map_err(io_err(what()))?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(io_err(what()))?;
        let line = line.trim().to_string();
        match line.strip_prefix("ok") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(PowerError::Control {
                ctl: self.ctl.clone(),
                request: req.into(),
                answer: line,
            }),
        }
    }

    /// The power goes: drop what `loss` says of the volatile layer.
    pub fn cut(&self, loss: Loss) -> Result<CutResult, PowerError> {
        let req = match loss {
            Loss::All => "drop all".to_string(),
            Loss::Random { seed, permille } => format!("drop {seed} {permille}"),
        };
        let answer = self.request(&req)?;
        let w: Vec<&str> = answer.split_whitespace().collect();
        match w.as_slice() {
            ["lost", l, "kept", k] => Ok(CutResult {
                lost: l.parse().unwrap_or(0),
                kept: k.parse().unwrap_or(0),
            }),
            _ => Err(PowerError::Control {
                ctl: self.ctl.clone(),
                request: req,
                answer,
            }),
        }
    }

    /// Make everything written durable (as after a clean shutdown).
    pub fn sync(&self) -> Result<(), PowerError> {
        self.request("sync").map(drop)
    }

    /// Units written and not yet durable.
    pub fn volatile_units(&self) -> Result<u64, PowerError> {
        let a = self.request("stats")?;
        Ok(a.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    /// Unmount and stop the file system (no-op when done already). What
    /// is still volatile is lost, as at a power cut.
    pub fn unmount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self.request("quit");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_mountpoint(&self.mount) {
            lazy_unmount(&self.mount);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PowerDisk {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Whether `p` is a mount point (listed in /proc/self/mounts).
pub fn is_mountpoint(p: &Path) -> bool {
    // The parent, not the mount itself: a mount whose process died
    // cannot be resolved.
    let canon = match (p.parent().map(Path::canonicalize), p.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => p.to_path_buf(),
    };
    mounts().iter().any(|m| Path::new(m) == canon)
}

/// Mount points of this mount namespace.
pub fn mounts() -> Vec<String> {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| m.replace("\\040", " "))
        .collect()
}

/// Detach a mount even when its file system process is gone.
pub fn lazy_unmount(p: &Path) {
    let ok = Command::new("umount")
        .arg("-l")
        .arg(p)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(p)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

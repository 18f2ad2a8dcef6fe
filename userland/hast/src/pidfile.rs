//! The daemon's pidfile, held with an exclusive lock for the daemon's lifetime
//! (the pidfile(3) contract: a second instance finds it locked and learns the
//! running daemon's pid).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Failure to take or write the pidfile.
#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    /// Another process holds the lock.
    #[error("another hastd is already running, pidfile {path}, pid {pid}", path = path.display(), pid = pid.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    Locked { path: PathBuf, pid: Option<i32> },
    /// The file cannot be created, locked or written.
    #[error("cannot use pidfile {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl PidfileError {
    /// The exit code of the reference: 75 (EX_TEMPFAIL) when another instance
    /// runs, 71 (EX_OSERR) otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            PidfileError::Locked { .. } => crate::sysexits::EX_TEMPFAIL,
            PidfileError::Io { .. } => crate::sysexits::EX_OSERR,
        }
    }
}

/// A locked pidfile. The lock is released (and the file removed) on drop.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    file: File,
}

impl Pidfile {
    /// Create (or open) `path` and take an exclusive, non-blocking lock on it.
    /// Does not write the pid yet (call [`Pidfile::write`] once daemonized).
    pub fn open(path: &Path) -> Result<Pidfile, PidfileError> {
        let io = |source| PidfileError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse::<i32>().ok());
                return Err(PidfileError::Locked {
                    path: path.to_path_buf(),
                    pid,
                });
            }
            return Err(io(err));
        }
        Ok(Pidfile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Write the current process id into the locked file.
    pub fn write(&mut self) -> Result<(), PidfileError> {
        let pid = std::process::id();
        let io = |source| PidfileError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.set_len(0).map_err(io)?;
        self.file.seek(SeekFrom::Start(0)).map_err(io)?;
        self.file
            .write_all(format!("{pid}\n").as_bytes())
            .map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    /// The path of the pidfile.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Remove while still holding the lock, so no other instance can have
        // taken it in between.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/hastd.pid");
        let mut first = Pidfile::open(&path).unwrap();
        first.write().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        match Pidfile::open(&path) {
            Err(e @ PidfileError::Locked { .. }) => {
                assert_eq!(e.exit_code(), 75);
                assert!(e.to_string().contains(&std::process::id().to_string()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        assert!(!path.exists());
        let _again = Pidfile::open(&path).unwrap();
    }
}

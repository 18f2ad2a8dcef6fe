//! The local provider of a resource: a regular file or a block device (a
//! GEOM character device on FreeBSD), opened once, with its media size and
//! sector size, and positioned I/O on it. Regular files report a 512-byte
//! sector size, as in the reference.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sector size assumed for regular files.
pub const FILE_SECTOR_SIZE: u32 = 512;

/// Why the provider could not be opened, sized or accessed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("unable to open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("unable to stat {}: {source}", path.display())]
    Stat { path: PathBuf, source: io::Error },
    #[error("unable to obtain the {what} of provider {}: {source}", path.display())]
    Ioctl {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{} is neither a block device nor a regular file", path.display())]
    NotFileOrDevice { path: PathBuf },
    #[error("unable to read {len} bytes at offset {offset} of {}: {source}", path.display())]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        source: io::Error,
    },
    #[error("unable to write {len} bytes at offset {offset} of {}: {source}", path.display())]
    Write {
        path: PathBuf,
        offset: u64,
        len: usize,
        source: io::Error,
    },
    #[error("unable to flush {}: {source}", path.display())]
    Flush { path: PathBuf, source: io::Error },
    #[error("{} is locked by another process (is hastd using it?): {source}", path.display())]
    Locked { path: PathBuf, source: io::Error },
}

impl ProviderError {
    /// Whether the error happened while opening or sizing the provider
    /// (hastctl exits 66 then, 74 for I/O errors).
    pub fn is_open_error(&self) -> bool {
        matches!(
            self,
            ProviderError::Open { .. }
                | ProviderError::Stat { .. }
                | ProviderError::Ioctl { .. }
                | ProviderError::NotFileOrDevice { .. }
                | ProviderError::Locked { .. }
        )
    }
}

/// An open local provider.
#[derive(Debug)]
pub struct Provider {
    file: File,
    path: PathBuf,
    mediasize: u64,
    sectorsize: u32,
    is_block: bool,
}

#[cfg(target_os = "linux")]
mod sys {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t): the size in bytes.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // BLKSSZGET = _IO(0x12, 104), writes an int: the logical sector size.
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);

    pub fn is_device(ft: &std::fs::FileType) -> bool {
        use std::os::unix::fs::FileTypeExt;
        ft.is_block_device()
    }

    pub fn media_size(fd: std::os::fd::RawFd) -> std::io::Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the ioctl writes one u64 into `v`, which outlives the call.
        unsafe { blkgetsize64(fd, &mut v) }.map_err(std::io::Error::from)?;
        Ok(v)
    }

    pub fn sector_size(fd: std::os::fd::RawFd) -> std::io::Result<u32> {
        let mut v: libc::c_int = 0;
        // SAFETY: the ioctl writes one int into `v`, which outlives the call.
        unsafe { blksszget(fd, &mut v) }.map_err(std::io::Error::from)?;
        u32::try_from(v).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))
    }
}

#[cfg(target_os = "freebsd")]
mod sys {
    // DIOCGSECTORSIZE = _IOR('d', 128, u_int), DIOCGMEDIASIZE = _IOR('d', 129, off_t).
    nix::ioctl_read!(diocgsectorsize, b'd', 128, libc::c_uint);
    nix::ioctl_read!(diocgmediasize, b'd', 129, libc::off_t);

    pub fn is_device(ft: &std::fs::FileType) -> bool {
        use std::os::unix::fs::FileTypeExt;
        ft.is_char_device()
    }

    pub fn media_size(fd: std::os::fd::RawFd) -> std::io::Result<u64> {
        let mut v: libc::off_t = 0;
        // SAFETY: the ioctl writes one off_t into `v`, which outlives the call.
        unsafe { diocgmediasize(fd, &mut v) }.map_err(std::io::Error::from)?;
        u64::try_from(v).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))
    }

    pub fn sector_size(fd: std::os::fd::RawFd) -> std::io::Result<u32> {
        let mut v: libc::c_uint = 0;
        // SAFETY: the ioctl writes one u_int into `v`, which outlives the call.
        unsafe { diocgsectorsize(fd, &mut v) }.map_err(std::io::Error::from)?;
        Ok(v)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
mod sys {
    pub fn is_device(_ft: &std::fs::FileType) -> bool {
        false
    }
    pub fn media_size(_fd: std::os::fd::RawFd) -> std::io::Result<u64> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
    pub fn sector_size(_fd: std::os::fd::RawFd) -> std::io::Result<u32> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

impl Provider {
    /// Opens `path` read-only or read-write and obtains its size and sector
    /// size (ioctls for devices, file size and 512 for regular files).
    pub fn open(path: &Path, writable: bool) -> Result<Provider, ProviderError> {
        use std::os::fd::AsRawFd;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| ProviderError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| ProviderError::Stat {
            path: path.to_path_buf(),
            source,
        })?;
        let ft = meta.file_type();
        let (mediasize, sectorsize, is_block) = if sys::is_device(&ft) {
            let fd = file.as_raw_fd();
            let ioctl_err = |what: &'static str| {
                let path = path.to_path_buf();
                move |source| ProviderError::Ioctl { path, what, source }
            };
            let m = sys::media_size(fd).map_err(ioctl_err("media size"))?;
            let s = sys::sector_size(fd).map_err(ioctl_err("sector size"))?;
            (m, s, true)
        } else if ft.is_file() {
            (meta.len(), FILE_SECTOR_SIZE, false)
        } else {
            return Err(ProviderError::NotFileOrDevice {
                path: path.to_path_buf(),
            });
        };
        Ok(Provider {
            file,
            path: path.to_path_buf(),
            mediasize,
            sectorsize,
            is_block,
        })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn mediasize(&self) -> u64 {
        self.mediasize
    }

    /// Sector size in bytes (512 for regular files).
    pub fn sectorsize(&self) -> u32 {
        self.sectorsize
    }

    /// Whether it is a device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Takes an exclusive advisory lock (non-blocking) so that two daemons
    /// or a daemon and `hastctl create` do not use the provider at once.
    /// Filesystems without flock support are accepted, as in the reference.
    pub fn lock_exclusive(&self) -> Result<(), ProviderError> {
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on a descriptor this Provider owns; the lock
        // lives as long as the open file and is released when it closes.
        let rc = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(());
        }
        Err(ProviderError::Locked {
            path: self.path.clone(),
            source: err,
        })
    }

    /// Reads exactly `buf.len()` bytes at `off`.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<(), ProviderError> {
        self.file
            .read_exact_at(buf, off)
            .map_err(|source| ProviderError::Read {
                path: self.path.clone(),
                offset: off,
                len: buf.len(),
                source,
            })
    }

    /// Writes all of `buf` at `off`.
    pub fn write_all_at(&self, buf: &[u8], off: u64) -> Result<(), ProviderError> {
        self.file
            .write_all_at(buf, off)
            .map_err(|source| ProviderError::Write {
                path: self.path.clone(),
                offset: off,
                len: buf.len(),
                source,
            })
    }

    /// Makes written data durable (fdatasync).
    pub fn flush(&self) -> Result<(), ProviderError> {
        self.file
            .sync_data()
            .map_err(|source| ProviderError::Flush {
                path: self.path.clone(),
                source,
            })
    }
}

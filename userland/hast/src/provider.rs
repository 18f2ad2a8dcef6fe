//! The local provider of a resource: a regular file, a Linux block device or
//! a FreeBSD GEOM character device (such as /dev/ada0p3), opened once, with
//! its media size and sector size, and every operation on it: positioned
//! reads and writes, durable writes, flush, delete (discard) and zeroing.
//! Every host (the NBD export's backend, the in-process core's host, the
//! secondary, metadata) does its I/O through this module.
//!
//! What differs per OS lives in the `os` module below, one per system,
//! each with the same functions; `cargo check --target
//! x86_64-unknown-freebsd` type-checks the FreeBSD one on any host:
//!
//! | operation | regular file | Linux block device | FreeBSD GEOM device |
//! |---|---|---|---|
//! | size, sector size | stat, 512 | BLKGETSIZE64, BLKSSZGET | DIOCGMEDIASIZE, DIOCGSECTORSIZE |
//! | flush | fdatasync | fdatasync (a cache flush) | DIOCGFLUSH |
//! | delete | punch a hole (Linux) | BLKDISCARD | DIOCGDELETE |
//! | zero a range | punch or zero range (Linux), else zeros | BLKZEROOUT | zeros written |
//! | durable write | pwritev2 RWF_DSYNC (Linux), else write + flush | the same | write + DIOCGFLUSH |
//!
//! A delete is a hint: a provider that cannot discard keeps its data and
//! the delete succeeds. Regular files report a 512-byte sector size, as in
//! the reference.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sector size assumed for regular files.
pub const FILE_SECTOR_SIZE: u32 = 512;

/// Size of the zero buffer used when a range must be zeroed by writing.
const ZERO_CHUNK: usize = 1 << 20;

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
    #[error("{} is neither a regular file nor a {}", path.display(), os::DEVICE_KIND)]
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

/// What the provider is; it chooses the system calls of each operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// The disk device of this OS: a block device on Linux, a GEOM
    /// character device on FreeBSD.
    Device,
}

/// An open local provider.
#[derive(Debug)]
pub struct Provider {
    file: File,
    path: PathBuf,
    mediasize: u64,
    sectorsize: u32,
    kind: Kind,
}

/// The ioctl request numbers of FreeBSD's <sys/disk.h>, computed as its
/// <sys/ioccom.h> does, on every OS so that they are unit-tested anywhere
/// (the FreeBSD build uses them).
pub mod freebsd_ioctl {
    const IOC_VOID: u64 = 0x2000_0000;
    const IOC_OUT: u64 = 0x4000_0000;
    const IOC_IN: u64 = 0x8000_0000;
    const IOCPARM_MASK: u64 = 0x1fff;

    const fn ioc(inout: u64, group: u8, num: u8, len: u64) -> u64 {
        inout | ((len & IOCPARM_MASK) << 16) | ((group as u64) << 8) | num as u64
    }

    /// `_IOR('d', 128, u_int)`.
    pub const DIOCGSECTORSIZE: u64 = ioc(IOC_OUT, b'd', 128, 4);
    /// `_IOR('d', 129, off_t)`.
    pub const DIOCGMEDIASIZE: u64 = ioc(IOC_OUT, b'd', 129, 8);
    /// `_IO('d', 135)`: flush the write cache.
    pub const DIOCGFLUSH: u64 = ioc(IOC_VOID, b'd', 135, 0);
    /// `_IOW('d', 136, off_t[2])`: delete (BIO_DELETE) a range.
    pub const DIOCGDELETE: u64 = ioc(IOC_IN, b'd', 136, 16);
}

#[cfg(target_os = "linux")]
mod os {
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, RawFd};

    /// What a device provider is on this OS, for messages.
    pub const DEVICE_KIND: &str = "block device";

    // <linux/fs.h> block-device ioctls (group 0x12).
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

    pub fn is_device(ft: &std::fs::FileType) -> bool {
        use std::os::unix::fs::FileTypeExt;
        ft.is_block_device()
    }

    pub fn media_size(fd: RawFd) -> io::Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the ioctl writes one u64 into `v`, which outlives the call.
        unsafe { blkgetsize64(fd, &mut v) }.map_err(io::Error::from)?;
        Ok(v)
    }

    pub fn sector_size(fd: RawFd) -> io::Result<u32> {
        let mut v: libc::c_int = 0;
        // SAFETY: the ioctl writes one int into `v`, which outlives the call.
        unsafe { blksszget(fd, &mut v) }.map_err(io::Error::from)?;
        u32::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
    }

    /// A block device's fdatasync sends the device a cache flush.
    pub fn device_flush(f: &File) -> io::Result<()> {
        f.sync_data()
    }

    pub fn device_delete(f: &File, at: u64, len: u64) -> io::Result<()> {
        // SAFETY: BLKDISCARD reads a [start, length] pair of u64 through a
        // valid pointer.
        unsafe { blkdiscard(f.as_raw_fd(), &[at, len]) }
            .map(drop)
            .map_err(io::Error::from)
    }

    pub fn device_zero(f: &File, at: u64, len: u64) -> io::Result<()> {
        // SAFETY: BLKZEROOUT reads a [start, length] pair of u64 through a
        // valid pointer; it leaves the range allocated.
        unsafe { blkzeroout(f.as_raw_fd(), &[at, len]) }
            .map(drop)
            .map_err(io::Error::from)
    }

    fn falloc(f: &File, flag: nix::fcntl::FallocateFlags, at: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        fallocate(
            f,
            FallocateFlags::FALLOC_FL_KEEP_SIZE | flag,
            super::off_t(at)?,
            super::off_t(len)?,
        )
        .map_err(io::Error::from)
    }

    pub fn file_punch(f: &File, at: u64, len: u64) -> io::Result<()> {
        falloc(f, nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE, at, len)
    }

    pub fn file_zero_range(f: &File, at: u64, len: u64) -> io::Result<()> {
        falloc(f, nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE, at, len)
    }

    /// One positioned write with RWF_DSYNC (durable when it returns);
    /// `Unsupported` when the kernel lacks it.
    pub fn pwrite_dsync(f: &File, buf: &[u8], at: u64) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: one iovec describing a live, readable buffer of
        // `buf.len()` bytes; the kernel only reads from it.
        let n =
            unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, super::off_t(at)?, libc::RWF_DSYNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    io::Error::from(io::ErrorKind::Unsupported)
                }
                _ => e,
            });
        }
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

#[cfg(target_os = "freebsd")]
mod os {
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, RawFd};

    use super::freebsd_ioctl as n;

    /// What a device provider is on this OS, for messages.
    pub const DEVICE_KIND: &str = "disk device (GEOM provider)";

    nix::ioctl_read_bad!(diocgsectorsize, n::DIOCGSECTORSIZE, libc::c_uint);
    nix::ioctl_read_bad!(diocgmediasize, n::DIOCGMEDIASIZE, libc::off_t);
    nix::ioctl_none_bad!(diocgflush, n::DIOCGFLUSH);
    nix::ioctl_write_ptr_bad!(diocgdelete, n::DIOCGDELETE, [libc::off_t; 2]);

    /// GEOM providers appear in /dev as character devices.
    pub fn is_device(ft: &std::fs::FileType) -> bool {
        use std::os::unix::fs::FileTypeExt;
        ft.is_char_device()
    }

    pub fn media_size(fd: RawFd) -> io::Result<u64> {
        let mut v: libc::off_t = 0;
        // SAFETY: the ioctl writes one off_t into `v`, which outlives the call.
        unsafe { diocgmediasize(fd, &mut v) }.map_err(io::Error::from)?;
        u64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
    }

    pub fn sector_size(fd: RawFd) -> io::Result<u32> {
        let mut v: libc::c_uint = 0;
        // SAFETY: the ioctl writes one u_int into `v`, which outlives the call.
        unsafe { diocgsectorsize(fd, &mut v) }.map_err(io::Error::from)?;
        Ok(v)
    }

    /// fsync(2) of a GEOM device does not reach the disk's cache: BIO_FLUSH
    /// through DIOCGFLUSH, as FreeBSD's hastd (g_flush) does.
    pub fn device_flush(f: &File) -> io::Result<()> {
        // SAFETY: DIOCGFLUSH takes no argument.
        unsafe { diocgflush(f.as_raw_fd()) }
            .map(drop)
            .map_err(io::Error::from)
    }

    /// BIO_DELETE through DIOCGDELETE, as FreeBSD's hastd (g_delete) does.
    pub fn device_delete(f: &File, at: u64, len: u64) -> io::Result<()> {
        let arg = [super::off_t(at)?, super::off_t(len)?];
        // SAFETY: DIOCGDELETE reads an off_t[2] (offset, length) through a
        // valid pointer.
        unsafe { diocgdelete(f.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(io::Error::from)
    }

    /// GEOM has no "write zeroes": a BIO_DELETE does not promise zeros.
    pub fn device_zero(_f: &File, _at: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub fn file_punch(_f: &File, _at: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub fn file_zero_range(_f: &File, _at: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub fn pwrite_dsync(_f: &File, _buf: &[u8], _at: u64) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
mod os {
    use std::fs::File;
    use std::io;
    use std::os::fd::RawFd;

    pub const DEVICE_KIND: &str = "disk device";

    fn unsupported<T>() -> io::Result<T> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    pub fn is_device(_ft: &std::fs::FileType) -> bool {
        false
    }
    pub fn media_size(_fd: RawFd) -> io::Result<u64> {
        unsupported()
    }
    pub fn sector_size(_fd: RawFd) -> io::Result<u32> {
        unsupported()
    }
    pub fn device_flush(f: &File) -> io::Result<()> {
        f.sync_data()
    }
    pub fn device_delete(_f: &File, _at: u64, _len: u64) -> io::Result<()> {
        unsupported()
    }
    pub fn device_zero(_f: &File, _at: u64, _len: u64) -> io::Result<()> {
        unsupported()
    }
    pub fn file_punch(_f: &File, _at: u64, _len: u64) -> io::Result<()> {
        unsupported()
    }
    pub fn file_zero_range(_f: &File, _at: u64, _len: u64) -> io::Result<()> {
        unsupported()
    }
    pub fn pwrite_dsync(_f: &File, _buf: &[u8], _at: u64) -> io::Result<usize> {
        unsupported()
    }
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// An operation the provider cannot do (the caller falls back or, for a
/// delete, keeps the data).
fn is_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
        )
}

impl Provider {
    /// Opens `path` read-only or read-write and obtains its size and sector
    /// size (ioctls for devices, file size and 512 for regular files).
    pub fn open(path: &Path, writable: bool) -> Result<Provider, ProviderError> {
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
        let (mediasize, sectorsize, kind) = if os::is_device(&ft) {
            let fd = file.as_raw_fd();
            let ioctl_err = |what: &'static str| {
                let path = path.to_path_buf();
                move |source| ProviderError::Ioctl { path, what, source }
            };
            let m = os::media_size(fd).map_err(ioctl_err("media size"))?;
            let s = os::sector_size(fd).map_err(ioctl_err("sector size"))?;
            (m, s, Kind::Device)
        } else if ft.is_file() {
            (meta.len(), FILE_SECTOR_SIZE, Kind::File)
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
            kind,
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

    /// A regular file or this OS's disk device.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether it is a device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.kind == Kind::Device
    }

    /// The open file (for callers that need the descriptor itself).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Takes an exclusive advisory lock (non-blocking) so that two daemons
    /// or a daemon and `hastctl create` do not use the provider at once.
    /// Filesystems without flock support are accepted, as in the reference.
    pub fn lock_exclusive(&self) -> Result<(), ProviderError> {
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

    /// Makes written data durable: fdatasync for a file, the device's cache
    /// flush for a device.
    pub fn flush(&self) -> Result<(), ProviderError> {
        self.sync().map_err(|source| ProviderError::Flush {
            path: self.path.clone(),
            source,
        })
    }

    /// [`Provider::flush`] with the system's error, for the data path.
    pub fn sync(&self) -> io::Result<()> {
        match self.kind {
            Kind::File => self.file.sync_data(),
            Kind::Device => os::device_flush(&self.file),
        }
    }

    /// Reads exactly `len` bytes at `at` into a new buffer, without filling
    /// it with zeros first (for a 1 MiB read, zeroing costs about what the
    /// copy from the page cache does).
    pub fn read_fresh(&self, len: usize, at: u64) -> io::Result<Vec<u8>> {
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        self.read_into_spare(&mut buf, len, at)?;
        Ok(buf)
    }

    /// Appends exactly `len` bytes read at `at` to `buf` (into its spare
    /// capacity, reserved as needed; never zero-filled first).
    pub fn read_into_spare(&self, buf: &mut Vec<u8>, len: usize, at: u64) -> io::Result<()> {
        let start = buf.len();
        buf.reserve(len);
        while buf.len() - start < len {
            let have = buf.len() - start;
            let pos = at
                .checked_add(have as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let spare = buf.spare_capacity_mut();
            let want = spare.len().min(len - have);
            // SAFETY: pread writes at most `want` bytes into the vector's
            // spare capacity, which is at least that long.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast::<libc::c_void>(),
                    want,
                    off_t(pos)?,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the provider",
                ));
            }
            let filled = buf.len() + usize::try_from(n).unwrap_or(0).min(want);
            // SAFETY: the kernel initialized the `n` bytes after the old length.
            unsafe { buf.set_len(filled) };
        }
        Ok(())
    }

    /// Writes all of `data` at `at`, with the system's error.
    pub fn pwrite(&self, data: &[u8], at: u64) -> io::Result<()> {
        self.file.write_all_at(data, at)
    }

    /// Writes `data` at `at` and makes it durable: `pwritev2(RWF_DSYNC)`
    /// syncs just this range on Linux (a flush would write back every dirty
    /// page of the provider); elsewhere, or when the kernel lacks it, a
    /// write and a [`Provider::sync`].
    pub fn write_durable(&self, data: &[u8], at: u64) -> io::Result<()> {
        let mut done: usize = 0;
        while let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) {
            let pos = at
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            match os::pwrite_dsync(&self.file, rest, pos) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "a durable write wrote nothing",
                    ))
                }
                Ok(n) => done = done.saturating_add(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    self.file.write_all_at(rest, pos)?;
                    return self.sync();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Discards `len` bytes at `at` (a BIO_DELETE): a hole punched in a
    /// file, a discard on a device. A provider that cannot discard keeps
    /// its data, which is not an error (a delete is a hint).
    pub fn delete(&self, at: u64, len: u64) -> io::Result<()> {
        let r = match self.kind {
            Kind::File => os::file_punch(&self.file, at, len),
            Kind::Device => os::device_delete(&self.file, at, len),
        };
        match r {
            Err(e) if !(is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes `len` bytes at `at` read as zeros; with `no_hole` the range
    /// stays allocated. Uses what the provider offers, else writes zeros.
    pub fn write_zeroes(&self, at: u64, len: u64, no_hole: bool) -> io::Result<()> {
        let fast = match self.kind {
            Kind::File => {
                let punched = if no_hole {
                    Err(io::Error::from(io::ErrorKind::Unsupported))
                } else {
                    os::file_punch(&self.file, at, len)
                };
                match punched {
                    Err(e) if is_unsupported(&e) => os::file_zero_range(&self.file, at, len),
                    other => other,
                }
            }
            Kind::Device => os::device_zero(&self.file, at, len),
        };
        match fast {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                self.write_zero_bytes(at, len)
            }
            Err(e) => Err(e),
        }
    }

    fn write_zero_bytes(&self, at: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let mut done: u64 = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            let chunk = zeros.get(..n as usize).unwrap_or(&zeros);
            let pos = at
                .checked_add(done)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            self.file.write_all_at(chunk, pos)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::freebsd_ioctl::*;

    /// The numbers FreeBSD's <sys/disk.h> macros expand to (amd64 and
    /// every other FreeBSD platform: the encoding is machine-independent).
    #[test]
    fn freebsd_disk_ioctls_match_sys_disk_h() {
        assert_eq!(DIOCGSECTORSIZE, 0x4004_6480);
        assert_eq!(DIOCGMEDIASIZE, 0x4008_6481);
        assert_eq!(DIOCGFLUSH, 0x2000_6487);
        assert_eq!(DIOCGDELETE, 0x8010_6488);
    }

    #[test]
    fn file_provider_operations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let p = super::Provider::open(&path, true).unwrap();
        assert_eq!(p.kind(), super::Kind::File);
        assert_eq!((p.mediasize(), p.sectorsize()), (1 << 20, 512));
        p.write_durable(&[7u8; 8192], 4096).unwrap();
        assert_eq!(p.read_fresh(8192, 4096).unwrap(), vec![7u8; 8192]);
        p.delete(4096, 4096).unwrap();
        assert_eq!(p.read_fresh(4096, 4096).unwrap(), vec![0u8; 4096]);
        p.write_zeroes(8192, 4096, true).unwrap();
        assert_eq!(p.read_fresh(4096, 8192).unwrap(), vec![0u8; 4096]);
        p.sync().unwrap();
        let mut v = vec![1u8];
        p.read_into_spare(&mut v, 3, 0).unwrap();
        assert_eq!(v, [1, 0, 0, 0]);
        assert!(p.read_fresh(8, (1 << 20) - 4).is_err());
    }
}

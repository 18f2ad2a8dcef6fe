//! A [`Backend`] on a regular file or a block device: positioned I/O on the
//! blocking thread pool (many requests in flight), the export living at a
//! base offset (`localoff`) inside the provider.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{Backend, BoxFuture, NbdError};

/// Where the export lies inside the provider and how it is addressed.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    /// Byte offset of the export's first byte in the provider (HAST's
    /// `localoff`).
    pub offset: u64,
    /// Export size; default: from `offset` to the end of the provider,
    /// rounded down to the block size.
    pub size: Option<u64>,
    /// Block (sector) size; default: the device's logical sector size, or
    /// 512 for a regular file.
    pub block_size: Option<u32>,
    /// Open read-only and refuse writes.
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Regular,
    BlockDevice,
}

/// A file or block device served as an export.
#[derive(Debug)]
pub struct FileBackend {
    file: Arc<File>,
    path: PathBuf,
    kind: Kind,
    base: u64,
    size: u64,
    block_size: u32,
    read_only: bool,
}

mod ioctl {
    // Linux <linux/fs.h> block-device ioctls (group 0x12).
    nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blk_sszget, nix::request_code_none!(0x12, 104), libc::c_int);
    nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blk_zeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
}

/// Size of the zero buffer used when the kernel cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;

impl FileBackend {
    /// Opens a provider (regular file or block device) and describes the
    /// export inside it.
    pub fn open(path: &Path, opts: &FileOptions) -> Result<FileBackend, NbdError> {
        let open_err = |source| NbdError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let ft = meta.file_type();
        let (kind, provider_size, sector) = if ft.is_block_device() {
            let mut size: u64 = 0;
            let mut ssz: libc::c_int = 0;
            // SAFETY: both ioctls write one integer of the given type through
            // a valid pointer on an open block-device descriptor.
            unsafe {
                ioctl::blk_getsize64(file.as_raw_fd(), &mut size)
                    .map_err(|e| open_err(io::Error::from(e)))?;
                ioctl::blk_sszget(file.as_raw_fd(), &mut ssz)
                    .map_err(|e| open_err(io::Error::from(e)))?;
            }
            let ssz = u32::try_from(ssz).unwrap_or(512);
            (Kind::BlockDevice, size, ssz)
        } else if ft.is_file() {
            (Kind::Regular, meta.len(), 512)
        } else {
            return Err(NbdError::Provider {
                path: path.to_path_buf(),
                reason: "is neither a regular file nor a block device".into(),
            });
        };
        let bad = |reason: String| NbdError::Provider {
            path: path.to_path_buf(),
            reason,
        };
        let block_size = opts.block_size.unwrap_or(sector);
        if !block_size.is_power_of_two() || block_size > 65536 {
            return Err(bad(format!(
                "block size {block_size} is not a power of two between 1 and 65536"
            )));
        }
        let room = provider_size.checked_sub(opts.offset).ok_or_else(|| {
            bad(format!(
                "offset {} lies beyond its end ({provider_size} bytes)",
                opts.offset
            ))
        })?;
        let bs = u64::from(block_size);
        let size = match opts.size {
            Some(s) => {
                if s > room {
                    return Err(bad(format!(
                        "export of {s} bytes at offset {} does not fit in {provider_size} bytes",
                        opts.offset
                    )));
                }
                if s % bs != 0 {
                    return Err(bad(format!(
                        "export size {s} is not a multiple of the block size {block_size}"
                    )));
                }
                s
            }
            None => room - room % bs,
        };
        if size == 0 {
            return Err(bad(format!(
                "no room for an export at offset {} ({provider_size} bytes, block size {block_size})",
                opts.offset
            )));
        }
        Ok(FileBackend {
            file: Arc::new(file),
            path: path.to_path_buf(),
            kind,
            base: opts.offset,
            size,
            block_size,
            read_only: opts.read_only,
        })
    }

    /// The provider path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `data` at export offset `off` (durably when `fua`). Takes
    /// shared bytes so a caller that also sends them elsewhere (the peer)
    /// needs no copy.
    pub fn write_bytes(
        &self,
        off: u64,
        data: Bytes,
        fua: bool,
    ) -> BoxFuture<'static, io::Result<()>> {
        let at = match self
            .writable()
            .and_then(|_| self.place(off, data.len() as u64))
        {
            Ok(at) => at,
            Err(e) => return ready(Err(e)),
        };
        self.blocking(move |f| {
            if fua {
                write_durable(f, &data, at)
            } else {
                f.write_all_at(&data, at)
            }
        })
    }

    /// Read `len` bytes at export offset `off` on the calling thread (for a
    /// caller already on a blocking thread).
    pub fn read_now(&self, off: u64, len: u32) -> io::Result<Vec<u8>> {
        let at = self.place(off, u64::from(len))?;
        read_exact_fresh(&self.file, len as usize, at)
    }

    /// Write `data` at export offset `off` on the calling thread (durably
    /// when `fua`).
    pub fn write_now(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.writable()?;
        let at = self.place(off, data.len() as u64)?;
        if fua {
            write_durable(&self.file, data, at)
        } else {
            self.file.write_all_at(data, at)
        }
    }

    /// Absolute provider offset of an export range, refusing anything that
    /// is not wholly inside the export.
    fn place(&self, off: u64, len: u64) -> io::Result<u64> {
        let inside = off.checked_add(len).is_some_and(|end| end <= self.size);
        if !inside {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {off}+{len} outside the {}-byte export of {}",
                    self.size,
                    self.path.display()
                ),
            ));
        }
        self.base
            .checked_add(off)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }

    /// Runs `f` on the blocking pool with the file.
    fn blocking<T, F>(&self, f: F) -> BoxFuture<'static, io::Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&file))
                .await
                .map_err(|e| io::Error::other(format!("I/O task failed: {e}")))?
        })
    }
}

fn ready<T: Send + 'static>(r: io::Result<T>) -> BoxFuture<'static, io::Result<T>> {
    Box::pin(std::future::ready(r))
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

/// Read exactly `len` bytes at `at` into a new buffer, without filling it
/// with zeros first (for a 1 MiB read, zeroing costs about what the copy
/// from the page cache does).
fn read_exact_fresh(file: &File, len: usize, at: u64) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let pos = at
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let have = buf.len();
        let spare = buf.spare_capacity_mut();
        let want = spare.len().min(len - have);
        // SAFETY: pread writes at most `want` bytes into the vector's spare
        // capacity, which is at least that long.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
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
        let filled = have + usize::try_from(n).unwrap_or(0).min(want);
        // SAFETY: the kernel initialized the `n` bytes after the old length.
        unsafe { buf.set_len(filled) };
    }
    Ok(buf)
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// What `fallocate(2)` is asked to do to a range (size kept).
#[derive(Clone, Copy)]
enum Falloc {
    PunchHole,
    ZeroRange,
}

#[cfg(target_os = "linux")]
fn falloc(file: &File, op: Falloc, at: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_KEEP_SIZE
        | match op {
            Falloc::PunchHole => FallocateFlags::FALLOC_FL_PUNCH_HOLE,
            Falloc::ZeroRange => FallocateFlags::FALLOC_FL_ZERO_RANGE,
        };
    fallocate(file, flags, off_t(at)?, off_t(len)?).map_err(io::Error::from)
}

/// Elsewhere (FreeBSD): no hole punching here; callers fall back to
/// writing zeros, or keep the data of a discard.
#[cfg(not(target_os = "linux"))]
fn falloc(_file: &File, _op: Falloc, at: u64, len: u64) -> io::Result<()> {
    off_t(at)?;
    off_t(len)?;
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

fn write_zero_bytes(file: &File, at: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let mut done: u64 = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        let chunk = zeros.get(..n as usize).unwrap_or(&zeros);
        let pos = at
            .checked_add(done)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        file.write_all_at(chunk, pos)?;
        done += n;
    }
    Ok(())
}

/// Writes `data` at `at` and makes it durable: a write and an fdatasync
/// where `pwritev2(RWF_DSYNC)` does not exist.
#[cfg(not(target_os = "linux"))]
pub fn write_durable(f: &File, data: &[u8], at: u64) -> io::Result<()> {
    f.write_all_at(data, at)?;
    f.sync_data()
}

/// Writes `data` at `at` and makes it durable: `pwritev2(RWF_DSYNC)`
/// syncs just this range (an fdatasync would flush every dirty page of the
/// provider); kernels without it get a write and an fdatasync.
#[cfg(target_os = "linux")]
pub fn write_durable(f: &File, data: &[u8], at: u64) -> io::Result<()> {
    let mut done: usize = 0;
    while let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) {
        let pos = at
            .checked_add(done as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: one iovec describing a live, readable buffer of
        // `rest.len()` bytes; the kernel only reads from it.
        let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, off_t(pos)?, libc::RWF_DSYNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) if done == 0 => {
                    f.write_all_at(data, at)?;
                    return f.sync_data();
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev2 wrote nothing",
            ));
        }
        done = done.saturating_add(usize::try_from(n).unwrap_or(0));
    }
    Ok(())
}

/// Discard `len` bytes at provider offset `at`: punch a hole in a regular
/// file, BLKDISCARD on a block device. A provider that cannot discard keeps
/// its data (a discard is a hint), which is not an error.
pub fn discard(f: &File, block_device: bool, at: u64, len: u64) -> io::Result<()> {
    let r = if block_device {
        // SAFETY: BLKDISCARD reads a [start, length] pair of u64 through a
        // valid pointer.
        unsafe { ioctl::blk_discard(f.as_raw_fd(), &blk_range(at, len)) }
            .map(|_| ())
            .map_err(io::Error::from)
    } else {
        falloc(f, Falloc::PunchHole, at, len)
    };
    match r {
        Err(e) if !(is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL)) => Err(e),
        _ => Ok(()),
    }
}

fn blk_range(at: u64, len: u64) -> [u64; 2] {
    [at, len]
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, off: u64, len: u32) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        let at = match self.place(off, u64::from(len)) {
            Ok(at) => at,
            Err(e) => return ready(Err(e)),
        };
        self.blocking(move |f| read_exact_fresh(f, len as usize, at))
    }

    fn write(&self, off: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        self.write_bytes(off, Bytes::from(data), fua)
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        if self.read_only {
            return ready(Ok(()));
        }
        self.blocking(|f| f.sync_data())
    }

    fn trim(&self, off: u64, len: u32, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        let len = u64::from(len);
        let at = match self.writable().and_then(|_| self.place(off, len)) {
            Ok(at) => at,
            Err(e) => return ready(Err(e)),
        };
        let block = self.kind == Kind::BlockDevice;
        self.blocking(move |f| {
            discard(f, block, at, len)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
    }

    fn write_zeroes(
        &self,
        off: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        let len = u64::from(len);
        let at = match self.writable().and_then(|_| self.place(off, len)) {
            Ok(at) => at,
            Err(e) => return ready(Err(e)),
        };
        let kind = self.kind;
        self.blocking(move |f| {
            let fast = match kind {
                Kind::Regular => {
                    let punched = if no_hole {
                        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
                    } else {
                        falloc(f, Falloc::PunchHole, at, len)
                    };
                    match punched {
                        Err(e) if is_unsupported(&e) => falloc(f, Falloc::ZeroRange, at, len),
                        other => other,
                    }
                }
                // SAFETY: BLKZEROOUT reads a [start, length] pair of u64
                // through a valid pointer. It leaves the range allocated.
                Kind::BlockDevice => {
                    unsafe { ioctl::blk_zeroout(f.as_raw_fd(), &blk_range(at, len)) }
                        .map(|_| ())
                        .map_err(io::Error::from)
                }
            };
            match fast {
                Ok(()) => {}
                Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    write_zero_bytes(f, at, len)?;
                }
                Err(e) => return Err(e),
            }
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
    }
}

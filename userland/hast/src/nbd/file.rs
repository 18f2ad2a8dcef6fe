//! A [`Backend`] on a local provider ([`crate::provider`]: a regular file,
//! a Linux block device or a FreeBSD GEOM device): positioned I/O on the
//! blocking thread pool (many requests in flight), the export living at a
//! base offset (`localoff`) inside the provider.

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::{Backend, BoxFuture, NbdError};
use crate::provider::{Provider, ProviderError};

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

/// A provider served as an export.
#[derive(Debug)]
pub struct FileBackend {
    provider: Arc<Provider>,
    base: u64,
    size: u64,
    block_size: u32,
    read_only: bool,
}

impl FileBackend {
    /// Opens a provider (regular file or disk device) and describes the
    /// export inside it.
    pub fn open(path: &Path, opts: &FileOptions) -> Result<FileBackend, NbdError> {
        let provider = Provider::open(path, !opts.read_only).map_err(|e| match e {
            ProviderError::Open { path, source } | ProviderError::Stat { path, source } => {
                NbdError::Open { path, source }
            }
            ProviderError::Ioctl { path, source, .. } => NbdError::Open { path, source },
            other => NbdError::Provider {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
        FileBackend::on(Arc::new(provider), opts)
    }

    /// The export `opts` describes inside an open provider (which a caller
    /// may share: hastd keeps one descriptor per provider, the one it locked).
    pub fn on(provider: Arc<Provider>, opts: &FileOptions) -> Result<FileBackend, NbdError> {
        let path = provider.path();
        let provider_size = provider.mediasize();
        let sector = provider.sectorsize();
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
            provider: provider.clone(),
            base: opts.offset,
            size,
            block_size,
            read_only: opts.read_only,
        })
    }

    /// The provider path.
    pub fn path(&self) -> &Path {
        self.provider.path()
    }

    /// The provider.
    pub fn provider(&self) -> &Arc<Provider> {
        &self.provider
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
        self.blocking(move |p| {
            if fua {
                p.write_durable(&data, at)
            } else {
                p.pwrite(&data, at)
            }
        })
    }

    /// Read `len` bytes at export offset `off` on the calling thread (for a
    /// caller already on a blocking thread).
    pub fn read_now(&self, off: u64, len: u32) -> io::Result<Vec<u8>> {
        let at = self.place(off, u64::from(len))?;
        self.provider.read_fresh(len as usize, at)
    }

    /// Write `data` at export offset `off` on the calling thread (durably
    /// when `fua`).
    pub fn write_now(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.writable()?;
        let at = self.place(off, data.len() as u64)?;
        if fua {
            self.provider.write_durable(data, at)
        } else {
            self.provider.pwrite(data, at)
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
                    self.path().display()
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

    /// Runs `f` on the blocking pool with the provider.
    fn blocking<T, F>(&self, f: F) -> BoxFuture<'static, io::Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Provider) -> io::Result<T> + Send + 'static,
    {
        let provider = Arc::clone(&self.provider);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&provider))
                .await
                .map_err(|e| io::Error::other(format!("I/O task failed: {e}")))?
        })
    }
}

fn ready<T: Send + 'static>(r: io::Result<T>) -> BoxFuture<'static, io::Result<T>> {
    Box::pin(std::future::ready(r))
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
        self.blocking(move |p| p.read_fresh(len as usize, at))
    }

    fn write(&self, off: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        self.write_bytes(off, Bytes::from(data), fua)
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        if self.read_only {
            return ready(Ok(()));
        }
        self.blocking(|p| p.sync())
    }

    fn trim(&self, off: u64, len: u32, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        let len = u64::from(len);
        let at = match self.writable().and_then(|_| self.place(off, len)) {
            Ok(at) => at,
            Err(e) => return ready(Err(e)),
        };
        self.blocking(move |p| {
            p.delete(at, len)?;
            if fua {
                p.sync()?;
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
        self.blocking(move |p| {
            p.write_zeroes(at, len, no_hole)?;
            if fua {
                p.sync()?;
            }
            Ok(())
        })
    }
}

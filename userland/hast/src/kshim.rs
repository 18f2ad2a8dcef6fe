//! Tests only (feature `kshim`, Linux): the geom_hast kernel module
//! (kmod/g_hast.c and kmod/hast_core.c, unchanged) running in this process
//! on the userland kernel shim of sys/kshim, so that the kernel host runs
//! for real on Linux: [`crate::kdev::KernelDevice`] sends its ioctls to the
//! module's d_ioctl ([`CtlFile`]), the local provider is a GEOM disk backed
//! by the file ([`Disk`]), and the primary's NBD clients reach `hast/NAME`
//! through its start method as bios ([`GeomBackend`]).
//!
//! hastd uses it when the environment variable [`ENV`] is set (and only in
//! a build with the feature, which only the test crate enables); then
//! [`FAIL_ENV`] may ask the shim to inject allocation failures. A killed
//! hastd takes this "kernel" with it, as a crash of the node would.

use std::cell::UnsafeCell;
use std::ffi::{c_int, c_void, CString};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hast_sys::kshim as sys;
use nix::errno::Errno;
use tokio::sync::oneshot;

use crate::nbd::{Backend, BoxFuture};

/// Set (to anything but `0`) in hastd's environment: primaries run in the
/// kernel module on the shim.
pub const ENV: &str = "HAST_KSHIM";

/// `nowait=PPM,clone=PPM` in hastd's environment: M_NOWAIT allocations and
/// g_clone_bio fail with that probability (per million); GEOM retries.
pub const FAIL_ENV: &str = "HAST_KSHIM_FAIL";

/// The largest bio a client sends (the shim's MAXPHYS, FreeBSD 13's
/// 1 MiB): longer requests are split, as physio(9) does.
pub const MAXPHYS: u64 = 1024 * 1024;

/// What went wrong with the shim.
#[derive(Debug, thiserror::Error)]
pub enum KshimError {
    #[error("loading geom_hast on the kernel shim: {0}")]
    Load(Errno),
    #[error("{what} {name}: {errno}")]
    Disk {
        what: &'static str,
        name: String,
        errno: Errno,
    },
    #[error("opening GEOM provider {name}: {errno}")]
    Open { name: String, errno: Errno },
    #[error("{0:?} contains a NUL byte")]
    Name(String),
    #[error("{0} is not of the form nowait=PPM,clone=PPM")]
    FailSpec(String),
}

fn cstring(s: &str) -> Result<CString, KshimError> {
    CString::new(s).map_err(|_| KshimError::Name(s.to_owned()))
}

fn errno(rc: c_int) -> Result<(), Errno> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw(rc))
    }
}

/// Whether hastd should run its primaries in the module on the shim.
pub fn selected() -> bool {
    std::env::var_os(ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether this process loaded the module (the shim refuses a second
/// load after an unload).
static LOADED: Mutex<bool> = Mutex::new(false);

/// Load the module (MOD_LOAD of its DECLARE_MODULEs) unless this process
/// did already, and apply [`FAIL_ENV`].
pub fn load() -> Result<(), KshimError> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if *loaded {
        return Ok(());
    }
    // SAFETY: no argument; the shim serializes loads.
    errno(unsafe { sys::kshim_load() }).map_err(KshimError::Load)?;
    *loaded = true;
    if let Some(spec) = std::env::var(FAIL_ENV).ok().filter(|s| !s.is_empty()) {
        match parse_fail(&spec) {
            Ok(()) => tracing::warn!("kernel shim: injecting failures: {spec}"),
            Err(e) => tracing::error!("{e}; no failure injected"),
        }
    }
    tracing::info!("geom_hast loaded on the kernel shim");
    Ok(())
}

fn parse_fail(spec: &str) -> Result<(), KshimError> {
    let bad = || KshimError::FailSpec(spec.to_owned());
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (what, ppm) = part.split_once('=').ok_or_else(bad)?;
        let ppm: u32 = ppm.parse().map_err(|_| bad())?;
        let which = match what {
            "nowait" => Fault::MallocNowait,
            "clone" => Fault::CloneBio,
            _ => return Err(bad()),
        };
        fault_rate(which, ppm, 0x5eed ^ u64::from(ppm));
    }
    Ok(())
}

/// Unload the module (MOD_QUIESCE, MOD_UNLOAD, leak check). EBUSY while an
/// instance exists. A module unloaded cannot be loaded again in the same
/// process (ESTALE).
pub fn unload() -> Result<(), Errno> {
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: no argument.
    errno(unsafe { sys::kshim_unload() })?;
    *loaded = false;
    Ok(())
}

/// A fault the shim can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// malloc(9) with M_NOWAIT returns NULL.
    MallocNowait,
    /// g_clone_bio(9) returns NULL.
    CloneBio,
    /// copyin(9) fails with EFAULT.
    Copyin,
    /// copyout(9) fails with EFAULT.
    Copyout,
}

impl Fault {
    fn raw(self) -> c_int {
        match self {
            Fault::MallocNowait => sys::KSHIM_FAIL_MALLOC_NOWAIT,
            Fault::CloneBio => sys::KSHIM_FAIL_CLONE_BIO,
            Fault::Copyin => sys::KSHIM_FAIL_COPYIN,
            Fault::Copyout => sys::KSHIM_FAIL_COPYOUT,
        }
    }
}

/// After `skip` more calls, fail the next `count` (`u32::MAX`: all).
pub fn fault_set(which: Fault, skip: u32, count: u32) {
    // SAFETY: plain values.
    unsafe { sys::kshim_fail_set(which.raw(), skip, count) }
}

/// Fail each call with probability `per_million` / 10^6.
pub fn fault_rate(which: Fault, per_million: u32, seed: u64) {
    // SAFETY: plain values.
    unsafe { sys::kshim_fail_rate(which.raw(), per_million, seed) }
}

/// Failures of `which` injected so far.
pub fn fault_hits(which: Fault) -> u64 {
    // SAFETY: plain value.
    unsafe { sys::kshim_fail_hits(which.raw()) }
}

/// What was injected so far, for a log line.
pub fn fault_report() -> String {
    format!(
        "{} M_NOWAIT and {} g_clone_bio failures injected",
        fault_hits(Fault::MallocNowait),
        fault_hits(Fault::CloneBio)
    )
}

/// Stop injecting.
pub fn fault_clear() {
    // SAFETY: no argument.
    unsafe { sys::kshim_fail_clear() }
}

/// Wait until GEOM's events (orphans among them) have all run.
pub fn settle() {
    // SAFETY: no argument.
    unsafe { sys::kshim_geom_settle() }
}

/// Interrupt the PCATCH sleeps waiting on `wmesg` (all: `None`), as a
/// signal would; returns how many.
pub fn interrupt(wmesg: Option<&str>) -> i32 {
    let c = wmesg.and_then(|w| CString::new(w).ok());
    // SAFETY: a NUL-terminated string or NULL.
    unsafe { sys::kshim_interrupt(c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())) }
}

/// What is outstanding in the shim.
pub fn stats() -> sys::kshim_stats {
    let mut st = sys::kshim_stats::default();
    // SAFETY: st is a valid struct.
    unsafe { sys::kshim_stats(&mut st) };
    st
}

/// Ok when no bio, event, client, open control file, module memory or
/// instance is left; else what is.
pub fn check_idle() -> Result<(), String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf is writable for its length.
    let rc = unsafe { sys::kshim_check_idle(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        return Ok(());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Err(String::from_utf8_lossy(&buf[..end]).trim().to_owned())
}

/// GEOM's configuration as kern.geom.confxml shows it (with the module's
/// dumpconf).
pub fn confxml() -> String {
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: buf is writable for its length.
    unsafe { sys::kshim_confxml(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// An open file of the module's control device, `/dev/hastctl`.
#[derive(Debug)]
pub struct CtlFile(*mut sys::kshim_file);

// SAFETY: the shim's files may be used from any thread, concurrently (the
// module's d_ioctl is reentrant); close happens once, in Drop.
unsafe impl Send for CtlFile {}
unsafe impl Sync for CtlFile {}

impl CtlFile {
    /// open("/dev/hastctl", O_RDWR or O_RDONLY): the module's d_open runs.
    pub fn open(write: bool) -> Result<CtlFile, Errno> {
        let flags = sys::KSHIM_FREAD | if write { sys::KSHIM_FWRITE } else { 0 };
        let mut fp = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name and a pointer to fill.
        errno(unsafe { sys::kshim_dev_open(c"hastctl".as_ptr(), flags, &mut fp) })?;
        Ok(CtlFile(fp))
    }

    /// ioctl(2) with command `cmd` (FreeBSD encoding) on the struct at `arg`.
    ///
    /// # Safety
    /// `arg` points to a struct of the command's size, and every user
    /// address inside it is valid for the length the struct gives it.
    pub unsafe fn ioctl(&self, cmd: u32, arg: *mut u8) -> Result<(), Errno> {
        // SAFETY: forwarded from the caller; the file is open.
        errno(unsafe { sys::kshim_dev_ioctl(self.0, cmd.into(), arg.cast()) })
    }
}

impl Drop for CtlFile {
    /// The last close: the module's cdevpriv destructor runs (the link of
    /// the units created through this file goes down).
    fn drop(&mut self) {
        // SAFETY: opened by kshim_dev_open, closed once.
        unsafe { sys::kshim_dev_close(self.0) }
    }
}

/// A GEOM disk of the shim backed by a file or block device.
#[derive(Debug)]
pub struct Disk {
    name: String,
    cname: CString,
}

/// The next `md` unit [`Disk::create_md`] tries.
static MD_UNIT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Disk {
    /// Make provider `name` for `path` (size: the file's, in `sectorsize`
    /// units), served by four I/O threads.
    pub fn create(name: &str, path: &str, sectorsize: u32) -> Result<Disk, KshimError> {
        let cname = cstring(name)?;
        let cpath = cstring(path)?;
        // SAFETY: NUL-terminated strings.
        errno(unsafe { sys::kshim_disk_create(cname.as_ptr(), cpath.as_ptr(), sectorsize, 4) })
            .map_err(|errno| KshimError::Disk {
                what: "creating the disk",
                name: name.to_owned(),
                errno,
            })?;
        Ok(Disk {
            name: name.to_owned(),
            cname,
        })
    }

    /// The disk of a file as `mdconfig -a -t vnode` makes it: the first
    /// free `mdN`.
    pub fn create_md(path: &str, sectorsize: u32) -> Result<Disk, KshimError> {
        loop {
            let unit = MD_UNIT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match Disk::create(&format!("md{unit}"), path, sectorsize) {
                Err(KshimError::Disk {
                    errno: Errno::EEXIST,
                    ..
                }) => continue,
                r => return r,
            }
        }
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn call(&self, what: &'static str, rc: c_int) -> Result<(), KshimError> {
        errno(rc).map_err(|errno| KshimError::Disk {
            what,
            name: self.name.clone(),
            errno,
        })
    }

    /// The disk disappears (its provider is orphaned).
    pub fn orphan(&self) -> Result<(), KshimError> {
        // SAFETY: a NUL-terminated name.
        self.call("orphaning", unsafe {
            sys::kshim_disk_orphan(self.cname.as_ptr())
        })
    }

    /// Hold every I/O (true) until released (false).
    pub fn hold(&self, hold: bool) -> Result<(), KshimError> {
        // SAFETY: as above.
        self.call("holding", unsafe {
            sys::kshim_disk_hold(self.cname.as_ptr(), c_int::from(hold))
        })
    }

    /// Every I/O waits a random time of up to `delay` first (a disk that
    /// completes requests out of order).
    pub fn delay(&self, delay: Duration) -> Result<(), KshimError> {
        let us = u32::try_from(delay.as_micros()).unwrap_or(u32::MAX);
        // SAFETY: as above.
        self.call("slowing", unsafe {
            sys::kshim_disk_delay(self.cname.as_ptr(), us)
        })
    }

    /// Bios of the commands in `cmdmask` (bit `1 << BIO_*`) fail with
    /// `error` (`None`: stop).
    pub fn fail(&self, cmdmask: u32, error: Option<Errno>) -> Result<(), KshimError> {
        let e = error.map_or(0, |e| e as c_int);
        // SAFETY: as above.
        self.call("failing I/O of", unsafe {
            sys::kshim_disk_fail(self.cname.as_ptr(), cmdmask, e)
        })
    }

    /// Bios waiting or running on the disk.
    pub fn queued(&self) -> u32 {
        let mut n = 0;
        // SAFETY: as above, and a pointer to fill.
        let _ = unsafe { sys::kshim_disk_queued(self.cname.as_ptr(), &mut n) };
        n
    }

    /// Take the disk away and free it once nothing uses its provider; waits
    /// up to `wait`. Blocking.
    pub fn destroy(self, wait: Duration) -> Result<(), KshimError> {
        let ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        // SAFETY: as above.
        self.call("destroying", unsafe {
            sys::kshim_disk_destroy(self.cname.as_ptr(), ms)
        })
    }
}

/// A buffer shared between the pieces of one request (each writes or reads
/// a disjoint range) and the GEOM thread that completes them.
struct IoBuf(UnsafeCell<Box<[u8]>>);

// SAFETY: the pieces of a request touch disjoint ranges, and the owner
// reads the buffer only after every piece completed.
unsafe impl Sync for IoBuf {}
unsafe impl Send for IoBuf {}

impl IoBuf {
    fn ptr(&self, at: usize) -> *mut c_void {
        // SAFETY: at is within the buffer (checked by the caller).
        unsafe { (*self.0.get()).as_mut_ptr().add(at).cast() }
    }
}

/// One bio in flight: what its completion needs.
struct Piece {
    buf: Option<Arc<IoBuf>>,
    length: i64,
    tx: oneshot::Sender<io::Result<()>>,
}

/// The bio's done routine (GEOM's g_up thread): never blocks.
unsafe extern "C" fn piece_done(arg: *mut c_void, error: c_int, completed: i64) {
    // SAFETY: arg is the Box leaked by Client::bio, completed exactly once.
    let Piece { buf, length, tx } = *unsafe { Box::from_raw(arg.cast::<Piece>()) };
    // The buffer is the requester's again before it hears of it.
    drop(buf);
    let r = if error != 0 {
        Err(io::Error::from_raw_os_error(error))
    } else if length > 0 && completed != length {
        Err(io::Error::other(format!(
            "{completed} of {length} bytes done"
        )))
    } else {
        Ok(())
    };
    let _ = tx.send(r);
}

/// An open of a GEOM provider (as `/dev/hast/NAME` for g_dev).
#[derive(Debug)]
pub struct Client {
    ptr: *mut sys::kshim_client,
    mediasize: u64,
    sectorsize: u32,
    name: String,
}

// SAFETY: the shim's clients may send bios from any thread at once; close
// happens once (close or Drop).
unsafe impl Send for Client {}
unsafe impl Sync for Client {}

impl Client {
    /// Open provider `name` with access counts (read, write, exclusive).
    pub fn open(name: &str, r: i32, w: i32, e: i32) -> Result<Client, KshimError> {
        let cname = cstring(name)?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name and a pointer to fill.
        errno(unsafe { sys::kshim_client_open(cname.as_ptr(), r, w, e, &mut ptr) }).map_err(
            |errno| KshimError::Open {
                name: name.to_owned(),
                errno,
            },
        )?;
        // SAFETY: ptr is an open client.
        let (mediasize, sectorsize) = unsafe {
            (
                sys::kshim_client_mediasize(ptr),
                sys::kshim_client_sectorsize(ptr),
            )
        };
        Ok(Client {
            ptr,
            mediasize: u64::try_from(mediasize).unwrap_or(0),
            sectorsize,
            name: name.to_owned(),
        })
    }

    /// The provider's size.
    pub fn mediasize(&self) -> u64 {
        self.mediasize
    }

    /// The provider's sector size.
    pub fn sectorsize(&self) -> u32 {
        self.sectorsize
    }

    /// One bio; `buf` holds `[at, at + length)` of a request's buffer.
    fn bio(
        &self,
        cmd: c_int,
        offset: u64,
        length: u64,
        buf: Option<(&Arc<IoBuf>, usize)>,
    ) -> oneshot::Receiver<io::Result<()>> {
        let (tx, rx) = oneshot::channel();
        let data = buf.map_or(std::ptr::null_mut(), |(b, at)| b.ptr(at));
        let piece = Box::new(Piece {
            buf: buf.map(|(b, _)| b.clone()),
            length: if buf.is_some() { length as i64 } else { 0 },
            tx,
        });
        let arg = Box::into_raw(piece);
        // SAFETY: the client is open; data stays valid until piece_done
        // (the Piece holds the buffer); arg is consumed by piece_done
        // exactly once unless this call fails.
        let rc = unsafe {
            sys::kshim_client_io(
                self.ptr,
                cmd,
                offset as i64,
                length as i64,
                data,
                piece_done,
                arg.cast(),
            )
        };
        if rc != 0 {
            // SAFETY: not handed to the shim.
            let piece = unsafe { Box::from_raw(arg) };
            let _ = piece.tx.send(Err(io::Error::from_raw_os_error(rc)));
        }
        rx
    }

    /// Send bios for `[offset, offset + len)` in pieces of at most
    /// [`MAXPHYS`], each with its part of `buf` (none for a delete).
    fn pieces(
        &self,
        cmd: c_int,
        offset: u64,
        len: u64,
        buf: Option<&Arc<IoBuf>>,
    ) -> Vec<oneshot::Receiver<io::Result<()>>> {
        let mut pending = Vec::new();
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(MAXPHYS);
            pending.push(self.bio(cmd, offset + at, n, buf.map(|b| (b, at as usize))));
            at += n;
        }
        pending
    }

    /// The answer of every piece: the first error, if any.
    async fn answers(pending: Vec<oneshot::Receiver<io::Result<()>>>) -> io::Result<()> {
        let mut result = Ok(());
        for rx in pending {
            let r = rx
                .await
                .unwrap_or_else(|_| Err(io::Error::other("bio lost")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Read `len` bytes at `offset`: the bios leave now, the future
    /// resolves with their data.
    pub fn read(
        &self,
        offset: u64,
        len: usize,
    ) -> impl std::future::Future<Output = io::Result<Vec<u8>>> + Send + 'static {
        let buf = Arc::new(IoBuf(UnsafeCell::new(vec![0u8; len].into_boxed_slice())));
        let pending = self.pieces(sys::KSHIM_BIO_READ, offset, len as u64, Some(&buf));
        async move {
            Client::answers(pending).await?;
            match Arc::try_unwrap(buf) {
                Ok(b) => Ok(b.0.into_inner().into_vec()),
                Err(_) => Err(io::Error::other("read buffer still in use")),
            }
        }
    }

    /// Write `data` at `offset`: the bios leave now.
    pub fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
        let len = data.len() as u64;
        let buf = Arc::new(IoBuf(UnsafeCell::new(data.into_boxed_slice())));
        let pending = self.pieces(sys::KSHIM_BIO_WRITE, offset, len, Some(&buf));
        Client::answers(pending)
    }

    /// BIO_DELETE of `[offset, offset + len)`: the bios leave now.
    pub fn delete(
        &self,
        offset: u64,
        len: u64,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
        Client::answers(self.pieces(sys::KSHIM_BIO_DELETE, offset, len, None))
    }

    /// BIO_FLUSH: the bio leaves now.
    pub fn flush(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
        Client::answers(vec![self.bio(sys::KSHIM_BIO_FLUSH, 0, 0, None)])
    }

    /// BIO_GETATTR of an int attribute. Blocking.
    pub fn getattr_int(&self, attr: &str) -> io::Result<i32> {
        let c = CString::new(attr).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut v = 0;
        // SAFETY: the client is open; c and v are valid.
        let rc = unsafe { sys::kshim_client_getattr_int(self.ptr, c.as_ptr(), &mut v) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(v)
    }

    /// Close (the access counts go, the consumer is detached), waiting up
    /// to `wait` for bios in flight. Blocking.
    pub fn close(self, wait: Duration) -> Result<(), (Client, Errno)> {
        let start = Instant::now();
        loop {
            // SAFETY: the client is open; on success it is gone.
            match errno(unsafe { sys::kshim_client_close(self.ptr) }) {
                Ok(()) => {
                    std::mem::forget(self);
                    return Ok(());
                }
                Err(Errno::EBUSY) if start.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err((self, e)),
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // SAFETY: the client is open (close() forgets it).
        if let Err(e) = errno(unsafe { sys::kshim_client_close(self.ptr) }) {
            tracing::error!("closing {} left it open: {e}", self.name);
        }
    }
}

/// The NBD export of a provider on the shim: every request becomes bios
/// that enter its start method (for `hast/NAME`: g_hast_start).
#[derive(Debug)]
pub struct GeomBackend {
    client: Client,
}

impl GeomBackend {
    /// Open `provider` for reading and writing.
    pub fn open(provider: &str) -> Result<GeomBackend, KshimError> {
        Ok(GeomBackend {
            client: Client::open(provider, 1, 1, 0)?,
        })
    }

    /// Close the provider once the bios in flight are done. Blocking.
    pub fn close(self, wait: Duration) -> Result<(), Errno> {
        // On failure the Client's Drop tries once more and logs.
        self.client.close(wait).map_err(|(_client, e)| e)
    }

    async fn fua(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.client.flush().await
        } else {
            Ok(())
        }
    }
}

impl Backend for GeomBackend {
    fn size(&self) -> u64 {
        self.client.mediasize()
    }

    fn block_size(&self) -> u32 {
        self.client.sectorsize()
    }

    fn read(&self, off: u64, len: u32) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        Box::pin(self.client.read(off, len as usize))
    }

    fn write(&self, off: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.client.write(off, data).await?;
            self.fua(fua).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.client.flush())
    }

    fn trim(&self, off: u64, len: u32, fua: bool) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.client.delete(off, u64::from(len)).await?;
            self.fua(fua).await
        })
    }

    fn write_zeroes(
        &self,
        off: u64,
        len: u32,
        _no_hole: bool,
        fua: bool,
    ) -> BoxFuture<'_, io::Result<()>> {
        // GEOM has no zeroing command: zeros are written.
        Box::pin(async move {
            self.client.write(off, vec![0u8; len as usize]).await?;
            self.fua(fua).await
        })
    }
}

//! The FreeBSD transport of the dataplane channel: the engine's upcalls and
//! downcalls as ioctls on `/dev/hastctl` (the geom_hast kernel module,
//! kmod/g_hast.c), wrapped in the safe [`KernelDevice`].
//!
//! Everything here is portable except the seven ioctl calls themselves
//! (`nix::ioctl_readwrite!`, compiled only for FreeBSD). On other systems
//! the same API exists, opening a path still works, and every call answers
//! [`KdevError::Unsupported`], so the code is type-checked and unit-tested
//! on Linux. In a test build (feature `kshim`) the ioctls can instead go to
//! the module itself running on the userland kernel shim
//! ([`KernelDevice::open_kshim`]). The contract of each ioctl is the comment above `g_hast_ioctl`
//! in kmod/g_hast.c; the structs and constants come from ffi/hast_abi.h
//! through hast-sys.

use std::ffi::c_char;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use hast_sys as sys;
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode as FileMode;

use crate::core::{IoCmd, MapKind, Mode, Params, Stats, SyncDir, Upcall, UpcallKind};

/// The control device the kernel module creates.
pub const DEFAULT_PATH: &str = "/dev/hastctl";

/// `_IOWR` group of every HAST ioctl (`HAST_IOC_GROUP`, 'H').
pub const IOC_GROUP: u8 = b'H';

/// Longest resync I/O the kernel accepts (its `G_HAST_SYNC_MAXIO`, which
/// is this project's request limit, [`crate::wire::MAX_IO`]).
pub const SYNC_MAX_IO: usize = crate::wire::MAX_IO_BYTES;

/// Largest write payload [`KernelDevice::next_upcall`] will grow its buffer
/// to; far above any MAXPHYS, so only a confused kernel reaches it.
pub const MAX_UPCALL_DATA: usize = 64 * 1024 * 1024;

/// Bytes of a name field in [`sys::hast_abi_create`], terminator included.
pub const NAME_LEN: usize = sys::HAST_ABI_NAMELEN as usize;

/// One of the seven ioctls of ffi/hast_abi.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ioctl {
    Create,
    Destroy,
    Upcall,
    Downcall,
    Range,
    Map,
    Stats,
}

impl Ioctl {
    /// Every ioctl, in command-number order.
    pub const ALL: [Ioctl; 7] = [
        Ioctl::Create,
        Ioctl::Destroy,
        Ioctl::Upcall,
        Ioctl::Downcall,
        Ioctl::Range,
        Ioctl::Map,
        Ioctl::Stats,
    ];

    /// The C macro name, as in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Ioctl::Create => "HAST_IOC_CREATE",
            Ioctl::Destroy => "HAST_IOC_DESTROY",
            Ioctl::Upcall => "HAST_IOC_UPCALL",
            Ioctl::Downcall => "HAST_IOC_DOWNCALL",
            Ioctl::Range => "HAST_IOC_RANGE",
            Ioctl::Map => "HAST_IOC_MAP",
            Ioctl::Stats => "HAST_IOC_STATS",
        }
    }

    /// The command number `n` of `_IOWR('H', n, struct)`.
    pub const fn number(self) -> u8 {
        match self {
            Ioctl::Create => 1,
            Ioctl::Destroy => 2,
            Ioctl::Upcall => 3,
            Ioctl::Downcall => 4,
            Ioctl::Range => 5,
            Ioctl::Map => 6,
            Ioctl::Stats => 7,
        }
    }

    /// Size of the struct the ioctl carries (the `_IOWR` length).
    pub const fn arg_size(self) -> usize {
        match self {
            Ioctl::Create | Ioctl::Destroy => size_of::<sys::hast_abi_create>(),
            Ioctl::Upcall => size_of::<sys::hast_abi_upcall>(),
            Ioctl::Downcall => size_of::<sys::hast_abi_downcall>(),
            Ioctl::Range => size_of::<sys::hast_abi_range>(),
            Ioctl::Map => size_of::<sys::hast_abi_map>(),
            Ioctl::Stats => size_of::<sys::hast_abi_stats>(),
        }
    }

    /// The request number in this platform's `_IOWR` encoding (nix's
    /// `request_code_readwrite!`): what the FreeBSD build passes to ioctl(2).
    pub fn request(self) -> u64 {
        let code = nix::request_code_readwrite!(IOC_GROUP, self.number(), self.arg_size());
        // ioctl_num_type is an unsigned long or an int depending on the
        // platform; the HAST numbers are 32-bit patterns either way.
        #[allow(clippy::unnecessary_cast)]
        let code = code as u64;
        code & 0xffff_ffff
    }

    /// The request number in FreeBSD's `_IOWR` encoding, computed here for
    /// any host: `IOC_INOUT | (len & IOCPARM_MASK) << 16 | group << 8 | n`.
    pub const fn freebsd_request(self) -> u32 {
        freebsd_iowr(IOC_GROUP, self.number(), self.arg_size())
    }
}

impl std::fmt::Display for Ioctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// FreeBSD's sys/ioccom.h `_IOWR(group, num, len)` for a struct of `len`
/// bytes (`IOC_IN | IOC_OUT`, 13-bit parameter length).
pub const fn freebsd_iowr(group: u8, num: u8, len: usize) -> u32 {
    const IOC_OUT: u32 = 0x4000_0000;
    const IOC_IN: u32 = 0x8000_0000;
    const IOCPARM_MASK: u32 = 0x1fff;
    (IOC_IN | IOC_OUT)
        | (((len as u32) & IOCPARM_MASK) << 16)
        | ((group as u32) << 8)
        | (num as u32)
}

/// What went wrong talking to the kernel module.
#[derive(Debug, thiserror::Error)]
pub enum KdevError {
    #[error(
        "{op}: the kernel transport is only available on FreeBSD; on this system run the userland host (uhost)"
    )]
    Unsupported { op: Ioctl },
    #[error("cannot open {}: {errno} (is geom_hast loaded? `kldload geom_hast`)", path.display())]
    Open { path: PathBuf, errno: Errno },
    #[error("{op} on {}: {errno}: {}", path.display(), hint(*op, *errno))]
    Ioctl {
        op: Ioctl,
        path: PathBuf,
        errno: Errno,
    },
    #[error(
        "{field} {value:?}: {reason} (at most {} bytes of [A-Za-z0-9._:+-]{})",
        NAME_LEN - 1,
        if *field == "local provider" { " and '/'" } else { "" }
    )]
    Name {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{op}: {what}")]
    Invalid { op: Ioctl, what: String },
    #[error("{op}: the kernel answered {what}; geom_hast and hastd do not match, reinstall both")]
    Protocol { op: Ioctl, what: String },
}

impl KdevError {
    /// The errno of a failed ioctl or open.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            KdevError::Ioctl { errno, .. } | KdevError::Open { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// What an errno means for one ioctl (the contract in kmod/g_hast.c).
fn hint(op: Ioctl, errno: Errno) -> &'static str {
    match (op, errno) {
        (_, Errno::EPROTONOSUPPORT) => {
            "ABI version mismatch between hastd and geom_hast; install matching versions"
        }
        (_, Errno::EBADF) => "the control device must be open for writing",
        (_, Errno::ENOTTY) => "not a HAST control device",
        (_, Errno::ENXIO) => "no such instance (destroyed or never created)",
        (Ioctl::Create, Errno::EEXIST) => "a provider of that name already exists",
        (Ioctl::Create, Errno::ENOENT) => "the local provider does not exist",
        (Ioctl::Create, Errno::EINVAL) => {
            "bad name, geometry or offsets (map and data must fit the local provider)"
        }
        (Ioctl::Destroy, Errno::EBUSY) => {
            "hast/NAME is open or its local I/O did not finish; close it and retry"
        }
        (Ioctl::Downcall, Errno::ENOENT) => {
            "that seq has nothing outstanding (finished or link lost); ignore it"
        }
        (Ioctl::Upcall | Ioctl::Range, Errno::EINTR) => "interrupted by a signal; call again",
        (Ioctl::Range, Errno::EIO) => "the range failed and stays dirty",
        (Ioctl::Range, Errno::EBUSY) => "the lock still has I/O in flight",
        (_, Errno::EINVAL) => "invalid argument",
        (_, Errno::EFAULT) => "bad user buffer",
        (_, Errno::ENOMEM) => "out of memory; retry later",
        _ => "unexpected error",
    }
}

/// An instance of the kernel module (`hc_unit`), never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Unit(pub u64);

/// Everything HAST_IOC_CREATE needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    /// Resource name: the provider becomes `hast/NAME`.
    pub name: String,
    /// Local GEOM provider (`ada0p3`; a leading `/dev/` is dropped).
    pub local: String,
    pub params: Params,
    /// Data offset on the local provider (metadata + activemap before it).
    pub localoff: u64,
    /// Activemap offset on the local provider (4096).
    pub mapoff: u64,
    /// Flush the local provider after every activemap write.
    pub metaflush: bool,
    /// The on-disk activemap, loaded before `hast/NAME` appears (empty:
    /// none; then [`KernelDevice::map_load`] it before the first write).
    pub map: Vec<u8>,
}

/// A name as the kernel accepts it (g_hast_copyname): non-empty, at most
/// `NAME_LEN - 1` bytes, `[A-Za-z0-9._:+-]`, `/` only if `slash`. Returns
/// the NUL-padded field.
pub fn encode_name(
    field: &'static str,
    value: &str,
    slash: bool,
) -> Result<[c_char; NAME_LEN], KdevError> {
    let err = |reason| KdevError::Name {
        field,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(err("empty"));
    }
    if value.len() >= NAME_LEN {
        return Err(err("too long for the kernel's name field"));
    }
    let ok = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'_' | b'-' | b':' | b'+')
            || (slash && b == b'/')
    };
    if !value.bytes().all(ok) {
        return Err(err("contains a character the kernel refuses"));
    }
    let mut out = [0 as c_char; NAME_LEN];
    for (dst, b) in out.iter_mut().zip(value.bytes()) {
        *dst = b as c_char;
    }
    Ok(out)
}

/// The [`sys::hast_abi_create`] for `spec`, names checked. It points at
/// `spec.map`: keep `spec` alive until the ioctl returned.
pub fn create_arg(spec: &CreateSpec) -> Result<sys::hast_abi_create, KdevError> {
    let local = spec.local.strip_prefix("/dev/").unwrap_or(&spec.local);
    let mapsize = u32::try_from(spec.map.len()).map_err(|_| KdevError::Invalid {
        op: Ioctl::Create,
        what: format!("an activemap of {} bytes", spec.map.len()),
    })?;
    Ok(sys::hast_abi_create {
        hc_version: sys::HAST_ABI_VERSION,
        hc_mode: spec.params.mode.raw(),
        hc_name: encode_name("resource name", &spec.name, false)?,
        hc_local: encode_name("local provider", local, true)?,
        hc_mediasize: spec.params.mediasize,
        hc_localoff: spec.localoff,
        hc_mapoff: spec.mapoff,
        hc_extentsize: spec.params.extentsize,
        hc_keepdirty: spec.params.keepdirty,
        hc_sectorsize: spec.params.sectorsize,
        hc_flags: if spec.metaflush {
            sys::HAST_CREATEF_METAFLUSH
        } else {
            0
        },
        hc_unit: 0,
        hc_map: if spec.map.is_empty() {
            0
        } else {
            addr(spec.map.as_ptr())
        },
        hc_mapsize: mapsize,
        hc_pad0: 0,
    })
}

/// Decode an upcall the kernel returned.
pub fn decode_upcall(up: &sys::hast_abi_upcall) -> Result<Upcall, KdevError> {
    if up.hu_version != sys::HAST_ABI_VERSION {
        return Err(KdevError::Protocol {
            op: Ioctl::Upcall,
            what: format!("ABI version {}", up.hu_version),
        });
    }
    Upcall::from_raw(up).ok_or_else(|| KdevError::Protocol {
        op: Ioctl::Upcall,
        what: format!("unknown upcall kind {}", up.hu_kind),
    })
}

/// Convert the kernel's counters.
pub fn decode_stats(st: &sys::hast_abi_stats) -> Stats {
    Stats::from(st)
}

/// A user address as the ABI carries it.
fn addr<T>(p: *const T) -> u64 {
    p as usize as u64
}

/// An ioctl argument struct: which ioctl carries it and, on FreeBSD, the
/// call itself.
trait Arg {
    const OP: Ioctl;
    /// # Safety
    /// `fd` is open and every user address inside `*arg` is valid for the
    /// length the struct gives it.
    #[cfg(target_os = "freebsd")]
    unsafe fn call(fd: std::ffi::c_int, arg: *mut Self) -> nix::Result<std::ffi::c_int>;
}

/// The only OS-specific code: the ioctl(2) calls, with nix's `_IOWR`.
#[cfg(target_os = "freebsd")]
mod raw {
    use super::{sys, IOC_GROUP};
    nix::ioctl_readwrite!(create, IOC_GROUP, 1, sys::hast_abi_create);
    nix::ioctl_readwrite!(destroy, IOC_GROUP, 2, sys::hast_abi_create);
    nix::ioctl_readwrite!(upcall, IOC_GROUP, 3, sys::hast_abi_upcall);
    nix::ioctl_readwrite!(downcall, IOC_GROUP, 4, sys::hast_abi_downcall);
    nix::ioctl_readwrite!(range, IOC_GROUP, 5, sys::hast_abi_range);
    nix::ioctl_readwrite!(map, IOC_GROUP, 6, sys::hast_abi_map);
    nix::ioctl_readwrite!(stats, IOC_GROUP, 7, sys::hast_abi_stats);
}

macro_rules! arg {
    ($ty:ty, $op:expr, $f:ident) => {
        impl Arg for $ty {
            const OP: Ioctl = $op;
            #[cfg(target_os = "freebsd")]
            unsafe fn call(fd: std::ffi::c_int, arg: *mut Self) -> nix::Result<std::ffi::c_int> {
                // SAFETY: forwarded from the caller.
                unsafe { raw::$f(fd, arg) }
            }
        }
    };
}

/// DESTROY carries the CREATE struct; a wrapper gives it its own ioctl.
#[repr(transparent)]
struct DestroyArg(sys::hast_abi_create);

arg!(sys::hast_abi_create, Ioctl::Create, create);
arg!(sys::hast_abi_upcall, Ioctl::Upcall, upcall);
arg!(sys::hast_abi_downcall, Ioctl::Downcall, downcall);
arg!(sys::hast_abi_range, Ioctl::Range, range);
arg!(sys::hast_abi_map, Ioctl::Map, map);
arg!(sys::hast_abi_stats, Ioctl::Stats, stats);

impl Arg for DestroyArg {
    const OP: Ioctl = Ioctl::Destroy;
    #[cfg(target_os = "freebsd")]
    unsafe fn call(fd: std::ffi::c_int, arg: *mut Self) -> nix::Result<std::ffi::c_int> {
        // SAFETY: forwarded; DestroyArg is repr(transparent).
        unsafe { raw::destroy(fd, arg.cast::<sys::hast_abi_create>()) }
    }
}

/// An open `/dev/hastctl`: the engine's side of every kernel instance it
/// created through it. Closing the last reference to the descriptor takes
/// the link of those instances down (the kernel's rule).
///
/// Every method is one blocking ioctl and takes `&self`: share the device
/// between threads (it is `Send + Sync`), with one thread per instance
/// parked in [`KernelDevice::next_upcall`] (run it on a blocking thread,
/// e.g. `tokio::task::spawn_blocking`) while others send downcalls. That
/// call returns ENXIO once the instance is destroyed, EINTR on a signal.
pub struct KernelDevice {
    fd: Option<OwnedFd>,
    path: PathBuf,
    /// Tests only: the module itself on the userland kernel shim answers
    /// the ioctls (`crate::kshim`).
    #[cfg(all(feature = "kshim", target_os = "linux"))]
    kshim: Option<crate::kshim::CtlFile>,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("path", &self.path)
            .finish()
    }
}

impl KernelDevice {
    /// Whether this transport can be used with the control device at
    /// `path`: on FreeBSD when it exists (geom_hast is loaded), never on
    /// other systems. The engine picks the kernel host or uhost with it.
    pub fn available(path: impl AsRef<Path>) -> bool {
        cfg!(target_os = "freebsd") && path.as_ref().exists()
    }

    /// Whether hastd runs its primaries in the kernel module: on FreeBSD
    /// with geom_hast loaded, or, in a test build, on the userland kernel
    /// shim when `HAST_KSHIM` is set.
    pub fn kernel_host() -> bool {
        #[cfg(all(feature = "kshim", target_os = "linux"))]
        if crate::kshim::selected() {
            return true;
        }
        KernelDevice::available(DEFAULT_PATH)
    }

    /// Open the module's control device for reading and writing:
    /// [`DEFAULT_PATH`], or the shim's when it is selected.
    pub fn open() -> Result<KernelDevice, KdevError> {
        #[cfg(all(feature = "kshim", target_os = "linux"))]
        if crate::kshim::selected() {
            return KernelDevice::open_kshim(true);
        }
        KernelDevice::open_path(DEFAULT_PATH)
    }

    /// Tests only: `/dev/hastctl` of the module on the userland kernel
    /// shim (loaded first if need be).
    #[cfg(all(feature = "kshim", target_os = "linux"))]
    pub fn open_kshim(write: bool) -> Result<KernelDevice, KdevError> {
        let path = PathBuf::from(DEFAULT_PATH);
        crate::kshim::load().map_err(|e| KdevError::Open {
            path: path.clone(),
            errno: match e {
                crate::kshim::KshimError::Load(errno) => errno,
                _ => Errno::ENXIO,
            },
        })?;
        let file = crate::kshim::CtlFile::open(write).map_err(|errno| KdevError::Open {
            path: path.clone(),
            errno,
        })?;
        Ok(KernelDevice {
            fd: None,
            path,
            kshim: Some(file),
        })
    }

    /// Open a control device at `path` for reading and writing.
    pub fn open_path(path: impl AsRef<Path>) -> Result<KernelDevice, KdevError> {
        KernelDevice::open_with(path.as_ref(), OFlag::O_RDWR)
    }

    /// Open read-only: enough for [`KernelDevice::stats`] (hastctl).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<KernelDevice, KdevError> {
        KernelDevice::open_with(path.as_ref(), OFlag::O_RDONLY)
    }

    fn open_with(path: &Path, flags: OFlag) -> Result<KernelDevice, KdevError> {
        let fd = open(path, flags | OFlag::O_CLOEXEC, FileMode::empty()).map_err(|errno| {
            KdevError::Open {
                path: path.to_owned(),
                errno,
            }
        })?;
        Ok(KernelDevice {
            fd: Some(fd),
            path: path.to_owned(),
            #[cfg(all(feature = "kshim", target_os = "linux"))]
            kshim: None,
        })
    }

    /// The path this device was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One ioctl; every user address in `arg` must be valid for its length.
    fn ioctl<T: Arg>(&self, arg: &mut T) -> Result<(), KdevError> {
        #[cfg(all(feature = "kshim", target_os = "linux"))]
        if let Some(file) = &self.kshim {
            // SAFETY: as for the real ioctl below; the module decodes the
            // FreeBSD encoding of the command.
            return unsafe { file.ioctl(T::OP.freebsd_request(), (arg as *mut T).cast()) }.map_err(
                |errno| KdevError::Ioctl {
                    op: T::OP,
                    path: self.path.clone(),
                    errno,
                },
            );
        }
        let Some(fd) = &self.fd else {
            return Err(KdevError::Unsupported { op: T::OP });
        };
        #[cfg(target_os = "freebsd")]
        {
            // SAFETY: the descriptor is open; the callers fill `arg` with
            // addresses of live buffers of the lengths they state.
            match unsafe { T::call(fd.as_raw_fd(), arg) } {
                Ok(_) => Ok(()),
                Err(errno) => Err(KdevError::Ioctl {
                    op: T::OP,
                    path: self.path.clone(),
                    errno,
                }),
            }
        }
        #[cfg(not(target_os = "freebsd"))]
        {
            let _ = (arg, fd.as_raw_fd());
            Err(KdevError::Unsupported { op: T::OP })
        }
    }

    /// HAST_IOC_CREATE: provider `hast/NAME` on the local provider, link
    /// down, a localcnt bump owed; load the on-disk map before writes.
    pub fn create(&self, spec: &CreateSpec) -> Result<Unit, KdevError> {
        let mut c = create_arg(spec)?;
        self.ioctl(&mut c)?;
        Ok(Unit(c.hc_unit))
    }

    /// HAST_IOC_DESTROY (EBUSY while `hast/NAME` is open).
    pub fn destroy(&self, unit: Unit) -> Result<(), KdevError> {
        let mut d = DestroyArg(sys::hast_abi_create {
            hc_version: sys::HAST_ABI_VERSION,
            hc_unit: unit.0,
            ..Default::default()
        });
        self.ioctl(&mut d)
    }

    /// HAST_IOC_UPCALL: block until the instance has an upcall, take it.
    /// A write's payload lands in `buf` (grown as needed, so pass the same
    /// Vec every time); after the call `buf` holds exactly the payload (empty
    /// for other kinds). A signal interrupts it (EINTR: call again).
    pub fn next_upcall(&self, unit: Unit, buf: &mut Vec<u8>) -> Result<Upcall, KdevError> {
        loop {
            buf.clear();
            let cap = buf.capacity();
            let mut u = sys::hast_abi_upcall {
                hu_version: sys::HAST_ABI_VERSION,
                hu_unit: unit.0,
                hu_data: addr(buf.as_mut_ptr()),
                hu_datalen: cap as u64,
                ..Default::default()
            };
            self.ioctl(&mut u)?;
            let up = decode_upcall(&u)?;
            if !matches!(up.kind, UpcallKind::Write { .. }) {
                return Ok(up);
            }
            let len = usize::try_from(u.hu_datalen).unwrap_or(usize::MAX);
            if u.hu_error == Errno::ENOMEM as i32 {
                // Parked in the kernel: the same upcall comes again.
                if len <= cap || len > MAX_UPCALL_DATA {
                    return Err(KdevError::Protocol {
                        op: Ioctl::Upcall,
                        what: format!("a payload of {len} bytes for a {cap}-byte buffer"),
                    });
                }
                buf.reserve_exact(len);
                continue;
            }
            if len > cap || u.hu_datalen != u.hu_length {
                return Err(KdevError::Protocol {
                    op: Ioctl::Upcall,
                    what: format!(
                        "{} payload bytes for a {}-byte write into a {cap}-byte buffer",
                        u.hu_datalen, u.hu_length
                    ),
                });
            }
            // SAFETY: the kernel copied exactly `len` bytes (<= capacity)
            // to the start of the buffer.
            unsafe { buf.set_len(len) };
            return Ok(up);
        }
    }

    /// One downcall; returns its `hd_seq` as the kernel left it (an output
    /// for [`KernelDevice::flush`]).
    fn downcall(
        &self,
        unit: Unit,
        kind: u32,
        seq: u64,
        error: i32,
        arg: u32,
        data: &[u8],
    ) -> Result<u64, KdevError> {
        if error < 0 {
            return Err(KdevError::Invalid {
                op: Ioctl::Downcall,
                what: format!("error {error} is not an errno"),
            });
        }
        let mut d = sys::hast_abi_downcall {
            hd_version: sys::HAST_ABI_VERSION,
            hd_kind: kind,
            hd_unit: unit.0,
            hd_seq: seq,
            hd_error: error,
            hd_arg: arg,
            hd_data: if data.is_empty() {
                0
            } else {
                addr(data.as_ptr())
            },
            hd_datalen: data.len() as u64,
        };
        self.ioctl(&mut d)?;
        Ok(d.hd_seq)
    }

    /// The remote half of `seq` finished with `error` (errno, 0 = success).
    /// For a peer read that succeeded, `data` is the read's bytes (exactly
    /// its length); otherwise pass an empty slice.
    pub fn remote_done(
        &self,
        unit: Unit,
        seq: u64,
        error: i32,
        data: &[u8],
    ) -> Result<(), KdevError> {
        self.downcall(unit, sys::HAST_DOWN_REMOTE_DONE, seq, error, 0, data)
            .map(drop)
    }

    /// memsync: the peer received write `seq`.
    pub fn remote_received(&self, unit: Unit, seq: u64) -> Result<(), KdevError> {
        self.downcall(unit, sys::HAST_DOWN_REMOTE_RECV, seq, 0, 0, &[])
            .map(drop)
    }

    /// The localcnt bump was persisted (0) or not (errno).
    pub fn bump_done(&self, unit: Unit, error: i32) -> Result<(), KdevError> {
        self.downcall(unit, sys::HAST_DOWN_BUMP_DONE, 0, error, 0, &[])
            .map(drop)
    }

    /// Link to the peer up or down.
    pub fn set_link(&self, unit: Unit, up: bool) -> Result<(), KdevError> {
        let state = if up {
            sys::HAST_LINK_UP
        } else {
            sys::HAST_LINK_DOWN
        };
        self.downcall(unit, sys::HAST_DOWN_LINK, 0, 0, state, &[])
            .map(drop)
    }

    /// Synchronization direction.
    pub fn set_sync_dir(&self, unit: Unit, dir: SyncDir) -> Result<(), KdevError> {
        self.downcall(unit, sys::HAST_DOWN_SYNCDIR, 0, 0, dir.raw(), &[])
            .map(drop)
    }

    /// Replication mode for requests from now on.
    pub fn set_mode(&self, unit: Unit, mode: Mode) -> Result<(), KdevError> {
        self.downcall(unit, sys::HAST_DOWN_MODE, 0, 0, mode.raw(), &[])
            .map(drop)
    }

    /// Start the core's own flush of both sides; its flush number (see
    /// [`crate::core::Core::flush`]). `EBUSY` while one runs, `EIO` with
    /// the link down.
    pub fn flush(&self, unit: Unit) -> Result<u32, KdevError> {
        let n = self.downcall(unit, sys::HAST_DOWN_FLUSH, 0, 0, 0, &[])?;
        u32::try_from(n).map_err(|_| KdevError::Invalid {
            op: Ioctl::Downcall,
            what: format!("flush number {n} out of range"),
        })
    }

    fn range(&self, r: &mut sys::hast_abi_range) -> Result<(), KdevError> {
        r.hr_version = sys::HAST_ABI_VERSION;
        self.ioctl(r)
    }

    /// Ask for a sync range lock; returns its seq, granted later by a
    /// [`UpcallKind::SyncLocked`] upcall.
    pub fn sync_lock(&self, unit: Unit, offset: u64, length: u64) -> Result<u64, KdevError> {
        let mut r = sys::hast_abi_range {
            hr_op: sys::HAST_RANGE_LOCK,
            hr_unit: unit.0,
            hr_offset: offset,
            hr_length: length,
            ..Default::default()
        };
        self.range(&mut r)?;
        Ok(r.hr_seq)
    }

    fn sync_io(
        &self,
        unit: Unit,
        lock: u64,
        cmd: IoCmd,
        offset: u64,
        buf: *mut u8,
        len: usize,
    ) -> Result<u64, KdevError> {
        if len == 0 || len > SYNC_MAX_IO {
            return Err(KdevError::Invalid {
                op: Ioctl::Range,
                what: format!("a sync I/O of {len} bytes (1 to {SYNC_MAX_IO})"),
            });
        }
        let mut r = sys::hast_abi_range {
            hr_op: sys::HAST_RANGE_IO,
            hr_unit: unit.0,
            hr_seq: lock,
            hr_offset: offset,
            hr_length: len as u64,
            // sync_read and sync_write pass only Read or Write.
            hr_cmd: cmd.raw(),
            hr_data: addr(buf),
            ..Default::default()
        };
        self.range(&mut r)?;
        Ok(r.hr_ioseq)
    }

    /// Read `buf.len()` bytes at `offset` from the local provider under
    /// granted lock `lock`; returns when done, with the seq of the
    /// [`UpcallKind::SyncIoDone`] upcall that follows and must be taken.
    pub fn sync_read(
        &self,
        unit: Unit,
        lock: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<u64, KdevError> {
        self.sync_io(unit, lock, IoCmd::Read, offset, buf.as_mut_ptr(), buf.len())
    }

    /// Write `data` at `offset` to the local provider under lock `lock`;
    /// as [`KernelDevice::sync_read`].
    pub fn sync_write(
        &self,
        unit: Unit,
        lock: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, KdevError> {
        // The kernel only reads from a write's buffer.
        self.sync_io(
            unit,
            lock,
            IoCmd::Write,
            offset,
            data.as_ptr().cast_mut(),
            data.len(),
        )
    }

    /// Release lock `lock`; `clear` marks the extents it covers as
    /// synchronized. EIO: released, but the range failed and stays dirty.
    pub fn sync_release(&self, unit: Unit, lock: u64, clear: bool) -> Result<(), KdevError> {
        let mut r = sys::hast_abi_range {
            hr_op: sys::HAST_RANGE_RELEASE,
            hr_unit: unit.0,
            hr_seq: lock,
            hr_flags: if clear { sys::HAST_RANGEF_CLEAR } else { 0 },
            ..Default::default()
        };
        self.range(&mut r)
    }

    fn map_call(
        &self,
        unit: Unit,
        op: u32,
        which: u32,
        data: *mut u8,
        len: usize,
    ) -> Result<sys::hast_abi_map, KdevError> {
        let size = u32::try_from(len).map_err(|_| KdevError::Invalid {
            op: Ioctl::Map,
            what: format!("a map of {len} bytes"),
        })?;
        let mut m = sys::hast_abi_map {
            hm_version: sys::HAST_ABI_VERSION,
            hm_op: op,
            hm_which: which,
            hm_size: size,
            hm_unit: unit.0,
            hm_data: if data.is_null() { 0 } else { addr(data) },
        };
        self.ioctl(&mut m)?;
        Ok(m)
    }

    /// Bytes of the instance's activemap.
    pub fn map_size(&self, unit: Unit) -> Result<usize, KdevError> {
        let m = self.map_call(
            unit,
            sys::HAST_MAPOP_GET,
            sys::HAST_MAP_SYNC,
            std::ptr::null_mut(),
            0,
        )?;
        Ok(m.hm_size as usize)
    }

    /// A copy of one bitmap (bit n of byte n / 8 is extent n).
    pub fn map(&self, unit: Unit, kind: MapKind) -> Result<Vec<u8>, KdevError> {
        let size = self.map_size(unit)?;
        let mut buf = vec![0u8; size];
        let m = self.map_call(
            unit,
            sys::HAST_MAPOP_GET,
            kind.raw(),
            buf.as_mut_ptr(),
            buf.len(),
        )?;
        if m.hm_size as usize != size {
            return Err(KdevError::Protocol {
                op: Ioctl::Map,
                what: format!("a {}-byte map after announcing {size}", m.hm_size),
            });
        }
        Ok(buf)
    }

    /// At start: the on-disk activemap becomes the disk map and sync map.
    pub fn map_load(&self, unit: Unit, map: &[u8]) -> Result<(), KdevError> {
        self.map_call(
            unit,
            sys::HAST_MAPOP_LOAD,
            0,
            map.as_ptr().cast_mut(),
            map.len(),
        )
        .map(drop)
    }

    /// OR the peer's map into the sync map.
    pub fn map_merge(&self, unit: Unit, map: &[u8]) -> Result<(), KdevError> {
        self.map_call(
            unit,
            sys::HAST_MAPOP_MERGE,
            0,
            map.as_ptr().cast_mut(),
            map.len(),
        )
        .map(drop)
    }

    /// Write the metadata block (`block`: whole sectors, ending before the
    /// activemap) at offset 0 of the local provider and flush it; returns
    /// once it is on stable storage. The engine's only way to record its
    /// counters while the module holds the disk open exclusively.
    pub fn write_metadata(&self, unit: Unit, block: &[u8]) -> Result<(), KdevError> {
        if block.is_empty() {
            return Err(KdevError::Invalid {
                op: Ioctl::Map,
                what: "an empty metadata block".into(),
            });
        }
        self.map_call(
            unit,
            sys::HAST_MAPOP_METADATA,
            0,
            block.as_ptr().cast_mut(),
            block.len(),
        )
        .map(drop)
    }

    /// Counters and queue sizes.
    pub fn stats(&self, unit: Unit) -> Result<Stats, KdevError> {
        let mut s = sys::hast_abi_stats {
            hs_version: sys::HAST_ABI_VERSION,
            hs_unit: unit.0,
            ..Default::default()
        };
        self.ioctl(&mut s)?;
        Ok(decode_stats(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CreateSpec {
        CreateSpec {
            name: "shared".into(),
            local: "/dev/ada0p3".into(),
            params: Params {
                mediasize: 1 << 30,
                extentsize: 2 << 20,
                sectorsize: 512,
                keepdirty: 64,
                mode: Mode::MemSync,
            },
            localoff: 8192 + 4096,
            mapoff: 4096,
            metaflush: true,
            map: vec![0x81; 64],
        }
    }

    fn name_bytes(field: &[c_char; NAME_LEN]) -> Vec<u8> {
        field.iter().map(|&c| c as u8).collect()
    }

    #[test]
    fn structs_match_hast_sys_and_fit_an_ioctl() {
        let expect = [
            (Ioctl::Create, 200),
            (Ioctl::Destroy, 200),
            (Ioctl::Upcall, 72),
            (Ioctl::Downcall, 48),
            (Ioctl::Range, 64),
            (Ioctl::Map, 32),
            (Ioctl::Stats, 216),
        ];
        for (op, size) in expect {
            assert_eq!(op.arg_size(), size, "{op}");
            assert_eq!(op.arg_size() % 8, 0, "{op}");
            // IOCPARM_MAX: a larger struct would not fit _IOWR's length.
            assert!(op.arg_size() < 8192, "{op}");
        }
        assert_eq!(size_of::<sys::hast_abi_create>(), 200);
        assert_eq!(sys::HAST_ABI_VERSION, 3);
        assert_eq!(NAME_LEN, 64);
    }

    /// The table here against the header the kernel module compiles:
    /// bindgen drops the function-like HAST_IOC_* macros, so read them.
    #[test]
    fn ioctl_table_matches_ffi_header() {
        let header = include_str!("../../../ffi/hast_abi.h");
        let norm: String = header.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(norm.contains("#define HAST_IOC_GROUP 'H'"));
        for (op, ty) in [
            (Ioctl::Create, "hast_abi_create"),
            (Ioctl::Destroy, "hast_abi_create"),
            (Ioctl::Upcall, "hast_abi_upcall"),
            (Ioctl::Downcall, "hast_abi_downcall"),
            (Ioctl::Range, "hast_abi_range"),
            (Ioctl::Map, "hast_abi_map"),
            (Ioctl::Stats, "hast_abi_stats"),
        ] {
            let line = format!(
                "#define {} _IOWR(HAST_IOC_GROUP, {}, struct {ty})",
                op.name(),
                op.number()
            );
            assert!(norm.contains(&line), "ffi/hast_abi.h lacks `{line}`");
        }
    }

    #[test]
    fn every_struct_starts_with_the_abi_version() {
        // The kernel reads the first uint32_t of every argument as the
        // version before anything else.
        assert_eq!(std::mem::offset_of!(sys::hast_abi_create, hc_version), 0);
        assert_eq!(std::mem::offset_of!(sys::hast_abi_upcall, hu_version), 0);
        assert_eq!(std::mem::offset_of!(sys::hast_abi_downcall, hd_version), 0);
        assert_eq!(std::mem::offset_of!(sys::hast_abi_range, hr_version), 0);
        assert_eq!(std::mem::offset_of!(sys::hast_abi_map, hm_version), 0);
        assert_eq!(std::mem::offset_of!(sys::hast_abi_stats, hs_version), 0);
        let c = create_arg(&spec()).unwrap();
        assert_eq!(c.hc_version, sys::HAST_ABI_VERSION);
    }

    #[test]
    fn freebsd_request_numbers_match_the_hand_computed_encoding() {
        // _IOWR('H', 1, struct hast_abi_create) by hand: IOC_INOUT
        // 0xc0000000 | 200 (0xc8) << 16 | 'H' (0x48) << 8 | 1.
        assert_eq!(Ioctl::Create.freebsd_request(), 0xc0c8_4801);
        let table = [
            (Ioctl::Create, 0xc0c8_4801u32),
            (Ioctl::Destroy, 0xc0c8_4802),
            (Ioctl::Upcall, 0xc048_4803),
            (Ioctl::Downcall, 0xc030_4804),
            (Ioctl::Range, 0xc040_4805),
            (Ioctl::Map, 0xc020_4806),
            (Ioctl::Stats, 0xc0d8_4807),
        ];
        for (op, code) in table {
            assert_eq!(op.freebsd_request(), code, "{op}");
        }
        // The 13-bit length field: a longer struct would wrap.
        assert_eq!(freebsd_iowr(b'H', 1, 8192), 0xc000_4801);
    }

    #[test]
    fn request_numbers_are_distinct() {
        let mut codes: Vec<u64> = Ioctl::ALL.iter().map(|op| op.request()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), 7);
        for op in Ioctl::ALL {
            assert_eq!(op.request() & 0xff, u64::from(op.number()), "{op}");
            assert_eq!((op.request() >> 8) & 0xff, u64::from(b'H'), "{op}");
        }
    }

    /// nix's platform encoding (what the FreeBSD build passes to ioctl(2))
    /// against the FreeBSD encoding computed here: on FreeBSD they are the
    /// same thing; on x86_64 and aarch64 Linux, _IOWR happens to produce
    /// the same bits for structs under 8 KiB, which checks the arithmetic.
    #[test]
    #[cfg(any(
        target_os = "freebsd",
        all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        )
    ))]
    fn nix_encoding_agrees_with_the_freebsd_one() {
        for op in Ioctl::ALL {
            assert_eq!(op.request(), u64::from(op.freebsd_request()), "{op}");
        }
    }

    #[test]
    fn names_are_bounded_and_checked_like_the_kernel_does() {
        let longest = "a".repeat(NAME_LEN - 1);
        let f = encode_name("resource name", &longest, false).unwrap();
        assert_eq!(&name_bytes(&f)[..NAME_LEN - 1], longest.as_bytes());
        assert_eq!(name_bytes(&f)[NAME_LEN - 1], 0, "always terminated");

        let too_long = "a".repeat(NAME_LEN);
        let e = encode_name("resource name", &too_long, false).unwrap_err();
        assert!(matches!(e, KdevError::Name { reason, .. } if reason.contains("too long")));
        assert!(e.to_string().contains("at most 63 bytes"), "{e}");

        assert!(encode_name("resource name", "", false).is_err());
        assert!(encode_name("resource name", "a b", false).is_err());
        assert!(encode_name("resource name", "dé", false).is_err());
        assert!(encode_name("resource name", "a\0b", false).is_err());
        assert!(encode_name("resource name", "a/b", false).is_err());
        let f = encode_name("local provider", "gpt/disk-0:1+x_y.z", true).unwrap();
        assert_eq!(&name_bytes(&f)[..19], b"gpt/disk-0:1+x_y.z\0");
        assert!(name_bytes(&f)[19..].iter().all(|&b| b == 0));
    }

    #[test]
    fn create_arg_carries_the_spec() {
        let s = spec();
        let c = create_arg(&s).unwrap();
        assert_eq!(&name_bytes(&c.hc_name)[..7], b"shared\0");
        // "/dev/" is dropped: GEOM names providers without it.
        assert_eq!(&name_bytes(&c.hc_local)[..7], b"ada0p3\0");
        assert_eq!(c.hc_mode, sys::HAST_REPL_MEMSYNC);
        assert_eq!(c.hc_mediasize, 1 << 30);
        assert_eq!(c.hc_extentsize, 2 << 20);
        assert_eq!(c.hc_sectorsize, 512);
        assert_eq!(c.hc_keepdirty, 64);
        assert_eq!(c.hc_localoff, 12288);
        assert_eq!(c.hc_mapoff, 4096);
        assert_eq!(c.hc_flags, sys::HAST_CREATEF_METAFLUSH);
        assert_eq!(c.hc_unit, 0);
        assert_eq!(c.hc_map, s.map.as_ptr() as usize as u64);
        assert_eq!(c.hc_mapsize, 64);
        let none = create_arg(&CreateSpec {
            map: Vec::new(),
            ..spec()
        })
        .unwrap();
        assert_eq!((none.hc_map, none.hc_mapsize), (0, 0));

        let mut s = spec();
        s.metaflush = false;
        s.params.mode = Mode::Async;
        let c = create_arg(&s).unwrap();
        assert_eq!(c.hc_flags, 0);
        assert_eq!(c.hc_mode, sys::HAST_REPL_ASYNC);

        s.name = "x".repeat(64);
        assert!(matches!(
            create_arg(&s),
            Err(KdevError::Name {
                field: "resource name",
                ..
            })
        ));
        s.name = "ok".into();
        s.local = format!("/dev/{}", "d".repeat(63));
        assert!(create_arg(&s).is_ok(), "63 bytes once /dev/ is dropped");
        s.local = "/dev/my disk".into();
        assert!(matches!(
            create_arg(&s),
            Err(KdevError::Name {
                field: "local provider",
                ..
            })
        ));
    }

    #[test]
    fn upcalls_decode_and_refuse_what_they_do_not_know() {
        let mut up = sys::hast_abi_upcall {
            hu_version: sys::HAST_ABI_VERSION,
            hu_kind: sys::HAST_UP_WRITE,
            hu_seq: 7,
            hu_offset: 4096,
            hu_length: 8192,
            hu_flags: sys::HAST_UPF_MEMSYNC,
            ..Default::default()
        };
        let u = decode_upcall(&up).unwrap();
        assert_eq!(u.kind, UpcallKind::Write { memsync: true });
        assert_eq!((u.seq, u.offset, u.length), (7, 4096, 8192));

        up.hu_kind = sys::HAST_UP_SYNC_IO_DONE;
        up.hu_error = 5;
        assert_eq!(
            decode_upcall(&up).unwrap().kind,
            UpcallKind::SyncIoDone { error: 5 }
        );
        for (raw, kind) in [
            (sys::HAST_UP_READ, UpcallKind::Read),
            (sys::HAST_UP_DELETE, UpcallKind::Delete),
            (sys::HAST_UP_FLUSH, UpcallKind::Flush),
            (sys::HAST_UP_BUMP, UpcallKind::Bump),
            (sys::HAST_UP_SYNC_LOCKED, UpcallKind::SyncLocked),
        ] {
            up.hu_kind = raw;
            assert_eq!(decode_upcall(&up).unwrap().kind, kind);
        }

        up.hu_kind = 99;
        let e = decode_upcall(&up).unwrap_err();
        assert!(e.to_string().contains("unknown upcall kind 99"), "{e}");
        up.hu_kind = sys::HAST_UP_READ;
        up.hu_version = sys::HAST_ABI_VERSION + 1;
        let e = decode_upcall(&up).unwrap_err();
        assert!(matches!(
            e,
            KdevError::Protocol {
                op: Ioctl::Upcall,
                ..
            }
        ));
    }

    #[test]
    fn stats_fields_land_where_they_belong() {
        let st = sys::hast_abi_stats {
            hs_version: sys::HAST_ABI_VERSION,
            hs_reads: 1,
            hs_writes: 2,
            hs_deletes: 3,
            hs_flushes: 4,
            hs_activemap_updates: 5,
            hs_read_errors: 6,
            hs_write_errors: 7,
            hs_delete_errors: 8,
            hs_flush_errors: 9,
            hs_q_local: 10,
            hs_q_send: 11,
            hs_q_recv: 12,
            hs_q_done: 13,
            hs_q_held: 14,
            hs_q_mapwait: 15,
            hs_dirty: 16,
            hs_syncdirty: 17,
            hs_keepdirty: 18,
            hs_sync_locks: 19,
            hs_oldest_ns: 20,
            hs_link: sys::HAST_LINK_UP,
            ..Default::default()
        };
        let s = decode_stats(&st);
        let got = [
            s.requests.reads,
            s.requests.writes,
            s.requests.deletes,
            s.requests.flushes,
            s.requests.activemap_updates,
            s.requests.read_errors,
            s.requests.write_errors,
            s.requests.delete_errors,
            s.requests.flush_errors,
            s.q_local,
            s.q_send,
            s.q_recv,
            s.q_done,
            s.q_held,
            s.q_mapwait,
            s.dirty,
            s.syncdirty,
            s.keepdirty,
            s.sync_locks,
            s.oldest_ns,
        ];
        assert_eq!(got.to_vec(), (1..=20).collect::<Vec<u64>>());
        assert!(s.link_up);
    }

    #[test]
    fn opening_a_missing_device_names_it_and_the_errno() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hastctl");
        let e = KernelDevice::open_path(&path).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::ENOENT));
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("geom_hast"), "{msg}");
    }

    /// Arguments are checked before any ioctl, on every OS.
    #[test]
    fn bad_arguments_are_refused_before_the_kernel_sees_them() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let dev = KernelDevice::open_path(file.path()).unwrap();
        let u = Unit(1);
        let e = dev.remote_done(u, 3, -1, &[]).unwrap_err();
        assert!(
            matches!(
                e,
                KdevError::Invalid {
                    op: Ioctl::Downcall,
                    ..
                }
            ),
            "{e}"
        );
        let e = dev.bump_done(u, -5).unwrap_err();
        assert!(
            matches!(
                e,
                KdevError::Invalid {
                    op: Ioctl::Downcall,
                    ..
                }
            ),
            "{e}"
        );
        let e = dev.sync_read(u, 1, 0, &mut []).unwrap_err();
        assert!(
            matches!(
                e,
                KdevError::Invalid {
                    op: Ioctl::Range,
                    ..
                }
            ),
            "{e}"
        );
        let big = vec![0u8; SYNC_MAX_IO + 1];
        let e = dev.sync_write(u, 1, 0, &big).unwrap_err();
        assert!(e.to_string().contains("1048577 bytes"), "{e}");
        let e = dev.write_metadata(u, &[]).unwrap_err();
        assert!(
            matches!(e, KdevError::Invalid { op: Ioctl::Map, .. }),
            "{e:?}"
        );
        let mut s = spec();
        s.name = "bad name".into();
        assert!(matches!(dev.create(&s), Err(KdevError::Name { .. })));
    }

    #[test]
    #[cfg(not(target_os = "freebsd"))]
    fn every_call_says_the_transport_is_freebsd_only() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let dev = KernelDevice::open_path(file.path()).unwrap();
        assert_eq!(dev.path(), file.path());
        assert!(!KernelDevice::available(file.path()));
        let u = Unit(1);
        let mut buf = Vec::new();
        let mut rbuf = [0u8; 512];
        let results: Vec<(Ioctl, KdevError)> = vec![
            (Ioctl::Create, dev.create(&spec()).unwrap_err()),
            (Ioctl::Destroy, dev.destroy(u).unwrap_err()),
            (Ioctl::Upcall, dev.next_upcall(u, &mut buf).unwrap_err()),
            (
                Ioctl::Downcall,
                dev.remote_done(u, 1, 0, &rbuf).unwrap_err(),
            ),
            (Ioctl::Downcall, dev.remote_received(u, 1).unwrap_err()),
            (Ioctl::Downcall, dev.bump_done(u, 0).unwrap_err()),
            (Ioctl::Downcall, dev.set_link(u, true).unwrap_err()),
            (
                Ioctl::Downcall,
                dev.set_sync_dir(u, SyncDir::ToPeer).unwrap_err(),
            ),
            (Ioctl::Downcall, dev.set_mode(u, Mode::Async).unwrap_err()),
            (Ioctl::Range, dev.sync_lock(u, 0, 4096).unwrap_err()),
            (Ioctl::Range, dev.sync_read(u, 1, 0, &mut rbuf).unwrap_err()),
            (Ioctl::Range, dev.sync_write(u, 1, 0, &rbuf).unwrap_err()),
            (Ioctl::Range, dev.sync_release(u, 1, true).unwrap_err()),
            (Ioctl::Map, dev.map_size(u).unwrap_err()),
            (Ioctl::Map, dev.map(u, MapKind::Sync).unwrap_err()),
            (Ioctl::Map, dev.map_load(u, &rbuf).unwrap_err()),
            (Ioctl::Map, dev.map_merge(u, &rbuf).unwrap_err()),
            (Ioctl::Map, dev.write_metadata(u, &rbuf).unwrap_err()),
            (Ioctl::Stats, dev.stats(u).unwrap_err()),
        ];
        for (want, e) in results {
            assert!(
                matches!(e, KdevError::Unsupported { op } if op == want),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(msg.contains("only available on FreeBSD"), "{msg}");
            assert!(msg.contains(want.name()), "{msg}");
        }
        assert!(buf.is_empty());
        // The file was not touched.
        assert_eq!(std::fs::metadata(file.path()).unwrap().len(), 0);
    }

    /// On FreeBSD: a regular file is not the control device; the kernel
    /// answers ENOTTY and the error names the ioctl and the path.
    #[test]
    #[cfg(target_os = "freebsd")]
    fn a_regular_file_is_not_the_control_device() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let dev = KernelDevice::open_path(file.path()).unwrap();
        assert!(KernelDevice::available(file.path()));
        assert!(!KernelDevice::available(file.path().join("nothing")));
        let e = dev.stats(Unit(1)).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::ENOTTY));
        let msg = e.to_string();
        assert!(msg.contains("HAST_IOC_STATS"), "{msg}");
        assert!(msg.contains(&file.path().display().to_string()), "{msg}");
    }
}

//! Safe wrapper around the portable fast-path core (kmod/hast_core.c, built
//! by hast-sys with a userland shim): the same activemap, range locks,
//! request table and acknowledgement rules the FreeBSD kernel module runs,
//! driven in-process by a userland host (uhost) and the engine.
//!
//! The host implements [`CoreHost`]; the core calls it to issue local I/O,
//! write the activemap and answer clients. Completions come back through
//! the [`Core`] methods; the engine drains [`Core::next_upcall`]. See
//! kmod/hast_core.h for the full contract of every call.

use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::Arc;

use hast_sys as sys;

/// What failed in a call into the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("hast core: {0}: invalid argument (check offsets, lengths and geometry)")]
    Invalid(&'static str),
    #[error("hast core: {0}: out of memory; retry the request later")]
    NoMemory(&'static str),
    #[error(
        "hast core: {0}: seq {1} has nothing outstanding there (finished, unknown or link lost)"
    )]
    UnknownSeq(&'static str, u64),
    #[error("hast core: {0}: still in use; finish its I/O first")]
    Busy(&'static str),
    #[error("hast core: {0}: the range failed (I/O error or link lost) and stays dirty")]
    Failed(&'static str),
    #[error("hast core: {0}: unexpected error code {1}")]
    Other(&'static str, i32),
}

fn check(what: &'static str, seq: u64, rc: i32) -> Result<(), CoreError> {
    match u32::try_from(rc) {
        Ok(0) => Ok(()),
        Ok(sys::HAST_EINVAL) => Err(CoreError::Invalid(what)),
        Ok(sys::HAST_ENOMEM) => Err(CoreError::NoMemory(what)),
        Ok(sys::HAST_ENOENT) => Err(CoreError::UnknownSeq(what, seq)),
        Ok(sys::HAST_EBUSY) => Err(CoreError::Busy(what)),
        Ok(sys::HAST_EIO) => Err(CoreError::Failed(what)),
        _ => Err(CoreError::Other(what, rc)),
    }
}

/// A client request's command (the wire protocol's numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoCmd {
    Read,
    Write,
    Delete,
    Flush,
}

// The ABI's numbers for these enums (ffi/hast_abi.h), for this wrapper,
// the kernel transport (crate::kdev).

impl IoCmd {
    /// The ABI's `HAST_CMD_*`.
    pub fn raw(self) -> u32 {
        match self {
            IoCmd::Read => sys::HAST_CMD_READ,
            IoCmd::Write => sys::HAST_CMD_WRITE,
            IoCmd::Delete => sys::HAST_CMD_DELETE,
            IoCmd::Flush => sys::HAST_CMD_FLUSH,
        }
    }

    /// From the ABI's `HAST_CMD_*`.
    pub fn from_raw(v: u32) -> Option<IoCmd> {
        match v {
            sys::HAST_CMD_READ => Some(IoCmd::Read),
            sys::HAST_CMD_WRITE => Some(IoCmd::Write),
            sys::HAST_CMD_DELETE => Some(IoCmd::Delete),
            sys::HAST_CMD_FLUSH => Some(IoCmd::Flush),
            _ => None,
        }
    }
}

/// Replication mode: when a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Local done and remote done.
    FullSync,
    /// Local done and remote received.
    MemSync,
    /// Local done; remote copies leave in order.
    Async,
}

impl Mode {
    /// The ABI's `HAST_REPL_*`.
    pub fn raw(self) -> u32 {
        match self {
            Mode::FullSync => sys::HAST_REPL_FULLSYNC,
            Mode::MemSync => sys::HAST_REPL_MEMSYNC,
            Mode::Async => sys::HAST_REPL_ASYNC,
        }
    }

    /// From the ABI's `HAST_REPL_*`.
    pub fn from_raw(v: u32) -> Option<Mode> {
        match v {
            sys::HAST_REPL_FULLSYNC => Some(Mode::FullSync),
            sys::HAST_REPL_MEMSYNC => Some(Mode::MemSync),
            sys::HAST_REPL_ASYNC => Some(Mode::Async),
            _ => None,
        }
    }
}

/// Synchronization direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDir {
    None,
    /// The local copy is the source.
    ToPeer,
    /// The local copy of extents in the sync map is stale.
    FromPeer,
}

impl SyncDir {
    /// The ABI's `HAST_SYNC_*`.
    pub fn raw(self) -> u32 {
        match self {
            SyncDir::None => sys::HAST_SYNC_NONE,
            SyncDir::ToPeer => sys::HAST_SYNC_TO_PEER,
            SyncDir::FromPeer => sys::HAST_SYNC_FROM_PEER,
        }
    }

    /// From the ABI's `HAST_SYNC_*`.
    pub fn from_raw(v: u32) -> Option<SyncDir> {
        match v {
            sys::HAST_SYNC_NONE => Some(SyncDir::None),
            sys::HAST_SYNC_TO_PEER => Some(SyncDir::ToPeer),
            sys::HAST_SYNC_FROM_PEER => Some(SyncDir::FromPeer),
            _ => None,
        }
    }
}

/// Which bitmap [`Core::map`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Extents to resynchronize.
    Sync,
    /// The bytes of the last completed map write.
    Disk,
    /// What the next map write would write.
    Dirty,
}

impl MapKind {
    /// The ABI's `HAST_MAP_*`.
    pub fn raw(self) -> u32 {
        match self {
            MapKind::Sync => sys::HAST_MAP_SYNC,
            MapKind::Disk => sys::HAST_MAP_DISK,
            MapKind::Dirty => sys::HAST_MAP_DIRTY,
        }
    }

    /// From the ABI's `HAST_MAP_*`.
    pub fn from_raw(v: u32) -> Option<MapKind> {
        match v {
            sys::HAST_MAP_SYNC => Some(MapKind::Sync),
            sys::HAST_MAP_DISK => Some(MapKind::Disk),
            sys::HAST_MAP_DIRTY => Some(MapKind::Dirty),
            _ => None,
        }
    }
}

/// Geometry and policy of one provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Replicated bytes (datasize).
    pub mediasize: u64,
    /// Power of two, at least `sectorsize`.
    pub extentsize: u32,
    /// Power of two.
    pub sectorsize: u32,
    /// Idle extents kept marked on disk.
    pub keepdirty: u32,
    pub mode: Mode,
}

/// A local I/O the host must issue, then answer with [`Core::local_done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalIo {
    pub seq: u64,
    pub cmd: IoCmd,
    pub offset: u64,
    pub length: u64,
    pub cookie: u64,
    /// A resync I/O ([`Core::sync_io`]) rather than a client request.
    pub sync: bool,
    /// The core's own flush ([`Core::flush`]): no client, cookie 0, no
    /// `complete` or `release` follows.
    pub internal: bool,
}

/// The kind of an [`Upcall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpcallKind {
    /// Serve this read from the peer, then [`Core::remote_done`].
    Read,
    /// Replicate this write (`memsync`: ask the peer for "received").
    Write { memsync: bool },
    /// Replicate this delete.
    Delete,
    /// Flush the peer's disk.
    Flush,
    /// Persist localcnt + 1, then [`Core::bump_done`].
    Bump,
    /// Sync range lock `seq` is granted.
    SyncLocked,
    /// Sync I/O `seq` finished with `error` (0 = success).
    SyncIoDone { error: i32 },
}

/// A message from the core to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upcall {
    pub kind: UpcallKind,
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    pub cookie: u64,
}

impl Upcall {
    /// From the ABI's struct (the in-process core's or the kernel's);
    /// `None` for an unknown `hu_kind`.
    pub fn from_raw(up: &sys::hast_abi_upcall) -> Option<Upcall> {
        let kind = match up.hu_kind {
            sys::HAST_UP_READ => UpcallKind::Read,
            sys::HAST_UP_WRITE => UpcallKind::Write {
                memsync: up.hu_flags & sys::HAST_UPF_MEMSYNC != 0,
            },
            sys::HAST_UP_DELETE => UpcallKind::Delete,
            sys::HAST_UP_FLUSH => UpcallKind::Flush,
            sys::HAST_UP_BUMP => UpcallKind::Bump,
            sys::HAST_UP_SYNC_LOCKED => UpcallKind::SyncLocked,
            sys::HAST_UP_SYNC_IO_DONE => UpcallKind::SyncIoDone { error: up.hu_error },
            _ => return None,
        };
        Some(Upcall {
            kind,
            seq: up.hu_seq,
            offset: up.hu_offset,
            length: up.hu_length,
            cookie: up.hu_cookie,
        })
    }
}

/// Flushes of both sides that must start after an extent's last write
/// before it leaves the activemap (the core's `HAST_HOT_FLUSHES`).
pub const HOT_FLUSHES: u32 = sys::HAST_HOT_FLUSHES;

/// Counters and queue sizes (`hastctl list` statistics and more).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client requests served and local errors (`hastctl list`).
    pub requests: crate::stats::RequestStats,
    pub q_local: u64,
    pub q_send: u64,
    pub q_recv: u64,
    pub q_done: u64,
    pub q_held: u64,
    pub q_mapwait: u64,
    pub dirty: u64,
    pub syncdirty: u64,
    pub keepdirty: u64,
    pub sync_locks: u64,
    pub oldest_ns: u64,
    pub link_up: bool,
    /// Live writes whose remote copy failed or never left: their extents
    /// join the sync map when they finish.
    pub unsynced: u64,
    /// Extents that wait for flushes of both sides to leave the map: not
    /// yet covered by one, or hot (written during the last few flushes, so
    /// that the next write to them needs no map write).
    pub unflushed: u64,
    /// Flushes of both sides started, and the latest one that finished
    /// (see [`Core::flush`]).
    pub flush_gen: u32,
    pub flush_done: u32,
    /// The core's own flush is in flight.
    pub flush_busy: bool,
}

impl From<&sys::hast_abi_stats> for Stats {
    /// The ABI's statistics struct (from the in-process core or the kernel).
    fn from(st: &sys::hast_abi_stats) -> Stats {
        Stats {
            requests: crate::stats::RequestStats {
                reads: st.hs_reads,
                writes: st.hs_writes,
                deletes: st.hs_deletes,
                flushes: st.hs_flushes,
                activemap_updates: st.hs_activemap_updates,
                read_errors: st.hs_read_errors,
                write_errors: st.hs_write_errors,
                delete_errors: st.hs_delete_errors,
                flush_errors: st.hs_flush_errors,
            },
            q_local: st.hs_q_local,
            q_send: st.hs_q_send,
            q_recv: st.hs_q_recv,
            q_done: st.hs_q_done,
            q_held: st.hs_q_held,
            q_mapwait: st.hs_q_mapwait,
            dirty: st.hs_dirty,
            syncdirty: st.hs_syncdirty,
            keepdirty: st.hs_keepdirty,
            sync_locks: st.hs_sync_locks,
            oldest_ns: st.hs_oldest_ns,
            link_up: st.hs_link == sys::HAST_LINK_UP,
            unsynced: st.hs_unsynced,
            unflushed: st.hs_unflushed,
            flush_gen: st.hs_flush_gen,
            flush_done: st.hs_flush_done,
            flush_busy: st.hs_flush_busy != 0,
        }
    }
}

/// The host side of a core: called without the core's lock held, from
/// whichever thread is inside the core. Callbacks must not block; they may
/// call back into the [`Core`]. They must not panic: a panic cannot unwind
/// through the C core and aborts the process.
pub trait CoreHost: Send + Sync {
    /// Issue this I/O on the local provider.
    fn local_io(&self, io: LocalIo);
    /// Write `map` at the activemap area (and flush if metaflush), then
    /// call [`Core::map_done`]. Copy the bytes: the slice lives only for
    /// this call.
    fn map_write(&self, map: &[u8]);
    /// Answer client request `cookie` with `error` (0 = success).
    fn complete(&self, cookie: u64, error: i32);
    /// The core no longer refers to `cookie` (always after `complete`).
    fn release(&self, _cookie: u64) {}
    /// The upcall queue became non-empty.
    fn notify(&self) {}
}

struct HostBox(Arc<dyn CoreHost>);

/// One fast-path core instance.
pub struct Core {
    raw: NonNull<sys::hast_core>,
    host: ManuallyDrop<Box<HostBox>>,
    ops: ManuallyDrop<Box<sys::hast_core_ops>>,
    mapsize: usize,
}

// SAFETY: the C core serializes every entry point with its own mutex and
// the host is Send + Sync.
unsafe impl Send for Core {}
// SAFETY: as above; every method takes &self and the core locks inside.
unsafe impl Sync for Core {}

fn host_of<'a>(arg: *mut c_void) -> &'a HostBox {
    // SAFETY: arg is the HostBox pointer given to hast_core_create; the box
    // outlives the C instance (freed only after a successful destroy).
    unsafe { &*(arg as *const HostBox) }
}

unsafe extern "C" fn tr_local_io(arg: *mut c_void, io: *const sys::hast_core_io) {
    // SAFETY: the core passes a valid io for the duration of the call.
    let io = unsafe { &*io };
    let Some(cmd) = IoCmd::from_raw(io.hio_cmd) else {
        return;
    };
    host_of(arg).0.local_io(LocalIo {
        seq: io.hio_seq,
        cmd,
        offset: io.hio_offset,
        length: io.hio_length,
        cookie: io.hio_cookie,
        sync: io.hio_flags & sys::HAST_IOF_SYNC != 0,
        internal: io.hio_flags & sys::HAST_IOF_INTERNAL != 0,
    });
}

unsafe extern "C" fn tr_map_write(arg: *mut c_void, map: *const u8, size: u32) {
    let len = usize::try_from(size).unwrap_or(0);
    // SAFETY: the core passes size readable bytes that stay unchanged until
    // map_done.
    let bytes = unsafe { std::slice::from_raw_parts(map, len) };
    host_of(arg).0.map_write(bytes);
}

unsafe extern "C" fn tr_complete(arg: *mut c_void, cookie: u64, error: i32) {
    host_of(arg).0.complete(cookie, error);
}

unsafe extern "C" fn tr_release(arg: *mut c_void, cookie: u64) {
    host_of(arg).0.release(cookie);
}

unsafe extern "C" fn tr_notify(arg: *mut c_void) {
    host_of(arg).0.notify();
}

impl Core {
    /// Create an instance: link down, no sync direction, clean maps, a
    /// localcnt bump owed before the first write.
    pub fn new(params: Params, host: Arc<dyn CoreHost>) -> Result<Core, CoreError> {
        let raw_params = sys::hast_core_params {
            hcp_mediasize: params.mediasize,
            hcp_extentsize: params.extentsize,
            hcp_sectorsize: params.sectorsize,
            hcp_keepdirty: params.keepdirty,
            hcp_mode: params.mode.raw(),
        };
        let ops = Box::new(sys::hast_core_ops {
            hco_local_io: Some(tr_local_io),
            hco_map_write: Some(tr_map_write),
            hco_complete: Some(tr_complete),
            hco_release: Some(tr_release),
            hco_notify: Some(tr_notify),
        });
        let host = Box::new(HostBox(host));
        let mut raw = std::ptr::null_mut();
        let arg = &*host as *const HostBox as *mut c_void;
        // SAFETY: every pointer is valid; ops and host are boxed and kept
        // until the instance is destroyed.
        let rc = unsafe { sys::hast_core_create(&raw_params, &*ops, arg, &mut raw) };
        check("create", 0, rc)?;
        let raw = NonNull::new(raw).ok_or(CoreError::Other("create", rc))?;
        // SAFETY: raw is a live instance.
        let mapsize = unsafe { sys::hast_core_map_size(raw.as_ptr()) };
        Ok(Core {
            raw,
            host: ManuallyDrop::new(host),
            ops: ManuallyDrop::new(ops),
            mapsize: usize::try_from(mapsize).map_err(|_| CoreError::Invalid("create"))?,
        })
    }

    fn p(&self) -> *mut sys::hast_core {
        self.raw.as_ptr()
    }

    /// Hand a client request to the core; returns its seq. Exactly one
    /// [`CoreHost::complete`] for `cookie` follows. A flush has offset and
    /// length 0.
    pub fn submit(
        &self,
        cmd: IoCmd,
        offset: u64,
        length: u64,
        cookie: u64,
    ) -> Result<u64, CoreError> {
        let mut seq = 0u64;
        // SAFETY: live instance, valid out pointer.
        let rc =
            unsafe { sys::hast_core_submit(self.p(), cmd.raw(), offset, length, cookie, &mut seq) };
        check("submit", 0, rc)?;
        Ok(seq)
    }

    /// Start the core's own flush of both sides; returns its flush number:
    /// once [`Stats::flush_done`] reaches it, every extent written on both
    /// sides before the call has left the map (unless written again).
    /// `Busy` while one runs (then wait for that one), `Io` with the link
    /// down.
    pub fn flush(&self) -> Result<u32, CoreError> {
        let mut gen = 0u32;
        // SAFETY: live instance, valid out pointer.
        let rc = unsafe { sys::hast_core_flush(self.p(), &mut gen) };
        check("flush", 0, rc)?;
        Ok(gen)
    }

    /// The local I/O `seq` finished (`error` = errno, 0 on success).
    pub fn local_done(&self, seq: u64, error: i32) -> Result<(), CoreError> {
        // SAFETY: live instance.
        check("local_done", seq, unsafe {
            sys::hast_core_local_done(self.p(), seq, error)
        })
    }

    /// memsync: the peer received write `seq`.
    pub fn remote_received(&self, seq: u64) -> Result<(), CoreError> {
        // SAFETY: live instance.
        check("remote_received", seq, unsafe {
            sys::hast_core_remote_received(self.p(), seq)
        })
    }

    /// The remote half of `seq` finished.
    pub fn remote_done(&self, seq: u64, error: i32) -> Result<(), CoreError> {
        // SAFETY: live instance.
        check("remote_done", seq, unsafe {
            sys::hast_core_remote_done(self.p(), seq, error)
        })
    }

    /// The map write last handed to [`CoreHost::map_write`] finished.
    pub fn map_done(&self, error: i32) -> Result<(), CoreError> {
        // SAFETY: live instance.
        check("map_done", 0, unsafe {
            sys::hast_core_map_done(self.p(), error)
        })
    }

    /// The engine persisted (0) or failed to persist the localcnt bump.
    pub fn bump_done(&self, error: i32) -> Result<(), CoreError> {
        // SAFETY: live instance.
        check("bump_done", 0, unsafe {
            sys::hast_core_bump_done(self.p(), error)
        })
    }

    /// Link to the peer up or down.
    pub fn set_link(&self, up: bool) {
        let state = if up {
            sys::HAST_LINK_UP
        } else {
            sys::HAST_LINK_DOWN
        };
        // SAFETY: live instance; the state is valid so the call cannot fail.
        let _ = unsafe { sys::hast_core_link(self.p(), state) };
    }

    pub fn set_sync_dir(&self, dir: SyncDir) {
        // SAFETY: live instance; valid value.
        let _ = unsafe { sys::hast_core_set_syncdir(self.p(), dir.raw()) };
    }

    /// Mode for requests submitted from now on.
    pub fn set_mode(&self, mode: Mode) {
        // SAFETY: live instance; valid value.
        let _ = unsafe { sys::hast_core_set_mode(self.p(), mode.raw()) };
    }

    /// Take the oldest upcall, if any.
    pub fn next_upcall(&self) -> Option<Upcall> {
        let mut up = sys::hast_abi_upcall::default();
        // SAFETY: live instance, valid out pointer.
        if unsafe { sys::hast_core_upcall_next(self.p(), &mut up) } != 1 {
            return None;
        }
        // The core queues only the kinds Upcall knows.
        Upcall::from_raw(&up)
    }

    /// Bytes of the on-disk activemap.
    pub fn map_size(&self) -> usize {
        self.mapsize
    }

    /// Number of extents.
    pub fn extents(&self) -> u32 {
        // SAFETY: live instance.
        unsafe { sys::hast_core_nextents(self.p()) }
    }

    /// A copy of one bitmap (bit n of byte n / 8 is extent n).
    pub fn map(&self, kind: MapKind) -> Vec<u8> {
        let which = kind.raw();
        let mut buf = vec![0u8; self.mapsize];
        let size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        // SAFETY: buf has size writable bytes; size >= map size by creation.
        let _ = unsafe { sys::hast_core_map_get(self.p(), which, buf.as_mut_ptr(), size) };
        buf
    }

    /// At start: the on-disk activemap becomes the diskmap and sync map.
    pub fn map_load(&self, map: &[u8]) -> Result<(), CoreError> {
        let size = u32::try_from(map.len()).map_err(|_| CoreError::Invalid("map_load"))?;
        // SAFETY: map has size readable bytes.
        check("map_load", 0, unsafe {
            sys::hast_core_map_load(self.p(), map.as_ptr(), size)
        })
    }

    /// OR the peer's map into the sync map.
    pub fn map_merge(&self, map: &[u8]) -> Result<(), CoreError> {
        let size = u32::try_from(map.len()).map_err(|_| CoreError::Invalid("map_merge"))?;
        // SAFETY: map has size readable bytes.
        check("map_merge", 0, unsafe {
            sys::hast_core_map_merge(self.p(), map.as_ptr(), size)
        })
    }

    /// Ask for a sync range lock; granted by an [`UpcallKind::SyncLocked`].
    pub fn sync_lock(&self, offset: u64, length: u64) -> Result<u64, CoreError> {
        let mut seq = 0u64;
        // SAFETY: live instance, valid out pointer.
        check("sync_lock", 0, unsafe {
            sys::hast_core_sync_lock(self.p(), offset, length, &mut seq)
        })?;
        Ok(seq)
    }

    /// Local read or write under granted lock `lock`; answered by an
    /// [`UpcallKind::SyncIoDone`] with the returned seq.
    pub fn sync_io(
        &self,
        lock: u64,
        cmd: IoCmd,
        offset: u64,
        length: u64,
        cookie: u64,
    ) -> Result<u64, CoreError> {
        let mut seq = 0u64;
        // SAFETY: live instance, valid out pointer.
        let rc = unsafe {
            sys::hast_core_sync_io(self.p(), lock, cmd.raw(), offset, length, cookie, &mut seq)
        };
        check("sync_io", lock, rc)?;
        Ok(seq)
    }

    /// Release (or cancel) lock `lock`; `clear` marks the extents it covers
    /// completely as synchronized unless the lock failed
    /// ([`CoreError::Failed`], released anyway).
    pub fn sync_release(&self, lock: u64, clear: bool) -> Result<(), CoreError> {
        // SAFETY: live instance.
        check("sync_release", lock, unsafe {
            sys::hast_core_sync_release(self.p(), lock, i32::from(clear))
        })
    }

    pub fn stats(&self) -> Stats {
        let mut st = sys::hast_abi_stats::default();
        // SAFETY: live instance, valid out pointer.
        unsafe { sys::hast_core_stats(self.p(), &mut st) };
        Stats::from(&st)
    }

    /// Destroy an idle instance; gives the core back if it is still busy.
    pub fn close(self) -> Result<(), (Core, CoreError)> {
        // SAFETY: live instance.
        let rc = unsafe { sys::hast_core_destroy(self.p()) };
        match check("close", 0, rc) {
            Ok(()) => {
                let mut me = ManuallyDrop::new(self);
                // SAFETY: the C instance is gone; nothing refers to these.
                unsafe {
                    ManuallyDrop::drop(&mut me.host);
                    ManuallyDrop::drop(&mut me.ops);
                }
                Ok(())
            }
            Err(e) => Err((self, e)),
        }
    }
}

impl Drop for Core {
    /// Destroys the instance if idle; a busy one (requests still in flight)
    /// is leaked with its host rather than freed under the host's feet.
    fn drop(&mut self) {
        // SAFETY: live instance.
        let rc = unsafe { sys::hast_core_destroy(self.p()) };
        if rc == 0 {
            // SAFETY: the C instance is gone; nothing refers to these.
            unsafe {
                ManuallyDrop::drop(&mut self.host);
                ManuallyDrop::drop(&mut self.ops);
            }
        }
    }
}

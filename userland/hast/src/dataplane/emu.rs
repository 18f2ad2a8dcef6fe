//! Tests only: a userland stand-in for the geom_hast module behind
//! [`KernelDevice::emulated`], so that [`super::KernelPlane`] runs on Linux.
//! It hosts the same C core ([`crate::core::Core`]) and follows the ioctl
//! contract written above `g_hast_ioctl` in kmod/g_hast.c: a blocking
//! UPCALL with the ENOMEM/park rule for a small buffer and hu_cookie 0,
//! REMOTE_DONE that needs a peer read's exact length, RANGE IO that returns
//! when the local I/O finished (its SYNC_IO_DONE upcall still follows), the
//! map loaded at CREATE, METADATA into the block before the map, ENXIO once
//! destroyed. The "disk" is memory; clients are [`Emu::write`] and
//! [`Emu::read`] (the module's g_hast_start).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};

use hast_sys as sys;
use nix::errno::Errno;

use crate::core::{
    Core, CoreHost, IoCmd, LocalIo, MapKind, Mode, Params, SyncDir, Upcall, UpcallKind,
};
use crate::kdev::{Emulator, Ioctl};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Client {
    cmd: IoCmd,
    data: Vec<u8>,
    done: Option<i32>,
}

#[derive(Default)]
struct State {
    clients: HashMap<u64, Client>,
    /// Upcall seq -> client cookie (the module's bio behind a seq).
    by_seq: HashMap<u64, u64>,
    sync_bufs: HashMap<u64, Vec<u8>>,
    sync_done: HashMap<u64, i32>,
    parked: Option<Upcall>,
    generation: u64,
    destroyed: bool,
}

/// One instance: the core, its memory disk and metadata area.
struct Instance {
    core: OnceLock<Weak<Core>>,
    disk: Mutex<Vec<u8>>,
    /// Metadata block and activemap (the module's offsets 0 and mapoff).
    meta: Mutex<Vec<u8>>,
    mapoff: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl Instance {
    fn core(&self) -> Option<Arc<Core>> {
        self.core.get().and_then(Weak::upgrade)
    }

    fn wake(&self) {
        lock(&self.state).generation += 1;
        self.cv.notify_all();
    }
}

fn range(off: u64, len: u64) -> std::ops::Range<usize> {
    off as usize..(off + len) as usize
}

impl CoreHost for Instance {
    fn local_io(&self, io: LocalIo) {
        let r = range(io.offset, io.length);
        {
            let mut st = lock(&self.state);
            let mut disk = lock(&self.disk);
            let buf = if io.sync {
                st.sync_bufs.get_mut(&io.cookie).map(|b| &mut b[..])
            } else {
                st.clients.get_mut(&io.cookie).map(|c| &mut c.data[..])
            };
            match (io.cmd, buf) {
                (IoCmd::Read, Some(b)) => b.copy_from_slice(&disk[r]),
                (IoCmd::Write, Some(b)) => disk[r].copy_from_slice(b),
                _ => {}
            }
        }
        if let Some(core) = self.core() {
            core.local_done(io.seq, 0).expect("local_done");
        }
        if io.sync {
            lock(&self.state).sync_done.insert(io.cookie, 0);
        }
        self.wake();
    }

    fn map_write(&self, map: &[u8]) {
        lock(&self.meta)[self.mapoff..self.mapoff + map.len()].copy_from_slice(map);
        if let Some(core) = self.core() {
            core.map_done(0).expect("map_done");
        }
    }

    fn complete(&self, cookie: u64, error: i32) {
        if let Some(c) = lock(&self.state).clients.get_mut(&cookie) {
            c.done = Some(error);
        }
        self.wake();
    }

    fn notify(&self) {
        self.wake();
    }
}

struct Unit {
    inst: Arc<Instance>,
    core: Arc<Core>,
}

/// The emulated module: its instances by unit.
#[derive(Default)]
pub struct Emu {
    units: Mutex<HashMap<u64, Arc<Unit>>>,
    next_unit: AtomicU64,
    next_cookie: AtomicU64,
}

fn errno_of(e: crate::core::CoreError) -> Errno {
    use crate::core::CoreError::*;
    match e {
        Invalid(_) => Errno::EINVAL,
        NoMemory(_) => Errno::ENOMEM,
        UnknownSeq(..) => Errno::ENOENT,
        Busy(_) => Errno::EBUSY,
        Failed(_) => Errno::EIO,
        Other(..) => Errno::EIO,
    }
}

/// # Safety
/// `p` is valid for `len` bytes.
unsafe fn user<'a>(p: u64, len: u64) -> &'a mut [u8] {
    // SAFETY: forwarded.
    unsafe { std::slice::from_raw_parts_mut(p as usize as *mut u8, len as usize) }
}

impl Emu {
    fn unit(&self, unit: u64) -> Result<Arc<Unit>, Errno> {
        lock(&self.units).get(&unit).cloned().ok_or(Errno::ENXIO)
    }

    /// A client request (the module's g_hast_start); blocks until answered.
    fn request(&self, unit: u64, cmd: IoCmd, off: u64, data: Vec<u8>) -> (i32, Vec<u8>) {
        let u = self.unit(unit).expect("unit");
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed) + 1;
        let len = data.len() as u64;
        lock(&u.inst.state).clients.insert(
            cookie,
            Client {
                cmd,
                data,
                done: None,
            },
        );
        u.core.submit(cmd, off, len, cookie).expect("submit");
        let mut st = lock(&u.inst.state);
        loop {
            if let Some(err) = st.clients.get(&cookie).and_then(|c| c.done) {
                let c = st.clients.remove(&cookie).expect("client");
                return (err, c.data);
            }
            st = u.inst.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Write through `hast/NAME`; the errno it gets.
    pub fn write(&self, unit: u64, off: u64, data: Vec<u8>) -> i32 {
        self.request(unit, IoCmd::Write, off, data).0
    }

    /// Read through `hast/NAME`.
    pub fn read(&self, unit: u64, off: u64, len: usize) -> (i32, Vec<u8>) {
        self.request(unit, IoCmd::Read, off, vec![0; len])
    }

    /// The data area as the module wrote it.
    pub fn disk(&self, unit: u64) -> Vec<u8> {
        lock(&self.unit(unit).expect("unit").inst.disk).clone()
    }

    /// The metadata block and map area.
    pub fn meta(&self, unit: u64) -> Vec<u8> {
        lock(&self.unit(unit).expect("unit").inst.meta).clone()
    }

    fn create(&self, c: &mut sys::hast_abi_create) -> Result<(), Errno> {
        let mode = Mode::from_raw(c.hc_mode).ok_or(Errno::EINVAL)?;
        let inst = Arc::new(Instance {
            core: OnceLock::new(),
            disk: Mutex::new(vec![0; c.hc_mediasize as usize]),
            meta: Mutex::new(vec![0; c.hc_localoff as usize]),
            mapoff: c.hc_mapoff as usize,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        });
        let params = Params {
            mediasize: c.hc_mediasize,
            extentsize: c.hc_extentsize,
            sectorsize: c.hc_sectorsize,
            keepdirty: c.hc_keepdirty,
            mode,
        };
        let core = Arc::new(Core::new(params, inst.clone()).map_err(errno_of)?);
        let _ = inst.core.set(Arc::downgrade(&core));
        if c.hc_map != 0 {
            // SAFETY: the caller's map buffer of hc_mapsize bytes.
            let map = unsafe { user(c.hc_map, u64::from(c.hc_mapsize)) };
            core.map_load(map).map_err(errno_of)?;
        }
        let unit = self.next_unit.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.units).insert(unit, Arc::new(Unit { inst, core }));
        c.hc_unit = unit;
        Ok(())
    }

    fn upcall(&self, u: &mut sys::hast_abi_upcall) -> Result<(), Errno> {
        let unit = self.unit(u.hu_unit)?;
        let inst = &unit.inst;
        loop {
            let generation = lock(&inst.state).generation;
            let parked = lock(&inst.state).parked.take();
            if let Some(up) = parked.or_else(|| unit.core.next_upcall()) {
                let (kind, error) = match up.kind {
                    UpcallKind::Read => (sys::HAST_UP_READ, 0),
                    UpcallKind::Write { .. } => (sys::HAST_UP_WRITE, 0),
                    UpcallKind::Delete => (sys::HAST_UP_DELETE, 0),
                    UpcallKind::Flush => (sys::HAST_UP_FLUSH, 0),
                    UpcallKind::Bump => (sys::HAST_UP_BUMP, 0),
                    UpcallKind::SyncLocked => (sys::HAST_UP_SYNC_LOCKED, 0),
                    UpcallKind::SyncIoDone { error } => (sys::HAST_UP_SYNC_IO_DONE, error),
                };
                u.hu_kind = kind;
                u.hu_seq = up.seq;
                u.hu_offset = up.offset;
                u.hu_length = up.length;
                u.hu_cookie = 0;
                u.hu_error = error;
                u.hu_flags = if matches!(up.kind, UpcallKind::Write { memsync: true }) {
                    sys::HAST_UPF_MEMSYNC
                } else {
                    0
                };
                let mut st = lock(&inst.state);
                if matches!(up.kind, UpcallKind::Read | UpcallKind::Write { .. }) {
                    st.by_seq.insert(up.seq, up.cookie);
                }
                if let UpcallKind::Write { .. } = up.kind {
                    if u.hu_datalen < up.length {
                        st.parked = Some(up);
                        u.hu_error = Errno::ENOMEM as i32;
                        u.hu_datalen = up.length;
                        return Ok(());
                    }
                    let data = &st.clients.get(&up.cookie).ok_or(Errno::EIO)?.data;
                    // SAFETY: the engine's buffer of hu_datalen bytes.
                    unsafe { user(u.hu_data, up.length) }.copy_from_slice(data);
                    u.hu_datalen = up.length;
                }
                return Ok(());
            }
            let mut st = lock(&inst.state);
            while st.generation == generation && !st.destroyed {
                st = inst.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.destroyed {
                return Err(Errno::ENXIO);
            }
        }
    }

    fn downcall(&self, d: &mut sys::hast_abi_downcall) -> Result<(), Errno> {
        let unit = self.unit(d.hd_unit)?;
        let core = &unit.core;
        match d.hd_kind {
            sys::HAST_DOWN_REMOTE_DONE => {
                let mut st = lock(&unit.inst.state);
                let cookie = st.by_seq.get(&d.hd_seq).copied();
                if let Some(c) = cookie.and_then(|k| st.clients.get_mut(&k)) {
                    if c.cmd == IoCmd::Read && d.hd_error == 0 {
                        if d.hd_datalen != c.data.len() as u64 {
                            return Err(Errno::EINVAL);
                        }
                        // SAFETY: the engine's buffer of hd_datalen bytes.
                        c.data
                            .copy_from_slice(unsafe { user(d.hd_data, d.hd_datalen) });
                    }
                }
                st.by_seq.remove(&d.hd_seq);
                drop(st);
                core.remote_done(d.hd_seq, d.hd_error).map_err(errno_of)
            }
            sys::HAST_DOWN_REMOTE_RECV => core.remote_received(d.hd_seq).map_err(errno_of),
            sys::HAST_DOWN_BUMP_DONE => core.bump_done(d.hd_error).map_err(errno_of),
            sys::HAST_DOWN_LINK => {
                core.set_link(d.hd_arg == sys::HAST_LINK_UP);
                Ok(())
            }
            sys::HAST_DOWN_SYNCDIR => {
                core.set_sync_dir(SyncDir::from_raw(d.hd_arg).ok_or(Errno::EINVAL)?);
                Ok(())
            }
            sys::HAST_DOWN_MODE => {
                core.set_mode(Mode::from_raw(d.hd_arg).ok_or(Errno::EINVAL)?);
                Ok(())
            }
            sys::HAST_DOWN_FLUSH => {
                d.hd_seq = u64::from(core.flush().map_err(errno_of)?);
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn range(&self, r: &mut sys::hast_abi_range) -> Result<(), Errno> {
        let unit = self.unit(r.hr_unit)?;
        let core = &unit.core;
        match r.hr_op {
            sys::HAST_RANGE_LOCK => {
                r.hr_seq = core.sync_lock(r.hr_offset, r.hr_length).map_err(errno_of)?;
                Ok(())
            }
            sys::HAST_RANGE_IO => {
                let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed) + 1;
                let cmd = IoCmd::from_raw(r.hr_cmd).ok_or(Errno::EINVAL)?;
                let write = cmd == IoCmd::Write;
                let buf = if write {
                    // SAFETY: the engine's buffer of hr_length bytes.
                    unsafe { user(r.hr_data, r.hr_length) }.to_vec()
                } else {
                    vec![0; r.hr_length as usize]
                };
                let inst = &unit.inst;
                lock(&inst.state).sync_bufs.insert(cookie, buf);
                let ioseq = core
                    .sync_io(r.hr_seq, cmd, r.hr_offset, r.hr_length, cookie)
                    .map_err(errno_of)?;
                let mut st = lock(&inst.state);
                while !st.sync_done.contains_key(&cookie) {
                    st = inst.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                let err = st.sync_done.remove(&cookie).unwrap_or(0);
                let buf = st.sync_bufs.remove(&cookie).unwrap_or_default();
                if err != 0 {
                    return Err(Errno::from_raw(err));
                }
                if !write {
                    // SAFETY: the engine's buffer of hr_length bytes.
                    unsafe { user(r.hr_data, r.hr_length) }.copy_from_slice(&buf);
                }
                r.hr_ioseq = ioseq;
                Ok(())
            }
            sys::HAST_RANGE_RELEASE => core
                .sync_release(r.hr_seq, r.hr_flags & sys::HAST_RANGEF_CLEAR != 0)
                .map_err(errno_of),
            _ => Err(Errno::EINVAL),
        }
    }

    fn map(&self, m: &mut sys::hast_abi_map) -> Result<(), Errno> {
        let unit = self.unit(m.hm_unit)?;
        let core = &unit.core;
        let size = core.map_size() as u64;
        match m.hm_op {
            sys::HAST_MAPOP_GET if m.hm_data == 0 => {
                m.hm_size = size as u32;
                Ok(())
            }
            sys::HAST_MAPOP_GET => {
                let kind = MapKind::from_raw(m.hm_which).ok_or(Errno::EINVAL)?;
                // SAFETY: the engine's buffer of (at least) the map's size.
                unsafe { user(m.hm_data, size) }.copy_from_slice(&core.map(kind));
                Ok(())
            }
            // SAFETY (both): the engine's map of hm_size bytes.
            sys::HAST_MAPOP_LOAD => core
                .map_load(unsafe { user(m.hm_data, u64::from(m.hm_size)) })
                .map_err(errno_of),
            sys::HAST_MAPOP_MERGE => core
                .map_merge(unsafe { user(m.hm_data, u64::from(m.hm_size)) })
                .map_err(errno_of),
            sys::HAST_MAPOP_METADATA => {
                let mut meta = lock(&unit.inst.meta);
                let n = m.hm_size as usize;
                if n == 0 || n > unit.inst.mapoff {
                    return Err(Errno::EINVAL);
                }
                // SAFETY: the engine's block of hm_size bytes.
                meta[..n].copy_from_slice(unsafe { user(m.hm_data, u64::from(m.hm_size)) });
                Ok(())
            }
            _ => Err(Errno::EINVAL),
        }
    }
}

impl Emulator for Emu {
    unsafe fn ioctl(&self, op: Ioctl, arg: *mut u8) -> Result<(), Errno> {
        // SAFETY (every cast): `arg` points to the struct `op` carries.
        unsafe {
            match op {
                Ioctl::Create => self.create(&mut *arg.cast()),
                Ioctl::Destroy => {
                    let c = &*arg.cast::<sys::hast_abi_create>();
                    let unit = lock(&self.units).remove(&c.hc_unit).ok_or(Errno::ENXIO)?;
                    unit.core.set_link(false);
                    lock(&unit.inst.state).destroyed = true;
                    unit.inst.cv.notify_all();
                    Ok(())
                }
                Ioctl::Upcall => self.upcall(&mut *arg.cast()),
                Ioctl::Downcall => self.downcall(&mut *arg.cast()),
                Ioctl::Range => self.range(&mut *arg.cast()),
                Ioctl::Map => self.map(&mut *arg.cast()),
                Ioctl::Stats => {
                    let s = &mut *arg.cast::<sys::hast_abi_stats>();
                    let st = self.unit(s.hs_unit)?.core.stats();
                    s.hs_reads = st.requests.reads;
                    s.hs_writes = st.requests.writes;
                    s.hs_dirty = st.dirty;
                    s.hs_syncdirty = st.syncdirty;
                    s.hs_link = if st.link_up {
                        sys::HAST_LINK_UP
                    } else {
                        sys::HAST_LINK_DOWN
                    };
                    Ok(())
                }
            }
        }
    }
}

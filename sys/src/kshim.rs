//! Tests only (feature `kshim`, Linux): the C interface of the userland
//! kernel shim that runs the geom_hast module in this process
//! (sys/kshim/kshim_api.h, which documents every function). Every function
//! returns a host errno, 0 on success. The safe wrapper is `hast::kshim`.

use core::ffi::{c_char, c_int, c_ulong, c_void};

/// Opaque: an open file of a shim device (`/dev/hastctl`).
#[repr(C)]
pub struct kshim_file {
    _private: [u8; 0],
}

/// Opaque: an open of a GEOM provider by a client.
#[repr(C)]
pub struct kshim_client {
    _private: [u8; 0],
}

pub const KSHIM_FREAD: c_int = 0x0001;
pub const KSHIM_FWRITE: c_int = 0x0002;

pub const KSHIM_BIO_READ: c_int = 0x01;
pub const KSHIM_BIO_WRITE: c_int = 0x02;
pub const KSHIM_BIO_DELETE: c_int = 0x03;
pub const KSHIM_BIO_FLUSH: c_int = 0x05;

pub const KSHIM_FAIL_MALLOC_NOWAIT: c_int = 0;
pub const KSHIM_FAIL_CLONE_BIO: c_int = 1;
pub const KSHIM_FAIL_COPYIN: c_int = 2;
pub const KSHIM_FAIL_COPYOUT: c_int = 3;

/// What is outstanding in the shim (`struct kshim_stats`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct kshim_stats {
    pub ks_bios: i64,
    pub ks_bios_inflight: i64,
    pub ks_module_allocs: i64,
    pub ks_module_bytes: i64,
    pub ks_events: i64,
    pub ks_geoms: i64,
    pub ks_files: i64,
    pub ks_nowait_failed: i64,
    pub ks_lock_orders: i64,
}

/// A client bio finished: `(arg, errno, bytes completed)`, on GEOM's g_up
/// thread; must not block.
pub type kshim_io_done_t = unsafe extern "C" fn(arg: *mut c_void, error: c_int, completed: i64);

unsafe extern "C" {
    pub fn kshim_load() -> c_int;
    pub fn kshim_unload() -> c_int;
    pub fn kshim_loaded() -> c_int;

    pub fn kshim_dev_open(name: *const c_char, fflags: c_int, fpp: *mut *mut kshim_file) -> c_int;
    pub fn kshim_dev_ioctl(fp: *mut kshim_file, cmd: c_ulong, data: *mut c_void) -> c_int;
    pub fn kshim_dev_close(fp: *mut kshim_file);

    pub fn kshim_disk_create(
        name: *const c_char,
        path: *const c_char,
        sectorsize: u32,
        nthreads: u32,
    ) -> c_int;
    pub fn kshim_disk_destroy(name: *const c_char, wait_ms: u32) -> c_int;
    pub fn kshim_disk_orphan(name: *const c_char) -> c_int;
    pub fn kshim_disk_delay(name: *const c_char, usec: u32) -> c_int;
    pub fn kshim_disk_hold(name: *const c_char, hold: c_int) -> c_int;
    pub fn kshim_disk_fail(name: *const c_char, cmdmask: u32, error: c_int) -> c_int;
    pub fn kshim_disk_queued(name: *const c_char, countp: *mut u32) -> c_int;

    pub fn kshim_client_open(
        provider: *const c_char,
        r: c_int,
        w: c_int,
        e: c_int,
        cp: *mut *mut kshim_client,
    ) -> c_int;
    pub fn kshim_client_close(c: *mut kshim_client) -> c_int;
    pub fn kshim_client_mediasize(c: *const kshim_client) -> i64;
    pub fn kshim_client_sectorsize(c: *const kshim_client) -> u32;
    pub fn kshim_client_io(
        c: *mut kshim_client,
        cmd: c_int,
        offset: i64,
        length: i64,
        data: *mut c_void,
        done: kshim_io_done_t,
        arg: *mut c_void,
    ) -> c_int;
    pub fn kshim_client_getattr_int(
        c: *mut kshim_client,
        attr: *const c_char,
        valp: *mut c_int,
    ) -> c_int;

    pub fn kshim_fail_set(which: c_int, skip: u32, count: u32);
    pub fn kshim_fail_rate(which: c_int, per_million: u32, seed: u64);
    pub fn kshim_fail_hits(which: c_int) -> u64;
    pub fn kshim_fail_clear();

    pub fn kshim_geom_settle();
    pub fn kshim_interrupt(wmesg: *const c_char) -> c_int;
    pub fn kshim_stats(st: *mut kshim_stats);
    pub fn kshim_check_idle(buf: *mut c_char, len: usize) -> c_int;
    pub fn kshim_confxml(buf: *mut c_char, len: usize) -> c_int;
}

//! Property and scenario tests of the fast-path core (kmod/hast_core.c run
//! through hast-sys and `hast::core`): a model of the rules in DESIGN.md
//! ("Rules the fast path must keep") is checked after every step of random
//! interleavings of requests, completions, link changes, map writes and
//! sync-range operations.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use hast::core::{
    Core, CoreError, CoreHost, IoCmd, LocalIo, MapKind, Mode, Params, SyncDir, UpcallKind,
};
use proptest::prelude::*;

const EIO: i32 = 5;
const EXT: u64 = 4096;
const SECT: u64 = 512;
const NEXT: u32 = 12;
/// 11 full extents and a half one: the last extent is partial.
const MEDIA: u64 = 11 * EXT + 2048;

#[derive(Debug, Clone)]
enum Ev {
    Local(LocalIo),
    Map(Vec<u8>),
    Complete(u64, i32),
    Release(u64),
}

#[derive(Default)]
struct Host {
    events: Mutex<Vec<Ev>>,
}

impl Host {
    fn take(&self) -> Vec<Ev> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

impl CoreHost for Host {
    fn local_io(&self, io: LocalIo) {
        self.events.lock().unwrap().push(Ev::Local(io));
    }
    fn map_write(&self, map: &[u8]) {
        self.events.lock().unwrap().push(Ev::Map(map.to_vec()));
    }
    fn complete(&self, cookie: u64, error: i32) {
        self.events
            .lock()
            .unwrap()
            .push(Ev::Complete(cookie, error));
    }
    fn release(&self, cookie: u64) {
        self.events.lock().unwrap().push(Ev::Release(cookie));
    }
}

fn bit(map: &[u8], e: u32) -> bool {
    map[(e / 8) as usize] >> (e % 8) & 1 == 1
}

fn new_core(mode: Mode, keepdirty: u32) -> (Core, Arc<Host>) {
    let host = Arc::new(Host::default());
    let core = Core::new(
        Params {
            mediasize: MEDIA,
            extentsize: EXT as u32,
            sectorsize: SECT as u32,
            keepdirty,
            mode,
        },
        host.clone(),
    )
    .unwrap();
    (core, host)
}

// ---------------------------------------------------------------------------
// The model.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bump {
    Ok,
    Needed,
    Pending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    NotIssued,
    Issued,
    Done(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remote {
    /// No upcall: not sent (yet, or ever if the request was issued).
    None,
    Taken {
        memsync: bool,
    },
    Received,
    Done(i32),
    Lost,
}

impl Remote {
    fn open(self) -> bool {
        matches!(self, Remote::Taken { .. } | Remote::Received)
    }
}

#[derive(Debug, Clone)]
struct Req {
    seq: u64,
    cmd: IoCmd,
    off: u64,
    len: u64,
    e0: u32,
    e1: u32,
    mode: Mode,
    local: Local,
    remote: Remote,
    acked: Option<i32>,
    released: bool,
    bumpfail: bool,
    /// A flush: its number (flushes started before it, plus one).
    fgen: u32,
    /// The core's own flush ([`Core::flush`]): no client.
    internal: bool,
}

impl Req {
    fn update(&self) -> bool {
        matches!(self.cmd, IoCmd::Write | IoCmd::Delete)
    }
    /// Issued and not yet released: its extents must stay marked.
    fn in_flight(&self) -> bool {
        self.update() && self.local != Local::NotIssued && !self.released
    }
    /// A half of its I/O is still open (range locks look at this).
    fn io_open(&self) -> bool {
        self.update() && (self.local == Local::Issued || self.remote.open())
    }
}

#[derive(Debug, Clone)]
struct Lock {
    off: u64,
    len: u64,
    granted: bool,
    failed: bool,
    nio: u32,
    /// Requests submitted before this lock was asked for.
    before: u64,
}

fn overlap(o1: u64, l1: u64, o2: u64, l2: u64) -> bool {
    o1 < o2 + l2 && o2 < o1 + l1
}

struct Model {
    core: Core,
    host: Arc<Host>,
    keepdirty: u32,
    mode: Mode,
    link: bool,
    bump: Bump,
    syncdir: SyncDir,
    reqs: BTreeMap<u64, Req>, // by cookie
    by_seq: BTreeMap<u64, u64>,
    next_cookie: u64,
    locals: Vec<u64>,            // seqs with local I/O outstanding
    syncios: BTreeMap<u64, u64>, // sync I/O seq -> lock seq
    locks: BTreeMap<u64, Lock>,
    disk: Vec<u8>,               // bytes of the last completed map write
    inflight: Option<Vec<u8>>,   // map write in flight
    must_sync: Vec<bool>,        // must be in the core's sync map
    must_disk: Vec<bool>,        // must be set on disk as well
    fail_allowed: bool,          // this step may fail unissued writes
    map_failed: bool,            // the last map write failed
    fgen: u32,                   // flushes of both sides started
    iflush_gen: Option<u32>,     // the core's own flush just started
    unflushed: Vec<Option<u32>>, // written on both sides at flush count n
    hot: Vec<Option<u32>>,       // covered by a flush, last written at n
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        cmd: u8,
        ext: u8,
        sect: u8,
        nsect: u8,
    },
    LocalDone {
        pick: usize,
        err: bool,
    },
    RemoteRecv {
        pick: usize,
    },
    RemoteDone {
        pick: usize,
        err: bool,
    },
    MapDone {
        err: bool,
    },
    LinkDown,
    LinkUp,
    BumpDone {
        err: bool,
    },
    SyncLock {
        ext: u8,
        n: u8,
    },
    SyncIo {
        pick: usize,
        write: bool,
        half: bool,
    },
    SyncRelease {
        pick: usize,
        clear: bool,
    },
    Merge {
        bits: u16,
    },
    SetDir(u8),
    SetMode(u8),
    CoreFlush,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..8, 0u8..12, 0u8..8, 1u8..24)
            .prop_map(|(cmd, ext, sect, nsect)| Op::Submit { cmd, ext, sect, nsect }),
        8 => (any::<usize>(), prop::bool::weighted(0.15)).prop_map(|(pick, err)| Op::LocalDone { pick, err }),
        3 => any::<usize>().prop_map(|pick| Op::RemoteRecv { pick }),
        7 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(pick, err)| Op::RemoteDone { pick, err }),
        6 => prop::bool::weighted(0.1).prop_map(|err| Op::MapDone { err }),
        1 => Just(Op::LinkDown),
        2 => Just(Op::LinkUp),
        2 => prop::bool::weighted(0.2).prop_map(|err| Op::BumpDone { err }),
        2 => (0u8..12, 1u8..3).prop_map(|(ext, n)| Op::SyncLock { ext, n }),
        2 => (any::<usize>(), any::<bool>(), any::<bool>())
            .prop_map(|(pick, write, half)| Op::SyncIo { pick, write, half }),
        2 => (any::<usize>(), prop::bool::weighted(0.8)).prop_map(|(pick, clear)| Op::SyncRelease { pick, clear }),
        1 => any::<u16>().prop_map(|bits| Op::Merge { bits }),
        1 => (0u8..3).prop_map(Op::SetDir),
        1 => (0u8..3).prop_map(Op::SetMode),
        2 => Just(Op::CoreFlush),
    ]
}

fn mode_of(v: u8) -> Mode {
    match v % 3 {
        0 => Mode::FullSync,
        1 => Mode::MemSync,
        _ => Mode::Async,
    }
}

fn pick<T: Copy>(v: &[T], i: usize) -> Option<T> {
    if v.is_empty() {
        None
    } else {
        Some(v[i % v.len()])
    }
}

impl Model {
    fn new(mode: Mode, keepdirty: u32) -> Model {
        let (core, host) = new_core(mode, keepdirty);
        let size = core.map_size();
        assert_eq!(core.extents(), NEXT);
        Model {
            core,
            host,
            keepdirty,
            mode,
            link: false,
            bump: Bump::Needed,
            syncdir: SyncDir::None,
            reqs: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            next_cookie: 1000,
            locals: Vec::new(),
            syncios: BTreeMap::new(),
            locks: BTreeMap::new(),
            disk: vec![0; size],
            inflight: None,
            must_sync: vec![false; NEXT as usize],
            must_disk: vec![false; NEXT as usize],
            fail_allowed: false,
            map_failed: false,
            fgen: 0,
            iflush_gen: None,
            unflushed: vec![None; NEXT as usize],
            hot: vec![None; NEXT as usize],
        }
    }

    /// Both sides wrote extent `e` (a client write or a resync copy) while
    /// `fgen` flushes had started: it waits for a flush, and a hot extent
    /// stays hot from this write on.
    fn written_on_both(&mut self, e: u32) {
        self.unflushed[e as usize] = Some(self.fgen);
        if self.hot[e as usize].is_some() {
            self.hot[e as usize] = Some(self.fgen);
        }
    }

    /// A flush of both sides finished: what was written on both before it
    /// started is durable; it stays hot until HOT_FLUSHES more flushes have
    /// started after its last write, then may leave the map.
    fn flushed(&mut self, r: &Req) {
        if r.local == Local::Done(0) && r.remote == Remote::Done(0) {
            for (u, h) in self.unflushed.iter_mut().zip(self.hot.iter_mut()) {
                if let Some(g) = u.filter(|&g| g < r.fgen) {
                    *u = None;
                    *h = Some(g);
                }
                if h.is_some_and(|g| g + hast::core::HOT_FLUSHES < r.fgen) {
                    *h = None;
                }
            }
        }
    }

    /// The model's record of the core's own flush `seq` (created when the
    /// core first shows it: its local I/O or its upcall).
    fn internal_req(&mut self, seq: u64) {
        if self.by_seq.contains_key(&seq) {
            return;
        }
        let fgen = self
            .iflush_gen
            .take()
            .expect("an internal flush nobody started");
        let cookie = u64::MAX - seq;
        self.by_seq.insert(seq, cookie);
        self.reqs.insert(
            cookie,
            Req {
                seq,
                cmd: IoCmd::Flush,
                off: 0,
                len: 0,
                e0: 0,
                e1: 0,
                mode: self.mode,
                local: Local::NotIssued,
                remote: Remote::None,
                acked: Some(0),
                released: false,
                bumpfail: false,
                fgen,
                internal: true,
            },
        );
    }

    /// An internal flush whose halves both finished is over (the core
    /// tells nobody: there is no client).
    fn internal_done(&mut self, seq: u64) {
        let r = self.req_by_seq(seq).clone();
        if !r.internal || r.released || r.local == Local::Issued || r.remote.open() {
            return;
        }
        self.req_by_seq(seq).released = true;
        self.flushed(&r);
    }

    fn req_by_seq(&mut self, seq: u64) -> &mut Req {
        let cookie = self.by_seq[&seq];
        self.reqs.get_mut(&cookie).unwrap()
    }

    fn open_remotes(&self, want_memsync: bool) -> Vec<u64> {
        self.reqs
            .values()
            .filter(|r| match r.remote {
                Remote::Taken { memsync } => !want_memsync || memsync,
                Remote::Received => !want_memsync,
                _ => false,
            })
            .map(|r| r.seq)
            .collect()
    }

    fn apply(&mut self, op: &Op) {
        self.fail_allowed = false;
        match *op {
            Op::Submit {
                cmd,
                ext,
                sect,
                nsect,
            } => {
                let cmd = match cmd {
                    0..=2 => IoCmd::Write,
                    3 | 4 => IoCmd::Read,
                    5 | 6 => IoCmd::Delete,
                    _ => IoCmd::Flush,
                };
                let (off, len) = if cmd == IoCmd::Flush {
                    (0, 0)
                } else {
                    let off = (u64::from(ext) * EXT + u64::from(sect) * SECT).min(MEDIA - SECT);
                    let len = (u64::from(nsect) * SECT).min(MEDIA - off);
                    (off, len)
                };
                let cookie = self.next_cookie;
                self.next_cookie += 1;
                let seq = self.core.submit(cmd, off, len, cookie).unwrap();
                let fgen = if cmd == IoCmd::Flush {
                    self.fgen += 1;
                    self.fgen
                } else {
                    0
                };
                let (e0, e1) = if len == 0 {
                    (0, 0)
                } else {
                    ((off / EXT) as u32, ((off + len - 1) / EXT) as u32)
                };
                self.by_seq.insert(seq, cookie);
                self.reqs.insert(
                    cookie,
                    Req {
                        seq,
                        cmd,
                        off,
                        len,
                        e0,
                        e1,
                        mode: self.mode,
                        local: Local::NotIssued,
                        remote: Remote::None,
                        acked: None,
                        released: false,
                        bumpfail: false,
                        fgen,
                        internal: false,
                    },
                );
            }
            Op::LocalDone { pick: p, err } => {
                let Some(seq) = pick(&self.locals, p) else {
                    return;
                };
                self.locals.retain(|&s| s != seq);
                let e = if err { EIO } else { 0 };
                self.core.local_done(seq, e).unwrap();
                if self.syncios.contains_key(&seq) {
                    return; // answered by a SyncIoDone upcall
                }
                self.req_by_seq(seq).local = Local::Done(e);
                self.internal_done(seq);
            }
            Op::RemoteRecv { pick: p } => {
                let Some(seq) = pick(&self.open_remotes(true), p) else {
                    return;
                };
                self.core.remote_received(seq).unwrap();
                self.req_by_seq(seq).remote = Remote::Received;
            }
            Op::RemoteDone { pick: p, err } => {
                let Some(seq) = pick(&self.open_remotes(false), p) else {
                    return;
                };
                let e = if err { EIO } else { 0 };
                self.core.remote_done(seq, e).unwrap();
                let r = self.req_by_seq(seq);
                r.remote = Remote::Done(e);
                // The peer failed an update while connected: a bump is
                // owed, as in an outage.
                if err && r.update() && self.link && self.bump == Bump::Ok {
                    self.bump = Bump::Needed;
                }
                self.internal_done(seq);
            }
            Op::MapDone { err } => {
                let Some(snap) = self.inflight.take() else {
                    assert_eq!(self.core.map_done(0), Err(CoreError::Invalid("map_done")));
                    return;
                };
                if err {
                    self.fail_allowed = true;
                    self.map_failed = true;
                    self.core.map_done(EIO).unwrap();
                } else {
                    self.map_failed = false;
                    self.disk = snap;
                    self.core.map_done(0).unwrap();
                }
            }
            Op::LinkDown => {
                if self.link && self.bump == Bump::Ok {
                    self.bump = Bump::Needed;
                }
                self.link = false;
                let mut lost = Vec::new();
                for r in self.reqs.values_mut() {
                    if r.remote.open() {
                        r.remote = Remote::Lost;
                        lost.push(r.seq);
                    }
                }
                // Unconfirmed durable on the peer: resynchronized.
                for e in 0..NEXT {
                    if self.unflushed[e as usize].take().is_some() {
                        self.must_sync[e as usize] = true;
                        // Stays on disk if it got there (a merged extent's
                        // mark may still be on its way).
                        if self.marked(e, e) {
                            self.must_disk[e as usize] = true;
                        }
                    }
                }
                for l in self.locks.values_mut() {
                    l.failed = true;
                }
                self.core.set_link(false);
                for seq in lost {
                    self.internal_done(seq);
                }
            }
            Op::LinkUp => {
                self.link = true;
                if self.bump == Bump::Needed {
                    self.bump = Bump::Ok;
                }
                self.core.set_link(true);
            }
            Op::BumpDone { err } => {
                if self.bump != Bump::Pending {
                    assert_eq!(self.core.bump_done(0), Err(CoreError::Invalid("bump_done")));
                    return;
                }
                if err {
                    self.fail_allowed = true;
                    self.bump = if self.link { Bump::Ok } else { Bump::Needed };
                    for r in self.reqs.values_mut() {
                        if r.local != Local::NotIssued {
                            r.bumpfail = true;
                        }
                    }
                    self.core.bump_done(EIO).unwrap();
                } else {
                    self.bump = Bump::Ok;
                    self.core.bump_done(0).unwrap();
                }
            }
            Op::SyncLock { ext, n } => {
                let off = u64::from(ext) * EXT;
                let len = (u64::from(n) * EXT).min(MEDIA - off);
                let seq = self.core.sync_lock(off, len).unwrap();
                let before = self.next_cookie;
                self.locks.insert(
                    seq,
                    Lock {
                        off,
                        len,
                        granted: false,
                        failed: !self.link,
                        nio: 0,
                        before,
                    },
                );
            }
            Op::SyncIo {
                pick: p,
                write,
                half,
            } => {
                let granted: Vec<u64> = self
                    .locks
                    .iter()
                    .filter(|(_, l)| l.granted)
                    .map(|(s, _)| *s)
                    .collect();
                let Some(lseq) = pick(&granted, p) else {
                    return;
                };
                let l = self.locks.get_mut(&lseq).unwrap();
                let len = if half {
                    (l.len / 2).max(SECT) / SECT * SECT
                } else {
                    l.len
                };
                let cmd = if write { IoCmd::Write } else { IoCmd::Read };
                let seq = self.core.sync_io(lseq, cmd, l.off, len, 77).unwrap();
                l.nio += 1;
                self.syncios.insert(seq, lseq);
            }
            Op::SyncRelease { pick: p, clear } => {
                let all: Vec<u64> = self.locks.keys().copied().collect();
                let Some(lseq) = pick(&all, p) else { return };
                let l = self.locks[&lseq].clone();
                let before = self.core.map(MapKind::Sync);
                let rc = self.core.sync_release(lseq, clear);
                if l.nio > 0 {
                    assert_eq!(rc, Err(CoreError::Busy("sync_release")));
                    return;
                }
                self.locks.remove(&lseq);
                if clear && l.granted && l.failed {
                    assert_eq!(
                        rc,
                        Err(CoreError::Failed("sync_release")),
                        "a failed lock must not clear"
                    );
                    return;
                }
                assert_eq!(rc, Ok(()));
                if clear && l.granted {
                    let sync = self.core.map(MapKind::Sync);
                    for e in 0..NEXT {
                        let start = u64::from(e) * EXT;
                        let end = (start + EXT).min(MEDIA);
                        if start >= l.off && end <= l.off + l.len {
                            self.must_sync[e as usize] = false;
                            self.must_disk[e as usize] = false;
                            // Copied: marked until a flush of both.
                            if bit(&before, e) {
                                self.written_on_both(e);
                            }
                            assert!(
                                !bit(&sync, e),
                                "extent {e} still in the sync map after a clean sync"
                            );
                        }
                    }
                }
            }
            Op::Merge { bits } => {
                let mut map = vec![0u8; self.core.map_size()];
                map[0] = bits as u8;
                map[1] = (bits >> 8) as u8;
                self.core.map_merge(&map).unwrap();
                for e in 0..NEXT {
                    if bit(&map, e) {
                        self.must_sync[e as usize] = true;
                    }
                }
            }
            Op::SetDir(d) => {
                self.syncdir = match d {
                    0 => SyncDir::None,
                    1 => SyncDir::ToPeer,
                    _ => SyncDir::FromPeer,
                };
                self.core.set_sync_dir(self.syncdir);
            }
            Op::SetMode(m) => {
                self.mode = mode_of(m);
                self.core.set_mode(self.mode);
            }
            Op::CoreFlush => {
                let busy = self.reqs.values().any(|r| r.internal && !r.released)
                    || self.iflush_gen.is_some();
                match self.core.flush() {
                    Ok(gen) => {
                        assert!(
                            self.link && !busy,
                            "flush started: link {} busy {busy}",
                            self.link
                        );
                        self.fgen += 1;
                        assert_eq!(gen, self.fgen, "flush numbers");
                        self.iflush_gen = Some(gen);
                    }
                    Err(CoreError::Busy(_)) => assert!(busy, "flush refused as busy"),
                    Err(CoreError::Failed(_)) => assert!(!self.link),
                    Err(e) => panic!("flush: {e}"),
                }
            }
        }
    }

    /// Extents of r set on disk and kept by the map write in flight.
    fn marked(&self, e0: u32, e1: u32) -> bool {
        (e0..=e1).all(|e| bit(&self.disk, e) && self.inflight.as_ref().is_none_or(|m| bit(m, e)))
    }

    fn take_upcalls(&mut self) {
        while let Some(up) = self.core.next_upcall() {
            match up.kind {
                UpcallKind::Bump => {
                    // With the link up only after the peer failed an update.
                    assert_eq!(self.bump, Bump::Needed, "second bump in one outage");
                    self.bump = Bump::Pending;
                }
                UpcallKind::SyncLocked => {
                    let l = self.locks.get_mut(&up.seq).unwrap();
                    assert!(!l.granted);
                    l.granted = true;
                    let (off, len) = (l.off, l.len);
                    for r in self.reqs.values() {
                        assert!(
                            !(r.io_open() && overlap(r.off, r.len, off, len)),
                            "sync lock granted over write in flight {r:?}"
                        );
                    }
                }
                UpcallKind::SyncIoDone { error } => {
                    let lseq = self.syncios.remove(&up.seq).unwrap();
                    let l = self.locks.get_mut(&lseq).unwrap();
                    l.nio -= 1;
                    if error != 0 {
                        l.failed = true;
                    }
                }
                kind => {
                    assert!(self.link, "remote request queued with the link down");
                    let link = self.link;
                    if kind == UpcallKind::Flush && up.cookie == 0 {
                        self.internal_req(up.seq);
                    }
                    let r = self.req_by_seq(up.seq).clone();
                    let cookie = if r.internal { 0 } else { self.by_seq[&up.seq] };
                    assert_eq!((up.offset, up.length, up.cookie), (r.off, r.len, cookie));
                    let memsync = match kind {
                        UpcallKind::Write { memsync } => {
                            assert_eq!(r.cmd, IoCmd::Write);
                            assert_eq!(memsync, r.mode == Mode::MemSync);
                            memsync
                        }
                        UpcallKind::Delete => {
                            assert_eq!(r.cmd, IoCmd::Delete);
                            false
                        }
                        UpcallKind::Flush => {
                            assert_eq!(r.cmd, IoCmd::Flush);
                            false
                        }
                        _ => {
                            assert_eq!(r.cmd, IoCmd::Read);
                            false
                        }
                    };
                    if r.update() {
                        assert!(
                            self.marked(r.e0, r.e1),
                            "data sent before the map write completed: {r:?}"
                        );
                    }
                    assert!(link);
                    self.req_by_seq(up.seq).remote = Remote::Taken { memsync };
                }
            }
        }
    }

    fn events(&mut self) {
        for ev in self.host.take() {
            match ev {
                Ev::Map(m) => {
                    assert!(self.inflight.is_none(), "two map writes in flight");
                    assert_eq!(m.len(), self.core.map_size());
                    assert_ne!(m, self.disk, "map write that changes nothing");
                    self.inflight = Some(m);
                }
                Ev::Local(io) => {
                    assert!(!self.locals.contains(&io.seq));
                    self.locals.push(io.seq);
                    if io.sync {
                        assert!(self.syncios.contains_key(&io.seq));
                        continue;
                    }
                    if io.internal {
                        assert_eq!((io.cmd, io.cookie), (IoCmd::Flush, 0));
                        self.internal_req(io.seq);
                    }
                    let link = self.link;
                    let bump = self.bump;
                    let r = self.req_by_seq(io.seq).clone();
                    assert_eq!((io.cmd, io.offset, io.length), (r.cmd, r.off, r.len));
                    assert_eq!(r.local, Local::NotIssued);
                    if r.update() {
                        assert!(
                            self.marked(r.e0, r.e1),
                            "data written before the map write completed: {r:?}"
                        );
                        assert!(
                            link || bump == Bump::Ok,
                            "write issued in an outage before the bump"
                        );
                        // Overlapping updates reach the disk in submit order.
                        for q in self.reqs.values() {
                            let unfinished = q.local == Local::Issued
                                || (q.local == Local::NotIssued && q.acked.is_none());
                            assert!(
                                !(q.update()
                                    && q.seq < r.seq
                                    && unfinished
                                    && overlap(r.off, r.len, q.off, q.len)),
                                "write {r:?} issued before the earlier overlapping {q:?}"
                            );
                        }
                        for (s, l) in &self.locks {
                            assert!(
                                !(l.granted && overlap(r.off, r.len, l.off, l.len)),
                                "write {r:?} issued under granted sync lock {s}"
                            );
                            let cookie = self.by_seq[&io.seq];
                            assert!(
                                !(cookie >= l.before && overlap(r.off, r.len, l.off, l.len)),
                                "write {r:?} overtook sync lock {s} asked before it"
                            );
                        }
                    }
                    self.req_by_seq(io.seq).local = Local::Issued;
                }
                Ev::Complete(cookie, err) => self.on_complete(cookie, err),
                Ev::Release(cookie) => {
                    let r = self.reqs.get_mut(&cookie).unwrap();
                    assert!(r.acked.is_some(), "released before acknowledged");
                    assert!(!r.released);
                    r.released = true;
                    let r = r.clone();
                    assert!(
                        !matches!(r.local, Local::Issued),
                        "released with local I/O open"
                    );
                    assert!(!r.remote.open(), "released with remote half open");
                    if r.update() && r.local != Local::NotIssued {
                        let clean = r.local == Local::Done(0) && r.remote == Remote::Done(0);
                        for e in r.e0..=r.e1 {
                            if clean {
                                // Both wrote it: marked until a flush.
                                self.written_on_both(e);
                            } else {
                                self.must_sync[e as usize] = true;
                                self.must_disk[e as usize] = true;
                            }
                        }
                    }
                    if r.cmd == IoCmd::Flush {
                        self.flushed(&r);
                    }
                }
            }
        }
    }

    fn on_complete(&mut self, cookie: u64, err: i32) {
        let bump = self.bump;
        let fail_allowed = self.fail_allowed;
        let r = self.reqs.get_mut(&cookie).unwrap();
        assert!(r.acked.is_none(), "acknowledged twice");
        r.acked = Some(err);
        let r = r.clone();
        let resolved = !r.remote.open();
        let rok = r.remote == Remote::Done(0);
        match r.local {
            Local::Issued => panic!("acknowledged before the local I/O finished: {r:?}"),
            Local::NotIssued => {
                if r.cmd == IoCmd::Read {
                    // A stale read served by the peer.
                    assert!(resolved, "stale read acknowledged before the peer answered");
                    assert_eq!(err, if rok { 0 } else { EIO });
                } else {
                    assert!(
                        r.update() && fail_allowed && err == EIO,
                        "unissued request completed: {r:?} {err}"
                    );
                }
                return;
            }
            Local::Done(le) => {
                if le != 0 {
                    assert!(
                        resolved,
                        "local failure acknowledged before the remote result: {r:?}"
                    );
                    assert_eq!(err, if rok { 0 } else { le });
                    return;
                }
            }
        }
        match r.cmd {
            IoCmd::Read => assert_eq!(err, 0),
            IoCmd::Flush => {
                if r.mode != Mode::Async {
                    assert!(resolved, "flush acknowledged before the peer: {r:?}");
                }
                assert_eq!(err, 0);
            }
            _ => {
                match r.mode {
                    Mode::FullSync => assert!(resolved, "fullsync ack before remote done: {r:?}"),
                    Mode::MemSync => {
                        assert!(
                            resolved || r.remote == Remote::Received,
                            "memsync ack before received: {r:?}"
                        )
                    }
                    Mode::Async => {}
                }
                let local_only = !rok
                    && r.remote != Remote::Received
                    && !matches!(r.remote, Remote::Taken { .. });
                if local_only && err == 0 {
                    assert_eq!(
                        bump,
                        Bump::Ok,
                        "local-only write acknowledged before the bump: {r:?}"
                    );
                }
                if err != 0 {
                    assert!(
                        err == EIO && r.bumpfail,
                        "unexpected write error {err}: {r:?}"
                    );
                }
            }
        }
    }

    fn check(&self) {
        let disk = self.core.map(MapKind::Disk);
        assert_eq!(
            disk, self.disk,
            "core's diskmap differs from the last map written"
        );
        let sync = self.core.map(MapKind::Sync);
        let dirty = self.core.map(MapKind::Dirty);
        // Never clean on disk while a write is unconfirmed.
        for r in self.reqs.values() {
            if r.in_flight() {
                assert!(
                    self.marked(r.e0, r.e1),
                    "extent of unconfirmed write not on disk: {r:?}"
                );
            }
        }
        for e in 0..NEXT {
            // Wanted on disk until a flush of both covers it (and with no
            // map write in flight, on disk: the check below).
            if self.unflushed[e as usize].is_some() {
                assert!(
                    bit(&dirty, e),
                    "extent {e} left the map before a flush of both sides covered it"
                );
            }
            if self.hot[e as usize].is_some() {
                assert!(bit(&dirty, e), "hot extent {e} left the map");
            }
            if self.must_sync[e as usize] {
                assert!(bit(&sync, e), "extent {e} lost its sync mark");
            }
            if self.must_disk[e as usize] {
                assert!(
                    self.marked(e, e),
                    "extent {e} needs resync but is clean on disk"
                );
            }
        }
        // With no map write in flight (and none failed) the disk says
        // exactly what the core wants: marks and lazy cleaning both land.
        if self.inflight.is_none() && !self.map_failed {
            assert_eq!(dirty, self.disk, "map not rewritten after a change");
        }
        // Keepdirty bound: idle marked extents.
        let idle = (0..NEXT)
            .filter(|&e| {
                bit(&dirty, e)
                    && !bit(&sync, e)
                    && self.unflushed[e as usize].is_none()
                    && self.hot[e as usize].is_none()
                    && !self
                        .reqs
                        .values()
                        .any(|r| r.update() && !r.released && r.e0 <= e && e <= r.e1)
            })
            .count();
        assert!(
            idle <= self.keepdirty as usize,
            "{idle} idle dirty extents > keepdirty {}",
            self.keepdirty
        );
        let st = self.core.stats();
        assert!(st.keepdirty <= u64::from(self.keepdirty));
        let waiting = self
            .unflushed
            .iter()
            .zip(&self.hot)
            .filter(|(u, h)| u.is_some() || h.is_some())
            .count() as u64;
        assert_eq!(st.unflushed, waiting, "extents waiting for flushes");
        assert_eq!(
            (st.flush_gen, st.flush_busy),
            (
                self.fgen,
                self.reqs.values().any(|r| r.internal && !r.released)
            )
        );
        // Group commit: a waiting write has a reason to wait.
        for r in self.reqs.values() {
            if !r.update() || r.local != Local::NotIssued || r.acked.is_some() {
                continue;
            }
            let locked = self
                .locks
                .values()
                .any(|l| overlap(r.off, r.len, l.off, l.len));
            let bump_hold = !self.link && self.bump != Bump::Ok;
            let ordered = self.reqs.values().any(|q| {
                q.update()
                    && q.seq < r.seq
                    && (q.local == Local::Issued
                        || (q.local == Local::NotIssued && q.acked.is_none()))
                    && overlap(r.off, r.len, q.off, q.len)
            });
            assert!(
                locked || bump_hold || ordered || !self.marked(r.e0, r.e1),
                "write waits for nothing: {r:?}"
            );
        }
    }

    fn step(&mut self, op: &Op) {
        if std::env::var_os("CORE_PROPS_TRACE").is_some() {
            eprintln!("op {op:?} link={} bump={:?}", self.link, self.bump);
        }
        self.apply(op);
        self.take_upcalls();
        self.events();
        self.check();
    }

    /// Finish everything and check that every request was answered once.
    fn drain(&mut self) {
        self.step(&Op::LinkUp);
        for _ in 0..200 {
            if self.bump == Bump::Pending {
                self.step(&Op::BumpDone { err: false });
            }
            if self.inflight.is_some() {
                self.step(&Op::MapDone { err: false });
            }
            if !self.locals.is_empty() {
                self.step(&Op::LocalDone {
                    pick: 0,
                    err: false,
                });
            }
            if !self.open_remotes(false).is_empty() {
                self.step(&Op::RemoteDone {
                    pick: 0,
                    err: false,
                });
            }
            if let Some((&s, _)) = self.locks.iter().find(|(_, l)| l.nio == 0) {
                let all: Vec<u64> = self.locks.keys().copied().collect();
                let i = all.iter().position(|&x| x == s).unwrap();
                self.step(&Op::SyncRelease {
                    pick: i,
                    clear: false,
                });
            }
        }
        for r in self.reqs.values() {
            assert!(
                r.acked.is_some() && r.released,
                "request never finished: {r:?}"
            );
        }
        let st = self.core.stats();
        assert_eq!(
            (st.q_local, st.q_send, st.q_recv, st.q_held, st.sync_locks),
            (0, 0, 0, 0, 0)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn core_keeps_every_rule(mode in 0u8..3, keepdirty in 0u32..4,
                             ops in prop::collection::vec(op_strategy(), 1..120)) {
        let mut m = Model::new(mode_of(mode), keepdirty);
        for op in &ops {
            m.step(op);
        }
        m.drain();
        let Model { core, .. } = m;
        assert!(core.close().is_ok());
    }
}

// ---------------------------------------------------------------------------
// Scenarios.

fn locals(evs: &[Ev]) -> Vec<LocalIo> {
    evs.iter()
        .filter_map(|e| {
            if let Ev::Local(io) = e {
                Some(*io)
            } else {
                None
            }
        })
        .collect()
}

fn maps(evs: &[Ev]) -> Vec<Vec<u8>> {
    evs.iter()
        .filter_map(|e| {
            if let Ev::Map(m) = e {
                Some(m.clone())
            } else {
                None
            }
        })
        .collect()
}

fn completes(evs: &[Ev]) -> Vec<(u64, i32)> {
    evs.iter()
        .filter_map(|e| {
            if let Ev::Complete(c, err) = e {
                Some((*c, *err))
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn one_map_write_releases_every_waiting_write() {
    let (core, host) = new_core(Mode::FullSync, 8);
    core.set_link(true);
    let s1 = core.submit(IoCmd::Write, 0, 4096, 1).unwrap();
    let ev = host.take();
    assert_eq!(maps(&ev).len(), 1, "first write starts a map write");
    assert!(locals(&ev).is_empty(), "no data before the map is on disk");
    // Three writes to three new extents arrive while it is in flight.
    let s2 = core.submit(IoCmd::Write, EXT, 512, 2).unwrap();
    let s3 = core.submit(IoCmd::Write, 2 * EXT, 512, 3).unwrap();
    let s4 = core.submit(IoCmd::Write, 3 * EXT + 512, 1024, 4).unwrap();
    assert!(
        host.take().is_empty(),
        "they wait; still one map write in flight"
    );
    assert_eq!(core.stats().q_mapwait, 4);
    core.map_done(0).unwrap();
    let ev = host.take();
    assert_eq!(
        locals(&ev).iter().map(|io| io.seq).collect::<Vec<_>>(),
        vec![s1]
    );
    let next = maps(&ev);
    assert_eq!(next.len(), 1, "one map write for all three waiting writes");
    assert_eq!(next[0][0] & 0x0f, 0x0f);
    core.map_done(0).unwrap();
    let ev = host.take();
    assert_eq!(
        locals(&ev).iter().map(|io| io.seq).collect::<Vec<_>>(),
        vec![s2, s3, s4]
    );
    assert_eq!(core.stats().requests.activemap_updates, 2);
    assert_eq!(core.map(MapKind::Disk)[0] & 0x0f, 0x0f);
}

#[test]
fn memsync_acknowledges_on_received() {
    let (core, host) = new_core(Mode::MemSync, 4);
    core.set_link(true);
    let seq = core.submit(IoCmd::Write, 0, 4096, 9).unwrap();
    core.map_done(0).unwrap();
    let up = core.next_upcall().unwrap();
    assert_eq!(
        (up.kind, up.seq),
        (UpcallKind::Write { memsync: true }, seq)
    );
    host.take();
    core.local_done(seq, 0).unwrap();
    assert!(
        completes(&host.take()).is_empty(),
        "not before the peer received it"
    );
    core.remote_received(seq).unwrap();
    assert_eq!(
        host.take()
            .iter()
            .filter(|e| matches!(e, Ev::Complete(9, 0)))
            .count(),
        1
    );
    assert!(
        bit(&core.map(MapKind::Disk), 0),
        "extent stays marked until remote done"
    );
    core.remote_done(seq, 0).unwrap();
    assert!(matches!(host.take()[..], [Ev::Release(9)]));
    assert!(!bit(&core.map(MapKind::Sync), 0));
}

/// Two overlapping writes in flight: the later one reaches the local disk
/// (and the peer) only after the earlier one's local half finished, so a
/// host that runs local I/Os in any order cannot leave the earlier data
/// on top; a write elsewhere is not held.
#[test]
fn overlapping_writes_reach_the_disk_in_submit_order() {
    let (core, host) = new_core(Mode::FullSync, 4);
    core.set_link(true);
    let issued =
        |host: &Host| -> Vec<u64> { locals(&host.take()).iter().map(|io| io.seq).collect() };
    let sent = || -> Vec<u64> {
        std::iter::from_fn(|| core.next_upcall())
            .map(|u| u.seq)
            .collect()
    };
    let a = core.submit(IoCmd::Write, 0, 1024, 1).unwrap();
    core.map_done(0).unwrap();
    let b = core.submit(IoCmd::Write, 512, 1024, 2).unwrap();
    let c = core.submit(IoCmd::Write, 2048, 512, 3).unwrap();
    // d overlaps both a and b.
    let d = core.submit(IoCmd::Delete, 512, 512, 4).unwrap();
    assert_eq!(
        issued(&host),
        vec![a, c],
        "b and d overlap a, still in flight"
    );
    assert_eq!(
        sent(),
        vec![a, c],
        "nor are they sent to the peer before it"
    );
    // The remote half of a does not hold b: only its local half does.
    core.local_done(a, 0).unwrap();
    assert_eq!(issued(&host), vec![b], "b follows a; d still waits for b");
    assert_eq!(sent(), vec![b]);
    core.local_done(b, 0).unwrap();
    assert_eq!(issued(&host), vec![d]);
    assert_eq!(sent(), vec![d]);
    // A local failure releases the next one as well.
    let e = core.submit(IoCmd::Write, 2048, 512, 5).unwrap();
    assert!(issued(&host).is_empty());
    core.local_done(c, 5).unwrap();
    assert_eq!(issued(&host), vec![e]);
    for s in [d, e] {
        core.local_done(s, 0).unwrap();
    }
    for s in [a, b, c, d] {
        core.remote_done(s, 0).unwrap();
    }
    let _ = sent();
    core.remote_done(e, 0).unwrap();
    host.take();
    assert_eq!(core.stats().q_local, 0);
}

#[test]
fn async_acknowledges_on_local_and_sends_in_order() {
    let (core, host) = new_core(Mode::Async, 4);
    core.set_link(true);
    let a = core.submit(IoCmd::Write, 0, 512, 1).unwrap();
    core.map_done(0).unwrap();
    let b = core.submit(IoCmd::Write, 512, 512, 2).unwrap();
    let c = core.submit(IoCmd::Delete, 1024, 512, 3).unwrap();
    let order: Vec<u64> = std::iter::from_fn(|| core.next_upcall())
        .map(|u| u.seq)
        .collect();
    assert_eq!(order, vec![a, b, c]);
    host.take();
    core.local_done(b, 0).unwrap();
    assert_eq!(
        completes(&host.take()),
        vec![(2, 0)],
        "async acks on local done"
    );
    core.local_done(a, 0).unwrap();
    core.local_done(c, 0).unwrap();
    assert_eq!(completes(&host.take()), vec![(1, 0), (3, 0)]);
    assert_eq!(core.stats().q_recv, 3, "remote copies still in flight");
    for s in [a, b, c] {
        core.remote_done(s, 0).unwrap();
    }
    assert_eq!(host.take().len(), 3, "three releases");
}

/// Run the core's own flush of both sides to success; the other events it
/// caused (a map write when extents left the map).
fn flush_both(core: &Core, host: &Host) -> Vec<Ev> {
    let gen = core.flush().unwrap();
    let mut evs = host.take();
    let io = locals(&evs)
        .into_iter()
        .find(|io| io.internal)
        .expect("the local half of the flush");
    evs.retain(|e| !matches!(e, Ev::Local(l) if l.internal));
    let up = std::iter::from_fn(|| core.next_upcall())
        .find(|u| u.kind == UpcallKind::Flush)
        .expect("the remote half of the flush");
    assert_eq!(up.cookie, 0);
    core.local_done(io.seq, 0).unwrap();
    core.remote_done(up.seq, 0).unwrap();
    assert_eq!(core.stats().flush_done, gen);
    evs.extend(host.take());
    evs
}

/// Run enough flushes of both sides for every extent written before to
/// have left the hot set; the events they caused.
fn flush_until_cold(core: &Core, host: &Host) -> Vec<Ev> {
    (0..=hast::core::HOT_FLUSHES)
        .flat_map(|_| flush_both(core, host))
        .collect()
}

/// A hot extent (written on both sides during the last few flushes) stays
/// marked on disk: the next writes to it need no map write, however many
/// flushes cover them, as long as they keep coming; a link loss leaves it
/// out of the sync map (both sides flushed it); once writes stop, it
/// leaves the map after HOT_FLUSHES flushes.
#[test]
fn hot_extents_need_no_map_write_and_leave_once_idle() {
    let (core, host) = new_core(Mode::FullSync, 0);
    core.set_link(true);
    let write = |seq: u64| {
        let s = core.submit(IoCmd::Write, 5 * EXT, 4096, seq).unwrap();
        let evs = host.take();
        let m = maps(&evs);
        if !m.is_empty() {
            core.map_done(0).unwrap();
        }
        core.local_done(s, 0).unwrap();
        core.remote_done(s, 0).unwrap();
        host.take();
        m.len()
    };
    assert_eq!(write(1), 1, "the first write marks the extent");
    let before = core.stats().requests.activemap_updates;
    for i in 0..3 * u64::from(hast::core::HOT_FLUSHES) {
        assert_eq!(write(10 + i), 0, "write {i} to a hot extent wrote the map");
        assert!(maps(&flush_both(&core, &host)).is_empty());
    }
    assert_eq!(core.stats().requests.activemap_updates, before);
    // Flushed on both sides: a link loss does not resynchronize it.
    assert_eq!(write(99), 0);
    flush_both(&core, &host);
    core.set_link(false);
    assert!(!bit(&core.map(MapKind::Sync), 5));
    assert!(bit(&core.map(MapKind::Disk), 5));
    core.set_link(true);
    host.take();
    let mut cleaned = None;
    for n in 1..=hast::core::HOT_FLUSHES + 1 {
        if !maps(&flush_both(&core, &host)).is_empty() {
            cleaned = Some(n);
            core.map_done(0).unwrap();
            break;
        }
    }
    assert_eq!(
        cleaned,
        Some(hast::core::HOT_FLUSHES),
        "idle flushes before it left"
    );
    assert!(!bit(&core.map(MapKind::Disk), 5));
}

/// An extent written on both sides leaves the on-disk map only after a
/// flush of both sides that started after the write finished (either copy
/// may hold it only in a volatile cache until then); a flush that started
/// earlier, or one that failed, does not clean it, and a link loss sends it
/// to the sync map.
#[test]
fn extents_leave_the_map_only_after_a_flush_of_both_sides() {
    let (core, host) = new_core(Mode::FullSync, 0);
    core.set_link(true);
    let early = core.submit(IoCmd::Flush, 0, 0, 50).unwrap();
    let s = core.submit(IoCmd::Write, 2 * EXT, 512, 1).unwrap();
    core.map_done(0).unwrap();
    core.local_done(s, 0).unwrap();
    core.remote_done(s, 0).unwrap();
    host.take();
    // The flush that started before the write finished covers nothing.
    core.local_done(early, 0).unwrap();
    core.remote_done(early, 0).unwrap();
    assert!(maps(&host.take()).is_empty());
    assert!(
        bit(&core.map(MapKind::Disk), 2),
        "clean before a covering flush"
    );
    assert_eq!(core.stats().unflushed, 1);
    // A client flush that fails on the peer does not either.
    let f = core.submit(IoCmd::Flush, 0, 0, 51).unwrap();
    core.local_done(f, 0).unwrap();
    core.remote_done(f, EIO).unwrap();
    host.take();
    assert!(bit(&core.map(MapKind::Disk), 2));
    // A good one covers it; the extent stays hot (marked, no map write)
    // until HOT_FLUSHES more flushes have started without a write to it,
    // then the map is rewritten clean.
    let f = core.submit(IoCmd::Flush, 0, 0, 52).unwrap();
    core.local_done(f, 0).unwrap();
    core.remote_done(f, 0).unwrap();
    assert!(maps(&host.take()).is_empty(), "hot extent cleaned at once");
    assert!(bit(&core.map(MapKind::Disk), 2));
    assert_eq!(core.stats().unflushed, 1);
    assert_eq!(core.stats().dirty, 0, "a hot extent is not dirty");
    // The write finished while flush 1 ran: it leaves the map with the
    // first flush numbered past 1 + HOT_FLUSHES.
    let mut m = Vec::new();
    while m.is_empty() {
        assert!(
            core.stats().flush_gen <= 1 + hast::core::HOT_FLUSHES,
            "still marked after its hot flushes"
        );
        m = maps(&flush_both(&core, &host));
    }
    assert_eq!(core.stats().flush_gen, 2 + hast::core::HOT_FLUSHES);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0][0], 0);
    core.map_done(0).unwrap();
    assert_eq!(core.stats().unflushed, 0);
    // Unflushed when the link goes down: resynchronized.
    let s = core.submit(IoCmd::Write, 3 * EXT, 512, 2).unwrap();
    core.map_done(0).unwrap();
    core.local_done(s, 0).unwrap();
    core.remote_done(s, 0).unwrap();
    host.take();
    core.set_link(false);
    assert!(bit(&core.map(MapKind::Sync), 3));
    assert!(bit(&core.map(MapKind::Disk), 3));
    assert_eq!(core.stats().unflushed, 0);
    // The core's own flush needs the link, and only one runs at a time.
    assert_eq!(core.flush(), Err(CoreError::Failed("flush")));
    core.set_link(true);
    let g = core.flush().unwrap();
    assert_eq!(core.flush(), Err(CoreError::Busy("flush")));
    assert!(core.stats().flush_busy);
    let evs = host.take();
    let io = locals(&evs).into_iter().find(|io| io.internal).unwrap();
    let up = core.next_upcall().unwrap();
    core.local_done(io.seq, 0).unwrap();
    core.remote_done(up.seq, 0).unwrap();
    assert!(completes(&host.take()).is_empty(), "no client to answer");
    assert_eq!(
        (core.stats().flush_done, core.stats().flush_busy),
        (g, false)
    );
}

#[test]
fn extent_stays_dirty_after_remote_error() {
    let (core, host) = new_core(Mode::FullSync, 1);
    core.set_link(true);
    let s = core.submit(IoCmd::Write, 5 * EXT, 4096, 1).unwrap();
    core.map_done(0).unwrap();
    core.local_done(s, 0).unwrap();
    core.remote_done(s, EIO).unwrap();
    // Only the local copy has it: answered once localcnt is bumped, as in
    // an outage, although the link is up.
    assert!(completes(&host.take()).is_empty());
    assert_eq!(core.next_upcall().map(|u| u.kind), Some(UpcallKind::Bump));
    core.bump_done(0).unwrap();
    assert!(
        completes(&host.take()).contains(&(1, 0)),
        "the client write succeeded locally"
    );
    assert!(bit(&core.map(MapKind::Sync), 5));
    // Push extent 5 out of the keepdirty list: it must stay on disk.
    for (i, e) in [6u64, 7, 8].iter().enumerate() {
        let s = core
            .submit(IoCmd::Write, e * EXT, 512, 10 + i as u64)
            .unwrap();
        if host.take().iter().any(|e| matches!(e, Ev::Map(_))) {
            core.map_done(0).unwrap();
        }
        core.local_done(s, 0).unwrap();
        core.remote_done(s, 0).unwrap();
    }
    while host.take().iter().any(|e| matches!(e, Ev::Map(_))) {
        core.map_done(0).unwrap();
    }
    assert!(
        bit(&core.map(MapKind::Disk), 5),
        "failed extent cleaned on disk"
    );
    assert!(bit(&core.map(MapKind::Sync), 5));
    assert_eq!(core.stats().syncdirty, 1);
}

#[test]
fn local_failure_with_remote_success_keeps_extent_marked() {
    let (core, host) = new_core(Mode::FullSync, 0);
    core.set_link(true);
    let s = core.submit(IoCmd::Write, 0, 512, 1).unwrap();
    core.map_done(0).unwrap();
    core.local_done(s, EIO).unwrap();
    assert!(
        completes(&host.take()).is_empty(),
        "waits for the remote copy"
    );
    core.remote_done(s, 0).unwrap();
    assert_eq!(completes(&host.take()), vec![(1, 0)]);
    assert!(bit(&core.map(MapKind::Sync), 0) && bit(&core.map(MapKind::Disk), 0));
    assert_eq!(core.stats().requests.write_errors, 1);
}

#[test]
fn keepdirty_evicts_the_least_recently_used_extent() {
    let (core, host) = new_core(Mode::FullSync, 2);
    core.set_link(true);
    let mut written = Vec::new();
    for (i, e) in [0u64, 1, 2].iter().enumerate() {
        let s = core.submit(IoCmd::Write, e * EXT, 512, i as u64).unwrap();
        let m = maps(&host.take());
        assert_eq!(m.len(), 1, "a new extent needs a map write");
        written.push(m[0][0]);
        core.map_done(0).unwrap();
        core.local_done(s, 0).unwrap();
        core.remote_done(s, 0).unwrap();
        // No longer hot, the extent stays marked as a keepdirty one.
        assert!(maps(&flush_until_cold(&core, &host)).is_empty());
    }
    // The third map write marks extent 2 and drops idle extent 0.
    assert_eq!(written, vec![0b001, 0b011, 0b110]);
    assert_eq!(core.map(MapKind::Dirty)[0], 0b110);
    assert_eq!(core.map(MapKind::Disk)[0], 0b110);
    assert_eq!(core.stats().keepdirty, 2);
    // A hot extent in the list needs no map write.
    let s = core.submit(IoCmd::Write, EXT, 512, 9).unwrap();
    assert!(maps(&host.take()).is_empty());
    core.local_done(s, 0).unwrap();
    core.remote_done(s, 0).unwrap();
    assert_eq!(core.stats().requests.activemap_updates, 3);
    // While extents 0, 3 and 4 are busy the list still holds only two
    // idle ones; when they finish, only the two most recent stay marked.
    let busy: Vec<u64> = [0u64, 3, 4]
        .iter()
        .enumerate()
        .map(|(i, e)| {
            core.submit(IoCmd::Write, e * EXT, 512, 20 + i as u64)
                .unwrap()
        })
        .collect();
    while !maps(&host.take()).is_empty() {
        core.map_done(0).unwrap();
    }
    for s in busy {
        core.local_done(s, 0).unwrap();
        core.remote_done(s, 0).unwrap();
    }
    // Written on both sides: marked until a flush of both, and hot for a
    // few more.
    let mut evs = flush_until_cold(&core, &host);
    while !maps(&evs).is_empty() {
        core.map_done(0).unwrap();
        evs = host.take();
    }
    assert_eq!(
        core.map(MapKind::Disk)[0],
        0b11000,
        "only extents 3 and 4 kept"
    );
}

#[test]
fn first_write_of_an_outage_waits_for_the_bump() {
    let (core, host) = new_core(Mode::FullSync, 4);
    core.set_link(true);
    core.set_link(false);
    let a = core.submit(IoCmd::Write, 0, 512, 1).unwrap();
    core.map_done(0).unwrap();
    assert_eq!(core.next_upcall().map(|u| u.kind), Some(UpcallKind::Bump));
    let b = core.submit(IoCmd::Write, 512, 512, 2).unwrap();
    assert!(core.next_upcall().is_none(), "one bump per outage");
    assert!(
        locals(&host.take()).is_empty(),
        "held until the bump is persisted"
    );
    core.bump_done(0).unwrap();
    assert_eq!(
        locals(&host.take())
            .iter()
            .map(|io| io.seq)
            .collect::<Vec<_>>(),
        vec![a, b]
    );
    assert!(
        core.next_upcall().is_none(),
        "nothing sent to a missing peer"
    );
    core.local_done(a, 0).unwrap();
    core.local_done(b, 0).unwrap();
    assert_eq!(completes(&host.take()), vec![(1, 0), (2, 0)]);
    assert!(bit(&core.map(MapKind::Sync), 0));
    // Later writes of the same outage go straight through.
    let c = core.submit(IoCmd::Write, EXT, 512, 3).unwrap();
    core.map_done(0).unwrap();
    assert_eq!(locals(&host.take()).len(), 1);
    assert!(core.next_upcall().is_none());
    core.local_done(c, 0).unwrap();
}

#[test]
fn sync_lock_and_writes_wait_for_each_other() {
    let (core, host) = new_core(Mode::FullSync, 4);
    core.set_link(true);
    let w = core.submit(IoCmd::Write, 0, 512, 1).unwrap();
    core.map_done(0).unwrap();
    while core.next_upcall().is_some() {}
    let l = core.sync_lock(0, EXT).unwrap();
    assert!(
        core.next_upcall().is_none(),
        "lock waits for the write in flight"
    );
    let w2 = core.submit(IoCmd::Write, 1024, 512, 2).unwrap();
    core.local_done(w, 0).unwrap();
    core.remote_done(w, 0).unwrap();
    let up = core.next_upcall().unwrap();
    assert_eq!((up.kind, up.seq), (UpcallKind::SyncLocked, l));
    assert!(
        !locals(&host.take()).iter().any(|io| io.seq == w2),
        "write waits for the lock"
    );
    let io = core.sync_io(l, IoCmd::Read, 0, EXT, 5).unwrap();
    let ev = host.take();
    assert_eq!(locals(&ev)[0].seq, io);
    assert!(locals(&ev)[0].sync);
    core.local_done(io, 0).unwrap();
    let up = core.next_upcall().unwrap();
    assert_eq!((up.kind, up.seq), (UpcallKind::SyncIoDone { error: 0 }, io));
    core.sync_release(l, true).unwrap();
    assert!(locals(&host.take()).iter().any(|io| io.seq == w2));
}

#[test]
fn failed_resync_chunk_leaves_extent_dirty() {
    let (core, host) = new_core(Mode::FullSync, 4);
    core.set_link(true);
    let mut peer = vec![0u8; core.map_size()];
    peer[0] = 0b1000;
    core.map_merge(&peer).unwrap();
    assert!(
        maps(&host.take()).len() == 1,
        "merged extents are written to disk"
    );
    core.map_done(0).unwrap();
    let l = core.sync_lock(3 * EXT, EXT).unwrap();
    assert_eq!(
        core.next_upcall().map(|u| u.kind),
        Some(UpcallKind::SyncLocked)
    );
    let io = core.sync_io(l, IoCmd::Write, 3 * EXT, EXT, 0).unwrap();
    core.local_done(io, EIO).unwrap();
    assert_eq!(
        core.next_upcall().map(|u| u.kind),
        Some(UpcallKind::SyncIoDone { error: EIO })
    );
    assert_eq!(
        core.sync_release(l, true),
        Err(CoreError::Failed("sync_release"))
    );
    assert!(bit(&core.map(MapKind::Sync), 3) && bit(&core.map(MapKind::Disk), 3));
    // A good pass clears it, and the map is rewritten clean.
    let l = core.sync_lock(3 * EXT, EXT).unwrap();
    core.next_upcall();
    let io = core.sync_io(l, IoCmd::Write, 3 * EXT, EXT, 0).unwrap();
    core.local_done(io, 0).unwrap();
    core.next_upcall();
    core.sync_release(l, true).unwrap();
    assert!(!bit(&core.map(MapKind::Sync), 3));
    // Copied, and durable on both once flushed: then, no longer hot, the
    // map is clean.
    assert!(maps(&host.take()).is_empty(), "clean before the flush");
    assert_eq!(
        maps(&flush_until_cold(&core, &host)).last().map(|m| m[0]),
        Some(0)
    );
}

#[test]
fn link_loss_fails_remote_halves_and_keeps_extents_dirty() {
    let (core, host) = new_core(Mode::FullSync, 4);
    core.set_link(true);
    let s = core.submit(IoCmd::Write, 2 * EXT, 512, 1).unwrap();
    core.map_done(0).unwrap();
    core.local_done(s, 0).unwrap();
    assert!(completes(&host.take()).is_empty());
    core.set_link(false);
    // The write's only copy is local: acknowledged after the bump.
    assert!(completes(&host.take()).is_empty());
    let ups: Vec<_> = std::iter::from_fn(|| core.next_upcall()).collect();
    assert_eq!(ups.last().map(|u| u.kind), Some(UpcallKind::Bump));
    assert_eq!(
        core.remote_done(s, 0),
        Err(CoreError::UnknownSeq("remote_done", s))
    );
    core.bump_done(0).unwrap();
    assert_eq!(completes(&host.take()), vec![(1, 0)]);
    assert!(bit(&core.map(MapKind::Sync), 2) && bit(&core.map(MapKind::Disk), 2));
}

#[test]
fn stale_reads_go_to_the_peer() {
    let (core, host) = new_core(Mode::FullSync, 4);
    core.set_link(true);
    let mut peer = vec![0u8; core.map_size()];
    peer[0] = 0b10;
    core.map_merge(&peer).unwrap();
    core.set_sync_dir(SyncDir::FromPeer);
    let r = core.submit(IoCmd::Read, EXT, 512, 1).unwrap();
    let up = core.next_upcall().unwrap();
    assert_eq!((up.kind, up.seq), (UpcallKind::Read, r));
    assert!(locals(&host.take()).is_empty());
    core.remote_done(r, 0).unwrap();
    assert_eq!(completes(&host.take()), vec![(1, 0)]);
    // A fresh extent reads locally; a local failure falls back to the peer.
    let r = core.submit(IoCmd::Read, 0, 512, 2).unwrap();
    assert_eq!(locals(&host.take()).len(), 1);
    core.local_done(r, EIO).unwrap();
    assert_eq!(core.next_upcall().map(|u| u.kind), Some(UpcallKind::Read));
    core.remote_done(r, 0).unwrap();
    assert_eq!(completes(&host.take()), vec![(2, 0)]);
    assert_eq!(core.stats().requests.read_errors, 1);
}

#[test]
fn rejects_bad_requests_and_busy_close() {
    let (core, _host) = new_core(Mode::FullSync, 4);
    assert_eq!(
        core.submit(IoCmd::Write, 100, 512, 1),
        Err(CoreError::Invalid("submit"))
    );
    assert_eq!(
        core.submit(IoCmd::Write, MEDIA - 512, 1024, 1),
        Err(CoreError::Invalid("submit"))
    );
    assert_eq!(
        core.submit(IoCmd::Read, 0, 0, 1),
        Err(CoreError::Invalid("submit"))
    );
    assert_eq!(
        core.submit(IoCmd::Flush, 512, 0, 1),
        Err(CoreError::Invalid("submit"))
    );
    core.set_link(true);
    let _ = core.submit(IoCmd::Write, 0, 512, 1).unwrap();
    let Err((core, e)) = core.close() else {
        panic!("closed with a write in flight")
    };
    assert_eq!(e, CoreError::Busy("close"));
    drop(core);
}

/// A host that completes everything from inside the callbacks (re-entering
/// the core), driven by several client threads and an engine thread.
struct EchoHost {
    core: std::sync::OnceLock<std::sync::Weak<Core>>,
    completed: Mutex<BTreeMap<u64, i32>>,
    released: std::sync::atomic::AtomicU64,
}

impl EchoHost {
    fn core(&self) -> Arc<Core> {
        self.core.get().and_then(|w| w.upgrade()).unwrap()
    }
}

impl CoreHost for EchoHost {
    fn local_io(&self, io: LocalIo) {
        self.core().local_done(io.seq, 0).unwrap();
    }
    fn map_write(&self, _map: &[u8]) {
        self.core().map_done(0).unwrap();
    }
    fn complete(&self, cookie: u64, error: i32) {
        let prev = self.completed.lock().unwrap().insert(cookie, error);
        assert!(prev.is_none(), "request {cookie} completed twice");
    }
    fn release(&self, _cookie: u64) {
        self.released
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn callbacks_may_reenter_the_core_from_many_threads() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const THREADS: u64 = 4;
    const PER: u64 = 500;
    let host = Arc::new(EchoHost {
        core: std::sync::OnceLock::new(),
        completed: Mutex::new(BTreeMap::new()),
        released: Default::default(),
    });
    let core = Arc::new(
        Core::new(
            Params {
                mediasize: MEDIA,
                extentsize: EXT as u32,
                sectorsize: SECT as u32,
                keepdirty: 3,
                mode: Mode::MemSync,
            },
            host.clone(),
        )
        .unwrap(),
    );
    host.core.set(Arc::downgrade(&core)).ok().unwrap();
    core.set_link(true);
    let stop = Arc::new(AtomicBool::new(false));
    let engine = {
        let core = core.clone();
        let stop = stop.clone();
        std::thread::spawn(move || loop {
            match core.next_upcall() {
                Some(up) => match up.kind {
                    UpcallKind::Write { memsync: true } => {
                        core.remote_received(up.seq).unwrap();
                        core.remote_done(up.seq, 0).unwrap();
                    }
                    UpcallKind::Bump => core.bump_done(0).unwrap(),
                    _ => core.remote_done(up.seq, 0).unwrap(),
                },
                None if stop.load(Ordering::SeqCst) => break,
                None => std::thread::yield_now(),
            }
        })
    };
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let core = core.clone();
            std::thread::spawn(move || {
                for i in 0..PER {
                    let n = t * PER + i;
                    let cmd = [
                        IoCmd::Write,
                        IoCmd::Write,
                        IoCmd::Read,
                        IoCmd::Delete,
                        IoCmd::Flush,
                    ][(n % 5) as usize];
                    let (off, len) = if cmd == IoCmd::Flush {
                        (0, 0)
                    } else {
                        ((n * 7 % 80) * SECT, SECT * (1 + n % 9))
                    };
                    core.submit(cmd, off, len, n).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    while core.stats().q_recv + core.stats().q_send + core.stats().q_local > 0 {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::SeqCst);
    engine.join().unwrap();
    let done = host.completed.lock().unwrap().clone();
    assert_eq!(done.len() as u64, THREADS * PER, "every request answered");
    assert!(done.values().all(|&e| e == 0));
    assert_eq!(host.released.load(Ordering::SeqCst), THREADS * PER);
    assert_eq!(
        core.map(MapKind::Sync),
        vec![0u8; core.map_size()],
        "nothing left to sync"
    );
    assert_eq!(core.map(MapKind::Disk), core.map(MapKind::Dirty));
    let st = core.stats();
    assert_eq!(
        (st.requests.writes + st.requests.reads + st.requests.deletes + st.requests.flushes),
        THREADS * PER
    );
    let core = Arc::try_unwrap(core).ok().unwrap();
    assert!(core.close().is_ok());
}

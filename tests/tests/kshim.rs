//! The geom_hast kernel module itself (kmod/g_hast.c and kmod/hast_core.c,
//! compiled unchanged) on the userland kernel shim (sys/kshim), driven as
//! hastd drives it on FreeBSD: the engine's kernel transport
//! (`KernelPlane` over `KernelDevice`, ioctls into the module's d_ioctl),
//! a GEOM disk backed by a file under it, and clients sending bios to
//! `hast/NAME` through its start method. The contract of the ioctls, then
//! the module's own faults: ENOMEM from g_clone_bio and M_NOWAIT, the local
//! disk orphaned under writes, destroy with requests in flight, a copyout
//! fault on UPCALL, a signal in UPCALL. Every test ends with nothing left in
//! the shim (bios, module memory, events, geoms).
//!
//! Fault injection is global to the process: the tests take turns.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hast::core::{MapKind, Mode, Params, SyncDir, UpcallKind};
use hast::dataplane::{Dataplane, DataplaneError, HostUpcall, KernelPlane};
use hast::kdev::{CreateSpec, KernelDevice};
use hast::kshim::{self, Client, Disk, Fault};
use hast::metadata::Metadata;
use hast::role::Role;

const EXTENT: u64 = 64 * 1024;
const SIZE: u64 = 64 * EXTENT;
const MAPOFF: u64 = 4096;
const LOCALOFF: u64 = 8192;
const T: Duration = Duration::from_secs(10);

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// No fault injection survives a test, even a failed one.
struct NoFaults;

impl Drop for NoFaults {
    fn drop(&mut self) {
        kshim::fault_clear();
    }
}

/// One instance: its disk file, the plane and a client of hast/NAME.
struct Inst {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    disk: Option<Disk>,
    plane: KernelPlane,
    client: Option<Client>,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn inst(name: &str, mode: Mode, map: Vec<u8>) -> Inst {
    kshim::load().expect("load geom_hast on the shim");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.img"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(LOCALOFF + SIZE)
        .unwrap();
    let local = path.display().to_string();
    let disk = Disk::create_md(&local, 512).expect("a disk");
    let spec = CreateSpec {
        name: name.into(),
        local: disk.name().to_owned(),
        params: Params {
            mediasize: SIZE,
            extentsize: EXTENT as u32,
            sectorsize: 512,
            keepdirty: 4,
            mode,
        },
        localoff: LOCALOFF,
        mapoff: MAPOFF,
        metaflush: true,
        map,
    };
    let dev = KernelDevice::open_kshim(true).expect("open hastctl");
    let plane = KernelPlane::create_on(dev, &spec).expect("HAST_IOC_CREATE");
    let client = Client::open(&format!("hast/{name}"), 1, 1, 0).expect("open hast/NAME");
    Inst {
        _dir: dir,
        path,
        disk: Some(disk),
        plane,
        client: Some(client),
    }
}

impl Inst {
    fn client(&self) -> &Client {
        self.client.as_ref().expect("open")
    }

    fn disk(&self) -> &Disk {
        self.disk.as_ref().expect("present")
    }

    fn local(&self, off: u64, len: usize) -> Vec<u8> {
        let data = std::fs::read(&self.path).unwrap();
        data[(LOCALOFF + off) as usize..][..len].to_vec()
    }

    /// Close the client, destroy, take the disk away; nothing may be left.
    async fn teardown(mut self) {
        if let Some(c) = self.client.take() {
            c.close(T).expect("close hast/NAME");
        }
        let plane = self.plane;
        tokio::task::spawn_blocking(move || {
            plane.destroy(T).expect("HAST_IOC_DESTROY");
            drop(plane);
        })
        .await
        .unwrap();
        if let Some(d) = self.disk.take() {
            d.destroy(T).expect("destroy the disk");
        }
        idle().await;
    }
}

/// Nothing left in the shim (GEOM's washer runs on its own thread).
async fn idle() {
    let start = Instant::now();
    loop {
        match kshim::check_idle() {
            Ok(()) => return,
            Err(e) if start.elapsed() > T => panic!("not idle: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn upcall(plane: &KernelPlane) -> HostUpcall {
    tokio::time::timeout(T, plane.next_upcall())
        .await
        .expect("an upcall in time")
        .expect("the instance is alive")
}

/// The first write of the outage the module starts in: the bump.
async fn bump_then_link_up(i: &Inst) {
    let w = {
        let c = i.client();
        c.write(0, vec![1; 4096])
    };
    let h = tokio::join!(w, async {
        let h = upcall(&i.plane).await;
        assert_eq!(h.up.kind, UpcallKind::Bump);
        i.plane.bump_done(0);
    });
    h.0.expect("the outage's first write");
    i.plane.set_link(true);
}

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("{what} never finished"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reads_resync_metadata_and_destroy_through_the_kernel_transport() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    // Extent 1 dirty on disk: loaded at create, before any client.
    let mut map = vec![0u8; 512];
    map[0] = 0b10;
    let i = inst("ktrans", Mode::FullSync, map);
    assert_eq!(i.plane.map(MapKind::Sync).unwrap()[..2], [0b10, 0]);
    bump_then_link_up(&i).await;

    {
        // A write larger than the upcall thread's first buffer (128 KiB): the
        // payload reaches the engine whole (the module parks it), the client
        // waits for the remote half.
        let data = pattern(512 * 1024, 3);
        let c = i.client();
        let w = c.write(2 * EXTENT, data.clone());
        tokio::pin!(w);
        let h = tokio::select! {
            r = &mut w => panic!("fullsync acknowledged before the peer: {r:?}"),
            h = upcall(&i.plane) => h,
        };
        assert_eq!(h.up.kind, UpcallKind::Write { memsync: false });
        assert_eq!((h.up.offset, h.up.length), (2 * EXTENT, data.len() as u64));
        assert_eq!(h.data.as_deref(), Some(&data[..]));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut w)
                .await
                .is_err(),
            "fullsync acknowledged before the peer"
        );
        i.plane.remote_done(&h.up, 0, None);
        within("the write", w).await.unwrap();
        assert_eq!(i.local(2 * EXTENT, data.len()), data);

        // Reads of an extent stale locally go to the peer; its bytes reach the
        // client.
        i.plane.set_sync_dir(SyncDir::FromPeer);
        let r = c.read(EXTENT, 4096);
        let (r, ()) = tokio::join!(r, async {
            let h = upcall(&i.plane).await;
            assert_eq!(
                (h.up.kind, h.up.offset, h.up.length),
                (UpcallKind::Read, EXTENT, 4096)
            );
            i.plane.remote_done(&h.up, 0, Some(vec![0x5a; 4096]));
        });
        assert_eq!(r.unwrap(), vec![0x5a; 4096]);

        // Resync of that extent: the grant comes through the upcall thread,
        // local I/O under the lock, the extent clean once released.
        let lock = within("the sync lock", i.plane.sync_lock(EXTENT, EXTENT))
            .await
            .unwrap();
        let chunk = bytes::Bytes::from(vec![0x77u8; EXTENT as usize]);
        i.plane
            .sync_write(lock, EXTENT, chunk.clone())
            .await
            .unwrap();
        assert_eq!(
            i.plane.sync_read(lock, EXTENT, 4096).await.unwrap(),
            vec![0x77; 4096]
        );
        i.plane.sync_release(lock, true).unwrap();
        assert_eq!(i.plane.map(MapKind::Sync).unwrap()[0] & 0b10, 0);
        assert_eq!(i.local(EXTENT, EXTENT as usize), chunk.to_vec());

        // An outage: the first write waits for the engine's counter bump.
        i.plane.set_sync_dir(SyncDir::None);
        i.plane.set_link(false);
        let w = c.write(0, vec![1; 4096]);
        tokio::pin!(w);
        let h = tokio::select! {
            r = &mut w => panic!("acknowledged before the bump: {r:?}"),
            h = upcall(&i.plane) => h,
        };
        assert_eq!(h.up.kind, UpcallKind::Bump);
        i.plane.bump_done(0);
        within("the write", w).await.unwrap();

        // The metadata block goes through the module.
        let md = Metadata {
            resource: "ktrans".into(),
            datasize: SIZE,
            extentsize: EXTENT as u32,
            keepdirty: 4,
            localoff: LOCALOFF,
            resuid: 7,
            localcnt: 3,
            remotecnt: 2,
            prevrole: Role::Primary,
            syncing: false,
        };
        let p = &i.plane;
        tokio::task::block_in_place(|| p.write_metadata(&md, true)).unwrap();
        let meta = std::fs::read(&i.path).unwrap();
        assert_eq!(Metadata::decode(&meta[..4096], "ktrans").unwrap(), md);

        let st = i.plane.stats().unwrap();
        assert_eq!((st.requests.writes, st.requests.reads), (3, 1));
        assert!(!st.link_up);
        assert_eq!(c.getattr_int("GEOM::candelete").unwrap(), 1);
        let xml = kshim::confxml();
        assert!(
            xml.contains(&format!("<Unit>{}</Unit>", i.plane.unit().0)),
            "{xml}"
        );
    }

    // Destroy ends the upcall thread; the engine sees the host gone.
    let Inst {
        _dir,
        path,
        disk,
        plane,
        client,
    } = i;
    client.unwrap().close(T).unwrap();
    let plane = Arc::new(plane);
    let p = plane.clone();
    tokio::task::spawn_blocking(move || p.destroy(T))
        .await
        .unwrap()
        .unwrap();
    assert!(plane.next_upcall().await.is_none());
    assert!(plane.stats().is_err());
    drop(plane);
    disk.unwrap().destroy(T).unwrap();
    drop((_dir, path));
    idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_lock_waiting_for_writes_is_cancelled_when_the_link_goes() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let i = inst("kcancel", Mode::FullSync, vec![0; 512]);
    bump_then_link_up(&i).await;
    {
        let c = i.client();
        let w = c.write(0, vec![9; 4096]);
        tokio::pin!(w);
        let h = tokio::select! {
            r = &mut w => panic!("acknowledged early: {r:?}"),
            h = upcall(&i.plane) => h,
        };
        // The range has a write in flight: the lock waits for it.
        let waiting = i.plane.sync_lock(0, EXTENT);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut waiting)
                .await
                .is_err(),
            "granted over a write in flight"
        );
        i.plane.sync_cancel();
        assert!(matches!(waiting.await, Err(DataplaneError::Closed)));
        i.plane.remote_done(&h.up, 0, None);
        within("the write", w).await.unwrap();
    }
    i.teardown().await;
}

/// A shortage is ENOMEM, which GEOM retries: the client never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enomem_from_g_clone_bio_and_m_nowait_is_retried_by_geom() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let i = inst("kenomem", Mode::MemSync, vec![0; 512]);
    bump_then_link_up(&i).await;
    let c = i.client();
    let answer = async {
        loop {
            let h = upcall(&i.plane).await;
            if matches!(h.up.kind, UpcallKind::Write { .. }) {
                i.plane.remote_received(h.up.seq);
            }
            i.plane.remote_done(&h.up, 0, None);
        }
    };
    let writes = async {
        kshim::fault_set(Fault::CloneBio, 0, 5);
        c.write(3 * EXTENT, pattern(8192, 1)).await.unwrap();
        assert_eq!(kshim::fault_hits(Fault::CloneBio), 5);
        let before = kshim::fault_hits(Fault::MallocNowait);
        kshim::fault_set(Fault::MallocNowait, 0, 4);
        c.write(3 * EXTENT, pattern(8192, 2)).await.unwrap();
        assert_eq!(kshim::fault_hits(Fault::MallocNowait), before + 4);
        kshim::fault_clear();
        assert_eq!(c.read(3 * EXTENT, 8192).await.unwrap(), pattern(8192, 2));
    };
    tokio::select! {
        () = writes => {}
        () = answer => unreachable!(),
    }
    // The engine's own requests answer ENOMEM; nothing is left behind.
    kshim::fault_set(Fault::MallocNowait, 0, 1);
    assert!(i.plane.flush().is_err(), "DOWN_FLUSH with no memory");
    kshim::fault_set(Fault::MallocNowait, 0, 1);
    let e = within("a sync lock", i.plane.sync_lock(0, EXTENT))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("out of memory"), "{e}");
    kshim::fault_clear();
    i.teardown().await;
}

/// The local disk goes away with writes in flight: those the peer
/// confirms still succeed, and reads come from the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_disk_orphaned_under_writes() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let i = inst("korphan", Mode::FullSync, vec![0; 512]);
    bump_then_link_up(&i).await;
    let c = i.client();
    let peer = Mutex::new(vec![0u8; SIZE as usize]);
    let engine = async {
        loop {
            let h = upcall(&i.plane).await;
            match h.up.kind {
                UpcallKind::Write { .. } => {
                    let d = h.data.as_deref().unwrap();
                    peer.lock().unwrap()[h.up.offset as usize..][..d.len()].copy_from_slice(d);
                    i.plane.remote_done(&h.up, 0, None);
                }
                UpcallKind::Read => {
                    let d = peer.lock().unwrap()[h.up.offset as usize..][..h.up.length as usize]
                        .to_vec();
                    i.plane.remote_done(&h.up, 0, Some(d));
                }
                UpcallKind::Bump => i.plane.bump_done(0),
                _ => i.plane.remote_done(&h.up, 0, None),
            }
        }
    };
    let test = async {
        // Extents 0-3 marked on disk first.
        for e in 0..4 {
            c.write(e * EXTENT, pattern(EXTENT as usize, 1))
                .await
                .unwrap();
        }
        // Four writes whose local halves wait on the (held) disk.
        i.disk().hold(true).unwrap();
        let writes: Vec<_> = (0..4)
            .map(|e| c.write(e * EXTENT, pattern(EXTENT as usize, 2 + e as u8)))
            .collect();
        let all = async {
            for w in writes {
                w.await.expect("a write the peer has");
            }
        };
        tokio::pin!(all);
        let start = Instant::now();
        while i.disk().queued() < 4 {
            assert!(start.elapsed() < T, "the local halves never queued");
            tokio::select! {
                () = &mut all => panic!("answered with the local halves held"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        // The disk disappears: the held halves fail, the clients do not.
        i.disk().orphan().unwrap();
        i.disk().hold(false).unwrap();
        within("the writes", all).await;
        // New writes: the local half fails at once, the peer has them.
        c.write(0, pattern(EXTENT as usize, 9)).await.unwrap();
        // Reads come from the peer.
        assert_eq!(
            c.read(EXTENT, EXTENT as usize).await.unwrap(),
            pattern(EXTENT as usize, 3)
        );
        assert_eq!(
            c.read(0, EXTENT as usize).await.unwrap(),
            pattern(EXTENT as usize, 9)
        );
    };
    tokio::select! {
        () = test => {}
        () = engine => unreachable!(),
    }
    // Every extent written since is dirty: the local copy needs repair.
    assert_eq!(i.plane.map(MapKind::Sync).unwrap()[0], 0b1111);
    i.teardown().await;
}

/// Destroy: EBUSY while hast/NAME is open with requests waiting for the
/// peer; once they ended and it is closed, it waits for a map write still
/// on the disk, then ends the upcall thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_with_requests_in_flight() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let i = inst("kdestroy", Mode::FullSync, vec![0; 512]);
    bump_then_link_up(&i).await;
    let lock = {
        let c = i.client();
        let writes: Vec<_> = (0..4)
            .map(|e| c.write((4 + e) * EXTENT, pattern(8192, e as u8)))
            .collect();
        let all = async {
            for w in writes {
                w.await.expect("a write whose remote half failed");
            }
        };
        tokio::pin!(all);
        let mut taken = 0;
        while taken < 4 {
            tokio::select! {
                () = &mut all => panic!("fullsync acknowledged before the peer"),
                h = upcall(&i.plane) => {
                    assert!(matches!(h.up.kind, UpcallKind::Write { .. }));
                    taken += 1;
                }
            }
        }
        let lock = within("the sync lock", i.plane.sync_lock(32 * EXTENT, EXTENT))
            .await
            .unwrap();
        let p = &i.plane;
        let e = tokio::task::block_in_place(|| p.destroy(Duration::ZERO)).unwrap_err();
        assert!(e.to_string().contains("EBUSY"), "{e}");
        // The link goes: the remote halves fail, the writes wait for the bump.
        i.plane.set_link(false);
        let bump = async {
            let h = upcall(&i.plane).await;
            assert_eq!(h.up.kind, UpcallKind::Bump);
            i.plane.bump_done(0);
        };
        tokio::join!(within("the writes", all), bump);
        lock
    };
    let Inst {
        _dir,
        path,
        disk,
        plane,
        client,
    } = i;
    client.unwrap().close(T).unwrap();
    // A map write held on the disk (the merge marks extents nobody waits
    // for): the destroy waits for it.
    let disk = disk.unwrap();
    disk.hold(true).unwrap();
    let mut map = vec![0u8; 512];
    map[6] = 0x0f;
    plane.map_merge(&map).unwrap();
    let plane = Arc::new(plane);
    let p = plane.clone();
    let destroy = tokio::task::spawn_blocking(move || p.destroy(T));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !destroy.is_finished(),
        "destroyed with a map write in flight"
    );
    disk.hold(false).unwrap();
    within("the destroy", destroy).await.unwrap().unwrap();
    // The engine's lock went with it, and so did the upcall thread.
    assert!(plane.sync_release(lock, true).is_err());
    assert!(plane.next_upcall().await.is_none());
    drop(plane);
    disk.destroy(T).unwrap();
    drop((_dir, path));
    idle().await;
}

/// A fault while UPCALL copies a write's payload out: the write was never
/// sent, so it is answered from the local copy after a counter bump and
/// its extent stays dirty; the upcall thread carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copyout_fault_on_upcall_keeps_the_extent_dirty() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let i = inst("kcopyout", Mode::FullSync, vec![0; 512]);
    bump_then_link_up(&i).await;
    {
        let c = i.client();
        kshim::fault_set(Fault::Copyout, 0, 1);
        let w = c.write(5 * EXTENT, pattern(8192, 5));
        tokio::pin!(w);
        let h = tokio::select! {
            r = &mut w => panic!("answered before the bump: {r:?}"),
            h = upcall(&i.plane) => h,
        };
        assert_eq!(kshim::fault_hits(Fault::Copyout), 1);
        assert_eq!(h.up.kind, UpcallKind::Bump, "the faulted write came up");
        i.plane.bump_done(0);
        within("the write", w).await.unwrap();
        assert_eq!(
            i.plane.map(MapKind::Sync).unwrap()[0] & 0b10_0000,
            0b10_0000
        );
        // The next write goes to the peer as usual.
        let w = c.write(6 * EXTENT, pattern(8192, 6));
        let ((), r) = tokio::join!(
            async {
                let h = upcall(&i.plane).await;
                assert_eq!(h.up.offset, 6 * EXTENT);
                assert_eq!(h.data.as_deref(), Some(&pattern(8192, 6)[..]));
                i.plane.remote_done(&h.up, 0, None);
            },
            w
        );
        r.unwrap();
    }
    i.teardown().await;
}

/// A signal interrupts the upcall thread's sleep in UPCALL (EINTR); it
/// goes back to sleep and later upcalls still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_in_upcall_is_survived() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let i = inst("ksignal", Mode::FullSync, vec![0; 512]);
    let start = Instant::now();
    while kshim::interrupt(Some("hastup")) == 0 {
        assert!(start.elapsed() < T, "nobody sleeps in UPCALL");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bump_then_link_up(&i).await;
    i.teardown().await;
}

fn spec(name: &str, local: &str) -> CreateSpec {
    CreateSpec {
        name: name.into(),
        local: local.into(),
        params: Params {
            mediasize: SIZE,
            extentsize: EXTENT as u32,
            sectorsize: 512,
            keepdirty: 4,
            mode: Mode::FullSync,
        },
        localoff: LOCALOFF,
        mapoff: MAPOFF,
        metaflush: false,
        map: vec![0; 512],
    }
}

/// HAST_IOC_CREATE's refusals, each with its errno and nothing left behind:
/// a taken name, a local provider that does not exist or is open
/// exclusively elsewhere, a geometry that does not fit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_refusals_leave_nothing_behind() {
    use nix::errno::Errno;
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let i = inst("kcreate", Mode::FullSync, vec![0; 512]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(LOCALOFF + SIZE)
        .unwrap();
    let other = Disk::create_md(&path.display().to_string(), 512).unwrap();
    let dev = KernelDevice::open_kshim(true).unwrap();
    let errno = |r: Result<hast::kdev::Unit, hast::kdev::KdevError>| r.unwrap_err().errno();
    assert_eq!(
        errno(dev.create(&spec("kcreate", other.name()))),
        Some(Errno::EEXIST)
    );
    assert_eq!(
        errno(dev.create(&spec("kcreate2", "no-such-disk"))),
        Some(Errno::ENOENT)
    );
    let mut s = spec("kcreate2", other.name());
    s.params.mediasize = 2 * SIZE;
    assert_eq!(errno(dev.create(&s)), Some(Errno::EINVAL));
    // Someone holds the disk exclusively: GEOM refuses the module's open.
    let excl = Client::open(other.name(), 1, 1, 1).unwrap();
    assert_eq!(
        errno(dev.create(&spec("kcreate2", other.name()))),
        Some(Errno::EPERM)
    );
    excl.close(T).unwrap();
    // A read-only descriptor may only ask for statistics.
    let ro = KernelDevice::open_kshim(false).unwrap();
    assert_eq!(
        errno(ro.create(&spec("kcreate2", other.name()))),
        Some(Errno::EBADF)
    );
    assert!(ro.stats(i.plane.unit()).is_ok());
    drop((ro, dev));
    other.destroy(T).unwrap();
    i.teardown().await;
}

/// The engine goes away (its descriptor's last close) with an instance
/// alive: the instance's link goes down, so the next write waits for a
/// counter bump instead of a remote half nobody would finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_control_device_takes_the_link_down() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kclose.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(LOCALOFF + SIZE)
        .unwrap();
    let disk = Disk::create_md(&path.display().to_string(), 512).unwrap();
    let creator = KernelDevice::open_kshim(true).unwrap();
    let unit = creator.create(&spec("kclose", disk.name())).unwrap();
    let other = KernelDevice::open_kshim(true).unwrap();
    other.set_link(unit, true).unwrap();
    assert!(other.stats(unit).unwrap().link_up);
    drop(creator);
    assert!(!other.stats(unit).unwrap().link_up, "the link stayed up");
    other.destroy(unit).unwrap();
    drop(other);
    disk.destroy(T).unwrap();
    idle().await;
}

/// A peer read answered with the wrong number of bytes is refused
/// (EINVAL) and changes nothing; the right answer then completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_read_of_the_wrong_length_is_refused() {
    use nix::errno::Errno;
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let mut map = vec![0u8; 512];
    map[0] = 1;
    let i = inst("kshort", Mode::FullSync, map);
    bump_then_link_up(&i).await;
    i.plane.set_sync_dir(SyncDir::FromPeer);
    let dev = KernelDevice::open_kshim(true).unwrap();
    let r = i.client().read(0, 8192);
    let h = upcall(&i.plane).await;
    assert_eq!(h.up.kind, UpcallKind::Read);
    let e = dev
        .remote_done(i.plane.unit(), h.up.seq, 0, &[7u8; 4096])
        .unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EINVAL), "{e}");
    dev.remote_done(i.plane.unit(), h.up.seq, 0, &[7u8; 8192])
        .unwrap();
    assert_eq!(within("the read", r).await.unwrap(), vec![7u8; 8192]);
    drop(dev);
    i.teardown().await;
}

/// The local disk is orphaned with I/O in flight and, when the last of it
/// ends, there is no memory for the event that detaches the consumer: the
/// module leaves it to destroy, which detaches it; every access count and
/// bio is accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detach_event_lost_to_a_memory_shortage_is_done_by_destroy() {
    let _t = TURN.lock().await;
    let _f = NoFaults;
    let i = inst("kdetach", Mode::FullSync, vec![0; 512]);
    bump_then_link_up(&i).await;
    let engine = async {
        loop {
            let h = upcall(&i.plane).await;
            match h.up.kind {
                UpcallKind::Bump => i.plane.bump_done(0),
                _ => i.plane.remote_done(&h.up, 0, None),
            }
        }
    };
    let test = async {
        let c = i.client();
        c.write(0, vec![1; 8192]).await.unwrap();
        i.disk().hold(true).unwrap();
        let w = c.write(0, vec![2; 8192]);
        let start = Instant::now();
        while i.disk().queued() < 1 {
            assert!(start.elapsed() < T, "the local half never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The orphan reaches the module while the local half is in
        // flight; then nothing but g_post_event allocates, and cannot.
        i.disk().orphan().unwrap();
        kshim::settle();
        kshim::fault_set(Fault::MallocNowait, 0, u32::MAX);
        i.disk().hold(false).unwrap();
        w.await.unwrap();
        let start = Instant::now();
        while kshim::fault_hits(Fault::MallocNowait) == 0 {
            assert!(start.elapsed() < T, "no detach event was attempted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kshim::fault_clear();
    };
    tokio::select! {
        () = test => {}
        () = engine => unreachable!(),
    }
    // The module's consumer still holds the orphaned disk open: destroy
    // closes and detaches it.
    let xml = kshim::confxml();
    let consumer = format!(
        "<consumer><provider>{}</provider><mode>r1w1e1</mode></consumer>",
        i.disk().name()
    );
    assert!(xml.contains(&consumer), "{xml}");
    i.teardown().await;
    assert!(!kshim::confxml().contains(&consumer));
}

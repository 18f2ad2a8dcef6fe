//! A degraded primary's export when something goes wrong, and what it
//! reports: hastd killed with -9 under fio (every changed extent stays
//! marked in the on-disk map, the data is served after the restart), local
//! write errors (ENOSPC on a full tmpfs) reaching the client and the
//! counters, clients that stop reading their replies (role init, SIGTERM and
//! the other clients do not wait for them), and the statistics of
//! `hastctl list`, counted exactly across clients and a role cycle.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hast_tests::export::{
    expected_map, extents_of, ok, python_has_nbd, stamped, CLIENT_TIME, IDLE_QUEUES, MIB,
};
use hast_tests::{
    bin, have, list_field, list_number, map_bits, nbdwire as w, python, run_timeout, wait_for,
    ChildGuard, RawNbd, Solo, SoloOpts,
};

fn set_bits(bits: &[bool]) -> BTreeSet<u64> {
    bits.iter()
        .enumerate()
        .filter(|(_, &b)| b)
        .map(|(i, _)| i as u64)
        .collect()
}

#[test]
fn kill9_during_fio_leaves_every_changed_extent_marked() {
    if !have("fio") {
        eprintln!("SKIPPED: fio is not installed");
        return;
    }
    // 16 KiB extents: 4096 of them, so a short run leaves many untouched
    // and the kill lands among many first writes to clean extents.
    let mut s = Solo::new(64 * MIB, &["-e", "16K"]);
    let (localoff, datasize, es) = s.geometry();
    assert_eq!(es, 16 << 10);
    let extents = datasize.div_ceil(es);
    let before = s.image();
    assert!(map_bits(&before, extents).iter().all(|b| !b));

    let fio = ChildGuard::new(
        Command::new("fio")
            .current_dir(&s.dir)
            .arg("--name=crash")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", s.uri()))
            .args([
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--iodepth=16",
                "--time_based",
                "--runtime=60",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fio"),
    );
    let started = wait_for(Duration::from_secs(30), || {
        list_number(&s.list(), "writes").unwrap_or(0) >= 300
    });
    assert!(started, "fio did not write: {}", s.list());
    s.node.kill9();
    let r = fio.wait_timeout(Duration::from_secs(30));
    assert_ne!(r.code, -2, "fio hung after hastd was killed");

    let after = s.image();
    assert_eq!(after.len(), before.len());
    let lo = localoff as usize;
    let changed: BTreeSet<u64> = (0..extents)
        .filter(|&n| {
            let a = lo + (n * es) as usize;
            let b = (lo + ((n + 1) * es) as usize).min(after.len());
            after[a..b] != before[a..b]
        })
        .collect();
    let marked = set_bits(&map_bits(&after, extents));
    eprintln!(
        "kill -9: {} of {extents} extents changed, {} marked dirty on disk",
        changed.len(),
        marked.len()
    );
    assert!(!changed.is_empty(), "fio changed nothing");
    let unmarked: Vec<u64> = changed.difference(&marked).copied().collect();
    assert!(
        unmarked.is_empty(),
        "extents with new data but clean in the on-disk map: {unmarked:?} ({} changed, {} marked)",
        changed.len(),
        marked.len()
    );
    assert!(
        (changed.len() as u64) < extents,
        "every extent changed; the run was too long to tell anything"
    );
    // Bits past the last extent stay clear.
    let tail = &after[4096 + extents.div_ceil(8) as usize..lo];
    assert!(
        tail.iter().all(|&b| b == 0),
        "map bits beyond the last extent"
    );

    // Restart: the dirty count comes from the on-disk map.
    s.node.start();
    s.primary();
    let l = s.list();
    let dirty = list_number(&l, "dirty").unwrap();
    assert!(dirty >= changed.len() as u64 * es, "{l}");
    assert_eq!(dirty, marked.len() as u64 * es, "{l}");
    assert_eq!(list_field(&l, "status"), Some("degraded"), "{l}");
    // The data survived the crash: what the file holds is what is served.
    let back = s.dir.join("back.bin");
    hast_tests::sparse_file(&back, datasize);
    ok(
        &run_timeout(Command::new("nbdcopy").arg(s.uri()).arg(&back), CLIENT_TIME),
        "nbdcopy after restart",
    );
    assert!(
        fs::read(&back).unwrap() == after[lo..],
        "served data != provider data"
    );
}

const PY_COUNTS: &str = r#"
import nbd, sys
uri, es = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
writes = [(0, 4096, 0x21), (8192, 4096, 0x22), (3 * es, 65536, 0x23),
          (6 * es - 4096, 8192, 0x24), (3 * es + 65536, 512, 0x25)]
for off, n, p in writes:
    h.pwrite(bytes([p]) * n, off)
reads = [(0, 4096, 0x21), (8192, 4096, 0x22), (3 * es, 65536, 0x23),
         (6 * es - 4096, 8192, 0x24), (3 * es + 65536, 512, 0x25),
         (20 * es, 4096, 0), (4096, 4096, 0)]
for off, n, p in reads:
    got = h.pread(n, off)
    if got != bytes([p]) * n:
        sys.exit('read at %d: wrong data' % off)
h.trim(65536, 10 * es)
h.trim(4096, 0)
h.trim(4096, es // 2)
h.flush()
h.flush()
h.shutdown()
print('done')
"#;

#[test]
fn degraded_statistics_count_exactly() {
    if !python_has_nbd() {
        eprintln!("SKIPPED: python3 libnbd bindings missing");
        return;
    }
    let s = Solo::new(64 * MIB, &[]);
    let (localoff, _, es) = s.geometry();
    let l = s.list();
    assert_eq!(list_field(&l, "status"), Some("degraded"), "{l}");
    assert_eq!(list_number(&l, "dirty"), Some(0), "{l}");
    assert_eq!(s.dump_number("localcnt"), 0);

    let r = python(PY_COUNTS, &[&s.uri(), &es.to_string()], CLIENT_TIME);
    ok(&r, "python libnbd client");
    assert_eq!(r.stdout.trim(), "done");
    let l = s.list();
    for (f, v) in [("reads", 7), ("writes", 5), ("deletes", 3), ("flushes", 2)] {
        assert_eq!(list_number(&l, f), Some(v), "{f} in\n{l}");
    }
    assert!(list_number(&l, "activemap updates").unwrap() > 0, "{l}");
    assert_eq!(list_field(&l, "queues"), Some(IDLE_QUEUES), "{l}");
    // Written or trimmed: extents 0, 3, 5, 6 and 10.
    let touched: BTreeSet<u64> = [0, 3, 5, 6, 10].into_iter().collect();
    assert_eq!(
        list_number(&l, "dirty"),
        Some(touched.len() as u64 * es),
        "{l}"
    );
    assert_eq!(list_field(&l, "dirty"), Some("10485760 (10MB)"), "{l}");
    assert_eq!(list_field(&l, "status"), Some("degraded"), "{l}");
    assert_eq!(
        list_field(&l, "local errors"),
        Some("read: 0, write: 0, delete: 0, flush: 0"),
        "{l}"
    );
    let img = s.image();
    assert_eq!(
        img[4096..localoff as usize],
        expected_map(localoff, &touched)[..],
        "on-disk map"
    );
    assert_eq!(s.dump_number("localcnt"), 1);

    // A second client: counted on top, no second bump.
    let more = "import nbd,sys\nh=nbd.NBD()\nh.connect_uri(sys.argv[1])\nh.pwrite(b'x'*512, int(sys.argv[2]))\nh.shutdown()\n";
    ok(
        &python(more, &[&s.uri(), &(12 * es).to_string()], CLIENT_TIME),
        "second client",
    );
    let l = s.list();
    assert_eq!(list_number(&l, "writes"), Some(6), "{l}");
    assert_eq!(list_number(&l, "reads"), Some(7), "{l}");
    assert_eq!(list_number(&l, "dirty"), Some(6 * es), "{l}");
    assert_eq!(s.dump_number("localcnt"), 1);

    // Leave primary and come back: the dirty extents come back from the
    // on-disk map, the counters start again (a new data path, as a new
    // worker in the reference), and the first write of this primary period
    // bumps localcnt once more.
    ok(&s.node.hastctl("role", &["init", "r0"]), "role init");
    s.primary();
    let l = s.list();
    assert_eq!(list_number(&l, "dirty"), Some(6 * es), "{l}");
    assert_eq!(list_number(&l, "writes"), Some(0), "{l}");
    assert_eq!(s.dump_number("localcnt"), 1);
    for off in [0, 13 * es] {
        ok(
            &python(more, &[&s.uri(), &off.to_string()], CLIENT_TIME),
            "client after the role cycle",
        );
    }
    let l = s.list();
    assert_eq!(list_number(&l, "writes"), Some(2), "{l}");
    assert_eq!(list_number(&l, "dirty"), Some(7 * es), "{l}");
    assert_eq!(s.dump_number("localcnt"), 2);
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    /// Removed after the unmount (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let d = tempfile::Builder::new().prefix("hastfs").tempdir().ok()?;
        let p = d.path().join("mnt");
        fs::create_dir(&p).ok()?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&p)
            .status()
            .ok()?;
        st.success().then_some(Tmpfs { path: p, _dir: d })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn local_write_errors_reach_the_client_and_the_counters() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    // A 64 MiB sparse provider on an 8 MiB tmpfs: writes fail with ENOSPC
    // once the space is used up.
    let Some(fsys) = Tmpfs::mount("8m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs");
        return;
    };
    let img = fsys.path.join("r0.img");
    hast_tests::sparse_file(&img, 64 * MIB);
    let s = Solo::build(
        0,
        &SoloOpts {
            local: Some(img),
            ..SoloOpts::default()
        },
    );
    let (localoff, _, es) = s.geometry();
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    let mut good = Vec::new();
    let mut failed = 0u64;
    let mut touched = BTreeSet::new();
    for i in 0..12u64 {
        let off = i * 5 * MIB;
        let e = c.write(i, off, &stamped(off, MIB, 6)).unwrap();
        touched.extend(extents_of(off, MIB, es));
        match e {
            0 => good.push(off),
            w::ENOSPC => failed += 1,
            e => panic!("write at {off}: NBD error {e}, not ENOSPC"),
        }
    }
    assert!(
        !good.is_empty() && failed > 0,
        "{} ok, {failed} failed",
        good.len()
    );
    // Space already allocated can still be rewritten.
    assert_eq!(c.write(20, 0, &stamped(0, 4096, 7)).unwrap(), 0);
    for &off in &good[1..] {
        assert!(c.read(21, off, MIB as u32).unwrap().unwrap() == stamped(off, MIB, 6));
    }
    assert!(c.read(22, 0, 4096).unwrap().unwrap() == stamped(0, 4096, 7));
    let l = s.list();
    assert_eq!(list_number(&l, "writes"), Some(13), "{l}");
    assert_eq!(
        list_field(&l, "local errors"),
        Some(format!("read: 0, write: {failed}, delete: 0, flush: 0").as_str()),
        "{l}"
    );
    assert_eq!(list_field(&l, "queues"), Some(IDLE_QUEUES), "{l}");
    // A failed write leaves its extent dirty too.
    assert_eq!(
        list_number(&l, "dirty"),
        Some(touched.len() as u64 * es),
        "{l}"
    );
    let img = s.image();
    assert_eq!(
        img[4096..localoff as usize],
        expected_map(localoff, &touched)[..]
    );
    let st = s.node.hastctl("status", &["r0"]);
    assert!(
        st.stdout.contains("r0\tdegraded primary"),
        "{}{}\n{}",
        st.stdout,
        st.stderr,
        s.node.log_text()
    );
    drop(c);
    drop(s);
}

/// A client that asks for 64 MiB of reads and reads none of the replies:
/// hastd's reply writer for it blocks on the full socket.
fn stuck_client(s: &Solo) -> RawNbd {
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    for i in 0..64u64 {
        c.request(0, w::CMD_READ, i, i * MIB, MIB as u32, &[])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    c
}

/// Product bug (nbd/server.rs `Server::shutdown` and the connection drain;
/// engine/control_server.rs): leaving primary waits without any limit for
/// every reply to be written, so a client that has asked for data and
/// stops reading (a hung VM, a stopped process, a hostile peer) blocks
/// `hastctl role init` for as long as it stays connected, and the control
/// socket answers nothing meanwhile (`hastctl status` hangs too): a
/// failover script cannot demote this node.
#[test]
fn a_client_that_stops_reading_does_not_block_role_init() {
    let s = Solo::new(96 * MIB, &[]);
    let c = stuck_client(&s);
    let hastctl = |args: &[&str]| {
        let mut cmd = Command::new(bin("hastctl"));
        cmd.arg(args[0])
            .arg("-c")
            .arg(&s.conf)
            .args(["--node", "solo"])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let role = ChildGuard::new(hastctl(&["role", "init", "r0"]).spawn().unwrap());
    std::thread::sleep(Duration::from_secs(1));
    // Status waits behind role init (one control request at a time), which
    // takes the 5 s drain limit and the close: hung means far longer.
    let st = run_timeout(&mut hastctl(&["status"]), Duration::from_secs(15));
    let role = role.wait_timeout(Duration::from_secs(20));
    // Only now let the client go (unblocking hastd if it was stuck).
    drop(c);
    assert_ne!(
        st.code, -2,
        "hastctl status hung while role init drained a stuck client"
    );
    assert_ne!(
        role.code, -2,
        "hastctl role init hung on a client that does not read its replies"
    );
    ok(&role, "role init");
    assert!(!s.socket.exists());
}

/// Same bug on the way out: SIGTERM drains the export without a limit
/// (engine/mod.rs `Daemon::run` -> `Resource::shutdown`), so hastd does not
/// exit while a client that stopped reading is connected.
#[test]
fn sigterm_exits_despite_a_client_that_stops_reading() {
    let mut s = Solo::new(96 * MIB, &[]);
    let c = stuck_client(&s);
    let st = s.node.stop();
    drop(c);
    let st = st.expect("hastd did not exit within 30 s of SIGTERM");
    assert!(st.success(), "{st:?}");
    assert!(!s.socket.exists());
}

#[test]
fn a_client_that_stops_reading_does_not_stall_the_others() {
    let s = Solo::new(96 * MIB, &[]);
    let stuck = stuck_client(&s);
    let t = Instant::now();
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    for i in 0..64u64 {
        let off = 80 * MIB + i * 65536;
        let d = stamped(off, 65536, 12);
        assert_eq!(c.write(2 * i, off, &d).unwrap(), 0);
        assert!(c.read(2 * i + 1, off, 65536).unwrap().unwrap() == d);
    }
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let l = s.list();
    assert!(list_number(&l, "writes").unwrap() >= 64, "{l}");
    drop(stuck);
}

//! A primary's export through role changes and the daemon's life: role init
//! with writes in flight (each answered, the data kept) and with clients
//! connected (again and again, releasing the export's backend each time),
//! DISC after writes, a secondary exporting nothing, two resources with
//! separate exports, a socket path another server listens on, a failed role
//! primary, and SIGHUP keeping an unchanged export and moving a changed one.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use hast_tests::export::{ok, stamp, stamped, CLIENT_TIME, MIB};
use hast_tests::{
    bin, list_field, list_number, nbdwire as w, run_timeout, wait_for, RawNbd, Run, Solo,
};

/// A reply as the pipelined client saw it.
struct Answered {
    cookie: u64,
    error: u32,
    at: Instant,
}

#[test]
fn role_init_with_writes_in_flight_answers_them_and_keeps_the_data() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let s = Solo::new(64 * MIB, &[]);
    let (localoff, datasize, _) = s.geometry();
    // Write i goes to slot i % SLOTS with tag i + 1; at most WINDOW writes
    // are unanswered, so two writes to one slot are never in flight at once.
    const CHUNK: u64 = 16 << 10;
    const WINDOW: u64 = 512;
    let slots = datasize / CHUNK;
    assert!(slots > WINDOW);

    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO r0");
    let mut reader = RawNbd {
        s: c.s.try_clone().unwrap(),
    };
    let answered = Arc::new(AtomicU64::new(0));
    let replies = Arc::new(Mutex::new(Vec::<Answered>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let rthread = {
        let (answered, replies) = (answered.clone(), replies.clone());
        std::thread::spawn(move || {
            // Until the server closes the connection.
            while let Ok((error, cookie)) = reader.reply() {
                replies.lock().unwrap().push(Answered {
                    cookie,
                    error,
                    at: Instant::now(),
                });
                answered.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let wthread = {
        let (answered, stop) = (answered.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if sent - answered.load(Ordering::SeqCst) >= WINDOW {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let off = (sent % slots) * CHUNK;
                let data = stamped(off, CHUNK, sent + 1);
                // FUA: each write is synchronous on the provider, so the
                // server, not this client, is the bottleneck and many
                // writes are in flight inside hastd.
                if c.request(w::FLAG_FUA, w::CMD_WRITE, sent, off, CHUNK as u32, &data)
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    assert!(
        wait_for(Duration::from_secs(60), || answered.load(Ordering::SeqCst)
            >= 300),
        "writes are not being answered"
    );

    // The queues show the writes in flight. One sample can fall between
    // two writes on a loaded machine (the client, not hastd, lagging), so
    // sample until one shows them.
    let mut l = String::new();
    let shown = wait_for(Duration::from_secs(30), || {
        l = s.list();
        let local: u64 = list_field(&l, "queues")
            .and_then(|q| q.strip_prefix("local: "))
            .and_then(|q| q.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no local queue in\n{l}"));
        local > 0
    });
    assert!(
        shown,
        "writes in flight but the local queue stays empty:\n{l}"
    );
    // Leave primary while the client keeps the window full.
    let t0 = Instant::now();
    let r = run_timeout(
        Command::new(bin("hastctl"))
            .arg("role")
            .arg("-c")
            .arg(&s.conf)
            .args(["--node", "solo", "init", "r0"]),
        Duration::from_secs(30),
    );
    ok(&r, "hastctl role init");
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(
        !s.socket.exists(),
        "NBD socket still there after role init returned"
    );
    assert!(std::os::unix::net::UnixStream::connect(&s.socket).is_err());
    // The server closes the connection after the last answer.
    let closed = wait_for(Duration::from_secs(20), || rthread.is_finished());
    stop.store(true, Ordering::SeqCst);
    assert!(closed, "connection still open after role init");
    rthread.join().unwrap();
    let sent = wthread.join().unwrap();
    let replies = std::mem::take(&mut *replies.lock().unwrap());

    let mut acked = HashSet::new();
    for a in &replies {
        assert_eq!(
            a.error, 0,
            "write {} answered with NBD error {}",
            a.cookie, a.error
        );
        assert!(
            a.cookie < sent,
            "answer for a write never sent: {}",
            a.cookie
        );
        assert!(acked.insert(a.cookie), "write {} answered twice", a.cookie);
    }
    let late = replies.iter().filter(|a| a.at >= t0).count();
    eprintln!(
        "role init: {sent} writes sent, {} answered ({late} after role init began), {} unanswered",
        acked.len(),
        sent - acked.len() as u64
    );
    assert!(
        late > 0,
        "no write was answered after role init began: nothing was in flight"
    );
    // Graceful stop: a write that reached the provider was answered. Per
    // slot, the provider holds the last acknowledged write there (or
    // nothing, if no write to it was acknowledged).
    let img = s.image();
    let mut last_acked = vec![None; slots as usize];
    for &i in &acked {
        let l = &mut last_acked[(i % slots) as usize];
        *l = Some(l.map_or(i, |x: u64| x.max(i)));
    }
    for slot in 0..slots {
        let off = slot * CHUNK;
        let a = (localoff + off) as usize;
        let got = &img[a..a + CHUNK as usize];
        // The unanswered write to this slot, if any (the window is smaller
        // than the slot count, so there is at most one).
        let unanswered = (slot..sent)
            .step_by(slots as usize)
            .find(|j| !acked.contains(j));
        if let Some(j) = unanswered {
            assert!(
                got[..512] != stamp(off, j + 1)[..],
                "write {j} reached the provider at {off} but was never answered"
            );
        }
        match last_acked[slot as usize] {
            Some(i) => assert!(
                got == stamped(off, CHUNK, i + 1),
                "acknowledged write {i} at {off} is not in the provider"
            ),
            None => assert!(
                got.iter().all(|&b| b == 0),
                "slot at {off}: data of a write that was never answered"
            ),
        }
    }
    assert!(s.dump().contains("    prevrole: init\n"));

    // Primary again: the export is back with the data.
    s.primary();
    let back = s.dir.join("back.bin");
    hast_tests::sparse_file(&back, datasize);
    ok(
        &run_timeout(Command::new("nbdcopy").arg(s.uri()).arg(&back), CLIENT_TIME),
        "nbdcopy after primary again",
    );
    let img = s.image();
    assert!(
        fs::read(&back).unwrap() == img[localoff as usize..],
        "served data differs from the provider after primary again"
    );
}

/// One primary -> init cycle with three kinds of clients: one idle in the
/// handshake, one in transmission that has just written, one that sent DISC
/// a moment before. Checks what a user sees of the role change.
fn cycle_with_clients(s: &Solo, round: u64) {
    let mut idle = RawNbd::connect(&s.socket).unwrap();
    idle.greeting().unwrap();
    let mut busy = RawNbd::start(&s.socket).unwrap();
    busy.go("r0").unwrap().expect("GO");
    let d = stamped(round * MIB, 4096, round + 1);
    assert_eq!(busy.write(1, round * MIB, &d).unwrap(), 0);
    let mut gone = RawNbd::start(&s.socket).unwrap();
    gone.go("r0").unwrap().expect("GO");
    gone.request(0, w::CMD_DISC, 2, 0, 0, &[]).unwrap();
    drop(gone);

    let t = Instant::now();
    ok(&s.node.hastctl("role", &["init", "r0"]), "role init");
    // Not the 60 s handshake timeout: the idle client is dropped too.
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "role init took {:?}",
        t.elapsed()
    );
    assert!(!s.socket.exists(), "round {round}: socket left behind");
    assert!(
        idle.closed_by_server(),
        "round {round}: handshake client kept"
    );
    assert!(busy.closed_by_server(), "round {round}: client kept");
    let (localoff, _, _) = s.geometry();
    let img = s.image();
    let a = (localoff + round * MIB) as usize;
    assert!(img[a..a + 4096] == d[..], "round {round}: write lost");
}

#[test]
fn role_cycles_with_connected_clients_stop_the_export_cleanly() {
    let mut s = Solo::new(32 * MIB, &[]);
    for round in 0..4u64 {
        if round > 0 {
            s.primary();
        }
        cycle_with_clients(&s, round);
    }
    // SIGTERM with clients connected: clean exit, socket and pidfile gone.
    s.primary();
    let mut busy = RawNbd::start(&s.socket).unwrap();
    busy.go("r0").unwrap().expect("GO");
    let _idle = RawNbd::connect(&s.socket).unwrap();
    let st = s
        .node
        .stop()
        .expect("hastd exits on SIGTERM with clients connected");
    assert!(st.success(), "{st:?}");
    assert!(busy.closed_by_server());
    assert!(!s.socket.exists());
    assert!(!s.node.pidfile.exists());
}

/// Product bug (nbd/server.rs, `Server::shutdown`): it returns once every
/// `watch::Receiver` of the stop flag is dropped, but connection and accept
/// tasks drop their receiver before their `Arc<Shared>`, which owns the
/// `Registry` and so the export's backend (the `Uhost`). `Primary::stop`
/// then finds the `Uhost` still referenced, logs "still referenced after
/// stop" and skips `Uhost::close()`; the core is only torn down later by
/// `Drop`. Fails within a few cycles on most runs.
#[test]
fn primary_stop_releases_the_export_backend() {
    let s = Solo::new(32 * MIB, &[]);
    for round in 0..32u64 {
        if round > 0 {
            s.primary();
        }
        cycle_with_clients(&s, round);
    }
    let log = s.node.log_text();
    assert_eq!(log.matches("NBD export at").count(), 32, "{log}");
    assert!(
        !log.contains("still referenced"),
        "the export's backend outlived Primary::stop (Uhost::close skipped):\n{}",
        log.lines()
            .filter(|l| l.contains("still referenced") || l.contains("stopped"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn two_resources_have_separate_exports_data_and_counters() {
    let tmp = tempfile::Builder::new()
        .prefix("hastdp2")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let d = dir.display();
    let mut conf_text =
        format!(
            "on solo {{\n\tcontrol uds://{d}/solo.ctl\n\tpidfile {d}/solo.pid\n\tlisten tcp4://127.0.0.1:{}\n}}\n",
            hast_tests::free_port("127.0.0.1")
        );
    for r in ["r0", "r1"] {
        hast_tests::sparse_file(&dir.join(format!("{r}.img")), 32 * MIB);
        conf_text.push_str(&format!(
            "resource {r} {{\n\ton solo {{\n\t\tlocal {d}/{r}.img\n\t\tremote none\n\t\tnbd {d}/{r}.nbd\n\t}}\n}}\n"
        ));
    }
    let conf = dir.join("hast.conf");
    fs::write(&conf, conf_text).unwrap();
    let mut node = hast_tests::Node::new(dir, &conf, "solo");
    ok(&node.hastctl("create", &["r0", "r1"]), "create");
    node.start();
    ok(
        &node.hastctl("role", &["primary", "all"]),
        "role primary all",
    );
    let sock = |r: &str| dir.join(format!("{r}.nbd"));
    assert!(wait_for(Duration::from_secs(10), || {
        sock("r0").exists() && sock("r1").exists()
    }));

    // Each export knows only its own name.
    let mut c0 = RawNbd::start(&sock("r0")).unwrap();
    assert_eq!(c0.go("r1").unwrap(), Err(w::REP_ERR_UNKNOWN));
    c0.go("r0").unwrap().expect("GO r0");
    let mut c1 = RawNbd::start(&sock("r1")).unwrap();
    c1.go("r1").unwrap().expect("GO r1");
    let d0 = stamped(MIB, 8192, 10);
    let d1 = stamped(MIB, 8192, 11);
    assert_eq!(c0.write(1, MIB, &d0).unwrap(), 0);
    assert_eq!(c1.write(1, MIB, &d1).unwrap(), 0);
    assert_eq!(c1.write(2, 5 * MIB, &d1).unwrap(), 0);
    assert!(c0.read(3, MIB, 8192).unwrap().unwrap() == d0);
    assert!(c1.read(3, MIB, 8192).unwrap().unwrap() == d1);

    let list = |r: &str| {
        let l = node.hastctl("list", &[r]);
        assert_eq!(l.code, 0, "{}", l.stderr);
        l.stdout
    };
    let (l0, l1) = (list("r0"), list("r1"));
    assert_eq!(list_number(&l0, "writes"), Some(1), "{l0}");
    assert_eq!(list_number(&l0, "reads"), Some(1), "{l0}");
    assert_eq!(list_number(&l0, "dirty"), Some(2 * MIB), "{l0}");
    assert_eq!(list_number(&l1, "writes"), Some(2), "{l1}");
    assert_eq!(list_number(&l1, "dirty"), Some(4 * MIB), "{l1}");
    let img = |r: &str| fs::read(dir.join(format!("{r}.img"))).unwrap();
    let a = 4608 + MIB as usize;
    assert!(img("r0")[a..a + 8192] == d0[..]);
    assert!(img("r1")[a..a + 8192] == d1[..]);
    let b = 4608 + 5 * MIB as usize;
    assert!(img("r0")[b..b + 8192].iter().all(|&x| x == 0));

    // r0 leaves primary; r1's client is not disturbed.
    ok(&node.hastctl("role", &["init", "r0"]), "role init r0");
    assert!(c0.closed_by_server());
    assert!(!sock("r0").exists());
    assert!(sock("r1").exists());
    assert_eq!(c1.write(4, 9 * MIB, &d1).unwrap(), 0);
    assert!(c1.read(5, 9 * MIB, 8192).unwrap().unwrap() == d1);
    let l1 = list("r1");
    assert_eq!(list_number(&l1, "writes"), Some(3), "{l1}");
    drop(c1);
    let _ = node.stop();
}

/// Make `s` init, then hold its NBD socket path with a live listener of our
/// own and ask for primary again: the export cannot start.
fn primary_with_socket_taken(s: &Solo) -> (Run, std::os::unix::net::UnixListener) {
    ok(&s.node.hastctl("role", &["init", "r0"]), "role init");
    assert!(s.dump().contains("    prevrole: init\n"));
    let squatter = std::os::unix::net::UnixListener::bind(&s.socket).unwrap();
    (s.node.hastctl("role", &["primary", "r0"]), squatter)
}

#[test]
fn role_primary_refuses_a_socket_another_server_listens_on() {
    let s = Solo::new(32 * MIB, &[]);
    let before = s.image();
    let (r, squatter) = primary_with_socket_taken(&s);
    assert_eq!(r.code, 71, "{r:?}");
    assert!(
        r.stderr.contains(&s.socket.display().to_string()),
        "{}",
        r.stderr
    );
    let st = s.node.hastctl("status", &["r0"]);
    assert!(st.stdout.contains("r0\t-        init"), "{}", st.stdout);
    // The other server's socket is left alone and still reaches it.
    squatter.set_nonblocking(true).unwrap();
    let _c = std::os::unix::net::UnixStream::connect(&s.socket).unwrap();
    assert!(squatter.accept().is_ok(), "our listener lost its socket");
    // Nothing but (at most) the metadata block changed.
    let after = s.image();
    assert!(after[4096..] == before[4096..], "data or map changed");
    // Once the socket is free, primary works.
    drop(squatter);
    fs::remove_file(&s.socket).unwrap();
    s.primary();
}

/// Product bug (engine/resource.rs, `Resource::activate`): `prevrole` is
/// written to the metadata before the data path starts, and not put back
/// when `Primary::start` fails, so a resource that never became primary
/// (it is in init, `hastctl status` says so) reads `prevrole: primary` in
/// `hastctl dump` and after a restart.
#[test]
fn failed_role_primary_does_not_record_prevrole_primary() {
    let s = Solo::new(32 * MIB, &[]);
    let (r, _squatter) = primary_with_socket_taken(&s);
    assert_eq!(r.code, 71, "{r:?}");
    let d = s.dump();
    assert!(
        d.contains("    prevrole: init\n"),
        "role is init but the metadata says otherwise:\n{d}"
    );
}

#[test]
fn sighup_keeps_an_unchanged_export_and_moves_a_changed_one() {
    let s = Solo::new(32 * MIB, &[]);
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    let d = stamped(0, 4096, 1);
    assert_eq!(c.write(1, 0, &d).unwrap(), 0);

    // Same configuration: the client keeps its connection.
    let roles_before = s.node.log_text().matches("role changed").count();
    s.node.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(30), || s
        .node
        .log_text()
        .contains("configuration reloaded successfully")));
    assert_eq!(
        s.node.log_text().matches("role changed").count(),
        roles_before,
        "an unchanged resource was restarted"
    );
    assert_eq!(c.write(2, 4096, &d).unwrap(), 0, "write after SIGHUP");
    assert!(c.read(3, 0, 4096).unwrap().unwrap() == d);
    let l = s.list();
    assert_eq!(list_number(&l, "writes"), Some(2), "{l}");

    // The `nbd` address changes: the export moves; the data stays.
    let moved = s.dir.join("moved.nbd");
    let text = fs::read_to_string(&s.conf).unwrap().replace(
        &format!("nbd {}", s.socket.display()),
        &format!("nbd {}", moved.display()),
    );
    fs::write(&s.conf, text).unwrap();
    s.node.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&moved).is_ok()
        }),
        "export did not move:\n{}",
        s.node.log_text()
    );
    assert!(wait_for(Duration::from_secs(30), || !s.socket.exists()));
    assert!(c.closed_by_server(), "old client kept on the old export");
    let mut c = RawNbd::start(&moved).unwrap();
    c.go("r0").unwrap().expect("GO on the moved export");
    assert!(c.read(4, 0, 4096).unwrap().unwrap() == d);
    assert!(c.read(5, 4096, 4096).unwrap().unwrap() == d);
    let st = s.node.hastctl("status", &["r0"]);
    assert!(st.stdout.contains("r0\tdegraded primary"), "{}", st.stdout);
}

#[test]
fn a_secondary_exports_nothing() {
    let s = Solo::new(32 * MIB, &[]);
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    // primary -> secondary: the export and its clients go.
    ok(
        &s.node.hastctl("role", &["secondary", "r0"]),
        "role secondary",
    );
    assert!(c.closed_by_server(), "client kept by a secondary");
    assert!(!s.socket.exists(), "a secondary left the NBD socket");
    assert!(std::os::unix::net::UnixStream::connect(&s.socket).is_err());
    // init -> secondary: none appears.
    ok(&s.node.hastctl("role", &["init", "r0"]), "role init");
    ok(
        &s.node.hastctl("role", &["secondary", "r0"]),
        "role secondary",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!s.socket.exists(), "a secondary created the NBD socket");
    let st = s.node.hastctl("status", &["r0"]);
    assert!(st.stdout.contains("secondary"), "{}", st.stdout);
}

#[test]
fn disc_after_writes_answers_them_all_before_closing() {
    let s = Solo::new(32 * MIB, &[]);
    let (localoff, _, _) = s.geometry();
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    // FUA makes each write slow enough to be outstanding at the DISC.
    let n = 64u64;
    for i in 0..n {
        let off = i * 64 * 1024;
        c.request(
            w::FLAG_FUA,
            w::CMD_WRITE,
            i,
            off,
            65536,
            &stamped(off, 65536, 8),
        )
        .unwrap();
    }
    c.request(0, w::CMD_DISC, n, 0, 0, &[]).unwrap();
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let (e, cookie) = c.reply().expect("a reply for every write sent before DISC");
        assert_eq!(e, 0, "write {cookie}");
        assert!(cookie < n && seen.insert(cookie), "cookie {cookie}");
    }
    assert!(c.closed_by_server(), "connection open after DISC");
    let img = s.image();
    for i in 0..n {
        let off = i * 64 * 1024;
        let a = (localoff + off) as usize;
        assert!(img[a..a + 65536] == stamped(off, 65536, 8)[..], "write {i}");
    }
}

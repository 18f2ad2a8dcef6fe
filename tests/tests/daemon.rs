//! hastd and hastctl as a user runs them: two nodes from one configuration
//! on one machine, role changes, status and list output, hooks, SIGHUP, and
//! bad input that must be refused without harm.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hast_tests::{hook_script, sparse_file, wait_for, Node};

const GIB: u64 = 1 << 30;

/// A two-node configuration (`alpha`, `beta`) for resources `names`, with
/// the hook logging to `dir/hooks.log`.
fn config_text(dir: &Path, names: &[&str]) -> String {
    let d = dir.display();
    let (pa, pb) = ports(dir);
    let mut s = format!(
        "# two nodes on one machine\n\
         exec {d}/hook.sh\n\
         on alpha {{\n\tcontrol uds://{d}/alpha.ctl\n\tpidfile {d}/alpha.pid\n\tlisten tcp4://127.0.0.1:{pa}\n}}\n\
         on beta {{\n\tcontrol uds://{d}/beta.ctl\n\tpidfile {d}/beta.pid\n\tlisten tcp4://127.0.0.2:{pb}\n}}\n"
    );
    for n in names {
        s.push_str(&format!(
            "resource {n} {{\n\
             \ton alpha {{\n\t\tlocal {d}/alpha-{n}.img\n\t\tremote tcp4://127.0.0.2\n\t\tnbd {d}/alpha-{n}.nbd\n\t}}\n\
             \ton beta {{\n\t\tlocal {d}/beta-{n}.img\n\t\tremote tcp4://127.0.0.1\n\t\tnbd {d}/beta-{n}.nbd\n\t}}\n}}\n"
        ));
    }
    s
}

/// The replication ports of the two nodes of the test in `dir`: chosen once
/// and kept in the directory, so every rewrite of the configuration keeps
/// them.
fn ports(dir: &Path) -> (u16, u16) {
    let f = dir.join("ports");
    if let Ok(t) = fs::read_to_string(&f) {
        let mut it = t.split_whitespace().filter_map(|p| p.parse().ok());
        if let (Some(a), Some(b)) = (it.next(), it.next()) {
            return (a, b);
        }
    }
    let (a, b) = (
        hast_tests::free_port("127.0.0.1"),
        hast_tests::free_port("127.0.0.2"),
    );
    fs::write(&f, format!("{a} {b}")).unwrap();
    (a, b)
}

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    conf: PathBuf,
    hooks: PathBuf,
}

fn setup(names: &[&str], size: u64) -> Setup {
    let tmp = tempfile::Builder::new().prefix("hast").tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let hooks = dir.join("hooks.log");
    hook_script(&dir, &hooks);
    for n in names {
        sparse_file(&dir.join(format!("alpha-{n}.img")), size);
        sparse_file(&dir.join(format!("beta-{n}.img")), size);
    }
    let conf = dir.join("hast.conf");
    fs::write(&conf, config_text(&dir, names)).unwrap();
    Setup {
        _tmp: tmp,
        dir,
        conf,
        hooks,
    }
}

fn hook_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wait_hook(path: &Path, line: &str) {
    let ok = wait_for(Duration::from_secs(30), || {
        hook_lines(path).iter().any(|l| l == line)
    });
    assert!(
        ok,
        "hook line {line:?} not seen; got {:?}",
        hook_lines(path)
    );
}

/// The whole content of a (small) provider file, to compare before/after.
fn sha(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

#[test]
fn create_with_defaults_on_1gib_and_dump() {
    let s = setup(&["r0"], GIB);
    let alpha = Node::new(&s.dir, &s.conf, "alpha");
    let r = alpha.hastctl("create", &["r0"]);
    assert_eq!(r.code, 0, "create failed: {}", r.stderr);
    let r = alpha.hastctl("dump", &["r0"]);
    assert_eq!(r.code, 0, "dump failed: {}", r.stderr);
    assert_eq!(
        r.stdout,
        "resource: r0\n\
         \x20   datasize: 1073737216 (1.0GB)\n\
         \x20   extentsize: 2097152 (2.0MB)\n\
         \x20   keepdirty: 64\n\
         \x20   localoff: 4608\n\
         \x20   resuid: 0\n\
         \x20   localcnt: 0\n\
         \x20   remotecnt: 0\n\
         \x20   prevrole: init\n"
    );
    // The map area (512 bytes after the metadata) is zero.
    let img = fs::read(s.dir.join("alpha-r0.img")).unwrap();
    assert!(img[4096..4608].iter().all(|&b| b == 0));
    // `dump` with no name and with `all` prints every resource.
    assert_eq!(alpha.hastctl("dump", &[]).stdout, r.stdout);
    assert_eq!(alpha.hastctl("dump", &["all"]).stdout, r.stdout);
}

#[test]
fn create_options_and_their_checks() {
    let s = setup(&["r0"], 64 << 20);
    let alpha = Node::new(&s.dir, &s.conf, "alpha");
    let img = s.dir.join("alpha-r0.img");
    let r = alpha.hastctl("create", &["-e", "1M", "-k", "16", "-m", "32M", "r0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = alpha.hastctl("dump", &["r0"]).stdout;
    assert!(d.contains("    extentsize: 1048576 (1.0MB)\n"), "{d}");
    assert!(d.contains("    keepdirty: 16\n"), "{d}");
    // 32M - 4096 needs 32 extents -> 8 bytes of map, one 512-byte sector.
    assert!(d.contains("    localoff: 4608\n"), "{d}");
    assert!(
        d.contains(&format!("    datasize: {} ", (32u64 << 20) - 4608)),
        "{d}"
    );

    let before = sha(&img);
    for (args, what) in [
        (vec!["-e", "4608", "r0"], "power of 2"),
        (vec!["-e", "3000", "r0"], "multiple of sector size"),
        (vec!["-e", "256", "r0"], "sector size"),
        (vec!["-m", "1G", "r0"], "larger"),
    ] {
        let a = args.clone();
        let r = alpha.hastctl("create", &a);
        assert_eq!(r.code, 65, "create {a:?} should fail with 65: {}", r.stderr);
        assert!(
            r.stderr.to_lowercase().contains(what),
            "create {a:?}: message {:?} should mention {what:?}",
            r.stderr
        );
    }
    let r = alpha.hastctl("create", &["-e", "banana", "r0"]);
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert_eq!(sha(&img), before, "a refused create changed the provider");

    // A provider too small for metadata, map and one extent.
    sparse_file(&img, 4096 + 512);
    let r = alpha.hastctl("create", &["r0"]);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert_eq!(fs::read(&img).unwrap(), vec![0u8; 4608]);

    // Unknown resource and a missing provider.
    let r = alpha.hastctl("create", &["nosuch"]);
    assert_eq!(r.code, 65);
    assert!(r.stderr.contains("nosuch"), "{}", r.stderr);
    fs::remove_file(&img).unwrap();
    let r = alpha.hastctl("create", &["r0"]);
    assert_eq!(r.code, 66, "{}", r.stderr);
    assert!(r.stderr.contains("alpha-r0.img"), "{}", r.stderr);
    assert!(!img.exists(), "create must not create a missing provider");
    // dump exits 255 when the provider cannot be opened or holds no valid
    // metadata, as FreeBSD's (dump_one returns metadata_read's -1).
    let r = alpha.hastctl("dump", &["r0"]);
    assert_eq!(r.code, 255, "{}", r.stderr);
    assert!(r.stderr.contains("alpha-r0.img"), "{}", r.stderr);
    sparse_file(&img, 1 << 20);
    let r = alpha.hastctl("dump", &["r0"]);
    assert_eq!(r.code, 255, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let r = alpha.hastctl("dump", &["nosuch"]);
    assert_eq!(r.code, 65, "{}", r.stderr);
}

fn expected_list(
    name: &str,
    role: &str,
    local: &Path,
    remote: &str,
    pid: i32,
    active: bool,
) -> String {
    let mut s = format!(
        "{name}:\n  role: {role}\n  provname: {name}\n  localpath: {}\n",
        local.display()
    );
    if active && role == "primary" {
        s.push_str("  extentsize: 2097152 (2.0MB)\n  keepdirty: 64\n");
    } else {
        s.push_str("  extentsize: 0 (0B)\n  keepdirty: 0\n");
    }
    s.push_str(&format!("  remoteaddr: {remote}\n  replication: memsync\n"));
    if active && role == "primary" {
        s.push_str("  status: degraded\n");
    }
    // A FreeBSD secondary has a worker process only while a primary is
    // connected; without one it prints no workerpid line (none here is).
    if active && role == "primary" {
        s.push_str(&format!("  workerpid: {pid}\n"));
    }
    s.push_str(
        "  dirty: 0 (0B)\n  statistics:\n    reads: 0\n    writes: 0\n    deletes: 0\n    flushes: 0\n    activemap updates: 0\n    local errors: read: 0, write: 0, delete: 0, flush: 0\n    queues: local: 0, send: 0, recv: 0, done: 0, idle: 0\n",
    );
    s
}

#[test]
fn two_nodes_roles_status_list_hooks_and_clean_exit() {
    let s = setup(&["r0"], 64 << 20);
    let mut alpha = Node::new(&s.dir, &s.conf, "alpha");
    let mut beta = Node::new(&s.dir, &s.conf, "beta");
    assert_eq!(alpha.hastctl("create", &["r0"]).code, 0);
    assert_eq!(beta.hastctl("create", &["r0"]).code, 0);
    alpha.start();
    beta.start();

    // Both start in init.
    let st = alpha.hastctl("status", &[]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    let a_img = s.dir.join("alpha-r0.img");
    let b_img = s.dir.join("beta-r0.img");
    assert_eq!(
        st.stdout,
        format!(
            "Name\tStatus\t Role\t\tComponents\nr0\t-        init           {}\ttcp4://127.0.0.2\n",
            a_img.display()
        )
    );

    let r = alpha.hastctl("role", &["primary", "r0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = beta.hastctl("role", &["secondary", "all"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    wait_hook(&s.hooks, "role r0 init primary");
    wait_hook(&s.hooks, "role r0 init secondary");

    let st = alpha.hastctl("status", &["r0"]);
    assert_eq!(
        st.stdout,
        format!(
            "Name\tStatus\t Role\t\tComponents\nr0\tdegraded primary        {}\ttcp4://127.0.0.2\n",
            a_img.display()
        )
    );
    let st = beta.hastctl("status", &["all"]);
    assert_eq!(
        st.stdout,
        format!(
            "Name\tStatus\t Role\t\tComponents\nr0\t-        secondary      {}\ttcp4://127.0.0.1\n",
            b_img.display()
        )
    );
    let l = alpha.hastctl("list", &[]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    assert_eq!(
        l.stdout,
        expected_list(
            "r0",
            "primary",
            &a_img,
            "tcp4://127.0.0.2",
            alpha.pid().unwrap(),
            true
        )
    );
    let l = beta.hastctl("list", &["r0"]);
    assert_eq!(
        l.stdout,
        expected_list(
            "r0",
            "secondary",
            &b_img,
            "tcp4://127.0.0.1",
            beta.pid().unwrap(),
            true
        )
    );

    // The role is persisted as prevrole.
    assert!(alpha
        .hastctl("dump", &["r0"])
        .stdout
        .contains("    prevrole: primary\n"));
    assert!(beta
        .hastctl("dump", &["r0"])
        .stdout
        .contains("    prevrole: secondary\n"));

    // Setting the same role again changes nothing and runs no hook.
    let n = hook_lines(&s.hooks).len();
    assert_eq!(alpha.hastctl("role", &["primary", "r0"]).code, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hook_lines(&s.hooks).len(), n);

    // Back to init: the hook has old and new role; prevrole is init.
    assert_eq!(alpha.hastctl("role", &["init", "r0"]).code, 0);
    wait_hook(&s.hooks, "role r0 primary init");
    assert!(alpha
        .hastctl("dump", &["r0"])
        .stdout
        .contains("    prevrole: init\n"));
    assert_eq!(
        alpha.hastctl("list", &["r0"]).stdout,
        expected_list("r0", "init", &a_img, "tcp4://127.0.0.2", 0, false)
    );

    // SIGTERM: clean exit, pidfile and socket removed.
    let st = alpha.stop().expect("alpha exits on SIGTERM");
    assert!(st.success(), "alpha exit status {st:?}");
    assert!(!alpha.pidfile.exists());
    assert!(!alpha.control.exists());
    let r = alpha.hastctl("status", &[]);
    assert_eq!(r.code, 71, "{}", r.stderr);
    let st = beta.stop().expect("beta exits on SIGTERM");
    assert!(st.success());
}

#[test]
fn sighup_adds_removes_and_restarts_resources() {
    let s = setup(&["r0", "r1", "r2"], 32 << 20);
    let mut alpha = Node::new(&s.dir, &s.conf, "alpha");
    for r in ["r0", "r1", "r2"] {
        assert_eq!(alpha.hastctl("create", &[r]).code, 0);
    }
    fs::write(&s.conf, config_text(&s.dir, &["r0", "r1"])).unwrap();
    alpha.start();
    assert_eq!(alpha.hastctl("role", &["primary", "r0", "r1"]).code, 0);
    wait_hook(&s.hooks, "role r0 init primary");
    wait_hook(&s.hooks, "role r1 init primary");

    // r0 removed, r2 added; r1 keeps its role.
    fs::write(&s.conf, config_text(&s.dir, &["r1", "r2"])).unwrap();
    alpha.signal(libc::SIGHUP);
    wait_hook(&s.hooks, "role r0 primary init");
    let ok = wait_for(Duration::from_secs(30), || {
        alpha.hastctl("status", &[]).stdout.contains("r2\t")
    });
    assert!(ok, "r2 not added: {}", alpha.log_text());
    let st = alpha.hastctl("status", &[]).stdout;
    let lines: Vec<&str> = st.lines().collect();
    assert_eq!(lines.len(), 3, "{st}");
    assert!(lines[1].starts_with("r1\tdegraded primary"), "{st}");
    assert!(lines[2].starts_with("r2\t-        init"), "{st}");
    let r = alpha.hastctl("role", &["primary", "r0"]);
    assert_eq!(r.code, 1, "r0 is gone: {}", r.stderr);
    assert!(r.stderr.contains("[r0] Received error 1"), "{}", r.stderr);

    // Changing r1's local path restarts it: init, then primary again.
    let text = config_text(&s.dir, &["r1", "r2"]).replace(
        &format!("{}/alpha-r1.img", s.dir.display()),
        &format!("{}/alpha-r2.img", s.dir.display()),
    );
    // r2 now also points to alpha-r2.img from the r1 resource: its metadata
    // names r2, so r1 cannot become primary on it and must end in init.
    fs::write(&s.conf, &text).unwrap();
    alpha.signal(libc::SIGHUP);
    wait_hook(&s.hooks, "role r1 primary init");
    let st = alpha.hastctl("status", &["r1"]).stdout;
    assert!(
        st.contains("r1\t-        init"),
        "{st}\n{}",
        alpha.log_text()
    );

    // A broken configuration is not applied; the daemon keeps running.
    // (hastctl reads the file too, so the good text is put back before
    // asking; the daemon must not have re-read it in between.)
    fs::write(&s.conf, "resource {\n").unwrap();
    alpha.signal(libc::SIGHUP);
    let ok = wait_for(Duration::from_secs(30), || {
        alpha.log_text().contains("not reloaded")
    });
    assert!(ok, "{}", alpha.log_text());
    fs::write(&s.conf, config_text(&s.dir, &["r0"])).unwrap();
    assert!(alpha.running());
    let st = alpha.hastctl("status", &[]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert!(st.stdout.contains("r2\t"), "{}", st.stdout);
    assert!(!st.stdout.contains("r0\t"), "{}", st.stdout);
}

#[test]
fn role_errors_leave_the_daemon_up_and_the_disk_alone() {
    let s = setup(&["r0", "r1"], 32 << 20);
    let mut alpha = Node::new(&s.dir, &s.conf, "alpha");
    assert_eq!(alpha.hastctl("create", &["r0"]).code, 0);
    // r1 has a provider without metadata; r0's provider will vanish.
    alpha.start();
    let r1_img = s.dir.join("alpha-r1.img");
    let before = sha(&r1_img);
    let r = alpha.hastctl("role", &["primary", "r1"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("[r1] Received error"), "{}", r.stderr);
    assert_eq!(
        sha(&r1_img),
        before,
        "a failed role change wrote to the provider"
    );
    assert!(alpha
        .hastctl("status", &["r1"])
        .stdout
        .contains("r1\t-        init"));

    fs::rename(s.dir.join("alpha-r0.img"), s.dir.join("moved.img")).unwrap();
    let r = alpha.hastctl("role", &["primary", "r0"]);
    assert_eq!(r.code, 66, "{}", r.stderr);
    assert!(r.stderr.contains("alpha-r0.img"), "{}", r.stderr);

    let r = alpha.hastctl("role", &["primary", "nosuch"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let r = alpha.hastctl("list", &["nosuch"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "nosuch:\n  error: 1\n");
    let r = alpha.hastctl("role", &["master", "r0"]);
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(alpha.running());
    assert_eq!(alpha.hastctl("status", &[]).code, 0);
}

#[test]
fn second_daemon_on_the_same_pidfile_exits_75() {
    let s = setup(&["r0"], 32 << 20);
    let mut alpha = Node::new(&s.dir, &s.conf, "alpha");
    alpha.start();
    let pid = alpha.pid().unwrap();
    // Same pidfile, different control socket: refused because of the pidfile.
    let mut second = alpha.spawn_hastd(&["-P", alpha.pidfile.to_str().unwrap()]);
    let st = second.wait().unwrap();
    assert_eq!(
        st.code(),
        Some(75),
        "second hastd: {st:?}; log:\n{}",
        alpha.log_text()
    );
    assert!(
        alpha.log_text().contains(&format!("pid {pid}")),
        "{}",
        alpha.log_text()
    );
    assert_eq!(
        fs::read_to_string(&alpha.pidfile).unwrap(),
        format!("{pid}\n")
    );
    assert!(alpha.running());
    assert_eq!(alpha.hastctl("status", &[]).code, 0);
}

#[test]
fn bad_configurations_are_refused_with_file_line_and_exit_code() {
    let s = setup(&["r0"], 32 << 20);
    let alpha = Node::new(&s.dir, &s.conf, "alpha");
    let bad = s.dir.join("bad.conf");
    fs::write(
        &bad,
        "resource r0 {\n\ton alpha {\n\t\tlocal /x\n\t\tremote\n\t}\n}\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(hast_tests::bin("hastd"))
        .args(["-F", "-c"])
        .arg(&bad)
        .args(["--node", "alpha"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let st = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(st.code(), Some(78), "{err}");
    assert!(err.contains(&format!("{}:5", bad.display())), "{err}");

    let r = std::process::Command::new(hast_tests::bin("hastctl"))
        .args(["status", "-c"])
        .arg(s.dir.join("missing.conf"))
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(72));
    assert!(String::from_utf8_lossy(&r.stderr).contains("missing.conf"));

    // A resource with no `on` block for this node.
    let r = std::process::Command::new(hast_tests::bin("hastctl"))
        .args(["status", "-c"])
        .arg(&s.conf)
        .args(["--node", "gamma"])
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let _ = alpha;
}

fn raw_exchange(path: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn garbage_and_oversized_control_frames_are_dropped() {
    let s = setup(&["r0"], 32 << 20);
    let mut alpha = Node::new(&s.dir, &s.conf, "alpha");
    assert_eq!(alpha.hastctl("create", &["r0"]).code, 0);
    alpha.start();
    assert_eq!(alpha.hastctl("role", &["primary", "r0"]).code, 0);
    let img = s.dir.join("alpha-r0.img");
    let before = sha(&img);

    // Random garbage, a wrong version, an absurd size, a truncated frame.
    assert!(raw_exchange(&alpha.control, b"GET / HTTP/1.0\r\n\r\n").is_empty());
    assert!(raw_exchange(&alpha.control, &[7, 4, 0, 0, 0, 1, 2, 3, 4]).is_empty());
    assert!(raw_exchange(&alpha.control, &[2, 0xff, 0xff, 0xff, 0xff]).is_empty());
    assert!(raw_exchange(&alpha.control, &[2, 64, 0, 0, 0, 2, 4]).is_empty());
    // A well-formed frame whose nv element has a bad type.
    let mut bad_nv = vec![2u8, 16, 0, 0, 0];
    bad_nv.extend_from_slice(&[99, 4, 1, 0, 0, 0, b'c', b'm', b'd', 0, 0, 0, 0, 0, 1, 0]);
    assert!(raw_exchange(&alpha.control, &bad_nv).is_empty());
    // A valid nv without `cmd` is closed unanswered (as the reference does).
    let mut nv = hast::nv::Nv::new();
    nv.add_string("resource0", "all");
    let frame = hast::proto::encode_frame(&nv, &[]).unwrap();
    assert!(raw_exchange(&alpha.control, &frame).is_empty());
    // An unknown command is answered with error 4, a missing resource0 with 2.
    let mut nv = hast::nv::Nv::new();
    nv.add_u8("cmd", 9).add_string("resource0", "all");
    let reply = raw_exchange(
        &alpha.control,
        &hast::proto::encode_frame(&nv, &[]).unwrap(),
    );
    let (rnv, _) =
        hast::proto::read_frame(&mut &reply[..], hast::proto::Limits::HEADERS_ONLY).unwrap();
    assert_eq!(rnv.get_i16("error"), Some(4));
    let mut nv = hast::nv::Nv::new();
    nv.add_u8("cmd", 1).add_u8("role", 2);
    let reply = raw_exchange(
        &alpha.control,
        &hast::proto::encode_frame(&nv, &[]).unwrap(),
    );
    let (rnv, _) =
        hast::proto::read_frame(&mut &reply[..], hast::proto::Limits::HEADERS_ONLY).unwrap();
    assert_eq!(rnv.get_i16("error"), Some(2));
    // A role number that is no role.
    let mut nv = hast::nv::Nv::new();
    nv.add_u8("cmd", 1)
        .add_u8("role", 7)
        .add_string("resource0", "r0");
    let reply = raw_exchange(
        &alpha.control,
        &hast::proto::encode_frame(&nv, &[]).unwrap(),
    );
    let (rnv, _) =
        hast::proto::read_frame(&mut &reply[..], hast::proto::Limits::HEADERS_ONLY).unwrap();
    assert_eq!(rnv.get_i16("error"), Some(2));

    // A client that connects and sends nothing does not block others.
    let _idle = UnixStream::connect(&alpha.control).unwrap();
    let st = alpha.hastctl("status", &[]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert!(st.stdout.contains("r0\tdegraded primary"), "{}", st.stdout);
    assert!(alpha.running());
    // The daemon's own metadata write happened at role change; nothing since.
    assert_eq!(sha(&img), before);
    // Logged once the connection is gone, maybe after the replies above.
    assert!(
        wait_for(Duration::from_secs(10), || alpha
            .log_text()
            .contains("unable to receive control header")),
        "{}",
        alpha.log_text()
    );
}

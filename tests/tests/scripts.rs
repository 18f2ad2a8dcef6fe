//! rc.d/hast-failover run on Linux against two real hastd nodes: the parts
//! that do not need FreeBSD (roles, the wait for the device, locking,
//! logging, exit statuses) with `fstype=none` and the primary's NBD socket
//! standing in for /dev/hast/NAME. The file system steps (fsck, mount,
//! zpool) need FreeBSD and run in tests/bhyve/ instead.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use hast_tests::cluster::{Cluster, Mode};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

/// The directory holding hastctl, found as the harness finds it.
fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HAST_BIN") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap();
    let parent = exe.parent().unwrap().to_path_buf();
    if parent.ends_with("deps") {
        parent.parent().unwrap().to_path_buf()
    } else {
        parent
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rc.d/hast-failover")
}

/// A hast-failover.conf for `node` of cluster `c`, resource r0, no file
/// system, the node's NBD socket as the device.
fn write_conf(c: &Cluster, node: &str, device_timeout: u32) -> PathBuf {
    let path = c.dir().join(format!("failover-{node}.conf"));
    let text = format!(
        "resources=\"r0\"\n\
         fstype=none\n\
         device_r0=\"{dev}\"\n\
         hastctl=\"{hastctl}\"\n\
         hastctl_flags=\"-c {conf} --node {node}\"\n\
         device_timeout={device_timeout}\n\
         lock_file=\"{dir}/failover-{node}.lock\"\n\
         lock_timeout=5\n",
        dev = c.nbd_socket(node, "r0").unwrap().display(),
        hastctl = bin_dir().join("hastctl").display(),
        conf = c.conf().display(),
        dir = c.dir().display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn failover(conf: &Path, args: &[&str]) -> Output {
    Command::new("sh")
        .arg(script())
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("run sh rc.d/hast-failover")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn role(c: &Cluster, node: &str) -> String {
    c.list_res(node, "r0").unwrap().role
}

fn cluster() -> Cluster {
    let mut c = Cluster::builder(Mode::Loopback)
        .resource("r0", 16 * MIB)
        .timeout(5)
        .build()
        .expect("build the cluster");
    c.start_all().unwrap();
    c
}

#[test]
fn promote_then_demote_moves_the_roles_and_logs_each_step() {
    let c = cluster();
    c.role("beta", "r0", "secondary").unwrap();
    let conf = write_conf(&c, "alpha", 10);

    let o = failover(&conf, &["promote"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert_eq!(role(&c, "alpha"), "primary", "{t}");
    for line in [
        "[r0] promote: asking hastd for role primary",
        "[r0] hastctl role primary: ok",
        "is present",
        "[r0] promoted",
    ] {
        assert!(t.contains(line), "missing {line:?} in\n{t}");
    }
    c.wait_list("alpha", "r0", T, |s| {
        s.status.as_deref() == Some("complete")
    })
    .unwrap();

    let o = failover(&conf, &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "r0: role primary, -\n");

    let o = failover(&conf, &["demote", "r0"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert_eq!(role(&c, "alpha"), "secondary", "{t}");
    assert!(t.contains("[r0] hastctl role secondary: ok"), "{t}");
    assert!(t.contains("[r0] demoted"), "{t}");
}

#[test]
fn a_failed_promotion_exits_non_zero_and_says_so() {
    let c = cluster();
    let conf = write_conf(&c, "alpha", 10);
    // The local provider is gone: hastd refuses the role (66).
    std::fs::remove_file(c.provider_path("alpha", "r0").unwrap()).unwrap();
    let o = failover(&conf, &["promote"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("hastctl role primary: failed with status 66"),
        "{t}"
    );
    assert!(
        t.contains("promotion refused or failed; nothing mounted"),
        "{t}"
    );
    assert!(!t.contains("[r0] promoted"), "{t}");
    assert_ne!(role(&c, "alpha"), "primary");
}

#[test]
fn promotion_gives_up_when_the_device_never_appears() {
    let c = cluster();
    let conf = c.dir().join("failover-nodev.conf");
    let base = std::fs::read_to_string(write_conf(&c, "alpha", 2)).unwrap();
    let missing = c.dir().join("no-such-device");
    std::fs::write(
        &conf,
        format!("{base}device_r0=\"{}\"\n", missing.display()),
    )
    .unwrap();
    let o = failover(&conf, &["promote"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("did not appear in 2s"), "{t}");
    assert_eq!(role(&c, "alpha"), "primary", "{t}");
}

#[test]
fn a_second_run_waits_for_the_lock_and_gives_up_with_75() {
    let c = cluster();
    let conf = write_conf(&c, "alpha", 10);
    let lock = c.dir().join("failover-alpha.lock");
    // In its own process group, so that killing it ends `sleep` too.
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["sleep", "60"])
        .process_group(0)
        .spawn()
        .expect("run flock");
    // Only once the holder has the lock (a non-blocking try fails).
    let held = hast_tests::wait_for(Duration::from_secs(30), || {
        Command::new("flock")
            .args(["-n"])
            .arg(&lock)
            .arg("true")
            .status()
            .is_ok_and(|s| !s.success())
    });
    assert!(held, "flock never took {}", lock.display());
    let o = failover(&conf, &["demote"]);
    // SAFETY: kill(2) of the process group of a child we spawned.
    unsafe { libc::kill(-(holder.id() as i32), libc::SIGKILL) };
    let _ = holder.wait();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(75), "{t}");
    assert!(t.contains("another run held"), "{t}");
    assert_eq!(role(&c, "alpha"), "init", "nothing was done: {t}");
}

#[test]
fn configuration_errors_exit_78() {
    let c = cluster();
    let conf = c.dir().join("bad.conf");
    std::fs::write(&conf, "resources=\"r0\n").unwrap();
    let o = failover(&conf, &["promote"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    std::fs::write(&conf, "resources=\"r0 bad;name\"\n").unwrap();
    let o = failover(&conf, &["promote"]);
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    assert_eq!(role(&c, "alpha"), "init");
}

/// Safe promotion: a node must not be promoted while its peer is reachable
/// and primary.
#[test]
fn promotion_is_refused_while_the_peer_is_primary() {
    let c = cluster();
    c.role("alpha", "r0", "secondary").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    c.wait_list("beta", "r0", T, |s| s.status.as_deref() == Some("complete"))
        .unwrap();
    let conf = write_conf(&c, "alpha", 10);
    let o = failover(&conf, &["promote"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("promotion refused or failed; nothing mounted"),
        "{t}"
    );
    assert_ne!(role(&c, "alpha"), "primary", "{t}");
    assert_eq!(role(&c, "beta"), "primary", "{t}");
}

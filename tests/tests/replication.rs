//! Replication between two real hastd processes (network namespaces as
//! root, loopback otherwise): the seeds' failover story with the data
//! checked against the writer's reference at every step, acknowledged
//! writes surviving a kill -9 of the primary (fullsync, memsync), write
//! order in async mode, a partition healed with a resync of only what
//! changed, split-brain refused and recovered, a write error on the
//! secondary's disk repaired by the next resync, and hostile peers.

use std::time::Duration;

use hast_tests::checker::{Workload, WorkloadOptions};
use hast_tests::cluster::{Cluster, Mode};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn cluster(replication: &str, size: u64) -> Cluster {
    Cluster::builder(Mode::auto())
        .resource("r0", size)
        .replication(replication)
        .timeout(5)
        .build()
        .expect("build the cluster")
}

/// The same on the kernel host: the primaries run the geom_hast module
/// itself on the userland kernel shim.
fn kernel_cluster(replication: &str, size: u64) -> Cluster {
    Cluster::builder(Mode::auto())
        .resource("r0", size)
        .replication(replication)
        .timeout(5)
        .kernel_host(true)
        .build()
        .expect("build the cluster")
}

/// On the kernel host, `node`'s primary really ran in the module.
fn check_host(c: &Cluster, node: &str) {
    let log = c.log(node).unwrap();
    let kernel = log.contains("serving /dev/hast/r0 from the kernel module");
    assert_eq!(
        kernel,
        c.kernel_host(),
        "{node}'s primary ran on the wrong host:\n{log}"
    );
}

/// alpha primary, beta secondary, connected and in sync.
fn connected(c: &mut Cluster) {
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync())
        .unwrap_or_else(|e| {
            panic!(
                "alpha never connected in sync: {e}\n{}",
                c.log("alpha").unwrap_or_default()
            )
        });
}

/// An empty (sparse) reference image as large as the data area: the
/// writer's record of what the device must hold.
fn reference_image(c: &Cluster) -> std::path::PathBuf {
    let reference = c.dir().join("reference.img");
    std::fs::File::create(&reference)
        .unwrap()
        .set_len(c.data_area("alpha", "r0").unwrap().size)
        .unwrap();
    reference
}

/// Run `qemu-io` commands on `target` (an NBD URI or a raw image).
fn qemu_io(target: &str, cmds: &[&str]) {
    let r = hast_tests::export::qemu_io(target, cmds);
    hast_tests::export::ok(&r, &format!("qemu-io {cmds:?} on {target}"));
}

/// Write `pattern` at `offset` through `node`'s export and into `reference`.
fn qemu_write(
    c: &Cluster,
    node: &str,
    reference: &std::path::Path,
    pattern: u8,
    offset: u64,
    len: u64,
) {
    let cmd = format!("write -P {pattern} {offset} {len}");
    qemu_io(&c.nbd_uri(node, "r0").unwrap(), &[&cmd]);
    qemu_io(&reference.display().to_string(), &[&cmd]);
}

/// `qemu-img compare` of `node`'s NBD export (what clients read) with
/// `reference`.
fn export_matches(c: &Cluster, node: &str, reference: &std::path::Path) -> bool {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(c.nbd_uri(node, "r0").unwrap())
        .arg(reference)
        .output()
        .expect("run qemu-img compare");
    out.status.code() == Some(0)
}

fn same_data(c: &Cluster) {
    assert_eq!(
        c.compare_data("r0", "alpha", "beta").unwrap(),
        None,
        "the two data areas differ"
    );
}

#[test]
fn seeds_story_failover_and_back() {
    seeds_story(cluster("fullsync", 64 * MIB));
}

#[test]
fn kernel_host_seeds_story_failover_and_back() {
    seeds_story(kernel_cluster("fullsync", 64 * MIB));
}

fn seeds_story(mut c: Cluster) {
    connected(&mut c);
    check_host(&c, "alpha");
    let reference = reference_image(&c);
    qemu_write(&c, "alpha", &reference, 0x11, 0, 8 * MIB);
    qemu_write(&c, "alpha", &reference, 0x22, 40 * MIB, 3 * MIB);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();
    same_data(&c);

    // The primary dies; the secondary takes over with the data intact.
    c.kill9("alpha").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    c.wait_list("beta", "r0", T, |s| s.status.as_deref() == Some("degraded"))
        .unwrap();
    assert!(
        c.qemu_img_compare("beta", "r0", &reference).unwrap(),
        "promoted secondary lost data"
    );
    // Changes while alpha is away: 3 extents.
    qemu_write(&c, "beta", &reference, 0x33, 10 * MIB, 5 * MIB);
    let away = c.list_res("beta", "r0").unwrap();
    assert_eq!(
        away.dirty,
        6 * MIB,
        "dirty must be the extents written while alone"
    );

    // The old primary comes back as secondary: only what changed is copied.
    c.restart("alpha").unwrap();
    c.role("alpha", "r0", "secondary").unwrap();
    c.wait_list("beta", "r0", T, |s| s.in_sync()).unwrap();
    // What is copied: the 3 extents written on beta while alpha was away,
    // plus the 6 extents alpha's map still marked when it died (its
    // keepdirty extents: 0-3 and 20-21), as the reference does after a
    // crash. 18 MiB of a 64 MiB disk: proportional to what changed.
    let log = c.log("beta").unwrap();
    assert!(
        log.contains(&format!("synchronization complete: {} bytes", 9 * 2 * MIB)),
        "{log}"
    );
    same_data(&c);

    // Roles swapped back.
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    qemu_write(&c, "alpha", &reference, 0x44, 20 * MIB, MIB);
    c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    check_host(&c, "beta");
}

/// Connect a `mode` pair, run the stamped-block workload at `queue_depth`
/// against alpha, kill -9 alpha under it, and return the cluster and the
/// workload's history.
fn kill_primary_under_load(
    mode: &str,
    queue_depth: usize,
) -> (Cluster, hast_tests::checker::History) {
    kill_primary_under_load_on(cluster(mode, 32 * MIB), queue_depth)
}

fn kill_primary_under_load_on(
    mut c: Cluster,
    queue_depth: usize,
) -> (Cluster, hast_tests::checker::History) {
    connected(&mut c);
    check_host(&c, "alpha");
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    let w = Workload::new(WorkloadOptions {
        queue_depth,
        max_writes: None,
        duration: Some(Duration::from_secs(20)),
        reply_timeout: Duration::from_secs(5),
        ..WorkloadOptions::default()
    });
    let stop = w.stop_handle();
    let since = c.list_res("alpha", "r0").unwrap().stats.writes;
    let writer = std::thread::spawn(move || w.run_uri(&uri));
    // Kill once well over 100 writes were acknowledged.
    c.wait_acked(
        "alpha",
        "r0",
        since,
        100 + queue_depth as u64,
        queue_depth,
        T,
    )
    .unwrap();
    c.kill9("alpha").unwrap();
    stop.stop();
    let history = writer.join().unwrap().unwrap();
    (c, history)
}

fn acked_writes_survive_kill(mode: &str) {
    acked_writes_survive_kill_on(mode, cluster(mode, 32 * MIB));
}

fn acked_writes_survive_kill_on(mode: &str, c: Cluster) {
    let (c, history) = kill_primary_under_load_on(c, 16);
    assert!(
        history.acked() > 100,
        "too few acknowledged writes to mean anything: {}",
        history.acked()
    );
    c.role("beta", "r0", "primary").unwrap();
    let area = c.data_area("beta", "r0").unwrap();
    let report = history.verify_file(&area.path, area.offset).unwrap();
    assert!(
        report.passed(),
        "{mode}: acknowledged writes lost after failover: {report:?}"
    );
}

#[test]
fn fullsync_acknowledged_writes_survive_primary_kill() {
    acked_writes_survive_kill("fullsync");
}

#[test]
fn memsync_acknowledged_writes_survive_primary_kill() {
    acked_writes_survive_kill("memsync");
}

/// On the kernel host, a kill -9 of hastd takes the module with it, as a
/// crash of the node does.
#[test]
fn kernel_host_fullsync_acknowledged_writes_survive_primary_kill() {
    acked_writes_survive_kill_on("fullsync", kernel_cluster("fullsync", 32 * MIB));
}

#[test]
fn kernel_host_memsync_acknowledged_writes_survive_primary_kill() {
    acked_writes_survive_kill_on("memsync", kernel_cluster("memsync", 32 * MIB));
}

/// The module short of memory: 2% of its M_NOWAIT allocations and
/// g_clone_bio calls fail (GEOM retries the bios it answers ENOMEM), under
/// the stamped-block workload and a kill -9; then a clean role change
/// reports how many failures were injected.
#[test]
fn kernel_host_allocation_failures_lose_no_acknowledged_write() {
    let c = Cluster::builder(Mode::auto())
        .resource("r0", 32 * MIB)
        .replication("memsync")
        .timeout(5)
        .kernel_host(true)
        .kshim_fail("nowait=20000,clone=20000")
        .build()
        .expect("build the cluster");
    let (mut c, history) = kill_primary_under_load_on(c, 16);
    assert!(history.acked() > 100, "acked: {}", history.acked());
    assert!(c.log("alpha").unwrap().contains("injecting failures"));
    c.role("beta", "r0", "primary").unwrap();
    let area = c.data_area("beta", "r0").unwrap();
    let report = history.verify_file(&area.path, area.offset).unwrap();
    assert!(report.passed(), "acknowledged writes lost: {report:?}");
    // beta (also short of memory) serves, resyncs alpha, and stops.
    c.restart("alpha").unwrap();
    c.role("alpha", "r0", "secondary").unwrap();
    c.wait_list("beta", "r0", T, |s| s.in_sync()).unwrap();
    same_data(&c);
    c.role("beta", "r0", "init").unwrap();
    let log = c.log("beta").unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("failures injected"))
        .unwrap_or_else(|| panic!("no failure report:\n{log}"));
    eprintln!("beta: {line}");
    let injected: u64 = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok())
        .sum();
    assert!(injected > 0, "{line}");
    check_host(&c, "beta");
}

#[test]
fn async_keeps_write_order() {
    let (c, history) = kill_primary_under_load("async", 1);
    // Promotion ends beta's session and waits for the writes it started.
    c.role("beta", "r0", "primary").unwrap();
    let area = c.data_area("beta", "r0").unwrap();
    let report = history.verify_file(&area.path, area.offset).unwrap();
    let prefix = report
        .prefix
        .clone()
        .expect("queue depth 1 makes a prefix check");
    assert!(
        prefix.holes.is_empty(),
        "the secondary holds writes out of order: {prefix:?}"
    );
    assert!(report.corrupt.is_empty(), "{report:?}");
}

/// memsync acknowledges a write once the secondary has received it, before
/// its disk has it. A flush must still cover it, and when the primary dies
/// with such writes still going to the secondary's (slow) disk, promoting
/// the secondary waits for them: none lands after a newer write.
#[test]
fn memsync_writes_received_are_flushed_and_never_land_late() {
    let mut c = cluster("memsync", 32 * MIB);
    connected(&mut c);
    let (off, len) = (4 * MIB, 64 * 1024);
    let area = |c: &Cluster, node: &str| c.read_data(node, "r0", off, len as usize).unwrap();
    let uri = |c: &Cluster, node: &str| c.nbd_uri(node, "r0").unwrap();
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, true);

    // Written and flushed through alpha: on beta's disk when the flush ends.
    qemu_io(
        &uri(&c, "alpha"),
        &[&format!("write -P 0x51 {off} {len}"), "flush"],
    );
    assert!(
        area(&c, "beta").iter().all(|&b| b == 0x51),
        "a flush answered before the write it covers reached beta's disk"
    );

    // Acknowledged (received), no flush (libnbd sends none; qemu-io would
    // flush on exit); alpha dies while beta's disk is still busy with it.
    let r = hast_tests::python(
        &format!(
            "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
             h.pwrite(b'\\x52' * {len}, {off})\nh.shutdown()\n"
        ),
        &[&uri(&c, "alpha")],
        T,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    c.kill9("alpha").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, false);
    assert!(
        area(&c, "beta").iter().all(|&b| b == 0x52),
        "promoted before the acknowledged write was on disk"
    );
    qemu_io(&uri(&c, "beta"), &[&format!("write -P 0x53 {off} {len}")]);
    // Longer than the slow write: an old write still running would land now.
    std::thread::sleep(hast::failpoint::SECONDARY_SLOW_WRITE_DELAY + Duration::from_secs(1));
    assert!(
        area(&c, "beta").iter().all(|&b| b == 0x53),
        "a write of the dead primary landed after the new primary's"
    );
}

#[test]
fn partition_then_heal_resyncs_only_dirty_extents() {
    let mut c = cluster("fullsync", 64 * MIB);
    connected(&mut c);
    c.partition("alpha", "beta").unwrap();
    let reference = reference_image(&c);
    qemu_write(&c, "alpha", &reference, 0x5a, 30 * MIB, 2 * MIB);
    let s = c
        .wait_list("alpha", "r0", T, |s| {
            s.status.as_deref() == Some("degraded")
        })
        .unwrap();
    assert_eq!(s.dirty, 2 * MIB);
    c.heal("alpha", "beta").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    assert!(c
        .log("alpha")
        .unwrap()
        .contains(&format!("synchronization complete: {} bytes", 2 * MIB)));
    same_data(&c);
}

#[test]
fn split_brain_is_refused_and_recovered() {
    let mut c = cluster("memsync", 32 * MIB);
    connected(&mut c);
    c.partition("alpha", "beta").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    let reference = c.dir().join("unused.img");
    std::fs::File::create(&reference)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    qemu_write(&c, "alpha", &reference, 0x0a, 0, MIB);
    qemu_write(&c, "beta", &reference, 0x0b, 4 * MIB, MIB);
    c.role("beta", "r0", "secondary").unwrap();
    c.heal("alpha", "beta").unwrap();
    c.wait_hook("alpha", "split-brain r0", T).unwrap();
    c.wait_hook("beta", "split-brain r0", T).unwrap();
    assert_eq!(
        c.list_res("alpha", "r0").unwrap().status.as_deref(),
        Some("degraded")
    );
    // Recovery on beta, whose changes are discarded.
    c.role("beta", "r0", "init").unwrap();
    c.hastctl_ok("beta", &["create", "r0"]).unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    same_data(&c);
}

#[test]
fn secondary_write_error_leaves_the_extent_dirty_until_resync_repairs_it() {
    let mut c = cluster("fullsync", 32 * MIB);
    connected(&mut c);
    let reference = reference_image(&c);
    c.failpoint("beta", hast::failpoint::SECONDARY_WRITE, true);
    qemu_write(&c, "alpha", &reference, 0x6c, 6 * MIB, MIB);
    // The client's write succeeded locally; the extent failed on the peer
    // and stays dirty while the nodes stay connected.
    let s = c.list_res("alpha", "r0").unwrap();
    assert_eq!(s.dirty, 2 * MIB, "the failed extent must stay dirty");
    assert_eq!(s.status.as_deref(), Some("complete"));
    assert!(c.list_res("beta", "r0").unwrap().stats.write_errors > 0);
    assert_ne!(c.compare_data("r0", "alpha", "beta").unwrap(), None);
    // Repaired disk, next connection: the resync copies the extent.
    c.failpoint("beta", hast::failpoint::SECONDARY_WRITE, false);
    c.role("beta", "r0", "init").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
}

/// A failing local read on the primary is served by the secondary: clients
/// read the right bytes; with the engine splitting requests (the kernel
/// host's path) the peer's answers are put together from 64 KiB pieces.
#[test]
fn reads_the_primary_cannot_do_locally_come_from_the_secondary() {
    reads_from_the_secondary(false);
}

/// The same in the kernel module: a failed local read becomes a
/// HAST_UP_READ whose data the engine copies into the client's bio.
#[test]
fn kernel_host_reads_the_primary_cannot_do_locally_come_from_the_secondary() {
    reads_from_the_secondary(true);
}

fn reads_from_the_secondary(kernel: bool) {
    for split in [false, true] {
        let mut c = if kernel {
            kernel_cluster("fullsync", 32 * MIB)
        } else {
            cluster("fullsync", 32 * MIB)
        };
        if split {
            c.failpoint("alpha", hast::failpoint::ENGINE_SPLIT, true);
        }
        connected(&mut c);
        let reference = reference_image(&c);
        qemu_write(&c, "alpha", &reference, 0x3c, 3 * MIB, 5 * MIB);
        c.failpoint("alpha", hast::failpoint::PRIMARY_READ, true);
        assert!(
            export_matches(&c, "alpha", &reference),
            "reads through the peer differ (split: {split})"
        );
        let s = c.list_res("alpha", "r0").unwrap();
        assert!(s.stats.read_errors > 0, "no local read failed: {s:?}");
        if split {
            let log = c.log("alpha").unwrap();
            assert!(log.contains("READ seq"), "{log}");
            assert!(log.contains("goes to the peer in"), "{log}");
        }
        c.failpoint("alpha", hast::failpoint::PRIMARY_READ, false);
        assert!(export_matches(&c, "alpha", &reference));
        check_host(&c, "alpha");
    }
}

/// A TCP connection to `to` from source address `from` (loopback aliases).
fn connect_from(from: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let src: std::net::SocketAddrV4 = format!("{from}:0").parse().unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::from(src)).unwrap();
    let std::net::SocketAddr::V4(dst) = to else {
        panic!("IPv4 only")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).unwrap();
    let s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Send `bytes`, then read until the peer closes: what it answered.
fn exchange(mut s: std::net::TcpStream, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn hostile_peers_are_refused_and_harm_nothing() {
    use hast::nv::Nv;
    let mut c = Cluster::builder(Mode::Loopback)
        .resource("r0", 32 * MIB)
        .replication("fullsync")
        .timeout(5)
        .build()
        .unwrap();
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    let beta_ip = c.addr("beta", "alpha").unwrap();
    let beta: std::net::SocketAddr = format!("{beta_ip}:{}", c.port("beta").unwrap())
        .parse()
        .unwrap();
    let alpha_ip = c.addr("alpha", "beta").unwrap().to_string();
    let beta_img = c.provider_path("beta", "r0").unwrap();
    let before = std::fs::read(&beta_img).unwrap();
    let frame = |nv: &Nv| hast::proto::encode_frame(nv, &[]).unwrap();
    let mut hello = Nv::new();
    hello.add_string("resource", "r0").add_u8("version", 2);

    // Not the resource's remote: closed without an answer.
    assert!(exchange(connect_from("127.0.0.9", beta), &frame(&hello)).is_empty());
    // From the right address: garbage, a wrong version byte, an absurd size.
    assert!(exchange(connect_from(&alpha_ip, beta), b"GET / HTTP/1.0\r\n\r\n").is_empty());
    assert!(exchange(connect_from(&alpha_ip, beta), &[9, 4, 0, 0, 0, 0, 0, 0, 0]).is_empty());
    assert!(exchange(connect_from(&alpha_ip, beta), &[2, 0xff, 0xff, 0xff, 0x7f]).is_empty());
    // An unknown resource is answered with an error message.
    let mut other = Nv::new();
    other.add_string("resource", "nosuch").add_u8("version", 2);
    let reply = exchange(connect_from(&alpha_ip, beta), &frame(&other));
    let (nv, _) =
        hast::proto::read_frame(&mut &reply[..], hast::proto::Limits::HEADERS_ONLY).unwrap();
    assert_eq!(nv.get_string("errmsg"), Some("Resource not configured."));
    // A second connection with a token nobody handed out.
    let mut attach = Nv::new();
    attach
        .add_string("resource", "r0")
        .add_u8_array("token", vec![7u8; 16])
        .add_u64("resuid", 1)
        .add_u64("localcnt", 0)
        .add_u64("remotecnt", 0);
    assert!(exchange(connect_from(&alpha_ip, beta), &frame(&attach)).is_empty());
    // A real first step, then a wrong token on the second connection.
    let s1 = connect_from(&alpha_ip, beta);
    {
        use std::io::Write;
        let mut w = &s1;
        w.write_all(&frame(&hello)).unwrap();
    }
    let (welcome, _) =
        hast::proto::read_frame(&mut &s1, hast::proto::Limits::HEADERS_ONLY).unwrap();
    assert_eq!(welcome.get_u8_array("token").map(<[u8]>::len), Some(16));
    assert!(exchange(connect_from(&alpha_ip, beta), &frame(&attach)).is_empty());
    drop(s1);

    // beta may close a connection before it logs why: wait for the lines.
    for line in [
        "isn't known",
        "unable to receive the handshake header",
        "no resource \"nosuch\"",
        "doesn't match",
    ] {
        if c.wait_for(line, T, |c| {
            c.log("beta").unwrap_or_default().contains(line)
        })
        .is_err()
        {
            panic!("beta's log lacks {line:?}:\n{}", c.log("beta").unwrap());
        }
    }
    assert!(c.running("beta"));
    assert_eq!(
        std::fs::read(&beta_img).unwrap(),
        before,
        "a hostile peer changed beta's provider"
    );

    // A provider of another size on beta: the primary refuses it.
    c.role("beta", "r0", "init").unwrap();
    c.hastctl_ok("beta", &["create", "-m", "16M", "r0"])
        .unwrap();
    let before = std::fs::read(&beta_img).unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_for("alpha refuses the size mismatch", T, |c| {
        c.log("alpha")
            .unwrap_or_default()
            .contains("data size differs")
    })
    .unwrap();
    assert_eq!(
        c.list_res("alpha", "r0").unwrap().status.as_deref(),
        Some("degraded")
    );
    assert!(c.running("alpha") && c.running("beta"));
    let after = std::fs::read(&beta_img).unwrap();
    assert_eq!(
        after[4096..],
        before[4096..],
        "the refused peer's map or data changed"
    );
}

#[test]
fn stale_primary_pulls_the_newer_data_from_its_secondary() {
    stale_primary_pulls(false);
}

/// Resynchronization from the peer on the kernel host: reads of stale
/// extents become HAST_UP_READ upcalls whose data the engine copies in.
#[test]
fn kernel_host_stale_primary_pulls_the_newer_data_from_its_secondary() {
    stale_primary_pulls_on(kernel_cluster("memsync", 64 * MIB), false);
}

/// The same story with the engine splitting every request for the peer
/// into 64 KiB pieces (the kernel host's path): multi-MiB writes replicated
/// in pieces, peer reads reassembled from pieces, resync in pieces.
#[test]
fn requests_larger_than_the_peer_accepts_go_in_pieces() {
    stale_primary_pulls(true);
}

fn stale_primary_pulls(split: bool) {
    stale_primary_pulls_on(cluster("memsync", 64 * MIB), split);
}

fn stale_primary_pulls_on(mut c: Cluster, split: bool) {
    if split {
        c.failpoint("alpha", hast::failpoint::ENGINE_SPLIT, true);
    }
    connected(&mut c);
    let reference = reference_image(&c);
    if split {
        // One 4 MiB client write of distinct bytes goes to the peer as 64
        // pieces, each of them its own part of the buffer.
        let src = c.dir().join("random.bin");
        let data: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 + i / 4099) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let cmd = format!("write -s {} 8M 4M", src.display());
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", &c.nbd_uri("alpha", "r0").unwrap(), "-c", &cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&reference)
            .unwrap()
            .write_all_at(&data, 8 * MIB)
            .unwrap();
        let log = c.log("alpha").unwrap();
        assert!(
            log.contains("split by the engine in 65536-byte pieces"),
            "{log}"
        );
        // The kernel host's clients send bios of at most MAXPHYS (1 MiB).
        let pieces = if c.kernel_host() {
            "of 1048576 bytes goes to the peer in 16 pieces"
        } else {
            "of 4194304 bytes goes to the peer in 64 pieces"
        };
        assert!(log.contains(pieces), "{log}");
        c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();
        same_data(&c);
    }
    qemu_write(&c, "alpha", &reference, 0x10, 0, 4 * MIB);
    c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();
    // beta takes over alone and writes; then alpha is made primary again:
    // its copy is the stale one (secondary localcnt > primary remotecnt).
    c.role("alpha", "r0", "init").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    qemu_write(&c, "beta", &reference, 0x20, 2 * MIB, 20 * MIB);
    c.role("beta", "r0", "secondary").unwrap();
    // alpha is stale: safe promotion refuses it unless forced.
    c.hastctl_ok("alpha", &["role", "--force", "primary", "r0"])
        .unwrap();
    // Reads through the export right away are correct: stale extents come
    // from the peer until they are resynchronized.
    assert!(export_matches(&c, "alpha", &reference));
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    let log = c.log("alpha").unwrap();
    assert!(log.contains("synchronization complete"), "{log}");
    let d = c.dump("alpha", "r0").unwrap();
    assert_eq!(
        (d.localcnt, d.remotecnt),
        (0, 1),
        "counters taken from the secondary"
    );
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    check_host(&c, "alpha");
}

/// A stale node promoted while its peer answers slowly: `role primary`
/// returns once the first connection attempt is over, so the very first
/// reads through the export already come from the peer.
fn no_stale_read_right_after_promotion(mut c: Cluster) {
    connected(&mut c);
    let reference = reference_image(&c);
    qemu_write(&c, "alpha", &reference, 0x10, 0, 4 * MIB);
    c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();
    c.role("alpha", "r0", "init").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    qemu_write(&c, "beta", &reference, 0x20, 0, 4 * MIB);
    c.role("beta", "r0", "secondary").unwrap();
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_ATTACH, true);
    c.hastctl_ok("alpha", &["role", "--force", "primary", "r0"])
        .unwrap();
    assert!(
        export_matches(&c, "alpha", &reference),
        "stale data served right after the promotion"
    );
    check_host(&c, "alpha");
}

#[test]
fn no_stale_read_right_after_a_promotion() {
    no_stale_read_right_after_promotion(cluster("memsync", 16 * MIB));
}

#[test]
fn kernel_host_no_stale_read_right_after_a_promotion() {
    no_stale_read_right_after_promotion(kernel_cluster("memsync", 16 * MIB));
}

#[test]
fn safe_promotion_refuses_while_the_peer_is_primary() {
    let mut c = cluster("fullsync", 32 * MIB);
    connected(&mut c);
    c.role("beta", "r0", "init").unwrap();
    let r = c.hastctl("beta", &["role", "primary", "r0"]).unwrap();
    assert_eq!(
        r.code, 75,
        "promotion next to a live primary must fail: {r:?}"
    );
    assert!(r.stderr.contains("is primary"), "{}", r.stderr);
    assert_eq!(c.list_res("beta", "r0").unwrap().role, "init");
    assert!(!c
        .hook_lines("beta")
        .unwrap()
        .iter()
        .any(|l| l == "role r0 init primary"));
    // The administrator may insist.
    c.hastctl_ok("beta", &["role", "--force", "primary", "r0"])
        .unwrap();
    assert_eq!(c.list_res("beta", "r0").unwrap().role, "primary");
}

#[test]
fn safe_promotion_refuses_a_node_whose_peer_is_newer() {
    let mut c = cluster("fullsync", 32 * MIB);
    connected(&mut c);
    let scratch = c.dir().join("scratch.img");
    std::fs::File::create(&scratch)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    // beta takes over and writes alone; then it stops being primary.
    c.role("alpha", "r0", "init").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    qemu_write(&c, "beta", &scratch, 0x42, 0, MIB);
    c.role("beta", "r0", "init").unwrap();
    // alpha's copy is older than beta's: refused.
    let r = c.hastctl("alpha", &["role", "primary", "r0"]).unwrap();
    assert_eq!(r.code, 75, "{r:?}");
    assert!(r.stderr.contains("holds newer data"), "{}", r.stderr);
    assert_eq!(c.list_res("alpha", "r0").unwrap().role, "init");
    // beta itself may be promoted (its data is the newest).
    c.role("beta", "r0", "primary").unwrap();
    c.role("beta", "r0", "init").unwrap();
    c.hastctl_ok("alpha", &["role", "--force", "primary", "r0"])
        .unwrap();
    assert_eq!(c.list_res("alpha", "r0").unwrap().role, "primary");
}

#[test]
fn safe_promotion_allows_a_node_whose_peer_is_down() {
    let mut c = cluster("fullsync", 32 * MIB);
    connected(&mut c);
    c.kill9("alpha").unwrap();
    // beta was in sync; its peer is gone: promotion goes ahead.
    c.role("beta", "r0", "primary").unwrap();
    assert_eq!(c.list_res("beta", "r0").unwrap().role, "primary");
    assert!(c
        .log("beta")
        .unwrap()
        .contains("peer before promotion: Unreachable"));
}

/// While `role primary` waits for the probe of a peer whose packets are
/// dropped (up to 5 s), hastd still answers other control requests and a
/// SIGTERM stops it within 2 s.
#[test]
fn a_promotion_probe_blocks_neither_control_requests_nor_sigterm() {
    use hast_tests::cluster::PartitionKind;
    let mut c = cluster("fullsync", 32 * MIB);
    c.start("alpha").unwrap();
    c.partition_with("alpha", "beta", PartitionKind::Drop)
        .unwrap();
    std::thread::scope(|scope| {
        let promote = scope.spawn(|| c.hastctl("alpha", &["role", "primary", "r0"]));
        // The probe is under way once the daemon logged nothing yet about
        // its answer; give the request time to reach it.
        std::thread::sleep(Duration::from_millis(700));
        let t = std::time::Instant::now();
        let st = c.hastctl("alpha", &["status"]).unwrap();
        assert_eq!(st.code, 0, "{st:?}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "status waited {:?} behind the probe",
            t.elapsed()
        );
        assert!(
            !c.log("alpha").unwrap().contains("peer before promotion"),
            "the probe was over before the status request: the test proves nothing"
        );
        c.signal("alpha", libc::SIGTERM).unwrap();
        let t = std::time::Instant::now();
        // Running: the process exists and is not a zombie waiting for
        // the harness to reap it.
        let running = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(") ").next().map(|r| !r.starts_with('Z')))
                .unwrap_or(false)
        };
        let pid = c.pid("alpha").expect("alpha's pid");
        while running(pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "hastd took {:?} to stop after SIGTERM during a probe",
            t.elapsed()
        );
        let _ = promote.join();
    });
}

/// A client's trim is replicated as a DELETE that the secondary carries out
/// on its provider (a hole punched in a file provider here), not dropped.
#[test]
fn deletes_reach_the_secondary_provider() {
    use std::os::unix::fs::MetadataExt;
    let mut c = cluster("fullsync", 32 * MIB);
    connected(&mut c);
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    qemu_io(&uri, &["write -P 0xaa 0 4M", "flush"]);
    let beta_img = c.provider_path("beta", "r0").unwrap();
    let before = std::fs::metadata(&beta_img).unwrap().blocks();
    qemu_io(&uri, &["discard 1M 2M", "flush"]);
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    let after = std::fs::metadata(&beta_img).unwrap().blocks();
    // 2 MiB are 4096 blocks of 512 bytes; the data area starts at localoff
    // 4608, so the filesystem keeps (zeroes) the two 4 KiB blocks at the
    // unaligned edges.
    assert!(
        before - after >= 4096 - 16,
        "beta's provider kept its blocks ({before} -> {after}): the DELETE did nothing"
    );
    let data = c.read_data("beta", "r0", 0, (4 * MIB) as usize).unwrap();
    let mib = MIB as usize;
    assert!(data[..mib].iter().all(|&b| b == 0xaa));
    assert!(data[mib..3 * mib].iter().all(|&b| b == 0));
    assert!(data[3 * mib..].iter().all(|&b| b == 0xaa));
    same_data(&c);
}

/// Many overlapping writes in flight through a real client (libnbd: rounds
/// of 32 writes at once, each block of a small region written by several
/// of them with different data) while the primary's local writes complete
/// in random order, as a disk's may: both copies must end equal.
#[test]
fn overlapping_writes_in_flight_leave_both_copies_equal() {
    const SCRIPT: &str = r#"
import nbd, sys, random
h = nbd.NBD()
h.connect_uri(sys.argv[1])
rng = random.Random(7)
for rnd in range(60):
    cookies = []
    for i in range(32):
        blk = rng.randrange(8)
        buf = nbd.Buffer.from_bytearray(bytearray([(rnd * 32 + i) % 251 + 1]) * 4096)
        cookies.append(h.aio_pwrite(buf, blk * 4096))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
h.shutdown()
print('done')
"#;
    for mode in ["fullsync", "memsync", "async"] {
        let mut c = cluster(mode, 32 * MIB);
        connected(&mut c);
        c.failpoint("alpha", hast::failpoint::PRIMARY_JITTER, true);
        let uri = c.nbd_uri("alpha", "r0").unwrap();
        let r = hast_tests::python(SCRIPT, &[&uri], Duration::from_secs(120));
        assert_eq!(r.stdout.trim(), "done", "{mode}: {}", r.stderr);
        c.wait_list("alpha", "r0", T, |s| s.in_sync())
            .unwrap_or_else(|e| panic!("{mode}: {e}\n{}", c.log("alpha").unwrap()));
        let a = c.read_data("alpha", "r0", 0, 8 * 4096).unwrap();
        let b = c.read_data("beta", "r0", 0, 8 * 4096).unwrap();
        let differ: Vec<usize> = (0..8)
            .filter(|i| a[i * 4096..(i + 1) * 4096] != b[i * 4096..(i + 1) * 4096])
            .collect();
        assert!(
            differ.is_empty(),
            "{mode}: blocks {differ:?} differ between the copies while list says in sync"
        );
        same_data(&c);
    }
}

/// A secondary whose synchronization from the primary was interrupted (the
/// primary died in the middle) holds a mix of old and new blocks: `list`
/// and `dump` say so, `role primary` is refused (exit 75) while a plain
/// promotion would serve that mix, and `--force` takes the copy as it is.
#[test]
fn a_half_synchronized_secondary_is_not_promoted_silently() {
    let mut c = cluster("fullsync", 64 * MIB);
    connected(&mut c);
    // beta goes away; alpha writes 32 MiB alone.
    c.stop("beta").unwrap();
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    qemu_io(&uri, &["write -P 0x5a 0 32M", "flush"]);
    // beta comes back with a slow disk: the resync toward it crawls.
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, true);
    c.start("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.synchronizing())
        .unwrap_or_else(|e| panic!("no resync: {e}\n{}", c.log("alpha").unwrap()));
    c.wait_list("beta", "r0", T, |s| s.inconsistent())
        .unwrap_or_else(|e| {
            panic!(
                "beta never said inconsistent: {e}\n{}",
                c.log("beta").unwrap()
            )
        });
    // Some of the resync lands on beta, then its primary dies.
    std::thread::sleep(Duration::from_secs(3));
    c.kill9("alpha").unwrap();
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, false);
    let half = c.read_data("beta", "r0", 0, (32 * MIB) as usize).unwrap();
    assert!(
        half.contains(&0x5a) && half.contains(&0),
        "the test needs a copy that is half synchronized"
    );
    let r = c.hastctl("beta", &["role", "primary", "r0"]).unwrap();
    assert_eq!(r.code, 75, "a half-synchronized copy was promoted: {r:?}");
    assert!(r.stderr.contains("inconsistent"), "{}", r.stderr);
    let st = c.list_res("beta", "r0").unwrap();
    assert_eq!(st.role, "secondary");
    assert!(st.inconsistent(), "{st:?}");
    assert!(c.dump("beta", "r0").unwrap().inconsistent);
    // The administrator may insist: the copy is used as it is, and no
    // longer called inconsistent.
    c.hastctl_ok("beta", &["role", "--force", "primary", "r0"])
        .unwrap();
    let st = c.list_res("beta", "r0").unwrap();
    assert_eq!(st.role, "primary");
    assert!(!st.inconsistent(), "{st:?}");
    assert!(!c.dump("beta", "r0").unwrap().inconsistent);
    assert!(c
        .log("beta")
        .unwrap()
        .contains("promoted by force with an inconsistent copy"));
}

/// Once a resync toward the secondary has finished, its copy is consistent
/// again: nothing says otherwise and promotion goes ahead.
#[test]
fn a_finished_synchronization_leaves_the_secondary_consistent() {
    let mut c = cluster("fullsync", 32 * MIB);
    connected(&mut c);
    c.stop("beta").unwrap();
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    qemu_io(&uri, &["write -P 0x5a 0 8M", "flush"]);
    c.start("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    c.wait_list("beta", "r0", T, |s| !s.inconsistent()).unwrap();
    assert!(!c.dump("beta", "r0").unwrap().inconsistent);
    same_data(&c);
    c.kill9("alpha").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    assert_eq!(c.list_res("beta", "r0").unwrap().role, "primary");
}

/// Random 4 KiB writes (one at a time, so that no extent keeps a write in
/// flight) over a 1 GiB provider, once the working set is hot,
/// cost almost no activemap writes (below 1 per 100 writes): extents
/// written on both sides stay marked while they are written, instead of
/// being cleaned at each periodic flush and marked again by the next write.
#[test]
fn hot_random_writes_cost_almost_no_map_writes() {
    if !hast_tests::have("fio") {
        eprintln!("SKIPPED: fio is not installed");
        return;
    }
    let mut c = cluster("fullsync", 1 << 30);
    connected(&mut c);
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    let fio = |secs: u32| {
        let out = std::process::Command::new("fio")
            .current_dir(c.dir())
            .args([
                "--name=hot",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=1",
                "--norandommap",
                "--randrepeat=0",
                "--size=1G",
                "--time_based",
                &format!("--runtime={secs}"),
            ])
            .output()
            .expect("run fio");
        assert!(
            out.status.success(),
            "fio: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Warm-up: every extent written once (and marked).
    fio(6);
    let before = c.list_res("alpha", "r0").unwrap().stats;
    fio(6);
    let after = c.list_res("alpha", "r0").unwrap().stats;
    let writes = after.writes - before.writes;
    let maps = after.activemap_updates - before.activemap_updates;
    assert!(writes > 1000, "too few writes to judge: {writes}");
    assert!(
        maps * 100 < writes,
        "{maps} map writes for {writes} random writes after warm-up"
    );
}

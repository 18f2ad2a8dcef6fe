//! Link security between real hastd processes in network namespaces:
//! TLS 1.3 with pinned keys (`hastctl keygen`), a CA file, the
//! shared-secret mode; every refusal (wrong key, unknown fingerprint,
//! plain toward TLS and back, wrong secret, replayed handshakes, a proxy
//! flipping a byte, garbage and truncated TLS records) writes nothing on
//! the secondary and leaves both daemons up; a plain peer without any
//! extension field (FreeBSD's hastd, emulated) still pairs with a plain
//! resource; loose key and secret files are refused at start and on
//! reload; keys rotate on SIGHUP; the control socket refuses other users.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, Mode};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Helpers

/// Two nodes in network namespaces with resource r0 of `size` bytes.
fn cluster(size: u64) -> Cluster {
    Cluster::builder(Mode::Netns)
        .resource("r0", size)
        .replication("fullsync")
        .timeout(5)
        .build()
        .expect("build the cluster")
}

/// `hastctl keygen` on `node` into the cluster directory; the file and the
/// fingerprint it printed.
fn keygen(c: &Cluster, node: &str, file: &str) -> (PathBuf, String) {
    let path = c.dir().join(file);
    let _ = std::fs::remove_file(&path);
    let out = c
        .hastctl_ok(node, &["keygen", &path.display().to_string()])
        .expect("hastctl keygen");
    let fp = out.trim().to_string();
    assert!(
        fp.starts_with("sha256:") && fp.len() == 7 + 64,
        "keygen printed {out:?}"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "keygen must write mode 0600");
    (path, fp)
}

/// Append statements to the shared hast.conf.
fn append_conf(c: &Cluster, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(c.conf())
        .unwrap();
    writeln!(f, "{text}").unwrap();
}

/// Replace `old` (which must be there) in the shared hast.conf.
fn edit_conf(c: &Cluster, old: &str, new: &str) {
    let text = std::fs::read_to_string(c.conf()).unwrap();
    assert!(text.contains(old), "{old:?} not in hast.conf:\n{text}");
    std::fs::write(c.conf(), text.replacen(old, new, 1)).unwrap();
}

/// Keys for both nodes, each pinning the other's: `(alpha key, alpha
/// fingerprint, beta key, beta fingerprint)`.
struct Keys {
    alpha: PathBuf,
    alpha_fp: String,
    beta: PathBuf,
    beta_fp: String,
}

fn keys(c: &Cluster) -> Keys {
    let (alpha, alpha_fp) = keygen(c, "alpha", "alpha.key");
    let (beta, beta_fp) = keygen(c, "beta", "beta.key");
    assert_ne!(alpha_fp, beta_fp);
    Keys {
        alpha,
        alpha_fp,
        beta,
        beta_fp,
    }
}

/// hast.conf statements: `security tls` everywhere, each node its key
/// and the other's fingerprint.
fn tls_conf(k: &Keys) -> String {
    format!(
        "security tls\n\
         on alpha {{\n\tkeyfile {}\n\tpeerfingerprint {}\n}}\n\
         on beta {{\n\tkeyfile {}\n\tpeerfingerprint {}\n}}\n",
        k.alpha.display(),
        k.beta_fp,
        k.beta.display(),
        k.alpha_fp
    )
}

/// Run `f` in a thread inside `node`'s network namespace (sockets it
/// creates live there).
fn in_netns<R: Send + 'static>(
    c: &Cluster,
    node: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    let ns = c.netns(node).unwrap().expect("netns mode");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open the netns");
        // SAFETY: setns(2) on this thread only, with a namespace file we hold open.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the netns")
}

/// beta's replication address as alpha reaches it.
fn beta_addr(c: &Cluster) -> SocketAddr {
    SocketAddr::new(
        c.addr("beta", "alpha").unwrap().into(),
        c.port("beta").unwrap(),
    )
}

fn log_has(c: &Cluster, node: &str, what: &str) -> bool {
    c.log(node).unwrap_or_default().contains(what)
}

/// Wait until `node`'s log contains `what` (panics with the log if not).
fn wait_log(c: &Cluster, node: &str, what: &str) {
    if c.wait_for(&format!("{node} logs {what:?}"), T, |c| {
        log_has(c, node, what)
    })
    .is_err()
    {
        panic!(
            "{node}'s log lacks {what:?}:\n{}",
            c.log(node).unwrap_or_default()
        );
    }
}

/// How many times `what` appears in `node`'s log.
fn log_count(c: &Cluster, node: &str, what: &str) -> usize {
    c.log(node).unwrap_or_default().matches(what).count()
}

/// Run `qemu-io` commands on `target` (an NBD URI or a raw image).
fn qemu_io(target: &str, cmds: &[&str]) {
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", target]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd.output().expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {cmds:?} on {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sparse reference image as large as the data area.
fn reference_image(c: &Cluster) -> PathBuf {
    let reference = c.dir().join("reference.img");
    std::fs::File::create(&reference)
        .unwrap()
        .set_len(c.data_area("alpha", "r0").unwrap().size)
        .unwrap();
    reference
}

/// Write `pattern` at `offset` through `node`'s export and into `reference`.
fn write(c: &Cluster, node: &str, reference: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern} {offset} {len}");
    qemu_io(&c.nbd_uri(node, "r0").unwrap(), &[&cmd]);
    qemu_io(&reference.display().to_string(), &[&cmd]);
}

fn same_data(c: &Cluster) {
    assert_eq!(
        c.compare_data("r0", "alpha", "beta").unwrap(),
        None,
        "the two data areas differ"
    );
}

/// beta's whole provider file (metadata, map and data).
fn beta_provider(c: &Cluster) -> Vec<u8> {
    std::fs::read(c.provider_path("beta", "r0").unwrap()).unwrap()
}

/// The `security:` and `peerfingerprint:` lines of `hastctl list r0`.
fn link_lines(c: &Cluster, node: &str) -> (String, String) {
    let s = c.list_res(node, "r0").unwrap();
    (
        s.raw.get("security").cloned().unwrap_or_default(),
        s.raw.get("peerfingerprint").cloned().unwrap_or_default(),
    )
}

fn wait_in_sync(c: &Cluster, node: &str) {
    if let Err(e) = c.wait_list(node, "r0", T, |s| s.in_sync()) {
        panic!(
            "{node} never in sync: {e}\nalpha:\n{}\nbeta:\n{}",
            c.log("alpha").unwrap_or_default(),
            c.log("beta").unwrap_or_default()
        );
    }
}

// ---------------------------------------------------------------------------
// A TLS pair

/// The initial full synchronization, the seeds' failover story and a
/// resync after a partition, all over TLS with pinned keys; the data
/// identical at every step; `hastctl list` shows the link and the peer's
/// key on both sides.
#[test]
fn tls_pair_syncs_fails_over_and_resyncs_with_identical_data() {
    let mut c = cluster(64 * MIB);
    let k = keys(&c);
    append_conf(&c, &tls_conf(&k));
    c.start_all().unwrap();
    // alpha writes alone first: the initial synchronization copies it.
    c.role("alpha", "r0", "primary").unwrap();
    let reference = reference_image(&c);
    write(&c, "alpha", &reference, 0x11, 0, 8 * MIB);
    write(&c, "alpha", &reference, 0x22, 40 * MIB, 3 * MIB);
    let (sec, _) = link_lines(&c, "alpha");
    assert_eq!(sec, "tls (not connected)");
    c.role("beta", "r0", "secondary").unwrap();
    wait_in_sync(&c, "alpha");
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    let (sec, peer) = link_lines(&c, "alpha");
    assert!(
        sec.starts_with("tls (encrypted and authenticated (TLS 1.3), TLS13_"),
        "{sec}"
    );
    assert_eq!(peer, k.beta_fp, "alpha shows beta's key");
    let (sec, peer) = link_lines(&c, "beta");
    assert!(sec.starts_with("tls (encrypted and authenticated"), "{sec}");
    assert_eq!(peer, k.alpha_fp, "beta shows alpha's key");
    assert!(log_has(&c, "alpha", "link to "), "alpha logs the link");

    // The seeds' story: the primary dies, the secondary takes over.
    c.kill9("alpha").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    assert!(c.qemu_img_compare("beta", "r0", &reference).unwrap());
    write(&c, "beta", &reference, 0x33, 10 * MIB, 5 * MIB);
    c.restart("alpha").unwrap();
    c.role("alpha", "r0", "secondary").unwrap();
    wait_in_sync(&c, "beta");
    same_data(&c);
    assert!(c.qemu_img_compare("beta", "r0", &reference).unwrap());
    // Roles back.
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");

    // A partition: writes while apart, then a resync of what changed.
    c.partition("alpha", "beta").unwrap();
    write(&c, "alpha", &reference, 0x44, 20 * MIB, 2 * MIB);
    let apart = c
        .wait_list("alpha", "r0", T, |s| {
            s.status.as_deref() == Some("degraded")
        })
        .unwrap();
    assert_eq!(apart.dirty, 2 * MIB, "{apart}");
    c.heal("alpha", "beta").unwrap();
    wait_in_sync(&c, "alpha");
    assert!(log_has(
        &c,
        "alpha",
        &format!("synchronization complete: {} bytes", 2 * MIB)
    ));
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    assert!(c.running("alpha") && c.running("beta"));
}

//! Link security between real hastd processes in network namespaces:
//! TLS 1.3 with pinned keys (`hastctl keygen`), a CA file, the
//! shared-secret mode; every refusal (wrong key, unknown fingerprint,
//! plain toward TLS and back, wrong secret, replayed handshakes, a proxy
//! flipping a byte, garbage and truncated TLS records) writes nothing on
//! the secondary and leaves both daemons up; a plain peer without any
//! extension field (FreeBSD's hastd, emulated) still pairs with a plain
//! resource; loose key and secret files are refused at start and on
//! reload; keys rotate on SIGHUP; a connection is re-established at its
//! key limit; the control socket refuses other users.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// `hastctl list --libxo json r0` on `node`, checked against
/// docs/hastctl.schema.json (python3-jsonschema).
fn list_json(c: &Cluster, node: &str) -> serde_json::Value {
    let out = c
        .hastctl_ok(node, &["list", "--libxo", "json", "r0"])
        .expect("hastctl list --libxo json");
    let path = c.dir().join(format!("{node}.list.json"));
    std::fs::write(&path, &out).unwrap();
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/hastctl.schema.json");
    let check = "import json, sys, jsonschema\n\
                 v = jsonschema.Draft202012Validator(json.load(open(sys.argv[1])))\n\
                 errs = [f'at {list(e.absolute_path)}: {e.message}' for e in v.iter_errors(json.load(open(sys.argv[2])))]\n\
                 print('\\n'.join(errs)); sys.exit(1 if errs else 0)\n";
    let r = hast_tests::python(
        check,
        &[&schema.display().to_string(), &path.display().to_string()],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "{out}\n{}{}", r.stdout, r.stderr);
    serde_json::from_str(&out).expect("list JSON")
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

/// Run `qemu-io` commands on `target` (an NBD URI or a raw image); they
/// must succeed.
fn qemu_io(target: &str, cmds: &[&str]) {
    let r = hast_tests::export::qemu_io(target, cmds);
    assert_eq!(r.code, 0, "qemu-io {cmds:?} on {target}: {}", r.stderr);
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
    // The machine-readable list says the same, as the schema describes.
    let json = list_json(&c, "alpha");
    let r = &json["list"]["resource"][0];
    assert_eq!(r["security"]["mode"], "tls", "{json}");
    assert_eq!(
        r["security"]["peer-fingerprint"],
        k.beta_fp.as_str(),
        "{json}"
    );
    let protection = r["security"]["protection"].as_str().unwrap_or_default();
    assert!(
        protection.starts_with("encrypted and authenticated (TLS 1.3), TLS13_"),
        "{json}"
    );
    assert_eq!(r["link"]["encryption"], protection, "{json}");

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

/// A TLS connection is re-established before its keys wear out, not
/// rekeyed in band: with the `tls-key-limit` fail point a connection sends
/// 32 MiB instead of about 128 GiB. Three writes of 20 MiB, each followed
/// by a flush, cross reconnections; what was in flight or not yet flushed
/// on both sides at each is resynchronized, the pair gets back in sync by
/// itself, and the data is identical.
#[test]
fn tls_connections_are_re_established_before_their_keys_wear_out() {
    let mut c = cluster(64 * MIB);
    let k = keys(&c);
    append_conf(&c, &tls_conf(&k));
    for node in ["alpha", "beta"] {
        c.failpoint(node, "tls-key-limit", true);
    }
    let limit = "has sent half of what its cipher suite allows one key";
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");
    let reference = reference_image(&c);
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    for (i, offset) in [2u64, 22, 42].into_iter().enumerate() {
        let cmd = format!("write -P {} {} {}", 0x51 + i, offset * MIB, 20 * MIB);
        qemu_io(&uri, &[&cmd, "flush"]);
        qemu_io(&reference.display().to_string(), &[&cmd]);
    }
    wait_in_sync(&c, "alpha");
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    let n = log_count(&c, "alpha", limit);
    eprintln!("{n} reconnections for the key limit");
    assert!(
        n >= 1,
        "60 MiB of writes in 32 MiB connections: {n} reconnections for the limit:\n{}",
        c.log("alpha").unwrap_or_default()
    );
    for node in ["alpha", "beta"] {
        assert!(
            !log_has(&c, node, "sent more than its cipher suite allows"),
            "{node} saw a peer go past the limit:\n{}",
            c.log(node).unwrap_or_default()
        );
    }
    let (sec, _) = link_lines(&c, "alpha");
    assert!(sec.starts_with("tls (encrypted"), "{sec}");
    assert!(c.running("alpha") && c.running("beta"));
}

// ---------------------------------------------------------------------------
// Refusals

/// Connect from `node`'s namespace to `to`, send `bytes` (then close the
/// writing half when `close`), and read until the peer closes or 10 s
/// pass: what it answered.
fn send_from(c: &Cluster, node: &str, to: SocketAddr, bytes: Vec<u8>, close: bool) -> Vec<u8> {
    in_netns(c, node, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&bytes);
        if close {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
}

/// A TLS client with `key` (a key pair file) pinning `peer`: completes the
/// handshake with `to` from `node`'s namespace, then writes `raw` bytes
/// (records of its own making) on the TCP stream and reads until the
/// peer closes. Returns whether the handshake completed.
fn tls_then_raw(
    c: &Cluster,
    node: &str,
    to: SocketAddr,
    key: &Path,
    peer: &str,
    raw: Vec<u8>,
    close: bool,
) -> bool {
    use hast::security::tls::{self, NodeKey, PeerPolicy, PinnedServerVerifier};
    let key = NodeKey::from_pem(&std::fs::read(key).unwrap()).unwrap();
    let policy = PeerPolicy {
        pin: Some(hast::security::Fingerprint::parse(peer).unwrap()),
        ca: None,
    };
    let cfg = tls::client_config(&key, PinnedServerVerifier::new(Arc::new(policy))).unwrap();
    in_netns(c, node, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut conn = rustls::ClientConnection::new(cfg, tls::peer_name()).unwrap();
        while conn.is_handshaking() {
            if conn.complete_io(&mut s).is_err() {
                return false;
            }
        }
        let _ = s.write_all(&raw);
        if close {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        true
    })
}

/// Pseudo-random bytes (splitmix64).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

/// After a refused attempt: nothing written on beta, both daemons up,
/// alpha degraded (when it is primary).
fn nothing_happened(c: &mut Cluster, before: &[u8], alpha_primary: bool) {
    assert!(c.running("alpha") && c.running("beta"), "a daemon died");
    assert!(
        beta_provider(c) == before,
        "a refused peer changed beta's provider"
    );
    let b = c.list_res("beta", "r0").unwrap();
    assert_eq!(b.role, "secondary");
    assert!(b.status.is_none(), "beta counts a connected primary: {b}");
    if alpha_primary {
        let a = c.list_res("alpha", "r0").unwrap();
        assert_eq!(a.status.as_deref(), Some("degraded"), "{a}");
    }
}

/// Start alpha as primary with the current hast.conf, wait for `alpha_says`
/// and `beta_says` in the logs, check nothing happened, and take alpha
/// back down.
fn refused(c: &mut Cluster, before: &[u8], alpha_says: &str, beta_says: &str) {
    c.start("alpha").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_log(c, "alpha", alpha_says);
    wait_log(c, "beta", beta_says);
    // A few more attempts (quick retries) change nothing either.
    std::thread::sleep(Duration::from_secs(2));
    nothing_happened(c, before, true);
    c.stop("alpha").unwrap();
}

/// Every way a TLS connection can be refused: a primary with the wrong
/// key, a secondary whose key the primary does not know, a plain primary
/// toward a TLS resource and a TLS primary toward a plain one, garbage
/// and truncated TLS records in and after the handshake. Each time both
/// daemons log why (and what to change), nothing is written on the
/// secondary, and both stay up; then the right configuration pairs.
#[test]
fn tls_refusals_write_nothing_and_keep_both_daemons_up() {
    let mut c = cluster(32 * MIB);
    let k = keys(&c);
    let (other, other_fp) = keygen(&c, "alpha", "other.key");
    let good = tls_conf(&k);
    append_conf(&c, &good);
    let base = std::fs::read_to_string(c.conf()).unwrap();
    let base = base.strip_suffix(&format!("{good}\n")).unwrap().to_string();
    let conf = c.conf().to_path_buf();
    let with = |extra: &str| {
        std::fs::write(&conf, format!("{base}{good}\n{extra}\n")).unwrap();
    };
    c.start("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    let before = beta_provider(&c);

    // The wrong key on the primary: the secondary refuses it after the
    // hello names the resource, and says so to the primary.
    with(&format!("on alpha {{\n\tkeyfile {}\n}}", other.display()));
    refused(
        &mut c,
        &before,
        &format!(
            "peer refused: resource r0: the primary's certificate is refused: the peer's key is {other_fp}, not the pinned {}",
            k.alpha_fp
        ),
        "[r0] connection from 10.77.1.1",
    );
    assert!(log_has(&c, "beta", "the primary's certificate is refused"));

    // An unknown fingerprint: the secondary's key is not the one the
    // primary pins; the primary aborts the handshake.
    with(&format!("on alpha {{\n\tpeerfingerprint {other_fp}\n}}"));
    refused(
        &mut c,
        &before,
        &format!(
            "TLS handshake refused: the peer's key is {}, not the pinned {other_fp}",
            k.beta_fp
        ),
        &format!(
            "(the primary does not accept this node's key {}: put it in the primary's `peerfingerprint`",
            k.beta_fp
        ),
    );

    // A plain primary toward the TLS resource.
    with("on alpha {\n\tsecurity none\n}");
    refused(
        &mut c,
        &before,
        "peer refused: resource r0 requires TLS (security tls) and the primary connected without it",
        "refused: resource r0 requires TLS (security tls) and the primary connected without it",
    );

    // Garbage and truncated TLS records, from alpha's address.
    let beta = beta_addr(&c);
    let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    garbage.extend(noise(64, 1));
    assert!(send_from(&c, "alpha", beta, garbage, false).len() < 64);
    wait_log(&c, "beta", "TLS handshake with 10.77.1.1");
    let handshakes = log_count(&c, "beta", "TLS handshake with 10.77.1.1");
    let mut truncated = vec![0x16, 0x03, 0x01, 0x02, 0x00];
    truncated.extend(noise(100, 2));
    send_from(&c, "alpha", beta, truncated, true);
    c.wait_for("beta logs the truncated handshake", T, |c| {
        log_count(c, "beta", "TLS handshake with 10.77.1.1") > handshakes
    })
    .unwrap();
    // A complete handshake with alpha's key, then records that do not
    // decrypt, and a record cut short.
    let headers = log_count(
        &c,
        "beta",
        "unable to receive the handshake header from 10.77.1.1",
    );
    let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    record.extend(noise(64, 3));
    assert!(tls_then_raw(
        &c, "alpha", beta, &k.alpha, &k.beta_fp, record, false
    ));
    let mut short = vec![0x17, 0x03, 0x03, 0x10, 0x00];
    short.extend(noise(200, 4));
    assert!(tls_then_raw(
        &c, "alpha", beta, &k.alpha, &k.beta_fp, short, true
    ));
    c.wait_for("beta logs both bad records", T, |c| {
        log_count(
            c,
            "beta",
            "unable to receive the handshake header from 10.77.1.1",
        ) >= headers + 2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log("beta").unwrap()));
    c.start("alpha").unwrap();
    nothing_happened(&mut c, &before, false);
    c.stop("alpha").unwrap();

    // A TLS primary toward a plain resource (beta has no TLS resource and
    // no key at all).
    std::fs::write(
        c.conf(),
        format!(
            "{base}on alpha {{\n\tsecurity tls\n\tkeyfile {}\n\tpeerfingerprint {}\n}}\n",
            k.alpha.display(),
            k.beta_fp
        ),
    )
    .unwrap();
    c.restart("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    assert!(beta_provider(&c) == before);
    refused(
        &mut c,
        &before,
        "(the peer closed the connection during the TLS handshake: it does not accept TLS",
        "TLS connection from 10.77.1.1",
    );
    assert!(log_has(
        &c,
        "beta",
        "no resource of this node has `security tls`"
    ));

    // The right configuration pairs, and replicates.
    with("");
    c.restart("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.start("alpha").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");
    let reference = reference_image(&c);
    write(&c, "alpha", &reference, 0x5c, MIB, 2 * MIB);
    c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();
    same_data(&c);
}

// ---------------------------------------------------------------------------
// A proxy between the nodes

/// A TCP proxy in a node's namespace toward `target`: it records what
/// each connection's client sent (its first 256 KiB) and, when armed,
/// flips one byte of the client's stream once more than 64 KiB have
/// passed (past any handshake).
struct Proxy {
    port: u16,
    flip: Arc<AtomicBool>,
    flipped: Arc<AtomicU64>,
    /// Client-to-server bytes of each connection, in accept order.
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

const RECORD: usize = 256 * 1024;
const FLIP_AFTER: u64 = 64 * 1024;

fn proxy(c: &Cluster, node: &str, listen: std::net::Ipv4Addr, target: SocketAddr) -> Proxy {
    let ns = c.netns(node).unwrap().expect("netns mode");
    let flip = Arc::new(AtomicBool::new(false));
    let flipped = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (f, fd, s, st) = (flip.clone(), flipped.clone(), sent.clone(), stop.clone());
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns(2) on this thread only, with a namespace file we hold open.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let l = TcpListener::bind((listen, 0)).unwrap();
        l.set_nonblocking(true).unwrap();
        tx.send(l.local_addr().unwrap().port()).unwrap();
        while !st.load(Ordering::SeqCst) {
            let (client, _) = match l.accept() {
                Ok(a) => a,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            client.set_nonblocking(false).unwrap();
            let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                continue;
            };
            let idx = {
                let mut v = s.lock().unwrap();
                v.push(Vec::new());
                v.len() - 1
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (f, fd, s) = (f.clone(), fd.clone(), s.clone());
            // Client to server: recorded, maybe flipped.
            std::thread::spawn(move || {
                let (mut from, mut to) = (client, server);
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &mut buf[..n];
                    {
                        let mut v = s.lock().unwrap();
                        let rec = &mut v[idx];
                        let room = RECORD.saturating_sub(rec.len()).min(n);
                        rec.extend_from_slice(&chunk[..room]);
                    }
                    total += n as u64;
                    if total > FLIP_AFTER && f.swap(false, Ordering::SeqCst) {
                        chunk[n / 2] ^= 0x01;
                        fd.fetch_add(1, Ordering::SeqCst);
                    }
                    if to.write_all(chunk).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
                let _ = from.shutdown(std::net::Shutdown::Both);
            });
            // Server to client: as it is.
            std::thread::spawn(move || {
                let (mut from, mut to) = (s2, c2);
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(std::net::Shutdown::Both);
                let _ = from.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    let port = rx.recv_timeout(T).expect("the proxy listens");
    Proxy {
        port,
        flip,
        flipped,
        sent,
        stop,
    }
}

/// Point alpha's `remote` for r0 at a proxy in alpha's namespace that
/// forwards to beta.
fn through_proxy(c: &Cluster) -> Proxy {
    let alpha_ip = c.addr("alpha", "beta").unwrap();
    let beta = beta_addr(c);
    let p = proxy(c, "alpha", alpha_ip, beta);
    edit_conf(
        c,
        &format!("remote tcp4://{}:{}", beta.ip(), beta.port()),
        &format!("remote tcp4://{alpha_ip}:{}", p.port),
    );
    p
}

/// A proxy that flips one bit of a TLS record on its way to the
/// secondary: the record does not decrypt, the session drops and is
/// re-established, and the data ends identical. Then what the primary
/// sent on both connections, replayed to the secondary, is refused (a
/// fresh handshake with new randoms) and writes nothing.
#[test]
fn flipped_tls_byte_drops_the_session_and_replayed_handshakes_are_refused() {
    let mut c = cluster(64 * MIB);
    let k = keys(&c);
    append_conf(&c, &tls_conf(&k));
    let p = through_proxy(&c);
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");
    let reference = reference_image(&c);
    write(&c, "alpha", &reference, 0x61, 0, 4 * MIB);
    let sessions = log_count(&c, "alpha", "connected to ");

    p.flip.store(true, Ordering::SeqCst);
    write(&c, "alpha", &reference, 0x62, 8 * MIB, 16 * MIB);
    c.wait_for("the proxy flips a byte", T, |_| {
        p.flipped.load(Ordering::SeqCst) == 1
    })
    .unwrap();
    wait_log(&c, "beta", "cannot decrypt peer's message");
    c.wait_for("alpha reconnects", T, |c| {
        log_count(c, "alpha", "connected to ") > sessions
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log("alpha").unwrap()));
    wait_in_sync(&c, "alpha");
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    assert!(c.running("alpha") && c.running("beta"));

    // Replays: what alpha sent on the first two connections of a session.
    // The promotion probe, then the session's two connections.
    let sent = p.sent.lock().unwrap().clone();
    assert!(sent.len() >= 3, "{} connections", sent.len());
    c.stop("alpha").unwrap();
    c.wait_list("beta", "r0", T, |s| s.status.is_none())
        .unwrap();
    let before = beta_provider(&c);
    let beta = beta_addr(&c);
    let failed = log_count(&c, "beta", "TLS handshake with 10.77.1.1");
    for conn in &sent[1..3] {
        assert_eq!(conn[0], 0x16, "a TLS client's first record");
        send_from(&c, "alpha", beta, conn.clone(), true);
    }
    c.wait_for("beta refuses both replays", T, |c| {
        log_count(c, "beta", "TLS handshake with 10.77.1.1") >= failed + 2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log("beta").unwrap()));
    assert!(c.running("beta"));
    assert!(
        beta_provider(&c) == before,
        "a replay changed beta's provider"
    );
    assert!(c.list_res("beta", "r0").unwrap().status.is_none());
}

// ---------------------------------------------------------------------------
// The shared-secret mode

/// Write a secret file of mode 0600.
fn secret_file(c: &Cluster, name: &str, secret: &str) -> PathBuf {
    let path = c.dir().join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The first frame of `bytes` (a version-2 frame without payload).
fn first_frame(bytes: &[u8]) -> Vec<u8> {
    let size = u32::from_le_bytes(bytes[1..5].try_into().unwrap()) as usize;
    bytes[..5 + size].to_vec()
}

/// A shared-secret pair authenticates both nodes and replicates (not
/// encrypted, and `hastctl list` says so); a wrong secret, a primary
/// without the mode and a secondary without it are refused with a log
/// line on both sides; a recorded handshake replayed, as it was or with
/// the new token, is refused; nothing is written on the secondary and
/// both daemons stay up.
#[test]
fn shared_secret_authenticates_and_refuses_wrong_secrets_and_replays() {
    let mut c = cluster(32 * MIB);
    let good = secret_file(&c, "secret", "correct horse battery staple 42");
    let bad = secret_file(&c, "wrong", "incorrect horse battery staple");
    let p = through_proxy(&c);
    let base = std::fs::read_to_string(c.conf()).unwrap();
    let conf = c.conf().to_path_buf();
    let with = |extra: &str| {
        std::fs::write(
            &conf,
            format!(
                "{base}security secret\nsecretfile {}\n{extra}\n",
                good.display()
            ),
        )
        .unwrap();
    };
    with("");
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");
    let reference = reference_image(&c);
    write(&c, "alpha", &reference, 0x71, 2 * MIB, 4 * MIB);
    c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();
    same_data(&c);
    for node in ["alpha", "beta"] {
        let (sec, peer) = link_lines(&c, node);
        assert_eq!(
            sec, "secret (authenticated handshake (shared secret), not encrypted)",
            "{node}"
        );
        assert_eq!(peer, "", "no key to show");
    }
    let sent = p.sent.lock().unwrap().clone();
    c.stop("alpha").unwrap();
    c.wait_list("beta", "r0", T, |s| s.status.is_none())
        .unwrap();
    let before = beta_provider(&c);

    // Replays of the recorded hello and attach.
    // The session's hello (not the promotion probe's) and attach.
    let frames: Vec<(Vec<u8>, hast::nv::Nv)> = sent
        .iter()
        .map(|conn| {
            let f = first_frame(conn);
            let (nv, _) =
                hast::proto::read_frame(&mut &f[..], hast::proto::Limits::HEADERS_ONLY).unwrap();
            (f, nv)
        })
        .collect();
    let hello = frames
        .iter()
        .find(|(_, nv)| nv.get("probe").is_none() && nv.get("token").is_none())
        .expect("a recorded hello")
        .0
        .clone();
    let attach = frames
        .iter()
        .find(|(_, nv)| nv.get("token").is_some())
        .expect("a recorded attach")
        .0
        .clone();
    let beta = beta_addr(&c);
    let (h, a) = (hello.clone(), attach.clone());
    let answers = in_netns(&c, "alpha", move || {
        use hast::proto::{read_frame, Limits};
        let connect = || {
            let s = TcpStream::connect_timeout(&beta, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        };
        // As recorded: the token is an old one.
        let mut s1 = connect();
        s1.write_all(&h).unwrap();
        let (welcome, _) = read_frame(&mut s1, Limits::HEADERS_ONLY).unwrap();
        let mut s2 = connect();
        s2.write_all(&a).unwrap();
        let mut rest = Vec::new();
        let _ = s2.read_to_end(&mut rest);
        drop(s1);
        // With the new token put in: the MAC covers the new nonce and
        // token, which the recording cannot know.
        let mut s1 = connect();
        s1.write_all(&h).unwrap();
        let (welcome2, _) = read_frame(&mut s1, Limits::HEADERS_ONLY).unwrap();
        let (old, _) = read_frame(&mut &a[..], Limits::HEADERS_ONLY).unwrap();
        let mut forged = hast::nv::Nv::new();
        for (name, value) in old.iter() {
            if name == "token" {
                forged.add_u8_array("token", welcome2.get_u8_array("token").unwrap().to_vec());
            } else {
                forged.add(name, value.clone());
            }
        }
        let mut s2 = connect();
        s2.write_all(&hast::proto::encode_frame(&forged, &[]).unwrap())
            .unwrap();
        let refusal = read_frame(&mut s1, Limits::HEADERS_ONLY).map(|(nv, _)| nv);
        (welcome, welcome2, refusal)
    });
    let (w1, w2, refusal) = answers;
    assert!(w1.get_u8_array("nonce").is_some() && w2.get_u8_array("nonce").is_some());
    assert_ne!(
        w1.get_u8_array("nonce"),
        w2.get_u8_array("nonce"),
        "fresh nonces"
    );
    wait_log(&c, "beta", "token received from 10.77.1.1");
    wait_log(&c, "beta", "the primary failed the shared-secret challenge");
    let refusal = refusal.expect("beta answers the forged attach on connection 1");
    assert!(
        refusal
            .get_string("errmsg")
            .is_some_and(|m| m.contains("failed the shared-secret challenge")),
        "{refusal:?}"
    );
    c.start("alpha").unwrap();
    nothing_happened(&mut c, &before, false);
    c.stop("alpha").unwrap();

    // A wrong secret on the primary.
    with(&format!("on alpha {{\n\tsecretfile {}\n}}", bad.display()));
    refused(
        &mut c,
        &before,
        "peer refused: resource r0: the primary failed the shared-secret challenge",
        "refused: resource r0: the primary failed the shared-secret challenge",
    );
    // A primary without the mode.
    with("on alpha {\n\tsecurity none\n}");
    refused(
        &mut c,
        &before,
        "peer refused: resource r0 requires shared-secret authentication",
        "refused: resource r0 requires shared-secret authentication",
    );
    // A secondary without it.
    with("on beta {\n\tsecurity none\n}");
    c.restart("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    refused(
        &mut c,
        &before,
        "peer refused: resource r0 has `security none` on this node but the primary asks for shared-secret authentication",
        "refused: resource r0 has `security none` on this node but the primary asks",
    );
    // Back to the same secret: the pair resumes where it was.
    with("");
    c.restart("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.start("alpha").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");
    write(&c, "alpha", &reference, 0x72, 20 * MIB, MIB);
    c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
    // The secret readable by others: a reload is refused, the pair goes on.
    chmod(&good, 0o644);
    c.signal("alpha", libc::SIGHUP).unwrap();
    wait_log(&c, "alpha", "configuration not reloaded");
    assert!(log_has(
        &c,
        "alpha",
        &format!("secretfile: {} has mode 0644", good.display())
    ));
    chmod(&good, 0o600);
    wait_in_sync(&c, "alpha");
}

// ---------------------------------------------------------------------------
// Key and secret files, key rotation

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `hastd -F -c CONF --node NODE` in this namespace: its exit code and
/// standard error (for a start that must fail before it binds anything
/// of the node's network).
fn hastd_fails(c: &Cluster, node: &str) -> (i32, String) {
    let out = std::process::Command::new(hast_tests::bin("hastd"))
        .args(["-F", "-c"])
        .arg(c.conf())
        .args(["--node", node])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line of hast.conf holding `what`.
fn conf_line(c: &Cluster, what: &str) -> usize {
    std::fs::read_to_string(c.conf())
        .unwrap()
        .lines()
        .position(|l| l.contains(what))
        .expect("the statement is in hast.conf")
        + 1
}

/// A key or secret file that group or others can read is refused when
/// hastd starts (exit 78, the file's configuration line and the chmod to
/// run) and on SIGHUP (the configuration is not reloaded; the running
/// link goes on).
#[test]
fn loose_key_or_secret_files_are_refused_at_start_and_on_reload() {
    let mut c = cluster(16 * MIB);
    let k = keys(&c);
    append_conf(&c, &tls_conf(&k));
    let conf = c.conf().display().to_string();
    chmod(&k.alpha, 0o640);
    let (code, err) = hastd_fails(&c, "alpha");
    let line = conf_line(&c, &format!("keyfile {}", k.alpha.display()));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&format!(
            "hastd: {conf}:{line}: keyfile: {} has mode 0640: it must not be readable or writable by group or others (chmod 600 {})",
            k.alpha.display(),
            k.alpha.display()
        )),
        "{err}"
    );
    chmod(&k.alpha, 0o600);
    // A secret file too.
    let secret = secret_file(&c, "secret", "correct horse battery staple 42");
    chmod(&secret, 0o604);
    let text = std::fs::read_to_string(c.conf()).unwrap();
    std::fs::write(
        c.conf(),
        format!(
            "{text}on beta {{\n\tsecurity secret\n\tsecretfile {}\n}}\n",
            secret.display()
        ),
    )
    .unwrap();
    let (code, err) = hastd_fails(&c, "beta");
    let line = conf_line(&c, &format!("secretfile {}", secret.display()));
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(&format!(
            "{conf}:{line}: secretfile: {} has mode 0604",
            secret.display()
        )),
        "{err}"
    );
    std::fs::write(c.conf(), text).unwrap();

    // Started right, then loosened and reloaded: refused, the link stays.
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");
    chmod(&k.alpha, 0o644);
    c.signal("alpha", libc::SIGHUP).unwrap();
    wait_log(&c, "alpha", "configuration not reloaded");
    assert!(log_has(
        &c,
        "alpha",
        &format!("keyfile: {} has mode 0644", k.alpha.display())
    ));
    let reference = reference_image(&c);
    write(&c, "alpha", &reference, 0x81, 0, 2 * MIB);
    wait_in_sync(&c, "alpha");
    same_data(&c);
    chmod(&k.alpha, 0o600);
    c.signal("alpha", libc::SIGHUP).unwrap();
    wait_log(&c, "alpha", "configuration reloaded successfully");
    assert!(c.running("alpha") && c.running("beta"));
}

/// New keys and pins on SIGHUP: the running sessions are re-established
/// with them (the secondary shows the primary's new key), whether the key
/// moved to a new file or was replaced in place; data written after is
/// replicated.
#[test]
fn keys_rotated_on_sighup_re_establish_the_session() {
    let mut c = cluster(16 * MIB);
    let k = keys(&c);
    append_conf(&c, &tls_conf(&k));
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");
    assert_eq!(link_lines(&c, "beta").1, k.alpha_fp);
    let reference = reference_image(&c);

    // alpha's key moves to a new file; beta pins it.
    let (new_key, new_fp) = keygen(&c, "alpha", "alpha-2026.key");
    edit_conf(
        &c,
        &format!("keyfile {}", k.alpha.display()),
        &format!("keyfile {}", new_key.display()),
    );
    edit_conf(
        &c,
        &format!("peerfingerprint {}", k.alpha_fp),
        &format!("peerfingerprint {new_fp}"),
    );
    // The primary first: its running session ends at once (the
    // secondary refuses the new key until it reloads too).
    c.signal("alpha", libc::SIGHUP).unwrap();
    wait_log(&c, "alpha", "security settings changed; reconnecting");
    wait_log(
        &c,
        "alpha",
        &format!("the peer's key is {new_fp}, not the pinned {}", k.alpha_fp),
    );
    c.signal("beta", libc::SIGHUP).unwrap();
    c.wait_for("beta shows alpha's new key", T, |c| {
        link_lines(c, "beta").1 == new_fp
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log("beta").unwrap()));
    wait_in_sync(&c, "alpha");
    write(&c, "alpha", &reference, 0x91, 0, 2 * MIB);
    wait_in_sync(&c, "alpha");
    same_data(&c);

    // beta's key replaced in place (same file); alpha pins the new one.
    let out = c
        .hastctl_ok("beta", &["keygen", "-f", &k.beta.display().to_string()])
        .unwrap();
    let beta_fp = out.trim().to_string();
    assert_ne!(beta_fp, k.beta_fp);
    edit_conf(
        &c,
        &format!("peerfingerprint {}", k.beta_fp),
        &format!("peerfingerprint {beta_fp}"),
    );
    let rekeys = log_count(&c, "alpha", "security settings changed; reconnecting");
    c.signal("alpha", libc::SIGHUP).unwrap();
    // The running session ends; beta still presents its old key.
    wait_log(
        &c,
        "alpha",
        &format!(
            "TLS handshake refused: the peer's key is {}, not the pinned {beta_fp}",
            k.beta_fp
        ),
    );
    c.signal("beta", libc::SIGHUP).unwrap();
    c.wait_for("alpha shows beta's new key", T, |c| {
        link_lines(c, "alpha").1 == beta_fp
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log("alpha").unwrap()));
    assert!(log_count(&c, "alpha", "security settings changed; reconnecting") > rekeys);
    wait_in_sync(&c, "alpha");
    write(&c, "alpha", &reference, 0x92, 4 * MIB, 2 * MIB);
    wait_in_sync(&c, "alpha");
    same_data(&c);
    assert!(c.qemu_img_compare("alpha", "r0", &reference).unwrap());
}

// ---------------------------------------------------------------------------
// The control socket

/// `hastctl status` run as nobody (setpriv): its exit code.
fn hastctl_as_nobody(c: &Cluster, node: &str) -> hast_tests::Run {
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(hast_tests::bin("hastctl"))
        .arg("status")
        .arg("-c")
        .arg(c.conf())
        .args(["--node", node])
        .output()
        .unwrap();
    out.into()
}

/// A client running as another user is refused: by the socket's mode
/// as hastd creates it, and, when an administrator loosened the socket,
/// by hastd itself from the client's peer credentials, with a log line.
/// A control socket directory others could write to is refused at start.
#[test]
fn control_socket_refuses_other_users() {
    let mut c = cluster(16 * MIB);
    c.start("alpha").unwrap();
    let ctl = c.dir().join("alpha.ctl");
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket's mode");
    let r = hastctl_as_nobody(&c, "alpha");
    assert_ne!(r.code, 0, "nobody reached hastd: {}", r.stdout);

    // Loosened by hand: nobody can connect, hastd refuses to serve.
    chmod(c.dir(), 0o711);
    chmod(c.conf(), 0o644);
    chmod(&ctl, 0o666);
    let r = hastctl_as_nobody(&c, "alpha");
    assert_ne!(r.code, 0, "nobody was served: {}", r.stdout);
    assert!(!r.stdout.contains("r0"), "{}", r.stdout);
    wait_log(
        &c,
        "alpha",
        "control connection refused: the client runs as uid 65534",
    );
    // Root is served.
    assert_eq!(c.status("alpha").unwrap().len(), 1);
    c.stop("alpha").unwrap();
    chmod(c.dir(), 0o700);

    // At start: a directory that others may write to.
    let open = c.dir().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    edit_conf(
        &c,
        &format!("control uds://{}", ctl.display()),
        &format!("control uds://{}/alpha.ctl", open.display()),
    );
    let (code, err) = hastd_fails(&c, "alpha");
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!(
            "control socket directory {}: mode 0777 lets group or others replace the socket; chmod go-w it",
            open.display()
        )),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// FreeBSD's hastd still pairs

/// A FreeBSD primary (emulated from the bytes it sends: plain version 2,
/// first frame version byte 1, no extension field) pairs with a plain
/// resource of a node whose other resource requires TLS, on the same
/// port, while a TLS primary replicates that other resource; toward the
/// TLS resource the FreeBSD primary is refused with a message.
#[test]
fn plain_freebsd_primary_pairs_next_to_a_tls_resource() {
    use hast_tests::freebsd::{self, HIO_FLUSH, HIO_WRITE};
    let mut c = Cluster::builder(Mode::Netns)
        .resource("r0", 16 * MIB)
        .resource("r1", 16 * MIB)
        .replication("memsync")
        .timeout(5)
        .build()
        .unwrap();
    let k = keys(&c);
    edit_conf(&c, "resource r1 {", "resource r1 {\n\tsecurity tls");
    append_conf(
        &c,
        &format!(
            "on alpha {{\n\tkeyfile {}\n\tpeerfingerprint {}\n}}\n\
             on beta {{\n\tkeyfile {}\n\tpeerfingerprint {}\n}}",
            k.alpha.display(),
            k.beta_fp,
            k.beta.display(),
            k.alpha_fp
        ),
    );
    c.start_all().unwrap();
    c.role("beta", "all", "secondary").unwrap();
    c.role("alpha", "r1", "primary").unwrap();
    c.wait_list("alpha", "r1", T, |s| s.in_sync()).unwrap();

    let beta = beta_addr(&c);
    let connect = move || {
        let s = TcpStream::connect_timeout(&beta, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s
    };
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    let b = block.clone();
    let (answer, replies, refused) = in_netns(&c, "alpha", move || {
        let mut p = freebsd::Primary::connect(connect(), connect, "r0", (0x5eed, 0, 0, true))
            .expect("a FreeBSD primary pairs with the plain resource");
        let w = p
            .request(HIO_WRITE, 1, 8192, &b, 4096, ("none", "none"))
            .unwrap();
        let f = p
            .request(HIO_FLUSH, 2, 0, &[], 0, ("none", "none"))
            .unwrap();
        let answer = p.answer.clone();
        let refused = freebsd::Primary::connect(connect(), connect, "r1", (0x5eed, 0, 0, true))
            .err()
            .map(|e| e.to_string());
        // The session ends when the emulated primary goes.
        drop(p);
        (answer, (w.0, f.0), refused)
    });
    assert_eq!(answer.get_string("errmsg"), None, "{answer:?}");
    assert_eq!(answer.get_u8("syncsrc"), Some(freebsd::SYNCSRC_PRIMARY));
    assert_eq!(replies.0.get_u64("seq"), Some(1));
    assert_eq!(replies.0.get_i16("error"), None, "{:?}", replies.0);
    assert_eq!(replies.1.get_u64("seq"), Some(2));
    assert_eq!(c.read_data("beta", "r0", 8192, 4096).unwrap(), block);
    let refused = refused.expect("the TLS resource refuses a FreeBSD primary");
    assert!(
        refused.contains("resource r1 requires TLS (security tls)")
            && refused.contains("a FreeBSD hastd cannot do TLS"),
        "{refused}"
    );
    // The TLS resource replicated all along, on the same port.
    let s = c.list_res("alpha", "r1").unwrap();
    assert!(s.in_sync(), "{s}");
    assert!(s.raw["security"].starts_with("tls (encrypted"), "{s}");
    let s = c.list_res("beta", "r0").unwrap();
    assert!(
        !s.raw.contains_key("security"),
        "plain r0 prints as FreeBSD's: {s}"
    );
    assert!(c.running("alpha") && c.running("beta"));
}

// ---------------------------------------------------------------------------
// A CA instead of pins

/// A CA (rcgen) and a function that issues node key pairs (PEM) from it.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A key pair for `node` issued by `ca`, written with mode 0600; its key
/// fingerprint.
fn issue(c: &Cluster, ca: &Ca, node: &str, file: &str) -> (PathBuf, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![node.to_string()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    let path = c.dir().join(file);
    std::fs::write(&path, format!("{}{}", key.serialize_pem(), cert.pem())).unwrap();
    chmod(&path, 0o600);
    let out = c
        .hastctl_ok(node, &["fingerprint", &path.display().to_string()])
        .unwrap();
    (path, out.trim().to_string())
}

/// `cafile` instead of pins: keys issued by the CA pair; the primary's
/// key replaced by another the CA issued is taken on SIGHUP by
/// re-establishing the running session; a key from another CA is refused
/// on both sides and writes nothing.
#[test]
fn a_ca_vouches_for_keys_instead_of_pins() {
    let mut c = cluster(16 * MIB);
    let ours = ca("hast test CA");
    let theirs = ca("another CA");
    let ca_file = c.dir().join("ca.pem");
    std::fs::write(&ca_file, &ours.pem).unwrap();
    let (alpha_key, alpha_fp) = issue(&c, &ours, "alpha", "alpha.pem");
    let (beta_key, beta_fp) = issue(&c, &ours, "beta", "beta.pem");
    append_conf(
        &c,
        &format!(
            "security tls\ncafile {}\n\
             on alpha {{\n\tkeyfile {}\n}}\non beta {{\n\tkeyfile {}\n}}",
            ca_file.display(),
            alpha_key.display(),
            beta_key.display()
        ),
    );
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    wait_in_sync(&c, "alpha");
    assert_eq!(link_lines(&c, "alpha").1, beta_fp);
    assert_eq!(link_lines(&c, "beta").1, alpha_fp);

    // A new key for alpha from the same CA: only alpha reloads.
    let (new_key, new_fp) = issue(&c, &ours, "alpha", "alpha-new.pem");
    edit_conf(
        &c,
        &format!("keyfile {}", alpha_key.display()),
        &format!("keyfile {}", new_key.display()),
    );
    c.signal("alpha", libc::SIGHUP).unwrap();
    wait_log(&c, "alpha", "security settings changed; reconnecting");
    c.wait_for("beta shows alpha's new key", T, |c| {
        link_lines(c, "beta").1 == new_fp
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.log("beta").unwrap()));
    wait_in_sync(&c, "alpha");
    let reference = reference_image(&c);
    write(&c, "alpha", &reference, 0xa1, 0, 2 * MIB);
    wait_in_sync(&c, "alpha");
    same_data(&c);

    // A key from another CA.
    c.role("alpha", "r0", "init").unwrap();
    c.wait_list("beta", "r0", T, |s| s.status.is_none())
        .unwrap();
    let before = beta_provider(&c);
    let (foreign, _) = issue(&c, &theirs, "alpha", "foreign.pem");
    edit_conf(
        &c,
        &format!("keyfile {}", new_key.display()),
        &format!("keyfile {}", foreign.display()),
    );
    c.stop("alpha").unwrap();
    refused(
        &mut c,
        &before,
        "peer refused: resource r0: the primary's certificate is refused: the peer's certificate",
        "is not issued by the CA of cafile",
    );
}

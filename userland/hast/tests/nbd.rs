//! The NBD server against real clients (nbdinfo, qemu-io, qemu-img, nbdcopy,
//! fio's nbd engine, python libnbd) and a raw socket for hostile input. Every
//! export lives at an offset inside a provider file framed by guard bytes
//! that must survive every test untouched.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hast::nbd::{
    proto, Backend, BoxFuture, FileBackend, FileOptions, Registry, Server, ServerConfig,
};

/// Bytes before the export inside the provider (HAST's localoff).
const HEAD: u64 = 1 << 20;
/// Bytes after the export.
const TAIL: u64 = 1 << 20;
const HEAD_BYTE: u8 = 0x5A;
const TAIL_BYTE: u8 = 0xA5;
const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    if tool == "python3-libnbd" {
        return Command::new("/usr/bin/python3")
            .args(["-c", "import nbd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Skips the test (with a message saying why) when a client tool is missing.
macro_rules! need {
    ($($tool:expr),+) => {
        $(
            if !have($tool) {
                eprintln!("SKIP: {} is not installed; this test needs it", $tool);
                return;
            }
        )+
    };
}

/// A provider file: HEAD guard bytes, a sparse export area, TAIL guard bytes.
fn make_provider(path: &Path, size: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&vec![HEAD_BYTE; HEAD as usize]).unwrap();
    f.set_len(HEAD + size).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(HEAD + size)).unwrap();
    f.write_all(&vec![TAIL_BYTE; TAIL as usize]).unwrap();
    f.sync_all().unwrap();
}

fn check_guards(path: &Path, size: u64) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(
        data.len() as u64,
        HEAD + size + TAIL,
        "provider size changed"
    );
    assert!(
        data[..HEAD as usize].iter().all(|b| *b == HEAD_BYTE),
        "bytes before the export were overwritten"
    );
    assert!(
        data[(HEAD + size) as usize..]
            .iter()
            .all(|b| *b == TAIL_BYTE),
        "bytes after the export were overwritten"
    );
}

/// Export contents as stored in the provider.
fn export_bytes(path: &Path, off: u64, len: u64) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    data[(HEAD + off) as usize..(HEAD + off + len) as usize].to_vec()
}

struct Harness {
    rt: tokio::runtime::Runtime,
    server: Option<Arc<Server>>,
    registry: Registry,
    dir: tempfile::TempDir,
    sock: PathBuf,
    exports: HashMap<String, (PathBuf, u64)>,
}

impl Harness {
    fn new(exports: &[(&str, u64)]) -> Harness {
        Harness::with_config(exports, ServerConfig::default())
    }

    fn with_config(exports: &[(&str, u64)], config: ServerConfig) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let registry = Registry::new();
        let mut map = HashMap::new();
        for (name, size) in exports {
            let path = dir.path().join(format!("{name}.provider"));
            make_provider(&path, *size);
            let opts = FileOptions {
                offset: HEAD,
                size: Some(*size),
                ..FileOptions::default()
            };
            let b = FileBackend::open(&path, &opts).unwrap();
            registry.add(name, Arc::new(b)).unwrap();
            map.insert(name.to_string(), (path, *size));
        }
        let server = Arc::new(Server::new(registry.clone(), config).unwrap());
        rt.block_on(server.listen_unix(&sock)).unwrap();
        Harness {
            rt,
            server: Some(server),
            registry,
            dir,
            sock,
            exports: map,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn provider(&self, export: &str) -> &Path {
        &self.exports[export].0
    }

    fn check_guards(&self) {
        for (path, size) in self.exports.values() {
            check_guards(path, *size);
        }
    }

    fn server(&self) -> Arc<Server> {
        Arc::clone(self.server.as_ref().unwrap())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await
            });
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(&mut c)
}

fn assert_qemu_io_ok(o: &Output) {
    let t = text(o);
    assert!(o.status.success(), "qemu-io failed: {t}");
    assert!(!t.contains("verification failed"), "pattern mismatch: {t}");
    assert!(!t.contains("error"), "qemu-io reported an error: {t}");
}

const PY_PRELUDE: &str = r#"
import nbd, sys, os
def err(f):
    try:
        f()
        return 0
    except nbd.Error as e:
        return e.errnum if e.errnum is not None else -1
def conn(uri, strict=True):
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h
"#;

/// Runs a python libnbd script; returns its `key=value` output lines.
fn py(script: &str, args: &[&str]) -> HashMap<String, String> {
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!("{PY_PRELUDE}\n{script}"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "python failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A raw NBD client for hostile input.
struct Raw(UnixStream);

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw(s)
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.0.read_exact(&mut v).unwrap();
        v
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_n(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).try_into().unwrap())
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }

    /// Reads the greeting, checks it, sends client flags.
    fn hello(&mut self, flags: u32) {
        assert_eq!(self.u64(), proto::NBDMAGIC);
        assert_eq!(self.u64(), proto::IHAVEOPT);
        assert_eq!(
            self.u16(),
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
        );
        self.send(&flags.to_be_bytes());
    }

    fn opt(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, reply type, data).
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), proto::REPLY_OPT_MAGIC);
        let opt = self.u32();
        let rep = self.u32();
        let len = self.u32();
        let data = self.read_n(len as usize);
        (opt, rep, data)
    }

    fn info_data(name: &str, items: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Full handshake with OPT_GO; returns (size, transmission flags).
    fn go(sock: &Path, name: &str) -> (Raw, u64, u16) {
        let mut r = Raw::connect(sock);
        r.hello(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
        r.opt(
            proto::OPT_GO,
            &Raw::info_data(name, &[proto::INFO_BLOCK_SIZE]),
        );
        let (mut size, mut flags) = (0, 0);
        loop {
            let (opt, rep, data) = r.opt_reply();
            assert_eq!(opt, proto::OPT_GO);
            match rep {
                proto::REP_INFO if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                proto::REP_INFO => {}
                proto::REP_ACK => break,
                other => panic!("GO {name} failed with reply {other:#x}"),
            }
        }
        (r, size, flags)
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let req = proto::NbdRequest {
            magic: proto::REQUEST_MAGIC,
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        let mut b = req.encode().to_vec();
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), proto::SIMPLE_REPLY_MAGIC);
        let e = self.u32();
        (e, self.u64())
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(proto::CMD_WRITE, 0, cookie, offset, data.len() as u32, data);
        let (e, c) = self.reply();
        assert_eq!(c, cookie);
        e
    }

    fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(proto::CMD_READ, 0, cookie, offset, len, &[]);
        let (e, c) = self.reply();
        assert_eq!((e, c), (0, cookie), "read failed");
        self.read_n(len as usize)
    }

    /// True when the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.0.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}

#[test]
fn nbdinfo_shows_exports_size_and_geometry() {
    need!("nbdinfo");
    let h = Harness::new(&[("r0", 64 * MIB), ("r1", 8 * MIB)]);
    let o = run(Command::new("nbdinfo").args(["--size", &h.uri("r0")]));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        (64 * MIB).to_string()
    );

    let o = run(Command::new("nbdinfo").arg(h.uri("r1")));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for line in [
        "export=\"r1\"",
        &format!("export-size: {}", 8 * MIB),
        "block_size_minimum: 512",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "can_multi_conn: true",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "is_read_only: false",
    ] {
        assert!(t.contains(line), "nbdinfo output lacks {line:?}:\n{t}");
    }

    let o = run(Command::new("nbdinfo").args([
        "--list",
        &format!("nbd+unix://?socket={}", h.sock.display()),
    ]));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("export=\"r0\"") && t.contains("export=\"r1\""),
        "{t}"
    );

    let o = run(Command::new("nbdinfo").arg(h.uri("nope")));
    assert!(!o.status.success(), "unknown export accepted: {}", text(&o));
    h.check_guards();
}

#[test]
fn qemu_io_patterns_land_at_localoff() {
    need!("qemu-io");
    let size = 16 * MIB;
    let h = Harness::new(&[("r0", size)]);
    let uri = h.uri("r0");
    let last = format!("write -P 0x33 {} 4k", size - 4096);
    let o = qemu_io(
        &uri,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 128k",
            "write -f -P 0x44 2M 64k",
            &last,
            "flush",
        ],
    );
    assert_qemu_io_ok(&o);
    let lastr = format!("read -P 0x33 {} 4k", size - 4096);
    let o = qemu_io(
        &uri,
        &[
            "read -P 0x11 0 64k",
            "read -P 0x22 1M 128k",
            "read -P 0x44 2M 64k",
            &lastr,
            "read -P 0 64k 960k",
        ],
    );
    assert_qemu_io_ok(&o);
    // The check itself can fail.
    let o = qemu_io(&uri, &["read -P 0x44 0 4k"]);
    assert!(text(&o).contains("verification failed"), "{}", text(&o));

    let p = h.provider("r0");
    assert!(export_bytes(p, 0, 64 << 10).iter().all(|b| *b == 0x11));
    assert!(export_bytes(p, MIB, 128 << 10).iter().all(|b| *b == 0x22));
    assert!(export_bytes(p, 2 * MIB, 64 << 10)
        .iter()
        .all(|b| *b == 0x44));
    assert!(export_bytes(p, size - 4096, 4096)
        .iter()
        .all(|b| *b == 0x33));
    assert!(export_bytes(p, 64 << 10, MIB - (64 << 10))
        .iter()
        .all(|b| *b == 0));
    h.check_guards();
}

#[test]
fn qemu_img_compare_matches_reference_after_writes() {
    need!("qemu-io", "qemu-img");
    let size = 32 * MIB;
    let h = Harness::new(&[("r0", size)]);
    let reference = h.dir.path().join("ref.raw");
    std::fs::File::create(&reference)
        .unwrap()
        .set_len(size)
        .unwrap();
    let cmds = [
        "write -P 0x61 0 1M",
        "write -P 0x62 3M 512",
        "write -P 0x63 5M 2M",
        "write -z 5M 64k",
        "write -P 0x64 10M 4M",
        "discard 11M 1M",
        "write -P 0x65 31M 1M",
        "flush",
    ];
    assert_qemu_io_ok(&qemu_io(&h.uri("r0"), &cmds));
    assert_qemu_io_ok(&qemu_io(reference.to_str().unwrap(), &cmds));
    let cmp = |r: &Path| {
        run(Command::new("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            r.to_str().unwrap(),
            &h.uri("r0"),
        ]))
    };
    let o = cmp(&reference);
    assert_eq!(o.status.code(), Some(0), "images differ: {}", text(&o));
    // One byte off in the reference must be seen.
    assert_qemu_io_ok(&qemu_io(
        reference.to_str().unwrap(),
        &["write -P 0x99 20M 512"],
    ));
    let o = cmp(&reference);
    assert_eq!(
        o.status.code(),
        Some(1),
        "difference not found: {}",
        text(&o)
    );
    h.check_guards();
}

#[test]
fn nbdcopy_both_ways_multi_conn() {
    need!("nbdcopy");
    let size = 32 * MIB;
    let h = Harness::new(&[("r0", size)]);
    let src = h.dir.path().join("src.raw");
    let mut data = vec![0u8; size as usize];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    // A zero stretch so nbdcopy uses zeroing/trim too.
    data[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    // Pre-fill the export so the zero stretch has to be written.
    assert!(
        run(Command::new("nbdcopy").args([src.to_str().unwrap(), &h.uri("r0")]))
            .status
            .success()
    );
    let o = run(Command::new("nbdcopy").args([
        "--connections=4",
        "--requests=16",
        "--flush",
        src.to_str().unwrap(),
        &h.uri("r0"),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        export_bytes(h.provider("r0"), 0, size) == data,
        "provider differs from source"
    );
    let back = h.dir.path().join("back.raw");
    let o = run(Command::new("nbdcopy").args([
        "--connections=4",
        &h.uri("r0"),
        back.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "copy back differs from source"
    );
    h.check_guards();
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    need!("fio");
    let o = run(Command::new("fio").arg("--enghelp=nbd"));
    if !text(&o).contains("uri") {
        eprintln!("SKIP: this fio has no nbd engine");
        return;
    }
    let size = 64 * MIB;
    let h = Harness::new(&[("r0", size)]);
    // fio keeps verify state files in its working directory: the temp dir.
    let o = run(Command::new("fio").current_dir(h.dir.path()).args([
        "--name=nbdjob",
        "--verify_state_save=0",
        "--ioengine=nbd",
        &format!("--uri={}", h.uri("r0")),
        "--rw=randwrite",
        "--bssplit=4k/50:64k/40:1m/10",
        "--iodepth=16",
        "--numjobs=2",
        "--size=16M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--group_reporting",
    ]));
    let t = text(&o);
    assert!(o.status.success(), "fio failed: {t}");
    assert!(t.contains("err= 0"), "fio reported errors: {t}");
    assert!(
        !t.contains("verify failed") && !t.contains("bad magic"),
        "fio verify failure: {t}"
    );
    // fio wrote its blocks into the export: the first 32 MiB are not all zero.
    assert!(export_bytes(h.provider("r0"), 0, 32 * MIB)
        .iter()
        .any(|b| *b != 0));
    h.check_guards();
}

#[test]
fn trim_and_write_zeroes_read_back_zero() {
    need!("python3-libnbd");
    let size = 16 * MIB;
    let h = Harness::new(&[("r0", size)]);
    let path = h.provider("r0").to_str().unwrap().to_string();
    let r = py(
        r#"
uri, path = sys.argv[1], sys.argv[2]
M = 1 << 20
h = conn(uri)
for i in range(5):
    h.pwrite(b'\xee' * M, i * M)
h.flush()
os.sync()
blocks = lambda: os.stat(path).st_blocks * 512
b0 = blocks()
h.trim(M, 0)
b1 = blocks()
h.zero(M, 1 * M)
b2 = blocks()
h.zero(M, 2 * M, nbd.CMD_FLAG_NO_HOLE)
b3 = blocks()
h.zero(4096, 3 * M, nbd.CMD_FLAG_FUA)
h.trim(4096, 4 * M + 8192, nbd.CMD_FLAG_FUA)
z = bytes(M)
print("trim_zero=%d" % (h.pread(M, 0) == z))
print("zero_zero=%d" % (h.pread(M, M) == z))
print("nohole_zero=%d" % (h.pread(M, 2 * M) == z))
print("fua_zero=%d" % (h.pread(4096, 3 * M) == bytes(4096)))
print("fua_rest=%d" % (h.pread(M - 4096, 3 * M + 4096) == b'\xee' * (M - 4096)))
print("trim_edges=%d" % (h.pread(8192, 4 * M) == b'\xee' * 8192 and h.pread(4096, 4 * M + 8192) == bytes(4096) and h.pread(4096, 4 * M + 12288) == b'\xee' * 4096))
print("trim_freed=%d" % (b0 - b1))
print("zero_freed=%d" % (b1 - b2))
print("nohole_freed=%d" % (b2 - b3))
h.shutdown()
"#,
        &[&h.uri("r0"), &path],
    );
    for k in [
        "trim_zero",
        "zero_zero",
        "nohole_zero",
        "fua_zero",
        "fua_rest",
        "trim_edges",
    ] {
        assert_eq!(r[k], "1", "{k}: {r:?}");
    }
    // TRIM and WRITE_ZEROES without NO_HOLE punch holes; NO_HOLE keeps blocks.
    let n = |k: &str| r[k].parse::<i64>().unwrap();
    assert!(n("trim_freed") >= MIB as i64, "trim freed nothing: {r:?}");
    assert!(
        n("zero_freed") >= MIB as i64,
        "zeroing freed nothing: {r:?}"
    );
    assert!(
        n("nohole_freed") <= 0,
        "NO_HOLE zeroing freed blocks: {r:?}"
    );
    let p = h.provider("r0");
    assert!(export_bytes(p, 0, 3 * MIB).iter().all(|b| *b == 0));
    assert!(export_bytes(p, 3 * MIB + 4096, MIB - 4096)
        .iter()
        .all(|b| *b == 0xee));
    h.check_guards();
}

#[test]
fn bad_requests_get_errors_and_the_connection_carries_on() {
    need!("python3-libnbd");
    let size = 8 * MIB;
    let config = ServerConfig {
        max_payload: MIB as u32,
        ..ServerConfig::default()
    };
    let h = Harness::with_config(&[("r0", size)], config);
    let r = py(
        r#"
uri, size = sys.argv[1], int(sys.argv[2])
M = 1 << 20
h = conn(uri, strict=False)
print("misaligned_off=%d" % err(lambda: h.pread(512, 100)))
print("misaligned_len=%d" % err(lambda: h.pread(100, 0)))
print("misaligned_write=%d" % err(lambda: h.pwrite(b'\x77' * 100, 4096)))
print("misaligned_trim=%d" % err(lambda: h.trim(512, 1)))
print("past_end_read=%d" % err(lambda: h.pread(4096, size)))
print("straddle_read=%d" % err(lambda: h.pread(8192, size - 4096)))
print("wrap_read=%d" % err(lambda: h.pread(4096, 2**64 - 4096)))
print("past_end_write=%d" % err(lambda: h.pwrite(b'\x77' * 4096, size)))
print("straddle_write=%d" % err(lambda: h.pwrite(b'\x77' * 8192, size - 4096)))
print("past_end_trim=%d" % err(lambda: h.trim(4096, size)))
print("past_end_zero=%d" % err(lambda: h.zero(4096, size)))
print("big_read=%d" % err(lambda: h.pread(2 * M, 0)))
print("big_write=%d" % err(lambda: h.pwrite(b'\x77' * (2 * M), 0)))
print("bad_flag=%d" % err(lambda: h.pwrite(b'\x77' * 4096, 0, nbd.CMD_FLAG_NO_HOLE)))
print("df_flag=%d" % err(lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF)))
print("big_trim=%d" % err(lambda: h.trim(size, 0)))
h.pwrite(b'\x42' * 4096, 8192)
print("after_ok=%d" % (h.pread(4096, 8192) == b'\x42' * 4096))
h.shutdown()
"#,
        &[&h.uri("r0"), &size.to_string()],
    );
    let expect = [
        ("misaligned_off", 22),
        ("misaligned_len", 22),
        ("misaligned_write", 22),
        ("misaligned_trim", 22),
        ("past_end_read", 22),
        ("straddle_read", 22),
        ("wrap_read", 22),
        ("past_end_write", 28),
        ("straddle_write", 28),
        ("past_end_trim", 22),
        ("past_end_zero", 28),
        ("big_read", 22),
        ("big_write", 22),
        ("bad_flag", 22),
        ("df_flag", 22),
        // TRIM carries no payload: a length over the payload limit is fine.
        ("big_trim", 0),
        ("after_ok", 1),
    ];
    for (k, v) in expect {
        assert_eq!(
            r.get(k).map(String::as_str),
            Some(v.to_string().as_str()),
            "{k}: {r:?}"
        );
    }
    // Only the good write landed (the trim zeroed everything before it).
    let p = h.provider("r0");
    let bytes = export_bytes(p, 0, size);
    assert!(bytes[8192..12288].iter().all(|b| *b == 0x42));
    assert!(
        !bytes.contains(&0x77),
        "a refused write reached the provider"
    );
    h.check_guards();
}

#[test]
fn write_larger_than_32mib_gets_einval_then_disconnect() {
    let size = 8 * MIB;
    let h = Harness::new(&[("r0", size)]);
    let (mut bystander, _, _) = Raw::go(&h.sock, "r0");
    let (mut r, got, _) = Raw::go(&h.sock, "r0");
    assert_eq!(got, size);
    // Header only: 64 MiB of payload announced, none sent.
    r.request(proto::CMD_WRITE, 0, 7, 0, 64 << 20, &[]);
    assert_eq!(r.reply(), (proto::EINVAL, 7));
    assert!(
        r.closed(),
        "connection left open after an unskippable payload"
    );
    // A 32 MiB + 512 read is refused without disconnecting.
    let (mut r2, _, _) = Raw::go(&h.sock, "r0");
    r2.request(proto::CMD_READ, 0, 8, 0, (32 << 20) + 512, &[]);
    assert_eq!(r2.reply(), (proto::EINVAL, 8));
    assert_eq!(r2.read(9, 0, 512), vec![0u8; 512]);
    // Others carry on.
    assert_eq!(bystander.write(1, 4096, &[0x31; 4096]), 0);
    assert_eq!(bystander.read(2, 4096, 4096), vec![0x31; 4096]);
    h.check_guards();
}

#[test]
fn garbage_handshakes_are_dropped_while_a_client_carries_on() {
    let h = Harness::new(&[("r0", 4 * MIB)]);
    let (mut good, _, _) = Raw::go(&h.sock, "r0");

    // Unknown client flag bits.
    let mut r = Raw::connect(&h.sock);
    r.hello(0x80 | proto::FLAG_C_FIXED_NEWSTYLE);
    assert!(r.closed());
    // An HTTP request instead of client flags.
    let mut r = Raw::connect(&h.sock);
    r.read_n(18);
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.closed());
    // Valid flags, then an option with a bad magic.
    let mut r = Raw::connect(&h.sock);
    r.hello(proto::FLAG_C_FIXED_NEWSTYLE);
    r.send(&[0xde; 16]);
    assert!(r.closed());
    // Half an option header, then gone.
    let mut r = Raw::connect(&h.sock);
    r.hello(proto::FLAG_C_FIXED_NEWSTYLE);
    r.send(&proto::IHAVEOPT.to_be_bytes());
    drop(r);
    // Bad request magic in transmission.
    let (mut r, _, _) = Raw::go(&h.sock, "r0");
    let bad = proto::NbdRequest {
        magic: 0x1256_0953,
        flags: 0,
        kind: proto::CMD_READ,
        cookie: 1,
        offset: 0,
        length: 512,
    }
    .encode();
    r.send(&bad);
    assert!(r.closed());

    assert_eq!(good.write(1, 0, &[0x55; 4096]), 0);
    assert_eq!(good.read(2, 0, 4096), vec![0x55; 4096]);
    // And new clients still get in.
    let (mut again, _, _) = Raw::go(&h.sock, "r0");
    assert_eq!(again.read(3, 0, 4096), vec![0x55; 4096]);
    h.check_guards();
}

#[test]
fn options_unknown_list_info_and_unknown_export() {
    let h = Harness::new(&[("r0", 4 * MIB), ("r1", 2 * MIB)]);
    let mut r = Raw::connect(&h.sock);
    r.hello(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);

    r.opt(99, b"some data");
    assert_eq!(r.opt_reply().1, proto::REP_ERR_UNSUP);
    r.opt(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.opt_reply().1, proto::REP_ERR_UNSUP);
    r.opt(proto::OPT_STARTTLS, &[]);
    assert_eq!(r.opt_reply().1, proto::REP_ERR_UNSUP);
    r.opt(proto::OPT_LIST, b"x");
    assert_eq!(r.opt_reply().1, proto::REP_ERR_INVALID);

    r.opt(proto::OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (opt, rep, data) = r.opt_reply();
        assert_eq!(opt, proto::OPT_LIST);
        if rep == proto::REP_ACK {
            break;
        }
        assert_eq!(rep, proto::REP_SERVER);
        let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, ["r0", "r1"]);

    r.opt(proto::OPT_INFO, &Raw::info_data("nope", &[]));
    assert_eq!(r.opt_reply().1, proto::REP_ERR_UNKNOWN);
    // The empty (default) name is ambiguous with two exports.
    r.opt(proto::OPT_GO, &Raw::info_data("", &[]));
    assert_eq!(r.opt_reply().1, proto::REP_ERR_UNKNOWN);
    // Name length pointing past the data.
    let mut bad = Raw::info_data("r1", &[]);
    bad[3] = 200;
    r.opt(proto::OPT_INFO, &bad);
    assert_eq!(r.opt_reply().1, proto::REP_ERR_INVALID);

    r.opt(
        proto::OPT_INFO,
        &Raw::info_data("r1", &[proto::INFO_NAME, proto::INFO_BLOCK_SIZE]),
    );
    let mut seen = HashMap::new();
    loop {
        let (opt, rep, data) = r.opt_reply();
        assert_eq!(opt, proto::OPT_INFO);
        if rep == proto::REP_ACK {
            break;
        }
        assert_eq!(rep, proto::REP_INFO);
        seen.insert(
            u16::from_be_bytes(data[..2].try_into().unwrap()),
            data[2..].to_vec(),
        );
    }
    let export = &seen[&proto::INFO_EXPORT];
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 2 * MIB);
    let flags = u16::from_be_bytes(export[8..10].try_into().unwrap());
    let want = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    let bs = &seen[&proto::INFO_BLOCK_SIZE];
    let word = |i: usize| u32::from_be_bytes(bs[i..i + 4].try_into().unwrap());
    assert_eq!((word(0), word(4), word(8)), (512, 4096, 32 << 20));
    assert_eq!(seen[&proto::INFO_NAME], b"r1");

    // EXPORT_NAME cannot report an error: unknown name -> disconnect.
    r.opt(proto::OPT_EXPORT_NAME, b"nope");
    assert!(r.closed());

    // EXPORT_NAME without NO_ZEROES: size, flags, 124 zero bytes, then data.
    let mut r = Raw::connect(&h.sock);
    r.hello(proto::FLAG_C_FIXED_NEWSTYLE);
    r.opt(proto::OPT_EXPORT_NAME, b"r0");
    assert_eq!(r.u64(), 4 * MIB);
    assert_eq!(r.u16(), want);
    assert_eq!(r.read_n(124), vec![0u8; 124]);
    assert_eq!(r.read(1, 0, 4096), vec![0u8; 4096]);
    r.request(proto::CMD_DISC, 0, 2, 0, 0, &[]);
    assert!(r.closed());

    // ABORT is acknowledged, then the server closes.
    let mut r = Raw::connect(&h.sock);
    r.hello(proto::FLAG_C_FIXED_NEWSTYLE);
    r.opt(proto::OPT_ABORT, &[]);
    assert_eq!(r.opt_reply().1, proto::REP_ACK);
    assert!(r.closed());
}

#[test]
fn unknown_export_refused_by_libnbd() {
    need!("python3-libnbd");
    let h = Harness::new(&[("r0", 4 * MIB)]);
    let r = py(
        r#"
h = nbd.NBD()
try:
    h.connect_uri(sys.argv[1])
    print("connected=1")
except nbd.Error as e:
    print("connected=0")
"#,
        &[&h.uri("nope")],
    );
    assert_eq!(r["connected"], "0");
    // The single export is the default one.
    let r = py(
        r#"
h = nbd.NBD()
h.set_full_info(True)
h.connect_uri(sys.argv[1])
print("size=%d" % h.get_size())
print("name=%s" % h.get_canonical_export_name())
"#,
        &[&format!("nbd+unix://?socket={}", h.sock.display())],
    );
    assert_eq!(r["size"], (4 * MIB).to_string());
    assert_eq!(r["name"], "r0");
}

#[test]
fn client_vanishing_mid_request_does_not_disturb_others() {
    need!("python3-libnbd");
    let size = 16 * MIB;
    let h = Harness::new(&[("r0", size)]);
    let (mut survivor, _, _) = Raw::go(&h.sock, "r0");
    assert_eq!(survivor.write(1, 0, &[0x10; 4096]), 0);

    // Half a write payload, then the socket is closed.
    let (mut r, _, _) = Raw::go(&h.sock, "r0");
    r.request(
        proto::CMD_WRITE,
        0,
        1,
        4 * MIB,
        MIB as u32,
        &vec![0xcc; (MIB / 2) as usize],
    );
    drop(r);

    // A real client killed with SIGKILL while many writes are in flight.
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(format!(
            "{PY_PRELUDE}\n{}",
            r#"
h = conn(sys.argv[1])
M = 1 << 20
buf = b'\xdd' * M
i = 0
print("ready", flush=True)
while True:
    cookies = [h.aio_pwrite(buf, 8 * M + (k % 8) * M) for k in range(16)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
"#
        ))
        .arg(h.uri("r0"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();

    // The survivor is unaffected.
    assert_eq!(survivor.read(2, 0, 4096), vec![0x10; 4096]);
    assert_eq!(survivor.write(3, 4096, &[0x11; 4096]), 0);
    assert_eq!(survivor.read(4, 4096, 4096), vec![0x11; 4096]);
    // The half-sent write never landed.
    assert_eq!(
        survivor.read(5, 4 * MIB, MIB as u32),
        vec![0u8; MIB as usize]
    );
    let p = h.provider("r0");
    assert!(export_bytes(p, 4 * MIB, MIB).iter().all(|b| *b == 0));
    // The killed client's writes stayed inside its range.
    let all = export_bytes(p, 0, size);
    assert!(all[..(8 * MIB) as usize].iter().all(|b| *b != 0xdd));
    assert!(all[(8 * MIB) as usize..]
        .iter()
        .all(|b| *b == 0xdd || *b == 0));
    h.check_guards();
}

/// A file backend whose writes wait at a gate the test opens.
struct Gated {
    inner: FileBackend,
    gate: Arc<tokio::sync::Semaphore>,
    entered: Arc<AtomicUsize>,
}

impl Backend for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read(&self, off: u64, len: u32) -> BoxFuture<'_, std::io::Result<Vec<u8>>> {
        self.inner.read(off, len)
    }
    fn write(&self, off: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async move {
            self.entered.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
            self.inner.write(off, data, fua).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.flush()
    }
    fn trim(&self, off: u64, len: u32, fua: bool) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.trim(off, len, fua)
    }
    fn write_zeroes(
        &self,
        off: u64,
        len: u32,
        nh: bool,
        fua: bool,
    ) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.write_zeroes(off, len, nh, fua)
    }
}

fn add_gated(
    h: &Harness,
    name: &str,
    size: u64,
) -> (PathBuf, Arc<tokio::sync::Semaphore>, Arc<AtomicUsize>) {
    let path = h.dir.path().join(format!("{name}.provider"));
    make_provider(&path, size);
    let opts = FileOptions {
        offset: HEAD,
        size: Some(size),
        ..FileOptions::default()
    };
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let b = Gated {
        inner: FileBackend::open(&path, &opts).unwrap(),
        gate: Arc::clone(&gate),
        entered: Arc::clone(&entered),
    };
    h.registry.add(name, Arc::new(b)).unwrap();
    (path, gate, entered)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn shutdown_finishes_in_flight_requests_then_disconnects() {
    let size = 4 * MIB;
    let h = Harness::new(&[]);
    let (path, gate, entered) = add_gated(&h, "slow", size);
    let (mut c, _, _) = Raw::go(&h.sock, "slow");
    c.request(
        proto::CMD_WRITE,
        proto::CMD_FLAG_FUA,
        41,
        0,
        4096,
        &[0xab; 4096],
    );
    c.request(proto::CMD_WRITE, 0, 42, 8192, 4096, &[0xac; 4096]);
    wait_until("both writes in the backend", || {
        entered.load(Ordering::SeqCst) == 2
    });

    let server = h.server();
    let stop = h.rt.spawn(async move { server.shutdown().await });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !stop.is_finished(),
        "shutdown did not wait for in-flight requests"
    );
    // No new clients once stopping.
    wait_until("listener to close", || {
        UnixStream::connect(&h.sock).is_err()
    });

    gate.add_permits(2);
    let mut got = vec![c.reply(), c.reply()];
    got.sort();
    assert_eq!(got, vec![(0, 41), (0, 42)]);
    assert!(c.closed(), "client not disconnected after the drain");
    wait_until("shutdown to finish", || stop.is_finished());
    assert_eq!(export_bytes(&path, 0, 4096), vec![0xab; 4096]);
    assert_eq!(export_bytes(&path, 8192, 4096), vec![0xac; 4096]);
    check_guards(&path, size);
}

#[test]
fn exports_added_and_removed_at_run_time() {
    need!("qemu-io");
    let h = Harness::new(&[("r0", 4 * MIB), ("r1", 4 * MIB)]);
    let (mut on_r1, _, _) = Raw::go(&h.sock, "r1");
    let (mut on_r0, _, _) = Raw::go(&h.sock, "r0");
    assert_eq!(on_r1.write(1, 0, &[0x71; 4096]), 0);

    let registry = h.registry.clone();
    let removed =
        h.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), registry.remove("r1")).await
        })
        .expect("removing r1 did not finish");
    assert!(removed);
    assert!(on_r1.closed(), "client of a removed export still connected");
    assert!(!h.registry.contains("r1"));
    assert_eq!(on_r0.write(2, 0, &[0x70; 4096]), 0);
    assert_eq!(on_r0.read(3, 0, 4096), vec![0x70; 4096]);
    let o = qemu_io(&h.uri("r1"), &["read 0 4k"]);
    assert!(
        !o.status.success(),
        "removed export still served: {}",
        text(&o)
    );

    // A new export appears without restarting anything.
    let path = h.dir.path().join("r2.provider");
    make_provider(&path, 2 * MIB);
    let opts = FileOptions {
        offset: HEAD,
        ..FileOptions::default()
    };
    // Without an explicit size the export runs to the end of the file.
    let b = FileBackend::open(&path, &opts).unwrap();
    assert_eq!(b.size(), 2 * MIB + TAIL);
    let opts = FileOptions {
        size: Some(2 * MIB),
        ..opts
    };
    h.registry
        .add("r2", Arc::new(FileBackend::open(&path, &opts).unwrap()))
        .unwrap();
    assert!(h
        .registry
        .add("r2", Arc::new(FileBackend::open(&path, &opts).unwrap()))
        .is_err());
    assert_qemu_io_ok(&qemu_io(
        &h.uri("r2"),
        &["write -P 0x72 1M 64k", "read -P 0x72 1M 64k"],
    ));
    assert!(export_bytes(&path, MIB, 64 << 10)
        .iter()
        .all(|b| *b == 0x72));
    check_guards(&path, 2 * MIB);
    h.check_guards();
    assert_eq!(
        export_bytes(h.provider("r1"), 0, 4096),
        vec![0x71; 4096],
        "write acknowledged before removal is missing"
    );
}

#[test]
fn tcp_listener_serves_qemu_io_and_nbdinfo() {
    need!("qemu-io", "nbdinfo");
    let h = Harness::new(&[("r0", 8 * MIB)]);
    let addr = h.rt.block_on(h.server().listen_tcp("127.0.0.1:0")).unwrap();
    let uri = format!("nbd://127.0.0.1:{}/r0", addr.port());
    let o = run(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        (8 * MIB).to_string(),
        "{}",
        text(&o)
    );
    assert_qemu_io_ok(&qemu_io(
        &uri,
        &["write -P 0x5c 2M 1M", "read -P 0x5c 2M 1M"],
    ));
    assert!(export_bytes(h.provider("r0"), 2 * MIB, MIB)
        .iter()
        .all(|b| *b == 0x5c));
    h.check_guards();
}

#[test]
fn read_only_export_refuses_writes() {
    need!("python3-libnbd");
    let h = Harness::new(&[]);
    let path = h.dir.path().join("ro.provider");
    make_provider(&path, 2 * MIB);
    let opts = FileOptions {
        offset: HEAD,
        size: Some(2 * MIB),
        read_only: true,
        ..FileOptions::default()
    };
    h.registry
        .add("ro", Arc::new(FileBackend::open(&path, &opts).unwrap()))
        .unwrap();
    let r = py(
        r#"
h = conn(sys.argv[1], strict=False)
print("ro=%d" % h.is_read_only())
print("write=%d" % err(lambda: h.pwrite(b'\x01' * 4096, 0)))
print("zero=%d" % err(lambda: h.zero(4096, 0)))
print("read=%d" % (h.pread(4096, 0) == bytes(4096)))
"#,
        &[&h.uri("ro")],
    );
    assert_eq!(r["ro"], "1");
    assert_eq!(r["write"], "1");
    assert_eq!(r["zero"], "1");
    assert_eq!(r["read"], "1");
    check_guards(&path, 2 * MIB);
}

/// A loop device, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_provider_with_4k_sectors() {
    need!("losetup", "python3-libnbd", "nbdinfo");
    let h = Harness::new(&[]);
    let backing = h.dir.path().join("loop.img");
    let size = 8 * MIB;
    make_provider(&backing, size);
    let o = run(Command::new("losetup").args([
        "-f",
        "--show",
        "-b",
        "4096",
        backing.to_str().unwrap(),
    ]));
    if !o.status.success() {
        eprintln!(
            "SKIP: cannot attach a loop device here: {}",
            text(&o).trim()
        );
        return;
    }
    let dev = Loop(String::from_utf8_lossy(&o.stdout).trim().to_string());
    let opts = FileOptions {
        offset: HEAD,
        size: Some(size),
        ..FileOptions::default()
    };
    let b = FileBackend::open(Path::new(&dev.0), &opts).unwrap();
    assert_eq!(b.block_size(), 4096);
    h.registry.add("blk", Arc::new(b)).unwrap();

    let o = run(Command::new("nbdinfo").arg(h.uri("blk")));
    assert!(
        text(&o).contains("block_size_minimum: 4096"),
        "{}",
        text(&o)
    );
    let r = py(
        r#"
M = 1 << 20
h = conn(sys.argv[1], strict=False)
h.pwrite(b'\xb1' * (3 * M), 0)
h.flush()
print("misaligned=%d" % err(lambda: h.pread(512, 0)))
h.trim(M, 0)
h.zero(M, M, nbd.CMD_FLAG_NO_HOLE)
print("trim_zero=%d" % (h.pread(M, 0) == bytes(M)))
print("zero_zero=%d" % (h.pread(M, M) == bytes(M)))
print("kept=%d" % (h.pread(M, 2 * M) == b'\xb1' * M))
h.flush()
"#,
        &[&h.uri("blk")],
    );
    assert_eq!(r["misaligned"], "22");
    assert_eq!(r["trim_zero"], "1");
    assert_eq!(r["zero_zero"], "1");
    assert_eq!(r["kept"], "1");
    let server = h.server();
    h.rt.block_on(server.shutdown());
    drop(dev);
    assert!(export_bytes(&backing, 2 * MIB, MIB)
        .iter()
        .all(|b| *b == 0xb1));
    check_guards(&backing, size);
}

fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("examples").join("nbd_serve");
    assert!(
        bin.is_file(),
        "{} not built (cargo test builds examples)",
        bin.display()
    );
    bin
}

#[test]
fn example_binary_serves_a_file_and_stops_on_sigterm() {
    need!("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let size = 4 * MIB;
    make_provider(&file, size);
    let sock = dir.path().join("s.sock");
    let mut child = Command::new(example_binary())
        .args([
            "--file",
            file.to_str().unwrap(),
            "--export",
            "disk",
            "--unix",
        ])
        .arg(&sock)
        .args(["--offset", &HEAD.to_string(), "--size", &size.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    let mut line = String::new();
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
    }
    let mut guard = Kill(child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    assert!(line.starts_with("listening unix:"), "{line}");
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    assert_qemu_io_ok(&qemu_io(
        &uri,
        &["write -P 0x3c 0 128k", "read -P 0x3c 0 128k"],
    ));
    assert!(export_bytes(&file, 0, 128 << 10).iter().all(|b| *b == 0x3c));

    let pid = nix::unistd::Pid::from_raw(guard.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = guard.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "nbd_serve ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket file left behind");
    check_guards(&file, size);

    // Bad arguments: usage error, exit 64.
    let o = run(Command::new(example_binary()).args(["--file", "x"]));
    assert_eq!(o.status.code(), Some(64));
    assert!(text(&o).contains("usage"));
}

#[test]
fn nbdfuse_file_reads_and_writes_through_the_server() {
    need!("nbdfuse", "fusermount3");
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse is missing; nbdfuse cannot mount");
        return;
    }
    let size = 8 * MIB;
    let h = Harness::new(&[("r0", size)]);
    let mnt = h.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let child = Command::new("nbdfuse")
        .arg(mnt.join("disk"))
        .arg(h.uri("r0"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Mount(std::process::Child, PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.1).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut m = Mount(child, mnt.clone());
    let disk = mnt.join("disk");
    let t = Instant::now();
    while std::fs::metadata(&disk).map(|md| md.len()).unwrap_or(0) != size {
        if let Ok(Some(s)) = m.0.try_wait() {
            let mut e = String::new();
            m.0.stderr.take().unwrap().read_to_string(&mut e).unwrap();
            eprintln!("SKIP: nbdfuse could not mount here ({s}): {e}");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "nbdfuse file never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        f.write_all_at(&data, 3 * MIB).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 3 * MIB).unwrap();
        assert!(back == data, "read back through nbdfuse differs");
    }
    drop(m);
    assert!(export_bytes(h.provider("r0"), 3 * MIB, 2 * MIB) == data);
    h.check_guards();
}

/// A file backend that fails some requests: errors at chosen offsets, and a
/// panic (a broken backend must still not leave a client waiting).
struct Faulty {
    inner: FileBackend,
}

impl Backend for Faulty {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read(&self, off: u64, len: u32) -> BoxFuture<'_, std::io::Result<Vec<u8>>> {
        match off {
            0 => Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::EIO)) }),
            4096 => Box::pin(async { panic!("backend bug at 4096 (expected by the test)") }),
            _ => self.inner.read(off, len),
        }
    }
    fn write(&self, off: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'_, std::io::Result<()>> {
        match off {
            0 => Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::EDQUOT)) }),
            _ => self.inner.write(off, data, fua),
        }
    }
    fn flush(&self) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::EIO)) })
    }
    fn trim(&self, off: u64, len: u32, fua: bool) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.trim(off, len, fua)
    }
    fn write_zeroes(
        &self,
        off: u64,
        len: u32,
        nh: bool,
        fua: bool,
    ) -> BoxFuture<'_, std::io::Result<()>> {
        self.inner.write_zeroes(off, len, nh, fua)
    }
}

#[test]
fn backend_errors_and_panics_become_nbd_errors() {
    let h = Harness::new(&[]);
    let path = h.dir.path().join("faulty.provider");
    make_provider(&path, MIB);
    let opts = FileOptions {
        offset: HEAD,
        size: Some(MIB),
        ..FileOptions::default()
    };
    let b = Faulty {
        inner: FileBackend::open(&path, &opts).unwrap(),
    };
    h.registry.add("f", Arc::new(b)).unwrap();
    let (mut c, _, _) = Raw::go(&h.sock, "f");
    c.request(proto::CMD_READ, 0, 1, 0, 4096, &[]);
    assert_eq!(c.reply(), (proto::EIO, 1), "no payload may follow an error");
    c.request(proto::CMD_READ, 0, 2, 4096, 4096, &[]);
    assert_eq!(c.reply(), (proto::EIO, 2));
    // EDQUOT maps to ENOSPC (proto.md "Error values").
    assert_eq!(c.write(3, 0, &[1; 4096]), proto::ENOSPC);
    c.request(proto::CMD_FLUSH, 0, 4, 0, 0, &[]);
    assert_eq!(c.reply(), (proto::EIO, 4));
    // The connection carries on.
    assert_eq!(c.write(5, 8192, &[0x66; 4096]), 0);
    assert_eq!(c.read(6, 8192, 4096), vec![0x66; 4096]);
    assert_eq!(export_bytes(&path, 0, 4096), vec![0; 4096]);
    check_guards(&path, MIB);
}

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    let config = ServerConfig {
        handshake_timeout: Some(Duration::from_millis(1500)),
        ..ServerConfig::default()
    };
    let h = Harness::with_config(&[("r0", MIB)], config);
    let t = Instant::now();
    let mut idle = Raw::connect(&h.sock);
    idle.read_n(18);
    assert!(idle.closed(), "silent client kept");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
    // The timeout ends with the handshake: a client in transmission stays.
    let (mut c, _, _) = Raw::go(&h.sock, "r0");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(c.read(1, 0, 512), vec![0u8; 512]);
}

#[test]
fn provider_geometry_is_checked_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let open = |offset, size, block_size| {
        FileBackend::open(
            &path,
            &FileOptions {
                offset,
                size,
                block_size,
                read_only: false,
            },
        )
    };
    let ok = open(MIB, None, None).unwrap();
    assert_eq!((ok.size(), ok.block_size()), (3 * MIB, 512));
    // Odd tail rounded down to the block size.
    let ok = open(MIB + 512, None, Some(4096)).unwrap();
    assert_eq!(ok.size(), 3 * MIB - 4096);
    let msg = |r: Result<FileBackend, hast::nbd::NbdError>| r.unwrap_err().to_string();
    assert!(msg(open(5 * MIB, None, None)).contains("beyond its end"));
    assert!(msg(open(MIB, Some(3 * MIB + 512), None)).contains("does not fit"));
    assert!(msg(open(0, Some(1000), None)).contains("not a multiple"));
    assert!(msg(open(4 * MIB, None, None)).contains("no room"));
    assert!(msg(open(0, None, Some(3000))).contains("power of two"));
    let e = FileBackend::open(dir.path(), &FileOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot open") || e.contains("neither"), "{e}");
    let e = FileBackend::open(&dir.path().join("missing"), &FileOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot open provider") && e.contains("missing"),
        "{e}"
    );
    // Export names and geometry are checked by the registry.
    let reg = Registry::new();
    let b = Arc::new(open(0, None, None).unwrap());
    assert!(reg.add("", b.clone()).is_err());
    assert!(reg.add("a\0b", b.clone()).is_err());
    assert!(reg.add(&"x".repeat(4097), b.clone()).is_err());
    reg.add("ok", b).unwrap();
    assert_eq!(reg.names(), ["ok"]);
}

#[test]
fn serve_stream_speaks_nbd_on_a_socketpair() {
    let h = Harness::new(&[("r0", MIB)]);
    let (ours, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let server = h.server();
    h.rt.block_on(async move {
        let s = tokio::net::UnixStream::from_std(theirs).unwrap();
        server.serve_stream(s);
    });
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut r = Raw(ours);
    r.hello(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
    r.opt(proto::OPT_EXPORT_NAME, b"r0");
    assert_eq!(r.u64(), MIB);
    r.u16();
    assert_eq!(r.write(1, 512, &[0x2b; 512]), 0);
    assert_eq!(r.read(2, 512, 512), vec![0x2b; 512]);
    assert_eq!(export_bytes(h.provider("r0"), 512, 512), vec![0x2b; 512]);
    r.request(proto::CMD_DISC, 0, 3, 0, 0, &[]);
    assert!(r.closed());
}

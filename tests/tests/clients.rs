//! Real NBD clients against a degraded primary's export: qemu-io write and
//! read patterns, qemu-img compare with a reference image, nbdcopy in and
//! out, fio's nbd engine verifying crc32c, ext4 through nbdfuse and a loop
//! device, two python libnbd multi-conn clients writing interleaved regions,
//! and the TCP export. Every test checks the bytes in the provider file (at
//! localoff and nowhere else), the on-disk activemap and metadata, and what
//! `hastctl` reports.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hast_tests::export::{
    expected_map, extents_of, ok, python_has_nbd, qemu_io, rand_bytes, stamped, CLIENT_TIME,
    IDLE_QUEUES, MIB, PY_STAMP,
};
use hast_tests::{
    have, list_field, list_number, python_spawn, run_timeout, wait_for, ChildGuard, RawNbd, Solo,
    SoloOpts,
};

/// A write issued both through the export and to a reference file.
enum Wr {
    Pattern(u64, u64, u8),
    File(u64, u64, PathBuf),
    /// `write -z`: NBD_CMD_WRITE_ZEROES.
    Zero(u64, u64),
}

impl Wr {
    fn cmd(&self) -> String {
        match self {
            Wr::Pattern(o, l, p) => format!("write -P {p:#x} {o} {l}"),
            Wr::File(o, l, f) => format!("write -s {} {o} {l}", f.display()),
            Wr::Zero(o, l) => format!("write -z {o} {l}"),
        }
    }
    fn range(&self) -> (u64, u64) {
        match self {
            Wr::Pattern(o, l, _) | Wr::File(o, l, _) | Wr::Zero(o, l) => (*o, *l),
        }
    }
    fn apply(&self, model: &mut [u8], base: u64) {
        let (o, l) = self.range();
        let dst = &mut model[(base + o) as usize..(base + o + l) as usize];
        match self {
            Wr::Pattern(_, _, p) => dst.fill(*p),
            Wr::File(_, _, f) => dst.copy_from_slice(&fs::read(f).unwrap()[..l as usize]),
            Wr::Zero(..) => dst.fill(0),
        }
    }
}

/// Several offsets and sizes: crossing extent boundaries (2 MiB extents),
/// unaligned (qemu does read-modify-write), overlapping, random data from a
/// file, and the last sector of the export.
fn write_set(dir: &Path, datasize: u64) -> Vec<Wr> {
    let rnd = dir.join("random.bin");
    fs::write(&rnd, rand_bytes(128 << 10, 7)).unwrap();
    vec![
        Wr::Pattern(0, 64 << 10, 0x11),
        Wr::Pattern(3 * MIB / 2, 3 * MIB, 0x33),
        Wr::Pattern(2 * MIB - 4096, 8192, 0x22),
        Wr::Pattern(1000, 3000, 0x44),
        Wr::File(10 * MIB + 512, 128 << 10, rnd),
        Wr::Pattern(datasize - 512, 512, 0x66),
        Wr::Pattern(20 * MIB, MIB, 0x77),
        Wr::Pattern(20 * MIB + 4096, 4096, 0x78),
        Wr::Zero(20 * MIB + (64 << 10), 64 << 10),
    ]
}

#[test]
fn qemu_io_patterns_land_at_localoff_and_nowhere_else() {
    let s = Solo::new(64 * MIB, &[]);
    let (localoff, datasize, es) = s.geometry();
    assert_eq!((localoff, datasize, es), (4608, 64 * MIB - 4608, 2 * MIB));
    let dump_before = s.dump();
    assert!(dump_before.contains("    localcnt: 0\n"), "{dump_before}");
    let before = s.image();
    let writes = write_set(&s.dir, datasize);
    let mut cmds: Vec<String> = writes.iter().map(Wr::cmd).collect();
    // Read back what must be there after the overlaps.
    let mb = MIB;
    for (p, o, l) in [
        (0x11, 0, 1000),
        (0x44, 1000, 3000),
        (0x11, 4000, (64 << 10) - 4000),
        (0x33, 3 * mb / 2, mb / 2 - 4096),
        (0x22, 2 * mb - 4096, 8192),
        (0x33, 2 * mb + 4096, 5 * mb / 2 - 4096),
        (0x66, datasize - 512, 512),
        (0x77, 20 * mb, 4096),
        (0x78, 20 * mb + 4096, 4096),
        (0x77, 20 * mb + 8192, (64 << 10) - 8192),
        (0x00, 20 * mb + (64 << 10), 64 << 10),
        (0x77, 20 * mb + (128 << 10), mb - (128 << 10)),
        (0x00, 30 * mb, 64 << 10),
        (0x00, 64 << 10, 3 * mb / 2 - (64 << 10)),
    ] {
        cmds.push(format!("read -P {p:#x} {o} {l}"));
    }
    let r = qemu_io(&s.uri(), &cmds);
    ok(&r, "qemu-io on the export");
    assert!(!r.stdout.contains("failed"), "{}", r.stdout);
    assert_eq!(
        r.stdout.matches("wrote ").count(),
        writes.len(),
        "{}",
        r.stdout
    );
    assert_eq!(r.stdout.matches("read ").count(), 14, "{}", r.stdout);

    // The provider: data area = model; map = the touched extents; file
    // size unchanged.
    let after = s.image();
    assert_eq!(after.len(), before.len(), "the provider changed size");
    let mut model = before.clone();
    let mut touched = BTreeSet::new();
    for wr in &writes {
        wr.apply(&mut model, localoff);
        let (o, l) = wr.range();
        touched.extend(extents_of(o, l, es));
    }
    assert_eq!(
        touched,
        [0, 1, 2, 5, 10, 31].into_iter().collect::<BTreeSet<u64>>()
    );
    let lo = localoff as usize;
    if after[lo..] != model[lo..] {
        let first = (lo..after.len()).find(|&i| after[i] != model[i]).unwrap();
        panic!(
            "data area differs from the model first at file offset {first} (export offset {}): got {:#x}, want {:#x}",
            first - lo,
            after[first],
            model[first]
        );
    }
    assert_eq!(
        after[4096..lo],
        expected_map(localoff, &touched)[..],
        "on-disk activemap is not exactly the written extents"
    );
    // Metadata: only localcnt changed (bumped once by the first write).
    assert_eq!(
        s.dump(),
        dump_before.replace("    localcnt: 0\n", "    localcnt: 1\n")
    );
    let l = s.list();
    assert_eq!(
        list_number(&l, "dirty"),
        Some(touched.len() as u64 * es),
        "{l}"
    );
}

#[test]
fn qemu_img_compare_with_a_reference_image() {
    let s = Solo::new(64 * MIB, &[]);
    let (localoff, datasize, _) = s.geometry();
    let reference = s.dir.join("ref.img");
    hast_tests::sparse_file(&reference, datasize);
    let writes = write_set(&s.dir, datasize);
    let cmds: Vec<String> = writes.iter().map(Wr::cmd).collect();
    ok(&qemu_io(&s.uri(), &cmds), "qemu-io on the export");
    ok(
        &qemu_io(reference.to_str().unwrap(), &cmds),
        "qemu-io on the reference",
    );
    let compare = || {
        run_timeout(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(&reference)
                .arg(s.uri()),
            CLIENT_TIME,
        )
    };
    let r = compare();
    ok(&r, "qemu-img compare");
    assert!(r.stdout.contains("Images are identical"), "{}", r.stdout);

    // One byte changed in the provider's data area is seen at its export
    // offset.
    let x = 20 * MIB + 12345;
    let f = fs::OpenOptions::new().write(true).open(&s.img).unwrap();
    f.write_at(&[0x77 ^ 0xff], localoff + x).unwrap();
    let r = compare();
    assert_eq!(r.code, 1, "a differing byte not detected: {r:?}");
    let at: u64 = r
        .stdout
        .split("Content mismatch at offset ")
        .nth(1)
        .and_then(|t| t.split('!').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no mismatch offset in {:?}", r.stdout));
    assert!(
        at <= x && x - at < 512,
        "mismatch reported at {at}, changed byte at {x}"
    );
    f.write_at(&[0x77], localoff + x).unwrap();
    ok(&compare(), "qemu-img compare after restoring the byte");
}

#[test]
fn nbdcopy_in_and_out() {
    let s = Solo::new(32 * MIB, &[]);
    let (localoff, datasize, _) = s.geometry();
    // First the whole export 0xff, then a random source with two holes:
    // nbdcopy zeroes those (WRITE_ZEROES or TRIM+zero) over the 0xff.
    let ones = s.dir.join("ones.bin");
    fs::write(&ones, vec![0xffu8; datasize as usize]).unwrap();
    let nbdcopy =
        |a: &str, b: &str| run_timeout(Command::new("nbdcopy").arg(a).arg(b), CLIENT_TIME);
    ok(
        &nbdcopy(ones.to_str().unwrap(), &s.uri()),
        "nbdcopy 0xff in",
    );

    let src = s.dir.join("src.bin");
    let data = {
        let mut d = rand_bytes(datasize as usize, 42);
        d[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
        let tail = datasize as usize - (300 << 10);
        d[tail..].fill(0);
        d
    };
    {
        // Leave the zero ranges as real holes in the source file.
        let f = fs::File::create(&src).unwrap();
        f.set_len(datasize).unwrap();
        f.write_at(&data[..(5 * MIB) as usize], 0).unwrap();
        let tail = datasize as usize - (300 << 10);
        f.write_at(&data[(6 * MIB) as usize..tail], 6 * MIB)
            .unwrap();
    }
    ok(
        &nbdcopy(src.to_str().unwrap(), &s.uri()),
        "nbdcopy file -> export",
    );
    let img = s.image();
    assert!(
        img[localoff as usize..] == data[..],
        "provider data area differs from the copied file"
    );
    let back = s.dir.join("back.bin");
    hast_tests::sparse_file(&back, datasize);
    ok(
        &nbdcopy(&s.uri(), back.to_str().unwrap()),
        "nbdcopy export -> file",
    );
    assert!(fs::read(&back).unwrap() == data, "copy back differs");
    let r = run_timeout(Command::new("cmp").arg(&src).arg(&back), CLIENT_TIME);
    ok(&r, "cmp source and copy");
}

/// Sum of one column ("total=R,W,...") of fio's `issued rwts` lines.
fn fio_issued(out: &str) -> (u64, u64) {
    let mut r = 0;
    let mut wr = 0;
    for l in out.lines().filter(|l| l.contains("issued rwts: total=")) {
        let t = l.split("total=").nth(1).unwrap();
        let mut it = t.split([',', ' ']);
        r += it.next().unwrap().parse::<u64>().unwrap();
        wr += it.next().unwrap().parse::<u64>().unwrap();
    }
    (r, wr)
}

#[test]
fn fio_random_mixed_writes_verify_crc32c() {
    if !have("fio") {
        eprintln!("SKIPPED: fio is not installed");
        return;
    }
    let s = Solo::new(64 * MIB, &[]);
    let r = run_timeout(
        Command::new("fio")
            // fio leaves verify state files in its working directory.
            .current_dir(&s.dir)
            .arg("--name=hast")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", s.uri()))
            .args([
                "--rw=randwrite",
                "--bssplit=4k/30:8k/20:64k/30:256k/20",
                "--iodepth=16",
                "--numjobs=2",
                "--size=24M",
                "--offset_increment=24M",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ]),
        CLIENT_TIME,
    );
    ok(&r, "fio");
    assert_eq!(r.stdout.matches("err= 0").count(), 2, "{}", r.stdout);
    assert!(!r.stdout.contains("verify: bad"), "{}", r.stdout);
    let (reads, writes) = fio_issued(&r.stdout);
    assert!(writes > 100 && reads > 100, "{}", r.stdout);
    // Every NBD request fio sent is counted once by hastd.
    let l = s.list();
    assert_eq!(list_number(&l, "writes"), Some(writes), "{l}\n{}", r.stdout);
    assert_eq!(list_number(&l, "reads"), Some(reads), "{l}\n{}", r.stdout);
    assert_eq!(
        list_field(&l, "local errors"),
        Some("read: 0, write: 0, delete: 0, flush: 0"),
        "{l}"
    );
    // Nothing left in any queue once the client is gone.
    assert_eq!(list_field(&l, "queues"), Some(IDLE_QUEUES), "{l}");
}

/// Everything the ext4 test sets up, torn down in reverse order even when
/// the test fails.
struct StackGuard {
    nbdfuse: Option<ChildGuard>,
    fuse_dir: PathBuf,
    loopdev: Option<String>,
    mounted: Option<PathBuf>,
}

impl StackGuard {
    fn new(fuse_dir: PathBuf) -> StackGuard {
        StackGuard {
            nbdfuse: None,
            fuse_dir,
            loopdev: None,
            mounted: None,
        }
    }

    /// nbdfuse the export as `fuse_dir/disk`, then a loop device on it.
    fn attach(&mut self, uri: &str) -> String {
        fs::create_dir_all(&self.fuse_dir).unwrap();
        let file = self.fuse_dir.join("disk");
        let child = Command::new("nbdfuse")
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        self.nbdfuse = Some(ChildGuard::new(child));
        assert!(
            wait_for(Duration::from_secs(10), || file.exists()),
            "nbdfuse did not expose {}",
            file.display()
        );
        let r = run_timeout(
            Command::new("losetup").args(["-f", "--show"]).arg(&file),
            CLIENT_TIME,
        );
        ok(&r, "losetup");
        let dev = r.stdout.trim().to_string();
        self.loopdev = Some(dev.clone());
        dev
    }

    fn mount(&mut self, dev: &str, at: &Path) {
        fs::create_dir_all(at).unwrap();
        let r = run_timeout(Command::new("mount").arg(dev).arg(at), CLIENT_TIME);
        ok(&r, "mount");
        self.mounted = Some(at.to_path_buf());
    }

    fn umount(&mut self) {
        if let Some(m) = self.mounted.take() {
            let r = run_timeout(Command::new("umount").arg(&m), CLIENT_TIME);
            if r.code != 0 {
                let _ = run_timeout(Command::new("umount").arg("-l").arg(&m), CLIENT_TIME);
                panic!("umount {} failed: {}", m.display(), r.stderr);
            }
        }
    }

    /// Loop device and FUSE mount away, nbdfuse gone.
    fn detach(&mut self) {
        self.umount();
        if let Some(d) = self.loopdev.take() {
            let _ = run_timeout(Command::new("losetup").arg("-d").arg(&d), CLIENT_TIME);
        }
        if let Some(g) = self.nbdfuse.take() {
            let _ = run_timeout(
                Command::new("fusermount3").arg("-u").arg(&self.fuse_dir),
                CLIENT_TIME,
            );
            let r = g.wait_timeout(Duration::from_secs(30));
            if r.code == -2 {
                // Leave no mount behind, then fail.
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.fuse_dir)
                    .stderr(Stdio::null())
                    .status();
            }
            assert_ne!(r.code, -2, "nbdfuse did not exit after fusermount3 -u");
        }
    }
}

impl Drop for StackGuard {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if let Some(d) = self.loopdev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&d).status();
        }
        if let Some(g) = self.nbdfuse.take() {
            // nbdfuse first (it may still be mounting), then whatever
            // mount it left.
            drop(g);
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.fuse_dir)
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.fuse_dir)
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn ext4_through_nbdfuse_and_a_loop_device() {
    for (p, what) in [
        ("/dev/fuse", "/dev/fuse"),
        ("/dev/loop-control", "loop devices"),
    ] {
        if !Path::new(p).exists() {
            eprintln!("SKIPPED: {what} not available ({p} missing)");
            return;
        }
    }
    for t in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3"] {
        if !have(t) {
            eprintln!("SKIPPED: {t} is not installed");
            return;
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: losetup and mount need root");
        return;
    }
    let s = Solo::new(64 * MIB, &[]);
    let mut g = StackGuard::new(s.dir.join("fuse"));
    let fsdir = s.dir.join("fs");
    let dev = g.attach(&s.uri());
    let r = run_timeout(
        Command::new("mkfs.ext4").args(["-F", "-q"]).arg(&dev),
        CLIENT_TIME,
    );
    ok(&r, "mkfs.ext4");
    g.mount(&dev, &fsdir);
    let files: Vec<(PathBuf, Vec<u8>)> = (0..6u64)
        .map(|i| {
            let name = if i % 2 == 0 {
                format!("f{i}")
            } else {
                format!("sub/dir/f{i}")
            };
            (
                PathBuf::from(name),
                rand_bytes((1000 + i * 700_000) as usize, i),
            )
        })
        .collect();
    for (n, d) in &files {
        let p = fsdir.join(n);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, d).unwrap();
    }
    g.umount();
    let r = run_timeout(Command::new("e2fsck").arg("-fn").arg(&dev), CLIENT_TIME);
    ok(&r, "e2fsck -fn");
    g.detach();

    // Leave primary and come back: the file system comes from the
    // provider, not from any cache of the first mount.
    ok(&s.node.hastctl("role", &["init", "r0"]), "role init");
    s.primary();
    let dev = g.attach(&s.uri());
    g.mount(&dev, &fsdir);
    for (n, d) in &files {
        let got = fs::read(fsdir.join(n)).unwrap_or_else(|e| panic!("{}: {e}", n.display()));
        assert!(got == *d, "{} differs after remount", n.display());
    }
    g.detach();
    let l = s.list();
    assert!(list_number(&l, "dirty").unwrap() > 0, "{l}");
}

const PY_REGION: &str = r#"
import nbd, sys
uri, first, step, count, chunk, tag = sys.argv[1], *map(int, sys.argv[2:])
h = nbd.NBD()
h.connect_uri(uri)
if not h.can_multi_conn():
    sys.exit('export does not advertise multi-conn')
QD = 16
pending = []
for i in range(count):
    off = (first + i * step) * chunk
    b = nbd.Buffer.from_bytearray(stamped(off, chunk, tag))
    pending.append((h.aio_pwrite(b, off), b))
    while h.aio_in_flight() >= QD:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
for c, _ in pending:
    if not h.aio_command_completed(c):
        sys.exit('write not completed')
h.flush()
h.shutdown()
print(count)
"#;

#[test]
fn multi_conn_clients_write_interleaved_regions() {
    if !python_has_nbd() {
        eprintln!("SKIPPED: python3 libnbd bindings missing");
        return;
    }
    let s = Solo::new(64 * MIB, &[]);
    let (localoff, _, _) = s.geometry();
    let chunk = 64u64 << 10;
    let count = 384u64; // per client: 24 MiB each, alternating blocks
    let script = format!("{PY_STAMP}\n{PY_REGION}");
    let uri = s.uri();
    let spawn = |first: u64, tag: u64| {
        python_spawn(
            &script,
            &[
                &uri,
                &first.to_string(),
                "2",
                &count.to_string(),
                &chunk.to_string(),
                &tag.to_string(),
            ],
        )
    };
    let a = spawn(0, 1);
    let b = spawn(1, 2);
    let ra = a.wait_timeout(CLIENT_TIME);
    let rb = b.wait_timeout(CLIENT_TIME);
    ok(&ra, "client A");
    ok(&rb, "client B");
    let img = s.image();
    for i in 0..2 * count {
        let off = i * chunk;
        let tag = 1 + i % 2;
        let a = (localoff + off) as usize;
        assert!(
            img[a..a + chunk as usize] == stamped(off, chunk, tag)[..],
            "block {i} (client {tag}) wrong in the provider"
        );
    }
    // A third connection sees both clients' data.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().unwrap();
    for i in [0u64, 1, 2 * count - 2, 2 * count - 1] {
        let got = c.read(i, i * chunk, chunk as u32).unwrap().unwrap();
        assert!(
            got == stamped(i * chunk, chunk, 1 + i % 2),
            "block {i} read"
        );
    }
    let l = s.list();
    assert_eq!(list_number(&l, "writes"), Some(2 * count), "{l}");
    assert_eq!(list_number(&l, "flushes"), Some(2), "{l}");
    // Both clients' first writes raced for the counter bump: one bump.
    assert_eq!(s.dump_number("localcnt"), 1);
}

#[test]
fn tcp_export_serves_qemu_io_and_nbdinfo() {
    let port = hast_tests::free_port("127.0.0.1");
    let s = Solo::build(
        32 * MIB,
        &SoloOpts {
            provname: Some("tcpdisk"),
            tcp: Some(port),
            ..SoloOpts::default()
        },
    );
    let (localoff, datasize, _) = s.geometry();
    assert!(!s.socket.exists(), "a TCP export also made a Unix socket");
    let r = run_timeout(
        Command::new("nbdinfo").arg("--size").arg(s.uri()),
        CLIENT_TIME,
    );
    ok(&r, "nbdinfo --size");
    assert_eq!(r.stdout.trim(), datasize.to_string());
    let r = qemu_io(
        &s.uri(),
        &[
            "write -P 0x5c 1048064 66048".to_string(),
            "read -P 0x5c 1048064 66048".to_string(),
            "read -P 0 1114112 512".to_string(),
        ],
    );
    ok(&r, "qemu-io over TCP");
    assert!(!r.stdout.contains("failed"), "{}", r.stdout);
    let img = s.image();
    let a = (localoff + 1048064) as usize;
    assert!(img[a..a + 66048].iter().all(|&b| b == 0x5c));
    assert_eq!(img[a - 1], 0);
    assert_eq!(img[a + 66048], 0);
    // Leaving primary closes the port.
    ok(&s.node.hastctl("role", &["init", "r0"]), "role init");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "TCP export still accepting after role init"
    );
}

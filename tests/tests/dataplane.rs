//! The primary's data path as a user reaches it: hastd exports a degraded
//! primary over NBD and real clients (qemu-io, qemu-img, nbdcopy, fio,
//! python libnbd, nbdfuse + loop + ext4, and a raw socket client) read and
//! write through it. Every test checks the bytes in the provider file, the
//! on-disk activemap and metadata, and what `hastctl` reports.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hast_tests::{
    bin, have, list_field, list_number, map_bits, nbdwire as w, python, python_spawn, run_timeout,
    wait_for, ChildGuard, RawNbd, Run, Solo, SoloOpts, PYTHON,
};

const MIB: u64 = 1 << 20;
/// Time limit of one outside client run.
const CLIENT_TIME: Duration = Duration::from_secs(120);

/// Pseudo-random bytes (splitmix64), reproducible from `seed`.
fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    v.truncate(n);
    v
}

fn ok(r: &Run, what: &str) {
    assert_eq!(
        r.code, 0,
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        r.code, r.stdout, r.stderr
    );
}

fn qemu_io(target: &str, cmds: &[String]) -> Run {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(target);
    run_timeout(&mut c, CLIENT_TIME)
}

fn python_has_nbd() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The extents `[off, off+len)` touches.
fn extents_of(off: u64, len: u64, es: u64) -> std::ops::RangeInclusive<u64> {
    off / es..=(off + len - 1) / es
}

/// The map area `[4096, localoff)` that has exactly the bits of `set`.
fn expected_map(localoff: u64, set: &BTreeSet<u64>) -> Vec<u8> {
    let mut m = vec![0u8; (localoff - 4096) as usize];
    for &n in set {
        m[(n / 8) as usize] |= 1 << (n % 8);
    }
    m
}

fn set_bits(bits: &[bool]) -> BTreeSet<u64> {
    bits.iter()
        .enumerate()
        .filter(|(_, &b)| b)
        .map(|(i, _)| i as u64)
        .collect()
}

/// One 512-byte sector stamped with its export offset and a tag, the same
/// layout the Python writers produce: offset (LE u64), tag (LE u64), then
/// one fill byte.
fn stamp(off: u64, tag: u64) -> Vec<u8> {
    let mut s = Vec::with_capacity(512);
    s.extend_from_slice(&off.to_le_bytes());
    s.extend_from_slice(&tag.to_le_bytes());
    s.resize(512, ((off / 512 + tag) % 251) as u8);
    s
}

/// Rows of 496 equal bytes, one per fill value.
fn fill_rows() -> &'static [[u8; 496]] {
    static ROWS: std::sync::OnceLock<Vec<[u8; 496]>> = std::sync::OnceLock::new();
    ROWS.get_or_init(|| (0..=255u8).map(|b| [b; 496]).collect())
}

fn stamped(off: u64, len: u64, tag: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    for (i, s) in v.chunks_exact_mut(512).enumerate() {
        let o = off + i as u64 * 512;
        s[..8].copy_from_slice(&o.to_le_bytes());
        s[8..16].copy_from_slice(&tag.to_le_bytes());
        // memcpy from a row of 496 equal bytes: fast even unoptimised.
        s[16..].copy_from_slice(&fill_rows()[((o / 512 + tag) % 251) as usize]);
    }
    v
}

/// Python: the same stamp, for the writers.
const PY_STAMP: &str = r#"
import struct
def stamp(off, tag):
    return struct.pack('<QQ', off, tag) + bytes([((off // 512) + tag) % 251]) * 496
def stamped(off, length, tag):
    return b''.join(stamp(off + i, tag) for i in range(0, length, 512))
"#;

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

/// The `queues` line of an idle primary.
const IDLE_QUEUES: &str = "local: 0, send: 0, recv: 0, done: 0, idle: 0";

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
            let r = g.wait_timeout(Duration::from_secs(10));
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

/// Python: 32 writes queued (strict mode off), then wait to be killed.
const PY_KILLED: &str = r#"
import nbd, sys, time
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
base = int(sys.argv[2])
bufs = []
for i in range(32):
    b = nbd.Buffer.from_bytearray(stamped(base + i * 4096, 4096, 9))
    bufs.append(b)
    h.aio_pwrite(b, base + i * 4096)
print('sent', flush=True)
time.sleep(60)
"#;

/// Assert the connection was closed by the server.
fn assert_closed(c: &mut RawNbd, what: &str) {
    assert!(c.closed_by_server(), "{what}: connection still open");
}

#[test]
fn bad_nbd_input_is_refused_and_harms_nothing() {
    let s = Solo::with_name(32 * MIB, &[], Some("disk0"));
    let (localoff, datasize, es) = s.geometry();
    assert_eq!(s.export, "disk0");

    // A well-behaved client, connected first and used throughout.
    let mut good = RawNbd::start(&s.socket).unwrap();
    let (size, flags) = good.go("disk0").unwrap().expect("GO disk0");
    assert_eq!(size, datasize);
    assert_eq!(flags & 2, 0, "export is read-only");
    let mut model_writes: Vec<(u64, Vec<u8>)> = Vec::new();
    let good_rw = |good: &mut RawNbd, mw: &mut Vec<(u64, Vec<u8>)>, off: u64, tag: u64| {
        let cookie = 100 + 2 * mw.len() as u64;
        let d = stamped(off, 8192, tag);
        assert_eq!(
            good.write(cookie, off, &d).unwrap(),
            0,
            "good write at {off}"
        );
        let got = good
            .read(cookie + 1, off, 8192)
            .unwrap()
            .expect("good read");
        assert!(got == d, "good client read back other data at {off}");
        mw.push((off, d));
    };
    // Dirty the extents the test will use (0 and 4), so that the map and
    // metadata are settled before the snapshot.
    good_rw(&mut good, &mut model_writes, 0, 1);
    good_rw(&mut good, &mut model_writes, 4 * es, 1);
    let snapshot = s.image();

    // Garbage instead of client flags.
    let mut c = RawNbd::connect(&s.socket).unwrap();
    c.greeting().unwrap();
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(&mut c, "garbage client flags");
    // Good flags, then an option with a bad magic.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.send(&[0xde; 16]).unwrap();
    assert_closed(&mut c, "bad option magic");
    // Bytes before the greeting was read, then close.
    let mut c = RawNbd::connect(&s.socket).unwrap();
    c.send(&rand_bytes(100_000, 3)).unwrap_or(());
    drop(c);

    // Unknown options are answered with ERR_UNSUP and negotiation goes on;
    // unknown export names with ERR_UNKNOWN (the resource name is not the
    // export name when `name` is set).
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.option(99, b"hello").unwrap();
    let (o, k, _) = c.option_reply().unwrap();
    assert_eq!((o, k), (99, w::REP_ERR_UNSUP));
    c.option(w::OPT_STRUCTURED_REPLY, &[]).unwrap();
    let (o, k, _) = c.option_reply().unwrap();
    assert_eq!(o, w::OPT_STRUCTURED_REPLY);
    assert!(
        k & 0x8000_0000 != 0,
        "structured replies are not spoken: {k:#x}"
    );
    assert_eq!(c.go("nosuch").unwrap(), Err(w::REP_ERR_UNKNOWN));
    assert_eq!(c.go("r0").unwrap(), Err(w::REP_ERR_UNKNOWN));
    // GO with data shorter than its own name length field.
    c.option(w::OPT_GO, &[0, 0, 0, 50, b'd']).unwrap();
    let (o, k, _) = c.option_reply().unwrap();
    assert_eq!((o, k), (w::OPT_GO, w::REP_ERR_INVALID));
    c.option(w::OPT_LIST, &[]).unwrap();
    let (o, k, d) = c.option_reply().unwrap();
    assert_eq!((o, k), (w::OPT_LIST, w::REP_SERVER));
    assert_eq!(&d[4..], b"disk0");
    assert_eq!(c.option_reply().unwrap().1, w::REP_ACK);
    // Still usable: enter transmission on the same connection.
    let (size, _) = c.go("disk0").unwrap().expect("GO after errors");
    assert_eq!(size, datasize);

    // Transmission: misaligned, out of range, oversized, unknown.
    let size = datasize;
    use w::{CMD_READ as RD, CMD_TRIM as TR, CMD_WRITE as WR, EINVAL as INVAL, ENOSPC as NOSPC};
    let top = u64::MAX - 511;
    // (flags, command, offset, length, payload bytes sent, error, what)
    let cases: Vec<(u16, u16, u64, u32, usize, u32, &str)> = vec![
        (0, RD, 1, 512, 0, INVAL, "misaligned read offset"),
        (0, RD, 0, 100, 0, INVAL, "misaligned read length"),
        (0, WR, 512, 100, 100, INVAL, "misaligned write length"),
        (0, WR, 3, 512, 512, INVAL, "misaligned write offset"),
        (0, RD, size, 512, 0, INVAL, "read past the end"),
        (0, RD, top, 512, 0, INVAL, "read offset wraps"),
        (0, WR, size - 512, 1024, 1024, NOSPC, "write past the end"),
        (0, WR, top, 512, 512, NOSPC, "write offset wraps"),
        (0, TR, size - 512, 1024, 0, INVAL, "trim past the end"),
        (0, RD, 0, 64 << 20, 0, INVAL, "read of 64 MiB"),
        (0, 42, 0, 512, 0, INVAL, "unknown command"),
        (1 << 9, RD, 0, 512, 0, INVAL, "unknown flag"),
    ];
    for (i, (fl, kind, off, len, payload, want, what)) in cases.iter().enumerate() {
        let cookie = 1000 + i as u64;
        let pl = vec![0xeeu8; *payload];
        c.request(*fl, *kind, cookie, *off, *len, &pl).unwrap();
        let (e, ck) = c
            .reply()
            .unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        assert_eq!((e, ck), (*want, cookie), "{what}");
        // The connection still works after the refusal.
        let r = c
            .read(5000 + i as u64, 0, 512)
            .unwrap()
            .expect("read after refusal");
        assert!(r == model_writes[0].1[..512], "{what}: data at 0 changed");
    }
    // A write too large to skip: refused, then the connection is closed.
    c.request(0, w::CMD_WRITE, 7, 0, 0x7fff_fe00, &[0xee; 4096])
        .unwrap();
    let (e, ck) = c.reply().unwrap();
    assert_eq!((e, ck), (w::EINVAL, 7), "oversized write");
    assert_closed(&mut c, "oversized write");
    // A bad request magic: hard disconnect.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("disk0").unwrap().unwrap();
    c.send(&[0x11; 28]).unwrap();
    assert_closed(&mut c, "bad request magic");
    // EXPORT_NAME of an unknown export: closed.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.option(w::OPT_EXPORT_NAME, b"nosuch").unwrap();
    assert_closed(&mut c, "EXPORT_NAME nosuch");
    // An EXPORT_NAME longer than any name: closed.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.option_raw(w::OPT_EXPORT_NAME, 0x7fff_ffff, b"disk0")
        .unwrap();
    assert_closed(&mut c, "EXPORT_NAME of 2 GiB");
    // A GO that claims 2 GiB of data, then the client leaves.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.option_raw(w::OPT_GO, 0x7fff_ffff, &[0; 1000]).unwrap();
    drop(c);

    // A client that dies in the middle of a write payload.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("disk0").unwrap().unwrap();
    c.request(0, w::CMD_WRITE, 9, 4 * es, 1 << 20, &[0xaa; 300 << 10])
        .unwrap();
    drop(c);
    // And a libnbd client killed with requests in flight (strict mode off),
    // writing extent 4, which holds nothing the checks below rely on.
    let mut killed_region = None;
    if python_has_nbd() {
        let script = format!("{PY_STAMP}\n{PY_KILLED}");
        let mut p = python_spawn(&script, &[&s.uri(), &(4 * es + 16384).to_string()]);
        let out = p.child().stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "sent");
        // SAFETY: kill(2) on a child we spawned.
        unsafe { libc::kill(p.id() as i32, libc::SIGKILL) };
        let _ = p.wait_timeout(Duration::from_secs(10));
        killed_region = Some((4 * es + 16384, 32 * 4096u64));
    } else {
        eprintln!("python3 libnbd missing: no libnbd client killed mid-request");
    }

    // Meanwhile the good client still reads and writes correctly.
    good_rw(&mut good, &mut model_writes, 8192, 2);
    good_rw(&mut good, &mut model_writes, es - 8192, 3);
    for (i, (off, d)) in model_writes.iter().enumerate() {
        let got = good.read(9000 + i as u64, *off, 8192).unwrap().unwrap();
        if got != *d {
            // A later write to the same place wins.
            let last = model_writes.iter().rposition(|(o, _)| o == off).unwrap();
            assert!(got == model_writes[last].1, "good data at {off} lost");
        }
    }
    // And a client connecting now is served.
    let mut late = RawNbd::start(&s.socket).unwrap();
    late.go("disk0").unwrap().expect("GO after the bad clients");
    assert!(late.read(1, 0, 8192).unwrap().unwrap() == model_writes[0].1);
    drop(late);
    let st = s.node.hastctl("status", &["r0"]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert!(st.stdout.contains("r0\tdegraded primary"), "{}", st.stdout);

    // Nothing but the good client's writes (and the killed client's own
    // extent) changed anywhere in the file.
    let after = s.image();
    assert_eq!(after.len(), snapshot.len(), "provider size changed");
    let mut model = snapshot.clone();
    for (off, d) in &model_writes {
        let a = (localoff + off) as usize;
        model[a..a + d.len()].copy_from_slice(d);
    }
    if let Some((o, l)) = killed_region {
        // Each sector there is either untouched or the killed client's.
        for k in (0..l).step_by(512) {
            let a = (localoff + o + k) as usize;
            let got = &after[a..a + 512];
            assert!(
                got == &model[a..a + 512] || got == stamp(o + k, 9),
                "torn sector at export offset {}",
                o + k
            );
            model[a..a + 512].copy_from_slice(got);
        }
    }
    assert!(
        after[..localoff as usize] == model[..localoff as usize],
        "metadata or map changed"
    );
    if after != model {
        let first = (0..after.len()).find(|&i| after[i] != model[i]).unwrap();
        panic!(
            "bad input changed the provider at file offset {first} (export offset {})",
            first as i64 - localoff as i64
        );
    }
    let l = s.list();
    assert_eq!(
        list_field(&l, "local errors"),
        Some("read: 0, write: 0, delete: 0, flush: 0"),
        "{l}"
    );
}

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

/// A loop device, detached when dropped.
struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn block_device_provider_with_4k_sectors() {
    // SAFETY: geteuid has no preconditions.
    if !Path::new("/dev/loop-control").exists() || unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root and loop devices");
        return;
    }
    let back_dir = tempfile::Builder::new()
        .prefix("hastloop")
        .tempdir()
        .unwrap();
    let back = back_dir.path().join("back.img");
    hast_tests::sparse_file(&back, 32 * MIB);
    let r = run_timeout(
        Command::new("losetup")
            .args(["-f", "--show", "-b", "4096"])
            .arg(&back),
        CLIENT_TIME,
    );
    ok(&r, "losetup -b 4096");
    // Dropped after `s` (declared before it): hastd closes the device first.
    let dev = LoopDev(r.stdout.trim().to_string());
    let s = Solo::build(
        0,
        &SoloOpts {
            local: Some(PathBuf::from(&dev.0)),
            ..SoloOpts::default()
        },
    );
    // Metadata, then one 4096-byte map sector.
    let (localoff, datasize, es) = s.geometry();
    assert_eq!(localoff, 8192);
    assert_eq!(datasize, 32 * MIB - 8192);
    let r = run_timeout(Command::new("nbdinfo").arg(s.uri()), CLIENT_TIME);
    ok(&r, "nbdinfo");
    assert!(
        r.stdout.contains("block_size_minimum: 4096"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&format!("export-size: {datasize}")),
        "{}",
        r.stdout
    );

    // qemu does read-modify-write for requests under the block size.
    let r = qemu_io(
        &s.uri(),
        &[
            "write -P 0x42 512 512".to_string(),
            format!("write -P 0x43 {} 4096", 2 * MIB - 2048),
            "read -P 0 0 512".to_string(),
            "read -P 0x42 512 512".to_string(),
            "read -P 0 1024 3072".to_string(),
            format!("read -P 0x43 {} 4096", 2 * MIB - 2048),
        ],
    );
    ok(&r, "qemu-io on a 4K-sector export");
    assert!(!r.stdout.contains("failed"), "{}", r.stdout);
    // A raw request that is not 4096-aligned is refused.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    assert_eq!(c.read(1, 512, 512).unwrap(), Err(w::EINVAL));
    assert_eq!(
        c.write(2, 4096, &[0x99; 512]).unwrap(),
        w::EINVAL,
        "512-byte write on a 4K export"
    );
    drop(c);

    let img = s.image();
    let lo = localoff as usize;
    let mut want = vec![0u8; 8192];
    want[512..1024].fill(0x42);
    assert!(img[lo..lo + 8192] == want[..], "first data block");
    let x = lo + (2 * MIB - 2048) as usize;
    assert!(img[x..x + 4096].iter().all(|&b| b == 0x43));
    assert!(img[x - 1] == 0 && img[x + 4096] == 0);
    let touched: BTreeSet<u64> = [0, 1].into_iter().collect();
    assert_eq!(img[4096..lo], expected_map(localoff, &touched)[..]);
    let l = s.list();
    assert_eq!(list_number(&l, "dirty"), Some(2 * es), "{l}");
    assert_eq!(list_number(&l, "writes"), Some(2), "{l}");
    drop(s);
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
fn small_extents_spread_the_map_over_several_sectors() {
    // 4 KiB extents on 64 MiB: 16383 extents, a 2 KiB map (4 sectors).
    let s = Solo::new(64 * MIB, &["-e", "4K"]);
    let (localoff, datasize, es) = s.geometry();
    assert_eq!((localoff, es), (4096 + 2048, 4096));
    let extents = datasize.div_ceil(es);
    let last = extents - 1;
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    let writes: Vec<(u64, u64)> = vec![
        (0, 512),
        (4095 * es, 512),
        (4096 * es - 512, 1024), // extents 4095 and 4096: map bytes 511, 512
        (8191 * es + 1024, 3 * es), // 8191..=8194
        (12000 * es, es),
        (datasize - 512, 512),
    ];
    let mut touched = BTreeSet::new();
    for (i, &(off, len)) in writes.iter().enumerate() {
        let d = stamped(off, len, 3);
        assert_eq!(c.write(i as u64, off, &d).unwrap(), 0, "write at {off}");
        touched.extend(extents_of(off, len, es));
    }
    assert!(touched.contains(&last));
    let img = s.image();
    assert_eq!(
        img[4096..localoff as usize],
        expected_map(localoff, &touched)[..],
        "map bits"
    );
    for &(off, len) in &writes {
        let a = (localoff + off) as usize;
        assert!(
            img[a..a + len as usize] == stamped(off, len, 3)[..],
            "data at {off}"
        );
    }
    let l = s.list();
    assert_eq!(
        list_number(&l, "dirty"),
        Some(touched.len() as u64 * es),
        "{l}"
    );
}

#[test]
fn mediasize_smaller_than_the_provider_keeps_the_tail_untouched() {
    // The provider is 48 MiB; HAST uses the first 32 MiB (`create -m`).
    let tmp = tempfile::Builder::new()
        .prefix("hastdpm")
        .tempdir()
        .unwrap();
    let file = tmp.path().join("big.img");
    hast_tests::sparse_file(&file, 48 * MIB);
    let tail: Vec<u8> = rand_bytes((16 * MIB) as usize, 99);
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_at(&tail, 32 * MIB)
        .unwrap();
    let s = Solo::build(
        0,
        &SoloOpts {
            create_args: &["-m", "32M"],
            local: Some(file.clone()),
            ..SoloOpts::default()
        },
    );
    let (localoff, datasize, _) = s.geometry();
    assert_eq!(localoff + datasize, 32 * MIB);
    let r = run_timeout(
        Command::new("nbdinfo").arg("--size").arg(s.uri()),
        CLIENT_TIME,
    );
    ok(&r, "nbdinfo --size");
    assert_eq!(r.stdout.trim(), datasize.to_string());
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("r0").unwrap().expect("GO");
    let end = datasize - 512;
    assert_eq!(c.write(1, end, &stamped(end, 512, 4)).unwrap(), 0);
    assert_eq!(c.write(2, datasize, &[1; 512]).unwrap(), w::ENOSPC);
    assert_eq!(c.write(3, end, &[1; 1024]).unwrap(), w::ENOSPC);
    assert_eq!(c.read(4, datasize, 512).unwrap(), Err(w::EINVAL));
    c.request(0, w::CMD_TRIM, 5, end, 1024, &[]).unwrap();
    assert_eq!(c.reply().unwrap(), (w::EINVAL, 5));
    assert!(c.read(6, end, 512).unwrap().unwrap() == stamped(end, 512, 4));
    let img = s.image();
    assert_eq!(img.len() as u64, 48 * MIB);
    assert!(
        img[(32 * MIB) as usize..] == tail[..],
        "bytes past the HAST mediasize changed"
    );
    let a = (localoff + end) as usize;
    assert!(img[a..a + 512] == stamped(end, 512, 4)[..]);
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

#[test]
fn a_1tib_sparse_provider_maps_offsets_past_4gib() {
    let s = Solo::new(1 << 40, &[]);
    let (localoff, datasize, es) = s.geometry();
    // 524288 extents: a 64 KiB map.
    assert_eq!(localoff, 4096 + 65536);
    let mut c = RawNbd::start(&s.socket).unwrap();
    let (size, _) = c.go("r0").unwrap().expect("GO");
    assert_eq!(size, datasize);
    let writes: Vec<(u64, u64)> = vec![
        ((1 << 32) - 512, 1024), // crosses 4 GiB: extents 2047 and 2048
        (5 * (1 << 30) + 512, 4096),
        (datasize / 2, 8192),
        (datasize - 4096, 4096),
    ];
    let mut touched = BTreeSet::new();
    for (i, &(off, len)) in writes.iter().enumerate() {
        let d = stamped(off, len, 13);
        assert_eq!(c.write(i as u64, off, &d).unwrap(), 0, "write at {off}");
        assert!(c.read(i as u64, off, len as u32).unwrap().unwrap() == d);
        touched.extend(extents_of(off, len, es));
    }
    let f = fs::File::open(&s.img).unwrap();
    for &(off, len) in &writes {
        let mut got = vec![0u8; len as usize];
        f.read_exact_at(&mut got, localoff + off).unwrap();
        assert!(got == stamped(off, len, 13), "data at {off}");
        let mut before = [0u8; 512];
        f.read_exact_at(&mut before, localoff + off - 512).unwrap();
        assert_eq!(before, [0u8; 512], "bytes before {off}");
    }
    let mut map = vec![0u8; (localoff - 4096) as usize];
    f.read_exact_at(&mut map, 4096).unwrap();
    assert!(map == expected_map(localoff, &touched), "map bits");
    let l = s.list();
    assert_eq!(
        list_number(&l, "dirty"),
        Some(touched.len() as u64 * es),
        "{l}"
    );
    assert_eq!(fs::metadata(&s.img).unwrap().len(), 1 << 40);
}

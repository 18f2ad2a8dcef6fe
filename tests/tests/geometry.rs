//! A degraded primary's export on providers of unusual shape: 4 KiB extents
//! spreading the activemap over several sectors, a mediasize smaller than
//! the provider (its tail untouched, requests past the end refused), a block
//! device with 4096-byte sectors, and a 1 TiB sparse provider with offsets
//! past 4 GiB. Every test checks where the bytes and the map bits land in
//! the provider, and the dirty size `hastctl` reports.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use hast_tests::export::{
    expected_map, extents_of, ok, qemu_io, rand_bytes, stamped, CLIENT_TIME, MIB,
};
use hast_tests::{list_number, nbdwire as w, run_timeout, RawNbd, Solo, SoloOpts};

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

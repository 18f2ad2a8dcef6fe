//! Metadata on real provider files (and a loop device when root): hastctl
//! create's layout, the on-disk bytes, dump text and every refusal.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;

use hast::activemap::DiskMap;
use hast::metadata::{create, dump_text, Layout, Metadata, MetadataError, METADATA_SIZE};
use hast::nv::Nv;
use hast::provider::Provider;
use hast::role::Role;

const GIB: u64 = 1 << 30;

fn sparse_file(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.set_len(size).unwrap();
    path
}

#[test]
fn create_on_1gib_file_with_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk", GIB);
    let p = Provider::open(&path, true).unwrap();
    assert_eq!(
        (p.mediasize(), p.sectorsize(), p.is_block_device()),
        (GIB, 512, false)
    );
    let layout = Layout::for_provider(&p, None, None, None).unwrap();
    assert_eq!(
        layout,
        Layout {
            mediasize: GIB,
            sectorsize: 512,
            extentsize: 2097152,
            keepdirty: 64,
            mapsize: 512,
            localoff: 4608,
            datasize: 1073737216,
        }
    );
    // Leave garbage where the map goes: create must zero it.
    p.write_all_at(&[0xffu8; 512], 4096).unwrap();
    let md = create(&p, "shared", &layout).unwrap();
    assert_eq!(
        md,
        Metadata {
            resource: "shared".into(),
            datasize: 1073737216,
            extentsize: 2097152,
            keepdirty: 64,
            localoff: 4608,
            resuid: 0,
            localcnt: 0,
            remotecnt: 0,
            prevrole: Role::Init,
            syncing: false,
        }
    );
    drop(p);

    // The raw 4096-byte block, decoded with the plain nv codec.
    let raw = std::fs::read(&path).unwrap();
    let block = &raw[..4096];
    let nv = Nv::decode(block).unwrap();
    let names: Vec<&str> = nv.iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "resource",
            "datasize",
            "extentsize",
            "keepdirty",
            "offset",
            "resuid",
            "localcnt",
            "remotecnt",
            "prevrole"
        ]
    );
    assert_eq!(nv.get_string("resource"), Some("shared"));
    assert_eq!(nv.get_u64("datasize"), Some(1073737216));
    assert_eq!(nv.get_u32("extentsize"), Some(2097152));
    assert_eq!(nv.get_u32("keepdirty"), Some(64));
    assert_eq!(nv.get_u64("offset"), Some(4608));
    assert_eq!(nv.get_u64("resuid"), Some(0));
    assert_eq!(nv.get_u64("localcnt"), Some(0));
    assert_eq!(nv.get_u64("remotecnt"), Some(0));
    assert_eq!(nv.get_string("prevrole"), Some("init"));
    // Zero padded after the list; the first element's header is exact.
    let used = nv.encode().unwrap().len();
    assert!(block[used..].iter().all(|b| *b == 0));
    assert_eq!(
        &block[..16],
        &[17, 9, 7, 0, 0, 0, b'r', b'e', b's', b'o', b'u', b'r', b'c', b'e', 0, 0]
    );
    // The map is zeroed.
    assert!(raw[4096..4608].iter().all(|b| *b == 0));

    // Read back through Metadata::read and dump it.
    let p = Provider::open(&path, false).unwrap();
    let back = Metadata::read(&p, "shared").unwrap();
    assert_eq!(back, md);
    assert_eq!(
        dump_text(&back),
        "resource: shared\n    datasize: 1073737216 (1.0GB)\n    extentsize: 2097152 (2.0MB)\n    keepdirty: 64\n    localoff: 4608\n    resuid: 0\n    localcnt: 0\n    remotecnt: 0\n    prevrole: init\n"
    );
    let map = back.read_map(&p).unwrap();
    assert_eq!(map.as_bytes().len(), 512);
    assert_eq!(map.nextents(), 512);
    assert_eq!(map.count(), 0);
}

#[test]
fn dump_text_of_a_used_resource() {
    let md = Metadata {
        resource: "data".into(),
        datasize: 10737348608,
        extentsize: 1048576,
        keepdirty: 128,
        localoff: 5632,
        resuid: 12345678901234567890,
        localcnt: 3,
        remotecnt: 2,
        prevrole: Role::Primary,
        syncing: false,
    };
    assert_eq!(
        dump_text(&md),
        "resource: data\n    datasize: 10737348608 (10GB)\n    extentsize: 1048576 (1.0MB)\n    keepdirty: 128\n    localoff: 5632\n    resuid: 12345678901234567890\n    localcnt: 3\n    remotecnt: 2\n    prevrole: primary\n"
    );
}

#[test]
fn metadata_update_and_map_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk", 64 << 20);
    let p = Provider::open(&path, true).unwrap();
    let layout = Layout::for_provider(&p, None, Some(65536), Some(8)).unwrap();
    assert_eq!(layout.mapsize, 512);
    assert_eq!(layout.datasize, (64 << 20) - 4096 - 512);
    let mut md = create(&p, "r0", &layout).unwrap();
    md.resuid = 0xdead_beef_0000_0001;
    md.localcnt = 7;
    md.remotecnt = 6;
    md.prevrole = Role::Secondary;
    md.write(&p, true).unwrap();
    assert_eq!(Metadata::read(&p, "r0").unwrap(), md);

    let mut map = DiskMap::new(md.nextents(), md.mapsize());
    for e in [0, 1, 9, 1023] {
        map.set(e);
    }
    md.write_map(&p, &map, true).unwrap();
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(&raw[4096..4098], &[0x03, 0x02]);
    assert_eq!(raw[4096 + 127], 0x80);
    let back = md.read_map(&p).unwrap();
    assert_eq!(
        back.dirty_extents().collect::<Vec<_>>(),
        vec![0, 1, 9, 1023]
    );
    assert_eq!(back, map);
    // Data at localoff is untouched by metadata and map writes.
    p.write_all_at(b"DATA", md.localoff).unwrap();
    md.write(&p, false).unwrap();
    md.write_map(&p, &map, false).unwrap();
    let mut buf = [0u8; 4];
    p.read_exact_at(&mut buf, md.localoff).unwrap();
    assert_eq!(&buf, b"DATA");
}

#[test]
fn one_tib_layout() {
    let l = Layout::compute(1 << 40, 512, None, None, None).unwrap();
    assert_eq!((l.mapsize, l.localoff), (65536, 69632));
    assert_eq!(l.datasize, (1 << 40) - 69632);
    // 4096-byte sectors round the same map up to a multiple of 4096.
    let l = Layout::compute(GIB, 4096, None, None, None).unwrap();
    assert_eq!(
        (l.mapsize, l.localoff, l.datasize),
        (4096, 8192, GIB - 8192)
    );
    // -m smaller than the provider.
    let l = Layout::compute(GIB, 512, Some(GIB / 2), None, Some(0)).unwrap();
    assert_eq!((l.mediasize, l.keepdirty), (GIB / 2, 64));
}

#[test]
fn every_layout_check_is_refused() {
    let e = |r: Result<Layout, MetadataError>| r.expect_err("must be refused");
    let err = e(Layout::compute(GIB, 512, None, Some(3 << 20), None));
    assert!(
        matches!(err, MetadataError::ExtentNotPowerOfTwo(3145728)),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 65);
    assert!(err.to_string().contains("3145728"));
    let err = e(Layout::compute(GIB, 4096, None, Some(2048), None));
    assert!(matches!(
        err,
        MetadataError::ExtentTooSmall {
            extentsize: 2048,
            sectorsize: 4096
        }
    ));
    assert_eq!(
        err.to_string(),
        "extent size (2048) is less than sector size (4096)"
    );
    let err = e(Layout::compute(GIB, 4096, None, Some(4096 + 2048), None));
    assert!(matches!(err, MetadataError::ExtentNotMultiple { .. }));
    let err = e(Layout::compute(GIB, 512, Some(GIB + 1), None, None));
    assert!(
        matches!(err, MetadataError::MediasizeTooLarge { requested, available, .. } if requested == GIB + 1 && available == GIB)
    );
    // Without a provider at hand the message says so, not "provider  size".
    assert_eq!(
        err.to_string(),
        format!(
            "provided mediasize ({}) is larger than the provider size ({GIB})",
            GIB + 1
        )
    );
    assert_eq!(err.exit_code(), 65);
    let err = e(Layout::compute(GIB, 520, None, None, None));
    assert!(matches!(err, MetadataError::BadSectorSize(520)));
    let err = e(Layout::compute(GIB, 0, None, None, None));
    assert!(matches!(err, MetadataError::BadSectorSize(0)));
    let err = e(Layout::compute(GIB, 512, None, Some(1 << 31), None));
    assert!(matches!(err, MetadataError::ExtentTooLarge { .. }));
    let err = e(Layout::compute(GIB, 512, None, None, Some(1 << 31)));
    assert!(matches!(err, MetadataError::KeepdirtyTooLarge { .. }));
    // Too small: metadata + map + one extent must fit.
    for size in [0, 4096, 4096 + 512, 4096 + 512 + 2097151] {
        let err = e(Layout::compute(size, 512, None, None, None));
        assert!(
            matches!(err, MetadataError::TooSmall { .. }),
            "{size}: {err:?}"
        );
    }
    let ok = Layout::compute(4096 + 512 + 2097152, 512, None, None, None).unwrap();
    assert_eq!(ok.datasize, 2097152);
}

#[test]
fn provider_errors_name_the_path_and_map_to_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = Provider::open(&missing, true).unwrap_err();
    assert!(err.to_string().contains("nope"));
    assert!(err.is_open_error());
    let err = Provider::open(dir.path(), false).unwrap_err();
    assert!(
        err.to_string()
            .contains("is neither a regular file nor a block device"),
        "{err}"
    );
    // Requested mediasize larger than the provider names it.
    let path = sparse_file(dir.path(), "small", 1 << 20);
    let p = Provider::open(&path, true).unwrap();
    let err = Layout::for_provider(&p, Some(2 << 20), None, None).unwrap_err();
    assert!(err.to_string().contains("small"), "{err}");
    assert_eq!(err.exit_code(), 65);
    // A read-only provider: writing metadata is an I/O error (74).
    let layout = Layout::for_provider(&p, None, Some(4096), None).unwrap();
    let ro = Provider::open(&path, false).unwrap();
    let err = create(&ro, "r", &layout).unwrap_err();
    assert_eq!(err.exit_code(), 74, "{err}");
}

#[test]
fn reading_refuses_bad_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk", 16 << 20);
    let p = Provider::open(&path, true).unwrap();
    // Never created.
    let err = Metadata::read(&p, "r").unwrap_err();
    assert!(matches!(err, MetadataError::NoMetadata { .. }), "{err:?}");
    assert!(err.to_string().contains("hastctl create r"));
    let layout = Layout::for_provider(&p, None, Some(65536), None).unwrap();
    let md = create(&p, "r", &layout).unwrap();
    // Another resource's provider.
    let err = Metadata::read(&p, "other").unwrap_err();
    assert!(matches!(err, MetadataError::ResourceMismatch { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "provider {} is not part of resource other (it belongs to \"r\")",
            path.display()
        )
    );
    // A field of the wrong type (extentsize as uint64) is missing to the reference.
    let mut nv = md.to_nv().unwrap();
    nv.set("extentsize", hast::nv::Value::Uint64(65536));
    let mut block = nv.encode().unwrap();
    block.resize(4096, 0);
    let err = Metadata::decode(&block, "r").unwrap_err();
    assert!(
        matches!(
            err,
            MetadataError::MissingField {
                field: "extentsize",
                ..
            }
        ),
        "{err:?}"
    );
    // Insane values.
    for bad in [
        Metadata {
            extentsize: 3000,
            ..md.clone()
        },
        Metadata {
            keepdirty: 0,
            ..md.clone()
        },
        Metadata {
            datasize: 0,
            ..md.clone()
        },
        Metadata {
            localoff: 4096,
            ..md.clone()
        },
        Metadata {
            localoff: u64::MAX - 10,
            ..md.clone()
        },
    ] {
        let block = bad.encode().unwrap();
        assert_eq!(block.len() as u64, METADATA_SIZE);
        let err = Metadata::decode(&block, "r").unwrap_err();
        assert!(
            matches!(err, MetadataError::BadValue { .. }),
            "{bad:?}: {err:?}"
        );
    }
    // Corrupt nv: a string without its NUL.
    let mut block = md.encode().unwrap();
    block[6 + 16 + 1] = b'x'; // "r\0" -> "rx"
    let err = Metadata::decode(&block, "r").unwrap_err();
    assert!(matches!(err, MetadataError::Invalid { .. }), "{err:?}");
    // Data area larger than the provider.
    let big = Metadata {
        datasize: 32 << 20,
        ..md.clone()
    };
    big.write(&p, false).unwrap();
    let err = Metadata::read(&p, "r").unwrap_err();
    assert!(matches!(err, MetadataError::DoesNotFit { .. }), "{err:?}");
    // Unknown prevrole.
    let mut nv = md.to_nv().unwrap();
    nv.set("prevrole", hast::nv::Value::String("master".into()));
    let mut block = nv.encode().unwrap();
    block.resize(4096, 0);
    assert!(matches!(
        Metadata::decode(&block, "r"),
        Err(MetadataError::BadValue {
            field: "prevrole",
            ..
        })
    ));
}

/// A real block device: a loop device over a sparse file (root only).
#[test]
fn loop_device_provider() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root for losetup");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "backing", 64 << 20);
    let out = Command::new("losetup")
        .args(["--find", "--show", "--sector-size", "4096"])
        .arg(&path)
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "skipped: losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _guard = Detach(dev.clone());
    let p = Provider::open(Path::new(&dev), true).unwrap();
    p.lock_exclusive().unwrap();
    // flock locks belong to the open file: a second open is refused...
    let other = Provider::open(Path::new(&dev), false).unwrap();
    assert!(other.lock_exclusive().is_err());
    assert!(p.is_block_device());
    assert_eq!(p.mediasize(), 64 << 20);
    assert_eq!(p.sectorsize(), 4096);
    let layout = Layout::for_provider(&p, None, None, None).unwrap();
    assert_eq!(layout.mapsize, 4096);
    assert_eq!(layout.localoff, 8192);
    let md = create(&p, "loop", &layout).unwrap();
    assert_eq!(Metadata::read(&p, "loop").unwrap(), md);
    drop(p);
    // ...and closing the first releases the lock.
    other.lock_exclusive().unwrap();
    drop(other);
    // The bytes reached the backing file.
    let raw = std::fs::read(&path).unwrap();
    let nv = Nv::decode(&raw[..4096]).unwrap();
    assert_eq!(nv.get_string("resource"), Some("loop"));
    assert_eq!(nv.get_u64("offset"), Some(8192));
}

//! Unloading the geom_hast module on the userland kernel shim: refused
//! while an instance exists (MOD_QUIESCE), then clean: the control device
//! goes, a file still open on it gets ENXIO, the module's malloc types are
//! empty (the shim panics otherwise) and nothing is left. Its own test
//! binary: an unloaded module cannot come back in the same process.

use std::time::Duration;

use hast::core::{Mode, Params};
use hast::dataplane::{Dataplane, KernelPlane};
use hast::kdev::{CreateSpec, KernelDevice};
use hast::kshim::{self, Disk, KshimError};
use nix::errno::Errno;

const T: Duration = Duration::from_secs(10);

#[test]
fn unload_is_refused_while_an_instance_exists() {
    kshim::load().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unload.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8192 + (4 << 20))
        .unwrap();
    let local = path.display().to_string();
    let disk = Disk::create("kunload-disk", &local, 512).unwrap();
    let spec = CreateSpec {
        name: "kunload".into(),
        local: disk.name().to_owned(),
        params: Params {
            mediasize: 4 << 20,
            extentsize: 1 << 20,
            sectorsize: 512,
            keepdirty: 4,
            mode: Mode::MemSync,
        },
        localoff: 8192,
        mapoff: 4096,
        metaflush: true,
        map: vec![0; 512],
    };
    let plane = KernelPlane::create_on(KernelDevice::open_kshim(true).unwrap(), &spec).unwrap();
    assert_eq!(kshim::unload(), Err(Errno::EBUSY));
    // Still there, and still working.
    assert!(plane.stats().is_ok());

    plane.destroy(T).unwrap();
    drop(plane);
    // A control file open across the unload loses its device.
    let file = KernelDevice::open_kshim(false).unwrap();
    kshim::unload().expect("unload with no instance");
    let e = file.stats(hast::kdev::Unit(1)).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::ENXIO), "{e}");
    drop(file);
    assert!(matches!(
        KernelDevice::open_kshim(true),
        Err(hast::kdev::KdevError::Open {
            errno: Errno::ESTALE,
            ..
        })
    ));
    assert!(matches!(
        kshim::load(),
        Err(KshimError::Load(Errno::ESTALE))
    ));
    disk.destroy(T).unwrap();
    kshim::check_idle().unwrap();
}

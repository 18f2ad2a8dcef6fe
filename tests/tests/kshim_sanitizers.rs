//! The geom_hast kernel module (kmod/g_hast.c, hast_core.c, unchanged) on
//! the userland kernel shim, built with AddressSanitizer and with
//! ThreadSanitizer into the shim's C driver (sys/kshim/test/kshim_test.c:
//! writes and the counter bump, peer reads, resync, ENOMEM from g_clone_bio
//! and M_NOWAIT, the local disk orphaned under writes, destroy with
//! requests in flight, unload refused while an instance exists, a copyout
//! fault on UPCALL, and stress runs with link flaps, resync locks, flushes,
//! injected allocation failures and copyout faults, one losing the local
//! disk halfway, one destroying the instance under the engine's requests):
//! zero reports from either (tests/kshim-check.sh;
//! `make test-kshim` runs the plain build and the planted bugs).

use std::process::Command;

fn check(what: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("sh")
        .arg(root.join("tests/kshim-check.sh"))
        .arg(what)
        .output()
        .expect("run tests/kshim-check.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "kshim-check.sh {what} failed:\n{text}"
    );
    assert!(
        text.contains(&format!("kshim-check: {what}: ok (zero reports)")),
        "{text}"
    );
}

#[test]
fn the_module_is_clean_under_address_sanitizer() {
    check("asan");
}

#[test]
fn the_module_is_clean_under_thread_sanitizer() {
    check("tsan");
}

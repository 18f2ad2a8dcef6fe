//! Builds the portable fast-path core (kmod/hast_core.c) with the userland
//! shim (pthreads) and generates Rust bindings for ffi/hast_abi.h and
//! kmod/hast_core.h with bindgen.
use std::env;
use std::path::PathBuf;

fn main() {
    let manifest = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = PathBuf::from(manifest).join("..");
    let ffi = root.join("ffi");
    let kmod = root.join("kmod");
    let shim = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("csrc/hast_shim_user.c");
    for f in [
        ffi.join("hast_abi.h"),
        kmod.join("hast_core.h"),
        kmod.join("hast_core.c"),
        kmod.join("hast_shim.h"),
        shim.clone(),
    ] {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    // The same C the kernel module compiles; warnings are errors.
    let mut build = cc::Build::new();
    build
        .file(kmod.join("hast_core.c"))
        .file(&shim)
        .include(&ffi)
        .include(&kmod)
        .std("c99")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .flag("-Wall")
        .flag("-Wextra")
        .flag("-Werror")
        .flag_if_supported("-Wstrict-prototypes")
        .flag_if_supported("-Wmissing-prototypes");
    // Invariant checks (abort on failure) in debug builds, as INVARIANTS.
    if env::var("PROFILE").map(|p| p == "debug").unwrap_or(false) {
        build.define("HAST_CORE_DEBUG", None);
    }
    build.compile("hast_core");
    println!("cargo:rustc-link-lib=pthread");

    // Cross-checking for another OS (cargo check --target
    // x86_64-unknown-freebsd) has no sysroot: clang's own stdint.h is
    // enough for the headers, and the ioctl numbers come from kdev.rs.
    let cross = env::var("TARGET").ok() != env::var("HOST").ok();
    let cross_args: &[&str] = if cross {
        &["-ffreestanding", "-DHAST_ABI_NO_IOCTL"]
    } else {
        &[]
    };
    let bindings = bindgen::Builder::default()
        .clang_args(cross_args)
        .header(ffi.join("hast_abi.h").to_string_lossy())
        .header(kmod.join("hast_core.h").to_string_lossy())
        .clang_arg(format!("-I{}", ffi.display()))
        .clang_arg(format!("-I{}", kmod.display()))
        .allowlist_function("hast_core_.*")
        .allowlist_type("hast_.*")
        .allowlist_var("HAST_.*")
        .opaque_type("hast_core")
        .use_core()
        .derive_default(true)
        .generate()
        .expect(
            "bindgen could not translate the hast headers (is libclang installed? run `make deps`)",
        );
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("cannot write bindings.rs");
}

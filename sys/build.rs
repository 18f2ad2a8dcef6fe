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

    if env::var_os("CARGO_FEATURE_KSHIM").is_some() {
        build_kshim(&root);
    }

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

/// Tests only (feature `kshim`): the FreeBSD kernel module itself,
/// kmod/g_hast.c and kmod/hast_core.c unchanged, on the userland kernel shim
/// of sys/kshim, in one archive. The module is compiled freestanding as for
/// FreeBSD with the shim's headers first in its include path, and its
/// symbols renamed (kshim_rename.h) so that it links next to the userland
/// core above. The same flags as tests/kshim-check.sh.
fn build_kshim(root: &std::path::Path) {
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "linux" {
        // The shim's disk uses Linux calls; nothing to build elsewhere.
        return;
    }
    let kshim = root.join("sys/kshim");
    let kmod = root.join("kmod");
    let ffi = root.join("ffi");
    println!("cargo:rerun-if-changed={}", kshim.display());
    println!("cargo:rerun-if-changed={}", kmod.join("g_hast.c").display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    // The compiler's own headers (stdint.h): the module sees no others.
    let probe = cc::Build::new().get_compiler();
    let inc = std::process::Command::new(probe.path())
        .arg("-print-file-name=include")
        .output()
        .expect("run the C compiler for its include directory");
    let inc = String::from_utf8(inc.stdout)
        .expect("an include path")
        .trim()
        .to_owned();

    let mut module = cc::Build::new();
    module
        .file(kshim.join("kmod_g_hast.c"))
        .file(kmod.join("hast_core.c"))
        .out_dir(out.join("kshim-kmod"))
        .std("gnu99")
        .flag("-ffreestanding")
        .flag("-nostdinc")
        .flag("-isystem")
        .flag(&inc)
        .include(kshim.join("include"))
        .include(&kshim)
        .include(&kmod)
        .include(&ffi)
        .define("_KERNEL", None)
        .define("__FreeBSD__", Some("13"))
        .define("INVARIANTS", None)
        .define("HAST_CORE_DEBUG", None)
        .flag("-include")
        .flag(kshim.join("kshim_rename.h").to_string_lossy().as_ref())
        .warnings(true)
        .extra_warnings(true)
        .flag("-Wno-unused-parameter")
        .warnings_into_errors(true);
    let objects = module.compile_intermediates();

    let mut shim = cc::Build::new();
    shim.out_dir(out.join("kshim-host"))
        .std("gnu11")
        .define("_GNU_SOURCE", None)
        .include(&kshim)
        .include(&ffi)
        .warnings(true)
        .extra_warnings(true)
        .flag("-Wno-unused-parameter")
        .warnings_into_errors(true)
        .objects(&objects);
    for f in std::fs::read_dir(&kshim).expect("read sys/kshim") {
        let path = f.expect("a directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if (name.starts_with("kern_") || name.starts_with("geom_")) && name.ends_with(".c") {
            shim.file(&path);
        }
    }
    shim.compile("hast_kshim");
}

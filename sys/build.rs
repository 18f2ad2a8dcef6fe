//! Generates Rust bindings for ffi/hast_abi.h with bindgen.
use std::env;
use std::path::PathBuf;

fn main() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("..");
    let abi = root.join("ffi/hast_abi.h");
    println!("cargo:rerun-if-changed={}", abi.display());
    let bindings = bindgen::Builder::default()
        .header(abi.to_string_lossy())
        .use_core()
        .generate()
        .expect(
            "bindgen could not translate ffi/hast_abi.h (is libclang installed? run `make deps`)",
        );
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("cannot write bindings.rs");
}

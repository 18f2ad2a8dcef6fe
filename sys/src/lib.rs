//! hast-sys: raw bindings to the ABI shared by the kernel module and userland
//! (ffi/hast_abi.h) and to the portable fast-path core (kmod/hast_core.h),
//! which build.rs compiles with a userland shim. The safe wrapper is
//! `hast::core`. With the test-only feature `kshim` (Linux), also the
//! geom_hast kernel module itself on the userland kernel shim ([`kshim`]).
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

#[cfg(all(feature = "kshim", target_os = "linux"))]
pub mod kshim;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_version_is_exported() {
        assert_eq!(HAST_ABI_VERSION, 3);
        assert_eq!(HAST_ABI_ROLE_PRIMARY, 2);
        assert_eq!(HAST_CMD_WRITE, 2);
        assert_eq!(HAST_REPL_MEMSYNC, 1);
    }

    #[test]
    fn abi_structs_have_fixed_sizes() {
        // Every ABI struct is a multiple of 8 bytes with no hidden padding.
        assert_eq!(core::mem::size_of::<hast_abi_upcall>(), 72);
        assert_eq!(core::mem::size_of::<hast_abi_downcall>(), 48);
        assert_eq!(core::mem::size_of::<hast_abi_range>(), 64);
        assert_eq!(core::mem::size_of::<hast_abi_map>(), 32);
        assert_eq!(core::mem::size_of::<hast_abi_create>(), 200);
        assert_eq!(core::mem::size_of::<hast_abi_stats>(), 216);
    }

    #[test]
    fn core_links_and_rejects_bad_geometry() {
        let params = hast_core_params {
            hcp_mediasize: 1 << 20,
            hcp_extentsize: 3000,
            hcp_sectorsize: 512,
            hcp_keepdirty: 4,
            hcp_mode: HAST_REPL_FULLSYNC,
        };
        let ops = hast_core_ops::default();
        let mut core = core::ptr::null_mut();
        let rc = unsafe { hast_core_create(&params, &ops, core::ptr::null_mut(), &mut core) };
        assert_eq!(rc, HAST_EINVAL as i32);
        assert!(core.is_null());
    }
}

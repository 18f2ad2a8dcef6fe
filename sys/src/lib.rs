//! hast-sys: raw bindings to the ABI shared by the kernel module and userland.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

#[cfg(test)]
mod tests {
    #[test]
    fn abi_version_is_exported() {
        assert_eq!(super::HAST_ABI_VERSION, 1);
        assert_eq!(super::HAST_ABI_ROLE_PRIMARY, 2);
    }
}

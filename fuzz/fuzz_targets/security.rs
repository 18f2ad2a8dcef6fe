//! What link security parses from files and hast.conf: a fingerprint
//! (`peerfingerprint`, `hastctl fingerprint`), a key pair file (`keyfile`),
//! a CA file (`cafile`) and a secret (`secretfile`). Nothing panics; a
//! fingerprint that parses prints as `sha256:` and 64 hex digits and parses
//! back to itself; a key pair that loads has the fingerprint its
//! certificate has.
#![no_main]

use hast::security::secret::Secret;
use hast::security::tls::{certificate_fingerprint, CaRoots, NodeKey};
use hast::security::Fingerprint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(fp) = Fingerprint::parse(text) {
            let printed = fp.to_string();
            assert_eq!(printed.len(), 7 + 64);
            assert_eq!(Fingerprint::parse(&printed), Ok(fp));
        }
    }
    let cert = certificate_fingerprint(data);
    if let Ok(key) = NodeKey::from_pem(data) {
        assert_eq!(cert.ok(), Some(key.identity.key));
    }
    let _ = CaRoots::from_pem(data);
    if let Ok(s) = Secret::from_bytes(data) {
        assert!(s.same(&Secret::from_bytes(data).unwrap()));
    }
});

//! nv decoding: any bytes decode or fail cleanly; what decodes and can be
//! encoded again round-trips (decode(encode(x)) == x, and encoding is
//! stable), and lookups agree with iteration.
#![no_main]

use hast::nv::{Nv, NV_MAX_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(nv) = Nv::decode(data) else {
        return;
    };
    assert!(data.len() <= NV_MAX_SIZE);
    // Lookups see the first element of a name.
    for (name, value) in nv.iter() {
        let first = nv.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
        assert_eq!(nv.get(name), first);
        let _ = value.to_string();
    }
    // Names or strings that were not UTF-8 come back lossily and may then
    // be too long to encode; everything else encodes.
    let Ok(bytes) = nv.encode() else {
        return;
    };
    assert_eq!(bytes.len(), nv.encoded_len());
    let back = Nv::decode(&bytes).expect("an encoded list decodes");
    assert_eq!(back, nv);
    assert_eq!(back.encode().expect("re-encodes"), bytes);
});

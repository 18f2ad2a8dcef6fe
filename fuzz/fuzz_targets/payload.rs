//! Payload decompression (hole, lzf) and checksums (crc32, sha256) as a
//! receiver applies them: a received payload with the nv fields that came
//! with it is refused or decodes to exactly the request's length, never
//! allocating beyond the negotiated maximum; decode and decode_into agree;
//! the raw LZF decoder never writes past its buffer. And the other way:
//! any compression and checksum of the input bytes decodes back to them.
#![no_main]

use hast::config::{Checksum, Compression};
use hast::nv::Nv;
use hast::payload::{self, lzf};
use hast_fuzz::{PayloadInput, PAYLOAD_MAX};
use libfuzzer_sys::fuzz_target;

const ALL_COMPRESSION: [Compression; 3] = [Compression::None, Compression::Hole, Compression::Lzf];
const ALL_CHECKSUM: [Checksum; 3] = [Checksum::None, Checksum::Crc32, Checksum::Sha256];

fuzz_target!(|data: &[u8]| {
    // The raw LZF stream decoder, with an output buffer of any size.
    let mut out = vec![0u8; data.len().saturating_mul(4).min(1 << 16)];
    if let Ok(n) = lzf::decompress(data, &mut out) {
        assert!(n <= out.len());
    }

    // Encoding round-trips, whatever the data (one pipeline per input,
    // chosen by its first byte).
    let sel = usize::from(data.first().copied().unwrap_or(0));
    let (c, k) = (ALL_COMPRESSION[sel % 3], ALL_CHECKSUM[sel / 3 % 3]);
    let mut nv = Nv::new();
    nv.add_u64("seq", 1);
    let wire = payload::encode(&mut nv, data, c, k).into_owned();
    assert!(wire.len() <= data.len().max(4));
    let back = payload::decode(&nv, wire, data.len(), PAYLOAD_MAX.max(data.len()))
        .expect("own payload decodes");
    assert_eq!(back, data);

    // A received payload.
    let Some(input) = PayloadInput::split(data) else {
        return;
    };
    let Ok(nv) = Nv::decode(input.nv) else {
        return;
    };
    let decoded = payload::decode(&nv, input.payload.to_vec(), input.expected_len, PAYLOAD_MAX);
    if let Ok(block) = &decoded {
        assert_eq!(block.len(), input.expected_len);
    }
    if input.expected_len <= PAYLOAD_MAX {
        let mut buf = vec![0xa5u8; input.expected_len];
        let into = payload::decode_into(&nv, input.payload, &mut buf, PAYLOAD_MAX);
        match (&decoded, into) {
            (Ok(block), Ok(())) => assert_eq!(block, &buf),
            (Err(a), Err(b)) => assert_eq!(a, &b),
            (a, b) => panic!("decode and decode_into disagree: {a:?} vs {b:?}"),
        }
    } else {
        assert!(decoded.is_err());
    }
});

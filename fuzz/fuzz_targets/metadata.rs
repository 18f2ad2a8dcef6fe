//! Metadata decoding from the 4096-byte block at the start of a provider:
//! any block decodes or is refused; decoded metadata is within the limits
//! the rest of the daemon relies on, encodes back to a block that decodes
//! to the same, and its dump text and geometry are computable.
#![no_main]

use hast::activemap;
use hast::metadata::{dump_text, Metadata, MAX_EXTENTSIZE, METADATA_SIZE};
use hast::nv::Nv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // What Metadata::read hands the decoder: exactly one block.
    let mut block = vec![0u8; METADATA_SIZE as usize];
    let n = data.len().min(block.len());
    block[..n].copy_from_slice(&data[..n]);
    // Ask for the resource the block names, so that decoding goes on past
    // the name check; and once for another name.
    let named = Nv::decode(&block)
        .ok()
        .and_then(|nv| nv.get_string("resource").map(str::to_string))
        .unwrap_or_else(|| "data".to_string());
    assert!(Metadata::decode(&block, "\u{1}other").is_err() || named == "\u{1}other");
    let Ok(md) = Metadata::decode(&block, &named) else {
        return;
    };
    assert_eq!(md.resource, named);
    assert!(md.extentsize.is_power_of_two() && u64::from(md.extentsize) <= MAX_EXTENTSIZE);
    assert!(md.keepdirty >= 1 && md.datasize >= 1);
    assert!(md.localoff >= METADATA_SIZE);
    assert!(md
        .localoff
        .checked_add(md.datasize)
        .is_some_and(|e| e <= i64::MAX as u64));
    let need = activemap::bitmap_size(md.nextents());
    assert!(md.mapsize() >= need);
    let _ = dump_text(&md);
    // Names the encoder refuses (too long for the block) are fine to
    // refuse; anything else round-trips.
    if let Ok(again) = md.encode() {
        assert_eq!(again.len(), METADATA_SIZE as usize);
        assert_eq!(
            Metadata::decode(&again, &named).expect("own block decodes"),
            md
        );
    }
});

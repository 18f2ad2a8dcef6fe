//! The nv codec against the reference's wire format and validation rules.

use hast::nv::{Nv, NvError, Value, NV_MAX_SIZE};
use proptest::prelude::*;

/// One raw element as the reference lays it out, with chosen padding bytes.
fn raw_element(ty: u8, name: &[u8], namesize: u8, data: &[u8], dsize: u32, pad: u8) -> Vec<u8> {
    let mut out = vec![ty, namesize];
    out.extend_from_slice(&dsize.to_le_bytes());
    out.extend_from_slice(name);
    while (out.len() - 6) % 8 != 0 {
        out.push(pad);
    }
    let start = out.len();
    out.extend_from_slice(data);
    while (out.len() - start) % 8 != 0 {
        out.push(pad);
    }
    out
}

fn elem(ty: u8, name: &str, data: &[u8]) -> Vec<u8> {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    raw_element(ty, &n, n.len() as u8, data, data.len() as u32, 0)
}

#[test]
fn reference_example_is_byte_exact() {
    let mut nv = Nv::new();
    nv.add_u8("cmd", 1);
    let want: [u8; 22] = [
        0x02, 0x04, 0x01, 0x00, 0x00, 0x00, 0x63, 0x6d, 0x64, 0x00, 0, 0, 0, 0, 0x01, 0, 0, 0, 0,
        0, 0, 0,
    ];
    assert_eq!(nv.encode().unwrap(), want);
}

#[test]
fn garbage_in_padding_is_ignored() {
    // The reference leaves malloc garbage in the padding: PP bytes.
    let mut buf = elem(2, "cmd", &[1]);
    for i in [10, 11, 12, 13, 15, 16, 17, 18, 19, 20, 21] {
        buf[i] = 0xA5;
    }
    let nv = Nv::decode(&buf).unwrap();
    assert_eq!(nv.get_u8("cmd"), Some(1));
    assert_eq!(nv.len(), 1);
}

#[test]
fn decoding_stops_at_a_zero_byte_and_ignores_the_rest() {
    let mut buf = elem(8, "resuid", &42u64.to_le_bytes());
    buf.extend_from_slice(&[0, 0xff, 0xff, 0x13]);
    let nv = Nv::decode(&buf).unwrap();
    assert_eq!(nv.get_u64("resuid"), Some(42));
    assert_eq!(nv.len(), 1);
    assert!(Nv::decode(&[]).unwrap().is_empty());
    assert!(Nv::decode(&[0u8; 4096]).unwrap().is_empty());
}

#[test]
fn little_endian_scalars_and_arrays() {
    let mut nv = Nv::new();
    nv.add_i16("a", -2)
        .add_u32("b", 0x01020304)
        .add("c", Value::Uint16Array(vec![1, 0x0203]))
        .add_string("s", "ab");
    let b = nv.encode().unwrap();
    // a: header 6 + name 8 + data 8
    assert_eq!(&b[14..16], &[0xfe, 0xff]);
    assert_eq!(&b[22..24], &[6, 2]);
    assert_eq!(&b[36..40], &[4, 3, 2, 1]);
    assert_eq!(&b[44..48], &[12, 2, 4, 0]);
    assert_eq!(&b[58..62], &[1, 0, 3, 2]);
    // string: dsize 3 with the NUL
    assert_eq!(&b[66..70], &[17, 2, 3, 0]);
    assert_eq!(&b[80..83], b"ab\0");
    // Elements are 6 + roundup8(namesize) + roundup8(dsize) bytes each.
    assert_eq!(b.len(), 22 + 22 + 22 + 22);
}

#[test]
fn every_validation_rule_is_enforced() {
    let check = |buf: Vec<u8>, what: &str, ok: fn(&NvError) -> bool| {
        let err = Nv::decode(&buf).expect_err(what);
        assert!(ok(&err), "{what}: unexpected error {err:?}");
        // The message says where.
        assert!(err.to_string().contains("offset"), "{what}: {err}");
    };
    // Bad type numbers: 0 is the terminator, so use 18, 0x7f and 0x82.
    for ty in [18u8, 0x7f, 0x82] {
        check(elem(ty, "x", &[1]), "bad type", |e| {
            matches!(e, NvError::BadType { .. })
        });
    }
    check(raw_element(2, b"x\0", 2, &[], 0, 0), "dsize 0", |e| {
        matches!(e, NvError::ZeroDataSize { .. })
    });
    // Scalars of the wrong size, for each width.
    for (ty, len) in [
        (1u8, 2usize),
        (2, 8),
        (3, 1),
        (4, 4),
        (5, 2),
        (6, 8),
        (7, 4),
        (8, 16),
    ] {
        check(elem(ty, "x", &vec![0; len]), "scalar size", |e| {
            matches!(e, NvError::BadScalarSize { .. })
        });
    }
    // Arrays not a multiple of the element size.
    for (ty, len) in [(11u8, 3usize), (12, 1), (13, 6), (14, 2), (15, 12), (16, 4)] {
        check(elem(ty, "x", &vec![0; len]), "array size", |e| {
            matches!(e, NvError::BadArraySize { .. })
        });
    }
    check(elem(17, "s", b"abc"), "string without NUL", |e| {
        matches!(e, NvError::StringNotTerminated { .. })
    });
    check(elem(17, "s", b"a\0c\0"), "string with inner NUL", |e| {
        matches!(e, NvError::StringInnerNul { .. })
    });
    check(
        raw_element(2, b"xy", 2, &[1], 1, 0),
        "name without NUL",
        |e| matches!(e, NvError::NameNotTerminated { .. }),
    );
    check(
        raw_element(2, b"x\0y\0", 4, &[1], 1, 0),
        "name with inner NUL",
        |e| matches!(e, NvError::NameInnerNul { .. }),
    );
    check(raw_element(2, b"", 0, &[1], 1, 0), "namesize 0", |e| {
        matches!(e, NvError::EmptyNameSize { .. })
    });
    // Truncated: header only, name cut, data cut, padding cut.
    let full = elem(8, "datasize", &7u64.to_le_bytes());
    for cut in [3, 7, 10, 20, full.len() - 1] {
        check(full[..cut].to_vec(), "truncated", |e| {
            matches!(e, NvError::Truncated { .. })
        });
    }
    // A dsize that points far past the buffer.
    check(
        raw_element(10, b"x\0", 2, &[1, 2, 3], u32::MAX, 0),
        "huge dsize",
        |e| matches!(e, NvError::Truncated { .. }),
    );
    // The second element's offset is reported.
    let mut two = elem(2, "a", &[1]);
    two.extend(elem(17, "b", b"x"));
    match Nv::decode(&two) {
        Err(NvError::StringNotTerminated { offset, name }) => {
            assert_eq!(offset, 22);
            assert_eq!(name, "b");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn oversized_lists_are_refused_both_ways() {
    let big = vec![1u8; NV_MAX_SIZE];
    let mut nv = Nv::new();
    nv.add_u8_array("data", big);
    assert!(matches!(nv.encode(), Err(NvError::TooLarge { .. })));
    let buf = vec![0u8; NV_MAX_SIZE + 1];
    assert!(matches!(Nv::decode(&buf), Err(NvError::TooLarge { .. })));
    // The largest single element under the bound (sizes are 6 mod 8)...
    let mut nv = Nv::new();
    nv.add_u8_array("d", vec![7u8; NV_MAX_SIZE - 16]);
    let b = nv.encode().unwrap();
    assert_eq!(b.len(), NV_MAX_SIZE - 2);
    assert_eq!(Nv::decode(&b).unwrap(), nv);
    // ...and one byte more of data needs 8 more bytes: refused.
    let mut nv = Nv::new();
    nv.add_u8_array("d", vec![7u8; NV_MAX_SIZE - 15]);
    assert!(matches!(nv.encode(), Err(NvError::TooLarge { .. })));
}

#[test]
fn encode_refuses_what_the_format_cannot_carry() {
    let mut nv = Nv::new();
    nv.add_u8("a\0b", 1);
    assert!(matches!(nv.encode(), Err(NvError::NameHasNul { .. })));
    let mut nv = Nv::new();
    nv.add_u8("n".repeat(255), 1);
    assert!(matches!(nv.encode(), Err(NvError::NameTooLong { .. })));
    let mut nv = Nv::new();
    nv.add_u8("n".repeat(254), 1);
    let b = nv.encode().unwrap();
    assert_eq!(b[1], 255);
    assert_eq!(Nv::decode(&b).unwrap(), nv);
    let mut nv = Nv::new();
    nv.add_string("s", "a\0b");
    assert!(matches!(nv.encode(), Err(NvError::StringHasNul { .. })));
    let mut nv = Nv::new();
    nv.add_u8_array("a", Vec::<u8>::new());
    assert!(matches!(nv.encode(), Err(NvError::EmptyArray { .. })));
}

fn name_strategy() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_%]{0,40}|[^\u{0}]{1,20}".prop_filter("fits", |s| s.len() <= 254)
}

fn value_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i8>().prop_map(Value::Int8),
        any::<u8>().prop_map(Value::Uint8),
        any::<i16>().prop_map(Value::Int16),
        any::<u16>().prop_map(Value::Uint16),
        any::<i32>().prop_map(Value::Int32),
        any::<u32>().prop_map(Value::Uint32),
        any::<i64>().prop_map(Value::Int64),
        any::<u64>().prop_map(Value::Uint64),
        prop::collection::vec(any::<i8>(), 1..20).prop_map(Value::Int8Array),
        prop::collection::vec(any::<u8>(), 1..40).prop_map(Value::Uint8Array),
        prop::collection::vec(any::<i16>(), 1..20).prop_map(Value::Int16Array),
        prop::collection::vec(any::<u16>(), 1..20).prop_map(Value::Uint16Array),
        prop::collection::vec(any::<i32>(), 1..20).prop_map(Value::Int32Array),
        prop::collection::vec(any::<u32>(), 1..20).prop_map(Value::Uint32Array),
        prop::collection::vec(any::<i64>(), 1..20).prop_map(Value::Int64Array),
        prop::collection::vec(any::<u64>(), 1..20).prop_map(Value::Uint64Array),
        "[^\u{0}]{0,60}".prop_map(Value::String),
    ]
}

proptest! {
    #[test]
    fn round_trip_all_types(elems in prop::collection::vec((name_strategy(), value_strategy()), 0..12)) {
        let mut nv = Nv::new();
        for (n, v) in &elems {
            nv.add(n.clone(), v.clone());
        }
        let bytes = nv.encode().unwrap();
        prop_assert_eq!(bytes.len(), nv.encoded_len());
        let back = Nv::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &nv);
        let got: Vec<(String, Value)> = back.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
        prop_assert_eq!(got, elems);
        // Trailing zeros (the metadata block's padding) change nothing.
        let mut padded = bytes.clone();
        padded.resize(bytes.len() + 4096, 0);
        prop_assert_eq!(Nv::decode(&padded).unwrap(), nv);
    }

    #[test]
    fn padding_garbage_never_changes_the_result(v in value_strategy(), name in "[a-z]{1,12}", g in 1u8..=255) {
        let mut nv = Nv::new();
        nv.add(name.clone(), v.clone());
        let clean = nv.encode().unwrap();
        let namesize = name.len() + 1;
        let hsize = 6 + namesize.div_ceil(8) * 8;
        let dsize = u32::from_le_bytes(clean[2..6].try_into().unwrap()) as usize;
        let mut dirty = clean.clone();
        for b in &mut dirty[6 + namesize..hsize] { *b = g; }
        for b in &mut dirty[hsize + dsize..] { *b = g; }
        prop_assert_eq!(Nv::decode(&dirty).unwrap(), nv);
    }

    #[test]
    fn decode_never_panics(buf in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Nv::decode(&buf);
    }

    #[test]
    fn decode_never_panics_on_mutated_valid_lists(
        elems in prop::collection::vec((name_strategy(), value_strategy()), 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut nv = Nv::new();
        for (n, v) in elems { nv.add(n, v); }
        let mut bytes = nv.encode().unwrap();
        for (i, b) in flips { let at = i.index(bytes.len()); bytes[at] = b; }
        let end = cut.index(bytes.len() + 1);
        let _ = Nv::decode(&bytes[..end]);
    }
}

#[test]
fn non_utf8_strings_are_accepted_like_the_reference() {
    let buf = elem(17, "errmsg", b"caf\xe9\0");
    let nv = Nv::decode(&buf).unwrap();
    assert_eq!(nv.get_string("errmsg"), Some("caf\u{fffd}"));
}

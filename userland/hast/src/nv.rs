//! The nv name/value list codec used by HAST for the replication wire, the
//! control socket and the on-disk metadata block (little-endian, 8-byte
//! aligned elements, byte-compatible with FreeBSD's `sbin/hastd/nv.c`).
//!
//! Element layout: `u8 type`, `u8 namesize` (name length + 1), `u32 dsize`
//! (little-endian), the NUL-terminated name padded to a multiple of 8, then
//! `dsize` bytes of data padded to a multiple of 8. Padding is written as
//! zeros and ignored when read. A list ends at the end of the buffer or at a
//! zero byte where the next element would start.

use std::fmt;

/// Hard upper bound on the size of an encoded nv list (1 MiB). Nothing HAST
/// sends comes near it; anything larger is refused on encode and decode.
pub const NV_MAX_SIZE: usize = 1 << 20;

/// Longest name the reference accepts (its name buffer is 255 bytes).
pub const NV_MAX_NAME_LEN: usize = 254;

/// Size of the fixed element header (type, namesize, dsize).
const HEADER_LEN: usize = 6;

/// One value of an nv list, typed as on the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int8(i8),
    Uint8(u8),
    Int16(i16),
    Uint16(u16),
    Int32(i32),
    Uint32(u32),
    Int64(i64),
    Uint64(u64),
    Int8Array(Vec<i8>),
    Uint8Array(Vec<u8>),
    Int16Array(Vec<i16>),
    Uint16Array(Vec<u16>),
    Int32Array(Vec<i32>),
    Uint32Array(Vec<u32>),
    Int64Array(Vec<i64>),
    Uint64Array(Vec<u64>),
    String(String),
}

impl Value {
    /// The wire type number (1..=17).
    pub fn type_code(&self) -> u8 {
        match self {
            Value::Int8(_) => 1,
            Value::Uint8(_) => 2,
            Value::Int16(_) => 3,
            Value::Uint16(_) => 4,
            Value::Int32(_) => 5,
            Value::Uint32(_) => 6,
            Value::Int64(_) => 7,
            Value::Uint64(_) => 8,
            Value::Int8Array(_) => 9,
            Value::Uint8Array(_) => 10,
            Value::Int16Array(_) => 11,
            Value::Uint16Array(_) => 12,
            Value::Int32Array(_) => 13,
            Value::Uint32Array(_) => 14,
            Value::Int64Array(_) => 15,
            Value::Uint64Array(_) => 16,
            Value::String(_) => 17,
        }
    }

    /// The type's name as the reference's `nv_dump` spells it.
    pub fn type_name(&self) -> &'static str {
        type_name(self.type_code())
    }

    /// Appends the little-endian data bytes (strings get their NUL).
    fn data_bytes(&self, out: &mut Vec<u8>) {
        match self {
            Value::Int8(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Uint8(v) => out.push(*v),
            Value::Int16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Uint16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Int32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Uint32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Int64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Uint64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Int8Array(a) => a
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Value::Uint8Array(a) => out.extend_from_slice(a),
            Value::Int16Array(a) => a
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Value::Uint16Array(a) => a
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Value::Int32Array(a) => a
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Value::Uint32Array(a) => a
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Value::Int64Array(a) => a
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Value::Uint64Array(a) => a
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Value::String(s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
            }
        }
    }

    /// Number of data bytes on the wire (`dsize`).
    fn data_len(&self) -> usize {
        match self {
            Value::Int8(_) | Value::Uint8(_) => 1,
            Value::Int16(_) | Value::Uint16(_) => 2,
            Value::Int32(_) | Value::Uint32(_) => 4,
            Value::Int64(_) | Value::Uint64(_) => 8,
            Value::Int8Array(a) => a.len(),
            Value::Uint8Array(a) => a.len(),
            Value::Int16Array(a) => a.len().saturating_mul(2),
            Value::Uint16Array(a) => a.len().saturating_mul(2),
            Value::Int32Array(a) => a.len().saturating_mul(4),
            Value::Uint32Array(a) => a.len().saturating_mul(4),
            Value::Int64Array(a) => a.len().saturating_mul(8),
            Value::Uint64Array(a) => a.len().saturating_mul(8),
            Value::String(s) => s.len().saturating_add(1),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, a: &[T]) -> fmt::Result {
            let mut first = true;
            for v in a {
                if !first {
                    f.write_str(" ")?;
                }
                first = false;
                write!(f, "{v}")?;
            }
            Ok(())
        }
        match self {
            Value::Int8(v) => write!(f, "{v}"),
            Value::Uint8(v) => write!(f, "{v}"),
            Value::Int16(v) => write!(f, "{v}"),
            Value::Uint16(v) => write!(f, "{v}"),
            Value::Int32(v) => write!(f, "{v}"),
            Value::Uint32(v) => write!(f, "{v}"),
            Value::Int64(v) => write!(f, "{v}"),
            Value::Uint64(v) => write!(f, "{v}"),
            Value::Int8Array(a) => list(f, a),
            Value::Uint8Array(a) => list(f, a),
            Value::Int16Array(a) => list(f, a),
            Value::Uint16Array(a) => list(f, a),
            Value::Int32Array(a) => list(f, a),
            Value::Uint32Array(a) => list(f, a),
            Value::Int64Array(a) => list(f, a),
            Value::Uint64Array(a) => list(f, a),
            Value::String(s) => f.write_str(s),
        }
    }
}

/// The reference's name for a wire type number.
pub fn type_name(code: u8) -> &'static str {
    match code {
        1 => "int8",
        2 => "uint8",
        3 => "int16",
        4 => "uint16",
        5 => "int32",
        6 => "uint32",
        7 => "int64",
        8 => "uint64",
        9 => "int8 array",
        10 => "uint8 array",
        11 => "int16 array",
        12 => "uint16 array",
        13 => "int32 array",
        14 => "uint32 array",
        15 => "int64 array",
        16 => "uint64 array",
        17 => "string",
        _ => "unknown",
    }
}

/// Why an nv list could not be encoded or decoded. Decode errors carry the
/// byte offset of the offending element (and its name once it is known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvError {
    #[error("nv list is {size} bytes, more than the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("nv element at offset {offset} is truncated: needs {need} bytes, only {have} left")]
    Truncated {
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("nv element at offset {offset} has a zero name size")]
    EmptyNameSize { offset: usize },
    #[error("nv element at offset {offset}: name is not NUL-terminated")]
    NameNotTerminated { offset: usize },
    #[error("nv element at offset {offset}: name contains a NUL before its end")]
    NameInnerNul { offset: usize },
    #[error("nv element {name:?} at offset {offset}: unknown type byte {ty:#04x} (valid: 1..=17)")]
    BadType { offset: usize, name: String, ty: u8 },
    #[error("nv element {name:?} at offset {offset}: data size is zero")]
    ZeroDataSize { offset: usize, name: String },
    #[error(
        "nv element {name:?} at offset {offset}: {ty} needs exactly {want} data bytes, has {dsize}"
    )]
    BadScalarSize {
        offset: usize,
        name: String,
        ty: &'static str,
        want: usize,
        dsize: u32,
    },
    #[error("nv element {name:?} at offset {offset}: {ty} data size {dsize} is not a multiple of {elem}")]
    BadArraySize {
        offset: usize,
        name: String,
        ty: &'static str,
        elem: usize,
        dsize: u32,
    },
    #[error("nv element {name:?} at offset {offset}: string is not NUL-terminated")]
    StringNotTerminated { offset: usize, name: String },
    #[error("nv element {name:?} at offset {offset}: string contains a NUL before its end")]
    StringInnerNul { offset: usize, name: String },
    #[error("cannot encode nv name {name:?}: {len} bytes, at most {max} allowed")]
    NameTooLong {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("cannot encode nv name {name:?}: it contains a NUL byte")]
    NameHasNul { name: String },
    #[error("cannot encode nv element {name:?}: string value contains a NUL byte")]
    StringHasNul { name: String },
    #[error("cannot encode nv element {name:?}: empty {ty} (the format has no zero-size values)")]
    EmptyArray { name: String, ty: &'static str },
}

/// An ordered nv list. Names may repeat; lookups return the first match, as
/// in the reference.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Nv {
    elems: Vec<(String, Value)>,
}

fn round8(n: usize) -> Option<usize> {
    n.checked_add(7).map(|v| v & !7)
}

macro_rules! scalar_accessors {
    ($($add:ident, $get:ident, $t:ty, $variant:ident;)*) => {
        $(
            #[doc = concat!("Appends a `", stringify!($t), "` element.")]
            pub fn $add(&mut self, name: impl Into<String>, v: $t) -> &mut Nv {
                self.add(name, Value::$variant(v))
            }
            #[doc = concat!("The first element named `name` if it is a `", stringify!($t), "`.")]
            pub fn $get(&self, name: &str) -> Option<$t> {
                match self.get(name) {
                    Some(Value::$variant(v)) => Some(*v),
                    _ => None,
                }
            }
        )*
    };
}

impl Nv {
    /// An empty list.
    pub fn new() -> Nv {
        Nv::default()
    }

    /// Appends an element (a repeated name is kept; lookups see the first).
    pub fn add(&mut self, name: impl Into<String>, value: Value) -> &mut Nv {
        self.elems.push((name.into(), value));
        self
    }

    /// Replaces the value of the first element named `name`, or appends it.
    pub fn set(&mut self, name: impl Into<String>, value: Value) -> &mut Nv {
        let name = name.into();
        match self.elems.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.elems.push((name, value)),
        }
        self
    }

    /// Removes every element named `name`; returns how many were removed.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.elems.len();
        self.elems.retain(|(n, _)| n != name);
        before - self.elems.len()
    }

    scalar_accessors! {
        add_i8, get_i8, i8, Int8;
        add_u8, get_u8, u8, Uint8;
        add_i16, get_i16, i16, Int16;
        add_u16, get_u16, u16, Uint16;
        add_i32, get_i32, i32, Int32;
        add_u32, get_u32, u32, Uint32;
        add_i64, get_i64, i64, Int64;
        add_u64, get_u64, u64, Uint64;
    }

    /// Appends a string element.
    pub fn add_string(&mut self, name: impl Into<String>, v: impl Into<String>) -> &mut Nv {
        self.add(name, Value::String(v.into()))
    }

    /// Appends a `uint8` array element.
    pub fn add_u8_array(&mut self, name: impl Into<String>, v: impl Into<Vec<u8>>) -> &mut Nv {
        self.add(name, Value::Uint8Array(v.into()))
    }

    /// The first element named `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.elems.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Whether an element named `name` exists (any type).
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The first element named `name` if it is a string.
    pub fn get_string(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The first element named `name` if it is a `uint8` array.
    pub fn get_u8_array(&self, name: &str) -> Option<&[u8]> {
        match self.get(name) {
            Some(Value::Uint8Array(a)) => Some(a),
            _ => None,
        }
    }

    /// The elements in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.elems.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.elems.len()
    }

    /// Whether the list has no elements.
    pub fn is_empty(&self) -> bool {
        self.elems.is_empty()
    }

    /// Number of bytes [`Nv::encode`] produces (without validating).
    pub fn encoded_len(&self) -> usize {
        self.elems.iter().fold(0usize, |acc, (n, v)| {
            let name = round8(n.len().saturating_add(1)).unwrap_or(usize::MAX);
            let data = round8(v.data_len()).unwrap_or(usize::MAX);
            acc.saturating_add(HEADER_LEN)
                .saturating_add(name)
                .saturating_add(data)
        })
    }

    /// Encodes the list: names at most [`NV_MAX_NAME_LEN`] bytes without NUL,
    /// strings without NUL, arrays not empty, total at most [`NV_MAX_SIZE`].
    /// Padding is zero.
    pub fn encode(&self) -> Result<Vec<u8>, NvError> {
        let size = self.encoded_len();
        if size > NV_MAX_SIZE {
            return Err(NvError::TooLarge {
                size,
                max: NV_MAX_SIZE,
            });
        }
        let mut out = Vec::with_capacity(size);
        for (name, value) in &self.elems {
            if name.len() > NV_MAX_NAME_LEN {
                return Err(NvError::NameTooLong {
                    name: name.clone(),
                    len: name.len(),
                    max: NV_MAX_NAME_LEN,
                });
            }
            if name.as_bytes().contains(&0) {
                return Err(NvError::NameHasNul { name: name.clone() });
            }
            if let Value::String(s) = value {
                if s.as_bytes().contains(&0) {
                    return Err(NvError::StringHasNul { name: name.clone() });
                }
            }
            let dsize = value.data_len();
            if dsize == 0 {
                return Err(NvError::EmptyArray {
                    name: name.clone(),
                    ty: value.type_name(),
                });
            }
            // Both fit: the name is at most 254 bytes and the whole list at
            // most NV_MAX_SIZE.
            let namesize = u8::try_from(name.len() + 1).unwrap_or(u8::MAX);
            let dsize32 = u32::try_from(dsize).unwrap_or(u32::MAX);
            out.push(value.type_code());
            out.push(namesize);
            out.extend_from_slice(&dsize32.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            pad_to8(&mut out, name.len() + 1);
            let before = out.len();
            value.data_bytes(&mut out);
            let written = out.len() - before;
            pad_to8(&mut out, written);
        }
        Ok(out)
    }

    /// Decodes and validates a list with every rule of the reference: name
    /// NUL-terminated without inner NUL, type 1..=17, data size not zero,
    /// scalars of exact size, arrays a multiple of the element size, strings
    /// with exactly one NUL at the end, no element past the buffer. Decoding
    /// stops at the end of `buf` or at a zero byte where an element would
    /// start. Names and strings that are not UTF-8 are decoded lossily.
    pub fn decode(buf: &[u8]) -> Result<Nv, NvError> {
        if buf.len() > NV_MAX_SIZE {
            return Err(NvError::TooLarge {
                size: buf.len(),
                max: NV_MAX_SIZE,
            });
        }
        let mut nv = Nv::new();
        let mut off = 0usize;
        while let Some(rest) = buf.get(off..) {
            match rest.first() {
                None | Some(0) => break,
                Some(_) => {}
            }
            let (name, value, size) = decode_element(rest, off)?;
            nv.elems.push((name, value));
            off = off.saturating_add(size);
        }
        Ok(nv)
    }
}

/// Appends the zeros that pad a field of `len` bytes to a multiple of 8.
fn pad_to8(out: &mut Vec<u8>, len: usize) {
    let pad = (8 - len % 8) % 8;
    out.resize(out.len() + pad, 0);
}

/// Decodes the element at the start of `rest` (found at `offset` of the
/// whole buffer); returns it and its padded size.
fn decode_element(rest: &[u8], offset: usize) -> Result<(String, Value, usize), NvError> {
    let have = rest.len();
    let truncated = |need: usize| NvError::Truncated { offset, need, have };
    // The smallest element: header, a one-character name and its NUL.
    if have < HEADER_LEN + 2 {
        return Err(truncated(HEADER_LEN + 2));
    }
    let (ty, namesize) = match rest {
        [t, n, ..] => (*t, usize::from(*n)),
        _ => return Err(truncated(HEADER_LEN + 2)),
    };
    if namesize == 0 {
        return Err(NvError::EmptyNameSize { offset });
    }
    let hsize = HEADER_LEN + round8(namesize).unwrap_or(usize::MAX);
    if have < hsize {
        return Err(truncated(hsize));
    }
    let name_bytes = rest
        .get(HEADER_LEN..HEADER_LEN + namesize)
        .ok_or_else(|| truncated(hsize))?;
    let (last, body) = match name_bytes.split_last() {
        Some(x) => x,
        None => return Err(NvError::EmptyNameSize { offset }),
    };
    if *last != 0 {
        return Err(NvError::NameNotTerminated { offset });
    }
    if body.contains(&0) {
        return Err(NvError::NameInnerNul { offset });
    }
    // The reference accepts any bytes; invalid UTF-8 is replaced rather
    // than failing the whole list (a peer's error message in a non-UTF-8
    // locale must not break the protocol).
    let name = String::from_utf8_lossy(body).into_owned();
    if !(1..=17).contains(&ty) {
        return Err(NvError::BadType { offset, name, ty });
    }
    let dsize = match rest.get(2..6) {
        Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
        _ => return Err(truncated(HEADER_LEN)),
    };
    if dsize == 0 {
        return Err(NvError::ZeroDataSize { offset, name });
    }
    let dlen = usize::try_from(dsize).unwrap_or(usize::MAX);
    let total = hsize.saturating_add(round8(dlen).unwrap_or(usize::MAX));
    if have < total {
        return Err(truncated(total));
    }
    let data = rest
        .get(hsize..hsize.saturating_add(dlen))
        .ok_or_else(|| truncated(total))?;
    let tname = type_name(ty);
    let scalar = |want: usize, name: String| -> Result<String, NvError> {
        if dlen != want {
            Err(NvError::BadScalarSize {
                offset,
                name,
                ty: tname,
                want,
                dsize,
            })
        } else {
            Ok(name)
        }
    };
    let array = |elem: usize, name: String| -> Result<String, NvError> {
        if dlen % elem != 0 {
            Err(NvError::BadArraySize {
                offset,
                name,
                ty: tname,
                elem,
                dsize,
            })
        } else {
            Ok(name)
        }
    };
    let name = match ty {
        1 | 2 => scalar(1, name)?,
        3 | 4 => scalar(2, name)?,
        5 | 6 => scalar(4, name)?,
        7 | 8 => scalar(8, name)?,
        11 | 12 => array(2, name)?,
        13 | 14 => array(4, name)?,
        15 | 16 => array(8, name)?,
        _ => name,
    };
    let value = match ty {
        1 => Value::Int8(first(data).map(i8::from_le_bytes).unwrap_or(0)),
        2 => Value::Uint8(first(data).map(u8::from_le_bytes).unwrap_or(0)),
        3 => Value::Int16(first(data).map(i16::from_le_bytes).unwrap_or(0)),
        4 => Value::Uint16(first(data).map(u16::from_le_bytes).unwrap_or(0)),
        5 => Value::Int32(first(data).map(i32::from_le_bytes).unwrap_or(0)),
        6 => Value::Uint32(first(data).map(u32::from_le_bytes).unwrap_or(0)),
        7 => Value::Int64(first(data).map(i64::from_le_bytes).unwrap_or(0)),
        8 => Value::Uint64(first(data).map(u64::from_le_bytes).unwrap_or(0)),
        9 => Value::Int8Array(le_chunks(data).map(i8::from_le_bytes).collect()),
        10 => Value::Uint8Array(data.to_vec()),
        11 => Value::Int16Array(le_chunks(data).map(i16::from_le_bytes).collect()),
        12 => Value::Uint16Array(le_chunks(data).map(u16::from_le_bytes).collect()),
        13 => Value::Int32Array(le_chunks(data).map(i32::from_le_bytes).collect()),
        14 => Value::Uint32Array(le_chunks(data).map(u32::from_le_bytes).collect()),
        15 => Value::Int64Array(le_chunks(data).map(i64::from_le_bytes).collect()),
        16 => Value::Uint64Array(le_chunks(data).map(u64::from_le_bytes).collect()),
        _ => {
            // 17: a string with exactly one NUL, at its end.
            let (last, body) = match data.split_last() {
                Some(x) => x,
                None => return Err(NvError::ZeroDataSize { offset, name }),
            };
            if *last != 0 {
                return Err(NvError::StringNotTerminated { offset, name });
            }
            if body.contains(&0) {
                return Err(NvError::StringInnerNul { offset, name });
            }
            Value::String(String::from_utf8_lossy(body).into_owned())
        }
    };
    Ok((name, value, total))
}

/// The first `N` bytes of `data` as an array (sizes were checked before).
fn first<const N: usize>(data: &[u8]) -> Option<[u8; N]> {
    data.get(..N).and_then(|c| <[u8; N]>::try_from(c).ok())
}

/// Splits `data` into exact `N`-byte arrays (a trailing remainder, which the
/// callers have already refused, is dropped).
fn le_chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N)
        .filter_map(|c| <[u8; N]>::try_from(c).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_example_cmd_uint8() {
        let mut nv = Nv::new();
        nv.add_u8("cmd", 1);
        let bytes = nv.encode().unwrap();
        assert_eq!(
            bytes,
            [
                0x02, 0x04, 0x01, 0x00, 0x00, 0x00, b'c', b'm', b'd', 0x00, 0, 0, 0, 0, 0x01, 0, 0,
                0, 0, 0, 0, 0
            ]
        );
        assert_eq!(Nv::decode(&bytes).unwrap(), nv);
    }

    #[test]
    fn first_match_wins_and_type_must_match() {
        let mut nv = Nv::new();
        nv.add_u32("x", 7).add_u64("x", 9);
        assert_eq!(nv.get_u32("x"), Some(7));
        assert_eq!(nv.get_u64("x"), None);
        nv.set("x", Value::Uint64(3));
        assert_eq!(nv.get_u64("x"), Some(3));
        assert_eq!(nv.remove("x"), 2);
        assert!(nv.is_empty());
    }
}

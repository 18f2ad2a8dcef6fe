//! The replication payload pipeline of HAST protocol version 2: compress
//! (`hole`, `lzf`) and then checksum (`crc32`, `sha256`) a data block before
//! it is framed, and undo both, with every length checked, when one arrives.
//!
//! Wire facts (byte-compatible with FreeBSD's hastd):
//! - Stages run compression first, then the checksum over the *compressed*
//!   bytes; the receiver verifies the checksum first, then decompresses.
//! - A compressed payload carries nv `compression` (string `"hole"` or
//!   `"lzf"`); nothing is added when the block was left as it is.
//! - A checksummed payload carries nv `checksum` (string `"crc32"` or
//!   `"sha256"`) and `hash` (uint8 array: the CRC-32 as 4 little-endian
//!   bytes, or the 32-byte SHA-256 digest).
//! - `hole`: an all-zero block travels as its length, 4 bytes little-endian.
//! - `lzf`: `hole` is tried first (and then announced as `"hole"`); else a
//!   block longer than 1024 bytes travels as its length (4 bytes
//!   little-endian) followed by an LZF stream, provided that stream is at
//!   most `length - 1024` bytes long; otherwise the block is sent as is.
//! - The payload's own size (nv `size`) is added by the framing layer
//!   ([`crate::proto`]), not here.
//!
//! Unlike the reference, a receiver never trusts a length from the wire: the
//! decompressed size must equal the request's length, which must not exceed
//! the negotiated maximum, and nothing is allocated before those checks.
//! Malformed input is an error, never an abort (the reference asserts on an
//! `lzf` payload of at most 4 bytes or announcing at most 1024; the latter is
//! decodable and accepted here). The reference copies the CRC-32 in host
//! byte order; every FreeBSD host HAST runs on in practice is little-endian,
//! so it is sent and expected little-endian.

use std::borrow::Cow;
use std::fmt;

use sha2::{Digest, Sha256};

use crate::config::{Checksum, Compression};
use crate::nv::{Nv, Value};

/// nv field naming the compression applied to the payload.
pub const COMPRESSION_FIELD: &str = "compression";
/// nv field naming the checksum algorithm.
pub const CHECKSUM_FIELD: &str = "checksum";
/// nv field holding the digest (uint8 array).
pub const HASH_FIELD: &str = "hash";

/// Blocks of at most this many bytes are never LZF-compressed, and an LZF
/// stream is only sent when it is shorter than the block by at least this.
pub const LZF_MIN_SAVING: usize = 1024;

/// Size of the little-endian original-length prefix of `hole` and `lzf`.
const LEN_PREFIX: usize = 4;

/// Bytes of a CRC-32 digest on the wire.
pub const CRC32_LEN: usize = 4;
/// Bytes of a SHA-256 digest on the wire.
pub const SHA256_LEN: usize = 32;

/// Which message a payload belonged to, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A request or reply carrying nv `seq`.
    Seq(u64),
    /// A message without a `seq` (e.g. the handshake's activemap).
    Unnumbered,
}

impl Origin {
    /// The `seq` of `nv` (uint64), if it has one.
    pub fn of(nv: &Nv) -> Origin {
        match nv.get_u64("seq") {
            Some(seq) => Origin::Seq(seq),
            None => Origin::Unnumbered,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Seq(seq) => write!(f, "request seq {seq}"),
            Origin::Unnumbered => f.write_str("message without seq"),
        }
    }
}

/// A payload that could not be accepted, and the message it came with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("payload of {origin} refused: {kind}; the peer is faulty or the data was corrupted in transit (the connection should be dropped)")]
pub struct PayloadError {
    pub origin: Origin,
    pub kind: PayloadErrorKind,
}

/// What exactly was wrong with a received payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadErrorKind {
    #[error("nv field \"{field}\" is a {found}, expected {expected}")]
    FieldType {
        field: &'static str,
        found: &'static str,
        expected: &'static str,
    },
    #[error("unknown compression algorithm \"{0}\" (known: hole, lzf)")]
    UnknownCompression(String),
    #[error("unknown checksum algorithm \"{0}\" (known: crc32, sha256)")]
    UnknownChecksum(String),
    #[error("checksum \"{0}\" announced but the nv field \"hash\" is missing")]
    MissingHash(&'static str),
    #[error("{algo} hash of {got} bytes, expected {want}")]
    HashSize {
        algo: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{algo} hash mismatch over {len} payload bytes")]
    HashMismatch { algo: &'static str, len: usize },
    #[error("request length {len} exceeds the negotiated maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("payload of {got} bytes exceeds the negotiated maximum of {max} bytes")]
    PayloadTooLarge { got: usize, max: usize },
    #[error("payload of {got} bytes where the request's length is {want}")]
    Length { got: usize, want: usize },
    #[error("\"hole\" payload of {0} bytes, expected exactly 4")]
    HoleSize(usize),
    #[error("\"{algo}\" payload announces {announced} bytes where the request's length is {want}")]
    AnnouncedLength {
        algo: &'static str,
        announced: u32,
        want: usize,
    },
    #[error("\"lzf\" payload of {0} bytes is too short (needs a 4-byte length and data)")]
    LzfTooShort(usize),
    #[error("bad LZF data: {0}")]
    Lzf(#[from] lzf::LzfError),
}

/// The digest `checksum` puts in nv `hash` for `data` (empty for `None`).
pub fn digest(checksum: Checksum, data: &[u8]) -> Vec<u8> {
    match checksum {
        Checksum::None => Vec::new(),
        Checksum::Crc32 => crc32fast::hash(data).to_le_bytes().to_vec(),
        Checksum::Sha256 => Sha256::digest(data).to_vec(),
    }
}

/// Whether every byte of `data` is zero (true for an empty slice).
pub fn is_all_zero(data: &[u8]) -> bool {
    // Probe the ends first so typical non-zero blocks are rejected at once,
    // then fold whole words so the scan vectorises.
    if data.first().is_some_and(|&b| b != 0) || data.last().is_some_and(|&b| b != 0) {
        return false;
    }
    let mut words = data.chunks_exact(16);
    let mut acc = 0u128;
    for w in &mut words {
        let mut a = [0u8; 16];
        a.copy_from_slice(w);
        acc |= u128::from_ne_bytes(a);
    }
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// Prepares `data` for the wire: applies `compression`, then `checksum` over
/// the result, and records both in `nv` (any earlier `compression`,
/// `checksum` and `hash` fields are replaced). Returns the payload to send;
/// it borrows `data` when nothing was compressed. The framing layer adds
/// nv `size` afterwards.
pub fn encode<'a>(
    nv: &mut Nv,
    data: &'a [u8],
    compression: Compression,
    checksum: Checksum,
) -> Cow<'a, [u8]> {
    nv.remove(COMPRESSION_FIELD);
    nv.remove(CHECKSUM_FIELD);
    nv.remove(HASH_FIELD);

    let compressed = compress(data, compression);
    let wire: Cow<'a, [u8]> = match compressed {
        Some((used, bytes)) => {
            nv.add_string(COMPRESSION_FIELD, used.as_str());
            Cow::Owned(bytes)
        }
        None => Cow::Borrowed(data),
    };
    if checksum != Checksum::None {
        nv.add_string(CHECKSUM_FIELD, checksum.as_str());
        nv.add_u8_array(HASH_FIELD, digest(checksum, &wire));
    }
    wire
}

/// Compresses per `compression`; `None` when the block goes as it is.
/// Returns the algorithm actually used (`lzf` falls back to `hole`).
fn compress(data: &[u8], compression: Compression) -> Option<(Compression, Vec<u8>)> {
    if compression == Compression::None || data.is_empty() {
        return None;
    }
    // Both encodings carry the length in 32 bits.
    let len32 = u32::try_from(data.len()).ok()?;
    if is_all_zero(data) {
        return Some((Compression::Hole, len32.to_le_bytes().to_vec()));
    }
    if compression != Compression::Lzf || data.len() <= LZF_MIN_SAVING {
        return None;
    }
    let budget = data.len() - LZF_MIN_SAVING;
    let mut out = Vec::with_capacity(LEN_PREFIX + budget);
    out.extend_from_slice(&len32.to_le_bytes());
    if lzf::compress_into(data, &mut out, budget) {
        Some((Compression::Lzf, out))
    } else {
        None
    }
}

/// The pipeline fields of a received nv, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'n> {
    pub compression: Compression,
    /// The algorithm and the received digest.
    pub checksum: Option<(Checksum, &'n [u8])>,
}

impl<'n> Header<'n> {
    /// Reads `compression`, `checksum` and `hash` from `nv`. Like the
    /// reference, a missing field means "not applied", and `"none"` is not a
    /// name a peer sends (it is refused as unknown).
    pub fn parse(nv: &'n Nv) -> Result<Header<'n>, PayloadErrorKind> {
        let compression = match string_field(nv, COMPRESSION_FIELD)? {
            None => Compression::None,
            Some("hole") => Compression::Hole,
            Some("lzf") => Compression::Lzf,
            Some(other) => return Err(PayloadErrorKind::UnknownCompression(other.to_owned())),
        };
        let checksum = match string_field(nv, CHECKSUM_FIELD)? {
            None => None,
            Some(name) => {
                let algo = match name {
                    "crc32" => Checksum::Crc32,
                    "sha256" => Checksum::Sha256,
                    other => return Err(PayloadErrorKind::UnknownChecksum(other.to_owned())),
                };
                let hash = match nv.get(HASH_FIELD) {
                    None => return Err(PayloadErrorKind::MissingHash(algo.as_str())),
                    Some(Value::Uint8Array(h)) => h.as_slice(),
                    Some(v) => {
                        return Err(PayloadErrorKind::FieldType {
                            field: HASH_FIELD,
                            found: v.type_name(),
                            expected: "uint8 array",
                        })
                    }
                };
                Some((algo, hash))
            }
        };
        Ok(Header {
            compression,
            checksum,
        })
    }
}

fn string_field<'n>(nv: &'n Nv, field: &'static str) -> Result<Option<&'n str>, PayloadErrorKind> {
    match nv.get(field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(PayloadErrorKind::FieldType {
            field,
            found: v.type_name(),
            expected: "string",
        }),
    }
}

/// Checks the payload's digest against the header's.
fn verify(header: &Header<'_>, payload: &[u8]) -> Result<(), PayloadErrorKind> {
    let Some((algo, received)) = header.checksum else {
        return Ok(());
    };
    let want = match algo {
        Checksum::None => 0,
        Checksum::Crc32 => CRC32_LEN,
        Checksum::Sha256 => SHA256_LEN,
    };
    if received.len() != want {
        return Err(PayloadErrorKind::HashSize {
            algo: algo.as_str(),
            got: received.len(),
            want,
        });
    }
    if digest(algo, payload) != received {
        return Err(PayloadErrorKind::HashMismatch {
            algo: algo.as_str(),
            len: payload.len(),
        });
    }
    Ok(())
}

/// Splits a `hole`/`lzf` payload into its announced length and the rest,
/// requiring the announced length to be the request's.
fn announced<'p>(
    algo: &'static str,
    payload: &'p [u8],
    want: usize,
) -> Result<&'p [u8], PayloadErrorKind> {
    let (len, rest) = payload
        .split_first_chunk::<LEN_PREFIX>()
        .ok_or(PayloadErrorKind::LzfTooShort(payload.len()))?;
    let announced = u32::from_le_bytes(*len);
    if usize::try_from(announced).ok() != Some(want) {
        return Err(PayloadErrorKind::AnnouncedLength {
            algo,
            announced,
            want,
        });
    }
    Ok(rest)
}

/// Common checks, then checksum; returns the parsed header.
fn check<'n>(
    nv: &'n Nv,
    payload: &[u8],
    expected_len: usize,
    max: usize,
) -> Result<Header<'n>, PayloadErrorKind> {
    if expected_len > max {
        return Err(PayloadErrorKind::TooLarge {
            len: expected_len,
            max,
        });
    }
    if payload.len() > max {
        return Err(PayloadErrorKind::PayloadTooLarge {
            got: payload.len(),
            max,
        });
    }
    let header = Header::parse(nv)?;
    verify(&header, payload)?;
    match header.compression {
        Compression::None if payload.len() != expected_len => Err(PayloadErrorKind::Length {
            got: payload.len(),
            want: expected_len,
        }),
        Compression::Hole if payload.len() != LEN_PREFIX => {
            Err(PayloadErrorKind::HoleSize(payload.len()))
        }
        Compression::Lzf if payload.len() <= LEN_PREFIX => {
            Err(PayloadErrorKind::LzfTooShort(payload.len()))
        }
        _ => Ok(header),
    }
}

/// Undoes [`encode`]: verifies the checksum named in `nv`, then
/// decompresses. The result is exactly `expected_len` bytes (the request's
/// length), which must not exceed `max` (the negotiated maximum); anything
/// else is refused before memory is allocated for it. Returns `payload`
/// itself when it was not compressed.
pub fn decode(
    nv: &Nv,
    payload: Vec<u8>,
    expected_len: usize,
    max: usize,
) -> Result<Vec<u8>, PayloadError> {
    let fail = |kind| PayloadError {
        origin: Origin::of(nv),
        kind,
    };
    let header = check(nv, &payload, expected_len, max).map_err(fail)?;
    match header.compression {
        Compression::None => Ok(payload),
        _ => {
            let mut out = vec![0u8; expected_len];
            expand(header.compression, &payload, &mut out).map_err(fail)?;
            Ok(out)
        }
    }
}

/// Like [`decode`], but writes the block into `out`, whose length is the
/// request's length (for callers that own an aligned I/O buffer).
pub fn decode_into(
    nv: &Nv,
    payload: &[u8],
    out: &mut [u8],
    max: usize,
) -> Result<(), PayloadError> {
    let fail = |kind| PayloadError {
        origin: Origin::of(nv),
        kind,
    };
    let header = check(nv, payload, out.len(), max).map_err(fail)?;
    match header.compression {
        Compression::None => {
            out.copy_from_slice(payload);
            Ok(())
        }
        _ => expand(header.compression, payload, out).map_err(fail),
    }
}

/// Decompresses a checked `hole`/`lzf` payload into `out` (exact length).
fn expand(
    compression: Compression,
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), PayloadErrorKind> {
    match compression {
        Compression::None => Ok(()),
        Compression::Hole => {
            announced("hole", payload, out.len())?;
            out.fill(0);
            Ok(())
        }
        Compression::Lzf => {
            let stream = announced("lzf", payload, out.len())?;
            lzf::decompress_exact(stream, out)?;
            Ok(())
        }
    }
}

/// The LZF format of liblzf (as bundled with hastd), written from its
/// format description: a sequence of
/// - `000LLLLL` + L+1 literal bytes (1..=32),
/// - `LLLooooo oooooooo`: copy L+2 bytes (L in 1..=6) from `o+1` bytes back,
/// - `111ooooo LLLLLLLL oooooooo`: copy L+9 bytes from `o+1` bytes back,
///
/// with the offset's high 5 bits in the control byte. Copies may overlap
/// their own output (a run).
pub mod lzf {
    /// Longest back-reference distance.
    pub const MAX_DISTANCE: usize = 1 << 13;
    /// Longest back-reference length (7 + 255 + 2).
    pub const MAX_MATCH: usize = 264;
    /// Longest literal run.
    pub const MAX_LITERAL: usize = 32;
    const MIN_MATCH: usize = 3;
    const HASH_BITS: u32 = 14;
    /// A literal run of 2^SKIP_SHIFT bytes makes the search step by 2, and
    /// so on, up to 1 + MAX_SKIP.
    const SKIP_SHIFT: u32 = 5;
    const MAX_SKIP: usize = 31;
    /// Positions at the end of a match that are indexed.
    const INDEX_TAIL: usize = 4;

    /// A malformed LZF stream; `at` is the offset of the offending control
    /// byte in the stream.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
    pub enum LzfError {
        #[error("stream truncated inside the item at byte {at}")]
        Truncated { at: usize },
        #[error("back-reference at byte {at} reaches {distance} bytes back with only {produced} bytes produced")]
        BeforeStart {
            at: usize,
            distance: usize,
            produced: usize,
        },
        #[error("item at byte {at} would write past the {limit}-byte output")]
        Overflow { at: usize, limit: usize },
        #[error("stream yields {produced} bytes, expected {expected}")]
        Short { produced: usize, expected: usize },
    }

    /// Decodes `input` into the start of `out`; returns the bytes produced.
    /// Fails rather than write past `out` or read before its start.
    pub fn decompress(input: &[u8], out: &mut [u8]) -> Result<usize, LzfError> {
        let limit = out.len();
        let mut ip = 0usize;
        let mut op = 0usize;
        while let Some(&ctrl) = input.get(ip) {
            let at = ip;
            ip += 1;
            let ctrl = usize::from(ctrl);
            if ctrl < MAX_LITERAL {
                let n = ctrl + 1;
                let src = input.get(ip..ip + n).ok_or(LzfError::Truncated { at })?;
                let dst = out
                    .get_mut(op..op + n)
                    .ok_or(LzfError::Overflow { at, limit })?;
                dst.copy_from_slice(src);
                ip += n;
                op += n;
            } else {
                let mut len = ctrl >> 5;
                if len == 7 {
                    let &extra = input.get(ip).ok_or(LzfError::Truncated { at })?;
                    len += usize::from(extra);
                    ip += 1;
                }
                let &low = input.get(ip).ok_or(LzfError::Truncated { at })?;
                ip += 1;
                let distance = (((ctrl & 0x1f) << 8) | usize::from(low)) + 1;
                let n = len + 2;
                if distance > op {
                    return Err(LzfError::BeforeStart {
                        at,
                        distance,
                        produced: op,
                    });
                }
                if n > limit - op {
                    return Err(LzfError::Overflow { at, limit });
                }
                copy_back(out, op, distance, n);
                op += n;
            }
        }
        Ok(op)
    }

    /// Decodes `input` into `out`, which it must fill exactly.
    pub fn decompress_exact(input: &[u8], out: &mut [u8]) -> Result<(), LzfError> {
        let produced = decompress(input, out)?;
        if produced != out.len() {
            return Err(LzfError::Short {
                produced,
                expected: out.len(),
            });
        }
        Ok(())
    }

    /// Copies `n` bytes from `distance` back to `op`, as a forward byte copy
    /// would (so a short distance repeats its pattern). The caller has
    /// checked `distance <= op` and `op + n <= out.len()`.
    fn copy_back(out: &mut [u8], op: usize, distance: usize, n: usize) {
        let start = op - distance;
        if distance >= n {
            out.copy_within(start..start + n, op);
            return;
        }
        // Overlapping: the pattern of `distance` bytes repeats; copy it in
        // chunks that double as the written prefix grows.
        let mut done = 0;
        while done < n {
            let chunk = (distance + done).min(n - done);
            out.copy_within(start..start + chunk, op + done);
            done += chunk;
        }
    }

    /// Compresses `input`, appending the stream to `out`. Gives up (returns
    /// false, `out` then holds a partial stream) once the stream would exceed
    /// `budget` bytes. An empty input yields an empty stream.
    pub fn compress_into(input: &[u8], out: &mut Vec<u8>, budget: usize) -> bool {
        let base = out.len();
        let n = input.len();
        let mut table = vec![0u32; 1 << HASH_BITS];
        let mut lit_start = 0usize;
        let mut i = 0usize;
        while i + MIN_MATCH <= n {
            let Some(key) = key_at(input, i) else { break };
            let slot = hash(key);
            let candidate = table.get(slot).copied().unwrap_or(0) as usize;
            if let Some(s) = table.get_mut(slot) {
                *s = pos_tag(i);
            }
            let found = candidate
                .checked_sub(1)
                .filter(|&c| c < i && i - c <= MAX_DISTANCE && key_at(input, c) == Some(key));
            let Some(c) = found else {
                // The longer the literal run, the less likely a match is
                // near: step faster through incompressible data.
                let pending = i - lit_start;
                if out.len() - base + pending > budget {
                    return false;
                }
                i += 1 + (pending >> SKIP_SHIFT).min(MAX_SKIP);
                continue;
            };
            let max = (n - i).min(MAX_MATCH);
            let mut len = MIN_MATCH;
            while len < max && input.get(c + len) == input.get(i + len) {
                len += 1;
            }
            if !emit_literals(out, input.get(lit_start..i).unwrap_or(&[]), base, budget) {
                return false;
            }
            if !emit_match(out, i - c, len, base, budget) {
                return false;
            }
            // Index the last positions the match covered, so what follows
            // can refer back into it.
            let end = i + len;
            let mut p = (i + 1).max(end.saturating_sub(INDEX_TAIL));
            while p < end && p + MIN_MATCH <= n {
                if let Some(s) = key_at(input, p).and_then(|k| table.get_mut(hash(k))) {
                    *s = pos_tag(p);
                }
                p += 1;
            }
            i = end;
            lit_start = end;
        }
        emit_literals(out, input.get(lit_start..).unwrap_or(&[]), base, budget)
    }

    /// Table entries are position + 1 (0 is empty); inputs beyond u32 range
    /// simply stop matching.
    fn pos_tag(i: usize) -> u32 {
        u32::try_from(i + 1).unwrap_or(0)
    }

    fn key_at(input: &[u8], i: usize) -> Option<u32> {
        let &[a, b, c] = input.get(i..)?.first_chunk::<MIN_MATCH>()?;
        Some(u32::from(a) | u32::from(b) << 8 | u32::from(c) << 16)
    }

    fn hash(key: u32) -> usize {
        (key.wrapping_mul(0x9E37_79B1) >> (32 - HASH_BITS)) as usize
    }

    fn emit_literals(out: &mut Vec<u8>, lits: &[u8], base: usize, budget: usize) -> bool {
        let runs = lits.len().div_ceil(MAX_LITERAL);
        if out.len() - base + lits.len() + runs > budget {
            return false;
        }
        for run in lits.chunks(MAX_LITERAL) {
            // run.len() is 1..=32, so the control byte is 0..=31.
            out.push((run.len() - 1) as u8);
            out.extend_from_slice(run);
        }
        true
    }

    fn emit_match(
        out: &mut Vec<u8>,
        distance: usize,
        len: usize,
        base: usize,
        budget: usize,
    ) -> bool {
        let off = distance - 1; // 0..8191: 13 bits
        let l = len - 2; // 1..=262
        let hi = (off >> 8) as u8; // 5 bits
        let lo = (off & 0xff) as u8;
        let need = if l < 7 { 2 } else { 3 };
        if out.len() - base + need > budget {
            return false;
        }
        if l < 7 {
            out.push(((l as u8) << 5) | hi);
        } else {
            out.push((7 << 5) | hi);
            out.push((l - 7) as u8);
        }
        out.push(lo);
        true
    }
}

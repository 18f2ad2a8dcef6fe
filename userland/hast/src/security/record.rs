//! The TLS 1.3 record layer for application data (RFC 8446, section 5),
//! used on a replication connection once rustls has run the handshake and
//! handed over the traffic keys (its secret extraction, the interface kTLS
//! uses). Records are opened in place in the connection's receive buffer
//! and sealed in place in its send buffer: rustls' own record layer copies
//! every byte two more times on the way in, which was most of the CPU time
//! TLS added to a replicated 1 MiB write.
//!
//! Each record: type 23, version 0x0303, a 16-bit length (at most 2^14
//! bytes of plaintext plus 256), the AEAD ciphertext of the plaintext
//! followed by its content type and optional zero padding; the nonce is
//! the static IV XOR the record's 64-bit sequence number, the additional
//! data is the record's header. A close_notify alert ends the stream.
//! Anything else is refused: other alerts, post-handshake handshake
//! messages (this link sends no session tickets and no key updates), a
//! record that does not authenticate, an oversized one. After
//! [`RECORD_LIMIT`] records in one direction the connection must be
//! re-established (AES-GCM's confidentiality limit is 2^24.5 records).

use ring::aead;
use rustls::ConnectionTrafficSecrets;

/// Largest plaintext of one record.
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest encrypted record body (RFC 8446: 2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Bytes of a record header.
pub const HEADER: usize = 5;
/// Bytes of the AEAD tag (all three TLS 1.3 suites here).
pub const TAG: usize = 16;
/// A sealed record's size for `n` bytes of plaintext.
pub const fn sealed_len(n: usize) -> usize {
    HEADER + n + 1 + TAG
}
/// Records a direction may carry before the connection is re-established
/// with new keys (below AES-GCM's limit of 2^24.5, with room).
pub const RECORD_LIMIT: u64 = (1 << 24) - (1 << 16);

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const CLOSE_NOTIFY: u8 = 0;

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("cannot decrypt peer's message: a TLS record failed its authentication (changed or forged in transit)")]
    BadRecordMac,
    #[error("TLS record of {0} bytes, more than {MAX_CIPHERTEXT}")]
    Overflow(usize),
    #[error("TLS record of type {0} where application data (23) was expected")]
    OuterType(u8),
    #[error("TLS record with version {0:#06x}, expected 0x0303")]
    Version(u16),
    #[error("TLS record with content type {0}, which this link does not take")]
    ContentType(u8),
    #[error("the peer sent TLS alert {description} (level {level})")]
    Alert { level: u8, description: u8 },
    #[error("the peer sent a post-handshake TLS message (key update or session ticket), which this link does not take")]
    PostHandshake,
    #[error("TLS record with nothing but padding")]
    Empty,
    #[error("this TLS connection reached its record limit ({RECORD_LIMIT}); it is re-established with new keys")]
    Limit,
    #[error("the negotiated cipher suite is not supported by this record layer")]
    Suite,
}

/// One direction's keys and sequence number.
pub struct Direction {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Direction(seq {})", self.seq)
    }
}

/// What [`Direction::open`] found in a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Application data at this range of the record's bytes.
    Data(std::ops::Range<usize>),
    /// The peer closed the stream (close_notify).
    Closed,
}

impl Direction {
    /// A direction from the traffic secrets rustls extracted, starting at
    /// sequence number `seq`.
    pub fn new(secrets: ConnectionTrafficSecrets, seq: u64) -> Result<Direction, RecordError> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Suite),
        };
        let unbound = aead::UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Suite)?;
        let iv: [u8; aead::NONCE_LEN] = iv.as_ref().try_into().map_err(|_| RecordError::Suite)?;
        Ok(Direction {
            key: aead::LessSafeKey::new(unbound),
            iv,
            seq,
        })
    }

    /// The next record's nonce; the sequence number moves on.
    fn nonce(&mut self) -> Result<aead::Nonce, RecordError> {
        if self.seq >= RECORD_LIMIT {
            return Err(RecordError::Limit);
        }
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        self.seq += 1;
        Ok(aead::Nonce::assume_unique_for_key(n))
    }

    /// Append one record of `content_type` holding `plain` (at most
    /// [`MAX_PLAINTEXT`] bytes) to `out`.
    fn seal_typed(
        &mut self,
        content_type: u8,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        debug_assert!(plain.len() <= MAX_PLAINTEXT);
        let body = plain.len() + 1 + TAG;
        let len = u16::try_from(body).map_err(|_| RecordError::Overflow(body))?;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = self.nonce()?;
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(plain);
        out.push(content_type);
        let inner = out.get_mut(start + HEADER..).unwrap_or_default();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), inner)
            .map_err(|_| RecordError::BadRecordMac)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Append `plain` to `out` as records of application data.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in plain.chunks(MAX_PLAINTEXT) {
            self.seal_typed(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Append a close_notify alert to `out`.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_typed(ALERT, &[1, CLOSE_NOTIFY], out)
    }

    /// Open, in place, the whole record `record` (header included, as
    /// measured by [`record_len`]).
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let header: [u8; HEADER] = record
            .get(..HEADER)
            .and_then(|h| h.try_into().ok())
            .ok_or(RecordError::BadRecordMac)?;
        let nonce = self.nonce()?;
        let body = record.get_mut(HEADER..).unwrap_or_default();
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(header), body)
            .map_err(|_| RecordError::BadRecordMac)?;
        // The content type is the last byte that is not padding.
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::Empty)?;
        let content_type = plain[end];
        match content_type {
            APPLICATION_DATA => Ok(Opened::Data(HEADER..HEADER + end)),
            ALERT => match plain.get(..end) {
                Some([_, CLOSE_NOTIFY]) => Ok(Opened::Closed),
                Some([level, description]) => Err(RecordError::Alert {
                    level: *level,
                    description: *description,
                }),
                _ => Err(RecordError::ContentType(ALERT)),
            },
            HANDSHAKE => Err(RecordError::PostHandshake),
            other => Err(RecordError::ContentType(other)),
        }
    }
}

/// The length of the record at the start of `buf` (header included), once
/// its header is there; refuses what no valid record starts with.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(h) = buf.get(..HEADER) else {
        return Ok(None);
    };
    if h[0] != APPLICATION_DATA {
        return Err(RecordError::OuterType(h[0]));
    }
    let version = u16::from_be_bytes([h[1], h[2]]);
    if version != 0x0303 {
        return Err(RecordError::Version(version));
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::Overflow(len));
    }
    if len < 1 + TAG {
        return Err(RecordError::BadRecordMac);
    }
    Ok(Some(HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn pair() -> (Direction, Direction) {
        let s = || ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::from([9u8; 12]),
        };
        (
            Direction::new(s(), 0).unwrap(),
            Direction::new(s(), 0).unwrap(),
        )
    }

    /// Open every record of `wire` with `rx`; the plaintext of each.
    fn open_all(rx: &mut Direction, wire: &mut [u8]) -> Result<Vec<Vec<u8>>, RecordError> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let n = record_len(&wire[at..])?.expect("a whole header");
            if at + n > wire.len() {
                // A changed length: the reader would wait for bytes that
                // never come, then see the end of the stream.
                return Err(RecordError::Overflow(n));
            }
            match rx.open(&mut wire[at..at + n])? {
                Opened::Data(r) => out.push(wire[at..at + n][r].to_vec()),
                Opened::Closed => out.push(b"<close>".to_vec()),
            }
            at += n;
        }
        Ok(out)
    }

    #[test]
    fn records_round_trip_split_at_the_record_size() {
        let (mut tx, mut rx) = pair();
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        tx.seal(&data, &mut wire).unwrap();
        tx.close_notify(&mut wire).unwrap();
        assert_eq!(
            wire.len(),
            sealed_len(16384) * 2 + sealed_len(40_000 - 32768) + sealed_len(2)
        );
        let got = open_all(&mut rx, &mut wire).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[..3].concat(), data);
        assert_eq!(got[3], b"<close>");
    }

    #[test]
    fn a_flipped_bit_a_reordered_or_replayed_record_is_refused() {
        let (mut tx, _) = pair();
        let mut wire = Vec::new();
        tx.seal(b"first", &mut wire).unwrap();
        let first = wire.len();
        tx.seal(b"second", &mut wire).unwrap();
        for bit in [0usize, 3 * 8, 8 * (HEADER + 2), 8 * (first - 1)] {
            let (_, mut rx) = pair();
            let mut w = wire.clone();
            w[bit / 8] ^= 1 << (bit % 8);
            let r = open_all(&mut rx, &mut w);
            assert!(r.is_err(), "bit {bit}: {r:?}");
        }
        // The second record first: its sequence number does not match.
        let (_, mut rx) = pair();
        let mut second = wire[first..].to_vec();
        assert_eq!(
            open_all(&mut rx, &mut second),
            Err(RecordError::BadRecordMac)
        );
        // The first record twice.
        let (_, mut rx) = pair();
        let mut twice = [&wire[..first], &wire[..first]].concat();
        assert_eq!(
            open_all(&mut rx, &mut twice),
            Err(RecordError::BadRecordMac)
        );
    }

    #[test]
    fn headers_and_content_types_are_checked() {
        assert_eq!(record_len(&[23, 3, 3, 0]), Ok(None));
        assert_eq!(
            record_len(&[22, 3, 1, 0, 40]),
            Err(RecordError::OuterType(22))
        );
        assert_eq!(
            record_len(&[23, 3, 1, 0, 40]),
            Err(RecordError::Version(0x0301))
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0x41, 0x01]),
            Err(RecordError::Overflow(0x4101))
        );
        assert_eq!(record_len(&[23, 3, 3, 0, 17]), Ok(Some(22)));
        assert_eq!(
            record_len(&[23, 3, 3, 0, 16]),
            Err(RecordError::BadRecordMac)
        );
        // A handshake message or another alert after the handshake.
        let (mut tx, mut rx) = pair();
        let mut wire = Vec::new();
        tx.seal_typed(HANDSHAKE, &[24, 0, 0, 1, 0], &mut wire)
            .unwrap();
        assert_eq!(
            open_all(&mut rx, &mut wire),
            Err(RecordError::PostHandshake)
        );
        let (mut tx, mut rx) = pair();
        let mut wire = Vec::new();
        tx.seal_typed(ALERT, &[2, 40], &mut wire).unwrap();
        assert_eq!(
            open_all(&mut rx, &mut wire),
            Err(RecordError::Alert {
                level: 2,
                description: 40
            })
        );
        // Only padding.
        let (mut tx, mut rx) = pair();
        let mut wire = Vec::new();
        tx.seal_typed(0, &[0, 0], &mut wire).unwrap();
        assert_eq!(open_all(&mut rx, &mut wire), Err(RecordError::Empty));
    }

    #[test]
    fn the_record_limit_ends_a_direction() {
        let (mut tx, _) = pair();
        tx.seq = RECORD_LIMIT - 1;
        let mut wire = Vec::new();
        tx.seal(b"last", &mut wire).unwrap();
        assert_eq!(tx.seal(b"one more", &mut wire), Err(RecordError::Limit));
    }
}

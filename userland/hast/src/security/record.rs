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
//! messages (this link sends no session tickets and never updates keys in
//! band: a key update is refused, not parsed), a record that does not
//! authenticate, an oversized one.
//!
//! Instead of key updates, a connection is re-established (a new
//! handshake, new keys) long before a key wears out. The crypto provider
//! states for each cipher suite how many records of the largest size one
//! key may encrypt (rustls' `confidentiality_limit`: 2^24 for AES-GCM, for
//! an attacker's advantage of 2^-60; unlimited for ChaCha20-Poly1305). The
//! bound behind that figure grows with the 16-byte blocks encrypted plus
//! the records (draft-irtf-cfrg-aead-limits, AES-GCM), so each direction
//! counts exactly that ([`record_cost`]): a sender stops at half of the
//! suite's limit ([`send_budget`]: about 128 GiB of data with AES-GCM,
//! whatever the record sizes) and the connection is re-established; a
//! receiver refuses a peer that goes past the whole limit
//! ([`receive_budget`]). The sequence number never wraps: a direction
//! refuses to go on at 2^64 - 1 records whatever its budget.

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

/// What one record of `inner` bytes of inner plaintext (the data, its
/// content type byte and any padding) costs its key, in the terms of
/// AES-GCM's confidentiality bound: its 16-byte blocks, plus one.
pub const fn record_cost(inner: usize) -> u64 {
    inner.div_ceil(16) as u64 + 1
}

/// The cost of a record of the largest size (2^14 bytes and its content
/// type: 1025 blocks, plus one), the unit of the provider's limits.
pub const FULL_RECORD_COST: u64 = record_cost(MAX_PLAINTEXT + 1);

/// What a peer may send with one key: the cipher suite's
/// `confidentiality_limit` (records of the largest size) in record costs.
pub const fn receive_budget(confidentiality_limit: u64) -> u64 {
    confidentiality_limit.saturating_mul(FULL_RECORD_COST)
}

/// What this side sends with one key before the connection is
/// re-established: half of [`receive_budget`].
pub const fn send_budget(confidentiality_limit: u64) -> u64 {
    receive_budget(confidentiality_limit) / 2
}

/// The cost of the close_notify alert, kept in reserve by the data.
const CLOSE_COST: u64 = record_cost(3);

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
    #[error("{}", post_handshake(*.0))]
    PostHandshake(Option<u8>),
    #[error("TLS record with nothing but padding")]
    Empty,
    #[error("this node has sent half of what its cipher suite allows one key on this TLS connection; the connection is re-established with a new handshake and new keys")]
    Limit,
    #[error("the peer sent more than its cipher suite allows one key on this TLS connection instead of reconnecting; the connection is dropped")]
    PeerLimit,
    #[error("the negotiated cipher suite is not supported by this record layer")]
    Suite,
}

/// The message of [`RecordError::PostHandshake`] for a handshake message
/// of type `kind` (RFC 8446, section 4).
fn post_handshake(kind: Option<u8>) -> String {
    let what = match kind {
        Some(24) => "a TLS key update (handshake message 24)".to_string(),
        Some(4) => "a TLS session ticket (handshake message 4)".to_string(),
        Some(k) => format!("a TLS handshake message of type {k}"),
        None => "an empty TLS handshake record".to_string(),
    };
    format!("the peer sent {what} after the handshake; this link takes none: it never updates keys in band (it reconnects with new keys instead) and resumes no session")
}

/// One direction's keys, sequence number and what its key may still
/// encrypt.
pub struct Direction {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    /// The cost of the records so far ([`record_cost`]).
    used: u64,
    /// What they may cost in all ([`send_budget`] or [`receive_budget`]).
    budget: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Direction(seq {}, used {} of {})",
            self.seq, self.used, self.budget
        )
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
    /// sequence number `seq`, whose records may cost `budget` in all
    /// ([`send_budget`] or [`receive_budget`] of the suite).
    pub fn new(
        secrets: ConnectionTrafficSecrets,
        seq: u64,
        budget: u64,
    ) -> Result<Direction, RecordError> {
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
            used: 0,
            budget,
        })
    }

    /// Whether records costing `cost` fit in the budget with `reserve` left.
    fn fits(&self, cost: u64, reserve: u64) -> bool {
        self.used
            .checked_add(cost)
            .and_then(|u| u.checked_add(reserve))
            .is_some_and(|u| u <= self.budget)
    }

    /// The nonce of the next record, which costs `cost` (checked by the
    /// caller); the sequence number moves on, and never wraps.
    fn nonce(&mut self, cost: u64, limit: RecordError) -> Result<aead::Nonce, RecordError> {
        if self.seq == u64::MAX || !self.fits(cost, 0) {
            return Err(limit);
        }
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        self.seq += 1;
        self.used += cost;
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
        let nonce = self.nonce(record_cost(plain.len() + 1), RecordError::Limit)?;
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

    /// Append `plain` to `out` as records of application data: all of
    /// it, or nothing when the key's budget (less room for a close_notify)
    /// cannot take it all.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let cost = plain
            .chunks(MAX_PLAINTEXT)
            .map(|c| record_cost(c.len() + 1))
            .fold(0u64, u64::saturating_add);
        if !self.fits(cost, CLOSE_COST) {
            return Err(RecordError::Limit);
        }
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
        let body = record.get_mut(HEADER..).unwrap_or_default();
        let inner = body.len().saturating_sub(TAG);
        let nonce = self.nonce(record_cost(inner), RecordError::PeerLimit)?;
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
            HANDSHAKE => Err(RecordError::PostHandshake(
                plain.get(..end).and_then(|m| m.first()).copied(),
            )),
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

    /// The crypto provider's limit for one AES-256-GCM key, in records of
    /// the largest size.
    fn aes_limit() -> u64 {
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384
            .tls13()
            .unwrap()
            .common
            .confidentiality_limit
    }

    /// A sender and a receiver of the same AES-256-GCM key.
    fn pair() -> (Direction, Direction) {
        let s = || ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::from([9u8; 12]),
        };
        (
            Direction::new(s(), 0, send_budget(aes_limit())).unwrap(),
            Direction::new(s(), 0, receive_budget(aes_limit())).unwrap(),
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
        let e = open_all(&mut rx, &mut wire).unwrap_err();
        assert_eq!(e, RecordError::PostHandshake(Some(24)));
        assert!(e.to_string().contains("a TLS key update"), "{e}");
        let (mut tx, mut rx) = pair();
        let mut wire = Vec::new();
        tx.seal_typed(HANDSHAKE, &[4, 0, 0, 0], &mut wire).unwrap();
        assert_eq!(
            open_all(&mut rx, &mut wire),
            Err(RecordError::PostHandshake(Some(4)))
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

    /// rustls' ring provider allows AES-GCM keys 2^24 records of the
    /// largest size (its `confidentiality_limit`, an attack advantage of
    /// 2^-60); a sender stops long before, at half, keeping room for its
    /// close_notify; smaller records cost less.
    #[test]
    fn a_sender_stops_at_half_of_the_providers_limit() {
        assert_eq!(aes_limit(), 1 << 24);
        assert_eq!(FULL_RECORD_COST, 1026);
        let full = [0u8; MAX_PLAINTEXT];
        let (mut tx, _) = pair();
        // 2^23 - 1 records of the largest size sent.
        tx.used = ((1 << 23) - 1) * FULL_RECORD_COST;
        let mut wire = Vec::new();
        assert_eq!(
            tx.seal(&full, &mut wire),
            Err(RecordError::Limit),
            "no room for the close_notify after it"
        );
        tx.used -= CLOSE_COST;
        tx.seal(&full, &mut wire).unwrap();
        assert_eq!(tx.used + CLOSE_COST, tx.budget);
        let before = wire.len();
        assert_eq!(tx.seal(b"x", &mut wire), Err(RecordError::Limit));
        assert_eq!(wire.len(), before, "nothing sealed past the budget");
        tx.close_notify(&mut wire).unwrap();
        assert_eq!(tx.used, tx.budget);

        // A write that does not fit whole is not sealed in part.
        let (mut tx, _) = pair();
        tx.used = tx.budget - CLOSE_COST - 2 * FULL_RECORD_COST;
        let mut wire = Vec::new();
        assert_eq!(
            tx.seal(&[1u8; 3 * MAX_PLAINTEXT], &mut wire),
            Err(RecordError::Limit)
        );
        assert!(wire.is_empty());
        tx.seal(&[1u8; 2 * MAX_PLAINTEXT], &mut wire).unwrap();

        // 4 KiB records: four times as many.
        assert_eq!(record_cost(4096 + 1), 258);
        let (mut tx, _) = pair();
        tx.used = tx.budget - CLOSE_COST - 4 * 258;
        let mut wire = Vec::new();
        for _ in 0..4 {
            tx.seal(&[2u8; 4096], &mut wire).unwrap();
        }
        assert_eq!(tx.seal(&[2u8; 4096], &mut wire), Err(RecordError::Limit));
    }

    /// A receiver takes what a peer sends up to the whole limit (a peer
    /// that reconnects at half never gets there), and refuses more.
    #[test]
    fn a_receiver_refuses_a_peer_past_the_whole_limit() {
        let (mut tx, mut rx) = pair();
        assert_eq!(rx.budget, 2 * tx.budget);
        let mut wire = Vec::new();
        tx.seal(b"in budget", &mut wire).unwrap();
        rx.used = tx.budget;
        let mut w = wire.clone();
        assert_eq!(
            open_all(&mut rx, &mut w).unwrap(),
            vec![b"in budget".to_vec()]
        );

        let (mut tx, mut rx) = pair();
        let mut wire = Vec::new();
        tx.seal(b"past it", &mut wire).unwrap();
        // Its cost (1 block and 1) is one more than what is left.
        rx.used = rx.budget - record_cost(7 + 1) + 1;
        assert_eq!(open_all(&mut rx, &mut wire), Err(RecordError::PeerLimit));
    }

    /// ChaCha20-Poly1305 has no practical limit (rustls says u64::MAX):
    /// the sequence number still never wraps.
    #[test]
    fn the_sequence_number_never_wraps() {
        let limit = rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256
            .tls13()
            .unwrap()
            .common
            .confidentiality_limit;
        assert_eq!(receive_budget(limit), u64::MAX);
        let s = || ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([3u8; 32]),
            iv: Iv::from([4u8; 12]),
        };
        let mut tx = Direction::new(s(), u64::MAX - 2, send_budget(limit)).unwrap();
        let mut rx = Direction::new(s(), u64::MAX - 2, receive_budget(limit)).unwrap();
        let mut wire = Vec::new();
        tx.seal(b"last", &mut wire).unwrap();
        tx.close_notify(&mut wire).unwrap();
        assert_eq!(tx.seq, u64::MAX);
        assert_eq!(tx.seal(b"one more", &mut wire), Err(RecordError::Limit));
        assert_eq!(tx.close_notify(&mut wire), Err(RecordError::Limit));
        let got = open_all(&mut rx, &mut wire).unwrap();
        assert_eq!(got, vec![b"last".to_vec(), b"<close>".to_vec()]);
        // The receiver is at the last sequence number too.
        let mut tx = Direction::new(s(), u64::MAX - 1, send_budget(limit)).unwrap();
        let mut more = Vec::new();
        tx.seal(b"x", &mut more).unwrap();
        assert_eq!(open_all(&mut rx, &mut more), Err(RecordError::PeerLimit));
    }
}

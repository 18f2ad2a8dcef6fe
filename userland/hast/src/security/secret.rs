//! The shared-secret mode (`security secret`): authentication without
//! encryption. Both nodes hold the same secret; each connection attempt
//! is a challenge-response with HMAC-SHA256 over both nodes' fresh nonces
//! and the session token, so nothing recorded from an earlier session can
//! be replayed:
//!
//! - connection 1: the primary's hello carries its nonce; the secondary's
//!   welcome carries its own nonce with the token;
//! - connection 2: the primary's attach carries the MAC ([`Step::Attach`])
//!   over both nonces, the token and its counters: the secondary checks it
//!   before it decides anything or touches its disk;
//! - connection 1: the secondary's geometry answer carries the MAC
//!   ([`Step::Geometry`]) over both nonces, the token, its counters and its
//!   activemap: the primary checks it before it merges the map.
//!
//! A promotion probe is answered with a MAC ([`Step::Probe`]) over the
//! prober's nonce, the answer's own nonce and what it says. Each step has
//! its own label, so a MAC one side computed is never valid for another
//! step. The requests and replies of the session that follows are not
//! authenticated: that needs `security tls`.

use ring::hmac;

use super::fingerprint::Fingerprint;

/// Bytes of a nonce.
pub const NONCE_SIZE: usize = 32;
/// Bytes of a MAC (HMAC-SHA256).
pub const MAC_SIZE: usize = 32;
/// The shortest secret accepted.
pub const MIN_SECRET: usize = 16;

/// A fresh random challenge.
pub type Nonce = [u8; NONCE_SIZE];
/// An HMAC-SHA256 tag.
pub type Mac = [u8; MAC_SIZE];

/// A fresh nonce from the operating system's generator (through `rand`'s
/// thread generator, a CSPRNG seeded from it).
pub fn nonce() -> Nonce {
    rand::random()
}

/// Why a secret is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the secret holds {0} bytes, fewer than {MIN_SECRET} (e.g. `head -c 32 /dev/urandom | base64 > FILE`)")]
    TooShort(usize),
}

/// What a MAC authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The primary's attach (connection 2).
    Attach,
    /// The secondary's geometry answer and activemap (connection 1).
    Geometry,
    /// The answer to a promotion probe.
    Probe,
}

impl Step {
    fn label(self) -> &'static [u8] {
        match self {
            Step::Attach => b"hast secret v1: primary attach",
            Step::Geometry => b"hast secret v1: secondary geometry",
            Step::Probe => b"hast secret v1: probe answer",
        }
    }
}

/// What both sides of one connection attempt know: the resource, both
/// nonces and the token (all zeros for a probe).
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    pub resource: &'a str,
    pub primary_nonce: &'a Nonce,
    pub secondary_nonce: &'a Nonce,
    pub token: &'a [u8],
}

/// A shared secret, ready to compute MACs.
pub struct Secret {
    key: hmac::Key,
    /// SHA-256 of the secret: tells two secrets apart (a reload with a new
    /// one) without keeping a comparable copy.
    id: Fingerprint,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret held in a file's bytes; trailing line ends and spaces do
    /// not count (editors add them).
    pub fn from_bytes(bytes: &[u8]) -> Result<Secret, SecretError> {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |p| p + 1);
        let secret = bytes.get(..end).unwrap_or_default();
        if secret.len() < MIN_SECRET {
            return Err(SecretError::TooShort(secret.len()));
        }
        Ok(Secret {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            id: Fingerprint::of(secret),
        })
    }

    /// Whether two secrets are the same.
    pub fn same(&self, other: &Secret) -> bool {
        self.id == other.id
    }

    fn context(
        &self,
        step: Step,
        t: &Transcript<'_>,
        fields: &[u64],
        data: &[u8],
    ) -> hmac::Context {
        let mut ctx = hmac::Context::with_key(&self.key);
        let mut part = |bytes: &[u8]| {
            ctx.update(&(bytes.len() as u64).to_le_bytes());
            ctx.update(bytes);
        };
        part(step.label());
        part(t.resource.as_bytes());
        part(t.primary_nonce);
        part(t.secondary_nonce);
        part(t.token);
        let nums: Vec<u8> = fields.iter().flat_map(|f| f.to_le_bytes()).collect();
        part(&nums);
        part(data);
        ctx
    }

    /// The MAC of `step` over the transcript, the step's numeric `fields`
    /// and its `data`.
    pub fn mac(&self, step: Step, t: &Transcript<'_>, fields: &[u64], data: &[u8]) -> Mac {
        let tag = self.context(step, t, fields, data).sign();
        let mut out = [0u8; MAC_SIZE];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `mac` is the MAC of `step` (compared in constant time).
    pub fn verify(
        &self,
        step: Step,
        t: &Transcript<'_>,
        fields: &[u64],
        data: &[u8],
        mac: &[u8],
    ) -> bool {
        let expected = self.mac(step, t, fields, data);
        constant_time_eq(&expected, mac)
    }
}

/// Equality of two byte strings whose time does not depend on where they
/// differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(p: &'a Nonce, s: &'a Nonce, token: &'a [u8]) -> Transcript<'a> {
        Transcript {
            resource: "data",
            primary_nonce: p,
            secondary_nonce: s,
            token,
        }
    }

    #[test]
    fn a_mac_verifies_only_for_its_own_inputs() {
        let k = Secret::from_bytes(b"correct horse battery staple\n").unwrap();
        let other = Secret::from_bytes(b"correct horse battery stapler").unwrap();
        let (p, s, token) = ([1u8; 32], [2u8; 32], [3u8; 16]);
        let tr = t(&p, &s, &token);
        let mac = k.mac(Step::Attach, &tr, &[5, 6, 7], b"");
        assert!(k.verify(Step::Attach, &tr, &[5, 6, 7], b"", &mac));
        // Another secret, step, nonce, token, field or datum: refused.
        assert!(!other.verify(Step::Attach, &tr, &[5, 6, 7], b"", &mac));
        assert!(!k.verify(Step::Geometry, &tr, &[5, 6, 7], b"", &mac));
        let s2 = [9u8; 32];
        assert!(!k.verify(Step::Attach, &t(&p, &s2, &token), &[5, 6, 7], b"", &mac));
        assert!(!k.verify(Step::Attach, &t(&s2, &s, &token), &[5, 6, 7], b"", &mac));
        assert!(!k.verify(Step::Attach, &t(&p, &s, &[4u8; 16]), &[5, 6, 7], b"", &mac));
        assert!(!k.verify(Step::Attach, &tr, &[5, 6, 8], b"", &mac));
        assert!(!k.verify(Step::Attach, &tr, &[5, 6, 7], b"x", &mac));
        assert!(!k.verify(Step::Attach, &tr, &[5, 6, 7], b"", &mac[..31]));
        // Trailing white space is not part of the secret.
        let same = Secret::from_bytes(b"correct horse battery staple").unwrap();
        assert!(same.same(&k) && !other.same(&k));
        assert!(same.verify(Step::Attach, &tr, &[5, 6, 7], b"", &mac));
    }

    #[test]
    fn short_secrets_are_refused() {
        assert_eq!(
            Secret::from_bytes(b"short\n\n").unwrap_err(),
            SecretError::TooShort(5)
        );
        assert_eq!(
            Secret::from_bytes(b"").unwrap_err(),
            SecretError::TooShort(0)
        );
    }
}

//! SHA-256 fingerprints of public keys and certificates, as written in
//! hast.conf (`peerfingerprint`) and printed by `hastctl keygen`:
//! `sha256:` and 64 hex digits. Parsing also takes the digits alone,
//! upper case, and colons between bytes (as `openssl x509 -fingerprint`
//! prints them).

use std::fmt;

use sha2::{Digest, Sha256};

/// A SHA-256 fingerprint: of a certificate's SubjectPublicKeyInfo (what
/// `hastctl keygen` prints; it survives a re-issued certificate for the
/// same key) or of the whole DER certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

/// Why a fingerprint does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    #[error("a SHA-256 fingerprint has 64 hex digits (optionally `sha256:` first and colons between bytes); found {0} digits")]
    Length(usize),
    #[error("{0:?} is not a hex digit (a fingerprint is `sha256:` and 64 hex digits)")]
    NotHex(char),
    #[error("only SHA-256 fingerprints are supported (`sha256:...`), not {0:?}")]
    Algorithm(String),
}

impl Fingerprint {
    /// The fingerprint of `der` (a DER SubjectPublicKeyInfo or certificate).
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Parse the forms described in the module documentation.
    pub fn parse(text: &str) -> Result<Fingerprint, FingerprintError> {
        let digits = match text.split_once(':') {
            Some((algo, rest)) if algo.eq_ignore_ascii_case("sha256") => rest,
            Some((algo, _)) if !algo.chars().all(|c| c.is_ascii_hexdigit()) || algo.len() != 2 => {
                return Err(FingerprintError::Algorithm(algo.to_string()))
            }
            _ => text,
        };
        let mut out = [0u8; 32];
        let mut n = 0usize;
        for c in digits.chars() {
            if c == ':' {
                continue;
            }
            let v = c.to_digit(16).ok_or(FingerprintError::NotHex(c))?;
            if n < 64 {
                let byte = &mut out[n / 2];
                *byte = (*byte << 4) | v as u8;
            }
            n += 1;
        }
        if n != 64 {
            return Err(FingerprintError::Length(n));
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_that_parse_and_print() {
        let fp = Fingerprint::of(b"key");
        let text = fp.to_string();
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 64,
            "{text}"
        );
        assert_eq!(Fingerprint::parse(&text), Ok(fp));
        assert_eq!(Fingerprint::parse(&text[7..]), Ok(fp));
        assert_eq!(Fingerprint::parse(&text.to_uppercase()), Ok(fp));
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(Fingerprint::parse(&colons.join(":")), Ok(fp));
        assert_eq!(
            Fingerprint::parse(&format!("SHA256:{}", colons.join(":"))),
            Ok(fp)
        );
    }

    #[test]
    fn bad_forms_say_why() {
        assert_eq!(
            Fingerprint::parse("sha256:abcd"),
            Err(FingerprintError::Length(4))
        );
        let long = "a".repeat(66);
        assert_eq!(Fingerprint::parse(&long), Err(FingerprintError::Length(66)));
        let bad = format!("{}g", "a".repeat(63));
        assert_eq!(Fingerprint::parse(&bad), Err(FingerprintError::NotHex('g')));
        assert_eq!(
            Fingerprint::parse(&format!("sha1:{}", "a".repeat(40))),
            Err(FingerprintError::Algorithm("sha1".into()))
        );
        assert_eq!(Fingerprint::parse(""), Err(FingerprintError::Length(0)));
    }
}

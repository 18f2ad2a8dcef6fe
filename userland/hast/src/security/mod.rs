//! Protection of the replication link (an extension: a FreeBSD hastd has
//! none, and plain protocol version 2 stays the default so it still pairs).
//! A resource's `security` says what its connections must have:
//!
//! - `none`: plain version 2, as the reference;
//! - `secret`: a shared-secret challenge-response authenticates both nodes
//!   on both connections ([`secret`]); the data is not encrypted;
//! - `tls`: TLS 1.3 on both connections with mutual authentication by
//!   pinned key fingerprints or a CA ([`tls`]); rustls runs the handshake,
//!   the application data goes through [`record`].
//!
//! A resource never falls back to less than it requires. Secrets and
//! private keys are read only from files that no other user can read
//! ([`files`]); `hastctl keygen` makes a node's key pair ([`keygen`]).
//!
//! The crypto provider is ring (rustls' `ring` feature), chosen over
//! aws-lc-rs after building both here from crates.io: both build for
//! Linux with only a C compiler (aws-lc-sys no longer needs cmake there),
//! but aws-lc-sys' C does not cross-compile for FreeBSD from Linux
//! (`cargo check --target x86_64-unknown-freebsd`, part of `make test`,
//! fails in its build script: pthread types missing from the host's
//! headers), while ring's does, and ring is far smaller to build. ring has
//! what TLS 1.3 needs here (AES-GCM with AES-NI/VAES assembly,
//! ChaCha20-Poly1305, X25519, ECDSA, Ed25519) and the HMAC-SHA256 of the
//! shared-secret mode. What it lacks is the post-quantum hybrid key
//! exchange X25519MLKEM768 of aws-lc-rs (rustls marks ring's default
//! provider deprecated for that reason): a recorded session could be
//! decrypted by a future quantum computer. Switching is one function
//! ([`tls::provider`]) once aws-lc-rs builds for FreeBSD in CI. This
//! module depends on nothing else of the crate: the configuration names
//! the files, the engine loads them.

pub mod files;
pub mod fingerprint;
pub mod keygen;
pub mod record;
pub mod secret;
pub mod tls;

use std::sync::Arc;

pub use fingerprint::Fingerprint;

/// What a resource requires of its replication connections (`security`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Plain protocol version 2 (the default, as the reference).
    #[default]
    None,
    /// Shared-secret challenge-response, not encrypted.
    Secret,
    /// TLS 1.3 with mutual authentication.
    Tls,
}

impl Mode {
    /// The keyword, as in hast.conf.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Secret => "secret",
            Mode::Tls => "tls",
        }
    }

    /// What a connection of this mode protects, for logs and `hastctl list`.
    pub fn describe(self) -> &'static str {
        match self {
            Mode::None => "plain: not encrypted, not authenticated",
            Mode::Secret => "authenticated handshake (shared secret), not encrypted",
            Mode::Tls => "encrypted and authenticated (TLS 1.3)",
        }
    }
}

/// The loaded material a resource's `security` needs.
#[derive(Debug)]
pub enum Credentials {
    /// This node's key pair and what the peer's certificate must satisfy.
    Tls {
        key: Arc<tls::NodeKey>,
        peer: Arc<tls::PeerPolicy>,
    },
    /// The shared secret.
    Secret(secret::Secret),
}

impl Credentials {
    /// Whether two sets of credentials hold the same keys, pins and
    /// secrets (a reload that changes any of them re-establishes the link).
    pub fn same(&self, other: &Credentials) -> bool {
        match (self, other) {
            (Credentials::Tls { key: k1, peer: p1 }, Credentials::Tls { key: k2, peer: p2 }) => {
                k1.identity == k2.identity
                    && p1.pin == p2.pin
                    && p1.ca.as_ref().map(|c| c.id) == p2.ca.as_ref().map(|c| c.id)
            }
            (Credentials::Secret(a), Credentials::Secret(b)) => a.same(b),
            _ => false,
        }
    }

    /// The mode these credentials serve.
    pub fn mode(&self) -> Mode {
        match self {
            Credentials::Tls { .. } => Mode::Tls,
            Credentials::Secret(_) => Mode::Secret,
        }
    }
}

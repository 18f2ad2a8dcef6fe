//! The secondary's check, once a hello (or an attach, or a probe) names
//! the resource, that the connection has what that resource's `security`
//! requires: TLS with an accepted certificate, a shared-secret challenge,
//! or plain version 2. Never a silent fallback: anything else is refused
//! with a message, logged here and sent to the primary, that says what to
//! change. The shared-secret exchange of one connection attempt
//! ([`SecretExchange`]) checks the primary's attach and seals the
//! geometry answer.

use std::sync::Arc;

use rustls::pki_types::UnixTime;

use crate::config::{ResourceConfig, SecurityMode};
use crate::handshake::{Attach, Geometry, TOKEN_SIZE};
use crate::security::secret::{Mac, Nonce, Secret, Step, Transcript};
use crate::security::tls::{PeerRefused, Usage};
use crate::security::Credentials;

use super::transport::{Conn, LinkInfo};

/// Why a primary's connection is refused for a resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("resource {resource} requires TLS (security tls) and the primary connected without it: set `security tls`, `keyfile` and `peerfingerprint` for it on the primary (a FreeBSD hastd cannot do TLS; give it a resource with `security none`)")]
    TlsRequired { resource: String },
    #[error("resource {resource} requires TLS (security tls) but the primary offered shared-secret authentication: set `security tls` for it on both nodes, or `security secret` here")]
    TlsNotSecret { resource: String },
    #[error("resource {resource} has `security none` on this node but the primary connected with TLS: set `security tls` (with `keyfile` and `peerfingerprint`) for it here, or `security none` on the primary")]
    PlainRequired { resource: String },
    #[error("resource {resource} has `security none` on this node but the primary asks for shared-secret authentication: set `security secret` and `secretfile` for it here, or `security none` on the primary")]
    PlainNotSecret { resource: String },
    #[error("resource {resource} requires shared-secret authentication (security secret) and the primary did not offer it: set `security secret` and the same `secretfile` for it on the primary (a FreeBSD hastd cannot; give it a resource with `security none`)")]
    SecretRequired { resource: String },
    #[error("resource {resource} requires shared-secret authentication (security secret) but the primary connected with TLS: set `security secret` for it on the primary, or `security tls` here")]
    SecretNotTls { resource: String },
    #[error("resource {resource}: the primary's certificate is refused: {reason}")]
    Certificate {
        resource: String,
        reason: PeerRefused,
    },
    #[error("resource {resource}: the primary failed the shared-secret challenge: the `secretfile`s of the two nodes differ (or the attach was forged or replayed)")]
    BadMac { resource: String },
    #[error("resource {resource}: its credentials are not loaded")]
    NotLoaded { resource: String },
    #[error("resource {resource}: the primary's two connections are not protected alike (one with TLS and one without, or two different keys)")]
    Mismatch { resource: String },
}

/// Whether `conn`, whose first header offers shared-secret
/// authentication or not (a nonce in a hello, a MAC in an attach), may
/// reach resource `cfg`; how the link is protected when it may. The MAC
/// itself is checked later ([`SecretExchange::verify_attach`]).
pub fn admit(cfg: &ResourceConfig, conn: &Conn, offers_secret: bool) -> Result<LinkInfo, Refusal> {
    let resource = cfg.name.clone();
    let sec = &cfg.security;
    match (sec.mode, conn.is_tls(), offers_secret) {
        (SecurityMode::None, false, false) => Ok(LinkInfo::default()),
        (SecurityMode::None, true, _) => Err(Refusal::PlainRequired { resource }),
        (SecurityMode::None, false, true) => Err(Refusal::PlainNotSecret { resource }),
        (SecurityMode::Tls, false, false) => Err(Refusal::TlsRequired { resource }),
        (SecurityMode::Tls, false, true) => Err(Refusal::TlsNotSecret { resource }),
        (SecurityMode::Tls, true, _) => {
            let Some(Credentials::Tls { peer, .. }) = sec.credentials.as_deref() else {
                return Err(Refusal::NotLoaded { resource });
            };
            let chain = conn.peer_certificates().unwrap_or_default();
            let id = peer
                .check(&chain, Usage::Client, UnixTime::now())
                .map_err(|reason| Refusal::Certificate {
                    resource: resource.clone(),
                    reason,
                })?;
            Ok(LinkInfo {
                mode: SecurityMode::Tls,
                suite: conn.suite(),
                peer: Some(id.key),
            })
        }
        (SecurityMode::Secret, true, _) => Err(Refusal::SecretNotTls { resource }),
        (SecurityMode::Secret, false, false) => Err(Refusal::SecretRequired { resource }),
        (SecurityMode::Secret, false, true) => Ok(LinkInfo {
            mode: SecurityMode::Secret,
            suite: None,
            peer: None,
        }),
    }
}

/// The secret of a resource with `security secret`.
pub fn secret_of(cfg: &ResourceConfig) -> Option<&Secret> {
    match cfg.security.credentials.as_deref() {
        Some(Credentials::Secret(s)) => Some(s),
        _ => None,
    }
}

/// One shared-secret connection attempt as the secondary sees it: both
/// challenges and the token it handed out.
#[derive(Clone)]
pub struct SecretExchange {
    pub creds: Arc<Credentials>,
    pub resource: String,
    pub primary_nonce: Nonce,
    pub secondary_nonce: Nonce,
    pub token: [u8; TOKEN_SIZE],
}

impl SecretExchange {
    fn secret(&self) -> Option<&Secret> {
        match self.creds.as_ref() {
            Credentials::Secret(s) => Some(s),
            Credentials::Tls { .. } => None,
        }
    }

    fn transcript(&self) -> Transcript<'_> {
        Transcript {
            resource: &self.resource,
            primary_nonce: &self.primary_nonce,
            secondary_nonce: &self.secondary_nonce,
            token: &self.token,
        }
    }

    /// Whether the primary's attach carries the right answer.
    pub fn verify_attach(&self, attach: &Attach) -> Result<(), Refusal> {
        let ok = match (self.secret(), &attach.mac) {
            (Some(s), Some(mac)) => s.verify(
                Step::Attach,
                &self.transcript(),
                &attach.auth_fields(),
                &[],
                mac,
            ),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Refusal::BadMac {
                resource: self.resource.clone(),
            })
        }
    }

    /// The MAC of the geometry answer and the map that follows it.
    pub fn seal_geometry(&self, geo: &Geometry, map: &[u8]) -> Option<Mac> {
        self.secret()
            .map(|s| s.mac(Step::Geometry, &self.transcript(), &geo.auth_fields(), map))
    }
}

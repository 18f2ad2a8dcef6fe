//! TLS 1.3 for the replication connections (`security tls`), with rustls
//! and its ring provider: this node's key pair ([`NodeKey`]), what makes a
//! peer's certificate acceptable ([`PeerPolicy`]: a pinned SHA-256
//! fingerprint, a CA, or both), and the rustls configurations of both
//! sides.
//!
//! - The primary dials: its [`client_config`] presents this node's
//!   certificate and checks the secondary's with the resource's policy
//!   during the handshake ([`PinnedServerVerifier`]).
//! - The secondary accepts before it knows which resource the primary
//!   wants: its [`server_config`] presents this node's certificate and
//!   demands one from the primary, checked only for a valid signature
//!   ([`AnyClientCert`]); once the hello names the resource, the engine
//!   checks the primary's certificate with that resource's policy
//!   ([`PeerPolicy::check`]) and refuses it otherwise.
//!
//! Only TLS 1.3; no session resumption (every connection authenticates
//! both sides in full), no 0-RTT data, no SNI (the secondary has one key).
//! Once the handshake is done, the traffic keys go to [`super::record`].

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

use super::fingerprint::Fingerprint;

/// The name the primary gives rustls for the peer; it is sent nowhere
/// (no SNI) and checked by nothing (the policy is by key).
pub const PEER_NAME: &str = "hast";

/// Why a key pair or a CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no private key (a `PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY` PEM block) in it: make one with hastctl keygen")]
    NoKey,
    #[error("no certificate (a `CERTIFICATE` PEM block) in it: make one with hastctl keygen")]
    NoCertificate,
    #[error("its PEM does not decode: {0:?}")]
    Pem(rustls::pki_types::pem::Error),
    #[error("the key cannot be used: {0}")]
    Key(rustls::Error),
    #[error("the certificate does not parse: {0}")]
    Certificate(webpki::Error),
    #[error("no CA certificate (a `CERTIFICATE` PEM block) in it")]
    NoCa,
    #[error("a CA certificate cannot be used as a trust anchor: {0}")]
    Anchor(webpki::Error),
}

/// The crypto provider: ring's, restricted to TLS 1.3 suites, AES-128-GCM
/// first (the fastest with AES instructions; ChaCha20 for CPUs without).
/// Why ring, and what it lacks (post-quantum key exchange): see
/// [`crate::security`].
// rustls deprecates ring's provider only for its lack of post-quantum key
// exchange; it is supported and maintained.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// What identifies a peer's certificate: the SHA-256 of its public key
/// (SubjectPublicKeyInfo) and of the whole certificate. A pin matches
/// either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity {
    pub key: Fingerprint,
    pub cert: Fingerprint,
}

impl PeerIdentity {
    /// The identity of a DER certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Result<PeerIdentity, webpki::Error> {
        let ee = webpki::EndEntityCert::try_from(cert)?;
        let spki = ee.subject_public_key_info();
        Ok(PeerIdentity {
            key: Fingerprint::of(spki.as_ref()),
            cert: Fingerprint::of(cert.as_ref()),
        })
    }

    /// Whether `pin` names this certificate (its key or itself).
    pub fn matches(&self, pin: &Fingerprint) -> bool {
        *pin == self.key || *pin == self.cert
    }
}

/// This node's key pair: a private key and its certificate (chain), from
/// one PEM file.
pub struct NodeKey {
    certified: Arc<CertifiedKey>,
    /// The fingerprint of the public key, to give the peer.
    pub identity: PeerIdentity,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.identity.key)
    }
}

impl NodeKey {
    /// The key pair in `pem`: the first private key and the certificates,
    /// the node's own first (then its intermediates, in CA mode).
    pub fn from_pem(pem: &[u8]) -> Result<NodeKey, KeyError> {
        let key = match PrivateKeyDer::from_pem_slice(pem) {
            Ok(k) => k,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(KeyError::NoKey),
            Err(e) => return Err(KeyError::Pem(e)),
        };
        let chain = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(KeyError::Pem)?;
        let first = chain.first().ok_or(KeyError::NoCertificate)?;
        let identity = PeerIdentity::of(first).map_err(KeyError::Certificate)?;
        let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(KeyError::Key)?;
        Ok(NodeKey {
            certified: Arc::new(certified),
            identity,
        })
    }
}

/// The key fingerprint of the first certificate in `pem` (a key pair
/// file or a certificate file).
pub fn certificate_fingerprint(pem: &[u8]) -> Result<Fingerprint, KeyError> {
    let cert = match CertificateDer::from_pem_slice(pem) {
        Ok(c) => c,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(KeyError::NoCertificate),
        Err(e) => return Err(KeyError::Pem(e)),
    };
    Ok(PeerIdentity::of(&cert).map_err(KeyError::Certificate)?.key)
}

/// CA certificates that may vouch for a peer (`cafile`).
pub struct CaRoots {
    anchors: Vec<TrustAnchor<'static>>,
    /// Identifies the set (a reload with another CA file).
    pub id: Fingerprint,
}

impl std::fmt::Debug for CaRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaRoots({} anchors, {})", self.anchors.len(), self.id)
    }
}

impl CaRoots {
    /// Every certificate in `pem` as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<CaRoots, KeyError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(KeyError::Pem)?;
        if certs.is_empty() {
            return Err(KeyError::NoCa);
        }
        let mut all = Vec::new();
        let mut anchors = Vec::new();
        for c in &certs {
            all.extend_from_slice(c.as_ref());
            let anchor = webpki::anchor_from_trusted_cert(c).map_err(KeyError::Anchor)?;
            anchors.push(anchor.to_owned());
        }
        Ok(CaRoots {
            anchors,
            id: Fingerprint::of(&all),
        })
    }
}

/// Why a peer's certificate is not accepted for a resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefused {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate does not parse: {0}")]
    BadCertificate(String),
    #[error("the peer's key is {got}, not the pinned {pinned} (peerfingerprint): if the peer's key was replaced on purpose, put its new fingerprint (hastctl fingerprint KEYFILE on the peer) in peerfingerprint and reload")]
    NotPinned {
        got: Fingerprint,
        pinned: Fingerprint,
    },
    #[error("the peer's certificate (key {key}) is not issued by the CA of cafile: {reason}")]
    NotIssued { key: Fingerprint, reason: String },
}

/// What a peer's certificate must satisfy: the pinned fingerprint, the
/// CA, or both when both are configured.
#[derive(Debug)]
pub struct PeerPolicy {
    pub pin: Option<Fingerprint>,
    pub ca: Option<CaRoots>,
}

/// Whose certificate is checked: the secondary's (by the primary) or the
/// primary's (by the secondary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

impl PeerPolicy {
    /// Check the peer's chain (its own certificate first); its identity
    /// when accepted.
    pub fn check(
        &self,
        chain: &[CertificateDer<'_>],
        usage: Usage,
        now: UnixTime,
    ) -> Result<PeerIdentity, PeerRefused> {
        let (ee_der, intermediates) = chain.split_first().ok_or(PeerRefused::NoCertificate)?;
        let id =
            PeerIdentity::of(ee_der).map_err(|e| PeerRefused::BadCertificate(e.to_string()))?;
        if let Some(pin) = &self.pin {
            if !id.matches(pin) {
                return Err(PeerRefused::NotPinned {
                    got: id.key,
                    pinned: *pin,
                });
            }
        }
        if let Some(ca) = &self.ca {
            let ee = webpki::EndEntityCert::try_from(ee_der)
                .map_err(|e| PeerRefused::BadCertificate(e.to_string()))?;
            let eku = match usage {
                Usage::Server => webpki::KeyUsage::server_auth(),
                Usage::Client => webpki::KeyUsage::client_auth(),
            };
            ee.verify_for_usage(
                algorithms().all,
                &ca.anchors,
                intermediates,
                now,
                eku,
                None,
                None,
            )
            .map_err(|e| PeerRefused::NotIssued {
                key: id.key,
                reason: e.to_string(),
            })?;
        }
        Ok(id)
    }
}

/// The primary's check of the secondary's certificate, during the
/// handshake; the reason of a refusal is kept for the log.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    policy: Arc<PeerPolicy>,
    algorithms: WebPkiSupportedAlgorithms,
    refused: Mutex<Option<PeerRefused>>,
}

impl PinnedServerVerifier {
    pub fn new(policy: Arc<PeerPolicy>) -> Arc<PinnedServerVerifier> {
        Arc::new(PinnedServerVerifier {
            policy,
            algorithms: algorithms(),
            refused: Mutex::new(None),
        })
    }

    /// Why the last certificate was refused, if it was.
    pub fn refusal(&self) -> Option<PeerRefused> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        match self.policy.check(&chain, Usage::Server, now) {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                let err = match &e {
                    PeerRefused::NotIssued { .. } => rustls::CertificateError::UnknownIssuer,
                    PeerRefused::BadCertificate(_) | PeerRefused::NoCertificate => {
                        rustls::CertificateError::BadEncoding
                    }
                    PeerRefused::NotPinned { .. } => {
                        rustls::CertificateError::ApplicationVerificationFailure
                    }
                };
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                Err(rustls::Error::InvalidCertificate(err))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The secondary's check of a primary's certificate during the
/// handshake: it must parse and the primary must prove it holds its key
/// (the signature); which resource it may reach is checked after the
/// hello ([`PeerPolicy::check`]).
#[derive(Debug)]
pub struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        PeerIdentity::of(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The primary's configuration toward a peer accepted by `verifier`.
pub fn client_config(
    key: &NodeKey,
    verifier: Arc<PinnedServerVerifier>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key.certified.clone())));
    cfg.enable_sni = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    // The record layer of the application data is `super::record`.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// The secondary's configuration: this node's certificate, a certificate
/// demanded from every primary.
pub fn server_config(key: &NodeKey) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyClientCert {
            algorithms: algorithms(),
        }))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key.certified.clone())));
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// The name given to rustls for the peer (see [`PEER_NAME`]).
pub fn peer_name() -> ServerName<'static> {
    // PEER_NAME is a valid DNS name; the address is never used.
    ServerName::try_from(PEER_NAME)
        .unwrap_or(ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// A TLS 1.3 cipher suite's name for `hastctl list`.
pub fn suite_name(s: rustls::SupportedCipherSuite) -> String {
    format!("{:?}", s.suite())
}

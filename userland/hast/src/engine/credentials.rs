//! Loading what the resources' `security` needs, when hastd starts and on
//! every reload: this node's key pair (`keyfile`), the CA certificates
//! (`cafile`) and shared secrets (`secretfile`). A private key or a secret
//! in a file that another user can read is refused; every error names the
//! configuration line of the statement. The loaded credentials go into
//! each resource's configuration, and the node's TLS server
//! configuration, for the listener, is returned.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, FileRef, SecurityMode};
use crate::security::files::{self, FileError};
use crate::security::secret::{Secret, SecretError};
use crate::security::tls::{self, CaRoots, KeyError, NodeKey, PeerPolicy};
use crate::security::Credentials;

/// What is wrong with a file that a `security` statement names.
#[derive(Debug, thiserror::Error)]
pub enum CredentialProblem {
    #[error("keyfile: {0}")]
    KeyFile(FileError),
    #[error("keyfile {}: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("cafile: {0}")]
    CaFile(FileError),
    #[error("cafile {}: {source}", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("secretfile: {0}")]
    SecretFile(FileError),
    #[error("secretfile {}: {source}", path.display())]
    Secret {
        path: PathBuf,
        #[source]
        source: SecretError,
    },
    #[error("keyfile {}: the TLS configuration cannot be built: {source}", path.display())]
    Rustls {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// A credential that cannot be loaded, at the configuration line that
/// names it.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {problem}", conf.display())]
pub struct CredentialError {
    pub conf: PathBuf,
    pub line: u32,
    pub problem: Box<CredentialProblem>,
}

impl CredentialError {
    /// hastd's exit status: a configuration error (78).
    pub fn exit_code(&self) -> i32 {
        crate::sysexits::EX_CONFIG
    }
}

/// The node's TLS server side, when a resource uses TLS: what the
/// listener accepts TLS connections with.
#[derive(Clone, Debug)]
pub struct NodeTls {
    pub config: Arc<rustls::ServerConfig>,
    /// This node's key fingerprint (for hints in the logs).
    pub key: crate::security::Fingerprint,
}

/// The node's TLS server side, when a resource uses TLS.
pub type ServerTls = Option<NodeTls>;

/// Load every resource's credentials into `cfg`; the node's TLS server
/// configuration (None when no resource uses TLS).
pub fn load(cfg: &mut Config) -> Result<ServerTls, CredentialError> {
    let conf = cfg.path.clone();
    let at = |f: &FileRef, problem| CredentialError {
        conf: conf.clone(),
        line: f.line,
        problem: Box::new(problem),
    };
    let mut node_key: Option<Arc<NodeKey>> = None;
    let mut server = None;
    for res in &mut cfg.resources {
        let sec = &mut res.security;
        let creds = match sec.mode {
            SecurityMode::None => None,
            SecurityMode::Tls => {
                // The parser refused tls without a keyfile.
                let Some(kf) = sec.keyfile.clone() else {
                    continue;
                };
                let key = match &node_key {
                    Some(k) => k.clone(),
                    None => {
                        let bytes = files::read_private(&kf.path)
                            .map_err(|e| at(&kf, CredentialProblem::KeyFile(e)))?;
                        let key = NodeKey::from_pem(&bytes).map_err(|source| {
                            at(
                                &kf,
                                CredentialProblem::Key {
                                    path: kf.path.clone(),
                                    source,
                                },
                            )
                        })?;
                        let sc = tls::server_config(&key).map_err(|source| {
                            at(
                                &kf,
                                CredentialProblem::Rustls {
                                    path: kf.path.clone(),
                                    source,
                                },
                            )
                        })?;
                        server = Some(NodeTls {
                            config: sc,
                            key: key.identity.key,
                        });
                        let key = Arc::new(key);
                        node_key = Some(key.clone());
                        key
                    }
                };
                let ca = match &sec.cafile {
                    None => None,
                    Some(cf) => {
                        let bytes = files::read_public(&cf.path)
                            .map_err(|e| at(cf, CredentialProblem::CaFile(e)))?;
                        Some(CaRoots::from_pem(&bytes).map_err(|source| {
                            at(
                                cf,
                                CredentialProblem::Ca {
                                    path: cf.path.clone(),
                                    source,
                                },
                            )
                        })?)
                    }
                };
                let peer = Arc::new(PeerPolicy {
                    pin: sec.peerfingerprint,
                    ca,
                });
                Some(Credentials::Tls { key, peer })
            }
            SecurityMode::Secret => {
                let Some(sf) = sec.secretfile.clone() else {
                    continue;
                };
                let bytes = files::read_private(&sf.path)
                    .map_err(|e| at(&sf, CredentialProblem::SecretFile(e)))?;
                let secret = Secret::from_bytes(&bytes).map_err(|source| {
                    at(
                        &sf,
                        CredentialProblem::Secret {
                            path: sf.path.clone(),
                            source,
                        },
                    )
                })?;
                Some(Credentials::Secret(secret))
            }
        };
        sec.credentials = creds.map(Arc::new);
    }
    Ok(server)
}

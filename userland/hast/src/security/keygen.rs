//! `hastctl keygen`: a new key pair for a node (an Ed25519 key and a
//! self-signed certificate in one PEM file, mode 0600) and its
//! fingerprint, which goes into the peer's `peerfingerprint`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::tls::NodeKey;
use super::Fingerprint;

/// Why no key pair was written.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("generating the key pair: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{} exists; remove it first, or pass -f to replace it", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the new key pair does not load: {0}")]
    Check(#[from] super::tls::KeyError),
}

/// A new key pair as PEM (private key, then certificate) and the
/// fingerprint of its public key.
pub fn generate(name: &str) -> Result<(String, Fingerprint), KeygenError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key)?;
    let pem = format!("{}{}", key.serialize_pem(), cert.pem());
    let fp = NodeKey::from_pem(pem.as_bytes())?.identity.key;
    Ok((pem, fp))
}

/// Write a new key pair to `path` with mode 0600 (refusing an existing
/// file unless `force`); its fingerprint.
pub fn write(path: &Path, name: &str, force: bool) -> Result<Fingerprint, KeygenError> {
    let (pem, fp) = generate(name)?;
    let werr = |source| KeygenError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(KeygenError::Exists {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(werr(e)),
    };
    // An existing file replaced with -f keeps its mode: set it.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(werr)?;
    f.write_all(pem.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    Ok(fp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_a_private_key_pair_that_loads_with_its_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.key");
        let fp = write(&p, "alpha", false).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        let bytes = crate::security::files::read_private(&p).unwrap();
        assert_eq!(NodeKey::from_pem(&bytes).unwrap().identity.key, fp);
        // Never overwritten by accident.
        assert!(matches!(
            write(&p, "alpha", false),
            Err(KeygenError::Exists { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let fp2 = write(&p, "alpha", true).unwrap();
        assert_ne!(fp, fp2, "a new key");
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
    }
}

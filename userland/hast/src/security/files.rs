//! Reading the files that hold secrets (a node's private key, a shared
//! secret): refused when another user could read or replace them, so a
//! careless `chmod` is caught when hastd starts or reloads rather than
//! after the key leaked.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{} has mode {mode:04o}: it must not be readable or writable by group or others (chmod 600 {})", path.display(), path.display())]
    LooseMode { path: PathBuf, mode: u32 },
    #[error("{} belongs to uid {owner}: it must belong to root or to hastd's user (uid {euid}) (chown it)", path.display())]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
}

/// Whether a file with `mode` and `owner` may hold a secret for a process
/// running as `euid`: no permission bits for group or others, owned by
/// root or by that user.
pub fn check_private(path: &Path, mode: u32, owner: u32, euid: u32) -> Result<(), FileError> {
    if mode & 0o077 != 0 {
        return Err(FileError::LooseMode {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    if owner != 0 && owner != euid {
        return Err(FileError::Owner {
            path: path.to_path_buf(),
            owner,
            euid,
        });
    }
    Ok(())
}

/// Read `path`, which holds a secret: its mode and owner are checked on
/// the opened file (no window between the check and the read).
pub fn read_private(path: &Path) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    let err = |source| FileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let md = f.metadata().map_err(err)?;
    if !md.is_file() {
        return Err(FileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    check_private(path, md.mode(), md.uid(), nix::unistd::geteuid().as_raw())?;
    let mut out = Vec::new();
    f.read_to_end(&mut out).map_err(err)?;
    Ok(out)
}

/// Read a public file (a CA certificate): no permission check.
pub fn read_public(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn modes_and_owners() {
        let p = Path::new("/k");
        assert!(check_private(p, 0o100600, 0, 0).is_ok());
        assert!(check_private(p, 0o100400, 1000, 1000).is_ok());
        for mode in [0o100640, 0o100604, 0o100660, 0o100644, 0o100602] {
            let e = check_private(p, mode, 0, 0).unwrap_err();
            assert!(e.to_string().contains("chmod 600 /k"), "{e}");
        }
        assert!(matches!(
            check_private(p, 0o100600, 1000, 0),
            Err(FileError::Owner { owner: 1000, .. })
        ));
    }

    #[test]
    fn read_checks_the_opened_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        std::fs::write(&p, b"0123456789abcdef").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_private(&p),
            Err(FileError::LooseMode { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_private(&p).unwrap(), b"0123456789abcdef");
        assert!(matches!(
            read_private(dir.path()),
            Err(FileError::NotAFile { .. })
        ));
        assert!(matches!(
            read_private(&dir.path().join("none")),
            Err(FileError::Read { .. })
        ));
    }
}

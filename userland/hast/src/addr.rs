//! Address syntax of hast.conf (`control`, `listen`, `remote`, `source`, `nbd`):
//! parsing and validation without DNS, and resolution on demand.
//!
//! Accepted forms, as the reference understands them:
//! - TCP: `[tcp://|tcp4://|tcp6://]host[:port]` (scheme case-insensitive, TCP is the
//!   default when no scheme is given); an IPv6 address with a port is written
//!   `[addr]:port`, a bare IPv6 address (two or more colons) or one in brackets
//!   without a port takes the default port.
//! - Unix socket: `uds://path`, `unix://path` (case-insensitive), or a bare path that
//!   starts with `/` and contains no `://`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// Default TCP port of hastd (replication and TCP control addresses).
pub const DEFAULT_PORT: u16 = 8457;

/// Longest host name accepted (MAXHOSTNAMELEN is 256 including the NUL).
const MAX_HOST_LEN: usize = 255;

/// Size of `sun_path` in `struct sockaddr_un`; a path must be shorter (room for the NUL).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub const SUN_PATH_SIZE: usize = 108;
/// Size of `sun_path` in `struct sockaddr_un`; a path must be shorter (room for the NUL).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub const SUN_PATH_SIZE: usize = 104;

/// Address family a TCP address is restricted to by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `tcp://` or no scheme: whatever the host resolves to.
    Any,
    /// `tcp4://`: IPv4 only.
    V4,
    /// `tcp6://`: IPv6 only.
    V6,
}

impl Family {
    /// Whether a resolved socket address belongs to this family.
    pub fn admits(self, sa: &SocketAddr) -> bool {
        match self {
            Family::Any => true,
            Family::V4 => sa.is_ipv4(),
            Family::V6 => sa.is_ipv6(),
        }
    }

    /// Scheme that selects this family (`tcp`, `tcp4`, `tcp6`).
    pub fn scheme(self) -> &'static str {
        match self {
            Family::Any => "tcp",
            Family::V4 => "tcp4",
            Family::V6 => "tcp6",
        }
    }
}

/// What an address designates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrKind {
    /// A TCP endpoint; `host` is a name or an IP literal, without brackets.
    Tcp {
        family: Family,
        host: String,
        port: u16,
    },
    /// A Unix-domain stream socket.
    Unix(PathBuf),
}

/// A parsed address; `raw` is the text as written (printed by `Display`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub raw: String,
    pub kind: AddrKind,
}

/// Why a string is not a valid address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("empty address")]
    Empty,
    #[error("address '{raw}': unknown scheme '{scheme}://' (use tcp://, tcp4://, tcp6://, uds:// or unix://)")]
    UnknownScheme { raw: String, scheme: String },
    #[error("address '{raw}': empty Unix socket path")]
    EmptyPath { raw: String },
    #[error(
        "address '{raw}': Unix socket path is {len} bytes long, at most {max} fit in sockaddr_un"
    )]
    PathTooLong { raw: String, len: usize, max: usize },
    #[error("address '{raw}': no host name or IP address")]
    MissingHost { raw: String },
    #[error("address '{raw}': invalid host '{host}' (expected a host name of letters, digits, '.', '-', '_', or an IP address)")]
    BadHost { raw: String, host: String },
    #[error("address '{raw}': invalid port '{port}' (expected a number from 1 to 65535)")]
    BadPort { raw: String, port: String },
    #[error(
        "address '{raw}': {host} is not an {family} address, as the {scheme}:// scheme requires"
    )]
    FamilyMismatch {
        raw: String,
        host: String,
        family: &'static str,
        scheme: &'static str,
    },
}

impl Addr {
    /// Parses `s` without any DNS lookup. `default_port` is used when a TCP address
    /// names no port (the reference uses 8457 for `listen`, `remote` and `control`,
    /// 0 for `source`). An explicit port must be 1 to 65535.
    pub fn parse(s: &str, default_port: u16) -> Result<Addr, AddrError> {
        if s.is_empty() {
            return Err(AddrError::Empty);
        }
        let raw = s.to_string();
        if let Some(path) = strip_prefix_ci(s, "uds://").or_else(|| strip_prefix_ci(s, "unix://")) {
            return unix(raw, path);
        }
        if s.starts_with('/') && !s.contains("://") {
            return unix(raw, s);
        }
        let (family, rest) = if let Some(rest) = strip_prefix_ci(s, "tcp4://") {
            (Family::V4, rest)
        } else if let Some(rest) = strip_prefix_ci(s, "tcp6://") {
            (Family::V6, rest)
        } else if let Some(rest) = strip_prefix_ci(s, "tcp://") {
            (Family::Any, rest)
        } else if let Some(pos) = s.find("://") {
            let scheme = s.get(..pos).unwrap_or_default().to_string();
            return Err(AddrError::UnknownScheme { raw, scheme });
        } else {
            (Family::Any, s)
        };
        let (host, port) = split_host_port(&raw, rest)?;
        let port = match port {
            None => default_port,
            Some(p) => parse_port(p).ok_or_else(|| AddrError::BadPort {
                raw: raw.clone(),
                port: p.to_string(),
            })?,
        };
        check_host(&raw, host, family)?;
        Ok(Addr {
            kind: AddrKind::Tcp {
                family,
                host: host.to_string(),
                port,
            },
            raw,
        })
    }

    /// Resolves a TCP address (DNS may be used: a blocking call), keeping only
    /// the addresses of the family its scheme selects. A Unix-socket address is
    /// an `InvalidInput` error; no address of the wanted family is a `NotFound`
    /// error.
    pub fn socket_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        let (host, port) = self.tcp_target()?;
        self.admitted((host, port).to_socket_addrs()?)
    }

    /// [`Addr::socket_addrs`] through tokio's resolver, for async code that
    /// must not block a worker thread on DNS.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let (host, port) = self.tcp_target()?;
        self.admitted(tokio::net::lookup_host((host, port)).await?)
    }

    /// The host and port of a TCP address.
    fn tcp_target(&self) -> std::io::Result<(&str, u16)> {
        match &self.kind {
            AddrKind::Unix(path) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is a Unix socket address ({}), not a TCP address",
                    self.raw,
                    path.display()
                ),
            )),
            AddrKind::Tcp { host, port, .. } => Ok((host.as_str(), *port)),
        }
    }

    /// The resolved addresses of the family the scheme selects.
    fn admitted(&self, all: impl Iterator<Item = SocketAddr>) -> std::io::Result<Vec<SocketAddr>> {
        let AddrKind::Tcp { family, host, .. } = &self.kind else {
            return Ok(Vec::new());
        };
        let found: Vec<SocketAddr> = all.filter(|sa| family.admits(sa)).collect();
        if found.is_empty() {
            let what = match family {
                Family::Any => "",
                Family::V4 => "IPv4 ",
                Family::V6 => "IPv6 ",
            };
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: host {} has no {}address", self.raw, host, what),
            ));
        }
        Ok(found)
    }

    /// The socket path of a Unix-socket address, `None` for TCP.
    pub fn unix_path(&self) -> Option<&Path> {
        match &self.kind {
            AddrKind::Unix(p) => Some(p),
            AddrKind::Tcp { .. } => None,
        }
    }

    /// Whether this is a TCP address.
    pub fn is_tcp(&self) -> bool {
        matches!(self.kind, AddrKind::Tcp { .. })
    }

    /// The IP address when the host is an IP literal (no resolution needed).
    pub fn ip_literal(&self) -> Option<IpAddr> {
        match &self.kind {
            AddrKind::Tcp { host, .. } => host.parse::<IpAddr>().ok(),
            AddrKind::Unix(_) => None,
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl std::str::FromStr for Addr {
    type Err = AddrError;

    /// Parses with [`DEFAULT_PORT`].
    fn from_str(s: &str) -> Result<Addr, AddrError> {
        Addr::parse(s, DEFAULT_PORT)
    }
}

/// `s` without `prefix`, compared ASCII case-insensitively.
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        s.get(prefix.len()..)
    } else {
        None
    }
}

fn unix(raw: String, path: &str) -> Result<Addr, AddrError> {
    if path.is_empty() {
        return Err(AddrError::EmptyPath { raw });
    }
    let max = SUN_PATH_SIZE.saturating_sub(1);
    if path.len() > max || path.contains('\0') {
        return Err(AddrError::PathTooLong {
            raw,
            len: path.len(),
            max,
        });
    }
    Ok(Addr {
        kind: AddrKind::Unix(PathBuf::from(path)),
        raw,
    })
}

/// Splits `host[:port]`, `[host]:port` or a bare IPv6 address. The rule of the
/// reference: with two or more colons the address is IPv6, and a port may follow
/// only when it starts with `[`; with at most one colon, the part after it is the port.
fn split_host_port<'a>(raw: &str, rest: &'a str) -> Result<(&'a str, Option<&'a str>), AddrError> {
    let colons = rest.bytes().filter(|&b| b == b':').count();
    if colons >= 2 {
        let Some(inner) = rest.strip_prefix('[') else {
            return Ok((rest, None));
        };
        if let Some(close) = inner.rfind("]:") {
            let host = inner.get(..close).unwrap_or_default();
            let port = inner.get(close.saturating_add(2)..).unwrap_or_default();
            if port.contains(':') {
                return Err(AddrError::BadPort {
                    raw: raw.to_string(),
                    port: port.to_string(),
                });
            }
            return Ok((host, Some(port)));
        }
        // `[addr]` without a port: FreeBSD's parser takes it (it checks
        // addresses only when it uses them); it means the default port.
        if let Some(host) = inner.strip_suffix(']') {
            return Ok((host, None));
        }
        return Err(AddrError::BadHost {
            raw: raw.to_string(),
            host: rest.to_string(),
        });
    }
    let (host, port) = match rest.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (rest, None),
    };
    // `[1.2.3.4]:80` and `[name]:80` are accepted by the reference as well.
    let host = match (host.strip_prefix('['), port) {
        (Some(inner), Some(_)) => inner.strip_suffix(']').unwrap_or(host),
        _ => host,
    };
    Ok((host, port))
}

/// A port written in decimal digits only, 1 to 65535.
fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // At most 5 significant digits fit; longer runs of digits overflow u16 anyway.
    let trimmed = p.trim_start_matches('0');
    if trimmed.len() > 5 {
        return None;
    }
    let n: u32 = trimmed.parse().unwrap_or(0);
    u16::try_from(n).ok().filter(|&n| n != 0)
}

fn check_host(raw: &str, host: &str, family: Family) -> Result<(), AddrError> {
    if host.is_empty() {
        return Err(AddrError::MissingHost {
            raw: raw.to_string(),
        });
    }
    let mismatch = |fam: &'static str| AddrError::FamilyMismatch {
        raw: raw.to_string(),
        host: host.to_string(),
        family: fam,
        scheme: family.scheme(),
    };
    if host.parse::<Ipv4Addr>().is_ok() {
        return match family {
            Family::V6 => Err(mismatch("IPv6")),
            _ => Ok(()),
        };
    }
    if host.parse::<Ipv6Addr>().is_ok() {
        return match family {
            Family::V4 => Err(mismatch("IPv4")),
            _ => Ok(()),
        };
    }
    let name_ok = host.len() <= MAX_HOST_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && !host.starts_with(['.', '-'])
        && !host.contains("..");
    if name_ok {
        Ok(())
    } else {
        Err(AddrError::BadHost {
            raw: raw.to_string(),
            host: host.to_string(),
        })
    }
}

//! The hast.conf parser: lexing, grammar, defaults and inheritance of the reference
//! hastd (FreeBSD sbin/hastd), resolved for one host.
//!
//! File layout (the same file is used on every node):
//! ```text
//! # global section
//! control <addr>          pidfile <path>          listen <addr> (repeatable)
//! replication fullsync|memsync|async   checksum none|crc32|sha256
//! compression none|hole|lzf            timeout <seconds>   exec <path>
//! metaflush on|off     metrics <addr>     probe_timeout <seconds>   connect_wait <seconds>
//! on <node> { control <addr>  pidfile <path>  listen <addr>  metrics <addr> }
//! resource <name> {
//!     replication, checksum, compression, timeout, exec, metaflush,
//!     probe_timeout, connect_wait,
//!     name <provname>, local <path>, nbd <addr>
//!     on <node> { name <provname>  local <path>  remote <addr>|none
//!                 source <addr>  metaflush on|off  nbd <addr> }
//! }
//! ```
//! Words are runs of `[a-zA-Z0-9.\-_/:\[\]]`; keywords are case-sensitive; a word of
//! digits only is a number; `#` starts a comment; there is no quoting. Statements
//! repeated in one block: the last one counts. Most specific wins: metaflush
//! res-node > resource > global; replication, checksum, compression, timeout, exec
//! resource > global; name, local, nbd res-node > resource; control, pidfile node >
//! global; listen is the union of the global ones and this host's node blocks, in file
//! order. Global statements apply even when they follow a resource. Every resource
//! needs an `on` block for this host, with a `remote`, and a `local` somewhere.
//!
//! Differences from the reference, all deliberate: errors name the file and a 1-based
//! line (the reference counts lines from 0 and mostly names none); a character outside
//! the word set is an error (flex would echo it to stdout and go on; `\r` is taken as
//! white space); addresses are checked when parsed, in every `on` block, not when first
//! used; `timeout` must fit in 1..2147483647 (the reference overflows `atoi`).
//! `nbd <addr>` is this project's extension, recognised only where a statement starts
//! inside a resource (anywhere else `nbd` stays an ordinary word). So are, where a
//! statement starts, `metrics <addr>` (global and top-level `on` blocks: where hastd
//! serves Prometheus metrics; node > global) and `probe_timeout <seconds>` and
//! `connect_wait <seconds>` (global and resource: how long `hastctl role primary` waits
//! for the peer's answer to its promotion probe, and for the first connection attempt
//! before the device is served; resource > global).
//!
//! Link security (extensions, recognised only where a statement starts, so the words
//! stay usable as names): `security none|secret|tls`, `peerfingerprint <sha256>`,
//! `cafile <path>` and `secretfile <path>` at top level, in top-level `on` blocks, in
//! resources and their `on` blocks (res-node > resource > node > global); `keyfile
//! <path>`, this node's key pair, at top level and in top-level `on` blocks (node >
//! global): the secondary presents its certificate before it knows the resource. A
//! resource with `security tls` needs a `keyfile` and a `peerfingerprint` or `cafile`;
//! one with `security secret` needs a `secretfile`. The files are read by hastd
//! ([`crate::engine::credentials`]), not here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::addr::{Addr, AddrError, DEFAULT_PORT};
pub use crate::security::Mode as SecurityMode;
use crate::security::{fingerprint::FingerprintError, Credentials, Fingerprint};
use crate::sysexits::{EX_CONFIG, EX_OSFILE};

/// Configuration file used when none is given.
pub const DEFAULT_CONFIG: &str = "/etc/hast.conf";
/// Control socket address used when the file sets none.
pub const DEFAULT_CONTROL: &str = "uds:///var/run/hastctl";
/// Pidfile used when the file sets none.
pub const DEFAULT_PIDFILE: &str = "/var/run/hastd.pid";
/// Listen addresses used when the file sets none.
pub const DEFAULT_LISTEN: [&str; 2] = ["tcp4://0.0.0.0:8457", "tcp6://[::]:8457"];
/// Default `timeout` in seconds.
pub const DEFAULT_TIMEOUT: u32 = 20;
/// Largest `timeout` (the reference keeps it in a C `int`).
pub const MAX_TIMEOUT: u32 = i32::MAX as u32;
/// Default port of a TCP `nbd` address (the IANA NBD port).
pub const NBD_DEFAULT_PORT: u16 = 10809;
/// Directory of the default NBD sockets: `<dir>/<provname>.nbd`.
pub const DEFAULT_NBD_DIR: &str = "/var/run/hast";
/// Default port of a `metrics` address (the one Prometheus' port
/// allocations list leaves free for hast).
pub const METRICS_DEFAULT_PORT: u16 = 9458;
/// Default `probe_timeout` in seconds.
pub const DEFAULT_PROBE_TIMEOUT: u32 = 5;

/// Longest resource or provider name (`char [NAME_MAX]` in the reference).
const MAX_NAME_LEN: usize = 254;
/// Longest path (`char [PATH_MAX]`).
const MAX_PATH_LEN: usize = 1023;
/// Longest address (`char [HAST_ADDRSIZE]`).
const MAX_ADDR_LEN: usize = 1023;

/// When a write is acknowledged to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// Local and remote writes done.
    Fullsync,
    /// Local write done and remote copy received (the default).
    Memsync,
    /// Local write done.
    Async,
}

impl Replication {
    /// The keyword, as in hast.conf and `hastctl list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Replication::Fullsync => "fullsync",
            Replication::Memsync => "memsync",
            Replication::Async => "async",
        }
    }

    /// The reference's number (HAST_REPLICATION_*).
    pub fn to_u8(self) -> u8 {
        match self {
            Replication::Fullsync => 0,
            Replication::Memsync => 1,
            Replication::Async => 2,
        }
    }

    /// The inverse of [`Replication::to_u8`].
    pub fn from_u8(n: u8) -> Option<Replication> {
        match n {
            0 => Some(Replication::Fullsync),
            1 => Some(Replication::Memsync),
            2 => Some(Replication::Async),
            _ => None,
        }
    }
}

/// Checksum of replicated payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    None,
    Crc32,
    Sha256,
}

impl Checksum {
    /// The keyword, as in hast.conf.
    pub fn as_str(self) -> &'static str {
        match self {
            Checksum::None => "none",
            Checksum::Crc32 => "crc32",
            Checksum::Sha256 => "sha256",
        }
    }

    /// The reference's number (HAST_CHECKSUM_*).
    pub fn to_u8(self) -> u8 {
        match self {
            Checksum::None => 0,
            Checksum::Crc32 => 1,
            Checksum::Sha256 => 2,
        }
    }

    /// The inverse of [`Checksum::to_u8`].
    pub fn from_u8(n: u8) -> Option<Checksum> {
        match n {
            0 => Some(Checksum::None),
            1 => Some(Checksum::Crc32),
            2 => Some(Checksum::Sha256),
            _ => None,
        }
    }
}

/// Compression of replicated payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Hole,
    Lzf,
}

impl Compression {
    /// The keyword, as in hast.conf.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Hole => "hole",
            Compression::Lzf => "lzf",
        }
    }

    /// The reference's number (HAST_COMPRESSION_*).
    pub fn to_u8(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Hole => 1,
            Compression::Lzf => 2,
        }
    }

    /// The inverse of [`Compression::to_u8`].
    pub fn from_u8(n: u8) -> Option<Compression> {
        match n {
            0 => Some(Compression::None),
            1 => Some(Compression::Hole),
            2 => Some(Compression::Lzf),
            _ => None,
        }
    }
}

/// Which `on NAME { }` blocks describe this machine.
#[derive(Debug, Clone)]
pub struct HostIdentity {
    inner: Ident,
}

#[derive(Debug, Clone)]
enum Ident {
    Host {
        hostname: String,
        uuids: Vec<String>,
        hostid: Option<u64>,
    },
    Node(String),
}

impl HostIdentity {
    /// Real host: gethostname(), the hostname up to its first dot, the host UUID and
    /// `hostid<N>`. The UUID is `kern.hostuuid` on FreeBSD; elsewhere it comes from
    /// /etc/hostid when that holds a UUID in text, else from /etc/machine-id (accepted
    /// both as written and in 8-4-4-4-12 form). `<N>` is gethostid() as an unsigned
    /// 32-bit number.
    pub fn detect() -> HostIdentity {
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        // SAFETY: gethostid() takes no arguments and only returns a number.
        let id = unsafe { libc::gethostid() };
        // The host id is a 32-bit quantity; glibc sign-extends it into a long.
        let hostid = (id as u64) & 0xffff_ffff;
        HostIdentity {
            inner: Ident::Host {
                hostname,
                uuids: system_uuids(),
                hostid: Some(hostid),
            },
        }
    }

    /// `--node NAME` override: only NAME matches (exactly).
    pub fn node(name: &str) -> HostIdentity {
        HostIdentity {
            inner: Ident::Node(name.to_string()),
        }
    }

    /// Explicit parts, for tests and for callers that know them.
    pub fn from_parts(hostname: &str, uuid: Option<&str>, hostid: Option<u64>) -> HostIdentity {
        HostIdentity {
            inner: Ident::Host {
                hostname: hostname.to_string(),
                uuids: uuid.map(str::to_string).into_iter().collect(),
                hostid,
            },
        }
    }

    /// The UUID names found in a FreeBSD-style hostid file (a UUID in text) or, failing
    /// that, a systemd machine-id file (32 hex digits, returned as written and in
    /// 8-4-4-4-12 form). Missing or malformed files give nothing. [`detect`] uses
    /// /etc/hostid and /etc/machine-id.
    ///
    /// [`detect`]: HostIdentity::detect
    pub fn uuids_from_files(hostid_file: &Path, machine_id_file: &Path) -> Vec<String> {
        if let Ok(bytes) = std::fs::read(hostid_file) {
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let t = text.trim();
                if is_uuid(t) {
                    return vec![t.to_string()];
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string(machine_id_file) {
            let t = text.trim();
            if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                let dashed = format!(
                    "{}-{}-{}-{}-{}",
                    t.get(0..8).unwrap_or_default(),
                    t.get(8..12).unwrap_or_default(),
                    t.get(12..16).unwrap_or_default(),
                    t.get(16..20).unwrap_or_default(),
                    t.get(20..32).unwrap_or_default()
                );
                return vec![t.to_string(), dashed];
            }
        }
        Vec::new()
    }

    /// Whether `on <on_name>` describes this host.
    pub fn matches(&self, on_name: &str) -> bool {
        match &self.inner {
            Ident::Node(n) => n == on_name,
            Ident::Host {
                hostname,
                uuids,
                hostid,
            } => {
                if !hostname.is_empty() && hostname == on_name {
                    return true;
                }
                if let Some(short) = short_hostname(hostname) {
                    if short == on_name {
                        return true;
                    }
                }
                if uuids.iter().any(|u| u.eq_ignore_ascii_case(on_name)) {
                    return true;
                }
                match hostid {
                    Some(id) => on_name == format!("hostid{id}"),
                    None => false,
                }
            }
        }
    }

    /// The names accepted, in the reference's order (short hostname, hostname, UUID,
    /// hostid), for error messages.
    pub fn names(&self) -> Vec<String> {
        match &self.inner {
            Ident::Node(n) => vec![n.clone()],
            Ident::Host {
                hostname,
                uuids,
                hostid,
            } => {
                let mut names = Vec::new();
                if let Some(short) = short_hostname(hostname) {
                    names.push(short.to_string());
                }
                if !hostname.is_empty() {
                    names.push(hostname.clone());
                }
                names.extend(uuids.iter().cloned());
                if let Some(id) = hostid {
                    names.push(format!("hostid{id}"));
                }
                names
            }
        }
    }
}

/// The hostname up to its first dot, when it has a dot after at least one character.
fn short_hostname(hostname: &str) -> Option<&str> {
    match hostname.find('.') {
        Some(pos) if pos > 0 => hostname.get(..pos),
        _ => None,
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex digits.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(target_os = "freebsd")]
fn system_uuids() -> Vec<String> {
    let mut buf = [0u8; 128];
    let mut len: libc::size_t = buf.len();
    // SAFETY: buf/len describe a writable buffer of len bytes; no new value is set.
    let rc = unsafe {
        libc::sysctlbyname(
            c"kern.hostuuid".as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut len,
            std::ptr::null(),
            0,
        )
    };
    if rc == 0 {
        let got = buf.get(..len).unwrap_or_default();
        let text = got.split(|&b| b == 0).next().unwrap_or_default();
        let s = String::from_utf8_lossy(text).trim().to_string();
        if !s.is_empty() {
            return vec![s];
        }
    }
    HostIdentity::uuids_from_files(Path::new("/etc/hostid"), Path::new("/etc/machine-id"))
}

#[cfg(not(target_os = "freebsd"))]
fn system_uuids() -> Vec<String> {
    HostIdentity::uuids_from_files(Path::new("/etc/hostid"), Path::new("/etc/machine-id"))
}

/// The configuration as seen by one host.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// File it came from.
    pub path: PathBuf,
    pub control: Addr,
    pub pidfile: PathBuf,
    /// Union of global and this host's node-block `listen`s, in file order; both
    /// [`DEFAULT_LISTEN`] when there is none.
    pub listen: Vec<Addr>,
    /// In file order.
    pub resources: Vec<ResourceConfig>,
    /// Extension: where hastd serves Prometheus metrics (`metrics`); off
    /// when None.
    pub metrics: Option<Addr>,
    /// Extension: this node's key pair (`keyfile`, node > global), used by
    /// resources with `security tls`.
    pub keyfile: Option<FileRef>,
}

/// A file named in the configuration, with the line that names it (for
/// errors about the file's contents or permissions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub path: PathBuf,
    pub line: u32,
}

/// Extension: what a resource's replication connections must have
/// (`security` and the statements that go with it), resolved for this
/// host. Two values are equal when they name the same files and pins and,
/// once loaded, hold the same keys and secrets (lines do not count).
#[derive(Debug, Clone, Default)]
pub struct LinkSecurity {
    pub mode: SecurityMode,
    /// This node's key pair (the node statement `keyfile`).
    pub keyfile: Option<FileRef>,
    /// The peer's key (or certificate) fingerprint.
    pub peerfingerprint: Option<Fingerprint>,
    /// CA certificates that vouch for the peer.
    pub cafile: Option<FileRef>,
    /// The shared secret of `security secret`.
    pub secretfile: Option<FileRef>,
    /// What hastd loaded from the files ([`crate::engine::credentials`]);
    /// None from the parser.
    pub credentials: Option<Arc<Credentials>>,
}

impl PartialEq for LinkSecurity {
    /// Only what the mode uses counts: a key changed for TLS resources
    /// leaves a plain resource alone.
    fn eq(&self, other: &LinkSecurity) -> bool {
        let path = |f: &Option<FileRef>| f.as_ref().map(|f| f.path.clone());
        let creds = match (&self.credentials, &other.credentials) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same(b),
            _ => false,
        };
        self.mode == other.mode
            && match self.mode {
                SecurityMode::None => true,
                SecurityMode::Tls => {
                    path(&self.keyfile) == path(&other.keyfile)
                        && self.peerfingerprint == other.peerfingerprint
                        && path(&self.cafile) == path(&other.cafile)
                        && creds
                }
                SecurityMode::Secret => path(&self.secretfile) == path(&other.secretfile) && creds,
            }
    }
}

/// One resource, resolved for this host.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceConfig {
    pub name: String,
    /// `name` statement, default = resource name.
    pub provname: String,
    pub local: PathBuf,
    /// As written, e.g. "10.0.0.2" or "none".
    pub remote: String,
    /// None for `none`.
    pub remote_addr: Option<Addr>,
    pub source: Option<Addr>,
    pub replication: Replication,
    pub checksum: Checksum,
    pub compression: Compression,
    pub timeout: u32,
    pub exec: Option<PathBuf>,
    pub metaflush: bool,
    /// Extension: NBD export address; None = [`ResourceConfig::nbd_addr`]'s default.
    pub nbd: Option<Addr>,
    /// Extension: seconds `role primary` waits for the peer's answer to
    /// its promotion probe (`probe_timeout`, default 5).
    pub probe_timeout: u32,
    /// Extension: seconds a new primary waits for its first connection
    /// attempt before it serves the device (`connect_wait`); None:
    /// `timeout` + 1.
    pub connect_wait: Option<u32>,
    /// Line of the `resource` keyword.
    pub line: u32,
    /// Extension: what the replication connections must have.
    pub security: LinkSecurity,
}

impl ResourceConfig {
    /// How long a new primary waits for its first connection attempt
    /// before serving the device: `connect_wait`, else `timeout` + 1 s.
    pub fn first_connect_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(
            self.connect_wait
                .unwrap_or_else(|| self.timeout.max(1).saturating_add(1)),
        ))
    }

    /// How long `role primary` waits for the peer's answer to its probe.
    pub fn probe_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.probe_timeout.max(1)))
    }

    /// The NBD export address: `nbd` if set, else the Unix socket
    /// `/var/run/hast/<provname>.nbd`.
    pub fn nbd_addr(&self) -> Addr {
        match &self.nbd {
            Some(a) => a.clone(),
            None => {
                let path = format!("{DEFAULT_NBD_DIR}/{}.nbd", self.provname);
                Addr {
                    kind: crate::addr::AddrKind::Unix(PathBuf::from(&path)),
                    raw: path,
                }
            }
        }
    }
}

/// What is wrong at a given line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("unexpected character {0:?} (there is no quoting; words are made of letters, digits and . - _ / : [ ])")]
    BadChar(char),
    #[error("found {found}, expected {expected}")]
    Unexpected { found: String, expected: String },
    #[error("found {found}, expected {expected} (there is no quoting: a word of digits only or a keyword cannot be used as a name, path or address)")]
    NotAWord { found: String, expected: String },
    #[error("found `{keyword}`, expected {expected}; `{keyword}` is allowed only {allowed}")]
    Misplaced {
        keyword: &'static str,
        expected: &'static str,
        allowed: &'static str,
    },
    #[error("`{statement}`: {source}")]
    BadAddress {
        statement: &'static str,
        source: AddrError,
    },
    #[error("timeout {0} is out of range (1 to 2147483647 seconds)")]
    BadTimeout(String),
    #[error("{statement} {value} is out of range ({min} to 2147483647 seconds)")]
    BadSeconds {
        statement: &'static str,
        value: String,
        min: u32,
    },
    #[error("{what} is too long ({len} bytes, at most {max})")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("resource {name} is defined twice (first on line {first_line})")]
    DuplicateResource { name: String, first_line: u32 },
    #[error("resource {name}: none of its on blocks matches this host (accepted names: {names})")]
    NoBlockForHost { name: String, names: String },
    #[error("resource {name}: no remote address for this host (add `remote <addr>` or `remote none` to its on block for this host)")]
    NoRemote { name: String },
    #[error("resource {name}: no local path for this host (add `local <path>` to the resource or to its on block for this host)")]
    NoLocal { name: String },
    #[error("`peerfingerprint`: {0}")]
    BadFingerprint(FingerprintError),
    #[error("resource {name}: `security tls` needs this node's key pair: add `keyfile <path>` at top level or in this host's top-level `on` block (hastctl keygen makes one)")]
    TlsNeedsKey { name: String },
    #[error("resource {name}: `security tls` needs the peer's key: add `peerfingerprint <sha256>` (what hastctl keygen printed on the peer) or `cafile <path>`")]
    TlsNeedsPeer { name: String },
    #[error("resource {name}: `security secret` needs `secretfile <path>` (a file of mode 0600 holding at least 16 bytes, the same on both nodes)")]
    SecretNeedsFile { name: String },
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be opened or read (exit 72, EX_OSFILE).
    #[error("cannot read configuration file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A lexical, syntax or semantic error at a line (exit 78, EX_CONFIG).
    #[error("{}:{line}: {problem}", path.display())]
    At {
        path: PathBuf,
        line: u32,
        problem: Box<Problem>,
    },
}

impl ConfigError {
    /// 72 (EX_OSFILE) for an unreadable file, 78 (EX_CONFIG) otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Unreadable { .. } => EX_OSFILE,
            ConfigError::At { .. } => EX_CONFIG,
        }
    }

    /// The 1-based line of the error, if it has one.
    pub fn line(&self) -> Option<u32> {
        match self {
            ConfigError::Unreadable { .. } => None,
            ConfigError::At { line, .. } => Some(*line),
        }
    }

    /// What is wrong, for errors at a line.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Unreadable { .. } => None,
            ConfigError::At { problem, .. } => Some(problem.as_ref()),
        }
    }
}

impl Config {
    /// Reads and parses `path` for `host`.
    pub fn load(path: &Path, host: &HostIdentity) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        // Bytes that are not UTF-8 become U+FFFD: ignored in comments, refused (with
        // their line) anywhere else.
        let text = String::from_utf8_lossy(&bytes);
        Config::parse(&text, path, host)
    }

    /// Parses `text` (which came from `path`, named in errors) for `host`.
    pub fn parse(text: &str, path: &Path, host: &HostIdentity) -> Result<Config, ConfigError> {
        let at = |line: u32, problem: Problem| ConfigError::At {
            path: path.to_path_buf(),
            line,
            problem: Box::new(problem),
        };
        let tokens = lex(text).map_err(|(line, p)| at(line, p))?;
        // A missing token at the end of the file is reported where the last one stands.
        let eof_line = tokens.last().map_or(1, |t| t.line);
        let mut parser = Parser {
            tokens,
            pos: 0,
            host,
            eof_line,
        };
        let mut config = parser.file().map_err(|(line, p)| at(line, p))?;
        config.path = path.to_path_buf();
        Ok(config)
    }

    /// The resource named `name`.
    pub fn resource(&self, name: &str) -> Option<&ResourceConfig> {
        self.resources.iter().find(|r| r.name == name)
    }
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kw {
    Control,
    Pidfile,
    Listen,
    Replication,
    Checksum,
    Compression,
    Timeout,
    Exec,
    Metaflush,
    Resource,
    Name,
    Local,
    Remote,
    Source,
    On,
    Off,
    Fullsync,
    Memsync,
    Async,
    None,
    Crc32,
    Sha256,
    Hole,
    Lzf,
}

const KEYWORDS: [(&str, Kw); 24] = [
    ("control", Kw::Control),
    ("pidfile", Kw::Pidfile),
    ("listen", Kw::Listen),
    ("replication", Kw::Replication),
    ("checksum", Kw::Checksum),
    ("compression", Kw::Compression),
    ("timeout", Kw::Timeout),
    ("exec", Kw::Exec),
    ("metaflush", Kw::Metaflush),
    ("resource", Kw::Resource),
    ("name", Kw::Name),
    ("local", Kw::Local),
    ("remote", Kw::Remote),
    ("source", Kw::Source),
    ("on", Kw::On),
    ("off", Kw::Off),
    ("fullsync", Kw::Fullsync),
    ("memsync", Kw::Memsync),
    ("async", Kw::Async),
    ("none", Kw::None),
    ("crc32", Kw::Crc32),
    ("sha256", Kw::Sha256),
    ("hole", Kw::Hole),
    ("lzf", Kw::Lzf),
];

impl Kw {
    fn text(self) -> &'static str {
        KEYWORDS
            .iter()
            .find(|(_, k)| *k == self)
            .map(|(t, _)| *t)
            .unwrap_or("?")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Kw(Kw),
    Num(String),
    Str(String),
    Open,
    Close,
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: u32,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/' | ':' | '[' | ']')
}

/// Splits `text` into tokens the way the reference's flex scanner does: the longest
/// run of word characters is one token; it is a keyword if it equals one exactly, a
/// number if it is all digits, a string otherwise.
fn lex(text: &str) -> Result<Vec<Token>, (u32, Problem)> {
    let mut tokens = Vec::new();
    let mut line: u32 = 1;
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        match c {
            '\n' => line = line.saturating_add(1),
            ' ' | '\t' | '\r' => {}
            '#' => while chars.next_if(|&(_, c)| c != '\n').is_some() {},
            '{' => tokens.push(Token {
                tok: Tok::Open,
                line,
            }),
            '}' => tokens.push(Token {
                tok: Tok::Close,
                line,
            }),
            c if is_word_char(c) => {
                let mut end = start.saturating_add(c.len_utf8());
                while let Some((i, c)) = chars.next_if(|&(_, c)| is_word_char(c)) {
                    end = i.saturating_add(c.len_utf8());
                }
                let word = text.get(start..end).unwrap_or_default();
                let tok = if let Some((_, kw)) = KEYWORDS.iter().find(|(t, _)| *t == word) {
                    Tok::Kw(*kw)
                } else if word.bytes().all(|b| b.is_ascii_digit()) {
                    Tok::Num(word.to_string())
                } else {
                    Tok::Str(word.to_string())
                };
                tokens.push(Token { tok, line });
            }
            other => return Err((line, Problem::BadChar(other))),
        }
    }
    Ok(tokens)
}

// ---------------------------------------------------------------------------
// Parser

/// The four kinds of block a statement can stand in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Top,
    Node,
    Resource,
    ResNode,
}

impl Ctx {
    fn expected(self) -> &'static str {
        match self {
            Ctx::Top => "a statement (control, pidfile, listen, replication, checksum, compression, timeout, exec, metaflush, metrics, probe_timeout, connect_wait, on, resource, security, keyfile, peerfingerprint, cafile, secretfile)",
            Ctx::Node => "`}` or a node statement (control, pidfile, listen, metrics, security, keyfile, peerfingerprint, cafile, secretfile)",
            Ctx::Resource => "`}` or a resource statement (replication, checksum, compression, timeout, exec, metaflush, probe_timeout, connect_wait, name, local, nbd, on, security, peerfingerprint, cafile, secretfile)",
            Ctx::ResNode => "`}` or a resource node statement (name, local, remote, source, metaflush, nbd, security, peerfingerprint, cafile, secretfile)",
        }
    }

    fn block(self) -> &'static str {
        match self {
            Ctx::Top => "file",
            Ctx::Node => "`on` block",
            Ctx::Resource => "`resource` block",
            Ctx::ResNode => "`on` block of the resource",
        }
    }
}

/// A statement keyword (including the contextual extension words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SKw {
    Control,
    Pidfile,
    Listen,
    Replication,
    Checksum,
    Compression,
    Timeout,
    Exec,
    Metaflush,
    Resource,
    Name,
    Local,
    Remote,
    Source,
    On,
    Nbd,
    Security,
    Keyfile,
    PeerFingerprint,
    Cafile,
    Secretfile,
    Metrics,
    ProbeTimeout,
    ConnectWait,
}

impl SKw {
    /// The statements recognised by their word only where a statement
    /// starts (elsewhere they are ordinary words).
    fn contextual(word: &str) -> Option<SKw> {
        Some(match word {
            "nbd" => SKw::Nbd,
            "security" => SKw::Security,
            "keyfile" => SKw::Keyfile,
            "peerfingerprint" => SKw::PeerFingerprint,
            "cafile" => SKw::Cafile,
            "secretfile" => SKw::Secretfile,
            "metrics" => SKw::Metrics,
            "probe_timeout" => SKw::ProbeTimeout,
            "connect_wait" => SKw::ConnectWait,
            _ => return None,
        })
    }

    fn from_kw(kw: Kw) -> Option<SKw> {
        Some(match kw {
            Kw::Control => SKw::Control,
            Kw::Pidfile => SKw::Pidfile,
            Kw::Listen => SKw::Listen,
            Kw::Replication => SKw::Replication,
            Kw::Checksum => SKw::Checksum,
            Kw::Compression => SKw::Compression,
            Kw::Timeout => SKw::Timeout,
            Kw::Exec => SKw::Exec,
            Kw::Metaflush => SKw::Metaflush,
            Kw::Resource => SKw::Resource,
            Kw::Name => SKw::Name,
            Kw::Local => SKw::Local,
            Kw::Remote => SKw::Remote,
            Kw::Source => SKw::Source,
            Kw::On => SKw::On,
            _ => return None,
        })
    }

    fn text(self) -> &'static str {
        match self {
            SKw::Control => "control",
            SKw::Pidfile => "pidfile",
            SKw::Listen => "listen",
            SKw::Replication => "replication",
            SKw::Checksum => "checksum",
            SKw::Compression => "compression",
            SKw::Timeout => "timeout",
            SKw::Exec => "exec",
            SKw::Metaflush => "metaflush",
            SKw::Resource => "resource",
            SKw::Name => "name",
            SKw::Local => "local",
            SKw::Remote => "remote",
            SKw::Source => "source",
            SKw::On => "on",
            SKw::Nbd => "nbd",
            SKw::Security => "security",
            SKw::Keyfile => "keyfile",
            SKw::PeerFingerprint => "peerfingerprint",
            SKw::Cafile => "cafile",
            SKw::Secretfile => "secretfile",
            SKw::Metrics => "metrics",
            SKw::ProbeTimeout => "probe_timeout",
            SKw::ConnectWait => "connect_wait",
        }
    }

    fn allowed_in(self, ctx: Ctx) -> bool {
        use Ctx::*;
        match self {
            SKw::Control | SKw::Pidfile | SKw::Listen => matches!(ctx, Top | Node),
            SKw::Replication | SKw::Checksum | SKw::Compression | SKw::Timeout | SKw::Exec => {
                matches!(ctx, Top | Resource)
            }
            SKw::Metaflush => matches!(ctx, Top | Resource | ResNode),
            SKw::Resource => ctx == Top,
            SKw::Name | SKw::Local | SKw::Nbd => matches!(ctx, Resource | ResNode),
            SKw::Remote | SKw::Source => ctx == ResNode,
            SKw::On => matches!(ctx, Top | Resource),
            SKw::Keyfile => matches!(ctx, Top | Node),
            SKw::Security | SKw::PeerFingerprint | SKw::Cafile | SKw::Secretfile => true,
            SKw::Metrics => matches!(ctx, Top | Node),
            SKw::ProbeTimeout | SKw::ConnectWait => matches!(ctx, Top | Resource),
        }
    }

    fn allowed_where(self) -> &'static str {
        match self {
            SKw::Control | SKw::Pidfile | SKw::Listen => {
                "at top level or in a top-level `on` block"
            }
            SKw::Replication | SKw::Checksum | SKw::Compression | SKw::Timeout | SKw::Exec => {
                "at top level or in a `resource` block"
            }
            SKw::Metaflush => "at top level, in a `resource` block or in its `on` blocks",
            SKw::Resource => "at top level",
            SKw::Name | SKw::Local | SKw::Nbd => "in a `resource` block or in its `on` blocks",
            SKw::Remote | SKw::Source => "in an `on` block inside a `resource` block",
            SKw::On => "at top level or in a `resource` block",
            SKw::Keyfile => "at top level or in a top-level `on` block (it is this node's key)",
            SKw::Security | SKw::PeerFingerprint | SKw::Cafile | SKw::Secretfile => "anywhere",
            SKw::Metrics => "at top level or in a top-level `on` block",
            SKw::ProbeTimeout | SKw::ConnectWait => "at top level or in a `resource` block",
        }
    }
}

/// A parsed statement with its value (blocks are parsed by the caller).
#[derive(Debug)]
enum Stmt {
    Control(Addr),
    Pidfile(PathBuf),
    Listen(Addr),
    Replication(Replication),
    Checksum(Checksum),
    Compression(Compression),
    Timeout(u32),
    Exec(PathBuf),
    Metaflush(bool),
    Resource(String),
    Name(String),
    Local(PathBuf),
    Remote(String, Option<Addr>),
    Source(Addr),
    On(String),
    Nbd(Addr),
    Security(SecurityMode),
    Keyfile(PathBuf),
    PeerFingerprint(Fingerprint),
    Cafile(PathBuf),
    Secretfile(PathBuf),
    Metrics(Addr),
    ProbeTimeout(u32),
    ConnectWait(u32),
}

type PResult<T> = Result<T, (u32, Problem)>;

/// Settings of the global section and of this host's top-level `on` blocks.
#[derive(Default)]
struct Globals {
    control: Option<Addr>,
    pidfile: Option<PathBuf>,
    node_control: Option<Addr>,
    node_pidfile: Option<PathBuf>,
    listen: Vec<Addr>,
    replication: Option<Replication>,
    checksum: Option<Checksum>,
    compression: Option<Compression>,
    timeout: Option<u32>,
    exec: Option<PathBuf>,
    metaflush: Option<bool>,
    metrics: Option<Addr>,
    node_metrics: Option<Addr>,
    probe_timeout: Option<u32>,
    connect_wait: Option<u32>,
    /// Link security at top level and in this host's top-level `on` blocks.
    sec: SecVals,
    node_sec: SecVals,
    keyfile: Option<FileRef>,
    node_keyfile: Option<FileRef>,
}

/// The link-security statements of one level (global, node, resource,
/// resource node).
#[derive(Default, Clone)]
struct SecVals {
    mode: Option<SecurityMode>,
    peerfingerprint: Option<Fingerprint>,
    cafile: Option<FileRef>,
    secretfile: Option<FileRef>,
}

impl SecVals {
    /// Take `stmt` if it is a link-security statement (at `line`).
    fn take(&mut self, stmt: &Stmt, line: u32) -> bool {
        match stmt {
            Stmt::Security(m) => self.mode = Some(*m),
            Stmt::PeerFingerprint(f) => self.peerfingerprint = Some(*f),
            Stmt::Cafile(p) => {
                self.cafile = Some(FileRef {
                    path: p.clone(),
                    line,
                })
            }
            Stmt::Secretfile(p) => {
                self.secretfile = Some(FileRef {
                    path: p.clone(),
                    line,
                })
            }
            _ => return false,
        }
        true
    }

    /// Each value from `self`, else from `under` (a less specific level).
    fn over(self, under: &SecVals) -> SecVals {
        SecVals {
            mode: self.mode.or(under.mode),
            peerfingerprint: self.peerfingerprint.or(under.peerfingerprint),
            cafile: self.cafile.or_else(|| under.cafile.clone()),
            secretfile: self.secretfile.or_else(|| under.secretfile.clone()),
        }
    }
}

/// What this host's `on` blocks of a resource set.
#[derive(Default)]
struct ResNodeVals {
    provname: Option<String>,
    local: Option<PathBuf>,
    remote: Option<(String, Option<Addr>)>,
    source: Option<Addr>,
    metaflush: Option<bool>,
    nbd: Option<Addr>,
    sec: SecVals,
}

/// A resource after its block, before the global section is applied.
struct PendingResource {
    name: String,
    line: u32,
    provname: String,
    local: PathBuf,
    remote: String,
    remote_addr: Option<Addr>,
    source: Option<Addr>,
    replication: Option<Replication>,
    checksum: Option<Checksum>,
    compression: Option<Compression>,
    timeout: Option<u32>,
    exec: Option<PathBuf>,
    metaflush: Option<bool>,
    nbd: Option<Addr>,
    /// Link security of the resource node block over the resource's.
    sec: SecVals,
    probe_timeout: Option<u32>,
    connect_wait: Option<u32>,
}

struct Parser<'h> {
    tokens: Vec<Token>,
    pos: usize,
    host: &'h HostIdentity,
    eof_line: u32,
}

/// How a token is named in messages.
fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Kw(k) => format!("keyword `{}`", k.text()),
        Tok::Num(n) => format!("number {n}"),
        Tok::Str(s) => format!("'{s}'"),
        Tok::Open => "`{`".to_string(),
        Tok::Close => "`}`".to_string(),
        Tok::Eof => "end of file".to_string(),
    }
}

fn check_len(what: &'static str, s: &str, max: usize) -> Result<(), Problem> {
    if s.len() > max {
        Err(Problem::TooLong {
            what,
            len: s.len(),
            max,
        })
    } else {
        Ok(())
    }
}

impl Parser<'_> {
    fn next(&mut self) -> Token {
        match self.tokens.get(self.pos) {
            Some(t) => {
                self.pos = self.pos.saturating_add(1);
                t.clone()
            }
            None => Token {
                tok: Tok::Eof,
                line: self.eof_line,
            },
        }
    }

    /// A word (a STR token) described as `what` in errors.
    fn word(&mut self, what: &str) -> PResult<(String, u32)> {
        let t = self.next();
        match t.tok {
            Tok::Str(s) => Ok((s, t.line)),
            Tok::Num(_) | Tok::Kw(_) => Err((
                t.line,
                Problem::NotAWord {
                    found: describe(&t.tok),
                    expected: what.to_string(),
                },
            )),
            other => Err((
                t.line,
                Problem::Unexpected {
                    found: describe(&other),
                    expected: what.to_string(),
                },
            )),
        }
    }

    /// One of the keywords in `choices`.
    fn choice<T: Copy>(&mut self, choices: &[(Kw, T)], what: &str) -> PResult<T> {
        let t = self.next();
        if let Tok::Kw(k) = t.tok {
            if let Some((_, v)) = choices.iter().find(|(c, _)| *c == k) {
                return Ok(*v);
            }
        }
        Err((
            t.line,
            Problem::Unexpected {
                found: describe(&t.tok),
                expected: what.to_string(),
            },
        ))
    }

    fn address(&mut self, statement: &'static str, default_port: u16) -> PResult<Addr> {
        let (s, line) = self.word(&format!("an address after `{statement}`"))?;
        check_len("address", &s, MAX_ADDR_LEN).map_err(|p| (line, p))?;
        Addr::parse(&s, default_port)
            .map_err(|source| (line, Problem::BadAddress { statement, source }))
    }

    fn path(&mut self, statement: &'static str, what: &'static str) -> PResult<PathBuf> {
        let (s, line) = self.word(&format!("a path after `{statement}`"))?;
        check_len(what, &s, MAX_PATH_LEN).map_err(|p| (line, p))?;
        Ok(PathBuf::from(s))
    }

    /// A number of seconds from `min` to [`MAX_TIMEOUT`] after `statement`.
    fn seconds(&mut self, statement: &'static str, min: u32) -> PResult<u32> {
        let t = self.next();
        match t.tok {
            Tok::Num(n) => n
                .parse::<u64>()
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| (min..=MAX_TIMEOUT).contains(v))
                .ok_or((
                    t.line,
                    Problem::BadSeconds {
                        statement,
                        value: n.clone(),
                        min,
                    },
                )),
            other => Err((
                t.line,
                Problem::Unexpected {
                    found: describe(&other),
                    expected: format!("a number of seconds after `{statement}`"),
                },
            )),
        }
    }

    fn open_brace(&mut self, what: &str) -> PResult<()> {
        let t = self.next();
        match t.tok {
            Tok::Open => Ok(()),
            other => Err((
                t.line,
                Problem::Unexpected {
                    found: describe(&other),
                    expected: format!("`{{` after {what}"),
                },
            )),
        }
    }

    /// The next statement of a block of kind `ctx` (opened on `open_line`), or None at
    /// its end (`}`, or the end of the file at top level).
    fn statement(&mut self, ctx: Ctx, open_line: u32) -> PResult<Option<(Stmt, u32)>> {
        let t = self.next();
        let line = t.line;
        let skw = match &t.tok {
            Tok::Eof if ctx == Ctx::Top => return Ok(None),
            Tok::Close if ctx != Ctx::Top => return Ok(None),
            Tok::Eof => {
                return Err((
                    line,
                    Problem::Unexpected {
                        found: "end of file".to_string(),
                        expected: format!(
                            "`}}` closing the {} opened on line {open_line}",
                            ctx.block()
                        ),
                    },
                ))
            }
            Tok::Close => {
                return Err((
                    line,
                    Problem::Unexpected {
                        found: "`}` without a matching `{`".to_string(),
                        expected: ctx.expected().to_string(),
                    },
                ))
            }
            Tok::Kw(k) => SKw::from_kw(*k),
            Tok::Str(s) => SKw::contextual(s),
            _ => None,
        };
        let Some(skw) = skw else {
            return Err((
                line,
                Problem::Unexpected {
                    found: describe(&t.tok),
                    expected: ctx.expected().to_string(),
                },
            ));
        };
        if !skw.allowed_in(ctx) {
            return Err((
                line,
                Problem::Misplaced {
                    keyword: skw.text(),
                    expected: ctx.expected(),
                    allowed: skw.allowed_where(),
                },
            ));
        }
        let stmt = match skw {
            SKw::Control => Stmt::Control(self.address("control", DEFAULT_PORT)?),
            SKw::Pidfile => Stmt::Pidfile(self.path("pidfile", "pidfile path")?),
            SKw::Listen => Stmt::Listen(self.address("listen", DEFAULT_PORT)?),
            SKw::Replication => Stmt::Replication(self.choice(
                &[
                    (Kw::Fullsync, Replication::Fullsync),
                    (Kw::Memsync, Replication::Memsync),
                    (Kw::Async, Replication::Async),
                ],
                "fullsync, memsync or async after `replication`",
            )?),
            SKw::Checksum => Stmt::Checksum(self.choice(
                &[
                    (Kw::None, Checksum::None),
                    (Kw::Crc32, Checksum::Crc32),
                    (Kw::Sha256, Checksum::Sha256),
                ],
                "none, crc32 or sha256 after `checksum`",
            )?),
            SKw::Compression => Stmt::Compression(self.choice(
                &[
                    (Kw::None, Compression::None),
                    (Kw::Hole, Compression::Hole),
                    (Kw::Lzf, Compression::Lzf),
                ],
                "none, hole or lzf after `compression`",
            )?),
            SKw::Timeout => {
                let t = self.next();
                match t.tok {
                    Tok::Num(n) => {
                        let v = n
                            .parse::<u64>()
                            .ok()
                            .and_then(|v| u32::try_from(v).ok())
                            .filter(|v| (1..=MAX_TIMEOUT).contains(v))
                            .ok_or((t.line, Problem::BadTimeout(n.clone())))?;
                        Stmt::Timeout(v)
                    }
                    other => {
                        return Err((
                            t.line,
                            Problem::Unexpected {
                                found: describe(&other),
                                expected: "a number of seconds after `timeout`".to_string(),
                            },
                        ))
                    }
                }
            }
            SKw::Exec => Stmt::Exec(self.path("exec", "exec path")?),
            SKw::Metaflush => Stmt::Metaflush(self.choice(
                &[(Kw::On, true), (Kw::Off, false)],
                "on or off after `metaflush`",
            )?),
            SKw::Resource => {
                let (name, nline) = self.word("a resource name after `resource`")?;
                check_len("resource name", &name, MAX_NAME_LEN).map_err(|p| (nline, p))?;
                Stmt::Resource(name)
            }
            SKw::Name => {
                let (name, nline) = self.word("a provider name after `name`")?;
                check_len("provider name", &name, MAX_NAME_LEN).map_err(|p| (nline, p))?;
                Stmt::Name(name)
            }
            SKw::Local => Stmt::Local(self.path("local", "local path")?),
            SKw::Remote => {
                let t = self.next();
                match t.tok {
                    Tok::Kw(Kw::None) => Stmt::Remote("none".to_string(), None),
                    Tok::Str(s) => {
                        check_len("address", &s, MAX_ADDR_LEN).map_err(|p| (t.line, p))?;
                        let a = Addr::parse(&s, DEFAULT_PORT).map_err(|source| {
                            (
                                t.line,
                                Problem::BadAddress {
                                    statement: "remote",
                                    source,
                                },
                            )
                        })?;
                        Stmt::Remote(s, Some(a))
                    }
                    other @ (Tok::Num(_) | Tok::Kw(_)) => {
                        return Err((
                            t.line,
                            Problem::NotAWord {
                                found: describe(&other),
                                expected: "an address or none after `remote`".to_string(),
                            },
                        ))
                    }
                    other => {
                        return Err((
                            t.line,
                            Problem::Unexpected {
                                found: describe(&other),
                                expected: "an address or none after `remote`".to_string(),
                            },
                        ))
                    }
                }
            }
            // The reference binds the source address with port 0 unless one is given.
            SKw::Source => Stmt::Source(self.address("source", 0)?),
            SKw::On => {
                let (name, _) = self.word("a node name after `on`")?;
                Stmt::On(name)
            }
            SKw::Nbd => Stmt::Nbd(self.address("nbd", NBD_DEFAULT_PORT)?),
            SKw::Security => {
                let t = self.next();
                match &t.tok {
                    Tok::Kw(Kw::None) => Stmt::Security(SecurityMode::None),
                    Tok::Str(s) if s == "secret" => Stmt::Security(SecurityMode::Secret),
                    Tok::Str(s) if s == "tls" => Stmt::Security(SecurityMode::Tls),
                    other => {
                        return Err((
                            t.line,
                            Problem::Unexpected {
                                found: describe(other),
                                expected: "none, secret or tls after `security`".to_string(),
                            },
                        ))
                    }
                }
            }
            SKw::Keyfile => Stmt::Keyfile(self.path("keyfile", "keyfile path")?),
            SKw::Cafile => Stmt::Cafile(self.path("cafile", "cafile path")?),
            SKw::Secretfile => Stmt::Secretfile(self.path("secretfile", "secretfile path")?),
            SKw::PeerFingerprint => {
                let t = self.next();
                let text =
                    match &t.tok {
                        // 64 hex digits may happen to be all decimal digits.
                        Tok::Str(s) | Tok::Num(s) => s.clone(),
                        other => return Err((
                            t.line,
                            Problem::Unexpected {
                                found: describe(other),
                                expected:
                                    "a fingerprint (sha256:<64 hex digits>) after `peerfingerprint`"
                                        .to_string(),
                            },
                        )),
                    };
                let fp =
                    Fingerprint::parse(&text).map_err(|e| (t.line, Problem::BadFingerprint(e)))?;
                Stmt::PeerFingerprint(fp)
            }
            SKw::Metrics => Stmt::Metrics(self.address("metrics", METRICS_DEFAULT_PORT)?),
            SKw::ProbeTimeout => Stmt::ProbeTimeout(self.seconds("probe_timeout", 1)?),
            SKw::ConnectWait => Stmt::ConnectWait(self.seconds("connect_wait", 0)?),
        };
        Ok(Some((stmt, line)))
    }

    fn file(&mut self) -> PResult<Config> {
        let mut g = Globals::default();
        let mut pending: Vec<PendingResource> = Vec::new();
        let mut seen: HashMap<String, u32> = HashMap::new();
        while let Some((stmt, line)) = self.statement(Ctx::Top, 0)? {
            if g.sec.take(&stmt, line) {
                continue;
            }
            match stmt {
                Stmt::Control(a) => g.control = Some(a),
                Stmt::Pidfile(p) => g.pidfile = Some(p),
                Stmt::Listen(a) => g.listen.push(a),
                Stmt::Replication(v) => g.replication = Some(v),
                Stmt::Checksum(v) => g.checksum = Some(v),
                Stmt::Compression(v) => g.compression = Some(v),
                Stmt::Timeout(v) => g.timeout = Some(v),
                Stmt::Exec(p) => g.exec = Some(p),
                Stmt::Metaflush(v) => g.metaflush = Some(v),
                Stmt::Keyfile(p) => g.keyfile = Some(FileRef { path: p, line }),
                Stmt::Metrics(a) => g.metrics = Some(a),
                Stmt::ProbeTimeout(v) => g.probe_timeout = Some(v),
                Stmt::ConnectWait(v) => g.connect_wait = Some(v),
                Stmt::On(node) => {
                    self.open_brace(&format!("`on {node}`"))?;
                    self.node_block(&node, line, &mut g)?;
                }
                Stmt::Resource(name) => {
                    if let Some(&first_line) = seen.get(&name) {
                        return Err((line, Problem::DuplicateResource { name, first_line }));
                    }
                    self.open_brace(&format!("`resource {name}`"))?;
                    let res = self.resource_block(name, line)?;
                    seen.insert(res.name.clone(), line);
                    pending.push(res);
                }
                // statement() refuses everything else at top level.
                Stmt::Name(_)
                | Stmt::Local(_)
                | Stmt::Remote(..)
                | Stmt::Source(_)
                | Stmt::Nbd(_) => {}
                // Taken by g.sec above.
                Stmt::Security(_)
                | Stmt::PeerFingerprint(_)
                | Stmt::Cafile(_)
                | Stmt::Secretfile(_) => {}
            }
        }
        let control = match g.node_control.or(g.control) {
            Some(a) => a,
            None => default_addr(DEFAULT_CONTROL)?,
        };
        let pidfile = g
            .node_pidfile
            .or(g.pidfile)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIDFILE));
        let listen = if g.listen.is_empty() {
            DEFAULT_LISTEN
                .iter()
                .map(|s| default_addr(s))
                .collect::<PResult<Vec<_>>>()?
        } else {
            g.listen
        };
        let keyfile = g.node_keyfile.clone().or(g.keyfile.clone());
        let node_sec = g.node_sec.clone().over(&g.sec);
        let mut resources = Vec::with_capacity(pending.len());
        for p in pending {
            let sec = p.sec.clone().over(&node_sec);
            let mode = sec.mode.unwrap_or_default();
            match mode {
                SecurityMode::Tls if keyfile.is_none() => {
                    return Err((p.line, Problem::TlsNeedsKey { name: p.name }))
                }
                SecurityMode::Tls if sec.peerfingerprint.is_none() && sec.cafile.is_none() => {
                    return Err((p.line, Problem::TlsNeedsPeer { name: p.name }))
                }
                SecurityMode::Secret if sec.secretfile.is_none() => {
                    return Err((p.line, Problem::SecretNeedsFile { name: p.name }))
                }
                _ => {}
            }
            let security = LinkSecurity {
                mode,
                keyfile: keyfile.clone(),
                peerfingerprint: sec.peerfingerprint,
                cafile: sec.cafile,
                secretfile: sec.secretfile,
                credentials: None,
            };
            resources.push(ResourceConfig {
                name: p.name,
                provname: p.provname,
                local: p.local,
                remote: p.remote,
                remote_addr: p.remote_addr,
                source: p.source,
                replication: p
                    .replication
                    .or(g.replication)
                    .unwrap_or(Replication::Memsync),
                checksum: p.checksum.or(g.checksum).unwrap_or(Checksum::None),
                compression: p.compression.or(g.compression).unwrap_or(Compression::Hole),
                timeout: p.timeout.or(g.timeout).unwrap_or(DEFAULT_TIMEOUT),
                exec: p.exec.or_else(|| g.exec.clone()),
                metaflush: p.metaflush.or(g.metaflush).unwrap_or(true),
                nbd: p.nbd,
                probe_timeout: p
                    .probe_timeout
                    .or(g.probe_timeout)
                    .unwrap_or(DEFAULT_PROBE_TIMEOUT),
                connect_wait: p.connect_wait.or(g.connect_wait),
                line: p.line,
                security,
            });
        }
        Ok(Config {
            path: PathBuf::new(),
            control,
            pidfile,
            listen,
            resources,
            keyfile,
            metrics: g.node_metrics.or(g.metrics),
        })
    }

    /// A top-level `on NAME { }` block; only this host's blocks take effect, but every
    /// value is checked.
    fn node_block(&mut self, node: &str, open_line: u32, g: &mut Globals) -> PResult<()> {
        let mine = self.host.matches(node);
        while let Some((stmt, line)) = self.statement(Ctx::Node, open_line)? {
            if !mine {
                continue;
            }
            if g.node_sec.take(&stmt, line) {
                continue;
            }
            match stmt {
                Stmt::Control(a) => g.node_control = Some(a),
                Stmt::Pidfile(p) => g.node_pidfile = Some(p),
                Stmt::Listen(a) => g.listen.push(a),
                Stmt::Keyfile(p) => g.node_keyfile = Some(FileRef { path: p, line }),
                Stmt::Metrics(a) => g.node_metrics = Some(a),
                _ => {}
            }
        }
        Ok(())
    }

    fn resource_block(&mut self, name: String, line: u32) -> PResult<PendingResource> {
        let mut replication = None;
        let mut checksum = None;
        let mut compression = None;
        let mut timeout = None;
        let mut exec = None;
        let mut metaflush = None;
        let mut provname = None;
        let mut local = None;
        let mut nbd = None;
        let mut probe_timeout = None;
        let mut connect_wait = None;
        let mut node = ResNodeVals::default();
        let mut sec = SecVals::default();
        let mut had_mine = false;
        while let Some((stmt, sline)) = self.statement(Ctx::Resource, line)? {
            if sec.take(&stmt, sline) {
                continue;
            }
            match stmt {
                Stmt::Replication(v) => replication = Some(v),
                Stmt::Checksum(v) => checksum = Some(v),
                Stmt::Compression(v) => compression = Some(v),
                Stmt::Timeout(v) => timeout = Some(v),
                Stmt::Exec(p) => exec = Some(p),
                Stmt::Metaflush(v) => metaflush = Some(v),
                Stmt::Name(n) => provname = Some(n),
                Stmt::Local(p) => local = Some(p),
                Stmt::Nbd(a) => nbd = Some(a),
                Stmt::ProbeTimeout(v) => probe_timeout = Some(v),
                Stmt::ConnectWait(v) => connect_wait = Some(v),
                Stmt::On(on_name) => {
                    self.open_brace(&format!("`on {on_name}`"))?;
                    let mine = self.host.matches(&on_name);
                    had_mine |= mine;
                    self.res_node_block(mine, sline, &mut node)?;
                }
                _ => {}
            }
        }
        if !had_mine {
            return Err((
                line,
                Problem::NoBlockForHost {
                    name,
                    names: self.host.names().join(", "),
                },
            ));
        }
        let Some((remote, remote_addr)) = node.remote else {
            return Err((line, Problem::NoRemote { name }));
        };
        let Some(local) = node.local.or(local) else {
            return Err((line, Problem::NoLocal { name }));
        };
        Ok(PendingResource {
            provname: node.provname.or(provname).unwrap_or_else(|| name.clone()),
            name,
            line,
            local,
            remote,
            remote_addr,
            source: node.source,
            replication,
            checksum,
            compression,
            timeout,
            exec,
            metaflush: node.metaflush.or(metaflush),
            nbd: node.nbd.or(nbd),
            sec: node.sec.over(&sec),
            probe_timeout,
            connect_wait,
        })
    }

    fn res_node_block(&mut self, mine: bool, open_line: u32, v: &mut ResNodeVals) -> PResult<()> {
        while let Some((stmt, line)) = self.statement(Ctx::ResNode, open_line)? {
            if !mine {
                continue;
            }
            if v.sec.take(&stmt, line) {
                continue;
            }
            match stmt {
                Stmt::Name(n) => v.provname = Some(n),
                Stmt::Local(p) => v.local = Some(p),
                Stmt::Remote(s, a) => v.remote = Some((s, a)),
                Stmt::Source(a) => v.source = Some(a),
                Stmt::Metaflush(b) => v.metaflush = Some(b),
                Stmt::Nbd(a) => v.nbd = Some(a),
                _ => {}
            }
        }
        Ok(())
    }
}

/// One of the built-in default addresses (they always parse).
fn default_addr(s: &str) -> PResult<Addr> {
    Addr::parse(s, DEFAULT_PORT).map_err(|source| {
        (
            0,
            Problem::BadAddress {
                statement: "default",
                source,
            },
        )
    })
}

//! The control protocol between hastctl and hastd: framing version 2 plus an
//! nv list, one request and one reply per connection, over the `control`
//! address (a Unix socket by default).
//!
//! Request: `cmd` (uint8: 1 SETROLE, 2 STATUS), `role` (uint8, SETROLE only),
//! `resource0`..`resourceN` (strings; `all` as resource0 means every one).
//! Reply: per resource `resource%u`, `role%u`, status fields, and `error%u`
//! (int16) when that resource failed; `error` (int16) when the whole request
//! failed. This project adds `errmsg%u` (a string saying what failed), which
//! the reference hastctl ignores.
//!
//! Extensions (commands a FreeBSD hastd answers with EHAST_UNIMPLEMENTED):
//! `cmd` 64 EVENTS (`now`, `statistics`: uint8 flags) is answered with the
//! state of the resources as event frames, a frame with `end_of_state`, and
//! then, unless `now`, every event as it happens, on the same connection
//! ([`crate::events`]); `cmd` 65 RECONNECT makes primaries try their peer
//! now, and is answered like SETROLE (per resource `error%u`, `errmsg%u`).

pub mod role;
pub mod status;

use std::io;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::addr::{Addr, AddrKind};
use crate::nv::Nv;
use crate::proto::{self, Limits, ProtoError};
use crate::role::Role;
use crate::sysexits;

/// `cmd` value: change the role of the listed resources.
pub const HASTCTL_CMD_SETROLE: u8 = 1;
/// `cmd` value: report the status of the listed resources.
pub const HASTCTL_CMD_STATUS: u8 = 2;
/// `cmd` value (extension): stream the events of the listed resources.
/// Far from the reference's values so that a command it may add never
/// collides.
pub const HASTCTL_CMD_EVENTS: u8 = 64;
/// `cmd` value (extension): primaries try their peer now.
pub const HASTCTL_CMD_RECONNECT: u8 = 65;

/// Per-resource or request error: no such resource.
pub const EHAST_NOENTRY: i16 = 1;
/// Request error: a malformed request (missing field, bad role).
pub const EHAST_INVALID: i16 = 2;
/// Request error: out of memory.
pub const EHAST_NOMEMORY: i16 = 3;
/// Request error: unknown command.
pub const EHAST_UNIMPLEMENTED: i16 = 4;

/// How long hastctl waits to connect, send and receive (the reference's
/// HAST_TIMEOUT).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(20);

/// A failed exchange with hastd.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing accepts connections at the control address.
    #[error("unable to connect to hastd via {addr}: {source} (is hastd running with this configuration?)")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The request could not be sent.
    #[error("unable to send command to hastd via {addr}: {source}")]
    Send {
        addr: String,
        #[source]
        source: ProtoError,
    },
    /// No valid reply arrived.
    #[error("cannot receive reply from hastd via {addr}: {source}")]
    Receive {
        addr: String,
        #[source]
        source: ProtoError,
    },
}

impl ControlError {
    /// hastctl's exit code: 71 (EX_OSERR) when the daemon cannot be reached,
    /// 69 (EX_UNAVAILABLE) when sending or receiving fails.
    pub fn exit_code(&self) -> i32 {
        match self {
            ControlError::Connect { .. } => sysexits::EX_OSERR,
            ControlError::Send { .. } | ControlError::Receive { .. } => sysexits::EX_UNAVAILABLE,
        }
    }
}

/// A blocking stream to the control address, Unix or TCP.
enum Stream {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

fn connect(addr: &Addr, timeout: Duration) -> io::Result<Stream> {
    match &addr.kind {
        AddrKind::Unix(path) => {
            let s = UnixStream::connect(path)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            Ok(Stream::Unix(s))
        }
        AddrKind::Tcp { .. } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing");
            for sa in addr.socket_addrs()? {
                match std::net::TcpStream::connect_timeout(&sa, timeout) {
                    Ok(s) => {
                        s.set_read_timeout(Some(timeout))?;
                        s.set_write_timeout(Some(timeout))?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

/// Connect to hastd at `addr` and send `req`; the connection and the
/// address as text, for the errors of what follows.
fn send(addr: &Addr, req: &Nv) -> Result<(Stream, String), ControlError> {
    let name = addr.to_string();
    let mut stream = connect(addr, CONTROL_TIMEOUT).map_err(|source| ControlError::Connect {
        addr: name.clone(),
        source,
    })?;
    proto::write_frame(&mut stream, req, &[]).map_err(|source| ControlError::Send {
        addr: name.clone(),
        source,
    })?;
    Ok((stream, name))
}

/// Send one request to hastd at `addr` and return its reply.
pub fn request(addr: &Addr, req: &Nv) -> Result<Nv, ControlError> {
    let (mut stream, name) = send(addr, req)?;
    let (reply, _) = proto::read_frame(&mut stream, Limits::HEADERS_ONLY)
        .map_err(|source| ControlError::Receive { addr: name, source })?;
    Ok(reply)
}

/// A connection to hastd on which it streams frames (the answer to an
/// EVENTS request), read without a timeout: events come when they happen.
pub struct FrameStream {
    stream: Stream,
    addr: String,
}

/// Send `req` to hastd at `addr` and keep the connection to read the
/// frames that follow.
pub fn stream(addr: &Addr, req: &Nv) -> Result<FrameStream, ControlError> {
    let (stream, name) = send(addr, req)?;
    let unlimited = match &stream {
        Stream::Unix(s) => s.set_read_timeout(None),
        Stream::Tcp(s) => s.set_read_timeout(None),
    };
    unlimited.map_err(|e| ControlError::Receive {
        addr: name.clone(),
        source: ProtoError::Io(e),
    })?;
    Ok(FrameStream { stream, addr: name })
}

impl FrameStream {
    /// The next frame; `None` when hastd closed the connection between
    /// frames.
    pub fn next_frame(&mut self) -> Result<Option<Nv>, ControlError> {
        match proto::read_frame(&mut self.stream, Limits::HEADERS_ONLY) {
            Ok((nv, _)) => Ok(Some(nv)),
            Err(ProtoError::Closed) => Ok(None),
            Err(source) => Err(ControlError::Receive {
                addr: self.addr.clone(),
                source,
            }),
        }
    }
}

/// Build a SETROLE request for `resources` (`["all"]` for every resource).
/// `force` (an extension the reference ignores) skips safe promotion.
pub fn setrole_request(role: Role, resources: &[String], force: bool) -> Nv {
    let mut nv = Nv::new();
    nv.add_u8("cmd", HASTCTL_CMD_SETROLE);
    nv.add_u8("role", role.to_u8());
    if force {
        nv.add_u8("force", 1);
    }
    for (i, r) in resources.iter().enumerate() {
        nv.add_string(format!("resource{i}"), r.as_str());
    }
    nv
}

/// Build a STATUS request for `resources` (empty means `all`).
pub fn status_request(resources: &[String]) -> Nv {
    named_request(HASTCTL_CMD_STATUS, resources)
}

/// A request of `cmd` for `resources` (empty means `all`).
fn named_request(cmd: u8, resources: &[String]) -> Nv {
    let mut nv = Nv::new();
    nv.add_u8("cmd", cmd);
    if resources.is_empty() {
        nv.add_string("resource0", "all");
    }
    for (i, r) in resources.iter().enumerate() {
        nv.add_string(format!("resource{i}"), r.as_str());
    }
    nv
}

/// Build an EVENTS request (extension) for `resources` (empty means
/// `all`): the state first, then (unless `now`) the events as they
/// happen; `statistics` adds the request counters to the state.
pub fn events_request(resources: &[String], now: bool, statistics: bool) -> Nv {
    let mut nv = named_request(HASTCTL_CMD_EVENTS, resources);
    if now {
        nv.add_u8("now", 1);
    }
    if statistics {
        nv.add_u8("statistics", 1);
    }
    nv
}

/// Build a RECONNECT request (extension) for `resources` (`["all"]` for
/// every resource).
pub fn reconnect_request(resources: &[String]) -> Nv {
    named_request(HASTCTL_CMD_RECONNECT, resources)
}

/// A control request as hastd understands it (see [`parse_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// `Some(role)` for SETROLE (init, primary or secondary), `None` for
    /// STATUS and the extensions.
    pub role: Option<Role>,
    /// Extension: `force` skips the safe-promotion check.
    pub force: bool,
    /// The resources named, in order; `None` when `resource0` is `all`.
    pub resources: Option<Vec<String>>,
    /// An extension command, when it is one (then `role` is `None`).
    pub extension: Option<Extension>,
}

/// The commands this project adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// Stream events; `now`: only the state; `statistics`: with counters.
    Events { now: bool, statistics: bool },
    /// Primaries try their peer now.
    Reconnect,
}

/// A control request hastd refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("control header is missing the 'cmd' field")]
    NoCmd,
    #[error("control header is missing the 'resource0' field")]
    NoResource,
    #[error("invalid role received ({0})")]
    BadRole(String),
    #[error("invalid command received ({0})")]
    BadCmd(u8),
}

impl CommandError {
    /// What hastd answers: nothing (the connection is closed) for a
    /// request without `cmd`, as the reference does; else `error`.
    pub fn reply(&self) -> Option<Nv> {
        let code = match self {
            CommandError::NoCmd => return None,
            CommandError::NoResource | CommandError::BadRole(_) => EHAST_INVALID,
            CommandError::BadCmd(_) => EHAST_UNIMPLEMENTED,
        };
        let mut nv = Nv::new();
        nv.add_i16("error", code);
        Some(nv)
    }
}

/// Parses a request hastd received on its control socket, with the
/// reference's checks in its order: `cmd`, `resource0`, then `role` for
/// SETROLE.
pub fn parse_request(nv: &Nv) -> Result<Command, CommandError> {
    let cmd = nv.get_u8("cmd").unwrap_or(0);
    if cmd == 0 {
        return Err(CommandError::NoCmd);
    }
    let first = nv.get_string("resource0").ok_or(CommandError::NoResource)?;
    let mut extension = None;
    let role = match cmd {
        HASTCTL_CMD_SETROLE => match nv.get_u8("role").and_then(Role::from_u8) {
            Some(r @ (Role::Init | Role::Primary | Role::Secondary)) => Some(r),
            _ => return Err(CommandError::BadRole(format!("{:?}", nv.get("role")))),
        },
        HASTCTL_CMD_STATUS => None,
        HASTCTL_CMD_EVENTS => {
            extension = Some(Extension::Events {
                now: nv.get_u8("now") == Some(1),
                statistics: nv.get_u8("statistics") == Some(1),
            });
            None
        }
        HASTCTL_CMD_RECONNECT => {
            extension = Some(Extension::Reconnect);
            None
        }
        _ => return Err(CommandError::BadCmd(cmd)),
    };
    let resources = if first == "all" {
        None
    } else {
        Some(resource_names(nv))
    };
    Ok(Command {
        role,
        force: nv.get_u8("force") == Some(1),
        resources,
        extension,
    })
}

/// The names `resource0`, `resource1`, ... of a request or reply, in order,
/// stopping at the first index that is missing (or whose first element is
/// not a string, as a lookup by name sees it). One pass over the list: a
/// lookup per index would be quadratic in a request of up to 1 MiB.
pub fn resource_names(nv: &Nv) -> Vec<String> {
    use crate::nv::Value;
    use std::collections::HashMap;
    let mut first: HashMap<u32, Option<&str>> = HashMap::new();
    for (name, value) in nv.iter() {
        let Some(index) = name.strip_prefix("resource").and_then(decimal_index) else {
            continue;
        };
        first.entry(index).or_insert(match value {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        });
    }
    (0u32..)
        .map_while(|i| first.get(&i).copied().flatten().map(str::to_string))
        .collect()
}

/// `digits` as the index `format!("resource{i}")` writes: decimal, no sign,
/// no leading zero.
fn decimal_index(digits: &str) -> Option<u32> {
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if canonical {
        digits.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_in_the_reference_order() {
        let names = vec!["a".to_string(), "b".to_string()];
        let req = parse_request(&setrole_request(Role::Primary, &names, true)).unwrap();
        assert_eq!(
            req,
            Command {
                role: Some(Role::Primary),
                force: true,
                resources: Some(names.clone()),
                extension: None,
            }
        );
        let ev = parse_request(&events_request(&names, true, false)).unwrap();
        assert_eq!(
            (ev.role, ev.extension),
            (
                None,
                Some(Extension::Events {
                    now: true,
                    statistics: false
                })
            )
        );
        let rc = parse_request(&reconnect_request(&[])).unwrap();
        assert_eq!(
            (rc.extension, rc.resources),
            (Some(Extension::Reconnect), None)
        );
        let all = parse_request(&status_request(&[])).unwrap();
        assert_eq!((all.role, all.resources), (None, None));
        // No cmd: closed unanswered; then resource0 before the command.
        assert_eq!(parse_request(&Nv::new()), Err(CommandError::NoCmd));
        assert_eq!(CommandError::NoCmd.reply(), None);
        let mut nv = Nv::new();
        nv.add_u8("cmd", 9);
        assert_eq!(parse_request(&nv), Err(CommandError::NoResource));
        nv.add_string("resource0", "a");
        let err = parse_request(&nv).unwrap_err();
        assert_eq!(err, CommandError::BadCmd(9));
        assert_eq!(
            err.reply().unwrap().get_i16("error"),
            Some(EHAST_UNIMPLEMENTED)
        );
        let mut nv = setrole_request(Role::Undef, &names, false);
        let err = parse_request(&nv).unwrap_err();
        assert!(matches!(err, CommandError::BadRole(_)));
        assert_eq!(err.reply().unwrap().get_i16("error"), Some(EHAST_INVALID));
        nv.remove("role");
        assert!(matches!(parse_request(&nv), Err(CommandError::BadRole(_))));
    }

    #[test]
    fn names_stop_at_the_first_missing_or_mistyped_index() {
        let mut nv = Nv::new();
        nv.add_string("resource1", "b")
            .add_string("resource0", "a")
            .add_string("resource1", "shadowed")
            .add_string("resource01", "not an index")
            .add_u8("resource2", 7)
            .add_string("resource2", "after a mistyped first")
            .add_string("resource3", "d");
        assert_eq!(resource_names(&nv), ["a", "b"]);
        nv.remove("resource0");
        assert!(resource_names(&nv).is_empty());
    }

    #[test]
    fn a_request_of_the_largest_size_parses_quickly() {
        // 1 MiB of names (about 35000): looking each one up from the start
        // of the list held the daemon's control loop for 1.5 s (5 s in a
        // debug build).
        let mut nv = Nv::new();
        nv.add_u8("cmd", HASTCTL_CMD_STATUS);
        let (mut n, mut size) = (0, nv.encoded_len());
        loop {
            let name = format!("resource{n}");
            // Header, name and NUL padded to 8, "r" and NUL padded to 8.
            size += 6 + (name.len() + 1).div_ceil(8) * 8 + 8;
            if size > crate::nv::NV_MAX_SIZE {
                break;
            }
            nv.add_string(name, "r");
            n += 1;
        }
        let nv = Nv::decode(&nv.encode().unwrap()).unwrap();
        let start = std::time::Instant::now();
        let req = parse_request(&nv).unwrap();
        let took = start.elapsed();
        assert_eq!(req.resources.map(|r| r.len()), Some(n));
        assert!(
            took < std::time::Duration::from_secs(1),
            "{n} names took {took:?}"
        );
    }
}

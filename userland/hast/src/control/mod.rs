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

pub mod role;
pub mod status;

use std::io;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::addr::{Addr, AddrKind};
use crate::nv::Nv;
use crate::proto::{self, Limits, ProtoError};
use crate::sysexits;

/// `cmd` value: change the role of the listed resources.
pub const HASTCTL_CMD_SETROLE: u8 = 1;
/// `cmd` value: report the status of the listed resources.
pub const HASTCTL_CMD_STATUS: u8 = 2;

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

/// Send one request to hastd at `addr` and return its reply.
pub fn request(addr: &Addr, req: &Nv) -> Result<Nv, ControlError> {
    let name = addr.to_string();
    let mut stream = connect(addr, CONTROL_TIMEOUT).map_err(|source| ControlError::Connect {
        addr: name.clone(),
        source,
    })?;
    proto::write_frame(&mut stream, req, &[]).map_err(|source| ControlError::Send {
        addr: name.clone(),
        source,
    })?;
    let (reply, _) = proto::read_frame(&mut stream, Limits::HEADERS_ONLY)
        .map_err(|source| ControlError::Receive { addr: name, source })?;
    Ok(reply)
}

/// Build a SETROLE request for `resources` (`["all"]` for every resource).
/// `force` (an extension the reference ignores) skips safe promotion.
pub fn setrole_request(role: crate::role::Role, resources: &[String], force: bool) -> Nv {
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
    let mut nv = Nv::new();
    nv.add_u8("cmd", HASTCTL_CMD_STATUS);
    if resources.is_empty() {
        nv.add_string("resource0", "all");
    }
    for (i, r) in resources.iter().enumerate() {
        nv.add_string(format!("resource{i}"), r.as_str());
    }
    nv
}

/// The names `resource0`, `resource1`, ... of a request or reply, in order,
/// stopping at the first index that is missing.
pub fn resource_names(nv: &Nv) -> Vec<String> {
    (0u32..)
        .map_while(|i| nv.get_string(&format!("resource{i}")).map(str::to_string))
        .collect()
}

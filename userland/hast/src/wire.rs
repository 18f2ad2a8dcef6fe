//! Replication requests and replies of protocol version 2 as nv headers,
//! and the secondary's validation of a request before it touches the disk.
//! Payloads (write data, read results) follow the header as framed by
//! [`crate::proto`] and encoded by the payload pipeline.

use crate::nv::Nv;

/// A replication command (`cmd` uint8 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Read,
    Write,
    Delete,
    Flush,
    Keepalive,
}

impl Cmd {
    pub fn to_u8(self) -> u8 {
        match self {
            Cmd::Read => 1,
            Cmd::Write => 2,
            Cmd::Delete => 3,
            Cmd::Flush => 4,
            Cmd::Keepalive => 5,
        }
    }

    pub fn from_u8(v: u8) -> Option<Cmd> {
        match v {
            1 => Some(Cmd::Read),
            2 => Some(Cmd::Write),
            3 => Some(Cmd::Delete),
            4 => Some(Cmd::Flush),
            5 => Some(Cmd::Keepalive),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cmd::Read => "READ",
            Cmd::Write => "WRITE",
            Cmd::Delete => "DELETE",
            Cmd::Flush => "FLUSH",
            Cmd::Keepalive => "KEEPALIVE",
        }
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub cmd: Cmd,
    /// Never 0, except for a keepalive.
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    /// memsync: answer "received" before writing.
    pub memsync: bool,
}

/// Why a request is refused (answered with EINVAL, as the reference does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("header contains no 'cmd' field")]
    NoCmd,
    #[error("header contains invalid 'cmd' ({0})")]
    BadCmd(u8),
    #[error("header contains no 'seq' field")]
    NoSeq,
    #[error("header is missing the '{0}' field")]
    Missing(&'static str),
    #[error("data length is zero")]
    ZeroLength,
    #[error("data length is too large ({length} > {max})")]
    TooLarge { length: u64, max: u64 },
    #[error("offset {0} is not a multiple of the sector size")]
    Misaligned(u64),
    #[error("length {0} is not a multiple of the sector size")]
    MisalignedLength(u64),
    #[error("data offset is too large ({end} > {datasize})")]
    OutOfRange { end: u64, datasize: u64 },
}

/// The largest READ/WRITE this project accepts from a peer and sends as
/// one request: FreeBSD 13's MAXPHYS (1 MiB). The one spelling of this
/// limit: the secondary, the engine's pieces, the userland host's split
/// and the kernel transport's resync buffers all use it.
pub const MAX_IO: u64 = 1 << 20;
/// [`MAX_IO`] as a buffer size.
pub const MAX_IO_BYTES: usize = 1 << 20;
const _: () = assert!(MAX_IO_BYTES as u64 == MAX_IO);

/// What a secondary accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub sectorsize: u32,
    pub datasize: u64,
    /// Largest READ/WRITE (the reference's MAXPHYS); DELETE is unbounded.
    pub max_length: u64,
}

impl Request {
    /// The header (the caller adds `size` and payload fields for a write).
    pub fn to_nv(&self) -> Nv {
        let mut nv = Nv::new();
        nv.add_u8("cmd", self.cmd.to_u8());
        if self.cmd != Cmd::Keepalive {
            nv.add_u64("seq", self.seq);
        }
        if matches!(self.cmd, Cmd::Read | Cmd::Write | Cmd::Delete) {
            nv.add_u64("offset", self.offset)
                .add_u64("length", self.length);
        }
        if self.cmd == Cmd::Write && self.memsync {
            nv.add_u8("memsync", 1);
        }
        nv
    }

    /// Parse and validate a request header as the secondary must before
    /// any I/O. `Err` carries the seq when one was readable (so the error
    /// can be answered) and the reason.
    pub fn from_nv(nv: &Nv, limits: &RequestLimits) -> Result<Request, (u64, RequestError)> {
        let raw = nv
            .get_u8("cmd")
            .filter(|&c| c != 0)
            .ok_or((0, RequestError::NoCmd))?;
        let seq = nv.get_u64("seq").unwrap_or(0);
        let cmd = Cmd::from_u8(raw).ok_or((seq, RequestError::BadCmd(raw)))?;
        if cmd != Cmd::Keepalive && seq == 0 {
            return Err((0, RequestError::NoSeq));
        }
        let mut req = Request {
            cmd,
            seq,
            offset: 0,
            length: 0,
            memsync: false,
        };
        if matches!(cmd, Cmd::Flush | Cmd::Keepalive) {
            return Ok(req);
        }
        let fail = |e| (seq, e);
        req.memsync = cmd == Cmd::Write && nv.get("memsync").is_some();
        req.offset = nv
            .get_u64("offset")
            .ok_or(fail(RequestError::Missing("offset")))?;
        req.length = nv
            .get_u64("length")
            .ok_or(fail(RequestError::Missing("length")))?;
        if req.length == 0 {
            return Err(fail(RequestError::ZeroLength));
        }
        if cmd != Cmd::Delete && req.length > limits.max_length {
            return Err(fail(RequestError::TooLarge {
                length: req.length,
                max: limits.max_length,
            }));
        }
        let sector = u64::from(limits.sectorsize.max(1));
        if !req.offset.is_multiple_of(sector) {
            return Err(fail(RequestError::Misaligned(req.offset)));
        }
        if !req.length.is_multiple_of(sector) {
            return Err(fail(RequestError::MisalignedLength(req.length)));
        }
        match req.offset.checked_add(req.length) {
            Some(end) if end <= limits.datasize => Ok(req),
            end => Err(fail(RequestError::OutOfRange {
                end: end.unwrap_or(u64::MAX),
                datasize: limits.datasize,
            })),
        }
    }
}

/// A reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub seq: u64,
    /// memsync's early "received" reply (the write is not on disk yet).
    pub received: bool,
    /// errno of the failure, 0 for success.
    pub error: i16,
}

impl Reply {
    pub fn to_nv(&self) -> Nv {
        let mut nv = Nv::new();
        nv.add_u64("seq", self.seq);
        if self.received {
            nv.add_i8("received", 1);
        }
        if self.error != 0 {
            nv.add_i16("error", self.error);
        }
        nv
    }

    /// Parse a reply; `None` when it has no seq.
    pub fn from_nv(nv: &Nv) -> Option<Reply> {
        let seq = nv.get_u64("seq").filter(|&s| s != 0)?;
        Some(Reply {
            seq,
            received: nv.get("received").is_some(),
            error: nv.get_i16("error").unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: RequestLimits = RequestLimits {
        sectorsize: 512,
        datasize: 1 << 20,
        max_length: 128 << 10,
    };

    fn req(cmd: Cmd, seq: u64, offset: u64, length: u64) -> Nv {
        Request {
            cmd,
            seq,
            offset,
            length,
            memsync: false,
        }
        .to_nv()
    }

    #[test]
    fn valid_requests_round_trip() {
        let r = Request {
            cmd: Cmd::Write,
            seq: 9,
            offset: 4096,
            length: 8192,
            memsync: true,
        };
        assert_eq!(Request::from_nv(&r.to_nv(), &L), Ok(r));
        let f = Request::from_nv(&req(Cmd::Flush, 3, 0, 0), &L).unwrap();
        assert_eq!((f.cmd, f.seq), (Cmd::Flush, 3));
        let k = Request::from_nv(&req(Cmd::Keepalive, 0, 0, 0), &L).unwrap();
        assert_eq!(k.cmd, Cmd::Keepalive);
        // A delete may exceed the I/O size limit.
        assert!(Request::from_nv(&req(Cmd::Delete, 1, 0, 1 << 20), &L).is_ok());
    }

    #[test]
    fn invalid_requests_are_refused_with_their_seq() {
        use RequestError::*;
        let cases = [
            (req(Cmd::Read, 0, 0, 512), (0, NoSeq)),
            (req(Cmd::Read, 5, 0, 0), (5, ZeroLength)),
            (
                req(Cmd::Write, 5, 0, 256 << 10),
                (
                    5,
                    TooLarge {
                        length: 256 << 10,
                        max: 128 << 10,
                    },
                ),
            ),
            (req(Cmd::Write, 5, 100, 512), (5, Misaligned(100))),
            (req(Cmd::Write, 5, 0, 100), (5, MisalignedLength(100))),
            (
                req(Cmd::Read, 5, 1 << 20, 512),
                (
                    5,
                    OutOfRange {
                        end: (1 << 20) + 512,
                        datasize: 1 << 20,
                    },
                ),
            ),
            (
                req(Cmd::Delete, 5, u64::MAX - 511, 512),
                (
                    5,
                    OutOfRange {
                        end: u64::MAX,
                        datasize: 1 << 20,
                    },
                ),
            ),
        ];
        for (nv, want) in cases {
            assert_eq!(Request::from_nv(&nv, &L), Err(want));
        }
        let mut nv = Nv::new();
        nv.add_u8("cmd", 9).add_u64("seq", 4);
        assert_eq!(Request::from_nv(&nv, &L), Err((4, BadCmd(9))));
        assert_eq!(Request::from_nv(&Nv::new(), &L), Err((0, NoCmd)));
        let mut nv = Nv::new();
        nv.add_u8("cmd", 1).add_u64("seq", 4).add_u64("offset", 0);
        assert_eq!(Request::from_nv(&nv, &L), Err((4, Missing("length"))));
    }

    #[test]
    fn replies() {
        let r = Reply {
            seq: 7,
            received: true,
            error: 0,
        };
        let nv = r.to_nv();
        assert!(nv.get("error").is_none());
        assert_eq!(Reply::from_nv(&nv), Some(r));
        let e = Reply {
            seq: 8,
            received: false,
            error: 5,
        };
        assert_eq!(Reply::from_nv(&e.to_nv()), Some(e));
        assert_eq!(Reply::from_nv(&Nv::new()), None);
    }
}

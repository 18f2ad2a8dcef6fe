//! NBD wire constants and the fixed-size messages of the protocol
//! (NetworkBlockDevice/nbd `doc/proto.md`), encoded and decoded big-endian.

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic of newstyle negotiation and the magic of
/// every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of an option reply.
pub const REPLY_OPT_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections to one export share one cache.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose an export and enter transmission (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (not supported here).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (not supported here).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// Option reply error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option reply error: option known but forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option reply error: option syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option reply error: the export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option reply error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option reply error: the request or the reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information item: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information item: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information item: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush to stable storage.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard (a hint).
pub const CMD_TRIM: u16 = 4;
/// Command: zero a range, no payload.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not leave a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error: operation not permitted.
pub const EPERM: u32 = 1;
/// Error: input/output error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const EINVAL: u32 = 22;
/// Error: no space left (also a write past the end of the export).
pub const ENOSPC: u32 = 28;
/// Error: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Size of a transmission request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// The largest payload a client may send or ask for without being deemed a
/// denial of service (2^25, "Size constraints" in proto.md).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdRequest {
    /// Must be [`REQUEST_MAGIC`].
    pub magic: u32,
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

fn be_u16(b: &[u8; 2]) -> u16 {
    u16::from_be_bytes(*b)
}

impl NbdRequest {
    /// Decodes a request header.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> NbdRequest {
        let (magic, rest) = b.split_at(4);
        let (flags, rest) = rest.split_at(2);
        let (kind, rest) = rest.split_at(2);
        let (cookie, rest) = rest.split_at(8);
        let (offset, length) = rest.split_at(8);
        NbdRequest {
            magic: u32::from_be_bytes(arr(magic)),
            flags: be_u16(&arr(flags)),
            kind: be_u16(&arr(kind)),
            cookie: u64::from_be_bytes(arr(cookie)),
            offset: u64::from_be_bytes(arr(offset)),
            length: u32::from_be_bytes(arr(length)),
        }
    }

    /// Encodes a request header (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        let mut w = Writer(&mut b[..]);
        w.put(&self.magic.to_be_bytes());
        w.put(&self.flags.to_be_bytes());
        w.put(&self.kind.to_be_bytes());
        w.put(&self.cookie.to_be_bytes());
        w.put(&self.offset.to_be_bytes());
        w.put(&self.length.to_be_bytes());
        b
    }
}

/// Copies a slice of exactly `N` bytes into an array; shorter input is
/// zero-padded (callers always pass exact slices from `split_at`).
fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    for (d, v) in a.iter_mut().zip(s) {
        *d = *v;
    }
    a
}

/// A cursor that fills a fixed buffer front to back.
struct Writer<'a>(&'a mut [u8]);

impl Writer<'_> {
    fn put(&mut self, src: &[u8]) {
        let buf = std::mem::take(&mut self.0);
        let n = src.len().min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        for (d, v) in head.iter_mut().zip(src) {
            *d = *v;
        }
        self.0 = tail;
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    let mut w = Writer(&mut b[..]);
    w.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    w.put(&error.to_be_bytes());
    w.put(&cookie.to_be_bytes());
    b
}

/// Encodes an option reply: header followed by `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(20usize.saturating_add(data.len()));
    v.extend_from_slice(&REPLY_OPT_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The server's greeting: magics and handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    let mut w = Writer(&mut b[..]);
    w.put(&NBDMAGIC.to_be_bytes());
    w.put(&IHAVEOPT.to_be_bytes());
    w.put(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option request header from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Must be [`IHAVEOPT`].
    pub magic: u64,
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes an option header.
    pub fn decode(b: &[u8; OPTION_HEADER_LEN]) -> OptionHeader {
        let (magic, rest) = b.split_at(8);
        let (option, length) = rest.split_at(4);
        OptionHeader {
            magic: u64::from_be_bytes(arr(magic)),
            option: u32::from_be_bytes(arr(option)),
            length: u32::from_be_bytes(arr(length)),
        }
    }
}

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name as sent.
    pub name: Vec<u8>,
    /// The information items asked for.
    pub items: Vec<u16>,
}

impl InfoRequest {
    /// Parses the option data; `None` when the lengths inside disagree with
    /// the option length.
    pub fn parse(data: &[u8]) -> Option<InfoRequest> {
        let (nlen, rest) = split(data, 4)?;
        let nlen = usize::try_from(u32::from_be_bytes(arr(nlen))).ok()?;
        let (name, rest) = split(rest, nlen)?;
        let (count, rest) = split(rest, 2)?;
        let count = usize::from(u16::from_be_bytes(arr(count)));
        if rest.len() != count.checked_mul(2)? {
            return None;
        }
        let items = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes(arr(c)))
            .collect();
        Some(InfoRequest {
            name: name.to_vec(),
            items,
        })
    }
}

fn split(s: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    if s.len() < n {
        None
    } else {
        Some(s.split_at(n))
    }
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    let mut w = Writer(&mut b[..]);
    w.put(&INFO_EXPORT.to_be_bytes());
    w.put(&size.to_be_bytes());
    w.put(&flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    let mut w = Writer(&mut b[..]);
    w.put(&INFO_BLOCK_SIZE.to_be_bytes());
    w.put(&min.to_be_bytes());
    w.put(&preferred.to_be_bytes());
    w.put(&max.to_be_bytes());
    b
}

/// `NBD_REP_INFO` payload for `NBD_INFO_NAME`.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2usize.saturating_add(name.len()));
    v.extend_from_slice(&INFO_NAME.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// `NBD_REP_SERVER` payload: name length and name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(4usize.saturating_add(name.len()));
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless the client asked
/// for no zeroes) 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.resize(134, 0);
    }
    v
}

/// Maps an I/O error from a backend to the NBD error sent to the client.
pub fn errno_to_nbd(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        _ => match e.kind() {
            std::io::ErrorKind::InvalidInput => EINVAL,
            _ => EIO,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = NbdRequest {
            magic: REQUEST_MAGIC,
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1122_3344_5566_7788,
            length: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(NbdRequest::decode(&b), r);
    }

    #[test]
    fn simple_reply_layout() {
        let b = simple_reply(EINVAL, 7);
        assert_eq!(
            b,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn info_request_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = InfoRequest::parse(&d).unwrap();
        assert_eq!(r.name, b"abc");
        assert_eq!(r.items, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // Truncated item list, name longer than the data, trailing garbage.
        assert!(InfoRequest::parse(&d[..d.len() - 1]).is_none());
        let mut long = d.clone();
        long[3] = 200;
        assert!(InfoRequest::parse(&long).is_none());
        let mut extra = d.clone();
        extra.push(0);
        assert!(InfoRequest::parse(&extra).is_none());
        assert!(InfoRequest::parse(&[0, 0]).is_none());
    }

    #[test]
    fn export_name_reply_zeroes() {
        assert_eq!(export_name_reply(1, 2, true).len(), 10);
        let v = export_name_reply(512, 1, false);
        assert_eq!(v.len(), 134);
        assert_eq!(&v[..10], &[0, 0, 0, 0, 0, 0, 2, 0, 0, 1]);
        assert!(v[10..].iter().all(|b| *b == 0));
    }

    #[test]
    fn option_reply_layout() {
        let v = option_reply(OPT_LIST, REP_ERR_UNSUP, b"x");
        assert_eq!(&v[..8], &REPLY_OPT_MAGIC.to_be_bytes());
        assert_eq!(&v[8..12], &3u32.to_be_bytes());
        assert_eq!(&v[12..16], &0x8000_0001u32.to_be_bytes());
        assert_eq!(&v[16..20], &1u32.to_be_bytes());
        assert_eq!(&v[20..], b"x");
    }
}

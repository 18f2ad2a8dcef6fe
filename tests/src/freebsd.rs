//! FreeBSD's own hastd as a peer, emulated from the bytes it sends, so that
//! pairing with a base-system hastd is tested on Linux. What each side sends
//! follows FreeBSD 12.1's sbin/hastd (the newest release matches it):
//!
//! - every frame is `u8 version`, `u32 size` (little-endian), the nv, then a
//!   payload of nv `size` bytes (hast_proto.c); the version byte is the
//!   resource's `hr_version`, which is 1 until the handshake raised it
//!   (parse.y sets 1, primary.c sets the negotiated version after the
//!   first answer): a FreeBSD primary's first frame carries byte 1;
//! - the primary's hello is `{resource, version: uint8 2}`; its second
//!   connection carries `{resource, token, [virgin: int8 1], resuid,
//!   localcnt, remotecnt}` (primary.c init_remote);
//! - the secondary answers the hello with `{version, token: uint8[16]}` and
//!   the second step with `{datasize: int64, extentsize: int32, localcnt,
//!   remotecnt, [virgin: int8 1], syncsrc: uint8, mapsize: uint32}` and its
//!   activemap as a payload that went through the data pipeline
//!   (secondary.c init_remote: `hast_proto_send(res, ..., map, mapsize)`):
//!   with `compression hole` a clean map travels as `size: 4` and its
//!   length, with a checksum it carries `checksum` and `hash`;
//! - requests are `{cmd: uint8, seq: uint64, offset: uint64, length:
//!   uint64, [memsync: uint8 1]}` plus the pipeline's fields (primary.c
//!   remote_send_thread); replies `{seq: uint64, [error: int16]}`
//!   (secondary.c send_thread).
//!
//! The data pipeline is written here again from those facts (hole, crc32,
//! sha256; lzf is not emulated: a block that only lzf would shrink is sent
//! as it is, which FreeBSD does for blocks of at most 1024 bytes), so these
//! tests do not check this project's encoder against itself.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use hast::nv::Nv;
use sha2::Digest;

/// FreeBSD's HAST_PROTO_VERSION.
pub const PROTO_VERSION: u8 = 2;
/// The version byte of a FreeBSD primary's first frame (parse.y's
/// `hr_version = 1`).
pub const FIRST_FRAME_VERSION: u8 = 1;

/// `cmd` values of requests (hast.h HIO_*).
pub const HIO_READ: u8 = 1;
pub const HIO_WRITE: u8 = 2;
pub const HIO_DELETE: u8 = 3;
pub const HIO_FLUSH: u8 = 4;
pub const HIO_KEEPALIVE: u8 = 5;

/// `syncsrc` values (hast.h HAST_SYNCSRC_*).
pub const SYNCSRC_PRIMARY: u8 = 1;
pub const SYNCSRC_SECONDARY: u8 = 2;

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// One frame as FreeBSD writes it: `version`, the nv (with `size` added
/// when there is a payload, after the pipeline's fields), the payload.
pub fn frame(version: u8, nv: &Nv, payload: &[u8]) -> Vec<u8> {
    let mut nv = nv.clone();
    if !payload.is_empty() {
        nv.add_u32(
            "size",
            u32::try_from(payload.len()).expect("payload fits u32"),
        );
    }
    let body = nv.encode().expect("encodable nv");
    let mut out = vec![version];
    out.extend_from_slice(&u32::try_from(body.len()).expect("nv fits").to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(payload);
    out
}

/// Read one frame: its version byte, nv and payload.
pub fn read_frame(r: &mut impl Read) -> io::Result<(u8, Nv, Vec<u8>)> {
    let mut hdr = [0u8; 5];
    r.read_exact(&mut hdr)?;
    let size = u32::from_le_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    if size > 1 << 20 {
        return Err(bad(format!("nv of {size} bytes")));
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body)?;
    let nv = Nv::decode(&body).map_err(|e| bad(format!("nv: {e}")))?;
    let psize = nv.get_u32("size").unwrap_or(0) as usize;
    if psize > 16 << 20 {
        return Err(bad(format!("payload of {psize} bytes")));
    }
    let mut payload = vec![0u8; psize];
    r.read_exact(&mut payload)?;
    Ok((hdr[0], nv, payload))
}

/// The zlib CRC-32 as FreeBSD's hast_crc32_checksum stores it (host
/// order: little-endian on every platform HAST runs on).
fn crc32(data: &[u8]) -> Vec<u8> {
    let mut h = crc32fast::Hasher::new();
    h.update(data);
    h.finalize().to_le_bytes().to_vec()
}

/// hast_proto_send's pipeline: compression (`hole` when the block is all
/// zeros, also for `lzf`), then the checksum over what is sent.
pub fn pipeline_send(nv: &mut Nv, data: &[u8], compression: &str, checksum: &str) -> Vec<u8> {
    let mut out = data.to_vec();
    if matches!(compression, "hole" | "lzf") && data.iter().all(|&b| b == 0) {
        nv.add_string("compression", "hole");
        out = u32::try_from(data.len())
            .expect("block fits u32")
            .to_le_bytes()
            .to_vec();
    }
    match checksum {
        "crc32" => {
            nv.add_string("checksum", "crc32");
            nv.add_u8_array("hash", crc32(&out));
        }
        "sha256" => {
            nv.add_string("checksum", "sha256");
            nv.add_u8_array("hash", sha2::Sha256::digest(&out).to_vec());
        }
        _ => {}
    }
    out
}

/// hast_proto_recv_data's pipeline, undone in reverse: verify the checksum,
/// then expand `hole` (lzf is refused: nothing in these tests sends it).
pub fn pipeline_recv(nv: &Nv, payload: Vec<u8>, expect: usize) -> io::Result<Vec<u8>> {
    if let Some(algo) = nv.get_string("checksum") {
        let want = nv.get_u8_array("hash").ok_or_else(|| bad("hash missing"))?;
        let got = match algo {
            "crc32" => crc32(&payload),
            "sha256" => sha2::Sha256::digest(&payload).to_vec(),
            other => return Err(bad(format!("checksum {other}"))),
        };
        if got != want {
            return Err(bad("checksum mismatch"));
        }
    }
    let data = match nv.get_string("compression") {
        None => payload,
        Some("hole") => {
            let b: [u8; 4] = payload
                .as_slice()
                .try_into()
                .map_err(|_| bad("hole payload is not 4 bytes"))?;
            vec![0u8; u32::from_le_bytes(b) as usize]
        }
        Some(other) => return Err(bad(format!("compression {other} not emulated"))),
    };
    if data.len() != expect {
        return Err(bad(format!("{} bytes, expected {expect}", data.len())));
    }
    Ok(data)
}

/// What the emulated secondary saw of one session.
#[derive(Debug, Default, Clone)]
pub struct SessionLog {
    /// The version byte of the primary's first frame.
    pub hello_version: u8,
    /// The primary's counters: resuid, localcnt, remotecnt, virgin.
    pub primary: (u64, u64, u64, bool),
    /// WRITE requests applied: (offset, length).
    pub writes: Vec<(u64, u64)>,
    pub flushes: usize,
    pub keepalives: usize,
    /// Why the session ended.
    pub ended: String,
}

/// A FreeBSD secondary (hastd in role secondary) for one resource: its
/// metadata counters, activemap and data area in memory, its pipeline
/// settings, and its answers exactly as secondary.c builds them.
#[derive(Debug, Clone)]
pub struct Secondary {
    pub resource: String,
    pub datasize: u64,
    pub extentsize: u32,
    pub mapsize: usize,
    pub resuid: u64,
    pub localcnt: u64,
    pub remotecnt: u64,
    /// The on-disk activemap (mapsize bytes).
    pub map: Vec<u8>,
    pub data: Vec<u8>,
    pub compression: String,
    pub checksum: String,
    /// Corrupt the map's hash in the next answer (a damaged frame).
    pub corrupt_map_hash: bool,
}

impl Secondary {
    /// A freshly created provider (`hastctl create`): resuid 0, counters 0,
    /// a clean map, zeros.
    pub fn new(resource: &str, datasize: u64, extentsize: u32, mapsize: usize) -> Secondary {
        Secondary {
            resource: resource.to_string(),
            datasize,
            extentsize,
            mapsize,
            resuid: 0,
            localcnt: 0,
            remotecnt: 0,
            map: vec![0u8; mapsize],
            data: vec![0u8; usize::try_from(datasize).expect("datasize fits")],
            compression: "hole".into(),
            checksum: "none".into(),
            corrupt_map_hash: false,
        }
    }

    /// Mark extent `e` dirty in the on-disk map.
    pub fn mark_dirty(&mut self, e: usize) {
        self.map[e / 8] |= 1 << (e % 8);
    }

    /// Accept one session on `listener` from `primary_ip` within `limit`
    /// and answer its handshake as secondary.c does. Connections from
    /// other addresses are closed, as FreeBSD does.
    // The split-brain table is written as secondary.c writes it.
    #[allow(clippy::nonminimal_bool)]
    pub fn handshake(
        &mut self,
        listener: &TcpListener,
        primary_ip: Ipv4Addr,
        limit: Duration,
    ) -> io::Result<Session> {
        let deadline = Instant::now() + limit;
        let accept = |l: &TcpListener| -> io::Result<TcpStream> {
            l.set_nonblocking(true)?;
            loop {
                match l.accept() {
                    Ok((s, SocketAddr::V4(a))) if *a.ip() == primary_ip => {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(Duration::from_secs(30)))?;
                        return Ok(s);
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "no primary connected",
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let mut log = SessionLog::default();
        // As listen_accept does: a hello without a token is a first
        // connection (it replaces a half-open one, such as a probe's); one
        // with the token handed out is the second connection.
        let mut pending: Option<(TcpStream, Vec<u8>, u8)> = None;
        let (mut c1, c2, attach, version) = loop {
            let mut c = accept(listener)?;
            let (v, hello, _) = match read_frame(&mut c) {
                Ok(f) => f,
                Err(_) => continue,
            };
            if v > PROTO_VERSION {
                return Err(bad(format!("frame with version byte {v}")));
            }
            if hello.get_string("resource") != Some(self.resource.as_str()) {
                return Err(bad(format!("hello for {:?}", hello.get_string("resource"))));
            }
            match (hello.get_u8_array("token"), pending.take()) {
                (None, _) => {
                    log.hello_version = v;
                    let version = hello.get_u8("version").unwrap_or(1).clamp(1, PROTO_VERSION);
                    let token: Vec<u8> = (0..16).map(|_| rand::random::<u8>()).collect();
                    let mut welcome = Nv::new();
                    welcome
                        .add_u8("version", version)
                        .add_u8_array("token", token.clone());
                    c.write_all(&frame(version, &welcome, &[]))?;
                    pending = Some((c, token, version));
                }
                (Some(t), Some((first, token, version))) if t == token.as_slice() => {
                    break (first, c, hello, version);
                }
                (Some(_), _) => return Err(bad("wrong token")),
            }
        };
        let p_resuid = attach.get_u64("resuid").unwrap_or(0);
        let p_local = attach.get_u64("localcnt").unwrap_or(0);
        let p_remote = attach.get_u64("remotecnt").unwrap_or(0);
        let p_virgin = attach.contains("virgin");
        log.primary = (p_resuid, p_local, p_remote, p_virgin);
        let mut out = Nv::new();
        out.add_i64(
            "datasize",
            i64::try_from(self.datasize).expect("datasize fits"),
        )
        .add_i32(
            "extentsize",
            i32::try_from(self.extentsize).expect("extentsize fits"),
        )
        .add_u64("localcnt", self.localcnt)
        .add_u64("remotecnt", self.remotecnt);
        let (s_local, s_remote) = (self.localcnt, self.remotecnt);
        let map: Option<Vec<u8>> = if self.resuid == 0 {
            self.resuid = p_resuid;
            out.add_i8("virgin", 1).add_u8("syncsrc", SYNCSRC_PRIMARY);
            if p_virgin {
                None
            } else {
                Some(vec![0xff; self.mapsize])
            }
        } else if self.resuid != p_resuid {
            out.add_string("errmsg", "Resource unique ID mismatch.");
            c1.write_all(&frame(version, &out, &[]))?;
            return Err(bad("resuid mismatch"));
        } else if (s_local > p_remote && s_remote == p_local)
            || (s_local == p_remote && s_remote == p_local)
            || (s_local == p_remote && s_remote < p_local)
        {
            let src = if s_local > p_remote && s_remote == p_local {
                SYNCSRC_SECONDARY
            } else {
                SYNCSRC_PRIMARY
            };
            out.add_u8("syncsrc", src);
            Some(self.map.clone())
        } else if s_local > p_remote && p_local > s_remote {
            out.add_string("errmsg", "Split-brain condition!");
            c1.write_all(&frame(version, &out, &[]))?;
            return Err(bad("split-brain"));
        } else {
            let src = if s_local > p_remote {
                SYNCSRC_SECONDARY
            } else {
                SYNCSRC_PRIMARY
            };
            out.add_u8("syncsrc", src);
            Some(vec![0xff; self.mapsize])
        };
        let mapsize = map.as_ref().map_or(0, Vec::len);
        out.add_u32("mapsize", u32::try_from(mapsize).expect("mapsize fits"));
        let payload = match &map {
            Some(m) => {
                let p = pipeline_send(&mut out, m, &self.compression, &self.checksum);
                if self.corrupt_map_hash {
                    self.corrupt_map_hash = false;
                    let mut h = out
                        .get_u8_array("hash")
                        .map(<[u8]>::to_vec)
                        .unwrap_or_default();
                    if let Some(b) = h.first_mut() {
                        *b ^= 0xff;
                    }
                    out.set("hash", hast::nv::Value::Uint8Array(h));
                }
                p
            }
            None => Vec::new(),
        };
        c1.write_all(&frame(version, &out, &payload))?;
        Ok(Session {
            c1,
            c2,
            version,
            log,
            cleared: false,
        })
    }

    /// Apply the session's requests until `done(self, log)` is true after
    /// one, the primary closes, or `limit` passes.
    pub fn serve(
        &mut self,
        session: &mut Session,
        limit: Duration,
        mut done: impl FnMut(&Secondary, &SessionLog) -> bool,
    ) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        let version = session.version;
        loop {
            if Instant::now() > deadline {
                session.log.ended = "time limit".into();
                return Ok(());
            }
            let (_, req, payload) = match read_frame(&mut session.c1) {
                Ok(f) => f,
                Err(e) => {
                    session.log.ended = format!("connection: {e}");
                    return Ok(());
                }
            };
            let cmd = req.get_u8("cmd").unwrap_or(0);
            let seq = req.get_u64("seq").unwrap_or(0);
            let offset = req.get_u64("offset").unwrap_or(0);
            let length = req.get_u64("length").unwrap_or(0);
            if cmd == HIO_KEEPALIVE {
                session.log.keepalives += 1;
                continue;
            }
            if !session.cleared {
                // secondary.c clears its map after the first request.
                self.map.iter_mut().for_each(|b| *b = 0);
                session.cleared = true;
            }
            let mut reply = Nv::new();
            reply.add_u64("seq", seq);
            let range = offset
                .checked_add(length)
                .filter(|&end| end <= self.datasize)
                .and_then(|end| Some(usize::try_from(offset).ok()?..usize::try_from(end).ok()?));
            let mut data_out = Vec::new();
            match (cmd, range) {
                (HIO_WRITE, Some(r)) => {
                    let d = pipeline_recv(&req, payload, r.len())?;
                    self.data[r].copy_from_slice(&d);
                    session.log.writes.push((offset, length));
                }
                (HIO_READ, Some(r)) => {
                    let d = self.data[r].to_vec();
                    data_out = pipeline_send(&mut reply, &d, &self.compression, &self.checksum);
                }
                (HIO_DELETE, Some(_)) => {}
                (HIO_FLUSH, _) => session.log.flushes += 1,
                _ => {
                    reply.add_i16("error", libc::EINVAL as i16);
                }
            }
            session.c2.write_all(&frame(version, &reply, &data_out))?;
            if done(self, &session.log) {
                session.log.ended = "done".into();
                return Ok(());
            }
        }
    }
}

/// An established session of the emulated secondary; dropping it closes
/// both connections.
#[derive(Debug)]
pub struct Session {
    c1: TcpStream,
    c2: TcpStream,
    version: u8,
    pub log: SessionLog,
    cleared: bool,
}

/// A FreeBSD primary's side of the handshake toward `to` from `from`, with
/// its first frame's version byte as FreeBSD sends it. Returns both
/// connections and the secondary's answer (nv and map payload).
pub struct Primary {
    pub c1: TcpStream,
    pub c2: TcpStream,
    pub answer: Nv,
    pub map: Vec<u8>,
    pub version: u8,
}

impl Primary {
    pub fn connect(
        from: TcpStream,
        second: impl FnOnce() -> TcpStream,
        resource: &str,
        counters: (u64, u64, u64, bool),
    ) -> io::Result<Primary> {
        let mut c1 = from;
        let mut hello = Nv::new();
        hello
            .add_string("resource", resource)
            .add_u8("version", PROTO_VERSION);
        c1.write_all(&frame(FIRST_FRAME_VERSION, &hello, &[]))?;
        let (_, welcome, _) = read_frame(&mut c1)?;
        if let Some(e) = welcome.get_string("errmsg") {
            return Err(bad(format!("refused: {e}")));
        }
        let version = welcome.get_u8("version").unwrap_or(1);
        let token = welcome
            .get_u8_array("token")
            .ok_or_else(|| bad("no token"))?
            .to_vec();
        let mut c2 = second();
        let (resuid, localcnt, remotecnt, virgin) = counters;
        let mut attach = Nv::new();
        attach
            .add_string("resource", resource)
            .add_u8_array("token", token);
        if virgin {
            attach.add_i8("virgin", 1);
        }
        attach
            .add_u64("resuid", resuid)
            .add_u64("localcnt", localcnt)
            .add_u64("remotecnt", remotecnt);
        c2.write_all(&frame(version, &attach, &[]))?;
        let (_, answer, map) = read_frame(&mut c1)?;
        Ok(Primary {
            c1,
            c2,
            answer,
            map,
            version,
        })
    }

    /// Send one request as remote_send_thread does (the payload through
    /// the pipeline) and wait for its reply: the reply's nv and data.
    pub fn request(
        &mut self,
        cmd: u8,
        seq: u64,
        offset: u64,
        data: &[u8],
        length: u64,
        pipeline: (&str, &str),
    ) -> io::Result<(Nv, Vec<u8>)> {
        let mut nv = Nv::new();
        nv.add_u8("cmd", cmd)
            .add_u64("seq", seq)
            .add_u64("offset", offset)
            .add_u64("length", length);
        let payload = if cmd == HIO_WRITE {
            pipeline_send(&mut nv, data, pipeline.0, pipeline.1)
        } else {
            Vec::new()
        };
        self.c1.write_all(&frame(self.version, &nv, &payload))?;
        let (_, reply, data) = read_frame(&mut self.c2)?;
        Ok((reply, data))
    }
}

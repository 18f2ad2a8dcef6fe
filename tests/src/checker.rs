//! Acknowledged-write checker (Jepsen style): a workload writes stamped
//! blocks to an NBD export (block number, version, write sequence number and
//! a checksum in every block), records which writes were acknowledged, which
//! failed and which were in flight when it stopped, and a verifier reads
//! every block back (through an export or straight from a provider file at
//! `localoff`) and reports acknowledged writes that are missing (a failure in
//! every replication mode), blocks newer than acknowledged (in-flight writes,
//! fine), corrupt blocks, and for a queue depth of 1 whether what survived is
//! a prefix of the write sequence. It speaks NBD itself over a Unix socket
//! (fixed newstyle handshake, NBD_OPT_GO, simple replies), independent of the
//! server under test.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What went wrong in the checker.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD protocol error from the server: {0}")]
    Protocol(String),
    #[error("the NBD server refused option {option}: reply {reply:#x} {message:?}")]
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("NBD {what} at offset {offset} failed with error {errno}")]
    Request {
        what: String,
        offset: u64,
        errno: u32,
    },
    #[error("not an nbd+unix URI with a socket: {0:?} (want nbd+unix:///NAME?socket=PATH)")]
    BadUri(String),
    #[error("bad workload options: {0}")]
    Options(String),
    #[error("bad history file {path}: line {line}: {why}")]
    History {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

type Result<T> = std::result::Result<T, CheckError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CheckError {
    let what = what.into();
    move |source| CheckError::Io { what, source }
}

// NBD constants (from the protocol document, kept apart from the server's).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const HS_FIXED_NEWSTYLE: u16 = 1;
const HS_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;
/// Largest read the verifier asks for at once.
const READ_CHUNK: usize = 256 << 10;

/// A minimal NBD client over a Unix socket: one connection, requests may be
/// pipelined (`send_*` then `recv_reply`).
pub struct NbdClient {
    sock: UnixStream,
    size: u64,
    flags: u16,
    next_handle: u64,
}

/// Split `nbd+unix:///NAME?socket=PATH` into the socket path and export name.
pub fn parse_uri(uri: &str) -> Result<(PathBuf, String)> {
    let rest = uri
        .strip_prefix("nbd+unix://")
        .ok_or_else(|| CheckError::BadUri(uri.into()))?;
    let (path_part, query) = rest
        .split_once('?')
        .ok_or_else(|| CheckError::BadUri(uri.into()))?;
    let name = path_part.strip_prefix('/').unwrap_or(path_part).to_string();
    let sock = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("socket="))
        .ok_or_else(|| CheckError::BadUri(uri.into()))?;
    Ok((PathBuf::from(sock), name))
}

impl NbdClient {
    /// Connect to an `nbd+unix:///NAME?socket=PATH` URI.
    pub fn connect_uri(uri: &str) -> Result<NbdClient> {
        let (path, name) = parse_uri(uri)?;
        NbdClient::connect(&path, &name)
    }

    /// Connect to the export `name` served on the Unix socket `path`
    /// (fixed newstyle handshake, NBD_OPT_GO).
    pub fn connect(path: &Path, name: &str) -> Result<NbdClient> {
        let mut sock = UnixStream::connect(path)
            .map_err(io_err(format!("connect to NBD socket {}", path.display())))?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io_err("set the NBD socket timeout"))?;
        let hs = |e| CheckError::Io {
            what: "NBD handshake".into(),
            source: e,
        };
        let mut b = [0u8; 18];
        sock.read_exact(&mut b).map_err(hs)?;
        if be64(&b[0..8]) != NBDMAGIC || be64(&b[8..16]) != IHAVEOPT {
            return Err(CheckError::Protocol("not a newstyle NBD server".into()));
        }
        let hflags = u16::from_be_bytes([b[16], b[17]]);
        if hflags & HS_FIXED_NEWSTYLE == 0 {
            return Err(CheckError::Protocol("server is not fixed newstyle".into()));
        }
        let no_zeroes = hflags & HS_NO_ZEROES != 0;
        let cflags: u32 = 1 | if no_zeroes { 2 } else { 0 };
        let name_len = u32::try_from(name.len())
            .map_err(|_| CheckError::Options("export name too long".into()))?;
        let mut m = Vec::new();
        m.extend_from_slice(&cflags.to_be_bytes());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&(name_len + 6).to_be_bytes());
        m.extend_from_slice(&name_len.to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&m).map_err(hs)?;
        let mut size = None;
        let mut flags = 0u16;
        loop {
            let mut h = [0u8; 20];
            sock.read_exact(&mut h).map_err(hs)?;
            if be64(&h[0..8]) != OPT_REPLY_MAGIC {
                return Err(CheckError::Protocol("bad option reply magic".into()));
            }
            let opt = be32(&h[8..12]);
            let rtype = be32(&h[12..16]);
            let len = be32(&h[16..20]);
            if len > 1 << 20 {
                return Err(CheckError::Protocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            sock.read_exact(&mut data).map_err(hs)?;
            if opt != OPT_GO {
                return Err(CheckError::Protocol(format!(
                    "reply to option {opt}, asked {OPT_GO}"
                )));
            }
            if rtype & (1 << 31) != 0 {
                return Err(CheckError::Refused {
                    option: OPT_GO,
                    reply: rtype,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            match rtype {
                REP_INFO if data.len() >= 12 && be16(&data[0..2]) == INFO_EXPORT => {
                    size = Some(be64(&data[2..10]));
                    flags = be16(&data[10..12]);
                }
                REP_INFO => {}
                REP_ACK => break,
                other => {
                    return Err(CheckError::Protocol(format!(
                        "unexpected option reply {other}"
                    )))
                }
            }
        }
        let size =
            size.ok_or_else(|| CheckError::Protocol("no NBD_INFO_EXPORT before ACK".into()))?;
        Ok(NbdClient {
            sock,
            size,
            flags,
            next_handle: 1,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags the server announced.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// How long a reply may take before `recv_reply` fails (default 30 s).
    pub fn set_timeout(&self, t: Duration) -> Result<()> {
        self.sock
            .set_read_timeout(Some(t))
            .map_err(io_err("set the NBD socket timeout"))
    }

    fn send(
        &mut self,
        ty: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.sock.write_all(&m)
    }

    /// Send a write with `handle` without waiting for its reply.
    pub fn send_write(
        &mut self,
        handle: u64,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> io::Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "write too large"))?;
        self.send(
            CMD_WRITE,
            if fua { CMD_FLAG_FUA } else { 0 },
            handle,
            offset,
            len,
            data,
        )
    }

    /// Send NBD_CMD_FLUSH with `handle` without waiting for its reply.
    pub fn send_flush(&mut self, handle: u64) -> io::Result<()> {
        self.send(CMD_FLUSH, 0, handle, 0, 0, &[])
    }

    /// Receive the next simple reply header: (handle, error). Only for
    /// replies without payload (writes, flushes).
    pub fn recv_reply(&mut self) -> io::Result<(u64, u32)> {
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        if be32(&h[0..4]) != SIMPLE_REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad NBD reply magic",
            ));
        }
        Ok((be64(&h[8..16]), be32(&h[4..8])))
    }

    fn handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        h | 1 << 63
    }

    /// Take the reply to request `h` (a `kind` at `offset`; `ctx` names it
    /// in I/O errors): it must be for `h` and carry no error.
    fn check_reply(&mut self, h: u64, kind: &str, offset: u64, ctx: String) -> Result<()> {
        let (rh, err) = self.recv_reply().map_err(io_err(ctx))?;
        if rh != h {
            return Err(CheckError::Protocol(format!(
                "reply handle {rh:#x}, expected {h:#x}"
            )));
        }
        if err != 0 {
            return Err(CheckError::Request {
                what: kind.into(),
                offset,
                errno: err,
            });
        }
        Ok(())
    }

    /// Read `len` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let l32 = u32::try_from(len).map_err(|_| CheckError::Options("read too large".into()))?;
        let h = self.handle();
        let what = || format!("NBD read of {len} bytes at {offset}");
        self.send(CMD_READ, 0, h, offset, l32, &[])
            .map_err(io_err(what()))?;
        self.check_reply(h, "read", offset, what())?;
        let mut buf = vec![0u8; len];
        self.sock.read_exact(&mut buf).map_err(io_err(what()))?;
        Ok(buf)
    }

    /// Write `data` at `offset` and wait for the reply.
    pub fn write_at(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let h = self.handle();
        let what = || format!("NBD write of {} bytes at {offset}", data.len());
        self.send_write(h, offset, data, fua)
            .map_err(io_err(what()))?;
        self.check_reply(h, "write", offset, what())?;
        Ok(())
    }

    /// NBD_CMD_FLUSH and wait for the reply.
    pub fn flush(&mut self) -> Result<()> {
        let h = self.handle();
        self.send(CMD_FLUSH, 0, h, 0, 0, &[])
            .map_err(io_err("NBD flush"))?;
        let (rh, err) = self.recv_reply().map_err(io_err("NBD flush"))?;
        if rh != h || err != 0 {
            return Err(CheckError::Request {
                what: "flush".into(),
                offset: 0,
                errno: err,
            });
        }
        Ok(())
    }

    /// Send NBD_CMD_DISC and close.
    pub fn disconnect(mut self) {
        let h = self.handle();
        let _ = self.send(CMD_DISC, 0, h, 0, 0, &[]);
    }
}

fn be16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}
fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The marker at the start of every stamped block.
pub const STAMP_MAGIC: [u8; 8] = *b"HASTSTMP";
/// Smallest block size a stamp fits in.
pub const MIN_BLOCK: usize = 64;

/// What a stamped block says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Random id of the workload run that wrote it.
    pub run: u64,
    /// Block number (byte offset / block size) it was written to.
    pub block: u64,
    /// Per-block version, 1 for the first write of the block.
    pub version: u64,
    /// Sequence number of the write in the whole run, from 1.
    pub seq: u64,
}

/// What a block read back holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// All zeros.
    Blank,
    /// Not a stamp (data from before the run).
    Foreign,
    /// A valid stamp (of any run).
    Stamped(Stamp),
    /// The stamp marker with a wrong checksum: torn or damaged.
    Corrupt,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit checksum over whole 8-byte words (every step is a bijection of
/// the state, so any one changed word changes the result).
fn checksum(words: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words.chunks_exact(8) {
        h = (h ^ le64(w))
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(29);
    }
    h
}

/// Fill `buf` (a whole block: at least 64 bytes, a multiple of 8) with the
/// stamp: marker, run, block, version, seq, filler derived from them, and
/// the checksum in the last 8 bytes.
pub fn stamp_block(buf: &mut [u8], s: &Stamp) {
    let n = buf.len() - buf.len() % 8;
    if n < MIN_BLOCK {
        return;
    }
    buf[0..8].copy_from_slice(&STAMP_MAGIC);
    buf[8..16].copy_from_slice(&s.run.to_le_bytes());
    buf[16..24].copy_from_slice(&s.block.to_le_bytes());
    buf[24..32].copy_from_slice(&s.version.to_le_bytes());
    buf[32..40].copy_from_slice(&s.seq.to_le_bytes());
    let mut st = s.run ^ s.block.rotate_left(17) ^ s.version.rotate_left(41);
    for w in buf[40..n - 8].chunks_exact_mut(8) {
        w.copy_from_slice(&splitmix(&mut st).to_le_bytes());
    }
    let c = checksum(&buf[..n - 8]);
    buf[n - 8..n].copy_from_slice(&c.to_le_bytes());
}

/// Decode a block written by [`stamp_block`] (or anything else).
pub fn decode_block(buf: &[u8]) -> Content {
    let n = buf.len() - buf.len() % 8;
    if buf.iter().all(|&b| b == 0) {
        return Content::Blank;
    }
    if n < MIN_BLOCK || buf[0..8] != STAMP_MAGIC {
        return Content::Foreign;
    }
    if checksum(&buf[..n - 8]) != le64(&buf[n - 8..n]) {
        return Content::Corrupt;
    }
    Content::Stamped(Stamp {
        run: le64(&buf[8..16]),
        block: le64(&buf[16..24]),
        version: le64(&buf[24..32]),
        seq: le64(&buf[32..40]),
    })
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server acknowledged it.
    Acked,
    /// The server answered with this error: the block may hold either version.
    Failed(u32),
    /// Sent, no reply when the workload ended (connection lost, stopped).
    InFlight,
}

/// One write of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRecord {
    pub seq: u64,
    pub block: u64,
    pub version: u64,
    pub outcome: Outcome,
}

/// Why the workload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The count or time limit was reached and every write answered.
    Limit,
    /// [`StopHandle::stop`] was called.
    Stopped,
    /// The connection failed (server killed, timeout): writes without a
    /// reply are [`Outcome::InFlight`].
    ConnectionLost(String),
}

/// Workload parameters.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Block size in bytes (a multiple of 8, at least 64); default 4096.
    pub block_size: u32,
    /// Writes in flight at once on the connection; 1 = one writer in order.
    pub queue_depth: usize,
    /// First block of the region written (in blocks).
    pub first_block: u64,
    /// Blocks in the region; None = to the end of the export.
    pub blocks: Option<u64>,
    /// Stop after this many writes.
    pub max_writes: Option<u64>,
    /// Stop issuing after this long.
    pub duration: Option<Duration>,
    /// Seed of the block choice (the run id is random unless `run` is set).
    pub seed: u64,
    /// Run id stamped into blocks; None = random.
    pub run: Option<u64>,
    /// Set NBD_CMD_FLAG_FUA on every write.
    pub fua: bool,
    /// How long to wait for any one reply before the connection counts as lost.
    pub reply_timeout: Duration,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        WorkloadOptions {
            block_size: 4096,
            queue_depth: 1,
            first_block: 0,
            blocks: None,
            max_writes: Some(1000),
            duration: None,
            seed: 1,
            run: None,
            fua: false,
            reply_timeout: Duration::from_secs(60),
        }
    }
}

/// Stops a running workload from another thread: no new writes are issued,
/// writes in flight are still waited for.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The stamped-block writer.
#[derive(Debug, Clone)]
pub struct Workload {
    pub opts: WorkloadOptions,
    stop: StopHandle,
}

/// Everything the workload did, enough to verify any read-back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub run: u64,
    pub block_size: u32,
    pub first_block: u64,
    pub blocks: u64,
    pub queue_depth: usize,
    /// In issue order; `writes[i].seq == i + 1`.
    pub writes: Vec<WriteRecord>,
    pub end: End,
    pub elapsed: Duration,
}

impl Workload {
    pub fn new(opts: WorkloadOptions) -> Workload {
        Workload {
            opts,
            stop: StopHandle::default(),
        }
    }

    /// A handle that stops this workload from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Connect to `uri` and run.
    pub fn run_uri(&self, uri: &str) -> Result<History> {
        let mut c = NbdClient::connect_uri(uri)?;
        let h = self.run(&mut c)?;
        c.disconnect();
        Ok(h)
    }

    /// Run on a connected client until a limit, a stop or a connection
    /// failure; only bad options are an error (a lost connection ends the
    /// history with [`End::ConnectionLost`]).
    pub fn run(&self, client: &mut NbdClient) -> Result<History> {
        let o = &self.opts;
        let bs = o.block_size;
        if bs < MIN_BLOCK as u32 || bs & 7 != 0 {
            return Err(CheckError::Options(format!(
                "block size {bs} must be a multiple of 8 and at least {MIN_BLOCK}"
            )));
        }
        let dev_blocks = client.size() / u64::from(bs);
        let blocks = match o.blocks {
            Some(b) => b,
            None => dev_blocks.saturating_sub(o.first_block),
        };
        if blocks == 0
            || o.first_block
                .checked_add(blocks)
                .is_none_or(|e| e > dev_blocks)
        {
            return Err(CheckError::Options(format!(
                "region of {blocks} blocks from block {} does not fit the export of {dev_blocks} blocks",
                o.first_block
            )));
        }
        if o.max_writes.is_none() && o.duration.is_none() {
            return Err(CheckError::Options("set max_writes or duration".into()));
        }
        let qd = o
            .queue_depth
            .max(1)
            .min(usize::try_from(blocks).unwrap_or(usize::MAX));
        client.set_timeout(o.reply_timeout)?;
        let run = o.run.unwrap_or_else(|| {
            let mut s = std::process::id() as u64
                ^ Instant::now().elapsed().as_nanos() as u64
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
            splitmix(&mut s)
        });
        let mut rng = o.seed ^ 0x5eed;
        let mut versions: BTreeMap<u64, u64> = BTreeMap::new();
        let mut busy: BTreeMap<u64, usize> = BTreeMap::new();
        let mut writes: Vec<WriteRecord> = Vec::new();
        let mut buf = vec![0u8; bs as usize];
        let start = Instant::now();
        let mut end = End::Limit;
        loop {
            let may_issue = !self.stop.stopped()
                && o.max_writes.is_none_or(|m| (writes.len() as u64) < m)
                && o.duration.is_none_or(|d| start.elapsed() < d);
            if !may_issue && self.stop.stopped() && end == End::Limit {
                end = End::Stopped;
            }
            if may_issue && busy.len() < qd {
                let mut block = o.first_block + splitmix(&mut rng) % blocks;
                let mut tries = 0;
                while busy.contains_key(&block) {
                    tries += 1;
                    block = if tries < 16 {
                        o.first_block + splitmix(&mut rng) % blocks
                    } else {
                        o.first_block + (block - o.first_block + 1) % blocks
                    };
                }
                let v = versions.entry(block).or_insert(0);
                *v += 1;
                let seq = writes.len() as u64 + 1;
                let s = Stamp {
                    run,
                    block,
                    version: *v,
                    seq,
                };
                stamp_block(&mut buf, &s);
                writes.push(WriteRecord {
                    seq,
                    block,
                    version: s.version,
                    outcome: Outcome::InFlight,
                });
                busy.insert(block, writes.len() - 1);
                if let Err(e) = client.send_write(seq, block * u64::from(bs), &buf, o.fua) {
                    end = End::ConnectionLost(format!("sending write {seq}: {e}"));
                    break;
                }
                continue;
            }
            if busy.is_empty() {
                break;
            }
            match client.recv_reply() {
                Ok((h, err)) => {
                    let idx = usize::try_from(h.wrapping_sub(1)).unwrap_or(usize::MAX);
                    let Some(w) = writes.get_mut(idx) else {
                        end = End::ConnectionLost(format!("reply for unknown handle {h:#x}"));
                        break;
                    };
                    if w.outcome != Outcome::InFlight || busy.get(&w.block) != Some(&idx) {
                        end = End::ConnectionLost(format!("second reply for write {h}"));
                        break;
                    }
                    w.outcome = if err == 0 {
                        Outcome::Acked
                    } else {
                        Outcome::Failed(err)
                    };
                    busy.remove(&w.block);
                }
                Err(e) => {
                    end = End::ConnectionLost(format!("waiting for a reply: {e}"));
                    break;
                }
            }
        }
        Ok(History {
            run,
            block_size: bs,
            first_block: o.first_block,
            blocks,
            queue_depth: qd,
            writes,
            end,
            elapsed: start.elapsed(),
        })
    }
}

/// What a block was found holding, in a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A stamp of this run for this block, with this version.
    Version(u64),
    /// Zeros.
    Blank,
    /// Not a stamp of this run (older data, another run's stamp).
    Foreign,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Version(v) => write!(f, "version {v}"),
            Found::Blank => write!(f, "zeros"),
            Found::Foreign => write!(f, "foreign data"),
        }
    }
}

/// An acknowledged write that is not there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    pub block: u64,
    /// The last acknowledged version of the block.
    pub acked: u64,
    pub found: Found,
}

/// A block holding a version newer than the last acknowledged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Newer {
    pub block: u64,
    /// None when no write of the block was acknowledged.
    pub acked: Option<u64>,
    pub found: u64,
    pub outcome: Outcome,
}

/// A block whose content cannot be right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt {
    pub block: u64,
    pub why: String,
}

/// A block breaking the prefix property (queue depth 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    pub block: u64,
    /// The version the prefix up to `cut` implies (None = never written by then).
    pub expected: Option<u64>,
    pub found: Found,
}

/// The prefix check: with one writer in order, what survives must be the
/// state after writes 1..=cut for some cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix {
    /// Highest write sequence number found on the device.
    pub cut: u64,
    pub holes: Vec<Hole>,
}

/// Result of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub blocks_checked: u64,
    /// Distinct blocks the workload wrote.
    pub blocks_written: u64,
    pub acked: u64,
    pub in_flight: u64,
    pub failed: u64,
    /// Blocks holding exactly their last acknowledged version (or, never
    /// acknowledged, nothing of this run).
    pub exact: u64,
    /// Acknowledged writes lost: a failure in every mode.
    pub missing: Vec<Missing>,
    /// Newer than acknowledged: writes that were in flight or failed; fine.
    pub newer: Vec<Newer>,
    pub corrupt: Vec<Corrupt>,
    /// Present when the history has queue depth 1.
    pub prefix: Option<Prefix>,
}

impl Report {
    /// No acknowledged write missing, nothing corrupt, and the prefix check
    /// (when made) holds.
    pub fn passed(&self) -> bool {
        self.missing.is_empty()
            && self.corrupt.is_empty()
            && self.prefix.as_ref().is_none_or(|p| p.holes.is_empty())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOW: usize = 10;
        writeln!(
            f,
            "{}: {} blocks checked, {} written; writes: {} acknowledged, {} in flight, {} failed; {} blocks exact, {} newer than acknowledged, {} missing acknowledged writes, {} corrupt",
            if self.passed() { "PASS" } else { "FAIL" },
            self.blocks_checked,
            self.blocks_written,
            self.acked,
            self.in_flight,
            self.failed,
            self.exact,
            self.newer.len(),
            self.missing.len(),
            self.corrupt.len()
        )?;
        for m in self.missing.iter().take(SHOW) {
            writeln!(
                f,
                "  MISSING block {}: acknowledged version {}, found {}",
                m.block, m.acked, m.found
            )?;
        }
        for c in self.corrupt.iter().take(SHOW) {
            writeln!(f, "  CORRUPT block {}: {}", c.block, c.why)?;
        }
        for n in self.newer.iter().take(SHOW) {
            let acked = n.acked.map_or("none".to_string(), |a| a.to_string());
            writeln!(
                f,
                "  newer block {}: acknowledged {acked}, found version {} ({:?})",
                n.block, n.found, n.outcome
            )?;
        }
        if let Some(p) = &self.prefix {
            if p.holes.is_empty() {
                writeln!(
                    f,
                    "  prefix: the device holds the state after writes 1..={}",
                    p.cut
                )?;
            } else {
                writeln!(
                    f,
                    "  prefix BROKEN: {} blocks differ from the state after writes 1..={}",
                    p.holes.len(),
                    p.cut
                )?;
                for h in p.holes.iter().take(SHOW) {
                    let e = h
                        .expected
                        .map_or("nothing".to_string(), |v| format!("version {v}"));
                    writeln!(
                        f,
                        "    HOLE block {}: expected {e}, found {}",
                        h.block, h.found
                    )?;
                }
            }
        }
        Ok(())
    }
}

impl History {
    pub fn acked(&self) -> u64 {
        self.count(|o| o == Outcome::Acked)
    }
    pub fn in_flight(&self) -> u64 {
        self.count(|o| o == Outcome::InFlight)
    }
    pub fn failed(&self) -> u64 {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }
    fn count(&self, p: impl Fn(Outcome) -> bool) -> u64 {
        self.writes.iter().filter(|w| p(w.outcome)).count() as u64
    }

    /// The last acknowledged write of `block`.
    pub fn last_acked(&self, block: u64) -> Option<&WriteRecord> {
        self.writes
            .iter()
            .rev()
            .find(|w| w.block == block && w.outcome == Outcome::Acked)
    }

    /// Stamp a block's content as the workload wrote it (for planting
    /// errors in tests, or rebuilding a reference image).
    pub fn block_bytes(&self, w: &WriteRecord) -> Vec<u8> {
        let mut buf = vec![0u8; self.block_size as usize];
        stamp_block(
            &mut buf,
            &Stamp {
                run: self.run,
                block: w.block,
                version: w.version,
                seq: w.seq,
            },
        );
        buf
    }

    /// Write, for every block with an acknowledged write, the last
    /// acknowledged version into the existing file `path` (byte 0 = the
    /// export's byte 0): the image the export must equal when nothing else
    /// wrote to it, e.g. for `qemu-img compare`.
    pub fn write_reference(&self, path: &Path) -> Result<()> {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(format!("open {}", path.display())))?;
        let mut last: BTreeMap<u64, &WriteRecord> = BTreeMap::new();
        for w in self.writes.iter().filter(|w| w.outcome == Outcome::Acked) {
            last.insert(w.block, w);
        }
        for (block, w) in last {
            let off = block.saturating_mul(u64::from(self.block_size));
            f.write_all_at(&self.block_bytes(w), off)
                .map_err(io_err(format!("write {} at {off}", path.display())))?;
        }
        Ok(())
    }

    /// Verify by reading through an NBD export.
    pub fn verify_export(&self, client: &mut NbdClient) -> Result<Report> {
        self.verify_with(|off, len| client.read_at(off, len))
    }

    /// Verify by reading a file whose byte `offset` is the export's byte 0
    /// (a provider at `localoff`, or a plain image with offset 0).
    pub fn verify_file(&self, path: &Path, offset: u64) -> Result<Report> {
        let f = fs::File::open(path).map_err(io_err(format!("open {}", path.display())))?;
        self.verify_with(|off, len| {
            let mut buf = vec![0u8; len];
            let mut got = 0;
            while got < len {
                let n = f
                    .read_at(
                        &mut buf[got..],
                        offset.saturating_add(off).saturating_add(got as u64),
                    )
                    .map_err(io_err(format!(
                        "read {} at {}",
                        path.display(),
                        offset.saturating_add(off)
                    )))?;
                if n == 0 {
                    break; // past the end reads as zeros
                }
                got += n;
            }
            Ok(buf)
        })
    }

    /// Verify with `read(byte offset in the export, length)`.
    pub fn verify_with(
        &self,
        mut read: impl FnMut(u64, usize) -> Result<Vec<u8>>,
    ) -> Result<Report> {
        let bs = u64::from(self.block_size);
        let mut per_block: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, w) in self.writes.iter().enumerate() {
            per_block.entry(w.block).or_default().push(i);
        }
        let mut found: BTreeMap<u64, Found> = BTreeMap::new();
        let mut r = Report {
            blocks_checked: 0,
            blocks_written: per_block.len() as u64,
            acked: self.acked(),
            in_flight: self.in_flight(),
            failed: self.failed(),
            exact: 0,
            missing: Vec::new(),
            newer: Vec::new(),
            corrupt: Vec::new(),
            prefix: None,
        };
        let per_chunk = (READ_CHUNK as u64 / bs).max(1);
        let mut b = self.first_block;
        let end = self.first_block.saturating_add(self.blocks);
        while b < end {
            let n = per_chunk.min(end - b);
            let data = read(b.saturating_mul(bs), (n * bs) as usize)?;
            for (k, blk) in data.chunks(bs as usize).enumerate() {
                let block = b + k as u64;
                r.blocks_checked += 1;
                let idxs = per_block.get(&block).map(Vec::as_slice).unwrap_or(&[]);
                let f = match decode_block(blk) {
                    Content::Corrupt => {
                        r.corrupt.push(Corrupt {
                            block,
                            why: "stamp with a bad checksum (torn or damaged)".into(),
                        });
                        continue;
                    }
                    Content::Blank => Found::Blank,
                    Content::Foreign => Found::Foreign,
                    Content::Stamped(s) if s.run != self.run => Found::Foreign,
                    Content::Stamped(s) => {
                        if s.block != block {
                            r.corrupt.push(Corrupt {
                                block,
                                why: format!(
                                    "holds the stamp of block {} version {}",
                                    s.block, s.version
                                ),
                            });
                            continue;
                        }
                        let w = idxs
                            .iter()
                            .map(|&i| &self.writes[i])
                            .find(|w| w.version == s.version);
                        match w {
                            None => {
                                r.corrupt.push(Corrupt {
                                    block,
                                    why: format!("version {} was never written", s.version),
                                });
                                continue;
                            }
                            Some(w) if w.seq != s.seq => {
                                r.corrupt.push(Corrupt {
                                    block,
                                    why: format!(
                                        "version {} carries seq {}, written as seq {}",
                                        s.version, s.seq, w.seq
                                    ),
                                });
                                continue;
                            }
                            Some(_) => Found::Version(s.version),
                        }
                    }
                };
                found.insert(block, f);
                let last_acked = idxs
                    .iter()
                    .map(|&i| &self.writes[i])
                    .filter(|w| w.outcome == Outcome::Acked)
                    .map(|w| w.version)
                    .max();
                match (last_acked, f) {
                    (Some(a), Found::Version(v)) if v < a => r.missing.push(Missing {
                        block,
                        acked: a,
                        found: f,
                    }),
                    (Some(a), Found::Version(v)) if v == a => r.exact += 1,
                    (a, Found::Version(v)) => {
                        let outcome = idxs
                            .iter()
                            .map(|&i| &self.writes[i])
                            .find(|w| w.version == v)
                            .map_or(Outcome::InFlight, |w| w.outcome);
                        r.newer.push(Newer {
                            block,
                            acked: a,
                            found: v,
                            outcome,
                        });
                    }
                    (Some(a), _) => r.missing.push(Missing {
                        block,
                        acked: a,
                        found: f,
                    }),
                    (None, _) => r.exact += 1,
                }
            }
            if (data.len() as u64) < n * bs {
                return Err(CheckError::Protocol(format!(
                    "short read: {} bytes at block {b}, wanted {}",
                    data.len(),
                    n * bs
                )));
            }
            b += n;
        }
        if self.queue_depth == 1 {
            r.prefix = Some(self.prefix_check(&per_block, &found));
        }
        Ok(r)
    }

    fn prefix_check(
        &self,
        per_block: &BTreeMap<u64, Vec<usize>>,
        found: &BTreeMap<u64, Found>,
    ) -> Prefix {
        let mut cut = 0;
        for (&block, f) in found {
            if let (Found::Version(v), Some(idxs)) = (f, per_block.get(&block)) {
                if let Some(w) = idxs
                    .iter()
                    .map(|&i| &self.writes[i])
                    .find(|w| w.version == *v)
                {
                    cut = cut.max(w.seq);
                }
            }
        }
        let mut holes = Vec::new();
        for (&block, idxs) in per_block {
            let Some(&f) = found.get(&block) else {
                continue; // corrupt, reported already
            };
            // Acceptable: the last write up to the cut, or, when that one
            // failed, any earlier one down to the last that did not fail.
            let mut ok = Vec::new();
            let mut settled = false;
            for w in idxs
                .iter()
                .rev()
                .map(|&i| &self.writes[i])
                .filter(|w| w.seq <= cut)
            {
                ok.push(Found::Version(w.version));
                if !matches!(w.outcome, Outcome::Failed(_)) {
                    settled = true;
                    break;
                }
            }
            let expected = ok.first().and_then(|f| match f {
                Found::Version(v) => Some(*v),
                _ => None,
            });
            let fits = ok.contains(&f) || (!settled && matches!(f, Found::Blank | Found::Foreign));
            if !fits {
                holes.push(Hole {
                    block,
                    expected,
                    found: f,
                });
            }
        }
        Prefix { cut, holes }
    }

    /// Save as text (one header line, one line per write) for `stampcheck`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut s = format!(
            "hastt-history 1 run={} bs={} first={} blocks={} qd={}\n",
            self.run, self.block_size, self.first_block, self.blocks, self.queue_depth
        );
        for w in &self.writes {
            let o = match w.outcome {
                Outcome::Acked => "A".to_string(),
                Outcome::InFlight => "I".to_string(),
                Outcome::Failed(e) => format!("F{e}"),
            };
            s.push_str(&format!("{} {} {} {o}\n", w.seq, w.block, w.version));
        }
        fs::write(path, s).map_err(io_err(format!("write {}", path.display())))
    }

    /// Load a history saved by [`History::save`].
    pub fn load(path: &Path) -> Result<History> {
        let f = fs::File::open(path).map_err(io_err(format!("open {}", path.display())))?;
        let bad = |line: usize, why: &str| CheckError::History {
            path: path.into(),
            line,
            why: why.into(),
        };
        let mut lines = io::BufReader::new(f).lines();
        let head = lines
            .next()
            .ok_or_else(|| bad(1, "empty file"))?
            .map_err(io_err(format!("read {}", path.display())))?;
        let mut h = History {
            run: 0,
            block_size: 0,
            first_block: 0,
            blocks: 0,
            queue_depth: 0,
            writes: Vec::new(),
            end: End::Limit,
            elapsed: Duration::ZERO,
        };
        let mut it = head.split_whitespace();
        if it.next() != Some("hastt-history") || it.next() != Some("1") {
            return Err(bad(1, "not a hastt-history 1 file"));
        }
        for kv in it {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(1, "expected key=value"))?;
            let n: u64 = v.parse().map_err(|_| bad(1, "bad number"))?;
            match k {
                "run" => h.run = n,
                "bs" => h.block_size = u32::try_from(n).map_err(|_| bad(1, "bad bs"))?,
                "first" => h.first_block = n,
                "blocks" => h.blocks = n,
                "qd" => h.queue_depth = usize::try_from(n).map_err(|_| bad(1, "bad qd"))?,
                _ => return Err(bad(1, "unknown key")),
            }
        }
        if h.block_size < MIN_BLOCK as u32 || h.block_size & 7 != 0 {
            return Err(bad(1, "bad block size"));
        }
        for (i, line) in lines.enumerate() {
            let ln = i + 2;
            let line = line.map_err(io_err(format!("read {}", path.display())))?;
            let p: Vec<&str> = line.split_whitespace().collect();
            let [seq, block, version, o] = p.as_slice() else {
                return Err(bad(ln, "expected: seq block version outcome"));
            };
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad(ln, "bad number"));
            let outcome = match *o {
                "A" => Outcome::Acked,
                "I" => Outcome::InFlight,
                f => Outcome::Failed(
                    f.strip_prefix('F')
                        .and_then(|e| e.parse().ok())
                        .ok_or_else(|| bad(ln, "bad outcome"))?,
                ),
            };
            let w = WriteRecord {
                seq: num(seq)?,
                block: num(block)?,
                version: num(version)?,
                outcome,
            };
            if w.seq != h.writes.len() as u64 + 1 {
                return Err(bad(ln, "sequence numbers must run 1, 2, 3, ..."));
            }
            h.writes.push(w);
        }
        Ok(h)
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {:#x}: {} writes ({} acknowledged, {} in flight, {} failed) of {}-byte blocks in blocks {}..{} at queue depth {} in {:.2?}, ended: {:?}",
            self.run,
            self.writes.len(),
            self.acked(),
            self.in_flight(),
            self.failed(),
            self.block_size,
            self.first_block,
            self.first_block + self.blocks,
            self.queue_depth,
            self.elapsed,
            self.end
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip_and_damage() {
        let s = Stamp {
            run: 7,
            block: 3,
            version: 2,
            seq: 11,
        };
        let mut b = vec![0u8; 4096];
        stamp_block(&mut b, &s);
        assert_eq!(decode_block(&b), Content::Stamped(s));
        b[2000] ^= 1;
        assert_eq!(decode_block(&b), Content::Corrupt);
        assert_eq!(decode_block(&[0u8; 4096]), Content::Blank);
        assert_eq!(decode_block(&[1u8; 4096]), Content::Foreign);
    }

    fn hist(qd: usize, writes: &[(u64, u64, Outcome)]) -> History {
        History {
            run: 9,
            block_size: 64,
            first_block: 0,
            blocks: 4,
            queue_depth: qd,
            writes: writes
                .iter()
                .enumerate()
                .map(|(i, &(block, version, outcome))| WriteRecord {
                    seq: i as u64 + 1,
                    block,
                    version,
                    outcome,
                })
                .collect(),
            end: End::Limit,
            elapsed: Duration::ZERO,
        }
    }

    fn image(h: &History, present: &[usize]) -> Vec<u8> {
        let mut img = vec![0u8; 64 * 4];
        for &i in present {
            let w = h.writes[i];
            let off = (w.block * 64) as usize;
            img[off..off + 64].copy_from_slice(&h.block_bytes(&w));
        }
        img
    }

    fn check(h: &History, img: &[u8]) -> Report {
        h.verify_with(|off, len| Ok(img[off as usize..off as usize + len].to_vec()))
            .unwrap()
    }

    #[test]
    fn missing_newer_and_prefix() {
        use Outcome::*;
        let h = hist(
            1,
            &[
                (0, 1, Acked),
                (1, 1, Acked),
                (0, 2, Acked),
                (2, 1, InFlight),
            ],
        );
        // Everything acknowledged present, the in-flight write too.
        let r = check(&h, &image(&h, &[1, 2, 3]));
        assert!(r.passed(), "{r}");
        assert_eq!(r.newer.len(), 1);
        assert_eq!(r.prefix.as_ref().unwrap().cut, 4);
        // Block 0 holds version 1: acknowledged version 2 is missing, and a hole.
        let r = check(&h, &image(&h, &[0, 1]));
        assert!(!r.passed());
        assert_eq!(
            r.missing,
            vec![Missing {
                block: 0,
                acked: 2,
                found: Found::Version(1)
            }]
        );
        // Async-style loss of a suffix: missing acknowledged writes, but a prefix.
        let r = check(&h, &image(&h, &[0]));
        assert_eq!(r.missing.len(), 2);
        assert!(r.prefix.as_ref().unwrap().holes.is_empty(), "{r}");
        // A later write present while an earlier one is not: not a prefix.
        let r = check(&h, &image(&h, &[0, 3]));
        assert_eq!(r.prefix.as_ref().unwrap().holes.len(), 2, "{r}");
        // A stamp in the wrong place is corrupt.
        let mut img = image(&h, &[1, 2]);
        img.copy_within(64..128, 192);
        let r = check(&h, &img);
        assert_eq!(r.corrupt.len(), 1, "{r}");
    }
}

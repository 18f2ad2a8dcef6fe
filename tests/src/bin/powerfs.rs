//! powerfs: a FUSE file system for the power-loss tests. It serves the
//! regular files of a backing directory, flat, at a mount point; what is
//! written to them stays in a volatile layer in memory (4 KiB units) until
//! an fsync/fdatasync of that file, or a write with O_DSYNC/O_SYNC, makes it
//! durable (written to the backing file). Reads see the volatile layer.
//! A control socket cuts the power: the volatile layer is dropped, all of
//! it or a seeded random subset of its units (the others reach the backing
//! file, as a disk's volatile cache may have written some of its content
//! before the power went).
//!
//! Files are opened with FOPEN_DIRECT_IO, so the kernel keeps no page cache
//! of them: every read and write reaches this process, and nothing cached
//! by the kernel survives a drop. FUSE's `flush` is close(), not a sync,
//! and makes nothing durable.
//!
//! ```text
//! powerfs --backing DIR --mount DIR --control SOCKET
//! ```
//! Control protocol: one line per request on the Unix socket, one line
//! answered: `drop all`, `drop SEED PERMILLE` (each unit is lost with
//! probability PERMILLE/1000, the others are written), `sync` (everything
//! durable), `stats`, `quit` (unmount and exit). Answers start with `ok` or
//! `error`.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
};

/// The unit of the volatile layer (a disk cache's granularity here).
const UNIT: u64 = 4096;
const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(1);

/// One served file: its backing file and its volatile units.
struct Node {
    name: String,
    backing: File,
    size: u64,
    /// Unit index -> the unit's bytes as written, not yet durable.
    volatile: BTreeMap<u64, Box<[u8]>>,
}

/// Everything the file system and the control thread share.
struct State {
    dir: PathBuf,
    nodes: HashMap<u64, Node>,
    by_name: HashMap<String, u64>,
    next_ino: u64,
    /// Units made durable by fsync/O_DSYNC, dropped, written at a cut.
    synced: u64,
    dropped: u64,
    survived: u64,
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl State {
    /// The inode of `name` in the backing directory (found on first use).
    fn lookup(&mut self, name: &str) -> Result<u64, i32> {
        if let Some(&ino) = self.by_name.get(name) {
            return Ok(ino);
        }
        if name.contains('/') || name == "." || name == ".." {
            return Err(libc::ENOENT);
        }
        let path = self.dir.join(name);
        let meta = fs::metadata(&path).map_err(|e| errno(&e))?;
        if !meta.is_file() {
            return Err(libc::ENOENT);
        }
        let backing = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| errno(&e))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                name: name.to_string(),
                backing,
                size: meta.len(),
                volatile: BTreeMap::new(),
            },
        );
        self.by_name.insert(name.to_string(), ino);
        Ok(ino)
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let now = SystemTime::now();
        let (kind, size, perm, nlink) = if ino == ROOT {
            (FileType::Directory, 0, 0o755, 2)
        } else {
            let n = self.nodes.get(&ino)?;
            (FileType::RegularFile, n.size, 0o600, 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: UNIT as u32,
            flags: 0,
        })
    }

    /// Every unit of every file made durable.
    fn sync_all(&mut self) -> Result<u64, i32> {
        let inos: Vec<u64> = self.nodes.keys().copied().collect();
        let mut n = 0;
        for ino in inos {
            n += self.sync_file(ino)?;
        }
        Ok(n)
    }

    fn sync_file(&mut self, ino: u64) -> Result<u64, i32> {
        let node = self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        let units = std::mem::take(&mut node.volatile);
        let n = units.len() as u64;
        for (u, data) in units {
            write_unit(node, u, &data)?;
        }
        self.synced += n;
        Ok(n)
    }

    /// The power goes: each volatile unit is lost with probability
    /// `permille`/1000 (all of them with 1000), the others are written.
    fn drop_volatile(&mut self, seed: u64, permille: u64) -> Result<(u64, u64), i32> {
        let mut rng = seed ^ 0x0070_6f77_6572_6673;
        let mut lost = 0;
        let mut kept = 0;
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(node) = self.nodes.get_mut(&ino) else {
                continue;
            };
            let units = std::mem::take(&mut node.volatile);
            for (u, data) in units {
                if permille >= 1000 || splitmix(&mut rng) % 1000 < permille {
                    lost += 1;
                } else {
                    write_unit(node, u, &data)?;
                    kept += 1;
                }
            }
        }
        self.dropped += lost;
        self.survived += kept;
        Ok((lost, kept))
    }

    fn volatile_units(&self) -> u64 {
        self.nodes.values().map(|n| n.volatile.len() as u64).sum()
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Write unit `u` (its valid part: the file may end inside it) to the
/// backing file.
fn write_unit(node: &Node, u: u64, data: &[u8]) -> Result<(), i32> {
    let at = u * UNIT;
    let len = node.size.saturating_sub(at).min(UNIT) as usize;
    node.backing
        .write_all_at(&data[..len.min(data.len())], at)
        .map_err(|e| errno(&e))
}

/// The current content of unit `u`: volatile, else from the backing file
/// (zeros past its end).
fn read_unit(node: &Node, u: u64) -> Result<Vec<u8>, i32> {
    if let Some(d) = node.volatile.get(&u) {
        return Ok(d.to_vec());
    }
    let mut buf = vec![0u8; UNIT as usize];
    let mut got = 0;
    while got < buf.len() {
        match node.backing.read_at(&mut buf[got..], u * UNIT + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(errno(&e)),
        }
    }
    Ok(buf)
}

struct PowerFs(Arc<Mutex<State>>);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PowerFs {
    /// Put `data` at `offset` of `ino` into the volatile layer (or, with
    /// `durable`, straight into the backing file, dropping older volatile
    /// copies of those units).
    fn put(&self, ino: u64, offset: u64, data: &[u8], durable: bool) -> Result<(), i32> {
        let mut st = lock(&self.0);
        let node = st.nodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        let end = offset.checked_add(data.len() as u64).ok_or(libc::EFBIG)?;
        if end > node.size {
            // Providers have a fixed size: no growth (as a disk).
            return Err(libc::ENOSPC);
        }
        let mut at = offset;
        while at < end {
            let u = at / UNIT;
            let in_unit = (at % UNIT) as usize;
            let n = ((UNIT as usize) - in_unit).min((end - at) as usize);
            let src = &data[(at - offset) as usize..(at - offset) as usize + n];
            let mut unit = if in_unit == 0 && n == UNIT as usize {
                vec![0u8; UNIT as usize]
            } else {
                read_unit(node, u)?
            };
            unit[in_unit..in_unit + n].copy_from_slice(src);
            if durable {
                node.volatile.remove(&u);
                write_unit(node, u, &unit)?;
            } else {
                node.volatile.insert(u, unit.into_boxed_slice());
            }
            at += n as u64;
        }
        if durable {
            st.synced += end.div_ceil(UNIT) - offset / UNIT;
        }
        Ok(())
    }
}

impl Filesystem for PowerFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT {
            return reply.error(libc::ENOENT);
        }
        let mut st = lock(&self.0);
        let Some(name) = name.to_str() else {
            return reply.error(libc::ENOENT);
        };
        match st.lookup(name) {
            Ok(ino) => match st.attr(ino) {
                Some(a) => reply.entry(&TTL, &a, 0),
                None => reply.error(libc::ENOENT),
            },
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match lock(&self.0).attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let st = lock(&self.0);
        match (size, st.nodes.get(&ino)) {
            // A provider's size is fixed; only "no change" is accepted.
            (Some(s), Some(n)) if s != n.size => reply.error(libc::EPERM),
            _ => match st.attr(ino) {
                Some(a) => reply.attr(&TTL, &a),
                None => reply.error(libc::ENOENT),
            },
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if !lock(&self.0).nodes.contains_key(&ino) {
            return reply.error(libc::ENOENT);
        }
        reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let st = lock(&self.0);
        let Some(node) = st.nodes.get(&ino) else {
            return reply.error(libc::ENOENT);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        let end = offset.saturating_add(u64::from(size)).min(node.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let u = at / UNIT;
            let in_unit = (at % UNIT) as usize;
            let n = ((UNIT as usize) - in_unit).min((end - at) as usize);
            match read_unit(node, u) {
                Ok(unit) => out.extend_from_slice(&unit[in_unit..in_unit + n]),
                Err(e) => return reply.error(e),
            }
            at += n as u64;
        }
        reply.data(&out);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        // O_SYNC includes the O_DSYNC bit; the kernel sets it for
        // pwritev2(RWF_DSYNC) too.
        let durable = flags & libc::O_DSYNC != 0;
        match self.put(ino, offset, data, durable) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        // close(): nothing becomes durable.
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        match lock(&self.0).sync_file(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Punching a hole or zeroing a range: zeros in the volatile layer,
        // like any write. Plain allocation changes nothing.
        let (Ok(offset), Ok(length)) = (u64::try_from(offset), u64::try_from(length)) else {
            return reply.error(libc::EINVAL);
        };
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) == 0 {
            return reply.ok();
        }
        let size = lock(&self.0).nodes.get(&ino).map_or(0, |n| n.size);
        let end = offset.saturating_add(length).min(size);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(1 << 20);
            if let Err(e) = self.put(ino, at, &vec![0u8; n as usize], false) {
                return reply.error(e);
            }
            at += n;
        }
        reply.ok();
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == ROOT {
            reply.opened(0, 0);
        } else {
            reply.error(libc::ENOTDIR);
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let mut st = lock(&self.0);
        let mut names: Vec<String> = fs::read_dir(&st.dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        for n in names {
            if let Ok(i) = st.lookup(&n) {
                entries.push((i, FileType::RegularFile, n));
            }
        }
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(i, (k + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(
            1 << 30,
            1 << 29,
            1 << 29,
            1 << 20,
            1 << 19,
            UNIT as u32,
            255,
            UNIT as u32,
        );
    }
}

/// Answer control requests until `quit`.
fn control(listener: UnixListener, state: Arc<Mutex<State>>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(mut out) = conn.try_clone() else {
            continue;
        };
        let mut quit = false;
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            let words: Vec<&str> = line.split_whitespace().collect();
            let answer = {
                let mut st = lock(&state);
                match words.as_slice() {
                    ["drop", "all"] => match st.drop_volatile(0, 1000) {
                        Ok((lost, _)) => format!("ok lost {lost} kept 0"),
                        Err(e) => format!("error errno {e}"),
                    },
                    ["drop", seed, permille] => {
                        match (seed.parse::<u64>(), permille.parse::<u64>()) {
                            (Ok(s), Ok(p)) if p <= 1000 => match st.drop_volatile(s, p) {
                                Ok((lost, kept)) => format!("ok lost {lost} kept {kept}"),
                                Err(e) => format!("error errno {e}"),
                            },
                            _ => "error usage: drop all | drop SEED PERMILLE".to_string(),
                        }
                    }
                    ["sync"] => match st.sync_all() {
                        Ok(n) => format!("ok synced {n}"),
                        Err(e) => format!("error errno {e}"),
                    },
                    ["stats"] => format!(
                        "ok volatile {} synced {} dropped {} survived {} files {}",
                        st.volatile_units(),
                        st.synced,
                        st.dropped,
                        st.survived,
                        st.nodes
                            .values()
                            .map(|n| n.name.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    ["quit"] => {
                        quit = true;
                        "ok quit".to_string()
                    }
                    _ => format!("error unknown request {line:?}"),
                }
            };
            if writeln!(out, "{answer}").is_err() || quit {
                break;
            }
        }
        if quit {
            return;
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    const USAGE: &str = "usage: powerfs --backing DIR --mount DIR --control SOCKET";
    let mut backing = None;
    let mut mount = None;
    let mut ctl = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or(USAGE)?;
        match a.as_str() {
            "--backing" => backing = Some(PathBuf::from(v)),
            "--mount" => mount = Some(PathBuf::from(v)),
            "--control" => ctl = Some(PathBuf::from(v)),
            _ => return Err(USAGE.into()),
        }
    }
    let (Some(backing), Some(mount), Some(ctl)) = (backing, mount, ctl) else {
        return Err(USAGE.into());
    };
    let state = Arc::new(Mutex::new(State {
        dir: backing.clone(),
        nodes: HashMap::new(),
        by_name: HashMap::new(),
        next_ino: ROOT + 1,
        synced: 0,
        dropped: 0,
        survived: 0,
    }));
    let _ = fs::remove_file(&ctl);
    let listener = UnixListener::bind(&ctl)
        .map_err(|e| format!("bind control socket {}: {e}", ctl.display()))?;
    let options = [
        MountOption::FSName("powerfs".into()),
        MountOption::AllowOther,
        MountOption::RW,
    ];
    let session = fuser::spawn_mount2(PowerFs(state.clone()), &mount, &options)
        .map_err(|e| format!("mount {} on {}: {e}", backing.display(), mount.display()))?;
    println!(
        "powerfs: {} mounted on {}",
        backing.display(),
        mount.display()
    );
    control(listener, state.clone());
    drop(session);
    let _ = fs::remove_file(&ctl);
    let st = lock(&state);
    println!(
        "powerfs: unmounted {}; {} units still volatile were dropped",
        mount.display(),
        st.volatile_units()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("powerfs: {e}");
            ExitCode::from(2)
        }
    }
}

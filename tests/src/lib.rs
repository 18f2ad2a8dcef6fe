//! Harness for the integration tests: real hastd and hastctl processes run
//! from one configuration with `--node`. [`daemon::Daemon`] is one hastd
//! (started, watched, stopped and killed the same way everywhere; [`Node`]
//! when a test runs it alone, [`Solo`] for a primary exporting over NBD);
//! [`cluster::Cluster`] runs several in network namespaces or on loopback.
//! Everything started is stopped when the harness is dropped.

pub mod checker;
pub mod cluster;
pub mod daemon;
pub mod export;
pub mod freebsd;
pub mod ledger;
pub mod power;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory that holds hastd and hastctl: `$HAST_BIN`, else the
/// workspace's build directory (the test executable lives in its `deps/`
/// subdirectory); panics when they are not built.
pub fn bin_dir() -> PathBuf {
    match cluster::BinDir::find() {
        Ok(d) => d.0,
        Err(e) => panic!("{e} (make test builds the workspace before the tests)"),
    }
}

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Result of a command: exit code (-1 when killed by a signal) and output
/// as text.
#[derive(Debug, Clone)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A TCP port on `ip` that nothing listens on right now, for a daemon to
/// bind a moment later. It is taken below the kernel's ephemeral range
/// (32768 and up by default), so no outgoing connection (a hastd dialing its
/// peer) and no other test's port 0 can get it meanwhile; each test process
/// starts at its own offset and never hands out a port twice.
pub fn try_free_port(ip: std::net::IpAddr) -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 220) * 100;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % SPAN).unwrap_or(u16::MAX);
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port on {ip} in {FIRST}-{}", FIRST + SPAN - 1),
    ))
}

/// [`try_free_port`] on `ip`, a literal address.
pub fn free_port(ip: &str) -> u16 {
    let ip: std::net::IpAddr = ip.parse().expect("an IP address literal");
    try_free_port(ip).expect("a free port")
}

/// Create a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = fs::File::create(path).expect("create provider file");
    f.set_len(size).expect("size provider file");
}

/// An executable hook script that appends its arguments, one call per line,
/// to `log`.
pub fn hook_script(dir: &Path, log: &Path) -> PathBuf {
    let path = dir.join("hook.sh");
    let mut f = fs::File::create(&path).expect("create hook");
    writeln!(f, "#!/bin/sh\necho \"$@\" >> {}", log.display()).expect("write hook");
    drop(f);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod hook");
    path
}

/// Poll `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// How many times a hastd log says the daemon started (this hastd's
/// "started successfully", the reference's "Started successfully"): it
/// then has its signal handlers and serves its control socket.
pub fn hastd_starts(log: &str) -> usize {
    log.matches("tarted successfully, running protocol version")
        .count()
}

/// Whether the tests run every primary on the kernel host (the module on
/// the userland kernel shim): [`cluster::KERNEL_HOST_ENV`] is set.
pub fn kernel_host_selected() -> bool {
    std::env::var_os(cluster::KERNEL_HOST_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// How long [`daemon::Daemon::stop`] waits for hastd to exit after SIGTERM: its
/// exports drain for up to 5 s, then providers are flushed.
pub const STOP_LIMIT: Duration = Duration::from_secs(30);

/// A hastd started alone (the single-node tests): the harness's one
/// daemon type, the same the [`cluster::Cluster`] runs its nodes with.
pub use daemon::Daemon as Node;

/// Kills and reaps a helper process (fio, python, nbdfuse...) when dropped,
/// so a failing test leaves nothing running.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Guard `child`.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    /// The guarded process (to take its pipes, for example).
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child already collected")
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Wait up to `timeout` for the process to exit; kill it if it does not
    /// (then `code` is -2). Returns what is left of its piped output.
    pub fn wait_timeout(mut self, timeout: Duration) -> Run {
        let mut child = self.child.take().expect("child already collected");
        let start = Instant::now();
        let timed_out = loop {
            match child.try_wait() {
                Ok(Some(_)) => break false,
                Ok(None) if start.elapsed() > timeout => break true,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if timed_out {
            let _ = child.kill();
        }
        let mut r = Run::from(child.wait_with_output().expect("collect output"));
        if timed_out {
            r.code = -2;
            r.stderr.push_str(&format!("\n[killed after {timeout:?}]"));
        }
        r
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run `cmd` (output captured) for at most `timeout`; a command that
/// overruns is killed and reported with code -2.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Run {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    ChildGuard::new(child).wait_timeout(timeout)
}

/// Whether `prog` is an executable found in PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// The Python interpreter that has the libnbd bindings (`import nbd`).
pub const PYTHON: &str = "/usr/bin/python3";

/// Run a Python script (`python3 -c script args...`) for at most `timeout`.
pub fn python(script: &str, args: &[&str], timeout: Duration) -> Run {
    run_timeout(
        Command::new(PYTHON).arg("-c").arg(script).args(args),
        timeout,
    )
}

/// Start a Python script in the background with piped stdout/stderr.
pub fn python_spawn(script: &str, args: &[&str]) -> ChildGuard {
    ChildGuard::new(
        Command::new(PYTHON)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python3"),
    )
}

/// The value after `field:` on the first line of `text` that has it
/// (leading spaces ignored), e.g. `list_field(list, "reads")`.
pub fn list_field<'a>(text: &'a str, field: &str) -> Option<&'a str> {
    let prefix = format!("{field}:");
    text.lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::trim)
}

/// The leading number of a field (`dirty: 4194304 (4.0MB)` -> 4194304).
pub fn list_number(text: &str, field: &str) -> Option<u64> {
    list_field(text, field)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The activemap bits of a provider image (map at 4096), one per extent.
pub fn map_bits(img: &[u8], extents: u64) -> Vec<bool> {
    (0..extents)
        .map(|n| {
            let byte = img[4096 + (n / 8) as usize];
            byte & (1 << (n % 8)) != 0
        })
        .collect()
}

/// Options of [`Solo::build`].
#[derive(Debug, Default, Clone)]
pub struct SoloOpts<'a> {
    /// Extra `hastctl create` arguments (before the resource name).
    pub create_args: &'a [&'a str],
    /// `name <provname>` in the resource: the export name.
    pub provname: Option<&'a str>,
    /// Export on TCP at 127.0.0.1:port instead of the Unix socket.
    pub tcp: Option<u16>,
    /// An existing provider (file or block device) instead of a new sparse
    /// file.
    pub local: Option<PathBuf>,
}

/// One hastd node with one resource `r0` and no peer (`remote none`): the
/// provider is created with `hastctl create` (extra `create_args`), the
/// daemon started, and the resource made primary, so its data is exported
/// over NBD at `socket` under the provider name.
pub struct Solo {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub img: PathBuf,
    pub socket: PathBuf,
    /// The TCP port of the export when it listens on TCP (`nbd
    /// tcp://127.0.0.1:PORT`) instead of the Unix socket.
    pub tcp: Option<u16>,
    /// The export name (the provider name).
    pub export: String,
    pub node: Node,
    _tmp: tempfile::TempDir,
}

impl Solo {
    /// A primary on a sparse provider of `size` bytes, export name `r0`.
    pub fn new(size: u64, create_args: &[&str]) -> Solo {
        Solo::with_name(size, create_args, None)
    }

    /// As [`Solo::new`] with `name <provname>` in the resource.
    pub fn with_name(size: u64, create_args: &[&str], provname: Option<&str>) -> Solo {
        Solo::build(
            size,
            &SoloOpts {
                create_args,
                provname,
                ..SoloOpts::default()
            },
        )
    }

    /// A primary as `opts` says; `size` is the size of the sparse provider
    /// file made when `opts.local` is None.
    pub fn build(size: u64, opts: &SoloOpts) -> Solo {
        let SoloOpts {
            create_args,
            provname,
            tcp,
            local,
        } = opts;
        let (provname, tcp) = (*provname, *tcp);
        let tmp = tempfile::Builder::new()
            .prefix("hastdp")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let d = dir.display();
        let socket = dir.join("r0.nbd");
        let img = match local {
            Some(p) => p.clone(),
            None => {
                let img = dir.join("r0.img");
                sparse_file(&img, size);
                img
            }
        };
        let name_stmt = provname
            .map(|p| format!("\tname {p}\n"))
            .unwrap_or_default();
        let nbd = match tcp {
            Some(port) => format!("tcp://127.0.0.1:{port}"),
            None => socket.display().to_string(),
        };
        let text = format!(
            "on solo {{\n\tcontrol uds://{d}/solo.ctl\n\tpidfile {d}/solo.pid\n\tlisten tcp4://127.0.0.1:{}\n}}\n\
             resource r0 {{\n{name_stmt}\ton solo {{\n\t\tlocal {}\n\t\tremote none\n\t\tnbd {nbd}\n\t}}\n}}\n",
            free_port("127.0.0.1"),
            img.display(),
        );
        let conf = dir.join("hast.conf");
        fs::write(&conf, text).expect("write hast.conf");
        let mut node = Node::new(&dir, &conf, "solo");
        let mut args: Vec<&str> = create_args.to_vec();
        args.push("r0");
        let r = node.hastctl("create", &args);
        assert_eq!(r.code, 0, "hastctl create failed: {}", r.stderr);
        node.start();
        let s = Solo {
            dir,
            conf,
            img,
            socket,
            tcp,
            export: provname.unwrap_or("r0").to_string(),
            node,
            _tmp: tmp,
        };
        s.primary();
        s
    }

    /// `hastctl role primary r0`, asserted to succeed, and wait for the socket.
    pub fn primary(&self) {
        let r = self.node.hastctl("role", &["primary", "r0"]);
        assert_eq!(
            r.code,
            0,
            "role primary failed: {}\n{}",
            r.stderr,
            self.node.log_text()
        );
        assert!(
            self.wait_socket(true),
            "NBD socket {} did not appear:\n{}",
            self.socket.display(),
            self.node.log_text()
        );
        let log = self.node.log_text();
        assert_eq!(
            log.contains("from the kernel module"),
            kernel_host_selected(),
            "the primary ran on the wrong host:\n{log}"
        );
    }

    /// Wait (10 s at most) until the export accepts connections (`true`)
    /// or is gone (Unix socket file removed, TCP port refusing).
    pub fn wait_socket(&self, present: bool) -> bool {
        let p = self.socket.clone();
        let tcp = self.tcp;
        wait_for(Duration::from_secs(10), || match tcp {
            Some(port) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() == present,
            None if present => std::os::unix::net::UnixStream::connect(&p).is_ok(),
            None => !p.exists(),
        })
    }

    /// The export's NBD URI (libnbd / qemu syntax).
    pub fn uri(&self) -> String {
        match self.tcp {
            Some(port) => format!("nbd://127.0.0.1:{port}/{}", self.export),
            None => format!(
                "nbd+unix:///{}?socket={}",
                self.export,
                self.socket.display()
            ),
        }
    }

    /// `hastctl dump r0` output (asserted to succeed).
    pub fn dump(&self) -> String {
        let r = self.node.hastctl("dump", &["r0"]);
        assert_eq!(
            r.code,
            0,
            "dump failed: {}\nhastd log:\n{}",
            r.stderr,
            self.node.log_text()
        );
        r.stdout
    }

    /// `hastctl list r0` output (asserted to succeed).
    pub fn list(&self) -> String {
        let r = self.node.hastctl("list", &["r0"]);
        assert_eq!(
            r.code,
            0,
            "list failed: {}\nhastd log:\n{}",
            r.stderr,
            self.node.log_text()
        );
        r.stdout
    }

    /// A numeric field of `hastctl dump r0`.
    pub fn dump_number(&self, field: &str) -> u64 {
        let d = self.dump();
        list_number(&d, field).unwrap_or_else(|| panic!("no {field} in dump:\n{d}"))
    }

    /// (localoff, datasize, extentsize) from the metadata.
    pub fn geometry(&self) -> (u64, u64, u64) {
        let d = self.dump();
        let f = |n: &str| list_number(&d, n).unwrap_or_else(|| panic!("no {n} in dump:\n{d}"));
        (f("localoff"), f("datasize"), f("extentsize"))
    }

    /// The whole provider file.
    pub fn image(&self) -> Vec<u8> {
        fs::read(&self.img).expect("read provider")
    }
}

/// NBD wire constants, written from the protocol document (not taken from
/// the product) so that the tests check the product against the protocol.
pub mod nbdwire {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const C_FIXED_NEWSTYLE: u32 = 1;
    pub const C_NO_ZEROES: u32 = 2;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
    pub const REP_ERR_INVALID: u32 = 0x8000_0003;
    pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const FLAG_FUA: u16 = 1;
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
}

/// A hand-driven NBD client over a Unix socket: every byte is the test's
/// choice, so malformed input can be sent on purpose.
pub struct RawNbd {
    pub s: std::os::unix::net::UnixStream,
}

impl RawNbd {
    /// Connect (reads and writes time out after 10 s).
    pub fn connect(path: &Path) -> std::io::Result<RawNbd> {
        let s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(RawNbd { s })
    }

    fn read_n(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    /// Send raw bytes.
    pub fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.s.write_all(b)
    }

    /// Read the server greeting; checks both magics and returns the
    /// handshake flags.
    pub fn greeting(&mut self) -> std::io::Result<u16> {
        let b = self.read_n(18)?;
        let m1 = u64::from_be_bytes(b[0..8].try_into().unwrap());
        let m2 = u64::from_be_bytes(b[8..16].try_into().unwrap());
        assert_eq!(m1, nbdwire::NBDMAGIC, "greeting magic");
        assert_eq!(m2, nbdwire::IHAVEOPT, "greeting IHAVEOPT");
        Ok(u16::from_be_bytes([b[16], b[17]]))
    }

    /// Greeting plus client flags (fixed newstyle, no zeroes).
    pub fn start(path: &Path) -> std::io::Result<RawNbd> {
        let mut c = RawNbd::connect(path)?;
        c.greeting()?;
        c.send(&(nbdwire::C_FIXED_NEWSTYLE | nbdwire::C_NO_ZEROES).to_be_bytes())?;
        Ok(c)
    }

    /// Send an option with the length field given explicitly (it may lie).
    pub fn option_raw(&mut self, opt: u32, len: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&nbdwire::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// Send an option.
    pub fn option(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        self.option_raw(opt, data.len() as u32, data)
    }

    /// Read one option reply: (option, reply type, data); checks the magic.
    pub fn option_reply(&mut self) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let h = self.read_n(20)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        assert_eq!(magic, nbdwire::REPLY_MAGIC, "option reply magic");
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let data = self.read_n(len as usize)?;
        Ok((opt, kind, data))
    }

    /// NBD_OPT_GO for `name` (no information requests). Ok((size, flags))
    /// after the final ACK, or Err(error reply type).
    pub fn go(&mut self, name: &str) -> std::io::Result<Result<(u64, u16), u32>> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(nbdwire::OPT_GO, &d)?;
        let mut export = None;
        loop {
            let (opt, kind, data) = self.option_reply()?;
            assert_eq!(opt, nbdwire::OPT_GO, "reply to another option");
            match kind {
                nbdwire::REP_INFO => {
                    if data.len() == 12 && data[0..2] == [0, 0] {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export = Some((size, flags));
                    }
                }
                nbdwire::REP_ACK => {
                    return Ok(Ok(export.expect("GO acknowledged without NBD_INFO_EXPORT")))
                }
                e => return Ok(Err(e)),
            }
        }
    }

    /// Send one transmission request header (and `payload` right after).
    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        off: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&nbdwire::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b)
    }

    /// Read one simple reply header: (error, cookie); checks the magic.
    pub fn reply(&mut self) -> std::io::Result<(u32, u64)> {
        let h = self.read_n(16)?;
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        assert_eq!(magic, nbdwire::SIMPLE_REPLY_MAGIC, "simple reply magic");
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        Ok((err, cookie))
    }

    /// Read `n` bytes of reply payload.
    pub fn data(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        self.read_n(n)
    }

    /// A write; returns the NBD error of the reply (0 = success).
    pub fn write(&mut self, cookie: u64, off: u64, data: &[u8]) -> std::io::Result<u32> {
        self.request(0, nbdwire::CMD_WRITE, cookie, off, data.len() as u32, data)?;
        let (e, c) = self.reply()?;
        assert_eq!(c, cookie, "reply cookie");
        Ok(e)
    }

    /// A read; Ok(data) or Err(NBD error).
    pub fn read(
        &mut self,
        cookie: u64,
        off: u64,
        len: u32,
    ) -> std::io::Result<Result<Vec<u8>, u32>> {
        self.request(0, nbdwire::CMD_READ, cookie, off, len, &[])?;
        let (e, c) = self.reply()?;
        assert_eq!(c, cookie, "reply cookie");
        if e != 0 {
            return Ok(Err(e));
        }
        Ok(Ok(self.read_n(len as usize)?))
    }

    /// Whether the server closed the connection: a read returns end of
    /// file (or a reset) within the read timeout. Bytes still sent by the
    /// server before it closed are skipped.
    pub fn closed_by_server(&mut self) -> bool {
        use std::io::Read;
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }
}

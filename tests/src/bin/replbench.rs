//! replbench: the replication benchmark behind `make bench`. Side by side,
//! in one run, fio's nbd engine drives the same jobs against:
//!
//! - hast in each replication mode asked for: two hastd nodes in network
//!   namespaces joined by a veth pair replicate one preallocated provider
//!   (one such pair per mode, all set up before the first round), fio
//!   writing to the primary's NBD export;
//! - the peer a Linux user would pick instead for synchronous replication:
//!   qemu-storage-daemon (qsd) in the primary's namespace of the first pair
//!   exporting over NBD a `quorum` node (vote-threshold 2, read-pattern
//!   fifo) whose children are a local file and an `nbd` node on a qemu-nbd
//!   that serves the secondary's file in the other namespace, across the
//!   same veth link: a write is acknowledged once both copies hold it, as
//!   in fullsync;
//! - an unreplicated qemu-nbd serving a file of the same size.
//!
//! Workloads: 1 MiB sequential write QD16, 4 KiB random write QD32 and QD1,
//! 4 KiB random read QD32. Every server runs once per round, the order
//! rotating round by round, after a `sync` so that no run starts with an
//! earlier run's dirty pages. Results are medians of the rounds, reported
//! as ratios (hast / unreplicated, hast / qsd, qsd / unreplicated), with the
//! CPU time of both nodes per request (user + system from /proc/PID/stat
//! over fio's timed window, divided by the requests fio counted), fio's
//! completion-latency p99 and, for hast, the activemap writes per request
//! (`hastctl list`'s `activemap updates` before and after the window).
//! The resync rate is timed against dd copying the same number of bytes.
//!
//! Settings come from the environment (tests/bench/replication.sh passes
//! them through):
//!
//! ```text
//! HAST_BENCH_ROUNDS   rounds of each workload, servers rotating (3)
//! HAST_BENCH_SECONDS  timed seconds per fio run (10)
//! HAST_BENCH_RAMP     fio ramp seconds before timing (2)
//! HAST_BENCH_SIZE     provider size, bytes or with K/M/G (1G)
//! HAST_BENCH_RESYNC   bytes written while the secondary is away, at most
//!                     the data area (1G: the whole of the default provider)
//! HAST_BENCH_RESYNC_ROUNDS  rounds of the resync and of dd, alternating (5)
//! HAST_BENCH_MODES    comma-separated modes (fullsync,memsync,async);
//!                     `degraded` adds a primary without its peer, `resync`
//!                     times only the resync (fullsync mode runs it too)
//! HAST_BENCH_WORKLOADS  comma-separated subset of seqwrite, randwrite32,
//!                     randwrite1, randread32 (all four)
//! HAST_BENCH_QSD      0: leave the qemu-storage-daemon quorum peer out (1)
//! HAST_BENCH_KEEPDIRTY  `hastctl create -k` value (the default, 64, if unset)
//! HAST_BENCH_STRICT   1: exit 1 when a result is BELOW its target
//! ```
//! Exit status: 0 when it ran (and, with HAST_BENCH_STRICT=1, every target
//! is met), 1 when a target is below under HAST_BENCH_STRICT=1, 2 when the
//! benchmark could not run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hast_tests::cluster::{compare_areas, is_root, Cluster, DataArea, HarnessError, Mode};

const MIB: u64 = 1 << 20;
const RES: &str = "r0";
/// How long the initial full synchronization and a resync may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);
/// How long qsd may take to connect to the secondary's qemu-nbd and listen.
const QSD_START: Duration = Duration::from_secs(30);

/// What stopped the benchmark; each message says what failed.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("cluster: {0}")]
    Cluster(#[from] HarnessError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed (exit {code}): {stderr}")]
    Command {
        cmd: String,
        code: i32,
        stderr: String,
    },
    #[error("cannot read fio's JSON output: {0}")]
    FioOutput(String),
    #[error("setting {name}={value:?}: {why}")]
    Setting {
        name: String,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, BenchError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Settings {
    rounds: usize,
    resync_rounds: usize,
    seconds: u64,
    ramp: u64,
    size: u64,
    resync: u64,
    modes: Vec<String>,
    workloads: Vec<Workload>,
    qsd: bool,
    keepdirty: Option<u64>,
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Comma-separated names, each one of `allowed`; None when one is not.
fn parse_list(v: &str, allowed: &[&str]) -> Option<Vec<String>> {
    let m: Vec<String> = v
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    (!m.is_empty() && m.iter().all(|x| allowed.contains(&x.as_str()))).then_some(m)
}

fn setting<T>(name: &str, default: T, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => parse(&v).ok_or_else(|| BenchError::Setting {
            name: name.into(),
            value: v.clone(),
            why: "not a valid value".into(),
        }),
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let pos = |v: &str| v.trim().parse::<u64>().ok().filter(|&n| n > 0);
        let keys: Vec<&str> = WORKLOADS.iter().map(|w| w.key).collect();
        let s = Settings {
            rounds: setting("HAST_BENCH_ROUNDS", 3, |v| {
                pos(v).and_then(|n| usize::try_from(n).ok())
            })?,
            resync_rounds: setting("HAST_BENCH_RESYNC_ROUNDS", 5, |v| {
                pos(v).and_then(|n| usize::try_from(n).ok())
            })?,
            seconds: setting("HAST_BENCH_SECONDS", 10, pos)?,
            ramp: setting("HAST_BENCH_RAMP", 2, |v| v.trim().parse().ok())?,
            size: setting("HAST_BENCH_SIZE", 1 << 30, parse_size)?,
            resync: setting("HAST_BENCH_RESYNC", 1024 * MIB, parse_size)?,
            modes: setting(
                "HAST_BENCH_MODES",
                vec!["fullsync".into(), "memsync".into(), "async".into()],
                |v| parse_list(v, &["fullsync", "memsync", "async", "degraded", "resync"]),
            )?,
            workloads: setting("HAST_BENCH_WORKLOADS", WORKLOADS.to_vec(), |v| {
                let names = parse_list(v, &keys)?;
                // In the table's order, whatever the order asked.
                Some(
                    WORKLOADS
                        .iter()
                        .filter(|w| names.iter().any(|n| n == w.key))
                        .copied()
                        .collect(),
                )
            })?,
            qsd: setting("HAST_BENCH_QSD", true, |v| match v.trim() {
                "0" => Some(false),
                "1" => Some(true),
                _ => None,
            })?,
            keepdirty: setting("HAST_BENCH_KEEPDIRTY", None, |v| pos(v).map(Some))?,
        };
        if s.size < 64 * MIB {
            return Err(BenchError::Setting {
                name: "HAST_BENCH_SIZE".into(),
                value: s.size.to_string(),
                why: "at least 64M".into(),
            });
        }
        Ok(s)
    }

    /// The hast modes that run fio (all but `resync`), in the order given.
    fn fio_modes(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for m in &self.modes {
            if m != "resync" && !v.contains(m) {
                v.push(m.clone());
            }
        }
        v
    }

    /// Whether the resync is timed (fullsync mode or `resync` asked).
    fn times_resync(&self) -> bool {
        self.modes.iter().any(|m| m == "fullsync" || m == "resync")
    }
}

// ---------------------------------------------------------------------------
// fio's JSON report
// ---------------------------------------------------------------------------

/// The JSON report in fio's output (notes may come before or after it).
fn fio_json(text: &str) -> std::result::Result<serde_json::Value, String> {
    let start = text
        .find('{')
        .ok_or_else(|| "no JSON object in the output".to_string())?;
    serde_json::Deserializer::from_str(text.get(start..).unwrap_or_default())
        .into_iter()
        .next()
        .ok_or_else(|| "no JSON object in the output".to_string())?
        .map_err(|e| e.to_string())
}

/// The number at `keys` under `v`.
fn json_num(v: &serde_json::Value, keys: &[&str]) -> Option<f64> {
    keys.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(serde_json::Value::as_f64)
}

// ---------------------------------------------------------------------------
// fio, qemu-nbd, qemu-storage-daemon, processes
// ---------------------------------------------------------------------------

/// A workload: fio's rw, block size, queue depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Workload {
    /// Its name in HAST_BENCH_WORKLOADS (tests/bench/nbd.sh's names).
    key: &'static str,
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
}

impl Workload {
    fn reads(&self) -> bool {
        self.rw.contains("read")
    }
    fn unit(&self) -> &'static str {
        if self.bs == "1M" {
            "MiB/s"
        } else {
            "IOPS"
        }
    }
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        key: "seqwrite",
        name: "1M seq write QD16",
        rw: "write",
        bs: "1M",
        qd: 16,
    },
    Workload {
        key: "randwrite32",
        name: "4k rand write QD32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
    },
    Workload {
        key: "randwrite1",
        name: "4k rand write QD1",
        rw: "randwrite",
        bs: "4k",
        qd: 1,
    },
    Workload {
        key: "randread32",
        name: "4k rand read QD32",
        rw: "randread",
        bs: "4k",
        qd: 32,
    },
];

/// What one fio run measured (the workload's direction).
#[derive(Debug, Clone, Default)]
struct FioResult {
    bw: f64,
    iops: f64,
    clat_mean_us: f64,
    clat_p99_us: f64,
    cpu_pct: f64,
}

impl FioResult {
    /// The rate in the workload's unit (bytes/s for MiB/s, else IOPS).
    fn rate(&self, w: &Workload) -> f64 {
        if w.unit() == "MiB/s" {
            self.bw
        } else {
            self.iops
        }
    }
}

fn fio_args(uri: &str, w: &Workload, size: u64, s: &Settings) -> Vec<String> {
    vec![
        "--name=bench".into(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.qd),
        format!("--size={size}"),
        "--time_based".into(),
        format!("--runtime={}", s.seconds),
        format!("--ramp_time={}", s.ramp),
        "--norandommap".into(),
        "--randrepeat=0".into(),
        "--output-format=json".into(),
    ]
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("run {shown}")))?;
    if !out.status.success() {
        return Err(BenchError::Command {
            cmd: shown,
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The numbers of fio's JSON report of one job of `w`.
fn parse_fio(out: &str, w: &Workload) -> Result<FioResult> {
    let j = fio_json(out).map_err(BenchError::FioOutput)?;
    let job = j
        .pointer("/jobs/0")
        .ok_or_else(|| BenchError::FioOutput("no jobs[0]".into()))?;
    let dir = if w.reads() { "read" } else { "write" };
    let num = |keys: &[&str]| json_num(job, keys);
    let need = |keys: &[&str]| {
        num(keys).ok_or_else(|| BenchError::FioOutput(format!("no {}", keys.join("."))))
    };
    Ok(FioResult {
        bw: need(&[dir, "bw_bytes"])?,
        iops: need(&[dir, "iops"])?,
        clat_mean_us: need(&[dir, "clat_ns", "mean"])? / 1000.0,
        clat_p99_us: num(&[dir, "clat_ns", "percentile", "99.000000"]).unwrap_or(0.0) / 1000.0,
        cpu_pct: num(&["usr_cpu"]).unwrap_or(0.0) + num(&["sys_cpu"]).unwrap_or(0.0),
    })
}

/// One sequential pass of 1 MiB writes over the first `len` bytes (every
/// extent written once: allocation and the map's first marks happen here,
/// not in a timed run).
fn fill(uri: &str, len: u64) -> Result<()> {
    run_cmd(Command::new("fio").args([
        "--name=fill",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=write",
        "--bs=1M",
        "--iodepth=16",
        &format!("--size={len}"),
        "--output-format=terse",
    ]))
    .map(|_| ())
}

/// `cmd`'s process gets SIGKILL if this one dies first (a benchmark
/// killed by a signal leaves no server behind; its namespaces go at the
/// next harness start, which removes those of dead runs).
fn die_with_us(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours;
    // PR_SET_PDEATHSIG survives the exec of a program that is not setuid.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Kills and reaps a process started here when dropped.
struct Guard(Option<Child>);

impl Guard {
    fn pid(&self) -> Option<i32> {
        self.0.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Its exit status if it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// qemu-nbd serving `file` from `offset` as export `r0` on `sock`:
/// raw, persistent (-t), page cache as hast's local provider uses it
/// (writeback), thread-pool AIO (qemu-nbd's default).
fn qemu_nbd(file: &Path, offset: u64, sock: &Path) -> Result<Guard> {
    let _ = fs::remove_file(sock);
    let child = die_with_us(&mut Command::new("qemu-nbd"))
        .args([
            "-f",
            "raw",
            "-t",
            "-x",
            RES,
            "--cache=writeback",
            "--aio=threads",
        ])
        .arg(format!("--offset={offset}"))
        .arg("-k")
        .arg(sock)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("spawn qemu-nbd (install qemu-utils)"))?;
    let g = Guard(Some(child));
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(BenchError::Other(format!(
                "qemu-nbd did not listen on {} within 10 s",
                sock.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(g)
}

/// `args` run as `ip netns exec NS PROGRAM ARGS` (the same process: ip
/// execs the program), standard error to `log`.
fn spawn_in(ns: &str, program: &str, args: &[String], log: &Path) -> Result<Guard> {
    let err = fs::File::create(log).map_err(io_err(format!("create {}", log.display())))?;
    let child = die_with_us(&mut Command::new("ip"))
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map_err(io_err(format!("spawn {program} in namespace {ns}")))?;
    Ok(Guard(Some(child)))
}

/// The last lines of a log file, for an error message.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines.get(lines.len().saturating_sub(5)..).unwrap_or(&[]);
    format!("{}: {}", path.display(), tail.join(" | "))
}

/// A path that qsd's `key=value,...` options can carry as it is.
fn option_path(p: &Path) -> Result<String> {
    let s = p.to_str().unwrap_or_default();
    if s.is_empty() || s.contains(',') {
        return Err(BenchError::Other(format!(
            "path {} cannot be passed in a qemu-storage-daemon option (empty, not UTF-8 or has a comma)",
            p.display()
        )));
    }
    Ok(s.to_string())
}

/// The qsd quorum pair: a qemu-nbd in the secondary's namespace serving
/// its file on its veth address, and qemu-storage-daemon in the primary's
/// namespace exporting the quorum of its own file and that NBD export on a
/// Unix socket (reachable from here, like hastd's export).
struct QsdPair {
    /// Declared first: dropped (killed) before the secondary it talks to.
    qsd: Guard,
    remote: Guard,
    uri: String,
    local: DataArea,
    peer: DataArea,
}

/// The arguments of the secondary's qemu-nbd (`--offset` as hast's data
/// area, cache and AIO as the unreplicated qemu-nbd).
fn qsd_remote_args(file: &Path, offset: u64, addr: &str, port: u16) -> Vec<String> {
    [
        "-f",
        "raw",
        "-t",
        "-x",
        RES,
        "--cache=writeback",
        "--aio=threads",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("--offset={offset}"),
        "-b".into(),
        addr.into(),
        "-p".into(),
        port.to_string(),
        file.display().to_string(),
    ])
    .collect()
}

/// The arguments of qemu-storage-daemon: a raw node at `offset` of the
/// local file (page cache: cache.direct=off; flushes honoured:
/// cache.no-flush=off; thread-pool AIO), an nbd node on the secondary's
/// qemu-nbd, their quorum (both must complete a write; reads from the
/// first child), exported writable on `sock` (writethrough off: a flush
/// only when the client sends one, as hast).
fn qsd_args(
    local: &str,
    offset: u64,
    addr: &str,
    port: u16,
    sock: &str,
    pidfile: &str,
) -> Vec<String> {
    vec![
        "--pidfile".into(),
        pidfile.into(),
        "--blockdev".into(),
        format!(
            "driver=file,node-name=local-file,filename={local},aio=threads,cache.direct=off,cache.no-flush=off"
        ),
        "--blockdev".into(),
        format!("driver=raw,node-name=local,file=local-file,offset={offset}"),
        "--blockdev".into(),
        format!(
            "driver=nbd,node-name=remote,server.type=inet,server.host={addr},server.port={port},export={RES},open-timeout=10"
        ),
        "--blockdev".into(),
        "driver=quorum,node-name=mirror,vote-threshold=2,read-pattern=fifo,children.0=local,children.1=remote".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={sock}"),
        "--export".into(),
        format!("type=nbd,id=mirror-export,node-name=mirror,name={RES},writable=on,writethrough=off"),
    ]
}

/// Start the qsd pair in `c`'s namespaces on two new files of `size`
/// bytes in `dir`, data from `offset` (hast's localoff).
fn qsd_pair(c: &Cluster, dir: &Path, size: u64, offset: u64) -> Result<QsdPair> {
    let ns = |node: &str| -> Result<String> {
        c.netns(node)?
            .ok_or_else(|| BenchError::Other(format!("{node} has no network namespace")))
    };
    let (ns_a, ns_b) = (ns("alpha")?, ns("beta")?);
    let addr = c.addr("beta", "alpha")?.to_string();
    // Any port but hastd's on that address: the namespace is ours.
    let port = if c.port("beta")? == 10809 {
        10810
    } else {
        10809
    };
    let files = [dir.join("qsd-alpha.img"), dir.join("qsd-beta.img")];
    for f in &files {
        fs::File::create(f)
            .and_then(|h| h.set_len(size))
            .map_err(io_err(format!("create {}", f.display())))?;
        preallocate(f, size)?;
    }
    let remote_log = dir.join("qsd-remote.log");
    let mut remote = spawn_in(
        &ns_b,
        "qemu-nbd",
        &qsd_remote_args(&files[1], offset, &addr, port),
        &remote_log,
    )?;
    let sock = dir.join("qsd.nbd");
    let pidfile = dir.join("qsd.pid");
    let qsd_log = dir.join("qsd.log");
    let mut qsd = spawn_in(
        &ns_a,
        "qemu-storage-daemon",
        &qsd_args(
            &option_path(&files[0])?,
            offset,
            &addr,
            port,
            &option_path(&sock)?,
            &option_path(&pidfile)?,
        ),
        &qsd_log,
    )?;
    // qsd writes its pid file once its block nodes (so the connection to
    // the secondary), NBD server and export exist.
    let start = Instant::now();
    while !(pidfile.exists() && std::os::unix::net::UnixStream::connect(&sock).is_ok()) {
        if let Some(st) = qsd.exited() {
            return Err(BenchError::Other(format!(
                "qemu-storage-daemon exited ({st}) before it served {}: {}; secondary's qemu-nbd: {}",
                sock.display(),
                log_tail(&qsd_log),
                log_tail(&remote_log)
            )));
        }
        if start.elapsed() > QSD_START {
            return Err(BenchError::Other(format!(
                "qemu-storage-daemon did not serve {} within {} s: {}",
                sock.display(),
                QSD_START.as_secs(),
                log_tail(&qsd_log)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(st) = remote.exited() {
        return Err(BenchError::Other(format!(
            "the secondary's qemu-nbd exited ({st}): {}",
            log_tail(&remote_log)
        )));
    }
    let data = size.saturating_sub(offset);
    let [fa, fb] = files;
    Ok(QsdPair {
        qsd,
        remote,
        uri: format!("nbd+unix:///{RES}?socket={}", sock.display()),
        local: DataArea {
            path: fa,
            offset,
            size: data,
        },
        peer: DataArea {
            path: fb,
            offset,
            size: data,
        },
    })
}

/// Bytes an unprivileged user may still allocate in `dir`'s filesystem.
fn free_bytes(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| BenchError::Other(format!("{} has a NUL byte", dir.display())))?;
    // SAFETY: statvfs(3) writes only into the zeroed struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to that struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(BenchError::Io {
            what: format!("statvfs {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Fail before setting anything up when `files` files of `size` bytes do
/// not fit in `dir` (a benchmark that fills the disk halfway through
/// measured nothing and disturbed everyone else).
fn enough_space(dir: &Path, files: u64, size: u64) -> Result<()> {
    let need = files.saturating_mul(size);
    let free = free_bytes(dir)?;
    if free < need {
        return Err(BenchError::Other(format!(
            "{files} files of {} MiB need {} MiB in {} and {} MiB are free: free some space, or point TMPDIR elsewhere, or lower HAST_BENCH_SIZE, or run fewer HAST_BENCH_MODES",
            size / MIB,
            need / MIB,
            dir.display(),
            free / MIB
        )));
    }
    Ok(())
}

/// Allocate every block of `path` (both sides pay the same allocation).
fn preallocate(path: &Path, len: u64) -> Result<()> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(format!("open {}", path.display())))?;
    let l = libc::off_t::try_from(len)
        .map_err(|_| BenchError::Other(format!("size {len} too large")))?;
    // SAFETY: fallocate(2) on a descriptor we own, mode 0 (allocate, keep data).
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, l) };
    if r != 0 {
        return Err(BenchError::Io {
            what: format!("fallocate {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// CPU seconds (user + system) used so far by `pid` and its descendants
/// (hastd forks a worker per resource).
fn cpu_seconds(pid: i32) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut parent: BTreeMap<i32, i32> = BTreeMap::new();
    let mut ticks: BTreeMap<i32, u64> = BTreeMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Fields after the command name (which may hold spaces).
            let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ppid = f.get(1).and_then(|x| x.parse().ok()).unwrap_or(0);
            let ut: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0);
            let st: u64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
            parent.insert(p, ppid);
            ticks.insert(p, ut.saturating_add(st));
        }
    }
    let mut total = 0u64;
    for (&p, &t) in &ticks {
        let mut q = p;
        for _ in 0..16 {
            if q == pid {
                total = total.saturating_add(t);
                break;
            }
            match parent.get(&q) {
                Some(&pp) if pp > 1 => q = pp,
                _ => break,
            }
        }
    }
    total as f64 / tick
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s.get(n / 2).copied().unwrap_or(0.0),
        n => {
            (s.get(n / 2 - 1).copied().unwrap_or(0.0) + s.get(n / 2).copied().unwrap_or(0.0)) / 2.0
        }
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// One table row: medians of hast and baseline, unit, target ratio.
#[derive(Debug, Clone)]
struct Row {
    workload: String,
    hast: Vec<f64>,
    base: Vec<f64>,
    unit: &'static str,
    target: Option<f64>,
}

impl Row {
    fn ratio(&self) -> f64 {
        let b = median(&self.base);
        if b > 0.0 {
            median(&self.hast) / b
        } else {
            0.0
        }
    }
    fn pass(&self) -> Option<bool> {
        self.target.map(|t| self.ratio() >= t)
    }
}

fn fmt_rate(v: f64, unit: &str) -> String {
    match unit {
        "MiB/s" => format!("{:.1} MiB/s", v / MIB as f64),
        "IOPS" => format!("{:.0} IOPS", v),
        _ => format!("{v:.2}"),
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | hast | baseline | ratio | target | result |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {} | {} |",
            r.workload,
            fmt_rate(median(&r.hast), r.unit),
            fmt_rate(median(&r.base), r.unit),
            r.ratio(),
            r.target.map_or("-".into(), |t| format!(">= {t:.2}")),
            match r.pass() {
                Some(true) => "PASS",
                Some(false) => "BELOW",
                None => "-",
            }
        );
    }
    s
}

/// A server fio runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Peer {
    /// A hast pair (or a primary alone) in this mode.
    Hast(String),
    /// qemu-storage-daemon's quorum over the veth link.
    Qsd,
    /// qemu-nbd on one file, no replication.
    Unreplicated,
}

impl Peer {
    fn label(&self) -> String {
        match self {
            Peer::Hast(m) => format!("hast {m}"),
            Peer::Qsd => "qsd quorum".into(),
            Peer::Unreplicated => "qemu-nbd".into(),
        }
    }
    /// Replicates to a second node (so a peer of qsd's quorum).
    fn replicated(&self) -> bool {
        match self {
            Peer::Hast(m) => m != "degraded",
            Peer::Qsd => true,
            Peer::Unreplicated => false,
        }
    }
}

/// What one timed fio run measured, with the servers' CPU over fio's
/// timed window.
#[derive(Debug, Clone, Default)]
struct Run {
    /// In the workload's unit: bytes/s or IOPS.
    rate: f64,
    clat_mean_us: f64,
    clat_p99_us: f64,
    /// fio's own CPU, cores.
    fio_cpu: f64,
    /// CPU of the server the client talks to, cores.
    primary_cpu: f64,
    /// CPU of the secondary node's server, cores (0 without one).
    secondary_cpu: f64,
    /// CPU of both nodes per request, microseconds.
    cpu_us_per_req: f64,
    /// hast: activemap updates in the window (None for the others).
    map_updates: Option<f64>,
    /// hast: activemap updates per request.
    map_per_req: Option<f64>,
}

/// The runs of one workload, per server (in the order of the servers).
#[derive(Debug, Clone)]
struct WorkloadRuns {
    w: Workload,
    peers: Vec<(Peer, Vec<Run>)>,
}

impl WorkloadRuns {
    fn runs(&self, p: &Peer) -> Option<&[Run]> {
        self.peers
            .iter()
            .find(|(q, _)| q == p)
            .map(|(_, r)| r.as_slice())
    }
    /// The median of `f` over `p`'s runs.
    fn med(&self, p: &Peer, f: impl Fn(&Run) -> f64) -> Option<f64> {
        self.runs(p)
            .filter(|r| !r.is_empty())
            .map(|r| median(&r.iter().map(f).collect::<Vec<_>>()))
    }
    /// The median of `f` over `p`'s runs where every run has it.
    fn med_opt(&self, p: &Peer, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
        let v: Option<Vec<f64>> = self.runs(p)?.iter().map(f).collect();
        v.filter(|v| !v.is_empty()).map(|v| median(&v))
    }
    fn rates(&self, p: &Peer) -> Vec<f64> {
        self.runs(p)
            .map(|r| r.iter().map(|r| r.rate).collect())
            .unwrap_or_default()
    }
}

/// The ratio of two medians, "-" when either is missing or the second 0.
fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// Every server side by side, one row per workload and server.
fn peers_table(results: &[WorkloadRuns]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | server | rate | / qsd quorum | / unreplicated | CPU per request, both nodes (us) | clat mean (us) | clat p99 (us) | activemap writes per request |\n|---|---|---|---|---|---|---|---|---|"
    );
    for wr in results {
        let unit = wr.w.unit();
        let qsd = wr.med(&Peer::Qsd, |r| r.rate);
        let unrepl = wr.med(&Peer::Unreplicated, |r| r.rate);
        for (p, _) in &wr.peers {
            let rate = wr.med(p, |r| r.rate);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                wr.w.name,
                p.label(),
                rate.map_or("-".into(), |r| fmt_rate(r, unit)),
                fmt_ratio(rate, qsd),
                fmt_ratio(rate, unrepl),
                wr.med(p, |r| r.cpu_us_per_req)
                    .map_or("-".into(), |v| format!("{v:.1}")),
                wr.med(p, |r| r.clat_mean_us)
                    .map_or("-".into(), |v| format!("{v:.0}")),
                wr.med(p, |r| r.clat_p99_us)
                    .map_or("-".into(), |v| format!("{v:.0}")),
                wr.med_opt(p, |r| r.map_per_req)
                    .map_or("-".into(), |v| format!("{v:.4}")),
            );
        }
    }
    s
}

/// Where the time goes: CPU in cores over the timed window, latency, map
/// writes, per workload and server (medians).
fn diag_table(results: &[WorkloadRuns]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| mode | workload | side | server CPU (cores) | secondary CPU (cores) | fio CPU | clat mean (us) | clat p99 (us) | activemap updates/run |\n|---|---|---|---|---|---|---|---|---|"
    );
    for wr in results {
        for (p, _) in &wr.peers {
            let (mode, side) = match p {
                Peer::Hast(m) => (m.as_str(), "hast".to_string()),
                other => ("-", other.label()),
            };
            let m = |f: fn(&Run) -> f64| wr.med(p, f).unwrap_or(0.0);
            let _ = writeln!(
                s,
                "| {mode} | {} | {side} | {:.2} | {} | {:.2} | {:.0} | {:.0} | {} |",
                wr.w.name,
                m(|r| r.primary_cpu),
                if p.replicated() {
                    format!("{:.2}", m(|r| r.secondary_cpu))
                } else {
                    "-".into()
                },
                m(|r| r.fio_cpu),
                m(|r| r.clat_mean_us),
                m(|r| r.clat_p99_us),
                wr.med_opt(p, |r| r.map_updates)
                    .map_or("-".into(), |v| format!("{v:.0}")),
            );
        }
    }
    s
}

/// The rows of the ratio table for the fio workloads: each hast mode
/// against the unreplicated qemu-nbd, each replicated mode against qsd's
/// quorum, memsync and async against fullsync; targets of issue 12 (and
/// the older 0.6 for fullsync 1 MiB writes) where it sets them.
fn ratio_rows(results: &[WorkloadRuns], modes: &[String]) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |wr: &WorkloadRuns, name: String, a: &Peer, b: &Peer, target| {
        if wr.runs(a).is_some() && wr.runs(b).is_some() {
            rows.push(Row {
                workload: name,
                hast: wr.rates(a),
                base: wr.rates(b),
                unit: wr.w.unit(),
                target,
            });
        }
    };
    for m in modes {
        for wr in results {
            let target = match (m.as_str(), wr.w.key) {
                ("fullsync", "seqwrite") => Some(0.6),
                ("fullsync", "randwrite32") => Some(0.7),
                ("fullsync", "randwrite1") => Some(0.5),
                _ => None,
            };
            let name = format!("{m} {}", wr.w.name);
            push(
                wr,
                name,
                &Peer::Hast(m.clone()),
                &Peer::Unreplicated,
                target,
            );
        }
    }
    for m in modes.iter().filter(|m| *m != "degraded") {
        for wr in results {
            let target = (m == "fullsync" && !wr.w.reads()).then_some(1.5);
            let name = format!("{m} {} vs qsd quorum", wr.w.name);
            push(wr, name, &Peer::Hast(m.clone()), &Peer::Qsd, target);
        }
    }
    let full = Peer::Hast("fullsync".into());
    for m in modes.iter().filter(|m| *m == "memsync" || *m == "async") {
        for wr in results.iter().filter(|wr| !wr.w.reads()) {
            let name = format!("{m} {} vs fullsync", wr.w.name);
            push(wr, name, &Peer::Hast(m.clone()), &full, Some(1.0));
        }
    }
    rows
}

/// A target of issue 12 that is not a ratio of rates.
#[derive(Debug, Clone)]
struct Check {
    what: String,
    value: String,
    target: String,
    pass: bool,
}

/// CPU per replicated 4 KiB write (both nodes) at most 80 us, p99 of QD1
/// writes at most qsd's, activemap writes per random write below 0.01:
/// for every replicated hast mode measured.
fn checks(results: &[WorkloadRuns], modes: &[String]) -> Vec<Check> {
    let mut v = Vec::new();
    let find = |key: &str| results.iter().find(|wr| wr.w.key == key);
    for m in modes.iter().filter(|m| *m != "degraded") {
        let p = Peer::Hast(m.clone());
        for key in ["randwrite32", "randwrite1"] {
            let Some(wr) = find(key) else { continue };
            if let Some(cpu) = wr.med(&p, |r| r.cpu_us_per_req) {
                v.push(Check {
                    what: format!("{m} {}: CPU per request, both nodes", wr.w.name),
                    value: format!("{cpu:.1} us"),
                    target: "<= 80 us".into(),
                    pass: cpu <= 80.0,
                });
            }
        }
        if let Some(wr) = find("randwrite1") {
            if let (Some(h), Some(q)) = (
                wr.med(&p, |r| r.clat_p99_us),
                wr.med(&Peer::Qsd, |r| r.clat_p99_us),
            ) {
                v.push(Check {
                    what: format!("{m} {}: clat p99", wr.w.name),
                    value: format!("{h:.0} us (qsd quorum {q:.0} us)"),
                    target: "<= qsd quorum's".into(),
                    pass: h <= q,
                });
            }
        }
        for key in ["randwrite32", "randwrite1"] {
            let Some(wr) = find(key) else { continue };
            if let Some(x) = wr.med_opt(&p, |r| r.map_per_req) {
                v.push(Check {
                    what: format!("{m} {}: activemap writes per request", wr.w.name),
                    value: format!("{x:.4}"),
                    target: "< 0.01".into(),
                    pass: x < 0.01,
                });
            }
        }
    }
    v
}

fn checks_table(checks: &[Check]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| check | value | target | result |\n|---|---|---|---|");
    for c in checks {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            c.what,
            c.value,
            c.target,
            if c.pass { "PASS" } else { "BELOW" }
        );
    }
    s
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

/// A server as the rounds drive it: its NBD URI and the processes whose
/// CPU counts (the node fio talks to, and the secondary's).
#[derive(Debug, Clone)]
struct Side {
    peer: Peer,
    uri: String,
    primary: i32,
    secondary: Option<i32>,
    /// The index of its hast pair in `Bench::pairs`.
    pair: Option<usize>,
}

impl Side {
    /// CPU seconds so far of (primary, secondary).
    fn cpu(&self) -> (f64, f64) {
        (
            cpu_seconds(self.primary),
            self.secondary.map_or(0.0, cpu_seconds),
        )
    }
}

/// The order of the servers in `round`: rotated by one each round, so each
/// server runs first, in the middle and last equally often.
fn round_order(n: usize, round: usize) -> Vec<usize> {
    (0..n).map(|k| (k + round) % n.max(1)).collect()
}

/// Wait until `deadline` while `child` runs; false when it exited first.
fn wait_running(child: &mut Child, deadline: Instant) -> bool {
    loop {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

struct Bench {
    s: Settings,
    rows: Vec<Row>,
    results: Vec<WorkloadRuns>,
    /// One hast pair per mode (the cluster and its mode).
    pairs: Vec<(String, Cluster)>,
}

fn build_cluster(s: &Settings, replication: &str) -> Result<Cluster> {
    let mut b = Cluster::builder(Mode::Netns)
        .resource(RES, s.size)
        .replication(if replication == "degraded" || replication == "resync" {
            "fullsync"
        } else {
            replication
        })
        .timeout(20);
    let k;
    if let Some(kd) = s.keepdirty {
        k = kd.to_string();
        b = b.create_args(&["-k", &k]);
    }
    let c = b.build()?;
    for node in ["alpha", "beta"] {
        preallocate(&c.provider_path(node, RES)?, s.size)?;
    }
    Ok(c)
}

/// alpha primary, beta secondary, in sync (or alpha alone for `degraded`).
fn bring_up(c: &mut Cluster, degraded: bool) -> Result<()> {
    if degraded {
        c.start("alpha")?;
        c.role("alpha", RES, "primary")?;
        c.wait_list("alpha", RES, Duration::from_secs(30), |r| {
            r.status.as_deref() == Some("degraded")
        })?;
        return Ok(());
    }
    c.start_all()?;
    c.role("beta", RES, "secondary")?;
    c.role("alpha", RES, "primary")?;
    c.wait_list("alpha", RES, SYNC_TIMEOUT, |r| r.in_sync())?;
    Ok(())
}

/// alpha's `activemap updates` counter (None when hastctl list fails).
fn map_updates(c: &Cluster) -> Option<u64> {
    c.list_res("alpha", RES)
        .ok()
        .map(|r| r.stats.activemap_updates)
}

impl Bench {
    /// Set every server up, fill each once, run every workload's rounds,
    /// then the resync.
    fn run(&mut self) -> Result<()> {
        let s = self.s.clone();
        let fio_modes = s.fio_modes();
        // The pair that holds the baseline's and qsd's files and whose
        // namespaces qsd uses: fullsync's when there is one (the resync
        // runs on it), else the first.
        let mut modes = fio_modes.clone();
        if s.times_resync() && !modes.iter().any(|m| m == "fullsync") {
            modes.insert(0, "fullsync".into());
        }
        let home = modes.iter().position(|m| m == "fullsync").unwrap_or(0);
        let with_fio = !fio_modes.is_empty() && !s.workloads.is_empty();
        // Two providers per pair, the baseline's file, qsd's two: all
        // fallocated in the temporary directory.
        let files = 2 * modes.len() as u64 + 1 + if with_fio && s.qsd { 2 } else { 0 };
        enough_space(&std::env::temp_dir(), files, s.size)?;
        for mode in &modes {
            eprintln!(
                "replbench: {mode}: setting up two nodes, {} MiB provider",
                s.size / MIB
            );
            let mut c = build_cluster(&s, mode)?;
            bring_up(&mut c, mode == "degraded")?;
            self.pairs.push((mode.clone(), c));
        }
        let Some((_, hc)) = self.pairs.get(home) else {
            return Err(BenchError::Other("no mode to run".into()));
        };
        let area = hc.data_area("alpha", RES)?;
        let dir = hc.dir().to_path_buf();

        // The baseline: a file of the same size on the same filesystem,
        // served by qemu-nbd from the same offset.
        let base_file = dir.join("baseline.img");
        fs::File::create(&base_file)
            .and_then(|f| f.set_len(s.size))
            .map_err(io_err(format!("create {}", base_file.display())))?;
        preallocate(&base_file, s.size)?;
        let base_sock = dir.join("baseline.nbd");
        let mut qemu = qemu_nbd(&base_file, area.offset, &base_sock)?;
        let base_uri = format!("nbd+unix:///{RES}?socket={}", base_sock.display());

        let mut qsd = None;
        if with_fio && s.qsd {
            eprintln!("replbench: qsd: quorum of two files over the veth link");
            qsd = Some(qsd_pair(hc, &dir, s.size, area.offset)?);
        }

        eprintln!("replbench: writing every block once through every server");
        let mut sides = Vec::new();
        for (i, (mode, c)) in self.pairs.iter().enumerate() {
            let uri = c.nbd_uri("alpha", RES)?;
            fill(&uri, area.size)?;
            if mode != "degraded" {
                c.wait_list("alpha", RES, SYNC_TIMEOUT, |r| {
                    r.status.as_deref() == Some("complete")
                })?;
            }
            if fio_modes.contains(mode) {
                sides.push(Side {
                    peer: Peer::Hast(mode.clone()),
                    uri,
                    primary: c.pid("alpha").ok_or_else(|| {
                        BenchError::Other(format!("{mode}: alpha's hastd is not running"))
                    })?,
                    secondary: if mode == "degraded" {
                        None
                    } else {
                        c.pid("beta")
                    },
                    pair: Some(i),
                });
            }
        }
        if let Some(q) = &qsd {
            fill(&q.uri, area.size)?;
            sides.push(Side {
                peer: Peer::Qsd,
                uri: q.uri.clone(),
                primary: q.qsd.pid().unwrap_or(0),
                secondary: q.remote.pid(),
                pair: None,
            });
        }
        fill(&base_uri, area.size)?;
        sides.push(Side {
            peer: Peer::Unreplicated,
            uri: base_uri,
            primary: qemu.pid().unwrap_or(0),
            secondary: None,
            pair: None,
        });

        let workloads = if with_fio {
            s.workloads.clone()
        } else {
            Vec::new()
        };
        for w in workloads {
            let mut runs: Vec<Vec<Run>> = vec![Vec::new(); sides.len()];
            for round in 0..s.rounds {
                for i in round_order(sides.len(), round) {
                    let side = &sides[i];
                    let r = self.measure(side, &w, area.size)?;
                    eprintln!(
                        "replbench: {} round {} {}: {} (clat mean {:.0} us, p99 {:.0} us; CPU {:.1} us per request, both nodes{})",
                        w.name,
                        round + 1,
                        side.peer.label(),
                        fmt_rate(r.rate, w.unit()),
                        r.clat_mean_us,
                        r.clat_p99_us,
                        r.cpu_us_per_req,
                        r.map_per_req
                            .map_or(String::new(), |m| format!("; {m:.4} map writes per request")),
                    );
                    runs[i].push(r);
                }
            }
            self.results.push(WorkloadRuns {
                w,
                peers: sides.iter().map(|s| s.peer.clone()).zip(runs).collect(),
            });
        }

        if let Some(mut q) = qsd {
            // Every write the rounds made through the quorum is on both
            // files: the peer really replicated.
            if let Some(st) = q.qsd.exited().or_else(|| q.remote.exited()) {
                return Err(BenchError::Other(format!(
                    "the qsd pair stopped during the rounds ({st})"
                )));
            }
            let differs = compare_areas(&q.local, &q.peer)?;
            if let Some(off) = differs {
                return Err(BenchError::Other(format!(
                    "qsd's quorum left different data on its two files (first at data offset {off}): not a mirror"
                )));
            }
            eprintln!("replbench: qsd: both files hold the same data after the rounds");
        }
        if let Some(st) = qemu.exited() {
            return Err(BenchError::Other(format!(
                "the baseline qemu-nbd stopped during the rounds ({st})"
            )));
        }
        drop(qemu);
        if s.times_resync() {
            // Only the pair that resyncs keeps running.
            let (_, mut c) = self.pairs.swap_remove(home);
            self.pairs.clear();
            let r = self.resync(&mut c, &base_file, area.offset);
            self.pairs.push(("fullsync".into(), c));
            r?;
        }
        Ok(())
    }

    /// One timed fio run of `w` against `side`, after a `sync`: fio's
    /// numbers, and the CPU of the side's processes and (hast) the
    /// activemap updates between the end of the ramp and the end of the
    /// timed seconds, per request fio counted in its timed window.
    fn measure(&self, side: &Side, w: &Workload, size: u64) -> Result<Run> {
        let s = &self.s;
        // SAFETY: sync(2) takes no arguments and always succeeds.
        unsafe { libc::sync() };
        let mut cmd = Command::new("fio");
        die_with_us(&mut cmd).args(fio_args(&side.uri, w, size, s));
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("run {shown}")))?;
        let start = Instant::now();
        let maps = |side: &Side| {
            side.pair
                .and_then(|i| self.pairs.get(i))
                .and_then(|(_, c)| map_updates(c))
        };
        let ramped = wait_running(&mut child, start + Duration::from_secs(s.ramp));
        // Map counter first, CPU last at the start; the reverse at the end:
        // hastctl's own requests stay outside the window.
        let m0 = maps(side);
        let c0 = side.cpu();
        let t0 = Instant::now();
        wait_running(&mut child, start + Duration::from_secs(s.ramp + s.seconds));
        let c1 = side.cpu();
        let t1 = Instant::now();
        let m1 = maps(side);
        let out = child
            .wait_with_output()
            .map_err(io_err(format!("wait for {shown}")))?;
        if !out.status.success() {
            return Err(BenchError::Command {
                cmd: shown,
                code: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        if !ramped {
            return Err(BenchError::Other(format!(
                "{shown} ended before its ramp time did"
            )));
        }
        let r = parse_fio(&String::from_utf8_lossy(&out.stdout), w)?;
        let secs = (t1 - t0).as_secs_f64().max(1e-6);
        let reqs = r.iops * secs;
        let (dp, ds) = ((c1.0 - c0.0).max(0.0), (c1.1 - c0.1).max(0.0));
        let map_delta = match (m0, m1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64),
            _ => None,
        };
        Ok(Run {
            rate: r.rate(w),
            clat_mean_us: r.clat_mean_us,
            clat_p99_us: r.clat_p99_us,
            fio_cpu: r.cpu_pct / 100.0,
            primary_cpu: dp / secs,
            secondary_cpu: ds / secs,
            cpu_us_per_req: if reqs > 0.0 {
                (dp + ds) / reqs * 1e6
            } else {
                0.0
            },
            map_updates: map_delta,
            map_per_req: map_delta.map(|d| if reqs > 0.0 { d / reqs } else { 0.0 }),
        })
    }

    /// The secondary misses `resync` bytes; time the primary's resync of
    /// them (its log: `synchronization started` to `synchronization
    /// complete`) against dd copying the same bytes, rounds alternating.
    fn resync(&mut self, c: &mut Cluster, base_file: &Path, localoff: u64) -> Result<()> {
        let s = self.s.clone();
        let uri = c.nbd_uri("alpha", RES)?;
        let src = c.provider_path("alpha", RES)?;
        let len = s.resync.min(c.data_area("alpha", RES)?.size);
        let mut row = Row {
            workload: format!(
                "resync {} MiB (fullsync, {} rounds) vs dd conv=fsync",
                len / MIB,
                s.resync_rounds
            ),
            hast: Vec::new(),
            base: Vec::new(),
            unit: "MiB/s",
            target: Some(0.8),
        };
        let mut nofsync = Row {
            workload: format!("resync {} MiB vs dd without fsync (information)", len / MIB),
            hast: Vec::new(),
            base: Vec::new(),
            unit: "MiB/s",
            target: None,
        };
        for round in 0..s.resync_rounds {
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for is_hast in order {
                if is_hast {
                    let (bytes, secs) = self.one_resync(c, &uri, len)?;
                    let rate = bytes as f64 / secs;
                    eprintln!(
                        "replbench: resync round {}: hast {} bytes in {secs:.2} s = {}",
                        round + 1,
                        bytes,
                        fmt_rate(rate, "MiB/s")
                    );
                    row.hast.push(rate);
                    nofsync.hast.push(rate);
                } else {
                    for fsync in [true, false] {
                        let secs = dd(&src, base_file, localoff, len, fsync)?;
                        let rate = len as f64 / secs;
                        eprintln!(
                            "replbench: resync round {}: dd{} {len} bytes in {secs:.2} s = {}",
                            round + 1,
                            if fsync { " conv=fsync" } else { "" },
                            fmt_rate(rate, "MiB/s")
                        );
                        if fsync {
                            row.base.push(rate);
                        } else {
                            nofsync.base.push(rate);
                        }
                    }
                }
            }
        }
        self.rows.push(row);
        self.rows.push(nofsync);
        Ok(())
    }

    /// Stop beta, write `len` bytes through alpha, start beta as secondary,
    /// wait for the resync to finish; (bytes synchronized, seconds) from
    /// alpha's log.
    fn one_resync(&self, c: &mut Cluster, uri: &str, len: u64) -> Result<(u64, f64)> {
        c.stop("beta")?;
        c.wait_list("alpha", RES, Duration::from_secs(60), |r| {
            r.status.as_deref() == Some("degraded")
        })?;
        fill(uri, len)?;
        // What alpha wrote alone goes to its disk before the timing starts:
        // otherwise the flush that records the counters at the end of the
        // resync would also write out these pages of the benchmark's own
        // setup (a real primary's degraded writes were flushed long before).
        let provider = c.provider_path("alpha", RES)?;
        fs::File::open(&provider)
            .and_then(|f| f.sync_all())
            .map_err(io_err(format!("flush {}", provider.display())))?;
        let log_mark = c.log("alpha")?.len();
        let alpha_cpu = c.pid("alpha").map_or(0.0, cpu_seconds);
        c.start("beta")?;
        c.role("beta", RES, "secondary")?;
        c.wait_list("alpha", RES, SYNC_TIMEOUT, |r| r.in_sync())?;
        // The completion line follows `dirty 0` closely.
        let mut found = None;
        let start = Instant::now();
        while found.is_none() && start.elapsed() < Duration::from_secs(30) {
            let log = c.log("alpha")?;
            let tail = log.get(log_mark..).unwrap_or_default();
            found = sync_times(tail);
            if let Some(line) = found.and(
                tail.lines()
                    .find(|l| l.contains("synchronization complete")),
            ) {
                eprintln!(
                    "replbench: alpha: {} [CPU over the resync: alpha {:.2} s, beta {:.2} s]",
                    line.trim(),
                    c.pid("alpha").map_or(0.0, cpu_seconds) - alpha_cpu,
                    c.pid("beta").map_or(0.0, cpu_seconds),
                );
            }
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        found.ok_or_else(|| {
            BenchError::Other(
                "alpha's log has no `synchronization started`/`complete` pair after the resync"
                    .into(),
            )
        })
    }
}

/// (bytes, seconds) from the first `synchronization started` and the next
/// `synchronization complete: N bytes` line of a hastd log (timestamps in
/// RFC 3339 at the start of each line).
fn sync_times(log: &str) -> Option<(u64, f64)> {
    let mut start = None;
    for line in log.lines() {
        if line.contains("synchronization started") {
            start = line_time(line);
        } else if let Some(i) = line.find("synchronization complete: ") {
            let t0 = start?;
            let t1 = line_time(line)?;
            let bytes = line
                .get(i + "synchronization complete: ".len()..)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let mut d = t1 - t0;
            if d < 0.0 {
                d += 86400.0;
            }
            return Some((bytes, d.max(1e-6)));
        }
    }
    None
}

/// Seconds since midnight of a line starting `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn line_time(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let time = t.split('T').nth(1)?.trim_end_matches('Z');
    let mut it = time.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// Copy `len` bytes at `off` of `src` to the same place of `dst` with dd
/// (1 MiB buffered reads and writes, `conv=fsync` when `fsync`); seconds.
fn dd(src: &Path, dst: &Path, off: u64, len: u64, fsync: bool) -> Result<f64> {
    let conv = if fsync {
        "conv=notrunc,fsync"
    } else {
        "conv=notrunc"
    };
    let t = Instant::now();
    run_cmd(Command::new("dd").args([
        format!("if={}", src.display()),
        format!("of={}", dst.display()),
        "bs=1M".into(),
        format!("skip={off}"),
        format!("seek={off}"),
        format!("count={len}"),
        "iflag=skip_bytes,count_bytes".into(),
        "oflag=seek_bytes".into(),
        conv.into(),
        "status=none".into(),
    ]))?;
    Ok(t.elapsed().as_secs_f64().max(1e-6))
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

fn main() -> ExitCode {
    if !is_root() {
        eprintln!("replbench: needs root (network namespaces and veth links); skipped");
        return ExitCode::SUCCESS;
    }
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("replbench: {e}");
            return ExitCode::from(2);
        }
    };
    let mut progs = vec!["fio", "qemu-nbd", "dd", "ip"];
    if s.qsd {
        progs.push("qemu-storage-daemon");
    }
    for prog in progs {
        if !in_path(prog) {
            eprintln!(
                "replbench: {prog} not found in PATH (make deps installs it; qemu-storage-daemon is in qemu-utils from QEMU 8 on, in qemu-system-common before; HAST_BENCH_QSD=0 leaves that peer out)"
            );
            return ExitCode::from(2);
        }
    }
    eprintln!(
        "replbench: {} round(s) of {} s (+{} s ramp) per workload and server, provider {} MiB, resync {} MiB, modes {}, workloads {}, qsd quorum {}",
        s.rounds,
        s.seconds,
        s.ramp,
        s.size / MIB,
        s.resync / MIB,
        s.modes.join(","),
        s.workloads
            .iter()
            .map(|w| w.key)
            .collect::<Vec<_>>()
            .join(","),
        if s.qsd { "on" } else { "off" }
    );
    let mut b = Bench {
        s: s.clone(),
        rows: Vec::new(),
        results: Vec::new(),
        pairs: Vec::new(),
    };
    let failed = b.run().err();
    // Everything stops before the report: namespaces, daemons, files.
    b.pairs.clear();
    let fio_modes = s.fio_modes();
    let mut rows = ratio_rows(&b.results, &fio_modes);
    rows.append(&mut b.rows);
    let checks = checks(&b.results, &fio_modes);
    println!(
        "\nReplication over a veth pair: hast (alpha primary -> beta secondary, network namespaces), qemu-storage-daemon's quorum over the same kind of link, qemu-nbd on one file (unreplicated); same fio jobs, servers rotating, medians of {} round(s)\n",
        s.rounds
    );
    print!("{}", table(&rows));
    if !b.results.is_empty() {
        println!("\nEvery server side by side (medians; CPU over fio's timed window):\n");
        print!("{}", peers_table(&b.results));
        println!("\nWhere the time goes (medians; CPU in cores busy over the timed window):\n");
        print!("{}", diag_table(&b.results));
    }
    if !checks.is_empty() {
        println!("\nTargets of issue 12 that are not ratios:\n");
        print!("{}", checks_table(&checks));
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if let Some(e) = failed {
        eprintln!("replbench: stopped: {e}");
        return ExitCode::from(2);
    }
    let strict = std::env::var("HAST_BENCH_STRICT").is_ok_and(|v| v == "1");
    if strict && (rows.iter().any(|r| r.pass() == Some(false)) || checks.iter().any(|c| !c.pass)) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_numbers_of_a_fio_report() {
        let out = "note: both iodepth >= 1 and synchronous I/O engine are selected\n{\n  \"fio version\" : \"fio-3.33\",\n  \"jobs\" : [\n    {\n      \"jobname\" : \"bench\",\n      \"write\" : {\n        \"io_bytes\" : 10485760,\n        \"bw_bytes\" : 1048576000,\n        \"iops\" : 1000.5,\n        \"clat_ns\" : {\n          \"mean\" : 15000.0,\n          \"percentile\" : {\n            \"99.000000\" : 2.5e4\n          }\n        }\n      },\n      \"usr_cpu\" : 10.0,\n      \"sys_cpu\" : 5.5,\n      \"flag\" : true, \"none\" : null, \"list\" : [1, \"a\\\"b\", []]\n    }\n  ]\n}\n";
        let j = fio_json(out).unwrap();
        let job = j.pointer("/jobs/0").expect("jobs[0]");
        assert_eq!(json_num(job, &["write", "bw_bytes"]), Some(1048576000.0));
        assert_eq!(
            json_num(job, &["write", "clat_ns", "percentile", "99.000000"]),
            Some(25000.0)
        );
        assert_eq!(json_num(job, &["sys_cpu"]), Some(5.5));
        assert!(fio_json("{\"a\": [1, 2").is_err());
        assert!(fio_json("no json here").is_err());
        assert!(fio_json(&format!("{out}fio: trailing note\n")).is_ok());

        let w = WORKLOADS[1];
        let r = parse_fio(out, &w).unwrap();
        assert_eq!(r.iops, 1000.5);
        assert_eq!(r.rate(&w), 1000.5);
        assert_eq!(r.rate(&WORKLOADS[0]), 1048576000.0);
        assert!((r.clat_p99_us - 25.0).abs() < 1e-9);
        assert!((r.cpu_pct - 15.5).abs() < 1e-9);
        // A read workload reads the read side, which this report lacks.
        let read = WORKLOADS[3];
        assert!(read.reads());
        assert!(parse_fio(out, &read).is_err());
        let rd = out.replace("\"write\"", "\"read\"");
        assert_eq!(parse_fio(&rd, &read).unwrap().iops, 1000.5);
    }

    #[test]
    fn times_a_resync_from_the_log() {
        let log = "2026-11-21T23:59:59.750000Z  INFO connected to tcp4://10.77.1.2:1234\n\
                   2026-11-21T23:59:59.900000Z  INFO synchronization started: 536870912 bytes in 256 extents\n\
                   2026-11-22T00:00:00.400000Z  INFO synchronization complete: 536870912 bytes synchronized\n";
        let (bytes, secs) = sync_times(log).unwrap();
        assert_eq!(bytes, 536870912);
        assert!((secs - 0.5).abs() < 1e-6, "{secs}");
        assert_eq!(
            sync_times("2026-11-21T10:00:00Z  INFO synchronization started: 1 bytes"),
            None
        );
    }

    #[test]
    fn sizes_and_medians() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999G"), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn lists_and_round_order() {
        assert_eq!(
            parse_list(" a, b ,,", &["a", "b"]),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(parse_list("a,c", &["a", "b"]), None);
        assert_eq!(parse_list(",", &["a"]), None);
        // Every server once per round; each position taken by each server
        // once over as many rounds as servers.
        let n = 5;
        for round in 0..n {
            let mut o = round_order(n, round);
            assert_eq!(o[0], round);
            o.sort_unstable();
            assert_eq!(o, (0..n).collect::<Vec<_>>());
        }
        for pos in 0..n {
            let mut firsts: Vec<usize> = (0..n).map(|r| round_order(n, r)[pos]).collect();
            firsts.sort_unstable();
            assert_eq!(firsts, (0..n).collect::<Vec<_>>());
        }
    }

    fn run(rate: f64, cpu: f64, p99: f64, map: Option<f64>) -> Run {
        Run {
            rate,
            cpu_us_per_req: cpu,
            clat_p99_us: p99,
            map_per_req: map,
            ..Run::default()
        }
    }

    /// Two rounds: fullsync at 3000/5000 IOPS, qsd 2000/2000, qemu-nbd
    /// 8000/12000 (medians 4000, 2000, 10000).
    fn sample() -> Vec<WorkloadRuns> {
        let w = WORKLOADS[2];
        vec![WorkloadRuns {
            w,
            peers: vec![
                (
                    Peer::Hast("fullsync".into()),
                    vec![
                        run(3000.0, 70.0, 300.0, Some(0.0)),
                        run(5000.0, 90.0, 500.0, Some(0.02)),
                    ],
                ),
                (Peer::Qsd, vec![run(2000.0, 300.0, 350.0, None); 2]),
                (
                    Peer::Unreplicated,
                    vec![
                        run(8000.0, 40.0, 100.0, None),
                        run(12000.0, 40.0, 100.0, None),
                    ],
                ),
            ],
        }]
    }

    #[test]
    fn ratios_and_targets_of_the_peers() {
        let res = sample();
        let modes = vec!["fullsync".to_string()];
        let rows = ratio_rows(&res, &modes);
        let vs_unrepl = rows
            .iter()
            .find(|r| r.workload == "fullsync 4k rand write QD1")
            .expect("row vs qemu-nbd");
        assert!((vs_unrepl.ratio() - 0.4).abs() < 1e-9);
        assert_eq!(vs_unrepl.target, Some(0.5));
        assert_eq!(vs_unrepl.pass(), Some(false));
        let vs_qsd = rows
            .iter()
            .find(|r| r.workload == "fullsync 4k rand write QD1 vs qsd quorum")
            .expect("row vs qsd");
        assert!((vs_qsd.ratio() - 2.0).abs() < 1e-9);
        assert_eq!(vs_qsd.pass(), Some(true));
        let t = peers_table(&res);
        assert!(
            t.contains("| 4k rand write QD1 | hast fullsync | 4000 IOPS | 2.00 | 0.40 | 80.0 | 0 | 400 | 0.0100 |"),
            "{t}"
        );
        assert!(
            t.contains("| 4k rand write QD1 | qsd quorum | 2000 IOPS | 1.00 | 0.20 | 300.0 |"),
            "{t}"
        );
        assert!(t.contains("| qemu-nbd | 10000 IOPS | 5.00 | 1.00 |"), "{t}");

        let c = checks(&res, &modes);
        let find = |what: &str| c.iter().find(|c| c.what.contains(what)).expect(what);
        assert!(find("CPU per request").pass, "80 us is at most 80 us");
        assert!(!find("clat p99").pass, "400 us is above qsd's 350 us");
        assert!(!find("activemap writes").pass, "0.01 is not below 0.01");
        assert!(checks_table(&c).contains("| BELOW |"));
    }

    #[test]
    fn refuses_files_that_do_not_fit() {
        let dir = std::env::temp_dir();
        assert!(free_bytes(&dir).is_ok());
        assert!(enough_space(&dir, 0, MIB).is_ok());
        // More than any filesystem holds (the product saturates).
        let e = enough_space(&dir, 3, u64::MAX / 2).unwrap_err();
        assert!(e.to_string().contains("MiB are free"), "{e}");
        assert!(enough_space(Path::new("/nonexistent/dir"), 1, 1).is_err());
    }

    #[test]
    fn fio_modes_and_resync() {
        let mut s = Settings {
            rounds: 1,
            resync_rounds: 1,
            seconds: 1,
            ramp: 0,
            size: 64 * MIB,
            resync: MIB,
            modes: vec!["resync".into()],
            workloads: WORKLOADS.to_vec(),
            qsd: true,
            keepdirty: None,
        };
        assert!(s.fio_modes().is_empty());
        assert!(s.times_resync());
        s.modes = vec!["memsync".into(), "degraded".into(), "memsync".into()];
        assert_eq!(s.fio_modes(), vec!["memsync", "degraded"]);
        assert!(!s.times_resync());
    }
}

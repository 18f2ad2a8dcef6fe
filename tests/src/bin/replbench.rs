//! replbench: the replication benchmark behind `make bench`. Two hastd
//! nodes in network namespaces joined by a veth pair replicate one
//! preallocated provider; fio's nbd engine writes to the primary's export
//! (1 MiB sequential at QD16, 4 KiB random at QD32) in each replication
//! mode, alternating round by round with the same fio job against qemu-nbd
//! serving a file of the same size on the same filesystem; the resync rate
//! is timed against dd copying the same number of bytes. Every result is a
//! ratio to its baseline of the same run (median of the rounds).
//!
//! Mode `tls` compares link security with itself instead: the same pair in
//! fullsync, switched between `security none` and `security tls` by a
//! reload before each round (alternating), the same fio jobs and resync;
//! the ratios are TLS over plain, with the CPU time both daemons spend per
//! request.
//!
//! Settings come from the environment (tests/bench/replication.sh passes
//! them through):
//!
//! ```text
//! HAST_BENCH_ROUNDS   rounds of each workload, hast and baseline alternating (3)
//! HAST_BENCH_SECONDS  timed seconds per fio run (10)
//! HAST_BENCH_RAMP     fio ramp seconds before timing (2)
//! HAST_BENCH_SIZE     provider size, bytes or with K/M/G (1G)
//! HAST_BENCH_RESYNC   bytes written while the secondary is away, at most
//!                     the data area (1G: the whole of the default provider)
//! HAST_BENCH_RESYNC_ROUNDS  rounds of the resync and of dd, alternating (5)
//! HAST_BENCH_MODES    comma-separated modes (fullsync,memsync,async);
//!                     `degraded` adds a primary without its peer, `resync`
//!                     times only the resync (fullsync mode runs it too),
//!                     `tls` compares TLS with plain (see above)
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
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use hast_tests::cluster::{is_root, Cluster, HarnessError, Mode};

const MIB: u64 = 1 << 20;
const RES: &str = "r0";
/// How long the initial full synchronization and a resync may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(900);

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
                |v| {
                    let m: Vec<String> = v
                        .split(',')
                        .map(|x| x.trim().to_string())
                        .filter(|x| !x.is_empty())
                        .collect();
                    m.iter()
                        .all(|x| {
                            ["fullsync", "memsync", "async", "degraded", "resync", "tls"]
                                .contains(&x.as_str())
                        })
                        .then_some(m)
                },
            )?,
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
// fio, qemu-nbd, processes
// ---------------------------------------------------------------------------

/// A workload: fio's rw, block size, queue depth.
#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        name: "1M seq write QD16",
        rw: "write",
        bs: "1M",
        qd: 16,
    },
    Workload {
        name: "4k rand write QD32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
    },
];

/// What one fio run measured (write side).
#[derive(Debug, Clone, Default)]
struct FioResult {
    bw: f64,
    iops: f64,
    /// Requests completed in the timed part of the run.
    ios: f64,
    clat_mean_us: f64,
    clat_p99_us: f64,
    cpu_pct: f64,
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

fn fio(uri: &str, w: &Workload, size: u64, s: &Settings) -> Result<FioResult> {
    let out = run_cmd(Command::new("fio").args(fio_args(uri, w, size, s)))?;
    let j = fio_json(&out).map_err(BenchError::FioOutput)?;
    let job = j
        .pointer("/jobs/0")
        .ok_or_else(|| BenchError::FioOutput("no jobs[0]".into()))?;
    let num = |keys: &[&str]| json_num(job, keys);
    let need = |keys: &[&str]| {
        num(keys).ok_or_else(|| BenchError::FioOutput(format!("no {}", keys.join("."))))
    };
    Ok(FioResult {
        bw: need(&["write", "bw_bytes"])?,
        iops: need(&["write", "iops"])?,
        ios: num(&["write", "total_ios"]).unwrap_or(0.0),
        clat_mean_us: need(&["write", "clat_ns", "mean"])? / 1000.0,
        clat_p99_us: num(&["write", "clat_ns", "percentile", "99.000000"]).unwrap_or(0.0) / 1000.0,
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

/// Kills and reaps a process started here when dropped.
struct Guard(Option<Child>);

impl Guard {
    fn pid(&self) -> Option<i32> {
        self.0.as_ref().and_then(|c| i32::try_from(c.id()).ok())
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
    let child = Command::new("qemu-nbd")
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
    table_of(rows, "hast", "baseline")
}

/// The rows with columns named `a` (the measured side) and `b` (its
/// baseline).
fn table_of(rows: &[Row], a: &str, b: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | {a} | {b} | ratio | target | result |\n|---|---|---|---|---|---|"
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

/// Diagnostics of one hast fio run.
#[derive(Debug, Clone, Default)]
struct Diag {
    alpha_cpu: f64,
    beta_cpu: f64,
    fio_cpu: f64,
    clat_mean_us: f64,
    clat_p99_us: f64,
    map_updates: u64,
    bytes: f64,
}

// ---------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------

struct Bench {
    s: Settings,
    rows: Vec<Row>,
    diags: Vec<(String, String, Diag, Diag)>,
    /// Mode `tls`: TLS over plain.
    tls_rows: Vec<Row>,
    /// Mode `tls`: (workload, link, primary's and secondary's CPU
    /// microseconds per request; medians).
    tls_cpu: Vec<(String, &'static str, f64, f64)>,
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

fn map_updates(c: &Cluster) -> u64 {
    c.list_res("alpha", RES)
        .map(|r| r.stats.activemap_updates)
        .unwrap_or(0)
}

impl Bench {
    fn mode(&mut self, mode: &str) -> Result<()> {
        if mode == "tls" {
            return self.tls();
        }
        let s = self.s.clone();
        eprintln!(
            "replbench: {mode}: setting up two nodes, {} MiB provider",
            s.size / MIB
        );
        let mut c = build_cluster(&s, mode)?;
        let degraded = mode == "degraded";
        bring_up(&mut c, degraded)?;
        let area = c.data_area("alpha", RES)?;
        let uri = c.nbd_uri("alpha", RES)?;

        // The baseline: a file of the same size on the same filesystem,
        // served by qemu-nbd from the same offset.
        let base_file = c.dir().join("baseline.img");
        fs::File::create(&base_file)
            .and_then(|f| f.set_len(s.size))
            .map_err(io_err(format!("create {}", base_file.display())))?;
        preallocate(&base_file, s.size)?;
        let base_sock = c.dir().join("baseline.nbd");
        let qemu = qemu_nbd(&base_file, area.offset, &base_sock)?;
        let base_uri = format!("nbd+unix:///{RES}?socket={}", base_sock.display());

        eprintln!("replbench: {mode}: writing every block once on both sides");
        fill(&uri, area.size)?;
        fill(&base_uri, area.size)?;
        if !degraded {
            c.wait_list("alpha", RES, SYNC_TIMEOUT, |r| {
                r.status.as_deref() == Some("complete")
            })?;
        }
        let alpha = c
            .pid("alpha")
            .ok_or_else(|| BenchError::Other("alpha's hastd is not running".into()))?;
        let beta = c.pid("beta");
        let qpid = qemu.pid().unwrap_or(0);

        let workloads: &[Workload] = if mode == "resync" { &[] } else { &WORKLOADS };
        for w in workloads {
            let (unit, get): (&'static str, fn(&FioResult) -> f64) = if w.bs == "1M" {
                ("MiB/s", |r| r.bw)
            } else {
                ("IOPS", |r| r.iops)
            };
            let mut row = Row {
                workload: format!("{mode} {}", w.name),
                hast: Vec::new(),
                base: Vec::new(),
                unit,
                target: (mode == "fullsync" && w.bs == "1M").then_some(0.6),
            };
            let mut dh = Vec::new();
            let mut db = Vec::new();
            for round in 0..s.rounds {
                // Alternate which side goes first, round by round.
                let order = if round % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for is_hast in order {
                    let (a0, b0, q0) = (
                        cpu_seconds(alpha),
                        beta.map_or(0.0, cpu_seconds),
                        cpu_seconds(qpid),
                    );
                    let m0 = if is_hast { map_updates(&c) } else { 0 };
                    let r = fio(if is_hast { &uri } else { &base_uri }, w, area.size, &s)?;
                    let secs = (s.seconds + s.ramp) as f64;
                    let d = Diag {
                        alpha_cpu: if is_hast {
                            (cpu_seconds(alpha) - a0) / secs
                        } else {
                            (cpu_seconds(qpid) - q0) / secs
                        },
                        beta_cpu: if is_hast {
                            (beta.map_or(0.0, cpu_seconds) - b0) / secs
                        } else {
                            0.0
                        },
                        fio_cpu: r.cpu_pct / 100.0,
                        clat_mean_us: r.clat_mean_us,
                        clat_p99_us: r.clat_p99_us,
                        map_updates: if is_hast {
                            map_updates(&c).saturating_sub(m0)
                        } else {
                            0
                        },
                        bytes: r.bw,
                    };
                    eprintln!(
                        "replbench: {mode} {} round {} {}: {} (clat mean {:.0} us, p99 {:.0} us)",
                        w.name,
                        round + 1,
                        if is_hast { "hast" } else { "qemu-nbd" },
                        fmt_rate(get(&r), unit),
                        r.clat_mean_us,
                        r.clat_p99_us
                    );
                    if is_hast {
                        row.hast.push(get(&r));
                        dh.push(d);
                    } else {
                        row.base.push(get(&r));
                        db.push(d);
                    }
                }
            }
            self.diags.push((
                mode.to_string(),
                w.name.to_string(),
                median_diag(&dh),
                median_diag(&db),
            ));
            self.rows.push(row);
        }
        drop(qemu);
        if mode == "fullsync" || mode == "resync" {
            self.resync(&mut c, &base_file, area.offset)?;
        }
        Ok(())
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

/// The hast.conf statements of mode `tls`: both nodes' keys and pins, and
/// `security` as `mode` (the last line, switched by [`switch_link`]).
fn security_conf(c: &Cluster) -> Result<String> {
    let mut keys = Vec::new();
    for node in ["alpha", "beta"] {
        let path = c.dir().join(format!("{node}.pem"));
        let out = c.hastctl_ok(node, &["keygen", &path.display().to_string()])?;
        keys.push((path, out.trim().to_string()));
    }
    Ok(format!(
        "on alpha {{\n\tkeyfile {}\n\tpeerfingerprint {}\n}}\non beta {{\n\tkeyfile {}\n\tpeerfingerprint {}\n}}\n",
        keys[0].0.display(),
        keys[1].1,
        keys[1].0.display(),
        keys[0].1
    ))
}

/// Reconfigure the pair to `security tls` or `none` (a reload of both
/// nodes), and wait until it reconnected that way and is in sync.
fn switch_link(c: &Cluster, base: &str, keys: &str, tls: bool) -> Result<()> {
    let mode = if tls { "tls" } else { "none" };
    fs::write(c.conf(), format!("{base}{keys}security {mode}\n"))
        .map_err(io_err(format!("write {}", c.conf().display())))?;
    let sessions = c.log("alpha")?.matches("connected to ").count();
    c.signal("beta", libc::SIGHUP)?;
    c.signal("alpha", libc::SIGHUP)?;
    c.wait_for(&format!("a {mode} link"), SYNC_TIMEOUT, |c| {
        c.log("alpha")
            .is_ok_and(|l| l.matches("connected to ").count() > sessions)
            && c.list_res("alpha", RES).is_ok_and(|r| {
                r.in_sync()
                    && r.raw
                        .get("security")
                        .is_some_and(|v| v.starts_with("tls (encrypted"))
                        == tls
            })
    })?;
    Ok(())
}

impl Bench {
    /// Mode `tls`: TLS against plain on the same pair, rounds alternating.
    fn tls(&mut self) -> Result<()> {
        let s = self.s.clone();
        eprintln!(
            "replbench: tls: setting up two nodes, {} MiB provider, fullsync",
            s.size / MIB
        );
        let mut c = build_cluster(&s, "fullsync")?;
        let base =
            fs::read_to_string(c.conf()).map_err(io_err(format!("read {}", c.conf().display())))?;
        let keys = security_conf(&c)?;
        fs::write(c.conf(), format!("{base}{keys}security none\n"))
            .map_err(io_err(format!("write {}", c.conf().display())))?;
        bring_up(&mut c, false)?;
        let area = c.data_area("alpha", RES)?;
        let uri = c.nbd_uri("alpha", RES)?;
        eprintln!("replbench: tls: writing every block once");
        fill(&uri, area.size)?;
        c.wait_list("alpha", RES, SYNC_TIMEOUT, |r| r.in_sync())?;
        for w in &WORKLOADS {
            let (unit, get): (&'static str, fn(&FioResult) -> f64) = if w.bs == "1M" {
                ("MiB/s", |r| r.bw)
            } else {
                ("IOPS", |r| r.iops)
            };
            let mut row = Row {
                workload: format!("fullsync {}", w.name),
                hast: Vec::new(),
                base: Vec::new(),
                unit,
                target: Some(if w.bs == "1M" { 0.9 } else { 0.85 }),
            };
            let mut cpu: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
            for round in 0..s.rounds {
                let order = if round % 2 == 0 {
                    [true, false]
                } else {
                    [false, true]
                };
                for tls in order {
                    switch_link(&c, &base, &keys, tls)?;
                    let (alpha, beta) = (c.pid("alpha").unwrap_or(0), c.pid("beta").unwrap_or(0));
                    let (a0, b0) = (cpu_seconds(alpha), cpu_seconds(beta));
                    let r = fio(&uri, w, area.size, &s)?;
                    let (da, db) = (cpu_seconds(alpha) - a0, cpu_seconds(beta) - b0);
                    // The CPU time covers the ramp too; so do the requests.
                    let reqs = r.ios * (s.seconds + s.ramp) as f64 / s.seconds.max(1) as f64;
                    let per = |cpu: f64| if reqs > 0.0 { cpu * 1e6 / reqs } else { 0.0 };
                    eprintln!(
                        "replbench: tls {} round {} {}: {} (CPU per request: primary {:.1} us, secondary {:.1} us)",
                        w.name,
                        round + 1,
                        if tls { "TLS" } else { "plain" },
                        fmt_rate(get(&r), unit),
                        per(da),
                        per(db)
                    );
                    if tls {
                        row.hast.push(get(&r));
                    } else {
                        row.base.push(get(&r));
                    }
                    cpu[usize::from(tls)].push((per(da), per(db)));
                }
            }
            for (i, side) in [(0, "plain"), (1, "TLS")] {
                let v = &cpu[i];
                self.tls_cpu.push((
                    w.name.to_string(),
                    side,
                    median(&v.iter().map(|x| x.0).collect::<Vec<_>>()),
                    median(&v.iter().map(|x| x.1).collect::<Vec<_>>()),
                ));
            }
            self.tls_rows.push(row);
        }
        // The resync: TLS against plain, alternating.
        let len = s.resync.min(area.size);
        let mut row = Row {
            workload: format!(
                "resync {} MiB (fullsync, {} rounds)",
                len / MIB,
                s.resync_rounds
            ),
            hast: Vec::new(),
            base: Vec::new(),
            unit: "MiB/s",
            target: Some(0.9),
        };
        for round in 0..s.resync_rounds {
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for tls in order {
                switch_link(&c, &base, &keys, tls)?;
                let (bytes, secs) = self.one_resync(&mut c, &uri, len)?;
                let rate = bytes as f64 / secs;
                eprintln!(
                    "replbench: tls resync round {} {}: {bytes} bytes in {secs:.2} s = {}",
                    round + 1,
                    if tls { "TLS" } else { "plain" },
                    fmt_rate(rate, "MiB/s")
                );
                if tls {
                    row.hast.push(rate);
                } else {
                    row.base.push(rate);
                }
            }
        }
        self.tls_rows.push(row);
        Ok(())
    }
}

fn tls_cpu_table(cpu: &[(String, &'static str, f64, f64)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | link | primary CPU per request (us) | secondary CPU per request (us) |\n|---|---|---|---|"
    );
    for (w, side, a, b) in cpu {
        let _ = writeln!(s, "| {w} | {side} | {a:.1} | {b:.1} |");
    }
    s
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

fn median_diag(v: &[Diag]) -> Diag {
    let m = |f: fn(&Diag) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    Diag {
        alpha_cpu: m(|d| d.alpha_cpu),
        beta_cpu: m(|d| d.beta_cpu),
        fio_cpu: m(|d| d.fio_cpu),
        clat_mean_us: m(|d| d.clat_mean_us),
        clat_p99_us: m(|d| d.clat_p99_us),
        map_updates: m(|d| d.map_updates as f64) as u64,
        bytes: m(|d| d.bytes),
    }
}

fn diag_table(diags: &[(String, String, Diag, Diag)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| mode | workload | side | server CPU (cores) | secondary CPU (cores) | fio CPU | clat mean (us) | clat p99 (us) | activemap updates/run |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (mode, w, h, b) in diags {
        for (side, d) in [("hast", h), ("qemu-nbd", b)] {
            let _ = writeln!(
                s,
                "| {mode} | {w} | {side} | {:.2} | {} | {:.2} | {:.0} | {:.0} | {} |",
                d.alpha_cpu,
                if side == "hast" {
                    format!("{:.2}", d.beta_cpu)
                } else {
                    "-".into()
                },
                d.fio_cpu,
                d.clat_mean_us,
                d.clat_p99_us,
                if side == "hast" {
                    d.map_updates.to_string()
                } else {
                    "-".into()
                }
            );
        }
    }
    s
}

fn main() -> ExitCode {
    if !is_root() {
        eprintln!("replbench: needs root (network namespaces and veth links); skipped");
        return ExitCode::SUCCESS;
    }
    for prog in ["fio", "qemu-nbd", "dd", "ip"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
            .unwrap_or(false);
        if !found {
            eprintln!("replbench: {prog} not found in PATH (make deps installs it)");
            return ExitCode::from(2);
        }
    }
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("replbench: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "replbench: {} round(s) of {} s (+{} s ramp) per workload, provider {} MiB, resync {} MiB, modes {}",
        s.rounds,
        s.seconds,
        s.ramp,
        s.size / MIB,
        s.resync / MIB,
        s.modes.join(",")
    );
    let mut b = Bench {
        s: s.clone(),
        rows: Vec::new(),
        diags: Vec::new(),
        tls_rows: Vec::new(),
        tls_cpu: Vec::new(),
    };
    let mut failed = None;
    for mode in &s.modes {
        if let Err(e) = b.mode(mode) {
            failed = Some(format!("{mode}: {e}"));
            break;
        }
    }
    println!(
        "\nReplication over a veth pair: hast (alpha primary -> beta secondary, network namespaces) vs qemu-nbd on a file of the same size, same fio job; medians of {} round(s)\n",
        s.rounds
    );
    if !b.rows.is_empty() {
        print!("{}", table(&b.rows));
        println!("\nWhere the time goes (medians; CPU in cores busy over the run):\n");
        print!("{}", diag_table(&b.diags));
    }
    if !b.tls_rows.is_empty() {
        println!(
            "\nLink security: the same pair with `security tls` vs `security none`, switched by a reload before each round; medians of {} round(s) ({} for the resync)\n",
            s.rounds, s.resync_rounds
        );
        print!("{}", table_of(&b.tls_rows, "TLS", "plain"));
        println!("\nCPU time of each daemon per request (medians; the primary's includes its NBD server):\n");
        print!("{}", tls_cpu_table(&b.tls_cpu));
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if let Some(e) = failed {
        eprintln!("replbench: stopped: {e}");
        return ExitCode::from(2);
    }
    let strict = std::env::var("HAST_BENCH_STRICT").is_ok_and(|v| v == "1");
    if strict
        && b.rows
            .iter()
            .chain(&b.tls_rows)
            .any(|r| r.pass() == Some(false))
    {
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
}

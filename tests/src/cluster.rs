//! Cluster harness: N hastd nodes on one machine, each in its own network
//! namespace joined to every other node by a veth link (root only) or on
//! loopback addresses with `source` set (no root needed), with file-backed
//! providers in a temporary directory, one generated hast.conf, and the
//! controls tests, the demo and benchmarks need: start, stop, kill -9,
//! restart, hastctl, roles, parsed `list`/`status`/`dump`, partitions, hook
//! logs, NBD URIs and the providers' data areas. Everything it starts is
//! removed when the [`Cluster`] is dropped, even when a test panics; leftovers
//! of runs that crashed (named `hastt-<pid>-...`) are swept on startup.
//! With `HASTT_KEEP` set in the environment, the temporary directory of a
//! cluster dropped during a panic is kept and its path printed.
//!
//! Partitions need root in both modes (veth links and nft rules); without
//! root only loopback mode is available and `partition` returns
//! [`HarnessError::NeedRoot`]. The NBD sockets live in the temporary
//! directory, so they are reachable from this namespace whichever namespace
//! hastd runs in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use hast::stats::{Queues, RequestStats};

use crate::daemon::{Daemon, StartError};

/// Prefix of every name the harness gives to namespaces, temporary
/// directories (`hastt-<pid>-<n>-...`) and nft tables (`hastt_<pid>_<n>`).
pub const PREFIX: &str = "hastt";

/// How long `start` waits for a daemon's control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `stop` waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

static INSTANCE: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// What went wrong in the harness; every message says what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` exited with {code}: {stderr}")]
    Command {
        cmd: String,
        code: i32,
        stderr: String,
    },
    #[error("network namespaces, veth links and nft rules need root (euid {0}); use Mode::Loopback or run as root")]
    NeedRoot(u32),
    #[error("binary {0} not found: build the workspace (`cargo build --workspace`) or point HAST_BIN at the directory holding hastd and hastctl")]
    NoBinary(PathBuf),
    #[error("no node named {0:?} in this cluster")]
    NoNode(String),
    #[error("no resource named {0:?} in this cluster")]
    NoResource(String),
    #[error("resource {res:?} is not configured on node {node:?}")]
    NotOnNode { res: String, node: String },
    #[error(
        "hastd --node {node} did not answer on its control socket within {secs} s; log:\n{log}"
    )]
    StartTimeout {
        node: String,
        secs: u64,
        log: String,
    },
    #[error(transparent)]
    Start(crate::daemon::StartError),
    #[error("hastd --node {0} is already running; stop it first")]
    AlreadyRunning(String),
    #[error("hastctl {args} on node {node} exited with {code}: {stderr}")]
    Hastctl {
        node: String,
        args: String,
        code: i32,
        stderr: String,
    },
    #[error("cannot parse `hastctl {cmd}` output of node {node}: {why}\n{text}")]
    Parse {
        node: String,
        cmd: String,
        why: String,
        text: String,
    },
    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("invalid cluster setup: {0}")]
    Setup(String),
}

type Result<T> = std::result::Result<T, HarnessError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// Whether this process runs as root (namespaces and nft need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// How the nodes are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// All nodes in this network namespace on 127.0.0.1, 127.0.0.2, ...
    /// with a port of their own and `source` set; no root needed (but
    /// partitions need root for nft).
    Loopback,
    /// Each node in its own network namespace, a veth link between every
    /// two nodes (10.77.L.1 and 10.77.L.2 on link L); root only.
    Netns,
}

impl Mode {
    /// [`Mode::Netns`] when running as root, else [`Mode::Loopback`].
    pub fn auto() -> Mode {
        if is_root() {
            Mode::Netns
        } else {
            Mode::Loopback
        }
    }
}

/// How `partition` cuts two nodes apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionKind {
    /// Netns mode only: both ends of the veth link down (`ip link set DEV
    /// down`); connects fail at once with "network unreachable".
    LinkDown,
    /// nft rules silently dropping the pair's packets (in both namespaces in
    /// netns mode; on the loopback for the two addresses and ports in
    /// loopback mode); connections stall until a timeout.
    Drop,
}

/// What a TCP connection attempt between two nodes met ([`Cluster::probe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Something listens there and accepted.
    Connected,
    /// The peer answered with a reset: reachable, nothing listening.
    Refused,
    /// No answer within the timeout (packets dropped).
    TimedOut,
    /// Any other error (e.g. "network is unreachable" with the link down).
    Failed(String),
}

impl Reach {
    /// Whether the peer's host answered at all.
    pub fn reachable(&self) -> bool {
        matches!(self, Reach::Connected | Reach::Refused)
    }
}

/// Result of a command: the harness's one type of it ([`crate::Run`]).
pub use crate::Run as Output;

/// One resource of the cluster: its name, provider size, the two nodes
/// (indexes) it lives on and the `hastctl create` arguments.
#[derive(Debug, Clone)]
pub struct ResourceSpec {
    pub name: String,
    pub size: u64,
    pub nodes: [usize; 2],
    pub create_args: Vec<String>,
}

/// Builds a [`Cluster`]: nodes, resources, replication settings.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    mode: Mode,
    nodes: Vec<String>,
    resources: Vec<(String, u64, Option<[String; 2]>)>,
    replication: String,
    checksum: String,
    compression: String,
    timeout: u32,
    create_args: Vec<String>,
    extra: String,
    create: bool,
    metrics: bool,
    kernel_host: bool,
    kshim_fail: Option<String>,
    power: bool,
}

/// Set (to anything but `0`) in the tests' environment: every cluster runs
/// its primaries in the kernel module on the userland kernel shim (as
/// [`ClusterBuilder::kernel_host`]).
pub const KERNEL_HOST_ENV: &str = "HAST_TEST_KSHIM";

impl ClusterBuilder {
    /// Two nodes `alpha` and `beta`, no resource yet, memsync, no checksum,
    /// hole compression, timeout 5 s.
    pub fn new(mode: Mode) -> ClusterBuilder {
        ClusterBuilder {
            mode,
            nodes: vec!["alpha".into(), "beta".into()],
            resources: Vec::new(),
            replication: "memsync".into(),
            checksum: "none".into(),
            compression: "hole".into(),
            timeout: 5,
            create_args: Vec::new(),
            extra: String::new(),
            create: true,
            metrics: false,
            kernel_host: crate::kernel_host_selected(),
            kshim_fail: None,
            power: false,
        }
    }

    /// Whether every node serves Prometheus metrics (`metrics` in its
    /// top-level `on` block, on 127.0.0.1 of its namespace; see
    /// [`Cluster::metrics_addr`]). Default no.
    pub fn metrics(mut self, yes: bool) -> Self {
        self.metrics = yes;
        self
    }

    /// On the kernel host: the shim fails that share of M_NOWAIT
    /// allocations and g_clone_bio calls (`nowait=PPM,clone=PPM`, see
    /// `hast::kshim::FAIL_ENV`); GEOM retries what the module answers
    /// ENOMEM.
    pub fn kshim_fail(mut self, spec: &str) -> Self {
        self.kshim_fail = Some(spec.to_owned());
        self
    }

    /// Whether the primaries run in the geom_hast kernel module on the
    /// userland kernel shim (hastd with `HAST_KSHIM`): the local provider
    /// a GEOM disk of the shim, clients' requests entering the module's
    /// start method, the engine talking to it through its ioctls. Default:
    /// no, unless [`KERNEL_HOST_ENV`] is set.
    pub fn kernel_host(mut self, yes: bool) -> Self {
        self.kernel_host = yes;
        self
    }

    /// The node names (at least two; letters, digits, `-`, `_`).
    pub fn nodes(mut self, names: &[&str]) -> Self {
        self.nodes = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// A resource of `size` bytes (provider file size) on the first two nodes.
    pub fn resource(mut self, name: &str, size: u64) -> Self {
        self.resources.push((name.into(), size, None));
        self
    }

    /// A resource of `size` bytes on nodes `a` and `b`.
    pub fn resource_on(mut self, name: &str, size: u64, a: &str, b: &str) -> Self {
        self.resources
            .push((name.into(), size, Some([a.to_string(), b.to_string()])));
        self
    }

    /// `replication fullsync|memsync|async`.
    pub fn replication(mut self, r: &str) -> Self {
        self.replication = r.into();
        self
    }

    /// `checksum none|crc32|sha256`.
    pub fn checksum(mut self, c: &str) -> Self {
        self.checksum = c.into();
        self
    }

    /// `compression none|hole|lzf`.
    pub fn compression(mut self, c: &str) -> Self {
        self.compression = c.into();
        self
    }

    /// `timeout <seconds>`.
    pub fn timeout(mut self, secs: u32) -> Self {
        self.timeout = secs;
        self
    }

    /// Extra `hastctl create` arguments (e.g. `["-e", "1M"]`) for every resource.
    pub fn create_args(mut self, args: &[&str]) -> Self {
        self.create_args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Extra global statements appended to hast.conf.
    pub fn extra_conf(mut self, text: &str) -> Self {
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }

    /// Whether `build` runs `hastctl create` for every resource on its nodes
    /// (default yes).
    pub fn create(mut self, yes: bool) -> Self {
        self.create = yes;
        self
    }

    /// Put every node's providers on a power-loss disk (a `powerfs` FUSE
    /// mount, see [`crate::power`]), so that [`Cluster::power_cut`] can
    /// drop what a node wrote and did not flush. Needs /dev/fuse.
    pub fn power_loss(mut self, yes: bool) -> Self {
        self.power = yes;
        self
    }

    /// Sweep leftovers of crashed runs (once per process), set up the
    /// network, write hast.conf, the hooks and the provider files, and run
    /// `hastctl create`. No daemon is started yet.
    pub fn build(self) -> Result<Cluster> {
        SWEEP.call_once(|| {
            let _ = sweep();
        });
        if self.mode == Mode::Netns && !is_root() {
            return Err(HarnessError::NeedRoot(nix::unistd::geteuid().as_raw()));
        }
        if self.nodes.len() < 2 {
            return Err(HarnessError::Setup(
                "a cluster needs at least two nodes".into(),
            ));
        }
        if self.nodes.len() > 20 {
            return Err(HarnessError::Setup("at most 20 nodes".into()));
        }
        let uniq: BTreeSet<&String> = self.nodes.iter().collect();
        if uniq.len() != self.nodes.len() {
            return Err(HarnessError::Setup("node names must differ".into()));
        }
        for n in &self.nodes {
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(HarnessError::Setup(format!("bad node name {n:?}")));
            }
        }
        let bins = BinDir::find()?;
        let n = INSTANCE.fetch_add(1, Ordering::SeqCst);
        let id = format!("{PREFIX}-{}-{n}", std::process::id());
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .tempdir()
            .map_err(io_err("create the cluster's temporary directory"))?;
        let dir = tmp.path().to_path_buf();

        let mut resources = Vec::new();
        for (name, size, on) in &self.resources {
            let nodes = match on {
                None => [0, 1],
                Some([a, b]) => {
                    let ia = self
                        .nodes
                        .iter()
                        .position(|x| x == a)
                        .ok_or_else(|| HarnessError::NoNode(a.clone()))?;
                    let ib = self
                        .nodes
                        .iter()
                        .position(|x| x == b)
                        .ok_or_else(|| HarnessError::NoNode(b.clone()))?;
                    if ia == ib {
                        return Err(HarnessError::Setup(format!(
                            "resource {name} needs two different nodes"
                        )));
                    }
                    [ia, ib]
                }
            };
            resources.push(ResourceSpec {
                name: name.clone(),
                size: *size,
                nodes,
                create_args: self.create_args.clone(),
            });
        }

        let mut nodes = Vec::new();
        for (i, name) in self.nodes.iter().enumerate() {
            let octet =
                u8::try_from(i + 1).map_err(|_| HarnessError::Setup("too many nodes".into()))?;
            let lo_addr = Ipv4Addr::new(127, 0, 0, octet);
            let port = free_port(lo_addr)?;
            let metrics_port = if self.metrics {
                Some(free_port(Ipv4Addr::LOCALHOST)?)
            } else {
                None
            };
            let netns = match self.mode {
                Mode::Netns => Some(format!("{id}-{i}")),
                Mode::Loopback => None,
            };
            let ctl = dir.join(format!("{name}.ctl"));
            let log = dir.join(format!("{name}.log"));
            let mut daemon = Daemon::with_paths(name, &dir.join("hast.conf"), &ctl, &log, &bins.0);
            daemon.in_netns(netns.clone());
            nodes.push(NodeState {
                name: name.clone(),
                netns,
                lo_addr,
                port,
                ctl,
                pidfile: dir.join(format!("{name}.pid")),
                log,
                hook_log: dir.join(format!("hooks-{name}.log")),
                daemon,
                metrics_port,
                disk: None,
            });
        }
        let mut links = Vec::new();
        for a in 0..nodes.len() {
            for b in a + 1..nodes.len() {
                let l = u8::try_from(links.len() + 1)
                    .map_err(|_| HarnessError::Setup("too many links".into()))?;
                links.push(Link {
                    a,
                    b,
                    dev_a: format!("hv{b}"),
                    dev_b: format!("hv{a}"),
                    addr_a: Ipv4Addr::new(10, 77, l, 1),
                    addr_b: Ipv4Addr::new(10, 77, l, 2),
                });
            }
        }

        let mut c = Cluster {
            id,
            mode: self.mode,
            bins,
            dir,
            conf: tmp.path().join("hast.conf"),
            tmp: Some(tmp),
            nodes,
            links,
            resources,
            power: self.power,
            replication: self.replication.clone(),
            nft_tables: Vec::new(),
            partitions: BTreeMap::new(),
            namespaces: Vec::new(),
            kernel_host: self.kernel_host,
            kshim_fail: self.kshim_fail.clone(),
        };
        if c.mode == Mode::Netns {
            c.setup_netns()?;
        }
        write_hook(&c.dir)?;
        for r in &c.resources {
            for &i in &r.nodes {
                // On a power-loss disk the file is made in the backing
                // directory, before the mount serves it.
                let path = if c.power {
                    let d = c.disk_dir(i);
                    fs::create_dir_all(&d).map_err(io_err(format!("create {}", d.display())))?;
                    d.join(format!("{}-{}.img", c.nodes[i].name, r.name))
                } else {
                    c.provider_path_idx(i, &r.name)
                };
                let f = fs::File::create(&path)
                    .map_err(io_err(format!("create provider {}", path.display())))?;
                f.set_len(r.size)
                    .map_err(io_err(format!("size provider {}", path.display())))?;
            }
        }
        if c.power {
            let powerfs = c.bins.get("powerfs");
            for i in 0..c.nodes.len() {
                let name = c.nodes[i].name.clone();
                let disk = crate::power::PowerDisk::mount(
                    &powerfs,
                    &c.disk_dir(i),
                    &c.dir.join(format!("mnt-{name}")),
                    &c.dir.join(format!("power-{name}.ctl")),
                    &c.dir.join(format!("power-{name}.log")),
                )
                .map_err(|e| HarnessError::Setup(e.to_string()))?;
                c.nodes[i].disk = Some(disk);
            }
        }
        let text = c.config_text(&self);
        fs::write(&c.conf, text).map_err(io_err(format!("write {}", c.conf.display())))?;
        if self.create {
            for r in c.resources.clone() {
                for &i in &r.nodes {
                    let node = c.nodes[i].name.clone();
                    let mut args = vec!["create".to_string()];
                    args.extend(r.create_args.iter().cloned());
                    args.push(r.name.clone());
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    c.hastctl_ok(&node, &a)?;
                }
            }
        }
        Ok(c)
    }
}

/// Where hastd and hastctl are.
#[derive(Debug, Clone)]
pub(crate) struct BinDir(pub(crate) PathBuf);

impl BinDir {
    /// `$HAST_BIN`, else the directory of the running executable (or its
    /// parent when that is a cargo `deps/` directory).
    pub(crate) fn find() -> Result<BinDir> {
        let dir = match std::env::var_os("HAST_BIN") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe =
                    std::env::current_exe().map_err(io_err("path of the running executable"))?;
                let parent = exe.parent().map(Path::to_path_buf).unwrap_or_default();
                if parent.ends_with("deps") {
                    parent.parent().map(Path::to_path_buf).unwrap_or(parent)
                } else {
                    parent
                }
            }
        };
        for b in ["hastd", "hastctl"] {
            if !dir.join(b).exists() {
                return Err(HarnessError::NoBinary(dir.join(b)));
            }
        }
        Ok(BinDir(dir))
    }

    fn get(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

#[derive(Debug)]
struct NodeState {
    name: String,
    netns: Option<String>,
    lo_addr: Ipv4Addr,
    port: u16,
    ctl: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
    hook_log: PathBuf,
    /// Its hastd (started by [`Cluster::start`]).
    daemon: Daemon,
    /// Where the node serves metrics (127.0.0.1 of its namespace).
    metrics_port: Option<u16>,
    /// The power-loss disk holding this node's providers.
    disk: Option<crate::power::PowerDisk>,
}

/// The veth link between nodes `a` < `b`: device `dev_a` in a's namespace
/// with `addr_a`, `dev_b` in b's with `addr_b`.
#[derive(Debug, Clone)]
struct Link {
    a: usize,
    b: usize,
    dev_a: String,
    dev_b: String,
    addr_a: Ipv4Addr,
    addr_b: Ipv4Addr,
}

/// N hastd nodes on this machine; see the module documentation.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    mode: Mode,
    bins: BinDir,
    dir: PathBuf,
    conf: PathBuf,
    tmp: Option<tempfile::TempDir>,
    nodes: Vec<NodeState>,
    links: Vec<Link>,
    resources: Vec<ResourceSpec>,
    /// Providers live on power-loss disks.
    power: bool,
    replication: String,
    /// nft tables created: (namespace or None for this one, table name).
    nft_tables: Vec<(Option<String>, String)>,
    partitions: BTreeMap<(usize, usize), PartitionKind>,
    namespaces: Vec<String>,
    kernel_host: bool,
    kshim_fail: Option<String>,
}

/// Where a provider's data area is: the file, the byte offset of the data
/// (`localoff`) and its length (`datasize`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataArea {
    pub path: PathBuf,
    pub offset: u64,
    pub size: u64,
}

/// `hastctl dump` of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dump {
    pub resource: String,
    pub datasize: u64,
    pub extentsize: u64,
    pub keepdirty: u64,
    pub localoff: u64,
    pub resuid: u64,
    pub localcnt: u64,
    pub remotecnt: u64,
    pub prevrole: String,
    /// The extension line `inconsistent: yes (...)` is printed.
    pub inconsistent: bool,
}

/// One resource of `hastctl list`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceStatus {
    pub name: String,
    /// Set when hastd answered with an error for this resource.
    pub error: Option<i32>,
    pub role: String,
    pub provname: String,
    pub localpath: String,
    pub extentsize: u64,
    pub keepdirty: u64,
    pub remoteaddr: String,
    pub sourceaddr: Option<String>,
    pub replication: String,
    /// `degraded`, `complete`, ...; absent for a resource not running as primary.
    pub status: Option<String>,
    pub workerpid: Option<i32>,
    /// Dirty bytes.
    pub dirty: u64,
    /// The `statistics:` part, without the queues.
    pub stats: RequestStats,
    /// The `queues:` line.
    pub queues: Queues,
    /// Every `key: value` line as printed (statistics keys as printed too).
    pub raw: BTreeMap<String, String>,
}

impl ResourceStatus {
    /// A resynchronization is running: `list` prints its progress line.
    /// Dirty can reach 0 before it ends (the peer's flush and the counters
    /// come after the last extent).
    pub fn synchronizing(&self) -> bool {
        self.raw.contains_key("synchronization")
    }

    /// The copy's synchronization from the peer did not finish (the
    /// extension line `inconsistent: yes (...)`).
    pub fn inconsistent(&self) -> bool {
        self.raw
            .get("inconsistent")
            .is_some_and(|v| v.starts_with("yes"))
    }

    /// Connected, nothing dirty and no resynchronization still finishing:
    /// both data areas hold the same bytes and the counters are recorded.
    pub fn in_sync(&self) -> bool {
        self.status.as_deref() == Some("complete") && self.dirty == 0 && !self.synchronizing()
    }
}

/// One line of `hastctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusLine {
    pub name: String,
    /// `-`, `degraded`, `complete`, ... or `ERR<n>`.
    pub status: String,
    pub role: String,
    pub local: String,
    pub remote: String,
}

impl Cluster {
    /// The directory of `node`'s fail points (see hast::failpoint).
    pub fn failpoint_dir(&self, node: &str) -> PathBuf {
        self.dir.join("failpoints").join(node)
    }

    /// Arm (`on`) or disarm fail point `name` of `node`.
    pub fn failpoint(&self, node: &str, name: &str, on: bool) {
        let dir = self.failpoint_dir(node);
        let path = dir.join(name);
        if on {
            let _ = fs::create_dir_all(&dir);
            fs::write(&path, b"").expect("arm a fail point");
        } else {
            let _ = fs::remove_file(&path);
        }
    }

    /// Shorthand: `ClusterBuilder::new(mode)`.
    pub fn builder(mode: Mode) -> ClusterBuilder {
        ClusterBuilder::new(mode)
    }

    /// Whether primaries run in the kernel module on the kernel shim.
    pub fn kernel_host(&self) -> bool {
        self.kernel_host
    }

    /// Unique id of this instance (`hastt-<pid>-<n>`), the prefix of its
    /// namespaces and temporary directory.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The temporary directory holding hast.conf, providers, sockets, logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hast.conf shared by all nodes.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The `replication` mode written to hast.conf.
    pub fn replication(&self) -> &str {
        &self.replication
    }

    /// Node names in order.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The resources.
    pub fn resources(&self) -> &[ResourceSpec] {
        &self.resources
    }

    /// Keep the temporary directory after drop (for post-mortems); returns its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(t) = self.tmp.take() {
            let _ = t.keep();
        }
        self.dir.clone()
    }

    fn idx(&self, node: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == node)
            .ok_or_else(|| HarnessError::NoNode(node.to_string()))
    }

    fn res(&self, res: &str) -> Result<&ResourceSpec> {
        self.resources
            .iter()
            .find(|r| r.name == res)
            .ok_or_else(|| HarnessError::NoResource(res.to_string()))
    }

    /// The network namespace of `node` (netns mode).
    pub fn netns(&self, node: &str) -> Result<Option<String>> {
        Ok(self.nodes[self.idx(node)?].netns.clone())
    }

    /// The address `node` uses towards `peer` (its `source` and listen address).
    pub fn addr(&self, node: &str, peer: &str) -> Result<Ipv4Addr> {
        let a = self.idx(node)?;
        let b = self.idx(peer)?;
        Ok(self.addr_idx(a, b))
    }

    fn addr_idx(&self, a: usize, b: usize) -> Ipv4Addr {
        match self.mode {
            Mode::Loopback => self.nodes[a].lo_addr,
            Mode::Netns => {
                for l in &self.links {
                    if l.a == a && l.b == b {
                        return l.addr_a;
                    }
                    if l.b == a && l.a == b {
                        return l.addr_b;
                    }
                }
                self.nodes[a].lo_addr
            }
        }
    }

    /// The TCP port `node` listens on for replication.
    pub fn port(&self, node: &str) -> Result<u16> {
        Ok(self.nodes[self.idx(node)?].port)
    }

    /// The veth device of `node` that leads to `peer` (netns mode).
    pub fn link_dev(&self, node: &str, peer: &str) -> Result<Option<String>> {
        let a = self.idx(node)?;
        let b = self.idx(peer)?;
        Ok(self.links.iter().find_map(|l| {
            if l.a == a && l.b == b {
                Some(l.dev_a.clone())
            } else if l.b == a && l.a == b {
                Some(l.dev_b.clone())
            } else {
                None
            }
        }))
    }

    fn provider_path_idx(&self, i: usize, res: &str) -> PathBuf {
        let file = format!("{}-{res}.img", self.nodes[i].name);
        if self.power {
            self.dir
                .join(format!("mnt-{}", self.nodes[i].name))
                .join(file)
        } else {
            self.dir.join(file)
        }
    }

    /// The backing directory of node `i`'s power-loss disk.
    fn disk_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("disk-{}", self.nodes[i].name))
    }

    /// `node`'s power-loss disk (clusters built with `power_loss(true)`).
    pub fn disk(&self, node: &str) -> Result<&crate::power::PowerDisk> {
        let i = self.idx(node)?;
        self.nodes[i].disk.as_ref().ok_or_else(|| {
            HarnessError::Setup("the cluster was not built with power_loss(true)".into())
        })
    }

    /// Cut `node`'s power: kill -9 its hastd (it writes nothing more),
    /// then drop what `loss` says of what it wrote and did not flush.
    pub fn power_cut(
        &mut self,
        node: &str,
        loss: crate::power::Loss,
    ) -> Result<crate::power::CutResult> {
        self.disk(node)?;
        self.kill9(node)?;
        self.disk(node)?
            .cut(loss)
            .map_err(|e| HarnessError::Setup(e.to_string()))
    }

    /// The provider file of `res` on `node`.
    pub fn provider_path(&self, node: &str, res: &str) -> Result<PathBuf> {
        let i = self.idx(node)?;
        self.res_on(res, i)?;
        Ok(self.provider_path_idx(i, res))
    }

    fn res_on(&self, res: &str, i: usize) -> Result<&ResourceSpec> {
        let r = self.res(res)?;
        if !r.nodes.contains(&i) {
            return Err(HarnessError::NotOnNode {
                res: res.into(),
                node: self.nodes[i].name.clone(),
            });
        }
        Ok(r)
    }

    /// The Unix socket of `node`'s NBD export of `res`.
    pub fn nbd_socket(&self, node: &str, res: &str) -> Result<PathBuf> {
        let i = self.idx(node)?;
        self.res_on(res, i)?;
        Ok(self.dir.join(format!("{}-{res}.nbd", self.nodes[i].name)))
    }

    /// `nbd+unix:///RES?socket=PATH`: the URI of `node`'s export of `res`
    /// (the export name is the provider name, here the resource name). The
    /// socket is a file, reachable from this namespace whatever namespace
    /// hastd runs in.
    pub fn nbd_uri(&self, node: &str, res: &str) -> Result<String> {
        let sock = self.nbd_socket(node, res)?;
        Ok(format!("nbd+unix:///{res}?socket={}", sock.display()))
    }

    /// Run qemu-io with `cmds` (one `-c` each) on `node`'s export of `res`;
    /// an error with its output when it fails.
    pub fn qemu_io(&self, node: &str, res: &str, cmds: &[&str]) -> Result<()> {
        let r = crate::export::qemu_io(&self.nbd_uri(node, res)?, cmds);
        if r.code != 0 {
            return Err(HarnessError::Command {
                cmd: format!("qemu-io {cmds:?} on node {node}, resource {res}"),
                code: r.code,
                stderr: r.stderr,
            });
        }
        Ok(())
    }

    fn config_text(&self, b: &ClusterBuilder) -> String {
        use fmt::Write as _;
        let d = self.dir.display();
        let mut s = String::new();
        let _ = writeln!(s, "# written by the hast test harness ({})", self.id);
        let _ = writeln!(s, "replication {}", b.replication);
        let _ = writeln!(s, "checksum {}", b.checksum);
        let _ = writeln!(s, "compression {}", b.compression);
        let _ = writeln!(s, "timeout {}", b.timeout);
        let _ = writeln!(s, "exec {d}/hook.sh");
        for (i, n) in self.nodes.iter().enumerate() {
            let _ = writeln!(s, "on {} {{", n.name);
            let _ = writeln!(s, "\tcontrol uds://{}", n.ctl.display());
            let _ = writeln!(s, "\tpidfile {}", n.pidfile.display());
            if let Some(port) = n.metrics_port {
                let _ = writeln!(s, "\tmetrics tcp4://127.0.0.1:{port}");
            }
            match self.mode {
                Mode::Loopback => {
                    let _ = writeln!(s, "\tlisten tcp4://{}:{}", n.lo_addr, n.port);
                }
                Mode::Netns => {
                    for j in 0..self.nodes.len() {
                        if j != i {
                            let _ =
                                writeln!(s, "\tlisten tcp4://{}:{}", self.addr_idx(i, j), n.port);
                        }
                    }
                }
            }
            let _ = writeln!(s, "}}");
        }
        for r in &self.resources {
            let _ = writeln!(s, "resource {} {{", r.name);
            for (k, &i) in r.nodes.iter().enumerate() {
                let peer = r.nodes[1 - k];
                let n = &self.nodes[i];
                let _ = writeln!(s, "\ton {} {{", n.name);
                let _ = writeln!(
                    s,
                    "\t\tlocal {}",
                    self.provider_path_idx(i, &r.name).display()
                );
                let _ = writeln!(
                    s,
                    "\t\tremote tcp4://{}:{}",
                    self.addr_idx(peer, i),
                    self.nodes[peer].port
                );
                let _ = writeln!(s, "\t\tsource tcp4://{}", self.addr_idx(i, peer));
                let _ = writeln!(s, "\t\tnbd {d}/{}-{}.nbd", n.name, r.name);
                let _ = writeln!(s, "\t}}");
            }
            // The reference refuses a resource without an `on` block for
            // this host, so every other node gets one that is never used:
            // no peer, a provider file that does not exist.
            for (i, n) in self.nodes.iter().enumerate() {
                if !r.nodes.contains(&i) {
                    let _ = writeln!(s, "\ton {} {{", n.name);
                    let _ = writeln!(s, "\t\tlocal {d}/{}-{}.unused", n.name, r.name);
                    let _ = writeln!(s, "\t\tremote none");
                    let _ = writeln!(s, "\t}}");
                }
            }
            let _ = writeln!(s, "}}");
        }
        s.push_str(&b.extra);
        s
    }

    fn setup_netns(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            let Some(ns) = self.nodes[i].netns.clone() else {
                continue;
            };
            run_ok("ip", &["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            run_ok("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        for l in self.links.clone() {
            let (Some(na), Some(nb)) =
                (self.nodes[l.a].netns.clone(), self.nodes[l.b].netns.clone())
            else {
                continue;
            };
            run_ok(
                "ip",
                &[
                    "link", "add", &l.dev_a, "netns", &na, "type", "veth", "peer", "name",
                    &l.dev_b, "netns", &nb,
                ],
            )?;
            for (ns, dev, addr) in [(&na, &l.dev_a, l.addr_a), (&nb, &l.dev_b, l.addr_b)] {
                run_ok(
                    "ip",
                    &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
                )?;
                run_ok("ip", &["-n", ns, "link", "set", dev, "up"])?;
            }
        }
        Ok(())
    }

    /// Start hastd for `node` (foreground, debug log to `<dir>/<node>.log`)
    /// and wait until it logs that it started and its control socket
    /// accepts.
    pub fn start(&mut self, node: &str) -> Result<()> {
        let i = self.idx(node)?;
        if self.nodes[i].daemon.running() {
            return Err(HarnessError::AlreadyRunning(node.into()));
        }
        let failpoints = self.failpoint_dir(node);
        let kernel = if self.kernel_host { "1" } else { "0" };
        let fail = self.kshim_fail.clone().unwrap_or_default();
        let d = &mut self.nodes[i].daemon;
        d.env("HASTT_NODE", node)
            .env("HAST_FAILPOINTS", failpoints)
            .env(hast::kshim::ENV, kernel)
            .env(hast::kshim::FAIL_ENV, fail);
        d.try_start(START_TIMEOUT).map_err(|e| match e {
            StartError::NotUp { node, secs, log } => HarnessError::StartTimeout { node, secs, log },
            other => HarnessError::Start(other),
        })
    }

    /// Start every node that is not running.
    pub fn start_all(&mut self) -> Result<()> {
        for name in self.node_names() {
            let i = self.idx(&name)?;
            if !self.nodes[i].daemon.running() {
                self.start(&name)?;
            }
        }
        Ok(())
    }

    /// hastd's pid for `node`, if started by the harness and not reaped.
    pub fn pid(&self, node: &str) -> Option<i32> {
        let i = self.idx(node).ok()?;
        self.nodes[i].daemon.pid()
    }

    /// Whether `node`'s hastd runs.
    pub fn running(&mut self, node: &str) -> bool {
        match self.idx(node) {
            Ok(i) => self.nodes[i].daemon.running(),
            Err(_) => false,
        }
    }

    /// Send `sig` to `node`'s hastd (no-op when it does not run).
    pub fn signal(&self, node: &str, sig: i32) -> Result<()> {
        let i = self.idx(node)?;
        self.nodes[i].daemon.signal(sig);
        Ok(())
    }

    /// SIGTERM `node`'s hastd and wait for it (SIGKILL after 10 s); the
    /// exit status, None when it did not run or had to be killed.
    pub fn stop(&mut self, node: &str) -> Result<Option<ExitStatus>> {
        let i = self.idx(node)?;
        Ok(self.nodes[i].daemon.stop_with(libc::SIGTERM, STOP_TIMEOUT))
    }

    /// kill -9 `node`'s hastd ("pulling the power cord") and reap it.
    pub fn kill9(&mut self, node: &str) -> Result<Option<ExitStatus>> {
        let i = self.idx(node)?;
        Ok(self.nodes[i].daemon.kill9())
    }

    /// Stop (SIGTERM) and start `node` again.
    pub fn restart(&mut self, node: &str) -> Result<()> {
        self.stop(node)?;
        self.start(node)
    }

    /// Run `hastctl ARGS... -c CONF --node NODE` in `node`'s namespace;
    /// `args[0]` is the hastctl command (`role`, `list`, ...).
    pub fn hastctl(&self, node: &str, args: &[&str]) -> Result<Output> {
        let i = self.idx(node)?;
        let (cmd, rest) = args.split_first().map_or(("", args), |(f, r)| (*f, r));
        self.nodes[i]
            .daemon
            .try_hastctl(cmd, rest)
            .map_err(io_err(format!("run hastctl for node {node}")))
    }

    /// Start `hastctl ARGS... -c CONF --node NODE` in `node`'s namespace
    /// without waiting for it (`hastctl events`), its output piped.
    pub fn hastctl_spawn(&self, node: &str, args: &[&str]) -> Result<Child> {
        let i = self.idx(node)?;
        let (cmd, rest) = args.split_first().map_or(("", args), |(f, r)| (*f, r));
        self.nodes[i]
            .daemon
            .hastctl_command(cmd, rest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("spawn hastctl for node {node}")))
    }

    /// A command that runs `program` in `node`'s namespace (or here, in
    /// loopback mode): for clients of the node's local addresses.
    pub fn command(&self, node: &str, program: &str) -> Result<Command> {
        let i = self.idx(node)?;
        Ok(self.nodes[i].daemon.command(Path::new(program)))
    }

    /// Where `node` serves metrics (`127.0.0.1:PORT` in its namespace),
    /// when the cluster was built with [`ClusterBuilder::metrics`].
    pub fn metrics_addr(&self, node: &str) -> Result<Option<String>> {
        let i = self.idx(node)?;
        Ok(self.nodes[i].metrics_port.map(|p| format!("127.0.0.1:{p}")))
    }

    /// `hastctl` that must exit 0; its standard output.
    pub fn hastctl_ok(&self, node: &str, args: &[&str]) -> Result<String> {
        let o = self.hastctl(node, args)?;
        if o.code != 0 {
            return Err(HarnessError::Hastctl {
                node: node.into(),
                args: args.join(" "),
                code: o.code,
                stderr: o.stderr,
            });
        }
        Ok(o.stdout)
    }

    /// `hastctl role ROLE RES` on `node`, which must succeed.
    pub fn role(&self, node: &str, res: &str, role: &str) -> Result<()> {
        self.hastctl_ok(node, &["role", role, res]).map(|_| ())
    }

    /// `hastctl list` on `node`, parsed.
    pub fn list(&self, node: &str) -> Result<Vec<ResourceStatus>> {
        let o = self.hastctl(node, &["list"])?;
        parse_list(&o.stdout).map_err(|why| HarnessError::Parse {
            node: node.into(),
            cmd: "list".into(),
            why,
            text: o.stdout.clone(),
        })
    }

    /// `hastctl list RES` on `node`, parsed.
    pub fn list_res(&self, node: &str, res: &str) -> Result<ResourceStatus> {
        let o = self.hastctl(node, &["list", res])?;
        let mut v = parse_list(&o.stdout).map_err(|why| HarnessError::Parse {
            node: node.into(),
            cmd: format!("list {res}"),
            why,
            text: o.stdout.clone(),
        })?;
        match v.iter().position(|r| r.name == res) {
            Some(p) => Ok(v.swap_remove(p)),
            None => Err(HarnessError::Parse {
                node: node.into(),
                cmd: format!("list {res}"),
                why: format!("no entry for {res} (exit {}, {})", o.code, o.stderr.trim()),
                text: o.stdout,
            }),
        }
    }

    /// `hastctl status` on `node`, parsed.
    pub fn status(&self, node: &str) -> Result<Vec<StatusLine>> {
        let o = self.hastctl(node, &["status"])?;
        parse_status(&o.stdout).map_err(|why| HarnessError::Parse {
            node: node.into(),
            cmd: "status".into(),
            why,
            text: o.stdout.clone(),
        })
    }

    /// `hastctl dump RES` on `node` (reads the provider's metadata), parsed.
    pub fn dump(&self, node: &str, res: &str) -> Result<Dump> {
        let out = self.hastctl_ok(node, &["dump", res])?;
        parse_dump(&out).map_err(|why| HarnessError::Parse {
            node: node.into(),
            cmd: format!("dump {res}"),
            why,
            text: out.clone(),
        })
    }

    /// Poll `pred` every 50 ms until it returns true or `timeout` passes
    /// (an error naming `what`). The predicate may use the cluster.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Cluster) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            if pred(self) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: what.into(),
                    secs: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until `hastctl list RES` on `node` satisfies `pred`; the last
    /// parsed entry.
    pub fn wait_list(
        &self,
        node: &str,
        res: &str,
        timeout: Duration,
        mut pred: impl FnMut(&ResourceStatus) -> bool,
    ) -> Result<ResourceStatus> {
        let mut last = None;
        self.wait_for(
            &format!("`hastctl list {res}` on {node}"),
            timeout,
            |c| match c.list_res(node, res) {
                Ok(r) => {
                    let ok = pred(&r);
                    last = Some(r);
                    ok
                }
                Err(_) => false,
            },
        )?;
        last.ok_or_else(|| HarnessError::Timeout {
            what: format!("`hastctl list {res}` on {node}"),
            secs: timeout.as_secs_f64(),
        })
    }

    /// Wait until primary `node` has started more than `acked + queue_depth`
    /// writes of `res` since its `writes` counter read `since`: a workload
    /// with at most `queue_depth` unanswered has then had more than `acked`
    /// acknowledged.
    pub fn wait_acked(
        &self,
        node: &str,
        res: &str,
        since: u64,
        acked: u64,
        queue_depth: usize,
        timeout: Duration,
    ) -> Result<()> {
        let started = since
            .saturating_add(acked)
            .saturating_add(queue_depth as u64);
        self.wait_list(node, res, timeout, |s| s.stats.writes > started)
            .map(|_| ())
    }

    /// The lines `node`'s hooks logged so far (`role r0 init primary`, ...).
    pub fn hook_lines(&self, node: &str) -> Result<Vec<String>> {
        let i = self.idx(node)?;
        Ok(fs::read_to_string(&self.nodes[i].hook_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Wait until `node`'s hook log holds `line`.
    pub fn wait_hook(&self, node: &str, line: &str, timeout: Duration) -> Result<()> {
        self.wait_for(&format!("hook line {line:?} on {node}"), timeout, |c| {
            c.hook_lines(node)
                .map(|v| v.iter().any(|l| l == line))
                .unwrap_or(false)
        })
    }

    /// `node`'s hastd log so far.
    pub fn log(&self, node: &str) -> Result<String> {
        let i = self.idx(node)?;
        Ok(fs::read_to_string(&self.nodes[i].log).unwrap_or_default())
    }

    /// Where `res`'s data lives in `node`'s provider (from `hastctl dump`).
    pub fn data_area(&self, node: &str, res: &str) -> Result<DataArea> {
        let d = self.dump(node, res)?;
        Ok(DataArea {
            path: self.provider_path(node, res)?,
            offset: d.localoff,
            size: d.datasize,
        })
    }

    /// Read `len` bytes at `offset` of `res`'s data area on `node`, straight
    /// from the provider file.
    pub fn read_data(&self, node: &str, res: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let a = self.data_area(node, res)?;
        read_at(&a.path, a.offset.saturating_add(offset), len)
    }

    /// Compare `res`'s data areas on nodes `a` and `b` byte by byte: None
    /// when equal, else the first differing offset within the data area.
    pub fn compare_data(&self, res: &str, a: &str, b: &str) -> Result<Option<u64>> {
        let da = self.data_area(a, res)?;
        let db = self.data_area(b, res)?;
        compare_areas(&da, &db)
    }

    /// A qemu-img/qemu-io image spec (`json:{...}` raw driver with offset and
    /// size) of `res`'s data area on `node`, e.g. for `qemu-img compare`.
    pub fn qemu_image_spec(&self, node: &str, res: &str) -> Result<String> {
        let a = self.data_area(node, res)?;
        Ok(qemu_spec(&a))
    }

    /// `qemu-img compare` of `res`'s data area on `node` with `reference` (a
    /// raw image); true when identical (exit 0), false when different (exit 1).
    pub fn qemu_img_compare(&self, node: &str, res: &str, reference: &Path) -> Result<bool> {
        let spec = self.qemu_image_spec(node, res)?;
        let out = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(&spec)
            .arg(reference)
            .output()
            .map_err(io_err("run qemu-img compare"))?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            c => Err(HarnessError::Command {
                cmd: format!("qemu-img compare {spec} {}", reference.display()),
                code: c.unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
        }
    }

    /// Cut `a` and `b` apart: netns mode takes the veth link down, loopback
    /// mode adds nft drop rules (root needed).
    pub fn partition(&mut self, a: &str, b: &str) -> Result<()> {
        let kind = match self.mode {
            Mode::Netns => PartitionKind::LinkDown,
            Mode::Loopback => PartitionKind::Drop,
        };
        self.partition_with(a, b, kind)
    }

    /// Cut `a` and `b` apart the way `kind` says (a pair already cut is
    /// healed first).
    pub fn partition_with(&mut self, a: &str, b: &str, kind: PartitionKind) -> Result<()> {
        let (ia, ib) = self.pair(a, b)?;
        if self.partitions.contains_key(&(ia, ib)) {
            self.heal(a, b)?;
        }
        match (kind, self.mode) {
            (PartitionKind::LinkDown, Mode::Loopback) => {
                return Err(HarnessError::Setup(
                    "PartitionKind::LinkDown needs Mode::Netns".into(),
                ))
            }
            (PartitionKind::LinkDown, Mode::Netns) => self.set_link(ia, ib, "down")?,
            (PartitionKind::Drop, _) => {
                if !is_root() {
                    return Err(HarnessError::NeedRoot(nix::unistd::geteuid().as_raw()));
                }
                self.add_drop(ia, ib)?;
            }
        }
        self.partitions.insert((ia, ib), kind);
        Ok(())
    }

    /// Undo `partition(a, b)` (no-op when they are not cut).
    pub fn heal(&mut self, a: &str, b: &str) -> Result<()> {
        let (ia, ib) = self.pair(a, b)?;
        match self.partitions.remove(&(ia, ib)) {
            None => Ok(()),
            Some(PartitionKind::LinkDown) => self.set_link(ia, ib, "up"),
            Some(PartitionKind::Drop) => self.del_drop(ia, ib),
        }
    }

    /// Heal every partition.
    pub fn heal_all(&mut self) -> Result<()> {
        let cut: Vec<(usize, usize)> = self.partitions.keys().copied().collect();
        for (a, b) in cut {
            let (na, nb) = (self.nodes[a].name.clone(), self.nodes[b].name.clone());
            self.heal(&na, &nb)?;
        }
        Ok(())
    }

    /// Pairs currently cut, as node names.
    pub fn partitions(&self) -> Vec<(String, String, PartitionKind)> {
        self.partitions
            .iter()
            .map(|(&(a, b), &k)| (self.nodes[a].name.clone(), self.nodes[b].name.clone(), k))
            .collect()
    }

    fn pair(&self, a: &str, b: &str) -> Result<(usize, usize)> {
        let ia = self.idx(a)?;
        let ib = self.idx(b)?;
        if ia == ib {
            return Err(HarnessError::Setup(format!(
                "cannot partition {a} from itself"
            )));
        }
        Ok((ia.min(ib), ia.max(ib)))
    }

    fn set_link(&self, a: usize, b: usize, updown: &str) -> Result<()> {
        let l = self
            .links
            .iter()
            .find(|l| l.a == a && l.b == b)
            .ok_or_else(|| HarnessError::Setup("no link between these nodes".into()))?;
        for (i, dev) in [(a, &l.dev_a), (b, &l.dev_b)] {
            if let Some(ns) = &self.nodes[i].netns {
                run_ok("ip", &["-n", ns, "link", "set", dev, updown])?;
            }
        }
        Ok(())
    }

    fn nft_table_name(&self) -> String {
        self.id.replace('-', "_")
    }

    fn ensure_table(&mut self, ns: Option<String>) -> Result<()> {
        let table = self.nft_table_name();
        if self.nft_tables.iter().any(|(n, t)| *n == ns && *t == table) {
            return Ok(());
        }
        nft(ns.as_deref(), &format!("add table inet {table}"))?;
        self.nft_tables.push((ns, table));
        Ok(())
    }

    fn add_drop(&mut self, a: usize, b: usize) -> Result<()> {
        let table = self.nft_table_name();
        let chain = format!("cut_{a}_{b}");
        match self.mode {
            Mode::Loopback => {
                self.ensure_table(None)?;
                let (aa, ab) = (self.nodes[a].lo_addr, self.nodes[b].lo_addr);
                let (pa, pb) = (self.nodes[a].port, self.nodes[b].port);
                let addrs = if aa == ab {
                    format!("{aa}")
                } else {
                    format!("{{ {aa}, {ab} }}")
                };
                let script = format!(
                    "add chain inet {table} {chain} {{ type filter hook input priority -10 ; policy accept ; }}\n\
                     add rule inet {table} {chain} ip saddr {addrs} ip daddr {addrs} tcp dport {{ {pa}, {pb} }} drop\n\
                     add rule inet {table} {chain} ip saddr {addrs} ip daddr {addrs} tcp sport {{ {pa}, {pb} }} drop\n"
                );
                nft_script(None, &script)
            }
            Mode::Netns => {
                for (me, peer) in [(a, b), (b, a)] {
                    let ns = self.nodes[me].netns.clone();
                    self.ensure_table(ns.clone())?;
                    let from = self.addr_idx(peer, me);
                    let script = format!(
                        "add chain inet {table} {chain} {{ type filter hook input priority -10 ; policy accept ; }}\n\
                         add rule inet {table} {chain} ip saddr {from} drop\n"
                    );
                    nft_script(ns.as_deref(), &script)?;
                }
                Ok(())
            }
        }
    }

    fn del_drop(&mut self, a: usize, b: usize) -> Result<()> {
        let table = self.nft_table_name();
        let chain = format!("cut_{a}_{b}");
        let spaces: Vec<Option<String>> = match self.mode {
            Mode::Loopback => vec![None],
            Mode::Netns => vec![self.nodes[a].netns.clone(), self.nodes[b].netns.clone()],
        };
        for ns in spaces {
            nft(ns.as_deref(), &format!("delete chain inet {table} {chain}"))?;
        }
        Ok(())
    }

    /// Abort every TCP connection between `a` and `b` at once, as a
    /// middlebox's reset or a NIC reset does (`ss -K`, in `a`'s namespace
    /// in netns mode): both daemons see their connections fail, and the
    /// network stays up, so a reconnection succeeds at once. Needs root.
    pub fn reset_connections(&self, a: &str, b: &str) -> Result<()> {
        if !is_root() {
            return Err(HarnessError::NeedRoot(nix::unistd::geteuid().as_raw()));
        }
        let ia = self.idx(a)?;
        let ib = self.idx(b)?;
        let peer = self.addr_idx(ib, ia).to_string();
        let me = self.addr_idx(ia, ib).to_string();
        let filter = ["-K", "src", me.as_str(), "dst", peer.as_str()];
        match self.nodes[ia].netns.as_deref() {
            Some(ns) => {
                let mut v = vec!["netns", "exec", ns, "ss"];
                v.extend(filter);
                run_ok("ip", &v)?;
            }
            None => {
                run_ok("ss", &filter)?;
            }
        }
        Ok(())
    }

    /// Try a TCP connection from `from` (its namespace, its address) to
    /// `to`'s replication address and port, to see what a partition does.
    pub fn probe(&self, from: &str, to: &str, timeout: Duration) -> Result<Reach> {
        let a = self.idx(from)?;
        let b = self.idx(to)?;
        let target = std::net::SocketAddr::from((self.addr_idx(b, a), self.nodes[b].port));
        let ns = self.nodes[a].netns.clone();
        let handle = std::thread::spawn(move || -> io::Result<Reach> {
            if let Some(ns) = ns {
                let f = fs::File::open(format!("/run/netns/{ns}"))?;
                use std::os::fd::AsRawFd;
                // SAFETY: setns(2) on an open namespace file; it moves only
                // this short-lived thread into the namespace.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(
                match std::net::TcpStream::connect_timeout(&target, timeout) {
                    Ok(_) => Reach::Connected,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Reach::Refused,
                    Err(e)
                        if e.kind() == io::ErrorKind::TimedOut
                            || e.kind() == io::ErrorKind::WouldBlock =>
                    {
                        Reach::TimedOut
                    }
                    Err(e) => Reach::Failed(e.to_string()),
                },
            )
        });
        match handle.join() {
            Ok(r) => r.map_err(io_err(format!("probe from {from} to {to} ({target})"))),
            Err(_) => Err(HarnessError::Setup("probe thread panicked".into())),
        }
    }

    /// Kill every daemon, delete the nft tables and namespaces (and with
    /// them the veth links). Called by Drop; safe to call twice.
    pub fn teardown(&mut self) {
        for n in &mut self.nodes {
            n.daemon.kill9();
        }
        for n in &mut self.nodes {
            if let Some(mut d) = n.disk.take() {
                d.unmount();
            }
        }
        for (ns, table) in std::mem::take(&mut self.nft_tables) {
            let _ = nft(ns.as_deref(), &format!("delete table inet {table}"));
        }
        self.partitions.clear();
        for ns in std::mem::take(&mut self.namespaces) {
            kill_netns_pids(&ns);
            let _ = run_ok("ip", &["netns", "del", &ns]);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
        if std::thread::panicking() && std::env::var_os("HASTT_KEEP").is_some() {
            let dir = self.keep_dir();
            eprintln!(
                "HASTT_KEEP: kept {} (logs, hast.conf, providers)",
                dir.display()
            );
        }
    }
}

/// A free TCP port on `addr` (bound and released at once).
fn free_port(addr: Ipv4Addr) -> Result<u16> {
    crate::try_free_port(addr.into()).map_err(io_err(format!("find a free port on {addr}")))
}

/// The `exec` hook: hastd runs it with the environment it got, so
/// `HASTT_NODE` (set by `start`) says which node's log to append to.
fn write_hook(dir: &Path) -> Result<()> {
    let path = dir.join("hook.sh");
    let text = format!(
        "#!/bin/sh\necho \"$@\" >> '{}/hooks-'\"${{HASTT_NODE:-unknown}}\".log\n",
        dir.display()
    );
    fs::write(&path, text).map_err(io_err(format!("write hook {}", path.display())))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod hook {}", path.display())))
}

/// Run a command that must exit 0; its standard output.
fn run_ok(prog: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("run {prog}")))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            cmd: format!("{prog} {}", args.join(" ")),
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nft(ns: Option<&str>, cmd: &str) -> Result<String> {
    let args: Vec<&str> = cmd.split_whitespace().collect();
    match ns {
        Some(ns) => {
            let mut v = vec!["netns", "exec", ns, "nft"];
            v.extend(args);
            run_ok("ip", &v)
        }
        None => run_ok("nft", &args),
    }
}

fn nft_script(ns: Option<&str>, script: &str) -> Result<()> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft", "-f", "-"]);
            c
        }
        None => {
            let mut c = Command::new("nft");
            c.args(["-f", "-"]);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("run nft"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(io_err("write the nft script"))?;
    }
    let out = child.wait_with_output().map_err(io_err("wait for nft"))?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            cmd: format!("nft -f - <<EOF\n{script}EOF"),
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn kill_netns_pids(ns: &str) {
    if let Ok(out) = run_ok("ip", &["netns", "pids", ns]) {
        for pid in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2); the pid was listed as living in our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = fs::File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(io_err(format!("seek {} to {offset}", path.display())))?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f
            .read(&mut buf[got..])
            .map_err(io_err(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

/// Compare two data areas chunk by chunk: None when equal (same size and
/// bytes), else the first differing offset (the shorter size when only the
/// sizes differ).
pub fn compare_areas(a: &DataArea, b: &DataArea) -> Result<Option<u64>> {
    const CHUNK: usize = 1 << 20;
    let size = a.size.min(b.size);
    let mut off = 0u64;
    while off < size {
        let len = usize::try_from((size - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        let x = read_at(&a.path, a.offset.saturating_add(off), len)?;
        let y = read_at(&b.path, b.offset.saturating_add(off), len)?;
        if x != y {
            let pos = x.iter().zip(y.iter()).position(|(p, q)| p != q);
            let pos = pos.unwrap_or(x.len().min(y.len()));
            return Ok(Some(off + pos as u64));
        }
        off += len as u64;
    }
    if a.size != b.size {
        return Ok(Some(size));
    }
    Ok(None)
}

/// The `json:{...}` qemu image spec of a data area (raw driver, offset, size).
pub fn qemu_spec(a: &DataArea) -> String {
    let path = a
        .path
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!(
        "json:{{\"driver\":\"raw\",\"offset\":{},\"size\":{},\"file\":{{\"driver\":\"file\",\"filename\":\"{path}\"}}}}",
        a.offset, a.size
    )
}

fn num_before_paren(v: &str) -> std::result::Result<u64, String> {
    let first = v.split_whitespace().next().unwrap_or("");
    first
        .parse::<u64>()
        .map_err(|_| format!("expected a number, got {v:?}"))
}

/// Parse `hastctl list` output.
pub fn parse_list(text: &str) -> std::result::Result<Vec<ResourceStatus>, String> {
    let mut out: Vec<ResourceStatus> = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            let name = line
                .strip_suffix(':')
                .ok_or_else(|| format!("resource line without ':': {line:?}"))?;
            out.push(ResourceStatus {
                name: name.into(),
                ..Default::default()
            });
            continue;
        }
        let cur = out
            .last_mut()
            .ok_or_else(|| format!("line before any resource: {line:?}"))?;
        let t = line.trim();
        let (k, v) = match t.split_once(": ") {
            Some((k, v)) => (k, v),
            None => (t.trim_end_matches(':'), ""),
        };
        cur.raw.insert(k.to_string(), v.to_string());
        match k {
            "error" => cur.error = Some(v.parse().map_err(|_| format!("bad error {v:?}"))?),
            "role" => cur.role = v.into(),
            "provname" => cur.provname = v.into(),
            "localpath" => cur.localpath = v.into(),
            "extentsize" => cur.extentsize = num_before_paren(v)?,
            "keepdirty" => cur.keepdirty = num_before_paren(v)?,
            "remoteaddr" => cur.remoteaddr = v.into(),
            "sourceaddr" => cur.sourceaddr = Some(v.into()),
            "replication" => cur.replication = v.into(),
            "status" => cur.status = Some(v.into()),
            "workerpid" => {
                cur.workerpid = Some(v.parse().map_err(|_| format!("bad workerpid {v:?}"))?)
            }
            "dirty" => cur.dirty = num_before_paren(v)?,
            "reads" => cur.stats.reads = num_before_paren(v)?,
            "writes" => cur.stats.writes = num_before_paren(v)?,
            "deletes" => cur.stats.deletes = num_before_paren(v)?,
            "flushes" => cur.stats.flushes = num_before_paren(v)?,
            "activemap updates" => cur.stats.activemap_updates = num_before_paren(v)?,
            "local errors" => {
                let [read, write, delete, flush] =
                    parse_fields(v, ["read", "write", "delete", "flush"])?;
                cur.stats.read_errors = read;
                cur.stats.write_errors = write;
                cur.stats.delete_errors = delete;
                cur.stats.flush_errors = flush;
            }
            "queues" => {
                let [local, send, recv, done, idle] =
                    parse_fields(v, ["local", "send", "recv", "done", "idle"])?;
                cur.queues = Queues {
                    idle,
                    local,
                    send,
                    recv,
                    done,
                };
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Parse `a: 1, b: 2, ...` with exactly the keys `keys` in order.
fn parse_fields<const N: usize>(v: &str, keys: [&str; N]) -> std::result::Result<[u64; N], String> {
    let mut out = [0u64; N];
    let parts: Vec<&str> = v.split(", ").collect();
    if parts.len() != N {
        return Err(format!("expected {N} fields in {v:?}"));
    }
    for ((slot, part), key) in out.iter_mut().zip(parts).zip(keys) {
        let (k, n) = part
            .split_once(": ")
            .ok_or_else(|| format!("bad field {part:?}"))?;
        if k != key {
            return Err(format!("expected field {key:?}, got {k:?}"));
        }
        *slot = n.parse().map_err(|_| format!("bad number in {part:?}"))?;
    }
    Ok(out)
}

/// Parse `hastctl status` output.
pub fn parse_status(text: &str) -> std::result::Result<Vec<StatusLine>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if n == 0 {
            if !line.starts_with("Name\tStatus") {
                return Err(format!("bad header {line:?}"));
            }
            continue;
        }
        let (name, rest) = line
            .split_once('\t')
            .ok_or_else(|| format!("no tab after the name: {line:?}"))?;
        if rest.starts_with("ERR") {
            out.push(StatusLine {
                name: name.into(),
                status: rest.trim().into(),
                role: String::new(),
                local: String::new(),
                remote: String::new(),
            });
            continue;
        }
        let (cols, remote) = rest
            .rsplit_once('\t')
            .ok_or_else(|| format!("no tab before the remote address: {line:?}"))?;
        let mut w = cols.split_whitespace();
        let status = w.next().ok_or_else(|| format!("no status: {line:?}"))?;
        let role = w.next().ok_or_else(|| format!("no role: {line:?}"))?;
        let local: Vec<&str> = w.collect();
        out.push(StatusLine {
            name: name.into(),
            status: status.into(),
            role: role.into(),
            local: local.join(" "),
            remote: remote.into(),
        });
    }
    Ok(out)
}

/// Parse `hastctl dump` output of one resource.
pub fn parse_dump(text: &str) -> std::result::Result<Dump, String> {
    let mut d = Dump::default();
    let mut seen = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim();
        let Some((k, v)) = t.split_once(": ") else {
            continue;
        };
        seen.insert(k.to_string());
        match k {
            "resource" => d.resource = v.into(),
            "datasize" => d.datasize = num_before_paren(v)?,
            "extentsize" => d.extentsize = num_before_paren(v)?,
            "keepdirty" => d.keepdirty = num_before_paren(v)?,
            "localoff" => d.localoff = num_before_paren(v)?,
            "resuid" => d.resuid = num_before_paren(v)?,
            "localcnt" => d.localcnt = num_before_paren(v)?,
            "remotecnt" => d.remotecnt = num_before_paren(v)?,
            "prevrole" => d.prevrole = v.into(),
            "inconsistent" => d.inconsistent = v.starts_with("yes"),
            _ => {}
        }
    }
    for k in ["resource", "datasize", "localoff"] {
        if !seen.contains(k) {
            return Err(format!("no {k:?} line"));
        }
    }
    Ok(d)
}

/// Remove leftovers of harness runs whose process is gone: daemons (found
/// by a `/hastt-<pid>-` path in their command line, and in namespaces),
/// namespaces `hastt-<pid>-*`, nft tables `hastt_<pid>_*`, temporary
/// directories `hastt-<pid>-*`. Runs once per process from `build`;
/// returns what was removed. Leftovers of live processes are never touched.
pub fn sweep() -> Vec<String> {
    let mut removed = Vec::new();
    let dead = |pid: &str| -> bool {
        match pid.parse::<i32>() {
            Ok(p) if p > 0 => matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None),
                Err(nix::errno::Errno::ESRCH)
            ),
            _ => false,
        }
    };
    let owner = |name: &str, sep: char| -> Option<String> {
        let rest = name.strip_prefix(PREFIX)?.strip_prefix(sep)?;
        rest.split(sep).next().map(str::to_string)
    };
    // Power-loss mounts of dead runs (before their directories go).
    for m in crate::power::mounts() {
        let marker = format!("/{PREFIX}-");
        if let Some(pos) = m.find(&marker) {
            let owner_pid: String = m[pos + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if dead(&owner_pid) {
                crate::power::lazy_unmount(Path::new(&m));
                removed.push(format!("mount {m}"));
            }
        }
    }
    // Daemons of dead runs.
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if !cmd.contains("hastd") {
                continue;
            }
            let marker = format!("/{PREFIX}-");
            if let Some(pos) = cmd.find(&marker) {
                let owner_pid: String = cmd[pos + marker.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if dead(&owner_pid) {
                    // SAFETY: kill(2) of a hastd left by a harness run that is gone.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    removed.push(format!("process {pid} ({})", cmd.trim()));
                }
            }
        }
    }
    if is_root() {
        if let Ok(out) = run_ok("ip", &["netns", "list"]) {
            for line in out.lines() {
                let name = line.split_whitespace().next().unwrap_or("");
                if owner(name, '-').is_some_and(|p| dead(&p)) {
                    kill_netns_pids(name);
                    if run_ok("ip", &["netns", "del", name]).is_ok() {
                        removed.push(format!("netns {name}"));
                    }
                }
            }
        }
        if let Ok(out) = run_ok("ip", &["-o", "link", "show"]) {
            for line in out.lines() {
                let name = line
                    .split(": ")
                    .nth(1)
                    .and_then(|n| n.split('@').next())
                    .unwrap_or("");
                if owner(name, '-').is_some_and(|p| dead(&p))
                    && run_ok("ip", &["link", "del", name]).is_ok()
                {
                    removed.push(format!("link {name}"));
                }
            }
        }
        if let Ok(out) = run_ok("nft", &["list", "tables"]) {
            for line in out.lines() {
                let w: Vec<&str> = line.split_whitespace().collect();
                if let [_, family, name] = w.as_slice() {
                    if owner(name, '_').is_some_and(|p| dead(&p))
                        && run_ok("nft", &["delete", "table", family, name]).is_ok()
                    {
                        removed.push(format!("nft table {family} {name}"));
                    }
                }
            }
        }
    }
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name, '-').is_some_and(|p| dead(&p)) && fs::remove_dir_all(e.path()).is_ok() {
                removed.push(format!("directory {}", e.path().display()));
            }
        }
    }
    removed
}

impl fmt::Display for ResourceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: role {} status {} dirty {} writes {} reads {}",
            self.name,
            self.role,
            self.status.as_deref().unwrap_or("-"),
            self.dirty,
            self.stats.writes,
            self.stats.reads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parses() {
        let t = "r0:\n  role: primary\n  provname: r0\n  localpath: /tmp/x.img\n  extentsize: 2097152 (2.0MB)\n  keepdirty: 64\n  remoteaddr: tcp4://127.0.0.2:5000\n  sourceaddr: tcp4://127.0.0.1\n  replication: memsync\n  status: degraded\n  workerpid: 42\n  dirty: 4194304 (4.0MB)\n  statistics:\n    reads: 3\n    writes: 7\n    deletes: 0\n    flushes: 1\n    activemap updates: 2\n    local errors: read: 0, write: 1, delete: 0, flush: 0\n    queues: local: 0, send: 0, recv: 0, done: 0, idle: 5\n";
        let v = parse_list(t).unwrap();
        assert_eq!(v.len(), 1);
        let r = &v[0];
        assert_eq!(r.role, "primary");
        assert_eq!(r.extentsize, 2097152);
        assert_eq!(r.status.as_deref(), Some("degraded"));
        assert_eq!(r.workerpid, Some(42));
        assert_eq!(r.dirty, 4194304);
        assert_eq!(r.stats.writes, 7);
        assert_eq!(
            (
                r.stats.read_errors,
                r.stats.write_errors,
                r.stats.delete_errors,
                r.stats.flush_errors
            ),
            (0, 1, 0, 0)
        );
        assert_eq!(r.queues.idle, 5);
        assert_eq!(r.sourceaddr.as_deref(), Some("tcp4://127.0.0.1"));
        assert!(!r.synchronizing());
        assert!(!r.in_sync(), "degraded is not in sync");
    }

    #[test]
    fn a_finishing_resync_is_not_in_sync() {
        let head = "r0:\n  role: primary\n  status: complete\n  dirty: 0 (0B)\n";
        let sync =
            "  synchronization: 100.0% done, 4194304 of 4194304 bytes, 4.0MB/s, 0:00:00 left\n";
        let v = parse_list(&format!("{head}{sync}")).unwrap();
        assert!(v[0].synchronizing());
        assert!(!v[0].in_sync());
        let v = parse_list(head).unwrap();
        assert!(v[0].in_sync());
    }
}

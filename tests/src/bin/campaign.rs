//! campaign: seeded random faults against a pair of real hastd nodes in
//! network namespaces, their providers on power-loss disks, under a
//! stamped-block workload with flushes and overlapping writes in flight
//! (the ledger, [`hast_tests::ledger`]). Faults: kill -9 and power cuts of
//! either node (during writes and during a resynchronization), partitions
//! of random length (link down or nft drop), restarts with SIGTERM, local
//! disk errors (fail points), role swaps, and combinations. After each
//! fault the pair is recovered the way the manual pages tell a user to,
//! every write that must survive is checked through the primary's export,
//! and once the pair is in sync again both data areas are compared.
//!
//! ```text
//! campaign [--faults N] [--seed S] [--size MIB] [--only KIND]
//! ```
//! `--only` keeps the faults of one kind (`failback-pull`,
//! `power-secondary-resync`, ...: see `Fault::kind`), to look at one.
//! One line per fault; the last line is
//! `faults N, acked W, lost L, corrupt C, divergent D`. Exit status 0 when
//! nothing was lost, corrupt or divergent and every fault recovered, 1
//! otherwise, 2 on a usage or setup error. Root and /dev/fuse are needed.
//! The same seed replays the same faults (their timing on a busy machine
//! may differ).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use hast_tests::checker::NbdClient;
use hast_tests::cluster::{Cluster, Mode, PartitionKind};
use hast_tests::ledger::{Ledger, SegmentOptions};
use hast_tests::power::Loss;

const RES: &str = "r0";
const BLOCK: u32 = 4096;
/// Faults per pair; each new pair takes the next replication mode.
const FAULTS_PER_PAIR: u64 = 7;
const MODES: [&str; 3] = ["fullsync", "memsync", "async"];
/// How long the pair may take to be in sync again.
const SYNC_LIMIT: Duration = Duration::from_secs(180);
const T: Duration = Duration::from_secs(60);

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The campaign's random choices, from one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, permille: u64) -> bool {
        self.below(1000) < permille
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
    fn loss(&mut self) -> Loss {
        if self.chance(400) {
            Loss::All
        } else {
            Loss::Random {
                seed: self.next(),
                permille: (100 + self.below(900)) as u16,
            }
        }
    }
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillPrimary {
        failover: bool,
    },
    KillSecondary,
    PowerPrimary {
        failover: bool,
        loss: Loss,
    },
    PowerSecondary {
        loss: Loss,
    },
    PowerSecondaryResync {
        loss: Loss,
    },
    PowerPrimaryResync {
        loss: Loss,
    },
    KillPrimaryResync,
    PowerBoth {
        loss: Loss,
    },
    Partition {
        kind: PartitionKind,
        ms: u64,
    },
    PartitionPowerSecondary {
        loss: Loss,
        ms: u64,
    },
    Restart {
        primary: bool,
    },
    SecondaryDiskError {
        ms: u64,
    },
    PrimaryReadError,
    RoleSwap,
    /// The primary dies and the secondary takes over and writes; it stops
    /// too, the old primary comes back first as primary (its peer is
    /// unreachable), so it pulls the newer data when the other returns as
    /// secondary; its power goes during that synchronization.
    FailbackPull {
        loss: Loss,
    },
}

impl Fault {
    fn pick(r: &mut Rng) -> Fault {
        match r.below(100) {
            0..=9 => Fault::KillPrimary {
                failover: r.chance(600),
            },
            10..=19 => Fault::KillSecondary,
            20..=32 => Fault::PowerPrimary {
                failover: r.chance(500),
                loss: r.loss(),
            },
            33..=40 => Fault::PowerSecondary { loss: r.loss() },
            41..=50 => Fault::PowerSecondaryResync { loss: r.loss() },
            51..=53 => Fault::PowerPrimaryResync { loss: r.loss() },
            54..=55 => Fault::KillPrimaryResync,
            56..=57 => Fault::PowerBoth { loss: r.loss() },
            58..=79 => Fault::Partition {
                kind: if r.chance(500) {
                    PartitionKind::LinkDown
                } else {
                    PartitionKind::Drop
                },
                ms: 300 + r.below(8000),
            },
            80..=82 => Fault::PartitionPowerSecondary {
                loss: r.loss(),
                ms: 300 + r.below(3000),
            },
            83..=88 => Fault::Restart {
                primary: r.chance(500),
            },
            89..=92 => Fault::SecondaryDiskError {
                ms: 200 + r.below(2000),
            },
            93..=94 => Fault::PrimaryReadError,
            95 => Fault::FailbackPull { loss: r.loss() },
            _ => Fault::RoleSwap,
        }
    }

    /// The kind, for `--only`.
    fn kind(&self) -> &'static str {
        match self {
            Fault::KillPrimary { .. } => "kill-primary",
            Fault::KillSecondary => "kill-secondary",
            Fault::PowerPrimary { .. } => "power-primary",
            Fault::PowerSecondary { .. } => "power-secondary",
            Fault::PowerSecondaryResync { .. } => "power-secondary-resync",
            Fault::PowerPrimaryResync { .. } => "power-primary-resync",
            Fault::KillPrimaryResync => "kill-primary-resync",
            Fault::PowerBoth { .. } => "power-both",
            Fault::Partition { .. } => "partition",
            Fault::PartitionPowerSecondary { .. } => "partition-power-secondary",
            Fault::Restart { .. } => "restart",
            Fault::SecondaryDiskError { .. } => "secondary-disk-error",
            Fault::PrimaryReadError => "primary-read-error",
            Fault::RoleSwap => "role-swap",
            Fault::FailbackPull { .. } => "failback-pull",
        }
    }

    fn name(&self) -> String {
        let loss = |l: &Loss| match l {
            Loss::All => "all".to_string(),
            Loss::Random { permille, .. } => format!("{permille}\u{2030}"),
        };
        match self {
            Fault::KillPrimary { failover } => {
                format!(
                    "kill -9 primary, {}",
                    if *failover { "failover" } else { "restart" }
                )
            }
            Fault::KillSecondary => "kill -9 secondary".into(),
            Fault::PowerPrimary { failover, loss: l } => format!(
                "power cut primary ({} lost), {}",
                loss(l),
                if *failover { "failover" } else { "restart" }
            ),
            Fault::PowerSecondary { loss: l } => format!("power cut secondary ({} lost)", loss(l)),
            Fault::PowerSecondaryResync { loss: l } => {
                format!("power cut secondary during resync ({} lost)", loss(l))
            }
            Fault::PowerPrimaryResync { loss: l } => {
                format!("power cut primary during resync ({} lost)", loss(l))
            }
            Fault::KillPrimaryResync => "kill -9 primary during resync".into(),
            Fault::PowerBoth { loss: l } => format!("power cut of both ({} lost)", loss(l)),
            Fault::Partition { kind, ms } => format!("partition {kind:?} {ms} ms"),
            Fault::PartitionPowerSecondary { loss: l, ms } => {
                format!("partition {ms} ms + power cut secondary ({} lost)", loss(l))
            }
            Fault::Restart { primary } => format!(
                "SIGTERM restart of the {}",
                if *primary { "primary" } else { "secondary" }
            ),
            Fault::SecondaryDiskError { ms } => format!("secondary disk write errors {ms} ms"),
            Fault::PrimaryReadError => "primary disk read errors during the check".into(),
            Fault::RoleSwap => "role swap".into(),
            Fault::FailbackPull { loss: l } => format!(
                "kill -9 primary, failover, both down, old primary back first and pulling, its power cut ({} lost)",
                loss(l)
            ),
        }
    }
}

/// Totals for the summary.
#[derive(Default)]
struct Totals {
    faults: u64,
    acked: u64,
    lost: u64,
    corrupt: u64,
    divergent: u64,
    /// Faults the pair did not recover from (not in sync in time, a
    /// command that failed).
    failed: u64,
    power_secondary: u64,
    power_secondary_resync: u64,
    power_primary_sync_modes: u64,
    power_primary: u64,
    partitions: u64,
    kills: u64,
}

/// The pair under test and what it knows.
struct Pair {
    c: Cluster,
    mode: &'static str,
    primary: String,
    secondary: String,
    ledger: Ledger,
    acked_before: u64,
}

type Res<T> = Result<T, String>;

fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl Pair {
    fn new(mode: &'static str, size_mib: u64, run: u64) -> Res<Pair> {
        let mut c = Cluster::builder(Mode::Netns)
            .resource(RES, size_mib << 20)
            .replication(mode)
            .timeout(4)
            .create_args(&["-e", "512K"])
            .power_loss(true)
            .build()
            .map_err(e2s)?;
        c.start_all().map_err(e2s)?;
        c.role("beta", RES, "secondary").map_err(e2s)?;
        c.role("alpha", RES, "primary").map_err(e2s)?;
        c.wait_list("alpha", RES, T, |s| s.in_sync()).map_err(e2s)?;
        let datasize = c.data_area("alpha", RES).map_err(e2s)?.size;
        let ledger = Ledger::new(run, BLOCK, 0, datasize / u64::from(BLOCK)).map_err(e2s)?;
        Ok(Pair {
            c,
            mode,
            primary: "alpha".into(),
            secondary: "beta".into(),
            ledger,
            acked_before: 0,
        })
    }

    fn swap(&mut self) {
        std::mem::swap(&mut self.primary, &mut self.secondary);
    }

    /// Run a workload segment against the primary for about `d`, while
    /// `during` runs on this thread (the fault); the segment ends early
    /// when the fault breaks its connection.
    fn with_workload<T>(
        &mut self,
        r: &mut Rng,
        d: Duration,
        during: impl FnOnce(&mut Cluster, &str, &str) -> Res<T>,
    ) -> Res<T> {
        let uri = self.c.nbd_uri(&self.primary, RES).map_err(e2s)?;
        let opts = SegmentOptions {
            queue_depth: 4 + r.below(13) as usize,
            duration: d,
            flush_every: 10 + r.below(120),
            overlap_permille: r.below(200),
            reply_timeout: Duration::from_secs(30),
            seed: r.next(),
            ..SegmentOptions::default()
        };
        let ledger = &mut self.ledger;
        let (p, s) = (self.primary.clone(), self.secondary.clone());
        let c = &mut self.c;
        std::thread::scope(|scope| {
            let w = scope.spawn(move || -> Res<()> {
                let mut client = connect(&uri)?;
                ledger.run(&mut client, &opts).map_err(e2s)?;
                client.disconnect();
                Ok(())
            });
            let out = during(c, &p, &s);
            let wr = w
                .join()
                .map_err(|_| "the workload thread panicked".to_string())?;
            let out = out?;
            wr?;
            Ok(out)
        })
    }

    /// Stopped or cut secondary `s` back: start hastd, role secondary.
    fn secondary_back(&mut self) -> Res<()> {
        let s = self.secondary.clone();
        if !self.c.running(&s) {
            self.c.start(&s).map_err(e2s)?;
        }
        self.c.role(&s, RES, "secondary").map_err(e2s)
    }

    /// The primary `p` is gone (killed or cut): make the secondary primary,
    /// and the old primary its secondary.
    fn failover(&mut self) -> Res<()> {
        let (p, s) = (self.primary.clone(), self.secondary.clone());
        self.c.role(&s, RES, "primary").map_err(e2s)?;
        self.swap();
        self.c.start(&p).map_err(e2s)?;
        self.c.role(&p, RES, "secondary").map_err(e2s)
    }

    /// The primary `p` is gone: start it again as primary.
    fn primary_back(&mut self) -> Res<()> {
        let p = self.primary.clone();
        if !self.c.running(&p) {
            self.c.start(&p).map_err(e2s)?;
        }
        self.c.role(&p, RES, "primary").map_err(e2s)
    }

    /// Dirty extents to resynchronize: the secondary goes away, the
    /// primary writes alone, the secondary comes back; returns once the
    /// resynchronization shows progress (or ended already: false).
    fn start_resync(&mut self, r: &mut Rng) -> Res<bool> {
        let s = self.secondary.clone();
        self.c.stop(&s).map_err(e2s)?;
        let d = r.millis(800, 2000);
        self.with_workload(r, d, |_, _, _| Ok(()))?;
        self.secondary_back()?;
        let p = self.primary.clone();
        let mut seen = false;
        let start = Instant::now();
        while start.elapsed() < T {
            let st = self.c.list_res(&p, RES).map_err(e2s)?;
            if st.synchronizing() {
                seen = true;
                // Somewhere in the middle (a small device's resync is
                // over in a fraction of a second).
                std::thread::sleep(r.millis(0, 30));
                break;
            }
            if st.in_sync() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(seen)
    }

    /// Inject `f` and recover; returns a note for the fault's line.
    fn inject(&mut self, f: Fault, r: &mut Rng, t: &mut Totals) -> Res<String> {
        let seg = r.millis(800, 2500);
        let at = r.millis(200, 1500).min(seg);
        let seg_start = self.ledger.now();
        let async_mode = self.mode == "async";
        let mut note = String::new();
        match f {
            Fault::KillPrimary { failover } => {
                t.kills += 1;
                self.with_workload(r, seg, |c, p, _| {
                    std::thread::sleep(at);
                    c.kill9(p).map(drop).map_err(e2s)
                })?;
                if failover {
                    if async_mode {
                        self.ledger.excuse_since(seg_start);
                    }
                    self.failover()?;
                } else {
                    self.primary_back()?;
                }
            }
            Fault::KillSecondary => {
                t.kills += 1;
                self.with_workload(r, seg, |c, _, s| {
                    std::thread::sleep(at);
                    c.kill9(s).map(drop).map_err(e2s)
                })?;
                self.secondary_back()?;
            }
            Fault::PowerPrimary { failover, loss } => {
                t.power_primary += 1;
                if self.mode != "async" {
                    t.power_primary_sync_modes += 1;
                }
                let cut = self.with_workload(r, seg, |c, p, _| {
                    std::thread::sleep(at);
                    c.power_cut(p, loss).map_err(e2s)
                })?;
                note = format!("lost {} kept {} units", cut.lost, cut.kept);
                if failover {
                    if async_mode {
                        self.ledger.excuse_since(seg_start);
                    }
                    self.failover()?;
                } else {
                    self.ledger.excuse_unflushed();
                    self.primary_back()?;
                }
            }
            Fault::PowerSecondary { loss } => {
                t.power_secondary += 1;
                let cut = self.with_workload(r, seg, |c, _, s| {
                    std::thread::sleep(at);
                    c.power_cut(s, loss).map_err(e2s)
                })?;
                note = format!("lost {} kept {} units", cut.lost, cut.kept);
                self.secondary_back()?;
            }
            Fault::PowerSecondaryResync { loss } => {
                t.power_secondary += 1;
                let seen = self.start_resync(r)?;
                let s = self.secondary.clone();
                let cut = self.c.power_cut(&s, loss).map_err(e2s)?;
                // It cut into the resync if the secondary still had some
                // of it in its cache.
                let during = seen && cut.lost + cut.kept > 0;
                if during {
                    t.power_secondary_resync += 1;
                }
                note = format!(
                    "{}lost {} kept {} units",
                    if during { "" } else { "resync ended first; " },
                    cut.lost,
                    cut.kept
                );
                self.secondary_back()?;
            }
            Fault::PowerPrimaryResync { loss } => {
                t.power_primary += 1;
                if self.mode != "async" {
                    t.power_primary_sync_modes += 1;
                }
                let during = self.start_resync(r)?;
                let p = self.primary.clone();
                let cut = self.c.power_cut(&p, loss).map_err(e2s)?;
                note = format!(
                    "{}lost {} kept {} units",
                    if during { "" } else { "resync ended first; " },
                    cut.lost,
                    cut.kept
                );
                // The secondary's copy is inconsistent: the primary comes
                // back, with what its disk kept.
                self.ledger.excuse_unflushed();
                self.primary_back()?;
            }
            Fault::KillPrimaryResync => {
                t.kills += 1;
                let during = self.start_resync(r)?;
                if !during {
                    note = "resync ended first".into();
                }
                let p = self.primary.clone();
                self.c.kill9(&p).map_err(e2s)?;
                self.primary_back()?;
            }
            Fault::PowerBoth { loss } => {
                t.power_primary += 1;
                t.power_secondary += 1;
                if self.mode != "async" {
                    t.power_primary_sync_modes += 1;
                }
                let loss2 = r.loss();
                let (a, b) = self.with_workload(r, seg, |c, p, s| {
                    std::thread::sleep(at);
                    let a = c.power_cut(s, loss2).map_err(e2s)?;
                    let b = c.power_cut(p, loss).map_err(e2s)?;
                    Ok((a, b))
                })?;
                note = format!("secondary lost {}, primary lost {} units", a.lost, b.lost);
                self.ledger.excuse_unflushed();
                self.secondary_back()?;
                self.primary_back()?;
            }
            Fault::Partition { kind, ms } => {
                t.partitions += 1;
                self.with_workload(r, seg.max(Duration::from_millis(ms)), |c, p, s| {
                    std::thread::sleep(at);
                    c.partition_with(p, s, kind).map_err(e2s)?;
                    std::thread::sleep(Duration::from_millis(ms));
                    c.heal(p, s).map_err(e2s)
                })?;
            }
            Fault::PartitionPowerSecondary { loss, ms } => {
                t.partitions += 1;
                t.power_secondary += 1;
                let cut = self.with_workload(r, seg, |c, p, s| {
                    std::thread::sleep(at);
                    c.partition_with(p, s, PartitionKind::LinkDown)
                        .map_err(e2s)?;
                    std::thread::sleep(Duration::from_millis(ms));
                    let cut = c.power_cut(s, loss).map_err(e2s)?;
                    c.heal(p, s).map_err(e2s)?;
                    Ok(cut)
                })?;
                note = format!("lost {} kept {} units", cut.lost, cut.kept);
                self.secondary_back()?;
            }
            Fault::Restart { primary } => {
                self.with_workload(r, seg, |c, p, s| {
                    std::thread::sleep(at);
                    c.stop(if primary { p } else { s }).map(drop).map_err(e2s)
                })?;
                if primary {
                    self.primary_back()?;
                } else {
                    self.secondary_back()?;
                }
            }
            Fault::SecondaryDiskError { ms } => {
                self.with_workload(r, seg.max(Duration::from_millis(ms)), |c, _, s| {
                    std::thread::sleep(at);
                    c.failpoint(s, hast::failpoint::SECONDARY_WRITE, true);
                    std::thread::sleep(Duration::from_millis(ms));
                    c.failpoint(s, hast::failpoint::SECONDARY_WRITE, false);
                    Ok(())
                })?;
            }
            Fault::PrimaryReadError => {
                // Writes first; the check below reads through the peer.
                self.with_workload(r, seg, |_, _, _| Ok(()))?;
                let p = self.primary.clone();
                self.c.failpoint(&p, hast::failpoint::PRIMARY_READ, true);
            }
            Fault::FailbackPull { loss } => {
                t.kills += 1;
                t.power_primary += 1;
                if self.mode != "async" {
                    t.power_primary_sync_modes += 1;
                }
                self.with_workload(r, seg, |c, p, _| {
                    std::thread::sleep(at);
                    c.kill9(p).map(drop).map_err(e2s)
                })?;
                if async_mode {
                    self.ledger.excuse_since(seg_start);
                }
                let (p, s) = (self.primary.clone(), self.secondary.clone());
                // The secondary takes over and writes alone.
                self.c.role(&s, RES, "primary").map_err(e2s)?;
                self.swap();
                let d = r.millis(800, 1500);
                self.with_workload(r, d, |_, _, _| Ok(()))?;
                self.c.stop(&s).map_err(e2s)?;
                // The old primary first, as primary: its peer is down.
                self.c.start(&p).map_err(e2s)?;
                self.c.role(&p, RES, "primary").map_err(e2s)?;
                self.c.start(&s).map_err(e2s)?;
                self.c.role(&s, RES, "secondary").map_err(e2s)?;
                self.swap();
                let mut seen = false;
                let start = Instant::now();
                while start.elapsed() < T {
                    let st = self.c.list_res(&p, RES).map_err(e2s)?;
                    if st.synchronizing() {
                        seen = true;
                        std::thread::sleep(r.millis(0, 30));
                        break;
                    }
                    if st.in_sync() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let cut = self.c.power_cut(&p, loss).map_err(e2s)?;
                self.c.start(&p).map_err(e2s)?;
                // As hastctl(8) says: a copy whose synchronization from
                // the peer did not finish is not promoted; the peer is,
                // and synchronizes it.
                let promoted = self.c.hastctl(&p, &["role", "primary", RES]).map_err(e2s)?;
                note = format!(
                    "{}lost {} kept {} units; promotion of the cut node: exit {}",
                    if seen { "" } else { "pull ended first; " },
                    cut.lost,
                    cut.kept,
                    promoted.code
                );
                if promoted.code != 0 {
                    self.c.role(&p, RES, "secondary").map_err(e2s)?;
                    self.c.role(&s, RES, "primary").map_err(e2s)?;
                    self.swap();
                }
            }
            Fault::RoleSwap => {
                self.with_workload(r, seg, |c, p, _| {
                    std::thread::sleep(at);
                    c.role(p, RES, "secondary").map_err(e2s)
                })?;
                let s = self.secondary.clone();
                self.c.role(&s, RES, "primary").map_err(e2s)?;
                self.swap();
            }
        }
        Ok(note)
    }

    /// Check what must survive through the primary's export.
    fn check(&mut self) -> Res<hast_tests::ledger::LedgerReport> {
        let p = self.primary.clone();
        // Until the first connection attempt is over the export waits.
        let uri = self.c.nbd_uri(&p, RES).map_err(e2s)?;
        let mut client = connect(&uri)?;
        let r = self.ledger.verify_export(&mut client).map_err(e2s)?;
        client.disconnect();
        Ok(r)
    }
}

/// Keep the logs, the configuration and the providers' backing files of
/// a failed fault in `$CAMPAIGN_KEEP` (default /tmp) under
/// `campaign-<seed>-fault<i>`; what it says about it.
fn post_mortem(c: &mut Cluster, seed: u64, i: u64) -> String {
    let base = std::env::var_os("CAMPAIGN_KEEP").map_or_else(std::env::temp_dir, Into::into);
    let dest = base.join(format!("campaign-{seed}-fault{i}"));
    let _ = std::fs::create_dir_all(&dest);
    for node in c.node_names() {
        let list = c
            .hastctl(&node, &["list"])
            .map(|o| format!("{}{}", o.stdout, o.stderr))
            .unwrap_or_else(|e| e.to_string());
        let _ = std::fs::write(dest.join(format!("list-{node}.txt")), list);
    }
    c.teardown();
    let src = c.dir().to_path_buf();
    let ok = std::fs::create_dir_all(&dest).is_ok()
        && std::process::Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(format!("{}/.", src.display()))
            .arg(&dest)
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        format!("logs, hast.conf and disks kept in {}", dest.display())
    } else {
        format!("could not keep {} in {}", src.display(), dest.display())
    }
}

/// Connect to the export at `uri`, which a new primary may open a moment
/// after its role changed.
fn connect(uri: &str) -> Res<NbdClient> {
    let start = Instant::now();
    loop {
        match NbdClient::connect_uri(uri) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > T => return Err(format!("connect to {uri}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn run(args: &[String]) -> Result<bool, String> {
    const USAGE: &str = "usage: campaign [--faults N] [--seed S] [--size MIB] [--only KIND]";
    let mut faults = 20u64;
    let mut seed = 1u64;
    let mut size = 32u64;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or(USAGE)?;
        if a == "--only" {
            only = Some(v.clone());
            continue;
        }
        let n: u64 = v
            .parse()
            .map_err(|_| format!("{a}: not a number: {v}\n{USAGE}"))?;
        match a.as_str() {
            "--faults" => faults = n,
            "--seed" => seed = n,
            "--size" => size = n,
            _ => return Err(USAGE.into()),
        }
    }
    if !hast_tests::cluster::is_root() || !hast_tests::power::fuse_available() {
        return Err("the campaign needs root (network namespaces) and /dev/fuse".into());
    }
    let started = Instant::now();
    println!("campaign: seed {seed}, {faults} faults, {size} MiB device");
    let mut r = Rng(seed);
    let mut t = Totals::default();
    let mut pair: Option<Pair> = None;
    let mut pairs = seed % 3;
    for i in 1..=faults {
        if pair.is_none() || (i - 1) % FAULTS_PER_PAIR == 0 {
            if let Some(old) = pair.take() {
                t.acked += old.ledger.acked();
            }
            let mode = MODES[(pairs % 3) as usize];
            pairs += 1;
            pair =
                Some(Pair::new(mode, size, r.next()).map_err(|e| format!("set up a pair: {e}"))?);
        }
        let Some(p) = pair.as_mut() else { break };
        let mut f = Fault::pick(&mut r);
        if let Some(k) = &only {
            let mut tries = 0;
            while f.kind() != k.as_str() {
                tries += 1;
                if tries > 100_000 {
                    return Err(format!("--only {k}: no such kind of fault"));
                }
                f = Fault::pick(&mut r);
            }
        }
        let t0 = Instant::now();
        t.faults += 1;
        let outcome = p.inject(f, &mut r, &mut t).and_then(|note| {
            let report = p.check()?;
            for node in p.c.node_names() {
                p.c.failpoint(&node, hast::failpoint::PRIMARY_READ, false);
            }
            let prim = p.primary.clone();
            let synced =
                p.c.wait_list(&prim, RES, SYNC_LIMIT, |s| s.in_sync())
                    .map_err(|e| format!("not in sync again: {e}"))?;
            let differ = p.c.compare_data(RES, "alpha", "beta").map_err(e2s)?;
            Ok((note, report, synced.dirty, differ))
        });
        let acked = p.ledger.acked();
        match outcome {
            Ok((note, report, _, differ)) => {
                t.lost += report.lost.len() as u64;
                t.corrupt += report.corrupt.len() as u64;
                if differ.is_some() {
                    t.divergent += 1;
                }
                let bad = !report.passed() || differ.is_some();
                println!(
                    "fault {i} [{}] {}{}: acked {} (+{}), lost {}, corrupt {}, {}, {:.1} s",
                    p.mode,
                    f.name(),
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({note})")
                    },
                    acked,
                    acked - p.acked_before,
                    report.lost.len(),
                    report.corrupt.len(),
                    match differ {
                        None => "data equal".to_string(),
                        Some(off) => format!("DIVERGENT at byte {off}"),
                    },
                    t0.elapsed().as_secs_f64()
                );
                if bad {
                    println!("  {report}");
                    println!("  {}", post_mortem(&mut p.c, seed, i));
                    t.acked += p.ledger.acked();
                    pair = None;
                } else {
                    p.ledger.settle();
                    p.acked_before = acked;
                }
            }
            Err(e) => {
                t.failed += 1;
                println!(
                    "fault {i} [{}] {}: NOT RECOVERED: {e} ({:.1} s)",
                    p.mode,
                    f.name(),
                    t0.elapsed().as_secs_f64()
                );
                println!("  {}", post_mortem(&mut p.c, seed, i));
                t.acked += p.ledger.acked();
                pair = None;
            }
        }
    }
    if let Some(p) = pair.take() {
        t.acked += p.ledger.acked();
    }
    println!(
        "power cuts: secondary {} ({} during resync), primary {} ({} in fullsync/memsync); partitions {}; kills {}; not recovered {}; seed {seed}; {:.0} s",
        t.power_secondary,
        t.power_secondary_resync,
        t.power_primary,
        t.power_primary_sync_modes,
        t.partitions,
        t.kills,
        t.failed,
        started.elapsed().as_secs_f64()
    );
    println!(
        "faults {}, acked {}, lost {}, corrupt {}, divergent {}",
        t.faults, t.acked, t.lost, t.corrupt, t.divergent
    );
    Ok(t.lost == 0 && t.corrupt == 0 && t.divergent == 0 && t.failed == 0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("campaign: {e}");
            ExitCode::from(2)
        }
    }
}

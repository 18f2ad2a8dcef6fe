//! hastctl: the Highly Available Storage control utility. `create` and
//! `dump` work on the local provider directly; `role`, `list` and `status`
//! talk to hastd over its control socket, and so do this project's
//! `events` and `reconnect`; `keygen` and `fingerprint` (extensions) make
//! and show a node's key pair for `security tls`. `--libxo` selects
//! machine-readable output ([`xo`], [`report`]).

mod report;
mod xo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Args, Parser, Subcommand};
use hast::config::{Config, HostIdentity, ResourceConfig, DEFAULT_CONFIG};
use hast::control;
use hast::control::role::RoleReply;
use hast::control::status::StatusReply;
use hast::events::{self, Record};
use hast::metadata::{self, Layout, Metadata};
use hast::nv::Nv;
use hast::provider::Provider;
use hast::role::Role;
use hast::size::{humanize, parse_size};
use hast::sysexits;

/// Highly Available Storage control utility.
#[derive(Debug, Parser)]
#[command(name = "hastctl", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Output style, as FreeBSD's libxo reads it: json, xml or text, with
    /// pretty or underscores (`--libxo json`, `--libxo=json,pretty`,
    /// `--libxo:JP`).
    #[arg(long, global = true, value_name = "options", value_parser = xo::parse)]
    libxo: Option<xo::Options>,
}

#[derive(Debug, Args)]
struct Common {
    /// Configuration file.
    #[arg(short = 'c', value_name = "config", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Print debugging information; repeat for more.
    #[arg(short = 'd', action = ArgAction::Count)]
    debug: u8,
    /// Act as node NAME: only `on NAME` blocks describe this host.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Initialize the local provider's metadata and activemap.
    Create {
        #[command(flatten)]
        common: Common,
        /// Extent size (K/M/G/T suffixes); default 2M.
        #[arg(short = 'e', value_name = "extentsize", value_parser = size_arg)]
        extentsize: Option<u64>,
        /// Number of extents kept dirty; default 64.
        #[arg(short = 'k', value_name = "keepdirty", value_parser = size_arg)]
        keepdirty: Option<u64>,
        /// Size of the provider to use (K/M/G/T suffixes); default the whole provider.
        #[arg(short = 'm', value_name = "mediasize", value_parser = size_arg)]
        mediasize: Option<u64>,
        #[arg(required = true, value_name = "name")]
        names: Vec<String>,
    },
    /// Change the role of resources: init, primary or secondary.
    Role {
        #[command(flatten)]
        common: Common,
        /// Become primary even when the peer is primary or holds newer data.
        #[arg(long)]
        force: bool,
        #[arg(value_name = "init|primary|secondary", value_parser = role_arg)]
        role: Role,
        #[arg(required = true, value_name = "all|name")]
        names: Vec<String>,
    },
    /// Print the state of resources, verbosely.
    List {
        #[command(flatten)]
        common: Common,
        #[arg(value_name = "all|name")]
        names: Vec<String>,
    },
    /// Print the state of resources, one line each.
    Status {
        #[command(flatten)]
        common: Common,
        #[arg(value_name = "all|name")]
        names: Vec<String>,
    },
    /// Print the metadata stored on the local provider.
    Dump {
        #[command(flatten)]
        common: Common,
        #[arg(value_name = "all|name")]
        names: Vec<String>,
    },
    /// Write a new key pair for `security tls` (mode 0600) and print its
    /// fingerprint, for the peer's `peerfingerprint`.
    Keygen {
        #[command(flatten)]
        common: Common,
        /// Replace the file if it exists.
        #[arg(short = 'f')]
        force: bool,
        /// The name in the certificate.
        #[arg(short = 'n', value_name = "name", default_value = "hast")]
        name: String,
        #[arg(value_name = "keyfile")]
        path: PathBuf,
    },
    /// Print the fingerprint of a key pair or certificate file.
    Fingerprint {
        #[command(flatten)]
        common: Common,
        #[arg(value_name = "keyfile|certfile")]
        path: PathBuf,
    },
    /// Print the state of resources, then their events as they happen.
    Events {
        #[command(flatten)]
        common: Common,
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
        /// Add the request counters and queues to the state.
        #[arg(long)]
        statistics: bool,
        #[arg(value_name = "all|name")]
        names: Vec<String>,
    },
    /// Make primaries try their peer now instead of at their next retry.
    Reconnect {
        #[command(flatten)]
        common: Common,
        #[arg(required = true, value_name = "all|name")]
        names: Vec<String>,
    },
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn role_arg(s: &str) -> Result<Role, String> {
    match s.parse::<Role>() {
        Ok(r @ (Role::Init | Role::Primary | Role::Secondary)) => Ok(r),
        _ => Err(format!(
            "invalid role {s:?} (expected init, primary or secondary)"
        )),
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(xo::normalize_args(std::env::args_os())) {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return exit(if usage { sysexits::EX_USAGE } else { 0 });
        }
    };
    let common = match &cli.cmd {
        Cmd::Create { common, .. }
        | Cmd::Role { common, .. }
        | Cmd::List { common, .. }
        | Cmd::Status { common, .. }
        | Cmd::Dump { common, .. }
        | Cmd::Keygen { common, .. }
        | Cmd::Fingerprint { common, .. }
        | Cmd::Events { common, .. }
        | Cmd::Reconnect { common, .. } => common,
    };
    let out = cli.libxo.unwrap_or_default();
    let level = match common.debug {
        0 => tracing::Level::WARN,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    // Key pairs need no configuration.
    match &cli.cmd {
        Cmd::Keygen {
            force, name, path, ..
        } => return exit(keygen(path, name, *force)),
        Cmd::Fingerprint { path, .. } => return exit(fingerprint(path)),
        _ => {}
    }
    let host = match &common.node {
        Some(n) => HostIdentity::node(n),
        None => HostIdentity::detect(),
    };
    let cfg = match Config::load(&common.config, &host) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return exit(e.exit_code());
        }
    };
    let code = match &cli.cmd {
        Cmd::Create {
            extentsize,
            keepdirty,
            mediasize,
            names,
            ..
        } => create(&cfg, names, *mediasize, *extentsize, *keepdirty),
        Cmd::Dump { names, .. } => dump(&cfg, names, &out),
        Cmd::Role {
            role, names, force, ..
        } => {
            let req = control::setrole_request(*role, names, *force);
            talk(&cfg, &req).map_or_else(|c| c, |nv| print_setrole(&nv, *role))
        }
        Cmd::List { names, .. } => {
            let req = control::status_request(&only_all_means_empty(names));
            talk(&cfg, &req).map_or_else(
                |c| c,
                |nv| match out.style {
                    xo::Style::Text => print_list(&nv),
                    _ => print_xo(&out, "list", &nv, report::list),
                },
            )
        }
        Cmd::Status { names, .. } => {
            let req = control::status_request(&only_all_means_empty(names));
            talk(&cfg, &req).map_or_else(
                |c| c,
                |nv| match out.style {
                    xo::Style::Text => print_status(&nv),
                    _ => print_xo(&out, "status", &nv, report::status),
                },
            )
        }
        Cmd::Events {
            names,
            now,
            statistics,
            ..
        } => watch_events(&cfg, names, *now, *statistics, &out),
        Cmd::Reconnect { names, .. } => {
            let req = control::reconnect_request(&only_all_means_empty(names));
            talk(&cfg, &req).map_or_else(|c| c, |nv| print_reconnect(&nv))
        }
        // Handled before the configuration is read.
        Cmd::Keygen { .. } | Cmd::Fingerprint { .. } => 0,
    };
    exit(code)
}

/// `hastctl keygen`: write a key pair, print its fingerprint.
fn keygen(path: &std::path::Path, name: &str, force: bool) -> i32 {
    match hast::security::keygen::write(path, name, force) {
        Ok(fp) => {
            println!("{fp}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            match e {
                hast::security::keygen::KeygenError::Exists { .. } => sysexits::EX_CANTCREAT,
                hast::security::keygen::KeygenError::Write { .. } => sysexits::EX_CANTCREAT,
                _ => sysexits::EX_SOFTWARE,
            }
        }
    }
}

/// `hastctl fingerprint`: the key fingerprint of a key pair (its
/// certificate's) or of the first certificate of a file.
fn fingerprint(path: &std::path::Path) -> i32 {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot read {}: {e}", path.display());
            return sysexits::EX_NOINPUT;
        }
    };
    match hast::security::tls::certificate_fingerprint(&bytes) {
        Ok(fp) => {
            println!("{fp}");
            0
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            sysexits::EX_DATAERR
        }
    }
}

fn only_all_means_empty(names: &[String]) -> Vec<String> {
    if names.len() == 1 && names[0] == "all" {
        Vec::new()
    } else {
        names.to_vec()
    }
}

/// The resources named on the command line (or all of them), reporting
/// unknown names; the exit code so far is 65 (EX_DATAERR) if any was unknown.
fn select<'a>(
    cfg: &'a Config,
    names: &[String],
    all_allowed: bool,
) -> (Vec<&'a ResourceConfig>, i32) {
    if all_allowed && (names.is_empty() || (names.len() == 1 && names[0] == "all")) {
        return (cfg.resources.iter().collect(), 0);
    }
    let mut ec = 0;
    let mut out = Vec::new();
    for name in names {
        match cfg.resource(name) {
            Some(r) => out.push(r),
            None => {
                eprintln!("Unknown resource {name}.");
                if ec == 0 {
                    ec = sysexits::EX_DATAERR;
                }
            }
        }
    }
    (out, ec)
}

fn create(
    cfg: &Config,
    names: &[String],
    mediasize: Option<u64>,
    extentsize: Option<u64>,
    keepdirty: Option<u64>,
) -> i32 {
    let (resources, mut ec) = select(cfg, names, false);
    for res in resources {
        let r = create_one(res, mediasize, extentsize, keepdirty);
        if r != 0 && ec == 0 {
            ec = r;
        }
    }
    ec
}

fn create_one(
    res: &ResourceConfig,
    mediasize: Option<u64>,
    extentsize: Option<u64>,
    keepdirty: Option<u64>,
) -> i32 {
    let provider = match Provider::open(&res.local, true) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("[{}] {e}", res.name);
            return sysexits::EX_NOINPUT;
        }
    };
    let layout = match Layout::compute(
        provider.mediasize(),
        provider.sectorsize(),
        mediasize,
        extentsize,
        keepdirty,
    ) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("[{}] {e}", res.name);
            return e.exit_code();
        }
    };
    match metadata::create(&provider, &res.name, &layout) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("[{}] {e}", res.name);
            e.exit_code()
        }
    }
}

/// Exit status of `dump` when a provider cannot be read: FreeBSD's
/// dump_one returns metadata_read's -1, which exit() turns into 255.
const DUMP_FAILED: i32 = 255;

fn dump(cfg: &Config, names: &[String], out: &xo::Options) -> i32 {
    let (resources, mut ec) = select(cfg, names, true);
    let mut entries = Vec::new();
    for res in resources {
        let read = Provider::open(&res.local, false)
            .map_err(|e| e.to_string())
            .and_then(|p| Metadata::read(&p, &res.name).map_err(|e| e.to_string()));
        let r = match &read {
            Ok(md) => {
                if out.style == xo::Style::Text {
                    print!("{}", metadata::dump_text(md));
                }
                0
            }
            Err(e) => {
                eprintln!("[{}] {e}", res.name);
                DUMP_FAILED
            }
        };
        entries.push(report::dump_entry(
            &res.name,
            read.as_ref().map_err(String::as_str),
        ));
        if r != 0 && ec == 0 {
            ec = r;
        }
    }
    if out.style != xo::Style::Text {
        print!("{}", xo::document(out, "dump", &report::dump(entries)));
    }
    ec
}

/// `status` or `list` in JSON or XML: the document built by `build`; the
/// exit code is the first per-resource error, as in text.
fn print_xo(out: &xo::Options, top: &str, nv: &Nv, build: fn(&StatusReply) -> xo::Node) -> i32 {
    let reply = StatusReply::from_nv(nv);
    print!("{}", xo::document(out, top, &build(&reply)));
    reply
        .entries
        .iter()
        .find_map(|e| e.status.as_ref().err().map(|err| i32::from(err.code)))
        .unwrap_or(0)
}

/// `hastctl events`: the state of the resources, then (unless `now`) each
/// event as hastd sends it, one line (or one document) each, until hastd
/// closes the connection or drops this watcher.
fn watch_events(
    cfg: &Config,
    names: &[String],
    now: bool,
    statistics: bool,
    out: &xo::Options,
) -> i32 {
    use std::io::Write;
    let req = control::events_request(&only_all_means_empty(names), now, statistics);
    let mut stream = match control::stream(&cfg.control, &req) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return e.exit_code();
        }
    };
    let mut ret = 0;
    let stdout = std::io::stdout();
    loop {
        let nv = match stream.next_frame() {
            Ok(Some(nv)) => nv,
            Ok(None) if now => return ret,
            Ok(None) => {
                eprintln!("hastd closed the event stream");
                return sysexits::EX_UNAVAILABLE;
            }
            Err(e) => {
                eprintln!("{e}");
                return e.exit_code();
            }
        };
        let error = nv.get_i16("error").unwrap_or(0);
        if error != 0 {
            eprintln!("Error {error} received from hastd.");
            return sysexits::EX_SOFTWARE;
        }
        if nv.get_u8(events::END_OF_STATE) == Some(1) {
            if now {
                return ret;
            }
            continue;
        }
        if let Some(why) = nv.get_string(events::DROPPED) {
            eprintln!("hastd dropped this watcher: {why}");
            return sysexits::EX_TEMPFAIL;
        }
        let Some(record) = Record::from_nv(&nv) else {
            continue;
        };
        if record.event == "error" && ret == 0 {
            ret = record
                .fields
                .iter()
                .find_map(|(k, v)| match (k.as_str(), v) {
                    ("code", events::Field::I64(c)) => i32::try_from(*c).ok(),
                    _ => None,
                })
                .unwrap_or(1);
        }
        let text = match out.style {
            xo::Style::Text => format!("{}\n", record.text_line()),
            _ => xo::document(out, "event", &report::event(&record)),
        };
        let mut lock = stdout.lock();
        if lock
            .write_all(text.as_bytes())
            .and_then(|()| lock.flush())
            .is_err()
        {
            // Nobody reads our output any more.
            return ret;
        }
    }
}

/// `hastctl reconnect`: the errors of the resources that could not.
fn print_reconnect(nv: &Nv) -> i32 {
    let mut ret = 0;
    for e in RoleReply::from_nv(nv).entries {
        let Some(err) = &e.error else {
            tracing::debug!("[{}] reconnecting now", e.name);
            continue;
        };
        match &err.message {
            Some(msg) => eprintln!("[{}] Received error {} from hastd: {msg}", e.name, err.code),
            None => eprintln!("[{}] Received error {} from hastd.", e.name, err.code),
        }
        if ret == 0 {
            ret = i32::from(err.code);
        }
    }
    ret
}

/// Send `req` to hastd; on failure print why and return the exit code.
fn talk(cfg: &Config, req: &Nv) -> Result<Nv, i32> {
    let reply = control::request(&cfg.control, req).map_err(|e| {
        eprintln!("{e}");
        e.exit_code()
    })?;
    let error = reply.get_i16("error").unwrap_or(0);
    if error != 0 {
        eprintln!("Error {error} received from hastd.");
        return Err(sysexits::EX_SOFTWARE);
    }
    Ok(reply)
}

fn print_setrole(nv: &Nv, newrole: Role) -> i32 {
    let mut ret = 0;
    for e in RoleReply::from_nv(nv).entries {
        if let Some(err) = &e.error {
            match &err.message {
                Some(msg) => {
                    eprintln!("[{}] Received error {} from hastd: {msg}", e.name, err.code)
                }
                None => eprintln!("[{}] Received error {} from hastd.", e.name, err.code),
            }
            if ret == 0 {
                ret = i32::from(err.code);
            }
            continue;
        }
        let old = e.old_role.as_deref().unwrap_or("unknown");
        if old == newrole.as_str() {
            tracing::debug!("[{}] Role unchanged ({old}).", e.name);
        } else {
            tracing::debug!("[{}] Role changed from {old} to {newrole}.", e.name);
        }
    }
    ret
}

fn print_list(nv: &Nv) -> i32 {
    use std::fmt::Write;
    let mut ret = 0;
    let mut out = String::new();
    for e in StatusReply::from_nv(nv).entries {
        let _ = writeln!(out, "{}:", e.name);
        let st = match e.status {
            Ok(st) => st,
            Err(err) => {
                if ret == 0 {
                    ret = i32::from(err.code);
                }
                let _ = writeln!(out, "  error: {}", err.code);
                continue;
            }
        };
        let a = st.activity.clone().unwrap_or_default();
        let extentsize = u64::from(a.extentsize);
        let _ = writeln!(out, "  role: {}", st.role);
        let _ = writeln!(out, "  provname: {}", st.provname);
        let _ = writeln!(out, "  localpath: {}", st.localpath);
        let _ = writeln!(
            out,
            "  extentsize: {extentsize} ({}B)",
            humanize(extentsize)
        );
        let _ = writeln!(out, "  keepdirty: {}", a.keepdirty);
        let _ = writeln!(out, "  remoteaddr: {}", st.remoteaddr);
        if let Some(s) = &st.sourceaddr {
            let _ = writeln!(out, "  sourceaddr: {s}");
        }
        let _ = writeln!(out, "  replication: {}", st.replication);
        if let Some(act) = &st.activity {
            let _ = writeln!(out, "  status: {}", act.status);
        }
        if st.workerpid != 0 {
            let _ = writeln!(out, "  workerpid: {}", st.workerpid);
        }
        let _ = writeln!(out, "  dirty: {} ({}B)", a.dirty, humanize(a.dirty));
        let r = &a.requests;
        let q = &a.queues;
        let _ = writeln!(out, "  statistics:");
        let _ = writeln!(out, "    reads: {}", r.reads);
        let _ = writeln!(out, "    writes: {}", r.writes);
        let _ = writeln!(out, "    deletes: {}", r.deletes);
        let _ = writeln!(out, "    flushes: {}", r.flushes);
        let _ = writeln!(out, "    activemap updates: {}", r.activemap_updates);
        let _ = writeln!(
            out,
            "    local errors: read: {}, write: {}, delete: {}, flush: {}",
            r.read_errors, r.write_errors, r.delete_errors, r.flush_errors
        );
        let _ = writeln!(
            out,
            "    queues: local: {}, send: {}, recv: {}, done: {}, idle: {}",
            q.local, q.send, q.recv, q.done, q.idle
        );
        if let Some(p) = &a.sync {
            let _ = writeln!(out, "{}", sync_line(p.total, p.done, p.msecs));
        }
        if st.inconsistent {
            let _ = writeln!(out, "  {}", hast::metadata::INCONSISTENT_LINE);
        }
        // This project's lines, after the reference's, only when they apply.
        if st.split_brain {
            let _ = writeln!(out, "  {SPLIT_BRAIN_LINE}");
        }
        if let Some((t, why)) = st.link.as_ref().and_then(|l| l.last_disconnect.as_ref()) {
            let _ = writeln!(
                out,
                "  last disconnect: {} ({why})",
                hast::clock::rfc3339_ms(*t)
            );
        }
        // Only for a resource whose `security` is not none.
        if let Some(l) = &st.security {
            let _ = writeln!(
                out,
                "  security: {} ({})",
                l.security,
                l.link.as_deref().unwrap_or("not connected")
            );
            if let Some(p) = &l.peerfingerprint {
                let _ = writeln!(out, "  peerfingerprint: {p}");
            }
        }
    }
    print!("{out}");
    ret
}

/// The line `list` prints for a resource refused for split-brain.
const SPLIT_BRAIN_LINE: &str =
    "split-brain: yes (this node and the peer both changed the data while apart; see hastctl(8))";

/// The resync progress line of `list` (this project's addition): percent
/// done, rate and estimated time left.
fn sync_line(total: u64, done: u64, msecs: u64) -> String {
    let (pct, rate, eta) = report::sync_figures(total, done, msecs);
    let eta = match eta {
        None => "unknown".to_string(),
        Some(s) => format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60),
    };
    format!(
        "  synchronization: {pct:.1}% done, {done} of {total} bytes, {}B/s, {eta} left",
        humanize(rate)
    )
}

fn print_status(nv: &Nv) -> i32 {
    use std::fmt::Write;
    let mut ret = 0;
    let mut out = String::new();
    for (no, e) in StatusReply::from_nv(nv).entries.into_iter().enumerate() {
        if no == 0 {
            out.push_str("Name\tStatus\t Role\t\tComponents\n");
        }
        let _ = write!(out, "{}\t", e.name);
        let st = match e.status {
            Ok(st) => st,
            Err(err) => {
                if ret == 0 {
                    ret = i32::from(err.code);
                }
                let _ = writeln!(out, "ERR{}", err.code);
                continue;
            }
        };
        let status = if st.split_brain {
            // This project's status for a resource refused for split-brain
            // (the reference shows a primary as degraded); a space keeps it
            // apart from the role.
            "split-brain "
        } else {
            st.activity.as_ref().map_or("-", |a| a.status.as_str())
        };
        let _ = writeln!(
            out,
            "{status:<9}{:<15}{}\t{}",
            st.role, st.localpath, st.remoteaddr
        );
    }
    print!("{out}");
    ret
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synchronization_line() {
        assert_eq!(
            sync_line(100 << 20, 25 << 20, 2000),
            "  synchronization: 25.0% done, 26214400 of 104857600 bytes, 13MB/s, 0:00:06 left"
        );
        assert_eq!(
            sync_line(1 << 20, 0, 0),
            "  synchronization: 0.0% done, 0 of 1048576 bytes, 0B/s, unknown left"
        );
    }

    #[test]
    fn status_and_list_formats() {
        let mut nv = Nv::new();
        nv.add_string("resource0", "data")
            .add_string("role0", "primary")
            .add_string("provname0", "data")
            .add_string("localpath0", "/dev/ada0p3")
            .add_u32("extentsize0", 2 << 20)
            .add_u32("keepdirty0", 64)
            .add_string("remoteaddr0", "10.0.0.2")
            .add_string("replication0", "fullsync")
            .add_string("status0", "complete")
            .add_i32("workerpid0", 1234)
            .add_u64("dirty0", 4 << 20)
            .add_string("resource1", "gone")
            .add_i16("error1", 1);
        assert_eq!(print_status(&nv), 1);
        assert_eq!(print_list(&nv), 1);
    }
}

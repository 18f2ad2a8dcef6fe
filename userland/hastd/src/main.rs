//! hastd: the Highly Available Storage daemon. Parses hast.conf, holds the
//! pidfile, serves the control socket for hastctl and runs the resources.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use hast::config::{Config, HostIdentity, DEFAULT_CONFIG};
use hast::engine::control_server::ControlListener;
use hast::engine::{Daemon, Options};
use hast::pidfile::Pidfile;
use hast::sysexits;
use tracing_subscriber::filter::LevelFilter;

/// Highly Available Storage daemon.
#[derive(Debug, Parser)]
#[command(name = "hastd", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(short = 'c', value_name = "config", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Print debugging information; repeat for more.
    #[arg(short = 'd', action = ArgAction::Count)]
    debug: u8,
    /// Stay in the foreground and log to standard error.
    #[arg(short = 'F')]
    foreground: bool,
    /// Pidfile (overrides `pidfile` of the configuration).
    #[arg(short = 'P', value_name = "pidfile")]
    pidfile: Option<PathBuf>,
    /// Act as node NAME: only `on NAME` blocks describe this host (to run
    /// several nodes from one configuration on one machine).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
}

fn level(debug: u8) -> LevelFilter {
    match debug {
        0 => LevelFilter::INFO,
        1 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

fn log_to_stderr(debug: u8) {
    tracing_subscriber::fmt()
        .with_max_level(level(debug))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn log_to_syslog(debug: u8) -> Result<(), String> {
    let (options, facility) = Default::default();
    let syslog = syslog_tracing::Syslog::new(c"hastd", options, facility)
        .ok_or_else(|| "syslog is already initialized".to_string())?;
    tracing_subscriber::fmt()
        .with_max_level(level(debug))
        .with_writer(syslog)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();
    Ok(())
}

/// Buffers of up to 1 MiB (NBD requests, resync chunks, replicated writes)
/// come and go by the thousand every second. From glibc's default mmap
/// threshold up each one is a fresh mapping: page faults on first touch and
/// an munmap on free: about a third of the primary's CPU during a resync. Kept
/// in the heap they are reused; the trim threshold bounds what stays
/// allocated after a burst.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called before any
    // thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return ExitCode::from(if usage { sysexits::EX_USAGE as u8 } else { 0 });
        }
    };
    // Until logging is set up (after daemonizing), errors go to standard error.
    let config_path = std::path::absolute(&cli.config).unwrap_or_else(|_| cli.config.clone());
    let host = match &cli.node {
        Some(n) => HostIdentity::node(n),
        None => HostIdentity::detect(),
    };
    let mut cfg = match Config::load(&config_path, &host) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hastd: {e}");
            return exit(e.exit_code());
        }
    };
    // Keys and secrets: refused when unreadable, malformed or readable by
    // other users, before anything starts.
    let tls = match hast::engine::credentials::load(&mut cfg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("hastd: {e}");
            return exit(e.exit_code());
        }
    };
    let opts = Options {
        config_path,
        host,
        pidfile_override: cli.pidfile.clone(),
    };
    let pidfile_path = opts.pidfile_for(&cfg);
    let mut pidfile = match Pidfile::open(&pidfile_path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hastd: {e}");
            return exit(e.exit_code());
        }
    };
    // In the foreground the pid is final now: record it before anything
    // (the control socket) can make the daemon look started.
    if cli.foreground {
        if let Err(e) = pidfile.write() {
            eprintln!("hastd: {e}");
        }
    }
    let control = match ControlListener::bind(&cfg.control) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hastd: {e}");
            return exit(sysexits::EX_OSERR);
        }
    };
    let listeners = match hast::engine::listen::Listeners::bind(&cfg.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hastd: {e}");
            return exit(sysexits::EX_OSERR);
        }
    };
    let metrics = match &cfg.metrics {
        Some(addr) => match hast::metrics::http::MetricsListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("hastd: {e}");
                return exit(sysexits::EX_OSERR);
            }
        },
        None => None,
    };
    if !cli.foreground {
        if let Err(e) = nix::unistd::daemon(false, false) {
            eprintln!("hastd: unable to daemonize: {e}");
            return exit(sysexits::EX_OSERR);
        }
    }
    if cli.foreground {
        log_to_stderr(cli.debug);
    } else if let Err(e) = log_to_syslog(cli.debug) {
        log_to_stderr(cli.debug);
        tracing::warn!("unable to log to syslog: {e}");
    }
    if !cli.foreground {
        if let Err(e) = pidfile.write() {
            tracing::warn!("{e}");
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hastd")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("unable to start the runtime: {e}");
            return exit(sysexits::EX_OSERR);
        }
    };
    let mut daemon = Daemon::new(opts, cfg, tls, pidfile, control, listeners);
    if let Some(m) = metrics {
        daemon = daemon.with_metrics(m);
    }
    let code = runtime.block_on(daemon.run());
    exit(code)
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

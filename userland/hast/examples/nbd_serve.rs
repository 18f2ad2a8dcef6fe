//! Serves one file or block device over NBD until SIGINT/SIGTERM:
//! `nbd_serve --file F --export NAME (--unix PATH | --tcp HOST:PORT)
//! [--offset N] [--size N] [--block-size N] [--max-payload N] [--read-only]`.
//! Prints `listening <address>` on stdout once clients can connect.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use hast::nbd::{FileBackend, FileOptions, Registry, Server, ServerConfig};

struct Args {
    file: PathBuf,
    export: String,
    unix: Option<PathBuf>,
    tcp: Option<String>,
    opts: FileOptions,
    max_payload: Option<u32>,
}

const USAGE: &str = "usage: nbd_serve --file F --export NAME (--unix PATH | --tcp HOST:PORT) \
[--offset N] [--size N] [--block-size N] [--max-payload N] [--read-only]";

fn parse() -> Result<Args, String> {
    let mut file = None;
    let mut export = None;
    let mut unix = None;
    let mut tcp = None;
    let mut opts = FileOptions::default();
    let mut max_payload = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--read-only" {
            opts.read_only = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        let num32 = |v: &str| -> Result<u32, String> {
            u32::try_from(num(v)?).map_err(|_| format!("{flag}: {v} is too large"))
        };
        match flag.as_str() {
            "--file" => file = Some(PathBuf::from(value)),
            "--export" => export = Some(value),
            "--unix" => unix = Some(PathBuf::from(value)),
            "--tcp" => tcp = Some(value),
            "--offset" => opts.offset = num(&value)?,
            "--size" => opts.size = Some(num(&value)?),
            "--block-size" => opts.block_size = Some(num32(&value)?),
            "--max-payload" => max_payload = Some(num32(&value)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let file = file.ok_or("--file is required")?;
    let export = export.ok_or("--export is required")?;
    if unix.is_some() == tcp.is_some() {
        return Err("give exactly one of --unix and --tcp".into());
    }
    Ok(Args {
        file,
        export,
        unix,
        tcp,
        opts,
        max_payload,
    })
}

async fn serve(args: Args) -> Result<(), String> {
    let backend = FileBackend::open(&args.file, &args.opts).map_err(|e| e.to_string())?;
    let registry = Registry::new();
    registry
        .add(&args.export, Arc::new(backend))
        .map_err(|e| e.to_string())?;
    let mut config = ServerConfig::default();
    if let Some(m) = args.max_payload {
        config.max_payload = m;
        config.inflight_bytes = config.inflight_bytes.max(m);
    }
    let server = Server::new(registry, config).map_err(|e| e.to_string())?;
    // Before "listening": a SIGTERM right after it shuts down cleanly.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    if let Some(path) = &args.unix {
        server.listen_unix(path).await.map_err(|e| e.to_string())?;
        println!("listening unix:{}", path.display());
    }
    if let Some(addr) = &args.tcp {
        let local = server.listen_tcp(addr).await.map_err(|e| e.to_string())?;
        println!("listening tcp:{local}");
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nbd_serve: {e}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbd_serve: cannot start the runtime: {e}");
            return ExitCode::from(71);
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd_serve: {e}");
            ExitCode::from(1)
        }
    }
}

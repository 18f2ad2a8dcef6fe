//! stampcheck: the acknowledged-write checker from the command line, for the
//! demo and benchmark scripts. `write` runs a stamped workload against an
//! NBD export and saves its history; `verify` reads the blocks back (from an
//! export or a provider file at an offset) and reports.
//!
//! ```text
//! stampcheck write URI --history FILE [--qd N] [--count N] [--seconds S]
//!                      [--first BLOCK] [--blocks N] [--bs BYTES] [--seed N] [--fua]
//! stampcheck verify --history FILE (URI | --file PATH [--offset BYTES])
//! ```
//! Exit status: 0 pass, 1 verification failed, 2 usage or I/O error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use hast_tests::checker::{History, NbdClient, Workload, WorkloadOptions};

const USAGE: &str = "usage: stampcheck write URI --history FILE [--qd N] [--count N] [--seconds S] [--first BLOCK] [--blocks N] [--bs BYTES] [--seed N] [--fua]\n       stampcheck verify --history FILE (URI | --file PATH [--offset BYTES])";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("stampcheck: {e}");
            ExitCode::from(2)
        }
    }
}

fn num<T: std::str::FromStr>(flag: &str, v: Option<&String>) -> Result<T, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
    v.parse()
        .map_err(|_| format!("{flag}: not a number: {v:?}\n{USAGE}"))
}

fn run(args: &[String]) -> Result<bool, String> {
    let (cmd, rest) = args.split_first().ok_or(USAGE)?;
    let mut uri = None;
    let mut history = None;
    let mut file = None;
    let mut offset = 0u64;
    let mut o = WorkloadOptions {
        max_writes: None,
        ..Default::default()
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--history" => history = Some(PathBuf::from(it.next().ok_or(USAGE)?)),
            "--file" => file = Some(PathBuf::from(it.next().ok_or(USAGE)?)),
            "--offset" => offset = num("--offset", it.next())?,
            "--qd" => o.queue_depth = num("--qd", it.next())?,
            "--count" => o.max_writes = Some(num("--count", it.next())?),
            "--seconds" => o.duration = Some(Duration::from_secs_f64(num("--seconds", it.next())?)),
            "--first" => o.first_block = num("--first", it.next())?,
            "--blocks" => o.blocks = Some(num("--blocks", it.next())?),
            "--bs" => o.block_size = num("--bs", it.next())?,
            "--seed" => o.seed = num("--seed", it.next())?,
            "--fua" => o.fua = true,
            s if s.starts_with("nbd") && uri.is_none() => uri = Some(s.to_string()),
            s => return Err(format!("unexpected argument {s:?}\n{USAGE}")),
        }
    }
    let history = history.ok_or_else(|| format!("--history is required\n{USAGE}"))?;
    match cmd.as_str() {
        "write" => {
            let uri = uri.ok_or_else(|| format!("write needs an NBD URI\n{USAGE}"))?;
            if o.max_writes.is_none() && o.duration.is_none() {
                o.max_writes = Some(1000);
            }
            let h = Workload::new(o).run_uri(&uri).map_err(|e| e.to_string())?;
            h.save(&history).map_err(|e| e.to_string())?;
            println!("{h}");
            Ok(true)
        }
        "verify" => {
            let h = History::load(&history).map_err(|e| e.to_string())?;
            let r = match (uri, file) {
                (Some(uri), None) => {
                    let mut c = NbdClient::connect_uri(&uri).map_err(|e| e.to_string())?;
                    let r = h.verify_export(&mut c).map_err(|e| e.to_string())?;
                    c.disconnect();
                    r
                }
                (None, Some(f)) => h.verify_file(&f, offset).map_err(|e| e.to_string())?,
                _ => return Err(format!("verify needs a URI or --file, not both\n{USAGE}")),
            };
            print!("{r}");
            Ok(r.passed())
        }
        _ => Err(USAGE.to_string()),
    }
}

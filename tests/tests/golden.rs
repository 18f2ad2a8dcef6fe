//! Golden outputs of `hastctl status`, `list` and `dump` in the states an
//! administrator sees (init, primary degraded, primary synchronizing,
//! primary complete, secondary), compared byte for byte with the files in
//! tests/golden/ after the parts that differ from run to run are replaced:
//! the cluster's directory (`<dir>`), TCP ports (`<port>`), process IDs
//! (`<pid>`), the resource's random `resuid`, the moving numbers of a
//! synchronization line and a secondary's count of flushes. `HAST_GOLDEN_UPDATE=1` rewrites the files.

use std::path::PathBuf;
use std::time::Duration;

use hast_tests::cluster::{Cluster, Mode};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden")
}

/// `text` with what differs between runs replaced by placeholders.
fn normalize(c: &Cluster, text: &str) -> String {
    let mut out = text.replace(&c.dir().display().to_string(), "<dir>");
    for node in ["alpha", "beta"] {
        if let Some(pid) = c.pid(node) {
            out = out.replace(&format!("workerpid: {pid}"), "workerpid: <pid>");
        }
        if let Ok(port) = c.port(node) {
            out = out.replace(&format!(":{port}"), ":<port>");
        }
    }
    out.lines()
        .map(|l| {
            let t = l.trim_start();
            let indent = &l[..l.len() - t.len()];
            if let Some(v) = t.strip_prefix("resuid: ") {
                if v != "0" {
                    return format!("{indent}resuid: <resuid>");
                }
            }
            if t.starts_with("synchronization: ") {
                // Keep the total, which the state fixes.
                let total = t
                    .split(" of ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .unwrap_or("?");
                return format!(
                    "{indent}synchronization: <pct>% done, <done> of {total} bytes, <rate>B/s, <eta> left"
                );
            }
            l.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Compare (or with `HAST_GOLDEN_UPDATE=1` write) one golden file.
fn check(c: &Cluster, name: &str, text: &str, failures: &mut Vec<String>) {
    let got = normalize(c, text);
    let path = golden_dir().join(name);
    if std::env::var_os("HAST_GOLDEN_UPDATE").is_some() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "read {}: {e} (HAST_GOLDEN_UPDATE=1 writes it)",
            path.display()
        )
    });
    if got != want {
        failures.push(format!("{name} differs:\n--- want\n{want}--- got\n{got}"));
    }
}

/// The three outputs of `node` in the state called `state`. A secondary
/// counts the flushes the primary asks for on its own (about once a second
/// while written extents wait to leave the map): how many is a matter of
/// timing, so its `flushes:` count is a placeholder.
fn check_all(c: &Cluster, node: &str, state: &str, failures: &mut Vec<String>) {
    for cmd in ["status", "list", "dump"] {
        let mut text = c.hastctl_ok(node, &[cmd]).unwrap();
        if state == "secondary" {
            text = text
                .lines()
                .map(|l| match l.split_once("flushes: ") {
                    Some((indent, _)) => format!("{indent}flushes: <n>\n"),
                    None => format!("{l}\n"),
                })
                .collect();
        }
        check(c, &format!("{state}.{node}.{cmd}"), &text, failures);
    }
}

/// Wait until `list` of `node` prints the same text twice in a row,
/// 300 ms apart (counters that settle after a state is reached).
fn settled(c: &Cluster, node: &str) {
    let mut last = String::new();
    assert!(
        hast_tests::wait_for(T, || {
            let now = c.hastctl_ok(node, &["list"]).unwrap_or_default();
            let same = now == last;
            last = now;
            std::thread::sleep(Duration::from_millis(300));
            same
        }),
        "list of {node} never settled"
    );
}

#[test]
fn status_list_and_dump_outputs_stay_byte_identical() {
    let mut c = Cluster::builder(Mode::auto())
        .resource("r0", 64 * MIB)
        .replication("fullsync")
        .timeout(5)
        .build()
        .expect("build the cluster");
    let mut failures = Vec::new();
    c.start_all().unwrap();
    check_all(&c, "alpha", "init", &mut failures);

    // Primary, degraded: no secondary yet; 2 writes and a flush.
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_list("alpha", "r0", T, |s| {
        s.status.as_deref() == Some("degraded")
    })
    .unwrap();
    c.qemu_io(
        "alpha",
        "r0",
        &["write -P 0x11 0 1M", "write -P 0x22 8M 1M", "flush"],
    )
    .unwrap();
    settled(&c, "alpha");
    check_all(&c, "alpha", "degraded", &mut failures);

    // Primary synchronizing toward a slow secondary.
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, true);
    c.role("beta", "r0", "secondary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.synchronizing())
        .unwrap();
    for cmd in ["status", "list"] {
        let text = c.hastctl_ok("alpha", &[cmd]).unwrap();
        // The dirty count and the queues move as extents finish: not part
        // of this state.
        let text: String = text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !t.starts_with("dirty:") && !t.starts_with("queues:")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        check(
            &c,
            &format!("synchronizing.alpha.{cmd}"),
            &text,
            &mut failures,
        );
    }
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, false);

    // Complete: both sides in sync.
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    settled(&c, "alpha");
    settled(&c, "beta");
    check_all(&c, "alpha", "complete", &mut failures);
    check_all(&c, "beta", "secondary", &mut failures);

    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

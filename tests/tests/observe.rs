//! Status a program can read, with real hastd processes: `hastctl
//! --libxo json|xml` validated against docs/hastctl.schema.json (python3
//! jsonschema) and parsed as XML in every state an administrator meets;
//! `hastctl events` during the seeds' failover story, and watchers that
//! are killed or stop reading; Prometheus metrics scraped with curl and
//! checked with promtool, their histograms against the request counters
//! after a fio run, hostile HTTP clients; `hastctl reconnect` and the
//! promotion waits of hast.conf.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, Mode};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn schema() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/hastctl.schema.json")
}

/// Validates every file given: `*.json` one document, `*.lines.json` one
/// document per line (against the schema); `*.xml` one document,
/// `*.lines.xml` one per line (well-formed, top element with version 1).
const VALIDATE: &str = r#"
import json, sys, xml.etree.ElementTree as ET
import jsonschema
v = jsonschema.Draft202012Validator(json.load(open(sys.argv[1])))
bad = 0
for path in sys.argv[2:]:
    text = open(path).read()
    many = '.lines.' in path
    docs = [l for l in text.splitlines() if l.strip()] if many else [text]
    if not docs:
        print(f'{path}: empty'); bad += 1
    for d in docs:
        if path.endswith('.xml'):
            try:
                root = ET.fromstring(d)
                if root.get('version') != '1':
                    print(f'{path}: top element without version="1"'); bad += 1
            except ET.ParseError as e:
                print(f'{path}: not well-formed XML: {e}'); bad += 1
        else:
            for e in v.iter_errors(json.loads(d)):
                print(f'{path}: at {list(e.absolute_path)}: {e.message}'); bad += 1
sys.exit(1 if bad else 0)
"#;

fn validate(files: &[PathBuf]) {
    let mut args = vec![schema().display().to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = hast_tests::python(VALIDATE, &a, Duration::from_secs(60));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

/// `hastctl CMD --libxo OPTS` on `node`: its standard output, after
/// checking the exit code is `code`.
fn xo(c: &Cluster, node: &str, cmd: &str, opts: &str, code: i32) -> String {
    let o = c
        .hastctl(node, &[cmd, "--libxo", opts, "r0"])
        .expect("run hastctl");
    assert_eq!(o.code, code, "hastctl {cmd} --libxo {opts}: {}", o.stderr);
    o.stdout
}

/// Write every output of `node` in the state `state` (status, list and
/// dump in JSON, pretty JSON, XML and pretty XML; the other spellings of
/// the option) to files, checking the text style is the plain output;
/// returns the files and the list JSON.
fn outputs(c: &Cluster, node: &str, state: &str) -> (Vec<PathBuf>, Value) {
    let mut files = Vec::new();
    let mut list = Value::Null;
    for cmd in ["status", "list", "dump"] {
        for (opts, ext) in [
            ("json", "json"),
            ("json,pretty", "json"),
            ("xml", "xml"),
            ("xml,pretty", "xml"),
        ] {
            let text = xo(c, node, cmd, opts, 0);
            let path = c.dir().join(format!(
                "{state}.{node}.{cmd}.{}.{ext}",
                opts.replace(',', "-")
            ));
            std::fs::write(&path, &text).unwrap();
            files.push(path);
            if cmd == "list" && opts == "json" {
                list = serde_json::from_str(&text).expect("list JSON");
            }
        }
        let plain = c.hastctl_ok(node, &[cmd, "r0"]).unwrap();
        let text = xo(c, node, cmd, "text", 0);
        assert_eq!(text, plain, "--libxo text is the plain output");
    }
    (files, list)
}

/// The one resource of a list document.
fn res(list: &Value) -> &Value {
    &list["list"]["resource"][0]
}

#[test]
fn libxo_outputs_validate_against_the_schema_in_every_state() {
    let mut c = Cluster::builder(Mode::auto())
        .resource("r0", 64 * MIB)
        .replication("fullsync")
        .timeout(5)
        .build()
        .expect("build the cluster");
    c.start_all().unwrap();
    let mut files = Vec::new();

    let (f, list) = outputs(&c, "alpha", "init");
    files.extend(f);
    let r = res(&list);
    assert_eq!(r["role"], "init");
    assert_eq!(r["synchronization"]["state"], "none");
    assert!(r.get("link").is_none() && r.get("counters").is_none());
    // The other spellings of the option.
    for opts in [["--libxo=json,pretty", "list"], ["--libxo:JP", "list"]] {
        let o = c.hastctl("alpha", &[opts[1], opts[0]]).unwrap();
        assert_eq!(o.code, 0, "{}", o.stderr);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["__version"], "1");
        assert!(o.stdout.contains("\n    \"resource\": ["), "{}", o.stdout);
    }
    let o = c.hastctl("alpha", &["list", "--libxo", "yaml"]).unwrap();
    assert_eq!(o.code, 64, "an unknown style is a usage error");
    // An unknown resource: exit 1 and an error entry.
    let o = c
        .hastctl("alpha", &["list", "--libxo", "json", "nosuch"])
        .unwrap();
    assert_eq!(o.code, 1);
    let p = c.dir().join("unknown.list.json");
    std::fs::write(&p, &o.stdout).unwrap();
    files.push(p);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["list"]["resource"][0]["error"]["code"], 1);

    // Primary, degraded: 2 extents written while alone wait for the peer.
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_list("alpha", "r0", T, |s| {
        s.status.as_deref() == Some("degraded")
    })
    .unwrap();
    c.qemu_io(
        "alpha",
        "r0",
        &["write -P 0x11 0 1M", "write -P 0x22 8M 1M"],
    )
    .unwrap();
    let (f, list) = outputs(&c, "alpha", "degraded");
    files.extend(f);
    let r = res(&list);
    assert_eq!(r["status"], "degraded");
    assert_eq!(r["synchronization"]["state"], "pending");
    assert_eq!(r["synchronization"]["bytes-pending"], 4 * MIB);
    assert_eq!(r["link"]["state"], "disconnected");
    assert!(r["link"]["last-error"].is_string(), "{r}");
    assert_eq!(r["counters"]["localcnt"], 1, "the outage's bump");
    assert_eq!(r["statistics"]["writes"], 2);
    assert_eq!(r["consistent"], true);

    // Synchronizing toward a slow secondary.
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, true);
    c.role("beta", "r0", "secondary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.synchronizing())
        .unwrap();
    let (f, list) = outputs(&c, "alpha", "synchronizing");
    files.extend(f);
    let sync = &res(&list)["synchronization"];
    assert_eq!(sync["state"], "running", "{list}");
    assert_eq!(sync["bytes-total"], 4 * MIB);
    c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, false);

    // Complete, and the secondary.
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    let (f, list) = outputs(&c, "alpha", "complete");
    files.extend(f);
    let r = res(&list);
    assert_eq!(r["status"], "complete");
    assert_eq!(r["link"]["state"], "connected");
    assert!(r["link"]["connected-since"].is_string());
    assert_ne!(r["counters"]["resuid"], 0);
    let dump: Value = serde_json::from_str(&xo(&c, "alpha", "dump", "json", 0)).unwrap();
    assert_eq!(
        dump["dump"]["resource"][0]["resuid"],
        r["counters"]["resuid"]
    );
    let (f, list) = outputs(&c, "beta", "secondary");
    files.extend(f);
    assert_eq!(res(&list)["role"], "secondary");
    assert_eq!(res(&list)["link"]["state"], "connected");

    // Split-brain, refused by both nodes.
    c.partition("alpha", "beta").unwrap();
    c.role("beta", "r0", "primary").unwrap();
    c.qemu_io("alpha", "r0", &["write -P 0x0a 0 1M"]).unwrap();
    c.qemu_io("beta", "r0", &["write -P 0x0b 4M 1M"]).unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.heal("alpha", "beta").unwrap();
    c.wait_hook("alpha", "split-brain r0", T).unwrap();
    c.wait_hook("beta", "split-brain r0", T).unwrap();
    for node in ["alpha", "beta"] {
        c.wait_for("split-brain in list", T, |c| {
            let v: Value = serde_json::from_str(&xo(c, node, "list", "json", 0)).unwrap();
            res(&v)["split-brain"] == true
        })
        .unwrap();
        let (f, _) = outputs(&c, node, "split-brain");
        files.extend(f);
        let list = c.hastctl_ok(node, &["list", "r0"]).unwrap();
        assert!(list.contains("\n  split-brain: yes ("), "{list}");
        let status = c.status(node).unwrap();
        assert_eq!(status[0].status, "split-brain", "{status:?}");
    }
    // The primary also tells why it is apart, and the reference's lines
    // come first.
    let list = c.hastctl_ok("alpha", &["list", "r0"]).unwrap();
    let last = list.lines().last().unwrap_or_default();
    assert!(last.starts_with("  last disconnect: "), "{list}");
    validate(&files);
}

/// Collects the lines a child prints on standard output, as they come.
struct Watcher {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(c: &Cluster, node: &str, args: &[&str]) -> Watcher {
        let mut a = vec!["events", "--libxo", "json"];
        a.extend(args);
        let mut child = c.hastctl_spawn(node, &a).unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                sink.lock().unwrap().push(l);
            }
        });
        let w = Watcher {
            child,
            lines,
            reader: Some(reader),
        };
        assert!(
            hast_tests::wait_for(T, || w.events().iter().any(|e| e["type"] == "exists")),
            "no state from the watcher on {node}"
        );
        w
    }

    fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))["event"]
                    .clone()
            })
            .collect()
    }

    /// Stop the watcher; its lines and exit status.
    fn stop(mut self) -> (Vec<String>, Option<i32>) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let code = self.child.wait().ok().and_then(|s| s.code());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let lines = self.lines.lock().unwrap().clone();
        (lines, code)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A short description of an event, for the order checks.
fn tag(e: &Value) -> String {
    let t = e["type"].as_str().unwrap_or("?");
    match t {
        "role" => format!(
            "role {}>{}",
            e["old"].as_str().unwrap_or("?"),
            e["new"].as_str().unwrap_or("?")
        ),
        "sync-start" => format!("sync-start {}", e["direction"].as_str().unwrap_or("?")),
        "hook" => format!(
            "hook {} exit {}",
            e["hook"].as_str().unwrap_or("?"),
            e["exit"]
        ),
        t => t.to_string(),
    }
}

/// Whether `want` appears in `got` in this order (other events between).
fn in_order(got: &[String], want: &[&str]) -> bool {
    let mut it = got.iter();
    want.iter().all(|w| it.any(|g| g == w))
}

/// The lines of a watcher: written for the schema check, their events
/// with increasing seqs after the state.
fn check_watcher(
    c: &Cluster,
    name: &str,
    lines: &[String],
    files: &mut Vec<PathBuf>,
) -> Vec<String> {
    let p = c.dir().join(format!("{name}.events.lines.json"));
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    files.push(p);
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].clone())
        .collect();
    let seqs: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] != "exists")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "{name}: seqs not increasing: {seqs:?}"
    );
    events.iter().map(tag).collect()
}

#[test]
fn events_follow_the_seeds_story() {
    let mut c = Cluster::builder(Mode::auto())
        .resource("r0", 64 * MIB)
        .replication("fullsync")
        .timeout(5)
        .build()
        .expect("build the cluster");
    c.start_all().unwrap();
    let beta = Watcher::start(&c, "beta", &[]);
    let alpha1 = Watcher::start(&c, "alpha", &["r0"]);

    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    c.qemu_io(
        "alpha",
        "r0",
        &["write -P 0x11 0 8M", "write -P 0x22 40M 3M"],
    )
    .unwrap();
    c.wait_list("alpha", "r0", T, |s| s.dirty == 0).unwrap();

    // The primary dies: its watcher's stream ends.
    c.kill9("alpha").unwrap();
    let (alpha1_lines, alpha1_code) = alpha1.stop();
    c.role("beta", "r0", "primary").unwrap();
    c.wait_list("beta", "r0", T, |s| s.status.as_deref() == Some("degraded"))
        .unwrap();
    c.qemu_io("beta", "r0", &["write -P 0x33 10M 5M"]).unwrap();

    // The old primary comes back as secondary and is synchronized.
    c.restart("alpha").unwrap();
    let alpha2 = Watcher::start(&c, "alpha", &[]);
    c.role("alpha", "r0", "secondary").unwrap();
    c.wait_list("beta", "r0", T, |s| s.in_sync()).unwrap();

    // Roles swapped back.
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();
    // The hooks of the last changes report too.
    c.wait_hook("alpha", "role r0 secondary primary", T)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let mut files = Vec::new();
    let (beta_lines, _) = beta.stop();
    let (alpha2_lines, _) = alpha2.stop();
    let b = check_watcher(&c, "beta", &beta_lines, &mut files);
    let a1 = check_watcher(&c, "alpha1", &alpha1_lines, &mut files);
    let a2 = check_watcher(&c, "alpha2", &alpha2_lines, &mut files);
    validate(&files);
    assert_ne!(
        alpha1_code,
        Some(0),
        "the stream of a killed hastd ends with an error"
    );
    // A new primary makes its first connection attempt before it serves
    // the device, and has the role only then.
    assert!(
        in_order(
            &a1,
            &["exists", "connect", "role init>primary", "hook role exit 0"]
        ),
        "alpha before the kill: {a1:?}"
    );
    assert!(
        in_order(
            &b,
            &[
                "exists",
                "role init>secondary",
                "connect",
                "disconnect",
                "role secondary>primary",
                "connect",
                "sync-start to-peer",
                "sync-done",
                // The primary's session ends as it leaves the role.
                "disconnect",
                "role primary>secondary",
                "connect",
            ]
        ),
        "beta: {b:?}"
    );
    assert!(
        in_order(
            &a2,
            &[
                "exists",
                "role init>secondary",
                "connect",
                "disconnect",
                "connect",
                "role secondary>primary",
                "hook role exit 0",
            ]
        ),
        "alpha after the restart: {a2:?}"
    );
    // The disconnect says why.
    let reason = beta_lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].clone())
        .find(|e| e["type"] == "disconnect")
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(!reason.is_empty(), "a disconnect without a reason");
}

/// Open descriptors of process `pid`.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn killed_and_stalled_watchers_do_not_hurt_the_daemon() {
    const RESOURCES: usize = 16;
    let mut b = Cluster::builder(Mode::auto()).timeout(5);
    for i in 0..RESOURCES {
        b = b.resource(&format!("r{i}"), 8 * MIB);
    }
    let mut c = b.build().expect("build the cluster");
    c.start("alpha").unwrap();
    let pid = c.pid("alpha").unwrap();
    let before = fds(pid);
    let good = Watcher::start(&c, "alpha", &[]);
    let killed = Watcher::start(&c, "alpha", &[]);
    let stalled = Watcher::start(&c, "alpha", &[]);
    drop(killed); // SIGKILL
    let stalled_pid = stalled.child.id() as i32;
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    unsafe { libc::kill(stalled_pid, libc::SIGSTOP) };

    // 16 resources x 2 role changes x (role + hook) per round: more events
    // than a watcher may lag behind, and more bytes than its socket holds.
    let rounds = 20;
    let mut slowest = Duration::ZERO;
    for _ in 0..rounds {
        for role in ["secondary", "init"] {
            c.hastctl_ok("alpha", &["role", role, "all"]).unwrap();
            let t = Instant::now();
            c.hastctl_ok("alpha", &["status"]).unwrap();
            slowest = slowest.max(t.elapsed());
        }
    }
    assert!(slowest < Duration::from_secs(1), "status took {slowest:?}");
    let roles = RESOURCES * 2 * rounds;
    // The reading watcher got every event, in order, none lost.
    assert!(
        hast_tests::wait_for(T, || {
            good.events().iter().filter(|e| e["type"] == "hook").count() >= roles
        }),
        "the reading watcher missed events"
    );
    let events = good.events();
    let seqs: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] != "exists")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gaps in the reading watcher's events"
    );
    assert_eq!(events.iter().filter(|e| e["type"] == "role").count(), roles);
    // The stalled one was dropped (it fell behind, or a write waited too
    // long), without anybody waiting for it.
    c.wait_for("the stalled watcher dropped", T, |c| {
        c.log("alpha").unwrap().contains("event watcher dropped")
    })
    .unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(stalled_pid, libc::SIGCONT) };
    let start = Instant::now();
    let mut stalled = stalled;
    let code = loop {
        if let Ok(Some(st)) = stalled.child.try_wait() {
            break st.code();
        }
        assert!(
            start.elapsed() < T,
            "the dropped watcher's hastctl never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(code, Some(0), "a dropped watcher ends with an error");
    drop(stalled);
    drop(good);
    // Every watcher's connection is closed again.
    c.wait_for("watchers' descriptors closed", T, |_| fds(pid) <= before)
        .unwrap_or_else(|_| panic!("hastd has {} descriptors, {before} before", fds(pid)));
    assert!(c.running("alpha"));
}

/// `name{labels} value` lines of an exposition.
fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// `curl` of `node`'s /metrics (in its namespace), checked by promtool.
fn scrape(c: &Cluster, node: &str) -> std::collections::BTreeMap<String, f64> {
    let url = format!("http://{}/metrics", c.metrics_addr(node).unwrap().unwrap());
    let out = c
        .command(node, "curl")
        .unwrap()
        .args(["-sS", "--fail", "--max-time", "10", &url])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let file = c.dir().join(format!("{node}.metrics"));
    std::fs::write(&file, &text).unwrap();
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("run promtool (make deps installs prometheus)");
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    samples(&text)
}

fn get(m: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no {key}"))
}

/// Send `request` to `node`'s metrics address from its namespace; the
/// first line of the answer.
fn raw_http(c: &Cluster, node: &str, request_py: &str) -> String {
    let addr = c.metrics_addr(node).unwrap().unwrap();
    let (host, port) = addr.split_once(':').unwrap();
    let script = format!(
        "import socket,sys\ns=socket.create_connection(('{host}',{port}),timeout=10)\n\
         try:\n    s.sendall({request_py})\nexcept OSError:\n    pass\n\
         data=b''\ntry:\n    while True:\n        b=s.recv(65536)\n        if not b: break\n        data+=b\n\
         except OSError:\n    pass\nsys.stdout.write(data.decode('latin-1').split('\\r\\n')[0])\n"
    );
    let out = c
        .command(node, hast_tests::PYTHON)
        .unwrap()
        .args(["-c", &script])
        .output()
        .expect("run python3");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn metrics_scrape_check_histograms_and_hostile_clients() {
    let mut c = Cluster::builder(Mode::auto())
        .resource("r0", 64 * MIB)
        .replication("fullsync")
        .timeout(5)
        .metrics(true)
        // Requests are timed where the userland host completes them; in
        // the kernel module they are not (hastd(8)).
        .kernel_host(false)
        .build()
        .expect("build the cluster");
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync()).unwrap();

    let fio = Command::new("fio")
        .args([
            "--name=metrics",
            "--ioengine=nbd",
            &format!("--uri={}", c.nbd_uri("alpha", "r0").unwrap()),
            "--rw=randrw",
            "--rwmixread=50",
            "--bs=4k",
            "--size=32M",
            "--io_size=8M",
            "--iodepth=8",
            "--fsync=16",
            "--output-format=terse",
        ])
        .output()
        .expect("run fio");
    assert!(
        fio.status.success(),
        "{}",
        String::from_utf8_lossy(&fio.stderr)
    );
    c.wait_list("alpha", "r0", T, |s| {
        s.queues.local + s.queues.send + s.queues.recv + s.queues.done == 0
    })
    .unwrap();

    let m = scrape(&c, "alpha");
    let list = c.list_res("alpha", "r0").unwrap();
    let l = |kind: &str| format!("{{resource=\"r0\",kind=\"{kind}\"}}");
    for kind in ["read", "write", "delete", "flush"] {
        let served = get(&m, &format!("hast_requests_total{}", l(kind)));
        let timed = get(
            &m,
            &format!("hast_request_duration_seconds_count{}", l(kind)),
        );
        assert_eq!(timed, served, "{kind}: histogram count vs request counter");
        let inf = get(
            &m,
            &format!("hast_request_duration_seconds_bucket{{resource=\"r0\",kind=\"{kind}\",le=\"+Inf\"}}"),
        );
        assert_eq!(inf, served, "{kind}: +Inf bucket");
    }
    let writes = get(&m, &format!("hast_requests_total{}", l("write")));
    let reads = get(&m, &format!("hast_requests_total{}", l("read")));
    let flushes = get(&m, &format!("hast_requests_total{}", l("flush")));
    assert!(
        writes > 0.0 && reads > 0.0 && flushes > 0.0,
        "{writes} {reads} {flushes}"
    );
    assert_eq!(
        writes as u64, list.stats.writes,
        "the counters of hastctl list"
    );
    assert_eq!(reads as u64, list.stats.reads);
    assert_eq!(
        get(&m, &format!("hast_request_bytes_total{}", l("write"))),
        writes * 4096.0
    );
    assert_eq!(
        get(
            &m,
            "hast_local_write_duration_seconds_count{resource=\"r0\"}"
        ),
        writes,
        "one local write per client write"
    );
    assert!(get(&m, "hast_remote_round_trip_seconds_count{resource=\"r0\"}") >= writes + flushes);
    assert_eq!(get(&m, "hast_role{resource=\"r0\",role=\"primary\"}"), 1.0);
    assert_eq!(get(&m, "hast_connected{resource=\"r0\"}"), 1.0);
    assert_eq!(
        get(&m, "hast_status{resource=\"r0\",status=\"complete\"}"),
        1.0
    );

    // The secondary: the requests it applied, timed.
    let m = scrape(&c, "beta");
    let served = get(&m, &format!("hast_requests_total{}", l("write")));
    assert!(served >= writes);
    assert_eq!(
        get(
            &m,
            &format!("hast_request_duration_seconds_count{}", l("write"))
        ),
        served
    );

    // Hostile clients get an error; the daemon carries on.
    let first = raw_http(
        &c,
        "alpha",
        "b'\\x00\\x01\\x02 garbage that is not HTTP\\r\\n\\r\\n'",
    );
    assert!(first.starts_with("HTTP/1.1 400"), "garbage: {first:?}");
    let first = raw_http(
        &c,
        "alpha",
        "b'GET /metrics HTTP/1.1\\r\\nX-Huge: ' + b'a' * (4 << 20) + b'\\r\\n\\r\\n'",
    );
    assert!(first.starts_with("HTTP/1.1 431"), "huge header: {first:?}");
    let first = raw_http(
        &c,
        "alpha",
        "b'POST /metrics HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 1000000000\\r\\n\\r\\n' + b'x' * 65536",
    );
    assert!(first.starts_with("HTTP/1.1 405"), "post: {first:?}");
    let first = raw_http(
        &c,
        "alpha",
        "b'GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 1000000000\\r\\n\\r\\n' + b'x' * 65536",
    );
    assert!(first.starts_with("HTTP/1.1 413"), "a body: {first:?}");
    assert!(raw_http(
        &c,
        "alpha",
        "b'GET /nothing HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'"
    )
    .starts_with("HTTP/1.1 404"));
    assert!(c.running("alpha"));
    let m = scrape(&c, "alpha");
    assert_eq!(get(&m, "hast_connected{resource=\"r0\"}"), 1.0);
    c.qemu_io(
        "alpha",
        "r0",
        &["write -P 0x44 0 64k", "read -P 0x44 0 64k"],
    )
    .unwrap();
    c.hastctl_ok("alpha", &["status"]).unwrap();
}

#[test]
fn reconnect_tries_the_peer_at_once() {
    let mut c = Cluster::builder(Mode::auto())
        .resource("r0", 32 * MIB)
        .timeout(5)
        .build()
        .expect("build the cluster");
    c.start("alpha").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    // Attempts at 0, 1, 1, 2 and 5 s, then every 10 s: wait for the sixth
    // failure, the start of a 10 s wait.
    let failures = |c: &Cluster| c.log("alpha").unwrap().matches("replication to ").count();
    c.wait_for("six failed attempts", Duration::from_secs(40), |c| {
        failures(c) >= 6
    })
    .unwrap();
    c.start("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    let t = Instant::now();
    c.hastctl_ok("alpha", &["reconnect", "r0"]).unwrap();
    c.wait_list("alpha", "r0", T, |s| {
        s.status.as_deref() == Some("complete")
    })
    .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "connected only after {:?}: the reconnect did not cut the wait",
        t.elapsed()
    );
    assert!(c.log("alpha").unwrap().contains("now, as asked"));
    // A secondary does not connect; an unknown resource is an error.
    let o = c.hastctl("beta", &["reconnect", "r0"]).unwrap();
    assert_eq!(o.code, 69, "{}", o.stderr);
    assert!(o.stderr.contains("not primary"), "{}", o.stderr);
    assert_eq!(
        c.hastctl("alpha", &["reconnect", "nosuch"]).unwrap().code,
        1
    );
}

#[test]
fn promotion_waits_are_settable() {
    let mut c = Cluster::builder(Mode::auto())
        .resource("r0", 32 * MIB)
        .timeout(5)
        .extra_conf("probe_timeout 1\nconnect_wait 0")
        .build()
        .expect("build the cluster");
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.partition_with("alpha", "beta", hast_tests::cluster::PartitionKind::Drop)
        .unwrap();
    // The peer's packets are dropped: the probe waits probe_timeout (1 s)
    // and the device is served without waiting for the first attempt
    // (connect_wait 0).
    let t = Instant::now();
    c.role("alpha", "r0", "primary").unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(4), "role primary took {took:?}");
    assert!(took >= Duration::from_secs(1), "the probe waited {took:?}");
    assert!(Path::new(&c.nbd_socket("alpha", "r0").unwrap()).exists());

    // Without the statements (a reload): the probe's 5 s, then the first
    // attempt's timeout + 1 = 6 s.
    c.role("alpha", "r0", "init").unwrap();
    let conf = std::fs::read_to_string(c.conf()).unwrap();
    let plain = conf.replace("probe_timeout 1\nconnect_wait 0\n", "");
    assert_ne!(plain, conf);
    std::fs::write(c.conf(), plain).unwrap();
    let reloads = |c: &Cluster| {
        c.log("alpha")
            .unwrap()
            .matches("configuration reloaded successfully")
            .count()
    };
    let before = reloads(&c);
    c.signal("alpha", libc::SIGHUP).unwrap();
    c.wait_for("the reload", T, |c| reloads(c) > before)
        .unwrap();
    let t = Instant::now();
    c.role("alpha", "r0", "primary").unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(9500) && took < Duration::from_secs(20),
        "role primary with the default waits took {took:?}"
    );
    c.heal_all().unwrap();
}

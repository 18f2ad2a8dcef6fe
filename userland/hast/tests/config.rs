//! hast.conf parser and address syntax: grammar, placement, defaults, inheritance,
//! host matching, addresses, errors with their line numbers and exit codes.

use std::path::{Path, PathBuf};

use hast::addr::{Addr, AddrError, AddrKind, Family, DEFAULT_PORT};
use hast::config::{
    Checksum, Compression, Config, ConfigError, HostIdentity, Problem, Replication, SecurityMode,
    DEFAULT_CONFIG, DEFAULT_CONTROL, DEFAULT_LISTEN, DEFAULT_PIDFILE, DEFAULT_TIMEOUT,
};

const CONF: &str = "/etc/hast.conf";
const UUID: &str = "6b1a2c3d-0000-4000-8000-00000000000a";

/// The host the tests run as: hasta.example.org, a UUID, hostid 42.
fn hasta() -> HostIdentity {
    HostIdentity::from_parts("hasta.example.org", Some(UUID), Some(42))
}

fn parse_as(text: &str, host: &HostIdentity) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(CONF), host)
}

fn ok(text: &str) -> Config {
    match parse_as(text, &hasta()) {
        Ok(c) => c,
        Err(e) => panic!("expected success, got: {e}\n--- text ---\n{text}"),
    }
}

/// The error of a text that must fail: (line, full message, problem).
fn fail(text: &str) -> (u32, String, Problem) {
    match parse_as(text, &hasta()) {
        Ok(c) => panic!("expected an error, got {c:?}\n--- text ---\n{text}"),
        Err(e) => {
            assert_eq!(e.exit_code(), 78, "config errors exit with EX_CONFIG: {e}");
            let line = e.line().expect("a parse error has a line");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{CONF}:{line}: ")),
                "message names path:line: {msg}"
            );
            (line, msg, e.problem().cloned().expect("problem"))
        }
    }
}

/// A minimal valid resource for hasta.
const RES: &str = "resource r {\n\tlocal /dev/da0\n\ton hasta {\n\t\tremote 10.0.0.2\n\t}\n}\n";

fn tcp(family: Family, host: &str, port: u16) -> AddrKind {
    AddrKind::Tcp {
        family,
        host: host.to_string(),
        port,
    }
}

// ---------------------------------------------------------------------------
// Defaults

#[test]
fn empty_file_gives_global_defaults() {
    let c = ok("");
    assert_eq!(c.path, PathBuf::from(CONF));
    assert_eq!(c.control.raw, DEFAULT_CONTROL);
    assert_eq!(
        c.control.kind,
        AddrKind::Unix(PathBuf::from("/var/run/hastctl"))
    );
    assert_eq!(c.pidfile, PathBuf::from(DEFAULT_PIDFILE));
    let listen: Vec<&str> = c.listen.iter().map(|a| a.raw.as_str()).collect();
    assert_eq!(listen, DEFAULT_LISTEN.to_vec());
    assert_eq!(c.listen[0].kind, tcp(Family::V4, "0.0.0.0", 8457));
    assert_eq!(c.listen[1].kind, tcp(Family::V6, "::", 8457));
    assert!(c.resources.is_empty());
    assert_eq!(DEFAULT_CONFIG, "/etc/hast.conf");
    assert_eq!(DEFAULT_PIDFILE, "/var/run/hastd.pid");
}

#[test]
fn only_comments_and_blank_lines_give_defaults() {
    let c = ok("# nothing here\n\n   \t\n# control /tmp/x\n");
    assert_eq!(c.control.raw, DEFAULT_CONTROL);
    assert_eq!(c.listen.len(), 2);
}

#[test]
fn resource_defaults() {
    let c = ok(RES);
    assert_eq!(c.resources.len(), 1);
    let r = &c.resources[0];
    assert_eq!(r.name, "r");
    assert_eq!(r.provname, "r", "provname defaults to the resource name");
    assert_eq!(r.local, PathBuf::from("/dev/da0"));
    assert_eq!(r.remote, "10.0.0.2");
    assert_eq!(
        r.remote_addr.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::Any, "10.0.0.2", DEFAULT_PORT))
    );
    assert_eq!(r.source, None);
    assert_eq!(r.replication, Replication::Memsync);
    assert_eq!(r.checksum, Checksum::None);
    assert_eq!(r.compression, Compression::Hole);
    assert_eq!(r.timeout, DEFAULT_TIMEOUT);
    assert_eq!(r.timeout, 20);
    assert_eq!(r.exec, None);
    assert!(r.metaflush);
    assert_eq!(r.nbd, None);
    assert_eq!(r.line, 1);
    assert_eq!(r.nbd_addr().raw, "/var/run/hast/r.nbd");
    assert_eq!(
        r.nbd_addr().kind,
        AddrKind::Unix(PathBuf::from("/var/run/hast/r.nbd"))
    );
}

#[test]
fn enum_names_and_numbers_match_the_reference() {
    let r = [
        (Replication::Fullsync, "fullsync", 0),
        (Replication::Memsync, "memsync", 1),
        (Replication::Async, "async", 2),
    ];
    for (v, s, n) in r {
        assert_eq!((v.as_str(), v.to_u8()), (s, n));
        assert_eq!(Replication::from_u8(n), Some(v));
    }
    let c = [
        (Checksum::None, "none", 0),
        (Checksum::Crc32, "crc32", 1),
        (Checksum::Sha256, "sha256", 2),
    ];
    for (v, s, n) in c {
        assert_eq!((v.as_str(), v.to_u8()), (s, n));
        assert_eq!(Checksum::from_u8(n), Some(v));
    }
    let z = [
        (Compression::None, "none", 0),
        (Compression::Hole, "hole", 1),
        (Compression::Lzf, "lzf", 2),
    ];
    for (v, s, n) in z {
        assert_eq!((v.as_str(), v.to_u8()), (s, n));
        assert_eq!(Compression::from_u8(n), Some(v));
    }
    assert_eq!(Replication::from_u8(3), None);
    assert_eq!(Checksum::from_u8(3), None);
    assert_eq!(Compression::from_u8(3), None);
}

// ---------------------------------------------------------------------------
// Where each statement is allowed

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ctx {
    Top,
    Node,
    Resource,
    ResNode,
}

/// A file with `stmt` placed in context `ctx`, and the line `stmt` is on.
fn place(ctx: Ctx, stmt: &str) -> (String, u32) {
    match ctx {
        Ctx::Top => (format!("{stmt}\n{RES}"), 1),
        Ctx::Node => (format!("on hasta {{\n{stmt}\n}}\n{RES}"), 2),
        Ctx::Resource => (
            format!("resource r {{\nlocal /dev/da0\non hasta {{\nremote none\n}}\n{stmt}\n}}\n"),
            6,
        ),
        Ctx::ResNode => (
            format!("resource r {{\nlocal /dev/da0\non hasta {{\nremote none\n{stmt}\n}}\n}}\n"),
            5,
        ),
    }
}

/// Every statement with a valid value, and where the reference allows it.
const PLACEMENT: &[(&str, &str, &[Ctx])] = &[
    (
        "control",
        "control uds:///tmp/hastctl",
        &[Ctx::Top, Ctx::Node],
    ),
    ("pidfile", "pidfile /tmp/hastd.pid", &[Ctx::Top, Ctx::Node]),
    ("listen", "listen 127.0.0.1:7000", &[Ctx::Top, Ctx::Node]),
    (
        "replication",
        "replication async",
        &[Ctx::Top, Ctx::Resource],
    ),
    ("checksum", "checksum crc32", &[Ctx::Top, Ctx::Resource]),
    ("compression", "compression lzf", &[Ctx::Top, Ctx::Resource]),
    ("timeout", "timeout 5", &[Ctx::Top, Ctx::Resource]),
    (
        "exec",
        "exec /usr/local/bin/hook",
        &[Ctx::Top, Ctx::Resource],
    ),
    (
        "metaflush",
        "metaflush off",
        &[Ctx::Top, Ctx::Resource, Ctx::ResNode],
    ),
    ("name", "name prov0", &[Ctx::Resource, Ctx::ResNode]),
    ("local", "local /dev/da9", &[Ctx::Resource, Ctx::ResNode]),
    ("nbd", "nbd /tmp/r.nbd", &[Ctx::Resource, Ctx::ResNode]),
    ("remote", "remote 10.9.9.9", &[Ctx::ResNode]),
    ("source", "source 10.0.0.1", &[Ctx::ResNode]),
    ("on", "on hastb { }", &[Ctx::Top, Ctx::Resource]),
    (
        "resource",
        "resource q { local /dev/q on hasta { remote none } }",
        &[Ctx::Top],
    ),
    (
        "security",
        "security none",
        &[Ctx::Top, Ctx::Node, Ctx::Resource, Ctx::ResNode],
    ),
    ("keyfile", "keyfile /etc/hast/k.pem", &[Ctx::Top, Ctx::Node]),
    (
        "peerfingerprint",
        "peerfingerprint sha256:0000000000000000000000000000000000000000000000000000000000000000",
        &[Ctx::Top, Ctx::Node, Ctx::Resource, Ctx::ResNode],
    ),
    (
        "cafile",
        "cafile /etc/hast/ca.pem",
        &[Ctx::Top, Ctx::Node, Ctx::Resource, Ctx::ResNode],
    ),
    (
        "secretfile",
        "secretfile /etc/hast/secret",
        &[Ctx::Top, Ctx::Node, Ctx::Resource, Ctx::ResNode],
    ),
];

#[test]
fn each_statement_is_accepted_exactly_where_the_reference_allows_it() {
    for &(kw, stmt, allowed) in PLACEMENT {
        for ctx in [Ctx::Top, Ctx::Node, Ctx::Resource, Ctx::ResNode] {
            let (text, line) = place(ctx, stmt);
            let res = parse_as(&text, &hasta());
            if allowed.contains(&ctx) {
                if let Err(e) = res {
                    panic!("`{stmt}` must be accepted in {ctx:?}: {e}\n{text}");
                }
            } else {
                let e = match res {
                    Ok(_) => panic!("`{stmt}` must be refused in {ctx:?}\n{text}"),
                    Err(e) => e,
                };
                assert_eq!(e.exit_code(), 78);
                assert_eq!(e.line(), Some(line), "{ctx:?} `{stmt}`: {e}");
                let msg = e.to_string();
                assert!(
                    msg.starts_with(&format!("{CONF}:{line}: found `{kw}`, expected ")),
                    "{ctx:?}: {msg}"
                );
                assert!(msg.contains(&format!("`{kw}` is allowed only ")), "{msg}");
                match e.problem() {
                    Some(Problem::Misplaced { keyword, .. }) => assert_eq!(*keyword, kw),
                    other => panic!("{ctx:?} `{stmt}`: expected Misplaced, got {other:?}"),
                }
            }
        }
    }
}

#[test]
fn misplaced_messages_say_what_is_expected_and_where_it_belongs() {
    let (line, msg, _) = fail("resource r {\n\tremote 10.0.0.2\n}\n");
    assert_eq!(line, 2);
    assert_eq!(
        msg,
        "/etc/hast.conf:2: found `remote`, expected `}` or a resource statement (replication, \
         checksum, compression, timeout, exec, metaflush, probe_timeout, connect_wait, name, \
         local, nbd, on, security, peerfingerprint, cafile, secretfile); `remote` is allowed \
         only in an `on` block inside a `resource` block"
    );
    let (line, msg, _) = fail("\n\nlocal /dev/da0\n");
    assert_eq!(line, 3);
    assert!(
        msg.contains("expected a statement (control, pidfile"),
        "{msg}"
    );
    assert!(
        msg.contains("in a `resource` block or in its `on` blocks"),
        "{msg}"
    );
}

#[test]
fn values_set_in_each_allowed_place_take_effect() {
    // Top.
    let c = ok(&format!(
        "control uds:///tmp/c\npidfile /tmp/p.pid\nlisten 127.0.0.1:7000\nreplication async\n\
         checksum crc32\ncompression lzf\ntimeout 5\nexec /bin/hook\nmetaflush off\n{RES}"
    ));
    assert_eq!(c.control.kind, AddrKind::Unix("/tmp/c".into()));
    assert_eq!(c.pidfile, PathBuf::from("/tmp/p.pid"));
    assert_eq!(c.listen.len(), 1);
    assert_eq!(c.listen[0].kind, tcp(Family::Any, "127.0.0.1", 7000));
    let r = &c.resources[0];
    assert_eq!(r.replication, Replication::Async);
    assert_eq!(r.checksum, Checksum::Crc32);
    assert_eq!(r.compression, Compression::Lzf);
    assert_eq!(r.timeout, 5);
    assert_eq!(r.exec, Some(PathBuf::from("/bin/hook")));
    assert!(!r.metaflush);
    assert_eq!(r.line, 10);

    // Top-level node block of this host.
    let c = ok(&format!(
        "on hasta {{\n control /tmp/n.sock\n pidfile /tmp/n.pid\n listen tcp6://[::1]:9\n}}\n{RES}"
    ));
    assert_eq!(c.control.kind, AddrKind::Unix("/tmp/n.sock".into()));
    assert_eq!(c.pidfile, PathBuf::from("/tmp/n.pid"));
    assert_eq!(c.listen.len(), 1);
    assert_eq!(c.listen[0].kind, tcp(Family::V6, "::1", 9));

    // Resource block.
    let c = ok("resource r {\n replication fullsync\n checksum sha256\n compression none\n \
         timeout 7\n exec /bin/h2\n metaflush off\n name p1\n local /dev/l1\n nbd uds:///tmp/r.nbd\n \
         on hasta { remote none }\n}\n");
    let r = &c.resources[0];
    assert_eq!(r.replication, Replication::Fullsync);
    assert_eq!(r.checksum, Checksum::Sha256);
    assert_eq!(r.compression, Compression::None);
    assert_eq!(r.timeout, 7);
    assert_eq!(r.exec, Some(PathBuf::from("/bin/h2")));
    assert!(!r.metaflush);
    assert_eq!(r.provname, "p1");
    assert_eq!(r.local, PathBuf::from("/dev/l1"));
    assert_eq!(
        r.nbd.as_ref().map(|a| a.kind.clone()),
        Some(AddrKind::Unix("/tmp/r.nbd".into()))
    );
    assert_eq!(r.remote, "none");
    assert_eq!(r.remote_addr, None);

    // Resource node block of this host.
    let c = ok(
        "resource r {\n on hasta {\n  name p2\n  local /dev/l2\n  remote tcp4://10.1.1.1:99\n  \
         source 10.1.1.2\n  metaflush off\n  nbd tcp://127.0.0.1:10900\n }\n}\n",
    );
    let r = &c.resources[0];
    assert_eq!(r.provname, "p2");
    assert_eq!(r.local, PathBuf::from("/dev/l2"));
    assert_eq!(r.remote, "tcp4://10.1.1.1:99");
    assert_eq!(
        r.remote_addr.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::V4, "10.1.1.1", 99))
    );
    // The reference binds the source with port 0 unless one is given.
    assert_eq!(
        r.source.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::Any, "10.1.1.2", 0))
    );
    assert!(!r.metaflush);
    assert_eq!(
        r.nbd.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::Any, "127.0.0.1", 10900))
    );

    // FreeBSD's parser accepts an IPv6 source in brackets without a port.
    let c = ok(
        "resource r {\n on hasta {\n  local /dev/l2\n  remote tcp6://[::1]:99\n  \
         source tcp6://[::1]\n }\n}\n",
    );
    assert_eq!(
        c.resources[0].source.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::V6, "::1", 0))
    );
}

#[test]
fn nbd_tcp_address_without_port_uses_the_nbd_port() {
    let c = ok("resource r {\n local /d\n nbd tcp://127.0.0.1\n on hasta { remote none }\n}\n");
    assert_eq!(
        c.resources[0].nbd.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::Any, "127.0.0.1", 10809))
    );
}

#[test]
fn nbd_is_a_keyword_only_where_a_resource_statement_starts() {
    // As a resource name, provider name, node name or path it is an ordinary word.
    let c = ok("resource nbd {\n name nbd\n local nbd\n on nbd { remote none }\n on hasta { remote none }\n}\n");
    let r = c.resource("nbd").expect("resource nbd");
    assert_eq!(r.provname, "nbd");
    assert_eq!(r.local, PathBuf::from("nbd"));
    // At top level and in a top-level on block it is refused, naming where it belongs.
    let (line, msg, p) = fail("\nnbd /tmp/x\n");
    assert_eq!(line, 2);
    assert!(
        matches!(p, Problem::Misplaced { keyword: "nbd", .. }),
        "{p:?}"
    );
    assert!(msg.contains("`nbd` is allowed only in a `resource` block or in its `on` blocks"));
    let (line, _, p) = fail("on hasta {\n\n nbd /tmp/x\n}\n");
    assert_eq!(line, 3);
    assert!(matches!(p, Problem::Misplaced { keyword: "nbd", .. }));
}

#[test]
fn metrics_is_off_by_default_global_or_per_node() {
    assert_eq!(ok(RES).metrics, None);
    let c = ok(&format!("metrics 127.0.0.1\n{RES}"));
    assert_eq!(
        c.metrics.map(|a| a.kind),
        Some(tcp(Family::Any, "127.0.0.1", 9458))
    );
    // This host's top-level on block beats the global statement, wherever
    // they stand; another host's block does not count.
    let c = ok(&format!(
        "on hasta {{\n metrics tcp4://10.0.0.1:9100\n}}\non hastb {{\n metrics 10.0.0.2\n}}\n\
         metrics 127.0.0.1:9999\n{RES}"
    ));
    assert_eq!(
        c.metrics.map(|a| a.kind),
        Some(tcp(Family::V4, "10.0.0.1", 9100))
    );
    // A resource name, path or node called metrics is an ordinary word.
    let c = ok("resource metrics {\n local metrics\n on hasta { remote none }\n}\n");
    assert!(c.resource("metrics").is_some());
}

#[test]
fn metrics_errors_name_the_line() {
    let (line, _, p) = fail(&format!("{RES}\nmetrics\n"));
    assert_eq!(line, 8);
    assert!(matches!(p, Problem::Unexpected { .. }), "{p:?}");
    let (line, msg, p) =
        fail("resource r {\n local /d\n\n metrics 127.0.0.1\n on hasta { remote none }\n}\n");
    assert_eq!(line, 4);
    assert!(
        matches!(
            p,
            Problem::Misplaced {
                keyword: "metrics",
                ..
            }
        ),
        "{p:?}"
    );
    assert!(msg.contains("`metrics` is allowed only at top level or in a top-level `on` block"));
    let (line, _, p) = fail(&format!("metrics 127.0.0.1:99999\n{RES}"));
    assert_eq!(line, 1);
    assert!(
        matches!(
            p,
            Problem::BadAddress {
                statement: "metrics",
                ..
            }
        ),
        "{p:?}"
    );
}

#[test]
fn promotion_waits_default_inherit_and_are_checked() {
    let c = ok(&format!("timeout 7\n{RES}"));
    let r = &c.resources[0];
    assert_eq!((r.probe_timeout, r.connect_wait), (5, None));
    assert_eq!(r.probe_wait(), std::time::Duration::from_secs(5));
    // The first connection attempt's wait: timeout + 1 unless set.
    assert_eq!(r.first_connect_wait(), std::time::Duration::from_secs(8));
    let c = ok(
        "probe_timeout 2\nconnect_wait 0\nresource a {\n probe_timeout 9\n connect_wait 3\n \
         local /d\n on hasta { remote none }\n}\nresource b {\n local /d\n on hasta { remote none }\n}\n",
    );
    let (a, b) = (c.resource("a").unwrap(), c.resource("b").unwrap());
    assert_eq!((a.probe_timeout, a.connect_wait), (9, Some(3)));
    assert_eq!((b.probe_timeout, b.connect_wait), (2, Some(0)));
    assert_eq!(b.first_connect_wait(), std::time::Duration::ZERO);
    let (line, msg, p) = fail(&format!("{RES}probe_timeout 0\n"));
    assert_eq!(line, 7);
    assert!(
        matches!(
            p,
            Problem::BadSeconds {
                statement: "probe_timeout",
                ..
            }
        ),
        "{p:?}"
    );
    assert!(
        msg.contains("probe_timeout 0 is out of range (1 to 2147483647 seconds)"),
        "{msg}"
    );
    let (_, _, p) = fail(&format!("connect_wait 4294967296\n{RES}"));
    assert!(
        matches!(
            p,
            Problem::BadSeconds {
                statement: "connect_wait",
                ..
            }
        ),
        "{p:?}"
    );
    let (line, _, p) =
        fail("resource r {\n local /d\n on hasta {\n  remote none\n  connect_wait 1\n }\n}\n");
    assert_eq!(line, 5);
    assert!(
        matches!(
            p,
            Problem::Misplaced {
                keyword: "connect_wait",
                ..
            }
        ),
        "{p:?}"
    );
}

// ---------------------------------------------------------------------------
// Inheritance

#[test]
fn resource_settings_override_globals() {
    let c = ok(
        "replication fullsync\nchecksum crc32\ncompression none\ntimeout 9\nexec /g\n\
         metaflush off\nresource a {\n replication async\n checksum sha256\n compression lzf\n \
         timeout 3\n exec /r\n metaflush on\n local /d\n on hasta { remote none }\n}\n\
         resource b {\n local /d\n on hasta { remote none }\n}\n",
    );
    let a = c.resource("a").unwrap();
    assert_eq!(
        (
            a.replication,
            a.checksum,
            a.compression,
            a.timeout,
            a.exec.clone(),
            a.metaflush
        ),
        (
            Replication::Async,
            Checksum::Sha256,
            Compression::Lzf,
            3,
            Some("/r".into()),
            true
        )
    );
    let b = c.resource("b").unwrap();
    assert_eq!(
        (
            b.replication,
            b.checksum,
            b.compression,
            b.timeout,
            b.exec.clone(),
            b.metaflush
        ),
        (
            Replication::Fullsync,
            Checksum::Crc32,
            Compression::None,
            9,
            Some("/g".into()),
            false
        )
    );
}

#[test]
fn globals_after_resources_still_apply() {
    let c = ok(&format!(
        "{RES}replication async\nchecksum sha256\ncompression lzf\ntimeout 11\nexec /late\n\
         metaflush off\ncontrol /tmp/late.sock\npidfile /tmp/late.pid\nlisten 10.0.0.1\n"
    ));
    let r = &c.resources[0];
    assert_eq!(r.replication, Replication::Async);
    assert_eq!(r.checksum, Checksum::Sha256);
    assert_eq!(r.compression, Compression::Lzf);
    assert_eq!(r.timeout, 11);
    assert_eq!(r.exec, Some(PathBuf::from("/late")));
    assert!(!r.metaflush);
    assert_eq!(c.control.raw, "/tmp/late.sock");
    assert_eq!(c.pidfile, PathBuf::from("/tmp/late.pid"));
    assert_eq!(
        c.listen.iter().map(|a| a.raw.as_str()).collect::<Vec<_>>(),
        ["10.0.0.1"]
    );
}

#[test]
fn a_global_after_a_resource_does_not_override_the_resource() {
    let c = ok("resource r {\n timeout 4\n local /d\n on hasta { remote none }\n}\ntimeout 40\n");
    assert_eq!(c.resources[0].timeout, 4);
}

#[test]
fn metaflush_res_node_beats_resource_beats_global() {
    // Resource-level after the node block: the node block still wins.
    let c = ok(
        "metaflush on\nresource r {\n local /d\n on hasta {\n  remote none\n  metaflush off\n }\n \
         metaflush on\n}\n",
    );
    assert!(!c.resources[0].metaflush);
    let c = ok("metaflush off\nresource r {\n local /d\n on hasta {\n  remote none\n  metaflush on\n }\n}\n");
    assert!(c.resources[0].metaflush);
    let c =
        ok("metaflush on\nresource r {\n metaflush off\n local /d\n on hasta { remote none }\n}\n");
    assert!(!c.resources[0].metaflush);
    // Another host's node block does not count.
    let c =
        ok("resource r {\n local /d\n on hasta { remote none }\n on hastb { metaflush off }\n}\n");
    assert!(c.resources[0].metaflush);
}

#[test]
fn name_and_local_res_node_beats_resource_in_any_order() {
    let c = ok(
        "resource r {\n on hasta {\n  remote none\n  name pn\n  local /dev/node\n }\n \
         name pr\n local /dev/res\n}\n",
    );
    assert_eq!(c.resources[0].provname, "pn");
    assert_eq!(c.resources[0].local, PathBuf::from("/dev/node"));
    let c = ok(
        "resource r {\n name pr\n local /dev/res\n on hasta { remote none }\n \
         on hastb { name other local /dev/other }\n}\n",
    );
    assert_eq!(c.resources[0].provname, "pr");
    assert_eq!(c.resources[0].local, PathBuf::from("/dev/res"));
}

#[test]
fn nbd_res_node_beats_resource() {
    let c = ok(
        "resource r {\n nbd /tmp/res.sock\n local /d\n on hasta {\n  remote none\n  \
         nbd /tmp/node.sock\n }\n}\n",
    );
    assert_eq!(
        c.resources[0].nbd.as_ref().map(|a| a.raw.as_str()),
        Some("/tmp/node.sock")
    );
    let c = ok(
        "resource r {\n nbd /tmp/res.sock\n local /d\n on hasta { remote none }\n \
         on hastb { nbd /tmp/b.sock }\n}\n",
    );
    assert_eq!(
        c.resources[0].nbd.as_ref().map(|a| a.raw.as_str()),
        Some("/tmp/res.sock")
    );
}

#[test]
fn control_and_pidfile_of_this_node_beat_globals_in_any_order() {
    let c = ok(
        "on hasta {\n control /tmp/node.sock\n pidfile /tmp/node.pid\n}\n\
         control /tmp/global.sock\npidfile /tmp/global.pid\n",
    );
    assert_eq!(c.control.raw, "/tmp/node.sock");
    assert_eq!(c.pidfile, PathBuf::from("/tmp/node.pid"));
    // Another node's block is ignored.
    let c =
        ok("control /tmp/global.sock\non hastb {\n control /tmp/b.sock\n pidfile /tmp/b.pid\n}\n");
    assert_eq!(c.control.raw, "/tmp/global.sock");
    assert_eq!(c.pidfile, PathBuf::from(DEFAULT_PIDFILE));
}

#[test]
fn listen_is_the_union_of_globals_and_this_nodes_blocks_in_file_order() {
    let c = ok(
        "listen 10.0.0.1\non hasta {\n listen 10.0.0.2\n}\non hastb {\n listen 10.0.0.3\n}\n\
         listen [2001:db8::1]:9000\non hasta.example.org { listen 10.0.0.4 }\n",
    );
    let got: Vec<&str> = c.listen.iter().map(|a| a.raw.as_str()).collect();
    assert_eq!(
        got,
        ["10.0.0.1", "10.0.0.2", "[2001:db8::1]:9000", "10.0.0.4"]
    );
    // Only another node's listen: the defaults stay.
    let c = ok("on hastb {\n listen 10.0.0.3\n}\n");
    let got: Vec<&str> = c.listen.iter().map(|a| a.raw.as_str()).collect();
    assert_eq!(got, DEFAULT_LISTEN.to_vec());
    // Only this node's listen: no defaults.
    let c = ok("on hasta {\n listen 10.0.0.2\n}\n");
    assert_eq!(c.listen.len(), 1);
}

#[test]
fn repeated_statements_last_one_counts() {
    let c = ok(
        "control /tmp/a\ncontrol /tmp/b\nresource r {\n local /d1\n local /d2\n \
         on hasta {\n  remote 10.0.0.1\n  remote 10.0.0.2\n }\n on hasta { source 10.0.0.7 }\n}\n",
    );
    assert_eq!(c.control.raw, "/tmp/b");
    let r = &c.resources[0];
    assert_eq!(r.local, PathBuf::from("/d2"));
    assert_eq!(r.remote, "10.0.0.2");
    assert_eq!(r.source.as_ref().map(|a| a.raw.as_str()), Some("10.0.0.7"));
}

#[test]
fn two_blocks_naming_this_host_differently_both_apply_later_wins() {
    let c = ok("resource r {\n local /d\n on hasta { remote 10.0.0.1 }\n \
         on hasta.example.org { remote 10.0.0.2 }\n}\n");
    assert_eq!(c.resources[0].remote, "10.0.0.2");
}

#[test]
fn resources_are_kept_in_file_order_with_their_lines() {
    let c = ok("resource zz {\n local /d\n on hasta { remote none }\n}\n\n\
         resource aa {\n local /d\n on hasta { remote none }\n}\n");
    let names: Vec<(&str, u32)> = c
        .resources
        .iter()
        .map(|r| (r.name.as_str(), r.line))
        .collect();
    assert_eq!(names, [("zz", 1), ("aa", 6)]);
    assert!(c.resource("aa").is_some());
    assert!(c.resource("missing").is_none());
}

// ---------------------------------------------------------------------------
// Host matching

#[test]
fn on_block_matches_full_hostname_short_hostname_uuid_and_hostid() {
    for name in [
        "hasta.example.org",
        "hasta",
        UUID,
        &UUID.to_uppercase(),
        "6B1a2c3D-0000-4000-8000-00000000000A",
        "hostid42",
    ] {
        let text = format!("resource r {{\n local /d\n on {name} {{ remote 10.0.0.2 }}\n}}\n");
        let c = ok(&text);
        assert_eq!(c.resources[0].remote, "10.0.0.2", "on {name}");
    }
}

#[test]
fn host_identity_rules() {
    let h = hasta();
    assert!(h.matches("hasta.example.org"));
    assert!(h.matches("hasta"));
    assert!(
        !h.matches("hasta.example"),
        "only the part before the first dot"
    );
    assert!(!h.matches("HASTA"), "hostnames compare case-sensitively");
    assert!(!h.matches("hostid43"));
    assert!(!h.matches("hostid042"));
    assert!(!h.matches("hastb"));
    assert_eq!(
        h.names(),
        ["hasta", "hasta.example.org", UUID, "hostid42"]
            .map(String::from)
            .to_vec()
    );
    // No dot: no short name, the full name matches.
    let h = HostIdentity::from_parts("vm", None, None);
    assert!(h.matches("vm"));
    assert!(!h.matches("hostid0"));
    assert_eq!(h.names(), vec!["vm".to_string()]);
    // A leading dot gives no short name.
    let h = HostIdentity::from_parts(".odd", None, Some(7));
    assert_eq!(h.names(), [".odd", "hostid7"].map(String::from).to_vec());
}

#[test]
fn node_override_matches_only_that_name() {
    let n = HostIdentity::node("hastb");
    assert!(n.matches("hastb"));
    assert!(!n.matches("hastb.example.org"));
    assert!(!n.matches("HASTB"));
    assert_eq!(n.names(), vec!["hastb".to_string()]);
    let text = "resource r {\n local /d\n on hasta { remote 10.0.0.2 }\n on hastb { remote 10.0.0.1 }\n}\n";
    let c = parse_as(text, &n).unwrap();
    assert_eq!(c.resources[0].remote, "10.0.0.1");
    let e = parse_as(text, &HostIdentity::node("hasta.example.org")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/etc/hast.conf:1: resource r: none of its on blocks matches this host \
         (accepted names: hasta.example.org)"
    );
}

#[test]
fn detect_uses_the_real_hostname_and_hostid() {
    let h = HostIdentity::detect();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    assert!(h.matches(&hostname), "{hostname} in {:?}", h.names());
    assert!(h.names().contains(&hostname));
    // hostid(1) prints gethostid() in hex.
    if let Ok(out) = std::process::Command::new("hostid").output() {
        let hex = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let id = u64::from_str_radix(&hex, 16).expect("hostid output is hex");
        assert!(
            h.matches(&format!("hostid{id}")),
            "hostid{id} in {:?}",
            h.names()
        );
    }
    // The machine id (when there is no text UUID in /etc/hostid) in both forms.
    let hostid_is_uuid = std::fs::read_to_string("/etc/hostid")
        .map(|s| s.trim().len() == 36)
        .unwrap_or(false);
    if let (false, Ok(mid)) = (hostid_is_uuid, std::fs::read_to_string("/etc/machine-id")) {
        let mid = mid.trim();
        if mid.len() == 32 {
            assert!(h.matches(mid));
            assert!(h.matches(&mid.to_uppercase()));
            let dashed = format!(
                "{}-{}-{}-{}-{}",
                &mid[0..8],
                &mid[8..12],
                &mid[12..16],
                &mid[16..20],
                &mid[20..32]
            );
            assert!(h.matches(&dashed));
        }
    }
}

#[test]
fn uuids_come_from_a_text_hostid_file_or_the_machine_id() {
    let dir = tempfile::tempdir().unwrap();
    let hostid = dir.path().join("hostid");
    let mid = dir.path().join("machine-id");
    let missing = dir.path().join("missing");
    std::fs::write(&mid, "3d1219c7c4c5404aaa1f6d2a48adfda4\n").unwrap();
    // FreeBSD-style /etc/hostid holds kern.hostuuid in text: it wins.
    std::fs::write(&hostid, "A1B2C3D4-0000-1111-2222-333344445555\n").unwrap();
    assert_eq!(
        HostIdentity::uuids_from_files(&hostid, &mid),
        vec!["A1B2C3D4-0000-1111-2222-333344445555".to_string()]
    );
    // glibc-style binary /etc/hostid: the machine id, as written and as a UUID.
    std::fs::write(&hostid, [0x00u8, 0x01, 0x7f, 0x00]).unwrap();
    assert_eq!(
        HostIdentity::uuids_from_files(&hostid, &mid),
        vec![
            "3d1219c7c4c5404aaa1f6d2a48adfda4".to_string(),
            "3d1219c7-c4c5-404a-aa1f-6d2a48adfda4".to_string()
        ]
    );
    assert_eq!(HostIdentity::uuids_from_files(&missing, &mid).len(), 2);
    std::fs::write(&mid, "not-a-machine-id\n").unwrap();
    assert!(HostIdentity::uuids_from_files(&missing, &mid).is_empty());
    assert!(HostIdentity::uuids_from_files(&missing, &missing).is_empty());
}

#[test]
fn resource_without_a_block_for_this_host_is_an_error_listing_accepted_names() {
    let (line, msg, p) = fail(&format!(
        "{RES}\nresource other {{\n local /d\n on hastb {{ remote 10.0.0.1 }}\n on hastc {{ remote none }}\n}}\n"
    ));
    assert_eq!(line, 8, "the line of the `resource` keyword");
    assert_eq!(
        msg,
        format!(
            "/etc/hast.conf:8: resource other: none of its on blocks matches this host \
             (accepted names: hasta, hasta.example.org, {UUID}, hostid42)"
        )
    );
    assert!(matches!(p, Problem::NoBlockForHost { ref name, .. } if name == "other"));
    // An empty resource has no block for this host either (checked before local/remote).
    let (line, _, p) = fail("\nresource e {\n}\n");
    assert_eq!(line, 2);
    assert!(matches!(p, Problem::NoBlockForHost { .. }));
}

#[test]
fn missing_remote_or_local_is_an_error() {
    let (line, msg, p) = fail("\n\nresource r {\n local /d\n on hasta { source 10.0.0.1 }\n on hastb { remote 10.0.0.1 }\n}\n");
    assert_eq!(line, 3);
    assert_eq!(p, Problem::NoRemote { name: "r".into() });
    assert!(
        msg.contains("resource r: no remote address for this host"),
        "{msg}"
    );
    let (line, msg, p) =
        fail("resource r {\n on hasta { remote none }\n on hastb { local /d }\n}\n");
    assert_eq!(line, 1);
    assert_eq!(p, Problem::NoLocal { name: "r".into() });
    assert!(
        msg.contains("resource r: no local path for this host"),
        "{msg}"
    );
    // remote is checked before local, as in the reference.
    let (_, _, p) = fail("resource r {\n on hasta { }\n}\n");
    assert_eq!(p, Problem::NoRemote { name: "r".into() });
}

// ---------------------------------------------------------------------------
// Other semantic errors

#[test]
fn resource_defined_twice_is_an_error_at_the_second() {
    let (line, msg, p) = fail(&format!("{RES}\n{RES}"));
    assert_eq!(line, 8);
    assert_eq!(
        p,
        Problem::DuplicateResource {
            name: "r".into(),
            first_line: 1
        }
    );
    assert_eq!(
        msg,
        "/etc/hast.conf:8: resource r is defined twice (first on line 1)"
    );
}

#[test]
fn timeout_must_be_a_positive_number() {
    let (line, msg, p) = fail("\ntimeout 0\n");
    assert_eq!(line, 2);
    assert_eq!(p, Problem::BadTimeout("0".into()));
    assert_eq!(
        msg,
        "/etc/hast.conf:2: timeout 0 is out of range (1 to 2147483647 seconds)"
    );
    let (line, _, p) =
        fail("resource r {\n local /d\n timeout 000\n on hasta { remote none }\n}\n");
    assert_eq!((line, p), (3, Problem::BadTimeout("000".into())));
    let (_, _, p) = fail("timeout 2147483648\n");
    assert_eq!(p, Problem::BadTimeout("2147483648".into()));
    let (_, _, p) = fail("timeout 99999999999999999999999\n");
    assert!(matches!(p, Problem::BadTimeout(_)));
    let (line, msg, _) = fail("\n\ntimeout -1\n");
    assert_eq!(line, 3);
    assert!(
        msg.contains("found '-1', expected a number of seconds after `timeout`"),
        "{msg}"
    );
    let (_, msg, _) = fail("timeout 10s\n");
    assert!(
        msg.contains("found '10s', expected a number of seconds"),
        "{msg}"
    );
    let (_, msg, _) = fail("timeout none\n");
    assert!(
        msg.contains("found keyword `none`, expected a number of seconds"),
        "{msg}"
    );
    let c = ok(&format!("timeout 2147483647\n{RES}"));
    assert_eq!(c.resources[0].timeout, 2147483647);
    let c = ok(&format!("timeout 007\n{RES}"));
    assert_eq!(c.resources[0].timeout, 7);
}

#[test]
fn choice_values_are_checked() {
    let cases = [
        (
            "replication sync",
            "found 'sync', expected fullsync, memsync or async after `replication`",
        ),
        (
            "replication FULLSYNC",
            "found 'FULLSYNC', expected fullsync, memsync or async",
        ),
        (
            "checksum md5",
            "found 'md5', expected none, crc32 or sha256 after `checksum`",
        ),
        (
            "checksum hole",
            "found keyword `hole`, expected none, crc32 or sha256",
        ),
        (
            "compression crc32",
            "found keyword `crc32`, expected none, hole or lzf after `compression`",
        ),
        (
            "metaflush yes",
            "found 'yes', expected on or off after `metaflush`",
        ),
        (
            "metaflush 1",
            "found number 1, expected on or off after `metaflush`",
        ),
    ];
    for (stmt, want) in cases {
        let (line, msg, _) = fail(&format!("# c\n{stmt}\n"));
        assert_eq!(line, 2, "{stmt}");
        assert!(msg.contains(want), "{stmt}: {msg}");
    }
    let (line, msg, _) = fail("metaflush\n\n");
    assert_eq!(line, 1);
    assert!(
        msg.contains("found end of file, expected on or off"),
        "{msg}"
    );
}

#[test]
fn remote_none_and_source_none() {
    let c = ok("resource r {\n local /d\n on hasta { remote none }\n}\n");
    assert_eq!(c.resources[0].remote, "none");
    assert_eq!(c.resources[0].remote_addr, None);
    // `none` is only special for remote.
    let (line, msg, p) =
        fail("resource r {\n local /d\n on hasta {\n  remote none\n  source none\n }\n}\n");
    assert_eq!(line, 5);
    assert!(matches!(p, Problem::NotAWord { .. }), "{p:?}");
    assert!(
        msg.contains("found keyword `none`, expected an address after `source`"),
        "{msg}"
    );
}

#[test]
fn names_and_paths_have_the_reference_length_limits() {
    let long = "n".repeat(254);
    let c = ok(&format!(
        "resource {long} {{\n local /d\n on hasta {{ remote none }}\n}}\n"
    ));
    assert_eq!(c.resources[0].name, long);
    let (line, msg, p) = fail(&format!(
        "\nresource {long}x {{\n local /d\n on hasta {{ remote none }}\n}}\n"
    ));
    assert_eq!(line, 2);
    assert_eq!(
        p,
        Problem::TooLong {
            what: "resource name",
            len: 255,
            max: 254
        }
    );
    assert!(msg.contains("resource name is too long (255 bytes, at most 254)"));
    let (_, _, p) = fail(&format!("resource r {{\n name {long}x\n}}\n"));
    assert!(matches!(
        p,
        Problem::TooLong {
            what: "provider name",
            ..
        }
    ));
    let path = format!("/{}", "p".repeat(1023));
    let (line, _, p) = fail(&format!("resource r {{\n\n local {path}\n}}\n"));
    assert_eq!(line, 3);
    assert!(matches!(
        p,
        Problem::TooLong {
            what: "local path",
            len: 1024,
            max: 1023
        }
    ));
    let (_, _, p) = fail(&format!("exec {path}\n"));
    assert!(matches!(
        p,
        Problem::TooLong {
            what: "exec path",
            ..
        }
    ));
    let (_, _, p) = fail(&format!("pidfile {path}\n"));
    assert!(matches!(
        p,
        Problem::TooLong {
            what: "pidfile path",
            ..
        }
    ));
    let (_, _, p) = fail(&format!("listen {}\n", "h".repeat(1024)));
    assert!(matches!(
        p,
        Problem::TooLong {
            what: "address",
            ..
        }
    ));
}

// ---------------------------------------------------------------------------
// Lexing and syntax

#[test]
fn keywords_are_case_sensitive() {
    let (line, msg, _) = fail("\nControl /tmp/x\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("found 'Control', expected a statement"),
        "{msg}"
    );
    let (_, msg, _) = fail("RESOURCE r {\n}\n");
    assert!(msg.contains("found 'RESOURCE'"), "{msg}");
}

#[test]
fn all_digit_or_keyword_names_are_refused_as_there_is_no_quoting() {
    let cases = [
        (
            "resource 123 {",
            "found number 123, expected a resource name after `resource`",
        ),
        (
            "resource local {",
            "found keyword `local`, expected a resource name",
        ),
        (
            "on 42 {",
            "found number 42, expected a node name after `on`",
        ),
        ("on none {", "found keyword `none`, expected a node name"),
        (
            "pidfile on",
            "found keyword `on`, expected a path after `pidfile`",
        ),
        ("exec 0", "found number 0, expected a path after `exec`"),
        (
            "control 8457",
            "found number 8457, expected an address after `control`",
        ),
    ];
    for (text, want) in cases {
        let (line, msg, p) = fail(&format!("\n\n\n{text}\n"));
        assert_eq!(line, 4, "{text}");
        assert!(matches!(p, Problem::NotAWord { .. }), "{text}: {p:?}");
        assert!(msg.contains(want), "{text}: {msg}");
        assert!(msg.contains("there is no quoting"), "{msg}");
    }
    // Digits followed by letters make a word.
    let c = ok("resource 1a {\n local /d\n on hasta { remote none }\n}\n");
    assert_eq!(c.resources[0].name, "1a");
    // A keyword prefix is still a word.
    let c = ok("resource online {\n local /dev/localdisk\n on hasta { remote none }\n}\n");
    assert_eq!(c.resources[0].name, "online");
}

#[test]
fn characters_outside_the_word_set_are_lexical_errors_with_their_line() {
    for (text, c, line) in [
        ("control \"/tmp/x\"\n", '"', 1),
        ("\n\nlisten 10.0.0.1;\n", ';', 3),
        ("resource r {\n local /dev/da0,\n}\n", ',', 2),
        ("\nexec /bin/hook=1\n", '=', 2),
        ("listen *:8457\n", '*', 1),
        ("resource r {\n name dé\n}\n", 'é', 2),
        ("listen 10.0.0.1\x0c\n", '\x0c', 1),
    ] {
        let (l, msg, p) = fail(text);
        assert_eq!(l, line, "{text:?}");
        assert_eq!(p, Problem::BadChar(c), "{text:?}");
        assert!(msg.contains("unexpected character"), "{msg}");
    }
}

#[test]
fn comments_whitespace_and_braces_lex_like_the_reference() {
    let text = "# header; with \"odd\" chars { }\r\n\
                control /tmp/c.sock# comment glued to a word\r\n\
                \tlisten\t10.0.0.1   # trailing\r\n\
                resource r{local /dev/da0 on hasta{remote none}}# all on one line\n\
                resource s\n{\n\tlocal\n/dev/s\n\ton\nhasta\n{\nremote\nnone\n}\n}\n";
    let c = ok(text);
    assert_eq!(c.control.raw, "/tmp/c.sock");
    assert_eq!(c.listen[0].raw, "10.0.0.1");
    assert_eq!(c.resources.len(), 2);
    assert_eq!(c.resources[0].local, PathBuf::from("/dev/da0"));
    assert_eq!(
        (c.resources[1].name.as_str(), c.resources[1].line),
        ("s", 5)
    );
    assert_eq!(c.resources[1].local, PathBuf::from("/dev/s"));
}

#[test]
fn unbalanced_braces_and_missing_pieces() {
    let (line, msg, _) = fail("resource r {\n local /d\n on hasta {\n  remote none\n }\n\n");
    assert_eq!(
        line, 5,
        "end of file is reported at the line of the last token"
    );
    assert!(
        msg.contains(
            "found end of file, expected `}` closing the `resource` block opened on line 1"
        ),
        "{msg}"
    );
    let (line, msg, _) = fail("resource r {\n local /d\n on hasta {\n  remote none\n");
    assert_eq!(line, 4);
    assert!(
        msg.contains("closing the `on` block of the resource opened on line 3"),
        "{msg}"
    );
    let (line, msg, _) = fail("on hasta {\n listen 10.0.0.1\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("closing the `on` block opened on line 1"),
        "{msg}"
    );
    let (line, msg, _) = fail("\n}\n");
    assert_eq!(line, 2);
    assert!(msg.contains("found `}` without a matching `{`"), "{msg}");
    let (line, msg, _) = fail(&format!("{RES}}}\n"));
    assert_eq!(line, 7);
    assert!(msg.contains("without a matching"), "{msg}");
    let (line, msg, _) = fail("\nresource r\nlocal /d\n");
    assert_eq!(line, 3);
    assert!(
        msg.contains("found keyword `local`, expected `{` after `resource r`"),
        "{msg}"
    );
    let (line, msg, _) = fail("on hasta listen 10.0.0.1\n");
    assert_eq!(line, 1);
    assert!(msg.contains("expected `{` after `on hasta`"), "{msg}");
    let (line, msg, _) = fail("resource r {\n {\n}\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("found `{`, expected `}` or a resource statement"),
        "{msg}"
    );
    let (_, msg, _) = fail("listen\n");
    assert!(
        msg.contains("found end of file, expected an address after `listen`"),
        "{msg}"
    );
    let (line, msg, _) = fail("\non\n{\n}\n");
    assert_eq!(line, 3);
    assert!(
        msg.contains("found `{`, expected a node name after `on`"),
        "{msg}"
    );
    let (line, msg, _) = fail("off\n");
    assert_eq!(line, 1);
    assert!(
        msg.contains("found keyword `off`, expected a statement"),
        "{msg}"
    );
    let (_, msg, _) = fail("42\n");
    assert!(
        msg.contains("found number 42, expected a statement"),
        "{msg}"
    );
    let (_, msg, _) = fail("on hasta {\n on hastb { }\n}\n");
    assert!(
        msg.contains(
            "found `on`, expected `}` or a node statement (control, pidfile, listen, metrics, \
             security, keyfile, peerfingerprint, cafile, secretfile)"
        ),
        "{msg}"
    );
}

#[test]
fn values_in_other_hosts_blocks_are_checked_too() {
    let (line, _, p) = fail("on hastb {\n listen 10.0.0.1:99999\n}\n");
    assert_eq!(line, 2);
    assert!(
        matches!(
            p,
            Problem::BadAddress {
                statement: "listen",
                ..
            }
        ),
        "{p:?}"
    );
    let (line, _, p) = fail("resource r {\n local /d\n on hasta { remote none }\n on hastb {\n  remote tcp4://[::1]:80\n }\n}\n");
    assert_eq!(line, 5);
    assert!(
        matches!(
            p,
            Problem::BadAddress {
                statement: "remote",
                ..
            }
        ),
        "{p:?}"
    );
    // Placement is checked in other hosts' blocks as well.
    let (line, _, p) = fail("on hastb {\n\n replication async\n}\n");
    assert_eq!(line, 3);
    assert!(matches!(
        p,
        Problem::Misplaced {
            keyword: "replication",
            ..
        }
    ));
}

#[test]
fn bad_addresses_in_the_file_are_errors_at_their_line() {
    let cases: &[(&str, &str)] = &[
        ("control http://x", "control"),
        ("listen tcp6://10.0.0.1", "listen"),
        ("listen 10.0.0.1:0", "listen"),
        ("listen host:", "listen"),
        ("listen [::1]:", "listen"),
        ("control uds://", "control"),
        ("listen tcp://2001:db8::1/64", "listen"),
    ];
    for (stmt, kw) in cases {
        let (line, msg, p) = fail(&format!("\n{stmt}\n"));
        assert_eq!(line, 2, "{stmt}");
        assert!(
            matches!(p, Problem::BadAddress { statement, .. } if statement == *kw),
            "{stmt}: {p:?}"
        );
        assert!(
            msg.starts_with(&format!("/etc/hast.conf:2: `{kw}`: address ")),
            "{msg}"
        );
    }
    let (line, _, p) =
        fail("resource r {\n local /d\n on hasta {\n  remote none\n  source 10.0.0.1:x\n }\n}\n");
    assert_eq!(line, 5);
    assert!(matches!(
        p,
        Problem::BadAddress {
            statement: "source",
            ..
        }
    ));
    let (line, _, p) = fail("resource r {\n nbd ftp://h\n}\n");
    assert_eq!(line, 2);
    assert!(matches!(
        p,
        Problem::BadAddress {
            statement: "nbd",
            ..
        }
    ));
}

// ---------------------------------------------------------------------------
// Addresses

#[test]
fn every_address_form_parses() {
    let cases: Vec<(&str, AddrKind)> = vec![
        ("tcp://10.0.0.1:1234", tcp(Family::Any, "10.0.0.1", 1234)),
        ("tcp://10.0.0.1", tcp(Family::Any, "10.0.0.1", DEFAULT_PORT)),
        (
            "TCP://host.example.org:80",
            tcp(Family::Any, "host.example.org", 80),
        ),
        ("tcp4://0.0.0.0:8457", tcp(Family::V4, "0.0.0.0", 8457)),
        ("Tcp4://10.0.0.1", tcp(Family::V4, "10.0.0.1", DEFAULT_PORT)),
        ("tcp4://somehost", tcp(Family::V4, "somehost", DEFAULT_PORT)),
        ("tcp6://[::]:8457", tcp(Family::V6, "::", 8457)),
        ("TCP6://[fe80::1]:9", tcp(Family::V6, "fe80::1", 9)),
        (
            "tcp6://2001:db8::2",
            tcp(Family::V6, "2001:db8::2", DEFAULT_PORT),
        ),
        ("tcp://[2001:db8::1]:7", tcp(Family::Any, "2001:db8::1", 7)),
        // FreeBSD's parser takes any string here; an IPv6 address in
        // brackets without a port means the default port.
        ("[::1]", tcp(Family::Any, "::1", DEFAULT_PORT)),
        ("tcp6://[fe80::1]", tcp(Family::V6, "fe80::1", DEFAULT_PORT)),
        ("[2001:db8::1]:8000", tcp(Family::Any, "2001:db8::1", 8000)),
        ("2001:db8::1", tcp(Family::Any, "2001:db8::1", DEFAULT_PORT)),
        ("::1", tcp(Family::Any, "::1", DEFAULT_PORT)),
        (
            "::ffff:10.0.0.1",
            tcp(Family::Any, "::ffff:10.0.0.1", DEFAULT_PORT),
        ),
        (
            "host.example.org:8458",
            tcp(Family::Any, "host.example.org", 8458),
        ),
        ("10.0.0.2:65535", tcp(Family::Any, "10.0.0.2", 65535)),
        ("10.0.0.2:00080", tcp(Family::Any, "10.0.0.2", 80)),
        ("hastb", tcp(Family::Any, "hastb", DEFAULT_PORT)),
        ("my_host-2", tcp(Family::Any, "my_host-2", DEFAULT_PORT)),
        ("10.0.0.2", tcp(Family::Any, "10.0.0.2", DEFAULT_PORT)),
        ("[10.0.0.2]:99", tcp(Family::Any, "10.0.0.2", 99)),
        (
            "uds:///var/run/hastctl",
            AddrKind::Unix("/var/run/hastctl".into()),
        ),
        ("UDS:///tmp/x", AddrKind::Unix("/tmp/x".into())),
        (
            "unix:///var/run/hastctl",
            AddrKind::Unix("/var/run/hastctl".into()),
        ),
        (
            "Unix://relative/sock",
            AddrKind::Unix("relative/sock".into()),
        ),
        (
            "/var/run/hastctl",
            AddrKind::Unix("/var/run/hastctl".into()),
        ),
        ("/tmp/a:b", AddrKind::Unix("/tmp/a:b".into())),
    ];
    for (s, kind) in cases {
        let a = Addr::parse(s, DEFAULT_PORT).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(a.kind, kind, "{s}");
        assert_eq!(a.raw, s);
        assert_eq!(a.to_string(), s, "Display prints the text as written");
    }
    // The default port is the caller's.
    assert_eq!(Addr::parse("h", 0).unwrap().kind, tcp(Family::Any, "h", 0));
    assert_eq!(
        Addr::parse("::1", 10809).unwrap().kind,
        tcp(Family::Any, "::1", 10809)
    );
    assert_eq!(
        Addr::parse("h:5", 0).unwrap().kind,
        tcp(Family::Any, "h", 5)
    );
    // FromStr uses the hastd port.
    let a: Addr = "10.0.0.1".parse().unwrap();
    assert_eq!(a.kind, tcp(Family::Any, "10.0.0.1", 8457));
    assert!(a.is_tcp());
    assert_eq!(a.ip_literal(), Some("10.0.0.1".parse().unwrap()));
    let u = Addr::parse("/x", DEFAULT_PORT).unwrap();
    assert_eq!(u.unix_path(), Some(Path::new("/x")));
    assert!(!u.is_tcp());
}

#[test]
fn bad_addresses_are_refused_with_the_reason() {
    let bad = |s: &str| Addr::parse(s, DEFAULT_PORT).expect_err(s);
    assert_eq!(bad(""), AddrError::Empty);
    assert!(matches!(bad("tcp://"), AddrError::MissingHost { .. }));
    assert!(matches!(bad(":8457"), AddrError::MissingHost { .. }));
    assert!(matches!(bad("tcp6://[]:80"), AddrError::MissingHost { .. }));
    for p in [
        "host:",
        "host:0",
        "host:65536",
        "host:80x",
        "host:-1",
        "[::1]:",
        "[::1]:8:9",
        "h:99999999999",
    ] {
        assert!(
            matches!(bad(p), AddrError::BadPort { .. }),
            "{p}: {:?}",
            bad(p)
        );
    }
    assert!(matches!(bad("[fe80::1:80"), AddrError::BadHost { .. }));
    assert!(matches!(bad("[host]"), AddrError::BadHost { .. }));
    assert!(matches!(bad("2001:db8::1/64"), AddrError::BadHost { .. }));
    assert!(matches!(bad("ho st"), AddrError::BadHost { .. }));
    assert!(matches!(bad("-host"), AddrError::BadHost { .. }));
    assert!(matches!(bad("a..b"), AddrError::BadHost { .. }));
    assert!(matches!(bad("host/x"), AddrError::BadHost { .. }));
    assert!(matches!(bad("[a:b]:80"), AddrError::BadHost { .. }));
    assert!(matches!(bad(&"h".repeat(256)), AddrError::BadHost { .. }));
    assert!(matches!(
        bad("tcp4://[::1]:80"),
        AddrError::FamilyMismatch { family: "IPv4", .. }
    ));
    assert!(matches!(
        bad("tcp4://::1"),
        AddrError::FamilyMismatch { .. }
    ));
    assert!(matches!(
        bad("tcp6://10.0.0.1"),
        AddrError::FamilyMismatch { family: "IPv6", .. }
    ));
    assert!(matches!(
        bad("tcp6://10.0.0.1:80"),
        AddrError::FamilyMismatch { .. }
    ));
    assert_eq!(
        bad("http://x"),
        AddrError::UnknownScheme {
            raw: "http://x".into(),
            scheme: "http".into()
        }
    );
    assert!(matches!(bad("/x://y"), AddrError::UnknownScheme { .. }));
    assert!(matches!(
        bad("socketpair://"),
        AddrError::UnknownScheme { .. }
    ));
    assert!(matches!(bad("uds://"), AddrError::EmptyPath { .. }));
    assert!(matches!(bad("unix://"), AddrError::EmptyPath { .. }));
    let max = hast::addr::SUN_PATH_SIZE - 1;
    let fits = format!("/{}", "s".repeat(max - 1));
    assert!(Addr::parse(&fits, DEFAULT_PORT).is_ok());
    let long = format!("/{}", "s".repeat(max));
    assert!(matches!(bad(&long), AddrError::PathTooLong { .. }));
    assert!(matches!(
        bad(&format!("uds://{long}")),
        AddrError::PathTooLong { .. }
    ));
    // Messages say what is wrong and with what.
    assert_eq!(
        bad("host:0").to_string(),
        "address 'host:0': invalid port '0' (expected a number from 1 to 65535)"
    );
}

#[test]
fn socket_addrs_resolves_and_filters_by_family() {
    let a = Addr::parse("127.0.0.1:7000", DEFAULT_PORT).unwrap();
    assert_eq!(
        a.socket_addrs().unwrap(),
        vec!["127.0.0.1:7000".parse().unwrap()]
    );
    let a = Addr::parse("tcp6://[::1]:5", DEFAULT_PORT).unwrap();
    assert_eq!(a.socket_addrs().unwrap(), vec!["[::1]:5".parse().unwrap()]);
    let a = Addr::parse("tcp6://::", DEFAULT_PORT).unwrap();
    assert_eq!(
        a.socket_addrs().unwrap(),
        vec!["[::]:8457".parse().unwrap()]
    );
    let a = Addr::parse("tcp4://localhost:99", DEFAULT_PORT).unwrap();
    let got = a.socket_addrs().unwrap();
    assert!(!got.is_empty());
    assert!(got.iter().all(|s| s.is_ipv4() && s.port() == 99), "{got:?}");
    // The family filter: an IPv6-only address whose host resolves to IPv4 only.
    let a = Addr {
        raw: "tcp6://127.0.0.1".into(),
        kind: tcp(Family::V6, "127.0.0.1", 1),
    };
    let e = a.socket_addrs().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(e.to_string().contains("has no IPv6 address"), "{e}");
    let a = Addr {
        raw: "tcp4://::1".into(),
        kind: tcp(Family::V4, "::1", 1),
    };
    assert_eq!(
        a.socket_addrs().unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    // A name that does not resolve is an error, not an empty list.
    let a = Addr::parse("no-such-host.invalid", DEFAULT_PORT).unwrap();
    assert!(a.socket_addrs().is_err());
    let u = Addr::parse("uds:///tmp/s", DEFAULT_PORT).unwrap();
    let e = u.socket_addrs().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
}

// ---------------------------------------------------------------------------
// Files and exit codes

#[test]
fn unreadable_file_exits_72_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.conf");
    let e = Config::load(&missing, &hasta()).unwrap_err();
    assert_eq!(e.exit_code(), 72);
    assert_eq!(e.line(), None);
    assert!(matches!(e, ConfigError::Unreadable { .. }));
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "cannot read configuration file {}: ",
            missing.display()
        )),
        "{msg}"
    );
    // A directory cannot be read as a file either.
    let e = Config::load(dir.path(), &hasta()).unwrap_err();
    assert_eq!(e.exit_code(), 72);
}

#[test]
fn load_reads_the_file_and_reports_errors_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hast.conf");
    std::fs::write(&p, RES).unwrap();
    let c = Config::load(&p, &hasta()).unwrap();
    assert_eq!(c.path, p);
    assert_eq!(c.resources[0].name, "r");
    std::fs::write(&p, "\n\ntimeout 0\n").unwrap();
    let e = Config::load(&p, &hasta()).unwrap_err();
    assert_eq!(e.exit_code(), 78);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:3: timeout 0 is out of range (1 to 2147483647 seconds)",
            p.display()
        )
    );
    // Bytes that are not UTF-8: fine in a comment, an error elsewhere.
    let mut bytes = b"# caf\xe9 \xff\n".to_vec();
    bytes.extend_from_slice(RES.as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert!(Config::load(&p, &hasta()).is_ok());
    std::fs::write(&p, b"\nlisten 10.0.0.1\xff\n").unwrap();
    let e = Config::load(&p, &hasta()).unwrap_err();
    assert_eq!((e.exit_code(), e.line()), (78, Some(2)));
    assert_eq!(e.problem(), Some(&Problem::BadChar('\u{fffd}')));
}

// ---------------------------------------------------------------------------
// The sample configuration

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conf/hast.conf")
}

#[test]
fn sample_config_for_hasta() {
    let c = Config::load(
        &sample(),
        &HostIdentity::from_parts("hasta.storage.lan", None, None),
    )
    .unwrap();
    assert_eq!(c.control.raw, "uds:///var/run/hastctl");
    assert_eq!(c.pidfile, PathBuf::from("/var/run/hastd.pid"));
    let listen: Vec<&str> = c.listen.iter().map(|a| a.raw.as_str()).collect();
    assert_eq!(listen, ["tcp4://0.0.0.0:8457", "tcp6://[2001:db8::1]:8457"]);
    let names: Vec<&str> = c.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["shared", "tank", "spare"]);

    let shared = c.resource("shared").unwrap();
    assert_eq!(shared.provname, "shared");
    assert_eq!(shared.local, PathBuf::from("/dev/da0"));
    assert_eq!(shared.remote, "tcp://10.0.0.2");
    assert_eq!(
        shared.remote_addr.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::Any, "10.0.0.2", 8457))
    );
    assert_eq!(shared.source, None);
    assert_eq!(shared.replication, Replication::Fullsync);
    assert_eq!(
        shared.checksum,
        Checksum::Crc32,
        "resource beats the later global"
    );
    assert_eq!(shared.compression, Compression::Hole);
    assert_eq!(shared.timeout, 30);
    assert_eq!(
        shared.exec,
        Some(PathBuf::from("/usr/local/sbin/hast-hook.sh"))
    );
    assert!(shared.metaflush);
    assert_eq!(shared.nbd, None);
    assert_eq!(shared.line, 21);

    let tank = c.resource("tank").unwrap();
    assert_eq!(tank.provname, "tankdev");
    assert_eq!(tank.local, PathBuf::from("/dev/mirror/tanka"));
    assert_eq!(
        tank.remote_addr.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::Any, "10.0.0.2", 8458))
    );
    assert_eq!(
        tank.source.as_ref().map(|a| a.raw.as_str()),
        Some("tcp://10.0.0.1")
    );
    assert_eq!(tank.replication, Replication::Async);
    assert_eq!(
        tank.checksum,
        Checksum::Sha256,
        "global after the resources applies"
    );
    assert_eq!(tank.compression, Compression::Lzf);
    assert!(
        tank.metaflush,
        "res-node `metaflush on` beats resource `off`"
    );
    assert_eq!(
        tank.nbd.as_ref().map(|a| a.raw.as_str()),
        Some("/var/run/hast/tank.sock")
    );

    let spare = c.resource("spare").unwrap();
    assert_eq!(spare.remote, "none");
    assert_eq!(spare.remote_addr, None);
    assert_eq!(spare.checksum, Checksum::Sha256);
}

#[test]
fn sample_config_for_hastb() {
    let c = Config::load(&sample(), &HostIdentity::node("hastb")).unwrap();
    assert_eq!(c.pidfile, PathBuf::from("/var/run/hastd-b.pid"));
    let listen: Vec<&str> = c.listen.iter().map(|a| a.raw.as_str()).collect();
    assert_eq!(listen, ["tcp4://0.0.0.0:8457", "tcp6://[2001:db8::2]:8457"]);
    let tank = c.resource("tank").unwrap();
    assert_eq!(tank.local, PathBuf::from("/dev/mirror/tankb"));
    assert_eq!(tank.remote, "tcp://10.0.0.1:8458");
    assert!(
        !tank.metaflush,
        "no res-node metaflush on hastb: the resource's `off`"
    );
    assert_eq!(
        tank.nbd.as_ref().map(|a| a.kind.clone()),
        Some(tcp(Family::Any, "127.0.0.1", 10810))
    );
    assert_eq!(c.resource("shared").unwrap().remote, "tcp://10.0.0.1");
}

#[test]
fn sample_config_for_an_unknown_host_fails_at_the_first_resource() {
    let e = Config::load(&sample(), &HostIdentity::from_parts("hastc", None, Some(7))).unwrap_err();
    assert_eq!(e.exit_code(), 78);
    assert_eq!(e.line(), Some(21));
    assert_eq!(
        e.to_string(),
        format!(
            "{}:21: resource shared: none of its on blocks matches this host (accepted names: hastc, hostid7)",
            sample().display()
        )
    );
}

// ---------------------------------------------------------------------------
// Link security (extensions)

fn fp(byte: u8) -> hast::security::Fingerprint {
    hast::security::Fingerprint([byte; 32])
}

fn fp_text(byte: u8) -> String {
    fp(byte).to_string()
}

#[test]
fn security_defaults_to_plain_and_nothing_else() {
    let c = ok("resource r {\n local /dev/da0\n on hasta {\n remote 10.0.0.2\n }\n}\n");
    let sec = &c.resources[0].security;
    assert_eq!(sec.mode, SecurityMode::None);
    assert!(sec.keyfile.is_none() && sec.peerfingerprint.is_none());
    assert!(sec.cafile.is_none() && sec.secretfile.is_none() && sec.credentials.is_none());
    assert!(c.keyfile.is_none());
}

#[test]
fn security_statements_inherit_res_node_over_resource_over_node_over_global() {
    let text = format!(
        "security secret\n\
         secretfile /g\n\
         peerfingerprint {g}\n\
         keyfile /keys/global.pem\n\
         on hasta {{\n keyfile /keys/hasta.pem\n peerfingerprint {n}\n cafile /ca/node\n}}\n\
         on hastb {{\n keyfile /keys/hastb.pem\n peerfingerprint {b}\n}}\n\
         resource plain {{\n security none\n local /dev/a\n on hasta {{\n remote none\n }}\n}}\n\
         resource sec {{\n local /dev/b\n on hasta {{\n remote none\n }}\n}}\n\
         resource tls {{\n security tls\n peerfingerprint {r}\n local /dev/c\n\
           on hasta {{\n remote none\n peerfingerprint {rn}\n }}\n on hastb {{\n remote none\n peerfingerprint {b}\n }}\n}}\n\
         resource ca {{\n security tls\n local /dev/d\n on hasta {{\n remote none\n secretfile /s\n cafile /ca/res\n }}\n}}\n",
        g = fp_text(1),
        n = fp_text(2),
        b = fp_text(9),
        r = fp_text(3),
        rn = fp_text(4),
    );
    let c = ok(&text);
    // keyfile: this host's top-level block over the global one.
    let kf = c.keyfile.as_ref().unwrap();
    assert_eq!(kf.path, std::path::Path::new("/keys/hasta.pem"));
    assert_eq!(kf.line, 6);
    let res = |name: &str| c.resource(name).unwrap().security.clone();
    assert_eq!(res("plain").mode, SecurityMode::None);
    let sec = res("sec");
    assert_eq!(sec.mode, SecurityMode::Secret);
    assert_eq!(
        sec.secretfile.as_ref().unwrap().path,
        std::path::Path::new("/g")
    );
    assert_eq!(sec.secretfile.as_ref().unwrap().line, 2);
    // The node block's pin beats the global one.
    assert_eq!(sec.peerfingerprint, Some(fp(2)));
    let tls = res("tls");
    assert_eq!(tls.mode, SecurityMode::Tls);
    assert_eq!(tls.peerfingerprint, Some(fp(4)), "res-node beats resource");
    assert_eq!(tls.keyfile, c.keyfile);
    assert_eq!(
        tls.cafile.as_ref().unwrap().path,
        std::path::Path::new("/ca/node")
    );
    let ca = res("ca");
    assert_eq!(
        ca.cafile.as_ref().unwrap().path,
        std::path::Path::new("/ca/res")
    );
    assert_eq!(
        ca.secretfile.as_ref().unwrap().path,
        std::path::Path::new("/s")
    );
}

#[test]
fn tls_needs_a_key_and_a_peer_and_secret_needs_a_file() {
    let res = "resource r {\n local /dev/a\n on hasta {\n remote none\n }\n}\n";
    let (line, msg, p) = fail(&format!(
        "security tls\npeerfingerprint {}\n{res}",
        fp_text(1)
    ));
    assert_eq!(line, 3);
    assert!(matches!(p, Problem::TlsNeedsKey { .. }), "{p:?}");
    assert!(msg.contains("add `keyfile <path>`"), "{msg}");
    assert!(msg.contains("hastctl keygen"), "{msg}");
    let (line, msg, p) = fail(&format!("security tls\nkeyfile /k\n{res}"));
    assert_eq!(line, 3);
    assert!(matches!(p, Problem::TlsNeedsPeer { .. }), "{p:?}");
    assert!(
        msg.contains("peerfingerprint") && msg.contains("cafile"),
        "{msg}"
    );
    let (line, msg, p) = fail(&format!("security secret\n{res}"));
    assert_eq!(line, 2);
    assert!(matches!(p, Problem::SecretNeedsFile { .. }), "{p:?}");
    assert!(msg.contains("secretfile"), "{msg}");
    // A CA instead of a pin is enough.
    let c = ok(&format!("security tls\nkeyfile /k\ncafile /ca\n{res}"));
    assert_eq!(c.resources[0].security.mode, SecurityMode::Tls);
    // A key in another host's block is not this node's.
    let (_, _, p) = fail(&format!(
        "on hastb {{\n keyfile /k\n}}\nsecurity tls\ncafile /ca\n{res}"
    ));
    assert!(matches!(p, Problem::TlsNeedsKey { .. }), "{p:?}");
}

#[test]
fn bad_security_values_name_their_line() {
    let (line, msg, _) = fail("\nsecurity ssl\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("found 'ssl', expected none, secret or tls after `security`"),
        "{msg}"
    );
    let (line, msg, p) = fail("peerfingerprint sha256:abcd\n");
    assert_eq!(line, 1);
    assert!(matches!(p, Problem::BadFingerprint(_)), "{p:?}");
    assert!(msg.contains("64 hex digits"), "{msg}");
    let (line, _, p) = fail(&format!(
        "on hastb {{\n peerfingerprint {}z\n}}\n",
        "a".repeat(63)
    ));
    assert_eq!(line, 2, "other hosts' blocks are checked too");
    assert!(matches!(p, Problem::BadFingerprint(_)), "{p:?}");
    let (line, msg, _) = fail("keyfile\n");
    assert_eq!(line, 1);
    assert!(msg.contains("expected a path after `keyfile`"), "{msg}");
    let (line, msg, _) = fail("resource r {\n keyfile /k\n}\n");
    assert_eq!(line, 2);
    assert!(
        msg.contains("`keyfile` is allowed only at top level or in a top-level `on` block"),
        "{msg}"
    );
    // All-digit fingerprints lex as numbers and still parse.
    let digits = "1".repeat(64);
    let c = ok(&format!(
        "peerfingerprint {digits}\nsecurity tls\nkeyfile /k\n\
        resource r {{\n local /dev/a\n on hasta {{\n remote none\n }}\n}}\n"
    ));
    assert_eq!(c.resources[0].security.peerfingerprint, Some(fp(0x11)));
}

#[test]
fn security_words_stay_usable_as_names() {
    let c = ok(
        "resource security {\n local /tls\n on hasta {\n remote secret\n name keyfile\n }\n}\n\
                on cafile {\n}\n",
    );
    let r = &c.resources[0];
    assert_eq!(r.name, "security");
    assert_eq!(r.local, std::path::Path::new("/tls"));
    assert_eq!(r.provname, "keyfile");
    assert_eq!(r.remote, "secret");
}

#[test]
fn link_security_compares_only_what_its_mode_uses() {
    let base = "resource r {\n local /dev/a\n on hasta {\n remote none\n }\n}\n";
    let plain = |extra: &str| {
        ok(&format!("{extra}\n{base}")).resources[0]
            .security
            .clone()
    };
    // A key or pin for TLS resources changes nothing for a plain one.
    assert_eq!(plain("keyfile /k1"), plain("keyfile /k2\ncafile /ca"));
    let tls = |extra: &str| {
        ok(&format!("security tls\nkeyfile /k\n{extra}\n{base}")).resources[0]
            .security
            .clone()
    };
    assert_eq!(
        tls("cafile /ca\nsecretfile /s1"),
        tls("cafile /ca\nsecretfile /s2")
    );
    assert_ne!(tls("cafile /ca"), tls("cafile /ca2"));
    assert_ne!(
        tls(&format!("peerfingerprint {}", fp_text(1))),
        tls(&format!("peerfingerprint {}", fp_text(2)))
    );
    assert_ne!(plain(""), tls("cafile /ca"));
}

//! The hast.conf parser: any text (bytes read as Config::load does) parses
//! or fails with a line inside the file; what parses is the same for the
//! same host every time, and holds only values the daemon can use.
#![no_main]

use std::path::Path;

use hast::config::{Config, HostIdentity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/etc/hast.conf");
    let lines = u32::try_from(text.matches('\n').count() + 1).unwrap_or(u32::MAX);
    for host in [
        HostIdentity::node("hasta"),
        HostIdentity::from_parts(
            "hastb.example.org",
            Some("a3e1b6b0-5d0a-11ee-8c99-0242ac120002"),
            Some(7),
        ),
    ] {
        match Config::parse(&text, path, &host) {
            Ok(cfg) => {
                let mut names = std::collections::HashSet::new();
                for r in &cfg.resources {
                    assert!(names.insert(r.name.clone()), "resource {} twice", r.name);
                    assert!(!r.name.is_empty() && !r.provname.is_empty());
                    assert!(r.timeout >= 1);
                    assert!(r.line >= 1 && r.line <= lines);
                    assert_eq!(r.remote == "none", r.remote_addr.is_none());
                    let _ = r.nbd_addr();
                }
                assert!(!cfg.listen.is_empty());
                assert_eq!(Config::parse(&text, path, &host).ok(), Some(cfg));
            }
            Err(e) => {
                let line = e.line().expect("a parse error has a line");
                assert!(line <= lines, "error on line {line} of {lines}: {e}");
                assert_eq!(e.exit_code(), 78);
                let _ = e.to_string();
            }
        }
    }
});

//! The primary's replication link through breaks and quick reconnects: a
//! session's tasks end with it, and dirty extents are synchronized while
//! connected, however they became dirty, before the pair is called in sync.

use std::time::Duration;

use hast_tests::checker::{Workload, WorkloadOptions};
use hast_tests::cluster::{Cluster, Mode};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn connected(replication: &str, timeout: u32) -> Cluster {
    let mut c = Cluster::builder(Mode::auto())
        .resource("r0", 64 * MIB)
        .replication(replication)
        .timeout(timeout)
        .build()
        .expect("build the cluster");
    c.start_all().unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    c.wait_list("alpha", "r0", T, |s| s.in_sync())
        .unwrap_or_else(|e| panic!("never in sync: {e}\n{}", c.log("alpha").unwrap()));
    c
}

fn count(text: &str, what: &str) -> usize {
    text.matches(what).count()
}

/// A peer that freezes past the watchdog: the session ends, and its
/// receiver with it. When the peer wakes up and answers on the old
/// connection, nobody reads those answers any more (the reference's and
/// an earlier version's "reply for unknown seq" seconds later).
#[test]
fn a_dead_session_stops_reading_its_connection() {
    let c = connected("fullsync", 3);
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    let beta = c.pid("beta").expect("beta runs");
    // Requests in flight when beta freezes: their replies come late.
    let work = Workload::new(WorkloadOptions {
        queue_depth: 8,
        max_writes: None,
        duration: Some(Duration::from_secs(6)),
        ..WorkloadOptions::default()
    });
    std::thread::scope(|s| {
        let h = s.spawn(|| work.run_uri(&uri));
        std::thread::sleep(Duration::from_millis(500));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(beta), nix::sys::signal::SIGSTOP)
            .unwrap();
        c.wait_for("alpha's watchdog", T, |c| {
            c.log("alpha")
                .unwrap_or_default()
                .contains("did not answer request")
        })
        .unwrap();
        let before = count(&c.log("alpha").unwrap(), "reply for unknown seq");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(beta), nix::sys::signal::SIGCONT)
            .unwrap();
        let _ = h.join();
        // beta answers what it had; give the answers time to arrive.
        std::thread::sleep(Duration::from_secs(2));
        let log = c.log("alpha").unwrap();
        assert_eq!(
            count(&log, "reply for unknown seq"),
            before,
            "the ended session still reads its old connection:\n{log}"
        );
    });
    c.wait_list("alpha", "r0", T, |s| s.in_sync())
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log("alpha").unwrap()));
    assert_eq!(c.compare_data("r0", "alpha", "beta").unwrap(), None);
}

/// Writes under load while the connections break and come back at once,
/// several times: every extent made dirty by the breaks is synchronized
/// while connected; `list` says in sync only when nothing is dirty, and
/// then the copies are equal.
#[test]
fn quick_reconnects_under_load_leave_nothing_dirty() {
    if !hast_tests::cluster::is_root() {
        eprintln!("SKIPPED: resetting connections needs root");
        return;
    }
    let c = connected("fullsync", 5);
    // The writes of each break wait for its localcnt bump, which comes
    // late: they become dirty after the next session started.
    c.failpoint("alpha", hast::failpoint::SLOW_BUMP, true);
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    let work = Workload::new(WorkloadOptions {
        queue_depth: 16,
        max_writes: None,
        duration: Some(Duration::from_secs(12)),
        ..WorkloadOptions::default()
    });
    let history = std::thread::scope(|s| {
        let h = s.spawn(|| work.run_uri(&uri));
        for round in 0..8 {
            c.wait_list("alpha", "r0", T, |s| {
                s.status.as_deref() == Some("complete")
            })
            .unwrap_or_else(|e| panic!("round {round}: never reconnected: {e}"));
            std::thread::sleep(Duration::from_millis(400));
            c.reset_connections("alpha", "beta").unwrap();
        }
        h.join().expect("workload thread").expect("workload")
    });
    assert!(history.acked() > 100, "{history}");
    let st = c
        .wait_list("alpha", "r0", T, |s| s.in_sync())
        .unwrap_or_else(|e| {
            panic!(
                "dirty extents left unsynchronized while connected: {e}\n{:?}\n{}",
                c.list_res("alpha", "r0"),
                c.log("alpha").unwrap()
            )
        });
    assert_eq!(st.dirty, 0, "{st:?}");
    assert_eq!(
        c.compare_data("r0", "alpha", "beta").unwrap(),
        None,
        "list says in sync but the copies differ"
    );
    let beta = c.data_area("beta", "r0").unwrap();
    let report = history.verify_file(&beta.path, beta.offset).unwrap();
    assert!(report.passed(), "{report}");
}

/// Writes whose copy on the peer completes while the primary's own flush
/// of both sides runs join the map after that flush started: a later
/// flush must cover them even when no more writes come, or the pair never
/// says it is in sync again (the campaign found it in async mode, where
/// the peer's copies lag behind the acknowledgements).
#[test]
fn extents_flushed_later_when_their_copy_ends_during_a_flush() {
    for mode in ["async", "fullsync"] {
        let c = connected(mode, 10);
        // The peer's writes take 2 s: the periodic flush (1 s after the
        // first write) starts while they run.
        c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, true);
        let work = Workload::new(WorkloadOptions {
            queue_depth: 4,
            max_writes: Some(8),
            ..WorkloadOptions::default()
        });
        let h = work.run_uri(&c.nbd_uri("alpha", "r0").unwrap()).unwrap();
        assert_eq!(h.acked(), 8, "{h}");
        c.wait_list("alpha", "r0", T, |s| s.in_sync())
            .unwrap_or_else(|e| {
                panic!(
                    "{mode}: extents stay dirty while idle: {e}\n{:?}",
                    c.list_res("alpha", "r0")
                )
            });
        c.failpoint("beta", hast::failpoint::SECONDARY_SLOW_WRITE, false);
        assert_eq!(c.compare_data("r0", "alpha", "beta").unwrap(), None);
    }
}

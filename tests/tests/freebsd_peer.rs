//! Pairing with FreeBSD's own hastd, in both directions, from the bytes a
//! FreeBSD 12.1 hastd sends (emulated in `hast_tests::freebsd`): a FreeBSD
//! primary's first frame with version byte 1 toward this project's
//! secondary, and this project's primary reconnecting to a FreeBSD
//! secondary whose activemap arrives hole-compressed or with a crc32 hash.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use hast_tests::cluster::{Cluster, Mode};
use hast_tests::freebsd::{self, HIO_FLUSH, HIO_WRITE};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

/// A TCP connection to `to` from source address `from` (a loopback alias).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )
    .expect("bind the source address");
    let SocketAddr::V4(dst) = to else {
        panic!("IPv4 only")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).expect("connect");
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(T)).expect("read timeout");
    s
}

fn sockaddr(c: &Cluster, node: &str, peer: &str) -> SocketAddr {
    SocketAddr::new(c.addr(node, peer).unwrap().into(), c.port(node).unwrap())
}

/// A FreeBSD primary connects to this project's secondary: its first frame
/// carries version byte 1, which FreeBSD's own receiver accepts (it refuses
/// only bytes above 2). The handshake must succeed and its writes land.
#[test]
fn freebsd_primary_pairs_with_this_secondary() {
    let mut c = Cluster::builder(Mode::Loopback)
        .resource("r0", 32 * MIB)
        .replication("memsync")
        .build()
        .unwrap();
    c.start("beta").unwrap();
    c.role("beta", "r0", "secondary").unwrap();
    let beta = sockaddr(&c, "beta", "alpha");
    let alpha_ip = c.addr("alpha", "beta").unwrap();
    let area = c.data_area("beta", "r0").unwrap();

    let mut p = freebsd::Primary::connect(
        connect_from(alpha_ip, beta),
        || connect_from(alpha_ip, beta),
        "r0",
        (0x5eed, 0, 0, true),
    )
    .unwrap_or_else(|e| {
        panic!(
            "a FreeBSD primary's handshake failed: {e}\nbeta's log:\n{}",
            c.log("beta").unwrap_or_default()
        )
    });
    let a = &p.answer;
    assert_eq!(a.get_string("errmsg"), None, "{a:?}");
    assert_eq!(
        a.get_i64("datasize"),
        Some(i64::try_from(area.size).unwrap())
    );
    assert_eq!(a.get_i32("extentsize"), Some(2 * 1024 * 1024));
    assert_eq!(a.get_u8("syncsrc"), Some(freebsd::SYNCSRC_PRIMARY));
    assert!(
        a.contains("virgin"),
        "a new secondary adopts the resuid: {a:?}"
    );
    assert_eq!(
        a.get_u32("mapsize"),
        Some(0),
        "nothing to send to a virgin primary"
    );
    assert!(p.map.is_empty());

    // Writes as FreeBSD's remote_send_thread frames them: plain, hole
    // compressed with a crc32 hash, and a flush.
    let block: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    let (r, _) = p
        .request(HIO_WRITE, 1, 0, &block, 4096, ("none", "none"))
        .unwrap();
    assert_eq!(
        (r.get_u64("seq"), r.get_i16("error")),
        (Some(1), None),
        "{r:?}"
    );
    let zeros = vec![0u8; 65536];
    let (r, _) = p
        .request(HIO_WRITE, 2, 65536, &zeros, 65536, ("hole", "crc32"))
        .unwrap();
    assert_eq!(
        (r.get_u64("seq"), r.get_i16("error")),
        (Some(2), None),
        "{r:?}"
    );
    let (r, _) = p
        .request(HIO_FLUSH, 3, 0, &[], 0, ("none", "none"))
        .unwrap();
    assert_eq!(r.get_u64("seq"), Some(3), "{r:?}");

    let got = c.read_data("beta", "r0", 0, 4096).unwrap();
    assert_eq!(got, block, "the write did not land at localoff");
    let status = c.list_res("beta", "r0").unwrap();
    assert_eq!(status.status.as_deref(), Some("complete"), "{status:?}");
    drop(p);
    assert!(c.running("beta"));
}

/// This project's primary, a FreeBSD secondary, a break in between: the
/// writes made while apart must be resynchronized on reconnect, whatever
/// pipeline the secondary's map comes through.
/// With `corrupt`, the first map after the break arrives with a damaged
/// hash: alpha must refuse it (never merge a map it cannot trust) and take
/// the next one.
fn reconnect_to_freebsd_secondary(checksum: &str, secondary_dirty: Option<usize>, corrupt: bool) {
    let mut c = Cluster::builder(Mode::Loopback)
        .resource("r0", 32 * MIB)
        .replication("fullsync")
        .checksum(checksum)
        .timeout(5)
        .build()
        .unwrap();
    let alpha_ip = c.addr("alpha", "beta").unwrap();
    let beta = sockaddr(&c, "beta", "alpha");
    let area = c.data_area("alpha", "r0").unwrap();
    let dump = c.dump("alpha", "r0").unwrap();
    let mapsize = usize::try_from(dump.localoff - 4096).unwrap();
    let extent = dump.extentsize;
    let mut fbsd =
        freebsd::Secondary::new("r0", area.size, u32::try_from(extent).unwrap(), mapsize);
    fbsd.checksum = checksum.to_string();

    // First session: both new; nothing to synchronize.
    let listener = TcpListener::bind(beta).expect("listen at beta's address");
    c.start("alpha").unwrap();
    c.role("alpha", "r0", "primary").unwrap();
    let session = fbsd
        .handshake(&listener, alpha_ip, T)
        .unwrap_or_else(|e| panic!("first handshake: {e}\n{}", c.log("alpha").unwrap()));
    assert!(session.log.primary.3, "alpha was new: {:?}", session.log);
    c.wait_list("alpha", "r0", T, |st| st.in_sync())
        .unwrap_or_else(|e| panic!("first session: {e}\n{}", c.log("alpha").unwrap()));
    // The FreeBSD node goes away (a reboot): alpha goes degraded.
    drop(session);
    drop(listener);
    c.wait_list("alpha", "r0", T, |st| {
        st.status.as_deref() == Some("degraded")
    })
    .unwrap_or_else(|e| {
        panic!(
            "alpha never went degraded: {e}\n{}",
            c.log("alpha").unwrap()
        )
    });

    // A write while apart, through alpha's export, into extent 2.
    let uri = c.nbd_uri("alpha", "r0").unwrap();
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -P 0x5a {} 1M", 4 * MIB),
        ])
        .output()
        .expect("run qemu-io");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        c.list_res("alpha", "r0").unwrap().dirty >= extent,
        "the degraded write left no dirty extent"
    );

    // The FreeBSD node is back, with a clean map (hole compressed) or a
    // dirty one (sent as it is, with the hash when checksummed).
    if let Some(e) = secondary_dirty {
        fbsd.mark_dirty(e);
    }
    fbsd.corrupt_map_hash = corrupt;
    let want: Vec<u64> = std::iter::once(2u64)
        .chain(secondary_dirty.map(|e| e as u64))
        .collect();
    let covered = |log: &freebsd::SessionLog| {
        want.iter().all(|&e| {
            let (s, end) = (e * extent, (e + 1) * extent);
            let have: u64 = log
                .writes
                .iter()
                .map(|&(o, l)| (o + l).min(end).saturating_sub(o.max(s)))
                .sum();
            have >= end - s
        })
    };
    let listener = TcpListener::bind(beta).expect("listen again at beta's address");
    let log = std::thread::scope(|s| {
        let h = s.spawn(|| -> std::io::Result<freebsd::Session> {
            // A refused map ends the session; alpha then tries again.
            let start = std::time::Instant::now();
            loop {
                let mut session = fbsd.handshake(&listener, alpha_ip, T)?;
                fbsd.serve(&mut session, T, |_, log| covered(log) && log.flushes > 0)?;
                if session.log.ended == "done" || start.elapsed() > T {
                    return Ok(session);
                }
            }
        });
        let synced = c.wait_list("alpha", "r0", T, |st| st.in_sync());
        let joined = h.join().expect("the emulated secondary panicked");
        if let Err(e) = synced {
            panic!(
                "alpha never resynchronized with the FreeBSD secondary: {e}\nsession: {joined:?}\nalpha's log:\n{}",
                c.log("alpha").unwrap()
            );
        }
        // The session stays up until alpha is in sync; dropped here.
        joined.expect("the second session").log
    });
    assert!(covered(&log), "not every dirty extent was sent: {log:?}");
    let at = usize::try_from(4 * MIB).unwrap();
    assert!(
        fbsd.data[at..at + MIB as usize].iter().all(|&b| b == 0x5a),
        "the write made while apart is not on the FreeBSD secondary"
    );
    let text = c.log("alpha").unwrap();
    assert!(!text.contains("map_merge"), "{text}");
    if corrupt {
        assert!(
            text.contains("hash mismatch"),
            "the damaged map was not refused for its hash:\n{text}"
        );
    }
}

#[test]
fn reconnect_to_a_freebsd_secondary_with_a_hole_compressed_map() {
    reconnect_to_freebsd_secondary("none", None, false);
}

#[test]
fn reconnect_to_a_freebsd_secondary_with_a_crc32_checksummed_map() {
    // A clean map: hole compressed, then hashed.
    reconnect_to_freebsd_secondary("crc32", None, false);
}

#[test]
fn a_dirty_crc32_map_from_a_freebsd_secondary_is_verified_and_merged() {
    reconnect_to_freebsd_secondary("crc32", Some(9), true);
}

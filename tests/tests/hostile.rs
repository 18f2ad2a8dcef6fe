//! Hostile and broken NBD input against a primary's export: garbage in the
//! handshake, unknown options and export names, misaligned, out-of-range,
//! oversized and unknown requests, and clients that die in the middle of a
//! request. Each is refused or dropped; the provider file changes only by
//! what a well-behaved client, connected throughout, writes, and that client
//! and a later one are served correctly.

use std::io::BufRead;
use std::time::Duration;

use hast_tests::export::{python_has_nbd, rand_bytes, stamp, stamped, MIB, PY_STAMP};
use hast_tests::{list_field, nbdwire as w, python_spawn, RawNbd, Solo};

/// Python: 32 writes queued (strict mode off), then wait to be killed.
const PY_KILLED: &str = r#"
import nbd, sys, time
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
base = int(sys.argv[2])
bufs = []
for i in range(32):
    b = nbd.Buffer.from_bytearray(stamped(base + i * 4096, 4096, 9))
    bufs.append(b)
    h.aio_pwrite(b, base + i * 4096)
print('sent', flush=True)
time.sleep(60)
"#;

/// Assert the connection was closed by the server.
fn assert_closed(c: &mut RawNbd, what: &str) {
    assert!(c.closed_by_server(), "{what}: connection still open");
}

#[test]
fn bad_nbd_input_is_refused_and_harms_nothing() {
    let s = Solo::with_name(32 * MIB, &[], Some("disk0"));
    let (localoff, datasize, es) = s.geometry();
    assert_eq!(s.export, "disk0");

    // A well-behaved client, connected first and used throughout.
    let mut good = RawNbd::start(&s.socket).unwrap();
    let (size, flags) = good.go("disk0").unwrap().expect("GO disk0");
    assert_eq!(size, datasize);
    assert_eq!(flags & 2, 0, "export is read-only");
    let mut model_writes: Vec<(u64, Vec<u8>)> = Vec::new();
    let good_rw = |good: &mut RawNbd, mw: &mut Vec<(u64, Vec<u8>)>, off: u64, tag: u64| {
        let cookie = 100 + 2 * mw.len() as u64;
        let d = stamped(off, 8192, tag);
        assert_eq!(
            good.write(cookie, off, &d).unwrap(),
            0,
            "good write at {off}"
        );
        let got = good
            .read(cookie + 1, off, 8192)
            .unwrap()
            .expect("good read");
        assert!(got == d, "good client read back other data at {off}");
        mw.push((off, d));
    };
    // Dirty the extents the test will use (0 and 4), so that the map and
    // metadata are settled before the snapshot.
    good_rw(&mut good, &mut model_writes, 0, 1);
    good_rw(&mut good, &mut model_writes, 4 * es, 1);
    let snapshot = s.image();

    // Garbage instead of client flags.
    let mut c = RawNbd::connect(&s.socket).unwrap();
    c.greeting().unwrap();
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_closed(&mut c, "garbage client flags");
    // Good flags, then an option with a bad magic.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.send(&[0xde; 16]).unwrap();
    assert_closed(&mut c, "bad option magic");
    // Bytes before the greeting was read, then close.
    let mut c = RawNbd::connect(&s.socket).unwrap();
    c.send(&rand_bytes(100_000, 3)).unwrap_or(());
    drop(c);

    // Unknown options are answered with ERR_UNSUP and negotiation goes on;
    // unknown export names with ERR_UNKNOWN (the resource name is not the
    // export name when `name` is set).
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.option(99, b"hello").unwrap();
    let (o, k, _) = c.option_reply().unwrap();
    assert_eq!((o, k), (99, w::REP_ERR_UNSUP));
    c.option(w::OPT_STRUCTURED_REPLY, &[]).unwrap();
    let (o, k, _) = c.option_reply().unwrap();
    assert_eq!(o, w::OPT_STRUCTURED_REPLY);
    assert!(
        k & 0x8000_0000 != 0,
        "structured replies are not spoken: {k:#x}"
    );
    assert_eq!(c.go("nosuch").unwrap(), Err(w::REP_ERR_UNKNOWN));
    assert_eq!(c.go("r0").unwrap(), Err(w::REP_ERR_UNKNOWN));
    // GO with data shorter than its own name length field.
    c.option(w::OPT_GO, &[0, 0, 0, 50, b'd']).unwrap();
    let (o, k, _) = c.option_reply().unwrap();
    assert_eq!((o, k), (w::OPT_GO, w::REP_ERR_INVALID));
    c.option(w::OPT_LIST, &[]).unwrap();
    let (o, k, d) = c.option_reply().unwrap();
    assert_eq!((o, k), (w::OPT_LIST, w::REP_SERVER));
    assert_eq!(&d[4..], b"disk0");
    assert_eq!(c.option_reply().unwrap().1, w::REP_ACK);
    // Still usable: enter transmission on the same connection.
    let (size, _) = c.go("disk0").unwrap().expect("GO after errors");
    assert_eq!(size, datasize);

    // Transmission: misaligned, out of range, oversized, unknown.
    let size = datasize;
    use w::{CMD_READ as RD, CMD_TRIM as TR, CMD_WRITE as WR, EINVAL as INVAL, ENOSPC as NOSPC};
    let top = u64::MAX - 511;
    // (flags, command, offset, length, payload bytes sent, error, what)
    let cases: Vec<(u16, u16, u64, u32, usize, u32, &str)> = vec![
        (0, RD, 1, 512, 0, INVAL, "misaligned read offset"),
        (0, RD, 0, 100, 0, INVAL, "misaligned read length"),
        (0, WR, 512, 100, 100, INVAL, "misaligned write length"),
        (0, WR, 3, 512, 512, INVAL, "misaligned write offset"),
        (0, RD, size, 512, 0, INVAL, "read past the end"),
        (0, RD, top, 512, 0, INVAL, "read offset wraps"),
        (0, WR, size - 512, 1024, 1024, NOSPC, "write past the end"),
        (0, WR, top, 512, 512, NOSPC, "write offset wraps"),
        (0, TR, size - 512, 1024, 0, INVAL, "trim past the end"),
        (0, RD, 0, 64 << 20, 0, INVAL, "read of 64 MiB"),
        (0, 42, 0, 512, 0, INVAL, "unknown command"),
        (1 << 9, RD, 0, 512, 0, INVAL, "unknown flag"),
    ];
    for (i, (fl, kind, off, len, payload, want, what)) in cases.iter().enumerate() {
        let cookie = 1000 + i as u64;
        let pl = vec![0xeeu8; *payload];
        c.request(*fl, *kind, cookie, *off, *len, &pl).unwrap();
        let (e, ck) = c
            .reply()
            .unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
        assert_eq!((e, ck), (*want, cookie), "{what}");
        // The connection still works after the refusal.
        let r = c
            .read(5000 + i as u64, 0, 512)
            .unwrap()
            .expect("read after refusal");
        assert!(r == model_writes[0].1[..512], "{what}: data at 0 changed");
    }
    // A write too large to skip: refused, then the connection is closed.
    c.request(0, w::CMD_WRITE, 7, 0, 0x7fff_fe00, &[0xee; 4096])
        .unwrap();
    let (e, ck) = c.reply().unwrap();
    assert_eq!((e, ck), (w::EINVAL, 7), "oversized write");
    assert_closed(&mut c, "oversized write");
    // A bad request magic: hard disconnect.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("disk0").unwrap().unwrap();
    c.send(&[0x11; 28]).unwrap();
    assert_closed(&mut c, "bad request magic");
    // EXPORT_NAME of an unknown export: closed.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.option(w::OPT_EXPORT_NAME, b"nosuch").unwrap();
    assert_closed(&mut c, "EXPORT_NAME nosuch");
    // An EXPORT_NAME longer than any name: closed.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.option_raw(w::OPT_EXPORT_NAME, 0x7fff_ffff, b"disk0")
        .unwrap();
    assert_closed(&mut c, "EXPORT_NAME of 2 GiB");
    // A GO that claims 2 GiB of data, then the client leaves.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.option_raw(w::OPT_GO, 0x7fff_ffff, &[0; 1000]).unwrap();
    drop(c);

    // A client that dies in the middle of a write payload.
    let mut c = RawNbd::start(&s.socket).unwrap();
    c.go("disk0").unwrap().unwrap();
    c.request(0, w::CMD_WRITE, 9, 4 * es, 1 << 20, &[0xaa; 300 << 10])
        .unwrap();
    drop(c);
    // And a libnbd client killed with requests in flight (strict mode off),
    // writing extent 4, which holds nothing the checks below rely on.
    let mut killed_region = None;
    if python_has_nbd() {
        let script = format!("{PY_STAMP}\n{PY_KILLED}");
        let mut p = python_spawn(&script, &[&s.uri(), &(4 * es + 16384).to_string()]);
        let out = p.child().stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "sent");
        // SAFETY: kill(2) on a child we spawned.
        unsafe { libc::kill(p.id() as i32, libc::SIGKILL) };
        let _ = p.wait_timeout(Duration::from_secs(10));
        killed_region = Some((4 * es + 16384, 32 * 4096u64));
    } else {
        eprintln!("python3 libnbd missing: no libnbd client killed mid-request");
    }

    // Meanwhile the good client still reads and writes correctly.
    good_rw(&mut good, &mut model_writes, 8192, 2);
    good_rw(&mut good, &mut model_writes, es - 8192, 3);
    for (i, (off, d)) in model_writes.iter().enumerate() {
        let got = good.read(9000 + i as u64, *off, 8192).unwrap().unwrap();
        if got != *d {
            // A later write to the same place wins.
            let last = model_writes.iter().rposition(|(o, _)| o == off).unwrap();
            assert!(got == model_writes[last].1, "good data at {off} lost");
        }
    }
    // And a client connecting now is served.
    let mut late = RawNbd::start(&s.socket).unwrap();
    late.go("disk0").unwrap().expect("GO after the bad clients");
    assert!(late.read(1, 0, 8192).unwrap().unwrap() == model_writes[0].1);
    drop(late);
    let st = s.node.hastctl("status", &["r0"]);
    assert_eq!(st.code, 0, "{}", st.stderr);
    assert!(st.stdout.contains("r0\tdegraded primary"), "{}", st.stdout);

    // Nothing but the good client's writes (and the killed client's own
    // extent) changed anywhere in the file.
    let after = s.image();
    assert_eq!(after.len(), snapshot.len(), "provider size changed");
    let mut model = snapshot.clone();
    for (off, d) in &model_writes {
        let a = (localoff + off) as usize;
        model[a..a + d.len()].copy_from_slice(d);
    }
    if let Some((o, l)) = killed_region {
        // Each sector there is either untouched or the killed client's.
        for k in (0..l).step_by(512) {
            let a = (localoff + o + k) as usize;
            let got = &after[a..a + 512];
            assert!(
                got == &model[a..a + 512] || got == stamp(o + k, 9),
                "torn sector at export offset {}",
                o + k
            );
            model[a..a + 512].copy_from_slice(got);
        }
    }
    assert!(
        after[..localoff as usize] == model[..localoff as usize],
        "metadata or map changed"
    );
    if after != model {
        let first = (0..after.len()).find(|&i| after[i] != model[i]).unwrap();
        panic!(
            "bad input changed the provider at file offset {first} (export offset {})",
            first as i64 - localoff as i64
        );
    }
    let l = s.list();
    assert_eq!(
        list_field(&l, "local errors"),
        Some("read: 0, write: 0, delete: 0, flush: 0"),
        "{l}"
    );
}

//! Helpers shared by the tests of a primary's NBD export
//! (tests/tests/{clients,faults,geometry,lifecycle,hostile}.rs): sizes and
//! the time limit of an outside client, reproducible data, the stamped
//! sector pattern the Rust and Python writers share, the on-disk activemap a
//! set of extents gives, running qemu-io, and the `queues` line of an idle
//! primary.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{run_timeout, Run, PYTHON};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// Time limit of one outside client run.
pub const CLIENT_TIME: Duration = Duration::from_secs(120);

/// Pseudo-random bytes (splitmix64), reproducible from `seed`.
pub fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Assert that `r` exited 0, showing its output if not.
pub fn ok(r: &Run, what: &str) {
    assert_eq!(
        r.code, 0,
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        r.code, r.stdout, r.stderr
    );
}

/// Run qemu-io on `target` (a file or an NBD URI, raw format) with one
/// `-c` per command.
pub fn qemu_io<S: AsRef<str>>(target: &str, cmds: &[S]) -> Run {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x.as_ref());
    }
    c.arg(target);
    run_timeout(&mut c, CLIENT_TIME)
}

/// Whether the Python interpreter has the libnbd bindings (`import nbd`).
pub fn python_has_nbd() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The extents `[off, off+len)` touches.
pub fn extents_of(off: u64, len: u64, es: u64) -> std::ops::RangeInclusive<u64> {
    off / es..=(off + len - 1) / es
}

/// The map area `[4096, localoff)` that has exactly the bits of `set`.
pub fn expected_map(localoff: u64, set: &BTreeSet<u64>) -> Vec<u8> {
    let mut m = vec![0u8; (localoff - 4096) as usize];
    for &n in set {
        m[(n / 8) as usize] |= 1 << (n % 8);
    }
    m
}

/// One 512-byte sector stamped with its export offset and a tag, the same
/// layout the Python writers produce: offset (LE u64), tag (LE u64), then
/// one fill byte.
pub fn stamp(off: u64, tag: u64) -> Vec<u8> {
    let mut s = Vec::with_capacity(512);
    s.extend_from_slice(&off.to_le_bytes());
    s.extend_from_slice(&tag.to_le_bytes());
    s.resize(512, ((off / 512 + tag) % 251) as u8);
    s
}

/// Rows of 496 equal bytes, one per fill value.
fn fill_rows() -> &'static [[u8; 496]] {
    static ROWS: std::sync::OnceLock<Vec<[u8; 496]>> = std::sync::OnceLock::new();
    ROWS.get_or_init(|| (0..=255u8).map(|b| [b; 496]).collect())
}

/// `len` bytes from export offset `off`: each sector `stamp`ed with its
/// own offset and `tag`.
pub fn stamped(off: u64, len: u64, tag: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    for (i, s) in v.chunks_exact_mut(512).enumerate() {
        let o = off + i as u64 * 512;
        s[..8].copy_from_slice(&o.to_le_bytes());
        s[8..16].copy_from_slice(&tag.to_le_bytes());
        // memcpy from a row of 496 equal bytes: fast even unoptimised.
        s[16..].copy_from_slice(&fill_rows()[((o / 512 + tag) % 251) as usize]);
    }
    v
}

/// Python: the same stamp, for the writers.
pub const PY_STAMP: &str = r#"
import struct
def stamp(off, tag):
    return struct.pack('<QQ', off, tag) + bytes([((off // 512) + tag) % 251]) * 496
def stamped(off, length, tag):
    return b''.join(stamp(off + i, tag) for i in range(0, length, 512))
"#;

/// The `queues` line of an idle primary.
pub const IDLE_QUEUES: &str = "local: 0, send: 0, recv: 0, done: 0, idle: 0";

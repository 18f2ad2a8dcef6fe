//! Fail points for the fault tests: compiled in only with the `failpoints`
//! feature (which only the test crate enables). With it, hastd checks for a
//! file named after the point in the directory given by the environment
//! variable `HAST_FAILPOINTS`; while the file exists, the point fails with
//! EIO. Without the feature every point is a no-op.

/// The secondary's write of replicated data to its local provider.
pub const SECONDARY_WRITE: &str = "secondary-write";

/// Not a failure: while armed, the secondary's write of replicated data
/// waits [`SECONDARY_SLOW_WRITE_DELAY`] before it goes to the provider (a
/// slow disk), so a test can stop the session while writes are running.
pub const SECONDARY_SLOW_WRITE: &str = "secondary-slow-write";

/// Not a failure: while armed, the secondary's flush waits
/// [`SECONDARY_SLOW_WRITE_DELAY`] before it reaches the provider (a disk
/// slow to flush), so a power cut in a test reliably finds written data
/// that is not flushed yet.
pub const SECONDARY_SLOW_FLUSH: &str = "secondary-slow-flush";

/// The wait of [`SECONDARY_SLOW_WRITE`] and [`SECONDARY_SLOW_FLUSH`].
pub const SECONDARY_SLOW_WRITE_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// Not a failure: while armed, the secondary waits
/// [`SECONDARY_SLOW_ATTACH_DELAY`] before it answers a primary's attach (a
/// slow handshake), so the primary's first connection attempt takes that
/// long.
pub const SECONDARY_SLOW_ATTACH: &str = "secondary-slow-attach";

/// The wait of [`SECONDARY_SLOW_ATTACH`].
pub const SECONDARY_SLOW_ATTACH_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// The primary's local read of a client request (uhost): the core then
/// serves the read from the peer.
pub const PRIMARY_READ: &str = "primary-read";

/// Not a failure: while armed, each local write of a client request on the
/// primary's userland host waits a random time of up to
/// [`PRIMARY_JITTER_MAX`] before it goes to the provider, as a disk that
/// completes requests out of order does.
pub const PRIMARY_JITTER: &str = "primary-jitter";

/// The longest wait of [`PRIMARY_JITTER`].
pub const PRIMARY_JITTER_MAX: std::time::Duration = std::time::Duration::from_millis(2);

/// Not a failure: while armed, the primary waits [`SLOW_BUMP_DELAY`]
/// before it persists an outage's localcnt bump (a slow metadata write),
/// so the writes that wait for the bump are released late.
pub const SLOW_BUMP: &str = "slow-bump";

/// The wait of [`SLOW_BUMP`].
pub const SLOW_BUMP_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

/// Not a failure: while armed when a session starts, the primary's engine
/// splits client requests for the peer itself, in pieces of
/// [`ENGINE_SPLIT_SIZE`] bytes, instead of its userland host splitting them
/// first. The kernel host relies on this path (it passes requests up to
/// MAXPHYS); the tests exercise it on Linux through this point.
pub const ENGINE_SPLIT: &str = "engine-split";

/// The piece size of [`ENGINE_SPLIT`].
pub const ENGINE_SPLIT_SIZE: u64 = 64 * 1024;

/// Not a failure: while armed when a TLS connection's handshake ends, the
/// connection takes [`TLS_KEY_LIMIT_RECORDS`] as its cipher suite's limit
/// for one key instead of the crypto provider's, so that it sends half of
/// that (32 MiB in records of the largest size) and is re-established, as
/// it is after about 128 GiB with AES-GCM. (A connection cut before
/// both sides flushed what it carried loses that to the next resync: a
/// resync flushes both sides every 128 MiB, so with this point armed one
/// that needs more than a connection never ends; with a real limit each
/// connection carries a thousand times that.)
pub const TLS_KEY_LIMIT: &str = "tls-key-limit";

/// The limit of [`TLS_KEY_LIMIT`], in records of the largest size.
pub const TLS_KEY_LIMIT_RECORDS: u64 = 4096;

/// The error the point `name` injects now, if it is armed.
#[cfg(feature = "failpoints")]
pub fn check(name: &str) -> Option<std::io::Error> {
    let dir = std::env::var_os("HAST_FAILPOINTS")?;
    std::path::Path::new(&dir)
        .join(name)
        .exists()
        .then(|| std::io::Error::from_raw_os_error(libc::EIO))
}

/// Fail points are compiled out of this build.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn check(_name: &str) -> Option<std::io::Error> {
    None
}

//! Exit codes of sysexits(3), as the reference hastd and hastctl use them.

/// Command line usage error.
pub const EX_USAGE: i32 = 64;
/// Data format error (bad sizes, unknown resource on `create`).
pub const EX_DATAERR: i32 = 65;
/// Cannot open input (the local provider).
pub const EX_NOINPUT: i32 = 66;
/// Service unavailable (send/receive on the control socket failed).
pub const EX_UNAVAILABLE: i32 = 69;
/// Internal software error (the daemon answered with an error).
pub const EX_SOFTWARE: i32 = 70;
/// System error (cannot reach the control socket).
pub const EX_OSERR: i32 = 71;
/// Critical OS file missing or unreadable (the configuration file).
pub const EX_OSFILE: i32 = 72;
/// Cannot create (user) output file.
pub const EX_CANTCREAT: i32 = 73;
/// Input/output error.
pub const EX_IOERR: i32 = 74;
/// Temporary failure (another hastd holds the pidfile).
pub const EX_TEMPFAIL: i32 = 75;
/// Configuration error.
pub const EX_CONFIG: i32 = 78;

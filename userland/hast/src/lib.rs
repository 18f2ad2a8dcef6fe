//! hast: Highly Available Storage, block-level replication of a disk between
//! two hosts (network RAID1), compatible with FreeBSD's hastd/hastctl.
//!
//! Layers call down, never up:
//! - bottom: [`sysexits`], [`size`], [`role`], [`stats`], [`nv`], [`proto`], [`addr`],
//!   [`security`] (keys, pins, secrets, TLS configurations), [`config`],
//!   [`provider`], [`activemap`], [`metadata`];
//! - then the control protocol ([`control`]), wall-clock timestamps
//!   ([`clock`]), the event stream ([`events`]), [`hooks`], [`pidfile`], the
//!   accept loop of every listening socket ([`accept`]), the Prometheus
//!   metrics and their HTTP server ([`metrics`]);
//! - the fast-path core ([`core`]) and its hosts ([`uhost`] with the NBD
//!   server [`nbd`], the kernel transport [`kdev`]; in test builds also the
//!   kernel module itself on a userland kernel shim, `kshim`), behind the
//!   engine's [`dataplane`] interface;
//! - then the daemon's engine ([`engine`]); the binaries sit on top.

pub mod accept;
pub mod activemap;
pub mod addr;
pub mod clock;
pub mod config;
pub mod control;
pub mod core;
pub mod dataplane;
pub mod engine;
pub mod events;
pub mod failpoint;
pub mod handshake;
pub mod hooks;
pub mod kdev;
#[cfg(all(feature = "kshim", target_os = "linux"))]
pub mod kshim;
pub mod metadata;
pub mod metrics;
pub mod nbd;
pub mod nv;
pub mod payload;
pub mod pidfile;
pub mod proto;
pub mod provider;
pub mod role;
pub mod security;
pub mod size;
pub mod split;
pub mod splitbrain;
pub mod stats;
pub mod sysexits;
pub mod uhost;
pub mod wire;

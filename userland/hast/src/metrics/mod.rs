//! Prometheus metrics of hastd (hast.conf `metrics <address>`, off by
//! default): per resource the request latency histograms and byte counters
//! the data path records ([`ResourceMetrics`], atomics only), the
//! exposition of those and of the resources' status in the Prometheus text
//! format ([`expose`], with the prometheus-client crate), and the small
//! HTTP server that answers `GET /metrics` on its own thread ([`http`]).

pub mod expose;
pub mod histogram;
pub mod http;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::events::{self, Kind};
use crate::stats::RequestKind;

pub use histogram::Histogram;

/// The request kinds in the order of [`RequestKind`]'s discriminants.
pub const KINDS: [RequestKind; 4] = [
    RequestKind::Read,
    RequestKind::Write,
    RequestKind::Delete,
    RequestKind::Flush,
];

/// The label of a request kind.
pub fn kind_label(k: RequestKind) -> &'static str {
    match k {
        RequestKind::Read => "read",
        RequestKind::Write => "write",
        RequestKind::Delete => "delete",
        RequestKind::Flush => "flush",
    }
}

/// What the data path of one resource records for the metrics, and where
/// it reports its local I/O errors. Recording costs nothing but a relaxed
/// load while metrics are off.
#[derive(Debug)]
pub struct ResourceMetrics {
    name: String,
    enabled: AtomicBool,
    /// Requests by kind, from their arrival to their answer (a primary's
    /// client requests; a secondary's requests from the primary).
    requests: [Histogram; 4],
    /// Bytes of the requests recorded in `requests`, by kind.
    bytes: [AtomicU64; 4],
    /// Writes of client data to the local provider.
    local_write: Histogram,
    /// Requests sent to the peer, until its reply.
    remote: Histogram,
}

/// The recorded values at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub requests: [histogram::Snapshot; 4],
    pub bytes: [u64; 4],
    pub local_write: histogram::Snapshot,
    pub remote: histogram::Snapshot,
}

impl ResourceMetrics {
    /// The metrics of resource `name`, off until [`ResourceMetrics::set_enabled`].
    pub fn new(name: &str) -> Arc<ResourceMetrics> {
        Arc::new(ResourceMetrics {
            name: name.to_string(),
            enabled: AtomicBool::new(false),
            requests: Default::default(),
            bytes: Default::default(),
            local_write: Histogram::default(),
            remote: Histogram::default(),
        })
    }

    /// The resource's name.
    pub fn resource(&self) -> &str {
        &self.name
    }

    /// Turn recording on or off (hast.conf has a `metrics` address or not).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether recording is on.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The start of something to time: now, or `None` when metrics are
    /// off (then nothing is recorded for it).
    pub fn start(&self) -> Option<Instant> {
        self.enabled().then(Instant::now)
    }

    /// A request of `kind` and `bytes` that started at `since` was answered.
    pub fn request_done(&self, kind: RequestKind, bytes: u64, since: Option<Instant>) {
        let Some(since) = since else { return };
        let i = kind as usize;
        if let (Some(h), Some(b)) = (self.requests.get(i), self.bytes.get(i)) {
            h.observe(since.elapsed());
            b.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// A write of client data to the local provider that started at
    /// `since` finished.
    pub fn local_write_done(&self, since: Option<Instant>) {
        if let Some(since) = since {
            self.local_write.observe(since.elapsed());
        }
    }

    /// The peer answered a request sent at `sent`.
    pub fn remote_done(&self, sent: Instant) {
        if self.enabled() {
            self.remote.observe(sent.elapsed());
        }
    }

    /// The local provider failed `op` of `length` bytes at `offset` (an
    /// offset in the data area) with `errno`: published as an `io-error`
    /// event, whether metrics are on or not.
    pub fn local_error(&self, op: &'static str, offset: u64, length: u64, errno: i32) {
        events::publish(
            &self.name,
            Kind::IoError {
                op,
                offset,
                length,
                errno,
            },
        );
    }

    /// Forget everything recorded: the resource takes a role anew, and its
    /// request counters start from 0 again.
    pub fn reset(&self) {
        for h in &self.requests {
            h.reset();
        }
        for b in &self.bytes {
            b.store(0, Ordering::Relaxed);
        }
        self.local_write.reset();
        self.remote.reset();
    }

    /// The values now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: std::array::from_fn(|i| self.requests[i].snapshot()),
            bytes: std::array::from_fn(|i| self.bytes[i].load(Ordering::Relaxed)),
            local_write: self.local_write.snapshot(),
            remote: self.remote.snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_recorded_while_off() {
        let m = ResourceMetrics::new("r");
        assert_eq!(m.start(), None);
        m.request_done(RequestKind::Write, 4096, m.start());
        m.remote_done(Instant::now());
        assert_eq!(m.snapshot().requests[1].count, 0);
        assert_eq!(m.snapshot().remote.count, 0);
        m.set_enabled(true);
        m.request_done(RequestKind::Write, 4096, m.start());
        m.request_done(RequestKind::Flush, 0, m.start());
        m.remote_done(Instant::now());
        let s = m.snapshot();
        assert_eq!(
            (s.requests[1].count, s.bytes[1], s.requests[3].count),
            (1, 4096, 1)
        );
        assert_eq!(s.remote.count, 1);
        m.reset();
        assert_eq!(m.snapshot().bytes[1], 0);
    }
}

//! Request counters: one type from where requests are counted (the core on
//! a primary, the session on a secondary) through the control reply to
//! what `hastctl list` prints under `statistics`.

/// Requests served and the local provider's errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestStats {
    pub reads: u64,
    pub writes: u64,
    pub deletes: u64,
    pub flushes: u64,
    pub activemap_updates: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub delete_errors: u64,
    pub flush_errors: u64,
}

/// Requests inside the daemon, by where they wait (`hastctl list`'s
/// `queues` line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queues {
    /// Requests are not taken from a preallocated pool: always 0.
    pub idle: u64,
    pub local: u64,
    pub send: u64,
    pub recv: u64,
    pub done: u64,
}

/// The kinds of request a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Delete,
    Flush,
}

/// [`RequestStats`] counted by concurrent tasks (a secondary's session).
#[derive(Debug, Default)]
pub struct AtomicRequestStats {
    ok: [std::sync::atomic::AtomicU64; 4],
    failed: [std::sync::atomic::AtomicU64; 4],
}

impl AtomicRequestStats {
    /// Count one request of `kind`, failed or not.
    pub fn count(&self, kind: RequestKind, failed: bool) {
        let slots = if failed { &self.failed } else { &self.ok };
        slots[kind as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> RequestStats {
        let get = |a: &[std::sync::atomic::AtomicU64; 4], k: RequestKind| {
            a[k as usize].load(std::sync::atomic::Ordering::Relaxed)
        };
        RequestStats {
            reads: get(&self.ok, RequestKind::Read),
            writes: get(&self.ok, RequestKind::Write),
            deletes: get(&self.ok, RequestKind::Delete),
            flushes: get(&self.ok, RequestKind::Flush),
            activemap_updates: 0,
            read_errors: get(&self.failed, RequestKind::Read),
            write_errors: get(&self.failed, RequestKind::Write),
            delete_errors: get(&self.failed, RequestKind::Delete),
            flush_errors: get(&self.failed, RequestKind::Flush),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_counters_count_each_kind_apart() {
        let s = AtomicRequestStats::default();
        s.count(RequestKind::Write, false);
        s.count(RequestKind::Write, false);
        s.count(RequestKind::Read, true);
        s.count(RequestKind::Flush, false);
        assert_eq!(
            s.snapshot(),
            RequestStats {
                writes: 2,
                read_errors: 1,
                flushes: 1,
                ..Default::default()
            }
        );
    }
}

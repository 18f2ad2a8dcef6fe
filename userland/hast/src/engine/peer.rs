//! What a resource knows of its replication link, for `hastctl list`, the
//! events and the metrics: since when the session runs, when and why the
//! last one ended, why the last attempt failed, whether the peer refused
//! for split-brain, and how many sessions were established after an
//! earlier one ended. Touched only when the link changes state.

use std::sync::Mutex;

use crate::control::status::LinkStatus;

#[derive(Debug, Default)]
struct State {
    since_ms: Option<u64>,
    last_disconnect: Option<(u64, String)>,
    last_error: Option<String>,
    split_brain: bool,
    sessions: u64,
}

/// The link state of one resource in its current role.
#[derive(Debug, Default)]
pub struct PeerLink(Mutex<State>);

impl PeerLink {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A session is established: no split-brain, no failure to report.
    pub fn connected(&self) {
        self.with(|s| {
            s.since_ms = Some(crate::clock::now_ms());
            s.sessions = s.sessions.saturating_add(1);
            s.last_error = None;
            s.split_brain = false;
        });
    }

    /// The session ended because of `reason`.
    pub fn disconnected(&self, reason: &str) {
        self.with(|s| {
            s.since_ms = None;
            s.last_disconnect = Some((crate::clock::now_ms(), reason.to_string()));
        });
    }

    /// An attempt to connect (or to accept the primary) failed with
    /// `error`; `split_brain` when the counters showed both copies changed.
    pub fn failed(&self, error: &str, split_brain: bool) {
        self.with(|s| {
            s.last_error = Some(error.to_string());
            s.split_brain = split_brain;
        });
    }

    /// Whether the last attempt ended in a split-brain refusal.
    pub fn split_brain(&self) -> bool {
        self.with(|s| s.split_brain)
    }

    /// Whether a session runs.
    pub fn is_connected(&self) -> bool {
        self.with(|s| s.since_ms.is_some())
    }

    /// The link as `hastctl list` reports it.
    pub fn status(&self) -> LinkStatus {
        self.with(|s| LinkStatus {
            connected_since_ms: s.since_ms,
            last_disconnect: s.last_disconnect.clone(),
            last_error: if s.since_ms.is_none() {
                s.last_error.clone()
            } else {
                None
            },
            encryption: None,
            reconnects: s.sessions.saturating_sub(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_failures_and_split_brain() {
        let p = PeerLink::default();
        p.failed("connection refused", false);
        assert_eq!(p.status().last_error.as_deref(), Some("connection refused"));
        p.failed("split-brain", true);
        assert!(p.split_brain());
        p.connected();
        assert!(!p.split_brain() && p.is_connected());
        let st = p.status();
        assert_eq!((st.last_error, st.reconnects), (None, 0));
        p.disconnected("peer closed the connection");
        p.connected();
        let st = p.status();
        assert_eq!(st.reconnects, 1);
        assert_eq!(
            st.last_disconnect.map(|d| d.1).as_deref(),
            Some("peer closed the connection")
        );
    }
}

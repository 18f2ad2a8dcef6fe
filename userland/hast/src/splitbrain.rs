//! The secondary's decision at connection time (protocol version 2): from
//! both nodes' resource id and modification counters, decide who is out of
//! date, what must be synchronized in which direction, or that the nodes
//! have split brains and must both refuse.

/// A node's identity and counters as stored in its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Random resource id; 0 on a provider that never connected.
    pub resuid: u64,
    /// Modifications made while the peer was not watching.
    pub localcnt: u64,
    /// The peer's localcnt as last known in sync.
    pub remotecnt: u64,
}

/// Which side's data is copied to the other (`syncsrc` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncSrc {
    /// The primary's data wins (wire value 1).
    Primary,
    /// The secondary's data wins (wire value 2).
    Secondary,
}

impl SyncSrc {
    /// The wire value of `syncsrc`.
    pub fn to_u8(self) -> u8 {
        match self {
            SyncSrc::Primary => 1,
            SyncSrc::Secondary => 2,
        }
    }

    /// The direction for a wire value.
    pub fn from_u8(v: u8) -> Option<SyncSrc> {
        match v {
            1 => Some(SyncSrc::Primary),
            2 => Some(SyncSrc::Secondary),
            _ => None,
        }
    }
}

/// What the secondary sends back as its map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapToSend {
    /// No map at all (mapsize 0): both nodes are new, nothing to copy.
    None,
    /// Its own on-disk activemap: only dirty extents are synchronized.
    Dirty,
    /// Every bit set: everything is synchronized.
    Full,
}

/// The outcome of the handshake's counter comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The secondary's provider is new: adopt the primary's resource id,
    /// write it to metadata, answer with `virgin`.
    Adopt { resuid: u64, map: MapToSend },
    /// The providers belong to different resources: refuse.
    Mismatch { primary: u64, secondary: u64 },
    /// Both were modified independently: both refuse.
    SplitBrain,
    /// Synchronize `map` from `src`. `unexpected` marks the combinations
    /// the counters should never show (a full synchronization is forced).
    Sync {
        src: SyncSrc,
        map: MapToSend,
        unexpected: bool,
    },
}

/// The error message the secondary sends for a split-brain; the primary
/// recognizes it to fire its own `split-brain` hook.
pub const SPLIT_BRAIN_MSG: &str = "Split-brain condition!";

/// Decide as the secondary, with its own counters `s`, the primary's `p`,
/// and whether the primary announced itself `virgin` (never written).
pub fn decide(s: Counters, p: Counters, primary_virgin: bool) -> Decision {
    if s.resuid == 0 {
        return Decision::Adopt {
            resuid: p.resuid,
            map: if primary_virgin {
                MapToSend::None
            } else {
                MapToSend::Full
            },
        };
    }
    if s.resuid != p.resuid {
        return Decision::Mismatch {
            primary: p.resuid,
            secondary: s.resuid,
        };
    }
    let primary_stale = s.localcnt > p.remotecnt && s.remotecnt == p.localcnt;
    let in_sync = s.localcnt == p.remotecnt && s.remotecnt == p.localcnt;
    let secondary_stale = s.localcnt == p.remotecnt && s.remotecnt < p.localcnt;
    if primary_stale {
        return Decision::Sync {
            src: SyncSrc::Secondary,
            map: MapToSend::Dirty,
            unexpected: false,
        };
    }
    if in_sync || secondary_stale {
        return Decision::Sync {
            src: SyncSrc::Primary,
            map: MapToSend::Dirty,
            unexpected: false,
        };
    }
    if s.localcnt > p.remotecnt && p.localcnt > s.remotecnt {
        return Decision::SplitBrain;
    }
    Decision::Sync {
        src: if s.localcnt > p.remotecnt {
            SyncSrc::Secondary
        } else {
            SyncSrc::Primary
        },
        map: MapToSend::Full,
        unexpected: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(local: u64, remote: u64) -> Counters {
        Counters {
            resuid: 7,
            localcnt: local,
            remotecnt: remote,
        }
    }

    fn sync(src: SyncSrc, map: MapToSend, unexpected: bool) -> Decision {
        Decision::Sync {
            src,
            map,
            unexpected,
        }
    }

    #[test]
    fn new_secondary_adopts_the_primary_id() {
        let s = Counters {
            resuid: 0,
            localcnt: 0,
            remotecnt: 0,
        };
        assert_eq!(
            decide(s, c(0, 0), true),
            Decision::Adopt {
                resuid: 7,
                map: MapToSend::None
            }
        );
        assert_eq!(
            decide(s, c(3, 0), false),
            Decision::Adopt {
                resuid: 7,
                map: MapToSend::Full
            }
        );
    }

    #[test]
    fn different_resources_are_refused() {
        let mut s = c(1, 1);
        s.resuid = 8;
        assert_eq!(
            decide(s, c(1, 1), false),
            Decision::Mismatch {
                primary: 7,
                secondary: 8
            }
        );
    }

    /// The nine combinations of the reference's table, secondary local=3
    /// remote=3 against each primary.
    #[test]
    fn the_reference_table() {
        use MapToSend::*;
        use SyncSrc::*;
        let s = c(3, 3);
        let table = [
            ((2, 2), sync(Secondary, Full, true)),
            ((2, 3), sync(Primary, Full, true)),
            ((2, 4), sync(Primary, Full, true)),
            ((3, 2), sync(Secondary, Dirty, false)),
            ((3, 3), sync(Primary, Dirty, false)),
            ((3, 4), sync(Primary, Full, true)),
            ((4, 2), Decision::SplitBrain),
            ((4, 3), sync(Primary, Dirty, false)),
            ((4, 4), sync(Primary, Full, true)),
        ];
        for ((pl, pr), want) in table {
            assert_eq!(
                decide(s, c(pl, pr), false),
                want,
                "primary local={pl} remote={pr}"
            );
        }
    }

    #[test]
    fn syncsrc_wire_values() {
        assert_eq!(SyncSrc::Primary.to_u8(), 1);
        assert_eq!(SyncSrc::from_u8(2), Some(SyncSrc::Secondary));
        assert_eq!(SyncSrc::from_u8(0), None);
    }
}

//! The typed status of resources, as hastd reports it to `hastctl status`
//! and `list`: [`StatusReply::to_nv`] writes the reference's fields (names
//! suffixed with the resource's index, the reference's nv types, so a
//! FreeBSD hastctl reads them), [`StatusReply::from_nv`] reads them back.
//! Extensions are fields the reference ignores.

use crate::nv::Nv;
use crate::splitbrain::Counters;
use crate::stats::{Queues, RequestStats};

/// A STATUS reply: one entry per resource asked for, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusReply {
    pub entries: Vec<Entry>,
}

/// One resource of a reply: its status, or the error hastd reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub status: Result<ResourceStatus, EntryError>,
}

/// A per-resource error (`error%u`, and this project's `errmsg%u`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryError {
    pub code: i16,
    pub message: Option<String>,
}

/// What hastd knows of one configured resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceStatus {
    pub provname: String,
    pub localpath: String,
    pub remoteaddr: String,
    pub sourceaddr: Option<String>,
    pub replication: String,
    pub checksum: String,
    pub compression: String,
    pub role: String,
    /// The worker's process ID; 0 when the resource has no worker (init,
    /// or a secondary that no primary is connected to).
    pub workerpid: i32,
    /// Extension: a synchronization from the peer toward this copy did not
    /// finish (nv `inconsistent%u`, uint8 1, only when set).
    pub inconsistent: bool,
    /// Extension: how the replication link is protected, for a resource
    /// whose `security` is not `none` (nv `security%u`, `security_link%u`,
    /// `peerfingerprint%u`).
    pub security: Option<SecurityStatus>,
    /// Present for a primary, and for a secondary while its primary is
    /// connected (the reference reports nothing more otherwise).
    pub activity: Option<Activity>,
    /// Extension: the metadata's counters (`resuid%u`, `localcnt%u`,
    /// `remotecnt%u`), for a resource whose provider is open.
    pub counters: Option<Counters>,
    /// Extension: the replication link of a primary or secondary.
    pub link: Option<LinkStatus>,
    /// Extension: the peer's and this node's data both changed while they
    /// were apart; they refuse to connect (`split_brain%u`, uint8 1).
    pub split_brain: bool,
    /// Extension: bytes of extents a synchronization must copy, running or
    /// not yet started (`sync_pending%u`; a primary).
    pub sync_pending: Option<u64>,
}

/// Extension: what this node knows of its replication link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// Since when a session runs (milliseconds since the epoch;
    /// `connected_since%u`); `None` while disconnected.
    pub connected_since_ms: Option<u64>,
    /// When the last session ended and why (`disconnect_time%u`,
    /// `disconnect_reason%u`).
    pub last_disconnect: Option<(u64, String)>,
    /// Why the last attempt to connect failed, while disconnected
    /// (`link_error%u`; a primary, which makes the attempts).
    pub last_error: Option<String>,
    /// How the link is protected, once it can be (`encryption%u`).
    pub encryption: Option<String>,
    /// Sessions established after an earlier one ended, since the
    /// resource took its role (`reconnects%u`).
    pub reconnects: u64,
}

/// Extension: a resource's link security.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityStatus {
    /// The configured `security` (`secret` or `tls`).
    pub security: String,
    /// What protects the connected link (absent while not connected).
    pub link: Option<String>,
    /// The connected peer's key fingerprint (TLS).
    pub peerfingerprint: Option<String>,
}

/// The live part of a resource's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// `complete` or `degraded`.
    pub status: String,
    /// Bytes in extents marked dirty.
    pub dirty: u64,
    pub extentsize: u32,
    pub keepdirty: u32,
    pub requests: RequestStats,
    pub queues: Queues,
    /// Extension: a synchronization is running.
    pub sync: Option<SyncProgress>,
}

/// Extension: how far a synchronization is (`sync_total%u`,
/// `sync_done%u`, `sync_msecs%u`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncProgress {
    pub total: u64,
    pub done: u64,
    /// Milliseconds since it started.
    pub msecs: u64,
}

/// The `stat_*` fields in the reference's order, with their counters.
fn stat_fields(r: &RequestStats) -> [(&'static str, u64); 9] {
    [
        ("stat_read", r.reads),
        ("stat_write", r.writes),
        ("stat_delete", r.deletes),
        ("stat_flush", r.flushes),
        ("stat_activemap_update", r.activemap_updates),
        ("stat_read_error", r.read_errors),
        ("stat_write_error", r.write_errors),
        ("stat_delete_error", r.delete_errors),
        ("stat_flush_error", r.flush_errors),
    ]
}

/// The `*_queue_size` fields in the reference's order.
fn queue_fields(q: &Queues) -> [(&'static str, u64); 5] {
    [
        ("idle_queue_size", q.idle),
        ("local_queue_size", q.local),
        ("send_queue_size", q.send),
        ("recv_queue_size", q.recv),
        ("done_queue_size", q.done),
    ]
}

impl ResourceStatus {
    /// Append this status as the fields of resource index `no`.
    pub fn to_nv(&self, nv: &mut Nv, no: usize) {
        nv.add_string(format!("provname{no}"), self.provname.as_str());
        nv.add_string(format!("localpath{no}"), self.localpath.as_str());
        nv.add_string(format!("remoteaddr{no}"), self.remoteaddr.as_str());
        if let Some(src) = &self.sourceaddr {
            nv.add_string(format!("sourceaddr{no}"), src.as_str());
        }
        nv.add_string(format!("replication{no}"), self.replication.as_str());
        nv.add_string(format!("checksum{no}"), self.checksum.as_str());
        nv.add_string(format!("compression{no}"), self.compression.as_str());
        nv.add_string(format!("role{no}"), self.role.as_str());
        nv.add_i32(format!("workerpid{no}"), self.workerpid);
        if self.inconsistent {
            nv.add_u8(format!("inconsistent{no}"), 1);
        }
        self.extensions_to_nv(nv, no);
        let Some(a) = &self.activity else {
            return;
        };
        if let Some(s) = &a.sync {
            nv.add_u64(format!("sync_total{no}"), s.total);
            nv.add_u64(format!("sync_done{no}"), s.done);
            nv.add_u64(format!("sync_msecs{no}"), s.msecs);
        }
        nv.add_string(format!("status{no}"), a.status.as_str());
        nv.add_u64(format!("dirty{no}"), a.dirty);
        nv.add_u32(format!("extentsize{no}"), a.extentsize);
        nv.add_u32(format!("keepdirty{no}"), a.keepdirty);
        for (name, v) in stat_fields(&a.requests)
            .into_iter()
            .chain(queue_fields(&a.queues))
        {
            nv.add_u64(format!("{name}{no}"), v);
        }
    }

    /// The status of resource index `no` in `nv`; missing fields read as
    /// empty or 0, as the reference's hastctl prints them.
    pub fn from_nv(nv: &Nv, no: usize) -> ResourceStatus {
        let s = |name: &str| {
            nv.get_string(&format!("{name}{no}"))
                .unwrap_or("")
                .to_string()
        };
        let u = |name: &str| nv.get_u64(&format!("{name}{no}")).unwrap_or(0);
        let opt_string = |name: &str| nv.get_string(&format!("{name}{no}")).map(str::to_string);
        let activity = nv.get_string(&format!("status{no}")).map(|status| {
            let sync = nv
                .get_u64(&format!("sync_total{no}"))
                .map(|total| SyncProgress {
                    total,
                    done: u("sync_done"),
                    msecs: u("sync_msecs"),
                });
            Activity {
                status: status.to_string(),
                dirty: u("dirty"),
                extentsize: nv.get_u32(&format!("extentsize{no}")).unwrap_or(0),
                keepdirty: nv.get_u32(&format!("keepdirty{no}")).unwrap_or(0),
                requests: RequestStats {
                    reads: u("stat_read"),
                    writes: u("stat_write"),
                    deletes: u("stat_delete"),
                    flushes: u("stat_flush"),
                    activemap_updates: u("stat_activemap_update"),
                    read_errors: u("stat_read_error"),
                    write_errors: u("stat_write_error"),
                    delete_errors: u("stat_delete_error"),
                    flush_errors: u("stat_flush_error"),
                },
                queues: Queues {
                    idle: u("idle_queue_size"),
                    local: u("local_queue_size"),
                    send: u("send_queue_size"),
                    recv: u("recv_queue_size"),
                    done: u("done_queue_size"),
                },
                sync,
            }
        });
        ResourceStatus {
            provname: s("provname"),
            localpath: s("localpath"),
            remoteaddr: s("remoteaddr"),
            sourceaddr: nv
                .get_string(&format!("sourceaddr{no}"))
                .map(str::to_string),
            replication: s("replication"),
            checksum: s("checksum"),
            compression: s("compression"),
            role: s("role"),
            workerpid: nv.get_i32(&format!("workerpid{no}")).unwrap_or(0),
            inconsistent: nv.get_u8(&format!("inconsistent{no}")) == Some(1),
            security: nv
                .get_string(&format!("security{no}"))
                .map(|security| SecurityStatus {
                    security: security.to_string(),
                    link: nv
                        .get_string(&format!("security_link{no}"))
                        .map(str::to_string),
                    peerfingerprint: nv
                        .get_string(&format!("peerfingerprint{no}"))
                        .map(str::to_string),
                }),
            activity,
            counters: nv.get_u64(&format!("resuid{no}")).map(|resuid| Counters {
                resuid,
                localcnt: u("localcnt"),
                remotecnt: u("remotecnt"),
            }),
            link: nv
                .get_u8(&format!("link{no}"))
                .filter(|&l| l == 1)
                .map(|_| LinkStatus {
                    connected_since_ms: nv.get_u64(&format!("connected_since{no}")),
                    last_disconnect: nv.get_u64(&format!("disconnect_time{no}")).map(|t| {
                        (
                            t,
                            nv.get_string(&format!("disconnect_reason{no}"))
                                .unwrap_or("")
                                .to_string(),
                        )
                    }),
                    last_error: opt_string("link_error"),
                    encryption: opt_string("encryption"),
                    reconnects: u("reconnects"),
                }),
            split_brain: nv.get_u8(&format!("split_brain{no}")) == Some(1),
            sync_pending: nv.get_u64(&format!("sync_pending{no}")),
        }
    }

    /// The extension fields this project adds (the reference ignores
    /// them): link security, counters, link, split-brain, pending
    /// synchronization.
    fn extensions_to_nv(&self, nv: &mut Nv, no: usize) {
        if let Some(l) = &self.security {
            nv.add_string(format!("security{no}"), l.security.as_str());
            if let Some(d) = &l.link {
                nv.add_string(format!("security_link{no}"), d.as_str());
            }
            if let Some(p) = &l.peerfingerprint {
                nv.add_string(format!("peerfingerprint{no}"), p.as_str());
            }
        }
        if let Some(c) = &self.counters {
            nv.add_u64(format!("resuid{no}"), c.resuid);
            nv.add_u64(format!("localcnt{no}"), c.localcnt);
            nv.add_u64(format!("remotecnt{no}"), c.remotecnt);
        }
        if let Some(l) = &self.link {
            nv.add_u8(format!("link{no}"), 1);
            if let Some(t) = l.connected_since_ms {
                nv.add_u64(format!("connected_since{no}"), t);
            }
            if let Some((t, why)) = &l.last_disconnect {
                nv.add_u64(format!("disconnect_time{no}"), *t);
                nv.add_string(format!("disconnect_reason{no}"), why.as_str());
            }
            if let Some(e) = &l.last_error {
                nv.add_string(format!("link_error{no}"), e.as_str());
            }
            if let Some(e) = &l.encryption {
                nv.add_string(format!("encryption{no}"), e.as_str());
            }
            nv.add_u64(format!("reconnects{no}"), l.reconnects);
        }
        if self.split_brain {
            nv.add_u8(format!("split_brain{no}"), 1);
        }
        if let Some(p) = self.sync_pending {
            nv.add_u64(format!("sync_pending{no}"), p);
        }
    }
}

impl EntryError {
    /// Append `error%u` and, when there is one, `errmsg%u`.
    pub fn to_nv(&self, nv: &mut Nv, no: usize) {
        nv.add_i16(format!("error{no}"), self.code);
        if let Some(m) = &self.message {
            nv.add_string(format!("errmsg{no}"), m.as_str());
        }
    }

    /// The error of resource index `no`, if it has one.
    pub fn from_nv(nv: &Nv, no: usize) -> Option<EntryError> {
        let code = nv.get_i16(&format!("error{no}")).filter(|&c| c != 0)?;
        Some(EntryError {
            code,
            message: nv.get_string(&format!("errmsg{no}")).map(str::to_string),
        })
    }
}

impl StatusReply {
    /// Append every entry (`resource%u` first) to `nv`.
    pub fn to_nv(&self, nv: &mut Nv) {
        for (no, e) in self.entries.iter().enumerate() {
            nv.add_string(format!("resource{no}"), e.name.as_str());
            match &e.status {
                Ok(s) => s.to_nv(nv, no),
                Err(err) => err.to_nv(nv, no),
            }
        }
    }

    /// Every `resource%u` of `nv` with its status or error.
    pub fn from_nv(nv: &Nv) -> StatusReply {
        let entries = super::resource_names(nv)
            .into_iter()
            .enumerate()
            .map(|(no, name)| Entry {
                name,
                status: match EntryError::from_nv(nv, no) {
                    Some(e) => Err(e),
                    None => Ok(ResourceStatus::from_nv(nv, no)),
                },
            })
            .collect();
        StatusReply { entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> ResourceStatus {
        ResourceStatus {
            provname: "data".into(),
            localpath: "/dev/ada0p3".into(),
            remoteaddr: "tcp4://10.0.0.2:8457".into(),
            sourceaddr: Some("tcp4://10.0.0.1".into()),
            replication: "fullsync".into(),
            checksum: "crc32".into(),
            compression: "hole".into(),
            role: "primary".into(),
            workerpid: 77,
            inconsistent: true,
            security: Some(SecurityStatus {
                security: "tls".into(),
                link: Some(
                    "encrypted and authenticated (TLS 1.3), TLS13_AES_128_GCM_SHA256".into(),
                ),
                peerfingerprint: Some(format!("sha256:{}", "ab".repeat(32))),
            }),
            activity: Some(Activity {
                status: "complete".into(),
                dirty: 4 << 20,
                extentsize: 2 << 20,
                keepdirty: 64,
                requests: RequestStats {
                    reads: 1,
                    writes: 2,
                    deletes: 3,
                    flushes: 4,
                    activemap_updates: 5,
                    read_errors: 6,
                    write_errors: 7,
                    delete_errors: 8,
                    flush_errors: 9,
                },
                queues: Queues {
                    idle: 0,
                    local: 10,
                    send: 11,
                    recv: 12,
                    done: 13,
                },
                sync: Some(SyncProgress {
                    total: 100,
                    done: 40,
                    msecs: 1500,
                }),
            }),
            counters: Some(Counters {
                resuid: 0xdead_beef,
                localcnt: 3,
                remotecnt: 2,
            }),
            link: Some(LinkStatus {
                connected_since_ms: Some(1_700_000_000_000),
                last_disconnect: Some((1_699_999_999_000, "connection reset".into())),
                last_error: Some("connection refused".into()),
                encryption: Some("encrypted and authenticated (TLS 1.3)".into()),
                reconnects: 4,
            }),
            split_brain: true,
            sync_pending: Some(60),
        }
    }

    /// Every field survives the nv, through the encoded bytes.
    #[test]
    fn replies_round_trip() {
        let reply = StatusReply {
            entries: vec![
                Entry {
                    name: "data".into(),
                    status: Ok(busy()),
                },
                Entry {
                    name: "gone".into(),
                    status: Err(EntryError {
                        code: 1,
                        message: Some("no resource gone in the configuration".into()),
                    }),
                },
                Entry {
                    name: "idle".into(),
                    status: Ok(ResourceStatus {
                        role: "init".into(),
                        ..Default::default()
                    }),
                },
            ],
        };
        let mut nv = Nv::new();
        reply.to_nv(&mut nv);
        let bytes = nv.encode().unwrap();
        let back = StatusReply::from_nv(&Nv::decode(&bytes).unwrap());
        assert_eq!(back, reply);
    }

    /// The reference's field names and nv types, as its hastctl reads
    /// them; the extensions only when set.
    #[test]
    fn fields_have_the_reference_names_and_types() {
        use crate::nv::Value;
        let mut nv = Nv::new();
        busy().to_nv(&mut nv, 3);
        assert!(matches!(nv.get("workerpid3"), Some(Value::Int32(77))));
        assert!(matches!(nv.get("extentsize3"), Some(Value::Uint32(_))));
        assert!(matches!(nv.get("keepdirty3"), Some(Value::Uint32(64))));
        assert!(matches!(nv.get("dirty3"), Some(Value::Uint64(_))));
        assert!(matches!(
            nv.get("stat_flush_error3"),
            Some(Value::Uint64(9))
        ));
        assert!(matches!(
            nv.get("done_queue_size3"),
            Some(Value::Uint64(13))
        ));
        assert!(matches!(nv.get("security3"), Some(Value::String(s)) if s == "tls"));
        let plain = ResourceStatus {
            inconsistent: false,
            activity: None,
            counters: None,
            link: None,
            split_brain: false,
            sync_pending: None,
            security: None,
            ..busy()
        };
        let mut nv = Nv::new();
        plain.to_nv(&mut nv, 0);
        assert!(nv.get("inconsistent0").is_none());
        for ext in [
            "security0",
            "security_link0",
            "peerfingerprint0",
            "resuid0",
            "link0",
            "split_brain0",
            "sync_pending0",
            "reconnects0",
        ] {
            assert!(nv.get(ext).is_none(), "{ext}");
        }
        assert!(nv.get("status0").is_none());
        assert!(nv.get("sync_total0").is_none());
    }
}

//! The Prometheus text exposition (format 0.0.4) of hastd's resources, by
//! way of prometheus-client: the status the control socket reports (role,
//! link, dirty and synchronization bytes, request counters, queues) and
//! what [`super::ResourceMetrics`] recorded (bytes by kind and the latency
//! histograms), read at the moment of the scrape.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{histogram, kind_label, Snapshot, KINDS};
use crate::control::status::ResourceStatus;
use crate::stats::RequestKind;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One resource at the moment of a scrape.
#[derive(Debug, Clone)]
pub struct ResourceSample {
    pub name: String,
    pub status: ResourceStatus,
    pub recorded: Snapshot,
}

/// The exposition of `samples`.
pub fn encode(samples: Vec<ResourceSample>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Samples(Arc::new(samples))));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

#[derive(Debug)]
struct Samples(Arc<Vec<ResourceSample>>);

type Labels = Vec<(&'static str, String)>;

/// A number for a metric: an integer counter or gauge, or a float gauge.
enum Num {
    U(u64),
    F(f64),
}

/// A family of counters or gauges: its name, help, type and one value per
/// label set.
struct Family {
    name: &'static str,
    help: &'static str,
    counter: bool,
    values: Vec<(Labels, Num)>,
}

impl Family {
    fn gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            counter: false,
            values: Vec::new(),
        }
    }

    fn counter(name: &'static str, help: &'static str) -> Family {
        Family {
            counter: true,
            ..Family::gauge(name, help)
        }
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let kind = if self.counter {
            MetricType::Counter
        } else {
            MetricType::Gauge
        };
        let mut family = encoder.encode_descriptor(self.name, self.help, None, kind)?;
        for (labels, v) in &self.values {
            let mut m = family.encode_family(labels)?;
            match (v, self.counter) {
                (Num::U(v), true) => m.encode_counter::<Labels, _, u64>(v, None)?,
                (Num::F(v), true) => m.encode_counter::<Labels, _, f64>(v, None)?,
                (Num::U(v), false) => m.encode_gauge(v)?,
                (Num::F(v), false) => m.encode_gauge(v)?,
            }
        }
        Ok(())
    }
}

fn res(name: &str) -> Labels {
    vec![("resource", name.to_string())]
}

fn with(name: &str, key: &'static str, value: &str) -> Labels {
    vec![("resource", name.to_string()), (key, value.to_string())]
}

fn yes(b: bool) -> Num {
    Num::U(u64::from(b))
}

impl Samples {
    /// Every counter and gauge family, with one value per resource (and
    /// kind, role, queue...).
    fn families(&self) -> Vec<Family> {
        let mut role = Family::gauge(
            "hast_role",
            "Role of the resource on this node (1 for the current role).",
        );
        let mut status = Family::gauge(
            "hast_status",
            "Status of an active resource: complete (connected) or degraded (1 for the current one).",
        );
        let mut connected = Family::gauge(
            "hast_connected",
            "Whether a replication session with the peer runs.",
        );
        let mut split = Family::gauge(
            "hast_split_brain",
            "Whether the peer and this node both changed the data while apart (they refuse to connect).",
        );
        let mut consistent = Family::gauge(
            "hast_consistent",
            "Whether this node's copy is consistent (0 while a synchronization toward it has not finished).",
        );
        let mut dirty = Family::gauge("hast_dirty_bytes", "Bytes in extents marked dirty.");
        let mut sync_running =
            Family::gauge("hast_sync_running", "Whether a synchronization runs.");
        let mut sync_done = Family::gauge(
            "hast_sync_done_bytes",
            "Bytes the running synchronization has copied.",
        );
        let mut sync_total = Family::gauge(
            "hast_sync_total_bytes",
            "Bytes the running synchronization copies in all.",
        );
        let mut sync_rate = Family::gauge(
            "hast_sync_rate_bytes_per_second",
            "Average rate of the running synchronization.",
        );
        let mut sync_pending = Family::gauge(
            "hast_sync_pending_bytes",
            "Bytes of extents a synchronization still has to copy (running or waiting for the peer).",
        );
        let mut requests = Family::counter(
            "hast_requests",
            "Requests served, by kind (the counters of hastctl list).",
        );
        let mut bytes = Family::counter(
            "hast_request_bytes",
            "Bytes of the requests answered, by kind.",
        );
        let mut errors = Family::counter(
            "hast_local_errors",
            "Requests the local provider failed, by kind.",
        );
        let mut queues = Family::gauge(
            "hast_queue_depth",
            "Requests inside the daemon, by where they wait (hastctl list's queues).",
        );
        let mut reconnects = Family::counter(
            "hast_reconnects",
            "Sessions with the peer established after an earlier one ended.",
        );
        let mut activemap = Family::counter(
            "hast_activemap_writes",
            "Writes of the map of dirty extents to the local provider.",
        );
        for s in self.0.iter() {
            let n = s.name.as_str();
            let st = &s.status;
            for r in ["init", "primary", "secondary"] {
                role.values.push((with(n, "role", r), yes(st.role == r)));
            }
            if let Some(a) = &st.activity {
                for v in ["complete", "degraded"] {
                    status
                        .values
                        .push((with(n, "status", v), yes(a.status == v)));
                }
            }
            let link_up = st
                .link
                .as_ref()
                .is_some_and(|l| l.connected_since_ms.is_some());
            connected.values.push((res(n), yes(link_up)));
            split.values.push((res(n), yes(st.split_brain)));
            consistent.values.push((res(n), yes(!st.inconsistent)));
            let a = st.activity.clone().unwrap_or_default();
            dirty.values.push((res(n), Num::U(a.dirty)));
            let p = a.sync.unwrap_or_default();
            sync_running.values.push((res(n), yes(a.sync.is_some())));
            sync_done.values.push((res(n), Num::U(p.done)));
            sync_total.values.push((res(n), Num::U(p.total)));
            let rate = if p.msecs == 0 {
                0.0
            } else {
                p.done as f64 * 1000.0 / p.msecs as f64
            };
            sync_rate.values.push((res(n), Num::F(rate)));
            sync_pending
                .values
                .push((res(n), Num::U(st.sync_pending.unwrap_or(0))));
            let r = &a.requests;
            for (k, served, failed) in [
                (RequestKind::Read, r.reads, r.read_errors),
                (RequestKind::Write, r.writes, r.write_errors),
                (RequestKind::Delete, r.deletes, r.delete_errors),
                (RequestKind::Flush, r.flushes, r.flush_errors),
            ] {
                let l = kind_label(k);
                requests.values.push((with(n, "kind", l), Num::U(served)));
                errors.values.push((with(n, "kind", l), Num::U(failed)));
                let b = s.recorded.bytes.get(k as usize).copied().unwrap_or(0);
                bytes.values.push((with(n, "kind", l), Num::U(b)));
            }
            let q = &a.queues;
            for (name, v) in [
                ("local", q.local),
                ("send", q.send),
                ("recv", q.recv),
                ("done", q.done),
            ] {
                queues.values.push((with(n, "queue", name), Num::U(v)));
            }
            let rc = st.link.as_ref().map_or(0, |l| l.reconnects);
            reconnects.values.push((res(n), Num::U(rc)));
            activemap.values.push((res(n), Num::U(r.activemap_updates)));
        }
        vec![
            role,
            status,
            connected,
            split,
            consistent,
            dirty,
            sync_running,
            sync_done,
            sync_total,
            sync_rate,
            sync_pending,
            requests,
            bytes,
            errors,
            queues,
            reconnects,
            activemap,
        ]
    }
}

fn encode_histogram(
    encoder: &mut DescriptorEncoder,
    name: &'static str,
    help: &'static str,
    values: &[(Labels, &histogram::Snapshot)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in values {
        let mut m = family.encode_family(labels)?;
        m.encode_histogram::<Labels>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}

impl Collector for Samples {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in self.families() {
            f.encode(&mut encoder)?;
        }
        let mut requests = Vec::new();
        let mut local = Vec::new();
        let mut remote = Vec::new();
        for s in self.0.iter() {
            for k in KINDS {
                if let Some(h) = s.recorded.requests.get(k as usize) {
                    requests.push((with(&s.name, "kind", kind_label(k)), h));
                }
            }
            local.push((res(&s.name), &s.recorded.local_write));
            remote.push((res(&s.name), &s.recorded.remote));
        }
        encode_histogram(
            &mut encoder,
            "hast_request_duration_seconds",
            "Time to answer a request, by kind: on a primary from the client's request to its answer, on a secondary from the primary's request to its local completion.",
            &requests,
        )?;
        encode_histogram(
            &mut encoder,
            "hast_local_write_duration_seconds",
            "Time of the local provider's writes of request data.",
            &local,
        )?;
        encode_histogram(
            &mut encoder,
            "hast_remote_round_trip_seconds",
            "Time from sending a request to the peer to its reply (a primary).",
            &remote,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::status::{Activity, LinkStatus};
    use crate::metrics::ResourceMetrics;

    #[test]
    fn exposition_has_every_family_and_consistent_histograms() {
        let m = ResourceMetrics::new("data");
        m.set_enabled(true);
        for _ in 0..3 {
            m.request_done(RequestKind::Write, 4096, m.start());
        }
        m.request_done(RequestKind::Read, 512, m.start());
        let status = ResourceStatus {
            role: "primary".into(),
            activity: Some(Activity {
                status: "complete".into(),
                dirty: 2 << 20,
                ..Default::default()
            }),
            link: Some(LinkStatus {
                connected_since_ms: Some(1),
                reconnects: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = encode(vec![ResourceSample {
            name: "data".into(),
            status,
            recorded: m.snapshot(),
        }])
        .unwrap();
        for line in [
            "hast_role{resource=\"data\",role=\"primary\"} 1",
            "hast_role{resource=\"data\",role=\"init\"} 0",
            "hast_status{resource=\"data\",status=\"complete\"} 1",
            "hast_connected{resource=\"data\"} 1",
            "hast_dirty_bytes{resource=\"data\"} 2097152",
            "hast_reconnects_total{resource=\"data\"} 2",
            "hast_request_bytes_total{resource=\"data\",kind=\"write\"} 12288",
            "hast_request_duration_seconds_count{resource=\"data\",kind=\"write\"} 3",
            "hast_request_duration_seconds_bucket{resource=\"data\",kind=\"write\",le=\"+Inf\"} 3",
            "hast_request_duration_seconds_count{resource=\"data\",kind=\"read\"} 1",
            "# TYPE hast_remote_round_trip_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}

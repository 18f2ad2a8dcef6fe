//! A latency histogram recorded with atomics only: one relaxed add to a
//! bucket and one to the sum per observation, no lock, so the data path
//! can record every request. Read as Prometheus buckets, with the count
//! equal to the `+Inf` bucket by construction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 25 µs to 10 s, about three
/// per decade, from a fast local write to a request that waited out a
/// reconnection.
pub const BOUNDS: [f64; 18] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// [`BOUNDS`] in nanoseconds, for the comparison on the data path.
const BOUNDS_NS: [u64; 18] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Observations by bucket (the last one above the largest bound) and the
/// sum of their durations.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 19],
    sum_ns: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `(upper bound in seconds, observations above the previous bound
    /// and at or below this one)`, one per [`BOUNDS`] entry (not
    /// cumulative: the exposition adds them up).
    pub buckets: Vec<(f64, u64)>,
    /// Every observation (the `+Inf` bucket).
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// Record one duration.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The buckets now.
    pub fn snapshot(&self) -> Snapshot {
        let mut total = 0u64;
        let mut buckets = Vec::with_capacity(BOUNDS.len());
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            total = total.saturating_add(n);
            if let Some(&le) = BOUNDS.get(i) {
                buckets.push((le, n));
            }
        }
        Snapshot {
            buckets,
            count: total,
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Forget every observation (a resource taking a new role).
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.sum_ns.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_agree() {
        for (s, ns) in BOUNDS.iter().zip(BOUNDS_NS) {
            assert_eq!((s * 1e9).round() as u64, ns);
        }
    }

    #[test]
    fn observations_land_at_or_below_their_bound() {
        let h = Histogram::default();
        h.observe(Duration::from_nanos(25_000)); // exactly the first bound
        h.observe(Duration::from_nanos(25_001));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60)); // above every bound
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.000_025, 1));
        assert_eq!(s.buckets[1], (0.000_05, 1));
        // 3 ms: in the 5 ms bucket, not in 2.5 ms.
        assert_eq!(s.buckets[6], (0.002_5, 0));
        assert_eq!(s.buckets[7], (0.005, 1));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 3);
        assert!((s.sum - (60.003 + 0.000_050_001)).abs() < 1e-6, "{}", s.sum);
        h.reset();
        assert_eq!(h.snapshot().count, 0);
    }

    /// Concurrent observers lose nothing.
    #[test]
    fn concurrent_observations_all_count() {
        let h = std::sync::Arc::new(Histogram::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(Duration::from_micros((i * 7 + t) % 20_000));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.snapshot().count, 40_000);
    }
}

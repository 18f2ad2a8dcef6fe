//! The primary's data path inside hastd: a host of the core
//! ([`crate::dataplane::start`] picks the kernel module, or this process
//! behind an NBD export) and the replication link ([`super::link`]) that
//! answers the core's upcalls through the [`Dataplane`] interface.
//!
//! Without a connected peer the primary runs degraded: the first write of
//! the outage waits until the localcnt bump is on disk, written extents
//! stay dirty, and reads the core wants from the peer fail.

use std::sync::{Arc, Mutex};

use crate::config::{Replication, ResourceConfig};
use crate::core::Mode;
use crate::dataplane::{Dataplane, DataplaneError, Host, HostError, HostSpec};
use crate::metadata::Metadata;
use crate::metrics::ResourceMetrics;
use crate::provider::Provider;
use crate::uhost::HostGeometry;

use super::link::Replicator;

/// Why the data path could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PrimaryError(#[from] pub HostError);

/// The replication mode of the core for a configured mode.
pub fn mode_of(r: Replication) -> Mode {
    match r {
        Replication::Fullsync => Mode::FullSync,
        Replication::Memsync => Mode::MemSync,
        Replication::Async => Mode::Async,
    }
}

/// Connect before serving, as the reference does: if the peer holds newer
/// data, reads must go to it from the first request on. Waits for the
/// first connection attempt, at most `connect_wait` (by default the
/// resource's timeout and a second).
async fn first_attempt(replicator: &Replicator, cfg: &ResourceConfig) {
    // hast.conf `connect_wait`, by default timeout + 1 s.
    let wait = cfg.first_connect_wait();
    if tokio::time::timeout(wait, replicator.first_attempt_done())
        .await
        .is_err()
    {
        tracing::warn!("no answer from {} yet; serving without it", cfg.remote);
    }
}

/// The replication link's tasks.
struct Link {
    replicator: Arc<Replicator>,
    upcalls: tokio::task::JoinHandle<()>,
    run: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Link {
    fn start(
        dp: Arc<dyn Dataplane>,
        md: Arc<Mutex<Metadata>>,
        cfg: &ResourceConfig,
        metrics: Arc<ResourceMetrics>,
    ) -> Link {
        let replicator = Replicator::new(dp, md, cfg.clone(), metrics);
        let upcalls = tokio::spawn(replicator.clone().upcalls());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(replicator.clone().run(stop_rx));
        Link {
            replicator,
            upcalls,
            run,
            stop,
        }
    }

    /// Disconnect and end the tasks; afterwards nothing of the link holds
    /// the dataplane.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.run.await;
        self.upcalls.abort();
        let _ = self.upcalls.await;
        self.replicator.extent_tasks_done().await;
    }
}

/// A running primary data path.
pub struct Primary {
    host: Box<dyn Host>,
    dp: Arc<dyn Dataplane>,
    link: Link,
}

impl Primary {
    /// Whether primaries run in the kernel module on this system. The
    /// caller must then hand [`Primary::start`] its only reference to the
    /// provider, which is closed before the module opens the disk
    /// exclusively.
    pub fn kernel_host() -> bool {
        crate::dataplane::kernel_host()
    }

    /// Start the core on the opened provider, connect to the peer, and let
    /// clients in once the first connection attempt is over. The host and
    /// the link record into `metrics`.
    pub async fn start(
        cfg: &ResourceConfig,
        provider: Arc<Provider>,
        md: Arc<Mutex<Metadata>>,
        map: &[u8],
        metrics: Arc<ResourceMetrics>,
    ) -> Result<Primary, PrimaryError> {
        let geometry = {
            let m = md.lock().unwrap_or_else(|p| p.into_inner());
            HostGeometry {
                localoff: m.localoff,
                datasize: m.datasize,
                extentsize: m.extentsize,
                sectorsize: provider.sectorsize(),
                keepdirty: m.keepdirty,
                mode: mode_of(cfg.replication),
                metaflush: cfg.metaflush,
            }
        };
        let mut host = crate::dataplane::start(HostSpec {
            cfg,
            provider,
            geometry,
            map,
            metrics: metrics.clone(),
        })
        .await?;
        let dp = host.plane();
        let link = Link::start(dp.clone(), md, cfg, metrics);
        first_attempt(&link.replicator, cfg).await;
        if let Err(e) = host.open(cfg).await {
            let primary = Primary { host, dp, link };
            primary.stop().await;
            return Err(e.into());
        }
        Ok(Primary { host, dp, link })
    }

    /// Statistics of the core.
    pub fn stats(&self) -> crate::core::Stats {
        self.dp.stats().unwrap_or_else(|e| {
            tracing::warn!("no statistics from the {} host: {e}", self.dp.host());
            crate::core::Stats::default()
        })
    }

    /// Change the metadata with `f` and write it through the host that owns
    /// the disk (see [`Replicator::record`]).
    pub async fn record(
        &self,
        f: impl FnOnce(&mut Metadata) + Send + 'static,
        flush: bool,
    ) -> Result<(), DataplaneError> {
        self.link.replicator.record(f, flush).await
    }

    /// The replication link (connection state, resync progress).
    pub fn replicator(&self) -> &Arc<Replicator> {
        &self.link.replicator
    }

    /// Take changed replication settings without a restart; the link
    /// reconnects to apply a new address.
    pub fn reload(&self, cfg: &ResourceConfig) {
        self.link.replicator.set_config(cfg.clone());
        self.dp.set_mode(mode_of(cfg.replication));
    }

    /// Stop the data path: refuse new clients, let requests in flight
    /// finish, disconnect clients, stop the link, then the core.
    /// Afterwards hastd may open the local provider again.
    pub async fn stop(self) {
        let Primary { mut host, dp, link } = self;
        host.close().await;
        link.stop().await;
        drop(dp);
        host.finish().await;
    }
}

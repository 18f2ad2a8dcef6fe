//! Tests only: what the kernel host adds on the userland kernel shim: the
//! local provider as a GEOM disk of the shim under the module, and the NBD
//! export of `hast/NAME` (every request entering the module's start method
//! as a bio).

use std::sync::Arc;
use std::time::Duration;

use crate::config::ResourceConfig;
use crate::kdev::CreateSpec;

use super::export::Export;
use super::HostError;

/// Tests only: what the kernel host adds on the userland kernel shim: the
/// GEOM disk under the module and the NBD export of `hast/NAME`.
pub struct Shim {
    disk: Option<Arc<crate::kshim::Disk>>,
    backend: Option<Arc<crate::kshim::GeomBackend>>,
    export: Option<Export>,
    failpoints: Option<tokio::task::JoinHandle<()>>,
}

impl Shim {
    /// Before the instance: the local provider as a GEOM disk (`mdN`, as
    /// mdconfig would make it), whose name becomes the instance's local
    /// provider. Blocking.
    pub fn attach(spec: &mut CreateSpec, sectorsize: u32) -> Result<Shim, HostError> {
        crate::kshim::load()?;
        let disk = crate::kshim::Disk::create_md(&spec.local, sectorsize)?;
        tracing::info!("{} is {} on the kernel shim", spec.local, disk.name());
        spec.local = disk.name().to_owned();
        Ok(Shim {
            disk: Some(Arc::new(disk)),
            backend: None,
            export: None,
            failpoints: None,
        })
    }

    /// The userland host's local-disk fail points, on the shim's disk:
    /// while `primary-read` is armed its reads fail with EIO, while
    /// `primary-jitter` is armed each I/O waits a random time.
    fn watch_failpoints(&mut self) {
        use crate::failpoint::{check, PRIMARY_JITTER, PRIMARY_JITTER_MAX, PRIMARY_READ};
        if !cfg!(feature = "failpoints") {
            return;
        }
        let Some(disk) = self.disk.clone() else {
            return;
        };
        self.failpoints = Some(tokio::spawn(async move {
            let (mut read, mut jitter) = (false, false);
            loop {
                let r = check(PRIMARY_READ).is_some();
                if r != read {
                    read = r;
                    let e = r.then_some(nix::errno::Errno::EIO);
                    if let Err(e) = disk.fail(1 << 1, e) {
                        tracing::warn!("fail point {PRIMARY_READ}: {e}");
                    }
                }
                let j = check(PRIMARY_JITTER).is_some();
                if j != jitter {
                    jitter = j;
                    let d = if j {
                        PRIMARY_JITTER_MAX
                    } else {
                        Duration::ZERO
                    };
                    if let Err(e) = disk.delay(d) {
                        tracing::warn!("fail point {PRIMARY_JITTER}: {e}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    /// After the instance: export `hast/NAME` over NBD.
    pub async fn export(&mut self, cfg: &ResourceConfig) -> Result<(), HostError> {
        let backend = Arc::new(crate::kshim::GeomBackend::open(&format!(
            "hast/{}",
            cfg.provname
        ))?);
        self.backend = Some(backend.clone());
        self.export = Some(Export::start(cfg, backend).await?);
        self.watch_failpoints();
        Ok(())
    }

    /// Before the destroy: no client, `hast/NAME` closed.
    pub async fn close(&mut self) {
        if let Some(f) = self.failpoints.take() {
            f.abort();
            let _ = f.await;
        }
        if std::env::var_os(crate::kshim::FAIL_ENV).is_some_and(|v| !v.is_empty()) {
            tracing::info!("kernel shim: {}", crate::kshim::fault_report());
        }
        if let Some(export) = self.export.take() {
            export.shutdown().await;
            export.finish();
        }
        if let Some(backend) = self.backend.take() {
            // The export's tasks have ended: this is the last handle.
            let Ok(backend) = Arc::try_unwrap(backend) else {
                tracing::error!("hast/NAME on the kernel shim is still referenced");
                return;
            };
            let r =
                tokio::task::spawn_blocking(move || backend.close(Duration::from_secs(10))).await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::error!("hast/NAME on the kernel shim is still open: {r:?}");
            }
        }
    }

    /// After the destroy: the disk goes. Blocking.
    pub fn detach(&mut self) {
        if let Some(f) = self.failpoints.take() {
            f.abort();
        }
        let Some(disk) = self.disk.take() else {
            return;
        };
        let name = disk.name().to_owned();
        match Arc::try_unwrap(disk) {
            Ok(disk) => {
                if let Err(e) = disk.destroy(Duration::from_secs(10)) {
                    tracing::error!("the kernel shim's disk {name} stays: {e}");
                }
            }
            Err(_) => tracing::error!("the kernel shim's disk {name} is still in use"),
        }
    }
}

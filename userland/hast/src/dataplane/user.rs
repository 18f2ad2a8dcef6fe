//! [`UserPlane`]: the dataplane of a core running in this process
//! ([`crate::uhost`]): upcalls straight from the core, the sync-lock grants
//! and sync I/O completions matched to their waiters here, metadata written
//! through the engine's own descriptor of the local provider.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::{lock, BoxFuture, DataplaneError, Grants, HostUpcall};
use crate::core::{MapKind, Mode, Stats, SyncDir, Upcall, UpcallKind};
use crate::metadata::Metadata;
use crate::provider::Provider;
use crate::uhost::Uhost;

/// The in-process host of one primary resource.
pub struct UserPlane {
    host: Arc<Uhost>,
    provider: Arc<Provider>,
    grants: Grants,
    /// Sync I/O issued, by cookie, until done (with its errno).
    ios: Mutex<HashMap<u64, oneshot::Sender<i32>>>,
}

impl UserPlane {
    pub fn new(host: Arc<Uhost>, provider: Arc<Provider>) -> UserPlane {
        UserPlane {
            host,
            provider,
            grants: Grants::default(),
            ios: Mutex::new(HashMap::new()),
        }
    }

    /// The host, for the NBD export.
    pub fn uhost(&self) -> &Arc<Uhost> {
        &self.host
    }

    /// Issue a sync I/O with `submit` (its cookie), registered before its
    /// completion can arrive, and wait for it; the bytes it read, if any.
    async fn sync_io(
        &self,
        op: &'static str,
        offset: u64,
        length: u64,
        submit: impl FnOnce() -> Result<u64, crate::core::CoreError>,
    ) -> Result<Option<Vec<u8>>, DataplaneError> {
        let (tx, rx) = oneshot::channel();
        let cookie = {
            let mut w = lock(&self.ios);
            let cookie = submit()?;
            w.insert(cookie, tx);
            cookie
        };
        let waited = rx.await.map_err(|_| DataplaneError::Closed);
        let data = self.host.take_sync(cookie);
        match waited? {
            0 => Ok(data),
            errno => Err(DataplaneError::SyncIo {
                op,
                offset,
                length,
                errno,
            }),
        }
    }
}

impl super::Dataplane for UserPlane {
    fn host(&self) -> &'static str {
        "userland"
    }

    fn next_upcall(&self) -> BoxFuture<'_, Option<HostUpcall>> {
        Box::pin(async move {
            loop {
                while let Some(up) = self.host.core().next_upcall() {
                    match up.kind {
                        UpcallKind::SyncLocked => self.grants.grant(up.seq),
                        UpcallKind::SyncIoDone { error } => {
                            if let Some(tx) = lock(&self.ios).remove(&up.cookie) {
                                let _ = tx.send(error);
                            }
                        }
                        UpcallKind::Write { .. } => {
                            let data = self.host.write_data(up.cookie, up.length);
                            return Some(HostUpcall { up, data });
                        }
                        _ => return Some(HostUpcall { up, data: None }),
                    }
                }
                self.host.upcalls_ready().await;
            }
        })
    }

    fn remote_done(&self, up: &Upcall, error: i32, data: Option<Vec<u8>>) {
        let mut error = error;
        if up.kind == UpcallKind::Read && error == 0 {
            match data {
                Some(d) => self.host.set_read_data(up.cookie, d),
                None => error = libc::EIO,
            }
        }
        if let Err(e) = self.host.core().remote_done(up.seq, error) {
            tracing::debug!("remote completion of seq {} refused: {e}", up.seq);
        }
    }

    fn remote_received(&self, seq: u64) {
        let _ = self.host.core().remote_received(seq);
    }

    fn bump_done(&self, error: i32) {
        if let Err(e) = self.host.core().bump_done(error) {
            tracing::warn!("bump answer refused: {e}");
        }
    }

    fn set_link(&self, up: bool) {
        self.host.set_link(up);
    }

    fn set_max_request(&self, bytes: u64) {
        self.host.set_max_request(bytes);
    }

    fn set_sync_dir(&self, dir: SyncDir) {
        self.host.core().set_sync_dir(dir);
    }

    fn set_mode(&self, mode: Mode) {
        self.host.core().set_mode(mode);
    }

    fn map_size(&self) -> Result<usize, DataplaneError> {
        Ok(self.host.core().map_size())
    }

    fn map(&self, kind: MapKind) -> Result<Vec<u8>, DataplaneError> {
        Ok(self.host.core().map(kind))
    }

    fn map_merge(&self, map: &[u8]) -> Result<(), DataplaneError> {
        Ok(self.host.core().map_merge(map)?)
    }

    fn sync_lock(&self, offset: u64, length: u64) -> BoxFuture<'_, Result<u64, DataplaneError>> {
        let core = self.host.core();
        Box::pin(self.grants.acquire(
            move || Ok(core.sync_lock(offset, length)?),
            move |seq| {
                let _ = core.sync_release(seq, false);
            },
        ))
    }

    fn sync_read(
        &self,
        lock_seq: u64,
        offset: u64,
        length: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, DataplaneError>> {
        Box::pin(async move {
            let data = self
                .sync_io("read", offset, length, || {
                    self.host.sync_read(lock_seq, offset, length)
                })
                .await?;
            data.ok_or(DataplaneError::SyncIo {
                op: "read",
                offset,
                length,
                errno: libc::EIO,
            })
        })
    }

    fn sync_write(
        &self,
        lock_seq: u64,
        offset: u64,
        data: Bytes,
    ) -> BoxFuture<'_, Result<(), DataplaneError>> {
        Box::pin(async move {
            let length = data.len() as u64;
            self.sync_io("write", offset, length, || {
                self.host.sync_write(lock_seq, offset, data)
            })
            .await
            .map(drop)
        })
    }

    fn sync_release(&self, lock_seq: u64, clear: bool) -> Result<(), DataplaneError> {
        Ok(self.host.core().sync_release(lock_seq, clear)?)
    }

    fn sync_cancel(&self) {
        // Sync I/O in flight is left to finish: the disk always answers,
        // and a lock can only be released once its I/O is done.
        self.grants.cancel();
    }

    fn flush(&self) -> Result<u32, DataplaneError> {
        match self.host.core().flush() {
            Err(crate::core::CoreError::Busy(_)) => Err(DataplaneError::Busy),
            r => Ok(r?),
        }
    }

    fn stats(&self) -> Result<Stats, DataplaneError> {
        Ok(self.host.core().stats())
    }

    fn write_metadata(&self, md: &Metadata, flush: bool) -> Result<(), DataplaneError> {
        Ok(md.write(&self.provider, flush)?)
    }
}

/// The userland host of a primary: the core in this process behind an NBD
/// export at the resource's `nbd` address; it times every request and local
/// write for the resource's metrics ([`crate::uhost`]).
pub struct UserHost {
    plane: Arc<UserPlane>,
    uhost: Arc<Uhost>,
    export: Option<super::export::Export>,
}

impl UserHost {
    /// The core on the opened provider; clients come in with
    /// [`super::Host::open`].
    pub fn start(spec: super::HostSpec<'_>) -> Result<UserHost, super::HostError> {
        let uhost = Arc::new(Uhost::new(
            spec.provider.clone(),
            &spec.geometry,
            spec.map,
            spec.metrics,
        )?);
        let plane = Arc::new(UserPlane::new(uhost.clone(), spec.provider));
        Ok(UserHost {
            plane,
            uhost,
            export: None,
        })
    }
}

impl super::Host for UserHost {
    fn plane(&self) -> Arc<dyn super::Dataplane> {
        self.plane.clone()
    }

    fn open<'a>(
        &'a mut self,
        cfg: &'a crate::config::ResourceConfig,
    ) -> BoxFuture<'a, Result<(), super::HostError>> {
        Box::pin(async move {
            let backend: Arc<dyn crate::nbd::Backend> = self.uhost.clone();
            self.export = Some(super::export::Export::start(cfg, backend).await?);
            Ok(())
        })
    }

    fn close(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(export) = &self.export {
                export.shutdown().await;
            }
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let UserHost {
                plane,
                uhost,
                export,
            } = *self;
            if let Some(export) = export {
                export.finish();
            }
            drop(plane);
            // The export's tasks have ended and the engine let go of the
            // plane: this is the last handle on the host.
            match Arc::try_unwrap(uhost) {
                Ok(u) => u.close().await,
                Err(_) => tracing::error!("the userland host is still referenced after its stop"),
            }
        })
    }
}

//! The registry of named exports: export name -> backend, with a stop signal
//! per export so that removing one drains and closes its connections.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::{Backend, NbdError};

/// Longest export name the protocol allows (bytes).
pub const MAX_NAME_LEN: usize = 4096;

struct Entry {
    backend: Arc<dyn Backend>,
    stop: watch::Sender<bool>,
}

/// Named exports served by one or more [`super::Server`]s. Cloning gives
/// another handle on the same set. Exports can be added and removed while
/// clients are connected.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<BTreeMap<String, Entry>>>,
}

/// An export as seen by one connection: its backend and the signal that it
/// is being removed. Holding it keeps [`Registry::remove`] waiting.
pub(crate) struct Attached {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("exports", &self.names())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every update is a single insert or remove), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an export. The name is what clients ask for (the HAST resource
    /// name); it must be 1..=4096 bytes without NUL. The backend's geometry
    /// is checked against what NBD can express.
    pub fn add(&self, name: &str, backend: Arc<dyn Backend>) -> Result<(), NbdError> {
        check_name(name)?;
        check_geometry(name, backend.as_ref())?;
        let mut map = self.lock();
        if map.contains_key(name) {
            return Err(NbdError::ExportExists(name.to_string()));
        }
        let (stop, _) = watch::channel(false);
        map.insert(name.to_string(), Entry { backend, stop });
        Ok(())
    }

    /// Removes an export: new clients no longer see it, connected clients
    /// stop being read, their in-flight requests finish and are answered,
    /// then they are disconnected. Returns once all of them are closed;
    /// false when no such export existed.
    pub async fn remove(&self, name: &str) -> bool {
        let entry = self.lock().remove(name);
        match entry {
            Some(entry) => {
                entry.stop.send_replace(true);
                entry.stop.closed().await;
                true
            }
            None => false,
        }
    }

    /// The export names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// True when an export with this name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// The backend of an export, if registered.
    pub fn backend(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.lock().get(name).map(|e| Arc::clone(&e.backend))
    }

    /// Resolves a client's export name: an exact match, or for the empty
    /// ("default") name the only export when exactly one is registered.
    fn resolve<'a>(
        map: &'a BTreeMap<String, Entry>,
        name: &str,
    ) -> Option<(&'a String, &'a Entry)> {
        if name.is_empty() && map.len() == 1 {
            return map.iter().next();
        }
        map.get_key_value(name)
    }

    /// Looks up an export for `NBD_OPT_INFO`: canonical name and backend.
    pub(crate) fn lookup(&self, name: &str) -> Option<(String, Arc<dyn Backend>)> {
        let map = self.lock();
        Self::resolve(&map, name).map(|(n, e)| (n.clone(), Arc::clone(&e.backend)))
    }

    /// Looks up an export and subscribes to its stop signal, atomically with
    /// respect to [`Registry::remove`].
    pub(crate) fn attach(&self, name: &str) -> Option<Attached> {
        let map = self.lock();
        Self::resolve(&map, name).map(|(n, e)| Attached {
            name: n.clone(),
            backend: Arc::clone(&e.backend),
            stop: e.stop.subscribe(),
        })
    }
}

fn check_name(name: &str) -> Result<(), NbdError> {
    let bad = |reason| {
        Err(NbdError::BadExportName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 4096 bytes");
    }
    if name.contains('\0') {
        return bad("it contains a NUL character");
    }
    Ok(())
}

fn check_geometry(name: &str, b: &dyn Backend) -> Result<(), NbdError> {
    let bs = b.block_size();
    let bad = |reason: String| {
        Err(NbdError::BadGeometry {
            name: name.to_string(),
            reason,
        })
    };
    if !bs.is_power_of_two() || bs > 65536 {
        return bad(format!(
            "block size {bs} is not a power of two between 1 and 65536"
        ));
    }
    if !b.size().is_multiple_of(u64::from(bs)) {
        return bad(format!(
            "size {} is not a multiple of the block size {bs}",
            b.size()
        ));
    }
    Ok(())
}

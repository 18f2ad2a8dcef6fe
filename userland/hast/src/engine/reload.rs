//! SIGHUP: re-read hast.conf and apply it with the reference's rules.
//! A configuration that does not parse, or a control socket or pidfile that
//! cannot be set up, leaves everything as it was. Removed resources go to
//! init; added ones start in init; a changed provider name or local path
//! (and, for a resource in init or secondary, any replication setting)
//! restarts the resource: init, then back to its role. A primary takes
//! changed replication settings in place. Keys, CA files and secrets are
//! read again: a file that cannot be used (or that other users can read)
//! leaves everything as it was; new keys, pins or secrets apply to the
//! next connection, and a running session is re-established with them
//! (a secondary restarts, a primary reconnects).

use crate::config::{Config, ResourceConfig};
use crate::pidfile::Pidfile;
use crate::role::Role;

use super::control_server::ControlListener;
use super::listen::Listeners;
use super::resource::Resource;
use super::Daemon;

/// Whether the change from `old` to `new` needs the resource restarted.
pub fn needs_restart(role: Role, old: &ResourceConfig, new: &ResourceConfig) -> bool {
    if old.provname != new.provname || old.local != new.local || old.nbd != new.nbd {
        return true;
    }
    matches!(role, Role::Init | Role::Secondary) && replication_settings_differ(old, new)
}

/// Whether a primary must take new replication settings (in place).
pub fn needs_reload(role: Role, old: &ResourceConfig, new: &ResourceConfig) -> bool {
    role == Role::Primary && replication_settings_differ(old, new)
}

fn replication_settings_differ(old: &ResourceConfig, new: &ResourceConfig) -> bool {
    old.remote != new.remote
        || old.source != new.source
        || old.replication != new.replication
        || old.checksum != new.checksum
        || old.compression != new.compression
        || old.timeout != new.timeout
        || old.exec != new.exec
        || old.metaflush != new.metaflush
        || old.security != new.security
}

impl Daemon {
    /// Reload the configuration. Returns a newly bound control socket when
    /// the control address changed, and new replication listeners when the
    /// `listen` addresses changed (the caller swaps them in).
    pub(super) async fn reload(&mut self) -> (Option<ControlListener>, Option<Listeners>) {
        tracing::info!("reloading configuration...");
        let mut newcfg = match Config::load(&self.opts.config_path, &self.opts.host) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                tracing::warn!("configuration not reloaded");
                return (None, None);
            }
        };
        let tls = match super::credentials::load(&mut newcfg) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("{e}");
                tracing::warn!("configuration not reloaded");
                return (None, None);
            }
        };
        let mut new_listeners = None;
        if newcfg.listen != self.cfg.listen {
            // Release the old sockets first: the new set may reuse them.
            match Listeners::bind(&newcfg.listen) {
                Ok(l) => new_listeners = Some(l),
                Err(e) => {
                    tracing::error!("{e}");
                    tracing::warn!("configuration not reloaded");
                    return (None, None);
                }
            }
        }
        let mut new_control = None;
        if newcfg.control != self.cfg.control {
            match ControlListener::bind(&newcfg.control) {
                Ok(l) => new_control = Some(l),
                Err(e) => {
                    tracing::error!("{e}");
                    tracing::warn!("configuration not reloaded");
                    return (None, None);
                }
            }
        }
        let old_pidfile = self.opts.pidfile_for(&self.cfg);
        let new_pidfile = self.opts.pidfile_for(&newcfg);
        if old_pidfile != new_pidfile {
            match Pidfile::open(&new_pidfile).and_then(|mut p| p.write().map(|()| p)) {
                Ok(p) => {
                    tracing::info!(
                        "pidfile changed from {} to {}",
                        old_pidfile.display(),
                        new_pidfile.display()
                    );
                    self.pidfile = p;
                }
                Err(e) => {
                    tracing::error!("{e}");
                    tracing::warn!("configuration not reloaded");
                    return (None, None);
                }
            }
        }
        if new_control.is_some() {
            tracing::info!(
                "control socket changed from {} to {}",
                self.cfg.control,
                newcfg.control
            );
        }

        // Resources that are gone: to init, then dropped.
        let mut kept = Vec::with_capacity(newcfg.resources.len());
        for mut res in self.resources.drain(..) {
            if newcfg.resource(res.name()).is_some() {
                kept.push(res);
            } else {
                let _ = res.set_role(Role::Init).await;
                tracing::info!("resource {} removed", res.name());
            }
        }
        // In the new configuration's order: added, restarted or updated.
        let mut resources = Vec::with_capacity(newcfg.resources.len());
        for ncfg in &newcfg.resources {
            let Some(pos) = kept.iter().position(|r| r.name() == ncfg.name) else {
                tracing::info!("resource {} added", ncfg.name);
                resources.push(Resource::new(ncfg.clone()));
                continue;
            };
            let mut res = kept.swap_remove(pos);
            let role = res.role();
            if needs_restart(role, res.config(), ncfg) {
                tracing::info!(
                    "resource {} configuration was modified, restarting it",
                    ncfg.name
                );
                let _ = res.set_role(Role::Init).await;
                res.set_config(ncfg.clone());
                if let Err(e) = res.set_role(role).await {
                    tracing::error!(
                        "resource {} could not be restarted as {role}: {e}",
                        ncfg.name
                    );
                }
            } else {
                let reload = needs_reload(role, res.config(), ncfg);
                res.set_config(ncfg.clone());
                if reload {
                    tracing::info!(
                        "resource {} configuration was modified, reloading it",
                        ncfg.name
                    );
                    res.reload_in_place();
                }
            }
            resources.push(res);
        }
        self.resources = resources;
        self.cfg = newcfg;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
        tracing::info!("configuration reloaded successfully");
        (new_control, new_listeners)
    }
}

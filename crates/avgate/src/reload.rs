//! SIGHUP: what changes without a restart.
//!
//! The configuration is loaded again from the same file, environment and
//! flags (by the binary, which owns them) and handed to
//! [`Reloader::reload`]. Applied at once: the log filter (`log_level`),
//! `max_database_age` and `updates.reload_external`; then the signatures
//! are reloaded, one backend at a time. Everything else (listeners,
//! limits, backends, TLS settings, ...) needs a restart; the log names
//! which of those changed. No connection is dropped: the listeners and the
//! requests in flight are not touched.
//!
//! Features that own runtime policy (the false-positive lists) subscribe to
//! [`Reloader::subscribe`] and apply their part when a new configuration
//! arrives.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::signatures::{ReloadReport, Signatures};

pub struct Reloader {
    signatures: Arc<Signatures>,
    current: watch::Sender<Arc<Config>>,
}

impl Reloader {
    pub fn new(config: Config, signatures: Arc<Signatures>) -> Arc<Reloader> {
        Arc::new(Reloader {
            signatures,
            current: watch::channel(Arc::new(config)).0,
        })
    }

    /// The configuration in force; `changed()` fires on each reload.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.current.subscribe()
    }

    pub fn signatures(&self) -> &Arc<Signatures> {
        &self.signatures
    }

    /// Applies what can change at runtime from `new`, then reloads the
    /// signatures.
    pub async fn reload(&self, new: Config) -> ReloadReport {
        let old = self.current.borrow().clone();
        match crate::cli::set_log_level(new.log_level.as_deref()) {
            Ok(true) => tracing::info!(
                log_level = new.log_level.as_deref().unwrap_or("the default"),
                "log filter applied"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "log_level not applied"),
        }
        self.signatures.apply_config(&new);
        let restart = needs_restart(&old, &new);
        if !restart.is_empty() {
            tracing::warn!(
                settings = %restart.join(", "),
                "these settings changed but take effect only after a restart"
            );
        }
        self.current.send_replace(Arc::new(new));
        tracing::info!("configuration reloaded");
        self.signatures.reload("SIGHUP").await
    }
}

/// The top-level settings that differ between `old` and `new` and are not
/// applied at runtime. Everything is compared except what SIGHUP applies,
/// so that a setting added later cannot be left out by mistake.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut applied = new.clone();
    applied.log_level = old.log_level.clone();
    applied.max_database_age = old.max_database_age;
    applied.updates.reload_external = old.updates.reload_external;
    // The policy task applies its settings itself (`subscribe`).
    applied.policy = old.policy.clone();
    let table = |c: &Config| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let (before, after) = (table(old), table(&applied));
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut changed: Vec<String> = keys
        .into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .cloned()
        .collect();
    // Printed masked (its password), so the tables cannot tell a new
    // password from the old one.
    if old.updates.private_mirror != new.updates.private_mirror
        && !changed.iter().any(|k| k == "updates")
    {
        changed.push("updates".into());
        changed.sort();
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Humantime, Overrides};

    #[test]
    fn only_restart_only_settings_are_reported() {
        let old = Config::load(None, vec![], &Overrides::default()).unwrap();
        let mut new = old.clone();
        new.max_database_age = Humantime(std::time::Duration::from_secs(60));
        new.log_level = Some("debug".into());
        new.updates.reload_external = true;
        assert!(needs_restart(&old, &new).is_empty());
        new.listen = "127.0.0.1:1".parse().unwrap();
        new.updates.interval = Humantime(std::time::Duration::from_secs(7200));
        assert_eq!(needs_restart(&old, &new), ["listen", "updates"]);
        // Any other setting, including one a SIGHUP once forgot.
        let mut new = old.clone();
        new.idle_timeout = Humantime(std::time::Duration::from_secs(5));
        new.policy.ignore_after_scan = true;
        assert_eq!(needs_restart(&old, &new), ["idle_timeout"]);
        // A new password for the private mirror (masked when printed).
        let mut old = old.clone();
        old.updates.private_mirror = Some("http://u:one@m.example/".into());
        let mut new = old.clone();
        new.updates.private_mirror = Some("http://u:two@m.example/".into());
        assert_eq!(needs_restart(&old, &new), ["updates"]);
    }
}

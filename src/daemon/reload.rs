//! SIGHUP: the config read again and accepted, or refused with the running one kept; every
//! accepted change audited.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{Daemon, load_config, notify, probe_store, store_settle};
use crate::audit::{self, Event, Outcome};
use crate::cluster::ClusterHandle;
use crate::config::Config;
use crate::error::Error;
use crate::state::write_atomic;

impl Daemon {
    pub(super) async fn reload(&mut self) {
        tracing::info!(config = %self.config_path.display(), "SIGHUP: reloading the config");
        let (config, text, targets) = match self.read_new_config() {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("config rejected, the running one stays in force: {e}");
                self.count_refusal();
                return;
            }
        };
        let fixed = fixed_keys_changed(&self.config, self.jobs_limit, &config);
        if !fixed.is_empty() {
            tracing::error!(
                "config rejected, the running one stays in force: {} changed; restart the daemon to change {}",
                fixed.join(", "),
                if fixed.len() == 1 { "it" } else { "them" }
            );
            self.count_refusal();
            return;
        }
        if let Err(e) = write_atomic(&self.snapshot, text.as_bytes(), true) {
            tracing::error!(
                "config rejected: cannot write {}: {e}",
                self.snapshot.display()
            );
            return;
        }
        let old_text = std::mem::replace(&mut self.config_text, text);
        let old = std::mem::replace(&mut self.config, config);
        match probe_store(&self.config).await {
            Ok(s) => self.store = s,
            Err(e) => tracing::warn!("keeping the old store connection: {e}"),
        }
        if let Err(e) = self.apply_clusters() {
            tracing::error!("config rejected, the running one stays in force: {e}");
            self.config = old;
            self.config_text = old_text;
            let _ = write_atomic(&self.snapshot, self.config_text.as_bytes(), true);
            let _ = self.apply_clusters();
            return;
        }
        self.targets_tx.send_replace(targets);
        let names: Vec<String> = self.config.clusters.keys().cloned().collect();
        self.alerter.reconfigure(
            self.config.alerts.repeat_interval,
            store_settle(&self.config),
            names,
        );
        self.end_unscheduled_conditions();
        if let Ok(mut r) = self.registry.lock() {
            r.reloads_total += 1;
        }
        self.audit_config_change(Some(&old_text));
        tracing::info!("config reloaded");
    }

    /// The config file read and validated again, with its notification targets.
    fn read_new_config(&self) -> Result<(Config, String, notify::Targets), Error> {
        let (config, text) = load_config(&self.config_path)?;
        let targets = notify::Targets::new(
            config.alerts.webhook_url.as_ref(),
            config.alerts.webhook_ca_file.as_deref(),
            config.alerts.command.as_ref(),
        )
        .map_err(|e| Error::Usage(e.to_string()))?;
        Ok((config, text, targets))
    }

    fn count_refusal(&self) {
        if let Ok(mut r) = self.registry.lock() {
            r.reload_failures_total += 1;
        }
    }

    /// Conditions of removed clusters, and of jobs no longer scheduled, end now.
    fn end_unscheduled_conditions(&mut self) {
        let expire_after = self.config.daemon.expire_after_backup;
        let scheduled: BTreeMap<String, (bool, bool)> = self
            .clusters
            .iter()
            .map(|(n, rt)| {
                (
                    n.clone(),
                    (rt.schedule.backup.is_some(), rt.schedule.drill.is_some()),
                )
            })
            .collect();
        let ended = self
            .alerter
            .retain(Utc::now(), |k| match scheduled.get(&k.cluster) {
                None => false,
                Some((backups, drills)) => match k.event {
                    "backup_failed" => *backups,
                    "drill_failed" => *drills,
                    "expire_failed" => expire_after,
                    _ => true,
                },
            });
        for n in ended {
            self.queue_notification(n);
        }
    }

    /// Records a config change in the audit log of every cluster it concerns: the dotted
    /// names of the keys that changed, never their values (they may be secrets). In the
    /// background, so a slow store never holds up the scheduler; retried while the repository
    /// is unreachable (until it answers or the daemon stops).
    pub(super) fn audit_config_change(&self, previous: Option<&str>) {
        if previous == Some(self.config_text.as_str()) {
            return;
        }
        let new: Option<toml::Table> = self.config_text.parse().ok();
        let old: Option<toml::Table> = previous.and_then(|p| p.parse().ok());
        let changed = match (&old, &new) {
            (Some(o), Some(n)) => changed_keys(o, n),
            _ => vec!["(first start of the daemon with this state directory)".to_string()],
        };
        if changed.is_empty() {
            return;
        }
        for (name, rt) in &self.clusters {
            let mine = keys_of_cluster(&changed, name);
            if mine.is_empty() {
                continue;
            }
            let detail = format!("{}: {}", self.config_path.display(), mine.join(", "));
            tokio::spawn(audit_until_recorded(
                rt.handle.clone(),
                name.clone(),
                detail,
                self.stopping.clone(),
            ));
        }
    }
}

/// What the daemon cannot switch while it runs (its own store, its listener, its state
/// directory, its job slots): the jobs read the snapshot, so these must not change under them
/// either. Returns the names of those that `new` changes.
fn fixed_keys_changed(running: &Config, jobs_limit: usize, new: &Config) -> Vec<&'static str> {
    [
        (
            "repository.url",
            new.repository.url != running.repository.url,
        ),
        (
            "metrics.listen",
            new.metrics.listen != running.metrics.listen,
        ),
        ("state_dir", new.state_dir != running.state_dir),
        (
            "daemon.max_concurrent_jobs",
            new.daemon.max_concurrent_jobs != jobs_limit,
        ),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(k, _)| k)
    .collect()
}

/// The changed keys that concern cluster `name`: its own and every key outside `clusters.`.
fn keys_of_cluster<'a>(changed: &'a [String], name: &str) -> Vec<&'a str> {
    let prefix = format!("clusters.{name}.");
    changed
        .iter()
        .filter(|k| {
            !k.starts_with("clusters.")
                || k.starts_with(&prefix)
                || k.starts_with(&format!("clusters.{name} "))
        })
        .map(|k| k.as_str())
        .collect()
}

/// Writes the config_change audit record, retrying (5 s, doubling to 5 min) while the
/// repository cannot be read, until it is written or the daemon stops.
async fn audit_until_recorded(
    h: Arc<ClusterHandle>,
    name: String,
    detail: String,
    stopping: CancellationToken,
) {
    let mut wait = Duration::from_secs(5);
    loop {
        let sealed = async {
            let info = h.repo.read_info().await?;
            let k = h.keyring(&info).await?;
            Ok::<_, Error>((info, k))
        }
        .await;
        match sealed {
            Ok((info, k)) => {
                let event = Event::new("config_change", Outcome::Ok).detail(detail);
                audit::record(&h, &info, &k, event).await;
                return;
            }
            Err(e) => {
                tracing::warn!(cluster = %name, error = %e, "config change not audited yet; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopping.cancelled() => {
                tracing::error!(cluster = %name, "config change not audited: the daemon stopped first");
                return;
            }
        }
        wait = (wait * 2).min(Duration::from_secs(300));
    }
}

/// Dotted names of the keys whose values differ between two configs (values not shown); a
/// cluster added or removed as a whole is named once.
fn changed_keys(old: &toml::Table, new: &toml::Table) -> Vec<String> {
    fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
        let is_cluster = prefix.starts_with("clusters.") && prefix.matches('.').count() == 1;
        let empty = toml::Table::new();
        match (a, b) {
            (None, Some(_)) if is_cluster => out.push(format!("{prefix} (added)")),
            (Some(_), None) if is_cluster => out.push(format!("{prefix} (removed)")),
            (Some(toml::Value::Table(_)) | None, Some(toml::Value::Table(_)) | None)
                if a.is_some() || b.is_some() =>
            {
                let x = match a {
                    Some(toml::Value::Table(t)) => t,
                    _ => &empty,
                };
                let y = match b {
                    Some(toml::Value::Table(t)) => t,
                    _ => &empty,
                };
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, x.get(k), y.get(k), out);
                }
            }
            (x, y) if x != y => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(
        "",
        Some(&toml::Value::Table(old.clone())),
        Some(&toml::Value::Table(new.clone())),
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_keys_not_values() {
        let a: toml::Table =
            "[repository]\nurl='s3://a'\nsecret_access_key='OLD'\n[clusters.acme]\nkey_file='/k'\n"
                .parse()
                .unwrap();
        let b: toml::Table = "[repository]\nurl='s3://a'\nsecret_access_key='NEW'\n[clusters.acme]\nkey_file='/k'\n[clusters.beta]\nkey_file='/b'\n".parse().unwrap();
        let c = changed_keys(&a, &b);
        assert_eq!(
            c,
            vec!["clusters.beta (added)", "repository.secret_access_key"]
        );
        let d: toml::Table = "[alerts]\narchive_lag_warning='2m'\n[repository]\nurl='s3://a'\nsecret_access_key='OLD'\n[clusters.acme]\nkey_file='/k'\n".parse().unwrap();
        assert_eq!(changed_keys(&a, &d), vec!["alerts.archive_lag_warning"]);
        assert!(!c.iter().any(|k| k.contains("NEW") || k.contains("OLD")));
    }
}

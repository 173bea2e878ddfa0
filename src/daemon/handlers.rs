//! What the scheduler does with the results of the tasks and children it started: store
//! probes, health checks, catalog reads and jobs (backup, expire, drill) become runtime state,
//! metrics and alert conditions.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::alerts::{AlertKey, Condition, STORE_CLUSTER, STORE_EVENT, Severity};
use super::catalog::CatalogSummary;
use super::jobs::{self, ChildFailure, JobKind, JobOutput, JobResult};
use super::scheduler::retry_time;
use super::{Daemon, Msg, metrics, ts};
use crate::check::{CheckReport, Status};
use crate::drill::DrillRecord;
use crate::error::Exit;

impl Daemon {
    pub(super) async fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Job(r) => self.on_job(r).await,
            Msg::Probe { result, at } => self.on_probe(result, at),
            Msg::Check {
                cluster,
                report,
                at,
            } => self.on_check(&cluster, *report, at),
            Msg::Catalog { cluster, result } => self.on_catalog(&cluster, *result),
        }
    }

    fn on_probe(&mut self, result: Result<(), String>, at: DateTime<Utc>) {
        self.probe_running = false;
        let key = AlertKey {
            cluster: STORE_CLUSTER.into(),
            event: STORE_EVENT,
        };
        if let Ok(mut r) = self.registry.lock() {
            r.repository_up = Some(result.is_ok());
        }
        match result {
            Ok(()) => {
                self.alerter.store_reachable(at);
                if self.alerter.is_firing(&key) {
                    // Backups that failed on the store need not wait out their backoff.
                    let soon = Utc::now() + chrono::Duration::seconds(10);
                    for rt in self.clusters.values_mut() {
                        if let Some(t) = rt.retry_at {
                            rt.retry_at = Some(t.min(soon));
                        }
                    }
                }
                self.clear(&key, at)
            }
            Err(e) => {
                // Probe again soon: the recovery should be seen as fast as the outage.
                self.next_probe = Instant::now() + Duration::from_secs(5);
                self.alerter.set(
                    Condition {
                        key,
                        severity: Severity::Critical,
                        message: format!("the repository is unreachable: {e}"),
                        observed: at,
                        store_caused: false,
                        topic: Default::default(),
                    },
                    at,
                )
            }
        }
    }

    fn on_check(&mut self, cluster: &str, report: CheckReport, at: DateTime<Utc>) {
        let Some(rt) = self.clusters.get_mut(cluster) else {
            return;
        };
        rt.check_running = false;
        self.with_metrics(cluster, |m| {
            m.check_status = Some(report.status.exit_code());
            if let Some(c) = report.checks.iter().find(|c| c.name == "archive_lag") {
                m.archive_lag_seconds = c.value;
                m.archive_lag_bytes = c.bytes;
            }
            if let Some(c) = report.checks.iter().find(|c| c.name == "audit") {
                m.audit_pending = c.value.unwrap_or(0.0) as u64;
            }
        });
        self.archive_lag_condition(cluster, &report, at);
        self.check_failed_condition(cluster, &report, at);
    }

    /// Lag over the thresholds; "archiving is failing" is archive_failing's to report.
    fn archive_lag_condition(&mut self, cluster: &str, report: &CheckReport, at: DateTime<Utc>) {
        let lag = report
            .checks
            .iter()
            .find(|c| c.name == "archive_lag" && c.status != Status::Ok);
        let a = &self.config.alerts;
        let lag_sev = lag.and_then(|c| {
            let secs = Duration::from_secs_f64(c.value.unwrap_or(0.0));
            let over_bytes =
                matches!((c.bytes, a.archive_lag_bytes_warning), (Some(b), Some(l)) if b > l);
            if secs > a.archive_lag_critical {
                Some((Severity::Critical, c.message.clone()))
            } else if secs > a.archive_lag_warning || over_bytes {
                Some((Severity::Warning, c.message.clone()))
            } else {
                None
            }
        });
        match lag_sev {
            Some((severity, message)) => self.alerter.set(
                Condition {
                    key: AlertKey {
                        cluster: cluster.into(),
                        event: "archive_lag",
                    },
                    severity,
                    message,
                    observed: at,
                    store_caused: true,
                    topic: Default::default(),
                },
                at,
            ),
            None => self.clear_event(cluster, "archive_lag"),
        }
    }

    /// Every failing check but archive_lag, as one condition whose topic is their names.
    fn check_failed_condition(&mut self, cluster: &str, report: &CheckReport, at: DateTime<Utc>) {
        let other: Vec<_> = report
            .checks
            .iter()
            .filter(|c| c.name != "archive_lag" && c.status != Status::Ok)
            .collect();
        if other.is_empty() {
            self.clear_event(cluster, "check_failed");
            return;
        }
        let worst_status = other
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Warning);
        let store_caused = other
            .iter()
            .all(|c| c.name == "repository" || c.name == "audit");
        let message = other
            .iter()
            .map(|c| format!("{}: {}", c.name, c.message))
            .collect::<Vec<_>>()
            .join("; ");
        self.alerter.set(
            Condition {
                key: AlertKey {
                    cluster: cluster.into(),
                    event: "check_failed",
                },
                severity: if worst_status == Status::Critical {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                message,
                observed: at,
                store_caused,
                topic: other.iter().map(|c| c.name.to_string()).collect(),
            },
            at,
        );
    }

    fn on_catalog(&mut self, cluster: &str, result: Result<CatalogSummary, ChildFailure>) {
        let retry = self.config.daemon.check_interval;
        let Some(rt) = self.clusters.get_mut(cluster) else {
            return;
        };
        rt.catalog_running = false;
        let s = match result {
            Ok(s) => s,
            Err(ChildFailure { code, message: e }) => {
                // A catalog that cannot be read (a manifest that fails authentication, a
                // repository of another system) hides backup age and WAL gaps: an alert itself.
                tracing::warn!(cluster, error = %e, "reading the catalog failed; retrying");
                rt.next_catalog = Instant::now() + retry;
                self.condition(
                    cluster,
                    "catalog_failed",
                    Severity::Critical,
                    format!("the backups and the WAL archive cannot be read (exit {code}): {e}"),
                    jobs::exited(code, Exit::Store),
                );
                return;
            }
        };
        rt.newest_backup = s.newest_backup.map(|b| b.stop_time);
        rt.catalog_loaded = true;
        let now = Utc::now();
        let run_missed = rt.take_missed_run(cluster, now);
        self.with_metrics(cluster, |m| {
            m.backups_in_repository = Some(s.backups);
            if let Some(b) = s.newest_backup {
                m.backup_last_success = Some(ts(b.stop_time));
                m.backup_last_duration = Some(b.duration_ms as f64 / 1000.0);
                m.backup_last_original_bytes = Some(b.original_bytes);
                m.backup_last_stored_bytes = Some(b.stored_bytes);
            }
            m.window_start = s.window.map(|w| ts(w.0));
            m.window_end = s.window.map(|w| ts(w.1));
            m.wal_gaps = Some(s.gaps.len() as u64);
            if let Some(d) = &s.last_drill {
                apply_drill_metrics(m, d);
            }
        });
        self.catalog_conditions(cluster, &s, now);
        if run_missed {
            self.start_job(cluster, JobKind::Backup, Vec::new());
        }
    }

    /// backup_age and wal_gap from a catalog read; a newer backup than a failure ends
    /// backup_failed; a read catalog ends catalog_failed.
    fn catalog_conditions(&mut self, cluster: &str, s: &CatalogSummary, now: DateTime<Utc>) {
        let age_limit = self.config.alerts.backup_age_critical;
        let uptime = (now - self.started).to_std().unwrap_or_default();
        let has_schedule = self
            .clusters
            .get(cluster)
            .is_some_and(|rt| rt.schedule.backup.is_some());
        let newest = s.newest_backup.map(|b| b.stop_time);
        match newest {
            Some(t) if (now - t).to_std().unwrap_or_default() > age_limit => self.condition(
                cluster,
                "backup_age",
                Severity::Critical,
                format!(
                    "the newest backup ended {} ago (limit {})",
                    humantime::format_duration(Duration::from_secs(
                        (now - t).num_seconds().max(0) as u64
                    )),
                    humantime::format_duration(age_limit)
                ),
                false,
            ),
            None if has_schedule && uptime > age_limit => self.condition(
                cluster,
                "backup_age",
                Severity::Critical,
                "no complete backup".into(),
                false,
            ),
            _ => self.clear_event(cluster, "backup_age"),
        }
        if s.gaps.is_empty() {
            self.clear_event(cluster, "wal_gap");
        } else {
            self.condition(
                cluster,
                "wal_gap",
                Severity::Critical,
                format!(
                    "WAL is missing inside the restorable history (lost WAL): {}",
                    s.gaps.join("; ")
                ),
                false,
            );
        }
        // A newer backup than a failure (taken by hand, or by another host) ends the failure.
        let failed_key = AlertKey {
            cluster: cluster.to_string(),
            event: "backup_failed",
        };
        if let (Some(newest), Some(failed_at)) = (newest, self.alerter.observed(&failed_key))
            && newest > failed_at
        {
            self.clear(&failed_key, now);
        }
        self.clear_event(cluster, "catalog_failed");
    }

    pub(super) async fn on_job(&mut self, r: JobResult) {
        self.running_jobs = self.running_jobs.saturating_sub(1);
        let Some(rt) = self.clusters.get_mut(&r.cluster) else {
            return;
        };
        rt.set_busy(r.kind, false);
        match r.kind {
            JobKind::Backup if r.ok() => self.backup_succeeded(&r),
            JobKind::Backup if r.exited(Exit::Busy) => self.backup_held_off(&r),
            JobKind::Backup if r.stopped() || r.exited(Exit::Interrupted) => {
                tracing::info!(cluster = %r.cluster, "backup stopped for the shutdown; nothing of it was kept");
            }
            JobKind::Backup => self.backup_failed(&r),
            JobKind::Expire => self.on_expire(&r),
            JobKind::Drill => self.on_drill(&r),
        }
    }

    fn backup_succeeded(&mut self, r: &JobResult) {
        let backoff = self.config.daemon.retry_backoff;
        let expire_after = self.config.daemon.expire_after_backup;
        let cluster = r.cluster.as_str();
        let Some(rt) = self.clusters.get_mut(cluster) else {
            return;
        };
        rt.retry_at = None;
        rt.retry_wait = backoff;
        rt.busy_since = None;
        rt.next_catalog = Instant::now();
        if let Ok(mut reg) = self.registry.lock() {
            let m = reg.clusters.entry(cluster.to_string()).or_default();
            m.backups_total += 1;
            if let Some(JobOutput::Backup(b)) = &r.output {
                m.backup_last_success = Some(ts(b.stop_time));
                m.backup_last_duration = Some(b.duration_ms as f64 / 1000.0);
                m.backup_last_original_bytes = Some(b.original_bytes);
                m.backup_last_stored_bytes = Some(b.stored_bytes);
            }
        }
        rt.newest_backup = Some(Utc::now());
        let drilling = rt.busy(JobKind::Drill);
        if expire_after && drilling {
            rt.expire_pending = true;
        }
        self.clear_event(cluster, "backup_failed");
        self.clear_event(cluster, "backup_age");
        if expire_after && !drilling && !self.stopping.is_cancelled() {
            self.start_job(cluster, JobKind::Expire, Vec::new());
        }
    }

    /// Another process (an operator's backup, another host) holds the cluster's lock: no
    /// alert, try again after retry_backoff (never past the next scheduled run) unless a
    /// backup has completed by then. The catalog is read before the retry so that completion
    /// is seen.
    fn backup_held_off(&mut self, r: &JobResult) {
        let backoff = self.config.daemon.retry_backoff;
        let Some(rt) = self.clusters.get_mut(&r.cluster) else {
            return;
        };
        let now = Utc::now();
        rt.retry_at = retry_time(now, backoff, rt.next_backup);
        if rt.retry_at.is_some() {
            let started = now - chrono::Duration::milliseconds((r.seconds * 1000.0) as i64);
            rt.busy_since.get_or_insert(started);
            rt.next_catalog = rt.next_catalog.min(Instant::now() + backoff.mul_f64(0.75));
        }
        let when = match rt.retry_at {
            Some(_) => "retrying unless that one completes",
            None => "the next scheduled run comes first",
        };
        let error = r.error.as_deref().unwrap_or_default();
        tracing::warn!(cluster = %r.cluster, "backup held off ({when}): {error}");
    }

    /// Retry with backoff, never past the next scheduled run.
    fn backup_failed(&mut self, r: &JobResult) {
        let cluster = r.cluster.as_str();
        let store_caused = r.exited(Exit::Store);
        let error = r.error.as_deref().unwrap_or_default();
        let Some(rt) = self.clusters.get_mut(cluster) else {
            return;
        };
        rt.busy_since = None;
        let wait = rt.retry_wait;
        rt.retry_at = retry_time(Utc::now(), wait, rt.next_backup);
        rt.retry_wait = (wait * 2).min(Duration::from_secs(86400));
        tracing::error!(
            cluster = %cluster,
            retry = %rt.retry_at.map(|t| t.format("%Y-%m-%d %H:%M:%S+00").to_string()).unwrap_or_else(|| "at the next scheduled run".into()),
            "backup failed: {error}"
        );
        self.with_metrics(cluster, |m| m.backup_failures_total += 1);
        if store_caused && !self.probe_running {
            self.start_probe();
        }
        self.condition(
            cluster,
            "backup_failed",
            Severity::Critical,
            format!("backup failed (exit {}): {error}", r.code),
            store_caused,
        );
    }

    fn on_expire(&mut self, r: &JobResult) {
        let cluster = r.cluster.as_str();
        if r.ok() {
            if let Some(rt) = self.clusters.get_mut(cluster) {
                rt.next_catalog = Instant::now();
            }
            if let Some(JobOutput::Expire(e)) = &r.output {
                self.with_metrics(cluster, |m| {
                    m.expire_deleted_backups_total += e.deleted_backups as u64;
                    m.expire_deleted_wal_total += e.deleted_wal as u64;
                });
            }
            self.clear_event(cluster, "expire_failed");
        } else if !r.stopped() {
            self.with_metrics(cluster, |m| m.expire_failures_total += 1);
            self.condition(
                cluster,
                "expire_failed",
                Severity::Warning,
                format!(
                    "retention failed (exit {}): {}",
                    r.code,
                    r.error.as_deref().unwrap_or_default()
                ),
                r.exited(Exit::Store),
            );
        }
    }

    /// A drill's record (printed by a failed drill too) updates the drill metrics; retention
    /// held back by the drill runs now.
    fn on_drill(&mut self, r: &JobResult) {
        let cluster = r.cluster.as_str();
        if let Some(rt) = self.clusters.get_mut(cluster)
            && std::mem::take(&mut rt.expire_pending)
            && !self.stopping.is_cancelled()
        {
            self.start_job(cluster, JobKind::Expire, Vec::new());
        }
        let record = match &r.output {
            Some(JobOutput::Drill(d)) => Some(d.as_ref()),
            _ => None,
        };
        if let Some(d) = record {
            self.with_metrics(cluster, |m| apply_drill_metrics(m, d));
        }
        if r.ok() {
            self.clear_event(cluster, "drill_failed");
        } else if !r.stopped() && !r.exited(Exit::Interrupted) {
            self.with_metrics(cluster, |m| m.drill_failures_total += 1);
            let reason = record
                .and_then(|d| d.error.clone())
                .or_else(|| r.error.clone())
                .unwrap_or_default();
            self.condition(
                cluster,
                "drill_failed",
                Severity::Critical,
                format!("restore drill failed: {reason}"),
                r.exited(Exit::Store),
            );
        }
    }
}

fn apply_drill_metrics(m: &mut metrics::ClusterMetrics, d: &DrillRecord) {
    m.drill_last_ok = Some(d.ok);
    m.drill_last_duration = Some((d.finished - d.started).num_milliseconds() as f64 / 1000.0);
    m.drill_last_rto = d.rto_ms.map(|v| v as f64 / 1000.0);
    if d.ok {
        m.drill_last_success = Some(ts(d.finished));
    }
}

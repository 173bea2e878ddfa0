//! The scheduler's timing: per-cluster runtime built from the config, the 1-second tick that
//! starts checks, catalog reads, backups (scheduled, missed, retried) and drills, the store
//! probe, and the wal-push state poll.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::alerts::{AlertKey, Condition, Severity};
use super::jobs::{self, JobKind, JobResult, JobSpec};
use super::{ClusterRt, Daemon, Msg, WAL_STATE_POLL, catalog, probe_options, ts};
use crate::check::{self, CheckOptions, CheckReport, Status};
use crate::cluster::ClusterHandle;
use crate::config::ResolvedSchedule;
use crate::error::{Error, Exit};
use crate::state::WalPushStats;
use crate::store;

/// When to retry a backup `wait` after `now`: None when the next scheduled run comes first
/// (it takes the retry's place).
pub(super) fn retry_time(
    now: DateTime<Utc>,
    wait: Duration,
    next_backup: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let at = now + chrono::Duration::from_std(wait).unwrap_or_default();
    match next_backup {
        Some(n) if n <= at => None,
        _ => Some(at),
    }
}

fn jittered(t: DateTime<Utc>, jitter: Duration) -> DateTime<Utc> {
    if jitter.is_zero() {
        return t;
    }
    let mut b = [0u8; 8];
    let _ = crate::pipeline::keys::random_bytes(&mut b);
    let ms = u64::from_le_bytes(b) % (jitter.as_millis().max(1) as u64);
    t + chrono::Duration::milliseconds(ms as i64)
}

/// Whether two schedules are the same cron expression in the same time zone.
fn same_schedule(
    a: &Option<crate::schedule::Schedule>,
    b: &Option<crate::schedule::Schedule>,
) -> bool {
    let key = |s: &Option<crate::schedule::Schedule>| {
        s.as_ref()
            .map(|s| (s.expression().to_string(), s.timezone()))
    };
    key(a) == key(b)
}

fn next_backup_after(schedule: &ResolvedSchedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule
        .backup
        .as_ref()
        .and_then(|s| s.next_after(now))
        .map(|t| jittered(t, schedule.jitter))
}

impl ClusterRt {
    /// A cluster the daemon has not run yet: its first scheduled times; the catalog decides
    /// about a missed run.
    fn new(
        name: &str,
        handle: Arc<ClusterHandle>,
        schedule: ResolvedSchedule,
        retry_backoff: Duration,
        now: DateTime<Utc>,
    ) -> ClusterRt {
        let next_backup = next_backup_after(&schedule, now);
        let next_drill = schedule.drill.as_ref().and_then(|s| s.next_after(now));
        match (&schedule.backup, next_backup) {
            (Some(s), Some(t)) => tracing::info!(
                cluster = %name,
                schedule = s.expression(),
                timezone = %s.timezone(),
                next = %t.format("%Y-%m-%d %H:%M:%S+00"),
                "backups scheduled"
            ),
            _ => tracing::warn!(
                cluster = %name,
                "no backup schedule ([schedule] backup or [clusters.{name}.schedule] backup): monitoring only"
            ),
        }
        ClusterRt {
            handle,
            missed_run_pending: schedule.backup.is_some(),
            schedule,
            next_backup,
            next_drill,
            retry_at: None,
            retry_wait: retry_backoff,
            busy_since: None,
            running: BTreeMap::new(),
            check_running: false,
            catalog_running: false,
            next_check: Instant::now(),
            next_catalog: Instant::now(),
            newest_backup: None,
            catalog_loaded: false,
            expire_pending: false,
        }
    }

    /// A reloaded cluster keeps what runs and its timing; only a changed schedule (or jitter)
    /// computes its next time anew.
    fn reconfigure(
        &mut self,
        handle: Arc<ClusterHandle>,
        schedule: ResolvedSchedule,
        now: DateTime<Utc>,
    ) {
        if !same_schedule(&self.schedule.backup, &schedule.backup)
            || self.schedule.jitter != schedule.jitter
        {
            self.next_backup = next_backup_after(&schedule, now);
        }
        if !same_schedule(&self.schedule.drill, &schedule.drill) {
            self.next_drill = schedule.drill.as_ref().and_then(|s| s.next_after(now));
        }
        self.handle = handle;
        self.schedule = schedule;
    }
}

impl ClusterRt {
    /// The start-up decision about a missed run, made once, when the catalog is first read:
    /// true when no backup ended after the most recent scheduled time (the daemon was down
    /// then, or stopped while that backup ran; this includes "older than the schedule's
    /// period").
    pub(super) fn take_missed_run(&mut self, cluster: &str, now: DateTime<Utc>) -> bool {
        if !std::mem::take(&mut self.missed_run_pending) {
            return false;
        }
        let Some(sched) = &self.schedule.backup else {
            return false;
        };
        let last_due = prev_fire(sched, now);
        let stale = match (self.newest_backup, last_due) {
            (None, _) => true,
            (Some(t), Some(due)) => t < due,
            (Some(_), None) => false,
        };
        if !stale || self.busy(JobKind::Backup) {
            return false;
        }
        tracing::info!(
            cluster,
            newest = %self.newest_backup.map(|t| t.format("%Y-%m-%d %H:%M:%S+00").to_string()).unwrap_or_else(|| "none".into()),
            due = %last_due.map(|t| t.format("%Y-%m-%d %H:%M:%S+00").to_string()).unwrap_or_else(|| "-".into()),
            "no backup since the last scheduled time: running the missed backup now"
        );
        true
    }
}

impl Daemon {
    /// (Re)builds the per-cluster runtime from `self.config`, keeping what runs.
    pub(super) fn apply_clusters(&mut self) -> Result<(), Error> {
        let now = Utc::now();
        let mut next = BTreeMap::new();
        for name in self.config.clusters.keys() {
            let handle = Arc::new(ClusterHandle::with_store(
                &self.config,
                name,
                self.store.clone(),
            )?);
            let schedule = self.config.resolve_schedule(name).map_err(Error::Usage)?;
            let rt = match self.clusters.remove(name) {
                Some(mut rt) => {
                    rt.reconfigure(handle, schedule, now);
                    rt
                }
                None => ClusterRt::new(
                    name,
                    handle,
                    schedule,
                    self.config.daemon.retry_backoff,
                    now,
                ),
            };
            next.insert(name.clone(), rt);
        }
        for (name, _) in std::mem::take(&mut self.clusters) {
            tracing::info!(cluster = %name, "cluster removed from the config: no longer scheduled");
            if let Ok(mut r) = self.registry.lock() {
                r.clusters.remove(&name);
            }
        }
        self.clusters = next;
        Ok(())
    }

    pub(super) async fn on_tick(&mut self) {
        self.heartbeat.beat();
        let now = Utc::now();
        let stopping = self.stopping.is_cancelled();
        if self.last_wal_poll.elapsed() >= WAL_STATE_POLL {
            self.last_wal_poll = Instant::now();
            self.poll_wal_state(now);
        }
        if !self.probe_running && Instant::now() >= self.next_probe {
            self.start_probe();
        }
        let names: Vec<String> = self.clusters.keys().cloned().collect();
        for name in names {
            self.tick_cluster(&name, now, stopping);
        }
        if let Ok(mut r) = self.registry.lock() {
            r.alerts_firing = self.alerter.firing_count() as u64;
            r.jobs_running = self.running_jobs as u64;
            r.alerts_sent_total = self
                .delivery
                .sent
                .load(std::sync::atomic::Ordering::Relaxed);
            r.alert_delivery_failures_total = self
                .delivery
                .failed
                .load(std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn tick_cluster(&mut self, name: &str, now: DateTime<Utc>, stopping: bool) {
        self.start_check_if_due(name);
        self.start_catalog_if_due(name);
        if stopping {
            return;
        }
        self.start_backup_if_due(name, now);
        self.retry_backup_if_due(name, now);
        self.start_drill_if_due(name, now);
        if let (Some(rt), Ok(mut r)) = (self.clusters.get(name), self.registry.lock()) {
            r.clusters.entry(name.to_string()).or_default().next_backup = rt.next_backup.map(ts);
        }
    }

    fn start_check_if_due(&mut self, name: &str) {
        let interval = self.config.daemon.check_interval;
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        if rt.check_running || Instant::now() < rt.next_check {
            return;
        }
        rt.check_running = true;
        rt.next_check = Instant::now() + interval;
        let (h, tx) = (rt.handle.clone(), self.tx.clone());
        let cluster = name.to_string();
        // A check that hangs (a server that accepts connections and never answers) must
        // not end the checking of this cluster: it is bounded, and its end is a report.
        let limit = (interval * 2).max(Duration::from_secs(60));
        tokio::spawn(async move {
            let report = run_check(&h, &cluster, limit).await;
            let _ = tx.send(Msg::Check {
                cluster,
                report: Box::new(report),
                at: Utc::now(),
            });
        });
    }

    fn start_catalog_if_due(&mut self, name: &str) {
        let catalog_interval = self.config.daemon.catalog_interval;
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        if rt.catalog_running || Instant::now() < rt.next_catalog {
            return;
        }
        rt.catalog_running = true;
        rt.next_catalog = Instant::now() + catalog_interval;
        let tx = self.tx.clone();
        let (cluster, snapshot) = (name.to_string(), self.snapshot.clone());
        let limit = catalog_interval.max(Duration::from_secs(600));
        tokio::spawn(async move {
            let result = Box::new(catalog::read_catalog(&snapshot, &cluster, limit).await);
            let _ = tx.send(Msg::Catalog { cluster, result });
        });
    }

    /// A scheduled run replaces any pending retry.
    fn start_backup_if_due(&mut self, name: &str, now: DateTime<Utc>) {
        let retry_backoff = self.config.daemon.retry_backoff;
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        let due = rt.next_backup.is_some_and(|t| now >= t);
        if !due {
            return;
        }
        rt.next_backup = next_backup_after(&rt.schedule, now);
        rt.retry_at = None;
        rt.retry_wait = retry_backoff;
        rt.busy_since = None;
        if rt.busy(JobKind::Backup) {
            tracing::warn!(cluster = %name, "scheduled backup skipped: the previous one still runs");
        } else {
            self.start_job(name, JobKind::Backup, Vec::new());
        }
    }

    fn retry_backup_if_due(&mut self, name: &str, now: DateTime<Utc>) {
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        let due = rt.retry_at.is_some_and(|t| now >= t) && !rt.busy(JobKind::Backup);
        if !due {
            return;
        }
        rt.retry_at = None;
        match rt.busy_since.take() {
            Some(since) if rt.newest_backup.is_some_and(|b| b >= since) => {
                tracing::info!(cluster = %name, "not retrying: the backup that held the lock has completed");
            }
            Some(_) => {
                tracing::info!(cluster = %name, "retrying the backup that another one held off");
                self.start_job(name, JobKind::Backup, Vec::new());
            }
            None => {
                tracing::info!(cluster = %name, "retrying the failed backup");
                self.start_job(name, JobKind::Backup, Vec::new());
            }
        }
    }

    /// A due drill waits while the cluster's backup or retention runs (the first would drill
    /// what is about to change, the second could delete what the drill restores) and until
    /// the catalog is known; with no complete backup there is nothing to drill (backup_age and
    /// backup_failed report that).
    fn start_drill_if_due(&mut self, name: &str, now: DateTime<Utc>) {
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        let due = rt.next_drill.is_some_and(|t| now >= t)
            && !rt.busy(JobKind::Backup)
            && !rt.busy(JobKind::Expire)
            && !rt.busy(JobKind::Drill)
            && rt.catalog_loaded;
        if !due {
            return;
        }
        rt.next_drill = rt.schedule.drill.as_ref().and_then(|s| s.next_after(now));
        if rt.newest_backup.is_none() {
            tracing::warn!(cluster = %name, "scheduled drill skipped: no complete backup yet");
        } else {
            let target = rt
                .handle
                .config
                .drill
                .target
                .clone()
                .unwrap_or_else(|| "random".into());
            self.start_job(name, JobKind::Drill, vec!["--target".into(), target]);
        }
    }

    pub(super) fn start_job(&mut self, name: &str, kind: JobKind, args: Vec<String>) {
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        rt.set_busy(kind, true);
        self.running_jobs += 1;
        let spec = JobSpec {
            exe: jobs::current_exe(),
            config: self.snapshot.clone(),
            cluster: name.to_string(),
            kind,
            args,
        };
        let (tx, cancel, stopping) = (
            self.tx.clone(),
            self.cancel_jobs.clone(),
            self.stopping.clone(),
        );
        // Expire is light and follows a backup: it does not wait for a job slot.
        let permit = (kind != JobKind::Expire).then(|| self.jobs.clone());
        tokio::spawn(async move {
            let _slot = match permit {
                Some(sem) => tokio::select! {
                    p = sem.acquire_owned() => p.ok(),
                    _ = stopping.cancelled() => None,
                },
                None => None,
            };
            let r = if stopping.is_cancelled() {
                JobResult {
                    kind,
                    cluster: spec.cluster.clone(),
                    code: jobs::NO_EXIT_CODE,
                    output: None,
                    error: Some("not started: the daemon is stopping".into()),
                    seconds: 0.0,
                    cancelled: true,
                }
            } else {
                jobs::run(spec, cancel).await
            };
            let _ = tx.send(Msg::Job(r));
        });
    }

    pub(super) fn start_probe(&mut self) {
        let Some(first) = self.clusters.keys().next().cloned() else {
            return;
        };
        self.probe_running = true;
        self.next_probe = Instant::now()
            + self
                .config
                .daemon
                .check_interval
                .min(Duration::from_secs(15));
        let tx = self.tx.clone();
        let (url, s3) = (
            self.config.repository.url.clone(),
            self.config.s3_settings(),
        );
        let opts = probe_options(&self.config);
        tokio::spawn(async move {
            // A success proves the store answered at some moment after the probe started:
            // date it then, so it never vouches for a failure seen while it was under way.
            let at = Utc::now();
            // A store of its own, so a new connection like every wal-push makes (a server
            // shutting down may still serve old connections and refuse new ones), and the
            // request every wal-push makes first (a GET of cluster.json).
            let result = match store::from_url(&url, &s3, &opts).await {
                Err(e) => Err(e.to_string()),
                Ok(st) => match st
                    .get_bytes(&format!("{first}/cluster.json"), 1 << 20)
                    .await
                {
                    Ok(_) | Err(crate::store::StoreError::NotFound { .. }) => Ok(()),
                    Err(e) => Err(e.to_string()),
                },
            };
            let _ = tx.send(Msg::Probe { result, at });
        });
    }

    fn poll_wal_state(&mut self, now: DateTime<Utc>) {
        let names: Vec<String> = self.clusters.keys().cloned().collect();
        for name in names {
            let stats = WalPushStats::read(&self.state_dir, &name);
            let key = AlertKey {
                cluster: name.clone(),
                event: "archive_failing",
            };
            match stats.failing_since() {
                Some(t) => {
                    let store_caused = stats.last_error_code == Some(Exit::Store.code());
                    if store_caused && !self.alerter.is_firing(&key) && !self.probe_running {
                        // Find out at once whether the store is the cause.
                        self.start_probe();
                    }
                    self.alerter.set(
                        Condition {
                            key,
                            severity: Severity::Critical,
                            message: format!(
                                "wal-push is failing (PostgreSQL keeps the WAL and retries): {}",
                                stats.last_error.clone().unwrap_or_default()
                            ),
                            observed: t,
                            store_caused,
                            topic: Default::default(),
                        },
                        now,
                    );
                }
                None => self.clear(&key, now),
            }
            if let Ok(mut r) = self.registry.lock() {
                r.clusters.entry(name.clone()).or_default().wal = stats;
            }
        }
    }
}

/// The daemon's health check of one cluster, bounded by `limit` (its end is always a report),
/// then the upload of audit records a store outage left pending.
async fn run_check(h: &ClusterHandle, cluster: &str, limit: Duration) -> CheckReport {
    let opts = CheckOptions {
        switch_wal: false,
        archive_timeout: Duration::from_secs(60),
        catalog: false,
    };
    let run = async {
        let report = check::check(h, &opts).await;
        // Upload audit records a store outage left pending.
        if let Ok(info) = h.repo.read_info().await
            && crate::audit::pending(h, &info).0 > 0
            && let Err(e) = crate::audit::flush(h, &info).await
        {
            tracing::warn!(cluster = %h.name, error = %e, "pending audit records not uploaded yet");
        }
        report
    };
    match tokio::time::timeout(limit, run).await {
        Ok(r) => r,
        Err(_) => CheckReport {
            cluster: cluster.to_string(),
            status: Status::Critical,
            checks: vec![check::CheckResult {
                name: "check",
                status: Status::Critical,
                message: format!(
                    "the health check did not finish within {} (a server or store that does not answer)",
                    humantime::format_duration(limit)
                ),
                value: None,
                bytes: None,
            }],
        },
    }
}

/// The most recent scheduled time at or before `now` (within 400 days).
fn prev_fire(s: &crate::schedule::Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let period = s.period_at(now).unwrap_or(Duration::from_secs(86400));
    // Look back twice the period, then further while nothing is found: irregular schedules
    // (the 1st and 2nd of each month) have a short period and long gaps.
    let mut back = (period * 2).max(Duration::from_secs(60));
    while back <= Duration::from_secs(400 * 86400) {
        let mut t = s.next_after(now - chrono::Duration::from_std(back).ok()?)?;
        let mut last = None;
        while t <= now {
            last = Some(t);
            t = s.next_after(t)?;
        }
        if last.is_some() {
            return last;
        }
        back *= 2;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prev_fire_finds_the_last_scheduled_time() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let daily = crate::schedule::Schedule::parse("0 2 * * *", "UTC").unwrap();
        assert_eq!(
            prev_fire(&daily, t("2026-12-01T02:20:00Z")),
            Some(t("2026-12-01T02:00:00Z"))
        );
        assert_eq!(
            prev_fire(&daily, t("2026-12-01T01:59:59Z")),
            Some(t("2026-11-30T02:00:00Z"))
        );
        // Exactly at the time counts as due.
        assert_eq!(
            prev_fire(&daily, t("2026-12-01T02:00:00Z")),
            Some(t("2026-12-01T02:00:00Z"))
        );
        let irregular = crate::schedule::Schedule::parse("0 0 1,2 * *", "UTC").unwrap();
        assert_eq!(
            prev_fire(&irregular, t("2026-12-20T00:00:00Z")),
            Some(t("2026-12-02T00:00:00Z"))
        );
        let minutely = crate::schedule::Schedule::parse("* * * * *", "UTC").unwrap();
        assert_eq!(
            prev_fire(&minutely, t("2026-12-01T10:00:30Z")),
            Some(t("2026-12-01T10:00:00Z"))
        );
    }
}

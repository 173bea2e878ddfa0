//! `tidemark daemon`: runs every configured cluster — scheduled backups (cron per cluster, in
//! its time zone, with jitter), retention after each backup, scheduled restore drills, health
//! checks, Prometheus metrics and alerts — until SIGTERM.
//!
//! Shape: one scheduler loop owns all state (clusters, alert conditions, metrics) and reacts
//! to a 1-second tick, to signals, and to messages from the tasks it starts. Heavy work runs in
//! child processes (`jobs`); checks run as tasks of this process against a store with short
//! retries, so a slow store makes a check fail fast (and alert) instead of hanging the loop;
//! catalog reads run as children too (`list --json`, `drill --history --json`).
//!
//! Contracts:
//! - One backup of a cluster at a time: the daemon never starts a second one itself, and the
//!   backup command's lease and advisory lock exclude other daemons and operators.
//! - A missed run (daemon down at the scheduled time) runs once at start when no backup
//!   ended after the most recent scheduled time.
//! - A failed backup is retried after `retry_backoff`, doubling, never past the next
//!   scheduled run. One held off by another holder of the lock (Exit::Busy) is retried after
//!   `retry_backoff` unless a backup completed meanwhile; it is not a failure.
//! - SIGTERM: no new job starts; running jobs get `shutdown_grace` to finish, then SIGTERM
//!   (a backup aborts and removes what it wrote; nothing partial is ever listed); exit 0.
//! - SIGHUP: the config is read again; a config that does not parse or validate is rejected
//!   with an error line and the running one stays in force.

mod alerts;
mod jobs;
mod metrics;
mod notify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::audit::{self, Event, Outcome};
use crate::check::{self, CheckOptions, CheckReport, Status};
use crate::cluster::ClusterHandle;
use crate::config::{Config, ResolvedSchedule};
use crate::drill::DrillRecord;
use crate::error::{Error, Exit};
use crate::list::Listing;
use crate::state::{FileLock, WalPushStats, ensure_dir, write_atomic};
use crate::store::{self, Store, StoreOptions};
use alerts::{AlertKey, Alerter, Condition, STORE_CLUSTER, STORE_EVENT, Severity};
use jobs::{ChildFailure, JobKind, JobOutput, JobResult, JobSpec};

const TICK: Duration = Duration::from_secs(1);
const WAL_STATE_POLL: Duration = Duration::from_secs(2);
/// Retries of the daemon's own store requests (checks, catalog, probes) stop after this long.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);

pub struct DaemonOptions {
    pub config_path: PathBuf,
}

enum Msg {
    Job(JobResult),
    Check {
        cluster: String,
        report: Box<CheckReport>,
        at: DateTime<Utc>,
    },
    Catalog {
        cluster: String,
        /// The error with the child's exit code (Exit::Store: the store).
        result: Box<Result<CatalogSummary, ChildFailure>>,
    },
    Probe {
        result: Result<(), String>,
        at: DateTime<Utc>,
    },
}

/// What the daemon takes from the catalog children's output.
#[derive(Debug)]
struct CatalogSummary {
    newest_backup: Option<NewestBackup>,
    backups: u64,
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    gaps: Vec<String>,
    last_drill: Option<DrillRecord>,
}

/// The complete backup that ended last.
#[derive(Debug, Clone, Copy)]
struct NewestBackup {
    stop_time: DateTime<Utc>,
    duration_ms: u64,
    original_bytes: u64,
    stored_bytes: u64,
}

impl CatalogSummary {
    /// From `list --json` and `drill --history --json` (oldest drill first).
    fn of(listing: &Listing, mut drills: Vec<DrillRecord>) -> CatalogSummary {
        let newest_backup =
            listing
                .backups
                .iter()
                .max_by_key(|b| b.stop_time)
                .map(|b| NewestBackup {
                    stop_time: b.stop_time,
                    duration_ms: b.duration_ms,
                    original_bytes: b.original_bytes,
                    stored_bytes: b.stored_bytes,
                });
        let gaps = listing
            .window_gaps
            .iter()
            .map(|(timeline, g)| {
                format!(
                    "timeline {timeline}: {} .. {} ({} missing)",
                    g.from, g.to, g.missing
                )
            })
            .collect();
        CatalogSummary {
            newest_backup,
            backups: listing.backups.len() as u64,
            window: listing.earliest_restorable.zip(listing.latest_restorable),
            gaps,
            last_drill: drills.pop(),
        }
    }
}

struct ClusterRt {
    handle: Arc<ClusterHandle>,
    schedule: ResolvedSchedule,
    next_backup: Option<DateTime<Utc>>,
    next_drill: Option<DateTime<Utc>>,
    retry_at: Option<DateTime<Utc>>,
    retry_wait: Duration,
    /// Set when the pending retry is for a backup refused because another one held the
    /// cluster's lock (Exit::Busy): when the refused job started. The retry is dropped if a
    /// backup ended after that (the other one covers this run).
    busy_since: Option<DateTime<Utc>>,
    running: BTreeMap<&'static str, bool>,
    check_running: bool,
    catalog_running: bool,
    next_check: Instant,
    next_catalog: Instant,
    /// Whether the start-up decision about a missed run is still to be made (it needs the
    /// catalog).
    missed_run_pending: bool,
    /// The catalog has been read once (newest_backup is known).
    catalog_loaded: bool,
    newest_backup: Option<DateTime<Utc>>,
    /// Retention waits for a running drill (it could delete what the drill restores).
    expire_pending: bool,
}

impl ClusterRt {
    fn busy(&self, kind: JobKind) -> bool {
        self.running.get(kind.as_str()).copied().unwrap_or(false)
    }
    fn set_busy(&mut self, kind: JobKind, v: bool) {
        self.running.insert(kind.as_str(), v);
    }
}

struct Daemon {
    config_path: PathBuf,
    snapshot: PathBuf,
    state_dir: PathBuf,
    config: Config,
    config_text: String,
    store: Arc<dyn Store>,
    clusters: BTreeMap<String, ClusterRt>,
    alerter: Alerter,
    registry: metrics::Shared,
    heartbeat: metrics::Heartbeat,
    notify_tx: mpsc::Sender<alerts::Notification>,
    targets_tx: watch::Sender<notify::Targets>,
    delivery: Arc<notify::DeliveryCounters>,
    tx: mpsc::UnboundedSender<Msg>,
    jobs: Arc<Semaphore>,
    jobs_limit: usize,
    /// Cancelled at SIGTERM: nothing new starts (also no job waiting for a slot).
    stopping: CancellationToken,
    /// Cancelled when the grace period ends: running jobs are asked to stop.
    cancel_jobs: CancellationToken,
    running_jobs: usize,
    probe_running: bool,
    next_probe: Instant,
    started: DateTime<Utc>,
    last_wal_poll: Instant,
    _lock: FileLock,
}

/// When to retry a backup `wait` after `now`: None when the next scheduled run comes first
/// (it takes the retry's place).
fn retry_time(
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

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Opens the store for the daemon's own requests: short retries, so a check fails (and
/// alerts) within seconds instead of waiting out `retry_timeout`.
async fn probe_store(config: &Config) -> Result<Arc<dyn Store>, Error> {
    store::open(
        &config.repository.url,
        &config.s3_settings(),
        &probe_options(config),
    )
    .await
    .map_err(Error::Usage)
}

fn probe_options(config: &Config) -> StoreOptions {
    StoreOptions {
        retry_deadline: config.repository.retry_timeout.min(PROBE_DEADLINE),
        connect_timeout: config
            .repository
            .connect_timeout
            .min(Duration::from_secs(5)),
    }
}

fn load_config(path: &Path) -> Result<(Config, String), Error> {
    let (config, text) = Config::load_with_text(path)?;
    if config.clusters.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no [clusters.NAME] section: nothing to run",
            path.display()
        )));
    }
    Ok((config, text))
}

pub async fn run(opts: DaemonOptions) -> Result<(), Error> {
    let (config, text) = load_config(&opts.config_path)?;
    let state_dir = crate::state::resolve_dir(config.state_dir.as_deref());
    let daemon_dir = state_dir.join("daemon");
    ensure_dir(&daemon_dir)
        .map_err(|e| Error::LocalIo(format!("state directory {}: {e}", daemon_dir.display())))?;
    let lock = FileLock::try_acquire(&daemon_dir.join("lock"))
        .map_err(|e| Error::LocalIo(format!("{}: {e}", daemon_dir.join("lock").display())))?
        .ok_or_else(|| {
            Error::Busy(format!(
                "another tidemark daemon runs with state directory {}",
                state_dir.display()
            ))
        })?;
    let snapshot = daemon_dir.join("config.toml");
    let previous = std::fs::read_to_string(&snapshot).ok();
    write_atomic(&snapshot, text.as_bytes(), true)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", snapshot.display())))?;

    let store = probe_store(&config).await?;
    let registry: metrics::Shared = Default::default();
    if let Ok(mut r) = registry.lock() {
        r.started = ts(Utc::now());
    }
    let heartbeat = metrics::Heartbeat::new();
    let metrics_task = match &config.metrics.listen {
        Some(addr) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|e| Error::Usage(format!("metrics.listen: {e}")))?;
            Some(
                metrics::serve(addr, registry.clone(), heartbeat.clone())
                    .await
                    .map_err(|e| Error::LocalIo(format!("metrics.listen {addr}: {e}")))?,
            )
        }
        None => None,
    };
    let targets = notify::Targets::new(
        config.alerts.webhook_url.as_ref(),
        config.alerts.webhook_ca_file.as_deref(),
        config.alerts.command.as_ref(),
    )
    .map_err(|e| Error::Usage(e.to_string()))?;
    if targets.is_empty() {
        tracing::warn!("no [alerts] webhook_url or command: alerts only go to this log");
    }
    let (targets_tx, targets_rx) = watch::channel(targets);
    let delivery = Arc::new(notify::DeliveryCounters::default());
    let notify_tx = notify::start(targets_rx, delivery.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let names: Vec<String> = config.clusters.keys().cloned().collect();
    let alerter = Alerter::new(
        config.alerts.repeat_interval,
        store_settle(&config),
        names.clone(),
    );
    let jobs_limit = config.daemon.max_concurrent_jobs;
    let mut d = Daemon {
        config_path: opts.config_path.clone(),
        snapshot,
        state_dir,
        config_text: text,
        store,
        clusters: BTreeMap::new(),
        alerter,
        registry,
        heartbeat,
        notify_tx,
        targets_tx,
        delivery,
        tx,
        jobs: Arc::new(Semaphore::new(jobs_limit)),
        jobs_limit,
        stopping: CancellationToken::new(),
        cancel_jobs: CancellationToken::new(),
        running_jobs: 0,
        probe_running: false,
        next_probe: Instant::now(),
        started: Utc::now(),
        last_wal_poll: Instant::now() - WAL_STATE_POLL,
        _lock: lock,
        config,
    };
    d.apply_clusters()?;
    d.audit_config_change(previous.as_deref());
    tracing::info!(
        clusters = %names.join(","),
        config = %opts.config_path.display(),
        "daemon started"
    );

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Internal(e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Internal(e.to_string()))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::Internal(e.to_string()))?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => d.on_tick().await,
            Some(m) = rx.recv() => d.on_msg(m).await,
            _ = hup.recv() => d.reload().await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        d.send_alerts();
    }

    d.stopping.cancel();
    tracing::info!(
        running = d.running_jobs,
        grace = ?d.config.daemon.shutdown_grace,
        "stopping: no new jobs; waiting for running ones"
    );
    let grace = tokio::time::sleep(d.config.daemon.shutdown_grace);
    tokio::pin!(grace);
    let mut asked = false;
    while d.running_jobs > 0 {
        tokio::select! {
            Some(m) = rx.recv() => {
                if let Msg::Job(r) = m {
                    d.on_job(r).await;
                }
            }
            _ = &mut grace, if !asked => {
                asked = true;
                tracing::info!(running = d.running_jobs, "grace period over: asking running jobs to stop");
                d.cancel_jobs.cancel();
            }
        }
    }
    d.send_alerts();
    // Let queued notifications (a failure or a "resolved" seen just now) go out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    tracing::info!("daemon stopped");
    Ok(())
}

/// Evidence of store-caused failures older than the store's recovery plus this is still
/// explained by the outage: PostgreSQL's archiver retries within a minute, checks run every
/// check_interval.
fn store_settle(config: &Config) -> Duration {
    (config.daemon.check_interval * 2).max(Duration::from_secs(90))
}

impl Daemon {
    /// (Re)builds the per-cluster runtime from `self.config`, keeping what runs.
    fn apply_clusters(&mut self) -> Result<(), Error> {
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
                    let changed =
                        |a: &Option<crate::schedule::Schedule>,
                         b: &Option<crate::schedule::Schedule>| {
                            a.as_ref()
                                .map(|s| (s.expression().to_string(), s.timezone()))
                                != b.as_ref()
                                    .map(|s| (s.expression().to_string(), s.timezone()))
                        };
                    if changed(&rt.schedule.backup, &schedule.backup)
                        || rt.schedule.jitter != schedule.jitter
                    {
                        rt.next_backup = schedule
                            .backup
                            .as_ref()
                            .and_then(|s| s.next_after(now))
                            .map(|t| jittered(t, schedule.jitter));
                    }
                    if changed(&rt.schedule.drill, &schedule.drill) {
                        rt.next_drill = schedule.drill.as_ref().and_then(|s| s.next_after(now));
                    }
                    rt.handle = handle;
                    rt.schedule = schedule;
                    rt
                }
                None => {
                    let next_backup = schedule
                        .backup
                        .as_ref()
                        .and_then(|s| s.next_after(now))
                        .map(|t| jittered(t, schedule.jitter));
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
                        retry_wait: self.config.daemon.retry_backoff,
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

    async fn reload(&mut self) {
        tracing::info!(config = %self.config_path.display(), "SIGHUP: reloading the config");
        let loaded = load_config(&self.config_path).and_then(|(config, text)| {
            notify::Targets::new(
                config.alerts.webhook_url.as_ref(),
                config.alerts.webhook_ca_file.as_deref(),
                config.alerts.command.as_ref(),
            )
            .map_err(|e| Error::Usage(e.to_string()))
            .map(|t| (config, text, t))
        });
        let (config, text, targets) = match loaded {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("config rejected, the running one stays in force: {e}");
                if let Ok(mut r) = self.registry.lock() {
                    r.reload_failures_total += 1;
                }
                return;
            }
        };
        // The jobs read the snapshot: what the daemon cannot switch while it runs (its own
        // store, its listener, its state directory) must not change under them either.
        let fixed: Vec<&str> = [
            (
                "repository.url",
                config.repository.url != self.config.repository.url,
            ),
            (
                "metrics.listen",
                config.metrics.listen != self.config.metrics.listen,
            ),
            ("state_dir", config.state_dir != self.config.state_dir),
            (
                "daemon.max_concurrent_jobs",
                config.daemon.max_concurrent_jobs != self.jobs_limit,
            ),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(k, _)| k)
        .collect();
        if !fixed.is_empty() {
            tracing::error!(
                "config rejected, the running one stays in force: {} changed; restart the daemon to change {}",
                fixed.join(", "),
                if fixed.len() == 1 { "it" } else { "them" }
            );
            if let Ok(mut r) = self.registry.lock() {
                r.reload_failures_total += 1;
            }
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
        // Conditions of removed clusters, and of jobs no longer scheduled, end now.
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
        if let Ok(mut r) = self.registry.lock() {
            r.reloads_total += 1;
        }
        self.audit_config_change(Some(&old_text));
        tracing::info!("config reloaded");
    }

    /// Records a config change in the audit log of every cluster it concerns: the dotted
    /// names of the keys that changed, never their values (they may be secrets). In the
    /// background, so a slow store never holds up the scheduler; retried while the repository
    /// is unreachable (until it answers or the daemon stops).
    fn audit_config_change(&self, previous: Option<&str>) {
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
            let prefix = format!("clusters.{name}.");
            let mine: Vec<&str> = changed
                .iter()
                .filter(|k| {
                    !k.starts_with("clusters.")
                        || k.starts_with(&prefix)
                        || k.starts_with(&format!("clusters.{name} "))
                })
                .map(|k| k.as_str())
                .collect();
            if mine.is_empty() {
                continue;
            }
            let detail = format!("{}: {}", self.config_path.display(), mine.join(", "));
            let (h, name, stopping) = (rt.handle.clone(), name.clone(), self.stopping.clone());
            tokio::spawn(async move {
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
            });
        }
    }

    async fn on_tick(&mut self) {
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
        let interval = self.config.daemon.check_interval;
        let catalog_interval = self.config.daemon.catalog_interval;
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        if !rt.check_running && Instant::now() >= rt.next_check {
            rt.check_running = true;
            rt.next_check = Instant::now() + interval;
            let (h, tx) = (rt.handle.clone(), self.tx.clone());
            let cluster = name.to_string();
            // A check that hangs (a server that accepts connections and never answers) must
            // not end the checking of this cluster: it is bounded, and its end is a report.
            let limit = (interval * 2).max(Duration::from_secs(60));
            tokio::spawn(async move {
                let opts = CheckOptions {
                    switch_wal: false,
                    archive_timeout: Duration::from_secs(60),
                    catalog: false,
                };
                let run = async {
                    let report = check::check(&h, &opts).await;
                    // Upload audit records a store outage left pending.
                    if let Ok(info) = h.repo.read_info().await
                        && crate::audit::pending(&h, &info).0 > 0
                        && let Err(e) = crate::audit::flush(&h, &info).await
                    {
                        tracing::warn!(cluster = %h.name, error = %e, "pending audit records not uploaded yet");
                    }
                    report
                };
                let report = match tokio::time::timeout(limit, run).await {
                    Ok(r) => r,
                    Err(_) => CheckReport {
                        cluster: cluster.clone(),
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
                };
                let _ = tx.send(Msg::Check {
                    cluster,
                    report: Box::new(report),
                    at: Utc::now(),
                });
            });
        }
        if !rt.catalog_running && Instant::now() >= rt.next_catalog {
            rt.catalog_running = true;
            rt.next_catalog = Instant::now() + catalog_interval;
            let tx = self.tx.clone();
            let (cluster, snapshot) = (name.to_string(), self.snapshot.clone());
            let limit = catalog_interval.max(Duration::from_secs(600));
            tokio::spawn(async move {
                let result = Box::new(read_catalog(&snapshot, &cluster, limit).await);
                let _ = tx.send(Msg::Catalog { cluster, result });
            });
        }
        if stopping {
            return;
        }
        if let Some(t) = rt.next_backup
            && now >= t
        {
            let s = rt.schedule.backup.clone();
            rt.next_backup = s
                .as_ref()
                .and_then(|s| s.next_after(now))
                .map(|t| jittered(t, rt.schedule.jitter));
            rt.retry_at = None;
            rt.retry_wait = self.config.daemon.retry_backoff;
            rt.busy_since = None;
            if rt.busy(JobKind::Backup) {
                tracing::warn!(cluster = %name, "scheduled backup skipped: the previous one still runs");
            } else {
                self.start_job(name, JobKind::Backup, Vec::new());
            }
        }
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        if let Some(t) = rt.retry_at
            && now >= t
            && !rt.busy(JobKind::Backup)
        {
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
        let Some(rt) = self.clusters.get_mut(name) else {
            return;
        };
        // A due drill waits while the cluster's backup or retention runs (the first would
        // drill what is about to change, the second could delete what the drill restores)
        // and until the catalog is known; with no complete backup there is nothing to drill
        // (backup_age and backup_failed report that).
        if let Some(t) = rt.next_drill
            && now >= t
            && !rt.busy(JobKind::Backup)
            && !rt.busy(JobKind::Expire)
            && !rt.busy(JobKind::Drill)
            && rt.catalog_loaded
        {
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
        if let (Some(rt), Ok(mut r)) = (self.clusters.get(name), self.registry.lock()) {
            r.clusters.entry(name.to_string()).or_default().next_backup = rt.next_backup.map(ts);
        }
    }

    fn start_job(&mut self, name: &str, kind: JobKind, args: Vec<String>) {
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

    fn start_probe(&mut self) {
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
            let result = match store::open(&url, &s3, &opts).await {
                Err(e) => Err(e),
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

    fn clear(&mut self, key: &AlertKey, now: DateTime<Utc>) {
        if let Some(n) = self.alerter.clear(key, now) {
            self.queue_notification(n);
        }
    }

    fn queue_notification(&self, n: alerts::Notification) {
        if let Err(e) = self.notify_tx.try_send(n) {
            let n = match e {
                mpsc::error::TrySendError::Full(n) | mpsc::error::TrySendError::Closed(n) => n,
            };
            tracing::error!(event = %n.event, cluster = %n.cluster, "alert dropped: {} notifications wait for delivery already", notify::QUEUE);
            self.delivery
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn send_alerts(&mut self) {
        for n in self.alerter.evaluate(Utc::now()) {
            tracing::warn!(event = %n.event, cluster = %n.cluster, severity = %n.severity, "ALERT: {}", n.message);
            self.queue_notification(n);
        }
    }

    fn condition(
        &mut self,
        cluster: &str,
        event: &'static str,
        sev: Severity,
        msg: String,
        store_caused: bool,
    ) {
        self.alerter.set(
            Condition {
                key: AlertKey {
                    cluster: cluster.to_string(),
                    event,
                },
                severity: sev,
                message: msg,
                observed: Utc::now(),
                store_caused,
                topic: Default::default(),
            },
            Utc::now(),
        );
    }

    fn clear_event(&mut self, cluster: &str, event: &'static str) {
        let key = AlertKey {
            cluster: cluster.to_string(),
            event,
        };
        self.clear(&key, Utc::now());
    }

    async fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Job(r) => self.on_job(r).await,
            Msg::Probe { result, at } => {
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
            Msg::Check {
                cluster,
                report,
                at,
            } => self.on_check(&cluster, *report, at),
            Msg::Catalog { cluster, result } => self.on_catalog(&cluster, *result),
        }
    }

    fn on_check(&mut self, cluster: &str, report: CheckReport, at: DateTime<Utc>) {
        let Some(rt) = self.clusters.get_mut(cluster) else {
            return;
        };
        rt.check_running = false;
        let worst = |names: &[&str]| {
            report
                .checks
                .iter()
                .filter(|c| names.contains(&c.name) && c.status != Status::Ok)
                .collect::<Vec<_>>()
        };
        let lag = worst(&["archive_lag"]);
        let other: Vec<_> = report
            .checks
            .iter()
            .filter(|c| c.name != "archive_lag" && c.status != Status::Ok)
            .collect();
        if let Ok(mut r) = self.registry.lock() {
            let m = r.clusters.entry(cluster.to_string()).or_default();
            m.check_status = Some(report.status.exit_code());
            if let Some(c) = report.checks.iter().find(|c| c.name == "archive_lag") {
                m.archive_lag_seconds = c.value;
                m.archive_lag_bytes = c.bytes;
            }
            if let Some(c) = report.checks.iter().find(|c| c.name == "audit") {
                m.audit_pending = c.value.unwrap_or(0.0) as u64;
            }
        }
        let sev = |s: Status| {
            if s == Status::Critical {
                Severity::Critical
            } else {
                Severity::Warning
            }
        };
        // Lag over the thresholds; "archiving is failing" is archive_failing's to report.
        let a = &self.config.alerts;
        let lag_sev = lag.first().and_then(|c| {
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
        if other.is_empty() {
            self.clear_event(cluster, "check_failed");
        } else {
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
                    severity: sev(worst_status),
                    message,
                    observed: at,
                    store_caused,
                    topic: other.iter().map(|c| c.name.to_string()).collect(),
                },
                at,
            );
        }
    }

    fn on_catalog(&mut self, cluster: &str, result: Result<CatalogSummary, ChildFailure>) {
        let age_limit = self.config.alerts.backup_age_critical;
        let uptime = (Utc::now() - self.started).to_std().unwrap_or_default();
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
        let mut run_missed = false;
        if rt.missed_run_pending {
            rt.missed_run_pending = false;
            if let Some(sched) = &rt.schedule.backup {
                // Missed: no backup ended after the most recent scheduled time (the daemon was
                // down then, or stopped while that backup ran). This includes "older than the
                // schedule's period".
                let last_due = prev_fire(sched, now);
                let stale = match (rt.newest_backup, last_due) {
                    (None, _) => true,
                    (Some(t), Some(due)) => t < due,
                    (Some(_), None) => false,
                };
                if stale && !rt.busy(JobKind::Backup) {
                    tracing::info!(
                        cluster,
                        newest = %rt.newest_backup.map(|t| t.format("%Y-%m-%d %H:%M:%S+00").to_string()).unwrap_or_else(|| "none".into()),
                        due = %last_due.map(|t| t.format("%Y-%m-%d %H:%M:%S+00").to_string()).unwrap_or_else(|| "-".into()),
                        "no backup since the last scheduled time: running the missed backup now"
                    );
                    run_missed = true;
                }
            }
        }
        if let Ok(mut r) = self.registry.lock() {
            let m = r.clusters.entry(cluster.to_string()).or_default();
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
        }
        let has_schedule = rt.schedule.backup.is_some();
        match s.newest_backup.map(|b| b.stop_time) {
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
        if let (Some(newest), Some(failed_at)) = (
            s.newest_backup.map(|b| b.stop_time),
            self.alerter.observed(&failed_key),
        ) && newest > failed_at
        {
            self.clear(&failed_key, now);
        }
        self.clear_event(cluster, "catalog_failed");
        if run_missed {
            self.start_job(cluster, JobKind::Backup, Vec::new());
        }
    }

    async fn on_job(&mut self, r: JobResult) {
        self.running_jobs = self.running_jobs.saturating_sub(1);
        let cluster = r.cluster.clone();
        let backoff = self.config.daemon.retry_backoff;
        let expire_after = self.config.daemon.expire_after_backup;
        let Some(rt) = self.clusters.get_mut(&cluster) else {
            return;
        };
        rt.set_busy(r.kind, false);
        let store_caused = r.exited(Exit::Store);
        let error = r.error.clone().unwrap_or_default();
        match r.kind {
            JobKind::Backup => {
                if r.ok() {
                    rt.retry_at = None;
                    rt.retry_wait = backoff;
                    rt.busy_since = None;
                    rt.next_catalog = Instant::now();
                    if let Ok(mut reg) = self.registry.lock() {
                        let m = reg.clusters.entry(cluster.clone()).or_default();
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
                    self.clear_event(&cluster, "backup_failed");
                    self.clear_event(&cluster, "backup_age");
                    if expire_after && !drilling && !self.stopping.is_cancelled() {
                        self.start_job(&cluster, JobKind::Expire, Vec::new());
                    }
                } else if r.exited(Exit::Busy) {
                    // Another process (an operator's backup, another host) holds the cluster's
                    // lock: no alert, try again after retry_backoff (never past the next
                    // scheduled run) unless a backup has completed by then. The catalog is
                    // read before the retry so that completion is seen.
                    let now = Utc::now();
                    rt.retry_at = retry_time(now, backoff, rt.next_backup);
                    if rt.retry_at.is_some() {
                        let started =
                            now - chrono::Duration::milliseconds((r.seconds * 1000.0) as i64);
                        rt.busy_since.get_or_insert(started);
                        rt.next_catalog =
                            rt.next_catalog.min(Instant::now() + backoff.mul_f64(0.75));
                    }
                    let when = match rt.retry_at {
                        Some(_) => "retrying unless that one completes",
                        None => "the next scheduled run comes first",
                    };
                    tracing::warn!(cluster = %cluster, "backup held off ({when}): {error}");
                } else if r.stopped() || r.exited(Exit::Interrupted) {
                    tracing::info!(cluster = %cluster, "backup stopped for the shutdown; nothing of it was kept");
                } else {
                    // Retry with backoff, never past the next scheduled run.
                    rt.busy_since = None;
                    let wait = rt.retry_wait;
                    rt.retry_at = retry_time(Utc::now(), wait, rt.next_backup);
                    rt.retry_wait = (wait * 2).min(Duration::from_secs(86400));
                    tracing::error!(
                        cluster = %cluster,
                        retry = %rt.retry_at.map(|t| t.format("%Y-%m-%d %H:%M:%S+00").to_string()).unwrap_or_else(|| "at the next scheduled run".into()),
                        "backup failed: {error}"
                    );
                    if let Ok(mut reg) = self.registry.lock() {
                        reg.clusters
                            .entry(cluster.clone())
                            .or_default()
                            .backup_failures_total += 1;
                    }
                    if store_caused && !self.probe_running {
                        self.start_probe();
                    }
                    self.condition(
                        &cluster,
                        "backup_failed",
                        Severity::Critical,
                        format!("backup failed (exit {}): {error}", r.code),
                        store_caused,
                    );
                }
            }
            JobKind::Expire => {
                if r.ok() {
                    rt.next_catalog = Instant::now();
                    if let (Some(JobOutput::Expire(e)), Ok(mut reg)) =
                        (&r.output, self.registry.lock())
                    {
                        let m = reg.clusters.entry(cluster.clone()).or_default();
                        m.expire_deleted_backups_total += e.deleted_backups as u64;
                        m.expire_deleted_wal_total += e.deleted_wal as u64;
                    }
                    self.clear_event(&cluster, "expire_failed");
                } else if !r.stopped() {
                    if let Ok(mut reg) = self.registry.lock() {
                        reg.clusters
                            .entry(cluster.clone())
                            .or_default()
                            .expire_failures_total += 1;
                    }
                    self.condition(
                        &cluster,
                        "expire_failed",
                        Severity::Warning,
                        format!("retention failed (exit {}): {error}", r.code),
                        store_caused,
                    );
                }
            }
            JobKind::Drill => {
                if std::mem::take(&mut rt.expire_pending) && !self.stopping.is_cancelled() {
                    self.start_job(&cluster, JobKind::Expire, Vec::new());
                }
                let record = match &r.output {
                    Some(JobOutput::Drill(d)) => Some(d),
                    _ => None,
                };
                if let (Some(d), Ok(mut reg)) = (&record, self.registry.lock()) {
                    apply_drill_metrics(reg.clusters.entry(cluster.clone()).or_default(), d);
                }
                if r.ok() {
                    self.clear_event(&cluster, "drill_failed");
                } else if !r.stopped() && !r.exited(Exit::Interrupted) {
                    if let Ok(mut reg) = self.registry.lock() {
                        reg.clusters
                            .entry(cluster.clone())
                            .or_default()
                            .drill_failures_total += 1;
                    }
                    let reason = record
                        .as_ref()
                        .and_then(|d| d.error.clone())
                        .unwrap_or(error);
                    self.condition(
                        &cluster,
                        "drill_failed",
                        Severity::Critical,
                        format!("restore drill failed: {reason}"),
                        store_caused,
                    );
                }
            }
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

/// What the slow loop reads: backups, window, gaps, and the newest drill record — through
/// `tidemark list --json` and `drill --history --json` run as children, so a large catalog
/// (every manifest is read) never grows the daemon's own memory. Output that does not parse
/// as the commands' types is a failure, like a failed child.
async fn read_catalog(
    config: &Path,
    cluster: &str,
    timeout: Duration,
) -> Result<CatalogSummary, ChildFailure> {
    let listing: Listing = jobs::read_json(config, cluster, &["list", "--json"], timeout).await?;
    let drills: Vec<DrillRecord> =
        jobs::read_json(config, cluster, &["drill", "--history", "--json"], timeout).await?;
    Ok(CatalogSummary::of(&listing, drills))
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

    #[test]
    fn the_catalog_summary_is_read_from_lists_own_type() {
        use crate::list::BackupSummary;
        use crate::repo::walindex::WalGap;
        use crate::repo::window::BackupRange;
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let backup = |id: &str, stop: &str, duration_ms: u64| BackupSummary {
            id: id.into(),
            label: String::new(),
            timeline: 1,
            start_time: t(stop) - chrono::Duration::milliseconds(duration_ms as i64),
            stop_time: t(stop),
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            original_bytes: duration_ms * 10,
            stored_bytes: duration_ms,
            duration_ms,
            pg_version_num: 150000,
            files: 1000,
            range: BackupRange {
                backup: id.into(),
                timeline: 1,
                from_time: t(stop),
                from_lsn: "0/2000100".into(),
                to_time: None,
                to_lsn: None,
                gap_at: None,
                restorable: true,
                run_tail: Vec::new(),
            },
            configuration: None,
        };
        let gap = WalGap {
            from: "000000010000000000000005".into(),
            to: "000000010000000000000007".into(),
            missing: 3,
        };
        let listing = Listing {
            cluster: "acme".into(),
            backups: vec![
                backup("b1", "2026-12-01T02:00:00Z", 5000),
                backup("b2", "2026-12-02T02:00:00Z", 7000),
            ],
            windows: Vec::new(),
            earliest_restorable: Some(t("2026-12-01T02:00:00Z")),
            latest_restorable: Some(t("2026-12-02T03:00:00Z")),
            wal_gaps: vec![(1, gap.clone())],
            window_gaps: vec![(1, gap)],
        };
        // As `list --json` prints it and the daemon reads it back.
        let json = serde_json::to_string_pretty(&listing).unwrap();
        let read: Listing = serde_json::from_str(&json).unwrap();
        let s = CatalogSummary::of(&read, Vec::new());
        let newest = s.newest_backup.unwrap();
        assert_eq!(newest.stop_time, t("2026-12-02T02:00:00Z"));
        assert_eq!(
            (
                newest.duration_ms,
                newest.original_bytes,
                newest.stored_bytes
            ),
            (7000, 70000, 7000)
        );
        assert_eq!(s.backups, 2);
        assert_eq!(
            s.window,
            Some((t("2026-12-01T02:00:00Z"), t("2026-12-02T03:00:00Z")))
        );
        assert_eq!(
            s.gaps,
            vec!["timeline 1: 000000010000000000000005 .. 000000010000000000000007 (3 missing)"]
        );
        assert!(s.last_drill.is_none());
        // Output that is not a listing is an error, not an empty catalog.
        assert!(serde_json::from_str::<Listing>("{\"backups\": []}").is_err());
    }

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

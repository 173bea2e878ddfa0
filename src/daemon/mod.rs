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
//!
//! Files: this one starts the daemon, runs the loop and shuts down, and holds the shared state;
//! `scheduler` what becomes due when; `handlers` what results do to state, metrics and alerts;
//! `reload` SIGHUP; `jobs` and `catalog` the children and their typed output; `alerts`,
//! `notify` and `metrics` conditions, delivery and exposition.

mod alerts;
mod catalog;
mod handlers;
mod jobs;
mod metrics;
mod notify;
mod reload;
mod scheduler;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::check::CheckReport;
use crate::cluster::ClusterHandle;
use crate::config::{Config, ResolvedSchedule};
use crate::error::Error;
use crate::state::{FileLock, ensure_dir, write_atomic};
use crate::store::{self, Store, StoreOptions};
use alerts::{AlertKey, Alerter, Condition, Severity};
use catalog::CatalogSummary;
use jobs::{ChildFailure, JobKind, JobResult};

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

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Opens the store for the daemon's own requests: short retries, so a check fails (and
/// alerts) within seconds instead of waiting out `retry_timeout`.
async fn probe_store(config: &Config) -> Result<Arc<dyn Store>, Error> {
    Ok(store::from_url(
        &config.repository.url,
        &config.s3_settings(),
        &probe_options(config),
    )
    .await?)
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
    let (lock, snapshot, previous) = take_state_dir(&state_dir, &text)?;
    let store = probe_store(&config).await?;
    let registry: metrics::Shared = Default::default();
    if let Ok(mut r) = registry.lock() {
        r.started = ts(Utc::now());
    }
    let heartbeat = metrics::Heartbeat::new();
    let metrics_task = serve_metrics(&config, &registry, &heartbeat).await?;
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
    d.run_until_signal(&mut rx).await?;
    d.shut_down(&mut rx).await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    tracing::info!("daemon stopped");
    Ok(())
}

/// Takes the state directory's daemon lock (one daemon per state directory) and writes the
/// config snapshot the jobs read. Returns the lock, the snapshot's path and the snapshot the
/// previous daemon left (to audit what changed since).
fn take_state_dir(
    state_dir: &Path,
    text: &str,
) -> Result<(FileLock, PathBuf, Option<String>), Error> {
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
    Ok((lock, snapshot, previous))
}

/// Binds `[metrics] listen` (a taken port is an error at start) and serves it.
async fn serve_metrics(
    config: &Config,
    registry: &metrics::Shared,
    heartbeat: &metrics::Heartbeat,
) -> Result<Option<tokio::task::JoinHandle<()>>, Error> {
    let Some(addr) = &config.metrics.listen else {
        return Ok(None);
    };
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| Error::Usage(format!("metrics.listen: {e}")))?;
    let task = metrics::serve(addr, registry.clone(), heartbeat.clone())
        .await
        .map_err(|e| Error::LocalIo(format!("metrics.listen {addr}: {e}")))?;
    Ok(Some(task))
}

impl Daemon {
    /// The scheduler loop: ticks, messages from tasks, SIGHUP; returns at SIGTERM or SIGINT.
    async fn run_until_signal(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Msg>,
    ) -> Result<(), Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| Error::Internal(e.to_string()))?;
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| Error::Internal(e.to_string()))?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::Internal(e.to_string()))?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.on_tick().await,
                Some(m) = rx.recv() => self.on_msg(m).await,
                _ = hup.recv() => self.reload().await,
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
            self.send_alerts();
        }
    }

    /// SIGTERM: nothing new starts; running jobs get `shutdown_grace`, then are asked to stop;
    /// returns when none runs and the last notifications had a moment to go out.
    async fn shut_down(&mut self, rx: &mut mpsc::UnboundedReceiver<Msg>) {
        self.stopping.cancel();
        tracing::info!(
            running = self.running_jobs,
            grace = ?self.config.daemon.shutdown_grace,
            "stopping: no new jobs; waiting for running ones"
        );
        let grace = tokio::time::sleep(self.config.daemon.shutdown_grace);
        tokio::pin!(grace);
        let mut asked = false;
        while self.running_jobs > 0 {
            tokio::select! {
                Some(m) = rx.recv() => {
                    if let Msg::Job(r) = m {
                        self.on_job(r).await;
                    }
                }
                _ = &mut grace, if !asked => {
                    asked = true;
                    tracing::info!(running = self.running_jobs, "grace period over: asking running jobs to stop");
                    self.cancel_jobs.cancel();
                }
            }
        }
        self.send_alerts();
        // Let queued notifications (a failure or a "resolved" seen just now) go out.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Evidence of store-caused failures older than the store's recovery plus this is still
/// explained by the outage: PostgreSQL's archiver retries within a minute, checks run every
/// check_interval.
fn store_settle(config: &Config) -> Duration {
    (config.daemon.check_interval * 2).max(Duration::from_secs(90))
}

impl Daemon {
    /// Updates the metrics of one cluster.
    fn with_metrics(&self, cluster: &str, f: impl FnOnce(&mut metrics::ClusterMetrics)) {
        if let Ok(mut r) = self.registry.lock() {
            f(r.clusters.entry(cluster.to_string()).or_default());
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
}

//! The daemon's metrics (Prometheus text exposition format 0.0.4) and its HTTP endpoint:
//! `/metrics` and `/healthz` on `[metrics] listen`. Every metric is documented in
//! docs/operations.md (Metrics).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::state::{PUSH_LATENCY_BUCKETS, WalPushStats};

/// What the daemon knows of one cluster. `None` is "not known yet" and is not exported.
#[derive(Debug, Clone, Default)]
pub struct ClusterMetrics {
    pub backup_last_success: Option<f64>,
    pub backup_last_duration: Option<f64>,
    pub backup_last_original_bytes: Option<u64>,
    pub backup_last_stored_bytes: Option<u64>,
    pub backups_total: u64,
    pub backup_failures_total: u64,
    pub backups_in_repository: Option<u64>,
    pub wal: WalPushStats,
    pub archive_lag_seconds: Option<f64>,
    pub archive_lag_bytes: Option<u64>,
    pub window_start: Option<f64>,
    pub window_end: Option<f64>,
    pub wal_gaps: Option<u64>,
    pub expire_deleted_backups_total: u64,
    pub expire_deleted_wal_total: u64,
    pub expire_failures_total: u64,
    pub drill_last_success: Option<f64>,
    pub drill_last_duration: Option<f64>,
    pub drill_last_rto: Option<f64>,
    pub drill_last_ok: Option<bool>,
    pub drill_failures_total: u64,
    pub check_status: Option<u8>,
    pub next_backup: Option<f64>,
    pub audit_pending: u64,
}

#[derive(Debug, Default)]
pub struct Registry {
    pub clusters: BTreeMap<String, ClusterMetrics>,
    pub repository_up: Option<bool>,
    pub started: f64,
    pub reloads_total: u64,
    pub reload_failures_total: u64,
    pub alerts_sent_total: u64,
    pub alert_delivery_failures_total: u64,
    pub alerts_firing: u64,
    pub jobs_running: u64,
}

pub type Shared = Arc<Mutex<Registry>>;

struct Out {
    text: String,
}

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn val(&mut self, name: &str, labels: &str, v: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.text, "{name} {}", fmt_f(v));
        } else {
            let _ = writeln!(self.text, "{name}{{{labels}}} {}", fmt_f(v));
        }
    }
}

fn fmt_f(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Label values are cluster names (A-Za-z0-9_-) and fixed words: no escaping needed, but be
/// safe anyway.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// How a per-cluster family reads its value; None is "not known yet": no sample.
type Getter = fn(&ClusterMetrics) -> Option<f64>;

/// The per-cluster families (name, type, help, value), in exposition order. A family with no
/// known value for any cluster is left out entirely.
const CLUSTER_FAMILIES: &[(&str, &str, &str, Getter)] = &[
    (
        "tidemark_backup_last_success_timestamp_seconds",
        "gauge",
        "End (database clock) of the newest complete backup.",
        |m| m.backup_last_success,
    ),
    (
        "tidemark_backup_last_duration_seconds",
        "gauge",
        "Duration of the newest complete backup.",
        |m| m.backup_last_duration,
    ),
    (
        "tidemark_backup_last_original_bytes",
        "gauge",
        "Size of the newest complete backup before compression.",
        |m| m.backup_last_original_bytes.map(|v| v as f64),
    ),
    (
        "tidemark_backup_last_stored_bytes",
        "gauge",
        "Size of the newest complete backup as stored.",
        |m| m.backup_last_stored_bytes.map(|v| v as f64),
    ),
    (
        "tidemark_backups_total",
        "counter",
        "Backups the daemon completed.",
        |m| Some(m.backups_total as f64),
    ),
    (
        "tidemark_backup_failures_total",
        "counter",
        "Backups the daemon started that failed.",
        |m| Some(m.backup_failures_total as f64),
    ),
    (
        "tidemark_backups",
        "gauge",
        "Complete backups in the repository.",
        |m| m.backups_in_repository.map(|v| v as f64),
    ),
    (
        "tidemark_next_backup_timestamp_seconds",
        "gauge",
        "When the next scheduled backup starts.",
        |m| m.next_backup,
    ),
    (
        "tidemark_wal_pushed_segments_total",
        "counter",
        "WAL files wal-push stored (or found already stored) on this host.",
        |m| Some(m.wal.pushed as f64),
    ),
    (
        "tidemark_wal_pushed_bytes_total",
        "counter",
        "Bytes of WAL files wal-push stored, before compression.",
        |m| Some(m.wal.pushed_bytes as f64),
    ),
    (
        "tidemark_wal_pushed_stored_bytes_total",
        "counter",
        "Bytes of WAL files wal-push stored, as stored.",
        |m| Some(m.wal.stored_bytes as f64),
    ),
    (
        "tidemark_wal_push_failures_total",
        "counter",
        "wal-push runs that failed (PostgreSQL retries them).",
        |m| Some(m.wal.failures as f64),
    ),
    (
        "tidemark_wal_push_last_success_timestamp_seconds",
        "gauge",
        "Last successful wal-push.",
        |m| {
            m.wal
                .last_success
                .map(|t| t.timestamp_millis() as f64 / 1000.0)
        },
    ),
    (
        "tidemark_archive_lag_seconds",
        "gauge",
        "Age of the oldest WAL segment waiting to be archived (0: none waiting).",
        |m| m.archive_lag_seconds,
    ),
    (
        "tidemark_archive_lag_bytes",
        "gauge",
        "WAL written and not yet archived (pg_current_wal_lsn against the end of the last archived segment).",
        |m| m.archive_lag_bytes.map(|v| v as f64),
    ),
    (
        "tidemark_restorable_window_start_timestamp_seconds",
        "gauge",
        "Earliest moment that can be restored.",
        |m| m.window_start,
    ),
    (
        "tidemark_restorable_window_end_timestamp_seconds",
        "gauge",
        "Latest moment that can be restored (last commit in the archived WAL).",
        |m| m.window_end,
    ),
    (
        "tidemark_wal_gaps",
        "gauge",
        "WAL gaps inside the restorable history (each is lost WAL).",
        |m| m.wal_gaps.map(|v| v as f64),
    ),
    (
        "tidemark_expire_deleted_backups_total",
        "counter",
        "Backups deleted by retention.",
        |m| Some(m.expire_deleted_backups_total as f64),
    ),
    (
        "tidemark_expire_deleted_wal_total",
        "counter",
        "WAL files deleted by retention.",
        |m| Some(m.expire_deleted_wal_total as f64),
    ),
    (
        "tidemark_expire_failures_total",
        "counter",
        "Retention runs that failed.",
        |m| Some(m.expire_failures_total as f64),
    ),
    (
        "tidemark_drill_last_success_timestamp_seconds",
        "gauge",
        "End of the last restore drill that passed.",
        |m| m.drill_last_success,
    ),
    (
        "tidemark_drill_last_duration_seconds",
        "gauge",
        "Duration of the last restore drill.",
        |m| m.drill_last_duration,
    ),
    (
        "tidemark_drill_last_rto_seconds",
        "gauge",
        "RTO measured by the last restore drill (start to first accepted query).",
        |m| m.drill_last_rto,
    ),
    (
        "tidemark_drill_last_result",
        "gauge",
        "1 if the last restore drill passed, 0 if it failed.",
        |m| m.drill_last_ok.map(|b| if b { 1.0 } else { 0.0 }),
    ),
    (
        "tidemark_drill_failures_total",
        "counter",
        "Restore drills the daemon ran that failed.",
        |m| Some(m.drill_failures_total as f64),
    ),
    (
        "tidemark_check_status",
        "gauge",
        "Result of the daemon's last health check: 0 OK, 1 warning, 2 critical.",
        |m| m.check_status.map(f64::from),
    ),
    (
        "tidemark_audit_pending_records",
        "gauge",
        "Audit records written on this host and not yet uploaded.",
        |m| Some(m.audit_pending as f64),
    ),
];

/// How a daemon-wide family reads its value.
type DaemonGetter = fn(&Registry) -> f64;

/// The daemon-wide families (name, type, help, value), always exported, after the others.
const DAEMON_FAMILIES: &[(&str, &str, &str, DaemonGetter)] = &[
    (
        "tidemark_daemon_start_timestamp_seconds",
        "gauge",
        "When the daemon started.",
        |r| r.started,
    ),
    (
        "tidemark_config_reloads_total",
        "counter",
        "Configurations accepted on SIGHUP.",
        |r| r.reloads_total as f64,
    ),
    (
        "tidemark_config_reload_failures_total",
        "counter",
        "Configurations rejected on SIGHUP (the old one stays).",
        |r| r.reload_failures_total as f64,
    ),
    (
        "tidemark_alerts_sent_total",
        "counter",
        "Alert notifications delivered.",
        |r| r.alerts_sent_total as f64,
    ),
    (
        "tidemark_alert_delivery_failures_total",
        "counter",
        "Alert notifications that could not be delivered.",
        |r| r.alert_delivery_failures_total as f64,
    ),
    (
        "tidemark_alerts_firing",
        "gauge",
        "Alert conditions currently firing.",
        |r| r.alerts_firing as f64,
    ),
    (
        "tidemark_jobs_running",
        "gauge",
        "Backups, drills and expires running now.",
        |r| r.jobs_running as f64,
    ),
];

const WAL_PUSH_HISTOGRAM: &str = "tidemark_wal_push_duration_seconds";

impl Registry {
    pub fn render(&self) -> String {
        let mut o = Out {
            text: String::with_capacity(8192),
        };
        self.render_cluster_families(&mut o);
        self.render_wal_push_histogram(&mut o);
        self.render_repository_up(&mut o);
        for (name, kind, help, get) in DAEMON_FAMILIES {
            o.head(name, kind, help);
            o.val(name, "", get(self));
        }
        o.text
    }

    fn render_cluster_families(&self, o: &mut Out) {
        for (name, kind, help, get) in CLUSTER_FAMILIES {
            let rows: Vec<(String, f64)> = self
                .clusters
                .iter()
                .filter_map(|(c, m)| get(m).map(|v| (c.clone(), v)))
                .collect();
            if rows.is_empty() {
                continue;
            }
            o.head(name, kind, help);
            for (c, v) in rows {
                o.val(name, &format!("cluster=\"{}\"", label(&c)), v);
            }
        }
    }

    /// Cumulative buckets, then +Inf, _sum and _count, per cluster (the head even with none).
    fn render_wal_push_histogram(&self, o: &mut Out) {
        let hist = WAL_PUSH_HISTOGRAM;
        o.head(
            hist,
            "histogram",
            "Duration of wal-push runs on this host (successful and failed).",
        );
        for (c, m) in &self.clusters {
            let l = label(c);
            let mut cum = 0u64;
            for (i, le) in PUSH_LATENCY_BUCKETS.iter().enumerate() {
                cum += m.wal.latency_buckets.get(i).copied().unwrap_or(0);
                o.val(
                    &format!("{hist}_bucket"),
                    &format!("cluster=\"{l}\",le=\"{}\"", fmt_f(*le)),
                    cum as f64,
                );
            }
            cum += m
                .wal
                .latency_buckets
                .get(PUSH_LATENCY_BUCKETS.len())
                .copied()
                .unwrap_or(0);
            o.val(
                &format!("{hist}_bucket"),
                &format!("cluster=\"{l}\",le=\"+Inf\""),
                cum as f64,
            );
            o.val(
                &format!("{hist}_sum"),
                &format!("cluster=\"{l}\""),
                m.wal.latency_sum_seconds,
            );
            o.val(
                &format!("{hist}_count"),
                &format!("cluster=\"{l}\""),
                cum as f64,
            );
        }
    }

    fn render_repository_up(&self, o: &mut Out) {
        if let Some(up) = self.repository_up {
            o.head(
                "tidemark_repository_up",
                "gauge",
                "1 if the repository answered the daemon's last probe.",
            );
            o.val("tidemark_repository_up", "", if up { 1.0 } else { 0.0 });
        }
    }
}

/// Liveness: the scheduler loop bumps this every tick.
#[derive(Clone)]
pub struct Heartbeat(Arc<Mutex<Instant>>);

impl Heartbeat {
    pub fn new() -> Heartbeat {
        Heartbeat(Arc::new(Mutex::new(Instant::now())))
    }
    pub fn beat(&self) {
        if let Ok(mut t) = self.0.lock() {
            *t = Instant::now();
        }
    }
    fn age(&self) -> Duration {
        self.0.lock().map(|t| t.elapsed()).unwrap_or(Duration::MAX)
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new()
    }
}

/// Serves /metrics and /healthz until the listener task is aborted. Binding happens before
/// this returns, so a taken port is an error at start.
pub async fn serve(
    addr: SocketAddr,
    registry: Shared,
    heartbeat: Heartbeat,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let registry = registry.clone();
            let heartbeat = heartbeat.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let registry = registry.clone();
                    let heartbeat = heartbeat.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(respond(&req, &registry, &heartbeat))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            });
        }
    }))
}

fn respond(
    req: &Request<Incoming>,
    registry: &Shared,
    heartbeat: &Heartbeat,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let text = registry.lock().map(|r| r.render()).unwrap_or_default();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        "/healthz" => {
            let age = heartbeat.age();
            if age < Duration::from_secs(30) {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("scheduler stalled for {} s\n", age.as_secs()),
                )
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_exposition() {
        let mut r = Registry::default();
        let mut m = ClusterMetrics {
            backup_last_success: Some(1_800_000_000.5),
            archive_lag_seconds: Some(0.0),
            drill_last_ok: Some(false),
            ..Default::default()
        };
        m.wal.latency_buckets = vec![1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        m.wal.latency_sum_seconds = 70.5;
        m.wal.pushed = 3;
        r.clusters.insert("acme".into(), m);
        r.repository_up = Some(true);
        let t = r.render();
        assert!(
            t.contains(
                "tidemark_backup_last_success_timestamp_seconds{cluster=\"acme\"} 1800000000.5"
            ),
            "{t}"
        );
        assert!(
            t.contains("tidemark_drill_last_result{cluster=\"acme\"} 0"),
            "{t}"
        );
        assert!(
            t.contains("tidemark_wal_push_duration_seconds_bucket{cluster=\"acme\",le=\"0.01\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("tidemark_wal_push_duration_seconds_bucket{cluster=\"acme\",le=\"0.05\"} 3"),
            "{t}"
        );
        assert!(
            t.contains("tidemark_wal_push_duration_seconds_bucket{cluster=\"acme\",le=\"+Inf\"} 4"),
            "{t}"
        );
        assert!(
            t.contains("tidemark_wal_push_duration_seconds_count{cluster=\"acme\"} 4"),
            "{t}"
        );
        assert!(t.contains("tidemark_repository_up 1"), "{t}");
        // Unknown values are left out, not exported as 0.
        assert!(!t.contains("tidemark_backup_last_duration_seconds"), "{t}");
        // Every sample line belongs to a declared metric family.
        let mut declared = std::collections::HashSet::new();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name
                    .strip_suffix("_bucket")
                    .or_else(|| name.strip_suffix("_sum"))
                    .or_else(|| name.strip_suffix("_count"))
                    .filter(|f| declared.contains(*f))
                    .unwrap_or(name);
                assert!(declared.contains(family), "undeclared {name}");
            }
        }
    }
}

//! The configuration file (TOML). Every key is documented in config.example.toml; unknown keys
//! are errors that name the key, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

use crate::schedule::{Schedule, parse_timezone};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tidemark/tidemark.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Local state of this host: wal-push counters, audit chain heads, the daemon's snapshot of
    /// its accepted config. Default: see `state::resolve_dir`.
    pub state_dir: Option<PathBuf>,
    pub repository: RepositoryConfig,
    #[serde(default)]
    pub compression: CompressionConfig,
    /// Default retention of every cluster; a cluster's own [clusters.NAME.retention] keys win.
    #[serde(default)]
    pub retention: RetentionConfig,
    /// Thresholds of `tidemark check` and where the daemon sends alerts.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Default schedule of every cluster; a cluster's own [clusters.NAME.schedule] keys win.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub clusters: BTreeMap<String, ClusterConfig>,
}

/// `[schedule]` and `[clusters.NAME.schedule]`: when the daemon takes backups.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Cron expression (5 fields or @daily ...), in `timezone`.
    pub backup: Option<String>,
    /// IANA time zone of the cron expressions (default UTC).
    pub timezone: Option<String>,
    /// Each run starts at a random moment up to this long after its scheduled time.
    #[serde(default, deserialize_with = "opt_duration")]
    pub jitter: Option<Duration>,
}

/// The schedule in force for one cluster.
#[derive(Debug, Clone)]
pub struct ResolvedSchedule {
    pub backup: Option<Schedule>,
    pub drill: Option<Schedule>,
    pub jitter: Duration,
}

/// `[daemon]`: how `tidemark daemon` runs its jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Backups and drills running at once, over all clusters.
    #[serde(default = "default_max_jobs")]
    pub max_concurrent_jobs: usize,
    /// How often the cheap health checks run (server, archiving, repository reachability).
    #[serde(default = "default_check_interval", deserialize_with = "duration")]
    pub check_interval: Duration,
    /// How often the catalog is read (backups, restorable window, WAL gaps); also after every
    /// backup and expire.
    #[serde(default = "default_catalog_interval", deserialize_with = "duration")]
    pub catalog_interval: Duration,
    /// On SIGTERM, how long running jobs may go on before they are asked to abort.
    #[serde(default, deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// First wait before a failed backup is tried again (doubling up to the next scheduled
    /// run).
    #[serde(default = "default_retry_backoff", deserialize_with = "duration")]
    pub retry_backoff: Duration,
    /// Apply retention after every successful scheduled backup.
    #[serde(default = "default_true")]
    pub expire_after_backup: bool,
}

fn default_max_jobs() -> usize {
    2
}
fn default_check_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_catalog_interval() -> Duration {
    Duration::from_secs(900)
}
fn default_retry_backoff() -> Duration {
    Duration::from_secs(300)
}
fn default_true() -> bool {
    true
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            max_concurrent_jobs: default_max_jobs(),
            check_interval: default_check_interval(),
            catalog_interval: default_catalog_interval(),
            shutdown_grace: Duration::ZERO,
            retry_backoff: default_retry_backoff(),
            expire_after_backup: true,
        }
    }
}

/// `[metrics]`: the daemon's Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of /metrics and /healthz, e.g. "127.0.0.1:9187"; unset: no endpoint.
    pub listen: Option<String>,
}

/// Thresholds for `tidemark check`, and where the daemon's alerts go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// JSON POST of every alert (http or https). May embed a token (Slack), so never printed.
    pub webhook_url: Option<SecretString>,
    /// PEM CA certificates trusted for an https webhook, besides the system roots.
    pub webhook_ca_file: Option<PathBuf>,
    /// Program (and arguments) run for every alert, the JSON on its stdin.
    pub command: Option<Vec<String>>,
    /// A firing alert is repeated after this long, then after twice as long, ... (at most
    /// daily) while it lasts.
    #[serde(default = "default_repeat_interval", deserialize_with = "duration")]
    pub repeat_interval: Duration,
    /// WAL not yet archived beyond this many bytes (pg_current_wal_lsn against the end of the
    /// last archived segment) is a warning; unset: no byte threshold.
    pub archive_lag_bytes_warning: Option<u64>,
    /// WAL waiting to be archived for longer than this is a warning...
    #[serde(default = "default_lag_warning", deserialize_with = "duration")]
    pub archive_lag_warning: Duration,
    /// ...and for longer than this critical.
    #[serde(default = "default_lag_critical", deserialize_with = "duration")]
    pub archive_lag_critical: Duration,
    /// The newest complete backup older than this is critical.
    #[serde(default = "default_backup_age_critical", deserialize_with = "duration")]
    pub backup_age_critical: Duration,
}

fn default_lag_warning() -> Duration {
    Duration::from_secs(300)
}
fn default_lag_critical() -> Duration {
    Duration::from_secs(1800)
}
fn default_backup_age_critical() -> Duration {
    Duration::from_secs(26 * 3600)
}

fn default_repeat_interval() -> Duration {
    Duration::from_secs(4 * 3600)
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook_url: None,
            webhook_ca_file: None,
            command: None,
            repeat_interval: default_repeat_interval(),
            archive_lag_bytes_warning: None,
            archive_lag_warning: default_lag_warning(),
            archive_lag_critical: default_lag_critical(),
            backup_age_critical: default_backup_age_critical(),
        }
    }
}

/// How much history to keep. Missing keys fall back to the global [retention] section, then
/// to the defaults (recovery_window 30 days, min_backups 2).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Every moment of this much recent history stays restorable.
    #[serde(default, deserialize_with = "opt_duration")]
    pub recovery_window: Option<Duration>,
    /// Never keep fewer complete backups than this.
    pub min_backups: Option<usize>,
}

/// Retention in force for one cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    pub recovery_window: Duration,
    pub min_backups: usize,
}

impl Retention {
    pub fn resolve(global: &RetentionConfig, cluster: &RetentionConfig) -> Retention {
        Retention {
            recovery_window: cluster
                .recovery_window
                .or(global.recovery_window)
                .unwrap_or(Duration::from_secs(30 * 86400)),
            min_backups: cluster.min_backups.or(global.min_backups).unwrap_or(2),
        }
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// `file:///path` or `s3://bucket/prefix`.
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    /// PEM file of CA certificates trusted for an https endpoint, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// How long to keep retrying a failing store request.
    #[serde(default = "default_retry_timeout", deserialize_with = "duration")]
    pub retry_timeout: Duration,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Lifetime of the backup lease object (renewed every third of it while a backup runs); a
    /// crashed holder's lease lapses after this long.
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub lease_ttl: Duration,
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(300)
}

fn default_retry_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// zstd level, 1..=19; 0 stores objects uncompressed.
    #[serde(default = "default_level")]
    pub level: i32,
}

fn default_level() -> i32 {
    3
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            level: default_level(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's data directory (read for pg_control by wal-push of history files).
    pub pgdata: Option<PathBuf>,
    /// libpq-style connection string; may hold a password, so it is never printed.
    pub connection: Option<SecretString>,
    /// The cluster's master key file (32 bytes, mode 0600).
    pub key_file: PathBuf,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub drill: DrillConfig,
}

/// `[clusters.NAME.drill]`: what a restore drill checks besides pg_amcheck and the target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// `[[clusters.NAME.drill.assert]] sql = "select count(*) > 0 from orders"`: each query's
    /// first column must be true on the restored cluster.
    #[serde(default)]
    pub assert: Vec<DrillAssert>,
    /// Cron expression of scheduled drills (in the cluster's schedule time zone).
    pub schedule: Option<String>,
    /// Target of scheduled drills: "random" (default), "latest" or "backup" (the newest
    /// backup's row-count point, where row counts are compared).
    pub target: Option<String>,
    /// Tables whose rows every backup counts at a restore point of its own
    /// (`["public.orders"]`, or `["*"]` for every table of the connection's database); a
    /// drill with target "backup" compares them. Writes to these tables wait while they are
    /// counted.
    #[serde(default)]
    pub count_tables: Vec<String>,
    /// How long a backup waits to lock the tables it counts before it skips the counts.
    #[serde(default = "default_count_lock_timeout", deserialize_with = "duration")]
    pub count_lock_timeout: Duration,
}

fn default_count_lock_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for DrillConfig {
    fn default() -> Self {
        DrillConfig {
            assert: Vec::new(),
            schedule: None,
            target: None,
            count_tables: Vec::new(),
            count_lock_timeout: default_count_lock_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillAssert {
    pub sql: String,
    /// Database to run it in (default: the connection's).
    pub database: Option<String>,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

#[derive(Debug, thiserror::Error)]
#[error("config {path}: {detail}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub detail: String,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_text(path).map(|(c, _)| c)
    }

    /// The config and the very text it was parsed from (read once: an edit landing between
    /// two reads could never pair one file's text with another's validation).
    pub fn load_with_text(path: &Path) -> Result<(Config, String), ConfigError> {
        let err = |detail: String| ConfigError {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(match e.kind() {
                std::io::ErrorKind::NotFound => "no such file".to_string(),
                _ => e.to_string(),
            })
        })?;
        let config = Config::parse(&text).map_err(err)?;
        config.warn_if_secrets_exposed(path);
        config.warn_if_webhook_in_clear();
        Ok((config, text))
    }

    /// A webhook URL often carries a token (Slack, Teams): over plain http to another host it
    /// travels in clear.
    fn warn_if_webhook_in_clear(&self) {
        use secrecy::ExposeSecret;
        if let Some(u) = &self.alerts.webhook_url
            && let Ok(uri) = u.expose_secret().parse::<hyper::Uri>()
            && uri.scheme_str() == Some("http")
            && !matches!(
                uri.host(),
                Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
            )
        {
            tracing::warn!(
                "alerts.webhook_url is plain http to another host: its token and the alerts travel unencrypted; use https"
            );
        }
    }

    /// A config holding an S3 secret or a connection password should be readable by its owner
    /// only; the key files are enforced (0600), the config is warned about.
    fn warn_if_secrets_exposed(&self, path: &Path) {
        use std::os::unix::fs::MetadataExt;
        let has_secret = self.repository.secret_access_key.is_some()
            || self.alerts.webhook_url.is_some()
            || self.clusters.values().any(|c| {
                c.connection.as_ref().is_some_and(|s| {
                    use secrecy::ExposeSecret;
                    s.expose_secret().contains("password")
                })
            });
        let mode = std::fs::metadata(path)
            .map(|m| m.mode() & 0o777)
            .unwrap_or(0);
        if has_secret && mode & 0o007 != 0 {
            tracing::warn!(
                config = %path.display(),
                mode = format!("{mode:04o}"),
                "the config holds a secret and is readable by any user: chmod o-rwx it"
            );
        }
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    format!(
                        " (line {})",
                        text[..s.start.min(text.len())].lines().count().max(1)
                    )
                })
                .unwrap_or_default();
            format!("{}{line}", e.message().trim())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if !(0..=22).contains(&self.compression.level) {
            return Err(format!(
                "compression.level = {} is out of range (0 = none, 1..=22 zstd)",
                self.compression.level
            ));
        }
        for name in self.clusters.keys() {
            validate_cluster_name(name)?;
        }
        if self.repository.retry_timeout.is_zero() {
            return Err("repository.retry_timeout must be more than 0".into());
        }
        if self.repository.lease_ttl < Duration::from_secs(3) {
            return Err("repository.lease_ttl must be at least 3s".into());
        }
        if self.alerts.archive_lag_warning > self.alerts.archive_lag_critical {
            return Err(
                "alerts.archive_lag_warning is longer than alerts.archive_lag_critical".into(),
            );
        }
        if self.alerts.repeat_interval < Duration::from_secs(60) {
            return Err("alerts.repeat_interval must be at least 60s".into());
        }
        if let Some(url) = &self.alerts.webhook_url {
            use secrecy::ExposeSecret;
            let u = url.expose_secret();
            // The URL may carry a token: name the key, not the value.
            if !(u.starts_with("http://") || u.starts_with("https://"))
                || u.parse::<hyper::Uri>().is_err()
            {
                return Err("alerts.webhook_url must be an http:// or https:// URL".into());
            }
        }
        if let Some(cmd) = &self.alerts.command
            && cmd.first().is_none_or(|p| p.is_empty())
        {
            return Err(
                "alerts.command must name a program: [\"/path/to/program\", \"arg\", ...]".into(),
            );
        }
        if let Some(l) = &self.metrics.listen {
            l.parse::<std::net::SocketAddr>().map_err(|e| {
                format!(
                    "metrics.listen = {l:?}: expected an address such as \"127.0.0.1:9187\" ({e})"
                )
            })?;
        }
        if self.daemon.max_concurrent_jobs == 0 {
            return Err("daemon.max_concurrent_jobs must be at least 1".into());
        }
        if self.daemon.check_interval < Duration::from_secs(1)
            || self.daemon.catalog_interval < Duration::from_secs(1)
        {
            return Err(
                "daemon.check_interval and daemon.catalog_interval must be at least 1s".into(),
            );
        }
        // Upper bounds keep time arithmetic far from overflow and catch unit slips ("5d" for
        // "5s").
        let day = Duration::from_secs(86400);
        for (key, value, max) in [
            ("daemon.check_interval", self.daemon.check_interval, day),
            (
                "daemon.catalog_interval",
                self.daemon.catalog_interval,
                7 * day,
            ),
            ("daemon.shutdown_grace", self.daemon.shutdown_grace, day),
            ("daemon.retry_backoff", self.daemon.retry_backoff, day),
            (
                "alerts.repeat_interval",
                self.alerts.repeat_interval,
                7 * day,
            ),
            (
                "alerts.archive_lag_critical",
                self.alerts.archive_lag_critical,
                365 * day,
            ),
            (
                "alerts.backup_age_critical",
                self.alerts.backup_age_critical,
                365 * day,
            ),
            ("repository.lease_ttl", self.repository.lease_ttl, day),
            (
                "repository.retry_timeout",
                self.repository.retry_timeout,
                day,
            ),
            (
                "schedule.jitter",
                self.schedule.jitter.unwrap_or_default(),
                day,
            ),
        ] {
            if value > max {
                return Err(format!(
                    "{key} = {} is more than {}",
                    humantime::format_duration(value),
                    humantime::format_duration(max)
                ));
            }
        }
        for (name, c) in &self.clusters {
            if c.schedule.jitter.unwrap_or_default() > day {
                return Err(format!("clusters.{name}.schedule.jitter is more than 1day"));
            }
            if c.drill.count_lock_timeout > Duration::from_secs(3600) {
                return Err(format!(
                    "clusters.{name}.drill.count_lock_timeout is more than 1h"
                ));
            }
        }
        for name in self.clusters.keys() {
            self.resolve_schedule(name)?;
        }
        Ok(())
    }

    /// The schedule of cluster `name`: its own keys, else the global [schedule]'s. Errors name
    /// the key.
    pub fn resolve_schedule(&self, name: &str) -> Result<ResolvedSchedule, String> {
        let c = self
            .clusters
            .get(name)
            .ok_or_else(|| format!("cluster {name:?} is not in the config"))?;
        let tz_name = c
            .schedule
            .timezone
            .as_deref()
            .or(self.schedule.timezone.as_deref())
            .unwrap_or("UTC");
        parse_timezone(tz_name).map_err(|e| format!("clusters.{name}.schedule.timezone: {e}"))?;
        let backup = match c
            .schedule
            .backup
            .as_deref()
            .or(self.schedule.backup.as_deref())
        {
            Some(expr) => Some(
                Schedule::parse(expr, tz_name)
                    .map_err(|e| format!("clusters.{name}.schedule.backup: {e}"))?,
            ),
            None => None,
        };
        let drill = match c.drill.schedule.as_deref() {
            Some(expr) => Some(
                Schedule::parse(expr, tz_name)
                    .map_err(|e| format!("clusters.{name}.drill.schedule: {e}"))?,
            ),
            None => None,
        };
        match c.drill.target.as_deref() {
            None | Some("random") | Some("latest") | Some("backup") => {}
            Some(t) => {
                return Err(format!(
                    "clusters.{name}.drill.target = {t:?}: expected \"random\", \"latest\" or \"backup\""
                ));
            }
        }
        if c.drill.count_tables.iter().any(|t| t.trim().is_empty()) {
            return Err(format!(
                "clusters.{name}.drill.count_tables: empty table name"
            ));
        }
        Ok(ResolvedSchedule {
            backup,
            drill,
            jitter: c
                .schedule
                .jitter
                .or(self.schedule.jitter)
                .unwrap_or(Duration::ZERO),
        })
    }

    /// Picks the cluster: the one named, or the only one configured.
    pub fn cluster(&self, name: Option<&str>) -> Result<(&str, &ClusterConfig), String> {
        match name {
            Some(n) => self
                .clusters
                .get_key_value(n)
                .map(|(k, v)| (k.as_str(), v))
                .ok_or_else(|| {
                    format!(
                        "cluster {n:?} is not in the config (configured: {})",
                        self.cluster_names()
                    )
                }),
            None if self.clusters.len() == 1 => self
                .clusters
                .iter()
                .next()
                .map(|(k, v)| (k.as_str(), v))
                .ok_or_else(|| "no cluster configured".to_string()),
            None if self.clusters.is_empty() => {
                Err("no [clusters.NAME] section in the config".to_string())
            }
            None => Err(format!(
                "several clusters are configured ({}): choose one with --cluster",
                self.cluster_names()
            )),
        }
    }

    fn cluster_names(&self) -> String {
        if self.clusters.is_empty() {
            return "none".into();
        }
        self.clusters.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    // `s3_settings` and `store_options`, the store's view of [repository], are in cluster.rs:
    // this module is the lowest layer and knows no store types.
}

/// Cluster names become a path component of the repository.
pub fn validate_cluster_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cluster name {name:?} must be 1-64 characters of A-Z, a-z, 0-9, '-' and '_'"
        ))
    }
}

#[cfg(test)]
mod tests;

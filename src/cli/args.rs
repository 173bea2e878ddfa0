//! The command line's definitions (clap): global options, commands and their arguments, value
//! parsers. Every flag, name and help text here is an interface operators' scripts depend on:
//! change them only on purpose.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tidemark::config::DEFAULT_CONFIG_PATH;
use tidemark::error::{Error, Exit};

/// `--help`'s closing text: the exit codes (from the one table, `Exit`) and the environment.
fn after_help() -> String {
    format!(
        "{}\nEnvironment: TIDEMARK_CONFIG, TIDEMARK_CLUSTER, TIDEMARK_LOG (a tracing filter, e.g. debug).",
        Exit::help_text()
    )
}

/// PostgreSQL backup and point-in-time recovery: encrypted, compressed WAL archiving and base
/// backups in a local directory or S3-compatible storage; restore to any moment of the
/// restorable window; retention, health checks and restore drills.
#[derive(Parser, Debug)]
#[command(name = "tidemark", version, after_help = after_help())]
pub struct Cli {
    /// Configuration file
    #[arg(long, global = true, env = "TIDEMARK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Cluster to work on (a [clusters.NAME] section); optional when the config has only one
    #[arg(long, global = true, env = "TIDEMARK_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
    /// Log line format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Master key management
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Initialise the cluster's repository (records its system identifier, creates its keyring)
    #[command(
        long_about = "Initialise the cluster's repository: connects to PostgreSQL to read its \
system identifier, version and WAL segment size, creates a data key wrapped by the cluster's \
master key, and records both. Safe to re-run: an initialised repository of the same cluster \
is checked and left unchanged."
    )]
    Init(InitArgs),
    /// Archive one WAL file (archive_command = 'tidemark ... wal-push %p')
    #[command(
        long_about = "Archive one WAL file: archive_command = 'tidemark --config FILE --cluster NAME wal-push %p'.\n\n\
Exits 0 only once the file is durably stored. A file already archived with identical content \
succeeds again; different content fails (exit 7) and never overwrites. Segments are checked \
against the repository's system identifier and segment size."
    )]
    WalPush(WalPushArgs),
    /// Restore one WAL file (restore_command = 'tidemark ... wal-fetch %f %p')
    #[command(
        long_about = "Restore one archived WAL file: restore_command = 'tidemark --config FILE --cluster NAME wal-fetch %f %p'.\n\n\
Writes DEST atomically after authenticating every byte. A file the repository does not hold \
exits 1 quietly (PostgreSQL asks for files that do not exist as part of recovery). Any other \
failure (store unreachable, wrong key, corrupted object) is one error line and exit 126, which \
makes PostgreSQL stop recovery instead of treating the failure as the end of the archive and \
promoting a cluster that misses WAL."
    )]
    WalFetch(WalFetchArgs),
    /// Show archived WAL per timeline: first and last segment and every gap
    WalList(WalListArgs),
    /// Take a full base backup of the running cluster
    #[command(
        long_about = "Take a full base backup of the running cluster (non-exclusive \
pg_backup_start/pg_backup_stop on one session). Every file of the data directory and its \
tablespaces is streamed through zstd and AES-256-GCM into the repository, several at a time. \
The backup is complete only once the WAL from its start to its stop is archived and its \
manifest is written, last; a backup that dies half-way is never listed, and its leftovers \
are removed by the next backup. One backup per cluster at a time (an advisory lock in the \
cluster; a second one exits 11)."
    )]
    Backup(BackupArgs),
    /// Restore drill: restore into a scratch directory, start, check, record, clean up
    #[command(
        long_about = "Restore drill: restores a backup and WAL into a scratch directory, starts \
PostgreSQL on a private socket directory (no TCP), waits until recovery reached the target, \
checks the point reached against the target and the archive (a WAL gap that cuts replay short \
fails the drill), runs pg_amcheck on every database and the [[clusters.NAME.drill.assert]] \
queries, records the result in the repository (drills/), then stops the server and removes \
everything — also on failure or interruption. Measures RTO (drill start to first accepted \
query) and its parts. Exit 0 when every check passed, 14 otherwise. The configuration a \
backup holds from outside the data directory (Debian's /etc/postgresql/...) is restored with \
it; settings a private start cannot use are overridden and reported. A failed drill keeps its \
server's log (the error names it, with the server's FATAL line): \
<state_dir>/<cluster>/drills/<id>.log, and encrypted as drills/<id>.log in the repository.\n\n\
--target latest (default) replays all archived WAL; random picks a uniformly random moment \
inside the restorable window; a time ('2026-11-27 09:41:07+00') restores to it; backup \
recovers the newest backup (or --backup) to the restore point where it counted the rows of \
[clusters.NAME.drill] count_tables, and compares every table's row count with that record."
    )]
    Drill(DrillArgs),
    /// Run every configured cluster: scheduled backups, retention, drills, checks, metrics, alerts
    #[command(
        long_about = "Run as a service (systemd, Docker): for every [clusters.NAME] of the config, \
takes backups on its cron schedule ([schedule] / [clusters.NAME.schedule]: backup, timezone, \
jitter), applies retention after each one, runs restore drills on [clusters.NAME.drill] \
schedule, checks health every [daemon] check_interval (repository, server, archiving, archive \
lag, WAL gaps, backup age), serves Prometheus metrics on [metrics] listen (/metrics, /healthz), \
and sends alerts to [alerts] webhook_url and/or command — once per problem, with reminders \
backing off, and a \"resolved\" when it clears. A missed run (daemon down at the scheduled \
time) runs at start when no backup ended after the most recent scheduled time; a failed \
backup is retried with backoff ([daemon] retry_backoff, doubling); one held off by another \
backup of the cluster (an operator's, another host's) is retried unless that one completed.\n\n\
Signals: SIGTERM/SIGINT stop scheduling, give running jobs [daemon] shutdown_grace, then ask \
them to stop (a backup aborts and removes what it wrote; nothing partial is listed), exit 0. \
SIGHUP reloads the config; a config that fails to load is rejected and the running one stays."
    )]
    Daemon,
    /// Show the audit log, or verify it (`audit verify`)
    #[command(
        long_about = "Show the cluster's audit log: every backup, restore, WAL fetch during a \
restore, expire deletion, drill, key operation and config change, with time, OS user, host, \
operation, backup and objects, and outcome. Records are stored in the repository under \
<cluster>/audit/, hash-chained and authenticated (HMAC under a key derived from the \
repository's data key). `tidemark audit verify` checks every record and chain and exits 16 if \
a record was edited or removed. Without --cluster, every configured cluster."
    )]
    Audit(AuditArgs),
    /// Health check for monitoring: exit 0 OK, 1 warning, 2 critical
    #[command(
        long_about = "Health check for monitoring systems (Nagios convention: exit 0 OK, 1 \
warning, 2 critical; its own codes, not the table below). Checks: the repository is reachable \
and writable, the master key opens the keyring, PostgreSQL is reachable and is the repository's \
system, archive_mode is on and archive_command runs tidemark wal-push, a forced WAL switch \
arrives in the repository (--no-switch skips it), archive lag against [alerts] \
archive_lag_warning/archive_lag_critical, the newest backup's age against \
backup_age_critical, no WAL gap inside the restorable window, free space where pg_wal lives."
    )]
    Check(CheckArgs),
    /// Apply the retention policy: delete backups and WAL no longer needed
    #[command(
        long_about = "Apply the retention policy ([retention] / [clusters.NAME.retention]): keep \
every backup that ended inside the recovery window, the newest one before it (so the window's \
first moment stays restorable), at least min_backups backups, and all WAL from the oldest kept \
backup on; delete the rest. --dry-run prints the plan and deletes nothing; a real run carries \
out exactly that plan. Safe while wal-push and backups run."
    )]
    Expire(ExpireArgs),
    /// List complete backups and the restorable window per timeline
    List(ListArgs),
    /// Restore a backup into a directory and recover to a point in time
    #[command(
        long_about = "Restore a backup into --pgdata (new or empty) and configure PostgreSQL to \
replay archived WAL to the target: at most one of --target-time, --target-lsn, --target-xid, \
--target-name, --immediate; none replays all archived WAL. The backup is the newest one that \
ends before the target, unless --backup names one. A target outside the restorable window \
(see `tidemark list`) is refused. Every file is verified against the backup's manifest. \
With --start, PostgreSQL is started on the restored directory and tidemark waits until \
recovery reached the target and the server accepts connections, then reports the time \
restored to and how long it took.\n\n\
Configuration kept outside the data directory (Debian's /etc/postgresql/VERSION/NAME) is in \
the backup: it is restored into --pgdata (postgresql.conf, pg_hba.conf, conf.d/ ..., with \
data_directory, hba_file, ident_file and includes rewritten to the restored copies), or into \
--config-dir for pg_ctlcluster. Settings naming files this host lacks are reported; --start \
overrides what a private start needs (ssl off without its certificate, its own socket and port, \
no external_pid_file, logging_collector off) and says so.\n\n\
Example: tidemark --cluster acme restore --pgdata /srv/restore --target-time '2026-11-27 09:41:07+00' --start --port 5433"
    )]
    Restore(RestoreArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ArchiveModeArg {
    Preserve,
    Off,
}

/// DURATION arguments (`5m`, `60s`, `1h`), humantime's forms.
fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// `--parallel`'s default: twice the cores, at least 2, at most 8.
pub fn default_parallelism() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    (cores * 2).clamp(2, 8)
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify every record and chain: exit 0 when intact, 16 when edited or removed records are found
    Verify {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Write a new random 32-byte master key to PATH (mode 0600; never overwrites)
    Generate { path: PathBuf },
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct WalPushArgs {
    /// Path of the WAL file (%p), relative to the data directory or absolute
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct WalFetchArgs {
    /// Name of the WAL file (%f)
    pub name: String,
    /// Where to write it (%p)
    pub dest: PathBuf,
}

#[derive(Args, Debug)]
pub struct WalListArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
    /// Concurrent file transfers [default: twice the cores, 2..8]
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// How long to wait for the backup's WAL to be archived
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub wal_timeout: Duration,
    /// Backup label (default: "tidemark <id>")
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Args, Debug)]
pub struct DrillArgs {
    /// latest, random, backup (its row-count point: compares row counts), or a time with a zone
    #[arg(long, default_value = "latest")]
    pub target: String,
    /// Drill this backup instead of the one the target chooses
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Show past drills instead of running one
    #[arg(long)]
    pub history: bool,
    /// Where the scratch directory goes [default: the system temp directory]
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Directory of pg_ctl [default: found for the backup's version]
    #[arg(long, value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// Concurrent downloads [default: twice the cores, 2..8]
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// How long to wait for recovery
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub action: Option<AuditCommand>,
    /// Only records from this time on ('2026-11-27 09:00:00+00', or e.g. 24h for the last day)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
    /// Do not force a WAL switch to test archiving end to end
    #[arg(long)]
    pub no_switch: bool,
    /// How long to wait for the switched segment to arrive
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub archive_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct ExpireArgs {
    /// Print what would be deleted, delete nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Directory to restore into (must be new or empty)
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Recover to this time (with a zone: '2026-11-27 09:41:07+00')
    #[arg(long, value_name = "TIME", group = "target")]
    pub target_time: Option<String>,
    /// Recover to this WAL location (e.g. 0/3000060)
    #[arg(long, value_name = "LSN", group = "target")]
    pub target_lsn: Option<String>,
    /// Recover to the commit of this transaction id
    #[arg(long, value_name = "XID", group = "target")]
    pub target_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, value_name = "NAME", group = "target")]
    pub target_name: Option<String>,
    /// Recover only to the end of the backup (the earliest consistent point)
    #[arg(long, group = "target")]
    pub immediate: bool,
    /// Timeline to recover along: latest, current (the backup's) or a number
    #[arg(long, value_name = "TLI")]
    pub target_timeline: Option<String>,
    /// Stop just before the target instead of just after it
    #[arg(long)]
    pub target_exclusive: bool,
    /// Restore this backup instead of choosing one
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Restore a tablespace elsewhere (repeatable)
    #[arg(long, value_name = "OLD=NEW")]
    pub tablespace_map: Vec<String>,
    /// Replace the contents of a non-empty --pgdata (never a running cluster's)
    #[arg(long)]
    pub force: bool,
    /// Write the server's configuration from outside the data directory here, Debian-style
    /// (postgresql.conf with data_directory = --pgdata, pg_hba.conf, conf.d/, start.conf),
    /// instead of into --pgdata (new or empty; --force never replaces a running cluster's);
    /// --start then runs the server with -c config_file=DIR/postgresql.conf
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
    /// Concurrent downloads [default: twice the cores, 2..8]
    #[arg(long, value_name = "N")]
    pub parallel: Option<usize>,
    /// Archiving in the restored cluster: off (default: a restored copy never adds a
    /// timeline to the repository) or preserve (keep the backed-up archive_command: use it
    /// when the restored cluster becomes the primary)
    #[arg(long, value_enum, default_value_t = ArchiveModeArg::Off)]
    pub archive_mode: ArchiveModeArg,
    /// OS user to own the restored files [default: postgres when run as root]
    #[arg(long, value_name = "USER")]
    pub owner: Option<String>,
    /// Start PostgreSQL on the restored directory and wait until it reached the target
    #[arg(long)]
    pub start: bool,
    /// Port for --start [default: the restored postgresql.conf's]
    #[arg(long)]
    pub port: Option<u16>,
    /// Unix socket directory for --start (also disables TCP listening)
    #[arg(long, value_name = "DIR")]
    pub socket_dir: Option<PathBuf>,
    /// Directory of pg_ctl for --start [default: found for the backup's version]
    #[arg(long, value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// How long --start waits for recovery
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub start_timeout: Duration,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

impl Cli {
    /// `--config`, or the default path.
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
    }
}

/// `--since`: a time with a zone, or a duration back from now (`24h`, `7d`).
pub fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>, Error> {
    if let Ok(d) = humantime::parse_duration(s) {
        return chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
            .ok_or_else(|| Error::Usage(format!("--since {s:?}: too far back")));
    }
    tidemark::restore::parse_target_time(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| Error::Usage(format!("--since: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn since_takes_a_time_or_a_duration_back() {
        let now = chrono::Utc::now();
        let day = parse_since("24h").unwrap();
        assert!(
            (now - day - chrono::Duration::hours(24))
                .num_seconds()
                .abs()
                < 60
        );
        assert_eq!(
            parse_since("2026-11-27 09:00:00+01").unwrap().to_rfc3339(),
            "2026-11-27T08:00:00+00:00"
        );
        assert!(parse_since("banana").is_err());
    }
}

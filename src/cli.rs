use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tidemark::cluster::ClusterHandle;
use tidemark::config::{Config, DEFAULT_CONFIG_PATH};
use tidemark::error::{Error, Exit};
use tidemark::pipeline::keys::generate_master_key_file;
use tidemark::repo::walindex::WalSummary;

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
struct Cli {
    /// Configuration file
    #[arg(long, global = true, env = "TIDEMARK_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cluster to work on (a [clusters.NAME] section); optional when the config has only one
    #[arg(long, global = true, env = "TIDEMARK_CLUSTER", value_name = "NAME")]
    cluster: Option<String>,
    /// Log line format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
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
    Init {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Archive one WAL file (archive_command = 'tidemark ... wal-push %p')
    #[command(
        long_about = "Archive one WAL file: archive_command = 'tidemark --config FILE --cluster NAME wal-push %p'.\n\n\
Exits 0 only once the file is durably stored. A file already archived with identical content \
succeeds again; different content fails (exit 7) and never overwrites. Segments are checked \
against the repository's system identifier and segment size."
    )]
    WalPush {
        /// Path of the WAL file (%p), relative to the data directory or absolute
        path: PathBuf,
    },
    /// Restore one WAL file (restore_command = 'tidemark ... wal-fetch %f %p')
    #[command(
        long_about = "Restore one archived WAL file: restore_command = 'tidemark --config FILE --cluster NAME wal-fetch %f %p'.\n\n\
Writes DEST atomically after authenticating every byte. A file the repository does not hold \
exits 1 quietly (PostgreSQL asks for files that do not exist as part of recovery). Any other \
failure (store unreachable, wrong key, corrupted object) is one error line and exit 126, which \
makes PostgreSQL stop recovery instead of treating the failure as the end of the archive and \
promoting a cluster that misses WAL."
    )]
    WalFetch {
        /// Name of the WAL file (%f)
        name: String,
        /// Where to write it (%p)
        dest: PathBuf,
    },
    /// Show archived WAL per timeline: first and last segment and every gap
    WalList {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
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
    Backup {
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
        /// Concurrent file transfers [default: twice the cores, 2..8]
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// How long to wait for the backup's WAL to be archived
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
        wal_timeout: Duration,
        /// Backup label (default: "tidemark <id>")
        #[arg(long)]
        label: Option<String>,
    },
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
    Drill {
        /// latest, random, backup (its row-count point: compares row counts), or a time with a zone
        #[arg(long, default_value = "latest")]
        target: String,
        /// Drill this backup instead of the one the target chooses
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        /// Show past drills instead of running one
        #[arg(long)]
        history: bool,
        /// Where the scratch directory goes [default: the system temp directory]
        #[arg(long, value_name = "DIR")]
        scratch_dir: Option<PathBuf>,
        /// Directory of pg_ctl [default: found for the backup's version]
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// Concurrent downloads [default: twice the cores, 2..8]
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// How long to wait for recovery
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        timeout: Duration,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
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
    Audit {
        #[command(subcommand)]
        action: Option<AuditCommand>,
        /// Only records from this time on ('2026-11-27 09:00:00+00', or e.g. 24h for the last day)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
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
    Check {
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// Do not force a WAL switch to test archiving end to end
        #[arg(long)]
        no_switch: bool,
        /// How long to wait for the switched segment to arrive
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        archive_timeout: Duration,
    },
    /// Apply the retention policy: delete backups and WAL no longer needed
    #[command(
        long_about = "Apply the retention policy ([retention] / [clusters.NAME.retention]): keep \
every backup that ended inside the recovery window, the newest one before it (so the window's \
first moment stays restorable), at least min_backups backups, and all WAL from the oldest kept \
backup on; delete the rest. --dry-run prints the plan and deletes nothing; a real run carries \
out exactly that plan. Safe while wal-push and backups run."
    )]
    Expire {
        /// Print what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// List complete backups and the restorable window per timeline
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
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
    Restore {
        /// Directory to restore into (must be new or empty)
        #[arg(long, value_name = "DIR")]
        pgdata: PathBuf,
        /// Recover to this time (with a zone: '2026-11-27 09:41:07+00')
        #[arg(long, value_name = "TIME", group = "target")]
        target_time: Option<String>,
        /// Recover to this WAL location (e.g. 0/3000060)
        #[arg(long, value_name = "LSN", group = "target")]
        target_lsn: Option<String>,
        /// Recover to the commit of this transaction id
        #[arg(long, value_name = "XID", group = "target")]
        target_xid: Option<String>,
        /// Recover to this restore point (pg_create_restore_point)
        #[arg(long, value_name = "NAME", group = "target")]
        target_name: Option<String>,
        /// Recover only to the end of the backup (the earliest consistent point)
        #[arg(long, group = "target")]
        immediate: bool,
        /// Timeline to recover along: latest, current (the backup's) or a number
        #[arg(long, value_name = "TLI")]
        target_timeline: Option<String>,
        /// Stop just before the target instead of just after it
        #[arg(long)]
        target_exclusive: bool,
        /// Restore this backup instead of choosing one
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        /// Restore a tablespace elsewhere (repeatable)
        #[arg(long, value_name = "OLD=NEW")]
        tablespace_map: Vec<String>,
        /// Replace the contents of a non-empty --pgdata (never a running cluster's)
        #[arg(long)]
        force: bool,
        /// Write the server's configuration from outside the data directory here, Debian-style
        /// (postgresql.conf with data_directory = --pgdata, pg_hba.conf, conf.d/, start.conf),
        /// instead of into --pgdata; --start then runs the server with -c config_file=DIR/postgresql.conf
        #[arg(long, value_name = "DIR")]
        config_dir: Option<PathBuf>,
        /// Concurrent downloads [default: twice the cores, 2..8]
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Archiving in the restored cluster: off (default: a restored copy never adds a
        /// timeline to the repository) or preserve (keep the backed-up archive_command: use it
        /// when the restored cluster becomes the primary)
        #[arg(long, value_enum, default_value_t = ArchiveModeArg::Off)]
        archive_mode: ArchiveModeArg,
        /// OS user to own the restored files [default: postgres when run as root]
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
        /// Start PostgreSQL on the restored directory and wait until it reached the target
        #[arg(long)]
        start: bool,
        /// Port for --start [default: the restored postgresql.conf's]
        #[arg(long)]
        port: Option<u16>,
        /// Unix socket directory for --start (also disables TCP listening)
        #[arg(long, value_name = "DIR")]
        socket_dir: Option<PathBuf>,
        /// Directory of pg_ctl for --start [default: found for the backup's version]
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// How long --start waits for recovery
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        start_timeout: Duration,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ArchiveModeArg {
    Preserve,
    Off,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

fn default_parallelism() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    (cores * 2).clamp(2, 8)
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify every record and chain: exit 0 when intact, 16 when edited or removed records are found
    Verify {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Write a new random 32-byte master key to PATH (mode 0600; never overwrites)
    Generate { path: PathBuf },
}

/// wal-fetch's exit status for every failure but "not in the repository" (see main).
const WAL_FETCH_FAILED: u8 = Exit::WalFetchFailed.code();

pub fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidemark: cannot start the runtime: {e}");
            return ExitCode::from(Exit::Internal.code());
        }
    };
    let wal_fetch = matches!(cli.command, Command::WalFetch { .. });
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::CheckStatus(code)) => ExitCode::from(code),
        Err(Error::NotFound(msg)) => {
            // Expected during recovery: PostgreSQL probes for files beyond the archive's end.
            tracing::debug!("{msg}");
            ExitCode::from(Exit::NotFound.code())
        }
        Err(e) if wal_fetch => {
            // PostgreSQL takes any exit status up to 125 from restore_command as "no more WAL"
            // and ends recovery there, promoting a cluster that misses the rest. A file that
            // exists but cannot be fetched (store down, wrong key, corruption) must stop
            // recovery instead: an exit status above 125 makes PostgreSQL abort it.
            tracing::debug!(error = ?e, "wal-fetch failed");
            eprintln!(
                "tidemark: error: {e} (exit {WAL_FETCH_FAILED} instead of {}: PostgreSQL stops recovery here rather than ending it early)",
                e.exit_code()
            );
            ExitCode::from(WAL_FETCH_FAILED)
        }
        Err(e) => {
            tracing::debug!(error = ?e, "command failed");
            eprintln!("tidemark: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn open_cluster(cli: &Cli) -> Result<ClusterHandle, Error> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let config = Config::load(&path)?;
    ClusterHandle::open(config, cli.cluster.as_deref()).await
}

/// The named cluster, or every configured one.
async fn open_clusters(cli: &Cli) -> Result<Vec<ClusterHandle>, Error> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    let config = Config::load(&path)?;
    if cli.cluster.is_some() || config.clusters.len() == 1 {
        return Ok(vec![
            ClusterHandle::open(config, cli.cluster.as_deref()).await?,
        ]);
    }
    let store = tidemark::store::open(
        &config.repository.url,
        &config.s3_settings(),
        &config.store_options(),
    )
    .await
    .map_err(Error::Usage)?;
    config
        .clusters
        .keys()
        .map(|n| ClusterHandle::with_store(&config, n, store.clone()))
        .collect()
}

/// `--since`: a time with a zone, or a duration back from now (`24h`, `7d`).
fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>, Error> {
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

/// A token cancelled by the first SIGTERM or SIGINT; a second one ends the process at once
/// (exit 15): clean-up that waits on a store that is down can then be cut short, and what it
/// leaves is never listed (the next backup removes it).
fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("signal received: stopping the backup and removing what it wrote");
        t.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!(
            "tidemark: error: second signal: exiting now; the next backup removes what is left"
        );
        std::process::exit(15);
    });
    token
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Error> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    println_out(&s)
}

/// Prints to stdout; a closed pipe (`| head`) is not an error.
fn println_out(s: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{s}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::LocalIo(format!("stdout: {e}"))),
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    match &cli.command {
        Command::Key {
            command: KeyCommand::Generate { path },
        } => {
            let key = generate_master_key_file(path)?;
            println_out(&format!(
                "wrote master key {} (id {}, mode 0600): keep a copy in a safe place; \
                 without it the backups cannot be read",
                path.display(),
                key.id()
            ))
        }
        Command::Init { json } => {
            let cluster = open_cluster(&cli).await?;
            let out = tidemark::init::init(&cluster).await?;
            if *json {
                return print_json(&out);
            }
            println_out(&format!(
                "{} repository of cluster {} in {} (system identifier {}, PostgreSQL {}, {} MiB WAL segments)",
                if out.created {
                    "initialised"
                } else {
                    "already initialised:"
                },
                cluster.name,
                cluster.repo.store().describe(),
                out.system_identifier,
                out.pg_version_num,
                out.wal_segment_size >> 20
            ))
        }
        Command::WalPush { path } => {
            let cluster = open_cluster(&cli).await?;
            tidemark::wal::wal_push_counted(&cluster, path)
                .await
                .map(|_| ())
        }
        Command::WalFetch { name, dest } => {
            let cluster = open_cluster(&cli).await?;
            tidemark::wal::wal_fetch(&cluster, name, dest)
                .await
                .map(|_| ())
        }
        Command::Backup {
            json,
            parallel,
            wal_timeout,
            label,
        } => {
            let cluster = open_cluster(&cli).await?;
            let opts = tidemark::backup::BackupOptions {
                parallelism: parallel.unwrap_or_else(default_parallelism),
                wal_timeout: *wal_timeout,
                label: label.clone(),
                cancel: Some(cancel_on_signal()),
            };
            let out = tidemark::backup::backup(&cluster, &opts).await?;
            if *json {
                return print_json(&out);
            }
            println_out(&format!(
                "backup {} of cluster {} complete: {} files, {} -> {} stored, {:.1} s; \
                 timeline {}, LSN {} .. {}; restorable from {}",
                out.id,
                cluster.name,
                out.files,
                human_bytes(out.original_bytes),
                human_bytes(out.stored_bytes),
                out.duration_ms as f64 / 1000.0,
                out.timeline,
                out.start_lsn,
                out.stop_lsn,
                out.stop_time.format("%Y-%m-%d %H:%M:%S%.3f+00")
            ))
        }
        Command::Drill {
            target,
            backup,
            history,
            scratch_dir,
            pg_bin,
            parallel,
            timeout,
            json,
        } => {
            let config_path = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            let cluster = open_cluster(&cli).await?;
            if *history {
                let h = tidemark::drill::history(&cluster).await?;
                if *json {
                    return print_json(&h);
                }
                let mut text = format!("cluster {}: {} drill(s)", cluster.name, h.len());
                for r in &h {
                    text.push_str(&format!(
                        "\n{} {} {:<4} target {}; backup {}; RTO {}; {}",
                        r.id,
                        r.started.format("%Y-%m-%d %H:%M:%S+00"),
                        if r.ok { "OK" } else { "FAIL" },
                        r.target,
                        r.backup.as_deref().unwrap_or("-"),
                        r.rto_ms
                            .map(|m| format!("{:.1} s", m as f64 / 1000.0))
                            .unwrap_or_else(|| "-".into()),
                        r.error.as_deref().unwrap_or("all checks passed")
                    ));
                }
                return println_out(&text);
            }
            let target = tidemark::drill::parse_target(target).map_err(Error::Usage)?;
            let opts = tidemark::drill::DrillOptions {
                target,
                backup: backup.clone(),
                scratch_dir: scratch_dir.clone().unwrap_or_else(std::env::temp_dir),
                config_path,
                pg_bin: pg_bin.clone(),
                parallelism: parallel.unwrap_or_else(default_parallelism),
                timeout: *timeout,
            };
            let r = tidemark::drill::drill(&cluster, &opts).await?;
            if *json {
                print_json(&r)?;
            } else {
                let mut text = format!(
                    "drill {} of cluster {}: {} — target {}, backup {}, recovered to {} (LSN {}); \
                     RTO {} (download {}, recovery {}), {} restored, {} WAL segment(s) replayed",
                    r.id,
                    r.cluster,
                    if r.ok { "PASSED" } else { "FAILED" },
                    r.target,
                    r.backup.as_deref().unwrap_or("-"),
                    r.restored_to_time
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
                        .unwrap_or_else(|| "-".into()),
                    r.restored_to_lsn.as_deref().unwrap_or("-"),
                    r.rto_ms
                        .map(|m| format!("{:.1} s", m as f64 / 1000.0))
                        .unwrap_or_else(|| "-".into()),
                    r.download_ms
                        .map(|m| format!("{:.1} s", m as f64 / 1000.0))
                        .unwrap_or_else(|| "-".into()),
                    r.recovery_ms
                        .map(|m| format!("{:.1} s", m as f64 / 1000.0))
                        .unwrap_or_else(|| "-".into()),
                    r.bytes_restored
                        .map(human_bytes)
                        .unwrap_or_else(|| "-".into()),
                    r.wal_segments_replayed
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into()),
                );
                for c in &r.checks {
                    text.push_str(&format!(
                        "\n{:<4} {:<8} {}",
                        if c.ok { "OK" } else { "FAIL" },
                        c.name,
                        c.detail
                    ));
                }
                for o in &r.overrides {
                    if o.starts_with("configuration:") {
                        text.push_str(&format!("\nwarning: {o}"));
                    } else {
                        text.push_str(&format!("\nstarted with {o}"));
                    }
                }
                if let Some(e) = &r.error {
                    text.push_str(&format!("\nreason: {e}"));
                }
                if let Some(l) = &r.server_log {
                    text.push_str(&format!("\nserver log kept: {l}"));
                }
                println_out(&text)?;
            }
            if r.ok {
                Ok(())
            } else {
                Err(Error::DrillFailed(
                    r.error.unwrap_or_else(|| "drill failed".into()),
                ))
            }
        }
        Command::Check {
            json,
            no_switch,
            archive_timeout,
        } => {
            let cluster = match open_cluster(&cli).await {
                Ok(c) => c,
                Err(e) => {
                    // Monitoring reads the exit code: a broken config is critical.
                    println_out(&format!("TIDEMARK CRITICAL - {e}"))?;
                    return Err(Error::CheckStatus(2));
                }
            };
            let opts = tidemark::check::CheckOptions {
                switch_wal: !no_switch,
                archive_timeout: *archive_timeout,
                catalog: true,
            };
            let report = tidemark::check::check(&cluster, &opts).await;
            if *json {
                print_json(&report)?;
            } else {
                let worst: Vec<&str> = report
                    .checks
                    .iter()
                    .filter(|c| {
                        c.status == report.status && report.status != tidemark::check::Status::Ok
                    })
                    .map(|c| c.name)
                    .collect();
                let mut text = format!(
                    "TIDEMARK {} - cluster {}: {}",
                    report.status.label(),
                    report.cluster,
                    if worst.is_empty() {
                        format!("{} checks passed", report.checks.len())
                    } else {
                        worst.join(", ")
                    }
                );
                for c in &report.checks {
                    text.push_str(&format!(
                        "\n{:<8} {:<16} {}",
                        c.status.label(),
                        c.name,
                        c.message
                    ));
                }
                println_out(&text)?;
            }
            match report.status.exit_code() {
                0 => Ok(()),
                code => Err(Error::CheckStatus(code)),
            }
        }
        Command::Expire { dry_run, json } => {
            let cluster = open_cluster(&cli).await?;
            let plan = tidemark::expire::plan(&cluster, chrono::Utc::now()).await?;
            let outcome = if *dry_run {
                tidemark::expire::dry_run(plan)
            } else {
                tidemark::expire::execute(&cluster, plan).await?
            };
            if *json {
                return print_json(&outcome);
            }
            let p = &outcome.plan;
            let verb = if outcome.dry_run {
                "would delete"
            } else {
                "deleted"
            };
            let mut text = format!(
                "cluster {}: recovery window {} (from {}), min_backups {}\nkeep {} backup(s): {}\n{verb} {} backup(s): {}\n{verb} {} WAL file(s), {}{}",
                p.cluster,
                humantime::format_duration(Duration::from_secs(p.recovery_window_secs)),
                p.window_start.format("%Y-%m-%d %H:%M:%S+00"),
                p.min_backups,
                p.keep_backups.len(),
                p.keep_backups.join(", "),
                p.delete_backups.len(),
                if p.delete_backups.is_empty() {
                    "-".to_string()
                } else {
                    p.delete_backups.join(", ")
                },
                p.delete_wal.len(),
                human_bytes(p.delete_wal_bytes),
                p.wal_keep_from
                    .as_ref()
                    .map(|s| format!(" (WAL kept from {s})"))
                    .unwrap_or_default()
            );
            for n in &p.notes {
                text.push_str(&format!("\nnote: {n}"));
            }
            if !outcome.removed_incomplete.is_empty() {
                text.push_str(&format!(
                    "\nremoved leftovers of incomplete backups: {}",
                    outcome.removed_incomplete.join(", ")
                ));
            }
            if outcome.dry_run {
                for k in &p.delete_wal {
                    text.push_str(&format!("\n  {k}"));
                }
            }
            println_out(&text)
        }
        Command::List { json } => {
            let cluster = open_cluster(&cli).await?;
            let listing = tidemark::list::list(&cluster).await?;
            if *json {
                return print_json(&listing);
            }
            println_out(&render_list(&listing))
        }
        Command::Restore {
            pgdata,
            target_time,
            target_lsn,
            target_xid,
            target_name,
            immediate,
            target_timeline,
            target_exclusive,
            backup,
            tablespace_map,
            force,
            config_dir,
            parallel,
            archive_mode,
            owner,
            start,
            port,
            socket_dir,
            pg_bin,
            start_timeout,
            json,
        } => {
            use tidemark::restore;
            let target = restore::parse_target(&restore::TargetSpec {
                time: target_time.as_deref(),
                lsn: target_lsn.as_deref(),
                xid: target_xid.as_deref(),
                name: target_name.as_deref(),
                immediate: *immediate,
            })
            .map_err(Error::Usage)?;
            let target_timeline = target_timeline
                .as_deref()
                .map(restore::parse_target_timeline)
                .transpose()
                .map_err(Error::Usage)?;
            let map = restore::parse_tablespace_map(tablespace_map).map_err(Error::Usage)?;
            let config_path = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            let cluster = open_cluster(&cli).await?;
            let opts = restore::RestoreOptions {
                pgdata: std::path::absolute(pgdata).unwrap_or(pgdata.clone()),
                target,
                target_timeline,
                exclusive: *target_exclusive,
                backup: backup.clone(),
                tablespace_map: map,
                force: *force,
                parallelism: parallel.unwrap_or_else(default_parallelism),
                archive_mode: match archive_mode {
                    ArchiveModeArg::Preserve => restore::ArchiveMode::Preserve,
                    ArchiveModeArg::Off => restore::ArchiveMode::Off,
                },
                owner: owner.clone(),
                config_path,
                config_dir: config_dir
                    .as_ref()
                    .map(|d| std::path::absolute(d).unwrap_or(d.clone())),
                start: start.then(|| restore::StartOptions {
                    pg_bin: pg_bin.clone(),
                    port: *port,
                    socket_dir: socket_dir.clone(),
                    timeout: *start_timeout,
                    log_file: None,
                    private: false,
                }),
            };
            let out = restore::restore(&cluster, &opts).await?;
            if *json {
                return print_json(&out);
            }
            let mut text = format!(
                "restored backup {} into {} ({} files, {}, {:.1} s) for recovery to {} on timeline {}",
                out.backup,
                out.pgdata,
                out.files,
                human_bytes(out.bytes),
                out.download_ms as f64 / 1000.0,
                out.target,
                out.timeline
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "?".into())
            );
            let conf = &out.configuration;
            if conf.held {
                if !conf.placed.is_empty() {
                    text.push_str(&format!(
                        "\nconfiguration from outside the data directory: {} file(s) into {}",
                        conf.placed.len(),
                        conf.config_dir.as_deref().unwrap_or(&out.pgdata)
                    ));
                    for p in &conf.placed {
                        text.push_str(&format!("\n  {} ({}) -> {}", p.source, p.role, p.path));
                    }
                }
                for r in &conf.rewritten {
                    text.push_str(&format!("\n  rewritten: {r}"));
                }
                for n in &conf.notes {
                    text.push_str(&format!("\nnote: {n}"));
                }
            }
            for w in &out.warnings {
                text.push_str(&format!("\nwarning: {w}"));
            }
            if let Some(s) = &out.started {
                for o in &s.overrides {
                    text.push_str(&format!("\nstarted with {o}"));
                }
            }
            match &out.started {
                Some(s) => text.push_str(&format!(
                    "\nserver started (port {}, socket {}): recovered to {} (LSN {}, timeline {}); \
                     recovery {:.1} s, total {:.1} s",
                    s.port,
                    s.socket_dir,
                    s.restored_to_time
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
                        .unwrap_or_else(|| "(no transaction replayed)".into()),
                    s.restored_to_lsn.as_deref().unwrap_or("?"),
                    s.timeline.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
                    s.recovery_ms as f64 / 1000.0,
                    s.total_ms as f64 / 1000.0
                )),
                None => match &conf.config_dir {
                    Some(d) => text.push_str(&format!(
                        "\nstart it with: pg_ctl -D {} -o \"-c config_file={d}/postgresql.conf\" start, or with \
                         pg_ctlcluster when {d} is /etc/postgresql/VERSION/NAME (recovery.signal and the recovery \
                         settings are in place)",
                        out.pgdata
                    )),
                    None => text.push_str(&format!(
                        "\nstart it with: pg_ctl -D {} start (recovery.signal and the recovery settings are in place)",
                        out.pgdata
                    )),
                },
            }
            println_out(&text)
        }
        Command::Daemon => {
            let config_path = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            tidemark::daemon::run(tidemark::daemon::DaemonOptions { config_path }).await
        }
        Command::Audit {
            action,
            since,
            json,
        } => {
            let clusters = open_clusters(&cli).await?;
            match action {
                Some(AuditCommand::Verify { json: json2 }) => {
                    let mut reports = Vec::new();
                    for c in &clusters {
                        reports.push(tidemark::audit::verify(c).await?);
                    }
                    let ok = reports.iter().all(|r| r.ok);
                    if *json || *json2 {
                        print_json(&reports)?;
                    } else {
                        let mut text = String::new();
                        for r in &reports {
                            text.push_str(&format!(
                                "audit log of cluster {}: {} — {} record(s) in {} chain(s){}\n",
                                r.cluster,
                                if r.ok { "OK" } else { "FAILED" },
                                r.records,
                                r.chains.len(),
                                if r.pending_here > 0 {
                                    format!(
                                        ", {} waiting on this host to be uploaded",
                                        r.pending_here
                                    )
                                } else {
                                    String::new()
                                }
                            ));
                            for c in &r.chains {
                                text.push_str(&format!(
                                    "  chain {} (host {}): {} record(s), {} .. {}, head seq {} sha256 {}\n",
                                    c.chain,
                                    c.host.as_deref().unwrap_or("?"),
                                    c.records,
                                    c.first.as_deref().unwrap_or("-"),
                                    c.last.as_deref().unwrap_or("-"),
                                    c.head_seq,
                                    c.head_sha256
                                ));
                            }
                            for p in &r.problems {
                                text.push_str(&format!("  PROBLEM: {p}\n"));
                            }
                        }
                        println_out(text.trim_end())?;
                    }
                    if ok {
                        Ok(())
                    } else {
                        let first = reports
                            .iter()
                            .flat_map(|r| {
                                r.problems
                                    .iter()
                                    .map(move |p| format!("cluster {}: {p}", r.cluster))
                            })
                            .next()
                            .unwrap_or_default();
                        Err(Error::AuditFailed(format!(
                            "audit log verification failed: {first}"
                        )))
                    }
                }
                None => {
                    let since = match since {
                        None => None,
                        Some(s) => Some(parse_since(s)?),
                    };
                    let mut all = Vec::new();
                    for c in &clusters {
                        all.extend(tidemark::audit::list(c, since).await?);
                    }
                    all.sort_by(|a, b| a.record.time.cmp(&b.record.time));
                    if *json {
                        return print_json(&all);
                    }
                    let mut text = format!("{} audit record(s)", all.len());
                    for l in &all {
                        let r = &l.record;
                        text.push_str(&format!(
                            "\n{} {:<8} {}@{} {:<13} {:<7}{}{}{}",
                            r.time,
                            r.cluster,
                            r.user,
                            r.host,
                            r.operation,
                            r.outcome,
                            r.backup
                                .as_deref()
                                .map(|b| format!(" backup {b}"))
                                .unwrap_or_default(),
                            if r.objects.is_empty() {
                                String::new()
                            } else {
                                format!(" {}", r.objects.join(" "))
                            },
                            r.detail
                                .as_deref()
                                .map(|d| format!(" — {d}"))
                                .unwrap_or_default()
                        ));
                    }
                    println_out(&text)
                }
            }
        }
        Command::WalList { json } => {
            let cluster = open_cluster(&cli).await?;
            let summary = tidemark::wal::wal_list(&cluster).await?;
            if *json {
                return print_json(&summary);
            }
            println_out(&render_wal_list(&cluster.name, &summary))
        }
    }
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn render_list(l: &tidemark::list::Listing) -> String {
    let ts = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S+00").to_string();
    let mut out = format!(
        "cluster {}: {} complete backup(s)\n",
        l.cluster,
        l.backups.len()
    );
    if !l.backups.is_empty() {
        out.push_str(&format!(
            "{:<20} {:>3} {:<22} {:<22} {:<12} {:<12} {:>10} {:>10} {:>8} {:>6} {:>5}\n",
            "ID",
            "TLI",
            "START",
            "STOP",
            "START LSN",
            "STOP LSN",
            "ORIGINAL",
            "STORED",
            "SECONDS",
            "PG",
            "CONF"
        ));
    }
    for b in &l.backups {
        out.push_str(&format!(
            "{:<20} {:>3} {:<22} {:<22} {:<12} {:<12} {:>10} {:>10} {:>8.1} {:>6} {:>5}{}\n",
            b.id,
            b.timeline,
            ts(&b.start_time),
            ts(&b.stop_time),
            b.start_lsn,
            b.stop_lsn,
            human_bytes(b.original_bytes),
            human_bytes(b.stored_bytes),
            b.duration_ms as f64 / 1000.0,
            b.pg_version_num / 10000,
            // Configuration files from outside the data directory held; "?": not recorded.
            match &b.configuration {
                None => "?".to_string(),
                Some(c) if !c.missing.is_empty() => format!("{}!", c.captured.len()),
                Some(c) => c.captured.len().to_string(),
            },
            if b.range.restorable {
                ""
            } else {
                "  NOT RESTORABLE (WAL missing)"
            }
        ));
    }
    if l.backups.iter().any(|b| b.configuration.is_none()) {
        out.push_str(
            "CONF ?: the backup does not record the configuration kept outside the data directory\n",
        );
    }
    if l.backups.iter().any(|b| {
        b.configuration
            .as_ref()
            .is_some_and(|c| !c.missing.is_empty())
    }) {
        out.push_str("CONF N!: some configuration could not be recorded (list --json says what)\n");
    }
    out.push_str("restorable window:\n");
    if l.windows.is_empty() {
        out.push_str("  none\n");
    }
    for w in &l.windows {
        out.push_str(&format!(
            "  timeline {}: {} .. {}\n",
            w.timeline,
            w.from.format("%Y-%m-%d %H:%M:%S%.3f+00"),
            w.to.format("%Y-%m-%d %H:%M:%S%.3f+00")
        ));
    }
    for (tli, g) in &l.wal_gaps {
        out.push_str(&format!(
            "WAL GAP on timeline {tli}: {} .. {} ({} segment(s) missing)\n",
            g.from, g.to, g.missing
        ));
    }
    out.trim_end().to_string()
}

fn render_wal_list(cluster: &str, s: &WalSummary) -> String {
    let mut out = format!(
        "cluster {cluster}: {} MiB segments, {} timeline(s)\n",
        s.wal_segment_size >> 20,
        s.timelines.len()
    );
    for t in &s.timelines {
        out.push_str(&format!(
            "timeline {}: {} segment(s), first {}, last {}{}\n",
            t.timeline,
            t.segments,
            t.first.as_deref().unwrap_or("-"),
            t.last.as_deref().unwrap_or("-"),
            if t.history_file { ", history file" } else { "" }
        ));
        if t.gaps.is_empty() && t.segments > 0 {
            out.push_str("  no gaps\n");
        }
        for g in &t.gaps {
            out.push_str(&format!(
                "  GAP: {} .. {} ({} segment(s) missing)\n",
                g.from, g.to, g.missing
            ));
        }
        for p in &t.partial {
            out.push_str(&format!("  partial: {p}\n"));
        }
        for b in &t.backup_history_files {
            out.push_str(&format!("  backup history: {b}\n"));
        }
    }
    for u in &s.unrecognised {
        out.push_str(&format!("unrecognised object: {u}\n"));
    }
    out.trim_end().to_string()
}

/// Keeps peak memory proportional to what is live. tidemark's large buffers (1 MiB chunks,
/// 8 MiB upload parts) are short-lived and allocated from many threads; glibc raises its mmap
/// threshold after each such buffer is freed, and then serves them from per-thread arenas that
/// keep the freed memory: measured 307 MiB peak for a --parallel 8 backup of incompressible
/// data. A fixed threshold returns every large buffer to the kernel on free, and fewer arenas
/// bound fragmentation.
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

//! Starting the restored copy (`restore --start`, drills): placeholder configuration where the
//! backup holds none, the settings a private start overrides (and why), pg_ctl, waiting until
//! recovery reaches the target and the server is promoted; and, when it does not come up, the
//! reason in the server's own words.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::StartOutcome;
use super::config::{ConfigReport, effective_settings, is_on, lacking, setting_path};
use super::owner::{is_root, user_ids};
use super::plan::{RestorePlan, StartPlan};
use super::recovery::shell_quote;
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::pg::conffiles::{Graph, quote_conf};
use crate::repo::manifest::BackupManifest;

/// Finds pg_ctl for the backup's PostgreSQL major version.
fn find_pg_bin(start: &StartPlan, backup: &BackupManifest) -> Result<PathBuf, Error> {
    if let Some(b) = &start.pg_bin {
        return Ok(b.clone());
    }
    let major = backup.pg_version_num / 10000;
    for cand in [
        format!("/usr/lib/postgresql/{major}/bin"),
        format!("/opt/tidemark-pg/{major}/bin"),
        format!("/usr/pgsql-{major}/bin"),
    ] {
        if Path::new(&cand).join("pg_ctl").exists() {
            return Ok(PathBuf::from(cand));
        }
    }
    Err(Error::Usage(format!(
        "cannot find PostgreSQL {major}'s pg_ctl: pass --pg-bin DIR"
    )))
}

/// Starts the restored server with the configuration `configuration` placed, and waits until
/// it has recovered and been promoted. `restore_started`: when the restore began.
pub(super) async fn start_and_wait(
    cluster: &ClusterHandle,
    plan: &RestorePlan,
    start: &StartPlan,
    configuration: &ConfigReport,
    restore_started: Instant,
) -> Result<StartOutcome, Error> {
    let bin = find_pg_bin(start, &plan.manifest)?;
    let log = &start.log_file;
    let config_file = configuration
        .config_file
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| plan.pgdata.join("postgresql.conf"));
    let mut notes = placeholder_config(&plan.pgdata, &config_file, start.private, &plan.owner)?;
    let settings = start_settings(
        &plan.pgdata,
        &config_file,
        plan.manifest.pg_version_num,
        start.port,
        start.socket_dir.as_deref(),
    );
    for o in &settings.overrides {
        tracing::info!("start of the restored copy: {o}");
    }
    notes.extend(settings.overrides.iter().cloned());
    let recovery_started = Instant::now();
    pg_ctl_start(&bin, plan, log, &config_file, &settings)?;
    // Connection parameters: the user and database of the cluster's connection string, the
    // restored server's socket and port.
    let port = settings.port.unwrap_or(5432);
    let socket_dir = settings
        .socket_dirs
        .first()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("/var/run/postgresql"));
    let (user, dbname) = user_and_db(cluster);
    let conninfo = format!(
        "host={} port={port} user={user} dbname={dbname} connect_timeout=5",
        socket_dir.display()
    );
    let replayed = wait_for_promotion(plan, start, &conninfo, &user, recovery_started).await?;
    Ok(StartOutcome {
        restored_to_time: replayed.time,
        restored_to_lsn: replayed.lsn,
        timeline: replayed.timeline,
        recovery_ms: replayed.recovery_ms,
        total_ms: restore_started.elapsed().as_millis() as u64,
        port,
        socket_dir: socket_dir.display().to_string(),
        pg_bin: bin.display().to_string(),
        overrides: notes,
        log_file: log.display().to_string(),
    })
}

/// `pg_ctl start -W` as the restored copy's owner: the data directory, and the configuration
/// where it was put (like pg_ctlcluster), with the start's settings.
fn pg_ctl_start(
    bin: &Path,
    plan: &RestorePlan,
    log: &Path,
    config_file: &Path,
    settings: &StartSettings,
) -> Result<(), Error> {
    let mut args: Vec<String> = Vec::new();
    if config_file != plan.pgdata.join("postgresql.conf") {
        args.push("-c".into());
        args.push(shell_quote(&format!(
            "config_file={}",
            config_file.display()
        )));
    }
    for (name, value) in &settings.options {
        args.push("-c".into());
        args.push(shell_quote(&format!("{name}={value}")));
    }
    let mut cmd = match &plan.owner {
        Some(u) if is_root() => {
            let mut c = std::process::Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(bin.join("pg_ctl"));
            c
        }
        _ => std::process::Command::new(bin.join("pg_ctl")),
    };
    cmd.arg("-D").arg(&plan.pgdata).arg("-l").arg(log).arg("-W");
    if !args.is_empty() {
        cmd.arg("-o").arg(args.join(" "));
    }
    cmd.arg("start");
    let out = cmd
        .output()
        .map_err(|e| Error::Recovery(format!("running pg_ctl: {e}")))?;
    if !out.status.success() {
        return Err(Error::Recovery(format!(
            "pg_ctl start failed: {} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            log_reason(log)
        )));
    }
    Ok(())
}

/// Where a promoted server's recovery ended.
struct Replayed {
    time: Option<DateTime<Utc>>,
    lsn: Option<String>,
    timeline: Option<u32>,
    recovery_ms: u64,
}

/// Polls the started server until it leaves recovery; fails when it exits, refuses us, or
/// the start's timeout passes.
async fn wait_for_promotion(
    plan: &RestorePlan,
    start: &StartPlan,
    conninfo: &str,
    user: &str,
    recovery_started: Instant,
) -> Result<Replayed, Error> {
    let log = &start.log_file;
    let deadline = Instant::now() + start.timeout;
    let mut seen_running = false;
    loop {
        if Instant::now() > deadline {
            return Err(Error::Recovery(format!(
                "the restored server did not finish recovery within {:?} ({})",
                start.timeout,
                log_reason(log)
            )));
        }
        // pg_ctl -W returns before the postmaster writes its pid file: give it time to
        // appear, then treat its disappearance as the server having exited.
        let running = postmaster_running(&plan.pgdata);
        seen_running |= running;
        if !running
            && (seen_running
                || failed_early(log, recovery_started)
                || recovery_started.elapsed() > Duration::from_secs(30))
        {
            return Err(Error::Recovery(format!(
                "the restored server exited during recovery: {}",
                log_reason(log)
            )));
        }
        match crate::pg::conn::connect(conninfo).await {
            Ok(client) => {
                if let Some(r) = promoted(&client, recovery_started).await? {
                    client.close().await;
                    return Ok(r);
                }
                client.close().await;
            }
            // The server is up and refuses us: waiting longer will not help.
            Err(e) if refused(&e.to_string()) => {
                return Err(Error::Recovery(format!(
                    "the restored server runs but refuses tidemark's connection as user {user}: {e} \
                     (its pg_hba.conf is the backed-up one; the server keeps running at {})",
                    plan.pgdata.display()
                )));
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A server that fails its start (a configuration error) exits before it writes its pid
/// file: its FATAL line in the log says so at once.
fn failed_early(log: &Path, recovery_started: Instant) -> bool {
    recovery_started.elapsed() > Duration::from_millis(500)
        && std::fs::read_to_string(log)
            .ok()
            .and_then(|t| server_failure(&t))
            .is_some()
}

/// Where replay ended, once the server is out of recovery (None: still recovering, or not
/// answering yet).
async fn promoted(
    client: &tokio_postgres::Client,
    recovery_started: Instant,
) -> Result<Option<Replayed>, Error> {
    let Ok(row) = client.query_one("select pg_is_in_recovery()", &[]).await else {
        return Ok(None);
    };
    let in_recovery: bool = row.get(0);
    if in_recovery {
        return Ok(None);
    }
    let row = client
        .query_one(
            "select pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn()::text, \
                 (select timeline_id from pg_control_checkpoint())",
            &[],
        )
        .await
        .map_err(|e| Error::Postgres(e.to_string()))?;
    let tli: Option<i32> = row.get(2);
    Ok(Some(Replayed {
        time: row.get(0),
        lsn: row.get(1),
        timeline: tli.map(|t| t as u32),
        recovery_ms: recovery_started.elapsed().as_millis() as u64,
    }))
}

/// A connection error that says the server is accepting connections but not ours.
fn refused(e: &str) -> bool {
    e.contains("no pg_hba.conf entry")
        || e.contains("authentication failed")
        || e.contains("Peer authentication")
        || e.contains("password authentication")
}

/// For a start from a data directory without postgresql.conf or pg_hba.conf (a backup that
/// does not record an outside configuration): minimal files, so the data can be proved. Each
/// one is reported.
fn placeholder_config(
    pgdata: &Path,
    config_file: &Path,
    private: bool,
    owner: &Option<String>,
) -> Result<Vec<String>, Error> {
    let io = |p: &Path, e: io::Error| Error::LocalIo(format!("{}: {e}", p.display()));
    let mut notes = Vec::new();
    let mut written = Vec::new();
    if !config_file.exists() {
        std::fs::write(
            config_file,
            "# tidemark: placeholder written by restore --start: the backup holds no postgresql.conf.\n\
             # The server runs with PostgreSQL's defaults; put the cluster's own configuration here.\n",
        )
        .map_err(|e| io(config_file, e))?;
        notes.push(format!(
            "{}: written with defaults only (the backup holds no postgresql.conf)",
            config_file.display()
        ));
        written.push(config_file.to_path_buf());
    }
    let g = effective_settings(pgdata, config_file);
    let hba = g
        .setting("hba_file")
        .filter(|v| !v.is_empty())
        .map(|v| crate::pg::conffiles::resolve(config_file, v))
        .unwrap_or_else(|| pgdata.join("pg_hba.conf"));
    if !hba.exists() && crate::pg::conffiles::is_within(&hba, pgdata) {
        let rule = if private { "trust" } else { "peer" };
        std::fs::write(
            &hba,
            format!(
                "# tidemark: placeholder written by restore --start: the backup holds no pg_hba.conf.\n\
                 local all all {rule}\n"
            ),
        )
        .map_err(|e| io(&hba, e))?;
        notes.push(format!(
            "{}: written with one rule, `local all all {rule}` (the backup holds no pg_hba.conf)",
            hba.display()
        ));
        written.push(hba);
    }
    if let (Some(u), true) = (owner, is_root()) {
        let (uid, gid) = user_ids(u)?;
        for p in &written {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| io(p, e))?;
        }
    }
    for p in &written {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io(p, e))?;
    }
    Ok(notes)
}

/// Whether the postmaster of `pgdata` is alive (its pid file names a live process).
pub(crate) fn postmaster_running(pgdata: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(pgdata.join("postmaster.pid")) else {
        return false;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return false;
    };
    Path::new(&format!("/proc/{pid}")).exists()
}

pub(crate) fn user_and_db(cluster: &ClusterHandle) -> (String, String) {
    use secrecy::ExposeSecret;
    let mut user = "postgres".to_string();
    let mut db = "postgres".to_string();
    if let Some(c) = &cluster.config.connection
        && let Ok((rest, _)) = crate::pg::tls::split(c.expose_secret())
        && let Ok(cfg) = rest.parse::<tokio_postgres::Config>()
    {
        if let Some(u) = cfg.get_user() {
            user = u.to_string();
        }
        if let Some(d) = cfg.get_dbname() {
            db = d.to_string();
        }
    }
    (user, db)
}

/// Why the server did not come up, in its own words, and where its log is.
fn log_reason(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    match server_failure(&text) {
        Some(line) => format!("{line} (server log: {})", log.display()),
        None => format!("the server log {} says no more", log.display()),
    }
}

/// What `--start` and drills pass to the server so that a copy starts privately beside
/// whatever else runs on this host, and why: each override is reported.
#[derive(Debug, Default)]
pub struct StartSettings {
    pub options: Vec<(String, String)>,
    pub overrides: Vec<String>,
    pub port: Option<u16>,
    pub socket_dirs: Vec<PathBuf>,
}

pub fn start_settings(
    pgdata: &Path,
    config_file: &Path,
    pg_version_num: u32,
    port: Option<u16>,
    socket_dir: Option<&Path>,
) -> StartSettings {
    let g = effective_settings(pgdata, config_file);
    let mut s = StartSettings::default();
    let lacking = lacking(pgdata, &g, pg_version_num);
    let lacks = |n: &str| {
        lacking
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, v)| v.clone())
    };
    if let Some(p) = port {
        s.options.push(("port".into(), p.to_string()));
    }
    s.port = port.or_else(|| g.setting("port").and_then(|v| v.parse().ok()));
    socket_settings(&mut s, &g, pgdata, socket_dir);
    if let Some(v) = g.setting("external_pid_file").filter(|v| !v.is_empty()) {
        s.overrides.push(format!(
            "external_pid_file = '' (the configured {} is the original cluster's)",
            quote_conf(v)
        ));
    }
    s.options.push(("external_pid_file".into(), String::new()));
    if is_on(g.setting("ssl")) {
        let gone: Vec<String> = [
            "ssl_cert_file",
            "ssl_key_file",
            "ssl_ca_file",
            "ssl_crl_file",
        ]
        .iter()
        .filter_map(|n| lacks(n).map(|v| format!("{n} {}", quote_conf(&v))))
        .collect();
        if !gone.is_empty() {
            s.overrides
                .push(format!("ssl = off ({} missing here)", gone.join(", ")));
            s.options.push(("ssl".into(), "off".into()));
        }
    }
    if let Some(v) = lacks("stats_temp_directory") {
        s.overrides.push(format!(
            "stats_temp_directory = 'pg_stat_tmp' (the configured {} is missing here)",
            quote_conf(&v)
        ));
        s.options
            .push(("stats_temp_directory".into(), "pg_stat_tmp".into()));
    }
    if is_on(g.setting("logging_collector")) {
        s.overrides.push(
            "logging_collector = off (the server's messages go to tidemark's start log)".into(),
        );
        s.options.push(("logging_collector".into(), "off".into()));
    }
    s
}

/// The socket directory: `socket_dir` when given (and no TCP), else the configured ones that
/// exist here, else /tmp.
fn socket_settings(s: &mut StartSettings, g: &Graph, pgdata: &Path, socket_dir: Option<&Path>) {
    match socket_dir {
        Some(d) => {
            s.options
                .push(("unix_socket_directories".into(), d.display().to_string()));
            s.options.push(("listen_addresses".into(), String::new()));
            s.socket_dirs = vec![d.to_path_buf()];
        }
        None => {
            let configured: Vec<PathBuf> = g
                .setting("unix_socket_directories")
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| setting_path(pgdata, d))
                .collect();
            let existing: Vec<PathBuf> =
                configured.iter().filter(|d| d.is_dir()).cloned().collect();
            if existing.len() < configured.len() {
                let use_dirs = if existing.is_empty() {
                    vec![PathBuf::from("/tmp")]
                } else {
                    existing
                };
                let joined = use_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                s.overrides.push(format!(
                    "unix_socket_directories = {} (the configured {} is missing here)",
                    quote_conf(&joined),
                    quote_conf(g.setting("unix_socket_directories").unwrap_or(""))
                ));
                s.options.push(("unix_socket_directories".into(), joined));
                s.socket_dirs = use_dirs;
            } else {
                s.socket_dirs = configured;
            }
        }
    }
}

/// The line of a server log that says why it did not come up: the last FATAL or PANIC that is
/// not a refused connection attempt, else what the postgres binary printed before logging
/// started (`postgres: could not access the server configuration file ...`).
pub fn server_failure(log: &str) -> Option<String> {
    const NOISE: &[&str] = &[
        "the database system is starting up",
        "the database system is shutting down",
        "the database system is not yet accepting connections",
        "the database system is not accepting connections",
        "terminating connection due to administrator command",
        "role \"",
        "database \"",
    ];
    let fatal = log.lines().rfind(|l| {
        (l.contains("FATAL:") || l.contains("PANIC:")) && !NOISE.iter().any(|n| l.contains(n))
    });
    let line = fatal.or_else(|| {
        log.lines().rfind(|l| {
            let t = l.trim_start();
            t.starts_with("postgres:") && !t.contains("LOG:")
        })
    })?;
    Some(line.trim().chars().take(500).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_failure_quotes_the_real_reason() {
        let log = "2026-12-06 10:00:00.000 UTC [1] LOG:  starting PostgreSQL 15\n\
                   2026-12-06 10:00:00.100 UTC [9] FATAL:  the database system is starting up\n\
                   2026-12-06 10:00:00.200 UTC [2] FATAL:  could not load pg_hba.conf\n\
                   2026-12-06 10:00:00.300 UTC [9] FATAL:  the database system is starting up\n\
                   2026-12-06 10:00:00.400 UTC [1] LOG:  database system is shut down\n";
        assert_eq!(
            server_failure(log).as_deref(),
            Some("2026-12-06 10:00:00.200 UTC [2] FATAL:  could not load pg_hba.conf")
        );
        let early = "postgres: could not access the server configuration file \"/srv/pg/postgresql.conf\": No such file or directory\n";
        assert!(
            server_failure(early)
                .unwrap()
                .contains("could not access the server configuration file")
        );
        assert_eq!(server_failure("LOG: fine\n"), None);
    }
}

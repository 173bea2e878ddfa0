//! `tidemark restore`: rebuilds a data directory from a backup and configures PostgreSQL to
//! replay archived WAL to the requested target; optionally starts it and waits until the
//! target is reached.
//!
//! Contracts:
//! - the target directory must not exist or be empty (or `--force`, which refuses a directory
//!   with a postmaster.pid);
//! - every byte is authenticated (AES-GCM) and every extent checked against the manifest's
//!   SHA-256 before the restore reports success; on any failure the restored contents are
//!   removed, so no half-restored directory can be started by mistake;
//! - targets outside the restorable window are refused before anything is downloaded.
//!
//! A restore is planned first (`plan`: the backup, timeline, target, recovery settings and
//! where everything goes, a printable [`RestorePlan`]), then carried out as planned: nothing
//! after the plan reads the options. Where the work happens:
//! - `target`: recovery targets and timelines, parsed from the operator's text;
//! - `plan`: choosing the backup and timeline for a target, the plan itself;
//! - `files`: the directories, every file of the manifest, durability, removal on failure;
//! - `pack`: downloading packs into the files and verifying every extent;
//! - `recovery`: backup_label, the recovery settings, recovery.signal;
//! - `owner`: the restored server's user (chown, its restore_command checked first);
//! - `server`: `--start`: the settings a private start overrides, pg_ctl, waiting for the
//!   target, why a server did not come up;
//! - `config`: the server's configuration from outside its data directory, placed and its
//!   paths rewritten (`crate::restore_config`, its old name).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::audit::{self, Event, Outcome};
use crate::cluster::{Catalog, ClusterHandle};
use crate::error::Error;
use crate::pg::wal::Lsn;

pub mod config;
mod files;
mod owner;
mod pack;
mod plan;
mod recovery;
mod server;
mod target;

pub use plan::{RestorePlan, StartPlan, TablespacePlacement, plan};
pub use recovery::{RecoverySetting, RestoreCommand};
pub use server::{StartSettings, server_failure, start_settings};
pub use target::{
    RecoveryTarget, TargetSpec, TargetTimeline, parse_tablespace_map, parse_target,
    parse_target_time, parse_target_timeline,
};

pub(crate) use owner::{effective_owner, is_root, user_ids};
pub(crate) use server::{postmaster_running, user_and_db};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveMode {
    /// Keep the backed-up archive settings: after promotion the restored cluster archives
    /// its new timeline into the repository.
    Preserve,
    /// archive_mode = off in the restored cluster (drills, copies for inspection).
    Off,
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub target: RecoveryTarget,
    pub target_timeline: Option<TargetTimeline>,
    pub exclusive: bool,
    pub backup: Option<String>,
    pub tablespace_map: Vec<(String, String)>,
    pub force: bool,
    pub parallelism: usize,
    pub archive_mode: ArchiveMode,
    /// OS user to own the restored files when running as root.
    pub owner: Option<String>,
    /// Config file the restore_command gives tidemark.
    pub config_path: PathBuf,
    /// The tidemark executable the restore_command runs (the caller knows it: a library user
    /// is not tidemark itself).
    pub tidemark_exe: PathBuf,
    /// Where the server's configuration from outside the data directory goes (Debian-style
    /// directory); None: into the restored data directory.
    pub config_dir: Option<PathBuf>,
    pub start: Option<StartOptions>,
}

#[derive(Debug, Clone)]
pub struct StartOptions {
    pub pg_bin: Option<PathBuf>,
    pub port: Option<u16>,
    pub socket_dir: Option<PathBuf>,
    pub timeout: Duration,
    /// The server's log (pg_ctl -l); None: `tidemark-restore-start.log` in the data directory.
    pub log_file: Option<PathBuf>,
    /// The socket directory is private to this start (a drill's): a missing pg_hba.conf may
    /// then be replaced by one that trusts local connections.
    pub private: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreOutcome {
    pub backup: String,
    pub pgdata: String,
    pub target: String,
    pub timeline: Option<u32>,
    pub files: usize,
    pub bytes: u64,
    pub download_ms: u64,
    /// Filled when --start waited for the server.
    pub started: Option<StartOutcome>,
    /// Where the server's configuration went and what this host lacks.
    pub configuration: config::ConfigReport,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StartOutcome {
    /// Timestamp of the last transaction replayed (PostgreSQL's pg_last_xact_replay_timestamp).
    pub restored_to_time: Option<DateTime<Utc>>,
    pub restored_to_lsn: Option<String>,
    pub timeline: Option<u32>,
    pub recovery_ms: u64,
    pub total_ms: u64,
    pub port: u16,
    pub socket_dir: String,
    /// The PostgreSQL binaries used (pg_ctl and friends).
    pub pg_bin: String,
    /// Settings given to the server on its command line instead of its files' values, and why.
    pub overrides: Vec<String>,
    /// The server's log.
    pub log_file: String,
}

/// Plans the restore, carries the plan out, and records it in the audit log.
pub async fn restore(
    cluster: &ClusterHandle,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, Error> {
    let started = Instant::now();
    let catalog = cluster.catalog().await?;
    let mut chosen = None;
    let result = match plan(cluster, &catalog, opts).await {
        Ok(plan) => {
            chosen = Some(plan.backup.clone());
            execute(cluster, &catalog, &plan, started).await
        }
        Err(e) => Err(e),
    };
    let mut event = Event::new("restore", Outcome::Ok)
        .detail(format!(
            "target {} into {}",
            opts.target.describe(),
            opts.pgdata.display()
        ))
        .outcome_of(&result);
    event.backup = chosen;
    audit::record(cluster, &catalog.info, &catalog.keyring, event).await;
    result
}

/// What was written, verified and placed.
struct Written {
    files: usize,
    bytes: u64,
    download_ms: u64,
    configuration: config::ConfigReport,
}

/// Carries out `plan`. `started`: when the restore began (its total time).
async fn execute(
    cluster: &ClusterHandle,
    catalog: &Catalog,
    plan: &RestorePlan,
    started: Instant,
) -> Result<RestoreOutcome, Error> {
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(backup = %plan.backup, target = %plan.target.describe(), timeline = plan.timeline, "restoring");
    owner::preflight_restore_command(plan)?;
    // Recorded before any byte of the backup is read, so even a killed restore leaves a trace.
    let event = Event::new("restore", Outcome::Started)
        .backup(plan.backup.clone())
        .detail(format!(
            "target {} into {}",
            plan.target.describe(),
            plan.pgdata.display()
        ));
    audit::record(cluster, &catalog.info, &catalog.keyring, event).await;

    // Refusals here leave the directories as they were: nothing of ours is in them yet.
    files::prepare_target(&plan.pgdata, plan.force)?;
    if let Some(d) = &plan.config_dir {
        files::prepare_config_dir(d, &plan.pgdata, plan.force)?;
    }
    let written = match write_restored(cluster, catalog, plan, started).await {
        Ok(w) => w,
        Err(e) => {
            // Never leave a half-restored directory (or tablespace) that could be started.
            files::remove_restored(plan);
            return Err(e);
        }
    };
    tracing::info!(backup = %plan.backup, files = written.files, bytes = written.bytes, ms = written.download_ms, "files restored and verified");
    let mut outcome = outcome(plan, written);
    if let Some(start) = &plan.start {
        let s =
            server::start_and_wait(cluster, plan, start, &outcome.configuration, started).await?;
        replayed_to_the_end(plan, &s)?;
        outcome.started = Some(s);
    }
    Ok(outcome)
}

/// The files, the configuration and the recovery settings, owned and durable.
async fn write_restored(
    cluster: &ClusterHandle,
    catalog: &Catalog,
    plan: &RestorePlan,
    started: Instant,
) -> Result<Written, Error> {
    let (files, bytes) =
        files::restore_files(cluster, &catalog.info, &catalog.keyring, plan).await?;
    let download_ms = started.elapsed().as_millis() as u64;
    let configuration = config::place(&plan.manifest, &plan.pgdata, plan.config_dir.as_deref())?;
    recovery::write_recovery_config(plan)?;
    if let Some(owner) = &plan.owner {
        owner::chown_restored(plan, owner)?;
    }
    // backup_label, recovery.signal and the settings must be as durable as the files:
    // without backup_label a crash-restarted copy would start from the wrong checkpoint.
    let mut roots = files::data_roots(plan);
    roots.extend(plan.config_dir.iter().cloned());
    files::sync_dirs(roots).await?;
    Ok(Written {
        files,
        bytes,
        download_ms,
        configuration,
    })
}

/// The outcome before any start; the configuration's problems become warnings.
fn outcome(plan: &RestorePlan, written: Written) -> RestoreOutcome {
    let configuration = written.configuration;
    let mut warnings = plan.warnings.clone();
    for m in &configuration.missing {
        tracing::warn!("configuration: {m}");
        warnings.push(format!("configuration: {m}"));
    }
    if !configuration.held {
        warnings.extend(
            configuration
                .notes
                .iter()
                .map(|n| format!("configuration: {n}")),
        );
    }
    RestoreOutcome {
        backup: plan.backup.clone(),
        pgdata: plan.pgdata.display().to_string(),
        target: plan.target.describe(),
        timeline: Some(plan.timeline),
        files: written.files,
        bytes: written.bytes,
        download_ms: written.download_ms,
        started: None,
        configuration,
        warnings,
    }
}

/// PostgreSQL ends recovery quietly at the first WAL file restore_command cannot deliver.
/// With no target, everything archived must have been replayed.
fn replayed_to_the_end(plan: &RestorePlan, s: &StartOutcome) -> Result<(), Error> {
    if plan.target != RecoveryTarget::Latest {
        return Ok(());
    }
    let reached: Option<Lsn> = s.restored_to_lsn.as_deref().and_then(|l| l.parse().ok());
    let expected: Option<Lsn> = plan.range.to_lsn.as_deref().and_then(|l| l.parse().ok());
    if let (Some(reached), Some(expected)) = (reached, expected)
        && reached < expected
    {
        return Err(Error::Recovery(format!(
            "recovery stopped at {reached}, before the end of the archived WAL ({expected}): \
                 a WAL file could not be fetched; the server at {} was promoted short of the archive's end",
            plan.pgdata.display()
        )));
    }
    Ok(())
}

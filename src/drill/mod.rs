//! `tidemark drill`: proves a backup restores. Restores into a scratch directory, starts
//! PostgreSQL privately (its own socket directory, no TCP), waits for the target, runs the
//! checks, records the result in the repository, stops the server and removes everything it
//! created — also when a step fails or the drill is interrupted.
//!
//! `target`: `--target` and what it resolves to; `checks`: one function per check of the
//! restored server; `log`: a failed drill's server log, kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::audit::{Event, Outcome};
use crate::cluster::{Catalog, ClusterHandle};
use crate::error::Error;
use crate::pg::wal::Lsn;
use crate::repo::layout;
use crate::restore::{
    self, ArchiveMode, RestoreOptions, RestoreOutcome, StartOptions, StartOutcome,
};

mod checks;
mod log;
mod target;

use checks::DrillServer;
use log::SERVER_LOG;
use target::Resolved;
pub use target::parse_target;

#[derive(Debug, Clone)]
pub enum DrillTarget {
    Latest,
    /// A uniformly random moment inside the restorable window.
    Random,
    Time(DateTime<chrono::FixedOffset>),
    /// The row-count point of a backup (the newest one that has one, or `--backup`): row
    /// counts are compared with those recorded then.
    Backup,
}

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub target: DrillTarget,
    pub backup: Option<String>,
    pub scratch_dir: PathBuf,
    pub config_path: PathBuf,
    /// The tidemark executable the drill server's restore_command runs.
    pub tidemark_exe: PathBuf,
    pub pg_bin: Option<PathBuf>,
    pub parallelism: usize,
    pub timeout: std::time::Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The evidence a drill leaves, in the repository (`<cluster>/drills/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillRecord {
    pub id: String,
    pub cluster: String,
    pub host: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub ok: bool,
    pub error: Option<String>,
    pub target: String,
    pub backup: Option<String>,
    pub restored_to_time: Option<DateTime<Utc>>,
    pub restored_to_lsn: Option<String>,
    pub timeline: Option<u32>,
    /// From the drill's start to the first accepted query, and its parts.
    pub rto_ms: Option<u64>,
    pub download_ms: Option<u64>,
    pub recovery_ms: Option<u64>,
    pub bytes_restored: Option<u64>,
    pub wal_segments_replayed: Option<u64>,
    pub checks: Vec<DrillCheck>,
    /// A failed drill's server log, kept on the drill's host (size-capped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_log: Option<String>,
    /// The same log in the repository, encrypted, beside the record (`drills/<id>.log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_log_object: Option<String>,
    /// Settings the drill's server got instead of its files' values, and configuration notes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = crate::pipeline::keys::random_bytes(&mut b);
    u64::from_le_bytes(b)
}

/// Runs one drill; the record is returned (and stored) whether it passed or not.
pub async fn drill(cluster: &ClusterHandle, opts: &DrillOptions) -> Result<DrillRecord, Error> {
    let started = Utc::now();
    let clock = Instant::now();
    let id = format!(
        "{}-{:04x}",
        started.format("%Y%m%dT%H%M%SZ"),
        random_u64() & 0xffff
    );
    let scratch = opts.scratch_dir.join(format!("tidemark-drill-{id}"));
    // Socket paths are limited to 107 bytes: a short directory of its own.
    let socket_dir = PathBuf::from(format!("/tmp/tdmd-{:08x}", random_u64() as u32));
    let mut record = DrillRecord::new(id.clone(), cluster, started);
    let outcome = {
        let run = run_drill(cluster, opts, &scratch, &socket_dir, &mut record, clock);
        tokio::select! {
            r = run => r,
            _ = shutdown_signal() => Err(Error::Recovery("drill interrupted".into())),
        }
    };
    // The server's log lives in the scratch directory (the server's user can write there);
    // a failed drill keeps it before the directory goes.
    let scratch_log = scratch.join(SERVER_LOG);
    let failed = outcome.is_err() || !record.checks.iter().all(|c| c.ok);
    let kept_log = if failed {
        log::keep_server_log(cluster, &id, &scratch_log)
    } else {
        None
    };
    // Whatever happened: no server, no directory left behind.
    cleanup(&scratch, &socket_dir);
    record.finished = Utc::now();
    record.conclude(
        outcome,
        &scratch_log,
        kept_log.as_ref().map(|(p, _)| p.as_path()),
    );
    if let Some((path, bytes)) = kept_log {
        record.server_log = Some(path.display().to_string());
        record.server_log_object = log::store_server_log(cluster, &id, bytes).await;
    }
    if record.error.is_none() && !record.ok {
        let failed: Vec<String> = record
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        record.error = Some(failed.join("; "));
    }
    store_record(cluster, &record).await?;
    audit(cluster, &record).await;
    Ok(record)
}

impl DrillRecord {
    fn new(id: String, cluster: &ClusterHandle, started: DateTime<Utc>) -> DrillRecord {
        DrillRecord {
            id,
            cluster: cluster.name.clone(),
            host: crate::host::hostname(),
            started,
            finished: started,
            ok: false,
            error: None,
            target: String::new(),
            backup: None,
            restored_to_time: None,
            restored_to_lsn: None,
            timeline: None,
            rto_ms: None,
            download_ms: None,
            recovery_ms: None,
            bytes_restored: None,
            wal_segments_replayed: None,
            checks: Vec::new(),
            server_log: None,
            server_log_object: None,
            overrides: Vec::new(),
        }
    }

    /// Passed when the run completed and every check passed. An error names the server log
    /// where it was kept (`kept_log`), not where it was (`scratch_log`, removed).
    fn conclude(
        &mut self,
        outcome: Result<(), Error>,
        scratch_log: &Path,
        kept_log: Option<&Path>,
    ) {
        match outcome {
            Ok(()) => self.ok = self.checks.iter().all(|c| c.ok),
            Err(e) => {
                self.ok = false;
                let mut msg = e.to_string();
                if let Some(path) = kept_log {
                    msg = msg.replace(
                        &scratch_log.display().to_string(),
                        &path.display().to_string(),
                    );
                }
                self.error = Some(msg);
            }
        }
    }
}

/// The record, as `drills/<id>.json` in the repository.
async fn store_record(cluster: &ClusterHandle, record: &DrillRecord) -> Result<(), Error> {
    cluster
        .repo
        .put_json(&layout::drill_record(&record.id), record)
        .await?;
    Ok(())
}

async fn audit(cluster: &ClusterHandle, record: &DrillRecord) {
    let Ok(info) = cluster.repo.read_info().await else {
        return;
    };
    let Ok(keyring) = cluster.keyring(&info).await else {
        return;
    };
    let mut event = Event::new(
        "drill",
        if record.ok {
            Outcome::Ok
        } else {
            Outcome::Failed
        },
    )
    .object(layout::drill_record(&record.id))
    .detail(format!("target {}", record.target));
    event.backup = record.backup.clone();
    if let Some(e) = &record.error {
        event = event.detail(format!("target {}: {e}", record.target));
    }
    crate::audit::record(cluster, &info, &keyring, event).await;
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Restores into `scratch`, starts the server privately in `socket_dir`, and runs the checks;
/// fills `record` as it goes (an interrupted drill keeps what was found).
async fn run_drill(
    cluster: &ClusterHandle,
    opts: &DrillOptions,
    scratch: &Path,
    socket_dir: &Path,
    record: &mut DrillRecord,
    clock: Instant,
) -> Result<(), Error> {
    let catalog = cluster.catalog().await?;
    let resolved = target::resolve(cluster, &catalog, opts).await?;
    record.target = resolved.target.describe();
    std::fs::create_dir_all(scratch)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", scratch.display())))?;
    std::fs::create_dir_all(socket_dir)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", socket_dir.display())))?;
    let ropts = restore_options(opts, &catalog, &resolved, scratch, socket_dir);
    if let Some(owner) = restore::effective_owner(&ropts)
        && restore::is_root()
    {
        let (uid, gid) = restore::user_ids(&owner)?;
        for d in [scratch, socket_dir] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(|e| Error::LocalIo(format!("{}: {e}", d.display())))?;
        }
    }
    let out = restore::restore(cluster, &ropts).await?;
    let started = record_restore(record, &catalog, &out, clock)?;
    let reached: Option<Lsn> = started
        .restored_to_lsn
        .as_deref()
        .and_then(|l| l.parse().ok());
    let archive_end = catalog
        .index
        .segments
        .values()
        .filter_map(|m| m.keys().next_back().copied())
        .max();
    record.checks.push(checks::target(
        &resolved.target,
        reached,
        started.restored_to_time,
        archive_end,
        catalog.info.wal_segment_size,
        resolved.expected_counts.as_ref(),
    ));
    let (user, db) = restore::user_and_db(cluster);
    let server = DrillServer {
        socket_dir,
        port: started.port,
        pg_bin: PathBuf::from(&started.pg_bin),
        user,
        db,
        restore: &ropts,
    };
    record.checks.push(checks::amcheck(&server)?);
    let expected = resolved.expected_counts.as_ref();
    if let Some(c) = checks::row_counts(cluster, &server, expected, &out.backup).await {
        record.checks.push(c);
    }
    for a in &cluster.config.drill.assert {
        record.checks.push(checks::assertion(a, &server).await);
    }
    Ok(())
}

/// A private restore into the scratch directory (tablespaces too), started on its own
/// socket, archive_mode off.
fn restore_options(
    opts: &DrillOptions,
    catalog: &Catalog,
    resolved: &Resolved,
    scratch: &Path,
    socket_dir: &Path,
) -> RestoreOptions {
    RestoreOptions {
        pgdata: scratch.join("pgdata"),
        target: resolved.target.clone(),
        target_timeline: None,
        exclusive: false,
        backup: resolved.backup.clone(),
        tablespace_map: catalog
            .backups
            .iter()
            .flat_map(|b| &b.tablespaces)
            .map(|t| {
                (
                    t.location.clone(),
                    scratch.join(format!("ts-{}", t.oid)).display().to_string(),
                )
            })
            .collect(),
        force: false,
        parallelism: opts.parallelism,
        archive_mode: ArchiveMode::Off,
        owner: None,
        config_path: opts.config_path.clone(),
        tidemark_exe: opts.tidemark_exe.clone(),
        config_dir: None,
        start: Some(StartOptions {
            pg_bin: opts.pg_bin.clone(),
            port: Some(5432),
            socket_dir: Some(socket_dir.to_path_buf()),
            timeout: opts.timeout,
            log_file: Some(scratch.join(SERVER_LOG)),
            private: true,
        }),
    }
}

/// What the restore reports goes into the record; returns the started server's outcome.
fn record_restore(
    record: &mut DrillRecord,
    catalog: &Catalog,
    out: &RestoreOutcome,
    clock: Instant,
) -> Result<StartOutcome, Error> {
    record.backup = Some(out.backup.clone());
    record.bytes_restored = Some(out.bytes);
    record.download_ms = Some(out.download_ms);
    let started = out
        .started
        .clone()
        .ok_or_else(|| Error::Internal("restore did not start the server".into()))?;
    record.overrides = started.overrides.clone();
    record.overrides.extend(
        out.warnings
            .iter()
            .filter(|w| w.starts_with("configuration:"))
            .cloned(),
    );
    record.recovery_ms = Some(started.recovery_ms);
    record.rto_ms = Some(clock.elapsed().as_millis() as u64);
    record.restored_to_time = started.restored_to_time;
    record.restored_to_lsn = started.restored_to_lsn.clone();
    record.timeline = started.timeline;
    let reached: Option<Lsn> = started
        .restored_to_lsn
        .as_deref()
        .and_then(|l| l.parse().ok());
    let ss = catalog.info.wal_segment_size;
    if let (Some(b), Some(r)) = (catalog.backups.iter().find(|b| b.id == out.backup), reached) {
        let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
        record.wal_segments_replayed = Some(r.0.saturating_sub(stop.0) / ss + 1);
    }
    Ok(started)
}

/// Stops the drill's server (if it runs) and removes its directories. SIGQUIT is PostgreSQL's
/// immediate shutdown (what `pg_ctl -m immediate` sends); a drill's copy needs no checkpoint.
fn cleanup(scratch: &Path, socket_dir: &Path) {
    let pgdata = scratch.join("pgdata");
    if restore::postmaster_running(&pgdata) {
        let pid = std::fs::read_to_string(pgdata.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid.filter(|p| *p > 1) {
            // SAFETY: kill(2) on the postmaster's pid, read from its own pid file.
            unsafe {
                libc::kill(pid, libc::SIGQUIT);
            }
            for _ in 0..150 {
                if !restore::postmaster_running(&pgdata) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
    let _ = std::fs::remove_dir_all(scratch);
    let _ = std::fs::remove_dir_all(socket_dir);
}

/// Past drills of the cluster, oldest first.
pub async fn history(cluster: &ClusterHandle) -> Result<Vec<DrillRecord>, Error> {
    let mut out = Vec::new();
    for m in cluster.repo.list(layout::drills_prefix()).await? {
        if !m.name.ends_with(".json") {
            continue; // a failed drill's server log
        }
        match cluster.repo.get_json::<DrillRecord>(&m.name, 1 << 20).await {
            Ok(Some(r)) => out.push(r),
            Ok(None) => {} // deleted meanwhile
            Err(crate::repo::RepoError::Corrupt(e)) => {
                tracing::warn!(object = %m.meta.key, error = %e, "unreadable drill record")
            }
            Err(e) => return Err(e.into()),
        }
    }
    out.sort_by_key(|a| a.started);
    Ok(out)
}

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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use chrono::{DateTime, FixedOffset, Utc};

use crate::audit::{self, Event, Outcome};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::parallel::run_bounded;
use crate::pg::wal::Lsn;
use crate::progress::Progress;
use crate::repo::manifest::BackupManifest;
use crate::repo::window::{ArchiveIndex, BackupRange, Window};
use crate::transfer;

pub mod config;

/// Where recovery should stop.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryTarget {
    Time(DateTime<FixedOffset>),
    Lsn(Lsn),
    Xid(String),
    Name(String),
    /// The end of the backup (recovery_target = 'immediate').
    Immediate,
    /// Replay all archived WAL.
    Latest,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetTimeline {
    Latest,
    Current,
    Id(u32),
}

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
    /// Config file and binary the restore_command runs.
    pub config_path: PathBuf,
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
    pub configuration: crate::restore_config::ConfigReport,
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

impl RecoveryTarget {
    pub fn describe(&self) -> String {
        match self {
            RecoveryTarget::Time(t) => format!("time {}", t.format("%Y-%m-%d %H:%M:%S%.f%:z")),
            RecoveryTarget::Lsn(l) => format!("lsn {l}"),
            RecoveryTarget::Xid(x) => format!("xid {x}"),
            RecoveryTarget::Name(n) => format!("restore point {n:?}"),
            RecoveryTarget::Immediate => "end of the backup (immediate)".into(),
            RecoveryTarget::Latest => "end of the archived WAL".into(),
        }
    }
}

/// Parses a recovery target time. A time zone is required: PostgreSQL would otherwise read it
/// in the restored server's zone, which the operator may not know during an incident.
pub fn parse_target_time(s: &str) -> Result<DateTime<FixedOffset>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
        "%Y-%m-%d %H:%M:%S %#z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Ok(t);
        }
    }
    Err(format!(
        "invalid --target-time {s:?}: use 'YYYY-MM-DD HH:MM:SS[.ffffff]+TZ', e.g. '2026-11-27 09:41:07+00'"
    ))
}

fn print_windows(windows: &[Window]) -> String {
    if windows.is_empty() {
        return "nothing is restorable (no complete backup with its WAL)".into();
    }
    windows
        .iter()
        .map(|w| {
            format!(
                "timeline {}: {} .. {}",
                w.timeline,
                w.from.format("%Y-%m-%d %H:%M:%S%.3f+00"),
                w.to.format("%Y-%m-%d %H:%M:%S%.3f+00")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Chooses the backup and target timeline, or explains why the target cannot be reached.
fn choose(
    backups: &[BackupManifest],
    idx: &ArchiveIndex,
    ranges: &[BackupRange],
    opts: &RestoreOptions,
) -> Result<(BackupManifest, u32, BackupRange, Vec<String>), Error> {
    let windows = crate::repo::window::windows(ranges);
    let refuse = |why: String| {
        Error::Recovery(format!(
            "{why}; the restorable window is {}",
            print_windows(&windows)
        ))
    };
    if backups.is_empty() {
        return Err(Error::NotFound(
            "no complete backup in the repository: run `tidemark backup` first".into(),
        ));
    }
    let timeline_for = |b: &BackupManifest| -> Result<u32, Error> {
        let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
        match &opts.target_timeline {
            None | Some(TargetTimeline::Latest) => Ok(idx.latest_timeline(b.timeline, stop)),
            Some(TargetTimeline::Current) => Ok(b.timeline),
            Some(TargetTimeline::Id(t)) => {
                if idx.reachable(b.timeline, stop, *t) {
                    Ok(*t)
                } else {
                    Err(Error::Recovery(format!(
                        "timeline {t} does not descend from backup {}'s timeline {} after its end",
                        b.id, b.timeline
                    )))
                }
            }
        }
    };
    let candidates: Vec<&BackupManifest> = match &opts.backup {
        Some(id) => vec![backups.iter().find(|b| &b.id == id).ok_or_else(|| {
            Error::NotFound(format!(
                "backup {id} is not in the repository (complete backups: {})",
                backups
                    .iter()
                    .map(|b| b.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?],
        None => backups.iter().rev().collect(),
    };
    let mut last_reason = String::new();
    for b in candidates {
        let tli = timeline_for(b)?;
        let range = ranges
            .iter()
            .find(|r| r.backup == b.id && r.timeline == tli)
            .cloned()
            .unwrap_or_else(|| idx.range(b, tli));
        if !range.restorable {
            last_reason = format!(
                "backup {}'s WAL ({} .. {}) is not complete in the archive",
                b.id, b.wal_start, b.wal_stop
            );
            continue;
        }
        let to_lsn: Lsn = range
            .to_lsn
            .as_deref()
            .unwrap_or("0/0")
            .parse()
            .unwrap_or_default();
        let mut warnings = Vec::new();
        let ok = match &opts.target {
            RecoveryTarget::Time(t) => {
                let t = t.with_timezone(&Utc);
                if t < b.stop_time {
                    last_reason = format!(
                        "target time is before the end of backup {} ({})",
                        b.id, b.stop_time
                    );
                    false
                } else if range.to_time.is_some_and(|end| t >= end) {
                    last_reason = format!(
                        "target time is not before the last transaction in the archived WAL reachable from backup {} \
                         (PostgreSQL stops a time target only at a later commit; restore without a target to replay everything)",
                        b.id
                    );
                    false
                } else {
                    true
                }
            }
            RecoveryTarget::Lsn(l) => {
                let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
                if *l < stop {
                    last_reason = format!(
                        "target LSN {l} is before the end of backup {} ({stop})",
                        b.id
                    );
                    false
                } else if *l > to_lsn {
                    last_reason = format!(
                        "target LSN {l} is beyond the archived WAL reachable from backup {} (ends at {to_lsn})",
                        b.id
                    );
                    false
                } else {
                    true
                }
            }
            _ => true,
        };
        if !ok {
            if opts.backup.is_some() {
                return Err(refuse(last_reason));
            }
            continue;
        }
        if let Some(gap) = &range.gap_at {
            warnings.push(format!(
                "WAL segment {gap} is missing: recovery cannot go past {}",
                range.to_lsn.as_deref().unwrap_or("?")
            ));
        }
        return Ok((b.clone(), tli, range, warnings));
    }
    Err(refuse(format!(
        "no backup can reach {}: {last_reason}",
        opts.target.describe()
    )))
}

pub async fn restore(
    cluster: &ClusterHandle,
    opts: &RestoreOptions,
) -> Result<RestoreOutcome, Error> {
    let started = Instant::now();
    let catalog = cluster.catalog().await?;
    let mut chosen = None;
    let result = restore_from(cluster, &catalog, opts, started, &mut chosen).await;
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

async fn restore_from(
    cluster: &ClusterHandle,
    catalog: &crate::cluster::Catalog,
    opts: &RestoreOptions,
    started: Instant,
    chosen: &mut Option<String>,
) -> Result<RestoreOutcome, Error> {
    let (info, keyring, backups, idx, ranges) = (
        &catalog.info,
        &catalog.keyring,
        &catalog.backups,
        &catalog.index,
        &catalog.ranges,
    );
    // A restore point or transaction id says nothing of where it is: find it in the WAL, so
    // the backup is the newest one that ended before it (as for times and LSNs).
    let located;
    let opts = match (&opts.target, &opts.backup) {
        (RecoveryTarget::Name(_) | RecoveryTarget::Xid(_), None) => {
            let id = locate_backup_for_target(cluster, catalog, opts).await?;
            located = RestoreOptions {
                backup: Some(id),
                ..opts.clone()
            };
            &located
        }
        _ => opts,
    };
    let (backup, timeline, range, warnings) = choose(backups, idx, ranges, opts)?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(backup = %backup.id, target = %opts.target.describe(), timeline, "restoring");
    *chosen = Some(backup.id.clone());
    preflight_restore_command(cluster, opts, &backup)?;
    // Recorded before any byte of the backup is read, so even a killed restore leaves a trace.
    let event = Event::new("restore", Outcome::Started)
        .backup(backup.id.clone())
        .detail(format!(
            "target {} into {}",
            opts.target.describe(),
            opts.pgdata.display()
        ));
    audit::record(cluster, info, keyring, event).await;

    prepare_target(&opts.pgdata, opts.force)?;
    if let Some(d) = &opts.config_dir {
        prepare_config_dir(d, &opts.pgdata, opts.force)?;
    }
    let mut result = restore_files(cluster, info, keyring, &backup, opts).await;
    let download_ms = started.elapsed().as_millis() as u64;
    let mut configuration = crate::restore_config::ConfigReport::default();
    if result.is_ok() {
        match crate::restore_config::place(&backup, &opts.pgdata, opts.config_dir.as_deref()) {
            Ok(r) => configuration = r,
            Err(e) => result = Err(e),
        }
    }
    if result.is_ok() {
        result = write_recovery_config(cluster, &backup, timeline, opts).and(result);
    }
    if result.is_ok()
        && let Some(owner) = effective_owner(opts)
    {
        result = chown_tree(&opts.pgdata, &owner, &backup, opts).and(result);
        if let (Ok(_), Some(d)) = (&result, &opts.config_dir) {
            result = user_ids(&owner)
                .and_then(|(uid, gid)| {
                    chown_all(d, uid, gid)
                        .map_err(|e| Error::LocalIo(format!("chown {}: {e}", d.display())))
                })
                .and(result);
        }
    }
    if result.is_ok() {
        // backup_label, recovery.signal and the settings must be as durable as the files:
        // without backup_label a crash-restarted copy would start from the wrong checkpoint.
        let mut roots = vec![opts.pgdata.clone()];
        if let Ok(map) = PathMap::new(&backup, opts) {
            roots.extend(map.tablespaces.values().cloned());
        }
        roots.extend(opts.config_dir.iter().cloned());
        let synced =
            tokio::task::spawn_blocking(move || roots.iter().try_for_each(|r| sync_filesystem(r)))
                .await
                .map_err(|e| Error::Internal(e.to_string()))
                .and_then(|r| {
                    r.map_err(|e| Error::LocalIo(format!("syncing the restored files: {e}")))
                });
        result = synced.and(result);
    }
    let (files, bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            // Never leave a half-restored directory (or tablespace) that could be started.
            clear_dir(&opts.pgdata);
            if let Some(d) = &opts.config_dir {
                clear_dir(d);
            }
            if let Ok(map) = PathMap::new(&backup, opts) {
                for t in map.tablespaces.values() {
                    clear_dir(t);
                }
            }
            return Err(e);
        }
    };
    tracing::info!(backup = %backup.id, files, bytes, ms = download_ms, "files restored and verified");
    let mut warnings = warnings;
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
    let mut outcome = RestoreOutcome {
        backup: backup.id.clone(),
        pgdata: opts.pgdata.display().to_string(),
        target: opts.target.describe(),
        timeline: Some(timeline),
        files,
        bytes,
        download_ms,
        started: None,
        configuration,
        warnings,
    };
    if let Some(start) = &opts.start {
        let s = start_and_wait(cluster, &backup, opts, start, &mut outcome, started).await?;
        // PostgreSQL ends recovery quietly at the first WAL file restore_command cannot
        // deliver. With no target, everything archived must have been replayed.
        if opts.target == RecoveryTarget::Latest {
            let reached: Option<Lsn> = s.restored_to_lsn.as_deref().and_then(|l| l.parse().ok());
            let expected: Option<Lsn> = range.to_lsn.as_deref().and_then(|l| l.parse().ok());
            if let (Some(reached), Some(expected)) = (reached, expected)
                && reached < expected
            {
                return Err(Error::Recovery(format!(
                    "recovery stopped at {reached}, before the end of the archived WAL ({expected}): \
                         a WAL file could not be fetched; the server at {} was promoted short of the archive's end",
                    opts.pgdata.display()
                )));
            }
        }
        outcome.started = Some(s);
    }
    Ok(outcome)
}

/// For a restore point or transaction id target: the newest backup after whose end the target
/// occurs in the archived WAL. Scans WAL newest backup first, each segment once, from the
/// backup's end to where the previous (newer) scan began; stops at the first backup that works.
async fn locate_backup_for_target(
    cluster: &ClusterHandle,
    catalog: &crate::cluster::Catalog,
    opts: &RestoreOptions,
) -> Result<String, Error> {
    let ss = catalog.info.wal_segment_size;
    let xid = match &opts.target {
        RecoveryTarget::Xid(x) => Some(
            x.parse::<u64>()
                .map_err(|_| Error::Usage(format!("--target-xid {x:?}: not a transaction id")))?
                as u32,
        ),
        _ => None,
    };
    let mut candidates: Vec<&BackupManifest> = catalog.backups.iter().collect();
    candidates.sort_by_key(|b| std::cmp::Reverse(b.stop_lsn.parse::<Lsn>().unwrap_or_default()));
    let mut upper: Option<u64> = None; // segments at or above this were scanned already
    for b in candidates {
        let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
        let tli = match &opts.target_timeline {
            Some(TargetTimeline::Id(t)) => *t,
            Some(TargetTimeline::Current) => b.timeline,
            _ => catalog.index.latest_timeline(b.timeline, stop),
        };
        let Some(range) = catalog
            .ranges
            .iter()
            .find(|r| r.backup == b.id && r.timeline == tli)
        else {
            continue;
        };
        let Some(&(_, last)) = range.run_tail.last().filter(|_| range.restorable) else {
            continue;
        };
        let first = crate::pg::wal::segment_of(stop, ss);
        // The newer backup's first segment is scanned again: it may hold the target before
        // that backup's end.
        let end = upper.map_or(last, |u| u.min(last));
        for segno in first..=end {
            let Some(file_tli) = catalog.index.segment_timeline(tli, segno) else {
                break; // a gap: nothing beyond is reachable from this backup
            };
            let name = format!(
                "wal/{file_tli:08X}/{}",
                crate::pg::wal::segment_name(file_tli, segno, ss)
            );
            let obj = cluster.repo.object(&catalog.info, name);
            let mut scanner = crate::pg::walscan::WalScanner::new(Lsn(segno * ss));
            if let Some(x) = xid {
                scanner = scanner.find_xid(x);
            }
            let (_, scanner) =
                transfer::get(cluster.repo.store(), &obj, &catalog.keyring, false, scanner).await?;
            let scan = scanner.finish();
            let found = match &opts.target {
                RecoveryTarget::Name(n) => scan
                    .restore_points
                    .iter()
                    .any(|(name, lsn)| name == n && *lsn >= stop),
                _ => scan.xid_commit.is_some_and(|lsn| lsn >= stop),
            };
            if found {
                tracing::info!(backup = %b.id, segment = segno, "found the target in the archived WAL");
                return Ok(b.id.clone());
            }
        }
        upper = Some(first);
    }
    Err(Error::Recovery(format!(
        "{} does not occur in the archived WAL after the end of any backup",
        opts.target.describe()
    )))
}

/// The restored server runs restore_command as its owner. When that is another user (restore
/// run as root), check before downloading anything that this user can run tidemark with this
/// config and key: otherwise every wal-fetch would fail and PostgreSQL would end recovery
/// early, quietly.
fn preflight_restore_command(
    cluster: &ClusterHandle,
    opts: &RestoreOptions,
    backup: &BackupManifest,
) -> Result<(), Error> {
    let Some(owner) = effective_owner(opts) else {
        return Ok(());
    };
    if !is_root() {
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("own path: {e}")))?;
    let config = std::path::absolute(&opts.config_path).unwrap_or(opts.config_path.clone());
    // Fetch the backup's first WAL segment as that user into a scratch directory it owns:
    // this exercises the binary, the config, the key file and the store.
    let (uid, gid) = user_ids(&owner)?;
    let mut rnd = [0u8; 6];
    crate::pipeline::keys::random_bytes(&mut rnd)?;
    let scratch = std::env::temp_dir().join(format!("tidemark-preflight-{}", hex::encode(rnd)));
    std::fs::create_dir(&scratch)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", scratch.display())))?;
    let _cleanup = ScratchDir(scratch.clone());
    std::os::unix::fs::chown(&scratch, Some(uid), Some(gid))
        .map_err(|e| Error::LocalIo(format!("{}: {e}", scratch.display())))?;
    let out = std::process::Command::new("runuser")
        .arg("-u")
        .arg(&owner)
        .arg("--")
        .arg(&exe)
        .arg("--config")
        .arg(&config)
        .arg("--cluster")
        .arg(&cluster.name)
        .arg("wal-fetch")
        .arg(&backup.wal_start)
        .arg(scratch.join("probe"))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::LocalIo(format!("runuser: {e}")))?;
    match out.status.code() {
        Some(0) => Ok(()),
        _ => Err(Error::Usage(format!(
            "the restored server would run restore_command as {owner}, and as {owner} \
             `{} --config {} wal-fetch` fails: {} (make the binary, the config and the key file \
             readable by {owner}, or pass --owner)",
            exe.display(),
            config.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

fn prepare_target(pgdata: &Path, force: bool) -> Result<(), Error> {
    match std::fs::read_dir(pgdata) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                if !force {
                    return Err(Error::Usage(format!(
                        "{} is not empty: restore into an empty or new directory (or pass --force to replace its contents)",
                        pgdata.display()
                    )));
                }
                if pgdata.join("postmaster.pid").exists() {
                    return Err(Error::Usage(format!(
                        "{} has a postmaster.pid: stop the server first; --force does not replace a running cluster",
                        pgdata.display()
                    )));
                }
                clear_dir(pgdata);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(pgdata)
                .map_err(|e| Error::LocalIo(format!("{}: {e}", pgdata.display())))?;
        }
        Err(e) => return Err(Error::LocalIo(format!("{}: {e}", pgdata.display()))),
    }
    std::fs::set_permissions(pgdata, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::LocalIo(format!("{}: {e}", pgdata.display())))
}

/// `--config-dir` must be new or empty (or `--force`), and not inside the data directory.
fn prepare_config_dir(dir: &Path, pgdata: &Path, force: bool) -> Result<(), Error> {
    let abs = std::path::absolute(dir).unwrap_or(dir.to_path_buf());
    let data = std::path::absolute(pgdata).unwrap_or(pgdata.to_path_buf());
    if crate::pg::conffiles::is_within(&abs, &data) || crate::pg::conffiles::is_within(&data, &abs)
    {
        return Err(Error::Usage(format!(
            "--config-dir {} and --pgdata {} must not contain each other",
            dir.display(),
            pgdata.display()
        )));
    }
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                if !force {
                    return Err(Error::Usage(format!(
                        "--config-dir {} is not empty: give a new or empty directory (or --force to replace its contents)",
                        dir.display()
                    )));
                }
                clear_dir(dir);
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(dir)
            .map_err(|e| Error::LocalIo(format!("{}: {e}", dir.display()))),
        Err(e) => Err(Error::LocalIo(format!("{}: {e}", dir.display()))),
    }
}

/// Removes the contents of a directory we restored into (not the directory itself).
fn clear_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Maps a manifest path to where it goes: tablespace contents under their (remapped) location.
struct PathMap {
    pgdata: PathBuf,
    tablespaces: HashMap<u32, PathBuf>,
}

impl PathMap {
    fn new(backup: &BackupManifest, opts: &RestoreOptions) -> Result<PathMap, Error> {
        let mut tablespaces = HashMap::new();
        for t in &backup.tablespaces {
            let mut loc = t.location.clone();
            for (old, new) in &opts.tablespace_map {
                if *old == loc {
                    loc = new.clone();
                }
            }
            tablespaces.insert(t.oid, PathBuf::from(loc));
        }
        Ok(PathMap {
            pgdata: opts.pgdata.clone(),
            tablespaces,
        })
    }

    fn resolve(&self, path: &str) -> PathBuf {
        if let Some(rest) = path.strip_prefix("pg_tblspc/") {
            let (oid, sub) = rest.split_once('/').unwrap_or((rest, ""));
            if let Some(loc) = oid
                .parse::<u32>()
                .ok()
                .and_then(|o| self.tablespaces.get(&o))
            {
                return if sub.is_empty() {
                    loc.clone()
                } else {
                    loc.join(sub)
                };
            }
        }
        self.pgdata.join(path)
    }
}

async fn restore_files(
    cluster: &ClusterHandle,
    info: &crate::repo::ClusterInfo,
    keyring: &Arc<crate::pipeline::Keyring>,
    backup: &BackupManifest,
    opts: &RestoreOptions,
) -> Result<(usize, u64), Error> {
    let map = Arc::new(PathMap::new(backup, opts)?);
    let phase = Instant::now();
    // Directories (tablespace locations must be empty or new), then every file at its size.
    for t in map.tablespaces.values() {
        if let Ok(mut rd) = std::fs::read_dir(t)
            && rd.next().is_some()
            && !opts.force
        {
            return Err(Error::Usage(format!(
                "tablespace location {} is not empty: map it elsewhere with --tablespace-map OLD=NEW",
                t.display()
            )));
        }
        std::fs::create_dir_all(t).map_err(|e| Error::LocalIo(format!("{}: {e}", t.display())))?;
        std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::LocalIo(format!("{}: {e}", t.display())))?;
    }
    for d in &backup.directories {
        if let Some(oid) = d
            .path
            .strip_prefix("pg_tblspc/")
            .filter(|r| !r.contains('/'))
        {
            // The link itself: pg_tblspc/<oid> -> location.
            if let Some(loc) = oid
                .parse::<u32>()
                .ok()
                .and_then(|o| map.tablespaces.get(&o))
            {
                let link = opts.pgdata.join(&d.path);
                std::os::unix::fs::symlink(loc, &link)
                    .map_err(|e| Error::LocalIo(format!("{}: {e}", link.display())))?;
                continue;
            }
        }
        let p = map.resolve(&d.path);
        std::fs::create_dir_all(&p).map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(dir_mode(d.mode)))
            .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
    }
    let mut by_pack: HashMap<u32, Vec<ExtentTarget>> = HashMap::new();
    let mut total = 0u64;
    for f in &backup.files {
        let p = map.resolve(&f.path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
        file.set_len(f.size)
            .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(file_mode(f.mode)))
            .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
        let covered: u64 = f.extents.iter().map(|e| e.length).sum();
        if covered != f.size {
            return Err(Error::Integrity(format!(
                "manifest of backup {}: extents of {} cover {covered} of {} bytes",
                backup.id, f.path, f.size
            )));
        }
        for e in &f.extents {
            total += e.length;
            by_pack.entry(e.pack).or_default().push(ExtentTarget {
                manifest_path: f.path.clone(),
                path: p.clone(),
                pack_offset: e.pack_offset,
                file_offset: e.file_offset,
                length: e.length,
                sha256: e.sha256.clone(),
            });
        }
    }
    // The configuration from outside the data directory: staged inside it, verified like
    // every file, placed by restore_config afterwards.
    if let Some(conf) = &backup.configuration {
        let staging = opts.pgdata.join(crate::restore_config::STAGING);
        if !conf.files.is_empty() {
            std::fs::create_dir(&staging)
                .map_err(|e| Error::LocalIo(format!("{}: {e}", staging.display())))?;
        }
        for (i, f) in conf.files.iter().enumerate() {
            let p = crate::restore_config::staging_path(&opts.pgdata, i);
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
            file.set_len(f.size)
                .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
            let covered: u64 = f.extents.iter().map(|e| e.length).sum();
            if covered != f.size {
                return Err(Error::Integrity(format!(
                    "manifest of backup {}: extents of {} cover {covered} of {} bytes",
                    backup.id, f.source, f.size
                )));
            }
            for e in &f.extents {
                total += e.length;
                by_pack.entry(e.pack).or_default().push(ExtentTarget {
                    manifest_path: f.source.clone(),
                    path: p.clone(),
                    pack_offset: e.pack_offset,
                    file_offset: e.file_offset,
                    length: e.length,
                    sha256: e.sha256.clone(),
                });
            }
        }
    }
    tracing::debug!(
        ms = phase.elapsed().as_millis() as u64,
        "created directories and files"
    );
    let phase = Instant::now();
    let progress = Progress::start("restore", total);
    let mut packs: Vec<(u32, Vec<ExtentTarget>)> = by_pack.into_iter().collect();
    packs.sort_by_key(|(id, _)| *id);
    let jobs = packs.into_iter().map(|(pack_id, mut extents)| {
        extents.sort_by_key(|e| e.pack_offset);
        let store = cluster.repo.store().clone();
        let obj = cluster
            .repo
            .object(info, BackupManifest::pack_name(&backup.id, pack_id));
        let keyring = keyring.clone();
        let counter = progress.counter();
        let backup_id = backup.id.clone();
        async move {
            // A stream that breaks mid-pack (the store's requests are retried, a broken
            // download is not) is fetched again whole: extents are rewritten at their offsets
            // and re-verified, so a retry cannot mix old and new bytes unchecked.
            let mut attempt = 0;
            let splitter = loop {
                attempt += 1;
                let splitter = PackSplitter::new(extents.clone(), counter.clone());
                match transfer::get(&store, &obj, &keyring, false, splitter).await {
                    Ok((_, s)) => break s,
                    Err(transfer::TransferError::Store(e)) if e.is_retryable() && attempt < 3 => {
                        tracing::warn!(pack = pack_id, attempt, error = %e, "pack download failed, retrying");
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            splitter.finish().map_err(|e| {
                Error::Integrity(format!(
                    "backup {backup_id}, pack {pack_id} ({}): {e}",
                    obj.key
                ))
            })
        }
    });
    let done = run_bounded(jobs, opts.parallelism).await;
    progress.finish().await;
    done?;
    // Durability of the restored tree before it is handed to PostgreSQL.
    let root = opts.pgdata.clone();
    tracing::debug!(
        ms = phase.elapsed().as_millis() as u64,
        "downloaded and verified"
    );
    let phase = Instant::now();
    let mut roots = vec![root];
    roots.extend(map.tablespaces.values().cloned());
    tokio::task::spawn_blocking(move || roots.iter().try_for_each(|r| sync_filesystem(r)))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::LocalIo(format!("syncing the restored files: {e}")))?;
    tracing::debug!(ms = phase.elapsed().as_millis() as u64, "synced");
    Ok((backup.files.len(), total))
}

fn dir_mode(m: u32) -> u32 {
    if m & 0o050 == 0o050 { 0o750 } else { 0o700 }
}

fn file_mode(m: u32) -> u32 {
    if m & 0o040 != 0 { 0o640 } else { 0o600 }
}

/// Makes everything written under `dir` durable: one syncfs(2) of its filesystem (what
/// PostgreSQL's recovery_init_sync_method = syncfs does), or, where syncfs fails, an fsync of
/// every file and directory.
fn sync_filesystem(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir)?;
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open for the call.
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    tracing::debug!(error = %io::Error::last_os_error(), "syncfs failed; fsyncing file by file");
    sync_tree(dir)?;
    Ok(())
}

fn sync_tree(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            sync_tree(&e.path())?;
        } else if t.is_file() {
            File::open(e.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

#[derive(Debug, Clone)]
struct ExtentTarget {
    manifest_path: String,
    path: PathBuf,
    pack_offset: u64,
    file_offset: u64,
    length: u64,
    sha256: String,
}

/// Receives a pack's decoded content and writes each extent into its file at its offset,
/// checking each extent's SHA-256 against the manifest.
struct PackSplitter {
    extents: Vec<ExtentTarget>,
    idx: usize,
    pos: u64,
    done_in_extent: u64,
    file: Option<File>,
    hasher: Option<digest::Context>,
    progress: Arc<AtomicU64>,
}

impl PackSplitter {
    fn new(extents: Vec<ExtentTarget>, progress: Arc<AtomicU64>) -> PackSplitter {
        PackSplitter {
            extents,
            idx: 0,
            pos: 0,
            done_in_extent: 0,
            file: None,
            hasher: None,
            progress,
        }
    }

    fn finish(self) -> Result<(), String> {
        if self.idx < self.extents.len() {
            return Err(format!(
                "pack ended before the extent of {} at pack offset {}",
                self.extents[self.idx].manifest_path, self.extents[self.idx].pack_offset
            ));
        }
        Ok(())
    }
}

impl Write for PackSplitter {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            let Some(ext) = self.extents.get(self.idx) else {
                // Bytes the manifest does not account for: other files' extents in the same pack
                // are not expected, so this is a mismatch.
                return Err(io::Error::other(
                    "pack holds more bytes than the manifest lists",
                ));
            };
            if self.pos < ext.pack_offset {
                // Skip bytes no restored file needs (cannot happen with tidemark's packs).
                let skip = (ext.pack_offset - self.pos).min(data.len() as u64) as usize;
                data = &data[skip..];
                self.pos += skip as u64;
                continue;
            }
            if self.file.is_none() {
                self.file = Some(
                    OpenOptions::new()
                        .write(true)
                        .open(&ext.path)
                        .map_err(|e| {
                            io::Error::new(e.kind(), format!("{}: {e}", ext.path.display()))
                        })?,
                );
                self.hasher = Some(digest::Context::new(&digest::SHA256));
                self.done_in_extent = 0;
            }
            let take = ((ext.length - self.done_in_extent) as usize).min(data.len());
            if let Some(f) = &self.file {
                f.write_all_at(&data[..take], ext.file_offset + self.done_in_extent)?;
            }
            if let Some(h) = self.hasher.as_mut() {
                h.update(&data[..take]);
            }
            self.done_in_extent += take as u64;
            self.pos += take as u64;
            self.progress.fetch_add(take as u64, Ordering::Relaxed);
            data = &data[take..];
            if self.done_in_extent == ext.length {
                let got = self
                    .hasher
                    .take()
                    .map(|h| hex::encode(h.finish()))
                    .unwrap_or_default();
                if got != ext.sha256 {
                    return Err(io::Error::other(format!(
                        "{}: checksum mismatch at offset {} ({} bytes): the backup is damaged",
                        ext.manifest_path, ext.file_offset, ext.length
                    )));
                }
                self.file = None;
                self.idx += 1;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Settings tidemark owns in postgresql.auto.conf; earlier values are removed first, so a
/// backup of a restored cluster does not carry an old target into the next restore.
const RECOVERY_KEYS: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "archive_mode",
];

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-=:".contains(&b))
    {
        s.to_string()
    } else {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('$', "\\$")
                .replace('`', "\\`")
        )
    }
}

fn write_recovery_config(
    cluster: &ClusterHandle,
    backup: &BackupManifest,
    timeline: u32,
    opts: &RestoreOptions,
) -> Result<(), Error> {
    let io_err = |p: &Path, e: io::Error| Error::LocalIo(format!("{}: {e}", p.display()));
    let label = opts.pgdata.join("backup_label");
    std::fs::write(&label, &backup.backup_label).map_err(|e| io_err(&label, e))?;
    std::fs::set_permissions(&label, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err(&label, e))?;

    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("own path: {e}")))?;
    let config = std::path::absolute(&opts.config_path).unwrap_or(opts.config_path.clone());
    let restore_command = format!(
        "{} --config {} --cluster {} wal-fetch %f %p",
        shell_quote(&exe.display().to_string()),
        shell_quote(&config.display().to_string()),
        shell_quote(&cluster.name)
    );
    let mut lines = vec![
        format!(
            "# recovery settings written by tidemark restore of backup {} at {}",
            backup.id,
            Utc::now().to_rfc3339()
        ),
        format!("restore_command = {}", quote(&restore_command)),
    ];
    match &opts.target {
        RecoveryTarget::Time(t) => lines.push(format!(
            "recovery_target_time = {}",
            quote(&t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string())
        )),
        RecoveryTarget::Lsn(l) => {
            lines.push(format!("recovery_target_lsn = {}", quote(&l.to_string())))
        }
        RecoveryTarget::Xid(x) => lines.push(format!("recovery_target_xid = {}", quote(x))),
        RecoveryTarget::Name(n) => lines.push(format!("recovery_target_name = {}", quote(n))),
        RecoveryTarget::Immediate => lines.push("recovery_target = 'immediate'".into()),
        RecoveryTarget::Latest => {}
    }
    if matches!(
        opts.target,
        RecoveryTarget::Time(_) | RecoveryTarget::Lsn(_) | RecoveryTarget::Xid(_)
    ) {
        lines.push(format!("recovery_target_inclusive = {}", !opts.exclusive));
    }
    lines.push(format!(
        "recovery_target_timeline = {}",
        quote(&timeline.to_string())
    ));
    lines.push("recovery_target_action = 'promote'".into());
    if opts.archive_mode == ArchiveMode::Off {
        lines.push("archive_mode = 'off'".into());
    }
    let auto = opts.pgdata.join("postgresql.auto.conf");
    // Missing is fine (nothing to keep); unreadable is not: rewriting it would drop the
    // cluster's own settings.
    let existing = match std::fs::read_to_string(&auto) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&auto, e)),
    };
    let kept: Vec<&str> = existing
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            !RECOVERY_KEYS.contains(&key)
                && !l.starts_with("# recovery settings written by tidemark")
        })
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(&lines.join("\n"));
    text.push('\n');
    std::fs::write(&auto, text).map_err(|e| io_err(&auto, e))?;
    std::fs::set_permissions(&auto, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err(&auto, e))?;
    let signal = opts.pgdata.join("recovery.signal");
    File::create(&signal).map_err(|e| io_err(&signal, e))?;
    std::fs::set_permissions(&signal, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err(&signal, e))?;
    Ok(())
}

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

pub(crate) fn effective_owner(opts: &RestoreOptions) -> Option<String> {
    match &opts.owner {
        Some(o) => Some(o.clone()),
        None if is_root() => Some("postgres".into()),
        None => None,
    }
}

pub(crate) fn user_ids(user: &str) -> Result<(u32, u32), Error> {
    let out = std::process::Command::new("id")
        .arg("-u")
        .arg(user)
        .output()
        .map_err(|e| Error::LocalIo(format!("id: {e}")))?;
    let gout = std::process::Command::new("id")
        .arg("-g")
        .arg(user)
        .output()
        .map_err(|e| Error::LocalIo(format!("id: {e}")))?;
    if !out.status.success() || !gout.status.success() {
        return Err(Error::Usage(format!("--owner {user}: no such OS user")));
    }
    let parse = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).trim().parse::<u32>();
    match (parse(&out), parse(&gout)) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(Error::Usage(format!("--owner {user}: cannot read its ids"))),
    }
}

fn chown_tree(
    pgdata: &Path,
    owner: &str,
    backup: &BackupManifest,
    opts: &RestoreOptions,
) -> Result<(), Error> {
    let (uid, gid) = user_ids(owner)?;
    chown_all(pgdata, uid, gid)
        .map_err(|e| Error::LocalIo(format!("chown {}: {e}", pgdata.display())))?;
    let map = PathMap::new(backup, opts)?;
    for loc in map.tablespaces.values() {
        chown_all(loc, uid, gid)
            .map_err(|e| Error::LocalIo(format!("chown {}: {e}", loc.display())))?;
    }
    Ok(())
}

/// lchown of a tree (symlinks themselves, never their targets).
fn chown_all(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(p)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_all(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Removes a scratch directory when dropped.
struct ScratchDir(PathBuf);
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Finds pg_ctl for the backup's PostgreSQL major version.
fn find_pg_bin(start: &StartOptions, backup: &BackupManifest) -> Result<PathBuf, Error> {
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

async fn start_and_wait(
    cluster: &ClusterHandle,
    backup: &BackupManifest,
    opts: &RestoreOptions,
    start: &StartOptions,
    outcome: &mut RestoreOutcome,
    restore_started: Instant,
) -> Result<StartOutcome, Error> {
    let bin = find_pg_bin(start, backup)?;
    let log = start
        .log_file
        .clone()
        .unwrap_or_else(|| opts.pgdata.join("tidemark-restore-start.log"));
    let config_file = outcome
        .configuration
        .config_file
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| opts.pgdata.join("postgresql.conf"));
    let mut notes = placeholder_config(
        &opts.pgdata,
        &config_file,
        start.private,
        &effective_owner(opts),
    )?;
    let settings = crate::restore_config::start_settings(
        &opts.pgdata,
        &config_file,
        backup.pg_version_num,
        start.port,
        start.socket_dir.as_deref(),
    );
    let mut args: Vec<String> = Vec::new();
    // Like pg_ctlcluster: the data directory, and the configuration where it was put.
    if config_file != opts.pgdata.join("postgresql.conf") {
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
    for o in &settings.overrides {
        tracing::info!("start of the restored copy: {o}");
    }
    notes.extend(settings.overrides.iter().cloned());
    let owner = effective_owner(opts);
    let mut cmd = match &owner {
        Some(u) if is_root() => {
            let mut c = std::process::Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(bin.join("pg_ctl"));
            c
        }
        _ => std::process::Command::new(bin.join("pg_ctl")),
    };
    cmd.arg("-D")
        .arg(&opts.pgdata)
        .arg("-l")
        .arg(&log)
        .arg("-W");
    if !args.is_empty() {
        cmd.arg("-o").arg(args.join(" "));
    }
    cmd.arg("start");
    let recovery_started = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| Error::Recovery(format!("running pg_ctl: {e}")))?;
    if !out.status.success() {
        return Err(Error::Recovery(format!(
            "pg_ctl start failed: {} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            log_reason(&log)
        )));
    }
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
    let deadline = Instant::now() + start.timeout;
    let mut seen_running = false;
    loop {
        if Instant::now() > deadline {
            return Err(Error::Recovery(format!(
                "the restored server did not finish recovery within {:?} ({})",
                start.timeout,
                log_reason(&log)
            )));
        }
        // pg_ctl -W returns before the postmaster writes its pid file: give it time to
        // appear, then treat its disappearance as the server having exited.
        let running = postmaster_running(&opts.pgdata);
        seen_running |= running;
        // A server that fails its start (a configuration error) exits before it writes its
        // pid file: its FATAL line in the log says so at once.
        let failed_early = !running
            && recovery_started.elapsed() > Duration::from_millis(500)
            && std::fs::read_to_string(&log)
                .ok()
                .and_then(|t| crate::restore_config::server_failure(&t))
                .is_some();
        if !running
            && (seen_running
                || failed_early
                || recovery_started.elapsed() > Duration::from_secs(30))
        {
            return Err(Error::Recovery(format!(
                "the restored server exited during recovery: {}",
                log_reason(&log)
            )));
        }
        match crate::pg::conn::connect(&conninfo).await {
            Ok(client) => {
                if let Ok(row) = client.query_one("select pg_is_in_recovery()", &[]).await {
                    let in_recovery: bool = row.get(0);
                    if !in_recovery {
                        let row = client
                            .query_one(
                                "select pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn()::text, \
                                     (select timeline_id from pg_control_checkpoint())",
                                &[],
                            )
                            .await
                            .map_err(|e| Error::Postgres(e.to_string()))?;
                        let t: Option<DateTime<Utc>> = row.get(0);
                        let lsn: Option<String> = row.get(1);
                        let tli: Option<i32> = row.get(2);
                        client.close().await;
                        return Ok(StartOutcome {
                            restored_to_time: t,
                            restored_to_lsn: lsn,
                            timeline: tli.map(|t| t as u32),
                            recovery_ms: recovery_started.elapsed().as_millis() as u64,
                            total_ms: restore_started.elapsed().as_millis() as u64,
                            port,
                            socket_dir: socket_dir.display().to_string(),
                            pg_bin: bin.display().to_string(),
                            overrides: notes,
                            log_file: log.display().to_string(),
                        });
                    }
                }
                client.close().await;
            }
            // The server is up and refuses us: waiting longer will not help.
            Err(e) if refused(&e) => {
                return Err(Error::Recovery(format!(
                    "the restored server runs but refuses tidemark's connection as user {user}: {e} \
                     (its pg_hba.conf is the backed-up one; the server keeps running at {})",
                    opts.pgdata.display()
                )));
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let g = crate::restore_config::effective_settings(pgdata, config_file);
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
    match crate::restore_config::server_failure(&text) {
        Some(line) => format!("{line} (server log: {})", log.display()),
        None => format!("the server log {} says no more", log.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_time_needs_a_zone() {
        assert!(parse_target_time("2026-11-27 09:41:07+00").is_ok());
        assert!(parse_target_time("2026-11-27 09:41:07.123456+02:00").is_ok());
        assert!(parse_target_time("2026-11-27T09:41:07Z").is_ok());
        assert!(parse_target_time("2026-11-27 09:41:07").is_err());
    }
}

// Recovery targets, timelines and tablespace maps from the text an operator types (the command
// line's --target-* and --tablespace-map). One block, appended whole, so the later split of this
// file can move it as a unit. The messages name the flags: they are what the operator sees.

/// The recovery target flags as given: at most one is set (the command line makes them
/// exclusive; should several be set, the first in this order wins). None: replay all WAL.
#[derive(Debug, Clone, Copy, Default)]
pub struct TargetSpec<'a> {
    pub time: Option<&'a str>,
    pub lsn: Option<&'a str>,
    pub xid: Option<&'a str>,
    pub name: Option<&'a str>,
    pub immediate: bool,
}

/// Where recovery should stop, from its textual form.
pub fn parse_target(spec: &TargetSpec<'_>) -> Result<RecoveryTarget, String> {
    if let Some(t) = spec.time {
        return parse_target_time(t).map(RecoveryTarget::Time);
    }
    if let Some(l) = spec.lsn {
        return l.parse().map(RecoveryTarget::Lsn);
    }
    if let Some(x) = spec.xid {
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "--target-xid {x:?}: expected a transaction id (digits)"
            ));
        }
        return Ok(RecoveryTarget::Xid(x.to_string()));
    }
    if let Some(n) = spec.name {
        return Ok(RecoveryTarget::Name(n.to_string()));
    }
    Ok(if spec.immediate {
        RecoveryTarget::Immediate
    } else {
        RecoveryTarget::Latest
    })
}

/// `latest`, `current` (the backup's timeline) or a timeline number.
pub fn parse_target_timeline(s: &str) -> Result<TargetTimeline, String> {
    match s {
        "latest" => Ok(TargetTimeline::Latest),
        "current" => Ok(TargetTimeline::Current),
        n => n
            .parse()
            .map(TargetTimeline::Id)
            .map_err(|_| format!("--target-timeline {n:?}: expected latest, current or a number")),
    }
}

/// `OLD=NEW` pairs: the tablespace at OLD is restored into NEW.
pub fn parse_tablespace_map(pairs: &[String]) -> Result<Vec<(String, String)>, String> {
    pairs
        .iter()
        .map(|m| {
            m.split_once('=')
                .map(|(old, new)| (old.to_string(), new.to_string()))
                .ok_or_else(|| format!("--tablespace-map {m:?}: expected OLD=NEW"))
        })
        .collect()
}

#[cfg(test)]
mod target_spec_tests {
    use super::*;

    #[test]
    fn targets_parse_from_their_flags() {
        let none = TargetSpec::default();
        assert_eq!(parse_target(&none), Ok(RecoveryTarget::Latest));
        let immediate = TargetSpec {
            immediate: true,
            ..none
        };
        assert_eq!(parse_target(&immediate), Ok(RecoveryTarget::Immediate));
        let lsn = TargetSpec {
            lsn: Some("0/3000060"),
            ..none
        };
        assert_eq!(
            parse_target(&lsn),
            Ok(RecoveryTarget::Lsn("0/3000060".parse().unwrap()))
        );
        let xid = |x| TargetSpec {
            xid: Some(x),
            ..none
        };
        assert_eq!(
            parse_target(&xid("42")),
            Ok(RecoveryTarget::Xid("42".into()))
        );
        assert_eq!(
            parse_target(&xid("4x")),
            Err("--target-xid \"4x\": expected a transaction id (digits)".into())
        );
        assert!(parse_target(&xid("")).is_err());
        let time = TargetSpec {
            time: Some("2026-11-27 09:41:07"),
            ..none
        };
        assert!(parse_target(&time).unwrap_err().contains("--target-time"));
    }

    #[test]
    fn timelines_and_tablespace_maps() {
        assert_eq!(parse_target_timeline("latest"), Ok(TargetTimeline::Latest));
        assert_eq!(
            parse_target_timeline("current"),
            Ok(TargetTimeline::Current)
        );
        assert_eq!(parse_target_timeline("3"), Ok(TargetTimeline::Id(3)));
        assert_eq!(
            parse_target_timeline("x"),
            Err("--target-timeline \"x\": expected latest, current or a number".into())
        );
        assert_eq!(
            parse_tablespace_map(&["/a=/b=c".into()]),
            Ok(vec![("/a".into(), "/b=c".into())])
        );
        assert_eq!(
            parse_tablespace_map(&["/a".into()]),
            Err("--tablespace-map \"/a\": expected OLD=NEW".into())
        );
    }
}

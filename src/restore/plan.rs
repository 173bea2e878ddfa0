//! What a restore will do, decided before it does anything: the backup and timeline that reach
//! the target (or why none does), the recovery settings, and where every file goes. Refusals
//! come from here, before a byte is downloaded or a directory touched.

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;

use super::owner::effective_owner;
use super::recovery::{RecoverySetting, RestoreCommand, recovery_settings};
use super::{RecoveryTarget, RestoreOptions, TargetTimeline};
use crate::cluster::{Catalog, ClusterHandle};
use crate::error::Error;
use crate::pg::wal::Lsn;
use crate::repo::manifest::BackupManifest;
use crate::repo::window::{ArchiveIndex, BackupRange, Window};

/// A restore, decided. Printable (what a `--dry-run` would show); the run carries out exactly
/// this and reads nothing else of the options.
#[derive(Debug, Clone, Serialize)]
pub struct RestorePlan {
    /// The backup restored, and the timeline recovery follows from its end.
    pub backup: String,
    pub timeline: u32,
    /// What the archive holds for that backup on that timeline: where replay can end, and
    /// the first missing segment beyond.
    pub range: BackupRange,
    pub target: RecoveryTarget,
    /// tidemark's settings in postgresql.auto.conf, values as written there.
    pub recovery_settings: Vec<RecoverySetting>,
    /// What the restored server runs to fetch WAL (restore_command).
    pub restore_command: RestoreCommand,
    pub pgdata: PathBuf,
    /// Where the configuration from outside the data directory goes (None: into it).
    pub config_dir: Option<PathBuf>,
    /// Where each tablespace goes (after --tablespace-map).
    pub tablespaces: Vec<TablespacePlacement>,
    /// Replace what the directories hold (never a running cluster).
    pub force: bool,
    /// The OS user who gets the restored files and runs the server (None: whoever restores).
    pub owner: Option<String>,
    pub parallelism: usize,
    /// Start the server and wait until it reaches the target.
    pub start: Option<StartPlan>,
    /// What the restore cannot do (a WAL gap after the backup), said before it starts.
    pub warnings: Vec<String>,
    /// The chosen backup's manifest: every directory, file and extent restored.
    #[serde(skip)]
    pub manifest: BackupManifest,
}

#[derive(Debug, Clone, Serialize)]
pub struct TablespacePlacement {
    pub oid: u32,
    /// Its location when the backup ran.
    pub location: String,
    /// Where it is restored.
    pub path: PathBuf,
}

/// `--start`, with the server log's place decided.
#[derive(Debug, Clone, Serialize)]
pub struct StartPlan {
    /// PostgreSQL's binaries as given (None: looked up by the backup's major version).
    pub pg_bin: Option<PathBuf>,
    pub port: Option<u16>,
    pub socket_dir: Option<PathBuf>,
    pub timeout: Duration,
    pub log_file: PathBuf,
    /// The socket directory is private to this start (a drill's).
    pub private: bool,
}

/// Decides the restore `opts` asks for, against the repository's `catalog`. Reads archived WAL
/// for a restore point or transaction id target; writes nothing.
pub async fn plan(
    cluster: &ClusterHandle,
    catalog: &Catalog,
    opts: &RestoreOptions,
) -> Result<RestorePlan, Error> {
    // A restore point or transaction id says nothing of where it is: find it in the WAL, so
    // the backup is the newest one that ended before it (as for times and LSNs).
    let located = match (&opts.target, &opts.backup) {
        (RecoveryTarget::Name(_) | RecoveryTarget::Xid(_), None) => {
            Some(locate_backup_for_target(cluster, catalog, opts).await?)
        }
        _ => None,
    };
    let wanted = located.as_deref().or(opts.backup.as_deref());
    let chosen = choose(
        &catalog.backups,
        &catalog.index,
        &catalog.ranges,
        opts,
        wanted,
    )?;
    let restore_command = RestoreCommand::new(&opts.tidemark_exe, &opts.config_path, &cluster.name);
    let settings = recovery_settings(
        &restore_command,
        &opts.target,
        opts.exclusive,
        chosen.timeline,
        opts.archive_mode,
    );
    Ok(RestorePlan {
        backup: chosen.backup.id.clone(),
        timeline: chosen.timeline,
        range: chosen.range,
        target: opts.target.clone(),
        recovery_settings: settings,
        restore_command,
        pgdata: opts.pgdata.clone(),
        config_dir: opts.config_dir.clone(),
        tablespaces: tablespace_placements(&chosen.backup, &opts.tablespace_map),
        force: opts.force,
        owner: effective_owner(opts),
        parallelism: opts.parallelism,
        start: opts.start.as_ref().map(|s| StartPlan {
            pg_bin: s.pg_bin.clone(),
            port: s.port,
            socket_dir: s.socket_dir.clone(),
            timeout: s.timeout,
            log_file: s
                .log_file
                .clone()
                .unwrap_or_else(|| opts.pgdata.join("tidemark-restore-start.log")),
            private: s.private,
        }),
        warnings: chosen.warnings,
        manifest: chosen.backup,
    })
}

/// Each tablespace's location after the `OLD=NEW` pairs, applied in order.
fn tablespace_placements(
    backup: &BackupManifest,
    map: &[(String, String)],
) -> Vec<TablespacePlacement> {
    backup
        .tablespaces
        .iter()
        .map(|t| {
            let mut loc = t.location.clone();
            for (old, new) in map {
                if *old == loc {
                    loc = new.clone();
                }
            }
            TablespacePlacement {
                oid: t.oid,
                location: t.location.clone(),
                path: PathBuf::from(loc),
            }
        })
        .collect()
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

/// The backup a restore uses, the timeline it follows, and what the archive holds for it.
struct Choice {
    backup: BackupManifest,
    timeline: u32,
    range: BackupRange,
    warnings: Vec<String>,
}

/// Chooses the backup (`wanted`, else the newest that works) and target timeline, or explains
/// why the target cannot be reached.
fn choose(
    backups: &[BackupManifest],
    idx: &ArchiveIndex,
    ranges: &[BackupRange],
    opts: &RestoreOptions,
    wanted: Option<&str>,
) -> Result<Choice, Error> {
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
    let mut last_reason = String::new();
    for b in candidates(backups, wanted)? {
        let tli = timeline_for(b, idx, opts.target_timeline.as_ref())?;
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
        if let Err(why) = reaches(&opts.target, b, &range) {
            last_reason = why;
            if wanted.is_some() {
                return Err(refuse(last_reason));
            }
            continue;
        }
        let mut warnings = Vec::new();
        if let Some(gap) = &range.gap_at {
            warnings.push(format!(
                "WAL segment {gap} is missing: recovery cannot go past {}",
                range.to_lsn.as_deref().unwrap_or("?")
            ));
        }
        return Ok(Choice {
            backup: b.clone(),
            timeline: tli,
            range,
            warnings,
        });
    }
    Err(refuse(format!(
        "no backup can reach {}: {last_reason}",
        opts.target.describe()
    )))
}

/// The backups to try, best first: the one asked for, else all, newest first.
fn candidates<'a>(
    backups: &'a [BackupManifest],
    wanted: Option<&str>,
) -> Result<Vec<&'a BackupManifest>, Error> {
    let Some(id) = wanted else {
        return Ok(backups.iter().rev().collect());
    };
    let b = backups.iter().find(|b| b.id == id).ok_or_else(|| {
        Error::NotFound(format!(
            "backup {id} is not in the repository (complete backups: {})",
            backups
                .iter()
                .map(|b| b.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    Ok(vec![b])
}

/// The timeline recovery from `b` follows.
fn timeline_for(
    b: &BackupManifest,
    idx: &ArchiveIndex,
    target_timeline: Option<&TargetTimeline>,
) -> Result<u32, Error> {
    let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
    match target_timeline {
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
}

/// Whether a time or LSN target lies between the end of `b` and the end of its archived WAL
/// (`range`); Err says why not. Other targets were located already, or always reach.
fn reaches(target: &RecoveryTarget, b: &BackupManifest, range: &BackupRange) -> Result<(), String> {
    let to_lsn: Lsn = range
        .to_lsn
        .as_deref()
        .unwrap_or("0/0")
        .parse()
        .unwrap_or_default();
    match target {
        RecoveryTarget::Time(t) => {
            let t = t.with_timezone(&Utc);
            if t < b.stop_time {
                Err(format!(
                    "target time is before the end of backup {} ({})",
                    b.id, b.stop_time
                ))
            } else if range.to_time.is_some_and(|end| t >= end) {
                Err(format!(
                    "target time is not before the last transaction in the archived WAL reachable from backup {} \
                     (PostgreSQL stops a time target only at a later commit; restore without a target to replay everything)",
                    b.id
                ))
            } else {
                Ok(())
            }
        }
        RecoveryTarget::Lsn(l) => {
            let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
            if *l < stop {
                Err(format!(
                    "target LSN {l} is before the end of backup {} ({stop})",
                    b.id
                ))
            } else if *l > to_lsn {
                Err(format!(
                    "target LSN {l} is beyond the archived WAL reachable from backup {} (ends at {to_lsn})",
                    b.id
                ))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// For a restore point or transaction id target: the newest backup after whose end the target
/// occurs in the archived WAL. Scans WAL newest backup first, each segment once, from the
/// backup's end to where the previous (newer) scan began; stops at the first backup that works.
async fn locate_backup_for_target(
    cluster: &ClusterHandle,
    catalog: &Catalog,
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
            let name = crate::repo::layout::wal_file(
                file_tli,
                &crate::pg::wal::segment_name(file_tli, segno, ss),
            );
            let obj = cluster.repo.object(&catalog.info, name);
            let mut scanner = crate::pg::walscan::WalScanner::new(Lsn(segno * ss));
            if let Some(x) = xid {
                scanner = scanner.find_xid(x);
            }
            let (_, scanner) = cluster
                .repo
                .get_object(&obj, &catalog.keyring, false, scanner)
                .await?;
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

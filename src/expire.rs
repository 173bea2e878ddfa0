//! `tidemark expire`: applies the retention policy. A plan is built first (`plan`), printed by
//! `--dry-run`, and carried out as printed (`execute`).
//!
//! What is kept, with W = now − recovery_window:
//! - every complete backup that ended at or after W;
//! - the newest backup that ended before W: it is what makes the moment W itself restorable;
//! - at least the `min_backups` newest complete backups;
//! - every WAL file from the oldest kept backup's first segment on (on every timeline), and
//!   every timeline history file.
//!
//! Safe with concurrent archiving and backups: only WAL strictly older than the oldest kept
//! backup's start is deleted (new WAL is always newer), backups are deleted manifest first (so a
//! half-deleted backup is an incomplete one, never a listed backup with missing files), and
//! incomplete backups are removed only while holding the cluster's backup lock.

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::audit::{self, Event, Outcome};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::pg::wal::{Lsn, WalFileKind, segment_of};
use crate::repo::manifest::BackupManifest;
use crate::repo::{BACKUP_LOCK_KEY, Repository, layout};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpirePlan {
    pub cluster: String,
    pub now: DateTime<Utc>,
    pub recovery_window_secs: u64,
    pub window_start: DateTime<Utc>,
    pub min_backups: usize,
    pub keep_backups: Vec<String>,
    pub delete_backups: Vec<String>,
    /// WAL before this segment number (exclusive) goes; None keeps all WAL.
    pub wal_keep_from: Option<String>,
    pub delete_wal: Vec<String>,
    pub delete_wal_bytes: u64,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpireOutcome {
    pub plan: ExpirePlan,
    pub dry_run: bool,
    pub deleted_backups: usize,
    pub deleted_wal: usize,
    pub removed_incomplete: Vec<String>,
}

/// Which backups to keep, given complete backups sorted oldest first.
pub fn select_backups(
    backups: &[BackupManifest],
    window_start: DateTime<Utc>,
    min_backups: usize,
) -> (Vec<&BackupManifest>, Vec<&BackupManifest>) {
    let n = backups.len();
    let mut keep = vec![false; n];
    for (i, b) in backups.iter().enumerate() {
        if b.stop_time >= window_start || i + min_backups >= n {
            keep[i] = true;
        }
    }
    // The newest backup before the window start covers the window's first moment.
    if let Some(i) = backups.iter().rposition(|b| b.stop_time < window_start) {
        keep[i] = true;
    }
    let (mut k, mut d) = (Vec::new(), Vec::new());
    for (i, b) in backups.iter().enumerate() {
        if keep[i] { k.push(b) } else { d.push(b) }
    }
    (k, d)
}

pub async fn plan(cluster: &ClusterHandle, now: DateTime<Utc>) -> Result<ExpirePlan, Error> {
    let info = cluster.repo.read_info().await?;
    let keyring = cluster.keyring(&info).await?;
    let backups = cluster.repo.load_manifests(&info, &keyring).await?;
    let window = cluster.retention.recovery_window;
    let window_start = chrono::Duration::from_std(window)
        .ok()
        .and_then(|w| now.checked_sub_signed(w))
        .ok_or_else(|| {
            Error::Usage(format!(
                "recovery_window = {} reaches before year 1: use a shorter window",
                humantime::format_duration(window)
            ))
        })?;
    let (keep, delete) = select_backups(&backups, window_start, cluster.retention.min_backups);
    let mut notes = Vec::new();
    let ss = info.wal_segment_size;
    let boundary = keep
        .iter()
        .map(|b| segment_of(b.start_lsn.parse::<Lsn>().unwrap_or_default(), ss))
        .min();
    let mut delete_wal = Vec::new();
    let mut delete_wal_bytes = 0;
    match boundary {
        None => notes.push("no complete backup: all WAL is kept".into()),
        Some(boundary) => {
            // Every WAL file name, in whatever timeline directory: all of it is archive.
            for o in cluster.repo.list_wal_objects().await? {
                let Some(f) = o.file else {
                    continue;
                };
                if f.kind == WalFileKind::TimelineHistory {
                    continue;
                }
                if f.segment_no(ss).is_some_and(|n| n < boundary) {
                    delete_wal_bytes += o.meta.size;
                    delete_wal.push(o.meta.key);
                }
            }
        }
    }
    Ok(ExpirePlan {
        cluster: cluster.name.clone(),
        now,
        recovery_window_secs: window.as_secs(),
        window_start,
        min_backups: cluster.retention.min_backups,
        keep_backups: keep.iter().map(|b| b.id.clone()).collect(),
        delete_backups: delete.iter().map(|b| b.id.clone()).collect(),
        wal_keep_from: boundary.map(|b| {
            let tli = keep.iter().map(|k| k.timeline).min().unwrap_or(1);
            crate::pg::wal::segment_name(tli, b, ss)
        }),
        delete_wal,
        delete_wal_bytes,
        notes,
    })
}

/// Carries out `plan`, and records what it deleted in the audit log (also when it failed
/// half-way: what was deleted until then).
pub async fn execute(cluster: &ClusterHandle, plan: ExpirePlan) -> Result<ExpireOutcome, Error> {
    let info = cluster.repo.read_info().await?;
    let keyring = cluster.keyring(&info).await?;
    let mut done_backups = Vec::new();
    let mut done_wal = 0usize;
    let result = execute_plan(cluster, plan, &mut done_backups, &mut done_wal).await;
    if result.is_err() || !done_backups.is_empty() || done_wal > 0 {
        let mut event = Event::new("expire", Outcome::Ok).detail(format!(
            "deleted {} backup(s){}, {done_wal} WAL file(s)",
            done_backups.len(),
            if done_backups.is_empty() {
                String::new()
            } else {
                format!(" ({})", done_backups.join(", "))
            }
        ));
        event.objects = done_backups.iter().map(|id| layout::manifest(id)).collect();
        audit::record(cluster, &info, &keyring, event.outcome_of(&result)).await;
    }
    result
}

async fn execute_plan(
    cluster: &ClusterHandle,
    plan: ExpirePlan,
    done_backups: &mut Vec<String>,
    done_wal: &mut usize,
) -> Result<ExpireOutcome, Error> {
    let repo: &Repository = &cluster.repo;
    for id in &plan.delete_backups {
        // Manifest first: from then on the backup is incomplete, never half-listed.
        repo.delete_backup(id).await?;
        done_backups.push(id.clone());
        tracing::info!(backup = %id, "expired backup");
    }
    for key in &plan.delete_wal {
        // The plan names WAL by store key (as it prints them): keys of this repository's
        // listing.
        let name = repo.name_of(key).ok_or_else(|| {
            Error::Internal(format!(
                "{key}: not an object of cluster {}",
                repo.cluster()
            ))
        })?;
        repo.delete(name).await?;
        *done_wal += 1;
    }
    if !plan.delete_wal.is_empty() {
        tracing::info!(
            files = plan.delete_wal.len(),
            bytes = plan.delete_wal_bytes,
            "expired WAL"
        );
    }
    let removed_incomplete = remove_incomplete_if_idle(cluster).await;
    Ok(ExpireOutcome {
        deleted_backups: plan.delete_backups.len(),
        deleted_wal: plan.delete_wal.len(),
        plan,
        dry_run: false,
        removed_incomplete,
    })
}

/// Removes leftovers of incomplete backups, but only when no backup can be running: while
/// holding the cluster's backup lock. Without a connection, leftovers stay for the next backup.
async fn remove_incomplete_if_idle(cluster: &ClusterHandle) -> Vec<String> {
    let Some(conninfo) = cluster.config.connection.as_ref() else {
        return Vec::new();
    };
    let Ok(client) = crate::pg::conn::connect(conninfo.expose_secret()).await else {
        tracing::warn!("PostgreSQL unreachable: leftovers of incomplete backups are kept for now");
        return Vec::new();
    };
    // Only the primary's lock excludes a running backup (backups run on the primary).
    let standby = client
        .query_one("select pg_is_in_recovery()", &[])
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(true);
    if standby {
        tracing::warn!("connection is a standby: leftovers of incomplete backups are kept for now");
        client.close().await;
        return Vec::new();
    }
    let locked = client
        .query_one("select pg_try_advisory_lock($1)", &[&BACKUP_LOCK_KEY])
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false);
    if !locked {
        return Vec::new(); // a backup is running; its directory is not a leftover
    }
    let removed = match cluster.repo.remove_incomplete().await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "removing leftovers of incomplete backups failed");
            Vec::new()
        }
    };
    client.close().await;
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, stop_secs: i64) -> BackupManifest {
        BackupManifest {
            format: 1,
            id: id.into(),
            label: String::new(),
            cluster: "c".into(),
            system_identifier: "1".into(),
            pg_version_num: 150000,
            timeline: 1,
            start_lsn: "0/1000000".into(),
            stop_lsn: "0/1000100".into(),
            start_time: DateTime::from_timestamp(stop_secs - 10, 0).unwrap(),
            stop_time: DateTime::from_timestamp(stop_secs, 0).unwrap(),
            wal_start: String::new(),
            wal_stop: String::new(),
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            directories: vec![],
            files: vec![],
            packs: vec![],
            original_bytes: 0,
            stored_bytes: 0,
            duration_ms: 0,
            tidemark_version: String::new(),
            configuration: None,
        }
    }

    fn ids(v: &[&BackupManifest]) -> Vec<String> {
        v.iter().map(|b| b.id.clone()).collect()
    }

    #[test]
    fn keeps_the_backup_that_starts_the_window() {
        let all = vec![b("a", 100), b("b", 200), b("c", 300), b("d", 400)];
        let w = DateTime::from_timestamp(250, 0).unwrap();
        let (k, d) = select_backups(&all, w, 1);
        assert_eq!(ids(&k), ["b", "c", "d"]);
        assert_eq!(ids(&d), ["a"]);
        // A window start exactly at c's end: b is still kept (one backup more than needed).
        let (k, _) = select_backups(&all, DateTime::from_timestamp(300, 0).unwrap(), 1);
        assert_eq!(ids(&k), ["b", "c", "d"]);
        // min_backups wins over the window.
        let (k, d) = select_backups(&all, DateTime::from_timestamp(1000, 0).unwrap(), 3);
        assert_eq!(ids(&k), ["b", "c", "d"]);
        assert_eq!(ids(&d), ["a"]);
        let (k, _) = select_backups(&all, DateTime::from_timestamp(1000, 0).unwrap(), 0);
        assert_eq!(ids(&k), ["d"]);
        assert_eq!(select_backups(&[], w, 2).0.len(), 0);
    }
}

// What a dry run reports. One block, appended whole, so a later split can move it as a unit.

/// `--dry-run`'s outcome: the plan as `execute` would carry it out, nothing deleted.
pub fn dry_run(plan: ExpirePlan) -> ExpireOutcome {
    ExpireOutcome {
        plan,
        dry_run: true,
        deleted_backups: 0,
        deleted_wal: 0,
        removed_incomplete: Vec::new(),
    }
}

#[cfg(test)]
mod dry_run_tests {
    use super::*;

    #[test]
    fn a_dry_run_reports_the_plan_and_deletes_nothing() {
        let plan = ExpirePlan {
            cluster: "c".into(),
            now: DateTime::from_timestamp(2000, 0).unwrap(),
            recovery_window_secs: 1000,
            window_start: DateTime::from_timestamp(1000, 0).unwrap(),
            min_backups: 1,
            keep_backups: vec!["b".into()],
            delete_backups: vec!["a".into()],
            wal_keep_from: None,
            delete_wal: vec!["c/wal/00000001/000000010000000000000001".into()],
            delete_wal_bytes: 16 << 20,
            notes: Vec::new(),
        };
        let out = dry_run(plan);
        assert!(out.dry_run);
        assert_eq!((out.deleted_backups, out.deleted_wal), (0, 0));
        assert!(out.removed_incomplete.is_empty());
        assert_eq!(out.plan.delete_backups, ["a"]);
    }
}

//! The checks of the repository and its catalog: reachable and writable, the keys, the
//! newest backup's age, WAL gaps, the newest drill, audit records waiting for upload.

use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;

use super::{CheckResult, crit, ok, round, warn};
use crate::cluster::ClusterHandle;
use crate::pg::wal::{Lsn, segment_of};
use crate::pipeline::Keyring;
use crate::repo::ClusterInfo;
use crate::repo::manifest::BackupManifest;
use crate::repo::walindex::{gaps_from, summarise};

/// The repository is reachable, initialised and writable (a probe object written and
/// deleted). Its info, when it could be read.
pub(super) async fn repository(cluster: &ClusterHandle) -> (CheckResult, Option<ClusterInfo>) {
    let info = match cluster.repo.read_info().await {
        Ok(info) => info,
        Err(e) => return (crit("repository", e.to_string()), None),
    };
    let repo = &cluster.repo;
    let mut rnd = [0u8; 6];
    let _ = crate::pipeline::keys::random_bytes(&mut rnd);
    let probe = crate::repo::layout::check_probe(&hex::encode(rnd));
    let res = async {
        repo.put_plain(&probe, Bytes::from_static(b"tidemark check"))
            .await?;
        repo.delete(&probe).await
    }
    .await;
    let result = match res {
        Ok(()) => ok(
            "repository",
            format!("{} reachable and writable", repo.describe()),
        ),
        Err(e) => crit("repository", format!("not writable: {e}")),
    };
    (result, Some(info))
}

/// The master key opens the keyring.
pub(super) async fn keys(
    cluster: &ClusterHandle,
    info: &ClusterInfo,
) -> (CheckResult, Option<Arc<Keyring>>) {
    match cluster.keyring(info).await {
        Ok(k) => (ok("keys", "master key opens the keyring".into()), Some(k)),
        Err(e) => (crit("keys", e.to_string()), None),
    }
}

/// The newest backup's age, against the alert limit.
pub(super) fn backup_age(cluster: &ClusterHandle, backups: &[BackupManifest]) -> CheckResult {
    let Some(t) = backups.iter().map(|b| b.stop_time).max() else {
        return crit("backup", "no complete backup".into());
    };
    let age = (Utc::now() - t).to_std().unwrap_or_default();
    let mut r = if age > cluster.alerts.backup_age_critical {
        crit(
            "backup",
            format!(
                "newest backup ended {} ago (limit {})",
                humantime::format_duration(round(age)),
                humantime::format_duration(cluster.alerts.backup_age_critical)
            ),
        )
    } else {
        ok(
            "backup",
            format!(
                "newest backup ended {} ago",
                humantime::format_duration(round(age))
            ),
        )
    };
    r.value = Some(age.as_secs_f64());
    r
}

/// No WAL missing from the oldest backup's start on.
pub(super) async fn wal_gaps(
    cluster: &ClusterHandle,
    info: &ClusterInfo,
    backups: &[BackupManifest],
) -> CheckResult {
    let (files, strays) = match cluster.repo.list_wal().await {
        Ok(listing) => listing,
        Err(e) => return crit("wal_gaps", e.to_string()),
    };
    let ss = info.wal_segment_size;
    let oldest_start = backups
        .iter()
        .filter_map(|b| b.start_lsn.parse::<Lsn>().ok())
        .map(|l| segment_of(l, ss))
        .min();
    let summary = summarise(&files, strays, ss);
    let gaps: Vec<String> = gaps_from(&summary, oldest_start)
        .into_iter()
        .map(|(t, g)| format!("timeline {t}: {} .. {}", g.from, g.to))
        .collect();
    if gaps.is_empty() {
        ok("wal_gaps", "no WAL gap inside the restorable window".into())
    } else {
        crit(
            "wal_gaps",
            format!(
                "WAL missing inside the restorable window: {}",
                gaps.join("; ")
            ),
        )
    }
}

/// The newest drill passed (nothing when there was none).
pub(super) async fn newest_drill(cluster: &ClusterHandle) -> Option<CheckResult> {
    let history = match crate::drill::history(cluster).await {
        Ok(h) => h,
        Err(e) => return Some(warn("drill", format!("reading drill records: {e}"))),
    };
    let d = history.last()?;
    Some(if !d.ok {
        warn(
            "drill",
            format!(
                "the newest drill {} ({}) failed: {}",
                d.id,
                d.started.format("%Y-%m-%d %H:%M:%S+00"),
                d.error.as_deref().unwrap_or("a check failed")
            ),
        )
    } else {
        ok(
            "drill",
            format!(
                "the newest drill {} ({}) passed",
                d.id,
                d.started.format("%Y-%m-%d %H:%M:%S+00")
            ),
        )
    })
}

/// Audit records this host could not upload yet (a warning once the oldest waits 5 minutes).
pub(super) fn audit_uploaded(cluster: &ClusterHandle, info: &ClusterInfo) -> CheckResult {
    let (pending, oldest) = crate::audit::pending(cluster, info);
    let mut r = match oldest {
        Some(t) if Utc::now() - t > chrono::Duration::minutes(5) => warn(
            "audit",
            format!(
                "{pending} audit record(s) not uploaded to the repository since {}",
                t.format("%Y-%m-%d %H:%M:%S+00")
            ),
        ),
        _ if pending > 0 => ok("audit", format!("{pending} audit record(s) being uploaded")),
        _ => ok("audit", "audit log uploaded".into()),
    };
    r.value = Some(pending as f64);
    r
}

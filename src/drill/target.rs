//! Where a drill recovers to: `--target` parsed, then resolved against the catalog into a
//! recovery target (a random moment of the window, a backup's row-count point).

use super::{DrillOptions, DrillTarget, random_u64};
use crate::cluster::{Catalog, ClusterHandle};
use crate::error::Error;
use crate::repo::manifest::RowCounts;
use crate::restore::{self, RecoveryTarget};

/// `latest`, `random`, `backup`, or a time with a zone (`parse_target_time`'s forms and message).
pub fn parse_target(s: &str) -> Result<DrillTarget, String> {
    Ok(match s {
        "latest" => DrillTarget::Latest,
        "random" => DrillTarget::Random,
        "backup" => DrillTarget::Backup,
        t => DrillTarget::Time(restore::parse_target_time(t)?),
    })
}

/// A drill's recovery target resolved: the target, the backup to restore (None: restore
/// chooses), and the row counts to compare at a backup's count point.
pub(super) struct Resolved {
    pub target: RecoveryTarget,
    pub backup: Option<String>,
    pub expected_counts: Option<RowCounts>,
}

pub(super) async fn resolve(
    cluster: &ClusterHandle,
    catalog: &Catalog,
    opts: &DrillOptions,
) -> Result<Resolved, Error> {
    let mut resolved = Resolved {
        target: RecoveryTarget::Latest,
        backup: opts.backup.clone(),
        expected_counts: None,
    };
    match &opts.target {
        DrillTarget::Backup => {
            let (id, counts) = backup_with_counts(cluster, catalog, opts.backup.as_deref()).await?;
            resolved.backup = Some(id);
            resolved.target = RecoveryTarget::Name(counts.restore_point.clone());
            resolved.expected_counts = Some(counts);
        }
        DrillTarget::Latest => {}
        DrillTarget::Time(t) => resolved.target = RecoveryTarget::Time(*t),
        DrillTarget::Random => resolved.target = random_time(catalog)?,
    }
    Ok(resolved)
}

/// Uniform over the union of the restorable windows; strictly before each window's end (a
/// time target needs a later commit).
fn random_time(catalog: &Catalog) -> Result<RecoveryTarget, Error> {
    let windows = crate::repo::window::windows(&catalog.ranges);
    let total: i64 = windows
        .iter()
        .map(|w| (w.to - w.from).num_microseconds().unwrap_or(0).max(0))
        .sum();
    if windows.is_empty() || total <= 0 {
        return Err(Error::Recovery(
            "the restorable window is empty: nothing to drill".into(),
        ));
    }
    let mut pick = (random_u64() % total as u64) as i64;
    let mut chosen = windows[0].from;
    for w in &windows {
        let len = (w.to - w.from).num_microseconds().unwrap_or(0).max(0);
        if pick < len {
            chosen = w.from + chrono::Duration::microseconds(pick);
            break;
        }
        pick -= len;
    }
    Ok(RecoveryTarget::Time(chosen.fixed_offset()))
}

/// The backup to drill at its row-count point: `wanted`, or the newest one that has counts.
async fn backup_with_counts(
    cluster: &ClusterHandle,
    catalog: &Catalog,
    wanted: Option<&str>,
) -> Result<(String, RowCounts), Error> {
    let candidates: Vec<&str> = match wanted {
        Some(id) => vec![id],
        None => catalog
            .backups
            .iter()
            .rev()
            .map(|b| b.id.as_str())
            .collect(),
    };
    for id in candidates {
        let obj = cluster
            .repo
            .object(&catalog.info, crate::repo::layout::counts(id));
        if !cluster.repo.exists(&obj.name).await? {
            continue;
        }
        let (_, bytes) = cluster
            .repo
            .get_object(&obj, &catalog.keyring, false, Vec::new())
            .await?;
        let counts: RowCounts = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Integrity(format!("{}: {e}", obj.key)))?;
        return Ok((id.to_string(), counts));
    }
    Err(Error::Recovery(match wanted {
        Some(id) => format!("backup {id} has no recorded row counts"),
        None => format!(
            "no backup has recorded row counts: set [clusters.{}.drill] count_tables (then take a backup)",
            cluster.name
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drill_targets_parse() {
        assert!(matches!(parse_target("latest"), Ok(DrillTarget::Latest)));
        assert!(matches!(parse_target("random"), Ok(DrillTarget::Random)));
        assert!(matches!(parse_target("backup"), Ok(DrillTarget::Backup)));
        assert!(matches!(
            parse_target("2026-11-27 09:41:07+00"),
            Ok(DrillTarget::Time(_))
        ));
        assert!(
            parse_target("bogus")
                .unwrap_err()
                .starts_with("invalid --target-time")
        );
    }
}

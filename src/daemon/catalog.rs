//! The catalog as the daemon sees it: what `list --json` and `drill --history --json`, run as
//! children, say about backups, the restorable window, WAL gaps and the last drill.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::jobs::{self, ChildFailure};
use crate::drill::DrillRecord;
use crate::list::Listing;

/// What the daemon takes from the catalog children's output.
#[derive(Debug)]
pub(super) struct CatalogSummary {
    pub(super) newest_backup: Option<NewestBackup>,
    pub(super) backups: u64,
    pub(super) window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pub(super) gaps: Vec<String>,
    pub(super) last_drill: Option<DrillRecord>,
}

/// The complete backup that ended last.
#[derive(Debug, Clone, Copy)]
pub(super) struct NewestBackup {
    pub(super) stop_time: DateTime<Utc>,
    pub(super) duration_ms: u64,
    pub(super) original_bytes: u64,
    pub(super) stored_bytes: u64,
}

impl CatalogSummary {
    /// From `list --json` and `drill --history --json` (oldest drill first).
    fn of(listing: &Listing, mut drills: Vec<DrillRecord>) -> CatalogSummary {
        let newest_backup =
            listing
                .backups
                .iter()
                .max_by_key(|b| b.stop_time)
                .map(|b| NewestBackup {
                    stop_time: b.stop_time,
                    duration_ms: b.duration_ms,
                    original_bytes: b.original_bytes,
                    stored_bytes: b.stored_bytes,
                });
        let gaps = listing
            .window_gaps
            .iter()
            .map(|(timeline, g)| {
                format!(
                    "timeline {timeline}: {} .. {} ({} missing)",
                    g.from, g.to, g.missing
                )
            })
            .collect();
        CatalogSummary {
            newest_backup,
            backups: listing.backups.len() as u64,
            window: listing.earliest_restorable.zip(listing.latest_restorable),
            gaps,
            last_drill: drills.pop(),
        }
    }
}

/// What the slow loop reads: backups, window, gaps, and the newest drill record — through
/// `tidemark list --json` and `drill --history --json` run as children, so a large catalog
/// (every manifest is read) never grows the daemon's own memory. Output that does not parse
/// as the commands' types is a failure, like a failed child.
pub(super) async fn read_catalog(
    config: &Path,
    cluster: &str,
    timeout: Duration,
) -> Result<CatalogSummary, ChildFailure> {
    let listing: Listing = jobs::read_json(config, cluster, &["list", "--json"], timeout).await?;
    let drills: Vec<DrillRecord> =
        jobs::read_json(config, cluster, &["drill", "--history", "--json"], timeout).await?;
    Ok(CatalogSummary::of(&listing, drills))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_summary_is_read_from_lists_own_type() {
        use crate::list::BackupSummary;
        use crate::repo::walindex::WalGap;
        use crate::repo::window::BackupRange;
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let backup = |id: &str, stop: &str, duration_ms: u64| BackupSummary {
            id: id.into(),
            label: String::new(),
            timeline: 1,
            start_time: t(stop) - chrono::Duration::milliseconds(duration_ms as i64),
            stop_time: t(stop),
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            original_bytes: duration_ms * 10,
            stored_bytes: duration_ms,
            duration_ms,
            pg_version_num: 150000,
            files: 1000,
            range: BackupRange {
                backup: id.into(),
                timeline: 1,
                from_time: t(stop),
                from_lsn: "0/2000100".into(),
                to_time: None,
                to_lsn: None,
                gap_at: None,
                restorable: true,
                run_tail: Vec::new(),
            },
            configuration: None,
        };
        let gap = WalGap {
            from: "000000010000000000000005".into(),
            to: "000000010000000000000007".into(),
            missing: 3,
        };
        let listing = Listing {
            cluster: "acme".into(),
            backups: vec![
                backup("b1", "2026-12-01T02:00:00Z", 5000),
                backup("b2", "2026-12-02T02:00:00Z", 7000),
            ],
            windows: Vec::new(),
            earliest_restorable: Some(t("2026-12-01T02:00:00Z")),
            latest_restorable: Some(t("2026-12-02T03:00:00Z")),
            wal_gaps: vec![(1, gap.clone())],
            window_gaps: vec![(1, gap)],
        };
        // As `list --json` prints it and the daemon reads it back.
        let json = serde_json::to_string_pretty(&listing).unwrap();
        let read: Listing = serde_json::from_str(&json).unwrap();
        let s = CatalogSummary::of(&read, Vec::new());
        let newest = s.newest_backup.unwrap();
        assert_eq!(newest.stop_time, t("2026-12-02T02:00:00Z"));
        assert_eq!(
            (
                newest.duration_ms,
                newest.original_bytes,
                newest.stored_bytes
            ),
            (7000, 70000, 7000)
        );
        assert_eq!(s.backups, 2);
        assert_eq!(
            s.window,
            Some((t("2026-12-01T02:00:00Z"), t("2026-12-02T03:00:00Z")))
        );
        assert_eq!(
            s.gaps,
            vec!["timeline 1: 000000010000000000000005 .. 000000010000000000000007 (3 missing)"]
        );
        assert!(s.last_drill.is_none());
        // Output that is not a listing is an error, not an empty catalog.
        assert!(serde_json::from_str::<Listing>("{\"backups\": []}").is_err());
    }
}

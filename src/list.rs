//! `tidemark list`: complete backups and the restorable window per timeline.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::repo::walindex::{WalGap, gaps_from, summarise};
use crate::repo::window::{self, BackupRange, Window};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupSummary {
    pub id: String,
    pub label: String,
    pub timeline: u32,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub original_bytes: u64,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    pub pg_version_num: u32,
    pub files: usize,
    /// What this backup can restore to on its newest reachable timeline.
    pub range: BackupRange,
    /// The configuration from outside the data directory it holds; None: a backup by a
    /// tidemark that did not record it.
    pub configuration: Option<ConfigSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigSummary {
    pub config_file: String,
    pub hba_file: String,
    pub ident_file: String,
    pub captured: Vec<CapturedFile>,
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapturedFile {
    pub source: String,
    pub role: String,
    pub size: u64,
}

impl ConfigSummary {
    pub fn of(c: &crate::repo::manifest::ServerConfiguration) -> ConfigSummary {
        ConfigSummary {
            config_file: c.config_file.clone(),
            hba_file: c.hba_file.clone(),
            ident_file: c.ident_file.clone(),
            captured: c
                .files
                .iter()
                .map(|f| CapturedFile {
                    source: f.source.clone(),
                    role: f.role.clone(),
                    size: f.size,
                })
                .collect(),
            missing: c.missing.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    pub cluster: String,
    pub backups: Vec<BackupSummary>,
    pub windows: Vec<Window>,
    pub earliest_restorable: Option<DateTime<Utc>>,
    pub latest_restorable: Option<DateTime<Utc>>,
    /// Every gap in the archive, per timeline.
    pub wal_gaps: Vec<(u32, WalGap)>,
    /// The gaps at or after the oldest backup's first segment: WAL lost inside the history
    /// that should be restorable.
    pub window_gaps: Vec<(u32, WalGap)>,
}

pub async fn list(cluster: &ClusterHandle) -> Result<Listing, Error> {
    let catalog = cluster.catalog().await?;
    let (info, manifests, idx, ranges) = (
        &catalog.info,
        &catalog.backups,
        &catalog.index,
        &catalog.ranges,
    );
    let windows = window::windows(ranges);
    let backups = manifests
        .iter()
        .map(|m| {
            let stop = m.stop_lsn.parse().unwrap_or_default();
            let tli = idx.latest_timeline(m.timeline, stop);
            let range = ranges
                .iter()
                .find(|r| r.backup == m.id && r.timeline == tli)
                .cloned()
                .unwrap_or_else(|| idx.range(m, tli));
            BackupSummary {
                id: m.id.clone(),
                label: m.label.clone(),
                timeline: m.timeline,
                start_time: m.start_time,
                stop_time: m.stop_time,
                start_lsn: m.start_lsn.clone(),
                stop_lsn: m.stop_lsn.clone(),
                original_bytes: m.original_bytes,
                stored_bytes: m.stored_bytes,
                duration_ms: m.duration_ms,
                pg_version_num: m.pg_version_num,
                files: m.files.len(),
                range,
                configuration: m.configuration.as_ref().map(ConfigSummary::of),
            }
        })
        .collect();
    let (files, strays) = cluster.repo.list_wal().await?;
    let summary = summarise(&files, strays, info.wal_segment_size);
    let wal_gaps = summary
        .timelines
        .iter()
        .flat_map(|t| t.gaps.iter().map(move |g| (t.timeline, g.clone())))
        .collect();
    let oldest_start = manifests
        .iter()
        .filter_map(|m| m.start_lsn.parse().ok())
        .map(|l| crate::pg::wal::segment_of(l, info.wal_segment_size))
        .min();
    let window_gaps = gaps_from(&summary, oldest_start);
    Ok(Listing {
        cluster: cluster.name.clone(),
        earliest_restorable: windows.iter().map(|w| w.from).min(),
        latest_restorable: windows.iter().map(|w| w.to).max(),
        backups,
        windows,
        wal_gaps,
        window_gaps,
    })
}

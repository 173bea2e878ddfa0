//! The backup manifest: everything a restore needs, written as the last object of a backup.
//! A backup without a manifest is incomplete and never listed or restored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupManifest {
    pub format: u32,
    pub id: String,
    pub label: String,
    pub cluster: String,
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    /// Database clock when the backup started and when pg_backup_stop returned; a backup can
    /// restore to any moment from `stop_time` on.
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    /// First and last WAL segment the backup needs.
    pub wal_start: String,
    pub wal_stop: String,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    pub tablespaces: Vec<TablespaceEntry>,
    pub directories: Vec<DirEntry>,
    pub files: Vec<FileEntry>,
    pub packs: Vec<PackEntry>,
    pub original_bytes: u64,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    pub tidemark_version: String,
    /// The server's configuration outside the data directory (Debian's /etc/postgresql/...),
    /// held in this backup's packs. None: taken by a tidemark that did not record it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<ServerConfiguration>,
}

/// What the server reads besides its data directory, as it was when the backup ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfiguration {
    /// The server's own settings of these names (absolute paths; empty when not visible).
    pub data_directory: String,
    pub config_file: String,
    pub hba_file: String,
    pub ident_file: String,
    /// Files outside the data directory, stored like any other file of the backup.
    pub files: Vec<ConfigFileEntry>,
    /// include_dir directories outside the data directory (recreated even when empty).
    pub directories: Vec<ConfigDirEntry>,
    /// Path-valued and other start-relevant settings as the server had them.
    pub settings: Vec<SettingEntry>,
    /// What could not be recorded, one line each.
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFileEntry {
    /// Absolute path on the backed-up host.
    pub source: String,
    /// config_file, hba_file, ident_file, include, hba_include or pg_ctlcluster.
    pub role: String,
    pub size: u64,
    pub mode: u32,
    pub extents: Vec<Extent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDirEntry {
    pub source: String,
    pub mode: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingEntry {
    pub name: String,
    pub value: String,
    /// pg_settings.source: "configuration file", "command line", "default", ...
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablespaceEntry {
    pub oid: u32,
    pub location: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    pub path: String,
    pub mode: u32,
}

/// A file, as the byte ranges (extents) of packs that hold it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub extents: Vec<Extent>,
}

/// `length` bytes at `file_offset` of the file are bytes `pack_offset..` of pack `pack`'s
/// content; `sha256` is the SHA-256 of those original bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    pub pack: u32,
    pub pack_offset: u64,
    pub file_offset: u64,
    pub length: u64,
    pub sha256: String,
}

/// A pack: one object holding the concatenated extents of one or more files.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackEntry {
    pub id: u32,
    pub original_bytes: u64,
    pub stored_bytes: u64,
}

impl BackupManifest {
    /// `layout::pack`.
    pub fn pack_name(backup_id: &str, pack: u32) -> String {
        super::layout::pack(backup_id, pack)
    }

    /// `layout::manifest`.
    pub fn manifest_name(backup_id: &str) -> String {
        super::layout::manifest(backup_id)
    }
}

/// `backups/<id>/counts` (encrypted, written before the manifest): row counts of chosen tables
/// exactly as of the restore point `restore_point`, which a drill can recover to and compare.
///
/// Exact because the counting transaction holds SHARE locks on the tables from before the
/// restore point is written until the counts are read: every transaction that wrote to them
/// committed (and is visible) before the point, none can write between the point and the
/// counts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RowCounts {
    pub format: u32,
    pub backup: String,
    pub restore_point: String,
    pub lsn: String,
    pub time: DateTime<Utc>,
    pub database: String,
    pub tables: Vec<TableCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableCount {
    /// Schema-qualified, quoted as needed (`public.orders`, `"Odd".t`).
    pub table: String,
    pub rows: i64,
}

impl RowCounts {
    /// `layout::counts`.
    pub fn object_name(backup_id: &str) -> String {
        super::layout::counts(backup_id)
    }

    pub fn restore_point_name(backup_id: &str) -> String {
        format!("tidemark-counts-{backup_id}")
    }
}

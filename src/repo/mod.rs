//! The repository catalog: what each object of a cluster's repository is called and means.
//!
//! Layout under the store root (docs/format.md is normative):
//! ```text
//! <cluster>/cluster.json                 identity of the cluster (plain JSON), written last by init
//! <cluster>/keys/keyring.json            data keys wrapped by the master key
//! <cluster>/wal/<TLI>/<walfile>          WAL segments, .partial, .backup and .history files
//! ```
//! Each cluster has its own directory and master key: nothing is shared between clients.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::pg::wal::{Lsn, segment_name};
use crate::pg::wal::{WalFileKind, WalFileName};
use crate::pg::walscan::{WalScan, WalScanner};
use crate::pipeline::Keyring;
use crate::pipeline::keys::KeyringFile;
use crate::store::{Store, StoreError};
use crate::transfer::{self, ObjectRef};
use manifest::BackupManifest;
use window::{ArchiveIndex, BackupRange};

/// Archived WAL files with the time each was stored, and objects that are not WAL files.
pub type WalListing = (
    Vec<(WalFileName, Option<chrono::DateTime<chrono::Utc>>)>,
    Vec<String>,
);

pub mod lease;
pub mod manifest;
pub mod walindex;
pub mod window;

pub const REPOSITORY_FORMAT: u32 = 1;
const MAX_META_BYTES: u64 = 1 << 20;

/// `<cluster>/cluster.json`: who this repository belongs to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterInfo {
    pub format: u32,
    /// Random id bound into every object's encryption: objects cannot move between
    /// repositories.
    pub repository_id: String,
    pub cluster: String,
    /// PostgreSQL's database system identifier, as a decimal string (JSON numbers lose
    /// precision above 2^53).
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub wal_segment_size: u64,
    pub created: chrono::DateTime<chrono::Utc>,
    pub created_by: String,
}

impl ClusterInfo {
    pub fn system_identifier(&self) -> Result<u64, RepoError> {
        self.system_identifier.parse().map_err(|_| {
            RepoError::Corrupt(format!(
                "cluster.json: bad system_identifier {:?}",
                self.system_identifier
            ))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "cluster {cluster} has no repository in {store}: run `tidemark --cluster {cluster} init` first"
    )]
    NotInitialised { cluster: String, store: String },
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One cluster's part of a store.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Arc<dyn Store>,
    cluster: String,
}

impl Repository {
    pub fn new(store: Arc<dyn Store>, cluster: &str) -> Repository {
        Repository {
            store,
            cluster: cluster.to_string(),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Store key of an object name relative to the cluster directory.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.cluster)
    }

    pub fn object(&self, info: &ClusterInfo, name: String) -> ObjectRef {
        ObjectRef {
            key: self.key(&name),
            name,
            repository_id: info.repository_id.clone(),
        }
    }

    pub async fn read_info(&self) -> Result<ClusterInfo, RepoError> {
        let bytes = match self
            .store
            .get_bytes(&self.key("cluster.json"), MAX_META_BYTES)
            .await
        {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => {
                return Err(RepoError::NotInitialised {
                    cluster: self.cluster.clone(),
                    store: self.store.describe(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let info: ClusterInfo = serde_json::from_slice(&bytes)
            .map_err(|e| RepoError::Corrupt(format!("{}: {e}", self.key("cluster.json"))))?;
        if info.format != REPOSITORY_FORMAT {
            return Err(RepoError::Corrupt(format!(
                "{}: repository format {} is not supported by this tidemark (knows {REPOSITORY_FORMAT})",
                self.key("cluster.json"),
                info.format
            )));
        }
        if info.cluster != self.cluster {
            return Err(RepoError::Corrupt(format!(
                "{}: belongs to cluster {:?}, not {:?}",
                self.key("cluster.json"),
                info.cluster,
                self.cluster
            )));
        }
        Ok(info)
    }

    /// Whether cluster.json exists (init writes it last).
    pub async fn is_initialised(&self) -> Result<bool, RepoError> {
        Ok(self.store.head(&self.key("cluster.json")).await?.is_some())
    }

    pub async fn write_info(&self, info: &ClusterInfo) -> Result<(), RepoError> {
        let json =
            serde_json::to_vec_pretty(info).map_err(|e| RepoError::Corrupt(e.to_string()))?;
        self.store
            .put_bytes(&self.key("cluster.json"), Bytes::from(json))
            .await?;
        Ok(())
    }

    pub async fn read_keyring(&self) -> Result<KeyringFile, RepoError> {
        let key = self.key("keys/keyring.json");
        let bytes = match self.store.get_bytes(&key, MAX_META_BYTES).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => {
                return Err(RepoError::Corrupt(format!(
                    "{key} is missing: the repository's data keys are gone"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes).map_err(|e| RepoError::Corrupt(format!("{key}: {e}")))
    }

    pub async fn write_keyring(&self, file: &KeyringFile) -> Result<(), RepoError> {
        let json =
            serde_json::to_vec_pretty(file).map_err(|e| RepoError::Corrupt(e.to_string()))?;
        self.store
            .put_bytes(&self.key("keys/keyring.json"), Bytes::from(json))
            .await?;
        Ok(())
    }

    /// Name (relative to the cluster directory) of an archived WAL file.
    pub fn wal_name(file: &WalFileName) -> String {
        format!("wal/{:08X}/{}", file.timeline, file.name)
    }

    /// Every archived WAL file, parsed; objects with other names are reported as strays.
    pub async fn list_wal(&self) -> Result<(Vec<WalFileName>, Vec<String>), RepoError> {
        let (files, strays) = self.list_wal_meta().await?;
        Ok((files.into_iter().map(|(f, _)| f).collect(), strays))
    }

    /// Like `list_wal`, with the time each file was archived.
    pub async fn list_wal_meta(&self) -> Result<WalListing, RepoError> {
        let prefix = self.key("wal/");
        let mut files = Vec::new();
        let mut strays = Vec::new();
        for meta in self.store.list(&prefix).await? {
            let rel = &meta.key[prefix.len()..];
            let parsed = rel.split_once('/').and_then(|(tli, name)| {
                WalFileName::parse(name).filter(|f| format!("{:08X}", f.timeline) == tli)
            });
            match parsed {
                Some(f) => files.push((f, meta.modified)),
                None => strays.push(meta.key),
            }
        }
        Ok((files, strays))
    }

    /// Every complete backup (one with a manifest), oldest first.
    pub async fn load_manifests(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
    ) -> Result<Vec<BackupManifest>, Error> {
        let prefix = self.key("backups/");
        let mut out = Vec::new();
        for meta in self.store.list(&prefix).await? {
            let rel = &meta.key[prefix.len()..];
            let Some((id, "manifest")) = rel.split_once('/') else {
                continue;
            };
            let obj = self.object(info, BackupManifest::manifest_name(id));
            let (_, bytes) = transfer::get(&self.store, &obj, keyring, false, Vec::new()).await?;
            let m: BackupManifest = serde_json::from_slice(&bytes).map_err(|e| {
                Error::Integrity(format!("{}: manifest does not parse: {e}", obj.key))
            })?;
            if m.id != id {
                return Err(Error::Integrity(format!(
                    "{}: manifest of backup {}",
                    obj.key, m.id
                )));
            }
            // Checked once here, so later code can read the LSNs without a fallback.
            for (what, lsn) in [("start_lsn", &m.start_lsn), ("stop_lsn", &m.stop_lsn)] {
                if lsn.parse::<Lsn>().is_err() {
                    return Err(Error::Integrity(format!(
                        "{}: manifest has an invalid {what} {lsn:?}",
                        obj.key
                    )));
                }
            }
            out.push(m);
        }
        out.sort_by(|a, b| a.stop_time.cmp(&b.stop_time).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Replaces the provisional ends of restorable ranges with what the WAL says: the last
    /// commit or abort record in the last segments of each unbroken run.
    pub async fn resolve_ranges(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
        ranges: &mut [BackupRange],
    ) -> Result<(), Error> {
        let mut cache: std::collections::HashMap<(u32, u64), WalScan> = Default::default();
        for r in ranges.iter_mut().filter(|r| r.restorable) {
            let mut to_time = None;
            let mut to_lsn = None;
            let newest = r.run_tail.len().saturating_sub(1);
            for (i, &(tli, seg)) in r.run_tail.iter().enumerate().rev() {
                let scan = match cache.get(&(tli, seg)) {
                    Some(s) => s.clone(),
                    None => {
                        let s = self.scan_segment(info, keyring, tli, seg).await?;
                        cache.insert((tli, seg), s.clone());
                        s
                    }
                };
                if i == newest {
                    to_lsn = scan.last_record;
                }
                if let Some((t, _)) = scan.last_xact {
                    to_time = Some(t);
                    break;
                }
            }
            r.to_time = Some(to_time.unwrap_or(r.from_time).max(r.from_time));
            if let Some(l) = to_lsn {
                r.to_lsn = Some(l.to_string());
            }
        }
        Ok(())
    }

    async fn scan_segment(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
        tli: u32,
        segno: u64,
    ) -> Result<WalScan, Error> {
        let ss = info.wal_segment_size;
        let name = format!("wal/{tli:08X}/{}", segment_name(tli, segno, ss));
        let obj = self.object(info, name);
        let scanner = WalScanner::new(Lsn(segno * ss));
        let (_, scanner) = transfer::get(&self.store, &obj, keyring, false, scanner).await?;
        Ok(scanner.finish())
    }

    /// The archive's segments and timeline histories, for window computations.
    pub async fn archive_index(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
    ) -> Result<ArchiveIndex, Error> {
        let (files, _) = self.list_wal_meta().await?;
        let mut idx = ArchiveIndex::new(info.wal_segment_size, &files);
        for (f, _) in &files {
            if f.kind != WalFileKind::TimelineHistory {
                continue;
            }
            let obj = self.object(info, Repository::wal_name(f));
            let (_, bytes) = transfer::get(&self.store, &obj, keyring, false, Vec::new()).await?;
            let text = String::from_utf8_lossy(&bytes);
            let parsed = crate::pg::history::parse(&text)
                .map_err(|e| Error::Integrity(format!("{}: {e}", obj.key)))?;
            idx.histories.insert(f.timeline, parsed);
        }
        Ok(idx)
    }
}

/// Whether a WAL file kind carries a segment header that can be checked.
pub fn has_segment_header(kind: WalFileKind) -> bool {
    matches!(kind, WalFileKind::Segment | WalFileKind::Partial)
}

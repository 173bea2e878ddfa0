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

use crate::pg::wal::{WalFileKind, WalFileName};
use crate::pipeline::keys::KeyringFile;
use crate::store::{Store, StoreError};
use crate::transfer::ObjectRef;

pub mod walindex;

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
        let prefix = self.key("wal/");
        let mut files = Vec::new();
        let mut strays = Vec::new();
        for meta in self.store.list(&prefix).await? {
            let rel = &meta.key[prefix.len()..];
            let parsed = rel.split_once('/').and_then(|(tli, name)| {
                WalFileName::parse(name).filter(|f| format!("{:08X}", f.timeline) == tli)
            });
            match parsed {
                Some(f) => files.push(f),
                None => strays.push(meta.key),
            }
        }
        Ok((files, strays))
    }
}

/// Whether a WAL file kind carries a segment header that can be checked.
pub fn has_segment_header(kind: WalFileKind) -> bool {
    matches!(kind, WalFileKind::Segment | WalFileKind::Partial)
}

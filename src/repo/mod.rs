//! The repository catalog: what each object of a cluster's repository is called and means, and
//! every read and write of it. Operations name objects through `layout` and move them through
//! `Repository`'s methods; they never compose a name or reach the store themselves.
//!
//! Each cluster has its own directory (`layout` lists what it holds; docs/format.md is
//! normative) and master key: nothing is shared between clients.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::pg::wal::{Lsn, segment_name};
use crate::pg::wal::{WalFileKind, WalFileName};
use crate::pg::walscan::{WalScan, WalScanner};
use crate::pipeline::crypt::DecodeStats;
use crate::pipeline::keys::KeyringFile;
use crate::pipeline::{EncodeOptions, EncodeStats, Keyring, PipelineError};
use crate::store::{ObjectMeta, Store, StoreError};
use crate::transfer::{self, ObjectRef, TransferError};
use window::{ArchiveIndex, BackupRange};

/// Archived WAL files with the time each was stored, and objects that are not WAL files.
pub type WalListing = (
    Vec<(WalFileName, Option<chrono::DateTime<chrono::Utc>>)>,
    Vec<String>,
);

pub mod backups;
pub mod layout;
pub mod lease;
pub mod manifest;
pub mod walindex;
pub mod window;

pub use backups::BACKUP_LOCK_KEY;

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

/// What the catalog fails with; `error::Error` maps it to an exit code (Corrupt and
/// NotInitialised: repository; Integrity: integrity; Store: store; Pipeline: as the pipeline's
/// errors map).
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "cluster {cluster} has no repository in {store}: run `tidemark --cluster {cluster} init` first"
    )]
    NotInitialised { cluster: String, store: String },
    /// Metadata that is missing, unreadable or of another format or cluster.
    #[error("{0}")]
    Corrupt(String),
    /// An object whose content is not what its name says (a manifest that does not parse, or
    /// names another backup).
    #[error("{0}")]
    Integrity(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Encoding or decoding an encrypted object failed (keys, format, authentication).
    #[error(transparent)]
    Pipeline(PipelineError),
}

impl From<TransferError> for RepoError {
    fn from(e: TransferError) -> RepoError {
        match e {
            TransferError::Store(s) => RepoError::Store(s),
            TransferError::Pipeline(p) => RepoError::Pipeline(p),
        }
    }
}

/// An object a listing found: its name (relative to the cluster directory) and its metadata
/// (`meta.key` is the full store key).
#[derive(Debug, Clone)]
pub struct StoredObject {
    pub name: String,
    pub meta: ObjectMeta,
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

    /// A printable name of the store (URL without credentials).
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The name (relative to the cluster directory) of a key a listing of this repository
    /// returned; None for a key outside it.
    pub fn name_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.cluster.as_str())?.strip_prefix('/')
    }

    // Plain objects: metadata people and other hosts read without keys.

    /// Writes plain JSON object `name`, pretty-printed.
    pub async fn put_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), RepoError> {
        let json =
            serde_json::to_vec_pretty(value).map_err(|e| RepoError::Corrupt(e.to_string()))?;
        self.put_plain(name, Bytes::from(json)).await
    }

    /// Reads plain JSON object `name` (at most `limit` bytes); None when there is none.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        name: &str,
        limit: u64,
    ) -> Result<Option<T>, RepoError> {
        let bytes = match self.get_plain(name, limit).await {
            Ok(b) => b,
            Err(RepoError::Store(StoreError::NotFound { .. })) => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RepoError::Corrupt(format!("{}: {e}", self.key(name))))
    }

    /// Stores plain object `name` in one piece.
    pub async fn put_plain(&self, name: &str, data: Bytes) -> Result<(), RepoError> {
        Ok(self.store.put_bytes(&self.key(name), data).await?)
    }

    /// Reads plain object `name` whole, refusing one larger than `limit` bytes.
    pub async fn get_plain(&self, name: &str, limit: u64) -> Result<Vec<u8>, RepoError> {
        Ok(self.store.get_bytes(&self.key(name), limit).await?)
    }

    // Any object.

    pub async fn head(&self, name: &str) -> Result<Option<ObjectMeta>, RepoError> {
        Ok(self.store.head(&self.key(name)).await?)
    }

    pub async fn exists(&self, name: &str) -> Result<bool, RepoError> {
        Ok(self.head(name).await?.is_some())
    }

    /// Deletes object `name`; a missing one is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), RepoError> {
        Ok(self.store.delete(&self.key(name)).await?)
    }

    /// Every object whose name starts with `prefix`, sorted by name.
    pub async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>, RepoError> {
        let skip = self.cluster.len() + 1;
        Ok(self
            .store
            .list(&self.key(prefix))
            .await?
            .into_iter()
            .map(|meta| StoredObject {
                name: meta.key[skip..].to_string(),
                meta,
            })
            .collect())
    }

    /// Makes an existing object durable (see `Store::ensure_durable`).
    pub async fn ensure_durable(&self, name: &str) -> Result<(), RepoError> {
        Ok(self.store.ensure_durable(&self.key(name)).await?)
    }

    // Encrypted objects, through the pipeline.

    /// Encodes everything `src` yields into new object `obj`; returns once it is durable.
    pub async fn put_object<R: Read + Send + 'static>(
        &self,
        obj: &ObjectRef,
        keyring: &Arc<Keyring>,
        opts: EncodeOptions,
        src: R,
    ) -> Result<EncodeStats, RepoError> {
        Ok(transfer::put(&self.store, obj, keyring, opts, src).await?)
    }

    /// Decodes object `obj` into `dst`, each chunk authenticated before it reaches `dst`.
    pub async fn get_object<W: Write + Send + 'static>(
        &self,
        obj: &ObjectRef,
        keyring: &Arc<Keyring>,
        want_sha256: bool,
        dst: W,
    ) -> Result<(DecodeStats, W), RepoError> {
        Ok(transfer::get(&self.store, obj, keyring, want_sha256, dst).await?)
    }

    // cluster.json and the keyring.

    pub async fn read_info(&self) -> Result<ClusterInfo, RepoError> {
        let name = layout::cluster_info();
        let Some(info) = self.get_json::<ClusterInfo>(name, MAX_META_BYTES).await? else {
            return Err(RepoError::NotInitialised {
                cluster: self.cluster.clone(),
                store: self.store.describe(),
            });
        };
        if info.format != REPOSITORY_FORMAT {
            return Err(RepoError::Corrupt(format!(
                "{}: repository format {} is not supported by this tidemark (knows {REPOSITORY_FORMAT})",
                self.key(name),
                info.format
            )));
        }
        if info.cluster != self.cluster {
            return Err(RepoError::Corrupt(format!(
                "{}: belongs to cluster {:?}, not {:?}",
                self.key(name),
                info.cluster,
                self.cluster
            )));
        }
        Ok(info)
    }

    /// Whether cluster.json exists (init writes it last).
    pub async fn is_initialised(&self) -> Result<bool, RepoError> {
        self.exists(layout::cluster_info()).await
    }

    pub async fn write_info(&self, info: &ClusterInfo) -> Result<(), RepoError> {
        self.put_json(layout::cluster_info(), info).await
    }

    pub async fn read_keyring(&self) -> Result<KeyringFile, RepoError> {
        let name = layout::keyring();
        self.get_json(name, MAX_META_BYTES).await?.ok_or_else(|| {
            RepoError::Corrupt(format!(
                "{} is missing: the repository's data keys are gone",
                self.key(name)
            ))
        })
    }

    pub async fn write_keyring(&self, file: &KeyringFile) -> Result<(), RepoError> {
        self.put_json(layout::keyring(), file).await
    }

    // The WAL archive.

    /// Name (relative to the cluster directory) of an archived WAL file; `layout::wal`.
    pub fn wal_name(file: &WalFileName) -> String {
        layout::wal(file)
    }

    /// Every archived WAL file, parsed; objects with other names are reported as strays.
    pub async fn list_wal(&self) -> Result<(Vec<WalFileName>, Vec<String>), RepoError> {
        let (files, strays) = self.list_wal_meta().await?;
        Ok((files.into_iter().map(|(f, _)| f).collect(), strays))
    }

    /// Like `list_wal`, with the time each file was archived.
    pub async fn list_wal_meta(&self) -> Result<WalListing, RepoError> {
        let mut files = Vec::new();
        let mut strays = Vec::new();
        for o in self.list_wal_objects().await? {
            match o.file {
                Some(f) if o.in_place => files.push((f, o.meta.modified)),
                _ => strays.push(o.meta.key),
            }
        }
        Ok((files, strays))
    }

    /// Every object under `wal/`, with the WAL file its name is (if it is one).
    pub async fn list_wal_objects(&self) -> Result<Vec<WalObject>, RepoError> {
        Ok(self
            .list(layout::wal_prefix())
            .await?
            .into_iter()
            .map(|o| {
                let parsed = layout::split_wal(&o.name)
                    .and_then(|(tli, name)| WalFileName::parse(name).map(|f| (tli, f)));
                let in_place = parsed
                    .as_ref()
                    .is_some_and(|(tli, f)| format!("{:08X}", f.timeline) == *tli);
                WalObject {
                    file: parsed.map(|(_, f)| f),
                    in_place,
                    meta: o.meta,
                }
            })
            .collect())
    }

    /// The names of timeline `timeline`'s archived files that start with `name_prefix` (a
    /// narrow listing: a timeline's archive grows to many thousands of objects).
    pub async fn archived_wal_names(
        &self,
        timeline: u32,
        name_prefix: &str,
    ) -> Result<std::collections::HashSet<String>, RepoError> {
        let dir = layout::wal_timeline(timeline);
        Ok(self
            .list(&format!("{dir}{name_prefix}"))
            .await?
            .into_iter()
            .map(|o| o.name[dir.len()..].to_string())
            .collect())
    }

    /// Replaces the provisional ends of restorable ranges with what the WAL says: the last
    /// commit or abort record in the last segments of each unbroken run.
    pub async fn resolve_ranges(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
        ranges: &mut [BackupRange],
    ) -> Result<(), RepoError> {
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
    ) -> Result<WalScan, RepoError> {
        let ss = info.wal_segment_size;
        let obj = self.object(info, layout::wal_file(tli, &segment_name(tli, segno, ss)));
        let scanner = WalScanner::new(Lsn(segno * ss));
        let (_, scanner) = self.get_object(&obj, keyring, false, scanner).await?;
        Ok(scanner.finish())
    }

    /// The archive's segments and timeline histories, for window computations.
    pub async fn archive_index(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
    ) -> Result<ArchiveIndex, RepoError> {
        let (files, _) = self.list_wal_meta().await?;
        let mut idx = ArchiveIndex::new(info.wal_segment_size, &files);
        for (f, _) in &files {
            if f.kind != WalFileKind::TimelineHistory {
                continue;
            }
            let obj = self.object(info, layout::wal(f));
            let (_, bytes) = self.get_object(&obj, keyring, false, Vec::new()).await?;
            let text = String::from_utf8_lossy(&bytes);
            let parsed = crate::pg::history::parse(&text)
                .map_err(|e| RepoError::Integrity(format!("{}: {e}", obj.key)))?;
            idx.histories.insert(f.timeline, parsed);
        }
        Ok(idx)
    }
}

/// An object under `wal/` (see `Repository::list_wal_objects`).
#[derive(Debug, Clone)]
pub struct WalObject {
    pub meta: ObjectMeta,
    /// The WAL file its name is, whatever timeline directory holds it.
    pub file: Option<WalFileName>,
    /// Filed where wal-push puts it: under its own timeline's directory. Listings take only
    /// these as archived files; anything else is a stray.
    pub in_place: bool,
}

/// Whether a WAL file kind carries a segment header that can be checked.
pub fn has_segment_header(kind: WalFileKind) -> bool {
    matches!(kind, WalFileKind::Segment | WalFileKind::Partial)
}

//! Backups in the repository: `backups/<id>/` from its `started` marker to its manifest, and
//! the removal of backups that never got one.
//!
//! A backup exists only with its manifest, written last. Everything before it is invisible to
//! `list` and `restore`, and removed whole by `remove_incomplete`, which is safe only while no
//! backup runs: under the cluster's backup lock (`BACKUP_LOCK_KEY`).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::manifest::{BackupManifest, RowCounts};
use super::{ClusterInfo, RepoError, Repository, layout};
use crate::pg::wal::Lsn;
use crate::pipeline::{EncodeOptions, Keyring};

/// PostgreSQL advisory lock key of "a backup of this cluster is running" (ASCII "tidemark"),
/// taken on the cluster's primary by `backup`, and by `expire` before it removes leftovers.
pub const BACKUP_LOCK_KEY: i64 = 0x7469_6465_6d61_726b;

impl Repository {
    /// Whether anything of backup `id` exists (a backup id is never reused).
    pub async fn backup_id_taken(&self, id: &str) -> Result<bool, RepoError> {
        Ok(!self.list(&layout::backup_prefix(id)).await?.is_empty())
    }

    /// Writes `backups/<id>/started`, before anything else of the backup exists, so whatever
    /// a crash leaves (even only temporary files) is found and removed by the next run.
    pub async fn mark_backup_started(&self, id: &str) -> Result<(), RepoError> {
        let marker = serde_json::json!({
            "id": id,
            "host": crate::host::hostname(),
            "pid": std::process::id(),
            "started": chrono::Utc::now(),
        });
        self.put_plain(&layout::backup_started(id), Bytes::from(marker.to_string()))
            .await
    }

    /// Writes a backup's row counts (encrypted), before its manifest.
    pub async fn write_counts(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
        encode: EncodeOptions,
        counts: &RowCounts,
    ) -> Result<(), RepoError> {
        let json = serde_json::to_vec(counts).map_err(|e| RepoError::Corrupt(e.to_string()))?;
        let obj = self.object(info, layout::counts(&counts.backup));
        self.put_object(&obj, keyring, encode, std::io::Cursor::new(json))
            .await?;
        Ok(())
    }

    /// Writes a backup's manifest (encrypted), last: from then on the backup exists.
    pub async fn write_manifest(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
        encode: EncodeOptions,
        manifest: &BackupManifest,
    ) -> Result<(), RepoError> {
        let json = serde_json::to_vec(manifest).map_err(|e| RepoError::Corrupt(e.to_string()))?;
        let obj = self.object(info, layout::manifest(&manifest.id));
        self.put_object(&obj, keyring, encode, std::io::Cursor::new(json))
            .await?;
        Ok(())
    }

    /// Every complete backup (one with a manifest), oldest first.
    pub async fn load_manifests(
        &self,
        info: &ClusterInfo,
        keyring: &Arc<Keyring>,
    ) -> Result<Vec<BackupManifest>, RepoError> {
        let mut out = Vec::new();
        for o in self.list(layout::backups_prefix()).await? {
            let Some((id, rest)) = layout::split_backup(&o.name) else {
                continue;
            };
            if !layout::is_manifest(rest) {
                continue;
            }
            let obj = self.object(info, layout::manifest(id));
            let (_, bytes) = self.get_object(&obj, keyring, false, Vec::new()).await?;
            let m: BackupManifest = serde_json::from_slice(&bytes).map_err(|e| {
                RepoError::Integrity(format!("{}: manifest does not parse: {e}", obj.key))
            })?;
            if m.id != id {
                return Err(RepoError::Integrity(format!(
                    "{}: manifest of backup {}",
                    obj.key, m.id
                )));
            }
            // Checked once here, so later code can read the LSNs without a fallback.
            for (what, lsn) in [("start_lsn", &m.start_lsn), ("stop_lsn", &m.stop_lsn)] {
                if lsn.parse::<Lsn>().is_err() {
                    return Err(RepoError::Integrity(format!(
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

    /// Deletes a complete backup: its manifest first, so from then on it is an incomplete
    /// one (never a listed backup with missing files), then everything else of it.
    pub async fn delete_backup(&self, id: &str) -> Result<(), RepoError> {
        self.delete(&layout::manifest(id)).await?;
        self.delete_backup_objects(id).await
    }

    /// Deletes everything of backup `id`, including what crashed writers left (local
    /// temporary files, unfinished multipart uploads).
    pub async fn delete_backup_objects(&self, id: &str) -> Result<(), RepoError> {
        Ok(self
            .store()
            .remove_prefix(&self.key(&layout::backup_prefix(id)))
            .await?)
    }

    /// Deletes every backup directory that has no manifest, and returns their ids. Only safe
    /// while holding the backup lock (no backup can be in progress).
    pub async fn remove_incomplete(&self) -> Result<Vec<String>, RepoError> {
        // Every backup directory holds a `started` marker from its first moment on.
        let mut has_manifest: BTreeMap<String, bool> = BTreeMap::new();
        for o in self.list(layout::backups_prefix()).await? {
            let Some((id, rest)) = layout::split_backup(&o.name) else {
                continue;
            };
            *has_manifest.entry(id.to_string()).or_default() |= layout::is_manifest(rest);
        }
        let mut removed = Vec::new();
        for (id, complete) in has_manifest {
            if complete {
                continue;
            }
            self.delete_backup_objects(&id).await?;
            tracing::info!(backup = %id, "removed leftovers of an incomplete backup");
            removed.push(id);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    #[tokio::test]
    async fn incomplete_backups_are_removed_complete_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::new(Arc::new(LocalStore::new(d.path().to_path_buf())), "c");
        for name in [
            layout::backup_started("a"),
            layout::pack("a", 0),
            layout::manifest("a"),
            layout::backup_started("b"),
            layout::pack("b", 0),
        ] {
            repo.put_plain(&name, Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        assert!(repo.backup_id_taken("b").await.unwrap());
        assert_eq!(repo.remove_incomplete().await.unwrap(), ["b"]);
        assert!(!repo.backup_id_taken("b").await.unwrap());
        assert!(repo.exists(&layout::pack("a", 0)).await.unwrap());
        repo.delete_backup("a").await.unwrap();
        assert!(!repo.backup_id_taken("a").await.unwrap());
    }
}

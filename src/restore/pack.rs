//! Downloading a backup's packs into the restored files: each pack object streamed once
//! through the pipeline (authenticated chunk by chunk), its extents written at their offsets
//! and each checked against the manifest's SHA-256.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::digest;

use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::parallel::run_bounded;
use crate::progress::Progress;
use crate::repo::RepoError;
use crate::repo::manifest::{BackupManifest, Extent};

/// Every extent to restore, grouped by the pack that holds it.
#[derive(Default)]
pub(super) struct ExtentsByPack {
    by_pack: HashMap<u32, Vec<ExtentTarget>>,
    /// Bytes of all extents.
    pub(super) total: u64,
}

impl ExtentsByPack {
    /// The extents of the manifest's `manifest_path`, restored into `path`.
    pub(super) fn add(&mut self, manifest_path: &str, path: &Path, extents: &[Extent]) {
        for e in extents {
            self.total += e.length;
            self.by_pack.entry(e.pack).or_default().push(ExtentTarget {
                manifest_path: manifest_path.to_string(),
                path: path.to_path_buf(),
                pack_offset: e.pack_offset,
                file_offset: e.file_offset,
                length: e.length,
                sha256: e.sha256.clone(),
            });
        }
    }
}

/// Downloads every pack, `parallelism` at a time, into the files (which exist at their size).
pub(super) async fn download(
    cluster: &ClusterHandle,
    info: &crate::repo::ClusterInfo,
    keyring: &Arc<crate::pipeline::Keyring>,
    backup: &BackupManifest,
    work: ExtentsByPack,
    parallelism: usize,
) -> Result<(), Error> {
    let progress = Progress::start("restore", work.total);
    let mut packs: Vec<(u32, Vec<ExtentTarget>)> = work.by_pack.into_iter().collect();
    packs.sort_by_key(|(id, _)| *id);
    let jobs = packs.into_iter().map(|(pack_id, mut extents)| {
        extents.sort_by_key(|e| e.pack_offset);
        let repo = cluster.repo.clone();
        let obj = cluster
            .repo
            .object(info, crate::repo::layout::pack(&backup.id, pack_id));
        let keyring = keyring.clone();
        let counter = progress.counter();
        let backup_id = backup.id.clone();
        async move {
            // A stream that breaks mid-pack (the store's requests are retried, a broken
            // download is not) is fetched again whole: extents are rewritten at their offsets
            // and re-verified, so a retry cannot mix old and new bytes unchecked.
            let mut attempt = 0;
            let splitter = loop {
                attempt += 1;
                let splitter = PackSplitter::new(extents.clone(), counter.clone());
                match repo.get_object(&obj, &keyring, false, splitter).await {
                    Ok((_, s)) => break s,
                    Err(RepoError::Store(e)) if e.is_retryable() && attempt < 3 => {
                        tracing::warn!(pack = pack_id, attempt, error = %e, "pack download failed, retrying");
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            splitter.finish().map_err(|e| {
                Error::Integrity(format!(
                    "backup {backup_id}, pack {pack_id} ({}): {e}",
                    obj.key
                ))
            })
        }
    });
    let done = run_bounded(jobs, parallelism).await;
    progress.finish().await;
    done?;
    Ok(())
}

#[derive(Debug, Clone)]
struct ExtentTarget {
    manifest_path: String,
    path: PathBuf,
    pack_offset: u64,
    file_offset: u64,
    length: u64,
    sha256: String,
}

/// Receives a pack's decoded content and writes each extent into its file at its offset,
/// checking each extent's SHA-256 against the manifest.
struct PackSplitter {
    extents: Vec<ExtentTarget>,
    idx: usize,
    pos: u64,
    done_in_extent: u64,
    file: Option<File>,
    hasher: Option<digest::Context>,
    progress: Arc<AtomicU64>,
}

impl PackSplitter {
    fn new(extents: Vec<ExtentTarget>, progress: Arc<AtomicU64>) -> PackSplitter {
        PackSplitter {
            extents,
            idx: 0,
            pos: 0,
            done_in_extent: 0,
            file: None,
            hasher: None,
            progress,
        }
    }

    fn finish(self) -> Result<(), String> {
        if self.idx < self.extents.len() {
            return Err(format!(
                "pack ended before the extent of {} at pack offset {}",
                self.extents[self.idx].manifest_path, self.extents[self.idx].pack_offset
            ));
        }
        Ok(())
    }
}

impl Write for PackSplitter {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let n = data.len();
        while !data.is_empty() {
            let Some(ext) = self.extents.get(self.idx) else {
                // Bytes the manifest does not account for: other files' extents in the same pack
                // are not expected, so this is a mismatch.
                return Err(io::Error::other(
                    "pack holds more bytes than the manifest lists",
                ));
            };
            if self.pos < ext.pack_offset {
                // Skip bytes no restored file needs (cannot happen with tidemark's packs).
                let skip = (ext.pack_offset - self.pos).min(data.len() as u64) as usize;
                data = &data[skip..];
                self.pos += skip as u64;
                continue;
            }
            if self.file.is_none() {
                self.file = Some(
                    OpenOptions::new()
                        .write(true)
                        .open(&ext.path)
                        .map_err(|e| {
                            io::Error::new(e.kind(), format!("{}: {e}", ext.path.display()))
                        })?,
                );
                self.hasher = Some(digest::Context::new(&digest::SHA256));
                self.done_in_extent = 0;
            }
            let take = ((ext.length - self.done_in_extent) as usize).min(data.len());
            if let Some(f) = &self.file {
                f.write_all_at(&data[..take], ext.file_offset + self.done_in_extent)?;
            }
            if let Some(h) = self.hasher.as_mut() {
                h.update(&data[..take]);
            }
            self.done_in_extent += take as u64;
            self.pos += take as u64;
            self.progress.fetch_add(take as u64, Ordering::Relaxed);
            data = &data[take..];
            if self.done_in_extent == ext.length {
                let got = self
                    .hasher
                    .take()
                    .map(|h| hex::encode(h.finish()))
                    .unwrap_or_default();
                if got != ext.sha256 {
                    return Err(io::Error::other(format!(
                        "{}: checksum mismatch at offset {} ({} bytes): the backup is damaged",
                        ext.manifest_path, ext.file_offset, ext.length
                    )));
                }
                self.file = None;
                self.idx += 1;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

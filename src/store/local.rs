//! A repository on a local (or network-mounted POSIX) filesystem.
//!
//! Durability: an object is written to a hidden temporary file in its final directory, fsynced,
//! renamed over its final name and the directory fsynced; directories created on the way are
//! fsynced into their parents. A crash at any point leaves either no object or the complete
//! one, plus at worst a hidden temporary file that listing ignores.

use std::io;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{ObjectMeta, ObjectReader, ObjectWriter, Store, StoreError, validate_key};

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key).map_err(|detail| self.failed(op, key, detail))?;
        Ok(self.root.join(key))
    }

    fn failed(&self, op: &'static str, key: &str, detail: String) -> StoreError {
        StoreError::Failed {
            store: self.describe(),
            op,
            key: key.to_string(),
            detail,
        }
    }

    fn io_error(&self, op: &'static str, key: &str, e: io::Error) -> StoreError {
        if e.kind() == io::ErrorKind::NotFound {
            StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            }
        } else {
            self.failed(op, key, e.to_string())
        }
    }
}

/// Creates `dir` and any missing parents, fsyncing each new directory's parent so the new
/// entries survive a crash.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[async_trait]
impl Store for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        let path = self.path("create", key)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut rnd = [0u8; 8];
        crate::rand::random_bytes(&mut rnd)
            .map_err(|e| self.failed("create", key, e.to_string()))?;
        let tmp = dir.join(format!(".{name}.tmp.{}", hex::encode(rnd)));
        let d = dir.clone();
        tokio::task::spawn_blocking(move || create_dir_durable(&d))
            .await
            .map_err(|e| self.failed("create", key, e.to_string()))?
            .map_err(|e| self.failed("create", key, format!("{}: {e}", dir.display())))?;
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(|e| self.failed("create", key, format!("{}: {e}", tmp.display())))?;
        Ok(Box::new(LocalWriter {
            store: self.describe(),
            key: key.to_string(),
            file: Some(file),
            tmp,
            path,
            dir,
            written: 0,
            committed: false,
        }))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError> {
        let path = self.path("get", key)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| self.io_error("get", key, e))?;
        Ok(Box::pin(tokio::io::BufReader::with_capacity(
            256 * 1024,
            file,
        )))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.path("head", key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                modified: m.modified().ok().map(Into::into),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.failed("head", key, e.to_string())),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let root = self.root.clone();
        let prefix_owned = prefix.to_string();
        let res = tokio::task::spawn_blocking(move || {
            // Start from the deepest directory the prefix names completely.
            let base = match prefix_owned.rfind('/') {
                Some(i) => &prefix_owned[..i],
                None => "",
            };
            let mut out = Vec::new();
            walk(&root, &root.join(base), &prefix_owned, &mut out)?;
            out.sort_by(|a: &ObjectMeta, b| a.key.cmp(&b.key));
            Ok::<_, io::Error>(out)
        })
        .await
        .map_err(|e| self.failed("list", prefix, e.to_string()))?;
        res.map_err(|e| self.failed("list", prefix, e.to_string()))
    }

    async fn ensure_durable(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path("fsync", key)?;
        let res = tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)?.sync_all()?;
            match path.parent() {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| self.failed("fsync", key, e.to_string()))?;
        res.map_err(|e| self.io_error("fsync", key, e))
    }

    async fn remove_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let dir = prefix.strip_suffix('/').unwrap_or("");
        let path = self.path("remove", dir)?;
        let parent = path.parent().map(Path::to_path_buf);
        let res = tokio::task::spawn_blocking(move || {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            if let Some(p) = parent {
                std::fs::File::open(p)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| self.failed("remove", prefix, e.to_string()))?;
        res.map_err(|e| self.failed("remove", prefix, e.to_string()))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path("delete", key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.failed("delete", key, e.to_string())),
        }
        if let Some(dir) = path.parent() {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
                .await
                .map_err(|e| self.failed("delete", key, e.to_string()))?
                .map_err(|e| self.failed("delete", key, e.to_string()))?;
        }
        Ok(())
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue; // temporary files of writers in progress or crashed
        }
        let path = entry.path();
        let ft = entry.file_type()?;
        let Ok(rel) = path.strip_prefix(root) else {
            continue;
        };
        let key = rel.to_string_lossy().into_owned();
        if ft.is_dir() {
            // Descend only where keys below can match the prefix.
            let as_dir = format!("{key}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                walk(root, &path, prefix, out)?;
            }
        } else if ft.is_file() && key.starts_with(prefix) {
            // Deleted since read_dir saw it (expire running beside a listing): the listing is
            // a snapshot of some moment, and at that moment it may already be gone.
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(ObjectMeta {
                key,
                size: meta.len(),
                modified: meta.modified().ok().map(Into::into),
            });
        }
    }
    Ok(())
}

struct LocalWriter {
    store: String,
    key: String,
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    written: u64,
    committed: bool,
}

impl LocalWriter {
    fn failed(&self, op: &'static str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Failed {
            store: self.store.clone(),
            op,
            key: self.key.clone(),
            detail: e.to_string(),
        }
    }
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError> {
        let Some(file) = self.file.as_mut() else {
            return Err(self.failed("write", "writer already closed"));
        };
        if let Err(e) = file.write_all(&data).await {
            return Err(self.failed("write", e));
        }
        self.written += data.len() as u64;
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<u64, StoreError> {
        let Some(mut file) = self.file.take() else {
            return Err(self.failed("commit", "writer already closed"));
        };
        // Durable before visible: data, then the name, then the directory entry.
        if let Err(e) = file.flush().await {
            return Err(self.failed("commit", e));
        }
        if let Err(e) = file.sync_all().await {
            return Err(self.failed("fsync", e));
        }
        drop(file);
        if let Err(e) = tokio::fs::rename(&self.tmp, &self.path).await {
            return Err(self.failed("rename", e));
        }
        self.committed = true;
        let dir = self.dir.clone();
        let synced =
            tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all()).await;
        match synced {
            Ok(Ok(())) => Ok(self.written),
            Ok(Err(e)) => Err(self.failed("fsync directory", e)),
            Err(e) => Err(self.failed("fsync directory", e)),
        }
    }

    async fn abort(mut self: Box<Self>) {
        self.file.take();
        let _ = tokio::fs::remove_file(&self.tmp).await;
        self.committed = true; // nothing left for Drop to clean
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Regression (seen in a daemon soak): a listing beside an expire failed with "No such
    /// file or directory" when a file went between read_dir and its stat.
    #[test]
    fn listing_survives_concurrent_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("c/wal/00000001");
        std::fs::create_dir_all(&wal).unwrap();
        for i in 0..3000 {
            std::fs::write(wal.join(format!("{i:024}")), b"x").unwrap();
        }
        let w = wal.clone();
        let deleter = std::thread::spawn(move || {
            for i in 0..3000 {
                std::fs::remove_file(w.join(format!("{i:024}"))).unwrap();
            }
        });
        let mut lists = 0;
        while !deleter.is_finished() {
            let mut out = Vec::new();
            walk(dir.path(), dir.path(), "c/wal/", &mut out).expect("listing failed");
            lists += 1;
        }
        deleter.join().unwrap();
        assert!(lists > 0);
    }

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path().to_path_buf());
        s.put_bytes("a/b/c1", Bytes::from_static(b"one"))
            .await
            .unwrap();
        s.put_bytes("a/b/c2", Bytes::from_static(b"two!"))
            .await
            .unwrap();
        s.put_bytes("a/x", Bytes::from_static(b"")).await.unwrap();
        let mut buf = String::new();
        s.get("a/b/c2")
            .await
            .unwrap()
            .read_to_string(&mut buf)
            .await
            .unwrap();
        assert_eq!(buf, "two!");
        let keys: Vec<_> = s
            .list("a/b/")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["a/b/c1", "a/b/c2"]);
        let keys: Vec<_> = s
            .list("a/b/c")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, ["a/b/c1", "a/b/c2"]);
        assert_eq!(s.list("a/").await.unwrap().len(), 3);
        assert_eq!(s.list("zzz/").await.unwrap().len(), 0);
        assert_eq!(s.head("a/b/c2").await.unwrap().unwrap().size, 4);
        assert!(s.head("a/b/nope").await.unwrap().is_none());
        assert!(s.get("a/b/nope").await.err().unwrap().is_not_found());
        s.delete("a/b/c1").await.unwrap();
        s.delete("a/b/c1").await.unwrap();
        assert_eq!(s.list("a/b/").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn uncommitted_writers_leave_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path().to_path_buf());
        let mut w = s.create("k/obj").await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        assert!(s.head("k/obj").await.unwrap().is_none());
        assert!(
            s.list("k/").await.unwrap().is_empty(),
            "temp file must not be listed"
        );
        drop(w);
        let mut w = s.create("k/obj").await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        w.abort().await;
        assert_eq!(std::fs::read_dir(dir.path().join("k")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path().join("repo"));
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "a/.hidden", ""] {
            assert!(s.create(bad).await.is_err(), "{bad}");
        }
    }
}

//! Object stores: one trait, two backends (`local` for file:// URLs, `s3` for s3:// URLs).
//!
//! A store holds opaque objects under '/'-separated keys relative to its root. Contracts every
//! backend keeps:
//! - an object becomes visible only complete, after `ObjectWriter::commit` returned Ok, and is
//!   durable then (local: fsync of file and directory; S3: the PUT/CompleteMultipartUpload
//!   succeeded); a writer dropped or aborted before commit leaves nothing visible;
//! - `get` of a missing key is `StoreError::NotFound`, never an empty object;
//! - transient failures (connection, throttling, 5xx) are retried with backoff until the
//!   configured deadline, then reported as `StoreError::Unavailable`.

pub mod local;
pub mod s3;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Metadata of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store root.
    pub key: String,
    pub size: u64,
    /// When the object was last written, as the store reports it (local: mtime; S3:
    /// Last-Modified). Used to tell when WAL was archived.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{key}: not found in {store}")]
    NotFound { store: String, key: String },
    /// Retries are exhausted or the failure is a connection/timeout/5xx error: retrying later
    /// may succeed.
    #[error("{store} unavailable ({op} {key}): {detail}")]
    Unavailable {
        store: String,
        op: &'static str,
        key: String,
        detail: String,
    },
    /// A failure retrying cannot fix (permission denied, bad bucket, invalid request).
    #[error("{store}: {op} {key} failed: {detail}")]
    Failed {
        store: String,
        op: &'static str,
        key: String,
        detail: String,
    },
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// Streams one new object into the store.
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends bytes. May upload in the background; memory held is bounded by the backend.
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError>;
    /// Makes the object visible and durable; returns its size.
    async fn commit(self: Box<Self>) -> Result<u64, StoreError>;
    /// Discards everything written. Dropping an uncommitted writer does the same on a best
    /// effort basis; `abort` waits for the cleanup.
    async fn abort(self: Box<Self>);
}

#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// A printable name of the store (URL without credentials).
    fn describe(&self) -> String;
    async fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError>;
    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError>;
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
    /// Deletes an object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Makes an existing object durable (local: fsync the file and its directory, in case the
    /// writer that renamed it died before its directory fsync; S3: objects are durable once
    /// visible). Used when an already-stored object is accepted as a success again.
    async fn ensure_durable(&self, _key: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Deletes everything under `prefix` (which must end with '/'), including what crashed
    /// writers left behind: local temporary files, unfinished S3 multipart uploads.
    async fn remove_prefix(&self, prefix: &str) -> Result<(), StoreError>;

    /// Stores a small object in one piece.
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let mut w = self.create(key).await?;
        match w.write(data).await {
            Ok(()) => w.commit().await.map(|_| ()),
            Err(e) => {
                w.abort().await;
                Err(e)
            }
        }
    }

    /// Reads a small object whole, refusing objects larger than `limit` bytes.
    async fn get_bytes(&self, key: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        let r = self.get(key).await?;
        let mut buf = Vec::new();
        r.take(limit + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| StoreError::Unavailable {
                store: self.describe(),
                op: "read",
                key: key.to_string(),
                detail: e.to_string(),
            })?;
        if buf.len() as u64 > limit {
            return Err(StoreError::Failed {
                store: self.describe(),
                op: "read",
                key: key.to_string(),
                detail: format!("object larger than {limit} bytes"),
            });
        }
        Ok(buf)
    }
}

/// Settings shared by the backends.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Give up retrying a request after this long.
    pub retry_deadline: Duration,
    /// Timeout for one attempt to connect.
    pub connect_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            retry_deadline: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a store cannot be opened: the repository URL or the S3 settings are wrong. Nothing has
/// been requested from the store yet, so retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("repository url {url:?}: a file URL needs an absolute path (file:///var/lib/tidemark)")]
    RelativeFileUrl { url: String },
    #[error("repository url {url:?}: missing bucket name")]
    MissingBucket { url: String },
    #[error("repository url {url:?}: must start with file:// or s3://")]
    UnknownScheme { url: String },
    #[error("repository: set both access_key_id and secret_access_key, or neither")]
    HalfCredentials,
    /// repository.ca_file cannot be read or is not a usable certificate.
    #[error("repository.ca_file {}: {detail}", .path.display())]
    CaFile {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("repository.ca_file {}: no PEM certificate in it", .path.display())]
    CaFileWithoutCertificate { path: std::path::PathBuf },
}

/// Opens the store a repository URL names: `file:///abs/path` or `s3://bucket[/prefix]`. No
/// request is made yet.
pub async fn from_url(
    url: &str,
    s3: &s3::S3Settings,
    opts: &StoreOptions,
) -> Result<Arc<dyn Store>, OpenError> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(OpenError::RelativeFileUrl { url: url.into() });
        }
        Ok(Arc::new(local::LocalStore::new(path.into())))
    } else if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(OpenError::MissingBucket { url: url.into() });
        }
        let store = s3::S3Store::new(bucket, prefix.trim_matches('/'), s3, opts).await?;
        Ok(Arc::new(store))
    } else {
        Err(OpenError::UnknownScheme { url: url.into() })
    }
}

/// Rejects keys that could escape the root or alias another key. Components may not start
/// with '.': the local store keeps its temporary files under such names.
pub(crate) fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty()
        || key.starts_with('/')
        || key.ends_with('/')
        || key.split('/').any(|c| c.is_empty() || c.starts_with('.'))
    {
        return Err(format!("invalid object key {key:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_urls_are_named() {
        let open = |url: &'static str| async move {
            from_url(url, &s3::S3Settings::default(), &StoreOptions::default())
                .await
                .unwrap_err()
        };
        let e = open("file://var/lib/tidemark").await;
        assert!(matches!(e, OpenError::RelativeFileUrl { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            r#"repository url "file://var/lib/tidemark": a file URL needs an absolute path (file:///var/lib/tidemark)"#
        );
        assert_eq!(
            open("s3:///prefix").await.to_string(),
            r#"repository url "s3:///prefix": missing bucket name"#
        );
        assert_eq!(
            open("ftp://host/x").await.to_string(),
            r#"repository url "ftp://host/x": must start with file:// or s3://"#
        );
    }
}

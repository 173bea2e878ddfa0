//! Moves bytes between local files and the store through the pipeline.
//!
//! The CPU work (zstd, AES-GCM) runs on a blocking thread; the store I/O runs on the async
//! runtime; a bounded channel of sealed chunks joins them, so memory per transfer is a few
//! chunks plus the store's part buffers, whatever the object's size.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

use crate::pipeline::crypt::DecodeStats;
use crate::pipeline::{
    self, CryptError, EncodeOptions, EncodeStats, Keyring, ObjectContext, PipelineError,
};
use crate::store::{Store, StoreError};

/// Sealed chunks buffered between the encoder and the store writer.
const CHANNEL_CHUNKS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// Where an object lives and what it is bound to.
#[derive(Debug, Clone)]
pub struct ObjectRef {
    /// Key in the store.
    pub key: String,
    /// Name bound into the object's encryption (relative to the cluster's directory).
    pub name: String,
    pub repository_id: String,
}

/// Encodes everything `src` yields into a new object. Returns after the store committed it
/// (durable); on any error the partial object is aborted and never becomes visible.
pub async fn put<R: Read + Send + 'static>(
    store: &Arc<dyn Store>,
    obj: &ObjectRef,
    keyring: &Arc<Keyring>,
    opts: EncodeOptions,
    src: R,
) -> Result<EncodeStats, TransferError> {
    let mut writer = store.create(&obj.key).await?;
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let keyring = keyring.clone();
    let (repository_id, name) = (obj.repository_id.clone(), obj.name.clone());
    let encoder = tokio::task::spawn_blocking(move || {
        let ctx = ObjectContext {
            repository_id: &repository_id,
            name: &name,
        };
        pipeline::encode(src, keyring.current(), &ctx, &opts, |chunk| {
            tx.blocking_send(chunk)
                .map_err(|_| std::io::Error::other("store writer stopped"))
        })
    });
    let mut store_error = None;
    while let Some(chunk) = rx.recv().await {
        if let Err(e) = writer.write(chunk).await {
            store_error = Some(e);
            break;
        }
    }
    drop(rx); // unblocks the encoder if the store failed
    let encoded = encoder
        .await
        .map_err(|e| PipelineError::Sink(std::io::Error::other(format!("encoder thread: {e}"))));
    if let Some(e) = store_error {
        writer.abort().await;
        return Err(e.into());
    }
    match encoded {
        Ok(Ok(stats)) => {
            writer.commit().await?;
            Ok(stats)
        }
        Ok(Err(e)) | Err(e) => {
            writer.abort().await;
            Err(e.into())
        }
    }
}

/// Decodes an object into `dst`, authenticating each chunk before its bytes reach `dst`.
/// Returns `dst` back with the stats. A missing object is `StoreError::NotFound`.
pub async fn get<W: Write + Send + 'static>(
    store: &Arc<dyn Store>,
    obj: &ObjectRef,
    keyring: &Arc<Keyring>,
    want_sha256: bool,
    mut dst: W,
) -> Result<(DecodeStats, W), TransferError> {
    let reader = store.get(&obj.key).await?;
    let src = SyncIoBridge::new(reader);
    let keyring = keyring.clone();
    let (repository_id, name) = (obj.repository_id.clone(), obj.name.clone());
    let describe = store.describe();
    let key = obj.key.clone();
    tokio::task::spawn_blocking(move || {
        let ctx = ObjectContext {
            repository_id: &repository_id,
            name: &name,
        };
        pipeline::decode(src, &keyring, &ctx, want_sha256, &mut dst).map(|s| (s, dst))
    })
    .await
    .map_err(|e| PipelineError::Sink(std::io::Error::other(format!("decoder thread: {e}"))))?
    .map_err(|e| match e {
        // The store's stream broke mid-object.
        PipelineError::Source(io) => TransferError::Store(StoreError::Unavailable {
            store: describe,
            op: "read",
            key,
            detail: io.to_string(),
        }),
        // Name the object as an operator finds it: its key and its store.
        PipelineError::Crypt(CryptError::Integrity { detail, .. }) => {
            TransferError::Pipeline(PipelineError::Crypt(CryptError::Integrity {
                object: format!("{key} in {describe}"),
                detail,
            }))
        }
        PipelineError::Crypt(CryptError::UnknownKey { key_id, .. }) => {
            TransferError::Pipeline(PipelineError::Crypt(CryptError::UnknownKey {
                object: format!("{key} in {describe}"),
                key_id,
            }))
        }
        other => TransferError::Pipeline(other),
    })
}

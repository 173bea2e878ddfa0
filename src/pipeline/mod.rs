//! The byte pipeline: zstd, then AES-256-GCM in authenticated chunks (`crypt`), under keys
//! from an envelope keyring (`keys`). Pure and synchronous: no PostgreSQL, no store, no async.
//! `crate::transfer` runs it on blocking threads between a store and local files.

pub mod crypt;
pub mod keys;

use std::io;
use std::path::PathBuf;

pub use crypt::{EncodeOptions, EncodeStats, ObjectContext, decode, encode};
pub use keys::{Keyring, MasterKey};

/// Errors of keys and the object format.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("key file {path}: {detail}")]
    KeyFile { path: PathBuf, detail: String },
    #[error("wrong master key: {detail}")]
    WrongKey { detail: String },
    #[error("keyring: {0}")]
    Keyring(String),
    #[error("{0}")]
    Format(String),
    #[error("object {object}: {detail}")]
    Integrity { object: String, detail: String },
    #[error("object {object} is encrypted with data key {key_id}, which the keyring does not hold")]
    UnknownKey { object: String, key_id: String },
    #[error("the system random number generator or cipher failed")]
    Random,
}

/// A pipeline failure, by the side it happened on.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Crypt(#[from] CryptError),
    /// Reading the input failed (a local file, or the store's stream).
    #[error("reading: {0}")]
    Source(io::Error),
    /// Writing the output failed (the store, or a local file).
    #[error("writing: {0}")]
    Sink(io::Error),
}

impl PipelineError {
    /// An error raised while writing into the encoder's chain; it may carry a `CryptError`
    /// raised by the sealer itself.
    pub(crate) fn from_sink(e: io::Error) -> PipelineError {
        match take_inner::<CryptError>(e) {
            Ok(c) => PipelineError::Crypt(c),
            Err(e) => PipelineError::Sink(e),
        }
    }

    /// Classifies an error that surfaced from the decoder chain.
    pub(crate) fn classify(e: io::Error, object: &str) -> PipelineError {
        let e = match take_inner::<CryptError>(e) {
            Ok(c) => return PipelineError::Crypt(c),
            Err(e) => e,
        };
        match take_inner::<crypt::Tagged>(e) {
            Ok(crypt::Tagged::Source(s)) => match take_inner::<crypt::Tagged>(s) {
                // Errors tagged deeper down (the opener wraps the tagged source).
                Ok(crypt::Tagged::Source(s)) => PipelineError::Source(s),
                Ok(crypt::Tagged::Sink(s)) => PipelineError::Sink(s),
                Err(s) => match take_inner::<CryptError>(s) {
                    Ok(c) => PipelineError::Crypt(c),
                    Err(s) => PipelineError::Source(s),
                },
            },
            Ok(crypt::Tagged::Sink(s)) => PipelineError::Sink(s),
            // Authenticated bytes that zstd rejects: only a faulty writer holding the key
            // produces them.
            Err(e) => PipelineError::Crypt(CryptError::Integrity {
                object: object.to_string(),
                detail: format!("authenticated payload does not decompress: {e}"),
            }),
        }
    }
}

/// Moves the error of type `T` out of an `io::Error`, or gives the `io::Error` back.
fn take_inner<T: std::error::Error + Send + Sync + 'static>(e: io::Error) -> Result<T, io::Error> {
    if !e.get_ref().is_some_and(|i| i.is::<T>()) {
        return Err(e);
    }
    let kind = e.kind();
    match e.into_inner() {
        Some(inner) => inner
            .downcast::<T>()
            .map(|t| *t)
            .map_err(|b| io::Error::new(kind, b)),
        None => Err(io::Error::from(kind)),
    }
}

//! The error every command returns, and its documented exit code.
//!
//! Exit codes (also in `tidemark --help` and docs/operations.md):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | not found: wal-fetch was asked for a file the repository does not hold |
//! | 2 | usage or configuration error |
//! | 3 | key error: key file missing, unreadable, not mode 0600, or the wrong key |
//! | 4 | repository error: not initialised, another cluster's repository, unsupported format |
//! | 5 | integrity error: an object is corrupted, truncated or tampered with |
//! | 6 | store unavailable or failing (retries exhausted); retrying later may succeed |
//! | 7 | conflict: a different file is already archived under this name |
//! | 8 | PostgreSQL unreachable or failing |
//! | 9 | invalid input: not a WAL file, missing input file |
//! | 10 | local I/O error (destination not writable, disk full) |
//! | 11 | busy: another backup of this cluster is running |
//! | 12 | WAL missing: the WAL a backup or restore needs is not (yet) in the repository |
//! | 13 | recovery failed: the restored server did not reach the target |
//! | 14 | drill failed: a check of a restore drill failed |
//! | 15 | interrupted: stopped by SIGTERM or SIGINT; nothing half-done was kept |
//! | 16 | audit log verification failed: a record was edited or removed |
//! | 70 | internal error (a bug: please report it) |

use crate::config::ConfigError;
use crate::pipeline::{CryptError, PipelineError};
use crate::repo::RepoError;
use crate::store::StoreError;
use crate::transfer::TransferError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Key(CryptError),
    #[error("{0}")]
    Repository(String),
    #[error("{0}")]
    Integrity(String),
    #[error(transparent)]
    Store(StoreError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Postgres(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    LocalIo(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Wal(String),
    #[error("{0}")]
    Recovery(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("drill failed: {0}")]
    DrillFailed(String),
    #[error("{0}")]
    Interrupted(String),
    #[error("{0}")]
    AuditFailed(String),
    /// `check`'s Nagios status (1 warning, 2 critical), already reported on stdout.
    #[error("check status {0}")]
    CheckStatus(u8),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NotFound(_) => 1,
            Error::Usage(_) | Error::Config(_) => 2,
            Error::Key(_) => 3,
            Error::Repository(_) => 4,
            Error::Integrity(_) => 5,
            Error::Store(_) => 6,
            Error::Conflict(_) => 7,
            Error::Postgres(_) => 8,
            Error::InvalidInput(_) => 9,
            Error::LocalIo(_) => 10,
            Error::Busy(_) => 11,
            Error::Wal(_) => 12,
            Error::Recovery(_) => 13,
            Error::Internal(_) => 70,
            Error::CheckStatus(c) => *c,
            Error::DrillFailed(_) => 14,
            Error::Interrupted(_) => 15,
            Error::AuditFailed(_) => 16,
        }
    }
}

impl From<CryptError> for Error {
    fn from(e: CryptError) -> Error {
        match e {
            CryptError::KeyFile { .. } | CryptError::WrongKey { .. } => Error::Key(e),
            CryptError::Keyring(_) => Error::Repository(e.to_string()),
            CryptError::Integrity { .. }
            | CryptError::UnknownKey { .. }
            | CryptError::Format(_) => Error::Integrity(e.to_string()),
            CryptError::Random => Error::Internal(e.to_string()),
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Store(e)
    }
}

impl From<RepoError> for Error {
    fn from(e: RepoError) -> Error {
        match e {
            RepoError::Store(s) => Error::Store(s),
            other => Error::Repository(other.to_string()),
        }
    }
}

impl From<TransferError> for Error {
    fn from(e: TransferError) -> Error {
        match e {
            TransferError::Store(s) => Error::Store(s),
            TransferError::Pipeline(PipelineError::Crypt(c)) => c.into(),
            TransferError::Pipeline(PipelineError::Source(io)) => {
                Error::LocalIo(format!("reading input: {io}"))
            }
            TransferError::Pipeline(PipelineError::Sink(io)) => {
                Error::LocalIo(format!("writing output: {io}"))
            }
        }
    }
}

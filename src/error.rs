//! The error every command returns, and its documented exit code.
//!
//! `Exit` is the one table of exit codes: `tidemark --help` prints it, the daemon compares its
//! children's statuses with it, and a test checks docs/operations.md against it.

use crate::config::ConfigError;
use crate::pipeline::{CryptError, PipelineError};
use crate::repo::RepoError;
use crate::store::{OpenError, StoreError};
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

/// An exit status of tidemark, with its name and one-line meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Exit {
    Success,
    NotFound,
    Usage,
    Key,
    Repository,
    Integrity,
    Store,
    Conflict,
    Postgres,
    InvalidInput,
    LocalIo,
    Busy,
    WalMissing,
    Recovery,
    DrillFailed,
    Interrupted,
    AuditFailed,
    Internal,
    /// wal-fetch only: any failure but "not found".
    WalFetchFailed,
}

impl Exit {
    /// Every exit status, in the order `--help` and docs/operations.md list them.
    pub const ALL: &'static [Exit] = &[
        Exit::Success,
        Exit::NotFound,
        Exit::WalFetchFailed,
        Exit::Usage,
        Exit::Key,
        Exit::Repository,
        Exit::Integrity,
        Exit::Store,
        Exit::Conflict,
        Exit::Postgres,
        Exit::InvalidInput,
        Exit::LocalIo,
        Exit::Busy,
        Exit::WalMissing,
        Exit::Recovery,
        Exit::DrillFailed,
        Exit::Interrupted,
        Exit::AuditFailed,
        Exit::Internal,
    ];

    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::NotFound => 1,
            Exit::Usage => 2,
            Exit::Key => 3,
            Exit::Repository => 4,
            Exit::Integrity => 5,
            Exit::Store => 6,
            Exit::Conflict => 7,
            Exit::Postgres => 8,
            Exit::InvalidInput => 9,
            Exit::LocalIo => 10,
            Exit::Busy => 11,
            Exit::WalMissing => 12,
            Exit::Recovery => 13,
            Exit::DrillFailed => 14,
            Exit::Interrupted => 15,
            Exit::AuditFailed => 16,
            Exit::Internal => 70,
            Exit::WalFetchFailed => 126,
        }
    }

    pub fn from_code(code: i32) -> Option<Exit> {
        Exit::ALL
            .iter()
            .copied()
            .find(|e| i32::from(e.code()) == code)
    }

    /// What the status means, in one line (also the second column of docs/operations.md's
    /// table).
    pub const fn meaning(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::NotFound => "not found (wal-fetch: the repository does not hold that file)",
            Exit::WalFetchFailed => {
                "wal-fetch only: any failure other than \"not found\", so PostgreSQL stops recovery \
                 rather than ending it early and promoting a cluster that misses WAL"
            }
            Exit::Usage => "usage or configuration error",
            Exit::Key => {
                "key error (key file missing, unreadable, not mode 0600, or the wrong key)"
            }
            Exit::Repository => {
                "repository error (not initialised, another cluster's repository, unsupported format)"
            }
            Exit::Integrity => {
                "integrity error (an object is corrupted, truncated or tampered with)"
            }
            Exit::Store => "store unavailable or failing after retries",
            Exit::Conflict => "conflict (a different file is already archived under that name)",
            Exit::Postgres => "PostgreSQL unreachable or failing",
            Exit::InvalidInput => "invalid input (not a WAL file, missing input file)",
            Exit::LocalIo => "local I/O error (destination not writable, disk full)",
            Exit::Busy => {
                "busy (another backup of this cluster is running, or another daemon uses the state directory)"
            }
            Exit::WalMissing => {
                "WAL missing (the WAL a backup or restore needs is not in the repository in time)"
            }
            Exit::Recovery => {
                "recovery refused or failed (target outside the restorable window, the server did not reach it)"
            }
            Exit::DrillFailed => {
                "drill failed (a check of a restore drill failed; the reason is printed)"
            }
            Exit::Interrupted => "interrupted by SIGTERM/SIGINT (nothing half-done was kept)",
            Exit::AuditFailed => "audit log verification failed (a record was edited or removed)",
            Exit::Internal => "internal error (a bug: please report it)",
        }
    }

    /// The list `tidemark --help` prints.
    pub fn help_text() -> String {
        let mut s = String::from("Exit codes:\n");
        for e in Exit::ALL {
            s.push_str(&format!("  {:>3}  {}\n", e.code(), e.meaning()));
        }
        s
    }
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::NotFound(_) => Exit::NotFound,
            Error::Usage(_) | Error::Config(_) => Exit::Usage,
            Error::Key(_) => Exit::Key,
            Error::Repository(_) => Exit::Repository,
            Error::Integrity(_) => Exit::Integrity,
            Error::Store(_) => Exit::Store,
            Error::Conflict(_) => Exit::Conflict,
            Error::Postgres(_) => Exit::Postgres,
            Error::InvalidInput(_) => Exit::InvalidInput,
            Error::LocalIo(_) => Exit::LocalIo,
            Error::Busy(_) => Exit::Busy,
            Error::Wal(_) => Exit::WalMissing,
            Error::Recovery(_) => Exit::Recovery,
            Error::Internal(_) => Exit::Internal,
            // check's Nagios status is its own (0/1/2), printed with the report.
            Error::CheckStatus(_) => Exit::Usage,
            Error::DrillFailed(_) => Exit::DrillFailed,
            Error::Interrupted(_) => Exit::Interrupted,
            Error::AuditFailed(_) => Exit::AuditFailed,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Error::CheckStatus(c) => *c,
            e => e.exit().code(),
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

impl From<crate::pg::conn::PgError> for Error {
    fn from(e: crate::pg::conn::PgError) -> Error {
        Error::Postgres(e.to_string())
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error::Store(e)
    }
}

/// A repository URL or S3 settings the store cannot be opened with: fix the configuration.
impl From<OpenError> for Error {
    fn from(e: OpenError) -> Error {
        Error::Usage(e.to_string())
    }
}

impl From<RepoError> for Error {
    fn from(e: RepoError) -> Error {
        match e {
            RepoError::Store(s) => Error::Store(s),
            RepoError::Integrity(m) => Error::Integrity(m),
            RepoError::Pipeline(p) => TransferError::Pipeline(p).into(),
            other @ (RepoError::NotInitialised { .. } | RepoError::Corrupt(_)) => {
                Error::Repository(other.to_string())
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_unique_and_listed() {
        let mut seen = std::collections::HashSet::new();
        for e in Exit::ALL {
            assert!(seen.insert(e.code()), "{e:?} reuses {}", e.code());
            assert_eq!(Exit::from_code(i32::from(e.code())), Some(*e));
        }
        assert_eq!(Exit::ALL.len(), 19);
    }

    /// docs/operations.md's table is the same list, in the same order, with the same words.
    #[test]
    fn operations_md_matches_the_table() {
        let doc = include_str!("../docs/operations.md");
        let section = doc
            .split("## Exit codes")
            .nth(1)
            .expect("docs/operations.md has an Exit codes section");
        let rows: Vec<(String, String)> = section
            .lines()
            .skip_while(|l| !l.starts_with("|---"))
            .skip(1)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells[1].to_string(), cells[2].to_string())
            })
            .collect();
        let want: Vec<(String, String)> = Exit::ALL
            .iter()
            .map(|e| (e.code().to_string(), e.meaning().to_string()))
            .collect();
        assert_eq!(rows, want);
    }
}

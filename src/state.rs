//! Local state of this host, beside the repository: what short-lived processes (wal-push, one
//! per segment) leave for the long-lived daemon, and what must survive a process but is not
//! part of any backup.
//!
//! ```text
//! <state_dir>/<cluster>/wal-push.json     counters of wal-push (metrics), updated under a lock
//! <state_dir>/<cluster>/audit/...         the audit chain of this host (see `audit`)
//! <state_dir>/daemon/config.toml          the config the daemon accepted last (its jobs use it)
//! ```
//!
//! Nothing here is needed to restore: losing the state directory loses counters and starts a
//! new audit chain, never data. Directories are created mode 0700 (they may name hosts and
//! users; the config snapshot may hold secrets).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where state lives when the config does not say: `/var/lib/tidemark` if this user can write
/// there (or create it), else `$HOME/.local/state/tidemark`, else `/tmp/tidemark-<uid>`. Every
/// process of one user on one host resolves the same directory, so wal-push and the daemon
/// meet there.
pub fn resolve_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    let system = PathBuf::from("/var/lib/tidemark");
    if writable_or_creatable(&system) {
        return system;
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let p = PathBuf::from(home).join(".local/state/tidemark");
        if writable_or_creatable(&p) {
            return p;
        }
    }
    // SAFETY: getuid(2) has no failure mode.
    PathBuf::from(format!("/tmp/tidemark-{}", unsafe { libc::getuid() }))
}

fn writable_or_creatable(p: &Path) -> bool {
    let mut probe = p.to_path_buf();
    loop {
        if probe.exists() {
            return access_w(&probe);
        }
        if !probe.pop() {
            return false;
        }
    }
}

fn access_w(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// Creates `dir` and its parents, mode 0700.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// An exclusive advisory lock on a file (flock), released when dropped or when the process
/// dies.
pub struct FileLock {
    _file: File,
}

/// The lock file, created (mode 0600) when missing; its content is never touched.
fn open_lock_file(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
}

impl FileLock {
    /// The lock, or None at once if another process holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<FileLock>> {
        use std::os::fd::AsRawFd;
        let file = open_lock_file(path)?;
        // SAFETY: flock(2) on a descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(FileLock { _file: file }));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        use std::os::fd::AsRawFd;
        let file = open_lock_file(path)?;
        loop {
            // SAFETY: flock(2) on a descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Replaces `path` with `data`: a temporary file in the same directory, renamed over it. With
/// `durable`, the file and the directory are fsynced, so after return the new content
/// survives a crash; without, a crash may leave the old content (never a mix of both).
pub fn write_atomic(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Upper bounds (seconds) of the wal-push latency histogram buckets; a last, implicit bucket
/// is +Inf.
pub const PUSH_LATENCY_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// `<state_dir>/<cluster>/wal-push.json`: what every wal-push of the cluster on this host did,
/// cumulative (Prometheus counters; they restart at zero only if the file is lost).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct WalPushStats {
    /// Files stored (a re-push of an identical, already archived file counts too).
    pub pushed: u64,
    /// Their sizes before compression and as stored.
    pub pushed_bytes: u64,
    pub stored_bytes: u64,
    pub failures: u64,
    pub last_success: Option<DateTime<Utc>>,
    pub last_success_file: Option<String>,
    pub last_failure: Option<DateTime<Utc>>,
    /// The failure's one-line error (error messages never hold secrets) and exit code.
    pub last_error: Option<String>,
    pub last_error_code: Option<u8>,
    /// Non-cumulative counts per bucket of PUSH_LATENCY_BUCKETS, then +Inf.
    pub latency_buckets: Vec<u64>,
    pub latency_sum_seconds: f64,
}

/// What one wal-push did.
pub enum PushRecord<'a> {
    Pushed {
        file: &'a str,
        original_bytes: u64,
        stored_bytes: u64,
        seconds: f64,
    },
    Failed {
        error: &'a str,
        code: u8,
        seconds: f64,
    },
}

impl WalPushStats {
    pub fn path(state_dir: &Path, cluster: &str) -> PathBuf {
        state_dir.join(cluster).join("wal-push.json")
    }

    /// Reads the counters (a missing or unreadable file reads as zero).
    pub fn read(state_dir: &Path, cluster: &str) -> WalPushStats {
        std::fs::read(Self::path(state_dir, cluster))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn add(&mut self, rec: &PushRecord<'_>, now: DateTime<Utc>) {
        let seconds = match *rec {
            PushRecord::Pushed {
                file,
                original_bytes,
                stored_bytes,
                seconds,
            } => {
                self.pushed += 1;
                self.pushed_bytes += original_bytes;
                self.stored_bytes += stored_bytes;
                self.last_success = Some(now);
                self.last_success_file = Some(file.to_string());
                seconds
            }
            PushRecord::Failed {
                error,
                code,
                seconds,
            } => {
                self.failures += 1;
                self.last_failure = Some(now);
                self.last_error = Some(error.chars().take(500).collect());
                self.last_error_code = Some(code);
                seconds
            }
        };
        self.latency_buckets
            .resize(PUSH_LATENCY_BUCKETS.len() + 1, 0);
        let i = PUSH_LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(PUSH_LATENCY_BUCKETS.len());
        self.latency_buckets[i] += 1;
        self.latency_sum_seconds += seconds;
    }

    /// Adds one wal-push to the cluster's counters, under a lock so concurrent pushes never
    /// lose a count. Not fsynced: these are metrics, not data, and wal-push must stay fast.
    pub fn record(state_dir: &Path, cluster: &str, rec: PushRecord<'_>) -> io::Result<()> {
        let dir = state_dir.join(cluster);
        ensure_dir(&dir)?;
        let _lock = FileLock::acquire(&dir.join("wal-push.lock"))?;
        let mut stats = Self::read(state_dir, cluster);
        stats.add(&rec, Utc::now());
        let json = serde_json::to_vec(&stats).map_err(io::Error::other)?;
        write_atomic(&Self::path(state_dir, cluster), &json, false)
    }

    /// Whether the most recent push failed (and when).
    pub fn failing_since(&self) -> Option<DateTime<Utc>> {
        match (self.last_failure, self.last_success) {
            (Some(f), Some(s)) if f > s => Some(f),
            (Some(f), None) => Some(f),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_accumulate_under_concurrency() {
        let d = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let p = d.path().to_path_buf();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let rec = if i == 0 {
                            PushRecord::Failed {
                                error: "store unavailable",
                                code: 6,
                                seconds: 0.03,
                            }
                        } else {
                            PushRecord::Pushed {
                                file: "000000010000000000000001",
                                original_bytes: 10,
                                stored_bytes: 3,
                                seconds: 0.2,
                            }
                        };
                        WalPushStats::record(&p, "acme", rec).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = WalPushStats::read(d.path(), "acme");
        assert_eq!(s.pushed, 175);
        assert_eq!(s.failures, 25);
        assert_eq!(s.pushed_bytes, 1750);
        assert_eq!(s.stored_bytes, 525);
        // 0.03 s lands in the 0.05 bucket (index 2), 0.2 s in the 0.25 bucket (index 4).
        assert_eq!(s.latency_buckets[2], 25);
        assert_eq!(s.latency_buckets[4], 175);
        assert_eq!(s.latency_buckets.iter().sum::<u64>(), 200);
        assert_eq!(s.last_error_code, Some(6));
    }

    #[test]
    fn failing_since_follows_the_latest_attempt() {
        let t = |s| DateTime::from_timestamp(s, 0).unwrap();
        let mut s = WalPushStats::default();
        assert_eq!(s.failing_since(), None);
        s.last_failure = Some(t(10));
        assert_eq!(s.failing_since(), Some(t(10)));
        s.last_success = Some(t(11));
        assert_eq!(s.failing_since(), None);
    }

    #[test]
    fn write_atomic_replaces_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"one", true).unwrap();
        write_atomic(&p, b"two!", false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two!");
        let leftovers: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn configured_dir_wins() {
        assert_eq!(
            resolve_dir(Some(Path::new("/srv/state"))),
            PathBuf::from("/srv/state")
        );
    }
}

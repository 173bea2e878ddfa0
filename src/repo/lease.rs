//! Leases: `<cluster>/locks/<name>.json`, a plain JSON object naming who holds it and until
//! when. A holder renews its lease every third of its lifetime, so a live holder is never
//! overtaken; a crashed holder's lease lapses after at most one lifetime.
//!
//! A lease alone cannot be race-free: S3 stores (Garage among them) ignore conditional
//! writes, so two processes that read "free" at the same moment could both write. So a lease
//! is written only by a process that holds the race-free lock it stands for — for backups, the
//! session-level advisory lock in the cluster itself, which dies with its holder — and two
//! live holders cannot exist. What the lease adds: anyone can see, without connecting to the
//! cluster, that a backup runs, where and since when (`check` refuses at once with that), and
//! a crashed holder's record lapses by itself.
//!
//! Clocks of the hosts sharing a repository must agree to well within a third of the
//! lifetime.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Repository;
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Random id of this holding (a process may hold several in turn).
    pub holder: String,
    pub host: String,
    pub pid: u32,
    pub user: String,
    pub acquired: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    /// The holder's start time (clock ticks since boot, /proc/PID/stat field 22), which
    /// tells a reused pid from the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ticks: Option<u64>,
}

/// State and start time of a process, from /proc/PID/stat (None if there is no such process).
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl LeaseRecord {
    pub fn describe(&self) -> String {
        format!(
            "host {} (pid {}, user {}) since {}, lease until {}",
            self.host,
            self.pid,
            self.user,
            self.acquired.format("%Y-%m-%d %H:%M:%S+00"),
            self.expires.format("%Y-%m-%d %H:%M:%S+00")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("held by {}", .0.describe())]
    Held(LeaseRecord),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A held lease; renewed in the background until `release` (or until the process ends: a
/// dropped lease stops renewing and lapses).
pub struct Lease {
    repo: Repository,
    name: String,
    key: String,
    record: LeaseRecord,
    stop: CancellationToken,
    renewer: Option<JoinHandle<()>>,
}

fn key(repo: &Repository, name: &str) -> String {
    repo.key(&super::layout::lease(name))
}

/// The lease as stored, if any (expired or not). An unparsable object reads as no lease: it
/// cannot name a holder to wait for.
pub async fn read(repo: &Repository, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
    match repo.store().get_bytes(&key(repo, name), 64 << 10).await {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn write(repo: &Repository, key: &str, rec: &LeaseRecord) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(rec).unwrap_or_default();
    repo.store().put_bytes(key, Bytes::from(json)).await
}

/// Name of the backup lease (`locks/backup.json`).
pub const BACKUP: &str = "backup";

/// A holder on this host whose process no longer exists need not be waited for. (A host name
/// shared by containers with separate process namespaces defeats this; the caller's
/// race-free lock still holds then.)
fn holder_died_here(rec: &LeaseRecord) -> bool {
    if rec.host != crate::host::hostname() || rec.pid == 0 {
        return false;
    }
    match proc_stat(rec.pid) {
        None => true,
        // A zombie is dead; one nobody reaps (a container without an init) stays one.
        Some(('Z' | 'X', _)) => true,
        Some((_, start)) => rec.start_ticks.is_some_and(|t| t != start),
    }
}

/// Fails with the holder when lease `name` is held by a live holder (one whose lease has not
/// lapsed and, on this host, whose process still exists).
pub async fn check(repo: &Repository, name: &str) -> Result<(), LeaseError> {
    match read(repo, name).await? {
        Some(cur) if cur.expires > Utc::now() && !holder_died_here(&cur) => {
            Err(LeaseError::Held(cur))
        }
        _ => Ok(()),
    }
}

/// Takes lease `name` for `ttl` and renews it until released. Call only while holding the
/// race-free lock the lease stands for: then whoever the current record names is not running
/// (its lock is gone), and the record is replaced.
pub async fn take(repo: &Repository, name: &str, ttl: Duration) -> Result<Lease, LeaseError> {
    let k = key(repo, name);
    let now = Utc::now();
    if let Some(cur) = read(repo, name).await?
        && cur.expires > now
    {
        tracing::warn!(
            lease = %k,
            "replacing the unexpired lease of {}: it no longer holds the lock",
            cur.describe()
        );
    }
    let mut id = [0u8; 8];
    let _ = crate::pipeline::keys::random_bytes(&mut id);
    let ttl_c = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::minutes(5));
    let record = LeaseRecord {
        holder: hex::encode(id),
        host: crate::host::hostname(),
        pid: std::process::id(),
        user: crate::host::user_name(),
        acquired: now,
        expires: now + ttl_c,
        start_ticks: proc_stat(std::process::id()).map(|s| s.1),
    };
    write(repo, &k, &record).await?;
    let stop = CancellationToken::new();
    let renewer = tokio::spawn(renew(
        repo.clone(),
        name.to_string(),
        record.clone(),
        ttl,
        stop.clone(),
    ));
    Ok(Lease {
        repo: repo.clone(),
        name: name.to_string(),
        key: k,
        record,
        stop,
        renewer: Some(renewer),
    })
}

async fn renew(
    repo: Repository,
    name: String,
    mut record: LeaseRecord,
    ttl: Duration,
    stop: CancellationToken,
) {
    let key = key(&repo, &name);
    let every = ttl / 3;
    let ttl_c = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::minutes(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Renew only what is still ours; a lease someone else took is theirs now.
        match read(&repo, &name).await {
            Ok(Some(cur)) if cur.holder != record.holder => {
                tracing::error!(lease = %key, "lease taken over by {}; no longer renewing", cur.describe());
                return;
            }
            Err(e) => {
                tracing::warn!(lease = %key, error = %e, "cannot read lease to renew it; retrying");
                continue;
            }
            _ => {}
        }
        record.expires = Utc::now() + ttl_c;
        if let Err(e) = write(&repo, &key, &record).await {
            tracing::warn!(lease = %key, error = %e, "cannot renew lease; retrying");
        }
    }
}

impl Lease {
    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    /// Stops renewing and deletes the lease if it is still ours.
    pub async fn release(mut self) {
        self.stop.cancel();
        if let Some(h) = self.renewer.take() {
            let _ = h.await;
        }
        match read(&self.repo, &self.name).await {
            Ok(Some(cur)) if cur.holder == self.record.holder => {
                if let Err(e) = self.repo.store().delete(&self.key).await {
                    tracing::warn!(lease = %self.key, error = %e, "cannot delete lease; it lapses by itself");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(lease = %self.key, error = %e, "cannot release lease; it lapses by itself")
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check`, then `take` (the tests hold no lock; they run one holder at a time).
    async fn acquire(repo: &Repository, name: &str, ttl: Duration) -> Result<Lease, LeaseError> {
        check(repo, name).await?;
        take(repo, name, ttl).await
    }
    use crate::store::local::LocalStore;
    use std::sync::Arc;

    fn repo(d: &tempfile::TempDir) -> Repository {
        Repository::new(Arc::new(LocalStore::new(d.path().to_path_buf())), "acme")
    }

    #[tokio::test]
    async fn held_lease_refuses_and_release_frees() {
        let d = tempfile::tempdir().unwrap();
        let r = repo(&d);
        let a = acquire(&r, "backup", Duration::from_secs(60))
            .await
            .unwrap();
        match acquire(&r, "backup", Duration::from_secs(60)).await {
            Err(LeaseError::Held(h)) => assert_eq!(h.holder, a.record().holder),
            other => panic!("expected Held, got {:?}", other.map(|l| l.record().clone())),
        }
        a.release().await;
        assert!(read(&r, "backup").await.unwrap().is_none());
        let b = acquire(&r, "backup", Duration::from_secs(60))
            .await
            .unwrap();
        b.release().await;
    }

    #[tokio::test]
    async fn lapsed_lease_is_taken_over_and_live_one_is_renewed() {
        let d = tempfile::tempdir().unwrap();
        let r = repo(&d);
        // A crashed holder: its lease expired a second ago.
        let dead = LeaseRecord {
            holder: "dead".into(),
            host: "another-host".into(),
            pid: 1,
            user: "u".into(),
            acquired: Utc::now() - chrono::Duration::seconds(10),
            expires: Utc::now() - chrono::Duration::seconds(1),
            start_ticks: None,
        };
        write(&r, &key(&r, "backup"), &dead).await.unwrap();
        let a = acquire(&r, "backup", Duration::from_secs(3)).await.unwrap();
        let first = read(&r, "backup").await.unwrap().unwrap().expires;
        // Past its first lifetime the lease is still held: renewed every second.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let now = read(&r, "backup").await.unwrap().unwrap();
        assert_eq!(now.holder, a.record().holder);
        assert!(now.expires > first && now.expires > Utc::now(), "{now:?}");
        assert!(matches!(
            acquire(&r, "backup", Duration::from_secs(3)).await,
            Err(LeaseError::Held(_))
        ));
        a.release().await;
    }

    #[tokio::test]
    async fn a_dead_holder_on_this_host_does_not_block() {
        let d = tempfile::tempdir().unwrap();
        let r = repo(&d);
        let take = || async {
            acquire(&r, "backup", Duration::from_secs(60))
                .await
                .map(|l| l.record().holder.clone())
        };
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let rec = LeaseRecord {
            holder: "gone".into(),
            host: crate::host::hostname(),
            pid,
            user: "u".into(),
            acquired: Utc::now(),
            expires: Utc::now() + chrono::Duration::minutes(5),
            start_ticks: None,
        };
        // Exited and reaped.
        write(&r, &key(&r, "backup"), &rec).await.unwrap();
        assert!(take().await.is_ok());
        // Killed and not reaped: a zombie is dead too.
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(proc_stat(zombie.id()).map(|s| s.0), Some('Z'));
        let rec = LeaseRecord {
            pid: zombie.id(),
            ..rec
        };
        write(&r, &key(&r, "backup"), &rec).await.unwrap();
        assert!(take().await.is_ok());
        zombie.wait().unwrap();
        // The holder's pid now names another process (one that started at another time).
        let own = proc_stat(std::process::id()).unwrap();
        let rec = LeaseRecord {
            pid: std::process::id(),
            start_ticks: Some(own.1 + 1),
            ..rec
        };
        write(&r, &key(&r, "backup"), &rec).await.unwrap();
        assert!(take().await.is_ok());
        // A live holder on this host (this very process) does block.
        let rec = LeaseRecord {
            start_ticks: Some(own.1),
            ..rec
        };
        write(&r, &key(&r, "backup"), &rec).await.unwrap();
        assert!(matches!(take().await, Err(LeaseError::Held(_))));
    }
}

//! One backup per cluster at a time: the session-level advisory lock `BACKUP_LOCK_KEY` in the
//! primary (race-free, released by PostgreSQL if this process dies) and, on top, the lease
//! `locks/backup.json`, which lets anyone see without connecting that a backup runs, where and
//! since when (docs/format.md, section 7).

use tokio_postgres::Client;

use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::repo::BACKUP_LOCK_KEY;
use crate::repo::lease::{self, Lease, LeaseError};

/// The backup lock lives in the primary; a standby's lock would not exclude a backup running
/// on the primary (and standby backups need another WAL-switch strategy).
pub(super) async fn refuse_standby(cluster: &ClusterHandle, client: &Client) -> Result<(), Error> {
    let standby: bool = client
        .query_one("select pg_is_in_recovery()", &[])
        .await
        .map_err(|e| Error::Postgres(format!("pg_is_in_recovery: {e}")))?
        .get(0);
    if standby {
        return Err(Error::Usage(format!(
            "the server at clusters.{}.connection is a standby: backups are taken from the primary",
            cluster.name
        )));
    }
    Ok(())
}

/// Refuses at once, naming the holder, when the lease says a backup runs (on this host or
/// another); the advisory lock taken next is what makes two at once impossible.
pub(super) async fn refuse_if_leased(cluster: &ClusterHandle) -> Result<(), Error> {
    match lease::check(&cluster.repo, lease::BACKUP).await {
        Ok(()) => Ok(()),
        Err(LeaseError::Held(h)) => Err(Error::Busy(format!(
            "another backup of cluster {} is running: {}; try again later",
            cluster.name,
            h.describe()
        ))),
        Err(LeaseError::Store(e)) => Err(e.into()),
    }
}

/// Takes the advisory lock on the backup's session, then the lease. The lock is held until
/// the session ends; release the lease before that (`Lease::release`), so the next holder of
/// the lock never finds a live record of this one.
pub(super) async fn take(cluster: &ClusterHandle, client: &Client) -> Result<Lease, Error> {
    let locked: bool = client
        .query_one("select pg_try_advisory_lock($1)", &[&BACKUP_LOCK_KEY])
        .await
        .map_err(|e| Error::Postgres(format!("taking the backup lock: {e}")))?
        .get(0);
    if !locked {
        return Err(Error::Busy(format!(
            "another backup of cluster {} is running (it holds the advisory lock in the cluster); try again later",
            cluster.name
        )));
    }
    // Holding the lock: the lease is ours to write.
    lease::take(&cluster.repo, lease::BACKUP, cluster.lease_ttl)
        .await
        .map_err(|e| match e {
            LeaseError::Store(e) => Error::Store(e),
            LeaseError::Held(h) => Error::Busy(h.describe()),
        })
}

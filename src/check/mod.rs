//! `tidemark check`: a health check for monitoring systems (Nagios convention: exit 0 OK,
//! 1 warning, 2 critical). Every check runs, even after one failed, and reports one line.
//!
//! `check` says the order; each check is one function, in `repository` (the repository and
//! its catalog) or `server` (PostgreSQL and its host).

use std::time::Duration;

use serde::Serialize;

use crate::cluster::ClusterHandle;

mod repository;
mod server;

use repository::{audit_uploaded, backup_age, keys, newest_drill, repository, wal_gaps};
use server::{
    archive_command, archive_end_to_end, archive_lag, configuration_held, pg_wal_space, postgres,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Critical,
}

impl Status {
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Warning => 1,
            Status::Critical => 2,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// archive_lag: WAL bytes written and not yet archived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub cluster: String,
    pub status: Status,
    pub checks: Vec<CheckResult>,
}

#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Force a WAL switch and wait for the segment to arrive in the repository.
    pub switch_wal: bool,
    pub archive_timeout: Duration,
    /// Read the catalog too: newest backup's age and WAL gaps (the daemon checks those on its
    /// slower catalog schedule).
    pub catalog: bool,
}

fn ok(name: &'static str, message: String) -> CheckResult {
    CheckResult {
        name,
        status: Status::Ok,
        message,
        value: None,
        bytes: None,
    }
}
fn warn(name: &'static str, message: String) -> CheckResult {
    CheckResult {
        name,
        status: Status::Warning,
        message,
        value: None,
        bytes: None,
    }
}
fn crit(name: &'static str, message: String) -> CheckResult {
    CheckResult {
        name,
        status: Status::Critical,
        message,
        value: None,
        bytes: None,
    }
}

/// Runs every check, in this order, each reporting one line; a check that needs what an
/// earlier one could not get (the repository's info, the keyring, a server session) is left
/// out.
pub async fn check(cluster: &ClusterHandle, opts: &CheckOptions) -> CheckReport {
    let mut checks = Vec::new();
    let (result, info) = repository(cluster).await;
    checks.push(result);
    let keyring = match &info {
        Some(info) => {
            let (result, keyring) = keys(cluster, info).await;
            checks.push(result);
            keyring
        }
        None => None,
    };
    let (result, client) = postgres(cluster, info.as_ref()).await;
    checks.push(result);
    let mut archiving_configured = false;
    if let Some(c) = &client {
        let (result, configured) = archive_command(c).await;
        checks.push(result);
        archiving_configured = configured;
    }
    if let (Some(c), Some(_), true, true) = (&client, &info, archiving_configured, opts.switch_wal)
    {
        checks.push(archive_end_to_end(cluster, c, opts.archive_timeout).await);
    }
    if let Some(c) = &client {
        checks.push(archive_lag(cluster, c).await);
    }
    // The catalog's checks share its manifests; without them only the failure to read is said.
    if let (Some(info), Some(keyring), true) = (&info, &keyring, opts.catalog) {
        match cluster.repo.load_manifests(info, keyring).await {
            Err(e) => checks.push(crit("backup", format!("reading backups: {e}"))),
            Ok(backups) => {
                checks.push(backup_age(cluster, &backups));
                if let (Some(c), Some(pgdata)) = (&client, &cluster.config.pgdata) {
                    checks.push(configuration_held(c, pgdata, &backups).await);
                }
                checks.push(wal_gaps(cluster, info, &backups).await);
            }
        }
    }
    if opts.catalog {
        checks.extend(newest_drill(cluster).await);
    }
    if let Some(pgdata) = &cluster.config.pgdata {
        checks.push(pg_wal_space(&pgdata.join("pg_wal")));
    }
    if let Some(info) = &info {
        checks.push(audit_uploaded(cluster, info));
    }
    if let Some(c) = client {
        c.close().await;
    }
    let status = checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok);
    CheckReport {
        cluster: cluster.name.clone(),
        status,
        checks,
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

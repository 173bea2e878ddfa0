//! The audit log: every backup, restore, WAL fetch during a restore, expire deletion, drill,
//! key operation and config change, as authenticated, hash-chained JSON records in the
//! repository (`<cluster>/audit/<chain>/<seq>-<time>.json`, docs/format.md).
//!
//! Design, because S3 stores offer no conditional write (Garage ignores If-None-Match): each
//! host (more exactly, each state directory) appends to a chain of its own, so no two writers
//! ever race for the same object. Appends on one host are serialised by a file lock; a record
//! is first made durable locally (`pending/`), then uploaded — a store outage delays records,
//! it never loses them, and the next append (or the daemon) uploads what is pending.
//!
//! Each record names its predecessor's SHA-256 (`prev`) and carries an HMAC-SHA256 under a key
//! derived from the repository's data key (`mac`). `audit verify` therefore detects an edited
//! record (MAC and the successor's `prev`), a removed one (a gap in `seq` or a broken `prev`),
//! a forged chain (no MAC without the master key), and — on the host that wrote the chain —
//! the removal of its newest records (the local head). Removal of the newest records of
//! another host's chain is not detectable from the repository alone; `audit verify` prints
//! every chain's head so it can be kept elsewhere.

mod chain;
mod verify;

use aws_lc_rs::digest;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::pipeline::Keyring;
use crate::pipeline::keys::KEY_ID_LEN;
use crate::repo::{ClusterInfo, layout};
use crate::state::{FileLock, ensure_dir, write_atomic};
use chain::{Head, LocalChain};

pub use verify::{ChainReport, VerifyReport, verify};

pub const AUDIT_FORMAT: u32 = 1;
const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// One audit record, as stored. Field order is the serialisation order, which is canonical:
/// the stored bytes are exactly `serde_json::to_vec` of the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub format: u32,
    /// Random id of the writing host's chain.
    pub chain: String,
    /// 1, 2, 3, ... within the chain.
    pub seq: u64,
    /// hex SHA-256 of the previous record's stored bytes (64 zeros for seq 1).
    pub prev: String,
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    pub cluster: String,
    pub operation: String,
    /// "ok", "failed" or "started".
    pub outcome: String,
    pub user: String,
    pub uid: u32,
    pub host: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub tidemark_version: String,
    /// Data key the MAC key is derived from.
    pub key_id: String,
    /// hex HMAC-SHA256 over the record serialised without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Started,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Started => "started",
        }
    }
}

/// What happened, as the operation reports it.
#[derive(Debug, Clone)]
pub struct Event {
    pub operation: &'static str,
    pub outcome: Outcome,
    pub backup: Option<String>,
    pub objects: Vec<String>,
    pub detail: Option<String>,
}

impl Event {
    pub fn new(operation: &'static str, outcome: Outcome) -> Event {
        Event {
            operation,
            outcome,
            backup: None,
            objects: Vec::new(),
            detail: None,
        }
    }

    pub fn backup(mut self, id: impl Into<String>) -> Event {
        self.backup = Some(id.into());
        self
    }

    pub fn object(mut self, name: impl Into<String>) -> Event {
        self.objects.push(name.into());
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Event {
        self.detail = Some(d.into());
        self
    }

    /// The outcome of `r`, with the error as detail.
    pub fn outcome_of<T>(mut self, r: &Result<T, Error>) -> Event {
        match r {
            Ok(_) => self.outcome = Outcome::Ok,
            Err(e) => {
                self.outcome = Outcome::Failed;
                self.detail = Some(match self.detail.take() {
                    Some(d) => format!("{d}; {e}"),
                    None => e.to_string(),
                });
            }
        }
        self
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, b))
}

impl AuditRecord {
    /// The bytes the MAC covers: the record serialised without `mac`.
    fn mac_input(&self) -> Vec<u8> {
        let mut r = self.clone();
        r.mac = None;
        serde_json::to_vec(&r).unwrap_or_default()
    }

    /// Object name relative to the cluster directory.
    pub fn name(&self) -> String {
        layout::audit_record(&self.chain, &self.file_name())
    }

    fn file_name(&self) -> String {
        let compact = DateTime::parse_from_rfc3339(&self.time)
            .map(|t| t.with_timezone(&Utc).format("%Y%m%dT%H%M%SZ").to_string())
            .unwrap_or_else(|_| "00000000T000000Z".into());
        format!("{:012}-{compact}.json", self.seq)
    }
}

/// Parses `<seq:012>-<YYYYMMDDTHHMMSSZ>.json`.
fn parse_file_name(name: &str) -> Option<(u64, DateTime<Utc>)> {
    let stem = name.strip_suffix(".json")?;
    let (seq, time) = stem.split_once('-')?;
    if seq.len() != 12 {
        return None;
    }
    let seq = seq.parse().ok()?;
    let t = chrono::NaiveDateTime::parse_from_str(time, "%Y%m%dT%H%M%SZ").ok()?;
    Some((seq, t.and_utc()))
}

/// Appends `event` to the cluster's audit log. The record is durable locally when this
/// returns, whatever the result; an error means it (or an earlier pending one) could not be
/// uploaded yet, or could not be written at all. Callers log errors and carry on: an audit
/// outage must not stop a restore.
pub async fn append(
    cluster: &ClusterHandle,
    info: &ClusterInfo,
    keyring: &Keyring,
    event: Event,
) -> Result<(), Error> {
    let chain = LocalChain::new(cluster, &info.repository_id);
    let io = |e: std::io::Error| {
        Error::LocalIo(format!(
            "audit log in {}: {e} (set state_dir in the config to a directory this user can write)",
            chain.dir.display()
        ))
    };
    ensure_dir(&chain.pending_dir()).map_err(io)?;
    let lock_path = chain.dir.join("lock");
    let lock = tokio::task::spawn_blocking(move || FileLock::acquire(&lock_path))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(io)?;
    let id = chain.chain_id().map_err(io)?;
    let head = chain.head().map_err(io)?;
    let key_id = *keyring.current().id();
    let rec = AuditRecord {
        format: AUDIT_FORMAT,
        chain: id,
        seq: head.seq + 1,
        prev: head.hash,
        time: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        cluster: cluster.name.clone(),
        operation: event.operation.to_string(),
        outcome: event.outcome.as_str().to_string(),
        user: crate::host::user_name(),
        uid: crate::host::uid(),
        host: crate::host::hostname(),
        pid: std::process::id(),
        backup: event.backup,
        objects: event.objects,
        detail: event.detail.map(|d| d.chars().take(2000).collect()),
        tidemark_version: env!("CARGO_PKG_VERSION").to_string(),
        key_id: hex::encode(key_id),
        mac: None,
    };
    let (rec, bytes) = seal(rec, keyring, &info.repository_id)?;
    write_atomic(&chain.pending_dir().join(rec.file_name()), &bytes, true).map_err(io)?;
    let head = Head {
        seq: rec.seq,
        hash: sha256_hex(&bytes),
    };
    let head_json = serde_json::to_vec(&head).map_err(|e| Error::Internal(e.to_string()))?;
    write_atomic(&chain.dir.join("head"), &head_json, true).map_err(io)?;
    let r = upload_pending(cluster, &chain, &rec.chain).await;
    drop(lock);
    r
}

/// Sets the record's MAC and returns it with its canonical bytes.
fn seal(
    mut rec: AuditRecord,
    keyring: &Keyring,
    repository_id: &str,
) -> Result<(AuditRecord, Vec<u8>), Error> {
    let key_id = parse_key_id(&rec.key_id)
        .ok_or_else(|| Error::Internal(format!("bad key id {:?}", rec.key_id)))?;
    rec.mac = None;
    let mac = keyring
        .audit_mac(&key_id, repository_id, &rec.mac_input())
        .ok_or_else(|| Error::Internal("data key missing from keyring".into()))?;
    rec.mac = Some(hex::encode(mac));
    let bytes = serde_json::to_vec(&rec).map_err(|e| Error::Internal(e.to_string()))?;
    Ok((rec, bytes))
}

/// Uploads every pending record of this host's chain, oldest first. Never overwrites a
/// different object of the same name (that would rewrite history): it stops with an error.
async fn upload_pending(
    cluster: &ClusterHandle,
    chain: &LocalChain,
    chain_id: &str,
) -> Result<(), Error> {
    let repo = &cluster.repo;
    let pending = chain.pending().map_err(|e| Error::LocalIo(e.to_string()))?;
    for (file, bytes) in pending {
        let name = layout::audit_record(chain_id, &file);
        let key = repo.key(&name);
        if repo.exists(&name).await? {
            let existing = repo.get_plain(&name, MAX_RECORD_BYTES).await?;
            if existing != bytes {
                return Err(Error::Integrity(format!(
                    "{key} exists with other content: this host's audit chain collides with the \
                     repository's (was {} restored from an old copy?); records stay pending",
                    chain.dir.display()
                )));
            }
        } else {
            repo.put_plain(&name, Bytes::from(bytes)).await?;
        }
        let _ = std::fs::remove_file(chain.pending_dir().join(&file));
    }
    Ok(())
}

/// Uploads what a store outage left pending on this host (the daemon calls it).
pub async fn flush(cluster: &ClusterHandle, info: &ClusterInfo) -> Result<usize, Error> {
    let chain = LocalChain::new(cluster, &info.repository_id);
    let n = chain.pending().map(|p| p.len()).unwrap_or(0);
    if n == 0 {
        return Ok(0);
    }
    ensure_dir(&chain.dir).map_err(|e| Error::LocalIo(e.to_string()))?;
    let lock_path = chain.dir.join("lock");
    let _lock = tokio::task::spawn_blocking(move || FileLock::acquire(&lock_path))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::LocalIo(e.to_string()))?;
    let id = chain
        .chain_id()
        .map_err(|e| Error::LocalIo(e.to_string()))?;
    upload_pending(cluster, &chain, &id).await?;
    Ok(n)
}

/// Records not yet uploaded from this host, and the oldest one's time.
pub fn pending(cluster: &ClusterHandle, info: &ClusterInfo) -> (usize, Option<DateTime<Utc>>) {
    let chain = LocalChain::new(cluster, &info.repository_id);
    let p = chain.pending().unwrap_or_default();
    let oldest = p.first().and_then(|(n, _)| parse_file_name(n)).map(|x| x.1);
    (p.len(), oldest)
}

/// Appends and logs instead of failing: for operations whose own outcome must not depend on
/// the audit log's.
pub async fn record(cluster: &ClusterHandle, info: &ClusterInfo, keyring: &Keyring, event: Event) {
    let op = event.operation;
    if let Err(e) = append(cluster, info, keyring, event).await {
        tracing::error!(operation = op, error = %e, "audit record not uploaded (kept locally when possible)");
    }
}

/// A record with its object name.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub object: String,
    #[serde(flatten)]
    pub record: AuditRecord,
}

struct StoredRecord {
    /// The full store key (what `audit list` and problems print).
    key: String,
    seq: u64,
    bytes: Vec<u8>,
}

/// Every record object, grouped by chain (chains sorted, records by seq).
async fn load(
    cluster: &ClusterHandle,
    since: Option<DateTime<Utc>>,
) -> Result<(Vec<(String, Vec<StoredRecord>)>, Vec<String>), Error> {
    let mut by_chain: std::collections::BTreeMap<String, Vec<(u64, String)>> = Default::default();
    let mut strays = Vec::new();
    for o in cluster.repo.list(layout::audit_prefix()).await? {
        match layout::split_audit(&o.name)
            .and_then(|(c, n)| parse_file_name(n).map(|(seq, t)| (c.to_string(), seq, t)))
        {
            Some((c, seq, t)) => {
                // Names carry the time to the second: keep a margin for --since.
                if since.is_none_or(|s| t + chrono::Duration::seconds(1) >= s) {
                    by_chain.entry(c).or_default().push((seq, o.name));
                }
            }
            None => strays.push(o.meta.key),
        }
    }
    let mut out = Vec::new();
    for (chain, mut items) in by_chain {
        items.sort();
        let jobs = items.into_iter().map(|(seq, name)| {
            let repo = cluster.repo.clone();
            async move {
                let bytes = repo.get_plain(&name, MAX_RECORD_BYTES).await?;
                Ok(StoredRecord {
                    key: repo.key(&name),
                    seq,
                    bytes,
                })
            }
        });
        let mut recs = crate::parallel::run_bounded(jobs, 8).await?;
        recs.sort_by_key(|r| r.seq);
        out.push((chain, recs));
    }
    Ok((out, strays))
}

/// Records of the cluster (every chain), oldest first, from `since` on.
pub async fn list(
    cluster: &ClusterHandle,
    since: Option<DateTime<Utc>>,
) -> Result<Vec<Listed>, Error> {
    let (chains, _) = load(cluster, since).await?;
    let mut out = Vec::new();
    for (_, recs) in chains {
        for r in recs {
            let record: AuditRecord = serde_json::from_slice(&r.bytes)
                .map_err(|e| Error::Integrity(format!("{}: not an audit record: {e}", r.key)))?;
            if since
                .is_some_and(|s| DateTime::parse_from_rfc3339(&record.time).is_ok_and(|t| t < s))
            {
                continue;
            }
            out.push(Listed {
                object: r.key,
                record,
            });
        }
    }
    out.sort_by(|a, b| a.record.time.cmp(&b.record.time));
    Ok(out)
}

fn parse_key_id(s: &str) -> Option<[u8; KEY_ID_LEN]> {
    crate::pipeline::keys::parse_key_id(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        let (seq, t) = parse_file_name("000000000042-20261201T194333Z.json").unwrap();
        assert_eq!(seq, 42);
        assert_eq!(t.to_rfc3339(), "2026-12-01T19:43:33+00:00");
        assert!(parse_file_name("42-20261201T194333Z.json").is_none());
        assert!(parse_file_name("000000000042-x.json").is_none());
    }
}

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

use std::path::PathBuf;

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

#[derive(Debug, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// This host's chain of one cluster's repository: `<state_dir>/<cluster>/audit/<repository
/// id>/`. Per repository, so a cluster moved to a new repository starts a new chain there
/// instead of continuing one whose beginning is elsewhere.
struct LocalChain {
    dir: PathBuf,
}

impl LocalChain {
    fn new(cluster: &ClusterHandle, repository_id: &str) -> LocalChain {
        LocalChain {
            dir: cluster
                .state_dir
                .join(&cluster.name)
                .join("audit")
                .join(repository_id),
        }
    }

    fn pending_dir(&self) -> PathBuf {
        self.dir.join("pending")
    }

    /// The chain id, created on first use.
    fn chain_id(&self) -> std::io::Result<String> {
        let p = self.dir.join("chain");
        match std::fs::read_to_string(&p) {
            Ok(s) if s.trim().len() == 16 => return Ok(s.trim().to_string()),
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{}: not a chain id",
                    p.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut b = [0u8; 8];
        crate::pipeline::keys::random_bytes(&mut b).map_err(std::io::Error::other)?;
        let id = hex::encode(b);
        write_atomic(&p, id.as_bytes(), true)?;
        Ok(id)
    }

    /// Pending records in sequence order: (file name, bytes).
    fn pending(&self) -> std::io::Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(self.pending_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if parse_file_name(&name).is_some() {
                out.push((name, std::fs::read(e.path())?));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest record of the chain: the head file, or a pending record newer than it (a
    /// crash between writing the record and the head).
    fn head(&self) -> std::io::Result<Head> {
        let mut head = match std::fs::read(self.dir.join("head")) {
            Ok(b) => serde_json::from_slice(&b).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Head {
                seq: 0,
                hash: ZERO_HASH.into(),
            },
            Err(e) => return Err(e),
        };
        for (name, bytes) in self.pending()? {
            if let Some((seq, _)) = parse_file_name(&name)
                && seq > head.seq
            {
                head = Head {
                    seq,
                    hash: sha256_hex(&bytes),
                };
            }
        }
        Ok(head)
    }
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

#[derive(Debug, Clone, Serialize)]
pub struct ChainReport {
    pub chain: String,
    pub host: Option<String>,
    pub records: usize,
    pub first: Option<String>,
    pub last: Option<String>,
    /// The newest record's seq and SHA-256: keep them elsewhere to detect a later removal of
    /// the newest records.
    pub head_seq: u64,
    pub head_sha256: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub cluster: String,
    pub ok: bool,
    pub records: usize,
    pub chains: Vec<ChainReport>,
    pub problems: Vec<String>,
    /// Records written on this host and not yet uploaded.
    pub pending_here: usize,
}

/// Checks every chain of the cluster: record syntax, canonical form, MAC, seq continuity, the
/// `prev` links, and this host's local head.
pub async fn verify(cluster: &ClusterHandle) -> Result<VerifyReport, Error> {
    let info = cluster.repo.read_info().await?;
    let keyring = cluster.keyring(&info).await?;
    // This host's state before the listing: a record appended in between then only makes the
    // repository longer than the head, never shorter.
    let local = LocalChain::new(cluster, &info.repository_id);
    let local_id = std::fs::read_to_string(local.dir.join("chain"))
        .ok()
        .map(|s| s.trim().to_string());
    let local_head: Option<Head> = std::fs::read(local.dir.join("head"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let (pending_here, _) = pending(cluster, &info);
    let (chains, strays) = load(cluster, None).await?;
    let mut reports = Vec::new();
    let mut total = 0;
    let mut problems: Vec<String> = strays
        .iter()
        .map(|k| format!("{k}: not an audit record name"))
        .collect();
    let mut seen_local = false;
    for (chain, recs) in &chains {
        let mut rep = verify_chain(chain, recs, &keyring, &info.repository_id, &cluster.name);
        if local_id.as_deref() == Some(chain.as_str()) {
            seen_local = true;
            if let Some(h) = &local_head {
                check_local_head(&mut rep, recs, h, pending_here);
            }
        }
        total += rep.records;
        problems.extend(rep.problems.iter().map(|p| format!("chain {chain}: {p}")));
        reports.push(rep);
    }
    if !seen_local
        && let (Some(id), Some(h)) = (&local_id, &local_head)
        && h.seq > pending_here as u64
    {
        problems.push(format!(
            "chain {id} of this host holds {} record(s) but none is in the repository: removed",
            h.seq
        ));
    }
    Ok(VerifyReport {
        cluster: cluster.name.clone(),
        ok: problems.is_empty(),
        records: total,
        chains: reports,
        problems,
        pending_here,
    })
}

fn check_local_head(rep: &mut ChainReport, recs: &[StoredRecord], h: &Head, pending_here: usize) {
    // Pending records are the newest ones; the repository must hold everything before them.
    let uploaded_through = h.seq.saturating_sub(pending_here as u64);
    if rep.head_seq < uploaded_through {
        rep.problems.push(format!(
            "the newest records were removed: this host wrote through seq {uploaded_through}, \
             the repository ends at seq {}",
            rep.head_seq
        ));
    } else if pending_here == 0
        && let Some(last) = recs.iter().find(|r| r.seq == h.seq)
        && sha256_hex(&last.bytes) != h.hash
    {
        rep.problems
            .push(format!("seq {}: differs from what this host wrote", h.seq));
    }
}

fn verify_chain(
    chain: &str,
    recs: &[StoredRecord],
    keyring: &Keyring,
    repository_id: &str,
    cluster: &str,
) -> ChainReport {
    let mut rep = ChainReport {
        chain: chain.to_string(),
        host: None,
        records: recs.len(),
        first: None,
        last: None,
        head_seq: 0,
        head_sha256: ZERO_HASH.into(),
        problems: Vec::new(),
    };
    let mut expect_seq = 1u64;
    let mut prev_hash = ZERO_HASH.to_string();
    for r in recs {
        let name = r.key.rsplit('/').next().unwrap_or_default();
        if r.seq != expect_seq {
            if r.seq > expect_seq {
                rep.problems.push(format!(
                    "record(s) {expect_seq}..{} missing: removed",
                    r.seq - 1
                ));
            } else {
                rep.problems.push(format!("seq {} appears twice", r.seq));
            }
        }
        let hash = sha256_hex(&r.bytes);
        match serde_json::from_slice::<AuditRecord>(&r.bytes) {
            Err(e) => rep
                .problems
                .push(format!("{name}: not an audit record ({e}): edited")),
            Ok(rec) => {
                let canonical = serde_json::to_vec(&rec).unwrap_or_default();
                let mac_ok = parse_key_id(&rec.key_id)
                    .and_then(|id| keyring.audit_mac(&id, repository_id, &rec.mac_input()))
                    .is_some_and(|m| Some(hex::encode(m)) == rec.mac);
                if canonical != r.bytes || !mac_ok {
                    rep.problems.push(format!(
                        "{name}: authentication failed: the record was edited"
                    ));
                } else if rec.chain != chain
                    || rec.seq != r.seq
                    || rec.cluster != cluster
                    || rec.format != AUDIT_FORMAT
                {
                    rep.problems.push(format!(
                        "{name}: names chain {} seq {} of cluster {}: moved or renamed",
                        rec.chain, rec.seq, rec.cluster
                    ));
                }
                if r.seq == expect_seq && rec.prev != prev_hash {
                    rep.problems.push(format!(
                        "{name}: does not follow record {} (prev hash mismatch): the chain was \
                         edited before it",
                        r.seq.saturating_sub(1)
                    ));
                }
                rep.first.get_or_insert(rec.time.clone());
                rep.last = Some(rec.time.clone());
                rep.host = Some(rec.host.clone());
            }
        }
        prev_hash = hash.clone();
        expect_seq = r.seq + 1;
        rep.head_seq = r.seq;
        rep.head_sha256 = hash;
    }
    rep
}

fn parse_key_id(s: &str) -> Option<[u8; KEY_ID_LEN]> {
    crate::pipeline::keys::parse_key_id(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::keys::DataKey;

    fn chain_of(n: u64, ring: &Keyring) -> Vec<StoredRecord> {
        let mut prev = ZERO_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let rec = AuditRecord {
                    format: AUDIT_FORMAT,
                    chain: "00112233445566ff".into(),
                    seq,
                    prev: prev.clone(),
                    time: format!("2026-12-01T10:00:{seq:02}.000000Z"),
                    cluster: "acme".into(),
                    operation: "backup".into(),
                    outcome: "ok".into(),
                    user: "postgres".into(),
                    uid: 999,
                    host: "db1".into(),
                    pid: 7,
                    backup: Some(format!("b{seq}")),
                    objects: vec![],
                    detail: None,
                    tidemark_version: "0".into(),
                    key_id: hex::encode(ring.current().id()),
                    mac: None,
                };
                let (rec, bytes) = seal(rec, ring, "repo").unwrap();
                prev = sha256_hex(&bytes);
                StoredRecord {
                    key: format!("acme/{}", rec.name()),
                    seq,
                    bytes,
                }
            })
            .collect()
    }

    fn ring() -> Keyring {
        Keyring::from_keys_for_tests(DataKey::from_parts([3; 16], [9; 32]))
    }

    #[test]
    fn intact_chain_verifies() {
        let r = ring();
        let recs = chain_of(4, &r);
        let rep = verify_chain("00112233445566ff", &recs, &r, "repo", "acme");
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        assert_eq!(rep.records, 4);
        assert_eq!(rep.head_seq, 4);
        assert_eq!(rep.head_sha256, sha256_hex(&recs[3].bytes));
    }

    #[test]
    fn edited_removed_and_forged_records_are_caught() {
        let r = ring();
        // Edited: one field changed, the MAC no longer matches.
        let mut recs = chain_of(3, &r);
        let text = String::from_utf8(recs[1].bytes.clone()).unwrap();
        recs[1].bytes = text.replace("\"ok\"", "\"failed\"").into_bytes();
        let p = verify_chain("00112233445566ff", &recs, &r, "repo", "acme").problems;
        assert!(p.iter().any(|x| x.contains("edited")), "{p:?}");
        // ... and the next record no longer follows it.
        assert!(p.iter().any(|x| x.contains("prev hash")), "{p:?}");

        // Removed from the middle.
        let mut recs = chain_of(3, &r);
        recs.remove(1);
        let p = verify_chain("00112233445566ff", &recs, &r, "repo", "acme").problems;
        assert!(p.iter().any(|x| x.contains("2..2 missing")), "{p:?}");

        // Forged with another key: a consistent chain, but not authentic.
        let other = Keyring::from_keys_for_tests(DataKey::from_parts([3; 16], [1; 32]));
        let recs = chain_of(2, &other);
        let p = verify_chain("00112233445566ff", &recs, &r, "repo", "acme").problems;
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p.iter().all(|x| x.contains("authentication failed")),
            "{p:?}"
        );

        // Bound to the repository.
        let recs = chain_of(1, &r);
        assert!(
            !verify_chain("00112233445566ff", &recs, &r, "other", "acme")
                .problems
                .is_empty()
        );
    }

    #[test]
    fn local_head_catches_removed_tail() {
        let r = ring();
        let recs = chain_of(5, &r);
        let head = Head {
            seq: 5,
            hash: sha256_hex(&recs[4].bytes),
        };
        let mut rep = verify_chain("00112233445566ff", &recs[..3], &r, "repo", "acme");
        check_local_head(&mut rep, &recs[..3], &head, 0);
        assert!(
            rep.problems
                .iter()
                .any(|p| p.contains("newest records were removed"))
        );
        // With two records still pending locally, three in the repository is complete.
        let mut rep = verify_chain("00112233445566ff", &recs[..3], &r, "repo", "acme");
        check_local_head(&mut rep, &recs[..3], &head, 2);
        assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    }

    #[test]
    fn file_names_round_trip() {
        let (seq, t) = parse_file_name("000000000042-20261201T194333Z.json").unwrap();
        assert_eq!(seq, 42);
        assert_eq!(t.to_rfc3339(), "2026-12-01T19:43:33+00:00");
        assert!(parse_file_name("42-20261201T194333Z.json").is_none());
        assert!(parse_file_name("000000000042-x.json").is_none());
    }
}

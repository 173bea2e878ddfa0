//! `audit verify`: every chain of the cluster checked record by record (syntax, canonical
//! form, MAC, seq continuity, `prev` links), and this host's chain against its local head.

use serde::Serialize;

use super::chain::{Head, LocalChain};
use super::{
    AUDIT_FORMAT, AuditRecord, StoredRecord, ZERO_HASH, load, parse_key_id, pending, sha256_hex,
};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::pipeline::Keyring;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::seal;
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
}

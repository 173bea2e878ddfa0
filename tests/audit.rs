//! The audit log against a real cluster and repository: backups, a restore and the WAL files
//! it fetched, expire deletions and the key set-up are recorded; `audit verify` passes, and
//! fails naming the record when one is edited, removed from the middle, or the newest one is
//! removed; a record that cannot be uploaded waits locally and goes up with the next one.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn records(st: &Archiving, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["audit", "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&st.run(&args).ok().stdout).unwrap()
}

fn chain_files(st: &Archiving) -> Vec<PathBuf> {
    let dir = st.dir.join("repo/acme/audit");
    let chains: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(chains.len(), 1, "one host, one chain: {chains:?}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&chains[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_records_accesses_and_verify_catches_tampering() {
    let st = Archiving::start("audit", &StoreKind::Local, ArchivingOptions::default());
    let c = st.pg.client().await;
    c.batch_execute("create table t(x int); insert into t values (1)")
        .await
        .unwrap();
    st.pg.switch_wal().await;
    let b1: serde_json::Value =
        serde_json::from_str(&st.run(&["backup", "--json"]).ok().stdout).unwrap();
    c.batch_execute("insert into t values (2)").await.unwrap();
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;

    // A restore, started: the server fetches WAL through wal-fetch.
    let r = Restored::new(&st.dir, "r1");
    let mut args = vec!["restore".to_string()];
    args.extend(r.start_args());
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    st.run(&args).ok();
    drop(r);

    // A second backup, then expire with a tiny window: the first backup goes.
    st.run(&["backup"]).ok();
    let text = std::fs::read_to_string(&st.cfg).unwrap().replace(
        "[clusters.acme]",
        "[retention]\nrecovery_window = \"1ms\"\nmin_backups = 1\n\n[clusters.acme]",
    );
    std::fs::write(&st.cfg, text).unwrap();
    let ex: serde_json::Value =
        serde_json::from_str(&st.run(&["expire", "--json"]).ok().stdout).unwrap();
    assert_eq!(ex["deleted_backups"], 1, "{ex}");

    let all = records(&st, &[]);
    let ops: Vec<(&str, &str)> = all
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [
        ("key_init", "ok"),
        ("backup", "ok"),
        ("restore", "started"),
        ("restore", "ok"),
        ("wal_fetch", "ok"),
        ("expire", "ok"),
    ] {
        assert!(ops.contains(&want), "no {want:?} in {ops:?}");
    }
    let id1 = b1["id"].as_str().unwrap();
    assert!(
        all.iter()
            .any(|r| r["operation"] == "expire" && r["detail"].as_str().unwrap().contains(id1)),
        "{all:#?}"
    );
    assert!(all.iter().any(|r| {
        r["operation"] == "wal_fetch"
            && r["objects"][0]
                .as_str()
                .unwrap()
                .starts_with("wal/00000001/")
    }));
    for r in &all {
        assert_eq!(r["cluster"], "acme");
        assert!(!r["user"].as_str().unwrap().is_empty() && !r["host"].as_str().unwrap().is_empty());
    }
    // Sequence numbers are contiguous and in order of time.
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    assert!(records(&st, &["--since", "2099-01-01 00:00:00+00"]).is_empty());
    assert_eq!(records(&st, &["--since", "1h"]).len(), all.len());

    let ok = st.run(&["audit", "verify"]).ok();
    assert!(ok.stdout.contains("OK"), "{ok:?}");

    let files = chain_files(&st);
    assert_eq!(files.len(), all.len());
    let middle = files[files.len() / 2].clone();
    let newest = files.last().unwrap().clone();
    let original = std::fs::read(&middle).unwrap();
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();

    // Edited: an outcome changed.
    let text = String::from_utf8(original.clone()).unwrap();
    let edited = if text.contains("\"outcome\":\"ok\"") {
        text.replace("\"outcome\":\"ok\"", "\"outcome\":\"failed\"")
    } else {
        text.replace("\"outcome\":\"started\"", "\"outcome\":\"ok\"")
    };
    assert_ne!(edited, text);
    std::fs::write(&middle, &edited).unwrap();
    let r = st.run(&["audit", "verify"]).fails_with(16, &name(&middle));
    assert!(r.stdout.contains("edited"), "{r:?}");
    std::fs::write(&middle, &original).unwrap();
    st.run(&["audit", "verify"]).ok();

    // Removed from the middle.
    std::fs::remove_file(&middle).unwrap();
    st.run(&["audit", "verify"]).fails_with(16, "missing");
    std::fs::write(&middle, &original).unwrap();

    // The newest removed: only this host's own head can tell.
    let last = std::fs::read(&newest).unwrap();
    std::fs::remove_file(&newest).unwrap();
    st.run(&["audit", "verify"])
        .fails_with(16, "newest records were removed");
    std::fs::write(&newest, &last).unwrap();
    st.run(&["audit", "verify"]).ok();

    // A record that cannot be uploaded stays on this host and goes up with the next one.
    let chain_dir = newest.parent().unwrap().to_path_buf();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&chain_dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let r = st.run(&["backup"]);
    let restore_perm = || {
        std::fs::set_permissions(&chain_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    assert_eq!(r.code, 0, "an audit outage must not fail the backup: {r:?}");
    assert!(r.stderr.contains("audit record not uploaded"), "{r:?}");
    let chk: serde_json::Value =
        serde_json::from_str(&st.run(&["check", "--json", "--no-switch"]).stdout).unwrap();
    let audit = chk["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "audit")
        .unwrap()
        .clone();
    assert_eq!(audit["value"], 1.0, "{chk}");
    restore_perm();
    st.run(&["backup"]).ok();
    let after = records(&st, &[]);
    assert_eq!(after.len(), all.len() + 2, "the pending record was lost");
    st.run(&["audit", "verify"]).ok();
}

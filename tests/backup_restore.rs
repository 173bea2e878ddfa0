//! Base backups and point-in-time restore against real PostgreSQL, on the local store and on
//! S3: exactness of every kind of target under concurrent pgbench load, timelines, and faults.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

type Setup = Archiving;

async fn setup(tag: &str, store: &StoreKind) -> Setup {
    let st = Archiving::start(
        tag,
        store,
        ArchivingOptions {
            extra_conf: "track_commit_timestamp = on\n",
            ..Default::default()
        },
    );
    let c = st.pg.client().await;
    c.batch_execute(
        "create table markers(seq int primary key, xid bigint not null); \
         select pg_switch_wal();",
    )
    .await
    .unwrap();
    st
}

/// A committed marker row: its commit timestamp (from track_commit_timestamp), transaction id
/// and the WAL insert positions just before and just after its transaction.
#[derive(Debug, Clone)]
struct Marker {
    seq: i32,
    commit_ts: String,
    xid: i64,
    lsn_before: u64,
    lsn_after: u64,
}

/// A timestamp as PostgreSQL prints it ("2026-01-10 12:00:00.123456+00") or as tidemark's JSON
/// does (RFC 3339).
fn timestamp(s: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_str(&format!("{s}00"), "%Y-%m-%d %H:%M:%S%.f%z")
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(s))
        .unwrap_or_else(|e| panic!("timestamp {s:?}: {e}"))
}

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

async fn marker(c: &tokio_postgres::Client, seq: i32) -> Marker {
    let before: String = c
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    c.execute("insert into markers values ($1, txid_current())", &[&seq])
        .await
        .unwrap();
    let row = c
        .query_one(
            "select pg_xact_commit_timestamp(xmin)::text, xid, pg_current_wal_insert_lsn()::text from markers where seq = $1",
            &[&seq],
        )
        .await
        .unwrap();
    Marker {
        seq,
        commit_ts: row.get(0),
        xid: row.get(1),
        lsn_before: lsn(&before),
        lsn_after: lsn(&row.get::<_, String>(2)),
    }
}

async fn restored_markers(r: &Restored) -> Vec<i32> {
    let c = r.client().await;
    c.query("select seq from markers order by seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn backup(st: &Setup) -> serde_json::Value {
    let r = tidemark(
        &st.dir.path,
        &[
            "--config",
            s(&st.cfg),
            "backup",
            "--json",
            "--wal-timeout",
            "60s",
        ],
    )
    .ok();
    serde_json::from_str(&r.stdout).unwrap()
}

/// Restores with `target` args into a fresh directory, starts it, returns the server.
fn restore(st: &Setup, name: &str, target: &[&str]) -> (Restored, serde_json::Value) {
    let r = Restored::new(&st.dir, name);
    let mut args: Vec<String> = vec![
        "--config".into(),
        s(&st.cfg).into(),
        "restore".into(),
        "--json".into(),
        "--archive-mode".into(),
        "off".into(),
    ];
    args.extend(target.iter().map(|a| a.to_string()));
    args.extend(r.start_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tidemark(&st.dir.path, &argv).ok();
    let json = serde_json::from_str(&out.stdout).unwrap();
    (r, json)
}

fn upto(markers: &[Marker], last: i32) -> Vec<i32> {
    markers
        .iter()
        .map(|m| m.seq)
        .filter(|&s| s <= last)
        .collect()
}

async fn exactness(store: StoreKind, tag: &str) {
    let st = setup(tag, &store).await;
    st.pg.pgbench(&["-i", "-s", "2", "-q"]);
    let c = st.pg.client().await;
    let mut markers = Vec::new();

    // Concurrent load for the whole scenario.
    let bench = {
        let bin = st.pg.bin.clone();
        let sock = st.pg.socket_dir.clone();
        let port = st.pg.port;
        std::thread::spawn(move || {
            as_user(bin.join("pgbench"))
                .arg("-h")
                .arg(sock)
                .arg("-p")
                .arg(port.to_string())
                .args(["-U", "postgres", "-c", "2", "-T", "25", "-n", "postgres"])
                .output()
                .unwrap()
        })
    };

    for seq in 1..=5 {
        markers.push(marker(&c, seq).await);
    }
    let backup_a = backup(&st);
    for seq in 6..=10 {
        markers.push(marker(&c, seq).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Backup B runs while markers 11.. are written.
    let mut child = as_user(tidemark_bin())
        .args([
            "--config",
            s(&st.cfg),
            "backup",
            "--json",
            "--wal-timeout",
            "60s",
            "--parallel",
            "1",
        ])
        .current_dir(&st.dir.path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seq = 11;
    let mut during = Vec::new();
    loop {
        let m = marker(&c, seq).await;
        during.push(seq);
        markers.push(m);
        seq += 1;
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "backup B: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let backup_b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for _ in 0..5 {
        markers.push(marker(&c, seq).await);
        seq += 1;
    }
    let rp_after = seq - 1;
    c.batch_execute("select pg_create_restore_point('after_markers')")
        .await
        .unwrap();
    for _ in 0..6 {
        markers.push(marker(&c, seq).await);
        seq += 1;
    }
    let last = seq - 1;
    // Let pgbench's commits follow the last marker (a time target needs a later commit).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let end = st.pg.switch_wal().await;
    st.pg.wait_archived(&end, Duration::from_secs(120)).await;

    let listing: serde_json::Value = serde_json::from_str(
        &tidemark(&st.dir.path, &["--config", s(&st.cfg), "list", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(listing["backups"].as_array().unwrap().len(), 2, "{listing}");
    assert_eq!(listing["backups"][0]["id"], backup_a["id"]);
    assert!(listing["windows"][0]["from"].is_string(), "{listing}");
    let text = tidemark(&st.dir.path, &["--config", s(&st.cfg), "list"])
        .ok()
        .stdout;
    assert!(
        text.contains("restorable window") && text.contains(backup_b["id"].as_str().unwrap()),
        "{text}"
    );

    // A marker committed while backup B was copying (after its start, before its stop): B
    // cannot restore to it, so the restore must choose A. (Markers written after B's stop
    // but before the process exited, while it waited for WAL, belong to B.)
    let b_start = timestamp(backup_b["start_time"].as_str().unwrap());
    let b_stop = timestamp(backup_b["stop_time"].as_str().unwrap());
    let inside: Vec<i32> = during
        .iter()
        .copied()
        .filter(|seq| {
            let t = timestamp(&markers.iter().find(|m| m.seq == *seq).unwrap().commit_ts);
            t > b_start && t < b_stop
        })
        .collect();
    assert!(
        !inside.is_empty(),
        "no marker committed while backup B copied ({b_start} .. {b_stop})"
    );
    let mid_during = inside[inside.len() / 2];
    let m = |seq: i32| markers.iter().find(|m| m.seq == seq).unwrap().clone();
    let cases: Vec<(String, Vec<String>, Vec<i32>)> = vec![
        (
            "between backups".into(),
            vec!["--target-time".into(), m(8).commit_ts],
            upto(&markers, 8),
        ),
        (
            "during backup B".into(),
            vec!["--target-time".into(), m(mid_during).commit_ts],
            upto(&markers, mid_during),
        ),
        (
            "near the end".into(),
            vec!["--target-time".into(), m(last - 1).commit_ts],
            upto(&markers, last - 1),
        ),
        (
            "exclusive time".into(),
            vec![
                "--target-time".into(),
                m(last - 2).commit_ts,
                "--target-exclusive".into(),
            ],
            upto(&markers, last - 3),
        ),
        (
            "lsn".into(),
            vec![
                "--target-lsn".into(),
                format!(
                    "{:X}/{:X}",
                    m(rp_after - 2).lsn_after >> 32,
                    m(rp_after - 2).lsn_after & 0xFFFF_FFFF
                ),
            ],
            upto(&markers, rp_after - 2),
        ),
        (
            "xid".into(),
            vec!["--target-xid".into(), m(rp_after - 1).xid.to_string()],
            upto(&markers, rp_after - 1),
        ),
        (
            "restore point".into(),
            vec!["--target-name".into(), "after_markers".into()],
            upto(&markers, rp_after),
        ),
        ("latest".into(), vec![], upto(&markers, last)),
    ];
    for (i, (what, args, expect)) in cases.iter().enumerate() {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (r, json) = restore(&st, &format!("r{i}"), &argv);
        let got = restored_markers(&r).await;
        assert_eq!(&got, expect, "{what}: restored markers differ ({json})");
        assert!(json["started"]["recovery_ms"].as_u64().is_some(), "{json}");
        if what == "during backup B" {
            assert_eq!(
                json["backup"], backup_a["id"],
                "a target inside backup B needs backup A"
            );
        }
        if i == 0 || what == "latest" {
            assert!(r.amcheck(), "{what}: pg_amcheck failed");
        }
    }

    // Immediate: exactly what was committed before backup B's end.
    let stop = lsn(backup_b["stop_lsn"].as_str().unwrap());
    let (r, _) = restore(
        &st,
        "rimm",
        &["--immediate", "--backup", backup_b["id"].as_str().unwrap()],
    );
    let got = restored_markers(&r).await;
    let k = got.len() as i32;
    assert_eq!(got, (1..=k).collect::<Vec<_>>(), "immediate: not a prefix");
    for mk in &markers {
        if mk.lsn_after <= stop {
            assert!(
                mk.seq <= k,
                "marker {} committed before the backup end is missing",
                mk.seq
            );
        }
        if mk.lsn_before >= stop {
            assert!(
                mk.seq > k,
                "marker {} committed after the backup end is present",
                mk.seq
            );
        }
    }
    drop(r);
    let _ = bench.join();
}

#[tokio::test(flavor = "multi_thread")]
async fn point_in_time_exactness_local() {
    exactness(StoreKind::Local, "pitrl").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn point_in_time_exactness_s3() {
    let (store, _garage) = s3_store("pitrs3");
    exactness(store, "pitrs3").await;
}

/// Restore, promote, write, archive the new timeline; restore again onto it.
#[tokio::test(flavor = "multi_thread")]
async fn timelines() {
    let st = setup("tli", &StoreKind::Local).await;
    let c = st.pg.client().await;
    backup(&st);
    for seq in 1..=3 {
        marker(&c, seq).await;
    }
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;

    // First restore keeps archiving on: after promotion it archives timeline 2.
    let r1 = Restored::new(&st.dir, "t1");
    let mut args = vec![
        "--config",
        s(&st.cfg),
        "restore",
        "--json",
        "--archive-mode",
        "preserve",
    ];
    let start_args = r1.start_args();
    args.extend(start_args.iter().map(String::as_str));
    let out = tidemark(&st.dir.path, &args).ok();
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["started"]["timeline"], 2, "{json}");
    let c1 = r1.client().await;
    c1.batch_execute("insert into markers values (100, txid_current())")
        .await
        .unwrap();
    let seg2: String = c1
        .query_one("select pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    assert!(seg2.starts_with("00000002"), "{seg2}");
    // Wait until the restored server archived its timeline-2 segment.
    let t = std::time::Instant::now();
    loop {
        let last: Option<String> = c1
            .query_one("select last_archived_wal from pg_stat_archiver", &[])
            .await
            .unwrap()
            .get(0);
        if last.as_deref().is_some_and(|l| l >= seg2.as_str()) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timeline 2 not archived: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c1);
    r1.stop();

    let wal: serde_json::Value = serde_json::from_str(
        &tidemark(
            &st.dir.path,
            &["--config", s(&st.cfg), "wal-list", "--json"],
        )
        .ok()
        .stdout,
    )
    .unwrap();
    assert!(
        wal["timelines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["timeline"] == 2 && t["history_file"] == true),
        "{wal}"
    );
    let listing: serde_json::Value = serde_json::from_str(
        &tidemark(&st.dir.path, &["--config", s(&st.cfg), "list", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert!(
        listing["windows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["timeline"] == 2),
        "{listing}"
    );

    // Onto timeline 2 (latest): the row written after the promotion is there.
    let (r2, j2) = restore(&st, "t2", &[]);
    assert_eq!(restored_markers(&r2).await, vec![1, 2, 3, 100], "{j2}");
    drop(r2);
    // Along the backup's own timeline: it is not.
    let (r3, j3) = restore(&st, "t3", &["--target-timeline", "current"]);
    assert_eq!(restored_markers(&r3).await, vec![1, 2, 3], "{j3}");
}

/// kill -9 mid-backup, two backups at once, corrupted data, a missing WAL segment, a non-empty
/// target directory and the wrong key.
#[tokio::test(flavor = "multi_thread")]
async fn faults() {
    let st = setup("faults", &StoreKind::Local).await;
    let cfg = s(&st.cfg);
    let d = &st.dir.path;
    st.pg.pgbench(&["-i", "-s", "8", "-q"]);

    // kill -9 half-way: nothing listed, leftovers removed by the next backup.
    let mut child = as_user(tidemark_bin())
        .args(["--config", cfg, "backup", "--parallel", "1"])
        .current_dir(d)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let backups_dir = st.dir.join("repo/acme/backups");
    let t = std::time::Instant::now();
    while !std::fs::read_dir(&backups_dir)
        .map(|mut r| r.next().is_some())
        .unwrap_or(false)
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "backup never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    // runuser forwards the signal only on SIGTERM; kill the tidemark process itself.
    let pids = std::process::Command::new("pgrep")
        .args(["-f", &format!("{cfg} backup")])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = std::process::Command::new("kill")
            .args(["-9", pid])
            .status();
    }
    let _ = child.wait();
    let killed: Vec<String> = std::fs::read_dir(&backups_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(killed.len(), 1);
    assert!(
        !backups_dir.join(&killed[0]).join("manifest").exists(),
        "killed backup has a manifest"
    );
    let listing: serde_json::Value = serde_json::from_str(
        &tidemark(d, &["--config", cfg, "list", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(listing["backups"].as_array().unwrap().len(), 0, "{listing}");
    let r = tidemark(
        d,
        &[
            "--config",
            cfg,
            "restore",
            "--pgdata",
            s(&st.dir.join("nothing")),
        ],
    );
    assert_ne!(
        r.code, 0,
        "restore with no complete backup must fail: {r:?}"
    );

    // Two backups at once: the second is refused.
    // The killed backup's session (and so its lock) ends when PostgreSQL notices the closed
    // connection; wait for that, as an operator retrying would.
    let c = st.pg.client().await;
    let t = std::time::Instant::now();
    loop {
        let held: i64 = c
            .query_one(
                "select count(*) from pg_locks where locktype = 'advisory'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if held == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the killed backup's lock stays"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut first = as_user(tidemark_bin())
        .args(["--config", cfg, "backup", "--json", "--parallel", "1"])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first holds the lock once its `started` marker exists.
    let t = std::time::Instant::now();
    while !std::fs::read_dir(&backups_dir)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy() != killed[0])
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "first backup never started"
        );
        if first.try_wait().unwrap().is_some() {
            let out = first.wait_with_output().unwrap();
            panic!(
                "first backup ended early: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    tidemark(d, &["--config", cfg, "backup"]).fails_with(11, "another backup");
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        b["removed_incomplete"],
        serde_json::json!([killed[0]]),
        "{b}"
    );
    assert!(
        !backups_dir.join(&killed[0]).exists(),
        "leftovers of the killed backup remain"
    );
    let id = b["id"].as_str().unwrap().to_string();

    // A corrupted data object: restore fails naming it and leaves nothing startable.
    let pack = backups_dir.join(&id).join("packs/000000");
    let pristine = std::fs::read(&pack).unwrap();
    let mut bad = pristine.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x01;
    std::fs::write(&pack, &bad).unwrap();
    let target = st.dir.join("corrupt");
    tidemark(d, &["--config", cfg, "restore", "--pgdata", s(&target)])
        .fails_with(5, &format!("backups/{id}/packs/000000"));
    assert!(
        std::fs::read_dir(&target)
            .map(|mut r| r.next().is_none())
            .unwrap_or(true),
        "half-restored files left"
    );
    std::fs::write(&pack, &pristine).unwrap();

    // Restore into a non-empty directory.
    let nonempty = st.dir.join("nonempty");
    std::fs::create_dir_all(&nonempty).unwrap();
    std::fs::write(nonempty.join("precious"), b"x").unwrap();
    tidemark(d, &["--config", cfg, "restore", "--pgdata", s(&nonempty)]).fails_with(2, "not empty");
    assert!(nonempty.join("precious").exists());

    // The wrong key.
    tidemark(d, &["key", "generate", s(&st.dir.join("wrong.key"))]).ok();
    let other = st.dir.join("wrongkey.toml");
    std::fs::write(
        &other,
        std::fs::read_to_string(&st.cfg)
            .unwrap()
            .replace("acme.key", "wrong.key"),
    )
    .unwrap();
    tidemark(
        d,
        &[
            "--config",
            s(&other),
            "restore",
            "--pgdata",
            s(&st.dir.join("wk")),
        ],
    )
    .fails_with(3, "wrong master key");

    // A missing WAL segment: the window stops before it, restoring past it is refused, and a
    // target before it restores exactly what was committed up to there.
    let c = st.pg.client().await;
    let before_gap = marker(&c, 1).await;
    // Marker 1's segment ends with a later commit (switch_wal writes one), so a time target
    // at marker 1 can stop there; the next segment, the one removed, holds nothing else.
    st.pg.switch_wal().await;
    let gap_seg = st.pg.switch_wal().await;
    let after_gap = marker(&c, 2).await;
    marker(&c, 3).await;
    let end = st.pg.switch_wal().await;
    st.pg.wait_archived(&end, Duration::from_secs(60)).await;
    std::fs::remove_file(st.dir.join(&format!("repo/acme/wal/00000001/{gap_seg}"))).unwrap();
    let listing: serde_json::Value = serde_json::from_str(
        &tidemark(d, &["--config", cfg, "list", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    let gaps = listing["wal_gaps"].as_array().unwrap();
    assert!(
        gaps.iter().any(|g| g[1]["from"] == gap_seg.as_str()),
        "{listing}"
    );
    let latest = listing["latest_restorable"].as_str().unwrap().to_string();
    assert!(
        latest.as_str() < after_gap.commit_ts.replace(' ', "T").as_str(),
        "window must end before the gap: {listing}"
    );
    assert!(
        timestamp(&latest) > timestamp(&before_gap.commit_ts),
        "window must reach past marker 1, before the gap: {listing}"
    );
    let text = tidemark(d, &["--config", cfg, "list"]).ok().stdout;
    assert!(text.contains("WAL GAP"), "{text}");
    let r = tidemark(
        d,
        &[
            "--config",
            cfg,
            "restore",
            "--pgdata",
            s(&st.dir.join("pastgap")),
            "--target-time",
            &after_gap.commit_ts,
        ],
    );
    r.fails_with(13, "restorable window");
    // Before the gap: the backup plus the WAL up to marker 1, and nothing after it.
    let (r, json) = restore(&st, "beforegap", &["--target-time", &before_gap.commit_ts]);
    assert_eq!(json["backup"], id.as_str(), "{json}");
    let rows: Vec<(i32, i64)> = r
        .client()
        .await
        .query("select seq, xid from markers order by seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![(before_gap.seq, before_gap.xid)],
        "restored before the gap: exactly marker 1 ({json})"
    );
}

/// A restore point or transaction from before the newest backup: restore finds it in the WAL
/// and uses the older backup (the newest one that ended before it).
#[tokio::test(flavor = "multi_thread")]
async fn named_and_xid_targets_before_the_newest_backup() {
    let st = setup("rpx", &StoreKind::Local).await;
    let c = st.pg.client().await;
    let a = backup(&st);
    marker(&c, 1).await;
    c.batch_execute("select pg_create_restore_point('before_migration')")
        .await
        .unwrap();
    let m2 = marker(&c, 2).await;
    st.pg.switch_wal().await;
    let b = backup(&st);
    marker(&c, 3).await;
    let end = st.pg.switch_wal().await;
    st.pg.wait_archived(&end, Duration::from_secs(60)).await;

    let (r, j) = restore(&st, "rp", &["--target-name", "before_migration"]);
    assert_eq!(j["backup"], a["id"], "{j}");
    assert_eq!(restored_markers(&r).await, vec![1]);
    drop(r);
    let (r, j) = restore(&st, "xid", &["--target-xid", &m2.xid.to_string()]);
    assert_eq!(j["backup"], a["id"], "{j}");
    assert_eq!(restored_markers(&r).await, vec![1, 2]);
    drop(r);
    // A restore point after the newest backup uses that backup.
    c.batch_execute("select pg_create_restore_point('later')")
        .await
        .unwrap();
    marker(&c, 4).await;
    let end = st.pg.switch_wal().await;
    st.pg.wait_archived(&end, Duration::from_secs(60)).await;
    let (r, j) = restore(&st, "later", &["--target-name", "later"]);
    assert_eq!(j["backup"], b["id"], "{j}");
    assert_eq!(restored_markers(&r).await, vec![1, 2, 3]);
    drop(r);
    tidemark(
        &st.dir.path,
        &[
            "--config",
            s(&st.cfg),
            "restore",
            "--pgdata",
            s(&st.dir.join("none")),
            "--target-name",
            "never_created",
        ],
    )
    .fails_with(13, "does not occur in the archived WAL");
}

//! Retention against a real cluster: expire removes exactly what falls out of the window, keeps
//! the backup that starts it, never WAL a kept backup needs, and the earliest moment inside the
//! window still restores afterwards.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn expire_keeps_exactly_the_window() {
    let st = Archiving::start("exp", &StoreKind::Local, ArchivingOptions::default());
    let (dir, pg, cfg) = (&st.dir, &st.pg, st.cfg.clone());
    let c = pg.client().await;
    c.batch_execute("create table t(x int)").await.unwrap();

    let mut backups = Vec::new();
    let mut inserted = Vec::new();
    for i in 0..3 {
        let at: chrono::DateTime<chrono::Utc> = c
            .query_one(
                &format!("insert into t values ({i}) returning clock_timestamp()"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        inserted.push(at);
        pg.switch_wal().await;
        let r = tidemark(&dir.path, &["--config", s(&cfg), "backup", "--json"]).ok();
        backups.push(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap());
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    c.batch_execute("insert into t values (99)").await.unwrap();
    let last = pg.switch_wal().await;
    pg.wait_archived(&last, Duration::from_secs(60)).await;
    let stop = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(backups[i]["stop_time"].as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    // A window that starts between backup 1's end and row 2 (which backup 2 then holds).
    let window_start = stop(1) + (inserted[2] - stop(1)) / 2;
    let window_ms = (chrono::Utc::now() - window_start).num_milliseconds();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[clusters.acme]",
        &format!(
            "[retention]\nrecovery_window = \"{window_ms}ms\"\nmin_backups = 1\n\n[clusters.acme]"
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let id = |i: usize| backups[i]["id"].as_str().unwrap().to_string();
    let wal_dir = dir.join("repo/acme/wal/00000001");
    let wal_before: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    // Dry run: the plan, nothing deleted.
    let dry: serde_json::Value = serde_json::from_str(
        &tidemark(
            &dir.path,
            &["--config", s(&cfg), "expire", "--dry-run", "--json"],
        )
        .ok()
        .stdout,
    )
    .unwrap();
    assert_eq!(
        dry["plan"]["delete_backups"],
        serde_json::json!([id(0)]),
        "{dry}"
    );
    assert_eq!(
        dry["plan"]["keep_backups"],
        serde_json::json!([id(1), id(2)]),
        "{dry}"
    );
    let doomed: Vec<String> = dry["plan"]["delete_wal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(!doomed.is_empty(), "{dry}");
    // Exactly the segments before backup 1's first segment go.
    let keep_from = backups[1]["start_lsn"].as_str().unwrap();
    let (hi, lo) = keep_from.split_once('/').unwrap();
    let first_kept =
        ((u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()) >> 24;
    for name in &wal_before {
        let name = name.to_string_lossy();
        let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
        let goes = doomed.iter().any(|k| k.ends_with(name.as_ref()));
        assert_eq!(goes, seg < first_kept, "{name}: plan {doomed:?}");
    }
    assert_eq!(
        std::fs::read_dir(&wal_dir).unwrap().count(),
        wal_before.len(),
        "dry run deleted WAL"
    );
    let text = tidemark(&dir.path, &["--config", s(&cfg), "expire", "--dry-run"])
        .ok()
        .stdout;
    assert!(text.contains("would delete 1 backup(s)"), "{text}");

    // The real run carries out that plan.
    let real: serde_json::Value = serde_json::from_str(
        &tidemark(&dir.path, &["--config", s(&cfg), "expire", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(real["deleted_backups"], 1, "{real}");
    assert_eq!(
        real["deleted_wal"].as_u64().unwrap() as usize,
        doomed.len(),
        "{real}"
    );
    assert!(!dir.join(&format!("repo/acme/backups/{}", id(0))).exists());
    let listing: serde_json::Value = serde_json::from_str(
        &tidemark(&dir.path, &["--config", s(&cfg), "list", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(listing["backups"].as_array().unwrap().len(), 2, "{listing}");
    assert!(
        listing["wal_gaps"].as_array().unwrap().is_empty(),
        "{listing}"
    );

    // The earliest moment inside the window still restores (from backup 1).
    let r = Restored::new(dir, "early");
    let target = window_start.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    let mut args = vec![
        "--config",
        s(&cfg),
        "restore",
        "--json",
        "--archive-mode",
        "off",
        "--target-time",
        &target,
    ];
    let start = r.start_args();
    args.extend(start.iter().map(String::as_str));
    let out: serde_json::Value =
        serde_json::from_str(&tidemark(&dir.path, &args).ok().stdout).unwrap();
    assert_eq!(out["backup"], serde_json::json!(id(1)), "{out}");
    let rc = r.client().await;
    let rows: Vec<i32> = rc
        .query("select x from t order by x", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Row 2 was written 1.5 s after backup 1 ended, after the window start (half-way between
    // the end of backup 1 and row 2).
    assert_eq!(rows, vec![0, 1], "state at the window start");
}

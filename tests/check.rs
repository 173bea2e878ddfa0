//! `tidemark check` returns the Nagios codes monitoring relies on: healthy, broken
//! archive_command, stale backup, archive lag.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn report(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

fn status_of(v: &serde_json::Value, name: &str) -> String {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| c["status"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no check {name}: {v}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn check_exit_codes() {
    let st = Archiving::start("check", &StoreKind::Local, ArchivingOptions::default());
    let (dir, pg, cfg) = (&st.dir, &st.pg, st.cfg.clone());

    // No backup yet: critical.
    let r = tidemark(&dir.path, &["--config", s(&cfg), "check", "--json"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(status_of(&report(&r), "backup"), "critical");

    // Healthy.
    tidemark(&dir.path, &["--config", s(&cfg), "backup"]).ok();
    let r = tidemark(&dir.path, &["--config", s(&cfg), "check"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("TIDEMARK OK"), "{r:?}");
    assert!(r.stdout.contains("arrived in the repository"), "{r:?}");

    // Stale backup.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let stale = dir.join("stale.toml");
    std::fs::write(
        &stale,
        text.replace(
            "[clusters.acme]",
            "[alerts]\nbackup_age_critical = \"1s\"\n\n[clusters.acme]",
        ),
    )
    .unwrap();
    chown_to_user(&stale);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = tidemark(
        &dir.path,
        &["--config", s(&stale), "check", "--json", "--no-switch"],
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(status_of(&report(&r), "backup"), "critical");

    // archive_command that does not run tidemark.
    let c = pg.client().await;
    c.batch_execute("alter system set archive_command = '/bin/true'")
        .await
        .unwrap();
    c.batch_execute("select pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = tidemark(&dir.path, &["--config", s(&cfg), "check", "--json"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(status_of(&report(&r), "archive_command"), "critical");

    // Archiving that fails (tidemark with a config it cannot read): WAL piles up, the forced
    // switch never arrives, and the lag grows past the warning threshold.
    let broken = format!(
        "{} --config /nonexistent.toml wal-push %p",
        tidemark_bin().display()
    );
    c.batch_execute(&format!("alter system set archive_command = '{broken}'"))
        .await
        .unwrap();
    c.batch_execute("select pg_reload_conf()").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lag = dir.join("lag.toml");
    std::fs::write(
        &lag,
        text.replace("[clusters.acme]", "[alerts]\narchive_lag_warning = \"1s\"\narchive_lag_critical = \"1h\"\n\n[clusters.acme]"),
    )
    .unwrap();
    chown_to_user(&lag);
    pg.switch_wal().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = tidemark(
        &dir.path,
        &[
            "--config",
            s(&lag),
            "check",
            "--json",
            "--archive-timeout",
            "3s",
        ],
    );
    let v = report(&r);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(status_of(&v, "archive"), "critical", "{v}");
    assert_eq!(status_of(&v, "archive_lag"), "warning", "{v}");

    // A broken config is critical too (monitoring reads the exit code).
    let r = tidemark(&dir.path, &["--config", "/nonexistent.toml", "check"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.starts_with("TIDEMARK CRITICAL"), "{r:?}");
}

//! Restore drills: pass on a healthy repository; fail with a clear reason on a missing WAL
//! segment, a corrupted data object and a false assertion; leave no process or directory
//! behind in every case.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// No server of a drill runs, and the scratch directory is empty.
fn assert_no_leftovers(scratch: &Path) {
    let left: Vec<_> = std::fs::read_dir(scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "drill left {left:?} in {}",
        scratch.display()
    );
    // This test's drills only: other tests run drills of their own at the same time.
    let ps = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(format!("{}/tidemark-drill-", scratch.display()))
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "a drill's server still runs: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

fn drill(st: &Archiving, cfg: &Path, scratch: &Path, extra: &[&str]) -> (Run, serde_json::Value) {
    let mut args = vec![
        "--config",
        s(cfg),
        "drill",
        "--json",
        "--scratch-dir",
        s(scratch),
        "--pg-bin",
    ];
    let bin = pg_bin();
    args.push(s(&bin));
    args.extend_from_slice(extra);
    let r = tidemark(&st.dir.path, &args);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r, v)
}

#[tokio::test(flavor = "multi_thread")]
async fn drills() {
    let st = Archiving::start("drill", &StoreKind::Local, ArchivingOptions::default());
    let c = st.pg.client().await;
    c.batch_execute(
        "create table orders(id int); insert into orders select generate_series(1, 100)",
    )
    .await
    .unwrap();
    st.pg.switch_wal().await;
    st.run(&["backup"]).ok();
    c.batch_execute("insert into orders values (101)")
        .await
        .unwrap();
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;
    let scratch = st.dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    chown_to_user(&scratch);

    let base = std::fs::read_to_string(&st.cfg).unwrap();
    let with_assert = |sql: &str| {
        let p = st.dir.join("drill.toml");
        std::fs::write(
            &p,
            format!("{base}\n[[clusters.acme.drill.assert]]\nsql = \"{sql}\"\n"),
        )
        .unwrap();
        chown_to_user(&p);
        p
    };

    // Healthy: passes, with a true assertion; recorded; nothing left.
    let cfg = with_assert("select count(*) = 101 from orders");
    let (r, v) = drill(&st, &cfg, &scratch, &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["rto_ms"].as_u64().unwrap() > 0, "{v}");
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "assert" && c["ok"] == true),
        "{v}"
    );
    assert_no_leftovers(&scratch);
    // A random moment inside the window passes too.
    let (r, v) = drill(&st, &st.cfg, &scratch, &["--target", "random"]);
    assert_eq!(r.code, 0, "{r:?} {v}");
    assert_no_leftovers(&scratch);

    // A false assertion.
    let cfg = with_assert("select count(*) = 5 from orders");
    let (r, v) = drill(&st, &cfg, &scratch, &[]);
    assert_eq!(r.code, 14, "{r:?}");
    assert!(v["error"].as_str().unwrap().contains("count(*) = 5"), "{v}");
    assert!(r.stderr.contains("drill failed"), "{r:?}");
    assert_no_leftovers(&scratch);

    // History keeps every drill, failed ones included.
    let h = st.run(&["drill", "--history", "--json"]).ok();
    let hv: serde_json::Value = serde_json::from_str(&h.stdout).unwrap();
    assert_eq!(hv.as_array().unwrap().len(), 3, "{hv}");
    let text = st.run(&["drill", "--history"]).ok().stdout;
    assert!(text.contains("FAIL") && text.contains("OK"), "{text}");

    // A corrupted data object.
    let backups = st.dir.join("repo/acme/backups");
    let id = std::fs::read_dir(&backups)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let pack = backups.join(&id).join("packs/000000");
    let pristine = std::fs::read(&pack).unwrap();
    let mut bad = pristine.clone();
    let n = bad.len();
    bad[n / 3] ^= 0x40;
    std::fs::write(&pack, &bad).unwrap();
    let (r, v) = drill(&st, &st.cfg, &scratch, &[]);
    assert_eq!(r.code, 14, "{r:?}");
    assert!(v["error"].as_str().unwrap().contains("packs/000000"), "{v}");
    assert_no_leftovers(&scratch);
    std::fs::write(&pack, &pristine).unwrap();

    // A missing WAL segment with WAL after it: replay stops at the gap, the drill fails.
    let mut segs = Vec::new();
    for i in 0..3 {
        c.batch_execute(&format!("insert into orders values ({})", 200 + i))
            .await
            .unwrap();
        segs.push(st.pg.switch_wal().await);
    }
    st.pg
        .wait_archived(segs.last().unwrap(), Duration::from_secs(60))
        .await;
    std::fs::remove_file(st.dir.join(&format!("repo/acme/wal/00000001/{}", segs[1]))).unwrap();
    let (r, v) = drill(&st, &st.cfg, &scratch, &[]);
    assert_eq!(r.code, 14, "{r:?}");
    assert!(
        v["error"].as_str().unwrap().contains("missing segment"),
        "{v}"
    );
    assert_no_leftovers(&scratch);
}

/// Row counts recorded by a backup taken under write load are met exactly by a drill that
/// recovers to the backup's count point.
#[tokio::test(flavor = "multi_thread")]
async fn drill_compares_row_counts_at_the_backup_point() {
    let st = Archiving::start("drill-rows", &StoreKind::Local, ArchivingOptions::default());
    st.pg.pgbench(&["-i", "-s", "2", "-q"]);
    let text = std::fs::read_to_string(&st.cfg).unwrap();
    std::fs::write(
        &st.cfg,
        format!("{text}\n[clusters.acme.drill]\ncount_tables = [\"*\"]\n"),
    )
    .unwrap();
    // Writers on every pgbench table (history grows) while the backup counts.
    let load = {
        let bin = st.pg.bin.join("pgbench");
        let (sock, port) = (st.pg.socket_dir.clone(), st.pg.port);
        std::thread::spawn(move || {
            as_user(bin)
                .arg("-h")
                .arg(&sock)
                .args([
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-c",
                    "2",
                    "-T",
                    "20",
                    "-n",
                ])
                .arg("postgres")
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let b = st.run(&["backup", "--json"]).ok();
    assert!(b.stderr.contains("row counts recorded"), "{b:?}");
    let id = serde_json::from_str::<serde_json::Value>(&b.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        st.dir
            .join(&format!("repo/acme/backups/{id}/counts"))
            .exists()
    );
    assert!(load.join().unwrap().status.success());
    let scratch = st.dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    chown_to_user(&scratch);

    let (r, v) = drill(&st, &st.cfg, &scratch, &["--target", "backup"]);
    assert_eq!(r.code, 0, "{r:?} {v}");
    let rows = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "row_counts")
        .unwrap_or_else(|| panic!("no row_counts check: {v}"))
        .clone();
    assert_eq!(rows["ok"], true, "{v}");
    assert!(
        rows["detail"].as_str().unwrap().contains("4 table(s)"),
        "{rows}"
    );
    assert_eq!(v["backup"], serde_json::json!(id));
    assert_no_leftovers(&scratch);

    // Other targets say the counts were not compared.
    let (r, v) = drill(&st, &st.cfg, &scratch, &[]);
    assert_eq!(r.code, 0, "{r:?} {v}");
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "row_counts"
                && c["detail"].as_str().unwrap().starts_with("skipped")),
        "{v}"
    );
    assert_no_leftovers(&scratch);
}

//! WAL archiving end to end against real PostgreSQL, with the local store and with S3
//! (a Garage server started by the harness, or the store named by TIDEMARK_TEST_S3_*).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

type Setup = Archiving;

async fn setup(tag: &str, store: &StoreKind, segsize_mb: Option<u32>, extra_repo: &str) -> Setup {
    let st = Archiving::start(
        tag,
        store,
        ArchivingOptions {
            wal_segsize_mb: segsize_mb,
            extra_repo,
            ..Default::default()
        },
    );
    // A second init is a checked no-op.
    let again = st.run(&["init"]).ok();
    assert!(again.stdout.contains("already initialised"), "{again:?}");
    st
}

/// Fetches every segment PostgreSQL marked archived and compares it with PostgreSQL's copy.
fn assert_all_fetched_identical(st: &Setup) -> usize {
    let out = st.dir.join("fetched");
    std::fs::create_dir_all(&out).unwrap();
    chown_to_user(&out);
    let mut n = 0;
    for seg in st.pg.done_segments().into_iter().filter(|s| s.len() == 24) {
        let original = st.pg.data.join("pg_wal").join(&seg);
        let Ok(expected) = std::fs::read(&original) else {
            continue; // removed by a checkpoint: nothing to compare with
        };
        let dest = out.join(&seg);
        tidemark(
            &st.dir.path,
            &["--config", s(&st.cfg), "wal-fetch", &seg, s(&dest)],
        )
        .ok();
        let got = std::fs::read(&dest).unwrap();
        assert!(
            got == expected,
            "{seg}: fetched copy differs from PostgreSQL's"
        );
        n += 1;
    }
    n
}

fn wal_list_json(st: &Setup) -> serde_json::Value {
    let r = tidemark(
        &st.dir.path,
        &["--config", s(&st.cfg), "wal-list", "--json"],
    )
    .ok();
    serde_json::from_str(&r.stdout).unwrap()
}

async fn archive_round_trip(store: StoreKind, tag: &str) {
    let st = setup(tag, &store, None, "").await;
    st.pg.pgbench(&["-i", "-s", "3", "-q"]);
    st.pg.pgbench(&["-c", "2", "-t", "1000"]);
    let mut last = String::new();
    for _ in 0..3 {
        last = st.pg.switch_wal().await;
    }
    st.pg.wait_archived(&last, Duration::from_secs(120)).await;
    let n = assert_all_fetched_identical(&st);
    assert!(n >= 3, "only {n} segments compared");

    let list = wal_list_json(&st);
    let t1 = &list["timelines"][0];
    assert_eq!(t1["timeline"], 1);
    assert_eq!(t1["gaps"].as_array().unwrap().len(), 0, "{list}");
    assert!(t1["last"].as_str().unwrap() >= last.as_str(), "{list}");
    let text = tidemark(&st.dir.path, &["--config", s(&st.cfg), "wal-list"]).ok();
    assert!(text.stdout.contains("no gaps"), "{text:?}");

    // A backup history file (.backup) is archived by PostgreSQL at the end of a backup.
    let c = st.pg.client().await;
    let v: i32 = c
        .query_one("select current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if v >= 150000 {
        c.batch_execute("select pg_backup_start('t', true); select * from pg_backup_stop();")
            .await
            .unwrap();
    } else {
        c.batch_execute(
            "select pg_start_backup('t', true, false); select * from pg_stop_backup(false);",
        )
        .await
        .unwrap();
    }
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;
    let list = wal_list_json(&st);
    assert_eq!(
        list["timelines"][0]["backup_history_files"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{list}"
    );

    // Re-pushing an archived segment with identical content succeeds (PostgreSQL retries after
    // a crash between archiving and marking .done).
    let r = tidemark(
        &st.pg.data,
        &[
            "--config",
            s(&st.cfg),
            "wal-push",
            &format!("pg_wal/{last}"),
        ],
    )
    .ok();
    assert!(r.stderr.contains("identical"), "{r:?}");

    // Secrets never reach logs, even at debug level: not the S3 secret, not the master key
    // (nor its data keys, which only exist unwrapped in memory).
    let r = tidemark_env(
        &st.pg.data,
        &[
            "--config",
            s(&st.cfg),
            "wal-push",
            &format!("pg_wal/{last}"),
        ],
        &[("TIDEMARK_LOG", "debug")],
    )
    .ok();
    let key = std::fs::read(st.dir.join("acme.key")).unwrap();
    for needle in [
        hex::encode(&key),
        hex::encode_upper(&key),
        format!("{key:?}"),
    ] {
        assert!(!r.stderr.contains(&needle), "master key in log output");
    }
    if let StoreKind::S3(t) = &store {
        assert!(
            !r.stderr.contains(&t.secret_access_key),
            "S3 secret in log output"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn archive_round_trip_local() {
    archive_round_trip(StoreKind::Local, "rtl").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn archive_round_trip_s3() {
    let (store, _garage) = s3_store("rts3");
    archive_round_trip(store, "rts3").await;
}

/// Non-default segment size (1 MiB): names, sizes and gap arithmetic follow the cluster's.
#[tokio::test(flavor = "multi_thread")]
async fn non_default_segment_size() {
    let st = setup("seg1", &StoreKind::Local, Some(1), "").await;
    st.pg.pgbench(&["-i", "-s", "1", "-q"]);
    let mut last = String::new();
    for _ in 0..3 {
        last = st.pg.switch_wal().await;
    }
    st.pg.wait_archived(&last, Duration::from_secs(60)).await;
    assert!(assert_all_fetched_identical(&st) >= 3);
    let list = wal_list_json(&st);
    assert_eq!(list["wal_segment_size"], 1 << 20);
    assert_eq!(
        list["timelines"][0]["gaps"].as_array().unwrap().len(),
        0,
        "{list}"
    );
}

/// Timeline history and .partial files are archived and fetched back byte-identical.
#[tokio::test(flavor = "multi_thread")]
async fn history_and_partial_files() {
    let st = setup("hist", &StoreKind::Local, None, "").await;
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;
    let wal = st.pg.data.join("pg_wal");
    // What PostgreSQL writes at a promotion: a history file and the old timeline's partial
    // segment (copies here; the restore tests produce real ones).
    std::fs::write(
        wal.join("00000002.history"),
        "1\t0/3000000\tno recovery target specified\n",
    )
    .unwrap();
    std::fs::copy(wal.join(&seg), wal.join(format!("{seg}.partial"))).unwrap();
    for f in ["00000002.history".to_string(), format!("{seg}.partial")] {
        chown_to_user(&wal.join(&f));
        tidemark(
            &st.pg.data,
            &["--config", s(&st.cfg), "wal-push", &format!("pg_wal/{f}")],
        )
        .ok();
        let dest = st.dir.join(&f);
        tidemark(
            &st.dir.path,
            &["--config", s(&st.cfg), "wal-fetch", &f, s(&dest)],
        )
        .ok();
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(wal.join(&f)).unwrap(),
            "{f}"
        );
    }
    let list = wal_list_json(&st);
    assert_eq!(list["timelines"][1]["history_file"], true, "{list}");
    assert_eq!(
        list["timelines"][0]["partial"][0],
        format!("{seg}.partial"),
        "{list}"
    );
}

/// Every kind of bad input: one clear line, its documented exit code, nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_clearly() {
    let st = setup("bad", &StoreKind::Local, None, "").await;
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;
    let cfg = s(&st.cfg);
    let d = &st.dir.path;
    let obj = st.dir.join(&format!("repo/acme/wal/00000001/{seg}"));
    let pristine = std::fs::read(&obj).unwrap();
    let dest = st.dir.join("fetched-seg");

    // Not in the repository: exit 1, and quiet (PostgreSQL probes for such files).
    let r = tidemark(
        d,
        &[
            "--config",
            cfg,
            "wal-fetch",
            "0000000100000000000000FF",
            s(&dest),
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.is_empty(), "not-found must be quiet: {r:?}");
    tidemark(
        d,
        &["--config", cfg, "wal-fetch", "00000009.history", s(&dest)],
    );

    // Not a WAL file.
    tidemark(
        &st.pg.data,
        &["--config", cfg, "wal-push", "postgresql.conf"],
    )
    .fails_with(9, "not a WAL file");
    tidemark(
        &st.pg.data,
        &[
            "--config",
            cfg,
            "wal-push",
            "pg_wal/000000010000000000000099",
        ],
    )
    .fails_with(9, "cannot open");
    tidemark(
        d,
        &["--config", cfg, "wal-fetch", "../etc/passwd", s(&dest)],
    )
    .fails_with(126, "not a WAL file name");

    // Key file with group/other permissions.
    let key = st.dir.join("acme.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    tidemark(d, &["--config", cfg, "wal-fetch", &seg, s(&dest)]).fails_with(126, "0640");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Missing key file and the wrong key.
    let cfg_text = std::fs::read_to_string(&st.cfg).unwrap();
    let other_cfg = st.dir.join("other.toml");
    let write_other = |text: String| {
        std::fs::write(&other_cfg, text).unwrap();
        // It may hold an S3 secret: owner-only, as the docs ask.
        std::fs::set_permissions(&other_cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_to_user(&other_cfg);
    };
    write_other(cfg_text.replace("acme.key", "missing.key"));
    tidemark(d, &["--config", s(&other_cfg), "wal-fetch", &seg, s(&dest)])
        .fails_with(126, "no such file");
    tidemark(d, &["key", "generate", s(&st.dir.join("wrong.key"))]).ok();
    tidemark(d, &["key", "generate", s(&st.dir.join("wrong.key"))])
        .fails_with(3, "refusing to overwrite");
    write_other(cfg_text.replace("acme.key", "wrong.key"));
    tidemark(d, &["--config", s(&other_cfg), "wal-fetch", &seg, s(&dest)])
        .fails_with(126, "wrong master key");
    tidemark(
        &st.pg.data,
        &[
            "--config",
            s(&other_cfg),
            "wal-push",
            &format!("pg_wal/{seg}"),
        ],
    )
    .fails_with(3, "wrong master key");

    // Unknown and missing config keys name the key.
    write_other(cfg_text.replace("[repository]", "[repository]\ncompresion = 3"));
    tidemark(d, &["--config", s(&other_cfg), "wal-list"]).fails_with(2, "compresion");
    write_other(cfg_text.replace("key_file", "# key_file"));
    tidemark(d, &["--config", s(&other_cfg), "wal-list"]).fails_with(2, "key_file");
    tidemark(d, &["--config", s(&st.dir.join("nope.toml")), "wal-list"])
        .fails_with(2, "no such file");
    tidemark(d, &["--config", cfg, "--cluster", "beta", "wal-list"]).fails_with(2, "beta");

    // A corrupted object: named, exit 5, and no destination file appears.
    let mut bad = pristine.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x10;
    std::fs::write(&obj, &bad).unwrap();
    tidemark(d, &["--config", cfg, "wal-fetch", &seg, s(&dest)])
        .fails_with(126, &format!("acme/wal/00000001/{seg}"))
        .fails_with(126, "instead of 5");
    assert!(
        !dest.exists(),
        "a corrupted segment must not reach the destination"
    );
    // Truncated: at a chunk boundary and mid-chunk.
    for cut in [60 + (1 << 20) + 16, bad.len() - 1, 30] {
        if cut >= pristine.len() {
            continue;
        }
        std::fs::write(&obj, &pristine[..cut]).unwrap();
        tidemark(d, &["--config", cfg, "wal-fetch", &seg, s(&dest)]).fails_with(126, &seg);
        assert!(!dest.exists());
    }
    // Trailing bytes.
    let mut longer = pristine.clone();
    longer.extend_from_slice(b"junk");
    std::fs::write(&obj, &longer).unwrap();
    tidemark(d, &["--config", cfg, "wal-fetch", &seg, s(&dest)]).fails_with(126, &seg);
    // Another object swapped in under this name.
    let next = st.pg.switch_wal().await;
    st.pg.wait_archived(&next, Duration::from_secs(60)).await;
    let other_obj = st.dir.join(&format!("repo/acme/wal/00000001/{next}"));
    std::fs::copy(&other_obj, &obj).unwrap();
    tidemark(d, &["--config", cfg, "wal-fetch", &seg, s(&dest)]).fails_with(126, &seg);
    std::fs::write(&obj, &pristine).unwrap();
    tidemark(d, &["--config", cfg, "wal-fetch", &seg, s(&dest)]).ok();

    // Different content under an archived name: refused, archive untouched.
    let evil_dir = st.dir.join("evil");
    std::fs::create_dir_all(evil_dir.join("pg_wal")).unwrap();
    let mut evil = std::fs::read(st.pg.data.join("pg_wal").join(&seg)).unwrap();
    let n = evil.len();
    evil[n - 100] ^= 0xFF;
    std::fs::write(evil_dir.join("pg_wal").join(&seg), &evil).unwrap();
    chown_to_user(&evil_dir);
    chown_to_user(&evil_dir.join("pg_wal"));
    chown_to_user(&evil_dir.join("pg_wal").join(&seg));
    tidemark(
        &evil_dir,
        &["--config", cfg, "wal-push", &format!("pg_wal/{seg}")],
    )
    .fails_with(7, "different content");
    assert_eq!(
        std::fs::read(&obj).unwrap(),
        pristine,
        "archive must not change"
    );

    // Another cluster (another system identifier) pointed at this repository.
    let other_dir = TestDir::new("bad2");
    let other_pg = PgCluster::start(&other_dir, "pg", PgOptions::default());
    assert_ne!(
        other_pg.system_identifier().await,
        st.pg.system_identifier().await
    );
    let oseg = other_pg.switch_wal().await;
    let other_cluster_cfg = cfg_text
        .replace(s(&st.pg.data), s(&other_pg.data))
        .replace(
            &format!("port={}", st.pg.port),
            &format!("port={}", other_pg.port),
        )
        .replace(
            &format!("host={}", st.pg.socket_dir.display()),
            &format!("host={}", other_pg.socket_dir.display()),
        );
    write_other(other_cluster_cfg);
    tidemark(
        &other_pg.data,
        &[
            "--config",
            s(&other_cfg),
            "wal-push",
            &format!("pg_wal/{oseg}"),
        ],
    )
    .fails_with(4, "refusing to mix clusters");
    tidemark(d, &["--config", s(&other_cfg), "init"]).fails_with(4, "another cluster's repository");
    let list = wal_list_json(&st);
    assert!(
        !list.to_string().contains(&format!("\"{oseg}\"")) || oseg <= seg,
        "{list}"
    );

    // An uninitialised cluster.
    write_other(cfg_text.replace("[clusters.acme]", "[clusters.newco]"));
    tidemark(d, &["--config", s(&other_cfg), "wal-list"]).fails_with(4, "init");

    // Unreachable S3: bounded time, exit 6, PostgreSQL keeps the segment.
    let s3_cfg = format!(
        "[repository]\nurl = \"s3://b/p\"\nendpoint = \"http://127.0.0.1:9\"\nregion = \"x\"\n\
         force_path_style = true\naccess_key_id = \"AK\"\nsecret_access_key = \"VERYSECRETVALUE\"\n\
         retry_timeout = \"2s\"\nconnect_timeout = \"1s\"\n[clusters.acme]\nkey_file = \"{}\"\n",
        s(&key)
    );
    write_other(s3_cfg);
    let r = tidemark(
        &st.pg.data,
        &[
            "--config",
            s(&other_cfg),
            "wal-push",
            &format!("pg_wal/{seg}"),
        ],
    )
    .fails_with(6, "unavailable");
    assert!(r.elapsed < Duration::from_secs(15), "took {:?}", r.elapsed);
    assert_eq!(
        r.stderr.lines().count(),
        1 + r.stderr.matches("retrying").count(),
        "{r:?}"
    );
    assert!(!r.stderr.contains("VERYSECRETVALUE"));
    // The same config readable by everyone: a warning, and still no secret in it.
    std::fs::set_permissions(&other_cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = tidemark(d, &["--config", s(&other_cfg), "wal-list"]);
    assert!(r.stderr.contains("readable by any user"), "{r:?}");
    assert!(!r.stderr.contains("VERYSECRETVALUE"));
    assert!(st.pg.data.join("pg_wal").join(&seg).exists());
}

/// S3 goes away mid-archiving: wal-push fails within its deadline, PostgreSQL keeps the
/// segments and retries, and once S3 is back every segment arrives intact.
#[tokio::test(flavor = "multi_thread")]
async fn s3_outage_loses_nothing() {
    let garage = Garage::start("outage");
    let store = StoreKind::S3(garage.target.clone());
    let st = setup(
        "outage",
        &store,
        None,
        "retry_timeout = \"2s\"\nconnect_timeout = \"1s\"\n",
    )
    .await;
    st.pg.pgbench(&["-i", "-s", "1", "-q"]);
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;

    garage.stop();
    let failures_before = st.pg.archiver_failures().await;
    st.pg.pgbench(&["-c", "2", "-t", "500"]);
    let mut during = Vec::new();
    for _ in 0..3 {
        during.push(st.pg.switch_wal().await);
    }
    let r = tidemark(
        &st.pg.data,
        &[
            "--config",
            s(&st.cfg),
            "wal-push",
            &format!("pg_wal/{}", during[0]),
        ],
    );
    assert_eq!(r.code, 6, "{r:?}");
    assert!(
        r.elapsed < Duration::from_secs(15),
        "wal-push took {:?}",
        r.elapsed
    );
    // PostgreSQL saw failures and kept the segments.
    let t = std::time::Instant::now();
    while st.pg.archiver_failures().await == failures_before {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "archiver never failed during the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for seg in &during {
        assert!(st.pg.data.join("pg_wal").join(seg).exists());
    }

    garage.restart();
    // A new segment wakes the archiver, which then works through the backlog in order.
    let after = st.pg.switch_wal().await;
    st.pg.wait_archived(&after, Duration::from_secs(180)).await;
    let n = assert_all_fetched_identical(&st);
    assert!(n >= 5, "only {n} segments compared");
    let list = wal_list_json(&st);
    assert_eq!(
        list["timelines"][0]["gaps"].as_array().unwrap().len(),
        0,
        "{list}"
    );
}

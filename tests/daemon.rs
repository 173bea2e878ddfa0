//! `tidemark daemon` against real PostgreSQL clusters, a local repository and a real Garage:
//! scheduled backups of two clusters (the missed run at start, then the cron schedule), a
//! scheduled drill, the global job limit, metrics, the audit trail; SIGTERM during a backup;
//! SIGHUP with a bad and a good config; an S3 outage during archiving (one alert, one
//! "resolved", no WAL lost); backups held off by another holder of the lock.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_owned(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    chown_to_user(path);
}

/// Two clusters archiving into one repository through one config.
struct Fleet {
    dir: TestDir,
    cfg: PathBuf,
    pgs: Vec<(String, PgCluster)>,
}

impl Fleet {
    fn start(tag: &str, names: &[&str], repo: &str, extra: &str, per_cluster: &str) -> Fleet {
        let dir = TestDir::new(tag);
        let cfg = dir.join("tidemark.toml");
        let mut pgs = Vec::new();
        let mut clusters = String::new();
        for name in names {
            let pg = PgCluster::init(
                &dir,
                &format!("pg-{name}"),
                PgOptions {
                    archive_command: Some(archive_command(&cfg, name)),
                    ..Default::default()
                },
            );
            let key = dir.join(&format!("{name}.key"));
            tidemark(&dir.path, &["key", "generate", s(&key)]).ok();
            clusters.push_str(&format!(
                "\n[clusters.{name}]\npgdata = \"{}\"\nconnection = \"{}\"\nkey_file = \"{}\"\n{}",
                pg.data.display(),
                pg.conninfo(),
                key.display(),
                per_cluster.replace("NAME", name)
            ));
            pgs.push((name.to_string(), pg));
        }
        // `DIR` in the repository lines stands for the test directory.
        let repo = repo.replace("DIR", &dir.path.display().to_string());
        let text = format!(
            "state_dir = \"{}\"\n[repository]\n{repo}\n{extra}\n{clusters}",
            dir.join("state").display()
        );
        write_owned(&cfg, &text);
        for (name, pg) in &pgs {
            pg.pg_ctl_start();
            tidemark(&dir.path, &["--config", s(&cfg), "--cluster", name, "init"]).ok();
        }
        Fleet { dir, cfg, pgs }
    }

    fn run(&self, args: &[&str]) -> Run {
        let mut all = vec!["--config", s(&self.cfg)];
        all.extend_from_slice(args);
        tidemark(&self.dir.path, &all)
    }

    fn backups(&self, cluster: &str) -> Vec<serde_json::Value> {
        let r = self.run(&["--cluster", cluster, "list", "--json"]);
        if r.code != 0 {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        v["backups"].as_array().cloned().unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_backs_up_two_clusters_on_schedule() {
    let hook = Webhook::start();
    let port = free_port();
    let fleet = Fleet::start(
        "dmn",
        &["acme", "beta"],
        "url = \"file://DIR/repo\"",
        &format!(
            "[schedule]\nbackup = \"* * * * *\"\ntimezone = \"Europe/Berlin\"\n\
             [daemon]\ncheck_interval = \"2s\"\ncatalog_interval = \"3s\"\nmax_concurrent_jobs = 1\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n[alerts]\nwebhook_url = \"{}\"\n",
            hook.url
        ),
        "",
    );
    // A drill for acme every minute too.
    let text = std::fs::read_to_string(&fleet.cfg).unwrap().replace(
        "[clusters.beta]",
        "[clusters.acme.drill]\nschedule = \"* * * * *\"\ntarget = \"latest\"\n\n[clusters.beta]",
    );
    write_owned(&fleet.cfg, &text);
    for (_, pg) in &fleet.pgs {
        let c = pg.client().await;
        c.batch_execute("create table t(x int); insert into t values (1)")
            .await
            .unwrap();
        pg.switch_wal().await;
    }

    let mut daemon = DaemonProc::start(&fleet.dir, &fleet.cfg, "a");
    let addr = format!("127.0.0.1:{port}");
    // No backup yet: the missed run starts at once, for both.
    wait_for(
        Duration::from_secs(90),
        "a first backup of both clusters",
        || (!fleet.backups("acme").is_empty() && !fleet.backups("beta").is_empty()).then_some(()),
    )
    .await;
    // Then the every-minute schedule.
    wait_for(
        Duration::from_secs(150),
        "a scheduled backup of both clusters",
        || (fleet.backups("acme").len() >= 2 && fleet.backups("beta").len() >= 2).then_some(()),
    )
    .await;
    let body = wait_for(Duration::from_secs(150), "drill metrics", || {
        let (code, body) = http_get(&addr, "/metrics")?;
        assert_eq!(code, 200);
        metric(&body, "tidemark_drill_last_result{cluster=\"acme\"}").map(|_| body)
    })
    .await;
    assert_eq!(
        metric(&body, "tidemark_drill_last_result{cluster=\"acme\"}"),
        Some(1.0),
        "drill failed: {}",
        daemon.log()
    );
    assert!(metric(&body, "tidemark_drill_last_rto_seconds{cluster=\"acme\"}").unwrap() > 0.0);
    let body = wait_for(Duration::from_secs(30), "backup metrics of both", || {
        let (_, body) = http_get(&addr, "/metrics")?;
        (metric(&body, "tidemark_backups{cluster=\"beta\"}")? >= 2.0
            && metric(&body, "tidemark_backups{cluster=\"acme\"}")? >= 2.0)
            .then_some(body)
    })
    .await;
    for c in ["acme", "beta"] {
        let last = metric(
            &body,
            &format!("tidemark_backup_last_success_timestamp_seconds{{cluster=\"{c}\"}}"),
        )
        .unwrap();
        assert!(
            (chrono::Utc::now().timestamp() as f64 - last).abs() < 300.0,
            "{body}"
        );
        assert!(
            metric(
                &body,
                &format!("tidemark_backup_last_stored_bytes{{cluster=\"{c}\"}}")
            )
            .unwrap()
                > 0.0
        );
        assert!(
            metric(
                &body,
                &format!("tidemark_wal_pushed_segments_total{{cluster=\"{c}\"}}")
            )
            .unwrap()
                >= 2.0,
            "{body}"
        );
        assert_eq!(
            metric(&body, &format!("tidemark_wal_gaps{{cluster=\"{c}\"}}")),
            Some(0.0)
        );
        let from = metric(
            &body,
            &format!("tidemark_restorable_window_start_timestamp_seconds{{cluster=\"{c}\"}}"),
        )
        .unwrap();
        let to = metric(
            &body,
            &format!("tidemark_restorable_window_end_timestamp_seconds{{cluster=\"{c}\"}}"),
        )
        .unwrap();
        assert!(from <= to, "{body}");
        assert!(
            metric(
                &body,
                &format!("tidemark_wal_push_duration_seconds_count{{cluster=\"{c}\"}}")
            )
            .unwrap()
                >= 2.0
        );
        assert_eq!(
            metric(&body, &format!("tidemark_check_status{{cluster=\"{c}\"}}")),
            Some(0.0),
            "{body}"
        );
    }
    assert_eq!(metric(&body, "tidemark_repository_up"), Some(1.0));
    assert_eq!(http_get(&addr, "/healthz").map(|x| x.0), Some(200));
    // A healthy fleet raises no alert.
    assert!(hook.all().is_empty(), "unexpected alerts: {:?}", hook.all());

    // The audit trail holds the daemon's backups, the drill's restore, and verifies.
    let a = fleet.run(&["--cluster", "acme", "audit", "--json"]).ok();
    let records: Vec<serde_json::Value> = serde_json::from_str(&a.stdout).unwrap();
    let ops: Vec<&str> = records
        .iter()
        .map(|r| r["operation"].as_str().unwrap())
        .collect();
    for op in [
        "key_init",
        "config_change",
        "backup",
        "restore",
        "wal_fetch",
        "drill",
    ] {
        assert!(ops.contains(&op), "no {op} record: {ops:?}");
    }
    assert!(
        records
            .iter()
            .all(|r| r["cluster"] == "acme" && !r["user"].as_str().unwrap().is_empty())
    );
    fleet.run(&["audit", "verify"]).ok();

    // SIGTERM: exits 0; whatever was running leaves nothing partial listed.
    assert_eq!(daemon.stop(Duration::from_secs(120)), 0, "{}", daemon.log());
    for c in ["acme", "beta"] {
        let dirs: Vec<String> = std::fs::read_dir(fleet.dir.join("repo").join(c).join("backups"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let listed: Vec<String> = fleet
            .backups(c)
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            dirs.len(),
            listed.len(),
            "leftover of an aborted backup: {dirs:?} vs {listed:?}"
        );
    }

    // max_concurrent_jobs = 1: no two of the daemon's backups ran at once, over both clusters
    // (both fire in the same minute).
    let mut spans: Vec<(String, String, String)> = ["acme", "beta"]
        .iter()
        .flat_map(|c| fleet.backups(c))
        .map(|b| {
            (
                b["start_time"].as_str().unwrap().to_string(),
                b["stop_time"].as_str().unwrap().to_string(),
                b["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(spans.len() >= 4, "{spans:?}");
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap();
    spans.sort_by_key(|s| parse(&s.0));
    for w in spans.windows(2) {
        assert!(
            parse(&w[0].1) <= parse(&w[1].0),
            "backups overlapped despite max_concurrent_jobs = 1: {w:?}"
        );
    }

    // Restarted with fresh backups: no missed run (the newest is younger than a minute's
    // period only just after a backup, so use a daily schedule).
    let text = std::fs::read_to_string(&fleet.cfg)
        .unwrap()
        .replace("backup = \"* * * * *\"", "backup = \"0 3 * * *\"")
        .replace("schedule = \"* * * * *\"", "schedule = \"0 4 * * 0\"");
    write_owned(&fleet.cfg, &text);
    let before = fleet.backups("acme").len();
    let mut daemon = DaemonProc::start(&fleet.dir, &fleet.cfg, "b");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(fleet.backups("acme").len(), before, "{}", daemon.log());
    assert!(
        daemon.log().contains("backups scheduled"),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.stop(Duration::from_secs(60)), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_backup_leaves_nothing_listed() {
    let st = Archiving::start("dmn-term", &StoreKind::Local, ArchivingOptions::default());
    st.pg.pgbench(&["-i", "-s", "10", "-q"]);
    // A schedule far away: the backup that runs is the missed run at start.
    let text = std::fs::read_to_string(&st.cfg).unwrap().replace(
        "[clusters.acme]",
        "[schedule]\nbackup = \"0 3 1 1 *\"\n[daemon]\ncheck_interval = \"2s\"\n\n[clusters.acme]",
    );
    write_owned(&st.cfg, &text);
    let mut daemon = DaemonProc::start(&st.dir, &st.cfg, "t");
    let backups = st.dir.join("repo/acme/backups");
    wait_for(
        Duration::from_secs(60),
        "the backup to start copying",
        || {
            std::fs::read_dir(&backups)
                .ok()?
                .filter_map(|e| e.ok())
                .any(|e| e.path().join("packs").exists())
                .then_some(())
        },
    )
    .await;
    assert_eq!(daemon.stop(Duration::from_secs(90)), 0, "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("interrupted"), "{log}");
    let listing: serde_json::Value =
        serde_json::from_str(&st.run(&["list", "--json"]).ok().stdout).unwrap();
    assert_eq!(listing["backups"].as_array().unwrap().len(), 0, "{listing}");
    let left: Vec<_> = std::fs::read_dir(&backups).unwrap().collect();
    assert!(left.is_empty(), "the aborted backup left {left:?}");
    assert!(
        !st.dir.join("repo/acme/locks/backup.json").exists(),
        "lease left behind"
    );
    // Its session ended with it: the next backup runs at once.
    st.run(&["backup"]).ok();
    // The audit log tells what happened.
    let a = st.run(&["audit"]).ok();
    assert!(
        a.stdout.contains("backup") && a.stdout.contains("failed"),
        "{}",
        a.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rejects_a_bad_config_and_applies_a_good_one() {
    let st = Archiving::start("dmn-hup", &StoreKind::Local, ArchivingOptions::default());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let base = std::fs::read_to_string(&st.cfg).unwrap();
    let good = base.replace(
        "[clusters.acme]",
        &format!(
            "[metrics]\nlisten = \"{addr}\"\n[daemon]\ncheck_interval = \"2s\"\n\n[clusters.acme]"
        ),
    );
    write_owned(&st.cfg, &good);
    let mut daemon = DaemonProc::start(&st.dir, &st.cfg, "h");
    wait_for(Duration::from_secs(30), "metrics", || {
        http_get(&addr, "/metrics")
    })
    .await;

    write_owned(
        &st.cfg,
        &good.replace("[daemon]", "[daemon]\nchek_interval = \"1s\""),
    );
    daemon.signal("HUP");
    let body = wait_for(Duration::from_secs(20), "the reload failure", || {
        let (_, b) = http_get(&addr, "/metrics")?;
        (metric(&b, "tidemark_config_reload_failures_total")? == 1.0).then_some(b)
    })
    .await;
    assert_eq!(metric(&body, "tidemark_config_reloads_total"), Some(0.0));
    assert!(daemon.log().contains("chek_interval"), "{}", daemon.log());
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "daemon died on a bad config"
    );

    write_owned(
        &st.cfg,
        &good.replace(
            "[daemon]",
            "[alerts]\narchive_lag_warning = \"2m\"\n[daemon]",
        ),
    );
    daemon.signal("HUP");
    wait_for(Duration::from_secs(20), "the reload", || {
        let (_, b) = http_get(&addr, "/metrics")?;
        (metric(&b, "tidemark_config_reloads_total")? == 1.0).then_some(())
    })
    .await;
    // Recorded in the background: wait for it.
    wait_for(
        Duration::from_secs(20),
        "the config change in the audit log",
        || {
            let a = st.run(&["audit", "--json"]);
            let records: Vec<serde_json::Value> = serde_json::from_str(&a.stdout).ok()?;
            records
                .iter()
                .any(|r| {
                    r["operation"] == "config_change"
                        && r["detail"]
                            .as_str()
                            .unwrap_or("")
                            .contains("alerts.archive_lag_warning")
                })
                .then_some(())
        },
    )
    .await;

    // What the jobs could not follow while the daemon runs is rejected too.
    write_owned(
        &st.cfg,
        &good.replace("[daemon]", "[daemon]\nmax_concurrent_jobs = 5"),
    );
    daemon.signal("HUP");
    wait_for(Duration::from_secs(20), "the second reload failure", || {
        let (_, b) = http_get(&addr, "/metrics")?;
        (metric(&b, "tidemark_config_reload_failures_total")? == 2.0).then_some(())
    })
    .await;
    assert!(
        daemon.log().contains("restart the daemon"),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.stop(Duration::from_secs(30)), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_outage_is_one_alert_then_resolved_and_no_wal_is_lost() {
    // Always a Garage of its own: it is stopped.
    let garage = Garage::start("dmn-s3");
    let store = StoreKind::S3(garage.target.clone());
    let hook = Webhook::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let st = Archiving::start(
        "dmn-s3c",
        &store,
        ArchivingOptions {
            extra_repo: "retry_timeout = \"2s\"\nconnect_timeout = \"1s\"\n",
            ..Default::default()
        },
    );
    let text = std::fs::read_to_string(&st.cfg).unwrap().replace(
        "[clusters.acme]",
        &format!(
            "[daemon]\ncheck_interval = \"2s\"\n[metrics]\nlisten = \"{addr}\"\n\
             [alerts]\nwebhook_url = \"{}\"\n\n[clusters.acme]",
            hook.url
        ),
    );
    write_owned(&st.cfg, &text);
    let c = st.pg.client().await;
    c.batch_execute("create table t(x int)").await.unwrap();
    let first = st.pg.switch_wal().await;
    st.pg.wait_archived(&first, Duration::from_secs(60)).await;
    let mut daemon = DaemonProc::start(&st.dir, &st.cfg, "s3");
    wait_for(Duration::from_secs(30), "a healthy check", || {
        let (_, b) = http_get(&addr, "/metrics")?;
        (metric(&b, "tidemark_check_status{cluster=\"acme\"}")? == 0.0
            && metric(&b, "tidemark_repository_up")? == 1.0)
            .then_some(())
    })
    .await;

    // WAL keeps coming while the store is down for 30 s.
    let writer = {
        let conninfo = st.pg.conninfo();
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut last = String::new();
            for i in 0..90 {
                c.batch_execute(&format!("insert into t values ({i})"))
                    .await
                    .unwrap();
                last = c
                    .query_one("select pg_walfile_name(pg_switch_wal())", &[])
                    .await
                    .unwrap()
                    .get(0);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            last
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    garage.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    garage.restart();
    let last = writer.await.unwrap();
    st.pg.wait_archived(&last, Duration::from_secs(180)).await;
    wait_for(Duration::from_secs(120), "a resolved notification", || {
        hook.all()
            .iter()
            .any(|n| n["status"] == "resolved")
            .then_some(())
    })
    .await;
    // Time for anything else the daemon would send.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let all = hook.all();
    let firing: Vec<_> = all.iter().filter(|n| n["status"] == "firing").collect();
    let resolved: Vec<_> = all.iter().filter(|n| n["status"] == "resolved").collect();
    assert_eq!(firing.len(), 1, "{all:#?}\n{}", daemon.log());
    assert_eq!(resolved.len(), 1, "{all:#?}");
    let n = firing[0];
    assert_eq!(n["event"], "repository_unreachable");
    assert_eq!(n["cluster"], "acme");
    assert_eq!(n["severity"], "critical");
    assert!(
        n["text"]
            .as_str()
            .unwrap()
            .contains("repository_unreachable")
    );
    assert!(n["message"].as_str().unwrap().contains("unreachable"));
    assert!(chrono::DateTime::parse_from_rfc3339(n["time"].as_str().unwrap()).is_ok());
    assert_eq!(resolved[0]["event"], "repository_unreachable");
    assert_eq!(resolved[0]["severity"], "resolved");
    // PostgreSQL retried: it saw failures, and every segment is in the repository.
    assert!(st.pg.archiver_failures().await > 0);
    let wl: serde_json::Value =
        serde_json::from_str(&st.run(&["wal-list", "--json"]).ok().stdout).unwrap();
    let tl = &wl["timelines"][0];
    assert_eq!(tl["gaps"].as_array().unwrap().len(), 0, "{wl}");
    assert!(tl["last"].as_str().unwrap() >= last.as_str(), "{wl}");
    let body = http_get(&addr, "/metrics").unwrap().1;
    assert!(metric(&body, "tidemark_wal_push_failures_total{cluster=\"acme\"}").unwrap() > 0.0);
    assert_eq!(
        metric(&body, "tidemark_alerts_sent_total"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(daemon.stop(Duration::from_secs(30)), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_held_off_by_another_is_retried_unless_that_one_completed() {
    let hook = Webhook::start();
    let port = free_port();
    // A schedule far away: the backups that run are the missed runs at start.
    let fleet = Fleet::start(
        "dmn-busy",
        &["acme", "beta"],
        "url = \"file://DIR/repo\"",
        &format!(
            "[schedule]\nbackup = \"0 3 1 1 *\"\n\
             [daemon]\ncheck_interval = \"2s\"\nretry_backoff = \"20s\"\nexpire_after_backup = false\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n[alerts]\nwebhook_url = \"{}\"\n",
            hook.url
        ),
        "",
    );
    // Another backup's session holds each cluster's lock, as a running backup does.
    let key: i64 = 0x7469_6465_6d61_726b;
    let mut holders = Vec::new();
    for (_, pg) in &fleet.pgs {
        let c = pg.client().await;
        c.execute("select pg_advisory_lock($1)", &[&key])
            .await
            .unwrap();
        holders.push(c);
    }
    let mut daemon = DaemonProc::start(&fleet.dir, &fleet.cfg, "busy");
    wait_for(Duration::from_secs(60), "both missed runs held off", || {
        (daemon.log().matches("backup held off").count() >= 2).then_some(())
    })
    .await;
    assert!(fleet.backups("acme").is_empty() && fleet.backups("beta").is_empty());
    // acme's holder goes away without a backup; beta's is replaced by an operator's backup
    // that completes before the retry.
    drop(holders);
    fleet.run(&["--cluster", "beta", "backup"]).ok();
    wait_for(Duration::from_secs(90), "acme's retried backup", || {
        (fleet.backups("acme").len() == 1).then_some(())
    })
    .await;
    wait_for(
        Duration::from_secs(30),
        "beta's retry to be dropped",
        || {
            daemon
                .log()
                .contains("not retrying: the backup that held the lock has completed")
                .then_some(())
        },
    )
    .await;
    let log = daemon.log();
    assert!(
        log.contains("retrying the backup that another one held off"),
        "{log}"
    );
    assert_eq!(
        fleet.backups("beta").len(),
        1,
        "beta backed up twice: {log}"
    );
    // Being held off is not a failure: no alert, no failure counted.
    let (_, body) = http_get(&format!("127.0.0.1:{port}"), "/metrics").unwrap();
    for c in ["acme", "beta"] {
        assert_eq!(
            metric(
                &body,
                &format!("tidemark_backup_failures_total{{cluster=\"{c}\"}}")
            ),
            Some(0.0),
            "{body}"
        );
    }
    assert!(hook.all().is_empty(), "alerts sent: {:?}", hook.all());
    assert_eq!(daemon.stop(Duration::from_secs(60)), 0, "{log}");
}

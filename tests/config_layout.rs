//! Clusters whose configuration lives outside the data directory (Debian's layout: data in
//! /var/lib/postgresql/V/NAME, postgresql.conf, pg_hba.conf, pg_ident.conf, conf.d/ and
//! pg_ctlcluster's files in /etc/postgresql/V/NAME): backups hold the configuration, restores
//! put it in place (in the data directory or in --config-dir) and start with it, drills work
//! on such clusters and keep a failed server's log, and `check` says when the newest backup
//! lacks the configuration. Each scenario runs on an initdb cluster whose files were moved out
//! (`ExtKind::Initdb`, any PostgreSQL version) and, where postgresql-common is installed and
//! the PostgreSQL under test is Debian's, on a real pg_createcluster cluster
//! (`ExtKind::PgCreateCluster`, PG_CLUSTER_CONF_ROOT in the test directory: nothing is
//! written to /etc/postgresql; skipped with a note elsewhere).
//!
//! - `restore_puts_configuration_in_place_*` (local, S3, pg_createcluster): list/check report
//!   the configuration; restore --start to a time puts it into the restored data directory,
//!   rewrites its paths, starts with the original's settings and hba rules on a private
//!   socket without touching the original's pid file; without the certificate files, ssl off.
//! - `drills_on_external_configuration_*`: a drill passes; a backup whose conf.d cannot start
//!   fails its drill and restore --start with the server's FATAL line, the drill keeps the
//!   server log; check warns about the failed drill.
//! - `restore_into_config_dir*`: --config-dir, started with `pg_ctl -D CDIR` and with
//!   pg_ctlcluster.
//! - `old_backup_without_configuration_*` (local, S3): a backup as tidemark wrote it before
//!   (manifest and packs rewritten through the library) restores with a warning; check warns.
//! - `harness_*`: the harness itself (works on code from before the feature).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json_of(r: &Run) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

fn check_status(v: &Value, name: &str) -> String {
    v["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("no checks: {v}"))
        .iter()
        .find(|c| c["name"] == name)
        .map(|c| c["status"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no check {name}: {v}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| panic!("not a string: {x}"))
                .to_string()
        })
        .collect()
}

/// The effective (last uncommented) `name = value` line of a postgresql.conf-syntax file: its
/// unquoted value and the whole line.
fn conf_setting(path: &Path, name: &str) -> Option<(String, String)> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut found = None;
    for line in text.lines() {
        let l = line.trim_start();
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !rest.starts_with([' ', '\t', '=', '\'']) {
            continue;
        }
        let rest = rest.trim_start();
        let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
        let value = match rest.strip_prefix('\'') {
            Some(q) => q.split('\'').next().unwrap_or("").to_string(),
            None => rest
                .split(|c: char| c.is_whitespace() || c == '#')
                .next()
                .unwrap_or("")
                .to_string(),
        };
        found = Some((value, line.to_string()));
    }
    found
}

/// `<dir>/tidemark-config/<absolute path without its leading slash>`: where a restore puts a
/// captured file that was outside the original config_file's directory.
fn elsewhere(dir: &Path, original: &Path) -> PathBuf {
    dir.join("tidemark-config")
        .join(original.strip_prefix("/").unwrap())
}

async fn show(c: &tokio_postgres::Client, setting: &str) -> String {
    c.query_one(&format!("show {setting}"), &[])
        .await
        .unwrap_or_else(|e| panic!("show {setting}: {e}"))
        .get(0)
}

async fn markers_of(c: &tokio_postgres::Client) -> Vec<i32> {
    c.query("select seq from markers order by seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn hba_marker_rules(c: &tokio_postgres::Client) -> i64 {
    c.query_one(
        &format!("select count(*) from pg_hba_file_rules where '{MARKER_DB}' = any(database)"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Starts the cluster, creates the markers table, takes a backup: (setup, backup JSON).
async fn setup(
    tag: &str,
    store: &StoreKind,
    kind: ExtKind,
    opts: ExtOptions<'_>,
) -> Option<(ExtArchiving, Value)> {
    let st = ExtArchiving::start(tag, store, kind, opts)?;
    let c = st.pg.client().await;
    c.batch_execute("create table markers(seq int primary key)")
        .await
        .unwrap();
    let b = backup(&st);
    Some((st, b))
}

fn backup(st: &ExtArchiving) -> Value {
    json_of(&st.run(&["backup", "--json", "--wal-timeout", "60s"]).ok())
}

/// Marker rows 1..=3, then the moment T (returned, as PostgreSQL prints a timestamptz), then
/// rows 4..=6; waits until their WAL is archived.
async fn rows_around_t(st: &ExtArchiving) -> String {
    let c = st.pg.client().await;
    for seq in 1..=3i32 {
        c.execute("insert into markers values ($1)", &[&seq])
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t: String = c
        .query_one("select clock_timestamp()::text", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for seq in 4..=6i32 {
        c.execute("insert into markers values ($1)", &[&seq])
            .await
            .unwrap();
    }
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;
    t
}

/// `restore --json --start` of `r` with `extra` arguments; the restore's JSON.
fn restore_start(st: &ExtArchiving, r: &Restored, extra: &[&str]) -> Value {
    let mut args: Vec<String> = vec!["restore".into(), "--json".into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(r.start_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    json_of(&st.run(&argv).ok())
}

fn list_backups(st: &ExtArchiving) -> Vec<Value> {
    let v = json_of(&st.run(&["list", "--json"]).ok());
    v["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("no backups: {v}"))
        .clone()
}

fn check_json(st: &ExtArchiving) -> Value {
    // Exit 0/1/2 by status: the report is what is looked at here.
    json_of(&st.run(&["check", "--json"]))
}

/// The original server's external pid file still names the original postmaster.
fn assert_pid_file_kept(st: &ExtArchiving) {
    let pid = st.pg.postmaster_pid();
    assert!(
        !pid.is_empty(),
        "no postmaster.pid in {}",
        st.pg.data.display()
    );
    assert_eq!(
        first_line(&st.pg.external_pid_file),
        pid,
        "the original cluster's external_pid_file {} was overwritten",
        st.pg.external_pid_file.display()
    );
}

/// `list --json`: the backup records the configuration the cluster really uses.
fn assert_listed_configuration(st: &ExtArchiving, backup: &Value) {
    let pg = &st.pg;
    let listed = list_backups(st);
    let b = listed
        .iter()
        .find(|b| b["id"] == backup["id"])
        .unwrap_or_else(|| panic!("backup {} not listed: {listed:?}", backup["id"]));
    let conf = &b["configuration"];
    assert!(conf.is_object(), "no configuration recorded: {b}");
    assert_eq!(conf["config_file"], s(&pg.config_file), "{conf}");
    assert_eq!(conf["hba_file"], s(&pg.hba_file), "{conf}");
    assert_eq!(conf["ident_file"], s(&pg.ident_file), "{conf}");
    let captured = conf["captured"]
        .as_array()
        .unwrap_or_else(|| panic!("{conf}"));
    let role_of = |p: &Path| {
        captured
            .iter()
            .find(|c| c["source"] == s(p))
            .unwrap_or_else(|| panic!("{} not captured: {conf}", p.display()))["role"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(role_of(&pg.config_file), "config_file", "{conf}");
    assert_eq!(role_of(&pg.hba_file), "hba_file", "{conf}");
    assert_eq!(role_of(&pg.ident_file), "ident_file", "{conf}");
    assert_eq!(role_of(&pg.marker_file), "include", "{conf}");
    assert_eq!(role_of(&pg.shared_include), "include", "{conf}");
    if pg.kind == ExtKind::PgCreateCluster {
        for f in ["start.conf", "pg_ctl.conf", "environment"] {
            assert_eq!(role_of(&pg.conf_dir.join(f)), "pg_ctlcluster", "{conf}");
        }
    }
    let marker = captured
        .iter()
        .find(|c| c["source"] == s(&pg.marker_file))
        .unwrap();
    assert_eq!(
        marker["size"].as_u64(),
        Some(std::fs::metadata(&pg.marker_file).unwrap().len()),
        "{marker}"
    );
    // Nothing of the data directory is "configuration outside" it.
    assert!(
        !captured
            .iter()
            .any(|c| c["source"].as_str().unwrap().starts_with(s(&pg.data))),
        "{conf}"
    );
    let missing = strings(&conf["missing"]);
    assert!(
        missing.is_empty(),
        "every file exists, none missing: {conf}"
    );
}

/// A restored server (config in `conf_dir`) has the original's settings, hba rules and
/// exactly the rows committed at T.
async fn assert_restored_server(
    st: &ExtArchiving,
    c: &tokio_postgres::Client,
    data: &Path,
    conf_dir: &Path,
) {
    let pg = &st.pg;
    assert_eq!(show(c, "tidemark_test.marker").await, pg.marker);
    assert_eq!(
        show(c, "tidemark_test.shared").await,
        format!("{}-shared", pg.marker)
    );
    assert_eq!(
        hba_marker_rules(c).await,
        1,
        "the restored pg_hba.conf lacks the marker rule"
    );
    assert_eq!(markers_of(c).await, vec![1, 2, 3], "rows committed at T");
    assert_eq!(show(c, "data_directory").await, s(data));
    assert_eq!(
        show(c, "config_file").await,
        s(&conf_dir.join("postgresql.conf"))
    );
    assert_eq!(show(c, "hba_file").await, s(&conf_dir.join("pg_hba.conf")));
    assert_eq!(
        show(c, "ident_file").await,
        s(&conf_dir.join("pg_ident.conf"))
    );
}

/// The restored postgresql.conf in `conf_dir` points at `data` and at the restored copies.
fn assert_restored_files(st: &ExtArchiving, data: &Path, conf_dir: &Path) {
    let pg = &st.pg;
    let conf = conf_dir.join("postgresql.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let (dd, line) = conf_setting(&conf, "data_directory")
        .unwrap_or_else(|| panic!("no data_directory in {}:\n{text}", conf.display()));
    assert_eq!(dd, s(data), "{}:\n{text}", conf.display());
    assert!(
        line.contains('#') && line.contains("tidemark"),
        "the rewritten data_directory line has no tidemark comment: {line:?}"
    );
    assert!(
        text.lines().any(|l| l.trim_start().starts_with('#')
            && l.contains("data_directory")
            && l.contains(s(&pg.data))),
        "the original data_directory line is not kept as a comment:\n{text}"
    );
    for (name, want) in [
        ("hba_file", conf_dir.join("pg_hba.conf")),
        ("ident_file", conf_dir.join("pg_ident.conf")),
    ] {
        let (v, _) = conf_setting(&conf, name).unwrap_or_else(|| panic!("no {name}:\n{text}"));
        assert_eq!(v, s(&want), "{name} in {}:\n{text}", conf.display());
    }
    let (inc, _) = conf_setting(&conf, "include").unwrap_or_else(|| panic!("no include:\n{text}"));
    let shared = elsewhere(conf_dir, &pg.shared_include);
    assert_eq!(inc, s(&shared), "the include of the shared file:\n{text}");
    for f in [
        conf_dir.join("pg_hba.conf"),
        conf_dir.join("pg_ident.conf"),
        conf_dir.join("conf.d/50-marker.conf"),
        conf_dir.join("conf.d/60-tidemark-test.conf"),
        shared,
    ] {
        assert!(f.is_file(), "{} was not restored", f.display());
    }
    // The copy holds the original's text (a restore may add a comment saying where it came
    // from).
    let copy = std::fs::read_to_string(conf_dir.join("conf.d/50-marker.conf")).unwrap();
    let original = std::fs::read_to_string(&pg.marker_file).unwrap();
    assert!(
        copy.contains(&original),
        "the restored conf.d/50-marker.conf differs:\n{copy}\noriginal:\n{original}"
    );
    // pg_ctlcluster's files: beside postgresql.conf in a --config-dir (pg_ctlcluster reads
    // them there); in a data directory they would only confuse, so under tidemark-config/
    // (docs/operations.md, "Debian and Ubuntu clusters").
    if pg.kind == ExtKind::PgCreateCluster {
        for f in ["start.conf", "pg_ctl.conf", "environment"] {
            let want = if conf_dir == data {
                elsewhere(conf_dir, &pg.conf_dir.join(f))
            } else {
                conf_dir.join(f)
            };
            assert!(want.is_file(), "{f} was not restored to {}", want.display());
            if conf_dir == data {
                assert!(!data.join(f).exists(), "{f} in the data directory");
            }
        }
    }
}

/// (a) restore --start puts the configuration into the restored data directory and starts
/// with it; with the ssl files gone from the host, it starts with ssl off and says so.
async fn restore_puts_configuration_in_place(store: StoreKind, kind: ExtKind, tag: &str) {
    let Some((st, b)) = setup(
        tag,
        &store,
        kind,
        ExtOptions {
            ssl: true,
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    let t = rows_around_t(&st).await;
    assert_listed_configuration(&st, &b);
    let v = check_json(&st);
    assert_eq!(check_status(&v, "configuration"), "ok", "{v}");

    let r = Restored::new(&st.dir, "r1");
    let j = restore_start(&st, &r, &["--target-time", &t]);
    let conf = &j["configuration"];
    assert_eq!(conf["held"], true, "{j}");
    let placed = conf["placed"].as_array().unwrap_or_else(|| panic!("{j}"));
    let marker_copy = r.data.join("conf.d/50-marker.conf");
    assert!(
        placed.iter().any(|p| p["source"] == s(&st.pg.marker_file)
            && p["path"] == s(&marker_copy)
            && p["role"] == "include"),
        "{j}"
    );
    assert!(
        placed.iter().any(|p| p["source"] == s(&st.pg.config_file)
            && p["path"] == s(&r.data.join("postgresql.conf"))),
        "{j}"
    );
    assert!(!strings(&conf["rewritten"]).is_empty(), "{j}");
    let overrides = strings(&j["started"]["overrides"]);
    assert!(
        overrides.iter().any(|o| o.contains("external_pid_file")),
        "the original's external_pid_file must not be used by a private start: {j}"
    );
    let c = r.client().await;
    assert_restored_server(&st, &c, &r.data, &r.data).await;
    assert_restored_files(&st, &r.data, &r.data);
    assert_pid_file_kept(&st);
    drop(c);
    drop(r);

    // The certificate and key are not on this host (any more): the start turns ssl off.
    let Some((crt, key)) = st.pg.ssl_files.clone() else {
        return;
    };
    std::fs::remove_file(&crt).unwrap();
    std::fs::remove_file(&key).unwrap();
    let r = Restored::new(&st.dir, "r2");
    let j = restore_start(&st, &r, &["--target-time", &t]);
    let overrides = strings(&j["started"]["overrides"]);
    assert!(
        overrides
            .iter()
            .any(|o| o.contains("ssl") && o.contains("off")),
        "{j}"
    );
    let missing = strings(&j["configuration"]["missing"]);
    assert!(missing.iter().any(|m| m.contains("ssl_cert_file")), "{j}");
    let c = r.client().await;
    assert_eq!(show(&c, "ssl").await, "off");
    assert_eq!(markers_of(&c).await, vec![1, 2, 3]);
    assert_eq!(show(&c, "tidemark_test.marker").await, st.pg.marker);
    assert_pid_file_kept(&st);
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_puts_configuration_in_place_local() {
    restore_puts_configuration_in_place(StoreKind::Local, ExtKind::Initdb, "cfga").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_puts_configuration_in_place_s3() {
    let (store, _garage) = s3_store("cfgas3");
    restore_puts_configuration_in_place(store, ExtKind::Initdb, "cfgas3").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_puts_configuration_in_place_pg_createcluster() {
    restore_puts_configuration_in_place(StoreKind::Local, ExtKind::PgCreateCluster, "cfgad").await;
}

fn drill(st: &ExtArchiving, scratch: &Path) -> (Run, Value) {
    let bin = pg_bin();
    let r = st.run(&[
        "drill",
        "--json",
        "--scratch-dir",
        s(scratch),
        "--pg-bin",
        s(&bin),
        "--timeout",
        "120s",
    ]);
    let v = json_of(&r);
    (r, v)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// (b) a drill passes on such a cluster; a backup whose configuration cannot start fails its
/// drill with the server's FATAL line and keeps the server's log; check warns.
async fn drills_on_external_configuration(kind: ExtKind, tag: &str) {
    let Some((st, _)) = setup(
        tag,
        &StoreKind::Local,
        kind,
        ExtOptions {
            logging_collector: kind == ExtKind::Initdb,
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    let c = st.pg.client().await;
    c.batch_execute("insert into markers select generate_series(1, 10)")
        .await
        .unwrap();
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;
    let scratch = st.dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    chown_to_user(&scratch);
    let logs_before = st.pg.log_directory.as_deref().map(files_in);

    let (r, v) = drill(&st, &scratch);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(v["ok"], true, "{v}");
    // The drill's server did not log into the original's log_directory.
    if let (Some(d), Some(before)) = (&st.pg.log_directory, logs_before) {
        assert_eq!(
            files_in(d),
            before,
            "the drill's server wrote into {}",
            d.display()
        );
    }
    assert_pid_file_kept(&st);

    // A configuration that cannot start, in the original's conf.d (not restarted: the
    // running server keeps working), then a backup that records it.
    write_user_file(
        &st.pg.conf_dir.join("conf.d/70-broken.conf"),
        "shared_preload_libraries = 'tidemark_no_such_library'\n",
    );
    let one: i32 = c.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    backup(&st);
    c.batch_execute("insert into markers values (11)")
        .await
        .unwrap();
    let seg = st.pg.switch_wal().await;
    st.pg.wait_archived(&seg, Duration::from_secs(60)).await;

    let (r, v) = drill(&st, &scratch);
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(v["ok"], false, "{v}");
    let error = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"));
    assert!(
        error.contains("FATAL") && error.contains("tidemark_no_such_library"),
        "the error must quote the server's FATAL line: {v}"
    );
    let log = v["server_log"]
        .as_str()
        .unwrap_or_else(|| panic!("no server_log: {v}"));
    let text = std::fs::read_to_string(log)
        .unwrap_or_else(|e| panic!("server_log {log} after the drill: {e}: {v}"));
    assert!(
        text.lines()
            .any(|l| l.contains("FATAL") && l.contains("tidemark_no_such_library")),
        "{log} lacks the FATAL line:\n{text}"
    );
    // The original still runs, untouched.
    let one: i32 = c.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert_pid_file_kept(&st);

    let v = check_json(&st);
    assert_eq!(check_status(&v, "drill"), "warning", "{v}");

    // restore --start of that backup: the server does not come up, and the error (one line)
    // quotes its FATAL line.
    let r = Restored::new(&st.dir, "rbroken");
    let mut args: Vec<String> = vec!["restore".into()];
    args.extend(r.start_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = st.run(&argv);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("FATAL") && l.contains("tidemark_no_such_library")),
        "the error must quote the server's FATAL line: {out:?}"
    );
    assert_pid_file_kept(&st);
}

#[tokio::test(flavor = "multi_thread")]
async fn drills_on_external_configuration_initdb() {
    drills_on_external_configuration(ExtKind::Initdb, "cfgb").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drills_on_external_configuration_pg_createcluster() {
    drills_on_external_configuration(ExtKind::PgCreateCluster, "cfgbd").await;
}

/// `restore --config-dir CDIR --pgdata DIR --target-time T` (no --start); the JSON.
fn restore_config_dir(st: &ExtArchiving, cdir: &Path, data: &Path, t: &str) -> Value {
    json_of(
        &st.run(&[
            "restore",
            "--json",
            "--config-dir",
            s(cdir),
            "--pgdata",
            s(data),
            "--target-time",
            t,
        ])
        .ok(),
    )
}

/// (c) restore --config-dir writes the configuration there, pointing at the restored data
/// directory; `pg_ctl -D CDIR` starts it.
#[tokio::test(flavor = "multi_thread")]
async fn restore_into_config_dir() {
    let Some((st, _)) = setup(
        "cfgc",
        &StoreKind::Local,
        ExtKind::Initdb,
        Default::default(),
    )
    .await
    else {
        return;
    };
    let t = rows_around_t(&st).await;
    let r = Restored::new(&st.dir, "rc");
    let cdir = st.dir.join("etc/restored");
    let j = restore_config_dir(&st, &cdir, &r.data, &t);
    assert_eq!(j["configuration"]["held"], true, "{j}");
    assert!(cdir.join("postgresql.conf").is_file(), "{j}");
    assert!(
        !r.data.join("postgresql.conf").exists(),
        "with --config-dir the configuration goes there, not into the data directory"
    );
    assert_restored_files(&st, &r.data, &cdir);

    let log = st.dir.join("rc.log");
    let out = as_user(r.bin.join("pg_ctl"))
        .args(["-w", "-t", "120", "-D"])
        .arg(&cdir)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(format!(
            "-p {} -c unix_socket_directories='{}' -c listen_addresses='' -c external_pid_file=''",
            r.port,
            r.socket_dir.display()
        ))
        .arg("start")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_ctl -D {} start: {}{}\n{}",
        cdir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&log, 30)
    );
    let c = wait_promoted(&r.socket_dir, r.port, Duration::from_secs(120), &log).await;
    assert_restored_server(&st, &c, &r.data, &cdir).await;
    assert_pid_file_kept(&st);
}

/// (c) on a pg_createcluster cluster: the restore into `<PG_CLUSTER_CONF_ROOT>/V/NEW` is a
/// cluster pg_ctlcluster knows and starts.
#[tokio::test(flavor = "multi_thread")]
async fn restore_into_config_dir_pg_createcluster() {
    let Some((st, _)) = setup(
        "cfgcd",
        &StoreKind::Local,
        ExtKind::PgCreateCluster,
        Default::default(),
    )
    .await
    else {
        return;
    };
    let t = rows_around_t(&st).await;
    let orig = st.pg.debian.as_ref().unwrap().0.clone();
    let new = DebianCluster {
        name: format!("{}r", orig.name),
        ..orig
    };
    let cdir = new.conf_dir();
    let r = Restored::new(&st.dir, "rcd");
    let j = restore_config_dir(&st, &cdir, &r.data, &t);
    assert_eq!(j["configuration"]["held"], true, "{j}");
    assert!(!r.data.join("postgresql.conf").exists());
    assert_restored_files(&st, &r.data, &cdir);

    // What an operator changes to run the copy next to the original: its port, socket and pid
    // file, and its log (pg_ctlcluster's default would be in /var/log/postgresql).
    let conf = cdir.join("postgresql.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .unwrap();
    std::io::Write::write_all(
        &mut f,
        format!(
            "\n# the restored copy, next to the original\nport = {}\nunix_socket_directories = '{}'\nexternal_pid_file = '{}'\n",
            r.port,
            r.socket_dir.display(),
            st.dir.join(&format!("run/{}-{}.pid", new.version, new.name)).display()
        )
        .as_bytes(),
    )
    .unwrap();
    drop(f);
    let log = st.dir.join("rcd.log");
    write_user_file(&log, "");
    let link = cdir.join("log");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&log, &link).unwrap();
    let guard = DebianGuard(new.clone());
    let out = new.ctl(&["start"]);
    assert!(
        out.status.success(),
        "pg_ctlcluster {} {} start: {}{}\n{}",
        new.version,
        new.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&log, 30)
    );
    let c = wait_promoted(&r.socket_dir, r.port, Duration::from_secs(120), &log).await;
    assert_restored_server(&st, &c, &r.data, &cdir).await;
    assert_pid_file_kept(&st);
    let ls = std::process::Command::new("pg_lsclusters")
        .env("PG_CLUSTER_CONF_ROOT", &new.conf_root)
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.lines()
            .any(|l| l.contains(&new.name) && l.contains("online") && l.contains(s(&r.data))),
        "{ls}"
    );
    drop(c);
    let out = new.ctl(&["stop", "-m", "fast"]);
    assert!(
        out.status.success(),
        "pg_ctlcluster stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(guard);
}

/// Opens the cluster's repository through the library, as tidemark does.
async fn open_cluster(cfg: &Path) -> tidemark::cluster::ClusterHandle {
    let config = tidemark::config::Config::load(cfg).unwrap();
    tidemark::cluster::ClusterHandle::open(config, Some("acme"))
        .await
        .unwrap_or_else(|e| panic!("open cluster: {e}"))
}

/// Makes backup `id` what a tidemark from before issue 10 wrote: its manifest without the
/// `configuration` field, and its packs without the configuration files' bytes (the backup
/// stores them in the same packs, after the data files; a restore refuses bytes in a pack that
/// the manifest does not list).
async fn strip_configuration(st: &ExtArchiving, store: &StoreKind, id: &str) {
    use tidemark::repo::manifest::BackupManifest;
    let h = open_cluster(&st.cfg).await;
    let info = h.repo.read_info().await.unwrap();
    let keyring = h.keyring(&info).await.unwrap();
    let local_file = |name: &str| st.dir.join(&format!("repo/acme/{name}"));
    let put = async |name: String, bytes: Vec<u8>| {
        let obj = h.repo.object(&info, name.clone());
        let stats = tidemark::transfer::put(
            h.repo.store(),
            &obj,
            &keyring,
            h.encode,
            std::io::Cursor::new(bytes),
        )
        .await
        .unwrap_or_else(|e| panic!("rewrite {name}: {e}"));
        if let StoreKind::Local = store {
            // Written by the test (root): give it back to the user tidemark runs as.
            let path = local_file(&name);
            assert!(path.is_file(), "{}", path.display());
            chown_to_user(&path);
        }
        stats
    };
    let get = async |name: String| {
        let obj = h.repo.object(&info, name.clone());
        tidemark::transfer::get(h.repo.store(), &obj, &keyring, false, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("read {name}: {e}"))
            .1
    };

    let bytes = get(BackupManifest::manifest_name(id)).await;
    let mut m: BackupManifest = serde_json::from_slice(&bytes).unwrap();
    let conf = m.configuration.take().unwrap_or_else(|| {
        panic!("the backup of an externally configured cluster records its configuration")
    });
    assert!(!conf.files.is_empty(), "{conf:?}");
    let touched: std::collections::BTreeSet<u32> = conf
        .files
        .iter()
        .flat_map(|f| f.extents.iter().map(|e| e.pack))
        .collect();
    for pack in touched {
        let name = BackupManifest::pack_name(id, pack);
        let content = get(name.clone()).await;
        // The data files' extents in this pack, moved together in their order.
        let mut kept: Vec<&mut tidemark::repo::manifest::Extent> = m
            .files
            .iter_mut()
            .flat_map(|f| f.extents.iter_mut())
            .filter(|e| e.pack == pack)
            .collect();
        kept.sort_by_key(|e| e.pack_offset);
        let mut compacted = Vec::with_capacity(content.len());
        for e in kept {
            let from = e.pack_offset as usize;
            compacted.extend_from_slice(&content[from..from + e.length as usize]);
            e.pack_offset = compacted.len() as u64 - e.length;
        }
        let i = m.packs.iter().position(|p| p.id == pack).unwrap();
        let old_stored = m.packs[i].stored_bytes;
        if compacted.is_empty() {
            // A pack of configuration files only: an old backup would not have it.
            m.packs.remove(i);
            h.repo.store().delete(&h.repo.key(&name)).await.unwrap();
            m.stored_bytes -= old_stored;
        } else {
            let stats = put(name, compacted).await;
            m.packs[i].original_bytes = stats.original_bytes;
            m.packs[i].stored_bytes = stats.stored_bytes;
            m.stored_bytes = m.stored_bytes - old_stored + stats.stored_bytes;
        }
    }
    m.original_bytes -= conf.files.iter().map(|f| f.size).sum::<u64>();
    let json = serde_json::to_vec(&m).unwrap();
    let v: Value = serde_json::from_slice(&json).unwrap();
    assert!(
        v.get("configuration").is_none(),
        "an old manifest has no configuration field: {v}"
    );
    put(BackupManifest::manifest_name(id), json).await;
}

/// (d) a backup taken before tidemark recorded configuration: restore works and says the
/// configuration is missing; check warns.
async fn old_backup_without_configuration(store: StoreKind, tag: &str) {
    let Some((st, b)) = setup(tag, &store, ExtKind::Initdb, Default::default()).await else {
        return;
    };
    let t = rows_around_t(&st).await;
    let id = b["id"].as_str().unwrap().to_string();
    strip_configuration(&st, &store, &id).await;

    let listed = list_backups(&st);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0]["configuration"].is_null(), "{:?}", listed[0]);
    let v = check_json(&st);
    assert_eq!(check_status(&v, "configuration"), "warning", "{v}");

    let data = st.dir.join("old");
    let r = st
        .run(&["restore", "--pgdata", s(&data), "--target-time", &t])
        .ok();
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(
        said.contains("configuration"),
        "the restore must say the backup holds no configuration: {r:?}"
    );
    assert!(data.join("PG_VERSION").is_file());
    assert!(data.join("recovery.signal").is_file());

    // The JSON form says so too.
    let data = st.dir.join("old2");
    let r = st
        .run(&[
            "restore",
            "--json",
            "--pgdata",
            s(&data),
            "--target-time",
            &t,
        ])
        .ok();
    let j = json_of(&r);
    assert!(
        j["configuration"].is_null() || j["configuration"]["held"] == false,
        "an old backup holds no configuration: {j}"
    );
    let warned = j["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|x| x.as_str().is_some_and(|x| x.contains("configuration")))
    });
    assert!(
        warned || r.stderr.contains("configuration"),
        "the restore must warn that the configuration is missing: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn old_backup_without_configuration_local() {
    old_backup_without_configuration(StoreKind::Local, "cfgd").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn old_backup_without_configuration_s3() {
    let (store, _garage) = s3_store("cfgds3");
    old_backup_without_configuration(store, "cfgds3").await;
}

/// The harness itself (works on the code before issue 10): an externally configured cluster
/// starts with its config outside the data directory, archives through tidemark, and
/// `tidemark backup` succeeds.
async fn harness(kind: ExtKind, tag: &str) {
    let Some((st, b)) = setup(
        tag,
        &StoreKind::Local,
        kind,
        ExtOptions {
            ssl: true,
            ..Default::default()
        },
    )
    .await
    else {
        return;
    };
    assert!(b["id"].is_string(), "{b}");
    let pg = &st.pg;
    for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
        assert!(!pg.data.join(f).exists(), "{f} in the data directory");
    }
    let c = pg.client().await;
    assert_eq!(show(&c, "config_file").await, s(&pg.config_file));
    assert_eq!(show(&c, "data_directory").await, s(&pg.data));
    assert_eq!(show(&c, "hba_file").await, s(&pg.hba_file));
    assert_eq!(show(&c, "ident_file").await, s(&pg.ident_file));
    assert_eq!(show(&c, "tidemark_test.marker").await, pg.marker);
    assert_eq!(
        show(&c, "tidemark_test.shared").await,
        format!("{}-shared", pg.marker)
    );
    assert_eq!(show(&c, "listen_addresses").await, "");
    assert_eq!(show(&c, "archive_mode").await, "on");
    if pg.ssl_files.is_some() {
        assert_eq!(show(&c, "ssl").await, "on");
    }
    assert_eq!(hba_marker_rules(&c).await, 1);
    assert_eq!(first_line(&pg.external_pid_file), pg.postmaster_pid());
    let files: Vec<String> = c
        .query(
            "select distinct sourcefile from pg_file_settings order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for f in [&pg.config_file, &pg.marker_file, &pg.shared_include] {
        assert!(files.contains(&s(f).to_string()), "{f:?} not in {files:?}");
    }
    if let Some(d) = &pg.debian {
        assert_eq!(
            show(&c, "cluster_name").await,
            format!("{}/{}", d.0.version, d.0.name)
        );
        let out = std::process::Command::new("pg_lsclusters")
            .env("PG_CLUSTER_CONF_ROOT", &d.0.conf_root)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines()
                .any(|l| l.contains(&d.0.name) && l.contains("online")),
            "{text}"
        );
    }
    let seg = pg.switch_wal().await;
    pg.wait_archived(&seg, Duration::from_secs(60)).await;
    assert_eq!(pg.archiver_failures().await, 0);
    // Stop and start again through the same path.
    drop(c);
    pg.stop();
    pg.start();
    let c = pg.client().await;
    assert_eq!(show(&c, "tidemark_test.marker").await, pg.marker);
}

#[tokio::test(flavor = "multi_thread")]
async fn harness_external_cluster_archives_and_backs_up() {
    harness(ExtKind::Initdb, "cfgh").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn harness_pg_createcluster_cluster_archives_and_backs_up() {
    harness(ExtKind::PgCreateCluster, "cfghd").await;
}

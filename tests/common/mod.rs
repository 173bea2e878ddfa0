//! The shared harness of the integration tests: real PostgreSQL clusters (initdb as a non-root
//! user), a real Garage S3 server (started through scripts/garage-start), and the tidemark
//! binary run the way an operator runs it.
//!
//! Environment:
//! - `TIDEMARK_PG_BIN`: directory of initdb/pg_ctl/postgres/pgbench (default: Debian's
//!   /usr/lib/postgresql/15/bin, else `pg_config --bindir`);
//! - `TIDEMARK_TEST_PG_USER`: OS user that runs PostgreSQL and tidemark when the tests run as
//!   root (default `postgres`);
//! - `TIDEMARK_TEST_S3_ENDPOINT`, `_BUCKET`, `_REGION`, `_ACCESS_KEY_ID`, `_SECRET_ACCESS_KEY`:
//!   run the S3 tests against that store (MinIO, AWS, ...) instead of a Garage the harness
//!   starts. Tests that stop the store always start their own Garage.
//! - `TIDEMARK_KEEP_TEST_DIRS=1`: keep test directories for inspection.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The OS user that runs PostgreSQL and tidemark (None: the current user).
pub fn pg_user() -> Option<String> {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    let root = String::from_utf8_lossy(&out.stdout).trim() == "0";
    root.then(|| std::env::var("TIDEMARK_TEST_PG_USER").unwrap_or_else(|_| "postgres".into()))
}

fn id_of(user: &str, flag: &str) -> u32 {
    let out = Command::new("id")
        .arg(flag)
        .arg(user)
        .output()
        .expect("run id");
    assert!(
        out.status.success(),
        "no OS user {user}: create it or set TIDEMARK_TEST_PG_USER"
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

/// Gives a path to the test user (no-op when not root).
pub fn chown_to_user(path: &Path) {
    if let Some(u) = pg_user() {
        std::os::unix::fs::chown(path, Some(id_of(&u, "-u")), Some(id_of(&u, "-g")))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A command run as the test user.
pub fn as_user(program: impl AsRef<std::ffi::OsStr>) -> Command {
    match pg_user() {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    }
}

pub fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TIDEMARK_PG_BIN") {
        return PathBuf::from(p);
    }
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian.join("initdb").exists() {
        return debian;
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("no PostgreSQL found: install it (scripts/install-deps) or set TIDEMARK_PG_BIN");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A scratch directory under /tmp (short: socket paths are limited to 107 bytes), owned by the
/// test user, removed on drop.
pub struct TestDir {
    pub path: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/tdm-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        chown_to_user(&path);
        TestDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("TIDEMARK_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The tidemark binary, copied where the test user can run it (the build directory may sit
/// under a home directory it cannot enter).
pub fn tidemark_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_BIN_EXE_tidemark"));
        let meta = std::fs::metadata(&src).unwrap();
        let mtime = meta
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = PathBuf::from(format!("/tmp/tidemark-test-bin/{}-{mtime}", meta.len()));
        let dst = dir.join("tidemark");
        if !dst.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            let tmp = dir.join(format!("tidemark.{}", std::process::id()));
            std::fs::copy(&src, &tmp).unwrap();
            std::fs::rename(&tmp, &dst).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        for d in ["/tmp/tidemark-test-bin", dir.to_str().unwrap()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dst
    })
    .clone()
}

/// The result of one tidemark run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    fn from(out: Output, elapsed: Duration) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        }
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(self.code, 0, "tidemark failed: {self:#?}");
        self
    }

    #[track_caller]
    pub fn fails_with(self, code: i32, needle: &str) -> Run {
        assert_eq!(self.code, code, "wrong exit code: {self:#?}");
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:#?}"
        );
        assert!(!self.stderr.contains("panicked"), "panic: {self:#?}");
        self
    }
}

/// Runs tidemark as the test user with `args`, in `cwd`.
pub fn tidemark(cwd: &Path, args: &[&str]) -> Run {
    tidemark_env(cwd, args, &[])
}

pub fn tidemark_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = as_user(tidemark_bin());
    c.args(args).current_dir(cwd).stdin(Stdio::null());
    c.env_remove("TIDEMARK_CONFIG")
        .env_remove("TIDEMARK_CLUSTER")
        .env_remove("TIDEMARK_LOG");
    for (k, v) in env {
        c.env(k, v);
    }
    let t = Instant::now();
    let out = c.output().expect("run tidemark");
    Run::from(out, t.elapsed())
}

/// Where a test repository lives.
#[derive(Debug, Clone)]
pub enum StoreKind {
    Local,
    S3(S3Target),
}

#[derive(Debug, Clone)]
pub struct S3Target {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Unique per test, so tests sharing a bucket never see each other's objects.
    pub prefix: String,
}

/// A Garage server started by the harness (stopped on drop).
pub struct Garage {
    pub dir: TestDir,
    pub target: S3Target,
}

impl Garage {
    pub fn start(tag: &str) -> Garage {
        let dir = TestDir::new(tag);
        let script = repo_root().join("scripts/garage-start");
        let out = Command::new(&script)
            .arg(&dir.path)
            .output()
            .expect("run scripts/garage-start");
        assert!(
            out.status.success(),
            "scripts/garage-start failed (is garage installed? scripts/install-garage): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("env")).expect("garage env file");
        let get = |k: &str| {
            env.lines()
                .filter_map(|l| l.strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.trim_matches(|c| c == '"' || c == '\'').to_string())
                .unwrap_or_else(|| panic!("{k} missing from garage env"))
        };
        let target = S3Target {
            endpoint: get("TIDEMARK_TEST_S3_ENDPOINT"),
            bucket: get("TIDEMARK_TEST_S3_BUCKET"),
            region: get("TIDEMARK_TEST_S3_REGION"),
            access_key_id: get("TIDEMARK_TEST_S3_ACCESS_KEY_ID"),
            secret_access_key: get("TIDEMARK_TEST_S3_SECRET_ACCESS_KEY"),
            prefix: format!("t{}", std::process::id()),
        };
        Garage { dir, target }
    }

    pub fn stop(&self) {
        let out = Command::new(repo_root().join("scripts/garage-stop"))
            .arg(&self.dir.path)
            .output()
            .expect("run scripts/garage-stop");
        assert!(out.status.success(), "garage-stop: {out:?}");
    }

    pub fn restart(&self) {
        let out = Command::new(repo_root().join("scripts/garage-start"))
            .arg(&self.dir.path)
            .output()
            .expect("run scripts/garage-start");
        assert!(out.status.success(), "garage restart: {out:?}");
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/garage-stop"))
            .arg(&self.dir.path)
            .output();
    }
}

/// The S3 store for a test: the external one named by the environment, or a Garage the harness
/// starts (returned so it lives as long as the test).
pub fn s3_store(tag: &str) -> (StoreKind, Option<Garage>) {
    if let Ok(endpoint) = std::env::var("TIDEMARK_TEST_S3_ENDPOINT") {
        let var = |k: &str| {
            std::env::var(k)
                .unwrap_or_else(|_| panic!("{k} must be set with TIDEMARK_TEST_S3_ENDPOINT"))
        };
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        return (
            StoreKind::S3(S3Target {
                endpoint,
                bucket: var("TIDEMARK_TEST_S3_BUCKET"),
                region: std::env::var("TIDEMARK_TEST_S3_REGION")
                    .unwrap_or_else(|_| "us-east-1".into()),
                access_key_id: var("TIDEMARK_TEST_S3_ACCESS_KEY_ID"),
                secret_access_key: var("TIDEMARK_TEST_S3_SECRET_ACCESS_KEY"),
                prefix: format!("tidemark-test/{}-{n}-{tag}", std::process::id()),
            }),
            None,
        );
    }
    let g = Garage::start(tag);
    (StoreKind::S3(g.target.clone()), Some(g))
}

pub fn config_path(dir: &TestDir, cluster: &str) -> PathBuf {
    dir.join(&format!("{cluster}.toml"))
}

/// Writes a config file for one cluster and returns its path.
pub fn write_config(
    dir: &TestDir,
    store: &StoreKind,
    cluster: &str,
    pg: Option<&PgCluster>,
    extra_repo: &str,
) -> PathBuf {
    let repo = match store {
        StoreKind::Local => format!("url = \"file://{}\"\n", dir.join("repo").display()),
        StoreKind::S3(t) => format!(
            "url = \"s3://{}/{}\"\nendpoint = \"{}\"\nregion = \"{}\"\nforce_path_style = true\n\
             access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            t.bucket, t.prefix, t.endpoint, t.region, t.access_key_id, t.secret_access_key
        ),
    };
    let key = dir.join(&format!("{cluster}.key"));
    // Each test its own state directory: audit chains, wal-push counters, the daemon's lock.
    let mut text = format!(
        "state_dir = \"{}\"\n[repository]\n{repo}{extra_repo}\n[clusters.{cluster}]\nkey_file = \"{}\"\n",
        dir.join("state").display(),
        key.display()
    );
    if let Some(pg) = pg {
        text.push_str(&format!(
            "pgdata = \"{}\"\nconnection = \"{}\"\n",
            pg.data.display(),
            pg.conninfo()
        ));
    }
    let path = config_path(dir, cluster);
    std::fs::write(&path, text).unwrap();
    // It may hold an S3 secret: owner-only, as the docs ask.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    chown_to_user(&path);
    path
}

/// A PostgreSQL cluster of the test, stopped (immediate) on drop.
pub struct PgCluster {
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub bin: PathBuf,
    pub log: PathBuf,
}

#[derive(Default)]
pub struct PgOptions<'a> {
    /// archive_command; None leaves archiving off.
    pub archive_command: Option<String>,
    pub wal_segsize_mb: Option<u32>,
    pub extra_conf: &'a str,
}

static PORT: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    /// initdb + start. The server listens only on a socket in `dir`.
    pub fn start(dir: &TestDir, name: &str, opts: PgOptions<'_>) -> PgCluster {
        let pg = PgCluster::init(dir, name, opts);
        pg.pg_ctl_start();
        pg
    }

    /// initdb and configuration, not started yet.
    pub fn init(dir: &TestDir, name: &str, opts: PgOptions<'_>) -> PgCluster {
        let bin = pg_bin();
        let data = dir.join(name);
        let mut initdb = as_user(bin.join("initdb"));
        initdb
            .args([
                "--no-locale",
                "-E",
                "UTF8",
                "-A",
                "trust",
                "-U",
                "postgres",
                "-D",
            ])
            .arg(&data);
        if let Some(mb) = opts.wal_segsize_mb {
            initdb.arg(format!("--wal-segsize={mb}"));
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Ports only name the socket file here (no TCP), so uniqueness per process suffices.
        let port = 20000
            + (std::process::id() % 20000) as u16
            + PORT.fetch_add(1, Ordering::SeqCst) as u16;
        let mut conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\nlisten_addresses = ''\n\
             wal_keep_size = '4GB'\nmax_wal_size = '4GB'\nfsync = on\nlog_min_messages = info\n",
            dir.path.display()
        );
        if let Some(cmd) = &opts.archive_command {
            conf.push_str(&format!(
                "archive_mode = on\narchive_command = '{}'\n",
                cmd.replace('\'', "''")
            ));
        }
        conf.push_str(opts.extra_conf);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        PgCluster {
            log: dir.join(&format!("{name}.log")),
            socket_dir: dir.path.clone(),
            data,
            port,
            bin,
        }
    }

    pub fn pg_ctl_start(&self) {
        let out = as_user(self.bin.join("pg_ctl"))
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("start")
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn stop(&self) {
        let _ = as_user(self.bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&self.data)
            .args(["-m", "fast", "stop"])
            .output();
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir.display(),
            self.port
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(), tokio_postgres::NoTls)
            .await
            .expect("connect to test cluster");
        tokio::spawn(conn);
        client
    }

    /// Runs pgbench as the test user (args after the connection options).
    pub fn pgbench(&self, args: &[&str]) {
        let out = as_user(self.bin.join("pgbench"))
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg("postgres")
            .args(args)
            .arg("postgres")
            .output()
            .expect("run pgbench");
        assert!(
            out.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Switches WAL and returns the name of the segment that was just completed.
    pub async fn switch_wal(&self) -> String {
        let c = self.client().await;
        // Make sure the current segment is not empty, or pg_switch_wal does nothing.
        c.batch_execute(
            "create table if not exists _switch(x int); insert into _switch values (1)",
        )
        .await
        .unwrap();
        let row = c
            .query_one("select pg_walfile_name(pg_switch_wal())", &[])
            .await
            .unwrap();
        row.get(0)
    }

    /// Waits until PostgreSQL reports `segment` (or a later one) as archived.
    pub async fn wait_archived(&self, segment: &str, timeout: Duration) {
        let c = self.client().await;
        let t = Instant::now();
        loop {
            let row = c
                .query_one("select coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') from pg_stat_archiver", &[])
                .await
                .unwrap();
            let last: String = row.get(0);
            if last.len() >= 24 && last[..24] >= *segment && !last.ends_with(".history") {
                return;
            }
            if t.elapsed() > timeout {
                let failed: i64 = row.get(1);
                panic!(
                    "{segment} not archived after {timeout:?} (last archived {last:?}, {failed} failures); log:\n{}",
                    tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn archiver_failures(&self) -> i64 {
        let c = self.client().await;
        c.query_one("select failed_count from pg_stat_archiver", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Segments PostgreSQL has marked archived (`.done`), sorted.
    pub fn done_segments(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data.join("pg_wal/archive_status"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".done"))
                    .map(str::to_string)
            })
            .collect();
        v.sort();
        v
    }

    pub async fn system_identifier(&self) -> u64 {
        let c = self.client().await;
        let s: String = c
            .query_one(
                "select system_identifier::text from pg_control_system()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        s.parse().unwrap()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_user(self.bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The archive_command for a config.
pub fn archive_command(config: &Path, cluster: &str) -> String {
    format!(
        "{} --config {} --cluster {cluster} wal-push %p",
        tidemark_bin().display(),
        config.display()
    )
}

/// A server started by `tidemark restore --start`, stopped (immediate) and removed on drop.
pub struct Restored {
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub bin: PathBuf,
}

impl Restored {
    pub fn new(dir: &TestDir, name: &str) -> Restored {
        let port = 20000
            + (std::process::id() % 20000) as u16
            + PORT.fetch_add(1, Ordering::SeqCst) as u16;
        let socket_dir = dir.join(&format!("{name}-sock"));
        std::fs::create_dir_all(&socket_dir).unwrap();
        chown_to_user(&socket_dir);
        Restored {
            data: dir.join(name),
            socket_dir,
            port,
            bin: pg_bin(),
        }
    }

    /// The restore arguments that start this server privately.
    pub fn start_args(&self) -> Vec<String> {
        vec![
            "--pgdata".into(),
            self.data.display().to_string(),
            "--start".into(),
            "--port".into(),
            self.port.to_string(),
            "--socket-dir".into(),
            self.socket_dir.display().to_string(),
            "--pg-bin".into(),
            self.bin.display().to_string(),
            "--start-timeout".into(),
            "120s".into(),
        ]
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir.display(),
            self.port
        );
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .expect("connect to restored server");
        tokio::spawn(conn);
        client
    }

    /// pg_amcheck over the database: true when it finds nothing wrong. Every supported
    /// PostgreSQL (14+) ships pg_amcheck, so a missing binary is a broken installation and fails
    /// the test rather than skipping the check.
    pub fn amcheck(&self) -> bool {
        let bin = self.bin.join("pg_amcheck");
        assert!(
            bin.exists(),
            "{} is missing: pg_amcheck must check the restored cluster (install the PostgreSQL \
             client tools of this version, or point TIDEMARK_PG_BIN at a complete bin directory)",
            bin.display()
        );
        let out = as_user(&bin)
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args([
                "-U",
                "postgres",
                "--install-missing",
                "--heapallindexed",
                "-d",
                "postgres",
            ])
            .output()
            .expect("run pg_amcheck");
        if !out.status.success() {
            eprintln!(
                "pg_amcheck: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    pub fn stop(&self) {
        let _ = as_user(self.bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("TIDEMARK_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.data);
        }
    }
}

/// A cluster archiving through tidemark into a fresh, initialised repository.
pub struct Archiving {
    pub dir: TestDir,
    pub pg: PgCluster,
    pub cfg: PathBuf,
}

/// What `Archiving::start` sets up besides the defaults.
#[derive(Default)]
pub struct ArchivingOptions<'a> {
    pub wal_segsize_mb: Option<u32>,
    /// Extra postgresql.conf lines.
    pub extra_conf: &'a str,
    /// Extra [repository] lines of the config.
    pub extra_repo: &'a str,
}

impl Archiving {
    /// initdb, a config for cluster `acme` with archive_command = tidemark wal-push, a key,
    /// start, `tidemark init`.
    pub fn start(tag: &str, store: &StoreKind, opts: ArchivingOptions<'_>) -> Archiving {
        let dir = TestDir::new(tag);
        let cfg = config_path(&dir, "acme");
        let pg = PgCluster::init(
            &dir,
            "pg",
            PgOptions {
                archive_command: Some(archive_command(&cfg, "acme")),
                wal_segsize_mb: opts.wal_segsize_mb,
                extra_conf: opts.extra_conf,
            },
        );
        write_config(&dir, store, "acme", Some(&pg), opts.extra_repo);
        let key = dir.join("acme.key");
        tidemark(&dir.path, &["key", "generate", key.to_str().unwrap()]).ok();
        pg.pg_ctl_start();
        let init = tidemark(
            &dir.path,
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--cluster",
                "acme",
                "init",
            ],
        )
        .ok();
        assert!(
            init.stdout
                .contains("initialised repository of cluster acme"),
            "{init:?}"
        );
        Archiving { dir, pg, cfg }
    }

    /// Runs tidemark with `--config <this config>` and `args`, in the test directory.
    pub fn run(&self, args: &[&str]) -> Run {
        let mut all = vec!["--config", self.cfg.to_str().unwrap()];
        all.extend_from_slice(args);
        tidemark(&self.dir.path, &all)
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a test CA in `dir`: `{name}.crt` and `{name}.key`.
pub fn make_ca(dir: &Path, name: &str) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &crt,
        ]
        .into_iter()
        .chain(["-days", "2", "-subj", "/CN=tidemark test CA"])
        .collect::<Vec<_>>(),
    );
}

/// Makes `server.crt` and `server.key` in `dir` for IP address 127.0.0.1 only (no DNS name),
/// signed by the CA `ca` (see `make_ca`).
pub fn make_server_cert(dir: &Path, ca: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]
        .into_iter()
        .chain(["-subj", "/CN=127.0.0.1"])
        .collect::<Vec<_>>(),
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
        ]
        .into_iter()
        .chain([
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ])
        .collect::<Vec<_>>(),
    );
}

/// A webhook receiver on 127.0.0.1: records the JSON body of every POST, answers 200.
pub struct Webhook {
    pub url: String,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Webhook {
    pub fn start() -> Webhook {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
        let r = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let r = r.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut len = 0usize;
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            if h == "\r\n" {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0u8; len];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        if let Ok(v) = serde_json::from_slice(&body) {
                            r.lock().unwrap().push(v);
                        }
                        let mut w = &stream;
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    }
                });
            }
        });
        Webhook { url, received }
    }

    pub fn all(&self) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().clone()
    }
}

/// GET http://addr/path; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((status, body))
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of a metric sample `name{labels}` in a Prometheus text body.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

/// `tidemark daemon` running as the test user, its log in a file; killed on drop.
pub struct DaemonProc {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl DaemonProc {
    pub fn start(dir: &TestDir, cfg: &Path, tag: &str) -> DaemonProc {
        let log = dir.join(&format!("daemon-{tag}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = as_user(tidemark_bin())
            .arg("--config")
            .arg(cfg)
            .arg("daemon")
            .current_dir(&dir.path)
            .env_remove("TIDEMARK_CONFIG")
            .env_remove("TIDEMARK_CLUSTER")
            .env("TIDEMARK_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("start tidemark daemon");
        DaemonProc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's own pid (under runuser when the tests run as root).
    pub fn daemon_pid(&self) -> i32 {
        let me = self.child.id() as i32;
        let out = Command::new("pgrep")
            .arg("-P")
            .arg(me.to_string())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(me)
    }

    pub fn signal(&self, sig: &str) {
        let out = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.daemon_pid().to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "kill -{sig}: {out:?}");
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code.
    pub fn stop(&mut self, timeout: Duration) -> i32 {
        self.signal("TERM");
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                t.elapsed() < timeout,
                "daemon did not stop within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.daemon_pid().to_string())
                .output();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `f` every 200 ms until it returns Some, or panics after `timeout` with `what`.
pub async fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters whose configuration lives outside the data directory (issue 10).
// ---------------------------------------------------------------------------------------------

/// A port for a test server (only names a socket file: test servers never listen on TCP).
pub fn next_port() -> u16 {
    20000 + (std::process::id() % 20000) as u16 + PORT.fetch_add(1, Ordering::SeqCst) as u16
}

/// A random-enough marker value (pid, time and a counter): tells one test's cluster apart from
/// anything else on the host.
pub fn random_marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    format!(
        "m{:x}{:x}{n}",
        (nanos as u64) ^ 0x9e37_79b9_7f4a_7c15,
        std::process::id()
    )
}

/// Writes `text` to `path` (creating parent directories) and gives both to the test user.
pub fn write_user_file(path: &Path, text: &str) {
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).unwrap();
        chown_to_user(parent);
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    chown_to_user(path);
}

fn append_file(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
}

fn mkdir_user(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    chown_to_user(path);
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// How an externally configured cluster is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtKind {
    /// initdb, then the configuration files moved to `<testdir>/etc/<name>/` (any version).
    Initdb,
    /// Debian's pg_createcluster with `PG_CLUSTER_CONF_ROOT=<testdir>/etc`, started with
    /// pg_ctlcluster (needs postgresql-common, root, and Debian's PostgreSQL as `pg_bin()`).
    PgCreateCluster,
}

/// The PostgreSQL major version of `pg_bin()` when it is Debian's
/// (`/usr/lib/postgresql/<V>/bin`) and pg_createcluster/pg_ctlcluster can run here (as root);
/// otherwise why not.
pub fn pg_createcluster_version() -> Result<String, String> {
    for tool in ["/usr/bin/pg_createcluster", "/usr/bin/pg_ctlcluster"] {
        if !Path::new(tool).exists() {
            return Err(format!("{tool} is not installed (postgresql-common)"));
        }
    }
    if pg_user().is_none() {
        return Err("pg_createcluster clusters need the tests to run as root".into());
    }
    let bin = pg_bin();
    let v = bin
        .strip_prefix("/usr/lib/postgresql")
        .ok()
        .and_then(|rest| {
            let mut c = rest.components();
            let v = c.next()?.as_os_str().to_str()?.to_string();
            (c.next()?.as_os_str() == "bin" && c.next().is_none()).then_some(v)
        })
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()));
    v.ok_or_else(|| {
        format!(
            "the PostgreSQL under test ({}) is not Debian's /usr/lib/postgresql/<V>/bin",
            bin.display()
        )
    })
}

/// What `ExtPg::create` sets up besides the defaults.
#[derive(Default)]
pub struct ExtOptions<'a> {
    /// archive_command (in conf.d/60-tidemark-test.conf); None leaves archiving off.
    pub archive_command: Option<String>,
    /// Initdb layout: ssl = on with a test certificate and key in `<testdir>/ssl/` (outside
    /// the data directory). pg_createcluster clusters get Debian's own ssl setup (snakeoil).
    pub ssl: bool,
    /// logging_collector = on, log_directory = `<testdir>/pglog-<name>` (outside the data
    /// directory).
    pub logging_collector: bool,
    /// Extra lines for conf.d/60-tidemark-test.conf.
    pub extra_conf: &'a str,
}

/// pg_ctlcluster's identity of a pg_createcluster cluster.
#[derive(Debug, Clone)]
pub struct DebianCluster {
    pub version: String,
    pub name: String,
    /// PG_CLUSTER_CONF_ROOT (`<testdir>/etc`); the cluster's config is `<root>/<V>/<name>/`.
    pub conf_root: PathBuf,
}

impl DebianCluster {
    pub fn conf_dir(&self) -> PathBuf {
        self.conf_root.join(&self.version).join(&self.name)
    }

    /// `pg_ctlcluster --skip-systemctl-redirect V NAME <args>` with this PG_CLUSTER_CONF_ROOT
    /// (run as root: pg_ctlcluster switches to the cluster owner itself).
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("pg_ctlcluster")
            .env("PG_CLUSTER_CONF_ROOT", &self.conf_root)
            .arg("--skip-systemctl-redirect")
            .arg(&self.version)
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctlcluster")
    }
}

/// Stops a pg_createcluster cluster (immediate) on drop, also when the test panicked.
pub struct DebianGuard(pub DebianCluster);

impl Drop for DebianGuard {
    fn drop(&mut self) {
        let _ = self.0.ctl(&["stop", "-m", "immediate"]);
    }
}

/// A cluster configured the Debian way: the data directory holds no postgresql.conf,
/// pg_hba.conf or pg_ident.conf; the server starts with `-c config_file=<conf_dir>/postgresql.conf`,
/// which sets data_directory, hba_file, ident_file, external_pid_file, unix_socket_directories,
/// `include '<testdir>/shared/common.conf'` (outside the config directory) and
/// `include_dir = 'conf.d'`. conf.d/50-marker.conf sets `tidemark_test.marker`, the shared
/// include `tidemark_test.shared`, and pg_hba.conf has a rule for the database
/// `tidemark_marker_db`. Stopped (immediate) on drop; derefs to the `PgCluster` (data, socket,
/// port, client, switch_wal, wait_archived, ...), whose own pg_ctl start must not be used.
pub struct ExtPg {
    /// Declared first: stops the pg_createcluster cluster through pg_ctlcluster before the
    /// `PgCluster`'s own drop (pg_ctl -D data stop) runs as a fallback.
    pub debian: Option<DebianGuard>,
    pub pg: PgCluster,
    pub kind: ExtKind,
    pub name: String,
    /// The directory of postgresql.conf.
    pub conf_dir: PathBuf,
    pub config_file: PathBuf,
    pub hba_file: PathBuf,
    pub ident_file: PathBuf,
    /// The file included from postgresql.conf from outside `conf_dir`.
    pub shared_include: PathBuf,
    /// conf.d/50-marker.conf.
    pub marker_file: PathBuf,
    pub external_pid_file: PathBuf,
    /// `tidemark_test.marker`; `tidemark_test.shared` is `<marker>-shared`.
    pub marker: String,
    /// (certificate, key) outside the data directory, when the cluster runs with ssl = on.
    pub ssl_files: Option<(PathBuf, PathBuf)>,
    /// log_directory of the logging collector, when it is on.
    pub log_directory: Option<PathBuf>,
}

impl std::ops::Deref for ExtPg {
    type Target = PgCluster;
    fn deref(&self) -> &PgCluster {
        &self.pg
    }
}

pub const MARKER_DB: &str = "tidemark_marker_db";

impl ExtPg {
    /// Makes (not starts) an externally configured cluster `name` in `dir`. None (with a note
    /// on stderr) when `kind` is PgCreateCluster and that cannot run here.
    pub fn create(dir: &TestDir, name: &str, kind: ExtKind, opts: ExtOptions<'_>) -> Option<ExtPg> {
        let run = dir.join("run");
        mkdir_user(&run);
        let sock = dir.join("sock");
        mkdir_user(&sock);
        let data = dir.join(&format!("{name}-data"));
        let log = dir.join(&format!("{name}.log"));
        let port = next_port();
        let bin = pg_bin();
        let marker = random_marker();

        let (conf_dir, debian, pid_name) = match kind {
            ExtKind::Initdb => {
                let out = as_user(bin.join("initdb"))
                    .args([
                        "--no-locale",
                        "-E",
                        "UTF8",
                        "-A",
                        "trust",
                        "-U",
                        "postgres",
                        "-D",
                    ])
                    .arg(&data)
                    .output()
                    .expect("run initdb");
                assert!(out.status.success(), "initdb: {}", output_text(&out));
                let conf_dir = dir.join(&format!("etc/{name}"));
                mkdir_user(&dir.join("etc"));
                mkdir_user(&conf_dir);
                for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
                    std::fs::rename(data.join(f), conf_dir.join(f)).unwrap();
                }
                (conf_dir, None, format!("{name}.pid"))
            }
            ExtKind::PgCreateCluster => {
                let version = match pg_createcluster_version() {
                    Ok(v) => v,
                    Err(why) => {
                        eprintln!("note: pg_createcluster test skipped: {why}");
                        return None;
                    }
                };
                let user = pg_user().unwrap();
                let conf_root = dir.join("etc");
                mkdir_user(&conf_root);
                let out = Command::new("pg_createcluster")
                    .env("PG_CLUSTER_CONF_ROOT", &conf_root)
                    .args(["-u", &user, &version, name, "-d"])
                    .arg(&data)
                    .arg("-s")
                    .arg(&sock)
                    .args(["-p", &port.to_string(), "-l"])
                    .arg(&log)
                    .args([
                        "--",
                        "--no-locale",
                        "-E",
                        "UTF8",
                        "-A",
                        "trust",
                        "-U",
                        "postgres",
                    ])
                    .stdin(Stdio::null())
                    .output()
                    .expect("run pg_createcluster");
                assert!(
                    out.status.success(),
                    "pg_createcluster: {}",
                    output_text(&out)
                );
                let d = DebianCluster {
                    version: version.clone(),
                    name: name.to_string(),
                    conf_root,
                };
                (
                    d.conf_dir(),
                    Some(DebianGuard(d)),
                    format!("{version}-{name}.pid"),
                )
            }
        };
        let config_file = conf_dir.join("postgresql.conf");
        let external_pid_file = run.join(pid_name);
        let shared_include = dir.join("shared/common.conf");
        write_user_file(
            &shared_include,
            &format!(
                "# included from outside the config directory\ntidemark_test.shared = '{marker}-shared'\n"
            ),
        );

        // postgresql.conf: what Debian's has (pg_createcluster already wrote data_directory,
        // hba_file, ident_file, port, unix_socket_directories, ssl and include_dir).
        let mut conf =
            String::from("\n# --- tidemark test: configuration outside the data directory ---\n");
        // Never TCP (Debian's default is localhost); the pid file where pg_ctlcluster would
        // otherwise put one (/var/run/postgresql) is the test's.
        conf.push_str(&format!(
            "listen_addresses = ''\nexternal_pid_file = '{}'\ninclude '{}'\n",
            external_pid_file.display(),
            shared_include.display()
        ));
        let mut ssl_files = None;
        if kind == ExtKind::Initdb {
            conf.push_str(&format!(
                "data_directory = '{}'\nhba_file = '{}'\nident_file = '{}'\nport = {port}\nunix_socket_directories = '{}'\n",
                data.display(),
                conf_dir.join("pg_hba.conf").display(),
                conf_dir.join("pg_ident.conf").display(),
                sock.display()
            ));
            if opts.ssl {
                let ssl = dir.join("ssl");
                mkdir_user(&ssl);
                make_ca(&ssl, "ca");
                make_server_cert(&ssl, "ca");
                let (crt, key) = (ssl.join("server.crt"), ssl.join("server.key"));
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
                chown_to_user(&crt);
                chown_to_user(&key);
                conf.push_str(&format!(
                    "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                    crt.display(),
                    key.display()
                ));
                ssl_files = Some((crt, key));
            }
            conf.push_str("include_dir = 'conf.d'\n");
        }
        append_file(&config_file, &conf);
        let conf_d = conf_dir.join("conf.d");
        mkdir_user(&conf_d);
        let marker_file = conf_d.join("50-marker.conf");
        write_user_file(
            &marker_file,
            &format!("# tidemark test marker\ntidemark_test.marker = '{marker}'\n"),
        );
        let mut test_conf = String::from(
            "wal_keep_size = '4GB'\nmax_wal_size = '4GB'\nfsync = on\nlog_min_messages = info\n",
        );
        if let Some(cmd) = &opts.archive_command {
            test_conf.push_str(&format!(
                "archive_mode = on\narchive_command = '{}'\n",
                cmd.replace('\'', "''")
            ));
        }
        let mut log_directory = None;
        if opts.logging_collector {
            let d = dir.join(&format!("pglog-{name}"));
            mkdir_user(&d);
            test_conf.push_str(&format!(
                "logging_collector = on\nlog_directory = '{}'\n",
                d.display()
            ));
            log_directory = Some(d);
        }
        test_conf.push_str(opts.extra_conf);
        write_user_file(&conf_d.join("60-tidemark-test.conf"), &test_conf);
        let hba_file = conf_dir.join("pg_hba.conf");
        append_file(
            &hba_file,
            &format!("host {MARKER_DB} all 192.0.2.0/24 reject\n"),
        );
        // Like Debian: nothing of the configuration in the data directory.
        for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
            assert!(
                !data.join(f).exists(),
                "{f} is still in the data directory {}",
                data.display()
            );
        }
        Some(ExtPg {
            debian,
            pg: PgCluster {
                data,
                socket_dir: sock,
                port,
                bin,
                log,
            },
            kind,
            name: name.to_string(),
            ident_file: conf_dir.join("pg_ident.conf"),
            hba_file,
            config_file,
            conf_dir,
            shared_include,
            marker_file,
            external_pid_file,
            marker,
            ssl_files,
            log_directory,
        })
    }

    /// Starts the server: `pg_ctl -D DATA -l LOG -o "-c config_file=..." start` as the user,
    /// or pg_ctlcluster for a pg_createcluster cluster.
    pub fn start(&self) {
        let out = match &self.debian {
            Some(d) => d.0.ctl(&["start"]),
            None => as_user(self.bin.join("pg_ctl"))
                .args(["-w", "-t", "60", "-D"])
                .arg(&self.data)
                .arg("-l")
                .arg(&self.log)
                .arg("-o")
                .arg(format!("-c config_file={}", self.config_file.display()))
                .arg("start")
                .stdin(Stdio::null())
                .output()
                .expect("pg_ctl start"),
        };
        assert!(
            out.status.success(),
            "starting {}: {}\n{}",
            self.name,
            output_text(&out),
            tail(&self.log, 30)
        );
    }

    /// Stops the server (fast).
    pub fn stop(&self) {
        match &self.debian {
            Some(d) => {
                let _ = d.0.ctl(&["stop", "-m", "fast"]);
            }
            None => self.pg.stop(),
        }
    }

    /// The postmaster's pid, from the data directory's postmaster.pid.
    pub fn postmaster_pid(&self) -> String {
        first_line(&self.data.join("postmaster.pid"))
    }
}

/// The first line of a file, trimmed ("" when it cannot be read).
pub fn first_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

/// An externally configured cluster archiving through tidemark into a fresh, initialised
/// repository (like `Archiving`, cluster `acme`). The server is stopped before the test
/// directory is removed.
pub struct ExtArchiving {
    pub pg: ExtPg,
    pub cfg: PathBuf,
    pub dir: TestDir,
}

impl ExtArchiving {
    /// Cluster, config, key, start, `tidemark init`. None when `kind` cannot run here (the
    /// caller returns: the test is skipped, with a note).
    pub fn start(
        tag: &str,
        store: &StoreKind,
        kind: ExtKind,
        opts: ExtOptions<'_>,
    ) -> Option<ExtArchiving> {
        let dir = TestDir::new(tag);
        let cfg = config_path(&dir, "acme");
        // Short, unique, no dashes (pg_createcluster names end up in systemd unit names).
        let name = format!(
            "tdm{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let pg = ExtPg::create(
            &dir,
            &name,
            kind,
            ExtOptions {
                archive_command: Some(archive_command(&cfg, "acme")),
                ..opts
            },
        )?;
        write_config(&dir, store, "acme", Some(&pg.pg), "");
        let key = dir.join("acme.key");
        tidemark(&dir.path, &["key", "generate", key.to_str().unwrap()]).ok();
        pg.start();
        let init = tidemark(
            &dir.path,
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--cluster",
                "acme",
                "init",
            ],
        )
        .ok();
        assert!(
            init.stdout
                .contains("initialised repository of cluster acme"),
            "{init:?}"
        );
        Some(ExtArchiving { pg, cfg, dir })
    }

    /// Runs tidemark with `--config <this config>` and `args`, in the test directory.
    pub fn run(&self, args: &[&str]) -> Run {
        let mut all = vec!["--config", self.cfg.to_str().unwrap()];
        all.extend_from_slice(args);
        tidemark(&self.dir.path, &all)
    }
}

/// Connects to a server on `socket_dir`/`port` as postgres, retrying until it accepts
/// connections and has left recovery (a restore's target reached and promoted).
pub async fn wait_promoted(
    socket_dir: &Path,
    port: u16,
    timeout: Duration,
    log: &Path,
) -> tokio_postgres::Client {
    let conninfo = format!(
        "host={} port={port} user=postgres dbname=postgres connect_timeout=5",
        socket_dir.display()
    );
    let t = Instant::now();
    loop {
        if let Ok((client, conn)) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            if let Ok(row) = client.query_one("select pg_is_in_recovery()", &[]).await
                && !row.get::<_, bool>(0)
            {
                return client;
            }
        }
        assert!(
            t.elapsed() < timeout,
            "server on {}:{port} not promoted after {timeout:?}; log:\n{}",
            socket_dir.display(),
            tail(log, 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

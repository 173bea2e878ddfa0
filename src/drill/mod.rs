//! `tidemark drill`: proves a backup restores. Restores into a scratch directory, starts
//! PostgreSQL privately (its own socket directory, no TCP), waits for the target, runs the
//! checks, records the result in the repository, stops the server and removes everything it
//! created — also when a step fails or the drill is interrupted.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::audit::{Event, Outcome};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::pg::wal::Lsn;
use crate::repo::manifest::RowCounts;
use crate::restore::{self, ArchiveMode, RecoveryTarget, RestoreOptions, StartOptions};

#[derive(Debug, Clone)]
pub enum DrillTarget {
    Latest,
    /// A uniformly random moment inside the restorable window.
    Random,
    Time(DateTime<chrono::FixedOffset>),
    /// The row-count point of a backup (the newest one that has one, or `--backup`): row
    /// counts are compared with those recorded then.
    Backup,
}

#[derive(Debug, Clone)]
pub struct DrillOptions {
    pub target: DrillTarget,
    pub backup: Option<String>,
    pub scratch_dir: PathBuf,
    pub config_path: PathBuf,
    pub pg_bin: Option<PathBuf>,
    pub parallelism: usize,
    pub timeout: std::time::Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The evidence a drill leaves, in the repository (`<cluster>/drills/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillRecord {
    pub id: String,
    pub cluster: String,
    pub host: String,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub ok: bool,
    pub error: Option<String>,
    pub target: String,
    pub backup: Option<String>,
    pub restored_to_time: Option<DateTime<Utc>>,
    pub restored_to_lsn: Option<String>,
    pub timeline: Option<u32>,
    /// From the drill's start to the first accepted query, and its parts.
    pub rto_ms: Option<u64>,
    pub download_ms: Option<u64>,
    pub recovery_ms: Option<u64>,
    pub bytes_restored: Option<u64>,
    pub wal_segments_replayed: Option<u64>,
    pub checks: Vec<DrillCheck>,
    /// A failed drill's server log, kept on the drill's host (size-capped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_log: Option<String>,
    /// The same log in the repository, encrypted, beside the record (`drills/<id>.log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_log_object: Option<String>,
    /// Settings the drill's server got instead of its files' values, and configuration notes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
}

/// A kept server log holds at most its last this many bytes.
const SERVER_LOG_CAP: usize = 1 << 20;
/// Failed drills' logs kept per cluster on the host.
const SERVER_LOGS_KEPT: usize = 20;

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = crate::pipeline::keys::random_bytes(&mut b);
    u64::from_le_bytes(b)
}

/// Runs one drill; the record is returned (and stored) whether it passed or not.
pub async fn drill(cluster: &ClusterHandle, opts: &DrillOptions) -> Result<DrillRecord, Error> {
    let started = Utc::now();
    let clock = Instant::now();
    let id = format!(
        "{}-{:04x}",
        started.format("%Y%m%dT%H%M%SZ"),
        random_u64() & 0xffff
    );
    let scratch = opts.scratch_dir.join(format!("tidemark-drill-{id}"));
    // Socket paths are limited to 107 bytes: a short directory of its own.
    let socket_dir = PathBuf::from(format!("/tmp/tdmd-{:08x}", random_u64() as u32));
    let mut record = DrillRecord {
        id: id.clone(),
        cluster: cluster.name.clone(),
        host: crate::host::hostname(),
        started,
        finished: started,
        ok: false,
        error: None,
        target: String::new(),
        backup: None,
        restored_to_time: None,
        restored_to_lsn: None,
        timeline: None,
        rto_ms: None,
        download_ms: None,
        recovery_ms: None,
        bytes_restored: None,
        wal_segments_replayed: None,
        checks: Vec::new(),
        server_log: None,
        server_log_object: None,
        overrides: Vec::new(),
    };
    let outcome = {
        let run = run_drill(cluster, opts, &scratch, &socket_dir, &mut record, clock);
        tokio::select! {
            r = run => r,
            _ = shutdown_signal() => Err(Error::Recovery("drill interrupted".into())),
        }
    };
    // The server's log lives in the scratch directory (the server's user can write there);
    // a failed drill keeps it before the directory goes.
    let scratch_log = scratch.join(SERVER_LOG);
    let failed = outcome.is_err() || !record.checks.iter().all(|c| c.ok);
    let kept_log = if failed {
        keep_server_log(cluster, &id, &scratch_log)
    } else {
        None
    };
    // Whatever happened: no server, no directory left behind.
    cleanup(&scratch, &socket_dir);
    record.finished = Utc::now();
    match outcome {
        Ok(()) => record.ok = record.checks.iter().all(|c| c.ok),
        Err(e) => {
            record.ok = false;
            let mut msg = e.to_string();
            // The error names the log where it was; name where it is now.
            if let Some((path, _)) = &kept_log {
                msg = msg.replace(
                    &scratch_log.display().to_string(),
                    &path.display().to_string(),
                );
            }
            record.error = Some(msg);
        }
    }
    if let Some((path, bytes)) = kept_log {
        record.server_log = Some(path.display().to_string());
        if let Ok(info) = cluster.repo.read_info().await
            && let Ok(keyring) = cluster.keyring(&info).await
        {
            let name = format!("drills/{id}.log");
            let obj = cluster.repo.object(&info, name.clone());
            match crate::transfer::put(
                cluster.repo.store(),
                &obj,
                &keyring,
                cluster.encode,
                std::io::Cursor::new(bytes),
            )
            .await
            {
                Ok(_) => record.server_log_object = Some(name),
                Err(e) => {
                    tracing::warn!(error = %e, "the drill's server log was not stored in the repository")
                }
            }
        }
    }
    if record.error.is_none() && !record.ok {
        let failed: Vec<String> = record
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        record.error = Some(failed.join("; "));
    }
    let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Internal(e.to_string()))?;
    cluster
        .repo
        .store()
        .put_bytes(
            &cluster.repo.key(&format!("drills/{id}.json")),
            Bytes::from(json),
        )
        .await?;
    if let Ok(info) = cluster.repo.read_info().await
        && let Ok(keyring) = cluster.keyring(&info).await
    {
        let mut event = Event::new(
            "drill",
            if record.ok {
                Outcome::Ok
            } else {
                Outcome::Failed
            },
        )
        .object(format!("drills/{id}.json"))
        .detail(format!("target {}", record.target));
        event.backup = record.backup.clone();
        if let Some(e) = &record.error {
            event = event.detail(format!("target {}: {e}", record.target));
        }
        crate::audit::record(cluster, &info, &keyring, event).await;
    }
    Ok(record)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run_drill(
    cluster: &ClusterHandle,
    opts: &DrillOptions,
    scratch: &Path,
    socket_dir: &Path,
    record: &mut DrillRecord,
    clock: Instant,
) -> Result<(), Error> {
    let catalog = cluster.catalog().await?;
    let mut backup_choice = opts.backup.clone();
    let mut expected_counts: Option<RowCounts> = None;
    let target = match &opts.target {
        DrillTarget::Backup => {
            let (id, counts) =
                backup_with_counts(cluster, &catalog, opts.backup.as_deref()).await?;
            backup_choice = Some(id);
            let t = RecoveryTarget::Name(counts.restore_point.clone());
            expected_counts = Some(counts);
            t
        }
        DrillTarget::Latest => RecoveryTarget::Latest,
        DrillTarget::Time(t) => RecoveryTarget::Time(*t),
        DrillTarget::Random => {
            let windows = crate::repo::window::windows(&catalog.ranges);
            let total: i64 = windows
                .iter()
                .map(|w| (w.to - w.from).num_microseconds().unwrap_or(0).max(0))
                .sum();
            if windows.is_empty() || total <= 0 {
                return Err(Error::Recovery(
                    "the restorable window is empty: nothing to drill".into(),
                ));
            }
            // Uniform over the union of windows; stay strictly before each window's end (a
            // time target needs a later commit).
            let mut pick = (random_u64() % total as u64) as i64;
            let mut chosen = windows[0].from;
            for w in &windows {
                let len = (w.to - w.from).num_microseconds().unwrap_or(0).max(0);
                if pick < len {
                    chosen = w.from + chrono::Duration::microseconds(pick);
                    break;
                }
                pick -= len;
            }
            RecoveryTarget::Time(chosen.fixed_offset())
        }
    };
    record.target = target.describe();
    std::fs::create_dir_all(scratch)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", scratch.display())))?;
    std::fs::create_dir_all(socket_dir)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", socket_dir.display())))?;
    let ropts = RestoreOptions {
        pgdata: scratch.join("pgdata"),
        target: target.clone(),
        target_timeline: None,
        exclusive: false,
        backup: backup_choice,
        tablespace_map: Vec::new(),
        force: false,
        parallelism: opts.parallelism,
        archive_mode: ArchiveMode::Off,
        owner: None,
        config_path: opts.config_path.clone(),
        config_dir: None,
        start: Some(StartOptions {
            pg_bin: opts.pg_bin.clone(),
            port: Some(5432),
            socket_dir: Some(socket_dir.to_path_buf()),
            timeout: opts.timeout,
            log_file: Some(scratch.join(SERVER_LOG)),
            private: true,
        }),
    };
    // Tablespaces go under the scratch directory too.
    let mut ropts = ropts;
    for t in catalog.backups.iter().flat_map(|b| &b.tablespaces) {
        ropts.tablespace_map.push((
            t.location.clone(),
            scratch.join(format!("ts-{}", t.oid)).display().to_string(),
        ));
    }
    if let Some(owner) = restore::effective_owner(&ropts)
        && restore::is_root()
    {
        let (uid, gid) = restore::user_ids(&owner)?;
        for d in [scratch, socket_dir] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(|e| Error::LocalIo(format!("{}: {e}", d.display())))?;
        }
    }
    let out = restore::restore(cluster, &ropts).await?;
    record.backup = Some(out.backup.clone());
    record.bytes_restored = Some(out.bytes);
    record.download_ms = Some(out.download_ms);
    let started = out
        .started
        .ok_or_else(|| Error::Internal("restore did not start the server".into()))?;
    record.overrides = started.overrides.clone();
    record.overrides.extend(
        out.warnings
            .iter()
            .filter(|w| w.starts_with("configuration:"))
            .cloned(),
    );
    record.recovery_ms = Some(started.recovery_ms);
    record.rto_ms = Some(clock.elapsed().as_millis() as u64);
    record.restored_to_time = started.restored_to_time;
    record.restored_to_lsn = started.restored_to_lsn.clone();
    record.timeline = started.timeline;
    let reached: Option<Lsn> = started
        .restored_to_lsn
        .as_deref()
        .and_then(|l| l.parse().ok());
    let ss = catalog.info.wal_segment_size;
    if let (Some(b), Some(r)) = (catalog.backups.iter().find(|b| b.id == out.backup), reached) {
        let stop: Lsn = b.stop_lsn.parse().unwrap_or_default();
        record.wal_segments_replayed = Some(r.0.saturating_sub(stop.0) / ss + 1);
    }

    // 1. The point reached matches the target and what the archive holds.
    let archive_end = catalog
        .index
        .segments
        .values()
        .filter_map(|m| m.keys().next_back().copied())
        .max();
    let target_check = match (&target, reached) {
        (RecoveryTarget::Latest, Some(r)) => match archive_end {
            Some(last) if r.0 / ss < last => DrillCheck {
                name: "target".into(),
                ok: false,
                detail: format!(
                    "recovery stopped at {r}, but the archive holds WAL up to segment {last:X} (a missing \
                     segment cut the replay short)"
                ),
            },
            _ => DrillCheck {
                name: "target".into(),
                ok: true,
                detail: format!("replayed all archived WAL, up to {r}"),
            },
        },
        (RecoveryTarget::Time(t), _) => {
            let t = t.with_timezone(&Utc);
            match started.restored_to_time {
                Some(got) if got <= t => DrillCheck {
                    name: "target".into(),
                    ok: true,
                    detail: format!(
                        "recovered to {} (target {})",
                        got.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                        t.format("%Y-%m-%d %H:%M:%S%.6f+00")
                    ),
                },
                // Recovery stopped at the first commit after the target, and none came between
                // the backup's consistent point and the target: nothing to replay, correct.
                None => DrillCheck {
                    name: "target".into(),
                    ok: true,
                    detail: format!(
                        "recovered to the backup's consistent point: no transaction committed between it and {}",
                        t.format("%Y-%m-%d %H:%M:%S%.6f+00")
                    ),
                },
                Some(got) => DrillCheck {
                    name: "target".into(),
                    ok: false,
                    detail: format!(
                        "recovered to {} which is after the target {}",
                        got.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                        t.format("%Y-%m-%d %H:%M:%S%.6f+00")
                    ),
                },
            }
        }
        (RecoveryTarget::Name(n), Some(r)) => {
            let want: Option<Lsn> = expected_counts.as_ref().and_then(|c| c.lsn.parse().ok());
            match want {
                Some(w) if r < w => DrillCheck {
                    name: "target".into(),
                    ok: false,
                    detail: format!("recovery stopped at {r}, before restore point {n:?} at {w}"),
                },
                _ => DrillCheck {
                    name: "target".into(),
                    ok: true,
                    detail: format!("reached restore point {n:?} (replayed to {r})"),
                },
            }
        }
        (_, None) => DrillCheck {
            name: "target".into(),
            ok: false,
            detail: "no replay position reported".into(),
        },
        _ => DrillCheck {
            name: "target".into(),
            ok: true,
            detail: "reached".into(),
        },
    };
    record.checks.push(target_check);

    // 2. pg_amcheck on every database, where the binary exists.
    let bin = PathBuf::from(&started.pg_bin);
    let (user, db) = restore::user_and_db(cluster);
    let amcheck = bin.join("pg_amcheck");
    if amcheck.exists() {
        let mut cmd = as_owner(&ropts, &amcheck);
        cmd.arg("-h")
            .arg(socket_dir)
            .arg("-p")
            .arg(started.port.to_string())
            .arg("-U")
            .arg(&user)
            .args(["--all", "--install-missing", "--heapallindexed"]);
        let o = cmd
            .output()
            .map_err(|e| Error::LocalIo(format!("pg_amcheck: {e}")))?;
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        record.checks.push(DrillCheck {
            name: "amcheck".into(),
            ok: o.status.success(),
            detail: if o.status.success() {
                "pg_amcheck --all: no corruption".into()
            } else {
                text.lines().take(3).collect::<Vec<_>>().join(" | ")
            },
        });
    } else {
        record.checks.push(DrillCheck {
            name: "amcheck".into(),
            ok: true,
            detail: format!("skipped: {} not installed", amcheck.display()),
        });
    }

    // 3. Row counts, against those recorded at the backup's count point.
    match &expected_counts {
        Some(expected) => {
            record.checks.push(
                compare_counts(
                    expected,
                    &socket_dir_conninfo(socket_dir, started.port, &user),
                    &expected.database,
                )
                .await,
            );
        }
        None => {
            if let Ok(Some(_)) = cluster
                .repo
                .store()
                .head(&cluster.repo.key(&RowCounts::object_name(&out.backup)))
                .await
            {
                record.checks.push(DrillCheck {
                    name: "row_counts".into(),
                    ok: true,
                    detail: "skipped: recorded at the backup's count point; compared by drills with --target backup".into(),
                });
            }
        }
    }

    // 4. User-defined assertions.
    for a in &cluster.config.drill.assert {
        let dbname = a.database.clone().unwrap_or_else(|| db.clone());
        let conninfo = format!(
            "host={} port={} user={user} dbname={dbname}",
            socket_dir.display(),
            started.port
        );
        let check = match crate::pg::conn::connect(&conninfo).await {
            Err(e) => DrillCheck {
                name: "assert".into(),
                ok: false,
                detail: format!("{}: {e}", a.sql),
            },
            Ok(c) => {
                let r = c.query_one(a.sql.as_str(), &[]).await;
                c.close().await;
                match r {
                    Ok(row) => match row.try_get::<_, bool>(0) {
                        Ok(true) => DrillCheck {
                            name: "assert".into(),
                            ok: true,
                            detail: a.sql.clone(),
                        },
                        Ok(false) => DrillCheck {
                            name: "assert".into(),
                            ok: false,
                            detail: format!("false: {}", a.sql),
                        },
                        Err(e) => DrillCheck {
                            name: "assert".into(),
                            ok: false,
                            detail: format!("{}: first column is not a boolean ({e})", a.sql),
                        },
                    },
                    Err(e) => DrillCheck {
                        name: "assert".into(),
                        ok: false,
                        detail: format!("{}: {e}", a.sql),
                    },
                }
            }
        };
        record.checks.push(check);
    }
    Ok(())
}

fn socket_dir_conninfo(socket_dir: &Path, port: u16, user: &str) -> String {
    format!("host={} port={port} user={user}", socket_dir.display())
}

/// The backup to drill at its row-count point: `wanted`, or the newest one that has counts.
async fn backup_with_counts(
    cluster: &ClusterHandle,
    catalog: &crate::cluster::Catalog,
    wanted: Option<&str>,
) -> Result<(String, RowCounts), Error> {
    let candidates: Vec<&str> = match wanted {
        Some(id) => vec![id],
        None => catalog
            .backups
            .iter()
            .rev()
            .map(|b| b.id.as_str())
            .collect(),
    };
    for id in candidates {
        let obj = cluster
            .repo
            .object(&catalog.info, RowCounts::object_name(id));
        if cluster.repo.store().head(&obj.key).await?.is_none() {
            continue;
        }
        let (_, bytes) = crate::transfer::get(
            cluster.repo.store(),
            &obj,
            &catalog.keyring,
            false,
            Vec::new(),
        )
        .await?;
        let counts: RowCounts = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Integrity(format!("{}: {e}", obj.key)))?;
        return Ok((id.to_string(), counts));
    }
    Err(Error::Recovery(match wanted {
        Some(id) => format!("backup {id} has no recorded row counts"),
        None => format!(
            "no backup has recorded row counts: set [clusters.{}.drill] count_tables (then take a backup)",
            cluster.name
        ),
    }))
}

/// Counts the rows of every recorded table on the restored server and compares.
async fn compare_counts(expected: &RowCounts, conninfo: &str, database: &str) -> DrillCheck {
    let fail = |detail: String| DrillCheck {
        name: "row_counts".into(),
        ok: false,
        detail,
    };
    let c = match crate::pg::conn::connect(&format!("{conninfo} dbname={database}")).await {
        Ok(c) => c,
        Err(e) => return fail(format!("connecting to database {database}: {e}")),
    };
    let mut actual = Vec::with_capacity(expected.tables.len());
    for t in &expected.tables {
        let n = c
            .query_one(&format!("select count(*) from {}", t.table), &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| e.to_string());
        actual.push((t.table.clone(), n));
    }
    c.close().await;
    count_check(expected, &actual)
}

fn count_check(expected: &RowCounts, actual: &[(String, Result<i64, String>)]) -> DrillCheck {
    let mut wrong = Vec::new();
    for (t, (name, got)) in expected.tables.iter().zip(actual) {
        match got {
            Ok(n) if *n == t.rows => {}
            Ok(n) => wrong.push(format!("{name}: {n} rows, {} at the backup", t.rows)),
            Err(e) => wrong.push(format!("{name}: {e}")),
        }
    }
    let total: i64 = expected.tables.iter().map(|t| t.rows).sum();
    if wrong.is_empty() {
        DrillCheck {
            name: "row_counts".into(),
            ok: true,
            detail: format!(
                "{} table(s), {total} rows, as counted at {} ({})",
                expected.tables.len(),
                expected.restore_point,
                expected.lsn
            ),
        }
    } else {
        DrillCheck {
            name: "row_counts".into(),
            ok: false,
            detail: format!(
                "{} of {} table(s) differ from the counts at {}: {}",
                wrong.len(),
                expected.tables.len(),
                expected.restore_point,
                wrong.join("; ")
            ),
        }
    }
}

fn as_owner(opts: &RestoreOptions, program: &Path) -> std::process::Command {
    match restore::effective_owner(opts) {
        Some(u) if restore::is_root() => {
            let mut c = std::process::Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(program);
            c
        }
        _ => std::process::Command::new(program),
    }
}

/// The drill server's log, in the scratch directory (outside its data directory).
const SERVER_LOG: &str = "server.log";

/// Copies a failed drill's server log (its last SERVER_LOG_CAP bytes) to
/// `<state_dir>/<cluster>/drills/<id>.log`, mode 0600, and prunes older ones. Returns the path
/// and the bytes kept.
fn keep_server_log(cluster: &ClusterHandle, id: &str, log: &Path) -> Option<(PathBuf, Vec<u8>)> {
    let bytes = std::fs::read(log).ok()?;
    let start = bytes.len().saturating_sub(SERVER_LOG_CAP);
    let mut kept = Vec::new();
    if start > 0 {
        kept.extend_from_slice(
            format!("[tidemark: the first {start} bytes of the log were dropped]\n").as_bytes(),
        );
    }
    kept.extend_from_slice(&bytes[start..]);
    let dir = cluster.state_dir.join(&cluster.name).join("drills");
    let path = dir.join(format!("{id}.log"));
    let written = crate::state::ensure_dir(&dir)
        .and_then(|()| crate::state::write_atomic(&path, &kept, true));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the drill's server log");
        return None;
    }
    // Only the newest failed drills' logs stay (ids sort by time).
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut logs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        let excess = logs.len().saturating_sub(SERVER_LOGS_KEPT);
        for old in &logs[..excess] {
            let _ = std::fs::remove_file(old);
        }
    }
    Some((path, kept))
}

/// Stops the drill's server (if it runs) and removes its directories. SIGQUIT is PostgreSQL's
/// immediate shutdown (what `pg_ctl -m immediate` sends); a drill's copy needs no checkpoint.
fn cleanup(scratch: &Path, socket_dir: &Path) {
    let pgdata = scratch.join("pgdata");
    if restore::postmaster_running(&pgdata) {
        let pid = std::fs::read_to_string(pgdata.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid.filter(|p| *p > 1) {
            // SAFETY: kill(2) on the postmaster's pid, read from its own pid file.
            unsafe {
                libc::kill(pid, libc::SIGQUIT);
            }
            for _ in 0..150 {
                if !restore::postmaster_running(&pgdata) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
    let _ = std::fs::remove_dir_all(scratch);
    let _ = std::fs::remove_dir_all(socket_dir);
}

/// Past drills of the cluster, oldest first.
pub async fn history(cluster: &ClusterHandle) -> Result<Vec<DrillRecord>, Error> {
    let prefix = cluster.repo.key("drills/");
    let mut out = Vec::new();
    for m in cluster.repo.store().list(&prefix).await? {
        if !m.key.ends_with(".json") {
            continue; // a failed drill's server log
        }
        let bytes = cluster.repo.store().get_bytes(&m.key, 1 << 20).await?;
        match serde_json::from_slice::<DrillRecord>(&bytes) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(object = %m.key, error = %e, "unreadable drill record"),
        }
    }
    out.sort_by_key(|a| a.started);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::TableCount;

    #[test]
    fn counts_must_match_exactly() {
        let expected = RowCounts {
            format: 1,
            backup: "b".into(),
            restore_point: "tidemark-counts-b".into(),
            lsn: "0/3000000".into(),
            time: Utc::now(),
            database: "postgres".into(),
            tables: vec![
                TableCount {
                    table: "public.a".into(),
                    rows: 10,
                },
                TableCount {
                    table: "public.b".into(),
                    rows: 0,
                },
            ],
        };
        let ok = count_check(
            &expected,
            &[("public.a".into(), Ok(10)), ("public.b".into(), Ok(0))],
        );
        assert!(ok.ok, "{}", ok.detail);
        let off_by_one = count_check(
            &expected,
            &[("public.a".into(), Ok(11)), ("public.b".into(), Ok(0))],
        );
        assert!(!off_by_one.ok);
        assert!(
            off_by_one
                .detail
                .contains("public.a: 11 rows, 10 at the backup"),
            "{}",
            off_by_one.detail
        );
        let missing = count_check(
            &expected,
            &[
                ("public.a".into(), Ok(10)),
                ("public.b".into(), Err("relation does not exist".into())),
            ],
        );
        assert!(!missing.ok && missing.detail.contains("does not exist"));
    }
}

// `--target` from its textual form. One block, appended whole, so the later split of this file
// can move it as a unit.

/// `latest`, `random`, `backup`, or a time with a zone (`parse_target_time`'s forms and message).
pub fn parse_target(s: &str) -> Result<DrillTarget, String> {
    Ok(match s {
        "latest" => DrillTarget::Latest,
        "random" => DrillTarget::Random,
        "backup" => DrillTarget::Backup,
        t => DrillTarget::Time(restore::parse_target_time(t)?),
    })
}

#[cfg(test)]
mod target_tests {
    use super::*;

    #[test]
    fn drill_targets_parse() {
        assert!(matches!(parse_target("latest"), Ok(DrillTarget::Latest)));
        assert!(matches!(parse_target("random"), Ok(DrillTarget::Random)));
        assert!(matches!(parse_target("backup"), Ok(DrillTarget::Backup)));
        assert!(matches!(
            parse_target("2026-11-27 09:41:07+00"),
            Ok(DrillTarget::Time(_))
        ));
        assert!(
            parse_target("bogus")
                .unwrap_err()
                .starts_with("invalid --target-time")
        );
    }
}

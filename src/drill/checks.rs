//! The drill's checks of the restored server, one function each, in the order they run:
//! the target reached, pg_amcheck, row counts, the user's assertions.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::DrillCheck;
use crate::cluster::ClusterHandle;
use crate::config::DrillAssert;
use crate::error::Error;
use crate::pg::wal::Lsn;
use crate::repo::manifest::RowCounts;
use crate::restore::{self, RecoveryTarget, RestoreOptions};

/// The drill's running server, as the checks reach it.
pub(super) struct DrillServer<'a> {
    pub socket_dir: &'a Path,
    pub port: u16,
    /// The PostgreSQL binaries it runs.
    pub pg_bin: PathBuf,
    /// The user and database of the cluster's connection string.
    pub user: String,
    pub db: String,
    /// How it was restored (whose user runs pg_amcheck).
    pub restore: &'a RestoreOptions,
}

impl DrillServer<'_> {
    fn conninfo(&self) -> String {
        format!(
            "host={} port={} user={}",
            self.socket_dir.display(),
            self.port,
            self.user
        )
    }
}

/// Check 1, the target: the point reached matches the target and what the archive holds.
/// `archive_end`: the newest archived segment number; `expected`: the counts of a
/// `--target backup` drill.
pub(super) fn target(
    target: &RecoveryTarget,
    reached: Option<Lsn>,
    restored_to_time: Option<DateTime<Utc>>,
    archive_end: Option<u64>,
    segment_size: u64,
    expected: Option<&RowCounts>,
) -> DrillCheck {
    let check = |ok: bool, detail: String| DrillCheck {
        name: "target".into(),
        ok,
        detail,
    };
    match (target, reached) {
        (RecoveryTarget::Latest, Some(r)) => match archive_end {
            Some(last) if r.0 / segment_size < last => check(
                false,
                format!(
                    "recovery stopped at {r}, but the archive holds WAL up to segment {last:X} (a missing \
                     segment cut the replay short)"
                ),
            ),
            _ => check(true, format!("replayed all archived WAL, up to {r}")),
        },
        (RecoveryTarget::Time(t), _) => {
            let t = t.with_timezone(&Utc);
            match restored_to_time {
                Some(got) if got <= t => check(
                    true,
                    format!(
                        "recovered to {} (target {})",
                        got.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                        t.format("%Y-%m-%d %H:%M:%S%.6f+00")
                    ),
                ),
                // Recovery stopped at the first commit after the target, and none came between
                // the backup's consistent point and the target: nothing to replay, correct.
                None => check(
                    true,
                    format!(
                        "recovered to the backup's consistent point: no transaction committed between it and {}",
                        t.format("%Y-%m-%d %H:%M:%S%.6f+00")
                    ),
                ),
                Some(got) => check(
                    false,
                    format!(
                        "recovered to {} which is after the target {}",
                        got.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                        t.format("%Y-%m-%d %H:%M:%S%.6f+00")
                    ),
                ),
            }
        }
        (RecoveryTarget::Name(n), Some(r)) => {
            let want: Option<Lsn> = expected.and_then(|c| c.lsn.parse().ok());
            match want {
                Some(w) if r < w => check(
                    false,
                    format!("recovery stopped at {r}, before restore point {n:?} at {w}"),
                ),
                _ => check(
                    true,
                    format!("reached restore point {n:?} (replayed to {r})"),
                ),
            }
        }
        (_, None) => check(false, "no replay position reported".into()),
        _ => check(true, "reached".into()),
    }
}

/// Check 2: pg_amcheck on every database, where the binary exists.
pub(super) fn amcheck(server: &DrillServer<'_>) -> Result<DrillCheck, Error> {
    let amcheck = server.pg_bin.join("pg_amcheck");
    if !amcheck.exists() {
        return Ok(DrillCheck {
            name: "amcheck".into(),
            ok: true,
            detail: format!("skipped: {} not installed", amcheck.display()),
        });
    }
    let mut cmd = as_owner(server.restore, &amcheck);
    cmd.arg("-h")
        .arg(server.socket_dir)
        .arg("-p")
        .arg(server.port.to_string())
        .arg("-U")
        .arg(&server.user)
        .args(["--all", "--install-missing", "--heapallindexed"]);
    let o = cmd
        .output()
        .map_err(|e| Error::LocalIo(format!("pg_amcheck: {e}")))?;
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    Ok(DrillCheck {
        name: "amcheck".into(),
        ok: o.status.success(),
        detail: if o.status.success() {
            "pg_amcheck --all: no corruption".into()
        } else {
            text.lines().take(3).collect::<Vec<_>>().join(" | ")
        },
    })
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

/// Check 3: row counts, against those recorded at the backup's count point (`expected`).
/// Without them, None, or a note when `backup` has counts that only `--target backup`
/// compares.
pub(super) async fn row_counts(
    cluster: &ClusterHandle,
    server: &DrillServer<'_>,
    expected: Option<&RowCounts>,
    backup: &str,
) -> Option<DrillCheck> {
    if let Some(expected) = expected {
        return Some(compare_counts(expected, &server.conninfo(), &expected.database).await);
    }
    match cluster
        .repo
        .exists(&crate::repo::layout::counts(backup))
        .await
    {
        Ok(true) => Some(DrillCheck {
            name: "row_counts".into(),
            ok: true,
            detail: "skipped: recorded at the backup's count point; compared by drills with --target backup".into(),
        }),
        _ => None,
    }
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

/// Check 4: one user-defined assertion: its query's first column must be true.
pub(super) async fn assertion(a: &DrillAssert, server: &DrillServer<'_>) -> DrillCheck {
    let dbname = a.database.clone().unwrap_or_else(|| server.db.clone());
    let conninfo = format!(
        "host={} port={} user={} dbname={dbname}",
        server.socket_dir.display(),
        server.port,
        server.user
    );
    let check = |ok: bool, detail: String| DrillCheck {
        name: "assert".into(),
        ok,
        detail,
    };
    let c = match crate::pg::conn::connect(&conninfo).await {
        Err(e) => return check(false, format!("{}: {e}", a.sql)),
        Ok(c) => c,
    };
    let r = c.query_one(a.sql.as_str(), &[]).await;
    c.close().await;
    match r {
        Ok(row) => match row.try_get::<_, bool>(0) {
            Ok(true) => check(true, a.sql.clone()),
            Ok(false) => check(false, format!("false: {}", a.sql)),
            Err(e) => check(
                false,
                format!("{}: first column is not a boolean ({e})", a.sql),
            ),
        },
        Err(e) => check(false, format!("{}: {e}", a.sql)),
    }
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

    #[test]
    fn latest_must_reach_the_archive_end() {
        let ss = 16 << 20;
        let at = |segno: u64| Some(Lsn(segno * ss + 0x60));
        let short = target(&RecoveryTarget::Latest, at(3), None, Some(5), ss, None);
        assert!(!short.ok);
        assert!(short.detail.contains("up to segment 5"), "{}", short.detail);
        let all = target(&RecoveryTarget::Latest, at(5), None, Some(5), ss, None);
        assert!(all.ok, "{}", all.detail);
        let unknown = target(&RecoveryTarget::Immediate, None, None, Some(5), ss, None);
        assert_eq!(unknown.detail, "no replay position reported");
    }
}

//! The checks of the PostgreSQL server: reachable and the right system, archive_command,
//! a forced WAL switch arriving in the repository, archive lag, the configuration held by
//! the newest backup, free space where pg_wal lives.

use std::time::{Duration, Instant};

use secrecy::ExposeSecret;

use super::{CheckResult, crit, ok, round, warn};
use crate::cluster::ClusterHandle;
use crate::pg::conn::Session;
use crate::pg::wal::{Lsn, WalFileName};
use crate::repo::ClusterInfo;
use crate::repo::manifest::BackupManifest;

/// The server answers and is the system the repository is for. The session, when there is
/// one, for the server checks that follow.
pub(super) async fn postgres(
    cluster: &ClusterHandle,
    info: Option<&ClusterInfo>,
) -> (CheckResult, Option<Session>) {
    let Some(conninfo) = &cluster.config.connection else {
        let result = warn(
            "postgres",
            format!(
                "clusters.{}.connection is not set: server checks skipped",
                cluster.name
            ),
        );
        return (result, None);
    };
    let c = match crate::pg::conn::connect(conninfo.expose_secret()).await {
        Ok(c) => c,
        Err(e) => return (crit("postgres", e.to_string()), None),
    };
    let result = match (crate::pg::conn::identify(&c).await, info) {
        (Ok(id), Some(info)) if info.system_identifier().ok() != Some(id.system_identifier) => {
            crit(
                "postgres",
                format!(
                    "server is system {}, the repository is for system {}",
                    id.system_identifier, info.system_identifier
                ),
            )
        }
        (Ok(id), _) => ok(
            "postgres",
            format!("reachable, PostgreSQL {}", id.version_num),
        ),
        (Err(e), _) => crit("postgres", e.to_string()),
    };
    (result, Some(c))
}

/// archive_mode is on and archive_command runs tidemark wal-push; true when both hold.
pub(super) async fn archive_command(c: &tokio_postgres::Client) -> (CheckResult, bool) {
    let row = c
        .query_one(
            "select current_setting('archive_mode'), current_setting('archive_command')",
            &[],
        )
        .await;
    let (mode, cmd): (String, String) = match row {
        Ok(row) => (row.get(0), row.get(1)),
        Err(e) => {
            return (
                crit("archive_command", format!("reading settings: {e}")),
                false,
            );
        }
    };
    if mode == "off" {
        return (
            crit(
                "archive_command",
                "archive_mode is off: no WAL is archived".into(),
            ),
            false,
        );
    }
    if !(cmd.contains("tidemark") && cmd.contains("wal-push") && cmd.contains("%p")) {
        // Not the command itself: it may carry credentials (PGPASSWORD=..., another
        // tool's keys), and this message goes to logs and alert receivers.
        let missing: Vec<&str> = ["tidemark", "wal-push", "%p"]
            .into_iter()
            .filter(|w| !cmd.contains(w))
            .collect();
        let result = crit(
            "archive_command",
            format!(
                "archive_command does not run tidemark wal-push %p (it lacks {})",
                missing.join(", ")
            ),
        );
        return (result, false);
    }
    (ok("archive_command", "runs tidemark wal-push".into()), true)
}

/// Whether the newest backup holds the configuration the server reads from outside its data
/// directory (Debian's /etc/postgresql/...): without it a restore cannot start as the cluster
/// runs now.
pub(super) async fn configuration_held(
    client: &tokio_postgres::Client,
    pgdata: &std::path::Path,
    backups: &[BackupManifest],
) -> CheckResult {
    let now = crate::pg::conffiles::discover(client, pgdata).await;
    if now.config_file.is_empty() {
        return warn(
            "configuration",
            now.missing
                .first()
                .cloned()
                .unwrap_or_else(|| "the server's configuration files cannot be read".into()),
        );
    }
    let outside: Vec<String> = now
        .files
        .iter()
        .filter(|(_, r)| *r != crate::pg::conffiles::Role::PgCtlcluster)
        .map(|(p, _)| p.display().to_string())
        .collect();
    if outside.is_empty() {
        return ok(
            "configuration",
            "the server's configuration is inside the data directory".into(),
        );
    }
    let Some(newest) = backups.iter().max_by_key(|b| b.stop_time) else {
        return warn(
            "configuration",
            format!(
                "{} configuration file(s) outside the data directory ({}); no backup holds them yet",
                outside.len(),
                outside[0]
            ),
        );
    };
    let Some(conf) = &newest.configuration else {
        return warn(
            "configuration",
            format!(
                "the configuration lives outside the data directory ({}), and the newest backup {} \
                 does not hold it (taken by an older tidemark): a restore would lack it until the next backup",
                outside[0], newest.id
            ),
        );
    };
    let held: std::collections::BTreeSet<&str> =
        conf.files.iter().map(|f| f.source.as_str()).collect();
    let lacking: Vec<&String> = outside
        .iter()
        .filter(|p| !held.contains(p.as_str()))
        .collect();
    if !lacking.is_empty() {
        return warn(
            "configuration",
            format!(
                "{} configuration file(s) are not in the newest backup {} (new since it ran?): {}",
                lacking.len(),
                newest.id,
                lacking
                    .iter()
                    .take(3)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if !conf.missing.is_empty() {
        return warn(
            "configuration",
            format!(
                "the newest backup {} could not record all of the configuration: {}",
                newest.id, conf.missing[0]
            ),
        );
    }
    ok(
        "configuration",
        format!(
            "{} configuration file(s) from outside the data directory are in the newest backup {}",
            outside.len(),
            newest.id
        ),
    )
}

pub(super) async fn archive_end_to_end(
    cluster: &ClusterHandle,
    c: &tokio_postgres::Client,
    timeout: Duration,
) -> CheckResult {
    // A WAL record, so the switch always completes a segment even on an idle server.
    let switched = c
        .query_one(
            "select pg_walfile_name(pg_switch_wal()) from (select pg_logical_emit_message(false, 'tidemark', 'check')) m",
            &[],
        )
        .await;
    let name: String = match switched {
        Ok(row) => row.get(0),
        Err(e) => return crit("archive", format!("cannot switch WAL: {e}")),
    };
    let Some(f) = WalFileName::parse(&name) else {
        return crit("archive", format!("unexpected segment name {name:?}"));
    };
    let segment = crate::repo::layout::wal(&f);
    let started = Instant::now();
    loop {
        match cluster.repo.head(&segment).await {
            Ok(Some(_)) => {
                let mut r = ok(
                    "archive",
                    format!(
                        "forced WAL switch: {name} arrived in the repository in {:.1} s",
                        started.elapsed().as_secs_f64()
                    ),
                );
                r.value = Some(started.elapsed().as_secs_f64());
                return r;
            }
            Ok(None) => {}
            Err(e) => return crit("archive", format!("looking for {name}: {e}")),
        }
        if started.elapsed() > timeout {
            return crit(
                "archive",
                format!(
                    "forced WAL switch: {name} did not arrive in the repository within {} (see pg_stat_archiver and the server log)",
                    humantime::format_duration(timeout)
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// WAL written and not yet archived: from the end of the last archived segment to
/// pg_current_wal_lsn().
async fn archive_lag_bytes(c: &tokio_postgres::Client) -> Option<u64> {
    let row = c
        .query_one(
            "select pg_current_wal_lsn()::text, coalesce(last_archived_wal, ''), \
             (select setting::bigint from pg_settings where name = 'wal_segment_size') \
             from pg_stat_archiver",
            &[],
        )
        .await
        .ok()?;
    let current: Lsn = row.get::<_, String>(0).parse().ok()?;
    let last: String = row.get(1);
    let seg_size = row.get::<_, i64>(2) as u64;
    // Any archived name (segment, .partial, .backup) starts with the segment's 24 characters.
    let seg = WalFileName::parse(last.get(..24)?)?.segment_no(seg_size)?;
    Some(current.0.saturating_sub((seg + 1) * seg_size))
}

pub(super) async fn archive_lag(
    cluster: &ClusterHandle,
    c: &tokio_postgres::Client,
) -> CheckResult {
    let row = c
        .query_one(
            "select coalesce(extract(epoch from now() - min(modification)), 0)::float8, count(*) \
             from pg_ls_archive_statusdir() where name like '%.ready'",
            &[],
        )
        .await;
    let (lag_secs, ready) = match row {
        Ok(r) => (r.get::<_, f64>(0), r.get::<_, i64>(1)),
        Err(e) => {
            return warn(
                "archive_lag",
                format!("cannot read pg_wal/archive_status: {e}"),
            );
        }
    };
    let failing = c
        .query_one(
            "select coalesce(last_failed_wal, ''), \
             coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) \
             from pg_stat_archiver",
            &[],
        )
        .await;
    let failing_note = match &failing {
        Ok(r) if r.get::<_, bool>(1) => format!(
            "; archiving is failing (last failed {})",
            r.get::<_, String>(0)
        ),
        _ => String::new(),
    };
    let lag = Duration::from_secs_f64(lag_secs.max(0.0));
    let bytes = archive_lag_bytes(c).await;
    let msg = format!(
        "{ready} segment(s) waiting, oldest for {}{}{failing_note}",
        humantime::format_duration(round(lag)),
        bytes
            .map(|b| format!(", {} MiB of WAL not archived", b >> 20))
            .unwrap_or_default()
    );
    let over_bytes = matches!(
        (bytes, cluster.alerts.archive_lag_bytes_warning),
        (Some(b), Some(limit)) if b > limit
    );
    let mut r = if lag > cluster.alerts.archive_lag_critical {
        crit("archive_lag", msg)
    } else if lag > cluster.alerts.archive_lag_warning
        || over_bytes
        || (!failing_note.is_empty() && ready > 0)
    {
        warn("archive_lag", msg)
    } else {
        ok("archive_lag", msg)
    };
    r.value = Some(lag_secs.max(0.0));
    r.bytes = bytes;
    r
}

pub(super) fn pg_wal_space(dir: &std::path::Path) -> CheckResult {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return warn("pg_wal_space", format!("{}: bad path", dir.display()));
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a writable statvfs for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return warn(
            "pg_wal_space",
            format!("{}: {}", dir.display(), std::io::Error::last_os_error()),
        );
    }
    let total = st.f_blocks as f64 * st.f_frsize as f64;
    let free = st.f_bavail as f64 * st.f_frsize as f64;
    let pct = if total > 0.0 {
        100.0 * free / total
    } else {
        100.0
    };
    let msg = format!(
        "{:.1}% free ({:.1} GiB) where pg_wal lives",
        pct,
        free / (1u64 << 30) as f64
    );
    let mut r = if pct < 5.0 {
        crit("pg_wal_space", msg)
    } else if pct < 10.0 {
        warn("pg_wal_space", msg)
    } else {
        ok("pg_wal_space", msg)
    };
    r.value = Some(pct);
    r
}

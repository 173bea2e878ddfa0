//! Row counts for drills: `[clusters.NAME.drill] count_tables` counted as of a restore point
//! of their own, recorded with the backup (`backups/<id>/counts`) so a drill that recovers to
//! that point can compare. See `RowCounts` for why the counts are exact.

use tokio_postgres::Client;

use crate::cluster::ClusterHandle;
use crate::config::DrillConfig;
use crate::pg::wal::Lsn;
use crate::repo::manifest::{RowCounts, TableCount};

/// Counts the rows as of a restore point of their own, then switches WAL so the point gets
/// archived. Returns None (with a warning) when the tables cannot be locked in time or do not
/// exist: counts are evidence for drills, never a reason to lose a backup.
pub(super) async fn count_rows(
    cluster: &ClusterHandle,
    client: &Client,
    backup_id: &str,
) -> Option<(RowCounts, Lsn)> {
    let point = RowCounts::restore_point_name(backup_id);
    match count_in_transaction(&cluster.config.drill, client, backup_id, &point).await {
        Ok((c, lsn)) => {
            tracing::info!(tables = c.tables.len(), restore_point = %point, lsn = %lsn, "row counts recorded");
            Some((c, lsn))
        }
        Err(e) => {
            let _ = client.batch_execute("rollback").await;
            tracing::warn!(
                "row counts skipped for this backup ({e}); drills of it cannot compare them"
            );
            None
        }
    }
}

/// One transaction: SHARE locks on the tables, the restore point, the counts, commit; then a
/// WAL switch, which completes the segment holding the point so it is archived with the
/// backup. On error the transaction is left for the caller to roll back.
async fn count_in_transaction(
    cfg: &DrillConfig,
    client: &Client,
    backup_id: &str,
    point: &str,
) -> Result<(RowCounts, Lsn), String> {
    let q = |e: tokio_postgres::Error| e.to_string();
    client.batch_execute("begin").await.map_err(q)?;
    client
        .batch_execute(&format!(
            "set local lock_timeout = {}",
            cfg.count_lock_timeout.as_millis().max(1)
        ))
        .await
        .map_err(q)?;
    let tables = tables_to_count(client, &cfg.count_tables).await?;
    if !tables.is_empty() {
        client
            .batch_execute(&format!("lock table {} in share mode", tables.join(", ")))
            .await
            .map_err(|e| format!("locking the tables to count: {e}"))?;
    }
    let row = client
        .query_one(
            "select pg_create_restore_point($1)::text, clock_timestamp(), current_database()",
            &[&point],
        )
        .await
        .map_err(q)?;
    let lsn: Lsn = row.get::<_, String>(0).parse()?;
    let (time, database) = (row.get(1), row.get(2));
    let mut counts = Vec::with_capacity(tables.len());
    for t in tables {
        let n: i64 = client
            .query_one(&format!("select count(*) from {t}"), &[])
            .await
            .map_err(|e| format!("counting {t}: {e}"))?
            .get(0);
        counts.push(TableCount { table: t, rows: n });
    }
    client.batch_execute("commit").await.map_err(q)?;
    client
        .batch_execute("select pg_switch_wal()")
        .await
        .map_err(q)?;
    Ok((
        RowCounts {
            format: 1,
            backup: backup_id.to_string(),
            restore_point: point.to_string(),
            lsn: lsn.to_string(),
            time,
            database,
            tables: counts,
        },
        lsn,
    ))
}

/// The configured tables as the server names them (schema-qualified, quoted as needed),
/// sorted, each once; `*` is every permanent user table.
async fn tables_to_count(client: &Client, configured: &[String]) -> Result<Vec<String>, String> {
    let mut tables = Vec::new();
    for t in configured {
        if t == "*" {
            let rows = client
                .query(
                    "select format('%I.%I', n.nspname, c.relname) from pg_class c \
                     join pg_namespace n on n.oid = c.relnamespace \
                     where c.relkind = 'r' and c.relpersistence = 'p' \
                     and n.nspname not in ('pg_catalog', 'information_schema') \
                     and n.nspname !~ '^pg_toast' order by 1",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            tables.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        } else {
            let row = client
                .query_one("select $1::text::regclass::text", &[t])
                .await
                .map_err(|e| format!("table {t:?}: {e}"))?;
            tables.push(row.get(0));
        }
    }
    tables.sort();
    tables.dedup();
    Ok(tables)
}

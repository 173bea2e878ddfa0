//! One function per command: opens the cluster, turns the arguments into the operation's
//! options, runs it, and prints the outcome (text from `render`, or JSON). The work itself is
//! in the library's operation modules; nothing here decides what a backup or restore does.

use std::path::{Path, PathBuf};

use tidemark::cluster::ClusterHandle;
use tidemark::config::Config;
use tidemark::error::Error;
use tidemark::{audit, backup, check, daemon, drill, expire, init, list, restore, wal};

use super::args::{
    ArchiveModeArg, AuditArgs, AuditCommand, BackupArgs, CheckArgs, Cli, DrillArgs, ExpireArgs,
    InitArgs, ListArgs, RestoreArgs, WalFetchArgs, WalListArgs, WalPushArgs, default_parallelism,
    parse_since,
};
use super::process::cancel_on_signal;
use super::render::*;

async fn open_cluster(cli: &Cli) -> Result<ClusterHandle, Error> {
    let config = Config::load(&cli.config_path())?;
    ClusterHandle::open(config, cli.cluster.as_deref()).await
}

/// The named cluster, or every configured one.
async fn open_clusters(cli: &Cli) -> Result<Vec<ClusterHandle>, Error> {
    let config = Config::load(&cli.config_path())?;
    if cli.cluster.is_some() || config.clusters.len() == 1 {
        return Ok(vec![
            ClusterHandle::open(config, cli.cluster.as_deref()).await?,
        ]);
    }
    let store = tidemark::store::from_url(
        &config.repository.url,
        &config.s3_settings(),
        &config.store_options(),
    )
    .await?;
    config
        .clusters
        .keys()
        .map(|n| ClusterHandle::with_store(&config, n, store.clone()))
        .collect()
}

pub fn cmd_key_generate(path: &Path) -> Result<(), Error> {
    let key = tidemark::pipeline::keys::generate_master_key_file(path)?;
    println_out(&render_key_generated(path, key.id()))
}

pub async fn cmd_init(cli: &Cli, a: &InitArgs) -> Result<(), Error> {
    let cluster = open_cluster(cli).await?;
    let out = init::init(&cluster).await?;
    if a.json {
        return print_json(&out);
    }
    println_out(&render_init(&out, &cluster.name, &cluster.repo.describe()))
}

pub async fn cmd_wal_push(cli: &Cli, a: &WalPushArgs) -> Result<(), Error> {
    let cluster = open_cluster(cli).await?;
    wal::wal_push_counted(&cluster, &a.path).await.map(|_| ())
}

pub async fn cmd_wal_fetch(cli: &Cli, a: &WalFetchArgs) -> Result<(), Error> {
    let cluster = open_cluster(cli).await?;
    wal::wal_fetch(&cluster, &a.name, &a.dest).await.map(|_| ())
}

pub async fn cmd_wal_list(cli: &Cli, a: &WalListArgs) -> Result<(), Error> {
    let cluster = open_cluster(cli).await?;
    let summary = wal::wal_list(&cluster).await?;
    if a.json {
        return print_json(&summary);
    }
    println_out(&render_wal_list(&cluster.name, &summary))
}

pub async fn cmd_backup(cli: &Cli, a: &BackupArgs) -> Result<(), Error> {
    let cluster = open_cluster(cli).await?;
    let opts = backup::BackupOptions {
        parallelism: a.parallel.unwrap_or_else(default_parallelism),
        wal_timeout: a.wal_timeout,
        label: a.label.clone(),
        cancel: Some(cancel_on_signal()),
    };
    let out = backup::backup(&cluster, &opts).await?;
    if a.json {
        return print_json(&out);
    }
    println_out(&render_backup(&out, &cluster.name))
}

/// A drill, or with --history the past ones. Exit 14 (DrillFailed) when a check failed.
pub async fn cmd_drill(cli: &Cli, a: &DrillArgs) -> Result<(), Error> {
    let cluster = open_cluster(cli).await?;
    if a.history {
        let h = drill::history(&cluster).await?;
        if a.json {
            return print_json(&h);
        }
        return println_out(&render_drill_history(&cluster.name, &h));
    }
    let opts = drill::DrillOptions {
        target: drill::parse_target(&a.target).map_err(Error::Usage)?,
        backup: a.backup.clone(),
        scratch_dir: a.scratch_dir.clone().unwrap_or_else(std::env::temp_dir),
        config_path: cli.config_path(),
        tidemark_exe: own_exe()?,
        pg_bin: a.pg_bin.clone(),
        parallelism: a.parallel.unwrap_or_else(default_parallelism),
        timeout: a.timeout,
    };
    let r = drill::drill(&cluster, &opts).await?;
    if a.json {
        print_json(&r)?;
    } else {
        println_out(&render_drill(&r))?;
    }
    if r.ok {
        Ok(())
    } else {
        Err(Error::DrillFailed(
            r.error.unwrap_or_else(|| "drill failed".into()),
        ))
    }
}

/// Monitoring's view: exits with the report's status (0 OK, 1 warning, 2 critical).
pub async fn cmd_check(cli: &Cli, a: &CheckArgs) -> Result<(), Error> {
    let cluster = match open_cluster(cli).await {
        Ok(c) => c,
        Err(e) => {
            // Monitoring reads the exit code: a broken config is critical.
            println_out(&render_check_unopened(&e))?;
            return Err(Error::CheckStatus(2));
        }
    };
    let opts = check::CheckOptions {
        switch_wal: !a.no_switch,
        archive_timeout: a.archive_timeout,
        catalog: true,
    };
    let report = check::check(&cluster, &opts).await;
    if a.json {
        print_json(&report)?;
    } else {
        println_out(&render_check(&report))?;
    }
    match report.status.exit_code() {
        0 => Ok(()),
        code => Err(Error::CheckStatus(code)),
    }
}

/// The plan, printed by --dry-run, or carried out.
pub async fn cmd_expire(cli: &Cli, a: &ExpireArgs) -> Result<(), Error> {
    let cluster = open_cluster(cli).await?;
    let plan = expire::plan(&cluster, chrono::Utc::now()).await?;
    let outcome = if a.dry_run {
        expire::dry_run(plan)
    } else {
        expire::execute(&cluster, plan).await?
    };
    if a.json {
        return print_json(&outcome);
    }
    println_out(&render_expire(&outcome))
}

pub async fn cmd_list(cli: &Cli, a: &ListArgs) -> Result<(), Error> {
    let cluster = open_cluster(cli).await?;
    let listing = list::list(&cluster).await?;
    if a.json {
        return print_json(&listing);
    }
    println_out(&render_list(&listing))
}

/// Usage errors in the target flags come before the config is read.
pub async fn cmd_restore(cli: &Cli, a: &RestoreArgs) -> Result<(), Error> {
    let target = restore::parse_target(&restore::TargetSpec {
        time: a.target_time.as_deref(),
        lsn: a.target_lsn.as_deref(),
        xid: a.target_xid.as_deref(),
        name: a.target_name.as_deref(),
        immediate: a.immediate,
    })
    .map_err(Error::Usage)?;
    let target_timeline = a
        .target_timeline
        .as_deref()
        .map(restore::parse_target_timeline)
        .transpose()
        .map_err(Error::Usage)?;
    let tablespace_map = restore::parse_tablespace_map(&a.tablespace_map).map_err(Error::Usage)?;
    let cluster = open_cluster(cli).await?;
    let opts = restore::RestoreOptions {
        pgdata: absolute(&a.pgdata),
        target,
        target_timeline,
        exclusive: a.target_exclusive,
        backup: a.backup.clone(),
        tablespace_map,
        force: a.force,
        parallelism: a.parallel.unwrap_or_else(default_parallelism),
        archive_mode: match a.archive_mode {
            ArchiveModeArg::Preserve => restore::ArchiveMode::Preserve,
            ArchiveModeArg::Off => restore::ArchiveMode::Off,
        },
        owner: a.owner.clone(),
        config_path: cli.config_path(),
        tidemark_exe: own_exe()?,
        config_dir: a.config_dir.as_deref().map(absolute),
        start: a.start.then(|| restore::StartOptions {
            pg_bin: a.pg_bin.clone(),
            port: a.port,
            socket_dir: a.socket_dir.clone(),
            timeout: a.start_timeout,
            log_file: None,
            private: false,
        }),
    };
    let out = restore::restore(&cluster, &opts).await?;
    if a.json {
        return print_json(&out);
    }
    println_out(&render_restore(&out))
}

/// Restore writes these paths into the restored cluster's configuration, which runs elsewhere.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or(p.to_path_buf())
}

pub async fn cmd_daemon(cli: &Cli) -> Result<(), Error> {
    daemon::run(daemon::DaemonOptions {
        config_path: cli.config_path(),
    })
    .await
}

/// The audit log of the named cluster or of every configured one, or its verification.
pub async fn cmd_audit(cli: &Cli, a: &AuditArgs) -> Result<(), Error> {
    let clusters = open_clusters(cli).await?;
    match &a.action {
        Some(AuditCommand::Verify { json }) => audit_verify(&clusters, a.json || *json).await,
        None => {
            let since = a.since.as_deref().map(parse_since).transpose()?;
            let mut all = Vec::new();
            for c in &clusters {
                all.extend(audit::list(c, since).await?);
            }
            all.sort_by(|a, b| a.record.time.cmp(&b.record.time));
            if a.json {
                return print_json(&all);
            }
            println_out(&render_audit(&all))
        }
    }
}

/// Exit 16 (AuditFailed) naming the first problem when a record was edited or removed.
async fn audit_verify(clusters: &[ClusterHandle], json: bool) -> Result<(), Error> {
    let mut reports = Vec::new();
    for c in clusters {
        reports.push(audit::verify(c).await?);
    }
    if json {
        print_json(&reports)?;
    } else {
        println_out(&render_audit_verify(&reports))?;
    }
    if reports.iter().all(|r| r.ok) {
        return Ok(());
    }
    let first = reports
        .iter()
        .flat_map(|r| {
            r.problems
                .iter()
                .map(move |p| format!("cluster {}: {p}", r.cluster))
        })
        .next()
        .unwrap_or_default();
    Err(Error::AuditFailed(format!(
        "audit log verification failed: {first}"
    )))
}

/// This binary: what restore_command runs in a restored or drilled cluster.
fn own_exe() -> Result<std::path::PathBuf, Error> {
    std::env::current_exe().map_err(|e| Error::Internal(format!("own path: {e}")))
}

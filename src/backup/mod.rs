//! `tidemark backup`: a full base backup of a running cluster.
//!
//! Order of events, and why it is crash-safe:
//! 1. Take a session-level advisory lock in the cluster itself: one backup per cluster at a time
//!    across processes and hosts, released by PostgreSQL if this process dies (`lock`).
//! 2. Delete leftovers of earlier backups that never wrote a manifest (we hold the lock, so no
//!    backup is running).
//! 3. pg_backup_start (non-exclusive, on this session) and copy every file through the pipeline
//!    into pack objects, several at a time (`packs`; the configuration from outside the data
//!    directory too, `configuration`).
//! 4. pg_backup_stop; count rows for drills if configured (`counts`); wait until the WAL from
//!    the start to the stop LSN (and the count point) is in the repository (`wal`).
//! 5. Write the manifest, last. Only a backup with a manifest exists for `list` and `restore`;
//!    a backup killed at any earlier point is invisible and cleaned up by the next run.

mod configuration;
mod counts;
mod lock;
mod packs;
mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, Event, Outcome};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::pg::conffiles::Discovered;
use crate::pg::files::{self, EntryKind, Tablespace};
use crate::pg::wal::{Lsn, segment_name, segment_of};
use crate::pg::{self};
use crate::pipeline::Keyring;
use crate::progress::Progress;
use crate::repo::ClusterInfo;
use crate::repo::manifest::{
    BackupManifest, DirEntry, FileEntry, MANIFEST_FORMAT, TablespaceEntry,
};
use configuration::ConfigSource;
use packs::{PackDone, PackTarget, contiguous_prefix, plan_packs};

pub use packs::PACK_TARGET;

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub parallelism: usize,
    pub wal_timeout: Duration,
    pub label: Option<String>,
    /// Cancelled (SIGTERM, SIGINT): the backup stops, removes what it wrote and fails with
    /// `Error::Interrupted`, unless its manifest is already being written.
    pub cancel: Option<CancellationToken>,
}

/// What `backup` did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BackupOutcome {
    pub id: String,
    pub label: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub files: usize,
    pub packs: usize,
    pub original_bytes: u64,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    pub removed_incomplete: Vec<String>,
}

pub async fn backup(cluster: &ClusterHandle, opts: &BackupOptions) -> Result<BackupOutcome, Error> {
    let started = Instant::now();
    let info = cluster.repo.read_info().await?;
    let keyring = cluster.keyring(&info).await?;
    let mut id = None;
    let result = backup_locked(cluster, opts, &info, &keyring, started, &mut id).await;
    // A refused backup (another one runs) touched nothing: not worth a record.
    if !matches!(result, Err(Error::Busy(_))) {
        let mut event = Event::new("backup", Outcome::Ok).outcome_of(&result);
        if let Some(id) = id {
            event = event.backup(id);
        }
        audit::record(cluster, &info, &keyring, event).await;
    }
    result
}

async fn backup_locked(
    cluster: &ClusterHandle,
    opts: &BackupOptions,
    info: &ClusterInfo,
    keyring: &Arc<Keyring>,
    started: Instant,
    id_out: &mut Option<String>,
) -> Result<BackupOutcome, Error> {
    let pgdata = cluster.config.pgdata.clone().ok_or_else(|| {
        Error::Usage(format!(
            "clusters.{}.pgdata is required by backup",
            cluster.name
        ))
    })?;
    let conninfo = cluster.config.connection.as_ref().ok_or_else(|| {
        Error::Usage(format!(
            "clusters.{}.connection is required by backup",
            cluster.name
        ))
    })?;
    let client = pg::conn::connect(conninfo.expose_secret()).await?;
    let id = pg::conn::identify(&client).await?;
    check_identity(cluster, info, &pgdata, &id)?;
    lock::refuse_standby(cluster, &client).await?;
    if let Err(e) = lock::refuse_if_leased(cluster).await {
        client.close().await;
        return Err(e);
    }
    let run = Run {
        cluster,
        opts,
        info,
        keyring,
        started,
        client: &client,
        pgdata: &pgdata,
        version_num: id.version_num,
    };
    let result = match lock::take(cluster, &client).await {
        Ok(lease) => {
            let result = backup_with_lock(&run, id_out).await;
            lease.release().await;
            result
        }
        Err(e) => Err(e),
    };
    // Ends the backup session (and its lock) cleanly; a failed backup's session ending also
    // ends PostgreSQL's backup mode.
    client.close().await;
    result
}

/// The server at the connection and the data directory are the repository's cluster.
fn check_identity(
    cluster: &ClusterHandle,
    info: &ClusterInfo,
    pgdata: &Path,
    id: &pg::conn::ServerIdentity,
) -> Result<(), Error> {
    let repo_sysid = info.system_identifier()?;
    if id.system_identifier != repo_sysid {
        return Err(Error::Repository(format!(
            "cluster {} at its connection is PostgreSQL system {}, but its repository is for system {repo_sysid}: \
             another cluster's repository",
            cluster.name, id.system_identifier
        )));
    }
    let local_sysid = pg::control::read_system_identifier(pgdata)
        .map_err(|e| Error::InvalidInput(format!("{}/global/pg_control: {e}", pgdata.display())))?;
    if local_sysid != repo_sysid {
        return Err(Error::Usage(format!(
            "pgdata {} belongs to system {local_sysid}, not to the server at the connection ({repo_sysid})",
            pgdata.display()
        )));
    }
    Ok(())
}

/// What the steps of one backup share once the server is known.
struct Run<'a> {
    cluster: &'a ClusterHandle,
    opts: &'a BackupOptions,
    info: &'a ClusterInfo,
    keyring: &'a Arc<Keyring>,
    started: Instant,
    /// The backup's session: it holds the advisory lock and the backup mode.
    client: &'a tokio_postgres::Client,
    pgdata: &'a Path,
    version_num: u32,
}

/// The backup as pg_backup_start began it.
struct Started {
    id: String,
    label: String,
    start_lsn: Lsn,
    start_time: DateTime<Utc>,
}

async fn backup_with_lock(
    run: &Run<'_>,
    id_out: &mut Option<String>,
) -> Result<BackupOutcome, Error> {
    let cluster = run.cluster;
    let repo = &cluster.repo;
    let removed_incomplete = repo.remove_incomplete().await?;
    let backup_id = new_backup_id(run, &removed_incomplete).await?;
    *id_out = Some(backup_id.clone());
    let label = run
        .opts
        .label
        .clone()
        .unwrap_or_else(|| format!("tidemark {backup_id}"));
    repo.mark_backup_started(&backup_id).await?;
    let (start_lsn, start_time) = start_backup(run, &label).await?;
    tracing::info!(backup = %backup_id, start_lsn = %start_lsn, "backup started");
    let started = Started {
        id: backup_id,
        label,
        start_lsn,
        start_time,
    };

    let copy = copy_and_finish(run, &started);
    // Until the manifest is being written the backup can stop at any await: dropping the copy
    // aborts its uploads (nothing uncommitted becomes visible) and what was committed is
    // removed below. The manifest itself is not interrupted: it is one small object.
    let result = match &run.opts.cancel {
        Some(cancel) => tokio::select! {
            r = copy => r,
            _ = cancel.cancelled() => Err(Error::Interrupted(format!(
                "backup {} of cluster {} interrupted; nothing of it was kept",
                started.id, cluster.name
            ))),
        },
        None => copy.await,
    };
    let result = match result {
        Ok(manifest) => write_manifest(run, manifest).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        // Best effort: the next backup or expire removes whatever this leaves.
        let _ = repo.delete_backup_objects(&started.id).await;
    }
    let mut outcome = result?;
    outcome.removed_incomplete = removed_incomplete;
    Ok(outcome)
}

/// pg_backup_start (pg_start_backup before 15), non-exclusive, on the backup's session.
async fn start_backup(run: &Run<'_>, label: &str) -> Result<(Lsn, DateTime<Utc>), Error> {
    let start_sql = if run.version_num >= 150000 {
        "select pg_backup_start($1, true)::text, clock_timestamp()"
    } else {
        "select pg_start_backup($1, true, false)::text, clock_timestamp()"
    };
    let row = run
        .client
        .query_one(start_sql, &[&label])
        .await
        .map_err(|e| Error::Postgres(format!("pg_backup_start: {e}")))?;
    let start_lsn: Lsn = row.get::<_, String>(0).parse().map_err(Error::Postgres)?;
    Ok((start_lsn, row.get(1)))
}

/// What pg_backup_stop returned.
struct Stopped {
    stop_lsn: Lsn,
    backup_label: String,
    tablespace_map: Option<String>,
    stop_time: DateTime<Utc>,
    timeline: u32,
}

async fn stop_backup(run: &Run<'_>) -> Result<Stopped, Error> {
    let stop_sql = if run.version_num >= 150000 {
        "select lsn::text, labelfile, spcmapfile, clock_timestamp() from pg_backup_stop(false)"
    } else {
        "select lsn::text, labelfile, spcmapfile, clock_timestamp() from pg_stop_backup(false, false)"
    };
    let row = run
        .client
        .query_one(stop_sql, &[])
        .await
        .map_err(|e| Error::Postgres(format!("pg_backup_stop: {e}")))?;
    let stop_lsn: Lsn = row.get::<_, String>(0).parse().map_err(Error::Postgres)?;
    let backup_label: String = row.get(1);
    let timeline = parse_start_timeline(&backup_label)?;
    Ok(Stopped {
        stop_lsn,
        tablespace_map: row.get(2),
        stop_time: row.get(3),
        backup_label,
        timeline,
    })
}

fn parse_start_timeline(label: &str) -> Result<u32, Error> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Postgres("backup_label has no START TIMELINE line".into()))
}

/// A data file to copy: its path in the data directory, where to read it, size and mode.
struct DataFile {
    path: String,
    source: PathBuf,
    size: u64,
    mode: u32,
}

/// Everything the backup copies, as listed before the copy.
struct Sources {
    directories: Vec<DirEntry>,
    files: Vec<DataFile>,
    tablespaces: Vec<Tablespace>,
    /// The configuration from outside the data directory, after the data files.
    discovered: Discovered,
    config: Vec<ConfigSource>,
    config_missing: Vec<String>,
}

impl Sources {
    async fn list(run: &Run<'_>) -> Result<Sources, Error> {
        let root = run.pgdata.to_path_buf();
        let (entries, tablespaces) = tokio::task::spawn_blocking(move || files::scan(&root))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::LocalIo(format!("listing the data directory: {e}")))?;
        let mut directories = Vec::new();
        let mut files = Vec::new();
        for e in entries {
            match e.kind {
                EntryKind::Dir => directories.push(DirEntry {
                    path: e.path,
                    mode: e.mode,
                }),
                EntryKind::File { size } => files.push(DataFile {
                    path: e.path,
                    source: e.source,
                    size,
                    mode: e.mode,
                }),
            }
        }
        let discovered = pg::conffiles::discover(run.client, run.pgdata).await;
        let (config, config_missing) = configuration::stat_config_files(&discovered);
        Ok(Sources {
            directories,
            files,
            tablespaces,
            discovered,
            config,
            config_missing,
        })
    }

    /// Every file to copy as (source, size): data files first, then configuration files.
    fn to_copy(&self) -> Vec<(PathBuf, u64)> {
        self.files
            .iter()
            .map(|f| (f.source.clone(), f.size))
            .chain(self.config.iter().map(|f| (f.source.clone(), f.size)))
            .collect()
    }
}

/// Steps 3 and 4: copy, stop, wait for the WAL; returns the manifest to write.
async fn copy_and_finish(run: &Run<'_>, started: &Started) -> Result<BackupManifest, Error> {
    let sources = Sources::list(run).await?;
    let done = copy_packs(run, started, &sources).await?;
    let stopped = stop_backup(run).await?;
    tracing::info!(stop_lsn = %stopped.stop_lsn, "backup stopped; waiting for its WAL to be archived");
    let (first_seg, last_seg) = await_wal(run, started, &stopped).await?;
    Ok(assemble_manifest(
        run, started, sources, done, stopped, first_seg, last_seg,
    ))
}

async fn copy_packs(
    run: &Run<'_>,
    started: &Started,
    sources: &Sources,
) -> Result<Vec<PackDone>, Error> {
    let to_copy = sources.to_copy();
    let total: u64 = to_copy.iter().map(|f| f.1).sum();
    let packs = plan_packs(&to_copy);
    tracing::info!(
        files = sources.files.len(),
        bytes = total,
        packs = packs.len(),
        "copying"
    );
    let progress = Progress::start("backup", total);
    let target = PackTarget {
        repo: &run.cluster.repo,
        info: run.info,
        keyring: run.keyring,
        encode: run.cluster.encode,
        backup_id: &started.id,
    };
    let done = packs::upload(&target, packs, run.opts.parallelism, &progress).await;
    progress.finish().await;
    done
}

/// Counts rows (if configured) and waits until the backup's WAL, and the count point's, is
/// archived; then stores the counts. Returns the backup's first and last segment.
async fn await_wal(
    run: &Run<'_>,
    started: &Started,
    stopped: &Stopped,
) -> Result<(u64, u64), Error> {
    let cluster = run.cluster;
    let seg_size = run.info.wal_segment_size;
    let start_lsn = started.start_lsn;
    let first_seg = segment_of(start_lsn, seg_size);
    let last_seg = segment_of(
        Lsn(stopped.stop_lsn.0.saturating_sub(1).max(start_lsn.0)),
        seg_size,
    );
    // Row counts at a restore point after the backup's end; its WAL must be archived too.
    let counts = if cluster.config.drill.count_tables.is_empty() {
        None
    } else {
        counts::count_rows(cluster, run.client, &started.id).await
    };
    let wait_to = match &counts {
        Some((_, lsn)) => last_seg.max(segment_of(*lsn, seg_size)),
        None => last_seg,
    };
    wal::wait_for_wal(
        &cluster.repo,
        stopped.timeline,
        first_seg,
        wait_to,
        seg_size,
        run.opts.wal_timeout,
    )
    .await?;
    if let Some((c, _)) = &counts {
        cluster
            .repo
            .write_counts(run.info, run.keyring, cluster.encode, c)
            .await?;
    }
    Ok((first_seg, last_seg))
}

/// The manifest, from what was actually read.
fn assemble_manifest(
    run: &Run<'_>,
    started: &Started,
    sources: Sources,
    done: Vec<PackDone>,
    stopped: Stopped,
    first_seg: u64,
    last_seg: u64,
) -> BackupManifest {
    let Sources {
        directories,
        files: data_files,
        tablespaces,
        discovered,
        config,
        mut config_missing,
    } = sources;
    let mut packed = packs::collect(done, data_files.len() + config.len());
    let config_extents = packed.extents.split_off(data_files.len());
    let mut files = Vec::with_capacity(data_files.len());
    let mut original_bytes = 0;
    for (f, ext) in data_files.into_iter().zip(packed.extents) {
        let Some((size, ext)) = contiguous_prefix(ext, f.size) else {
            continue; // vanished during the backup
        };
        original_bytes += size;
        files.push(FileEntry {
            path: f.path,
            size,
            mode: f.mode,
            extents: ext,
        });
    }
    let (config_files, config_bytes) =
        configuration::config_entries(config, config_extents, &mut config_missing);
    original_bytes += config_bytes;
    let configuration =
        configuration::server_configuration(&discovered, config_files, config_missing);
    let (info, seg_size, timeline) = (run.info, run.info.wal_segment_size, stopped.timeline);
    BackupManifest {
        format: MANIFEST_FORMAT,
        id: started.id.clone(),
        label: started.label.clone(),
        cluster: run.cluster.name.clone(),
        system_identifier: info.system_identifier.clone(),
        pg_version_num: run.version_num,
        timeline,
        start_lsn: started.start_lsn.to_string(),
        stop_lsn: stopped.stop_lsn.to_string(),
        start_time: started.start_time,
        stop_time: stopped.stop_time,
        wal_start: segment_name(timeline, first_seg, seg_size),
        wal_stop: segment_name(timeline, last_seg, seg_size),
        backup_label: stopped.backup_label,
        tablespace_map: stopped.tablespace_map,
        tablespaces: tablespaces
            .iter()
            .map(|t| TablespaceEntry {
                oid: t.oid,
                location: t.location.display().to_string(),
            })
            .collect(),
        directories,
        files,
        packs: packed.packs,
        original_bytes,
        stored_bytes: packed.stored_bytes,
        duration_ms: run.started.elapsed().as_millis() as u64,
        tidemark_version: env!("CARGO_PKG_VERSION").to_string(),
        configuration: Some(configuration),
    }
}

/// Writes the manifest, last: from then on the backup exists.
async fn write_manifest(run: &Run<'_>, manifest: BackupManifest) -> Result<BackupOutcome, Error> {
    let cluster = run.cluster;
    cluster
        .repo
        .write_manifest(run.info, run.keyring, cluster.encode, &manifest)
        .await?;
    tracing::info!(backup = %manifest.id, ms = manifest.duration_ms, "backup complete");
    Ok(BackupOutcome {
        files: manifest.files.len(),
        packs: manifest.packs.len(),
        id: manifest.id,
        label: manifest.label,
        timeline: manifest.timeline,
        start_lsn: manifest.start_lsn,
        stop_lsn: manifest.stop_lsn,
        start_time: manifest.start_time,
        stop_time: manifest.stop_time,
        original_bytes: manifest.original_bytes,
        stored_bytes: manifest.stored_bytes,
        duration_ms: manifest.duration_ms,
        removed_incomplete: Vec::new(),
    })
}

/// Backup ids sort by time: `YYYYMMDDTHHMMSSZ`, with a suffix if that second is taken (or was
/// the id of a leftover just removed: an id is never reused).
async fn new_backup_id(run: &Run<'_>, avoid: &[String]) -> Result<String, Error> {
    let base = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    for n in 0..100 {
        let id = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if avoid.contains(&id) {
            continue;
        }
        if !run.cluster.repo.backup_id_taken(&id).await? {
            return Ok(id);
        }
    }
    Err(Error::Internal("could not find a free backup id".into()))
}

//! `tidemark backup`: a full base backup of a running cluster.
//!
//! Order of events, and why it is crash-safe:
//! 1. Take a session-level advisory lock in the cluster itself: one backup per cluster at a time
//!    across processes and hosts, released by PostgreSQL if this process dies.
//! 2. Delete leftovers of earlier backups that never wrote a manifest (we hold the lock, so no
//!    backup is running).
//! 3. pg_backup_start (non-exclusive, on this session) and copy every file through the pipeline
//!    into pack objects, several at a time.
//! 4. pg_backup_stop; wait until the WAL from the start to the stop LSN is in the repository.
//! 5. Write the manifest, last. Only a backup with a manifest exists for `list` and `restore`;
//!    a backup killed at any earlier point is invisible and cleaned up by the next run.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use secrecy::ExposeSecret;

use crate::audit::{self, Event, Outcome};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::parallel::run_bounded;
use crate::pg::files::{self, EntryKind};
use crate::pg::wal::{Lsn, segment_name, segment_of};
use crate::pg::{self};
use crate::pipeline::Keyring;
use crate::progress::Progress;
use crate::repo::lease::{self, LeaseError};
use crate::repo::manifest::{
    BackupManifest, ConfigDirEntry, ConfigFileEntry, DirEntry, Extent, FileEntry, MANIFEST_FORMAT,
    PackEntry, RowCounts, ServerConfiguration, SettingEntry, TableCount, TablespaceEntry,
};
use crate::repo::{ClusterInfo, Repository};
use crate::transfer;
use tokio_util::sync::CancellationToken;

/// Advisory lock key of "a backup of this cluster is running" (ASCII "tidemark").
pub const BACKUP_LOCK_KEY: i64 = 0x7469_6465_6d61_726b;
/// Files up to this size share packs; larger files are cut into pieces of this size, each its
/// own pack, so one large relation does not serialise the backup.
pub const PACK_TARGET: u64 = 64 << 20;
/// At most this many files in one pack (bounds manifest work per pack on restore).
const PACK_MAX_FILES: usize = 4096;

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub parallelism: usize,
    pub wal_timeout: Duration,
    pub label: Option<String>,
    /// Cancelled (SIGTERM, SIGINT): the backup stops, removes what it wrote and fails with
    /// `Error::Interrupted`, unless its manifest is already being written.
    pub cancel: Option<CancellationToken>,
}

#[derive(Debug, Clone)]
struct Piece {
    file: usize,
    source: PathBuf,
    offset: u64,
    length: u64,
}

#[derive(Debug, Clone)]
struct PieceResult {
    piece: usize,
    pack_offset: u64,
    length: u64,
    sha256: [u8; 32],
}

/// Reads the pieces of one pack back to back, hashing each; records what it actually read
/// (a file may shrink or vanish during the backup: WAL replay repairs that).
struct PackReader {
    pieces: Vec<Piece>,
    next: usize,
    file: Option<File>,
    remaining: u64,
    read_in_piece: u64,
    start_in_pack: u64,
    pack_offset: u64,
    hasher: Option<digest::Context>,
    results: Arc<Mutex<Vec<PieceResult>>>,
    progress: Arc<AtomicU64>,
}

impl PackReader {
    fn finish_piece(&mut self) {
        let h = self.hasher.take().map(|h| h.finish());
        let mut sha = [0u8; 32];
        if let Some(h) = h {
            sha.copy_from_slice(h.as_ref());
        }
        if let Ok(mut r) = self.results.lock() {
            r.push(PieceResult {
                piece: self.next - 1,
                pack_offset: self.start_in_pack,
                length: self.read_in_piece,
                sha256: sha,
            });
        }
        self.file = None;
    }
}

impl Read for PackReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.file.is_none() {
                let Some(piece) = self.pieces.get(self.next) else {
                    return Ok(0);
                };
                self.next += 1;
                let mut f = match File::open(&piece.source) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // dropped meanwhile
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("{}: {e}", piece.source.display()),
                        ));
                    }
                };
                f.seek(SeekFrom::Start(piece.offset))?;
                self.remaining = piece.length;
                self.read_in_piece = 0;
                self.start_in_pack = self.pack_offset;
                self.hasher = Some(digest::Context::new(&digest::SHA256));
                self.file = Some(f);
                if self.remaining == 0 {
                    self.finish_piece();
                    continue;
                }
            }
            let want = (buf.len() as u64).min(self.remaining) as usize;
            let n = match self.file.as_mut() {
                Some(f) => f.read(&mut buf[..want])?,
                None => 0,
            };
            if n == 0 {
                self.finish_piece(); // shorter than when listed
                continue;
            }
            if let Some(h) = self.hasher.as_mut() {
                h.update(&buf[..n]);
            }
            self.remaining -= n as u64;
            self.read_in_piece += n as u64;
            self.pack_offset += n as u64;
            self.progress.fetch_add(n as u64, Ordering::Relaxed);
            if self.remaining == 0 {
                self.finish_piece();
            }
            return Ok(n);
        }
    }
}

/// What one pack transfer produced.
struct PackDone {
    pack_id: u32,
    pieces: Vec<Piece>,
    results: Vec<PieceResult>,
    original: u64,
    stored: u64,
}

impl PackReader {
    fn new(
        pieces: Vec<Piece>,
        results: Arc<Mutex<Vec<PieceResult>>>,
        progress: Arc<AtomicU64>,
    ) -> PackReader {
        PackReader {
            pieces,
            next: 0,
            file: None,
            remaining: 0,
            read_in_piece: 0,
            start_in_pack: 0,
            pack_offset: 0,
            hasher: None,
            results,
            progress,
        }
    }
}

/// Groups pieces into packs: small files share packs up to PACK_TARGET bytes, large files are
/// cut into PACK_TARGET pieces, one pack each.
fn plan_packs(files: &[(PathBuf, u64)]) -> Vec<Vec<Piece>> {
    let mut packs = Vec::new();
    let mut current: Vec<Piece> = Vec::new();
    let mut current_bytes = 0u64;
    for (i, (source, size)) in files.iter().enumerate() {
        if *size > PACK_TARGET {
            let mut off = 0;
            while off < *size {
                let len = (*size - off).min(PACK_TARGET);
                packs.push(vec![Piece {
                    file: i,
                    source: source.clone(),
                    offset: off,
                    length: len,
                }]);
                off += len;
            }
            continue;
        }
        if *size == 0 {
            continue; // recorded in the manifest without extents
        }
        if current_bytes + size > PACK_TARGET || current.len() >= PACK_MAX_FILES {
            packs.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(Piece {
            file: i,
            source: source.clone(),
            offset: 0,
            length: *size,
        });
        current_bytes += size;
    }
    if !current.is_empty() {
        packs.push(current);
    }
    packs
}

/// What `backup` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupOutcome {
    pub id: String,
    pub label: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_time: chrono::DateTime<chrono::Utc>,
    pub stop_time: chrono::DateTime<chrono::Utc>,
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
    let client = pg::conn::connect(conninfo.expose_secret())
        .await
        .map_err(Error::Postgres)?;
    let id = pg::conn::identify(&client).await.map_err(Error::Postgres)?;
    let repo_sysid = info.system_identifier()?;
    if id.system_identifier != repo_sysid {
        return Err(Error::Repository(format!(
            "cluster {} at its connection is PostgreSQL system {}, but its repository is for system {repo_sysid}: \
             another cluster's repository",
            cluster.name, id.system_identifier
        )));
    }
    let local_sysid = pg::control::read_system_identifier(&pgdata)
        .map_err(|e| Error::InvalidInput(format!("{}/global/pg_control: {e}", pgdata.display())))?;
    if local_sysid != repo_sysid {
        return Err(Error::Usage(format!(
            "pgdata {} belongs to system {local_sysid}, not to the server at the connection ({repo_sysid})",
            pgdata.display()
        )));
    }

    // The backup lock lives in the primary; a standby's lock would not exclude a backup
    // running on the primary (and standby backups need another WAL-switch strategy).
    let standby: bool = client
        .query_one("select pg_is_in_recovery()", &[])
        .await
        .map_err(|e| Error::Postgres(format!("pg_is_in_recovery: {e}")))?
        .get(0);
    if standby {
        return Err(Error::Usage(format!(
            "the server at clusters.{}.connection is a standby: backups are taken from the primary",
            cluster.name
        )));
    }
    // Refused at once, naming the holder, when the lease says a backup runs (on this host or
    // another); the advisory lock below is what makes two at once impossible.
    match lease::check(&cluster.repo, lease::BACKUP).await {
        Ok(()) => {}
        Err(LeaseError::Held(h)) => {
            client.close().await;
            return Err(Error::Busy(format!(
                "another backup of cluster {} is running: {}; try again later",
                cluster.name,
                h.describe()
            )));
        }
        Err(LeaseError::Store(e)) => {
            client.close().await;
            return Err(e.into());
        }
    }
    let run = Run {
        cluster,
        opts,
        info,
        keyring,
        started,
        client: &client,
        pgdata: &pgdata,
        id: &id,
    };
    let result = backup_leased(&run, id_out).await;
    // Ends the backup session (and its lock) cleanly; a failed backup's session ending also
    // ends PostgreSQL's backup mode.
    client.close().await;
    result
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
    pgdata: &'a std::path::Path,
    id: &'a pg::conn::ServerIdentity,
}

async fn backup_leased(run: &Run<'_>, id_out: &mut Option<String>) -> Result<BackupOutcome, Error> {
    let (cluster, client) = (run.cluster, run.client);
    let locked: bool = client
        .query_one("select pg_try_advisory_lock($1)", &[&BACKUP_LOCK_KEY])
        .await
        .map_err(|e| Error::Postgres(format!("taking the backup lock: {e}")))?
        .get(0);
    if !locked {
        return Err(Error::Busy(format!(
            "another backup of cluster {} is running (it holds the advisory lock in the cluster); try again later",
            cluster.name
        )));
    }
    // Holding the lock: the lease is ours to write (released before the session ends, so the
    // next holder of the lock never finds a live record of this one).
    let lease = lease::take(&cluster.repo, lease::BACKUP, cluster.lease_ttl)
        .await
        .map_err(|e| match e {
            LeaseError::Store(e) => Error::Store(e),
            LeaseError::Held(h) => Error::Busy(h.describe()),
        })?;
    let result = backup_with_lock(run, id_out).await;
    lease.release().await;
    result
}

async fn backup_with_lock(
    run: &Run<'_>,
    id_out: &mut Option<String>,
) -> Result<BackupOutcome, Error> {
    let &Run {
        cluster,
        opts,
        info,
        keyring,
        started,
        client,
        pgdata,
        id,
    } = run;
    let removed_incomplete = remove_incomplete(&cluster.repo).await?;
    let backup_id = new_backup_id(&cluster.repo, &removed_incomplete).await?;
    *id_out = Some(backup_id.clone());
    let label = opts
        .label
        .clone()
        .unwrap_or_else(|| format!("tidemark {backup_id}"));
    // Mark the backup as started before anything else of it exists, so whatever a crash
    // leaves (even only temporary files) is found and removed by the next run.
    let started_marker = serde_json::json!({
        "id": backup_id,
        "host": crate::host::hostname(),
        "pid": std::process::id(),
        "started": chrono::Utc::now(),
    });
    cluster
        .repo
        .store()
        .put_bytes(
            &cluster.repo.key(&format!("backups/{backup_id}/started")),
            bytes::Bytes::from(started_marker.to_string()),
        )
        .await?;

    let start_sql = if id.version_num >= 150000 {
        "select pg_backup_start($1, true)::text, clock_timestamp()"
    } else {
        "select pg_start_backup($1, true, false)::text, clock_timestamp()"
    };
    let row = client
        .query_one(start_sql, &[&label])
        .await
        .map_err(|e| Error::Postgres(format!("pg_backup_start: {e}")))?;
    let start_lsn: Lsn = row.get::<_, String>(0).parse().map_err(Error::Postgres)?;
    let start_time: chrono::DateTime<chrono::Utc> = row.get(1);
    tracing::info!(backup = %backup_id, start_lsn = %start_lsn, "backup started");

    let copy = copy_and_finish(
        cluster,
        info,
        keyring,
        client,
        pgdata,
        &backup_id,
        &label,
        start_lsn,
        start_time,
        id.version_num,
        opts,
        started,
    );
    // Until the manifest is being written the backup can stop at any await: dropping the copy
    // aborts its uploads (nothing uncommitted becomes visible) and what was committed is
    // removed below. The manifest itself is not interrupted: it is one small object.
    let result = match &opts.cancel {
        Some(cancel) => tokio::select! {
            r = copy => r,
            _ = cancel.cancelled() => Err(Error::Interrupted(format!(
                "backup {backup_id} of cluster {} interrupted; nothing of it was kept",
                cluster.name
            ))),
        },
        None => copy.await,
    };
    let result = match result {
        Ok(manifest) => write_manifest(cluster, info, keyring, manifest).await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        // Best effort: the next backup or expire removes whatever this leaves.
        let _ = delete_backup_objects(&cluster.repo, &backup_id).await;
    }
    let mut outcome = result?;
    outcome.removed_incomplete = removed_incomplete;
    Ok(outcome)
}

#[allow(clippy::too_many_arguments)]
async fn copy_and_finish(
    cluster: &ClusterHandle,
    info: &ClusterInfo,
    keyring: &Arc<Keyring>,
    client: &tokio_postgres::Client,
    pgdata: &std::path::Path,
    backup_id: &str,
    label: &str,
    start_lsn: Lsn,
    start_time: chrono::DateTime<chrono::Utc>,
    version_num: u32,
    opts: &BackupOptions,
    started: Instant,
) -> Result<BackupManifest, Error> {
    let root = pgdata.to_path_buf();
    let (entries, tablespaces) = tokio::task::spawn_blocking(move || files::scan(&root))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::LocalIo(format!("listing the data directory: {e}")))?;
    let mut directories = Vec::new();
    let mut file_list: Vec<(String, PathBuf, u64, u32)> = Vec::new();
    for e in entries {
        match e.kind {
            EntryKind::Dir => directories.push(DirEntry {
                path: e.path,
                mode: e.mode,
            }),
            EntryKind::File { size } => file_list.push((e.path, e.source, size, e.mode)),
        }
    }
    // The configuration the server reads from outside the data directory (Debian's
    // /etc/postgresql/...) goes into the same packs, after the data files.
    let discovered = pg::conffiles::discover(client, pgdata).await;
    let (config_list, mut config_missing) = stat_config_files(&discovered);
    let total: u64 =
        file_list.iter().map(|f| f.2).sum::<u64>() + config_list.iter().map(|f| f.1).sum::<u64>();
    let packs = plan_packs(
        &file_list
            .iter()
            .map(|f| (f.1.clone(), f.2))
            .chain(config_list.iter().map(|f| (f.0.clone(), f.1)))
            .collect::<Vec<_>>(),
    );
    tracing::info!(
        files = file_list.len(),
        bytes = total,
        packs = packs.len(),
        "copying"
    );

    let progress = Progress::start("backup", total);
    let jobs = packs.into_iter().enumerate().map(|(pack_id, pieces)| {
        let pack_id = pack_id as u32;
        let store = cluster.repo.store().clone();
        let obj = cluster
            .repo
            .object(info, BackupManifest::pack_name(backup_id, pack_id));
        let keyring = keyring.clone();
        let encode = cluster.encode;
        let counter = progress.counter();
        async move {
            let piece_results = Arc::new(Mutex::new(Vec::new()));
            let reader = PackReader::new(pieces.clone(), piece_results.clone(), counter);
            let stats = transfer::put(&store, &obj, &keyring, encode, reader).await?;
            let results = piece_results
                .lock()
                .map_err(|_| Error::Internal("a pack reader panicked".into()))?
                .clone();
            Ok(PackDone {
                pack_id,
                pieces,
                results,
                original: stats.original_bytes,
                stored: stats.stored_bytes,
            })
        }
    });
    let done = run_bounded(jobs, opts.parallelism).await;
    progress.finish().await;
    let done = done?;

    let stop_sql = if version_num >= 150000 {
        "select lsn::text, labelfile, spcmapfile, clock_timestamp() from pg_backup_stop(false)"
    } else {
        "select lsn::text, labelfile, spcmapfile, clock_timestamp() from pg_stop_backup(false, false)"
    };
    let row = client
        .query_one(stop_sql, &[])
        .await
        .map_err(|e| Error::Postgres(format!("pg_backup_stop: {e}")))?;
    let stop_lsn: Lsn = row.get::<_, String>(0).parse().map_err(Error::Postgres)?;
    let backup_label: String = row.get(1);
    let tablespace_map: Option<String> = row.get(2);
    let stop_time: chrono::DateTime<chrono::Utc> = row.get(3);
    let timeline = parse_start_timeline(&backup_label)?;
    tracing::info!(stop_lsn = %stop_lsn, "backup stopped; waiting for its WAL to be archived");

    let seg_size = info.wal_segment_size;
    let first_seg = segment_of(start_lsn, seg_size);
    let last_seg = segment_of(Lsn(stop_lsn.0.saturating_sub(1).max(start_lsn.0)), seg_size);
    // Row counts at a restore point after the backup's end; its WAL must be archived too.
    let counts = if cluster.config.drill.count_tables.is_empty() {
        None
    } else {
        count_rows(cluster, client, backup_id).await
    };
    let wait_to = match &counts {
        Some((_, lsn)) => last_seg.max(segment_of(*lsn, seg_size)),
        None => last_seg,
    };
    wait_for_wal(
        &cluster.repo,
        timeline,
        first_seg,
        wait_to,
        seg_size,
        opts.wal_timeout,
    )
    .await?;
    if let Some((c, _)) = &counts {
        let json = serde_json::to_vec(c).map_err(|e| Error::Internal(e.to_string()))?;
        let obj = cluster.repo.object(info, RowCounts::object_name(backup_id));
        transfer::put(
            cluster.repo.store(),
            &obj,
            keyring,
            cluster.encode,
            io::Cursor::new(json),
        )
        .await?;
    }

    // Assemble the manifest from what was actually read.
    let mut extents: Vec<Vec<Extent>> = vec![Vec::new(); file_list.len() + config_list.len()];
    let mut pack_entries = Vec::new();
    let mut stored_bytes = 0;
    for PackDone {
        pack_id,
        pieces,
        results: piece_results,
        original,
        stored,
    } in done
    {
        stored_bytes += stored;
        pack_entries.push(PackEntry {
            id: pack_id,
            original_bytes: original,
            stored_bytes: stored,
        });
        for r in piece_results {
            let piece = &pieces[r.piece];
            if r.length == 0 {
                continue;
            }
            extents[piece.file].push(Extent {
                pack: pack_id,
                pack_offset: r.pack_offset,
                file_offset: piece.offset,
                length: r.length,
                sha256: hex::encode(r.sha256),
            });
        }
    }
    pack_entries.sort_by_key(|p| p.id);
    let mut files_out = Vec::with_capacity(file_list.len());
    let mut original_bytes = 0;
    let config_extents = extents.split_off(file_list.len());
    for ((path, _, listed_size, mode), ext) in file_list.into_iter().zip(extents) {
        let Some((size, ext)) = contiguous_prefix(ext, listed_size) else {
            continue; // vanished during the backup
        };
        original_bytes += size;
        files_out.push(FileEntry {
            path,
            size,
            mode,
            extents: ext,
        });
    }
    let mut config_files = Vec::new();
    for ((source, listed_size, mode, role), ext) in config_list.into_iter().zip(config_extents) {
        let Some((size, ext)) = contiguous_prefix(ext, listed_size) else {
            config_missing.push(format!("{}: vanished during the backup", source.display()));
            continue;
        };
        original_bytes += size;
        config_files.push(ConfigFileEntry {
            source: source.display().to_string(),
            role: role.as_str().to_string(),
            size,
            mode,
            extents: ext,
        });
    }
    for m in &config_missing {
        tracing::warn!("configuration not recorded: {m}");
    }
    let configuration = ServerConfiguration {
        data_directory: discovered.data_directory.clone(),
        config_file: discovered.config_file.clone(),
        hba_file: discovered.hba_file.clone(),
        ident_file: discovered.ident_file.clone(),
        files: config_files,
        directories: discovered
            .dirs
            .iter()
            .map(|d| ConfigDirEntry {
                source: d.display().to_string(),
                mode: std::fs::metadata(d)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                    .unwrap_or(0o755),
            })
            .collect(),
        settings: discovered
            .settings
            .iter()
            .map(|(name, value, source)| SettingEntry {
                name: name.clone(),
                value: value.clone(),
                source: source.clone(),
            })
            .collect(),
        missing: config_missing,
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    let manifest = BackupManifest {
        format: MANIFEST_FORMAT,
        id: backup_id.to_string(),
        label: label.to_string(),
        cluster: cluster.name.clone(),
        system_identifier: info.system_identifier.clone(),
        pg_version_num: version_num,
        timeline,
        start_lsn: start_lsn.to_string(),
        stop_lsn: stop_lsn.to_string(),
        start_time,
        stop_time,
        wal_start: segment_name(timeline, first_seg, seg_size),
        wal_stop: segment_name(timeline, last_seg, seg_size),
        backup_label,
        tablespace_map,
        tablespaces: tablespaces
            .iter()
            .map(|t| TablespaceEntry {
                oid: t.oid,
                location: t.location.display().to_string(),
            })
            .collect(),
        directories,
        files: files_out,
        packs: pack_entries,
        original_bytes,
        stored_bytes,
        duration_ms,
        tidemark_version: env!("CARGO_PKG_VERSION").to_string(),
        configuration: Some(configuration),
    };
    Ok(manifest)
}

/// The extents of a file as read, up to the first hole, and the size they cover; None when
/// nothing of a non-empty file was read (it vanished).
///
/// A file that shrank while its pieces were read in parallel can leave a hole (a short piece
/// followed by a full one read earlier). Keep the prefix up to the first hole: the file was
/// that long at some moment of the backup, and WAL replay (from the backup's checkpoint, with
/// full-page writes) rebuilds what follows. The manifest's extents then always cover 0..size
/// exactly.
fn contiguous_prefix(mut ext: Vec<Extent>, listed_size: u64) -> Option<(u64, Vec<Extent>)> {
    ext.sort_by_key(|e| e.file_offset);
    let mut end = 0;
    let contiguous = ext
        .iter()
        .take_while(|e| {
            let ok = e.file_offset == end;
            end = e.file_offset + e.length;
            ok
        })
        .count();
    ext.truncate(contiguous);
    if listed_size > 0 && ext.is_empty() {
        return None;
    }
    let size = ext
        .iter()
        .map(|e| e.file_offset + e.length)
        .max()
        .unwrap_or(0);
    Some((size, ext))
}

/// Size and mode of each discovered configuration file; what cannot be read is reported, not
/// fatal (the data directory is the backup; its configuration is a convenience of restore).
#[allow(clippy::type_complexity)]
fn stat_config_files(
    d: &pg::conffiles::Discovered,
) -> (Vec<(PathBuf, u64, u32, pg::conffiles::Role)>, Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let mut files = Vec::new();
    let mut missing = d.missing.clone();
    for (p, role) in &d.files {
        match std::fs::metadata(p) {
            Ok(m) if !m.is_file() => missing.push(format!("{}: not a regular file", p.display())),
            Ok(m) if m.len() > pg::conffiles::MAX_CONFIG_FILE => missing.push(format!(
                "{}: {} bytes, too large for a configuration file",
                p.display(),
                m.len()
            )),
            // Readable by this process? The copy opens it later; an unreadable file would
            // fail the whole backup there.
            Ok(m) => match File::open(p) {
                Ok(_) => files.push((p.clone(), m.len(), m.permissions().mode() & 0o7777, *role)),
                Err(e) => missing.push(format!("{}: {e}", p.display())),
            },
            Err(e) => missing.push(format!("{}: {e}", p.display())),
        }
    }
    (files, missing)
}

/// Writes the manifest, last: from then on the backup exists.
async fn write_manifest(
    cluster: &ClusterHandle,
    info: &ClusterInfo,
    keyring: &Arc<Keyring>,
    manifest: BackupManifest,
) -> Result<BackupOutcome, Error> {
    let json = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    let obj = cluster
        .repo
        .object(info, BackupManifest::manifest_name(&manifest.id));
    transfer::put(
        cluster.repo.store(),
        &obj,
        keyring,
        cluster.encode,
        io::Cursor::new(json),
    )
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

fn parse_start_timeline(label: &str) -> Result<u32, Error> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::Postgres("backup_label has no START TIMELINE line".into()))
}

/// Counts the rows of `[clusters.NAME.drill] count_tables` as of a restore point of their own
/// (see `RowCounts` for why the counts are exact), then switches WAL so the point gets archived.
/// Returns None (with a warning) when the tables cannot be locked in time or do not exist:
/// counts are evidence for drills, never a reason to lose a backup.
async fn count_rows(
    cluster: &ClusterHandle,
    client: &tokio_postgres::Client,
    backup_id: &str,
) -> Option<(RowCounts, Lsn)> {
    let cfg = &cluster.config.drill;
    let point = RowCounts::restore_point_name(backup_id);
    let result: Result<(RowCounts, Lsn), String> = async {
        let q = |e: tokio_postgres::Error| e.to_string();
        client.batch_execute("begin").await.map_err(q)?;
        client
            .batch_execute(&format!(
                "set local lock_timeout = {}",
                cfg.count_lock_timeout.as_millis().max(1)
            ))
            .await
            .map_err(q)?;
        let mut tables = Vec::new();
        for t in &cfg.count_tables {
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
                    .map_err(q)?;
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
        // Completes the segment holding the point, so it is archived with the backup.
        client
            .batch_execute("select pg_switch_wal()")
            .await
            .map_err(q)?;
        Ok((
            RowCounts {
                format: 1,
                backup: backup_id.to_string(),
                restore_point: point.clone(),
                lsn: lsn.to_string(),
                time,
                database,
                tables: counts,
            },
            lsn,
        ))
    }
    .await;
    match result {
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

/// Waits until segments first..=last of `timeline` are archived.
async fn wait_for_wal(
    repo: &Repository,
    timeline: u32,
    first: u64,
    last: u64,
    seg_size: u64,
    timeout: Duration,
) -> Result<(), Error> {
    let t = Instant::now();
    let dir = repo.key(&format!("wal/{timeline:08X}/"));
    // List only names sharing the first and last segment's common prefix, not the whole
    // archive of the timeline (which grows to many thousands of objects).
    let (a, b) = (
        segment_name(timeline, first, seg_size),
        segment_name(timeline, last, seg_size),
    );
    let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let prefix = format!("{dir}{}", &a[..common]);
    loop {
        let have: std::collections::HashSet<String> = repo
            .store()
            .list(&prefix)
            .await?
            .into_iter()
            .map(|m| m.key[dir.len()..].to_string())
            .collect();
        let missing: Vec<String> = (first..=last)
            .map(|s| segment_name(timeline, s, seg_size))
            .filter(|n| !have.contains(n))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(Error::Wal(format!(
                "the backup's WAL was not archived within {timeout:?}: missing {} (first missing {}); \
                 check archive_command and pg_stat_archiver",
                missing.len(),
                missing[0]
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Backup ids sort by time: `YYYYMMDDTHHMMSSZ`, with a suffix if that second is taken (or was
/// the id of a leftover just removed: an id is never reused).
async fn new_backup_id(repo: &Repository, avoid: &[String]) -> Result<String, Error> {
    let base = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    for n in 0..100 {
        let id = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if avoid.contains(&id) {
            continue;
        }
        if repo
            .store()
            .list(&repo.key(&format!("backups/{id}/")))
            .await?
            .is_empty()
        {
            return Ok(id);
        }
    }
    Err(Error::Internal("could not find a free backup id".into()))
}

/// Deletes every backup directory that has no manifest. Only safe while holding the backup
/// lock (no backup can be in progress).
pub async fn remove_incomplete(repo: &Repository) -> Result<Vec<String>, Error> {
    let prefix = repo.key("backups/");
    // Every backup directory holds a `started` marker from its first moment on.
    let mut by_id: std::collections::BTreeMap<String, (bool, Vec<String>)> = Default::default();
    for m in repo.store().list(&prefix).await? {
        let rel = &m.key[prefix.len()..];
        let Some((id, rest)) = rel.split_once('/') else {
            continue;
        };
        let e = by_id.entry(id.to_string()).or_default();
        if rest == "manifest" {
            e.0 = true;
        }
        e.1.push(m.key.clone());
    }
    let mut removed = Vec::new();
    for (id, (has_manifest, _)) in by_id {
        if has_manifest {
            continue;
        }
        delete_backup_objects(repo, &id).await?;
        tracing::info!(backup = %id, "removed leftovers of an incomplete backup");
        removed.push(id);
    }
    Ok(removed)
}

async fn delete_backup_objects(repo: &Repository, id: &str) -> Result<(), Error> {
    repo.store()
        .remove_prefix(&repo.key(&format!("backups/{id}/")))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_group_small_files_and_cut_large_ones() {
        let files = vec![
            (PathBuf::from("a"), 10),
            (PathBuf::from("b"), 0),
            (PathBuf::from("c"), PACK_TARGET * 2 + 5),
            (PathBuf::from("d"), PACK_TARGET - 5),
            (PathBuf::from("e"), 20),
        ];
        let packs = plan_packs(&files);
        let shape: Vec<Vec<(usize, u64, u64)>> = packs
            .iter()
            .map(|p| p.iter().map(|x| (x.file, x.offset, x.length)).collect())
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![(2, 0, PACK_TARGET)],
                vec![(2, PACK_TARGET, PACK_TARGET)],
                vec![(2, 2 * PACK_TARGET, 5)],
                // a pack never exceeds the target: d does not fit beside a, e not beside d
                vec![(0, 0, 10)],
                vec![(3, 0, PACK_TARGET - 5)],
                vec![(4, 0, 20)],
            ]
        );
    }

    #[test]
    fn pack_reader_records_short_and_vanished_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"hello").unwrap();
        std::fs::write(d.path().join("c"), b"xy").unwrap();
        let pieces = vec![
            Piece {
                file: 0,
                source: d.path().join("a"),
                offset: 0,
                length: 5,
            },
            Piece {
                file: 1,
                source: d.path().join("gone"),
                offset: 0,
                length: 9,
            },
            Piece {
                file: 2,
                source: d.path().join("c"),
                offset: 0,
                length: 4,
            }, // shrank
        ];
        let results = Arc::new(Mutex::new(Vec::new()));
        let mut r = PackReader::new(pieces, results.clone(), Arc::new(AtomicU64::new(0)));
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"helloxy");
        let res = results.lock().unwrap().clone();
        let got: Vec<(usize, u64, u64)> = res
            .iter()
            .map(|x| (x.piece, x.pack_offset, x.length))
            .collect();
        assert_eq!(got, vec![(0, 0, 5), (2, 5, 2)]);
        assert_eq!(
            hex::encode(res[1].sha256),
            hex::encode(digest::digest(&digest::SHA256, b"xy"))
        );
    }
}

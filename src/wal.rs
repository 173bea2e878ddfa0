//! `wal-push`, `wal-fetch` and `wal-list`: PostgreSQL's archive_command and restore_command.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::audit::{Event, Outcome};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::pg::control::{LONG_PAGE_HEADER_LEN, parse_segment_header, read_system_identifier};
use crate::pg::wal::{WalFileKind, WalFileName};
use crate::pipeline::EncodeOptions;
use crate::repo::walindex::{WalSummary, summarise};
use crate::repo::{ClusterInfo, RepoError, has_segment_header, layout};
use crate::store::StoreError;
use crate::transfer;

#[derive(Debug, Clone, serde::Serialize)]
pub struct PushOutcome {
    pub name: String,
    /// False when an identical copy was already archived.
    pub uploaded: bool,
    pub original_bytes: u64,
    pub stored_bytes: u64,
    pub millis: u64,
}

/// Archives one WAL file. Returns only once the object is durably stored (or an identical copy
/// already was); any doubt is an error, so PostgreSQL keeps the file and retries.
pub async fn wal_push(cluster: &ClusterHandle, path: &Path) -> Result<PushOutcome, Error> {
    let started = Instant::now();
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::InvalidInput(format!("{}: not a WAL file name", path.display())))?;
    let wal = WalFileName::parse(file_name).ok_or_else(|| {
        Error::InvalidInput(format!(
            "{}: not a WAL file (expected a segment, .partial, .backup or .history name)",
            path.display()
        ))
    })?;
    let mut file = File::open(path)
        .map_err(|e| Error::InvalidInput(format!("{}: cannot open: {e}", path.display())))?;
    let size = file
        .metadata()
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?
        .len();

    let info = cluster.repo.read_info().await?;
    check_belongs(cluster, &info, &wal, path, &mut file, size)?;
    let keyring = cluster.keyring(&info).await?;
    let obj = cluster.repo.object(&info, layout::wal(&wal));

    if cluster.repo.exists(&obj.name).await? {
        // PostgreSQL retries a file whose archiving it could not confirm (e.g. after a crash):
        // the same content is success, different content must never overwrite the archive.
        let local = File::open(path)
            .map_err(|e| Error::InvalidInput(format!("{}: cannot open: {e}", path.display())))?;
        let cmp = Comparator::new(local);
        let (stats, cmp) = cluster.repo.get_object(&obj, &keyring, false, cmp).await?;
        if cmp.finish()? {
            // The earlier push may have died between its rename and its directory fsync.
            cluster.repo.ensure_durable(&obj.name).await?;
            tracing::info!(file = %wal.name, "already archived with identical content");
            return Ok(PushOutcome {
                name: wal.name,
                uploaded: false,
                original_bytes: size,
                stored_bytes: stats.stored_bytes,
                millis: started.elapsed().as_millis() as u64,
            });
        }
        return Err(Error::Conflict(format!(
            "{} is already archived as {} with different content; refusing to overwrite \
             (two clusters archiving into one repository, or a damaged pg_wal)",
            wal.name, obj.key
        )));
    }

    let src = File::open(path)
        .map_err(|e| Error::InvalidInput(format!("{}: cannot open: {e}", path.display())))?;
    // One segment at a time and PostgreSQL waits for it: compress it on every core.
    let encode = EncodeOptions {
        zstd_workers: wal_push_workers(),
        ..cluster.encode
    };
    let stats = cluster.repo.put_object(&obj, &keyring, encode, src).await?;
    if stats.original_bytes != size {
        // The file changed under us; what was stored may not be what PostgreSQL meant.
        return Err(Error::InvalidInput(format!(
            "{}: size changed while archiving ({size} -> {} bytes)",
            path.display(),
            stats.original_bytes
        )));
    }
    let millis = started.elapsed().as_millis() as u64;
    tracing::info!(
        file = %wal.name,
        bytes = stats.original_bytes,
        stored = stats.stored_bytes,
        ms = millis,
        "archived"
    );
    Ok(PushOutcome {
        name: wal.name,
        uploaded: true,
        original_bytes: stats.original_bytes,
        stored_bytes: stats.stored_bytes,
        millis,
    })
}

fn wal_push_workers() -> u32 {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cores > 1 { cores.min(4) as u32 } else { 0 }
}

/// Refuses files that do not belong in this repository.
fn check_belongs(
    cluster: &ClusterHandle,
    info: &ClusterInfo,
    wal: &WalFileName,
    path: &Path,
    file: &mut File,
    size: u64,
) -> Result<(), Error> {
    let repo_sysid = info.system_identifier()?;
    let other = |found: u64| {
        Error::Repository(format!(
            "{} belongs to PostgreSQL system {found}, but the repository of cluster {} in {} \
             is for system {repo_sysid}: refusing to mix clusters",
            path.display(),
            cluster.name,
            cluster.repo.describe()
        ))
    };
    if has_segment_header(wal.kind) {
        let mut head = [0u8; LONG_PAGE_HEADER_LEN];
        file.read_exact(&mut head).map_err(|e| {
            Error::InvalidInput(format!("{}: not a WAL segment: {e}", path.display()))
        })?;
        let h = parse_segment_header(&head)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
        if h.system_identifier != repo_sysid {
            return Err(other(h.system_identifier));
        }
        if u64::from(h.segment_size) != info.wal_segment_size {
            return Err(Error::Repository(format!(
                "{}: segment size {} differs from the repository's {}",
                path.display(),
                h.segment_size,
                info.wal_segment_size
            )));
        }
        let segno = wal.segment_no(info.wal_segment_size).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: impossible segment name for {}-byte segments",
                path.display(),
                info.wal_segment_size
            ))
        })?;
        if h.page_address.0 != segno * info.wal_segment_size {
            return Err(Error::InvalidInput(format!(
                "{}: its first page is at {}, not where its name puts it",
                path.display(),
                h.page_address
            )));
        }
        if wal.kind == WalFileKind::Segment && size != info.wal_segment_size {
            return Err(Error::InvalidInput(format!(
                "{}: {size} bytes, a complete segment has {}",
                path.display(),
                info.wal_segment_size
            )));
        }
    } else {
        // History and backup-history files carry no system identifier: check the data
        // directory they come from.
        let pgdata = cluster.config.pgdata.as_ref().ok_or_else(|| {
            Error::Usage(format!(
                "clusters.{}.pgdata is required to archive {} (its system identifier is checked)",
                cluster.name, wal.name
            ))
        })?;
        let found = read_system_identifier(pgdata).map_err(|e| {
            Error::InvalidInput(format!("{}/global/pg_control: {e}", pgdata.display()))
        })?;
        if found != repo_sysid {
            return Err(other(found));
        }
    }
    Ok(())
}

/// A `Write` that compares what is written with a local file.
struct Comparator {
    file: io::BufReader<File>,
    equal: bool,
    buf: Vec<u8>,
}

impl Comparator {
    fn new(file: File) -> Comparator {
        Comparator {
            file: io::BufReader::with_capacity(256 * 1024, file),
            equal: true,
            buf: Vec::new(),
        }
    }

    /// True when everything written matched and the file has nothing more.
    fn finish(mut self) -> Result<bool, Error> {
        let mut one = [0u8; 1];
        let more = self
            .file
            .read(&mut one)
            .map_err(|e| Error::LocalIo(e.to_string()))?;
        Ok(self.equal && more == 0)
    }
}

impl Write for Comparator {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.equal {
            self.buf.resize(data.len(), 0);
            let mut got = 0;
            while got < data.len() {
                match self.file.read(&mut self.buf[got..])? {
                    0 => break,
                    n => got += n,
                }
            }
            if got < data.len() || self.buf[..] != data[..] {
                self.equal = false;
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchOutcome {
    pub name: String,
    pub bytes: u64,
    pub millis: u64,
}

/// Restores one archived WAL file to `dest`, atomically: the bytes go to a temporary file in
/// the same directory, every chunk authenticated before it is written, and only a complete,
/// authenticated file is fsynced and renamed to `dest`.
pub async fn wal_fetch(
    cluster: &ClusterHandle,
    name: &str,
    dest: &Path,
) -> Result<FetchOutcome, Error> {
    let started = Instant::now();
    let wal = WalFileName::parse(name)
        .ok_or_else(|| Error::InvalidInput(format!("{name:?} is not a WAL file name")))?;
    let info = cluster.repo.read_info().await?;
    let obj = cluster.repo.object(&info, layout::wal(&wal));
    // Probe before loading keys: PostgreSQL asks for many files that do not exist, and those
    // answers should be quick and quiet.
    if !cluster.repo.exists(&obj.name).await? {
        return Err(Error::NotFound(format!("{name}: not in the repository")));
    }
    let keyring = cluster.keyring(&info).await?;
    // Every WAL file handed to a recovering server is an access to the client's data.
    let result = fetch_to(cluster, &info, &keyring, &wal, &obj, dest, started).await;
    if !matches!(result, Err(Error::NotFound(_))) {
        let event = Event::new("wal_fetch", Outcome::Ok)
            .object(obj.name.clone())
            .outcome_of(&result);
        crate::audit::record(cluster, &info, &keyring, event).await;
    }
    result
}

async fn fetch_to(
    cluster: &ClusterHandle,
    info: &ClusterInfo,
    keyring: &std::sync::Arc<crate::pipeline::Keyring>,
    wal: &WalFileName,
    obj: &transfer::ObjectRef,
    dest: &Path,
    started: Instant,
) -> Result<FetchOutcome, Error> {
    let name = wal.name.as_str();
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut rnd = [0u8; 6];
    crate::pipeline::keys::random_bytes(&mut rnd)?;
    let tmp = dir.join(format!(".{name}.tidemark.{}", hex::encode(rnd)));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", tmp.display())))?;
    let guard = TempFile(Some(tmp.clone()));
    let out = io::BufWriter::with_capacity(256 * 1024, file);
    let (stats, out) = match cluster.repo.get_object(obj, keyring, false, out).await {
        Ok(r) => r,
        Err(RepoError::Store(StoreError::NotFound { .. })) => {
            return Err(Error::NotFound(format!("{name}: not in the repository")));
        }
        Err(e) => return Err(e.into()),
    };
    let file = out
        .into_inner()
        .map_err(|e| Error::LocalIo(format!("{}: {}", tmp.display(), e.error())))?;
    if wal.kind == WalFileKind::Segment && stats.original_bytes != info.wal_segment_size {
        return Err(Error::Integrity(format!(
            "{}: holds {} bytes, a segment has {}",
            obj.key, stats.original_bytes, info.wal_segment_size
        )));
    }
    file.sync_all()
        .map_err(|e| Error::LocalIo(format!("{}: {e}", tmp.display())))?;
    drop(file);
    std::fs::rename(&tmp, dest).map_err(|e| Error::LocalIo(format!("{}: {e}", dest.display())))?;
    guard.disarm();
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::LocalIo(format!("fsync {}: {e}", dir.display())))?;
    let millis = started.elapsed().as_millis() as u64;
    tracing::info!(
        file = name,
        bytes = stats.original_bytes,
        ms = millis,
        "fetched"
    );
    Ok(FetchOutcome {
        name: name.to_string(),
        bytes: stats.original_bytes,
        millis,
    })
}

/// Removes a temporary file unless disarmed.
struct TempFile(Option<PathBuf>);
impl TempFile {
    fn disarm(mut self) {
        self.0 = None;
    }
}
impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What the archive holds.
pub async fn wal_list(cluster: &ClusterHandle) -> Result<WalSummary, Error> {
    let info = cluster.repo.read_info().await?;
    let (files, strays) = cluster.repo.list_wal().await?;
    Ok(summarise(&files, strays, info.wal_segment_size))
}

// wal-push as archive_command runs it, with this host's counters. One block, appended whole.

/// [`wal_push`], then its outcome (and how long it took) added to the cluster's wal-push
/// counters in the state directory (`state::WalPushStats`), which the daemon's metrics and
/// archive_failing alert read. Failing to record them is logged, never a reason to fail
/// archiving: the result is `wal_push`'s.
pub async fn wal_push_counted(cluster: &ClusterHandle, path: &Path) -> Result<PushOutcome, Error> {
    use crate::state::{PushRecord, WalPushStats};
    let t = Instant::now();
    let result = wal_push(cluster, path).await;
    let seconds = t.elapsed().as_secs_f64();
    let message = result
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let rec = match &result {
        Ok(o) => PushRecord::Pushed {
            file: &o.name,
            original_bytes: o.original_bytes,
            stored_bytes: o.stored_bytes,
            seconds,
        },
        Err(e) => PushRecord::Failed {
            error: &message,
            code: e.exit_code(),
            seconds,
        },
    };
    if let Err(e) = WalPushStats::record(&cluster.state_dir, &cluster.name, rec) {
        tracing::warn!(state_dir = %cluster.state_dir.display(), error = %e, "wal-push counters not recorded");
    }
    result
}

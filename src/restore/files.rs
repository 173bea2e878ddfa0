//! The restored files on disk: the destination directories checked and prepared, every
//! directory and file of the manifest created at its size and mode, the packs downloaded into
//! them (`pack`), and all of it made durable; or, when a restore fails, removed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::pack::{self, ExtentsByPack};
use super::plan::RestorePlan;
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::repo::manifest::{BackupManifest, Extent};

pub(super) fn prepare_target(pgdata: &Path, force: bool) -> Result<(), Error> {
    match std::fs::read_dir(pgdata) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                if !force {
                    return Err(Error::Usage(format!(
                        "{} is not empty: restore into an empty or new directory (or pass --force to replace its contents)",
                        pgdata.display()
                    )));
                }
                if pgdata.join("postmaster.pid").exists() {
                    return Err(Error::Usage(format!(
                        "{} has a postmaster.pid: stop the server first; --force does not replace a running cluster",
                        pgdata.display()
                    )));
                }
                clear_dir(pgdata);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(pgdata)
                .map_err(|e| Error::LocalIo(format!("{}: {e}", pgdata.display())))?;
        }
        Err(e) => return Err(Error::LocalIo(format!("{}: {e}", pgdata.display()))),
    }
    std::fs::set_permissions(pgdata, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::LocalIo(format!("{}: {e}", pgdata.display())))
}

/// `--config-dir` must be new or empty (or `--force`), and not inside the data directory.
pub(super) fn prepare_config_dir(dir: &Path, pgdata: &Path, force: bool) -> Result<(), Error> {
    let abs = std::path::absolute(dir).unwrap_or(dir.to_path_buf());
    let data = std::path::absolute(pgdata).unwrap_or(pgdata.to_path_buf());
    if crate::pg::conffiles::is_within(&abs, &data) || crate::pg::conffiles::is_within(&data, &abs)
    {
        return Err(Error::Usage(format!(
            "--config-dir {} and --pgdata {} must not contain each other",
            dir.display(),
            pgdata.display()
        )));
    }
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                if !force {
                    return Err(Error::Usage(format!(
                        "--config-dir {} is not empty: give a new or empty directory (or --force to replace its contents)",
                        dir.display()
                    )));
                }
                refuse_live_config_dir(dir)?;
                clear_dir(dir);
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(dir)
            .map_err(|e| Error::LocalIo(format!("{}: {e}", dir.display()))),
        Err(e) => Err(Error::LocalIo(format!("{}: {e}", dir.display()))),
    }
}

/// `--force` never wipes the configuration of a running cluster (a mistyped
/// /etc/postgresql/15/main): refused when the directory's postgresql.conf names a data
/// directory whose postmaster is alive.
fn refuse_live_config_dir(dir: &Path) -> Result<(), Error> {
    let conf = dir.join("postgresql.conf");
    let Ok(text) = crate::pg::conffiles::read_small(&conf) else {
        return Ok(());
    };
    let data = crate::pg::conffiles::parse_conf(&text)
        .into_iter()
        .rfind(|l| l.name == "data_directory")
        .map(|l| crate::pg::conffiles::resolve(&conf, &l.value));
    match data {
        Some(d) if super::server::postmaster_running(&d) => Err(Error::Usage(format!(
            "--config-dir {} is the configuration of the running cluster at {}: stop it first; \
             --force does not replace a running cluster's configuration",
            dir.display(),
            d.display()
        ))),
        _ => Ok(()),
    }
}

/// Removes the contents of a directory we restored into (not the directory itself).
fn clear_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// After a failure: empties everything the plan restores into, so nothing half-restored can
/// be started.
pub(super) fn remove_restored(plan: &RestorePlan) {
    clear_dir(&plan.pgdata);
    if let Some(d) = &plan.config_dir {
        clear_dir(d);
    }
    for t in &plan.tablespaces {
        clear_dir(&t.path);
    }
}

/// The data directory and the tablespaces' directories.
pub(super) fn data_roots(plan: &RestorePlan) -> Vec<PathBuf> {
    let mut roots = vec![plan.pgdata.clone()];
    roots.extend(plan.tablespaces.iter().map(|t| t.path.clone()));
    roots
}

/// Maps a manifest path to where it goes: tablespace contents under their (remapped) location.
struct PathMap {
    pgdata: PathBuf,
    tablespaces: HashMap<u32, PathBuf>,
}

impl PathMap {
    fn new(plan: &RestorePlan) -> PathMap {
        PathMap {
            pgdata: plan.pgdata.clone(),
            tablespaces: plan
                .tablespaces
                .iter()
                .map(|t| (t.oid, t.path.clone()))
                .collect(),
        }
    }

    fn resolve(&self, path: &str) -> PathBuf {
        if let Some(rest) = path.strip_prefix("pg_tblspc/") {
            let (oid, sub) = rest.split_once('/').unwrap_or((rest, ""));
            if let Some(loc) = oid
                .parse::<u32>()
                .ok()
                .and_then(|o| self.tablespaces.get(&o))
            {
                return if sub.is_empty() {
                    loc.clone()
                } else {
                    loc.join(sub)
                };
            }
        }
        self.pgdata.join(path)
    }
}

/// Creates, downloads and verifies every file of the plan's backup, and syncs them. Returns
/// the number of files and the bytes restored.
pub(super) async fn restore_files(
    cluster: &ClusterHandle,
    info: &crate::repo::ClusterInfo,
    keyring: &Arc<crate::pipeline::Keyring>,
    plan: &RestorePlan,
) -> Result<(usize, u64), Error> {
    let backup = &plan.manifest;
    let map = PathMap::new(plan);
    let phase = Instant::now();
    // Directories (tablespace locations must be empty or new), then every file at its size.
    prepare_tablespaces(plan)?;
    create_directories(backup, &map, &plan.pgdata)?;
    let mut work = ExtentsByPack::default();
    create_files(backup, &map, &mut work)?;
    stage_configuration(backup, &plan.pgdata, &mut work)?;
    let total = work.total;
    tracing::debug!(
        ms = phase.elapsed().as_millis() as u64,
        "created directories and files"
    );
    let phase = Instant::now();
    pack::download(cluster, info, keyring, backup, work, plan.parallelism).await?;
    tracing::debug!(
        ms = phase.elapsed().as_millis() as u64,
        "downloaded and verified"
    );
    // Durability of the restored tree before it is handed to PostgreSQL.
    let phase = Instant::now();
    sync_dirs(data_roots(plan)).await?;
    tracing::debug!(ms = phase.elapsed().as_millis() as u64, "synced");
    Ok((backup.files.len(), total))
}

fn prepare_tablespaces(plan: &RestorePlan) -> Result<(), Error> {
    for t in plan.tablespaces.iter().map(|t| &t.path) {
        if let Ok(mut rd) = std::fs::read_dir(t)
            && rd.next().is_some()
            && !plan.force
        {
            return Err(Error::Usage(format!(
                "tablespace location {} is not empty: map it elsewhere with --tablespace-map OLD=NEW",
                t.display()
            )));
        }
        std::fs::create_dir_all(t).map_err(|e| Error::LocalIo(format!("{}: {e}", t.display())))?;
        std::fs::set_permissions(t, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::LocalIo(format!("{}: {e}", t.display())))?;
    }
    Ok(())
}

fn create_directories(backup: &BackupManifest, map: &PathMap, pgdata: &Path) -> Result<(), Error> {
    for d in &backup.directories {
        if let Some(oid) = d
            .path
            .strip_prefix("pg_tblspc/")
            .filter(|r| !r.contains('/'))
        {
            // The link itself: pg_tblspc/<oid> -> location.
            if let Some(loc) = oid
                .parse::<u32>()
                .ok()
                .and_then(|o| map.tablespaces.get(&o))
            {
                let link = pgdata.join(&d.path);
                std::os::unix::fs::symlink(loc, &link)
                    .map_err(|e| Error::LocalIo(format!("{}: {e}", link.display())))?;
                continue;
            }
        }
        let p = map.resolve(&d.path);
        std::fs::create_dir_all(&p).map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(dir_mode(d.mode)))
            .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
    }
    Ok(())
}

fn create_files(
    backup: &BackupManifest,
    map: &PathMap,
    work: &mut ExtentsByPack,
) -> Result<(), Error> {
    for f in &backup.files {
        let p = map.resolve(&f.path);
        create_sized(&p, f.size)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(file_mode(f.mode)))
            .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
        check_covered(backup, &f.path, f.size, &f.extents)?;
        work.add(&f.path, &p, &f.extents);
    }
    Ok(())
}

/// The configuration from outside the data directory: staged inside it, verified like every
/// file, placed by `config::place` afterwards.
fn stage_configuration(
    backup: &BackupManifest,
    pgdata: &Path,
    work: &mut ExtentsByPack,
) -> Result<(), Error> {
    let Some(conf) = &backup.configuration else {
        return Ok(());
    };
    let staging = pgdata.join(super::config::STAGING);
    if !conf.files.is_empty() {
        std::fs::create_dir(&staging)
            .map_err(|e| Error::LocalIo(format!("{}: {e}", staging.display())))?;
    }
    for (i, f) in conf.files.iter().enumerate() {
        let p = super::config::staging_path(pgdata, i);
        create_sized(&p, f.size)?;
        check_covered(backup, &f.source, f.size, &f.extents)?;
        work.add(&f.source, &p, &f.extents);
    }
    Ok(())
}

/// A new file of `size` bytes (sparse until its extents arrive).
fn create_sized(p: &Path, size: u64) -> Result<(), Error> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))?;
    file.set_len(size)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", p.display())))
}

/// The manifest's extents of a file must cover it exactly.
fn check_covered(
    backup: &BackupManifest,
    name: &str,
    size: u64,
    extents: &[Extent],
) -> Result<(), Error> {
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    if covered != size {
        return Err(Error::Integrity(format!(
            "manifest of backup {}: extents of {name} cover {covered} of {size} bytes",
            backup.id
        )));
    }
    Ok(())
}

fn dir_mode(m: u32) -> u32 {
    if m & 0o050 == 0o050 { 0o750 } else { 0o700 }
}

fn file_mode(m: u32) -> u32 {
    if m & 0o040 != 0 { 0o640 } else { 0o600 }
}

/// Makes everything written under `roots` durable, on a blocking thread.
pub(super) async fn sync_dirs(roots: Vec<PathBuf>) -> Result<(), Error> {
    tokio::task::spawn_blocking(move || roots.iter().try_for_each(|r| sync_filesystem(r)))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| Error::LocalIo(format!("syncing the restored files: {e}")))
}

/// Makes everything written under `dir` durable: one syncfs(2) of its filesystem (what
/// PostgreSQL's recovery_init_sync_method = syncfs does), or, where syncfs fails, an fsync of
/// every file and directory.
fn sync_filesystem(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = File::open(dir)?;
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open for the call.
    let rc = unsafe { libc::syncfs(d.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    tracing::debug!(error = %io::Error::last_os_error(), "syncfs failed; fsyncing file by file");
    sync_tree(dir)?;
    Ok(())
}

fn sync_tree(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            sync_tree(&e.path())?;
        } else if t.is_file() {
            File::open(e.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mistyped --config-dir naming a live cluster's configuration is refused under --force,
    /// and nothing in it is removed.
    #[test]
    fn force_never_wipes_a_running_clusters_config() {
        let t = tempfile::tempdir().unwrap();
        let (live, conf, target) = (
            t.path().join("live"),
            t.path().join("etc"),
            t.path().join("new"),
        );
        std::fs::create_dir_all(&live).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        // This test process stands in for the postmaster: its pid is alive.
        std::fs::write(
            live.join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let text = format!("data_directory = '{}'\n", live.display());
        std::fs::write(conf.join("postgresql.conf"), &text).unwrap();
        let e = prepare_config_dir(&conf, &target, true).unwrap_err();
        assert!(e.to_string().contains("running cluster"), "{e}");
        assert_eq!(
            std::fs::read_to_string(conf.join("postgresql.conf")).unwrap(),
            text
        );
        // Stopped: --force replaces it.
        std::fs::remove_file(live.join("postmaster.pid")).unwrap();
        prepare_config_dir(&conf, &target, true).unwrap();
        assert!(!conf.join("postgresql.conf").exists());
    }
}

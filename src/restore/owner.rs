//! Who owns the restored copy. Run as root, restore gives the files to the server's user
//! (`--owner`, else postgres), and first checks that this user can run the restore_command:
//! otherwise every wal-fetch would fail and PostgreSQL would end recovery early, quietly.

use std::io;
use std::path::{Path, PathBuf};

use super::RestoreOptions;
use super::plan::RestorePlan;
use crate::error::Error;

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

pub(crate) fn effective_owner(opts: &RestoreOptions) -> Option<String> {
    match &opts.owner {
        Some(o) => Some(o.clone()),
        None if is_root() => Some("postgres".into()),
        None => None,
    }
}

pub(crate) fn user_ids(user: &str) -> Result<(u32, u32), Error> {
    let out = std::process::Command::new("id")
        .arg("-u")
        .arg(user)
        .output()
        .map_err(|e| Error::LocalIo(format!("id: {e}")))?;
    let gout = std::process::Command::new("id")
        .arg("-g")
        .arg(user)
        .output()
        .map_err(|e| Error::LocalIo(format!("id: {e}")))?;
    if !out.status.success() || !gout.status.success() {
        return Err(Error::Usage(format!("--owner {user}: no such OS user")));
    }
    let parse = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).trim().parse::<u32>();
    match (parse(&out), parse(&gout)) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(Error::Usage(format!("--owner {user}: cannot read its ids"))),
    }
}

/// Gives the restored data directory, its tablespaces and the `--config-dir` to `owner`.
pub(super) fn chown_restored(plan: &RestorePlan, owner: &str) -> Result<(), Error> {
    let (uid, gid) = user_ids(owner)?;
    let mut dirs = vec![&plan.pgdata];
    dirs.extend(plan.tablespaces.iter().map(|t| &t.path));
    dirs.extend(plan.config_dir.iter());
    for d in dirs {
        chown_all(d, uid, gid)
            .map_err(|e| Error::LocalIo(format!("chown {}: {e}", d.display())))?;
    }
    Ok(())
}

/// lchown of a tree (symlinks themselves, never their targets).
fn chown_all(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(p)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_all(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The restored server runs restore_command as its owner. When that is another user (restore
/// run as root), check before downloading anything that this user can run tidemark with this
/// config and key.
pub(super) fn preflight_restore_command(plan: &RestorePlan) -> Result<(), Error> {
    let Some(owner) = &plan.owner else {
        return Ok(());
    };
    if !is_root() {
        return Ok(());
    }
    let (exe, config) = (&plan.restore_command.exe, &plan.restore_command.config);
    // Fetch the backup's first WAL segment as that user into a scratch directory it owns:
    // this exercises the binary, the config, the key file and the store.
    let (uid, gid) = user_ids(owner)?;
    let mut rnd = [0u8; 6];
    crate::pipeline::keys::random_bytes(&mut rnd)?;
    let scratch = std::env::temp_dir().join(format!("tidemark-preflight-{}", hex::encode(rnd)));
    std::fs::create_dir(&scratch)
        .map_err(|e| Error::LocalIo(format!("{}: {e}", scratch.display())))?;
    let _cleanup = ScratchDir(scratch.clone());
    std::os::unix::fs::chown(&scratch, Some(uid), Some(gid))
        .map_err(|e| Error::LocalIo(format!("{}: {e}", scratch.display())))?;
    let out = std::process::Command::new("runuser")
        .arg("-u")
        .arg(owner)
        .arg("--")
        .arg(exe)
        .arg("--config")
        .arg(config)
        .arg("--cluster")
        .arg(&plan.restore_command.cluster)
        .arg("wal-fetch")
        .arg(&plan.manifest.wal_start)
        .arg(scratch.join("probe"))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::LocalIo(format!("runuser: {e}")))?;
    match out.status.code() {
        Some(0) => Ok(()),
        _ => Err(Error::Usage(format!(
            "the restored server would run restore_command as {owner}, and as {owner} \
             `{} --config {} wal-fetch` fails: {} (make the binary, the config and the key file \
             readable by {owner}, or pass --owner)",
            exe.display(),
            config.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Removes a scratch directory when dropped.
struct ScratchDir(PathBuf);
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

//! A failed drill's server log is kept: on the drill's host (size-capped, the newest few) and,
//! encrypted, in the repository beside the drill's record.

use std::path::{Path, PathBuf};

use crate::cluster::ClusterHandle;

/// The drill server's log, in the scratch directory (outside its data directory).
pub(super) const SERVER_LOG: &str = "server.log";
/// A kept server log holds at most its last this many bytes.
const SERVER_LOG_CAP: usize = 1 << 20;
/// Failed drills' logs kept per cluster on the host.
const SERVER_LOGS_KEPT: usize = 20;

/// Copies a failed drill's server log (its last SERVER_LOG_CAP bytes) to
/// `<state_dir>/<cluster>/drills/<id>.log`, mode 0600, and prunes older ones. Returns the path
/// and the bytes kept.
pub(super) fn keep_server_log(
    cluster: &ClusterHandle,
    id: &str,
    log: &Path,
) -> Option<(PathBuf, Vec<u8>)> {
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

/// Stores the kept log in the repository as `drills/<id>.log`; returns that name, or None
/// (warned) when it could not be stored.
pub(super) async fn store_server_log(
    cluster: &ClusterHandle,
    id: &str,
    bytes: Vec<u8>,
) -> Option<String> {
    let info = cluster.repo.read_info().await.ok()?;
    let keyring = cluster.keyring(&info).await.ok()?;
    let name = crate::repo::layout::drill_log(id);
    let obj = cluster.repo.object(&info, name.clone());
    match cluster
        .repo
        .put_object(&obj, &keyring, cluster.encode, std::io::Cursor::new(bytes))
        .await
    {
        Ok(_) => Some(name),
        Err(e) => {
            tracing::warn!(error = %e, "the drill's server log was not stored in the repository");
            None
        }
    }
}

//! This host's end of an audit chain: the local state directory part (chain id, head,
//! pending records) that makes a record durable before it is uploaded, and lets `verify`
//! notice the removal of this host's newest records.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ZERO_HASH, parse_file_name, sha256_hex};
use crate::cluster::ClusterHandle;
use crate::state::write_atomic;

/// The newest record of a chain: its seq and the SHA-256 of its stored bytes.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Head {
    pub seq: u64,
    pub hash: String,
}

/// This host's chain of one cluster's repository: `<state_dir>/<cluster>/audit/<repository
/// id>/`. Per repository, so a cluster moved to a new repository starts a new chain there
/// instead of continuing one whose beginning is elsewhere.
pub(super) struct LocalChain {
    pub dir: PathBuf,
}

impl LocalChain {
    pub(super) fn new(cluster: &ClusterHandle, repository_id: &str) -> LocalChain {
        LocalChain {
            dir: cluster
                .state_dir
                .join(&cluster.name)
                .join("audit")
                .join(repository_id),
        }
    }

    pub(super) fn pending_dir(&self) -> PathBuf {
        self.dir.join("pending")
    }

    /// The chain id, created on first use.
    pub(super) fn chain_id(&self) -> std::io::Result<String> {
        let p = self.dir.join("chain");
        match std::fs::read_to_string(&p) {
            Ok(s) if s.trim().len() == 16 => return Ok(s.trim().to_string()),
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{}: not a chain id",
                    p.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut b = [0u8; 8];
        crate::pipeline::keys::random_bytes(&mut b).map_err(std::io::Error::other)?;
        let id = hex::encode(b);
        write_atomic(&p, id.as_bytes(), true)?;
        Ok(id)
    }

    /// Pending records in sequence order: (file name, bytes).
    pub(super) fn pending(&self) -> std::io::Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(self.pending_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if parse_file_name(&name).is_some() {
                out.push((name, std::fs::read(e.path())?));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest record of the chain: the head file, or a pending record newer than it (a
    /// crash between writing the record and the head).
    pub(super) fn head(&self) -> std::io::Result<Head> {
        let mut head = match std::fs::read(self.dir.join("head")) {
            Ok(b) => serde_json::from_slice(&b).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Head {
                seq: 0,
                hash: ZERO_HASH.into(),
            },
            Err(e) => return Err(e),
        };
        for (name, bytes) in self.pending()? {
            if let Some((seq, _)) = parse_file_name(&name)
                && seq > head.seq
            {
                head = Head {
                    seq,
                    hash: sha256_hex(&bytes),
                };
            }
        }
        Ok(head)
    }
}

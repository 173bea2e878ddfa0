//! `tidemark init`: creates a cluster's repository.

use secrecy::ExposeSecret;

use crate::audit::{Event, Outcome};
use crate::cluster::ClusterHandle;
use crate::error::Error;
use crate::pg;
use crate::pipeline::Keyring;
use crate::pipeline::keys::random_bytes;
use crate::repo::{ClusterInfo, REPOSITORY_FORMAT};

#[derive(Debug, serde::Serialize)]
pub struct InitOutcome {
    pub created: bool,
    pub repository_id: String,
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub wal_segment_size: u64,
}

/// Records the cluster's identity and a fresh keyring in the repository.
///
/// Crash safety: the keyring is written before cluster.json, and only cluster.json marks the
/// repository initialised; a crash in between leaves a keyring that the next init replaces.
/// Running init again on an initialised repository of the same cluster checks the key and
/// succeeds without changing anything.
pub async fn init(cluster: &ClusterHandle) -> Result<InitOutcome, Error> {
    let conninfo = cluster.config.connection.as_ref().ok_or_else(|| {
        Error::Usage(format!(
            "clusters.{}.connection is required by init (tidemark asks the server for its identity)",
            cluster.name
        ))
    })?;
    let master = cluster.master_key()?;
    let client = pg::conn::connect(conninfo.expose_secret()).await?;
    let id = pg::conn::identify(&client).await?;

    if cluster.repo.is_initialised().await? {
        let info = cluster.repo.read_info().await?;
        if info.system_identifier()? != id.system_identifier {
            return Err(Error::Repository(format!(
                "repository {} of cluster {} is initialised for PostgreSQL system {}, but {} is system {}: \
                 another cluster's repository; use another cluster name",
                cluster.repo.describe(),
                cluster.name,
                info.system_identifier,
                cluster.name,
                id.system_identifier
            )));
        }
        cluster.keyring(&info).await?;
        client.close().await;
        return Ok(InitOutcome {
            created: false,
            repository_id: info.repository_id,
            system_identifier: info.system_identifier,
            pg_version_num: info.pg_version_num,
            wal_segment_size: info.wal_segment_size,
        });
    }

    let mut rid = [0u8; 16];
    random_bytes(&mut rid)?;
    let repository_id = hex::encode(rid);
    let (keyring, keyring_file) = Keyring::create(&master, &repository_id)?;
    cluster.repo.write_keyring(&keyring_file).await?;
    let info = ClusterInfo {
        format: REPOSITORY_FORMAT,
        repository_id: repository_id.clone(),
        cluster: cluster.name.clone(),
        system_identifier: id.system_identifier.to_string(),
        pg_version_num: id.version_num,
        wal_segment_size: id.wal_segment_size,
        created: chrono::Utc::now(),
        created_by: format!("tidemark {}", env!("CARGO_PKG_VERSION")),
    };
    cluster.repo.write_info(&info).await?;
    client.close().await;
    let event = Event::new("key_init", Outcome::Ok).detail(format!(
        "repository initialised: data key {} wrapped by master key {}",
        keyring_file.current, keyring_file.master_key_id
    ));
    crate::audit::record(cluster, &info, &keyring, event).await;
    Ok(InitOutcome {
        created: true,
        repository_id,
        system_identifier: info.system_identifier,
        pg_version_num: info.pg_version_num,
        wal_segment_size: info.wal_segment_size,
    })
}

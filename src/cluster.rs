//! A configured cluster opened for one command: its config, its repository, and (on demand)
//! its keys.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{AlertsConfig, ClusterConfig, Config, Retention};
use crate::error::Error;
use crate::pipeline::{EncodeOptions, Keyring, MasterKey};
use crate::repo::manifest::BackupManifest;
use crate::repo::window::{ArchiveIndex, BackupRange};
use crate::repo::{ClusterInfo, Repository};
use crate::store::{self, StoreOptions, s3::S3Settings};

/// The store's view of `[repository]`. Here rather than in config.rs because the layers
/// run the other way: config (the lowest) defines plain settings and knows no store types,
/// this module knows both.
impl Config {
    pub fn s3_settings(&self) -> S3Settings {
        S3Settings {
            endpoint: self.repository.endpoint.clone(),
            region: self.repository.region.clone(),
            force_path_style: self.repository.force_path_style,
            access_key_id: self.repository.access_key_id.clone(),
            secret_access_key: self.repository.secret_access_key.clone(),
            ca_file: self.repository.ca_file.clone(),
        }
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            retry_deadline: self.repository.retry_timeout,
            connect_timeout: self.repository.connect_timeout,
        }
    }
}

pub struct ClusterHandle {
    pub name: String,
    pub config: ClusterConfig,
    pub repo: Repository,
    pub encode: EncodeOptions,
    pub retention: Retention,
    pub alerts: AlertsConfig,
    /// This host's state directory (resolved: see `state::resolve_dir`).
    pub state_dir: PathBuf,
    pub lease_ttl: Duration,
}

impl ClusterHandle {
    /// Opens the store the config names for the chosen cluster (no request is made yet).
    pub async fn open(config: Config, cluster: Option<&str>) -> Result<ClusterHandle, Error> {
        let (name, _) = config.cluster(cluster).map_err(Error::Usage)?;
        let name = name.to_string();
        let store = store::from_url(
            &config.repository.url,
            &config.s3_settings(),
            &config.store_options(),
        )
        .await?;
        ClusterHandle::with_store(&config, &name, store)
    }

    /// The cluster `name` of `config` on an already opened store (the daemon shares one store
    /// between its clusters).
    pub fn with_store(
        config: &Config,
        name: &str,
        store: Arc<dyn store::Store>,
    ) -> Result<ClusterHandle, Error> {
        let cluster_config = config
            .clusters
            .get(name)
            .ok_or_else(|| Error::Usage(format!("cluster {name:?} is not in the config")))?
            .clone();
        let level = config.compression.level;
        Ok(ClusterHandle {
            repo: Repository::new(store, name),
            name: name.to_string(),
            retention: Retention::resolve(&config.retention, &cluster_config.retention),
            config: cluster_config,
            alerts: config.alerts.clone(),
            encode: EncodeOptions {
                zstd_level: (level > 0).then_some(level),
                ..EncodeOptions::default()
            },
            state_dir: crate::state::resolve_dir(config.state_dir.as_deref()),
            lease_ttl: config.repository.lease_ttl,
        })
    }

    pub fn master_key(&self) -> Result<MasterKey, Error> {
        Ok(MasterKey::load(&self.config.key_file)?)
    }

    /// Loads the master key and unwraps the repository's data keys.
    pub async fn keyring(&self, info: &ClusterInfo) -> Result<Arc<Keyring>, Error> {
        let master = self.master_key()?;
        let file = self.repo.read_keyring().await?;
        Ok(Arc::new(Keyring::open(
            &master,
            &info.repository_id,
            &file,
        )?))
    }
}

/// What the repository holds for restoring, resolved: backups, archive index, and each
/// backup's restorable range on each timeline it reaches.
pub struct Catalog {
    pub info: ClusterInfo,
    pub keyring: Arc<Keyring>,
    pub backups: Vec<BackupManifest>,
    pub index: ArchiveIndex,
    pub ranges: Vec<BackupRange>,
}

impl ClusterHandle {
    /// Loads the catalog `list` and `restore` work from (reads every manifest, lists the
    /// archive, and scans the last segments of each unbroken WAL run for their last commit).
    pub async fn catalog(&self) -> Result<Catalog, Error> {
        let info = self.repo.read_info().await?;
        let keyring = self.keyring(&info).await?;
        let backups = self.repo.load_manifests(&info, &keyring).await?;
        let index = self.repo.archive_index(&info, &keyring).await?;
        let mut ranges = index.all_ranges(&backups);
        self.repo
            .resolve_ranges(&info, &keyring, &mut ranges)
            .await?;
        Ok(Catalog {
            info,
            keyring,
            backups,
            index,
            ranges,
        })
    }
}

//! The server's configuration from outside the data directory (Debian's /etc/postgresql/...):
//! which files go into the backup's packs, after the data files, and the manifest's
//! `ServerConfiguration`. What cannot be read is reported, not fatal: the data directory is
//! the backup; its configuration is a convenience of restore.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::pg::conffiles::{self, Discovered, Role};
use crate::repo::manifest::{
    ConfigDirEntry, ConfigFileEntry, Extent, ServerConfiguration, SettingEntry,
};

use super::packs::contiguous_prefix;

/// A configuration file to copy, as it was listed.
pub(super) struct ConfigSource {
    pub source: PathBuf,
    pub size: u64,
    pub mode: u32,
    pub role: Role,
}

/// Size and mode of each discovered configuration file, and (one line each) what cannot be
/// copied: the discovery's own misses, and files that are not regular, too large or
/// unreadable.
pub(super) fn stat_config_files(d: &Discovered) -> (Vec<ConfigSource>, Vec<String>) {
    let mut files = Vec::new();
    let mut missing = d.missing.clone();
    for (p, role) in &d.files {
        match std::fs::metadata(p) {
            Ok(m) if !m.is_file() => missing.push(format!("{}: not a regular file", p.display())),
            Ok(m) if m.len() > conffiles::MAX_CONFIG_FILE => missing.push(format!(
                "{}: {} bytes, too large for a configuration file",
                p.display(),
                m.len()
            )),
            // Readable by this process? The copy opens it later; an unreadable file would
            // fail the whole backup there.
            Ok(m) => match File::open(p) {
                Ok(_) => files.push(ConfigSource {
                    source: p.clone(),
                    size: m.len(),
                    mode: m.permissions().mode() & 0o7777,
                    role: *role,
                }),
                Err(e) => missing.push(format!("{}: {e}", p.display())),
            },
            Err(e) => missing.push(format!("{}: {e}", p.display())),
        }
    }
    (files, missing)
}

/// The manifest's entries of the copied configuration files (one extent list per source, as
/// read), and their bytes; a file that vanished during the backup goes to `missing`.
pub(super) fn config_entries(
    sources: Vec<ConfigSource>,
    extents: Vec<Vec<Extent>>,
    missing: &mut Vec<String>,
) -> (Vec<ConfigFileEntry>, u64) {
    let mut entries = Vec::new();
    let mut bytes = 0;
    for (s, ext) in sources.into_iter().zip(extents) {
        let Some((size, ext)) = contiguous_prefix(ext, s.size) else {
            missing.push(format!(
                "{}: vanished during the backup",
                s.source.display()
            ));
            continue;
        };
        bytes += size;
        entries.push(ConfigFileEntry {
            source: s.source.display().to_string(),
            role: s.role.as_str().to_string(),
            size,
            mode: s.mode,
            extents: ext,
        });
    }
    (entries, bytes)
}

/// What the manifest records of the server's outside configuration.
pub(super) fn server_configuration(
    d: &Discovered,
    files: Vec<ConfigFileEntry>,
    missing: Vec<String>,
) -> ServerConfiguration {
    for m in &missing {
        tracing::warn!("configuration not recorded: {m}");
    }
    ServerConfiguration {
        data_directory: d.data_directory.clone(),
        config_file: d.config_file.clone(),
        hba_file: d.hba_file.clone(),
        ident_file: d.ident_file.clone(),
        files,
        directories: d
            .dirs
            .iter()
            .map(|dir| ConfigDirEntry {
                source: dir.display().to_string(),
                mode: std::fs::metadata(dir)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0o755),
            })
            .collect(),
        settings: d
            .settings
            .iter()
            .map(|(name, value, source)| SettingEntry {
                name: name.clone(),
                value: value.clone(),
                source: source.clone(),
            })
            .collect(),
        missing,
    }
}

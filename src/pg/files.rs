//! What a base backup copies from a data directory and its tablespaces.
//!
//! Follows PostgreSQL's documentation ("Backing Up the Data Directory" with the low-level API)
//! and what pg_basebackup skips: the contents of pg_wal, pg_replslot, pg_dynshmem, pg_notify,
//! pg_serial, pg_snapshots, pg_stat_tmp and pg_subtrans (the directories themselves are kept),
//! postmaster.pid/.opts, an old backup_label/tablespace_map/backup_manifest, pg_internal.init
//! relcache files and pgsql_tmp* temporary files. Sockets and other special files are skipped.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Directories whose contents are not copied (the directory itself is).
const EXCLUDE_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Files never copied, wherever they are (by exact name).
const EXCLUDE_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "backup_manifest",
    "recovery.signal",
    "standby.signal",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File { size: u64 },
}

/// One entry of the backup, by its path relative to the data directory. Tablespace contents
/// appear under `pg_tblspc/<oid>/...`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    /// Where to read it.
    pub source: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Tablespace {
    pub oid: u32,
    pub location: PathBuf,
}

/// Lists what to back up. Errors only on unreadable directories; files that vanish while
/// listing are skipped (PostgreSQL may drop relations during a backup; WAL replay handles it).
pub fn scan(pgdata: &Path) -> io::Result<(Vec<Entry>, Vec<Tablespace>)> {
    let mut entries = Vec::new();
    let mut tablespaces = Vec::new();
    walk(pgdata, "", &mut entries, &mut tablespaces, true)?;
    Ok((entries, tablespaces))
}

fn walk(
    dir: &Path,
    rel: &str,
    out: &mut Vec<Entry>,
    tablespaces: &mut Vec<Tablespace>,
    top: bool,
) -> io::Result<()> {
    let mut names: Vec<_> = match std::fs::read_dir(dir) {
        // A failing directory entry (EIO) fails the backup: it could be a relation file.
        Ok(rd) => rd
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !top => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    };
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            // PostgreSQL never creates non-UTF-8 names; someone else put this here.
            tracing::warn!(dir = %dir.display(), name = ?name, "skipping a file whose name is not UTF-8");
            continue;
        };
        let path = entry.path();
        let relpath = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        if EXCLUDE_FILES.contains(&name)
            || name.starts_with("pg_internal.init")
            || name.starts_with("pgsql_tmp")
        {
            continue;
        }
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        let ft = meta.file_type();
        // Tablespaces: pg_tblspc/<oid> is a symlink to the tablespace's location.
        if rel == "pg_tblspc" && (ft.is_symlink() || ft.is_dir()) {
            let Ok(oid) = name.parse::<u32>() else {
                continue;
            };
            let location = if ft.is_symlink() {
                std::fs::read_link(&path)?
            } else {
                path.clone() // an in-place tablespace (allow_in_place_tablespaces)
            };
            tablespaces.push(Tablespace {
                oid,
                location: location.clone(),
            });
            out.push(Entry {
                path: relpath.clone(),
                kind: EntryKind::Dir,
                mode: std::fs::metadata(&location)?.permissions().mode() & 0o7777,
                source: location.clone(),
            });
            walk(&location, &relpath, out, tablespaces, false)?;
            continue;
        }
        if ft.is_dir() {
            out.push(Entry {
                path: relpath.clone(),
                kind: EntryKind::Dir,
                mode: meta.mode() & 0o7777,
                source: path.clone(),
            });
            if top && EXCLUDE_CONTENTS.contains(&name) {
                if name == "pg_wal" {
                    // Recovery expects pg_wal/archive_status to exist.
                    out.push(Entry {
                        path: "pg_wal/archive_status".into(),
                        kind: EntryKind::Dir,
                        mode: meta.mode() & 0o7777,
                        source: path.join("archive_status"),
                    });
                }
                continue;
            }
            walk(&path, &relpath, out, tablespaces, false)?;
        } else if ft.is_file() {
            out.push(Entry {
                path: relpath,
                kind: EntryKind::File { size: meta.len() },
                mode: meta.mode() & 0o7777,
                source: path,
            });
        } else if ft.is_symlink() && top && (name == "pg_wal") {
            // pg_wal as a symlink (initdb --waldir): keep an empty directory.
            out.push(Entry {
                path: relpath.clone(),
                kind: EntryKind::Dir,
                mode: 0o700,
                source: path.clone(),
            });
            out.push(Entry {
                path: "pg_wal/archive_status".into(),
                kind: EntryKind::Dir,
                mode: 0o700,
                source: path.join("archive_status"),
            });
        }
        // Other symlinks, sockets and FIFOs are not part of a backup: say so, never skip
        // silently (a symlinked server.crt, say, must be restored by hand).
        else if !ft.is_dir() && !ft.is_file() {
            tracing::warn!(path = %path.display(), "skipping a symlink or special file (not backed up)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_what_postgresql_says_to_skip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in [
            "base/1",
            "global",
            "pg_wal/archive_status",
            "pg_stat_tmp",
            "pg_replslot/s1",
            "pg_tblspc",
        ] {
            std::fs::create_dir_all(p.join(dir)).unwrap();
        }
        for f in [
            "base/1/1259",
            "base/1/pg_internal.init",
            "base/1/pgsql_tmp123",
            "global/pg_control",
            "pg_wal/000000010000000000000001",
            "pg_stat_tmp/global.stat",
            "pg_replslot/s1/state",
            "postmaster.pid",
            "postgresql.conf",
            "backup_label",
        ] {
            std::fs::write(p.join(f), b"x").unwrap();
        }
        let ts = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ts.path().join("PG_15_1/5")).unwrap();
        std::fs::write(ts.path().join("PG_15_1/5/16400"), b"rel").unwrap();
        std::os::unix::fs::symlink(ts.path(), p.join("pg_tblspc/16399")).unwrap();

        let (entries, tablespaces) = scan(p).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "base",
                "base/1",
                "base/1/1259",
                "global",
                "global/pg_control",
                "pg_replslot",
                "pg_stat_tmp",
                "pg_tblspc",
                "pg_tblspc/16399",
                "pg_tblspc/16399/PG_15_1",
                "pg_tblspc/16399/PG_15_1/5",
                "pg_tblspc/16399/PG_15_1/5/16400",
                "pg_wal",
                "pg_wal/archive_status",
                "postgresql.conf",
            ]
        );
        assert_eq!(tablespaces.len(), 1);
        assert_eq!(tablespaces[0].oid, 16399);
        assert_eq!(tablespaces[0].location, ts.path());
    }
}

//! Every object name of a cluster's repository, one function per kind, and the parsers of
//! names a listing returns. Names are relative to the cluster's directory
//! (`Repository::key` puts the cluster in front); docs/format.md, section 1, is normative:
//!
//! ```text
//! cluster.json                     plain JSON: identity of the cluster (written last by init)
//! keys/keyring.json                plain JSON: data keys wrapped by the master key
//! wal/<TLI>/<walfile>              encrypted: WAL segments, .partial, .backup, .history files
//! backups/<id>/started             plain JSON: written first by a backup
//! backups/<id>/packs/NNNNNN        encrypted: file contents
//! backups/<id>/counts              encrypted: row counts for drills (before the manifest)
//! backups/<id>/manifest            encrypted: the manifest, written last
//! drills/<id>.json                 plain JSON: the record of a restore drill
//! drills/<id>.log                  encrypted: a failed drill's server log
//! check/probe-<random>             written and deleted at once by `tidemark check`
//! audit/<chain>/<seq>-<time>.json  plain JSON, authenticated: audit records
//! locks/<name>.json                plain JSON: leases (`locks/backup.json`)
//! ```

use crate::pg::wal::WalFileName;

/// `cluster.json`.
pub fn cluster_info() -> &'static str {
    "cluster.json"
}

/// `keys/keyring.json`.
pub fn keyring() -> &'static str {
    "keys/keyring.json"
}

/// `wal/`: the whole archive, every timeline.
pub fn wal_prefix() -> &'static str {
    "wal/"
}

/// `wal/<TLI>/`: the archive of one timeline.
pub fn wal_timeline(timeline: u32) -> String {
    format!("wal/{timeline:08X}/")
}

/// `wal/<TLI>/<name>`: an archived WAL file of that timeline (a history file lives under its
/// own timeline).
pub fn wal_file(timeline: u32, name: &str) -> String {
    format!("wal/{timeline:08X}/{name}")
}

/// `wal/<TLI>/<name>` of a parsed WAL file name.
pub fn wal(file: &WalFileName) -> String {
    wal_file(file.timeline, &file.name)
}

/// A name under `wal/` as (timeline directory, file name), e.g. `("00000001",
/// "000000010000000000000003")`; None for a name with no directory.
pub fn split_wal(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(wal_prefix())?.split_once('/')
}

/// `backups/`: every backup.
pub fn backups_prefix() -> &'static str {
    "backups/"
}

/// `backups/<id>/`: everything of one backup.
pub fn backup_prefix(backup_id: &str) -> String {
    format!("backups/{backup_id}/")
}

/// `backups/<id>/started`.
pub fn backup_started(backup_id: &str) -> String {
    format!("backups/{backup_id}/started")
}

/// `backups/<id>/packs/NNNNNN`.
pub fn pack(backup_id: &str, pack: u32) -> String {
    format!("backups/{backup_id}/packs/{pack:06}")
}

/// The last component of a manifest's name.
const MANIFEST: &str = "manifest";

/// `backups/<id>/manifest`.
pub fn manifest(backup_id: &str) -> String {
    format!("backups/{backup_id}/{MANIFEST}")
}

/// `backups/<id>/counts`.
pub fn counts(backup_id: &str) -> String {
    format!("backups/{backup_id}/counts")
}

/// A name under `backups/` as (backup id, the rest), e.g. `("20261127T114729Z",
/// "packs/000000")`.
pub fn split_backup(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(backups_prefix())?.split_once('/')
}

/// Whether `rest` (of `split_backup`) is the backup's manifest.
pub fn is_manifest(rest: &str) -> bool {
    rest == MANIFEST
}

/// `drills/`: every drill record and log.
pub fn drills_prefix() -> &'static str {
    "drills/"
}

/// `drills/<id>.json`.
pub fn drill_record(drill_id: &str) -> String {
    format!("drills/{drill_id}.json")
}

/// `drills/<id>.log`.
pub fn drill_log(drill_id: &str) -> String {
    format!("drills/{drill_id}.log")
}

/// `check/probe-<random>`.
pub fn check_probe(random: &str) -> String {
    format!("check/probe-{random}")
}

/// `audit/`: every audit chain.
pub fn audit_prefix() -> &'static str {
    "audit/"
}

/// `audit/<chain>/<file>` (`<file>` is `<seq>-<time>.json`, see `audit`).
pub fn audit_record(chain: &str, file: &str) -> String {
    format!("audit/{chain}/{file}")
}

/// A name under `audit/` as (chain, file name).
pub fn split_audit(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(audit_prefix())?.split_once('/')
}

/// `locks/<name>.json`: a lease.
pub fn lease(name: &str) -> String {
    format!("locks/{name}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names docs/format.md gives, so a change here is a format change.
    #[test]
    fn names_are_the_documented_ones() {
        let f = WalFileName::parse("0000000A.history").unwrap();
        assert_eq!(wal(&f), "wal/0000000A/0000000A.history");
        assert_eq!(wal_timeline(26), "wal/0000001A/");
        assert_eq!(
            wal_file(1, "000000010000000000000003"),
            "wal/00000001/000000010000000000000003"
        );
        let id = "20261127T114729Z";
        assert_eq!(backup_prefix(id), "backups/20261127T114729Z/");
        assert_eq!(backup_started(id), "backups/20261127T114729Z/started");
        assert_eq!(pack(id, 7), "backups/20261127T114729Z/packs/000007");
        assert_eq!(manifest(id), "backups/20261127T114729Z/manifest");
        assert_eq!(counts(id), "backups/20261127T114729Z/counts");
        assert_eq!(drill_record("d1"), "drills/d1.json");
        assert_eq!(drill_log("d1"), "drills/d1.log");
        assert_eq!(check_probe("ab12"), "check/probe-ab12");
        assert_eq!(audit_record("00ff", "x.json"), "audit/00ff/x.json");
        assert_eq!(lease("backup"), "locks/backup.json");
        assert_eq!(
            (cluster_info(), keyring()),
            ("cluster.json", "keys/keyring.json")
        );
    }

    #[test]
    fn names_split_back() {
        let name = manifest("b1");
        let (id, rest) = split_backup(&name).unwrap();
        assert_eq!(id, "b1");
        assert!(is_manifest(rest));
        assert_eq!(split_backup(&pack("b1", 0)), Some(("b1", "packs/000000")));
        assert_eq!(split_backup("backups/loose"), None);
        assert_eq!(
            split_wal("wal/00000001/000000010000000000000003"),
            Some(("00000001", "000000010000000000000003"))
        );
        assert_eq!(split_wal("wal/stray"), None);
        assert_eq!(
            split_audit(&audit_record("c", "000000000001-x.json")),
            Some(("c", "000000000001-x.json"))
        );
    }
}

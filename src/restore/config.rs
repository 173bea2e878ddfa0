//! Puts a backup's configuration where a restored cluster can use it, and reads the settings
//! the restored copy's files give (what a start then overrides is `restore::server`'s).
//!
//! Layout (docs/operations.md, "Debian and Ubuntu clusters"): the destination is the restored
//! data directory, or `--config-dir`. The original `config_file` becomes
//! `<dest>/postgresql.conf`; files that were under its directory keep their relative place
//! (`conf.d/x.conf`, `pg_hba.conf`); anything else goes to
//! `<dest>/tidemark-config/<original absolute path>`. Debian's start.conf, pg_ctl.conf and
//! environment go beside postgresql.conf only in a `--config-dir` (pg_ctlcluster reads them;
//! in a data directory they would only confuse), else under tidemark-config/.
//!
//! Then every file of the graph is rewritten where it points elsewhere than the restored
//! copies: `data_directory` (always: a copy started with the original value would run on the
//! ORIGINAL data directory), `hba_file`, `ident_file`, `include*` and hba `@file`. The old line
//! stays as a comment; the new one says where the file came from.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::pg::conffiles::{self, Graph, Role, Source, normalize, quote_conf, resolve};
use crate::repo::manifest::{BackupManifest, ServerConfiguration};

/// Where restore stages the configuration files' bytes (verified like every file) before they
/// are placed; removed afterwards.
pub const STAGING: &str = ".tidemark-config-staging";
/// Files that belong nowhere in particular.
pub const ELSEWHERE: &str = "tidemark-config";
/// Suffix of a data directory's own copy of a file that the backed-up server did not use.
pub const UNUSED_SUFFIX: &str = ".tidemark-unused";

/// What restore did with the configuration, and what the restore host lacks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigReport {
    /// The backup recorded the server's configuration.
    pub held: bool,
    /// The postgresql.conf the restored server is to read (None: none is there).
    pub config_file: Option<String>,
    /// `--config-dir`, when given.
    pub config_dir: Option<String>,
    pub placed: Vec<PlacedFile>,
    /// Settings and directives changed, each a line naming the file.
    pub rewritten: Vec<String>,
    /// Settings naming paths this host lacks, and includes that cannot be found.
    pub missing: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlacedFile {
    pub source: String,
    pub role: String,
    pub path: String,
}

pub fn staging_path(pgdata: &Path, index: usize) -> PathBuf {
    pgdata.join(STAGING).join(index.to_string())
}

/// Names of a data directory that a configuration file must never take.
fn reserved_in_pgdata(first: &str) -> bool {
    matches!(
        first,
        "base"
            | "global"
            | "PG_VERSION"
            | "postgresql.auto.conf"
            | "postmaster.pid"
            | "postmaster.opts"
            | "backup_label"
            | "tablespace_map"
            | "recovery.signal"
            | "standby.signal"
            | "current_logfiles"
            | ELSEWHERE
            | STAGING
    ) || (first.starts_with("pg_") && !first.ends_with(".conf"))
}

/// The mapping from original paths to restored ones.
struct Layout {
    files: BTreeMap<PathBuf, PathBuf>,
    dirs: BTreeMap<PathBuf, PathBuf>,
    orig_data: Option<PathBuf>,
    pgdata: PathBuf,
}

impl Layout {
    fn plan(conf: &ServerConfiguration, pgdata: &Path, config_dir: Option<&Path>) -> Layout {
        let dest = config_dir.unwrap_or(pgdata);
        let in_pgdata = config_dir.is_none();
        let config_file = normalize(Path::new(&conf.config_file));
        let root = config_file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let elsewhere = |src: &Path| {
            dest.join(ELSEWHERE)
                .join(src.strip_prefix("/").unwrap_or(src))
        };
        let place = |src: &Path, role: Option<Role>| -> PathBuf {
            if *src == config_file {
                return dest.join("postgresql.conf");
            }
            if role == Some(Role::PgCtlcluster) && in_pgdata {
                return elsewhere(src);
            }
            match src.strip_prefix(&root) {
                Ok(rel) if !rel.as_os_str().is_empty() => {
                    let first = rel
                        .components()
                        .next()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if in_pgdata && reserved_in_pgdata(&first) {
                        elsewhere(src)
                    } else {
                        dest.join(rel)
                    }
                }
                _ => elsewhere(src),
            }
        };
        let mut files = BTreeMap::new();
        for f in &conf.files {
            let src = normalize(Path::new(&f.source));
            let role = role_of(&f.role);
            files.insert(src.clone(), place(&src, Some(role)));
        }
        let mut dirs = BTreeMap::new();
        for d in &conf.directories {
            let src = normalize(Path::new(&d.source));
            dirs.insert(src.clone(), place(&src, None));
        }
        Layout {
            files,
            dirs,
            orig_data: (!conf.data_directory.is_empty())
                .then(|| normalize(Path::new(&conf.data_directory))),
            pgdata: pgdata.to_path_buf(),
        }
    }

    /// Where an original path is after the restore (None: not restored by us).
    fn map(&self, orig: &Path) -> Option<PathBuf> {
        if let Some(p) = self.files.get(orig).or_else(|| self.dirs.get(orig)) {
            return Some(p.clone());
        }
        // Inside the original data directory: restored with the data files.
        if let Some(d) = &self.orig_data
            && let Ok(rel) = orig.strip_prefix(d)
        {
            return Some(self.pgdata.join(rel));
        }
        None
    }
}

fn role_of(s: &str) -> Role {
    match s {
        "config_file" => Role::ConfigFile,
        "hba_file" => Role::HbaFile,
        "ident_file" => Role::IdentFile,
        "hba_include" => Role::HbaInclude,
        "pg_ctlcluster" => Role::PgCtlcluster,
        _ => Role::Include,
    }
}

/// Reads original paths through the layout (the restored copies), falling back to the path
/// itself on this host.
struct Restored<'a>(&'a Layout);

impl Source for Restored<'_> {
    fn read(&self, orig: &Path) -> std::io::Result<String> {
        conffiles::read_small(&self.0.map(orig).unwrap_or_else(|| orig.to_path_buf()))
    }
    fn list_dir(&self, orig: &Path) -> std::io::Result<Vec<PathBuf>> {
        match self.0.map(orig) {
            Some(new) => Ok(conffiles::include_dir_files(&new)?
                .into_iter()
                .filter_map(|f| f.file_name().map(|n| orig.join(n)))
                .collect()),
            None => conffiles::include_dir_files(orig),
        }
    }
}

/// Places the staged configuration files of `backup` and rewrites their paths.
pub fn place(
    backup: &BackupManifest,
    pgdata: &Path,
    config_dir: Option<&Path>,
) -> Result<ConfigReport, Error> {
    let mut report = ConfigReport {
        config_dir: config_dir.map(|d| d.display().to_string()),
        ..Default::default()
    };
    let Some(conf) = &backup.configuration else {
        report_unrecorded(backup, pgdata, config_dir, &mut report);
        return Ok(report);
    };
    report.held = true;
    for m in &conf.missing {
        report
            .notes
            .push(format!("not recorded when the backup ran: {m}"));
    }
    let layout = Layout::plan(conf, pgdata, config_dir);
    place_files(conf, &layout, pgdata, config_dir, &mut report)?;

    // Rewrite what points elsewhere, following the graph as the server will.
    let config_orig = normalize(Path::new(&conf.config_file));
    let Some(config_new) = layout.map(&config_orig) else {
        report.missing.push(format!(
            "config_file {}: neither in the backup nor inside the data directory",
            conf.config_file
        ));
        return Ok(report);
    };
    rewrite_graph(backup, &layout, &config_orig, &mut report)?;
    for s in conf.settings.iter().filter(|s| s.source == "command line") {
        report.notes.push(format!(
            "{} = {} was set on the original server's command line (pg_ctl options, pg_ctl.conf), \
             not in a file: the restored copy does not get it",
            s.name,
            quote_conf(&s.value)
        ));
    }
    report.config_file = Some(config_new.display().to_string());
    report_settings(pgdata, &config_new, backup, &mut report);
    Ok(report)
}

/// A backup without a recorded configuration: what the restored data directory lacks.
fn report_unrecorded(
    backup: &BackupManifest,
    pgdata: &Path,
    config_dir: Option<&Path>,
    report: &mut ConfigReport,
) {
    report.notes.push(format!(
        "backup {} does not record the server's configuration (taken by an older tidemark): \
         if the cluster keeps postgresql.conf, pg_hba.conf or included files outside its data \
         directory, put them in place by hand",
        backup.id
    ));
    missing_main_files(pgdata, report);
    if let Some(d) = config_dir {
        report.notes.push(format!(
            "--config-dir {}: nothing to write there, the backup holds no configuration",
            d.display()
        ));
    }
    report_settings(pgdata, &pgdata.join("postgresql.conf"), backup, report);
}

/// Moves the staged files to their places in the layout (directories first: include_dirs
/// are read even when empty), setting a data directory's own unused copies aside.
fn place_files(
    conf: &ServerConfiguration,
    layout: &Layout,
    pgdata: &Path,
    config_dir: Option<&Path>,
    report: &mut ConfigReport,
) -> Result<(), Error> {
    let io = |p: &Path, e: std::io::Error| Error::LocalIo(format!("{}: {e}", p.display()));
    if let Some(d) = config_dir {
        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
    }
    for (d, dest) in &layout.dirs {
        let mode = conf
            .directories
            .iter()
            .find(|x| normalize(Path::new(&x.source)) == *d)
            .map(|x| x.mode)
            .unwrap_or(0o700);
        std::fs::create_dir_all(dest).map_err(|e| io(dest, e))?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(dir_mode(mode)))
            .map_err(|e| io(dest, e))?;
    }
    for (i, f) in conf.files.iter().enumerate() {
        let src = normalize(Path::new(&f.source));
        let Some(dest) = layout.files.get(&src) else {
            continue;
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        if std::fs::symlink_metadata(dest).is_ok() {
            // The data directory's own copy (Debian's initdb leaves none; a moved-out
            // postgresql.conf often stays behind): the server did not read it.
            let aside = PathBuf::from(format!("{}{UNUSED_SUFFIX}", dest.display()));
            std::fs::rename(dest, &aside).map_err(|e| io(dest, e))?;
            report.notes.push(format!(
                "{} from the data directory was not the file the server used: kept as {}",
                dest.display(),
                aside.display()
            ));
        }
        let staged = staging_path(pgdata, i);
        std::fs::rename(&staged, dest).map_err(|e| io(&staged, e))?;
        std::fs::set_permissions(
            dest,
            std::fs::Permissions::from_mode(f.mode & 0o7777 | 0o600),
        )
        .map_err(|e| io(dest, e))?;
        report.placed.push(PlacedFile {
            source: f.source.clone(),
            role: f.role.clone(),
            path: dest.display().to_string(),
        });
    }
    let staging = pgdata.join(STAGING);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
    }
    Ok(())
}

/// Rewrites every restored file of the graph from `config_orig` that points elsewhere than
/// the restored copies; a placed file also says where it came from.
fn rewrite_graph(
    backup: &BackupManifest,
    layout: &Layout,
    config_orig: &Path,
    report: &mut ConfigReport,
) -> Result<(), Error> {
    let io = |p: &Path, e: std::io::Error| Error::LocalIo(format!("{}: {e}", p.display()));
    let graph = conffiles::walk(&Restored(layout), config_orig, None, None);
    for (orig, role) in &graph.files {
        let Some(new) = layout.map(orig) else {
            continue; // a file of this host, not ours to change
        };
        let placed = layout.files.contains_key(orig);
        let text = conffiles::read_small(&new).map_err(|e| io(&new, e))?;
        let (out, changes) = if role.is_conf_syntax() {
            rewrite_conf(&text, orig, &new, layout)
        } else {
            rewrite_hba(&text, orig, &new, layout)
        };
        let mut out = out;
        if placed {
            out = format!(
                "# tidemark: restored from backup {} of {}; originally {}\n{out}",
                backup.id,
                backup.cluster,
                orig.display()
            );
        }
        if placed || !changes.is_empty() {
            write_keeping_mode(&new, &out).map_err(|e| io(&new, e))?;
        }
        for c in changes {
            report.rewritten.push(format!("{}: {c}", new.display()));
        }
    }
    for p in &graph.problems {
        report.missing.push(p.clone());
    }
    Ok(())
}

fn dir_mode(m: u32) -> u32 {
    (m & 0o7777) | 0o700
}

fn write_keeping_mode(p: &Path, text: &str) -> std::io::Result<()> {
    let mode = std::fs::metadata(p)?.permissions().mode();
    std::fs::write(p, text)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

/// A data directory without postgresql.conf or pg_hba.conf cannot start.
fn missing_main_files(pgdata: &Path, report: &mut ConfigReport) {
    for f in ["postgresql.conf", "pg_hba.conf"] {
        if !pgdata.join(f).exists() {
            report.missing.push(format!(
                "{f}: not in the restored data directory, and the backup holds no copy from elsewhere"
            ));
        }
    }
    if pgdata.join("postgresql.conf").exists() {
        report.config_file = Some(pgdata.join("postgresql.conf").display().to_string());
    }
}

fn rewrite_conf(text: &str, orig: &Path, new: &Path, layout: &Layout) -> (String, Vec<String>) {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut changes = Vec::new();
    // Last first, so earlier line numbers stay valid while lines are inserted.
    for l in conffiles::parse_conf(text).into_iter().rev() {
        let target = match l.name.as_str() {
            "data_directory" => Some(layout.pgdata.clone()),
            "hba_file" | "ident_file" | "include" | "include_if_exists" | "include_dir" => {
                layout.map(&resolve(orig, &l.value))
            }
            _ => None,
        };
        let Some(target) = target else { continue };
        // A relative reference that already lands on the restored copy stays as it is.
        if resolve(new, &l.value) == normalize(&target) {
            continue;
        }
        let was = resolve(orig, &l.value);
        let why = if l.name == "data_directory" {
            "the restored data directory".to_string()
        } else {
            format!("restored copy of {}", was.display())
        };
        let sep = if matches!(
            l.name.as_str(),
            "include" | "include_if_exists" | "include_dir"
        ) {
            " "
        } else {
            " = "
        };
        let replacement = format!(
            "#{}\n{}{sep}{}\t# tidemark: {why}",
            lines[l.line],
            l.name,
            quote_conf(&target.display().to_string())
        );
        changes.push(format!(
            "{} = {} (was {})",
            l.name,
            quote_conf(&target.display().to_string()),
            quote_conf(&l.value)
        ));
        lines[l.line] = replacement;
    }
    changes.reverse();
    let mut out = lines.join("\n");
    out.push('\n');
    (out, changes)
}

fn rewrite_hba(text: &str, orig: &Path, new: &Path, layout: &Layout) -> (String, Vec<String>) {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut changes = Vec::new();
    for r in conffiles::parse_hba_refs(text).into_iter().rev() {
        let Some(target) = layout.map(&resolve(orig, &r.value)) else {
            continue;
        };
        if resolve(new, &r.value) == normalize(&target) {
            continue;
        }
        let t = target.display().to_string();
        if r.kind == "@" && t.chars().any(|c| c.is_whitespace() || c == '"' || c == ',') {
            continue; // an @file path cannot be quoted; left as it was (reported by start)
        }
        let token = if r.kind == "@" {
            format!("@{t}")
        } else {
            format!("\"{t}\"")
        };
        let line = &mut lines[r.line];
        line.replace_range(r.span.0..r.span.1, &token);
        changes.push(format!("{} {} (was {})", r.kind, t, r.value));
    }
    changes.reverse();
    let mut out = lines.join("\n");
    out.push('\n');
    (out, changes)
}

/// The settings a start of the restored copy gets from its files: the graph from
/// `config_file`, then `postgresql.auto.conf` of the data directory (read last, as PostgreSQL
/// does).
pub fn effective_settings(pgdata: &Path, config_file: &Path) -> Graph {
    let mut g = conffiles::walk(&conffiles::Live, config_file, None, None);
    let auto = pgdata.join("postgresql.auto.conf");
    if let Ok(t) = conffiles::read_small(&auto) {
        for l in conffiles::parse_conf(&t) {
            g.settings.push((l.name, l.value, auto.clone()));
        }
    }
    g
}

pub(super) fn is_on(v: Option<&str>) -> bool {
    matches!(
        v.map(|v| v.to_ascii_lowercase()).as_deref(),
        Some("on" | "true" | "yes" | "1")
    )
}

/// A path setting's value as the server resolves it (relative to the data directory).
pub(super) fn setting_path(pgdata: &Path, v: &str) -> PathBuf {
    let p = Path::new(v);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        pgdata.join(p)
    }
}

/// Path settings of the restored configuration that name what this host lacks.
pub fn lacking(pgdata: &Path, g: &Graph, pg_version_num: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let ssl = is_on(g.setting("ssl"));
    for name in conffiles::PATH_SETTINGS {
        let Some(v) = g.setting(name).filter(|v| !v.is_empty()) else {
            continue;
        };
        let lacks = match *name {
            n if n.starts_with("ssl_") => ssl && !setting_path(pgdata, v).exists(),
            "external_pid_file" => setting_path(pgdata, v)
                .parent()
                .is_some_and(|d| !d.is_dir()),
            "stats_temp_directory" => pg_version_num < 150000 && !setting_path(pgdata, v).is_dir(),
            "unix_socket_directories" => v
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .any(|d| !setting_path(pgdata, d).is_dir()),
            _ => !setting_path(pgdata, v).exists(),
        };
        if lacks {
            out.push((name.to_string(), v.to_string()));
        }
    }
    out
}

fn report_settings(
    pgdata: &Path,
    config_file: &Path,
    backup: &BackupManifest,
    report: &mut ConfigReport,
) {
    if !config_file.exists() {
        return;
    }
    let g = effective_settings(pgdata, config_file);
    for (name, value) in lacking(pgdata, &g, backup.pg_version_num) {
        report
            .missing
            .push(format!("{name} = {}: not on this host", quote_conf(&value)));
    }
}

#[cfg(test)]
mod tests;

//! Puts a backup's configuration where a restored cluster can use it, and works out what a
//! start of the restored copy needs.
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

/// Places the staged configuration files of `backup` and rewrites their paths. `owner` (uid,
/// gid) gets what is created in a `--config-dir`.
pub fn place(
    backup: &BackupManifest,
    pgdata: &Path,
    config_dir: Option<&Path>,
) -> Result<ConfigReport, Error> {
    let io = |p: &Path, e: std::io::Error| Error::LocalIo(format!("{}: {e}", p.display()));
    let mut report = ConfigReport {
        config_dir: config_dir.map(|d| d.display().to_string()),
        ..Default::default()
    };
    let Some(conf) = &backup.configuration else {
        report.notes.push(format!(
            "backup {} does not record the server's configuration (taken by an older tidemark): \
             if the cluster keeps postgresql.conf, pg_hba.conf or included files outside its data \
             directory, put them in place by hand",
            backup.id
        ));
        missing_main_files(pgdata, &mut report);
        if let Some(d) = config_dir {
            report.notes.push(format!(
                "--config-dir {}: nothing to write there, the backup holds no configuration",
                d.display()
            ));
        }
        report_settings(pgdata, &pgdata.join("postgresql.conf"), backup, &mut report);
        return Ok(report);
    };
    report.held = true;
    for m in &conf.missing {
        report
            .notes
            .push(format!("not recorded when the backup ran: {m}"));
    }
    let layout = Layout::plan(conf, pgdata, config_dir);
    if let Some(d) = config_dir {
        std::fs::create_dir_all(d).map_err(|e| io(d, e))?;
    }
    // Directories first (include_dirs are read even when empty).
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

    // Rewrite what points elsewhere, following the graph as the server will.
    let config_orig = normalize(Path::new(&conf.config_file));
    let Some(config_new) = layout.map(&config_orig) else {
        report.missing.push(format!(
            "config_file {}: neither in the backup nor inside the data directory",
            conf.config_file
        ));
        return Ok(report);
    };
    let graph = conffiles::walk(&Restored(&layout), &config_orig, None, None);
    for (orig, role) in &graph.files {
        let Some(new) = layout.map(orig) else {
            continue; // a file of this host, not ours to change
        };
        let placed = layout.files.contains_key(orig);
        let text = conffiles::read_small(&new).map_err(|e| io(&new, e))?;
        let (out, changes) = if role.is_conf_syntax() {
            rewrite_conf(&text, orig, &new, &layout)
        } else {
            rewrite_hba(&text, orig, &new, &layout)
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

fn is_on(v: Option<&str>) -> bool {
    matches!(
        v.map(|v| v.to_ascii_lowercase()).as_deref(),
        Some("on" | "true" | "yes" | "1")
    )
}

/// A path setting's value as the server resolves it (relative to the data directory).
fn setting_path(pgdata: &Path, v: &str) -> PathBuf {
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

/// What `--start` and drills pass to the server so that a copy starts privately beside
/// whatever else runs on this host, and why: each override is reported.
#[derive(Debug, Default)]
pub struct StartSettings {
    pub options: Vec<(String, String)>,
    pub overrides: Vec<String>,
    pub port: Option<u16>,
    pub socket_dirs: Vec<PathBuf>,
}

pub fn start_settings(
    pgdata: &Path,
    config_file: &Path,
    pg_version_num: u32,
    port: Option<u16>,
    socket_dir: Option<&Path>,
) -> StartSettings {
    let g = effective_settings(pgdata, config_file);
    let mut s = StartSettings::default();
    let lacking = lacking(pgdata, &g, pg_version_num);
    let lacks = |n: &str| {
        lacking
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, v)| v.clone())
    };
    if let Some(p) = port {
        s.options.push(("port".into(), p.to_string()));
    }
    s.port = port.or_else(|| g.setting("port").and_then(|v| v.parse().ok()));
    match socket_dir {
        Some(d) => {
            s.options
                .push(("unix_socket_directories".into(), d.display().to_string()));
            s.options.push(("listen_addresses".into(), String::new()));
            s.socket_dirs = vec![d.to_path_buf()];
        }
        None => {
            let configured: Vec<PathBuf> = g
                .setting("unix_socket_directories")
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| setting_path(pgdata, d))
                .collect();
            let existing: Vec<PathBuf> =
                configured.iter().filter(|d| d.is_dir()).cloned().collect();
            if existing.len() < configured.len() {
                let use_dirs = if existing.is_empty() {
                    vec![PathBuf::from("/tmp")]
                } else {
                    existing
                };
                let joined = use_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                s.overrides.push(format!(
                    "unix_socket_directories = {} (the configured {} is missing here)",
                    quote_conf(&joined),
                    quote_conf(g.setting("unix_socket_directories").unwrap_or(""))
                ));
                s.options.push(("unix_socket_directories".into(), joined));
                s.socket_dirs = use_dirs;
            } else {
                s.socket_dirs = configured;
            }
        }
    }
    if let Some(v) = g.setting("external_pid_file").filter(|v| !v.is_empty()) {
        s.overrides.push(format!(
            "external_pid_file = '' (the configured {} is the original cluster's)",
            quote_conf(v)
        ));
    }
    s.options.push(("external_pid_file".into(), String::new()));
    if is_on(g.setting("ssl")) {
        let gone: Vec<String> = [
            "ssl_cert_file",
            "ssl_key_file",
            "ssl_ca_file",
            "ssl_crl_file",
        ]
        .iter()
        .filter_map(|n| lacks(n).map(|v| format!("{n} {}", quote_conf(&v))))
        .collect();
        if !gone.is_empty() {
            s.overrides
                .push(format!("ssl = off ({} missing here)", gone.join(", ")));
            s.options.push(("ssl".into(), "off".into()));
        }
    }
    if let Some(v) = lacks("stats_temp_directory") {
        s.overrides.push(format!(
            "stats_temp_directory = 'pg_stat_tmp' (the configured {} is missing here)",
            quote_conf(&v)
        ));
        s.options
            .push(("stats_temp_directory".into(), "pg_stat_tmp".into()));
    }
    if is_on(g.setting("logging_collector")) {
        s.overrides.push(
            "logging_collector = off (the server's messages go to tidemark's start log)".into(),
        );
        s.options.push(("logging_collector".into(), "off".into()));
    }
    s
}

/// The line of a server log that says why it did not come up: the last FATAL or PANIC that is
/// not a refused connection attempt, else what the postgres binary printed before logging
/// started (`postgres: could not access the server configuration file ...`).
pub fn server_failure(log: &str) -> Option<String> {
    const NOISE: &[&str] = &[
        "the database system is starting up",
        "the database system is shutting down",
        "the database system is not yet accepting connections",
        "the database system is not accepting connections",
        "terminating connection due to administrator command",
        "role \"",
        "database \"",
    ];
    let fatal = log.lines().rfind(|l| {
        (l.contains("FATAL:") || l.contains("PANIC:")) && !NOISE.iter().any(|n| l.contains(n))
    });
    let line = fatal.or_else(|| {
        log.lines().rfind(|l| {
            let t = l.trim_start();
            t.starts_with("postgres:") && !t.contains("LOG:")
        })
    })?;
    Some(line.trim().chars().take(500).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_failure_quotes_the_real_reason() {
        let log = "2026-12-06 10:00:00.000 UTC [1] LOG:  starting PostgreSQL 15\n\
                   2026-12-06 10:00:00.100 UTC [9] FATAL:  the database system is starting up\n\
                   2026-12-06 10:00:00.200 UTC [2] FATAL:  could not load pg_hba.conf\n\
                   2026-12-06 10:00:00.300 UTC [9] FATAL:  the database system is starting up\n\
                   2026-12-06 10:00:00.400 UTC [1] LOG:  database system is shut down\n";
        assert_eq!(
            server_failure(log).as_deref(),
            Some("2026-12-06 10:00:00.200 UTC [2] FATAL:  could not load pg_hba.conf")
        );
        let early = "postgres: could not access the server configuration file \"/srv/pg/postgresql.conf\": No such file or directory\n";
        assert!(
            server_failure(early)
                .unwrap()
                .contains("could not access the server configuration file")
        );
        assert_eq!(server_failure("LOG: fine\n"), None);
    }

    fn conf(files: &[(&str, &str)], dirs: &[&str]) -> ServerConfiguration {
        ServerConfiguration {
            data_directory: "/var/lib/postgresql/15/main".into(),
            config_file: "/etc/postgresql/15/main/postgresql.conf".into(),
            hba_file: "/etc/postgresql/15/main/pg_hba.conf".into(),
            ident_file: "/etc/postgresql/15/main/pg_ident.conf".into(),
            files: files
                .iter()
                .map(|(s, r)| crate::repo::manifest::ConfigFileEntry {
                    source: s.to_string(),
                    role: r.to_string(),
                    size: 0,
                    mode: 0o644,
                    extents: vec![],
                })
                .collect(),
            directories: dirs
                .iter()
                .map(|d| crate::repo::manifest::ConfigDirEntry {
                    source: d.to_string(),
                    mode: 0o755,
                })
                .collect(),
            settings: vec![],
            missing: vec![],
        }
    }

    #[test]
    fn layout_keeps_the_debian_shape() {
        let c = conf(
            &[
                ("/etc/postgresql/15/main/postgresql.conf", "config_file"),
                ("/etc/postgresql/15/main/pg_hba.conf", "hba_file"),
                ("/etc/postgresql/15/main/conf.d/a.conf", "include"),
                ("/etc/postgresql/15/main/start.conf", "pg_ctlcluster"),
                ("/etc/postgresql-common/shared.conf", "include"),
                ("/etc/postgresql/15/main/base/evil.conf", "include"),
            ],
            &["/etc/postgresql/15/main/conf.d"],
        );
        let l = Layout::plan(&c, Path::new("/srv/r"), None);
        let m = |p: &str| l.map(Path::new(p)).map(|p| p.display().to_string());
        assert_eq!(
            m("/etc/postgresql/15/main/postgresql.conf").as_deref(),
            Some("/srv/r/postgresql.conf")
        );
        assert_eq!(
            m("/etc/postgresql/15/main/pg_hba.conf").as_deref(),
            Some("/srv/r/pg_hba.conf")
        );
        assert_eq!(
            m("/etc/postgresql/15/main/conf.d").as_deref(),
            Some("/srv/r/conf.d")
        );
        assert_eq!(
            m("/etc/postgresql/15/main/conf.d/a.conf").as_deref(),
            Some("/srv/r/conf.d/a.conf")
        );
        assert_eq!(
            m("/etc/postgresql/15/main/start.conf").as_deref(),
            Some("/srv/r/tidemark-config/etc/postgresql/15/main/start.conf")
        );
        assert_eq!(
            m("/etc/postgresql-common/shared.conf").as_deref(),
            Some("/srv/r/tidemark-config/etc/postgresql-common/shared.conf")
        );
        // Never into a directory PostgreSQL owns.
        assert_eq!(
            m("/etc/postgresql/15/main/base/evil.conf").as_deref(),
            Some("/srv/r/tidemark-config/etc/postgresql/15/main/base/evil.conf")
        );
        assert_eq!(
            m("/var/lib/postgresql/15/main/postgresql.auto.conf").as_deref(),
            Some("/srv/r/postgresql.auto.conf")
        );
        assert_eq!(m("/etc/passwd"), None);
        let d = Layout::plan(
            &c,
            Path::new("/srv/r"),
            Some(Path::new("/etc/postgresql/15/r")),
        );
        assert_eq!(
            d.map(Path::new("/etc/postgresql/15/main/start.conf"))
                .unwrap(),
            PathBuf::from("/etc/postgresql/15/r/start.conf")
        );
    }

    #[test]
    fn rewrites_what_points_elsewhere() {
        let c = conf(
            &[
                ("/etc/postgresql/15/main/postgresql.conf", "config_file"),
                ("/etc/postgresql/15/main/pg_hba.conf", "hba_file"),
                ("/etc/postgresql-common/shared.conf", "include"),
            ],
            &["/etc/postgresql/15/main/conf.d"],
        );
        let l = Layout::plan(&c, Path::new("/srv/r"), None);
        let text = "data_directory = '/var/lib/postgresql/15/main'\t\t# use data in another directory\n\
                    hba_file = '/etc/postgresql/15/main/pg_hba.conf'\n\
                    include_dir = 'conf.d'\n\
                    include '/etc/postgresql-common/shared.conf'\n\
                    port = 5432\n";
        let (out, changes) = rewrite_conf(
            text,
            Path::new("/etc/postgresql/15/main/postgresql.conf"),
            Path::new("/srv/r/postgresql.conf"),
            &l,
        );
        assert_eq!(changes.len(), 3, "{changes:?}");
        let settings = conffiles::parse_conf(&out);
        let get = |n: &str| {
            settings
                .iter()
                .rev()
                .find(|s| s.name == n)
                .map(|s| s.value.clone())
        };
        assert_eq!(get("data_directory").as_deref(), Some("/srv/r"));
        assert_eq!(get("hba_file").as_deref(), Some("/srv/r/pg_hba.conf"));
        assert_eq!(
            get("include_dir").as_deref(),
            Some("conf.d"),
            "relative and already right"
        );
        assert_eq!(
            get("include").as_deref(),
            Some("/srv/r/tidemark-config/etc/postgresql-common/shared.conf")
        );
        assert_eq!(get("port").as_deref(), Some("5432"));
        assert!(
            out.contains("#data_directory = '/var/lib/postgresql/15/main'"),
            "{out}"
        );
        assert!(
            out.contains("# tidemark: restored copy of /etc/postgresql/15/main/pg_hba.conf"),
            "{out}"
        );
    }
}

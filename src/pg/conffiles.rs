//! The configuration files a server really uses, and the syntax needed to follow and rewrite
//! them: postgresql.conf (`name [=] value`, `include`, `include_if_exists`, `include_dir`) and
//! pg_hba.conf / pg_ident.conf (PostgreSQL 16's `include*` lines and `@file` tokens).
//!
//! Debian and Ubuntu keep a cluster's configuration in /etc/postgresql/<version>/<name>/ and
//! start the server with `-c config_file=...`; the data directory then holds no
//! postgresql.conf. A base backup of the data directory alone cannot be started: `discover`
//! finds every file outside the data directory that the server reads, so a backup can hold
//! them, and `walk` follows the same graph on a restored copy (to rewrite its paths and to read
//! the settings a start will get).
//!
//! Paths are compared lexically (`normalize`), never through the file system: at restore time
//! the original paths usually do not exist.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Component, Path, PathBuf};

/// Settings whose value names a file or directory the server needs at start. Reported when the
/// restore host lacks them; `--start` and drills override the ones a private start cannot use.
pub const PATH_SETTINGS: &[&str] = &[
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
    "ssl_crl_file",
    "ssl_crl_dir",
    "ssl_dh_params_file",
    "krb_server_keyfile",
    "external_pid_file",
    "stats_temp_directory",
    "unix_socket_directories",
];

/// PostgreSQL follows includes at most this deep (guc-file.l's CONF_FILE_MAX_DEPTH).
const MAX_DEPTH: usize = 10;
/// Configuration files are small; a larger one is not a configuration file.
pub const MAX_CONFIG_FILE: u64 = 16 << 20;

/// Lexical normalisation of an absolute path: `.` dropped, `..` pops (never above `/`).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// Where a reference `value` written in the file at `file` points (relative references are
/// relative to that file's directory, as PostgreSQL resolves them).
pub fn resolve(file: &Path, value: &str) -> PathBuf {
    let v = Path::new(value);
    if v.is_absolute() {
        normalize(v)
    } else {
        normalize(&file.parent().unwrap_or(Path::new("/")).join(v))
    }
}

/// Whether `p` is `dir` or inside it (lexically).
pub fn is_within(p: &Path, dir: &Path) -> bool {
    normalize(p).starts_with(normalize(dir))
}

/// One `name = value` line of a postgresql.conf-syntax file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfLine {
    pub line: usize,
    /// Lower-cased, as PostgreSQL treats names.
    pub name: String,
    pub value: String,
}

/// Parses a postgresql.conf-syntax text into its settings and directives, in order. Lines
/// that are not settings (comments, blanks, garbage PostgreSQL would reject) are skipped.
pub fn parse_conf(text: &str) -> Vec<ConfLine> {
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| {
            parse_conf_line(l).map(|(name, value)| ConfLine {
                line: i,
                name,
                value,
            })
        })
        .collect()
}

fn parse_conf_line(line: &str) -> Option<(String, String)> {
    let s = line.trim_start();
    let name_len = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
        .unwrap_or(s.len());
    if name_len == 0 || !s.as_bytes()[0].is_ascii_alphabetic() && s.as_bytes()[0] != b'_' {
        return None;
    }
    let name = s[..name_len].to_ascii_lowercase();
    let mut rest = s[name_len..].trim_start();
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    let value = if let Some(q) = rest.strip_prefix('\'') {
        unquote(q)?
    } else {
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '#')
            .unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        rest[..end].to_string()
    };
    Some((name, value))
}

/// The body of a single-quoted value (after the opening quote): `''` and backslash escapes as
/// guc-file.l's DeescapeQuotedString reads them.
fn unquote(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' if chars.peek() == Some(&'\'') => {
                chars.next();
                out.push('\'');
            }
            '\'' => return Some(out),
            '\\' => match chars.next()? {
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                d @ '0'..='7' => {
                    let mut v = d.to_digit(8)?;
                    for _ in 0..2 {
                        match chars.peek().and_then(|c| c.to_digit(8)) {
                            Some(n) => {
                                v = v * 8 + n;
                                chars.next();
                            }
                            None => break,
                        }
                    }
                    out.push(char::from_u32(v)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None // unterminated
}

/// A value quoted for postgresql.conf.
pub fn quote_conf(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// A reference to another file in pg_hba.conf / pg_ident.conf: an `include`,
/// `include_if_exists` or `include_dir` line (PostgreSQL 16+), or an `@file` token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbaRef {
    pub line: usize,
    /// "include", "include_if_exists", "include_dir" or "@".
    pub kind: String,
    pub value: String,
    /// Byte range of the token in the line (quotes included), for rewriting.
    pub span: (usize, usize),
}

/// Tokens of one hba/ident line with their byte ranges and whether they began with a quote:
/// whitespace or commas separate, double quotes group, `#` outside quotes starts a comment.
fn hba_tokens(line: &str) -> Vec<(usize, usize, String, bool)> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'#' {
            break;
        }
        if c.is_ascii_whitespace() || c == b',' {
            i += 1;
            continue;
        }
        let start = i;
        let mut tok = String::new();
        let mut quoted = false;
        while i < b.len() {
            let c = b[i];
            if c == b'"' {
                quoted = !quoted;
                i += 1;
                continue;
            }
            if !quoted && (c.is_ascii_whitespace() || c == b',' || c == b'#') {
                break;
            }
            tok.push(c as char);
            i += 1;
        }
        // Re-decode as UTF-8 (bytes pushed as chars are only right for ASCII).
        let tok = String::from_utf8_lossy(
            &line.as_bytes()[start..i]
                .iter()
                .copied()
                .filter(|&c| c != b'"')
                .collect::<Vec<u8>>(),
        )
        .into_owned();
        out.push((start, i, tok, b[start] == b'"'));
    }
    out
}

pub fn parse_hba_refs(text: &str) -> Vec<HbaRef> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let toks = hba_tokens(line);
        if let Some((_, _, first, false)) = toks.first()
            && matches!(
                first.as_str(),
                "include" | "include_if_exists" | "include_dir"
            )
        {
            if let Some((s, e, v, _)) = toks.get(1) {
                out.push(HbaRef {
                    line: n,
                    kind: first.clone(),
                    value: v.clone(),
                    span: (*s, *e),
                });
            }
            continue;
        }
        // A quoted "@name" is a name, not a file (hba.c expands only unquoted @ tokens).
        for (s, e, t, _) in toks.iter().filter(|t| !t.3) {
            if let Some(f) = t.strip_prefix('@')
                && !f.is_empty()
            {
                out.push(HbaRef {
                    line: n,
                    kind: "@".into(),
                    value: f.to_string(),
                    span: (*s, *e),
                });
            }
        }
    }
    out
}

/// The files of an include_dir: names ending in `.conf`, not starting with `.`, regular
/// files, in byte order (as PostgreSQL reads them).
pub fn include_dir_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".conf") {
            continue;
        }
        if std::fs::metadata(e.path())
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// What a file is to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    ConfigFile,
    HbaFile,
    IdentFile,
    /// Included by postgresql.conf (include, include_if_exists, include_dir) or listed by
    /// pg_file_settings.
    Include,
    /// Included by pg_hba.conf or pg_ident.conf (`include*`, `@file`).
    HbaInclude,
    /// Debian's start.conf, pg_ctl.conf and environment beside postgresql.conf: read by
    /// pg_ctlcluster, not by the server.
    PgCtlcluster,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ConfigFile => "config_file",
            Role::HbaFile => "hba_file",
            Role::IdentFile => "ident_file",
            Role::Include => "include",
            Role::HbaInclude => "hba_include",
            Role::PgCtlcluster => "pg_ctlcluster",
        }
    }

    /// Whether the file has postgresql.conf syntax (else hba/ident syntax, or Debian's own).
    pub fn is_conf_syntax(self) -> bool {
        matches!(self, Role::ConfigFile | Role::Include)
    }
}

/// Where the configuration graph was found, by following it from the main files.
#[derive(Debug, Default, Clone)]
pub struct Graph {
    /// Every file reached, with its role (first role wins), by normalised absolute path.
    pub files: BTreeMap<PathBuf, Role>,
    /// Every include_dir reached.
    pub dirs: BTreeSet<PathBuf>,
    /// `include` (not `_if_exists`) targets and include_dirs that do not exist, and files
    /// that could not be read: each a one-line description.
    pub problems: Vec<String>,
    /// Settings in file order, last one wins (postgresql.conf syntax files only).
    pub settings: Vec<(String, String, PathBuf)>,
}

/// Reads one file of the graph. `open` maps an original path to where its bytes are now
/// (identity at backup time; the restored copy at restore time).
pub trait Source {
    fn read(&self, original: &Path) -> io::Result<String>;
    fn list_dir(&self, original: &Path) -> io::Result<Vec<PathBuf>>;
}

/// The file system as it is: backup time.
pub struct Live;

impl Source for Live {
    fn read(&self, original: &Path) -> io::Result<String> {
        read_small(original)
    }
    fn list_dir(&self, original: &Path) -> io::Result<Vec<PathBuf>> {
        include_dir_files(original)
    }
}

/// Reads a configuration file, refusing an oversized one.
pub fn read_small(p: &Path) -> io::Result<String> {
    let meta = std::fs::metadata(p)?;
    if meta.len() > MAX_CONFIG_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_CONFIG_FILE} bytes: not a configuration file"),
        ));
    }
    let bytes = std::fs::read(p)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Follows the configuration from `config_file` (postgresql.conf syntax) and the hba and
/// ident files, as the server does.
pub fn walk(
    src: &dyn Source,
    config_file: &Path,
    hba_file: Option<&Path>,
    ident_file: Option<&Path>,
) -> Graph {
    let mut g = Graph::default();
    walk_conf(src, &normalize(config_file), Role::ConfigFile, 0, &mut g);
    // hba_file / ident_file as set by the files (last wins) unless the caller knows better.
    let hba = hba_file
        .map(normalize)
        .or_else(|| setting_path(&g, "hba_file"));
    let ident = ident_file
        .map(normalize)
        .or_else(|| setting_path(&g, "ident_file"));
    if let Some(h) = hba {
        walk_hba(src, &h, Role::HbaFile, 0, &mut g);
    }
    if let Some(i) = ident {
        walk_hba(src, &i, Role::IdentFile, 0, &mut g);
    }
    g
}

fn setting_path(g: &Graph, name: &str) -> Option<PathBuf> {
    g.settings
        .iter()
        .rev()
        .find(|(n, _, _)| n == name)
        .filter(|(_, v, _)| !v.is_empty())
        .map(|(_, v, f)| resolve(f, v))
}

impl Graph {
    /// The value a setting gets from the files (last one wins), if any file sets it.
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings
            .iter()
            .rev()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v.as_str())
    }
}

/// Reads a file of the graph once: None when it was seen already, is too deep, or cannot be
/// read (a problem then).
fn enter(src: &dyn Source, file: &Path, role: Role, depth: usize, g: &mut Graph) -> Option<String> {
    if depth > MAX_DEPTH || g.files.contains_key(file) {
        return None;
    }
    match src.read(file) {
        Ok(t) => {
            g.files.insert(file.to_path_buf(), role);
            Some(t)
        }
        Err(e) => {
            g.problems.push(format!("{}: {e}", file.display()));
            None
        }
    }
}

fn walk_conf(src: &dyn Source, file: &Path, role: Role, depth: usize, g: &mut Graph) {
    let Some(text) = enter(src, file, role, depth, g) else {
        return;
    };
    for l in parse_conf(&text) {
        match l.name.as_str() {
            "include" | "include_if_exists" => {
                let target = resolve(file, &l.value);
                if l.name == "include_if_exists" && src.read(&target).is_err() {
                    continue;
                }
                walk_conf(src, &target, Role::Include, depth + 1, g);
            }
            "include_dir" => {
                let dir = resolve(file, &l.value);
                match src.list_dir(&dir) {
                    Ok(files) => {
                        g.dirs.insert(dir.clone());
                        for f in files {
                            walk_conf(src, &normalize(&f), Role::Include, depth + 1, g);
                        }
                    }
                    Err(e) => g
                        .problems
                        .push(format!("include_dir {}: {e}", dir.display())),
                }
            }
            _ => g.settings.push((l.name, l.value, file.to_path_buf())),
        }
    }
}

fn walk_hba(src: &dyn Source, file: &Path, role: Role, depth: usize, g: &mut Graph) {
    let Some(text) = enter(src, file, role, depth, g) else {
        return;
    };
    for r in parse_hba_refs(&text) {
        let target = resolve(file, &r.value);
        match r.kind.as_str() {
            "include_dir" => match src.list_dir(&target) {
                Ok(files) => {
                    g.dirs.insert(target.clone());
                    for f in files {
                        walk_hba(src, &normalize(&f), Role::HbaInclude, depth + 1, g);
                    }
                }
                Err(e) => g
                    .problems
                    .push(format!("include_dir {}: {e}", target.display())),
            },
            "include_if_exists" if src.read(&target).is_err() => {}
            // `@file` lists names, one per line or comma-separated; it may itself hold
            // @-references.
            _ => walk_hba(src, &target, Role::HbaInclude, depth + 1, g),
        }
    }
}

/// Debian's files beside postgresql.conf that pg_ctlcluster reads.
pub const PG_CTLCLUSTER_FILES: &[&str] = &["start.conf", "pg_ctl.conf", "environment"];

/// The configuration a running server reads from outside its data directory.
#[derive(Debug, Default, Clone)]
pub struct Discovered {
    pub data_directory: String,
    pub config_file: String,
    pub hba_file: String,
    pub ident_file: String,
    /// Files outside the data directory, with what they are to the server.
    pub files: Vec<(PathBuf, Role)>,
    /// include_dir directories outside the data directory (restored even when empty).
    pub dirs: Vec<PathBuf>,
    /// `PATH_SETTINGS` and a few others as the server has them: (name, value, source).
    pub settings: Vec<(String, String, String)>,
    /// What could not be recorded, one line each.
    pub missing: Vec<String>,
}

/// Settings recorded besides `PATH_SETTINGS`: what a restore host needs to know to start a copy.
const RECORDED_SETTINGS: &[&str] = &["ssl", "logging_collector", "port", "cluster_name"];

/// Asks the server which files it reads, follows them on disk, and keeps those outside the
/// data directory (`pgdata`, and the server's own `data_directory`). Never fails: what cannot
/// be found is listed in `missing`, and the backup goes on without it.
pub async fn discover(client: &tokio_postgres::Client, pgdata: &Path) -> Discovered {
    let mut d = Discovered::default();
    let mut names: Vec<&str> = vec!["data_directory", "config_file", "hba_file", "ident_file"];
    names.extend_from_slice(PATH_SETTINGS);
    names.extend_from_slice(RECORDED_SETTINGS);
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let rows = match client
        .query(
            "select name, setting, source from pg_settings where name = any($1) \
             or (source = 'command line' and name not in ('config_file', 'data_directory')) \
             order by name",
            &[&names],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            d.missing
                .push(format!("the server's settings could not be read: {e}"));
            return d;
        }
    };
    for r in rows {
        let (name, value, source): (String, Option<String>, String) =
            (r.get(0), r.get(1), r.get(2));
        let value = value.unwrap_or_default();
        match name.as_str() {
            "data_directory" => d.data_directory = value,
            "config_file" => d.config_file = value,
            "hba_file" => d.hba_file = value,
            "ident_file" => d.ident_file = value,
            _ => d.settings.push((name, value, source)),
        }
    }
    if d.config_file.is_empty() {
        // pg_settings hides these from roles without pg_read_all_settings.
        d.missing.push(
            "config_file, hba_file and ident_file are not visible to the backup's role \
             (grant it pg_read_all_settings): configuration outside the data directory not recorded"
                .into(),
        );
        return d;
    }
    let graph = walk(
        &Live,
        Path::new(&d.config_file),
        (!d.hba_file.is_empty()).then(|| Path::new(&d.hba_file)),
        (!d.ident_file.is_empty()).then(|| Path::new(&d.ident_file)),
    );
    let mut files = graph.files.clone();
    // The server's own list of what it read (superusers and pg_read_all_settings only).
    if let Ok(rows) = client
        .query(
            "select distinct sourcefile from pg_file_settings where sourcefile is not null",
            &[],
        )
        .await
    {
        for r in rows {
            let f: String = r.get(0);
            files
                .entry(normalize(Path::new(&f)))
                .or_insert(Role::Include);
        }
    }
    let config_path = normalize(Path::new(&d.config_file));
    if config_path
        .file_name()
        .is_some_and(|n| n == "postgresql.conf")
        && let Some(dir) = config_path.parent()
    {
        for name in PG_CTLCLUSTER_FILES {
            let p = dir.join(name);
            if p.is_file() {
                files.entry(p).or_insert(Role::PgCtlcluster);
            }
        }
    }
    let inside = |p: &Path| {
        is_within(p, pgdata)
            || (!d.data_directory.is_empty() && is_within(p, Path::new(&d.data_directory)))
    };
    d.files = files.into_iter().filter(|(p, _)| !inside(p)).collect();
    d.dirs = graph.dirs.into_iter().filter(|p| !inside(p)).collect();
    d.missing.extend(graph.problems);
    d
}

#[cfg(test)]
mod tests;

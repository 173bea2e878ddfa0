//! Unit tests of the configuration syntax and graph walk.
use super::*;
use std::collections::HashMap;

#[test]
fn conf_lines() {
    let t = "# comment\n\
             port = 5433 # trailing\n\
             data_directory='/var/lib/postgresql/15/main'\t\t# use data in another directory\n\
             include_dir 'conf.d'\n\
             Shared_Buffers 128MB\n\
             quoted = 'it''s \\'x\\' \\101'\n\
             bad = 'unterminated\n\
             = nothing\n";
    let l = parse_conf(t);
    let pairs: Vec<(&str, &str)> = l
        .iter()
        .map(|c| (c.name.as_str(), c.value.as_str()))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("port", "5433"),
            ("data_directory", "/var/lib/postgresql/15/main"),
            ("include_dir", "conf.d"),
            ("shared_buffers", "128MB"),
            ("quoted", "it's 'x' A"),
        ]
    );
    assert_eq!(l[1].line, 2);
}

#[test]
fn quoting_round_trips() {
    for v in ["/plain/path", "it's", "back\\slash", ""] {
        let line = format!("x = {}", quote_conf(v));
        assert_eq!(parse_conf(&line)[0].value, v, "{line}");
    }
}

#[test]
fn paths_resolve_lexically() {
    let f = Path::new("/etc/postgresql/15/main/postgresql.conf");
    assert_eq!(
        resolve(f, "conf.d"),
        PathBuf::from("/etc/postgresql/15/main/conf.d")
    );
    assert_eq!(
        resolve(f, "../common.conf"),
        PathBuf::from("/etc/postgresql/15/common.conf")
    );
    assert_eq!(resolve(f, "/a/./b/../c"), PathBuf::from("/a/c"));
    assert!(is_within(
        Path::new("/var/lib/pg/base/1"),
        Path::new("/var/lib/pg/")
    ));
    assert!(!is_within(
        Path::new("/var/lib/pg2"),
        Path::new("/var/lib/pg")
    ));
}

#[test]
fn hba_references() {
    let t = "local all all peer\n\
             host @dbs \"@admins\" 10.0.0.0/8 md5 # @notthis\n\
             include_if_exists \"extra hba.conf\"\n\
             include_dir hba.d\n";
    let r = parse_hba_refs(t);
    let got: Vec<(&str, &str)> = r
        .iter()
        .map(|r| (r.kind.as_str(), r.value.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("@", "dbs"),
            ("include_if_exists", "extra hba.conf"),
            ("include_dir", "hba.d")
        ]
    );
    let line = t.lines().nth(2).unwrap();
    assert_eq!(&line[r[1].span.0..r[1].span.1], "\"extra hba.conf\"");
}

struct Mem(HashMap<PathBuf, String>);
impl Source for Mem {
    fn read(&self, p: &Path) -> io::Result<String> {
        self.0
            .get(p)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn list_dir(&self, d: &Path) -> io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = self
            .0
            .keys()
            .filter(|k| k.parent() == Some(d) && k.extension().is_some_and(|e| e == "conf"))
            .cloned()
            .collect();
        if v.is_empty() && !self.0.contains_key(&d.join(".dir")) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        v.sort();
        Ok(v)
    }
}

#[test]
fn walks_the_debian_layout() {
    let m = Mem(HashMap::from([
        (
            PathBuf::from("/etc/pg/postgresql.conf"),
            "data_directory = '/var/lib/pg'\nhba_file = '/etc/pg/pg_hba.conf'\n\
             ident_file = '/etc/pg/pg_ident.conf'\ninclude_dir = 'conf.d'\n\
             include_if_exists = 'missing.conf'\ninclude '/etc/common/shared.conf'\nport = 1\n"
                .to_string(),
        ),
        (PathBuf::from("/etc/pg/conf.d/a.conf"), "port = 2\n".into()),
        (
            PathBuf::from("/etc/pg/conf.d/b.conf"),
            "port = 3\ninclude 'b.conf'\n".into(),
        ),
        (
            PathBuf::from("/etc/common/shared.conf"),
            "work_mem = 8MB\n".into(),
        ),
        (
            PathBuf::from("/etc/pg/pg_hba.conf"),
            "local all @users trust\n".into(),
        ),
        (PathBuf::from("/etc/pg/users"), "alice\n".into()),
        (PathBuf::from("/etc/pg/pg_ident.conf"), "".into()),
    ]));
    let g = walk(&m, Path::new("/etc/pg/postgresql.conf"), None, None);
    let files: Vec<(&str, Role)> = g
        .files
        .iter()
        .map(|(p, r)| (p.to_str().unwrap(), *r))
        .collect();
    assert_eq!(
        files,
        vec![
            ("/etc/common/shared.conf", Role::Include),
            ("/etc/pg/conf.d/a.conf", Role::Include),
            ("/etc/pg/conf.d/b.conf", Role::Include),
            ("/etc/pg/pg_hba.conf", Role::HbaFile),
            ("/etc/pg/pg_ident.conf", Role::IdentFile),
            ("/etc/pg/postgresql.conf", Role::ConfigFile),
            ("/etc/pg/users", Role::HbaInclude),
        ]
    );
    assert!(g.dirs.contains(Path::new("/etc/pg/conf.d")));
    assert!(g.problems.is_empty(), "{:?}", g.problems);
    // The include_dir is read where it stands: a later `port` in the main file wins.
    assert_eq!(g.setting("port"), Some("1"));
    assert_eq!(g.setting("work_mem"), Some("8MB"));
}

#[test]
fn a_missing_include_is_a_problem() {
    let m = Mem(HashMap::from([(
        PathBuf::from("/c/postgresql.conf"),
        "include 'gone.conf'\ninclude_dir 'nodir'\n".to_string(),
    )]));
    let g = walk(&m, Path::new("/c/postgresql.conf"), None, None);
    assert_eq!(g.problems.len(), 2, "{:?}", g.problems);
}

use super::*;

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

use super::*;

const OK: &str = r#"
[repository]
url = "file:///tmp/repo"
[clusters.acme]
key_file = "/k"
"#;

#[test]
fn parses_minimal_and_defaults() {
    let c = Config::parse(OK).unwrap();
    assert_eq!(c.compression.level, 3);
    assert_eq!(c.repository.retry_timeout, Duration::from_secs(60));
    assert_eq!(c.cluster(None).unwrap().0, "acme");
    assert!(c.cluster(Some("beta")).unwrap_err().contains("acme"));
}

#[test]
fn unknown_keys_are_named() {
    let e = Config::parse(&OK.replace("key_file", "key_fil = \"x\"\nkey_file")).unwrap_err();
    assert!(e.contains("key_fil"), "{e}");
    assert!(e.contains("line"), "{e}");
    let e = Config::parse(&format!("{OK}\n[compresion]\nlevel = 1\n")).unwrap_err();
    assert!(e.contains("compresion"), "{e}");
}

#[test]
fn missing_keys_are_named() {
    let e = Config::parse("[repository]\n[clusters.a]\nkey_file='/k'\n").unwrap_err();
    assert!(e.contains("url"), "{e}");
    let e = Config::parse("[repository]\nurl='file:///r'\n[clusters.a]\n").unwrap_err();
    assert!(e.contains("key_file"), "{e}");
}

#[test]
fn bad_values() {
    assert!(Config::parse(&format!("{OK}[compression]\nlevel = 99\n")).is_err());
    assert!(Config::parse(&OK.replace("[clusters.acme]", "[clusters.\"a/b\"]")).is_err());
    let e = Config::parse(&OK.replace("url =", "retry_timeout = \"soon\"\nurl =")).unwrap_err();
    assert!(e.contains("soon"), "{e}");
}

#[test]
fn daemon_keys_validate_and_name_the_key() {
    let with = |extra: &str| Config::parse(&format!("{extra}\n{OK}"));
    let c =
        with("[schedule]\nbackup = \"0 2 * * *\"\ntimezone = \"Europe/Berlin\"\njitter = \"10m\"")
            .unwrap();
    let r = c.resolve_schedule("acme").unwrap();
    assert_eq!(r.backup.unwrap().expression(), "0 2 * * *");
    assert_eq!(r.jitter, Duration::from_secs(600));
    assert!(r.drill.is_none());
    // A cluster's own key wins over the global one.
    let c = Config::parse(&format!(
        "[schedule]\nbackup = \"0 2 * * *\"\n{OK}[clusters.acme.schedule]\nbackup = \"@hourly\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.resolve_schedule("acme")
            .unwrap()
            .backup
            .unwrap()
            .expression(),
        "@hourly"
    );
    for (extra, needle) in [
        (
            "[schedule]\nbackup = \"0 25 * * *\"",
            "clusters.acme.schedule.backup",
        ),
        ("[schedule]\ntimezone = \"Mars/Olympus\"", "Mars/Olympus"),
        ("[alerts]\nwebhook_url = \"ftp://x\"", "alerts.webhook_url"),
        ("[alerts]\ncommand = []", "alerts.command"),
        ("[metrics]\nlisten = \"nowhere\"", "metrics.listen"),
        ("[daemon]\nmax_concurrent_jobs = 0", "max_concurrent_jobs"),
        ("[daemon]\ncheck_interval = \"soon\"", "soon"),
        (
            "[alerts]\narchive_lag_warning = \"2h\"",
            "archive_lag_warning",
        ),
        ("[daemon]\nchek_interval = \"1s\"", "chek_interval"),
        (
            "[daemon]\nretry_backoff = \"300000000000y\"",
            "retry_backoff",
        ),
        ("[daemon]\ncheck_interval = \"2d\"", "daemon.check_interval"),
    ] {
        let e = with(extra).unwrap_err();
        assert!(e.contains(needle), "{extra}: {e}");
    }
    let e =
        Config::parse(&format!("{OK}[clusters.acme.drill]\ntarget = \"oldest\"\n")).unwrap_err();
    assert!(e.contains("clusters.acme.drill.target"), "{e}");
    // A webhook URL may hold a token: the error names the key, not the value.
    let e = with("[alerts]\nwebhook_url = \"hxxps://hooks.example/T0KEN\"").unwrap_err();
    assert!(!e.contains("T0KEN"), "{e}");
    let c = with("[alerts]\nwebhook_url = \"https://hooks.example/T0KEN\"").unwrap();
    assert!(!format!("{c:?}").contains("T0KEN"));
}

#[test]
fn example_config_is_valid() {
    let c = Config::parse(include_str!("../../config.example.toml")).unwrap();
    assert_eq!(c.cluster(None).unwrap().0, "acme");
}

#[test]
fn secrets_do_not_debug_print() {
    let c = Config::parse(
        &OK.replace(
            "url =",
            "secret_access_key = \"SUPERSECRET\"\naccess_key_id = \"AK\"\nurl =",
        )
        .replace("key_file", "connection = \"password=HUNTER2\"\nkey_file"),
    )
    .unwrap();
    let dbg = format!("{c:?} {:?}", c.s3_settings());
    assert!(
        !dbg.contains("SUPERSECRET") && !dbg.contains("HUNTER2"),
        "{dbg}"
    );
}

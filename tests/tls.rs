//! TLS to PostgreSQL: a cluster with ssl = on, a CA made by the test, and pg_hba rejecting
//! unencrypted TCP; tidemark connects with libpq's sslmode semantics.

mod common;

use std::path::Path;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn connects_with_tls_and_verifies_the_server() {
    let dir = TestDir::new("tls");
    make_ca(&dir.path, "ca");
    make_ca(&dir.path, "otherca");
    make_server_cert(&dir.path, "ca");
    for f in ["server.key", "server.crt", "ca.crt", "otherca.crt"] {
        chown_to_user(&dir.join(f));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let extra = format!(
        "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nlisten_addresses = '127.0.0.1'\n",
        dir.join("server.crt").display(),
        dir.join("server.key").display()
    );
    let pg = PgCluster::init(
        &dir,
        "pg",
        PgOptions {
            extra_conf: &extra,
            ..Default::default()
        },
    );
    // Unencrypted TCP is refused, so a successful TCP connection proves TLS was used.
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    pg.pg_ctl_start();
    tidemark(&dir.path, &["key", "generate", s(&dir.join("acme.key"))]).ok();

    let config = |conn: &str| {
        let path = dir.join("tls.toml");
        std::fs::write(
            &path,
            format!(
                "[repository]\nurl = \"file://{}\"\n[clusters.acme]\npgdata = \"{}\"\nconnection = \"{conn}\"\nkey_file = \"{}\"\n",
                dir.join("repo").display(),
                pg.data.display(),
                dir.join("acme.key").display()
            ),
        )
        .unwrap();
        chown_to_user(&path);
        path
    };
    let port = pg.port;
    let ca = dir.join("ca.crt");
    let other = dir.join("otherca.crt");

    // verify-full against the right CA and the certificate's IP address.
    let cfg = config(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        ca.display()
    ));
    tidemark(&dir.path, &["--config", s(&cfg), "init"]).ok();
    let r = tidemark(
        &dir.path,
        &["--config", s(&cfg), "check", "--no-switch", "--json"],
    );
    assert!(r.stdout.contains("reachable, PostgreSQL"), "{r:?}");
    // libpq's URL form too.
    let cfg = config(&format!(
        "postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        ca.display()
    ));
    tidemark(&dir.path, &["--config", s(&cfg), "init"]).ok();

    // Without TLS: refused by the server.
    let cfg = config(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"
    ));
    tidemark(&dir.path, &["--config", s(&cfg), "init"]).fails_with(8, "no encryption");
    // Another CA: the server is not trusted.
    let cfg = config(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        other.display()
    ));
    tidemark(&dir.path, &["--config", s(&cfg), "init"]).fails_with(8, "certificate");
    // The certificate names 127.0.0.1, not localhost: verify-full refuses, verify-ca accepts.
    let cfg = config(&format!(
        "host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
        ca.display()
    ));
    tidemark(&dir.path, &["--config", s(&cfg), "init"]).fails_with(8, "certificate");
    let cfg = config(&format!(
        "host=localhost port={port} user=postgres dbname=postgres sslmode=verify-ca sslrootcert={}",
        ca.display()
    ));
    tidemark(&dir.path, &["--config", s(&cfg), "init"]).ok();
    // require: encrypted without verification (libpq's meaning).
    let cfg = config(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require"
    ));
    tidemark(&dir.path, &["--config", s(&cfg), "init"]).ok();
    // verify-full without a root certificate is a configuration error.
    let cfg = config(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=verify-full"
    ));
    tidemark(&dir.path, &["--config", s(&cfg), "init"]).fails_with(8, "sslrootcert");
}

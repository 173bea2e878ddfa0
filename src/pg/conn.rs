//! Connections to the cluster being backed up.

use std::str::FromStr;

use tokio_postgres::{Client, Config, NoTls};

/// Facts about a running cluster that the repository records at `init`.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    pub system_identifier: u64,
    pub version_num: u32,
    pub wal_segment_size: u64,
}

/// A connection: the client, and the task that drives it. `close` ends the session cleanly
/// (PostgreSQL sees a Terminate message, not a dropped socket); dropping it also ends the
/// session, with a "connection lost" line in the server log.
pub struct Session {
    client: Option<Client>,
    task: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        // Only `close` takes the client, and it consumes the session.
        self.client.as_ref().expect("session not closed")
    }
}

impl Session {
    pub async fn close(mut self) {
        drop(self.client.take());
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
}

/// Why a connection or a query of this module failed. Messages name the host part only: a
/// connection string may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(transparent)]
    Tls(#[from] super::tls::TlsConfigError),
    #[error("invalid connection string: {0}")]
    ConnectionString(String),
    #[error("cannot connect to PostgreSQL at {target}: {detail}")]
    Connect { target: String, detail: String },
    /// A query's failure or an answer tidemark cannot read.
    #[error("{0}")]
    Query(String),
}

/// Connects with a libpq-style connection string. The string may hold a password: it is never
/// logged and errors name only the host part.
pub async fn connect(conninfo: &str) -> Result<Session, PgError> {
    let (rest, tls) = super::tls::split(conninfo)?;
    let config = Config::from_str(&rest)
        .map_err(|e| PgError::ConnectionString(first_line(&e.to_string())))?;
    let target = describe(&config);
    let failed = |e: tokio_postgres::Error| PgError::Connect {
        target: target.clone(),
        detail: error_chain(&e),
    };
    // PostgreSQL never speaks TLS over Unix sockets.
    let unix_only = config
        .get_hosts()
        .iter()
        .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
    let tls_config = if unix_only {
        None
    } else {
        super::tls::client_config(&tls)?
    };
    let (client, task) = match tls_config {
        None => {
            let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
            (client, tokio::spawn(drive(connection)))
        }
        Some(tls_config) => {
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config);
            let (client, connection) = config.connect(connector).await.map_err(failed)?;
            (client, tokio::spawn(drive(connection)))
        }
    };
    Ok(Session {
        client: Some(client),
        task,
    })
}

async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "PostgreSQL connection closed");
    }
}

/// The error and its causes on one line (TLS failures hide the reason in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = first_line(&e.to_string());
    let mut cur = e.source();
    while let Some(s) = cur {
        let line = first_line(&s.to_string());
        if !out.contains(&line) {
            out.push_str(": ");
            out.push_str(&line);
        }
        cur = s.source();
    }
    out
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// host:port of a config, without user or password.
fn describe(c: &Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

pub async fn identify(client: &Client) -> Result<ServerIdentity, PgError> {
    let row = client
        .query_one(
            "select (select system_identifier::text from pg_control_system()), \
                    current_setting('server_version_num'), \
                    (select setting from pg_settings where name = 'wal_segment_size')",
            &[],
        )
        .await
        .map_err(|e| PgError::Query(format!("querying the server's identity: {e}")))?;
    let sysid: String = row.get(0);
    let version: String = row.get(1);
    let segsize: String = row.get(2);
    Ok(ServerIdentity {
        system_identifier: sysid
            .parse()
            .map_err(|_| PgError::Query(format!("unexpected system identifier {sysid:?}")))?,
        version_num: version
            .parse()
            .map_err(|_| PgError::Query(format!("unexpected server_version_num {version:?}")))?,
        wal_segment_size: segsize
            .parse()
            .map_err(|_| PgError::Query(format!("unexpected wal_segment_size {segsize:?}")))?,
    })
}

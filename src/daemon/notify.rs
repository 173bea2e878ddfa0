//! Delivers notifications: a JSON POST to `[alerts] webhook_url` and/or the `[alerts] command`
//! (the JSON on its stdin), in order, each retried with backoff for a while. A receiver that
//! stays down loses notifications after the retries (logged, counted in
//! tidemark_alert_delivery_failures_total); it never blocks the daemon.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::alerts::Notification;

const ATTEMPTS: u32 = 6;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why a notification target could not be set up or a delivery failed. Setup errors
/// (`CaFile*`, `Tls`) reject the config; delivery errors are retried ATTEMPTS times, whatever
/// they are. No message prints the webhook URL: it may hold a token.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("alerts.webhook_ca_file {}: {source}", .path.display())]
    CaFileUnreadable {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("alerts.webhook_ca_file {}: {source}", .path.display())]
    CaFileCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("alerts.webhook_ca_file {}: no certificate in it", .path.display())]
    CaFileEmpty { path: PathBuf },
    #[error("TLS setup: {0}")]
    Tls(rustls::Error),
    #[error("webhook_url is not a valid request URL")]
    InvalidWebhookUrl,
    #[error("webhook: no response within {0:?}")]
    WebhookTimeout(Duration),
    /// The client error's chain, which names the failure (connect refused, TLS), not the URL.
    #[error("webhook: {0}")]
    WebhookRequest(String),
    #[error("webhook answered HTTP {0}")]
    WebhookStatus(hyper::StatusCode),
    #[error("alerts.command is empty")]
    EmptyCommand,
    #[error("alerts.command {program}: {source}")]
    Command {
        program: String,
        source: std::io::Error,
    },
    #[error("alerts.command {program}: still running after {timeout:?}")]
    CommandTimeout { program: String, timeout: Duration },
    #[error("alerts.command {program} exited with {status}: {stderr_last_line}")]
    CommandFailed {
        program: String,
        status: ExitStatus,
        stderr_last_line: String,
    },
}

#[derive(Clone)]
pub struct Targets {
    webhook: Option<(SecretString, HttpsClient)>,
    command: Option<Vec<String>>,
}

#[derive(Default)]
pub struct DeliveryCounters {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

impl Targets {
    pub fn new(
        webhook_url: Option<&SecretString>,
        ca_file: Option<&Path>,
        command: Option<&Vec<String>>,
    ) -> Result<Targets, NotifyError> {
        let webhook = match webhook_url {
            None => None,
            Some(url) => Some((url.clone(), https_client(ca_file)?)),
        };
        Ok(Targets {
            webhook,
            command: command.cloned(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.webhook.is_none() && self.command.is_none()
    }
}

fn https_client(ca_file: Option<&Path>) -> Result<HttpsClient, NotifyError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(path) = ca_file {
        let unreadable = |source| NotifyError::CaFileUnreadable {
            path: path.to_path_buf(),
            source,
        };
        let mut n = 0;
        for c in CertificateDer::pem_file_iter(path).map_err(unreadable)? {
            roots
                .add(c.map_err(unreadable)?)
                .map_err(|source| NotifyError::CaFileCertificate {
                    path: path.to_path_buf(),
                    source,
                })?;
            n += 1;
        }
        if n == 0 {
            return Err(NotifyError::CaFileEmpty {
                path: path.to_path_buf(),
            });
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(NotifyError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// Notifications waiting for delivery. Each failing delivery takes about a minute of retries;
/// dedup keeps the rate far below that, but a receiver down for days must not grow the queue
/// without bound: beyond this, new notifications are dropped (logged and counted as failed).
pub const QUEUE: usize = 256;

/// Starts the delivery task; send notifications into the returned channel (`try_send`: a
/// full queue drops, see QUEUE). Targets can be replaced (config reload) through the watch
/// sender.
pub fn start(
    targets: tokio::sync::watch::Receiver<Targets>,
    counters: Arc<DeliveryCounters>,
) -> mpsc::Sender<Notification> {
    let (tx, mut rx) = mpsc::channel::<Notification>(QUEUE);
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            let t = targets.borrow().clone();
            let ok = deliver(&t, &n).await;
            if ok {
                counters.sent.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    tx
}

/// Delivers one notification to every target; true when all succeeded.
pub async fn deliver(t: &Targets, n: &Notification) -> bool {
    let body = match serde_json::to_vec(n) {
        Ok(b) => b,
        Err(_) => return false,
    };
    let mut ok = true;
    if let Some((url, client)) = &t.webhook {
        ok &= retry("webhook", n, || post(client, url, body.clone())).await;
    }
    if let Some(cmd) = &t.command {
        ok &= retry("command", n, || run_command(cmd, n, body.clone())).await;
    }
    if t.webhook.is_none() && t.command.is_none() {
        tracing::warn!(event = %n.event, cluster = %n.cluster, severity = %n.severity, "alert (no [alerts] webhook_url or command configured): {}", n.message);
    }
    ok
}

async fn retry<F, Fut>(what: &str, n: &Notification, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), NotifyError>>,
{
    let mut wait = Duration::from_secs(1);
    for attempt in 1..=ATTEMPTS {
        match f().await {
            Ok(()) => {
                tracing::info!(target_kind = what, event = %n.event, cluster = %n.cluster, severity = %n.severity, "alert delivered");
                return true;
            }
            Err(e) if attempt == ATTEMPTS => {
                tracing::error!(target_kind = what, event = %n.event, cluster = %n.cluster, error = %e, "alert not delivered after {ATTEMPTS} attempts");
            }
            Err(e) => {
                tracing::warn!(target_kind = what, event = %n.event, error = %e, "alert delivery failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
    false
}

async fn post(client: &HttpsClient, url: &SecretString, body: Vec<u8>) -> Result<(), NotifyError> {
    // Errors never print the URL: it may hold a token.
    let req = hyper::Request::post(url.expose_secret())
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("tidemark/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| NotifyError::InvalidWebhookUrl)?;
    let resp = tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req))
        .await
        .map_err(|_| NotifyError::WebhookTimeout(ATTEMPT_TIMEOUT))?
        .map_err(|e| NotifyError::WebhookRequest(redact_error(&e)))?;
    let status = resp.status();
    // Drain the body so the connection can be reused.
    let _ = tokio::time::timeout(ATTEMPT_TIMEOUT, resp.into_body().collect()).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(NotifyError::WebhookStatus(status))
    }
}

/// hyper's errors name the failure (connect refused, TLS), not the URL; keep the chain.
fn redact_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}

async fn run_command(cmd: &[String], n: &Notification, body: Vec<u8>) -> Result<(), NotifyError> {
    let (program, args) = cmd.split_first().ok_or(NotifyError::EmptyCommand)?;
    let io_error = |source| NotifyError::Command {
        program: program.clone(),
        source,
    };
    let mut c = tokio::process::Command::new(program);
    c.args(args)
        .env("TIDEMARK_ALERT_CLUSTER", &n.cluster)
        .env("TIDEMARK_ALERT_SEVERITY", &n.severity)
        .env("TIDEMARK_ALERT_STATUS", &n.status)
        .env("TIDEMARK_ALERT_EVENT", &n.event)
        .env("TIDEMARK_ALERT_MESSAGE", &n.message)
        .env("TIDEMARK_ALERT_TEXT", &n.text)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().map_err(io_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| NotifyError::CommandTimeout {
            program: program.clone(),
            timeout: COMMAND_TIMEOUT,
        })?
        .map_err(io_error)?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(NotifyError::CommandFailed {
            program: program.clone(),
            status: out.status,
            stderr_last_line: err.lines().last().unwrap_or("").to_string(),
        })
    }
}

//! A repository in an S3-compatible object store (AWS S3, MinIO, Garage, Ceph, R2).
//!
//! Compatibility choices: checksums are calculated and validated only when an operation
//! requires them (Garage and others reject or lack the newer default checksums), path-style
//! addressing is available, the region is explicit, and stalled-stream protection is off for
//! uploads (our bodies are in memory; a slow store must not fail a part).
//!
//! Retries: the SDK's own retries are disabled and every request is retried here, per request
//! (per part for multipart uploads, since the SDK cannot replay a custom stream), with
//! exponential backoff and jitter until an overall deadline. Each attempt is bounded by a third
//! of the deadline (at least 5 s) and by the time left, so a hung request is retried and none
//! outlives the deadline.
//!
//! Durability: an object exists only after PutObject or CompleteMultipartUpload succeeded.
//! Multipart parts have a fixed size (R2 requires equal parts); at most `MAX_INFLIGHT_PARTS`
//! are uploading while the next one fills, so a writer holds at most
//! (MAX_INFLIGHT_PARTS + 1) × part size of memory. A failed upload is aborted.

use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::JoinHandle;

use super::{
    ObjectMeta, ObjectReader, ObjectWriter, OpenError, Store, StoreError, StoreOptions,
    validate_key,
};

/// Part size of multipart uploads; objects up to this size go up in one PUT (a WAL segment
/// compresses below it). 8 MiB keeps a writer under ~20 MiB, so even --parallel 8 stays far
/// below 256 MiB, and is above the 5 MiB minimum part of S3 and R2.
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploading while the next one fills.
const MAX_INFLIGHT_PARTS: usize = 1;

/// S3 connection settings from the configuration.
#[derive(Clone, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    /// Extra CA certificates (PEM) for an https endpoint, trusted besides the system roots.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field("access_key_id", &self.access_key_id)
            .field("ca_file", &self.ca_file)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Clone)]
struct Inner {
    client: Client,
    bucket: String,
    prefix: String,
    opts: StoreOptions,
    describe: String,
}

#[derive(Clone)]
pub struct S3Store {
    inner: Inner,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Store({})", self.inner.describe)
    }
}

impl S3Store {
    pub async fn new(
        bucket: &str,
        prefix: &str,
        settings: &S3Settings,
        opts: &StoreOptions,
    ) -> Result<S3Store, OpenError> {
        let region = settings
            .region
            .clone()
            .unwrap_or_else(|| "us-east-1".to_string());
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(opts.connect_timeout)
                    .build(),
            )
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .upload_enabled(false)
                    .build(),
            );
        match (&settings.access_key_id, &settings.secret_access_key) {
            (Some(id), Some(secret)) => {
                loader = loader.credentials_provider(Credentials::new(
                    id,
                    secret.expose_secret(),
                    None,
                    None,
                    "tidemark-config",
                ))
            }
            (None, None) => {} // the standard AWS chain: environment, profile, instance role
            _ => return Err(OpenError::HalfCredentials),
        }
        if let Some(ep) = &settings.endpoint {
            loader = loader.endpoint_url(ep);
        }
        if let Some(ca) = &settings.ca_file {
            use aws_smithy_http_client::tls;
            let bad = |detail: String| OpenError::CaFile {
                path: ca.clone(),
                detail,
            };
            let pem = std::fs::read(ca).map_err(|e| bad(e.to_string()))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(OpenError::CaFileWithoutCertificate { path: ca.clone() });
            }
            let context = tls::TlsContext::builder()
                .with_trust_store(tls::TrustStore::default().with_pem_certificate(pem))
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let client = aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .tls_context(context)
                .build_https();
            loader = loader.http_client(client);
        }
        let shared = loader.load().await;
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let describe = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        Ok(S3Store {
            inner: Inner {
                client: Client::from_conf(conf),
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
                opts: opts.clone(),
                describe,
            },
        })
    }
}

enum Class {
    Retry,
    NotFound,
    Fatal,
}

fn classify<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Class
where
    R: HasStatus,
{
    match e {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Class::Retry,
        SdkError::DispatchFailure(d) => {
            if d.is_user() {
                Class::Fatal
            } else {
                Class::Retry
            }
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status_code();
            let code = s.err().code().unwrap_or("");
            if status == 404 || code == "NoSuchKey" || code == "NotFound" {
                Class::NotFound
            } else if status >= 500
                || status == 429
                || matches!(
                    code,
                    "SlowDown"
                        | "Throttling"
                        | "ThrottlingException"
                        | "RequestTimeout"
                        | "InternalError"
                        | "ServiceUnavailable"
                )
            {
                Class::Retry
            } else {
                Class::Fatal
            }
        }
        _ => Class::Fatal,
    }
}

trait HasStatus {
    fn status_code(&self) -> u16;
}
impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl Inner {
    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Runs one S3 request with retries until the deadline.
    async fn call<T, E, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let deadline = Instant::now() + self.opts.retry_deadline;
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // One attempt gets a third of the budget (at least 5 s): a request that never gets an
            // answer is retried instead of eating the whole deadline.
            let attempt_limit = (self.opts.retry_deadline / 3).max(Duration::from_secs(5));
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(attempt_limit);
            let detail = match tokio::time::timeout(left, f()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => match classify(&e) {
                    Class::NotFound => {
                        return Err(StoreError::NotFound {
                            store: self.describe.clone(),
                            key: key.to_string(),
                        });
                    }
                    Class::Fatal => {
                        return Err(StoreError::Failed {
                            store: self.describe.clone(),
                            op,
                            key: key.to_string(),
                            detail: one_line(&DisplayErrorContext(&e).to_string()),
                        });
                    }
                    Class::Retry => one_line(&DisplayErrorContext(&e).to_string()),
                },
                Err(_) => "attempt timed out".to_string(),
            };
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            if Instant::now() + delay >= deadline {
                return Err(StoreError::Unavailable {
                    store: self.describe.clone(),
                    op,
                    key: key.to_string(),
                    detail: format!(
                        "gave up after {attempt} attempts in {:?}: {detail}",
                        self.opts.retry_deadline
                    ),
                });
            }
            tracing::warn!(store = %self.describe, op, key, attempt, retry_in = ?delay, error = %detail, "S3 request failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

fn to_utc(t: &aws_sdk_s3::primitives::DateTime) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

/// SDK error contexts span lines; error output is one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[async_trait]
impl Store for S3Store {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    async fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        validate_key(key).map_err(|detail| StoreError::Failed {
            store: self.describe(),
            op: "create",
            key: key.to_string(),
            detail,
        })?;
        Ok(Box::new(S3Writer {
            inner: self.inner.clone(),
            key: key.to_string(),
            buf: Vec::new(),
            upload_id: None,
            parts: Vec::new(),
            inflight: Vec::new(),
            written: 0,
            finished: false,
        }))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StoreError> {
        let full = self.inner.full_key(key);
        let out = self
            .inner
            .call("get", key, || {
                self.inner
                    .client
                    .get_object()
                    .bucket(&self.inner.bucket)
                    .key(&full)
                    .send()
            })
            .await?;
        Ok(Box::pin(out.body.into_async_read()))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let full = self.inner.full_key(key);
        let res = self
            .inner
            .call("head", key, || {
                self.inner
                    .client
                    .head_object()
                    .bucket(&self.inner.bucket)
                    .key(&full)
                    .send()
            })
            .await;
        match res {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                modified: out.last_modified().and_then(to_utc),
            })),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let full = self.inner.full_key(prefix);
        let strip = if self.inner.prefix.is_empty() {
            0
        } else {
            self.inner.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .inner
                .call("list", prefix, || {
                    self.inner
                        .client
                        .list_objects_v2()
                        .bucket(&self.inner.bucket)
                        .prefix(&full)
                        .set_continuation_token(token.clone())
                        .send()
                })
                .await?;
            for obj in page.contents() {
                if let Some(k) = obj.key().filter(|k| k.len() > strip) {
                    out.push(ObjectMeta {
                        key: k[strip..].to_string(),
                        size: obj.size().unwrap_or(0).max(0) as u64,
                        modified: obj.last_modified().and_then(to_utc),
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn remove_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        for m in self.list(prefix).await? {
            self.delete(&m.key).await?;
        }
        // Unfinished multipart uploads are invisible to listing but hold storage.
        let full = self.inner.full_key(prefix);
        let mut key_marker: Option<String> = None;
        let mut id_marker: Option<String> = None;
        loop {
            let page = self
                .inner
                .call("list multipart uploads", prefix, || {
                    self.inner
                        .client
                        .list_multipart_uploads()
                        .bucket(&self.inner.bucket)
                        .prefix(&full)
                        .set_key_marker(key_marker.clone())
                        .set_upload_id_marker(id_marker.clone())
                        .send()
                })
                .await?;
            for u in page.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    let _ = self
                        .inner
                        .call("abort multipart upload", prefix, || {
                            self.inner
                                .client
                                .abort_multipart_upload()
                                .bucket(&self.inner.bucket)
                                .key(k)
                                .upload_id(id)
                                .send()
                        })
                        .await;
                }
            }
            if page.is_truncated() == Some(true) {
                key_marker = page.next_key_marker().map(str::to_string);
                id_marker = page.next_upload_id_marker().map(str::to_string);
                if key_marker.is_none() {
                    break;
                }
            } else {
                break;
            }
        }
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.inner.full_key(key);
        match self
            .inner
            .call("delete", key, || {
                self.inner
                    .client
                    .delete_object()
                    .bucket(&self.inner.bucket)
                    .key(&full)
                    .send()
            })
            .await
        {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

struct S3Writer {
    inner: Inner,
    key: String,
    /// Bytes not yet handed to an upload; never grows past a part and one write.
    buf: Vec<u8>,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    inflight: Vec<JoinHandle<Result<CompletedPart, StoreError>>>,
    written: u64,
    finished: bool,
}

impl S3Writer {
    async fn start_part(&mut self, body: Bytes) -> Result<(), StoreError> {
        let full = self.inner.full_key(&self.key);
        if self.upload_id.is_none() {
            let out = self
                .inner
                .call("create multipart upload", &self.key, || {
                    self.inner
                        .client
                        .create_multipart_upload()
                        .bucket(&self.inner.bucket)
                        .key(&full)
                        .send()
                })
                .await?;
            let id = out.upload_id().ok_or_else(|| StoreError::Failed {
                store: self.inner.describe.clone(),
                op: "create multipart upload",
                key: self.key.clone(),
                detail: "no upload id in the response".into(),
            })?;
            self.upload_id = Some(id.to_string());
        }
        while self.inflight.len() >= MAX_INFLIGHT_PARTS {
            let h = self.inflight.remove(0);
            self.parts.push(join_part(h, &self.inner, &self.key).await?);
        }
        let part_number = (self.parts.len() + self.inflight.len() + 1) as i32;
        let inner = self.inner.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone().unwrap_or_default();
        self.inflight.push(tokio::spawn(async move {
            let out = inner
                .call("upload part", &key, || {
                    inner
                        .client
                        .upload_part()
                        .bucket(&inner.bucket)
                        .key(&full)
                        .upload_id(&upload_id)
                        .part_number(part_number)
                        .body(ByteStream::from(body.clone()))
                        .send()
                })
                .await?;
            Ok(CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .build())
        }));
        Ok(())
    }

    async fn abort_upload(&mut self) {
        for h in self.inflight.drain(..) {
            h.abort();
        }
        if let Some(id) = self.upload_id.take() {
            let full = self.inner.full_key(&self.key);
            let _ = self
                .inner
                .call("abort multipart upload", &self.key, || {
                    self.inner
                        .client
                        .abort_multipart_upload()
                        .bucket(&self.inner.bucket)
                        .key(&full)
                        .upload_id(&id)
                        .send()
                })
                .await;
        }
    }

    async fn commit_inner(&mut self) -> Result<u64, StoreError> {
        let full = self.inner.full_key(&self.key);
        if self.upload_id.is_none() {
            let body = Bytes::from(std::mem::take(&mut self.buf));
            self.inner
                .call("put", &self.key, || {
                    self.inner
                        .client
                        .put_object()
                        .bucket(&self.inner.bucket)
                        .key(&full)
                        .body(ByteStream::from(body.clone()))
                        .send()
                })
                .await?;
            return Ok(self.written);
        }
        if !self.buf.is_empty() {
            let last = Bytes::from(std::mem::take(&mut self.buf));
            self.start_part(last).await?;
        }
        for h in std::mem::take(&mut self.inflight) {
            let part = join_part(h, &self.inner, &self.key).await?;
            self.parts.push(part);
        }
        let upload = CompletedMultipartUpload::builder()
            .set_parts(Some(self.parts.clone()))
            .build();
        let id = self.upload_id.clone().unwrap_or_default();
        self.inner
            .call("complete multipart upload", &self.key, || {
                self.inner
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.inner.bucket)
                    .key(&full)
                    .upload_id(&id)
                    .multipart_upload(upload.clone())
                    .send()
            })
            .await?;
        self.upload_id = None;
        Ok(self.written)
    }
}

async fn join_part(
    h: JoinHandle<Result<CompletedPart, StoreError>>,
    inner: &Inner,
    key: &str,
) -> Result<CompletedPart, StoreError> {
    h.await.map_err(|e| StoreError::Failed {
        store: inner.describe.clone(),
        op: "upload part",
        key: key.to_string(),
        detail: e.to_string(),
    })?
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, data: Bytes) -> Result<(), StoreError> {
        self.written += data.len() as u64;
        let need = self.buf.len() + data.len();
        if need > self.buf.capacity() {
            // Grow geometrically, but not past one part plus this write: a part keeps its
            // allocation until uploaded, so slack here is memory held per writer.
            let target = (self.buf.capacity() * 2)
                .min(PART_SIZE + data.len())
                .max(need);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(&data);
        // Strictly more than a part: an object of exactly PART_SIZE still goes in one PUT.
        while self.buf.len() > PART_SIZE {
            let rest = self.buf.split_off(PART_SIZE);
            let part = Bytes::from(std::mem::replace(&mut self.buf, rest));
            if let Err(e) = self.start_part(part).await {
                self.abort_upload().await;
                self.finished = true;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<u64, StoreError> {
        let res = self.commit_inner().await;
        if res.is_err() {
            self.abort_upload().await;
        }
        self.finished = true;
        res
    }

    async fn abort(mut self: Box<Self>) {
        self.abort_upload().await;
        self.finished = true;
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for h in self.inflight.drain(..) {
            h.abort();
        }
        // Best effort: a process that exits right away may not get to run this; a bucket
        // lifecycle rule (AbortIncompleteMultipartUpload) collects what is left, and an
        // unfinished multipart upload is never visible as an object.
        if let (Some(id), Ok(rt)) = (self.upload_id.take(), tokio::runtime::Handle::try_current()) {
            let client = self.inner.client.clone();
            let bucket = self.inner.bucket.clone();
            let full = self.inner.full_key(&self.key);
            rt.spawn(async move {
                let _ = client
                    .abort_multipart_upload()
                    .bucket(bucket)
                    .key(full)
                    .upload_id(id)
                    .send()
                    .await;
            });
        }
    }
}

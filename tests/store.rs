//! The store contract on both backends: multipart uploads (several parts, equal size), single
//! PUTs, aborted writers leaving nothing visible, listing, prefix removal.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use tidemark::store::{self, Store, StoreOptions, s3::S3Settings};
use tokio::io::AsyncReadExt;

async fn open(kind: &StoreKind, dir: &TestDir) -> Arc<dyn Store> {
    match kind {
        StoreKind::Local => store::from_url(
            &format!("file://{}", dir.join("repo").display()),
            &S3Settings::default(),
            &StoreOptions::default(),
        )
        .await
        .unwrap(),
        StoreKind::S3(t) => store::from_url(
            &format!("s3://{}/{}", t.bucket, t.prefix),
            &S3Settings {
                endpoint: Some(t.endpoint.clone()),
                region: Some(t.region.clone()),
                force_path_style: true,
                access_key_id: Some(t.access_key_id.clone()),
                secret_access_key: Some(t.secret_access_key.clone().into()),
                ca_file: None,
            },
            &StoreOptions::default(),
        )
        .await
        .unwrap(),
    }
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn contract(kind: StoreKind, tag: &str) {
    let dir = TestDir::new(tag);
    let s = open(&kind, &dir).await;
    // Several parts plus a short last one, written in uneven pieces.
    let big = noise(store::s3::PART_SIZE * 2 + 12345, 7);
    let mut w = s.create("c/big").await.unwrap();
    for piece in big.chunks(1_000_003) {
        w.write(Bytes::copy_from_slice(piece)).await.unwrap();
    }
    assert_eq!(w.commit().await.unwrap(), big.len() as u64);
    assert_eq!(
        s.head("c/big").await.unwrap().unwrap().size,
        big.len() as u64
    );
    let mut got = Vec::new();
    s.get("c/big")
        .await
        .unwrap()
        .read_to_end(&mut got)
        .await
        .unwrap();
    assert!(got == big, "multipart object differs");

    // Exactly one part's worth goes up in one PUT, and an empty object is an object.
    let one = noise(store::s3::PART_SIZE, 8);
    s.put_bytes("c/one", Bytes::from(one.clone()))
        .await
        .unwrap();
    assert_eq!(s.get_bytes("c/one", 1 << 30).await.unwrap(), one);
    s.put_bytes("c/empty", Bytes::new()).await.unwrap();
    assert_eq!(s.head("c/empty").await.unwrap().unwrap().size, 0);

    // An aborted writer (mid-multipart) leaves nothing visible.
    let mut w = s.create("c/aborted").await.unwrap();
    w.write(Bytes::from(noise(store::s3::PART_SIZE + 10, 9)))
        .await
        .unwrap();
    w.abort().await;
    assert!(s.head("c/aborted").await.unwrap().is_none());
    // So does a dropped one.
    let mut w = s.create("c/dropped").await.unwrap();
    w.write(Bytes::from(noise(store::s3::PART_SIZE + 10, 10)))
        .await
        .unwrap();
    drop(w);
    assert!(s.head("c/dropped").await.unwrap().is_none());

    let keys: Vec<String> = s
        .list("c/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["c/big", "c/empty", "c/one"]);
    assert!(s.get("c/missing").await.err().unwrap().is_not_found());

    s.remove_prefix("c/").await.unwrap();
    assert!(s.list("c/").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn store_contract_local() {
    contract(StoreKind::Local, "stl").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn store_contract_s3() {
    let (kind, _garage) = s3_store("sts3");
    contract(kind, "sts3").await;
}

/// A TLS-terminating proxy on 127.0.0.1 in front of `upstream` (what a TLS load balancer in
/// front of a private S3 store does).
async fn tls_proxy(dir: &std::path::Path, upstream: String) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    port
}

/// An https endpoint signed by a private CA: trusted with repository.ca_file, refused without.
#[tokio::test(flavor = "multi_thread")]
async fn s3_over_https_with_a_private_ca() {
    let garage = Garage::start("s3tls");
    let dir = TestDir::new("s3tlsca");
    make_ca(&dir.path, "ca");
    make_server_cert(&dir.path, "ca");
    let upstream = garage
        .target
        .endpoint
        .trim_start_matches("http://")
        .to_string();
    let port = tls_proxy(&dir.path, upstream).await;
    let t = &garage.target;
    let settings = |ca: Option<std::path::PathBuf>| S3Settings {
        endpoint: Some(format!("https://127.0.0.1:{port}")),
        region: Some(t.region.clone()),
        force_path_style: true,
        access_key_id: Some(t.access_key_id.clone()),
        secret_access_key: Some(t.secret_access_key.clone().into()),
        ca_file: ca,
    };
    let opts = StoreOptions {
        retry_deadline: std::time::Duration::from_secs(2),
        connect_timeout: std::time::Duration::from_secs(1),
    };
    let url = format!("s3://{}/{}", t.bucket, t.prefix);

    let s = store::from_url(&url, &settings(Some(dir.join("ca.crt"))), &opts)
        .await
        .unwrap();
    s.put_bytes("tls/obj", Bytes::from_static(b"over https"))
        .await
        .unwrap();
    assert_eq!(s.get_bytes("tls/obj", 100).await.unwrap(), b"over https");

    let untrusting = store::from_url(&url, &settings(None), &opts).await.unwrap();
    let e = untrusting
        .get_bytes("tls/obj", 100)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.to_lowercase().contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );

    let e = store::from_url(&url, &settings(Some(dir.join("ext.cnf"))), &opts)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

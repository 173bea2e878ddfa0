//! TLS to PostgreSQL, with libpq's sslmode semantics.
//!
//! tokio-postgres parses only sslmode=disable|prefer|require and knows no sslrootcert, so the
//! connection string is split here: `sslmode` and `sslrootcert` are taken out and honoured
//! with rustls (AWS-LC provider, the tree's only one), the rest goes to tokio-postgres.
//!
//! | sslmode | encrypted | certificate checked |
//! |---|---|---|
//! | disable | no | - |
//! | allow, prefer | if the server offers it | no |
//! | require | yes | only if sslrootcert is given (then as verify-ca, as libpq does) |
//! | verify-ca | yes | chain to sslrootcert |
//! | verify-full | yes | chain to sslrootcert and the host name (or IP address) |

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, DigitallySignedStruct, Error as RustlsError, RootCertStore, SignatureScheme,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub rootcert: Option<PathBuf>,
}

/// Why a connection string's TLS settings cannot be used. The connection string may hold a
/// password: no variant carries a value other than a key name, the sslmode or the root
/// certificate's path.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("invalid connection string: expected '=' after {key:?}")]
    ExpectedEquals { key: String },
    #[error("invalid connection string: unterminated quote")]
    UnterminatedQuote,
    #[error("invalid sslmode {mode:?}")]
    InvalidSslMode { mode: String },
    #[error("sslmode=verify-ca/verify-full needs sslrootcert=FILE (the CA certificate)")]
    RootCertNeeded,
    /// `client_config` was handed verify settings without a root certificate.
    #[error("sslrootcert missing")]
    RootCertMissing,
    /// The root certificate file cannot be read or parsed, or holds an unusable certificate.
    #[error("sslrootcert {}: {detail}", .path.display())]
    RootCert { path: PathBuf, detail: String },
    #[error("sslrootcert {}: no certificate in it", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("TLS setup: {0}")]
    Setup(RustlsError),
}

/// One `key=value` pair of a libpq connection string.
fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, TlsConfigError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(TlsConfigError::ExpectedEquals { key });
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(TlsConfigError::UnterminatedQuote),
                    Some('\\') => {
                        if let Some(c) = chars.next() {
                            value.push(c);
                        }
                    }
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Splits sslmode/sslrootcert out of a connection string; returns the rest for tokio-postgres
/// (with sslmode set to what tokio-postgres should negotiate).
pub fn split(conninfo: &str) -> Result<(String, TlsSettings), TlsConfigError> {
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        return split_url(conninfo);
    }
    let mut mode = SslMode::Prefer; // libpq's default
    let mut rootcert = None;
    let mut rest = Vec::new();
    for (k, v) in parse_pairs(conninfo)? {
        match k.as_str() {
            "sslmode" => mode = parse_mode(&v)?,
            "sslrootcert" => rootcert = Some(PathBuf::from(v)),
            _ => rest.push(format!("{k}={}", quote(&v))),
        }
    }
    rest.push(format!("sslmode={}", negotiated(mode)));
    Ok((rest.join(" "), settings(mode, rootcert)?))
}

fn split_url(url: &str) -> Result<(String, TlsSettings), TlsConfigError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = SslMode::Prefer;
    let mut rootcert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => mode = parse_mode(v)?,
            "sslrootcert" => rootcert = Some(PathBuf::from(v)),
            _ => rest.push(pair.to_string()),
        }
    }
    rest.push(format!("sslmode={}", negotiated(mode)));
    Ok((
        format!("{base}?{}", rest.join("&")),
        settings(mode, rootcert)?,
    ))
}

fn parse_mode(v: &str) -> Result<SslMode, TlsConfigError> {
    Ok(match v {
        "disable" => SslMode::Disable,
        "allow" | "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        other => {
            return Err(TlsConfigError::InvalidSslMode {
                mode: other.to_string(),
            });
        }
    })
}

fn negotiated(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        _ => "require",
    }
}

fn settings(mode: SslMode, rootcert: Option<PathBuf>) -> Result<TlsSettings, TlsConfigError> {
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && rootcert.is_none() {
        return Err(TlsConfigError::RootCertNeeded);
    }
    // libpq: with a root certificate, require verifies the chain like verify-ca.
    let mode = if mode == SslMode::Require && rootcert.is_some() {
        SslMode::VerifyCa
    } else {
        mode
    };
    Ok(TlsSettings { mode, rootcert })
}

/// The rustls client configuration for these settings (None for sslmode=disable).
pub fn client_config(s: &TlsSettings) -> Result<Option<rustls::ClientConfig>, TlsConfigError> {
    if s.mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match s.mode {
        SslMode::Prefer | SslMode::Require => Arc::new(NoVerification(provider.clone())),
        _ => {
            let path = s.rootcert.as_ref().ok_or(TlsConfigError::RootCertMissing)?;
            let bad = |e: &dyn std::fmt::Display| TlsConfigError::RootCert {
                path: path.clone(),
                detail: e.to_string(),
            };
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))?;
            for c in certs {
                let c = c.map_err(|e| bad(&e))?;
                roots.add(c).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(TlsConfigError::NoCertificate { path: path.clone() });
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| bad(&e))?;
            if s.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Setup)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(config))
}

/// sslmode=prefer/require without a root certificate: encrypted, not authenticated (libpq's
/// semantics). Handshake signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// sslmode=verify-ca: the chain must lead to the root certificate; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(RustlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_libpq_strings() {
        let (rest, s) = split("host=db port=5432 user=postgres sslmode=verify-full sslrootcert=/etc/ca.crt dbname='my db'").unwrap();
        assert_eq!(
            s,
            TlsSettings {
                mode: SslMode::VerifyFull,
                rootcert: Some("/etc/ca.crt".into())
            }
        );
        assert_eq!(
            rest,
            "host='db' port='5432' user='postgres' dbname='my db' sslmode=require"
        );
        let (_, s) = split("host=db").unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        let (_, s) = split("host=db sslmode=require sslrootcert=/ca").unwrap();
        assert_eq!(
            s.mode,
            SslMode::VerifyCa,
            "require with a root cert verifies the chain"
        );
        assert!(
            matches!(
                split("host=db sslmode=verify-full"),
                Err(TlsConfigError::RootCertNeeded)
            ),
            "needs sslrootcert"
        );
        let msg = |conninfo: &str| split(conninfo).unwrap_err().to_string();
        assert_eq!(msg("host=db sslmode=bogus"), r#"invalid sslmode "bogus""#);
        assert_eq!(
            msg("host='db"),
            "invalid connection string: unterminated quote"
        );
        assert_eq!(
            msg("host db"),
            r#"invalid connection string: expected '=' after "host""#
        );
        let (rest, s) = split(r"password='it\'s a secret' host=x").unwrap();
        assert_eq!(rest, r"password='it\'s a secret' host='x' sslmode=prefer");
        assert_eq!(s.mode, SslMode::Prefer);
        let (rest, s) =
            split("postgresql://u@h:5/d?sslmode=verify-ca&sslrootcert=/ca&application_name=x")
                .unwrap();
        assert_eq!(s.mode, SslMode::VerifyCa);
        assert_eq!(
            rest,
            "postgresql://u@h:5/d?application_name=x&sslmode=require"
        );
    }

    #[test]
    fn root_certificate_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let verify = |path: &std::path::Path| {
            client_config(&TlsSettings {
                mode: SslMode::VerifyCa,
                rootcert: Some(path.to_path_buf()),
            })
            .unwrap_err()
        };
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        assert_eq!(
            verify(&empty).to_string(),
            format!("sslrootcert {}: no certificate in it", empty.display())
        );
        let missing = dir.path().join("missing.crt");
        let e = verify(&missing);
        assert!(matches!(e, TlsConfigError::RootCert { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("sslrootcert {}: ", missing.display())),
            "{e}"
        );
    }
}

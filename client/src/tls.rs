//! TLS for QUIC: which CA to trust, and the rustls / quinn client configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use orbitmq_proto::header::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{TlsOptions, DEFAULT_TLS_CA_PATH, TLS_CA_ENV};
use crate::error::{ClientError, Result};

/// What the client will do about the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustSource {
    /// Verify against the CA certificates in this PEM file.
    CaFile(PathBuf),
    /// Do not verify (explicit `--insecure`).
    Insecure,
}

/// Resolution order: `--insecure`, an explicit path, `ORBITMQ_TLS_CA`, then
/// `./orbitmq-data/tls/ca.pem` when it exists. Pure: the environment and the file check
/// are passed in.
pub fn resolve_trust(
    opts: &TlsOptions,
    env_ca: Option<String>,
    default_exists: impl Fn(&Path) -> bool,
) -> Result<TrustSource> {
    if opts.insecure {
        return Ok(TrustSource::Insecure);
    }
    if let Some(p) = &opts.ca {
        return Ok(TrustSource::CaFile(p.clone()));
    }
    if let Some(p) = env_ca.filter(|s| !s.trim().is_empty()) {
        return Ok(TrustSource::CaFile(PathBuf::from(p)));
    }
    let default = Path::new(DEFAULT_TLS_CA_PATH);
    if default_exists(default) {
        return Ok(TrustSource::CaFile(default.to_path_buf()));
    }
    Err(ClientError::Tls(format!(
        "no CA certificate to verify the broker with: pass --tls-ca PATH (or set {TLS_CA_ENV}, \
         or run next to a standalone broker's {DEFAULT_TLS_CA_PATH}), or --insecure to skip \
         verification"
    )))
}

/// The ring provider (the only one compiled in: aws-lc-rs needs cmake) with AES-128-GCM first:
/// TLS 1.3's mandatory suite, 10 AES rounds per block to AES-256's 14, on every packet (AES-GCM
/// was about 8% of all CPU in the produce benchmark). Brokers use it too.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Builds the rustls configuration: TLS 1.3 only, ALPN `orbitmq/2`, no early data (a
/// replayed 0-RTT send would duplicate a message).
pub fn rustls_config(opts: &TlsOptions) -> Result<rustls::ClientConfig> {
    let trust = resolve_trust(opts, std::env::var(TLS_CA_ENV).ok(), |p| p.is_file())?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = match trust {
        TrustSource::Insecure => {
            tracing::warn!("TLS certificate verification is disabled (--insecure)");
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
                .with_no_client_auth()
        }
        TrustSource::CaFile(path) => {
            let roots = load_roots(&path)?;
            tracing::debug!(ca = %path.display(), "verifying brokers with CA file");
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// Reads every certificate of a PEM file into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore> {
    let bytes = std::fs::read(path)
        .map_err(|e| ClientError::Tls(format!("cannot read CA file {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    let mut n = 0usize;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| {
            ClientError::Tls(format!("CA file {} is not valid PEM: {e}", path.display()))
        })?;
        roots.add(cert).map_err(|e| {
            ClientError::Tls(format!("CA file {}: bad certificate: {e}", path.display()))
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(ClientError::Tls(format!(
            "CA file {} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// Accepts any certificate but still checks the handshake signatures (so the peer holds the
/// key of the certificate it showed). Only behind an explicit `insecure`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
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
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_offered_first_and_the_other_suites_stay() {
        let p = provider();
        let names: Vec<_> = p.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(names[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert!(names.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
        let all = rustls::crypto::ring::default_provider().cipher_suites.len();
        assert_eq!(names.len(), all);
    }

    fn opts(ca: Option<&str>, insecure: bool) -> TlsOptions {
        TlsOptions {
            ca: ca.map(PathBuf::from),
            insecure,
        }
    }

    #[test]
    fn trust_resolution_order() {
        let yes = |_: &Path| true;
        let no = |_: &Path| false;
        assert_eq!(
            resolve_trust(&opts(Some("/x.pem"), true), Some("/env.pem".into()), yes),
            Ok(TrustSource::Insecure)
        );
        assert_eq!(
            resolve_trust(&opts(Some("/x.pem"), false), Some("/env.pem".into()), yes),
            Ok(TrustSource::CaFile("/x.pem".into()))
        );
        assert_eq!(
            resolve_trust(&opts(None, false), Some("/env.pem".into()), yes),
            Ok(TrustSource::CaFile("/env.pem".into()))
        );
        assert_eq!(
            resolve_trust(&opts(None, false), Some(" ".into()), yes),
            Ok(TrustSource::CaFile(DEFAULT_TLS_CA_PATH.into()))
        );
        let err = resolve_trust(&opts(None, false), None, no).unwrap_err();
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        assert!(err.to_string().contains("--insecure"), "{err}");
    }

    #[test]
    fn ca_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(load_roots(&missing), Err(ClientError::Tls(_))));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a pem").unwrap();
        assert!(load_roots(&empty)
            .unwrap_err()
            .to_string()
            .contains("no certificate"));
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, cert.cert.pem()).unwrap();
        assert_eq!(load_roots(&good).unwrap().len(), 1);
        let cfg = rustls_config(&TlsOptions::with_ca(&good)).unwrap();
        assert_eq!(cfg.alpn_protocols, vec![ALPN.to_vec()]);
        assert!(!cfg.enable_early_data);
        assert!(rustls_config(&TlsOptions::insecure()).is_ok());
    }
}

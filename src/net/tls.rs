//! TLS material for orbitmq's QUIC endpoints.
//!
//! A broker (or name server) creates a self-signed CA and a server certificate signed by it on
//! first start, under `<data-dir>/tls/`, and reuses them afterwards. Clients verify the server
//! against that CA (`--tls-ca PATH`); skipping verification is the explicit
//! [`insecure_client_config`] only.
//!
//! In a cluster, every node instead takes a certificate issued by one cluster CA
//! ([`init_ca`], [`issue`]; `orbitmq cert init|issue`), loaded with [`load_identity`], so
//! clients verify every broker and name server with the one CA file.
//!
//! This module uses neither glommio nor tokio, so the client builders work in the tokio client
//! crate as they are.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};

/// ALPN protocol id of orbitmq's wire protocol, version 2 (`orbitmq/2`).
pub use orbitmq_proto::header::ALPN;

/// Idle timeout: quinn's default, and RocketMQ's 30 s heartbeat period.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keep-alive interval, well below [`IDLE_TIMEOUT`] so a quiet but healthy connection lives on
/// even if one keep-alive is lost.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Bytes one connection may have in flight towards us, across all its streams.
pub const MAX_CONNECTION_RECEIVE_WINDOW: u32 = 32 << 20;

/// Concurrent bidirectional streams a peer may open (quinn's default is 100). orbitmq clients
/// multiplex requests on one stream, but other clients may park a long poll per stream.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 1024;

/// Folder under the data directory that holds the TLS files.
pub const TLS_DIR: &str = "tls";
/// The CA certificate that clients trust (`--tls-ca`).
pub const CA_FILE: &str = "ca.pem";
/// The server certificate, signed by the CA.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server's private key (mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key";

/// Common name prefix of a generated CA; the host name and creation time follow, so that two
/// CAs never share a subject (a client would pick the wrong one and report a bad signature
/// instead of an unknown CA).
const CA_COMMON_NAME: &str = "orbitmq self-signed CA";
/// Common name of a generated server certificate.
const SERVER_COMMON_NAME: &str = "orbitmq server";
/// The name every generated server certificate carries, besides the host name.
const LOCALHOST: &str = "localhost";
/// Mode of the private key file: the broker's user only.
const KEY_FILE_MODE: u32 = 0o600;

/// Errors while creating, loading or using TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: bad PEM: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0}: no certificate in the file")]
    NoCertificate(PathBuf),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC needs a TLS 1.3 initial cipher suite: {0}")]
    NoInitialCipherSuite(#[from] NoInitialCipherSuite),
    #[error("{0} already exists: a cluster CA is made once (delete the folder to start over)")]
    Exists(PathBuf),
    #[error("{path}: bad key: {why}")]
    Key { path: PathBuf, why: String },
    #[error("bad certificate name {0:?}: expected a DNS name or an IP address")]
    Name(String),
    #[error("{0}")]
    Client(String),
}

/// The cluster CA's certificate and private key in a CA folder.
pub const CA_KEY_FILE: &str = "ca.key";
/// Common name prefix of a cluster CA; a hash of its key follows, so that the CA certificate
/// can be made again, identical in name and key, from the key alone when issuing.
const CLUSTER_CA_COMMON_NAME: &str = "orbitmq cluster CA";

/// Files of a cluster CA or of an issued node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The cluster CA certificate for `key` (deterministic in subject and key).
fn cluster_ca(key: &KeyPair) -> Result<rcgen::Certificate, TlsError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let id = crc32c::crc32c(key.public_key_raw());
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("{CLUSTER_CA_COMMON_NAME} {id:08x}"),
    );
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(ca.self_signed(key)?)
}

/// Makes a cluster CA in `dir`: `ca.pem` (give it to clients and nodes) and `ca.key` (mode
/// 0600; keep it where certificates are issued). Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path) -> Result<CertFiles, TlsError> {
    let files = CertFiles {
        cert: dir.join(CA_FILE),
        key: dir.join(CA_KEY_FILE),
    };
    for p in [&files.cert, &files.key] {
        if p.exists() {
            return Err(TlsError::Exists(p.clone()));
        }
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let key = KeyPair::generate()?;
    let cert = cluster_ca(&key)?;
    write_atomic(&files.key, key.serialize_pem().as_bytes(), KEY_FILE_MODE)?;
    write_atomic(&files.cert, cert.pem().as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(files)
}

/// The subject alternative name for `name`: an IP address or a DNS name.
fn san_of(name: &str) -> Result<SanType, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    DnsName::try_from(name).map_err(|_| TlsError::Name(name.to_owned()))?;
    Ok(SanType::DnsName(
        name.to_owned()
            .try_into()
            .map_err(|_| TlsError::Name(name.to_owned()))?,
    ))
}

/// Issues a node certificate signed by the cluster CA in `ca_dir`, for `name` (a host name or
/// IP), `extra` names, localhost, 127.0.0.1 and ::1. Writes `<out_dir>/<name>.pem` (the node
/// certificate then the CA's) and `<out_dir>/<name>.key` (mode 0600).
pub fn issue(
    ca_dir: &Path,
    name: &str,
    extra: &[String],
    out_dir: &Path,
) -> Result<CertFiles, TlsError> {
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&pem).map_err(|e| TlsError::Key {
        path: ca_key_path.clone(),
        why: e.to_string(),
    })?;
    let ca = cluster_ca(&ca_key)?;
    let ca_pem_path = ca_dir.join(CA_FILE);
    let ca_pem = fs::read_to_string(&ca_pem_path).map_err(io_err(&ca_pem_path))?;
    if ca_pem.trim() != ca.pem().trim() {
        // Same subject and key is what matters; the stored file stays the one to distribute.
        tracing::debug!("CA certificate re-made for signing differs in encoding only");
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut names: Vec<&str> = vec![name, LOCALHOST, "127.0.0.1", "::1"];
    names.extend(extra.iter().map(String::as_str));
    for n in names {
        let san = san_of(n)?;
        if !params.subject_alt_names.contains(&san) {
            params.subject_alt_names.push(san);
        }
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let file_stem: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let files = CertFiles {
        cert: out_dir.join(format!("{file_stem}.pem")),
        key: out_dir.join(format!("{file_stem}.key")),
    };
    write_atomic(&files.key, key.serialize_pem().as_bytes(), KEY_FILE_MODE)?;
    let chain = format!("{}{}", cert.pem(), ca_pem);
    write_atomic(&files.cert, chain.as_bytes(), 0o644)?;
    sync_dir(out_dir)?;
    Ok(files)
}

/// A node identity from given files (a cluster node): the certificate chain and key it
/// serves, and the CA file clients are told to trust.
pub fn load_identity(cert: &Path, key: &Path, ca: &Path) -> Result<ServerIdentity, TlsError> {
    if !ca.is_file() {
        return Err(TlsError::Io {
            path: ca.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "CA file not found"),
        });
    }
    let paths = TlsPaths {
        dir: cert.parent().map(Path::to_owned).unwrap_or_default(),
        ca: ca.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
    };
    let (chain, key) = load_server_files(&paths)?;
    Ok(ServerIdentity {
        paths,
        created: false,
        chain,
        key,
    })
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the TLS files of a data directory live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    /// The files under `<data_dir>/tls/`.
    pub fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join(TLS_DIR);
        Self {
            ca: dir.join(CA_FILE),
            cert: dir.join(SERVER_CERT_FILE),
            key: dir.join(SERVER_KEY_FILE),
            dir,
        }
    }

    fn all_exist(&self) -> bool {
        [&self.ca, &self.cert, &self.key]
            .iter()
            .all(|p| p.is_file())
    }
}

/// A server's certificate chain and key, loaded from (or just written to) [`TlsPaths`].
#[derive(Debug)]
pub struct ServerIdentity {
    pub paths: TlsPaths,
    /// True when this call generated the files, false when it reused them.
    pub created: bool,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// The server certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
}

/// Loads the TLS files under `<data_dir>/tls/`, creating a self-signed CA and a server
/// certificate signed by it when any of them is missing.
///
/// The CA's private key is never written: the CA signs exactly this one server certificate, so a
/// copied data directory cannot mint certificates for other names. Regenerating (delete the
/// folder) therefore makes a new CA that clients must be given again.
pub fn load_or_create(data_dir: &Path) -> Result<ServerIdentity, TlsError> {
    let paths = TlsPaths::new(data_dir);
    if paths.all_exist() {
        let (chain, key) = load_server_files(&paths)?;
        tracing::debug!(dir = %paths.dir.display(), "reusing TLS certificate");
        return Ok(ServerIdentity {
            paths,
            created: false,
            chain,
            key,
        });
    }
    let generated = generate(host_name().as_deref())?;
    fs::create_dir_all(&paths.dir).map_err(io_err(&paths.dir))?;
    // ca.pem is the marker of a complete set: remove it first and write it last, so a crash in
    // between leaves a set that is regenerated, never a CA that does not match the server key.
    match fs::remove_file(&paths.ca) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&paths.ca)(e)),
        _ => {}
    }
    write_atomic(&paths.key, generated.key_pem.as_bytes(), KEY_FILE_MODE)?;
    write_atomic(&paths.cert, generated.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&paths.ca, generated.ca_pem.as_bytes(), 0o644)?;
    sync_dir(&paths.dir)?;
    tracing::info!(ca = %paths.ca.display(), "created a self-signed TLS CA and server certificate");
    let (chain, key) = load_server_files(&paths)?;
    Ok(ServerIdentity {
        paths,
        created: true,
        chain,
        key,
    })
}

/// PEM text of a freshly generated CA and server certificate.
struct Generated {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn generate(host: Option<&str>) -> Result<Generated, TlsError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    // Path length 0: this CA signs end-entity certificates only.
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let ca_name = format!("{CA_COMMON_NAME} {} {created:x}", host.unwrap_or(LOCALHOST));
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut names = vec![LOCALHOST.to_owned()];
    if let Some(h) = host.filter(|h| *h != LOCALHOST) {
        names.push(h.to_owned());
    }
    let mut server = CertificateParams::new(names)?;
    server.subject_alt_names.extend([
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]);
    server.is_ca = IsCa::ExplicitNoCa;
    server
        .distinguished_name
        .push(DnType::CommonName, SERVER_COMMON_NAME);
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = server.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Generated {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// This machine's host name when it is a valid DNS name (so it can go in a SAN).
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
    // when the name fits, and we stop at the first NUL or the buffer end either way.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.to_owned();
    DnsName::try_from(name.as_str()).ok()?;
    Some(name)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), TlsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn load_server_files(
    paths: &TlsPaths,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = load_certs(&paths.cert)?;
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|source| TlsError::Pem {
        path: paths.key.clone(),
        source,
    })?;
    Ok((chain, key))
}

/// Transport settings shared by servers and clients.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_CONCURRENT_BIDI_STREAMS.into());
    // IDLE_TIMEOUT is 30 s, far inside the VarInt range: the conversion cannot fail.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    // quinn leaves the connection window unbounded: bound what one peer can make us buffer.
    t.receive_window(MAX_CONNECTION_RECEIVE_WINDOW.into());
    t.mtu_discovery_config(Some(orbitmq_client::quic::mtu_discovery()));
    t.ack_frequency_config(Some(orbitmq_client::quic::ack_frequency()));
    t
}

/// A QUIC server configuration for `identity`: TLS 1.3 only, ALPN [`ALPN`], 0-RTT off (a
/// replayed send would store a message twice). Clients may present a certificate of the
/// identity's CA (see [`server_config_for`]).
pub fn server_config(identity: &ServerIdentity) -> Result<quinn::ServerConfig, TlsError> {
    server_config_for(identity, &identity.paths.ca)
}

/// [`server_config`] whose clients may present a certificate of the CA in `client_ca` (a slave
/// proving it is one of the cluster's brokers); clients without one are served as well, and
/// one whose certificate the CA did not sign fails its handshake.
pub fn server_config_for(
    identity: &ServerIdentity,
    client_ca: &Path,
) -> Result<quinn::ServerConfig, TlsError> {
    let roots =
        orbitmq_client::tls::load_roots(client_ca).map_err(|e| TlsError::Client(e.to_string()))?;
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        orbitmq_client::tls::provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Client(format!("client certificate verifier: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(orbitmq_client::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_half_rtt_data = false;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// A QUIC client configuration that trusts the CA certificate(s) in the PEM file `ca_path`.
/// The rustls side is the client crate's, so clients and brokers verify servers one way.
pub fn client_config(ca_path: &Path) -> Result<quinn::ClientConfig, TlsError> {
    finish_client(orbitmq_client::TlsOptions::with_ca(ca_path))
}

/// A QUIC client configuration that verifies servers with the CA in `ca_path` and presents
/// `identity`'s certificate (a slave to its master).
pub fn client_config_as(
    identity: &ServerIdentity,
    ca_path: &Path,
) -> Result<quinn::ClientConfig, TlsError> {
    let roots =
        orbitmq_client::tls::load_roots(ca_path).map_err(|e| TlsError::Client(e.to_string()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(orbitmq_client::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    quic_client(tls)
}

/// A QUIC client configuration that accepts any server certificate (`--insecure` only). The
/// handshake signatures are still checked, so the connection is encrypted, but not
/// authenticated: anyone on the path can impersonate the server.
pub fn insecure_client_config() -> Result<quinn::ClientConfig, TlsError> {
    finish_client(orbitmq_client::TlsOptions::insecure())
}

fn finish_client(opts: orbitmq_client::TlsOptions) -> Result<quinn::ClientConfig, TlsError> {
    let tls =
        orbitmq_client::tls::rustls_config(&opts).map_err(|e| TlsError::Client(e.to_string()))?;
    quic_client(tls)
}

/// A QUIC client configuration over `tls`, with the shared transport settings.
fn quic_client(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::RootCertStore;

    #[test]
    fn files_are_created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert!(first.created);
        let paths = TlsPaths::new(dir.path());
        assert_eq!(first.paths, paths);
        let read = |p: &Path| fs::read(p).unwrap();
        let before = (read(&paths.ca), read(&paths.cert), read(&paths.key));
        let key_mode = fs::metadata(&paths.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            KEY_FILE_MODE
        );

        let second = load_or_create(dir.path()).unwrap();
        assert!(!second.created);
        assert_eq!(second.chain(), first.chain());
        assert_eq!(
            (read(&paths.ca), read(&paths.cert), read(&paths.key)),
            before
        );
        // Both configurations build from the stored files.
        server_config(&second).unwrap();
        client_config(&paths.ca).unwrap();
        insecure_client_config().unwrap();
    }

    #[test]
    fn a_missing_file_regenerates_the_whole_set() {
        let dir = tempfile::tempdir().unwrap();
        let paths = TlsPaths::new(dir.path());
        load_or_create(dir.path()).unwrap();
        let old_ca = fs::read(&paths.ca).unwrap();
        fs::remove_file(&paths.key).unwrap();
        let again = load_or_create(dir.path()).unwrap();
        assert!(again.created);
        assert_ne!(fs::read(&paths.ca).unwrap(), old_ca);
    }

    #[test]
    fn server_certificate_chains_to_the_ca_with_every_name() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(dir.path()).unwrap();
        let mut roots = RootCertStore::empty();
        for c in load_certs(&id.paths.ca).unwrap() {
            roots.add(c).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            orbitmq_client::tls::provider(),
        )
        .build()
        .unwrap();
        let mut names = vec!["localhost", "127.0.0.1", "::1"];
        let host = host_name();
        if let Some(h) = host.as_deref() {
            names.push(h);
        }
        for name in names {
            let server_name = ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&id.chain()[0], &[], &server_name, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = ServerName::try_from("example.com").unwrap();
        assert!(verifier
            .verify_server_cert(&id.chain()[0], &[], &other, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn a_cluster_ca_issues_node_certificates_that_verify_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = init_ca(&ca_dir).unwrap();
        assert!(matches!(init_ca(&ca_dir), Err(TlsError::Exists(_))));
        let key_mode = fs::metadata(&ca.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            KEY_FILE_MODE
        );
        let out = dir.path().join("nodes");
        let a = issue(&ca_dir, "broker-a.example", &["10.1.2.3".into()], &out).unwrap();
        let b = issue(&ca_dir, "10.9.9.9", &[], &out).unwrap();
        assert!(issue(&ca_dir, "bad name!", &[], &out).is_err());
        let mut roots = RootCertStore::empty();
        for c in load_certs(&ca.cert).unwrap() {
            roots.add(c).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            orbitmq_client::tls::provider(),
        )
        .build()
        .unwrap();
        for (files, names) in [
            (
                &a,
                vec![
                    "broker-a.example",
                    "10.1.2.3",
                    "localhost",
                    "127.0.0.1",
                    "::1",
                ],
            ),
            (&b, vec!["10.9.9.9", "127.0.0.1"]),
        ] {
            let id = load_identity(&files.cert, &files.key, &ca.cert).unwrap();
            assert_eq!(id.chain().len(), 2, "node certificate then the CA's");
            server_config(&id).unwrap();
            for name in names {
                verifier
                    .verify_server_cert(
                        &id.chain()[0],
                        &[],
                        &ServerName::try_from(name).unwrap(),
                        &[],
                        UnixTime::now(),
                    )
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        // Another CA does not verify them.
        let other = init_ca(&dir.path().join("other")).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(load_certs(&other.cert).unwrap().remove(0))
            .unwrap();
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            orbitmq_client::tls::provider(),
        )
        .build()
        .unwrap();
        let id = load_identity(&a.cert, &a.key, &ca.cert).unwrap();
        assert!(v
            .verify_server_cert(
                &id.chain()[0],
                &[],
                &ServerName::try_from("localhost").unwrap(),
                &[],
                UnixTime::now()
            )
            .is_err());
        assert!(load_identity(&a.cert, &a.key, &dir.path().join("none.pem")).is_err());
    }
}

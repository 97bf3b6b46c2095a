//! What the TLS tests share: certificates made on the spot with rcgen and written as PEM files
//! into a directory of the test's own ([`TempDir`], removed when dropped: no key is ever checked
//! in), rustls configurations for the tests' own TLS peers, and other programs (`openssl`,
//! `ncat`) run as peers ([`Tool`]).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::process::{Captured, LinesOf};
use super::render_command;

/// A fresh directory under the system's temporary directory, removed with everything in it
/// when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `TMP/plugboard-tls-TAG-PID-N`, new and empty.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("plugboard-tls-{tag}-{}-{n}", std::process::id()));
        // A leftover of an earlier run with the same pid would only confuse.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path in the directory (the file need not exist), as a string for a command line.
    pub fn file(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }

    /// Writes `contents` to `name` in the directory; returns its path as a string.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate authority made for one test.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

/// A certificate and its private key, as PEM text.
pub struct Leaf {
    pub cert: String,
    pub key: String,
    der: CertificateDer<'static>,
}

/// What a leaf certificate is for.
#[derive(Clone, Copy)]
pub enum Purpose {
    Server,
    Client,
}

impl Ca {
    /// A new root CA whose subject is `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(
            DnType::OrganizationName,
            "plugboard tests (throwaway, made by the test run)",
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Ca {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The CA's certificate, DER.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid now.
    pub fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, names[0], Purpose::Server, false)
    }

    /// A server certificate for `names` that expired long ago (valid in the year 2000 only).
    pub fn expired_server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, names[0], Purpose::Server, true)
    }

    /// A client certificate whose subject's common name is `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(&[], cn, Purpose::Client, false)
    }

    /// A leaf signed by this CA: subject CN `cn`, alternative names `names`, for `purpose`; valid
    /// from 1975 to 4096 (rcgen's default), or if `expired` in the year 2000 only.
    pub fn leaf(&self, names: &[&str], cn: &str, purpose: Purpose, expired: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match purpose {
            Purpose::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Purpose::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

impl Leaf {
    /// The certificate, DER.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// The private key, DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key.as_bytes()).expect("the key we made parses")
    }

    /// Writes `NAME.pem` and `NAME.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &TempDir, name: &str) -> (String, String) {
        (
            dir.write(&format!("{name}.pem"), &self.cert),
            dir.write(&format!("{name}.key"), &self.key),
        )
    }
}

/// The SHA-256 fingerprint of a certificate, as the server logs it: `sha256:` and 64 lowercase
/// hex digits.
pub fn fingerprint(der: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A test's PKI on disk: a CA, and a server certificate signed by it for `127.0.0.1` and
/// `localhost` (`ca.pem`, `server.pem`, `server.key`).
pub struct Pki {
    pub dir: TempDir,
    pub ca: Ca,
    pub server: Leaf,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = TempDir::new(tag);
        let ca = Ca::new(&format!("plugboard test CA ({tag})"));
        let server = ca.server(&["127.0.0.1", "localhost"]);
        let ca_file = dir.write("ca.pem", ca.pem());
        let (cert_file, key_file) = server.write(&dir, "server");
        Pki {
            dir,
            ca,
            server,
            ca_file,
            cert_file,
            key_file,
        }
    }

    /// `--tls-cert FILE --tls-key FILE`, then `extra`.
    pub fn server_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--tls-cert",
            self.cert_file.as_str(),
            "--tls-key",
            self.key_file.as_str(),
        ];
        args.extend_from_slice(extra);
        args
    }

    /// `--tls-ca FILE`, then `extra`.
    pub fn client_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["--tls-ca", self.ca_file.as_str()];
        args.extend_from_slice(extra);
        args
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client configuration trusting `ca`, for the tests' own TLS peers.
pub fn client_config(ca: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("add the test CA");
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A rustls server configuration presenting `leaf`, for the tests' own TLS peers.
pub fn server_config(leaf: &Leaf) -> Arc<rustls::ServerConfig> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], leaf.key_der())
        .expect("the leaf and its key");
    Arc::new(config)
}

/// Accepts any server certificate (the handshake's signatures are still checked): for a test
/// that wants to look at what a server presents, not to trust it.
#[derive(Debug)]
struct AcceptAnything(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The certificate a TLS server at `addr` presents, whatever it is (the handshake completes;
/// nothing else is said).
pub fn presented_certificate(addr: std::net::SocketAddr) -> CertificateDer<'static> {
    let provider = provider();
    let verifier = AcceptAnything(provider.signature_verification_algorithms);
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let tcp = super::connect(addr);
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let mut session = rustls::ClientConnection::new(Arc::new(config), name).expect("session");
    let mut tcp = tcp;
    while session.is_handshaking() {
        session
            .complete_io(&mut tcp)
            .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    }
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

/// The subject alternative names of a certificate: DNS names as they are, IP addresses as Rust
/// prints them.
pub fn alternative_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).expect("parse the certificate");
    let Some(san) = cert.subject_alternative_name().expect("SAN extension") else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => dns.to_string(),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*bytes).expect("4")).to_string(),
                16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*bytes).expect("16")).to_string(),
                n => format!("(an IP address of {n} bytes)"),
            },
            other => format!("{other:?}"),
        })
        .collect()
}

/// Another program run as a peer (`openssl`, `ncat`): a [`Captured`] child whose stdout lines
/// come over a channel, for [`wait_for_stdout`](Tool::wait_for_stdout), and whose stdin is a pipe
/// the test writes to and closes. Killed on drop if still running.
pub struct Tool {
    process: Captured,
    lines: Receiver<String>,
}

impl Tool {
    /// Whether `program` can be run here at all.
    pub fn installed(program: &str) -> bool {
        super::installed(program)
    }

    /// Spawns `program args...` with piped stdin, stdout and stderr.
    pub fn spawn(program: &str, args: &[&str]) -> Tool {
        let (process, lines) = Captured::spawn_with(
            OsStr::new(program),
            args,
            render_command(program, args),
            true,
            Stdio::piped(),
            LinesOf::Stdout,
        );
        Tool { process, lines }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits (bounded) for a stdout line that `matches` says is the one; returns what it says.
    pub fn wait_for_stdout<T>(
        &self,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = matches(&line) {
                        return found;
                    }
                }
                Err(_) => panic!(
                    "`{}` printed no such line within {timeout:?}\n{}",
                    self.process.command(),
                    self.so_far()
                ),
            }
        }
    }

    /// Writes `bytes` to its standard input.
    pub fn write_stdin(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let command = self.process.command().to_string();
        let stdin = self
            .process
            .child()
            .stdin
            .as_mut()
            .expect("stdin still open");
        stdin
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write to `{command}`: {e}"));
        stdin.flush().expect("flush stdin");
    }

    /// Closes its standard input (end of input).
    pub fn close_stdin(&mut self) {
        self.process.child().stdin = None;
    }

    /// What it printed so far, for failure messages.
    pub fn so_far(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.process.stdout_so_far(),
            self.process.stderr_so_far()
        )
    }

    /// Waits (bounded) for it to exit; returns its status, stdout and stderr. Kills it and panics
    /// past `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let out = self.process.wait_exit(timeout);
        (out.status, out.stdout, out.stderr)
    }
}

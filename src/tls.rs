//! TLS settings: what a server presents and whom it admits ([`ServerTls`]), and what a client
//! trusts and presents ([`ClientTls`]). Built once at start, from PEM files or generated on the
//! spot, and checked there: an unreadable file, a key that is not the certificate's, or a pin that
//! is not a SHA-256 fingerprint is an error before anything listens or connects.
//!
//! rustls with the ring provider does the work; the sessions themselves live in `transport`.
//! Certificates and keys are read with rustls-pki-types' `PemObject`, a throwaway certificate is
//! made with rcgen, and the system's roots come from rustls-native-certs: the roots the machine's
//! administrator manages (a company's own CA included), updated with the system, rather than a
//! copy compiled into the binary.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::error::Error;

/// The crypto provider every configuration uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate's SHA-256 fingerprint as `sha256:` and 64 lowercase hex digits.
fn fingerprint_of(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in digest.as_ref() {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// Reads a PEM file whole; the error names it.
fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let failed = |problem: String| Error::Tls {
        context: format!("cannot read the TLS {what} {}", path.display()),
        problem,
    };
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PEM_FILE + 1).read_to_end(&mut text))
        .map_err(|e| failed(e.to_string()))?;
    if text.len() as u64 > MAX_PEM_FILE {
        return Err(failed(format!(
            "larger than {} MiB: not a PEM file?",
            MAX_PEM_FILE >> 20
        )));
    }
    Ok(text)
}

/// The largest PEM file read: a bundle of every public root is about 200 KiB.
const MAX_PEM_FILE: u64 = 16 << 20;

/// What is wrong with PEM text, in words.
fn pem_problem(e: &rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error as Pem;
    match e {
        Pem::MissingSectionEnd { end_marker } => format!(
            "a PEM section has no -----END {}----- line (cut short?)",
            String::from_utf8_lossy(end_marker)
        ),
        Pem::IllegalSectionStart { line } => format!(
            "a malformed PEM BEGIN line: {:?}",
            String::from_utf8_lossy(line)
        ),
        Pem::NoItemsFound => format!("no PEM {what} in it"),
        e => e.to_string(),
    }
}

/// How [`certificate_problem`] starts for a certificate that can't be read.
const MALFORMED: &str = "a malformed certificate";

/// What is wrong with a certificate of our own (not a peer's, as rustls words it).
fn certificate_problem(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(why) => format!("{MALFORMED} ({why:?})"),
        rustls::Error::InconsistentKeys(_) => "the key is not the certificate's".to_string(),
        e => e.to_string(),
    }
}

/// Where PEM text came from, for errors: a file, or bytes given to the library.
#[derive(Clone, Copy)]
enum Origin<'a> {
    File(&'a Path),
    Memory,
}

impl Origin<'_> {
    fn bad(self, what: &str, problem: impl fmt::Display) -> Error {
        let context = match self {
            Origin::File(path) => format!("cannot use the TLS {what} {}", path.display()),
            Origin::Memory => format!("cannot use the TLS {what}"),
        };
        Error::Tls {
            context,
            problem: problem.to_string(),
        }
    }
}

/// A failure to put a certificate and a key together, naming the file at fault, or both.
fn naming_both(e: Error, cert: &Path, key: &Path) -> Error {
    match e {
        Error::Tls { problem, .. } if problem.starts_with(MALFORMED) => Error::Tls {
            context: format!("cannot use the TLS certificate {}", cert.display()),
            problem,
        },
        Error::Tls { problem, .. } => Error::Tls {
            context: format!(
                "cannot use the TLS key {} with the certificate {}",
                key.display(),
                cert.display()
            ),
            problem,
        },
        e => e,
    }
}

/// Every certificate in PEM text, in order (a chain: the end entity first).
fn certificates(
    pem: &[u8],
    origin: Origin<'_>,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| origin.bad(what, pem_problem(&e, "certificate")))?;
    if certs.is_empty() {
        return Err(origin.bad(what, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// The first private key in PEM text (PKCS#8, PKCS#1 or SEC1).
fn private_key(pem: &[u8], origin: Origin<'_>) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        let encrypted = memchr::memmem::find(pem, b"-----BEGIN ENCRYPTED PRIVATE KEY").is_some();
        let problem = if encrypted {
            "the key is encrypted, and a server can't ask for its password: decrypt it first (openssl pkey -in KEY -out PLAIN)".to_string()
        } else {
            pem_problem(&e, "private key")
        };
        origin.bad("key", problem)
    })
}

/// Roots to trust, from PEM text.
fn roots(pem: &[u8], origin: Origin<'_>, what: &str) -> Result<RootCertStore, Error> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem, origin, what)? {
        store
            .add(cert)
            .map_err(|e| origin.bad(what, certificate_problem(&e)))?;
    }
    Ok(store)
}

/// What a TLS server presents, and which clients it requires certificates of.
///
/// ```
/// use plugboard::ServerTls;
///
/// let tls = ServerTls::self_signed(&["localhost".to_string()])?;
/// assert!(tls.fingerprint().starts_with("sha256:"));
/// assert_eq!(tls.fingerprint().len(), 7 + 64);
/// # Ok::<(), plugboard::Error>(())
/// ```
#[derive(Clone)]
pub struct ServerTls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    client_roots: Option<Arc<RootCertStore>>,
    config: Arc<ServerConfig>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint())
            .field("client_certificates", &self.requires_client_certificates())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// A certificate chain (end entity first) and its private key, from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ServerTls, Error> {
        let chain = certificates(
            &read_file(cert, "certificate")?,
            Origin::File(cert),
            "certificate",
        )?;
        let key_der = private_key(&read_file(key, "key")?, Origin::File(key))?;
        ServerTls::new(chain, key_der).map_err(|e| naming_both(e, cert, key))
    }

    /// [`from_pem_files`](ServerTls::from_pem_files) from PEM text.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<ServerTls, Error> {
        let chain = certificates(cert, Origin::Memory, "certificate")?;
        ServerTls::new(chain, private_key(key, Origin::Memory)?)
    }

    /// A throwaway certificate, made now, for `names` (host names or IP addresses); its
    /// [`fingerprint`](ServerTls::fingerprint) is what a client pins.
    pub fn self_signed(names: &[String]) -> Result<ServerTls, Error> {
        let made = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| Error::Tls {
            context: "cannot make a self-signed certificate".to_string(),
            problem: e.to_string(),
        })?;
        let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
        ServerTls::new(vec![made.cert.der().clone()], key)
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ServerTls, Error> {
        let key = Arc::new(key);
        let config = server_config(&chain, &key, None)?;
        Ok(ServerTls {
            chain,
            key,
            client_roots: None,
            config,
        })
    }

    /// Requires every client to present a certificate signed by one of the roots in this PEM
    /// file (mutual TLS).
    pub fn require_client_certificates_file(self, ca: &Path) -> Result<ServerTls, Error> {
        let pem = read_file(ca, "client CA")?;
        let store = roots(&pem, Origin::File(ca), "client CA")?;
        self.with_client_roots(store)
    }

    /// [`require_client_certificates_file`](ServerTls::require_client_certificates_file) from
    /// PEM text.
    pub fn require_client_certificates(self, ca: &[u8]) -> Result<ServerTls, Error> {
        let store = roots(ca, Origin::Memory, "client CA")?;
        self.with_client_roots(store)
    }

    fn with_client_roots(mut self, store: RootCertStore) -> Result<ServerTls, Error> {
        let store = Arc::new(store);
        self.config = server_config(&self.chain, &self.key, Some(&store))?;
        self.client_roots = Some(store);
        Ok(self)
    }

    /// The SHA-256 fingerprint of the certificate presented: `sha256:` and 64 lowercase hex
    /// digits.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.chain[0])
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_roots.is_some()
    }

    pub(crate) fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }
}

/// Why a certificate chain and key could not be used; a chain whose first certificate is not
/// the key's may only be in the wrong order.
fn chain_problem(e: &rustls::Error, chain: &[CertificateDer<'_>]) -> String {
    let problem = certificate_problem(e);
    if matches!(e, rustls::Error::InconsistentKeys(_)) && chain.len() > 1 {
        format!("{problem} (the chain must start with the certificate of this key)")
    } else {
        problem
    }
}

/// A configuration rustls would not build.
fn cannot_set_up(problem: String) -> Error {
    Error::Tls {
        context: "cannot set up TLS".to_string(),
        problem,
    }
}

fn server_config(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    client_roots: Option<&Arc<RootCertStore>>,
) -> Result<Arc<ServerConfig>, Error> {
    let failed = cannot_set_up;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(e.to_string()))?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), provider)
                .build()
                .map_err(|e| failed(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain.to_vec(), key.clone_key())
        .map_err(|e| failed(chain_problem(&e, chain)))?;
    // Nobody resumes a session here: no tickets to make and send after every handshake.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Whom a TLS client trusts, and what it presents.
///
/// ```
/// use plugboard::ClientTls;
///
/// let pin = "sha256:".to_string() + &"ab".repeat(32);
/// let tls = ClientTls::pinned(&pin)?.server_name("localhost");
/// assert!(ClientTls::pinned("sha256:abc").is_err());
/// # let _ = tls;
/// # Ok::<(), plugboard::Error>(())
/// ```
#[derive(Clone)]
pub struct ClientTls {
    trust: Trust,
    identity: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    server_name: Option<String>,
    config: Arc<ClientConfig>,
}

#[derive(Clone, Debug)]
enum Trust {
    Roots(Arc<RootCertStore>),
    Pin([u8; 32]),
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trust = match &self.trust {
            Trust::Roots(roots) => format!("{} roots", roots.len()),
            Trust::Pin(pin) => format!("pin {}", hex(pin)),
        };
        f.debug_struct("ClientTls")
            .field("trust", &trust)
            .field("identity", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ClientTls {
    /// Verifies servers against the system's root certificates.
    pub fn system_roots() -> Result<ClientTls, Error> {
        let found = rustls_native_certs::load_native_certs();
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map_or_else(|| "none found".to_string(), ToString::to_string);
            return Err(Error::Tls {
                context: "cannot load the system's root certificates (--tls-ca or --tls-fingerprint names what to trust instead)".to_string(),
                problem: why,
            });
        }
        ClientTls::with_trust(Trust::Roots(Arc::new(store)))
    }

    /// Verifies servers against the roots in this PEM file instead of the system's.
    pub fn trusting_file(ca: &Path) -> Result<ClientTls, Error> {
        let pem = read_file(ca, "CA")?;
        let store = roots(&pem, Origin::File(ca), "CA")?;
        ClientTls::with_trust(Trust::Roots(Arc::new(store)))
    }

    /// [`trusting_file`](ClientTls::trusting_file) from PEM text.
    pub fn trusting(ca: &[u8]) -> Result<ClientTls, Error> {
        let store = roots(ca, Origin::Memory, "CA")?;
        ClientTls::with_trust(Trust::Roots(Arc::new(store)))
    }

    /// Accepts exactly the server certificate with this SHA-256 fingerprint, and no other:
    /// `sha256:` and 64 hex digits (colons between bytes, as `openssl x509 -fingerprint`
    /// prints them, are allowed). Its name and dates are not checked: the pin is the identity.
    pub fn pinned(fingerprint: &str) -> Result<ClientTls, Error> {
        let pin = parse_fingerprint(fingerprint).map_err(|problem| Error::Tls {
            context: format!("cannot use the fingerprint {fingerprint:?}"),
            problem,
        })?;
        ClientTls::with_trust(Trust::Pin(pin))
    }

    /// Presents this certificate chain and key (PEM files) to servers that ask for one.
    pub fn identity_files(self, cert: &Path, key: &Path) -> Result<ClientTls, Error> {
        let chain = certificates(
            &read_file(cert, "certificate")?,
            Origin::File(cert),
            "certificate",
        )?;
        let key_der = private_key(&read_file(key, "key")?, Origin::File(key))?;
        self.with_identity(chain, key_der)
            .map_err(|e| naming_both(e, cert, key))
    }

    /// [`identity_files`](ClientTls::identity_files) from PEM text.
    pub fn identity(self, cert: &[u8], key: &[u8]) -> Result<ClientTls, Error> {
        let chain = certificates(cert, Origin::Memory, "certificate")?;
        let key_der = private_key(key, Origin::Memory)?;
        self.with_identity(chain, key_der)
    }

    /// The name the server's certificate must be valid for (default: the host connected to).
    pub fn server_name(mut self, name: impl Into<String>) -> ClientTls {
        self.server_name = Some(name.into());
        self
    }

    fn with_trust(trust: Trust) -> Result<ClientTls, Error> {
        let config = client_config(&trust, None)?;
        Ok(ClientTls {
            trust,
            identity: None,
            server_name: None,
            config,
        })
    }

    fn with_identity(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ClientTls, Error> {
        let identity = (chain, Arc::new(key));
        self.config = client_config(&self.trust, Some(&identity))?;
        self.identity = Some(identity);
        Ok(self)
    }

    /// The name to verify the server as, given the host connected to.
    pub(crate) fn name_for(&self, host: &str) -> Result<ServerName<'static>, Error> {
        let name = self.server_name.as_deref().unwrap_or(host);
        // An IPv6 literal may come in brackets.
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(bare.to_string()).map_err(|e| Error::Tls {
            context: format!("cannot use {name:?} as the TLS server name"),
            problem: e.to_string(),
        })
    }

    pub(crate) fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }
}

/// `sha256:HEX` as bytes: 64 hex digits, or 32 pairs with colons between them; the prefix in
/// any case, or OpenSSL's whole `sha256 Fingerprint=` line.
fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let lower = text.trim().to_ascii_lowercase();
    let digits = ["sha256:", "sha256 fingerprint="]
        .iter()
        .find_map(|prefix| lower.strip_prefix(prefix))
        .ok_or("it must start with sha256:")?;
    let pairs: Vec<&str> = if digits.contains(':') {
        digits.split(':').collect()
    } else {
        (0..digits.len() / 2)
            .map(|i| digits.get(2 * i..2 * i + 2).unwrap_or_default())
            .collect()
    };
    let well_formed = pairs.len() == 32
        && (digits.contains(':') || digits.len() == 64)
        && pairs
            .iter()
            .all(|pair| pair.len() == 2 && pair.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(
            "it must be sha256: and 64 hex digits (or 32 pairs with colons between them)"
                .to_string(),
        );
    }
    let mut pin = [0u8; 32];
    for (byte, pair) in pin.iter_mut().zip(pairs) {
        *byte = u8::from_str_radix(pair, 16).map_err(|e| e.to_string())?;
    }
    Ok(pin)
}

fn client_config(
    trust: &Trust,
    identity: Option<&(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
) -> Result<Arc<ClientConfig>, Error> {
    let failed = cannot_set_up;
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(e.to_string()))?;
    let builder = match trust {
        Trust::Roots(roots) => builder.with_root_certificates(Arc::clone(roots)),
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                pin: *pin,
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    let config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| failed(chain_problem(&e, chain)))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts the one server certificate whose SHA-256 digest is the pin. The handshake's
/// signatures are still checked against it, so only the holder of its key gets through.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            let mismatch = std::io::Error::other(format!(
                "the server's certificate is {}, not the pinned sha256:{}",
                fingerprint_of(end_entity),
                hex(&self.pin)
            ));
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(mismatch))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The name a client certificate gives its holder: its subject's common name, or else its
/// first subject alternative name.
pub(crate) fn subject_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(name) | GeneralName::RFC822Name(name) => Some(name.to_string()),
        GeneralName::URI(uri) => Some(uri.to_string()),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(*bytes)
                .ok()
                .map(|b| std::net::IpAddr::from(b).to_string()),
            16 => <[u8; 16]>::try_from(*bytes)
                .ok()
                .map(|b| std::net::IpAddr::from(b).to_string()),
            _ => None,
        },
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_both_spellings_and_nothing_else() {
        let hex64 = "0123456789abcdef".repeat(4);
        let pin = parse_fingerprint(&format!("sha256:{hex64}")).expect("plain");
        assert_eq!(pin[0], 0x01);
        assert_eq!(pin[31], 0xef);
        let colons = hex64
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&format!("SHA256:{colons}")), Ok(pin));
        assert_eq!(
            parse_fingerprint(&format!("sha256 Fingerprint={colons}")),
            Ok(pin),
            "OpenSSL's whole line"
        );
        for bad in [
            "",
            &hex64,
            "sha256:",
            "sha256:abc",
            &format!("sha256:{hex64}00"),
            &format!("md5:{hex64}"),
            &format!("sha256:{}", "zz".repeat(32)),
            &format!("sha256::{colons}"),
            &format!("sha256:{}:{}", &hex64[..4], &hex64[4..]),
        ] {
            assert!(parse_fingerprint(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let other =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let made = ServerTls::from_pem(
            one.cert.pem().as_bytes(),
            other.signing_key.serialize_pem().as_bytes(),
        );
        match made {
            Err(Error::Tls { problem, .. }) => {
                assert!(problem.contains("not the certificate's"), "{problem}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            ServerTls::from_pem(
                one.cert.pem().as_bytes(),
                one.signing_key.serialize_pem().as_bytes()
            )
            .is_ok()
        );
        assert!(matches!(
            ServerTls::from_pem(b"", b""),
            Err(Error::Tls { .. })
        ));
    }

    #[test]
    fn the_subject_is_the_common_name_or_else_the_first_alternative_name() {
        let mut params =
            rcgen::CertificateParams::new(vec!["alt.example".to_string()]).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(subject_name(cert.der()).as_deref(), Some("alt.example"));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(subject_name(cert.der()).as_deref(), Some("alice"));
    }
}

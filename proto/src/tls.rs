//! Transport security shared by both ends of the stream: PEM files to
//! rustls configurations, reloaded when the files change, and the rustls
//! error found inside a transport error.
//!
//! ```text
//!  --tls-* files ──read + hash (at most once a second)──▶ changed? ──build──▶ Arc<ServerConfig | ClientConfig>
//!                                                          │ unchanged, or the new files do not build:
//!                                                          └▶ the config in force stays (logged)
//! ```
//!
//! Both sides take the config in force for each new connection (the
//! control plane for each accepted socket, the agent for each connect), so
//! a rotated certificate (kubelet rotates its client certificate; cert-manager
//! renews Secrets) is used from the next handshake on, without a restart,
//! and established streams are never dropped: TLS 1.3 keeps a session's keys
//! for its life and checks certificates only in the handshake.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no PEM item of the kind expected.
    #[error("{path} holds no {what} (expected PEM: -----BEGIN {what}-----)")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What was looked for (`CERTIFICATE`, `PRIVATE KEY`).
        what: &'static str,
    },
    /// A PEM item does not parse.
    #[error("{path} is not valid PEM: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// rustls refused the material (a key that does not match its
    /// certificate, a CA certificate it cannot use).
    #[error("{what}")]
    Rustls {
        /// What was being set up, naming the files.
        what: String,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA.
    #[error("{path}: cannot verify client certificates with it: {message}")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Result of this module.
pub type Result<T, E = TlsError> = std::result::Result<T, E>;

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate of a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Missing {
            path: path.to_owned(),
            what: "PRIVATE KEY",
        },
        e => TlsError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        },
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: format!("{}: not a usable CA certificate", ca.display()),
            source,
        })?;
    }
    Ok(roots)
}

/// The control plane's files: its certificate and key, and the CA that
/// client certificates must chain to (mutual TLS) when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle for client certificates.
    pub client_ca: Option<PathBuf>,
}

impl ServerFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.cert.clone(), self.key.clone()];
        p.extend(self.client_ca.clone());
        p
    }

    /// A rustls server configuration speaking HTTP/2 (ALPN `h2`).
    pub fn build(&self) -> Result<rustls::ServerConfig> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: "TLS protocol versions".into(),
                source,
            })?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Verifier {
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(load_certs(&self.cert)?, load_key(&self.key)?)
            .map_err(|source| TlsError::Rustls {
                what: format!(
                    "{} and {} do not make a certificate and its key",
                    self.cert.display(),
                    self.key.display()
                ),
                source,
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The agent's files: the CA the control plane's certificate must chain
/// to, and its own certificate and key for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// PEM CA bundle.
    pub ca: PathBuf,
    /// PEM client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.ca.clone()];
        if let Some((c, k)) = &self.identity {
            p.extend([c.clone(), k.clone()]);
        }
        p
    }

    /// A rustls client configuration speaking HTTP/2 (ALPN `h2`).
    pub fn build(&self) -> Result<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                what: "TLS protocol versions".into(),
                source,
            })?
            .with_root_certificates(roots(&self.ca)?);
        let mut config = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|source| TlsError::Rustls {
                    what: format!(
                        "{} and {} do not make a certificate and its key",
                        cert.display(),
                        key.display()
                    ),
                    source,
                })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// How often the files are looked at, at most.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A configuration built from files and rebuilt when their content changes.
pub struct Reloading<T> {
    paths: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T> + Send + Sync>,
    what: &'static str,
    inner: Mutex<ReloadState<T>>,
}

struct ReloadState<T> {
    current: Arc<T>,
    digest: [u8; 32],
    checked: Instant,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// The control plane's reloading server configuration.
pub type ReloadingServer = Reloading<rustls::ServerConfig>;
/// The agent's reloading client configuration.
pub type ReloadingClient = Reloading<rustls::ClientConfig>;

impl Reloading<rustls::ServerConfig> {
    /// Builds from `files` now (an error here is a start-up error).
    pub fn server(files: ServerFiles) -> Result<Self> {
        let paths = files.paths();
        Self::new(paths, "server certificate", move || files.build())
    }
}

impl Reloading<rustls::ClientConfig> {
    /// Builds from `files` now (an error here is a start-up error).
    pub fn client(files: ClientFiles) -> Result<Self> {
        let paths = files.paths();
        Self::new(paths, "client TLS configuration", move || files.build())
    }
}

impl<T> Reloading<T> {
    fn new(
        paths: Vec<PathBuf>,
        what: &'static str,
        build: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        let digest = digest(&paths)?;
        let current = Arc::new(build()?);
        Ok(Self {
            paths,
            build: Box::new(build),
            what,
            inner: Mutex::new(ReloadState {
                current,
                digest,
                checked: Instant::now(),
            }),
        })
    }

    /// The configuration in force, rebuilt first if the files changed since
    /// the last look (at most one look per [`RELOAD_CHECK_INTERVAL`]). Files
    /// that do not build leave the previous configuration in force.
    pub fn current(&self) -> Arc<T> {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            s.checked = Instant::now();
            self.reload_locked(&mut s);
        }
        s.current.clone()
    }

    /// Looks at the files now, whatever the interval; returns whether a new
    /// configuration is in force.
    pub fn reload(&self) -> bool {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.checked = Instant::now();
        self.reload_locked(&mut s)
    }

    fn reload_locked(&self, s: &mut ReloadState<T>) -> bool {
        let digest = match digest(&self.paths) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("keeping the {} in force: {}", self.what, chain(&e));
                return false;
            }
        };
        if digest == s.digest {
            return false;
        }
        // Remember the content either way: a broken file is reported once,
        // and looked at again when it changes.
        s.digest = digest;
        match (self.build)() {
            Ok(next) => {
                s.current = Arc::new(next);
                tracing::info!(files = ?self.paths, "reloaded the {}", self.what);
                true
            }
            Err(e) => {
                tracing::warn!(
                    "the changed TLS files do not load; keeping the {} in force: {}",
                    self.what,
                    chain(&e)
                );
                false
            }
        }
    }
}

fn digest(paths: &[PathBuf]) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    for p in paths {
        let body = read(p)?;
        h.update((body.len() as u64).to_be_bytes());
        h.update(&body);
    }
    Ok(h.finalize().into())
}

/// An error and its causes on one line, each said once.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The rustls error somewhere in `e`'s chain (tokio-rustls and hyper wrap
/// it in `std::io::Error`s).
pub fn find_rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// Who a client certificate says it is, in the form Kubernetes gives
/// kubelets: subject `O=system:nodes` (or a configured organisation) and
/// `CN=system:node:NAME`; and, when it carries a URI SAN
/// `spiffe://TRUST-DOMAIN/cluster/NAME[/...]`, the cluster it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCertificate {
    /// The node the certificate names.
    pub node: String,
    /// The cluster its SAN fixes, if any.
    pub cluster: Option<String>,
}

/// The Kubernetes group of node client certificates.
pub const NODES_ORGANIZATION: &str = "system:nodes";
/// The prefix of a node's user name.
pub const NODE_CN_PREFIX: &str = "system:node:";

impl NodeCertificate {
    /// Reads a DER client certificate; `organizations` are the accepted
    /// subject organisations (`system:nodes` unless configured otherwise).
    pub fn parse(der: &[u8], organizations: &[String]) -> std::result::Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable client certificate: {e}"))?;
        let subject = cert.subject();
        // One identity per certificate: a subject with two Common Names is
        // read as the last by Kubernetes (Go's crypto/x509 keeps the last
        // of each attribute in `Subject.CommonName`) and as the first by
        // other readers, so an approver and this control plane could
        // disagree about who it is. Refused rather than guessed; so is an
        // attribute that cannot be read as text.
        let cns = subject
            .iter_common_name()
            .map(|cn| cn.as_str())
            .collect::<std::result::Result<Vec<&str>, _>>()
            .map_err(|_| {
                "the client certificate's subject has a Common Name that is not readable text: \
                 who it names is ambiguous, so it is refused"
                    .to_owned()
            })?;
        let cn = match cns.as_slice() {
            [] => return Err("the client certificate has no subject Common Name".into()),
            [one] => *one,
            many => {
                return Err(format!(
                    "the client certificate's subject holds {} Common Names {many:?}: Kubernetes \
                     (Go's crypto/x509) reads the last, other tools the first, so who it names is \
                     ambiguous; a node certificate has exactly one CN={NODE_CN_PREFIX}NODE",
                    many.len()
                ));
            }
        };
        let orgs = subject
            .iter_organization()
            .map(|o| o.as_str())
            .collect::<std::result::Result<Vec<&str>, _>>()
            .map_err(|_| {
                "the client certificate's subject has an Organization that is not readable text: \
                 its groups are ambiguous, so it is refused"
                    .to_owned()
            })?;
        let node = cn
            .strip_prefix(NODE_CN_PREFIX)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                format!(
                    "the client certificate's Common Name {cn:?} is not of the form \
                     {NODE_CN_PREFIX}NODE"
                )
            })?
            .to_owned();
        if !orgs.iter().any(|o| organizations.iter().any(|a| a == o)) {
            return Err(format!(
                "the client certificate's organisation {orgs:?} is not {}: a node certificate has \
                 O={NODES_ORGANIZATION} (or the control plane's --tls-client-organization)",
                organizations.join(" or ")
            ));
        }
        let mut clusters = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name
                    && let Some(c) = cluster_of_uri(uri)
                {
                    clusters.push(c);
                }
            }
        }
        clusters.dedup();
        let cluster = match clusters.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            many => {
                return Err(format!(
                    "the client certificate names several clusters {many:?}"
                ));
            }
        };
        Ok(Self { node, cluster })
    }
}

/// `spiffe://TRUST-DOMAIN/cluster/NAME[/...]` -> `NAME`.
pub fn cluster_of_uri(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (_, path) = rest.split_once('/')?;
    let mut segments = path.split('/');
    match (segments.next(), segments.next()) {
        (Some("cluster"), Some(name)) if !name.is_empty() => Some(name.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_uris() {
        assert_eq!(
            cluster_of_uri("spiffe://example.org/cluster/prod-eu").as_deref(),
            Some("prod-eu")
        );
        assert_eq!(
            cluster_of_uri("spiffe://example.org/cluster/prod-eu/node/n1").as_deref(),
            Some("prod-eu")
        );
        for other in [
            "spiffe://example.org/ns/x",
            "https://example.org/cluster/a",
            "spiffe://example.org/cluster/",
            "spiffe://example.org",
        ] {
            assert_eq!(cluster_of_uri(other), None, "{other}");
        }
    }

    fn cert(cn: &str, org: Option<&str>, uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if let Some(o) = org {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, o);
        }
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().expect("uri")))
            .collect();
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn node_certificates_in_kubernetes_form() {
        let nodes = vec![NODES_ORGANIZATION.to_owned()];
        let ok = NodeCertificate::parse(
            &cert("system:node:node-a", Some("system:nodes"), &[]),
            &nodes,
        )
        .expect("kubelet form");
        assert_eq!(ok.node, "node-a");
        assert_eq!(ok.cluster, None);
        let with_cluster = NodeCertificate::parse(
            &cert(
                "system:node:node-a",
                Some("system:nodes"),
                &["spiffe://fleet.example/cluster/eu"],
            ),
            &nodes,
        )
        .expect("with a cluster");
        assert_eq!(with_cluster.cluster.as_deref(), Some("eu"));

        let plain_cn = NodeCertificate::parse(&cert("node-a", Some("system:nodes"), &[]), &nodes)
            .expect_err("plain CN");
        assert!(plain_cn.contains("system:node:NODE"), "{plain_cn}");
        let no_org = NodeCertificate::parse(&cert("system:node:node-a", None, &[]), &nodes)
            .expect_err("no organisation");
        assert!(no_org.contains("O=system:nodes"), "{no_org}");
        let other_org = NodeCertificate::parse(
            &cert("system:node:node-a", Some("system:masters"), &[]),
            &nodes,
        )
        .expect_err("another organisation");
        assert!(other_org.contains("system:masters"), "{other_org}");
        // A configured organisation replaces system:nodes.
        let custom = vec!["switchyard:nodes".to_owned()];
        NodeCertificate::parse(
            &cert("system:node:node-a", Some("switchyard:nodes"), &[]),
            &custom,
        )
        .expect("configured organisation");
        let two = NodeCertificate::parse(
            &cert(
                "system:node:node-a",
                Some("system:nodes"),
                &["spiffe://x/cluster/a", "spiffe://x/cluster/b"],
            ),
            &nodes,
        )
        .expect_err("two clusters");
        assert!(two.contains("several clusters"), "{two}");
    }

    /// A node certificate whose subject also has `extra` (type, value).
    fn cert_with(extra: (rcgen::DnType, rcgen::DnValue)) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        let dn = &mut params.distinguished_name;
        dn.push(rcgen::DnType::CommonName, "system:node:node-a");
        dn.push(rcgen::DnType::OrganizationName, NODES_ORGANIZATION);
        dn.push(extra.0, extra.1);
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn a_subject_with_two_common_names_or_an_unreadable_one_is_refused() {
        let nodes = vec![NODES_ORGANIZATION.to_owned()];
        // CN=system:node:node-a, ..., CN=system:node:node-b: Kubernetes
        // reads node-b; this was accepted as node-a.
        let cn = rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]);
        let two = NodeCertificate::parse(
            &cert_with((cn.clone(), "system:node:node-b".into())),
            &nodes,
        )
        .expect_err("two CNs");
        assert!(
            two.contains("2 Common Names")
                && two.contains("node-a")
                && two.contains("node-b")
                && two.contains("reads the last"),
            "{two}"
        );
        let unreadable = NodeCertificate::parse(
            &cert_with((
                cn,
                rcgen::DnValue::BmpString("system:node:node-b".try_into().expect("bmp")),
            )),
            &nodes,
        )
        .expect_err("an unreadable CN");
        assert!(unreadable.contains("not readable text"), "{unreadable}");
        let o = rcgen::DnType::CustomDnType(vec![2, 5, 4, 10]);
        let org = NodeCertificate::parse(
            &cert_with((
                o,
                rcgen::DnValue::BmpString("system:masters".try_into().expect("bmp")),
            )),
            &nodes,
        )
        .expect_err("an unreadable organisation");
        assert!(org.contains("Organization that is not readable"), "{org}");
    }

    #[test]
    fn configurations_reload_when_files_change_and_keep_the_old_one_when_broken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write_pair = |name: &str| {
            let key = rcgen::KeyPair::generate().expect("key");
            let params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
            let cert = params.self_signed(&key).expect("cert");
            std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write");
            std::fs::write(dir.path().join("cert.pem"), cert.pem()).expect("write");
            std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("write");
        };
        write_pair("one.example");
        let files = ServerFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca: Some(dir.path().join("ca.pem")),
        };
        let r = Reloading::server(files).expect("builds");
        let first = r.current();
        assert!(!r.reload(), "nothing changed");
        assert!(Arc::ptr_eq(&first, &r.current()));
        write_pair("two.example");
        assert!(r.reload(), "new files, new config");
        let second = r.current();
        assert!(!Arc::ptr_eq(&first, &second));
        std::fs::write(
            dir.path().join("key.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        assert!(!r.reload(), "a broken key keeps the config in force");
        assert!(Arc::ptr_eq(&second, &r.current()));
        let e = ServerFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("missing.pem"),
            client_ca: None,
        }
        .build()
        .expect_err("missing key");
        assert!(chain(&e).contains("missing.pem"), "{}", chain(&e));
    }
}

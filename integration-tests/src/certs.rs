//! Certificates made in the test: a CA, a server certificate for
//! `localhost`, and node client certificates in Kubernetes' form
//! (`O=system:nodes`, `CN=system:node:NAME`), optionally fixing a cluster
//! with a URI SAN `spiffe://switchyard.test/cluster/NAME`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A CA that signs server and client certificates into a directory.
#[derive(Debug)]
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM file).
    pub ca_pem: PathBuf,
}

impl TestCa {
    /// A new CA writing into `dir`.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("CA directory");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            DnType::CommonName,
            format!("switchyard test CA {}", dir.display()),
        );
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).expect("writing CA");
        Self {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
            ca_pem,
        }
    }

    fn issue(
        &self,
        file: &str,
        subject: &[(DnType, &str)],
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("signing");
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("writing certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("writing key");
        (cert_path, key_path)
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        self.server_named("server", &["localhost", "127.0.0.1"])
    }

    /// A server certificate for `names` (DNS names or IP addresses), written
    /// as `file.pem` and `file-key.pem`.
    pub fn server_named(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let sans = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("DNS name")),
            })
            .collect();
        self.issue(
            file,
            &[(DnType::CommonName, "switchyard-control-plane")],
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A node certificate for `node` in Kubernetes' form.
    pub fn client(&self, node: &str) -> (PathBuf, PathBuf) {
        self.node_cert(&format!("client-{node}"), node, "system:nodes", None)
    }

    /// A node certificate: `CN=system:node:NODE`, `O=ORG`, and the cluster
    /// URI SAN when `cluster` is given.
    pub fn node_cert(
        &self,
        file: &str,
        node: &str,
        org: &str,
        cluster: Option<&str>,
    ) -> (PathBuf, PathBuf) {
        let cn = format!("system:node:{node}");
        let sans = cluster
            .map(|c| {
                SanType::URI(
                    format!("spiffe://switchyard.test/cluster/{c}")
                        .as_str()
                        .try_into()
                        .expect("URI"),
                )
            })
            .into_iter()
            .collect();
        self.issue(
            file,
            &[(DnType::CommonName, &cn), (DnType::OrganizationName, org)],
            sans,
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// A client certificate whose subject is only `CN=cn` (not a node's form).
    pub fn plain_client(&self, file: &str, cn: &str) -> (PathBuf, PathBuf) {
        self.issue(
            file,
            &[(DnType::CommonName, cn)],
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

//! Certificates made in the test: a CA, a server certificate for
//! `localhost`, and client certificates whose Common Name is a node name.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
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
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test CA");
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
        cn: &str,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
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
        self.issue(
            "server",
            "switchyard-control-plane",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate naming `node`.
    pub fn client(&self, node: &str) -> (PathBuf, PathBuf) {
        self.issue(
            &format!("client-{node}"),
            node,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

//! TLS to the server: rustls on the ring provider (the crate's one, named
//! here rather than taken from the process's default), checking the
//! server's certificate as much as the `sslmode` asks.

use std::{fmt, io::Read, path::Path, sync::Arc};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier,
    },
    crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    server::ParsedCertificate,
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The largest `sslrootcert` file read: a bundle of every public root is
/// a few hundred KiB.
const LARGEST_ROOTS_FILE: u64 = 4 << 20;

/// What is checked of the server's certificate.
pub(super) enum Check {
    /// Nothing: the connection is encrypted, the server not authenticated
    /// (`require` without `sslrootcert`, as libpq).
    Nothing,
    /// That it chains to one of these roots; not the name it is for
    /// (`verify-ca`).
    Chain(RootCertStore),
    /// That it chains to one of these roots and names the host
    /// (`verify-full`).
    ChainAndName(RootCertStore),
}

/// Where the trusted roots come from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Roots<'a> {
    /// A PEM file of certificates.
    File(&'a str),
    /// The platform's trust store.
    System,
}

impl Roots<'_> {
    /// The roots; an error saying why not, naming the file but nothing it
    /// holds.
    pub(super) fn load(self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match self {
            Roots::File(path) => {
                let pem = read_bounded(Path::new(path))
                    .map_err(|error| format!("sslrootcert `{path}` cannot be read: {error}"))?;
                for certificate in CertificateDer::pem_slice_iter(&pem) {
                    let certificate = certificate
                        .map_err(|error| format!("sslrootcert `{path}` is not PEM: {error}"))?;
                    roots.add(certificate).map_err(|error| {
                        format!("sslrootcert `{path}` holds a certificate rustls refuses: {error}")
                    })?;
                }
                if roots.is_empty() {
                    return Err(format!("sslrootcert `{path}` holds no certificate"));
                }
            }
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    let why = found
                        .errors
                        .first()
                        .map(|error| format!(" ({error})"))
                        .unwrap_or_default();
                    return Err(format!(
                        "no trusted root found on this system{why}: name a PEM file with sslrootcert"
                    ));
                }
            }
        }
        Ok(roots)
    }
}

impl fmt::Display for Roots<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Roots::File(path) => write!(f, "sslrootcert `{path}`"),
            Roots::System => f.write_str("the platform's trust store"),
        }
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut pem = Vec::new();
    std::fs::File::open(path)?
        .take(LARGEST_ROOTS_FILE + 1)
        .read_to_end(&mut pem)?;
    if pem.len() as u64 > LARGEST_ROOTS_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            LARGEST_ROOTS_FILE >> 20
        )));
    }
    Ok(pem)
}

/// The TLS connector making the checks of `check`.
pub(super) fn connector(check: Check) -> Result<MakeRustlsConnect, String> {
    let provider = Arc::new(ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        Check::Nothing => Arc::new(NoName {
            roots: None,
            provider: provider.clone(),
        }),
        Check::Chain(roots) => Arc::new(NoName {
            roots: Some(roots),
            provider: provider.clone(),
        }),
        Check::ChainAndName(roots) => {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|error| format!("the trusted roots cannot be used: {error}"))?
        }
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS cannot be set up: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // What PostgreSQL 17 asks of a direct TLS connection
    // (`sslnegotiation=direct`); older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

/// A verifier that never checks the server's name: with roots, it checks
/// the chain to them (`verify-ca`: what the web PKI verifier does, without
/// its name check); without, it takes any certificate (`prefer` and
/// `require` without `sslrootcert`). Either way the handshake's signatures
/// are checked against the certificate, so the session's keys are the
/// server's, whoever the server is.
#[derive(Debug)]
struct NoName {
    roots: Option<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let certificate = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &certificate,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, certificate, signature, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, certificate, signature, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roots_file_that_is_missing_empty_or_not_pem_is_refused_by_name() {
        let directory = std::env::temp_dir().join(format!("roots-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let missing = directory.join("missing.pem");
        let empty = directory.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let missing = missing.to_str().unwrap();
        let empty = empty.to_str().unwrap();
        let error = Roots::File(missing).load().unwrap_err();
        assert!(
            error.starts_with(&format!("sslrootcert `{missing}` cannot be read")),
            "{error}"
        );
        let error = Roots::File(empty).load().unwrap_err();
        assert_eq!(error, format!("sslrootcert `{empty}` holds no certificate"));
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_roots_file_of_a_certificate_is_loaded() {
        let directory = std::env::temp_dir().join(format!("roots-ok-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let file = directory.join("ca.pem");
        let certificate = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        std::fs::write(&file, certificate.cert.pem()).unwrap();
        let roots = Roots::File(file.to_str().unwrap()).load().unwrap();
        assert_eq!(roots.len(), 1);
        std::fs::remove_dir_all(&directory).unwrap();
    }
}

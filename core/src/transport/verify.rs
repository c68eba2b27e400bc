//! The rustls verifiers that pin keys, and the certificate helpers they share.
//!
//! Kind: pure (no IO, no clock: certificate dates are ignored).
//!
//! Trust comes only from key fingerprints:
//! - [`PinnedKeyVerifier`] (client side of any connection: a client to a device, a device or a
//!   client to a relay) accepts exactly one fingerprint, or records the first one seen when the
//!   caller trusts on first use;
//! - [`ClientKeyVerifier`] (server side) requires a client certificate and accepts any valid
//!   P-256 key, whose fingerprint the server then looks up itself.
//!
//! Both check the TLS 1.3 handshake signature with the provider's algorithms (a matching
//! fingerprint alone would not prove possession of the key), refuse certificate chains, accept
//! only ECDSA P-256/SHA-256, and turn every error into a rejection.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Fingerprint, PublicKey};

/// The one crypto provider: ring, TLS 1.3 suites only, AES-128-GCM first.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Fingerprint of the P-256 key in a certificate.
///
/// # Errors
/// A rustls error when the certificate does not parse or holds another kind of key.
pub fn cert_fingerprint(cert: &CertificateDer<'_>) -> Result<Fingerprint, rustls::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let spki = parsed.subject_public_key_info();
    let key = PublicKey::from_spki_der(spki.as_ref()).map_err(|_| {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            crate::identity::KeyError::NotP256,
        ))))
    })?;
    Ok(key.fingerprint())
}

/// The fingerprint of the authenticated peer of an established connection.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_fingerprint(certs.first()?).ok()
}

const SCHEMES: &[SignatureScheme] = &[SignatureScheme::ECDSA_NISTP256_SHA256];

/// The handshake signature check both verifiers make: ECDSA P-256/SHA-256 only, verified with the
/// provider's algorithms against the key in `cert`.
fn verify_tls13(
    algs: &WebPkiSupportedAlgorithms,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if !SCHEMES.contains(&dss.scheme) {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic)
}

/// Where [`PinnedKeyVerifier`] records the fingerprint the server presented.
pub type ObservedKey = Arc<Mutex<Option<Fingerprint>>>;

/// Client side: accepts exactly the pinned fingerprint (a device's or a relay's), and records the
/// fingerprint the server presented so a mismatch can be reported. Without a pin (pairing by bare
/// address) it accepts any P-256 key, still checking the handshake signature: trust on first use,
/// and the caller shows the recorded fingerprint.
#[derive(Debug)]
pub struct PinnedKeyVerifier {
    expected: Option<Fingerprint>,
    observed: Arc<Mutex<Option<Fingerprint>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedKeyVerifier {
    /// A verifier pinning `expected` (`None`: trust on first use), and the slot where it records
    /// what the server presented.
    pub fn new(expected: Option<Fingerprint>) -> (Arc<Self>, ObservedKey) {
        let observed = Arc::new(Mutex::new(None));
        let verifier = Arc::new(Self {
            expected,
            observed: observed.clone(),
            algs: provider().signature_verification_algorithms,
        });
        (verifier, observed)
    }
}

impl ServerCertVerifier for PinnedKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        let fp = cert_fingerprint(end_entity)?;
        if let Ok(mut slot) = self.observed.lock() {
            *slot = Some(fp);
        }
        if self.expected.is_none_or(|e| e == fp) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.algs, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// Server side (a device, a relay): requires a client certificate holding a P-256 key and proof of possession.
/// Who the key belongs to (a user, a device) is decided after the handshake.
#[derive(Debug)]
pub struct ClientKeyVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientKeyVerifier {
    /// A verifier with the provider's signature algorithms.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            algs: provider().signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for ClientKeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        cert_fingerprint(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.algs, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;
    use crate::transport::{Identity, SERVER_NAME};

    #[test]
    fn identity_cert_carries_the_key() {
        let key = SecretKey::generate();
        let fp = key.fingerprint();
        let id = Identity::new(key).unwrap();
        assert_eq!(cert_fingerprint(&id.cert).unwrap(), fp);
    }

    #[test]
    fn garbage_and_foreign_certs_are_rejected() {
        assert!(cert_fingerprint(&CertificateDer::from(vec![1, 2, 3])).is_err());
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&ed)
            .unwrap();
        assert!(cert_fingerprint(cert.der()).is_err());
    }

    #[test]
    fn pinned_verifier_rejects_other_keys_and_chains() {
        let device = Identity::new(SecretKey::generate()).unwrap();
        let other = Identity::new(SecretKey::generate()).unwrap();
        let observed = Arc::new(Mutex::new(None));
        let v = PinnedKeyVerifier {
            expected: Some(device.fingerprint()),
            observed: observed.clone(),
            algs: provider().signature_verification_algorithms,
        };
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let now = UnixTime::now();
        assert!(
            v.verify_server_cert(&device.cert, &[], &name, &[], now)
                .is_ok()
        );
        assert!(
            v.verify_server_cert(&other.cert, &[], &name, &[], now)
                .is_err()
        );
        assert_eq!(*observed.lock().unwrap(), Some(other.fingerprint()));
        assert!(
            v.verify_server_cert(
                &device.cert,
                std::slice::from_ref(&other.cert),
                &name,
                &[],
                now
            )
            .is_err()
        );
        assert!(
            v.verify_server_cert(&CertificateDer::from(vec![0u8; 10]), &[], &name, &[], now)
                .is_err()
        );
        // Trust on first use takes any P-256 key but still records it, and refuses garbage.
        let (tofu, seen) = PinnedKeyVerifier::new(None);
        assert!(
            tofu.verify_server_cert(&other.cert, &[], &name, &[], now)
                .is_ok()
        );
        assert_eq!(*seen.lock().unwrap(), Some(other.fingerprint()));
        assert!(
            tofu.verify_server_cert(&CertificateDer::from(vec![0u8; 10]), &[], &name, &[], now)
                .is_err()
        );
    }
}

//! Development TLS material for the daemon's mutual TLS: a TLS CA whose key lives in the token,
//! a server certificate for localhost, and client certificates whose URI SAN is the identity
//! the daemon authorises (`spiffe://dccsign.dev/<name>`).
//!
//! The server's key is generated in the token, like the CA's, and the daemon signs its
//! handshakes there (`src/hsm/tls_key.rs`). Client keys are generated in software and written
//! as mode-0600 PKCS#8 files: the TLS clients (other programs: front-ends, the load generator,
//! grpcurl) need them as files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use der::asn1::{Ia5String, OctetString};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::Certificate;

use super::certificate::{build_leaf, to_pem, CertProfile};
use super::KeysError;
use crate::hsm::{KeyHandle, Token};

/// Trust domain of development client identities.
pub const DEV_IDENTITY_PREFIX: &str = "spiffe://dccsign.dev/";

/// The development identity URI for a client name.
pub fn dev_identity(name: &str) -> String {
    format!("{DEV_IDENTITY_PREFIX}{name}")
}

fn b(e: impl std::fmt::Display) -> KeysError {
    KeysError::Build(e.to_string())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeysError + '_ {
    move |source| KeysError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What a TLS leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRole {
    /// `serverAuth`, SAN DNS `localhost` and IPs 127.0.0.1 and ::1.
    Server,
    /// `clientAuth`, SAN URI = the identity.
    Client,
}

/// The development TLS CA: its key in the token and its certificate.
#[derive(Debug, Clone, Copy)]
pub struct TlsCa<'a> {
    /// The token holding the CA key.
    pub token: &'a Token,
    /// The CA key.
    pub key: &'a KeyHandle,
    /// The CA certificate.
    pub cert: &'a Certificate,
}

/// What a leaf is and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Leaf<'a> {
    /// The file name (`<name>.pem`) and, for clients, the identity's last segment.
    pub name: &'a str,
    /// Server or client.
    pub role: TlsRole,
    /// Start of validity.
    pub not_before: SystemTime,
    /// Validity.
    pub lifetime: Duration,
}

/// Issues a TLS leaf (certificate + fresh P-256 key) signed by the CA key in the token, and
/// writes `<dir>/<name>.pem` and `<dir>/<name>.key` (mode 0600). Returns the two paths.
pub fn issue_tls_leaf(
    ca: TlsCa<'_>,
    dir: &Path,
    leaf: Leaf<'_>,
) -> Result<(PathBuf, PathBuf), KeysError> {
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let cert = tls_leaf(ca, &secret.public_key(), leaf)?;
    let key_path = dir.join(format!("{}.key", leaf.name));
    let pem = secret.to_pkcs8_pem(LineEnding::LF).map_err(b)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // A re-issued leaf replaces the old key file.
    let _ = std::fs::remove_file(&key_path);
    crate::hsm::write_private_file(&key_path, pem.as_bytes()).map_err(io(&key_path))?;
    Ok((write_leaf(dir, leaf.name, &cert)?, key_path))
}

/// Issues a TLS leaf for a key in the token (`key`) and writes `<dir>/<name>.pem`; returns its
/// path. No key file: whoever presents the certificate signs with the token.
pub fn issue_tls_leaf_for_token_key(
    ca: TlsCa<'_>,
    dir: &Path,
    leaf: Leaf<'_>,
    key: &KeyHandle,
) -> Result<PathBuf, KeysError> {
    let cert = tls_leaf(ca, &key.public_key, leaf)?;
    write_leaf(dir, leaf.name, &cert)
}

fn write_leaf(dir: &Path, name: &str, cert: &Certificate) -> Result<PathBuf, KeysError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join(format!("{name}.pem"));
    std::fs::write(&cert_path, to_pem(cert)?).map_err(io(&cert_path))?;
    Ok(cert_path)
}

/// What a certificate request for a TLS key asks for.
#[derive(Debug, Clone, Copy)]
pub struct TlsRequest<'a> {
    /// The subject, an RFC 4514 name (`CN=dccsign.example.se,O=…`).
    pub subject: &'a str,
    /// `serverAuth` or `clientAuth`.
    pub role: TlsRole,
    /// DNS names for the subject alternative name.
    pub dns: &'a [String],
    /// IP addresses for it.
    pub ips: &'a [IpAddr],
    /// URIs for it (a client identity, e.g. `spiffe://…`).
    pub uris: &'a [String],
}

/// A PKCS#10 certificate request for `key`, signed inside the token (PEM): the subject and, as
/// requested extensions, the subject alternative names and the extended key usage of the role.
/// For the organisation's TLS CA (or the EU gateway's registration) to certify a key that never
/// leaves the HSM.
pub fn tls_csr(token: &Token, key: &KeyHandle, req: TlsRequest<'_>) -> Result<String, KeysError> {
    use der::EncodePem;
    use x509_cert::builder::{Builder, RequestBuilder};
    let subject = x509_cert::name::Name::from_str(req.subject).map_err(|e| {
        KeysError::Build(format!(
            "subject {:?}: not an RFC 4514 name: {e}",
            req.subject
        ))
    })?;
    let mut names = Vec::new();
    for d in req.dns {
        names.push(GeneralName::DnsName(Ia5String::new(d).map_err(b)?));
    }
    for ip in req.ips {
        let octets = match ip {
            IpAddr::V4(v) => v.octets().to_vec(),
            IpAddr::V6(v) => v.octets().to_vec(),
        };
        names.push(GeneralName::IpAddress(OctetString::new(octets).map_err(b)?));
    }
    for u in req.uris {
        names.push(GeneralName::UniformResourceIdentifier(
            Ia5String::new(u).map_err(b)?,
        ));
    }
    if names.is_empty() {
        return Err(KeysError::Build(
            "a TLS certificate needs at least one DNS name, IP address or URI".into(),
        ));
    }
    let eku = match req.role {
        TlsRole::Server => const_oid::db::rfc5280::ID_KP_SERVER_AUTH,
        TlsRole::Client => const_oid::db::rfc5280::ID_KP_CLIENT_AUTH,
    };
    let signer = crate::hsm::TokenSigner::new(token, key);
    let mut builder = RequestBuilder::new(subject, &signer).map_err(b)?;
    builder.add_extension(&SubjectAltName(names)).map_err(b)?;
    builder
        .add_extension(&x509_cert::ext::pkix::ExtendedKeyUsage(vec![eku]))
        .map_err(b)?;
    let csr = builder.build::<p256::ecdsa::DerSignature>().map_err(b)?;
    csr.to_pem(LineEnding::LF).map_err(b)
}

/// The certificate of a TLS leaf for `public_key`, signed by the CA key in the token.
fn tls_leaf(
    ca: TlsCa<'_>,
    public_key: &p256::PublicKey,
    leaf: Leaf<'_>,
) -> Result<Certificate, KeysError> {
    let Leaf {
        name,
        role,
        not_before,
        lifetime,
    } = leaf;
    let mut names = Vec::new();
    let eku = match role {
        TlsRole::Server => {
            names.push(GeneralName::DnsName(
                Ia5String::new("localhost").map_err(b)?,
            ));
            for ip in ["127.0.0.1", "::1"] {
                let ip = IpAddr::from_str(ip).map_err(b)?;
                let octets = match ip {
                    IpAddr::V4(v) => v.octets().to_vec(),
                    IpAddr::V6(v) => v.octets().to_vec(),
                };
                names.push(GeneralName::IpAddress(OctetString::new(octets).map_err(b)?));
            }
            const_oid::db::rfc5280::ID_KP_SERVER_AUTH
        }
        TlsRole::Client => {
            names.push(GeneralName::UniformResourceIdentifier(
                Ia5String::new(&dev_identity(name)).map_err(b)?,
            ));
            const_oid::db::rfc5280::ID_KP_CLIENT_AUTH
        }
    };
    build_leaf(
        ca.token,
        ca.key,
        ca.cert,
        public_key,
        &[eku],
        Some(SubjectAltName(names)),
        &CertProfile {
            subject: format!("CN={name},O=dccsign development"),
            not_before,
            lifetime,
        },
        x509_cert::ext::pkix::KeyUsages::DigitalSignature,
    )
}

//! `dccsign dev-init`: a complete development PKI inside a fresh SoftHSM token.
//!
//! Creates (only what is missing, so running it twice changes nothing): the SoftHSM config and
//! token directory, random user and SO PINs in mode-0600 files, the token, a CSCA key with a
//! self-signed certificate, one DSC key per certificate type with a certificate signed by the
//! CSCA, an upload key with its certificate (signed by the CSCA) for EU gateway batches, the
//! audit key and the revocation-list key with their public keys, the TLS PKI, and
//! `dccsign.toml`. Every private key is generated inside the token.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use der::DecodePem;
use rand::distributions::{Alphanumeric, DistString};
use secrecy::SecretString;
use x509_cert::ext::pkix::KeyUsages;
use x509_cert::Certificate;

use super::certificate::{build_csca, build_dsc, build_leaf, to_pem, CertProfile};
use super::crl::{crl_from_pem, crl_to_pem, issue_crl};
use super::tls::{issue_tls_leaf, issue_tls_leaf_for_token_key, Leaf, TlsCa, TlsRole};
use super::KeysError;
use crate::dcc::CertType;
use crate::hsm::{load_pin, KeyHandle, PinSource, Token, TokenSettings, SOFTHSM_MODULE};

/// Label of the development token.
pub const DEV_TOKEN_LABEL: &str = "dccsign-dev";
/// Label of the development CSCA key.
const CSCA_LABEL: &str = "dev-csca";
/// Label of the HMAC key for generated UVCIs.
const UVCI_KEY_LABEL: &str = "uvci-hmac";
const AUDIT_KEY_LABEL: &str = "audit-key";
/// Label of the key that signs the verifier revocation list.
const REVOCATION_LIST_KEY_LABEL: &str = "revocation-list-key";
/// Label of the key that signs revocation batches (CMS) for the EU gateway.
const UPLOAD_KEY_LABEL: &str = "upload-key";
/// Label of the development TLS CA key.
const TLS_CA_LABEL: &str = "dev-tls-ca";
/// Label of the daemon's TLS server key.
pub const TLS_SERVER_LABEL: &str = "tls-server";
/// Label of the daemon's TLS client key towards the EU gateway and subscribers.
pub const TLS_GATEWAY_CLIENT_LABEL: &str = "tls-gateway-client";
/// Its certificate, a development client certificate (`spiffe://dccsign.dev/gateway-client`).
const GATEWAY_CLIENT_CERT: &str = "pki/tls/gateway-client.pem";
/// The client certificates `dev-init` creates: issuers and security officers.
pub const DEV_CLIENTS: [&str; 4] = ["issuer-all", "issuer-test", "officer-1", "officer-2"];
/// The development TLS CA's CRL of client certificates, which the development config names.
const CLIENT_CRL: &str = "pki/tls/clients-crl.pem";
/// How long a development CRL is valid (its nextUpdate): a year, like the certificates.
const DEV_CRL_LIFETIME: Duration = Duration::from_secs(365 * DAY);
const SOFTHSM_TEMPLATE: &str = include_str!("../../hsm-config/softhsm2.conf.template");
const DAY: u64 = 86_400;

/// What `dev_init` found and did.
#[derive(Debug, Default)]
pub struct DevInitReport {
    /// Things created in this run (empty on a second run).
    pub created: Vec<String>,
    /// The config file to pass to other commands.
    pub config: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeysError + '_ {
    move |source| KeysError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a file atomically (temporary file + fsync + rename) unless it exists.
fn write_new(path: &Path, contents: &str) -> Result<bool, KeysError> {
    if path.exists() {
        return Ok(false);
    }
    replace_file(path, contents)?;
    Ok(true)
}

/// Writes `path` whole or not at all: a temporary file, synced, renamed over it.
fn replace_file(path: &Path, contents: &str) -> Result<(), KeysError> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn mkdir_private(path: &Path) -> Result<(), KeysError> {
    std::fs::create_dir_all(path).map_err(io(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
    }
    Ok(())
}

fn ensure_pin(path: &Path, created: &mut Vec<String>) -> Result<SecretString, KeysError> {
    if !path.exists() {
        let pin = Alphanumeric.sample_string(&mut rand::rngs::OsRng, 20);
        crate::hsm::write_private_file(path, format!("{pin}\n").as_bytes()).map_err(io(path))?;
        created.push(format!("PIN file {}", path.display()));
    }
    Ok(load_pin(
        &PinSource::File(path.to_path_buf()),
        Path::new("."),
    )?)
}

fn load_cert(path: &Path) -> Result<Certificate, KeysError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    Certificate::from_pem(text.as_bytes()).map_err(|e| KeysError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The key with this label, generated in the token if it does not exist yet.
fn ensure_key(
    token: &Token,
    label: &str,
    created: &mut Vec<String>,
) -> Result<KeyHandle, KeysError> {
    match token.find_key(label) {
        Ok(k) => Ok(k),
        Err(crate::hsm::HsmError::KeyNotFound(_)) => {
            created.push(format!("key {label}"));
            Ok(token.generate_p256(label)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes the public key of `key` as PEM to `path` unless the file exists.
fn ensure_public_pem(
    key: &KeyHandle,
    path: &Path,
    what: &str,
    created: &mut Vec<String>,
) -> Result<(), KeysError> {
    if !path.exists() {
        use p256::pkcs8::EncodePublicKey;
        let pem = key
            .public_key
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|e| KeysError::Build(e.to_string()))?;
        write_new(path, &pem)?;
        created.push(format!("{what} {}", path.display()));
    }
    Ok(())
}

/// Opens the development token of an existing state directory.
fn open_dev_token(state_dir: &Path) -> Result<Token, KeysError> {
    let conf = state_dir.join("softhsm2.conf");
    std::env::set_var("SOFTHSM2_CONF", &conf);
    Ok(Token::open(&TokenSettings {
        module: PathBuf::from(SOFTHSM_MODULE),
        label: DEV_TOKEN_LABEL.into(),
        pin: PinSource::File(state_dir.join("secrets/user.pin")),
        base_dir: state_dir.to_path_buf(),
    })?)
}

/// Issues one more development client certificate (`<state>/pki/clients/<name>.{pem,key}`) from
/// the development TLS CA, with the given validity — e.g. an expired one for tests. Exports
/// `SOFTHSM2_CONF`: call it before any other PKCS#11 use in the process.
pub fn dev_client_cert(
    state_dir: &Path,
    name: &str,
    not_before: SystemTime,
    lifetime: Duration,
) -> Result<(PathBuf, PathBuf), KeysError> {
    dev_tls_cert(state_dir, name, TlsRole::Client, not_before, lifetime)
}

/// Issues a development TLS certificate with a PEM key from the development TLS CA: a client's
/// (`<state>/pki/clients/<name>.{pem,key}`, like [`dev_client_cert`]) or a server's for
/// localhost (`<state>/pki/tls/<name>.{pem,key}`, e.g. for a stand-in of the EU gateway).
/// Exports `SOFTHSM2_CONF`: call it before any other PKCS#11 use in the process.
pub fn dev_tls_cert(
    state_dir: &Path,
    name: &str,
    role: TlsRole,
    not_before: SystemTime,
    lifetime: Duration,
) -> Result<(PathBuf, PathBuf), KeysError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(KeysError::Build(
            "client name must be letters, digits and '-'".into(),
        ));
    }
    let token = open_dev_token(state_dir)?;
    let ca_key = token.find_key(TLS_CA_LABEL)?;
    let ca = load_cert(&state_dir.join("pki/tls/ca.pem"))?;
    let dir = match role {
        TlsRole::Client => state_dir.join("pki/clients"),
        TlsRole::Server => state_dir.join("pki/tls"),
    };
    if role == TlsRole::Server && name == "server" {
        return Err(KeysError::Build(
            "the daemon's own server certificate is made by dev-init (its key is in the token)"
                .into(),
        ));
    }
    let ca = TlsCa {
        token: &token,
        key: &ca_key,
        cert: &ca,
    };
    let leaf = Leaf {
        name,
        role,
        not_before,
        lifetime,
    };
    issue_tls_leaf(ca, &dir, leaf)
}

/// Revokes the development client certificate `<state>/pki/clients/<name>.pem`: the
/// development TLS CA re-issues its CRL (`pki/tls/clients-crl.pem`) with the certificate's
/// serial added, valid for `lifetime` (its `nextUpdate`), and a running daemon reads it again
/// within `client_crl_check_seconds`. Returns the CRL's path. Exports `SOFTHSM2_CONF`, like
/// [`dev_tls_cert`].
pub fn dev_revoke_client(
    state_dir: &Path,
    name: &str,
    lifetime: Duration,
) -> Result<PathBuf, KeysError> {
    let token = open_dev_token(state_dir)?;
    let ca_key = token.find_key(TLS_CA_LABEL)?;
    let ca_cert = load_cert(&state_dir.join("pki/tls/ca.pem"))?;
    let cert = load_cert(&state_dir.join(format!("pki/clients/{name}.pem")))?;
    let path = state_dir.join(CLIENT_CRL);
    let previous = match std::fs::read(&path) {
        Ok(pem) => Some(crl_from_pem(&pem)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&path)(e)),
    };
    let ca = TlsCa {
        token: &token,
        key: &ca_key,
        cert: &ca_cert,
    };
    let crl = issue_crl(
        ca,
        previous.as_ref(),
        Some(&cert),
        SystemTime::now(),
        lifetime,
    )?;
    replace_file(&path, &crl_to_pem(&crl)?)?;
    Ok(path)
}

/// Development CSCA operator: checks a PKCS#10 request's own signature and certifies its key as
/// a DSC for `types` with the development CSCA in the token (PEM). Production DSCs are
/// certified by the country's CSCA, outside dccsign.
pub fn dev_sign_csr(
    state_dir: &Path,
    csr_pem: &[u8],
    types: &[CertType],
    not_before: SystemTime,
    lifetime: Duration,
    digital_signature: bool,
) -> Result<String, KeysError> {
    use der::Encode;
    use p256::ecdsa::signature::Verifier;
    let bad = |m: String| KeysError::Parse {
        path: "CSR".into(),
        message: m,
    };
    let req = x509_cert::request::CertReq::from_pem(csr_pem).map_err(|e| bad(e.to_string()))?;
    let public =
        p256::PublicKey::from_sec1_bytes(req.info.public_key.subject_public_key.raw_bytes())
            .map_err(|_| bad("the requested key is not P-256".into()))?;
    let info = req.info.to_der().map_err(|e| bad(e.to_string()))?;
    let sig = p256::ecdsa::Signature::from_der(req.signature.raw_bytes())
        .map_err(|e| bad(e.to_string()))?;
    p256::ecdsa::VerifyingKey::from(&public)
        .verify(&info, &sig)
        .map_err(|_| bad("the request's signature does not verify".into()))?;
    let token = open_dev_token(state_dir)?;
    let csca_key = token.find_key(CSCA_LABEL)?;
    let csca = load_cert(&state_dir.join("pki/csca.pem"))?;
    let eku = types
        .iter()
        .map(|t| const_oid::ObjectIdentifier::new(t.eku_oid()).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let profile = CertProfile {
        subject: req.info.subject.to_string(),
        not_before,
        lifetime,
    };
    let cert = super::certificate::build_leaf(
        &token,
        &csca_key,
        &csca,
        &public,
        &eku,
        None,
        &profile,
        if digital_signature {
            x509_cert::ext::pkix::KeyUsages::DigitalSignature
        } else {
            x509_cert::ext::pkix::KeyUsages::NonRepudiation
        },
    )?;
    to_pem(&cert)
}

/// Sets up (or completes) the development PKI under `state_dir` for issuing country `country`.
///
/// Exports `SOFTHSM2_CONF` for this process: call it before any other PKCS#11 use.
pub fn dev_init(state_dir: &Path, country: &str) -> Result<DevInitReport, KeysError> {
    let mut created = Vec::new();
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let state_dir = state_dir.canonicalize().map_err(io(state_dir))?;
    let tokens = state_dir.join("tokens");
    let secrets = state_dir.join("secrets");
    let pki = state_dir.join("pki");
    mkdir_private(&tokens)?;
    mkdir_private(&secrets)?;
    std::fs::create_dir_all(&pki).map_err(io(&pki))?;

    let conf = state_dir.join("softhsm2.conf");
    let conf_text = SOFTHSM_TEMPLATE.replace("@TOKENDIR@", &tokens.display().to_string());
    if write_new(&conf, &conf_text)? {
        created.push(format!("SoftHSM config {}", conf.display()));
    }
    std::env::set_var("SOFTHSM2_CONF", &conf);

    let user_pin = ensure_pin(&secrets.join("user.pin"), &mut created)?;
    let so_pin = ensure_pin(&secrets.join("so.pin"), &mut created)?;
    let module = PathBuf::from(SOFTHSM_MODULE);
    if !Token::exists(&module, DEV_TOKEN_LABEL)? {
        Token::initialize(&module, DEV_TOKEN_LABEL, &so_pin, &user_pin)?;
        created.push(format!("token {DEV_TOKEN_LABEL}"));
    }
    drop(so_pin);
    let token = Token::open(&TokenSettings {
        module,
        label: DEV_TOKEN_LABEL.into(),
        pin: PinSource::File(secrets.join("user.pin")),
        base_dir: state_dir.clone(),
    })?;

    let now = SystemTime::now();
    let csca_key = ensure_key(&token, CSCA_LABEL, &mut created)?;
    let csca_path = pki.join("csca.pem");
    if !csca_path.exists() {
        let cert = build_csca(
            &token,
            &csca_key,
            &CertProfile {
                subject: format!("CN=dccsign development CSCA,O=dccsign development,C={country}"),
                not_before: now,
                lifetime: Duration::from_secs(4 * 365 * DAY),
            },
        )?;
        write_new(&csca_path, &to_pem(&cert)?)?;
        created.push(format!("certificate {}", csca_path.display()));
    }
    let csca_cert = load_cert(&csca_path)?;

    for t in CertType::ALL {
        let label = format!("dsc-{}", t.as_str());
        let key = ensure_key(&token, &label, &mut created)?;
        let path = pki.join(format!("{label}.pem"));
        if !path.exists() {
            let serial_hint = hex::encode(&key.id[..4]);
            let cert = build_dsc(
                &token,
                &csca_key,
                &csca_cert,
                &key,
                &[t],
                &CertProfile {
                    subject: format!(
                        "CN=dccsign dev DSC {} {serial_hint},O=dccsign development,C={country}",
                        t.as_str()
                    ),
                    not_before: now,
                    lifetime: Duration::from_secs(730 * DAY),
                },
            )?;
            write_new(&path, &to_pem(&cert)?)?;
            created.push(format!("certificate {}", path.display()));
        }
    }

    // The upload key: signs revocation batches (CMS) for the EU gateway. Its certificate is an
    // end-entity certificate from the CSCA with keyUsage digitalSignature and no extended key
    // usage (it signs no health certificates).
    let upload_key = ensure_key(&token, UPLOAD_KEY_LABEL, &mut created)?;
    let upload_path = pki.join("upload.pem");
    if !upload_path.exists() {
        let cert = build_leaf(
            &token,
            &csca_key,
            &csca_cert,
            &upload_key.public_key,
            &[],
            None,
            &CertProfile {
                subject: format!("CN=dccsign development upload,O=dccsign development,C={country}"),
                not_before: now,
                lifetime: Duration::from_secs(730 * DAY),
            },
            KeyUsages::DigitalSignature,
        )?;
        write_new(&upload_path, &to_pem(&cert)?)?;
        created.push(format!("certificate {}", upload_path.display()));
    }

    // The HMAC key from which generated UVCIs are derived (idempotent retries).
    if let Err(crate::hsm::HsmError::KeyNotFound(_)) = token.find_hmac_key(UVCI_KEY_LABEL) {
        token.generate_hmac_key(UVCI_KEY_LABEL)?;
        created.push(format!("HMAC key {UVCI_KEY_LABEL}"));
    }

    // The TLS PKI of the daemon's mutual TLS.
    let tls_dir = pki.join("tls");
    std::fs::create_dir_all(&tls_dir).map_err(io(&tls_dir))?;
    let audit_key = ensure_key(&token, AUDIT_KEY_LABEL, &mut created)?;
    ensure_public_pem(
        &audit_key,
        &pki.join("audit-key.pem"),
        "audit public key",
        &mut created,
    )?;
    // The key that signs the verifier revocation list; verifiers check it with the PEM.
    let list_key = ensure_key(&token, REVOCATION_LIST_KEY_LABEL, &mut created)?;
    ensure_public_pem(
        &list_key,
        &pki.join("revocation-list-key.pem"),
        "revocation list public key",
        &mut created,
    )?;
    let tls_ca_key = ensure_key(&token, TLS_CA_LABEL, &mut created)?;
    let tls_ca_path = tls_dir.join("ca.pem");
    if !tls_ca_path.exists() {
        let cert = build_csca(
            &token,
            &tls_ca_key,
            &CertProfile {
                subject: "CN=dccsign development TLS CA,O=dccsign development".into(),
                not_before: now,
                lifetime: Duration::from_secs(4 * 365 * DAY),
            },
        )?;
        write_new(&tls_ca_path, &to_pem(&cert)?)?;
        created.push(format!("certificate {}", tls_ca_path.display()));
    }
    let tls_ca = load_cert(&tls_ca_path)?;
    let year = Duration::from_secs(365 * DAY);
    let ca = TlsCa {
        token: &token,
        key: &tls_ca_key,
        cert: &tls_ca,
    };
    let leaf = |name| Leaf {
        name,
        role: TlsRole::Client,
        not_before: now,
        lifetime: year,
    };
    let server = Leaf {
        role: TlsRole::Server,
        ..leaf("server")
    };
    let server_pem = tls_dir.join("server.pem");
    // A state directory from before the server key moved into the token keeps its key file,
    // which its configuration names.
    let key_file = tls_dir.join("server.key").exists();
    let token_key = if key_file {
        None
    } else {
        Some(ensure_key(&token, TLS_SERVER_LABEL, &mut created)?)
    };
    if !server_pem.exists() {
        match &token_key {
            Some(key) => issue_tls_leaf_for_token_key(ca, &tls_dir, server, key).map(|_| ())?,
            None => issue_tls_leaf(ca, &tls_dir, server).map(|_| ())?,
        }
        created.push(format!("TLS server certificate {}", server_pem.display()));
    }
    // The client key towards the EU gateway (a stand-in in development), in the token too.
    let gateway_key = ensure_key(&token, TLS_GATEWAY_CLIENT_LABEL, &mut created)?;
    let gateway_pem = state_dir.join(GATEWAY_CLIENT_CERT);
    if !gateway_pem.exists() {
        issue_tls_leaf_for_token_key(ca, &tls_dir, leaf("gateway-client"), &gateway_key)?;
        created.push(format!("TLS client certificate {}", gateway_pem.display()));
    }
    let clients = pki.join("clients");
    for name in DEV_CLIENTS {
        if !clients.join(format!("{name}.pem")).exists()
            || !clients.join(format!("{name}.key")).exists()
        {
            issue_tls_leaf(ca, &clients, leaf(name))?;
            created.push(format!(
                "TLS client certificate {}",
                clients.join(format!("{name}.pem")).display()
            ));
        }
    }

    let crl_path = state_dir.join(CLIENT_CRL);
    if !crl_path.exists() {
        let crl = issue_crl(ca, None, None, now, DEV_CRL_LIFETIME)?;
        write_new(&crl_path, &crl_to_pem(&crl)?)?;
        created.push(format!("client CRL {}", crl_path.display()));
    }

    let config = state_dir.join("dccsign.toml");
    if write_new(&config, &dev_config(country))? {
        created.push(format!("config {}", config.display()));
    }
    Ok(DevInitReport { created, config })
}

fn dev_config(country: &str) -> String {
    format!(
        r#"# dccsign configuration written by `dccsign dev-init` (development only).
# Relative paths are relative to this file's directory.

[issuer]
country = "{country}"
# Issuing-entity part of generated UVCIs: URN:UVCI:01:{country}:<prefix>/<random>#<check>
uvci_prefix = "DEV"
# HMAC key in the token from which generated UVCIs are derived (per client and request id).
uvci_key = "pkcs11:token={DEV_TOKEN_LABEL};object=uvci-hmac;type=secret-key"

[hsm]
module = "{SOFTHSM_MODULE}"
token = "{DEV_TOKEN_LABEL}"
# PIN from a mode-0600 file or an environment variable ({{ env = "DCCSIGN_PIN" }}); never on the command line.
pin = {{ file = "secrets/user.pin" }}
softhsm2_conf = "softhsm2.conf"
# Signing sessions (= worker threads); 0 = number of CPUs.
pool_size = 0
queue = 4096
# Sign with session copies of the keys (made once per key inside the token): SoftHSM re-reads a
# token object from disk on every use. false = sign with the token objects.
session_key_copies = true

[ledger]
path = "ledger.sqlite"

# Key lifecycle: managed keys, pending two-person operations and the audit log.
[keys]
database = "control.sqlite"
# "production" or "test"; a DSC must chain to a CSCA of the same environment.
environment = "test"
# Days between publishing a DSC and activating it (verifier apps sync daily; production: 2).
propagation_delay_hours = 0
# Private key usage period from activation.
usage_period_days = 183
# How long a pending two-person operation waits for its second officer.
operation_ttl_hours = 24
# Audit checkpoints (entry count + head hash) signed by this key in the token.
audit_key = "audit-key"
audit_public_key = "pki/audit-key.pem"
checkpoint_interval_seconds = 300
[[keys.csca]]
certificate = "pki/csca.pem"
environment = "test"

# Revocation: EU gateway batches, the signed verifier list, retention.
[revocation]
# Base URL of the EU gateway; without it batches are built and kept but not delivered.
# gateway_url = "https://dgcg.example.eu"
# CA certificates (PEM) that the gateway's server certificate chains to.
# gateway_ca = "pki/gateway-ca.pem"
# Our TLS client certificate (PEM) towards the gateway, as registered there (dev-init's is
# from the development TLS CA).
# gateway_client_certificate = "{GATEWAY_CLIENT_CERT}"
# Its private key: in the token (the HSM signs each handshake), or a PEM file (mode 0600).
# gateway_client_key = "pkcs11:token={DEV_TOKEN_LABEL};object={TLS_GATEWAY_CLIENT_LABEL};type=private"
# Key in the token that signs batches (CMS), and its certificate embedded in each CMS.
upload_key = "{UPLOAD_KEY_LABEL}"
upload_certificate = "pki/upload.pem"
# Key in the token that signs the verifier list, and its public key (dccsign verify --revocation-key).
list_key = "{REVOCATION_LIST_KEY_LABEL}"
list_public_key = "pki/revocation-list-key.pem"
# Days after a certificate's expiry before its rows are purged (Swedish rule: 7).
retention_days = 7

[validation]
max_sample_age_hours = 168
clock_skew_seconds = 300

[validity]
test_hours = 72
vaccination_days = 270
recovery_days = 180

[server]
listen = "127.0.0.1:50051"
# Prometheus metrics (plain HTTP, unauthenticated: keep it on loopback or a management
# network); "none" turns them off.
metrics_listen = "127.0.0.1:9464"
certificate = "pki/tls/server.pem"
# The server certificate's key, in the token (the HSM signs each TLS handshake); a PEM file
# path also works.
key = "pkcs11:token={DEV_TOKEN_LABEL};object={TLS_SERVER_LABEL};type=private"
# Client certificates must chain to this CA; the identity is their URI (or DNS) SAN.
client_ca = "pki/tls/ca.pem"
# ...and must not be on its CRL (dccsign dev-client-cert --revoke adds one); read again
# when the file changes.
client_crls = ["{CLIENT_CRL}"]
max_message_bytes = 65536
max_batch_bytes = 1048576
max_in_flight_per_client = 256
rate_per_second = 20000
rate_burst = 40000
max_stream_items = 1000000
shutdown_grace_seconds = 10
health_interval_seconds = 5
# Threads of the async runtime (TLS, HTTP/2, validation); 0 = half the CPUs, at least one: the
# HSM workers and the ledger writer run beside it on threads of their own.
async_workers = 0

# Who may call. Each gRPC service allows some roles only: Issuance = issuer.
# An issuer's UVCIs are URN:UVCI:01:SE:<uvci_prefix>/… (default: [issuer] uvci_prefix); a UVCI
# it gives in a payload must be in that namespace too, unless it has given_uvci = "any".
[[client]]
identity = "spiffe://dccsign.dev/issuer-all"
role = "issuer"
types = ["test", "vaccination", "recovery"]

[[client]]
identity = "spiffe://dccsign.dev/issuer-test"
role = "issuer"
types = ["test"]
uvci_prefix = "DEVTEST"

[[client]]
identity = "spiffe://dccsign.dev/officer-1"
role = "officer"

[[client]]
identity = "spiffe://dccsign.dev/officer-2"
role = "officer"

[[dsc]]
key = "pkcs11:token={DEV_TOKEN_LABEL};object=dsc-test;type=private"
certificate = "pki/dsc-test.pem"
types = ["test"]

[[dsc]]
key = "pkcs11:token={DEV_TOKEN_LABEL};object=dsc-vaccination;type=private"
certificate = "pki/dsc-vaccination.pem"
types = ["vaccination"]

[[dsc]]
key = "pkcs11:token={DEV_TOKEN_LABEL};object=dsc-recovery;type=private"
certificate = "pki/dsc-recovery.pem"
types = ["recovery"]
"#
    )
}

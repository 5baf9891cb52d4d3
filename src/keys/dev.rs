//! `dccsign dev-init`: a complete development PKI inside a fresh SoftHSM token.
//!
//! Creates (only what is missing, so running it twice changes nothing): the SoftHSM config and
//! token directory, random user and SO PINs in mode-0600 files, the token, a CSCA key with a
//! self-signed certificate, one DSC key per certificate type with a certificate signed by the
//! CSCA, and `dccsign.toml`. Every private key is generated inside the token.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use der::DecodePem;
use rand::distributions::{Alphanumeric, DistString};
use secrecy::SecretString;
use x509_cert::Certificate;

use super::certificate::{build_csca, build_dsc, to_pem, CertProfile};
use super::KeysError;
use crate::dcc::CertType;
use crate::hsm::{load_pin, PinSource, Token, TokenSettings, SOFTHSM_MODULE};

/// Label of the development token.
pub const DEV_TOKEN_LABEL: &str = "dccsign-dev";
/// Label of the development CSCA key.
const CSCA_LABEL: &str = "dev-csca";
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
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(true)
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
        crate::hsm::write_pin_file_new(path, &pin).map_err(io(path))?;
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
    let csca_key = match token.find_key(CSCA_LABEL) {
        Ok(k) => k,
        Err(crate::hsm::HsmError::KeyNotFound(_)) => {
            created.push(format!("key {CSCA_LABEL}"));
            token.generate_p256(CSCA_LABEL)?
        }
        Err(e) => return Err(e.into()),
    };
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
        let key = match token.find_key(&label) {
            Ok(k) => k,
            Err(crate::hsm::HsmError::KeyNotFound(_)) => {
                created.push(format!("key {label}"));
                token.generate_p256(&label)?
            }
            Err(e) => return Err(e.into()),
        };
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

[hsm]
module = "{SOFTHSM_MODULE}"
token = "{DEV_TOKEN_LABEL}"
# PIN from a mode-0600 file or an environment variable ({{ env = "DCCSIGN_PIN" }}); never on the command line.
pin = {{ file = "secrets/user.pin" }}
softhsm2_conf = "softhsm2.conf"
# Signing sessions (= worker threads); 0 = number of CPUs.
pool_size = 0
queue = 4096

[ledger]
path = "ledger.sqlite"

[validation]
max_sample_age_hours = 168
clock_skew_seconds = 300

[validity]
test_hours = 72
vaccination_days = 270
recovery_days = 180

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

//! The configuration file (`dccsign.toml`). Relative paths are resolved against the directory
//! that holds the file. `dev-init` writes one under the state directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dcc::CertType;
use crate::hsm::{PinSource, TokenSettings, SOFTHSM_MODULE};

/// Errors reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who we are when issuing.
    pub issuer: IssuerConfig,
    /// The PKCS#11 token.
    pub hsm: HsmConfig,
    /// The ledger database.
    pub ledger: LedgerConfig,
    /// Payload rules with tunable limits.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Certificate lifetimes.
    #[serde(default)]
    pub validity: ValidityConfig,
    /// The document signers: one per certificate type (a DSC may serve several types).
    #[serde(default, rename = "dsc")]
    pub dscs: Vec<DscConfig>,
    /// The gRPC daemon (needed by `serve` only).
    #[serde(default)]
    pub server: Option<ServerConfig>,
    /// Callers and what they may do.
    #[serde(default, rename = "client")]
    pub clients: Vec<ClientConfig>,
    /// Key lifecycle: managed keys, CSCAs, two-person operations, audit.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Revocation: EU gateway batches, subscribers, the verifier list, retention.
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// Directory relative paths are resolved against (the config file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// Production or test: keys and CSCAs of one are never used by the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// The live service.
    #[default]
    Production,
    /// Test and acceptance systems.
    Test,
}

impl std::fmt::Display for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Environment::Production => "production",
            Environment::Test => "test",
        })
    }
}

/// A country signing CA that may certify our DSCs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CscaConfig {
    /// PEM certificate.
    pub certificate: PathBuf,
    /// The environment this CSCA is for.
    pub environment: Environment,
}

/// `[keys]`: the key lifecycle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// SQLite file with managed keys, pending operations and the audit log.
    #[serde(default = "default_control_db")]
    pub database: PathBuf,
    /// This deployment's environment (default production).
    #[serde(default)]
    pub environment: Environment,
    /// CSCAs whose DSC certificates may be imported.
    #[serde(default)]
    pub csca: Vec<CscaConfig>,
    /// Hours between publishing a DSC and activating it (default 48).
    #[serde(default = "default_propagation")]
    pub propagation_delay_hours: u32,
    /// Private key usage period from activation, in days (default 183).
    #[serde(default = "default_usage_period")]
    pub usage_period_days: u32,
    /// How long a pending two-person operation stays approvable, in hours (default 24).
    #[serde(default = "default_operation_ttl")]
    pub operation_ttl_hours: u32,
    /// P-256 key in the token (label or `pkcs11:` URI) that signs audit checkpoints.
    #[serde(default)]
    pub audit_key: Option<String>,
    /// Its public key (PEM), for `dccsign audit verify`.
    #[serde(default)]
    pub audit_public_key: Option<PathBuf>,
    /// Seconds between signed audit checkpoints (default 3600).
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_seconds: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            database: default_control_db(),
            environment: Environment::default(),
            csca: vec![],
            propagation_delay_hours: default_propagation(),
            usage_period_days: default_usage_period(),
            operation_ttl_hours: default_operation_ttl(),
            audit_key: None,
            audit_public_key: None,
            checkpoint_interval_seconds: default_checkpoint_interval(),
        }
    }
}

fn default_control_db() -> PathBuf {
    PathBuf::from("control.sqlite")
}
fn default_propagation() -> u32 {
    48
}
fn default_usage_period() -> u32 {
    183
}
fn default_operation_ttl() -> u32 {
    24
}
fn default_checkpoint_interval() -> u64 {
    3600
}

/// Revocation settings (`[revocation]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// Base URL of the EU gateway (e.g. `https://dgcg.example.eu`); without it batches are built
    /// and kept but not delivered.
    #[serde(default)]
    pub gateway_url: Option<String>,
    /// CA certificates (PEM) that the gateway's and subscribers' server certificates chain to.
    #[serde(default)]
    pub gateway_ca: Option<PathBuf>,
    /// Our TLS client certificate (PEM) towards the gateway and subscribers.
    #[serde(default)]
    pub gateway_client_certificate: Option<PathBuf>,
    /// Its private key: a P-256 key in the token by `pkcs11:` URI (the HSM signs each
    /// handshake), or a PEM (PKCS#8) file, mode 0600.
    #[serde(default)]
    pub gateway_client_key: Option<TlsKey>,
    /// P-256 key in the token (label or `pkcs11:` URI) that signs batches as CMS (the upload key).
    #[serde(default)]
    pub upload_key: Option<String>,
    /// The upload key's certificate (PEM), embedded in each CMS.
    #[serde(default)]
    pub upload_certificate: Option<PathBuf>,
    /// Also send `UCI` batches (deprecated upstream; default off).
    #[serde(default)]
    pub uci_batches: bool,
    /// Also send `COUNTRYCODEUCI` batches (deprecated upstream; default off).
    #[serde(default)]
    pub country_code_uci_batches: bool,
    /// Retry schedule in Webcert's template form: `max#delay,delay,…` with units s/m/h/d; the
    /// last delay repeats.
    #[serde(default = "default_retry")]
    pub retry: String,
    /// Seconds between outbox runs in the daemon (each run also purges expired rows).
    #[serde(default = "default_outbox_interval")]
    pub outbox_interval_seconds: u64,
    /// Timeout of one HTTP request to the gateway or a subscriber, in seconds.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_seconds: u64,
    /// P-256 key in the token (label or `pkcs11:` URI) that signs the verifier list.
    #[serde(default)]
    pub list_key: Option<String>,
    /// Its public key (PEM), for `dccsign verify --revocation`.
    #[serde(default)]
    pub list_public_key: Option<PathBuf>,
    /// Days after a certificate's expiry before its rows are purged (Swedish rule: 7).
    #[serde(default = "default_retention")]
    pub retention_days: u32,
    /// Integrated systems notified of revocation events.
    #[serde(default, rename = "subscriber")]
    pub subscribers: Vec<SubscriberConfig>,
}

/// An integrated system notified of revocations (`[[revocation.subscriber]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberConfig {
    /// Name used in logs, metrics and the outbox.
    pub name: String,
    /// HTTPS URL that receives one JSON event per POST.
    pub url: String,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            gateway_url: None,
            gateway_ca: None,
            gateway_client_certificate: None,
            gateway_client_key: None,
            upload_key: None,
            upload_certificate: None,
            uci_batches: false,
            country_code_uci_batches: false,
            retry: default_retry(),
            outbox_interval_seconds: default_outbox_interval(),
            request_timeout_seconds: default_request_timeout(),
            list_key: None,
            list_public_key: None,
            retention_days: default_retention(),
            subscribers: vec![],
        }
    }
}

fn default_retry() -> String {
    "30#1:m,5:m,1:h,6:h,12:h,1:d".into()
}
fn default_outbox_interval() -> u64 {
    60
}
fn default_request_timeout() -> u64 {
    30
}
fn default_retention() -> u32 {
    7
}

/// Issuer identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// ISO 3166-1 alpha-2 issuing country; the CWT `iss` claim and the UVCI country.
    pub country: String,
    /// Issuing-entity part of generated UVCIs (`URN:UVCI:01:SE:<prefix>/…`): A-Z, 0-9.
    pub uvci_prefix: String,
    /// HMAC key in the token (label or `pkcs11:` URI) from which generated UVCIs are derived per
    /// client and request id, so that retried requests get the same UVCI. Without it, generated
    /// UVCIs are random and a retried request whose UVCI was generated cannot be answered.
    #[serde(default)]
    pub uvci_key: Option<String>,
}

/// The PKCS#11 token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module.
    #[serde(default = "default_module")]
    pub module: PathBuf,
    /// Token label.
    pub token: String,
    /// Source of the user PIN: `{ file = "…" }` or `{ env = "VAR" }`.
    pub pin: PinSource,
    /// SoftHSM only: the `softhsm2.conf` to use (exported as `SOFTHSM2_CONF` at start-up).
    #[serde(default)]
    pub softhsm2_conf: Option<PathBuf>,
    /// Number of signing sessions/worker threads; 0 = number of CPUs.
    #[serde(default)]
    pub pool_size: usize,
    /// Bound of the signing queue.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Sign with session copies of the keys (`C_CopyObject`, `CKA_TOKEN = false`), made once
    /// per key, instead of the token objects: SoftHSM re-reads a token object from disk on every
    /// use. Switch off for a token that limits session objects.
    #[serde(default = "yes")]
    pub session_key_copies: bool,
}

fn default_module() -> PathBuf {
    PathBuf::from(SOFTHSM_MODULE)
}
fn yes() -> bool {
    true
}

fn default_queue() -> usize {
    4096
}

/// The ledger database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// SQLite database file.
    pub path: PathBuf,
}

/// Tunable validation limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Oldest accepted test sample, in hours (default 168 = 7 days).
    #[serde(default = "default_sample_age")]
    pub max_sample_age_hours: u32,
    /// Tolerated clock difference for "not in the future" checks, in seconds (default 300).
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u32,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            max_sample_age_hours: default_sample_age(),
            clock_skew_seconds: default_skew(),
        }
    }
}
fn default_sample_age() -> u32 {
    168
}
fn default_skew() -> u32 {
    300
}

/// Certificate lifetimes (all capped at the DSC's notAfter).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidityConfig {
    /// Test certificates: hours after the sample time (default 72).
    #[serde(default = "default_test_hours")]
    pub test_hours: u32,
    /// Vaccination certificates: days after issuance (default 270).
    #[serde(default = "default_vacc_days")]
    pub vaccination_days: u32,
    /// Recovery certificates: at most this many days after issuance, and never after `du`
    /// (default 180).
    #[serde(default = "default_recovery_days")]
    pub recovery_days: u32,
}

impl Default for ValidityConfig {
    fn default() -> Self {
        ValidityConfig {
            test_hours: default_test_hours(),
            vaccination_days: default_vacc_days(),
            recovery_days: default_recovery_days(),
        }
    }
}
fn default_test_hours() -> u32 {
    72
}
fn default_vacc_days() -> u32 {
    270
}
fn default_recovery_days() -> u32 {
    180
}

/// One document signer: its key on the token and its certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DscConfig {
    /// The private key on the token: an RFC 7512 URI
    /// (`pkcs11:token=…;object=<label>[;id=…];type=private`) or a bare `CKA_LABEL`.
    pub key: String,
    /// PEM file with the DSC certificate.
    pub certificate: PathBuf,
    /// Certificate types this DSC signs.
    pub types: Vec<CertType>,
}

/// The gRPC daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address (mutual TLS).
    #[serde(default = "default_listen")]
    pub listen: std::net::SocketAddr,
    /// Prometheus `/metrics` listen address (plain HTTP, unauthenticated: keep it on loopback
    /// or a management network); `"none"` disables it.
    #[serde(default = "default_metrics", with = "metrics_addr")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain of the server.
    pub certificate: PathBuf,
    /// The server certificate's private key: a key in the configured token by `pkcs11:` URI
    /// (`pkcs11:token=…;object=tls-server;type=private`, what `dev-init` writes), or a PEM
    /// (PKCS#8) file, mode 0600.
    pub key: TlsKey,
    /// PEM bundle of CAs that client certificates must chain to (read at start-up).
    pub client_ca: PathBuf,
    /// CRLs of those CAs (PEM or DER files). With any, a client certificate a CRL lists fails
    /// the handshake, and so does one whose CA has no CRL here or whose CRL is past its
    /// `nextUpdate`: fail closed. Empty (the default): client certificates are not checked
    /// for revocation. Read again when a file changes (`client_crl_check_seconds`).
    #[serde(default)]
    pub client_crls: Vec<PathBuf>,
    /// How often the `client_crls` files are checked for changes, and the open connections'
    /// client certificates checked again (closing those that no longer pass), in seconds
    /// (default 30).
    #[serde(default = "default_crl_check")]
    pub client_crl_check_seconds: u64,
    /// Largest accepted request message (default 64 KiB).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Largest accepted `IssueBatchRequest` of the BulkIssuance service, all its items together
    /// (default 1 MiB; a batch also holds at most 256 items).
    #[serde(default = "default_max_batch")]
    pub max_batch_bytes: usize,
    /// Requests one client may have in flight (default 256); more get RESOURCE_EXHAUSTED. This
    /// bound and the token bucket below are one budget per client across its issuance and
    /// revocation calls.
    #[serde(default = "default_in_flight")]
    pub max_in_flight_per_client: usize,
    /// Sustained requests per second per client (token bucket).
    #[serde(default = "default_rate")]
    pub rate_per_second: f64,
    /// Token bucket size per client.
    #[serde(default = "default_burst")]
    pub rate_burst: f64,
    /// Most items on one `IssueStream`.
    #[serde(default = "default_stream_items")]
    pub max_stream_items: u64,
    /// Most open client connections (default 4096). At the limit the daemon stops accepting:
    /// new connections wait in the kernel's backlog until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most TLS handshakes under way at once (default 64, the depth of the server key's
    /// signing queue); more wait in the kernel's backlog.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Most open connections of one client identity (default 256). A connection beyond it is
    /// closed right after its handshake (when its identity is known), so that one client
    /// cannot take all of `max_connections`.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Time in-flight requests get to finish after SIGTERM/SIGINT.
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    /// Period of the health canary (an HSM signature and a ledger write check).
    #[serde(default = "default_health")]
    pub health_interval_seconds: u64,
    /// Threads of the async runtime (TLS, HTTP/2, validation, encoding); 0 = automatic: half
    /// the CPUs, at least one. The HSM workers and the ledger writer are threads of their own
    /// outside it: with an in-process software token the HSM workers are busy computing, and
    /// on 2 cores one async thread cost 5–20 µs less CPU per certificate than two, with a
    /// lower p99 (docs/benchmarks.md, eighth session). With a network HSM whose calls mostly
    /// wait, the CPU count is a sound value.
    #[serde(default)]
    pub async_workers: usize,
}

/// Where a TLS private key of the daemon is (its server key, its client key towards the EU
/// gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TlsKey {
    /// A P-256 key in the configured token, by RFC 7512 URI or label; the HSM makes the
    /// handshake signatures and the key never leaves it.
    Token(String),
    /// A PEM (PKCS#8) file, relative to the configuration file.
    File(PathBuf),
}

impl From<String> for TlsKey {
    fn from(s: String) -> Self {
        if s.starts_with("pkcs11:") {
            TlsKey::Token(s)
        } else {
            TlsKey::File(PathBuf::from(s))
        }
    }
}

impl From<TlsKey> for String {
    fn from(k: TlsKey) -> Self {
        match k {
            TlsKey::Token(uri) => uri,
            TlsKey::File(p) => p.display().to_string(),
        }
    }
}

impl ServerConfig {
    /// Threads of the async runtime: `async_workers`, or half the CPUs (at least one).
    pub fn async_workers(&self) -> usize {
        if self.async_workers == 0 {
            (cpus() / 2).max(1)
        } else {
            self.async_workers
        }
    }
}

/// CPUs this process may use (2 when unknown): the base of the automatic thread counts.
fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// `server.metrics_listen`: an address, or `"none"` (TOML has no null).
mod metrics_addr {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        a: &Option<std::net::SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::net::SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "none" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "metrics_listen: {text:?} is neither an address (127.0.0.1:9464) nor \"none\""
            ))
        })
    }
}

fn default_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 50051))
}
fn default_metrics() -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464)))
}
fn default_max_connections() -> usize {
    4096
}

fn default_max_handshakes() -> usize {
    64
}

fn default_max_connections_per_client() -> usize {
    256
}

fn default_crl_check() -> u64 {
    30
}

fn default_max_message() -> usize {
    64 * 1024
}
fn default_max_batch() -> usize {
    1024 * 1024
}
fn default_in_flight() -> usize {
    256
}
/// Above what one node signs (≈ 6 000/s on 2 cores with SoftHSM): by default one client may use
/// the whole node; lower it where several front-ends share one.
fn default_rate() -> f64 {
    20_000.0
}
fn default_burst() -> f64 {
    40_000.0
}
fn default_stream_items() -> u64 {
    1_000_000
}
fn default_grace() -> u64 {
    10
}
fn default_health() -> u64 {
    5
}

/// What a caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Issuing front-end: the Issuance service.
    Issuer,
    /// Security officer: key lifecycle.
    Officer,
    /// Auditor: read-only views.
    Auditor,
}

/// One caller, identified by its client certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client certificate's URI SAN (or DNS SAN), e.g. `spiffe://dccsign.dev/issuer-all`.
    pub identity: String,
    /// Its role.
    pub role: Role,
    /// For issuers: the certificate types it may issue.
    #[serde(default)]
    pub types: Vec<CertType>,
    /// For issuers: the UVCI prefix of certificates it issues (default: `issuer.uvci_prefix`).
    #[serde(default)]
    pub uvci_prefix: Option<String>,
    /// For issuers: which UVCIs a payload of this client may carry in `ci` (default
    /// `own-prefix`).
    #[serde(default)]
    pub given_uvci: GivenUvci,
}

/// Which UVCIs an issuer may give its certificates itself (a payload's `ci`); a payload without
/// one gets a UVCI under the client's prefix from the daemon either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GivenUvci {
    /// Only UVCIs in the client's own namespace, `URN:UVCI:01:<country>:<uvci_prefix>/…`, so
    /// that no front-end issues (or blocks) UVCIs in another's namespace.
    #[default]
    OwnPrefix,
    /// Any UVCI of the issuing country (e.g. a front-end that numbers its certificates in
    /// namespaces of its own, or while one is migrated).
    Any,
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        if cfg.base_dir.as_os_str().is_empty() {
            cfg.base_dir = PathBuf::from(".");
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Consistency checks that do not need the token.
    pub fn check(&self) -> Result<(), ConfigError> {
        let c = &self.issuer.country;
        if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ConfigError::Invalid(format!(
                "issuer.country must be two upper-case letters, got {c:?}"
            )));
        }
        let p = &self.issuer.uvci_prefix;
        if p.is_empty()
            || p.len() > 20
            || !p
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            return Err(ConfigError::Invalid(
                "issuer.uvci_prefix must be 1-20 characters A-Z 0-9".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.clients {
            if !seen.insert(&c.identity) {
                return Err(ConfigError::Invalid(format!(
                    "client {:?} is listed twice",
                    c.identity
                )));
            }
            if c.role == Role::Issuer && c.types.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "issuer {:?} may issue no type: give types = [...]",
                    c.identity
                )));
            }
            if let Some(p) = &c.uvci_prefix {
                if p.is_empty()
                    || p.len() > 20
                    || !p
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
                {
                    return Err(ConfigError::Invalid(format!(
                        "client {:?}: uvci_prefix must be 1-20 characters A-Z 0-9",
                        c.identity
                    )));
                }
            }
        }
        for t in CertType::ALL {
            let n = self.dscs.iter().filter(|d| d.types.contains(&t)).count();
            if n > 1 {
                return Err(ConfigError::Invalid(format!(
                    "{n} DSCs are configured for type {t}; exactly one may be active"
                )));
            }
        }
        Ok(())
    }

    /// Resolves a path from the file against the config's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Token settings for [`crate::hsm::Token::open`].
    pub fn token_settings(&self) -> TokenSettings {
        TokenSettings {
            module: self.resolve(&self.hsm.module),
            label: self.hsm.token.clone(),
            pin: self.hsm.pin.clone(),
            base_dir: self.base_dir.clone(),
        }
    }

    /// Exports `SOFTHSM2_CONF` when the config names one. Must run before the first PKCS#11
    /// call and before other threads start.
    pub fn export_softhsm_env(&self) {
        if let Some(p) = &self.hsm.softhsm2_conf {
            std::env::set_var("SOFTHSM2_CONF", self.resolve(p));
        }
    }

    /// The UVCI key on `token`, if configured.
    pub fn uvci_key(
        &self,
        token: &std::sync::Arc<crate::hsm::Token>,
    ) -> Result<Option<crate::issuance::UvciKey>, crate::hsm::HsmError> {
        let Some(k) = &self.issuer.uvci_key else {
            return Ok(None);
        };
        let (label, _) = crate::hsm::KeyUri::resolve(k, token.label())?;
        Ok(Some(crate::issuance::UvciKey {
            token: token.clone(),
            key: token.find_hmac_key(&label)?,
        }))
    }

    /// Number of signing sessions to open.
    pub fn pool_size(&self) -> usize {
        if self.hsm.pool_size == 0 {
            cpus()
        } else {
            self.hsm.pool_size
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(extra: &str) -> Result<ServerConfig, toml::de::Error> {
        toml::from_str(&format!(
            "certificate = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\n{extra}"
        ))
    }

    /// The metrics endpoint: on loopback by default, an address, or "none" to turn it off.
    #[test]
    fn metrics_listen_takes_an_address_or_none() {
        assert_eq!(server("").unwrap().metrics_listen, default_metrics());
        let on = server("metrics_listen = \"127.0.0.1:9999\"").unwrap();
        assert_eq!(on.metrics_listen, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(
            server("metrics_listen = \"none\"").unwrap().metrics_listen,
            None
        );
        let e = server("metrics_listen = \"off\"").unwrap_err().to_string();
        assert!(e.contains("neither an address"), "{e}");
    }

    /// The TLS key: a `pkcs11:` URI names a key in the token, anything else a PEM file.
    #[test]
    fn the_tls_key_is_a_token_uri_or_a_file() {
        assert_eq!(server("").unwrap().key, TlsKey::File("k.pem".into()));
        let uri = "pkcs11:token=t;object=tls-server;type=private";
        let s: ServerConfig = toml::from_str(&format!(
            "certificate = \"c.pem\"\nkey = \"{uri}\"\nclient_ca = \"ca.pem\"\n"
        ))
        .unwrap();
        assert_eq!(s.key, TlsKey::Token(uri.into()));
        assert_eq!(String::from(s.key), uri);
    }

    /// A client gives UVCIs in its own namespace unless configured otherwise.
    #[test]
    fn given_uvcis_are_the_own_prefix_unless_any() {
        let client = |extra: &str| {
            toml::from_str::<ClientConfig>(&format!(
                "identity = \"spiffe://x/i\"\nrole = \"issuer\"\n{extra}"
            ))
        };
        assert_eq!(client("").unwrap().given_uvci, GivenUvci::OwnPrefix);
        let any = client("given_uvci = \"any\"").unwrap();
        assert_eq!(any.given_uvci, GivenUvci::Any);
        let own = client("given_uvci = \"own-prefix\"").unwrap();
        assert_eq!(own.given_uvci, GivenUvci::OwnPrefix);
        let e = client("given_uvci = \"none\"").unwrap_err().to_string();
        assert!(e.contains("own-prefix"), "{e}");
    }
}

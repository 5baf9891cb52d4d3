//! Revocation of client certificates: the client-certificate verifier of the daemon's mutual
//! TLS, with the CRLs of `[server] client_crls`.
//!
//! - Each handshake checks the client's (end-entity) certificate against the CRLs with
//!   rustls/webpki. A certificate a CRL lists fails the handshake; so does one whose CA has no
//!   CRL among them (its status is unknown), and one whose CA's CRL is past its `nextUpdate`.
//!   Fail closed: a revocation check that cannot be made refuses, as a CA-grade service must.
//! - The files are read again when they change (modification time or size, checked every
//!   `client_crl_check_seconds`), so a certificate revoked by the PKI is refused on the next
//!   handshake without a restart.
//! - Connections already open are checked again at the same interval, whether or not CRLs are
//!   configured: one whose client certificate no longer passes (revoked, expired, its CA's CRL
//!   past `nextUpdate`) is closed, with what it had in flight (see [`Live`]). HTTP/2
//!   connections of gRPC clients stay open for days; without this a revoked front-end would
//!   keep issuing over the connection it already had.
//! - Start-up refuses a CRL file that does not parse, that no CA in `client_ca` signed, or
//!   that is already past its `nextUpdate`, in one line. Later, such a file is logged and
//!   counted (`dccsign_tls_client_crl_reload_failures_total`) and the CRLs in force stay.
//! - `dccsign_tls_client_crl_next_update_seconds` (Unix time) is the earliest `nextUpdate` in
//!   force: alert well before it. The daemon also warns in its log, once per CRL loaded, when
//!   that time is less than 24 h away.
//! - Without CRLs, the verifier is webpki's, unchanged.
//! - Either way the client's certificate must carry an extended key usage extension listing
//!   `clientAuth`: webpki checks the purpose only when the extension is there.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::Waker;
use std::time::{Duration, SystemTime};

use der::{Decode, Encode, Reader};
use futures_util::task::AtomicWaker;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::tls::TlsSetupError;

/// What the CRL files held when they were read.
struct Loaded {
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// The earliest `nextUpdate`.
    next_update: Option<SystemTime>,
    /// Revoked certificates listed, over all CRLs.
    revoked: usize,
}

/// A file's identity for change detection: modification time and size.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// A CA of `client_ca`, as far as its CRLs are concerned.
struct CaKey {
    /// DER of its subject, which a CRL names as its issuer.
    subject: Vec<u8>,
    /// Its public key's algorithm (the AlgorithmIdentifier's contents) and key bits.
    key_alg: Vec<u8>,
    key: Vec<u8>,
}

/// The contents of a DER TLV (without its tag and length).
fn contents(tlv: &[u8]) -> der::Result<&[u8]> {
    let mut r = der::SliceReader::new(tlv)?;
    let header = der::Header::decode(&mut r)?;
    r.read_slice(header.length)
}

/// The DER of a CRL's `tbsCertList` as it was signed.
fn tbs_bytes(crl: &[u8]) -> der::Result<&[u8]> {
    let mut r = der::SliceReader::new(contents(crl)?)?;
    r.tlv_bytes()
}

/// What a verifier is built from.
struct Sources {
    roots: Arc<RootCertStore>,
    /// The CAs in `client_ca`: a CRL must come from one of them, signed by its key.
    cas: Vec<CaKey>,
    provider: Arc<CryptoProvider>,
    crl_paths: Vec<PathBuf>,
}

/// The client-certificate verifier: webpki's, rebuilt when the CRL files change.
pub struct ClientVerifier {
    sources: Sources,
    /// The CA names offered to clients (fixed: the CA bundle is read at start-up only).
    hints: Vec<DistinguishedName>,
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    stamps: Mutex<Vec<Stamp>>,
    /// The earliest `nextUpdate` in force, and whether its nearness was reported.
    next_update: Mutex<(Option<SystemTime>, bool)>,
    /// The open connections' client certificates, checked again by [`watch`], and the length
    /// at which [`ClientVerifier::track`] next drops the entries of closed connections.
    open: Mutex<(Vec<Weak<Live>>, usize)>,
}

/// An open connection's client certificate chain, checked again while the connection lasts.
/// The connection's stream holds it and fails its next read and write once it is closed.
pub struct Live {
    /// The end-entity certificate first, then the intermediates the client sent.
    chain: Vec<CertificateDer<'static>>,
    /// The client's identity, for the log.
    identity: Option<String>,
    closed: AtomicBool,
    /// The connection's pending read, woken when it is closed.
    reader: AtomicWaker,
}

impl Live {
    /// Whether the certificate failed a later check: the connection must end.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// [`Live::is_closed`], after registering `waker` to be woken when it becomes so.
    pub fn closed_or_register(&self, waker: &Waker) -> bool {
        if self.is_closed() {
            return true;
        }
        self.reader.register(waker);
        self.is_closed()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.reader.wake();
    }
}

/// Whether a client certificate says it is for TLS client authentication: an extended key
/// usage extension that lists `clientAuth`. webpki requires `clientAuth` only when the
/// extension is there; a certificate without one (made for anything) is refused here.
fn for_client_auth(cert: &CertificateDer<'_>) -> bool {
    use x509_cert::ext::pkix::ExtendedKeyUsage;
    let Ok(cert) = x509_cert::Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    matches!(
        cert.tbs_certificate.get::<ExtendedKeyUsage>(),
        Ok(Some((_, eku))) if eku.0.contains(&const_oid::db::rfc5280::ID_KP_CLIENT_AUTH)
    )
}

/// The fewest tracked connections at which [`ClientVerifier::track`] drops closed ones.
const PRUNE_AT: usize = 64;

/// Adds `item` to `list`, first dropping the entries whose value is gone when the list has
/// reached `prune_at` entries (then twice the entries left, at least [`PRUNE_AT`]). A closed
/// connection's entry keeps its `Live`'s allocation (not its chain), so the list holds at most
/// about as many closed connections as open ones, at a constant cost per connection.
fn push_pruned<T>(list: &mut Vec<Weak<T>>, prune_at: &mut usize, item: Weak<T>) {
    if list.len() >= *prune_at {
        list.retain(|w| w.strong_count() > 0);
        *prune_at = (list.len() * 2).max(PRUNE_AT);
    }
    list.push(item);
}

/// How long before a CRL's `nextUpdate` the daemon warns that it needs a fresh one.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(24 * 3600);

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("crl_paths", &self.sources.crl_paths)
            .finish_non_exhaustive()
    }
}

/// A time as RFC 3339, for messages.
fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

impl ClientVerifier {
    /// A verifier for client certificates chaining to `roots` (whose certificates are
    /// `ca_certs`), checked against the CRLs in `crl_paths` (none: no revocation check).
    pub fn new(
        roots: RootCertStore,
        ca_certs: &[CertificateDer<'static>],
        crl_paths: Vec<PathBuf>,
        provider: Arc<CryptoProvider>,
    ) -> Result<ClientVerifier, TlsSetupError> {
        let cas = ca_certs
            .iter()
            .map(|c| {
                let e = |e: der::Error| TlsSetupError(format!("client CA: {e}"));
                let cert = x509_cert::Certificate::from_der(c.as_ref()).map_err(e)?;
                let spki = &cert.tbs_certificate.subject_public_key_info;
                Ok(CaKey {
                    subject: cert.tbs_certificate.subject.to_der().map_err(e)?,
                    key_alg: contents(&spki.algorithm.to_der().map_err(e)?)
                        .map_err(e)?
                        .to_vec(),
                    key: spki.subject_public_key.raw_bytes().to_vec(),
                })
            })
            .collect::<Result<_, TlsSetupError>>()?;
        let stamps = crl_paths.iter().map(|p| stamp(p)).collect();
        let sources = Sources {
            roots: Arc::new(roots),
            cas,
            provider,
            crl_paths,
        };
        let loaded = sources.read_crls(SystemTime::now())?;
        let next_update = loaded.next_update;
        let built = sources.build(loaded)?;
        Ok(ClientVerifier {
            hints: built.root_hint_subjects().to_vec(),
            current: RwLock::new(built),
            sources,
            stamps: Mutex::new(stamps),
            next_update: Mutex::new((next_update, false)),
            open: Mutex::new((Vec::new(), PRUNE_AT)),
        })
    }

    /// Keeps an open connection's verified client certificate `chain` (end entity first) for
    /// the checks of [`ClientVerifier::recheck_open`], for as long as the returned handle lives.
    pub fn track(&self, chain: &[CertificateDer<'static>], identity: Option<String>) -> Arc<Live> {
        let live = Arc::new(Live {
            chain: chain.to_vec(),
            identity,
            closed: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        });
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (open, prune_at) = &mut *guard;
        push_pruned(open, prune_at, Arc::downgrade(&live));
        live
    }

    /// Checks a client certificate `chain` (end entity first) with the CRLs in force at `now`,
    /// as a handshake does. A resumed TLS session skips the handshake's check: the accept loop
    /// makes it with this.
    pub fn check(
        &self,
        chain: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Result<(), rustls::Error> {
        let (end_entity, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let at = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.verify_client_cert(end_entity, intermediates, at)
            .map(|_| ())
    }

    /// Checks every open connection's client certificate again with the CRLs in force at
    /// `now`, and closes the connections whose certificate fails. Returns how many it closed.
    pub fn recheck_open(&self, now: SystemTime) -> usize {
        let live: Vec<Arc<Live>> = {
            let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
            guard.0.retain(|w| w.strong_count() > 0);
            guard.0.iter().filter_map(Weak::upgrade).collect()
        };
        let mut closed = 0;
        for conn in live.iter().filter(|c| !c.is_closed()) {
            if let Err(e) = self.check(&conn.chain, now) {
                metrics::counter!("dccsign_tls_connections_closed_total").increment(1);
                tracing::warn!(
                    client = conn.identity.as_deref().unwrap_or("-"),
                    error = %e,
                    "closing a connection: its client certificate no longer passes"
                );
                conn.close();
                closed += 1;
            }
        }
        closed
    }

    /// Whether CRLs are configured at all.
    pub fn checks_revocation(&self) -> bool {
        !self.sources.crl_paths.is_empty()
    }

    /// Reads the CRLs again if a file changed since the last look; returns whether the CRLs in
    /// force changed. On an error, those in force stay.
    pub fn reload_if_changed(&self) -> Result<bool, TlsSetupError> {
        let now_stamps: Vec<Stamp> = self.sources.crl_paths.iter().map(|p| stamp(p)).collect();
        {
            let mut seen = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now_stamps {
                return Ok(false);
            }
            // Looked at once per change: a bad file is reported once, not every interval.
            *seen = now_stamps;
        }
        let loaded = self.sources.read_crls(SystemTime::now())?;
        let next_update = loaded.next_update;
        let built = self.sources.build(loaded)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = built;
        *self.next_update.lock().unwrap_or_else(|p| p.into_inner()) = (next_update, false);
        Ok(true)
    }

    /// The earliest `nextUpdate` in force, once, when it is less than [`EXPIRY_WARNING`] after
    /// `now`: then the CRL needs replacing before every client of its CA is refused.
    pub fn expiring(&self, now: SystemTime) -> Option<SystemTime> {
        let mut state = self.next_update.lock().unwrap_or_else(|p| p.into_inner());
        match *state {
            (Some(next), false) if next < now + EXPIRY_WARNING => {
                state.1 = true;
                Some(next)
            }
            _ => None,
        }
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Sources {
    /// Reads every CRL file and checks what start-up (and each reload) requires of it.
    fn read_crls(&self, now: SystemTime) -> Result<Loaded, TlsSetupError> {
        let mut loaded = Loaded {
            crls: Vec::new(),
            next_update: None,
            revoked: 0,
        };
        for path in &self.crl_paths {
            let e = |m: String| TlsSetupError(format!("client CRL {}: {m}", path.display()));
            let bytes = std::fs::read(path).map_err(|x| e(x.to_string()))?;
            let ders: Vec<CertificateRevocationListDer<'static>> =
                if bytes.starts_with(b"-----BEGIN") {
                    CertificateRevocationListDer::pem_slice_iter(&bytes)
                        .collect::<Result<_, _>>()
                        .map_err(|x| e(x.to_string()))?
                } else {
                    vec![CertificateRevocationListDer::from(bytes)]
                };
            if ders.is_empty() {
                return Err(e("no CRL in the file".into()));
            }
            for der in ders {
                let crl = x509_cert::crl::CertificateList::from_der(der.as_ref())
                    .map_err(|x| e(format!("not a CRL: {x}")))?;
                let tbs = &crl.tbs_cert_list;
                if !self.signed_by_a_ca(der.as_ref(), &crl)? {
                    return Err(e(format!(
                        "not signed by a CA in client_ca (its issuer: {})",
                        tbs.issuer
                    )));
                }
                let next = tbs
                    .next_update
                    .ok_or_else(|| e("has no nextUpdate".into()))?
                    .to_system_time();
                if next <= now {
                    return Err(e(format!(
                        "past its nextUpdate ({}): every client of its CA would be refused; \
                         install a fresh CRL",
                        rfc3339(next)
                    )));
                }
                loaded.next_update = Some(loaded.next_update.map_or(next, |n| n.min(next)));
                loaded.revoked += tbs.revoked_certificates.as_ref().map_or(0, Vec::len);
                loaded.crls.push(der);
            }
        }
        Ok(loaded)
    }

    /// Whether a CA of `client_ca` named as the CRL's issuer signed it (with an algorithm of
    /// the crypto provider's).
    fn signed_by_a_ca(
        &self,
        der: &[u8],
        crl: &x509_cert::crl::CertificateList,
    ) -> Result<bool, TlsSetupError> {
        let e = |x: der::Error| TlsSetupError(format!("client CRL: {x}"));
        let issuer = crl.tbs_cert_list.issuer.to_der().map_err(e)?;
        let sig_alg = crl.signature_algorithm.to_der().map_err(e)?;
        let sig_alg = contents(&sig_alg).map_err(e)?;
        let tbs = tbs_bytes(der).map_err(e)?;
        let signature = crl.signature.raw_bytes();
        let algs = self.provider.signature_verification_algorithms.all;
        Ok(self.cas.iter().filter(|ca| ca.subject == issuer).any(|ca| {
            algs.iter().any(|alg| {
                alg.public_key_alg_id().as_ref() == ca.key_alg.as_slice()
                    && alg.signature_alg_id().as_ref() == sig_alg
                    && alg.verify_signature(&ca.key, tbs, signature).is_ok()
            })
        }))
    }

    /// webpki's verifier over the roots with `loaded`'s CRLs; records what is in force.
    fn build(&self, loaded: Loaded) -> Result<Arc<dyn ClientCertVerifier>, TlsSetupError> {
        let mut b =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone());
        if !loaded.crls.is_empty() {
            b = b
                .with_crls(loaded.crls)
                .only_check_end_entity_revocation()
                .enforce_revocation_expiration();
        }
        let v = b
            .build()
            .map_err(|e| TlsSetupError(format!("client verifier: {e}")))?;
        if let Some(next) = loaded.next_update {
            let secs = next
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            metrics::gauge!("dccsign_tls_client_crl_next_update_seconds").set(secs);
            tracing::info!(
                files = self.crl_paths.len(),
                revoked = loaded.revoked,
                next_update = %rfc3339(next),
                "client CRLs in force"
            );
        }
        Ok(v)
    }
}

/// Every `every`, for as long as `verifier` is used elsewhere: reads the CRL files again if
/// they changed (logging and counting what fails), then checks the open connections' client
/// certificates again ([`ClientVerifier::recheck_open`]). On the blocking pool.
pub fn watch(verifier: Arc<ClientVerifier>, every: Duration) {
    let weak = Arc::downgrade(&verifier);
    drop(verifier);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(v) = weak.upgrade() else { return };
            let checked = v.clone();
            let result = tokio::task::spawn_blocking(move || {
                let reloaded = if checked.checks_revocation() {
                    checked.reload_if_changed()
                } else {
                    Ok(false)
                };
                checked.recheck_open(SystemTime::now());
                reloaded
            })
            .await;
            if let Some(next) = v.expiring(SystemTime::now()) {
                tracing::warn!(next_update = %rfc3339(next),
                    "a client CRL reaches its nextUpdate within 24 h: install a fresh one, or every client of its CA is refused from then on");
            }
            match result {
                Ok(Ok(true)) => tracing::info!("client CRLs read again"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    metrics::counter!("dccsign_tls_client_crl_reload_failures_total").increment(1);
                    tracing::error!(error = %e, "client CRLs not reloaded; those in force stay");
                }
                Err(e) => tracing::error!(error = %e, "client CRL reload task failed"),
            }
        }
    });
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .current()
            .verify_client_cert(end_entity, intermediates, now)?;
        if !for_client_auth(end_entity) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries of dropped values go when the list doubles; live ones stay.
    #[test]
    fn closed_connections_do_not_pile_up() {
        let (mut list, mut prune_at) = (Vec::new(), PRUNE_AT);
        let kept: Vec<Arc<usize>> = (0..100).map(Arc::new).collect();
        for k in &kept {
            push_pruned(&mut list, &mut prune_at, Arc::downgrade(k));
        }
        for i in 0..10_000 {
            let gone = Arc::new(i);
            push_pruned(&mut list, &mut prune_at, Arc::downgrade(&gone));
            assert!(list.len() <= 2 * kept.len() + 1, "{} entries", list.len());
        }
        let live: Vec<usize> = list.iter().filter_map(Weak::upgrade).map(|a| *a).collect();
        assert_eq!(live, (0..100).collect::<Vec<_>>());
    }
}

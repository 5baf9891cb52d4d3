//! `dccsign serve`: start-up checks, then the gRPC server until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Server;

use super::authz::Authorizer;
use super::client_crl;
use super::health;
use super::issuance::IssuanceService;
use super::limits::Limits;
use super::pb;
use super::refusals::LogRefusals;
use super::tls;
use crate::config::{Config, TlsKey};
use crate::hsm::{TlsPrivateKey, Token, TokenTlsKey};
use crate::issuance::{Issuer, IssuerSettings};
use crate::keys::DscSet;
use crate::ledger::SqliteLedger;

/// Why the daemon could not start or stopped with an error. Each is one line for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration lacks what `serve` needs.
    #[error("config: {0}")]
    Config(String),
    /// The token could not be opened (module, token, PIN, PIN file mode).
    #[error("HSM: {0}")]
    Hsm(#[from] crate::hsm::HsmError),
    /// A configured DSC is unusable (missing key, mismatching key, EKU, expired).
    #[error("{0}")]
    Keys(#[from] crate::keys::KeysError),
    /// The ledger could not be opened.
    #[error("ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    /// TLS material is missing or invalid.
    #[error("{0}")]
    Tls(#[from] tls::TlsSetupError),
    /// The audit log does not match the audit anchor in the token.
    #[error("{0}")]
    Audit(String),
    /// A listener could not be bound, or the server failed.
    #[error("server: {0}")]
    Server(String),
}

/// The server's TLS configuration, with its key in the token or in a PEM file, and its
/// client-certificate verifier. From here on the client CRLs, if any, are watched for
/// changes, and open connections' certificates are checked again.
fn server_tls(
    cfg: &Config,
    server: &crate::config::ServerConfig,
    token: &Arc<Token>,
) -> Result<(rustls::ServerConfig, Arc<client_crl::ClientVerifier>), ServeError> {
    let cert = cfg.resolve(&server.certificate);
    let client_ca = cfg.resolve(&server.client_ca);
    let crls = server.client_crls.iter().map(|p| cfg.resolve(p)).collect();
    let verifier = Arc::new(tls::client_verifier(&client_ca, crls)?);
    let file;
    let key = match &server.key {
        TlsKey::Token(name) => TlsPrivateKey::Token {
            key: TokenTlsKey::open(token.clone(), name, "tls-server")
                .map_err(|e| ServeError::Config(format!("server.key {name}: {e}")))?,
            name,
        },
        TlsKey::File(p) => {
            file = cfg.resolve(p);
            TlsPrivateKey::File(&file)
        }
    };
    let config = tls::server_config(&cert, key, verifier.clone())?;
    client_crl::watch(
        verifier.clone(),
        Duration::from_secs(server.client_crl_check_seconds),
    );
    Ok((config, verifier))
}

/// Registers for SIGTERM and SIGINT at once — so that a signal sent as soon as the daemon has
/// reported ready is not lost to the default action (exit without draining) — and returns a
/// future that resolves on the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Runs the daemon with `cfg` until a shutdown signal; `on_ready` receives the bound gRPC
/// address once it accepts connections.
pub async fn serve(
    cfg: Config,
    on_ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServeError> {
    let server_cfg = cfg
        .server
        .clone()
        .ok_or_else(|| ServeError::Config("no [server] section".into()))?;
    let now = time::OffsetDateTime::now_utc();

    // Metrics first: handles taken before the recorder is installed (e.g. by the HSM pool's
    // workers) would stay no-ops.
    if let Some(addr) = server_cfg.metrics_listen {
        install_metrics(addr)?;
    }

    // Start-up checks, each failing with one line.
    let token_settings = cfg.token_settings();
    let (token, dscs) = tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
        let token = Token::open(&token_settings)?;
        Ok(token)
    })
    .await
    .map_err(|e| ServeError::Server(e.to_string()))?
    .and_then(|token| {
        let dscs = DscSet::load(&cfg, &token, now)?;
        Ok((token, dscs))
    })?;
    if dscs.iter().next().is_none() {
        return Err(ServeError::Config(
            "no [[dsc]] configured: nothing could be signed".into(),
        ));
    }
    let ledger = SqliteLedger::open(&cfg.resolve(&cfg.ledger.path))?;
    report_interrupted(&ledger)?;
    token.set_session_copies(cfg.hsm.session_key_copies);
    let hsm_workers = cfg.pool_size();
    let pool = token.signing_pool(hsm_workers, cfg.hsm.queue)?;
    let token = Arc::new(token);
    let (tls_config, client_verifier) = server_tls(&cfg, &server_cfg, &token)?;
    let uvci_key = cfg.uvci_key(&token)?;
    let issuer = Arc::new(Issuer::new(
        IssuerSettings::from_config(&cfg),
        &dscs,
        pool,
        Arc::new(ledger),
        uvci_key,
    ));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    for name in health::ISSUANCE_SERVICES {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    // The background tasks, stopped at shutdown so that the issuer can be closed in order.
    let mut background = Vec::new();
    background.push(tokio::spawn(health::run(
        issuer.clone(),
        token.clone(),
        reporter,
        Duration::from_secs(server_cfg.health_interval_seconds.max(1)),
    )));

    // Reflection in both versions: grpcurl speaks v1, many stock clients still v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| ServeError::Server(format!("reflection: {e}")))?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| ServeError::Server(format!("reflection: {e}")))?;

    let authz = Arc::new(Authorizer::new(&cfg.clients));
    let manager = crate::keys::KeyManager::open(
        &cfg.resolve(&cfg.keys.database),
        token.clone(),
        crate::keys::KeySettings::from_config(&cfg)
            .map_err(|e| ServeError::Config(e.to_string()))?,
    )
    .map_err(|e| ServeError::Config(format!("key lifecycle: {e}")))?
    .with_switch(issuer.clone())
    .with_ledger(issuer.ledger().clone());
    // Revocation: the store lives in the ledger database (migrated by SqliteLedger::open).
    let revocation = Arc::new(
        crate::revocation::engine::RevocationEngine::from_config(&cfg, token.clone())
            .map_err(|e| ServeError::Config(format!("revocation: {e}")))?,
    );
    let manager = manager.with_operation(
        crate::revocation::engine::BULK_OPERATION,
        crate::revocation::engine::bulk_executor(revocation.clone()),
    );
    let manager = match &cfg.keys.audit_key {
        Some(k) => {
            let (label, _) = crate::hsm::KeyUri::resolve(k, token.label())?;
            manager.with_audit_key(token.find_key(&label)?)
        }
        None => manager,
    };
    // The audit log must still hold the newest checkpoint the token keeps: refuse to start on
    // a database whose newest checkpoints were deleted, or an older copy of it.
    manager
        .check_audit_anchor()
        .map_err(|e| ServeError::Audit(e.to_string()))?;
    let manager = Arc::new(manager);
    // Signed audit checkpoints: one at start, then periodically.
    {
        let manager = manager.clone();
        let every = Duration::from_secs(cfg.keys.checkpoint_interval_seconds.max(1));
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let m = manager.clone();
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                match tokio::task::spawn_blocking(move || m.checkpoint(now)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        metrics::counter!("dccsign_audit_checkpoint_failures_total").increment(1);
                        tracing::error!(error = %e, code = e.code(), "audit checkpoint failed")
                    }
                    Err(e) => tracing::error!(error = %e, "audit checkpoint task failed"),
                }
            }
        }));
    }
    // Managed DSCs activated by officers take over their types from the configured ones.
    for dsc in manager
        .active_signers()
        .map_err(|e| ServeError::Config(format!("key lifecycle: {e}")))?
    {
        crate::keys::SignerSwitch::switch_to(&*issuer, dsc);
    }
    // The outbox (and purge) on a schedule; `dccsign revocation publish` runs it at once.
    {
        let engine = revocation.clone();
        let every = Duration::from_secs(cfg.revocation.outbox_interval_seconds.max(1));
        background.push(tokio::spawn(async move {
            // First run one interval after start: a restart does not race an operator's
            // `revocation publish`; pending rows keep their due times across restarts.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                if let Err(e) = engine.run_once(now).await {
                    tracing::error!(error = %e, code = e.code(), "revocation run failed");
                }
            }
        }));
    }
    // One budget per client across its issuance and revocation calls.
    let limits = Arc::new(Limits::new(
        server_cfg.max_in_flight_per_client,
        server_cfg.rate_per_second,
        server_cfg.rate_burst,
    ));
    let revocation_service =
        pb::revocation_server::RevocationServer::new(super::revocation::RevocationService::new(
            revocation,
            issuer.clone(),
            authz.clone(),
            manager.clone(),
            limits.clone(),
        ))
        .max_decoding_message_size(server_cfg.max_message_bytes);
    let keys = pb::keys_server::KeysServer::new(super::keys::KeysService::new(
        issuer.clone(),
        (authz.clone(), limits.clone()),
        cfg.hsm.token.clone(),
        Some(manager),
    ))
    .max_decoding_message_size(server_cfg.max_message_bytes);
    let service = IssuanceService::new(issuer.clone(), authz, limits, server_cfg.max_stream_items);
    let bulk = pb::bulk_issuance_server::BulkIssuanceServer::new(service.clone())
        .max_decoding_message_size(server_cfg.max_batch_bytes);
    let issuance = pb::issuance_server::IssuanceServer::new(service)
        .max_decoding_message_size(server_cfg.max_message_bytes);

    let listener = tokio::net::TcpListener::bind(server_cfg.listen)
        .await
        .map_err(|e| ServeError::Server(format!("cannot listen on {}: {e}", server_cfg.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Server(e.to_string()))?;
    let incoming = tls::incoming(
        listener,
        tls_config,
        client_verifier,
        tls::ConnectionLimits {
            connections: server_cfg.max_connections,
            handshakes: server_cfg.max_handshakes,
            per_client: server_cfg.max_connections_per_client,
            handshake_timeout: Duration::from_secs(10),
        },
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let grace = Duration::from_secs(server_cfg.shutdown_grace_seconds);
    let signal =
        shutdown_signal().map_err(|e| ServeError::Server(format!("signal handlers: {e}")))?;
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(LogRefusals(issuance))
        .add_service(LogRefusals(bulk))
        .add_service(LogRefusals(keys))
        .add_service(LogRefusals(revocation_service))
        .serve_with_incoming_shutdown(incoming, {
            let stop_tx = stop_tx.clone();
            async move {
                signal.await;
                tracing::info!("shutdown: no new connections; finishing requests in flight");
                let _ = stop_tx.send(true);
            }
        });
    tracing::info!(
        listen = %local,
        async_workers = tokio::runtime::Handle::current().metrics().num_workers(),
        hsm_workers,
        "serving"
    );
    on_ready(local);
    let mut stop_rx = stop_rx;
    tokio::select! {
        r = server => r.map_err(|e| ServeError::Server(e.to_string()))?,
        _ = async {
            let _ = stop_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("shutdown: grace period over; requests still in flight are dropped");
        }
    }
    close(issuer, background).await;
    tracing::info!("stopped");
    Ok(())
}

/// Ends the daemon's work in order: stops the background tasks (health, checkpoints, the
/// outbox), waits up to 5 s for the last other handle of the issuer to go (connections still
/// finishing after the grace period hold some), then closes the issuer on a blocking thread,
/// which joins the HSM workers and the ledger writer before the process exits, so that no
/// worker closes a PKCS#11 session while the token library tears itself down.
async fn close(issuer: Arc<Issuer>, background: Vec<tokio::task::JoinHandle<()>>) {
    for task in &background {
        task.abort();
    }
    for task in background {
        let _ = task.await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&issuer) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match Arc::try_unwrap(issuer) {
        Ok(issuer) => {
            let closed =
                tokio::task::spawn_blocking(move || issuer.close(Duration::from_secs(5))).await;
            match closed {
                Ok(()) => tracing::info!("shutdown: signing pool and ledger closed"),
                Err(e) => tracing::error!(error = %e, "shutdown: closing the issuer failed"),
            }
        }
        Err(issuer) => {
            tracing::warn!(
                holders = Arc::strong_count(&issuer) - 1,
                "shutdown: the issuer is still in use; dropped without waiting for its threads"
            );
            drop(issuer);
        }
    }
}

/// Says at start-up which reservations a stopped process left behind (among the recent rows,
/// where they are: a cheap check), as a warning and as `dccsign_ledger_interrupted_reservations`.
/// Their UVCIs and request ids stay blocked (a retry gets `2-60-5008`) until an operator
/// releases them with `dccsign ledger interrupted --release` (docs/operations.md).
fn report_interrupted(ledger: &SqliteLedger) -> Result<(), ServeError> {
    let found = ledger.interrupted_recent()?;
    metrics::gauge!("dccsign_ledger_interrupted_reservations").set(found.len() as f64);
    if !found.is_empty() {
        // A crash at full load leaves up to the requests in flight: the first few name them.
        let ids: Vec<i64> = found.iter().take(20).map(|i| i.id).collect();
        tracing::warn!(
            count = found.len(),
            first_ids = ?ids,
            "interrupted reservations: a process stopped between reservation and completion; \
             their UVCIs and request ids stay blocked until released with `dccsign ledger \
             interrupted --release` (daemon stopped)"
        );
    }
    Ok(())
}

/// Installs the Prometheus recorder and its HTTP listener on `addr`.
///
/// The exporter runs on a thread of its own, with its own single-threaded runtime: both a
/// scrape and the upkeep that drains the histograms every 5 seconds take milliseconds at load
/// (they bucket every sample recorded since), and on the request runtime they held up every
/// request behind them (docs/benchmarks.md, nineteenth session). `install` makes that thread
/// when it is called outside a runtime, hence the scoped thread here.
fn install_metrics(addr: std::net::SocketAddr) -> Result<(), ServeError> {
    let install = || {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets(&[
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.015, 0.02,
                0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
            .and_then(|b| {
                b.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("dccsign_ledger_group_size".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
                )
            })
            .map_err(|e| ServeError::Server(format!("metrics: {e}")))?
            .install()
            .map_err(|e| ServeError::Server(format!("metrics listener {addr}: {e}")))
    };
    std::thread::scope(|s| s.spawn(install).join())
        .map_err(|_| ServeError::Server("metrics: the installing thread panicked".into()))?
}

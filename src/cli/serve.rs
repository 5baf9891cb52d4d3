//! `dccsign serve` and `dccsign issue` (the mTLS client).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use dccsign::api::pb;
use dccsign::config::Config;
use dccsign::dcc::CertType;

use super::{ConfigArgs, EXIT_REJECTED};

/// Arguments of `serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Development mode: run `dev-init` on the state directory first (idempotent).
    #[arg(long, requires = "state_dir")]
    dev: bool,
    #[command(flatten)]
    config: ConfigArgs,
    /// Override `server.listen` (port 0 picks a free port; the bound address is printed).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `server.metrics_listen`; `none` disables metrics.
    #[arg(long)]
    metrics_listen: Option<String>,
}

/// A multi-threaded tokio runtime for the client commands (one thread per CPU).
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    runtime_with(None)
}

/// A multi-threaded tokio runtime with this many threads (`None`: one per CPU).
fn runtime_with(threads: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    b.enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn load(args: &ServeArgs) -> Result<Config, String> {
    if args.dev {
        let dir = args
            .config
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("./var"));
        let report = dccsign::keys::dev_init(&dir, "SE").map_err(|e| format!("dev-init: {e}"))?;
        for c in &report.created {
            eprintln!("dev-init: created {c}");
        }
    }
    let mut cfg = args.config.load()?;
    let server = cfg
        .server
        .as_mut()
        .ok_or("the config has no [server] section")?;
    if let Some(l) = args.listen {
        server.listen = l;
    }
    match args.metrics_listen.as_deref() {
        None => {}
        Some("none") => server.metrics_listen = None,
        Some(a) => {
            server.metrics_listen = Some(
                a.parse()
                    .map_err(|_| format!("--metrics-listen: bad address {a}"))?,
            )
        }
    }
    Ok(cfg)
}

/// Runs `serve`.
pub fn serve(args: ServeArgs) -> ExitCode {
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state_hint = args
        .config
        .state_dir
        .as_ref()
        .map(|d| format!("--state-dir {}", d.display()))
        .unwrap_or_else(|| "--config …".into());
    let rt = match runtime_with(cfg.server.as_ref().map(|s| s.async_workers())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(dccsign::api::serve(cfg, |addr| {
        // Written once; a closed stdout must never take the daemon down.
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "dccsign: serving gRPC over mutual TLS on {addr}\n\
             try:     dccsign issue {state_hint} --addr {addr} --type vaccination --payload <(dccsign example-payload --type vaccination)"
        );
        let _ = out.flush();
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How a client command reaches the daemon over mutual TLS.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// State directory of a development daemon (certificates under pki/).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Development client to act as (a certificate under <state-dir>/pki/clients/); the
    /// default depends on the command (issuer-all, officer-1).
    #[arg(long = "as")]
    as_client: Option<String>,
    /// Client certificate (PEM); overrides --state-dir/--as.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA bundle for the server certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server address; default from the state dir's config.
    #[arg(long)]
    addr: Option<String>,
    /// Name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

impl ClientArgs {
    /// Connects as the given client (or `default_client` of the state directory).
    pub async fn connect(&self, default_client: &str) -> Result<tonic::transport::Channel, String> {
        let who = self.as_client.as_deref().unwrap_or(default_client);
        let state = self.state_dir.clone();
        let from_state = |rel: String| state.as_ref().map(|d| d.join(rel));
        let cert = self
            .cert
            .clone()
            .or_else(|| from_state(format!("pki/clients/{who}.pem")))
            .ok_or("give --cert/--key/--ca or --state-dir")?;
        let key = self
            .key
            .clone()
            .or_else(|| from_state(format!("pki/clients/{who}.key")))
            .ok_or("give --key")?;
        let ca = self
            .ca
            .clone()
            .or_else(|| from_state("pki/tls/ca.pem".into()))
            .ok_or("give --ca")?;
        let addr = match (&self.addr, &state) {
            (Some(a), _) => a.clone(),
            (None, Some(d)) => Config::load(&d.join("dccsign.toml"))
                .map_err(|e| e.to_string())?
                .server
                .map(|s| s.listen.to_string())
                .ok_or("the config has no [server] section; give --addr")?,
            (None, None) => return Err("give --addr".into()),
        };
        dccsign::api::client::connect(&addr, &cert, &key, &ca, &self.server_name).await
    }
}

/// The exit code of a client command: success, [`EXIT_REJECTED`](super::EXIT_REJECTED) for a
/// refusal the caller must act on (printed with its codes), failure otherwise.
pub fn exit_code(result: Result<(), tonic::Status>) -> std::process::ExitCode {
    use std::process::ExitCode;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(status) => {
            print_status(&status);
            if matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::AlreadyExists
                    | tonic::Code::NotFound
            ) {
                ExitCode::from(super::EXIT_REJECTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Prints a refusal: status, field violations with codes, and the stable code.
pub fn print_status(status: &tonic::Status) {
    use prost::Message;
    eprintln!("refused: {:?}: {}", status.code(), status.message());
    let detail = status
        .metadata()
        .get_bin("dccsign-error-bin")
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| pb::ErrorDetail::decode(b.as_ref()).ok());
    if let Some(d) = detail {
        for v in &d.violations {
            eprintln!("  {}: {} [{} {}]", v.field, v.message, v.code, v.rule);
        }
        eprintln!("  code {} request {}", d.code, d.request_id);
    }
}

/// Arguments of `issue`.
#[derive(clap::Args, Debug)]
pub struct IssueArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Certificate type: test, vaccination or recovery.
    #[arg(long = "type")]
    cert_type: CertType,
    /// DCC JSON payload file (`-` for standard input).
    #[arg(long)]
    payload: PathBuf,
    /// Request id (unique per client); the server generates one if absent.
    #[arg(long)]
    request_id: Option<String>,
    /// Write the QR code as PNG.
    #[arg(long)]
    qr: Option<PathBuf>,
}

/// Runs `issue`.
pub fn issue(args: IssueArgs) -> ExitCode {
    match issue_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn issue_inner(args: IssueArgs) -> Result<ExitCode, String> {
    let payload = super::issue::read_payload(&args.payload)
        .map_err(|e| format!("{}: {e}", args.payload.display()))?;
    let payload =
        String::from_utf8(payload).map_err(|_| "the payload is not UTF-8 JSON".to_string())?;
    let t = pb::CertificateType::from(args.cert_type);
    let req = pb::IssueRequest {
        request_id: args.request_id.clone().unwrap_or_default(),
        r#type: t as i32,
        payload: Some(pb::issue_request::Payload::PayloadJson(payload)),
        want_qr: if args.qr.is_some() {
            pb::QrFormat::Png as i32
        } else {
            pb::QrFormat::None as i32
        },
    };
    let rt = runtime()?;
    let result = rt.block_on(async {
        let channel = args.client.connect("issuer-all").await?;
        Ok::<_, String>(dccsign::api::client::issuance(channel).issue(req).await)
    })?;
    match result {
        Ok(resp) => {
            let r = resp.into_inner();
            if let Some(p) = &args.qr {
                std::fs::write(p, &r.qr_png).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            eprintln!(
                "issued {} kid {} request {} valid until {}",
                r.uvci,
                hex::encode(&r.kid),
                r.request_id,
                super::fmt_time(Some(r.exp))
            );
            println!("{}", r.hc1);
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            print_status(&status);
            let client_side = matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::AlreadyExists
                    | tonic::Code::PermissionDenied
            );
            Ok(if client_side {
                ExitCode::from(EXIT_REJECTED)
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

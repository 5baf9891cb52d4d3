//! `dccsign load`: a load generator that drives a running daemon over real mutual TLS, and
//! optionally measures the raw SoftHSM signing rate in the same run for comparison.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dccsign::api::pb;
use dccsign::config::Config;
use dccsign::dcc::CertType;
use rustls::pki_types::pem::PemObject;
use serde_json::json;

mod pace;
use pace::{Arrivals, Pace};

/// Arguments of `load`.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// State directory of a development daemon (client certificate, CA, address, token for --raw-hsm).
    #[arg(long)]
    state_dir: PathBuf,
    /// Development client to act as.
    #[arg(long = "as", default_value = "issuer-all")]
    as_client: String,
    /// Server address; default from the config.
    #[arg(long)]
    addr: Option<String>,
    /// `unary` (one RPC per certificate), `stream` (IssueStream per connection) or `batch`
    /// (IssueBatches per connection, `--batch` certificates per message).
    #[arg(long, default_value = "unary")]
    mode: Mode,
    /// Certificates per message in `batch` mode (1-256); `--concurrency` counts certificates,
    /// so concurrency / batch messages are in flight per connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    batch: u64,
    /// TCP/TLS connections.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Open-loop target rate (certificates/s over all connections, in every mode; in `batch`
    /// mode whole messages are paced); latency is measured from the scheduled start, so
    /// queueing counts. Without it: closed loop at full speed.
    #[arg(long)]
    rate: Option<f64>,
    /// With `--rate`: `even`, messages one interval apart (as wrk2 paces), or `poisson`,
    /// exponentially distributed gaps of the same mean (independent clients: bursts happen).
    #[arg(long, default_value = "even")]
    arrivals: Arrivals,
    /// Who names each certificate: `client`, each request carries a UVCI of its own, unique
    /// per run (as a front-end that numbers its certificates); `daemon`, requests carry none
    /// and the daemon derives one in the token (HMAC-SHA256 over client and request id: one
    /// more HSM operation per certificate).
    #[arg(long, default_value = "client")]
    uvci: UvciSource,
    /// Verify every Nth response's signature against the DSC from GetSigningInfo (0 = none).
    #[arg(long, default_value_t = 50)]
    verify_every: u64,
    /// Also measure the raw SoftHSM CKM_ECDSA rate with as many threads as the daemon's pool,
    /// on the token object and on a session copy, before and after the run (the ratio uses the
    /// mean of the two, so that a machine whose speed drifts does not bias it).
    #[arg(long)]
    raw_hsm: bool,
    /// Seconds of each of the four raw measurements.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60))]
    raw_seconds: u64,
    /// Fail (exit 1) when the daemon/raw ratio is below this floor (implies --raw-hsm). CI uses
    /// a deliberately low floor that only a real regression crosses.
    #[arg(long)]
    min_ratio: Option<f64>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum UvciSource {
    Client,
    Daemon,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Unary,
    Stream,
    Batch,
}

#[derive(Default)]
struct Stats {
    latencies_us: Mutex<Vec<u32>>,
    /// Open loop: how late each message left against its due time.
    lag_us: Mutex<Vec<u32>>,
    ok: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    verified: AtomicU64,
    verify_failures: AtomicU64,
}

impl Stats {
    /// A signed certificate whose request started at `t0`.
    fn success(&self, t0: Instant) {
        push_elapsed(&self.latencies_us, t0);
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    /// A message due at `due` leaves now.
    fn sent(&self, due: Instant) {
        push_elapsed(&self.lag_us, due);
    }

    fn error(&self, code: String) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code)
            .or_default() += 1;
    }
}

/// Records the microseconds since `t0`.
fn push_elapsed(samples: &Mutex<Vec<u32>>, t0: Instant) {
    let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
    samples.lock().unwrap_or_else(|p| p.into_inner()).push(us);
}

/// The samples, sorted for [`percentile`].
fn sorted(samples: &Mutex<Vec<u32>>) -> Vec<u32> {
    let mut v = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    v.sort_unstable();
    v
}

/// The payload mix: 60 % vaccination, 35 % test, 5 % recovery.
fn pick(n: u64) -> CertType {
    match n % 20 {
        0..=11 => CertType::Vaccination,
        12..=18 => CertType::Test,
        _ => CertType::Recovery,
    }
}

/// What the requests of a run are made of, built once.
struct Templates {
    /// The payload of each type, split where its UVCI goes (`None`: the payload has no UVCI
    /// and the daemon derives one).
    by_type: BTreeMap<CertType, (String, Option<String>)>,
    /// The client's UVCIs up to the request number: `URN:UVCI:01:<CC>:<prefix>/<RUN>N`.
    uvci_prefix: String,
}

type Payloads = Arc<Templates>;

/// The UVCI prefix of the client whose certificate is `cert`, as the daemon's config gives it
/// (the client's own, else the issuer's): the daemon refuses UVCIs outside it.
fn client_uvci_prefix(cfg: &Config, cert: &std::path::Path) -> Result<String, String> {
    let der = rustls::pki_types::CertificateDer::from_pem_file(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let identity = dccsign::api::tls::identity_of(&der)
        .ok_or_else(|| format!("{}: no URI or DNS name", cert.display()))?;
    let client = cfg.clients.iter().find(|c| c.identity == identity);
    Ok(client
        .and_then(|c| c.uvci_prefix.clone())
        .unwrap_or_else(|| cfg.issuer.uvci_prefix.clone()))
}

/// The example payloads, with a UVCI placeholder when the client names the certificates
/// (`prefix`: its namespace).
fn payloads(
    (country, prefix): (&str, &str),
    uvci: UvciSource,
    run: &str,
    now: time::OffsetDateTime,
) -> Payloads {
    const MARK: &str = "URN:UVCI:01:XX:MARK";
    let split = |t: CertType| {
        let ci = (uvci == UvciSource::Client).then_some(MARK);
        let json = super::example::example(t, country, ci, now).to_string();
        match json.split_once(MARK) {
            Some((head, tail)) => (head.to_string(), Some(tail.to_string())),
            None => (json, None),
        }
    };
    Arc::new(Templates {
        by_type: CertType::ALL.iter().map(|t| (*t, split(*t))).collect(),
        uvci_prefix: format!("URN:UVCI:01:{country}:{prefix}/{}N", run.to_uppercase()),
    })
}

/// Request `n` of run `run`: the type by the mix, and its own UVCI when the client names the
/// certificates (`URN:UVCI:01:<CC>:<prefix>/<RUN>N<n>` with its check character).
fn request(n: u64, run: &str, payloads: &Payloads) -> pb::IssueRequest {
    let t = pick(n);
    let ty = pb::CertificateType::from(t);
    let json = match &payloads.by_type[&t] {
        (whole, None) => whole.clone(),
        (head, Some(tail)) => {
            let body = format!("{}{n}", payloads.uvci_prefix);
            let check = dccsign::dcc::uvci::luhn_mod38(&body).map(|c| format!("#{c}"));
            format!("{head}{body}{}{tail}", check.unwrap_or_default())
        }
    };
    pb::IssueRequest {
        request_id: format!("{run}-{n}"),
        r#type: ty as i32,
        payload: Some(pb::issue_request::Payload::PayloadJson(json)),
        want_qr: 0,
    }
}

fn code_of(s: &tonic::Status) -> String {
    use prost::Message;
    s.metadata()
        .get_bin("dccsign-error-bin")
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| pb::ErrorDetail::decode(b.as_ref()).ok())
        .map(|d| d.code)
        .unwrap_or_else(|| format!("{:?}", s.code()))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Quantiles reported as the latency distribution in `--json` (`latency_ms.cdf`).
const LATENCY_CDF: [f64; 16] = [
    0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0,
];

/// Runs `load`.
pub fn run(args: LoadArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The raw SoftHSM `CKM_ECDSA` rate with as many threads as the daemon's pool, on the token
/// object (the baseline the targets are stated against) and on a session copy (what the daemon
/// signs with by default, `[hsm] session_key_copies`); each measured once before and once after
/// the daemon's run, so that a VM whose speed drifts during the run does not bias the ratio.
struct RawRate {
    threads: usize,
    /// Signatures/s on the token object: before, after.
    token_objects: [f64; 2],
    /// Signatures/s on a session copy: before, after.
    session_copies: [f64; 2],
}

impl RawRate {
    /// Mean of the two token-object measurements: the ratio's denominator.
    fn token_objects(&self) -> f64 {
        (self.token_objects[0] + self.token_objects[1]) / 2.0
    }

    /// Mean of the two session-copy measurements.
    fn session_copies(&self) -> f64 {
        (self.session_copies[0] + self.session_copies[1]) / 2.0
    }
}

/// The token and key the raw rate is measured with, opened once for both measurements.
struct RawBench {
    token: dccsign::hsm::Token,
    key: dccsign::hsm::KeyHandle,
    threads: usize,
}

impl RawBench {
    fn open(cfg: &Config) -> Result<RawBench, String> {
        let token = dccsign::hsm::Token::open(&cfg.token_settings()).map_err(|e| e.to_string())?;
        let dscs = dccsign::keys::DscSet::load(cfg, &token, time::OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())?;
        let key = dscs.iter().next().ok_or("no DSC configured")?.1.key.clone();
        Ok(RawBench {
            token,
            key,
            threads: cfg.pool_size(),
        })
    }

    /// One measurement of `seconds` each: signatures/s on the token object and on a session
    /// copy.
    fn measure(&self, seconds: u64) -> Result<(f64, f64), String> {
        let threads = self.threads;
        let measure = |pool: dccsign::hsm::SigningPool| {
            let pool = Arc::new(pool);
            let count = Arc::new(AtomicU64::new(0));
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (pool, key, count) = (pool.clone(), self.key.clone(), count.clone());
                    std::thread::spawn(move || {
                        while Instant::now() < deadline {
                            if pool.sign(&key, [7u8; 32]).is_ok() {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                let _ = h.join();
            }
            count.load(Ordering::Relaxed) as f64 / seconds as f64
        };
        let token_objects = measure(
            self.token
                .signing_pool_on_token_objects(threads, threads * 4)
                .map_err(|e| e.to_string())?,
        );
        self.token.set_session_copies(true);
        let session_copies = measure(
            self.token
                .signing_pool(threads, threads * 4)
                .map_err(|e| e.to_string())?,
        );
        Ok((token_objects, session_copies))
    }
}

fn run_inner(args: LoadArgs) -> Result<ExitCode, String> {
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err("--rate must be a positive number of certificates per second".into());
    }
    let cfg = Config::load(&args.state_dir.join("dccsign.toml")).map_err(|e| e.to_string())?;
    cfg.export_softhsm_env();
    let addr = match &args.addr {
        Some(a) => a.clone(),
        None => cfg
            .server
            .as_ref()
            .map(|s| s.listen.to_string())
            .ok_or("no [server] in config; give --addr")?,
    };
    let now = time::OffsetDateTime::now_utc();
    let run_id = format!("load{:08x}", rand::random::<u32>());
    let dir = args.state_dir.clone();
    let (cert, key, ca) = (
        dir.join(format!("pki/clients/{}.pem", args.as_client)),
        dir.join(format!("pki/clients/{}.key", args.as_client)),
        dir.join("pki/tls/ca.pem"),
    );
    let prefix = client_uvci_prefix(&cfg, &cert)?;
    let payloads = payloads((&cfg.issuer.country, &prefix), args.uvci, &run_id, now);
    let stats = Arc::new(Stats::default());
    let raw_before = if args.raw_hsm || args.min_ratio.is_some() {
        let bench = RawBench::open(&cfg)?;
        eprintln!("measuring the raw SoftHSM rate before the run…");
        let before = bench.measure(args.raw_seconds)?;
        Some((bench, before))
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (elapsed, cpu) = rt.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..args.connections.max(1) {
            channels
                .push(dccsign::api::client::connect(&addr, &cert, &key, &ca, "localhost").await?);
        }
        // Trust the DSCs the daemon reports, to verify a sample of responses.
        let info = dccsign::api::client::issuance(channels[0].clone())
            .get_signing_info(pb::GetSigningInfoRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let mut trust = dccsign::cose::TrustStore::new();
        for s in &info.signers {
            trust.add_der(&s.certificate).map_err(|e| e.to_string())?;
        }
        let trust = Arc::new(trust);
        let counter = Arc::new(AtomicU64::new(0));
        let cpu_before = cpu_times();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(args.duration);
        let per_conn_rate = args.rate.map(|r| r / channels.len() as f64);
        let size = if args.mode == Mode::Batch {
            args.batch.max(1) as usize
        } else {
            1
        };
        let paces = Pace::start(channels.len(), per_conn_rate, size, args.arrivals)
            .map_err(|e| format!("cannot start the load generator's clock thread: {e}"))?;
        let progress = {
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut last = 0;
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let ok = stats.ok.load(Ordering::Relaxed);
                    eprint!(
                        "\r{:>6.1}s  {:>8} ok  {:>7}/s   ",
                        start.elapsed().as_secs_f64(),
                        ok,
                        ok - last
                    );
                    last = ok;
                }
            })
        };
        let mut tasks = Vec::new();
        for (ch, pace) in channels.into_iter().zip(paces) {
            let w = Worker {
                ch,
                in_flight: args.concurrency.max(1),
                deadline,
                stats: stats.clone(),
                trust: trust.clone(),
                counter: counter.clone(),
                payloads: payloads.clone(),
                run: run_id.clone(),
                verify_every: args.verify_every,
                pace,
            };
            let (mode, batch) = (args.mode, size);
            tasks.push(tokio::spawn(async move {
                match mode {
                    Mode::Unary => unary(w).await,
                    Mode::Stream => stream(w).await,
                    Mode::Batch => batches(w, batch).await,
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        progress.abort();
        eprintln!();
        let elapsed = start.elapsed();
        let cpu = cpu_before.zip(cpu_times()).map(|(a, b)| b.since(a));
        Ok::<_, String>((elapsed, cpu))
    })?;

    let raw = match raw_before {
        Some((bench, before)) => {
            eprintln!("measuring the raw SoftHSM rate after the run…");
            let after = bench.measure(args.raw_seconds)?;
            Some(RawRate {
                threads: bench.threads,
                token_objects: [before.0, after.0],
                session_copies: [before.1, after.1],
            })
        }
        None => None,
    };
    let (lat, lag) = (sorted(&stats.latencies_us), sorted(&stats.lag_us));
    let ok = stats.ok.load(Ordering::Relaxed);
    let rate = ok as f64 / elapsed.as_secs_f64();
    let errors = stats
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let rss_kib = daemon_rss_kib();
    let summary = json!({
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "connections": args.connections, "concurrency": args.concurrency,
        "batch": (args.mode == Mode::Batch).then_some(args.batch),
        "uvci": format!("{:?}", args.uvci).to_lowercase(),
        "target_rate": args.rate,
        "arrivals": args.rate.map(|_| format!("{:?}", args.arrivals).to_lowercase()),
        "seconds": elapsed.as_secs_f64(),
        "ok": ok, "certificates_per_second": rate,
        "latency_ms": {"p50": percentile(&lat, 0.50), "p90": percentile(&lat, 0.90),
                        "p99": percentile(&lat, 0.99), "p999": percentile(&lat, 0.999),
                        "cdf": LATENCY_CDF.iter().map(|q| json!([q, percentile(&lat, *q)])).collect::<Vec<_>>()},
        "schedule_lag_ms": args.rate.map(|_| json!({"p50": percentile(&lag, 0.50),
            "p90": percentile(&lag, 0.90), "p99": percentile(&lag, 0.99)})),
        "errors": errors,
        "verified": stats.verified.load(Ordering::Relaxed),
        "verify_failures": stats.verify_failures.load(Ordering::Relaxed),
        "raw_hsm": raw.as_ref().map(|r| json!({"threads": r.threads,
            "signatures_per_second": r.token_objects(), "ratio": rate / r.token_objects(),
            "before_after": r.token_objects,
            "session_copies_per_second": r.session_copies(),
            "session_copies_before_after": r.session_copies,
            "ratio_to_session_copies": rate / r.session_copies()})),
        "daemon_rss_mib": rss_kib.map(|k| k as f64 / 1024.0),
        "machine": cpu.map(|c| json!({"cpus": c.cpus, "busy_cpus": c.busy_cpus(),
            "stolen_cpus": c.stolen_cpus()})),
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).unwrap_or_default()
        );
    } else {
        println!(
            "{} mode, {} connections x {} in flight, UVCIs by the {}{}: {} certificates in {:.1} s = {:.0}/s",
            summary["mode"].as_str().unwrap_or(""),
            args.connections,
            args.concurrency,
            summary["uvci"].as_str().unwrap_or(""),
            args.rate
                .map(|r| format!(", target {r}/s ({})", summary["arrivals"].as_str().unwrap_or("")))
                .unwrap_or_default(),
            ok,
            elapsed.as_secs_f64(),
            rate
        );
        println!(
            "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}",
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            percentile(&lat, 0.999)
        );
        if args.rate.is_some() {
            println!(
                "schedule: messages left late by p50 {:.2}  p90 {:.2}  p99 {:.2} ms",
                percentile(&lag, 0.5),
                percentile(&lag, 0.9),
                percentile(&lag, 0.99)
            );
        }
        println!(
            "verified {} sampled responses, {} failures; errors: {:?}",
            summary["verified"], summary["verify_failures"], errors
        );
        if let Some(r) = &raw {
            println!(
                "raw SoftHSM: {:.0} signatures/s with {} threads (before {:.0}, after {:.0}); daemon/raw = {:.3}",
                r.token_objects(),
                r.threads,
                r.token_objects[0],
                r.token_objects[1],
                rate / r.token_objects()
            );
            println!(
                "raw SoftHSM on session copies: {:.0} signatures/s (before {:.0}, after {:.0}); daemon/raw = {:.3}",
                r.session_copies(),
                r.session_copies[0],
                r.session_copies[1],
                rate / r.session_copies()
            );
        }
        if let Some(k) = rss_kib {
            println!("daemon RSS: {:.1} MiB", k as f64 / 1024.0);
        }
        if let Some(c) = &cpu {
            println!(
                "machine during the run: {:.2} of {} CPUs busy (daemon, load generator and the rest), {:.2} stolen by the hypervisor",
                c.busy_cpus(),
                c.cpus,
                c.stolen_cpus()
            );
        }
    }
    let mut failed =
        !errors.is_empty() || stats.verify_failures.load(Ordering::Relaxed) > 0 || ok == 0;
    if let (Some(floor), Some(r)) = (args.min_ratio, raw.map(|r| r.token_objects())) {
        if rate / r < floor {
            eprintln!(
                "error: daemon/raw ratio {:.3} is below the floor {floor} ({rate:.0}/s against {r:.0}/s raw)",
                rate / r
            );
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// RSS of the running `dccsign serve`, from /proc (Linux), when exactly one is running.
fn daemon_rss_kib() -> Option<u64> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_daemon = args.first().is_some_and(|a| a.ends_with(b"dccsign"))
            && args.get(1).is_some_and(|a| *a == b"serve");
        if is_daemon {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok());
            found.extend(rss);
        }
    }
    (found.len() == 1).then(|| found[0])
}

/// The machine's CPU time (`/proc/stat`, clock ticks).
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    /// user, nice, system, irq and softirq.
    busy: u64,
    /// Time the hypervisor ran something else while this VM's vCPUs wanted to run.
    steal: u64,
    /// All of it, idle and iowait included.
    all: u64,
}

/// The machine's CPU use over the run.
#[derive(Debug, Clone, Copy)]
struct CpuUse {
    cpus: usize,
    delta: CpuTimes,
}

impl CpuTimes {
    fn since(self, before: CpuTimes) -> CpuUse {
        CpuUse {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            delta: CpuTimes {
                busy: self.busy.saturating_sub(before.busy),
                steal: self.steal.saturating_sub(before.steal),
                all: self.all.saturating_sub(before.all),
            },
        }
    }
}

impl CpuUse {
    fn share(&self, ticks: u64) -> f64 {
        ticks as f64 / self.delta.all.max(1) as f64 * self.cpus as f64
    }

    /// CPUs' worth of busy time, whoever used it.
    fn busy_cpus(&self) -> f64 {
        self.share(self.delta.busy)
    }

    /// CPUs' worth of time the hypervisor took away: a run with much of it says more about the
    /// host than about the daemon.
    fn stolen_cpus(&self) -> f64 {
        self.share(self.delta.steal)
    }
}

/// The first line of `/proc/stat` (`None` elsewhere than Linux).
fn cpu_times() -> Option<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields.try_into().ok()?;
    let busy = user + nice + system + irq + softirq;
    Some(CpuTimes {
        busy,
        steal,
        all: busy + idle + iowait + steal,
    })
}

/// What every connection's worker shares.
struct Worker {
    ch: tonic::transport::Channel,
    in_flight: usize,
    deadline: Instant,
    stats: Arc<Stats>,
    trust: Arc<dccsign::cose::TrustStore>,
    counter: Arc<AtomicU64>,
    payloads: Payloads,
    run: String,
    verify_every: u64,
    /// When each message is due (open loop), or always now (closed loop).
    pace: Pace,
}

fn check(
    stats: &Stats,
    trust: &dccsign::cose::TrustStore,
    r: &pb::IssueResponse,
    n: u64,
    every: u64,
) {
    if every == 0 || !n.is_multiple_of(every) {
        return;
    }
    match dccsign::cose::verify_cose(&r.cose, trust, time::OffsetDateTime::now_utc()) {
        Ok(rep) if rep.is_valid() => stats.verified.fetch_add(1, Ordering::Relaxed),
        _ => stats.verify_failures.fetch_add(1, Ordering::Relaxed),
    };
}

async fn unary(w: Worker) {
    let Worker {
        ch,
        in_flight: k,
        deadline,
        stats,
        trust,
        counter,
        payloads,
        run,
        verify_every,
        mut pace,
    } = w;
    let gate = Arc::new(tokio::sync::Semaphore::new(k));
    while Instant::now() < deadline {
        let scheduled = pace.due().await;
        let Ok(permit) = gate.clone().acquire_owned().await else {
            break;
        };
        if pace.open() {
            stats.sent(scheduled);
        }
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let req = request(n, &run, &payloads);
        let mut c = dccsign::api::client::issuance(ch.clone());
        let (stats, trust) = (stats.clone(), trust.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match c.issue(req).await {
                Ok(r) => {
                    stats.success(scheduled);
                    check(&stats, &trust, &r.into_inner(), n, verify_every);
                }
                Err(s) => stats.error(code_of(&s)),
            }
        });
    }
    let _ = gate.acquire_many(k as u32).await;
}

async fn stream(mut w: Worker) {
    let k = w.in_flight;
    let gate = Arc::new(tokio::sync::Semaphore::new(k));
    let started = Started::default();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::IssueRequest>(k);
    let sender = spawn_sender(
        &mut w,
        1,
        gate.clone(),
        started.clone(),
        tx,
        |_, mut items| {
            let r = items.pop().unwrap_or_default();
            (r.request_id.clone(), r)
        },
    );
    let mut client = dccsign::api::client::issuance(w.ch.clone());
    let Ok(resp) = client
        .issue_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    else {
        w.stats.error("stream-open".into());
        return;
    };
    let mut resp = resp.into_inner();
    while let Ok(Some(m)) = resp.message().await {
        let entry = sent(&started, &m.request_id);
        gate.add_permits(1);
        record(&w.stats, &w.trust, m, entry, w.verify_every);
    }
    let _ = sender.await;
}

/// When each message in flight was sent, by key (request id or batch id), with the number of
/// its first request.
type Started = Arc<Mutex<std::collections::HashMap<String, (Instant, u64)>>>;

/// Takes the record of an answered message.
fn sent(started: &Started, key: &str) -> Option<(Instant, u64)> {
    started
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key)
}

/// The sending half of `stream` and `batches`: until the deadline, one message per permit of
/// `gate` (open loop: no earlier than the message is due), of `size` consecutive requests that
/// `wrap` turns into the message and its key.
fn spawn_sender<M: Send + 'static>(
    w: &mut Worker,
    size: usize,
    gate: Arc<tokio::sync::Semaphore>,
    started: Started,
    tx: tokio::sync::mpsc::Sender<M>,
    wrap: impl Fn(u64, Vec<pb::IssueRequest>) -> (String, M) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (deadline, counter) = (w.deadline, w.counter.clone());
    let (payloads, run, stats) = (w.payloads.clone(), w.run.clone(), w.stats.clone());
    let mut pace = std::mem::replace(&mut w.pace, Pace::closed());
    tokio::spawn(async move {
        while Instant::now() < deadline {
            let due = pace.due().await;
            let Ok(p) = gate.acquire().await else { break };
            p.forget();
            let t0 = if pace.open() {
                stats.sent(due);
                due
            } else {
                Instant::now()
            };
            let first = counter.fetch_add(size as u64, Ordering::Relaxed);
            let items = (first..first + size as u64)
                .map(|n| request(n, &run, &payloads))
                .collect();
            let (key, msg) = wrap(first, items);
            started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, (t0, first));
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    })
}

/// Records one answered item: its latency from `t0`, a sampled verification, the outcome.
fn record(
    stats: &Stats,
    trust: &dccsign::cose::TrustStore,
    m: pb::IssueStreamResponse,
    t0: Option<(Instant, u64)>,
    every: u64,
) {
    match m.result {
        Some(pb::issue_stream_response::Result::Ok(r)) => match t0 {
            Some((t0, n)) => {
                stats.success(t0);
                check(stats, trust, &r, n, every);
            }
            None => {
                stats.ok.fetch_add(1, Ordering::Relaxed);
            }
        },
        Some(pb::issue_stream_response::Result::Error(e)) => stats.error(e.code),
        None => stats.error("empty".into()),
    }
}

/// `batch` mode: IssueBatches with `size` (at least 1) certificates per message and `in_flight`
/// certificates (rounded up to whole batches) in flight.
async fn batches(mut w: Worker, size: usize) {
    let k = w.in_flight.div_ceil(size);
    let gate = Arc::new(tokio::sync::Semaphore::new(k));
    let started = Started::default();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::IssueBatchRequest>(k);
    let run = w.run.clone();
    let sender = spawn_sender(
        &mut w,
        size,
        gate.clone(),
        started.clone(),
        tx,
        move |first, items| {
            let batch_id = format!("{run}-b{first}");
            (batch_id.clone(), pb::IssueBatchRequest { batch_id, items })
        },
    );
    let Worker {
        ch,
        stats,
        trust,
        verify_every,
        ..
    } = w;
    let mut client = pb::bulk_issuance_client::BulkIssuanceClient::new(ch);
    let Ok(resp) = client
        .issue_batches(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    else {
        stats.error("stream-open".into());
        return;
    };
    let mut resp = resp.into_inner();
    while let Ok(Some(b)) = resp.message().await {
        let entry = sent(&started, &b.batch_id);
        gate.add_permits(1);
        if b.results.len() != size {
            stats.error("batch-size-mismatch".into());
        }
        for (i, m) in b.results.into_iter().enumerate() {
            let t0 = entry.map(|(t0, first)| (t0, first + i as u64));
            record(&stats, &trust, m, t0, verify_every);
        }
    }
    let _ = sender.await;
}

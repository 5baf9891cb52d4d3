//! Shared helpers for end-to-end tests: a development state directory per test (its own
//! SoftHSM token), and running the real `dccsign` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Personal data planted by tests (`marker_person`) that must never be stored or logged.
pub const MARKERS: [&str; 5] = [
    "ZZMARKERZZ",
    "Zzmarkerzz",
    "QQMARKERQQ",
    "Qqmarkerqq",
    "1931-07-13",
];

/// A `nam` + `dob` made of the markers.
pub fn marker_person(payload: &mut serde_json::Value) {
    payload["nam"] = serde_json::json!({"fn": "Zzmarkerzz", "fnt": "ZZMARKERZZ", "gn": "Qqmarkerqq", "gnt": "QQMARKERQQ"});
    payload["dob"] = serde_json::json!("1931-07-13");
}

/// A state directory created by `dccsign dev-init`.
pub struct Dev {
    pub dir: tempfile::TempDir,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dccsign")
}

impl Dev {
    pub fn new() -> Dev {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let d = Dev { dir };
        let out = d.run(&["dev-init", "--state-dir", d.path().to_str().unwrap()]);
        assert!(out.status.success(), "dev-init failed: {}", stderr(&out));
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A server certificate for localhost from the development TLS CA, with its key in a PEM
    /// file (`pki/tls/gateway.{pem,key}`), for stand-ins of other services: the daemon's own
    /// server key is in the token.
    pub fn stand_in_cert(&self) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.file("pki/tls/gateway.pem"),
            self.file("pki/tls/gateway.key"),
        );
        if !cert.exists() {
            let dir = self.path().to_str().unwrap();
            let out = self.run(&[
                "dev-client-cert",
                "--state-dir",
                dir,
                "--name",
                "gateway",
                "--server",
            ]);
            assert!(
                out.status.success(),
                "dev-client-cert --server: {}",
                stderr(&out)
            );
        }
        (cert, key)
    }

    /// Runs dccsign with `args` (SOFTHSM2_CONF comes from the state dir's config).
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env_remove("SOFTHSM2_CONF")
            .env_remove("DCCSIGN_CONFIG")
            .output()
            .unwrap()
    }

    /// A fresh valid example payload of type `t`.
    pub fn example(&self, t: &str) -> serde_json::Value {
        let out = self.run(&["example-payload", "--type", t]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Writes `payload` to a file and runs `sign`.
    pub fn sign(&self, t: &str, payload: &serde_json::Value) -> Output {
        let name = format!("payload-{}.json", rand_suffix());
        let p = self.file(&name);
        std::fs::write(&p, serde_json::to_vec_pretty(payload).unwrap()).unwrap();
        self.run(&[
            "sign",
            "--state-dir",
            self.path().to_str().unwrap(),
            "--type",
            t,
            "--payload",
            p.to_str().unwrap(),
        ])
    }

    /// Signs and returns the HC1, asserting success.
    pub fn sign_ok(&self, t: &str, payload: &serde_json::Value) -> String {
        let out = self.sign(t, payload);
        assert!(out.status.success(), "sign failed: {}", stderr(&out));
        let hc1 = stdout(&out).trim().to_string();
        assert!(hc1.starts_with("HC1:"), "{hc1}");
        hc1
    }

    /// Ledger row counts (reserved, signed).
    pub fn ledger_counts(&self) -> (u64, u64) {
        let p = self.file("ledger.sqlite");
        if !p.exists() {
            return (0, 0);
        }
        // Read directly: the daemon may be running, and a ledger has one writer.
        let c = rusqlite::Connection::open(&p).unwrap();
        let count = |state: &str| -> u64 {
            c.query_row(
                "SELECT count(*) FROM certificates WHERE state = ?1",
                [state],
                |r| r.get(0),
            )
            .unwrap()
        };
        (count("reserved"), count("signed"))
    }

    /// Makes the user PIN file readable by everyone (which dccsign must refuse).
    pub fn pin_world_readable(&self) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.file("secrets/user.pin");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    /// Asserts that none of [`MARKERS`] appears in `logs` or in the ledger files.
    pub fn assert_no_personal_data(&self, logs: &str) {
        for needle in MARKERS {
            assert!(!logs.contains(needle), "{needle} in the logs:\n{logs}");
            for f in ["ledger.sqlite", "ledger.sqlite-wal"] {
                if let Ok(bytes) = std::fs::read(self.file(f)) {
                    assert!(
                        !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                        "{needle} found in {f}"
                    );
                }
            }
        }
    }

    /// `serve` arguments for this state dir on an ephemeral port, metrics off.
    pub fn serve_args(&self) -> Vec<String> {
        let dir = self.path().to_str().unwrap().to_string();
        [
            "serve",
            "--state-dir",
            &dir,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "none",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Starts `serve` on this state directory expecting it to refuse: exit 1 and one line on
    /// standard error, which is returned.
    pub fn refused_start(&self) -> String {
        let args = self.serve_args();
        let out = self.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    }

    /// OpenSC's `pkcs11-tool --list-objects --type <kind>` on the development token (an
    /// independent PKCS#11 client): its standard output.
    pub fn pkcs11_objects(&self, kind: &str) -> String {
        let pin = std::fs::read_to_string(self.file("secrets/user.pin")).unwrap();
        let out = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", self.file("softhsm2.conf"))
            .args([
                "--module",
                dccsign::hsm::SOFTHSM_MODULE,
                "--token-label",
                "dccsign-dev",
                "--login",
                "--pin",
                pin.trim(),
                "--list-objects",
                "--type",
                kind,
            ])
            .output()
            .expect("pkcs11-tool missing: run .ci/deps");
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    }

    pub fn dsc_pem(&self, t: &str) -> PathBuf {
        self.file(&format!("pki/dsc-{t}.pem"))
    }
}

/// A call the client gave up on (its deadline passed): DEADLINE_EXCEEDED, or CANCELLED when
/// the client's side noticed first.
pub fn assert_abandoned(e: &tonic::Status) {
    assert!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{e}"
    );
}

/// `openssl <args>` in `dir` (an independent implementation to check ours against): its
/// standard output; fails the test when it fails.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl missing: run .ci/deps");
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    stdout(&out)
}

/// A stand-in CA made by OpenSSL in `dir` (a software P-256 key, valid two days):
/// `<name>.key` and `<name>.pem`, with the subject `/CN=<cn>`.
pub fn openssl_ca(dir: &Path, name: &str, cn: &str) {
    let (key, pem, subj) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN={cn}"),
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
        ],
    );
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn rand_suffix() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// The DER of the first certificate in a PEM file.
pub fn pem_der(path: &Path) -> Vec<u8> {
    use der::{DecodePem, Encode};
    let text = std::fs::read_to_string(path).unwrap();
    x509_cert::Certificate::from_pem(text.as_bytes())
        .unwrap()
        .to_der()
        .unwrap()
}

/// `shared/` beside the project (CI), or /work/shared.
pub fn shared_dir() -> PathBuf {
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    if beside.exists() {
        beside
    } else {
        PathBuf::from("/work/shared")
    }
}

/// A running `dccsign serve --dev` on an ephemeral loopback port.
pub struct Daemon {
    pub dev: Dev,
    pub addr: String,
    pub child: std::process::Child,
    pub stderr_path: PathBuf,
    /// Kept open so the daemon's stdout never breaks.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Daemon {
    /// Starts a daemon on a fresh state directory.
    pub fn start() -> Daemon {
        Daemon::start_with(Dev::new(), |_| {})
    }

    /// Starts a daemon on `dev` after letting `edit` change its config text.
    pub fn start_with(dev: Dev, edit: impl FnOnce(&mut String)) -> Daemon {
        let cfg_path = dev.file("dccsign.toml");
        let mut cfg = std::fs::read_to_string(&cfg_path).unwrap();
        edit(&mut cfg);
        std::fs::write(&cfg_path, cfg).unwrap();
        let stderr_path = dev.file("daemon.log");
        let (child, addr, stdout) = spawn_daemon(&dev, &stderr_path);
        Daemon {
            dev,
            addr,
            child,
            stderr_path,
            _stdout: stdout,
        }
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same state directory.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "daemon exit {status:?}:\n{}", self.log());
        let (child, addr, stdout) = spawn_daemon(&self.dev, &self.stderr_path);
        self.child = child;
        self.addr = addr;
        self._stdout = stdout;
    }

    /// A connected channel for development client `name`.
    pub async fn channel(&self, name: &str) -> Result<tonic::transport::Channel, String> {
        let d = &self.dev;
        dccsign::api::client::connect(
            &self.addr,
            &d.file(&format!("pki/clients/{name}.pem")),
            &d.file(&format!("pki/clients/{name}.key")),
            &d.file("pki/tls/ca.pem"),
            "localhost",
        )
        .await
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Spawned = (
    std::process::Child,
    String,
    std::io::BufReader<std::process::ChildStdout>,
);

fn spawn_daemon(dev: &Dev, stderr_path: &Path) -> Spawned {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stderr_path)
        .unwrap();
    let mut child = Command::new(bin())
        .args(dev.serve_args())
        .env_remove("SOFTHSM2_CONF")
        .env("DCCSIGN_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let addr = line
        .split_whitespace()
        .last()
        .filter(|a| a.contains(':'))
        .unwrap_or_else(|| {
            panic!(
                "daemon did not start: {line}\n{}",
                std::fs::read_to_string(stderr_path).unwrap_or_default()
            )
        })
        .to_string();
    (child, addr, stdout)
}

/// An `IssueRequest` for a JSON payload.
pub fn issue_request(
    t: &str,
    payload: &serde_json::Value,
    request_id: &str,
) -> dccsign::api::pb::IssueRequest {
    use dccsign::api::pb;
    let ty = pb::CertificateType::from(t.parse::<dccsign::dcc::CertType>().unwrap());
    pb::IssueRequest {
        request_id: request_id.into(),
        r#type: ty as i32,
        payload: Some(pb::issue_request::Payload::PayloadJson(payload.to_string())),
        want_qr: pb::QrFormat::None as i32,
    }
}

/// The `dccsign-error-bin` detail of a status.
pub fn error_detail(s: &tonic::Status) -> dccsign::api::pb::ErrorDetail {
    use prost::Message;
    let b = s
        .metadata()
        .get_bin("dccsign-error-bin")
        .expect("no dccsign-error-bin")
        .to_bytes()
        .unwrap();
    dccsign::api::pb::ErrorDetail::decode(b.as_ref()).unwrap()
}

//! The real `kiln serve` process for end-to-end tests: started on free ports (HTTP and gRPC),
//! waited on until `/health` is 200, called over HTTP (or gRPC), stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `kiln` binary: `$KILN_BIN` if set, else the path cargo built for the calling test
/// (`env!("CARGO_BIN_EXE_kiln")`).
pub fn kiln_bin(built: &str) -> PathBuf {
    std::env::var_os("KILN_BIN").map_or_else(|| PathBuf::from(built), PathBuf::from)
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub addr: String,
    /// `http://127.0.0.1:PORT` of the gRPC port (for a tonic `Channel`).
    pub grpc_url: String,
    /// Every line the server has written to stderr so far.
    log: Arc<Mutex<Vec<String>>>,
}

/// A response: status, headers that tests look at, and the body.
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub header_length: Option<String>,
    /// `x-request-id`.
    pub request_id: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "body is not JSON (status {}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// The plan cache the end-to-end tests' servers share (one per machine; entries are keyed by
/// build, so test runs of different builds do not mix): a temp folder, never the user's cache.
pub fn test_cache_dir() -> PathBuf {
    std::env::temp_dir().join("kiln-e2e-plan-cache")
}

impl Server {
    /// Starts `kiln serve --model MODEL EXTRA...` on 127.0.0.1 and waits for `/health` = 200.
    /// The plan cache is [`test_cache_dir`] unless `extra` names one.
    pub fn start(bin: &Path, model: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(bin, model, extra, &[])
    }

    /// [`Server::start`] with extra environment variables for the server process.
    pub fn start_with_env(
        bin: &Path,
        model: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Server {
        Self::start_wrapped(&[], bin, model, extra, env)
    }

    /// [`Server::start_with_env`] run through `wrapper` (e.g. `["prlimit", "--fsize=1024",
    /// "--"]`): the command line is `WRAPPER... BIN serve ...`.
    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &Path,
        model: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Server {
        let mut args: Vec<std::ffi::OsString> = vec!["--model".into(), model.into()];
        args.extend(extra.iter().map(Into::into));
        let server = Self::spawn(wrapper, bin, &args, env);
        server.wait_healthy();
        server
    }

    /// `kiln serve ARGS...` (the models given in `args`: `--model-repository`, several
    /// `--model`), waited on until `/health` is 200.
    pub fn start_args(bin: &Path, args: &[&str]) -> Server {
        let server = Self::start_args_unready(bin, args);
        server.wait_healthy();
        server
    }

    /// [`Server::start_args`] without waiting for `/health` (only for the listening ports), for
    /// servers that are not meant to become ready.
    pub fn start_args_unready(bin: &Path, args: &[&str]) -> Server {
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        Self::spawn(&[], bin, &args, &[])
    }

    fn spawn(
        wrapper: &[&str],
        bin: &Path,
        args: &[std::ffi::OsString],
        env: &[(&str, &Path)],
    ) -> Server {
        let mut command = match wrapper.split_first() {
            None => Command::new(bin),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
        };
        let mut child = command
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--grpc-port",
                "0",
            ])
            .args(args)
            .env("NO_COLOR", "1")
            .env("KILN_LOG", "info")
            .env("KILN_CACHE_DIR", test_cache_dir())
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kiln");
        // The bound addresses come from the log line
        // `listening ... address=127.0.0.1:PORT grpc=127.0.0.1:PORT`.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[kiln] {line}");
                kept.lock().unwrap().push(line.clone());
                let field = |name: &str| {
                    line.split(name).nth(1).map(|rest| {
                        rest.chars()
                            .take_while(|c| !c.is_whitespace())
                            .collect::<String>()
                    })
                };
                if let (Some(addr), Some(grpc)) = (field(" address="), field(" grpc=")) {
                    let _ = tx.send((addr, grpc));
                }
            }
        });
        let (addr, grpc_addr) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("kiln did not report its address");
        Server {
            child,
            log,
            base: format!("http://{addr}"),
            addr,
            grpc_url: format!("http://{grpc_addr}"),
        }
    }

    /// Waits for `/health` to answer 200 (503s on the way must be JSON errors).
    pub fn wait_healthy(&self) {
        let server = self;
        // Generous: a first start on a software GPU (lavapipe) autotunes its kernels.
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match ureq::get(&server.url("/health")).call() {
                Ok(r) if r.status() == 200 => break,
                Err(ureq::Error::Status(503, r)) => {
                    let body: Value = r.into_json().unwrap();
                    assert!(body["error"].is_string(), "503 body is a JSON error");
                }
                other => assert!(
                    Instant::now() < deadline,
                    "kiln never became healthy: {other:?}"
                ),
            }
            assert!(Instant::now() < deadline, "kiln never became healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log lines so far (stderr; `KILN_LOG=info`).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request with the given headers and body; any status comes back as a [`Reply`].
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let mut req = ureq::request(method, &self.url(path));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: transport error {e}"),
        };
        let status = resp.status();
        let retry_after = resp.header("retry-after").map(str::to_string);
        let header_length = resp
            .header("inference-header-content-length")
            .map(str::to_string);
        let request_id = resp.header("x-request-id").map(str::to_string);
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).unwrap();
        Reply {
            status,
            retry_after,
            header_length,
            request_id,
            body,
        }
    }

    /// POSTs raw bytes; returns (status, JSON body).
    pub fn post_raw(&self, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
        let headers: Vec<(&str, &str)> = content_type
            .map(|ct| vec![("content-type", ct)])
            .unwrap_or_default();
        let r = self.request("POST", path, &headers, Some(body));
        (r.status, r.json())
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, Some("application/json"), body.to_string().as_bytes())
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.request("GET", path, &[], None);
        (r.status, r.json())
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        String::from_utf8(self.request("GET", "/metrics", &[], None).body).unwrap()
    }

    /// The value of one sample in `/metrics` (`name` with its labels, as printed), or 0.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit on its own; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.child.try_wait().unwrap() {
                return code;
            }
            assert!(
                Instant::now() < deadline,
                "kiln did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the process must exit 0 on its own.
    pub fn terminate(mut self) {
        self.sigterm();
        let code = self.wait_exit(Duration::from_secs(30));
        assert!(code.success(), "kiln exited with {code} after SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of the samples in Prometheus text whose name is `series`'s and whose labels include
/// every label it gives, as PromQL's `sum(series)` would: `kiln_request_failure_total{reason="overloaded"}`
/// adds up every model's overloaded failures.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let (name, wanted) = split_series(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, value) = l.rsplit_once(' ')?;
            let (n, labels) = split_series(s);
            (n == name && wanted.iter().all(|w| labels.contains(w)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// `name{a="x",b="y"}` → `("name", ["a=\"x\"", "b=\"y\""])` (label values hold no commas here).
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (series, Vec::new()),
    }
}

/// The tiny GPT-2 fixture the end-to-end generation tests serve.
pub fn gpt2_tiny() -> PathBuf {
    crate::fixtures().join("tiny/gpt2-tiny")
}

/// `kiln serve` (the binary at `kiln`) of the tiny GPT-2 with the ChatML template (as a chat
/// model) and `extra` flags.
pub fn start_gpt2_tiny(kiln: &Path, extra: &[&str]) -> Server {
    let template = crate::workspace().join("tests/data/chatml.jinja");
    let mut args = vec!["--chat-template", template.to_str().expect("a UTF-8 path")];
    args.extend_from_slice(extra);
    Server::start(kiln, &gpt2_tiny(), &args)
}

/// The tiny GPT-2 reference's prompts and their greedy texts.
pub fn gpt2_tiny_cases() -> Vec<(String, String)> {
    let r = crate::read_json(&gpt2_tiny().join("reference.json"));
    r["greedy_generation"]["results"]
        .as_array()
        .expect("greedy_generation.results")
        .iter()
        .map(|c| {
            let field = |k: &str| c[k].as_str().expect(k).to_string();
            (field("prompt"), field("generated_text"))
        })
        .collect()
}

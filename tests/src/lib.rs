//! Test equipment for Flotilla's end-to-end tests: a PKI in a temp dir, the real
//! controller and agent binaries as child processes, `flotctl` invocations and
//! an `eventually` poller. Nothing here is shipped.
//!
//! The binaries are found next to the test executable (`target/<profile>/`); the
//! test command builds them first (`cargo build --workspace --bins`).
// A synchronous harness: waiting is a plain sleep, there is no async runtime here.
#![allow(clippy::disallowed_methods)]
// Test equipment: a failed setup step should stop the test loudly, with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use flotilla_common::pki::{self, CaInit, CertPaths};
use flotilla_common::{Identity, NodeId, Role};

pub mod cluster;
pub mod nginx;

/// How long `eventually` waits by default: a hang guard, not a speed claim.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The path of a workspace binary built beside the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("test executable has a directory").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which ./x test does)",
        path.display()
    );
    path
}

/// Polls `probe` until it returns `Some`, or panics after `PATIENCE` with `what`
/// and the last thing `probe` reported through `last`.
pub fn eventually<T>(what: &str, mut probe: impl FnMut(&mut String) -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    let mut last = String::new();
    loop {
        if let Some(v) = probe(&mut last) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last observation: {last}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fleet CA with certificates, in a temp dir.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Creates a CA under `dir`.
    pub fn new(dir: &Path) -> Self {
        pki::init_ca(dir, &CaInit::default()).expect("init CA");
        Self { dir: dir.to_owned() }
    }

    pub fn ca(&self) -> PathBuf {
        pki::ca_cert_path(&self.dir)
    }

    /// The certificate of `node`, issued on first use.
    pub fn node(&self, node: &str) -> CertPaths {
        let id = Identity::Node(NodeId::new(node).expect("valid node id"));
        let paths = pki::leaf_paths(&self.dir, &id);
        if !paths.cert.exists() {
            pki::issue(&self.dir, &id, pki::LEAF_VALIDITY, false).expect("issue node certificate");
        }
        paths
    }

    /// The certificate of operator `name` with `role`, issued on first use.
    pub fn operator(&self, name: &str, role: Role) -> CertPaths {
        let id = Identity::Operator { name: name.into(), role };
        let paths = pki::leaf_paths(&self.dir, &id);
        if !paths.cert.exists() {
            pki::issue(&self.dir, &id, pki::LEAF_VALIDITY, false).expect("issue operator certificate");
        }
        paths
    }

    /// The admin operator certificate `ca init` wrote.
    pub fn admin(&self) -> CertPaths {
        pki::leaf_paths(&self.dir, &Identity::Operator { name: "admin".into(), role: Role::Admin })
    }

    pub fn controller(&self) -> CertPaths {
        pki::leaf_paths(&self.dir, &Identity::Controller)
    }
}

/// A child process whose stderr goes to a log file; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn_logged(cmd: Command, log: &Path) -> Self {
        Self::spawn(cmd, log)
    }

    fn spawn(mut cmd: Command, log: &Path) -> Self {
        let file = fs::OpenOptions::new().create(true).append(true).open(log).expect("open log");
        let out = file.try_clone().expect("clone log handle");
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(file)).stdin(Stdio::null());
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Self { child, log: log.to_owned() }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        eventually(&format!("{needle:?} in {}", self.log.display()), |last| {
            let text = self.log_text();
            if text.contains(needle) {
                return Some(());
            }
            *last = text.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            None
        });
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for exit (SIGKILL after the patience runs out).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("reap");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP: the process keeps its connections open but goes silent, as a
    /// partitioned host does.
    pub fn pause(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            self.kill9();
        }
    }
}

#[allow(unsafe_code)]
fn signal(pid: u32, sig: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A controller process plus what is needed to restart it on the same port.
#[derive(Debug)]
pub struct Controller {
    pub proc: Proc,
    pub addr: String,
    /// The HTTPS /metrics address, when started with metrics.
    pub metrics_addr: Option<String>,
    pub data_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Controller {
    /// Starts a controller on a free loopback port with a store in `dir/controller`.
    pub fn start(dir: &Path, pki: &Pki) -> Self {
        Self::start_with(dir, pki, false)
    }

    /// Starts a controller that also serves /metrics on a free loopback port.
    pub fn start_with_metrics(dir: &Path, pki: &Pki) -> Self {
        Self::start_with(dir, pki, true)
    }

    /// Starts a controller with `config_toml` as its config file (e.g. an
    /// `[alerting]` section), on a free loopback port with a store in `dir/controller`.
    pub fn start_configured(dir: &Path, pki: &Pki, config_toml: &str) -> Self {
        let path = dir.join("controller.toml");
        fs::write(&path, config_toml).expect("write controller config");
        Self::start_with_args(dir, pki, false, &["--config".to_owned(), path.display().to_string()])
    }

    fn start_with(dir: &Path, pki: &Pki, metrics: bool) -> Self {
        Self::start_with_args(dir, pki, metrics, &[])
    }

    fn start_with_args(dir: &Path, pki: &Pki, metrics: bool, extra: &[String]) -> Self {
        let data_dir = dir.join("controller");
        let c = pki.controller();
        let args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--ca".into(),
            pki.ca().display().to_string(),
            "--cert".into(),
            c.cert.display().to_string(),
            "--key".into(),
            c.key.display().to_string(),
        ];
        let mut args = args;
        if metrics {
            args.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
        }
        args.extend(extra.iter().cloned());
        let log = dir.join("controller.log");
        let proc = Self::spawn_with(&args, "127.0.0.1:0", &log);
        let line = eventually("the controller to listen", |last| {
            let text = proc.log_text();
            *last = text.lines().last().unwrap_or_default().to_owned();
            text.lines().find(|l| l.contains("controller listening")).map(str::to_owned)
        });
        let field = |name: &str| {
            line.split(&format!("{name}=")).nth(1).and_then(|rest| rest.split_whitespace().next()).map(str::to_owned)
        };
        let addr = field("local_addr").expect("local_addr in the listening line");
        let metrics_addr = field("metrics_addr").filter(|a| a != "off");
        Self { proc, addr, metrics_addr, data_dir, args, log }
    }

    fn spawn_with(args: &[String], listen: &str, log: &Path) -> Proc {
        let mut cmd = Command::new(bin("flotilla-controller"));
        cmd.args(args).args(["--listen", listen]);
        Proc::spawn(cmd, log)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Starts the controller again on the same port and store (after a kill).
    pub fn restart(&mut self) {
        assert!(!self.proc.running(), "restart needs the old process gone");
        let before = self.proc.log_text().matches("controller listening").count();
        self.proc = Self::spawn_with(&self.args, &self.addr, &self.log);
        let proc = &self.proc;
        eventually("the restarted controller to listen", |last| {
            let text = proc.log_text();
            *last = text.lines().last().unwrap_or_default().to_owned();
            (text.matches("controller listening").count() > before).then_some(())
        });
    }
}

/// Options of one agent process.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    pub gpus: u32,
    pub interval: &'static str,
    pub claim: Option<String>,
    pub cert: Option<CertPaths>,
    /// Extra agent config (TOML), passed with --config.
    pub config_toml: Option<String>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        Self { gpus: 4, interval: "200ms", claim: None, cert: None, config_toml: None }
    }
}

/// An agent process.
#[derive(Debug)]
pub struct Agent {
    pub proc: Proc,
    pub node: String,
    pub ack_log: PathBuf,
    cmd_args: Vec<String>,
    log: PathBuf,
}

impl Agent {
    /// Starts an agent for `node` with state in `dir/agents/NODE`.
    pub fn start(dir: &Path, pki: &Pki, controller: &str, node: &str, opts: AgentOpts) -> Self {
        let cert = opts.cert.clone().unwrap_or_else(|| pki.node(node));
        let state = dir.join("agents").join(node);
        fs::create_dir_all(&state).expect("agent dir");
        let ack_log = state.join("acks.log");
        let mut args: Vec<String> = vec![
            "--controller".into(),
            controller.into(),
            "--ca".into(),
            pki.ca().display().to_string(),
            "--cert".into(),
            cert.cert.display().to_string(),
            "--key".into(),
            cert.key.display().to_string(),
            "--data-dir".into(),
            state.display().to_string(),
            "--interval".into(),
            opts.interval.into(),
            "--gpu-source".into(),
            "simulated".into(),
            "--simulated-gpus".into(),
            opts.gpus.to_string(),
            "--ack-log".into(),
            ack_log.display().to_string(),
        ];
        if let Some(toml) = &opts.config_toml {
            let path = state.join("agent.toml");
            fs::write(&path, toml).expect("write agent config");
            args.extend(["--config".into(), path.display().to_string()]);
        }
        if let Some(claim) = &opts.claim {
            args.extend(["--node-id".into(), claim.clone()]);
        }
        let log = dir.join(format!("agent-{node}.log"));
        let proc = Self::spawn_with(&args, &log);
        Self { proc, node: node.to_owned(), ack_log, cmd_args: args, log }
    }

    fn spawn_with(args: &[String], log: &Path) -> Proc {
        let mut cmd = Command::new(bin("flotilla-agent"));
        cmd.args(args);
        Proc::spawn(cmd, log)
    }

    /// Starts the same agent again (same identity, same state dir).
    pub fn restart(&mut self) {
        assert!(!self.proc.running(), "restart needs the old process gone");
        self.proc = Self::spawn_with(&self.cmd_args, &self.log);
    }

    /// Every seq the controller acknowledged to this agent so far.
    pub fn acked(&self) -> Vec<u64> {
        fs::read_to_string(&self.ack_log).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

/// Runs flotctl with the connection flags of `pki`'s admin and `controller`.
pub fn flotctl(pki: &Pki, controller: &str, args: &[&str]) -> Output {
    let admin = pki.admin();
    flotctl_as(&pki.ca(), &admin, controller, args)
}

/// Runs flotctl with an explicit client certificate.
pub fn flotctl_as(ca: &Path, cert: &CertPaths, controller: &str, args: &[&str]) -> Output {
    flotctl_command(ca, cert, controller, args).output().expect("run flotctl")
}

/// The flotctl command [`flotctl_as`] runs, to spawn it instead (e.g. `--watch`).
pub fn flotctl_command(ca: &Path, cert: &CertPaths, controller: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("flotctl"));
    cmd.args(["--controller", controller])
        .arg("--cacert")
        .arg(ca)
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        // Never read or write the developer's own flotctl config.
        .arg("--config")
        .arg(std::env::temp_dir().join(format!("flotctl-test-{}.toml", std::process::id())))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// A command's stdout as JSON; a test failure showing stdout and stderr if it is not.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

/// `flotctl nodes ls -o json`, parsed; `Err` carries stderr.
pub fn nodes(pki: &Pki, controller: &str) -> Result<Vec<serde_json::Value>, String> {
    let out = flotctl(pki, controller, &["nodes", "ls", "-o", "json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("bad JSON: {e}"))
}

/// The state of `node` in `nodes`, if listed.
pub fn state_of(nodes: &[serde_json::Value], node: &str) -> Option<String> {
    nodes.iter().find(|n| n["id"] == node).and_then(|n| n["state"].as_str()).map(str::to_owned)
}

/// Waits until `node` is listed in `state`.
pub fn wait_state(pki: &Pki, controller: &str, node: &str, state: &str) -> Vec<serde_json::Value> {
    eventually(&format!("{node} to be {state}"), |last| {
        match nodes(pki, controller) {
            Ok(list) if state_of(&list, node).as_deref() == Some(state) => return Some(list),
            Ok(list) => *last = format!("{node} is {:?}", state_of(&list, node)),
            Err(e) => *last = e,
        }
        None
    })
}

/// Writes `bytes` to a fresh TCP connection to `addr` and reads until the peer closes.
pub fn send_garbage(addr: &str, bytes: &[u8]) {
    if let Ok(mut s) = std::net::TcpStream::connect(addr) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(bytes);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for test servers
/// that cannot report the port they chose).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// A plain HTTP/1.0 GET to `addr`; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    Ok(split_response(&raw))
}

fn split_response(raw: &str) -> (u16, String) {
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// An HTTPS GET with a client certificate (mTLS); returns (status, body).
pub fn https_get(addr: &str, path: &str, ca: &Path, cert: &CertPaths) -> std::io::Result<(u16, String)> {
    flotilla_common::tls::install_crypto_provider();
    let files = flotilla_common::tls::TlsFiles { ca: ca.to_owned(), cert: cert.cert.clone(), key: cert.key.clone() };
    let mut config = (*files.client_config().map_err(std::io::Error::other)?).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(std::io::Error::other)?;
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // Servers may close without close_notify; what arrived is complete (Connection: close).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&raw);
    let (status, body) = split_response(&text);
    Ok((status, dechunk(&text, body)))
}

/// Undoes `Transfer-Encoding: chunked` when the response used it.
fn dechunk(raw: &str, body: String) -> String {
    let chunked = raw
        .split_once("\r\n\r\n")
        .is_some_and(|(head, _)| head.to_ascii_lowercase().contains("transfer-encoding: chunked"));
    if !chunked {
        return body;
    }
    let mut out = String::new();
    let mut rest = body.as_str();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the series of `name` whose labels include every `want` pair.
pub fn metric_value(body: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, labels) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l));
        if n != name {
            return None;
        }
        let all = want.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")));
        if all { value.parse().ok() } else { None }
    })
}

/// Polls like [`eventually`], with an explicit hang guard.
pub fn eventually_within<T>(patience: Duration, what: &str, mut probe: impl FnMut(&mut String) -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    let mut last = String::new();
    loop {
        if let Some(v) = probe(&mut last) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last observation: {last}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A stand-in inference server for tests (never shipped): serves a fixed
/// vLLM-style `/metrics` page, `/v1/models` and `/health` on a loopback port
/// from a thread, until the process ends.
pub fn serve_inference_fixture(metrics_page: String) -> String {
    serve_inference(move || metrics_page.clone())
}

/// [`serve_inference_fixture`] with a page made afresh for every scrape (a
/// simulated load: counters that grow with time).
pub fn serve_inference(page: impl Fn() -> String + Send + 'static) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind stand-in server");
    let addr = listener.local_addr().expect("address").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", page()),
                "/v1/models" => {
                    ("200 OK", r#"{"object":"list","data":[{"id":"llama-3-8b","object":"model"}]}"#.to_owned())
                }
                "/health" => ("200 OK", String::new()),
                _ => ("404 Not Found", String::new()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

/// The text of a metrics fixture in `tests/fixtures/metrics/`.
pub fn metrics_fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/metrics").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tag of the stand-in model server's image; see [`standin_image`].
pub const STANDIN_IMAGE: &str = "flotilla-standin:test";

/// The label on the stand-in image holding a fingerprint of the binary inside, so
/// a rebuilt binary gets a rebuilt image and an unchanged one is reused.
const STANDIN_DIGEST_LABEL: &str = "flotilla.standin.digest";

/// Builds `flotilla-standin:test` (once per test process, and only when the binary
/// changed) and returns its tag. No registry is reachable, so the image is made by
/// `docker import` of a tarball: the `flotilla-standin` binary built beside the
/// tests, plus the shared libraries `ldd` lists for it (glibc, libgcc_s, the
/// loader) at their absolute paths. It listens on `0.0.0.0:8000` in the container.
pub fn standin_image() -> String {
    static BUILT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_standin_image).clone()
}

fn build_standin_image() -> String {
    let binary = bin("flotilla-standin");
    let digest = format!("{:016x}", fnv1a(&fs::read(&binary).expect("read the stand-in binary")));
    if standin_digest().as_deref() == Some(digest.as_str()) {
        return STANDIN_IMAGE.to_owned();
    }
    // nextest runs each test in its own process, and they share one engine: one
    // process builds while the others wait on the lock, then find the image built.
    let lock_path = std::env::temp_dir().join("flotilla-standin-image.lock");
    let lock = fs::File::create(&lock_path).expect("create the image build lock");
    lock.lock().expect("take the image build lock");
    if standin_digest().as_deref() == Some(digest.as_str()) {
        return STANDIN_IMAGE.to_owned();
    }
    let dir = tempfile::tempdir().expect("temp dir for the image");
    let root = dir.path().join("rootfs");
    fs::create_dir_all(&root).expect("rootfs dir");
    fs::copy(&binary, root.join("flotilla-standin")).expect("copy the stand-in binary");
    for lib in shared_libraries(&binary) {
        let target = root.join(lib.strip_prefix("/").expect("ldd paths are absolute"));
        fs::create_dir_all(target.parent().expect("a library path has a directory")).expect("library dir");
        // fs::copy follows symlinks: the image gets the file, at the path the loader asks for.
        fs::copy(&lib, &target).unwrap_or_else(|e| panic!("copy {}: {e}", lib.display()));
    }
    let replaced = image_id(STANDIN_IMAGE);
    let tarball = dir.path().join("rootfs.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
            .arg(&tarball)
            .arg("."),
    );
    run_ok(
        Command::new("docker")
            .arg("import")
            .args(["--change", r#"ENTRYPOINT ["/flotilla-standin"]"#])
            .args(["--change", "ENV STANDIN_LISTEN=0.0.0.0:8000"])
            .args(["--change", "EXPOSE 8000"])
            .args(["--change", &format!("LABEL {STANDIN_DIGEST_LABEL}={digest}")])
            .arg(&tarball)
            .arg(STANDIN_IMAGE),
    );
    // The image the tag pointed at is now untagged; drop it unless a container
    // still uses it (the engine refuses that, which is fine).
    if let Some(old) = replaced.filter(|old| image_id(STANDIN_IMAGE).as_ref() != Some(old)) {
        let _ = Command::new("docker").args(["image", "rm", &old]).output();
    }
    let help = run_ok(Command::new("docker").args(["run", "--rm", STANDIN_IMAGE, "--help"]));
    assert!(String::from_utf8_lossy(&help.stdout).contains("stand-in"), "the image runs the stand-in");
    drop(lock);
    STANDIN_IMAGE.to_owned()
}

/// The binary fingerprint on the current stand-in image, if there is one.
fn standin_digest() -> Option<String> {
    let format = format!("{{{{index .Config.Labels \"{STANDIN_DIGEST_LABEL}\"}}}}");
    let out = Command::new("docker").args(["image", "inspect", "--format", &format, STANDIN_IMAGE]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The engine's id of `image`, if present.
fn image_id(image: &str) -> Option<String> {
    let out = Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", image]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The absolute paths of the shared libraries and the loader `ldd` lists for `binary`.
pub(crate) fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = run_ok(Command::new("ldd").arg(binary));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)";
            // linux-vdso has no file and is skipped.
            let path = line.split_once("=>").map_or(line, |(_, p)| p).split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

pub(crate) fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A container name no other test (or earlier run) uses: `flotilla-test-WHAT-RANDOM`.
/// Also a valid deployment name.
pub fn unique_container_name(what: &str) -> String {
    format!("flotilla-test-{what}-{:08x}", rand::random::<u32>())
}

/// Force-removes the named containers when dropped, so a failed test leaves
/// nothing running on the engine.
#[derive(Debug, Default)]
pub struct ContainerCleanup {
    names: Vec<String>,
}

impl ContainerCleanup {
    /// Removes `names` when dropped.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self { names: names.into_iter().map(Into::into).collect() }
    }

    /// Adds a container to remove.
    pub fn add(&mut self, name: impl Into<String>) {
        self.names.push(name.into());
    }
}

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A webhook receiver for tests: accepts HTTP/1.1 POSTs on a loopback port from a
/// thread, answers 200, and keeps every JSON body it got.
#[derive(Debug, Clone)]
pub struct WebhookSink {
    pub url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl WebhookSink {
    /// Starts listening on 127.0.0.1; `path` is the path of the URL it reports.
    pub fn start(path: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind webhook sink");
        let url = format!("http://{}{path}", listener.local_addr().expect("address"));
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let keep = keep.clone();
                std::thread::spawn(move || serve_webhook(stream, &keep));
            }
        });
        Self { url, bodies }
    }

    /// Every body received so far.
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Serves the requests of one connection (keep-alive), recording JSON bodies.
fn serve_webhook(stream: std::net::TcpStream, keep: &std::sync::Mutex<Vec<serde_json::Value>>) {
    use std::io::BufRead;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = std::io::BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if first && line.trim().is_empty() {
                continue;
            }
            first = false;
            if line == "\r\n" || line == "\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.trim().eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(v) = serde_json::from_slice(&body) {
            keep.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(v);
        }
        if writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

/// A real Alertmanager (Debian package `prometheus-alertmanager`, installed by
/// `./x test`) on a loopback port, routing every alert to `webhook` with resolved
/// notifications, grouping by alert. Killed when dropped.
#[derive(Debug)]
pub struct Alertmanager {
    pub proc: Proc,
    pub addr: String,
}

impl Alertmanager {
    pub fn start(dir: &Path, webhook: &str) -> Self {
        let binary = ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("Alertmanager is missing: install the Debian package prometheus-alertmanager (./x test does)");
        let config = dir.join("alertmanager.yml");
        fs::write(
            &config,
            format!(
                "route:\n  receiver: hook\n  group_by: [alertname, node]\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n      - url: {webhook}\n        send_resolved: true\n"
            ),
        )
        .expect("write alertmanager config");
        let storage = dir.join("alertmanager-data");
        fs::create_dir_all(&storage).expect("alertmanager storage dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", storage.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--cluster.listen-address=");
        let proc = Proc::spawn_logged(cmd, &dir.join("alertmanager.log"));
        let am = Self { proc, addr };
        eventually("Alertmanager to be ready", |last| {
            let r = http_get(&am.addr, "/-/ready");
            *last = format!("{r:?}");
            matches!(r, Ok((200, _))).then_some(())
        });
        am
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The alerts Alertmanager holds (`GET /api/v2/alerts`).
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        match http_get(&self.addr, "/api/v2/alerts") {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

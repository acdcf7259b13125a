//! Fleets on the Docker engine: the controller and agents as containers on a
//! private network of their own, so that a test can cut a node off
//! (`docker network disconnect`), kill the controller with SIGKILL, fill its
//! disk or skew an agent's clock. Test equipment, never shipped.
//!
//! No registry is reachable, so the image is made here with `docker import`: a
//! root filesystem with the dynamic loader and the shared libraries `ldd` lists
//! for the debug binaries, the CA certificates, a static busybox (`df`, `dd`,
//! `rm`, `cat` inside the containers) and libfaketime (a skewed clock through
//! `LD_PRELOAD`). It is tagged by a hash of its files, so later runs reuse it.
//! The binaries are bind-mounted read-only from `target/<profile>/`: the image
//! stays a few MB and a rebuilt binary needs no new image.
//!
//! Everything a cluster creates is named `flotilla-ft-SECS-RAND…` (SECS: when,
//! in hex): [`Cluster`]'s `Drop` removes its containers (and the model
//! containers its agents started, named with its prefix) and its network, even
//! when the test failed, and every start removes what a killed test run left
//! behind more than an hour ago.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use flotilla_common::pki::{self, CertPaths};
use flotilla_common::{Identity, NodeId};

use crate::{Pki, bin, eventually_within, fnv1a, run_ok, shared_libraries};

/// What every name a cluster creates starts with.
pub const PREFIX: &str = "flotilla-ft";
/// The image repository; the tag is a hash of the image's files.
const IMAGE_REPO: &str = "flotilla-ft-runtime";
/// The controller's gRPC port inside its container (published on 127.0.0.1).
const GRPC_PORT: u16 = 7443;
/// The controller's HTTPS /metrics, /healthz port inside its container.
const METRICS_PORT: u16 = 9443;
/// The name agents dial the controller by (a network alias; in its certificate).
const CONTROLLER_HOST: &str = "controller";
/// libfaketime, as the Debian package `libfaketime` installs it.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// A static busybox, as the Debian package `busybox-static` installs it.
const BUSYBOX: &str = "/bin/busybox";
/// Where binaries are mounted in the containers.
const BIN_DIR: &str = "/usr/local/bin";
/// How long a cluster waits for a container to come up: a hang guard.
const PATIENCE: Duration = Duration::from_secs(60);

/// Whether a Docker engine answers. Tests skip (with a message) only when not.
pub fn docker_available() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `docker ARGS`; the output whatever the status.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).stdin(Stdio::null()).output().expect("run docker")
}

/// Runs `docker ARGS` and fails the test unless it succeeds; its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builds the runtime image once per machine (per content) and returns its tag.
pub fn runtime_image() -> String {
    static BUILT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_runtime_image).clone()
}

/// The files of the image: (path in the image, file on this machine).
fn image_files() -> Vec<(PathBuf, PathBuf)> {
    for (tool, package) in [(LIBFAKETIME, "libfaketime"), (BUSYBOX, "busybox-static")] {
        assert!(Path::new(tool).exists(), "{tool} is missing: install the Debian package {package} (./x test does)");
    }
    let mut host: Vec<PathBuf> = Vec::new();
    for binary in [bin("flotilla-controller"), bin("flotilla-agent"), PathBuf::from(LIBFAKETIME)] {
        host.extend(shared_libraries(&binary));
    }
    host.push(PathBuf::from(LIBFAKETIME));
    host.push(PathBuf::from(BUSYBOX));
    let certs = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    if certs.exists() {
        host.push(certs);
    }
    host.sort();
    host.dedup();
    host.into_iter().map(|p| (p.strip_prefix("/").expect("absolute paths").to_owned(), p)).collect()
}

fn build_runtime_image() -> String {
    let files = image_files();
    let mut hash = fnv1a(b"flotilla-ft-runtime v1");
    for (inside, host) in &files {
        let bytes = fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display()));
        hash ^= fnv1a(inside.to_string_lossy().as_bytes()).rotate_left(7) ^ fnv1a(&bytes);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let tag = format!("{IMAGE_REPO}:{hash:016x}");
    let present = || docker(&["image", "inspect", "--format", "{{.Id}}", &tag]).status.success();
    if present() {
        return tag;
    }
    // Tests run in parallel processes against one engine: one builds, the others
    // wait on the lock and then find the image.
    let lock = fs::File::create(std::env::temp_dir().join("flotilla-ft-image.lock")).expect("create the image lock");
    lock.lock().expect("take the image lock");
    if present() {
        return tag;
    }
    let dir = tempfile::tempdir().expect("temp dir for the image");
    let root = dir.path().join("rootfs");
    for sub in ["tmp", "data", "state", "pki", "etc", "usr/local/bin"] {
        fs::create_dir_all(root.join(sub)).expect("image dir");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).expect("chmod /tmp");
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/busybox\n").expect("write /etc/passwd");
    for (inside, host) in &files {
        let target = root.join(inside);
        fs::create_dir_all(target.parent().expect("a file path has a directory")).expect("library dir");
        // fs::copy follows symlinks: the image gets the file at the path the loader asks for.
        fs::copy(host, &target).unwrap_or_else(|e| panic!("copy {}: {e}", host.display()));
    }
    let tarball = dir.path().join("rootfs.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
            .arg(&tarball)
            .arg("."),
    );
    run_ok(Command::new("docker").args(["import", "--change", "ENV PATH=/usr/local/bin:/bin"]).arg(&tarball).arg(&tag));
    let stale: Vec<String> = docker_ok(&["image", "ls", IMAGE_REPO, "--format", "{{.Repository}}:{{.Tag}}"])
        .lines()
        .filter(|t| *t != tag)
        .map(str::to_owned)
        .collect();
    for old in stale {
        // Refused while a container of another run uses it, which is fine.
        let _ = docker(&["image", "rm", &old]);
    }
    drop(lock);
    tag
}

/// Removes what test runs killed before their `Drop` left behind: every
/// container and network named `flotilla-ft-SECS-…` with SECS over an hour ago.
fn sweep_stale() {
    let now = now_secs();
    let old = |name: &str| {
        let secs = name.strip_prefix(&format!("{PREFIX}-")).and_then(|rest| rest.split('-').next());
        secs.and_then(|s| u64::from_str_radix(s, 16).ok()).is_some_and(|t| t + 3600 < now)
    };
    let containers = docker_ok(&["ps", "-a", "--filter", &format!("name={PREFIX}-"), "--format", "{{.Names}}"]);
    for name in containers.lines().filter(|n| old(n)) {
        let _ = docker(&["rm", "-f", "-v", name]);
    }
    let networks = docker_ok(&["network", "ls", "--filter", &format!("name={PREFIX}-"), "--format", "{{.Name}}"]);
    for name in networks.lines().filter(|n| old(n)) {
        let _ = docker(&["network", "rm", name]);
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How the controller container runs.
#[derive(Debug, Clone, Default)]
pub struct ControllerOpts {
    /// The controller's config file (TOML), if any.
    pub config_toml: Option<String>,
    /// Put the data dir on a tmpfs of this size (e.g. `"48m"`) instead of a
    /// host directory; the store can then not be read from the host.
    pub data_tmpfs: Option<String>,
}

/// One agent container.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    pub node: String,
    /// The collection interval (and so the heartbeat interval, unless the extra
    /// config sets `heartbeat_interval`).
    pub interval: String,
    pub gpus: u32,
    /// Mount the engine's socket, so that the agent can run model containers
    /// (named with this cluster's prefix).
    pub docker_socket: bool,
    /// Run the agent under libfaketime with this `FAKETIME` (e.g. `"+10m"`): its
    /// wall clock is off by that much; monotonic time is left alone.
    pub faketime: Option<String>,
    /// Give the agent a network of its own, whose gateway (an address of this
    /// host) becomes its `address` label: the replicas a rollout starts on it are
    /// published there, where this host's nginx and the agent both reach them.
    pub own_address: bool,
    /// `uplink.ack_timeout`: how long a sent batch may wait for its ack before
    /// the agent reconnects and resends (the agent's default when `None`).
    pub ack_timeout: Option<String>,
    /// Appended to the agent's config file (top-level keys first in it); it must
    /// not repeat the tables the cluster writes (`tls`, `gpu`, `uplink`, `runtime`).
    pub extra_toml: String,
}

impl AgentOpts {
    /// An agent with two simulated GPUs at a 200 ms interval.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            interval: "200ms".to_owned(),
            gpus: 2,
            docker_socket: false,
            faketime: None,
            own_address: false,
            ack_timeout: None,
            extra_toml: String::new(),
        }
    }
}

/// A controller and agents in containers on a private network; removed on drop.
#[derive(Debug)]
pub struct Cluster {
    /// `flotilla-ft-SECS-RAND`: the network's name and every container's prefix.
    pub id: String,
    /// Host directory with the PKI, the controller's data and each agent's state.
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    controller_opts: ControllerOpts,
    /// The host ports the controller's gRPC and metrics ports are published on
    /// (127.0.0.1), fixed so that a restarted container keeps its address.
    grpc_port: u16,
    metrics_port: u16,
}

impl Cluster {
    /// Creates the network and starts the controller; waits until it listens.
    pub fn start(opts: ControllerOpts) -> Self {
        let image = runtime_image();
        sweep_stale();
        let id = format!("{PREFIX}-{:x}-{:06x}", now_secs(), rand::random::<u32>() & 0xff_ffff);
        let dir = tempfile::tempdir().expect("cluster dir");
        let pki = Pki::new(&dir.path().join("pki"));
        let sans: Vec<String> = [CONTROLLER_HOST, "localhost", "127.0.0.1"].iter().map(|s| (*s).to_owned()).collect();
        pki::issue_controller(&pki.dir, &sans, pki::LEAF_VALIDITY).expect("reissue the controller certificate");
        let (grpc_port, metrics_port) = (crate::free_port(), crate::free_port());
        let mut cluster = Self { id, dir, pki, controller_opts: opts, grpc_port, metrics_port };
        docker_ok(&["network", "create", "--label", "flotilla.ft=1", &cluster.id]);
        // A port found free may be taken before the engine binds it: try others.
        for attempt in 1.. {
            let out = cluster.run_controller(&image);
            if out.status.success() {
                break;
            }
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(attempt < 3 && said.contains("already"), "docker run (the controller) failed: {said}");
            let _ = docker(&["rm", "-f", &cluster.controller()]);
            (cluster.grpc_port, cluster.metrics_port) = (crate::free_port(), crate::free_port());
        }
        cluster.wait_listening(0);
        cluster
    }

    /// The controller container's name.
    pub fn controller(&self) -> String {
        format!("{}-controller", self.id)
    }

    /// The container name of `node`'s agent.
    pub fn agent(&self, node: &str) -> String {
        format!("{}-{node}", self.id)
    }

    /// The controller's data dir on this machine (not with `data_tmpfs`).
    pub fn controller_data(&self) -> PathBuf {
        self.dir.path().join("controller")
    }

    /// `node`'s state dir on this machine (its disk buffer, seq, ack log).
    pub fn agent_state(&self, node: &str) -> PathBuf {
        self.dir.path().join("agents").join(node)
    }

    /// The engine name prefix `node`'s agent gives the model containers it runs.
    pub fn model_prefix(&self, node: &str) -> String {
        format!("{}-{node}-", self.id)
    }

    fn pki_path(&self, host: &Path) -> String {
        let rel = host.strip_prefix(&self.pki.dir).expect("a file of the PKI");
        format!("/pki/{}", rel.display())
    }

    /// `docker run` of the controller; its output (the caller checks it).
    fn run_controller(&self, image: &str) -> Output {
        let data = self.controller_data();
        fs::create_dir_all(&data).expect("controller data dir");
        let c = self.pki.controller();
        let bin_mount = format!("{}:{BIN_DIR}/flotilla-controller:ro", bin("flotilla-controller").display());
        let pki_mount = format!("{}:/pki:ro", self.pki.dir.display());
        let name = self.controller();
        let grpc = format!("127.0.0.1:{}:{GRPC_PORT}", self.grpc_port);
        let metrics = format!("127.0.0.1:{}:{METRICS_PORT}", self.metrics_port);
        let mut args =
            strings(&["run", "-d", "--name", &name, "--hostname", CONTROLLER_HOST, "--label", "flotilla.ft=1"]);
        args.extend(strings(&["--network", &self.id, "--network-alias", CONTROLLER_HOST, "-p", &grpc, "-p", &metrics]));
        args.extend(strings(&["-v", &bin_mount, "-v", &pki_mount, "-e", "RUST_LOG=info", "-e", "NO_COLOR=1"]));
        match &self.controller_opts.data_tmpfs {
            Some(size) => args.extend(["--tmpfs".to_owned(), format!("/data:rw,size={size}")]),
            None => args.extend(["-v".to_owned(), format!("{}:/data", data.display())]),
        }
        let mut cmd: Vec<String> = vec![
            image.to_owned(),
            format!("{BIN_DIR}/flotilla-controller"),
            "--listen".into(),
            format!("0.0.0.0:{GRPC_PORT}"),
            "--metrics-listen".into(),
            format!("0.0.0.0:{METRICS_PORT}"),
            "--data-dir".into(),
            "/data".into(),
            "--ca".into(),
            self.pki_path(&self.pki.ca()),
            "--cert".into(),
            self.pki_path(&c.cert),
            "--key".into(),
            self.pki_path(&c.key),
        ];
        if let Some(toml) = &self.controller_opts.config_toml {
            let path = self.dir.path().join("controller.toml");
            fs::write(&path, toml).expect("write the controller config");
            args.extend(["-v".to_owned(), format!("{}:/etc/controller.toml:ro", path.display())]);
            cmd.extend(["--config".to_owned(), "/etc/controller.toml".to_owned()]);
        }
        args.extend(cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)
    }

    /// Waits until the controller's log says "controller listening" more than `before` times.
    fn wait_listening(&self, before: usize) {
        let name = self.controller();
        eventually_within(PATIENCE, "the controller to listen", |last| {
            let logs = self.logs(&name);
            if !self.running(&name) {
                panic!("the controller container exited: {logs}");
            }
            *last = logs.lines().last().unwrap_or_default().to_owned();
            (logs.matches("controller listening").count() > before).then_some(())
        });
    }

    /// Starts an agent container and waits until the controller lists it
    /// connected (up, or degraded); returns its entry in `nodes ls`.
    pub fn start_agent(&self, opts: AgentOpts) -> serde_json::Value {
        let image = runtime_image();
        let node = &opts.node;
        let state = self.agent_state(node);
        fs::create_dir_all(&state).expect("agent state dir");
        let cert = self.pki.node(node);
        let key_line = match self.command_key() {
            Some(key) => {
                fs::write(state.join("command-signing.pub"), key).expect("write the pinned command key");
                "command_key = \"/state/command-signing.pub\"\n"
            }
            None => "",
        };
        let (top, mut tables) = split_toml(&opts.extra_toml);
        let own_network = opts.own_address.then(|| {
            let net = format!("{}-{node}-net", self.id);
            docker_ok(&["network", "create", "--label", "flotilla.ft=1", &net]);
            let gateway =
                docker_ok(&["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Gateway}}{{end}}", &net]);
            tables.push_str(&format!("[labels]\naddress = \"{gateway}\"\n"));
            net
        });
        let config = format!(
            "controller = \"https://{CONTROLLER_HOST}:{GRPC_PORT}\"\n\
             data_dir = \"/state\"\n\
             interval = \"{interval}\"\n\
             {key_line}{top}\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [gpu]\nsource = \"simulated\"\nsimulated_count = {gpus}\n\
             [uplink]\nack_log = \"/state/acks.log\"\nbackoff_max = \"2s\"\n{ack_timeout}\
             [runtime]\nname_prefix = \"{prefix}\"\nrelist_interval = \"1s\"\n\
             {tables}",
            interval = opts.interval,
            ca = self.pki_path(&self.pki.ca()),
            cert = self.pki_path(&cert.cert),
            key = self.pki_path(&cert.key),
            gpus = opts.gpus,
            prefix = self.model_prefix(node),
            ack_timeout = opts.ack_timeout.as_ref().map(|t| format!("ack_timeout = \"{t}\"\n")).unwrap_or_default(),
        );
        fs::write(state.join("agent.toml"), config).expect("write the agent config");
        let name = self.agent(node);
        let mounts = [
            format!("{}:{BIN_DIR}/flotilla-agent:ro", bin("flotilla-agent").display()),
            format!("{}:/pki:ro", self.pki.dir.display()),
            format!("{}:/state", state.display()),
        ];
        let mut args = strings(&["run", "-d", "--name", &name, "--hostname", node, "--network", &self.id]);
        args.extend(strings(&["--label", "flotilla.ft=1", "-e", "RUST_LOG=info", "-e", "NO_COLOR=1"]));
        for m in mounts {
            args.extend(["-v".to_owned(), m]);
        }
        if opts.docker_socket {
            args.extend(["-v".to_owned(), "/var/run/docker.sock:/var/run/docker.sock".to_owned()]);
        }
        if let Some(offset) = &opts.faketime {
            for env in [
                format!("LD_PRELOAD={LIBFAKETIME}"),
                format!("FAKETIME={offset}"),
                // Timers and timeouts run on the monotonic clock: leave it true.
                "FAKETIME_DONT_FAKE_MONOTONIC=1".to_owned(),
                "FAKETIME_NO_CACHE=1".to_owned(),
            ] {
                args.extend(["-e".to_owned(), env]);
            }
        }
        args.extend([
            image,
            format!("{BIN_DIR}/flotilla-agent"),
            "--config".to_owned(),
            "/state/agent.toml".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&args);
        if let Some(net) = own_network {
            docker_ok(&["network", "connect", &net, &name]);
        }
        eventually_within(PATIENCE, &format!("{node} to connect"), |last| {
            match self.nodes() {
                Ok(list) => {
                    let entry = list.into_iter().find(|n| n["id"] == node.as_str());
                    if entry.as_ref().is_some_and(|n| n["state"] != "down") {
                        return entry;
                    }
                    *last = format!("{node}: {entry:?}; agent log: {}", self.logs(&name));
                }
                Err(e) => *last = e,
            }
            None
        })
    }

    /// The controller's command-signing public key, once it has written it.
    fn command_key(&self) -> Option<Vec<u8>> {
        let out = docker(&["exec", &self.controller(), "busybox", "cat", "/data/command-signing.pub"]);
        out.status.success().then_some(out.stdout)
    }

    /// `https://127.0.0.1:PORT`: the controller's gRPC port, published here.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }

    /// `127.0.0.1:PORT` of the controller's HTTPS /metrics and /healthz.
    pub fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port)
    }

    /// flotctl on this machine as the admin, against the controller.
    pub fn flotctl(&self, args: &[&str]) -> Output {
        crate::flotctl(&self.pki, &self.url(), args)
    }

    /// `flotctl nodes ls -o json`, parsed.
    pub fn nodes(&self) -> Result<Vec<serde_json::Value>, String> {
        crate::nodes(&self.pki, &self.url())
    }

    /// Waits until the controller lists `node` in `state`; returns its entry.
    pub fn wait_state(&self, node: &str, state: &str) -> serde_json::Value {
        eventually_within(PATIENCE, &format!("{node} to be {state}"), |last| {
            match self.nodes() {
                Ok(list) => {
                    let entry = list.into_iter().find(|n| n["id"] == node);
                    if entry.as_ref().is_some_and(|n| n["state"] == state) {
                        return entry;
                    }
                    *last = format!("{node}: {entry:?}");
                }
                Err(e) => *last = e,
            }
            None
        })
    }

    /// A container's log so far (stdout and stderr).
    pub fn logs(&self, container: &str) -> String {
        let out = docker(&["logs", container]);
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text
    }

    /// Waits until `container`'s log contains `needle`.
    pub fn wait_log(&self, container: &str, needle: &str) {
        eventually_within(PATIENCE, &format!("{needle:?} in the log of {container}"), |last| {
            let logs = self.logs(container);
            *last = logs.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            logs.contains(needle).then_some(())
        });
    }

    /// Whether `container` is running.
    pub fn running(&self, container: &str) -> bool {
        let out = docker(&["inspect", "--format", "{{.State.Running}}", container]);
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    /// When `container` last started (the engine's RFC 3339 time): a restart changes it.
    pub fn started_at(&self, container: &str) -> String {
        docker_ok(&["inspect", "--format", "{{.State.StartedAt}}", container])
    }

    /// Cuts `node`'s agent off the network: its connections go silent.
    pub fn partition(&self, node: &str) {
        docker_ok(&["network", "disconnect", &self.id, &self.agent(node)]);
    }

    /// Puts `node`'s agent back on the network.
    pub fn heal(&self, node: &str) {
        docker_ok(&["network", "connect", &self.id, &self.agent(node)]);
    }

    /// SIGKILL to the controller (the container stops with it).
    pub fn kill9_controller(&self) {
        docker_ok(&["kill", "--signal", "KILL", &self.controller()]);
        let name = self.controller();
        eventually_within(PATIENCE, "the killed controller to stop", |_| (!self.running(&name)).then_some(()));
    }

    /// SIGTERM to the controller, and wait until it exits; its exit code.
    pub fn stop_controller(&self) -> i32 {
        docker_ok(&["stop", "--time", "30", &self.controller()]);
        docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.controller()]).parse().unwrap_or(-1)
    }

    /// Starts the stopped controller container again (same store) and waits until it listens.
    pub fn restart_controller(&self) {
        let before = self.logs(&self.controller()).matches("controller listening").count();
        docker_ok(&["start", &self.controller()]);
        self.wait_listening(before);
    }

    /// Every seq the controller acknowledged to `node` (the agent's ack log).
    pub fn acked(&self, node: &str) -> Vec<u64> {
        fs::read_to_string(self.agent_state(node).join("acks.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Waits until `node` has at least `n` acknowledged seqs; returns how many.
    pub fn wait_acks(&self, node: &str, n: usize) -> usize {
        eventually_within(PATIENCE, &format!("{n} acks for {node}"), |last| {
            let got = self.acked(node).len();
            *last = format!("{got} acked");
            (got >= n).then_some(got)
        })
    }

    /// Runs `busybox ARGS` in `container`.
    pub fn busybox(&self, container: &str, args: &[&str]) -> Output {
        let mut all = vec!["exec", container, "busybox"];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// The node's identity certificate (for tests that talk as the node).
    pub fn node_cert(&self, node: &str) -> CertPaths {
        pki::leaf_paths(&self.pki.dir, &Identity::Node(NodeId::new(node).expect("valid node id")))
    }

    /// The `address` label of an agent started with `own_address`.
    pub fn address(&self, node: &str) -> String {
        let net = format!("{}-{node}-net", self.id);
        docker_ok(&["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Gateway}}{{end}}", &net])
    }

    /// The containers this cluster created, and the model containers its agents started.
    fn containers(&self) -> Vec<String> {
        let out = docker(&["ps", "-a", "--filter", &format!("name={}", self.id), "--format", "{{.Names}}"]);
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }
}

impl Drop for Cluster {
    // A test's own output: a container that outlived the cleanup is worth seeing.
    #[allow(clippy::print_stderr)]
    fn drop(&mut self) {
        let names = self.containers();
        if !names.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(names.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let networks = docker(&["network", "ls", "--filter", &format!("name={}", self.id), "--format", "{{.Name}}"]);
        for net in String::from_utf8_lossy(&networks.stdout).lines() {
            let _ = docker(&["network", "rm", net]);
        }
        let left = self.containers();
        if !left.is_empty() {
            eprintln!("cluster {}: containers left after cleanup: {left:?}", self.id);
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// Splits extra TOML into its top-level keys and its tables, so that the keys
/// can go before the first table of the generated file.
fn split_toml(extra: &str) -> (String, String) {
    match extra.find("\n[").map(|i| i + 1).or_else(|| extra.starts_with('[').then_some(0)) {
        Some(i) => (extra[..i].to_owned(), extra[i..].to_owned()),
        None => (extra.to_owned(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::split_toml;

    #[test]
    fn extra_config_is_split_at_its_first_table() {
        assert_eq!(split_toml("a = 1\n"), ("a = 1\n".into(), String::new()));
        assert_eq!(split_toml("a = 1\n[x]\nb = 2\n"), ("a = 1\n".into(), "[x]\nb = 2\n".into()));
        assert_eq!(split_toml("[x]\nb = 2\n"), (String::new(), "[x]\nb = 2\n".into()));
    }
}

//! `flotilla-fleet-sim`: a load benchmark. It starts the real controller binary,
//! opens N simulated agents (one mTLS connection each) that speak the agent
//! protocol, and prints one JSON line of throughput, ack latency and controller
//! cost. It measures; it does not judge.
//!
//! The simulated agents answer signed commands as a real agent does: each
//! envelope is verified against the controller's pinned public key with the
//! agent's own checks before it runs: `noop`, and `deploy`, `drain`, `stop` and
//! `gateway-set` on simulated state (below); anything else fails unexecuted.
//! With `--fanout-noop` the sim also plays an admin operator who sends `noop`
//! to every agent at once, and reports how long the last result takes.
//!
//! With `--rollout` one more agent, `gw-sim`, has the gateway role, every agent
//! runs `deploy`, `drain`, `stop` and `gateway-set` on simulated containers and
//! upstreams (reporting its containers before each result, and each running
//! container's readiness in every batch), and the sim as admin deploys a model
//! over all GPU nodes and then updates it blue-green, with zero bake times, and
//! reports the time, the commands per node and the controller's CPU of each.

// The JSON line on stdout is this tool's product and progress goes to stderr, so
// printing is the point here, not a stray debug aid.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use flotilla_common::command::gateway::MAX_SERVERS;
use flotilla_common::command::{Command, CommandStatus, GatewayWeights};
use flotilla_common::envelope::{CommandId, Envelope, PinnedKey, SignedEnvelope};
use flotilla_common::pki::{self, CaInit};
use flotilla_common::time::now_unix_ms;
use flotilla_common::tls::TlsFiles;
use flotilla_common::{Identity, NodeId, client};
use flotilla_proto::pb::agent_message::Body as Up;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::controller_message::Body as Down;
use flotilla_proto::pb::fleet_client::FleetClient;
use flotilla_proto::{PROTOCOL_VERSION, pb};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

// The binary's root is `fleet_sim.rs`, so its modules are named by path.
#[path = "fleet_sim/dead.rs"]
mod dead;
#[path = "fleet_sim/machine.rs"]
mod machine;
#[path = "fleet_sim/restart.rs"]
mod restart;
#[path = "fleet_sim/soak.rs"]
mod soak;

/// Hang guards, not speed claims.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_PHASE_TIMEOUT: Duration = Duration::from_secs(300);
/// One agent's connect, TLS handshake, hello and welcome; a controller out of file
/// descriptors leaves connections unaccepted in its backlog, so this must be bounded.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Least time given to the acks in flight when the window closes.
const DRAIN: Duration = Duration::from_secs(5);
/// One ExecCommand's hang guard; the controller itself gives up on a noop after
/// its result wait (the envelope's validity plus 30 s).
const EXEC_TIMEOUT: Duration = Duration::from_secs(90);
/// Concurrent calls per operator connection when --fanout-channels is 0: the
/// controller allows 256 concurrent HTTP/2 streams on one connection, and calls
/// beyond that wait client-side for a free stream.
const CALLS_PER_CHANNEL: usize = 200;
/// The extra agent with the gateway role in --rollout mode.
const GATEWAY_NODE: &str = "gw-sim";
/// Most replicas per deployment when --rollout-deployments is 0: a blue-green
/// traffic step lists every old and every new server in one upstream, and the
/// agent accepts at most 64 servers per upstream.
const REPLICAS_PER_DEPLOYMENT: usize = MAX_SERVERS / 2;
/// How often the operator side reads each rollout's status.
const ROLLOUT_POLL: Duration = Duration::from_millis(100);
/// Hang guard for one rollout phase.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(600);
/// The controller's CPU is sampled this long before the first apply, to tell the
/// rollout's cost from the telemetry load's.
const ROLLOUT_BASELINE: Duration = Duration::from_secs(5);
/// Pause between the initial deploy's end and the update.
const ROLLOUT_PAUSE: Duration = Duration::from_secs(2);
/// What the simulated agents count, by command name; anything else is "other".
const KINDS: [&str; 6] = ["deploy", "drain", "stop", "gateway-set", "noop", "other"];

/// Drives the real controller with simulated agents and prints one JSON line.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Simulated agents, each with its own mTLS connection.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// GPUs per agent (samples per batch).
    #[arg(long, default_value_t = 8)]
    gpus_per_agent: u32,
    /// Batch interval of every agent; heartbeats as a real agent sends them (the same, at most 2 s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Measurement window.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time between the last agent connecting and the window opening.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The controller binary (default: `flotilla-controller` beside this executable).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Agents connecting (TLS handshake and hello) at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Alert rule file for the controller (e.g. deploy/rules/default.yml, or one
    /// with GPUHighTemperature at `for: 0s` to measure alert latency).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Agents whose GPU 0 goes to 95 °C at a random moment of the window; the
    /// report gives the time from that batch to GPUHighTemperature firing.
    #[arg(long, default_value_t = 0)]
    hot_agents: usize,
    /// Fan-out benchmark: from the window's start an admin operator sends a signed
    /// `noop` (Fleet.ExecCommand) to every agent at once, --fanout-rounds times;
    /// the report gives the time from the first request to the last result.
    #[arg(long)]
    fanout_noop: bool,
    /// Fan-out rounds.
    #[arg(long, default_value_t = 5)]
    fanout_rounds: usize,
    /// Pause between the end of one fan-out round and the next.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    fanout_pause: Duration,
    /// Operator mTLS connections the fan-out spreads its calls over (0: one per
    /// 200 agents, under the controller's 256 concurrent streams per connection).
    #[arg(long, default_value_t = 0)]
    fanout_channels: usize,
    /// Rollout benchmark: adds the gateway agent `gw-sim`; from the window's start
    /// an admin operator applies a deployment over every GPU node (one replica of
    /// one GPU each, blue-green, steps 10/50/100 %, zero bake and min_healthy_time),
    /// waits for it to succeed, then applies a second revision; the report gives
    /// each phase's time, commands per node and controller CPU.
    #[arg(long)]
    rollout: bool,
    /// Deployments the GPU nodes are split over, applied at once, each with its
    /// own upstream on `gw-sim` (0: as few as keep each at most 32 replicas, so
    /// that a blue-green step's old and new servers fit the gateway's 64).
    #[arg(long, default_value_t = 0)]
    rollout_deployments: usize,
    /// Dead-agent detection: this many agents (the last ones) die at random
    /// moments of the window's first half, alternately killed (stream and
    /// connection dropped at once, as when the process dies) and silenced
    /// (connection kept open, nothing sent); an operator polls ListNodes every
    /// 100 ms and the report gives the time from each death to the node's `down`.
    #[arg(long, default_value_t = 0)]
    dead_agents: usize,
    /// After the run, restart the controller on the same store and time it from
    /// the process start to its "controller listening" log line and to the
    /// first agent welcomed.
    #[arg(long)]
    restart: bool,
    /// A TOML file the controller's config starts with (`[telemetry]` retention
    /// for a soak, `[limits]` or `store_cache_bytes` for a big fleet); --rules
    /// appends an `[alerting]` table, so with it the file must have none.
    #[arg(long)]
    controller_config: Option<PathBuf>,
    /// Writes a CSV row every --sample-every through the window (controller RSS
    /// and CPU, store size on disk, batches acked so far); after the run opens the
    /// store and reports its logical size (keys plus values) and amplification.
    #[arg(long)]
    samples_csv: Option<PathBuf>,
    /// Period of --samples-csv rows.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    sample_every: Duration,
}

impl Args {
    /// The bounds the controller itself enforces, checked before any work.
    fn validate(&self) -> Result<()> {
        if self.agents == 0 || self.connect_concurrency == 0 || self.duration.is_zero() {
            bail!("--agents, --connect-concurrency and --duration must be above zero");
        }
        if self.gpus_per_agent as usize > flotilla_proto::Limits::DEFAULT.max_gpus {
            bail!("--gpus-per-agent is above the controller's limit of 64");
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.interval) {
            bail!("--interval must lie within the controller's 100ms..=60s heartbeat bounds");
        }
        if self.hot_agents + self.dead_agents > self.agents {
            bail!("--hot-agents plus --dead-agents is above --agents");
        }
        if self.sample_every.is_zero() {
            bail!("--sample-every must be above zero");
        }
        if self.hot_agents > 0 && self.rules.is_none() {
            bail!("--hot-agents needs --rules with a GPUHighTemperature rule");
        }
        if self.fanout_noop && self.fanout_rounds == 0 {
            bail!("--fanout-rounds must be above zero");
        }
        if self.rollout && self.fanout_noop {
            bail!("--rollout and --fanout-noop are separate benchmarks: give one");
        }
        if self.rollout_deployments > self.agents {
            bail!("--rollout-deployments is above --agents");
        }
        Ok(())
    }
}

/// The result line; field order is the output order.
#[derive(Debug, serde::Serialize)]
struct Report {
    agents: usize,
    gpus_per_agent: u32,
    interval_ms: u64,
    duration_s: f64,
    batches_acked: usize,
    samples_per_second_acked: f64,
    ack_latency_p50_ms: Option<f64>,
    ack_latency_p99_ms: Option<f64>,
    unacked_at_end: usize,
    controller_cpu_seconds: f64,
    controller_peak_rss_bytes: u64,
    errors: usize,
    agents_connected: usize,
    connect_seconds: f64,
    /// Prometheus samples (one value of one series) per batch, as the controller's
    /// exporter and rules see a batch of this shape; the scale that Prometheus'
    /// and VictoriaMetrics' "samples per second" use.
    values_per_batch: usize,
    values_per_second_acked: f64,
    simulator_cpu_seconds: f64,
    /// What the rest of this shared machine used over the window, in cores:
    /// `/proc/stat`'s busy time less the controller's and the simulator's.
    others_cpu_cores: f64,
    /// The controller's VmRSS before the first agent connected, once all had
    /// connected (before the warm-up), and at the end.
    controller_rss_start_bytes: u64,
    controller_rss_connected_bytes: u64,
    controller_rss_end_bytes: u64,
    /// The store's files after the run (their lengths).
    store_disk_bytes: u64,
    /// With --hot-agents: how many of them saw GPUHighTemperature fire, and the
    /// time from the hot batch's creation to the alert's firing.
    #[serde(skip_serializing_if = "Option::is_none")]
    alerts_fired: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alert_latency_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alert_latency_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alert_latency_max_ms: Option<f64>,
    /// With --fanout-noop.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    fanout: Option<FanoutReport>,
    /// With --rollout.
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<RolloutReport>,
    /// With --dead-agents.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    dead: Option<dead::DeadReport>,
    /// With --samples-csv.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    space: Option<soak::SpaceReport>,
    /// With --restart.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    restart: Option<restart::RestartReport>,
}

/// The fan-out figures. Latencies are from the operator's side; verification
/// counts and cost are the simulated agents' own.
#[derive(Debug, serde::Serialize)]
struct FanoutReport {
    rounds: usize,
    fanout_channels: usize,
    commands_ok: usize,
    commands_failed: usize,
    /// Per round, from issuing the first request to the last successful result;
    /// percentiles over rounds.
    fanout_last_result_p50_ms: Option<f64>,
    fanout_last_result_p99_ms: Option<f64>,
    fanout_last_result_max_ms: Option<f64>,
    /// One ExecCommand call, request to response.
    command_latency_p50_ms: Option<f64>,
    command_latency_p99_ms: Option<f64>,
    /// Envelopes the agents verified, how many failed, and the mean time one
    /// verification (signature, version, key, target, validity) took.
    envelopes_verified: usize,
    verify_failures: usize,
    verify_cost_us: Option<f64>,
}

fn main() -> ExitCode {
    flotilla_common::tls::install_crypto_provider();
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("flotilla-fleet-sim: {e}");
        return ExitCode::from(64);
    }
    // One socket per agent here and in the controller (which inherits the limit).
    let files = machine::raise_open_files();
    if files < args.agents as u64 + 64 {
        eprintln!(
            "flotilla-fleet-sim: warning: the open-file limit is {files}; {} agents need about {}",
            args.agents,
            args.agents + 64
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla-fleet-sim: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)).and_then(|r| Ok(serde_json::to_string(&r)?)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flotilla-fleet-sim: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<Report> {
    let bin = match &args.controller_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locate this executable")?
            .parent()
            .context("this executable has no directory")?
            .join("flotilla-controller"),
    };
    let config = controller_config(&args)?;
    let tmp = tempfile::Builder::new().prefix("flotilla-fleet-sim-").tempdir().context("create a temp dir")?;
    let started = Instant::now();
    let pki_dir = tmp.path().join("pki");
    let n = args.agents;
    let gateway = args.rollout;
    let (controller_tls, nodes) =
        tokio::task::spawn_blocking(move || make_pki(&pki_dir, n, gateway)).await.context("certificate task")??;
    eprintln!("issued {} agent certificates in {:.1}s", nodes.len(), started.elapsed().as_secs_f64());
    let first = nodes.first().map(|n| SimNode { id: n.id.clone(), tls: n.tls.clone(), gateway: n.gateway });
    let mut controller = Controller::start(&bin, tmp.path(), &controller_tls, config.as_deref()).await?;
    // On SIGINT or SIGTERM, still stop the controller and remove the temp dir (the
    // store alone can reach gigabytes).
    let interrupted = flotilla_common::shutdown::on_signal();
    let pki_dir = tmp.path().join("pki");
    let outcome = tokio::select! {
        r = drive(&args, &controller, nodes, &pki_dir) => r,
        () = interrupted.cancelled() => Err(anyhow!("interrupted")),
    };
    let peak_rss = controller.peak_rss_bytes();
    let end_rss = controller.rss_bytes();
    controller.stop().await;
    let (mut report, stored) = match (outcome, peak_rss, end_rss) {
        (Ok(done), Ok(peak), Ok(end)) => {
            let (mut report, stored) = done;
            (report.controller_peak_rss_bytes, report.controller_rss_end_bytes) = (peak, end);
            (report, stored)
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            controller.report_problems();
            eprintln!("controller log tail ({}):\n{}", controller.log.display(), controller.log_tail(30));
            return Err(e);
        }
    };
    controller.report_problems();
    let (disk, _) = machine::disk_bytes(&controller.data_dir);
    report.store_disk_bytes = disk;
    let per_batch = disk / stored.max(1) as u64;
    eprintln!("controller store: {disk} bytes on disk for {stored} batches acked ({per_batch} bytes each)");
    if args.samples_csv.is_some() {
        let dir = controller.data_dir.clone();
        report.space = Some(tokio::task::spawn_blocking(move || soak::space(&dir)).await.context("store scan")??);
    }
    if args.restart {
        let node = first.context("no agent to reconnect after the restart")?;
        let key = controller.command_key().await?;
        let plan = Plan::new(String::new(), key, &args, 1);
        report.restart =
            Some(restart::measure(&bin, tmp.path(), &controller_tls, config.as_deref(), &node, plan).await?);
    }
    Ok(report)
}

/// The controller's config file: --controller-config's text, then (with --rules)
/// an `[alerting]` table; `None` when both are absent.
fn controller_config(args: &Args) -> Result<Option<String>> {
    let mut text = match &args.controller_config {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?,
        None => String::new(),
    };
    if let Some(rules) = &args.rules {
        let rules = rules.canonicalize().with_context(|| format!("rules file {}", rules.display()))?;
        // Every agent connects before the window: no restart grace is needed.
        text.push_str(&format!("\n[alerting]\nrules = {:?}\nrestart_grace = \"0s\"\n", rules.display().to_string()));
    }
    Ok((!text.is_empty()).then_some(text))
}

/// The admin operator's TLS files in the sim's PKI dir.
fn admin_tls(pki_dir: &Path) -> TlsFiles {
    let admin =
        pki::leaf_paths(pki_dir, &Identity::Operator { name: "admin".into(), role: flotilla_common::Role::Admin });
    TlsFiles::from_pki_dir(pki_dir, &admin)
}

/// One simulated agent's identity.
struct SimNode {
    id: NodeId,
    tls: TlsFiles,
    /// The agent has the gateway role (`gw-sim`, with --rollout).
    gateway: bool,
}

/// A fleet CA in `dir`, the controller's TLS files and one certificate per agent
/// (and, with `gateway`, one more for the gateway agent, last).
fn make_pki(dir: &Path, agents: usize, gateway: bool) -> Result<(TlsFiles, Vec<SimNode>)> {
    let ca = pki::init_ca(dir, &CaInit::default()).context("create the fleet CA")?;
    let names = (1..=agents).map(|i| format!("sim-{i:04}")).chain(gateway.then(|| GATEWAY_NODE.to_owned()));
    let nodes = names
        .map(|name| {
            let id = NodeId::new(name)?;
            let paths = pki::issue(dir, &Identity::Node(id.clone()), pki::LEAF_VALIDITY, false)
                .with_context(|| format!("issue the certificate of {id}"))?;
            let tls = TlsFiles::from_pki_dir(dir, &paths);
            Ok(SimNode { gateway: id.as_str() == GATEWAY_NODE, id, tls })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((TlsFiles::from_pki_dir(dir, &ca.controller), nodes))
}

/// Connects the fleet, measures one window and collects every agent's report.
/// Also returns how many batches were acknowledged over the whole run.
async fn drive(args: &Args, controller: &Controller, nodes: Vec<SimNode>, pki_dir: &Path) -> Result<(Report, usize)> {
    let key = controller.command_key().await?;
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
    let rss_start = controller.rss_bytes()?;
    let fleet = Fleet::launch(args, format!("https://{}", controller.addr), key, nodes).await;
    let rss_connected = controller.rss_bytes()?;
    let start = Instant::now() + args.warmup;
    {
        // Hot agents cross the threshold at random moments of the window's first 80 %.
        let mut hot = fleet.hot_at.lock().map_err(|_| anyhow!("hot plan lock"))?;
        for slot in hot.iter_mut().take(args.hot_agents) {
            *slot = Some(start + args.duration.mul_f64(rand::random::<f64>() * 0.8));
        }
    }
    fleet.deaths.plan(args.dead_agents, start, args.duration);
    sleep_until(start).await;
    let (cpu0, sim0, busy0) =
        (controller.cpu_seconds()?, machine::cpu_seconds("self")?, machine::machine_busy_seconds()?);
    // The fan-out runs inside the window, beside the telemetry load; it may outlast it.
    let fanout =
        async { if args.fanout_noop { Some(fanout_noop(args, controller, pki_dir, &ids).await) } else { None } };
    let tally = Arc::clone(&fleet.tally);
    let rollout =
        async { if args.rollout { Some(rollout_bench(args, controller, pki_dir, &ids, &tally).await) } else { None } };
    let dead = async {
        if args.dead_agents == 0 {
            return None;
        }
        let url = format!("https://{}", controller.addr);
        Some(dead::watch(&url, &admin_tls(pki_dir), &fleet.deaths, start + args.duration).await)
    };
    let samples = async {
        match &args.samples_csv {
            Some(csv) => soak::sample(controller, csv, args.sample_every, &tally, start + args.duration).await,
            None => Ok(()),
        }
    };
    let window = async {
        sleep_until(start + args.duration).await;
        let cpu = (controller.cpu_seconds(), machine::cpu_seconds("self"), machine::machine_busy_seconds());
        (cpu, Instant::now())
    };
    let (fanout, rollout, dead, samples, ((cpu1, sim1, busy1), end)) =
        tokio::join!(fanout, rollout, dead, samples, window);
    let (cpu1, sim1, busy1) = (cpu1?, sim1?, busy1?);
    let fanout = fanout.transpose()?;
    let rollout = rollout.transpose()?;
    let dead = dead.transpose()?;
    samples?;
    let window = start..end;
    let (fleet_connected, connect_seconds) = (fleet.connected, fleet.connect_seconds);
    let (reports, mut errors) = fleet.finish((args.interval * 2).max(DRAIN)).await;
    let values_per_batch = values_per_batch(args.gpus_per_agent)?;

    let mut latencies = Vec::new();
    let (mut sent, mut unacked) = (0, 0);
    for r in &reports {
        let acks = r.acks.iter().filter(|(at, _)| window.contains(at));
        latencies.extend(acks.map(|(_, latency)| *latency));
        sent += r.sent.iter().filter(|at| window.contains(at)).count();
        unacked += r.pending.len();
        if let Some(e) = &r.error {
            *errors.entry(e.clone()).or_default() += 1;
        }
    }
    latencies.sort_unstable();
    let secs = (window.end - window.start).as_secs_f64();
    let acked = latencies.len();
    let others = ((busy1 - busy0) - (cpu1 - cpu0) - (sim1 - sim0)).max(0.0) / secs;
    eprintln!(
        "window {secs:.1}s: {sent} batches sent, {acked} acked; simulator CPU {:.2}s; others' CPU {others:.2} cores",
        sim1 - sim0
    );
    for (message, count) in &errors {
        eprintln!("error x{count}: {message}");
    }
    let stored = reports.iter().map(|r| r.acks.len()).sum();
    let crossings: HashMap<String, i64> =
        reports.iter().filter_map(|r| Some((r.node.clone(), r.crossed_unix_ms?))).collect();
    let alert_latencies =
        if args.hot_agents > 0 { alert_latencies(controller, pki_dir, &crossings).await? } else { Vec::new() };
    let report = Report {
        agents: args.agents,
        gpus_per_agent: args.gpus_per_agent,
        interval_ms: u64::try_from(args.interval.as_millis())?,
        duration_s: round3(secs),
        batches_acked: acked,
        samples_per_second_acked: round3(acked as f64 * f64::from(args.gpus_per_agent) / secs),
        ack_latency_p50_ms: percentile_ms(&latencies, 0.50),
        ack_latency_p99_ms: percentile_ms(&latencies, 0.99),
        unacked_at_end: unacked,
        controller_cpu_seconds: round3(cpu1 - cpu0),
        controller_peak_rss_bytes: 0,
        errors: errors.values().sum(),
        agents_connected: fleet_connected,
        connect_seconds: round3(connect_seconds),
        values_per_batch,
        values_per_second_acked: round3((acked * values_per_batch) as f64 / secs),
        simulator_cpu_seconds: round3(sim1 - sim0),
        others_cpu_cores: round3(others),
        controller_rss_start_bytes: rss_start,
        controller_rss_connected_bytes: rss_connected,
        controller_rss_end_bytes: 0,
        store_disk_bytes: 0,
        alerts_fired: (args.hot_agents > 0).then_some(alert_latencies.len()),
        alert_latency_p50_ms: percentile_ms(&alert_latencies, 0.50),
        alert_latency_p99_ms: percentile_ms(&alert_latencies, 0.99),
        alert_latency_max_ms: alert_latencies.last().map(|d| round3(d.as_secs_f64() * 1000.0)),
        fanout: fanout.map(|f| f.report(&reports)),
        rollout,
        dead,
        space: None,
        restart: None,
    };
    if args.hot_agents > 0 && alert_latencies.len() < crossings.len() {
        eprintln!("{} of {} hot agents saw no alert fire", crossings.len() - alert_latencies.len(), crossings.len());
    }
    Ok((report, stored))
}

/// For each hot node, the time from its crossing batch to its alert firing,
/// sorted; read through the public Fleet API as an operator would.
async fn alert_latencies(
    controller: &Controller,
    pki_dir: &Path,
    crossings: &HashMap<String, i64>,
) -> Result<Vec<Duration>> {
    let admin =
        pki::leaf_paths(pki_dir, &Identity::Operator { name: "admin".into(), role: flotilla_common::Role::Admin });
    let tls = TlsFiles::from_pki_dir(pki_dir, &admin);
    let url = format!("https://{}", controller.addr);
    let channel = client::endpoint(&url, &tls)?.connect().await.map_err(|e| anyhow!(client::describe(&e)))?;
    let mut fleet = FleetClient::new(channel);
    // Give the last crossings a moment to be evaluated.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alerts = fleet.list_alerts(pb::ListAlertsRequest { state: 0 }).await?.into_inner().alerts;
    let mut out: Vec<Duration> = alerts
        .iter()
        .filter(|a| a.name == "GPUHighTemperature" && a.firing_since_unix_ms > 0)
        .filter_map(|a| {
            let crossed = crossings.get(a.labels.get("node")?)?;
            Some(Duration::from_millis(u64::try_from(a.firing_since_unix_ms - crossed).unwrap_or(0)))
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// What the operator side of the fan-out measured.
struct Fanout {
    channels: usize,
    /// Per round: first request to last successful result.
    rounds: Vec<Duration>,
    /// Every successful call, request to response.
    latencies: Vec<Duration>,
    ok: usize,
    failed: usize,
}

impl Fanout {
    /// The report's figures, with the agents' verification counts.
    fn report(mut self, agents: &[AgentReport]) -> FanoutReport {
        self.rounds.sort_unstable();
        self.latencies.sort_unstable();
        let verified: usize = agents.iter().map(|r| r.verified).sum();
        let spent: Duration = agents.iter().map(|r| r.verify_time).sum();
        FanoutReport {
            rounds: self.rounds.len(),
            fanout_channels: self.channels,
            commands_ok: self.ok,
            commands_failed: self.failed,
            fanout_last_result_p50_ms: percentile_ms(&self.rounds, 0.50),
            fanout_last_result_p99_ms: percentile_ms(&self.rounds, 0.99),
            fanout_last_result_max_ms: self.rounds.last().map(|d| round3(d.as_secs_f64() * 1000.0)),
            command_latency_p50_ms: percentile_ms(&self.latencies, 0.50),
            command_latency_p99_ms: percentile_ms(&self.latencies, 0.99),
            envelopes_verified: verified,
            verify_failures: agents.iter().map(|r| r.verify_failures).sum(),
            verify_cost_us: (verified > 0).then(|| round3(spent.as_secs_f64() * 1e6 / verified as f64)),
        }
    }
}

/// Sends a signed `noop` to every node at once through the public Fleet API, as
/// an admin operator, for --fanout-rounds rounds.
async fn fanout_noop(args: &Args, controller: &Controller, pki_dir: &Path, nodes: &[NodeId]) -> Result<Fanout> {
    let admin =
        pki::leaf_paths(pki_dir, &Identity::Operator { name: "admin".into(), role: flotilla_common::Role::Admin });
    let tls = TlsFiles::from_pki_dir(pki_dir, &admin);
    let url = format!("https://{}", controller.addr);
    let wanted = if args.fanout_channels == 0 { nodes.len().div_ceil(CALLS_PER_CHANNEL) } else { args.fanout_channels };
    let mut channels = Vec::with_capacity(wanted);
    for _ in 0..wanted.max(1) {
        let channel = client::endpoint(&url, &tls)?.connect().await.map_err(|e| anyhow!(client::describe(&e)))?;
        channels.push(channel);
    }
    let mut out = Fanout { channels: channels.len(), rounds: Vec::new(), latencies: Vec::new(), ok: 0, failed: 0 };
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for round in 1..=args.fanout_rounds {
        if round > 1 {
            tokio::time::sleep(args.fanout_pause).await;
        }
        let (began, mut calls) = (Instant::now(), JoinSet::new());
        for (i, node) in nodes.iter().enumerate() {
            calls.spawn(exec_noop(channels[i % channels.len()].clone(), node.to_string()));
        }
        let (mut last, mut ok) = (None, 0);
        while let Some(joined) = calls.join_next().await {
            match joined.map_err(|e| format!("call task: {e}")).and_then(|r| r) {
                Ok((latency, done)) => {
                    ok += 1;
                    out.latencies.push(latency);
                    last = last.max(Some(done));
                }
                Err(e) => {
                    out.failed += 1;
                    *errors.entry(e).or_default() += 1;
                }
            }
        }
        out.ok += ok;
        let took = last.map(|at| at - began);
        out.rounds.extend(took);
        let ms = took.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
        eprintln!("fan-out round {round}: {ok} of {} noops succeeded; last result after {ms:.1} ms", nodes.len());
    }
    for (message, count) in &errors {
        eprintln!("fan-out error x{count}: {message}");
    }
    Ok(out)
}

/// One `noop` ExecCommand: its latency and when it ended, or why it failed
/// (without the node id, so that one failure of many nodes is counted once).
async fn exec_noop(channel: Channel, node: String) -> Result<(Duration, Instant), String> {
    let mut fleet = FleetClient::new(channel);
    let request = pb::ExecCommandRequest { node_id: node.clone(), command: "noop".into(), ..Default::default() };
    let sent = Instant::now();
    let response = match timeout(EXEC_TIMEOUT, fleet.exec_command(request)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => return Err(format!("{:?}: {}", status.code(), status.message().replace(&node, "NODE"))),
        Err(_) => return Err(format!("no answer within {}s", EXEC_TIMEOUT.as_secs())),
    };
    let done = Instant::now();
    match response.status() {
        pb::CommandStatus::Succeeded => Ok((done - sent, done)),
        other => Err(format!("{}: {}", other.as_str_name(), response.detail.replace(&node, "NODE"))),
    }
}

/// The rollout figures: an initial deploy, then a blue-green update.
#[derive(Debug, serde::Serialize)]
struct RolloutReport {
    gpu_nodes: usize,
    deployments: usize,
    /// The controller's CPU per second over the telemetry load alone, measured
    /// just before the first apply.
    idle_controller_cpu_per_second: f64,
    /// The same with every deployment's rollout polled every 100 ms as during
    /// the phases, measured after the last one ended: the operator's own cost.
    polling_controller_cpu_per_second: f64,
    initial: PhaseReport,
    blue_green: PhaseReport,
}

/// One phase: every deployment applied at once, until the last succeeded.
#[derive(Debug, serde::Serialize)]
struct PhaseReport {
    /// What the controller planned, and its steps per deployment.
    strategy: String,
    steps: usize,
    replicas: usize,
    /// First ApplyDeployment sent → last response.
    apply_ms: f64,
    /// First ApplyDeployment sent → the last GetRollout saying "succeeded"
    /// (polled every 100 ms).
    wall_ms: f64,
    /// The controller's own record: earliest start to latest finish.
    controller_span_ms: i64,
    /// Commands the agents received in the phase, by kind (resends apart).
    commands: BTreeMap<&'static str, usize>,
    commands_per_gpu_node_min: usize,
    commands_per_gpu_node_max: usize,
    commands_per_gpu_node_mean: f64,
    gateway_commands: usize,
    resent: usize,
    controller_cpu_seconds: f64,
    /// The same less the idle rate over the phase's wall time.
    controller_cpu_seconds_above_idle: f64,
}

/// Deploys revision 1 of a model over every GPU node, split into deployments,
/// waits for it, then rolls out revision 2 (blue-green), as an admin operator.
async fn rollout_bench(
    args: &Args,
    controller: &Controller,
    pki_dir: &Path,
    nodes: &[NodeId],
    tally: &Tally,
) -> Result<RolloutReport> {
    let gpu_nodes: Vec<(usize, String)> =
        nodes.iter().enumerate().filter(|(_, n)| n.as_str() != GATEWAY_NODE).map(|(i, n)| (i, n.to_string())).collect();
    let gateway = nodes.iter().position(|n| n.as_str() == GATEWAY_NODE).context("no gateway agent")?;
    let count = match args.rollout_deployments {
        0 => gpu_nodes.len().div_ceil(REPLICAS_PER_DEPLOYMENT),
        d => d,
    };
    // Contiguous groups whose sizes differ by at most one.
    let (base, extra) = (gpu_nodes.len() / count, gpu_nodes.len() % count);
    let mut groups: Vec<Vec<String>> = Vec::with_capacity(count);
    let mut rest = gpu_nodes.iter().map(|(_, n)| n.clone());
    for g in 0..count {
        groups.push(rest.by_ref().take(base + usize::from(g < extra)).collect());
    }
    let admin =
        pki::leaf_paths(pki_dir, &Identity::Operator { name: "admin".into(), role: flotilla_common::Role::Admin });
    let tls = TlsFiles::from_pki_dir(pki_dir, &admin);
    let url = format!("https://{}", controller.addr);
    let channel = client::endpoint(&url, &tls)?.connect().await.map_err(|e| anyhow!(client::describe(&e)))?;
    let fleet = FleetClient::new(channel);

    let (cpu0, t0) = (controller.cpu_seconds()?, Instant::now());
    tokio::time::sleep(ROLLOUT_BASELINE).await;
    let idle = (controller.cpu_seconds()? - cpu0) / t0.elapsed().as_secs_f64();
    let agents = Agents { gpu: gpu_nodes.iter().map(|(i, _)| *i).collect(), gateway };
    let initial = rollout_phase(&fleet, controller, tally, &agents, &groups, 1, idle).await?;
    tokio::time::sleep(ROLLOUT_PAUSE).await;
    let blue_green = rollout_phase(&fleet, controller, tally, &agents, &groups, 2, idle).await?;

    let (cpu0, t0) = (controller.cpu_seconds()?, Instant::now());
    let mut poll = tokio::time::interval(ROLLOUT_POLL);
    while t0.elapsed() < ROLLOUT_BASELINE {
        poll.tick().await;
        for g in 0..count {
            let request = pb::GetRolloutRequest { name: deployment_name(g), number: 0 };
            fleet.clone().get_rollout(request).await.map_err(|s| anyhow!("GetRollout: {}", s.message()))?;
        }
    }
    let polling = (controller.cpu_seconds()? - cpu0) / t0.elapsed().as_secs_f64();
    Ok(RolloutReport {
        gpu_nodes: gpu_nodes.len(),
        deployments: count,
        idle_controller_cpu_per_second: round3(idle),
        polling_controller_cpu_per_second: round3(polling),
        initial,
        blue_green,
    })
}

/// Which agents (by index) are GPU nodes and which is the gateway.
struct Agents {
    gpu: Vec<usize>,
    gateway: usize,
}

fn deployment_name(group: usize) -> String {
    format!("bench-{:02}", group + 1)
}

/// The deployment spec (JSON, which is YAML) of `revision` over `nodes`.
fn deployment_spec(name: &str, nodes: &[String], revision: u32) -> String {
    serde_json::json!({
        "name": name,
        "model": { "name": "sim-model", "revision": "2025-01-01" },
        "runtime": {
            "image": "vllm/vllm-openai:v0.8.5",
            "args": ["--model", "/model", "--served-model-name", "sim-model", "--port", "8000"],
            "env": { "HF_HUB_OFFLINE": "1", "BENCH_REVISION": revision.to_string() },
            "port": 8000,
            "host_port": 18000,
            "gpus": 1,
        },
        "placement": { "nodes": nodes, "replicas": nodes.len() },
        "gateway": { "node": GATEWAY_NODE, "upstream": name },
        "strategy": { "type": "blue-green", "steps": [10, 50, 100], "bake": "0s", "min_healthy_time": "0s" },
    })
    .to_string()
}

/// Applies `revision` of every deployment at once and waits until each rollout
/// has succeeded; any other end is an error that carries the rollout's status.
async fn rollout_phase(
    fleet: &FleetClient<Channel>,
    controller: &Controller,
    tally: &Tally,
    agents: &Agents,
    groups: &[Vec<String>],
    revision: u32,
    idle: f64,
) -> Result<PhaseReport> {
    let specs: Vec<(String, String)> = groups
        .iter()
        .enumerate()
        .map(|(i, nodes)| {
            let name = deployment_name(i);
            let spec = deployment_spec(&name, nodes, revision);
            (name, spec)
        })
        .collect();
    let (counts0, resent0) = tally.snapshot();
    let cpu0 = controller.cpu_seconds()?;
    let began = Instant::now();
    let applies = specs.iter().map(|(name, yaml)| {
        let mut fleet = fleet.clone();
        let request = pb::ApplyDeploymentRequest { spec_yaml: yaml.clone(), dry_run: false };
        async move { (name, fleet.apply_deployment(request).await) }
    });
    let mut running: BTreeMap<String, u64> = BTreeMap::new();
    let (mut strategy, mut steps) = (String::new(), 0);
    for (name, response) in futures::future::join_all(applies).await {
        let response = match response {
            Ok(r) => r.into_inner(),
            Err(status) => {
                bail!("ApplyDeployment {name} revision {revision}: {:?}: {}", status.code(), status.message())
            }
        };
        if response.unchanged || response.rollout == 0 {
            bail!("ApplyDeployment {name}: no rollout started (unchanged: {})", response.unchanged);
        }
        if let Some(plan) = &response.plan {
            strategy.clone_from(&plan.strategy);
            steps = plan.steps.len();
            if name.ends_with("-01") {
                for note in &plan.notes {
                    eprintln!("{name} revision {revision} plan: {note}");
                }
            }
        }
        running.insert(name.clone(), response.rollout);
    }
    let apply_ms = began.elapsed().as_secs_f64() * 1000.0;
    let mut done: BTreeMap<String, (Instant, pb::RolloutStatus)> = BTreeMap::new();
    let mut poll = tokio::time::interval(ROLLOUT_POLL);
    let deadline = began + ROLLOUT_TIMEOUT;
    while done.len() < running.len() {
        poll.tick().await;
        for (name, number) in &running {
            if done.contains_key(name) {
                continue;
            }
            let mut fleet = fleet.clone();
            let status = fleet
                .get_rollout(pb::GetRolloutRequest { name: name.clone(), number: *number })
                .await
                .map_err(|s| anyhow!("GetRollout {name}: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            let state = status.state.clone();
            match state.as_str() {
                "succeeded" => {
                    done.insert(name.clone(), (Instant::now(), status));
                }
                "progressing" | "paused" if Instant::now() < deadline => {}
                other => {
                    bail!(
                        "rollout {number} of {name} (revision {revision}) is {other} after {:.1}s:\n{}",
                        began.elapsed().as_secs_f64(),
                        serde_json::to_string_pretty(&status_json(&status))?
                    );
                }
            }
        }
    }
    let cpu = controller.cpu_seconds()? - cpu0;
    let (counts1, resent1) = tally.snapshot();
    let last = done.values().map(|(at, _)| *at).max().unwrap_or(began);
    let wall = (last - began).as_secs_f64();
    let statuses: Vec<&pb::RolloutStatus> = done.values().map(|(_, s)| s).collect();
    let start = statuses.iter().map(|s| s.started_unix_ms).min().unwrap_or_default();
    let end = statuses.iter().map(|s| s.finished_unix_ms).max().unwrap_or_default();
    if let Some(first) = statuses.first() {
        eprintln!("{} rollout {} (revision {revision}), as the controller logged it:", first.deployment, first.number);
        for e in &first.events {
            let text: String = e.text.chars().take(160).collect();
            eprintln!("  +{:>6} ms  {text}", e.at_unix_ms - first.started_unix_ms);
        }
    }
    let delta = |agent: usize| -> [usize; KINDS.len()] {
        std::array::from_fn(|k| counts1[agent][k].saturating_sub(counts0[agent][k]))
    };
    let mut commands = BTreeMap::new();
    for agent in agents.gpu.iter().chain(std::iter::once(&agents.gateway)) {
        for (k, n) in delta(*agent).into_iter().enumerate() {
            if n > 0 {
                *commands.entry(KINDS[k]).or_default() += n;
            }
        }
    }
    let per_node: Vec<usize> = agents.gpu.iter().map(|a| delta(*a).iter().sum()).collect();
    let total: usize = per_node.iter().sum();
    Ok(PhaseReport {
        strategy,
        steps,
        replicas: groups.iter().map(Vec::len).sum(),
        apply_ms: round3(apply_ms),
        wall_ms: round3(wall * 1000.0),
        controller_span_ms: end - start,
        commands,
        commands_per_gpu_node_min: per_node.iter().copied().min().unwrap_or_default(),
        commands_per_gpu_node_max: per_node.iter().copied().max().unwrap_or_default(),
        commands_per_gpu_node_mean: round3(total as f64 / per_node.len().max(1) as f64),
        gateway_commands: delta(agents.gateway).iter().sum(),
        resent: resent1 - resent0,
        controller_cpu_seconds: round3(cpu),
        controller_cpu_seconds_above_idle: round3(cpu - idle * wall),
    })
}

/// The parts of a rollout's status that say where and why it stopped.
fn status_json(s: &pb::RolloutStatus) -> serde_json::Value {
    let at = |ms: i64| ms - s.started_unix_ms;
    serde_json::json!({
        "deployment": s.deployment,
        "number": s.number,
        "state": s.state,
        "from_revision": s.from_revision,
        "to_revision": s.to_revision,
        "step": s.step,
        "steps": s.steps,
        "step_label": s.step_label.chars().take(200).collect::<String>(),
        "phase": s.phase,
        "reverting": s.reverting,
        "error": s.error,
        "new_share": s.new_share,
        "gates": s.gates.iter().map(|g| serde_json::json!({
            "gate": g.gate, "verdict": g.verdict, "detail": g.detail.chars().take(300).collect::<String>(),
        })).collect::<Vec<_>>(),
        "events": s.events.iter().map(|e| {
            format!("+{} ms {}", at(e.at_unix_ms), e.text.chars().take(200).collect::<String>())
        }).collect::<Vec<_>>(),
        "commands_not_succeeded": s.commands.iter().filter(|c| c.status != "succeeded").map(|c| serde_json::json!({
            "node": c.node, "command": c.command, "status": c.status, "detail": c.detail,
        })).collect::<Vec<_>>(),
        "commands": s.commands.len(),
    })
}

/// Prometheus samples in one batch of the shape the agents send, counted by the
/// controller's own `series` (what `/metrics` and the rules see).
fn values_per_batch(gpus: u32) -> Result<usize> {
    let node = NodeId::new("sim-0001")?;
    let uuids: Vec<String> = (0..gpus).map(|g| gpu_uuid(0, g)).collect();
    let batch = flotilla_common::model::TelemetryBatch::try_from(telemetry(1, 0, &uuids))?;
    let inventory = flotilla_common::model::Inventory::try_from(inventory(&node, 0, gpus, false))?;
    Ok(flotilla_controller::series::batch_samples(&node, &inventory, &batch).len())
}

/// The running simulated agents.
struct Fleet {
    /// When each agent (by index) makes its GPU 0 hot; `None`: never.
    hot_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>>,
    /// Which agents die, when and how (--dead-agents).
    deaths: Arc<dead::Deaths>,
    /// Agents that connected, and how long connecting them all took.
    connected: usize,
    connect_seconds: f64,
    /// The commands each agent has received so far.
    tally: Arc<Tally>,
    tasks: JoinSet<AgentReport>,
    stop: CancellationToken,
    close: CancellationToken,
}

impl Fleet {
    /// Spawns every agent and waits until each has connected or failed to.
    async fn launch(args: &Args, url: String, command_key: PinnedKey, nodes: Vec<SimNode>) -> Self {
        let agents = nodes.len();
        let plan = Arc::new(Plan::new(url, command_key, args, agents));
        let deaths = Arc::new(dead::Deaths::new(agents));
        let gate = Arc::new(Semaphore::new(args.connect_concurrency));
        let (stop, close) = (CancellationToken::new(), CancellationToken::new());
        let (connected_tx, mut connected_rx) = mpsc::channel(agents);
        let hot_at = Arc::new(std::sync::Mutex::new(vec![None; agents]));
        let tally = Arc::new(Tally::new(agents));
        let mut tasks = JoinSet::new();
        for (index, node) in nodes.into_iter().enumerate() {
            let ctl = AgentCtl {
                plan: Arc::clone(&plan),
                gate: Arc::clone(&gate),
                connected: connected_tx.clone(),
                hot_at: Arc::clone(&hot_at),
                tally: Arc::clone(&tally),
                deaths: Arc::clone(&deaths),
                stop: stop.clone(),
                close: close.clone(),
            };
            tasks.spawn(Box::pin(agent(index, node, ctl)));
        }
        drop(connected_tx);
        let (mut up, mut outcomes) = (0, 0);
        let deadline = Instant::now() + CONNECT_PHASE_TIMEOUT;
        while let Ok(Some(ok)) = tokio::time::timeout_at(deadline, connected_rx.recv()).await {
            (up, outcomes) = (up + usize::from(ok), outcomes + 1);
            if outcomes == agents {
                break;
            }
        }
        let secs = plan.epoch.elapsed().as_secs_f64();
        eprintln!("{up} of {agents} agents connected in {secs:.1}s");
        Self { hot_at, deaths, connected: up, connect_seconds: secs, tally, tasks, stop, close }
    }

    /// Stops new batches, waits up to `drain` for the acks in flight, then closes
    /// every stream. Returns the reports and the agents that failed as tasks.
    async fn finish(mut self, drain: Duration) -> (Vec<AgentReport>, HashMap<String, usize>) {
        self.stop.cancel();
        let (mut reports, mut errors) = (Vec::new(), HashMap::new());
        let mut deadline = Instant::now() + drain;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(Ok(report))) => reports.push(report),
                Ok(Some(Err(e))) => *errors.entry(format!("agent task: {e}")).or_default() += 1,
                Ok(None) => break,
                Err(_) if !self.close.is_cancelled() => {
                    self.close.cancel();
                    deadline = Instant::now() + STOP_TIMEOUT;
                }
                Err(_) => {
                    let stuck = self.tasks.len();
                    errors.insert("agent did not stop in time".to_owned(), stuck);
                    break;
                }
            }
        }
        (reports, errors)
    }
}

/// Nearest-rank percentile of sorted latencies, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> Option<f64> {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).map(|d| round3(d.as_secs_f64() * 1000.0))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What every agent shares.
struct Plan {
    url: String,
    /// The controller's public command key, pinned as a real agent pins it.
    command_key: PinnedKey,
    gpus: u32,
    interval: Duration,
    agents: usize,
    /// Agent `i` sends at `epoch + interval·i/agents + k·interval`, so load is smooth.
    epoch: Instant,
}

impl Plan {
    /// The plan of `agents` agents as `args` asks, from now.
    fn new(url: String, command_key: PinnedKey, args: &Args, agents: usize) -> Self {
        Self { url, command_key, gpus: args.gpus_per_agent, interval: args.interval, agents, epoch: Instant::now() }
    }
}

/// One agent's handles on the run.
struct AgentCtl {
    plan: Arc<Plan>,
    gate: Arc<Semaphore>,
    connected: mpsc::Sender<bool>,
    hot_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>>,
    tally: Arc<Tally>,
    deaths: Arc<dead::Deaths>,
    /// Stop making batches; wait for the acks of those in flight.
    stop: CancellationToken,
    /// Stop now.
    close: CancellationToken,
}

/// What one agent saw.
#[derive(Default)]
struct AgentReport {
    /// When each ack arrived and how long after its batch was made.
    acks: Vec<(Instant, Duration)>,
    /// When each batch was made.
    sent: Vec<Instant>,
    /// Batches sent and not acknowledged, by seq.
    pending: BTreeMap<u64, Instant>,
    error: Option<String>,
    node: String,
    /// `created_unix_ms` of the first batch with GPU 0 hot.
    crossed_unix_ms: Option<i64>,
    /// Signed envelopes checked, those refused, and the time spent checking.
    verified: usize,
    verify_failures: usize,
    verify_time: Duration,
    /// Results of the commands received, by id: a resent command gets its result
    /// again, as from the real agent's store of seen ids.
    results: HashMap<CommandId, pb::CommandResult>,
}

async fn agent(index: usize, node: SimNode, ctl: AgentCtl) -> AgentReport {
    let mut report = AgentReport { node: node.id.to_string(), ..AgentReport::default() };
    let opened = match ctl.gate.acquire().await {
        Ok(_permit) => tokio::select! {
            r = timeout(CONNECT_TIMEOUT, open(index, &node, &ctl.plan)) => {
                r.map_err(|_| anyhow!("not welcomed within {}s", CONNECT_TIMEOUT.as_secs())).and_then(|r| r)
            }
            () = ctl.close.cancelled() => Err(anyhow!("closed while connecting")),
        },
        Err(e) => Err(e.into()),
    };
    let _ = ctl.connected.send(opened.is_ok()).await;
    let result = match opened {
        Ok((tx, inbound)) => {
            let mut host = Host::new(node.gateway, index, Arc::clone(&ctl.tally));
            stream(&node.id, tx, inbound, &ctl, &mut report, &mut host).await
        }
        Err(e) => Err(e.context("connect")),
    };
    if let Err(e) = result {
        // Without the node id, so that the same failure of many agents is counted once.
        report.error = Some(format!("{e:#}"));
    }
    report
}

type Outbox = mpsc::Sender<pb::AgentMessage>;

/// Connects, says hello and waits for the welcome.
async fn open(index: usize, node: &SimNode, plan: &Plan) -> Result<(Outbox, Streaming<pb::ControllerMessage>)> {
    let channel = client::endpoint(&plan.url, &node.tls)?.connect().await.map_err(|e| anyhow!(client::describe(&e)))?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    let hello = pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        node_id: node.id.to_string(),
        inventory: Some(inventory(&node.id, index, if node.gateway { 0 } else { plan.gpus }, node.gateway)),
        heartbeat_interval_ms: u32::try_from(heartbeat_of(plan.interval).as_millis())?,
    };
    send(&tx, Up::Hello(hello)).await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(pb::ControllerMessage { body: Some(Down::Welcome(_)) }) => Ok((tx, inbound)),
        _ => bail!("the first message was not a welcome"),
    }
}

/// The heartbeat interval a real agent with this telemetry interval and no
/// `heartbeat_interval` of its own uses.
fn heartbeat_of(interval: Duration) -> Duration {
    interval.min(flotilla_agent::config::DEFAULT_HEARTBEAT_CAP)
}

/// Sends a batch and a heartbeat every interval, matches acks to batches and
/// answers commands (a changed container list first, as the real agent does).
async fn stream(
    me: &NodeId,
    tx: Outbox,
    mut inbound: Streaming<pb::ControllerMessage>,
    ctl: &AgentCtl,
    report: &mut AgentReport,
    host: &mut Host,
) -> Result<()> {
    let plan = &ctl.plan;
    let index = host.index;
    let offset = plan.interval.mul_f64(index as f64 / plan.agents as f64);
    let first = next_tick(plan.epoch + offset, plan.interval, Instant::now());
    let mut batches = tokio::time::interval_at(first, plan.interval);
    let heartbeat = heartbeat_of(plan.interval);
    let mut heartbeats = tokio::time::interval_at(first + heartbeat / 2, heartbeat);
    heartbeats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let gpus = if host.gateway { 0 } else { plan.gpus };
    let uuids: Vec<String> = (0..gpus).map(|g| gpu_uuid(index, g)).collect();
    // `silent`: the agent died without closing its connection (--dead-agents).
    let (mut seq, mut sending, mut silent) = (0, true, false);
    loop {
        tokio::select! {
            () = ctl.close.cancelled() => return Ok(()),
            () = ctl.stop.cancelled(), if sending || silent => {
                sending = false;
                if silent || report.pending.is_empty() { return Ok(()) }
            }
            _ = batches.tick(), if sending => {
                let made = Instant::now();
                if let Some(death) = ctl.deaths.due(index, &report.node, made) {
                    // A dead agent's batches will never be acknowledged.
                    report.pending.clear();
                    match death {
                        // Dropping the stream and its connection, as the kernel does for a killed process.
                        dead::Death::Kill => return Ok(()),
                        dead::Death::Silence => (sending, silent) = (false, true),
                    }
                    continue;
                }
                seq += 1;
                let mut batch = telemetry(seq, index, &uuids);
                batch.samples.extend(host.readiness());
                let hot = ctl.hot_at.lock().ok().and_then(|h| h.get(index).copied().flatten());
                if hot.is_some_and(|at| made >= at)
                    && let Some(gpu) = batch.gpus.first_mut()
                {
                    gpu.temperature_celsius = Some(95.0);
                    report.crossed_unix_ms.get_or_insert(batch.created_unix_ms);
                }
                send(&tx, Up::Telemetry(batch)).await?;
                report.pending.insert(seq, made);
                report.sent.push(made);
            }
            _ = heartbeats.tick(), if !silent => {
                send(&tx, Up::Heartbeat(pb::Heartbeat { sent_unix_ms: now_unix_ms() })).await?;
            }
            msg = inbound.message() => match msg {
                // The controller closing a silent agent's stream is the point of silence.
                Err(_) | Ok(None) if silent => return Ok(()),
                Err(status) => return Err(status.into()),
                Ok(None) => bail!("the controller closed the stream"),
                Ok(Some(pb::ControllerMessage { body: Some(Down::Ack(ack)) })) => {
                    let now = Instant::now();
                    let mut acked = 0;
                    for s in ack.seqs {
                        if let Some(made) = report.pending.remove(&s) {
                            report.acks.push((now, now - made));
                            acked += 1;
                        }
                    }
                    ctl.tally.acked.fetch_add(acked, Ordering::Relaxed);
                    if !sending && report.pending.is_empty() { return Ok(()) }
                }
                Ok(Some(pb::ControllerMessage { body: Some(Down::Command(signed)) })) => {
                    let result = answer(signed, me, &plan.command_key, report, host);
                    if std::mem::take(&mut host.changed) {
                        send(&tx, Up::Containers(host.report())).await?;
                    }
                    send(&tx, Up::CommandResult(result)).await?;
                }
                Ok(Some(_)) => {}
            },
        }
    }
}

/// Answers a signed command as the real agent does (its `Gate` and executor):
/// nothing in the envelope is used before it verifies against the pinned key for
/// this node within its validity; then [`Host::execute`] runs it on the simulated
/// host, and a resent id gets the stored result without running again.
fn answer(
    signed: pb::SignedCommand,
    me: &NodeId,
    key: &PinnedKey,
    report: &mut AgentReport,
    host: &mut Host,
) -> pb::CommandResult {
    let signed = SignedEnvelope { bytes: signed.envelope, signature: signed.signature };
    let began = std::time::Instant::now();
    let verified = key.verify::<Command>(&signed, me, now_unix_ms(), |_| false);
    report.verify_time += began.elapsed();
    report.verified += 1;
    let envelope = match verified {
        Ok(envelope) => envelope,
        Err(refusal) => {
            report.verify_failures += 1;
            let id = untrusted_id(&signed);
            return command_result(id, CommandStatus::Refused, refusal.to_string(), &serde_json::json!({}));
        }
    };
    if let Some(stored) = report.results.get(&envelope.id) {
        host.tally.resent.fetch_add(1, Ordering::Relaxed);
        return stored.clone();
    }
    host.tally.count(host.index, envelope.payload.name());
    let (status, detail, output) = host.execute(envelope.payload);
    let result = command_result(Some(envelope.id), status, detail, &output);
    report.results.insert(envelope.id, result.clone());
    result
}

/// Commands received by each agent, by kind (see [`KINDS`]), and resends.
struct Tally {
    per_agent: Vec<[AtomicUsize; KINDS.len()]>,
    /// Commands received again under an id already answered.
    resent: AtomicUsize,
    /// Batches acknowledged so far, by every agent.
    acked: AtomicUsize,
}

impl Tally {
    fn new(agents: usize) -> Self {
        let per_agent = (0..agents).map(|_| std::array::from_fn(|_| AtomicUsize::new(0))).collect();
        Self { per_agent, resent: AtomicUsize::new(0), acked: AtomicUsize::new(0) }
    }

    fn count(&self, agent: usize, name: &str) {
        let kind = KINDS.iter().position(|k| *k == name).unwrap_or(KINDS.len() - 1);
        if let Some(counts) = self.per_agent.get(agent) {
            counts[kind].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Each agent's counts now, and the resends.
    fn snapshot(&self) -> (Vec<[usize; KINDS.len()]>, usize) {
        let per_agent = self.per_agent.iter().map(|c| std::array::from_fn(|k| c[k].load(Ordering::Relaxed))).collect();
        (per_agent, self.resent.load(Ordering::Relaxed))
    }
}

/// What a simulated agent runs commands on: containers that start at once and
/// are ready as soon as they run, and, on the gateway agent, nginx upstreams
/// that take any valid weights.
struct Host {
    gateway: bool,
    index: usize,
    tally: Arc<Tally>,
    /// Managed containers by name.
    containers: BTreeMap<String, pb::Container>,
    /// The list changed since it was last reported.
    changed: bool,
    /// The gateway's upstreams, by name.
    upstreams: BTreeMap<String, GatewayWeights>,
    started: u64,
}

impl Host {
    fn new(gateway: bool, index: usize, tally: Arc<Tally>) -> Self {
        Self {
            gateway,
            index,
            tally,
            containers: BTreeMap::new(),
            changed: false,
            upstreams: BTreeMap::new(),
            started: 0,
        }
    }

    /// Runs a verified command: its status, detail and output.
    fn execute(&mut self, command: Command) -> (CommandStatus, String, serde_json::Value) {
        let ok = CommandStatus::Succeeded;
        let failed = |detail: String| (CommandStatus::Failed, detail, serde_json::json!({}));
        match command {
            Command::Noop => (ok, "noop".into(), serde_json::json!({ "noop": true })),
            Command::Deploy { spec_yaml } => {
                // The controller sends JSON (which the real agent reads as YAML).
                let spec: serde_json::Value = match serde_json::from_str(&spec_yaml) {
                    Ok(spec) => spec,
                    Err(e) => return failed(format!("the container spec is not JSON: {e}")),
                };
                let text = |key: &str| match &spec[key] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                };
                let (Some(deployment), Some(revision)) = (text("name"), text("revision")) else {
                    return failed("the container spec has no name or revision".into());
                };
                let name = format!("{deployment}-{revision}");
                self.started += 1;
                let container = pb::Container {
                    name: name.clone(),
                    id: format!("{:06x}{:06x}", self.index & 0xff_ffff, self.started & 0xff_ffff),
                    image: text("image").unwrap_or_default(),
                    state: "running".into(),
                    health: String::new(),
                    deployment,
                    revision,
                    created_unix_ms: now_unix_ms(),
                };
                self.containers.insert(name.clone(), container);
                self.changed = true;
                (ok, format!("started {name}"), serde_json::json!({ "container": name }))
            }
            Command::Drain { container, .. } | Command::Stop { container, .. } => {
                match self.containers.get_mut(&container) {
                    Some(c) => {
                        self.changed |= c.state != "exited";
                        c.state = "exited".into();
                        (ok, format!("stopped {container}"), serde_json::json!({ "container": container }))
                    }
                    None => failed(format!("no managed container {container}")),
                }
            }
            Command::GatewaySet(weights) if self.gateway => match weights.validate() {
                Ok(()) => {
                    let detail = format!("upstream {} serves {} servers", weights.upstream, weights.servers.len());
                    let output = serde_json::json!({ "upstream": weights.upstream, "revision": weights.revision() });
                    self.upstreams.insert(weights.upstream.clone(), weights);
                    (ok, detail, output)
                }
                Err(e) => failed(format!("gateway-set: {e}")),
            },
            Command::GatewaySet(_) => failed("this agent has no [gateway] section".into()),
            other => failed(format!(
                "the fleet simulator executes only noop, deploy, drain, stop and gateway-set; {} was not run",
                other.name()
            )),
        }
    }

    /// The whole container list, as `AgentMessage.containers` carries it.
    fn report(&self) -> pb::ContainerReport {
        pb::ContainerReport {
            containers: self.containers.values().cloned().collect(),
            runtime_error: String::new(),
            listed_unix_ms: now_unix_ms(),
        }
    }

    /// `flotilla_inference_ready{endpoint=NAME} 1` for each running container.
    fn readiness(&self) -> impl Iterator<Item = pb::Sample> + '_ {
        self.containers.values().filter(|c| c.state == "running").map(|c| pb::Sample {
            name: "flotilla_inference_ready".into(),
            labels: HashMap::from([("endpoint".to_owned(), c.name.clone())]),
            value: 1.0,
        })
    }
}

/// The id of an envelope that failed verification, read without trusting it, so
/// that the refusal reaches the operator who sent it (as the real agent does).
fn untrusted_id(signed: &SignedEnvelope) -> Option<CommandId> {
    let body = signed.bytes.get(2..)?;
    postcard::from_bytes::<Envelope<Command>>(body).ok().map(|e| e.id)
}

/// The result message exactly as the real agent's uplink builds it.
fn command_result(
    id: Option<CommandId>,
    status: CommandStatus,
    detail: String,
    output: &serde_json::Value,
) -> pb::CommandResult {
    let status = match status {
        CommandStatus::Succeeded => pb::CommandStatus::Succeeded,
        CommandStatus::Failed => pb::CommandStatus::Failed,
        CommandStatus::Refused => pb::CommandStatus::Refused,
    };
    pb::CommandResult {
        command_id: id.map(|id| id.as_bytes().to_vec()).unwrap_or_default(),
        status: status.into(),
        detail,
        output_json: output.to_string(),
    }
}

async fn send(tx: &Outbox, body: Up) -> Result<()> {
    match timeout(SEND_TIMEOUT, tx.send(pb::AgentMessage { body: Some(body) })).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => bail!("stream closed"),
        Err(_) => bail!("controller not reading the stream for {}s", SEND_TIMEOUT.as_secs()),
    }
}

/// The first instant `base + k·interval` (k ≥ 0) not before `now`.
fn next_tick(base: Instant, interval: Duration, now: Instant) -> Instant {
    let behind = now.saturating_duration_since(base).as_nanos();
    let k = behind.div_ceil(interval.as_nanos().max(1));
    base + interval.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX))
}

fn gpu_uuid(agent: usize, gpu: u32) -> String {
    format!("GPU-{agent:08x}-0000-4000-8000-{gpu:012x}")
}

/// A distinct address per agent, which the gateway's upstream lists its replica by.
fn sim_address(index: usize) -> String {
    let i = index + 1;
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

fn inventory(id: &NodeId, index: usize, gpus: u32, gateway: bool) -> pb::Inventory {
    pb::Inventory {
        hostname: id.to_string(),
        os: "Ubuntu 24.04 LTS".into(),
        kernel: "6.8.0-sim".into(),
        cpu_model: "AMD EPYC 9654 96-Core Processor".into(),
        cpu_cores: 192,
        memory_total_bytes: 2 << 40,
        gpus: (0..gpus)
            .map(|g| pb::GpuInfo {
                index: g,
                uuid: gpu_uuid(index, g),
                model: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
            })
            .collect(),
        driver_version: "550.90.07".into(),
        cuda_version: "12.4".into(),
        agent_version: "fleet-sim".into(),
        gpu_source: "simulated".into(),
        labels: HashMap::from([("address".to_owned(), sim_address(index))]),
        containers: Some(pb::ContainerReport { listed_unix_ms: now_unix_ms(), ..Default::default() }),
        gateway: gateway.then(|| pb::GatewayInfo { nginx_version: "nginx/1.22.1".into() }),
        ..Default::default()
    }
}

/// A batch with values that move a little from seq to seq, like a busy host.
fn telemetry(seq: u64, agent: usize, uuids: &[String]) -> pb::TelemetryBatch {
    let wave = |g: u64| ((seq + g * 7 + agent as u64) % 100) as f64 / 100.0;
    let gpus = (0u32..)
        .zip(uuids)
        .map(|(g, uuid)| {
            let u = wave(u64::from(g));
            pb::GpuSample {
                index: g,
                uuid: uuid.clone(),
                utilization_ratio: Some(u),
                memory_utilization_ratio: Some(u * 0.8),
                memory_used_bytes: Some((u * (80u64 << 30) as f64) as u64),
                memory_total_bytes: Some(80 << 30),
                temperature_celsius: Some(35.0 + 40.0 * u),
                power_watts: Some(100.0 + 600.0 * u),
                power_limit_watts: Some(700.0),
                sm_clock_mhz: Some(1980),
                memory_clock_mhz: Some(2619),
                memory_temperature_celsius: Some(45.0 + 30.0 * u),
                energy_joules_total: Some(seq as f64 * 400.0),
                clock_event_reasons: Some(0),
                pcie_rx_bytes_per_second: Some(2.0e9 * u),
                pcie_tx_bytes_per_second: Some(1.0e9 * u),
                ecc_corrected_volatile_total: Some(0),
                ecc_uncorrected_volatile_total: Some(0),
                remapped_rows_pending: Some(false),
                remapped_rows_failed: Some(false),
                processes: vec![pb::GpuProcess {
                    pid: 4242 + g,
                    name: "python3".into(),
                    used_memory_bytes: Some(70 << 30),
                }],
                // Counters a healthy GPU leaves unset or empty.
                ..Default::default()
            }
        })
        .collect();
    let host = pb::HostSample {
        cpu_utilization_ratio: wave(3) * 0.5,
        load1: 40.0,
        load5: 38.5,
        load15: 37.0,
        memory_total_bytes: 2 << 40,
        memory_available_bytes: 1 << 40,
        filesystems: vec![pb::FilesystemSample {
            mount_point: "/".into(),
            device: "/dev/nvme0n1p2".into(),
            fs_type: "ext4".into(),
            size_bytes: 4 << 40,
            avail_bytes: 3 << 40,
        }],
        networks: vec![pb::NetworkSample {
            interface: "eth0".into(),
            receive_bytes_total: seq * 1_250_000_000,
            transmit_bytes_total: seq * 1_000_000_000,
        }],
        ..Default::default()
    };
    pb::TelemetryBatch { seq, created_unix_ms: now_unix_ms(), gpus, host: Some(host), ..Default::default() }
}

/// The controller child process; killed if dropped while running.
struct Controller {
    child: tokio::process::Child,
    pid: u32,
    addr: std::net::SocketAddr,
    log: PathBuf,
    data_dir: PathBuf,
}

impl Controller {
    /// Starts the controller on a free loopback port and waits until it accepts TCP.
    async fn start(bin: &Path, dir: &Path, tls: &TlsFiles, config: Option<&str>) -> Result<Self> {
        let mut controller = Self::spawn(bin, dir, tls, config, "controller.log")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(controller.addr).await.is_ok() {
                return Ok(controller);
            }
            if let Some(status) = controller.child.try_wait()? {
                bail!("the controller exited ({status}):\n{}", controller.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!("the controller did not listen on {} within {READY_TIMEOUT:?}", controller.addr);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the controller on a free loopback port with its store in
    /// `dir/controller`, `config` (TOML) as its config file and its output in
    /// `dir/log_name`; does not wait for it.
    fn spawn(bin: &Path, dir: &Path, tls: &TlsFiles, config: Option<&str>, log_name: &str) -> Result<Self> {
        // The controller cannot report a port it chose, so choose one; a race with
        // another process taking it in between is possible but harmless here.
        let addr =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("find a free port")?;
        let log = dir.join(log_name);
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let data_dir = dir.join("controller");
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("--listen").arg(addr.to_string()).arg("--data-dir").arg(&data_dir);
        cmd.arg("--ca").arg(&tls.ca).arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
        if let Some(text) = config {
            let path = dir.join("controller.toml");
            std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
            cmd.arg("--config").arg(path);
        }
        // Our environment must not reconfigure the controller under test.
        for var in ["FLOTILLA_CONTROLLER_CONFIG", "FLOTILLA_LOG_FORMAT", "RUST_LOG"] {
            cmd.env_remove(var);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::from(file.try_clone()?)).stderr(Stdio::from(file));
        let child = cmd.kill_on_drop(true).spawn().with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id().context("the controller exited at once")?;
        Ok(Self { child, pid, addr, log, data_dir })
    }

    /// The public command key the controller writes to its data dir, which every
    /// agent pins. The controller listens before it writes the key, so wait for it.
    async fn command_key(&self) -> Result<PinnedKey> {
        let path = self.data_dir.join("command-signing.pub");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match PinnedKey::load(&path) {
                Ok(key) => return Ok(key),
                Err(e) if Instant::now() > deadline => return Err(e).context("the controller's command key"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn cpu_seconds(&self) -> Result<f64> {
        machine::cpu_seconds(&self.pid.to_string())
    }

    /// Peak resident set size (VmHWM) in bytes.
    fn peak_rss_bytes(&self) -> Result<u64> {
        machine::status_bytes(self.pid, "VmHWM")
    }

    /// Resident set size now (VmRSS) in bytes.
    fn rss_bytes(&self) -> Result<u64> {
        machine::status_bytes(self.pid, "VmRSS")
    }

    /// SIGTERM, then SIGKILL if it does not exit within the grace.
    async fn stop(&mut self) {
        signal(self.pid, libc::SIGTERM);
        match timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if !status.success() => eprintln!("controller exited: {status}"),
            Ok(_) => {}
            Err(_) => {
                eprintln!("controller ignored SIGTERM for {STOP_TIMEOUT:?}; killing it");
                let _ = self.child.kill().await;
            }
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Prints how many warnings and errors the controller logged, and the first few.
    fn report_problems(&self) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let problems: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
        eprintln!("controller logged {} warnings and errors", problems.len());
        for line in problems.iter().take(5) {
            eprintln!("  {line}");
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

#[cfg(test)]
mod tests {
    use flotilla_common::envelope::{CommandKey, DEFAULT_TTL};

    use super::*;

    fn signed(key: &CommandKey, target: &str, command: Command) -> (CommandId, pb::SignedCommand) {
        let id = CommandId::new();
        let s = key.sign(id, &NodeId::new(target).unwrap(), command, DEFAULT_TTL, now_unix_ms()).unwrap();
        (id, pb::SignedCommand { envelope: s.bytes, signature: s.signature })
    }

    #[test]
    fn commands_are_answered_like_the_real_agent_after_verification() {
        let key = CommandKey::generate();
        let me = NodeId::new("sim-0001").unwrap();
        let mut report = AgentReport::default();
        let mut host = Host::new(false, 0, Arc::new(Tally::new(1)));

        let (id, noop) = signed(&key, "sim-0001", Command::Noop);
        let ok = answer(noop.clone(), &me, &key.public(), &mut report, &mut host);
        assert_eq!(ok.command_id, id.as_bytes().to_vec());
        assert_eq!(ok.status(), pb::CommandStatus::Succeeded);
        assert_eq!((ok.detail.as_str(), ok.output_json.as_str()), ("noop", r#"{"noop":true}"#));
        assert_eq!(answer(noop, &me, &key.public(), &mut report, &mut host), ok, "a resend gets the same result");

        let (id, other) = signed(&key, "sim-0002", Command::Noop);
        let refused = answer(other, &me, &key.public(), &mut report, &mut host);
        assert_eq!(refused.status(), pb::CommandStatus::Refused);
        assert_eq!(refused.command_id, id.as_bytes().to_vec(), "the refusal reaches its sender");
        assert!(refused.detail.contains("targets node sim-0002"), "{}", refused.detail);

        let (_, forged) = signed(&CommandKey::generate(), "sim-0001", Command::Noop);
        assert!(answer(forged, &me, &key.public(), &mut report, &mut host).detail.contains("signature"));

        let (_, logs) = signed(&key, "sim-0001", Command::Logs { container: "c".into(), tail: 1 });
        let failed = answer(logs, &me, &key.public(), &mut report, &mut host);
        assert_eq!(failed.status(), pb::CommandStatus::Failed);
        assert_eq!((report.verified, report.verify_failures), (5, 2));
        let (counts, resent) = host.tally.snapshot();
        assert_eq!((counts[0][4], counts[0][5], resent), (1, 1, 1), "one noop, one other, one resend");
    }

    #[test]
    fn deploys_run_until_drained_and_only_the_gateway_takes_weights() {
        let key = CommandKey::generate();
        let me = NodeId::new("sim-0001").unwrap();
        let mut report = AgentReport::default();
        let mut host = Host::new(false, 0, Arc::new(Tally::new(1)));
        let mut run = |host: &mut Host, command: Command| {
            let (_, c) = signed(&key, "sim-0001", command);
            answer(c, &me, &key.public(), &mut report, host)
        };

        let spec = r#"{"name":"llama","revision":"2","image":"vllm/vllm-openai:v0.8.5","gpus":[0]}"#;
        let started = run(&mut host, Command::Deploy { spec_yaml: spec.into() });
        assert_eq!(started.status(), pb::CommandStatus::Succeeded, "{}", started.detail);
        assert!(std::mem::take(&mut host.changed), "a deploy changes the container list");
        let listed = host.report();
        assert_eq!(listed.containers.len(), 1);
        let c = &listed.containers[0];
        assert_eq!((c.name.as_str(), c.state.as_str(), c.health.as_str()), ("llama-2", "running", ""));
        assert_eq!((c.deployment.as_str(), c.revision.as_str()), ("llama", "2"));
        assert!(flotilla_common::model::ContainerReport::try_from(listed).is_ok(), "the controller accepts it");
        let ready: Vec<pb::Sample> = host.readiness().collect();
        assert_eq!(ready.len(), 1);
        assert_eq!(
            (ready[0].name.as_str(), ready[0].labels["endpoint"].as_str()),
            ("flotilla_inference_ready", "llama-2")
        );

        let drain = Command::Drain {
            container: "llama-2".into(),
            endpoint: "http://10.0.0.1:18000".into(),
            deadline_s: 30,
            timeout_s: 30,
        };
        assert_eq!(run(&mut host, drain).status(), pb::CommandStatus::Succeeded);
        assert!(host.changed);
        assert_eq!(host.report().containers[0].state, "exited");
        assert_eq!(host.readiness().count(), 0, "an exited container is not ready");
        let missing = run(&mut host, Command::Stop { container: "nope".into(), timeout_s: 1 });
        assert_eq!(missing.status(), pb::CommandStatus::Failed);

        let weights = GatewayWeights::parse("llama", "10.0.0.1:18000=1,10.0.0.2:18000=1").unwrap();
        let no_role = run(&mut host, Command::GatewaySet(weights.clone()));
        assert_eq!(no_role.status(), pb::CommandStatus::Failed, "not a gateway");
        host.gateway = true;
        assert_eq!(run(&mut host, Command::GatewaySet(weights.clone())).status(), pb::CommandStatus::Succeeded);
        let mut twice = weights;
        twice.servers.push(twice.servers[0].clone());
        let refused = run(&mut host, Command::GatewaySet(twice));
        assert!(refused.detail.contains("listed twice"), "checked as the agent checks it: {}", refused.detail);
    }
}

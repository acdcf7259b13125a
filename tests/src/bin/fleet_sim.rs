//! `flotilla-fleet-sim`: a load benchmark. It starts the real controller binary,
//! opens N simulated agents (one mTLS connection each) that speak the agent
//! protocol, and prints one JSON line of throughput, ack latency and controller
//! cost. It measures; it does not judge.
//!
//! The simulated agents answer signed commands as a real agent does: each
//! envelope is verified against the controller's pinned public key with the
//! agent's own checks before `noop` succeeds (anything else fails unexecuted).
//! With `--fanout-noop` the sim also plays an admin operator who sends `noop`
//! to every agent at once, and reports how long the last result takes.

// The JSON line on stdout is this tool's product and progress goes to stderr, so
// printing is the point here, not a stray debug aid.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use flotilla_common::command::{Command, CommandStatus};
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
    /// Batch and heartbeat interval of every agent.
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
        if self.hot_agents > self.agents {
            bail!("--hot-agents is above --agents");
        }
        if self.hot_agents > 0 && self.rules.is_none() {
            bail!("--hot-agents needs --rules with a GPUHighTemperature rule");
        }
        if self.fanout_noop && self.fanout_rounds == 0 {
            bail!("--fanout-rounds must be above zero");
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
    let tmp = tempfile::Builder::new().prefix("flotilla-fleet-sim-").tempdir().context("create a temp dir")?;
    let started = Instant::now();
    let pki_dir = tmp.path().join("pki");
    let n = args.agents;
    let (controller_tls, nodes) =
        tokio::task::spawn_blocking(move || make_pki(&pki_dir, n)).await.context("certificate task")??;
    eprintln!("issued {n} agent certificates in {:.1}s", started.elapsed().as_secs_f64());
    let mut controller = Controller::start(&bin, tmp.path(), &controller_tls, args.rules.as_deref()).await?;
    // On SIGINT or SIGTERM, still stop the controller and remove the temp dir (the
    // store alone can reach gigabytes).
    let interrupted = flotilla_common::shutdown::on_signal();
    let pki_dir = tmp.path().join("pki");
    let outcome = tokio::select! {
        r = drive(&args, &controller, nodes, &pki_dir) => r,
        () = interrupted.cancelled() => Err(anyhow!("interrupted")),
    };
    let peak_rss = controller.peak_rss_bytes();
    controller.stop().await;
    match (outcome, peak_rss) {
        (Ok((mut report, stored)), Ok(rss)) => {
            report.controller_peak_rss_bytes = rss;
            controller.report_problems();
            let disk = disk_bytes(&tmp.path().join("controller"));
            let per_batch = disk / stored.max(1) as u64;
            eprintln!("controller store: {disk} bytes on disk for {stored} batches acked ({per_batch} bytes each)");
            Ok(report)
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("controller log tail ({}):\n{}", controller.log.display(), controller.log_tail(30));
            Err(e)
        }
    }
}

/// One simulated agent's identity.
struct SimNode {
    id: NodeId,
    tls: TlsFiles,
}

/// A fleet CA in `dir`, the controller's TLS files and one certificate per agent.
fn make_pki(dir: &Path, agents: usize) -> Result<(TlsFiles, Vec<SimNode>)> {
    let ca = pki::init_ca(dir, &CaInit::default()).context("create the fleet CA")?;
    let nodes = (1..=agents)
        .map(|i| {
            let id = NodeId::new(format!("sim-{i:04}"))?;
            let paths = pki::issue(dir, &Identity::Node(id.clone()), pki::LEAF_VALIDITY, false)
                .with_context(|| format!("issue the certificate of {id}"))?;
            let tls = TlsFiles::from_pki_dir(dir, &paths);
            Ok(SimNode { id, tls })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((TlsFiles::from_pki_dir(dir, &ca.controller), nodes))
}

/// Connects the fleet, measures one window and collects every agent's report.
/// Also returns how many batches were acknowledged over the whole run.
async fn drive(args: &Args, controller: &Controller, nodes: Vec<SimNode>, pki_dir: &Path) -> Result<(Report, usize)> {
    let key = controller.command_key().await?;
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id.clone()).collect();
    let fleet = Fleet::launch(args, format!("https://{}", controller.addr), key, nodes).await;
    let start = Instant::now() + args.warmup;
    {
        // Hot agents cross the threshold at random moments of the window's first 80 %.
        let mut hot = fleet.hot_at.lock().map_err(|_| anyhow!("hot plan lock"))?;
        for slot in hot.iter_mut().take(args.hot_agents) {
            *slot = Some(start + args.duration.mul_f64(rand::random::<f64>() * 0.8));
        }
    }
    sleep_until(start).await;
    let (cpu0, sim0) = (controller.cpu_seconds()?, cpu_seconds("self")?);
    // The fan-out runs inside the window, beside the telemetry load; it may outlast it.
    let fanout =
        async { if args.fanout_noop { Some(fanout_noop(args, controller, pki_dir, &ids).await) } else { None } };
    let window = async {
        sleep_until(start + args.duration).await;
        (controller.cpu_seconds(), cpu_seconds("self"), Instant::now())
    };
    let (fanout, (cpu1, sim1, end)) = tokio::join!(fanout, window);
    let (cpu1, sim1) = (cpu1?, sim1?);
    let fanout = fanout.transpose()?;
    let window = start..end;
    let (reports, mut errors) = fleet.finish((args.interval * 2).max(DRAIN)).await;

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
    eprintln!("window {secs:.1}s: {sent} batches sent, {acked} acked; simulator CPU {:.2}s", sim1 - sim0);
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
        alerts_fired: (args.hot_agents > 0).then_some(alert_latencies.len()),
        alert_latency_p50_ms: percentile_ms(&alert_latencies, 0.50),
        alert_latency_p99_ms: percentile_ms(&alert_latencies, 0.99),
        alert_latency_max_ms: alert_latencies.last().map(|d| round3(d.as_secs_f64() * 1000.0)),
        fanout: fanout.map(|f| f.report(&reports)),
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

/// The running simulated agents.
struct Fleet {
    /// When each agent (by index) makes its GPU 0 hot; `None`: never.
    hot_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>>,
    tasks: JoinSet<AgentReport>,
    stop: CancellationToken,
    close: CancellationToken,
}

impl Fleet {
    /// Spawns every agent and waits until each has connected or failed to.
    async fn launch(args: &Args, url: String, command_key: PinnedKey, nodes: Vec<SimNode>) -> Self {
        let plan = Arc::new(Plan {
            url,
            command_key,
            gpus: args.gpus_per_agent,
            interval: args.interval,
            agents: args.agents,
            epoch: Instant::now(),
        });
        let gate = Arc::new(Semaphore::new(args.connect_concurrency));
        let (stop, close) = (CancellationToken::new(), CancellationToken::new());
        let (connected_tx, mut connected_rx) = mpsc::channel(args.agents);
        let hot_at = Arc::new(std::sync::Mutex::new(vec![None; args.agents]));
        let mut tasks = JoinSet::new();
        for (index, node) in nodes.into_iter().enumerate() {
            let ctl = AgentCtl {
                plan: Arc::clone(&plan),
                gate: Arc::clone(&gate),
                connected: connected_tx.clone(),
                hot_at: Arc::clone(&hot_at),
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
            if outcomes == args.agents {
                break;
            }
        }
        let secs = plan.epoch.elapsed().as_secs_f64();
        eprintln!("{up} of {} agents connected in {secs:.1}s", args.agents);
        Self { hot_at, tasks, stop, close }
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

/// One agent's handles on the run.
struct AgentCtl {
    plan: Arc<Plan>,
    gate: Arc<Semaphore>,
    connected: mpsc::Sender<bool>,
    hot_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>>,
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
        Ok((tx, inbound)) => stream(index, &node.id, tx, inbound, &ctl, &mut report).await,
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
        inventory: Some(inventory(&node.id, index, plan.gpus)),
        heartbeat_interval_ms: u32::try_from(plan.interval.as_millis())?,
    };
    send(&tx, Up::Hello(hello)).await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await? {
        Some(pb::ControllerMessage { body: Some(Down::Welcome(_)) }) => Ok((tx, inbound)),
        _ => bail!("the first message was not a welcome"),
    }
}

/// Sends a batch and a heartbeat every interval and matches acks to batches.
async fn stream(
    index: usize,
    me: &NodeId,
    tx: Outbox,
    mut inbound: Streaming<pb::ControllerMessage>,
    ctl: &AgentCtl,
    report: &mut AgentReport,
) -> Result<()> {
    let plan = &ctl.plan;
    let offset = plan.interval.mul_f64(index as f64 / plan.agents as f64);
    let first = next_tick(plan.epoch + offset, plan.interval, Instant::now());
    let mut batches = tokio::time::interval_at(first, plan.interval);
    let mut heartbeats = tokio::time::interval_at(first + plan.interval / 2, plan.interval);
    heartbeats.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let uuids: Vec<String> = (0..plan.gpus).map(|g| gpu_uuid(index, g)).collect();
    let (mut seq, mut sending) = (0, true);
    loop {
        tokio::select! {
            () = ctl.close.cancelled() => return Ok(()),
            () = ctl.stop.cancelled(), if sending => {
                sending = false;
                if report.pending.is_empty() { return Ok(()) }
            }
            _ = batches.tick(), if sending => {
                seq += 1;
                let made = Instant::now();
                let mut batch = telemetry(seq, index, &uuids);
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
            _ = heartbeats.tick() => {
                send(&tx, Up::Heartbeat(pb::Heartbeat { sent_unix_ms: now_unix_ms() })).await?;
            }
            msg = inbound.message() => match msg? {
                Some(pb::ControllerMessage { body: Some(Down::Ack(ack)) }) => {
                    let now = Instant::now();
                    for s in ack.seqs {
                        if let Some(made) = report.pending.remove(&s) {
                            report.acks.push((now, now - made));
                        }
                    }
                    if !sending && report.pending.is_empty() { return Ok(()) }
                }
                Some(pb::ControllerMessage { body: Some(Down::Command(signed)) }) => {
                    let result = answer(signed, me, &plan.command_key, report);
                    send(&tx, Up::CommandResult(result)).await?;
                }
                Some(_) => {}
                None => bail!("the controller closed the stream"),
            },
        }
    }
}

/// Answers a signed command as the real agent does (its `Gate` and executor):
/// nothing in the envelope is used before it verifies against the pinned key for
/// this node within its validity; then `noop` succeeds with the agent's own result
/// and any other command fails unexecuted, since the simulator has no host.
fn answer(signed: pb::SignedCommand, me: &NodeId, key: &PinnedKey, report: &mut AgentReport) -> pb::CommandResult {
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
        return stored.clone();
    }
    let result = match envelope.payload {
        Command::Noop => command_result(
            Some(envelope.id),
            CommandStatus::Succeeded,
            "noop".into(),
            &serde_json::json!({ "noop": true }),
        ),
        other => command_result(
            Some(envelope.id),
            CommandStatus::Failed,
            format!("the fleet simulator executes only noop; {} was not run", other.name()),
            &serde_json::json!({}),
        ),
    };
    report.results.insert(envelope.id, result.clone());
    result
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

fn inventory(id: &NodeId, index: usize, gpus: u32) -> pb::Inventory {
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
    async fn start(bin: &Path, dir: &Path, tls: &TlsFiles, rules: Option<&Path>) -> Result<Self> {
        // The controller cannot report a port it chose, so choose one; a race with
        // another process taking it in between is possible but harmless here.
        let addr =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("find a free port")?;
        let log = dir.join("controller.log");
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let data_dir = dir.join("controller");
        let mut cmd = tokio::process::Command::new(bin);
        cmd.arg("--listen").arg(addr.to_string()).arg("--data-dir").arg(&data_dir);
        cmd.arg("--ca").arg(&tls.ca).arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
        if let Some(rules) = rules {
            // Every agent connects before the window: no restart grace is needed.
            let config = dir.join("controller.toml");
            let rules = rules.canonicalize().with_context(|| format!("rules file {}", rules.display()))?;
            std::fs::write(
                &config,
                format!("[alerting]\nrules = {:?}\nrestart_grace = \"0s\"\n", rules.display().to_string()),
            )?;
            cmd.arg("--config").arg(config);
        }
        // Our environment must not reconfigure the controller under test.
        for var in ["FLOTILLA_CONTROLLER_CONFIG", "FLOTILLA_LOG_FORMAT", "RUST_LOG"] {
            cmd.env_remove(var);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::from(file.try_clone()?)).stderr(Stdio::from(file));
        let child = cmd.kill_on_drop(true).spawn().with_context(|| format!("start {}", bin.display()))?;
        let pid = child.id().context("the controller exited at once")?;
        let mut controller = Self { child, pid, addr, log, data_dir };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(controller);
            }
            if let Some(status) = controller.child.try_wait()? {
                bail!("the controller exited ({status}):\n{}", controller.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!("the controller did not listen on {addr} within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
        cpu_seconds(&self.pid.to_string())
    }

    /// Peak resident set size (VmHWM) in bytes.
    fn peak_rss_bytes(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).with_context(|| path.clone())?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .with_context(|| format!("{path}: no VmHWM"))?;
        Ok(kib * 1024)
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

/// Bytes of the files under `dir`, recursively.
fn disk_bytes(dir: &Path) -> u64 {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// User plus system CPU time of a process (`self` or a pid), in seconds.
fn cpu_seconds(pid: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    // The command name (field 2) may hold spaces; the fields after its ')' do not.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        // Field n (1-based, man 5 proc) is at n - 3 once pid and comm are cut off.
        let v = fields.get(n - 3).with_context(|| format!("{path}: short"))?;
        v.parse().with_context(|| format!("{path}: field {n} is {v:?}"))
    };
    Ok((field(14)? + field(15)?) as f64 / clock_ticks())
}

#[allow(unsafe_code)]
fn clock_ticks() -> f64 {
    // SAFETY: sysconf(3) only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
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

        let (id, noop) = signed(&key, "sim-0001", Command::Noop);
        let ok = answer(noop.clone(), &me, &key.public(), &mut report);
        assert_eq!(ok.command_id, id.as_bytes().to_vec());
        assert_eq!(ok.status(), pb::CommandStatus::Succeeded);
        assert_eq!((ok.detail.as_str(), ok.output_json.as_str()), ("noop", r#"{"noop":true}"#));
        assert_eq!(answer(noop, &me, &key.public(), &mut report), ok, "a resend gets the same result");

        let (id, other) = signed(&key, "sim-0002", Command::Noop);
        let refused = answer(other, &me, &key.public(), &mut report);
        assert_eq!(refused.status(), pb::CommandStatus::Refused);
        assert_eq!(refused.command_id, id.as_bytes().to_vec(), "the refusal reaches its sender");
        assert!(refused.detail.contains("targets node sim-0002"), "{}", refused.detail);

        let (_, forged) = signed(&CommandKey::generate(), "sim-0001", Command::Noop);
        assert!(answer(forged, &me, &key.public(), &mut report).detail.contains("signature"));

        let (_, logs) = signed(&key, "sim-0001", Command::Logs { container: "c".into(), tail: 1 });
        let failed = answer(logs, &me, &key.public(), &mut report);
        assert_eq!(failed.status(), pb::CommandStatus::Failed);
        assert_eq!((report.verified, report.verify_failures), (5, 2));
    }
}

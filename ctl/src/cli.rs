//! The command-line grammar of flotctl.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// flotctl — operate a Flotilla fleet of GPU nodes serving LLMs.
#[derive(Debug, Parser)]
#[command(name = "flotctl", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// flotctl config file with named contexts [default: $XDG_CONFIG_HOME/flotilla/config.toml].
    #[arg(long, global = true, env = "FLOTCTL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Colour tables: auto (only on a terminal, and not when NO_COLOR is set), always or never.
    #[arg(long, global = true, value_enum, default_value_t, value_name = "WHEN")]
    pub color: ColorChoice,
    /// Export this command's spans to an OTLP/gRPC collector (e.g. http://127.0.0.1:4317) and pass the trace on to the controller.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// CA certificate (PEM) of an https OTLP collector.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_CERTIFICATE", value_name = "PEM")]
    pub otlp_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// When tables are coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ColorChoice {
    /// On a terminal, unless the NO_COLOR environment variable is set (and not empty).
    #[default]
    Auto,
    /// Always, even through a pipe and with NO_COLOR set.
    Always,
    /// Never.
    Never,
}

/// How to reach the controller; each flag overrides the current context.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnArgs {
    /// Controller address, https://HOST:PORT.
    #[arg(long, global = true, env = "FLOTILLA_CONTROLLER")]
    pub controller: Option<String>,
    /// Fleet CA certificate (PEM).
    #[arg(long, global = true)]
    pub cacert: Option<PathBuf>,
    /// Operator certificate (PEM).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Operator private key (PEM).
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// Use this named context instead of the current one.
    #[arg(long, global = true)]
    pub context: Option<String>,
}

/// Output format of read commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// A table for people.
    #[default]
    Table,
    /// A table with more columns (e.g. nodes: GPU model, driver, agent, address, labels).
    Wide,
    /// JSON for scripts.
    Json,
    /// YAML for people who prefer it.
    Yaml,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fleet nodes: list and inspect.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Stored telemetry: query series with a Prometheus selector.
    #[command(subcommand)]
    Metrics(MetricsCmd),
    /// The fleet CA.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Certificates for agents and operators.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Join tokens: let new agents enroll (get a certificate) on first start.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Named connection settings.
    #[command(subcommand)]
    Context(ContextCmd),
    /// Run a local fleet (controller + agents with simulated GPUs) in this process.
    Demo(DemoArgs),
    /// Simulated GPUs (demo and labs): inject faults.
    #[command(subcommand)]
    Sim(SimCmd),
    /// Run a signed command on a node (or on many, by label selector).
    Exec(ExecArgs),
    /// The hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Alerts: list, acknowledge, silence.
    #[command(subcommand)]
    Alerts(AlertsCmd),
    /// Alert rules: check a file, list the loaded rules, reload.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Deployments: apply a spec, preview its plan, list, show history.
    #[command(subcommand)]
    Deploy(DeployCmd),
    /// Rollouts: follow one, pause, resume, abort or undo it.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Capacity planning: a team's demand, a model's GPU memory, the fleet's measured capacity.
    #[command(subcommand)]
    Capacity(CapacityCmd),
    /// Run the troubleshooting guide against a node's or deployment's live data.
    Diagnose(DiagnoseArgs),
    /// A live dashboard of the fleet in the terminal: nodes, GPUs, tokens/s, alerts.
    Top(TopArgs),
    /// Approve (or reject) an action held by the two-person rule: `flotctl approve ID`.
    Approve(ApproveArgs),
    /// Actions held by the two-person rule, waiting for a second admin.
    #[command(subcommand)]
    Approvals(ApprovalsCmd),
    /// Backups of the controller's store (admin).
    #[command(subcommand)]
    Backup(BackupCmd),
    /// flotctl's version and the controller's, with a warning when they differ.
    Version(VersionArgs),
    /// Print a shell completion script, e.g. `source <(flotctl completion bash)`; with --dir,
    /// write those for bash, zsh and fish (for packagers; no controller needed).
    Completion(CompletionArgs),
    /// Write a man page for flotctl and each of its commands into a directory.
    Man(ManArgs),
}

/// The arguments of `completion`.
#[derive(Debug, Clone, Args)]
pub struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum, required_unless_present = "dir", conflicts_with = "dir")]
    pub shell: Option<clap_complete::Shell>,
    /// Write flotctl.bash, _flotctl (zsh) and flotctl.fish into this directory (created if missing).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The arguments of `man`.
#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Directory to write the pages into (created if missing), e.g. /usr/local/share/man/man1.
    #[arg(long)]
    pub dir: PathBuf,
}

/// `--watch` and `--interval` of a list command.
#[derive(Debug, Clone, Copy, Args)]
pub struct WatchArgs {
    /// Re-run the list every --interval and print it again until Ctrl-C: redrawn in place on a
    /// terminal, frames separated by a blank line when piped, one JSON document a line with -o json.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// With --watch: how often to list, e.g. 5s or 500ms (at least 100ms).
    #[arg(long, default_value = "2s", value_parser = parse_interval, requires = "watch")]
    pub interval: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum DeployCmd {
    /// Apply a deployment spec: a new revision and the rollout to it (nothing when the
    /// serving revision already has this spec).
    Apply {
        /// The deployment spec (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// Show the rollout plan a spec would get, without storing or starting anything.
    Plan {
        /// The deployment spec (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// Every deployment with its serving revision, replicas and latest rollout.
    Ls {
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// A deployment's revisions and rollouts, oldest first.
    History {
        /// Deployment name.
        name: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// A rollout's state, step, gateway weights, gate readings and recent events.
    Status {
        /// Deployment name.
        name: String,
        /// This rollout [default: the running or latest one].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        number: Option<u64>,
        /// Poll until the rollout ends (succeeded, rolled_back, failed or aborted); with
        /// -o json, one compact JSON object a line.
        #[arg(short = 'w', long)]
        watch: bool,
        /// With --watch: how often to poll, e.g. 1s or 500ms.
        #[arg(long, default_value = "1s", value_parser = parse_interval, requires = "watch")]
        interval: std::time::Duration,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// Hold the running rollout where it is: no next step starts and the gateway weights stay.
    Pause(RolloutOpArgs),
    /// Resume a paused rollout (this also promotes one that awaits promotion).
    Resume(RolloutOpArgs),
    /// Stop the running rollout and go back to the previous revision, traffic first.
    Abort(RolloutOpArgs),
    /// Abort the running rollout, or roll back to the last stable revision.
    Undo(RolloutOpArgs),
}

/// The arguments of a rollout operation.
#[derive(Debug, Clone, Args)]
pub struct RolloutOpArgs {
    /// Deployment name.
    pub name: String,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

/// A watch interval: at least 100 ms, so a typo cannot hammer the controller.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_millis(100) {
        return Err("the interval must be at least 100ms".to_owned());
    }
    Ok(d)
}

/// Alert states to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlertStateArg {
    Pending,
    Firing,
    Resolved,
}

#[derive(Debug, Subcommand)]
pub enum AlertsCmd {
    /// Pending, firing and recently resolved alerts, newest change first.
    Ls {
        /// Only alerts in this state.
        #[arg(long)]
        state: Option<AlertStateArg>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Acknowledge an alert: a critical alert stops re-notifying until it fires again.
    Ack {
        /// Alert id (from `flotctl alerts ls`).
        id: String,
        /// Why, for the others on call and the audit log.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Silence the alerts that match every --match for a while (they are tracked, not delivered).
    Silence {
        /// A label matcher such as 'node="gpu-3"' or 'alertname=~"GPU.*"' (repeatable).
        #[arg(long = "match", value_name = "MATCHER", required = true)]
        matchers: Vec<String>,
        /// How long, e.g. 30m or 2h (at most 30d).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Why: required, so the next person on call knows.
        #[arg(long)]
        comment: String,
    },
    /// End a silence now.
    Unsilence {
        /// Silence id (from `flotctl alerts silences`).
        id: String,
    },
    /// Alert state changes and acknowledgements, oldest first (kept alerting.history_retention).
    History {
        /// Only the events of this alert id.
        #[arg(long)]
        id: Option<String>,
        /// At most this many, the newest.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// List silences.
    Silences {
        /// Also list expired silences.
        #[arg(long)]
        all: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum RulesCmd {
    /// Check a rule file locally (no controller needed): exit 0 when it would load,
    /// 1 with every problem (file:line: rule: reason) when not.
    Check {
        /// The rule file (Prometheus rule-group YAML).
        file: PathBuf,
    },
    /// The rules the controller runs, with the health of their last evaluation.
    Ls {
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// Make the controller re-read its rule file; a bad file keeps the running rules.
    Reload,
}

#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// NODE COMMAND, or just COMMAND with --selector. COMMAND is one of noop,
    /// prestart-check, diagnostics, inspect, logs, stop, restart, drain, deploy,
    /// gateway-set.
    #[arg(num_args = 1..=2, required = true, value_names = ["NODE", "COMMAND"])]
    pub words: Vec<String>,
    /// Command argument KEY=VALUE (repeatable), e.g. container=NAME, tail=100,
    /// model_path=/models/llama, min_free_bytes=..., image=..., endpoint=http://127.0.0.1:8000.
    /// gateway-set (on a node whose agent has [gateway]) takes upstream=NAME and
    /// servers=HOST:PORT=WEIGHT,... with weights 0..=100 (0: kept out of rotation), e.g.
    /// --arg upstream=llama --arg servers=10.0.0.5:8000=90,10.0.0.6:8000=10
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    pub args: Vec<String>,
    /// Container spec (YAML) for deploy.
    #[arg(short = 'f', long = "file")]
    pub file: Option<std::path::PathBuf>,
    /// Run on every node whose labels match KEY=VALUE[,KEY=VALUE...] instead of one node.
    #[arg(long)]
    pub selector: Option<String>,
    /// With --selector: how many nodes run at once (a sliding window).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub batch: u32,
    /// With --selector: keep going after a node fails (default: stop starting new ones).
    #[arg(long)]
    pub continue_on_error: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a join token (admin). It is printed once; the controller keeps only its hash.
    Create {
        /// How long it may be used (at most 24h).
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// Labels the enrolled nodes report, k=v,k=v (the agent's own labels win).
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// Revoke a join token at once (admin): nobody can enroll with it any more;
    /// nodes it already enrolled stay (revoke them with `flotctl nodes revoke`).
    Revoke {
        /// The token id, from `flotctl token ls`.
        id: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// List join tokens (admin): state, uses, expiry, the nodes they enrolled; never secrets.
    Ls {
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
        #[command(flatten)]
        watch: WatchArgs,
    },
}

/// Parses one `k=v` label.
fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("label {text:?}: use NAME=VALUE"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// List audit records, oldest first.
    Ls {
        /// Only records newer than this, e.g. 1h or 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// Recompute the hash chain: exit 0 with the record count when intact, 1 naming the first broken record.
    Verify,
}

#[derive(Debug, Subcommand)]
pub enum SimCmd {
    /// Inject a fault into a simulated node's GPUs: overheat, memory-creep, saturate, xid=CODE, gpu-lost, clear.
    Inject {
        /// Node id.
        node: String,
        /// overheat | memory-creep | xid=CODE | gpu-lost | clear
        fault: String,
        /// Only this GPU (index); default every GPU of the node.
        #[arg(long)]
        gpu: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesCmd {
    /// List every node with its state and GPU summary (-o wide: GPU model, driver, agent, address, labels).
    Ls {
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Show one node: inventory and per-GPU latest values.
    Show {
        /// Node id.
        node: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// Revoke a node (admin): its stream is closed now and every later one refused. Audited; no undo yet.
    Revoke {
        /// Node id.
        node: String,
        /// Why, for the audit log and the node's refusals.
        #[arg(long)]
        reason: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum MetricsCmd {
    /// Series matching SELECTOR over the last --since, e.g.
    /// 'flotilla_gpu_temperature_celsius{node="gpu-a"}'. Names and labels are those of the
    /// controller's /metrics; ranges past the raw window come from one-minute rollups.
    Get {
        /// A Prometheus selector: name{label="v",label!="v",label=~"re",label!~"re"}.
        selector: String,
        /// How far back to look, e.g. 10m, 6h or 7d.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// One point per step: the mean of a gauge, the last value of a counter; 0s keeps
        /// every stored sample [default: --since / 240, at least 1s].
        #[arg(long, value_parser = humantime::parse_duration)]
        step: Option<std::time::Duration>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Create a fleet CA, the controller certificate and an admin operator certificate.
    Init {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// DNS names and IPs of the controller certificate (repeat or comma-separate).
        #[arg(long = "san", value_delimiter = ',', default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        sans: Vec<String>,
        /// Name of the first operator (role admin).
        #[arg(long, default_value = "admin")]
        admin: String,
        /// Overwrite an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Issue a certificate from the CA in DIR: an agent's (--node) or an operator's (--user).
    Issue {
        /// Node id for an agent certificate.
        #[arg(long, conflicts_with_all = ["user", "role"], required_unless_present = "user")]
        node: Option<String>,
        /// Operator name for an operator certificate.
        #[arg(long)]
        user: Option<String>,
        /// Operator role: viewer, operator or admin.
        #[arg(long, requires = "user", default_value = "viewer")]
        role: String,
        /// The PKI directory of `flotctl ca init`.
        #[arg(long)]
        dir: PathBuf,
        /// Validity, e.g. 72h or 365d.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        validity: std::time::Duration,
        /// Overwrite an existing certificate.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ContextCmd {
    /// List contexts; the current one is marked.
    Ls {
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// Make NAME the current context.
    Use { name: String },
    /// Create or replace a context from the connection flags.
    Set {
        name: String,
        /// Also make it current.
        #[arg(long)]
        activate: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Number of agents.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub agents: u32,
    /// Simulated GPUs per agent.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub gpus_per_agent: u32,
    /// Keep the demo's CA, store and agent state here (default: a temporary directory, removed at exit).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Controller listen address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Serve the fleet-wide Prometheus /metrics (mTLS) on this address, e.g. 127.0.0.1:9443.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Alert rule file to load (e.g. deploy/rules/default.yml).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Telemetry interval of the demo agents.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: std::time::Duration,
}

#[derive(Debug, Subcommand)]
pub enum CapacityCmd {
    /// The sizing worksheet: the peak tokens/s a team needs, compared with the fleet's
    /// measured capacity when a controller is reachable (works without one).
    Plan(CapacityPlanArgs),
    /// Whether a model fits in GPU memory: weights, KV cache, overhead, and which nodes and
    /// tensor-parallel sizes can host it (the sizes alone without a controller).
    Fit(CapacityFitArgs),
    /// The fleet's measured capacity per endpoint and model, with scaling recommendations.
    Report {
        /// The window rates and means are measured over, e.g. 10m or 1h.
        #[arg(long, default_value = "10m", value_parser = parse_window)]
        window: std::time::Duration,
        /// Electricity price per kWh, for the cost per 1,000 tokens (in that price's currency).
        #[arg(long, value_parser = parse_price)]
        price_per_kwh: Option<f64>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
}

/// The seed's usage tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UsageArg {
    /// 20-50 requests a user a day (35 taken), 2,000 tokens each.
    Light,
    /// 50-150 requests a user a day (100 taken), 3,000 tokens each.
    Medium,
    /// 150-300 requests a user a day (225 taken), 4,000 tokens each.
    Heavy,
}

/// The arguments of `capacity plan`.
#[derive(Debug, Clone, Args)]
pub struct CapacityPlanArgs {
    /// Developers using the service.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub team: u32,
    /// Usage tier.
    #[arg(long, value_enum)]
    pub usage: UsageArg,
    /// Requests per user per day [default: the tier's midpoint].
    #[arg(long, value_name = "R")]
    pub requests_per_user: Option<f64>,
    /// Tokens per request, prompt and response [default: the tier's].
    #[arg(long, value_name = "T")]
    pub tokens_per_request: Option<f64>,
    /// Share of a day's requests that falls in the peak hour, in (0, 1].
    #[arg(long, default_value_t = 0.1)]
    pub peak_share: f64,
    /// Headroom above the peak, 0.4 = 40 % (the seed asks for 30-50 %).
    #[arg(long, default_value_t = 0.4, allow_negative_numbers = true)]
    pub headroom: f64,
    /// Compare only with this model's measured capacity [default: every model].
    #[arg(long)]
    pub model: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

/// How weights or the KV cache are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Fp32,
    Bf16,
    Fp16,
    Fp8,
    Int8,
    Int4,
    Awq,
    Gptq,
}

/// The arguments of `capacity fit`: a model config, or its sizes by hand.
#[derive(Debug, Clone, Args)]
pub struct CapacityFitArgs {
    /// The model's Hugging Face config.json (--config is flotctl's own config file).
    #[arg(long, value_name = "PATH")]
    pub model_config: Option<PathBuf>,
    /// Parameter count, e.g. 8B, 70.6B or 7240M; with --model-config, instead of the estimate.
    #[arg(long, required_unless_present = "model_config")]
    pub params: Option<String>,
    /// Decoder layers.
    #[arg(long, required_unless_present = "model_config", conflicts_with = "model_config")]
    pub layers: Option<u32>,
    /// Key-value heads (attention heads without grouped-query attention).
    #[arg(long, required_unless_present = "model_config", conflicts_with = "model_config")]
    pub kv_heads: Option<u32>,
    /// Size of one attention head.
    #[arg(long, required_unless_present = "model_config", conflicts_with = "model_config")]
    pub head_dim: Option<u32>,
    /// Query heads, when known: tensor-parallel sizes must divide them.
    #[arg(long, conflicts_with = "model_config")]
    pub attention_heads: Option<u32>,
    /// Weight storage [default: what config.json says, else bf16].
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// KV cache storage [default: the model's compute type: the dtype, or 16-bit for quantised weights].
    #[arg(long, value_enum)]
    pub kv_dtype: Option<DtypeArg>,
    /// Tokens per sequence, prompt and output (--context names a flotctl context).
    #[arg(long, visible_alias = "max-model-len", default_value_t = 8192)]
    pub context_length: u64,
    /// Sequences served at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u64,
    /// Share of each GPU's memory the server may take (vLLM's --gpu-memory-utilization).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

/// The arguments of `diagnose`.
#[derive(Debug, Clone, Args)]
pub struct DiagnoseArgs {
    /// A node id or a deployment name.
    #[arg(value_name = "NODE|DEPLOYMENT")]
    pub target: String,
    /// How far back to look, e.g. 10m or 1h.
    #[arg(long, default_value = "10m", value_parser = parse_window)]
    pub window: std::time::Duration,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

/// The arguments of `top`.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// How often to list nodes and alerts, e.g. 2s or 500ms (telemetry streams in as it comes).
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    pub refresh: std::time::Duration,
}

/// A measurement window of at least a second; 0 would mean the controller's default,
/// which nobody typing a window means. The controller enforces its own bounds.
fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err("the window must be at least 1s".to_owned());
    }
    Ok(d)
}

/// A price: a finite number, zero or more.
fn parse_price(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a price: expected a number of 0 or more, e.g. 0.30")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_grammar_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

/// The arguments of `approve`.
#[derive(Debug, Clone, Args)]
pub struct ApproveArgs {
    /// The approval id, from the held command's message or `flotctl approvals ls`.
    pub id: String,
    /// Reject it instead (an admin, or its requester withdrawing it); needs --reason.
    #[arg(long)]
    pub reject: bool,
    /// Why: required to reject, recorded in the audit log either way.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Return once decided, without waiting for the approved action to finish.
    #[arg(long)]
    pub no_wait: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// Pending and running approvals (with --all, the decided ones too).
    Ls {
        #[arg(long)]
        all: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
    /// One approval, with its decision and outcome.
    Show {
        id: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Stream a consistent snapshot of the controller's store into FILE (written
    /// 0600: it holds the command-signing key), checking its SHA-256.
    Create {
        /// Where to write the backup; refused if it exists.
        file: PathBuf,
        /// Also raw telemetry and rollups (large; copied after the state).
        #[arg(long)]
        telemetry: bool,
    },
}

/// The arguments of `version`.
#[derive(Debug, Clone, Args)]
pub struct VersionArgs {
    /// Only flotctl's own version; do not ask the controller.
    #[arg(long)]
    pub client: bool,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Format,
}

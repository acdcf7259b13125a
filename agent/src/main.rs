//! `flotilla-agent`: parses flags, loads config, runs the agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use flotilla_agent::config::{Config, GpuSourceChoice, Overrides};
use flotilla_common::NodeId;
use flotilla_common::enroll::{CaFingerprint, JoinToken};
use flotilla_common::logging::LogFormat;

/// The Flotilla agent: streams GPU and host telemetry to the controller over mTLS gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file (see deploy/agent.toml).
    #[arg(long, short = 'c', env = "FLOTILLA_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Controller address, https://HOST:PORT.
    #[arg(long, env = "FLOTILLA_CONTROLLER")]
    controller: Option<String>,
    /// Node id to claim (must match the certificate; defaults to it).
    #[arg(long, env = "FLOTILLA_NODE_ID")]
    node_id: Option<NodeId>,
    /// Fleet CA certificate (PEM).
    #[arg(long, env = "FLOTILLA_CA")]
    ca: Option<PathBuf>,
    /// Agent certificate (PEM).
    #[arg(long, env = "FLOTILLA_CERT")]
    cert: Option<PathBuf>,
    /// Agent private key (PEM).
    #[arg(long, env = "FLOTILLA_KEY")]
    key: Option<PathBuf>,
    /// State directory.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Telemetry interval, e.g. 1s or 500ms.
    #[arg(long, env = "FLOTILLA_INTERVAL", value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// GPU source: nvml (default), none or simulated.
    #[arg(long, env = "FLOTILLA_GPU_SOURCE", value_parser = parse_gpu_source)]
    gpu_source: Option<GpuSourceChoice>,
    /// Number of simulated GPUs.
    #[arg(long, env = "FLOTILLA_SIMULATED_GPUS")]
    simulated_gpus: Option<u32>,
    /// Diagnostics: append every acknowledged seq to this file.
    #[arg(long, env = "FLOTILLA_ACK_LOG")]
    ack_log: Option<PathBuf>,
    /// The controller's command-signing public key to pin (command-signing.pub).
    #[arg(long, env = "FLOTILLA_COMMAND_KEY")]
    command_key: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "FLOTILLA_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Join token (flotctl token create): enroll when --cert does not exist yet.
    /// Prefer FLOTILLA_JOIN_TOKEN or the config file: other users can read flags.
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<JoinToken>,
    /// The fleet CA's SHA-256 to pin while enrolling (sha256:HEX), when the token does not carry it.
    #[arg(long, env = "FLOTILLA_CA_FINGERPRINT")]
    ca_fingerprint: Option<CaFingerprint>,
    /// The controller's enrollment port, https://HOST:PORT (its enroll_listen).
    #[arg(long, env = "FLOTILLA_ENROLL_URL")]
    enroll_url: Option<String>,
    /// Export spans to this OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (overrides tracing.otlp_endpoint).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

fn parse_gpu_source(s: &str) -> Result<GpuSourceChoice, String> {
    match s {
        "nvml" => Ok(GpuSourceChoice::Nvml),
        "none" => Ok(GpuSourceChoice::None),
        "simulated" => Ok(GpuSourceChoice::Simulated),
        other => Err(format!("unknown GPU source {other:?}: use nvml, none or simulated")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    flotilla_common::tls::install_crypto_provider();
    let overrides = Overrides {
        controller: args.controller,
        node_id: args.node_id,
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        data_dir: args.data_dir,
        interval: args.interval,
        gpu_source: args.gpu_source,
        simulated_gpus: args.simulated_gpus,
        ack_log: args.ack_log,
        command_key: args.command_key,
        log_format: args.log_format,
        join_token: args.join_token,
        ca_fingerprint: args.ca_fingerprint,
        enroll_url: args.enroll_url,
        otlp_endpoint: args.otlp_endpoint,
    };
    flotilla_common::daemon::main(
        "flotilla-agent",
        Config::load(args.config.as_deref(), overrides),
        |c| (c.log_format, c.tracing.clone()),
        flotilla_agent::run,
    )
}

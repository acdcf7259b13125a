//! `flotilla-controller`: parses flags, loads config, runs the controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use flotilla_common::logging::LogFormat;
use flotilla_controller::config::{Config, Overrides};

/// Every batch is decoded into a few dozen small allocations and freed after its
/// commit, across many threads: with glibc's malloc that took about a sixth of
/// the controller's CPU under load, and 10,000 agents did not fit on two cores
/// (BENCHMARKS.md, "Against the anchors").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The Flotilla controller: fleet state, telemetry store and operator API over mTLS gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file (see deploy/controller.toml).
    #[arg(long, short = 'c', env = "FLOTILLA_CONTROLLER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on for agents and operators (mTLS gRPC).
    #[arg(long, env = "FLOTILLA_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address of the HTTPS (mTLS) /metrics, /healthz and /readyz endpoint.
    #[arg(long, env = "FLOTILLA_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Directory of the sled store.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Fleet CA certificate (PEM).
    #[arg(long, env = "FLOTILLA_CA")]
    ca: Option<PathBuf>,
    /// Controller server certificate (PEM).
    #[arg(long, env = "FLOTILLA_CERT")]
    cert: Option<PathBuf>,
    /// Controller private key (PEM).
    #[arg(long, env = "FLOTILLA_KEY")]
    key: Option<PathBuf>,
    /// Fleet CA private key (PEM): lets the controller sign enrolling and renewing agents' certificates.
    #[arg(long, env = "FLOTILLA_CA_KEY")]
    ca_key: Option<PathBuf>,
    /// Address of the enrollment port (TLS, server authentication only; needs --ca-key).
    #[arg(long, env = "FLOTILLA_ENROLL_LISTEN")]
    enroll_listen: Option<SocketAddr>,
    /// Alert rule file (Prometheus rule-group YAML, e.g. deploy/rules/default.yml).
    #[arg(long, env = "FLOTILLA_RULES")]
    rules: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "FLOTILLA_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Export spans to this OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (overrides tracing.otlp_endpoint).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Option<Offline>,
}

/// Work on a stopped controller's data instead of running it.
#[derive(Debug, clap::Subcommand)]
enum Offline {
    /// Rebuild a store from a backup (`flotctl backup create`) into an empty data dir.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The data dir to create the store in; it must not hold a store yet.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Check a backup file's structure and checksum, and say what it holds.
    VerifyBackup {
        /// The backup file.
        file: PathBuf,
    },
}

/// Runs an offline subcommand, printing what it did (to the terminal that ran
/// it: no daemon, no log).
#[allow(clippy::print_stdout, clippy::print_stderr)]
fn offline(command: Offline) -> ExitCode {
    use flotilla_controller::store::backup;
    let (result, verb) = match &command {
        Offline::Restore { file, data_dir } => (backup::restore(file, data_dir), "restored"),
        Offline::VerifyBackup { file } => (backup::verify(file), "verified"),
    };
    match result {
        Ok(summary) => {
            let records: u64 = summary.records.values().sum();
            println!(
                "{verb}: backup of controller {} (store schema {}), {records} records, {} bytes, sha256 {}",
                summary.controller_version, summary.schema, summary.bytes, summary.sha256
            );
            for (tree, count) in &summary.records {
                println!("  {tree:<18} {count}");
            }
            if let Offline::Restore { data_dir, .. } = &command {
                println!(
                    "start the controller with --data-dir {} (and the same TLS files), then run `flotctl audit verify`",
                    data_dir.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("flotilla-controller: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(command) = args.command {
        return offline(command);
    }
    flotilla_common::tls::install_crypto_provider();
    let overrides = Overrides {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        data_dir: args.data_dir,
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        ca_key: args.ca_key,
        enroll_listen: args.enroll_listen,
        log_format: args.log_format,
        rules: args.rules,
        otlp_endpoint: args.otlp_endpoint,
    };
    flotilla_common::daemon::main(
        "flotilla-controller",
        Config::load(args.config.as_deref(), overrides),
        |c| (c.log_format, c.tracing.clone()),
        flotilla_controller::run,
    )
}

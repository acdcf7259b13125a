//! `--restart`: after the run, the controller is started again on the store the
//! run filled, and timed from the process start to its "controller listening"
//! log line and to the first agent stream it welcomes.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flotilla_common::tls::TlsFiles;
use tokio::time::Instant;

use super::{Controller, Plan, SimNode, machine, open, round3};

/// The log line the controller writes once every service is about to be served.
const LISTENING: &str = "controller listening";
/// Hang guard: a big store may take a while to open, but not this long.
const RESTART_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the log and the port are tried.
const POLL: Duration = Duration::from_millis(5);

/// What the restart took.
#[derive(Debug, serde::Serialize)]
pub struct RestartReport {
    /// Store size on disk when the controller was started again.
    restart_store_bytes: u64,
    /// Process start → the "controller listening" log line seen.
    restart_listening_ms: f64,
    /// Process start → the first agent's hello answered with a welcome.
    restart_first_welcome_ms: f64,
    /// The controller's VmRSS once it welcomed that agent.
    restart_rss_bytes: u64,
}

/// Starts the controller again in `dir` and connects `node` to it as soon as it
/// accepts connections; `plan` gives the agent's GPUs and interval.
pub async fn measure(
    bin: &Path,
    dir: &Path,
    tls: &TlsFiles,
    config: Option<&str>,
    node: &SimNode,
    mut plan: Plan,
) -> Result<RestartReport> {
    let (store_bytes, _) = machine::disk_bytes(&dir.join("controller"));
    let began = Instant::now();
    let mut controller = Controller::spawn(bin, dir, tls, config, "controller-restart.log")?;
    plan.url = format!("https://{}", controller.addr);
    let outcome = tokio::time::timeout(RESTART_TIMEOUT, async {
        let listening = async {
            loop {
                let log = std::fs::read_to_string(&controller.log).unwrap_or_default();
                if log.contains(LISTENING) {
                    return began.elapsed();
                }
                tokio::time::sleep(POLL).await;
            }
        };
        let welcomed = async {
            // Refused until the port is bound; once bound, the handshake waits in
            // the backlog until the accept loop runs.
            loop {
                match open(0, node, &plan).await {
                    Ok(stream) => return (began.elapsed(), stream),
                    Err(_) => tokio::time::sleep(POLL).await,
                }
            }
        };
        tokio::join!(listening, welcomed)
    })
    .await;
    let rss = controller.rss_bytes();
    let exited = controller.child.try_wait();
    controller.stop().await;
    let (listening, (welcomed, stream)) = match outcome {
        Ok(done) => done,
        Err(_) => bail!(
            "the restarted controller did not welcome an agent within {RESTART_TIMEOUT:?}{}:\n{}",
            match exited {
                Ok(Some(status)) => format!(" (it exited: {status})"),
                _ => String::new(),
            },
            controller.log_tail(30)
        ),
    };
    drop(stream);
    let report = RestartReport {
        restart_store_bytes: store_bytes,
        restart_listening_ms: round3(listening.as_secs_f64() * 1000.0),
        restart_first_welcome_ms: round3(welcomed.as_secs_f64() * 1000.0),
        restart_rss_bytes: rss.context("the restarted controller's memory")?,
    };
    eprintln!(
        "restart on a {store_bytes}-byte store: listening after {:.0} ms, first agent welcomed after {:.0} ms",
        report.restart_listening_ms, report.restart_first_welcome_ms
    );
    Ok(report)
}

//! `flotctl capacity plan|fit|report`: the seed's sizing worksheet, whether a model fits
//! in GPU memory, and the fleet's measured capacity (`Fleet.CapacityReport`).
//! Plan and fit are calculations that only consult a controller when one is configured
//! and answers quickly; report needs one. This file holds what the three share.

mod fit;
mod plan;
mod report;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use flotilla_common::capacity::CapacityError;

use crate::UsageError;
use crate::cli::{CapacityCmd, ConnArgs};
use crate::client::{connect, status_error};
use crate::context::CtlConfig;

/// How long plan and fit wait for an optional controller before calculating alone:
/// they are calculations, and a planner on a laptop should not wait for a connect timeout.
const OPTIONAL_TIMEOUT: Duration = Duration::from_secs(3);

/// What plan and fit say when they calculate without the fleet.
const CALCULATION_ONLY: &str = "no controller reachable: calculation only";

/// The tensor-parallel sizes shown without a fleet: what one server node usually has.
const SHOWN_TP_SIZES: [u32; 4] = [1, 2, 4, 8];

pub async fn run(cmd: CapacityCmd, conn: &ConnArgs, config_path: &Path) -> anyhow::Result<()> {
    match cmd {
        CapacityCmd::Plan(args) => plan::run(args, conn, config_path).await,
        CapacityCmd::Fit(args) => fit::run(args, conn, config_path).await,
        CapacityCmd::Report { window, price_per_kwh, output } => {
            let conn = CtlConfig::load(config_path)?.resolve(conn, config_path)?;
            report::run(window, price_per_kwh, output, &conn).await
        }
    }
}

/// Bad input to a calculation is a usage error (exit 64).
fn usage(e: CapacityError) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

/// A failed Fleet call, saying so plainly when the controller predates the RPC and
/// making a refused argument a usage error.
pub(super) fn rpc_error(what: &str, rpc: &str, status: &tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unimplemented => {
            anyhow::anyhow!("{what}: the controller does not implement Fleet.{rpc} yet (it is older than this flotctl)")
        }
        tonic::Code::InvalidArgument => UsageError(status_error(what, status).to_string()).into(),
        _ => status_error(what, status),
    }
}

/// A window as the wire's milliseconds.
pub(super) fn window_ms(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

/// A measured value, or `None` for the wire's NaN ("not measured"): JSON shows null, tables "-".
pub(super) fn measured(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Formats a measured value, `-` when there is none.
fn cell(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

/// Runs `call` against the controller when connection settings exist and it answers within
/// [`OPTIONAL_TIMEOUT`]; otherwise the calculation-only note, with why.
async fn optional<T, F, Fut>(conn: &ConnArgs, config_path: &Path, rpc: &str, call: F) -> Result<T, String>
where
    F: FnOnce(crate::client::Fleet) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let conn = match CtlConfig::load(config_path).and_then(|c| c.resolve(conn, config_path)) {
        Ok(conn) => conn,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            return Err(format!("{CALCULATION_ONLY} (no controller configured)"));
        }
        Err(e) => return Err(format!("{CALCULATION_ONLY} ({e:#})")),
    };
    let attempt = async {
        let client = connect(&conn).await.map_err(|e| e.to_string())?;
        call(client).await.map_err(|s| match s.code() {
            tonic::Code::Unimplemented => format!("the controller does not implement Fleet.{rpc} yet"),
            _ => status_error(rpc, &s).to_string(),
        })
    };
    match tokio::time::timeout(OPTIONAL_TIMEOUT, attempt).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(why)) => Err(format!("{CALCULATION_ONLY} ({why})")),
        Err(_) => Err(format!(
            "{CALCULATION_ONLY} ({} did not answer within {}s)",
            conn.controller,
            OPTIONAL_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{CapacityFitArgs, DtypeArg, Format, UsageArg};

    #[test]
    fn the_grammar_parses() {
        use clap::Parser as _;

        use crate::cli::{Cli, Command};
        let parse = |line: &str| Cli::try_parse_from(line.split_whitespace()).map(|c| c.command);
        let Ok(Command::Capacity(CapacityCmd::Fit(fit))) = parse(
            "flotctl capacity fit --params 8B --layers 32 --kv-heads 8 --head-dim 128 --context-length 4096 \
             --dtype awq --kv-dtype fp8 --gpu-memory-utilization 0.85 -o json --context demo",
        ) else {
            panic!("capacity fit does not parse");
        };
        assert_eq!((fit.context_length, fit.concurrency, fit.dtype), (4096, 16, Some(DtypeArg::Awq)));
        assert!(matches!(
            parse("flotctl capacity fit --model-config c.json --max-model-len 2048"),
            Ok(Command::Capacity(CapacityCmd::Fit(CapacityFitArgs { context_length: 2048, .. })))
        ));
        assert!(
            parse("flotctl capacity fit --model-config c.json --layers 3").is_err(),
            "sizes conflict with a config"
        );
        assert!(parse("flotctl capacity fit --params 8B --layers 32").is_err(), "sizes are all needed");
        let Ok(Command::Capacity(CapacityCmd::Plan(plan))) =
            parse("flotctl capacity plan --team 50 --usage medium --peak-share 0.2 --headroom 0.3 --model llama")
        else {
            panic!("capacity plan does not parse");
        };
        assert_eq!((plan.team, plan.usage, plan.peak_share, plan.headroom), (50, UsageArg::Medium, 0.2, 0.3));
        assert!(parse("flotctl capacity plan --team 0 --usage light").is_err());
        assert!(matches!(
            parse("flotctl capacity report --window 1h --price-per-kwh 0.30 -o json"),
            Ok(Command::Capacity(CapacityCmd::Report { price_per_kwh: Some(0.3), output: Format::Json, .. }))
        ));
        assert!(parse("flotctl capacity report --price-per-kwh -1").is_err());
        assert!(parse("flotctl capacity report --window 0s").is_err());
        let Ok(Command::Diagnose(d)) = parse("flotctl diagnose gpu-a --window 5m") else {
            panic!("diagnose does not parse");
        };
        assert_eq!((d.target.as_str(), d.window), ("gpu-a", Duration::from_secs(300)));
    }

    #[test]
    fn unimplemented_rpcs_are_explained() {
        let e = rpc_error("capacity report", "CapacityReport", &tonic::Status::unimplemented(""));
        assert!(e.to_string().contains("does not implement Fleet.CapacityReport"));
        let e = rpc_error("capacity report", "CapacityReport", &tonic::Status::invalid_argument("window 1s"));
        assert!(e.downcast_ref::<UsageError>().is_some());
    }
}

//! `flotctl metrics get`: stored telemetry series through `Fleet.QueryMetrics`.

use std::time::Duration;

use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;

use crate::UsageError;
use crate::cli::MetricsCmd;
use crate::client::{connect, status_error};
use crate::context::Connection;
use crate::output::{self, SeriesView, number};

/// Points per series when no --step is given: a readable sparkline's worth.
const DEFAULT_POINTS: u32 = 240;

pub async fn run(cmd: MetricsCmd, conn: &Connection) -> anyhow::Result<()> {
    let MetricsCmd::Get { selector, since, step, output } = cmd;
    let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if since.is_zero() {
        return Err(UsageError("--since must be longer than 0s".to_owned()).into());
    }
    let step = step.unwrap_or_else(|| default_step(since));
    let end = now_unix_ms();
    let request = pb::QueryMetricsRequest {
        selector: selector.clone(),
        start_unix_ms: end.saturating_sub(millis(since)).max(1),
        end_unix_ms: end,
        step_ms: millis(step),
    };
    let mut client = connect(conn).await?;
    let what = format!("query {selector}");
    let resp = match client.query_metrics(request).await {
        Ok(r) => r.into_inner(),
        // The selector and the range are the caller's: a refusal is a usage error.
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            return Err(UsageError(status_error(&what, &s).to_string()).into());
        }
        Err(s) => return Err(status_error(&what, &s)),
    };
    let series: Vec<SeriesView> = resp.series.into_iter().map(SeriesView::from_wire).collect();
    output::print(output, &series, |s| table(s, &selector, since))
}

/// `since / 240`, in whole seconds, at least one.
fn default_step(since: Duration) -> Duration {
    Duration::from_secs((since / DEFAULT_POINTS).as_secs_f64().ceil().max(1.0) as u64)
}

fn table(series: &[SeriesView], selector: &str, since: Duration) -> String {
    if series.is_empty() {
        return format!(
            "No series match {selector} in the last {}. `flotctl nodes show NODE` shows what a node reports.",
            humantime::format_duration(since)
        );
    }
    let mut t = output::table(&["SERIES", "LAST", "MIN", "MAX", "POINTS"]);
    for s in series {
        let values = s.points.iter().map(|(_, v)| *v);
        t.add_row(vec![
            s.selector(),
            number(s.points.last().map(|(_, v)| *v)),
            number(values.clone().reduce(f64::min)),
            number(values.reduce(f64::max)),
            s.points.len().to_string(),
        ]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_step_gives_a_few_hundred_points() {
        assert_eq!(default_step(Duration::from_secs(600)), Duration::from_secs(3));
        assert_eq!(default_step(Duration::from_secs(30)), Duration::from_secs(1));
        assert_eq!(default_step(Duration::from_secs(30 * 86_400)), Duration::from_secs(10_800));
    }

    #[test]
    fn the_table_shows_last_min_and_max() {
        let s = SeriesView {
            metric: [("__name__".to_owned(), "x".to_owned()), ("node".to_owned(), "a".to_owned())].into(),
            points: vec![(1, 3.0), (2, 1.5), (3, 2.0)],
        };
        let text = table(&[s], "x", Duration::from_secs(60));
        let row = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, [r#"x{node="a"}"#, "2", "1.5", "3", "3"]);
        assert!(table(&[], "y", Duration::from_secs(60)).starts_with("No series match y in the last 1m"));
    }
}

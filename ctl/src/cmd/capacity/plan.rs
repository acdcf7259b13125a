//! `flotctl capacity plan`: the seed's sizing worksheet, and the requirement against the
//! fleet's measured capacity per model when a controller answers.

use std::path::Path;
use std::time::Duration;

use flotilla_common::capacity::plan::SEED_HEADROOM_BAND;
use flotilla_common::capacity::{self, Plan, PlanInput, Usage};
use flotilla_proto::pb;
use serde::Serialize;

use super::{cell, measured, optional, usage};
use crate::cli::{CapacityPlanArgs, ConnArgs, UsageArg};
use crate::output;

/// `capacity plan` as `-o json` prints it: the worksheet's inputs and results, flattened.
#[derive(Debug, Serialize)]
struct PlanView {
    #[serde(flatten)]
    plan: Plan,
    /// The requirement with the seed's 30 % and 50 % headroom.
    seed_headroom_band_tokens_per_second: [f64; 2],
    /// Why there is no fleet comparison, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<FleetComparison>,
}

/// The requirement against the fleet's measured capacity.
#[derive(Debug, Serialize)]
struct FleetComparison {
    window_ms: u64,
    models: Vec<ModelComparison>,
    /// What the controller could not measure, and models that were asked for but absent.
    notes: Vec<String>,
}

/// One model's measured capacity against the requirement with headroom.
#[derive(Debug, Serialize)]
struct ModelComparison {
    model: String,
    nodes: Vec<String>,
    /// Sum of the endpoints' saturation points: what the fleet can serve of this model.
    capacity_tokens_per_second: Option<f64>,
    current_tokens_per_second: Option<f64>,
    headroom_tokens_per_second: Option<f64>,
    /// enough, enough_without_headroom, short or not_measured.
    verdict: &'static str,
    /// How far the capacity is below the requirement with headroom, when it is.
    shortfall_tokens_per_second: Option<f64>,
    summary: String,
}

fn usage_tier(u: UsageArg) -> Usage {
    match u {
        UsageArg::Light => Usage::Light,
        UsageArg::Medium => Usage::Medium,
        UsageArg::Heavy => Usage::Heavy,
    }
}

pub(super) async fn run(args: CapacityPlanArgs, conn: &ConnArgs, config_path: &Path) -> anyhow::Result<()> {
    let input = PlanInput {
        team: args.team,
        usage: usage_tier(args.usage),
        requests_per_user: args.requests_per_user,
        tokens_per_request: args.tokens_per_request,
        peak_share: args.peak_share,
        headroom: args.headroom,
    };
    let plan = capacity::plan(&input).map_err(usage)?;
    let request = pb::CapacityReportRequest { window_ms: 0, price_per_kwh: 0.0 };
    let report = optional(conn, config_path, "CapacityReport", |mut c| async move {
        c.capacity_report(request).await.map(tonic::Response::into_inner)
    })
    .await;
    let view = plan_view(plan, report, args.model.as_deref());
    output::print(args.output, &view, plan_text)
}

fn plan_view(plan: Plan, report: Result<pb::CapacityReportResponse, String>, only: Option<&str>) -> PlanView {
    let required = plan.required_tokens_per_second;
    let band = [required * (1.0 + SEED_HEADROOM_BAND.0), required * (1.0 + SEED_HEADROOM_BAND.1)];
    let (note, fleet) = match report {
        Err(note) => (Some(note), None),
        Ok(r) => (None, Some(compare(&plan, r, only))),
    };
    PlanView { plan, seed_headroom_band_tokens_per_second: band, note, fleet }
}

fn compare(plan: &Plan, report: pb::CapacityReportResponse, only: Option<&str>) -> FleetComparison {
    let need = plan.required_with_headroom_tokens_per_second;
    let mut notes = report.notes;
    let known: Vec<String> = report.models.iter().map(|m| m.model.clone()).collect();
    let models: Vec<ModelComparison> = report
        .models
        .into_iter()
        .filter(|m| only.is_none_or(|o| o == m.model))
        .map(|m| {
            let capacity = measured(m.saturation_tokens_per_second);
            let (verdict, shortfall) = match capacity {
                None => ("not_measured", None),
                Some(c) if c >= need => ("enough", None),
                Some(c) if c >= plan.required_tokens_per_second => ("enough_without_headroom", Some(need - c)),
                Some(c) => ("short", Some(need - c)),
            };
            let current = measured(m.tokens_per_second);
            let headroom = measured(m.headroom_tokens_per_second);
            let summary = match (verdict, capacity, shortfall) {
                (_, None, _) => format!("the fleet's capacity for {} is not measured", m.model),
                ("enough", Some(c), _) => format!("the fleet's measured capacity for {} is {c:.0} tokens/s: enough", m.model),
                ("enough_without_headroom", Some(c), Some(s)) => format!(
                    "the fleet's measured capacity for {} is {c:.0} tokens/s: enough for the peak, but short of the {:.0} % headroom by {s:.0} tokens/s",
                    m.model,
                    plan.headroom * 100.0
                ),
                (_, Some(c), s) => format!(
                    "the fleet's measured capacity for {} is {c:.0} tokens/s: short by {:.0} tokens/s",
                    m.model,
                    s.unwrap_or(0.0)
                ),
            };
            ModelComparison {
                model: m.model,
                nodes: m.nodes,
                capacity_tokens_per_second: capacity,
                current_tokens_per_second: current,
                headroom_tokens_per_second: headroom,
                verdict,
                shortfall_tokens_per_second: shortfall,
                summary,
            }
        })
        .collect();
    if let Some(o) = only
        && models.is_empty()
    {
        let list = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
        notes.push(format!("model {o} is not in the fleet's capacity report (models measured: {list})"));
    }
    FleetComparison { window_ms: report.window_ms, models, notes }
}

fn plan_text(v: &PlanView) -> String {
    let p = &v.plan;
    let rows = [
        ("Team", format!("{} developers, {} usage", p.team, p.usage)),
        ("Requests/user/day", output::number(Some(p.requests_per_user_per_day))),
        ("Tokens/request", output::number(Some(p.tokens_per_request))),
        ("Daily requests", format!("{:.0}", p.daily_requests)),
        (
            "Peak requests/min",
            format!(
                "{:.1}  ({:.0} % of a day's requests in the peak hour)",
                p.peak_requests_per_minute,
                p.peak_share * 100.0
            ),
        ),
        ("Required throughput", format!("{:.1} tokens/s", p.required_tokens_per_second)),
        (
            &format!("With {:.0} % headroom", p.headroom * 100.0),
            format!(
                "{:.1} tokens/s  (the seed's 30-50 %: {:.1}-{:.1} tokens/s)",
                p.required_with_headroom_tokens_per_second,
                v.seed_headroom_band_tokens_per_second[0],
                v.seed_headroom_band_tokens_per_second[1]
            ),
        ),
    ];
    let width = rows.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0) + 2;
    let mut out = String::new();
    for (label, value) in rows {
        out.push_str(&format!("{:<width$}{value}\n", format!("{label}:")));
    }
    out.push('\n');
    if let Some(note) = &v.note {
        out.push_str(note);
        out.push('\n');
    }
    if let Some(f) = &v.fleet {
        let window = humantime::format_duration(Duration::from_millis(f.window_ms));
        out.push_str(&format!("Fleet, measured over {window}:\n"));
        if f.models.is_empty() && f.notes.is_empty() {
            out.push_str("  no model's capacity is measured yet\n");
        }
        for m in &f.models {
            let now = cell(m.current_tokens_per_second, |t| format!("{t:.0}"));
            let spare = cell(m.headroom_tokens_per_second, |t| format!("{t:.0}"));
            out.push_str(&format!("  {} (serving {now} tokens/s now, {spare} spare)\n", m.summary));
        }
        for n in &f.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::super::CALCULATION_ONLY;
    use super::*;

    fn medium_team() -> Plan {
        capacity::plan(&PlanInput::new(50, Usage::Medium)).unwrap()
    }

    fn model(name: &str, saturation: f64) -> pb::ModelCapacity {
        pb::ModelCapacity {
            model: name.to_owned(),
            tokens_per_second: 300.0,
            saturation_tokens_per_second: saturation,
            headroom_tokens_per_second: saturation - 300.0,
            nodes: vec!["gpu-a".to_owned()],
        }
    }

    #[test]
    fn plan_without_a_controller_is_calculation_only() {
        let v = plan_view(medium_team(), Err(format!("{CALCULATION_ONLY} (no controller configured)")), None);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["daily_requests"], 5000.0);
        assert_eq!(json["team"], 50);
        assert_eq!(json["usage"], "medium");
        assert!((json["required_tokens_per_second"].as_f64().unwrap() - 416.67).abs() < 0.01);
        assert!((json["required_with_headroom_tokens_per_second"].as_f64().unwrap() - 583.33).abs() < 0.01);
        assert!(json["peak_requests_per_minute"].is_number());
        assert!(json.get("fleet").is_none());
        let text = plan_text(&v);
        assert!(text.contains("Daily requests:      5000\n"), "{text}");
        assert!(text.contains("416.7 tokens/s"), "{text}");
        assert!(text.contains("no controller reachable: calculation only"), "{text}");
    }

    #[test]
    fn plan_compares_with_measured_capacity() {
        let report = pb::CapacityReportResponse {
            window_ms: 600_000,
            models: vec![model("big", 1000.0), model("mid", 500.0), model("small", 200.0), model("new", f64::NAN)],
            ..Default::default()
        };
        let v = plan_view(medium_team(), Ok(report), None);
        let f = v.fleet.as_ref().unwrap();
        let verdicts: Vec<&str> = f.models.iter().map(|m| m.verdict).collect();
        assert_eq!(verdicts, ["enough", "enough_without_headroom", "short", "not_measured"]);
        assert!(f.models[2].summary.contains("is 200 tokens/s: short by 383 tokens/s"), "{}", f.models[2].summary);
        let json = serde_json::to_value(&v).unwrap();
        assert!(json["fleet"]["models"][3]["capacity_tokens_per_second"].is_null());
        let text = plan_text(&v);
        assert!(text.contains("the fleet's measured capacity for big is 1000 tokens/s: enough"), "{text}");
        assert!(!text.contains("calculation only"));
    }

    #[test]
    fn plan_names_a_missing_model() {
        let report = pb::CapacityReportResponse { models: vec![model("big", 1000.0)], ..Default::default() };
        let v = plan_view(medium_team(), Ok(report), Some("llama"));
        let f = v.fleet.unwrap();
        assert!(f.models.is_empty());
        assert!(f.notes[0].contains("model llama is not in the fleet's capacity report (models measured: big)"));
    }
}

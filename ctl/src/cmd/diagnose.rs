//! `flotctl diagnose NODE|DEPLOYMENT`: the troubleshooting guide run by the controller
//! against live data (`Fleet.Diagnose`), printed as findings, evidence and ranked fixes.
//! Findings are the answer, not a failure: the exit status is 0 unless the call fails.

use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use serde::Serialize;

use super::capacity::{measured, rpc_error, window_ms};
use crate::cli::DiagnoseArgs;
use crate::client::connect;
use crate::context::Connection;
use crate::output::{self, ago};

/// A diagnosis as `-o json` prints it; NaN values are null.
#[derive(Debug, Serialize)]
struct DiagnosisView {
    target: String,
    /// node or deployment.
    kind: String,
    at_unix_ms: i64,
    window_ms: u64,
    /// Most severe first.
    findings: Vec<FindingView>,
    checked: Vec<String>,
}

#[derive(Debug, Serialize)]
struct FindingView {
    issue: String,
    /// critical, warning or info.
    severity: String,
    node: String,
    gpu: Option<String>,
    summary: String,
    evidence: Vec<EvidenceView>,
    /// Ranked for this case, most likely first.
    resolutions: Vec<String>,
}

#[derive(Debug, Serialize)]
struct EvidenceView {
    what: String,
    value: Option<f64>,
    text: Option<String>,
    at_unix_ms: Option<i64>,
}

impl DiagnosisView {
    fn from_wire(r: pb::DiagnoseResponse, window_ms: u64) -> Self {
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let findings = r
            .findings
            .into_iter()
            .map(|f| FindingView {
                issue: f.issue,
                severity: f.severity,
                node: f.node,
                gpu: nonempty(f.gpu),
                summary: f.summary,
                evidence: f
                    .evidence
                    .into_iter()
                    .map(|e| EvidenceView {
                        what: e.what,
                        value: measured(e.value),
                        text: nonempty(e.text),
                        at_unix_ms: (e.at_unix_ms > 0).then_some(e.at_unix_ms),
                    })
                    .collect(),
                resolutions: f.resolutions,
            })
            .collect();
        Self { target: r.target, kind: r.kind, at_unix_ms: r.at_unix_ms, window_ms, findings, checked: r.checked }
    }
}

pub async fn run(args: DiagnoseArgs, conn: &Connection) -> anyhow::Result<()> {
    let window_ms = window_ms(args.window);
    let request = pb::DiagnoseRequest { target: args.target.clone(), window_ms };
    let mut client = connect(conn).await?;
    let resp =
        client.diagnose(request).await.map_err(|s| rpc_error(&format!("diagnose {}", args.target), "Diagnose", &s))?;
    let view = DiagnosisView::from_wire(resp.into_inner(), window_ms);
    output::print(args.output, &view, |v| text(v, now_unix_ms()))
}

fn text(v: &DiagnosisView, now: i64) -> String {
    let window = humantime::format_duration(std::time::Duration::from_millis(v.window_ms));
    let kind = if v.kind.is_empty() { "target" } else { v.kind.as_str() };
    let mut out = format!("Diagnosis of {kind} {} over the last {window}:\n\n", v.target);
    if v.findings.is_empty() {
        out.push_str("No problems found.\n\n");
    }
    for f in &v.findings {
        let mut place = if f.node.is_empty() { String::new() } else { format!("node {}", f.node) };
        if let Some(gpu) = &f.gpu {
            place.push_str(&format!("{}GPU {gpu}", if place.is_empty() { "" } else { ", " }));
        }
        let place = if place.is_empty() { String::new() } else { format!(" on {place}") };
        out.push_str(&format!("[{}] {}{place}\n", f.severity.to_uppercase(), f.issue));
        out.push_str(&format!("  {}\n", f.summary));
        if !f.evidence.is_empty() {
            out.push_str("  evidence:\n");
            for e in &f.evidence {
                out.push_str(&format!("    - {}\n", evidence_line(e, now)));
            }
        }
        if !f.resolutions.is_empty() {
            out.push_str("  resolutions:\n");
            for (i, r) in f.resolutions.iter().enumerate() {
                out.push_str(&format!("    {}. {r}\n", i + 1));
            }
        }
        out.push('\n');
    }
    if !v.checked.is_empty() {
        out.push_str("checked:\n");
        for c in &v.checked {
            out.push_str(&format!("  - {c}\n"));
        }
    }
    out.trim_end().to_owned()
}

/// `what = value: text (3m ago)`, leaving out what is not there: the text says it for
/// people, the value is what a script would compare.
fn evidence_line(e: &EvidenceView, now: i64) -> String {
    let mut line = e.what.clone();
    if let Some(v) = e.value {
        line.push_str(&format!(" = {}", output::number(Some(v))));
    }
    if let Some(t) = &e.text {
        line.push_str(&format!(": {t}"));
    }
    if let Some(at) = e.at_unix_ms {
        line.push_str(&format!(" ({})", ago(at, now)));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response() -> pb::DiagnoseResponse {
        pb::DiagnoseResponse {
            target: "gpu-a".into(),
            kind: "node".into(),
            at_unix_ms: 1_000_000,
            findings: vec![pb::Finding {
                issue: "out_of_memory".into(),
                severity: "critical".into(),
                node: "gpu-a".into(),
                gpu: "3".into(),
                summary: "GPU 3 memory is 99% used and the server logged CUDA out of memory".into(),
                evidence: vec![
                    pb::Evidence {
                        what: "gpu_memory_used_ratio".into(),
                        value: 0.99,
                        text: String::new(),
                        at_unix_ms: 880_000,
                    },
                    pb::Evidence {
                        what: "log".into(),
                        value: f64::NAN,
                        text: "CUDA out of memory".into(),
                        at_unix_ms: 0,
                    },
                ],
                resolutions: vec![
                    "Reduce context length: lower --max-model-len".into(),
                    "Reduce batch size: lower --max-num-seqs".into(),
                ],
            }],
            checked: vec!["high_latency: p95 1.2s (below 5s)".into()],
        }
    }

    #[test]
    fn findings_print_with_evidence_and_numbered_resolutions() {
        let v = DiagnosisView::from_wire(response(), 600_000);
        let t = text(&v, 1_000_000);
        assert!(t.starts_with("Diagnosis of node gpu-a over the last 10m:"), "{t}");
        assert!(t.contains("[CRITICAL] out_of_memory on node gpu-a, GPU 3"), "{t}");
        assert!(t.contains("    - gpu_memory_used_ratio = 0.99 (2m ago)"), "{t}");
        assert!(t.contains("    - log: CUDA out of memory\n"), "{t}");
        assert!(t.contains("    1. Reduce context length"), "{t}");
        assert!(t.contains("    2. Reduce batch size"), "{t}");
        assert!(t.contains("checked:\n  - high_latency: p95 1.2s"), "{t}");
    }

    #[test]
    fn json_has_null_for_nan_and_absent_values() {
        let v = DiagnosisView::from_wire(response(), 600_000);
        let json = serde_json::to_value(&v).unwrap();
        let evidence = &json["findings"][0]["evidence"];
        assert_eq!(evidence[0]["value"], 0.99);
        assert!(evidence[1]["value"].is_null());
        assert!(evidence[1]["at_unix_ms"].is_null());
        assert!(evidence[0]["text"].is_null());
        assert_eq!(json["findings"][0]["gpu"], "3");
        assert_eq!(json["findings"][0]["resolutions"][1], "Reduce batch size: lower --max-num-seqs");
        assert_eq!(json["checked"][0], "high_latency: p95 1.2s (below 5s)");
    }

    #[test]
    fn no_findings_says_so() {
        let r = pb::DiagnoseResponse { target: "llama".into(), kind: "deployment".into(), ..Default::default() };
        let t = text(&DiagnosisView::from_wire(r, 60_000), 0);
        assert!(t.contains("Diagnosis of deployment llama over the last 1m:\n\nNo problems found."), "{t}");
    }
}

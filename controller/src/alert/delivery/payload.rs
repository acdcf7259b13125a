//! Request bodies: Alertmanager's API v2 `postableAlerts` and its webhook
//! payload (version "4"), built from [`OutgoingAlert`]s.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::OutgoingAlert;

/// What Alertmanager writes as `endsAt` of a firing alert in webhook payloads (Go's zero time).
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The last millisecond of year 9999: RFC 3339 has four year digits.
const MAX_UNIX_MS: i64 = 253_402_300_799_999;

/// The receiver name webhooks see.
const RECEIVER: &str = "flotilla";

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds, clamped to 1970..=9999
/// so that no input can make formatting fail.
pub(crate) fn rfc3339(unix_ms: i64) -> String {
    let ms = u64::try_from(unix_ms.clamp(0, MAX_UNIX_MS)).unwrap_or_default();
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Milliseconds since the Unix epoch now (0 if the clock is before 1970).
pub(crate) fn now_unix_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// One element of Alertmanager's `postableAlerts`.
#[derive(Debug, Serialize)]
struct PostableAlert<'a> {
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    #[serde(rename = "startsAt")]
    starts_at: String,
    #[serde(rename = "endsAt")]
    ends_at: String,
    #[serde(rename = "generatorURL", skip_serializing_if = "str::is_empty")]
    generator_url: &'a str,
}

/// The JSON array posted to `{base}/api/v2/alerts` at `now_ms`.
///
/// A firing alert ends at `now + 4 × resend_interval`, as Prometheus does: Alertmanager
/// then resolves it by itself if we stop re-posting it (controller gone). A resolved
/// alert ends at its resolve time. `endsAt` never precedes `startsAt`, which
/// Alertmanager would refuse (and with it the whole batch).
pub(crate) fn alertmanager_body(
    alerts: &[OutgoingAlert],
    now_ms: i64,
    resend_interval: Duration,
) -> Result<Vec<u8>, serde_json::Error> {
    let lease_ms = i64::try_from(resend_interval.saturating_mul(4).as_millis()).unwrap_or(i64::MAX);
    let postable: Vec<_> = alerts
        .iter()
        .map(|alert| {
            let ends = alert.ends_at_unix_ms.unwrap_or_else(|| now_ms.saturating_add(lease_ms));
            PostableAlert {
                labels: &alert.labels,
                annotations: &alert.annotations,
                starts_at: rfc3339(alert.starts_at_unix_ms),
                ends_at: rfc3339(ends.max(alert.starts_at_unix_ms)),
                generator_url: &alert.generator_url,
            }
        })
        .collect();
    serde_json::to_vec(&postable)
}

/// Whether Alertmanager (legacy label-name rules, which every version accepts) takes
/// this alert; one it refuses would make it reject the whole batch.
pub(crate) fn alertmanager_accepts(alert: &OutgoingAlert) -> bool {
    !alert.labels.is_empty() && alert.labels.keys().all(|name| is_legacy_label_name(name))
}

fn is_legacy_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookMessage<'a> {
    version: &'static str,
    group_key: String,
    truncated_alerts: u64,
    status: &'static str,
    receiver: &'static str,
    group_labels: BTreeMap<&'a str, &'a str>,
    common_labels: BTreeMap<&'a str, &'a str>,
    common_annotations: BTreeMap<&'a str, &'a str>,
    #[serde(rename = "externalURL")]
    external_url: &'a str,
    alerts: Vec<WebhookAlert<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WebhookAlert<'a> {
    status: &'static str,
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    starts_at: String,
    ends_at: String,
    #[serde(rename = "generatorURL")]
    generator_url: &'a str,
    fingerprint: &'a str,
}

fn status(alert: &OutgoingAlert) -> &'static str {
    if alert.is_resolved() { "resolved" } else { "firing" }
}

/// Splits alerts into webhook groups by `alertname` (Alertmanager's usual `group_by`),
/// keeping arrival order inside each group.
pub(crate) fn group_by_alertname(alerts: Vec<OutgoingAlert>) -> Vec<Vec<OutgoingAlert>> {
    let mut groups: BTreeMap<Option<String>, Vec<OutgoingAlert>> = BTreeMap::new();
    for alert in alerts {
        groups.entry(alert.labels.get("alertname").cloned()).or_default().push(alert);
    }
    groups.into_values().collect()
}

/// One webhook notification for a group of alerts sharing their `alertname`.
pub(crate) fn webhook_body(alerts: &[OutgoingAlert], external_url: &str) -> Result<Vec<u8>, serde_json::Error> {
    let group_labels: BTreeMap<&str, &str> = alerts
        .first()
        .and_then(|a| a.labels.get_key_value("alertname"))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .into_iter()
        .collect();
    let message = WebhookMessage {
        version: "4",
        group_key: group_key(&group_labels),
        truncated_alerts: 0,
        status: if alerts.iter().any(|a| !a.is_resolved()) { "firing" } else { "resolved" },
        receiver: RECEIVER,
        common_labels: common(alerts.iter().map(|a| &a.labels)),
        common_annotations: common(alerts.iter().map(|a| &a.annotations)),
        group_labels,
        external_url,
        alerts: alerts
            .iter()
            .map(|alert| WebhookAlert {
                status: status(alert),
                labels: &alert.labels,
                annotations: &alert.annotations,
                starts_at: rfc3339(alert.starts_at_unix_ms),
                ends_at: match alert.ends_at_unix_ms {
                    Some(ends) => rfc3339(ends.max(alert.starts_at_unix_ms)),
                    None => ZERO_TIME.to_owned(),
                },
                generator_url: &alert.generator_url,
                fingerprint: &alert.fingerprint,
            })
            .collect(),
    };
    serde_json::to_vec(&message)
}

/// Alertmanager's group key shape: `{route matchers}:{group labels}`; our one route has none.
fn group_key(group_labels: &BTreeMap<&str, &str>) -> String {
    let pairs: Vec<String> = group_labels.iter().map(|(k, v)| format!("{k}={}", quote(v))).collect();
    format!("{{}}:{{{}}}", pairs.join(", "))
}

/// Go's `%q`-like quoting for label values in the group key.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The pairs every map has with the same value.
fn common<'a>(mut maps: impl Iterator<Item = &'a BTreeMap<String, String>>) -> BTreeMap<&'a str, &'a str> {
    let Some(first) = maps.next() else { return BTreeMap::new() };
    let mut shared: BTreeMap<&str, &str> = first.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for map in maps {
        shared.retain(|k, v| map.get(*k).is_some_and(|other| other == v));
    }
    shared
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::{Value, json};

    use super::*;

    fn alert(name: &str, node: &str, ends: Option<i64>) -> OutgoingAlert {
        OutgoingAlert {
            fingerprint: format!("{name}-{node}"),
            labels: [("alertname", name), ("node", node), ("severity", "page")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            annotations: [("summary".to_owned(), format!("{name} on {node}"))].into_iter().collect(),
            starts_at_unix_ms: 1_700_000_000_000,
            ends_at_unix_ms: ends,
            generator_url: "http://controller.invalid/alerts".to_owned(),
        }
    }

    #[test]
    fn rfc3339_is_utc_millis_and_clamped() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn alertmanager_body_matches_postable_alerts() {
        let resend = Duration::from_secs(60);
        let now = 1_700_000_100_000;
        let body =
            alertmanager_body(&[alert("GpuHot", "n1", None), alert("GpuHot", "n2", Some(now))], now, resend).unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value,
            json!([
                {
                    "labels": {"alertname": "GpuHot", "node": "n1", "severity": "page"},
                    "annotations": {"summary": "GpuHot on n1"},
                    "startsAt": "2023-11-14T22:13:20.000Z",
                    "endsAt": "2023-11-14T22:19:00.000Z",
                    "generatorURL": "http://controller.invalid/alerts"
                },
                {
                    "labels": {"alertname": "GpuHot", "node": "n2", "severity": "page"},
                    "annotations": {"summary": "GpuHot on n2"},
                    "startsAt": "2023-11-14T22:13:20.000Z",
                    "endsAt": "2023-11-14T22:15:00.000Z",
                    "generatorURL": "http://controller.invalid/alerts"
                }
            ])
        );
    }

    #[test]
    fn ends_never_precede_starts_and_empty_generator_is_left_out() {
        let mut early = alert("A", "n1", Some(5));
        early.generator_url.clear();
        let body = alertmanager_body(&[early], 10, Duration::from_secs(1)).unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value[0]["endsAt"], value[0]["startsAt"]);
        assert!(value[0].get("generatorURL").is_none());
    }

    #[test]
    fn alertmanager_refusals_are_predicted() {
        assert!(alertmanager_accepts(&alert("A", "n1", None)));
        let mut bad = alert("A", "n1", None);
        bad.labels.insert("gpu.index".to_owned(), "0".to_owned());
        assert!(!alertmanager_accepts(&bad));
        bad.labels.clear();
        assert!(!alertmanager_accepts(&bad));
        let mut digit = alert("A", "n1", None);
        digit.labels.insert("0gpu".to_owned(), "0".to_owned());
        assert!(!alertmanager_accepts(&digit));
    }

    #[test]
    fn webhook_body_matches_alertmanager_version_4() {
        let mut other = alert("GpuHot", "n2", Some(1_700_000_060_000));
        other.annotations.insert("runbook".to_owned(), "x".to_owned());
        let body = webhook_body(&[alert("GpuHot", "n1", None), other], "https://flotilla.invalid").unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["version"], "4");
        assert_eq!(value["groupKey"], r#"{}:{alertname="GpuHot"}"#);
        assert_eq!(value["truncatedAlerts"], 0);
        assert_eq!(value["status"], "firing");
        assert_eq!(value["receiver"], "flotilla");
        assert_eq!(value["externalURL"], "https://flotilla.invalid");
        assert_eq!(value["groupLabels"], json!({"alertname": "GpuHot"}));
        assert_eq!(value["commonLabels"], json!({"alertname": "GpuHot", "severity": "page"}));
        assert_eq!(value["commonAnnotations"], json!({}));
        let alerts = value["alerts"].as_array().unwrap();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0]["status"], "firing");
        assert_eq!(alerts[0]["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(alerts[0]["fingerprint"], "GpuHot-n1");
        assert_eq!(alerts[0]["generatorURL"], "http://controller.invalid/alerts");
        assert_eq!(alerts[1]["status"], "resolved");
        assert_eq!(alerts[1]["startsAt"], "2023-11-14T22:13:20.000Z");
        assert_eq!(alerts[1]["endsAt"], "2023-11-14T22:14:20.000Z");
    }

    #[test]
    fn all_resolved_group_is_resolved() {
        let body = webhook_body(&[alert("A", "n1", Some(1_700_000_000_500))], "").unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["status"], "resolved");
        assert_eq!(value["commonAnnotations"], json!({"summary": "A on n1"}));
    }

    #[test]
    fn group_key_quotes_like_go() {
        let labels: BTreeMap<&str, &str> = [("alertname", "say \"hi\"\\")].into_iter().collect();
        assert_eq!(group_key(&labels), r#"{}:{alertname="say \"hi\"\\"}"#);
        assert_eq!(group_key(&BTreeMap::new()), "{}:{}");
    }

    #[test]
    fn groups_split_by_alertname_in_arrival_order() {
        let mut nameless = alert("X", "n9", None);
        nameless.labels.remove("alertname");
        let groups =
            group_by_alertname(vec![alert("B", "n1", None), alert("A", "n1", None), nameless, alert("B", "n2", None)]);
        let names: Vec<Vec<&str>> = groups.iter().map(|g| g.iter().map(|a| a.fingerprint.as_str()).collect()).collect();
        assert_eq!(names, vec![vec!["X-n9"], vec!["A-n1"], vec!["B-n1", "B-n2"]]);
    }
}

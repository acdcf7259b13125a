//! Prometheus text exposition format 0.0.4, read with the `prom_text_format_parser`
//! crate and flattened into plain samples; the crate's types stop here.
//!
//! # Why this crate
//!
//! Five crates.io parsers were run over every page in `tests/fixtures/metrics/`
//! and their samples compared with `prometheus_client`'s reference parser:
//!
//! * `prom_text_format_parser` 0.1.0 (MIT OR Apache-2.0, winnow) parses all 16
//!   pages and yields exactly the reference's samples: name, labels and value of
//!   every line (the Python parser also appends `_total` to counters that lack it;
//!   that is its own rename, not a different reading). It groups families by
//!   `# TYPE`, tags histogram and summary `_sum`/`_count` lines (also in vLLM V0's
//!   `_sum`-first order and for the histogram `vllm:iteration_tokens_total`), and
//!   accepts `:` in names, `NaN`, `±Inf`, exponents, timestamps, mixed label sets in
//!   one family and a missing final newline. It did not panic on 20 000 randomly
//!   mutated pages (`fixture_tests` keeps a 1 500-page version of that check). It
//!   is small and has had one release only, so it is pinned by the lock file and
//!   held to the fixtures by the tests here.
//! * `prometheus-parse` 0.2.5 matches names with `\w+`, so it silently drops every
//!   series with a `:` (all of vLLM, SGLang and llama.cpp).
//! * `openmetrics-parser` 0.5.1 is LGPL-3.0, rejects the dcgm-exporter page whose
//!   family mixes label sets, rejects untyped series without `# TYPE`, and needs a
//!   final newline.
//! * `nom-openmetrics` 0.3.0 fails on any plain `#` comment line (every fixture).
//! * `prometheus-exposition-format-rs` 0.1.2 (nom 5, 2020) needs a final newline and
//!   does not group histograms, losing the type of their `_bucket` lines.
//!
//! Known gaps of the chosen crate, none seen on a real server's page: it rejects a
//! bare `#` line, empty braces `foo{} 1` and a trailing comma inside braces, all valid
//! text format, and CRLF line ends (such a page is reported as unparseable); it
//! returns label values still escaped, so [`unescape`] finishes the job; and a family
//! with `# TYPE` but no samples comes back as a non-fatal "collect" error, which is
//! ignored.

use prom_text_format_parser::{ScrapeParseError, Type, ValueType};

/// The longest parse error message kept: a garbage page can be one 8 MiB line, and
/// the crate quotes the offending line.
const MAX_MESSAGE_CHARS: usize = 300;

/// The type a family declared with `# TYPE` (untyped when it declared none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// One sample line of a page.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PageSample {
    /// The full sample name, e.g. `vllm:e2e_request_latency_seconds_bucket`.
    pub name: String,
    /// Label pairs in page order, unescaped.
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// The declared type of the family the sample belongs to.
    pub kind: Kind,
}

impl PageSample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A parsed page: every sample, flattened.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Page {
    pub samples: Vec<PageSample>,
}

/// The page is not Prometheus text format 0.0.4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpositionError(pub String);

/// Parses a whole `/metrics` body. An empty body is an empty page.
pub(crate) fn parse(text: &str) -> Result<Page, ExpositionError> {
    if text.trim().is_empty() {
        return Ok(Page::default());
    }
    let (metrics, error) = prom_text_format_parser::parse_scrape(text);
    // Collect errors name families that have metadata but no samples (vLLM declares
    // families before their first labelled child exists); they carry nothing to map,
    // so only line-level parse errors fail the page.
    if let Some(ScrapeParseError::Parse(message)) = error {
        return Err(ExpositionError(shorten(&message)));
    }
    let mut samples = Vec::with_capacity(metrics.iter().map(|m| m.samples.len()).sum());
    for metric in metrics {
        let kind = match metric.kind {
            Type::Counter => Kind::Counter,
            Type::Gauge => Kind::Gauge,
            Type::Histogram => Kind::Histogram,
            Type::Summary => Kind::Summary,
            Type::Untyped => Kind::Untyped,
        };
        for mut sample in metric.samples {
            let name = match (kind, sample.value.value_type) {
                (_, ValueType::Sum) => format!("{}_sum", metric.name),
                (_, ValueType::Count) => format!("{}_count", metric.name),
                (Kind::Histogram, ValueType::Sample) => format!("{}_bucket", metric.name),
                (_, ValueType::Sample) => metric.name.clone(),
            };
            // The crate checked the text is a Go-style float; Rust's parser accepts
            // the same spellings (NaN, +Inf, -Inf, exponents). A value it still
            // rejects fails the page rather than being guessed.
            let value: f64 = sample.value.value.parse().map_err(|_| {
                ExpositionError(shorten(&format!("{name}: value {:?} is not a number", sample.value.value.as_str())))
            })?;
            // Moved, not copied: on a large page the label strings are most of the memory.
            let labels = std::mem::take(&mut *sample.labels).into_iter().map(|l| (l.key, unescape(l.value))).collect();
            samples.push(PageSample { name, labels, value, kind });
        }
    }
    Ok(Page { samples })
}

/// Resolves the text format's three label-value escapes (`\\`, `\"`, `\n`); any other
/// backslash is kept as written, as Prometheus does.
pub(crate) fn unescape(raw: String) -> String {
    if !raw.contains('\\') {
        return raw;
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

fn shorten(message: &str) -> String {
    let one_line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= MAX_MESSAGE_CHARS {
        return one_line;
    }
    let cut: String = one_line.chars().take(MAX_MESSAGE_CHARS).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> PageSample {
        let page = parse(text).unwrap();
        assert_eq!(page.samples.len(), 1, "{page:?}");
        page.samples.into_iter().next().unwrap()
    }

    #[test]
    fn histogram_lines_get_their_suffixes_back() {
        let page =
            parse("# TYPE h histogram\nh_sum 3\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n").unwrap();
        let names: Vec<_> = page.samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["h_sum", "h_bucket", "h_bucket", "h_count"]);
        assert!(page.samples.iter().all(|s| s.kind == Kind::Histogram));
        assert_eq!(page.samples[2].label("le"), Some("+Inf"));
    }

    #[test]
    fn special_values_and_escapes() {
        assert!(one("a NaN\n").value.is_nan());
        assert_eq!(one("a +Inf").value, f64::INFINITY);
        assert_eq!(one("a -Inf 1700000000000\n").value, f64::NEG_INFINITY);
        assert_eq!(one("a 1.18734e+06\n").value, 1_187_340.0);
        let s = one("m{p=\"C:\\\\dir\\\"x\\\"\\nend\"} 1\n");
        assert_eq!(s.label("p"), Some("C:\\dir\"x\"\nend"));
        assert_eq!(unescape("a\\tb\\".to_owned()), "a\\tb\\");
    }

    #[test]
    fn families_without_samples_are_not_errors() {
        let page = parse("# HELP a x\n# TYPE a gauge\n# HELP b y\n# TYPE b gauge\nb 1\n").unwrap();
        assert_eq!(page.samples.len(), 1);
        assert_eq!(parse("").unwrap(), Page::default());
        assert_eq!(parse(" \n\n").unwrap(), Page::default());
    }

    #[test]
    fn garbage_fails_with_a_short_message() {
        let err = parse("<html><body>502 Bad Gateway</body></html>").unwrap_err();
        assert!(err.0.contains("502 Bad Gateway"), "{err:?}");
        let long = format!("x{{a=\"{}", "y".repeat(1 << 20));
        let err = parse(&long).unwrap_err();
        assert!(err.0.chars().count() <= MAX_MESSAGE_CHARS + 1, "{}", err.0.len());
        assert!(parse("a 1\nb{} 2\n").is_err(), "a gap documented above");
    }
}

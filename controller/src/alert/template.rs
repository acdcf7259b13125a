//! The subset of Prometheus' alert templating (Go `text/template`) that rule
//! files use: `{{ $labels.name }}`, `{{ $value }}`, pipes into `humanize`,
//! `humanize1024`, `humanizePercentage`, `humanizeDuration`, `toUpper`,
//! `toLower`, and `printf` with one argument. Everything else is refused when
//! the rules load, so a template never fails or prints an error at 3 a.m.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Why a template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {text:?}: {message}")]
pub struct TemplateError {
    pub text: String,
    pub message: String,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Action { arg: Arg, pipes: Vec<Func> },
}

#[derive(Debug, Clone, PartialEq)]
enum Arg {
    Value,
    Label(String),
    Str(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Func {
    Humanize,
    Humanize1024,
    HumanizePercentage,
    HumanizeDuration,
    ToUpper,
    ToLower,
    Printf(String),
}

/// What a template is rendered with.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a> {
    pub labels: &'a [(String, String)],
    pub value: f64,
}

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let err = |message: String| TemplateError { text: text.to_owned(), message };
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| err("a `{{` is never closed by `}}`".to_owned()))?;
            let inner = after[..close].trim_start_matches('-').trim_end_matches('-').trim();
            parts.push(parse_action(inner).map_err(err)?);
            rest = &after[close + 2..];
        }
        if rest.contains("}}") {
            return Err(err("a `}}` has no opening `{{`".to_owned()));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// The label names the template reads.
    pub fn labels_read(&self) -> BTreeSet<&str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Action { arg: Arg::Label(l), .. } => Some(l.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Renders the template; a label the alert lacks renders as the empty string,
    /// as in Prometheus.
    pub fn render(&self, data: Data<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Action { arg, pipes } => {
                    let mut v = match arg {
                        Arg::Value => Val::Num(data.value),
                        Arg::Label(name) => Val::Str(
                            data.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default(),
                        ),
                        Arg::Str(s) => Val::Str(s.clone()),
                    };
                    for f in pipes {
                        v = apply(f, v);
                    }
                    out.push_str(&v.into_string());
                }
            }
        }
        out
    }
}

enum Val {
    Num(f64),
    Str(String),
}

impl Val {
    fn into_string(self) -> String {
        match self {
            Val::Num(v) => format_go_value(v),
            Val::Str(s) => s,
        }
    }

    /// The number a humanize function reads; a string is parsed as Prometheus does.
    fn num(&self) -> f64 {
        match self {
            Val::Num(v) => *v,
            Val::Str(s) => s.trim().parse().unwrap_or(f64::NAN),
        }
    }
}

fn apply(f: &Func, v: Val) -> Val {
    match f {
        Func::Humanize => Val::Str(humanize(v.num(), 1000.0, &["", "k", "M", "G", "T", "P", "E", "Z", "Y"])),
        Func::Humanize1024 => {
            Val::Str(humanize(v.num(), 1024.0, &["", "ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"]))
        }
        Func::HumanizePercentage => Val::Str(format!("{}%", format_g(v.num() * 100.0, 4))),
        Func::HumanizeDuration => Val::Str(humanize_duration(v.num())),
        Func::ToUpper => Val::Str(v.into_string().to_uppercase()),
        Func::ToLower => Val::Str(v.into_string().to_lowercase()),
        Func::Printf(fmt) => Val::Str(printf(fmt, &v)),
    }
}

fn parse_action(inner: &str) -> Result<Part, String> {
    let stages: Vec<&str> = inner.split('|').map(str::trim).collect();
    let Some((first, pipes)) = stages.split_first() else {
        return Err("an empty `{{ }}`".to_owned());
    };
    let tokens = tokenize(first)?;
    let (arg, mut funcs) = match tokens.as_slice() {
        [] => return Err("an empty `{{ }}`".to_owned()),
        [t] => (parse_arg(t)?, Vec::new()),
        [Token::Word(f), rest @ ..] => {
            let (func, arg) = parse_call(f, rest)?;
            (arg.ok_or_else(|| format!("`{f}` needs an argument, such as $value"))?, vec![func])
        }
        _ => return Err(format!("cannot read `{first}`")),
    };
    for stage in pipes {
        let tokens = tokenize(stage)?;
        match tokens.as_slice() {
            [Token::Word(f), rest @ ..] => {
                let (func, arg) = parse_call(f, rest)?;
                if arg.is_some() {
                    return Err(format!("`{stage}`: a piped function takes its argument from the pipe"));
                }
                funcs.push(func);
            }
            _ => return Err(format!("`{stage}` is not a function name")),
        }
    }
    Ok(Part::Action { arg, pipes: funcs })
}

/// `f args...`: the function and, when given, its data argument.
fn parse_call(f: &str, rest: &[Token]) -> Result<(Func, Option<Arg>), String> {
    let simple = match f {
        "humanize" => Some(Func::Humanize),
        "humanize1024" => Some(Func::Humanize1024),
        "humanizePercentage" => Some(Func::HumanizePercentage),
        "humanizeDuration" => Some(Func::HumanizeDuration),
        "toUpper" => Some(Func::ToUpper),
        "toLower" => Some(Func::ToLower),
        _ => None,
    };
    if let Some(func) = simple {
        return match rest {
            [] => Ok((func, None)),
            [t] => Ok((func, Some(parse_arg(t)?))),
            _ => Err(format!("`{f}` takes one argument")),
        };
    }
    if f == "printf" {
        let (fmt, arg) = match rest {
            [Token::Str(fmt)] => (fmt.clone(), None),
            [Token::Str(fmt), t] => (fmt.clone(), Some(parse_arg(t)?)),
            _ => return Err("`printf` takes a quoted format and at most one argument".to_owned()),
        };
        check_printf(&fmt)?;
        return Ok((Func::Printf(fmt), arg));
    }
    Err(format!(
        "`{f}` is not supported; use $value, $labels.NAME, printf, humanize, humanize1024, humanizePercentage, \
         humanizeDuration, toUpper or toLower"
    ))
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut lit = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => lit.push('\n'),
                        Some('t') => lit.push('\t'),
                        Some(other) => lit.push(other),
                        None => return Err("an unterminated string".to_owned()),
                    },
                    Some(other) => lit.push(other),
                    None => return Err("an unterminated string".to_owned()),
                }
            }
            out.push(Token::Str(lit));
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '"' {
                    break;
                }
                word.push(c);
                chars.next();
            }
            out.push(Token::Word(word));
        }
    }
    Ok(out)
}

fn parse_arg(t: &Token) -> Result<Arg, String> {
    match t {
        Token::Str(s) => Ok(Arg::Str(s.clone())),
        Token::Word(w) => match w.as_str() {
            "$value" | ".Value" => Ok(Arg::Value),
            w => {
                let label = w.strip_prefix("$labels.").or_else(|| w.strip_prefix(".Labels."));
                match label {
                    Some(l) if valid_label_name(l) => Ok(Arg::Label(l.to_owned())),
                    Some(l) => Err(format!("`{l}` is not a valid label name")),
                    None => Err(format!("`{w}` is not supported; use $value or $labels.NAME")),
                }
            }
        },
    }
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, Prometheus' label name syntax.
pub fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The widest width or precision a `printf` verb may ask for.
const MAX_PRINTF_WIDTH: usize = 64;

/// The verbs [`printf`] renders: `%%`, `%s`, `%v`, `%d`, `%f`, `%e`, `%g`, with
/// an optional precision (`%.2f`).
fn check_printf(fmt: &str) -> Result<(), String> {
    let mut verbs = 0;
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            continue;
        }
        let mut spec = String::new();
        loop {
            match chars.next() {
                Some(d) if d.is_ascii_digit() || d == '.' => spec.push(d),
                Some('%') if spec.is_empty() => break,
                Some('s' | 'v' | 'd' | 'f' | 'e' | 'g') => {
                    if spec.chars().filter(|c| *c == '.').count() > 1 {
                        return Err(format!("printf format {fmt:?}: bad precision `{spec}`"));
                    }
                    let too_big = spec.split('.').any(|n| n.parse::<usize>().is_ok_and(|n| n > MAX_PRINTF_WIDTH));
                    if too_big {
                        return Err(format!(
                            "printf format {fmt:?}: width and precision are at most {MAX_PRINTF_WIDTH}"
                        ));
                    }
                    verbs += 1;
                    break;
                }
                Some(other) => return Err(format!("printf format {fmt:?}: the verb %{spec}{other} is not supported")),
                None => return Err(format!("printf format {fmt:?} ends inside a verb")),
            }
        }
    }
    if verbs > 1 {
        return Err(format!("printf format {fmt:?} has {verbs} verbs; one argument is supported"));
    }
    Ok(())
}

fn printf(fmt: &str, v: &Val) -> String {
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = String::new();
        for d in chars.by_ref() {
            if d.is_ascii_digit() || d == '.' {
                spec.push(d);
                continue;
            }
            let precision = spec.split_once('.').and_then(|(_, p)| p.parse::<usize>().ok());
            let width = spec.split('.').next().and_then(|w| w.parse::<usize>().ok()).unwrap_or(0);
            let s = match (d, v) {
                ('%', _) => "%".to_owned(),
                ('s' | 'v', Val::Str(s)) => s.clone(),
                ('s' | 'v', Val::Num(n)) => format_go_value(*n),
                ('d', v) => format!("{}", v.num().trunc() as i64),
                ('f', v) => format!("{:.*}", precision.unwrap_or(6), v.num()),
                ('e', v) => format_e(v.num(), precision.unwrap_or(6)),
                ('g', v) => precision.map_or_else(|| format_go_value(v.num()), |p| format_g(v.num(), p.max(1))),
                _ => String::new(),
            };
            let _ = write!(out, "{s:>width$}");
            break;
        }
    }
    out
}

/// A float as Go's `%v` prints it (`strconv.FormatFloat(v, 'g', -1, 64)`).
pub fn format_go_value(v: f64) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf".to_owned() } else { "-Inf".to_owned() };
    }
    if v == 0.0 {
        return "0".to_owned();
    }
    // Go's shortest 'g' form: exponent form when the decimal exponent is below -4
    // or at least 6 (1234567 is 1.234567e+06), plain digits otherwise.
    let e_form = format!("{v:e}");
    let exp: i32 = e_form.split_once('e').and_then(|(_, e)| e.parse().ok()).unwrap_or(0);
    if !(-4..6).contains(&exp) {
        return go_exponent(&e_form);
    }
    format!("{v}")
}

/// Rust's `1.5e6` / `1.5e-7` as Go writes it: `1.5e+06` / `1.5e-07`.
fn go_exponent(s: &str) -> String {
    match s.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
        None => s.to_owned(),
    }
}

fn format_e(v: f64, precision: usize) -> String {
    go_exponent(&format!("{v:.precision$e}"))
}

/// Go's `%.{p}g`: `p` significant digits, exponent form for very large or small
/// magnitudes, trailing zeros removed.
pub fn format_g(v: f64, p: usize) -> String {
    if !v.is_finite() {
        return format_go_value(v);
    }
    if v == 0.0 {
        return "0".to_owned();
    }
    // Round to p significant digits first; the exponent is that of the rounded value.
    let e_form = format!("{:.*e}", p.saturating_sub(1), v);
    let exp: i32 = e_form.split_once('e').and_then(|(_, e)| e.parse().ok()).unwrap_or(0);
    if exp < -4 || exp >= p as i32 {
        let (mantissa, _) = e_form.split_once('e').unwrap_or((&e_form, ""));
        let mantissa = trim_zeros(mantissa);
        return go_exponent(&format!("{mantissa}e{exp}"));
    }
    let decimals = usize::try_from(p as i32 - 1 - exp).unwrap_or(0);
    trim_zeros(&format!("{v:.decimals$}")).to_owned()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.') } else { s }
}

/// Prometheus' `humanize` / `humanize1024`.
fn humanize(v: f64, base: f64, big: &[&str]) -> String {
    if v == 0.0 || !v.is_finite() {
        return format_g(v, 4);
    }
    if v.abs() >= 1.0 {
        let mut v = v;
        let mut prefix = big[0];
        for p in &big[1..] {
            if v.abs() < base {
                break;
            }
            prefix = p;
            v /= base;
        }
        return format!("{}{prefix}", format_g(v, 4));
    }
    if base != 1000.0 {
        return format_g(v, 4);
    }
    let (v, prefix) = small_prefix(v);
    format!("{}{prefix}", format_g(v, 4))
}

/// Scales `v` (below 1 in magnitude) up by thousands to at least 1, with the SI
/// prefix that says how far: `0.0012` → `(1.2, "m")`.
fn small_prefix(mut v: f64) -> (f64, &'static str) {
    let mut prefix = "";
    for p in ["m", "u", "n", "p", "f", "a", "z", "y"] {
        if v.abs() >= 1.0 {
            break;
        }
        prefix = p;
        v *= 1000.0;
    }
    (v, prefix)
}

/// Prometheus' `humanizeDuration`: `1d 2h 3m 4s`, or ms/us/ns below a second.
fn humanize_duration(v: f64) -> String {
    if !v.is_finite() {
        return format_g(v, 4);
    }
    if v == 0.0 {
        return "0s".to_owned();
    }
    if v.abs() >= 1.0 {
        // As Prometheus: whole units down to seconds once there is a minute.
        let sign = if v < 0.0 { "-" } else { "" };
        let whole = v.abs() as i64;
        let (days, hours, minutes, seconds) = (whole / 86_400, whole / 3600 % 24, whole / 60 % 60, whole % 60);
        if days != 0 {
            return format!("{sign}{days}d {hours}h {minutes}m {seconds}s");
        }
        if hours != 0 {
            return format!("{sign}{hours}h {minutes}m {seconds}s");
        }
        if minutes != 0 {
            return format!("{sign}{minutes}m {seconds}s");
        }
        return format!("{sign}{}s", format_g(v.abs(), 4));
    }
    let (v, prefix) = small_prefix(v);
    format!("{}{prefix}s", format_g(v, 4))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn render(t: &str, labels: &[(&str, &str)], value: f64) -> String {
        let labels: Vec<(String, String)> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Template::parse(t).unwrap().render(Data { labels: &labels, value })
    }

    #[test]
    fn seed_templates_render_like_prometheus() {
        assert_eq!(
            render("GPU {{ $labels.gpu }} temperature is {{ $value }}°C", &[("gpu", "3")], 84.5),
            "GPU 3 temperature is 84.5°C"
        );
        assert_eq!(render("{{ $value | humanizePercentage }}", &[], 0.9234), "92.34%");
        assert_eq!(render("{{ $value | humanizeDuration }}", &[], 7.25), "7.25s");
        assert_eq!(render("{{ $value | humanizeDuration }}", &[], 3725.0), "1h 2m 5s");
        assert_eq!(render("{{ $value | humanizeDuration }}", &[], 3600.0), "1h 0m 0s");
        assert_eq!(render("{{ $value | humanizeDuration }}", &[], 61.5), "1m 1s");
        assert_eq!(render("{{ $value | humanizeDuration }}", &[], 90061.0), "1d 1h 1m 1s");
        assert_eq!(render("{{ $value | humanizeDuration }}", &[], 0.512), "512ms");
        assert_eq!(render("{{ humanize $value }}", &[], 1_234_567.0), "1.235M");
        assert_eq!(render("{{ $value | humanize }}", &[], 0.0012), "1.2m");
        assert_eq!(render("{{ $value | humanize1024 }}", &[], 2048.0), "2ki");
        assert_eq!(render(r#"{{ printf "%.1f" $value }} C"#, &[], 80.04), "80.0 C");
        assert_eq!(render("{{ $labels.missing }}|", &[], 1.0), "|", "a missing label renders empty");
        assert_eq!(render("{{ $value }}", &[], 1e21), "1e+21");
        assert_eq!(render("{{ $value }}", &[], 1_234_567.0), "1.234567e+06", "Go's %v");
        assert_eq!(render("{{ $value }}", &[], 123_456.0), "123456");
        assert_eq!(render("{{ $value }}", &[], 0.0001), "0.0001");
        assert_eq!(render("{{ $value }}", &[], 0.00001), "1e-05");
        assert_eq!(render("{{ $value }}", &[], f64::NAN), "NaN");
        assert_eq!(render("{{ $labels.node | toUpper }}", &[("node", "gpu-1")], 0.0), "GPU-1");
    }

    #[test]
    fn labels_read_are_listed() {
        let t = Template::parse("{{ $labels.node }}/{{ .Labels.gpu }} {{ $value }}").unwrap();
        assert_eq!(t.labels_read().into_iter().collect::<Vec<_>>(), ["gpu", "node"]);
    }

    #[test]
    fn unsupported_templates_are_refused_with_the_reason() {
        for (t, why) in [
            ("{{ $value", "never closed"),
            ("}}", "no opening"),
            ("{{ }}", "empty"),
            ("{{ query \"up\" }}", "`query` is not supported"),
            ("{{ $labels.9x }}", "not a valid label name"),
            ("{{ $externalLabels.a }}", "not supported"),
            (r#"{{ printf "%x" $value }}"#, "%x is not supported"),
            (r#"{{ printf "%s %s" $value }}"#, "2 verbs"),
            (r#"{{ printf "%.70000f" $value }}"#, "at most 64"),
            ("{{ $value | humanize $value }}", "from the pipe"),
            ("{{ $value | humanize 3 }}", "`3` is not supported"),
        ] {
            let err = Template::parse(t).unwrap_err().to_string();
            assert!(err.contains(why), "{t}: {err}");
        }
    }

    #[test]
    fn go_number_formats() {
        assert_eq!(format_g(123_456.0, 4), "1.235e+05");
        assert_eq!(format_g(0.000_012_34, 4), "1.234e-05");
        assert_eq!(format_g(99.99, 4), "99.99");
        assert_eq!(format_g(100.0, 4), "100");
        assert_eq!(format_g(9999.5, 4), "1e+04");
        assert_eq!(format_go_value(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(format_go_value(-2.5e-7), "-2.5e-07");
    }
}

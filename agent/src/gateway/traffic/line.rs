//! One line of the `flotilla` access-log format, parsed: which upstream server
//! answered, with which status class, how fast.
//!
//! The format is `$proxy_host $upstream_addr $upstream_status
//! $upstream_response_time $status` (see `deploy/nginx/nginx.conf.example`).
//! When nginx tried several servers (a retry after an error, `proxy_next_upstream`)
//! the three upstream variables are lists, `10.0.0.1:80, 10.0.0.2:80`, and an
//! internal redirect to another upstream group adds ` : ` between groups. The
//! response the client got came from the last server tried, so the line is
//! attributed to the last item of each list.

/// The longest upstream or server name accepted: both become label values, which
/// the controller refuses past 256 bytes.
const MAX_NAME: usize = 200;

/// A response nginx proxied, as the counters need it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Response {
    /// `$proxy_host`: the upstream group (`llama` for `proxy_pass http://llama`).
    pub upstream: String,
    /// The last `$upstream_addr`: the server that answered (`127.0.0.1:18001`), or
    /// the group's name when nginx found no live server.
    pub server: String,
    /// The status class, 1 to 5 (for 1xx to 5xx).
    pub class: u8,
    /// The last `$upstream_response_time`, when nginx measured one.
    pub seconds: Option<f64>,
}

/// What a line says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Line {
    /// A proxied response.
    Proxied(Response),
    /// A request nginx answered without an upstream (a `return`, a static file):
    /// no server to attribute it to.
    NoUpstream,
}

/// Why a line was not understood; only counted, the text is for tests and debug logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed(pub &'static str);

/// Parses one line (without its newline).
pub(crate) fn parse(line: &str) -> Result<Line, Malformed> {
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(Malformed("control characters"));
    }
    let fields = fields(line);
    let [proxy_host, addr, upstream_status, response_time, status] = fields.as_slice() else {
        return Err(Malformed("not five fields"));
    };
    let status = parse_status(status).ok_or(Malformed("$status is not an HTTP status"))?;
    let server = last(addr);
    if proxy_host == "-" || server == "-" {
        return Ok(Line::NoUpstream);
    }
    if proxy_host.len() > MAX_NAME || server.len() > MAX_NAME || proxy_host.contains(',') {
        return Err(Malformed("an upstream or server name too long or a list"));
    }
    // No upstream status (the client went away before the server answered, or the
    // connection failed): the status nginx sent the client stands for it.
    let class = match last(upstream_status) {
        "-" => status,
        s => parse_status(s).ok_or(Malformed("$upstream_status is not an HTTP status"))?,
    } / 100;
    let seconds = match last(response_time) {
        "-" => None,
        s => match s.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Some(v),
            _ => return Err(Malformed("$upstream_response_time is not a number of seconds")),
        },
    };
    Ok(Line::Proxied(Response {
        upstream: proxy_host.clone(),
        server: server.to_owned(),
        class: u8::try_from(class).unwrap_or(5),
        seconds,
    }))
}

/// Splits a line into its five variables. A list variable holds spaces (`a, b`,
/// `a : b`), so a token ending in `,`, the token `:` and the token after it
/// continue the field before them instead of starting one.
fn fields(line: &str) -> Vec<String> {
    let mut fields: Vec<String> = Vec::with_capacity(5);
    let mut continues = false;
    for token in line.split_ascii_whitespace() {
        match fields.last_mut() {
            Some(field) if continues || token == ":" => {
                field.push(' ');
                field.push_str(token);
            }
            _ => fields.push(token.to_owned()),
        }
        continues = token.ends_with(',') || token == ":";
    }
    fields
}

/// The last item of a list variable: after the last ` : ` (another upstream
/// group), then after the last `,`. Addresses keep their own colons (`[::1]:80`).
fn last(field: &str) -> &str {
    let group = field.rsplit(" : ").next().unwrap_or(field);
    group.rsplit(',').next().unwrap_or(group).trim()
}

fn parse_status(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|s| (100..=599).contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxied(line: &str) -> Response {
        match parse(line) {
            Ok(Line::Proxied(r)) => r,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn a_plain_line_is_attributed_to_its_server() {
        let r = proxied("llama 127.0.0.1:18001 200 0.042 200");
        assert_eq!(
            r,
            Response { upstream: "llama".into(), server: "127.0.0.1:18001".into(), class: 2, seconds: Some(0.042) }
        );
        let v6 = proxied("llama [::1]:8000 404 0.001 404");
        assert_eq!((v6.server.as_str(), v6.class), ("[::1]:8000", 4));
    }

    #[test]
    fn retries_are_attributed_to_the_last_server_tried() {
        let r = proxied("llama 10.0.0.1:80, 10.0.0.2:80 502, 200 0.003, 0.120 200");
        assert_eq!((r.server.as_str(), r.class, r.seconds), ("10.0.0.2:80", 2, Some(0.120)));
        let all_failed = proxied("llama 10.0.0.1:80, 10.0.0.2:80 502, 502 0.001, 0.002 502");
        assert_eq!((all_failed.server.as_str(), all_failed.class), ("10.0.0.2:80", 5));
        let redirected = proxied("llama 10.0.0.1:80, 10.0.0.2:80 : 10.0.0.3:80 502, 502 : 201 0.1, 0.2 : 0.3 201");
        assert_eq!((redirected.server.as_str(), redirected.class, redirected.seconds), ("10.0.0.3:80", 2, Some(0.3)));
    }

    #[test]
    fn missing_upstream_values_fall_back_or_are_left_out() {
        // The client closed the connection before the server answered.
        let gone = proxied("llama 127.0.0.1:18001 - - 499");
        assert_eq!((gone.class, gone.seconds), (4, None));
        // No live server: nginx names the group and answers 502 itself.
        let none_live = proxied("llama llama 502 0.000 502");
        assert_eq!((none_live.server.as_str(), none_live.class), ("llama", 5));
        assert_eq!(parse("- - - - 200"), Ok(Line::NoUpstream));
        assert_eq!(parse("llama - - - 404"), Ok(Line::NoUpstream));
    }

    /// Lines as nginx 1.22 wrote them with the example config: a plain answer, a
    /// retry after a refused connection, a 404, and both servers down.
    #[test]
    fn lines_written_by_a_real_nginx_parse() {
        let lines = [
            ("llama 127.0.0.1:18001 200 0.001 200", "127.0.0.1:18001", 2),
            ("llama 127.0.0.1:18002, 127.0.0.1:18001 502, 200 0.001, 0.001 200", "127.0.0.1:18001", 2),
            ("llama 127.0.0.1:18001 404 0.006 404", "127.0.0.1:18001", 4),
            ("llama 127.0.0.1:18001, llama 502, 502 0.001, 0.000 502", "llama", 5),
            ("llama llama 502 0.000 502", "llama", 5),
        ];
        for (line, server, class) in lines {
            let r = proxied(line);
            assert_eq!((r.upstream.as_str(), r.server.as_str(), r.class), ("llama", server, class), "{line}");
        }
    }

    #[test]
    fn malformed_lines_are_refused() {
        for line in [
            "",
            "llama 127.0.0.1:1 200 0.1",
            "llama 127.0.0.1:1 200 0.1 200 extra",
            "127.0.0.1 - - [01/Jan/2025:00:00:00 +0000] \"GET / HTTP/1.1\" 200 612 \"-\" \"curl/8\"",
            "llama 127.0.0.1:1 200 0.1 abc",
            "llama 127.0.0.1:1 200 0.1 700",
            "llama 127.0.0.1:1 2x0 0.1 200",
            "llama 127.0.0.1:1 200 soon 200",
            "llama 127.0.0.1:1 200 -0.5 200",
            "llama 127.0.0.1:1 200 NaN 200",
            "llama\u{7} 127.0.0.1:1 200 0.1 200",
        ] {
            assert!(parse(line).is_err(), "{line:?} should be malformed: {:?}", parse(line));
        }
        let long = format!("{} 127.0.0.1:1 200 0.1 200", "u".repeat(MAX_NAME + 1));
        assert!(parse(&long).is_err());
    }
}

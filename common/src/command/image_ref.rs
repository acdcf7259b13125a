//! The image reference grammar of the container ecosystem (`distribution/reference`):
//! `[host[:port]/]path[:tag][@algorithm:hex]`, or a bare image id `sha256:HEX64`.
//! Shared so that the controller refuses a deployment spec with the same reason
//! the agent would refuse its container spec, before a rollout starts (fuzzing
//! found specs the controller planned and every agent then refused).

/// Why `image` is not a reference, or `None` when it is one.
pub fn check(image: &str) -> Option<&'static str> {
    if image.is_empty() {
        return Some("it is empty");
    }
    if let Some(hex) = image.strip_prefix("sha256:") {
        return (!is_hex(hex) || hex.len() != 64).then_some("an image id is sha256: and 64 hex digits");
    }
    let (rest, digest) = match image.rsplit_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest
        && let Some(reason) = check_digest(digest)
    {
        return Some(reason);
    }
    // A colon after the last slash starts the tag; one before it is a registry port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag
        && let Some(reason) = check_tag(tag)
    {
        return Some(reason);
    }
    check_name(name)
}

fn check_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("the repository name is empty");
    }
    if name.len() > 255 {
        return Some("the repository name is longer than 255 characters");
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 && looks_like_host(components[0]) {
        if let Some(reason) = check_host(components[0]) {
            return Some(reason);
        }
        components.remove(0);
    }
    components.into_iter().find_map(check_path_component)
}

/// As Docker decides: a first component with a dot, a port or upper case, or
/// `localhost`, is a registry host rather than part of the path.
fn looks_like_host(component: &str) -> bool {
    component.contains(['.', ':']) || component == "localhost" || component.chars().any(|c| c.is_ascii_uppercase())
}

fn check_host(host: &str) -> Option<&'static str> {
    let (name, port) = if host.starts_with('[') {
        let Some(end) = host.rfind(']') else {
            return Some("the registry's IPv6 address is malformed");
        };
        let rest = &host[end + 1..];
        if !rest.is_empty() && !rest.starts_with(':') {
            return Some("the registry's IPv6 address is malformed");
        }
        (&host[..=end], rest.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return Some("the registry port is not a number");
    }
    if name.starts_with('[') {
        let inner = name.trim_start_matches('[').trim_end_matches(']');
        return inner.parse::<std::net::Ipv6Addr>().is_err().then_some("the registry's IPv6 address is malformed");
    }
    let ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    (!ok).then_some("the registry host is not a host name")
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn check_path_component(component: &str) -> Option<&'static str> {
    if component.is_empty() {
        return Some("the path has an empty component (// or a trailing /)");
    }
    if component.chars().any(|c| c.is_ascii_uppercase()) {
        return Some("repository names must be lower case");
    }
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !component.starts_with(alnum) || !component.ends_with(alnum) {
        return Some("each path component must start and end with a letter or digit");
    }
    let mut separator = String::new();
    for c in component.chars() {
        if alnum(c) {
            let ok = separator.is_empty()
                || separator == "."
                || separator == "_"
                || separator == "__"
                || separator.chars().all(|s| s == '-');
            if !ok {
                return Some("separators in a path are one '.', one or two '_', or dashes");
            }
            separator.clear();
        } else if matches!(c, '.' | '_' | '-') {
            separator.push(c);
        } else {
            return Some("the repository name has a character outside [a-z0-9._-/]");
        }
    }
    None
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> Option<&'static str> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if tag.is_empty() {
        return Some("the tag after ':' is empty");
    }
    if tag.len() > 128 {
        return Some("the tag is longer than 128 characters");
    }
    let ok = tag.starts_with(word) && tag.chars().all(|c| word(c) || c == '.' || c == '-');
    (!ok).then_some("the tag must be [A-Za-z0-9_][A-Za-z0-9_.-]*")
}

/// `algorithm:hex`, with at least 32 hex digits.
fn check_digest(digest: &str) -> Option<&'static str> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Some("the digest after '@' has no algorithm (sha256:…)");
    };
    let algorithm_ok = algorithm.starts_with(|c: char| c.is_ascii_alphabetic())
        && algorithm.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-' | '_'));
    if !algorithm_ok {
        return Some("the digest algorithm is malformed");
    }
    (!is_hex(hex) || hex.len() < 32).then_some("the digest is not at least 32 hex digits")
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn real_references_pass() {
        for ok in [
            "busybox",
            "flotilla-standin:test",
            "vllm/vllm-openai:v0.8.5",
            "ghcr.io/huggingface/text-generation-inference:3.0",
            "localhost:5000/models/llama__8b:latest",
            "registry.example.com:443/a/b-c/d.e:1.2.3-rc_1",
            "nvcr.io/nvidia/tritonserver@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "lmsysorg/sglang:v0.4.6-cu124@sha256:0123456789abcdef0123456789abcdef",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "[::1]:5000/x",
            "[::1]/x",
            "a---b",
        ] {
            assert_eq!(check(ok), None, "{ok}");
        }
    }

    #[test]
    fn malformed_references_are_refused_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("Busybox", "lower case"),
            ("vllm/OpenAI", "lower case"),
            ("vllm//openai", "empty component"),
            ("vllm/openai:", "tag after ':' is empty"),
            ("vllm/openai:-x", "tag must be"),
            ("vllm/open ai", "character outside"),
            ("vllm/openai@sha256:12", "32 hex"),
            ("vllm/openai@12345678901234567890123456789012", "no algorithm"),
            ("sha256:abc", "image id"),
            ("host:port/x", "port is not a number"),
            ("-bad/x", "start and end"),
            ("a..b", "separators"),
            ("a_-b", "separators"),
        ] {
            let reason = check(bad).unwrap_or_else(|| panic!("{bad:?} passed"));
            assert!(reason.contains(why), "{bad:?}: {reason}");
        }
    }
}

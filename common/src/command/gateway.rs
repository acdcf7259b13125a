//! The payload of `gateway-set`: an nginx upstream's name and its weighted
//! servers. Parsed from `flotctl exec NODE gateway-set --arg upstream=NAME
//! --arg servers=HOST:PORT=WEIGHT,...` and checked again on the agent, since
//! what the agent renders goes into a file nginx loads.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// The highest weight a server may be given; weights are shares out of the sum.
pub const MAX_WEIGHT: u8 = 100;
/// The most servers one upstream may list: two revisions of the largest
/// deployment (64 replicas) side by side, and what the gateway's per-server
/// traffic counters keep (`agent::gateway::traffic::MAX_SERVERS`).
pub const MAX_SERVERS: usize = 128;
/// The longest upstream name.
pub const MAX_UPSTREAM_LEN: usize = 64;

/// One backend of an upstream with its weight. Weight 0 keeps the server in the
/// file but out of rotation (`down`): nginx has no weight 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightedServer {
    /// `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT`.
    pub address: String,
    pub weight: u8,
}

/// An upstream and the weights it should have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayWeights {
    pub upstream: String,
    pub servers: Vec<WeightedServer>,
}

impl GatewayWeights {
    /// Parses `servers` (`ADDR=WEIGHT,ADDR=WEIGHT...`) for `upstream`, then validates.
    pub fn parse(upstream: &str, servers: &str) -> Result<Self, String> {
        let mut list = Vec::new();
        for item in servers.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!("servers {servers:?}: an empty entry (use HOST:PORT=WEIGHT,HOST:PORT=WEIGHT)"));
            }
            let Some((address, weight)) = item.rsplit_once('=') else {
                return Err(format!("server {item:?}: use HOST:PORT=WEIGHT"));
            };
            let weight = match weight.trim().parse::<u8>() {
                Ok(w) if w <= MAX_WEIGHT => w,
                _ => return Err(format!("server {item:?}: the weight must be a whole number 0..={MAX_WEIGHT}")),
            };
            list.push(WeightedServer { address: address.trim().to_owned(), weight });
        }
        let weights = Self { upstream: upstream.to_owned(), servers: list };
        weights.validate()?;
        Ok(weights)
    }

    /// Every rule `parse` applies; the agent runs it again on what it received.
    pub fn validate(&self) -> Result<(), String> {
        validate_upstream(&self.upstream)?;
        if self.servers.is_empty() {
            return Err("gateway-set needs at least one server".to_owned());
        }
        if self.servers.len() > MAX_SERVERS {
            return Err(format!("{} servers is more than {MAX_SERVERS}", self.servers.len()));
        }
        for (i, s) in self.servers.iter().enumerate() {
            validate_address(&s.address)?;
            if s.weight > MAX_WEIGHT {
                return Err(format!("server {}: weight {} is above {MAX_WEIGHT}", s.address, s.weight));
            }
            if self.servers[..i].iter().any(|o| o.address.eq_ignore_ascii_case(&s.address)) {
                return Err(format!("server {} is listed twice", s.address));
            }
        }
        if self.servers.iter().all(|s| s.weight == 0) {
            return Err("every server has weight 0: at least one must take traffic".to_owned());
        }
        Ok(())
    }

    /// A short, stable fingerprint of the upstream and its weights (16 hex digits
    /// of SHA-256). The rendered file serves it, so the agent can tell that nginx
    /// runs this configuration and not the one before.
    pub fn revision(&self) -> String {
        let mut h = sha2::Sha256::new();
        h.update(self.upstream.as_bytes());
        for s in &self.servers {
            h.update(format!("\n{} {}", s.address, s.weight).as_bytes());
        }
        h.finalize().iter().take(8).fold(String::with_capacity(16), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }
}

/// An upstream name: `[a-zA-Z0-9_-]`, 1 to 64 characters.
pub fn validate_upstream(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_UPSTREAM_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok { Ok(()) } else { Err(format!("upstream {name:?} must be 1 to 64 of [a-zA-Z0-9_-]")) }
}

/// `HOST:PORT` where HOST is an IPv4 literal, a bracketed IPv6 literal or a DNS
/// name, and PORT is 1..=65535. Nothing else reaches the nginx file.
fn validate_address(address: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("server address {address:?}: {why}"));
    let Some((host, port)) = address.rsplit_once(':') else {
        return bad("use HOST:PORT");
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.chars().all(|c| c.is_ascii_digit()) => {}
        _ => return bad("the port must be 1..=65535"),
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => bad("not an IPv6 address inside [ ]"),
        };
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let all_digits = host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if host.is_empty() || host.len() > 253 || all_digits || !host.split('.').all(label_ok) {
        return bad("the host must be an IPv4 address, [IPv6] or a DNS name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(upstream: &str, servers: &str) -> String {
        GatewayWeights::parse(upstream, servers).unwrap_err()
    }

    #[test]
    fn weights_parse_in_order() {
        let w = GatewayWeights::parse("llama", "127.0.0.1:8001=90, [::1]:8002=10,backend-3.local:80=0").unwrap();
        assert_eq!(w.upstream, "llama");
        let got: Vec<(&str, u8)> = w.servers.iter().map(|s| (s.address.as_str(), s.weight)).collect();
        assert_eq!(got, [("127.0.0.1:8001", 90), ("[::1]:8002", 10), ("backend-3.local:80", 0)]);
    }

    #[test]
    fn bad_weights_are_refused_with_the_reason() {
        assert!(err("ll ama", "127.0.0.1:1=1").contains("upstream"));
        assert!(err("", "127.0.0.1:1=1").contains("upstream"));
        assert!(err("x;", "127.0.0.1:1=1").contains("upstream"));
        assert!(err("llama", "").contains("empty entry"));
        assert!(err("llama", "127.0.0.1:1=1,").contains("empty entry"));
        assert!(err("llama", "127.0.0.1:1").contains("HOST:PORT=WEIGHT"));
        assert!(err("llama", "127.0.0.1:1=101").contains("0..=100"));
        assert!(err("llama", "127.0.0.1:1=-1").contains("0..=100"));
        assert!(err("llama", "127.0.0.1:1=1.5").contains("0..=100"));
        assert!(err("llama", "127.0.0.1=1").contains("HOST:PORT"));
        assert!(err("llama", "127.0.0.1:0=1").contains("port"));
        assert!(err("llama", "127.0.0.1:70000=1").contains("port"));
        assert!(err("llama", "127.0.0.1:+80=1").contains("port"));
        assert!(err("llama", "[zz]:80=1").contains("IPv6"));
        assert!(err("llama", "bad host:80=1").contains("host"));
        assert!(err("llama", "a;b:80=1").contains("host"));
        assert!(err("llama", "999.1.1.1:80=1").contains("host"));
        assert!(err("llama", "-x:80=1").contains("host"));
        assert!(err("llama", "a:80=1,A:80=2").contains("twice"));
        assert!(err("llama", "a:80=0,b:80=0").contains("weight 0"));
        let many: Vec<String> = (1..=(MAX_SERVERS as u16 + 1)).map(|p| format!("127.0.0.1:{p}=1")).collect();
        assert!(err("llama", &many.join(",")).contains(&format!("more than {MAX_SERVERS}")));
    }

    #[test]
    fn the_revision_follows_the_weights() {
        let a = GatewayWeights::parse("llama", "127.0.0.1:8001=90,127.0.0.1:8002=10").unwrap();
        let b = GatewayWeights::parse("llama", "127.0.0.1:8001=0,127.0.0.1:8002=100").unwrap();
        assert_eq!(a.revision().len(), 16);
        assert!(a.revision().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.revision(), a.clone().revision());
        assert_ne!(a.revision(), b.revision());
    }
}

//! Join tokens and CA fingerprints: the formats that `flotctl token create`,
//! the controller and an enrolling agent share.
//!
//! A join token is `flt1.<secret>.<ca>`: `secret` is 32 random bytes in hex, the
//! part the controller checks (it stores only its SHA-256); `ca` is the SHA-256
//! of the fleet CA certificate (DER) in hex, which the agent pins when it first
//! dials the controller, before it has the CA. The `.<ca>` part may be left out
//! when the operator passes the fingerprint separately (`--ca-fingerprint`),
//! as with kubeadm's `--discovery-token-ca-cert-hash`.
//!
//! Neither the secret nor a whole token has `Display`; [`JoinToken::reveal`]
//! is the one way to text, so that a token cannot slip into a log by a `%`.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The version tag every join token starts with.
pub const TOKEN_PREFIX: &str = "flt1";
/// The prefix of a written CA fingerprint.
pub const FINGERPRINT_PREFIX: &str = "sha256:";

/// Why a string is not a join token or a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("a join token starts with \"{TOKEN_PREFIX}.\"; this one does not (was it copied whole?)")]
    Prefix,
    #[error("a join token is {TOKEN_PREFIX}.SECRET or {TOKEN_PREFIX}.SECRET.CA_SHA256; this one has {0} parts")]
    Parts(usize),
    #[error("the join token's secret must be 64 hex digits")]
    Secret,
    #[error("a CA fingerprint is sha256: and 64 hex digits (colons allowed): {0}")]
    Fingerprint(String),
}

/// The secret part of a join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinSecret([u8; 32]);

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinSecret(<redacted>)")
    }
}

impl JoinSecret {
    /// 32 bytes from the operating system's random source.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// Parses the 64 hex digits of a secret.
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        decode_hex32(text).map(Self).ok_or(TokenFormatError::Secret)
    }

    /// What the controller stores and looks tokens up by.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0).into())
    }

    /// The secret as hex, for the one response that carries it.
    pub fn reveal(&self) -> String {
        encode_hex(&self.0)
    }
}

/// The SHA-256 of a join token's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// A short public name of the token (the first 8 bytes of the hash in hex):
    /// it says nothing about the secret, so it can be listed, logged and audited.
    pub fn id(&self) -> String {
        encode_hex(&self.0[..8])
    }
}

/// The SHA-256 of the fleet CA certificate (DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct CaFingerprint(pub [u8; 32]);

impl TryFrom<String> for CaFingerprint {
    type Error = TokenFormatError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl CaFingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The 64 hex digits without the `sha256:` prefix.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{FINGERPRINT_PREFIX}{}", self.to_hex())
    }
}

impl fmt::Debug for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for CaFingerprint {
    type Err = TokenFormatError;

    /// Accepts `sha256:HEX`, plain `HEX`, and the colon-separated form
    /// `openssl x509 -fingerprint -sha256` prints, in either case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let body = trimmed
            .get(..FINGERPRINT_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(FINGERPRINT_PREFIX))
            .map_or(trimmed, |_| &trimmed[FINGERPRINT_PREFIX.len()..]);
        let digits: String = body.chars().filter(|c| *c != ':').collect();
        decode_hex32(&digits).map(Self).ok_or_else(|| TokenFormatError::Fingerprint(text.to_owned()))
    }
}

/// A parsed join token (in config files: the token as text).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct JoinToken {
    pub secret: JoinSecret,
    /// The CA the agent should expect, when the token carries it.
    pub ca: Option<CaFingerprint>,
}

impl TryFrom<String> for JoinToken {
    type Error = TokenFormatError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl FromStr for JoinToken {
    type Err = TokenFormatError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl JoinToken {
    /// Parses `flt1.SECRET` or `flt1.SECRET.CA`.
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        if parts.first() != Some(&TOKEN_PREFIX) {
            return Err(TokenFormatError::Prefix);
        }
        match parts.as_slice() {
            [_, secret] => Ok(Self { secret: JoinSecret::parse(secret)?, ca: None }),
            [_, secret, ca] => Ok(Self { secret: JoinSecret::parse(secret)?, ca: Some(ca.parse()?) }),
            other => Err(TokenFormatError::Parts(other.len())),
        }
    }

    /// The token as text: shown once, to the operator who created it.
    pub fn reveal(&self) -> String {
        match &self.ca {
            Some(ca) => format!("{TOKEN_PREFIX}.{}.{}", self.secret.reveal(), ca.to_hex()),
            None => format!("{TOKEN_PREFIX}.{}", self.secret.reveal()),
        }
    }
}

/// Lowercase hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_with_and_without_the_ca() {
        let secret = JoinSecret::generate();
        let ca = CaFingerprint::of_der(b"a certificate");
        let token = JoinToken { secret: secret.clone(), ca: Some(ca) };
        let text = token.reveal();
        assert!(text.starts_with("flt1.") && text.len() == 4 + 1 + 64 + 1 + 64, "{text}");
        assert_eq!(JoinToken::parse(&text).unwrap(), token);
        let bare = JoinToken { secret, ca: None };
        assert_eq!(JoinToken::parse(&bare.reveal()).unwrap(), bare);
        assert_eq!(JoinToken::parse(&format!("  {}\n", bare.reveal())).unwrap(), bare, "pasted with whitespace");
    }

    #[test]
    fn malformed_tokens_are_refused_with_the_reason() {
        let good = "a".repeat(64);
        assert_eq!(JoinToken::parse(&format!("flt2.{good}")), Err(TokenFormatError::Prefix));
        assert_eq!(JoinToken::parse(&good), Err(TokenFormatError::Prefix));
        assert_eq!(JoinToken::parse("flt1"), Err(TokenFormatError::Parts(1)));
        assert_eq!(JoinToken::parse(&format!("flt1.{good}.{good}.{good}")), Err(TokenFormatError::Parts(4)));
        assert_eq!(JoinToken::parse(&format!("flt1.{}", "a".repeat(63))), Err(TokenFormatError::Secret));
        assert_eq!(JoinToken::parse(&format!("flt1.{}", "g".repeat(64))), Err(TokenFormatError::Secret));
        assert!(matches!(JoinToken::parse(&format!("flt1.{good}.xyz")), Err(TokenFormatError::Fingerprint(_))));
    }

    #[test]
    fn the_hash_is_sha256_of_the_secret_bytes_and_the_id_its_first_eight() {
        let secret = JoinSecret::parse(&"00".repeat(32)).unwrap();
        // SHA-256 of 32 zero bytes.
        let want = "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925";
        assert_eq!(encode_hex(&secret.hash().0), want);
        assert_eq!(secret.hash().id(), &want[..16]);
        assert_ne!(JoinSecret::generate().hash(), JoinSecret::generate().hash());
    }

    #[test]
    fn fingerprints_parse_in_every_common_spelling() {
        let fp = CaFingerprint::of_der(b"ca");
        let hex = fp.to_hex();
        let colons = hex
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        for text in [fp.to_string(), hex.clone(), colons, format!("SHA256:{hex}")] {
            assert_eq!(text.parse::<CaFingerprint>().unwrap(), fp, "{text}");
        }
        assert!("sha256:abc".parse::<CaFingerprint>().is_err());
        assert!("md5:00".parse::<CaFingerprint>().is_err());
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let token = JoinToken { secret: JoinSecret::generate(), ca: None };
        let shown = format!("{token:?}");
        assert!(!shown.contains(&token.secret.reveal()), "{shown}");
        assert!(shown.contains("redacted"));
    }
}

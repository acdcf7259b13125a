//! Signed command envelopes. TLS alone is never the authority for acting on a
//! host: every command is an envelope (version, id, target node, issued-at,
//! expires-at, key id, payload) encoded once and signed with the controller's
//! Ed25519 key over exactly the bytes shipped. An agent executes an envelope only
//! if the signature verifies against its pinned key, it targets this node, it is
//! within its validity window (with bounded clock skew), its version is the one
//! this build speaks (no downgrade), and its id has not been seen before.
//!
//! The lessons are Salt's CVEs: no method reachable without authentication
//! (CVE-2020-11651), no replay (CVE-2022-22936, CVE-2024-38823), and nothing is
//! added to a message after it is signed.
//!
//! Wire form of the signed bytes: `[version: u16 BE][postcard(Envelope)]`, then,
//! only when there is one, `[postcard(Trailer)]`. The version comes first so
//! that a future format is refused with a clear reason.
//!
//! The trailer carries the trace context (a W3C `traceparent`), so that the
//! agent's run of a command joins the operator's trace. It is inside the signed
//! bytes, so nobody on the way can change it, but it is not part of
//! [`Envelope`]: postcard decoding stops at the envelope's end and ignores what
//! follows, so agents built before the trailer verify and decode a trailed
//! envelope exactly as before (and ignore it), and this build accepts an
//! envelope without one. A trailer that does not decode, or a `traceparent`
//! that does not parse, is ignored: it never refuses a command, and nothing in
//! it changes what runs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::NodeId;
use crate::trace::TraceParent;

/// The envelope format this build writes and accepts.
pub const ENVELOPE_VERSION: u16 = 1;
/// The longest validity an envelope may carry.
pub const MAX_TTL: Duration = Duration::from_secs(60);
/// The default validity of a command.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Tolerated difference between the controller's and the agent's clocks.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// Largest signed envelope accepted.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// A command's unique id: a UUIDv7 (time-ordered, so seen-id sets prune easily).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommandId([u8; 16]);

impl CommandId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// From raw bytes (wire form).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl Default for CommandId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_bytes(self.0).fmt(f)
    }
}

impl fmt::Debug for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommandId({self})")
    }
}

impl std::str::FromStr for CommandId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(|u| Self(*u.as_bytes())).map_err(|e| format!("command id {s:?}: {e}"))
    }
}

/// What the controller signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<P> {
    pub version: u16,
    pub id: CommandId,
    pub target: NodeId,
    pub issued_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
    pub key_id: String,
    pub payload: P,
}

/// Signed context after the envelope (see the module docs): observability
/// only, never read to decide whether or what to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// The W3C `traceparent` of the span that issued the command.
    pub traceparent: Option<String>,
}

impl Trailer {
    /// A trailer carrying `parent`, if any.
    pub fn traced(parent: Option<&TraceParent>) -> Self {
        Self { traceparent: parent.map(ToString::to_string) }
    }

    /// The trace context, when it is well formed.
    pub fn trace_parent(&self) -> Option<TraceParent> {
        self.traceparent.as_deref().and_then(TraceParent::parse)
    }

    fn is_empty(&self) -> bool {
        self.traceparent.is_none()
    }
}

/// What is shipped: the envelope bytes exactly as signed, and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedEnvelope {
    pub bytes: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Why an envelope was refused. Every refusal is reported and nothing runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("envelope is malformed: {0}")]
    Malformed(String),
    #[error("signature does not verify against the pinned controller key")]
    BadSignature,
    #[error("envelope version {found} is not accepted; this agent accepts only version {supported}")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("signed by key {found}, but the pinned controller key is {pinned}")]
    WrongKey { found: String, pinned: String },
    #[error("envelope targets node {target}, not this node ({me})")]
    WrongTarget { target: String, me: String },
    #[error("envelope expired {late_ms} ms ago (beyond the {skew_ms} ms clock-skew allowance)")]
    Expired { late_ms: i64, skew_ms: i64 },
    #[error("envelope issued {ahead_ms} ms in the future (beyond the {skew_ms} ms clock-skew allowance)")]
    IssuedInFuture { ahead_ms: i64, skew_ms: i64 },
    #[error("envelope is valid for {ttl_ms} ms; at most {max_ms} ms is allowed")]
    TtlTooLong { ttl_ms: i64, max_ms: i64 },
    #[error("command {0} was already received: replay refused")]
    Replayed(CommandId),
}

/// Key handling failures, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an Ed25519 {what} PEM key ({reason})")]
    Format { path: PathBuf, what: &'static str, reason: String },
    #[error("encoding the envelope: {0}")]
    Encode(String),
    #[error("validity {ttl_ms} ms is outside 1..={max_ms} ms")]
    BadTtl { ttl_ms: u128, max_ms: u128 },
}

fn key_id(key: &VerifyingKey) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The controller's signing key.
pub struct CommandKey {
    signing: SigningKey,
    key_id: String,
}

impl fmt::Debug for CommandKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl CommandKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let signing = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let key_id = key_id(&signing.verifying_key());
        Self { signing, key_id }
    }

    /// Loads the PKCS#8 PEM key at `path`, creating it (mode 0600) if missing.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return Self::load(path);
        }
        let key = Self::generate();
        let pem = key.signing.to_pkcs8_pem(LineEnding::LF).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            what: "private",
            reason: e.to_string(),
        })?;
        crate::pki::write_private(path, pem.as_bytes())
            .map_err(|source| KeyError::Io { path: path.to_owned(), source })?;
        Ok(key)
    }

    /// Loads the PKCS#8 PEM key at `path`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.to_owned(), source })?;
        let signing = SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            what: "private",
            reason: e.to_string(),
        })?;
        let key_id = key_id(&signing.verifying_key());
        Ok(Self { signing, key_id })
    }

    /// The key id (first 8 bytes of SHA-256 of the public key, hex).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public half, for agents to pin.
    pub fn public(&self) -> PinnedKey {
        PinnedKey { key: self.signing.verifying_key(), key_id: self.key_id.clone() }
    }

    /// Signs a command for `target`, valid `ttl` from `now_unix_ms`.
    pub fn sign<P: Serialize>(
        &self,
        id: CommandId,
        target: &NodeId,
        payload: P,
        ttl: Duration,
        now_unix_ms: i64,
    ) -> Result<SignedEnvelope, KeyError> {
        self.sign_with(id, target, payload, ttl, now_unix_ms, &Trailer::default())
    }

    /// [`Self::sign`] with a trailer (the trace context) signed after the envelope.
    pub fn sign_with<P: Serialize>(
        &self,
        id: CommandId,
        target: &NodeId,
        payload: P,
        ttl: Duration,
        now_unix_ms: i64,
        trailer: &Trailer,
    ) -> Result<SignedEnvelope, KeyError> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(KeyError::BadTtl { ttl_ms: ttl.as_millis(), max_ms: MAX_TTL.as_millis() });
        }
        let envelope = Envelope {
            version: ENVELOPE_VERSION,
            id,
            target: target.clone(),
            issued_at_unix_ms: now_unix_ms,
            expires_at_unix_ms: now_unix_ms + ttl.as_millis() as i64,
            key_id: self.key_id.clone(),
            payload,
        };
        self.sign_envelope_with(&envelope, trailer)
    }

    /// Encodes and signs a complete envelope (the final bytes; nothing is added after).
    pub fn sign_envelope<P: Serialize>(&self, envelope: &Envelope<P>) -> Result<SignedEnvelope, KeyError> {
        self.sign_envelope_with(envelope, &Trailer::default())
    }

    /// [`Self::sign_envelope`] with a trailer; an empty trailer is not written,
    /// so the bytes are those of an envelope without one.
    pub fn sign_envelope_with<P: Serialize>(
        &self,
        envelope: &Envelope<P>,
        trailer: &Trailer,
    ) -> Result<SignedEnvelope, KeyError> {
        let mut bytes = envelope.version.to_be_bytes().to_vec();
        bytes = postcard::to_extend(envelope, bytes).map_err(|e| KeyError::Encode(e.to_string()))?;
        if !trailer.is_empty() {
            bytes = postcard::to_extend(trailer, bytes).map_err(|e| KeyError::Encode(e.to_string()))?;
        }
        let signature = self.signing.sign(&bytes).to_bytes().to_vec();
        Ok(SignedEnvelope { bytes, signature })
    }
}

/// The controller's public key as an agent pins it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedKey {
    key: VerifyingKey,
    key_id: String,
}

impl PinnedKey {
    /// Loads an SPKI PEM public key.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.to_owned(), source })?;
        let key = VerifyingKey::from_public_key_pem(&pem).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            what: "public",
            reason: e.to_string(),
        })?;
        Ok(Self { key_id: key_id(&key), key })
    }

    /// Writes the SPKI PEM public key to `path`.
    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        let pem = self.key.to_public_key_pem(LineEnding::LF).map_err(|e| KeyError::Format {
            path: path.to_owned(),
            what: "public",
            reason: e.to_string(),
        })?;
        std::fs::write(path, pem).map_err(|source| KeyError::Io { path: path.to_owned(), source })
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Checks everything but replay, and decodes the envelope. `seen` says
    /// whether an id was already received; the caller records the id durably
    /// before executing.
    pub fn verify<P: DeserializeOwned>(
        &self,
        signed: &SignedEnvelope,
        me: &NodeId,
        now_unix_ms: i64,
        seen: impl FnOnce(&CommandId) -> bool,
    ) -> Result<Envelope<P>, Refusal> {
        self.verify_with_trailer(signed, me, now_unix_ms, seen).map(|(envelope, _)| envelope)
    }

    /// [`Self::verify`], also returning the signed trailer (empty when there is
    /// none or it does not decode: a trailer never refuses an envelope).
    pub fn verify_with_trailer<P: DeserializeOwned>(
        &self,
        signed: &SignedEnvelope,
        me: &NodeId,
        now_unix_ms: i64,
        seen: impl FnOnce(&CommandId) -> bool,
    ) -> Result<(Envelope<P>, Trailer), Refusal> {
        if signed.bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(Refusal::Malformed(format!("{} bytes; the limit is {MAX_ENVELOPE_BYTES}", signed.bytes.len())));
        }
        // The signature first: nothing of an unsigned envelope is interpreted.
        let signature = Signature::from_slice(&signed.signature).map_err(|_| Refusal::BadSignature)?;
        self.key.verify(&signed.bytes, &signature).map_err(|_| Refusal::BadSignature)?;
        let Some((head, body)) = signed.bytes.split_first_chunk::<2>() else {
            return Err(Refusal::Malformed("shorter than its version".into()));
        };
        let version = u16::from_be_bytes(*head);
        if version != ENVELOPE_VERSION {
            return Err(Refusal::UnsupportedVersion { found: version, supported: ENVELOPE_VERSION });
        }
        let (envelope, rest): (Envelope<P>, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let trailer = if rest.is_empty() { Trailer::default() } else { postcard::from_bytes(rest).unwrap_or_default() };
        if envelope.version != version {
            return Err(Refusal::Malformed("version prefix and body disagree".into()));
        }
        if envelope.key_id != self.key_id {
            return Err(Refusal::WrongKey { found: envelope.key_id, pinned: self.key_id.clone() });
        }
        if envelope.target != *me {
            return Err(Refusal::WrongTarget { target: envelope.target.to_string(), me: me.to_string() });
        }
        // Saturating: the times are whatever was signed, and i64 arithmetic at
        // their ends must refuse, not overflow (fuzzing found the panic).
        let skew = CLOCK_SKEW.as_millis() as i64;
        let ttl = envelope.expires_at_unix_ms.saturating_sub(envelope.issued_at_unix_ms);
        if ttl <= 0 || ttl > MAX_TTL.as_millis() as i64 {
            return Err(Refusal::TtlTooLong { ttl_ms: ttl, max_ms: MAX_TTL.as_millis() as i64 });
        }
        if now_unix_ms > envelope.expires_at_unix_ms.saturating_add(skew) {
            let late_ms = now_unix_ms.saturating_sub(envelope.expires_at_unix_ms);
            return Err(Refusal::Expired { late_ms, skew_ms: skew });
        }
        if envelope.issued_at_unix_ms > now_unix_ms.saturating_add(skew) {
            let ahead_ms = envelope.issued_at_unix_ms.saturating_sub(now_unix_ms);
            return Err(Refusal::IssuedInFuture { ahead_ms, skew_ms: skew });
        }
        if seen(&envelope.id) {
            return Err(Refusal::Replayed(envelope.id));
        }
        Ok((envelope, trailer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn node(n: &str) -> NodeId {
        NodeId::new(n).unwrap()
    }

    fn signed(key: &CommandKey) -> SignedEnvelope {
        key.sign(CommandId::new(), &node("gpu-1"), "noop".to_owned(), DEFAULT_TTL, NOW).unwrap()
    }

    fn check(key: &PinnedKey, s: &SignedEnvelope, now: i64) -> Result<Envelope<String>, Refusal> {
        key.verify(s, &node("gpu-1"), now, |_| false)
    }

    #[test]
    fn a_good_envelope_verifies_and_decodes() {
        let key = CommandKey::generate();
        let e = check(&key.public(), &signed(&key), NOW + 1000).unwrap();
        assert_eq!(e.payload, "noop");
        assert_eq!(e.target, node("gpu-1"));
    }

    #[test]
    fn tampering_anywhere_breaks_the_signature() {
        let key = CommandKey::generate();
        let good = signed(&key);
        for i in 0..good.bytes.len() {
            let mut bad = good.clone();
            bad.bytes[i] ^= 0x01;
            assert_eq!(check(&key.public(), &bad, NOW), Err(Refusal::BadSignature), "byte {i}");
        }
        let mut bad = good.clone();
        bad.signature[0] ^= 1;
        assert_eq!(check(&key.public(), &bad, NOW), Err(Refusal::BadSignature));
        let unsigned = SignedEnvelope { bytes: good.bytes.clone(), signature: Vec::new() };
        assert_eq!(check(&key.public(), &unsigned, NOW), Err(Refusal::BadSignature));
        assert_eq!(check(&CommandKey::generate().public(), &good, NOW), Err(Refusal::BadSignature), "another key");
    }

    #[test]
    fn validity_times_at_the_ends_of_i64_are_refused_without_overflow() {
        let key = CommandKey::generate();
        let pinned = key.public();
        let at = |issued: i64, expires: i64| {
            let envelope = Envelope {
                version: ENVELOPE_VERSION,
                id: CommandId::new(),
                target: node("gpu-1"),
                issued_at_unix_ms: issued,
                expires_at_unix_ms: expires,
                key_id: key.key_id().to_owned(),
                payload: "noop".to_owned(),
            };
            key.sign_envelope(&envelope).unwrap()
        };
        for (issued, expires, now) in [
            (i64::MIN, i64::MAX, NOW),
            (1, i64::MIN, NOW),
            (i64::MAX, i64::MIN, NOW),
            (i64::MAX - 1_000, i64::MAX, NOW),
            (i64::MIN, i64::MIN + 1_000, NOW),
            (NOW, NOW + 1_000, i64::MAX),
            (NOW, NOW + 1_000, i64::MIN),
        ] {
            assert!(check(&pinned, &at(issued, expires), now).is_err(), "{issued}..{expires} at {now}");
        }
    }

    #[test]
    fn wrong_target_expired_future_and_long_lived_are_refused() {
        let key = CommandKey::generate();
        let pinned = key.public();
        let other = key.sign(CommandId::new(), &node("gpu-2"), "x".to_owned(), DEFAULT_TTL, NOW).unwrap();
        assert!(matches!(check(&pinned, &other, NOW), Err(Refusal::WrongTarget { .. })));
        let s = signed(&key);
        let skew = CLOCK_SKEW.as_millis() as i64;
        let ttl = DEFAULT_TTL.as_millis() as i64;
        assert!(check(&pinned, &s, NOW + ttl + skew).is_ok(), "inside the skew allowance");
        assert!(matches!(check(&pinned, &s, NOW + ttl + skew + 1), Err(Refusal::Expired { .. })));
        assert!(matches!(check(&pinned, &s, NOW - skew - 1), Err(Refusal::IssuedInFuture { .. })));
        let long = Envelope {
            version: ENVELOPE_VERSION,
            id: CommandId::new(),
            target: node("gpu-1"),
            issued_at_unix_ms: NOW,
            expires_at_unix_ms: NOW + 3_600_000,
            key_id: key.key_id().to_owned(),
            payload: "x".to_owned(),
        };
        let s = key.sign_envelope(&long).unwrap();
        assert!(matches!(check(&pinned, &s, NOW), Err(Refusal::TtlTooLong { .. })));
        assert!(key.sign(CommandId::new(), &node("gpu-1"), 1u8, Duration::from_secs(61), NOW).is_err());
    }

    #[test]
    fn older_versions_and_replays_are_refused() {
        let key = CommandKey::generate();
        let old = Envelope {
            version: 0,
            id: CommandId::new(),
            target: node("gpu-1"),
            issued_at_unix_ms: NOW,
            expires_at_unix_ms: NOW + 1000,
            key_id: key.key_id().to_owned(),
            payload: "x".to_owned(),
        };
        let s = key.sign_envelope(&old).unwrap();
        assert_eq!(
            check(&key.public(), &s, NOW),
            Err(Refusal::UnsupportedVersion { found: 0, supported: ENVELOPE_VERSION })
        );
        let s = signed(&key);
        let r: Result<Envelope<String>, _> = key.public().verify(&s, &node("gpu-1"), NOW, |_| true);
        assert!(matches!(r, Err(Refusal::Replayed(_))));
    }

    #[test]
    fn a_signed_trailer_carries_the_trace_context_and_old_decoders_ignore_it() {
        let key = CommandKey::generate();
        let parent = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let trailer = Trailer::traced(Some(&parent));
        let s = key.sign_with(CommandId::new(), &node("gpu-1"), "noop".to_owned(), DEFAULT_TTL, NOW, &trailer).unwrap();
        let (e, got) = key.public().verify_with_trailer::<String>(&s, &node("gpu-1"), NOW, |_| false).unwrap();
        assert_eq!(e.payload, "noop");
        assert_eq!(got.trace_parent(), Some(parent));
        // What an agent built before the trailer does: decode the envelope, ignore the rest.
        let old: Envelope<String> = postcard::from_bytes(&s.bytes[2..]).unwrap();
        assert_eq!(old, e);
        // The trailer is signed like the rest.
        let mut bad = s.clone();
        let last = bad.bytes.len() - 1;
        bad.bytes[last] ^= 1;
        assert_eq!(check(&key.public(), &bad, NOW), Err(Refusal::BadSignature));
        // No trailer: the same bytes as before it existed.
        let plain =
            key.sign_with(CommandId::new(), &node("gpu-1"), 1u8, DEFAULT_TTL, NOW, &Trailer::default()).unwrap();
        let (_, none) = key.public().verify_with_trailer::<u8>(&plain, &node("gpu-1"), NOW, |_| false).unwrap();
        assert_eq!(none, Trailer::default());
    }

    #[test]
    fn a_malformed_trailer_or_traceparent_is_ignored_not_refused() {
        let key = CommandKey::generate();
        let envelope = Envelope {
            version: ENVELOPE_VERSION,
            id: CommandId::new(),
            target: node("gpu-1"),
            issued_at_unix_ms: NOW,
            expires_at_unix_ms: NOW + 1000,
            key_id: key.key_id().to_owned(),
            payload: "noop".to_owned(),
        };
        // A signed trailer of garbage bytes.
        let mut bytes = key.sign_envelope(&envelope).unwrap().bytes;
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let signature = ed25519_dalek::Signer::sign(&key.signing, &bytes).to_bytes().to_vec();
        let garbage = SignedEnvelope { bytes, signature };
        let (e, trailer) =
            key.public().verify_with_trailer::<String>(&garbage, &node("gpu-1"), NOW, |_| false).unwrap();
        assert_eq!(e.payload, "noop");
        assert_eq!(trailer, Trailer::default());
        // A well-formed trailer whose traceparent is not one.
        let odd = Trailer { traceparent: Some("00-not-a-trace-01".into()) };
        let s = key.sign_envelope_with(&envelope, &odd).unwrap();
        let (_, trailer) = key.public().verify_with_trailer::<String>(&s, &node("gpu-1"), NOW, |_| false).unwrap();
        assert_eq!(trailer.trace_parent(), None);
    }

    #[test]
    fn keys_round_trip_through_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("command.key");
        let a = CommandKey::load_or_create(&path).unwrap();
        let b = CommandKey::load_or_create(&path).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        let public = dir.path().join("command.pub");
        a.public().write(&public).unwrap();
        let pinned = PinnedKey::load(&public).unwrap();
        assert_eq!(pinned, a.public());
        assert!(check(&pinned, &signed(&b), NOW).is_ok());
        assert!(PinnedKey::load(&path).is_err(), "a private key is not a public key");
    }

    #[test]
    fn ids_are_time_ordered_and_print_as_uuids() {
        let a = CommandId::new();
        let b = CommandId::new();
        assert!(a <= b);
        assert_eq!(a.to_string().parse::<CommandId>().unwrap(), a);
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// Cost of verifying one envelope (signature + decode + checks); run with
    /// `cargo test -p flotilla-common --release envelope::bench -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn verify_cost() {
        let key = CommandKey::generate();
        let pinned = key.public();
        let me = NodeId::new("gpu-1").unwrap();
        let now = crate::time::now_unix_ms();
        let signed: Vec<SignedEnvelope> =
            (0..2000).map(|_| key.sign(CommandId::new(), &me, "noop".to_owned(), DEFAULT_TTL, now).unwrap()).collect();
        let start = std::time::Instant::now();
        for s in &signed {
            let e: Envelope<String> = pinned.verify(s, &me, now, |_| false).unwrap();
            assert_eq!(e.payload, "noop");
        }
        let per = start.elapsed() / signed.len() as u32;
        println!("verify: {per:?} per envelope ({} envelopes)", signed.len());
        let start = std::time::Instant::now();
        for _ in 0..2000 {
            let _ = key.sign(CommandId::new(), &me, "noop".to_owned(), DEFAULT_TTL, now).unwrap();
        }
        println!("sign: {:?} per envelope", start.elapsed() / 2000);
    }
}

//! A signed command envelope as an agent receives it (`SignedCommand`). The
//! first byte picks how the rest is read:
//! - even: the rest is envelope bytes, signed here with the pinned key, so that
//!   everything after the signature check (version, postcard, target, clock,
//!   then the payload's own checks) sees arbitrary bytes;
//! - odd: the rest is a 64-byte signature and the envelope bytes, verified as
//!   shipped (tampered and forged envelopes).
//!
//! Either way the agent also reads the id of an envelope it refuses, without
//! trusting it, to name the refusal: that read is unauthenticated input too.
//! Bytes after the envelope are read as its signed trailer and the trace
//! context in it parsed, as the agent does.

use std::sync::OnceLock;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::{Signer, SigningKey};
use flotilla_common::NodeId;
use flotilla_common::command::Command;
use flotilla_common::envelope::{CommandKey, Envelope, PinnedKey, SignedEnvelope};
use flotilla_common::model::GpuInfo;

/// The clock the agent reads while verifying (the seeds are signed at it).
pub const NOW_UNIX_MS: i64 = 1_800_000_000_000;
/// The node the agent is; the seeds target it.
pub const NODE: &str = "gpu-01";
/// The controller key of the harness, a fixed one so that the checked-in seeds
/// carry its key id. Test material only.
const SEED: [u8; 32] = *b"flotilla-fuzz-command-key-seed!!";

/// The signing side (the controller) and the pinned side (the agent).
pub struct Keys {
    pub controller: CommandKey,
    pub signing: SigningKey,
    pub pinned: PinnedKey,
    pub me: NodeId,
}

/// The harness keys, made once.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signing = SigningKey::from_bytes(&SEED);
        // CommandKey is loaded from PKCS#8 PEM, as the controller does.
        let pem = signing.to_pkcs8_pem(LineEnding::LF).expect("a fixed key encodes");
        let dir = tempfile::tempdir().expect("a temp dir for the harness key");
        let path = dir.path().join("command-signing.key");
        std::fs::write(&path, pem.as_bytes()).expect("write the harness key");
        let controller = CommandKey::load(&path).expect("the harness key loads");
        let pinned = controller.public();
        Keys { controller, signing, pinned, me: NodeId::new(NODE).expect("a valid node id") }
    })
}

/// The GPUs of the agent a `Deploy` is checked against.
fn gpus() -> Vec<GpuInfo> {
    (0..4)
        .map(|index| GpuInfo {
            index,
            uuid: format!("GPU-{index:08x}"),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 80 << 30,
        })
        .collect()
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let keys = keys();
    let signed = if mode % 2 == 0 {
        SignedEnvelope { bytes: rest.to_vec(), signature: keys.signing.sign(rest).to_bytes().to_vec() }
    } else {
        let (signature, bytes) = rest.split_at(rest.len().min(64));
        SignedEnvelope { bytes: bytes.to_vec(), signature: signature.to_vec() }
    };
    // The id of a refused envelope, read without trusting it (`executor::untrusted_id`).
    let _ = signed.bytes.get(2..).map(postcard::from_bytes::<Envelope<Command>>);
    // With the signed trailer after the envelope (the trace context), as the agent reads it.
    let Ok((envelope, trailer)) = keys.pinned.verify_with_trailer::<Command>(&signed, &keys.me, NOW_UNIX_MS, |_| false)
    else {
        return;
    };
    let _ = trailer.trace_parent();
    if mode % 2 == 1 {
        // Ed25519 signatures are deterministic: an accepted one must be the one
        // the key makes, or a forgery (or a malleated copy) got through.
        assert_eq!(
            signed.signature,
            keys.signing.sign(&signed.bytes).to_bytes().to_vec(),
            "verify accepted a signature the key did not make"
        );
    }
    match envelope.payload {
        Command::Deploy { spec_yaml } => {
            if let Ok(spec) = flotilla_agent::runtime::ContainerSpec::from_yaml(&spec_yaml) {
                let _ = spec.validate(&gpus());
            }
        }
        Command::GatewaySet(weights) => {
            let _ = weights.validate();
        }
        _ => {}
    }
}

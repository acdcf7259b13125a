//! The container spec as callers write it (YAML), and [`ValidatedSpec`], the checked
//! form the runtime accepts.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;

use flotilla_common::model::GpuInfo;
use serde::{Deserialize, Serialize};

use super::error::SpecError;

/// One model-server container: what to run, how to reach it, what it may use.
/// See the module documentation for a YAML example.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// The deployment this container serves (`[a-z0-9-]`, like a DNS label).
    pub name: String,
    /// The deployment's revision; with `name` it names the container `NAME-REVISION`.
    pub revision: String,
    /// The image reference; it must already be present on the host.
    pub image: String,
    /// Replaces the image's entrypoint when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's default arguments (CMD) when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// Host directories mounted into the container, read-only unless said otherwise.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// GPUs handed to the container (NVIDIA container toolkit), by index or UUID.
    #[serde(default)]
    pub gpus: Vec<GpuRef>,
    /// Size of `/dev/shm` (tensor-parallel workers share memory through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<ByteSize>,
    /// What the engine does when the container exits.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How the engine decides the container is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Extra labels; the `flotilla.` prefix is the agent's own.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The model server's HTTP port: while the container runs, the agent scrapes
    /// it (`/metrics`, `/v1/models`, `/health`) like an `[[inference]]` endpoint
    /// named after the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceServer>,
}

impl ContainerSpec {
    /// Parses a spec from YAML; unknown fields are refused with their path and line.
    pub fn from_yaml(text: &str) -> Result<Self, SpecError> {
        serde_yaml_ng::from_str(text).map_err(SpecError::Parse)
    }

    /// The container name this spec runs under: `NAME-REVISION`, as the agent speaks
    /// of it; the engine's name has `[runtime] name_prefix` before it.
    pub fn container_name(&self) -> String {
        format!("{}-{}", self.name, self.revision)
    }

    /// Checks everything parsing cannot, against the GPUs of this host, and returns
    /// the spec in the form [`super::Runtime::deploy`] accepts.
    pub fn validate(self, gpus: &[GpuInfo]) -> Result<ValidatedSpec, SpecError> {
        super::validate::check(&self, gpus)?;
        Ok(ValidatedSpec { spec: self })
    }
}

/// A spec that passed [`ContainerSpec::validate`]; read it through `Deref`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedSpec {
    spec: ContainerSpec,
}

impl ValidatedSpec {
    /// The spec itself.
    pub fn into_inner(self) -> ContainerSpec {
        self.spec
    }

    /// A fingerprint of the whole spec (FNV-1a 64 over its canonical JSON), stored
    /// as a label so a second deploy of the same revision can tell whether the spec
    /// changed under it.
    pub fn spec_hash(&self) -> String {
        // BTreeMaps and fixed field order make the JSON canonical; serialising plain
        // data cannot fail, and an empty fallback would only make hashes disagree.
        let json = serde_json::to_vec(&self.spec).unwrap_or_default();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in json {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

impl std::ops::Deref for ValidatedSpec {
    type Target = ContainerSpec;

    fn deref(&self) -> &ContainerSpec {
        &self.spec
    }
}

/// Where a container's model server answers, for the agent's inference collector:
/// `inference: { port: 8000, engine: vllm }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceServer {
    /// The container port the server listens on; one of the spec's published
    /// `ports` (TCP), since the agent reaches it through the host port.
    pub port: u32,
    /// The engine; detected from the `/metrics` page when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::inference::Engine>,
}

/// A published port. Ports are `u32` here so that an out-of-range number is
/// refused by `validate` with the field's name rather than by the parser.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// The port the server listens on inside the container.
    pub container: u32,
    /// The host port; when absent the engine picks a free one (see [`super::ContainerInfo::ports`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<u32>,
    /// The host address to bind; loopback unless said otherwise, so a model server
    /// is not exposed beyond the node by accident.
    #[serde(default = "loopback")]
    pub host_ip: IpAddr,
    /// The transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

fn loopback() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// A port's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// The name the engine uses (`8000/tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host directory bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// Absolute path on the host.
    pub host: PathBuf,
    /// Absolute path inside the container.
    pub container: PathBuf,
    /// Model weights are read, never written: read-only unless set to `false`.
    #[serde(default = "yes")]
    pub read_only: bool,
}

fn yes() -> bool {
    true
}

/// A GPU by index (`0`) or by UUID (`"GPU-…"`); indices can change across reboots
/// and driver updates, UUIDs cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRef {
    Index(u32),
    Uuid(String),
}

impl GpuRef {
    /// The device id handed to the NVIDIA container toolkit.
    pub fn device_id(&self) -> String {
        match self {
            GpuRef::Index(i) => i.to_string(),
            GpuRef::Uuid(u) => u.clone(),
        }
    }
}

impl fmt::Display for GpuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRef::Index(i) => write!(f, "index {i}"),
            GpuRef::Uuid(u) => write!(f, "{u}"),
        }
    }
}

impl Serialize for GpuRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GpuRef::Index(i) => s.serialize_u32(*i),
            GpuRef::Uuid(u) => s.serialize_str(u),
        }
    }
}

impl<'de> Deserialize<'de> for GpuRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = GpuRef;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GPU index (0, 1, …) or UUID (\"GPU-…\")")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<GpuRef, E> {
                u32::try_from(v).map(GpuRef::Index).map_err(|_| E::custom(format!("GPU index {v} is too large")))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<GpuRef, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("GPU index {v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<GpuRef, E> {
                // A quoted number is still an index: YAML writers quote freely.
                match v.parse::<u32>() {
                    Ok(i) => Ok(GpuRef::Index(i)),
                    Err(_) => Ok(GpuRef::Uuid(v.to_owned())),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A size in bytes, written as a number of bytes or with a unit (`512m`, `16GiB`).
/// As with Docker's `--shm-size`, every unit is a power of 1024 however it is
/// spelled (`16GB` is 16 GiB), so a value copied from a compose file means the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (e.g. 16GiB, 512m, 1048576)"))?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "ki" | "kib" => 1 << 10,
            "m" | "mb" | "mi" | "mib" => 1 << 20,
            "g" | "gb" | "gi" | "gib" => 1 << 30,
            "t" | "tb" | "ti" | "tib" => 1 << 40,
            other => return Err(format!("{s:?}: unknown unit {other:?} (use k, m, g, t or KiB, MiB, GiB, TiB)")),
        };
        n.checked_mul(factor).map(ByteSize).ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes or with a unit (16GiB, 512m)")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom(format!("size {v} is negative")))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// What the engine does when the container exits, written as Docker's `--restart`:
/// `no`, `always`, `unless-stopped`, `on-failure` or `on-failure:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum RestartPolicy {
    /// Never restart; the agent decides (the default).
    #[default]
    No,
    Always,
    UnlessStopped,
    /// Restart after a non-zero exit, at most `max_retries` times when given.
    OnFailure {
        max_retries: Option<u32>,
    },
}

impl TryFrom<String> for RestartPolicy {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "no" => Ok(Self::No),
            "always" => Ok(Self::Always),
            "unless-stopped" => Ok(Self::UnlessStopped),
            "on-failure" => Ok(Self::OnFailure { max_retries: None }),
            other => match other.strip_prefix("on-failure:").map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(Self::OnFailure { max_retries: Some(n) }),
                _ => Err(format!(
                    "restart policy {other:?}: expected no, always, unless-stopped, on-failure or on-failure:N"
                )),
            },
        }
    }
}

impl From<RestartPolicy> for String {
    fn from(p: RestartPolicy) -> String {
        match p {
            RestartPolicy::No => "no".to_owned(),
            RestartPolicy::Always => "always".to_owned(),
            RestartPolicy::UnlessStopped => "unless-stopped".to_owned(),
            RestartPolicy::OnFailure { max_retries: None } => "on-failure".to_owned(),
            RestartPolicy::OnFailure { max_retries: Some(n) } => format!("on-failure:{n}"),
        }
    }
}

pub use flotilla_common::health::{HealthCheck, HttpProbe};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_docker_units() {
        assert_eq!("16g".parse::<ByteSize>().unwrap(), ByteSize(16 << 30));
        assert_eq!("16GiB".parse::<ByteSize>().unwrap(), ByteSize(16 << 30));
        assert_eq!("2GB".parse::<ByteSize>().unwrap(), ByteSize(2 << 30));
        assert_eq!("512".parse::<ByteSize>().unwrap(), ByteSize(512));
        assert!("12 parsecs".parse::<ByteSize>().unwrap_err().contains("unknown unit"));
        assert!("huge".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().unwrap_err().contains("too large"));
    }

    #[test]
    fn restart_policies_round_trip() {
        for s in ["no", "always", "unless-stopped", "on-failure", "on-failure:3"] {
            let p = RestartPolicy::try_from(s.to_owned()).unwrap();
            assert_eq!(String::from(p), s);
        }
        assert!(RestartPolicy::try_from("sometimes".to_owned()).is_err());
        assert!(RestartPolicy::try_from("on-failure:x".to_owned()).is_err());
    }

    #[test]
    fn yaml_fills_defaults() {
        let spec = ContainerSpec::from_yaml(
            "name: m\nrevision: '1'\nimage: busybox\nports: [{container: 8000}]\nvolumes: [{host: /a, container: /b}]\ngpus: [0, '1', GPU-abc]\nshm_size: 1g\nhealth: {http: {port: 8000}}\n",
        )
        .unwrap();
        assert_eq!(spec.ports[0].host_ip, loopback());
        assert_eq!(spec.ports[0].protocol, Protocol::Tcp);
        assert!(spec.volumes[0].read_only);
        assert_eq!(spec.gpus, vec![GpuRef::Index(0), GpuRef::Index(1), GpuRef::Uuid("GPU-abc".into())]);
        assert_eq!(spec.shm_size, Some(ByteSize(1 << 30)));
        let health = spec.health.as_ref().unwrap();
        assert_eq!((health.interval, health.retries), (std::time::Duration::from_secs(10), 3));
        assert_eq!(health.http.as_ref().unwrap().path, "/health");
        assert_eq!(spec.restart, RestartPolicy::No);
        assert_eq!(spec.container_name(), "m-1");
    }

    #[test]
    fn unknown_fields_are_named_with_their_place() {
        let err = ContainerSpec::from_yaml(
            "name: m\nrevision: '1'\nimage: busybox\nports:\n  - {container: 8000, hostport: 1}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("hostport") && err.contains("ports[0]") && err.contains("line 5"), "{err}");
    }

    #[test]
    fn the_hash_follows_the_spec() {
        let a = ContainerSpec::from_yaml("name: m\nrevision: '1'\nimage: busybox\n").unwrap().validate(&[]).unwrap();
        let b = ContainerSpec::from_yaml("name: m\nrevision: '1'\nimage: busybox\nenv: {A: b}\n")
            .unwrap()
            .validate(&[])
            .unwrap();
        assert_eq!(a.spec_hash(), a.clone().spec_hash());
        assert_ne!(a.spec_hash(), b.spec_hash());
    }
}

//! The checks `ContainerSpec::validate` runs: everything the parser cannot know,
//! including whether the requested GPUs exist on this host. Pure: no I/O, so a
//! refused spec has touched nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Component, Path};

use flotilla_common::model::GpuInfo;

use super::error::SpecError;
use super::render::LABEL_PREFIX;
use super::spec::{ContainerSpec, GpuRef, HealthCheck, PortMapping, Protocol};

/// The longest deployment name or revision: container names stay readable and
/// fit a DNS label should a gateway ever use them as host names.
const MAX_NAME: usize = 63;

pub(crate) fn check(spec: &ContainerSpec, gpus: &[GpuInfo]) -> Result<(), SpecError> {
    check_names(spec)?;
    if let Some(reason) = flotilla_common::command::image_ref::check(&spec.image) {
        return Err(if spec.image.is_empty() {
            SpecError::Empty { field: "image".into() }
        } else {
            SpecError::BadImage { image: spec.image.clone(), reason }
        });
    }
    if let Some(command) = &spec.command {
        match command.first() {
            None => return Err(SpecError::Empty { field: "command".into() }),
            Some(program) if program.is_empty() => return Err(SpecError::Empty { field: "command[0]".into() }),
            Some(_) => {}
        }
    }
    check_env(spec)?;
    check_ports(&spec.ports)?;
    if let Some(server) = &spec.inference {
        port_in_range("inference.port".to_owned(), server.port)?;
        let published = spec.ports.iter().any(|p| p.container == server.port && p.protocol == Protocol::Tcp);
        if !published {
            return Err(SpecError::InferencePortNotPublished { port: server.port });
        }
    }
    check_volumes(spec)?;
    check_gpus(&spec.gpus, gpus)?;
    if spec.shm_size.is_some_and(|s| s.as_u64() == 0) {
        return Err(SpecError::ZeroShmSize);
    }
    if let Some(health) = &spec.health {
        check_health(health)?;
    }
    for key in spec.labels.keys() {
        if key.is_empty() {
            return Err(SpecError::Empty { field: "labels (a key)".into() });
        }
        if key.starts_with(LABEL_PREFIX) {
            return Err(SpecError::ReservedLabel { key: key.clone() });
        }
    }
    Ok(())
}

fn check_names(spec: &ContainerSpec) -> Result<(), SpecError> {
    let bad = |field: &str, value: &str, reason| {
        Err(SpecError::BadName { field: field.to_owned(), value: value.to_owned(), reason })
    };
    let name = &spec.name;
    if name.is_empty() {
        return Err(SpecError::Empty { field: "name".into() });
    }
    if name.len() > MAX_NAME {
        return bad("name", name, "is longer than 63 characters");
    }
    let dns = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !name.chars().all(|c| dns(c) || c == '-') || !name.starts_with(dns) || !name.ends_with(dns) {
        return bad(
            "name",
            name,
            "must be lower-case letters, digits and '-', starting and ending with a letter or digit",
        );
    }
    let revision = &spec.revision;
    if revision.is_empty() {
        return Err(SpecError::Empty { field: "revision".into() });
    }
    if revision.len() > MAX_NAME {
        return bad("revision", revision, "is longer than 63 characters");
    }
    // The engine's container-name alphabet, since the revision ends the name.
    let ok = revision.starts_with(|c: char| c.is_ascii_alphanumeric())
        && revision.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return bad("revision", revision, "must be letters, digits, '_', '.' and '-', starting with a letter or digit");
    }
    Ok(())
}

fn check_env(spec: &ContainerSpec) -> Result<(), SpecError> {
    for (key, value) in &spec.env {
        let reason = if key.is_empty() {
            "is empty"
        } else if key.contains('=') {
            "contains '=' (the engine passes KEY=VALUE)"
        } else if key.contains('\0') || value.contains('\0') {
            "contains a NUL byte"
        } else {
            continue;
        };
        return Err(SpecError::BadEnv { key: key.clone(), reason });
    }
    Ok(())
}

fn port_in_range(field: String, value: u32) -> Result<(), SpecError> {
    if (1..=65535).contains(&value) { Ok(()) } else { Err(SpecError::PortOutOfRange { field, value }) }
}

fn check_ports(ports: &[PortMapping]) -> Result<(), SpecError> {
    let mut taken: Vec<(usize, IpAddr, u32, &'static str)> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        port_in_range(format!("ports[{i}].container"), p.container)?;
        let Some(host) = p.host else { continue };
        port_in_range(format!("ports[{i}].host"), host)?;
        // An unspecified address (0.0.0.0, ::) binds every address, so it clashes
        // with any other binding of the same port.
        let overlaps = |ip: &IpAddr| *ip == p.host_ip || ip.is_unspecified() || p.host_ip.is_unspecified();
        if let Some((j, ..)) =
            taken.iter().find(|(_, ip, port, proto)| *port == host && *proto == p.protocol.as_str() && overlaps(ip))
        {
            return Err(SpecError::PortClash {
                field: format!("ports[{i}].host"),
                other: format!("ports[{j}]"),
                host_ip: p.host_ip,
                port: host,
                protocol: p.protocol.as_str(),
            });
        }
        taken.push((i, p.host_ip, host, p.protocol.as_str()));
    }
    Ok(())
}

fn check_path(field: String, path: &Path) -> Result<(), SpecError> {
    let text = path.display().to_string();
    let reason = if text.is_empty() {
        return Err(SpecError::Empty { field });
    } else if !path.is_absolute() {
        "must be an absolute path"
    } else if path.components().any(|c| c == Component::ParentDir) {
        "must not contain '..'"
    } else {
        return Ok(());
    };
    Err(SpecError::BadPath { field, path: text, reason })
}

fn check_volumes(spec: &ContainerSpec) -> Result<(), SpecError> {
    let mut seen: HashMap<&Path, usize> = HashMap::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        check_path(format!("volumes[{i}].host"), &v.host)?;
        check_path(format!("volumes[{i}].container"), &v.container)?;
        if v.container == Path::new("/") {
            return Err(SpecError::BadPath {
                field: format!("volumes[{i}].container"),
                path: "/".into(),
                reason: "would hide the image's whole filesystem",
            });
        }
        if let Some(j) = seen.insert(&v.container, i) {
            return Err(SpecError::DuplicateMount {
                field: format!("volumes[{i}].container"),
                other: format!("volumes[{j}]"),
                path: v.container.display().to_string(),
            });
        }
    }
    Ok(())
}

fn check_gpus(wanted: &[GpuRef], host: &[GpuInfo]) -> Result<(), SpecError> {
    let available = || {
        if host.is_empty() {
            "this host has no GPUs".to_owned()
        } else {
            let list: Vec<String> = host.iter().map(|g| format!("{} ({})", g.index, g.uuid)).collect();
            format!("it has {}", list.join(", "))
        }
    };
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (i, gpu) in wanted.iter().enumerate() {
        let field = format!("gpus[{i}]");
        let found = host.iter().find(|g| match gpu {
            GpuRef::Index(index) => g.index == *index,
            GpuRef::Uuid(uuid) => g.uuid == *uuid,
        });
        let Some(found) = found else {
            return Err(SpecError::GpuNotFound { field, gpu: gpu.to_string(), available: available() });
        };
        // Compare resolved GPUs, so index 0 and GPU 0's UUID count as one.
        if let Some(j) = seen.insert(found.index, i) {
            return Err(SpecError::DuplicateGpu { field, other: format!("gpus[{j}]"), gpu: gpu.to_string() });
        }
    }
    Ok(())
}

fn check_health(h: &HealthCheck) -> Result<(), SpecError> {
    h.check().map_err(|reason| SpecError::BadHealthCheck { reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus() -> Vec<GpuInfo> {
        (0..2)
            .map(|i| GpuInfo {
                index: i,
                uuid: format!("GPU-{i:08}"),
                model: "H100".into(),
                memory_total_bytes: 80 << 30,
            })
            .collect()
    }

    fn refuse(extra: &str) -> String {
        let yaml = format!("name: llama\nrevision: '1'\nimage: vllm/vllm-openai:v1\n{extra}");
        // Some refusals come from the parser, the rest from validate: callers see both.
        ContainerSpec::from_yaml(&yaml).and_then(|spec| spec.validate(&gpus())).unwrap_err().to_string()
    }

    fn assert_refused(extra: &str, want: &[&str]) {
        let err = refuse(extra);
        for w in want {
            assert!(err.contains(w), "{extra:?}: {err:?} lacks {w:?}");
        }
    }

    #[test]
    fn a_full_spec_passes() {
        let yaml = r#"
name: llama-8b
revision: "7"
image: vllm/vllm-openai:v0.8.5
command: [python3, -m, vllm.entrypoints.openai.api_server]
args: [--port, "8000"]
env: {HF_HUB_OFFLINE: "1"}
ports:
  - {container: 8000, host: 18000}
  - {container: 8000, host: 18000, host_ip: 10.0.0.1}
  - {container: 9000, host: 18000, protocol: udp}
volumes: [{host: /srv/models, container: /models}]
gpus: [0, GPU-00000001]
shm_size: 16GiB
restart: on-failure:3
health: {http: {port: 8000, path: /health}, interval: 5s, start_period: 10m}
labels: {team: search}
"#;
        let spec = ContainerSpec::from_yaml(yaml).unwrap().validate(&gpus()).unwrap();
        assert_eq!(spec.container_name(), "llama-8b-7");
    }

    #[test]
    fn names_are_checked() {
        let err = ContainerSpec::from_yaml("name: ''\nrevision: '1'\nimage: x\n").unwrap().validate(&[]).unwrap_err();
        assert!(matches!(err, SpecError::Empty { ref field } if field == "name"), "{err}");
        let err =
            ContainerSpec::from_yaml("name: Llama\nrevision: '1'\nimage: x\n").unwrap().validate(&[]).unwrap_err();
        assert!(matches!(err, SpecError::BadName { .. }) && err.to_string().starts_with("name:"), "{err}");
        let err = ContainerSpec::from_yaml("name: a\nrevision: 'v 1'\nimage: x\n").unwrap().validate(&[]).unwrap_err();
        assert!(err.to_string().starts_with("revision:"), "{err}");
        let err = ContainerSpec::from_yaml("name: a\nrevision: ''\nimage: x\n").unwrap().validate(&[]).unwrap_err();
        assert!(matches!(err, SpecError::Empty { ref field } if field == "revision"), "{err}");
    }

    #[test]
    fn images_are_checked() {
        let err = ContainerSpec::from_yaml("name: a\nrevision: '1'\nimage: 'vllm/OpenAI:x'\n")
            .unwrap()
            .validate(&[])
            .unwrap_err();
        assert!(matches!(err, SpecError::BadImage { .. }) && err.to_string().contains("lower case"), "{err}");
        let err = ContainerSpec::from_yaml("name: a\nrevision: '1'\nimage: ''\n").unwrap().validate(&[]).unwrap_err();
        assert!(matches!(err, SpecError::Empty { ref field } if field == "image"), "{err}");
    }

    #[test]
    fn ports_are_checked() {
        assert_refused("ports: [{container: 70000}]", &["ports[0].container", "70000", "outside"]);
        assert_refused("ports: [{container: 0}]", &["ports[0].container"]);
        assert_refused("ports: [{container: 80, host: 65536}]", &["ports[0].host", "65536"]);
        assert_refused(
            "ports: [{container: 80, host: 8080}, {container: 81, host: 8080}]",
            &["ports[1].host", "127.0.0.1:8080/tcp", "ports[0]"],
        );
        assert_refused(
            "ports: [{container: 80, host: 8080, host_ip: 0.0.0.0}, {container: 81, host: 8080}]",
            &["ports[1].host", "already mapped by ports[0]"],
        );
        assert_refused("ports: [{container: 80, host_ip: nowhere}]", &["ports[0].host_ip"]);
    }

    #[test]
    fn the_inference_port_must_be_published_over_tcp() {
        assert_refused("inference: {port: 8000}", &["inference.port", "8000", "not published", "ports"]);
        assert_refused(
            "ports: [{container: 8000, protocol: udp}]\ninference: {port: 8000}",
            &["inference.port", "not published"],
        );
        assert_refused("ports: [{container: 8000}]\ninference: {port: 0}", &["inference.port", "outside"]);
        assert_refused("ports: [{container: 8000}]\ninference: {port: 8000, engine: triton}", &["inference.engine"]);
        assert_refused("ports: [{container: 8000}]\ninference: {port: 8000, path: /x}", &["inference", "path"]);
        let yaml =
            "name: a\nrevision: '1'\nimage: x\nports: [{container: 8000}]\ninference: {port: 8000, engine: sglang}\n";
        let spec = ContainerSpec::from_yaml(yaml).unwrap().validate(&[]).unwrap();
        assert_eq!(spec.inference.unwrap().engine, Some(crate::inference::Engine::Sglang));
    }

    #[test]
    fn volumes_are_checked() {
        assert_refused("volumes: [{host: models, container: /m}]", &["volumes[0].host", "absolute"]);
        assert_refused("volumes: [{host: /m, container: /a/../etc}]", &["volumes[0].container", ".."]);
        assert_refused("volumes: [{host: /m, container: /}]", &["volumes[0].container"]);
        assert_refused(
            "volumes: [{host: /a, container: /m}, {host: /b, container: /m}]",
            &["volumes[1].container", "volumes[0]"],
        );
    }

    #[test]
    fn gpus_must_exist_on_this_host() {
        assert_refused("gpus: [2]", &["gpus[0]", "index 2", "does not exist", "0 (GPU-00000000)"]);
        assert_refused("gpus: [GPU-ffffffff]", &["gpus[0]", "GPU-ffffffff"]);
        assert_refused("gpus: [1, GPU-00000001]", &["gpus[1]", "already requested by gpus[0]"]);
        let spec = ContainerSpec::from_yaml("name: a\nrevision: '1'\nimage: x\ngpus: [0]\n").unwrap();
        let err = spec.validate(&[]).unwrap_err().to_string();
        assert!(err.contains("this host has no GPUs"), "{err}");
    }

    #[test]
    fn the_rest_is_checked() {
        assert_refused("env: {'A=B': x}", &["env", "'='"]);
        assert_refused("labels: {flotilla.managed: 'false'}", &["labels", "reserved"]);
        assert_refused("shm_size: 0", &["shm_size"]);
        assert_refused("command: []", &["command", "empty"]);
        assert_refused("health: {}", &["health", "exactly one", "found 0"]);
        assert_refused("health: {shell: x, command: [y]}", &["found 2"]);
        assert_refused("health: {http: {port: 8000, path: '/h; rm -rf /'}}", &["http.path"]);
        assert_refused("health: {shell: x, interval: 0s}", &["interval"]);
        assert_refused("health: {shell: x, retries: 0}", &["retries"]);
        assert_refused("restart: sometimes", &["restart", "sometimes"]);
        assert_refused("bogus: 1", &["unknown field", "bogus"]);
    }
}

//! The seed corpus of each target and the hostile inputs the smoke run adds.
//!
//! A target's corpus is its checked-in directory `seeds/TARGET/` plus files the
//! repository already keeps for other reasons (the default rules, the example
//! deployments, the real `/metrics` pages), read in place so nothing is copied.
//! The binary seeds (protobuf messages, signed envelopes) are made by
//! [`generated`]; `cargo test -p flotilla-fuzz -- --ignored write_seeds` writes
//! them out again after a wire change.
//!
//! [`hostile`] makes large inputs that are cheaper to build than to check in:
//! deep nesting, huge fields, alias bombs. The smoke run feeds them on a thread
//! with tokio's default stack size (2 MiB), where the controller parses them.

use std::path::{Path, PathBuf};

use flotilla_common::NodeId;
use flotilla_common::command::{Command, GatewayWeights};
use flotilla_common::envelope::{CommandId, ENVELOPE_VERSION, Envelope};
use flotilla_proto::pb;
use flotilla_proto::pb::agent_message::Body;
use prost::Message;

use crate::targets::command_envelope::{NODE, NOW_UNIX_MS, keys};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Every directory whose files seed `target`, the checked-in seeds first.
pub fn corpus_dirs(target: &str) -> Vec<PathBuf> {
    let mut dirs = vec![crate::seed_dir(target)];
    match target {
        "rules_file" => dirs.push(repo().join("deploy/rules")),
        "deployment_spec" => dirs.push(repo().join("deploy/examples")),
        "metrics_page" => dirs.push(repo().join("tests/fixtures/metrics")),
        "command_envelope" => {}
        _ => {}
    }
    dirs
}

/// The contents of every file in `target`'s corpus directories, in name order.
pub fn corpus(target: &str) -> std::io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    for dir in corpus_dirs(target) {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        files.sort();
        for file in files.into_iter().filter(|f| f.is_file()) {
            let data = std::fs::read(&file)?;
            out.push((file, data));
        }
    }
    Ok(out)
}

/// The binary seeds of `target`, by file name.
pub fn generated(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "agent_message" => agent_messages(),
        "command_envelope" => envelopes(),
        _ => Vec::new(),
    }
}

fn agent_messages() -> Vec<(String, Vec<u8>)> {
    let message = |body| pb::AgentMessage { body: Some(body) }.encode_to_vec();
    let container = pb::Container {
        name: "llama-8b-1".into(),
        id: "0123456789ab".into(),
        image: "vllm/vllm-openai:v0.8.5".into(),
        state: "running".into(),
        health: "healthy".into(),
        deployment: "llama-8b".into(),
        revision: "1".into(),
        created_unix_ms: NOW_UNIX_MS - 60_000,
    };
    let report =
        pb::ContainerReport { containers: vec![container], runtime_error: String::new(), listed_unix_ms: NOW_UNIX_MS };
    let hello = pb::Hello {
        protocol_version: flotilla_proto::PROTOCOL_VERSION,
        node_id: NODE.into(),
        inventory: Some(pb::Inventory {
            hostname: "gpu-01.example".into(),
            os: "Debian GNU/Linux 13".into(),
            kernel: "6.12.0".into(),
            cpu_model: "AMD EPYC 9654".into(),
            cpu_cores: 96,
            memory_total_bytes: 1 << 40,
            gpus: (0..2)
                .map(|index| pb::GpuInfo {
                    index,
                    uuid: format!("GPU-{index:08x}-0000-0000-0000-000000000000"),
                    model: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_bytes: 80 << 30,
                })
                .collect(),
            gpu_source_note: String::new(),
            driver_version: "570.86.15".into(),
            cuda_version: "12.8".into(),
            labels: [("pool".to_owned(), "a100".to_owned()), ("address".to_owned(), "10.0.0.1".to_owned())]
                .into_iter()
                .collect(),
            agent_version: "0.1.0".into(),
            gpu_source: "nvml".into(),
            containers: Some(report.clone()),
            gateway: Some(pb::GatewayInfo { nginx_version: "1.22.1".into() }),
        }),
        heartbeat_interval_ms: 1000,
    };
    let gpu = |index: u32| pb::GpuSample {
        index,
        uuid: format!("GPU-{index:08x}-0000-0000-0000-000000000000"),
        utilization_ratio: Some(0.75),
        memory_utilization_ratio: Some(0.5),
        memory_used_bytes: Some(40 << 30),
        memory_total_bytes: Some(80 << 30),
        temperature_celsius: Some(71.0),
        power_watts: Some(550.5),
        power_limit_watts: Some(700.0),
        sm_clock_mhz: Some(1980),
        memory_clock_mhz: Some(2619),
        memory_reserved_bytes: Some(1 << 28),
        memory_temperature_celsius: Some(80.0),
        energy_joules_total: Some(1.5e9),
        clock_event_reasons: Some(4),
        pcie_rx_bytes_per_second: Some(1.0e9),
        pcie_tx_bytes_per_second: Some(2.0e8),
        pcie_replay_total: Some(0),
        ecc_corrected_volatile_total: Some(1),
        ecc_uncorrected_volatile_total: Some(0),
        ecc_corrected_aggregate_total: Some(3),
        ecc_uncorrected_aggregate_total: Some(0),
        remapped_rows_correctable: Some(0),
        remapped_rows_uncorrectable: Some(0),
        remapped_rows_pending: Some(false),
        remapped_rows_failed: Some(false),
        retired_pages_single_bit: Some(0),
        retired_pages_double_bit: Some(0),
        xid_events: vec![pb::XidCount { code: 79, count: 1 }],
        processes: vec![pb::GpuProcess { pid: 4242, name: "python3".into(), used_memory_bytes: Some(39 << 30) }],
    };
    let batch = pb::TelemetryBatch {
        seq: 42,
        created_unix_ms: NOW_UNIX_MS,
        gpus: vec![gpu(0), gpu(1)],
        host: Some(pb::HostSample {
            cpu_utilization_ratio: 0.25,
            load1: 3.5,
            load5: 2.0,
            load15: 1.0,
            memory_total_bytes: 1 << 40,
            memory_available_bytes: 1 << 39,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
            filesystems: vec![pb::FilesystemSample {
                mount_point: "/srv/models".into(),
                device: "/dev/nvme0n1p1".into(),
                fs_type: "ext4".into(),
                size_bytes: 4 << 40,
                avail_bytes: 1 << 40,
            }],
            networks: vec![pb::NetworkSample {
                interface: "eth0".into(),
                receive_bytes_total: 1 << 33,
                transmit_bytes_total: 1 << 32,
            }],
        }),
        samples: vec![
            pb::Sample {
                name: "flotilla_inference_requests_running".into(),
                labels: [("endpoint".to_owned(), "llama".to_owned()), ("engine".to_owned(), "vllm".to_owned())]
                    .into_iter()
                    .collect(),
                value: 3.0,
            },
            pb::Sample {
                name: "flotilla_inference_time_to_first_token_seconds_bucket".into(),
                labels: [("endpoint".to_owned(), "llama".to_owned()), ("le".to_owned(), "+Inf".to_owned())]
                    .into_iter()
                    .collect(),
                value: f64::NAN,
            },
        ],
        collectors: vec![
            pb::CollectorStatus { name: "gpu".into(), healthy: true, error: String::new() },
            pb::CollectorStatus { name: "inference".into(), healthy: false, error: "connection refused".into() },
        ],
    };
    let result = pb::CommandResult {
        command_id: vec![7; 16],
        status: pb::CommandStatus::Succeeded as i32,
        detail: "done".into(),
        output_json: "{\"ok\":true}".into(),
    };
    vec![
        ("hello.pb".into(), message(Body::Hello(hello))),
        ("telemetry.pb".into(), message(Body::Telemetry(batch))),
        ("heartbeat.pb".into(), message(Body::Heartbeat(pb::Heartbeat { sent_unix_ms: NOW_UNIX_MS }))),
        ("containers.pb".into(), message(Body::Containers(report))),
        ("command-result.pb".into(), message(Body::CommandResult(result))),
    ]
}

fn envelopes() -> Vec<(String, Vec<u8>)> {
    let keys = keys();
    let me = NodeId::new(NODE).expect("a valid node id");
    let model_server = std::fs::read_to_string(repo().join("deploy/examples/model-server.yaml")).unwrap_or_default();
    let weights = GatewayWeights::parse("llama", "10.0.0.1:18000=90,10.0.0.2:18001=10").expect("valid weights");
    let commands = [
        ("noop", Command::Noop),
        (
            "prestart",
            Command::PrestartCheck {
                model_path: Some("/srv/models/llama".into()),
                min_free_bytes: 1 << 30,
                image: Some("vllm/vllm-openai:v0.8.5".into()),
            },
        ),
        ("diagnostics", Command::Diagnostics { log_lines: 200 }),
        ("inspect", Command::Inspect { container: "llama-8b-1".into() }),
        ("logs", Command::Logs { container: "llama-8b-1".into(), tail: 100 }),
        ("stop", Command::Stop { container: "llama-8b-1".into(), timeout_s: 30 }),
        ("restart", Command::Restart { container: "llama-8b-1".into(), timeout_s: 30 }),
        (
            "drain",
            Command::Drain {
                container: "llama-8b-1".into(),
                endpoint: "http://127.0.0.1:18000".into(),
                deadline_s: 600,
                timeout_s: 30,
            },
        ),
        ("deploy", Command::Deploy { spec_yaml: model_server }),
        ("gateway-set", Command::GatewaySet(weights)),
    ];
    let mut out = Vec::new();
    for (i, (name, payload)) in commands.into_iter().enumerate() {
        let envelope = Envelope {
            version: ENVELOPE_VERSION,
            id: CommandId::from_slice(&[i as u8 + 1; 16]).expect("16 bytes"),
            target: me.clone(),
            issued_at_unix_ms: NOW_UNIX_MS,
            expires_at_unix_ms: NOW_UNIX_MS + 30_000,
            key_id: keys.controller.key_id().to_owned(),
            payload,
        };
        let signed = keys.controller.sign_envelope(&envelope).expect("a seed envelope signs");
        out.push((format!("{name}.signed-here"), [&[0u8][..], &signed.bytes].concat()));
        out.push((format!("{name}.as-shipped"), [&[1u8][..], &signed.signature, &signed.bytes].concat()));
    }
    out
}

/// Large deterministic inputs for `target`, by name.
pub fn hostile(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "agent_message" => hostile_messages(),
        "promql_selector" => vec![
            ("nested-calls".into(), format!("{}x{}", "sum(".repeat(20_000), ")".repeat(20_000)).into_bytes()),
            ("operator-chain".into(), vec!["x"; 100_000].join("+").into_bytes()),
            ("nested-braces".into(), format!("{}x{}", "{".repeat(20_000), "}".repeat(20_000)).into_bytes()),
            ("huge-regex".into(), format!("x{{a=~\"{}\"}}", "(a|b)*".repeat(50_000)).into_bytes()),
        ],
        "command_envelope" => {
            let mut huge = vec![0u8];
            huge.resize(flotilla_common::envelope::MAX_ENVELOPE_BYTES + 2, 0x41);
            let mut cases = vec![("over-the-size-limit".into(), huge)];
            // Validity times at the ends of i64, signed: the checks do arithmetic on them.
            let keys = keys();
            let extremes = [
                (i64::MIN, i64::MAX),
                (1, i64::MIN),
                (i64::MAX, i64::MIN),
                (i64::MAX - 1, i64::MAX),
                (i64::MIN, i64::MIN + 1),
            ];
            for (i, (issued, expires)) in extremes.into_iter().enumerate() {
                let envelope = Envelope {
                    version: ENVELOPE_VERSION,
                    id: CommandId::from_slice(&[0xa0 + i as u8; 16]).expect("16 bytes"),
                    target: NodeId::new(NODE).expect("a valid node id"),
                    issued_at_unix_ms: issued,
                    expires_at_unix_ms: expires,
                    key_id: keys.controller.key_id().to_owned(),
                    payload: Command::Noop,
                };
                let signed = keys.controller.sign_envelope(&envelope).expect("signs");
                cases.push((
                    format!("times-{issued}-{expires}"),
                    [&[1u8][..], &signed.signature, &signed.bytes].concat(),
                ));
            }
            cases
        }
        "rules_file" => {
            let rule =
                |expr: &str| format!("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: '{expr}'\n").into_bytes();
            let depth = 5_000;
            vec![
                ("nested-parentheses".into(), rule(&format!("{}1{}", "(".repeat(depth), ")".repeat(depth)))),
                ("unary-minus-chain".into(), rule(&format!("{}1", "-".repeat(depth)))),
                ("binary-chain".into(), rule(&vec!["1"; depth].join(" + "))),
                ("nested-calls".into(), rule(&format!("{}x{}", "abs(".repeat(depth), ")".repeat(depth)))),
                ("nested-yaml".into(), nested_yaml(20_000)),
                ("alias-bomb".into(), alias_bomb()),
                ("huge-annotation".into(), {
                    let mut text = rule("up == 0");
                    text.extend_from_slice(b"    annotations:\n      summary: '");
                    text.extend(std::iter::repeat_n(b'{', 1 << 20));
                    text.extend_from_slice(b"'\n");
                    text
                }),
            ]
        }
        "deployment_spec" => vec![
            ("nested-yaml".into(), nested_yaml(20_000)),
            ("alias-bomb".into(), alias_bomb()),
            ("over-the-size-limit".into(), {
                let mut text = b"name: big\n# ".to_vec();
                text.resize(flotilla_controller::rollout::spec::MAX_SPEC_BYTES + 16, b'x');
                text
            }),
        ],
        "metrics_page" => {
            let one_line = {
                let mut page = b"vllm:num_requests_running{model_name=\"".to_vec();
                page.extend(std::iter::repeat_n(b'a', 1 << 20));
                page.extend_from_slice(b"\"} 1\n");
                page
            };
            let many_labels = {
                let labels: Vec<String> = (0..20_000).map(|i| format!("l{i}=\"v\"")).collect();
                format!("vllm:num_requests_running{{{}}} 1\n", labels.join(",")).into_bytes()
            };
            let many_buckets = {
                let mut page = String::from("# TYPE vllm:e2e_request_latency_seconds histogram\n");
                for i in 0..20_000 {
                    page.push_str(&format!(
                        "vllm:e2e_request_latency_seconds_bucket{{le=\"{i}\",model_name=\"m\"}} {i}\n"
                    ));
                }
                page.into_bytes()
            };
            vec![
                ("one-long-line".into(), one_line),
                ("many-labels".into(), many_labels),
                ("many-buckets".into(), many_buckets),
            ]
        }
        _ => Vec::new(),
    }
}

fn hostile_messages() -> Vec<(String, Vec<u8>)> {
    // An unknown field 99 opening groups 100 000 deep: the decoder must give up, not recurse.
    let groups = [0x9b, 0x06].repeat(100_000);
    // Telemetry whose sample label value is not UTF-8 (a `string` field).
    let invalid_utf8 = {
        let label = [&[0x0a, 0x01, b'k', 0x12, 0x02][..], &[0xc3, 0x28]].concat();
        let entry = [&[0x12, label.len() as u8][..], &label].concat();
        let sample = [&[0x0a, 0x01, b'x'][..], &entry].concat();
        let batch = [&[0x08, 0x01, 0x10, 0x01, 0x2a, sample.len() as u8][..], &sample].concat();
        [&[0x12, batch.len() as u8][..], &batch].concat()
    };
    // A batch of the most samples allowed, each with the most labels.
    let crowded = {
        let labels = (0..64).map(|i| (format!("label_{i}"), "v".repeat(200))).collect();
        let sample = pb::Sample { name: "flotilla_x".into(), labels, value: 1.0 };
        let batch = pb::TelemetryBatch {
            seq: 1,
            created_unix_ms: NOW_UNIX_MS,
            samples: vec![sample; 2_000],
            ..Default::default()
        };
        pb::AgentMessage { body: Some(Body::Telemetry(batch)) }.encode_to_vec()
    };
    // A length prefix far beyond the message.
    let lying_length = [0x12, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x08, 0x01].to_vec();
    vec![
        ("nested-groups".into(), groups),
        ("invalid-utf8-label".into(), invalid_utf8),
        ("crowded-batch".into(), crowded),
        ("lying-length".into(), lying_length),
    ]
}

/// A YAML flow sequence nested `depth` deep.
fn nested_yaml(depth: usize) -> Vec<u8> {
    format!("name: {}1{}\n", "[".repeat(depth), "]".repeat(depth)).into_bytes()
}

/// The billion-laughs document: nine levels of nine aliases each.
fn alias_bomb() -> Vec<u8> {
    let mut text = String::from("a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for level in 1..10 {
        let prev = level - 1;
        text.push_str(&format!("a{level}: &a{level} [{}]\n", vec![format!("*a{prev}"); 9].join(",")));
    }
    text.push_str("name: *a9\n");
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes the binary seeds into `seeds/`; run after a wire change with
    /// `cargo test -p flotilla-fuzz -- --ignored write_seeds`.
    #[test]
    #[ignore = "rewrites the checked-in seed files"]
    fn write_seeds() {
        for (target, _) in crate::TARGETS {
            let dir = crate::seed_dir(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, data) in generated(target) {
                std::fs::write(dir.join(name), data).unwrap();
            }
        }
    }

    #[test]
    fn the_envelope_seeds_verify() {
        // A seed that does not verify would leave the fuzzer outside the signed path.
        let keys = keys();
        for (name, data) in generated("command_envelope") {
            let body = &data[1..];
            let signed = if data[0] == 0 {
                continue;
            } else {
                let (signature, bytes) = body.split_at(64);
                flotilla_common::envelope::SignedEnvelope { bytes: bytes.to_vec(), signature: signature.to_vec() }
            };
            let verified = keys.pinned.verify::<Command>(&signed, &keys.me, NOW_UNIX_MS, |_| false);
            assert!(verified.is_ok(), "{name}: {verified:?}");
        }
    }
}

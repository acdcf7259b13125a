//! The stable smoke run of every fuzz target, part of the workspace test
//! command: each target's seed corpus, its hostile inputs (on a thread with
//! tokio's 2 MiB stack, where the controller and agent decode), then a fixed
//! number of deterministic mutations. Any panic fails the test; the input is
//! saved under `target/tmp/fuzz-smoke/` with the command that replays it.
//!
//! This is a smoke test, not fuzzing: it has no coverage feedback and runs
//! seconds, not hours. `fuzz/run-long.sh` runs the same targets under libFuzzer.

// Test harness: a failed setup step should stop the test loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use flotilla_fuzz::mutate::{Rng, mutate, tokens};
use flotilla_fuzz::{TARGETS, Target, seeds};

/// Mutated inputs per target: sized so that the five targets together stay
/// well under 30 s in a debug build on two cores.
fn mutations(target: &str) -> usize {
    match target {
        // A rules file or spec costs a YAML parse and more (PromQL, a plan).
        "rules_file" | "deployment_spec" => 8_000,
        "metrics_page" => 10_000,
        "command_envelope" => 50_000,
        _ => 30_000,
    }
}

/// Longest mutated input: a few times the largest seed, at most 256 KiB.
fn max_len(corpus: &[Vec<u8>]) -> usize {
    (corpus.iter().map(Vec::len).max().unwrap_or(0) * 2).clamp(4096, 256 * 1024)
}

/// Runs `target` on `data`; a panic saves the input and fails with how to replay it.
fn check(name: &str, target: Target, label: &str, data: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| target(data))).is_ok() {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-smoke");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}-{}", label.replace(['/', ' '], "_")));
    std::fs::write(&file, data).unwrap();
    panic!(
        "fuzz target {name} panicked on {label}; the input is in {}\nreplay: cargo run -p flotilla-fuzz --bin {name} -- {}",
        file.display(),
        file.display()
    );
}

fn smoke(name: &str) {
    let target = TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).expect("a known target");
    let corpus: Vec<(PathBuf, Vec<u8>)> = seeds::corpus(name).expect("the seed corpus is readable");
    assert!(
        corpus.iter().any(|(path, _)| path.starts_with(flotilla_fuzz::seed_dir(name))),
        "{name} has no checked-in seeds in {}",
        flotilla_fuzz::seed_dir(name).display()
    );
    for (path, data) in &corpus {
        check(name, target, &path.display().to_string(), data);
    }

    // Hostile inputs on a thread with the stack a tokio worker has.
    let hostile = seeds::hostile(name);
    std::thread::Builder::new()
        .name(format!("{name}-hostile"))
        .stack_size(2 << 20)
        .spawn({
            let name = name.to_owned();
            move || {
                for (label, data) in &hostile {
                    check(&name, target, label, data);
                }
            }
        })
        .unwrap()
        .join()
        .expect("the hostile inputs were handled");

    let inputs: Vec<Vec<u8>> = corpus.into_iter().map(|(_, d)| d).collect();
    let limit = max_len(&inputs);
    let mut rng = Rng::new(0x5eed ^ name.len() as u64);
    for i in 0..mutations(name) {
        let base = &inputs[rng.below(inputs.len())];
        let data = mutate(&mut rng, base, &inputs, tokens(name), limit);
        check(name, target, &format!("mutation-{i}"), &data);
    }
}

#[test]
fn agent_message() {
    smoke("agent_message");
}

#[test]
fn command_envelope() {
    smoke("command_envelope");
}

#[test]
fn rules_file() {
    smoke("rules_file");
}

#[test]
fn deployment_spec() {
    smoke("deployment_spec");
}

#[test]
fn metrics_page() {
    smoke("metrics_page");
}

#[test]
fn promql_selector() {
    smoke("promql_selector");
}

#[test]
fn every_target_has_a_smoke_test_and_a_binary() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let this = std::fs::read_to_string(file!())
        .unwrap_or_else(|_| std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/smoke.rs")).unwrap());
    for (name, _) in TARGETS {
        assert!(manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")), "{name} has no [[bin]]");
        assert!(this.contains(&format!("smoke(\"{name}\")")), "{name} has no smoke test");
    }
}

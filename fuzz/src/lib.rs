//! Fuzz targets for every decoder of untrusted input in Flotilla, as plain
//! functions `fn(&[u8])` that must not panic on any input:
//!
//! | target | what it decodes | who sends it |
//! |---|---|---|
//! | `agent_message` | `AgentMessage` protobuf, then the `TryFrom` validation into domain types, and what the controller derives from a valid batch | any agent (or a stolen agent certificate) |
//! | `command_envelope` | a signed command envelope: verification, the unverified id read for refusals, the payload's own checks | whoever reaches an agent's stream |
//! | `rules_file` | a Prometheus rules file: YAML, PromQL, templates; then evaluation and rendering | operators (`CheckRules`, the rules file) |
//! | `deployment_spec` | a deployment spec YAML, as `ApplyDeployment` reads it | operators |
//! | `metrics_page` | a scraped `/metrics` body: UTF-8, text format, normalisation | any inference server the agent scrapes |
//! | `promql_selector` | a PromQL instant selector (`QueryMetrics`) and silence matchers (`CreateSilence`) | operators |
//!
//! Three ways to run them:
//! - `cargo +nightly fuzz run TARGET` (libFuzzer, coverage-guided): the entry
//!   points in `fuzz_targets/` under `cfg(fuzzing)`; `run-long.sh` runs each
//!   for a set time.
//! - The smoke test (`tests/smoke.rs`, stable, in the workspace test command):
//!   each target's seeds in `seeds/TARGET/` plus thousands of deterministic
//!   mutations ([`mutate`]).
//! - On stable, `cargo run -p flotilla-fuzz --bin TARGET -- FILE...` runs one
//!   target over files (a crash input from either of the above).

// Test equipment, never shipped: a harness whose set-up fails (its fixed key, its
// fixed fleet) must stop loudly, and a target's assertions are its whole point.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

pub mod mutate;
pub mod seeds;
pub mod targets;

/// A fuzz target: decodes `data` and checks what must hold; panics only on a bug.
pub type Target = fn(&[u8]);

/// Every target by name; the names are those of the `fuzz_targets/` binaries
/// and of the seed directories.
pub const TARGETS: [(&str, Target); 6] = [
    ("agent_message", targets::agent_message::run),
    ("command_envelope", targets::command_envelope::run),
    ("rules_file", targets::rules_file::run),
    ("deployment_spec", targets::deployment_spec::run),
    ("metrics_page", targets::metrics_page::run),
    ("promql_selector", targets::promql_selector::run),
];

/// The checked-in seed corpus of `target`.
pub fn seed_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target)
}

/// Runs `target` over every file named in `paths` (directories: every file in
/// them), printing each name first so that a crash names its input. The stable
/// reproducer behind each `fuzz_targets/` binary.
// A command-line tool: naming each input before running it is its output.
#[allow(clippy::print_stderr)]
pub fn replay(target: Target, paths: impl IntoIterator<Item = std::path::PathBuf>) -> std::io::Result<usize> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<_> =
                std::fs::read_dir(&path)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
            entries.sort();
            files.extend(entries.into_iter().filter(|p| p.is_file()));
        } else {
            files.push(path);
        }
    }
    for file in &files {
        let data = std::fs::read(file)?;
        eprintln!("{} ({} bytes)", file.display(), data.len());
        target(&data);
    }
    Ok(files.len())
}

/// The `main` of a target binary built without cargo-fuzz: runs target `name`
/// over the files and directories given as arguments (its seeds without any).
pub fn reproduce(name: &str) -> std::process::ExitCode {
    let Some((_, target)) = TARGETS.iter().find(|(n, _)| *n == name) else {
        return std::process::ExitCode::from(64);
    };
    let mut paths: Vec<std::path::PathBuf> = std::env::args_os().skip(1).map(Into::into).collect();
    if paths.is_empty() {
        paths = seeds::corpus_dirs(name);
    }
    match replay(*target, paths) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            #[allow(clippy::print_stderr)] // a command-line tool's error report
            {
                eprintln!("{name}: {error}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

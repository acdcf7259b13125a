//! The targets, one file each. Each `run` mirrors what the production code does
//! with the bytes, in the same order, and asserts what must hold for any input.

pub mod agent_message;
pub mod command_envelope;
pub mod deployment_spec;
pub mod metrics_page;
pub mod promql_selector;
pub mod rules_file;

/// Text decoders (YAML, PromQL) only ever see valid UTF-8: gRPC strings are
/// checked by prost and files are read as strings. Mapping every input to text
/// lets each fuzz input reach the parser.
fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

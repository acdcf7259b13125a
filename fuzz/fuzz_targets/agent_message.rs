//! libFuzzer entry point of `targets::agent_message`: `cargo +nightly fuzz run agent_message`.
//! Built on stable it reproduces instead: `cargo run -p flotilla-fuzz --bin agent_message -- FILE...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::agent_message::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    flotilla_fuzz::reproduce("agent_message")
}

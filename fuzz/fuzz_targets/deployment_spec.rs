//! libFuzzer entry point of `targets::deployment_spec`: `cargo +nightly fuzz run deployment_spec`.
//! Built on stable it reproduces instead: `cargo run -p flotilla-fuzz --bin deployment_spec -- FILE...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::deployment_spec::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    flotilla_fuzz::reproduce("deployment_spec")
}

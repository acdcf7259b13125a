//! libFuzzer entry point of `targets::rules_file`: `cargo +nightly fuzz run rules_file`.
//! Built on stable it reproduces instead: `cargo run -p flotilla-fuzz --bin rules_file -- FILE...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::rules_file::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    flotilla_fuzz::reproduce("rules_file")
}

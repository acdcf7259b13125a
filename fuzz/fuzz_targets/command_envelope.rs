//! libFuzzer entry point of `targets::command_envelope`: `cargo +nightly fuzz run command_envelope`.
//! Built on stable it reproduces instead: `cargo run -p flotilla-fuzz --bin command_envelope -- FILE...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::command_envelope::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    flotilla_fuzz::reproduce("command_envelope")
}

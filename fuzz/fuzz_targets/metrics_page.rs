//! libFuzzer entry point of `targets::metrics_page`: `cargo +nightly fuzz run metrics_page`.
//! Built on stable it reproduces instead: `cargo run -p flotilla-fuzz --bin metrics_page -- FILE...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::metrics_page::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    flotilla_fuzz::reproduce("metrics_page")
}

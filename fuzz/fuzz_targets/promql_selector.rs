//! libFuzzer entry point of `targets::promql_selector`: `cargo +nightly fuzz run promql_selector`.
//! Built on stable it reproduces instead: `cargo run -p flotilla-fuzz --bin promql_selector -- FILE...`.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::promql_selector::run(data));

#[cfg(not(fuzzing))]
fn main() -> std::process::ExitCode {
    flotilla_fuzz::reproduce("promql_selector")
}

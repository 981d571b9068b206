#![no_main]
//! `cargo fuzz run --sanitizer none config_json`: see `sluice_fuzz_targets::config_json`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz_targets::config_json(data));

#![no_main]
//! `cargo fuzz run --sanitizer none safetensors_header`: see `sluice_fuzz_targets::safetensors_header`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz_targets::safetensors_header(data));

#![no_main]
//! `cargo fuzz run --sanitizer none openai_body`: see `sluice_fuzz_targets::openai_body`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz_targets::openai_body(data));

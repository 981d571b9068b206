#![no_main]
//! `cargo fuzz run --sanitizer none generate_request`: see `sluice_fuzz_targets::generate_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz_targets::generate_request(data));

#![no_main]
//! `cargo fuzz run --sanitizer none cache_push`: see `sluice_fuzz_targets::cache_push`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz_targets::cache_push(data));

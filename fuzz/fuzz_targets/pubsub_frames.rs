//! `pubsub_frames`: see `fuzz/checks.rs` for the input layout and the properties checked.
#![no_main]

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::pubsub_frames(data));

//! `coordinator.toml` as a user (or a damaged file) may write it: parsed and validated with
//! a clear error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cohort_coordinator::CoordinatorConfig::parse(text);
    }
});

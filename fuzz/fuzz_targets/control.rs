#![no_main]
//! `control`: see `vfmig::fuzz::control`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmig::fuzz::control(data));

#![no_main]
//! `fabric`: see `vfmig::fuzz::fabric`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmig::fuzz::fabric(data));

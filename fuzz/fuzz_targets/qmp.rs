#![no_main]
//! `qmp`: see `vfmig::fuzz::qmp`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmig::fuzz::qmp(data));

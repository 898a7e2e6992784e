#![no_main]
//! `guest`: see `vfmig::fuzz::guest`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmig::fuzz::guest(data));

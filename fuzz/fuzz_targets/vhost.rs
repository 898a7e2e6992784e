#![no_main]
//! `vhost`: see `vfmig::fuzz::vhost`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfmig::fuzz::vhost(data));

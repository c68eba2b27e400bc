#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tunnel_shared::fuzzing::run("iam_toml", data));

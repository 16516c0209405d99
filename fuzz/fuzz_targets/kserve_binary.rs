#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_server::fuzzing::kserve_binary(data));

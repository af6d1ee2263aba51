#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| airstate::fuzzing::keys_and_queries(data));

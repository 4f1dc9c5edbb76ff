#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| worker::__fuzz::http_request(data));

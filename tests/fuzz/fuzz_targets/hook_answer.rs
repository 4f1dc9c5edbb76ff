#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| plugin_host::__fuzz::hook_answer(data));

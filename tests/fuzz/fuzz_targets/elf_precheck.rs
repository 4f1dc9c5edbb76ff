#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| host::__fuzz::elf_precheck(data));

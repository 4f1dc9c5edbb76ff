//! The `worker` CLI as the end-to-end tests run it: the same one-line `main` as `host`'s
//! `worker` binary, built in this package so tests can find it through cargo.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    plugin_host::isolation::run_child_if_requested();
    worker::cli::main()
}

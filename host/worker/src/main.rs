//! The `worker` binary: see `worker --help`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // An isolated plugin's process is this executable started again: it serves and exits here.
    plugin_host::isolation::run_child_if_requested();
    worker::cli::main()
}

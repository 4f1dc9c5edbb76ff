//! The `worker` binary: see `worker --help`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    worker::cli::main()
}

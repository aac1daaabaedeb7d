//! The `routilux` command-line tool: see `routilux --help` and the README.

fn main() -> std::process::ExitCode {
    routilux::cli::main()
}

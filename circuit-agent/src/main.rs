use std::process::ExitCode;

fn main() -> ExitCode {
    circuit_agent::cli::main()
}

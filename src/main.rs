//! The tidemark command line: parses arguments, sets up logging, runs one operation, and turns
//! its outcome into output and a documented exit code.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}

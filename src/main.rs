//! The `sdti` command-line tool: a thin front on the engine and on `sdti::app`.
//!
//! Its modules (`src/cli/`) are compiled into this binary only, so the library (and its C
//! ABI) carries no command-line code.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}

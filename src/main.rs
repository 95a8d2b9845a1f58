//! The `sdti` command-line tool: a thin front on the engine (see `src/cli/`).
//!
//! The CLI's modules live in `src/cli/` but are compiled into this binary only, so the
//! library (and its C ABI) carries no command-line code.

#[path = "../cli/mod.rs"]
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}

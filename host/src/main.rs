//! The `switchyard` command line: run a manifest and deploy changes into it, run the embedded
//! broker, run the demo, scaffold, validate and unit-test components, or run one command
//! component. This file sets up logging and the async runtime; `cli.rs` is the command line's
//! shape and `commands/` the body of each command.

mod cli;
mod commands;
mod scaffold;
mod signals;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // As cargo's test runner, only what goes wrong: the tests' own output is the report.
    let default_level = match cli.command {
        cli::Commands::Test(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(switchyard_runtime::progress::BarAwareStderr::new)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

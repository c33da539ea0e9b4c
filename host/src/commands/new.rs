//! `switchyard new`: a component crate that builds, tests and runs as generated.

use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The component's name: its directory, crate, WIT world and topic prefix.
    pub name: String,
    /// A command (run once, sends messages) instead of a handler.
    #[arg(long)]
    pub command: bool,
}

pub fn run(args: NewArgs) -> anyhow::Result<ExitCode> {
    new_component(&args.name, args.command)
}

/// `switchyard new`: creates the crate, makes sure cargo can build it for Wasm, and says what
/// to do next.
fn new_component(name: &str, command: bool) -> anyhow::Result<ExitCode> {
    use crate::scaffold::{self, Kind};
    let kind = if command {
        Kind::Command
    } else {
        Kind::Handler
    };
    let current = std::env::current_dir().context("reading the current directory")?;
    let root = scaffold::create(&current, name, kind)?;
    switchyard_pipeline::build::ensure_wasm_target(&root)?;
    let run_hint = match kind {
        Kind::Handler => format!(
            "  switchyard run {name}.toml          # then, in another terminal:\n  \
             switchyard publish -t {name}-in --payload hello\n  \
             switchyard consume -t {name}-out"
        ),
        Kind::Command => format!(
            "  switchyard run {name}.toml          # sends its args; then:\n  \
             switchyard consume -t {name}-out"
        ),
    };
    println!(
        "created {}\n\n  cd {name}\n  cargo test                          # inside Wasm, through \
         `switchyard test`\n  cargo build --release\n  switchyard validate {name}.toml\n{run_hint}",
        root.display()
    );
    Ok(ExitCode::SUCCESS)
}

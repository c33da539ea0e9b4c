//! `switchyard validate`: checks a manifest and each component it names, without compiling
//! anything or reaching a broker.

use std::path::PathBuf;
use std::process::ExitCode;

use switchyard_runtime::manifest::{ComponentConfig, Manifest};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The manifest (TOML).
    pub manifest: PathBuf,
}

pub fn run(args: ValidateArgs) -> anyhow::Result<ExitCode> {
    validate(&args.manifest)
}

/// `switchyard validate`: one line per component, what it is or why it would not run.
fn validate(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let manifest = Manifest::load(path)?;
    let tables = switchyard_pipeline::predictions::tables();
    let mut refused = 0usize;
    for (name, config) in &manifest.components {
        match switchyard_runtime::check_before_compiling(name, config, &tables) {
            Ok(shape) => println!("{name}: ok, {}", role_summary(config, &shape)),
            Err(e) => {
                refused += 1;
                eprintln!("{e}");
            }
        }
    }
    let total = manifest.components.len();
    if refused > 0 {
        eprintln!(
            "{}: {refused} of {total} component(s) would not run",
            path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    println!("{}: {total} component(s) ok", path.display());
    Ok(ExitCode::SUCCESS)
}

/// What a valid component is, as `validate` reports it.
fn role_summary(config: &ComponentConfig, shape: &switchyard_runtime::world::Shape) -> String {
    let mut what = if config.is_handler() {
        format!("handler of {}", config.subscribe.join(", "))
    } else {
        "command".to_string()
    };
    if !config.publish.is_empty() {
        what.push_str(&format!(", sends to {}", config.publish.join(", ")));
    }
    if !config.results.is_empty() {
        what.push_str(&format!(
            ", writes results to {}",
            config.results.join(", ")
        ));
    }
    let exports = |prefix: &str| shape.exports.iter().any(|name| name.starts_with(prefix));
    let mut extras = Vec::new();
    if exports("switchyard:host/batch@") {
        extras.push("takes batches");
    }
    if exports("switchyard:host/report@") {
        extras.push("reports");
    }
    if shape
        .imports
        .iter()
        .any(|name| name.starts_with("wasi:nn/"))
    {
        extras.push("may use wasi:nn");
    }
    if !extras.is_empty() {
        what.push_str(&format!(" ({})", extras.join(", ")));
    }
    what
}

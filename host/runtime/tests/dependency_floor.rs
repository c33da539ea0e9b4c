//! Proves the runtime's floor from Cargo's own dependency graph (`cargo tree`): the runtime is
//! the host without an application, so it compiles nothing of the Fashion-MNIST pipeline (its
//! formats, its report's plots, the pipeline crate) and nothing of the command line (clap, the
//! `switchyard` binary's package, the client API it uses for `publish` and `consume`); and the
//! pipeline, in turn, compiles no command line. A module that reached across would have to add
//! the dependency, and this test names it.

use std::collections::BTreeSet;
use std::process::Command;

/// The packages `package` depends on (normal dependencies, every level), one name each.
fn dependencies_of(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-p", package, "-e", "normal"])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("running cargo tree");
    assert!(
        output.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(String::from)
        .collect()
}

fn assert_absent(package: &str, forbidden: &[&str]) {
    let packages = dependencies_of(package);
    assert!(
        packages.contains("switchyard-broker"),
        "{package} should stand on switchyard-broker: {packages:?}"
    );
    let found: Vec<&&str> = forbidden
        .iter()
        .filter(|name| packages.contains(**name))
        .collect();
    assert!(found.is_empty(), "{package} depends on {found:?}");
}

#[test]
fn the_runtime_compiles_neither_the_pipeline_nor_the_command_line() {
    assert_absent(
        "switchyard-runtime",
        &[
            "switchyard-pipeline",
            "pipeline-core",
            "plotters",
            "switchyard",
            "switchyard-client",
            "clap",
        ],
    );
}

#[test]
fn the_pipeline_compiles_no_command_line() {
    assert_absent("switchyard-pipeline", &["switchyard", "clap"]);
}

//! The dependency graph as Cargo itself sees it, for the tests that prove a crate's floor
//! (what a user of it compiles): reading `cargo tree` rather than the manifests catches what
//! a dependency brings along.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

/// The packages `package` compiles through normal dependencies, at every level and itself
/// included, one name each: `cargo tree -p PACKAGE -e normal` with `arguments` added (features,
/// say), run in this workspace with the `cargo` that runs the test.
pub fn normal_dependencies(package: &str, arguments: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = crate::process::output_within(
        Command::new(cargo)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["tree", "-p", package, "-e", "normal"])
            .args(["--prefix", "none", "--format", "{p}"])
            .args(arguments),
        Duration::from_secs(600),
    );
    assert!(
        output.status.success(),
        "cargo tree -p {package} {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("cargo tree prints UTF-8")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(String::from)
        .collect()
}

//! Proves the runtime's floor from Cargo's own dependency graph (`cargo tree`): the runtime is
//! the host without an application, so it compiles nothing of the Fashion-MNIST pipeline (its
//! formats, its report's plots, the pipeline crate) and nothing of the command line (clap, the
//! `switchyard` binary's package, the client API it uses for `publish` and `consume`); and the
//! pipeline, in turn, compiles no command line. A module that reached across would have to add
//! the dependency, and this test names it.

use switchyard_testing::cargo_tree::normal_dependencies;

fn assert_absent(package: &str, forbidden: &[&str]) {
    let packages = normal_dependencies(package, &[]);
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

//! Proves that the README's quick start, the justfile and CI name the same two commands: the
//! README's first `sh` block holds the demo command and then the test command (the shape
//! `.ci/run` reads them in, to run them as written), and `just demo` / `just test` run exactly
//! those commands. A newcomer's path and CI's path then cannot drift apart.

mod support;

use support::{justfile_recipe as recipe, workspace_file as read};

/// The commands of the quick start's first `sh` block, comments removed; the same rule as the
/// awk program in `.ci/run`.
fn quick_start_commands(readme: &str) -> Vec<String> {
    readme
        .lines()
        .skip_while(|line| !line.starts_with("## Quick start"))
        .skip_while(|line| !line.starts_with("```sh"))
        .skip(1)
        .take_while(|line| !line.starts_with("```"))
        .map(|line| line.split('#').next().unwrap_or("").trim_end().to_string())
        .collect()
}

#[test]
fn the_readme_justfile_and_ci_run_the_same_commands() {
    let commands = quick_start_commands(&read("README.md"));
    let [demo, test] = commands.as_slice() else {
        panic!("the quick start's sh block should hold two commands, found {commands:?}");
    };
    assert!(
        demo.starts_with("cargo run") && demo.ends_with(" demo"),
        "first command should run the demo (CI appends --images 500): {demo:?}"
    );
    assert!(test.starts_with("cargo test"), "second command: {test:?}");

    let justfile = read("justfile");
    assert_eq!(
        recipe(&justfile, "demo *ARGS:"),
        format!("{demo} {{{{ARGS}}}}")
    );
    assert_eq!(recipe(&justfile, "test:"), *test);

    let ci = read(".ci/run");
    assert!(
        ci.contains("README.md") && ci.contains("eval \"$demo_command --images 500\""),
        ".ci/run should read its commands from the README and run them"
    );
    assert!(
        ci.contains("rustup target remove wasm32-wasip2"),
        ".ci/run should start without the wasm target, as a newcomer does"
    );
}

//! Proves that `switchyard new` makes crates that work as generated, outside this repository,
//! with nothing but `switchyard` on the PATH: in a scratch directory, a handler's and a
//! command's `cargo test --target wasm32-wasip2` pass (their tests run inside Wasm through
//! `switchyard test`), and so does `cargo component test` where cargo-component is installed, their release builds pass `switchyard validate` against the manifests
//! `new` wrote, and the handler, built from the published `wasi:messaging` world alone
//! (`messaging-core`), answers a message through `switchyard run` on the embedded broker.
//! Also that a bad name and an existing directory are refused with the fix.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use switchyard_testing::process::output_within;

use support::hosts::Host;

/// Where the created crates build: shared by the runs, so their dependencies build once.
fn target_dir() -> PathBuf {
    support::test_target_dir().join("new-components")
}

/// The longest one command here may take: a cold build of a new component's dependencies is
/// minutes on a loaded 2-core machine; a command that hangs is a regression to fail on.
const LIMIT: Duration = Duration::from_secs(30 * 60);

/// Runs `program ARGS` in `dir` as a user would, with `switchyard` on the PATH.
fn run_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    output_within(
        Command::new(program)
            .args(args)
            .current_dir(dir)
            .env("PATH", support::path_with_switchyard())
            .env("CARGO_TARGET_DIR", target_dir())
            .env_remove("BROKER"),
        LIMIT,
    )
}

/// [`run_in`], asserting success; returns standard output.
fn succeed(dir: &Path, program: &str, args: &[&str]) -> String {
    let output = run_in(dir, program, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} in {} failed ({}):\n{stdout}\n{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `switchyard new NAME ARGS` in a fresh scratch directory, outside this repository; then
/// `cargo test --target wasm32-wasip2`, `cargo component test` (where cargo-component is
/// installed) and `cargo build --release` in the crate.
fn create_test_and_build(name: &str, args: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let scratch = tempfile::tempdir().unwrap();
    let mut new = vec!["new", name];
    new.extend(args);
    let said = succeed(scratch.path(), "switchyard", &new);
    assert!(said.contains("cargo test"), "{said}");
    let root = scratch.path().join(name);
    let tests = succeed(&root, "cargo", &["test", "--target", "wasm32-wasip2"]);
    assert!(tests.contains("test result: ok."), "{tests}");
    assert!(
        !tests.contains(" 0 passed"),
        "the generated tests ran: {tests}"
    );
    if support::cargo_component_ready() {
        let tests = succeed(&root, "cargo", &["component", "test"]);
        assert!(
            tests.contains("test result: ok.") && !tests.contains(" 0 passed"),
            "cargo component test ran the generated tests: {tests}"
        );
    }
    succeed(&root, "cargo", &["build", "--release"]);
    (scratch, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_handler_tests_validates_and_answers_on_the_embedded_broker() {
    let (_scratch, root) = create_test_and_build("shout", &[]);
    let validated = succeed(&root, "switchyard", &["validate", "shout.toml"]);
    assert!(
        validated.contains("shout: ok, handler of shout-in, sends to shout-out"),
        "{validated}"
    );

    // The host's embedded broker takes a free port itself and logs which.
    let manifest = std::fs::read_to_string(root.join("shout.toml")).unwrap();
    assert!(manifest.contains("127.0.0.1:9092"), "{manifest}");
    std::fs::write(
        root.join("shout.toml"),
        manifest.replace("127.0.0.1:9092", "127.0.0.1:0"),
    )
    .unwrap();
    let target = target_dir();
    let env = [("CARGO_TARGET_DIR", target.to_str().unwrap())];
    let mut host = Host::start_in("shout", &["run", "shout.toml"], &root, &env);
    let line = host.wait_for("embedded broker at ").await;
    let address = support::hosts::address_after(&line, "embedded broker at ");
    let host = host.running().await;
    let broker = format!("kafka://{address}");
    succeed(
        &root,
        "switchyard",
        &[
            "publish",
            "--broker",
            &broker,
            "-t",
            "shout-in",
            "-H",
            "request-id=r-7",
            "--payload",
            "hello from a test",
        ],
    );
    let consumed = succeed(
        &root,
        "switchyard",
        &[
            "consume",
            "--broker",
            &broker,
            "-t",
            "shout-out",
            "--count",
            "1",
            "--idle-exit",
            "60",
        ],
    );
    let answer: serde_json::Value = serde_json::from_str(consumed.trim()).unwrap();
    assert_eq!(answer["payload"], "HELLO FROM A TEST", "{answer}");
    assert_eq!(answer["headers"]["request-id"], "r-7", "{answer}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_command_tests_and_validates() {
    let (_scratch, root) = create_test_and_build("announce", &["--command"]);
    let validated = succeed(&root, "switchyard", &["validate", "announce.toml"]);
    assert!(
        validated.contains("announce: ok, command, sends to announce-out"),
        "{validated}"
    );
}

#[test]
fn bad_names_and_existing_directories_are_refused_with_the_fix() {
    let scratch = tempfile::tempdir().unwrap();
    let refused = run_in(scratch.path(), "switchyard", &["new", "Order_Router"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("lowercase letters, digits and single hyphens"),
        "{said}"
    );
    std::fs::create_dir(scratch.path().join("taken")).unwrap();
    let refused = run_in(scratch.path(), "switchyard", &["new", "taken"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("already exists"), "{said}");
}

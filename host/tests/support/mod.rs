//! Helpers shared by the host's integration tests: the components built once, and what the
//! host's tests need beside the brokers and names of `switchyard-testing` (re-exported here).

#![allow(dead_code)]

pub mod hosts;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use switchyard_broker::{Broker, Subscriber};
use switchyard_pipeline::build::ComponentBuild;
use switchyard_runtime::manifest::{ComponentConfig, Preopen, RetryPolicy};
use switchyard_runtime::{Runtime, RuntimeOptions};
pub use switchyard_testing::*;

/// The directory with producer.wasm, classifier.wasm and consumer.wasm, built once per test
/// binary (cargo makes later builds no-ops).
pub fn components() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            switchyard_pipeline::demo::build_components().expect("building the components")
        })
        .clone()
}

/// The target directory of the test-only builds (the test handler, the components' unit
/// tests for wasm): separate from the components' own, so `cargo test` there never relinks a
/// component the other tests run.
pub fn test_target_dir() -> PathBuf {
    switchyard_pipeline::demo::components_target_dir().with_file_name("component-tests")
}

/// A build of test-only components (the test handler, the components' unit tests for wasm)
/// into [`test_target_dir`].
pub fn test_build() -> ComponentBuild {
    ComponentBuild::new(
        switchyard_pipeline::demo::workspace_root(),
        test_target_dir(),
    )
}

/// `test_handler.wasm` (components/test-handler), built once per test binary.
pub fn test_handler() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            test_build()
                .packages(["test-handler"])
                .build()
                .expect("building the test handler")
                .join("test_handler.wasm")
        })
        .clone()
}

/// The build that sent `message`, as its `switchyard-sent-by` header names it
/// (`NAME@sha256:…`); panics if it has none, since the host stamps every component's send.
pub fn sent_by(message: &switchyard_broker::IncomingMessage) -> String {
    message
        .headers
        .iter()
        .find(|(name, _)| name == switchyard_runtime::SENT_BY_HEADER)
        .map(|(_, build)| build.clone())
        .expect("a message a component sent names the build that sent it")
}

/// Path of a built component.
pub fn component(name: &str) -> PathBuf {
    components().join(format!("{name}.wasm"))
}

/// The classifier subscribed to `topic` in `group`, answering to `out`, running LeNet inside
/// the component (tract in Wasm) with the committed model.
pub fn classifier(topic: &str, out: &str, group: &str, retry: RetryPolicy) -> ComponentConfig {
    ComponentConfig {
        subscribe: vec![topic.into()],
        group: Some(group.into()),
        publish: vec![out.into()],
        args: ["--model", "/models/lenet.onnx", "--predictions-topic", out]
            .map(String::from)
            .to_vec(),
        preopens: vec![Preopen {
            host: models(),
            guest: "/models".into(),
            writable: false,
        }],
        retry,
        ..ComponentConfig::new(component("classifier"))
    }
}

/// The committed models/ directory.
pub fn models() -> PathBuf {
    switchyard_pipeline::demo::models_dir()
}

/// A file of the workspace, as text.
pub fn workspace_file(relative: &str) -> String {
    let path: PathBuf = switchyard_pipeline::demo::workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The single command line of a justfile recipe, given its header line.
pub fn justfile_recipe(justfile: &str, header: &str) -> String {
    let mut lines = justfile
        .lines()
        .skip_while(|line| *line != header)
        .skip(1)
        .take_while(|line| line.starts_with("    "));
    let command = lines
        .next()
        .unwrap_or_else(|| panic!("no recipe `{header}` in the justfile"))
        .trim()
        .to_string();
    assert!(
        lines.next().is_none(),
        "recipe `{header}` should be one command"
    );
    command
}

/// `PATH` with the directory of the `switchyard` under test first, as a user who installed it
/// has it.
pub fn path_with_switchyard() -> std::ffi::OsString {
    let switchyard = std::path::Path::new(env!("CARGO_BIN_EXE_switchyard"));
    std::env::join_paths(
        std::iter::once(switchyard.parent().unwrap().to_path_buf()).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )),
    )
    .unwrap()
}

/// Whether `cargo component` can run here, with the `wasm32-wasip1` target it builds for
/// added. cargo-component is not part of a Rust toolchain, so without it the tests of `cargo
/// component test` say so and pass, unless `SWITCHYARD_REQUIRE_CARGO_COMPONENT` is set
/// (`.ci/run` installs cargo-component and sets it): then its absence fails them.
pub fn cargo_component_ready() -> bool {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let installed = switchyard_testing::process::output_within(
        std::process::Command::new(cargo).args(["component", "--version"]),
        Duration::from_secs(60),
    )
    .status
    .success();
    if !installed {
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_CARGO_COMPONENT").is_none(),
            "cargo-component is not on the PATH: cargo install cargo-component --locked"
        );
        eprintln!("cargo-component is not installed: `cargo component test` not tried");
        return false;
    }
    let added = switchyard_testing::process::output_within(
        std::process::Command::new("rustup")
            .current_dir(switchyard_pipeline::demo::workspace_root())
            .args(["target", "add", "wasm32-wasip1"]),
        Duration::from_secs(600),
    );
    assert!(
        added.status.success(),
        "rustup target add wasm32-wasip1: {}",
        String::from_utf8_lossy(&added.stderr)
    );
    true
}

/// What a handler test starts from: an input and an output topic of its own on `broker`, a
/// reader of the output, and a runtime.
pub async fn handler_setup(
    broker: &Arc<dyn Broker>,
) -> (String, String, Arc<dyn Subscriber>, Runtime) {
    let (input, output) = (unique("in"), unique("out"));
    create_topics(broker.as_ref(), &[&input, &output]).await;
    let reader = member(broker.as_ref(), &unique("reader"), &output).await;
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    (input, output, reader, runtime)
}

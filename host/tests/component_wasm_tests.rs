//! Proves the components' own unit tests pass inside WebAssembly: builds the test binaries of
//! pipeline-core, producer and consumer for wasm32-wasip2 and runs each one in this host (the
//! same runtime that runs the components, with a writable scratch directory at /tmp),
//! expecting exit code 0.

mod support;

use switchyard::config::{ComponentConfig, Limits, Preopen};
use switchyard::runtime::{Runtime, RuntimeOptions};

fn build_wasm_tests() -> Vec<std::path::PathBuf> {
    support::test_build()
        .packages(["pipeline-core", "producer", "consumer"])
        .build_tests()
        .expect("building the wasm tests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_unit_tests_pass_inside_wasm() {
    let binaries = build_wasm_tests();
    assert!(
        binaries.len() >= 3,
        "expected test binaries of three crates, got {binaries:?}"
    );
    let (_cluster, broker) = support::embedded().await;
    let runtime = Runtime::new(broker, RuntimeOptions::default())
        .await
        .unwrap();
    for binary in binaries {
        let scratch = tempfile::tempdir().unwrap();
        let config = ComponentConfig {
            preopens: vec![Preopen {
                host: scratch.path().to_path_buf(),
                guest: "/tmp".into(),
                writable: true,
            }],
            limits: Limits {
                max_memory_mb: 256,
                max_call_ms: 0,
                ..Limits::default()
            },
            ..ComponentConfig::new(binary.clone())
        };
        let component = runtime.load("wasm-test", &config).unwrap();
        let outcome = runtime.run_command(&component).await.unwrap();
        assert_eq!(
            outcome.exit_code,
            0,
            "{} failed inside wasm",
            binary.display()
        );
    }
}

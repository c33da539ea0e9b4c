//! Helpers shared by the integration tests: the embedded broker, the components built once,
//! and waiting for a condition with a deadline instead of sleeping.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use switchyard::broker::Broker;
use switchyard::broker::embedded::EmbeddedKafka;
use switchyard::broker::kafka::Kafka;
use switchyard::build::ComponentBuild;

/// An embedded broker and the Kafka backend on it.
pub async fn embedded() -> (Arc<EmbeddedKafka>, Arc<dyn Broker>) {
    let cluster = Arc::new(EmbeddedKafka::start(None).await.expect("embedded broker"));
    let broker: Arc<dyn Broker> = Arc::new(Kafka::embedded(cluster.clone()));
    (cluster, broker)
}

/// The directory with producer.wasm, classifier.wasm and consumer.wasm, built once per test
/// binary (cargo makes later builds no-ops).
pub fn components() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| switchyard::pipeline::build_components().expect("building the components"))
        .clone()
}

/// The target directory of the test-only builds (the test handler, the components' unit
/// tests for wasm): separate from the components' own, so `cargo test` there never relinks a
/// component the other tests run.
pub fn test_target_dir() -> PathBuf {
    switchyard::pipeline::components_target_dir().with_file_name("component-tests")
}

/// A build of test-only components (the test handler, the components' unit tests for wasm)
/// into [`test_target_dir`].
pub fn test_build() -> ComponentBuild {
    ComponentBuild::new(switchyard::pipeline::workspace_root(), test_target_dir())
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

/// Path of a built component.
pub fn component(name: &str) -> PathBuf {
    components().join(format!("{name}.wasm"))
}

/// The committed models/ directory.
pub fn models() -> PathBuf {
    switchyard::pipeline::models_dir()
}

/// Waits until `condition` holds, failing the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A unique name, so tests sharing a broker never share topics or groups.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

//! Helpers shared by the integration tests: the embedded broker, Google's Pub/Sub emulator
//! started once per test binary, the components built once, and waiting for a condition with
//! a deadline instead of sleeping.

#![allow(dead_code)]

pub mod hosts;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use switchyard::broker::embedded::EmbeddedKafka;
use switchyard::broker::kafka::Kafka;
use switchyard::broker::pubsub::{PubSub, PubSubConfig};
use switchyard::broker::{
    Broker, OutgoingMessage, StartPosition, Subscriber, SubscriptionSpec, TopicSpec,
};
use switchyard::build::ComponentBuild;
use switchyard::config::{ComponentConfig, Preopen, RetryPolicy};
use switchyard::pubsub_emulator::PubSubEmulator;

/// An embedded broker and the Kafka backend on it.
pub async fn embedded() -> (Arc<EmbeddedKafka>, Arc<dyn Broker>) {
    let cluster = Arc::new(EmbeddedKafka::start(None).await.expect("embedded broker"));
    let broker: Arc<dyn Broker> = Arc::new(Kafka::embedded(cluster.clone()));
    (cluster, broker)
}

/// The endpoint of Google's Pub/Sub emulator: the one `PUBSUB_EMULATOR_HOST` names, else one
/// this test binary starts (on a free port, with a capped heap) and that dies with it. It
/// blocks while the emulator starts: call it through `spawn_blocking` from async code.
pub fn emulator_endpoint() -> String {
    if let Ok(host) = std::env::var("PUBSUB_EMULATOR_HOST") {
        return format!("http://{host}");
    }
    static EMULATOR: OnceLock<PubSubEmulator> = OnceLock::new();
    EMULATOR
        .get_or_init(|| PubSubEmulator::start(None).expect("starting the Pub/Sub emulator"))
        .endpoint()
}

/// Settings for the test project on the emulator.
pub async fn pubsub_config() -> PubSubConfig {
    let mut config = PubSubConfig::new("switchyard-test");
    config.endpoint = Some(
        tokio::task::spawn_blocking(emulator_endpoint)
            .await
            .expect("starting the Pub/Sub emulator"),
    );
    config.anonymous = true;
    config
}

/// The Pub/Sub backend on the emulator.
pub async fn pubsub() -> Arc<dyn Broker> {
    Arc::new(
        PubSub::connect(pubsub_config().await)
            .await
            .expect("connecting to the Pub/Sub emulator"),
    )
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

/// The build that sent `message`, as its `switchyard-sent-by` header names it
/// (`NAME@sha256:…`); panics if it has none, since the host stamps every component's send.
pub fn sent_by(message: &switchyard::broker::IncomingMessage) -> String {
    message
        .headers
        .iter()
        .find(|(name, _)| name == switchyard::runtime::host::SENT_BY_HEADER)
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
    switchyard::pipeline::models_dir()
}

/// Creates `names` with one partition each (one partition keeps a test's messages in order).
pub async fn create_topics(broker: &dyn Broker, names: &[&str]) {
    let specs: Vec<TopicSpec> = names
        .iter()
        .map(|name| TopicSpec {
            name: name.to_string(),
            partitions: 1,
        })
        .collect();
    broker.ensure_topics(&specs).await.expect("creating topics");
}

/// Publishes `message` and waits until the broker stored it.
pub async fn publish(broker: &dyn Broker, message: OutgoingMessage) {
    broker
        .publisher()
        .await
        .expect("a publisher")
        .publish(message)
        .await
        .expect("publishing")
        .wait()
        .await
        .expect("the broker stores the message");
}

/// A member of `group` reading `topic` from its start.
pub async fn member(broker: &dyn Broker, group: &str, topic: &str) -> Arc<dyn Subscriber> {
    broker
        .subscribe(&SubscriptionSpec {
            group: group.into(),
            topics: vec![topic.into()],
            start: StartPosition::Earliest,
        })
        .await
        .expect("subscribing")
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

/// Everything the host logs from now on (as `RUST_LOG` says; by default switchyard's and
/// rdkafka's lines at `info`),
/// as text a test can wait on; also echoed to standard error. Once per test binary.
pub fn capture_logs() -> tokio::sync::watch::Receiver<String> {
    #[derive(Clone)]
    struct Log(Arc<tokio::sync::watch::Sender<String>>);
    impl std::io::Write for Log {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let text = String::from_utf8_lossy(bytes);
            eprint!("{text}");
            self.0.send_modify(|log| log.push_str(&text));
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (sender, receiver) = tokio::sync::watch::channel(String::new());
    let log = Log(Arc::new(sender));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "switchyard=info,rdkafka=info".into()),
        )
        .with_ansi(false)
        .with_writer(move || log.clone())
        .init();
    receiver
}

/// A file of the workspace, as text.
pub fn workspace_file(relative: &str) -> String {
    let path: PathBuf = switchyard::pipeline::workspace_root().join(relative);
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

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    let installed =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["component", "--version"])
            .output()
            .is_ok_and(|output| output.status.success());
    if !installed {
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_CARGO_COMPONENT").is_none(),
            "cargo-component is not on the PATH: cargo install cargo-component --locked"
        );
        eprintln!("cargo-component is not installed: `cargo component test` not tried");
        return false;
    }
    let added = std::process::Command::new("rustup")
        .current_dir(switchyard::pipeline::workspace_root())
        .args(["target", "add", "wasm32-wasip1"])
        .status()
        .expect("running rustup");
    assert!(added.success(), "rustup target add wasm32-wasip1: {added}");
    true
}

//! Helpers of switchyard's own tests, shared by every crate's integration tests: the brokers
//! they run against (the embedded Kafka-protocol broker; a second, independent Kafka-protocol
//! broker, [`second_kafka`]; Google's Pub/Sub emulator, started once per test binary), names
//! no other test uses, waiting for a condition with a deadline instead of sleeping, and
//! Cargo's dependency graph ([`cargo_tree`]), and running a program with a time limit
//! ([`process::output_within`]).
//!
//! Every helper talks to a real broker over a real connection; none stands in for one. They
//! panic on failure, as a test should.
#![deny(missing_docs)]

pub mod cargo_tree;
pub mod process;
pub mod second_kafka;
pub use second_kafka::{SecondKafka, TANSU_VERSION, TansuDefect, second_kafka};

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use switchyard_broker::kafka::{EmbeddedKafka, Kafka};
use switchyard_broker::pubsub::{PubSub, PubSubConfig, PubSubEmulator};
use switchyard_broker::{
    Broker, Delivery, OutgoingMessage, StartPosition, Subscriber, SubscriptionSpec, TopicSpec,
};

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

/// Publishes `payload` to `topic`, with no key and no headers, and waits until it is stored.
pub async fn publish_text(broker: &dyn Broker, topic: &str, payload: &str) {
    let message = OutgoingMessage {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        ..OutgoingMessage::default()
    };
    publish(broker, message).await;
}

/// A member of `group` reading `topic` from its start.
pub async fn member(broker: &dyn Broker, group: &str, topic: &str) -> Arc<dyn Subscriber> {
    broker
        .subscribe(&SubscriptionSpec {
            group: group.into(),
            topics: vec![topic.into()],
            start: StartPosition::Earliest,
            guarantee: Default::default(),
            isolation: Default::default(),
        })
        .await
        .expect("subscribing")
}

/// How long [`receive`] waits for a delivery.
pub const RECEIVE_WITHIN: Duration = Duration::from_secs(30);

/// The next delivery of `member`, failing the test, naming `what` it waited for, when none
/// comes within [`RECEIVE_WITHIN`] or receiving fails.
pub async fn receive(member: &dyn Subscriber, what: &str) -> Delivery {
    tokio::time::timeout(RECEIVE_WITHIN, member.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {RECEIVE_WITHIN:?}"))
        .unwrap_or_else(|e| panic!("receiving {what}: {e}"))
}

/// The payloads (as text, in arrival order) a new group's member reads from `topic`, from its
/// start, until `topic` has been quiet for `quiet`. Each is acknowledged; the member is closed.
/// Reads what the default isolation shows (committed data on Kafka).
pub async fn read_all(broker: &dyn Broker, topic: &str, quiet: Duration) -> Vec<String> {
    let reader = member(broker, &unique("reader"), topic).await;
    let seen = drain(reader.as_ref(), quiet).await;
    reader.close().await.expect("closing the reader");
    seen
}

/// The payloads (as text, in arrival order) `reader` receives until nothing comes for `quiet`;
/// each is acknowledged. On Pub/Sub a reader must subscribe before the messages it is to see
/// are published (a subscription holds only what came after it).
pub async fn drain(reader: &dyn Subscriber, quiet: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(delivery) = tokio::time::timeout(quiet, reader.next()).await {
        let delivery = delivery.expect("receiving");
        seen.push(String::from_utf8_lossy(&delivery.message.payload).into_owned());
        delivery.ack().expect("acknowledging");
    }
    seen
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

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binding a free port")
        .local_addr()
        .expect("the bound address")
        .port()
}

/// Keeps `port` of 127.0.0.1 bound but not listening, until dropped: a connection to it is
/// refused, as to a port nobody uses, and nothing else can take the port meanwhile (a test that
/// stops a server and starts it again on the same port holds it in between).
pub fn hold_port(port: u16) -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    // The port's last connections may linger in TIME_WAIT, which only a reusable bind passes.
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap_or_else(|e| panic!("holding port {port}: {e}"));
    socket
}

/// Everything switchyard logs from the first call on (as `RUST_LOG` says; by default
/// switchyard's and rdkafka's lines at `info`), as text a test can wait on; also echoed to
/// standard error. Every call of a test binary shares the one log.
pub fn capture_logs() -> tokio::sync::watch::Receiver<String> {
    static LOG: OnceLock<tokio::sync::watch::Receiver<String>> = OnceLock::new();
    LOG.get_or_init(start_capturing_logs).clone()
}

fn start_capturing_logs() -> tokio::sync::watch::Receiver<String> {
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

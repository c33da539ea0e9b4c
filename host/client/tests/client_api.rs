//! Proves that the unified Rust API (`switchyard-client`) behaves the same on both backends,
//! over real connections: the embedded Kafka broker, a second and independent Kafka-protocol
//! broker (Tansu, or the cluster `KAFKA_BOOTSTRAP` names; see
//! `switchyard_testing::second_kafka`) and Google's Pub/Sub emulator (started by this test
//! binary). Values round-trip through each serializer with its content type recorded;
//! a consumer reads a payload by its content type whatever its own serializer; `consume()` is a
//! stream with explicit acknowledgement; a nack brings the message back; `auto_ack` settles on
//! receipt so a restarted member does not see the message again; and an incomplete
//! configuration or a value the serializer cannot write is a clear error, not a panic. A
//! serializer of the user's own (Protobuf through prost) plugs into producers and consumers, and
//! a payload of a format the consumer does not read is refused naming its content type.

use switchyard_testing as support;

use std::time::Duration;

use futures::StreamExt;
use switchyard_client::{
    Bytes, Client, ClientConfig, ClientError, Json, SerializerError, Text, ValueSerializer,
};

const WAIT: Duration = Duration::from_secs(30);

/// A backend under test: the broker URL clients connect to, and what keeps its broker alive.
struct Backend {
    name: String,
    url: String,
    _keep: Option<support::SecondKafka>,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// The embedded Kafka broker, which lives inside each `Client`.
fn embedded() -> Backend {
    Backend {
        name: "kafka (embedded)".into(),
        url: "embedded".into(),
        _keep: None,
    }
}

/// The second Kafka broker, `None` (said on standard error) without one.
fn second_kafka(test: &str) -> Option<Backend> {
    let second = support::second_kafka(test)?;
    Some(Backend {
        name: format!("kafka ({})", second.name),
        url: second.url(),
        _keep: Some(second),
    })
}

/// The Pub/Sub emulator.
async fn pubsub() -> Backend {
    let endpoint = tokio::task::spawn_blocking(support::emulator_endpoint)
        .await
        .unwrap();
    Backend {
        name: "pubsub".into(),
        url: format!("pubsub://switchyard-test?endpoint={endpoint}&anonymous=true"),
        _keep: None,
    }
}

async fn client(backend: &Backend, serializer: ValueSerializer, auto_ack: bool) -> Client {
    let mut config = ClientConfig::new(&backend.url).unwrap();
    config.topic = Some(support::unique("client"));
    config.group = Some(support::unique("readers"));
    config.serializer = serializer;
    config.auto_ack = auto_ack;
    Client::connect(&config).await.unwrap()
}

async fn values_round_trip_through_every_serializer(backend: &Backend) {
    let client = client(backend, ValueSerializer::Json, true).await;
    let topic = client.config().topic.clone().unwrap();
    let consumer = client.consumer().await.unwrap();
    let producer = client.producer().await.unwrap();

    producer
        .produce(
            &serde_json::json!({"label": 9, "name": "ankle boot"}),
            &topic,
        )
        .await
        .unwrap();
    // Producers with the other built-in serializers, on the same connection.
    let text = client.producer_with(Text).await.unwrap();
    text.produce("sneaker", &topic).await.unwrap();
    let bytes = client.producer_with(Bytes).await.unwrap();
    bytes
        .produce(&[0u8, 1, 254, 255][..], &topic)
        .await
        .unwrap();

    let mut stream = Box::pin(consumer.consume());
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let received = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("a message within the wait")
            .expect("the stream is open")
            .unwrap();
        seen.push((
            received.content_type().map(str::to_owned),
            received.payload().to_vec(),
        ));
        match received.content_type() {
            Some("application/json") => {
                let value: serde_json::Value = received.value().unwrap();
                assert_eq!(value["name"], "ankle boot", "{backend}");
            }
            Some("text/plain; charset=utf-8") => {
                let value: String = received.value().unwrap();
                assert_eq!(value, "sneaker", "{backend}");
            }
            Some("application/octet-stream") => {
                let value: Vec<u8> = received.value().unwrap();
                assert_eq!(value, vec![0, 1, 254, 255], "{backend}");
            }
            other => panic!("{backend}: unexpected content type {other:?}"),
        }
        received.ack().unwrap();
    }
    drop(stream);
    consumer.close().await.unwrap();
    assert_eq!(seen.len(), 3);
}

async fn a_nack_brings_the_value_back(backend: &Backend) {
    let client = client(backend, ValueSerializer::Text, false).await;
    let consumer = client.consumer().await.unwrap();
    let producer = client.producer().await.unwrap();
    producer.produce_default("try again").await.unwrap();

    let first = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.value::<String>().unwrap(), "try again");
    first.nack().unwrap();
    let again = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("{backend}: the nacked message did not come back"))
        .unwrap();
    assert_eq!(again.value::<String>().unwrap(), "try again", "{backend}");
    again.ack().unwrap();
    consumer.close().await.unwrap();
}

async fn auto_ack_settles_on_receipt(backend: &Backend) {
    let client = client(backend, ValueSerializer::Json, true).await;
    let topic = client.config().topic.clone().unwrap();
    let consumer = client.consumer().await.unwrap();
    let producer = client.producer().await.unwrap();
    // One key keeps the order the proof below relies on: a Kafka partition, a Pub/Sub
    // ordering key.
    let keyed = |value: i64| switchyard_client::OutgoingMessage {
        topic: topic.clone(),
        key: Some(b"one-order".to_vec()),
        payload: value.to_string().into_bytes(),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    producer.send(keyed(42)).await.unwrap();

    let received = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received.value::<i64>().unwrap(), 42);
    // Dropped without ack: auto_ack already settled it.
    drop(received);
    consumer.close().await.unwrap();

    // A redelivery of 42 must not come: a restarted member gets the next message of the key
    // first. Had 42 not been settled, it would come before it: Kafka resumes at the committed
    // offset, and Pub/Sub hands out a key's messages in order, an unacknowledged one (nacked
    // when its member closed) first.
    let restarted = client.consumer().await.unwrap();
    producer.send(keyed(43)).await.unwrap();
    let first = tokio::time::timeout(WAIT, restarted.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.value::<i64>().unwrap(),
        43,
        "{backend}: the auto-acknowledged message came back"
    );
    restarted.close().await.unwrap();
}

async fn mistakes_are_clear_errors(backend: &Backend) {
    let mut config = ClientConfig::new(&backend.url).unwrap();
    config.topic = Some(support::unique("client"));
    config.serializer = ValueSerializer::Text;
    let client = Client::connect(&config).await.unwrap();
    let error = client.consumer().await.err().expect("no group is an error");
    assert!(
        error.to_string().contains("needs `group`"),
        "{backend}: {error}"
    );

    let producer = client.producer().await.unwrap();
    let error = producer
        .produce_default(&serde_json::json!({"not": "text"}))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ClientError::Serializer(SerializerError::Serialize { .. })
        ) && error.to_string().contains("use \"json\""),
        "{backend}: {error}"
    );
}

/// The Protobuf example (`cargo run --example protobuf`): its serializer, the types prost
/// generated from its `.proto`, and its `run`.
#[path = "../examples/protobuf/main.rs"]
mod protobuf_example;

use protobuf_example::serializer::Protobuf;
use protobuf_example::shop::{Line, Order};

/// A serializer of one's own (Protobuf) writes and reads through the public API, labelled
/// with its content type; a payload of another format is refused naming that format, and is
/// read with `value_with` and the right deserializer.
async fn a_serializer_of_ones_own_round_trips(backend: &Backend) {
    let client = client(backend, ValueSerializer::Json, false).await;
    let topic = client.config().topic.clone().unwrap();
    let consumer = client
        .consumer_with(Protobuf::<Order>::new())
        .await
        .unwrap();
    let order = Order {
        id: "order-7".into(),
        lines: vec![Line {
            sku: "boot-42".into(),
            quantity: 3,
        }],
    };
    let producer = client
        .producer_with(Protobuf::<Order>::new())
        .await
        .unwrap();
    producer.produce(&order, &topic).await.unwrap();
    // Then a JSON value on the same topic, which a Protobuf reader must not misread.
    let json = client.producer().await.unwrap();
    json.produce(&serde_json::json!({"id": "order-8"}), &topic)
        .await
        .unwrap();

    // Pub/Sub keeps no order between messages without a key: take them as they come.
    for _ in 0..2 {
        let received = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("a message within the wait")
            .unwrap();
        if received.content_type() == Some("application/json") {
            let error = received.value::<Order>().unwrap_err();
            assert!(
                matches!(
                    &error,
                    ClientError::Serializer(SerializerError::UnknownContentType { found, .. })
                        if found == "application/json"
                ),
                "{backend}: {error}"
            );
            assert!(error.to_string().contains("value_with"), "{error}");
            let value: serde_json::Value = received.value_with(&Json).unwrap();
            assert_eq!(value["id"], "order-8", "{backend}");
        } else {
            assert_eq!(
                received.content_type(),
                Some("application/x-protobuf; messageType=shop.Order"),
                "{backend}"
            );
            assert_eq!(received.value::<Order>().unwrap(), order, "{backend}");
        }
        received.ack().unwrap();
    }
    consumer.close().await.unwrap();
}

/// The example itself, as a user runs it: orders come back, the JSON note is refused by the
/// Protobuf reader and read as JSON.
async fn the_protobuf_example_runs(backend: &Backend) {
    let (orders, note) = protobuf_example::run(&backend.url).await.unwrap();
    let ids: Vec<&str> = orders.iter().map(|order| order.id.as_str()).collect();
    assert_eq!(ids, ["order-1", "order-2"], "{backend}");
    assert_eq!(orders[1].lines[0].sku, "sandal-38", "{backend}");
    assert_eq!(note, "ship before noon", "{backend}");
}

/// The example's Rust types are what prost-build makes of its `.proto` today.
/// `UPDATE_GENERATED=1` rewrites them.
#[test]
fn the_protobuf_example_types_are_generated_from_its_proto() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/protobuf");
    let descriptors = protox::compile(["shop.proto"], [&dir]).unwrap();
    let out = tempfile::tempdir().unwrap();
    prost_build::Config::new()
        .enable_type_names()
        .out_dir(out.path())
        .compile_fds(descriptors)
        .unwrap();
    let generated = std::fs::read_to_string(out.path().join("shop.rs")).unwrap();
    let committed = dir.join("shop.rs");
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&committed, &generated).unwrap();
    }
    assert!(
        std::fs::read_to_string(&committed).unwrap() == generated,
        "{} is not what prost-build makes of shop.proto: run `UPDATE_GENERATED=1 cargo test \
         --release --test client_api generated` and commit the result",
        committed.display()
    );
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::embedded()).await;
                }
            )*
        }
        mod second_kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(backend) = super::second_kafka(stringify!($name)) {
                        super::$name(&backend).await;
                    }
                }
            )*
        }
        mod pubsub {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::pubsub().await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    values_round_trip_through_every_serializer,
    a_nack_brings_the_value_back,
    auto_ack_settles_on_receipt,
    mistakes_are_clear_errors,
    a_serializer_of_ones_own_round_trips,
    the_protobuf_example_runs,
);

/// The configuration reads from TOML with a typed broker section, as the manifest's.
#[test]
fn a_typed_broker_section_configures_the_client() {
    let config: ClientConfig = toml::from_str(
        r#"
        topic = "requests"
        group = "classifier"
        serializer = "bytes"
        start = "latest"
        auto_ack = false

        [broker.pubsub]
        project = "my-project"
        create_resources = false
        "#,
    )
    .unwrap();
    assert_eq!(config.serializer, ValueSerializer::Bytes);
    assert!(matches!(
        config.broker,
        switchyard_client::BrokerConfig::Pubsub(ref pubsub) if pubsub.project == "my-project"
    ));
    let typo = toml::from_str::<ClientConfig>("broker = \"embedded\"\ngroup_id = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(typo.contains("group_id"), "{typo}");
}

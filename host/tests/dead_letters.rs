//! Proves the failure path, the same on both backends (the embedded Kafka broker and Google's
//! Pub/Sub emulator, over real connections), with the test handler (components/test-handler):
//! a message whose handler returns an error, traps, or cannot even parse it, through its last
//! attempt, is written to `<topic>.dlq` with its payload, key, headers and content type, plus
//! the error, the component and its version, the group, the attempt count and the original
//! topic and position; a good message beside them is handled and not dead-lettered. On
//! Kafka, the originals are settled: a new member of the group starts after them. (The
//! emulator may deliver an acknowledged message again, so there the settlement is the
//! conformance suite's ack promise, not re-checked here.)
//!
//! A dead letter the broker refuses (a wrapper around the real publisher refuses `.dlq`
//! topics) leaves its original unsettled: nothing counts as given up, writing it is tried
//! again, and once the handler stops, the next member of the group receives the original. With
//! `dead_letter = false` a failed message is dropped, counted, and settled.
//!
//! Poison requests reach the real classifier (random bytes, an empty payload, a wrong size, no
//! `request-id` header, a content type it does not read, and on Pub/Sub a 5 MB payload, which
//! Kafka's producers refuse at 1 MB): each ends in `requests.dlq` with the reason the
//! classifier gave, on both backends, while a good request beside them is answered.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchyard_broker::dead_letter as dlq;
use switchyard_broker::{
    Broker, BrokerError, DeliveryReceipt, OutgoingMessage, Publisher, Subscriber, SubscriptionSpec,
    TopicSpec,
};
use switchyard_runtime::manifest::{ComponentConfig, DeadLetter, RetryPolicy};
use switchyard_runtime::{Runtime, RuntimeOptions};

const WAIT: Duration = Duration::from_secs(60);

fn handler(topic: &str, group: &str) -> ComponentConfig {
    ComponentConfig {
        subscribe: vec![topic.into()],
        group: Some(group.into()),
        retry: RetryPolicy {
            max_attempts: 2,
            backoff_ms: 10,
        },
        ..ComponentConfig::new(support::test_handler())
    }
}

async fn send(broker: &dyn Broker, topic: &str, key: &str, payload: &[u8]) {
    let message = OutgoingMessage {
        topic: topic.into(),
        key: Some(key.as_bytes().to_vec()),
        payload: payload.to_vec(),
        headers: vec![("request-id".into(), key.into())],
        content_type: Some("text/plain".into()),
    };
    support::publish(broker, message).await;
}

async fn failed_messages_go_to_the_dead_letter_topic_with_their_reasons(
    backend: &str,
    broker: Arc<dyn Broker>,
) {
    let (topic, group) = (support::unique("work"), support::unique("g"));
    support::create_topics(broker.as_ref(), &[&topic]).await;
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let loaded = runtime.load("tester", &handler(&topic, &group)).unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();
    running.joined().await.unwrap();
    let poison: &[(&str, &[u8])] = &[
        ("returns-error", b"error"),
        ("traps", b"trap"),
        ("random-bytes", &[0xff, 0x00, 0x13, 0x37, 0xfe]),
        ("empty", b""),
    ];
    for (key, payload) in poison {
        send(broker.as_ref(), &topic, key, payload).await;
    }
    send(broker.as_ref(), &topic, "fine", b"ok").await;

    // The host created the dead-letter topic (on Pub/Sub with a subscription of its name,
    // which `switchyard consume -t TOPIC` reads by default): read it there.
    let dead_letter_topic = format!("{topic}.dlq");
    let reader = support::member(broker.as_ref(), &dead_letter_topic, &dead_letter_topic).await;
    let mut letters = BTreeMap::new();
    while letters.len() < poison.len() {
        let letter = tokio::time::timeout(WAIT, reader.next())
            .await
            .unwrap_or_else(|_| panic!("{backend}: dead letters so far: {letters:?}"))
            .unwrap();
        let key = String::from_utf8(letter.message.key.clone().unwrap()).unwrap();
        letters.insert(key, letter.message.clone());
        letter.ack().unwrap();
    }
    reader.close().await.unwrap();
    assert!(!letters.contains_key("fine"), "{backend}: {letters:?}");
    for (key, payload) in poison {
        let letter = &letters[*key];
        let header = |name: &str| {
            letter
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{backend}: {key}: no {name} in {letter:?}"))
        };
        assert_eq!(letter.payload, *payload, "{backend}: {key}");
        assert_eq!(letter.content_type.as_deref(), Some("text/plain"));
        assert_eq!(header("request-id"), *key);
        assert_eq!(header(dlq::TOPIC), topic);
        assert_eq!(header(dlq::COMPONENT), "tester");
        assert_eq!(header(dlq::VERSION), loaded.version());
        assert_eq!(header(dlq::GROUP), group);
        assert_eq!(header(dlq::ATTEMPTS), "2", "{backend}: {key}");
        assert!(!header(dlq::POSITION).is_empty());
        let error = header(dlq::ERROR);
        let expected = match *key {
            "returns-error" => "asked to fail",
            "traps" => "trapped",
            _ => "unknown command",
        };
        assert!(error.contains(expected), "{backend}: {key}: {error}");
    }

    let stats = Arc::clone(running.stats());
    let settled = poison.len() as u64 + 1;
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= settled))
        .await
        .expect("every message settled")
        .unwrap();
    assert_eq!(stats.snapshot().handled, 1, "{backend}");
    assert_eq!(stats.snapshot().gave_up, poison.len() as u64);
    assert_eq!(stats.snapshot().dead_lettered, poison.len() as u64);
    // Twice alone, and once more if it came in a batch with others (which are then handled
    // one by one without being charged an attempt).
    let traps = stats.snapshot().traps;
    assert!((2..=3).contains(&traps), "{backend}: {traps} traps");
    running.stop().await.unwrap();

    if backend == "kafka" {
        send(broker.as_ref(), &topic, "marker", b"marker").await;
        let next = support::member(broker.as_ref(), &group, &topic).await;
        let first = tokio::time::timeout(WAIT, next.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            first.message.payload, b"marker",
            "the originals were settled"
        );
        next.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_failed_messages_go_to_the_dead_letter_topic_with_their_reasons() {
    let (_cluster, broker) = support::embedded().await;
    failed_messages_go_to_the_dead_letter_topic_with_their_reasons("kafka", broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_failed_messages_go_to_the_dead_letter_topic_with_their_reasons() {
    let broker = support::pubsub().await;
    failed_messages_go_to_the_dead_letter_topic_with_their_reasons("pubsub", broker).await;
}

/// The real broker, except that its publisher refuses every dead letter.
struct RefusesDeadLetters {
    inner: Arc<dyn Broker>,
    refused: Arc<tokio::sync::watch::Sender<u64>>,
}

struct RefusingPublisher {
    inner: Arc<dyn Publisher>,
    refused: Arc<tokio::sync::watch::Sender<u64>>,
}

#[async_trait]
impl Broker for RefusesDeadLetters {
    fn describe(&self) -> String {
        format!("{} (refusing dead letters)", self.inner.describe())
    }

    fn messaging_system(&self) -> &'static str {
        self.inner.messaging_system()
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BrokerError> {
        self.inner.ensure_topics(topics).await
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>, BrokerError> {
        Ok(Arc::new(RefusingPublisher {
            inner: self.inner.publisher().await?,
            refused: self.refused.clone(),
        }))
    }

    async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<Arc<dyn Subscriber>, BrokerError> {
        self.inner.subscribe(spec).await
    }
}

#[async_trait]
impl Publisher for RefusingPublisher {
    async fn publish(&self, message: OutgoingMessage) -> Result<DeliveryReceipt, BrokerError> {
        if message.topic.ends_with(".dlq") {
            self.refused.send_modify(|n| *n += 1);
            return Ok(DeliveryReceipt::new(Box::pin(async {
                Err(BrokerError::rejected(
                    "injected: the dead letter is refused",
                ))
            })));
        }
        self.inner.publish(message).await
    }

    async fn flush(&self, timeout: Duration) -> Result<(), BrokerError> {
        self.inner.flush(timeout).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_leaves_the_original_unsettled_for_the_next_member() {
    let (_cluster, real) = support::embedded().await;
    let (topic, group) = (support::unique("work"), support::unique("g"));
    support::create_topics(real.as_ref(), &[&topic]).await;
    let refused = Arc::new(tokio::sync::watch::channel(0).0);
    let broker: Arc<dyn Broker> = Arc::new(RefusesDeadLetters {
        inner: real.clone(),
        refused: refused.clone(),
    });
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let loaded = runtime.load("tester", &handler(&topic, &group)).unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();
    send(real.as_ref(), &topic, "doomed", b"error").await;

    // Refused twice: the host keeps trying, and meanwhile has not settled the original.
    tokio::time::timeout(WAIT, refused.subscribe().wait_for(|n| *n >= 2))
        .await
        .expect("the dead letter is tried again")
        .unwrap();
    let stats = Arc::clone(running.stats());
    assert_eq!(stats.snapshot().gave_up, 0);
    assert_eq!(stats.snapshot().dead_lettered, 0);
    assert_eq!(*stats.settled().borrow(), 0);
    tokio::time::timeout(WAIT, running.stop())
        .await
        .expect("stopping does not wait for the refused dead letter")
        .unwrap();

    let next = support::member(real.as_ref(), &group, &topic).await;
    let again = tokio::time::timeout(WAIT, next.next())
        .await
        .expect("the original is delivered again")
        .unwrap();
    assert_eq!(again.message.payload, b"error");
    next.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dead_letters_off_a_failed_message_is_dropped_and_settled() {
    let (_cluster, broker) = support::embedded().await;
    let (topic, group) = (support::unique("work"), support::unique("g"));
    support::create_topics(broker.as_ref(), &[&topic]).await;
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let config = ComponentConfig {
        dead_letter: DeadLetter::Off,
        ..handler(&topic, &group)
    };
    let loaded = runtime.load("tester", &config).unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();
    send(broker.as_ref(), &topic, "doomed", b"error").await;
    let stats = Arc::clone(running.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 1))
        .await
        .expect("the message is given up on")
        .unwrap();
    assert_eq!(stats.snapshot().gave_up, 1);
    assert_eq!(stats.snapshot().dead_lettered, 0);
    running.stop().await.unwrap();

    send(broker.as_ref(), &topic, "marker", b"marker").await;
    let next = support::member(broker.as_ref(), &group, &topic).await;
    let first = tokio::time::timeout(WAIT, next.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.message.payload, b"marker",
        "the dropped message was settled"
    );
    next.close().await.unwrap();
}

async fn poison_requests_end_in_the_dead_letter_topic(backend: &str, broker: Arc<dyn Broker>) {
    let (requests, predictions, group) = (
        support::unique("requests"),
        support::unique("predictions"),
        support::unique("classifier"),
    );
    support::create_topics(broker.as_ref(), &[&requests, &predictions]).await;
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let retry = RetryPolicy {
        max_attempts: 2,
        backoff_ms: 10,
    };
    let loaded = runtime
        .load(
            "classifier",
            &support::classifier(&requests, &predictions, &group, retry),
        )
        .unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();
    running.joined().await.unwrap();
    // Before anything is published: a Pub/Sub subscription receives only what comes after it.
    let answers = support::member(broker.as_ref(), &support::unique("reader"), &predictions).await;
    let request =
        |key: &str, payload: Vec<u8>, headers: &[(&str, &str)], content_type: Option<&str>| {
            OutgoingMessage {
                topic: requests.clone(),
                key: Some(key.as_bytes().to_vec()),
                payload,
                headers: headers
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_string()))
                    .collect(),
                content_type: content_type.map(String::from),
            }
        };
    let random: Vec<u8> = (0..1000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut poison = vec![
        (
            request("random-bytes", random, &[("request-id", "r1")], None),
            "has 1000 bytes",
        ),
        (
            request("empty", Vec::new(), &[("request-id", "r2")], None),
            "has 0 bytes",
        ),
        (
            request("wrong-size", vec![1; 783], &[("request-id", "r3")], None),
            "783",
        ),
        (
            request("no-request-id", vec![3; 784], &[], None),
            "request-id",
        ),
        (
            request(
                "png",
                vec![4; 784],
                &[("request-id", "r6")],
                Some("image/png"),
            ),
            "image/png",
        ),
    ];
    if backend == "pubsub" {
        // Kafka's producers refuse it themselves (librdkafka's and a cluster's
        // `message.max.bytes` default to 1 MB), so it can reach a handler only on Pub/Sub.
        poison.push((
            request("five-mb", vec![2; 5_000_000], &[("request-id", "r4")], None),
            "has 5000000 bytes",
        ));
    }
    for (message, _) in &poison {
        support::publish(broker.as_ref(), message.clone()).await;
    }
    support::publish(
        broker.as_ref(),
        request("good", vec![0; 784], &[("request-id", "good")], None),
    )
    .await;

    let dead_letter_topic = format!("{requests}.dlq");
    let reader = support::member(broker.as_ref(), &dead_letter_topic, &dead_letter_topic).await;
    let mut letters = BTreeMap::new();
    while letters.len() < poison.len() {
        let letter = tokio::time::timeout(WAIT, reader.next())
            .await
            .unwrap_or_else(|_| panic!("{backend}: dead letters so far: {:?}", letters.keys()))
            .unwrap();
        let key = String::from_utf8(letter.message.key.clone().unwrap()).unwrap();
        letters.insert(key, letter.message.clone());
        letter.ack().unwrap();
    }
    reader.close().await.unwrap();
    for (message, reason) in &poison {
        let key = String::from_utf8(message.key.clone().unwrap()).unwrap();
        let letter = &letters[&key];
        assert_eq!(
            letter.payload.len(),
            message.payload.len(),
            "{backend}: {key}"
        );
        assert!(
            letter.payload == message.payload,
            "{backend}: {key}: payload changed"
        );
        let error = letter
            .headers
            .iter()
            .find(|(name, _)| name == dlq::ERROR)
            .map(|(_, error)| error.as_str())
            .unwrap_or_default();
        assert!(error.contains(reason), "{backend}: {key}: {error}");
    }

    let answer = tokio::time::timeout(WAIT, answers.next())
        .await
        .expect("the good request is answered")
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&answer.message.payload).unwrap();
    assert_eq!(body["request_id"], "good", "{backend}");
    answer.ack().unwrap();
    answers.close().await.unwrap();
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_poison_requests_end_in_the_dead_letter_topic() {
    let (_cluster, broker) = support::embedded().await;
    poison_requests_end_in_the_dead_letter_topic("kafka", broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_poison_requests_end_in_the_dead_letter_topic() {
    let broker = support::pubsub().await;
    poison_requests_end_in_the_dead_letter_topic("pubsub", broker).await;
}

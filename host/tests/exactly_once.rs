//! Proves exactly-once handlers (`delivery = "exactly-once"` in a manifest entry) with the
//! test handler (components/test-handler) over real connections, on the second Kafka-protocol
//! broker (Tansu, or the cluster `KAFKA_BOOTSTRAP` names), the one broker here that keeps the
//! offsets a transaction commits:
//! - what a failed attempt sent is never seen: only the attempt that succeeded has outputs,
//!   where an at-least-once handler's failed attempts each publish theirs (handler_delivery.rs
//!   shows "1", "2", "3" for the same message);
//! - a dead letter commits with its original's acknowledgement;
//! - a batch commits as a whole: calls share messages, and when one of a call's messages fails
//!   the call commits nothing and its other messages go again alone, so every output is seen
//!   once;
//! - the outputs commit with the group's offsets: the next host of the group starts after the
//!   messages handled, and receives only what came since;
//! - the brokers that cannot keep the promise refuse to start the handler, saying why: the
//!   embedded broker (librdkafka's mock cluster stores no transactional offsets) and Pub/Sub
//!   (no transaction takes a publish and an acknowledgement together).

mod support;

use std::sync::Arc;
use std::time::Duration;

use switchyard_broker::kafka::Kafka;
use switchyard_broker::{Broker, ErrorKind, OutgoingMessage, Subscriber};
use switchyard_runtime::manifest::{ComponentConfig, DeliveryGuarantee, RetryPolicy};
use switchyard_runtime::{Runtime, RuntimeError, RuntimeOptions};

const WAIT: Duration = Duration::from_secs(60);

fn exactly_once(input: &str, output: &str, group: &str, retry: RetryPolicy) -> ComponentConfig {
    ComponentConfig {
        subscribe: vec![input.into()],
        group: Some(group.into()),
        publish: vec![output.into()],
        retry,
        delivery: DeliveryGuarantee::ExactlyOnce,
        ..ComponentConfig::new(support::test_handler())
    }
}

async fn send(broker: &dyn Broker, topic: &str, payload: &str) {
    let message = OutgoingMessage {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        ..OutgoingMessage::default()
    };
    support::publish(broker, message).await;
}

/// Everything a reader of `topic` (reading committed data, librdkafka's default) receives
/// until `topic` has been quiet for a few seconds.
async fn read_all(reader: &dyn Subscriber) -> Vec<String> {
    let mut seen = Vec::new();
    while let Ok(delivery) = tokio::time::timeout(Duration::from_secs(8), reader.next()).await {
        let delivery = delivery.unwrap();
        seen.push(String::from_utf8_lossy(&delivery.message.payload).into_owned());
        delivery.ack().unwrap();
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_attempt_that_succeeded_is_seen_and_the_next_host_starts_after_it() {
    let Some(second) = support::second_kafka("exactly_once_handlers") else {
        return;
    };
    let broker: Arc<dyn Broker> = Arc::new(Kafka::connect(second.kafka_config()).await.unwrap());
    let (input, output) = (support::unique("in"), support::unique("out"));
    let dead_letters = format!("{input}.dlq");
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let group = support::unique("g");
    let retry = RetryPolicy {
        max_attempts: 3,
        backoff_ms: 10,
    };
    let config = exactly_once(&input, &output, &group, retry);
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let loaded = runtime.load("exactly-once", &config).unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();
    running.joined().await.unwrap();

    // Sends its attempt number each time, and fails until the third.
    send(broker.as_ref(), &input, &format!("attempt {output} 3")).await;
    // Fails all three attempts: a dead letter.
    send(broker.as_ref(), &input, "error").await;
    let stats = Arc::clone(running.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 2))
        .await
        .expect("both messages settled")
        .unwrap();
    assert_eq!(stats.snapshot().handled, 1);
    running.stop().await.unwrap();

    let reader = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    assert_eq!(
        read_all(reader.as_ref()).await,
        ["3"],
        "the failed attempts' outputs were dropped"
    );
    reader.close().await.unwrap();
    let dead = support::member(broker.as_ref(), &support::unique("dead"), &dead_letters).await;
    let letters = read_all(dead.as_ref()).await;
    assert_eq!(letters, ["error"], "the dead letter committed");
    dead.close().await.unwrap();

    // The next host of the group: the two messages are behind the committed offsets, so it
    // handles only what is sent now.
    send(broker.as_ref(), &input, &format!("echo {output}")).await;
    let next = runtime.start_handler(&loaded).await.unwrap();
    let stats = Arc::clone(next.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 1))
        .await
        .expect("the new message settled")
        .unwrap();
    // Anything redelivered would settle too: give it the time to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    next.stop().await.unwrap();
    let counts = stats.snapshot();
    assert_eq!(
        (counts.handled, counts.retried),
        (1, 0),
        "only the new message"
    );
    let reader = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    assert_eq!(
        read_all(reader.as_ref()).await,
        ["3", &format!("echo {output}")]
    );
    reader.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_commits_as_a_whole_and_its_outputs_are_seen_once() {
    let Some(second) = support::second_kafka("exactly_once_batches") else {
        return;
    };
    let broker: Arc<dyn Broker> = Arc::new(Kafka::connect(second.kafka_config()).await.unwrap());
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let retry = RetryPolicy {
        max_attempts: 1,
        backoff_ms: 10,
    };
    let config = ComponentConfig {
        batch: 8,
        batch_max_wait_ms: 1_000,
        ..exactly_once(&input, &output, &support::unique("g"), retry)
    };
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let loaded = runtime.load("exactly-once-batches", &config).unwrap();
    assert!(loaded.takes_batches());
    let running = runtime.start_handler(&loaded).await.unwrap();
    running.joined().await.unwrap();

    // Sent at once, so they share calls: "batch" answers with its call's size, "error" fails
    // (and, one attempt allowed, becomes a dead letter), the echoes answer with themselves.
    for payload in ["batch", "batch", "batch"] {
        send(broker.as_ref(), &input, &format!("{payload} {output}")).await;
    }
    let stats = Arc::clone(running.stats());
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 3))
        .await
        .expect("the batch settled")
        .unwrap();
    for payload in [
        "echo {output} a",
        "echo {output} b",
        "error",
        "echo {output} c",
    ] {
        send(
            broker.as_ref(),
            &input,
            &payload.replace("{output}", &output),
        )
        .await;
    }
    tokio::time::timeout(WAIT, stats.settled().wait_for(|n| *n >= 7))
        .await
        .expect("the second batch settled")
        .unwrap();
    running.stop().await.unwrap();
    assert_eq!(stats.snapshot().handled, 6);

    let reader = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    let mut seen = read_all(reader.as_ref()).await;
    reader.close().await.unwrap();
    let sizes: Vec<usize> = seen
        .iter()
        .filter_map(|payload| payload.parse().ok())
        .collect();
    // Each message answers with its call's size: a call of n gives n answers "n".
    assert_eq!(sizes.len(), 3, "one answer per message: {seen:?}");
    for size in &sizes {
        let answers = sizes.iter().filter(|other| *other == size).count();
        assert_eq!(answers % size, 0, "whole calls only: {sizes:?}");
    }
    assert!(
        sizes.iter().any(|&size| size > 1),
        "calls shared: {sizes:?}"
    );
    seen.retain(|payload| payload.parse::<usize>().is_err());
    seen.sort();
    assert_eq!(
        seen,
        ["a", "b", "c"].map(|name| format!("echo {output} {name}")),
        "each echo once, although its first call failed with \"error\" and committed nothing"
    );
}

/// Starting an exactly-once handler on `broker` fails; the error says why.
async fn refused(broker: Arc<dyn Broker>) -> RuntimeError {
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let config = exactly_once(
        &input,
        &output,
        &support::unique("g"),
        RetryPolicy::default(),
    );
    let runtime = Runtime::new(broker, RuntimeOptions::default())
        .await
        .unwrap();
    let loaded = runtime.load("exactly-once", &config).unwrap();
    match runtime.start_handler(&loaded).await {
        Ok(_) => panic!("an exactly-once handler started where it cannot be exactly-once"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_and_pubsub_refuse_exactly_once_handlers() {
    let (_cluster, embedded) = support::embedded().await;
    let error = refused(embedded).await;
    let RuntimeError::Broker(broker_error) = &error else {
        panic!("a broker error: {error:#}");
    };
    assert_eq!(broker_error.kind(), ErrorKind::Config, "{error:#}");
    assert!(error.to_string().contains("transaction"), "{error:#}");

    let error = refused(support::pubsub().await).await;
    let RuntimeError::Broker(broker_error) = &error else {
        panic!("a broker error: {error:#}");
    };
    assert_eq!(broker_error.kind(), ErrorKind::Config, "{error:#}");
    assert!(error.to_string().contains("transaction"), "{error:#}");
}

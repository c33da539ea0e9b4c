//! Proves the host rides out a misbehaving Kafka broker and loses nothing, with faults injected
//! through the embedded broker's own fault injection (librdkafka's mock cluster): responses
//! delayed by 300 ms, retriable errors answering produce, fetch, heartbeat and commit
//! requests, and the broker down for 3 s and back up, all while messages flow. A handler
//! (the test handler's `echo`) forwards each of 300 numbered messages from one topic to
//! another; every number arrives on the other side, the handler never gives up on one, and the
//! test prints how long the whole run took and how many came twice. A refusal (an
//! authorization failure) keeps its kind and code.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::types::RDKafkaErrorCode;
use switchyard_broker::kafka::embedded::ApiKey;
use switchyard_broker::{Broker, ErrorKind, OutgoingMessage};
use switchyard_runtime::manifest::{ComponentConfig, RetryPolicy};
use switchyard_runtime::{Runtime, RuntimeOptions};

const MESSAGES: usize = 300;
/// How long the broker stays down.
const OUTAGE: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_loses_nothing_through_delays_request_errors_and_a_broker_outage() {
    let log = support::capture_logs();
    let (cluster, broker) = support::embedded().await;
    let (input, output, group) = (
        support::unique("in"),
        support::unique("out"),
        support::unique("g"),
    );
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let config = ComponentConfig {
        subscribe: vec![input.clone()],
        group: Some(group),
        publish: vec![output.clone()],
        // A send the broker refuses fails the call; it is tried again rather than given up.
        retry: RetryPolicy {
            max_attempts: 1_000,
            backoff_ms: 50,
        },
        ..ComponentConfig::new(support::test_handler())
    };
    let loaded = runtime.load("forwarder", &config).unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    handler.joined().await.unwrap();
    let reader = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    let started = Instant::now();

    // The messages go out at about 100 a second while the faults come and go.
    let sending = {
        let broker: Arc<dyn Broker> = broker.clone();
        let input = input.clone();
        let output = output.clone();
        tokio::spawn(async move {
            for number in 0..MESSAGES {
                let message = OutgoingMessage {
                    topic: input.clone(),
                    payload: format!("echo {output} {number}").into_bytes(),
                    ..OutgoingMessage::default()
                };
                support::publish(broker.as_ref(), message).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Each fault comes once the handler has got through a further share of the messages, so
    // every one of them meets messages in flight.
    let mut settled = handler.stats().settled();
    let mut after = async |count: u64| {
        tokio::time::timeout(WAIT, settled.wait_for(|n| *n >= count))
            .await
            .unwrap_or_else(|_| panic!("{count} messages handled"))
            .unwrap();
    };
    after(30).await;
    cluster.set_round_trip(Duration::from_millis(300));
    after(60).await;
    cluster.set_round_trip(Duration::ZERO);
    let retriable = [
        RDKafkaErrorCode::RequestTimedOut,
        RDKafkaErrorCode::NotLeaderForPartition,
        RDKafkaErrorCode::NotEnoughReplicas,
    ];
    for api in [
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::Heartbeat,
        ApiKey::OffsetCommit,
    ] {
        cluster.fail_requests(api, &retriable);
    }
    after(100).await;
    let logged_before_outage = log.borrow().len();
    cluster.set_down();
    // The outage itself lasts a set time: that is the fault.
    tokio::time::sleep(OUTAGE).await;
    cluster.set_up();
    tokio::time::timeout(WAIT, sending)
        .await
        .expect("every message sent")
        .unwrap();

    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.len() < MESSAGES {
        let delivery = tokio::time::timeout(WAIT, reader.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {MESSAGES} forwarded", seen.len()))
            .unwrap();
        let number = String::from_utf8(delivery.message.payload.clone()).unwrap();
        *seen.entry(number).or_default() += 1;
        delivery.ack().unwrap();
    }
    let took = started.elapsed();
    let twice: usize = seen.values().map(|n| n - 1).sum();
    let outage_log = log.borrow()[logged_before_outage..].to_string();
    let reports: Vec<&str> = outage_log
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    eprintln!(
        "all {MESSAGES} forwarded in {took:?}; {twice} came twice; the outage took {} log \
         lines",
        reports.len()
    );
    // Two subscribers (the handler's and the reader's) and two producers (the handler's and
    // the test's), each reporting an outage once; a summary would come only after 30 s. The
    // outage is reported, though: a log that said nothing would pass the bound too.
    let first_reports: Vec<&str> = reports
        .iter()
        .copied()
        .filter(|line| line.contains("further errors are summarised"))
        .collect();
    assert!(
        !first_reports.is_empty(),
        "the outage is not logged:\n{outage_log}"
    );
    assert!(
        reports.len() <= 4,
        "the outage is logged once per subscriber, not once per error:\n{}",
        reports.join("\n")
    );
    for number in 0..MESSAGES {
        assert!(seen.contains_key(&format!("echo {output} {number}")));
    }
    let stats = handler.stats().clone();
    assert_eq!(stats.snapshot().gave_up, 0, "nothing given up");
    reader.close().await.unwrap();
    handler.stop().await.unwrap();
}

/// A refusal keeps its kind and the broker's code through the broker layer, so a caller can
/// tell a revoked right (fix the ACLs) from an outage (wait) without reading the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusal_keeps_its_kind_and_code() {
    let (cluster, broker) = support::embedded().await;
    let topic = support::unique("acl");
    support::create_topics(broker.as_ref(), &[&topic]).await;
    let publisher = broker.publisher().await.unwrap();
    cluster.fail_requests(
        ApiKey::Produce,
        &[RDKafkaErrorCode::TopicAuthorizationFailed],
    );
    let refused = publisher
        .publish(OutgoingMessage {
            topic: topic.clone(),
            payload: b"x".to_vec(),
            ..OutgoingMessage::default()
        })
        .await
        .unwrap()
        .wait()
        .await
        .expect_err("the broker refuses the produce request");
    assert_eq!(refused.kind(), ErrorKind::PermissionDenied, "{refused:?}");
    assert_eq!(refused.code(), Some("TopicAuthorizationFailed"));
    assert!(!refused.is_transient());
    assert!(
        refused.to_string().contains("ACLs"),
        "the message says the fix: {refused}"
    );
    assert!(
        std::error::Error::source(&refused).is_some(),
        "librdkafka's error is kept: {refused:?}"
    );
}

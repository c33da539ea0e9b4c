//! Proves the host rides out a misbehaving Kafka broker and loses nothing, with faults injected
//! through the embedded broker's own fault injection (librdkafka's mock cluster): responses
//! delayed by 300 ms, retriable errors answering produce, fetch, heartbeat and commit
//! requests, and the broker down for 3 s and back up, all while messages flow. A handler
//! (the test handler's `echo`) forwards each of 300 numbered messages from one topic to
//! another; every number arrives on the other side, the handler never gives up on one, and the
//! test prints how long the whole run took and how many came twice.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::types::RDKafkaErrorCode;
use switchyard::broker::embedded::ApiKey;
use switchyard::broker::{Broker, OutgoingMessage};
use switchyard::config::{ComponentConfig, RetryPolicy};
use switchyard::runtime::{HandlerStats, Runtime, RuntimeOptions};

const MESSAGES: usize = 300;
const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_loses_nothing_through_delays_request_errors_and_a_broker_outage() {
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.set_round_trip(Duration::from_millis(300));
    tokio::time::sleep(Duration::from_secs(1)).await;
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.set_down();
    tokio::time::sleep(Duration::from_secs(3)).await;
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
    eprintln!("all {MESSAGES} forwarded in {took:?}; {twice} came twice");
    for number in 0..MESSAGES {
        assert!(seen.contains_key(&format!("echo {output} {number}")));
    }
    let stats = handler.stats().clone();
    assert_eq!(HandlerStats::get(&stats.gave_up), 0, "nothing given up");
    reader.close().await.unwrap();
    handler.stop().await.unwrap();
}

//! Proves that no component can exhaust the host through the messages it keeps there (outside
//! its own linear memory): with the test handler (components/test-handler) on the embedded
//! broker, a message past `limits.max_message_bytes`, messages holding more than
//! `limits.max_held_mb`, and more than `limits.max_resources` resource-table entries each trap
//! (the WIT gives `message.new` no error to return) with an error that names the limit; a call
//! that sends more than `limits.max_sends_per_call` gets an `error` value from `send` once it
//! is past the cap, and the sends before it go through. Each of these messages ends in the
//! dead-letter topic with that error, and the same host then handles a well-behaved message.
//! Components get no network: a guest's TCP connection and UDP datagram to a socket the test
//! listens on never arrive (its calls fail at once, never hanging the worker), and a DNS
//! lookup fails.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard_broker::dead_letter as dlq;
use switchyard_broker::{Broker, OutgoingMessage};
use switchyard_runtime::manifest::{ComponentConfig, Limits, RetryPolicy};
use switchyard_runtime::{Runtime, RuntimeOptions};

const WAIT: Duration = Duration::from_secs(60);

async fn send(broker: &dyn Broker, topic: &str, key: &str, payload: &str) {
    let message = OutgoingMessage {
        topic: topic.into(),
        key: Some(key.as_bytes().to_vec()),
        payload: payload.as_bytes().to_vec(),
        ..OutgoingMessage::default()
    };
    support::publish(broker, message).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_on_what_a_component_holds_and_sends_cost_it_an_error_never_the_host() {
    let (_cluster, broker) = support::embedded().await;
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
        batch: 1,
        limits: Limits {
            max_message_bytes: 4096,
            max_held_mb: 1,
            max_sends_per_call: 3,
            max_resources: 1000,
            ..Limits::default()
        },
        retry: RetryPolicy {
            max_attempts: 1,
            backoff_ms: 10,
        },
        ..ComponentConfig::new(support::test_handler())
    };
    let loaded = runtime.load("tester", &config).unwrap();
    let running = runtime.start_handler(&loaded).await.unwrap();

    // Something listens where the guest tries to connect and to send, so a sandbox that let
    // the guest through would show up here, not only as some other error.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let tcp_address = listener.local_addr().unwrap();
    let datagrams = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    datagrams.set_nonblocking(true).unwrap();
    let udp_address = datagrams.local_addr().unwrap();
    let cases = [
        (
            "too-big",
            "big 5000".to_string(),
            "limits.max_message_bytes",
        ),
        ("at-the-cap", "big 4000".to_string(), ""),
        (
            "hoards-bytes",
            "hoard 300 4000".to_string(),
            "limits.max_held_mb",
        ),
        (
            "hoards-handles",
            "hoard 2000 1".to_string(),
            "limits.max_resources",
        ),
        ("floods", format!("flood {output} 5"), "sent 3, then"),
        ("tcp", format!("connect {tcp_address}"), "connect: denied"),
        ("udp", format!("udp {udp_address}"), "udp: denied"),
        ("dns", "resolve localhost".to_string(), "resolve: denied"),
    ];
    for (key, command, _) in &cases {
        send(broker.as_ref(), &input, key, command).await;
    }
    send(broker.as_ref(), &input, "fine", &format!("send {output}")).await;

    let dead_letters = support::member(
        broker.as_ref(),
        &support::unique("reader"),
        &format!("{input}.dlq"),
    )
    .await;
    let mut errors = BTreeMap::new();
    let expected = cases.iter().filter(|(_, _, why)| !why.is_empty()).count();
    while errors.len() < expected {
        let letter = tokio::time::timeout(WAIT, dead_letters.next())
            .await
            .unwrap_or_else(|_| panic!("dead letters so far: {errors:?}"))
            .unwrap();
        let message = &letter.message;
        let key = String::from_utf8(message.key.clone().unwrap()).unwrap();
        let error = message
            .headers
            .iter()
            .find(|(name, _)| name == dlq::ERROR)
            .map(|(_, error)| error.clone())
            .unwrap();
        errors.insert(key, error);
        letter.ack().unwrap();
    }
    dead_letters.close().await.unwrap();
    for (key, _, why) in &cases {
        match errors.get(*key) {
            Some(error) => assert!(error.contains(why), "{key}: {error}"),
            None => assert!(why.is_empty(), "{key} was not dead-lettered: {errors:?}"),
        }
    }

    // The flood's first three sends went out, then the well-behaved message's reply.
    let replies = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    let mut payloads = Vec::new();
    while payloads.len() < 4 {
        let reply = tokio::time::timeout(WAIT, replies.next())
            .await
            .unwrap_or_else(|_| panic!("replies so far: {payloads:?}"))
            .unwrap();
        payloads.push(String::from_utf8(reply.message.payload.clone()).unwrap());
        reply.ack().unwrap();
    }
    replies.close().await.unwrap();
    assert_eq!(payloads, ["flood", "flood", "flood", "hello"]);

    let stats = Arc::clone(running.stats());
    tokio::time::timeout(
        WAIT,
        stats.settled().wait_for(|n| *n == cases.len() as u64 + 1),
    )
    .await
    .expect("every message settled")
    .unwrap();
    let nothing = std::io::ErrorKind::WouldBlock;
    let accepted = listener.accept().map(|(_, peer)| peer);
    assert_eq!(
        accepted.map_err(|e| e.kind()),
        Err(nothing),
        "a guest connected"
    );
    let mut buffer = [0u8; 64];
    let received = datagrams.recv_from(&mut buffer).map(|(bytes, _)| bytes);
    assert_eq!(
        received.map_err(|e| e.kind()),
        Err(nothing),
        "a guest's datagram arrived"
    );
    assert_eq!(stats.snapshot().traps, 3, "the three caps on holding");
    assert_eq!(stats.snapshot().handled, 2);
    running.stop().await.unwrap();
}

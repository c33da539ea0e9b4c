//! Proves that a running handler's build can be replaced between messages
//! ([`HandlerGroup::replace`]), on the embedded Kafka broker: while 400 messages stream
//! through, the test handler is swapped for another build of it (the same code with an extra
//! custom section, so another hash); every message is answered exactly once, the answers name
//! the old build and then the new one, every message sent after the swap returned is answered
//! by the new build, and the group never left (no message was delivered twice). A replacement that would need a
//! new subscription is refused and the old build keeps running.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use switchyard::broker::OutgoingMessage;
use switchyard::config::{ComponentConfig, Limits};
use switchyard::runtime::host::SENT_BY_HEADER;
use switchyard::runtime::{HandlerStats, Runtime, RuntimeOptions};

const MESSAGES: usize = 400;

/// A copy of `wasm` with a custom section appended: the same component, another build.
fn another_build(wasm: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let mut bytes = std::fs::read(wasm).unwrap();
    let name = b"switchyard-test-build";
    let payload = b"2";
    let size = 1 + name.len() + payload.len();
    bytes.push(0); // custom section
    bytes.push(u8::try_from(size).unwrap()); // one LEB128 byte: size < 128
    bytes.push(u8::try_from(name.len()).unwrap());
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    let path = dir.join("test_handler_v2.wasm");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_is_replaced_between_messages_and_each_is_answered_once() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let options = RuntimeOptions {
        cache_dir: None,
        ..RuntimeOptions::default()
    };
    let runtime = Runtime::new(broker.clone(), options).await.unwrap();
    let config = ComponentConfig {
        subscribe: vec![input.clone()],
        group: Some(support::unique("g")),
        publish: vec![output.clone()],
        workers: 2,
        limits: Limits::default(),
        ..ComponentConfig::new(support::test_handler())
    };
    let scratch = tempfile::tempdir().unwrap();
    let v2_config = ComponentConfig {
        wasm: another_build(&config.wasm, scratch.path()),
        ..config.clone()
    };
    let v1 = runtime.load("echo", &config).unwrap();
    let v2 = runtime.load("echo", &v2_config).unwrap();
    assert_ne!(v1.version(), v2.version());
    let handler = runtime.start_handler(&v1).await.unwrap();
    handler.joined().await.unwrap();

    let answers = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    let publisher = broker.publisher().await.unwrap();
    let send = |index: usize| OutgoingMessage {
        topic: input.clone(),
        payload: format!("echo {output} {index}").into_bytes(),
        key: Some(index.to_string().into_bytes()),
        ..OutgoingMessage::default()
    };
    for index in 0..MESSAGES / 2 {
        publisher.publish(send(index)).await.unwrap();
    }
    let stats = handler.stats().clone();
    support::wait_until(
        "some messages to be handled by the first build",
        Duration::from_secs(60),
        async || HandlerStats::get(&stats.handled) >= 20,
    )
    .await;
    handler.replace(&v2).await.unwrap();
    for index in MESSAGES / 2..MESSAGES {
        publisher.publish(send(index)).await.unwrap();
    }

    let mut builds: HashMap<String, usize> = HashMap::new();
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut old_build_after_swap = Vec::new();
    while seen.len() < MESSAGES {
        let delivery = tokio::time::timeout(Duration::from_secs(60), answers.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {MESSAGES} answers arrived", seen.len()))
            .unwrap();
        let text = String::from_utf8(delivery.message.payload.clone()).unwrap();
        let index: usize = text.rsplit(' ').next().unwrap().parse().unwrap();
        if !seen.insert(text) {
            duplicates += 1;
        }
        let sent_by = delivery
            .message
            .headers
            .iter()
            .find(|(key, _)| key == SENT_BY_HEADER)
            .map(|(_, value)| value.clone())
            .expect("every answer names its build");
        if index >= MESSAGES / 2 && sent_by.ends_with(v1.version()) {
            old_build_after_swap.push(index);
        }
        *builds.entry(sent_by).or_default() += 1;
        delivery.ack().unwrap();
    }
    let (old, new) = (
        builds
            .get(&format!("echo@{}", v1.version()))
            .copied()
            .unwrap_or(0),
        builds
            .get(&format!("echo@{}", v2.version()))
            .copied()
            .unwrap_or(0),
    );
    assert_eq!(duplicates, 0, "{builds:?}");
    assert_eq!(
        old + new,
        MESSAGES,
        "only the two builds answered: {builds:?}"
    );
    assert!(
        old >= 20,
        "the first build answered before the swap: {builds:?}"
    );
    // Once `replace` returned, every message is handled by the new build.
    assert!(
        old_build_after_swap.is_empty(),
        "the old build answered messages sent after the swap: {old_build_after_swap:?}"
    );
    assert!(new >= MESSAGES / 2, "{builds:?}");

    // A replacement that needs another subscription is refused; the running build stays.
    let elsewhere = ComponentConfig {
        subscribe: vec![support::unique("elsewhere")],
        ..v2_config.clone()
    };
    let elsewhere = runtime.load("echo", &elsewhere).unwrap();
    let refused = handler.replace(&elsewhere).await.unwrap_err().to_string();
    assert!(
        refused.contains("stop it and start the new one"),
        "{refused}"
    );
    handler.stop().await.unwrap();
}

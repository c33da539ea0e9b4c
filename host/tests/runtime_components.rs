//! Proves how the runtime treats components, with the real pipeline components on the
//! embedded broker: compiled components are cached (a second load does not compile); files
//! that are not components, and components in the wrong role, are refused with the fix; a
//! component cannot send to a topic its manifest does not grant; a handler's failing message is
//! not settled while it is being retried (the next group member gets it), and a message the
//! handler gives up on is settled so the partition moves on; a call past its time limit traps,
//! which costs that instance (replaced for the next attempt) and never the host.

mod support;

use std::sync::Arc;
use std::time::Duration;

use switchyard::broker::{Broker, OutgoingMessage, StartPosition, SubscriptionSpec, TopicSpec};
use switchyard::config::{ComponentConfig, Limits, Preopen, RetryPolicy};
use switchyard::runtime::engine::{CacheOutcome, PoolSize};
use switchyard::runtime::{HandlerStats, Runtime, RuntimeError, RuntimeOptions};

fn config(name: &str) -> ComponentConfig {
    ComponentConfig {
        wasm: support::component(name),
        subscribe: Vec::new(),
        group: None,
        start: StartPosition::Earliest,
        publish: Vec::new(),
        workers: 1,
        args: Vec::new(),
        preopens: Vec::new(),
        limits: Limits::default(),
        retry: RetryPolicy::default(),
    }
}

/// Runtime options with the cache at `cache`; tests that do not test the cache share the
/// default one so the classifier is compiled once, not once per test.
fn options(cache: Option<&std::path::Path>) -> RuntimeOptions {
    let defaults = RuntimeOptions::default();
    RuntimeOptions {
        cache_dir: cache.map_or(defaults.cache_dir, std::path::Path::to_path_buf),
        pool: PoolSize {
            instances: 16,
            max_memory_bytes: 256 << 20,
        },
    }
}

fn classifier(topic: &str, out: &str, group: &str, retry: RetryPolicy) -> ComponentConfig {
    ComponentConfig {
        subscribe: vec![topic.into()],
        group: Some(group.into()),
        publish: vec![out.into()],
        args: ["--model", "/models/lenet.onnx", "--predictions-topic", out]
            .map(String::from)
            .to_vec(),
        preopens: vec![Preopen {
            host: support::models(),
            guest: "/models".into(),
            writable: false,
        }],
        retry,
        ..config("classifier")
    }
}

async fn send(broker: &dyn Broker, topic: &str, payload: Vec<u8>, id: &str) {
    let publisher = broker.publisher().await.unwrap();
    publisher
        .publish(OutgoingMessage {
            topic: topic.into(),
            key: None,
            payload,
            headers: vec![("request-id".into(), id.into())],
            content_type: None,
        })
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
}

async fn topics(broker: &dyn Broker, names: &[&str]) {
    let specs: Vec<TopicSpec> = names
        .iter()
        .map(|n| TopicSpec {
            name: n.to_string(),
            partitions: 1,
        })
        .collect();
    broker.ensure_topics(&specs).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiled_component_is_cached_and_loaded_without_compiling() {
    let cache = tempfile::tempdir().unwrap();
    let (_cluster, broker) = support::embedded().await;
    let consumer = ComponentConfig {
        subscribe: vec!["predictions".into()],
        ..config("consumer")
    };
    let first = Runtime::new(broker.clone(), options(Some(cache.path())))
        .await
        .unwrap();
    assert_eq!(
        first.load("consumer", &consumer).unwrap().cache,
        CacheOutcome::Compiled
    );
    drop(first);
    let second = Runtime::new(broker, options(Some(cache.path())))
        .await
        .unwrap();
    let loaded = second.load("consumer", &consumer).unwrap();
    assert_eq!(loaded.cache, CacheOutcome::Hit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_are_not_components_or_do_not_fit_their_role_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, broker) = support::embedded().await;
    let runtime = Runtime::new(broker, options(Some(dir.path())))
        .await
        .unwrap();
    let cases = [
        (b"\0asm\x01\0\0\0".to_vec(), "core WebAssembly module"),
        (b"hello, world".to_vec(), "not a WebAssembly file"),
        (b"\0asm\x0d\0\x01\0garbage".to_vec(), "does not compile"),
    ];
    for (bytes, expected) in cases {
        let path = dir.path().join("bad.wasm");
        std::fs::write(&path, bytes).unwrap();
        let err = runtime
            .load(
                "bad",
                &ComponentConfig {
                    wasm: path,
                    ..config("consumer")
                },
            )
            .err()
            .expect("refused");
        assert!(err.to_string().contains(expected), "{err}");
    }
    // The producer is a command: listing it with `subscribe` is a role mismatch.
    let err = runtime
        .load(
            "producer",
            &ComponentConfig {
                subscribe: vec!["requests".into()],
                ..config("producer")
            },
        )
        .err()
        .expect("refused");
    assert!(matches!(err, RuntimeError::Component { .. }), "{err}");
    assert!(err.to_string().contains("incoming-handler"), "{err}");
    // And a handler is not a command.
    let err = runtime
        .load("consumer", &config("consumer"))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("wasi:cli/run"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_cannot_send_to_a_topic_it_was_not_granted() {
    let (_cluster, broker) = support::embedded().await;
    let runtime = Runtime::new(broker, options(None)).await.unwrap();
    let producer = ComponentConfig {
        publish: vec!["requests".into()],
        args: [
            "--images",
            "/models/t10k-images-idx3-ubyte.gz",
            "--topic",
            "secret",
            "--limit",
            "3",
        ]
        .map(String::from)
        .to_vec(),
        preopens: vec![Preopen {
            host: support::models(),
            guest: "/models".into(),
            writable: false,
        }],
        ..config("producer")
    };
    let loaded = runtime.load("producer", &producer).unwrap();
    let outcome = runtime.run_command(&loaded).await.unwrap();
    assert_eq!(
        outcome.exit_code, 1,
        "the producer reports the refusal and exits 1"
    );
    assert_eq!(outcome.delivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_is_not_settled_while_it_is_retried() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output, group) = (
        support::unique("in"),
        support::unique("out"),
        support::unique("g"),
    );
    topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let endless = RetryPolicy {
        max_attempts: 1_000,
        backoff_ms: 20,
    };
    let loaded = runtime
        .load("classifier", &classifier(&input, &output, &group, endless))
        .unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    send(broker.as_ref(), &input, b"not an image".to_vec(), "bad-1").await;
    let stats = Arc::clone(handler.stats());
    support::wait_until("two failed attempts", Duration::from_secs(60), async || {
        HandlerStats::get(&stats.retries) >= 2
    })
    .await;
    assert_eq!(HandlerStats::get(&stats.handled), 0);
    handler.stop().await.unwrap();

    // The next member of the group gets the message again.
    let next = broker
        .subscribe(&SubscriptionSpec {
            group,
            topics: vec![input],
            start: StartPosition::Earliest,
        })
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(30), next.next())
        .await
        .expect("redelivered within 30 s")
        .unwrap();
    assert_eq!(again.message.payload, b"not an image");
    next.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_message_is_given_up_on_and_the_pipeline_moves_on() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output, group) = (
        support::unique("in"),
        support::unique("out"),
        support::unique("g"),
    );
    topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let quick = RetryPolicy {
        max_attempts: 2,
        backoff_ms: 10,
    };
    let loaded = runtime
        .load("classifier", &classifier(&input, &output, &group, quick))
        .unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    send(broker.as_ref(), &input, b"not an image".to_vec(), "bad-1").await;
    send(broker.as_ref(), &input, vec![0u8; 784], "good-2").await;

    let predictions = broker
        .subscribe(&SubscriptionSpec {
            group: support::unique("reader"),
            topics: vec![output],
            start: StartPosition::Earliest,
        })
        .await
        .unwrap();
    let prediction = tokio::time::timeout(Duration::from_secs(60), predictions.next())
        .await
        .expect("the good request is answered")
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&prediction.message.payload).unwrap();
    assert_eq!(body["request_id"], "good-2");
    predictions.close().await.unwrap();

    let stats = Arc::clone(handler.stats());
    support::wait_until(
        "the bad message to be given up",
        Duration::from_secs(30),
        async || HandlerStats::get(&stats.gave_up) == 1,
    )
    .await;
    assert_eq!(HandlerStats::get(&stats.handled), 1);
    handler.stop().await.unwrap();

    // Both were settled: a new member of the group receives neither.
    send(broker.as_ref(), &input, b"marker".to_vec(), "marker").await;
    let next = broker
        .subscribe(&SubscriptionSpec {
            group,
            topics: vec![input],
            start: StartPosition::Earliest,
        })
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), next.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.message.payload, b"marker");
    next.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_costs_the_instance_not_the_host() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output, group) = (
        support::unique("in"),
        support::unique("out"),
        support::unique("g"),
    );
    topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let retry = RetryPolicy {
        max_attempts: 3,
        backoff_ms: 10,
    };
    // Loading the model on the first message takes far longer than 1 ms, so every attempt
    // runs past the deadline and traps.
    let impatient = ComponentConfig {
        limits: Limits {
            max_call_ms: 1,
            ..Limits::default()
        },
        ..classifier(&input, &output, &group, retry)
    };
    let loaded = runtime.load("classifier", &impatient).unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    send(broker.as_ref(), &input, vec![0u8; 784], "slow-1").await;
    let stats = Arc::clone(handler.stats());
    support::wait_until(
        "the message to be given up",
        Duration::from_secs(60),
        async || HandlerStats::get(&stats.gave_up) == 1,
    )
    .await;
    assert_eq!(
        HandlerStats::get(&stats.traps),
        3,
        "each attempt trapped on a fresh instance"
    );
    assert_eq!(HandlerStats::get(&stats.handled), 0);
    handler.stop().await.unwrap();

    // The host is fine: the same runtime runs a patient classifier on the next message.
    let patient = classifier(&input, &output, &support::unique("g2"), retry);
    let loaded = runtime.load("classifier", &patient).unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    let stats = Arc::clone(handler.stats());
    support::wait_until(
        "the message to be handled",
        Duration::from_secs(60),
        async || HandlerStats::get(&stats.handled) == 1,
    )
    .await;
    handler.stop().await.unwrap();
}

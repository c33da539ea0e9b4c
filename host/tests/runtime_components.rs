//! Proves how the runtime treats components, with the real pipeline components on the
//! embedded broker: compiled components are cached (a second load does not compile), and the
//! cache loads only artifacts it signed (a damaged, planted or foreign-key artifact is compiled
//! again, and a directory others may write is not used); files
//! that are not components, and components in the wrong role, are refused with the fix; a
//! component cannot send to a topic its manifest does not grant, and its sandbox lets it read
//! its preopens (read-only ones without writing) and nothing else: no other file, no
//! environment variable; a handler's failing message is
//! not settled while it is being retried (the next group member gets it), and a message the
//! handler gives up on is settled so the partition moves on. With the test handler
//! (components/test-handler): an instance is reused message after message; a trap, a call past
//! its time limit (spinning in Wasm, or sleeping in a host call) or a memory grab past its
//! limit costs that one instance, which is replaced,
//! never the host. Messages that are waiting reach a batch-taking component together, never more
//! than its `batch`, each with its own outcome; a trap in a batch costs only the message that
//! caused it. A model the host's `wasi:nn` cannot load reaches the classifier as an error
//! value: the request is given up on, no instance traps. Every message a component sends names
//! the component and the build that sent it, whatever metadata the component set.

mod support;

use std::sync::Arc;
use std::time::Duration;

use switchyard_broker::OutgoingMessage;
use switchyard_runtime::SENT_BY_HEADER;
use switchyard_runtime::engine::{CacheOutcome, PoolSize};
use switchyard_runtime::manifest::{ComponentConfig, Limits, Preopen, RetryPolicy};
use switchyard_runtime::nn::NnEngine;
use switchyard_runtime::{Runtime, RuntimeError, RuntimeOptions};

fn config(name: &str) -> ComponentConfig {
    ComponentConfig::new(support::component(name))
}

/// Runtime options with the cache at `cache`; tests that do not test the cache share the
/// default one so the classifier is compiled once, not once per test.
fn options(cache: Option<&std::path::Path>) -> RuntimeOptions {
    let defaults = RuntimeOptions::default();
    RuntimeOptions {
        cache_dir: cache.map_or(defaults.cache_dir, |dir| Some(dir.to_path_buf())),
        pool: PoolSize {
            instances: 16,
            max_memory_bytes: 256 << 20,
        },
        ..defaults
    }
}

/// A request to `topic` with `payload`, named `id` by its `request-id` header.
fn request(topic: &str, payload: Vec<u8>, id: &str) -> OutgoingMessage {
    OutgoingMessage {
        topic: topic.into(),
        payload,
        headers: vec![("request-id".into(), id.into())],
        ..OutgoingMessage::default()
    }
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

/// The `.cwasm` files in a cache directory.
fn artifacts(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_loads_only_artifacts_it_signed_and_compiles_the_rest_again() {
    let cache = tempfile::tempdir().unwrap();
    let (_cluster, broker) = support::embedded().await;
    let consumer = ComponentConfig {
        subscribe: vec!["predictions".into()],
        ..config("consumer")
    };
    let load = async |name: &str, config: &ComponentConfig| {
        let runtime = Runtime::new(broker.clone(), options(Some(cache.path())))
            .await
            .unwrap();
        runtime.load(name, config).unwrap().cache
    };
    assert_eq!(load("consumer", &consumer).await, CacheOutcome::Compiled);
    let [consumer_artifact] = artifacts(cache.path()).try_into().unwrap();
    assert_eq!(
        load("producer", &config("producer")).await,
        CacheOutcome::Compiled
    );
    let producer_artifact = artifacts(cache.path())
        .into_iter()
        .find(|path| *path != consumer_artifact)
        .unwrap();
    let genuine = std::fs::read(&consumer_artifact).unwrap();

    // Damaged on disk: zeroed in the middle, where wasmtime's own header check cannot see it
    // (loading such a file used to crash the host).
    let mut damaged = genuine.clone();
    let middle = damaged.len() / 2;
    damaged[middle..middle + 4096].fill(0);
    std::fs::write(&consumer_artifact, &damaged).unwrap();
    assert_eq!(load("consumer", &consumer).await, CacheOutcome::Compiled);
    assert_eq!(
        load("consumer", &consumer).await,
        CacheOutcome::Hit,
        "the damaged file was replaced"
    );

    // Planted: a genuine artifact of another component under this one's name, and a bare
    // wasmtime artifact (native code, without the cache's signature).
    std::fs::copy(&producer_artifact, &consumer_artifact).unwrap();
    assert_eq!(load("consumer", &consumer).await, CacheOutcome::Compiled);
    let bare = &std::fs::read(&producer_artifact).unwrap()[8 + 32..];
    std::fs::write(&consumer_artifact, bare).unwrap();
    assert_eq!(load("consumer", &consumer).await, CacheOutcome::Compiled);
    assert_eq!(load("consumer", &consumer).await, CacheOutcome::Hit);

    // A cache of another key (another user's, say) signs nothing here.
    let key = cache.path().join("artifact-key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    assert_eq!(load("consumer", &consumer).await, CacheOutcome::Compiled);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_others_may_write_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let (_cluster, broker) = support::embedded().await;
    let consumer = ComponentConfig {
        subscribe: vec!["predictions".into()],
        ..config("consumer")
    };
    for _ in 0..2 {
        let runtime = Runtime::new(broker.clone(), options(Some(shared.path())))
            .await
            .unwrap();
        assert_eq!(
            runtime.load("consumer", &consumer).unwrap().cache,
            CacheOutcome::Compiled
        );
    }
    assert!(artifacts(shared.path()).is_empty());
    assert!(!shared.path().join("artifact-key").exists());
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
        (
            b"\0asm\x0d\0\x01\0garbage".to_vec(),
            "damaged or not a component",
        ),
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
    assert!(matches!(err, RuntimeError::World { .. }), "{err}");
    assert!(err.to_string().contains("incoming-handler"), "{err}");
    // And a handler is not a command.
    let err = runtime
        .load("consumer", &config("consumer"))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("wasi:cli/run"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_grants_its_preopens_read_only_and_nothing_else() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("probe.txt"), "granted").unwrap();
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let config = ComponentConfig {
        preopens: vec![Preopen {
            host: data.path().to_path_buf(),
            guest: "/data".into(),
            writable: false,
        }],
        ..test_handler(&input, &output, Limits::default(), RetryPolicy::default())
    };
    let loaded = runtime.load("test", &config).unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    let replies = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    support::publish(
        broker.as_ref(),
        request(&input, format!("probe {output}").into_bytes(), "p"),
    )
    .await;
    let stats = Arc::clone(handler.stats());
    support::wait_until(
        "the probe to be handled",
        Duration::from_secs(30),
        async || stats.snapshot().handled + stats.snapshot().gave_up > 0,
    )
    .await;
    assert_eq!(stats.snapshot().handled, 1, "the probe ran: {stats:?}");
    let report = next_payload(replies.as_ref()).await;
    let outcome = |name: &str| {
        report
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {report:?}"))
            .to_string()
    };
    // The granted file is readable: the refusals below are the sandbox's, not a broken probe.
    assert_eq!(outcome("read-inside"), "ok", "{report}");
    assert!(outcome("read-outside").starts_with("denied"), "{report}");
    assert!(outcome("write-read-only").starts_with("denied"), "{report}");
    assert!(!data.path().join("written.txt").exists());
    assert_eq!(outcome("env"), "0", "no environment variables: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sent_message_names_the_component_build_that_sent_it() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let config = test_handler(&input, &output, Limits::default(), RetryPolicy::default());
    let loaded = runtime.load("stamped", &config).unwrap();
    assert!(
        loaded.version().starts_with("sha256:"),
        "{}",
        loaded.version()
    );
    let _handler = runtime.start_handler(&loaded).await.unwrap();
    let replies = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    support::publish(
        broker.as_ref(),
        request(&input, format!("send {output}").into_bytes(), "s"),
    )
    .await;
    let delivery = tokio::time::timeout(Duration::from_secs(30), replies.next())
        .await
        .expect("the reply within 30 s")
        .unwrap();
    let sent_by: Vec<_> = delivery
        .message
        .headers
        .iter()
        .filter(|(key, _)| key == SENT_BY_HEADER)
        .map(|(_, value)| value.as_str())
        .collect();
    let expected = format!("stamped@{}", loaded.version());
    assert_eq!(
        sent_by,
        [expected.as_str()],
        "{:?}",
        delivery.message.headers
    );
    delivery.ack().unwrap();
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
            "--count",
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
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let endless = RetryPolicy {
        max_attempts: 1_000,
        backoff_ms: 20,
    };
    let loaded = runtime
        .load(
            "classifier",
            &support::classifier(&input, &output, &group, endless),
        )
        .unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    support::publish(
        broker.as_ref(),
        request(&input, b"not an image".to_vec(), "bad-1"),
    )
    .await;
    let stats = Arc::clone(handler.stats());
    support::wait_until("two failed attempts", Duration::from_secs(60), async || {
        stats.snapshot().retried >= 2
    })
    .await;
    assert_eq!(stats.snapshot().handled, 0);
    handler.stop().await.unwrap();

    // The next member of the group gets the message again.
    let next = support::member(broker.as_ref(), &group, &input).await;
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
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let quick = RetryPolicy {
        max_attempts: 2,
        backoff_ms: 10,
    };
    let loaded = runtime
        .load(
            "classifier",
            &support::classifier(&input, &output, &group, quick),
        )
        .unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    support::publish(
        broker.as_ref(),
        request(&input, b"not an image".to_vec(), "bad-1"),
    )
    .await;
    support::publish(broker.as_ref(), request(&input, vec![0u8; 784], "good-2")).await;

    let predictions = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
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
        async || stats.snapshot().gave_up == 1,
    )
    .await;
    assert_eq!(stats.snapshot().handled, 1);
    handler.stop().await.unwrap();

    // Both were settled: a new member of the group receives neither.
    support::publish(
        broker.as_ref(),
        request(&input, b"marker".to_vec(), "marker"),
    )
    .await;
    let next = support::member(broker.as_ref(), &group, &input).await;
    let first = tokio::time::timeout(Duration::from_secs(30), next.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.message.payload, b"marker");
    next.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_the_host_cannot_load_is_an_error_for_the_guest_not_a_trap() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output, group) = (
        support::unique("in"),
        support::unique("out"),
        support::unique("g"),
    );
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let models = tempfile::tempdir().unwrap();
    std::fs::write(models.path().join("lenet.onnx"), b"not an ONNX model").unwrap();
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let config = ComponentConfig {
        nn: Some(NnEngine::Auto),
        preopens: vec![Preopen {
            host: models.path().to_path_buf(),
            guest: "/models".into(),
            writable: false,
        }],
        ..support::classifier(
            &input,
            &output,
            &group,
            RetryPolicy {
                max_attempts: 1,
                backoff_ms: 10,
            },
        )
    };
    let loaded = runtime.load("classifier", &config).unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    support::publish(broker.as_ref(), request(&input, vec![0u8; 784], "doomed-1")).await;
    let stats = Arc::clone(handler.stats());
    support::wait_until(
        "the request to be given up",
        Duration::from_secs(30),
        async || stats.snapshot().gave_up == 1,
    )
    .await;
    assert_eq!(stats.snapshot().traps, 0, "wasi:nn errors are values");
    handler.stop().await.unwrap();
}

/// The test handler subscribed to `input`, allowed to send to `output`, given one message per
/// call (the tests of batches set `batch`).
fn test_handler(input: &str, output: &str, limits: Limits, retry: RetryPolicy) -> ComponentConfig {
    ComponentConfig {
        wasm: support::test_handler(),
        batch: 1,
        subscribe: vec![input.into()],
        group: Some(support::unique("g")),
        publish: vec![output.into()],
        limits,
        retry,
        ..config("consumer")
    }
}

async fn next_payload(subscriber: &dyn switchyard_broker::Subscriber) -> String {
    let delivery = tokio::time::timeout(Duration::from_secs(30), subscriber.next())
        .await
        .expect("a message within 30 s")
        .unwrap();
    let payload = String::from_utf8(delivery.message.payload.clone()).unwrap();
    delivery.ack().unwrap();
    payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_stay_warm_and_a_trap_replaces_only_the_instance() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let once = RetryPolicy {
        max_attempts: 1,
        backoff_ms: 10,
    };
    let loaded = runtime
        .load(
            "test",
            &test_handler(&input, &output, Limits::default(), once),
        )
        .unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    let replies = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    let count = format!("count {output}");
    // One partition, one worker: the messages are handled in order by the same instance.
    for command in [&count, &count, &"trap".to_string(), &count] {
        support::publish(
            broker.as_ref(),
            request(&input, command.as_bytes().to_vec(), "t"),
        )
        .await;
    }
    assert_eq!(next_payload(replies.as_ref()).await, "1");
    assert_eq!(
        next_payload(replies.as_ref()).await,
        "2",
        "the instance was reused"
    );
    assert_eq!(
        next_payload(replies.as_ref()).await,
        "1",
        "after the trap a fresh instance handles the next message"
    );
    let stats = Arc::clone(handler.stats());
    // A reply can reach the reader before the broker's acknowledgement reaches the host, which
    // is when its message counts as handled; the trap's message counts as given up once its
    // dead letter is stored.
    tokio::time::timeout(
        Duration::from_secs(30),
        stats.settled().wait_for(|settled| *settled == 4),
    )
    .await
    .expect("every message settled")
    .unwrap();
    assert_eq!(stats.snapshot().handled, 3);
    assert_eq!(stats.snapshot().traps, 1);
    assert_eq!(stats.snapshot().gave_up, 1);
    replies.close().await.unwrap();
    handler.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_or_memory_limit_costs_the_instance_not_the_host() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let retry = RetryPolicy {
        max_attempts: 2,
        backoff_ms: 10,
    };
    let limits = Limits {
        max_memory_mb: 32,
        max_call_ms: 200,
        ..Limits::default()
    };
    let loaded = runtime
        .load("test", &test_handler(&input, &output, limits, retry))
        .unwrap();
    let handler = runtime.start_handler(&loaded).await.unwrap();
    let replies = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    for command in [
        "spin".to_string(),
        // Waits in a host call, where the epoch callback that stops spinning never runs: cut
        // off, or the wait below times out long before its ten minutes are up.
        "sleep 600000".to_string(),
        "grow 64".to_string(),
        "grow 4".to_string(),
        format!("send {output}"),
    ] {
        support::publish(broker.as_ref(), request(&input, command.into_bytes(), "t")).await;
    }
    // The spinning, the sleeping and the greedy message cost two instances each and are given
    // up; the modest ones after them are handled, by the same host.
    assert_eq!(next_payload(replies.as_ref()).await, "hello");
    let stats = Arc::clone(handler.stats());
    support::wait_until(
        "the three bad messages to be given up and both good ones settled",
        Duration::from_secs(30),
        async || stats.snapshot().gave_up == 3 && stats.snapshot().handled == 2,
    )
    .await;
    assert_eq!(stats.snapshot().traps, 6);
    replies.close().await.unwrap();
    handler.stop().await.unwrap();
}

/// The test handler with `batch`, one attempt per message: any failure charged to a message
/// that did nothing wrong would show as a message given up on.
fn batching_test_handler(input: &str, output: &str) -> ComponentConfig {
    ComponentConfig {
        batch: 8,
        ..test_handler(
            input,
            output,
            Limits::default(),
            RetryPolicy {
                max_attempts: 1,
                backoff_ms: 10,
            },
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_messages_come_in_batches_and_each_keeps_its_own_outcome() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let loaded = runtime
        .load("test", &batching_test_handler(&input, &output))
        .unwrap();
    assert!(loaded.takes_batches());
    // Every fourth message fails; all are waiting before the handler starts. The first call
    // sleeps, so however slowly a loaded machine runs the dispatcher, the messages behind it
    // are in the host's queue when the worker comes back for more.
    let batch = format!("batch {output}");
    let commands: Vec<&str> = std::iter::once("sleep 300")
        .chain((0..40).map(|i| if i % 4 == 3 { "error" } else { &batch }))
        .collect();
    for command in &commands {
        support::publish(
            broker.as_ref(),
            request(&input, command.as_bytes().to_vec(), "t"),
        )
        .await;
    }
    let replies = support::member(broker.as_ref(), &support::unique("reader"), &output).await;
    let handler = runtime.start_handler(&loaded).await.unwrap();
    let mut sizes = Vec::new();
    for _ in 0..30 {
        sizes.push(
            next_payload(replies.as_ref())
                .await
                .parse::<usize>()
                .unwrap(),
        );
    }
    let stats = Arc::clone(handler.stats());
    support::wait_until(
        "every message to be settled",
        Duration::from_secs(30),
        async || stats.snapshot().handled + stats.snapshot().gave_up == 41,
    )
    .await;
    assert_eq!(stats.snapshot().handled, 31, "{sizes:?}");
    assert_eq!(stats.snapshot().gave_up, 10, "{sizes:?}");
    assert!(
        sizes.iter().all(|&size| (1..=8).contains(&size)),
        "no call beyond the manifest's batch: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&size| size > 1),
        "waiting messages share calls: {sizes:?}"
    );
    replies.close().await.unwrap();
    handler.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_in_a_batch_costs_only_the_message_that_caused_it() {
    let (_cluster, broker) = support::embedded().await;
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    let runtime = Runtime::new(broker.clone(), options(None)).await.unwrap();
    let loaded = runtime
        .load("test", &batching_test_handler(&input, &output))
        .unwrap();
    for command in ["ok", "ok", "ok", "trap", "ok", "ok", "ok", "ok"] {
        support::publish(
            broker.as_ref(),
            request(&input, command.as_bytes().to_vec(), "t"),
        )
        .await;
    }
    let handler = runtime.start_handler(&loaded).await.unwrap();
    let stats = Arc::clone(handler.stats());
    support::wait_until(
        "every message to be settled",
        Duration::from_secs(30),
        async || stats.snapshot().handled + stats.snapshot().gave_up == 8,
    )
    .await;
    // Whether the trap came alone or in a batch, only it is given up on.
    assert_eq!(stats.snapshot().gave_up, 1);
    assert_eq!(stats.snapshot().handled, 7);
    assert!(stats.snapshot().traps >= 1);
    handler.stop().await.unwrap();
}

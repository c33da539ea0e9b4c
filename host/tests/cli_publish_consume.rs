//! Proves that `switchyard publish` and `switchyard consume` behave the same on both backends,
//! run as a user runs them (the binary, over TCP): against a `switchyard broker`-style embedded
//! Kafka broker on a fixed address, and against Google's Pub/Sub emulator. Lines from standard
//! input become messages with the given key, header and content type, and come back as one JSON
//! object per line; a binary file comes back in base64. `switchyard replay` sends a dead letter
//! back to the topic its header names, without the dead-letter headers and with everything
//! else; a message without that header is refused with the fix (`--to`), and stays where it
//! is until `--to` sends it. `consume` with no count and no idle time, stopped by
//! Ctrl-C, exits 0 within a bound and says what it read. `switchyard topics` lists, creates and
//! deletes topics, refuses to create one twice or delete a missing one unless told to accept
//! that, and on the embedded broker (which cannot create or delete on request) says what to do
//! instead.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use switchyard_broker::BrokerConfig;
use switchyard_broker::kafka::EmbeddedKafka;
use switchyard_broker::kafka::KafkaConfig;
use switchyard_broker::pubsub::PubSubEmulator;

fn switchyard(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let output = run(args, stdin);
    assert!(
        output.status.success(),
        "switchyard {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("BROKER")
        .env_remove("PUBSUB_EMULATOR_HOST")
        .env(
            "RUST_LOG",
            std::env::var("DIAG_RUST_LOG").unwrap_or("warn".into()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running switchyard");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// `switchyard COMMAND --broker BROKER -t TOPIC` followed by `more`.
fn on<'a>(command: &'a str, broker: &'a str, topic: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![command, "--broker", broker, "-t", topic];
    args.extend_from_slice(more);
    args
}

fn lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

/// Publishes and consumes through the CLI on `broker` and checks what comes back.
fn round_trip(broker: &str) {
    let topic = support::unique("cli");
    let group = support::unique("cli-group");
    // Create the group (a Pub/Sub subscription) before publishing, as consumers must on
    // Pub/Sub.
    switchyard(
        &on("consume", broker, &topic, &["-g", &group, "-c", "0"]),
        None,
    );
    switchyard(
        &on(
            "publish",
            broker,
            &topic,
            &[
                "-k",
                "order-1",
                "-H",
                "source=cli",
                "--content-type",
                "text/plain",
            ],
        ),
        Some(b"first\nsecond\nthird\n"),
    );
    let binary = std::env::temp_dir().join(format!("{topic}.bin"));
    std::fs::write(&binary, [0u8, 159, 146, 150, 255]).unwrap();
    switchyard(
        &on(
            "publish",
            broker,
            &topic,
            &["-k", "order-1", "--file", binary.to_str().unwrap()],
        ),
        None,
    );
    std::fs::remove_file(&binary).unwrap();

    let output = switchyard(
        &on(
            "consume",
            broker,
            &topic,
            &["-g", &group, "-c", "4", "--idle-exit", "30"],
        ),
        None,
    );
    let received = lines(&output);
    assert_eq!(received.len(), 4, "{broker}: {received:?}");
    for (line, payload) in received.iter().zip(["first", "second", "third"]) {
        assert_eq!(line["payload"], payload, "{broker}: same key, same order");
        assert_eq!(line["key"], "order-1");
        assert_eq!(line["headers"]["source"], "cli");
        assert_eq!(line["content_type"], "text/plain");
        assert_eq!(line["topic"], topic.as_str());
    }
    assert_eq!(received[3]["payload_base64"], "AJ+Slv8=", "{broker}");
    assert!(received[3]["payload"].is_null());

    // Everything was acknowledged: a redelivery must not come. A later message with the same
    // key is the next one the group hands out; one left unacknowledged would come before it,
    // as a key keeps its order (a Kafka partition, a Pub/Sub ordering key).
    switchyard(
        &on(
            "publish",
            broker,
            &topic,
            &["-k", "order-1", "--payload", "fifth"],
        ),
        None,
    );
    let output = switchyard(
        &on(
            "consume",
            broker,
            &topic,
            &["-g", &group, "-c", "1", "--idle-exit", "30"],
        ),
        None,
    );
    let payloads: Vec<_> = lines(&output)
        .iter()
        .map(|line| line["payload"].clone())
        .collect();
    assert_eq!(
        payloads,
        [serde_json::json!("fifth")],
        "{broker}: an acknowledged message came back"
    );

    replay(broker);
    interrupted(broker);
}

/// `consume` with neither a count nor an idle time, stopped by Ctrl-C once it has printed a
/// message: it exits 0 within the bound, saying what it consumed, and (on Kafka) committed it.
fn interrupted(broker: &str) {
    let topic = support::unique("interrupted");
    let group = support::unique("interrupted-group");
    switchyard(
        &on("consume", broker, &topic, &["-g", &group, "-c", "0"]),
        None,
    );
    switchyard(&on("publish", broker, &topic, &["--payload", "one"]), None);
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["consume", "--broker", broker, "-t", &topic, "-g", &group])
        .env_remove("BROKER")
        .env_remove("PUBSUB_EMULATOR_HOST")
        .env(
            "RUST_LOG",
            std::env::var("DIAG_RUST_LOG").unwrap_or("warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running switchyard");
    let stdout = child.stdout.take().unwrap();
    let (printed, first) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let _ = printed.send(line);
        }
    });
    let line = first
        .recv_timeout(Duration::from_secs(60))
        .expect("consume prints the message")
        .unwrap();
    assert!(line.contains("\"payload\":\"one\""), "{broker}: {line}");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let interrupted_at = Instant::now();
    // SAFETY: kill(2) with the pid of a child this test spawned and has not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    // Wait for the exit itself (a thread reaps the child), bounded by STOP_BOUND.
    let mut stderr = child.stderr.take().unwrap();
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(child.wait());
    });
    let status = exit
        .recv_timeout(STOP_BOUND)
        .unwrap_or_else(|_| panic!("{broker}: consume still running {STOP_BOUND:?} after Ctrl-C"))
        .unwrap();
    eprintln!(
        "{broker}: consume stopped {:?} after Ctrl-C",
        interrupted_at.elapsed()
    );
    let mut said = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
    let stderr = said;
    assert!(status.success(), "{broker}: {status}: {stderr}");
    assert!(
        stderr.contains("consumed 1 message(s)"),
        "{broker}: {stderr}"
    );
}

/// How long `consume` may take to stop after Ctrl-C: it finishes the message in hand, commits
/// and leaves (a Pub/Sub stream's shutdown is bounded at 10 s).
const STOP_BOUND: Duration = Duration::from_secs(15);

/// Replays a dead letter, and a message that is not one, back to a topic of their own.
fn replay(broker: &str) {
    let topic = support::unique("replayed");
    let group = support::unique("replayed-group");
    let dead_letters = format!("{topic}.dlq");
    // The subscriptions, made before anything is published: the one `consume` and `replay`
    // read by default (named after the topic), as the host makes for its dead-letter topics,
    // and the destination's.
    switchyard(&on("consume", broker, &dead_letters, &["-c", "0"]), None);
    switchyard(
        &on("consume", broker, &topic, &["-g", &group, "-c", "0"]),
        None,
    );
    let origin = format!("switchyard-dlq-topic={topic}");
    switchyard(
        &on(
            "publish",
            broker,
            &dead_letters,
            &[
                "-k",
                "order-9",
                "-H",
                "request-id=9",
                "-H",
                &origin,
                "-H",
                "switchyard-dlq-error=boom",
                "-H",
                "switchyard-dlq-attempts=3",
                "--payload",
                "poison",
            ],
        ),
        None,
    );
    let replayed = switchyard(
        &on(
            "replay",
            broker,
            &dead_letters,
            &["-c", "1", "--idle-exit", "60"],
        ),
        None,
    );
    let said = String::from_utf8_lossy(&replayed.stderr);
    assert!(
        said.contains(&format!(
            "replayed 1 message(s) from {dead_letters}: 1 to {topic}"
        )),
        "{broker}: {said}"
    );
    let consume_one = on(
        "consume",
        broker,
        &topic,
        &["-g", &group, "-c", "1", "--idle-exit", "60"],
    );
    let back = lines(&switchyard(&consume_one, None));
    assert_eq!(back.len(), 1, "{broker}: {back:?}");
    assert_eq!(back[0]["payload"], "poison");
    assert_eq!(back[0]["key"], "order-9");
    assert_eq!(
        back[0]["headers"],
        serde_json::json!({ "request-id": "9" }),
        "{broker}: only the dead-letter headers are gone"
    );

    switchyard(
        &on("publish", broker, &dead_letters, &["--payload", "stray"]),
        None,
    );
    let refused = run(
        &on(
            "replay",
            broker,
            &dead_letters,
            &["-c", "1", "--idle-exit", "60"],
        ),
        None,
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{broker}: {said}");
    assert!(said.contains("--to TOPIC"), "{broker}: {said}");
    switchyard(
        &on(
            "replay",
            broker,
            &dead_letters,
            &["--to", &topic, "-c", "1", "--idle-exit", "60"],
        ),
        None,
    );
    let back = lines(&switchyard(&consume_one, None));
    assert_eq!(
        back[0]["payload"], "stray",
        "{broker}: the refused message was kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_on_kafka() {
    // Port 0: the broker takes a free port itself (a port probed and freed first can be
    // taken by another test's broker before this one binds it).
    let broker = EmbeddedKafka::start(Some("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let url = BrokerConfig::Kafka(KafkaConfig::for_embedded(broker.bootstrap_servers())).to_url();
    tokio::task::spawn_blocking(move || round_trip(&url))
        .await
        .unwrap();
}

/// A Pub/Sub emulator of this test's own, and the broker URL of `project` on it.
async fn emulator(project: &str) -> (PubSubEmulator, String) {
    let emulator = tokio::task::spawn_blocking(|| PubSubEmulator::start(None))
        .await
        .unwrap()
        .expect("starting the Pub/Sub emulator");
    let url = format!(
        "pubsub://{project}?endpoint={}&anonymous=true",
        emulator.endpoint()
    );
    (emulator, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_on_pubsub() {
    let (emulator, url) = emulator("switchyard-cli").await;
    tokio::task::spawn_blocking(move || round_trip(&url))
        .await
        .unwrap();
    drop(emulator);
}

fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs `switchyard topics ARGS --broker BROKER`, expecting it to fail, and returns what it
/// said.
fn topics_fails(broker: &str, args: &[&str]) -> String {
    let all = topics_args(broker, args);
    let output = run(&all, None);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{all:?} fails with exit code 1"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn topics(broker: &str, args: &[&str]) -> Output {
    switchyard(&topics_args(broker, args), None)
}

/// `topics ARGS --broker BROKER`.
fn topics_args<'a>(broker: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["topics"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--broker", broker]);
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_on_pubsub() {
    let (emulator, broker) = emulator("switchyard-topics").await;
    tokio::task::spawn_blocking(move || {
        let (first, second) = (support::unique("orders"), support::unique("audit"));
        assert!(stdout_lines(&topics(&broker, &["list"])).is_empty());
        let created = topics(&broker, &["create", &first, &second]);
        assert!(
            String::from_utf8_lossy(&created.stderr).contains(&format!("created topic {first}"))
        );
        let mut both = vec![first.clone(), second.clone()];
        both.sort();
        assert_eq!(
            stdout_lines(&topics(&broker, &["list"])),
            both,
            "sorted, no partitions"
        );

        let error = topics_fails(&broker, &["create", &first]);
        assert!(
            error.contains(&format!("topic {first} exists already"))
                && error.contains("--if-not-exists"),
            "{error}"
        );
        topics(&broker, &["create", &first, "--if-not-exists"]);

        topics(&broker, &["delete", &first]);
        assert_eq!(
            stdout_lines(&topics(&broker, &["list"])),
            vec![second.clone()]
        );
        let error = topics_fails(&broker, &["delete", &first]);
        assert!(
            error.contains(&format!("topic {first} does not exist"))
                && error.contains("--if-exists"),
            "{error}"
        );
        topics(&broker, &["delete", &first, "--if-exists"]);

        let error = topics_fails(&broker, &["create", "no spaces"]);
        assert!(error.contains("no spaces"), "a bad name is named: {error}");
    })
    .await
    .unwrap();
    drop(emulator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_on_the_embedded_broker() {
    let embedded = EmbeddedKafka::start(Some("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    // What `switchyard broker --topic requests:6` does.
    let requests = support::unique("requests");
    embedded
        .create_topic(&switchyard_broker::TopicSpec {
            name: requests.clone(),
            partitions: 6,
        })
        .unwrap();
    let broker = format!("kafka://{}", embedded.bootstrap_servers());
    tokio::task::spawn_blocking(move || {
        assert_eq!(
            stdout_lines(&topics(&broker, &["list"])),
            vec![format!("{requests}\t6")],
            "name, tab, partitions"
        );
        topics(&broker, &["create", &requests, "--if-not-exists"]);

        let error = topics_fails(&broker, &["create", "fresh", "--partitions", "3"]);
        assert!(
            error.contains("cannot create topics on request")
                && error.contains("switchyard broker --topic fresh:3"),
            "names the fix: {error}"
        );
        let error = topics_fails(&broker, &["delete", &requests]);
        assert!(
            error.contains("cannot delete topics") && error.contains("Restart it"),
            "{error}"
        );
        assert_eq!(
            stdout_lines(&topics(&broker, &["list"])).len(),
            1,
            "nothing deleted"
        );
    })
    .await
    .unwrap();
}

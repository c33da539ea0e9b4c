//! The conformance suite: what the broker API promises, checked once and run against every
//! backend over real connections: the embedded Kafka broker (librdkafka's mock cluster), a
//! second and independent Kafka-protocol broker (Tansu, a broker of its own per test, or the
//! cluster `KAFKA_BOOTSTRAP=host:port` names; see `switchyard_testing::second_kafka`), and
//! Google's Pub/Sub emulator (started by this test binary on a free port with a capped heap,
//! and killed with it; `PUBSUB_EMULATOR_HOST=host:port` uses that emulator instead).
//!
//! Promises: N messages round-trip with no loss and, after acknowledgement, no duplicate;
//! headers/attributes and content type survive, converted the same way on every backend (one
//! value per name, sorted, the content type once); messages of one key keep their order; a nack,
//! or a member that leaves without settling, leads to redelivery; two members of one group
//! share the load and lose nothing (a message in flight while Kafka moves its partition may
//! come twice); a restarted member resumes without what it acknowledged; a new group that
//! starts at the latest position gets everything published after `subscribe` returned, even
//! before it has joined (all of a topic created after it subscribed), and nothing from before;
//! an empty payload and one near the size limit pass; a bad topic name, a missing subscription
//! and an unreachable endpoint give errors that say what to do; topics are listed (sorted,
//! without internal ones), created once and deleted; on Kafka, batches compressed with every
//! codec (gzip, snappy, lz4, zstd) round-trip.
//!
//! Where a backend cannot promise something, the test says so for that backend instead of
//! skipping: the Pub/Sub emulator (like Pub/Sub without exactly-once delivery) may deliver an
//! acknowledged message again, so "no duplicate" is switchyard's promise for one member (a
//! member re-acknowledges, without handing on, what it acknowledged recently), not the
//! broker's across members; Kafka has no subscription to be missing; and the embedded Kafka
//! broker (librdkafka's mock cluster) cannot delete a topic, which it must refuse saying so.

use switchyard_testing as support;
use switchyard_testing::TansuDefect;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_broker::kafka::{Kafka, KafkaConfig};
use switchyard_broker::pubsub::{PubSub, PubSubConfig};
use switchyard_broker::{
    Broker, Delivery, ErrorKind, OutgoingMessage, StartPosition, Subscriber, SubscriptionSpec,
    TopicSpec,
};

const WAIT: Duration = Duration::from_secs(30);

/// A backend under test, with whatever keeps it alive.
struct Backend {
    /// What it is, for messages: `kafka (embedded)`, `kafka (Tansu 0.6.0)`, `pubsub`.
    name: String,
    broker: Arc<dyn Broker>,
    /// Whether it speaks Kafka's protocol (partitions, no subscriptions).
    kafka: bool,
    /// Whether it is librdkafka's mock cluster (the embedded broker), which cannot delete
    /// topics.
    mock_cluster: bool,
    /// A Kafka-protocol broker's bootstrap address, for a client of a test's own.
    bootstrap: Option<String>,
    /// The second Kafka broker, whose known defects a test may have to step around.
    second_kafka: Option<support::SecondKafka>,
    _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
}

async fn kafka() -> Backend {
    let (cluster, broker) = support::embedded().await;
    Backend {
        name: "kafka (embedded)".into(),
        broker,
        kafka: true,
        mock_cluster: true,
        bootstrap: Some(cluster.bootstrap_servers().to_string()),
        second_kafka: None,
        _keep: Some(Box::new(cluster)),
    }
}

/// The Kafka backend on the second broker, `None` (said on standard error) without one.
async fn second_kafka(test: &str) -> Option<Backend> {
    let second = support::second_kafka(test)?;
    let broker = Kafka::connect(second.kafka_config())
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", second.name));
    Some(Backend {
        name: format!("kafka ({})", second.name),
        broker: Arc::new(broker),
        kafka: true,
        mock_cluster: false,
        bootstrap: Some(second.bootstrap.clone()),
        second_kafka: Some(second),
        _keep: None,
    })
}

async fn pubsub() -> Backend {
    pubsub_with(support::pubsub_config().await).await
}

/// The Pub/Sub backend on the emulator, with settings of the test's own.
async fn pubsub_with(config: PubSubConfig) -> Backend {
    Backend {
        name: "pubsub".into(),
        broker: Arc::new(PubSub::connect(config).await.unwrap()),
        kafka: false,
        mock_cluster: false,
        bootstrap: None,
        second_kafka: None,
        _keep: None,
    }
}

impl Backend {
    async fn topic(&self, prefix: &str, partitions: i32) -> String {
        let name = support::unique(prefix);
        self.broker
            .ensure_topics(&[TopicSpec {
                name: name.clone(),
                partitions,
            }])
            .await
            .unwrap();
        name
    }

    async fn member(&self, group: &str, topic: &str) -> Arc<dyn Subscriber> {
        self.member_at(group, topic, StartPosition::Earliest).await
    }

    /// A member of `group` that, if the group is new, starts reading `topic` at `start`.
    async fn member_at(
        &self,
        group: &str,
        topic: &str,
        start: StartPosition,
    ) -> Arc<dyn Subscriber> {
        self.broker
            .subscribe(&SubscriptionSpec {
                group: group.into(),
                topics: vec![topic.into()],
                start,
                guarantee: Default::default(),
                isolation: Default::default(),
            })
            .await
            .unwrap()
    }

    async fn publish_all(&self, messages: Vec<OutgoingMessage>) {
        let publisher = self.broker.publisher().await.unwrap();
        let mut receipts = Vec::new();
        for message in messages {
            receipts.push(publisher.publish(message).await.unwrap());
        }
        for receipt in receipts {
            receipt.wait().await.unwrap();
        }
    }
}

fn message(topic: &str, key: Option<&str>, payload: &[u8]) -> OutgoingMessage {
    OutgoingMessage {
        topic: topic.into(),
        key: key.map(|k| k.as_bytes().to_vec()),
        payload: payload.to_vec(),
        headers: Vec::new(),
        content_type: None,
    }
}

async fn next(member: &dyn Subscriber) -> Delivery {
    tokio::time::timeout(WAIT, member.next())
        .await
        .expect("a delivery within 30 s")
        .unwrap()
}

/// Waits `quiet` for a delivery that should not come.
async fn nothing_more(member: &dyn Subscriber, quiet: Duration) -> Option<Delivery> {
    tokio::time::timeout(quiet, member.next())
        .await
        .ok()
        .map(|d| d.unwrap())
}

async fn round_trip_without_loss_or_duplicates(backend: Backend) {
    let topic = backend.topic("rt", 4).await;
    let group = support::unique("g");
    let member = backend.member(&group, &topic).await;
    let count = 500;
    backend
        .publish_all(
            (0..count)
                .map(|i| message(&topic, None, format!("m{i}").as_bytes()))
                .collect(),
        )
        .await;
    let mut seen = BTreeSet::new();
    while seen.len() < count {
        let delivery = next(member.as_ref()).await;
        let payload = String::from_utf8(delivery.message.payload.clone()).unwrap();
        assert!(
            seen.insert(payload.clone()),
            "{}: {payload} handed to one member twice; a member never hands on what it \
             acknowledged (Kafka: its committed position; Pub/Sub: its acknowledged-id guard)",
            backend.name
        );
        delivery.ack().unwrap();
    }
    let extra = nothing_more(member.as_ref(), Duration::from_secs(3)).await;
    assert!(
        extra.is_none(),
        "{}: a message after all were acknowledged: {extra:?}",
        backend.name
    );
    member.close().await.unwrap();
}

async fn headers_and_content_type_survive(backend: Backend) {
    let topic = backend.topic("hdr", 1).await;
    let member = backend.member(&support::unique("g"), &topic).await;
    let mut sent = message(&topic, Some("k1"), b"{\"a\":1}");
    // Out of order, a repeated name, and a content-type header beside the content type:
    // what Kafka could keep as given and Pub/Sub's attribute map could not.
    sent.headers = vec![
        ("request-id".into(), "r-1".into()),
        ("label".into(), "6".into()),
        ("unicode".into(), "façade ✓".into()),
        ("Content-Type".into(), "text/plain".into()),
        ("label".into(), "7".into()),
    ];
    sent.content_type = Some("application/json".into());
    backend.publish_all(vec![sent.clone()]).await;
    let delivery = next(member.as_ref()).await;
    let received = &delivery.message;
    assert_eq!(received.payload, sent.payload);
    assert_eq!(
        received.content_type.as_deref(),
        Some("application/json"),
        "{}: the content type wins over a content-type header",
        backend.name
    );
    assert_eq!(received.key.as_deref(), Some(&b"k1"[..]));
    let expected: Vec<(String, String)> = [
        ("label", "7"),
        ("request-id", "r-1"),
        ("unicode", "façade ✓"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        received.headers, expected,
        "{}: one value per name (the last), sorted by name, no content-type header",
        backend.name
    );
    delivery.ack().unwrap();
    member.close().await.unwrap();
}

async fn messages_of_one_key_keep_their_order(backend: Backend) {
    let topic = backend.topic("order", 4).await;
    let member = backend.member(&support::unique("g"), &topic).await;
    let keys = ["alpha", "beta", "gamma"];
    let per_key = 60;
    let mut messages = Vec::new();
    for i in 0..per_key {
        for key in keys {
            messages.push(message(&topic, Some(key), format!("{key}:{i}").as_bytes()));
        }
    }
    backend.publish_all(messages).await;
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..keys.len() * per_key {
        let delivery = next(member.as_ref()).await;
        let text = String::from_utf8(delivery.message.payload.clone()).unwrap();
        let (key, index) = text.split_once(':').unwrap();
        let index: i64 = index.parse().unwrap();
        let previous = last.insert(key.to_string(), index).unwrap_or(-1);
        assert_eq!(index, previous + 1, "{}: {key} out of order", backend.name);
        delivery.ack().unwrap();
    }
    member.close().await.unwrap();
}

async fn a_nack_brings_the_message_back(backend: Backend) {
    let topic = backend.topic("nack", 1).await;
    let member = backend.member(&support::unique("g"), &topic).await;
    backend
        .publish_all(vec![message(&topic, None, b"again")])
        .await;
    let first = next(member.as_ref()).await;
    assert_eq!(first.message.payload, b"again");
    first.nack().unwrap();
    let second = next(member.as_ref()).await;
    assert_eq!(second.message.payload, b"again", "{}", backend.name);
    second.ack().unwrap();
    member.close().await.unwrap();
}

async fn a_member_leaving_unsettled_hands_the_message_on(backend: Backend) {
    let topic = backend.topic("leave", 1).await;
    let group = support::unique("g");
    let first = backend.member(&group, &topic).await;
    backend
        .publish_all(vec![message(&topic, None, b"handled elsewhere")])
        .await;
    let delivery = next(first.as_ref()).await;
    drop(delivery); // the handler failed: never settled
    first.close().await.unwrap();
    let second = backend.member(&group, &topic).await;
    let again = tokio::time::timeout(Duration::from_secs(90), second.next())
        .await
        .expect("redelivered to the next member")
        .unwrap();
    assert_eq!(
        again.message.payload, b"handled elsewhere",
        "{}",
        backend.name
    );
    again.ack().unwrap();
    second.close().await.unwrap();
}

async fn two_members_share_the_load_and_lose_nothing(backend: Backend) {
    let topic = backend.topic("share", 4).await;
    let group = support::unique("g");
    let a = backend.member(&group, &topic).await;
    let b = backend.member(&group, &topic).await;
    // Members join in the background (a Kafka rebalance takes a moment), so publish in waves
    // until both have taken a share, then check that nothing was lost on the way.
    let mut published = 0usize;
    let mut seen = BTreeSet::new();
    let mut per_member = [0usize; 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    while per_member.contains(&0) || seen.len() < published {
        assert!(
            Instant::now() < deadline,
            "{}: {} of {published} received, per member {per_member:?}",
            backend.name,
            seen.len()
        );
        if per_member.contains(&0) && seen.len() == published {
            // Distinct keys spread the messages over Kafka's partitions.
            let wave = (published..published + 50)
                .map(|i| {
                    message(
                        &topic,
                        Some(&format!("k{}", i % 16)),
                        format!("{i}").as_bytes(),
                    )
                })
                .collect();
            backend.publish_all(wave).await;
            published += 50;
        }
        let received = tokio::time::timeout(Duration::from_millis(500), async {
            tokio::select! {
                d = a.next() => (0, d.unwrap()),
                d = b.next() => (1, d.unwrap()),
            }
        })
        .await;
        if let Ok((index, delivery)) = received {
            per_member[index] += 1;
            // A message in flight while its partition moves may come twice (at-least-once);
            // none may go missing.
            seen.insert(String::from_utf8(delivery.message.payload.clone()).unwrap());
            delivery.ack().unwrap();
        }
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

async fn a_restarted_member_resumes_after_what_it_acknowledged(backend: Backend) {
    let topic = backend.topic("resume", 1).await;
    let group = support::unique("g");
    // Subscribe first: a Pub/Sub subscription receives only what is published after it exists.
    let member = backend.member(&group, &topic).await;
    backend
        .publish_all(
            (0..10)
                .map(|i| message(&topic, None, format!("{i}").as_bytes()))
                .collect(),
        )
        .await;
    let mut acknowledged = BTreeSet::new();
    for _ in 0..10 {
        let delivery = next(member.as_ref()).await;
        acknowledged.insert(delivery.message.payload.clone());
        delivery.ack().unwrap();
    }
    member.close().await.unwrap();
    backend
        .publish_all(vec![message(&topic, None, b"after restart")])
        .await;
    let restarted = backend.member(&group, &topic).await;
    let delivery = tokio::time::timeout(WAIT, restarted.next())
        .await
        .unwrap_or_else(|_| panic!("{}: nothing within {WAIT:?} after restart", backend.name))
        .unwrap();
    assert_eq!(
        delivery.message.payload, b"after restart",
        "{}: an acknowledged message came back",
        backend.name
    );
    delivery.ack().unwrap();
    restarted.close().await.unwrap();
}

async fn a_group_starting_at_latest_gets_what_follows_its_subscription(backend: Backend) {
    let topic = backend.topic("latest", 4).await;
    let before: Vec<OutgoingMessage> = (0..20)
        .map(|i| {
            message(
                &topic,
                Some(&format!("k{i}")),
                format!("before {i}").as_bytes(),
            )
        })
        .collect();
    backend.publish_all(before).await;
    let member = backend
        .member_at(&support::unique("g"), &topic, StartPosition::Latest)
        .await;
    // Published at once, before the member has joined its group: a new group's start is the
    // moment `subscribe` returned (Kafka: the end of each partition then, committed for the
    // group; Pub/Sub: the subscription's creation), not whenever the join completes.
    let after: BTreeSet<Vec<u8>> = (0..20).map(|i| format!("after {i}").into_bytes()).collect();
    backend
        .publish_all(
            after
                .iter()
                .enumerate()
                .map(|(i, payload)| message(&topic, Some(&format!("k{i}")), payload))
                .collect(),
        )
        .await;
    let (mut received, mut before_received) = (BTreeSet::new(), Vec::new());
    while received.len() < after.len() {
        let delivery = tokio::time::timeout(WAIT, member.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: {} of the {} messages published after subscribing arrived; the others \
                     were skipped as if published before",
                    backend.name,
                    received.len(),
                    after.len()
                )
            })
            .unwrap();
        let payload = delivery.message.payload.clone();
        delivery.ack().unwrap();
        if !after.contains(&payload) {
            before_received.push(String::from_utf8_lossy(&payload).into_owned());
            continue;
        }
        received.insert(payload);
    }
    if let Some(extra) = nothing_more(member.as_ref(), Duration::from_secs(2)).await {
        before_received.push(String::from_utf8_lossy(&extra.message.payload).into_owned());
    }
    member.close().await.unwrap();

    // A topic that does not exist yet when the group subscribes holds only what follows: all
    // of it arrives (librdkafka alone looked up "latest" once the topic appeared, after its
    // first messages, and skipped them).
    let later = support::unique("latest-later");
    let member = backend
        .member_at(&support::unique("g"), &later, StartPosition::Latest)
        .await;
    if backend.kafka {
        // The topic is created only once the member has looked for it and reported it
        // missing, so it must look again: a race without this wait, and a failure on Tansu
        // until members refreshed their metadata every 5 s instead of librdkafka's 5 minutes.
        // librdkafka reports the miss to a receiving member (after
        // `topic.metadata.propagation.max.ms`), so the member receives until its log says so.
        let mut log = support::capture_logs();
        let reported_missing = log.wait_for(|log| {
            log.lines()
                .any(|line| line.contains(&later) && line.contains("retrying"))
        });
        tokio::select! {
            reported = tokio::time::timeout(Duration::from_secs(90), reported_missing) => {
                reported
                    .unwrap_or_else(|_| {
                        panic!("{}: the member never reported {later} missing", backend.name)
                    })
                    .unwrap();
            }
            delivery = member.next() => match delivery {
                Ok(_) => panic!("{}: a message from {later}, which does not exist", backend.name),
                Err(e) => panic!("{}: receiving from a missing topic failed: {e:#}", backend.name),
            },
        }
    }
    backend
        .broker
        .ensure_topics(&[TopicSpec {
            name: later.clone(),
            partitions: 2,
        }])
        .await
        .unwrap();
    backend
        .publish_all(
            (0..10)
                .map(|i| message(&later, None, format!("first {i}").as_bytes()))
                .collect(),
        )
        .await;
    for i in 0..10 {
        let delivery = tokio::time::timeout(WAIT, member.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: {i} of the 10 first messages of a topic created after the group \
                     subscribed at latest arrived",
                    backend.name
                )
            })
            .unwrap();
        delivery.ack().unwrap();
    }
    member.close().await.unwrap();

    let skip_nothing_before = backend.second_kafka.as_ref().is_some_and(|second| {
        second.has(
            TansuDefect::LatestOffsetInsideLastBatch,
            "a_group_starting_at_latest_gets_what_follows_its_subscription",
            &format!(
                "nothing published before is received; received {}",
                before_received.len()
            ),
        )
    });
    if !skip_nothing_before {
        assert!(
            before_received.is_empty(),
            "{}: a group starting at latest received what was published before it \
             subscribed: {before_received:?}",
            backend.name
        );
    }
}

async fn empty_and_large_payloads_pass(backend: Backend) {
    let topic = backend.topic("sizes", 1).await;
    let member = backend.member(&support::unique("g"), &topic).await;
    // Kafka's default limit is 1 MB a message (message.max.bytes); Pub/Sub's is 10 MB.
    let large = vec![0xAB; 900 * 1024];
    backend
        .publish_all(vec![
            message(&topic, None, b""),
            message(&topic, None, &large),
        ])
        .await;
    let mut sizes = BTreeSet::new();
    for _ in 0..2 {
        let delivery = next(member.as_ref()).await;
        assert!(delivery.message.headers.is_empty(), "{}", backend.name);
        sizes.insert(delivery.message.payload.len());
        if !delivery.message.payload.is_empty() {
            assert_eq!(delivery.message.payload, large);
        }
        delivery.ack().unwrap();
    }
    assert_eq!(sizes, BTreeSet::from([0, large.len()]), "{}", backend.name);
    member.close().await.unwrap();
}

async fn bad_names_are_refused_with_the_rule(backend: Backend) {
    let err = backend
        .broker
        .ensure_topics(&[TopicSpec {
            name: "no spaces allowed".into(),
            partitions: 1,
        }])
        .await
        .err();
    let publisher = backend.broker.publisher().await.unwrap();
    let published = match publisher
        .publish(message("no spaces allowed", None, b"x"))
        .await
    {
        Ok(receipt) => receipt.wait().await.err(),
        Err(e) => Some(e),
    };
    let error = err.or(published).expect("a bad topic name is refused");
    let text = error.to_string();
    assert!(
        text.contains("no spaces allowed") || text.to_lowercase().contains("invalid"),
        "{}: {text}",
        backend.name
    );
}

async fn topics_are_listed_created_and_deleted(backend: Backend) {
    let name = support::unique("admin");
    let spec = TopicSpec {
        name: name.clone(),
        partitions: 3,
    };
    let listed = async || {
        let topics = backend.broker.list_topics().await.unwrap();
        assert!(
            topics.windows(2).all(|pair| pair[0].name < pair[1].name),
            "{}: sorted: {topics:?}",
            backend.name
        );
        assert!(
            topics.iter().all(|topic| !topic.name.starts_with("__")),
            "{}: no internal topics: {topics:?}",
            backend.name
        );
        topics.into_iter().find(|topic| topic.name == name)
    };
    assert_eq!(listed().await, None, "{}", backend.name);
    assert!(
        backend.broker.create_topic(&spec).await.unwrap(),
        "{}",
        backend.name
    );
    // A real Kafka cluster's metadata may lag a creation by a moment.
    support::wait_until("the created topic to be listed", WAIT, async || {
        listed().await.is_some()
    })
    .await;
    let topic = listed().await.expect("a created topic is listed");
    let partitions = backend.kafka.then_some(3);
    assert_eq!(topic.partitions, partitions, "{}", backend.name);
    assert!(
        !backend.broker.create_topic(&spec).await.unwrap(),
        "{}: an existing topic is left as it is",
        backend.name
    );

    if backend.mock_cluster {
        let error = backend.broker.delete_topic(&name).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Rejected);
        assert!(
            error.to_string().contains("cannot delete topics")
                && error.to_string().contains("Restart it"),
            "the embedded broker says why and what to do: {error}"
        );
        assert!(listed().await.is_some(), "a refused delete deletes nothing");
        return;
    }
    assert!(
        backend.broker.delete_topic(&name).await.unwrap(),
        "{}",
        backend.name
    );
    support::wait_until("the deleted topic to leave the list", WAIT, async || {
        listed().await.is_none()
    })
    .await;
    assert!(
        !backend.broker.delete_topic(&name).await.unwrap(),
        "{}: deleting a missing topic says so",
        backend.name
    );
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod kafka_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::kafka().await).await;
                }
            )*
        }
        mod second_kafka_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(backend) = super::second_kafka(stringify!($test)).await {
                        super::$test(backend).await;
                    }
                }
            )*
        }
        mod pubsub_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::pubsub().await).await;
                }
            )*
        }
    };
}

conformance!(
    round_trip_without_loss_or_duplicates,
    headers_and_content_type_survive,
    messages_of_one_key_keep_their_order,
    a_nack_brings_the_message_back,
    a_member_leaving_unsettled_hands_the_message_on,
    two_members_share_the_load_and_lose_nothing,
    a_restarted_member_resumes_after_what_it_acknowledged,
    a_group_starting_at_latest_gets_what_follows_its_subscription,
    empty_and_large_payloads_pass,
    bad_names_are_refused_with_the_rule,
    topics_are_listed_created_and_deleted,
);

/// A member that closed holds nothing back: with an ack deadline of 10 minutes, every message
/// published after it closed reaches the next member at once. The Pub/Sub emulator as shipped
/// fails this (it takes closed streams for alive and leases them messages, each held for the
/// ack deadline), which switchyard's launcher fixes (`pubsub_emulator::stream_fix`); real
/// Pub/Sub, like Kafka's group protocol, forgets a member that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_a_closed_member_holds_no_messages() {
    let mut config = support::pubsub_config().await;
    config.ack_deadline_s = 600;
    let backend = pubsub_with(config).await;
    let topic = backend.topic("closed", 1).await;
    let group = support::unique("g");
    let closed = backend.member(&group, &topic).await;
    // Its streams are open and served once it has received something.
    backend
        .publish_all(vec![message(&topic, None, b"warm-up")])
        .await;
    next(closed.as_ref()).await.ack().unwrap();
    closed.close().await.unwrap();

    let next_member = backend.member(&group, &topic).await;
    let sent: BTreeSet<Vec<u8>> = (0..20).map(|i| format!("{i}").into_bytes()).collect();
    backend
        .publish_all(
            sent.iter()
                .map(|payload| message(&topic, None, payload))
                .collect(),
        )
        .await;
    let mut received = BTreeSet::new();
    while received.len() < sent.len() {
        let delivery = tokio::time::timeout(WAIT, next_member.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {} messages within {WAIT:?}: the others are held for a closed \
                     member",
                    received.len(),
                    sent.len()
                )
            })
            .unwrap();
        received.insert(delivery.message.payload.clone());
        delivery.ack().unwrap();
    }
    assert_eq!(received, sent);
    next_member.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_a_missing_subscription_is_reported_when_resources_are_not_created() {
    let mut config = support::pubsub_config().await;
    config.create_resources = false;
    let broker = PubSub::connect(config).await.unwrap();
    let err = broker
        .subscribe(&SubscriptionSpec {
            group: support::unique("nobody"),
            topics: vec!["requests".into()],
            start: StartPosition::Earliest,
            guarantee: Default::default(),
            isolation: Default::default(),
        })
        .await
        .err()
        .expect("a missing subscription is an error");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");
    assert_eq!(err.code(), Some("NotFound"), "{err:?}");
    assert!(err.to_string().contains("not found"), "{err}");
    assert!(err.to_string().contains("create_resources"), "{err}");
}

/// Kafka only: a batch compressed with each codec switchyard's librdkafka is built with
/// (`compression.type`: gzip, snappy, lz4, zstd) is stored by the broker and read back as
/// sent. The publisher is a client of its own on `bootstrap`, with the codec set as users set
/// it, a property of `[broker.kafka]`.
async fn every_compression_codec_round_trips(backend: Backend) {
    let bootstrap = backend.bootstrap.clone().expect("a Kafka-protocol broker");
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let topic = backend.topic(&format!("zip-{codec}"), 1).await;
        let member = backend.member(&support::unique("g"), &topic).await;
        let mut config = KafkaConfig::new(bootstrap.clone());
        config.properties.extend(
            [("compression.type", codec), ("linger.ms", "20")].map(|(k, v)| (k.into(), v.into())),
        );
        let publisher = Kafka::connect(config)
            .await
            .unwrap()
            .publisher()
            .await
            .unwrap();
        // Alike payloads, so the codec has something to squeeze, and distinct, to count.
        let sent: BTreeSet<Vec<u8>> = (0..200)
            .map(|i| format!("{codec} {i} {}", "pipeline ".repeat(40)).into_bytes())
            .collect();
        let mut receipts = Vec::new();
        for payload in &sent {
            receipts.push(
                publisher
                    .publish(message(&topic, None, payload))
                    .await
                    .unwrap(),
            );
        }
        for receipt in receipts {
            receipt
                .wait()
                .await
                .unwrap_or_else(|e| panic!("{}: a {codec} batch refused: {e}", backend.name));
        }
        let mut received = BTreeSet::new();
        while received.len() < sent.len() {
            let delivery = next(member.as_ref()).await;
            received.insert(delivery.message.payload.clone());
            delivery.ack().unwrap();
        }
        assert_eq!(received, sent, "{}: {codec}", backend.name);
        member.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_every_compression_codec_round_trips() {
    every_compression_codec_round_trips(kafka().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_kafka_every_compression_codec_round_trips() {
    let test = "second_kafka_every_compression_codec_round_trips";
    if let Some(backend) = second_kafka(test).await {
        every_compression_codec_round_trips(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_has_no_subscription_to_be_missing() {
    // Kafka creates a consumer group on first use: subscribing with a new group is not an
    // error, it starts at `start`. The Pub/Sub test above has no Kafka counterpart.
    let backend = kafka().await;
    let topic = backend.topic("newgroup", 1).await;
    let member = backend.member(&support::unique("fresh"), &topic).await;
    backend
        .publish_all(vec![message(&topic, None, b"first")])
        .await;
    assert_eq!(next(member.as_ref()).await.message.payload, b"first");
    member.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoints_fail_within_the_bounded_wait() {
    // Port 9 (discard): nothing listens there, and no test's broker can take it.
    let address = "127.0.0.1:9";

    let mut kafka = KafkaConfig::new(address.to_string());
    kafka.connect_timeout_ms = 1_500;
    let mut pubsub = PubSubConfig::new("switchyard-test");
    pubsub.endpoint = Some(format!("http://{address}"));
    pubsub.anonymous = true;
    pubsub.connect_timeout_ms = 1_500;

    let started = Instant::now();
    let kafka_error = Kafka::connect(kafka).await.unwrap_err();
    let pubsub_error = PubSub::connect(pubsub).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    for (error, fix) in [
        (kafka_error, "switchyard broker"),
        (pubsub_error, "emulator"),
    ] {
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{error:?}");
        let text = error.to_string();
        assert!(text.contains(&address.to_string()), "{text}");
        assert!(text.contains(fix), "{text}");
    }
}

/// A subscription created with a dead-letter topic carries the policy, and every redelivery
/// after a nack counts its attempt. Said explicitly: the emulator does not forward a message
/// to the dead-letter topic after the last attempt (its stream fails instead), so the final
/// move is Pub/Sub's own promise and is not checked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_dead_letter_policy_is_set_and_attempts_are_counted() {
    use google_cloud_pubsub::client::SubscriptionAdmin;

    let mut config = support::pubsub_config().await;
    let endpoint = config.endpoint.clone().unwrap();
    let dead_letters = support::unique("dead");
    config.dead_letter_topic = Some(dead_letters.clone());
    config.max_delivery_attempts = 7;
    let backend = pubsub_with(config.clone()).await;
    let topic = backend.topic("poison", 1).await;
    let group = support::unique("g");
    let member = backend.member(&group, &topic).await;
    backend
        .publish_all(vec![message(&topic, None, b"poison")])
        .await;
    for attempt in 1..=3u32 {
        let delivery = next(member.as_ref()).await;
        assert_eq!(delivery.message.payload, b"poison");
        assert_eq!(delivery.message.delivery_attempt, Some(attempt));
        delivery.nack().unwrap();
    }
    let delivery = next(member.as_ref()).await;
    assert_eq!(delivery.message.delivery_attempt, Some(4));
    delivery.ack().unwrap();
    member.close().await.unwrap();

    let admin = SubscriptionAdmin::builder()
        .with_endpoint(endpoint)
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .unwrap();
    let subscription = admin
        .get_subscription()
        .set_subscription(config.subscription_path(&config.subscription_for(&group, &topic, 1)))
        .send()
        .await
        .unwrap();
    let policy = subscription
        .dead_letter_policy
        .expect("a dead-letter policy");
    assert_eq!(policy.dead_letter_topic, config.topic_path(&dead_letters));
    assert_eq!(policy.max_delivery_attempts, 7);
}

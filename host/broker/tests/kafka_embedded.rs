//! Proves the Kafka backend against the embedded Kafka-protocol broker, over real TCP
//! connections: messages round-trip with keys, headers and content type; a message that was
//! not acknowledged is delivered again to the next member of the group, while an acknowledged
//! one is not; the embedded broker on a fixed address serves clients that know only that
//! address (other processes, kcat); a producer whose local queue is full waits instead of
//! dropping; a burst of keyless messages is spread evenly over the partitions in runs of 16 KiB
//! (each partition within one run of its share, so the embedded broker's 5 MiB per partition
//! loses none of it), by a client of this process's embedded broker and by one that knows only
//! its address; a member says when it has joined its group;
//! a new group at the earliest has its start committed when it subscribes (so its first fetch
//! does not wait for librdkafka's 100 ms offset-reset backoff);
//! an unreachable broker fails within the bounded wait with an error that says what to do; a
//! publisher behind a window sends only as far ahead as its consumer has caught up; an offset
//! commit the broker refuses is logged, and so is the one that succeeds after it.

use switchyard_testing as support;

use std::time::{Duration, Instant};

use switchyard_broker::kafka::{EmbeddedKafka, Kafka, KafkaConfig};
use switchyard_broker::window::PublishWindow;
use switchyard_broker::{Broker, ErrorKind, OutgoingMessage, TopicSpec};

/// Creates `topic` with `partitions` partitions.
async fn create_topic(broker: &dyn Broker, topic: &str, partitions: i32) {
    broker
        .ensure_topics(&[TopicSpec {
            name: topic.into(),
            partitions,
        }])
        .await
        .unwrap();
}

/// A text message with `key`, also named by its `request-id` header.
fn keyed(topic: &str, key: &str, payload: &[u8]) -> OutgoingMessage {
    OutgoingMessage {
        topic: topic.into(),
        key: Some(key.as_bytes().to_vec()),
        payload: payload.to_vec(),
        headers: vec![("request-id".into(), key.into())],
        content_type: Some("text/plain".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_round_trip_with_keys_headers_and_content_type() {
    let (_cluster, broker) = support::embedded().await;
    let topic = support::unique("roundtrip");
    create_topic(broker.as_ref(), &topic, 1).await;
    let publisher = broker.publisher().await.unwrap();
    let mut receipts = Vec::new();
    for i in 0..20u8 {
        let receipt = publisher
            .publish(OutgoingMessage {
                topic: topic.clone(),
                key: Some(vec![b'k', i]),
                payload: vec![i; usize::from(i)],
                headers: vec![("n".into(), i.to_string()), ("empty".into(), String::new())],
                content_type: Some("application/octet-stream".into()),
            })
            .await
            .unwrap();
        receipts.push(receipt);
    }
    for receipt in receipts {
        receipt.wait().await.unwrap();
    }

    let subscriber = support::member(broker.as_ref(), &support::unique("g"), &topic).await;
    for i in 0..20u8 {
        let delivery = support::receive(subscriber.as_ref(), "a delivery").await;
        let m = &delivery.message;
        assert_eq!(m.topic, topic);
        assert_eq!(
            m.key.as_deref(),
            Some(&[b'k', i][..]),
            "one partition keeps the order"
        );
        assert_eq!(m.payload, vec![i; usize::from(i)]);
        assert_eq!(
            m.headers,
            vec![
                ("empty".to_string(), String::new()),
                ("n".to_string(), i.to_string()),
            ],
            "headers arrive sorted by name, as on every backend"
        );
        assert_eq!(m.content_type.as_deref(), Some("application/octet-stream"));
        delivery.ack().unwrap();
    }
    subscriber.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_messages_go_to_the_next_member_and_acknowledged_ones_do_not() {
    let (_cluster, broker) = support::embedded().await;
    let topic = support::unique("redeliver");
    let group = support::unique("group");
    create_topic(broker.as_ref(), &topic, 1).await;
    support::publish(broker.as_ref(), keyed(&topic, "first", b"1")).await;
    support::publish(broker.as_ref(), keyed(&topic, "second", b"2")).await;

    // Member A acknowledges the first message and fails the second (never acknowledges it),
    // then leaves the group.
    let a = support::member(broker.as_ref(), &group, &topic).await;
    let first = a.next().await.unwrap();
    assert_eq!(first.message.payload, b"1");
    first.ack().unwrap();
    let second = a.next().await.unwrap();
    assert_eq!(second.message.payload, b"2");
    drop(second);
    a.close().await.unwrap();

    // Member B of the same group gets the second message again, not the first.
    let b = support::member(broker.as_ref(), &group, &topic).await;
    let again = support::receive(b.as_ref(), "redelivery").await;
    assert_eq!(
        again.message.payload, b"2",
        "the unsettled message comes back first"
    );
    again.ack().unwrap();
    b.close().await.unwrap();

    // And after B acknowledged it, a third member gets nothing old.
    support::publish(broker.as_ref(), keyed(&topic, "third", b"3")).await;
    let c = support::member(broker.as_ref(), &group, &topic).await;
    let next = support::receive(c.as_ref(), "the third message").await;
    assert_eq!(next.message.payload, b"3");
    next.ack().unwrap();
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_within_the_bounded_wait() {
    // Port 9 (discard): nothing listens there, and no test's broker can take it.
    let address = "127.0.0.1:9";
    let mut config = KafkaConfig::new(address);
    config.connect_timeout_ms = 1_500;
    let started = Instant::now();
    let err = Kafka::connect(config).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&address.to_string()), "{text}");
    assert!(text.contains("switchyard broker"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_on_a_fixed_address_serves_plain_kafka_clients() {
    // Port 0: the broker takes a free port (a probed and freed one can be taken by another
    // test's broker first).
    let cluster = EmbeddedKafka::start(Some("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let address = cluster.bootstrap_servers().to_string();
    let topic = support::unique("fixed");
    // As `switchyard broker --topic` does: the mock broker has no CreateTopics API.
    cluster
        .create_topic(&TopicSpec {
            name: topic.clone(),
            partitions: 2,
        })
        .unwrap();

    // A client that knows only the address, as another process would.
    let config = KafkaConfig::for_embedded(address);
    let broker = Kafka::connect(config).await.unwrap();
    create_topic(&broker, &topic, 2).await;
    support::publish(&broker, keyed(&topic, "k", b"through the relay")).await;
    let subscriber = support::member(&broker, &support::unique("g"), &topic).await;
    let delivery = support::receive(subscriber.as_ref(), "a delivery").await;
    assert_eq!(delivery.message.payload, b"through the relay");
    delivery.ack().unwrap();
    subscriber.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_local_queue_makes_the_publisher_wait_and_nothing_is_dropped() {
    // Port 0: the broker takes a free port (a probed and freed one can be taken by another
    // test's broker first).
    let cluster = EmbeddedKafka::start(Some("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let address = cluster.bootstrap_servers().to_string();
    let topic = support::unique("backpressure");
    cluster
        .create_topic(&TopicSpec {
            name: topic.clone(),
            partitions: 1,
        })
        .unwrap();
    let mut config = KafkaConfig::for_embedded(address);
    // Room for 5 messages in librdkafka's queue, and a linger that keeps them there a while.
    config
        .properties
        .insert("queue.buffering.max.messages".into(), "5".into());
    config.properties.insert("linger.ms".into(), "20".into());
    let broker = Kafka::connect(config).await.unwrap();
    let publisher = broker.publisher().await.unwrap();
    let mut receipts = Vec::new();
    for i in 0..300u32 {
        let receipt = publisher
            .publish(OutgoingMessage {
                topic: topic.clone(),
                payload: i.to_be_bytes().to_vec(),
                ..OutgoingMessage::default()
            })
            .await
            .expect("a full queue waits instead of failing");
        receipts.push(receipt);
    }
    for receipt in receipts {
        receipt.wait().await.unwrap();
    }
    let subscriber = support::member(&broker, &support::unique("g"), &topic).await;
    for i in 0..300u32 {
        let delivery = support::receive(subscriber.as_ref(), "one of the 300 messages").await;
        assert_eq!(
            delivery.message.payload,
            i.to_be_bytes(),
            "in order, none missing"
        );
        delivery.ack().unwrap();
    }
    subscriber.close().await.unwrap();
}

/// Publishes 12,000 keyless messages of 1 KiB at once to `topic` (8 partitions) and checks
/// where they went.
async fn a_burst_is_spread_in_runs(broker: &dyn Broker, topic: &str) {
    // The embedded broker keeps 5 MiB per partition and drops older data beyond it, read or
    // not; 12 MiB sent at once into 8 partitions fits only if no partition takes much more
    // than its share, and batches of one message each make its fetches slow.
    const MESSAGES: u32 = 12_000;
    let publisher = broker.publisher().await.unwrap();
    let mut receipts = Vec::new();
    for i in 0..MESSAGES {
        let mut payload = vec![0u8; 1024];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        let message = OutgoingMessage {
            topic: topic.into(),
            payload,
            ..OutgoingMessage::default()
        };
        receipts.push(publisher.publish(message).await.unwrap());
    }
    for receipt in receipts {
        receipt.wait().await.unwrap();
    }
    let subscriber = support::member(broker, &support::unique("g"), topic).await;
    let mut seen = std::collections::HashMap::new();
    let mut partitions = std::collections::HashMap::<String, u32>::new();
    while seen.len() < MESSAGES as usize {
        let delivery = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {MESSAGES} arrived", seen.len()))
            .unwrap();
        let payload = &delivery.message.payload;
        let index = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let partition = delivery.message.position.split('@').next().unwrap_or("");
        if seen.insert(index, partition.to_string()).is_none() {
            *partitions.entry(partition.to_string()).or_default() += 1;
        }
        delivery.ack().unwrap();
    }
    subscriber.close().await.unwrap();
    // Runs of 16 KiB (16 of these messages) round the partitions give each 1,500 to within
    // one run; the publisher learns the topic's partition count before the first message.
    assert_eq!(
        partitions.len(),
        8,
        "every partition got some: {partitions:?}"
    );
    for (partition, count) in &partitions {
        assert!(
            count.abs_diff(MESSAGES / 8) <= 16,
            "partition {partition} got {count} of {MESSAGES}, not an eighth: {partitions:?}"
        );
    }
    // Runs, not one message here and the next there: most messages were sent to the
    // partition of the one before (15 of 16 in a run; 1 of 8 when chosen at random).
    let beside_the_one_before = (1..MESSAGES).filter(|i| seen[i] == seen[&(i - 1)]).count();
    assert!(
        beside_the_one_before > MESSAGES as usize / 2,
        "only {beside_the_one_before} of {MESSAGES} messages went to the partition of the one \
         sent before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_keyless_messages_is_spread_in_runs_and_none_is_lost() {
    let (_cluster, broker) = support::embedded().await;
    let topic = support::unique("burst");
    create_topic(broker.as_ref(), &topic, 8).await;
    a_burst_is_spread_in_runs(broker.as_ref(), &topic).await;
}

/// A client that knows only the address (as of `switchyard broker`) finds out it talks to
/// the embedded broker, and spreads the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_another_process_s_embedded_broker_spreads_a_burst_in_runs_too() {
    let cluster = EmbeddedKafka::start(Some("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let topic = support::unique("burst");
    cluster
        .create_topic(&TopicSpec {
            name: topic.clone(),
            partitions: 8,
        })
        .unwrap();
    let config = KafkaConfig::for_embedded(cluster.bootstrap_servers());
    let broker = Kafka::connect(config).await.unwrap();
    a_burst_is_spread_in_runs(&broker, &topic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_says_when_it_has_joined_its_group() {
    let (_cluster, broker) = support::embedded().await;
    let topic = support::unique("joined");
    create_topic(broker.as_ref(), &topic, 2).await;
    let subscriber = support::member(broker.as_ref(), &support::unique("g"), &topic).await;
    // Not a member until someone receives, which drives the join.
    let early = tokio::time::timeout(Duration::from_millis(300), subscriber.joined()).await;
    assert!(early.is_err(), "joined before anyone received");
    let receiving = tokio::spawn({
        let subscriber = subscriber.clone();
        async move { subscriber.next().await }
    });
    tokio::time::timeout(Duration::from_secs(30), subscriber.joined())
        .await
        .expect("the member joins within 30 s")
        .unwrap();
    support::publish(broker.as_ref(), keyed(&topic, "k", b"after the join")).await;
    let delivery = tokio::time::timeout(Duration::from_secs(30), receiving)
        .await
        .expect("the message arrives")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.message.payload, b"after the join");
    delivery.ack().unwrap();
    subscriber.close().await.unwrap();
}

/// librdkafka looks up the start of a partition that has no committed offset only after a
/// fixed 100 ms, fetching nothing meanwhile; so a new group at the earliest gets each
/// partition's start committed when it subscribes, and still receives what was published
/// before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_at_the_earliest_has_its_start_committed_when_it_subscribes() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let (cluster, broker) = support::embedded().await;
    let (topic, group) = (support::unique("start"), support::unique("g"));
    create_topic(broker.as_ref(), &topic, 2).await;
    for key in ["a", "b", "c", "d"] {
        support::publish(broker.as_ref(), keyed(&topic, key, key.as_bytes())).await;
    }
    let member = support::member(broker.as_ref(), &group, &topic).await;
    let servers = cluster.bootstrap_servers().to_string();
    let (group_read, topic_read) = (group.clone(), topic.clone());
    let committed = tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("group.id", &group_read)
            .create()
            .unwrap();
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&topic_read, 0);
        partitions.add_partition(&topic_read, 1);
        reader
            .committed_offsets(partitions, Duration::from_secs(10))
            .unwrap()
            .elements()
            .iter()
            .map(|element| element.offset())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(
        committed,
        [Offset::Offset(0), Offset::Offset(0)],
        "each partition's start is committed before the member has received anything"
    );
    let mut received = Vec::new();
    for _ in 0..4 {
        let delivery = support::receive(member.as_ref(), "a message published before").await;
        received.push(String::from_utf8(delivery.message.payload.clone()).unwrap());
        delivery.ack().unwrap();
    }
    received.sort();
    assert_eq!(received, ["a", "b", "c", "d"]);
    member.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_publisher_sends_only_as_far_as_its_consumer_has_caught_up() {
    let (_cluster, broker) = support::embedded().await;
    let topic = support::unique("window");
    create_topic(broker.as_ref(), &topic, 1).await;
    let window = PublishWindow::new(3);
    let publisher = window.publisher(broker.publisher().await.unwrap());
    let message = |i: u8| OutgoingMessage {
        topic: topic.clone(),
        payload: vec![i],
        ..OutgoingMessage::default()
    };
    for i in 0..3 {
        let receipt = publisher.publish(message(i)).await.unwrap();
        receipt.wait().await.unwrap();
    }
    assert_eq!(window.room(), 0);

    // The fourth waits until the consumer says it has caught up with one more: polled before
    // that, it is still pending.
    let mut fourth = publisher.publish(message(3));
    assert!(
        futures::poll!(&mut fourth).is_pending(),
        "sent without room in the window"
    );
    window.completed(1);
    tokio::time::timeout(Duration::from_secs(10), fourth)
        .await
        .expect("sent once there was room")
        .unwrap()
        .wait()
        .await
        .unwrap();
    // Counts lower than one already given make no room; higher ones make room for the rest.
    window.completed(1);
    assert_eq!(window.room(), 0);
    window.completed(5);
    assert_eq!(window.room(), 4);

    let subscriber = support::member(broker.as_ref(), &support::unique("g"), &topic).await;
    for i in 0..4u8 {
        let delivery = support::receive(subscriber.as_ref(), "a delivery").await;
        assert_eq!(delivery.message.payload, vec![i]);
        delivery.ack().unwrap();
    }
    subscriber.close().await.unwrap();
}

/// librdkafka commits offsets in the background and, when the broker refuses, tries again at
/// the next interval without a word: a member whose commits keep failing would go on handling
/// messages that a restart hands out again. The refusal is logged, and so is the commit that
/// succeeds after it; the offsets committed then hold for the group's next member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_offset_commit_is_logged_and_so_is_the_commit_after_it() {
    use rdkafka::types::RDKafkaErrorCode;
    use switchyard_broker::kafka::embedded::ApiKey;

    let mut log = support::capture_logs();
    let (cluster, broker) = support::embedded().await;
    let (topic, group) = (support::unique("commits"), support::unique("g"));
    support::create_topics(broker.as_ref(), &[&topic]).await;
    support::publish(broker.as_ref(), keyed(&topic, "k", b"first")).await;
    let member = support::member(broker.as_ref(), &group, &topic).await;
    let first = support::receive(member.as_ref(), "the first message").await;
    cluster.fail_requests(
        ApiKey::OffsetCommit,
        &[RDKafkaErrorCode::GroupAuthorizationFailed; 2],
    );
    first.ack().unwrap();

    let subject = format!("group {group:?} committing offsets");
    let both_logged = async {
        for (what, said) in [
            (
                "the refusal",
                "refused to commit the offsets of 1 partition(s)",
            ),
            ("the commit after it", "working again"),
        ] {
            let logged = log.wait_for(|log| {
                log.lines()
                    .any(|line| line.contains(&subject) && line.contains(said))
            });
            tokio::time::timeout(Duration::from_secs(30), logged)
                .await
                .unwrap_or_else(|_| panic!("{what} was not logged ({said:?})"))
                .unwrap();
        }
    };
    // librdkafka reports a commit's outcome to a member that is receiving (polling), as a
    // member of a running handler always is.
    tokio::select! {
        () = both_logged => {}
        delivery = member.next() => panic!("nothing more was published: {:?}", delivery.map(|d| d.message)),
    }
    member.close().await.unwrap();

    support::publish(broker.as_ref(), keyed(&topic, "k", b"second")).await;
    let next_member = support::member(broker.as_ref(), &group, &topic).await;
    let next = support::receive(next_member.as_ref(), "the second message").await;
    assert_eq!(next.message.payload, b"second", "the first was committed");
    next.ack().unwrap();
    next_member.close().await.unwrap();
}

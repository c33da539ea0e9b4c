//! Proves exactly-once subscriptions on Kafka (`Guarantee::ExactlyOnce`), against the second
//! Kafka-protocol broker (Tansu, or the cluster `KAFKA_BOOTSTRAP` names; see
//! `switchyard_testing::second_kafka`), the one broker here that stores the offsets committed in
//! a transaction:
//! - what a member acknowledged with its outputs commits with its offsets: the outputs reach
//!   the output topic, and a member that joins the group afterwards starts after them;
//! - a member whose transactional id another member took is fenced: its next transaction is
//!   refused (the receipt says the message goes elsewhere), its offset does not move, and the
//!   member that fenced it handles that message again and commits it;
//! - the brokers that cannot run exactly-once refuse it, saying why: the embedded broker
//!   (librdkafka's mock cluster never stores transactional offsets) and the same mock reached
//!   as a cluster (`switchyard broker`: found out by asking it to keep a transaction's
//!   offset). Pub/Sub's exactly-once delivery is proven in `pubsub_exactly_once.rs`.
//!
//! Readers of Tansu 0.6.0 (and of the embedded broker) see the records of aborted transactions
//! even with `read_committed`; the fenced member's outputs are counted and printed, not
//! asserted away. Tansu 0.6.0 also stops serving a group for good once a member joined beside
//! another and both left, so each group here has one member at a time.

use switchyard_testing as support;

use std::sync::Arc;
use std::time::Duration;

use switchyard_broker::kafka::Kafka;
use switchyard_broker::{
    Broker, Delivery, ErrorKind, Guarantee, OutgoingMessage, StartPosition, Subscriber,
    SubscriptionSpec,
};

const WAIT: Duration = Duration::from_secs(60);
/// How long a topic stays quiet before a reader takes it to hold nothing more.
const QUIET: Duration = Duration::from_secs(8);

fn exactly_once(group: &str, topic: &str, transactional_id: &str) -> SubscriptionSpec {
    SubscriptionSpec {
        group: group.into(),
        topics: vec![topic.into()],
        start: StartPosition::Earliest,
        guarantee: Guarantee::ExactlyOnce {
            transactional_id: transactional_id.into(),
        },
        isolation: Default::default(),
    }
}

fn message(topic: &str, payload: String) -> OutgoingMessage {
    OutgoingMessage {
        topic: topic.into(),
        payload: payload.into_bytes(),
        ..OutgoingMessage::default()
    }
}

async fn next(member: &dyn Subscriber) -> Delivery {
    tokio::time::timeout(WAIT, member.next())
        .await
        .expect("a message in time")
        .expect("a message")
}

fn payload(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.message.payload).into_owned()
}

/// Handles `delivery` as a handler would: its output is `out-` and its payload, sent to
/// `output` in the transaction that commits its offset.
async fn handle(delivery: Delivery, output: &str) -> Result<(), switchyard_broker::BrokerError> {
    let reply = message(output, format!("out-{}", payload(&delivery)));
    delivery.ack_with(vec![reply])?.wait().await
}

/// Everything on `topic`, sorted, until it has been quiet for a few seconds.
async fn read_all(broker: &dyn Broker, topic: &str) -> Vec<String> {
    let mut seen = support::read_all(broker, topic, QUIET).await;
    seen.sort();
    seen
}

/// The second Kafka broker, a client of it, an input topic holding `inputs` messages ("0",
/// "1", …) and an output topic; `None` without a second broker.
struct Setup {
    second: support::SecondKafka,
    broker: Arc<dyn Broker>,
    input: String,
    output: String,
}

async fn setup(test: &str, inputs: usize) -> Option<Setup> {
    let second = support::second_kafka(test)?;
    let broker: Arc<dyn Broker> = Arc::new(Kafka::connect(second.kafka_config()).await.unwrap());
    let (input, output) = (support::unique("in"), support::unique("out"));
    support::create_topics(broker.as_ref(), &[&input, &output]).await;
    for number in 0..inputs {
        support::publish(broker.as_ref(), message(&input, number.to_string())).await;
    }
    Some(Setup {
        second,
        broker,
        input,
        output,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_offsets_commit_together() {
    // The broker's process lives as long as `_second`.
    let Some(Setup {
        second: _second,
        broker,
        input,
        output,
    }) = setup("outputs_and_offsets_commit_together", 8).await
    else {
        return;
    };
    let group = support::unique("g");
    let member = broker
        .subscribe(&exactly_once(&group, &input, &support::unique("t")))
        .await
        .unwrap();
    for expected in 0..5 {
        let delivery = next(member.as_ref()).await;
        assert_eq!(payload(&delivery), expected.to_string());
        handle(delivery, &output).await.unwrap();
    }
    member.close().await.unwrap();

    // The group stands after the five: a new member starts at the sixth.
    let after = broker
        .subscribe(&exactly_once(&group, &input, &support::unique("t")))
        .await
        .unwrap();
    let sixth = next(after.as_ref()).await;
    assert_eq!(
        payload(&sixth),
        "5",
        "the offsets committed with the outputs"
    );
    sixth.nack().unwrap();
    after.close().await.unwrap();
    assert_eq!(
        read_all(broker.as_ref(), &output).await,
        ["out-0", "out-1", "out-2", "out-3", "out-4"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_transactional_id_was_taken_is_fenced_and_its_message_handled_again() {
    let test = "a_member_whose_transactional_id_was_taken_is_fenced";
    let Some(Setup {
        second,
        broker,
        input,
        output,
    }) = setup(test, 3).await
    else {
        return;
    };
    let (group, id) = (support::unique("g"), support::unique("t"));
    let zombie = broker
        .subscribe(&exactly_once(&group, &input, &id))
        .await
        .unwrap();
    for _ in 0..2 {
        let delivery = next(zombie.as_ref()).await;
        handle(delivery, &output).await.unwrap();
    }
    let held = next(zombie.as_ref()).await;
    assert_eq!(payload(&held), "2");

    // A member started with the same transactional id (a host restarted while the old one
    // still runs) fences the old one's producer as it starts. It joins another group here:
    // Tansu 0.6.0 stops serving a group for good once a member joined beside another and both
    // left, so the test keeps to one member per group at a time.
    let successor = broker
        .subscribe(&exactly_once(&support::unique("other"), &input, &id))
        .await
        .unwrap();
    let refused = handle(held, &output)
        .await
        .expect_err("the fenced member's transaction is refused");
    assert_eq!(refused.kind(), ErrorKind::Closed, "{refused:#}");
    assert!(refused.to_string().contains("fenced"), "{refused:#}");
    zombie.close().await.unwrap();
    successor.close().await.unwrap();

    // The next member of the group starts at the refused message: its offset did not move.
    let next_member = broker
        .subscribe(&exactly_once(&group, &input, &id))
        .await
        .unwrap();
    let again = next(next_member.as_ref()).await;
    assert_eq!(payload(&again), "2", "the refused message comes again");
    handle(again, &output).await.unwrap();
    next_member.close().await.unwrap();

    let outputs = read_all(broker.as_ref(), &output).await;
    let twos = outputs.iter().filter(|o| *o == "out-2").count();
    eprintln!(
        "{test}: outputs {outputs:?}: out-2 {twos} time(s) (a copy from the fenced member would \
         be in an aborted transaction, which {} shows to read_committed readers)",
        second.name
    );
    for expected in ["out-0", "out-1", "out-2"] {
        assert!(outputs.iter().any(|o| o == expected), "{outputs:?}");
    }
    assert_eq!(
        outputs.iter().filter(|o| *o != "out-2").count(),
        2,
        "{outputs:?}"
    );
}

/// Subscribing exactly-once to an existing topic on `broker`: the refusal.
async fn refusal(broker: &dyn Broker) -> switchyard_broker::BrokerError {
    let topic = support::unique("in");
    support::create_topics(broker, &[&topic]).await;
    let error = broker
        .subscribe(&exactly_once(&support::unique("g"), &topic, "t"))
        .await
        .err()
        .expect("refused");
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_exactly_once_saying_why() {
    let (_cluster, broker) = support::embedded().await;
    let text = refusal(broker.as_ref()).await.to_string();
    assert!(
        text.contains("never stores the offsets committed in them"),
        "{text}"
    );
}

/// `switchyard broker` is the same mock cluster, reached as any Kafka cluster is: the client
/// cannot tell it by its address, so it asks the cluster whether it keeps a committed
/// transaction's offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_embedded_broker_is_found_out_and_refused() {
    let cluster =
        switchyard_broker::kafka::EmbeddedKafka::start(Some("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
    let config = switchyard_broker::kafka::KafkaConfig::for_embedded(cluster.bootstrap_servers());
    let broker = Kafka::connect(config).await.unwrap();
    let text = refusal(&broker).await.to_string();
    assert!(
        text.contains("does not keep the offsets committed in transactions"),
        "{text}"
    );
}

//! Proves exactly-once subscriptions on Pub/Sub (`Guarantee::ExactlyOnce`), against Google's
//! emulator, which honours a subscription's exactly-once delivery (an ack of an expired lease,
//! or a second ack, is refused there and accepted silently on an at-least-once subscription):
//! - the member creates its subscription with exactly-once delivery, and refuses to run on one
//!   that exists without it, naming the `gcloud` command that turns it on;
//! - `ack_with` stores the outputs, then confirms the acknowledgement: what was confirmed never
//!   comes again, not even to a new member after the first left (where an at-least-once
//!   subscription on the emulator delivers acknowledged messages again), while a message
//!   dropped unsettled comes again;
//! - an acknowledgement Pub/Sub does not confirm (the member closed first) is reported, of
//!   kind `Closed`, and the message is handled again by the next member: Pub/Sub has no
//!   transactions, so its outputs are then sent twice, which the test shows.

use switchyard_testing as support;

use std::sync::Arc;
use std::time::Duration;

use switchyard_broker::{
    Broker, Delivery, ErrorKind, Guarantee, OutgoingMessage, StartPosition, Subscriber,
    SubscriptionSpec,
};

/// Longer than the subscriptions' ack deadline (10 s): a message that was not confirmed is
/// delivered again within it.
const REDELIVERY: Duration = Duration::from_secs(15);

fn exactly_once(group: &str, topic: &str) -> SubscriptionSpec {
    SubscriptionSpec {
        group: group.into(),
        topics: vec![topic.into()],
        start: StartPosition::Earliest,
        guarantee: Guarantee::ExactlyOnce {
            transactional_id: "unused-on-pubsub".into(),
        },
        isolation: Default::default(),
    }
}

fn text(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.message.payload).into_owned()
}

fn output(topic: &str, payload: &str) -> OutgoingMessage {
    OutgoingMessage {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn publish(broker: &dyn Broker, topic: &str, payloads: &[&str]) {
    for payload in payloads {
        support::publish(broker, output(topic, payload)).await;
    }
}

/// What `reader` receives until nothing comes for a few seconds, sorted.
async fn drain(reader: &dyn Subscriber) -> Vec<String> {
    let mut seen = support::drain(reader, Duration::from_secs(5)).await;
    seen.sort();
    seen
}

/// An input and an output topic of a test's own, the group of its exactly-once members, and
/// a reader of the output, subscribed before anything is published (a Pub/Sub subscription
/// holds only what came after it).
async fn set_up(broker: &dyn Broker) -> (String, String, String, Arc<dyn Subscriber>) {
    let (input, out, group) = (
        support::unique("eos-in"),
        support::unique("eos-out"),
        support::unique("eos"),
    );
    support::create_topics(broker, &[&input, &out]).await;
    let reader = support::member(broker, &support::unique("reader"), &out).await;
    (input, out, group, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_stored_then_the_ack_confirmed_and_a_confirmed_message_never_comes_again() {
    let broker = support::pubsub().await;
    let (input, out, group, reader) = set_up(broker.as_ref()).await;
    let member = broker
        .subscribe(&exactly_once(&group, &input))
        .await
        .unwrap();
    publish(broker.as_ref(), &input, &["a", "b"]).await;

    let mut confirmed = Vec::new();
    let mut dropped_once = false;
    while confirmed.len() < 2 {
        let delivery = support::receive(member.as_ref(), "request").await;
        let payload = text(&delivery);
        if payload == "b" && !dropped_once {
            // Dropped unsettled: given back, and delivered again.
            dropped_once = true;
            drop(delivery);
            continue;
        }
        assert!(
            !confirmed.contains(&payload),
            "{payload} came again after its acknowledgement was confirmed"
        );
        let outputs = vec![output(&out, &format!("{payload}-out"))];
        delivery
            .ack_with(outputs)
            .expect("an exactly-once subscription takes outputs")
            .wait()
            .await
            .expect("the outputs are stored and the acknowledgement confirmed");
        confirmed.push(payload);
    }
    assert!(dropped_once, "b was never delivered");
    assert_eq!(
        drain(reader.as_ref()).await,
        ["a-out", "b-out"],
        "each confirmed message's output, once (the dropped delivery sent nothing)"
    );

    // The subscription was created with exactly-once delivery: subscribing to it again asks
    // for it and is accepted.
    member.close().await.unwrap();
    let again = broker
        .subscribe(&exactly_once(&group, &input))
        .await
        .unwrap();
    if let Ok(delivery) = tokio::time::timeout(REDELIVERY, again.next()).await {
        panic!(
            "a confirmed message came again to the next member: {:?}",
            delivery.map(|d| text(&d))
        );
    }
    again.close().await.unwrap();
    reader.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_not_confirmed_is_reported_and_the_message_is_handled_again() {
    let broker = support::pubsub().await;
    let (input, out, group, reader) = set_up(broker.as_ref()).await;
    let first = broker
        .subscribe(&exactly_once(&group, &input))
        .await
        .unwrap();
    publish(broker.as_ref(), &input, &["x"]).await;
    let delivery = support::receive(first.as_ref(), "x").await;
    // The member leaves while the message is in hand: its lease is given up, so the
    // acknowledgement that follows cannot be confirmed.
    first.close().await.unwrap();
    let refused = delivery
        .ack_with(vec![output(&out, "x-out")])
        .expect("an exactly-once subscription takes outputs")
        .wait()
        .await
        .expect_err("an acknowledgement after the member left is not confirmed");
    assert_eq!(refused.kind(), ErrorKind::Closed, "{refused}");
    assert!(refused.to_string().contains("handled again"), "{refused}");

    let second = broker
        .subscribe(&exactly_once(&group, &input))
        .await
        .unwrap();
    let again = support::receive(second.as_ref(), "x, again").await;
    assert_eq!(text(&again), "x");
    again
        .ack_with(vec![output(&out, "x-out")])
        .unwrap()
        .wait()
        .await
        .expect("the next member's acknowledgement is confirmed");
    // No transaction took the first output back: a reader sees both.
    assert_eq!(drain(reader.as_ref()).await, ["x-out", "x-out"]);
    second.close().await.unwrap();
    reader.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_without_exactly_once_delivery_is_refused_with_the_fix() {
    let broker = support::pubsub().await;
    let (input, group) = (support::unique("eos-in"), support::unique("alo"));
    support::create_topics(broker.as_ref(), &[&input]).await;
    let at_least_once: Arc<dyn Subscriber> = support::member(broker.as_ref(), &group, &input).await;
    at_least_once.close().await.unwrap();
    let refused = match broker.subscribe(&exactly_once(&group, &input)).await {
        Ok(_) => panic!("an exactly-once member ran on an at-least-once subscription"),
        Err(e) => e,
    };
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    let text = refused.to_string();
    assert!(
        text.contains(&format!(
            "gcloud pubsub subscriptions update {group} --enable-exactly-once-delivery"
        )),
        "{text}"
    );
}

//! Proves that each message a handler handles runs in a `tracing` span shaped as
//! OpenTelemetry's messaging semantic conventions shape a consumer's "process" span, on Kafka
//! (the embedded broker) and on Pub/Sub (Google's emulator): its name is `process TOPIC`, and
//! every `messaging.*` attribute it carries is one the conventions define (checked against
//! the `opentelemetry-semantic-conventions` crate), with the system, topic, group, operation,
//! and the message's place (partition and offset on Kafka, the message id on Pub/Sub).

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_semantic_conventions::attribute as semconv;
use switchyard_broker::{Broker, OutgoingMessage};
use switchyard_runtime::manifest::ComponentConfig;
use switchyard_runtime::{Runtime, RuntimeOptions};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

/// A span's fields, as text.
#[derive(Debug, Default, Clone)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// Keeps the fields of every closed `process` span.
#[derive(Clone, Default)]
struct Recorder {
    closed: Arc<Mutex<Vec<Fields>>>,
}

impl<S> Layer<S> for Recorder
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        if attributes.metadata().name() != "process" {
            return;
        }
        let mut fields = Fields::default();
        attributes.record(&mut fields);
        if let Some(span) = context.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        if let Some(span) = context.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }

    fn on_close(&self, id: Id, context: Context<'_, S>) {
        if let Some(span) = context.span(&id)
            && let Some(fields) = span.extensions_mut().remove::<Fields>()
        {
            self.closed.lock().unwrap().push(fields);
        }
    }
}

/// Every `messaging.*` attribute the host may set, as the conventions spell them.
const CONVENTIONS: &[&str] = &[
    semconv::MESSAGING_SYSTEM,
    semconv::MESSAGING_OPERATION_TYPE,
    semconv::MESSAGING_OPERATION_NAME,
    semconv::MESSAGING_DESTINATION_NAME,
    semconv::MESSAGING_CONSUMER_GROUP_NAME,
    semconv::MESSAGING_BATCH_MESSAGE_COUNT,
    semconv::MESSAGING_MESSAGE_ID,
    semconv::MESSAGING_DESTINATION_PARTITION_ID,
    semconv::MESSAGING_KAFKA_OFFSET,
    semconv::MESSAGING_MESSAGE_BODY_SIZE,
];

/// Runs the test handler on `broker` until it has handled one message; returns the fields of
/// the span it handled it in, and the group.
async fn handle_one(broker: Arc<dyn Broker>, recorder: &Recorder) -> (Fields, String, String) {
    let topic = support::unique("traced");
    let group = support::unique("tracers");
    support::create_topics(broker.as_ref(), &[&topic]).await;
    let runtime = Runtime::new(broker.clone(), RuntimeOptions::default())
        .await
        .unwrap();
    let config = ComponentConfig {
        subscribe: vec![topic.clone()],
        group: Some(group.clone()),
        ..ComponentConfig::new(support::test_handler())
    };
    let handler = runtime
        .start_handler(&runtime.load("traced", &config).unwrap())
        .await
        .unwrap();
    handler.joined().await.unwrap();
    let mut settled = handler.stats().settled();
    let message = OutgoingMessage {
        topic: topic.clone(),
        payload: b"ok".to_vec(),
        ..OutgoingMessage::default()
    };
    support::publish(broker.as_ref(), message).await;
    tokio::time::timeout(support::hosts::WAIT, settled.wait_for(|n| *n >= 1))
        .await
        .expect("the message is handled")
        .unwrap();
    // Stopping ends the settle task, the span's last holder: the span closes.
    handler.stop().await.unwrap();
    let destination = semconv::MESSAGING_DESTINATION_NAME;
    let fields = recorder
        .closed
        .lock()
        .unwrap()
        .iter()
        .find(|fields| fields.0.get(destination) == Some(&topic))
        .cloned()
        .unwrap_or_else(|| panic!("no process span for {topic}"));
    (fields, topic, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_handled_message_runs_in_a_process_span_with_opentelemetry_messaging_attributes() {
    let recorder = Recorder::default();
    let subscriber = Registry::default().with(
        recorder
            .clone()
            .with_filter(tracing_subscriber::filter::LevelFilter::DEBUG),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let (_embedded, kafka) = support::embedded().await;
    let pubsub = support::pubsub().await;
    for (system, broker) in [("kafka", kafka), ("gcp_pubsub", pubsub)] {
        let (fields, topic, group) = handle_one(broker, &recorder).await;
        let field = |name: &str| {
            fields
                .0
                .get(name)
                .unwrap_or_else(|| panic!("{system}: no {name} in {fields:?}"))
                .as_str()
        };
        for name in fields
            .0
            .keys()
            .filter(|name| name.starts_with("messaging."))
        {
            assert!(
                CONVENTIONS.contains(&name.as_str()),
                "{system}: {name} is not an OpenTelemetry messaging attribute"
            );
        }
        assert_eq!(field("otel.name"), format!("process {topic}"));
        assert_eq!(field("otel.kind"), "consumer");
        assert_eq!(field(semconv::MESSAGING_SYSTEM), system);
        assert_eq!(field(semconv::MESSAGING_OPERATION_TYPE), "process");
        assert_eq!(field(semconv::MESSAGING_CONSUMER_GROUP_NAME), group);
        assert_eq!(field(semconv::MESSAGING_MESSAGE_BODY_SIZE), "2");
        assert_eq!(field("switchyard.component"), "traced");
        match system {
            "kafka" => {
                field(semconv::MESSAGING_DESTINATION_PARTITION_ID)
                    .parse::<i32>()
                    .expect("a partition number");
                assert_eq!(field(semconv::MESSAGING_KAFKA_OFFSET), "0", "{fields:?}");
            }
            _ => assert!(!field(semconv::MESSAGING_MESSAGE_ID).is_empty()),
        }
    }
}

//! Proves the Fashion-MNIST pipeline end to end, on both backends and on every inference path:
//! the three components, built for wasm32-wasip2 and run by the host, classify 1,000 test images
//! through a Kafka-protocol broker and through Google's Pub/Sub emulator, each reached over TCP,
//! with the model run by the host through `wasi:nn` (tract on Kafka, ONNX Runtime on Pub/Sub)
//! and, on Kafka, inside the classifier's Wasm. Every request gets exactly one prediction, it
//! names the engine that computed it, and it is the one tract computes offline for the same
//! image (same class; scores within 1e-4, the difference between engines and SIMD widths), so
//! every path reaches the same accuracy.
//!
//! A run of 150,000 requests, fifteen times the test set and several times what the embedded
//! broker keeps per topic, loses nothing either: the demo keeps a window of requests in flight,
//! and fifteen passes over the test set give exactly its accuracy.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use classifier::model::Lenet;
use pipeline_core::IMAGE_BYTES;
use pipeline_core::idx::IdxArray;
use pipeline_core::wire::{ENGINE_WASI_NN, ENGINE_WASM, Prediction, softmax};
use switchyard_broker::BrokerConfig;
use switchyard_broker::kafka::EmbeddedKafka;
use switchyard_broker::kafka::{Kafka, KafkaConfig};
use switchyard_broker::pubsub::PubSubEmulator;
use switchyard_broker::pubsub::{PubSub, PubSubConfig};
use switchyard_broker::{Broker, StartPosition, SubscriptionSpec, TopicSpec};
use switchyard_pipeline::demo::{self, DemoOptions, PREDICTIONS_TOPIC, REQUESTS_TOPIC};
use switchyard_runtime::RuntimeOptions;
use switchyard_runtime::nn::{NnEngine, onnxruntime};
use switchyard_runtime::results::ResultsConfig;

const IMAGES: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_every_request_gets_exactly_the_prediction_tract_computes_offline() {
    check_pipeline_on_kafka(Some(NnEngine::Tract)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_model_inside_wasm_every_request_gets_the_same_prediction() {
    check_pipeline_on_kafka(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_fifteen_times_the_test_set_loses_nothing_and_keeps_its_accuracy() {
    // 150,000 requests of about 1 KiB are several times what the embedded broker keeps (5 MiB
    // in each of 8 partitions), and the producer outruns the classifier many times over:
    // without the window the oldest requests are dropped before they are read (measured: the
    // demo without it lost requests to "offset out of range" at 150,000).
    const LONG_RUN: usize = 150_000;
    tokio::task::spawn_blocking(onnxruntime::install)
        .await
        .unwrap()
        .expect("installing ONNX Runtime");
    let results_dir = tempfile::tempdir().unwrap();
    let options = DemoOptions {
        broker: BrokerConfig::default(),
        images: LONG_RUN,
        rate: None,
        classifier_workers: 2,
        classifier_batch: 32,
        inference: Some(NnEngine::Onnxruntime),
        inference_note: None,
        components: support::components(),
        models: support::models(),
        show_predictions: false,
        stall_timeout: Duration::from_secs(120),
        runtime: RuntimeOptions::default(),
        results: ResultsConfig::Sqlite {
            path: results_dir.path().join("results.sqlite3"),
        },
        progress: false,
        metrics: None,
        delivery: None,
    };
    let report = demo::run(&options).await.expect("the demo runs").report;
    assert_eq!(report.images, LONG_RUN as u64, "{report:?}");
    assert_eq!(report.predictions, LONG_RUN as u64, "{report:?}");
    assert_eq!((report.duplicates, report.failed), (0, 0), "{report:?}");
    // Each image fifteen times under fifteen request ids: the test set's accuracy exactly.
    assert_eq!(report.accuracy, Some(0.9167), "{report:?}");
}

/// [`check_pipeline`] on an embedded broker of the test's own, so the predictions can be read
/// back after the run.
async fn check_pipeline_on_kafka(inference: Option<NnEngine>) {
    let cluster = Arc::new(EmbeddedKafka::start(None).await.unwrap());
    for name in [REQUESTS_TOPIC, PREDICTIONS_TOPIC] {
        cluster
            .create_topic(&TopicSpec {
                name: name.into(),
                partitions: 8,
            })
            .unwrap();
    }
    let reader: Arc<dyn Broker> = Arc::new(Kafka::embedded(cluster.clone()));
    let config = BrokerConfig::Kafka(KafkaConfig::new(cluster.bootstrap_servers()));
    check_pipeline(config, reader, inference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_pubsub_every_request_gets_exactly_the_prediction_tract_computes_offline() {
    let emulator = tokio::task::spawn_blocking(|| PubSubEmulator::start(None))
        .await
        .unwrap()
        .expect("starting the Pub/Sub emulator");
    let mut config = PubSubConfig::new("switchyard-e2e");
    config.endpoint = Some(emulator.endpoint());
    config.anonymous = true;
    let reader: Arc<dyn Broker> = Arc::new(PubSub::connect(config.clone()).await.unwrap());
    // This one runs the model with ONNX Runtime, installed as users install it.
    tokio::task::spawn_blocking(onnxruntime::install)
        .await
        .unwrap()
        .expect("installing ONNX Runtime");
    check_pipeline(
        BrokerConfig::Pubsub(config),
        reader,
        Some(NnEngine::Onnxruntime),
    )
    .await;
    drop(emulator);
}

/// Runs the demo's pipeline over `IMAGES` images on `broker`, with the model on the host
/// (`inference`) or inside Wasm (`None`), and checks every prediction, read back through
/// `reader` (the same broker, seen by the test).
async fn check_pipeline(
    broker: BrokerConfig,
    reader: Arc<dyn Broker>,
    inference: Option<NnEngine>,
) {
    let engine = if inference.is_some() {
        ENGINE_WASI_NN
    } else {
        ENGINE_WASM
    };
    // The reading group subscribes first: a Pub/Sub subscription only receives what is
    // published after it exists.
    let subscriber = reader
        .subscribe(&SubscriptionSpec {
            group: support::unique("check"),
            topics: vec![PREDICTIONS_TOPIC.into()],
            start: StartPosition::Earliest,
            guarantee: Default::default(),
            isolation: Default::default(),
        })
        .await
        .unwrap();
    let results_dir = tempfile::tempdir().unwrap();
    let options = DemoOptions {
        broker,
        images: IMAGES,
        rate: None,
        classifier_workers: 2,
        classifier_batch: 32,
        inference,
        inference_note: None,
        components: support::components(),
        models: support::models(),
        show_predictions: false,
        stall_timeout: Duration::from_secs(120),
        runtime: RuntimeOptions::default(),
        results: ResultsConfig::Sqlite {
            path: results_dir.path().join("results.sqlite3"),
        },
        progress: false,
        metrics: None,
        delivery: None,
    };
    let report = demo::run(&options).await.expect("the demo runs").report;
    assert_eq!(report.images, IMAGES as u64);
    assert_eq!(report.predictions, IMAGES as u64, "{report:?}");
    // The emulator may offer an acknowledged message again; what is promised is that no
    // member hands one on twice (each re-acknowledges what it acknowledged recently), and
    // here each of the classifier and the consumer is one member that never restarts.
    assert_eq!(
        report.duplicates, 0,
        "a member handed on a message it had acknowledged: {report:?}"
    );
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.accuracy.unwrap() > 0.88, "{report:?}");
    assert!(report.inference.starts_with(engine), "{report:?}");
    // Neither the embedded broker nor Pub/Sub keeps transactions: the demo says it ran the
    // weaker delivery, and why.
    let why = if reader.messaging_system() == switchyard_broker::system::GCP_PUBSUB {
        "at-least-once (Pub/Sub has no transactions"
    } else {
        "at-least-once (this broker has no exactly-once"
    };
    assert!(report.delivery.starts_with(why), "{report:?}");
    if let Some(granted) = inference {
        assert!(report.inference.contains(granted.name()), "{report:?}");
    }

    // Read every prediction back with the group of our own.
    let mut predictions: HashMap<usize, Prediction> = HashMap::new();
    while predictions.len() < IMAGES {
        let delivery = tokio::time::timeout(Duration::from_secs(30), subscriber.next())
            .await
            .expect("all predictions within 30 s")
            .unwrap();
        assert_eq!(
            delivery.message.content_type.as_deref(),
            Some("application/json")
        );
        let prediction: Prediction = serde_json::from_slice(&delivery.message.payload).unwrap();
        let index: usize = prediction
            .request_id
            .rsplit('-')
            .next()
            .and_then(|i| i.parse().ok())
            .expect("request ids end in the image index");
        let header = delivery
            .message
            .headers
            .iter()
            .find(|(k, _)| k == "request-id")
            .map(|(_, v)| v.clone());
        assert_eq!(header.as_deref(), Some(prediction.request_id.as_str()));
        assert!(
            predictions.insert(index, prediction).is_none(),
            "a second prediction for image {index}"
        );
        delivery.ack().unwrap();
    }
    let extra = tokio::time::timeout(Duration::from_secs(3), subscriber.next()).await;
    assert!(extra.is_err(), "more predictions than requests: {extra:?}");
    subscriber.close().await.unwrap();

    // The same images through tract, natively, outside the pipeline.
    let models = support::models();
    let images =
        IdxArray::images(&std::fs::read(models.join("t10k-images-idx3-ubyte.gz")).unwrap())
            .unwrap();
    let model = Lenet::load(&std::fs::read(models.join("lenet.onnx")).unwrap(), 100).unwrap();
    let all: Vec<&[u8; IMAGE_BYTES]> = images
        .iter()
        .take(IMAGES)
        .map(|i| i.try_into().unwrap())
        .collect();
    for (start, batch) in all.chunks(100).enumerate() {
        for (offset, logits) in model.logits(batch).unwrap().iter().enumerate() {
            let index = start * 100 + offset;
            let got = &predictions[&index];
            let want = softmax(logits);
            assert_eq!(
                got.class,
                pipeline_core::wire::argmax(&want),
                "image {index}"
            );
            for (g, w) in got.scores.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-4,
                    "image {index}: score {g} vs offline {w}"
                );
            }
            assert_eq!(got.model, model.version());
            assert_eq!(got.engine, engine, "image {index}");
        }
    }
}

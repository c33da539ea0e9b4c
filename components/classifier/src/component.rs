//! The classifier as a switchyard handler component (`switchyard:host/batch-inference-handler`).
//!
//! For every request it decodes the image, runs LeNet-5 and sends one JSON prediction to the
//! predictions topic with the request's `request-id`, `sent-at` and `label` headers copied. A
//! request it cannot use (not an image, no request id) is answered with a WIT `error`, never a
//! trap, so the host counts it and moves on.
//!
//! It takes requests one at a time (`handle`) or in batches (`handle-batch`, when the host has
//! several waiting): a batch's usable images go through the model together, in as few runs as
//! sizes that are powers of two allow (`model::LARGEST_RUN` says why), and a request it cannot
//! use fails alone, its neighbours still answered.
//!
//! Where the model runs is the manifest's choice: when the host grants `wasi:nn` (`nn` in the
//! manifest entry), the classifier hands it the model's bytes once and its tensors per request,
//! and the host computes natively; without the grant (`security` from `load`) it runs tract
//! here, inside Wasm. Both paths use the same model file, the same input scaling and the same
//! kernels, and each prediction says which one computed it (`engine`).
//!
//! Arguments (from the manifest's `args`):
//! `--model PATH` (default `/models/lenet.onnx`, a file in a directory the manifest preopens),
//! `--predictions-topic TOPIC` (default `predictions`).
//!
//! The model is loaded in `warm-up`, which the host calls on every new instance before its
//! first message, and kept for the life of the instance: the host keeps instances warm, so one
//! load serves thousands of requests, and the first request does not wait for it.

use std::cell::OnceCell;
use std::time::Instant;

use pipeline_core::IMAGE_BYTES;
use pipeline_core::wire::{
    self, ENGINE_WASI_NN, ENGINE_WASM, LABEL, PREDICTION_CONTENT_TYPE, Prediction, REQUEST_ID,
    SENT_AT, Timings,
};

use crate::model::{self, CLASSES, INPUT_NAME, Lenet, OUTPUT_NAME};

wit_bindgen::generate!({
    world: "switchyard:host/batch-inference-handler",
    path: "../../wit",
    generate_all,
});

use exports::switchyard::host::{batch, warm_up};
use exports::wasi::messaging::incoming_handler::Guest;
use wasi::messaging::producer;
use wasi::messaging::types::{Client, Error, Message};
use wasi::nn::errors::ErrorCode;
use wasi::nn::graph::{self, ExecutionTarget, GraphEncoding};
use wasi::nn::inference::GraphExecutionContext;
use wasi::nn::tensor::{Tensor, TensorType};

struct Settings {
    model_path: String,
    predictions_topic: String,
}

impl Settings {
    fn from_args() -> Result<Self, String> {
        let mut settings = Settings {
            model_path: "/models/lenet.onnx".into(),
            predictions_topic: "predictions".into(),
        };
        // A unit-test binary's arguments are the test runner's: the tests run the defaults.
        if cfg!(test) {
            return Ok(settings);
        }
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .ok_or_else(|| format!("classifier: {arg} needs a value"))
            };
            match arg.as_str() {
                "--model" => settings.model_path = value()?,
                "--predictions-topic" => settings.predictions_topic = value()?,
                other => {
                    return Err(format!(
                        "classifier: unknown argument {other:?}; it takes --model PATH and \
                         --predictions-topic TOPIC"
                    ));
                }
            }
        }
        Ok(settings)
    }
}

/// Where the model runs.
enum Engine {
    /// On the host, through `wasi:nn`. The graph is kept alive with its context.
    Host {
        _graph: graph::Graph,
        context: GraphExecutionContext,
    },
    /// Here, with tract compiled to Wasm.
    Wasm(Lenet),
}

impl Engine {
    /// The host's engine when `wasi:nn` is granted, else tract in Wasm.
    fn load(onnx: &[u8]) -> Result<Self, Error> {
        match graph::load(&[onnx.to_vec()], GraphEncoding::Onnx, ExecutionTarget::Cpu) {
            Ok(graph) => {
                let context = graph.init_execution_context().map_err(|e| {
                    Error::Other(format!("classifier: wasi:nn has no context: {}", e.data()))
                })?;
                Ok(Engine::Host {
                    _graph: graph,
                    context,
                })
            }
            Err(e) if e.code() == ErrorCode::Security => {
                eprintln!(
                    "classifier: running the model inside Wasm (the host does not grant \
                     wasi:nn: {})",
                    e.data()
                );
                Ok(Engine::Wasm(
                    Lenet::load(onnx, 1).map_err(|e| Error::Other(e.to_string()))?,
                ))
            }
            Err(e) => Err(Error::Other(format!(
                "classifier: the host's wasi:nn cannot load the model ({:?}): {}",
                e.code(),
                e.data()
            ))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Engine::Host { .. } => ENGINE_WASI_NN,
            Engine::Wasm(_) => ENGINE_WASM,
        }
    }

    /// Ten logits per image, in order, from one model run (one per image inside Wasm).
    fn logits(&self, images: &[&[u8; IMAGE_BYTES]]) -> Result<Vec<[f32; CLASSES]>, String> {
        match self {
            // The in-Wasm plan is built for one image, which tract runs fastest here.
            Engine::Wasm(lenet) => images
                .iter()
                .map(|image| lenet.logits_one(image).map_err(|e| e.to_string()))
                .collect(),
            Engine::Host { context, .. } => host_logits(context, images),
        }
    }

    /// Runs the model on every size a batch is split into, so the engine has prepared for
    /// each (tract plans per shape) before the first request.
    fn warm_up(&self) -> Result<(), String> {
        let blank = [0u8; IMAGE_BYTES];
        match self {
            Engine::Host { .. } => {
                for size in model::planned_run_sizes() {
                    self.logits(&vec![&blank; size])?;
                }
            }
            // The in-Wasm plan has one shape, built at load; one run touches its buffers.
            Engine::Wasm(_) => drop(self.logits(&[&blank])?),
        }
        Ok(())
    }
}

/// Ten logits per image from one `wasi:nn` compute over `images`.
fn host_logits(
    context: &GraphExecutionContext,
    images: &[&[u8; IMAGE_BYTES]],
) -> Result<Vec<[f32; CLASSES]>, String> {
    let mut pixels = vec![0f32; IMAGE_BYTES * images.len()];
    model::fill_input(&mut pixels, images);
    let bytes: Vec<u8> = pixels.iter().flat_map(|p| p.to_le_bytes()).collect();
    let side = pipeline_core::IMAGE_SIDE as u32;
    let batch = u32::try_from(images.len())
        .map_err(|_| format!("a batch of {} images is too large", images.len()))?;
    let input = Tensor::new(&[batch, 1, side, side], TensorType::Fp32, &bytes);
    let outputs = context
        .compute(vec![(INPUT_NAME.to_string(), input)])
        .map_err(|e| format!("wasi:nn compute failed ({:?}): {}", e.code(), e.data()))?;
    let (_, logits) = outputs
        .into_iter()
        .find(|(name, _)| name == OUTPUT_NAME)
        .ok_or_else(|| format!("wasi:nn returned no {OUTPUT_NAME:?} output"))?;
    let data = logits.data();
    if logits.ty() != TensorType::Fp32 || data.len() != images.len() * CLASSES * 4 {
        return Err(format!(
            "wasi:nn returned {:?} {:?}, expected {} x {CLASSES} FP32 logits",
            logits.ty(),
            logits.dimensions(),
            images.len()
        ));
    }
    Ok(data
        .chunks_exact(CLASSES * 4)
        .map(|row| {
            let mut logits = [0f32; CLASSES];
            for (value, bytes) in logits.iter_mut().zip(row.chunks_exact(4)) {
                *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
            logits
        })
        .collect())
}

/// A request the classifier can answer: its image and the headers the prediction copies.
struct Request<'a> {
    metadata: Vec<(String, String)>,
    request_id: String,
    image: &'a [u8; IMAGE_BYTES],
    decode_us: u64,
    /// When this instance was handed it (Unix ms).
    handled_at_ms: f64,
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.metadata, name)
    }
}

fn header<'m>(metadata: &'m [(String, String)], name: &str) -> Option<&'m str> {
    metadata
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

struct Classifier {
    engine: Engine,
    version: String,
    client: Client,
    predictions_topic: String,
}

impl Classifier {
    fn start() -> Result<Self, Error> {
        let settings = Settings::from_args().map_err(Error::Other)?;
        let onnx = std::fs::read(&settings.model_path).map_err(|e| {
            Error::Other(format!(
                "classifier: cannot read the model at {}: {e}. Grant its directory with a \
                 `preopens` entry in the manifest and pass the guest path with --model",
                settings.model_path
            ))
        })?;
        let engine = Engine::load(&onnx)?;
        let client = Client::connect("default")?;
        Ok(Self {
            engine,
            version: model::version_of(&onnx),
            client,
            predictions_topic: settings.predictions_topic,
        })
    }

    /// Checks one request and decodes its image (borrowed from `data`, the message's payload).
    fn request<'a>(&self, message: &Message, data: &'a [u8]) -> Result<Request<'a>, Error> {
        let handled_at_ms = wire::unix_ms();
        let started = Instant::now();
        let metadata = message.metadata().unwrap_or_default();
        let request_id = header(&metadata, REQUEST_ID)
            .ok_or_else(|| {
                Error::Other(format!(
                    "request has no {REQUEST_ID:?} header: the producer must set one so the \
                     prediction can be joined to its request"
                ))
            })?
            .to_string();
        let content_type = message.content_type();
        let image = wire::decode_image(content_type.as_deref(), data)
            .map_err(|e| Error::Other(format!("request {request_id}: {e}")))?;
        Ok(Request {
            decode_us: micros(started.elapsed()),
            handled_at_ms,
            metadata,
            request_id,
            image,
        })
    }

    /// Runs the model over `requests`, in runs of the sizes the warm-up prepared
    /// (`model::run_sizes`), and sends each its prediction. A failed run fails every request
    /// in it; a failed send fails its own.
    fn answer(&self, requests: &[Request]) -> Vec<Result<(), Error>> {
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut rest = requests;
        for size in model::run_sizes(requests.len()) {
            let (run, after) = rest.split_at(size);
            rest = after;
            let started = Instant::now();
            let images: Vec<_> = run.iter().map(|r| r.image).collect();
            let logits = match self.engine.logits(&images) {
                Ok(logits) => logits,
                Err(e) => {
                    outcomes.extend(
                        run.iter()
                            .map(|r| Err(Error::Other(format!("request {}: {e}", r.request_id)))),
                    );
                    continue;
                }
            };
            let batch = u32::try_from(size).unwrap_or(u32::MAX);
            let share = micros(started.elapsed()) / u64::from(batch.max(1));
            outcomes.extend(
                run.iter()
                    .zip(&logits)
                    .map(|(request, logits)| self.send_prediction(request, logits, share, batch)),
            );
        }
        outcomes
    }

    fn send_prediction(
        &self,
        request: &Request,
        logits: &[f32; CLASSES],
        inference_us: u64,
        batch: u32,
    ) -> Result<(), Error> {
        let label = request.header(LABEL).and_then(wire::parse_label);
        let sent_at = request.header(SENT_AT).and_then(wire::parse_sent_at);
        let prediction = Prediction {
            engine: self.engine.name().to_string(),
            handled_at_ms: Some(request.handled_at_ms),
            predicted_at_ms: Some(wire::unix_ms()),
            ..Prediction::from_logits(
                request.request_id.clone(),
                logits,
                label,
                sent_at,
                self.version.clone(),
                Timings {
                    decode_us: request.decode_us,
                    inference_us,
                    batch,
                },
            )
        };
        let body = serde_json::to_vec(&prediction)
            .map_err(|e| Error::Other(format!("cannot encode the prediction: {e}")))?;
        let reply = Message::new(&body);
        reply.set_content_type(PREDICTION_CONTENT_TYPE);
        for name in [REQUEST_ID, SENT_AT, LABEL] {
            if let Some(value) = request.header(name) {
                reply.add_metadata(name, value);
            }
        }
        producer::send(&self.client, &self.predictions_topic, reply)
    }

    /// One outcome per message: usable requests share model runs, the others fail alone.
    fn classify(&self, messages: &[Message]) -> Vec<Result<(), Error>> {
        let payloads: Vec<Vec<u8>> = messages.iter().map(Message::data).collect();
        let mut outcomes: Vec<Result<(), Error>> = Vec::with_capacity(messages.len());
        let mut usable = Vec::with_capacity(messages.len());
        let mut slots = Vec::with_capacity(messages.len());
        for (message, data) in messages.iter().zip(&payloads) {
            match self.request(message, data) {
                Ok(request) => {
                    slots.push(outcomes.len());
                    usable.push(request);
                    outcomes.push(Ok(()));
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        if !usable.is_empty() {
            for (slot, outcome) in slots.into_iter().zip(self.answer(&usable)) {
                outcomes[slot] = outcome;
            }
        }
        outcomes
    }
}

fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

thread_local! {
    static CLASSIFIER: OnceCell<Classifier> = const { OnceCell::new() };
}

/// Runs `work` with the instance's classifier, starting it on first use.
fn with_classifier<R>(work: impl FnOnce(&Classifier) -> R) -> Result<R, Error> {
    CLASSIFIER.with(|cell| {
        let classifier = match cell.get() {
            Some(classifier) => classifier,
            None => {
                let started = Classifier::start()?;
                cell.get_or_init(|| started)
            }
        };
        Ok(work(classifier))
    })
}

struct Component;

impl Guest for Component {
    fn handle(message: Message) -> Result<(), Error> {
        let mut outcomes = with_classifier(|c| c.classify(std::slice::from_ref(&message)))?;
        outcomes.pop().unwrap_or(Ok(()))
    }
}

impl batch::Guest for Component {
    fn handle_batch(messages: Vec<Message>) -> Vec<Result<(), Error>> {
        match with_classifier(|c| c.classify(&messages)) {
            Ok(outcomes) => outcomes,
            // Without a classifier (a missing model, bad arguments) no request can be answered.
            Err(e) => vec![Err(e); messages.len()],
        }
    }
}

impl warm_up::Guest for Component {
    /// Loads the model and runs it on blank images in every size a batch is run in, so the
    /// first request finds the engine's session and plans ready.
    fn warm_up() -> Result<(), Error> {
        with_classifier(|c| c.engine.warm_up())?
            .map_err(|e| Error::Other(format!("classifier: the model does not run: {e}")))
    }
}

export!(Component);

/// The component as the host drives it, on the committed model (`switchyard test` runs these
/// inside Wasm: `cargo test --target wasm32-wasip2` in this directory, with `models/`
/// preopened at `/models` as the manifest does).
#[cfg(test)]
mod tests {
    use super::*;
    use pipeline_core::idx::IdxArray;
    use pipeline_core::wire::GRAY8_CONTENT_TYPE;
    use switchyard_test::{Received, deliver, deliver_batch};

    switchyard_test::message_type!(Message);

    /// The test set's first image (an ankle boot, class 9) as a request.
    fn first_test_image(request_id: &str) -> Received {
        let file = std::fs::read("/models/t10k-images-idx3-ubyte.gz").expect("models/ preopened");
        let images = IdxArray::images(&file).expect("the committed test images");
        let image = images.iter().next().expect("at least one image");
        Received::on("requests", image)
            .content_type(GRAY8_CONTENT_TYPE)
            .header(REQUEST_ID, request_id)
            .header(LABEL, "9")
            .header(SENT_AT, "1700000000000.000")
    }

    #[test]
    fn warm_up_loads_the_model_before_the_first_request() {
        let warmed = <Component as warm_up::Guest>::warm_up();
        assert!(warmed.is_ok(), "{warmed:?}");
        assert!(CLASSIFIER.with(|cell| cell.get().is_some()));
    }

    #[test]
    fn answers_a_request_with_one_prediction_that_carries_its_headers() {
        let delivery = deliver(Component::handle, first_test_image("unit-0"));
        assert!(delivery.outcome.is_ok(), "{:?}", delivery.outcome);
        let [reply] = delivery.sent.as_slice() else {
            panic!("one prediction expected, sent {:?}", delivery.sent);
        };
        assert_eq!(reply.topic, "predictions");
        assert_eq!(reply.content_type.as_deref(), Some(PREDICTION_CONTENT_TYPE));
        assert_eq!(reply.header(REQUEST_ID), Some("unit-0"));
        assert_eq!(reply.header(LABEL), Some("9"));
        assert_eq!(reply.header(SENT_AT), Some("1700000000000.000"));
        let prediction: Prediction = serde_json::from_slice(&reply.data).expect("a prediction");
        assert_eq!(prediction.request_id, "unit-0");
        assert_eq!(prediction.class, 9, "{prediction:?}");
        assert_eq!(prediction.class_name, "Ankle boot");
        assert_eq!(prediction.label, Some(9));
        // No wasi:nn grant in unit tests, so the model ran here, in Wasm.
        assert_eq!(prediction.engine, ENGINE_WASM);
        assert!(
            prediction.model.starts_with("lenet5-"),
            "{}",
            prediction.model
        );
    }

    #[test]
    fn a_request_it_cannot_use_fails_alone_and_its_neighbours_are_answered() {
        let batch = deliver_batch(
            <Component as batch::Guest>::handle_batch,
            [
                Received::on("requests", [0u8; IMAGE_BYTES]).content_type(GRAY8_CONTENT_TYPE),
                first_test_image("unit-1"),
                Received::on("requests", "not an image").header(REQUEST_ID, "unit-2"),
            ],
        );
        assert!(
            matches!(&batch.outcomes[0], Err(Error::Other(text)) if text.contains("no \"request-id\" header")),
            "{:?}",
            batch.outcomes[0]
        );
        assert!(batch.outcomes[1].is_ok(), "{:?}", batch.outcomes[1]);
        assert!(
            matches!(&batch.outcomes[2], Err(Error::Other(text)) if text.starts_with("request unit-2")),
            "{:?}",
            batch.outcomes[2]
        );
        let ids: Vec<_> = batch
            .sent
            .iter()
            .map(|sent| sent.header(REQUEST_ID))
            .collect();
        assert_eq!(ids, [Some("unit-1")]);
    }
}

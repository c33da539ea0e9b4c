//! The classifier as a switchyard handler component (`switchyard:host/inference-handler`).
//!
//! For every request it decodes the image, runs LeNet-5 and sends one JSON prediction to the
//! predictions topic with the request's `request-id`, `sent-at` and `label` headers copied. A
//! request it cannot use (not an image, no request id) is answered with a WIT `error`, never a
//! trap, so the host counts it and moves on.
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
//! The model is loaded on the first message and kept for the life of the instance: the host
//! keeps instances warm, so one load serves thousands of requests.

use std::cell::OnceCell;
use std::time::Instant;

use pipeline_core::IMAGE_BYTES;
use pipeline_core::wire::{
    self, ENGINE_WASI_NN, ENGINE_WASM, LABEL, PREDICTION_CONTENT_TYPE, Prediction, REQUEST_ID,
    SENT_AT, Timings,
};

use crate::model::{self, CLASSES, INPUT_NAME, Lenet, OUTPUT_NAME};

wit_bindgen::generate!({
    world: "switchyard:host/inference-handler",
    path: "../../wit",
    generate_all,
});

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

    fn logits(&self, image: &[u8; IMAGE_BYTES]) -> Result<[f32; CLASSES], String> {
        match self {
            Engine::Wasm(lenet) => lenet.logits_one(image).map_err(|e| e.to_string()),
            Engine::Host { context, .. } => {
                let mut pixels = [0f32; IMAGE_BYTES];
                model::fill_input(&mut pixels, &[image]);
                let bytes: Vec<u8> = pixels.iter().flat_map(|p| p.to_le_bytes()).collect();
                let side = pipeline_core::IMAGE_SIDE as u32;
                let input = Tensor::new(&[1, 1, side, side], TensorType::Fp32, &bytes);
                let outputs = context
                    .compute(vec![(INPUT_NAME.to_string(), input)])
                    .map_err(|e| {
                        format!("wasi:nn compute failed ({:?}): {}", e.code(), e.data())
                    })?;
                let (_, logits) = outputs
                    .into_iter()
                    .find(|(name, _)| name == OUTPUT_NAME)
                    .ok_or_else(|| format!("wasi:nn returned no {OUTPUT_NAME:?} output"))?;
                let data = logits.data();
                if logits.ty() != TensorType::Fp32 || data.len() != CLASSES * 4 {
                    return Err(format!(
                        "wasi:nn returned {:?} {:?}, expected {CLASSES} FP32 logits",
                        logits.ty(),
                        logits.dimensions()
                    ));
                }
                let mut row = [0f32; CLASSES];
                for (value, bytes) in row.iter_mut().zip(data.chunks_exact(4)) {
                    *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                }
                Ok(row)
            }
        }
    }
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

    fn classify(&self, message: &Message) -> Result<(), Error> {
        let started = Instant::now();
        let metadata = message.metadata().unwrap_or_default();
        let header = |name: &str| {
            metadata
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let request_id = header(REQUEST_ID).ok_or_else(|| {
            Error::Other(format!(
                "request has no {REQUEST_ID:?} header: the producer must set one so the \
                 prediction can be joined to its request"
            ))
        })?;
        let data = message.data();
        let content_type = message.content_type();
        let image = wire::decode_image(content_type.as_deref(), &data)
            .map_err(|e| Error::Other(format!("request {request_id}: {e}")))?;
        let decoded = Instant::now();
        let logits = self
            .engine
            .logits(image)
            .map_err(|e| Error::Other(format!("request {request_id}: {e}")))?;
        let inferred = Instant::now();

        let label = header(LABEL).and_then(wire::parse_label);
        let sent_at = header(SENT_AT).and_then(wire::parse_sent_at);
        let prediction = Prediction {
            engine: self.engine.name().to_string(),
            ..Prediction::from_logits(
                request_id.to_string(),
                &logits,
                label,
                sent_at,
                self.version.clone(),
                Timings {
                    decode_us: micros(decoded - started),
                    inference_us: micros(inferred - decoded),
                },
            )
        };
        let body = serde_json::to_vec(&prediction)
            .map_err(|e| Error::Other(format!("cannot encode the prediction: {e}")))?;
        let reply = Message::new(&body);
        // Both calls only fail for hosts that do not support content types or metadata; the
        // prediction is still useful without them, so do not fail the request over it.
        let _ = reply.set_content_type(PREDICTION_CONTENT_TYPE);
        for name in [REQUEST_ID, SENT_AT, LABEL] {
            if let Some(value) = header(name) {
                let _ = reply.add_metadata(name, value);
            }
        }
        producer::send(&self.client, &self.predictions_topic, reply)
    }
}

fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

thread_local! {
    static CLASSIFIER: OnceCell<Classifier> = const { OnceCell::new() };
}

struct Component;

impl Guest for Component {
    fn handle(message: Message) -> Result<(), Error> {
        CLASSIFIER.with(|cell| {
            let classifier = match cell.get() {
                Some(classifier) => classifier,
                None => {
                    let started = Classifier::start()?;
                    cell.get_or_init(|| started)
                }
            };
            classifier.classify(&message)
        })
    }
}

export!(Component);

//! The pipeline's messages as they travel through the broker.
//!
//! A **request** carries one image as its payload and these headers: `request-id`, `sent-at`
//! (Unix time in milliseconds, fractional) and, when the ground truth is known, `label`. Its
//! content type names the encoding; today that is raw 28 × 28 gray8 ([`GRAY8_CONTENT_TYPE`]).
//!
//! A **prediction** is JSON a person can read with `kcat` ([`Prediction`]), with the request's
//! headers copied so it can be joined to its request without parsing the body.

use serde::{Deserialize, Serialize};

use crate::{CLASS_NAMES, IMAGE_BYTES, IMAGE_SIDE};

/// Header naming the request a message belongs to.
pub const REQUEST_ID: &str = "request-id";
/// Header with the Unix time in milliseconds at which the producer sent the request.
pub const SENT_AT: &str = "sent-at";
/// Header with the ground-truth class index, when known.
pub const LABEL: &str = "label";

/// Content type of a raw 28 × 28 gray8 image, row-major, 0 = background.
pub const GRAY8_CONTENT_TYPE: &str = "image/x-gray8; width=28; height=28";
/// Content type of a prediction.
pub const PREDICTION_CONTENT_TYPE: &str = "application/json";

/// Why a request could not be turned into model input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The content type names an encoding the classifier does not decode.
    #[error(
        "unsupported content type {0:?}: send raw 28x28 gray8 pixels with content type \
         \"{GRAY8_CONTENT_TYPE}\""
    )]
    UnsupportedContentType(String),
    /// The payload has the wrong size for a raw image.
    #[error(
        "a raw gray8 image must be exactly {IMAGE_BYTES} bytes (28x28), this payload has \
         {0} bytes"
    )]
    WrongSize(usize),
}

/// Checks a request payload and returns its 784 pixels.
///
/// A missing content type is accepted when the payload has exactly the raw image size, so
/// plain producers (`kcat -P`) work too.
pub fn decode_image<'a>(
    content_type: Option<&str>,
    payload: &'a [u8],
) -> Result<&'a [u8; IMAGE_BYTES], RequestError> {
    if let Some(content_type) = content_type
        && !is_gray8(content_type)
    {
        return Err(RequestError::UnsupportedContentType(
            content_type.to_string(),
        ));
    }
    payload
        .try_into()
        .map_err(|_| RequestError::WrongSize(payload.len()))
}

fn is_gray8(content_type: &str) -> bool {
    let mut parts = content_type.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|essence| essence.eq_ignore_ascii_case("image/x-gray8"))
    {
        return false;
    }
    let side = IMAGE_SIDE.to_string();
    parts.all(|parameter| match parameter.split_once('=') {
        Some((key, value)) if key.trim().eq_ignore_ascii_case("width") => value.trim() == side,
        Some((key, value)) if key.trim().eq_ignore_ascii_case("height") => value.trim() == side,
        _ => true,
    })
}

/// Where the time of one prediction went, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Checking and converting the payload into the model's input.
    pub decode_us: u64,
    /// Running the model: this request's share of the run, when several requests shared it.
    pub inference_us: u64,
    /// How many requests the model ran on at once (1 for a request handled alone).
    #[serde(default = "one")]
    pub batch: u32,
}

fn one() -> u32 {
    1
}

/// The classifier's answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The request this answers.
    pub request_id: String,
    /// Index of the most likely class.
    pub class: usize,
    /// Name of the most likely class.
    pub class_name: String,
    /// Probability of each class (softmax of the model's logits), by class index.
    pub scores: Vec<f32>,
    /// Ground truth copied from the request, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<usize>,
    /// When the request was sent (Unix milliseconds), copied from the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at_ms: Option<f64>,
    /// When the classifier was handed the request (Unix milliseconds): the call with it began.
    /// With `sent_at_ms` and `predicted_at_ms` it says where a slow request waited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_at_ms: Option<f64>,
    /// When the classifier sent the prediction (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_at_ms: Option<f64>,
    /// Model name and the first bytes of its SHA-256, e.g. `lenet5-3f2a91c0`.
    pub model: String,
    /// Where the classifier spent its time.
    pub timings: Timings,
    /// What computed the logits: [`ENGINE_WASM`] (tract inside the classifier) or
    /// [`ENGINE_WASI_NN`] (the host, natively, through `wasi:nn`); empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub engine: String,
}

/// [`Prediction::engine`] of logits computed inside the classifier's Wasm.
pub const ENGINE_WASM: &str = "wasm";
/// [`Prediction::engine`] of logits computed by the host through `wasi:nn`.
pub const ENGINE_WASI_NN: &str = "wasi-nn";

impl Prediction {
    /// Builds a prediction from logits: softmax scores, arg-max class.
    pub fn from_logits(
        request_id: String,
        logits: &[f32],
        label: Option<usize>,
        sent_at_ms: Option<f64>,
        model: String,
        timings: Timings,
    ) -> Self {
        let scores = softmax(logits);
        let class = argmax(&scores);
        Self {
            request_id,
            class,
            class_name: CLASS_NAMES.get(class).copied().unwrap_or("?").to_string(),
            scores,
            label,
            sent_at_ms,
            handled_at_ms: None,
            predicted_at_ms: None,
            model,
            timings,
            engine: String::new(),
        }
    }
}

/// The wall clock in Unix milliseconds (fractional), as every timestamp of the pipeline is
/// written; 0 on a clock set before 1970.
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64() * 1000.0)
}

/// Index of the largest value (the first one on ties); 0 for an empty slice.
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Parses a `label` header value into a class index.
pub fn parse_label(value: &str) -> Option<usize> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&l| l < CLASS_NAMES.len())
}

/// Parses a `sent-at` header value (Unix milliseconds).
pub fn parse_sent_at(value: &str) -> Option<f64> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// Formats Unix milliseconds the way `sent-at` carries them (microsecond resolution).
pub fn format_sent_at(unix_ms: f64) -> String {
    format!("{unix_ms:.3}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_raw_images_with_or_without_content_type() {
        let pixels = vec![7u8; IMAGE_BYTES];
        assert!(decode_image(None, &pixels).is_ok());
        assert!(decode_image(Some(GRAY8_CONTENT_TYPE), &pixels).is_ok());
        assert!(decode_image(Some("image/x-gray8;width=28;height=28"), &pixels).is_ok());
        assert!(decode_image(Some("IMAGE/X-GRAY8"), &pixels).is_ok());
    }

    #[test]
    fn rejects_what_is_not_a_raw_image() {
        assert_eq!(
            decode_image(None, b"hello"),
            Err(RequestError::WrongSize(5))
        );
        let pixels = vec![0u8; IMAGE_BYTES];
        let err = decode_image(Some("image/png"), &pixels).unwrap_err();
        assert_eq!(
            err,
            RequestError::UnsupportedContentType("image/png".into())
        );
        assert!(err.to_string().contains(GRAY8_CONTENT_TYPE));
        assert!(decode_image(Some("image/x-gray8; width=32; height=32"), &pixels).is_err());
    }

    #[test]
    fn prediction_takes_the_most_likely_class() {
        let mut logits = [0.0f32; 10];
        logits[9] = 5.0;
        logits[2] = 4.0;
        let p = Prediction::from_logits(
            "r1".into(),
            &logits,
            Some(9),
            Some(1.5),
            "lenet5-test".into(),
            Timings {
                decode_us: 1,
                inference_us: 2,
                batch: 1,
            },
        );
        assert_eq!(p.class, 9);
        assert_eq!(p.class_name, "Ankle boot");
        assert!((p.scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p.scores[9] > p.scores[2]);
        let json = serde_json::to_string(&p).unwrap();
        let back: Prediction = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn softmax_survives_large_logits() {
        let s = softmax(&[1000.0, 1000.0]);
        assert_eq!(s, vec![0.5, 0.5]);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }

    #[test]
    fn parses_headers() {
        assert_eq!(parse_label("9"), Some(9));
        assert_eq!(parse_label("10"), None);
        assert_eq!(parse_label("x"), None);
        assert_eq!(
            parse_sent_at(&format_sent_at(1764291234567.891)),
            Some(1764291234567.891)
        );
        assert_eq!(parse_sent_at("-1"), None);
        assert_eq!(parse_sent_at("NaN"), None);
    }
}

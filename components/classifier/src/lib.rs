//! The Fashion-MNIST classifier: LeNet-5 (ONNX) run by tract.
//!
//! Built for `wasm32-wasip2` this crate is a switchyard handler component (`component.rs`): it
//! receives image requests, classifies them and sends a JSON prediction. Natively it is just the
//! model wrapper ([`model`]), which the `eval` example, the golden test and the host's
//! end-to-end test use, so the numbers they check come from the same code the component runs.
#![deny(missing_docs)]

pub mod model;

#[cfg(target_arch = "wasm32")]
mod component;

//! Inference on the host: the engines behind `wasi:nn`.
//!
//! Engines: tract (pure Rust, always there) and ONNX Runtime (faster, loaded at run time when
//! installed); `nn = "auto"` picks ONNX Runtime when it can.
//!
//! Why on the host: a LeNet-5 inference is 2.45 M multiply-adds, and Wasm SIMD is 128 bits wide
//! with no fused multiply-add, so tract inside the classifier cannot come near what the CPU
//! does natively (measured: about 4× slower). A component that is granted `nn` in its manifest
//! hands the host its model's bytes and its tensors through `wasi:nn`, and the host runs the
//! model natively. The component keeps the model file and the logic around it, so it stays
//! portable to any wasi-nn host, and one without the grant runs its own engine instead.
//!
//! This module is the engines and what they share; `crate::interfaces::wasi_nn` is the WIT side. A model is
//! loaded once per host however many instances load it: [`NnHost`] keeps loaded graphs by the
//! SHA-256 of their bytes and the engine, so warm instances and their replacements share one
//! parsed model and its optimized plans.

pub mod onnxruntime;
pub mod tract;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Which engine runs a component's models (`nn` in its manifest entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NnEngine {
    /// The fastest engine this host has: ONNX Runtime when it is installed, else tract.
    Auto,
    /// tract, natively, with switchyard's kernels (`tract-kernels`): pure Rust, always there.
    Tract,
    /// ONNX Runtime, loaded at run time ([`onnxruntime`]); the component fails to start when it
    /// is not installed.
    Onnxruntime,
}

impl NnEngine {
    /// The engine `Auto` stands for on this host (loading ONNX Runtime to find out).
    pub fn resolve(self) -> NnEngine {
        match self {
            NnEngine::Auto if onnxruntime::available().is_ok() => NnEngine::Onnxruntime,
            NnEngine::Auto | NnEngine::Tract => NnEngine::Tract,
            NnEngine::Onnxruntime => NnEngine::Onnxruntime,
        }
    }

    /// The name of the engine it resolves to, as the demo and logs report it.
    pub fn name(self) -> &'static str {
        match self.resolve() {
            NnEngine::Auto | NnEngine::Tract => "tract",
            NnEngine::Onnxruntime => "onnxruntime",
        }
    }

    /// The engine's value in a manifest (`nn = "..."`).
    pub fn manifest_value(self) -> &'static str {
        match self {
            NnEngine::Auto => "auto",
            NnEngine::Tract => "tract",
            NnEngine::Onnxruntime => "onnxruntime",
        }
    }

    /// Whether this host can run the engine; the error says how to make it able.
    pub fn check_available(self) -> Result<(), onnxruntime::Unavailable> {
        match self {
            NnEngine::Onnxruntime => onnxruntime::available(),
            NnEngine::Auto | NnEngine::Tract => Ok(()),
        }
    }
}

/// The element type of a tensor (`wasi:nn/tensor.tensor-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    /// IEEE half precision.
    Fp16,
    /// IEEE single precision.
    Fp32,
    /// IEEE double precision.
    Fp64,
    /// bfloat16.
    Bf16,
    /// Unsigned bytes.
    U8,
    /// 32-bit integers.
    I32,
    /// 64-bit integers.
    I64,
}

impl TensorType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TensorType::U8 => 1,
            TensorType::Fp16 | TensorType::Bf16 => 2,
            TensorType::Fp32 | TensorType::I32 => 4,
            TensorType::Fp64 | TensorType::I64 => 8,
        }
    }
}

/// A tensor as `wasi:nn` passes it: dimensions, element type, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Size of each dimension, outermost first.
    pub dimensions: Vec<u32>,
    /// Element type.
    pub ty: TensorType,
    /// Elements in row-major order.
    pub data: Vec<u8>,
}

impl Tensor {
    /// Checks that the bytes match the dimensions and the type, so engines can rely on it.
    pub fn check(&self, name: &str) -> Result<(), NnError> {
        let elements = self
            .dimensions
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize));
        let expected = elements.and_then(|n| n.checked_mul(self.ty.size()));
        if expected != Some(self.data.len()) {
            return Err(NnError::InvalidArgument(format!(
                "tensor {name:?}: {} bytes do not hold {:?} elements of {:?} ({} bytes each)",
                self.data.len(),
                self.dimensions,
                self.ty,
                self.ty.size()
            )));
        }
        Ok(())
    }
}

/// Why an inference call failed; each kind maps to a `wasi:nn` error code.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// The component's manifest entry does not grant `nn`.
    #[error(
        "component {component:?} may not run models on the host: add `nn = \"auto\"` to its \
         manifest entry"
    )]
    NotGranted {
        /// The component.
        component: String,
    },
    /// An argument is wrong: a tensor name, shape, type or size.
    #[error("{0}")]
    InvalidArgument(String),
    /// The model bytes are not a model in the given encoding.
    #[error("the model is not valid {encoding}: {source:#}")]
    InvalidEncoding {
        /// The encoding the component named.
        encoding: &'static str,
        /// What the engine said.
        #[source]
        source: anyhow::Error,
    },
    /// The engine cannot run this (an encoding or a tensor type it lacks).
    #[error("{0}")]
    Unsupported(String),
    /// The engine failed while running the model.
    #[error("inference failed: {source:#}")]
    Runtime {
        /// What the engine said.
        #[source]
        source: anyhow::Error,
    },
    /// `load-by-name`: this host keeps no named models.
    #[error("no model is named {0:?}: switchyard loads models from their bytes (`load`)")]
    NotFound(String),
}

/// The model encodings `load` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// ONNX protobuf.
    Onnx,
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Onnx => "ONNX",
        }
    }
}

/// A loaded model.
pub trait Graph: Send + Sync {
    /// A new execution context: the per-caller state that lets repeated computes reuse their
    /// buffers.
    fn session(self: Arc<Self>) -> Result<Box<dyn Session>, NnError>;
}

/// The state of one caller's inferences.
pub trait Session: Send {
    /// Runs the model on named inputs and returns its named outputs.
    fn compute(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError>;
}

type CacheKey = ([u8; 32], NnEngine);

/// The host's engines and the models loaded into them, shared by every component.
#[derive(Default)]
pub struct NnHost {
    loaded: Mutex<HashMap<CacheKey, Weak<dyn Graph>>>,
}

impl NnHost {
    /// A host with nothing loaded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads a model from its parts into `engine`, or returns the one already loaded from the
    /// same bytes.
    pub fn load(
        &self,
        parts: &[Vec<u8>],
        encoding: Encoding,
        engine: NnEngine,
    ) -> Result<Arc<dyn Graph>, NnError> {
        let engine = engine.resolve();
        let [model] = parts else {
            return Err(NnError::InvalidArgument(format!(
                "an {} model is one part; got {}",
                encoding.name(),
                parts.len()
            )));
        };
        let key: CacheKey = (Sha256::digest(model).into(), engine);
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(graph) = loaded.get(&key).and_then(Weak::upgrade) {
            return Ok(graph);
        }
        // Loading under the lock: the instances of a component start together and would
        // otherwise all parse the same model at once.
        let graph: Arc<dyn Graph> = match engine {
            NnEngine::Auto | NnEngine::Tract => Arc::new(tract::TractGraph::load(model, encoding)?),
            NnEngine::Onnxruntime => {
                onnxruntime::available().map_err(|e| NnError::Unsupported(e.to_string()))?;
                Arc::new(onnxruntime::OrtGraph::load(model)?)
            }
        };
        loaded.retain(|_, graph| graph.strong_count() > 0);
        loaded.insert(key, Arc::downgrade(&graph));
        Ok(graph)
    }
}

/// The repository's LeNet-5, the model both engines' tests load.
#[cfg(test)]
fn test_lenet() -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/lenet.onnx"))
        .expect("models/lenet.onnx")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_whose_bytes_do_not_fit_its_shape_is_refused() {
        let tensor = Tensor {
            dimensions: vec![1, 2, 3],
            ty: TensorType::Fp32,
            data: vec![0; 23],
        };
        let error = tensor.check("image").unwrap_err();
        assert!(matches!(error, NnError::InvalidArgument(_)), "{error:?}");
        assert!(error.to_string().contains("23 bytes"), "{error}");
        let fits = Tensor {
            data: vec![0; 24],
            ..tensor
        };
        fits.check("image").unwrap();
    }
}

//! The tract engine, natively: ONNX models, optimized for the concrete shapes they are run with.
//!
//! `wasi:nn` says nothing about shapes at load time, and tract plans best for concrete ones (its
//! kernels and im2col layouts are chosen per shape). So a graph parses the model once and
//! builds one optimized plan per set of input shapes it meets, on first use; a classifier that
//! always sends `1 × 1 × 28 × 28` builds one plan. switchyard's kernels (`tract-kernels`) replace
//! tract's where they apply, exactly as in the classifier's in-Wasm engine, so both paths compute
//! the same logits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;

use super::{Encoding, Graph, NnError, Session, Tensor, TensorType};

type Plan = Arc<TypedRunnableModel>;

/// A parsed model and its plans, one per set of input shapes.
pub struct TractGraph {
    model: InferenceModel,
    input_names: Vec<String>,
    output_names: Vec<String>,
    plans: Mutex<HashMap<Vec<Vec<usize>>, Plan>>,
}

impl TractGraph {
    /// Parses a model.
    pub fn load(bytes: &[u8], encoding: Encoding) -> Result<Self, NnError> {
        let model = match encoding {
            Encoding::Onnx => tract_onnx::onnx().model_for_read(&mut &bytes[..]),
        }
        .map_err(|source| NnError::InvalidEncoding {
            encoding: encoding.name(),
            source,
        })?;
        let names = |outlets: &[OutletId]| -> Vec<String> {
            outlets
                .iter()
                .map(|&outlet| {
                    model
                        .outlet_label(outlet)
                        .unwrap_or(&model.node(outlet.node).name)
                        .to_string()
                })
                .collect()
        };
        let invalid = |source| NnError::InvalidEncoding {
            encoding: encoding.name(),
            source,
        };
        let input_names = names(model.input_outlets().map_err(invalid)?);
        let output_names = names(model.output_outlets().map_err(invalid)?);
        Ok(Self {
            model,
            input_names,
            output_names,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The plan for these input facts, built on first use.
    fn plan(&self, inputs: &[(DatumType, Vec<usize>)]) -> Result<Plan, NnError> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, shape)| shape.clone()).collect();
        let mut plans = self
            .plans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(plan) = plans.get(&shapes) {
            return Ok(plan.clone());
        }
        let mut model = self.model.clone();
        for (index, (datum_type, shape)) in inputs.iter().enumerate() {
            model = model
                .with_input_fact(index, datum_type.fact(shape).into())
                .map_err(|source| NnError::Runtime { source })?;
        }
        let plan = model
            .into_optimized()
            .and_then(|mut optimized| {
                tract_kernels::use_fast_max_pools(&mut optimized)?;
                optimized.into_runnable()
            })
            .map_err(|source| {
                NnError::InvalidArgument(format!(
                    "the model cannot run on inputs of shapes {shapes:?}: {source:#}"
                ))
            })?;
        plans.insert(shapes, plan.clone());
        Ok(plan)
    }
}

impl Graph for TractGraph {
    fn session(self: Arc<Self>) -> Result<Box<dyn Session>, NnError> {
        Ok(Box::new(TractSession {
            graph: self,
            states: HashMap::new(),
        }))
    }
}

/// One caller's states, one per plan, so repeated computes reuse tract's buffers.
struct TractSession {
    graph: Arc<TractGraph>,
    states: HashMap<Vec<Vec<usize>>, TypedSimpleState>,
}

fn datum_type(ty: TensorType) -> Result<DatumType, NnError> {
    Ok(match ty {
        TensorType::Fp32 => f32::datum_type(),
        TensorType::Fp64 => f64::datum_type(),
        TensorType::U8 => u8::datum_type(),
        TensorType::I32 => i32::datum_type(),
        TensorType::I64 => i64::datum_type(),
        TensorType::Fp16 | TensorType::Bf16 => {
            return Err(NnError::Unsupported(format!(
                "tract on this host takes FP32, FP64, U8, I32 and I64 tensors, not {ty:?}"
            )));
        }
    })
}

fn tensor_type(datum_type: DatumType) -> Result<TensorType, NnError> {
    Ok(match datum_type {
        DatumType::F32 => TensorType::Fp32,
        DatumType::F64 => TensorType::Fp64,
        DatumType::U8 => TensorType::U8,
        DatumType::I32 => TensorType::I32,
        DatumType::I64 => TensorType::I64,
        other => {
            return Err(NnError::Unsupported(format!(
                "the model returns a {other:?} tensor, which wasi:nn cannot carry"
            )));
        }
    })
}

impl Session for TractSession {
    fn compute(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError> {
        let graph = &self.graph;
        // Inputs in the model's order, whatever order the caller gave them in.
        let mut ordered: Vec<Option<Tensor>> = vec![None; graph.input_names.len()];
        for (name, tensor) in inputs {
            tensor.check(&name)?;
            let index = graph
                .input_names
                .iter()
                .position(|input| *input == name)
                .ok_or_else(|| {
                    NnError::InvalidArgument(format!(
                        "the model has no input {name:?}; its inputs are {:?}",
                        graph.input_names
                    ))
                })?;
            ordered[index] = Some(tensor);
        }
        let mut facts = Vec::with_capacity(ordered.len());
        let mut values = TVec::with_capacity(ordered.len());
        for (tensor, name) in ordered.into_iter().zip(&graph.input_names) {
            let tensor = tensor
                .ok_or_else(|| NnError::InvalidArgument(format!("input {name:?} is missing")))?;
            let datum_type = datum_type(tensor.ty)?;
            let shape: Vec<usize> = tensor.dimensions.iter().map(|&d| d as usize).collect();
            // SAFETY: `check` proved the bytes hold exactly `shape` elements of `datum_type`,
            // and every type accepted above is plain old data, valid for any bit pattern.
            let value = unsafe {
                tract_onnx::prelude::Tensor::from_raw_dt(datum_type, &shape, &tensor.data)
            }
            .map_err(|source| NnError::Runtime { source })?;
            facts.push((datum_type, shape));
            values.push(value.into_tvalue());
        }
        let shapes: Vec<Vec<usize>> = facts.iter().map(|(_, shape)| shape.clone()).collect();
        let state = match self.states.entry(shapes) {
            std::collections::hash_map::Entry::Occupied(state) => state.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let plan = graph.plan(&facts)?;
                slot.insert(plan.spawn().map_err(|source| NnError::Runtime { source })?)
            }
        };
        let outputs = state
            .run(values)
            .map_err(|source| NnError::Runtime { source })?;
        outputs
            .into_iter()
            .zip(&graph.output_names)
            .map(|(value, name)| {
                let tensor = value.into_tensor();
                let ty = tensor_type(tensor.datum_type())?;
                let plain = tensor
                    .try_as_plain_ram()
                    .map_err(|source| NnError::Runtime { source })?;
                Ok((
                    name.clone(),
                    Tensor {
                        dimensions: tensor.shape().iter().map(|&d| d as u32).collect(),
                        ty,
                        data: plain.as_bytes().to_vec(),
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{NnEngine, NnHost, test_lenet};

    fn image(batch: u32, fill: f32) -> Tensor {
        let count = batch as usize * 28 * 28;
        Tensor {
            dimensions: vec![batch, 1, 28, 28],
            ty: TensorType::Fp32,
            data: std::iter::repeat_n(fill.to_le_bytes(), count)
                .flatten()
                .collect(),
        }
    }

    #[test]
    fn runs_lenet_and_names_its_output() {
        let host = NnHost::new();
        let graph = host
            .load(&[test_lenet()], Encoding::Onnx, NnEngine::Tract)
            .unwrap();
        let mut session = graph.session().unwrap();
        for batch in [1, 3] {
            let outputs = session
                .compute(vec![("image".into(), image(batch, 0.5))])
                .unwrap();
            let [(name, logits)] = outputs.as_slice() else {
                panic!("one output expected: {outputs:?}");
            };
            assert_eq!(name, "logits");
            assert_eq!(logits.dimensions, [batch, 10]);
            assert_eq!(logits.data.len(), batch as usize * 10 * 4);
        }
    }

    #[test]
    fn the_same_bytes_load_once() {
        let host = NnHost::new();
        let first = host
            .load(&[test_lenet()], Encoding::Onnx, NnEngine::Tract)
            .unwrap();
        let second = host
            .load(&[test_lenet()], Encoding::Onnx, NnEngine::Tract)
            .unwrap();
        // Compare addresses only: the vtable half of a `dyn` pointer may differ per codegen unit.
        assert!(std::ptr::addr_eq(Arc::as_ptr(&first), Arc::as_ptr(&second)));
    }

    #[test]
    fn mistakes_are_named() {
        let host = NnHost::new();
        let error = host
            .load(&[b"not a model".to_vec()], Encoding::Onnx, NnEngine::Tract)
            .err()
            .unwrap();
        assert!(
            matches!(error, NnError::InvalidEncoding { .. }),
            "{error:?}"
        );

        let graph = host
            .load(&[test_lenet()], Encoding::Onnx, NnEngine::Tract)
            .unwrap();
        let mut session = graph.session().unwrap();
        let error = session
            .compute(vec![("pixels".into(), image(1, 0.0))])
            .unwrap_err();
        assert!(error.to_string().contains("[\"image\"]"), "{error}");

        let wrong_shape = Tensor {
            dimensions: vec![1, 1, 27, 28],
            data: vec![0; 27 * 28 * 4],
            ..image(1, 0.0)
        };
        let error = session
            .compute(vec![("image".into(), wrong_shape)])
            .unwrap_err();
        assert!(matches!(error, NnError::InvalidArgument(_)), "{error:?}");
    }
}

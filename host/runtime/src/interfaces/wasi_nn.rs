//! `wasi:nn`: what a component's `load` and `compute` calls do.
//!
//! Only a component whose manifest entry grants `nn` may use it; any other gets the `security`
//! error with the fix, never a trap, so a component can fall back to an engine of its own. The
//! engines are in [`crate::nn`]; this file turns WIT resources into their types and their
//! errors into WIT `error` resources. The state is an [`NnCtx`] per instance; the host calls
//! work on an [`NnView`] of it and the instance's resource table.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::wasi::nn::errors::{self, ErrorCode};
use crate::bindings::wasi::nn::graph::{self, ExecutionTarget, GraphEncoding};
use crate::bindings::wasi::nn::inference;
use crate::bindings::wasi::nn::tensor::{self, TensorType as WitTensorType};
use crate::nn::{self, Encoding, NnEngine, NnError, NnHost, TensorType};

/// A graph as the guest holds it.
pub struct HostGraph(Arc<dyn nn::Graph>);

/// An execution context as the guest holds it.
pub struct HostExecutionContext(Box<dyn nn::Session>);

/// An error as the guest holds it.
#[derive(Debug)]
pub struct HostError {
    code: ErrorCode,
    data: String,
}

/// The `wasi:nn` half of a component's state: its grant and the host's engines.
pub struct NnCtx {
    component: Arc<str>,
    grant: Option<NnEngine>,
    host: Arc<NnHost>,
}

impl NnCtx {
    /// `wasi:nn` for component `component`, which may use it with `grant` (none: refused).
    pub fn new(component: Arc<str>, grant: Option<NnEngine>, host: Arc<NnHost>) -> Self {
        Self {
            component,
            grant,
            host,
        }
    }
}

fn error_code(error: &NnError) -> ErrorCode {
    match error {
        NnError::NotGranted { .. } => ErrorCode::Security,
        NnError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        NnError::InvalidEncoding { .. } => ErrorCode::InvalidEncoding,
        NnError::Unsupported(_) => ErrorCode::UnsupportedOperation,
        NnError::Runtime { .. } => ErrorCode::RuntimeError,
        NnError::NotFound(_) => ErrorCode::NotFound,
    }
}

/// What the `wasi:nn` host calls work on: the instance's `wasi:nn` context and its resource
/// table, borrowed from the store's state for one call.
pub struct NnView<'a> {
    /// The instance's `wasi:nn` context.
    pub ctx: &'a NnCtx,
    /// The instance's resource table, where its graphs, contexts, tensors and errors live.
    pub table: &'a mut ResourceTable,
}

/// `wasi:nn` as wasmtime's linker names it: its data is an [`NnView`].
struct WasiNn;

impl HasData for WasiNn {
    type Data<'a> = NnView<'a>;
}

/// Adds `wasi:nn` to a linker, reaching each instance's through `view`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    graph::add_to_linker::<T, WasiNn>(linker, view)?;
    inference::add_to_linker::<T, WasiNn>(linker, view)?;
    tensor::add_to_linker::<T, WasiNn>(linker, view)?;
    errors::add_to_linker::<T, WasiNn>(linker, view)
}

impl NnView<'_> {
    /// Hands an error to the guest as a `wasi:nn` error resource.
    fn nn_error(&mut self, error: NnError) -> wasmtime::Result<Resource<HostError>> {
        tracing::debug!("{}: wasi:nn: {error}", self.ctx.component);
        Ok(self.table.push(HostError {
            code: error_code(&error),
            data: format!("{error:#}"),
        })?)
    }

    fn nn_grant(&self) -> Result<NnEngine, NnError> {
        self.ctx.grant.ok_or_else(|| NnError::NotGranted {
            component: self.ctx.component.to_string(),
        })
    }
}

fn tensor_type(ty: WitTensorType) -> TensorType {
    match ty {
        WitTensorType::Fp16 => TensorType::Fp16,
        WitTensorType::Fp32 => TensorType::Fp32,
        WitTensorType::Fp64 => TensorType::Fp64,
        WitTensorType::Bf16 => TensorType::Bf16,
        WitTensorType::U8 => TensorType::U8,
        WitTensorType::I32 => TensorType::I32,
        WitTensorType::I64 => TensorType::I64,
    }
}

fn wit_tensor_type(ty: TensorType) -> WitTensorType {
    match ty {
        TensorType::Fp16 => WitTensorType::Fp16,
        TensorType::Fp32 => WitTensorType::Fp32,
        TensorType::Fp64 => WitTensorType::Fp64,
        TensorType::Bf16 => WitTensorType::Bf16,
        TensorType::U8 => WitTensorType::U8,
        TensorType::I32 => WitTensorType::I32,
        TensorType::I64 => WitTensorType::I64,
    }
}

impl graph::Host for NnView<'_> {
    async fn load(
        &mut self,
        builder: Vec<Vec<u8>>,
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<HostGraph>, Resource<HostError>>> {
        let loaded = self.nn_grant().and_then(|engine| {
            let encoding = match encoding {
                GraphEncoding::Onnx | GraphEncoding::Autodetect => Encoding::Onnx,
                other => {
                    return Err(NnError::Unsupported(format!(
                        "this host loads ONNX models, not {other:?}"
                    )));
                }
            };
            if target != ExecutionTarget::Cpu {
                return Err(NnError::Unsupported(format!(
                    "this host computes on the CPU, not {target:?}"
                )));
            }
            self.ctx.host.load(&builder, encoding, engine)
        });
        Ok(match loaded {
            Ok(graph) => Ok(self.table.push(HostGraph(graph))?),
            Err(e) => Err(self.nn_error(e)?),
        })
    }

    async fn load_by_name(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<HostGraph>, Resource<HostError>>> {
        let error = match self.nn_grant() {
            Ok(_) => NnError::NotFound(name),
            Err(e) => e,
        };
        Ok(Err(self.nn_error(error)?))
    }
}

impl graph::HostGraph for NnView<'_> {
    async fn init_execution_context(
        &mut self,
        graph: Resource<HostGraph>,
    ) -> wasmtime::Result<Result<Resource<HostExecutionContext>, Resource<HostError>>> {
        match self.table.get(&graph)?.0.clone().session() {
            Ok(session) => Ok(Ok(self.table.push(HostExecutionContext(session))?)),
            Err(e) => Ok(Err(self.nn_error(e)?)),
        }
    }

    async fn drop(&mut self, graph: Resource<HostGraph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl inference::Host for NnView<'_> {}

impl inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        context: Resource<HostExecutionContext>,
        inputs: Vec<(String, Resource<nn::Tensor>)>,
    ) -> wasmtime::Result<Result<Vec<(String, Resource<nn::Tensor>)>, Resource<HostError>>> {
        let mut tensors = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            // `named-tensor` holds an owned handle: the call consumes the guest's tensor.
            tensors.push((name, self.table.delete(tensor)?));
        }
        let outputs = self.table.get_mut(&context)?.0.compute(tensors);
        Ok(match outputs {
            Ok(outputs) => {
                let mut named = Vec::with_capacity(outputs.len());
                for (name, tensor) in outputs {
                    named.push((name, self.table.push(tensor)?));
                }
                Ok(named)
            }
            Err(e) => Err(self.nn_error(e)?),
        })
    }

    async fn drop(&mut self, context: Resource<HostExecutionContext>) -> wasmtime::Result<()> {
        self.table.delete(context)?;
        Ok(())
    }
}

impl tensor::Host for NnView<'_> {}

impl tensor::HostTensor for NnView<'_> {
    async fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: WitTensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<nn::Tensor>> {
        Ok(self.table.push(nn::Tensor {
            dimensions,
            ty: tensor_type(ty),
            data,
        })?)
    }

    async fn dimensions(&mut self, tensor: Resource<nn::Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dimensions.clone())
    }

    async fn ty(&mut self, tensor: Resource<nn::Tensor>) -> wasmtime::Result<WitTensorType> {
        Ok(wit_tensor_type(self.table.get(&tensor)?.ty))
    }

    async fn data(&mut self, tensor: Resource<nn::Tensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    async fn drop(&mut self, tensor: Resource<nn::Tensor>) -> wasmtime::Result<()> {
        self.table.delete(tensor)?;
        Ok(())
    }
}

impl errors::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    async fn code(&mut self, error: Resource<HostError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    async fn data(&mut self, error: Resource<HostError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.data.clone())
    }

    async fn drop(&mut self, error: Resource<HostError>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        Ok(())
    }
}

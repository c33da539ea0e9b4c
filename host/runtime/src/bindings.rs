//! The host's bindings for every WIT interface it provides or calls, generated once by
//! wasmtime's `bindgen!` from the `host` world in `wit/switchyard.wit` (every world a component
//! may target, together). Each interface's state and host implementation is in
//! [`super::interfaces`]; the resources are theirs, named here.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "switchyard:host/host",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "wasi:messaging/types.client": super::interfaces::messaging::MessagingClient,
        "wasi:messaging/types.message": super::interfaces::messaging::HostMessage,
        "switchyard:host/results.table": super::interfaces::results::HostTable,
        "wasi:nn/graph.graph": super::interfaces::wasi_nn::HostGraph,
        "wasi:nn/inference.graph-execution-context": super::interfaces::wasi_nn::HostExecutionContext,
        "wasi:nn/tensor.tensor": crate::nn::Tensor,
        "wasi:nn/errors.error": super::interfaces::wasi_nn::HostError,
    },
});

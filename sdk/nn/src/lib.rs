//! `audit-nn`: the one crate that touches libtorch (through tch). Plugins and the toolkit use it
//! to run, train, tap and edit ONNX classifiers; no `tch::Tensor` ever crosses the plugin ABI.
//!
//! This first part covers the runtime: which libtorch is loaded, and choosing a device. The
//! binary links only `libtorch_cpu`; CUDA support lives in `libtorch_cuda`, which
//! [`resolve_device`] loads at run time (from the folder the loaded libtorch came from) before
//! asking tch for a CUDA device.

mod device;
pub mod error;
pub mod export;
pub mod graph;
mod init;
pub mod limits;
pub mod model;
pub mod neurons;
pub mod ops;
pub mod proto;
pub mod tensor;
pub mod train;
pub mod zoo;

pub use device::{libtorch_dir, resolve_device, DeviceError, DeviceRequest};
pub use error::{NnError, Result};
pub use graph::{Graph, NodeView, OpClass};
pub use model::{IoInfo, Model, Param, ParamRole, UnsupportedNode};
pub use ops::Mode;
/// The protobuf runtime of [`proto`].
pub use prost;
/// The tch (libtorch) crate this engine is built on, for callers that hold its types.
pub use tch;

/// A tiny real computation on libtorch (sum of 0..10 = 45 on `device`), proving it loads and runs.
pub fn smoke_test(device: tch::Device) -> f64 {
    tch::Tensor::arange(10, (tch::Kind::Float, device))
        .sum(tch::Kind::Float)
        .double_value(&[])
}

/// [`smoke_test`] on the CPU.
pub fn smoke_test_cpu() -> f64 {
    smoke_test(tch::Device::Cpu)
}

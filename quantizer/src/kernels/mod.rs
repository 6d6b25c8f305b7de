//! The quantization kernels: `minmax` (exactly `mx.quantize`) and bit packing, the `mse` group
//! search, calibration importance, and in-memory quantization of one parameter with its error.

pub mod affine;
pub mod importance;
pub mod mse;
pub mod param_error;

//! The quantization kernels: `minmax` (exactly `mx.quantize`) and bit packing, the `mse` group
//! search, `gptq` error feedback through the input Hessian, the whole-matrix interface they share,
//! calibration importance, in-memory quantization of one parameter with its error, and MLX MXFP4
//! encoding of dense experts (exactly `mx.quantize(mode="mxfp4")`).

pub mod affine;
pub mod gptq;
pub mod importance;
pub mod method;
pub mod mse;
pub mod mxfp4;
pub mod param_error;

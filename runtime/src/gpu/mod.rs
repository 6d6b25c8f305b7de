//! The GPU backend: the same forward pass as the CPU runtime in WGSL compute kernels run through
//! `wgpu` (Metal on macOS, Vulkan on Linux, DX12 on Windows), reading the checkpoint's packed
//! weights as they are stored.

pub mod context;
pub mod model;
pub mod observe;
pub mod shaders;
pub mod weights;

pub use context::{adapters, AdapterSummary, GpuContext, GpuOptions};
pub use model::{GpuModel, GpuSampling, GpuSession};
pub use observe::{ObserveOptions, WindowStats};

//! The GPU device: adapter choice, limits, pipelines, buffers and read-back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Result, RuntimeError};
use crate::gpu::shaders::{Binding, Kernel};

/// How to pick and set up the GPU.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Accept software adapters (Mesa's lavapipe/llvmpipe): `--backend gpu` does, `auto` does not.
    pub allow_software: bool,
    /// Split weight tensors at this many bytes when below the adapter's binding limit (exercises
    /// splitting on small models).
    pub max_binding: Option<u64>,
}

/// What an adapter is, for reports.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    /// Device name.
    pub name: String,
    /// Backend (Vulkan, Metal, ...).
    pub backend: String,
    /// Driver and its version.
    pub driver: String,
    /// Whether it is a software rasterizer on the CPU.
    pub software: bool,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.backend, self.driver)
    }
}

fn summary(info: &wgpu::AdapterInfo) -> AdapterSummary {
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
        software: info.device_type == wgpu::DeviceType::Cpu,
    }
}

fn rank(info: &wgpu::AdapterInfo) -> u32 {
    match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        flags: wgpu::InstanceFlags::empty(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

/// The adapters this machine offers to compute on, best first.
pub fn adapters() -> Vec<AdapterSummary> {
    let mut all = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::PRIMARY));
    all.sort_by_key(|a| rank(&a.get_info()));
    all.iter().map(|a| summary(&a.get_info())).collect()
}

/// A compute pipeline and the layout of its bind group.
pub struct Pipeline {
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Its group-0 layout.
    pub layout: wgpu::BindGroupLayout,
}

/// An open GPU device with the kernels built on demand and the memory it holds counted.
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// The adapter in use.
    pub adapter: AdapterSummary,
    /// The device's limits (the adapter's own, requested in full).
    pub limits: wgpu::Limits,
    max_binding: u64,
    split_binding: u64,
    pipelines: Mutex<HashMap<Kernel, Arc<Pipeline>>>,
    allocated: AtomicU64,
    errors: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("adapter", &self.adapter).finish_non_exhaustive()
    }
}

impl GpuContext {
    /// Opens the best adapter (a hardware GPU before a software one) with its full limits.
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let inst = instance();
        let mut all = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::PRIMARY));
        all.sort_by_key(|a| rank(&a.get_info()));
        let found: Vec<String> = all.iter().map(|a| summary(&a.get_info()).to_string()).collect();
        let Some(adapter) = all.into_iter().find(|a| opts.allow_software || a.get_info().device_type != wgpu::DeviceType::Cpu) else {
            return Err(RuntimeError::NoGpu(if found.is_empty() {
                "no GPU adapter found: the GPU backend needs Vulkan (Linux: install libvulkan1 and a driver, \
                 e.g. mesa-vulkan-drivers), Metal (macOS) or DX12 (Windows)"
                    .into()
            } else {
                format!("only software adapters found ({}); use --backend gpu to run on them anyway", found.join(", "))
            }));
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("mixq"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| RuntimeError::NoGpu(format!("opening {}: {e}", info.name)))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
        }));
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_binding = max_binding & !3;
        let split_binding = opts.max_binding.map_or(max_binding, |m| m.min(max_binding)) & !3;
        Ok(GpuContext {
            device,
            queue,
            adapter: summary(&info),
            limits,
            max_binding,
            split_binding,
            pipelines: Mutex::new(HashMap::new()),
            allocated: AtomicU64::new(0),
            errors,
        })
    }

    /// The largest storage buffer one binding may hold, in bytes (a multiple of 4).
    pub fn max_binding(&self) -> u64 {
        self.max_binding
    }

    /// The largest part a weight tensor is stored in (the binding limit unless set lower).
    pub fn split_binding(&self) -> u64 {
        self.split_binding
    }

    /// Bytes of GPU buffers allocated through this context.
    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// The first error the device reported since the last check, as a runtime error.
    pub fn check(&self, doing: &str) -> Result<()> {
        let mut errs = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errs.is_empty() {
            return Ok(());
        }
        let all = errs.drain(..).collect::<Vec<_>>().join("; ");
        Err(RuntimeError::Gpu(format!("{doing}: {all}")))
    }

    /// The pipeline of a kernel, built the first time it is asked for.
    pub fn pipeline(&self, kernel: Kernel) -> Result<Arc<Pipeline>> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = cache.get(&kernel) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&kernel.name()),
            source: wgpu::ShaderSource::Wgsl(kernel.source().into()),
        });
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .bindings()
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b {
                        Binding::Uniform => wgpu::BufferBindingType::Uniform,
                        Binding::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Binding::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: None, entries: &entries });
        let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&kernel.name()),
            layout: Some(&pl),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(RuntimeError::Gpu(format!("building kernel {}: {e}", kernel.name())));
        }
        let p = Arc::new(Pipeline { pipeline, layout });
        cache.insert(kernel, p.clone());
        Ok(p)
    }

    /// A storage buffer of `size` bytes (rounded up to 4), or a clear error when it cannot exist.
    pub fn buffer(&self, what: &str, size: u64, usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        let size = size.max(4).div_ceil(4) * 4;
        let binding_limit = if usage.contains(wgpu::BufferUsages::STORAGE) { self.max_binding } else { self.limits.max_buffer_size };
        if size > binding_limit {
            return Err(RuntimeError::GpuMemory(format!(
                "{what} needs one buffer of {size} bytes but {} allows at most {binding_limit} bytes per buffer",
                self.adapter.name
            )));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(what), size, usage, mapped_at_creation: false });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(RuntimeError::GpuMemory(format!(
                "{what}: allocating {size} bytes failed on {} with {} bytes already allocated: {e}",
                self.adapter.name,
                self.allocated()
            )));
        }
        self.allocated.fetch_add(size, Ordering::Relaxed);
        Ok(buf)
    }

    /// A read-only storage buffer holding `data` (padded to 4 bytes).
    pub fn upload(&self, what: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let buf = self.buffer(what, data.len() as u64, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST)?;
        self.write(&buf, 0, data);
        Ok(buf)
    }

    /// Writes bytes at `offset` (padding the tail to 4 bytes).
    pub fn write(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) {
        let whole = data.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(buf, offset, &data[..whole]);
        }
        if whole < data.len() {
            let mut tail = [0u8; 4];
            tail[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.queue.write_buffer(buf, offset + whole as u64, &tail);
        }
    }

    /// Waits until the queue is idle.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| RuntimeError::Gpu(format!("waiting for the GPU: {e}")))
    }

    /// Copies `size` bytes from the start of `src` back to the host (through `staging`, a
    /// MAP_READ buffer at least that large), after the work already submitted.
    pub fn read(&self, src: &wgpu::Buffer, staging: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("read back") });
        enc.copy_buffer_to_buffer(src, 0, staging, 0, size);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..size, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| RuntimeError::Gpu("the GPU dropped a read-back".into()))?
            .map_err(|e| RuntimeError::Gpu(format!("reading back from the GPU: {e}")))?;
        let out = staging.get_mapped_range(0..size).map_err(|e| RuntimeError::Gpu(format!("reading back from the GPU: {e}")))?.to_vec();
        staging.unmap();
        self.check("running the model")?;
        Ok(out)
    }
}

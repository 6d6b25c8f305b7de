//! Weight matrices in GPU memory: the checkpoint's packed bytes uploaded as they are (streamed from
//! the memory map in chunks; F16 floats widened to F32 on the way; dense expert columns gathered
//! into rows a chunk at a time), split by rows into parts when a
//! tensor exceeds the largest storage binding, or synthetic weights filled in place.

use std::borrow::Cow;
use std::sync::Arc;

use crate::error::{Result, RuntimeError};
use crate::gpu::context::GpuContext;
use crate::gpu::shaders::{Kernel, WORKGROUP};
use mixq_loader::{FloatDtype, QuantFormat};
use crate::matrix::{Codes, Matrix, RowMap};

/// Bytes copied per write while uploading.
const UPLOAD_CHUNK: usize = 32 << 20;
/// Bytes written before waiting for the GPU to drain the staging memory.
const UPLOAD_FLUSH: u64 = 512 << 20;

/// Rows `first..first + rows` of a stored tensor, in their own buffers.
pub struct Part {
    /// First stored row.
    pub first: usize,
    /// Stored rows.
    pub rows: usize,
    /// Codes (or unquantized values).
    pub codes: wgpu::Buffer,
    /// Scales (affine) or E8M0 bytes (MXFP4).
    pub scales: Option<wgpu::Buffer>,
    /// Biases (affine).
    pub biases: Option<wgpu::Buffer>,
}

/// A stored weight tensor `[stored_rows, cols]` on the GPU.
pub struct Storage {
    /// Encoding of the rows.
    pub format: QuantFormat,
    /// The float type of unquantized values, scales and biases in GPU memory: BF16, or F32 (a
    /// checkpoint's F32 as it is, its F16 widened).
    pub floats: FloatDtype,
    /// Columns.
    pub cols: usize,
    /// Stored rows (all experts' rows for expert tensors).
    pub stored_rows: usize,
    /// The parts, in row order.
    pub parts: Vec<Part>,
}

impl Storage {
    /// Bytes per stored row (codes, scales and biases together).
    pub fn row_bytes(&self) -> usize {
        let (codes, scales, biases) = self.format.stored_row_parts(self.cols, self.floats);
        codes + scales + biases
    }

    /// Row ranges that keep each buffer within the largest storage binding.
    fn split(ctx: &GpuContext, what: &str, format: QuantFormat, floats: FloatDtype, cols: usize, stored_rows: usize) -> Result<Vec<(usize, usize)>> {
        if !cols.is_multiple_of(32) {
            return Err(RuntimeError::Checkpoint(format!(
                "{what}: the GPU kernels need {format:?} weights with a multiple of 32 columns (got {cols})"
            )));
        }
        let (c, s, b) = format.stored_row_parts(cols, floats);
        let widest = c.max(s).max(b) as u64;
        let per_part = (ctx.split_binding() / widest) as usize;
        if per_part == 0 {
            return Err(RuntimeError::GpuMemory(format!(
                "{what}: one row of {widest} bytes exceeds the largest storage binding of {} bytes",
                ctx.split_binding()
            )));
        }
        Ok((0..stored_rows).step_by(per_part).map(|first| (first, per_part.min(stored_rows - first))).collect())
    }

    /// Uploads a CPU matrix's stored rows (dense columns gathered into rows, a chunk at a time),
    /// calling `progress(bytes)` after each chunk.
    pub fn upload<'m>(ctx: &GpuContext, what: &str, m: &Matrix<'m>, progress: &dyn Fn(u64)) -> Result<Storage> {
        let format = m.codes.format();
        let stored = m.codes.floats();
        // The kernels read BF16 or F32 floats; F16 is widened (exactly) as it is sent.
        let floats = if stored == FloatDtype::BF16 { FloatDtype::BF16 } else { FloatDtype::F32 };
        let (c_in, s_in, b_in) = format.stored_row_parts(m.cols, stored);
        let (c, s, b) = format.stored_row_parts(m.cols, floats);
        let (codes, scales, biases): (&'m [u8], &'m [u8], &'m [u8]) = match m.codes {
            Codes::Dense { data, .. } | Codes::Columns { data, .. } => (data, &[], &[]),
            Codes::Affine { weight, scales, biases, .. } => (weight, scales, biases),
            Codes::Mxfp4 { blocks, scales } => (blocks, scales, &[]),
        };
        let stored_rows = codes.len() / c_in;
        let mut written = 0u64;
        // Sends stored rows `first..first + rows` of one piece, `per` bytes each in the source
        // (`rows_of` gives them, contiguous) and `gpu_per` in GPU memory, where F16 floats are
        // widened to F32.
        let mut send = |buf: &wgpu::Buffer, first: usize, rows: usize, per: usize, gpu_per: usize, rows_of: &dyn Fn(usize, usize) -> Cow<'m, [u8]>| -> Result<()> {
            let per_chunk = (UPLOAD_CHUNK / gpu_per).max(1);
            for lo in (first..first + rows).step_by(per_chunk) {
                let hi = (lo + per_chunk).min(first + rows);
                let source = rows_of(lo, hi);
                let chunk = if gpu_per == 2 * per { Cow::Owned(f16_to_f32_bytes(&source)) } else { source };
                ctx.write(buf, ((lo - first) * gpu_per) as u64, &chunk);
                written += chunk.len() as u64;
                // Progress counts the checkpoint's bytes, as the total it is measured against does.
                progress(((hi - lo) * per) as u64);
                if written >= UPLOAD_FLUSH {
                    ctx.queue.submit([]);
                    ctx.wait()?;
                    written = 0;
                }
            }
            Ok(())
        };
        let mut parts = Vec::new();
        for (first, rows) in Self::split(ctx, what, format, floats, m.cols, stored_rows)? {
            let mut piece = |per: usize, gpu_per: usize, data: &'m [u8], leaf: &str| -> Result<Option<wgpu::Buffer>> {
                if gpu_per == 0 {
                    return Ok(None);
                }
                let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
                let buf = ctx.buffer(&format!("{what}.{leaf}"), (rows * gpu_per) as u64, usage)?;
                // Unquantized codes come row by row from the matrix (which may gather columns).
                let rows_of = |lo: usize, hi: usize| match m.float_rows(lo, hi).filter(|_| leaf == "weight") {
                    Some(rows) => rows,
                    None => Cow::Borrowed(&data[lo * per..hi * per]),
                };
                send(&buf, first, rows, per, gpu_per, &rows_of)?;
                Ok(Some(buf))
            };
            let codes = piece(c_in, c, codes, "weight")?.expect("codes have bytes in every format");
            let scales = piece(s_in, s, scales, "scales")?;
            let biases = piece(b_in, b, biases, "biases")?;
            parts.push(Part { first, rows, codes, scales, biases });
        }
        Ok(Storage { format, floats, cols: m.cols, stored_rows, parts })
    }

    /// Random weights of the given shape made directly in GPU memory.
    pub fn synthetic(ctx: &GpuContext, what: &str, format: QuantFormat, cols: usize, stored_rows: usize, seed: u32) -> Result<Storage> {
        let (c, s, b) = format.row_parts(cols);
        let fill = ctx.pipeline(Kernel::Fill)?;
        let mut parts = Vec::new();
        for (first, rows) in Self::split(ctx, what, format, FloatDtype::BF16, cols, stored_rows)? {
            let make = |per: usize, kind: u32, leaf: &str| -> Result<Option<wgpu::Buffer>> {
                if per == 0 {
                    return Ok(None);
                }
                let buf =
                    ctx.buffer(&format!("{what}.{leaf}"), (rows * per) as u64, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST)?;
                fill_buffer(ctx, &fill, &buf, kind, seed.wrapping_add(kind * 7919 + first as u32))?;
                Ok(Some(buf))
            };
            let code_kind = if format == QuantFormat::Bf16 { 4 } else { 0 };
            let scale_kind = if format == QuantFormat::Mxfp4 { 3 } else { 1 };
            let codes = make(c, code_kind, "weight")?.expect("codes have bytes in every format");
            parts.push(Part { first, rows, codes, scales: make(s, scale_kind, "scales")?, biases: make(b, 2, "biases")? });
        }
        Ok(Storage { format, floats: FloatDtype::BF16, cols, stored_rows, parts })
    }
}

/// Little-endian F16 bytes as little-endian F32 bytes (exact).
fn f16_to_f32_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut values = vec![0f32; bytes.len() / 2];
    mixq_loader::decode::floats_to_f32(FloatDtype::F16, bytes, &mut values);
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn fill_buffer(ctx: &GpuContext, fill: &crate::gpu::context::Pipeline, buf: &wgpu::Buffer, kind: u32, seed: u32) -> Result<()> {
    let words = (buf.size() / 4) as u32;
    let per_dispatch = 65535 * WORKGROUP;
    let step = ctx.buffer("fill step", 32, wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST)?;
    let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("fill") });
    let mut keep = Vec::new();
    for offset in (0..words).step_by(per_dispatch as usize) {
        let params: Vec<u8> = [words, kind, seed, offset].iter().flat_map(|w| w.to_le_bytes()).collect();
        let pbuf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("fill params"),
            size: 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.queue.write_buffer(&pbuf, 0, &params);
        let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &fill.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: step.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: pbuf.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 2, resource: buf.as_entire_binding() },
            ],
        });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            pass.set_pipeline(&fill.pipeline);
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups((words - offset).min(per_dispatch).div_ceil(WORKGROUP), 1, 1);
        }
        keep.push(pbuf);
    }
    ctx.queue.submit([enc.finish()]);
    ctx.wait()?;
    ctx.check("filling synthetic weights")
}

/// A logical weight matrix: a view of a stored tensor through a row map, with an optional bias.
#[derive(Clone)]
pub struct GpuMatrix {
    /// The stored tensor (shared by the gate and up views of upstream experts).
    pub storage: Arc<Storage>,
    /// Logical rows (for experts: per expert).
    pub rows: usize,
    /// Logical-to-stored row map.
    pub map: RowMap,
    /// f32 bias over all logical rows, if any.
    pub bias: Option<wgpu::Buffer>,
}

impl GpuMatrix {
    /// The uniform words of `matmul.wgsl`'s `WeightParams` for one part, before the per-op fields.
    pub fn params(&self, part: &Part) -> [u32; 20] {
        let s = &self.storage;
        let (c, _, _) = s.format.stored_row_parts(s.cols, s.floats);
        let groups = s.format.groups(s.cols);
        let mut w = [0u32; 20];
        w[0] = self.rows as u32;
        w[1] = s.cols as u32;
        w[2] = (c / 4) as u32;
        w[3] = groups as u32;
        w[4] = self.map.per as u32;
        w[5] = self.map.src_per as u32;
        w[6] = self.map.start as u32;
        w[7] = self.map.step as u32;
        w[8] = part.first as u32;
        w[9] = part.rows as u32;
        w[16] = u32::from(self.bias.is_some());
        w
    }
}

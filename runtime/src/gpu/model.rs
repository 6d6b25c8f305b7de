//! The gpt-oss forward pass on the GPU: weights uploaded once, a session holding the KV cache and
//! activations with every dispatch of a forward pass recorded up front, and on-GPU sampling so a
//! decode step returns one token id.

use std::collections::HashMap;
use std::sync::Arc;

use mixq_loader::{GptOssConfig, LayerType};

use crate::error::{Result, RuntimeError};
use crate::gpu::context::{GpuContext, Pipeline};
use crate::gpu::shaders::{Kernel, MATMUL_ROWS, MATMUL_TILE, WORKGROUP};
use mixq_loader::QuantFormat;
use crate::gpu::observe::{ObserveOptions, ObservePlan, WindowStats};
use crate::gpu::weights::{GpuMatrix, Storage};
use crate::observe::InputSite;
use crate::matrix::{Matrix, RowMap};
use crate::matrix::Codes;
use crate::model::{LayerWeight, Model, WeightSlot, PREFILL_CHUNK, SWIGLU_ALPHA};
use crate::rope::Rope;

/// The weights of one layer on the GPU.
#[derive(Clone)]
struct GpuLayer {
    input_norm: wgpu::Buffer,
    post_norm: wgpu::Buffer,
    q: GpuMatrix,
    k: GpuMatrix,
    v: GpuMatrix,
    o: GpuMatrix,
    sinks: wgpu::Buffer,
    router: GpuMatrix,
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
    sliding: bool,
}

/// A gpt-oss model whose weights live in GPU memory.
#[derive(Clone)]
pub struct GpuModel {
    /// The device.
    pub ctx: Arc<GpuContext>,
    /// The config.
    pub config: GptOssConfig,
    embed: GpuMatrix,
    norm: wgpu::Buffer,
    lm_head: GpuMatrix,
    layers: Vec<GpuLayer>,
    rope: Rope,
    dummy: wgpu::Buffer,
    weight_bytes: u64,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel").field("adapter", &self.ctx.adapter).field("weight_bytes", &self.weight_bytes).finish_non_exhaustive()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Uploads matrices, sharing the storage of views over the same stored bytes.
struct Uploader<'c, 'p> {
    ctx: &'c GpuContext,
    shared: HashMap<(usize, usize), Arc<Storage>>,
    progress: &'p dyn Fn(u64),
}

impl Uploader<'_, '_> {
    /// A view of `m` whose logical rows are `rows` per block (all rows for dense matrices, one
    /// expert's for expert matrices), sharing storage already uploaded for the same bytes.
    fn matrix(&mut self, what: &str, m: &Matrix<'_>, bias: &[f32], rows: usize) -> Result<GpuMatrix> {
        let key = match m.codes {
            crate::matrix::Codes::Dense { data, .. } | crate::matrix::Codes::Columns { data, .. } => (data.as_ptr() as usize, data.len()),
            crate::matrix::Codes::Affine { weight, .. } => (weight.as_ptr() as usize, weight.len()),
            crate::matrix::Codes::Mxfp4 { blocks, .. } => (blocks.as_ptr() as usize, blocks.len()),
        };
        let storage = match self.shared.get(&key) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Storage::upload(self.ctx, what, m, self.progress)?);
                self.shared.insert(key, s.clone());
                s
            }
        };
        let bias = if bias.is_empty() { None } else { Some(self.ctx.upload(&format!("{what}.bias"), &f32_bytes(bias))?) };
        Ok(GpuMatrix { storage, rows, map: m.map, bias })
    }
}

/// The format of one MLX module from the config's quantization map (synthetic models, which
/// have no tensors to infer from).
fn module_format(config: &GptOssConfig, module: &str) -> Result<QuantFormat> {
    match config.quantization.as_ref().and_then(|q| q.module(module)) {
        None => Ok(QuantFormat::Bf16),
        Some(s) => QuantFormat::from_spec(s).map_err(|m| RuntimeError::Checkpoint(format!("{module}: {m}"))),
    }
}

/// The model dimensions the kernels and buffers are sized by.
#[derive(Clone, Copy)]
struct Dims {
    h: u64,
    nh: u64,
    nkv: u64,
    hd: u64,
    e: u64,
    k: u64,
    i: u64,
    vocab: u64,
}

impl Dims {
    fn of(c: &GptOssConfig) -> Self {
        let n = |x: usize| x as u64;
        Dims {
            h: n(c.hidden_size),
            nh: n(c.num_attention_heads),
            nkv: n(c.num_key_value_heads),
            hd: n(c.head_dim),
            e: n(c.num_local_experts),
            k: n(c.num_experts_per_tok),
            i: n(c.intermediate_size),
            vocab: n(c.vocab_size),
        }
    }
}

impl GpuModel {
    /// Uploads a loaded model's weights (read from its memory map) to the GPU; `progress(bytes)`
    /// is called as they go (the total is [`Model::weight_bytes`]).
    pub fn upload(model: &Model<'_>, ctx: Arc<GpuContext>, progress: &dyn Fn(u64)) -> Result<Arc<Self>> {
        let c = model.config.clone();
        let mut up = Uploader { ctx: &ctx, shared: HashMap::new(), progress };
        let vec = |what: &str, v: &[f32]| ctx.upload(what, &f32_bytes(v));
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for (l, w) in model.layers.iter().enumerate() {
            let p = format!("layer {l}");
            let mut linear = |name: &str, lin: &crate::model::Linear<'_>, rows: usize| up.matrix(&format!("{p}.{name}"), &lin.w, &lin.b, rows);
            // Expert matrices are addressed per expert: their logical rows are one expert's.
            let gate = linear("gate", &w.gate, c.intermediate_size)?;
            let upm = linear("up", &w.up, c.intermediate_size)?;
            let down = linear("down", &w.down, c.hidden_size)?;
            let q = linear("q_proj", &w.q, w.q.w.rows)?;
            let k = linear("k_proj", &w.k, w.k.w.rows)?;
            let v = linear("v_proj", &w.v, w.v.w.rows)?;
            let o = linear("o_proj", &w.o, w.o.w.rows)?;
            let router = linear("router", &w.router, w.router.w.rows)?;
            layers.push(GpuLayer {
                input_norm: vec(&format!("{p}.input_layernorm"), &w.input_norm)?,
                post_norm: vec(&format!("{p}.post_attention_layernorm"), &w.post_norm)?,
                q,
                k,
                v,
                o,
                sinks: vec(&format!("{p}.sinks"), &w.sinks)?,
                router,
                gate,
                up: upm,
                down,
                sliding: w.sliding,
            });
        }
        let embed = up.matrix("embed_tokens", &model.embed, &[], model.embed.rows)?;
        let lm_head = up.matrix("lm_head", &model.lm_head, &[], model.lm_head.rows)?;
        let norm = vec("norm", &model.norm)?;
        let dummy = ctx.upload("unused binding", &[0u8; 16])?;
        ctx.queue.submit([]);
        ctx.wait()?;
        ctx.check("uploading the weights")?;
        let weight_bytes = ctx.allocated();
        Ok(Arc::new(GpuModel { config: c, embed, norm, lm_head, layers, rope: model.rope.clone(), dummy, weight_bytes, ctx }))
    }

    /// A model of `config`'s shape and quantization map with random weights made in GPU memory,
    /// for timing shapes whose checkpoints are not at hand (no file is read or written).
    pub fn synthetic(config: &GptOssConfig, ctx: Arc<GpuContext>, progress: &dyn Fn(u64)) -> Result<Arc<Self>> {
        let c = config.clone();
        let (h, i, e) = (c.hidden_size, c.intermediate_size, c.num_local_experts);
        let (qd, kvd) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        let mut seed = 1u32;
        let mut matrix = |module: &str, experts: usize, rows: usize, cols: usize, bias: bool| -> Result<GpuMatrix> {
            seed = seed.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
            let format = module_format(&c, module)?;
            let storage = Arc::new(Storage::synthetic(&ctx, module, format, cols, experts * rows, seed)?);
            progress((storage.row_bytes() * storage.stored_rows) as u64);
            let bias = if bias {
                let v: Vec<f32> = (0..experts * rows).map(|k| ((k as f32 * 0.618).fract() - 0.5) * 0.02).collect();
                Some(ctx.upload(&format!("{module}.bias"), &f32_bytes(&v))?)
            } else {
                None
            };
            Ok(GpuMatrix { storage, rows, map: RowMap::identity(rows), bias })
        };
        let ones = |n: usize| f32_bytes(&vec![1.0f32; n]);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let x = format!("{p}.mlp.experts");
            layers.push(GpuLayer {
                input_norm: ctx.upload("norm", &ones(h))?,
                post_norm: ctx.upload("norm", &ones(h))?,
                q: matrix(&format!("{p}.self_attn.q_proj"), 1, qd, h, true)?,
                k: matrix(&format!("{p}.self_attn.k_proj"), 1, kvd, h, true)?,
                v: matrix(&format!("{p}.self_attn.v_proj"), 1, kvd, h, true)?,
                o: matrix(&format!("{p}.self_attn.o_proj"), 1, h, qd, true)?,
                sinks: ctx.upload("sinks", &f32_bytes(&vec![0.5f32; c.num_attention_heads]))?,
                router: matrix(&format!("{p}.mlp.router"), 1, e, h, true)?,
                gate: matrix(&format!("{x}.gate_proj"), e, i, h, true)?,
                up: matrix(&format!("{x}.up_proj"), e, i, h, true)?,
                down: matrix(&format!("{x}.down_proj"), e, h, i, true)?,
                sliding: c.layer_types[l] == LayerType::Sliding,
            });
        }
        let embed = matrix("model.embed_tokens", 1, c.vocab_size, h, false)?;
        let lm_head = matrix("lm_head", 1, c.vocab_size, h, false)?;
        let norm = ctx.upload("norm", &ones(h))?;
        let dummy = ctx.upload("unused binding", &[0u8; 16])?;
        ctx.check("making synthetic weights")?;
        let weight_bytes = ctx.allocated();
        let rope = Rope::new(c.head_dim, c.rope_theta, c.rope_scaling.as_ref());
        Ok(Arc::new(GpuModel { config: c, embed, norm, lm_head, layers, rope, dummy, weight_bytes, ctx }))
    }

    /// A model sharing every weight with this one except `module`'s (an MLX module path, as
    /// [`Model::with_weight`] takes), which is uploaded from `codes` (rows in the MLX module's
    /// order, experts stacked): only that tensor is sent, and this model is left as it is, so
    /// dropping the copy restores it. For measuring what quantizing one module does.
    pub fn with_weight(&self, module: &str, codes: Codes<'_>) -> Result<Arc<Self>> {
        let mut m = self.clone();
        let experts = self.config.num_local_experts;
        let (slot, per_expert) = match WeightSlot::parse(module, self.layers.len())? {
            WeightSlot::LmHead => (&mut m.lm_head, false),
            WeightSlot::Embed => (&mut m.embed, false),
            WeightSlot::Layer(l, leaf) => {
                let layer = &mut m.layers[l];
                match leaf {
                    LayerWeight::Q => (&mut layer.q, false),
                    LayerWeight::K => (&mut layer.k, false),
                    LayerWeight::V => (&mut layer.v, false),
                    LayerWeight::O => (&mut layer.o, false),
                    LayerWeight::Router => (&mut layer.router, false),
                    LayerWeight::Gate => (&mut layer.gate, true),
                    LayerWeight::Up => (&mut layer.up, true),
                    LayerWeight::Down => (&mut layer.down, true),
                }
            }
        };
        let rows = if per_expert { slot.rows * experts } else { slot.rows };
        let matrix = Matrix { codes, rows, cols: slot.storage.cols, map: RowMap::identity(rows) };
        if matrix.stored_bytes() != rows * matrix.row_bytes() {
            return Err(RuntimeError::Checkpoint(format!(
                "{module}: the replacement holds {} bytes; {rows} rows of {} columns in {:?} need {}",
                matrix.stored_bytes(),
                matrix.cols,
                codes.format(),
                rows * matrix.row_bytes()
            )));
        }
        slot.storage = Arc::new(Storage::upload(&self.ctx, module, &matrix, &|_| {})?);
        slot.map = matrix.map;
        self.ctx.queue.submit([]);
        self.ctx.wait()?;
        self.ctx.check("uploading a replacement weight")?;
        Ok(Arc::new(m))
    }

    /// The most parts any weight tensor was split into (1 when every tensor fits one binding).
    pub fn max_parts(&self) -> usize {
        let mut all: Vec<&GpuMatrix> = vec![&self.embed, &self.lm_head];
        for l in &self.layers {
            all.extend([&l.q, &l.k, &l.v, &l.o, &l.router, &l.gate, &l.up, &l.down]);
        }
        all.iter().map(|m| m.storage.parts.len()).max().unwrap_or(1)
    }

    /// Bytes of GPU memory the weights occupy.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Longest context the model supports.
    pub fn max_context(&self) -> usize {
        self.config.max_context()
    }

    /// Packed weight bytes read to decode one token (dense weights plus the routed experts).
    pub fn bytes_per_token(&self) -> u64 {
        let c = &self.config;
        let k = c.num_experts_per_tok;
        let rows = |m: &GpuMatrix, n: usize| (n * m.storage.row_bytes()) as u64;
        let mut bytes = rows(&self.lm_head, c.vocab_size) + rows(&self.embed, 1);
        for l in &self.layers {
            for m in [&l.q, &l.k, &l.v, &l.o, &l.router] {
                bytes += rows(m, m.rows);
            }
            bytes += rows(&l.gate, k * l.gate.rows) + rows(&l.up, k * l.up.rows) + rows(&l.down, k * l.down.rows);
        }
        bytes
    }
}

/// How many workgroups an op dispatches for a chunk of `t` tokens.
#[derive(Debug, Clone, Copy)]
enum Grid {
    /// Dense product: row blocks × token tiles.
    Rows { rows: u32, last_only: bool },
    /// Expert product: row blocks × (token, slot) pairs.
    ExpertRows { rows: u32, slots: u32 },
    /// One workgroup per token.
    Tokens,
    /// One thread per element, `per_token` elements per token.
    Elements { per_token: u32 },
    /// One workgroup per (head, token).
    Heads { heads: u32 },
    /// A single workgroup.
    One,
    /// One thread per entry of a fixed-size output, in rows of at most 65,535 workgroups.
    Threads { n: u32 },
}

impl Grid {
    fn size(&self, t: u32) -> (u32, u32) {
        match *self {
            Grid::Rows { rows, last_only } => (rows.div_ceil(MATMUL_ROWS), if last_only { 1 } else { t.div_ceil(MATMUL_TILE) }),
            Grid::ExpertRows { rows, slots } => (rows.div_ceil(MATMUL_ROWS), t * slots),
            Grid::Tokens => (t, 1),
            Grid::Elements { per_token } => ((t * per_token).div_ceil(WORKGROUP), 1),
            Grid::Heads { heads } => (heads, t),
            Grid::One => (1, 1),
            Grid::Threads { n } => {
                let groups = n.div_ceil(WORKGROUP);
                (groups.min(MAX_GROUPS), groups.div_ceil(MAX_GROUPS))
            }
        }
    }
}

/// Workgroups per dispatch dimension that every device allows.
const MAX_GROUPS: u32 = 65_535;

struct Op {
    pipeline: Arc<Pipeline>,
    bind_group: wgpu::BindGroup,
    grid: Grid,
}

/// Buffers of one session: activations for a chunk of tokens, and the KV cache.
struct Activations {
    step: wgpu::Buffer,
    tokens: wgpu::Buffer,
    x: wgpu::Buffer,
    normed: wgpu::Buffer,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    attn: wgpu::Buffer,
    router: wgpu::Buffer,
    ids: wgpu::Buffer,
    weights: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    down: wgpu::Buffer,
    logits: wgpu::Buffer,
    next: wgpu::Buffer,
    rope_table: wgpu::Buffer,
    caches: Vec<(wgpu::Buffer, wgpu::Buffer, u32)>,
    logits_staging: wgpu::Buffer,
    next_staging: wgpu::Buffer,
    /// Calibration sums (observing sessions) and their read-back buffer.
    stats: Option<(wgpu::Buffer, wgpu::Buffer)>,
}

/// How the next token is chosen on the GPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuSampling {
    /// 0: greedy.
    pub temperature: f32,
    /// Noise seed.
    pub seed: u64,
}

/// A running context on the GPU: KV cache, activations and the recorded dispatches.
pub struct GpuSession {
    model: Arc<GpuModel>,
    acts: Activations,
    body: Vec<Op>,
    head_all: Vec<Op>,
    head_last: Vec<Op>,
    sample: Op,
    /// Tokens in the cache.
    pub len: usize,
    capacity: usize,
    counter: u32,
    memory: u64,
    plan: Option<ObservePlan>,
}

/// Collects uniform parameter blocks at the device's offset alignment.
struct ParamBlocks {
    bytes: Vec<u8>,
    align: usize,
}

impl ParamBlocks {
    fn push(&mut self, words: &[u32]) -> (u64, u64) {
        let at = self.bytes.len().div_ceil(self.align) * self.align;
        self.bytes.resize(at, 0);
        self.bytes.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        let size = (words.len() * 4).div_ceil(16) * 16;
        self.bytes.resize(at + size, 0);
        (at as u64, size as u64)
    }
}

/// The ops of one product: one per part of the weight's storage.
#[allow(clippy::too_many_arguments)]
fn matmul_ops<'b>(
    blocks: &mut ParamBlocks,
    ops: &mut Vec<PendingOp<'b>>,
    m: &'b GpuMatrix,
    x: &'b wgpu::Buffer,
    y: &'b wgpu::Buffer,
    ids: &'b wgpu::Buffer,
    dummy: &'b wgpu::Buffer,
    set: &dyn Fn(&mut [u32; 20]),
) {
    for part in &m.storage.parts {
        let mut w = m.params(part);
        w[11] = m.storage.cols as u32;
        w[12] = m.rows as u32;
        set(&mut w);
        let experts = w[14] > 0;
        let dense_identity = !experts && m.map == RowMap::identity(m.rows);
        let (base, rows) = if dense_identity { (part.first as u32, part.rows as u32) } else { (0, m.rows as u32) };
        w[10] = base;
        let (kernel, grid) = if experts {
            (Kernel::ExpertMatmul(m.storage.format, m.storage.floats), Grid::ExpertRows { rows, slots: w[14] })
        } else {
            (Kernel::Matmul(m.storage.format, m.storage.floats), Grid::Rows { rows, last_only: w[17] == 1 })
        };
        ops.push(PendingOp {
            kernel,
            params: blocks.push(&w),
            buffers: vec![
                &part.codes,
                part.scales.as_ref().unwrap_or(dummy),
                part.biases.as_ref().unwrap_or(dummy),
                m.bias.as_ref().unwrap_or(dummy),
                x,
                y,
                if experts { ids } else { dummy },
            ],
            grid,
        });
    }
}

fn norm_op<'b>(
    blocks: &mut ParamBlocks,
    c: &GptOssConfig,
    weight: &'b wgpu::Buffer,
    x: &'b wgpu::Buffer,
    y: &'b wgpu::Buffer,
) -> PendingOp<'b> {
    PendingOp {
        kernel: Kernel::Norm,
        params: blocks.push(&[c.hidden_size as u32, (c.rms_norm_eps as f32).to_bits(), 0, 0]),
        buffers: vec![weight, x, y],
        grid: Grid::Tokens,
    }
}

/// The ops adding the rows of `x` at `site` (`routed`: per expert; row of token t's slot s at
/// `t * row.0 + s * row.1`) to each of the plan's sums there.
#[allow(clippy::too_many_arguments)]
fn observe_ops<'b>(
    observe: Option<(&ObservePlan, &'b wgpu::Buffer)>,
    blocks: &mut ParamBlocks,
    body: &mut Vec<PendingOp<'b>>,
    site: InputSite,
    routed: bool,
    x: &'b wgpu::Buffer,
    ids: &'b wgpu::Buffer,
    row: (u32, u32),
    slots: u32,
) {
    let Some((plan, stats)) = observe else { return };
    for s in plan.at(site, routed) {
        let experts = if routed { s.blocks as u32 } else { 0 };
        body.push(PendingOp {
            kernel: Kernel::Observe(s.gram),
            params: blocks.push(&[s.width as u32, experts, slots, row.0, row.1, s.offset as u32, s.count_offset as u32, 0]),
            buffers: vec![x, ids, stats],
            grid: Grid::Threads { n: s.len() as u32 },
        });
    }
}

/// Ops are recorded against buffers first and bound once the parameter buffer exists.
struct PendingOp<'b> {
    kernel: Kernel,
    params: (u64, u64),
    buffers: Vec<&'b wgpu::Buffer>,
    grid: Grid,
}

impl GpuModel {
    /// Opens a session whose KV cache holds `max_context` tokens.
    pub fn session(self: &Arc<Self>, max_context: usize) -> Result<GpuSession> {
        self.open_session(max_context, None)
    }

    /// Opens a session that also accumulates calibration statistics (see [`GpuSession::observe`]).
    pub fn observing_session(self: &Arc<Self>, max_context: usize, opts: ObserveOptions) -> Result<GpuSession> {
        self.open_session(max_context, Some(ObservePlan::new(&self.config, opts)))
    }

    fn open_session(self: &Arc<Self>, max_context: usize, plan: Option<ObservePlan>) -> Result<GpuSession> {
        let c = &self.config;
        if max_context == 0 || max_context > self.max_context() {
            return Err(RuntimeError::ContextExceeded { tokens: max_context, context: self.max_context() });
        }
        let before = self.ctx.allocated();
        let ctx = &*self.ctx;
        let Dims { h, nh, nkv, hd, k, vocab, .. } = Dims::of(c);
        if hd > 256 || hd % 2 != 0 || nh % nkv != 0 || k > 32 {
            return Err(RuntimeError::Checkpoint(format!(
                "the GPU kernels need an even head_dim of at most 256, heads divisible by kv heads and at most 32 experts per token (got head_dim {hd}, {nh}/{nkv} heads, {k} experts per token)"
            )));
        }
        let acts = self.activations(max_context, plan.as_ref())?;
        let mut blocks = ParamBlocks { bytes: Vec::new(), align: ctx.limits.min_uniform_buffer_offset_alignment.max(16) as usize };
        let a = &acts;
        let mut body: Vec<PendingOp<'_>> = Vec::new();
        let dummy = &self.dummy;
        for part in &self.embed.storage.parts {
            let w = self.embed.params(part);
            body.push(PendingOp {
                kernel: Kernel::Embed(self.embed.storage.format, self.embed.storage.floats),
                params: blocks.push(&w),
                buffers: vec![
                    &part.codes,
                    part.scales.as_ref().unwrap_or(&self.dummy),
                    part.biases.as_ref().unwrap_or(&self.dummy),
                    &a.tokens,
                    &a.x,
                ],
                grid: Grid::Elements { per_token: h as u32 },
            });
        }
        let observe = plan.as_ref().zip(a.stats.as_ref().map(|s| &s.0));
        for (l, (layer, cache)) in self.layers.iter().zip(&a.caches).enumerate() {
            self.layer_ops(l, layer, cache, a, observe, &mut blocks, &mut body);
        }
        body.push(norm_op(&mut blocks, c, &self.norm, &a.x, &a.normed));
        observe_ops(observe, &mut blocks, &mut body, InputSite::Final, false, &a.normed, &a.ids, (1, 0), 0);
        let mut head_all = Vec::new();
        matmul_ops(&mut blocks, &mut head_all, &self.lm_head, &a.normed, &a.logits, &a.ids, dummy, &|_| {});
        let mut head_last = Vec::new();
        matmul_ops(&mut blocks, &mut head_last, &self.lm_head, &a.normed, &a.logits, &a.ids, dummy, &|w| w[17] = 1);
        let sample = PendingOp {
            kernel: Kernel::Sample,
            params: blocks.push(&[vocab as u32, 0, 0, 0]),
            buffers: vec![&a.logits, &a.next],
            grid: Grid::One,
        };
        let params =
            ctx.buffer("kernel parameters", blocks.bytes.len() as u64, wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST)?;
        ctx.write(&params, 0, &blocks.bytes);
        let bind = |ops: Vec<PendingOp<'_>>| -> Result<Vec<Op>> { ops.into_iter().map(|p| self.bind(&a.step, &params, p)).collect() };
        let body = bind(body)?;
        let head_all = bind(head_all)?;
        let head_last = bind(head_last)?;
        let sample = self.bind(&a.step, &params, sample)?;
        ctx.check("preparing the forward pass")?;
        let memory = ctx.allocated() - before;
        Ok(GpuSession { model: self.clone(), acts, body, head_all, head_last, sample, len: 0, capacity: max_context, counter: 0, memory, plan })
    }

    /// The activation buffers, KV caches and RoPE table of a session of `max_context` tokens.
    fn activations(&self, max_context: usize, plan: Option<&ObservePlan>) -> Result<Activations> {
        let c = &self.config;
        let ctx = &*self.ctx;
        let t = PREFILL_CHUNK as u64;
        let Dims { h, nh, nkv, hd, e, k, i, vocab } = Dims::of(c);
        let rw = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
        let f = |what: &str, n: u64| ctx.buffer(what, n * 4, rw);
        let half = c.head_dim / 2;
        let mut table = Vec::with_capacity(max_context * half * 2);
        for pos in 0..max_context {
            for &fr in &self.rope.inv_freq {
                let (s, co) = (pos as f32 * fr).sin_cos();
                table.extend([co, s]);
            }
        }
        let mut caches = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let cap = if layer.sliding { (c.sliding_window + PREFILL_CHUNK).min(max_context) } else { max_context };
            let n = cap as u64 * nkv * hd;
            let kc = f(&format!("layer {l} key cache ({cap} tokens)"), n)?;
            let vc = f(&format!("layer {l} value cache ({cap} tokens)"), n)?;
            caches.push((kc, vc, cap as u32));
        }
        Ok(Activations {
            step: ctx.buffer("step", 32, wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST)?,
            tokens: ctx.buffer("tokens", t * 4, rw)?,
            x: f("residual", t * h)?,
            normed: f("normed", t * h)?,
            q: f("queries", t * nh * hd)?,
            k: f("keys", t * nkv * hd)?,
            v: f("values", t * nkv * hd)?,
            attn: f("attention", t * nh * hd)?,
            router: f("router logits", t * e)?,
            ids: ctx.buffer("expert ids", t * k * 4, rw)?,
            weights: f("expert weights", t * k)?,
            gate: f("expert gate", t * k * i)?,
            up: f("expert up", t * k * i)?,
            down: f("expert down", t * k * h)?,
            logits: f("logits", t * vocab)?,
            next: ctx.buffer("next token", 4, rw)?,
            rope_table: ctx.upload("rope table", &f32_bytes(&table))?,
            caches,
            logits_staging: ctx.buffer("logits read-back", t * vocab * 4, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)?,
            next_staging: ctx.buffer("token read-back", 4, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)?,
            stats: match plan {
                Some(p) => {
                    let bytes = p.len.max(1) as u64 * 4;
                    let read = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
                    Some((ctx.buffer("calibration sums", bytes, rw)?, ctx.buffer("calibration read-back", bytes, read)?))
                }
                None => None,
            },
        })
    }

    /// Appends the kernels of one transformer layer to `body` (with `observe`, those adding its
    /// inputs' calibration sums too).
    #[allow(clippy::too_many_arguments)]
    fn layer_ops<'b>(
        &'b self,
        l: usize,
        layer: &'b GpuLayer,
        (kc, vc, cap): &'b (wgpu::Buffer, wgpu::Buffer, u32),
        a: &'b Activations,
        observe: Option<(&ObservePlan, &'b wgpu::Buffer)>,
        blocks: &mut ParamBlocks,
        body: &mut Vec<PendingOp<'b>>,
    ) {
        let c = &self.config;
        let dummy = &self.dummy;
        let Dims { h, nh, nkv, hd, e, k, i, .. } = Dims::of(c);
        let scale = 1.0 / (hd as f32).sqrt();
        let slots = k as u32;
        body.push(norm_op(blocks, c, &layer.input_norm, &a.x, &a.normed));
        observe_ops(observe, blocks, body, InputSite::Attention(l), false, &a.normed, &a.ids, (1, 0), slots);
        for (m, y) in [(&layer.q, &a.q), (&layer.k, &a.k), (&layer.v, &a.v)] {
            matmul_ops(blocks, body, m, &a.normed, y, &a.ids, dummy, &|_| {});
        }
        body.push(PendingOp {
            kernel: Kernel::Rope,
            params: blocks.push(&[nh as u32, nkv as u32, hd as u32, *cap, self.rope.mscale.to_bits(), 0, 0, 0]),
            buffers: vec![&a.rope_table, &a.q, &a.k, &a.v, kc, vc],
            grid: Grid::Elements { per_token: ((nh + nkv) * hd / 2) as u32 },
        });
        let window = if layer.sliding { c.sliding_window as u32 } else { 0 };
        body.push(PendingOp {
            kernel: Kernel::Attention,
            params: blocks.push(&[nh as u32, nkv as u32, hd as u32, *cap, window, scale.to_bits(), 0, 0]),
            buffers: vec![&a.q, kc, vc, &layer.sinks, &a.attn],
            grid: Grid::Heads { heads: nh as u32 },
        });
        observe_ops(observe, blocks, body, InputSite::AttentionOut(l), false, &a.attn, &a.ids, (1, 0), slots);
        matmul_ops(blocks, body, &layer.o, &a.attn, &a.x, &a.ids, dummy, &|w| w[13] = 1);
        body.push(norm_op(blocks, c, &layer.post_norm, &a.x, &a.normed));
        observe_ops(observe, blocks, body, InputSite::Mlp(l), false, &a.normed, &a.ids, (1, 0), slots);
        matmul_ops(blocks, body, &layer.router, &a.normed, &a.router, &a.ids, dummy, &|_| {});
        body.push(PendingOp {
            kernel: Kernel::Router,
            params: blocks.push(&[e as u32, k as u32, 0, 0]),
            buffers: vec![&a.router, &a.ids, &a.weights],
            grid: Grid::Elements { per_token: 1 },
        });
        // Each token's row is the input of every expert it chose.
        observe_ops(observe, blocks, body, InputSite::Mlp(l), true, &a.normed, &a.ids, (1, 0), slots);
        for (m, y) in [(&layer.gate, &a.gate), (&layer.up, &a.up)] {
            matmul_ops(blocks, body, m, &a.normed, y, &a.ids, dummy, &|w| w[14] = k as u32);
        }
        body.push(PendingOp {
            kernel: Kernel::Swiglu,
            params: blocks.push(&[i as u32, k as u32, (c.swiglu_limit as f32).to_bits(), SWIGLU_ALPHA.to_bits()]),
            buffers: vec![&a.gate, &a.up],
            grid: Grid::Elements { per_token: (k * i) as u32 },
        });
        // The down input of token t's slot s is row t * k + s of the SwiGLU output.
        observe_ops(observe, blocks, body, InputSite::ExpertDown(l), true, &a.gate, &a.ids, (slots, 1), slots);
        matmul_ops(blocks, body, &layer.down, &a.gate, &a.down, &a.ids, dummy, &|w| {
            w[14] = k as u32;
            w[15] = 1;
        });
        body.push(PendingOp {
            kernel: Kernel::Combine,
            params: blocks.push(&[h as u32, k as u32, 0, 0]),
            buffers: vec![&a.ids, &a.weights, &a.down, &a.x],
            grid: Grid::Elements { per_token: h as u32 },
        });
    }

    fn bind(&self, step: &wgpu::Buffer, params: &wgpu::Buffer, p: PendingOp<'_>) -> Result<Op> {
        let pipeline = self.ctx.pipeline(p.kernel)?;
        let mut entries = vec![
            wgpu::BindGroupEntry { binding: 0, resource: step.as_entire_binding() },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: params,
                    offset: p.params.0,
                    size: wgpu::BufferSize::new(p.params.1),
                }),
            },
        ];
        for (n, b) in p.buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: n as u32 + 2, resource: b.as_entire_binding() });
        }
        let bind_group =
            self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.layout, entries: &entries });
        Ok(Op { pipeline, bind_group, grid: p.grid })
    }
}

impl GpuSession {
    /// Bytes of GPU memory this session holds (KV cache, activations, read-back buffers).
    pub fn memory_bytes(&self) -> u64 {
        self.memory
    }

    /// Tokens the KV cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets the context (the cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.config.vocab_size;
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= vocab {
                return Err(RuntimeError::TokenOutOfRange { id: t, position: self.len + i, vocab });
            }
        }
        if self.len + tokens.len() > self.capacity {
            return Err(RuntimeError::ContextExceeded { tokens: self.len + tokens.len(), context: self.capacity });
        }
        Ok(())
    }

    /// Records and submits one chunk (at most PREFILL_CHUNK tokens), ending with `tail`.
    fn run_chunk(&mut self, chunk: &[u32], tail: Tail, sampling: GpuSampling) {
        let ctx = &self.model.ctx;
        let n = chunk.len() as u32;
        let seed = (sampling.seed ^ (sampling.seed >> 32)) as u32;
        let step = [n, self.len as u32, seed, self.counter, sampling.temperature.to_bits(), 0, 0, 0];
        ctx.queue.write_buffer(&self.acts.step, 0, &step.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<_>>());
        ctx.queue.write_buffer(&self.acts.tokens, 0, &chunk.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<_>>());
        let tail: Vec<&Op> = match tail {
            Tail::Nothing => Vec::new(),
            Tail::AllLogits => self.head_all.iter().collect(),
            Tail::LastLogits => self.head_last.iter().collect(),
            Tail::Sample => self.head_last.iter().chain(std::iter::once(&self.sample)).collect(),
        };
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("forward") });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("forward"), timestamp_writes: None });
            for op in self.body.iter().chain(tail) {
                let (x, y) = op.grid.size(n);
                pass.set_pipeline(&op.pipeline.pipeline);
                pass.set_bind_group(0, &op.bind_group, &[]);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        ctx.queue.submit([enc.finish()]);
        self.len += chunk.len();
        self.counter = self.counter.wrapping_add(1);
    }

    fn read_logits(&self, rows: usize) -> Result<Vec<f32>> {
        let bytes = (rows * self.model.config.vocab_size * 4) as u64;
        let raw = self.model.ctx.read(&self.acts.logits, &self.acts.logits_staging, bytes)?;
        Ok(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Runs `tokens` after what the cache holds; returns logits for every position (`[n, vocab]`)
    /// or only the last (`[vocab]`).
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(PREFILL_CHUNK).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            let last = ci + 1 == chunks.len();
            if all_logits {
                self.run_chunk(chunk, Tail::AllLogits, GpuSampling::default());
                out.extend(self.read_logits(chunk.len())?);
            } else if last {
                self.run_chunk(chunk, Tail::LastLogits, GpuSampling::default());
                out = self.read_logits(1)?;
            } else {
                self.run_chunk(chunk, Tail::Nothing, GpuSampling::default());
            }
        }
        Ok(out)
    }

    /// Runs `tokens` and samples the next token on the GPU; only its id comes back.
    pub fn next_token(&mut self, tokens: &[u32], sampling: GpuSampling) -> Result<u32> {
        self.check_tokens(tokens)?;
        if tokens.is_empty() {
            return Err(RuntimeError::Text("nothing to run: no tokens".into()));
        }
        let chunks: Vec<&[u32]> = tokens.chunks(PREFILL_CHUNK).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            self.run_chunk(chunk, if ci + 1 == chunks.len() { Tail::Sample } else { Tail::Nothing }, sampling);
        }
        let raw = self.model.ctx.read(&self.acts.next, &self.acts.next_staging, 4)?;
        Ok(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
    }
}

impl GpuSession {
    /// Runs `tokens` from an empty context (an observing session's), adding every linear input's
    /// calibration sums on the device, and reads them back once at the end.
    pub fn observe(&mut self, tokens: &[u32]) -> Result<WindowStats> {
        let ctx = self.model.ctx.clone();
        let Some((stats, _)) = &self.acts.stats else {
            return Err(RuntimeError::Gpu("this session was not opened to observe calibration statistics".into()));
        };
        let mut enc = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("clear sums") });
        enc.clear_buffer(stats, 0, None);
        ctx.queue.submit([enc.finish()]);
        self.reset();
        self.check_tokens(tokens)?;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            self.run_chunk(chunk, Tail::Nothing, GpuSampling::default());
        }
        let (Some(plan), Some((stats, staging))) = (&self.plan, &self.acts.stats) else {
            return Err(RuntimeError::Gpu("this session was not opened to observe calibration statistics".into()));
        };
        let raw = ctx.read(stats, staging, plan.len.max(1) as u64 * 4)?;
        let data: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok(plan.window(&data, tokens.len()))
    }
}

/// What a chunk's dispatches end with.
#[derive(Debug, Clone, Copy)]
enum Tail {
    /// Nothing after the final norm (an inner prefill chunk).
    Nothing,
    /// lm_head over every position.
    AllLogits,
    /// lm_head over the last position.
    LastLogits,
    /// lm_head over the last position, then sampling.
    Sample,
}

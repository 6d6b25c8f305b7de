//! The gpt-oss model over packed weights: loading from any supported checkpoint, and the forward
//! pass (RMSNorm, attention with biases, GQA, YaRN RoPE, sinks and sliding windows, top-k router,
//! SwiGLU-OAI experts, final norm, lm_head), all in f32.

use mixq_loader::mlx_layout::param_format;
use mixq_loader::schema::{Schema, SourceLayout, UpstreamRows};
use mixq_loader::{Checkpoint, CheckpointFormat, Dtype, FloatDtype, GptOssConfig, LayerType, QuantFormat};
use rayon::prelude::*;

use crate::attention::{attend, AttentionShape};
use crate::cache::{KvCache, LayerCache};
use crate::error::{Result, RuntimeError};
use crate::matrix::{dot, Codes, Matrix, RowMap};
use crate::observe::{ActivationObserver, InputSite};
use crate::rope::Rope;

/// Tokens processed together during prefill on the GPU.
pub const PREFILL_CHUNK: usize = 64;
/// Tokens processed together during prefill on the CPU: each expert's rows are decoded once per
/// chunk and multiplied with every token routed to it, so a longer chunk decodes them less often
/// (512 tokens give each of 32 top-4 experts about 64). Results do not depend on it: every
/// product and attention row is summed in the same order whatever the chunk.
pub const CPU_PREFILL_CHUNK: usize = 512;
/// SwiGLU-OAI's sigmoid slope.
pub(crate) const SWIGLU_ALPHA: f32 = 1.702;

/// A linear layer: packed weight and f32 bias.
#[derive(Debug, Clone)]
pub(crate) struct Linear<'a> {
    pub(crate) w: Matrix<'a>,
    pub(crate) b: Vec<f32>,
}

impl Linear<'_> {
    pub(crate) fn forward(&self, xs: &[f32]) -> Vec<f32> {
        let n = xs.len() / self.w.cols;
        let mut out = vec![0f32; n * self.w.rows];
        self.w.matmul(xs, &mut out);
        if !self.b.is_empty() {
            for row in out.chunks_exact_mut(self.w.rows) {
                for (o, b) in row.iter_mut().zip(&self.b) {
                    *o += b;
                }
            }
        }
        out
    }
}

/// The weights of one transformer layer.
#[derive(Debug, Clone)]
pub(crate) struct Layer<'a> {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) post_norm: Vec<f32>,
    pub(crate) q: Linear<'a>,
    pub(crate) k: Linear<'a>,
    pub(crate) v: Linear<'a>,
    pub(crate) o: Linear<'a>,
    pub(crate) sinks: Vec<f32>,
    pub(crate) router: Linear<'a>,
    /// All experts' gate rows stacked: `[experts * intermediate, hidden]`, bias `[experts * intermediate]`.
    pub(crate) gate: Linear<'a>,
    pub(crate) up: Linear<'a>,
    /// `[experts * hidden, intermediate]`.
    pub(crate) down: Linear<'a>,
    pub(crate) sliding: bool,
}

/// A gpt-oss model whose weights stay packed in the checkpoint's memory map.
#[derive(Debug, Clone)]
pub struct Model<'a> {
    /// The config.
    pub config: GptOssConfig,
    pub(crate) embed: Matrix<'a>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Matrix<'a>,
    pub(crate) layers: Vec<Layer<'a>>,
    pub(crate) rope: Rope,
    format: CheckpointFormat,
}

/// A weight matrix of one layer, by its MLX module leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerWeight {
    Q,
    K,
    V,
    O,
    Router,
    Gate,
    Up,
    Down,
}

/// Which weight matrix an MLX module path names (what [`Model::with_weight`] and the GPU model's
/// `with_weight` swap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightSlot {
    LmHead,
    Embed,
    Layer(usize, LayerWeight),
}

impl WeightSlot {
    /// Parses `lm_head`, `model.embed_tokens` or `model.layers.N.<leaf>` for a model of `layers` layers.
    pub(crate) fn parse(module: &str, layers: usize) -> Result<Self> {
        let unknown = || RuntimeError::Checkpoint(format!("{module}: not a weight module of this model"));
        match module {
            "lm_head" => return Ok(WeightSlot::LmHead),
            "model.embed_tokens" => return Ok(WeightSlot::Embed),
            _ => {}
        }
        let rest = module.strip_prefix("model.layers.").ok_or_else(unknown)?;
        let (l, leaf) = rest.split_once('.').ok_or_else(unknown)?;
        let l = l.parse::<usize>().ok().filter(|&l| l < layers).ok_or_else(unknown)?;
        let leaf = match leaf {
            "self_attn.q_proj" => LayerWeight::Q,
            "self_attn.k_proj" => LayerWeight::K,
            "self_attn.v_proj" => LayerWeight::V,
            "self_attn.o_proj" => LayerWeight::O,
            "mlp.router" => LayerWeight::Router,
            "mlp.experts.gate_proj" => LayerWeight::Gate,
            "mlp.experts.up_proj" => LayerWeight::Up,
            "mlp.experts.down_proj" => LayerWeight::Down,
            _ => return Err(unknown()),
        };
        Ok(WeightSlot::Layer(l, leaf))
    }
}

struct Loader<'a, 'c> {
    ckpt: &'a Checkpoint,
    schema: &'c Schema,
    /// The layout of a source checkpoint (upstream MXFP4 or transformers' dense), whose tensors
    /// are where the schema's source rows say; `None` for MLX and other unquantized checkpoints.
    layout: Option<SourceLayout>,
}

fn disagree(e: mixq_loader::LoaderError) -> RuntimeError {
    RuntimeError::Checkpoint(format!("{e} (config and tensors disagree)"))
}

impl<'a> Loader<'a, '_> {
    /// The tensor `name` with the dtype and shape it must have.
    fn fetch(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&'a [u8]> {
        let t = self.ckpt.tensor(name)?;
        t.expect(dtype, shape).map_err(disagree)?;
        Ok(t.data)
    }

    /// The float tensor `name` (BF16, F16 or F32) with the shape it must have, and its type.
    fn fetch_floats(&self, name: &str, shape: &[usize]) -> Result<(&'a [u8], FloatDtype)> {
        let t = self.ckpt.tensor(name)?;
        let dtype = t.expect_float(shape).map_err(disagree)?;
        Ok((t.data, dtype))
    }

    /// A vector (norm, bias, sinks) as f32, from where the checkpoint keeps it (a source
    /// checkpoint's float type, or an MLX checkpoint's BF16, F16 or F32; a source checkpoint's
    /// dtypes were checked when it was opened).
    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        let p = self.schema.param(name)?;
        let (tensor, start, step, expected) = match self.layout.map(|l| (p.rows_in(l), p.source_tensors(l))) {
            Some((UpstreamRows::Bf16Strided { tensor, start, step }, mut t)) => (tensor, start, step, t.remove(0).shape),
            _ => (name.to_string(), 0, 1, p.shape.clone()),
        };
        let (data, dtype) = self.fetch_floats(&tensor, &expected)?;
        let mut all = vec![0f32; expected.iter().product()];
        mixq_loader::decode::floats_to_f32(dtype, data, &mut all);
        Ok(if step == 1 { all } else { all.into_iter().skip(start).step_by(step).collect() })
    }

    /// The weight of the module `module` (all experts' rows stacked), read in place as the
    /// checkpoint stores it: upstream MXFP4 rows, transformers' dense transposed expert columns,
    /// or the MLX format mlx-lm would load.
    fn matrix(&self, module: &str) -> Result<Matrix<'a>> {
        let p = self.schema.param(&format!("{module}.weight"))?;
        let (rows, cols) = (p.rows(), p.in_features());
        if let Some(layout) = self.layout {
            let t = p.source_tensors(layout);
            match p.rows_in(layout) {
                UpstreamRows::Mxfp4 { blocks, scales, map } => {
                    let codes = Codes::Mxfp4 { blocks: self.fetch(&blocks, Dtype::U8, &t[0].shape)?, scales: self.fetch(&scales, Dtype::U8, &t[1].shape)? };
                    return Ok(Matrix { codes, rows, cols, map });
                }
                UpstreamRows::DenseTransposed { tensor, per, start, step } => {
                    let (data, dtype) = self.fetch_floats(&tensor, &t[0].shape)?;
                    let map = RowMap { per, src_per: per * step, start, step };
                    return Ok(Matrix { codes: Codes::Columns { data, dtype }, rows, cols, map });
                }
                UpstreamRows::Bf16 { .. } | UpstreamRows::Bf16Strided { .. } => {}
            }
        }
        let format = if self.layout.is_some() { QuantFormat::Bf16 } else { param_format(self.ckpt, p)? };
        if !cols.is_multiple_of(format.input_multiple()) {
            return Err(RuntimeError::Checkpoint(format!(
                "tensor {module}.weight: {format} needs an input width that is a multiple of {}, found {cols}",
                format.input_multiple()
            )));
        }
        let outs = format.outputs(&p.module, p.leaf, &p.shape);
        let data = |k: usize| self.fetch(&outs[k].name, outs[k].dtype, &outs[k].shape);
        let floats = |k: usize| self.fetch_floats(&outs[k].name, &outs[k].shape);
        let codes = match format {
            QuantFormat::Bf16 => {
                let (data, dtype) = floats(0)?;
                Codes::Dense { data, dtype }
            }
            QuantFormat::Mxfp4 => Codes::Mxfp4 { blocks: data(0)?, scales: data(1)? },
            QuantFormat::Affine { bits, group_size } => {
                let ((scales, floats), (biases, bias_floats)) = (floats(1)?, floats(2)?);
                if bias_floats != floats {
                    return Err(RuntimeError::Checkpoint(format!(
                        "tensor {}: its biases are {bias_floats} but its scales {floats}; mlx stores both in one type",
                        outs[2].name
                    )));
                }
                Codes::Affine { weight: data(0)?, scales, biases, floats, bits, group_size: group_size as usize }
            }
        };
        Ok(Matrix { codes, rows, cols, map: RowMap::identity(rows) })
    }

    fn linear(&self, module: &str) -> Result<Linear<'a>> {
        Ok(Linear { w: self.matrix(module)?, b: self.vector(&format!("{module}.bias"))? })
    }
}

impl<'a> Model<'a> {
    /// Builds the model over an open checkpoint (upstream MXFP4, transformers' dense layout, MLX
    /// quantized, or BF16), each parameter where the schema says it is, read in place.
    pub fn load(ckpt: &'a Checkpoint) -> Result<Self> {
        let config = ckpt.config().clone();
        let c = &config;
        let format = ckpt.format();
        let layout = format.source_layout();
        if let Some(layout) = layout {
            // The forward pass slices MXFP4 rows in blocks of 32 and gathers dense expert columns
            // by stride: a layout that is not exactly the one the config implies must be refused
            // here, by name, not read out of bounds.
            mixq_loader::layout::validate_source(ckpt, layout)?;
        }
        let schema = Schema::new(c);
        let ld = Loader { ckpt, schema: &schema, layout };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for (l, layer_type) in c.layer_types.iter().enumerate() {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                input_norm: ld.vector(&format!("{p}.input_layernorm.weight"))?,
                post_norm: ld.vector(&format!("{p}.post_attention_layernorm.weight"))?,
                q: ld.linear(&format!("{p}.self_attn.q_proj"))?,
                k: ld.linear(&format!("{p}.self_attn.k_proj"))?,
                v: ld.linear(&format!("{p}.self_attn.v_proj"))?,
                o: ld.linear(&format!("{p}.self_attn.o_proj"))?,
                sinks: ld.vector(&format!("{p}.self_attn.sinks"))?,
                router: ld.linear(&format!("{p}.mlp.router"))?,
                gate: ld.linear(&format!("{p}.mlp.experts.gate_proj"))?,
                up: ld.linear(&format!("{p}.mlp.experts.up_proj"))?,
                down: ld.linear(&format!("{p}.mlp.experts.down_proj"))?,
                sliding: *layer_type == LayerType::Sliding,
            });
        }
        Ok(Model {
            embed: ld.matrix("model.embed_tokens")?,
            norm: ld.vector("model.norm.weight")?,
            lm_head: ld.matrix("lm_head")?,
            layers,
            rope: Rope::new(c.head_dim, c.rope_theta, c.rope_scaling.as_ref()),
            format,
            config,
        })
    }

    /// A copy of the model whose weight of `module` (an MLX module path: `lm_head`,
    /// `model.embed_tokens`, `model.layers.N.self_attn.q_proj`, `model.layers.N.mlp.router`,
    /// `model.layers.N.mlp.experts.gate_proj`, ...) is stored as `codes` (rows in the MLX module's
    /// order, experts stacked); for measuring what quantizing one module does.
    pub fn with_weight<'b>(&self, module: &str, codes: Codes<'b>) -> Result<Model<'b>>
    where
        'a: 'b,
    {
        let mut m: Model<'b> = self.clone();
        let slot: &mut Matrix<'b> = match WeightSlot::parse(module, m.layers.len())? {
            WeightSlot::LmHead => &mut m.lm_head,
            WeightSlot::Embed => &mut m.embed,
            WeightSlot::Layer(l, leaf) => {
                let layer = &mut m.layers[l];
                let linear = match leaf {
                    LayerWeight::Q => &mut layer.q,
                    LayerWeight::K => &mut layer.k,
                    LayerWeight::V => &mut layer.v,
                    LayerWeight::O => &mut layer.o,
                    LayerWeight::Router => &mut layer.router,
                    LayerWeight::Gate => &mut layer.gate,
                    LayerWeight::Up => &mut layer.up,
                    LayerWeight::Down => &mut layer.down,
                };
                &mut linear.w
            }
        };
        *slot = Matrix { codes, rows: slot.rows, cols: slot.cols, map: RowMap::identity(slot.rows) };
        Ok(m)
    }

    /// The checkpoint format the model was loaded from.
    pub fn format(&self) -> CheckpointFormat {
        self.format
    }

    /// Longest context the model supports.
    pub fn max_context(&self) -> usize {
        self.config.max_context()
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        let width = self.config.num_key_value_heads * self.config.head_dim;
        // A ring never needs to hold more than the model's context: at that size it never wraps.
        let ring = (self.config.sliding_window + CPU_PREFILL_CHUNK).min(self.max_context());
        KvCache { layers: self.layers.iter().map(|l| LayerCache::new(width, l.sliding.then_some(ring))).collect(), len: 0 }
    }

    /// Packed weight bytes of the whole model (what the GPU backend uploads).
    pub fn weight_bytes(&self) -> u64 {
        let m = |x: &Matrix<'_>| x.stored_bytes() as u64;
        let mut total = m(&self.embed) + m(&self.lm_head);
        for l in &self.layers {
            total += [&l.q, &l.k, &l.v, &l.o, &l.router].iter().map(|x| m(&x.w)).sum::<u64>();
            // Source gate and up views (upstream MXFP4 rows, dense columns) share one stored tensor.
            total += m(&l.gate.w) + m(&l.down.w) + if l.up.w.map.step == 2 { 0 } else { m(&l.up.w) };
        }
        total
    }

    /// Packed weight bytes read to decode one token (dense weights plus the routed experts).
    pub fn bytes_per_token(&self) -> usize {
        let c = &self.config;
        let k = c.num_experts_per_tok;
        let mut bytes = self.lm_head.rows * self.lm_head.row_bytes() + self.embed.row_bytes();
        for l in &self.layers {
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.router] {
                bytes += lin.w.rows * lin.w.row_bytes();
            }
            bytes += k * c.intermediate_size * (l.gate.w.row_bytes() + l.up.w.row_bytes());
            bytes += k * c.hidden_size * l.down.w.row_bytes();
        }
        bytes
    }

    /// Runs `tokens` through the model after what `cache` holds; returns logits for every
    /// position (`[n, vocab]`) or only the last (`[vocab]`).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Vec<f32>> {
        self.forward_observed(tokens, cache, all_logits, None)
    }

    /// [`Model::forward`], handing every linear layer's input to `observer` when given.
    pub fn forward_observed<'o>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        all_logits: bool,
        mut observer: Option<&mut (dyn ActivationObserver + 'o)>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        for (i, &t) in tokens.iter().enumerate() {
            if t as usize >= c.vocab_size {
                return Err(RuntimeError::TokenOutOfRange { id: t, position: cache.len + i, vocab: c.vocab_size });
            }
        }
        if cache.len + tokens.len() > self.max_context() {
            return Err(RuntimeError::ContextExceeded { tokens: cache.len + tokens.len(), context: self.max_context() });
        }
        let mut logits = Vec::new();
        for (ci, chunk) in tokens.chunks(CPU_PREFILL_CHUNK).enumerate() {
            let last_chunk = (ci + 1) * CPU_PREFILL_CHUNK >= tokens.len();
            let hidden = self.hidden_states(chunk, cache, observer.as_deref_mut());
            if let Some(obs) = observer.as_deref_mut() {
                obs.tokens(InputSite::Final, &hidden);
            }
            let rows: &[f32] = if all_logits {
                &hidden
            } else if last_chunk {
                &hidden[hidden.len() - c.hidden_size..]
            } else {
                continue;
            };
            let mut out = vec![0f32; rows.len() / c.hidden_size * c.vocab_size];
            self.lm_head.matmul(rows, &mut out);
            logits.extend_from_slice(&out);
        }
        Ok(logits)
    }

    /// Final-norm hidden states of a chunk of tokens, advancing the cache.
    fn hidden_states<'o>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        mut obs: Option<&mut (dyn ActivationObserver + 'o)>,
    ) -> Vec<f32> {
        let c = &self.config;
        let h = c.hidden_size;
        let n = tokens.len();
        let first = cache.len;
        let mut x = vec![0f32; n * h];
        for (t, &id) in tokens.iter().enumerate() {
            self.embed.decode_row(id as usize, &mut x[t * h..(t + 1) * h]);
        }
        for (l, (layer, lc)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let normed = rms_norm(&x, &layer.input_norm, c.rms_norm_eps as f32);
            let attn = self.attention(layer, lc, &normed, first);
            if let Some(o) = obs.as_deref_mut() {
                o.tokens(InputSite::Attention(l), &normed);
                o.tokens(InputSite::AttentionOut(l), &attn);
            }
            let o = layer.o.forward(&attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let normed = rms_norm(&x, &layer.post_norm, c.rms_norm_eps as f32);
            if let Some(o) = obs.as_deref_mut() {
                o.tokens(InputSite::Mlp(l), &normed);
            }
            let moe = self.experts(layer, &normed, obs.as_deref_mut().map(|o| (l, o)));
            x.iter_mut().zip(&moe).for_each(|(a, b)| *a += b);
        }
        cache.len += n;
        rms_norm(&x, &self.norm, c.rms_norm_eps as f32)
    }

    pub(crate) fn attention(&self, layer: &Layer<'_>, lc: &mut LayerCache, xs: &[f32], first: usize) -> Vec<f32> {
        let c = &self.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let n = xs.len() / c.hidden_size;
        let mut q = layer.q.forward(xs);
        let mut k = layer.k.forward(xs);
        let v = layer.v.forward(xs);
        for t in 0..n {
            for head in q[t * nh * hd..(t + 1) * nh * hd].chunks_exact_mut(hd) {
                self.rope.apply(head, first + t);
            }
            for head in k[t * nkv * hd..(t + 1) * nkv * hd].chunks_exact_mut(hd) {
                self.rope.apply(head, first + t);
            }
        }
        lc.append(first, &k, &v);
        let shape = AttentionShape { heads: nh, kv_heads: nkv, head_dim: hd, window: layer.sliding.then_some(c.sliding_window) };
        attend(shape, &q, lc, first, &layer.sinks)
    }

    pub(crate) fn experts<'o>(&self, layer: &Layer<'_>, xs: &[f32], mut obs: Option<(usize, &mut (dyn ActivationObserver + 'o))>) -> Vec<f32> {
        let c = &self.config;
        let (h, i, k) = (c.hidden_size, c.intermediate_size, c.num_experts_per_tok);
        let n = xs.len() / h;
        let router = layer.router.forward(xs);
        // Per token: the k experts with the largest logits, weighted by a softmax over those k.
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); c.num_local_experts];
        for (t, logits) in router.chunks_exact(c.num_local_experts).enumerate() {
            let mut idx: Vec<usize> = (0..logits.len()).collect();
            idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let top = &idx[..k];
            let max = logits[top[0]];
            let exps: Vec<f32> = top.iter().map(|&e| (logits[e] - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            for (&e, w) in top.iter().zip(exps) {
                by_expert[e].push((t, w / sum));
            }
        }
        let limit = c.swiglu_limit as f32;
        let observing = obs.is_some();
        // The experts run in parallel (each product also splits its rows over threads): during
        // decode one token's k experts are k independent products. Each returns its inputs, its
        // activations and its down projection; they are observed and summed in expert order.
        let active: Vec<(usize, &Vec<(usize, f32)>)> = by_expert.iter().enumerate().filter(|(_, u)| !u.is_empty()).collect();
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = active
            .par_iter()
            .map(|&(e, users)| {
                let m = users.len();
                let mut x_e = Vec::with_capacity(m * h);
                for &(t, _) in users {
                    x_e.extend_from_slice(&xs[t * h..(t + 1) * h]);
                }
                let mut gate = vec![0f32; m * i];
                let mut up = vec![0f32; m * i];
                rayon::join(
                    || layer.gate.w.matmul_rows(e * i, i, &x_e, &mut gate),
                    || layer.up.w.matmul_rows(e * i, i, &x_e, &mut up),
                );
                let (gb, ub) = (&layer.gate.b[e * i..(e + 1) * i], &layer.up.b[e * i..(e + 1) * i]);
                for (g_row, u_row) in gate.chunks_exact_mut(i).zip(up.chunks_exact(i)) {
                    for (((g, u), bg), bu) in g_row.iter_mut().zip(u_row).zip(gb).zip(ub) {
                        let gv = (*g + bg).min(limit);
                        let uv = (u + bu).clamp(-limit, limit);
                        *g = (uv + 1.0) * (gv / (1.0 + (-SWIGLU_ALPHA * gv).exp()));
                    }
                }
                let mut down = vec![0f32; m * h];
                layer.down.w.matmul_rows(e * h, h, &gate, &mut down);
                if !observing {
                    (x_e, gate) = (Vec::new(), Vec::new());
                }
                (x_e, gate, down)
            })
            .collect();
        let mut out = vec![0f32; n * h];
        for (&(e, users), (x_e, gate, down)) in active.iter().zip(results) {
            if let Some((l, o)) = obs.as_mut() {
                o.routed(InputSite::Mlp(*l), e, &x_e);
                o.routed(InputSite::ExpertDown(*l), e, &gate);
            }
            let db = &layer.down.b[e * h..(e + 1) * h];
            for (&(t, w), d_row) in users.iter().zip(down.chunks_exact(h)) {
                for ((o, d), b) in out[t * h..(t + 1) * h].iter_mut().zip(d_row).zip(db) {
                    *o += w * (d + b);
                }
            }
        }
        out
    }
}

/// `x * rsqrt(mean(x^2) + eps) * w` per row.
pub(crate) fn rms_norm(xs: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; xs.len()];
    for (o, x) in out.chunks_exact_mut(h).zip(xs.chunks_exact(h)) {
        let ms = dot(x, x) / h as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
            *o = x * r * w;
        }
    }
    out
}

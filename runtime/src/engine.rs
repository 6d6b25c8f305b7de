//! One model on a chosen backend: the CPU reference or the GPU, with generation and logits that
//! work the same on both.

use std::sync::{Arc, Mutex};

use mixq_loader::{Checkpoint, GptOssConfig};

use crate::error::{Result, RuntimeError};
use crate::matrix::Codes;
use crate::generate::{decode_loop, require_prompt, GenerationStats};
use crate::gpu::{GpuContext, GpuModel, GpuOptions, GpuSampling, GpuSession};
use crate::model::Model;
use crate::sample::{Sampler, SamplerConfig};

/// Which backend runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The CPU reference.
    Cpu,
    /// The GPU through wgpu (any adapter, software ones included).
    Gpu,
    /// A hardware GPU when there is one, else the CPU.
    Auto,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "gpu" => Ok(Backend::Gpu),
            "auto" => Ok(Backend::Auto),
            _ => Err(format!("unknown backend {s:?}; expected cpu, gpu or auto")),
        }
    }
}

/// A model ready to run.
#[allow(clippy::large_enum_variant, reason = "one engine per job, made once and held in place: boxing would only add an indirection")]
pub enum Engine<'a> {
    /// On the CPU, weights read in place from the memory map.
    Cpu(Model<'a>),
    /// In GPU memory, with a session kept for reuse.
    Gpu {
        /// The uploaded model.
        model: Arc<GpuModel>,
        /// The last session, reused while its KV cache is large enough.
        session: Mutex<Option<GpuSession>>,
    },
}

impl std::fmt::Debug for Engine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What loading chose, for the one-line note `auto` prints.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Why `auto` fell back to the CPU, if it did.
    pub fallback: Option<String>,
}

impl<'a> Engine<'a> {
    /// Loads `ckpt` on `backend`; for the GPU the weights are uploaded, calling
    /// `progress(bytes_done, bytes_total)`.
    pub fn load(ckpt: &'a Checkpoint, backend: Backend, opts: &GpuOptions, progress: &dyn Fn(u64, u64)) -> Result<(Self, Choice)> {
        let cpu = Model::load(ckpt)?;
        let ctx = match backend {
            Backend::Cpu => return Ok((Engine::Cpu(cpu), Choice { fallback: None })),
            Backend::Gpu => GpuContext::new(&GpuOptions { allow_software: true, ..opts.clone() })?,
            Backend::Auto => match GpuContext::new(&GpuOptions { allow_software: false, ..opts.clone() }) {
                Ok(c) => c,
                Err(e) => return Ok((Engine::Cpu(cpu), Choice { fallback: Some(e.to_string()) })),
            },
        };
        let total = cpu.weight_bytes();
        let done = std::sync::atomic::AtomicU64::new(0);
        let model = GpuModel::upload(&cpu, Arc::new(ctx), &|n| {
            let d = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            progress(d, total);
        })?;
        Ok((Engine::Gpu { model, session: Mutex::new(None) }, Choice { fallback: None }))
    }

    /// A GPU engine over an already uploaded (or synthetic) model.
    pub fn from_gpu(model: Arc<GpuModel>) -> Self {
        Engine::Gpu { model, session: Mutex::new(None) }
    }

    /// A copy of the model whose weight of `module` is stored as `codes` (see
    /// [`Model::with_weight`]); on the GPU only that tensor is uploaded, the rest shared with this
    /// engine, which stays as it is.
    pub fn with_weight<'b>(&self, module: &str, codes: Codes<'b>) -> Result<Engine<'b>>
    where
        'a: 'b,
    {
        Ok(match self {
            Engine::Cpu(m) => Engine::Cpu(m.with_weight(module, codes)?),
            Engine::Gpu { model, .. } => Engine::from_gpu(model.with_weight(module, codes)?),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &GptOssConfig {
        match self {
            Engine::Cpu(m) => &m.config,
            Engine::Gpu { model, .. } => &model.config,
        }
    }

    /// `cpu` or `gpu`.
    pub fn backend(&self) -> &'static str {
        match self {
            Engine::Cpu(_) => "cpu",
            Engine::Gpu { .. } => "gpu",
        }
    }

    /// The backend and device, for reports.
    pub fn describe(&self) -> String {
        match self {
            Engine::Cpu(_) => format!("cpu ({} threads)", rayon::current_num_threads()),
            Engine::Gpu { model, .. } => format!("gpu: {}", model.ctx.adapter),
        }
    }

    /// Longest context the model supports.
    pub fn max_context(&self) -> usize {
        self.config().max_context()
    }

    /// Packed weight bytes read per decoded token.
    pub fn bytes_per_token(&self) -> u64 {
        match self {
            Engine::Cpu(m) => m.bytes_per_token() as u64,
            Engine::Gpu { model, .. } => model.bytes_per_token(),
        }
    }

    /// GPU memory held (weights, cache, activations); 0 on the CPU.
    pub fn gpu_memory_bytes(&self) -> u64 {
        match self {
            Engine::Cpu(_) => 0,
            Engine::Gpu { model, .. } => model.ctx.allocated(),
        }
    }

    /// Whether windows can be scored in parallel threads (the CPU) or one after another (the GPU).
    pub fn parallel(&self) -> bool {
        matches!(self, Engine::Cpu(_))
    }

    /// Logits of every position of `tokens` from an empty context (`[n, vocab]`).
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        match self {
            Engine::Cpu(m) => m.forward(tokens, &mut m.new_cache(), true),
            Engine::Gpu { model, session } => with_session(model, session, tokens.len().max(1), |s| s.forward(tokens, true)),
        }
    }

    /// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id. On the GPU
    /// the KV cache holds `max_context` tokens (default: prompt plus `max_tokens`), and greedy or
    /// plain temperature sampling runs on the device; top-k/top-p read the logits back.
    pub fn generate(
        &self,
        prompt: &[u32],
        max_tokens: usize,
        sampler: SamplerConfig,
        eos_ids: &[u32],
        max_context: Option<usize>,
        on_token: impl FnMut(u32),
    ) -> Result<(Vec<u32>, GenerationStats)> {
        let (model, slot) = match self {
            Engine::Cpu(m) => return crate::generate::generate(m, prompt, max_tokens, &mut Sampler::new(sampler), eos_ids, on_token),
            Engine::Gpu { model, session } => (model, session),
        };
        require_prompt(prompt)?;
        let needed = prompt.len() + max_tokens;
        let capacity = max_context.unwrap_or(needed);
        if needed > capacity || capacity > model.max_context() {
            return Err(RuntimeError::ContextExceeded { tokens: needed, context: capacity.min(model.max_context()) });
        }
        with_session(model, slot, capacity, |s| gpu_generate(s, prompt, max_tokens, sampler, eos_ids, on_token))
    }
}

/// Runs `f` on a session from its start, reusing the kept one while its KV cache holds `tokens`
/// (opening a session checks `tokens` against the model's context).
fn with_session<T>(
    model: &Arc<GpuModel>,
    slot: &Mutex<Option<GpuSession>>,
    tokens: usize,
    f: impl FnOnce(&mut GpuSession) -> Result<T>,
) -> Result<T> {
    let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_none_or(|s| s.capacity() < tokens) {
        *guard = None;
        *guard = Some(model.session(tokens)?);
    }
    let s = guard.as_mut().expect("a session was just made");
    s.reset();
    f(s)
}

fn gpu_generate(
    s: &mut GpuSession,
    prompt: &[u32],
    max_tokens: usize,
    sampler: SamplerConfig,
    eos_ids: &[u32],
    on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerationStats)> {
    let on_device = sampler.top_k == 0 && sampler.top_p >= 1.0;
    let sampling = GpuSampling { temperature: sampler.temperature.max(0.0), seed: sampler.seed };
    let mut cpu_sampler = Sampler::new(sampler);
    let (out, mut stats) = decode_loop(prompt, max_tokens, eos_ids, on_token, |tokens| {
        if on_device {
            s.next_token(tokens, sampling)
        } else {
            Ok(cpu_sampler.sample(&s.forward(tokens, false)?))
        }
    })?;
    stats.cache_bytes = s.memory_bytes() as usize;
    Ok((out, stats))
}

//! What the real cheap sensitivity run of a model shape would cost, from its config and rates
//! measured on this machine in the same process: the `--synthetic-config` answer to "can I run
//! this at 120b".

use mixq_loader::{FloatDtype, GptOssConfig};
use mixq_loader::schema::TensorClass;
use mixq_quantizer::authoring::sensitivity_file::{units, RunCost};
use mixq_runtime::matrix::{Codes, Matrix, RowMap};

/// Multiply-adds per token of one attention block (projections only) and one MLP block (router
/// and the routed experts), and of lm_head.
fn block_flops(c: &GptOssConfig) -> (f64, f64, f64) {
    let (h, hd) = (c.hidden_size as f64, c.head_dim as f64);
    let (nh, nkv) = (c.num_attention_heads as f64, c.num_key_value_heads as f64);
    let attention = 2.0 * (h * (nh + 2.0 * nkv) * hd + nh * hd * h);
    let i = c.intermediate_size as f64;
    let mlp = 2.0 * (h * c.num_local_experts as f64 + c.num_experts_per_tok as f64 * 3.0 * h * i);
    (attention, mlp, 2.0 * h * c.vocab_size as f64)
}

/// The runtime's product speed here, in FLOP/s: a 1024 x 1024 BF16 matrix times 64 tokens.
pub fn measured_flops() -> f64 {
    let (rows, cols, tokens) = (1024usize, 1024usize, 64usize);
    let data: Vec<u8> = (0..rows * cols).flat_map(|i| half::bf16::from_f32(((i % 97) as f32 - 48.0) / 97.0).to_le_bytes()).collect();
    let m = Matrix { codes: Codes::Dense { data: &data, dtype: FloatDtype::BF16 }, rows, cols, map: RowMap::identity(rows) };
    let xs: Vec<f32> = (0..tokens * cols).map(|i| ((i % 31) as f32 - 15.0) / 31.0).collect();
    let mut out = vec![0f32; tokens * rows];
    m.matmul(&xs, &mut out);
    let start = std::time::Instant::now();
    let reps = 5;
    for _ in 0..reps {
        m.matmul(&xs, &mut out);
    }
    std::hint::black_box(&out);
    (2 * rows * cols * tokens * reps) as f64 / start.elapsed().as_secs_f64().max(1e-9)
}

/// The cost of `mixq sensitivity --model` without `--text` on a model of shape `c`: quantizing
/// every unit at `settings` settings at `quantize_seconds_per_weight` (measured on these threads),
/// and the model runs of the estimate over `probe_tokens` tokens at `flops` FLOP/s.
pub fn cheap_run_cost(c: &GptOssConfig, settings: usize, second: bool, probe_tokens: usize, quantize_seconds_per_weight: f64, flops: f64) -> RunCost {
    let (attention, mlp, head) = block_flops(c);
    let layers = c.num_hidden_layers as f64;
    let forward = layers * (attention + mlp) + head;
    let params = units(c);
    let units: Vec<(TensorClass, usize)> = params.iter().map(|p| (p.class, p.numel())).collect();
    let weights: f64 = units.iter().map(|(_, n)| *n as f64).sum();
    // Per unit and setting, its one block (or lm_head) over the probe.
    let local: f64 = units
        .iter()
        .map(|(class, _)| match class {
            TensorClass::EmbedTokens => 0.0,
            TensorClass::LmHead => head,
            c if c.is_expert() || *c == TensorClass::Router => mlp,
            _ => attention,
        })
        .sum::<f64>()
        * settings as f64;
    // Everything after a residual site: the blocks that read it and lm_head.
    let rest = |site: usize| {
        let after = 2 * c.num_hidden_layers - site;
        (after / 2) as f64 * (attention + mlp) + if after % 2 == 1 { mlp } else { 0.0 } + head
    };
    // Per site, one or two noise runs; per unit, the rest of the model after its site at each
    // measured setting (its KL on the probe).
    let runs = if second { 2.0 } else { 1.0 };
    let perturb: f64 = (0..=2 * c.num_hidden_layers).map(|site| runs * rest(site)).sum();
    let anchored: f64 = params
        .iter()
        .map(|p| match (p.class, p.layer) {
            (TensorClass::EmbedTokens, _) => runs * rest(0),
            (TensorClass::LmHead, _) => 0.0,
            (class, Some(l)) if class.is_expert() || class == TensorClass::Router => runs * rest(2 * l + 2),
            (_, l) => runs * rest(2 * l.unwrap_or(0) + 1),
        })
        .sum();
    let model_flops = (forward + local + perturb + anchored) * probe_tokens as f64;
    let largest_unit = units.iter().map(|(_, n)| *n).max().unwrap_or(0) as u64;
    let sites = 2 * c.num_hidden_layers as u64 + 1;
    RunCost {
        threads: rayon::current_num_threads(),
        probe_tokens,
        weights_quantized: weights * settings as f64,
        quantize_seconds: weights * settings as f64 * quantize_seconds_per_weight,
        model_flops,
        model_seconds: model_flops / flops.max(1.0),
        flops_per_second: flops,
        // The largest unit quantized at 8 bits with its f32 scratch, plus the probe's residual
        // stream at every site.
        peak_bytes: largest_unit * 2 + sites * probe_tokens as u64 * c.hidden_size as u64 * 4,
    }
}

//! The tensors an upstream gpt-oss checkpoint must hold, with their dtypes and shapes.

use crate::checkpoint::Checkpoint;
use crate::config::GptOssConfig;
use crate::dtype::Dtype;
use crate::error::{LoaderError, Result};

/// Elements per MXFP4 block (one shared E8M0 scale).
pub const MXFP4_BLOCK: usize = 32;

/// A tensor the upstream layout requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// Full tensor name.
    pub name: String,
    /// Required dtype.
    pub dtype: Dtype,
    /// Required shape.
    pub shape: Vec<usize>,
}

fn t(name: String, dtype: Dtype, shape: &[usize]) -> ExpectedTensor {
    ExpectedTensor { name, dtype, shape: shape.to_vec() }
}

/// Every tensor of the upstream gpt-oss layout for a config, in a stable order.
pub fn upstream_tensors(c: &GptOssConfig) -> Vec<ExpectedTensor> {
    let (h, i, e, v) = (c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let bf = Dtype::BF16;
    let mut out = vec![
        t("model.embed_tokens.weight".into(), bf, &[v, h]),
        t("model.norm.weight".into(), bf, &[h]),
        t("lm_head.weight".into(), bf, &[v, h]),
    ];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        out.extend([
            t(format!("{p}input_layernorm.weight"), bf, &[h]),
            t(format!("{p}post_attention_layernorm.weight"), bf, &[h]),
            t(format!("{p}self_attn.q_proj.weight"), bf, &[q, h]),
            t(format!("{p}self_attn.q_proj.bias"), bf, &[q]),
            t(format!("{p}self_attn.k_proj.weight"), bf, &[kv, h]),
            t(format!("{p}self_attn.k_proj.bias"), bf, &[kv]),
            t(format!("{p}self_attn.v_proj.weight"), bf, &[kv, h]),
            t(format!("{p}self_attn.v_proj.bias"), bf, &[kv]),
            t(format!("{p}self_attn.o_proj.weight"), bf, &[h, q]),
            t(format!("{p}self_attn.o_proj.bias"), bf, &[h]),
            t(format!("{p}self_attn.sinks"), bf, &[c.num_attention_heads]),
            t(format!("{p}mlp.router.weight"), bf, &[e, h]),
            t(format!("{p}mlp.router.bias"), bf, &[e]),
            t(format!("{p}mlp.experts.gate_up_proj_blocks"), Dtype::U8, &[e, 2 * i, h / MXFP4_BLOCK, 16]),
            t(format!("{p}mlp.experts.gate_up_proj_scales"), Dtype::U8, &[e, 2 * i, h / MXFP4_BLOCK]),
            t(format!("{p}mlp.experts.gate_up_proj_bias"), bf, &[e, 2 * i]),
            t(format!("{p}mlp.experts.down_proj_blocks"), Dtype::U8, &[e, h, i / MXFP4_BLOCK, 16]),
            t(format!("{p}mlp.experts.down_proj_scales"), Dtype::U8, &[e, h, i / MXFP4_BLOCK]),
            t(format!("{p}mlp.experts.down_proj_bias"), bf, &[e, h]),
        ]);
    }
    out
}

/// Checks that an upstream checkpoint holds exactly the tensors its config implies.
pub fn validate_upstream(ckpt: &Checkpoint) -> Result<()> {
    let c = ckpt.config();
    for (what, n) in [("hidden_size", c.hidden_size), ("intermediate_size", c.intermediate_size)] {
        if n % MXFP4_BLOCK != 0 {
            return Err(LoaderError::Config {
                path: c.path.clone(),
                message: format!("`{what}` ({n}) must be a multiple of {MXFP4_BLOCK} for MXFP4 experts"),
            });
        }
    }
    let expected = upstream_tensors(c);
    for e in &expected {
        ckpt.tensor(&e.name)?.expect(e.dtype, &e.shape)?;
    }
    if let Some(extra) = ckpt.names().find(|n| !expected.iter().any(|e| e.name == *n)) {
        return Err(LoaderError::tensor(extra, "is not part of the gpt-oss layout for this config"));
    }
    Ok(())
}

//! What calibration statistics say about a weight's inputs: the per-column importance of its rows
//! (the mean of x² at the layer's input, per expert for expert projections, floored so that no
//! column is free), and the input Hessians `gptq` feeds errors through.

use std::path::{Path, PathBuf};

use mixq_loader::calibration::packed_len;
use mixq_loader::{Calibration, Checkpoint, InputSite, ModelFingerprint, StatTensor};

use crate::kernels::gptq::HessianFactor;

use crate::error::ConvertError;
use crate::writer::hash::sha256_file;
use mixq_loader::schema::{Param, TensorClass};

/// Fraction of a block's mean x² added to every column's importance: keeps channels that the
/// calibration text never excited from being quantized as if they did not matter.
pub const IMPORTANCE_FLOOR: f32 = 0.05;

/// Calibration statistics opened for a conversion, checked against its source.
#[derive(Debug)]
pub struct CalibrationUse {
    /// The statistics file.
    pub path: PathBuf,
    /// sha256 of the file.
    pub file_sha256: String,
    /// Its contents.
    pub stats: Calibration,
}

/// Importance weights of one parameter's rows: one vector of `cols` per block of rows (the whole
/// matrix, or one expert), absent for experts no calibration token reached.
#[derive(Debug, Clone)]
pub struct Importance {
    rows_per_block: usize,
    blocks: Vec<Option<Vec<f32>>>,
}

impl Importance {
    /// The weights of output row `r` (`None`: quantize it unweighted).
    pub fn row(&self, r: usize) -> Option<&[f32]> {
        self.blocks.get(r / self.rows_per_block)?.as_deref()
    }

    /// The end (exclusive, at most `rows`) of the block of rows that row `r` is in.
    pub fn block_end(&self, r: usize, rows: usize) -> usize {
        ((r / self.rows_per_block + 1) * self.rows_per_block).min(rows)
    }

    /// Builds the floored weights of `blocks` vectors of `cols` mean-x² values; `reached[b]` says
    /// whether block `b` saw any calibration token.
    pub fn from_means(means: &[f32], cols: usize, rows_per_block: usize, reached: &[bool]) -> Self {
        let blocks = means
            .chunks_exact(cols)
            .zip(reached)
            .map(|(m, &seen)| {
                let mean = m.iter().map(|&x| f64::from(x)).sum::<f64>() / cols as f64;
                (seen && mean > 0.0).then(|| {
                    let floor = (mean * f64::from(IMPORTANCE_FLOOR)) as f32;
                    m.iter().map(|&x| x + floor).collect()
                })
            })
            .collect();
        Importance { rows_per_block, blocks }
    }
}

/// Fewest routed tokens for which an expert's own Hessian is used (fewer: the site's shared one).
pub const MIN_EXPERT_HESSIAN_TOKENS: f32 = 64.0;

/// The input Hessians of one parameter's rows, packed: the distinct matrices, and which one each
/// block of rows (the whole matrix, or one expert) uses, if any; factored when asked for.
#[derive(Debug, Clone)]
pub struct ParamHessians {
    cols: usize,
    rows_per_block: usize,
    matrices: Vec<Vec<f32>>,
    /// Rows (tokens) each matrix was measured over.
    rows: Vec<f64>,
    of_block: Vec<Option<usize>>,
    /// Whether some expert uses its own Hessian (not the site's shared one).
    pub per_expert: bool,
}

impl ParamHessians {
    /// The matrix that output row `r` uses, if any.
    pub fn matrix_of_row(&self, r: usize) -> Option<usize> {
        *self.of_block.get(r / self.rows_per_block)?
    }

    /// The end (exclusive, at most `rows`) of the run of rows from `r` on that use the same matrix.
    pub fn run_end(&self, r: usize, rows: usize) -> usize {
        let m = self.matrix_of_row(r);
        let mut end = ((r / self.rows_per_block) + 1) * self.rows_per_block;
        while end < rows && self.matrix_of_row(end) == m {
            end += self.rows_per_block;
        }
        end.min(rows)
    }

    /// Matrix `m` factored (`None`: it carries nothing to feed errors through).
    pub fn factor(&self, m: usize) -> Option<HessianFactor> {
        HessianFactor::from_packed(self.matrices.get(m)?, self.cols, *self.rows.get(m)?)
    }
}

impl CalibrationUse {
    /// Reads `path` and refuses statistics measured on a model other than `ckpt`'s.
    pub fn open(path: &Path, ckpt: &Checkpoint) -> Result<Self, ConvertError> {
        let stats = Calibration::read(path)?;
        stats.check_model(path, &ModelFingerprint::of(ckpt)?)?;
        let (file_sha256, _) = sha256_file(path).map_err(crate::error::io(path))?;
        Ok(CalibrationUse { path: path.to_path_buf(), file_sha256, stats })
    }

    fn bad(&self, message: String) -> ConvertError {
        ConvertError::Calibration { path: self.path.clone(), message }
    }

    /// The importance of a quantizable weight's columns; `None` for weights the statistics do not
    /// cover by design (the embedding table, a lookup rather than a product).
    pub fn importance(&self, p: &Param) -> Result<Option<Importance>, ConvertError> {
        if p.class == TensorClass::EmbedTokens || !p.class.is_quantizable() {
            return Ok(None);
        }
        let cols = p.in_features();
        let t = self.stats.input_sq_mean(&p.module).ok_or_else(|| {
            self.bad(format!("no statistics for {} (tensor {}.input_sq_mean is missing)", p.module, p.module))
        })?;
        if p.class.is_expert() {
            let (experts, rows) = (p.shape[0], p.shape[1]);
            if t.shape != [experts, cols] {
                return Err(self.bad(format!("{}.input_sq_mean has shape {:?}, expected [{experts}, {cols}]", p.module, t.shape)));
            }
            let layer = p.layer.unwrap_or(0);
            let counts = self.stats.expert_tokens(layer).ok_or_else(|| {
                self.bad(format!("no routed-token counts for layer {layer} (model.layers.{layer}.mlp.experts.token_count)"))
            })?;
            if counts.len() != experts {
                return Err(self.bad(format!("layer {layer} has token counts for {} experts, expected {experts}", counts.len())));
            }
            let reached: Vec<bool> = counts.iter().map(|&c| c > 0.0).collect();
            Ok(Some(Importance::from_means(&t.data, cols, rows, &reached)))
        } else {
            if t.shape != [cols] {
                return Err(self.bad(format!("{}.input_sq_mean has shape {:?}, expected [{cols}]", p.module, t.shape)));
            }
            Ok(Some(Importance::from_means(&t.data, cols, p.numel() / cols, &[true])))
        }
    }
}

impl CalibrationUse {
    /// The input Hessians of a quantizable weight, where the statistics hold them: a dense layer's
    /// site Hessian; for an expert projection, each expert's own where recorded and the expert saw
    /// at least [`MIN_EXPERT_HESSIAN_TOKENS`] tokens, else the site's shared one. `None` for
    /// the embedding and for files without Hessians.
    pub fn hessians(&self, p: &Param) -> Result<Option<ParamHessians>, ConvertError> {
        let Some(site) = p.input_site() else { return Ok(None) };
        if p.class == TensorClass::EmbedTokens || !self.stats.has_hessians() {
            return Ok(None);
        }
        let cols = p.in_features();
        let expected = packed_len(cols);
        let check = |t: &StatTensor, what: &str| -> Result<(), ConvertError> {
            if t.shape.last() != Some(&expected) {
                return Err(self.bad(format!("{what} has shape {:?}, expected [.., {expected}] (the packed {cols} x {cols} triangle)", t.shape)));
            }
            Ok(())
        };
        let shared = self.stats.site_hessian(site)?;
        if let Some(t) = &shared {
            check(t, &format!("{}.hessian", site.name()))?;
        }
        // Every expert's down input is its own intermediate space: the sum of their Hessians does
        // not describe any one of them, and feeding errors through it raised the held-out KL on
        // the bundled model (0.0163 against 0.0123 with each expert's own), so down projections
        // use only their own; the shared gate/up Hessian (the router's input) did as well as
        // each expert's own.
        let shared = shared.filter(|_| !matches!(site, InputSite::ExpertDown(_)));
        let mut matrices: Vec<Vec<f32>> = shared.into_iter().map(|t| t.data).collect();
        let mut rows_of: Vec<f64> = matrices.iter().map(|_| self.stats.tokens as f64).collect();
        let shared = (!matrices.is_empty()).then_some(0);
        if !p.class.is_expert() {
            return Ok(shared.map(|_| ParamHessians { cols, rows_per_block: p.rows().max(1), matrices, rows: rows_of, of_block: vec![shared], per_expert: false }));
        }
        let (experts, rows) = (p.shape[0], p.shape[1]);
        let counts = p.layer.and_then(|l| self.stats.expert_tokens(l)).unwrap_or(&[]);
        let mut of_block = vec![shared; experts];
        let mut per_expert = false;
        if let Some(t) = self.stats.expert_hessians(site)? {
            check(&t, &format!("{}.expert_hessian", site.name()))?;
            if t.shape[0] != experts {
                return Err(self.bad(format!("{}.expert_hessian has {} experts, expected {experts}", site.name(), t.shape[0])));
            }
            for (e, h) in t.data.chunks_exact(expected).enumerate() {
                if counts.get(e).is_some_and(|&n| n >= MIN_EXPERT_HESSIAN_TOKENS) {
                    of_block[e] = Some(matrices.len());
                    matrices.push(h.to_vec());
                    rows_of.push(f64::from(counts[e]));
                    per_expert = true;
                }
            }
        }
        if of_block.iter().all(Option::is_none) {
            return Ok(None);
        }
        Ok(Some(ParamHessians { cols, rows_per_block: rows.max(1), matrices, rows: rows_of, of_block, per_expert }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use mixq_loader::calibration::{HessianEntry, EXPERT_HESSIAN, HESSIAN};
    use mixq_loader::schema::Schema;

    /// Statistics for a 1-layer model of 2 experts: shared Hessians at every site, each expert's
    /// own at the routed sites, expert 1 reached by too few tokens.
    fn with_hessians(c: &mixq_loader::GptOssConfig) -> CalibrationUse {
        let mut stats = Calibration {
            model: ModelFingerprint { config_sha256: String::new(), weights_sha256: String::new() },
            model_label: String::new(),
            text_sha256: String::new(),
            tokens: 100,
            ctx: 8,
            tensors: Default::default(),
            hessians: Default::default(),
            file: None,
        };
        let identity = |n: usize, scale: f32| -> Vec<f32> { (0..n).flat_map(|i| (i..n).map(move |j| if i == j { scale } else { 0.0 })).collect() };
        for site in InputSite::all(c) {
            let n = site.width(c);
            stats.hessians.insert(format!("{}.{HESSIAN}", site.name()), HessianEntry::Loaded(StatTensor { shape: vec![packed_len(n)], data: identity(n, 1.0) }));
            if site.is_routed() {
                let data = [identity(n, 2.0), identity(n, 3.0)].concat();
                stats.hessians.insert(format!("{}.{EXPERT_HESSIAN}", site.name()), HessianEntry::Loaded(StatTensor { shape: vec![2, packed_len(n)], data }));
            }
        }
        stats.tensors.insert("model.layers.0.mlp.experts.token_count".into(), StatTensor { shape: vec![2], data: vec![500.0, 3.0] });
        CalibrationUse { path: "s".into(), file_sha256: String::new(), stats }
    }

    #[test]
    fn hessians_follow_the_sites_and_down_never_shares() {
        let c = mixq_loader::GptOssConfig::from_json_str(
            r#"{"model_type":"gpt_oss","num_hidden_layers":1,"hidden_size":64,"intermediate_size":32,
            "num_local_experts":2,"num_experts_per_tok":1,"num_attention_heads":2,"num_key_value_heads":1,
            "head_dim":32,"vocab_size":100,"sliding_window":8}"#,
            Path::new("c.json"),
        )
        .unwrap();
        let use_ = with_hessians(&c);
        let schema = Schema::new(&c);
        let param = |name: &str| schema.param(name).unwrap().clone();
        // A dense layer: its site's one matrix for every row.
        let q = use_.hessians(&param("model.layers.0.self_attn.q_proj.weight")).unwrap().unwrap();
        assert_eq!((q.matrix_of_row(0), q.run_end(0, 64), q.per_expert), (Some(0), 64, false));
        // Gate: expert 0 (500 tokens) its own, expert 1 (3 tokens) the shared one.
        let gate = use_.hessians(&param("model.layers.0.mlp.experts.gate_proj.weight")).unwrap().unwrap();
        assert!(gate.per_expert);
        let (own, shared) = (gate.matrix_of_row(0).unwrap(), gate.matrix_of_row(32).unwrap());
        assert_ne!(own, shared);
        assert_eq!(gate.run_end(0, 64), 32, "expert 0's rows are one run");
        let ratio = gate.factor(own).unwrap().importance()[0] / gate.factor(shared).unwrap().importance()[0];
        // Identity Hessians, twice as large for expert 0, damped by n / rows: 64/500 of its own
        // (500 routed tokens), 64/100 of the shared one (100 tokens).
        let expected = (2.0 * (1.0 + 64.0 / 500.0)) / (1.0 * (1.0 + 64.0 / 100.0));
        assert!((ratio - expected).abs() < 1e-5, "importance ratio {ratio}, expected {expected}");
        // Down: expert 0 its own, expert 1 none (the shared sum is never used for down).
        let down = use_.hessians(&param("model.layers.0.mlp.experts.down_proj.weight")).unwrap().unwrap();
        assert!(down.matrix_of_row(0).is_some() && down.matrix_of_row(64).is_none());
        // The embedding is a lookup: no Hessian.
        assert!(use_.hessians(&param("model.embed_tokens.weight")).unwrap().is_none());
    }

    #[test]
    fn unreached_experts_fall_back_and_floors_apply() {
        let means = [4.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let imp = Importance::from_means(&means, 4, 3, &[true, false]);
        let r0 = imp.row(0).unwrap();
        assert_eq!(r0[0], 4.0 + 0.05);
        assert_eq!(r0[1], 0.05);
        assert_eq!(imp.row(2).unwrap(), r0);
        assert!(imp.row(3).is_none() && imp.row(5).is_none());
    }
}

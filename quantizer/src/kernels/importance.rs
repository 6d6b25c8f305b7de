//! Per-column importance of a weight's rows, from calibration statistics: the mean of x² at the
//! layer's input (per expert for expert projections), floored so that no column is free.

use std::path::{Path, PathBuf};

use mixq_loader::{Calibration, Checkpoint, ModelFingerprint};

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

#[cfg(test)]
mod tests {
    use super::*;

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

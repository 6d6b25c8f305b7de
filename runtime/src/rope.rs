//! Rotary position embedding with YaRN scaling, as the reference implementations compute it.

use mixq_loader::RopeScaling;

/// Precomputed inverse frequencies and the YaRN attention scale.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Inverse frequency of each rotated pair (`head_dim / 2` of them).
    pub inv_freq: Vec<f32>,
    /// Factor applied to q and k before rotation (YaRN's mscale, 1 without scaling).
    pub mscale: f32,
}

fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

impl Rope {
    /// Frequencies for `dims` rotated dimensions with base `theta` and optional YaRN scaling.
    ///
    /// The YaRN correction range is floored/ceiled only when `truncate` is true (mlx-lm 0.32
    /// always truncates; the reference implementation honours `truncate: false`).
    pub fn new(dims: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        let half = dims / 2;
        // base^(2i/dims) in f32, as mlx computes `base ** (arange(0, dims, 2) / dims)`.
        let freq_extra: Vec<f32> = (0..half).map(|i| (theta as f32).powf((2 * i) as f32 / dims as f32)).collect();
        let Some(s) = scaling.filter(|s| s.rope_type == "yarn") else {
            return Rope { inv_freq: freq_extra.iter().map(|f| 1.0 / f).collect(), mscale: 1.0 };
        };
        let correction_dim = |rotations: f64| {
            dims as f64 * (s.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction_dim(s.beta_fast), correction_dim(s.beta_slow));
        if s.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(dims as f64 - 1.0);
        let high = if low == high { high + 0.001 } else { high };
        let factor = s.factor as f32;
        let inv_freq = freq_extra
            .iter()
            .enumerate()
            .map(|(i, &extra)| {
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolate = 1.0 - ramp;
                let inter = factor * extra;
                // mlx: freqs = inter*extra / (inter*mask + extra*(1-mask)); we keep 1/freqs.
                (inter * extrapolate + extra * (1.0 - extrapolate)) / (inter * extra)
            })
            .collect();
        Rope { inv_freq, mscale: (yarn_mscale(s.factor, 1.0) / yarn_mscale(s.factor, 0.0)) as f32 }
    }

    /// Rotates one head vector in place at position `pos` (non-traditional: pairs `i`, `i + d/2`),
    /// after scaling it by mscale.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        let (a, b) = x.split_at_mut(half);
        for ((x1, x2), &f) in a.iter_mut().zip(b.iter_mut()).zip(&self.inv_freq) {
            let t = pos as f32 * f;
            let (sin, cos) = t.sin_cos();
            let (u, v) = (*x1 * self.mscale, *x2 * self.mscale);
            *x1 = u * cos - v * sin;
            *x2 = u * sin + v * cos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt_oss(truncate: bool) -> RopeScaling {
        RopeScaling {
            rope_type: "yarn".into(),
            factor: 32.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            original_max_position_embeddings: 4096,
            truncate,
        }
    }

    /// The published YaRN formula, written out independently in f64.
    fn published(dims: usize, base: f64, s: &RopeScaling) -> Vec<f64> {
        let find = |r: f64| (dims as f64 * (4096.0 / (r * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
        let (mut lo, mut hi) = (find(s.beta_fast), find(s.beta_slow));
        if s.truncate {
            lo = lo.floor();
            hi = hi.ceil();
        }
        let (lo, hi) = (lo.max(0.0), hi.min(dims as f64 - 1.0));
        (0..dims / 2)
            .map(|i| {
                let pos_freq = base.powf(2.0 * i as f64 / dims as f64);
                let extra = 1.0 / pos_freq;
                let inter = 1.0 / (s.factor * pos_freq);
                let w = 1.0 - ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                inter * (1.0 - w) + extra * w
            })
            .collect()
    }

    #[test]
    fn yarn_matches_the_published_formula_with_and_without_truncation() {
        for truncate in [true, false] {
            let s = gpt_oss(truncate);
            let r = Rope::new(64, 150000.0, Some(&s));
            for (got, want) in r.inv_freq.iter().zip(published(64, 150000.0, &s)) {
                assert!(((*got as f64) - want).abs() <= want * 1e-5, "truncate {truncate}: {got} vs {want}");
            }
            assert!((r.mscale - (0.1 * 32f32.ln() + 1.0)).abs() < 1e-6);
        }
        let t = Rope::new(64, 150000.0, Some(&gpt_oss(true)));
        let n = Rope::new(64, 150000.0, Some(&gpt_oss(false)));
        assert!(t.inv_freq.iter().zip(&n.inv_freq).any(|(a, b)| (a - b).abs() > a * 1e-3), "truncation changes frequencies");
    }

    #[test]
    fn position_zero_only_scales() {
        let r = Rope::new(4, 10000.0, None);
        let mut x = [1.0, 2.0, 3.0, 4.0];
        r.apply(&mut x, 0);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
    }
}

//! Summary statistics of a scored evaluation: perplexity with its uncertainty, KL quantiles,
//! top-1 agreement, the perplexity ratio and the change in the correct token's probability.

use serde_json::{json, Value};

use crate::eval::TokenStats;

/// Figures comparing a model with its reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Reference perplexity.
    pub ref_ppl: f64,
    /// Its standard error.
    pub ref_ppl_se: f64,
    /// PPL(model) / PPL(reference).
    pub ppl_ratio: f64,
    /// Standard error of the ratio (from the per-token log-likelihood differences).
    pub ppl_ratio_se: f64,
    /// Mean KL(reference || model).
    pub kl_mean: f64,
    /// Standard error of the mean KL.
    pub kl_se: f64,
    /// Median KL.
    pub kl_median: f64,
    /// 90th percentile.
    pub kl_p90: f64,
    /// 99th percentile.
    pub kl_p99: f64,
    /// 99.9th percentile.
    pub kl_p999: f64,
    /// Largest KL.
    pub kl_max: f64,
    /// Fraction of tokens whose top token is the same.
    pub top1: f64,
    /// Mean of p_model(target) - p_ref(target).
    pub dp_mean: f64,
    /// Root mean square of it.
    pub dp_rms: f64,
    /// `exact` (full reference logits) or `top-k` (saved reference).
    pub kl_method: &'static str,
}

/// A model's figures on a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Scored tokens.
    pub tokens: usize,
    /// Perplexity.
    pub ppl: f64,
    /// Its standard error.
    pub ppl_se: f64,
    /// Mean negative log-likelihood (nats).
    pub nll_mean: f64,
    /// Against the reference, when there is one.
    pub comparison: Option<Comparison>,
}

fn mean_se(x: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = x.clone().count().max(1) as f64;
    let mean = x.clone().sum::<f64>() / n;
    let var = x.map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Summary {
    /// Summarises per-token figures; `method` names how KL was computed when there is a reference.
    pub fn new(tokens: &[TokenStats], method: Option<&'static str>) -> Self {
        let (nll_mean, nll_se) = mean_se(tokens.iter().map(|t| t.nll));
        let ppl = nll_mean.exp();
        let comparison = method.map(|kl_method| {
            let (ref_mean, ref_se) = mean_se(tokens.iter().map(|t| t.ref_nll));
            let (diff, diff_se) = mean_se(tokens.iter().map(|t| t.nll - t.ref_nll));
            let (kl_mean, kl_se) = mean_se(tokens.iter().map(|t| t.kl));
            let mut kl: Vec<f64> = tokens.iter().map(|t| t.kl).collect();
            kl.sort_by(f64::total_cmp);
            let n = tokens.len().max(1) as f64;
            let (dp_mean, _) = mean_se(tokens.iter().map(|t| t.dp));
            Comparison {
                ref_ppl: ref_mean.exp(),
                ref_ppl_se: ref_mean.exp() * ref_se,
                ppl_ratio: diff.exp(),
                ppl_ratio_se: diff.exp() * diff_se,
                kl_mean,
                kl_se,
                kl_median: quantile(&kl, 0.5),
                kl_p90: quantile(&kl, 0.9),
                kl_p99: quantile(&kl, 0.99),
                kl_p999: quantile(&kl, 0.999),
                kl_max: kl.last().copied().unwrap_or(0.0),
                top1: tokens.iter().filter(|t| t.same_top).count() as f64 / n,
                dp_mean,
                dp_rms: (tokens.iter().map(|t| t.dp * t.dp).sum::<f64>() / n).sqrt(),
                kl_method,
            }
        });
        Summary { tokens: tokens.len(), ppl, ppl_se: ppl * nll_se, nll_mean, comparison }
    }

    /// The figures as JSON.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"tokens": self.tokens, "ppl": self.ppl, "ppl_se": self.ppl_se, "nll_mean": self.nll_mean});
        if let Some(c) = &self.comparison {
            v["reference"] = json!({
                "ppl": c.ref_ppl, "ppl_se": c.ref_ppl_se, "ppl_ratio": c.ppl_ratio, "ppl_ratio_se": c.ppl_ratio_se,
                "kl_mean": c.kl_mean, "kl_se": c.kl_se, "kl_median": c.kl_median, "kl_p90": c.kl_p90,
                "kl_p99": c.kl_p99, "kl_p999": c.kl_p999, "kl_max": c.kl_max, "top1": c.top1,
                "dp_mean": c.dp_mean, "dp_rms": c.dp_rms, "kl_method": c.kl_method,
            });
        }
        v
    }

    /// Human-readable lines.
    pub fn to_text(&self) -> String {
        let mut s = format!("scored tokens        {}\nperplexity           {:.4} ± {:.4}\n", self.tokens, self.ppl, self.ppl_se);
        if let Some(c) = &self.comparison {
            s.push_str(&format!(
                "reference perplexity {:.4} ± {:.4}\nPPL ratio            {:.5} ± {:.5}\nKL mean              {:.6} ± {:.6} ({})\nKL median            {:.6}\nKL p90 / p99 / p99.9 {:.6} / {:.6} / {:.6}\nKL max               {:.6}\nsame top token       {:.3}%\nΔp(correct) mean     {:+.5}\nΔp(correct) RMS      {:.5}\n",
                c.ref_ppl, c.ref_ppl_se, c.ppl_ratio, c.ppl_ratio_se, c.kl_mean, c.kl_se, c.kl_method, c.kl_median,
                c.kl_p90, c.kl_p99, c.kl_p999, c.kl_max, 100.0 * c.top1, c.dp_mean, c.dp_rms
            ));
        }
        s
    }
}

/// Publish gates; each `None` is not checked.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gates {
    /// Largest acceptable mean KL.
    pub max_kl: Option<f64>,
    /// Largest acceptable PPL ratio.
    pub max_ppl_ratio: Option<f64>,
    /// Smallest acceptable top-1 agreement (fraction, 0..1).
    pub min_top1: Option<f64>,
}

impl Gates {
    /// Whether any gate is set.
    pub fn any(&self) -> bool {
        self.max_kl.is_some() || self.max_ppl_ratio.is_some() || self.min_top1.is_some()
    }

    /// Checks each gate's value is in its range, naming the flag and what it expects.
    pub fn check_ranges(&self) -> Result<(), String> {
        let bad = |flag: &str, x: f64, expected: &str| Err(format!("{flag} {x}: expected {expected}"));
        if let Some(x) = self.max_kl.filter(|x| !(x.is_finite() && *x >= 0.0)) {
            return bad("--max-kl", x, "a mean KL of 0 or more (in nats, e.g. 0.02)");
        }
        if let Some(x) = self.max_ppl_ratio.filter(|x| !(x.is_finite() && *x > 0.0)) {
            return bad("--max-ppl-ratio", x, "a positive ratio (e.g. 1.05)");
        }
        if let Some(x) = self.min_top1.filter(|x| !(0.0..=1.0).contains(x)) {
            return bad("--min-top1", x, "a fraction from 0 to 1 (0.9 = 90%)");
        }
        Ok(())
    }

    /// Every set gate against the figures: (passed, the gate with its limit and the measured value).
    pub fn outcomes(&self, s: &Summary) -> Vec<(bool, String)> {
        let Some(c) = &s.comparison else {
            return if self.any() { vec![(false, "gates need a reference (--reference or --reference-logits)".to_string())] } else { vec![] };
        };
        let mut out = Vec::new();
        if let Some(x) = self.max_kl {
            out.push((c.kl_mean <= x, format!("--max-kl {x}: mean KL is {:.6}", c.kl_mean)));
        }
        if let Some(x) = self.max_ppl_ratio {
            out.push((c.ppl_ratio <= x, format!("--max-ppl-ratio {x}: PPL ratio is {:.5}", c.ppl_ratio)));
        }
        if let Some(x) = self.min_top1 {
            out.push((c.top1 >= x, format!("--min-top1 {x}: top-1 agreement is {:.5}", c.top1)));
        }
        out
    }

    /// Failed gates, each naming the gate, the limit and the measured value.
    pub fn check(&self, s: &Summary) -> Vec<String> {
        self.outcomes(s).into_iter().filter(|(ok, _)| !ok).map(|(_, m)| m).collect()
    }

    /// Passed gates, worded as [`Gates::check`] words failures.
    pub fn passed(&self, s: &Summary) -> Vec<String> {
        self.outcomes(s).into_iter().filter(|(ok, _)| *ok).map(|(_, m)| m).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_and_gates() {
        let t = |nll: f64, kl: f64, same: bool| TokenStats { nll, ref_nll: 1.0, kl, same_top: same, dp: 0.0 };
        let s = Summary::new(&[t(1.0, 0.0, true), t(1.0, 0.2, false)], Some("exact"));
        assert!((s.ppl - 1f64.exp()).abs() < 1e-12);
        let c = s.comparison.as_ref().unwrap();
        assert!((c.kl_mean - 0.1).abs() < 1e-12 && (c.top1 - 0.5).abs() < 1e-12);
        assert!((c.ppl_ratio - 1.0).abs() < 1e-12);
        let g = Gates { max_kl: Some(0.05), max_ppl_ratio: Some(1.1), min_top1: Some(0.9) };
        let failed = g.check(&s);
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(failed[0].contains("--max-kl 0.05: mean KL is 0.100000"));
        assert_eq!(g.passed(&s), ["--max-ppl-ratio 1.1: PPL ratio is 1.00000"]);
        let e = Gates { min_top1: Some(92.0), ..Gates::default() }.check_ranges().unwrap_err();
        assert_eq!(e, "--min-top1 92: expected a fraction from 0 to 1 (0.9 = 90%)");
        assert!(Gates { max_kl: Some(-1.0), ..Gates::default() }.check_ranges().is_err());
        assert!(Gates { max_ppl_ratio: Some(f64::NAN), ..Gates::default() }.check_ranges().is_err());
        assert!(g.check_ranges().is_ok());
    }
}

//! Choosing the next token: greedy, or temperature with top-k and top-p, from a seeded RNG.

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Temperature; 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this (1: all).
    pub top_p: f32,
    /// Keep this many most likely tokens (0: all).
    pub top_k: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

/// A deterministic sampler: the same seed and logits give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    state: u64,
}

impl Sampler {
    /// A sampler seeded from its config.
    pub fn new(cfg: SamplerConfig) -> Self {
        Sampler { cfg, state: cfg.seed ^ 0x853c_49e6_748f_ea9b }
    }

    fn uniform(&mut self) -> f64 {
        // SplitMix64.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks the next token from logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        if self.cfg.top_k > 0 {
            order.truncate(self.cfg.top_k);
        }
        let t = self.cfg.temperature as f64;
        let max = logits[order[0] as usize] as f64;
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i as usize] as f64 - max) / t).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.cfg.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut u = self.uniform();
        for (&i, p) in order.iter().zip(&probs) {
            if u < *p {
                return i;
            }
            u -= p;
        }
        *order.last().expect("at least one token is kept")
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let cfg = SamplerConfig { temperature: 0.8, top_p: 0.9, top_k: 5, seed: 42 };
        let a: Vec<u32> = { let mut s = Sampler::new(cfg); (0..20).map(|_| s.sample(&logits)).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(cfg); (0..20).map(|_| s.sample(&logits)).collect() };
        assert_eq!(a, b);
        let mut top5: Vec<u32> = (0..50).collect();
        top5.sort_by(|&x, &y| logits[y as usize].total_cmp(&logits[x as usize]));
        assert!(a.iter().all(|t| top5[..5].contains(t)));
        let c: Vec<u32> = { let mut s = Sampler::new(SamplerConfig { seed: 7, ..cfg }); (0..20).map(|_| s.sample(&logits)).collect() };
        assert_ne!(a, c);
    }

    #[test]
    fn top_p_keeps_only_the_head() {
        let mut s = Sampler::new(SamplerConfig { temperature: 1.0, top_p: 0.5, top_k: 0, seed: 1 });
        let logits = [10.0, 0.0, 0.0, 0.0];
        assert!((0..100).all(|_| s.sample(&logits) == 0));
    }
}

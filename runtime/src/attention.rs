//! Attention of new queries over a layer's KV cache: grouped-query heads, a sink logit per head
//! in the softmax denominator, full causal or sliding-window layers, all in f32.

use rayon::prelude::*;

use crate::cache::LayerCache;
use crate::matrix::dot;

/// What one layer's attention looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    /// Floats per head.
    pub head_dim: usize,
    /// On a sliding-window layer, the keys a query sees (itself and the `window - 1` before it);
    /// `None` on a full causal layer.
    pub window: Option<usize>,
}

/// Attention of the `n` queries `queries` (`[n, heads * head_dim]`, rotated) at positions
/// `first..first + n`, over the keys and values `cache` holds for every position up to each
/// query's own, with `sinks[head]` as an extra logit in each head's softmax; `[n, heads * head_dim]`.
pub fn attend(shape: AttentionShape, queries: &[f32], cache: &LayerCache, first: usize, sinks: &[f32]) -> Vec<f32> {
    let AttentionShape { heads: nh, kv_heads: nkv, head_dim: hd, window } = shape;
    let scale = 1.0 / (hd as f32).sqrt();
    let group = nh / nkv;
    let mut out = vec![0f32; queries.len()];
    out.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
        let (t, head) = (idx / nh, idx % nh);
        let pos = first + t;
        let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let qv = &queries[(t * nh + head) * hd..(t * nh + head + 1) * hd];
        let kvh = head / group;
        scores.clear();
        let mut max = sinks[head];
        for p in lo..=pos {
            let key = &cache.at(p).0[kvh * hd..(kvh + 1) * hd];
            let s = dot(qv, key) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut denom = (sinks[head] - max).exp();
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            denom += *s;
        }
        o.fill(0.0);
        for (p, &w) in (lo..=pos).zip(scores.iter()) {
            let val = &cache.at(p).1[kvh * hd..(kvh + 1) * hd];
            let w = w / denom;
            for (a, b) in o.iter_mut().zip(val) {
                *a += w * b;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) (splitmix64).
    struct Numbers(u64);

    impl Numbers {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        fn vec(&mut self, len: usize, amplitude: f32) -> Vec<f32> {
            (0..len).map(|_| amplitude * self.next()).collect()
        }
    }

    /// Attention written out in f64 from its definition: for query head `h` at position `pos`,
    /// `softmax([sink_h, q·k_p / sqrt(d) for p in lo..=pos])` with the sink's weight dropped,
    /// times the values.
    fn reference(shape: AttentionShape, queries: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], first: usize, sinks: &[f32]) -> Vec<f64> {
        let AttentionShape { heads, kv_heads, head_dim, window } = shape;
        let n = queries.len() / (heads * head_dim);
        let mut out = Vec::with_capacity(queries.len());
        for t in 0..n {
            let pos = first + t;
            let lo = match window {
                Some(w) if pos + 1 > w => pos + 1 - w,
                _ => 0,
            };
            for h in 0..heads {
                let kv = h * kv_heads / heads;
                let q = &queries[(t * heads + h) * head_dim..][..head_dim];
                let logits: Vec<f64> = (lo..=pos)
                    .map(|p| {
                        let k = &keys[p][kv * head_dim..][..head_dim];
                        q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (head_dim as f64).sqrt()
                    })
                    .collect();
                let max = logits.iter().fold(sinks[h] as f64, |m, &l| m.max(l));
                let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let denom = (sinks[h] as f64 - max).exp() + weights.iter().sum::<f64>();
                for d in 0..head_dim {
                    let v: f64 = (lo..=pos).zip(&weights).map(|(p, w)| w * values[p][kv * head_dim + d] as f64).sum();
                    out.push(v / denom);
                }
            }
        }
        out
    }

    /// Runs `n` new tokens after `first` cached ones through [`attend`] and the reference; the
    /// largest absolute difference.
    fn worst_error(shape: AttentionShape, first: usize, n: usize, seed: u64) -> f64 {
        let mut rng = Numbers(seed);
        let width = shape.kv_heads * shape.head_dim;
        let total = first + n;
        // Sizes like rotated gpt-oss activations: logits of a few units, so both peaked and flat
        // softmaxes occur; sinks from well below to well above them.
        let keys: Vec<Vec<f32>> = (0..total).map(|_| rng.vec(width, 2.0)).collect();
        let values: Vec<Vec<f32>> = (0..total).map(|_| rng.vec(width, 3.0)).collect();
        let queries = rng.vec(n * shape.heads * shape.head_dim, 2.0);
        let sinks: Vec<f32> = rng.vec(shape.heads, 4.0).iter().map(|s| s + 1.0).collect();
        // A sliding layer keeps a ring as the model sizes it: the window plus one chunk.
        let mut cache = LayerCache::new(width, shape.window.map(|w| w + n));
        for p in 0..first {
            cache.append(p, &keys[p], &values[p]);
        }
        cache.append(first, &keys[first..].concat(), &values[first..].concat());
        let ours = attend(shape, &queries, &cache, first, &sinks);
        let expected = reference(shape, &queries, &keys, &values, first, &sinks);
        assert_eq!(ours.len(), expected.len());
        ours.iter().zip(&expected).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn attention_matches_an_f64_reference() {
        let mut seed = 1;
        for (heads, kv_heads, head_dim) in [(4, 1, 64), (8, 2, 64), (16, 4, 64), (6, 3, 40), (2, 2, 8), (3, 1, 12)] {
            for window in [None, Some(1), Some(5), Some(16), Some(100), Some(4096)] {
                for first in [0, 3, 37, 130] {
                    for n in [1, 3, 17, 70] {
                        let shape = AttentionShape { heads, kv_heads, head_dim, window };
                        seed += 1;
                        let err = worst_error(shape, first, n, seed);
                        assert!(err < 1e-5, "{shape:?}, {first} cached, {n} new: off by {err}");
                    }
                }
            }
        }
    }
}

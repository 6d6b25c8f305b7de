//! Attention of new queries over a layer's KV cache: grouped-query heads, a sink logit per head
//! in the softmax denominator, full causal or sliding-window layers, all in f32.
//!
//! Blocked over keys: the queries are cut into tiles (every query head of one kv head, for a few
//! consecutive tokens), and each tile takes the keys it sees in blocks of [`KEY_BLOCK`]
//! positions, packed once per tile and used by all its queries. The softmax is computed online
//! (as flash attention does): per query a running maximum and denominator, the accumulated output
//! rescaled whenever the maximum grows; the sink's logit is the initial maximum and its
//! exponential joins the denominator at the end, so each weight is the plain softmax's
//! `exp(s - max) / (exp(sink - max) + sum exp(s - max))`, its sums taken block by block.
//!
//! Key blocks start at multiples of [`KEY_BLOCK`] (absolute positions), and every sum for one
//! query runs in a fixed order over its own blocks, so a query's output does not depend on which
//! tile, chunk or token count it was computed with: decoding a token gives the same bits as
//! prefilling it.

use rayon::prelude::*;

use crate::cache::LayerCache;
use crate::matrix::Simd;

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

/// Positions per key block: a tile packs this many keys and values at a time.
const KEY_BLOCK: usize = 32;
/// Query rows the score and value kernels compute together (their register block height).
const ROW_BLOCK: usize = 3;
/// Head dimensions the value kernel accumulates together (its register block width); a head's
/// vectors are zero-padded to a multiple of it.
const DIM_BLOCK: usize = 32;
/// Query rows (query heads of one kv head, times tokens) a tile aims for.
const TILE_ROWS: usize = 48;

/// Attention of the `n` queries `queries` (`[n, heads * head_dim]`, rotated) at positions
/// `first..first + n`, over the keys and values `cache` holds for every position up to each
/// query's own, with `sinks[head]` as an extra logit in each head's softmax; `[n, heads * head_dim]`.
pub fn attend(shape: AttentionShape, queries: &[f32], cache: &LayerCache, first: usize, sinks: &[f32]) -> Vec<f32> {
    attend_on(Simd::detect(), shape, queries, cache, first, sinks)
}

/// [`attend`] on the vector unit `simd`.
fn attend_on(simd: Simd, shape: AttentionShape, queries: &[f32], cache: &LayerCache, first: usize, sinks: &[f32]) -> Vec<f32> {
    let AttentionShape { heads, kv_heads, head_dim, .. } = shape;
    let n = queries.len() / (heads * head_dim);
    let group = heads / kv_heads;
    let tokens_per_tile = (TILE_ROWS / group).max(1);
    let token_blocks = n.div_ceil(tokens_per_tile);
    let job = Job { shape, group, queries, cache, first, sinks, simd };
    // Tiles of one kv head run one after another, so its keys and values stay in cache.
    let tiles: Vec<Vec<f32>> = (0..token_blocks * kv_heads)
        .into_par_iter()
        .map_init(Scratch::default, |scratch, i| {
            let (kv_head, block) = (i / token_blocks, i % token_blocks);
            let t0 = block * tokens_per_tile;
            job.tile(scratch, Tile { kv_head, t0, tokens: tokens_per_tile.min(n - t0) })
        })
        .collect();
    // Each tile's output is, per token, the contiguous run of its kv head's query heads.
    let mut out = vec![0f32; queries.len()];
    let run = group * head_dim;
    for (i, tile) in tiles.iter().enumerate() {
        let (kv_head, block) = (i / token_blocks, i % token_blocks);
        for (t, rows) in tile.chunks_exact(run).enumerate() {
            let at = (block * tokens_per_tile + t) * heads * head_dim + kv_head * run;
            out[at..at + run].copy_from_slice(rows);
        }
    }
    out
}

/// One call's inputs.
struct Job<'a> {
    shape: AttentionShape,
    /// Query heads per kv head.
    group: usize,
    queries: &'a [f32],
    cache: &'a LayerCache,
    first: usize,
    sinks: &'a [f32],
    simd: Simd,
}

/// The queries of one tile: every query head of `kv_head` for tokens `t0..t0 + tokens`.
#[derive(Debug, Clone, Copy)]
struct Tile {
    kv_head: usize,
    t0: usize,
    tokens: usize,
}

/// Per-thread buffers of a tile; rows are query `(token, head)` pairs, token-major, padded to a
/// multiple of [`ROW_BLOCK`] with zero rows.
#[derive(Default)]
struct Scratch {
    /// `[rows, padded head_dim]`.
    queries: Vec<f32>,
    /// Unnormalised outputs, `[rows, padded head_dim]`.
    out: Vec<f32>,
    /// The block's keys transposed: `[padded head_dim, KEY_BLOCK]`.
    keys: Vec<f32>,
    /// The block's values: `[KEY_BLOCK, padded head_dim]`.
    values: Vec<f32>,
    /// Scores, then weights, of the block: `[rows, KEY_BLOCK]`.
    weights: Vec<f32>,
    /// Running maximum logit per row (the sink's to start).
    max: Vec<f32>,
    /// Running sum of `exp(score - max)` per row, the sink's term left out.
    sum: Vec<f32>,
}

impl Job<'_> {
    /// The first position the query at `pos` sees.
    fn lowest_key(&self, pos: usize) -> usize {
        self.shape.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// The tile's output: `[tokens, group * head_dim]`, normalised.
    fn tile(&self, scratch: &mut Scratch, tile: Tile) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if self.simd.has_avx2() {
            // SAFETY: `Simd::detect` found AVX2 and FMA on this CPU.
            return unsafe { self.tile_avx2(scratch, tile) };
        }
        // Read only on x86-64.
        let _ = self.simd;
        self.tile_with::<Portable>(scratch, tile)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2(&self, scratch: &mut Scratch, tile: Tile) -> Vec<f32> {
        self.tile_with::<x86::Avx2>(scratch, tile)
    }

    /// The body of [`Job::tile`] on the vector type `V`.
    #[inline(always)]
    fn tile_with<V: Vector>(&self, s: &mut Scratch, tile: Tile) -> Vec<f32> {
        let AttentionShape { heads, head_dim: hd, .. } = self.shape;
        let group = self.group;
        let hdp = hd.next_multiple_of(DIM_BLOCK);
        let rows = tile.tokens * group;
        let padded_rows = rows.next_multiple_of(ROW_BLOCK);
        let scale = 1.0 / (hd as f32).sqrt();
        let first_head = tile.kv_head * group;

        s.queries.clear();
        s.queries.resize(padded_rows * hdp, 0.0);
        for (r, q) in s.queries.chunks_exact_mut(hdp).take(rows).enumerate() {
            let (t, h) = (tile.t0 + r / group, first_head + r % group);
            q[..hd].copy_from_slice(&self.queries[(t * heads + h) * hd..][..hd]);
        }
        s.out.clear();
        s.out.resize(padded_rows * hdp, 0.0);
        s.max.clear();
        s.max.extend((0..padded_rows).map(|r| if r < rows { self.sinks[first_head + r % group] } else { 0.0 }));
        s.sum.clear();
        s.sum.resize(padded_rows, 0.0);
        s.keys.resize(hdp * KEY_BLOCK, 0.0);
        s.values.resize(KEY_BLOCK * hdp, 0.0);
        s.weights.resize(padded_rows * KEY_BLOCK, 0.0);

        // The keys row `r` sees: its token's window, up to its own position.
        let pos_of = |r: usize| self.first + tile.t0 + r.min(rows - 1) / group;
        let seen = |r: usize| (self.lowest_key(pos_of(r)), pos_of(r));
        let (lo, hi) = (seen(0).0, seen(rows - 1).1);
        let kv = tile.kv_head * hd..(tile.kv_head + 1) * hd;

        for start in (lo - lo % KEY_BLOCK..=hi).step_by(KEY_BLOCK) {
            // Pack the block, zeros where the tile sees no key (the ring may hold other data there).
            for j0 in (0..KEY_BLOCK).step_by(LANES) {
                let rows: [Option<(&[f32], &[f32])>; LANES] = std::array::from_fn(|i| {
                    let p = start + j0 + i;
                    (lo..=hi).contains(&p).then(|| {
                        let (key, value) = self.cache.at(p);
                        (&key[kv.clone()], &value[kv.clone()])
                    })
                });
                for (i, row) in rows.iter().enumerate() {
                    let values = &mut s.values[(j0 + i) * hdp..(j0 + i) * hdp + hd];
                    match row {
                        Some((_, value)) => values.copy_from_slice(value),
                        None => values.fill(0.0),
                    }
                }
                let whole = hd - hd % LANES;
                for d0 in (0..whole).step_by(LANES) {
                    let block: [V; LANES] = std::array::from_fn(|i| rows[i].map_or(V::splat(0.0), |(key, _)| V::load(&key[d0..])));
                    for (l, column) in V::transpose(block).into_iter().enumerate() {
                        column.store(&mut s.keys[(d0 + l) * KEY_BLOCK + j0..]);
                    }
                }
                for d in whole..hd {
                    for (i, row) in rows.iter().enumerate() {
                        s.keys[d * KEY_BLOCK + j0 + i] = row.map_or(0.0, |(key, _)| key[d]);
                    }
                }
            }
            let block = start..start + KEY_BLOCK;
            let overlaps = |r: usize| {
                let (a, b) = seen(r);
                a < block.end && b >= block.start
            };
            for r0 in (0..padded_rows).step_by(ROW_BLOCK) {
                if !(r0..r0 + ROW_BLOCK).any(|r| r < rows && overlaps(r)) {
                    continue;
                }
                let weights = &mut s.weights[r0 * KEY_BLOCK..(r0 + ROW_BLOCK) * KEY_BLOCK];
                scores::<V>(&s.queries[r0 * hdp..(r0 + ROW_BLOCK) * hdp], &s.keys, hdp, scale, weights);
                for (i, w) in weights.chunks_exact_mut(KEY_BLOCK).enumerate() {
                    let r = r0 + i;
                    if r >= rows || !overlaps(r) {
                        w.fill(0.0);
                        continue;
                    }
                    let (a, b) = seen(r);
                    let valid = a.max(start) - start..=b.min(start + KEY_BLOCK - 1) - start;
                    let out = &mut s.out[r * hdp..(r + 1) * hdp];
                    s.sum[r] = online_softmax::<V>(w, valid, &mut s.max[r], s.sum[r], out);
                }
                add_weighted_values::<V>(weights, &s.values, hdp, &mut s.out[r0 * hdp..(r0 + ROW_BLOCK) * hdp]);
            }
        }

        let mut result = vec![0f32; rows * hd];
        for (r, o) in result.chunks_exact_mut(hd).enumerate() {
            let sink = self.sinks[first_head + r % group];
            let denom = s.sum[r] + exp_nonpositive(V::splat(sink - s.max[r])).first();
            for (o, &a) in o.iter_mut().zip(&s.out[r * hdp..r * hdp + hd]) {
                *o = a / denom;
            }
        }
        result
    }
}

/// `weights[i][j] = scale * (queries[i] · keys[.., j])` for [`ROW_BLOCK`] rows of `queries`
/// (`[ROW_BLOCK, hdp]`) and the transposed key block `keys` (`[hdp, KEY_BLOCK]`): each score a
/// fused multiply-add chain over the head's dimensions in order.
#[inline(always)]
fn scores<V: Vector>(queries: &[f32], keys: &[f32], hdp: usize, scale: f32, weights: &mut [f32]) {
    let mut acc = [[V::splat(0.0); KEY_BLOCK / LANES]; ROW_BLOCK];
    for (d, key) in keys.chunks_exact(KEY_BLOCK).enumerate().take(hdp) {
        let q: [V; ROW_BLOCK] = std::array::from_fn(|i| V::splat(queries[i * hdp + d]));
        for v in 0..KEY_BLOCK / LANES {
            let k = V::load(&key[v * LANES..]);
            for (acc_i, q) in acc.iter_mut().zip(&q) {
                acc_i[v] = q.mul_add(k, acc_i[v]);
            }
        }
    }
    let scale = V::splat(scale);
    for (w, acc_i) in weights.chunks_exact_mut(KEY_BLOCK).zip(&acc) {
        for (v, a) in acc_i.iter().enumerate() {
            a.mul(scale).store(&mut w[v * LANES..]);
        }
    }
}

/// One row's step of the online softmax over a key block: the scores in `w` at lanes `valid`
/// raise the running `max` (rescaling the accumulated `out` and the returned sum when it grows),
/// then become `exp(score - max)` (zero outside `valid`); returns `sum` plus their total, summed
/// lane by lane and the lanes reduced in a fixed order.
#[inline(always)]
fn online_softmax<V: Vector>(w: &mut [f32], valid: std::ops::RangeInclusive<usize>, max: &mut f32, sum: f32, out: &mut [f32]) -> f32 {
    let (a, b) = (*valid.start(), *valid.end());
    w[..a.min(KEY_BLOCK)].fill(f32::NEG_INFINITY);
    w[(b + 1).min(KEY_BLOCK)..].fill(f32::NEG_INFINITY);
    let block_max = w.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let mut sum = sum;
    if block_max > *max {
        let shrink = exp_nonpositive(V::splat(*max - block_max)).first();
        sum *= shrink;
        for o in out.iter_mut() {
            *o *= shrink;
        }
        *max = block_max;
    }
    let (max, mut lane_sum) = (V::splat(*max), V::splat(0.0));
    for chunk in w.chunks_exact_mut(LANES) {
        let e = exp_nonpositive(V::load(chunk).sub(max));
        e.store(chunk);
        lane_sum = lane_sum.add(e);
    }
    sum + lane_sum.sum()
}

/// `out[i] += sum_j weights[i][j] * values[j]` for [`ROW_BLOCK`] rows (`weights` is
/// `[ROW_BLOCK, KEY_BLOCK]`, `values` `[KEY_BLOCK, hdp]`, `out` `[ROW_BLOCK, hdp]`): per output a
/// fused multiply-add chain over the block's keys in order.
#[inline(always)]
fn add_weighted_values<V: Vector>(weights: &[f32], values: &[f32], hdp: usize, out: &mut [f32]) {
    for d0 in (0..hdp).step_by(DIM_BLOCK) {
        let mut acc: [[V; DIM_BLOCK / LANES]; ROW_BLOCK] =
            std::array::from_fn(|i| std::array::from_fn(|v| V::load(&out[i * hdp + d0 + v * LANES..])));
        for (j, value) in values.chunks_exact(hdp).enumerate().take(KEY_BLOCK) {
            let w: [V; ROW_BLOCK] = std::array::from_fn(|i| V::splat(weights[i * KEY_BLOCK + j]));
            for v in 0..DIM_BLOCK / LANES {
                let x = V::load(&value[d0 + v * LANES..]);
                for (acc_i, w) in acc.iter_mut().zip(&w) {
                    acc_i[v] = w.mul_add(x, acc_i[v]);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (v, a) in acc_i.iter().enumerate() {
                a.store(&mut out[i * hdp + d0 + v * LANES..]);
            }
        }
    }
}

/// Below this, `exp` is taken as zero (`exp(-87)` is near the smallest normal f32).
const EXP_CUTOFF: f32 = -87.0;

/// `e^x` per lane for `x <= 0` (Cephes' `expf`: `x = n ln 2 + r`, `|r| <= ln 2 / 2`, a degree-6
/// polynomial in `r` times `2^n`); within 2 ulp of the true value, zero below [`EXP_CUTOFF`] and
/// for `-inf`, NaN for NaN.
#[inline(always)]
fn exp_nonpositive<V: Vector>(x: V) -> V {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const POLYNOMIAL: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];
    let cutoff = V::splat(EXP_CUTOFF);
    let clamped = cutoff.max(x);
    let shifted = clamped.mul_add(V::splat(std::f32::consts::LOG2_E), V::splat(ROUND));
    let n = shifted.sub(V::splat(ROUND));
    let r = n.mul_add(V::splat(-LN2_LO), n.mul_add(V::splat(-LN2_HI), clamped));
    let mut p = V::splat(POLYNOMIAL[0]);
    for &c in &POLYNOMIAL[1..] {
        p = p.mul_add(r, V::splat(c));
    }
    let p = p.mul(r).mul_add(r, r).add(V::splat(1.0));
    p.mul(V::power_of_two(shifted)).zero_below(x, cutoff)
}

/// `1.5 * 2^23`: a float of magnitude below `2^22` plus this is that float rounded to an integer,
/// held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

/// Lanes of a [`Vector`].
const LANES: usize = 8;

/// Eight f32 lanes and the operations the kernels use; every implementation rounds alike (one
/// rounding per operation, `mul_add` fused), so results do not depend on the vector unit.
trait Vector: Copy {
    /// Every lane `x`.
    fn splat(x: f32) -> Self;
    /// The first [`LANES`] floats of `s`.
    fn load(s: &[f32]) -> Self;
    /// Writes the lanes to the first [`LANES`] floats of `s`.
    fn store(self, s: &mut [f32]);
    /// Lane 0.
    fn first(self) -> f32;
    /// `self + b`.
    fn add(self, b: Self) -> Self;
    /// `self - b`.
    fn sub(self, b: Self) -> Self;
    /// `self * b`.
    fn mul(self, b: Self) -> Self;
    /// `self * b + c`, rounded once.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// `if self > b { self } else { b }` (so `b` where either is NaN).
    fn max(self, b: Self) -> Self;
    /// `self`, with zero in the lanes where `x < threshold`.
    fn zero_below(self, x: Self, threshold: Self) -> Self;
    /// `2^n` for lanes holding `ROUND + n`, `-126 <= n <= 0`.
    fn power_of_two(self) -> Self;
    /// The lanes summed as [`reduce8`] sums them.
    fn sum(self) -> f32;
    /// The transpose of eight rows: lane `i` of result `l` is lane `l` of `rows[i]`.
    fn transpose(rows: [Self; LANES]) -> [Self; LANES];
}

/// The sum of eight lanes in a fixed order: `((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7))`.
#[inline(always)]
fn reduce8(l: &[f32; LANES]) -> f32 {
    let h = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Eight lanes in plain Rust.
#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Portable {
    #[inline(always)]
    fn zip(self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Portable(std::array::from_fn(|l| f(self.0[l], b.0[l])))
    }
}

impl Vector for Portable {
    #[inline(always)]
    fn splat(x: f32) -> Self {
        Portable([x; LANES])
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        Portable(std::array::from_fn(|l| s[l]))
    }
    #[inline(always)]
    fn store(self, s: &mut [f32]) {
        s[..LANES].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn first(self) -> f32 {
        self.0[0]
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        self.zip(b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        self.zip(b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        self.zip(b, |x, y| x * y)
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|l| self.0[l].mul_add(b.0[l], c.0[l])))
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        self.zip(b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn zero_below(self, x: Self, threshold: Self) -> Self {
        Portable(std::array::from_fn(|l| if x.0[l] < threshold.0[l] { 0.0 } else { self.0[l] }))
    }
    #[inline(always)]
    fn power_of_two(self) -> Self {
        Portable(self.0.map(|t| f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23)))
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        reduce8(&self.0)
    }
    #[inline(always)]
    fn transpose(rows: [Self; LANES]) -> [Self; LANES] {
        std::array::from_fn(|l| Portable(std::array::from_fn(|i| rows[i].0[l])))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Vector, LANES, ROUND};
    use std::arch::x86_64::*;

    /// Eight lanes in an AVX register; only used inside functions compiled with AVX2 and FMA,
    /// which are only called after `Simd::detect` found both.
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256);

    // SAFETY (every `unsafe` below): the intrinsics need AVX2 and FMA, which every caller has
    // (see `Avx2`); loads and stores are of slices sliced to `LANES` floats first.
    impl Vector for Avx2 {
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { Avx2(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(s: &[f32]) -> Self {
            let s = &s[..LANES];
            unsafe { Avx2(_mm256_loadu_ps(s.as_ptr())) }
        }
        #[inline(always)]
        fn store(self, s: &mut [f32]) {
            let s = &mut s[..LANES];
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn first(self) -> f32 {
            unsafe { _mm256_cvtss_f32(self.0) }
        }
        #[inline(always)]
        fn add(self, b: Self) -> Self {
            unsafe { Avx2(_mm256_add_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            unsafe { Avx2(_mm256_sub_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            unsafe { Avx2(_mm256_mul_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Avx2(_mm256_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            // maxps returns its second operand unless the first is greater.
            unsafe { Avx2(_mm256_max_ps(self.0, b.0)) }
        }
        #[inline(always)]
        fn zero_below(self, x: Self, threshold: Self) -> Self {
            unsafe { Avx2(_mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x.0, threshold.0), self.0)) }
        }
        #[inline(always)]
        fn power_of_two(self) -> Self {
            unsafe {
                let n = _mm256_sub_epi32(_mm256_castps_si256(self.0), _mm256_set1_epi32(ROUND.to_bits() as i32));
                Avx2(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127)))))
            }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            let mut lanes = [0f32; LANES];
            self.store(&mut lanes);
            super::reduce8(&lanes)
        }
        #[inline(always)]
        fn transpose(rows: [Self; LANES]) -> [Self; LANES] {
            let r = rows.map(|r| r.0);
            unsafe {
                // Pairs of rows interleaved, then quadruples, then the 128-bit halves swapped.
                let t = [
                    _mm256_unpacklo_ps(r[0], r[1]),
                    _mm256_unpackhi_ps(r[0], r[1]),
                    _mm256_unpacklo_ps(r[2], r[3]),
                    _mm256_unpackhi_ps(r[2], r[3]),
                    _mm256_unpacklo_ps(r[4], r[5]),
                    _mm256_unpackhi_ps(r[4], r[5]),
                    _mm256_unpacklo_ps(r[6], r[7]),
                    _mm256_unpackhi_ps(r[6], r[7]),
                ];
                let u = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xee>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xee>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xee>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xee>(t[5], t[7]),
                ];
                [
                    Avx2(_mm256_permute2f128_ps::<0x20>(u[0], u[4])),
                    Avx2(_mm256_permute2f128_ps::<0x20>(u[1], u[5])),
                    Avx2(_mm256_permute2f128_ps::<0x20>(u[2], u[6])),
                    Avx2(_mm256_permute2f128_ps::<0x20>(u[3], u[7])),
                    Avx2(_mm256_permute2f128_ps::<0x31>(u[0], u[4])),
                    Avx2(_mm256_permute2f128_ps::<0x31>(u[1], u[5])),
                    Avx2(_mm256_permute2f128_ps::<0x31>(u[2], u[6])),
                    Avx2(_mm256_permute2f128_ps::<0x31>(u[3], u[7])),
                ]
            }
        }
    }
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

    /// The inputs of one [`attend`] call: `n` new tokens after `first` cached ones.
    struct Case {
        shape: AttentionShape,
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
        queries: Vec<f32>,
        sinks: Vec<f32>,
    }

    impl Case {
        fn new(shape: AttentionShape, first: usize, n: usize, seed: u64) -> Case {
            let mut rng = Numbers(seed);
            let width = shape.kv_heads * shape.head_dim;
            // Sizes like rotated gpt-oss activations: logits of a few units, so both peaked and
            // flat softmaxes occur; sinks from well below to well above them.
            let keys = (0..first + n).map(|_| rng.vec(width, 2.0)).collect();
            let values = (0..first + n).map(|_| rng.vec(width, 3.0)).collect();
            let queries = rng.vec(n * shape.heads * shape.head_dim, 2.0);
            let sinks = rng.vec(shape.heads, 4.0).iter().map(|s| s + 1.0).collect();
            Case { shape, keys, values, queries, sinks }
        }

        /// The cache after all the case's tokens, a ring on a sliding layer as the model sizes
        /// it (the window plus one chunk of `chunk` tokens).
        fn cache(&self, chunk: usize) -> LayerCache {
            let width = self.shape.kv_heads * self.shape.head_dim;
            let mut cache = LayerCache::new(width, self.shape.window.map(|w| w + chunk));
            for (p, (k, v)) in self.keys.iter().zip(&self.values).enumerate() {
                cache.append(p, k, v);
            }
            cache
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
        let case = Case::new(shape, first, n, seed);
        // The new tokens' keys go in as one chunk, after the earlier ones, as the model appends them.
        let ours = attend(shape, &case.queries, &case.cache(n), first, &case.sinks);
        let expected = reference(shape, &case.queries, &case.keys, &case.values, first, &case.sinks);
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

    #[test]
    fn a_token_gets_the_same_bits_whatever_the_chunk_and_the_vector_unit() {
        for window in [None, Some(5), Some(40)] {
            let shape = AttentionShape { heads: 8, kv_heads: 2, head_dim: 64, window };
            let (first, n) = (45, 70);
            let case = Case::new(shape, first, n, 7);
            let cache = case.cache(n);
            let whole = attend(shape, &case.queries, &cache, first, &case.sinks);
            let portable = attend_on(Simd::Portable, shape, &case.queries, &cache, first, &case.sinks);
            assert!(whole.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "{window:?}: portable and detected units differ");
            let row = shape.heads * shape.head_dim;
            for (t, expected) in whole.chunks_exact(row).enumerate() {
                let one = attend(shape, &case.queries[t * row..(t + 1) * row], &cache, first + t, &case.sinks);
                assert!(one.iter().zip(expected).all(|(a, b)| a.to_bits() == b.to_bits()), "{window:?}: token {t} alone differs");
            }
        }
    }

    #[test]
    fn the_vector_exponential_is_within_two_ulp() {
        let mut worst = 0f64;
        for k in 0..=200_000 {
            let x = -87.0 * k as f32 / 200_000.0;
            let ours = exp_nonpositive(Portable::splat(x)).first() as f64;
            let exact = (x as f64).exp();
            worst = worst.max((ours - exact).abs() / exact);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        let edges = exp_nonpositive(Portable::load(&[0.0, -0.0, -87.5, f32::NEG_INFINITY, f32::NAN, -1e-30, -1000.0, -87.0]));
        assert_eq!(edges.0[..4], [1.0, 1.0, 0.0, 0.0]);
        assert!(edges.0[4].is_nan());
        assert_eq!(edges.0[5..7], [1.0, 0.0]);
        assert!(edges.0[7] > 0.0);
    }
}

//! The residual stream of a forward pass one block at a time: every point between blocks kept,
//! one block re-run from its stored input, or the rest of the model run from any point, so that
//! the cost of an error at one point of the model can be estimated without running all of it.

use crate::cache::LayerCache;
use crate::error::{Result, RuntimeError};
use crate::model::{rms_norm, Model, PREFILL_CHUNK};

/// A point of the residual stream: `0` is the embeddings (layer 0's input), `2l + 1` follows
/// layer `l`'s attention block and `2l + 2` its MLP block; the last is the final norm's input.
pub type ResidualSite = usize;

/// The residual stream of one window at every site: `[sites][tokens * hidden]`.
#[derive(Debug, Clone)]
pub struct ResidualTrace {
    /// The window's token ids.
    pub tokens: Vec<u32>,
    /// One `[tokens, hidden]` row-major block per site.
    pub sites: Vec<Vec<f32>>,
}

/// The block that reads a site and writes the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Layer `l`'s attention block: RMSNorm, attention, o_proj, residual add.
    Attention(usize),
    /// Layer `l`'s MLP block: RMSNorm, router, experts, residual add.
    Mlp(usize),
}

impl Block {
    /// The site this block reads.
    pub fn input_site(self) -> ResidualSite {
        match self {
            Block::Attention(l) => 2 * l,
            Block::Mlp(l) => 2 * l + 1,
        }
    }

    /// The block that reads `site` (none for the last site).
    fn reading(site: ResidualSite, layers: usize) -> Option<Block> {
        (site < 2 * layers).then_some(if site.is_multiple_of(2) { Block::Attention(site / 2) } else { Block::Mlp(site / 2) })
    }
}

impl Model<'_> {
    /// Sites of the residual stream: the embeddings, then two per layer.
    pub fn residual_sites(&self) -> usize {
        2 * self.layers.len() + 1
    }

    /// The embedding rows of `tokens` (`[n, hidden]`).
    pub fn embed_rows(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let mut x = vec![0f32; tokens.len() * h];
        for (t, &id) in tokens.iter().enumerate() {
            if id as usize >= self.config.vocab_size {
                return Err(RuntimeError::TokenOutOfRange { id, position: t, vocab: self.config.vocab_size });
            }
            self.embed.decode_row(id as usize, &mut x[t * h..(t + 1) * h]);
        }
        Ok(x)
    }

    /// Runs one window from position 0 keeping the residual stream at every site (the values
    /// [`Model::forward`] computes on the way).
    pub fn residual_trace(&self, tokens: &[u32]) -> Result<ResidualTrace> {
        if tokens.len() > self.max_context() {
            return Err(RuntimeError::ContextExceeded { tokens: tokens.len(), context: self.max_context() });
        }
        let mut sites = Vec::with_capacity(self.residual_sites());
        sites.push(self.embed_rows(tokens)?);
        for site in 0..self.residual_sites() - 1 {
            let next = self.run_block(site, &sites[site]);
            sites.push(next);
        }
        Ok(ResidualTrace { tokens: tokens.to_vec(), sites })
    }

    /// The residual stream at `site + 1` from its values `x` (`[n, hidden]`, positions `0..n`)
    /// at `site`: the one block between them, over the whole window.
    pub fn run_block(&self, site: ResidualSite, x: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let h = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        match Block::reading(site, self.layers.len()) {
            None => x.to_vec(),
            Some(Block::Attention(l)) => {
                let layer = &self.layers[l];
                let fresh = self.new_cache();
                let mut lc: LayerCache = fresh.layers[l].clone();
                let mut out = x.to_vec();
                for (ci, chunk) in out.chunks_mut(PREFILL_CHUNK * h).enumerate() {
                    let normed = rms_norm(chunk, &layer.input_norm, eps);
                    let attn = self.attention(layer, &mut lc, &normed, ci * PREFILL_CHUNK);
                    let o = layer.o.forward(&attn);
                    chunk.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                }
                out
            }
            Some(Block::Mlp(l)) => {
                let layer = &self.layers[l];
                let mut out = x.to_vec();
                for chunk in out.chunks_mut(PREFILL_CHUNK * h) {
                    let normed = rms_norm(chunk, &layer.post_norm, eps);
                    let moe = self.experts(layer, &normed, None);
                    chunk.iter_mut().zip(&moe).for_each(|(a, b)| *a += b);
                }
                out
            }
        }
    }

    /// Logits of every position (`[n, vocab]`) when the residual stream at `site` is `x`: the
    /// blocks after it, the final norm and lm_head.
    pub fn logits_from(&self, site: ResidualSite, x: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let mut x = x.to_vec();
        for s in site..self.residual_sites() - 1 {
            x = self.run_block(s, &x);
        }
        let normed = rms_norm(&x, &self.norm, c.rms_norm_eps as f32);
        let mut out = vec![0f32; normed.len() / c.hidden_size * c.vocab_size];
        self.lm_head.matmul(&normed, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_follow_the_blocks() {
        assert_eq!(Block::reading(0, 2), Some(Block::Attention(0)));
        assert_eq!(Block::reading(1, 2), Some(Block::Mlp(0)));
        assert_eq!(Block::reading(3, 2), Some(Block::Mlp(1)));
        assert_eq!(Block::reading(4, 2), None);
        assert_eq!(Block::Mlp(1).input_site(), 3);
    }
}

//! Key/value cache: growing for full-attention layers, a ring for sliding-window layers.

/// Keys and values of one layer.
#[derive(Debug, Clone)]
pub struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    /// Ring capacity in tokens (`None`: grows with the context).
    capacity: Option<usize>,
    /// Floats per token (`kv_heads * head_dim`).
    width: usize,
}

impl LayerCache {
    /// An empty cache; a ring of `capacity` tokens when given. Nothing is reserved up front: a
    /// ring grows with the context actually used, up to its capacity, so a large window (from a
    /// config) costs memory only when that many tokens are run.
    pub fn new(width: usize, capacity: Option<usize>) -> Self {
        LayerCache { keys: Vec::new(), values: Vec::new(), capacity, width }
    }

    /// Room for one more token at the end, doubling but never past a ring's capacity.
    fn grow_for_one(&mut self) {
        if self.keys.len() < self.keys.capacity() {
            return;
        }
        let Some(ring) = self.capacity else { return };
        let have = self.keys.len() / self.width.max(1);
        let want = (have * 2).clamp(1, ring.max(1)) - have;
        self.keys.reserve_exact(want * self.width);
        self.values.reserve_exact(want * self.width);
    }

    fn slot(&self, pos: usize) -> usize {
        match self.capacity {
            Some(c) => pos % c,
            None => pos,
        }
    }

    /// Stores the keys and values of positions `first..first + n`.
    pub fn append(&mut self, first: usize, keys: &[f32], values: &[f32]) {
        let n = keys.len() / self.width;
        for t in 0..n {
            let slot = self.slot(first + t);
            let (src_k, src_v) = (&keys[t * self.width..(t + 1) * self.width], &values[t * self.width..(t + 1) * self.width]);
            let at = slot * self.width;
            if at == self.keys.len() {
                self.grow_for_one();
                self.keys.extend_from_slice(src_k);
                self.values.extend_from_slice(src_v);
            } else {
                self.keys[at..at + self.width].copy_from_slice(src_k);
                self.values[at..at + self.width].copy_from_slice(src_v);
            }
        }
    }

    /// The key and value vectors stored for position `pos`.
    pub fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let at = self.slot(pos) * self.width;
        (&self.keys[at..at + self.width], &self.values[at..at + self.width])
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * 4
    }
}

/// The cache of every layer and the number of tokens already processed.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer.
    pub layers: Vec<LayerCache>,
    /// Tokens processed so far.
    pub len: usize,
}

impl KvCache {
    /// Bytes held by all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_positions() {
        let mut c = LayerCache::new(1, Some(3));
        c.append(0, &[0.0, 1.0, 2.0, 3.0], &[10.0, 11.0, 12.0, 13.0]);
        assert_eq!(c.at(3), (&[3.0][..], &[13.0][..]));
        assert_eq!(c.at(1), (&[1.0][..], &[11.0][..]));
        c.append(4, &[4.0], &[14.0]);
        assert_eq!(c.at(4).0, &[4.0]);
        assert_eq!(c.at(2).0, &[2.0]);
    }

    #[test]
    fn a_ring_holds_only_what_was_run_and_never_more_than_its_capacity() {
        // A window of 2^30 tokens costs nothing until tokens arrive.
        let mut c = LayerCache::new(4, Some(1 << 30));
        assert_eq!(c.bytes(), 0);
        c.append(0, &[1.0; 12], &[2.0; 12]);
        assert!(c.bytes() <= 2 * 4 * 4 * 4, "{}", c.bytes());
        let mut c = LayerCache::new(2, Some(5));
        for pos in 0..40 {
            c.append(pos, &[pos as f32; 2], &[0.0; 2]);
        }
        assert_eq!(c.bytes(), 2 * 5 * 2 * 4, "a ring of 5 tokens of width 2 holds exactly that");
        assert_eq!(c.at(39).0, &[39.0, 39.0]);
    }
}

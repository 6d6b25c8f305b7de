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
    /// An empty cache; a ring of `capacity` tokens when given.
    pub fn new(width: usize, capacity: Option<usize>) -> Self {
        let reserve = capacity.unwrap_or(0) * width;
        LayerCache { keys: Vec::with_capacity(reserve), values: Vec::with_capacity(reserve), capacity, width }
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
}
